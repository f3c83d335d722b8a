//! The tus upload id: a study session id followed by a file id.

use std::fmt;
use std::str::FromStr;

use relaypacs_core::{FileId, SessionId};

/// The id of one upload (one declared file of a study session): the
/// session id followed by the file id, 64 lowercase hex digits (256 random
/// bits). Parsed strictly, so a string is an upload id or it is not: no
/// id is ever matched by prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId {
    session: SessionId,
    file: FileId,
}

/// A string that is not an upload id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an upload id is 64 lowercase hex digits (a session id and a file id)")]
pub struct BadUploadId;

impl UploadId {
    /// The upload of `file` in `session`.
    pub fn new(session: SessionId, file: FileId) -> Self {
        Self { session, file }
    }

    /// Parse the 64 lowercase hex digits of [`Display`](fmt::Display);
    /// anything else (other length, case, characters) is refused.
    pub fn parse(s: &str) -> Result<Self, BadUploadId> {
        let (session, file) = s.split_at_checked(32).ok_or(BadUploadId)?;
        if file.len() != 32 {
            return Err(BadUploadId);
        }
        match (SessionId::parse(session), FileId::parse(file)) {
            (Ok(session), Ok(file)) => Ok(Self { session, file }),
            _ => Err(BadUploadId),
        }
    }

    /// The study session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The file in the session.
    pub fn file(&self) -> FileId {
        self.file
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.session, self.file)
    }
}

impl FromStr for UploadId {
    type Err = BadUploadId;
    fn from_str(s: &str) -> Result<Self, BadUploadId> {
        Self::parse(s)
    }
}

impl serde::Serialize for UploadId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for UploadId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_and_parses_strictly() {
        let id = UploadId::new(SessionId::random(), FileId::random());
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(UploadId::parse(&s), Ok(id));
        assert_eq!(s.parse::<UploadId>(), Ok(id));
        assert_eq!(id.session().to_string(), s[..32]);
        assert_eq!(id.file().to_string(), s[32..]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<UploadId>(&json).unwrap(), id);
        // A prefix, an extension, upper case, non-hex and non-ASCII are not
        // upload ids.
        for bad in [
            &s[..32],
            &s[..63],
            &format!("{s}0"),
            &s.to_uppercase(),
            &format!("{}g", &s[..63]),
            &format!("{}é", &s[..62]),
            "",
        ] {
            assert_eq!(UploadId::parse(bad), Err(BadUploadId), "{bad:?}");
        }
    }
}

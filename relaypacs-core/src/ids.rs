//! Checked identifier newtypes.
//!
//! Every identifier that may end up in a path, a key or a log line is parsed
//! strictly here, so that path traversal and key injection are impossible by
//! construction: a [`SessionId`] or [`FileId`] is exactly 32 lowercase hex
//! digits, and a [`Uid`] is a DICOM UID (digits and dots, at most 64 chars).

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

fn parse_hex128(s: &str, what: &'static str) -> Result<[u8; 16], Error> {
    if s.len() != 32
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::invalid(
            "RELAY_BAD_ID",
            format!("{what} must be 32 lowercase hex digits"),
        ));
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| Error::invalid("RELAY_BAD_ID", format!("{what} is not hex")))?;
    Ok(out)
}

macro_rules! random_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            /// A new random identifier (128 bits from the OS CSPRNG).
            pub fn random() -> Self {
                let mut b = [0u8; 16];
                rand::rng().fill_bytes(&mut b);
                Self(b)
            }

            /// Strict parse: exactly 32 lowercase hex digits.
            pub fn parse(s: &str) -> Result<Self, Error> {
                parse_hex128(s, $what).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

random_id!(
    /// Identifies one upload session (one study upload).
    SessionId,
    "session id"
);
random_id!(
    /// Identifies one file inside an upload session.
    FileId,
    "file id"
);

/// A DICOM UID (PS3.5 §9.1): 1 to 64 characters, digits and dots, no empty
/// component, no leading zero in a multi-digit component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(String);

impl Uid {
    /// Strict parse of a UID. Trailing NUL/space padding (as found in DICOM
    /// values) must be stripped by the caller.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::invalid("RELAY_BAD_UID", format!("invalid DICOM UID: {why}"));
        if s.is_empty() || s.len() > 64 {
            return Err(bad("length must be 1 to 64"));
        }
        for comp in s.split('.') {
            if comp.is_empty() {
                return Err(bad("empty component"));
            }
            if !comp.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("only digits and dots are allowed"));
            }
            if comp.len() > 1 && comp.starts_with('0') {
                return Err(bad("leading zero in a component"));
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// The UID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({})", self.0)
    }
}

impl FromStr for Uid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl Serialize for Uid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Uid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Who performs an action: a user id as the embedding application knows it,
/// or the system itself (expiry sweeper, outbox worker).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor {
    /// Stable user identifier, or `"system"`.
    pub user: String,
    /// Whether this actor may see and touch every session (admin role).
    #[serde(default)]
    pub admin: bool,
    /// Client network address, when known (for the audit trail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl Actor {
    /// A regular user.
    pub fn user(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            admin: false,
            address: None,
        }
    }

    /// The gateway itself (background work).
    pub fn system() -> Self {
        Self {
            user: "system".into(),
            admin: true,
            address: None,
        }
    }

    /// With a client address.
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip_and_reject_traversal() {
        let id = SessionId::random();
        assert_eq!(SessionId::parse(&id.to_string()).unwrap(), id);
        for bad in [
            "../../etc/passwd",
            "",
            "ABCDEF0123456789abcdef0123456789",
            "0123456789abcdef0123456789abcde/",
            "0123456789abcdef0123456789abcdef0",
        ] {
            assert!(SessionId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uid_rules() {
        assert!(Uid::parse("1.2.840.10008.5.1.4.1.1.7").is_ok());
        assert!(Uid::parse("2.25.0").is_ok());
        for bad in [
            "",
            "1..2",
            "1.02",
            "1.2.a",
            "../1",
            "1/2",
            &"1".repeat(65),
            "1.2\0",
        ] {
            assert!(Uid::parse(bad).is_err(), "{bad:?}");
        }
    }
}

//! The anchor of an audit trail: its chain head (record count and hash of
//! the last record) kept in a small file outside the trail, so that a cut
//! tail, which leaves a chain that verifies on its own, is detected.
//!
//! The file is one JSON object, `{"count":N,"hash":"<hex>","time":"<RFC 3339>"}`,
//! replaced crash-safely (temp file + fsync + rename + fsync dir, in
//! [`write_anchor`]): after a crash it holds the previous head or the new
//! one, never a torn one. It is only ever written after the records it
//! counts are durable, so it never runs ahead of the trail.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::local_audit::ChainHead;

/// Largest anchor file accepted by [`parse_anchor`] when read by
/// [`read_anchor`]; a real one is about 130 bytes.
pub const MAX_ANCHOR_LEN: usize = 4096;

/// A chain head as anchored, with the time it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The head: record count and last record's hash.
    #[serde(flatten)]
    pub head: ChainHead,
    /// When the anchor was written (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
}

/// Why an anchor file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    /// The file cannot be read.
    #[error("cannot read the anchor {path}")]
    Io {
        /// The anchor file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than the limit.
    #[error("the anchor is {len} bytes, more than the {max} accepted")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The content is not an anchor.
    #[error("the anchor is not valid: {0}")]
    Invalid(String),
}

/// The default anchor path of a trail: beside it, `<trail file name>.anchor`.
pub fn default_anchor_path(trail: &Path) -> PathBuf {
    let mut name = trail
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".anchor");
    trail.with_file_name(name)
}

/// Parse an anchor file's bytes (pure; at most `max_len` bytes accepted).
pub fn parse_anchor(bytes: &[u8], max_len: usize) -> Result<Anchor, AnchorError> {
    if bytes.len() > max_len {
        return Err(AnchorError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| AnchorError::Invalid(e.to_string()))
}

/// The anchor at `path`, or `None` when there is no such file.
pub fn read_anchor(path: &Path) -> Result<Option<Anchor>, AnchorError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AnchorError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse_anchor(&bytes, MAX_ANCHOR_LEN).map(Some)
}

/// Replace the anchor at `path` with `head`, crash-safely: temp file +
/// fsync + rename + fsync of the directory ([`crate::fs::write_atomic`]).
/// Blocking; call it from a blocking context.
pub fn write_anchor(path: &Path, head: ChainHead) -> relaypacs_core::Result<()> {
    let anchor = Anchor {
        head,
        time: OffsetDateTime::now_utc(),
    };
    let mut bytes = serde_json::to_vec(&anchor).map_err(|e| {
        relaypacs_core::Error::storage(
            relaypacs_core::StorageErrorKind::Io,
            "encode audit anchor",
            e,
        )
    })?;
    bytes.push(b'\n');
    crate::fs::write_atomic(path, &bytes)
}

/// Remove temp files a crash left while replacing the anchor at `path`
/// (`.<name>.<random>.tmp` beside it); only those, as the folder may be
/// shared.
pub(crate) fn sweep_anchor_temps(path: &Path) -> relaypacs_core::Result<()> {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(".{name}.");
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(relaypacs_core::Error::io("list anchor folder", e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| relaypacs_core::Error::io("list anchor folder", e))?;
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(&prefix) && n.ends_with(".tmp") {
            std::fs::remove_file(entry.path())
                .map_err(|e| relaypacs_core::Error::io("remove leftover anchor temp file", e))?;
        }
    }
    Ok(())
}

//! Small server state kept as one JSON document per file (users, refresh
//! token families, notifications): read whole, replaced atomically.

use std::path::Path;

use relaypacs_core::{Error, Result, StorageErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn storage(
    kind: StorageErrorKind,
    op: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::Storage {
        kind,
        op: op.into(),
        source: Box::new(e),
    }
}

/// The document at `path`, or `T::default()` when the file does not exist.
pub fn read<T: DeserializeOwned + Default>(path: &Path, op: &'static str) -> Result<T> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| storage(StorageErrorKind::Corrupt, op, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(Error::io(op, e)),
    }
}

/// Replace the document at `path`. Crash-safe: temp file, fsync, rename,
/// fsync dir (`write_atomic`).
pub fn write<T: Serialize + ?Sized>(path: &Path, value: &T, op: &'static str) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| storage(StorageErrorKind::Io, op, e))?;
    relaypacs_storage::fs::write_atomic(path, &bytes)
}

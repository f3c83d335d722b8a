//! The resume state: which study session and which tus upload each file
//! went to, so that a rerun after the process was killed continues where
//! the server says instead of sending everything again.
//!
//! Keys name the server and the file's content (SHA-256 and size), never
//! its path: a file moved or renamed still resumes. The file is JSON,
//! replaced crash-safely on every change (see [`write_durable`]) and held
//! under an exclusive advisory lock while a run uses it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ClientError;

/// The state file's content.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateData {
    /// Format version (1).
    #[serde(default)]
    pub version: u32,
    /// `server|study_instance_uid` → the open study session.
    #[serde(default)]
    pub studies: BTreeMap<String, StudyEntry>,
    /// `server|sha256|size` → the file's upload.
    #[serde(default)]
    pub files: BTreeMap<String, FileEntry>,
}

/// A study session opened for a study.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudyEntry {
    /// The session id.
    pub session: String,
}

/// A file's tus upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The session the upload belongs to.
    pub session: String,
    /// The upload URL (absolute).
    pub upload_url: String,
    /// Where the file was when the upload was created (for people reading
    /// the file; not used to match).
    pub path: String,
}

/// The key of a study.
pub fn study_key(server: &str, study_uid: &str) -> String {
    format!("{server}|{study_uid}")
}

/// The key of a file.
pub fn file_key(server: &str, sha256_hex: &str, size: u64) -> String {
    format!("{server}|{sha256_hex}|{size}")
}

/// An open state file: its content and the lock that keeps a second run
/// from using it at the same time.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// Held for the life of this value (released when the file closes).
    _lock: File,
    /// The content.
    pub data: StateData,
}

/// The default state file: `$XDG_STATE_HOME/relaypacs/uploads.json`, else
/// `~/.local/state/relaypacs/uploads.json`.
pub fn default_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(s) => PathBuf::from(s),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?)
            .join(".local")
            .join("state"),
    };
    Some(base.join("relaypacs").join("uploads.json"))
}

impl StateFile {
    /// Open (or start) the state file at `path`, creating its folder, and
    /// lock it (`<path>.lock`).
    ///
    /// # Errors
    /// [`ClientError::Config`] when the folder cannot be made, another run
    /// holds the lock, or the file is not a state file.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let cfg = |what: &str, e: &dyn std::fmt::Display| {
            ClientError::Config(format!("state file {}: {what}: {e}", path.display()))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| cfg("cannot create its folder", &e))?;
        }
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(PathBuf::from(lock_name))
            .map_err(|e| cfg("cannot open its lock", &e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| {
                ClientError::Config(format!(
                    "state file {} is in use by another `relaypacs upload` (or pass --state FILE)",
                    path.display()
                ))
            },
        )?;
        let data = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| cfg("not a state file", &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateData {
                version: 1,
                ..StateData::default()
            },
            Err(e) => return Err(cfg("cannot read it", &e)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
            data,
        })
    }

    /// Write the content durably (blocking).
    ///
    /// # Errors
    /// The I/O error.
    pub fn save(&self) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.data).map_err(std::io::Error::other)?;
        write_durable(&self.path, &bytes)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Replace `target` with `bytes`, crash-safely: a temp file beside it
/// (mode 0600, same folder so the rename is atomic) is written and
/// fsync'd, renamed over the target, then the folder is fsync'd. After a
/// crash the target holds the old or the new content, never a mix.
///
/// # Errors
/// The I/O error (the temp file is removed).
pub fn write_durable(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, target)?;
        File::open(&dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("state.json");
        let mut s = StateFile::open(&p).unwrap();
        s.data.files.insert(
            file_key("http://x", "ab", 3),
            FileEntry {
                session: "s".into(),
                upload_url: "http://x/files/1".into(),
                path: "/a".into(),
            },
        );
        s.save().unwrap();
        // A second run is refused while the first holds the lock.
        assert!(matches!(StateFile::open(&p), Err(ClientError::Config(_))));
        drop(s);
        let s = StateFile::open(&p).unwrap();
        assert_eq!(s.data.files.len(), 1);
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}

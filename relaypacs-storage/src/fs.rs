//! Crash-safe file-system primitives shared by the local adapters.
//!
//! Durable publish is always: write a temp file in the target directory,
//! `fsync` it, `rename` it over the target, `fsync` the directory (a rename
//! is atomic at once but durable only after the directory is synced).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use relaypacs_core::{Error, Result};

/// `fsync` a directory so that entries created, renamed or removed in it are durable.
/// An empty path (the parent of a bare relative name) is the current folder.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Create `dir` and any missing parents, making each new entry durable.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // A relative path's last parent is "": the current folder.
    let parent = dir.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    if let Some(parent) = parent {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Error::io(format!("create directory {}", dir.display()), e)),
    }
    if let Some(parent) = parent {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// A unique temp path beside `target` (same directory, so rename is atomic).
pub fn temp_path(target: &Path) -> PathBuf {
    let mut r = [0u8; 8];
    rand::rng().fill_bytes(&mut r);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{}.tmp", hex::encode(r)))
}

/// Atomically and durably replace `target` with `bytes`.
///
/// Crash-safe publish: temp file → write → fsync → rename → fsync dir.
/// After a crash, `target` holds either the old or the new content.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(target);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("create temp file", e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io("write temp file", e))?;
        f.sync_all().map_err(|e| Error::io("fsync temp file", e))?;
        fs::rename(&tmp, target).map_err(|e| Error::io("rename temp file", e))?;
        fsync_dir(target.parent().unwrap_or(Path::new(".")))
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp); // best effort: a leftover .tmp is never read
    }
    res
}

/// Remove a directory tree so that the removal is atomic and durable: it is
/// first renamed to a hidden trash name (one atomic step), the parent is
/// synced, then the tree is deleted. Missing is fine.
pub fn remove_dir_atomic(dir: &Path) -> Result<()> {
    let trash = temp_path(dir);
    match fs::rename(dir, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::io(
                format!("rename {} for removal", dir.display()),
                e,
            ));
        }
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    fs::remove_dir_all(&trash).map_err(|e| Error::io("remove directory", e))
}

/// Sweep leftover `.*.tmp` entries (from crashes mid-publish) in `dir`.
pub fn sweep_temp(dir: &Path) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("list directory", e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list directory", e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let p = entry.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|e| Error::io("remove leftover temp file", e))?;
        }
    }
    Ok(())
}

/// Take an exclusive advisory lock on `root/.lock`, so that two processes
/// never use one data folder at once. The lock lives as long as the file.
pub fn lock_root(root: &Path) -> Result<File> {
    create_dir_durable(root)?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(".lock"))
        .map_err(|e| Error::io("open lock file", e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(Error::conflict(
            "RELAY_DATA_DIR_LOCKED",
            format!("{} is in use by another RelayPACS process", root.display()),
        )),
        Err(fs::TryLockError::Error(e)) => Err(Error::io("lock data folder", e)),
    }
}

/// Lock a std mutex, recovering from poisoning. Callers (this crate and
/// the reference server) keep every critical section consistent before
/// anything that can panic, so a poisoned lock still guards valid data.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

//! [`FileSessionStore`]: durable session state in plain files.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use relaypacs_core::{
    ChunkInsert, ChunkRecord, Error, FileId, InstanceClaim, Result, SessionId, SessionRecord,
    SessionStore, StorageErrorKind, Uid, Versioned,
};
use serde::{Deserialize, Serialize};

use crate::fs::{
    create_dir_durable, fsync_dir, lock, lock_root, remove_dir_atomic, sweep_temp, write_atomic,
};

/// A [`SessionStore`] in a folder, the embedded default. Survives restarts.
///
/// Layout: `<root>/<session>/session.json` (replaced atomically and durably
/// on every update, with its version inside) and
/// `<root>/<session>/chunks/<file>.jsonl` (append-only, one chunk record a
/// line, `fdatasync`ed after each append; a torn last line from a crash was
/// never acknowledged and is cut off when the log is next opened).
///
/// Compare-and-set is serialised per session inside the process; the store
/// takes an exclusive lock on its root, so one process owns the folder.
#[derive(Clone)]
pub struct FileSessionStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    _lock: File,
    /// Per-session locks; every operation on a session runs under its lock,
    /// which also guards that session's cache of chunk records (kept in
    /// step with the logs once read).
    locks: Mutex<HashMap<SessionId, Arc<Mutex<ChunkCache>>>>,
    /// Serialises claims and releases of the instance index (the root lock
    /// keeps other processes out).
    index: Mutex<()>,
}

type ChunkCache = HashMap<FileId, BTreeMap<u64, ChunkRecord>>;

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u64,
    session: SessionRecord,
}

impl fmt::Debug for FileSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSessionStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for FileSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file-sessions:{}", self.inner.root.display())
    }
}

fn corrupt(op: &'static str, e: impl Into<relaypacs_core::error::BoxError>) -> Error {
    Error::storage(StorageErrorKind::Corrupt, op, e)
}

impl FileSessionStore {
    /// Open (or create) a store under `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let lock = lock_root(&root)?;
        sweep_temp(&root)?;
        let index = root.join(INDEX_DIR);
        create_dir_durable(&index)?;
        sweep_temp(&index)?;
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                _lock: lock,
                locks: Mutex::new(HashMap::new()),
                index: Mutex::new(()),
            }),
        })
    }

    /// Run `f` on a blocking thread while holding the index lock.
    async fn with_index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let _g = lock(&inner.index);
            f(&inner.root.join(INDEX_DIR))
        })
        .await
        .map_err(|e| Error::storage(StorageErrorKind::Io, "instance index task", e.to_string()))?
    }

    /// Run `f` on a blocking thread while holding the session's lock.
    async fn with_session<T: Send + 'static>(
        &self,
        id: SessionId,
        f: impl FnOnce(&mut ChunkCache, &Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let l = lock(&inner.locks).entry(id).or_default().clone();
            let mut cache = lock(&l);
            let dir = inner.root.join(id.to_string());
            f(&mut cache, &dir)
        })
        .await
        .map_err(|e| Error::storage(StorageErrorKind::Io, "session store task", e.to_string()))?
    }
}

/// Folder of the instance index under the root.
const INDEX_DIR: &str = "instances";

fn claim_path(index: &Path, sop: &Uid) -> PathBuf {
    index.join(format!("{sop}.json"))
}

fn read_claim(path: &Path) -> Result<Option<InstanceClaim>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| corrupt("parse instance claim", e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read instance claim", e)),
    }
}

fn read_stored(dir: &Path) -> Result<Stored> {
    let path = dir.join("session.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound { what: "session" });
        }
        Err(e) => return Err(Error::io("read session", e)),
    };
    serde_json::from_slice(&bytes).map_err(|e| corrupt("parse session", e))
}

fn write_stored(dir: &Path, version: u64, session: &SessionRecord) -> Result<()> {
    let bytes = serde_json::to_vec(&Stored {
        version,
        session: session.clone(),
    })
    .map_err(|e| corrupt("encode session", e))?;
    write_atomic(&dir.join("session.json"), &bytes)
}

fn log_path(dir: &Path, file: FileId) -> PathBuf {
    dir.join("chunks").join(format!("{file}.jsonl"))
}

/// Read a chunk log, cutting off a torn (unacknowledged) last line.
fn read_log(path: &Path) -> Result<BTreeMap<u64, ChunkRecord>> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(Error::io("open chunk log", e)),
    };
    let mut text = Vec::new();
    f.read_to_end(&mut text)
        .map_err(|e| Error::io("read chunk log", e))?;
    let complete = text
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    if complete < text.len() {
        // The tail was being appended when the process died; it was never
        // acknowledged. Cut it off durably before appending more.
        f.set_len(complete as u64)
            .map_err(|e| Error::io("truncate torn chunk log", e))?;
        f.sync_data().map_err(|e| Error::io("fsync chunk log", e))?;
    }
    let mut out = BTreeMap::new();
    for line in text[..complete]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
    {
        let rec: ChunkRecord =
            serde_json::from_slice(line).map_err(|e| corrupt("parse chunk log", e))?;
        out.entry(rec.offset).or_insert(rec);
    }
    Ok(out)
}

fn cached_log<'a>(
    cache: &'a mut ChunkCache,
    file: FileId,
    dir: &Path,
) -> Result<&'a mut BTreeMap<u64, ChunkRecord>> {
    use std::collections::hash_map::Entry;
    match cache.entry(file) {
        Entry::Occupied(o) => Ok(o.into_mut()),
        Entry::Vacant(v) => Ok(v.insert(read_log(&log_path(dir, file))?)),
    }
}

#[async_trait]
impl SessionStore for FileSessionStore {
    async fn create_session(&self, session: &SessionRecord) -> Result<Versioned<SessionRecord>> {
        let session = session.clone();
        self.with_session(session.id, move |cache, dir| {
            if dir.join("session.json").exists() {
                return Err(Error::AlreadyExists { what: "session" });
            }
            // A directory without session.json is a leftover of a crashed
            // create or delete: start it afresh.
            remove_dir_atomic(dir)?;
            cache.clear();
            create_dir_durable(&dir.join("chunks"))?;
            write_stored(dir, 1, &session)?;
            Ok(Versioned {
                value: session,
                version: 1,
            })
        })
        .await
    }

    async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>> {
        self.with_session(id, |_, dir| {
            read_stored(dir).map(|s| Versioned {
                value: s.session,
                version: s.version,
            })
        })
        .await
    }

    async fn update_session(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
        let session = session.clone();
        self.with_session(session.id, move |_, dir| {
            let cur = read_stored(dir)?;
            if cur.version != expected {
                return Err(Error::Precondition {
                    what: format!("session version {} (expected {expected})", cur.version),
                });
            }
            let next = expected + 1;
            write_stored(dir, next, &session)?;
            Ok(next)
        })
        .await
    }

    async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()> {
        self.with_session(id, move |cache, dir| {
            let cur = read_stored(dir)?;
            if cur.version != expected {
                return Err(Error::Precondition {
                    what: format!("session version {} (expected {expected})", cur.version),
                });
            }
            cache.clear();
            remove_dir_atomic(dir)
        })
        .await
    }

    async fn list_sessions(&self) -> Result<Vec<SessionId>> {
        let root = self.inner.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(&root).map_err(|e| Error::io("list sessions", e))? {
                let entry = entry.map_err(|e| Error::io("list sessions", e))?;
                if let Ok(id) = SessionId::parse(&entry.file_name().to_string_lossy())
                    && entry.path().join("session.json").exists()
                {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::storage(StorageErrorKind::Io, "list sessions", e.to_string()))?
    }

    async fn record_chunk(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
    ) -> Result<ChunkInsert> {
        let chunk = chunk.clone();
        self.with_session(id, move |cache, dir| {
            if !dir.join("session.json").exists() {
                return Err(Error::NotFound { what: "session" });
            }
            let log = cached_log(cache, file, dir)?;
            if let Some(existing) = log.get(&chunk.offset) {
                return Ok(ChunkInsert::Existing(existing.clone()));
            }
            let path = log_path(dir, file);
            let new = !path.exists();
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io("open chunk log", e))?;
            let mut line =
                serde_json::to_vec(&chunk).map_err(|e| corrupt("encode chunk record", e))?;
            line.push(b'\n');
            // Durable append: write the whole line, then fdatasync; a new
            // log file also needs its directory entry synced.
            let end = f
                .seek(SeekFrom::End(0))
                .map_err(|e| Error::io("seek chunk log", e))?;
            if let Err(e) = f.write_all(&line).and_then(|()| f.sync_data()) {
                // Undo a partial append so the log stays well-formed; if
                // even that fails the torn line is cut at the next open.
                let _ = f.set_len(end);
                return Err(Error::io("append chunk log", e));
            }
            if new {
                fsync_dir(&dir.join("chunks"))?;
            }
            log.insert(chunk.offset, chunk);
            Ok(ChunkInsert::Inserted)
        })
        .await
    }

    async fn chunks(&self, id: SessionId, file: FileId) -> Result<Vec<ChunkRecord>> {
        self.with_session(id, move |cache, dir| {
            if !dir.join("session.json").exists() {
                return Err(Error::NotFound { what: "session" });
            }
            Ok(cached_log(cache, file, dir)?.values().cloned().collect())
        })
        .await
    }

    async fn claim_instance(&self, claim: &InstanceClaim) -> Result<InstanceClaim> {
        let claim = claim.clone();
        self.with_index(move |index| {
            let path = claim_path(index, &claim.sop_instance_uid);
            if let Some(existing) = read_claim(&path)? {
                return Ok(existing);
            }
            let bytes = serde_json::to_vec(&claim).map_err(|e| corrupt("encode claim", e))?;
            // Crash-safe: temp, fsync, rename, fsync dir (write_atomic).
            write_atomic(&path, &bytes)?;
            Ok(claim)
        })
        .await
    }

    async fn instance_claim(&self, sop_instance_uid: &Uid) -> Result<Option<InstanceClaim>> {
        let sop = sop_instance_uid.clone();
        self.with_index(move |index| read_claim(&claim_path(index, &sop)))
            .await
    }

    async fn release_instance(
        &self,
        sop_instance_uid: &Uid,
        session: SessionId,
        file: FileId,
    ) -> Result<()> {
        let sop = sop_instance_uid.clone();
        self.with_index(move |index| {
            let path = claim_path(index, &sop);
            match read_claim(&path)? {
                Some(c) if c.held_by(session, file) => {
                    // Durable removal: unlink, then fsync the folder.
                    std::fs::remove_file(&path)
                        .map_err(|e| Error::io("remove instance claim", e))?;
                    fsync_dir(index)
                }
                _ => Ok(()),
            }
        })
        .await
    }

    async fn delete_chunks(&self, id: SessionId, file: FileId) -> Result<()> {
        self.with_session(id, move |cache, dir| {
            cache.remove(&file);
            match std::fs::remove_file(log_path(dir, file)) {
                Ok(()) => fsync_dir(&dir.join("chunks")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io("delete chunk log", e)),
            }
        })
        .await
    }
}

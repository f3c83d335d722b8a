//! [`LocalChunkStore`]: chunks written in place into one file per upload.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use relaypacs_core::{
    ByteStream, ChunkPlacement, ChunkRecord, ChunkStore, Error, FileKey, Result, SessionId, Syncing,
};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::fs::{fsync_dir, lock, lock_root, remove_dir_atomic, sweep_temp};

/// Bytes gathered before one positioned write.
const WRITE_BUF: usize = 1 << 20;
/// Buffers queued between the hashing task and the writer thread.
const WRITE_QUEUE: usize = 6;
/// Flush written bytes every this many bytes of a chunk (a multiple of `WRITE_BUF`).
const EARLY_SYNC: u64 = 2 << 20;
/// Read size when streaming a file back.
const READ_BUF: usize = 1 << 20;

/// A [`ChunkStore`] on the local file system, the embedded default.
///
/// Each file of an upload is one preallocated (sparse) file,
/// `<root>/<session>/<file>.data`; a chunk is written at its offset and
/// `fdatasync`ed before `put_chunk` returns, so sealing needs no copy and
/// no sync (a file of one chunk in a new session costs four syncs: the
/// root and session folder, the new file, the chunk's `fdatasync`).
/// Ranges that were never acknowledged have unspecified content; the
/// pipeline only reads acknowledged ranges.
///
/// The store takes an exclusive lock on its root: one process per folder.
#[derive(Clone)]
pub struct LocalChunkStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    _lock: File,
    writers: Mutex<HashMap<FileKey, Vec<Range<u64>>>>,
    writer_done: Notify,
    /// Session folders made by `put_file_syncing` whose names are not yet
    /// durable in the root (their sync is still running): another file
    /// written into one syncs the root too, so it never depends on a sync
    /// it does not wait for.
    unsynced_dirs: Mutex<HashSet<SessionId>>,
}

impl fmt::Debug for LocalChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalChunkStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for LocalChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "local-chunks:{}", self.inner.root.display())
    }
}

/// Marks a byte range as being written until dropped (even if the writing
/// thread outlives a cancelled request), so no later write to the same
/// range can start while a stale one is still running.
struct ActiveWrite {
    store: Arc<Inner>,
    key: FileKey,
    range: Range<u64>,
}

impl Drop for ActiveWrite {
    fn drop(&mut self) {
        let mut w = lock(&self.store.writers);
        if let Some(v) = w.get_mut(&self.key) {
            if let Some(i) = v.iter().position(|r| *r == self.range) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                w.remove(&self.key);
            }
        }
        drop(w);
        self.store.writer_done.notify_waiters();
    }
}

impl LocalChunkStore {
    /// Open (or create) a store under `root`.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let lock = lock_root(&root)?;
        sweep_temp(&root)?;
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                _lock: lock,
                writers: Mutex::new(HashMap::new()),
                writer_done: Notify::new(),
                unsynced_dirs: Mutex::new(HashSet::new()),
            }),
        })
    }

    fn session_dir(&self, s: SessionId) -> PathBuf {
        self.inner.root.join(s.to_string())
    }

    fn data_path(&self, key: FileKey) -> PathBuf {
        self.session_dir(key.session)
            .join(format!("{}.data", key.file))
    }

    async fn begin_write(&self, key: FileKey, range: Range<u64>) -> ActiveWrite {
        let inner = &self.inner;
        loop {
            let notified = inner.writer_done.notified();
            {
                let mut w = lock(&inner.writers);
                let v = w.entry(key).or_default();
                if !v.iter().any(|r| r.start < range.end && range.start < r.end) {
                    v.push(range.clone());
                    return ActiveWrite {
                        store: inner.clone(),
                        key,
                        range,
                    };
                }
            }
            notified.await;
        }
    }
}

/// How a write found its session folder (see [`Inner::session_folder`]).
#[derive(Clone, Copy)]
struct Folder {
    /// This write made it.
    made: bool,
    /// Its name may not be durable in the root yet: this write made it, or
    /// another did whose sync of the root has not ended.
    unsynced: bool,
}

impl Inner {
    /// The folder of `session`, made when missing (its parent, the root,
    /// exists). Whether its name is durable is decided under the lock of
    /// `unsynced_dirs` together with the making, so a write that finds the
    /// folder made by another still syncing knows it.
    fn session_folder(&self, session: SessionId, dir: &Path) -> Result<Folder> {
        let mut unsynced = lock(&self.unsynced_dirs);
        match std::fs::create_dir(dir) {
            Ok(()) => {
                unsynced.insert(session);
                Ok(Folder {
                    made: true,
                    unsynced: true,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Folder {
                made: false,
                unsynced: unsynced.contains(&session),
            }),
            Err(e) => Err(Error::io(format!("create directory {}", dir.display()), e)),
        }
    }

    /// Make the name of `session`'s folder durable in the root when
    /// `folder` says it may not be (a no-op otherwise).
    fn sync_folder_name(&self, session: SessionId, folder: Folder) -> Result<()> {
        if folder.unsynced {
            fsync_dir(&self.root)?;
            if folder.made {
                lock(&self.unsynced_dirs).remove(&session);
            }
        }
        Ok(())
    }
}

/// The body of a whole file of `size` bytes, at most [`WRITE_BUF`]
/// (checked by the caller), gathered: a body that fails or has another
/// length is an error before anything is created.
async fn gather(size: u64, mut body: ByteStream) -> Result<BytesMut> {
    // At most WRITE_BUF (checked by the caller), so this fits a usize.
    let mut buf = BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
    while let Some(item) = body.next().await {
        let b = item?;
        let seen = (buf.len() + b.len()) as u64;
        if seen > size {
            return Err(length_mismatch(0, size, seen));
        }
        buf.extend_from_slice(&b);
    }
    if buf.len() as u64 != size {
        return Err(length_mismatch(0, size, buf.len() as u64));
    }
    Ok(buf)
}

/// A chunk body of `actual` bytes for a placement of `expected` at `offset`.
fn length_mismatch(offset: u64, expected: u64, actual: u64) -> Error {
    Error::Integrity(relaypacs_core::IntegrityError::ChunkLength {
        offset,
        expected,
        actual,
    })
}

/// A new data file (not there before: `AlreadyExists` otherwise), its
/// session folder made first; the folder's name is durable in the root on
/// return, the file's is the caller's to make durable.
fn create_new_file(inner: &Inner, key: FileKey, dir: &Path, path: &Path) -> Result<File> {
    let folder = inner.session_folder(key.session, dir)?;
    inner.sync_folder_name(key.session, folder)?;
    open_new(path)
}

/// A new data file at `path` (not there before), in a folder that exists.
fn open_new(path: &Path) -> Result<File> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::AlreadyExists { what: "file" })
        }
        Err(e) => Err(Error::io("create data file", e)),
    }
}

/// Open the data file at `path` to read `range` of it: a missing file is
/// `NotFound`, a range outside it `RELAY_BAD_RANGE`.
fn open_range(path: &Path, range: &Range<u64>) -> Result<File> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound { what: "file" });
        }
        Err(e) => return Err(Error::io("open data file", e)),
    };
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat data file", e))?
        .len();
    if range.start > range.end || range.end > len {
        return Err(Error::invalid(
            "RELAY_BAD_RANGE",
            format!("range {range:?} outside file of {len} bytes"),
        ));
    }
    Ok(f)
}

/// [`ChunkStore::read`] of at most [`READ_BUF`] bytes, whole.
fn read_small(path: &Path, range: Range<u64>) -> Result<Bytes> {
    let f = open_range(path, &range)?;
    // At most READ_BUF (checked by the caller), so this fits a usize.
    let n = usize::try_from(range.end - range.start)
        .map_err(|_| Error::invalid("RELAY_BAD_RANGE", "range too large"))?;
    let mut buf = BytesMut::zeroed(n);
    f.read_exact_at(&mut buf, range.start)
        .map_err(|e| Error::io("read data file", e))?;
    Ok(buf.freeze())
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| task_failed(op, e))?
}

/// A blocking task of `op` that did not return (it panicked or was
/// cancelled with the runtime).
fn task_failed(op: &'static str, e: tokio::task::JoinError) -> Error {
    Error::storage(relaypacs_core::StorageErrorKind::Io, op, e.to_string())
}

#[async_trait]
impl ChunkStore for LocalChunkStore {
    async fn create_file(&self, key: FileKey, size: u64) -> Result<()> {
        let dir = self.session_dir(key.session);
        let path = self.data_path(key);
        let inner = self.inner.clone();
        blocking("create file", move || {
            match create_new_file(&inner, key, &dir, &path) {
                Ok(f) => {
                    // Durable before the file is recorded (a tus client may
                    // PATCH it after a crash): the file with its size, then
                    // its name (the session folder's name was made durable
                    // in the root above).
                    f.set_len(size)
                        .map_err(|e| Error::io("size data file", e))?;
                    f.sync_all().map_err(|e| Error::io("fsync data file", e))?;
                    fsync_dir(&dir)
                }
                Err(Error::AlreadyExists { .. }) => {
                    let len = std::fs::metadata(&path)
                        .map_err(|e| Error::io("stat data file", e))?
                        .len();
                    if len == size {
                        Ok(())
                    } else {
                        Err(Error::conflict(
                            "RELAY_FILE_SIZE_CONFLICT",
                            "file exists with another size",
                        ))
                    }
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        mut body: ByteStream,
    ) -> Result<String> {
        let path = self.data_path(key);
        let range = placement.offset..placement.offset.saturating_add(placement.length);
        let active = self.begin_write(key, range).await;
        let file = match File::options().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound { what: "file" });
            }
            Err(e) => return Err(Error::io("open data file", e)),
        };
        // Hashing (in the body stream) and disk writes overlap: this task
        // polls the body, a blocking thread writes what it is sent and
        // flushes every few MiB, so the disk works while the next bytes are
        // hashed and the final fdatasync has little left to wait for.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(WRITE_QUEUE);
        let offset = placement.offset;
        let length = placement.length;
        let writer = tokio::task::spawn_blocking(move || -> Result<()> {
            let _active = active; // released only when this thread stops writing
            let mut pos = offset;
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    Some(buf) => {
                        file.write_all_at(&buf, pos)
                            .map_err(|e| Error::io("write chunk", e))?;
                        pos += buf.len() as u64;
                        if (pos - offset).is_multiple_of(EARLY_SYNC) && pos != offset + length {
                            // Only a head start for the final fdatasync;
                            // acknowledgement still waits for that one.
                            file.sync_data()
                                .map_err(|e| Error::io("fdatasync chunk", e))?;
                        }
                    }
                    None => {
                        // Commit: every byte is written; make it durable.
                        if pos != offset + length {
                            return Err(Error::invalid(
                                "RELAY_CHUNK_LENGTH",
                                "chunk length mismatch",
                            ));
                        }
                        // A failed fdatasync fails the chunk, and this
                        // descriptor is dropped: a retry opens a new one.
                        return file
                            .sync_data()
                            .map_err(|e| Error::io("fdatasync chunk", e));
                    }
                }
            }
            Err(Error::storage(
                relaypacs_core::StorageErrorKind::Io,
                "write chunk",
                "chunk write abandoned",
            ))
        });
        let mut buf = BytesMut::with_capacity(WRITE_BUF);
        let mut seen = 0u64;
        let mut failure = None;
        while let Some(item) = body.next().await {
            match item {
                Ok(b) => {
                    seen += b.len() as u64;
                    if seen > length {
                        failure = Some(length_mismatch(offset, length, seen));
                        break;
                    }
                    buf.extend_from_slice(&b);
                    if buf.len() >= WRITE_BUF && tx.send(Some(buf.split().freeze())).await.is_err()
                    {
                        break; // writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() && seen != length {
            failure = Some(length_mismatch(offset, length, seen));
        }
        if failure.is_none() {
            if !buf.is_empty() {
                let _ = tx.send(Some(buf.freeze())).await; // a send error means the writer failed: reported below
            }
            let _ = tx.send(None).await;
        }
        drop(tx);
        // Wait for the writer in every case, so nothing writes into this
        // range after we return.
        let written = writer.await.map_err(|e| task_failed("write chunk", e))?;
        match failure {
            Some(e) => Err(e),
            None => written.map(|()| String::new()),
        }
    }

    /// Three syncs instead of `create_file` + `put_chunk`'s four: the new
    /// file is not fsync'd empty, since the chunk's `fdatasync` makes its
    /// bytes and its size durable together (a size change is metadata
    /// `fdatasync` flushes), and its name is made durable after (fsync of
    /// the session folder, whose own name was made durable in the root
    /// first). Until this returns, nothing records the file,
    /// so a crash in between leaves at most an unrecorded file for the
    /// orphan sweep.
    async fn put_file(&self, key: FileKey, size: u64, body: ByteStream) -> Result<String> {
        if size <= WRITE_BUF as u64 {
            let (receipt, syncing) = self.put_file_syncing(key, size, body).await?;
            syncing.await?;
            return Ok(receipt);
        }
        let dir = self.session_dir(key.session);
        let path = self.data_path(key);
        let inner = self.inner.clone();
        blocking("create file", move || {
            create_new_file(&inner, key, &dir, &path)?
                .set_len(size)
                .map_err(|e| Error::io("size data file", e))
        })
        .await?;
        let placement = ChunkPlacement {
            offset: 0,
            length: size,
        };
        // Durable: the bytes and the size (put_chunk's fdatasync).
        let receipt = self.put_chunk(key, placement, body).await?;
        // Durable: the name.
        let dir = self.session_dir(key.session);
        blocking("fsync session folder", move || fsync_dir(&dir)).await?;
        Ok(receipt)
    }

    /// A file of at most [`WRITE_BUF`] bytes: its body gathered first (a
    /// body that fails or has another length creates nothing), then one
    /// blocking call creates and writes it, and another, started before
    /// this returns, makes it durable with the same three syncs as
    /// `put_file`: the session folder's name in the root (when this or
    /// another unsynced write made the folder), the bytes with the size
    /// (`fdatasync`), the file's name (fsync of the session folder). Larger
    /// files are `put_file`'s, durable on return.
    async fn put_file_syncing(
        &self,
        key: FileKey,
        size: u64,
        body: ByteStream,
    ) -> Result<(String, Syncing)> {
        if size > WRITE_BUF as u64 {
            let receipt = self.put_file(key, size, body).await?;
            return Ok((receipt, relaypacs_core::chunk_store::already_durable()));
        }
        let buf = gather(size, body).await?;
        let dir = self.session_dir(key.session);
        let path = self.data_path(key);
        let inner = self.inner.clone();
        let session = key.session;
        let (f, dir, folder) = blocking("store file", move || {
            let folder = inner.session_folder(session, &dir)?;
            let f = open_new(&path)?;
            f.write_all_at(&buf, 0)
                .map_err(|e| Error::io("write chunk", e))?;
            Ok((f, dir, folder))
        })
        .await?;
        let inner = self.inner.clone();
        // Durable when this resolves: until then nothing records the file
        // (the trait's contract), so a crash before leaves at most an
        // unrecorded file, or folder, for the orphan sweep.
        let sync = tokio::task::spawn_blocking(move || -> Result<()> {
            f.sync_data().map_err(|e| Error::io("fdatasync chunk", e))?;
            fsync_dir(&dir)?;
            inner.sync_folder_name(session, folder)
        });
        let syncing: Syncing =
            Box::pin(async move { sync.await.map_err(|e| task_failed("sync file", e))? });
        Ok((String::new(), syncing))
    }

    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
        relaypacs_core::chunk_store::check_tiling(size, chunks)?;
        let path = self.data_path(key);
        blocking("seal file", move || {
            let len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::NotFound { what: "file" });
                }
                Err(e) => return Err(Error::io("stat data file", e)),
            };
            if len != size {
                return Err(Error::Integrity(
                    relaypacs_core::IntegrityError::StoredSize {
                        expected: size,
                        actual: len,
                    },
                ));
            }
            // No sync: the file is durable already. Its name and size were
            // made durable by create_file (fsync of the file, its session
            // folder and the root), and each chunk tiling it by the
            // fdatasync put_chunk made before acknowledging it; data is
            // written in place, so there is nothing to copy or rename.
            Ok(())
        })
        .await
    }

    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
        let path = self.data_path(key);
        if range.end.saturating_sub(range.start) <= READ_BUF as u64 {
            // A range of one read buffer (a typical instance): open, check
            // and read on one blocking thread instead of a thread trip for
            // each of them.
            let buf = blocking("read data file", move || read_small(&path, range)).await?;
            return Ok(Box::pin(futures::stream::once(async move { Ok(buf) })));
        }
        let r = range.clone();
        let f = blocking("open data file", move || {
            use std::io::Seek;
            let mut f = open_range(&path, &r)?;
            f.seek(std::io::SeekFrom::Start(r.start))
                .map_err(|e| Error::io("seek data file", e))?;
            Ok(f)
        })
        .await?;
        let f = tokio::fs::File::from_std(f);
        let reader = tokio::io::BufReader::with_capacity(READ_BUF, f.take(range.end - range.start));
        let s = tokio_util::io::ReaderStream::with_capacity(reader, READ_BUF)
            .map(|r| r.map_err(|e| Error::io("read data file", e)));
        Ok(Box::pin(s))
    }

    async fn delete_file(&self, key: FileKey) -> Result<()> {
        let path = self.data_path(key);
        let dir = self.session_dir(key.session);
        blocking("delete file", move || match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(&dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("delete data file", e)),
        })
        .await
    }

    async fn delete_session(&self, session: SessionId) -> Result<()> {
        let dir = self.session_dir(session);
        blocking("delete session", move || remove_dir_atomic(&dir)).await
    }

    /// A sealed file is its data file: exactly its bytes (the file was
    /// sized at creation and `seal_file` checked the length) and durable.
    /// Nothing writes to it again: chunks are written only before the
    /// file is sealed (the pipeline takes none for a completed file), and
    /// deleting only unlinks, so a hard link elsewhere keeps the bytes.
    fn local_file(&self, key: FileKey) -> Option<PathBuf> {
        Some(self.data_path(key))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

    use super::*;

    /// A session folder's name counts as not durable from its making until
    /// its maker synced the root: a second write into it meanwhile syncs
    /// the root too; one after does not.
    #[test]
    fn a_folder_made_by_an_unsynced_write_is_synced_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalChunkStore::open(dir.path()).unwrap();
        let inner = &store.inner;
        let s = SessionId::random();
        let folder = store.session_dir(s);
        let first = inner.session_folder(s, &folder).unwrap();
        assert!(first.made && first.unsynced);
        assert!(folder.is_dir());
        let second = inner.session_folder(s, &folder).unwrap();
        assert!(
            !second.made && second.unsynced,
            "made by a write still syncing"
        );
        // The second write's sync leaves the mark to the maker.
        inner.sync_folder_name(s, second).unwrap();
        assert!(inner.session_folder(s, &folder).unwrap().unsynced);
        inner.sync_folder_name(s, first).unwrap();
        let third = inner.session_folder(s, &folder).unwrap();
        assert!(!third.made && !third.unsynced, "synced by its maker");
        assert!(lock(&inner.unsynced_dirs).is_empty());
    }
}

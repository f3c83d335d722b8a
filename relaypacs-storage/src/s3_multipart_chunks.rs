//! [`MultipartChunkStore`]: each file is one multipart upload, so sealing
//! costs O(parts) requests and no copy of the bytes.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use relaypacs_core::{
    ByteStream, ChunkPlacement, ChunkRecord, ChunkStore, Error, FileKey, IntegrityError, Result,
    SessionId, StorageErrorKind,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::object_store_chunks::map_err;

/// The smallest part S3 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// The most parts one S3 upload may have.
pub const MAX_PARTS: u64 = 10_000;
/// The default part size: the grid on which files are cut into parts.
pub const DEFAULT_PART_SIZE: u64 = 8 << 20;
/// Uploads in flight at once per `put_chunk` and per `seal_file`: memory
/// per call is about `part_size * (MAX_IN_FLIGHT + 1)`.
const MAX_IN_FLIGHT: usize = 2;
/// A marker object larger than this is not ours (it is only read, never
/// trusted to be small).
const MAX_MARKER_BYTES: u64 = 4096;
/// Upload markers cached per process; the cache is cleared when full.
const MAX_CACHED_UPLOADS: usize = 10_000;

/// A [`ChunkStore`] on an object store with the low-level multipart API
/// (`object_store::aws::AmazonS3`, and `InMemory` for tests): each file is
/// **one multipart upload** whose parts are the file's bytes, and sealing
/// is one `CompleteMultipartUpload`, O(parts) requests, no byte copied.
///
/// # Parts: a fixed grid
/// The object store numbers the parts of a completion by their position
/// (part `i + 1` is the `i`-th listed), and S3-compatible servers such as
/// s3s-fs refuse gaps in part numbers; R2 further wants all parts but the
/// last the same size. So part numbers cannot follow chunk offsets with
/// gaps: the file is cut on a fixed grid of `part_size` bytes (8 MiB by
/// default, larger when the file would need more than 10,000 parts),
/// chosen at [`create_file`](ChunkStore::create_file) and persisted with
/// the upload. Cell `i` (bytes `[i * part_size, (i + 1) * part_size)`, the
/// last one shorter) is part number `i + 1`, so parts are always numbered
/// `1..=n` without gaps, each `part_size` bytes but the last.
///
/// A chunk, which may arrive in any order, is cut on that grid while it
/// streams in:
/// - a cell the chunk covers whole is uploaded at once as its part
///   (`UploadPart`); its ETag (`PartId`) goes into the receipt `put_chunk`
///   returns, which the pipeline keeps in the chunk record;
/// - the piece of a cell the chunk covers only partly (the chunk starts or
///   ends off the grid) is staged as its own object
///   `<file>/staged/<start>-<length>` with one atomic PUT. At seal, each
///   such cell is assembled from its staged pieces (named by the chunk
///   records) and uploaded as its part: that costs the bytes of those
///   cells only. **A client whose chunks are multiples of the part size
///   (8 MiB by default) never hits this: its completion reads no byte.**
///
/// Seal needs only the chunk records (their receipts) and the persisted
/// upload id.
///
/// # Layout under the prefix
/// - `<session>/<file>/upload`: the upload marker (JSON: upload id, file
///   size, part size), written once with a create-only PUT (atomic; the
///   loser of a race between instances aborts its own upload and takes
///   the winner's), so any instance, or a restarted one, continues the
///   upload; removed once the file is sealed or deleted. This needs a
///   store whose create-only PUT (`If-None-Match: *`) is atomic, as AWS S3,
///   R2 and MinIO are (s3s-fs checks and writes in two steps, so there two
///   instances creating one file at the same instant may both win; the
///   pipeline creates each file once, so only a retry reaches this path).
/// - `<session>/<file>/staged/…`: staged pieces, removed at seal.
/// - `<session>/<file>/data`: the sealed file (the completed upload).
///
/// # Durability
/// `put_chunk` returns `Ok` once every part and staged piece of the chunk
/// is acknowledged by the store. A failed or short body is an error: parts
/// it uploaded are never listed in a completion (a later chunk over that
/// cell uploads the same part number again, replacing it; real S3 also
/// checks each listed ETag), staged pieces it wrote are deleted on the way
/// out (at worst an unreferenced one stays, named by its length, until
/// seal or delete), so nothing of it is ever read.
///
/// # Reading
/// Bytes in an uncompleted upload cannot be read back from S3, so
/// [`read`](ChunkStore::read) serves sealed files only; before the seal it
/// is [`Error::NotFound`]. The pipeline reads a file only after sealing it.
///
/// # Removal and cleanup
/// `delete_file` and `delete_session` abort the upload (id read from the
/// marker) and delete every object of the file or session. Uploads left by
/// a file that was never sealed nor deleted (a crash between
/// `create_file` and the session update, a lost session) are removed by
/// [`abort_abandoned`](Self::abort_abandoned), to run periodically with a
/// cut-off longer than any upload may take (the session TTL); on AWS an
/// `AbortIncompleteMultipartUpload` lifecycle rule is a second net.
pub struct MultipartChunkStore<S> {
    store: Arc<S>,
    prefix: Path,
    part_size: u64,
    uploads: Arc<Mutex<HashMap<FileKey, Arc<UploadInfo>>>>,
}

/// The upload marker: what any instance needs to continue a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UploadInfo {
    /// Format version.
    v: u8,
    /// The multipart upload of `<file>/data`.
    upload_id: String,
    /// The file's declared size.
    size: u64,
    /// The grid: cell `i` is part number `i + 1`.
    part_size: u64,
}

/// The receipt of one chunk: the parts it uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    /// Format version.
    v: u8,
    /// The grid the parts are on.
    ps: u64,
    /// `(cell index, PartId content)` of each whole cell the chunk covered.
    parts: Vec<(u64, String)>,
}

/// A piece of a chunk: one whole grid cell (a part) or part of one (staged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    start: u64,
    end: u64,
    /// `Some(cell)` when the piece is that whole cell.
    cell: Option<u64>,
}

/// Cut `[offset, end)` of a file of `size` bytes on a grid of `part_size`.
fn pieces_of(offset: u64, end: u64, size: u64, part_size: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let cell = at / part_size;
        let cell_start = cell * part_size;
        let cell_end = (cell_start + part_size).min(size);
        let piece_end = cell_end.min(end);
        out.push(Piece {
            start: at,
            end: piece_end,
            cell: (at == cell_start && piece_end == cell_end).then_some(cell),
        });
        at = piece_end;
    }
    out
}

/// The grid for a file of `size` bytes: `base`, or larger (a whole number
/// of MiB) when `base` would need more than [`MAX_PARTS`] parts.
fn grid_for(size: u64, base: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    base.max(needed)
}

// Not derived: a clone shares the store (`Arc`), so `S` need not be `Clone`.
impl<S> Clone for MultipartChunkStore<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.prefix.clone(),
            part_size: self.part_size,
            uploads: self.uploads.clone(),
        }
    }
}

impl<S: ObjectStore> fmt::Debug for MultipartChunkStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultipartChunkStore")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .field("part_size", &self.part_size)
            .finish()
    }
}

impl<S: ObjectStore> fmt::Display for MultipartChunkStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "multipart({})/{}", self.store, self.prefix)
    }
}

fn corrupt(op: &'static str, what: impl Into<String>) -> Error {
    Error::storage(StorageErrorKind::Corrupt, op, what.into())
}

fn length_error(offset: u64, expected: u64, actual: u64) -> Error {
    IntegrityError::ChunkLength {
        offset,
        expected,
        actual,
    }
    .into()
}

/// What an upload task finished.
enum Uploaded {
    Part(u64, PartId),
    Staged,
}

/// Take the outcome of a finished upload task; a part goes into `parts`.
fn joined(
    done: std::result::Result<object_store::Result<Uploaded>, tokio::task::JoinError>,
    parts: &mut Vec<(u64, String)>,
) -> Result<()> {
    let done = done.map_err(|e| Error::storage(StorageErrorKind::Io, "upload part", e))?;
    match done.map_err(|e| map_err("upload part", e))? {
        Uploaded::Part(cell, id) => parts.push((cell, id.content_id)),
        Uploaded::Staged => {}
    }
    Ok(())
}

/// The folder of the file a marker `<...>/<session>/<file>/upload` belongs to.
fn file_of_marker(marker: &Path) -> Path {
    let n = marker.parts().count().saturating_sub(1);
    Path::from_iter(marker.parts().take(n))
}

impl<S: ObjectStore + MultipartStore> MultipartChunkStore<S> {
    /// Chunks under `prefix` in `store`, on a grid of [`DEFAULT_PART_SIZE`].
    pub fn new(store: Arc<S>, prefix: impl Into<Path>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            part_size: DEFAULT_PART_SIZE,
            uploads: Arc::default(),
        }
    }

    /// The same store on a grid of `part_size` bytes for files created
    /// from now on (files already created keep the grid their marker
    /// names). Clients should send chunks that are multiples of it.
    ///
    /// # Errors
    /// `RELAY_BAD_PART_SIZE` when `part_size` is outside
    /// [`MIN_PART_SIZE`]`..=`[`MAX_PART_SIZE`] (what S3 accepts).
    pub fn with_part_size(mut self, part_size: u64) -> Result<Self> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(Error::invalid(
                "RELAY_BAD_PART_SIZE",
                format!("part size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes"),
            ));
        }
        self.part_size = part_size;
        Ok(self)
    }

    fn session_path(&self, s: SessionId) -> Path {
        self.prefix.clone().join(s.to_string())
    }

    fn file_path(&self, key: FileKey) -> Path {
        self.session_path(key.session).join(key.file.to_string())
    }

    fn marker_path(&self, key: FileKey) -> Path {
        self.file_path(key).join("upload")
    }

    fn data_path(&self, key: FileKey) -> Path {
        self.file_path(key).join("data")
    }

    fn staged_dir(&self, key: FileKey) -> Path {
        self.file_path(key).join("staged")
    }

    fn staged_path(&self, key: FileKey, start: u64, end: u64) -> Path {
        self.staged_dir(key)
            .join(format!("{start:020}-{:020}", end - start))
    }

    fn forget(&self, pred: impl Fn(&FileKey) -> bool) {
        if let Ok(mut map) = self.uploads.lock() {
            map.retain(|k, _| !pred(k));
        }
    }

    /// The marker of `key`, `None` if there is none.
    async fn load_marker_at(&self, path: &Path) -> Result<Option<UploadInfo>> {
        let got = match self.store.get(path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(map_err("read upload marker", e)),
        };
        if got.meta.size > MAX_MARKER_BYTES {
            return Err(corrupt("read upload marker", "upload marker too large"));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| map_err("read upload marker", e))?;
        let info: UploadInfo = serde_json::from_slice(&bytes)
            .map_err(|e| Error::storage(StorageErrorKind::Corrupt, "parse upload marker", e))?;
        if info.v != 1 || !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&info.part_size) {
            return Err(corrupt("parse upload marker", "unknown upload marker"));
        }
        Ok(Some(info))
    }

    /// The upload of `key`, from the cache or the marker.
    async fn upload(&self, key: FileKey) -> Result<Arc<UploadInfo>> {
        if let Some(info) = self.uploads.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(info);
        }
        let info = Arc::new(
            self.load_marker_at(&self.marker_path(key))
                .await?
                .ok_or(Error::NotFound { what: "file" })?,
        );
        if let Ok(mut map) = self.uploads.lock() {
            if map.len() >= MAX_CACHED_UPLOADS {
                map.clear();
            }
            map.insert(key, info.clone());
        }
        Ok(info)
    }

    async fn abort(&self, key: FileKey, info: &UploadInfo) -> Result<()> {
        match self
            .store
            .abort_multipart(&self.data_path(key), &info.upload_id)
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err("abort multipart upload", e)),
        }
    }

    async fn delete_paths(&self, paths: Vec<Path>) -> Result<()> {
        let stream = futures::stream::iter(paths.into_iter().map(Ok)).boxed();
        let mut deleted = self.store.delete_stream(stream);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err("delete objects", e)),
            }
        }
        Ok(())
    }

    async fn delete_prefix(&self, prefix: &Path) -> Result<()> {
        let paths: Vec<Path> = self
            .store
            .list(Some(prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| map_err("list objects", e))?;
        self.delete_paths(paths).await
    }

    /// Upload every whole cell of the chunk as its part and stage the
    /// rest, as the body streams in; the parts uploaded.
    async fn put_pieces(
        &self,
        key: FileKey,
        info: &UploadInfo,
        placement: ChunkPlacement,
        mut body: ByteStream,
        tasks: &mut JoinSet<object_store::Result<Uploaded>>,
        staged: &mut Vec<Path>,
    ) -> Result<Vec<(u64, String)>> {
        let end = placement
            .offset
            .checked_add(placement.length)
            .filter(|e| *e <= info.size)
            .ok_or_else(|| {
                Error::invalid(
                    "RELAY_BAD_RANGE",
                    format!("chunk range exceeds the declared file size {}", info.size),
                )
            })?;
        let pieces = pieces_of(placement.offset, end, info.size, info.part_size);
        let mut parts = Vec::new();
        let mut next = 0usize;
        let mut buf: Vec<Bytes> = Vec::new();
        let mut buffered = 0u64;
        let mut seen = 0u64;
        let data = self.data_path(key);
        let upload_id: MultipartId = info.upload_id.clone();
        while let Some(item) = body.next().await {
            let mut b = item?;
            seen += b.len() as u64;
            if seen > placement.length {
                return Err(length_error(placement.offset, placement.length, seen));
            }
            while !b.is_empty() {
                let Some(piece) = pieces.get(next) else {
                    // Unreachable: `seen` is checked against the length above.
                    return Err(length_error(placement.offset, placement.length, seen));
                };
                let want = piece.end - piece.start - buffered;
                let take = (b.len() as u64).min(want);
                // `take` is at most `b.len()`, a usize.
                buf.push(b.split_to(take as usize));
                buffered += take;
                if buffered < piece.end - piece.start {
                    continue;
                }
                let payload = PutPayload::from_iter(std::mem::take(&mut buf));
                buffered = 0;
                next += 1;
                while tasks.len() >= MAX_IN_FLIGHT {
                    match tasks.join_next().await {
                        Some(done) => joined(done, &mut parts)?,
                        None => break,
                    }
                }
                let store = self.store.clone();
                match piece.cell {
                    Some(cell) => {
                        let (data, id) = (data.clone(), upload_id.clone());
                        // The grid has at most 10,000 cells: fits a usize.
                        let idx = cell as usize;
                        tasks.spawn(async move {
                            let part = store.put_part(&data, &id, idx, payload).await?;
                            Ok(Uploaded::Part(cell, part))
                        });
                    }
                    None => {
                        let path = self.staged_path(key, piece.start, piece.end);
                        staged.push(path.clone());
                        tasks.spawn(async move {
                            store.put(&path, payload).await?;
                            Ok(Uploaded::Staged)
                        });
                    }
                }
            }
        }
        if seen != placement.length {
            return Err(length_error(placement.offset, placement.length, seen));
        }
        while let Some(done) = tasks.join_next().await {
            joined(done, &mut parts)?;
        }
        parts.sort_by_key(|(cell, _)| *cell);
        Ok(parts)
    }

    /// Assemble cell `cell` from the staged pieces of the chunks covering
    /// it and upload it as its part.
    async fn assemble(
        &self,
        key: FileKey,
        info: &UploadInfo,
        cell: u64,
        chunks: &[ChunkRecord],
    ) -> Result<PartId> {
        let start = cell * info.part_size;
        let end = (start + info.part_size).min(info.size);
        let mut bytes = Vec::new();
        for c in chunks.iter().filter(|c| c.offset < end && c.end() > start) {
            let (s, e) = (c.offset.max(start), c.end().min(end));
            let path = self.staged_path(key, s, e);
            let got = self.store.get(&path).await.map_err(|err| match err {
                object_store::Error::NotFound { .. } => {
                    corrupt("seal file", format!("staged bytes [{s}, {e}) are missing"))
                }
                other => map_err("read staged bytes", other),
            })?;
            if got.meta.size != e - s {
                return Err(corrupt(
                    "seal file",
                    format!("staged bytes [{s}, {e}) have the wrong length"),
                ));
            }
            let piece = got
                .bytes()
                .await
                .map_err(|err| map_err("read staged bytes", err))?;
            bytes.push(piece);
        }
        // The grid has at most 10,000 cells: fits a usize.
        let idx = cell as usize;
        self.store
            .put_part(
                &self.data_path(key),
                &info.upload_id,
                idx,
                PutPayload::from_iter(bytes),
            )
            .await
            .map_err(|e| map_err("upload part", e))
    }

    /// Abort every upload whose marker is older than `older_than` and
    /// delete its staged objects and marker (a sealed file's data stays):
    /// the cleanup of files neither sealed nor deleted. Run it
    /// periodically, on any or every instance at once, with `older_than`
    /// longer than any upload may last (the session TTL): an upload still
    /// in progress would lose its bytes. Returns how many were removed.
    ///
    /// # Errors
    /// A failed listing, abort or delete (what was removed stays removed).
    pub async fn abort_abandoned(&self, older_than: Duration) -> Result<usize> {
        let cutoff = std::time::SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(std::time::UNIX_EPOCH);
        let markers: Vec<Path> = self
            .store
            .list(Some(&self.prefix))
            .try_filter_map(|m| {
                let old = std::time::SystemTime::from(m.last_modified) < cutoff;
                let is_marker = m.location.filename() == Some("upload");
                futures::future::ready(Ok((old && is_marker).then_some(m.location)))
            })
            .try_collect()
            .await
            .map_err(|e| map_err("list objects", e))?;
        let mut removed = 0;
        for marker in markers {
            let Some(info) = self.load_marker_at(&marker).await? else {
                continue;
            };
            let file = file_of_marker(&marker);
            match self
                .store
                .abort_multipart(&file.clone().join("data"), &info.upload_id)
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err("abort multipart upload", e)),
            }
            self.delete_prefix(&file.clone().join("staged")).await?;
            self.delete_paths(vec![marker]).await?;
            removed += 1;
        }
        // Cached markers may name aborted uploads now.
        self.forget(|_| true);
        Ok(removed)
    }
}

#[async_trait]
impl<S: ObjectStore + MultipartStore> ChunkStore for MultipartChunkStore<S> {
    async fn create_file(&self, key: FileKey, size: u64) -> Result<()> {
        let marker = self.marker_path(key);
        let existing = match self.load_marker_at(&marker).await? {
            Some(info) => info,
            // Sealed already (the marker goes at seal): nothing to prepare.
            None if matches!(
                self.store.head(&self.data_path(key)).await,
                Ok(m) if m.size == size
            ) =>
            {
                return Ok(());
            }
            None => {
                let upload_id = self
                    .store
                    .create_multipart(&self.data_path(key))
                    .await
                    .map_err(|e| map_err("create multipart upload", e))?;
                let info = UploadInfo {
                    v: 1,
                    upload_id,
                    size,
                    part_size: grid_for(size, self.part_size),
                };
                let body = serde_json::to_vec(&info)
                    .map_err(|e| Error::storage(StorageErrorKind::Io, "write upload marker", e))?;
                // One create-only PUT: atomic, and of two instances racing
                // to create the file exactly one marker wins.
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                };
                match self.store.put_opts(&marker, body.into(), opts).await {
                    Ok(_) => info,
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        // Another instance won: drop ours, continue theirs.
                        self.abort(key, &info).await?;
                        self.load_marker_at(&marker).await?.ok_or_else(|| {
                            corrupt("create file", "the winning upload marker vanished")
                        })?
                    }
                    Err(e) => {
                        let _ = self.abort(key, &info).await;
                        return Err(map_err("write upload marker", e));
                    }
                }
            }
        };
        if existing.size != size {
            return Err(Error::conflict(
                "RELAY_FILE_SIZE_MISMATCH",
                format!(
                    "the file was created with {} bytes, not {size}",
                    existing.size
                ),
            ));
        }
        Ok(())
    }

    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        body: ByteStream,
    ) -> Result<String> {
        let info = self.upload(key).await?;
        let mut tasks = JoinSet::new();
        let mut staged = Vec::new();
        let res = self
            .put_pieces(key, &info, placement, body, &mut tasks, &mut staged)
            .await;
        match res {
            Ok(parts) => {
                let receipt = Receipt {
                    v: 1,
                    ps: info.part_size,
                    parts,
                };
                serde_json::to_string(&receipt)
                    .map_err(|e| Error::storage(StorageErrorKind::Io, "write receipt", e))
            }
            Err(e) => {
                // Nothing of a failed chunk stays: let uploads in flight
                // end (an aborted PUT could still land after the delete),
                // then remove what was staged; parts are simply never
                // listed. The chunk's own error is the one that matters.
                while tasks.join_next().await.is_some() {}
                let _ = self.delete_paths(staged).await;
                Err(e)
            }
        }
    }

    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
        relaypacs_core::chunk_store::check_tiling(size, chunks)?;
        let data = self.data_path(key);
        let sealed = |meta: object_store::Result<object_store::ObjectMeta>| match meta {
            Ok(m) => Ok(m.size == size),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err("head object", e)),
        };
        if sealed(self.store.head(&data).await)? {
            // Sealed before; finish a cleanup a crash may have cut short.
            self.delete_prefix(&self.staged_dir(key)).await?;
            self.delete_paths(vec![self.marker_path(key)]).await?;
            self.forget(|k| *k == key);
            return Ok(());
        }
        let info = self.upload(key).await?;
        if info.size != size {
            return Err(corrupt(
                "seal file",
                format!("the upload is for {} bytes, not {size}", info.size),
            ));
        }
        // Which part each cell is: from a receipt, or to assemble.
        let cells = size.div_ceil(info.part_size);
        let mut from_receipts: HashMap<u64, String> = HashMap::new();
        for c in chunks {
            let whole: Vec<u64> = pieces_of(c.offset, c.end(), size, info.part_size)
                .iter()
                .filter_map(|p| p.cell)
                .collect();
            if whole.is_empty() {
                continue;
            }
            let receipt: Receipt = serde_json::from_str(&c.receipt)
                .map_err(|e| Error::storage(StorageErrorKind::Corrupt, "parse chunk receipt", e))?;
            if receipt.v != 1 || receipt.ps != info.part_size {
                return Err(corrupt(
                    "seal file",
                    format!(
                        "the receipt of the chunk at {} is for another grid",
                        c.offset
                    ),
                ));
            }
            let mut listed: HashMap<u64, String> = receipt.parts.into_iter().collect();
            for cell in whole {
                let id = listed.remove(&cell).ok_or_else(|| {
                    corrupt(
                        "seal file",
                        format!(
                            "the receipt of the chunk at {} lacks part {}",
                            c.offset,
                            cell + 1
                        ),
                    )
                })?;
                from_receipts.insert(cell, id);
            }
        }
        let this = &*self;
        let info_ref = &*info;
        let parts: Vec<PartId> = futures::stream::iter(0..cells)
            .map(|cell| {
                let known = from_receipts.get(&cell).cloned();
                async move {
                    match known {
                        Some(content_id) => Ok(PartId { content_id }),
                        None => this.assemble(key, info_ref, cell, chunks).await,
                    }
                }
            })
            .buffered(MAX_IN_FLIGHT)
            .try_collect()
            .await?;
        if let Err(e) = self
            .store
            .complete_multipart(&data, &info.upload_id, parts)
            .await
        {
            // Another instance may have completed it first.
            if !sealed(self.store.head(&data).await)? {
                return Err(map_err("complete multipart upload", e));
            }
        }
        // Only now are the staged pieces and the marker redundant; a crash
        // here leaves them to the next seal, delete or abort_abandoned.
        self.delete_prefix(&self.staged_dir(key)).await?;
        self.delete_paths(vec![self.marker_path(key)]).await?;
        self.forget(|k| *k == key);
        Ok(())
    }

    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
        crate::object_store_chunks::read_range(self.store.as_ref(), &self.data_path(key), range)
            .await
    }

    async fn delete_file(&self, key: FileKey) -> Result<()> {
        if let Some(info) = self.load_marker_at(&self.marker_path(key)).await? {
            self.abort(key, &info).await?;
        }
        self.forget(|k| *k == key);
        self.delete_prefix(&self.file_path(key)).await
    }

    async fn delete_session(&self, session: SessionId) -> Result<()> {
        let all: Vec<Path> = self
            .store
            .list(Some(&self.session_path(session)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| map_err("list objects", e))?;
        for marker in all.iter().filter(|p| p.filename() == Some("upload")) {
            if let Some(info) = self.load_marker_at(marker).await? {
                let file = file_of_marker(marker);
                match self
                    .store
                    .abort_multipart(&file.join("data"), &info.upload_id)
                    .await
                {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(map_err("abort multipart upload", e)),
                }
            }
        }
        self.forget(|k| k.session == session);
        self.delete_paths(all).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn aligned_chunks_are_whole_parts() {
        let p = pieces_of(8 * MIB, 24 * MIB, 30 * MIB, 8 * MIB);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: 8 * MIB,
                    end: 16 * MIB,
                    cell: Some(1)
                },
                Piece {
                    start: 16 * MIB,
                    end: 24 * MIB,
                    cell: Some(2)
                },
            ]
        );
        // The chunk that ends the file covers the short last cell whole.
        let tail = pieces_of(24 * MIB, 30 * MIB, 30 * MIB, 8 * MIB);
        assert_eq!(
            tail,
            vec![Piece {
                start: 24 * MIB,
                end: 30 * MIB,
                cell: Some(3)
            }]
        );
    }

    #[test]
    fn off_grid_chunks_are_staged_at_their_ends() {
        let p = pieces_of(3 * MIB, 21 * MIB, 40 * MIB, 8 * MIB);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: 3 * MIB,
                    end: 8 * MIB,
                    cell: None
                },
                Piece {
                    start: 8 * MIB,
                    end: 16 * MIB,
                    cell: Some(1)
                },
                Piece {
                    start: 16 * MIB,
                    end: 21 * MIB,
                    cell: None
                },
            ]
        );
        // A small chunk across a cell boundary is two staged pieces.
        let small = pieces_of(7 * MIB, 9 * MIB, 40 * MIB, 8 * MIB);
        assert_eq!(small.len(), 2);
        assert!(small.iter().all(|p| p.cell.is_none()));
    }

    #[test]
    fn the_grid_keeps_parts_within_the_limit() {
        assert_eq!(grid_for(2 << 30, DEFAULT_PART_SIZE), DEFAULT_PART_SIZE);
        let huge = 200u64 << 30;
        let g = grid_for(huge, DEFAULT_PART_SIZE);
        assert!(huge.div_ceil(g) <= MAX_PARTS, "{g}");
        assert_eq!(g % MIB, 0);
    }
}

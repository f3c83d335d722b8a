//! [`ObjectStoreChunkStore`]: chunks in any `object_store` backend.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use relaypacs_core::{
    ByteStream, ChunkPlacement, ChunkRecord, ChunkStore, Error, FileKey, IntegrityError, Result,
    SessionId, StorageErrorKind,
};

/// Bodies up to this size are sent with one PUT; larger ones as a multipart
/// upload in parts of this size (S3 needs at least 5 MiB per part).
const PART: usize = 8 << 20;
/// Parts in flight at once per upload: memory per upload is about
/// `PART * (MAX_PARTS_IN_FLIGHT + 1)`.
const MAX_PARTS_IN_FLIGHT: usize = 2;

/// A [`ChunkStore`] over any [`ObjectStore`] (S3 and compatibles, GCS,
/// Azure, local files, memory).
///
/// Layout under the prefix: `<session>/<file>/chunks/<offset:020>` holds
/// each acknowledged chunk as its own object; sealing streams them in order
/// into `<session>/<file>/data` (a multipart upload, bounded buffering) and
/// only then deletes the chunk objects, so a crash mid-seal is repaired by
/// sealing again. Each chunk object is written with one atomic PUT or a
/// multipart upload that is completed only after every byte arrived and
/// verified, and aborted otherwise: an unverified chunk never becomes
/// visible. Works on backends without the `MultipartStore` API.
///
/// Sealing copies every byte of the file (read back, written again): on
/// S3 and other stores with the multipart API, prefer
/// [`MultipartChunkStore`](crate::MultipartChunkStore), whose seal is one
/// `CompleteMultipartUpload` and copies nothing.
#[derive(Clone)]
pub struct ObjectStoreChunkStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl fmt::Debug for ObjectStoreChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreChunkStore")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl fmt::Display for ObjectStoreChunkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "object_store({})/{}", self.store, self.prefix)
    }
}

/// An `object_store` error as ours: a missing object is a missing file,
/// a generic or join failure is the store being unavailable. Shared with
/// [`MultipartChunkStore`](crate::MultipartChunkStore).
pub(crate) fn map_err(op: &'static str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound { what: "file" },
        other => {
            let kind = match &other {
                object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
                    StorageErrorKind::Unavailable
                }
                _ => StorageErrorKind::Io,
            };
            Error::storage(kind, op, other)
        }
    }
}

/// Bytes `range` of the object at `path`: an empty range still checks the
/// object exists; a range past its end is the store's error. Shared with
/// [`MultipartChunkStore`](crate::MultipartChunkStore).
pub(crate) async fn read_range(
    store: &dyn ObjectStore,
    path: &Path,
    range: Range<u64>,
) -> Result<ByteStream> {
    if range.start > range.end {
        return Err(Error::invalid(
            "RELAY_BAD_RANGE",
            "range start after its end",
        ));
    }
    if range.start == range.end {
        store
            .head(path)
            .await
            .map_err(|e| map_err("head object", e))?;
        return Ok(Box::pin(futures::stream::empty()));
    }
    let opts = GetOptions {
        range: Some(GetRange::Bounded(range.clone())),
        ..GetOptions::default()
    };
    let got = store
        .get_opts(path, opts)
        .await
        .map_err(|e| map_err("get object", e))?;
    // A range reaching past the end is served short (clamped to the
    // object): refused instead, as the local store does, so a caller
    // never takes fewer bytes for the range it asked for.
    if got.range != range {
        return Err(Error::invalid(
            "RELAY_BAD_RANGE",
            format!("range {range:?} outside file of {} bytes", got.meta.size),
        ));
    }
    Ok(got
        .into_stream()
        .map_err(|e| map_err("read object", e))
        .boxed())
}

impl ObjectStoreChunkStore {
    /// Chunks under `prefix` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: impl Into<Path>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
        }
    }

    fn session_path(&self, s: SessionId) -> Path {
        self.prefix.clone().join(s.to_string())
    }

    fn file_path(&self, key: FileKey) -> Path {
        self.session_path(key.session).join(key.file.to_string())
    }

    fn chunk_path(&self, key: FileKey, offset: u64) -> Path {
        self.file_path(key)
            .join("chunks")
            .join(format!("{offset:020}"))
    }

    fn data_path(&self, key: FileKey) -> Path {
        self.file_path(key).join("data")
    }

    async fn delete_prefix(&self, prefix: Path) -> Result<()> {
        let paths = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .boxed();
        let mut deleted = self.store.delete_stream(paths);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(map_err("delete objects", e)),
            }
        }
        Ok(())
    }

    async fn exists_with_size(&self, path: &Path, size: u64) -> Result<bool> {
        match self.store.head(path).await {
            Ok(m) => Ok(m.size == size),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err("head object", e)),
        }
    }

    async fn write_object(&self, path: &Path, length: u64, mut body: ByteStream) -> Result<String> {
        // Gather up to one part; small bodies go out in a single PUT.
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0usize;
        let mut seen = 0u64;
        let mut upload: Option<WriteMultipart> = None;
        let result: Result<()> = async {
            while let Some(item) = body.next().await {
                let b = item?;
                seen += b.len() as u64;
                if seen > length {
                    return Err(IntegrityError::ChunkLength {
                        offset: 0,
                        expected: length,
                        actual: seen,
                    }
                    .into());
                }
                pending_len += b.len();
                pending.push(b);
                if pending_len >= PART {
                    let up = match upload.as_mut() {
                        Some(u) => u,
                        None => {
                            let u = self
                                .store
                                .put_multipart(path)
                                .await
                                .map_err(|e| map_err("start multipart upload", e))?;
                            upload.insert(WriteMultipart::new_with_chunk_size(u, PART))
                        }
                    };
                    for b in pending.drain(..) {
                        up.put(b);
                    }
                    pending_len = 0;
                    up.wait_for_capacity(MAX_PARTS_IN_FLIGHT)
                        .await
                        .map_err(|e| map_err("upload part", e))?;
                }
            }
            if seen != length {
                return Err(IntegrityError::ChunkLength {
                    offset: 0,
                    expected: length,
                    actual: seen,
                }
                .into());
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            if let Some(u) = upload {
                // Abort so no part is ever assembled; the error that matters is `e`.
                let _ = u.abort().await;
            }
            return Err(e);
        }
        let put = match upload {
            Some(mut u) => {
                for b in pending {
                    u.put(b);
                }
                u.finish()
                    .await
                    .map_err(|e| map_err("complete multipart upload", e))?
            }
            None => self
                .store
                .put(path, PutPayload::from_iter(pending))
                .await
                .map_err(|e| map_err("put object", e))?,
        };
        Ok(put.e_tag.unwrap_or_default())
    }
}

#[async_trait]
impl ChunkStore for ObjectStoreChunkStore {
    async fn create_file(&self, _key: FileKey, _size: u64) -> Result<()> {
        // Objects need no preparation: chunks are whole objects.
        Ok(())
    }

    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        body: ByteStream,
    ) -> Result<String> {
        let path = self.chunk_path(key, placement.offset);
        self.write_object(&path, placement.length, body)
            .await
            .map_err(|e| match e {
                Error::Integrity(IntegrityError::ChunkLength {
                    expected, actual, ..
                }) => IntegrityError::ChunkLength {
                    offset: placement.offset,
                    expected,
                    actual,
                }
                .into(),
                e => e,
            })
    }

    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
        relaypacs_core::chunk_store::check_tiling(size, chunks)?;
        let data = self.data_path(key);
        let mut chunks_present = true;
        for c in chunks {
            if !self
                .exists_with_size(&self.chunk_path(key, c.offset), c.length)
                .await?
            {
                chunks_present = false;
                break;
            }
        }
        if !chunks_present {
            // Sealed before (chunks already removed), or something is missing.
            if self.exists_with_size(&data, size).await? {
                return Ok(());
            }
            return Err(Error::storage(
                StorageErrorKind::Corrupt,
                "seal file",
                "a recorded chunk object is missing",
            ));
        }
        // Stream every chunk, in order, into the data object.
        let store = self.store.clone();
        let paths: Vec<Path> = chunks
            .iter()
            .map(|c| self.chunk_path(key, c.offset))
            .collect();
        let body = futures::stream::iter(paths)
            .then(move |p| {
                let store = store.clone();
                async move { store.get(&p).await.map(|g| g.into_stream()) }
            })
            .try_flatten()
            .map_err(|e| map_err("read chunk object", e))
            .boxed();
        self.write_object(&data, size, body).await?;
        // Only now are the chunk objects redundant.
        self.delete_prefix(self.file_path(key).join("chunks")).await
    }

    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
        read_range(self.store.as_ref(), &self.data_path(key), range).await
    }

    async fn delete_file(&self, key: FileKey) -> Result<()> {
        self.delete_prefix(self.file_path(key)).await
    }

    async fn delete_session(&self, session: SessionId) -> Result<()> {
        self.delete_prefix(self.session_path(session)).await
    }
}

//! The [`ChunkStore`] trait: where uploaded bytes live.

use std::fmt::{Debug, Display};
use std::ops::Range;

use async_trait::async_trait;

use crate::digest::ByteStream;
use crate::error::{Error, Result};
use crate::ids::{FileId, SessionId};
use crate::model::ChunkRecord;

/// The rest of a [`ChunkStore::put_file_syncing`]: resolves once the file
/// is durable (its sync runs whether or not this is polled), or with the
/// error that kept it from being durable.
pub type Syncing = futures::future::BoxFuture<'static, Result<()>>;

/// The [`Syncing`] of a file that is durable already: nothing to wait for.
pub fn already_durable() -> Syncing {
    Box::pin(futures::future::ready(Ok(())))
}

/// Addresses one file of one session in a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// The session.
    pub session: SessionId,
    /// The file.
    pub file: FileId,
}

/// Where a chunk goes and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPlacement {
    /// Byte offset in the file.
    pub offset: u64,
    /// Exact number of bytes the body carries.
    pub length: u64,
}

/// Durable storage for uploaded bytes.
///
/// A file is created with its total size, filled by chunks (byte ranges that
/// may arrive in any order), sealed once every byte is present, then read
/// back for verification, validation and forwarding.
///
/// # Contract
/// - [`put_chunk`](Self::put_chunk) consumes `body` to its end. If any item
///   of `body` is `Err`, or the body does not carry exactly
///   `placement.length` bytes, the store returns an error and **no trace of
///   the chunk becomes readable as stored data**. When it returns `Ok`, the
///   bytes are **durable** (fsync'd, or acknowledged by the object store),
///   so they survive a crash of this process and of the machine.
/// - The caller (the pipeline) guarantees that no two `put_chunk` calls for
///   overlapping ranges of one file run at the same time, and that a range
///   already acknowledged is never written again.
/// - [`seal_file`](Self::seal_file) is called once every chunk is recorded,
///   with the chunk records in offset order, tiling `[0, size)`. After `Ok`
///   the whole file is durable and readable with [`read`](Self::read).
///   Sealing twice is a no-op.
/// - [`read`](Self::read) of a range returns exactly those bytes; it may
///   serve ranges of unsealed files that were acknowledged.
/// - Deleting something that does not exist is not an error.
///
/// # Errors
/// Storage failures are [`Error::Storage`] (with `Full` for ENOSPC, `Io`
/// for what a retry may fix); a missing file is [`Error::NotFound`]. A
/// failing `body` makes `put_chunk` fail with that error passed through.
///
/// # Cancellation
/// Dropping a `put_chunk` future before it completes leaves the chunk
/// unacknowledged; whatever was partly written is never counted.
#[async_trait]
pub trait ChunkStore: Debug + Display + Send + Sync + 'static {
    /// Prepare storage for a file of `size` bytes. Idempotent.
    async fn create_file(&self, key: FileKey, size: u64) -> Result<()>;

    /// Store one verified chunk; durable when `Ok` returns. The returned
    /// string is a store-specific receipt kept in the [`ChunkRecord`].
    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        body: ByteStream,
    ) -> Result<String>;

    /// Create a new file of `size` bytes and store `body` as its one chunk
    /// (`0..size`), as [`create_file`](Self::create_file) then
    /// [`put_chunk`](Self::put_chunk) do: when `Ok` returns, the file's
    /// name, size and bytes are durable; the receipt is the chunk's. For a
    /// file stored whole at once (a STOW-RS part), with fewer syncs where
    /// the store can make the three durable together. On error nothing of
    /// it is readable as stored data (a left-over file is removed with
    /// [`delete_file`](Self::delete_file)). The default calls the two.
    async fn put_file(&self, key: FileKey, size: u64, body: ByteStream) -> Result<String> {
        self.create_file(key, size).await?;
        let placement = ChunkPlacement {
            offset: 0,
            length: size,
        };
        self.put_chunk(key, placement, body).await
    }

    /// [`put_file`](Self::put_file) in two steps, for a caller with work to
    /// do while the disk syncs (the pipeline reads a new file back and
    /// validates it meanwhile). When `Ok` returns, the file is written: it
    /// can be sealed and read like a stored file, but it is **durable only
    /// once the returned [`Syncing`] resolves `Ok`**, and nothing may
    /// record it before then. On error, of either step, nothing of it is
    /// readable as stored data once [`delete_file`](Self::delete_file)
    /// removes the left-over. The default is `put_file`, with nothing left
    /// to wait for.
    async fn put_file_syncing(
        &self,
        key: FileKey,
        size: u64,
        body: ByteStream,
    ) -> Result<(String, Syncing)> {
        let receipt = self.put_file(key, size, body).await?;
        Ok((receipt, already_durable()))
    }

    /// Make the complete file durable and readable as one object.
    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()>;

    /// Read a byte range of a file.
    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream>;

    /// Remove a file and all its chunks.
    async fn delete_file(&self, key: FileKey) -> Result<()>;

    /// Remove everything stored for a session.
    async fn delete_session(&self, session: SessionId) -> Result<()>;

    /// The path of the sealed file `key` when the store keeps it as one
    /// plain local file holding exactly its bytes, durable, that it never
    /// writes to again (only removes): a local PACS sink may then
    /// hard-link it rather than copy it. `None` (the default) for any
    /// other layout; a caller still reads the bytes with
    /// [`read`](Self::read) to verify them.
    fn local_file(&self, key: FileKey) -> Option<std::path::PathBuf> {
        let _ = key;
        None
    }
}

/// Check that `chunks` (in offset order) tile `[0, size)` exactly, as
/// [`ChunkStore::seal_file`] requires; stores call it before sealing.
pub fn check_tiling(size: u64, chunks: &[ChunkRecord]) -> Result<()> {
    let mut pos = 0;
    for c in chunks {
        if c.offset != pos {
            return Err(Error::invalid(
                "RELAY_FILE_INCOMPLETE",
                format!("no chunk at offset {pos}"),
            ));
        }
        pos = c.end();
    }
    if pos != size {
        return Err(Error::invalid(
            "RELAY_FILE_INCOMPLETE",
            format!("chunks end at {pos}, file has {size} bytes"),
        ));
    }
    Ok(())
}

// `Arc<S>` and `Box<S>` of an implementation (`dyn ChunkStore` included)
// implement `ChunkStore` too, forwarding every call: a shared or boxed
// adapter goes into code generic over `ChunkStore` (a decorator, a builder).
macro_rules! forward_chunk_store {
    ($($ptr:ident)::+) => {
        #[async_trait]
        impl<S: ChunkStore + ?Sized> ChunkStore for $($ptr)::+<S> {
            async fn create_file(&self, key: FileKey, size: u64) -> Result<()> {
                (**self).create_file(key, size).await
            }

            async fn put_chunk(
                &self,
                key: FileKey,
                placement: ChunkPlacement,
                body: ByteStream,
            ) -> Result<String> {
                (**self).put_chunk(key, placement, body).await
            }

            async fn put_file(&self, key: FileKey, size: u64, body: ByteStream) -> Result<String> {
                (**self).put_file(key, size, body).await
            }

            async fn put_file_syncing(
                &self,
                key: FileKey,
                size: u64,
                body: ByteStream,
            ) -> Result<(String, Syncing)> {
                (**self).put_file_syncing(key, size, body).await
            }

            async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
                (**self).seal_file(key, size, chunks).await
            }

            async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
                (**self).read(key, range).await
            }

            async fn delete_file(&self, key: FileKey) -> Result<()> {
                (**self).delete_file(key).await
            }

            async fn delete_session(&self, session: SessionId) -> Result<()> {
                (**self).delete_session(session).await
            }

            fn local_file(&self, key: FileKey) -> Option<std::path::PathBuf> {
                (**self).local_file(key)
            }
        }
    };
}
forward_chunk_store!(std::sync::Arc);
forward_chunk_store!(Box);

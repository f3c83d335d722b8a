//! The [`SessionStore`] trait: durable session state with compare-and-set.

use std::fmt::{Debug, Display};

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::{FileId, SessionId};
use crate::model::{ChunkRecord, SessionRecord, Versioned};

/// What [`SessionStore::record_chunk`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkInsert {
    /// The chunk was recorded now.
    Inserted,
    /// A chunk at the same offset was already recorded; here it is.
    Existing(ChunkRecord),
}

/// Durable storage for upload sessions and their chunk records.
///
/// # Contract
/// - Every mutating call is **durable when it returns `Ok`**: the change
///   survives a crash of the process and of the machine.
/// - [`update_session`](Self::update_session) is an atomic compare-and-set:
///   it succeeds only if the stored version equals `expected`, and returns
///   the new version; otherwise [`Error::Precondition`](crate::Error::Precondition).
/// - [`record_chunk`](Self::record_chunk) is an atomic insert-if-absent keyed
///   by `(session, file, chunk.offset)`: of two concurrent inserts at one
///   offset exactly one gets `Inserted`, the other gets `Existing`.
/// - [`chunks`](Self::chunks) returns records in ascending offset order.
/// - Operations on a session that does not exist return
///   [`Error::NotFound`](crate::Error::NotFound).
///
/// # Errors
/// Backend failures are [`Error::Storage`](crate::Error::Storage).
///
/// # Cancellation
/// A dropped future leaves either the old or the new state, never a mix.
#[async_trait]
pub trait SessionStore: Debug + Display + Send + Sync + 'static {
    /// Store a new session at version 1; `AlreadyExists` if the id is taken.
    async fn create_session(&self, session: &SessionRecord) -> Result<Versioned<SessionRecord>>;

    /// Load a session and its current version.
    async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>>;

    /// Replace a session if its stored version is `expected`; returns the new version.
    async fn update_session(&self, session: &SessionRecord, expected: u64) -> Result<u64>;

    /// Delete a session and its chunk records if its stored version is `expected`.
    async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()>;

    /// All session ids (for expiry sweeps).
    async fn list_sessions(&self) -> Result<Vec<SessionId>>;

    /// Record an acknowledged chunk (insert-if-absent by offset).
    async fn record_chunk(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
    ) -> Result<ChunkInsert>;

    /// The recorded chunks of a file, by ascending offset.
    async fn chunks(&self, id: SessionId, file: FileId) -> Result<Vec<ChunkRecord>>;

    /// Forget the chunk records of one file (when a file is removed).
    async fn delete_chunks(&self, id: SessionId, file: FileId) -> Result<()>;
}

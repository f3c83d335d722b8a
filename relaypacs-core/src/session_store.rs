//! The [`SessionStore`] trait: durable session state with compare-and-set.

use std::fmt::{Debug, Display};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::digest::Sha256Digest;
use crate::error::Result;
use crate::ids::{FileId, SessionId, Uid};
use crate::model::{ChunkRecord, SessionRecord, Versioned};

/// One entry of the gateway's index of accepted instances: which file of
/// which session first brought a SOP Instance UID, with the digest of its
/// data set (see [`SessionStore::claim_instance`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstanceClaim {
    /// (0008,0018) SOP Instance UID, the key.
    pub sop_instance_uid: Uid,
    /// SHA-256 of the data set after the file meta group.
    pub data_set_sha256: Sha256Digest,
    /// (0020,000D) Study Instance UID of the file.
    pub study_instance_uid: Uid,
    /// The session that holds the claim.
    pub session: SessionId,
    /// The file in that session.
    pub file: FileId,
    /// When it was accepted.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl InstanceClaim {
    /// A claim made now.
    pub fn new(
        sop_instance_uid: Uid,
        data_set_sha256: Sha256Digest,
        study_instance_uid: Uid,
        session: SessionId,
        file: FileId,
    ) -> Self {
        Self {
            sop_instance_uid,
            data_set_sha256,
            study_instance_uid,
            session,
            file,
            at: OffsetDateTime::now_utc(),
        }
    }

    /// Whether `self` is the claim of `session`'s `file`.
    pub fn held_by(&self, session: SessionId, file: FileId) -> bool {
        self.session == session && self.file == file
    }
}

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
/// - [`claim_instance`](Self::claim_instance) is an atomic insert-if-absent
///   keyed by SOP Instance UID, across every session (and every process
///   sharing the store): of concurrent claims of one UID exactly one is
///   recorded and every caller gets that one back.
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

    /// Record `claim` in the index of accepted instances unless its SOP
    /// Instance UID is already claimed. Returns the claim in force: equal
    /// to `claim` when it was recorded now (or earlier by the same file),
    /// otherwise the earlier one, whatever its digest; the caller decides
    /// what a different digest means.
    async fn claim_instance(&self, claim: &InstanceClaim) -> Result<InstanceClaim>;

    /// The claim on a SOP Instance UID, if any.
    async fn instance_claim(&self, sop_instance_uid: &Uid) -> Result<Option<InstanceClaim>>;

    /// Drop the claim on `sop_instance_uid` if `session`'s `file` holds it
    /// (the file was removed or refused, the session aborted or expired);
    /// otherwise do nothing.
    async fn release_instance(
        &self,
        sop_instance_uid: &Uid,
        session: SessionId,
        file: FileId,
    ) -> Result<()>;
}

// `Arc<S>` and `Box<S>` of an implementation (`dyn SessionStore` included)
// implement `SessionStore` too, forwarding every call: a shared or boxed
// adapter goes into code generic over `SessionStore` (a decorator, a builder).
macro_rules! forward_session_store {
    ($($ptr:ident)::+) => {
        #[async_trait]
        impl<S: SessionStore + ?Sized> SessionStore for $($ptr)::+<S> {
            async fn create_session(&self, session: &SessionRecord) -> Result<Versioned<SessionRecord>> {
                (**self).create_session(session).await
            }

            async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>> {
                (**self).load_session(id).await
            }

            async fn update_session(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
                (**self).update_session(session, expected).await
            }

            async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()> {
                (**self).delete_session(id, expected).await
            }

            async fn list_sessions(&self) -> Result<Vec<SessionId>> {
                (**self).list_sessions().await
            }

            async fn record_chunk(
                &self,
                id: SessionId,
                file: FileId,
                chunk: &ChunkRecord,
            ) -> Result<ChunkInsert> {
                (**self).record_chunk(id, file, chunk).await
            }

            async fn chunks(&self, id: SessionId, file: FileId) -> Result<Vec<ChunkRecord>> {
                (**self).chunks(id, file).await
            }

            async fn delete_chunks(&self, id: SessionId, file: FileId) -> Result<()> {
                (**self).delete_chunks(id, file).await
            }

            async fn claim_instance(&self, claim: &InstanceClaim) -> Result<InstanceClaim> {
                (**self).claim_instance(claim).await
            }

            async fn instance_claim(&self, sop_instance_uid: &Uid) -> Result<Option<InstanceClaim>> {
                (**self).instance_claim(sop_instance_uid).await
            }

            async fn release_instance(
                &self,
                sop_instance_uid: &Uid,
                session: SessionId,
                file: FileId,
            ) -> Result<()> {
                (**self).release_instance(sop_instance_uid, session, file).await
            }
        }
    };
}
forward_session_store!(std::sync::Arc);
forward_session_store!(Box);

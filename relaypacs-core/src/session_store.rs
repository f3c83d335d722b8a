//! The [`SessionStore`] trait: durable session state with compare-and-set.

use std::fmt::{Debug, Display};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::analytics::{AnalyticsFilter, FactCount, GroupDurations, Grouping, UploadFact};
use crate::digest::Sha256Digest;
use crate::error::Result;
use crate::ids::{FileId, SessionId, Uid};
use crate::model::{ChunkRecord, SessionRecord, Versioned};

/// One session head for [`SessionStore::update_heads`]: the record (its
/// files are not written), the version it was read at, and what commits
/// with it.
#[derive(Clone, Copy, Debug)]
pub struct HeadWrite<'a> {
    /// The session's new head.
    pub session: &'a SessionRecord,
    /// The version the write is conditional on.
    pub expected: u64,
    /// Analytics facts written with it.
    pub facts: &'a [UploadFact],
    /// Audit records committed with it (none: no audit trail is touched).
    pub events: &'a [crate::AuditEvent],
}

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

/// What [`SessionStore::update_file_scope_claiming`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimedWrite {
    /// Written, and the claim is the file's: the session's new version.
    Written(u64),
    /// The SOP Instance UID is claimed by another file: nothing was
    /// written; here is the claim in force.
    Held(InstanceClaim),
}

/// One file of a session and the session around it: what an operation on
/// a single file needs, loaded at a cost that does not grow with the
/// session's other files (see [`SessionStore::load_file_scope`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileScope {
    /// The session at its current version; its `files` hold only the
    /// requested file (none when the session has no such file, or none was
    /// asked for).
    pub session: Versioned<SessionRecord>,
    /// How many files the session has.
    pub file_count: u64,
    /// The sum of the declared sizes of the session's files.
    pub declared_bytes: u64,
}

impl FileScope {
    /// The scope of `file` cut from a whole session record.
    pub fn of(whole: Versioned<SessionRecord>, file: Option<FileId>) -> Self {
        let file_count = whole.value.files.len() as u64;
        let declared_bytes = whole.value.declared_bytes();
        let mut session = whole;
        session
            .value
            .files
            .retain(|id, _| file.is_some_and(|f| f == *id));
        Self {
            session,
            file_count,
            declared_bytes,
        }
    }
}

/// Session `id` as `store` holds it, if at version `expected`; else
/// `Precondition` (for the defaults that load, change and write whole).
async fn load_at<S: SessionStore + ?Sized>(
    store: &S,
    id: SessionId,
    expected: u64,
) -> Result<Versioned<SessionRecord>> {
    let stored = store.load_session(id).await?;
    if stored.version != expected {
        return Err(crate::Error::Precondition {
            what: format!("session version {} (expected {expected})", stored.version),
        });
    }
    Ok(stored)
}

/// The refusal of a step that should commit with its audit records by a
/// store without an audit trail: the `…_audited` defaults, and a store
/// built without its trail.
pub fn no_trail(op: &'static str) -> crate::Error {
    crate::Error::storage(
        crate::error::StorageErrorKind::Io,
        op,
        "this session store has no audit trail",
    )
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
/// - [`update_file_scope`](Self::update_file_scope) is the same
///   compare-and-set on the session's version, writing the session and
///   only the files it carries (inserted or replaced); the stored files it
///   does not carry stay as they are. With no file it writes the session
///   head only, at a cost that does not grow with the session's files
///   (how the pipeline records a state, a delivery lease or an outcome).
/// - No write leaves two [`Valid`](crate::FileState::Valid) files of one
///   session with one SOP Instance UID:
///   [`update_file_scope`](Self::update_file_scope) (and
///   [`update_session`](Self::update_session)) refuse it atomically with
///   the compare-and-set, as
///   [`Error::Conflict`](crate::Error::Conflict) `RELAY_DUPLICATE_INSTANCE`,
///   and write nothing (conformance case `one_instance_per_session`). The
///   pipeline relies on it and checks nothing before its write.
/// - Operations on a session that does not exist return
///   [`Error::NotFound`](crate::Error::NotFound).
/// - An outcome and its analytics facts are one write:
///   [`update_session_with_facts`](Self::update_session_with_facts),
///   [`update_file_scope_with_facts`](Self::update_file_scope_with_facts)
///   and [`delete_session_with_facts`](Self::delete_session_with_facts)
///   (atomic in the SQL store; facts first in the defaults). Facts are
///   insert-if-absent by key, so a retried write never counts one twice
///   (conformance case `writes_with_facts`).
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

    /// Store a new session at version 1 unless its owner already holds
    /// `cap` sessions in the [`Open`](crate::SessionState::Open) state:
    /// `Ok(None)` then, and nothing is written. `AlreadyExists` if the id
    /// is taken.
    ///
    /// # Contract
    /// A store shared by several processes must make the count and the
    /// insert one atomic step across all of them (a lock on the owner, or
    /// a conditional insert under the engine's write lock), so that a
    /// burst of concurrent creations by one owner, from any processes,
    /// leaves exactly `cap` open sessions. The conformance case
    /// `concurrent_capped_creations_stop_at_the_cap` checks it.
    ///
    /// The default does not count: it creates the session as
    /// [`create_session`](Self::create_session) does, and the
    /// [`Pipeline`](crate::Pipeline)'s own check under its per-owner lock
    /// stays the only guard, atomic within one process (each process
    /// sharing such a store then enforces the cap on its own).
    async fn create_session_capped(
        &self,
        session: &SessionRecord,
        cap: u32,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        let _ = cap;
        self.create_session(session).await.map(Some)
    }

    /// [`create_session_capped`](Self::create_session_capped), and when
    /// the session is created, `event` appended to the audit trail of
    /// [`audit_trail_key`](Self::audit_trail_key) in the same transaction:
    /// both durable at once, or neither (at the cap, `Ok(None)` and no
    /// event). The pipeline calls this only when this store's
    /// `audit_trail_key` is its audit sink's `trail_key`; the default, for
    /// a store without a trail, refuses.
    async fn create_session_capped_audited(
        &self,
        session: &SessionRecord,
        cap: u32,
        event: &crate::AuditEvent,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        let _ = (session, cap, event);
        Err(no_trail("create a session with its audit record"))
    }

    /// Load a session and its current version.
    async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>>;

    /// Replace a session if its stored version is `expected`; returns the new version.
    async fn update_session(&self, session: &SessionRecord, expected: u64) -> Result<u64>;

    /// Delete a session and its chunk records if its stored version is `expected`.
    async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()>;

    /// All session ids (for expiry sweeps).
    async fn list_sessions(&self) -> Result<Vec<SessionId>>;

    /// Load a session with only `file` among its files, and the session's
    /// file count and declared bytes. A store whose cost per call grows
    /// with the number of files should override this; the default loads
    /// the whole session.
    async fn load_file_scope(&self, id: SessionId, file: Option<FileId>) -> Result<FileScope> {
        Ok(FileScope::of(self.load_session(id).await?, file))
    }

    /// Replace the session (all but its files) and insert or replace the
    /// files `session` carries, if its stored version is `expected`; the
    /// files it does not carry are kept. Returns the new version. The
    /// default loads the whole session, merges, and calls
    /// [`update_session`](Self::update_session).
    async fn update_file_scope(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
        let stored = load_at(self, session.id, expected).await?;
        let mut merged = session.clone();
        merged.files = stored.value.files;
        merged
            .files
            .extend(session.files.iter().map(|(k, f)| (*k, f.clone())));
        // One valid file per SOP Instance UID: checked on the merged record,
        // which the compare-and-set below writes only if nothing changed.
        let mut seen = std::collections::BTreeSet::new();
        for f in merged.files.values() {
            if let crate::model::FileState::Valid { dicom } = &f.state
                && !seen.insert(&dicom.sop_instance_uid)
            {
                return Err(crate::Error::conflict(
                    "RELAY_DUPLICATE_INSTANCE",
                    format!(
                        "SOP Instance UID {} is already in this session",
                        dicom.sop_instance_uid
                    ),
                ));
            }
        }
        self.update_session(&merged, expected).await
    }

    /// [`update_file_scope`](Self::update_file_scope), unless it would
    /// leave the session's owner with more than `cap` files in the
    /// [`Uploading`](crate::FileState::Uploading) state across its
    /// [`Open`](crate::SessionState::Open) sessions: `Ok(None)` then, and
    /// nothing is written. Only files `session` carries in the Uploading
    /// state that are not stored yet count as added; a write adding none
    /// is never refused. This is how a per-user cap of unfinished uploads
    /// holds across gateways.
    ///
    /// # Contract
    /// As [`create_session_capped`](Self::create_session_capped): a store
    /// shared by several processes makes the count and the write one
    /// atomic step across all of them (conformance case
    /// `concurrent_capped_file_additions_stop_at_the_cap`). The default
    /// does not count and writes as `update_file_scope` does (the caller's
    /// own per-process count is then the only guard).
    async fn update_file_scope_capped(
        &self,
        session: &SessionRecord,
        expected: u64,
        cap: u32,
    ) -> Result<Option<u64>> {
        let _ = cap;
        self.update_file_scope(session, expected).await.map(Some)
    }

    /// [`update_file_scope`](Self::update_file_scope) and
    /// [`record_chunk`](Self::record_chunk) of each of `chunks` (a file
    /// `session` carries, and one of its chunks) as one step: how a file
    /// stored and proven whole enters its session with its chunk records
    /// (one transaction, one sync). A chunk already recorded at its offset
    /// with the same length and digest is kept; one recorded with other
    /// content fails the call with [`Error::Conflict`](crate::Error::Conflict)
    /// `RELAY_CHUNK_CONFLICT`, and the session is not written. Returns the
    /// new version, as `update_file_scope` does, with its errors
    /// (`Precondition`, `NotFound`, `RELAY_DUPLICATE_INSTANCE`).
    ///
    /// # Contract
    /// Atomic when overridden (the SQL store: one transaction): on any
    /// error nothing is written. The default records the chunks first, then
    /// writes the session with `update_file_scope`: on an error after the
    /// chunks, they stay recorded for a file the session does not hold
    /// (records of durable bytes, removed with the session or the file,
    /// and accepted again as the same chunk by a retry), never the other
    /// way round, so a file is never written without its chunk records.
    async fn update_file_scope_with_chunks(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
    ) -> Result<u64> {
        for (file, chunk) in chunks {
            match self.record_chunk(session.id, *file, chunk).await? {
                ChunkInsert::Inserted => {}
                ChunkInsert::Existing(c)
                    if c.length == chunk.length && c.sha256 == chunk.sha256 => {}
                ChunkInsert::Existing(_) => {
                    return Err(crate::Error::conflict(
                        "RELAY_CHUNK_CONFLICT",
                        "another chunk was recorded at this offset",
                    ));
                }
            }
        }
        self.update_file_scope(session, expected).await
    }

    /// [`claim_instance`](Self::claim_instance) of `claim` and, when the
    /// claim is then `claim`'s file's, [`update_file_scope_with_chunks`](Self::update_file_scope_with_chunks)
    /// as one step: how a new valid file, its chunk records and its place
    /// in the index of accepted instances are written together (one
    /// transaction, one sync). When another file holds the SOP Instance
    /// UID, nothing is written and that claim is returned
    /// ([`ClaimedWrite::Held`]); the caller decides what it means.
    ///
    /// # Contract
    /// Atomic when overridden (the SQL store: one transaction): on any
    /// error, and on `Held`, nothing is written. The default claims first,
    /// then writes: after an error there the claim stays for a file the
    /// session does not hold, which the pipeline recognises as stale at
    /// the next claim of the UID (as after a crash between its two steps).
    async fn update_file_scope_claiming(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
        claim: &InstanceClaim,
    ) -> Result<ClaimedWrite> {
        let held = self.claim_instance(claim).await?;
        if !held.held_by(claim.session, claim.file) {
            return Ok(ClaimedWrite::Held(held));
        }
        self.update_file_scope_with_chunks(session, expected, chunks)
            .await
            .map(ClaimedWrite::Written)
    }

    /// [`update_session`](Self::update_session) and
    /// [`record_upload_fact`](Self::record_upload_fact) of each of `facts`
    /// as one step: how an outcome and its analytics facts become durable
    /// together (a file refused and removed from its session). Returns the
    /// new version, with `update_session`'s errors.
    ///
    /// # Contract
    /// Atomic when overridden (the SQL store: one transaction): on any
    /// error neither the write nor a fact is stored, and after `Ok` both
    /// are. The default, with facts to record, first checks the stored
    /// version (`Precondition` before anything is written, as the
    /// pipeline's retry loops expect), then records the facts, then
    /// writes: an error of the write after the facts (or a concurrent
    /// writer between the check and the write) leaves the facts of an
    /// outcome that was not written. The caller retries such a write with
    /// the same facts (same keys: insert-if-absent, never counted twice);
    /// a fact is never missing for a written outcome. Conformance case
    /// `writes_with_facts`.
    async fn update_session_with_facts(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
    ) -> Result<u64> {
        facts_first(self, session.id, expected, facts).await?;
        self.update_session(session, expected).await
    }

    /// [`update_file_scope`](Self::update_file_scope) and
    /// [`record_upload_fact`](Self::record_upload_fact) of each of `facts`
    /// as one step: how a delivery's outcome (delivered, dead-lettered)
    /// and its fact become durable together. Returns the new version, with
    /// `update_file_scope`'s errors.
    ///
    /// # Contract
    /// As [`update_session_with_facts`](Self::update_session_with_facts):
    /// atomic when overridden; the default checks the version, records the
    /// facts, then writes.
    async fn update_file_scope_with_facts(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
    ) -> Result<u64> {
        facts_first(self, session.id, expected, facts).await?;
        self.update_file_scope(session, expected).await
    }

    /// [`update_file_scope_with_facts`](Self::update_file_scope_with_facts),
    /// and `events` appended to the audit trail of
    /// [`audit_trail_key`](Self::audit_trail_key) in the same transaction:
    /// all durable at once, or nothing (no event on an error). The pipeline
    /// calls this only when this store's `audit_trail_key` is its audit
    /// sink's `trail_key`; the default, for a store without a trail,
    /// refuses.
    async fn update_file_scope_with_facts_audited(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
        events: &[crate::AuditEvent],
    ) -> Result<u64> {
        let _ = (session, expected, facts, events);
        Err(no_trail("update a session with its audit records"))
    }

    /// Several sessions' heads written at once (files untouched, as
    /// [`update_file_scope`](Self::update_file_scope) of a record without
    /// files), each with its `facts` and, when it has any, its `events`
    /// (as [`update_file_scope_with_facts_audited`](Self::update_file_scope_with_facts_audited)):
    /// how the delivery worker takes the leases of, and records the
    /// outcomes of, a group of due entries in one transaction instead of
    /// one each.
    ///
    /// # Contract
    /// - One answer per write, in order: the new version, or that write's
    ///   own refusal ([`Error::Precondition`](crate::Error::Precondition)
    ///   when its version moved, [`Error::NotFound`](crate::Error::NotFound)).
    ///   A refused write leaves nothing of its own (no head, fact or
    ///   event); the others are written.
    /// - `Err` for the whole call: nothing was written by an overriding
    ///   store (one transaction); the default writes one at a time, so an
    ///   error may follow writes that were made.
    /// - Callers pass writes ordered by session id, so stores that lock
    ///   rows take their locks in one order.
    ///
    /// Conformance case `head_writes`.
    async fn update_heads(&self, writes: &[HeadWrite<'_>]) -> Result<Vec<Result<u64>>> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let written = if w.events.is_empty() {
                self.update_file_scope_with_facts(w.session, w.expected, w.facts)
                    .await
            } else {
                self.update_file_scope_with_facts_audited(w.session, w.expected, w.facts, w.events)
                    .await
            };
            match written {
                Err(e @ (crate::Error::Precondition { .. } | crate::Error::NotFound { .. })) => {
                    out.push(Err(e));
                }
                Err(e) => return Err(e),
                Ok(v) => out.push(Ok(v)),
            }
        }
        Ok(out)
    }

    /// [`delete_session`](Self::delete_session) and
    /// [`record_upload_fact`](Self::record_upload_fact) of each of `facts`
    /// as one step: how a study that ends while open (aborted, expired,
    /// ended by the system) and its fact become durable together (the
    /// facts outlive the session).
    ///
    /// # Contract
    /// As [`update_session_with_facts`](Self::update_session_with_facts):
    /// atomic when overridden; the default checks the version, records the
    /// facts, then deletes.
    async fn delete_session_with_facts(
        &self,
        id: SessionId,
        expected: u64,
        facts: &[UploadFact],
    ) -> Result<()> {
        facts_first(self, id, expected, facts).await?;
        self.delete_session(id, expected).await
    }

    /// Up to `limit` files of session `id` in file id order, after `after`
    /// (from the first when `None`): a page of a study view. The default
    /// loads the whole session.
    async fn list_files(
        &self,
        id: SessionId,
        after: Option<FileId>,
        limit: usize,
    ) -> Result<Vec<crate::model::FileRecord>> {
        let rec = self.load_session(id).await?.value;
        Ok(rec
            .files
            .into_values()
            .filter(|f| after.is_none_or(|a| f.id > a))
            .take(limit)
            .collect())
    }

    /// Whether session `id` has a validated file other than `except` (a
    /// session that is not there has none). The default loads the whole
    /// session.
    async fn has_valid_file_except(&self, id: SessionId, except: FileId) -> Result<bool> {
        let rec = match self.load_session(id).await {
            Ok(v) => v.value,
            Err(crate::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(rec
            .files
            .values()
            .any(|f| f.id != except && matches!(f.state, crate::model::FileState::Valid { .. })))
    }

    /// Remove file `file` of the session (its record and its chunk
    /// records) and replace the session, all but its files, with
    /// `session` (whose `files` are ignored), if its stored version is
    /// `expected`, with the analytics `facts`, in one step: the session's
    /// file count and declared bytes come down by the file's. Returns the
    /// new version; `NotFound` when the session or the file is not there.
    /// A store whose cost per call grows with the number of files should
    /// override this; the default loads the whole session, writes it
    /// without the file ([`update_session_with_facts`](Self::update_session_with_facts))
    /// and then forgets the file's chunk records.
    async fn remove_file_scoped(
        &self,
        session: &SessionRecord,
        expected: u64,
        file: FileId,
        facts: &[UploadFact],
    ) -> Result<u64> {
        let current = load_at(self, session.id, expected).await?;
        let mut rec = session.clone();
        rec.files = current.value.files;
        if rec.files.remove(&file).is_none() {
            return Err(crate::Error::NotFound { what: "file" });
        }
        let version = self
            .update_session_with_facts(&rec, expected, facts)
            .await?;
        self.delete_chunks(rec.id, file).await?;
        Ok(version)
    }

    /// The validated files of session `id` whose SOP Instance UID is
    /// `sop_instance_uid`. The default loads the whole session.
    async fn files_with_instance(
        &self,
        id: SessionId,
        sop_instance_uid: &Uid,
    ) -> Result<Vec<FileId>> {
        let rec = self.load_session(id).await?.value;
        Ok(rec
            .files
            .values()
            .filter(|f| {
                matches!(&f.state, crate::model::FileState::Valid { dicom }
                    if dicom.sop_instance_uid == *sop_instance_uid)
            })
            .map(|f| f.id)
            .collect())
    }

    /// Reserve bytes `range` of a file for `holder` until `until` (a
    /// lease the holder renews by reserving the same range again), unless
    /// an unexpired reservation of another holder overlaps it: then
    /// [`Error::Busy`](crate::Error::Busy). Atomic across every process
    /// sharing the store: this is how two gateways never write one byte
    /// range at once. `NotFound` for a session that does not exist.
    async fn reserve_range(
        &self,
        id: SessionId,
        file: FileId,
        range: std::ops::Range<u64>,
        holder: &str,
        until: OffsetDateTime,
    ) -> Result<()>;

    /// Drop `holder`'s reservation of `range` (none: nothing happens).
    async fn release_range(
        &self,
        id: SessionId,
        file: FileId,
        range: std::ops::Range<u64>,
        holder: &str,
    ) -> Result<()>;

    /// Record an acknowledged chunk (insert-if-absent by offset).
    async fn record_chunk(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
    ) -> Result<ChunkInsert>;

    /// The key of the audit trail this store can append to inside its own
    /// transactions: equal to that trail's
    /// [`AuditSink::trail_key`](crate::AuditSink::trail_key) (both on one
    /// database). `None` (the default): it cannot.
    fn audit_trail_key(&self) -> Option<i64> {
        None
    }

    /// [`record_chunk`](Self::record_chunk), and when the chunk is
    /// inserted, `event` appended to the audit trail of
    /// [`audit_trail_key`](Self::audit_trail_key) in the same transaction:
    /// both durable at once, or neither. On `Existing` nothing is recorded,
    /// the event neither. The pipeline calls this only when this store's
    /// `audit_trail_key` is its audit sink's `trail_key`; the default, for
    /// a store without a trail, refuses.
    async fn record_chunk_audited(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
        event: &crate::AuditEvent,
    ) -> Result<ChunkInsert> {
        let _ = (id, file, chunk, event);
        Err(no_trail("record a chunk with its audit record"))
    }

    /// The write of a new file that completes it:
    /// [`update_file_scope_claiming`](Self::update_file_scope_claiming)
    /// with `claim`, [`update_file_scope_with_chunks`](Self::update_file_scope_with_chunks)
    /// without, and `events` appended to the audit trail of
    /// [`audit_trail_key`](Self::audit_trail_key) in the same transaction:
    /// all durable at once, or nothing (on an error, and on `Held`, no
    /// event is appended). The pipeline calls this only when this store's
    /// `audit_trail_key` is its audit sink's `trail_key`; the default, for
    /// a store without a trail, refuses.
    async fn update_file_scope_audited(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        events: &[crate::AuditEvent],
    ) -> Result<ClaimedWrite> {
        let _ = (session, expected, chunks, claim, events);
        Err(no_trail("record a file with its audit records"))
    }

    /// Create `session` together with its first file, in one transaction:
    /// [`create_session_capped_audited`](Self::create_session_capped_audited)
    /// of `session` (it already holds the file, complete, and may already be
    /// in the outbox) and the writes of
    /// [`update_file_scope_audited`](Self::update_file_scope_audited): the
    /// file's `chunks`, its `claim` when set, and `events` (the session's
    /// creation first) appended to the audit trail of
    /// [`audit_trail_key`](Self::audit_trail_key). All durable at once, or
    /// nothing: `Ok(None)` at the cap, `Held` when another file holds the
    /// claim (nothing written, no event appended either time); once
    /// written the session is at version 1. For a request that brings its
    /// own session and one instance (a STOW-RS request): one sync for
    /// both. The pipeline calls this only when this store's
    /// `audit_trail_key` is its audit sink's `trail_key`; the default, for
    /// a store without a trail, refuses.
    async fn create_session_with_file_audited(
        &self,
        session: &SessionRecord,
        cap: u32,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        events: &[crate::AuditEvent],
    ) -> Result<Option<ClaimedWrite>> {
        let _ = (session, cap, chunks, claim, events);
        Err(no_trail("create a session with its first file"))
    }

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

    /// Record an upload outcome for the analytics, unless a fact with the
    /// same key (`session`, `file`, `kind`, `occurrence`) is stored: then
    /// nothing changes (insert-if-absent, as a retried step records the
    /// same fact again). Facts outlive their session: deleting a session
    /// keeps them. An outcome that writes the session records its facts
    /// with that write (the `…_with_facts` methods); this alone is for an
    /// outcome with no other write (a file refused before it entered its
    /// session).
    async fn record_upload_fact(&self, fact: &UploadFact) -> Result<()>;

    /// The facts passing `filter`, counted per group of `group`, kind and
    /// cause (equal to [`FactCount::of`] over every stored fact, in any
    /// order).
    async fn count_upload_facts(
        &self,
        filter: &AnalyticsFilter,
        group: Grouping,
    ) -> Result<Vec<FactCount>>;

    /// The times from first byte to delivered (milliseconds) of the
    /// delivered facts passing `filter`, per group, each list ascending
    /// (equal to [`durations_of`](crate::analytics::durations_of)). At most
    /// `limit` durations in all: [`Error::LimitExceeded`](crate::Error::LimitExceeded)
    /// beyond, so the caller's filter bounds the memory.
    async fn delivery_durations(
        &self,
        filter: &AnalyticsFilter,
        group: Grouping,
        limit: usize,
    ) -> Result<GroupDurations>;

    /// This gateway process's key among the processes sharing the store,
    /// for a store that tells them apart (`None`, the default: the store
    /// serves one process). Recorded in a request-scoped session
    /// ([`SessionRecord::request_instance`]).
    fn instance_key(&self) -> Option<i64> {
        None
    }

    /// Whether the gateway process with `key` (from [`instance_key`](Self::instance_key))
    /// still runs. The default, for a store serving one process, answers
    /// `false` for every key: a key not this process's is an earlier run's.
    async fn instance_alive(&self, key: i64) -> Result<bool> {
        Ok(Some(key) == self.instance_key())
    }
}

/// What the defaults of the `…_with_facts` methods do before their write:
/// with facts to record, `Precondition` unless session `id` is stored at
/// version `expected` (`NotFound` when it is not stored), then each fact
/// recorded (insert-if-absent). Nothing when `facts` is empty.
async fn facts_first<S: SessionStore + ?Sized>(
    store: &S,
    id: SessionId,
    expected: u64,
    facts: &[UploadFact],
) -> Result<()> {
    if facts.is_empty() {
        return Ok(());
    }
    let stored = store.load_file_scope(id, None).await?.session.version;
    if stored != expected {
        return Err(crate::Error::Precondition {
            what: format!("session version {stored} (expected {expected})"),
        });
    }
    for fact in facts {
        store.record_upload_fact(fact).await?;
    }
    Ok(())
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

            async fn create_session_capped(
                &self,
                session: &SessionRecord,
                cap: u32,
            ) -> Result<Option<Versioned<SessionRecord>>> {
                (**self).create_session_capped(session, cap).await
            }

            async fn create_session_capped_audited(
                &self,
                session: &SessionRecord,
                cap: u32,
                event: &crate::AuditEvent,
            ) -> Result<Option<Versioned<SessionRecord>>> {
                (**self).create_session_capped_audited(session, cap, event).await
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

            async fn load_file_scope(&self, id: SessionId, file: Option<FileId>) -> Result<FileScope> {
                (**self).load_file_scope(id, file).await
            }

            async fn update_file_scope(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
                (**self).update_file_scope(session, expected).await
            }

            async fn update_file_scope_with_chunks(
                &self,
                session: &SessionRecord,
                expected: u64,
                chunks: &[(FileId, ChunkRecord)],
            ) -> Result<u64> {
                (**self).update_file_scope_with_chunks(session, expected, chunks).await
            }

            async fn update_file_scope_claiming(
                &self,
                session: &SessionRecord,
                expected: u64,
                chunks: &[(FileId, ChunkRecord)],
                claim: &InstanceClaim,
            ) -> Result<ClaimedWrite> {
                (**self).update_file_scope_claiming(session, expected, chunks, claim).await
            }

            async fn update_session_with_facts(
                &self,
                session: &SessionRecord,
                expected: u64,
                facts: &[UploadFact],
            ) -> Result<u64> {
                (**self).update_session_with_facts(session, expected, facts).await
            }

            async fn update_file_scope_with_facts(
                &self,
                session: &SessionRecord,
                expected: u64,
                facts: &[UploadFact],
            ) -> Result<u64> {
                (**self).update_file_scope_with_facts(session, expected, facts).await
            }

            async fn update_file_scope_with_facts_audited(
                &self,
                session: &SessionRecord,
                expected: u64,
                facts: &[UploadFact],
                events: &[crate::AuditEvent],
            ) -> Result<u64> {
                (**self)
                    .update_file_scope_with_facts_audited(session, expected, facts, events)
                    .await
            }

            async fn update_heads(&self, writes: &[HeadWrite<'_>]) -> Result<Vec<Result<u64>>> {
                (**self).update_heads(writes).await
            }

            async fn delete_session_with_facts(
                &self,
                id: SessionId,
                expected: u64,
                facts: &[UploadFact],
            ) -> Result<()> {
                (**self).delete_session_with_facts(id, expected, facts).await
            }

            async fn files_with_instance(
                &self,
                id: SessionId,
                sop_instance_uid: &Uid,
            ) -> Result<Vec<FileId>> {
                (**self).files_with_instance(id, sop_instance_uid).await
            }

            async fn has_valid_file_except(&self, id: SessionId, except: FileId) -> Result<bool> {
                (**self).has_valid_file_except(id, except).await
            }

            async fn remove_file_scoped(
                &self,
                session: &SessionRecord,
                expected: u64,
                file: FileId,
                facts: &[UploadFact],
            ) -> Result<u64> {
                (**self).remove_file_scoped(session, expected, file, facts).await
            }

            async fn update_file_scope_capped(
                &self,
                session: &SessionRecord,
                expected: u64,
                cap: u32,
            ) -> Result<Option<u64>> {
                (**self).update_file_scope_capped(session, expected, cap).await
            }

            async fn list_files(
                &self,
                id: SessionId,
                after: Option<FileId>,
                limit: usize,
            ) -> Result<Vec<crate::model::FileRecord>> {
                (**self).list_files(id, after, limit).await
            }

            async fn record_upload_fact(&self, fact: &UploadFact) -> Result<()> {
                (**self).record_upload_fact(fact).await
            }

            async fn count_upload_facts(
                &self,
                filter: &AnalyticsFilter,
                group: Grouping,
            ) -> Result<Vec<FactCount>> {
                (**self).count_upload_facts(filter, group).await
            }

            async fn delivery_durations(
                &self,
                filter: &AnalyticsFilter,
                group: Grouping,
                limit: usize,
            ) -> Result<GroupDurations> {
                (**self).delivery_durations(filter, group, limit).await
            }

            fn instance_key(&self) -> Option<i64> {
                (**self).instance_key()
            }

            async fn instance_alive(&self, key: i64) -> Result<bool> {
                (**self).instance_alive(key).await
            }

            async fn reserve_range(
                &self,
                id: SessionId,
                file: FileId,
                range: std::ops::Range<u64>,
                holder: &str,
                until: OffsetDateTime,
            ) -> Result<()> {
                (**self).reserve_range(id, file, range, holder, until).await
            }

            async fn release_range(
                &self,
                id: SessionId,
                file: FileId,
                range: std::ops::Range<u64>,
                holder: &str,
            ) -> Result<()> {
                (**self).release_range(id, file, range, holder).await
            }

            async fn record_chunk(
                &self,
                id: SessionId,
                file: FileId,
                chunk: &ChunkRecord,
            ) -> Result<ChunkInsert> {
                (**self).record_chunk(id, file, chunk).await
            }

            fn audit_trail_key(&self) -> Option<i64> {
                (**self).audit_trail_key()
            }

            async fn record_chunk_audited(
                &self,
                id: SessionId,
                file: FileId,
                chunk: &ChunkRecord,
                event: &crate::AuditEvent,
            ) -> Result<ChunkInsert> {
                (**self).record_chunk_audited(id, file, chunk, event).await
            }

            async fn update_file_scope_audited(
                &self,
                session: &SessionRecord,
                expected: u64,
                chunks: &[(FileId, ChunkRecord)],
                claim: Option<&InstanceClaim>,
                events: &[crate::AuditEvent],
            ) -> Result<ClaimedWrite> {
                (**self)
                    .update_file_scope_audited(session, expected, chunks, claim, events)
                    .await
            }

            async fn create_session_with_file_audited(
                &self,
                session: &SessionRecord,
                cap: u32,
                chunks: &[(FileId, ChunkRecord)],
                claim: Option<&InstanceClaim>,
                events: &[crate::AuditEvent],
            ) -> Result<Option<ClaimedWrite>> {
                (**self)
                    .create_session_with_file_audited(session, cap, chunks, claim, events)
                    .await
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

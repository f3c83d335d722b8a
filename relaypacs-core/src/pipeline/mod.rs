//! The ingestion pipeline: sessions, chunks, completion, validation, delivery.
//!
//! [`Pipeline`] is the one entry point an embedding application (or the
//! reference server) calls. It owns no I/O of its own: bytes go to the
//! [`ChunkStore`], state to the [`SessionStore`], instances to the
//! [`PacsSink`] and events to the [`AuditSink`]. The stores are reached
//! only through it (there is no accessor to them), so every caller gets
//! the same locks, owner checks and audit.
//!
//! The methods are grouped by phase: `sessions` (open, declare files,
//! complete into the outbox), `chunks` (one chunk, or a whole stream with
//! [`Pipeline::ingest_stream`]), `completion` (read-back, validation, the
//! index of accepted instances), `lifecycle` (queries, removal, abort,
//! expiry); delivery is in [`crate::outbox`].
//!
//! # Concurrency
//! Each session has a gate: requests that work on a session hold it shared,
//! expiry and abort hold it exclusive (and expiry only *tries*, so a session
//! with a request in flight is never expired). Inside a session, byte ranges
//! being written are reserved, so two writes to overlapping ranges never
//! run at once, and a range already acknowledged is never written again.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::RwLock;

use crate::audit::{AuditAction, AuditEvent, AuditOutcome, AuditSink};
use crate::chunk_store::{ChunkPlacement, ChunkStore, FileKey, Syncing};
use crate::dicom::{DicomLimits, Identified, Part10Hasher, validate_dicom};
use crate::digest::{ByteStream, Sha256Digest, VerifyingStream};
use crate::error::{Error, ErrorKind, IntegrityError, Result};
use crate::ids::{Actor, FileId, SessionId, Uid};
use crate::model::{
    ChunkRecord, DicomSummary, FileRecord, FileState, Limits, SessionRecord, SessionState,
    Versioned,
};
use crate::pacs_sink::{Instance, InstanceSource, PacsSink};
use crate::session_store::{ChunkInsert, FileScope, InstanceClaim, SessionStore};

mod analytics;
mod chunks;
mod completion;
pub mod denials;
mod index;
mod lifecycle;
mod reports;
mod sessions;

pub use analytics::AnalyticsLimits;
pub use chunks::{INGEST_CHUNK_SIZE, PutOutcome, RangeDone, RangeWrite, plan_segments};
pub use denials::DenialAudit;
pub use index::{Page, PageCursor, PageRequest};
pub use reports::{ReadReport, ReportContent};
pub(crate) use sessions::PendingSession;

/// Pipeline settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    /// Limits for new sessions (and the ceiling for per-session limits).
    pub limits: Limits,
    /// DICOM validation limits.
    #[serde(skip)]
    pub dicom: DicomLimits,
    /// What to do with a SOP Instance UID the gateway accepted before
    /// with other content.
    pub duplicates: DuplicatePolicy,
    /// Open sessions (not yet completed, aborted or expired) one user may
    /// hold at once; the next [`Pipeline::create_session`] is refused with
    /// [`Error::TooMany`] (`RELAY_TOO_MANY_SESSIONS`).
    pub max_open_sessions_per_user: u32,
    /// Free bytes (above the [`StorageGauge`]'s watermark) a new session
    /// must find; 0 asks only that the watermark is not crossed.
    pub session_admission_bytes: u64,
    /// Items in a page of a listing when the request names no limit.
    pub default_page_size: u32,
    /// Most items in a page of a listing, whatever the request asks.
    pub max_page_size: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            dicom: DicomLimits::default(),
            duplicates: DuplicatePolicy::default(),
            max_open_sessions_per_user: 64,
            session_admission_bytes: 0,
            default_page_size: 100,
            max_page_size: 1000,
        }
    }
}

/// Answers whether the storage behind the pipeline has room for new work
/// (the server plugs its disk watermark in with
/// [`Pipeline::set_storage_gauge`]); the core cannot see disks itself.
pub trait StorageGauge: fmt::Debug + Send + Sync + 'static {
    /// `Ok` when `bytes` more bytes fit above the watermark.
    ///
    /// # Errors
    /// [`Error::InsufficientStorage`] when they do not; any other error
    /// (the volume cannot be measured) refuses the work too.
    fn admit(&self, bytes: u64) -> Result<()>;
}

/// A [`StorageGauge`] from a closure.
pub struct GaugeFn<F>(pub F);

impl<F> fmt::Debug for GaugeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GaugeFn")
    }
}

impl<F> StorageGauge for GaugeFn<F>
where
    F: Fn(u64) -> Result<()> + Send + Sync + 'static,
{
    fn admit(&self, bytes: u64) -> Result<()> {
        (self.0)(bytes)
    }
}

/// What a caller tried to do on a session, for the audit of a denial.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Access {
    /// Short name of the attempt (`"read_file"`).
    pub(crate) what: &'static str,
    /// The file targeted, if any.
    pub(crate) file: Option<FileId>,
}

impl Access {
    pub(crate) fn session(what: &'static str) -> Self {
        Self { what, file: None }
    }

    pub(crate) fn file(what: &'static str, file: FileId) -> Self {
        Self {
            what,
            file: Some(file),
        }
    }
}

/// What happens to an upload whose SOP Instance UID the gateway accepted
/// before (in any session, its index of accepted instances says).
/// The same data set again is always an idempotent success.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicatePolicy {
    /// Other content under a known UID is refused (409; STOW-RS 0x0111).
    #[default]
    Refuse,
    /// Other content is accepted with a warning; the PACS check before
    /// sending still refuses to overwrite a different object there.
    Accept,
}

/// Request to open a session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NewSession {
    /// Allow files of several studies in one session.
    pub allow_multiple_studies: bool,
    /// The session belongs to the request that opens it (see
    /// [`SessionRecord::request_scoped`]). Set by the server, never read
    /// from a client's JSON.
    #[serde(skip)]
    pub request_scoped: bool,
}

/// Request to declare a file in a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFile {
    /// Display name (never used as a path).
    pub name: String,
    /// Total size in bytes.
    pub size: u64,
    /// Whole-file SHA-256, if the client knows it.
    #[serde(default)]
    pub sha256: Option<Sha256Digest>,
}

/// Describes one chunk being put.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutChunk {
    /// Byte offset in the file.
    pub offset: u64,
    /// Exact length of the body.
    pub length: u64,
    /// Declared SHA-256 of the body; when absent, integrity rests on the
    /// whole-file digest and DICOM validation.
    #[serde(default)]
    pub sha256: Option<Sha256Digest>,
}

/// What [`Pipeline::file_status`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStatus {
    /// The file's record.
    pub file: FileRecord,
    /// Its stored chunks, by offset.
    pub chunks: Vec<ChunkRecord>,
    /// End of the contiguous run of stored bytes from offset 0.
    pub offset: u64,
    /// When the session expires if nothing else happens.
    pub expires_at: OffsetDateTime,
    /// The session's state.
    pub session_state: SessionState,
}

/// When a session expires if nothing else happens: its last change plus
/// its time to live.
fn session_expiry(rec: &SessionRecord) -> OffsetDateTime {
    let ttl =
        time::Duration::seconds(i64::try_from(rec.limits.session_ttl_secs).unwrap_or(i64::MAX));
    rec.updated_at.saturating_add(ttl)
}

/// End of the contiguous run of chunks starting at offset 0 (chunks need
/// not be sorted).
pub fn contiguous_end(chunks: &[ChunkRecord]) -> u64 {
    let mut sorted: Vec<&ChunkRecord> = chunks.iter().collect();
    sorted.sort_by_key(|c| c.offset);
    let mut end = 0;
    for c in sorted {
        if c.offset > end {
            break;
        }
        end = end.max(c.end());
    }
    end
}
#[derive(Debug, Default)]
pub(crate) struct Gate {
    pub(crate) rw: RwLock<()>,
    reserved: Mutex<Vec<(FileId, Range<u64>)>>,
}

/// Locks a std mutex, recovering from poisoning: every critical section in
/// this module leaves the guarded data consistent before anything that can
/// panic, so a poisoned lock still holds valid data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The ingestion pipeline. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Pipeline {
    pub(crate) inner: Arc<Inner>,
}

/// Request-scoped sessions kept as created (see `Inner::fresh`): more
/// than the requests one process runs at once.
const FRESH_KEPT: usize = 256;

pub(crate) struct Inner {
    pub(crate) chunks: Arc<dyn ChunkStore>,
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) sink: Arc<dyn PacsSink>,
    audit: Arc<dyn AuditSink>,
    config: PipelineConfig,
    gates: Mutex<HashMap<SessionId, Arc<Gate>>>,
    /// Where reports are looked for after delivery (set once).
    pub(crate) reports: std::sync::OnceLock<Arc<dyn crate::report_source::ReportSource>>,
    /// Sessions newly put in the outbox, for the delivery worker.
    pub(crate) queued: Mutex<Vec<SessionId>>,
    /// Wakes the delivery worker.
    pub(crate) kick: tokio::sync::Notify,
    /// Aggregated audit of denied and refused requests.
    pub(crate) denials: DenialAudit,
    /// Sessions by owner and creation time (cap, pages).
    pub(crate) index: index::SessionIndex,
    /// Request-scoped sessions this process just created, as written (at
    /// most [`FRESH_KEPT`]): their first file's step starts from this
    /// record instead of reading it back (see `take_fresh`).
    pub(crate) fresh: Mutex<std::collections::VecDeque<Versioned<SessionRecord>>>,
    /// Free-space check before new sessions (set once).
    pub(crate) gauge: std::sync::OnceLock<Arc<dyn StorageGauge>>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("chunks", &self.inner.chunks.to_string())
            .field("sessions", &self.inner.sessions.to_string())
            .field("sink", &self.inner.sink.to_string())
            .field("audit", &self.inner.audit.to_string())
            .finish_non_exhaustive()
    }
}

/// Reads instances for a sink from the chunk store.
#[derive(Debug)]
pub(crate) struct StoreSource {
    pub(crate) chunks: Arc<dyn ChunkStore>,
}

#[async_trait]
impl InstanceSource for StoreSource {
    /// The stored bytes, checked on the way against the verified length
    /// and SHA-256: a file changed at rest fails at its end, so a sink
    /// never commits it (and the delivery is dead-lettered, not retried).
    /// The one SHA-256 pass of a delivery over the stored bytes, needed
    /// because they may have changed at rest since `complete_file` proved
    /// them; sinks rely on it and do not hash the stream again.
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        let raw = self.chunks.read(instance.key, 0..instance.size).await?;
        let (verified, _) = VerifyingStream::new(raw, 0, instance.size, Some(instance.sha256));
        Ok(Box::pin(verified))
    }

    fn local_file(&self, instance: &Instance) -> Option<std::path::PathBuf> {
        self.chunks.local_file(instance.key)
    }
}
impl Pipeline {
    /// Assemble a pipeline from its four adapters.
    pub fn new(
        chunks: Arc<dyn ChunkStore>,
        sessions: Arc<dyn SessionStore>,
        sink: Arc<dyn PacsSink>,
        audit: Arc<dyn AuditSink>,
        config: PipelineConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                chunks,
                sessions,
                sink,
                denials: DenialAudit::new(audit.clone()),
                audit,
                config,
                index: index::SessionIndex::default(),
                gauge: std::sync::OnceLock::new(),
                gates: Mutex::new(HashMap::new()),
                fresh: Mutex::new(std::collections::VecDeque::new()),
                reports: std::sync::OnceLock::new(),
                queued: Mutex::new(Vec::new()),
                kick: tokio::sync::Notify::new(),
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &PipelineConfig {
        &self.inner.config
    }

    /// The aggregated audit of denied requests this pipeline writes to its
    /// trail; the HTTP layer records its own denials (forged tokens, admin
    /// routes) there too, and calls [`DenialAudit::flush`] periodically
    /// and at stop.
    pub fn denials(&self) -> &DenialAudit {
        &self.inner.denials
    }

    /// Set the free-space check made before a session is opened (once).
    ///
    /// # Errors
    /// [`Error::Conflict`] when one was set already.
    pub fn set_storage_gauge(&self, gauge: Arc<dyn StorageGauge>) -> Result<()> {
        self.inner
            .gauge
            .set(gauge)
            .map_err(|_| Error::conflict("RELAY_GAUGE_SET", "a storage gauge is already set"))
    }

    pub(crate) fn gate(&self, id: SessionId) -> Arc<Gate> {
        lock(&self.inner.gates).entry(id).or_default().clone()
    }

    fn forget_gate(&self, id: SessionId) {
        lock(&self.inner.gates).remove(&id);
        lock(&self.inner.fresh).retain(|v| v.value.id != id);
    }

    /// Keep `created`, a request-scoped session this process just wrote,
    /// for its first file (the oldest kept is dropped beyond
    /// [`FRESH_KEPT`]).
    pub(crate) fn keep_fresh(&self, created: Versioned<SessionRecord>) {
        let mut fresh = lock(&self.inner.fresh);
        if fresh.len() >= FRESH_KEPT {
            fresh.pop_front();
        }
        fresh.push_back(created);
    }

    /// The session `id` as this process created it, if it was kept and
    /// not taken yet. Only for a step that writes conditionally on the
    /// version (a stale record fails that write, and the step reloads):
    /// no other request knows a request-scoped session's id, so the record
    /// is current unless something went wrong.
    pub(crate) fn take_fresh(&self, id: SessionId) -> Option<Versioned<SessionRecord>> {
        let mut fresh = lock(&self.inner.fresh);
        let i = fresh.iter().position(|v| v.value.id == id)?;
        fresh.remove(i)
    }

    pub(crate) fn event(
        actor: &Actor,
        action: AuditAction,
        outcome: AuditOutcome,
        session: Option<SessionId>,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(actor.user.clone(), action, outcome);
        e.address = actor.address.clone();
        e.session = session;
        e
    }

    /// Record an audit event; a failure refuses the action (fail closed).
    pub(crate) async fn audit(&self, event: AuditEvent) -> Result<()> {
        self.inner
            .audit
            .record(&event)
            .await
            .map_err(|e| Error::Audit {
                source: Box::new(e),
            })
    }

    /// Audit a refused or failed action, then return its error. If even the
    /// audit record fails, the audit error is returned instead: it is the
    /// graver one, and the action was refused either way.
    pub(crate) async fn refuse<T>(&self, mut event: AuditEvent, err: Error) -> Result<T> {
        event.outcome = match err.kind() {
            ErrorKind::Storage
            | ErrorKind::InsufficientStorage
            | ErrorKind::Pacs
            | ErrorKind::Audit => AuditOutcome::SeriousFailure,
            _ => AuditOutcome::MinorFailure,
        };
        event.detail = format!("{}: {}", err.code(), err);
        self.audit(event).await?;
        Err(err)
    }

    pub(crate) fn check_owner(actor: &Actor, rec: &SessionRecord) -> Result<()> {
        if actor.admin || rec.owner == actor.user {
            Ok(())
        } else {
            // Another user's session is indistinguishable from a missing one.
            Err(Error::NotFound { what: "session" })
        }
    }

    /// Load a session the actor may see. Another user's session answers
    /// `NotFound`, exactly as a missing one, and the attempt is recorded as
    /// a Security Alert, aggregated per actor, attempt, object and minute
    /// (see [`DenialAudit`]). An id that exists for nobody is not recorded:
    /// its objects would be unbounded.
    pub(crate) async fn load_owned(
        &self,
        actor: &Actor,
        id: SessionId,
    ) -> Result<Versioned<SessionRecord>> {
        self.load_owned_as(actor, id, Access::session("access"))
            .await
    }

    /// [`load_owned`](Self::load_owned), naming the attempt for the audit.
    pub(crate) async fn load_owned_as(
        &self,
        actor: &Actor,
        id: SessionId,
        access: Access,
    ) -> Result<Versioned<SessionRecord>> {
        let v = self.inner.sessions.load_session(id).await?;
        if let Err(e) = Self::check_owner(actor, &v.value) {
            self.deny(actor, id, access, &e).await;
            return Err(e);
        }
        Ok(v)
    }

    /// [`load_owned_as`](Self::load_owned_as) for one file: the session
    /// with only `file` among its files, and its file totals, at a cost
    /// that does not grow with the session's other files.
    pub(crate) async fn load_scope_owned_as(
        &self,
        actor: &Actor,
        id: SessionId,
        file: Option<FileId>,
        access: Access,
    ) -> Result<FileScope> {
        let scope = self.inner.sessions.load_file_scope(id, file).await?;
        if let Err(e) = Self::check_owner(actor, &scope.session.value) {
            self.deny(actor, id, access, &e).await;
            return Err(e);
        }
        Ok(scope)
    }

    /// [`update`](Self::update) on a file scope: `change` sees the session
    /// with only the scope's file (and the session's file totals) and may
    /// change the session and insert or change files, never remove one;
    /// only what it carries is written. Reloads the scope and re-applies on
    /// a concurrent update.
    pub(crate) async fn update_scoped<T>(
        &self,
        id: SessionId,
        file: Option<FileId>,
        current: FileScope,
        change: impl FnMut(&mut SessionRecord, &FileScope) -> Result<T>,
    ) -> Result<(SessionRecord, T)> {
        self.update_scoped_capped(id, file, current, None, change)
            .await?
            // Without a cap the store never refuses a write for it.
            .ok_or_else(|| Error::Busy {
                what: "session write refused without a cap".into(),
            })
    }

    /// [`update_scoped`](Self::update_scoped), written with
    /// [`SessionStore::update_file_scope_capped`] when `cap` is set:
    /// `Ok(None)` when the owner's unfinished uploads fill it.
    pub(crate) async fn update_scoped_capped<T>(
        &self,
        id: SessionId,
        file: Option<FileId>,
        mut current: FileScope,
        cap: Option<u32>,
        mut change: impl FnMut(&mut SessionRecord, &FileScope) -> Result<T>,
    ) -> Result<Option<(SessionRecord, T)>> {
        for _ in 0..64 {
            let mut rec = current.session.value.clone();
            let out = change(&mut rec, &current)?;
            rec.updated_at = OffsetDateTime::now_utc();
            let version = current.session.version;
            let written = match cap {
                None => self
                    .inner
                    .sessions
                    .update_file_scope(&rec, version)
                    .await
                    .map(Some),
                Some(cap) => {
                    self.inner
                        .sessions
                        .update_file_scope_capped(&rec, version, cap)
                        .await
                }
            };
            match written {
                Ok(Some(_)) => return Ok(Some((rec, out))),
                Ok(None) => return Ok(None),
                Err(Error::Precondition { .. }) => {
                    current = self.inner.sessions.load_file_scope(id, file).await?
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy {
            what: "session is being updated concurrently".into(),
        })
    }

    /// Record a cross-user attempt (aggregated). The caller's answer stays
    /// `NotFound` even when the trail fails: a different answer would tell
    /// the session exists. The failure is logged here, and the next action
    /// that must be audited fails closed.
    async fn deny(&self, actor: &Actor, id: SessionId, access: Access, err: &Error) {
        let mut ev = Self::event(
            actor,
            AuditAction::SecurityAlert,
            AuditOutcome::MinorFailure,
            Some(id),
        );
        ev.file = access.file;
        ev.detail = format!("{}: another user's session", err.code());
        let object = match access.file {
            Some(f) => format!("session {id} file {f}"),
            None => format!("session {id}"),
        };
        if let Err(e) = self.inner.denials.record(ev, access.what, &object).await {
            tracing::error!(error = %e, session = %id, "denied access not recorded in the audit trail");
        }
    }

    fn require_open(rec: &SessionRecord) -> Result<()> {
        match rec.state {
            SessionState::Open => Ok(()),
            _ => Err(Error::conflict(
                "RELAY_SESSION_NOT_OPEN",
                "the session no longer accepts changes",
            )),
        }
    }

    /// Apply `change` to the session head only (state, delivery, lease,
    /// study) with compare-and-set, reloading and re-applying on a
    /// concurrent update: `change` may read the files `current` holds but must
    /// not change them, and only the head is written
    /// ([`SessionStore::update_file_scope`] with no file), so the write
    /// costs the same for a session of one file or of 10,000. On a
    /// concurrent update it reloads the whole session when `files` is
    /// true (a `change` that decides on the files), else the head only.
    /// The record returned holds the files `current` held.
    pub(crate) async fn update_head<T>(
        &self,
        id: SessionId,
        current: Versioned<SessionRecord>,
        files: bool,
        change: impl FnMut(&mut SessionRecord) -> Result<T>,
    ) -> Result<(SessionRecord, T)> {
        self.update_head_with_facts(id, current, files, &[], change)
            .await
    }

    /// [`update_head`](Self::update_head) whose every write also records
    /// the analytics `facts` in the same step
    /// ([`SessionStore::update_file_scope_with_facts`]): an outcome and its
    /// analytics facts are durable together, and a retry after a
    /// concurrent update records the same facts again (same keys, counted
    /// once).
    pub(crate) async fn update_head_with_facts<T>(
        &self,
        id: SessionId,
        current: Versioned<SessionRecord>,
        files: bool,
        facts: &[crate::analytics::UploadFact],
        change: impl FnMut(&mut SessionRecord) -> Result<T>,
    ) -> Result<(SessionRecord, T)> {
        self.update_head_audited(id, current, files, facts, change, |_, _| Vec::new())
            .await
            .map(|(rec, out, _)| (rec.value, out))
    }

    /// [`update_head_with_facts`](Self::update_head_with_facts) whose
    /// write, when the session store appends to the audit sink's own trail
    /// ([`audit_joins_state`](Self::audit_joins_state)), also commits the
    /// audit records `events` makes of the changed record and `change`'s
    /// answer (one transaction). Returns the record as written, at its new
    /// version (a later conditional write can start from it without a
    /// read), `change`'s answer, and whether the records were committed
    /// so: if not, the caller records them.
    pub(crate) async fn update_head_audited<T>(
        &self,
        id: SessionId,
        mut current: Versioned<SessionRecord>,
        files: bool,
        facts: &[crate::analytics::UploadFact],
        mut change: impl FnMut(&mut SessionRecord) -> Result<T>,
        events: impl Fn(&SessionRecord, &T) -> Vec<AuditEvent>,
    ) -> Result<(Versioned<SessionRecord>, T, bool)> {
        let joint = self.audit_joins_state();
        for _ in 0..64 {
            let mut rec = current.value.clone();
            let out = change(&mut rec)?;
            debug_assert!(
                rec.files == current.value.files,
                "update_head changed files"
            );
            rec.updated_at = OffsetDateTime::now_utc();
            let audit = if joint {
                events(&rec, &out)
            } else {
                Vec::new()
            };
            let kept = std::mem::take(&mut rec.files);
            let sessions = &self.inner.sessions;
            let written = if audit.is_empty() {
                sessions
                    .update_file_scope_with_facts(&rec, current.version, facts)
                    .await
            } else {
                sessions
                    .update_file_scope_with_facts_audited(&rec, current.version, facts, &audit)
                    .await
            };
            match written {
                Ok(version) => {
                    rec.files = kept;
                    let rec = Versioned {
                        value: rec,
                        version,
                    };
                    return Ok((rec, out, !audit.is_empty()));
                }
                Err(Error::Precondition { .. }) => {
                    current = if files {
                        self.inner.sessions.load_session(id).await?
                    } else {
                        self.inner.sessions.load_file_scope(id, None).await?.session
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy {
            what: "session is being updated concurrently".into(),
        })
    }

    /// Tell the delivery worker that `id` has work.
    pub(crate) fn wake_outbox(&self, id: SessionId) {
        lock(&self.inner.queued).push(id);
        self.inner.kick.notify_one();
    }

    /// The validated instances of a session, in file order.
    pub(crate) fn instances_of(rec: &SessionRecord) -> Vec<Instance> {
        rec.files
            .values()
            .filter_map(|f| match (&f.state, f.sha256) {
                (FileState::Valid { dicom }, Some(sha256)) => Some(Instance {
                    key: FileKey {
                        session: rec.id,
                        file: f.id,
                    },
                    size: f.size,
                    sha256,
                    data_set_sha256: f.data_set_sha256,
                    dicom: dicom.clone(),
                }),
                _ => None,
            })
            .collect()
    }
}

/// A page of a session (see [`Pipeline::session_page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionPage {
    /// The session; its `files` hold the page's files only.
    pub session: SessionRecord,
    /// For each file of the page, the end of its contiguous stored bytes
    /// from offset 0 (a valid file: its size).
    pub offsets: std::collections::BTreeMap<FileId, u64>,
    /// How many files the session has.
    pub file_count: u64,
    /// The last file of this page when more follow: pass it as `after`.
    pub next: Option<FileId>,
}

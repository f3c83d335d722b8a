//! The ingestion pipeline: sessions, chunks, completion, validation, delivery.
//!
//! [`Pipeline`] is the one entry point an embedding application (or the
//! reference server) calls. It owns no I/O of its own: bytes go to the
//! [`ChunkStore`], state to the [`SessionStore`], instances to the
//! [`PacsSink`] and events to the [`AuditSink`].
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
use crate::chunk_store::{ChunkPlacement, ChunkStore, FileKey};
use crate::dicom::{DicomLimits, Identified, Part10Hasher, validate_dicom};
use crate::digest::{ByteStream, Sha256Digest, VerifyingStream};
use crate::error::{Error, ErrorKind, IntegrityError, Result};
use crate::ids::{Actor, FileId, SessionId, Uid};
use crate::model::{
    ChunkRecord, DicomSummary, FileRecord, FileState, Limits, SessionRecord, SessionState,
    Versioned,
};
use crate::pacs_sink::{Instance, InstanceSource, PacsSink};
use crate::session_store::{ChunkInsert, InstanceClaim, SessionStore};

/// Pipeline settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Whether `err` refuses a file for its content, so that it is removed
/// from its session (see [`Pipeline::complete_file`]).
fn refuses_content(err: &Error) -> bool {
    match err {
        Error::Dicom(_) | Error::StudyMismatch { .. } => true,
        Error::Integrity(IntegrityError::FileHash { .. }) => true,
        Error::Conflict { code, .. } => {
            matches!(
                *code,
                "RELAY_DUPLICATE_INSTANCE" | "RELAY_INSTANCE_CONFLICT"
            )
        }
        _ => false,
    }
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

/// What [`Pipeline::put_chunk`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PutOutcome {
    /// The chunk is now durable and recorded.
    Stored {
        /// The record.
        chunk: ChunkRecord,
    },
    /// The identical chunk was already stored; nothing changed.
    AlreadyStored {
        /// The existing record.
        chunk: ChunkRecord,
    },
}

impl PutOutcome {
    /// The chunk record either way.
    pub fn chunk(&self) -> &ChunkRecord {
        match self {
            Self::Stored { chunk } | Self::AlreadyStored { chunk } => chunk,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Gate {
    pub(crate) rw: RwLock<()>,
    reserved: Mutex<Vec<(FileId, Range<u64>)>>,
}

/// Releases a reserved byte range when dropped (also on cancellation).
struct Reservation {
    gate: Arc<Gate>,
    file: FileId,
    range: Range<u64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = lock(&self.gate.reserved);
        if let Some(i) = r
            .iter()
            .position(|(f, rg)| *f == self.file && *rg == self.range)
        {
            r.swap_remove(i);
        }
    }
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

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The ingestion pipeline. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Pipeline {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) chunks: Arc<dyn ChunkStore>,
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) sink: Arc<dyn PacsSink>,
    pub(crate) audit: Arc<dyn AuditSink>,
    config: PipelineConfig,
    gates: Mutex<HashMap<SessionId, Arc<Gate>>>,
    /// Where reports are looked for after delivery (set once).
    pub(crate) reports: std::sync::OnceLock<Arc<dyn crate::report_source::ReportSource>>,
    /// Sessions newly put in the outbox, for the delivery worker.
    pub(crate) queued: Mutex<Vec<SessionId>>,
    /// Wakes the delivery worker.
    pub(crate) kick: tokio::sync::Notify,
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
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        let raw = self.chunks.read(instance.key, 0..instance.size).await?;
        let (verified, _) = VerifyingStream::new(raw, 0, instance.size, Some(instance.sha256));
        Ok(Box::pin(verified))
    }
}

/// Result of a full read-back of a stored file.
struct ReadBack {
    prefix: Vec<u8>,
    sha256: Sha256Digest,
    /// Digest of the data set after the file meta group, when the meta
    /// group could be read.
    data_set_sha256: Option<Sha256Digest>,
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
                audit,
                config,
                gates: Mutex::new(HashMap::new()),
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

    /// The chunk store.
    pub fn chunk_store(&self) -> &Arc<dyn ChunkStore> {
        &self.inner.chunks
    }

    /// The session store.
    pub fn session_store(&self) -> &Arc<dyn SessionStore> {
        &self.inner.sessions
    }

    /// The audit sink.
    pub fn audit_sink(&self) -> &Arc<dyn AuditSink> {
        &self.inner.audit
    }

    pub(crate) fn gate(&self, id: SessionId) -> Arc<Gate> {
        lock(&self.inner.gates).entry(id).or_default().clone()
    }

    fn forget_gate(&self, id: SessionId) {
        lock(&self.inner.gates).remove(&id);
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

    pub(crate) async fn load_owned(
        &self,
        actor: &Actor,
        id: SessionId,
    ) -> Result<Versioned<SessionRecord>> {
        let v = self.inner.sessions.load_session(id).await?;
        Self::check_owner(actor, &v.value)?;
        Ok(v)
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

    /// Apply `change` to the session with compare-and-set, reloading and
    /// re-applying on a concurrent update.
    pub(crate) async fn update<T>(
        &self,
        id: SessionId,
        mut current: Versioned<SessionRecord>,
        mut change: impl FnMut(&mut SessionRecord) -> Result<T>,
    ) -> Result<(SessionRecord, T)> {
        for _ in 0..64 {
            let mut rec = current.value.clone();
            let out = change(&mut rec)?;
            rec.updated_at = OffsetDateTime::now_utc();
            match self
                .inner
                .sessions
                .update_session(&rec, current.version)
                .await
            {
                Ok(_) => return Ok((rec, out)),
                Err(Error::Precondition { .. }) => {
                    current = self.inner.sessions.load_session(id).await?
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy {
            what: "session is being updated concurrently".into(),
        })
    }

    /// Open a new upload session owned by `actor`.
    pub async fn create_session(&self, actor: &Actor, req: NewSession) -> Result<SessionRecord> {
        let now = OffsetDateTime::now_utc();
        let rec = SessionRecord {
            id: SessionId::random(),
            owner: actor.user.clone(),
            created_at: now,
            updated_at: now,
            allow_multiple_studies: req.allow_multiple_studies,
            study_instance_uid: None,
            limits: self.inner.config.limits.clone(),
            files: Default::default(),
            state: SessionState::Open,
            delivery: Default::default(),
        };
        let ev = Self::event(
            actor,
            AuditAction::SessionCreated,
            AuditOutcome::Success,
            Some(rec.id),
        );
        if let Err(e) = self.inner.sessions.create_session(&rec).await {
            return self.refuse(ev, e).await;
        }
        self.audit(ev).await?;
        Ok(rec)
    }

    /// Declare a file of `size` bytes in a session.
    pub async fn add_file(&self, actor: &Actor, id: SessionId, req: NewFile) -> Result<FileRecord> {
        let gate = self.gate(id);
        let _g = gate.rw.read().await;
        let current = self.load_owned(actor, id).await?;
        let mut ev = Self::event(
            actor,
            AuditAction::FileAdded,
            AuditOutcome::Success,
            Some(id),
        );
        match self.add_file_inner(id, current, req).await {
            Ok(f) => {
                ev.file = Some(f.id);
                ev.detail = format!("size={}", f.size);
                self.audit(ev).await?;
                Ok(f)
            }
            Err(e) => self.refuse(ev, e).await,
        }
    }

    async fn add_file_inner(
        &self,
        id: SessionId,
        current: Versioned<SessionRecord>,
        req: NewFile,
    ) -> Result<FileRecord> {
        let limits = current.value.limits.clone();
        Self::require_open(&current.value)?;
        if req.size == 0 {
            return Err(Error::invalid(
                "RELAY_EMPTY_FILE",
                "file size must be at least 1 byte",
            ));
        }
        if req.size > limits.max_file_size {
            return Err(Error::LimitExceeded {
                what: "file size",
                limit: limits.max_file_size,
                actual: req.size,
            });
        }
        if req.name.len() > 255 || req.name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "RELAY_BAD_FILE_NAME",
                "file name must be at most 255 bytes with no control characters",
            ));
        }
        let file = FileRecord {
            id: FileId::random(),
            name: req.name,
            size: req.size,
            sha256: req.sha256,
            data_set_sha256: None,
            state: FileState::Uploading,
        };
        self.inner
            .chunks
            .create_file(
                FileKey {
                    session: id,
                    file: file.id,
                },
                file.size,
            )
            .await?;
        let f2 = file.clone();
        self.update(id, current, move |rec| {
            Self::require_open(rec)?;
            if rec.files.len() as u64 >= u64::from(rec.limits.max_files) {
                return Err(Error::LimitExceeded {
                    what: "files per session",
                    limit: u64::from(rec.limits.max_files),
                    actual: rec.files.len() as u64 + 1,
                });
            }
            let total = rec.declared_bytes().saturating_add(f2.size);
            if total > rec.limits.max_session_size {
                return Err(Error::LimitExceeded {
                    what: "session size",
                    limit: rec.limits.max_session_size,
                    actual: total,
                });
            }
            rec.files.insert(f2.id, f2.clone());
            Ok(())
        })
        .await?;
        Ok(file)
    }

    /// Store one chunk of a file. The body is verified against
    /// `chunk.length` and `chunk.sha256` while it streams; only once the
    /// bytes are durable is the chunk recorded. Re-sending a stored chunk
    /// is a no-op; the same range with other bytes is a conflict.
    pub async fn put_chunk(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
        chunk: PutChunk,
        body: ByteStream,
    ) -> Result<PutOutcome> {
        let gate = self.gate(id);
        let _g = gate.rw.read().await;
        let current = self.load_owned(actor, id).await?;
        let mut ev = Self::event(
            actor,
            AuditAction::ChunkStored,
            AuditOutcome::Success,
            Some(id),
        );
        ev.file = Some(file);
        ev.detail = format!("offset={} length={}", chunk.offset, chunk.length);
        match self
            .put_chunk_inner(&gate, id, file, current, chunk, body)
            .await
        {
            Ok(out) => {
                if matches!(out, PutOutcome::Stored { .. }) {
                    self.audit(ev).await?;
                }
                Ok(out)
            }
            Err(e) => self.refuse(ev, e).await,
        }
    }

    async fn put_chunk_inner(
        &self,
        gate: &Arc<Gate>,
        id: SessionId,
        file_id: FileId,
        current: Versioned<SessionRecord>,
        chunk: PutChunk,
        body: ByteStream,
    ) -> Result<PutOutcome> {
        let rec = &current.value;
        Self::require_open(rec)?;
        let file = rec
            .files
            .get(&file_id)
            .ok_or(Error::NotFound { what: "file" })?;
        if !matches!(file.state, FileState::Uploading) {
            return Err(Error::conflict(
                "RELAY_FILE_COMPLETE",
                "the file is already complete",
            ));
        }
        let limits = &rec.limits;
        let end = chunk
            .offset
            .checked_add(chunk.length)
            .filter(|e| *e <= file.size)
            .ok_or_else(|| {
                Error::invalid(
                    "RELAY_BAD_RANGE",
                    format!("chunk range exceeds the declared file size {}", file.size),
                )
            })?;
        if chunk.length == 0 {
            return Err(Error::invalid(
                "RELAY_BAD_RANGE",
                "chunk length must be at least 1",
            ));
        }
        if chunk.length > limits.max_chunk_size {
            return Err(Error::LimitExceeded {
                what: "chunk size",
                limit: limits.max_chunk_size,
                actual: chunk.length,
            });
        }
        if chunk.length < limits.min_chunk_size && end != file.size {
            return Err(Error::invalid(
                "RELAY_CHUNK_TOO_SMALL",
                format!(
                    "only the last chunk may be smaller than {} bytes",
                    limits.min_chunk_size
                ),
            ));
        }
        let range = chunk.offset..end;
        let key = FileKey {
            session: id,
            file: file_id,
        };

        // Already recorded? Then this is a retry (no-op) or a conflict; the
        // stored range is never written again either way.
        let recorded = self.inner.sessions.chunks(id, file_id).await?;
        if let Some(existing) = recorded
            .iter()
            .find(|c| c.offset == chunk.offset && c.length == chunk.length)
        {
            return self.retry_of(existing.clone(), chunk, body).await;
        }
        if let Some(c) = recorded
            .iter()
            .find(|c| overlaps(&(c.offset..c.end()), &range))
        {
            return Err(Error::conflict(
                "RELAY_CHUNK_OVERLAP",
                format!(
                    "range {}..{} overlaps the stored chunk {}..{}",
                    range.start,
                    range.end,
                    c.offset,
                    c.end()
                ),
            ));
        }
        let _reservation = {
            let mut r = lock(&gate.reserved);
            if r.iter()
                .any(|(f, rg)| *f == file_id && overlaps(rg, &range))
            {
                return Err(Error::Busy {
                    what: format!(
                        "range {}..{} is being written by another request",
                        range.start, range.end
                    ),
                });
            }
            r.push((file_id, range.clone()));
            Reservation {
                gate: gate.clone(),
                file: file_id,
                range: range.clone(),
            }
        };

        let (verifying, slot) =
            VerifyingStream::new(body, chunk.offset, chunk.length, chunk.sha256);
        let placement = ChunkPlacement {
            offset: chunk.offset,
            length: chunk.length,
        };
        let receipt = self
            .inner
            .chunks
            .put_chunk(key, placement, Box::pin(verifying))
            .await?;
        let sha256 = slot.get().ok_or_else(|| {
            Error::storage(
                crate::error::StorageErrorKind::Io,
                "put chunk",
                format!(
                    "{} returned before consuming the whole chunk body",
                    self.inner.chunks
                ),
            )
        })?;
        let record = ChunkRecord {
            offset: chunk.offset,
            length: chunk.length,
            sha256,
            receipt,
        };
        match self
            .inner
            .sessions
            .record_chunk(id, file_id, &record)
            .await?
        {
            ChunkInsert::Inserted => {}
            ChunkInsert::Existing(other)
                if other.sha256 == sha256 && other.length == record.length =>
            {
                return Ok(PutOutcome::AlreadyStored { chunk: other });
            }
            ChunkInsert::Existing(_) => {
                return Err(Error::conflict(
                    "RELAY_CHUNK_CONFLICT",
                    "another chunk was recorded at this offset",
                ));
            }
        }
        // Keep the session's activity time fresh for expiry: at most once a
        // minute (one extra durable write per minute of upload), and at
        // least four times per TTL, so a short TTL never expires a session
        // that receives chunks.
        let every = (current.value.limits.session_ttl_secs / 4).min(60);
        let idle = (OffsetDateTime::now_utc() - current.value.updated_at).whole_seconds();
        if idle >= 0 && idle as u64 >= every {
            self.update(id, current, |_| Ok(())).await?;
        }
        Ok(PutOutcome::Stored { chunk: record })
    }

    /// A chunk for an already-recorded range: identical bytes are a no-op,
    /// other bytes a conflict. The body is only read (to compare) when no
    /// digest was declared.
    async fn retry_of(
        &self,
        existing: ChunkRecord,
        chunk: PutChunk,
        body: ByteStream,
    ) -> Result<PutOutcome> {
        let same = match chunk.sha256 {
            Some(d) => d == existing.sha256,
            None => {
                let (mut s, slot) = VerifyingStream::new(body, chunk.offset, chunk.length, None);
                while let Some(item) = s.next().await {
                    item?;
                }
                slot.get() == Some(existing.sha256)
            }
        };
        if same {
            Ok(PutOutcome::AlreadyStored { chunk: existing })
        } else {
            Err(Error::conflict(
                "RELAY_CHUNK_CONFLICT",
                format!(
                    "a different chunk is already stored at offset {}",
                    existing.offset
                ),
            ))
        }
    }

    /// Verify and validate a file whose chunks are all stored: the chunks
    /// must tile the file, every stored chunk must still hash to what was
    /// acknowledged, the whole file must match its declared SHA-256, the
    /// content must be valid DICOM of the session's study, and its SOP
    /// Instance UID must not stand for other content the gateway accepted
    /// before (see [`DuplicatePolicy`]).
    ///
    /// A file refused for its content (invalid DICOM, wrong study, a
    /// duplicate or conflicting instance, a whole-file digest mismatch) is
    /// removed from the session with its bytes, so the session stays open
    /// for its other files; the error is then [`Error::FileRefused`],
    /// carrying the UIDs that could be read.
    pub async fn complete_file(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
    ) -> Result<FileRecord> {
        let gate = self.gate(id);
        let guard = gate.rw.read().await;
        let current = self.load_owned(actor, id).await?;
        let mut ev = Self::event(
            actor,
            AuditAction::FileCompleted,
            AuditOutcome::Success,
            Some(id),
        );
        ev.file = Some(file);
        let (err, known) = match self.complete_file_inner(id, file, current).await {
            Ok(f) => {
                if let FileState::Valid { dicom } = &f.state {
                    ev.study = Some(dicom.study_instance_uid.clone());
                    ev.patient_id = Some(dicom.patient_id.clone());
                    ev.detail = format!(
                        "sop_instance_uid={} sha256={}",
                        dicom.sop_instance_uid,
                        f.sha256.map(|d| d.to_hex()).unwrap_or_default()
                    );
                    if !dicom.warnings.is_empty() {
                        ev.detail
                            .push_str(&format!(" warnings={}", dicom.warnings.join("; ")));
                    }
                }
                self.audit(ev).await?;
                return Ok(f);
            }
            Err(refusal) => refusal,
        };
        drop(guard);
        if !refuses_content(&err) {
            return self.refuse(ev, err).await;
        }
        // Content the gateway will never accept: the file goes, with its
        // bytes and any claim it holds.
        let uid = |v: &Option<String>| v.as_deref().and_then(|v| Uid::parse(v).ok());
        ev.study = uid(&known.study_instance_uid);
        ev.patient_id = known.patient_id.clone();
        let err = match self.drop_file(id, file, true).await {
            Ok(()) => Error::FileRefused {
                sop_class_uid: uid(&known.sop_class_uid),
                sop_instance_uid: uid(&known.sop_instance_uid),
                source: Box::new(err),
            },
            Err(e) => e,
        };
        self.refuse(ev, err).await
    }

    async fn complete_file_inner(
        &self,
        id: SessionId,
        file_id: FileId,
        current: Versioned<SessionRecord>,
    ) -> std::result::Result<FileRecord, (Error, Identified)> {
        let plain = |e: Error| (e, Identified::default());
        Self::require_open(&current.value).map_err(plain)?;
        let file = current
            .value
            .files
            .get(&file_id)
            .cloned()
            .ok_or_else(|| plain(Error::NotFound { what: "file" }))?;
        if matches!(file.state, FileState::Valid { .. }) {
            return Ok(file);
        }
        let chunks = self
            .inner
            .sessions
            .chunks(id, file_id)
            .await
            .map_err(plain)?;
        let mut missing = Vec::new();
        let mut pos = 0u64;
        for c in &chunks {
            if c.offset > pos {
                missing.push(format!("{}..{}", pos, c.offset));
            }
            pos = pos.max(c.end());
        }
        if pos < file.size {
            missing.push(format!("{}..{}", pos, file.size));
        }
        if !missing.is_empty() {
            let shown: Vec<_> = missing.iter().take(8).cloned().collect();
            return Err(plain(Error::invalid(
                "RELAY_FILE_INCOMPLETE",
                format!(
                    "{} byte range(s) not uploaded yet: {}",
                    missing.len(),
                    shown.join(", ")
                ),
            )));
        }
        let key = FileKey {
            session: id,
            file: file_id,
        };
        self.inner
            .chunks
            .seal_file(key, file.size, &chunks)
            .await
            .map_err(plain)?;
        let header_cap = self.inner.config.dicom.max_header_bytes.min(file.size);
        let back = self
            .read_back(key, file.size, &chunks, header_cap)
            .await
            .map_err(plain)?;
        if let Some(expected) = file.sha256
            && expected != back.sha256
        {
            return Err(plain(
                IntegrityError::FileHash {
                    expected: expected.to_hex(),
                    actual: back.sha256.to_hex(),
                }
                .into(),
            ));
        }
        let limits = self.inner.config.dicom.clone();
        let size = file.size;
        let prefix = back.prefix;
        let (validated, known) = tokio::task::spawn_blocking(move || {
            let validated = validate_dicom(&prefix, size, &limits);
            // On refusal, whatever identifies the file still goes back to
            // the client (STOW-RS references it in its failure).
            let known = match &validated {
                Ok(_) => Identified::default(),
                Err(_) => crate::dicom::identify(&prefix, size, &limits.prescan),
            };
            (validated, known)
        })
        .await
        .map_err(|e| {
            plain(Error::Dicom(crate::dicom::DicomError::Parser {
                message: format!("validator task failed: {e}"),
            }))
        })?;
        let mut dicom = match validated {
            Ok(d) => d,
            Err(e) => return Err((Error::Dicom(e), known)),
        };
        let refused = |e: Error, d: &DicomSummary| (e, Identified::from(d));
        let data_set_sha256 = back.data_set_sha256.ok_or_else(|| {
            refused(
                Error::Dicom(crate::dicom::DicomError::Malformed {
                    offset: 0,
                    reason: "the file meta group could not be delimited".into(),
                }),
                &dicom,
            )
        })?;
        let claimed = match self.claim(id, file_id, &dicom, data_set_sha256).await {
            Ok((claimed, warning)) => {
                dicom.warnings.extend(warning);
                claimed
            }
            Err(e) => return Err(refused(e, &dicom)),
        };
        let digest = back.sha256;
        let updated = self
            .update(id, current, |rec| {
                Self::require_open(rec)?;
                if let Some(study) = &rec.study_instance_uid
                    && *study != dicom.study_instance_uid
                    && !rec.allow_multiple_studies
                {
                    return Err(Error::StudyMismatch { expected: study.to_string(), actual: dicom.study_instance_uid.to_string() });
                }
                if rec.files.values().any(|f| {
                    f.id != file_id && matches!(&f.state, FileState::Valid { dicom: d } if d.sop_instance_uid == dicom.sop_instance_uid)
                }) {
                    return Err(Error::conflict(
                        "RELAY_DUPLICATE_INSTANCE",
                        format!("SOP Instance UID {} is already in this session", dicom.sop_instance_uid),
                    ));
                }
                if rec.study_instance_uid.is_none() {
                    rec.study_instance_uid = Some(dicom.study_instance_uid.clone());
                }
                let f = rec.files.get_mut(&file_id).ok_or(Error::NotFound { what: "file" })?;
                f.sha256 = Some(digest);
                f.data_set_sha256 = Some(data_set_sha256);
                f.state = FileState::Valid { dicom: dicom.clone() };
                Ok(())
            })
            .await;
        let (rec, ()) = match updated {
            Ok(v) => v,
            Err(e) => {
                if claimed {
                    // Best effort; a claim left behind by a file that is
                    // gone is recognised as stale by the next claimant.
                    if let Err(r) = self
                        .inner
                        .sessions
                        .release_instance(&dicom.sop_instance_uid, id, file_id)
                        .await
                    {
                        tracing::warn!(error = %r, "could not release an instance claim");
                    }
                }
                return Err(refused(e, &dicom));
            }
        };
        rec.files
            .get(&file_id)
            .cloned()
            .ok_or_else(|| plain(Error::NotFound { what: "file" }))
    }

    /// Claim the file's SOP Instance UID in the index of accepted
    /// instances. Returns whether this file holds the claim now, and a
    /// warning when the UID was accepted before with the same content (an
    /// idempotent success) or, by policy, with other content.
    async fn claim(
        &self,
        id: SessionId,
        file: FileId,
        dicom: &DicomSummary,
        data_set: Sha256Digest,
    ) -> Result<(bool, Option<String>)> {
        let sop = &dicom.sop_instance_uid;
        let mine = InstanceClaim::new(
            sop.clone(),
            data_set,
            dicom.study_instance_uid.clone(),
            id,
            file,
        );
        // A stale claim (its file is gone) is released and the claim
        // retried; a few rounds bound a pathological race.
        for _ in 0..4 {
            let held = self.inner.sessions.claim_instance(&mine).await?;
            if held.held_by(id, file) {
                return Ok((true, None));
            }
            if held.data_set_sha256 == data_set {
                return Ok((
                    false,
                    Some(format!(
                        "SOP Instance UID {sop} was accepted before with the same content \
                         (study {})",
                        held.study_instance_uid
                    )),
                ));
            }
            if self.claim_is_stale(&held).await? {
                self.inner
                    .sessions
                    .release_instance(sop, held.session, held.file)
                    .await?;
                continue;
            }
            return match self.inner.config.duplicates {
                DuplicatePolicy::Refuse => Err(Error::conflict(
                    "RELAY_INSTANCE_CONFLICT",
                    format!(
                        "SOP Instance UID {sop} was already accepted with other content \
                         (study {})",
                        held.study_instance_uid
                    ),
                )),
                DuplicatePolicy::Accept => Ok((
                    false,
                    Some(format!(
                        "SOP Instance UID {sop} was accepted before with other content \
                         (study {}); accepted by policy",
                        held.study_instance_uid
                    )),
                )),
            };
        }
        Err(Error::Busy {
            what: format!("the index entry of SOP Instance UID {sop}"),
        })
    }

    /// Whether a claim's file no longer exists (removed, session gone).
    async fn claim_is_stale(&self, claim: &InstanceClaim) -> Result<bool> {
        match self.inner.sessions.load_session(claim.session).await {
            Ok(v) => Ok(!v.value.files.contains_key(&claim.file)),
            Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Release the index claims of `rec`'s valid files (all, or one).
    async fn release_claims(&self, rec: &SessionRecord, only: Option<FileId>) -> Result<()> {
        for f in rec.files.values() {
            if only.is_some_and(|o| o != f.id) {
                continue;
            }
            if let FileState::Valid { dicom } = &f.state {
                self.inner
                    .sessions
                    .release_instance(&dicom.sop_instance_uid, rec.id, f.id)
                    .await?;
            }
        }
        Ok(())
    }

    /// Remove a file of an open session: its record, chunk records, bytes
    /// and index claim. With `refused`, only a file not (yet) valid is
    /// removed (a concurrent completion may have validated it).
    async fn drop_file(&self, id: SessionId, file: FileId, refused: bool) -> Result<()> {
        let gate = self.gate(id);
        let _g = gate.rw.write().await;
        let current = self.inner.sessions.load_session(id).await?;
        Self::require_open(&current.value)?;
        let Some(f) = current.value.files.get(&file) else {
            return if refused {
                Ok(())
            } else {
                Err(Error::NotFound { what: "file" })
            };
        };
        if refused && matches!(f.state, FileState::Valid { .. }) {
            return Ok(());
        }
        let sop: Option<Uid> = match &f.state {
            FileState::Valid { dicom } => Some(dicom.sop_instance_uid.clone()),
            FileState::Uploading => None,
        };
        self.update(id, current, |rec| {
            rec.files.remove(&file);
            if rec
                .files
                .values()
                .all(|f| matches!(f.state, FileState::Uploading))
            {
                rec.study_instance_uid = None;
            }
            Ok(())
        })
        .await?;
        self.inner.sessions.delete_chunks(id, file).await?;
        self.inner
            .chunks
            .delete_file(FileKey { session: id, file })
            .await?;
        if let Some(sop) = sop {
            self.inner.sessions.release_instance(&sop, id, file).await?;
        }
        Ok(())
    }

    /// Stream a stored file back, checking every chunk against its recorded
    /// digest and computing the whole-file digest, keeping the first
    /// `header_cap` bytes.
    async fn read_back(
        &self,
        key: FileKey,
        size: u64,
        chunks: &[ChunkRecord],
        header_cap: u64,
    ) -> Result<ReadBack> {
        let mut stream = self.inner.chunks.read(key, 0..size).await?;
        // Two hashers on two blocking threads (one per core): one checks
        // each chunk against its recorded digest, the other computes the
        // whole-file digest. Buffers are shared (`Bytes` clones), and the
        // channels are small, so memory stays at a few buffers.
        let (tx_parts, mut rx_parts) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let (tx_whole, mut rx_whole) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let bounds: Vec<(u64, u64, Sha256Digest)> = chunks
            .iter()
            .map(|c| (c.offset, c.end(), c.sha256))
            .collect();
        let parts = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut idx = 0usize;
            let mut part = Sha256::new();
            let mut pos = 0u64;
            while let Some(mut buf) = rx_parts.blocking_recv() {
                while !buf.is_empty() {
                    let Some(&(start, end, expect)) = bounds.get(idx) else {
                        return Err(IntegrityError::StoredSize {
                            expected: size,
                            actual: pos + buf.len() as u64,
                        }
                        .into());
                    };
                    let n = usize::try_from((end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
                    part.update(&buf[..n]);
                    pos += n as u64;
                    buf = buf.slice(n..);
                    if pos == end {
                        let got = Sha256Digest(std::mem::take(&mut part).finalize().into());
                        if got != expect {
                            return Err(IntegrityError::StoredChunkCorrupt {
                                offset: start,
                                expected: expect.to_hex(),
                                actual: got.to_hex(),
                            }
                            .into());
                        }
                        idx += 1;
                    }
                }
            }
            if pos != size {
                return Err(IntegrityError::StoredSize {
                    expected: size,
                    actual: pos,
                }
                .into());
            }
            Ok(())
        });
        // A third for the digest of the data set after the meta group (the
        // index of accepted instances and content verification compare it).
        let (tx_set, mut rx_set) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let meta_cap = usize::try_from(header_cap).unwrap_or(usize::MAX);
        let data_set = tokio::task::spawn_blocking(move || {
            let mut h = Part10Hasher::data_set_only(meta_cap);
            while let Some(buf) = rx_set.blocking_recv() {
                h.update(&buf);
            }
            h.finish().data_set
        });
        let whole = tokio::task::spawn_blocking(move || -> ReadBack {
            let mut whole = Sha256::new();
            let mut prefix = Vec::with_capacity(usize::try_from(header_cap).unwrap_or(0));
            while let Some(buf) = rx_whole.blocking_recv() {
                whole.update(&buf);
                if (prefix.len() as u64) < header_cap {
                    let take =
                        usize::try_from((header_cap - prefix.len() as u64).min(buf.len() as u64))
                            .unwrap_or(0);
                    prefix.extend_from_slice(&buf[..take]);
                }
            }
            ReadBack {
                prefix,
                sha256: Sha256Digest(whole.finalize().into()),
                data_set_sha256: None,
            }
        });
        let mut read_err = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => {
                    // A send fails only if the chunk checker stopped early
                    // with an error; that error is reported below.
                    if tx_parts.send(b.clone()).await.is_err()
                        || tx_set.send(b.clone()).await.is_err()
                        || tx_whole.send(b).await.is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    read_err = Some(e);
                    break;
                }
            }
        }
        drop((tx_parts, tx_whole, tx_set));
        let join = |e: tokio::task::JoinError| {
            Error::storage(
                crate::error::StorageErrorKind::Io,
                "verify stored file",
                e.to_string(),
            )
        };
        let parts = parts.await.map_err(join)?;
        let mut whole = whole.await.map_err(join)?;
        whole.data_set_sha256 = data_set.await.map_err(join)?;
        if let Some(e) = read_err {
            return Err(e);
        }
        parts?;
        Ok(whole)
    }

    /// Put the session in the outbox: every file must be validated. The
    /// one compare-and-set that records "completed" also records the
    /// outbox entry (a transactional outbox), so an acknowledged study is
    /// never left without a pending delivery, whatever crashes after. The
    /// delivery worker ([`Outbox`](crate::outbox::Outbox)) does the rest;
    /// completing a session already in the outbox is a no-op.
    pub async fn complete_session(&self, actor: &Actor, id: SessionId) -> Result<SessionRecord> {
        let gate = self.gate(id);
        let guard = gate.rw.read().await;
        let current = self.load_owned(actor, id).await?;
        if current.value.state == SessionState::Forwarding {
            return Ok(current.value);
        }
        if current.value.state == SessionState::Open && current.value.files.is_empty() {
            drop(guard);
            return self.end_empty(actor, id).await;
        }
        let mut ev = Self::event(
            actor,
            AuditAction::ForwardStarted,
            AuditOutcome::Success,
            Some(id),
        );
        ev.study = current.value.study_instance_uid.clone();
        let now = OffsetDateTime::now_utc();
        let (rec, ()) = match self
            .update(id, current, |rec| {
                match &rec.state {
                    SessionState::Open => {}
                    SessionState::Forwarding => return Ok(()),
                    SessionState::Delivered { .. } => {
                        return Err(Error::conflict(
                            "RELAY_SESSION_DELIVERED",
                            "the session was already delivered",
                        ));
                    }
                    SessionState::DeadLetter { .. } => {
                        return Err(Error::conflict(
                            "RELAY_SESSION_DEAD_LETTER",
                            "delivery failed permanently; an administrator must replay it",
                        ));
                    }
                }
                if rec.files.is_empty() {
                    return Err(Error::invalid(
                        "RELAY_SESSION_EMPTY",
                        "the session has no files",
                    ));
                }
                let pending = rec
                    .files
                    .values()
                    .filter(|f| !matches!(f.state, FileState::Valid { .. }))
                    .count();
                if pending > 0 {
                    return Err(Error::invalid(
                        "RELAY_FILES_INCOMPLETE",
                        format!("{pending} file(s) are not complete"),
                    ));
                }
                rec.state = SessionState::Forwarding;
                rec.delivery = crate::model::Delivery {
                    queued_at: Some(now),
                    next_attempt_at: Some(now),
                    ..Default::default()
                };
                Ok(())
            })
            .await
        {
            Ok(v) => v,
            Err(e) => return self.refuse(ev, e).await,
        };
        ev.detail = format!("queued instances={}", rec.files.len());
        self.audit(ev).await?;
        self.wake_outbox(id);
        Ok(rec)
    }

    /// Completing a session with no file (every one was refused, or none
    /// was sent) ends it: nothing can be delivered, so it is removed
    /// rather than left open until it expires. Always an error (422).
    async fn end_empty(&self, actor: &Actor, id: SessionId) -> Result<SessionRecord> {
        let gate = self.gate(id);
        let _g = gate.rw.write().await;
        let mut ev = Self::event(
            actor,
            AuditAction::SessionAborted,
            AuditOutcome::Success,
            Some(id),
        );
        let current = self.load_owned(actor, id).await?;
        if current.value.state != SessionState::Open || !current.value.files.is_empty() {
            return Err(Error::Busy {
                what: "the session changed while it was being completed".into(),
            });
        }
        self.inner
            .sessions
            .delete_session(id, current.version)
            .await?;
        self.inner.chunks.delete_session(id).await?;
        ev.detail = "completed with no valid file: session ended".into();
        self.audit(ev).await?;
        drop(_g);
        self.forget_gate(id);
        Err(Error::invalid(
            "RELAY_SESSION_EMPTY",
            "the session has no valid file; it has been ended",
        ))
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

    /// The session as its owner (or an admin) sees it. Audited as data access.
    pub async fn session(&self, actor: &Actor, id: SessionId) -> Result<SessionRecord> {
        let v = self.load_owned(actor, id).await?;
        let mut ev = Self::event(
            actor,
            AuditAction::DataAccessed,
            AuditOutcome::Success,
            Some(id),
        );
        ev.study = v.value.study_instance_uid.clone();
        self.audit(ev).await?;
        Ok(v.value)
    }

    /// A file's record, its stored chunks and when its session expires, for
    /// resuming clients. Not audited: it reveals sizes and offsets only.
    pub async fn file_status(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
    ) -> Result<FileStatus> {
        let v = self.load_owned(actor, id).await?;
        let f = v
            .value
            .files
            .get(&file)
            .cloned()
            .ok_or(Error::NotFound { what: "file" })?;
        let chunks = self.inner.sessions.chunks(id, file).await?;
        let ttl = time::Duration::seconds(
            i64::try_from(v.value.limits.session_ttl_secs).unwrap_or(i64::MAX),
        );
        Ok(FileStatus {
            offset: contiguous_end(&chunks),
            file: f,
            chunks,
            expires_at: v.value.updated_at.saturating_add(ttl),
            session_state: v.value.state,
        })
    }

    /// The stored chunks of a file (for resuming clients).
    pub async fn file_chunks(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
    ) -> Result<Vec<ChunkRecord>> {
        let v = self.load_owned(actor, id).await?;
        if !v.value.files.contains_key(&file) {
            return Err(Error::NotFound { what: "file" });
        }
        self.inner.sessions.chunks(id, file).await
    }

    /// Read a completed (validated) file of a session. Audited as data access.
    pub async fn read_file(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
    ) -> Result<ByteStream> {
        let v = self.load_owned(actor, id).await?;
        let f = v
            .value
            .files
            .get(&file)
            .ok_or(Error::NotFound { what: "file" })?;
        if !matches!(f.state, FileState::Valid { .. }) {
            return Err(Error::conflict(
                "RELAY_FILE_NOT_COMPLETE",
                "the file is not complete",
            ));
        }
        let mut ev = Self::event(
            actor,
            AuditAction::DataAccessed,
            AuditOutcome::Success,
            Some(id),
        );
        ev.file = Some(file);
        ev.study = v.value.study_instance_uid.clone();
        self.audit(ev).await?;
        self.inner
            .chunks
            .read(FileKey { session: id, file }, 0..f.size)
            .await
    }

    /// Remove a file from an open session (its bytes, chunk records and
    /// index claim).
    pub async fn remove_file(&self, actor: &Actor, id: SessionId, file: FileId) -> Result<()> {
        let rec = self.load_owned(actor, id).await?;
        let mut ev = Self::event(
            actor,
            AuditAction::FileRemoved,
            AuditOutcome::Success,
            Some(id),
        );
        ev.study = rec.value.study_instance_uid.clone();
        ev.file = Some(file);
        match self.drop_file(id, file, false).await {
            Ok(()) => self.audit(ev).await,
            Err(e) => self.refuse(ev, e).await,
        }
    }

    /// Abort a session: delete its bytes and state. Waits for requests in flight.
    pub async fn abort_session(&self, actor: &Actor, id: SessionId) -> Result<()> {
        let gate = self.gate(id);
        let _g = gate.rw.write().await;
        let current = self.load_owned(actor, id).await?;
        let ev = Self::event(
            actor,
            AuditAction::SessionAborted,
            AuditOutcome::Success,
            Some(id),
        );
        let res = async {
            self.inner
                .sessions
                .delete_session(id, current.version)
                .await?;
            self.inner.chunks.delete_session(id).await?;
            // An acknowledged study keeps its claims: the gateway accepted
            // those instances whatever happens to the session record.
            if current.value.state == SessionState::Open {
                self.release_claims(&current.value, None).await?;
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                self.forget_gate(id);
                self.audit(ev).await
            }
            Err(e) => self.refuse(ev, e).await,
        }
    }

    /// Remove sessions inactive for longer than their TTL at `now`. A session
    /// with a request in flight is skipped (its gate is busy), and the
    /// inactivity is re-checked under the exclusive gate, so an upload that
    /// touched the session in between is never removed. Only open sessions
    /// expire: a study the gateway acknowledged (in the outbox, delivered or
    /// in dead letters) is never removed by time alone.
    pub async fn expire_sessions(&self, now: OffsetDateTime) -> Result<Vec<SessionId>> {
        let mut removed = Vec::new();
        for id in self.inner.sessions.list_sessions().await? {
            let gate = self.gate(id);
            let Ok(_g) = gate.rw.try_write() else {
                continue;
            };
            let current = match self.inner.sessions.load_session(id).await {
                Ok(v) => v,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let rec = &current.value;
            let idle = (now - rec.updated_at).whole_seconds();
            let expired = idle >= 0 && idle as u64 > rec.limits.session_ttl_secs;
            if !expired || rec.state != SessionState::Open {
                continue;
            }
            match self
                .inner
                .sessions
                .delete_session(id, current.version)
                .await
            {
                Ok(()) => {}
                Err(Error::Precondition { .. }) | Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
            self.inner.chunks.delete_session(id).await?;
            self.release_claims(rec, None).await?;
            let mut ev = Self::event(
                &Actor::system(),
                AuditAction::SessionExpired,
                AuditOutcome::Success,
                Some(id),
            );
            ev.study = rec.study_instance_uid.clone();
            ev.detail = format!("idle_secs={idle}");
            self.audit(ev).await?;
            removed.push(id);
            drop(_g);
            self.forget_gate(id);
        }
        Ok(removed)
    }
}

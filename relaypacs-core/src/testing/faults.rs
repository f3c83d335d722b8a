//! Reusable fault decorators: wrap any implementation of a core trait and
//! make chosen calls fail, the way a failing disk, a full volume or a
//! refusing PACS would, while counting what the wrapped store was asked.
//!
//! A [`FaultPlan`] says which operations it watches, which watched call
//! fails (the k-th, or every one until healed) and how ([`Fault`]). One
//! plan may be shared by several decorators, so "the 7th storage call of
//! an upload" counts chunk-store and session-store calls together.
//!
//! ```text
//! use relaypacs_core::testing::faults::{Fault, FaultPlan, FaultyChunkStore, Op};
//! // The 3rd put_chunk fails with EIO; every other call goes through.
//! let plan = FaultPlan::watching([Op::PutChunk]);
//! plan.fail_nth(3, Fault::Io);
//! let store = FaultyChunkStore::new(Arc::new(LocalChunkStore::open(dir)?), plan.clone());
//! ```
//!
//! [`FaultyPacsSink`] also refuses chosen SOP Instance UIDs (transiently or
//! permanently, once or until cleared), records every instance it was
//! handed, can stall a call forever (a worker that hangs) and can degrade
//! its verification to presence-only.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;

use crate::audit::{AuditEvent, AuditSink};
use crate::chunk_store::{ChunkPlacement, ChunkStore, FileKey, Syncing};
use crate::digest::ByteStream;
use crate::error::{Error, Result, StorageErrorKind};
use crate::ids::{FileId, SessionId, Uid};
use crate::model::{ChunkRecord, SessionRecord, Versioned};
use crate::pacs_sink::{
    DeliveryReport, Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Verification,
};
use crate::session_store::{ChunkInsert, FileScope, InstanceClaim, SessionStore};

/// One operation of a core trait, as a [`FaultPlan`] names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Op {
    /// [`ChunkStore::create_file`].
    CreateFile,
    /// [`ChunkStore::put_chunk`].
    PutChunk,
    /// The sync of [`ChunkStore::put_file_syncing`] (counted when the
    /// file is written, failing when it is awaited).
    SyncFile,
    /// [`ChunkStore::seal_file`].
    SealFile,
    /// [`ChunkStore::read`].
    ReadFile,
    /// [`ChunkStore::delete_file`].
    DeleteFile,
    /// [`ChunkStore::delete_session`].
    DeleteSessionFiles,
    /// [`SessionStore::create_session`].
    CreateSession,
    /// [`SessionStore::load_session`].
    LoadSession,
    /// [`SessionStore::update_session`].
    UpdateSession,
    /// [`SessionStore::delete_session`].
    DeleteSession,
    /// [`SessionStore::list_sessions`].
    ListSessions,
    /// [`SessionStore::record_chunk`].
    RecordChunk,
    /// [`SessionStore::chunks`].
    Chunks,
    /// [`SessionStore::delete_chunks`].
    DeleteChunks,
    /// [`SessionStore::claim_instance`].
    ClaimInstance,
    /// [`SessionStore::instance_claim`].
    InstanceClaim,
    /// [`SessionStore::release_instance`].
    ReleaseInstance,
    /// [`PacsSink::deliver`].
    Deliver,
    /// [`PacsSink::verify`].
    Verify,
    /// [`AuditSink::record`].
    Record,
    /// [`AuditSink::events`].
    Events,
}

impl Op {
    /// Every operation of [`ChunkStore`].
    pub const CHUNK_STORE: [Op; 7] = [
        Op::CreateFile,
        Op::PutChunk,
        Op::SyncFile,
        Op::SealFile,
        Op::ReadFile,
        Op::DeleteFile,
        Op::DeleteSessionFiles,
    ];

    /// Every operation of [`SessionStore`].
    pub const SESSION_STORE: [Op; 11] = [
        Op::CreateSession,
        Op::LoadSession,
        Op::UpdateSession,
        Op::DeleteSession,
        Op::ListSessions,
        Op::RecordChunk,
        Op::Chunks,
        Op::DeleteChunks,
        Op::ClaimInstance,
        Op::InstanceClaim,
        Op::ReleaseInstance,
    ];

    /// What the operation does, as an injected error names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::CreateFile => "create file",
            Op::PutChunk => "write chunk",
            Op::SyncFile => "sync file",
            Op::SealFile => "seal file",
            Op::ReadFile => "read file",
            Op::DeleteFile => "delete file",
            Op::DeleteSessionFiles => "delete session files",
            Op::CreateSession => "create session",
            Op::LoadSession => "load session",
            Op::UpdateSession => "update session",
            Op::DeleteSession => "delete session",
            Op::ListSessions => "list sessions",
            Op::RecordChunk => "record chunk",
            Op::Chunks => "list chunks",
            Op::DeleteChunks => "delete chunks",
            Op::ClaimInstance => "claim instance",
            Op::InstanceClaim => "look up instance claim",
            Op::ReleaseInstance => "release instance",
            Op::Deliver => "deliver",
            Op::Verify => "verify",
            Op::Record => "append audit record",
            Op::Events => "read audit trail",
        }
    }
}

/// What a failing call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// An I/O error (EIO): [`Error::Storage`] of kind `Io`, retryable. A
    /// `put_chunk` first takes the first piece of its body, as a failing
    /// disk does, and never reaches the wrapped store.
    Io,
    /// No space left (ENOSPC): [`Error::Storage`] of kind `Full`.
    Full,
    /// The backend is unreachable: [`Error::Storage`] of kind `Unavailable`.
    Unavailable,
    /// A short write: `put_chunk` hands the wrapped store the first half
    /// of its body, then an EIO in the stream, so the store sees a write
    /// that fails midway; `create_file` fails with EIO; calls that write
    /// no bytes go through unharmed (they are still counted).
    ShortWrite,
    /// `put_chunk` hands the wrapped store the first `n` bytes of its body,
    /// then an EIO in the stream; any other call fails with EIO.
    CutAfter(u64),
    /// A PACS failure a retry may fix: [`Error::Pacs`] with `transient`.
    PacsTransient,
    /// A PACS refusal: [`Error::Pacs`] without `transient`.
    PacsPermanent,
}

/// When the plan's faults strike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Never,
    Nth(u64, Fault),
    Always(Fault),
}

/// Which calls fail and how, shared by any number of decorators; counts
/// every call that passes through them.
#[derive(Debug)]
pub struct FaultPlan {
    watched: HashSet<Op>,
    trigger: Mutex<Trigger>,
    watched_calls: AtomicU64,
    per_op: Mutex<HashMap<Op, u64>>,
}

/// What a decorator does with one call.
enum Verdict {
    Pass,
    Fail(Fault),
}

impl FaultPlan {
    /// A plan watching `ops`: only their calls are counted by
    /// [`calls`](Self::calls) and can fail. Nothing fails until
    /// [`fail_nth`](Self::fail_nth) or [`fail_always`](Self::fail_always).
    pub fn watching(ops: impl IntoIterator<Item = Op>) -> Arc<Self> {
        Arc::new(Self {
            watched: ops.into_iter().collect(),
            trigger: Mutex::new(Trigger::Never),
            watched_calls: AtomicU64::new(0),
            per_op: Mutex::default(),
        })
    }

    /// A plan that never fails and only counts ([`calls_of`](Self::calls_of)).
    pub fn counting() -> Arc<Self> {
        Self::watching([])
    }

    /// The `k`-th watched call, counted from the plan's creation (1 is the
    /// first), fails with `fault`; `k = 0` or a `k` already passed never
    /// strikes.
    pub fn fail_nth(&self, k: u64, fault: Fault) {
        *self.lock_trigger() = Trigger::Nth(k, fault);
    }

    /// Every watched call fails with `fault` until [`heal`](Self::heal).
    pub fn fail_always(&self, fault: Fault) {
        *self.lock_trigger() = Trigger::Always(fault);
    }

    /// No call fails from now on.
    pub fn heal(&self) {
        *self.lock_trigger() = Trigger::Never;
    }

    /// Watched calls so far.
    pub fn calls(&self) -> u64 {
        self.watched_calls.load(Ordering::SeqCst)
    }

    /// Calls of `op` so far through the decorators of this plan, watched
    /// or not.
    pub fn calls_of(&self, op: Op) -> u64 {
        self.per_op
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    fn lock_trigger(&self) -> std::sync::MutexGuard<'_, Trigger> {
        self.trigger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a call of `op` and decide its fate.
    fn hit(&self, op: Op) -> Verdict {
        *self
            .per_op
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op)
            .or_default() += 1;
        if !self.watched.contains(&op) {
            return Verdict::Pass;
        }
        let n = self.watched_calls.fetch_add(1, Ordering::SeqCst) + 1;
        match *self.lock_trigger() {
            Trigger::Never => Verdict::Pass,
            Trigger::Nth(k, fault) if k == n => Verdict::Fail(fault),
            Trigger::Nth(..) => Verdict::Pass,
            Trigger::Always(fault) => Verdict::Fail(fault),
        }
    }

    /// The error of `fault` for a call of `op` that carries no body, or
    /// `None` when the fault spares such calls.
    fn error(fault: Fault, op: Op) -> Option<Error> {
        let os = |code| Error::io(op.as_str(), std::io::Error::from_raw_os_error(code));
        let reason = || format!("injected fault during {}", op.as_str());
        match fault {
            Fault::Io | Fault::CutAfter(_) => Some(os(5)),
            Fault::Full => Some(os(28)),
            Fault::Unavailable => Some(Error::storage(
                StorageErrorKind::Unavailable,
                op.as_str(),
                reason(),
            )),
            Fault::ShortWrite => (op == Op::CreateFile).then(|| os(5)),
            Fault::PacsTransient => Some(Error::pacs_transient(reason(), None)),
            Fault::PacsPermanent => Some(Error::pacs_permanent(reason(), None)),
        }
    }

    /// Count a call of `op` that carries no body; `Err` if it must fail.
    fn check(&self, op: Op) -> Result<()> {
        match self.hit(op) {
            Verdict::Fail(fault) => Self::error(fault, op).map_or(Ok(()), Err),
            Verdict::Pass => Ok(()),
        }
    }
}

/// `body` cut after `n` bytes, then an EIO.
fn cut(body: ByteStream, n: u64) -> ByteStream {
    let mut left = n;
    let head = body
        .take_while(move |item| {
            let keep = left > 0;
            if let Ok(b) = item {
                left = left.saturating_sub(b.len() as u64);
            }
            futures::future::ready(keep)
        })
        .chain(futures::stream::once(async {
            Err(Error::io(
                Op::PutChunk.as_str(),
                std::io::Error::from_raw_os_error(5),
            ))
        }));
    Box::pin(head)
}

/// A [`ChunkStore`] whose calls fail as its [`FaultPlan`] says.
#[derive(Debug)]
pub struct FaultyChunkStore<T: ?Sized> {
    inner: Arc<T>,
    plan: Arc<FaultPlan>,
}

impl<T: ?Sized> FaultyChunkStore<T> {
    /// Wrap `inner`, failing calls as `plan` says.
    pub fn new(inner: Arc<T>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<T> {
        &self.inner
    }
}

impl<T: fmt::Display + ?Sized> fmt::Display for FaultyChunkStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

#[async_trait]
impl<T: ChunkStore + ?Sized> ChunkStore for FaultyChunkStore<T> {
    async fn create_file(&self, key: FileKey, size: u64) -> Result<()> {
        self.plan.check(Op::CreateFile)?;
        self.inner.create_file(key, size).await
    }

    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        body: ByteStream,
    ) -> Result<String> {
        let body = match self.plan.hit(Op::PutChunk) {
            Verdict::Pass => body,
            Verdict::Fail(Fault::ShortWrite) => cut(body, placement.length / 2),
            Verdict::Fail(Fault::CutAfter(n)) => cut(body, n),
            Verdict::Fail(Fault::Io) => {
                let mut body = body;
                let _ = body.next().await;
                return Err(Error::io(
                    Op::PutChunk.as_str(),
                    std::io::Error::from_raw_os_error(5),
                ));
            }
            Verdict::Fail(fault) => match FaultPlan::error(fault, Op::PutChunk) {
                Some(e) => return Err(e),
                None => body,
            },
        };
        self.inner.put_chunk(key, placement, body).await
    }

    /// The default's `put_file` (its calls failing as planned), then the
    /// sync, failing as planned when awaited.
    async fn put_file_syncing(
        &self,
        key: FileKey,
        size: u64,
        body: ByteStream,
    ) -> Result<(String, Syncing)> {
        let receipt = self.put_file(key, size, body).await?;
        let synced = self.plan.check(Op::SyncFile);
        Ok((receipt, Box::pin(futures::future::ready(synced))))
    }

    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
        self.plan.check(Op::SealFile)?;
        self.inner.seal_file(key, size, chunks).await
    }

    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
        self.plan.check(Op::ReadFile)?;
        self.inner.read(key, range).await
    }

    async fn delete_file(&self, key: FileKey) -> Result<()> {
        self.plan.check(Op::DeleteFile)?;
        self.inner.delete_file(key).await
    }

    async fn delete_session(&self, session: SessionId) -> Result<()> {
        self.plan.check(Op::DeleteSessionFiles)?;
        self.inner.delete_session(session).await
    }
}

/// A [`SessionStore`] whose calls fail as its [`FaultPlan`] says.
#[derive(Debug)]
pub struct FaultySessionStore<T: ?Sized> {
    inner: Arc<T>,
    plan: Arc<FaultPlan>,
}

impl<T: ?Sized> FaultySessionStore<T> {
    /// Wrap `inner`, failing calls as `plan` says.
    pub fn new(inner: Arc<T>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<T> {
        &self.inner
    }
}

impl<T: fmt::Display + ?Sized> fmt::Display for FaultySessionStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

#[async_trait]
impl<T: SessionStore + ?Sized> SessionStore for FaultySessionStore<T> {
    async fn create_session(&self, session: &SessionRecord) -> Result<Versioned<SessionRecord>> {
        self.plan.check(Op::CreateSession)?;
        self.inner.create_session(session).await
    }

    // A capped creation is a creation for the fault plan.
    async fn create_session_capped(
        &self,
        session: &SessionRecord,
        cap: u32,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        self.plan.check(Op::CreateSession)?;
        self.inner.create_session_capped(session, cap).await
    }

    async fn create_session_capped_audited(
        &self,
        session: &SessionRecord,
        cap: u32,
        event: &crate::AuditEvent,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        self.plan.check(Op::CreateSession)?;
        self.inner
            .create_session_capped_audited(session, cap, event)
            .await
    }

    async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>> {
        self.plan.check(Op::LoadSession)?;
        self.inner.load_session(id).await
    }

    async fn update_session(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
        self.plan.check(Op::UpdateSession)?;
        self.inner.update_session(session, expected).await
    }

    async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()> {
        self.plan.check(Op::DeleteSession)?;
        self.inner.delete_session(id, expected).await
    }

    async fn list_sessions(&self) -> Result<Vec<SessionId>> {
        self.plan.check(Op::ListSessions)?;
        self.inner.list_sessions().await
    }

    // A file-scoped load or update is a load or update of the session for
    // the fault plan: the same failure points, whichever way the pipeline
    // reads or writes.
    async fn load_file_scope(&self, id: SessionId, file: Option<FileId>) -> Result<FileScope> {
        self.plan.check(Op::LoadSession)?;
        self.inner.load_file_scope(id, file).await
    }

    async fn update_file_scope(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
        self.plan.check(Op::UpdateSession)?;
        self.inner.update_file_scope(session, expected).await
    }

    async fn update_file_scope_capped(
        &self,
        session: &SessionRecord,
        expected: u64,
        cap: u32,
    ) -> Result<Option<u64>> {
        self.plan.check(Op::UpdateSession)?;
        self.inner
            .update_file_scope_capped(session, expected, cap)
            .await
    }

    async fn files_with_instance(
        &self,
        id: SessionId,
        sop_instance_uid: &Uid,
    ) -> Result<Vec<FileId>> {
        self.plan.check(Op::LoadSession)?;
        self.inner.files_with_instance(id, sop_instance_uid).await
    }

    async fn has_valid_file_except(&self, id: SessionId, except: FileId) -> Result<bool> {
        self.plan.check(Op::LoadSession)?;
        self.inner.has_valid_file_except(id, except).await
    }

    async fn remove_file_scoped(
        &self,
        session: &SessionRecord,
        expected: u64,
        file: FileId,
        facts: &[crate::analytics::UploadFact],
    ) -> Result<u64> {
        self.plan.check(Op::UpdateSession)?;
        self.inner
            .remove_file_scoped(session, expected, file, facts)
            .await
    }

    async fn list_files(
        &self,
        id: SessionId,
        after: Option<FileId>,
        limit: usize,
    ) -> Result<Vec<crate::model::FileRecord>> {
        self.plan.check(Op::LoadSession)?;
        self.inner.list_files(id, after, limit).await
    }

    // Reservations are not a failure point of their own: a reservation
    // that fails answers busy before any byte is written.
    async fn reserve_range(
        &self,
        id: SessionId,
        file: FileId,
        range: Range<u64>,
        holder: &str,
        until: time::OffsetDateTime,
    ) -> Result<()> {
        self.inner
            .reserve_range(id, file, range, holder, until)
            .await
    }

    async fn release_range(
        &self,
        id: SessionId,
        file: FileId,
        range: Range<u64>,
        holder: &str,
    ) -> Result<()> {
        self.inner.release_range(id, file, range, holder).await
    }

    // Analytics facts are not among the plan's failure points: forwarded.
    // The `…_with_facts` writes are not forwarded: the trait's defaults
    // record the facts, then make the update or delete the plan can fail
    // (conformance case `writes_with_facts` runs them this way).
    async fn record_upload_fact(&self, fact: &crate::analytics::UploadFact) -> Result<()> {
        self.inner.record_upload_fact(fact).await
    }

    async fn count_upload_facts(
        &self,
        filter: &crate::analytics::AnalyticsFilter,
        group: crate::analytics::Grouping,
    ) -> Result<Vec<crate::analytics::FactCount>> {
        self.inner.count_upload_facts(filter, group).await
    }

    async fn delivery_durations(
        &self,
        filter: &crate::analytics::AnalyticsFilter,
        group: crate::analytics::Grouping,
        limit: usize,
    ) -> Result<crate::analytics::GroupDurations> {
        self.inner.delivery_durations(filter, group, limit).await
    }

    fn instance_key(&self) -> Option<i64> {
        self.inner.instance_key()
    }

    async fn instance_alive(&self, key: i64) -> Result<bool> {
        self.inner.instance_alive(key).await
    }

    async fn record_chunk(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
    ) -> Result<ChunkInsert> {
        self.plan.check(Op::RecordChunk)?;
        self.inner.record_chunk(id, file, chunk).await
    }

    // The writes that carry their audit records are the same failure
    // points as the plain ones (a failure writes neither the state nor the
    // records), so the joint path of a store with a trail is tested too.
    fn audit_trail_key(&self) -> Option<i64> {
        self.inner.audit_trail_key()
    }

    async fn record_chunk_audited(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
        event: &crate::AuditEvent,
    ) -> Result<ChunkInsert> {
        self.plan.check(Op::RecordChunk)?;
        self.inner
            .record_chunk_audited(id, file, chunk, event)
            .await
    }

    async fn update_file_scope_audited(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        events: &[crate::AuditEvent],
    ) -> Result<crate::session_store::ClaimedWrite> {
        if claim.is_some() {
            self.plan.check(Op::ClaimInstance)?;
        }
        self.plan.check(Op::UpdateSession)?;
        self.inner
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
    ) -> Result<Option<crate::session_store::ClaimedWrite>> {
        self.plan.check(Op::CreateSession)?;
        if claim.is_some() {
            self.plan.check(Op::ClaimInstance)?;
        }
        self.plan.check(Op::UpdateSession)?;
        self.inner
            .create_session_with_file_audited(session, cap, chunks, claim, events)
            .await
    }

    async fn update_file_scope_with_facts_audited(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[crate::analytics::UploadFact],
        events: &[crate::AuditEvent],
    ) -> Result<u64> {
        self.plan.check(Op::UpdateSession)?;
        self.inner
            .update_file_scope_with_facts_audited(session, expected, facts, events)
            .await
    }

    async fn chunks(&self, id: SessionId, file: FileId) -> Result<Vec<ChunkRecord>> {
        self.plan.check(Op::Chunks)?;
        self.inner.chunks(id, file).await
    }

    async fn delete_chunks(&self, id: SessionId, file: FileId) -> Result<()> {
        self.plan.check(Op::DeleteChunks)?;
        self.inner.delete_chunks(id, file).await
    }

    async fn claim_instance(&self, claim: &InstanceClaim) -> Result<InstanceClaim> {
        self.plan.check(Op::ClaimInstance)?;
        self.inner.claim_instance(claim).await
    }

    async fn instance_claim(&self, sop_instance_uid: &Uid) -> Result<Option<InstanceClaim>> {
        self.plan.check(Op::InstanceClaim)?;
        self.inner.instance_claim(sop_instance_uid).await
    }

    async fn release_instance(
        &self,
        sop_instance_uid: &Uid,
        session: SessionId,
        file: FileId,
    ) -> Result<()> {
        self.plan.check(Op::ReleaseInstance)?;
        self.inner
            .release_instance(sop_instance_uid, session, file)
            .await
    }
}

/// How a [`FaultyPacsSink`] refuses an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Whether a retry may succeed (`InstanceOutcome::Failed::transient`).
    pub transient: bool,
    /// The destination's reason.
    pub reason: String,
    /// Refuse during the next `deliver` call only, then accept everything.
    pub once: bool,
}

impl Refusal {
    /// A refusal a retry may overcome, until cleared.
    pub fn transient(reason: impl Into<String>) -> Self {
        Self {
            transient: true,
            reason: reason.into(),
            once: false,
        }
    }

    /// A refusal that retrying unchanged will not overcome, until cleared.
    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            transient: false,
            reason: reason.into(),
            once: false,
        }
    }

    /// The same refusal, for the next `deliver` call only.
    pub fn once(self) -> Self {
        Self { once: true, ..self }
    }
}

/// A [`PacsSink`] that fails calls as its [`FaultPlan`] says, refuses
/// chosen SOP Instance UIDs, records every instance it is handed, and can
/// stall or degrade its verification to presence-only.
#[derive(Debug)]
pub struct FaultyPacsSink<T: ?Sized> {
    inner: Arc<T>,
    plan: Arc<FaultPlan>,
    refused: Mutex<(HashSet<Uid>, Option<Refusal>)>,
    asked: Mutex<Vec<Uid>>,
    stall_next: AtomicBool,
    stalled: AtomicBool,
    presence_only: AtomicBool,
}

impl<T: ?Sized> FaultyPacsSink<T> {
    /// Wrap `inner`, failing calls as `plan` says (refusing nothing).
    pub fn new(inner: Arc<T>, plan: Arc<FaultPlan>) -> Self {
        Self {
            inner,
            plan,
            refused: Mutex::new((HashSet::new(), None)),
            asked: Mutex::default(),
            stall_next: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            presence_only: AtomicBool::new(false),
        }
    }

    /// Wrap `inner` with a plan that only counts.
    pub fn counting(inner: Arc<T>) -> Self {
        Self::new(inner, FaultPlan::counting())
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &Arc<T> {
        &self.inner
    }

    /// Refuse these SOP Instance UIDs as `refusal` says (replacing any
    /// earlier refusal): each gets `InstanceOutcome::Failed` and is not
    /// handed to the wrapped sink; the others are.
    pub fn refuse(&self, uids: impl IntoIterator<Item = Uid>, refusal: Refusal) {
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.0 = uids.into_iter().collect();
        r.1 = Some(refusal);
    }

    /// Accept everything from now on.
    pub fn clear_refusals(&self) {
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.0.clear();
        r.1 = None;
    }

    /// The SOP Instance UIDs of every instance handed to `deliver`, in
    /// order, refused ones included.
    pub fn asked(&self) -> Vec<Uid> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many instances were handed to `deliver` in all.
    pub fn instances_asked(&self) -> usize {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Forget what was asked so far.
    pub fn clear_asked(&self) {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The next `deliver` call never returns (a worker that hangs; drop
    /// or abort its future to end it).
    pub fn stall_next_deliver(&self) {
        self.stall_next.store(true, Ordering::SeqCst);
    }

    /// Whether a `deliver` call is (or was) stalled.
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Answer `verify` as a destination that can report presence only:
    /// every `Same` becomes `Same { PresenceOnly }`.
    pub fn verify_presence_only(&self, on: bool) {
        self.presence_only.store(on, Ordering::SeqCst);
    }
}

impl<T: fmt::Display + ?Sized> fmt::Display for FaultyPacsSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

#[async_trait]
impl<T: PacsSink + ?Sized> PacsSink for FaultyPacsSink<T> {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        if self.stall_next.swap(false, Ordering::SeqCst) {
            self.stalled.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.plan.check(Op::Deliver)?;
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(instances.iter().map(|i| i.dicom.sop_instance_uid.clone()));
        let (refused, refusal) = {
            let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            let now = (r.0.clone(), r.1.clone());
            if r.1.as_ref().is_some_and(|x| x.once) {
                r.0.clear();
                r.1 = None;
            }
            now
        };
        let Some(refusal) = refusal.filter(|_| !refused.is_empty()) else {
            return self.inner.deliver(instances, source).await;
        };
        let pass: Vec<Instance> = instances
            .iter()
            .filter(|i| !refused.contains(&i.dicom.sop_instance_uid))
            .cloned()
            .collect();
        let report = if pass.is_empty() {
            DeliveryReport::default()
        } else {
            self.inner.deliver(&pass, source).await?
        };
        let mut done = report.outcomes.into_iter();
        let mut outcomes = Vec::with_capacity(instances.len());
        for i in instances {
            let uid = i.dicom.sop_instance_uid.clone();
            if refused.contains(&uid) {
                outcomes.push((
                    uid,
                    InstanceOutcome::Failed {
                        transient: refusal.transient,
                        reason: refusal.reason.clone(),
                    },
                ));
            } else {
                match done.next() {
                    Some(o) => outcomes.push(o),
                    None => {
                        return Err(Error::pacs_permanent(
                            "the wrapped sink reported fewer outcomes than instances",
                            None,
                        ));
                    }
                }
            }
        }
        Ok(DeliveryReport {
            outcomes,
            retry_after: report.retry_after,
        })
    }

    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        self.plan.check(Op::Verify)?;
        let held = self.inner.verify(instances).await?;
        if !self.presence_only.load(Ordering::SeqCst) {
            return Ok(held);
        }
        Ok(held
            .into_iter()
            .map(|h| match h {
                Holding::Same { .. } => Holding::Same {
                    verification: Verification::PresenceOnly,
                },
                other => other,
            })
            .collect())
    }
}

/// An [`AuditSink`] whose calls fail as its [`FaultPlan`] says (the
/// pipeline must then refuse the audited action: it fails closed).
#[derive(Debug)]
pub struct FaultyAuditSink<T: ?Sized> {
    inner: Arc<T>,
    plan: Arc<FaultPlan>,
}

impl<T: ?Sized> FaultyAuditSink<T> {
    /// Wrap `inner`, failing calls as `plan` says.
    pub fn new(inner: Arc<T>, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &Arc<T> {
        &self.inner
    }
}

impl<T: fmt::Display + ?Sized> fmt::Display for FaultyAuditSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

#[async_trait]
impl<T: AuditSink + ?Sized> AuditSink for FaultyAuditSink<T> {
    async fn record(&self, event: &AuditEvent) -> Result<()> {
        self.plan.check(Op::Record)?;
        self.inner.record(event).await
    }

    async fn events(&self) -> Result<Vec<AuditEvent>> {
        self.plan.check(Op::Events)?;
        self.inner.events().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nth_watched_call_fails_and_the_rest_pass() {
        let plan = FaultPlan::watching([Op::PutChunk, Op::RecordChunk]);
        plan.fail_nth(3, Fault::Full);
        let mut fails = Vec::new();
        for op in [
            Op::PutChunk,
            Op::SealFile,
            Op::RecordChunk,
            Op::PutChunk,
            Op::PutChunk,
        ] {
            fails.push(matches!(plan.hit(op), Verdict::Fail(Fault::Full)));
        }
        assert_eq!(fails, [false, false, false, true, false]);
        assert_eq!(plan.calls(), 4, "only watched calls are counted");
        assert_eq!(plan.calls_of(Op::PutChunk), 3);
        assert_eq!(plan.calls_of(Op::SealFile), 1);
    }

    #[test]
    fn always_fails_until_healed_and_errors_are_classified() {
        let plan = FaultPlan::watching([Op::Deliver]);
        plan.fail_always(Fault::PacsTransient);
        assert!(matches!(
            plan.check(Op::Deliver),
            Err(Error::Pacs {
                transient: true,
                ..
            })
        ));
        assert!(plan.check(Op::Verify).is_ok(), "not watched");
        plan.heal();
        assert!(plan.check(Op::Deliver).is_ok());
        assert!(FaultPlan::error(Fault::ShortWrite, Op::SealFile).is_none());
        assert!(matches!(
            FaultPlan::error(Fault::Full, Op::SealFile).map(|e| e.kind()),
            Some(crate::ErrorKind::InsufficientStorage)
        ));
    }
}

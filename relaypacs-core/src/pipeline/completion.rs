//! Completion of a file: read-back against every acknowledged chunk digest and the
//! whole-file SHA-256, DICOM validation, and the claim in the index of accepted
//! instances.

use super::*;
use crate::session_store::ClaimedWrite;

/// Whether `err` refuses a file for its content, so that it is removed
/// from its session (see [`Pipeline::complete_file`]).
pub(super) fn refuses_content(err: &Error) -> bool {
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

/// A file entering its session with its valid state (see
/// [`Pipeline::prove_and_record`]).
#[derive(Clone, Copy)]
struct Added<'a> {
    file: &'a FileRecord,
    chunks: &'a [ChunkRecord],
    /// Claimed in the same write, when set.
    claim: Option<&'a InstanceClaim>,
    /// Audit records committed in the same write, when set (the store
    /// appends to the audit sink's own trail).
    audit: Option<AuditPlan<'a>>,
    /// When set, and the file is its session's only one, the same write
    /// puts the session in the outbox (as
    /// [`complete_session`](Pipeline::complete_session) does); this is the
    /// template of that "queued" audit record.
    queue: Option<&'a AuditEvent>,
    /// When set and not yet written, the session itself: the same write
    /// creates it (see [`Pipeline::ingest_first_file`]).
    pending: Option<&'a PendingSession>,
}

/// What [`Pipeline::prove_and_record`] wrote.
pub(super) struct Recorded {
    /// The file, valid.
    pub(super) file: FileRecord,
    /// Its write also put the session in the outbox (see `Added::queue`),
    /// with this "queued" audit record (already committed when the write
    /// carried the file's audit records).
    pub(super) queued: Option<AuditEvent>,
}

/// The audit records of a new file's completing write: `before` as they
/// are, then `done` described from the file as written.
#[derive(Clone, Copy)]
pub(super) struct AuditPlan<'a> {
    pub(super) before: &'a [AuditEvent],
    pub(super) done: &'a AuditEvent,
}

/// Result of a full read-back of a stored file.
struct ReadBack {
    prefix: Vec<u8>,
    /// The header's validation, when the read-back ran it on its own
    /// thread (see [`Pipeline::read_back_small`]); else it is to be run.
    validated: Option<Validated>,
    sha256: Sha256Digest,
    /// Digest of the data set after the file meta group, when the meta
    /// group could be read.
    data_set_sha256: Option<Sha256Digest>,
}

/// What the pipeline holds of a whole new file it wrote with
/// [`ChunkStore::put_file_syncing`].
pub(super) struct Written {
    /// The rest of the file's sync: nothing records the file before it
    /// resolves `Ok`.
    pub(super) syncing: Syncing,
    /// The verified buffers the store took (for a file of at most
    /// [`ONE_THREAD_READ_BACK`] bytes), whose digest the file's one chunk
    /// is recorded with: the read-back compares the stored bytes with
    /// them instead of hashing them again.
    pub(super) received: Option<Vec<bytes::Bytes>>,
}

/// A stored file of one chunk up to this size is read back on one thread
/// ([`Pipeline::read_back_small`]): at most this much is held per
/// completion, and a typical CT or MR instance fits.
pub(super) const ONE_THREAD_READ_BACK: u64 = 2 << 20;

/// Bytes hashed by one pass before the other takes them (both while they
/// are in the cache).
const PASS_SLICE: usize = 64 << 10;

/// Whether two lists of buffers hold the same bytes, however each is cut.
fn same_bytes(a: &[bytes::Bytes], b: &[bytes::Bytes]) -> bool {
    let total = |v: &[bytes::Bytes]| v.iter().map(|x| x.len()).sum::<usize>();
    if total(a) != total(b) {
        return false;
    }
    let (mut a, mut b) = (a.iter().flat_map(|x| x.chunks(PASS_SLICE)), b.iter());
    let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
    loop {
        if x.is_empty() {
            match a.next() {
                Some(n) => x = n,
                None => return y.is_empty() && b.all(|r| r.is_empty()),
            }
            continue;
        }
        if y.is_empty() {
            match b.next() {
                Some(n) => y = n,
                None => return false,
            }
            continue;
        }
        let n = x.len().min(y.len());
        if x[..n] != y[..n] {
            return false;
        }
        x = &x[n..];
        y = &y[n..];
    }
}

/// A header's validation: the summary, or the refusal with what
/// identifies the file.
type Validated = std::result::Result<DicomSummary, Box<(crate::dicom::DicomError, Identified)>>;

/// Validate `prefix` (the first bytes of a file of `size` bytes) as DICOM;
/// on refusal, what still identifies it.
fn validate_prefix(prefix: &[u8], size: u64, limits: &DicomLimits) -> Validated {
    validate_dicom(prefix, size, limits)
        .map_err(|e| Box::new((e, crate::dicom::identify(prefix, size, &limits.prescan))))
}

/// A validation's refusal as the pipeline reports it.
fn refusal((e, known): (crate::dicom::DicomError, Identified)) -> (Error, Identified) {
    (Error::Dicom(e), known)
}

/// The chunks (sorted by offset) must cover `0..size` without a gap.
fn check_tiled(chunks: &[ChunkRecord], size: u64) -> Result<()> {
    let mut missing = Vec::new();
    let mut pos = 0u64;
    for c in chunks {
        if c.offset > pos {
            missing.push(format!("{}..{}", pos, c.offset));
        }
        pos = pos.max(c.end());
    }
    if pos < size {
        missing.push(format!("{pos}..{size}"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<_> = missing.iter().take(8).cloned().collect();
    Err(Error::invalid(
        "RELAY_FILE_INCOMPLETE",
        format!(
            "{} byte range(s) not uploaded yet: {}",
            missing.len(),
            shown.join(", ")
        ),
    ))
}

impl Pipeline {
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
        let current = self
            .load_scope_owned_as(actor, id, Some(file), Access::file("complete_file", file))
            .await?;
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
        // The file's removal writes its analytics fact.
        let err = match self.drop_file(id, file, Some(&err)).await {
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
        current: FileScope,
    ) -> std::result::Result<FileRecord, (Error, Identified)> {
        let plain = |e: Error| (e, Identified::default());
        Self::require_open(&current.session.value).map_err(plain)?;
        let file = current
            .session
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
            .chunks(id, file.id)
            .await
            .map_err(plain)?;
        self.prove_and_record(id, &file, &chunks, current, false, None, None, None, None)
            .await
            .map(|r| r.file)
    }

    /// Prove `file`'s stored bytes (`chunks`, sorted by offset), validate
    /// them, claim the instance and record the file as valid at `current`.
    /// With `new`, the file is not in the session yet: it is admitted under
    /// the session's limits and written with its chunk records in one step
    /// ([`SessionStore::update_file_scope_with_chunks`]).
    ///
    /// With `audit` (a new file only), its audit records commit in the
    /// file's write: `Ok` means they are durable too. With `queue` (a new
    /// file only), the write also puts the session in the outbox when the
    /// file is its only one (see [`Recorded::queued`]). With `pending` (a
    /// new file only, with `audit`), `current` is that session not yet
    /// written (version 0), and the file's write creates it; when the file
    /// has to go the long way (another file holds its instance), the
    /// session is written first. With `written` (a new file only), the
    /// file was written by [`ChunkStore::put_file_syncing`]: it is read
    /// back and validated while its sync runs, and nothing is written
    /// before the sync resolves `Ok`.
    #[allow(clippy::too_many_arguments)] // private; each argument is one step's input
    pub(super) async fn prove_and_record(
        &self,
        id: SessionId,
        file: &FileRecord,
        chunks: &[ChunkRecord],
        mut current: FileScope,
        new: bool,
        audit: Option<AuditPlan<'_>>,
        queue: Option<&AuditEvent>,
        pending: Option<&PendingSession>,
        written: Option<Written>,
    ) -> std::result::Result<Recorded, (Error, Identified)> {
        let plain = |e: Error| (e, Identified::default());
        let file_id = file.id;
        let (syncing, received) = match written {
            Some(w) => (Some(w.syncing), w.received),
            None => (None, None),
        };
        let back = self
            .verify_stored(id, file, chunks, received)
            .await
            .map_err(plain)?;
        let mut dicom = match back.validated {
            Some(v) => v.map_err(|r| refusal(*r))?,
            None => self.validate(back.prefix, file.size).await?,
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
        let digests = (back.sha256, data_set_sha256);
        // Durable before any write records the file (or claims for it).
        if let Some(syncing) = syncing {
            syncing.await.map_err(|e| refused(e, &dicom))?;
        }
        if new {
            // A new file claims its instance in its own write (one
            // transaction): the common case, a UID nobody holds. Only when
            // another file holds it does the file go the long way below
            // (same content, a stale claim, the duplicate policy).
            let mine = InstanceClaim::new(
                dicom.sop_instance_uid.clone(),
                data_set_sha256,
                dicom.study_instance_uid.clone(),
                id,
                file_id,
            );
            let added = Added {
                file,
                chunks,
                claim: Some(&mine),
                audit,
                queue,
                pending,
            };
            match self
                .record_valid(id, file_id, current.clone(), &dicom, digests, Some(added))
                .await
            {
                Ok(Some(written)) => return Self::recorded(written, file_id).map_err(plain),
                Ok(None) => {}
                Err(e) => {
                    // Nothing written by an atomic store; a store keeping
                    // the trait's default may have claimed already.
                    self.release_claim_after(id, file_id, &dicom, &e).await;
                    return Err(refused(e, &dicom));
                }
            }
        }
        if let Some(p) = pending {
            // The instance's claim refers to the session: it exists first.
            let written = self
                .write_session(p)
                .await
                .map_err(|e| refused(e, &dicom))?;
            current = FileScope::of(written, None);
        }
        let claimed = match self.claim(id, file_id, &dicom, data_set_sha256).await {
            Ok((claimed, warning)) => {
                dicom.warnings.extend(warning);
                claimed
            }
            Err(e) => return Err(refused(e, &dicom)),
        };
        let added = new.then_some(Added {
            file,
            chunks,
            claim: None,
            audit,
            queue,
            pending: None,
        });
        let written = match self
            .record_valid(id, file_id, current, &dicom, digests, added)
            .await
        {
            Ok(Some(written)) => written,
            Ok(None) => {
                // Only a write that claims answers `None`.
                return Err(plain(Error::Busy {
                    what: "the instance claim changed during the write".into(),
                }));
            }
            Err(e) => {
                if claimed {
                    self.release_claim_after(id, file_id, &dicom, &e).await;
                }
                return Err(refused(e, &dicom));
            }
        };
        Self::recorded(written, file_id).map_err(plain)
    }

    /// The file `file_id` of a session as `record_valid` wrote it.
    fn recorded(
        (rec, queued): (SessionRecord, Option<AuditEvent>),
        file_id: FileId,
    ) -> Result<Recorded> {
        let file = rec
            .files
            .get(&file_id)
            .cloned()
            .ok_or(Error::NotFound { what: "file" })?;
        Ok(Recorded { file, queued })
    }

    /// Release the claim `file_id` may hold after its write failed with
    /// `e`. Best effort; a claim left behind by a file that is gone is
    /// recognised as stale by the next claimant.
    async fn release_claim_after(
        &self,
        id: SessionId,
        file_id: FileId,
        dicom: &DicomSummary,
        e: &Error,
    ) {
        if let Err(r) = self
            .inner
            .sessions
            .release_instance(&dicom.sop_instance_uid, id, file_id)
            .await
        {
            tracing::warn!(error = %r, "could not release an instance claim");
        } else if matches!(e, Error::Conflict { code, .. } if *code == "RELAY_DUPLICATE_INSTANCE") {
            // The file of this UID the session accepted claimed after this
            // one and was told "accepted before": the index passes to it
            // rather than to nobody.
            self.reclaim_for_session(id, &dicom.sop_instance_uid).await;
        }
    }

    /// The file's stored bytes, proven: its chunks tile the file, every
    /// one still hashes to what was acknowledged, and the whole file
    /// matches its declared SHA-256 (when one was declared). The store
    /// seals the file first. With `received` (the buffers a new file of
    /// one chunk was stored from), see [`read_back_small`](Self::read_back_small).
    async fn verify_stored(
        &self,
        id: SessionId,
        file: &FileRecord,
        chunks: &[ChunkRecord],
        received: Option<Vec<bytes::Bytes>>,
    ) -> Result<ReadBack> {
        check_tiled(chunks, file.size)?;
        let key = FileKey {
            session: id,
            file: file.id,
        };
        self.inner.chunks.seal_file(key, file.size, chunks).await?;
        let header_cap = self.inner.config.dicom.max_header_bytes.min(file.size);
        // With a declared whole-file digest, the stored bytes hashing to it
        // prove every byte against the client's own file, which is more
        // than the chunk digests (of what arrived) prove: the pass per chunk
        // is then only the diagnosis of a mismatch, run below when one
        // occurs, and completion hashes the file twice instead of three
        // times (whole file and data set).
        let per_chunk = file.sha256.is_none();
        let back = self
            .read_back(key, file.size, chunks, header_cap, per_chunk, received)
            .await?;
        if let Some(expected) = file.sha256
            && expected != back.sha256
        {
            if !per_chunk {
                // Which chunk changed since it was acknowledged, if one
                // did (StoredChunkCorrupt names it); else the chunks are
                // what arrived and the client's declaration differs.
                self.read_back(key, file.size, chunks, header_cap, true, None)
                    .await?;
            }
            return Err(IntegrityError::FileHash {
                expected: expected.to_hex(),
                actual: back.sha256.to_hex(),
            }
            .into());
        }
        Ok(back)
    }

    /// Validate the file's header as DICOM (on a blocking thread). On
    /// refusal, whatever identifies the file still goes back to the client
    /// (STOW-RS references it in its failure).
    async fn validate(
        &self,
        prefix: Vec<u8>,
        size: u64,
    ) -> std::result::Result<DicomSummary, (Error, Identified)> {
        let limits = self.inner.config.dicom.clone();
        tokio::task::spawn_blocking(move || validate_prefix(&prefix, size, &limits))
            .await
            .map_err(|e| {
                (
                    Error::Dicom(crate::dicom::DicomError::Parser {
                        message: format!("validator task failed: {e}"),
                    }),
                    Identified::default(),
                )
            })?
            .map_err(|r| refusal(*r))
    }

    /// Record the file as valid (with its digests) in its session: the
    /// session must still be open, of the file's study (unless several
    /// are allowed), and hold no other file of the same SOP Instance UID.
    /// With `added`, the file (and its chunks) enters the session in the
    /// same write, admitted under the session's limits.
    async fn record_valid(
        &self,
        id: SessionId,
        file_id: FileId,
        mut current: FileScope,
        dicom: &DicomSummary,
        (digest, data_set_sha256): (Sha256Digest, Sha256Digest),
        added: Option<Added<'_>>,
    ) -> Result<Option<(SessionRecord, Option<AuditEvent>)>> {
        // A second file of this SOP Instance UID in the session is refused
        // by the store inside the write itself (Conflict
        // RELAY_DUPLICATE_INSTANCE, see SessionStore::update_file_scope):
        // no read before the compare-and-set, one transaction per attempt.
        for _ in 0..64 {
            match self
                .record_valid_at(file_id, current, dicom, (digest, data_set_sha256), added)
                .await
            {
                Err(Error::Precondition { .. }) => {
                    current = self
                        .inner
                        .sessions
                        .load_file_scope(id, Some(file_id))
                        .await?;
                }
                other => return other,
            }
        }
        Err(Error::Busy {
            what: "session is being updated concurrently".into(),
        })
    }

    /// One conditional write of the file's new state at `current`'s
    /// version; `Precondition` when the session moved on. With the
    /// session, the "queued" record when the write also queued it.
    async fn record_valid_at(
        &self,
        file_id: FileId,
        current: FileScope,
        dicom: &DicomSummary,
        (digest, data_set_sha256): (Sha256Digest, Sha256Digest),
        added: Option<Added<'_>>,
    ) -> Result<Option<(SessionRecord, Option<AuditEvent>)>> {
        let mut rec = current.session.value.clone();
        Self::require_open(&rec)?;
        if let Some(a) = &added {
            Self::admit_file(&mut rec, &current, a.file)?;
        }
        if let Some(study) = &rec.study_instance_uid
            && *study != dicom.study_instance_uid
            && !rec.allow_multiple_studies
        {
            return Err(Error::StudyMismatch {
                expected: study.to_string(),
                actual: dicom.study_instance_uid.to_string(),
            });
        }
        if rec.study_instance_uid.is_none() {
            rec.study_instance_uid = Some(dicom.study_instance_uid.clone());
        }
        let f = rec
            .files
            .get_mut(&file_id)
            .ok_or(Error::NotFound { what: "file" })?;
        f.sha256 = Some(digest);
        f.data_set_sha256 = Some(data_set_sha256);
        f.state = FileState::Valid {
            dicom: dicom.clone(),
        };
        let now = OffsetDateTime::now_utc();
        rec.updated_at = now;
        let version = current.session.version;
        let Some(a) = added else {
            self.inner.sessions.update_file_scope(&rec, version).await?;
            return Ok(Some((rec, None)));
        };
        // The session's only file (none other at this version, which the
        // write is conditional on): every file of it is valid, so the same
        // write can complete it, as complete_session would next.
        let queued = match a.queue {
            Some(template) if current.file_count == 0 => {
                Self::enter_outbox(&mut rec, now);
                Some(Self::queued_record(template, &rec))
            }
            _ => None,
        };
        let chunks: Vec<(FileId, ChunkRecord)> =
            a.chunks.iter().map(|c| (file_id, c.clone())).collect();
        if let Some(plan) = a.audit {
            let mut events = plan.before.to_vec();
            let mut done = plan.done.clone();
            if let Some(f) = rec.files.get(&file_id) {
                Self::describe_valid(&mut done, f);
            }
            events.push(done);
            events.extend(queued.clone());
            if let Some(p) = a.pending.filter(|p| p.unwritten()) {
                // One write: the session's creation (capped, its record
                // first) with all of the above.
                let mut all = Vec::with_capacity(events.len() + 1);
                all.push(p.event.clone());
                all.extend(events);
                return match self
                    .inner
                    .sessions
                    .create_session_with_file_audited(&rec, p.cap, &chunks, a.claim, &all)
                    .await?
                {
                    Some(ClaimedWrite::Written(version)) => {
                        let written = Versioned {
                            value: rec.clone(),
                            version,
                        };
                        self.session_written(p, written);
                        Ok(Some((rec, queued)))
                    }
                    Some(ClaimedWrite::Held(_)) => Ok(None),
                    None => self.creation_capped(p).await,
                };
            }
            // One write: the file, its chunks, its claim, the session's
            // place in the outbox when it queues it, and its audit records
            // (one transaction, one sync).
            return match self
                .inner
                .sessions
                .update_file_scope_audited(&rec, version, &chunks, a.claim, &events)
                .await?
            {
                ClaimedWrite::Written(_) => Ok(Some((rec, queued))),
                ClaimedWrite::Held(_) => Ok(None),
            };
        }
        // One write: the file, its chunk records, its valid state, the
        // session's study and, with a claim, the instance's place in the
        // index (one transaction, one sync).
        let sessions = &self.inner.sessions;
        match a.claim {
            None => {
                sessions
                    .update_file_scope_with_chunks(&rec, version, &chunks)
                    .await?;
            }
            Some(claim) => {
                match sessions
                    .update_file_scope_claiming(&rec, version, &chunks, claim)
                    .await?
                {
                    ClaimedWrite::Written(_) => {}
                    ClaimedWrite::Held(_) => return Ok(None),
                }
            }
        }
        Ok(Some((rec, queued)))
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

    /// Claim `sop` in the index for the valid file of session `id` that
    /// holds it (after another file of the session, refused as its
    /// duplicate, gave its claim up). Best effort, logged: a claim made
    /// meanwhile by another session stands.
    async fn reclaim_for_session(&self, id: SessionId, sop: &Uid) {
        let result: Result<()> = async {
            for f in self.inner.sessions.files_with_instance(id, sop).await? {
                let scope = self.inner.sessions.load_file_scope(id, Some(f)).await?;
                let Some(file) = scope.session.value.files.get(&f) else {
                    continue;
                };
                if let (FileState::Valid { dicom }, Some(ds)) = (&file.state, file.data_set_sha256)
                {
                    let claim = InstanceClaim::new(
                        sop.clone(),
                        ds,
                        dicom.study_instance_uid.clone(),
                        id,
                        f,
                    );
                    self.inner.sessions.claim_instance(&claim).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, session = %id, "could not pass an instance claim on");
        }
    }

    /// Whether a claim's file no longer exists (removed, session gone).
    async fn claim_is_stale(&self, claim: &InstanceClaim) -> Result<bool> {
        match self
            .inner
            .sessions
            .load_file_scope(claim.session, Some(claim.file))
            .await
        {
            Ok(v) => Ok(!v.session.value.files.contains_key(&claim.file)),
            Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Release the index claims of `rec`'s valid files (all, or one).
    pub(super) async fn release_claims(
        &self,
        rec: &SessionRecord,
        only: Option<FileId>,
    ) -> Result<()> {
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

    /// [`read_back`](Self::read_back) of a small file of one chunk: its
    /// buffers are gathered (at most [`ONE_THREAD_READ_BACK`] bytes), then
    /// one blocking thread makes both passes (the chunk's digest, the data
    /// set's) and keeps the header. For a typical instance (0.1-1 MiB) the
    /// three threads and their channels of the general case cost more in
    /// wake-ups than the passes they run side by side.
    ///
    /// With `received` (the buffers the file was stored from, which hash
    /// to `expect`: the chunk's digest was computed from them as they went
    /// to the store), the stored bytes are compared with them instead of
    /// hashed: equal bytes have equal digests, so the proof is the same
    /// and one SHA-256 pass is saved. Only a mismatch is hashed, to report
    /// the stored bytes' digest.
    async fn read_back_small(
        mut stream: ByteStream,
        size: u64,
        expect: Sha256Digest,
        header_cap: u64,
        limits: DicomLimits,
        received: Option<Vec<bytes::Bytes>>,
    ) -> Result<ReadBack> {
        let stored_size = |actual| IntegrityError::StoredSize {
            expected: size,
            actual,
        };
        let mut bufs = Vec::new();
        let mut pos = 0u64;
        while let Some(item) = stream.next().await {
            let b = item?;
            pos += b.len() as u64;
            if pos > size {
                return Err(stored_size(pos).into());
            }
            bufs.push(b);
        }
        if pos != size {
            return Err(stored_size(pos).into());
        }
        // At most the file's size, at most ONE_THREAD_READ_BACK (the
        // caller's condition): it fits a usize.
        let cap = usize::try_from(header_cap.min(size)).unwrap_or(0);
        tokio::task::spawn_blocking(move || -> Result<ReadBack> {
            // Without the received bytes, the stored ones are hashed.
            let mut whole = received.is_none().then(Sha256::new);
            let mut set = Part10Hasher::data_set_only(cap);
            let mut prefix = Vec::with_capacity(cap);
            for b in &bufs {
                // Both passes over one slice while it is in the cache.
                for part in b.chunks(PASS_SLICE) {
                    if let Some(whole) = &mut whole {
                        whole.update(part);
                    }
                    set.update(part);
                }
                if prefix.len() < cap {
                    let take = (cap - prefix.len()).min(b.len());
                    prefix.extend_from_slice(&b[..take]);
                }
            }
            let same = match &received {
                Some(received) => same_bytes(&bufs, received),
                None => whole.map(|w| Sha256Digest(w.finalize().into())) == Some(expect),
            };
            if !same {
                let mut whole = Sha256::new();
                for b in &bufs {
                    whole.update(b);
                }
                let got = Sha256Digest(whole.finalize().into());
                return Err(IntegrityError::StoredChunkCorrupt {
                    offset: 0,
                    expected: expect.to_hex(),
                    actual: got.to_hex(),
                }
                .into());
            }
            // The header, validated on this thread too (one thread trip
            // fewer); only once the bytes are proven.
            let validated = Some(validate_prefix(&prefix, size, &limits));
            Ok(ReadBack {
                prefix,
                validated,
                // Proven just above: the stored bytes hash to the chunk's
                // recorded digest, which is then the file's.
                sha256: expect,
                data_set_sha256: set.finish().data_set,
            })
        })
        .await
        .map_err(|e| {
            Error::storage(
                crate::error::StorageErrorKind::Io,
                "verify stored file",
                e.to_string(),
            )
        })?
    }

    /// Stream a stored file back, checking every chunk against its recorded
    /// digest (with `per_chunk`) and computing the whole-file digest,
    /// keeping the first `header_cap` bytes.
    ///
    /// The passes here are the proof of the stored bytes: the chunk digests
    /// were computed from the bytes before the store wrote them, so only
    /// hashing what the store returns (after the chunks were made durable
    /// and the file sealed) shows that it holds what was acknowledged. Per
    /// chunk (with `per_chunk`: when no whole-file digest was declared to
    /// compare with, or to name the corrupt chunk after a mismatch), the
    /// whole file (skipped for a one-chunk file, where it is the chunk's
    /// verified digest), and the data set after the meta group (another
    /// range of bytes, the instance's content identity for the index and
    /// the PACS check).
    async fn read_back(
        &self,
        key: FileKey,
        size: u64,
        chunks: &[ChunkRecord],
        header_cap: u64,
        per_chunk: bool,
        received: Option<Vec<bytes::Bytes>>,
    ) -> Result<ReadBack> {
        // A one-chunk file is proven by its chunk's digest (see below).
        let one_chunk = match chunks {
            [only] if only.offset == 0 && only.length == size => Some(only.sha256),
            _ => None,
        };
        let per_chunk = per_chunk || one_chunk.is_some();
        let mut stream = self.inner.chunks.read(key, 0..size).await?;
        if let Some(expect) = one_chunk
            && size <= ONE_THREAD_READ_BACK
        {
            let limits = self.inner.config.dicom.clone();
            return Self::read_back_small(stream, size, expect, header_cap, limits, received).await;
        }
        // Two hashers on two blocking threads (one per core): one checks
        // each chunk against its recorded digest (only with `per_chunk`;
        // else neither its thread nor its sends), the other computes the
        // whole-file digest. Buffers are shared (`Bytes` clones), and the
        // channels are small, so memory stays at a few buffers.
        let (tx_parts, mut rx_parts) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let tx_parts = per_chunk.then_some(tx_parts);
        let (tx_whole, mut rx_whole) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let bounds: Vec<(u64, u64, Sha256Digest)> = chunks
            .iter()
            .map(|c| (c.offset, c.end(), c.sha256))
            .collect();
        let parts = per_chunk.then(|| {
            tokio::task::spawn_blocking(move || -> Result<()> {
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
                        let n =
                            usize::try_from((end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
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
            })
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
        // A file of one chunk needs no whole-file pass: the chunk checker
        // above hashes exactly the same stored bytes, and once it has
        // matched the chunk's recorded digest that digest is the file's
        // (set below, only after the check passed). Several chunks need
        // the pass: SHA-256 digests of parts do not combine.
        let whole = tokio::task::spawn_blocking(move || -> ReadBack {
            let mut whole = one_chunk.is_none().then(Sha256::new);
            let mut prefix = Vec::with_capacity(usize::try_from(header_cap).unwrap_or(0));
            while let Some(buf) = rx_whole.blocking_recv() {
                if let Some(w) = whole.as_mut() {
                    w.update(&buf);
                }
                if (prefix.len() as u64) < header_cap {
                    let take =
                        usize::try_from((header_cap - prefix.len() as u64).min(buf.len() as u64))
                            .unwrap_or(0);
                    prefix.extend_from_slice(&buf[..take]);
                }
            }
            ReadBack {
                prefix,
                validated: None,
                // For one chunk, replaced below once the chunk is verified.
                sha256: Sha256Digest(whole.map(|w| w.finalize().into()).unwrap_or_default()),
                data_set_sha256: None,
            }
        });
        let mut read_err = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => {
                    // A send fails only if the chunk checker stopped early
                    // with an error; that error is reported below.
                    let parts_gone = match &tx_parts {
                        Some(tx) => tx.send(b.clone()).await.is_err(),
                        None => false,
                    };
                    if parts_gone
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
        let parts = match parts {
            Some(p) => p.await.map_err(join)?,
            None => Ok(()),
        };
        let mut whole = whole.await.map_err(join)?;
        whole.data_set_sha256 = data_set.await.map_err(join)?;
        if let Some(e) = read_err {
            return Err(e);
        }
        parts?;
        if let Some(chunk) = one_chunk {
            // Proven just above: the stored bytes hash to this digest.
            whole.sha256 = chunk;
        }
        Ok(whole)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::same_bytes;

    /// `data` cut at `cuts` (positions taken modulo its length).
    fn cut(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        at.windows(2)
            .map(|w| Bytes::copy_from_slice(&data[w[0]..w[1]]))
            .collect()
    }

    proptest! {
        /// The same bytes cut two ways are the same; one flipped byte, one
        /// byte more or one byte fewer is not.
        #[test]
        fn same_bytes_ignores_cuts_and_sees_every_byte(
            data in proptest::collection::vec(any::<u8>(), 1..100_000),
            a in proptest::collection::vec(any::<usize>(), 0..8),
            b in proptest::collection::vec(any::<usize>(), 0..8),
            flip in any::<usize>(),
        ) {
            let left = cut(&data, &a);
            prop_assert!(same_bytes(&left, &cut(&data, &b)));
            let mut other = data.clone();
            other[flip % data.len()] ^= 1;
            prop_assert!(!same_bytes(&left, &cut(&other, &b)));
            prop_assert!(!same_bytes(&left, &cut(&data[1..], &b)));
            let mut longer = data.clone();
            longer.push(0);
            prop_assert!(!same_bytes(&left, &cut(&longer, &b)));
        }
    }
}

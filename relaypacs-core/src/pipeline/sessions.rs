//! Sessions: opening one, declaring its files, completing it into the outbox.

use super::*;

impl Pipeline {
    /// Open a new upload session owned by `actor`.
    ///
    /// # Errors
    /// - [`Error::InsufficientStorage`] when the [`StorageGauge`] (if set)
    ///   finds less than `session_admission_bytes` above its watermark.
    /// - [`Error::TooMany`] (`RELAY_TOO_MANY_SESSIONS`) when the actor
    ///   already holds `max_open_sessions_per_user` open sessions. Within
    ///   this pipeline the count and the creation happen under one
    ///   per-user lock; the creation itself is
    ///   [`SessionStore::create_session_capped`], which a store shared by
    ///   several gateway processes (the SQL store) makes atomic across
    ///   them, so a burst of concurrent creations on any gateways leaves
    ///   exactly the cap open. (A store keeping the trait's default makes
    ///   each process enforce the cap on its own.)
    ///
    /// Both refusals are audited through [`DenialAudit`] (aggregated per
    /// user and minute), so a burst cannot flood the trail.
    pub async fn create_session(&self, actor: &Actor, req: NewSession) -> Result<SessionRecord> {
        self.ensure_index().await?;
        self.admit_session(actor).await?;
        let creator = self.inner.index.creator(&actor.user);
        let _one_at_a_time = creator.lock().await;
        let pending = self.new_session(actor, req).await?;
        self.write_session(&pending).await.map(|v| v.value)
    }

    /// A session checked as [`create_session`](Self::create_session) checks
    /// it (free space, the owner's cap as this process sees it) and built,
    /// but not written: the store's capped creation is done by the first
    /// file's write ([`PendingSession`]). The per-owner lock is not held
    /// until then; the store's capped creation is the guard.
    pub(super) async fn defer_session(
        &self,
        actor: &Actor,
        req: NewSession,
    ) -> Result<PendingSession> {
        self.ensure_index().await?;
        self.admit_session(actor).await?;
        let creator = self.inner.index.creator(&actor.user);
        let _one_at_a_time = creator.lock().await;
        self.new_session(actor, req).await
    }

    /// The refusal of a session's creation, audited through
    /// [`DenialAudit`] (aggregated per user and minute).
    async fn deny_creation<T>(&self, actor: &Actor, err: Error, what: &'static str) -> Result<T> {
        let mut ev = Self::event(
            actor,
            AuditAction::SessionCreated,
            AuditOutcome::MinorFailure,
            None,
        );
        if err.kind() == ErrorKind::InsufficientStorage {
            ev.outcome = AuditOutcome::SeriousFailure;
        }
        ev.detail = format!("{}: {}", err.code(), err);
        self.inner
            .denials
            .record(ev, "create_session", what)
            .await?;
        Err(err)
    }

    fn too_many_sessions(cap: u32) -> Error {
        Error::TooMany {
            code: "RELAY_TOO_MANY_SESSIONS",
            what: "open sessions",
            limit: u64::from(cap),
        }
    }

    /// Free space for a new session, when a [`StorageGauge`] is set.
    async fn admit_session(&self, actor: &Actor) -> Result<()> {
        if let Some(gauge) = self.inner.gauge.get()
            && let Err(e) = gauge.admit(self.inner.config.session_admission_bytes)
        {
            return self.deny_creation(actor, e, "storage").await;
        }
        Ok(())
    }

    /// The owner's cap (this process's view first: no store round trip for
    /// most refusals; the store's capped creation is the guard across
    /// processes), then the new record. Called under the owner's creation
    /// lock.
    async fn new_session(&self, actor: &Actor, req: NewSession) -> Result<PendingSession> {
        let cap = self.inner.config.max_open_sessions_per_user;
        if !self.below_cap(&actor.user, cap).await? {
            return self
                .deny_creation(actor, Self::too_many_sessions(cap), "open sessions")
                .await;
        }
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
            request_scoped: req.request_scoped,
            request_instance: if req.request_scoped {
                self.inner.sessions.instance_key()
            } else {
                None
            },
        };
        let event = Self::event(
            actor,
            AuditAction::SessionCreated,
            AuditOutcome::Success,
            Some(rec.id),
        );
        Ok(PendingSession {
            actor: actor.clone(),
            rec,
            event,
            cap,
            state: std::sync::Mutex::new(PendingState::Unwritten),
        })
    }

    /// Write `pending` alone (its creation's one write); the session as
    /// written. Once written, again returns it as written then.
    pub(super) async fn write_session(
        &self,
        pending: &PendingSession,
    ) -> Result<Versioned<SessionRecord>> {
        match pending.state() {
            PendingState::Written(v) => return Ok(*v),
            PendingState::Refused => return Err(Self::too_many_sessions(pending.cap)),
            PendingState::Unwritten => {}
        }
        let (rec, ev, cap) = (&pending.rec, &pending.event, pending.cap);
        // With the audit trail in the state database, the record commits
        // with the session (one sync instead of two).
        let joint = self.audit_joins_state();
        let created = if joint {
            self.inner
                .sessions
                .create_session_capped_audited(rec, cap, ev)
                .await
        } else {
            self.inner.sessions.create_session_capped(rec, cap).await
        };
        let written = match created {
            Ok(Some(written)) => written,
            // Another gateway's sessions fill the cap: this process's
            // index did not know them yet.
            Ok(None) => return self.creation_capped(pending).await,
            Err(e) => return self.refuse(ev.clone(), e).await,
        };
        self.session_written(pending, written.clone());
        if rec.request_scoped {
            self.keep_fresh(written.clone());
        }
        if !joint {
            self.audit(ev.clone()).await?;
        }
        Ok(written)
    }

    /// `pending` is written (by [`write_session`](Self::write_session) or
    /// by its first file's write) at `written`.
    pub(super) fn session_written(
        &self,
        pending: &PendingSession,
        written: Versioned<SessionRecord>,
    ) {
        self.inner.index.insert(&pending.rec);
        pending.set(PendingState::Written(Box::new(written)));
    }

    /// The store found `pending`'s owner at the cap: refused, audited once.
    pub(super) async fn creation_capped<T>(&self, pending: &PendingSession) -> Result<T> {
        pending.set(PendingState::Refused);
        self.deny_creation(
            &pending.actor,
            Self::too_many_sessions(pending.cap),
            "open sessions",
        )
        .await
    }

    /// Whether `owner` holds fewer than `cap` open sessions. Called under
    /// the owner's creation lock. The index's count is trusted below the
    /// cap; at the cap, each session it believes open is re-read from the
    /// store first (a session completed or removed by another process, or
    /// by a path that did not tell the index, must not lock the user out).
    async fn below_cap(&self, owner: &str, cap: u32) -> Result<bool> {
        let open = self.inner.index.open_of(owner);
        if (open.len() as u64) < u64::from(cap) {
            return Ok(true);
        }
        for id in open {
            match self.inner.sessions.load_session(id).await {
                Ok(v) => self.inner.index.insert(&v.value),
                Err(Error::NotFound { .. }) => self.inner.index.remove(id),
                Err(e) => return Err(e),
            }
        }
        Ok((self.inner.index.open_of(owner).len() as u64) < u64::from(cap))
    }

    /// Build the session index by one full scan, on first use.
    pub(crate) async fn ensure_index(&self) -> Result<()> {
        self.inner
            .index
            .loaded
            .get_or_try_init(|| async {
                let ids = self.inner.sessions.list_sessions().await?;
                self.load_into_index(&ids).await
            })
            .await
            .map(|_| ())
    }

    /// Load `ids` into the index; one that vanished meanwhile is skipped,
    /// one unreadable is left out with a warning (it does not hide the
    /// others, and is tried again on the next listing).
    pub(crate) async fn load_into_index(&self, ids: &[SessionId]) -> Result<()> {
        for &id in ids {
            match self.inner.sessions.load_session(id).await {
                Ok(v) => self.inner.index.insert(&v.value),
                Err(Error::NotFound { .. }) => {}
                Err(e) if e.kind() == ErrorKind::Storage && !e.is_retryable() => {
                    tracing::warn!(session = %id, error = %e, "session left out of the index");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Declare a file of `size` bytes in a session.
    pub async fn add_file(&self, actor: &Actor, id: SessionId, req: NewFile) -> Result<FileRecord> {
        self.add_file_with(actor, id, req, None).await
    }

    /// [`add_file`](Self::add_file) unless the session's owner already has
    /// `max_uploading` files still uploading in its open sessions:
    /// [`Error::TooMany`] (`RELAY_TOO_MANY_OPEN_UPLOADS`) then. The count
    /// and the write are one step of the session store
    /// ([`SessionStore::update_file_scope_capped`]), atomic across the
    /// gateways sharing a SQL store.
    pub async fn add_file_capped(
        &self,
        actor: &Actor,
        id: SessionId,
        req: NewFile,
        max_uploading: u32,
    ) -> Result<FileRecord> {
        self.add_file_with(actor, id, req, Some(max_uploading))
            .await
    }

    async fn add_file_with(
        &self,
        actor: &Actor,
        id: SessionId,
        req: NewFile,
        cap: Option<u32>,
    ) -> Result<FileRecord> {
        let gate = self.gate(id);
        let _g = gate.rw.read().await;
        let current = self
            .load_scope_owned_as(actor, id, None, Access::session("add_file"))
            .await?;
        let mut ev = Self::event(
            actor,
            AuditAction::FileAdded,
            AuditOutcome::Success,
            Some(id),
        );
        match self.add_file_inner(id, current, req, cap).await {
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
        current: FileScope,
        req: NewFile,
        cap: Option<u32>,
    ) -> Result<FileRecord> {
        let file = Self::new_file_record(&current.session.value, req)?;
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
        self.admit_new_file(id, current, cap, file).await
    }

    /// The record of a file `req` declares in the open session `rec`
    /// (checked against the session's limits on one file; its totals are
    /// checked when the file is written, see [`admit_file`](Self::admit_file)).
    pub(super) fn new_file_record(rec: &SessionRecord, req: NewFile) -> Result<FileRecord> {
        let limits = &rec.limits;
        Self::require_open(rec)?;
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
        Ok(FileRecord {
            id: FileId::random(),
            name: req.name,
            size: req.size,
            sha256: req.sha256,
            data_set_sha256: None,
            state: FileState::Uploading,
        })
    }

    /// Write the new `file` (its chunk area created) into the session.
    async fn admit_new_file(
        &self,
        id: SessionId,
        current: FileScope,
        cap: Option<u32>,
        file: FileRecord,
    ) -> Result<FileRecord> {
        let f2 = file.clone();
        // Only the new file is written; the limits are checked against the
        // session's totals at the version the write is conditional on.
        let written = self
            .update_scoped_capped(id, None, current, cap, move |rec, scope| {
                Self::admit_file(rec, scope, &f2)
            })
            .await?;
        // Only a cap refuses a write with `None`.
        if let (None, Some(cap)) = (&written, cap) {
            let key = FileKey {
                session: id,
                file: file.id,
            };
            // The refused file's empty chunk area; were this to fail, the
            // orphan sweep removes it later.
            if let Err(e) = self.inner.chunks.delete_file(key).await {
                tracing::warn!(session = %id, error = %e, "refused file's chunks left for the sweep");
            }
            return Err(Error::TooMany {
                code: "RELAY_TOO_MANY_OPEN_UPLOADS",
                what: "open uploads",
                limit: u64::from(cap),
            });
        }
        Ok(file)
    }

    /// Add `file` to `rec` if the session is open and its limits allow
    /// (checked against the totals of `scope`).
    pub(super) fn admit_file(
        rec: &mut SessionRecord,
        scope: &FileScope,
        file: &FileRecord,
    ) -> Result<()> {
        Self::require_open(rec)?;
        if scope.file_count >= u64::from(rec.limits.max_files) {
            return Err(Error::LimitExceeded {
                what: "files per session",
                limit: u64::from(rec.limits.max_files),
                actual: scope.file_count + 1,
            });
        }
        let total = scope.declared_bytes.saturating_add(file.size);
        if total > rec.limits.max_session_size {
            return Err(Error::LimitExceeded {
                what: "session size",
                limit: rec.limits.max_session_size,
                actual: total,
            });
        }
        rec.files.insert(file.id, file.clone());
        Ok(())
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
        let current = self
            .load_owned_as(actor, id, Access::session("complete_session"))
            .await?;
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
        // Whether this call put the session in the outbox: a call that
        // lost the compare-and-set to another (another gateway completing
        // the same session) reloads and finds it queued already, and is
        // then the documented no-op: no second "queued" record, no wake.
        // The "queued" record, when this call queues the session: with the
        // audit trail in the state database it commits with the state.
        let queued_event = |rec: &SessionRecord, queued: &bool| {
            if *queued {
                vec![Self::queued_record(&ev, rec)]
            } else {
                Vec::new()
            }
        };
        let (rec, queued, audited) = match self
            .update_head_audited(
                id,
                current,
                true,
                &[],
                |rec| {
                    match &rec.state {
                        SessionState::Open => {}
                        SessionState::Forwarding => return Ok(false),
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
                    Self::enter_outbox(rec, now);
                    Ok(true)
                },
                queued_event,
            )
            .await
        {
            Ok((rec, queued, audited)) => (rec.value, queued, audited),
            Err(e) => return self.refuse(ev, e).await,
        };
        self.inner.index.closed(id);
        if !queued {
            return Ok(rec);
        }
        if !audited {
            self.audit(Self::queued_record(&ev, &rec)).await?;
        }
        self.wake_outbox(id);
        Ok(rec)
    }

    /// Put `rec` in the outbox at `now`: forwarding, its first attempt due
    /// at once (what completing a session writes).
    pub(super) fn enter_outbox(rec: &mut SessionRecord, now: OffsetDateTime) {
        rec.state = SessionState::Forwarding;
        rec.delivery = crate::model::Delivery {
            queued_at: Some(now),
            next_attempt_at: Some(now),
            ..Default::default()
        };
    }

    /// The "queued" audit record of `rec` entering the outbox, made from
    /// `template` (the completing actor's `ForwardStarted` event).
    pub(super) fn queued_record(template: &AuditEvent, rec: &SessionRecord) -> AuditEvent {
        let mut e = template.clone();
        e.study = rec.study_instance_uid.clone();
        e.detail = format!("queued instances={}", rec.files.len());
        e
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
        self.inner.index.remove(id);
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
}

/// A session checked and built but not yet written (see
/// [`Pipeline::ingest_first_file`]): its first file's write creates it, or
/// [`Pipeline::write_session`] does when that file does not enter it.
pub(crate) struct PendingSession {
    actor: Actor,
    pub(super) rec: SessionRecord,
    /// Its creation's audit record.
    pub(super) event: AuditEvent,
    /// The owner's cap, applied by the store's creation.
    pub(super) cap: u32,
    state: std::sync::Mutex<PendingState>,
}

/// Where a [`PendingSession`] stands.
#[derive(Clone)]
pub(super) enum PendingState {
    Unwritten,
    /// Written, at this version.
    Written(Box<Versioned<SessionRecord>>),
    /// The store refused it: the owner is at the cap.
    Refused,
}

impl PendingSession {
    pub(super) fn state(&self) -> PendingState {
        lock(&self.state).clone()
    }

    fn set(&self, state: PendingState) {
        *lock(&self.state) = state;
    }

    /// Whether it is in the store (written alone or by its first file's
    /// write).
    pub(super) fn written(&self) -> bool {
        matches!(*lock(&self.state), PendingState::Written(_))
    }

    /// Still to be written by its first file's write.
    pub(super) fn unwritten(&self) -> bool {
        matches!(*lock(&self.state), PendingState::Unwritten)
    }
}

//! Lifecycle and queries: reading a session and its files, removing a file,
//! aborting and expiring sessions.

use super::*;

impl Pipeline {
    /// The session as its owner (or an admin) sees it. Audited as data access.
    pub async fn session(&self, actor: &Actor, id: SessionId) -> Result<SessionRecord> {
        let v = self
            .load_owned_as(actor, id, Access::session("read_session"))
            .await?;
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
        let v = self
            .load_scope_owned_as(actor, id, Some(file), Access::file("file_status", file))
            .await?;
        let f = v
            .session
            .value
            .files
            .get(&file)
            .cloned()
            .ok_or(Error::NotFound { what: "file" })?;
        let chunks = self.inner.sessions.chunks(id, file).await?;
        Ok(FileStatus {
            offset: contiguous_end(&chunks),
            file: f,
            chunks,
            expires_at: session_expiry(&v.session.value),
            session_state: v.session.value.state,
        })
    }

    /// The stored chunks of a file (for resuming clients).
    pub async fn file_chunks(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
    ) -> Result<Vec<ChunkRecord>> {
        let v = self
            .load_scope_owned_as(actor, id, Some(file), Access::file("file_chunks", file))
            .await?;
        if !v.session.value.files.contains_key(&file) {
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
        let v = self
            .load_scope_owned_as(actor, id, Some(file), Access::file("read_file", file))
            .await?;
        let f = v
            .session
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
        ev.study = v.session.value.study_instance_uid.clone();
        self.audit(ev).await?;
        self.inner
            .chunks
            .read(FileKey { session: id, file }, 0..f.size)
            .await
    }

    /// Remove a file of an open session: its record, chunk records, bytes
    /// and index claim. With `refused` (the error its content was refused
    /// for), only a file not (yet) valid is removed (a concurrent
    /// completion may have validated it), and its analytics fact is
    /// written with its removal (a file already gone or valid: neither).
    pub(super) async fn drop_file(
        &self,
        id: SessionId,
        file: FileId,
        refused: Option<&Error>,
    ) -> Result<()> {
        let gate = self.gate(id);
        let _g = gate.rw.write().await;
        // The session's head and this file only, and one indexed look-up
        // for the study: the cost does not grow with the session's files.
        for _ in 0..64 {
            let scope = self.inner.sessions.load_file_scope(id, Some(file)).await?;
            let current = scope.session;
            Self::require_open(&current.value)?;
            let Some(f) = current.value.files.get(&file) else {
                return if refused.is_some() {
                    Ok(())
                } else {
                    Err(Error::NotFound { what: "file" })
                };
            };
            if refused.is_some() && matches!(f.state, FileState::Valid { .. }) {
                return Ok(());
            }
            let sop: Option<Uid> = match &f.state {
                FileState::Valid { dicom } => Some(dicom.sop_instance_uid.clone()),
                FileState::Uploading => None,
            };
            let facts: Vec<_> = refused
                .map(|err| Self::refused_fact(id, &current.value.owner, file, f.size, err))
                .into_iter()
                .collect();
            let mut head = current.value.clone();
            head.files = Default::default();
            // The study is the valid files': with none left, the session
            // takes another study's files again. A file validated after
            // this look-up moves the version on, and the write below
            // fails and is tried again.
            if !self.inner.sessions.has_valid_file_except(id, file).await? {
                head.study_instance_uid = None;
            }
            head.updated_at = OffsetDateTime::now_utc();
            match self
                .inner
                .sessions
                .remove_file_scoped(&head, current.version, file, &facts)
                .await
            {
                Ok(_) => {
                    self.inner
                        .chunks
                        .delete_file(FileKey { session: id, file })
                        .await?;
                    if let Some(sop) = sop {
                        self.inner.sessions.release_instance(&sop, id, file).await?;
                    }
                    return Ok(());
                }
                Err(Error::Precondition { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Busy {
            what: "session is being updated concurrently".into(),
        })
    }

    /// Remove a file from an open session (its bytes, chunk records and
    /// index claim).
    pub async fn remove_file(&self, actor: &Actor, id: SessionId, file: FileId) -> Result<()> {
        // The owner check and the study named in the record need the
        // session's head only, not its other files.
        let scope = self
            .load_scope_owned_as(actor, id, Some(file), Access::file("remove_file", file))
            .await?;
        let mut ev = Self::event(
            actor,
            AuditAction::FileRemoved,
            AuditOutcome::Success,
            Some(id),
        );
        ev.study = scope.session.value.study_instance_uid.clone();
        ev.file = Some(file);
        match self.drop_file(id, file, None).await {
            Ok(()) => self.audit(ev).await,
            Err(e) => self.refuse(ev, e).await,
        }
    }

    /// Abort a session: delete its bytes and state. Waits for requests in flight.
    pub async fn abort_session(&self, actor: &Actor, id: SessionId) -> Result<()> {
        let gate = self.gate(id);
        let _g = gate.rw.write().await;
        let current = self
            .load_owned_as(actor, id, Access::session("abort_session"))
            .await?;
        let ev = Self::event(
            actor,
            AuditAction::SessionAborted,
            AuditOutcome::Success,
            Some(id),
        );
        // The study's analytics fact is written with the deletion.
        let facts = Self::ended_facts(&current.value, crate::analytics::FactKind::Aborted);
        let res = async {
            self.inner
                .sessions
                .delete_session_with_facts(id, current.version, &facts)
                .await?;
            self.inner.index.remove(id);
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

    /// Remove an open session the system ends (expired, orphaned): its
    /// record, bytes and instance claims, audited as `action` by the
    /// system with `detail`. `Ok(false)` when the record changed or went
    /// meanwhile (then it is left alone). The caller holds its gate
    /// exclusively.
    async fn end_by_system(
        &self,
        id: SessionId,
        current: Versioned<SessionRecord>,
        action: AuditAction,
        detail: String,
    ) -> Result<bool> {
        let rec = &current.value;
        let kind = match action {
            AuditAction::SessionExpired => crate::analytics::FactKind::Expired,
            _ => crate::analytics::FactKind::Aborted,
        };
        // The study's analytics fact is written with the deletion.
        let facts = Self::ended_facts(rec, kind);
        match self
            .inner
            .sessions
            .delete_session_with_facts(id, current.version, &facts)
            .await
        {
            Ok(()) => {}
            Err(Error::Precondition { .. }) | Err(Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        self.inner.index.remove(id);
        self.inner.chunks.delete_session(id).await?;
        self.release_claims(rec, None).await?;
        let mut ev = Self::event(&Actor::system(), action, AuditOutcome::Success, Some(id));
        ev.study = rec.study_instance_uid.clone();
        ev.detail = detail;
        self.audit(ev).await?;
        Ok(true)
    }

    /// End the request-scoped sessions (a STOW-RS request's) left open by
    /// an earlier run of the gateway: the request that owned each died
    /// with that run, no client knows the id, and an open session counts
    /// against its owner's cap until it expires. Each is removed with its
    /// bytes and instance claims, audited as aborted by the system.
    ///
    /// Call once at start, before requests are served: a request-scoped
    /// session opened by this run would be ended under its request. On a
    /// store shared by several gateways that tells them apart
    /// ([`SessionStore::instance_alive`]), a session whose gateway still
    /// runs is left to its request; with a store that cannot tell, call it
    /// only when no other gateway runs.
    ///
    /// # Errors
    /// Storage errors of listing, loading or removing a session.
    pub async fn end_orphaned_request_sessions(&self) -> Result<Vec<SessionId>> {
        let mut ended = Vec::new();
        for id in self.inner.sessions.list_sessions().await? {
            let gate = self.gate(id);
            let _g = gate.rw.write().await;
            let current = match self.inner.sessions.load_session(id).await {
                Ok(v) => v,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let rec = &current.value;
            if !rec.request_scoped || rec.state != SessionState::Open {
                continue;
            }
            // Another gateway's request, still being served.
            if let Some(key) = rec.request_instance
                && self.inner.sessions.instance_alive(key).await?
            {
                continue;
            }
            let detail = format!(
                "request-scoped session of {} left open by an earlier run",
                rec.owner
            );
            if !self
                .end_by_system(id, current, AuditAction::SessionAborted, detail)
                .await?
            {
                continue;
            }
            ended.push(id);
            drop(_g);
            self.forget_gate(id);
        }
        Ok(ended)
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
            // The session without its files first: most are not expired,
            // and the check must not cost a read of every file.
            let head = match self.inner.sessions.load_file_scope(id, None).await {
                Ok(v) => v.session.value,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let idle = (now - head.updated_at).whole_seconds();
            let expired = idle >= 0 && idle as u64 > head.limits.session_ttl_secs;
            if !expired || head.state != SessionState::Open {
                continue;
            }
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
            let detail = format!("idle_secs={idle}");
            if !self
                .end_by_system(id, current, AuditAction::SessionExpired, detail)
                .await?
            {
                continue;
            }
            removed.push(id);
            drop(_g);
            self.forget_gate(id);
        }
        Ok(removed)
    }
    /// The sessions `actor` may see: its own, or every one for an admin
    /// (the same ownership rule as every other call). Not audited, as
    /// listing was not: it is the caller's own work list. A session removed
    /// while the list is read is left out.
    pub async fn list_sessions(&self, actor: &Actor) -> Result<Vec<SessionRecord>> {
        let mut out = Vec::new();
        for id in self.inner.sessions.list_sessions().await? {
            let v = match self.inner.sessions.load_session(id).await {
                Ok(v) => v,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => {
                    // One unreadable record does not hide the others.
                    tracing::warn!(session = %id, error = %e, "session left out of a list");
                    continue;
                }
            };
            if Self::check_owner(actor, &v.value).is_ok() {
                out.push(v.value);
            }
        }
        Ok(out)
    }

    /// One page of the sessions `actor` may see (its own, or every one for
    /// an admin), oldest first (creation time, then id). At most
    /// `max_page_size` items; `next` resumes after the last one and stays
    /// valid whatever is created or removed meanwhile, so walking the pages
    /// returns every session that lived throughout exactly once. Not
    /// audited, as [`list_sessions`](Self::list_sessions).
    ///
    /// Cost: one id listing of the store (to see sessions created or
    /// removed by another process), a load of each id not seen before, and
    /// a load of each session on the page. Only the first use in a process
    /// (listing or creation) loads every session once, to build the index.
    ///
    /// # Errors
    /// [`Error::Invalid`] (`RELAY_BAD_CURSOR`) for a cursor this pipeline
    /// did not hand out; the store's errors.
    pub async fn list_sessions_page(
        &self,
        actor: &Actor,
        req: PageRequest,
    ) -> Result<Page<SessionRecord>> {
        let after = match &req.after {
            Some(c) => Some(c.position()?),
            None => None,
        };
        let cfg = &self.inner.config;
        let max = cfg.max_page_size.max(1);
        let limit = match req.limit {
            0 => cfg.default_page_size.clamp(1, max),
            n => n.min(max),
        } as usize;
        self.ensure_index().await?;
        let ids = self.inner.sessions.list_sessions().await?;
        let new = self.inner.index.reconcile(&ids);
        self.load_into_index(&new).await?;
        let owner = (!actor.admin).then_some(actor.user.as_str());
        let mut items = Vec::with_capacity(limit);
        let mut cursor = after;
        let mut last = None;
        loop {
            let batch = self
                .inner
                .index
                .after(owner, cursor, limit + 1 - items.len());
            if batch.is_empty() {
                return Ok(Page { items, next: None });
            }
            for pos in batch {
                if items.len() == limit {
                    // At least one more candidate follows the page.
                    return Ok(Page {
                        items,
                        next: last.map(PageCursor::of),
                    });
                }
                cursor = Some(pos);
                match self.inner.sessions.load_session(pos.1).await {
                    Ok(v) if Self::check_owner(actor, &v.value).is_ok() => {
                        last = Some(pos);
                        items.push(v.value);
                    }
                    Ok(_) => {}
                    Err(Error::NotFound { .. }) => self.inner.index.remove(pos.1),
                    Err(e) if !e.is_retryable() => {
                        // One unreadable record does not hide the others.
                        tracing::warn!(session = %pos.1, error = %e, "session left out of a page");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// A page of a session as its owner (or an admin) sees it: the session
    /// with up to `limit` of its files (in file id order, after `after`),
    /// the offsets of the page's files (as
    /// [`file_offsets`](Self::file_offsets)), the session's file count, and
    /// where the next page starts. Its cost grows with `limit`, not with
    /// the session. Audited as data access, like [`session`](Self::session).
    pub async fn session_page(
        &self,
        actor: &Actor,
        id: SessionId,
        after: Option<FileId>,
        limit: usize,
    ) -> Result<SessionPage> {
        let scope = self
            .load_scope_owned_as(actor, id, None, Access::session("read_session"))
            .await?;
        let mut files = self
            .inner
            .sessions
            .list_files(id, after, limit.saturating_add(1))
            .await?;
        let next = if files.len() > limit {
            files.truncate(limit);
            files.last().map(|f| f.id)
        } else {
            None
        };
        let mut offsets = std::collections::BTreeMap::new();
        for f in &files {
            let offset = match f.state {
                FileState::Valid { .. } => f.size,
                FileState::Uploading => {
                    contiguous_end(&self.inner.sessions.chunks(id, f.id).await?)
                }
            };
            offsets.insert(f.id, offset);
        }
        let mut session = scope.session.value;
        session.files = files.into_iter().map(|f| (f.id, f)).collect();
        let mut ev = Self::event(
            actor,
            AuditAction::DataAccessed,
            AuditOutcome::Success,
            Some(id),
        );
        ev.study = session.study_instance_uid.clone();
        self.audit(ev).await?;
        Ok(SessionPage {
            session,
            offsets,
            file_count: scope.file_count,
            next,
        })
    }

    /// For each file of a session, the end of its contiguous run of stored
    /// bytes from offset 0 (a valid file: its size), for a study view. Not
    /// audited: it reveals sizes and offsets only.
    pub async fn file_offsets(
        &self,
        actor: &Actor,
        id: SessionId,
    ) -> Result<std::collections::BTreeMap<FileId, u64>> {
        let v = self
            .load_owned_as(actor, id, Access::session("file_offsets"))
            .await?;
        let mut out = std::collections::BTreeMap::new();
        for f in v.value.files.values() {
            let offset = match f.state {
                FileState::Valid { .. } => f.size,
                FileState::Uploading => {
                    contiguous_end(&self.inner.sessions.chunks(id, f.id).await?)
                }
            };
            out.insert(f.id, offset);
        }
        Ok(out)
    }

    /// Whether the stores answer (a readiness probe): lists the sessions
    /// without loading them.
    ///
    /// # Errors
    /// The session store's error when it does not answer.
    pub async fn check_ready(&self) -> Result<()> {
        self.inner.sessions.list_sessions().await.map(|_| ())
    }
}

//! The delivery worker: runs due outbox entries, watches delivered studies for
//! reports, and tells its listener.

use super::*;

/// The delivery worker: runs due outbox entries (a few at once), then
/// watches delivered studies for reports, and tells its listener.
pub struct Outbox {
    pipeline: Pipeline,
    config: OutboxConfig,
    listener: Arc<dyn OutboxListener>,
    worker: String,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("config", &self.config)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// A worker over `pipeline`'s stores and sink.
    pub fn new(
        pipeline: Pipeline,
        config: OutboxConfig,
        listener: Arc<dyn OutboxListener>,
    ) -> Self {
        Self {
            pipeline,
            config,
            listener,
            worker: format!("worker-{:016x}", rand::random::<u64>()),
        }
    }

    /// What an entry needs next after its attempt's `result` (whose event
    /// was told to the listener with its batch's): a report check when
    /// one is due.
    async fn settle(&self, id: SessionId, result: Result<(Option<OutboxEvent>, Next)>) -> Next {
        let result = match result {
            Ok((Some(_), next)) => Ok(next),
            // A delivered study whose report check is due.
            Ok((None, Next::At(t))) if t <= OffsetDateTime::now_utc() => self.reports(id).await,
            Ok((None, next)) => Ok(next),
            Err(e) => Err(e),
        };
        match result {
            Ok(n) => n,
            Err(e) => {
                // Logged here, at the edge of the worker, once; the entry is
                // durable and is tried again later.
                tracing::warn!(session = %id, error = %e, code = e.code(), "outbox step failed");
                Next::At(plus(
                    OffsetDateTime::now_utc(),
                    self.config.base_delay.max(Duration::from_secs(1)),
                ))
            }
        }
    }

    async fn reports(&self, id: SessionId) -> Result<Next> {
        let (events, next) = self.pipeline.check_reports(id, &self.config).await?;
        if !events.is_empty() {
            self.listener.on_events(&events).await;
        }
        Ok(next)
    }

    /// Step `due` in batches of `batch` (see
    /// [`Pipeline::attempt_deliveries`]); what each needs next.
    async fn step_all(&self, due: Vec<SessionId>) -> Vec<(SessionId, Next)> {
        let mut out = Vec::with_capacity(due.len());
        for batch in due.chunks(self.config.batch.max(1)) {
            let results = self
                .pipeline
                .attempt_deliveries(batch, &self.worker, &self.config)
                .await;
            let events: Vec<OutboxEvent> = results
                .iter()
                .filter_map(|(_, r)| r.as_ref().ok().and_then(|(e, _)| e.clone()))
                .collect();
            if !events.is_empty() {
                self.listener.on_events(&events).await;
            }
            let settled: Vec<(SessionId, Next)> = futures::stream::iter(results)
                .map(|(id, r)| async move { (id, self.settle(id, r).await) })
                .buffer_unordered(self.config.parallel.max(1))
                .collect()
                .await;
            out.extend(settled);
        }
        out
    }

    /// Load every session's schedule from the store.
    async fn scan(&self, schedule: &mut HashMap<SessionId, OffsetDateTime>) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        for id in self.pipeline.inner.sessions.list_sessions().await? {
            // The schedule needs the state and the delivery record, not the
            // files: a scan costs one small read per session.
            let rec = match self.pipeline.inner.sessions.load_file_scope(id, None).await {
                Ok(v) => v.session.value,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Next::At(t) = self.pipeline.due(&rec, &self.config, now) {
                schedule.insert(id, t);
            }
        }
        Ok(())
    }

    /// Run every entry due now, once (for embedders driving the worker
    /// themselves, and tests). Returns how many entries were stepped.
    ///
    /// # Errors
    /// A failure to list the session store.
    pub async fn run_once(&self) -> Result<usize> {
        let mut schedule = HashMap::new();
        self.scan(&mut schedule).await?;
        let now = OffsetDateTime::now_utc();
        let due: Vec<SessionId> = schedule
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| *id)
            .collect();
        let n = due.len();
        self.step_all(due).await;
        Ok(n)
    }

    /// Run until `shutdown` completes: scan the store at start and every
    /// `rescan_interval`, take newly queued entries at once, and step each
    /// entry when due, in batches of `batch` (their sends `parallel` at a
    /// time); a batch not yet full waits up to `linger` from when its
    /// first entry was due for others to join it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut schedule: HashMap<SessionId, OffsetDateTime> = HashMap::new();
        let mut last_scan: Option<tokio::time::Instant> = None;
        // When the entries now due started waiting for a fuller batch.
        let mut lingering: Option<tokio::time::Instant> = None;
        loop {
            let rescan = last_scan.is_none_or(|t| t.elapsed() >= self.config.rescan_interval);
            if rescan {
                match self.scan(&mut schedule).await {
                    Ok(()) => last_scan = Some(tokio::time::Instant::now()),
                    Err(e) => {
                        tracing::error!(error = %e, code = e.code(), "outbox scan failed");
                        last_scan = Some(tokio::time::Instant::now());
                    }
                }
            }
            let now = OffsetDateTime::now_utc();
            for id in std::mem::take(&mut *crate::pipeline::lock(&self.pipeline.inner.queued)) {
                schedule.insert(id, now);
            }
            let due: Vec<SessionId> = schedule
                .iter()
                .filter(|(_, t)| **t <= now)
                .map(|(id, _)| *id)
                .collect();
            if !due.is_empty() {
                let since = *lingering.get_or_insert_with(tokio::time::Instant::now);
                let left = self.config.linger.saturating_sub(since.elapsed());
                if due.len() < self.config.batch.max(1) && !left.is_zero() {
                    // More entries may be on their way (a burst of
                    // uploads): one batch's commits for all of them.
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = self.pipeline.inner.kick.notified() => {}
                        () = tokio::time::sleep(left) => {}
                    }
                    continue;
                }
                lingering = None;
                for (id, next) in self.step_all(due).await {
                    match next {
                        Next::At(t) => {
                            schedule.insert(id, t);
                        }
                        Next::Done => {
                            schedule.remove(&id);
                        }
                    }
                }
                continue;
            }
            let now = OffsetDateTime::now_utc();
            let until_due = schedule
                .values()
                .min()
                .map(|t| (*t - now).try_into().unwrap_or(Duration::ZERO))
                .unwrap_or(self.config.rescan_interval)
                .min(self.config.rescan_interval);
            tokio::select! {
                () = &mut shutdown => return,
                () = self.pipeline.inner.kick.notified() => {}
                () = tokio::time::sleep(until_due) => {}
            }
        }
    }
}

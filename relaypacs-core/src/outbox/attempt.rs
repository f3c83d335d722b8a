//! One delivery attempt: take the lease, check what the PACS holds, send the
//! rest in groups verified while the next are sent, decide (delivered, retry,
//! dead letter), record and audit.

use super::*;
use crate::AuditEvent;
use crate::analytics::FactKind;
use crate::model::Versioned;
use crate::pacs_sink::DeliveryReport;
use crate::session_store::HeadWrite;

/// Whether one attempt holds the entry, or when to look again.
enum Lease {
    /// This worker holds the lease.
    Taken(Box<Held>),
    /// Nothing to do now.
    NotNow(Next),
}

/// What one attempt learnt, before and after sending.
#[derive(Default)]
struct Progress {
    /// `(uid, transient, reason)` of what the sink refused.
    refused: Vec<(Uid, bool, String)>,
    /// The PACS holds other content under these UIDs (the reasons).
    conflicts: Vec<String>,
    /// The sink or the PACS could not be asked.
    failure: Option<Error>,
    /// The PACS's `Retry-After`.
    retry_after: Option<Duration>,
}

impl Progress {
    /// Fold a [`PacsSink::verify`](crate::PacsSink::verify) answer for
    /// `asked` in: the same content becomes confirmed, other content a
    /// conflict; returns what the PACS does not hold.
    fn take(
        &mut self,
        asked: &[Instance],
        held: Vec<Holding>,
        confirmed: &mut BTreeMap<String, Verification>,
    ) -> Vec<Instance> {
        if held.len() != asked.len() {
            self.failure = Some(Error::pacs_permanent(
                format!(
                    "the sink answered {} verification(s) for {} instance(s)",
                    held.len(),
                    asked.len()
                ),
                None,
            ));
            return Vec::new();
        }
        let mut absent = Vec::new();
        for (inst, h) in asked.iter().zip(held) {
            match h {
                Holding::Same { verification } => {
                    confirmed.insert(inst.dicom.sop_instance_uid.to_string(), verification);
                }
                Holding::Different { reason } => self.conflicts.push(reason),
                _ => absent.push(inst.clone()),
            }
        }
        absent
    }

    /// Fold a sink's delivery report in: its `Retry-After` and what it
    /// refused.
    fn sent(&mut self, report: DeliveryReport) {
        self.retry_after = self.retry_after.max(report.retry_after);
        for (uid, o) in report.outcomes {
            if let InstanceOutcome::Failed { transient, reason } = o {
                self.refused.push((uid, transient, reason));
            }
        }
    }
}

/// Where an attempt ended, once the PACS's answers are in.
struct Settled {
    /// What the sink refused and the PACS does not hold after all.
    refused: Vec<(Uid, bool, String)>,
    conflicts: Vec<String>,
    failure: Option<Error>,
    retry_after: Option<Duration>,
    /// Instances the PACS is not confirmed to hold.
    missing: usize,
    /// The weakest verification of the confirmed instances.
    verified: Verification,
}

impl Settled {
    fn of(
        progress: Progress,
        instances: &[Instance],
        confirmed: &BTreeMap<String, Verification>,
    ) -> Self {
        let Progress {
            mut refused,
            conflicts,
            failure,
            retry_after,
        } = progress;
        let missing = instances
            .iter()
            .filter(|i| !confirmed.contains_key(i.dicom.sop_instance_uid.as_str()))
            .count();
        refused.retain(|(uid, _, _)| !confirmed.contains_key(uid.as_str()));
        let verified = confirmed
            .values()
            .copied()
            .min()
            .unwrap_or(Verification::Content);
        Self {
            refused,
            conflicts,
            failure,
            retry_after,
            missing,
            verified,
        }
    }

    /// Why the study is not delivered (a conflict first: it is why nothing
    /// more was sent).
    fn reason(&self, instances: usize) -> String {
        let (conflicts, refused) = (&self.conflicts, &self.refused);
        let mut reasons: Vec<String> = conflicts.iter().take(4).cloned().collect();
        if conflicts.len() > 4 {
            reasons.push(format!("and {} more conflicts", conflicts.len() - 4));
        }
        if let Some(e) = &self.failure {
            reasons.push(format!("{}: {e}", e.code()));
        }
        reasons.extend(
            refused
                .iter()
                .take(4)
                .map(|(uid, _, r)| format!("{uid}: {r}")),
        );
        if refused.len() > 4 {
            reasons.push(format!("and {} more refused", refused.len() - 4));
        }
        if reasons.is_empty() {
            reasons.push(format!(
                "the PACS does not hold {} of {instances} instance(s) after delivery",
                self.missing
            ));
        }
        reasons.join("; ")
    }

    /// The reason class of a dead letter, for the analytics: the PACS holds
    /// other content (`RELAY_PACS_CONFLICT`), refused for good
    /// (`RELAY_PACS_REJECTED`), kept failing until the attempts or the age
    /// ran out (`RELAY_PACS_GAVE_UP`), or does not hold what it accepted
    /// (`RELAY_PACS_MISSING`).
    fn class(&self) -> &'static str {
        if !self.conflicts.is_empty() {
            "RELAY_PACS_CONFLICT"
        } else if self.permanent() {
            "RELAY_PACS_REJECTED"
        } else if self.failure.is_some() || !self.refused.is_empty() {
            "RELAY_PACS_GAVE_UP"
        } else {
            "RELAY_PACS_MISSING"
        }
    }

    /// Whether retrying unchanged cannot help. A PACS holding other content
    /// under a UID will not change its mind by itself: never retried
    /// blindly.
    fn permanent(&self) -> bool {
        !self.conflicts.is_empty()
            || self.failure.as_ref().is_some_and(is_permanent)
            || self.refused.iter().any(|(_, transient, _)| !transient)
    }
}

/// The entry's next state after an attempt, and the event to report:
/// delivered when the PACS holds every instance; else a dead letter
/// (permanent, too many attempts, too old) or a retry after the backoff.
fn decide(
    rec: &SessionRecord,
    attempts: u32,
    instances: usize,
    s: &Settled,
    sink: &str,
    config: &OutboxConfig,
    now: OffsetDateTime,
) -> (SessionState, OutboxEvent) {
    let id = rec.id;
    if s.failure.is_none() && s.conflicts.is_empty() && s.missing == 0 {
        return (
            SessionState::Delivered {
                at: now,
                sink: sink.to_owned(),
                verified: s.verified,
            },
            OutboxEvent::Delivered {
                session: id,
                owner: rec.owner.clone(),
                instances,
                sink: sink.to_owned(),
                verified: s.verified,
            },
        );
    }
    let reason = s.reason(instances);
    let permanent = s.permanent();
    let queued = rec.delivery.queued_at.unwrap_or(rec.updated_at);
    let too_old =
        now - queued >= time::Duration::try_from(config.max_age).unwrap_or(time::Duration::MAX);
    if permanent || attempts >= config.max_attempts || too_old {
        let why = if permanent {
            reason
        } else {
            format!("gave up after {attempts} attempt(s): {reason}")
        };
        (
            SessionState::DeadLetter {
                at: now,
                reason: why.clone(),
            },
            OutboxEvent::DeadLettered {
                session: id,
                owner: rec.owner.clone(),
                reason: why,
            },
        )
    } else {
        let next = plus(now, config.backoff(attempts, s.retry_after));
        (
            SessionState::Forwarding,
            OutboxEvent::Retrying {
                session: id,
                owner: rec.owner.clone(),
                attempts,
                next,
                reason,
            },
        )
    }
}

/// The reason an event records as the entry's last error.
fn last_error_of(event: &OutboxEvent) -> Option<&str> {
    match event {
        OutboxEvent::Retrying { reason, .. } | OutboxEvent::DeadLettered { reason, .. } => {
            Some(reason)
        }
        _ => None,
    }
}

/// Index ranges of `instances` in groups of at most `max_bytes` (a larger
/// instance goes alone) and `max_count` instances.
fn groups(instances: &[Instance], max_bytes: u64, max_count: usize) -> Vec<std::ops::Range<usize>> {
    let sizes: Vec<u64> = instances.iter().map(|i| i.size).collect();
    size_groups(&sizes, max_bytes, max_count)
}

/// An entry whose lease this worker holds: the record at the version the
/// lease's write made, files included (the attempt's outcome is written
/// conditionally on it, without reading it again), the attempt's number,
/// and whether its `ForwardStarted` record committed with the lease.
struct Held {
    id: SessionId,
    rec: Versioned<SessionRecord>,
    attempts: u32,
    audited: bool,
}

/// What an attempt decided, and what is written with it.
struct Decided {
    state: SessionState,
    event: OutboxEvent,
    confirmed: BTreeMap<String, Verification>,
    facts: Vec<crate::analytics::UploadFact>,
    records: Vec<AuditEvent>,
    now: OffsetDateTime,
}

/// Take the lease of `r` for `worker` from `now`: one attempt more.
/// Returns the attempt's number.
fn apply_lease(
    r: &mut SessionRecord,
    worker: &str,
    config: &OutboxConfig,
    now: OffsetDateTime,
) -> u32 {
    r.delivery.attempts += 1;
    r.delivery.lease_until = Some(plus(now, config.lease));
    r.delivery.lease_owner = Some(worker.to_owned());
    r.delivery.attempts
}

/// The instances of `rec` the PACS is not yet confirmed to hold, of
/// `instances` (its instances).
fn unconfirmed<'a>(
    rec: &'a SessionRecord,
    instances: &'a [Instance],
) -> impl Iterator<Item = &'a Instance> + 'a {
    instances.iter().filter(|i| {
        !rec.delivery
            .confirmed
            .contains_key(i.dicom.sop_instance_uid.as_str())
    })
}

/// The entry `r` after the attempt `d` of `worker`: refused unless
/// `worker` still holds the lease.
fn apply_outcome(r: &mut SessionRecord, worker: &str, d: &Decided) -> Result<()> {
    if r.delivery.lease_owner.as_deref() != Some(worker) {
        return Err(Error::conflict(
            "RELAY_OUTBOX_LEASE_LOST",
            "another worker took the entry over",
        ));
    }
    r.state = d.state.clone();
    r.delivery.confirmed = d.confirmed.clone();
    r.delivery.lease_until = None;
    r.delivery.lease_owner = None;
    r.delivery.last_error = last_error_of(&d.event).map(str::to_owned);
    r.delivery.next_attempt_at = match &d.event {
        OutboxEvent::Retrying { next, .. } => Some(*next),
        _ => None,
    };
    Ok(())
}

/// Index ranges of `sizes` in groups of at most `max_bytes` (a larger
/// entry goes alone) and `max_count` entries.
fn size_groups(sizes: &[u64], max_bytes: u64, max_count: usize) -> Vec<std::ops::Range<usize>> {
    let (max_bytes, max_count) = (max_bytes.max(1), max_count.max(1));
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, size) in sizes.iter().enumerate() {
        let full = i > start && (bytes + size > max_bytes || i - start >= max_count);
        if full {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Whether an error means retrying unchanged cannot help.
fn is_permanent(e: &Error) -> bool {
    match e.kind() {
        ErrorKind::Pacs | ErrorKind::Storage | ErrorKind::Audit => !e.is_retryable(),
        ErrorKind::Busy => false,
        // Integrity (the stored file no longer verifies), invalid, not found…
        _ => true,
    }
}

impl Pipeline {
    /// Complete the session and make one delivery attempt at once, in the
    /// caller's task (for embedders that run no [`Outbox`] worker, and for
    /// examples). Returns the session afterwards: delivered, still in the
    /// outbox with a retry scheduled, or a dead letter. A worker, if one
    /// runs, picks up from there.
    ///
    /// # Errors
    /// As [`complete_session`](Pipeline::complete_session), and store failures.
    pub async fn complete_and_deliver(
        &self,
        actor: &Actor,
        id: SessionId,
        config: &OutboxConfig,
    ) -> Result<SessionRecord> {
        self.complete_session(actor, id).await?;
        self.attempt_delivery(id, "inline", config).await?;
        Ok(self.inner.sessions.load_session(id).await?.value)
    }

    /// One delivery attempt for `id` if it is due (see the module docs).
    /// Returns the event to report, if any, and when to look again.
    /// `worker` names the caller's lease.
    pub async fn attempt_delivery(
        &self,
        id: SessionId,
        worker: &str,
        config: &OutboxConfig,
    ) -> Result<(Option<OutboxEvent>, Next)> {
        let gate = self.gate(id);
        let _g = gate.rw.read().await;
        let held = match self.take_lease(id, worker, config).await? {
            Lease::Taken(held) => *held,
            Lease::NotNow(next) => return Ok((None, next)),
        };
        let decided = self.attempt_held(&held, config).await?;
        self.record_decided(held, worker, decided, None, config)
            .await
    }

    /// One delivery attempt for each of `ids` that is due, as
    /// [`attempt_delivery`](Self::attempt_delivery) makes for one, in
    /// groups of at most `config.batch` entries and `config.group_bytes`
    /// bytes (a larger entry goes alone): a group's leases are taken in
    /// one store write and its outcomes recorded in another (see
    /// [`SessionStore::update_heads`](crate::SessionStore::update_heads)),
    /// its sends run `config.parallel` entries at a time. An entry whose
    /// grouped write is refused (another writer moved it meanwhile) goes
    /// the one-entry way, which reads it again. One answer per distinct
    /// id, in id order within each group.
    pub async fn attempt_deliveries(
        &self,
        ids: &[SessionId],
        worker: &str,
        config: &OutboxConfig,
    ) -> Vec<Attempted> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::with_capacity(ids.len());
        if ids.len() < 2 || config.batch < 2 {
            for id in ids {
                out.push((id, self.attempt_delivery(id, worker, config).await));
            }
            return out;
        }
        // The gates in id order, held to the end (readers only, as one
        // attempt holds its own).
        let gates: Vec<_> = ids.iter().map(|id| self.gate(*id)).collect();
        let mut guards = Vec::with_capacity(gates.len());
        for g in &gates {
            guards.push(g.rw.read().await);
        }
        let sessions = &self.inner.sessions;
        let loaded =
            futures::future::join_all(ids.iter().map(|id| sessions.load_session(*id))).await;
        let now = OffsetDateTime::now_utc();
        let mut due = Vec::new();
        for (id, loaded) in ids.iter().copied().zip(loaded) {
            match loaded {
                Err(Error::NotFound { .. }) => out.push((id, Ok((None, Next::Done)))),
                Err(e) => out.push((id, Err(e))),
                Ok(v) if v.value.state != SessionState::Forwarding => {
                    out.push((id, Ok((None, self.due(&v.value, config, now)))));
                }
                Ok(v) => match Self::not_now(&v.value.delivery, worker, config, now) {
                    Some(next) => out.push((id, Ok((None, next)))),
                    None => due.push(v),
                },
            }
        }
        let sizes: Vec<u64> = due
            .iter()
            .map(|v| {
                let instances = Self::instances_of(&v.value);
                unconfirmed(&v.value, &instances).map(|i| i.size).sum()
            })
            .collect();
        let mut due = due.into_iter();
        for range in size_groups(&sizes, config.group_bytes, config.batch) {
            let group: Vec<_> = due.by_ref().take(range.len()).collect();
            let held = self.take_leases(group, worker, config, &mut out).await;
            let parallel = config.parallel.max(1);
            let sent: Vec<(Held, Result<Decided>)> = futures::stream::iter(held)
                .map(|h| async move {
                    let d = self.attempt_held(&h, config).await;
                    (h, d)
                })
                .buffered(parallel)
                .collect()
                .await;
            self.record_group(sent, worker, config, &mut out).await;
        }
        drop(guards);
        out
    }

    /// Take the leases of `group` (due, read whole just now) in one store
    /// write; each refused one the one-entry way. Answers for entries not
    /// to attempt go to `out`.
    async fn take_leases(
        &self,
        group: Vec<Versioned<SessionRecord>>,
        worker: &str,
        config: &OutboxConfig,
        out: &mut Vec<Attempted>,
    ) -> Vec<Held> {
        let joint = self.audit_joins_state();
        let now = OffsetDateTime::now_utc();
        // Each record becomes its leased head in place; its files are set
        // aside (the write leaves them) and given back to a lease taken.
        let mut leased = Vec::with_capacity(group.len());
        for mut current in group {
            let rec = &mut current.value;
            let attempts = apply_lease(rec, worker, config, now);
            rec.updated_at = now;
            let events = if joint {
                vec![self.forward_started(rec, attempts)]
            } else {
                Vec::new()
            };
            let files = std::mem::take(&mut rec.files);
            leased.push((current, files, attempts, events));
        }
        let writes: Vec<HeadWrite<'_>> = leased
            .iter()
            .map(|(current, _, _, events)| HeadWrite {
                session: &current.value,
                expected: current.version,
                facts: &[],
                events,
            })
            .collect();
        let written = self.write_heads(&writes).await;
        drop(writes);
        let mut held = Vec::with_capacity(leased.len());
        for ((mut rec, files, attempts, events), version) in leased.into_iter().zip(written) {
            let id = rec.value.id;
            let taken = match version {
                Some(version) => {
                    rec.value.files = files;
                    rec.version = version;
                    Ok(Lease::Taken(Box::new(Held {
                        id,
                        rec,
                        attempts,
                        audited: !events.is_empty(),
                    })))
                }
                None => self.take_lease(id, worker, config).await,
            };
            match taken {
                Ok(Lease::Taken(h)) => held.push(*h),
                Ok(Lease::NotNow(next)) => out.push((id, Ok((None, next)))),
                Err(e) => out.push((id, Err(e))),
            }
        }
        held
    }

    /// `writes` in one store write: the new version of each written, `None`
    /// for each refused, or for all when the write failed as a whole (the
    /// one-entry way then reads each again, and reports a lasting failure).
    async fn write_heads(&self, writes: &[HeadWrite<'_>]) -> Vec<Option<u64>> {
        if writes.is_empty() {
            return Vec::new();
        }
        match self.inner.sessions.update_heads(writes).await {
            Ok(answers) if answers.len() == writes.len() => {
                answers.into_iter().map(|a| a.ok()).collect()
            }
            Ok(_) | Err(_) => vec![None; writes.len()],
        }
    }

    /// Record the outcomes of a group's attempts in one store write (each
    /// refused one the one-entry way); the answers go to `out`.
    async fn record_group(
        &self,
        sent: Vec<(Held, Result<Decided>)>,
        worker: &str,
        config: &OutboxConfig,
        out: &mut Vec<Attempted>,
    ) {
        let joint = self.audit_joins_state();
        let now = OffsetDateTime::now_utc();
        let mut ready = Vec::with_capacity(sent.len());
        for (mut h, decided) in sent {
            let d = match decided {
                Ok(d) => d,
                Err(e) => {
                    out.push((h.id, Err(e)));
                    continue;
                }
            };
            // The outcome writes the head only: the files, no longer
            // needed, are not copied along.
            h.rec.value.files = Default::default();
            let mut after = h.rec.value.clone();
            match apply_outcome(&mut after, worker, &d) {
                Ok(()) => {
                    after.updated_at = now;
                    ready.push((h, d, after));
                }
                Err(e) => out.push((h.id, Err(e))),
            }
        }
        let writes: Vec<HeadWrite<'_>> = ready
            .iter()
            .map(|(h, d, after)| HeadWrite {
                session: after,
                expected: h.rec.version,
                facts: &d.facts,
                events: if joint { &d.records } else { &[] },
            })
            .collect();
        let written = self.write_heads(&writes).await;
        drop(writes);
        for ((h, d, _), version) in ready.into_iter().zip(written) {
            let audited = version.map(|_| joint && !d.records.is_empty());
            let id = h.id;
            out.push((id, self.record_decided(h, worker, d, audited, config).await));
        }
    }

    /// An attempt under a lease held: its `ForwardStarted` record unless
    /// it committed with the lease, the sends, and the decision.
    async fn attempt_held(&self, h: &Held, config: &OutboxConfig) -> Result<Decided> {
        let rec = &h.rec.value;
        if !h.audited {
            self.audit(self.forward_started(rec, h.attempts)).await?;
        }
        let instances = Self::instances_of(rec);
        let mut confirmed: BTreeMap<String, Verification> = rec.delivery.confirmed.clone();
        let pending: Vec<_> = unconfirmed(rec, &instances).cloned().collect();
        let progress = self.send_and_verify(&pending, config, &mut confirmed).await;
        Ok(self.decide_attempt(rec, h.attempts, &instances, confirmed, progress, config))
    }

    /// What an attempt comes to: the entry's next state, the event, and
    /// the facts and audit records written with it.
    fn decide_attempt(
        &self,
        rec: &SessionRecord,
        attempts: u32,
        instances: &[Instance],
        confirmed: BTreeMap<String, Verification>,
        progress: Progress,
        config: &OutboxConfig,
    ) -> Decided {
        let id = rec.id;
        let actor = worker_actor();
        let patients = patients_of(instances);
        let settled = Settled::of(progress, instances, &confirmed);
        let now = OffsetDateTime::now_utc();
        let sink = self.inner.sink.to_string();
        let (state, event) = decide(rec, attempts, instances.len(), &settled, &sink, config, now);
        // The analytics fact of a final outcome is written with it.
        let facts: Vec<_> = match &event {
            OutboxEvent::Delivered { .. } => Some((FactKind::Delivered, "")),
            OutboxEvent::DeadLettered { .. } => Some((FactKind::DeadLettered, settled.class())),
            _ => None,
        }
        .map(|(kind, cause)| Self::study_fact(rec, kind, cause, now))
        .into_iter()
        .collect();
        // One audit record for what the PACS holds and one for what it does
        // not, never one record with mixed outcomes (PS3.15 A.5.2).
        let mk = |outcome, detail: String| {
            let mut e = Self::event(&actor, AuditAction::Forwarded, outcome, Some(id));
            e.study = rec.study_instance_uid.clone();
            e.patient_id = Some(patients.clone());
            e.detail = detail;
            e
        };
        let mut records = Vec::new();
        if !confirmed.is_empty() {
            records.push(mk(
                AuditOutcome::Success,
                format!(
                    "instances={} verified={} sink={sink}",
                    confirmed.len(),
                    settled.verified
                ),
            ));
        }
        if let Some(reason) = last_error_of(&event) {
            let outcome = if matches!(event, OutboxEvent::DeadLettered { .. }) {
                AuditOutcome::SeriousFailure
            } else {
                AuditOutcome::MinorFailure
            };
            records.push(mk(
                outcome,
                format!("instances={} sink={sink}: {reason}", settled.missing),
            ));
        }
        Decided {
            state,
            event,
            confirmed,
            facts,
            records,
            now,
        }
    }

    /// Finish an attempt: unless `audited` says its outcome was written
    /// already (`Some(true)`: with its audit records), write it the
    /// one-entry way; then audit it if that did not; the event and when
    /// to look again.
    async fn record_decided(
        &self,
        h: Held,
        worker: &str,
        d: Decided,
        audited: Option<bool>,
        config: &OutboxConfig,
    ) -> Result<(Option<OutboxEvent>, Next)> {
        let audited = match audited {
            Some(a) => a,
            None => {
                // The outcome writes the head only: the files stay as they are.
                let mut head = h.rec;
                head.value.files = Default::default();
                self.record_attempt(h.id, head, worker, &d).await?
            }
        };
        if !audited && !d.records.is_empty() {
            self.audit_all(&d.records).await?;
        }
        let next = match &d.event {
            OutboxEvent::Retrying { next, .. } => Next::At(*next),
            OutboxEvent::Delivered { .. } => {
                self.report_next(d.now, plus(d.now, config.report_poll_interval), config)
            }
            _ => Next::Done,
        };
        Ok((Some(d.event), next))
    }

    /// The audit record of an attempt starting (PS3.15 "begin
    /// transferring"): the study, its patients, the attempt and the sink.
    fn forward_started(&self, rec: &SessionRecord, attempts: u32) -> AuditEvent {
        let mut ev = Self::event(
            &worker_actor(),
            AuditAction::ForwardStarted,
            AuditOutcome::Success,
            Some(rec.id),
        );
        ev.study = rec.study_instance_uid.clone();
        ev.patient_id = Some(patients_of(&Self::instances_of(rec)));
        ev.detail = format!("attempt={attempts} sink={}", self.inner.sink);
        ev
    }

    /// Take the entry's lease for one attempt (compare-and-set: one worker
    /// wins), or say when to look again: not in the outbox, not due yet,
    /// or leased by another live worker. With the audit trail in the
    /// state database, the attempt's `ForwardStarted` record commits with
    /// the lease.
    async fn take_lease(
        &self,
        id: SessionId,
        worker: &str,
        config: &OutboxConfig,
    ) -> Result<Lease> {
        // Deciding and taking the lease need the head only; the attempt
        // reads the files once. When the ForwardStarted record joins the
        // lease's write it names the study's patients, so the whole session
        // is read here, once (its files no longer change while it is
        // forwarding). Otherwise the head only, and the files once the
        // lease is taken, as a loser needs none.
        let joint = self.audit_joins_state();
        let loaded = if joint {
            self.inner.sessions.load_session(id).await
        } else {
            self.inner
                .sessions
                .load_file_scope(id, None)
                .await
                .map(|v| v.session)
        };
        let current = match loaded {
            Ok(v) => v,
            Err(Error::NotFound { .. }) => return Ok(Lease::NotNow(Next::Done)),
            Err(e) => return Err(e),
        };
        let now = OffsetDateTime::now_utc();
        let d = &current.value.delivery;
        if current.value.state != SessionState::Forwarding {
            return Ok(Lease::NotNow(self.due(&current.value, config, now)));
        }
        if let Some(next) = Self::not_now(d, worker, config, now) {
            return Ok(Lease::NotNow(next));
        }
        // The checks run again on every retry of the compare-and-set: a
        // worker that lost it to another (another gateway on the same
        // store) reloads the entry (whole when joint) and must then see
        // that worker's lease, not take the entry over and send the study
        // a second time at once.
        let mut later = None;
        let started = |r: &SessionRecord, attempts: &u32| vec![self.forward_started(r, *attempts)];
        let taken = self
            .update_head_audited(
                id,
                current,
                joint,
                &[],
                |r| {
                    if r.state != SessionState::Forwarding {
                        return Err(Error::conflict("RELAY_OUTBOX_MOVED", "entry changed"));
                    }
                    if let Some(next) = Self::not_now(&r.delivery, worker, config, now) {
                        later = Some(next);
                        return Err(Error::conflict("RELAY_OUTBOX_LEASED", "entry taken"));
                    }
                    Ok(apply_lease(r, worker, config, now))
                },
                started,
            )
            .await;
        match (taken, later) {
            // Under the lease the session is Forwarding: its files no
            // longer change, and its head only by this worker.
            (Ok((rec, attempts, audited)), _) => {
                let rec = if joint {
                    rec
                } else {
                    self.inner.sessions.load_session(id).await?
                };
                Ok(Lease::Taken(Box::new(Held {
                    id,
                    rec,
                    attempts,
                    audited,
                })))
            }
            (
                Err(Error::Conflict {
                    code: "RELAY_OUTBOX_LEASED",
                    ..
                }),
                Some(next),
            ) => Ok(Lease::NotNow(next)),
            (Err(e), _) => Err(e),
        }
    }

    /// When to look again if `d` is not for `worker` to attempt now: not
    /// due yet, or leased by another live worker (a lease of another
    /// worker counts as stale on an `exclusive` store).
    fn not_now(
        d: &Delivery,
        worker: &str,
        config: &OutboxConfig,
        now: OffsetDateTime,
    ) -> Option<Next> {
        if let Some(t) = d.next_attempt_at.filter(|t| *t > now) {
            return Some(Next::At(t));
        }
        if let (Some(until), Some(owner)) = (d.lease_until, &d.lease_owner) {
            let stale = config.exclusive && owner != worker;
            if until > now && !stale && owner != worker {
                return Some(Next::At(until));
            }
        }
        None
    }

    /// Check before sending (an identical copy at the PACS needs no resend,
    /// a different one is a conflict before a byte is sent), then send the
    /// rest in groups, `groups_in_flight` at a time; whatever the sink
    /// said, the PACS's own answer decides (and catches another writer
    /// racing us under the same UID). Groups are verified while the next
    /// ones are sent, so the retrieval of what was sent overlaps the
    /// sending of the rest. What the PACS holds goes into `confirmed`.
    async fn send_and_verify(
        &self,
        pending: &[Instance],
        config: &OutboxConfig,
        confirmed: &mut BTreeMap<String, Verification>,
    ) -> Progress {
        let source = StoreSource {
            chunks: self.inner.chunks.clone(),
        };
        let mut progress = Progress::default();
        let to_send = match self.inner.sink.verify(pending).await {
            Ok(held) => progress.take(pending, held, confirmed),
            Err(e) => {
                progress.failure = Some(e);
                Vec::new()
            }
        };
        let groups = groups(&to_send, config.group_bytes, config.group_instances);
        let sink = &self.inner.sink;
        let in_flight = config.groups_in_flight.max(1);
        let mut sent: Vec<&[Instance]> = Vec::new();
        let mut next_group = groups.iter().map(|r| &to_send[r.clone()]);
        loop {
            let healthy = progress.failure.is_none() && progress.conflicts.is_empty();
            let next: Vec<&[Instance]> = if healthy {
                next_group.by_ref().take(in_flight).collect()
            } else {
                Vec::new()
            };
            if sent.is_empty() && next.is_empty() {
                break;
            }
            let (checked, delivered) = futures::join!(
                futures::future::join_all(sent.iter().map(|g| sink.verify(g))),
                futures::future::join_all(next.iter().map(|g| sink.deliver(g, &source)))
            );
            for (g, checked) in sent.iter().zip(checked) {
                match checked {
                    Ok(held) => {
                        progress.take(g, held, confirmed);
                    }
                    Err(e) => {
                        progress.failure.get_or_insert(e);
                    }
                }
            }
            for delivered in delivered {
                match delivered {
                    Ok(report) => progress.sent(report),
                    Err(e) => {
                        progress.failure.get_or_insert(e);
                    }
                }
            }
            sent = next;
        }
        progress
    }

    /// Record the attempt's outcome `d` with its analytics facts (one
    /// write) and release the lease (only while this worker still holds
    /// it). With the audit trail in the state database, the attempt's
    /// audit records commit in the same write and the answer is `true`;
    /// else the caller records them.
    async fn record_attempt(
        &self,
        id: SessionId,
        current: Versioned<SessionRecord>,
        worker: &str,
        d: &Decided,
    ) -> Result<bool> {
        // `current` is the head as the lease wrote it: while this worker
        // holds the lease nothing else writes the entry, and if something
        // did, the conditional write below fails, reloads and checks the
        // lease.
        let (_, (), audited) = self
            .update_head_audited(
                id,
                current,
                false,
                &d.facts,
                |r| apply_outcome(r, worker, d),
                |_, _| d.records.clone(),
            )
            .await?;
        Ok(audited)
    }

    /// When the worker next has something to do for `rec`: a delivery
    /// attempt (outbox entries), a report check (delivered studies within
    /// the report window), or nothing.
    pub(super) fn due(
        &self,
        rec: &SessionRecord,
        config: &OutboxConfig,
        now: OffsetDateTime,
    ) -> Next {
        match rec.state {
            SessionState::Forwarding => Next::At(rec.delivery.next_attempt_at.unwrap_or(now)),
            SessionState::Delivered { at, .. } => self.report_next(
                at,
                plus(
                    rec.delivery.reports_checked_at.unwrap_or(at),
                    config.report_poll_interval,
                ),
                config,
            ),
            _ => Next::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn groups_respect_bytes_and_count_and_keep_order() {
        let inst = |size: u64| Instance {
            key: crate::chunk_store::FileKey {
                session: SessionId::random(),
                file: crate::ids::FileId::random(),
            },
            size,
            sha256: crate::digest::Sha256Digest::of(b""),
            data_set_sha256: None,
            dicom: crate::model::DicomSummary {
                sop_class_uid: Uid::parse("1.2").unwrap(),
                sop_instance_uid: Uid::parse("1.2.3").unwrap(),
                study_instance_uid: Uid::parse("1.2.4").unwrap(),
                series_instance_uid: Uid::parse("1.2.5").unwrap(),
                patient_id: String::new(),
                transfer_syntax: Uid::parse("1.2.840.10008.1.2.1").unwrap(),
                modality: None,
                warnings: Vec::new(),
            },
        };
        let sizes = [10u64, 10, 10, 50, 5, 5, 5, 5];
        let list: Vec<Instance> = sizes.iter().map(|s| inst(*s)).collect();
        assert_eq!(groups(&list, 30, 3), vec![0..3, 3..4, 4..7, 7..8]);
        assert_eq!(groups(&list, 1000, 100), vec![0..8]);
        assert_eq!(groups(&list, 1, 1).len(), 8);
        assert!(groups(&[], 30, 3).is_empty());
    }
}

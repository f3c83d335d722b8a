//! The durable outbox: delivery with retries, verification, dead letters,
//! replay, and the report watch after delivery.
//!
//! A completed session *is* the outbox entry: its state is
//! [`SessionState::Forwarding`] and its [`Delivery`] record holds the
//! attempt count, the next due time, a lease and what the PACS was
//! confirmed to hold. Everything lives in the [`SessionStore`](crate::SessionStore),
//! written with compare-and-set, so it survives restarts and two workers
//! never deliver the same entry at once.
//!
//! One attempt: take the lease; hand the instances not yet confirmed to the
//! sink (reading them through a source that re-checks the verified
//! SHA-256); then ask the PACS which instances it holds
//! ([`PacsSink::verify`](crate::PacsSink::verify)). Only when it holds every
//! one is the study [`Delivered`](SessionState::Delivered). Otherwise a
//! permanent refusal, an integrity failure, too many attempts or too old an
//! entry goes to [`DeadLetter`](SessionState::DeadLetter); anything else is
//! retried after an exponential backoff with jitter (at least the PACS's
//! `Retry-After`). An admin can [`replay`](Pipeline::replay) a dead letter
//! after fixing the cause.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::BackoffBuilder;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::audit::{AuditAction, AuditOutcome};
use crate::digest::ByteStream;
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{Actor, SessionId, Uid};
use crate::model::{Delivery, SessionRecord, SessionState};
use crate::pacs_sink::{Holding, Instance, InstanceOutcome, InstanceSource, Verification};
use crate::pipeline::{Pipeline, StoreSource};
use crate::report_source::{ReportRef, ReportSource};

/// Retry, lease and report-watch settings of the delivery worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// First retry delay; doubles per attempt (plus up to 100% jitter).
    #[serde(with = "secs")]
    pub base_delay: Duration,
    /// Largest delay between attempts (before jitter).
    #[serde(with = "secs")]
    pub max_delay: Duration,
    /// Attempts before an entry goes to dead letters.
    pub max_attempts: u32,
    /// Age (since queued) after which a failing entry goes to dead letters.
    #[serde(with = "secs")]
    pub max_age: Duration,
    /// How long one attempt may hold an entry (longer than any sink timeout).
    #[serde(with = "secs")]
    pub lease: Duration,
    /// Entries delivered at once.
    pub parallel: usize,
    /// How often the whole store is rescanned for entries (e.g. queued by
    /// another process sharing the session store).
    #[serde(with = "secs")]
    pub rescan_interval: Duration,
    /// How often a delivered study is checked for reports.
    #[serde(with = "secs")]
    pub report_poll_interval: Duration,
    /// How long after delivery reports are looked for.
    #[serde(with = "secs")]
    pub report_window: Duration,
    /// Instances are handed to the sink in groups of at most this many
    /// bytes (or `group_instances`), each verified while the next is sent
    /// (default 32 MiB, the STOW-RS sink's default request size).
    pub group_bytes: u64,
    /// Most instances in one group (default 64).
    pub group_instances: usize,
    /// Groups sent at once (default 2; 1 = one request at a time). A PACS
    /// ingests several requests faster than one.
    pub groups_in_flight: usize,
    /// Whether this worker is the only one on its session store (the
    /// reference server holds a lock on its data folder). Leases left by
    /// an earlier, crashed process are then taken over at once instead of
    /// after they run out.
    pub exclusive: bool,
}

impl Default for OutboxConfig {
    /// 1 s doubling to 15 min, at most 50 attempts or 24 h, 15 min lease,
    /// 2 at once, rescan every 5 min, reports polled every minute for 30 days.
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            max_attempts: 50,
            max_age: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(15 * 60),
            parallel: 2,
            rescan_interval: Duration::from_secs(300),
            report_poll_interval: Duration::from_secs(60),
            report_window: Duration::from_secs(30 * 24 * 3600),
            group_bytes: 16 << 20,
            group_instances: 32,
            groups_in_flight: 2,
            exclusive: true,
        }
    }
}

/// Durations in configuration files are (fractional) seconds.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl OutboxConfig {
    /// The delay before attempt `attempts + 1`: exponential from
    /// `base_delay`, capped at `max_delay`, plus jitter (backon), and never
    /// shorter than the PACS's `Retry-After`.
    pub fn backoff(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let d = backon::ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay);
        d.max(retry_after.unwrap_or_default())
    }
}

/// What the delivery worker reports to its listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxEvent {
    /// The PACS holds every instance (verified).
    Delivered {
        /// Session.
        session: SessionId,
        /// Uploader.
        owner: String,
        /// Instances confirmed.
        instances: usize,
        /// Sink description.
        sink: String,
        /// The weakest verification of any instance.
        verified: Verification,
    },
    /// An attempt failed; another is scheduled.
    Retrying {
        /// Session.
        session: SessionId,
        /// Uploader.
        owner: String,
        /// Attempts so far.
        attempts: u32,
        /// When the next is due.
        next: OffsetDateTime,
        /// Why it failed.
        reason: String,
    },
    /// Delivery was given up; the entry waits in dead letters.
    DeadLettered {
        /// Session.
        session: SessionId,
        /// Uploader.
        owner: String,
        /// Why.
        reason: String,
    },
    /// A report appeared at the PACS for a delivered study.
    ReportReady {
        /// Session.
        session: SessionId,
        /// Uploader.
        owner: String,
        /// The report.
        report: ReportRef,
    },
}

/// Receives [`OutboxEvent`]s (to notify users, count metrics).
#[async_trait]
pub trait OutboxListener: Send + Sync + 'static {
    /// Called once per event, after the state change is durable.
    async fn on_event(&self, event: &OutboxEvent);
}

/// When an entry needs the worker again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// At this time.
    At(OffsetDateTime),
    /// Never (delivered and past the report window, dead letter, gone).
    Done,
}

/// The actor of the worker's audit records.
fn worker_actor() -> Actor {
    Actor {
        user: "system:outbox".into(),
        admin: true,
        address: None,
    }
}

/// Refuse a non-admin actor with `reason`.
fn admin_only(actor: &Actor, reason: &str) -> Result<()> {
    if actor.admin {
        Ok(())
    } else {
        Err(Error::Auth {
            code: "RELAY_FORBIDDEN",
            reason: reason.into(),
        })
    }
}

/// The distinct Patient IDs of `instances`, as one audit value.
fn patients_of(instances: &[crate::pacs_sink::Instance]) -> String {
    let set: BTreeSet<&str> = instances
        .iter()
        .map(|i| i.dicom.patient_id.as_str())
        .collect();
    set.into_iter().collect::<Vec<_>>().join("\\")
}

fn plus(t: OffsetDateTime, d: Duration) -> OffsetDateTime {
    t + time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
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
}

/// Index ranges of `instances` in groups of at most `max_bytes` (a larger
/// instance goes alone) and `max_count` instances.
fn groups(instances: &[Instance], max_bytes: u64, max_count: usize) -> Vec<std::ops::Range<usize>> {
    let (max_bytes, max_count) = (max_bytes.max(1), max_count.max(1));
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, inst) in instances.iter().enumerate() {
        let full = i > start && (bytes + inst.size > max_bytes || i - start >= max_count);
        if full {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += inst.size;
    }
    if start < instances.len() {
        out.push(start..instances.len());
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
    /// Set where reports are looked for after delivery (once).
    ///
    /// # Errors
    /// [`Error::Conflict`] when one was set already.
    pub fn set_report_source(&self, source: Arc<dyn ReportSource>) -> Result<()> {
        self.inner
            .reports
            .set(source)
            .map_err(|_| Error::conflict("RELAY_REPORTS_SET", "a report source is already set"))
    }

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
        let current = match self.inner.sessions.load_session(id).await {
            Ok(v) => v,
            Err(Error::NotFound { .. }) => return Ok((None, Next::Done)),
            Err(e) => return Err(e),
        };
        let now = OffsetDateTime::now_utc();
        let d = &current.value.delivery;
        if current.value.state != SessionState::Forwarding {
            return Ok((None, self.due(&current.value, config, now)));
        }
        if let Some(t) = d.next_attempt_at.filter(|t| *t > now) {
            return Ok((None, Next::At(t)));
        }
        if let (Some(until), Some(owner)) = (d.lease_until, &d.lease_owner) {
            let stale = config.exclusive && owner != worker;
            if until > now && !stale && owner != worker {
                return Ok((None, Next::At(until)));
            }
        }
        // Take the lease (compare-and-set: one worker wins).
        let (rec, attempts) = self
            .update(id, current, |r| {
                if r.state != SessionState::Forwarding {
                    return Err(Error::conflict("RELAY_OUTBOX_MOVED", "entry changed"));
                }
                r.delivery.attempts += 1;
                r.delivery.lease_until = Some(plus(now, config.lease));
                r.delivery.lease_owner = Some(worker.to_owned());
                Ok(r.delivery.attempts)
            })
            .await?;
        let actor = worker_actor();
        let instances = Self::instances_of(&rec);
        let patients = patients_of(&instances);
        let mut ev = Self::event(
            &actor,
            AuditAction::ForwardStarted,
            AuditOutcome::Success,
            Some(id),
        );
        ev.study = rec.study_instance_uid.clone();
        ev.patient_id = Some(patients.clone());
        ev.detail = format!("attempt={attempts} sink={}", self.inner.sink);
        self.audit(ev).await?;

        let mut confirmed: BTreeMap<String, Verification> = rec.delivery.confirmed.clone();
        let pending: Vec<_> = instances
            .iter()
            .filter(|i| !confirmed.contains_key(i.dicom.sop_instance_uid.as_str()))
            .cloned()
            .collect();
        let source = StoreSource {
            chunks: self.inner.chunks.clone(),
        };
        let mut progress = Progress::default();
        // Check before sending: an identical copy at the PACS needs no
        // resend, a different one is a conflict before a byte is sent.
        let to_send = match self.inner.sink.verify(&pending).await {
            Ok(held) => progress.take(&pending, held, &mut confirmed),
            Err(e) => {
                progress.failure = Some(e);
                Vec::new()
            }
        };
        // Send in groups, `groups_in_flight` at a time; whatever the sink
        // said, the PACS's own answer decides (and catches another writer
        // racing us under the same UID). Groups are verified while the
        // next ones are sent, so the retrieval of what was sent overlaps
        // the sending of the rest.
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
                        progress.take(g, held, &mut confirmed);
                    }
                    Err(e) => {
                        progress.failure.get_or_insert(e);
                    }
                }
            }
            for delivered in delivered {
                match delivered {
                    Ok(report) => {
                        progress.retry_after = progress.retry_after.max(report.retry_after);
                        for (uid, o) in report.outcomes {
                            if let InstanceOutcome::Failed { transient, reason } = o {
                                progress.refused.push((uid, transient, reason));
                            }
                        }
                    }
                    Err(e) => {
                        progress.failure.get_or_insert(e);
                    }
                }
            }
            sent = next;
        }
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

        let now = OffsetDateTime::now_utc();
        let sink = self.inner.sink.to_string();
        let (state, event) = if failure.is_none() && conflicts.is_empty() && missing == 0 {
            (
                SessionState::Delivered {
                    at: now,
                    sink: sink.clone(),
                    verified,
                },
                OutboxEvent::Delivered {
                    session: id,
                    owner: rec.owner.clone(),
                    instances: instances.len(),
                    sink: sink.clone(),
                    verified,
                },
            )
        } else {
            // A conflict first: it is why nothing (more) was sent.
            let mut reasons: Vec<String> = conflicts.iter().take(4).cloned().collect();
            if conflicts.len() > 4 {
                reasons.push(format!("and {} more conflicts", conflicts.len() - 4));
            }
            if let Some(e) = &failure {
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
                    "the PACS does not hold {missing} of {} instance(s) after delivery",
                    instances.len()
                ));
            }
            let reason = reasons.join("; ");
            // A PACS holding other content under a UID will not change its
            // mind by itself: never retried blindly.
            let permanent = !conflicts.is_empty()
                || failure.as_ref().is_some_and(is_permanent)
                || refused.iter().any(|(_, transient, _)| !transient);
            let queued = rec.delivery.queued_at.unwrap_or(rec.updated_at);
            let too_old = now - queued
                >= time::Duration::try_from(config.max_age).unwrap_or(time::Duration::MAX);
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
                let next = plus(now, config.backoff(attempts, retry_after));
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
        };
        let last_error = match &event {
            OutboxEvent::Retrying { reason, .. } | OutboxEvent::DeadLettered { reason, .. } => {
                Some(reason.clone())
            }
            _ => None,
        };
        let next_at = match &event {
            OutboxEvent::Retrying { next, .. } => Some(*next),
            _ => None,
        };
        let current = self.inner.sessions.load_session(id).await?;
        let (_, ()) = self
            .update(id, current, |r| {
                if r.delivery.lease_owner.as_deref() != Some(worker) {
                    return Err(Error::conflict(
                        "RELAY_OUTBOX_LEASE_LOST",
                        "another worker took the entry over",
                    ));
                }
                r.state = state.clone();
                r.delivery.confirmed = confirmed.clone();
                r.delivery.lease_until = None;
                r.delivery.lease_owner = None;
                r.delivery.last_error = last_error.clone();
                r.delivery.next_attempt_at = next_at;
                Ok(())
            })
            .await?;

        // One audit record for what the PACS holds and one for what it does
        // not, never one record with mixed outcomes (PS3.15 A.5.2).
        let mk = |outcome, detail: String| {
            let mut e = Self::event(&actor, AuditAction::Forwarded, outcome, Some(id));
            e.study = rec.study_instance_uid.clone();
            e.patient_id = Some(patients.clone());
            e.detail = detail;
            e
        };
        if !confirmed.is_empty() {
            self.audit(mk(
                AuditOutcome::Success,
                format!(
                    "instances={} verified={verified} sink={sink}",
                    confirmed.len()
                ),
            ))
            .await?;
        }
        if let Some(reason) = &last_error {
            let outcome = if matches!(event, OutboxEvent::DeadLettered { .. }) {
                AuditOutcome::SeriousFailure
            } else {
                AuditOutcome::MinorFailure
            };
            self.audit(mk(
                outcome,
                format!("instances={missing} sink={sink}: {reason}"),
            ))
            .await?;
        }
        let next = match &event {
            OutboxEvent::Retrying { next, .. } => Next::At(*next),
            OutboxEvent::Delivered { .. } => {
                self.report_next(now, plus(now, config.report_poll_interval), config)
            }
            _ => Next::Done,
        };
        Ok((Some(event), next))
    }

    /// When the worker next has something to do for `rec`: a delivery
    /// attempt (outbox entries), a report check (delivered studies within
    /// the report window), or nothing.
    fn due(&self, rec: &SessionRecord, config: &OutboxConfig, now: OffsetDateTime) -> Next {
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

    fn report_next(
        &self,
        delivered: OffsetDateTime,
        next: OffsetDateTime,
        config: &OutboxConfig,
    ) -> Next {
        let window = plus(delivered, config.report_window);
        if self.inner.reports.get().is_none() || next > window {
            Next::Done
        } else {
            Next::At(next)
        }
    }

    /// Ask the report source for new reports of a delivered study, if a
    /// check is due. New reports (not instances the gateway delivered) are
    /// recorded in the session and returned as events.
    pub async fn check_reports(
        &self,
        id: SessionId,
        config: &OutboxConfig,
    ) -> Result<(Vec<OutboxEvent>, Next)> {
        let Some(source) = self.inner.reports.get().cloned() else {
            return Ok((Vec::new(), Next::Done));
        };
        let current = match self.inner.sessions.load_session(id).await {
            Ok(v) => v,
            Err(Error::NotFound { .. }) => return Ok((Vec::new(), Next::Done)),
            Err(e) => return Err(e),
        };
        let SessionState::Delivered { at, .. } = current.value.state else {
            return Ok((Vec::new(), Next::Done));
        };
        let now = OffsetDateTime::now_utc();
        let due = plus(
            current.value.delivery.reports_checked_at.unwrap_or(at),
            config.report_poll_interval,
        );
        if due > now {
            return Ok((Vec::new(), self.report_next(at, due, config)));
        }
        let studies: BTreeSet<Uid> = Self::instances_of(&current.value)
            .into_iter()
            .map(|i| i.dicom.study_instance_uid)
            .collect();
        let mut found = Vec::new();
        for s in &studies {
            found.extend(source.find_reports(s).await?);
        }
        let rec = &current.value;
        let known: BTreeSet<&str> = rec
            .delivery
            .reports
            .iter()
            .map(|r| r.sop_instance_uid.as_str())
            .chain(rec.delivery.confirmed.keys().map(String::as_str))
            .collect();
        let new: Vec<ReportRef> = found
            .into_iter()
            .filter(|r| !known.contains(r.sop_instance_uid.as_str()))
            .collect();
        let owner = rec.owner.clone();
        let (_, ()) = self
            .update(id, current, |r| {
                r.delivery.reports.extend(new.iter().cloned());
                r.delivery.reports_checked_at = Some(now);
                Ok(())
            })
            .await?;
        let events = new
            .into_iter()
            .map(|report| OutboxEvent::ReportReady {
                session: id,
                owner: owner.clone(),
                report,
            })
            .collect();
        Ok((
            events,
            self.report_next(at, plus(now, config.report_poll_interval), config),
        ))
    }

    /// Put a dead-lettered session back in the outbox (admin only). Every
    /// file is first re-read and checked against its verified SHA-256: a
    /// file changed at rest is never forwarded. Audited.
    ///
    /// # Errors
    /// [`Error::Auth`] for a non-admin, [`Error::Conflict`] when the session
    /// is not in dead letters, [`Error::Integrity`] when a file no longer
    /// verifies.
    pub async fn replay(&self, actor: &Actor, id: SessionId) -> Result<SessionRecord> {
        let mut ev = Self::event(
            actor,
            AuditAction::ForwardReplayed,
            AuditOutcome::Success,
            Some(id),
        );
        if let Err(e) = admin_only(actor, "replaying a delivery needs the admin role") {
            return self.refuse(ev, e).await;
        }
        let gate = self.gate(id);
        let _g = gate.rw.read().await;
        let current = self.inner.sessions.load_session(id).await?;
        ev.study = current.value.study_instance_uid.clone();
        if !matches!(current.value.state, SessionState::DeadLetter { .. }) {
            return self
                .refuse(
                    ev,
                    Error::conflict(
                        "RELAY_NOT_DEAD_LETTER",
                        "the session is not in dead letters",
                    ),
                )
                .await;
        }
        let source = StoreSource {
            chunks: self.inner.chunks.clone(),
        };
        for inst in Self::instances_of(&current.value) {
            let mut check = source.open(&inst).await?;
            while let Some(part) = check.next().await {
                if let Err(e) = part {
                    return self.refuse(ev, e).await;
                }
            }
        }
        let now = OffsetDateTime::now_utc();
        let (rec, ()) = self
            .update(id, current, |r| {
                if !matches!(r.state, SessionState::DeadLetter { .. }) {
                    return Err(Error::conflict(
                        "RELAY_NOT_DEAD_LETTER",
                        "the session is not in dead letters",
                    ));
                }
                let replays = r.delivery.replays + 1;
                let confirmed = std::mem::take(&mut r.delivery.confirmed);
                r.state = SessionState::Forwarding;
                r.delivery = Delivery {
                    queued_at: Some(now),
                    next_attempt_at: Some(now),
                    replays,
                    confirmed,
                    ..Default::default()
                };
                Ok(())
            })
            .await?;
        ev.detail = format!("replay={}", rec.delivery.replays);
        self.audit(ev).await?;
        self.wake_outbox(id);
        Ok(rec)
    }

    /// Sessions in the outbox, or in dead letters (admin only; audited as
    /// data access since entries name studies).
    ///
    /// # Errors
    /// [`Error::Auth`] for a non-admin.
    pub async fn outbox_entries(&self, actor: &Actor, dead: bool) -> Result<Vec<SessionRecord>> {
        let mut ev = Self::event(
            actor,
            AuditAction::DataAccessed,
            AuditOutcome::Success,
            None,
        );
        ev.detail = if dead { "dead letters" } else { "outbox" }.into();
        if let Err(e) = admin_only(actor, "the outbox is for administrators") {
            return self.refuse(ev, e).await;
        }
        let mut out = Vec::new();
        for id in self.inner.sessions.list_sessions().await? {
            let rec = match self.inner.sessions.load_session(id).await {
                Ok(v) => v.value,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let take = match rec.state {
                SessionState::Forwarding => !dead,
                SessionState::DeadLetter { .. } => dead,
                _ => false,
            };
            if take {
                out.push(rec);
            }
        }
        out.sort_by_key(|r| r.delivery.queued_at);
        self.audit(ev).await?;
        Ok(out)
    }

    /// Stream a report of the actor's own delivered study (or any, for an
    /// admin) from the PACS. Audited as access to patient data.
    ///
    /// # Errors
    /// [`Error::NotFound`] for another user's session or an unknown report.
    pub async fn fetch_report(
        &self,
        actor: &Actor,
        id: SessionId,
        sop_instance_uid: &str,
    ) -> Result<(ReportRef, ByteStream)> {
        let mut ev = Self::event(
            actor,
            AuditAction::DataAccessed,
            AuditOutcome::Success,
            Some(id),
        );
        ev.detail = format!("report {sop_instance_uid}");
        // A refused look at someone else's report is recorded too.
        let rec = match self.load_owned(actor, id).await {
            Ok(v) => v.value,
            Err(e) => return self.refuse(ev, e).await,
        };
        ev.study = rec.study_instance_uid.clone();
        ev.patient_id = Some(patients_of(&Self::instances_of(&rec)));
        let Some(report) = rec
            .delivery
            .reports
            .iter()
            .find(|r| r.sop_instance_uid.as_str() == sop_instance_uid)
            .cloned()
        else {
            return self.refuse(ev, Error::NotFound { what: "report" }).await;
        };
        let Some(source) = self.inner.reports.get().cloned() else {
            return self.refuse(ev, Error::NotFound { what: "report" }).await;
        };
        match source.fetch_report(&report).await {
            Ok(stream) => {
                self.audit(ev).await?;
                Ok((report, stream))
            }
            Err(e) => self.refuse(ev, e).await,
        }
    }
}

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

    /// One step for one entry: a delivery attempt, or a report check.
    async fn step(&self, id: SessionId) -> Next {
        let result = match self
            .pipeline
            .attempt_delivery(id, &self.worker, &self.config)
            .await
        {
            Ok((Some(event), next)) => {
                self.listener.on_event(&event).await;
                Ok(next)
            }
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
        for e in &events {
            self.listener.on_event(e).await;
        }
        Ok(next)
    }

    /// Step `due`, `parallel` at a time; what each needs next.
    async fn step_all(&self, due: Vec<SessionId>) -> Vec<(SessionId, Next)> {
        futures::stream::iter(due)
            .map(|id| async move { (id, self.step(id).await) })
            .buffer_unordered(self.config.parallel.max(1))
            .collect()
            .await
    }

    /// Load every session's schedule from the store.
    async fn scan(&self, schedule: &mut HashMap<SessionId, OffsetDateTime>) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        for id in self.pipeline.inner.sessions.list_sessions().await? {
            let rec = match self.pipeline.inner.sessions.load_session(id).await {
                Ok(v) => v.value,
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
    /// entry when due, `parallel` at a time.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut schedule: HashMap<SessionId, OffsetDateTime> = HashMap::new();
        let mut last_scan: Option<tokio::time::Instant> = None;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let c = OutboxConfig {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            ..OutboxConfig::default()
        };
        // Jitter adds up to 100%: attempt n waits in [d, 2d], d = min(2^(n-1), cap).
        for (attempt, d) in [(1u32, 1u64), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)] {
            let w = c.backoff(attempt, None);
            assert!(w >= Duration::from_secs(d), "attempt {attempt}: {w:?}");
            assert!(w <= Duration::from_secs(2 * d), "attempt {attempt}: {w:?}");
        }
        let w = c.backoff(1, Some(Duration::from_secs(120)));
        assert!(
            w >= Duration::from_secs(120),
            "Retry-After is a floor: {w:?}"
        );
    }

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

    #[test]
    fn configuration_round_trips_in_seconds() {
        let c = OutboxConfig::default();
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["base_delay"], 1.0);
        let back: OutboxConfig = serde_json::from_value(j).unwrap();
        assert_eq!(back, c);
    }
}

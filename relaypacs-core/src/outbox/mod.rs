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
//!
//! The worker takes due entries in batches
//! ([`Pipeline::attempt_deliveries`]): each entry is attempted as above,
//! on its own, but a batch's leases are taken in one store write and its
//! outcomes recorded in another, and its events reach the listener
//! together ([`OutboxListener::on_events`]).

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

mod attempt;
mod config;
mod reports;
mod worker;

pub use config::OutboxConfig;
pub use worker::Outbox;

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
///
/// # Contract
/// - Each event is told once, after the state change it reports is
///   durable, from the outbox worker: [`on_events`](Self::on_events)
///   with the events of one batch (its default calls
///   [`on_event`](Self::on_event) for each). Several entries may be
///   worked at once, so calls may overlap.
/// - The worker waits for it: keep it short, hand slow work (mail, push)
///   to a task or a queue of your own.
///
/// # Errors
/// None reach the caller: the state change has already happened, so a
/// listener handles its own failures (logs them, retries them itself). An
/// event lost by a listener is not sent again; the durable session record
/// remains the source of truth.
///
/// # Cancellation
/// [`Outbox::run`] stops at its `shutdown` future between steps, never
/// inside `on_event`. A call is dropped midway only when the task running
/// the worker is aborted or its runtime shuts down; the event may then be
/// half-handled, and it is not repeated.
#[async_trait]
pub trait OutboxListener: Send + Sync + 'static {
    /// Called once per event, after the state change is durable.
    async fn on_event(&self, event: &OutboxEvent);

    /// The events of one batch of attempts (see
    /// [`Pipeline::attempt_deliveries`]), each once, after their state
    /// changes are durable: override to handle them together (e.g. store
    /// their notifications in one transaction). The default calls
    /// [`on_event`](Self::on_event) for each, in order.
    async fn on_events(&self, events: &[OutboxEvent]) {
        for e in events {
            self.on_event(e).await;
        }
    }
}

/// When an entry needs the worker again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// At this time.
    At(OffsetDateTime),
    /// Never (delivered and past the report window, dead letter, gone).
    Done,
}

/// One entry's answer from [`Pipeline::attempt_deliveries`]: the event to
/// report, if any, and when to look again; or why the attempt failed.
pub type Attempted = (SessionId, Result<(Option<OutboxEvent>, Next)>);

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

impl Pipeline {
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
            .update_head(id, current, true, |r| {
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
}

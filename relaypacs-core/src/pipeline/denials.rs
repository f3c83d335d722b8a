//! Aggregated audit of denied and refused requests, so that a flood of them
//! cannot flood the trail.
//!
//! # The rule
//! Denials are grouped by key — (actor, audit action, what was attempted,
//! object) — and by UTC minute (the window: `unix_seconds / 60`).
//! - The **first** denial of a key in a window is recorded at once, with
//!   `count=1` (the alert).
//! - Further denials of that key in the same window are only counted.
//! - When the window is closed — by the first call of [`DenialAudit::record`]
//!   (for any key) in a later minute, or by [`DenialAudit::flush`] — a key
//!   denied more than once in it gets **one** summary record with
//!   `count=N`, N being every denial of that key in the window (the first
//!   included). A key denied once gets nothing more.
//!
//! So per key and minute the trail holds one record for a single denial and
//! exactly two (the alert, then one summary) for any storm, 2 or a million.
//! The server calls [`DenialAudit::flush`] periodically and at stop; counts
//! still in memory when the process dies are lost (the alert of each window
//! is already durable).
//!
//! Memory: only windows of the current minute are held (older ones are
//! closed on the next call). Past `max_keys` keys in one minute, new keys
//! of an actor are counted under the object `*` (one key per actor,
//! action and attempt), so the map stays bounded whatever the objects.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use time::OffsetDateTime;

use crate::audit::{AuditEvent, AuditSink};
use crate::error::{Error, Result};

/// The source of the current time (injectable for tests).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// Keys held per minute before new objects are counted under `*`.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    user: String,
    /// The audit action's name (`AuditAction` is not `Hash`).
    action: String,
    attempted: String,
    object: String,
}

#[derive(Debug)]
struct Window {
    minute: i64,
    count: u64,
    /// The first denial's event, reused for the summary.
    template: AuditEvent,
}

#[derive(Debug, Default)]
struct State {
    windows: HashMap<Key, Window>,
    /// The minute up to which windows were closed.
    swept: i64,
}

/// Records denied or refused requests in the audit trail, aggregated per
/// actor, action, object and minute (see the [module docs](self) for the
/// exact rule). Shared by the pipeline (cross-user access, refused session
/// creation) and by the HTTP layer (forged tokens, admin routes): get the
/// pipeline's with [`Pipeline::denials`](crate::Pipeline::denials).
pub struct DenialAudit {
    sink: Arc<dyn AuditSink>,
    clock: RwLock<Clock>,
    max_keys: usize,
    state: Mutex<State>,
}

impl fmt::Debug for DenialAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenialAudit")
            .field("sink", &self.sink.to_string())
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

fn minute_of(t: OffsetDateTime) -> i64 {
    t.unix_timestamp().div_euclid(60)
}

fn window_start(minute: i64) -> String {
    OffsetDateTime::from_unix_timestamp(minute.saturating_mul(60))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| minute.to_string())
}

fn describe(key: &Key, first_detail: &str, count: u64, minute: i64, summary: bool) -> String {
    let mut d = format!(
        "denied {} on {}: count={} window={}",
        key.attempted,
        key.object,
        count,
        window_start(minute)
    );
    if summary {
        d.push_str(" summary");
    }
    if !first_detail.is_empty() {
        d.push_str("; ");
        d.push_str(first_detail);
    }
    d
}

impl DenialAudit {
    /// An aggregator writing to `sink`, on the system clock.
    pub fn new(sink: Arc<dyn AuditSink>) -> Self {
        Self {
            sink,
            clock: RwLock::new(Arc::new(OffsetDateTime::now_utc)),
            max_keys: DEFAULT_MAX_KEYS,
            state: Mutex::new(State::default()),
        }
    }

    /// The same with at most `max_keys` keys per minute (at least 1).
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Replace the clock (tests, simulations).
    pub fn set_clock(&self, clock: Clock) {
        match self.clock.write() {
            Ok(mut c) => *c = clock,
            Err(p) => *p.into_inner() = clock,
        }
    }

    fn now(&self) -> OffsetDateTime {
        let c = match self.clock.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        c()
    }

    /// Record one denial at the clock's time. `event` is what the record
    /// says (actor, address, audit action, outcome, session, file; its
    /// `detail` is kept after the count), `attempted` names what was tried
    /// (`"read_file"`, `"bearer_token"`…), `object` what it targeted.
    ///
    /// # Errors
    /// [`Error::Audit`] when a record could not be written (the request is
    /// refused either way; the caller keeps its own answer).
    pub async fn record(&self, event: AuditEvent, attempted: &str, object: &str) -> Result<()> {
        let now = self.now();
        self.record_at(now, event, attempted, object).await
    }

    /// [`record`](Self::record) at an explicit time.
    ///
    /// # Errors
    /// As [`record`](Self::record).
    pub async fn record_at(
        &self,
        now: OffsetDateTime,
        event: AuditEvent,
        attempted: &str,
        object: &str,
    ) -> Result<()> {
        let minute = minute_of(now);
        let mut key = Key {
            user: event.user.clone(),
            action: format!("{:?}", event.action),
            attempted: attempted.to_owned(),
            object: object.to_owned(),
        };
        let (summaries, alert) = {
            let mut st = crate::pipeline::lock(&self.state);
            let summaries = Self::sweep(&mut st, minute, now);
            if !st.windows.contains_key(&key) && st.windows.len() >= self.max_keys {
                key.object = "*".into();
            }
            let alert = match st.windows.get_mut(&key) {
                Some(w) => {
                    w.count = w.count.saturating_add(1);
                    None
                }
                None => {
                    let mut alert = event.clone();
                    alert.time = now;
                    alert.detail = describe(&key, &event.detail, 1, minute, false);
                    st.windows.insert(
                        key,
                        Window {
                            minute,
                            count: 1,
                            template: event,
                        },
                    );
                    Some(alert)
                }
            };
            (summaries, alert)
        };
        let mut result = self.write(&summaries).await;
        if let Some(alert) = alert {
            let r = self.write(std::slice::from_ref(&alert)).await;
            result = result.and(r);
        }
        result
    }

    /// Close every window that ended before the clock's minute, writing
    /// their summaries. Returns how many summary records were written.
    ///
    /// # Errors
    /// [`Error::Audit`] when a summary could not be written.
    pub async fn flush(&self) -> Result<usize> {
        let now = self.now();
        self.flush_at(now).await
    }

    /// [`flush`](Self::flush) at an explicit time.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    pub async fn flush_at(&self, now: OffsetDateTime) -> Result<usize> {
        let summaries = {
            let mut st = crate::pipeline::lock(&self.state);
            Self::sweep(&mut st, minute_of(now), now)
        };
        self.write(&summaries).await?;
        Ok(summaries.len())
    }

    /// Windows currently open (for tests and metrics).
    pub fn pending(&self) -> usize {
        crate::pipeline::lock(&self.state).windows.len()
    }

    /// Remove windows of minutes before `minute`; the summaries to write.
    fn sweep(st: &mut State, minute: i64, now: OffsetDateTime) -> Vec<AuditEvent> {
        if minute <= st.swept {
            return Vec::new();
        }
        st.swept = minute;
        let closed: Vec<Key> = st
            .windows
            .iter()
            .filter(|(_, w)| w.minute < minute)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in closed {
            if let Some(w) = st.windows.remove(&k)
                && w.count > 1
            {
                let mut ev = w.template;
                ev.time = now;
                ev.detail = describe(&k, &ev.detail, w.count, w.minute, true);
                out.push(ev);
            }
        }
        // Sorted by their text, so the order does not depend on the map.
        out.sort_by(|a, b| a.detail.cmp(&b.detail));
        out
    }

    async fn write(&self, events: &[AuditEvent]) -> Result<()> {
        let mut result = Ok(());
        for e in events {
            if let Err(err) = self.sink.record(e).await {
                result = Err(Error::Audit {
                    source: Box::new(err),
                });
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

    use super::*;
    use crate::audit::{AuditAction, AuditOutcome};
    use async_trait::async_trait;

    /// An in-memory trail: every record kept in order.
    #[derive(Debug, Default)]
    struct Trail(Mutex<Vec<AuditEvent>>);

    impl fmt::Display for Trail {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("trail")
        }
    }

    #[async_trait]
    impl AuditSink for Trail {
        async fn record(&self, event: &AuditEvent) -> Result<()> {
            crate::pipeline::lock(&self.0).push(event.clone());
            Ok(())
        }
        async fn events(&self) -> Result<Vec<AuditEvent>> {
            Ok(crate::pipeline::lock(&self.0).clone())
        }
    }

    fn alert(user: &str) -> AuditEvent {
        AuditEvent::new(user, AuditAction::SecurityAlert, AuditOutcome::MinorFailure)
    }

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    fn setup() -> (Arc<Trail>, DenialAudit) {
        let trail = Arc::new(Trail::default());
        let d = DenialAudit::new(trail.clone());
        (trail, d)
    }

    fn details(trail: &Trail) -> Vec<String> {
        crate::pipeline::lock(&trail.0)
            .iter()
            .map(|e| e.detail.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_storm_of_1000_is_one_alert_then_one_summary() {
        let (trail, d) = setup();
        // 1800000000 is 00:00 of a minute; the storm stays in it.
        for i in 0..1000 {
            d.record_at(at(i % 60), alert("mallory"), "read_file", "session s1")
                .await
                .unwrap();
        }
        assert_eq!(details(&trail).len(), 1);
        assert!(
            details(&trail)[0].contains("count=1 "),
            "{:?}",
            details(&trail)
        );
        // Still the same minute: nothing to close.
        assert_eq!(d.flush_at(at(59)).await.unwrap(), 0);
        assert_eq!(d.flush_at(at(60)).await.unwrap(), 1);
        let all = details(&trail);
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(
            all[1].contains("count=1000 ") && all[1].contains("summary"),
            "{all:?}"
        );
        assert_eq!(d.pending(), 0);
        // Closed windows are not summarised twice.
        assert_eq!(d.flush_at(at(600)).await.unwrap(), 0);
        assert_eq!(details(&trail).len(), 2);
    }

    #[tokio::test]
    async fn a_single_denial_is_exactly_one_record() {
        let (trail, d) = setup();
        d.record_at(at(5), alert("mallory"), "abort_session", "session s1")
            .await
            .unwrap();
        assert_eq!(d.flush_at(at(3600)).await.unwrap(), 0);
        let all = crate::pipeline::lock(&trail.0).clone();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].action, AuditAction::SecurityAlert);
        assert_eq!(all[0].event_id, 110113);
        assert_eq!(all[0].user, "mallory");
        assert_eq!(all[0].time, at(5));
        assert!(
            all[0]
                .detail
                .starts_with("denied abort_session on session s1: count=1 window=")
        );
    }

    #[tokio::test]
    async fn keys_are_separate_and_the_next_minute_closes_the_last() {
        let (trail, d) = setup();
        for _ in 0..3 {
            d.record_at(at(1), alert("mallory"), "read_file", "session s1")
                .await
                .unwrap();
            d.record_at(at(2), alert("mallory"), "read_file", "session s2")
                .await
                .unwrap();
            d.record_at(at(3), alert("eve"), "read_file", "session s1")
                .await
                .unwrap();
            d.record_at(at(4), alert("mallory"), "abort_session", "session s1")
                .await
                .unwrap();
        }
        assert_eq!(details(&trail).len(), 4);
        // A denial of a new minute (any key) closes the old windows first.
        d.record_at(at(61), alert("mallory"), "read_file", "session s1")
            .await
            .unwrap();
        let all = details(&trail);
        assert_eq!(all.len(), 4 + 4 + 1, "{all:?}");
        assert_eq!(
            all[4..8].iter().filter(|d| d.contains("count=3 ")).count(),
            4
        );
        assert!(all[8].contains("count=1 "));
    }

    #[tokio::test]
    async fn past_max_keys_new_objects_are_counted_under_a_star() {
        let trail = Arc::new(Trail::default());
        let d = DenialAudit::new(trail.clone()).with_max_keys(2);
        for i in 0..5 {
            d.record_at(
                at(1),
                alert("mallory"),
                "read_file",
                &format!("session s{i}"),
            )
            .await
            .unwrap();
        }
        assert_eq!(d.pending(), 3);
        let all = details(&trail);
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(all[2].starts_with("denied read_file on *: count=1"));
        d.flush_at(at(60)).await.unwrap();
        let all = details(&trail);
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(all[3].starts_with("denied read_file on *: count=3"));
    }

    #[tokio::test]
    async fn the_clock_is_injectable() {
        let (trail, d) = setup();
        let now = Arc::new(Mutex::new(at(0)));
        let n = now.clone();
        d.set_clock(Arc::new(move || *crate::pipeline::lock(&n)));
        d.record(alert("mallory"), "bearer_token", "10.0.0.1")
            .await
            .unwrap();
        d.record(alert("mallory"), "bearer_token", "10.0.0.1")
            .await
            .unwrap();
        assert_eq!(d.flush().await.unwrap(), 0);
        *crate::pipeline::lock(&now) = at(120);
        assert_eq!(d.flush().await.unwrap(), 1);
        let all = crate::pipeline::lock(&trail.0).clone();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].time, at(120));
        assert!(all[1].detail.contains("count=2 "));
    }
}

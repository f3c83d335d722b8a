//! Live events (per-user broadcast, for server-sent events) and durable
//! notifications (SQL rows, visible to their owner only).
//!
//! Several gateways on one PostgreSQL database share both: notifications
//! are rows of the shared database, created once per study whichever
//! gateway (or repair pass) gets there first, and every live event is also
//! sent with `NOTIFY` on
//! [`EVENTS_CHANNEL`](relaypacs_storage::sql_notifications::EVENTS_CHANNEL); each gateway `LISTEN`s and
//! hands the events of other gateways to its own streams. On SQLite (one
//! gateway) events stay in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relaypacs_core::{Error, Result, SessionState, Verification};
use relaypacs_storage::SqlNotificationStore;
use relaypacs_storage::sql_notifications::{
    KIND_DELIVERED, KIND_FORWARD_FAILED, MAX_EVENT_PAYLOAD, NewNotification, StoredNotification,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};

use crate::metrics::Metrics;
use crate::upload_id::UploadId;

/// One live event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Bytes of an upload became durable.
    UploadProgress {
        /// Study session id.
        study: String,
        /// tus upload id.
        upload: UploadId,
        /// Durable offset.
        offset: u64,
        /// Declared length.
        length: u64,
    },
    /// A file was verified and validated (or refused).
    FileCompleted {
        /// Study session id.
        study: String,
        /// tus upload id.
        upload: UploadId,
        /// Whether it validated.
        ok: bool,
        /// Error code when it did not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    /// A notification was created (delivery, failure, report).
    Notification(Notification),
}

/// Kinds of notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// The study reached the PACS.
    Delivered,
    /// Forwarding failed.
    ForwardFailed,
    /// A report is available.
    ReportReady,
}

/// A durable notification for one user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Random id.
    pub id: String,
    /// What happened.
    pub kind: NotificationKind,
    /// Study session id.
    pub study: String,
    /// Short text (no patient data).
    pub message: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Whether the owner marked it read.
    pub read: bool,
    /// For `delivered`: how the PACS was confirmed to hold the study
    /// (`content`: every instance retrieved and compared; `presence-only`:
    /// for some, only the SOP Instance UID was found).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verification>,
}

/// How often the repair pass looks for recent deliveries without their
/// notification (see [`Hub::repair_recent`]); a full pass
/// ([`Hub::repair`]) runs at start.
pub const REPAIR_EVERY: Duration = Duration::from_secs(60);

/// How far back the periodic repair pass looks (by the session's last
/// write). A delivery whose notification a crash lost is repaired by any
/// gateway still running within [`REPAIR_EVERY`]; one lost while every
/// gateway was down longer than this is found by the full pass each
/// gateway makes at start.
pub const REPAIR_WINDOW: Duration = Duration::from_secs(3600);

/// Studies the repair pass handles at most per run.
const REPAIR_BATCH: i64 = 1_000;

/// Live events waiting to be sent to the other gateways; beyond this, new
/// ones are dropped (logged) rather than slowing uploads down.
const OUTGOING_QUEUE: usize = 4_096;

/// The text of a dead-letter notification.
const FORWARD_FAILED_MESSAGE: &str =
    "delivery to the PACS failed; an administrator has been alerted";

impl NotificationKind {
    /// The stored name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => KIND_DELIVERED,
            Self::ForwardFailed => KIND_FORWARD_FAILED,
            Self::ReportReady => relaypacs_storage::sql_notifications::KIND_REPORT_READY,
        }
    }
}

/// One live event on `relaypacs_events`: from which gateway, for which
/// user, and the event itself or (when it would not fit in a `NOTIFY`
/// payload) the id of the notification to read.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    from: String,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<Event>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notification: Option<String>,
}

/// Per-user live event channels and the notification store.
#[derive(Debug, Clone)]
pub struct Hub {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

#[derive(Debug)]
struct Shared {
    store: SqlNotificationStore,
    channels: Mutex<HashMap<String, broadcast::Sender<Event>>>,
    /// This gateway's random id: its own events come back from `LISTEN`
    /// and are skipped (they were delivered locally at once).
    instance: String,
    /// PostgreSQL: live events to `NOTIFY` (a task sends them in order).
    outgoing: Option<mpsc::Sender<String>>,
}

/// The hub's background tasks, aborted with the last clone of the hub.
#[derive(Debug)]
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Where a PostgreSQL gateway listens for other gateways' events: the
/// state URL and its password (kept out of the URL and of logs).
#[derive(Clone)]
pub struct Listen {
    /// `postgres://…`.
    pub url: String,
    /// The password, if not in the URL.
    pub password: Option<String>,
}

impl std::fmt::Debug for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listen(..)")
    }
}

use relaypacs_storage::fs::lock;

impl Shared {
    fn publish_local(&self, user: &str, event: Event) {
        let mut m = lock(&self.channels);
        if let Some(tx) = m.get(user)
            && tx.send(event).is_err()
        {
            m.remove(user);
        }
    }

    /// The `NOTIFY` payload of `event`, by reference when too large.
    fn wire(&self, user: &str, event: &Event) -> Option<String> {
        let mut w = Wire {
            from: self.instance.clone(),
            user: user.to_owned(),
            event: Some(event.clone()),
            notification: None,
        };
        let text = serde_json::to_string(&w).ok()?;
        if text.len() <= MAX_EVENT_PAYLOAD {
            return Some(text);
        }
        let Event::Notification(n) = event else {
            // Progress and completion events are small (ids, numbers, an
            // error code): never reached.
            tracing::warn!("a live event too large for NOTIFY was not sent to other gateways");
            return None;
        };
        w.event = None;
        w.notification = Some(n.id.clone());
        serde_json::to_string(&w).ok()
    }

    /// A payload from `LISTEN`: another gateway's event for one of ours.
    fn received(self: &Arc<Self>, payload: &str) {
        let w: Wire = match serde_json::from_str(payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "live events: a payload this gateway did not send");
                return;
            }
        };
        if w.from == self.instance || !lock(&self.channels).contains_key(&w.user) {
            return;
        }
        match (w.event, w.notification) {
            (Some(ev), _) => self.publish_local(&w.user, ev),
            (None, Some(id)) => {
                let me = self.clone();
                tokio::spawn(async move {
                    match me.store.get(&id).await {
                        Ok(Some(s)) if s.owner == w.user => match decode(s) {
                            Ok(n) => me.publish_local(&w.user, Event::Notification(n)),
                            Err(e) => tracing::warn!(error = %e, "live events: notification"),
                        },
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "live events: notification"),
                    }
                });
            }
            (None, None) => {}
        }
    }
}

/// A stored notification as the API shows it.
fn decode(s: StoredNotification) -> Result<Notification> {
    let mut n: Notification = serde_json::from_str(&s.body).map_err(|e| {
        Error::storage(
            relaypacs_core::StorageErrorKind::Corrupt,
            "decode a notification",
            e,
        )
    })?;
    n.read = s.read;
    Ok(n)
}

impl Hub {
    /// Notifications in `store`; on PostgreSQL, with `listen`, live events
    /// also cross gateways (a `LISTEN` connection and a sender task). Runs
    /// the repair pass once (see [`repair`](Self::repair)), then every
    /// [`REPAIR_EVERY`] in a task. Must be called inside a Tokio runtime.
    pub async fn open(store: SqlNotificationStore, listen: Option<Listen>) -> Result<Self> {
        let mut tasks = Vec::new();
        let pg = store.engine() == relaypacs_storage::Engine::Postgres;
        let outgoing = if pg {
            let (tx, mut rx) = mpsc::channel::<String>(OUTGOING_QUEUE);
            let s = store.clone();
            tasks.push(
                tokio::spawn(async move {
                    while let Some(payload) = rx.recv().await {
                        if let Err(e) = s.publish(&payload).await {
                            // Lost for other gateways' streams only; the
                            // state it reports is durable.
                            tracing::warn!(error = %e, "could not send a live event to other gateways");
                        }
                    }
                })
                .abort_handle(),
            );
            Some(tx)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            store,
            channels: Mutex::new(HashMap::new()),
            instance: relaypacs_core::FileId::random().to_string(),
            outgoing,
        });
        if pg && let Some(l) = listen {
            let weak = Arc::downgrade(&shared);
            tasks.push(
                tokio::spawn(relaypacs_storage::sql_notifications::listen_events(
                    l.url,
                    l.password,
                    move |payload| {
                        if let (Some(p), Some(s)) = (payload, weak.upgrade()) {
                            s.received(p);
                        }
                    },
                ))
                .abort_handle(),
            );
        }
        let hub = Self {
            shared,
            _tasks: Arc::new(Tasks(Vec::new())),
        };
        if let Err(e) = hub.repair().await {
            tracing::error!(error = %e, "notification repair failed");
        }
        let weak = Arc::downgrade(&hub.shared);
        tasks.push(
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REPAIR_EVERY).await;
                    let Some(shared) = weak.upgrade() else { return };
                    let h = Self {
                        shared,
                        _tasks: Arc::new(Tasks(Vec::new())),
                    };
                    if let Err(e) = h.repair_recent(REPAIR_WINDOW).await {
                        tracing::error!(error = %e, "notification repair failed");
                    }
                }
            })
            .abort_handle(),
        );
        Ok(Self {
            shared: hub.shared,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Whether notification `id` exists and belongs to someone other than
    /// `user`.
    pub async fn held_by_another(&self, user: &str, id: &str) -> Result<bool> {
        self.shared.store.held_by_another(user, id).await
    }

    /// Subscribe to `user`'s events (this gateway's and, on PostgreSQL,
    /// every other gateway's).
    pub fn subscribe(&self, user: &str) -> broadcast::Receiver<Event> {
        lock(&self.shared.channels)
            .entry(user.to_string())
            .or_insert_with(|| broadcast::channel(256).0)
            .subscribe()
    }

    /// Send an event to `user`'s open streams, on this gateway at once and
    /// (PostgreSQL) on the others through `NOTIFY` (none open: dropped).
    pub fn publish(&self, user: &str, event: Event) {
        if let Some(tx) = &self.shared.outgoing
            && let Some(payload) = self.shared.wire(user, &event)
            && let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(payload)
        {
            tracing::warn!("live events queue full: an event was not sent to other gateways");
        }
        self.shared.publish_local(user, event);
    }

    /// Durably add a notification for `user`, then push it live.
    /// `AlreadyExists` if (`study`, `kind`) was notified before.
    pub async fn notify(
        &self,
        user: &str,
        kind: NotificationKind,
        study: &str,
        message: &str,
    ) -> Result<Notification> {
        self.notify_verified(user, kind, study, message, None).await
    }

    /// Like [`notify`](Self::notify), with how a delivery was verified.
    pub async fn notify_verified(
        &self,
        user: &str,
        kind: NotificationKind,
        study: &str,
        message: &str,
        verified: Option<Verification>,
    ) -> Result<Notification> {
        self.notify_once(user, kind, study, "", message, verified)
            .await?
            .ok_or(Error::AlreadyExists {
                what: "notification",
            })
    }

    /// Durably add a notification for `user` unless one of `kind` for
    /// (`study`, `subject`) was ever created (by any gateway), then push it
    /// live; `None` when it was. `subject`: `""` for one per study, a
    /// report's SOP Instance UID for one per report.
    pub async fn notify_once(
        &self,
        user: &str,
        kind: NotificationKind,
        study: &str,
        subject: &str,
        message: &str,
        verified: Option<Verification>,
    ) -> Result<Option<Notification>> {
        let notice = Notice {
            user,
            kind,
            study: study.to_owned(),
            subject,
            message: message.to_owned(),
            verified,
        };
        Ok(self.notify_all(&[notice]).await?.pop().flatten())
    }

    /// [`notify_once`](Self::notify_once) of each of `notices`, stored in
    /// one transaction (one commit for a batch of deliveries), then pushed
    /// live; one answer per notice, in order.
    pub async fn notify_all(&self, notices: &[Notice<'_>]) -> Result<Vec<Option<Notification>>> {
        let mut made = Vec::with_capacity(notices.len());
        for x in notices {
            let n = Notification {
                id: relaypacs_core::FileId::random().to_string(),
                kind: x.kind,
                study: x.study.clone(),
                message: x.message.clone(),
                created_at: OffsetDateTime::now_utc(),
                read: false,
                verified: x.verified,
            };
            let body = serde_json::to_string(&n).map_err(|e| {
                Error::storage(
                    relaypacs_core::StorageErrorKind::Corrupt,
                    "encode a notification",
                    e,
                )
            })?;
            let created_at = n
                .created_at
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| Error::invalid("RELAY_TIME", e.to_string()))?;
            let event = Event::Notification(n.clone());
            let payload = match self.shared.outgoing {
                Some(_) => self.shared.wire(x.user, &event),
                None => None,
            };
            made.push((n, body, created_at, event, payload));
        }
        let rows: Vec<(NewNotification<'_>, Option<&str>)> = notices
            .iter()
            .zip(&made)
            .map(|(x, (n, body, created_at, _, payload))| {
                (
                    NewNotification {
                        id: &n.id,
                        owner: x.user,
                        kind: x.kind.as_str(),
                        study: &x.study,
                        subject: x.subject,
                        created_at,
                        body,
                    },
                    payload.as_deref(),
                )
            })
            .collect();
        let stored = self.shared.store.insert_many(&rows).await?;
        drop(rows);
        let mut out = Vec::with_capacity(notices.len());
        for ((x, (n, _, _, event, _)), stored) in notices.iter().zip(made).zip(stored) {
            out.push(stored.map(|_| {
                self.shared.publish_local(x.user, event);
                n
            }));
        }
        Ok(out)
    }

    /// `user`'s notifications, newest last.
    pub async fn list(&self, user: &str) -> Result<Vec<Notification>> {
        self.shared
            .store
            .list(user)
            .await?
            .into_iter()
            .map(decode)
            .collect()
    }

    /// Mark one of `user`'s notifications read; `NotFound` if it is not theirs.
    pub async fn mark_read(&self, user: &str, id: &str) -> Result<Notification> {
        match self.shared.store.mark_read(user, id).await? {
            Some(s) => decode(s),
            None => Err(Error::NotFound {
                what: "notification",
            }),
        }
    }

    /// Create the notifications of studies delivered or dead-lettered, and
    /// of reports found for delivered studies, whose notification was never
    /// written (the process died between the state's commit and the
    /// notification's, on any gateway). Safe on every gateway at once:
    /// each is created once (see [`notify_once`](Self::notify_once)).
    /// Returns how many it created. Reads every delivered and
    /// dead-lettered study: made at start; periodically,
    /// [`repair_recent`](Self::repair_recent).
    pub async fn repair(&self) -> Result<usize> {
        let mut created = self.repair_reports(None).await?;
        // Batch after batch while full batches still yield notifications
        // (each one created leaves the list), bounded.
        for _ in 0..1_000 {
            let (listed, made) = self.repair_since(None).await?;
            created += made;
            if listed < usize::try_from(REPAIR_BATCH).unwrap_or(usize::MAX) || made == 0 {
                break;
            }
        }
        Ok(created)
    }

    /// [`repair`](Self::repair) of the studies whose session was last
    /// written within `window` (one batch): what the periodic pass runs.
    pub async fn repair_recent(&self, window: Duration) -> Result<usize> {
        let since = time::OffsetDateTime::now_utc() - window;
        Ok(self.repair_since(Some(since)).await?.1 + self.repair_reports(Some(since)).await?)
    }

    /// The report part of the repair: every delivered study holding
    /// reports, written at or after `since` (all when `None`), page after
    /// page; each report without its notification gets it. Returns how
    /// many this call created.
    async fn repair_reports(&self, since: Option<time::OffsetDateTime>) -> Result<usize> {
        let mut created = 0;
        let mut cursor = None;
        // Bounded: REPAIR_BATCH sessions a page.
        for _ in 0..100_000 {
            let (missed, next) = self
                .shared
                .store
                .missed_reports(REPAIR_BATCH, since, cursor.as_ref())
                .await?;
            for m in missed {
                let uid = m.report.sop_instance_uid.as_str();
                if self
                    .notify_once(
                        &m.owner,
                        NotificationKind::ReportReady,
                        &m.session,
                        uid,
                        &report_message(uid),
                        None,
                    )
                    .await?
                    .is_some()
                {
                    tracing::info!(session = %m.session, report = uid, "report notification repaired");
                    created += 1;
                }
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Ok(created)
    }

    /// One batch of the repair: how many missed studies were listed, and
    /// how many notifications this call created.
    async fn repair_since(&self, since: Option<time::OffsetDateTime>) -> Result<(usize, usize)> {
        let mut created = 0;
        let missed = self.shared.store.missed(REPAIR_BATCH, since).await?;
        let listed = missed.len();
        for m in missed {
            let (kind, message, verified) = match m.state {
                SessionState::Delivered { verified, .. } => (
                    NotificationKind::Delivered,
                    delivered_message(m.instances, verified),
                    Some(verified),
                ),
                SessionState::DeadLetter { .. } => (
                    NotificationKind::ForwardFailed,
                    FORWARD_FAILED_MESSAGE.to_owned(),
                    None,
                ),
                SessionState::Open | SessionState::Forwarding => continue,
            };
            if self
                .notify_once(&m.owner, kind, &m.session, "", &message, verified)
                .await?
                .is_some()
            {
                tracing::info!(session = %m.session, kind = kind.as_str(), "notification repaired");
                created += 1;
            }
        }
        Ok((listed, created))
    }
}

/// The text of a `report_ready` notification.
pub fn report_message(sop_instance_uid: &str) -> String {
    format!("a report is ready: {sop_instance_uid}")
}

/// The text of a `delivered` notification: it says how delivery was
/// verified, and a presence-only check never reads as a plain "delivered".
pub fn delivered_message(instances: usize, verified: Verification) -> String {
    match verified {
        Verification::Content => {
            format!("study delivered: the PACS holds all {instances} instance(s), content verified")
        }
        Verification::PresenceOnly => format!(
            "study delivered (verified: presence-only \u{2014} the PACS reports each instance \
             but its content could not be compared): {instances} instance(s)"
        ),
    }
}

/// One notification to create with [`Hub::notify_all`] (as
/// [`Hub::notify_once`]'s arguments).
#[derive(Debug, Clone)]
pub struct Notice<'a> {
    /// Who sees it.
    pub user: &'a str,
    /// What happened.
    pub kind: NotificationKind,
    /// The study (session id).
    pub study: String,
    /// `""` for one per study, a report's SOP Instance UID for one per report.
    pub subject: &'a str,
    /// What the user reads.
    pub message: String,
    /// How a delivery was verified.
    pub verified: Option<Verification>,
}

/// Turns the delivery worker's events into the uploader's notifications
/// (written durably, then pushed to open event streams) and metrics.
///
/// One notification per study and kind, one per report: a study
/// dead-lettered again after an admin's replay is not notified a second
/// time, and of several gateways' workers (or a worker and a repair pass)
/// reporting one delivery, one creates the notification.
#[derive(Debug, Clone)]
pub struct DeliveryNotifier {
    hub: Hub,
    metrics: Arc<Metrics>,
}

impl DeliveryNotifier {
    /// Notifications go to `hub`, counts to `metrics`.
    pub fn new(hub: Hub, metrics: Arc<Metrics>) -> Self {
        Self { hub, metrics }
    }
}

#[async_trait::async_trait]
impl relaypacs_core::OutboxListener for DeliveryNotifier {
    async fn on_event(&self, event: &relaypacs_core::OutboxEvent) {
        self.on_events(std::slice::from_ref(event)).await;
    }

    /// The batch's notifications in one transaction.
    async fn on_events(&self, events: &[relaypacs_core::OutboxEvent]) {
        use relaypacs_core::OutboxEvent as E;
        let mut notices = Vec::with_capacity(events.len());
        for event in events {
            let (owner, session, kind, subject, message, outcome, verified) = match event {
                E::Delivered {
                    owner,
                    session,
                    instances,
                    verified,
                    ..
                } => (
                    owner,
                    session,
                    NotificationKind::Delivered,
                    "",
                    delivered_message(*instances, *verified),
                    "delivered",
                    Some(*verified),
                ),
                E::DeadLettered { owner, session, .. } => (
                    owner,
                    session,
                    NotificationKind::ForwardFailed,
                    "",
                    FORWARD_FAILED_MESSAGE.to_owned(),
                    "dead_letter",
                    None,
                ),
                E::ReportReady {
                    owner,
                    session,
                    report,
                } => (
                    owner,
                    session,
                    NotificationKind::ReportReady,
                    report.sop_instance_uid.as_str(),
                    report_message(report.sop_instance_uid.as_str()),
                    "report",
                    None,
                ),
                E::Retrying { .. } => {
                    self.metrics.forward("retrying");
                    continue;
                }
            };
            self.metrics.forward(outcome);
            notices.push(Notice {
                user: owner,
                kind,
                study: session.to_string(),
                subject,
                message,
                verified,
            });
        }
        if notices.is_empty() {
            return;
        }
        match self.hub.notify_all(&notices).await {
            Ok(made) => {
                for (n, made) in notices.iter().zip(made) {
                    if made.is_none() {
                        // Another gateway's worker or a repair pass created
                        // it first (one notification per study, or per
                        // report).
                        tracing::debug!(session = %n.study, "already notified");
                    }
                }
            }
            // The deliveries themselves are durable and visible in the
            // studies' state; the repair pass creates a lost `delivered` or
            // dead-letter notification later (see `Hub::repair`). Logged
            // once, here.
            Err(e) => {
                let sessions: Vec<&str> = notices.iter().map(|n| n.study.as_str()).collect();
                tracing::error!(sessions = ?sessions, error = %e, "could not store delivery notifications");
            }
        }
    }
}

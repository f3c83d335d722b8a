//! Live events (per-user broadcast, for server-sent events) and durable
//! notifications (per-user files, visible to their owner only).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use relaypacs_core::{Error, Result, Verification};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::broadcast;

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

/// Per-user event channels and notification files.
#[derive(Debug, Clone)]
pub struct Hub {
    dir: PathBuf,
    channels: Arc<Mutex<HashMap<String, broadcast::Sender<Event>>>>,
    files: Arc<tokio::sync::Mutex<()>>,
    /// Notification id → the file (its owner's) that holds it, so another
    /// user's notification can be told from an unknown id and the denied
    /// access audited. At most 1,000 ids per user, as the files keep.
    owners: Arc<Mutex<HashMap<String, PathBuf>>>,
}

use relaypacs_storage::fs::lock;

impl Hub {
    /// Notifications kept under `dir`.
    pub fn open(dir: PathBuf) -> Result<Self> {
        relaypacs_storage::fs::create_dir_durable(&dir)?;
        let mut owners = HashMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("list notifications", e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| Error::io("list notifications", e))?
                .path();
            if path.extension().is_some_and(|x| x == "json") {
                let list: Vec<Notification> = crate::json_file::read(&path, "read notifications")?;
                for n in list {
                    owners.insert(n.id, path.clone());
                }
            }
        }
        Ok(Self {
            dir,
            channels: Arc::new(Mutex::new(HashMap::new())),
            files: Arc::new(tokio::sync::Mutex::new(())),
            owners: Arc::new(Mutex::new(owners)),
        })
    }

    /// Whether notification `id` exists and belongs to someone other than
    /// `user`.
    pub fn held_by_another(&self, user: &str, id: &str) -> bool {
        let mine = self.path(user);
        lock(&self.owners).get(id).is_some_and(|p| *p != mine)
    }

    /// Subscribe to `user`'s events.
    pub fn subscribe(&self, user: &str) -> broadcast::Receiver<Event> {
        lock(&self.channels)
            .entry(user.to_string())
            .or_insert_with(|| broadcast::channel(256).0)
            .subscribe()
    }

    /// Send an event to `user`'s open streams (none open: dropped).
    pub fn publish(&self, user: &str, event: Event) {
        let mut m = lock(&self.channels);
        if let Some(tx) = m.get(user)
            && tx.send(event).is_err()
        {
            m.remove(user);
        }
    }

    fn path(&self, user: &str) -> PathBuf {
        // User ids are server-generated hex; hash anyway so no client value
        // ever becomes a path.
        self.dir.join(format!(
            "{}.json",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(user.as_bytes()))
        ))
    }

    async fn load(&self, user: &str) -> Result<Vec<Notification>> {
        let path = self.path(user);
        tokio::task::spawn_blocking(move || crate::json_file::read(&path, "read notifications"))
            .await
            .map_err(|e| Error::io("read notifications", std::io::Error::other(e)))?
    }

    async fn store(&self, user: &str, list: Vec<Notification>) -> Result<()> {
        let path = self.path(user);
        tokio::task::spawn_blocking(move || {
            crate::json_file::write(&path, &list, "write notifications")
        })
        .await
        .map_err(|e| Error::io("write notifications", std::io::Error::other(e)))?
    }

    /// Durably add a notification for `user`, then push it live.
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
        let n = Notification {
            id: relaypacs_core::FileId::random().to_string(),
            kind,
            study: study.to_string(),
            message: message.to_string(),
            created_at: OffsetDateTime::now_utc(),
            read: false,
            verified,
        };
        let _g = self.files.lock().await;
        let mut list = self.load(user).await?;
        list.push(n.clone());
        let dropped: Vec<String> = if list.len() > 1000 {
            let cut = list.len() - 1000;
            list.drain(..cut).map(|d| d.id).collect()
        } else {
            Vec::new()
        };
        self.store(user, list).await?;
        {
            let mut owners = lock(&self.owners);
            for id in dropped {
                owners.remove(&id);
            }
            owners.insert(n.id.clone(), self.path(user));
        }
        drop(_g);
        self.publish(user, Event::Notification(n.clone()));
        Ok(n)
    }

    /// `user`'s notifications, newest last.
    pub async fn list(&self, user: &str) -> Result<Vec<Notification>> {
        self.load(user).await
    }

    /// Mark one of `user`'s notifications read; `NotFound` if it is not theirs.
    pub async fn mark_read(&self, user: &str, id: &str) -> Result<Notification> {
        let _g = self.files.lock().await;
        let mut list = self.load(user).await?;
        let n = list
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or(Error::NotFound {
                what: "notification",
            })?;
        n.read = true;
        let out = n.clone();
        self.store(user, list).await?;
        Ok(out)
    }
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

/// Turns the delivery worker's events into the uploader's notifications
/// (written durably, then pushed to open event streams) and metrics.
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
        use relaypacs_core::OutboxEvent as E;
        let (owner, session, kind, message, outcome, verified) = match event {
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
                delivered_message(*instances, *verified),
                "delivered",
                Some(*verified),
            ),
            E::DeadLettered { owner, session, .. } => (
                owner,
                session,
                NotificationKind::ForwardFailed,
                "delivery to the PACS failed; an administrator has been alerted".to_owned(),
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
                format!("a report is ready: {}", report.sop_instance_uid),
                "report",
                None,
            ),
            E::Retrying { .. } => {
                self.metrics.forward("retrying");
                return;
            }
        };
        self.metrics.forward(outcome);
        if let Err(e) = self
            .hub
            .notify_verified(owner, kind, &session.to_string(), &message, verified)
            .await
        {
            // The delivery itself is durable and visible in the study's
            // state; only this message is lost. Logged once, here.
            tracing::error!(session = %session, error = %e, "could not store a delivery notification");
        }
    }
}

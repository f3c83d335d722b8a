//! The [`AuditSink`] trait and the audit event model.
//!
//! Event identifiers follow DICOM PS3.15 Annex A.5 / PS3.16 CID 400–401
//! where one exists, so records can be turned into DICOM audit messages.

use std::fmt::{Debug, Display};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::Result;
use crate::ids::{FileId, SessionId, Uid};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditAction {
    /// An upload session was opened.
    SessionCreated,
    /// A file was declared in a session.
    FileAdded,
    /// A chunk was stored (or refused: see the outcome).
    ChunkStored,
    /// A file was verified and validated (or refused).
    FileCompleted,
    /// A file was removed from a session.
    FileRemoved,
    /// A session's instances are being handed to the PACS.
    ForwardStarted,
    /// The PACS sink reported its outcome.
    Forwarded,
    /// An administrator put a dead-lettered delivery back in the outbox.
    ForwardReplayed,
    /// A session expired and was removed.
    SessionExpired,
    /// A session was aborted by its owner.
    SessionAborted,
    /// Patient data was read (status query, download).
    DataAccessed,
    /// A user logged in (or failed to).
    Login,
    /// A user logged out.
    Logout,
    /// A session token was refreshed (or the refresh was refused).
    TokenRefreshed,
    /// A user account was created or changed (security attributes).
    UserChanged,
    /// The audit trail itself was read.
    AuditLogUsed,
    /// A security alert (token reuse, lockout, configuration change).
    SecurityAlert,
    /// The application started.
    ApplicationStart,
    /// The application stopped.
    ApplicationStop,
}

impl AuditAction {
    /// The DICOM audit Event ID (DCM code, PS3.16 CID 400).
    pub fn dicom_event_id(self) -> u32 {
        match self {
            Self::SessionCreated | Self::FileAdded | Self::ChunkStored | Self::FileCompleted => {
                110107
            } // Import
            Self::FileRemoved | Self::SessionExpired | Self::SessionAborted => 110105, // DICOM Study Deleted
            Self::ForwardStarted | Self::ForwardReplayed => 110102, // Begin Transferring DICOM Instances
            Self::Forwarded => 110104,                              // DICOM Instances Transferred
            Self::DataAccessed => 110103,                           // DICOM Instances Accessed
            Self::Login | Self::Logout | Self::TokenRefreshed => 110114, // User Authentication
            Self::SecurityAlert | Self::UserChanged => 110113,      // Security Alert
            Self::AuditLogUsed => 110101,                           // Audit Log Used
            Self::ApplicationStart | Self::ApplicationStop => 110100, // Application Activity
        }
    }
}

/// Event outcome (PS3.15 A.5 EventOutcomeIndicator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// 0: success.
    Success,
    /// 4: minor failure (the client's request was refused).
    MinorFailure,
    /// 8: serious failure (the action failed).
    SeriousFailure,
    /// 12: major failure.
    MajorFailure,
}

impl AuditOutcome {
    /// The numeric EventOutcomeIndicator.
    pub fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::MinorFailure => 4,
            Self::SeriousFailure => 8,
            Self::MajorFailure => 12,
        }
    }
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Who (user id, or "system").
    pub user: String,
    /// Client address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// What.
    pub action: AuditAction,
    /// DICOM Event ID of `action`.
    pub event_id: u32,
    /// Outcome.
    pub outcome: AuditOutcome,
    /// Session concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    /// File concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileId>,
    /// Study concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<Uid>,
    /// Patient concerned (audit trail only; never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    /// Free text: error code and reason, counts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl AuditEvent {
    /// A new event at the current time.
    pub fn new(user: impl Into<String>, action: AuditAction, outcome: AuditOutcome) -> Self {
        Self {
            time: OffsetDateTime::now_utc(),
            user: user.into(),
            address: None,
            action,
            event_id: action.dicom_event_id(),
            outcome,
            session: None,
            file: None,
            study: None,
            patient_id: None,
            detail: String::new(),
        }
    }
}

/// Durable, append-only audit trail.
///
/// # Contract
/// - [`record`](Self::record) returns `Ok` only once the event is durable.
///   The pipeline fails closed: an action whose audit record cannot be
///   written reports [`Error::Audit`](crate::Error::Audit).
/// - Events are kept in the order `record` calls returned.
/// - [`events`](Self::events) returns every recorded event in order (used by
///   audit review and tests; an implementation that ships events elsewhere
///   returns what it still holds).
/// - Events are stored as given, every field intact (free text included:
///   quotes, newlines and control characters must round-trip).
/// - `record` is safe to call from many tasks at once; no event is lost.
///
/// # Errors
/// A trail that cannot be written or read is
/// [`Error::Storage`](crate::Error::Storage) (`Full` when out of space).
/// Never answer `Ok` for an event that is not durable: the pipeline turns a
/// failed `record` into [`Error::Audit`](crate::Error::Audit) and refuses
/// the action, which is the only safe answer.
///
/// # Cancellation
/// A dropped `record` future may or may not have recorded the event; it
/// must never leave a torn record that breaks reading the trail. Dropping
/// `events` is harmless.
#[async_trait]
pub trait AuditSink: Debug + Display + Send + Sync + 'static {
    /// Append one event durably.
    async fn record(&self, event: &AuditEvent) -> Result<()>;

    /// Append several events durably, in their order: `Ok` only once every
    /// one is durable, as if `record` had been called for each in turn (an
    /// error may leave some of them recorded). A trail that commits
    /// records together (one transaction, one sync) should override this;
    /// the default calls [`record`](Self::record) for each.
    async fn record_all(&self, events: &[AuditEvent]) -> Result<()> {
        for event in events {
            self.record(event).await?;
        }
        Ok(())
    }

    /// Every recorded event, oldest first.
    async fn events(&self) -> Result<Vec<AuditEvent>>;

    /// Called once at stop, after the last event: make whatever the trail
    /// keeps outside itself final (e.g. anchor its chain head). Recording
    /// after `close` remains allowed. The default does nothing.
    async fn close(&self) -> Result<()> {
        Ok(())
    }

    /// The key of the database this trail lives in, when a session store
    /// on the same database may append to it inside its own transactions
    /// (see [`SessionStore::record_chunk_audited`](crate::SessionStore::record_chunk_audited)):
    /// then a chunk's record and its audit record commit together, one
    /// sync instead of two. `None` (the default): events reach the trail
    /// only through [`record`](Self::record). A trail that also writes
    /// elsewhere (mirrors, forwarding) answers `None`: the other
    /// destinations would miss the events written beside it.
    fn trail_key(&self) -> Option<i64> {
        None
    }
}

// `Arc<S>` and `Box<S>` of an implementation (`dyn AuditSink` included)
// implement `AuditSink` too, forwarding every call: a shared or boxed
// adapter goes into code generic over `AuditSink` (a decorator, a builder).
macro_rules! forward_audit_sink {
    ($($ptr:ident)::+) => {
        #[async_trait]
        impl<S: AuditSink + ?Sized> AuditSink for $($ptr)::+<S> {
            async fn record(&self, event: &AuditEvent) -> Result<()> {
                (**self).record(event).await
            }

            async fn record_all(&self, events: &[AuditEvent]) -> Result<()> {
                (**self).record_all(events).await
            }

            async fn events(&self) -> Result<Vec<AuditEvent>> {
                (**self).events().await
            }

            async fn close(&self) -> Result<()> {
                (**self).close().await
            }

            fn trail_key(&self) -> Option<i64> {
                (**self).trail_key()
            }
        }
    };
}
forward_audit_sink!(std::sync::Arc);
forward_audit_sink!(Box);

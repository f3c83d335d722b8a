//! [`AuditFanOut`]: one audit record written to several trails, acknowledged
//! only once every one holds it.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use relaypacs_core::{AuditEvent, AuditSink, Result};

/// An [`AuditSink`] writing every record to a primary trail and to each of
/// its mirrors (e.g. the state database's chain and a JSON-lines file to
/// ship to a SIEM).
///
/// # Contract
/// `record` writes to every trail at once and returns `Ok` only when every
/// one returned `Ok`, each having made the record durable (fail closed).
/// On an error (the primary's first, else the first mirror's) the record
/// may be in some trails and not others: it was not acknowledged, the
/// action it audits is refused. Each trail keeps its own order and chain:
/// records recorded concurrently may sit in a different order in each.
/// [`events`](AuditSink::events) are the primary's; `close` closes every
/// trail and returns the first error.
///
/// # Cancellation
/// As each trail's: a dropped `record` may leave the record in some.
pub struct AuditFanOut<P> {
    primary: P,
    mirrors: Vec<Arc<dyn AuditSink>>,
}

impl<P> AuditFanOut<P> {
    /// Record to `primary` and every one of `mirrors`.
    pub fn new(primary: P, mirrors: Vec<Arc<dyn AuditSink>>) -> Self {
        Self { primary, mirrors }
    }

    /// The primary trail.
    pub fn primary(&self) -> &P {
        &self.primary
    }

    /// The mirrors.
    pub fn mirrors(&self) -> &[Arc<dyn AuditSink>] {
        &self.mirrors
    }
}

impl<P: fmt::Debug> fmt::Debug for AuditFanOut<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditFanOut")
            .field("primary", &self.primary)
            .field("mirrors", &self.mirrors)
            .finish()
    }
}

impl<P: fmt::Display> fmt::Display for AuditFanOut<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.primary)?;
        for m in &self.mirrors {
            write!(f, "+{m}")?;
        }
        Ok(())
    }
}

/// The first error of `results`, in their order, else `Ok`.
fn first_error(results: impl IntoIterator<Item = Result<()>>) -> Result<()> {
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

#[async_trait]
impl<P: AuditSink> AuditSink for AuditFanOut<P> {
    /// The primary's, when there are no mirrors (else `None`: a record
    /// written beside the primary inside another transaction would miss
    /// the mirrors).
    fn trail_key(&self) -> Option<i64> {
        if self.mirrors.is_empty() {
            self.primary.trail_key()
        } else {
            None
        }
    }

    async fn record(&self, event: &AuditEvent) -> Result<()> {
        if self.mirrors.is_empty() {
            return self.primary.record(event).await;
        }
        let (primary, mirrors) = futures::join!(
            self.primary.record(event),
            futures::future::join_all(self.mirrors.iter().map(|m| m.record(event)))
        );
        first_error(std::iter::once(primary).chain(mirrors))
    }

    async fn record_all(&self, events: &[AuditEvent]) -> Result<()> {
        if self.mirrors.is_empty() {
            return self.primary.record_all(events).await;
        }
        let (primary, mirrors) = futures::join!(
            self.primary.record_all(events),
            futures::future::join_all(self.mirrors.iter().map(|m| m.record_all(events)))
        );
        first_error(std::iter::once(primary).chain(mirrors))
    }

    async fn events(&self) -> Result<Vec<AuditEvent>> {
        self.primary.events().await
    }

    async fn close(&self) -> Result<()> {
        let (primary, mirrors) = futures::join!(
            self.primary.close(),
            futures::future::join_all(self.mirrors.iter().map(|m| m.close()))
        );
        first_error(std::iter::once(primary).chain(mirrors))
    }
}

/// The primary's chain head (for the syslog decorator).
#[cfg(feature = "syslog")]
#[async_trait]
impl<P: crate::syslog_audit::ChainHeadSource> crate::syslog_audit::ChainHeadSource
    for AuditFanOut<P>
{
    async fn chain_head(&self) -> crate::ChainHead {
        self.primary.chain_head().await
    }
}

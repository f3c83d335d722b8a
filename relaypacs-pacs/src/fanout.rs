//! [`FanOutSink`]: one delivery to several destinations.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use relaypacs_core::{
    DeliveryReport, Error, Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Result,
    Verification,
};

/// Delivers every instance to each of its sinks in turn (e.g. a local
/// archive and the hospital PACS). An instance counts as delivered only
/// when every sink holds it; its outcome is the worst one (a permanent
/// failure over a transient one over a warning over success). There is no
/// fallback: a failing sink is never replaced by another, and a retry
/// re-sends to all (each is idempotent).
#[derive(Clone)]
pub struct FanOutSink {
    sinks: Vec<Arc<dyn PacsSink>>,
}

impl fmt::Debug for FanOutSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.sinks.iter().map(|s| s.to_string()))
            .finish()
    }
}

impl fmt::Display for FanOutSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.sinks.iter().map(|s| s.to_string()).collect();
        f.write_str(&names.join(" + "))
    }
}

impl FanOutSink {
    /// A sink over `sinks` (at least one).
    ///
    /// # Errors
    /// [`Error::Invalid`] when `sinks` is empty.
    pub fn new(sinks: Vec<Arc<dyn PacsSink>>) -> Result<Self> {
        if sinks.is_empty() {
            return Err(Error::invalid(
                "RELAY_NO_SINK",
                "no PACS sink is configured",
            ));
        }
        Ok(Self { sinks })
    }
}

fn rank(o: &InstanceOutcome) -> u8 {
    match o {
        InstanceOutcome::Stored | InstanceOutcome::AlreadyPresent => 0,
        InstanceOutcome::Warning { .. } => 1,
        InstanceOutcome::Failed {
            transient: true, ..
        } => 2,
        InstanceOutcome::Failed {
            transient: false, ..
        } => 3,
    }
}

#[async_trait]
impl PacsSink for FanOutSink {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        let mut merged: Option<DeliveryReport> = None;
        for sink in &self.sinks {
            let mut r = sink.deliver(instances, source).await?;
            for (_, o) in &mut r.outcomes {
                if let InstanceOutcome::Failed { reason, .. }
                | InstanceOutcome::Warning { reason } = o
                {
                    *reason = format!("{sink}: {reason}");
                }
            }
            merged = Some(match merged {
                None => r,
                Some(mut m) => {
                    m.retry_after = m.retry_after.max(r.retry_after);
                    for (a, b) in m.outcomes.iter_mut().zip(r.outcomes) {
                        if rank(&b.1) > rank(&a.1) {
                            *a = b;
                        }
                    }
                    m
                }
            });
        }
        Ok(merged.unwrap_or_default())
    }

    /// An instance is the same only if every destination holds the same,
    /// with the weakest verification among them; any destination holding
    /// other content makes it different.
    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        let mut held: Vec<Holding> = instances
            .iter()
            .map(|_| Holding::Same {
                verification: Verification::Content,
            })
            .collect();
        for sink in &self.sinks {
            for (acc, h) in held.iter_mut().zip(sink.verify(instances).await?) {
                *acc = match (std::mem::replace(acc, Holding::Absent), h) {
                    (d @ Holding::Different { .. }, _) => d,
                    (_, Holding::Different { reason }) => Holding::Different {
                        reason: format!("{sink}: {reason}"),
                    },
                    (Holding::Same { verification: a }, Holding::Same { verification: b }) => {
                        Holding::Same {
                            verification: a.min(b),
                        }
                    }
                    _ => Holding::Absent,
                };
            }
        }
        Ok(held)
    }
}

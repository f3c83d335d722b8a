//! `CStoreSink::verify`: which service answers (C-GET, C-FIND, or the
//! record of acknowledged stores), what the PACS is known to accept, and
//! the C-FIND lookups.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use relaypacs_core::{Error, Holding, Instance, Result, Uid, Verification, VerifyMode};

use super::acked::Acked;
use super::dimse::{self, C_FIND_RSP, IMPLICIT_VR_LE, STUDY_ROOT_FIND};
use super::{CStoreSink, Conn, MAX_IDENTIFIER};

/// How long what a PACS accepted is trusted before it is probed again.
const CAPABILITY_TTL: Duration = Duration::from_secs(600);

/// Which query/retrieve services the PACS accepted, as far as known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Capability {
    /// Study Root C-GET: the context was accepted and a C-GET answered.
    pub get: Option<bool>,
    /// Study Root C-FIND: the context was accepted.
    pub find: Option<bool>,
    /// When the first of these was learnt.
    learnt: Option<Instant>,
}

/// State a [`CStoreSink`] and its clones share for `verify`.
#[derive(Debug, Default)]
pub(super) struct VerifyState {
    capability: Mutex<Capability>,
    acked: Mutex<Acked>,
}

/// A lock that survives a panic elsewhere (the data stays consistent: every
/// update is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VerifyState {
    /// What the PACS is known to accept (nothing once it is too old).
    pub(super) fn capability(&self) -> Capability {
        let c = *lock(&self.capability);
        if c.learnt.is_some_and(|t| t.elapsed() > CAPABILITY_TTL) {
            Capability::default()
        } else {
            c
        }
    }

    /// Note what an association showed the PACS accepts.
    pub(super) fn learn(&self, f: impl FnOnce(&mut Capability)) {
        let mut c = lock(&self.capability);
        if c.learnt.is_some_and(|t| t.elapsed() > CAPABILITY_TTL) {
            *c = Capability::default();
        }
        f(&mut c);
        c.learnt.get_or_insert_with(Instant::now);
    }

    /// Forget what the PACS accepts: the next verify probes again.
    fn forget(&self) {
        *lock(&self.capability) = Capability::default();
    }

    /// The PACS answered a C-STORE of `inst` with success or a warning.
    pub(super) fn acknowledged(&self, inst: &Instance) {
        lock(&self.acked).record(inst);
    }

    fn answer_from_record(&self, instances: &[Instance]) -> Vec<Holding> {
        let acked = lock(&self.acked);
        instances.iter().map(|i| acked.holding(i)).collect()
    }
}

/// `Same { PresenceOnly }` if `held` has the instance's UID, else `Absent`.
pub(super) fn presence(inst: &Instance, held: &HashSet<String>) -> Holding {
    if held.contains(inst.dicom.sop_instance_uid.as_str()) {
        Holding::Same {
            verification: Verification::PresenceOnly,
        }
    } else {
        Holding::Absent
    }
}

impl CStoreSink {
    /// [`PacsSink::verify`](relaypacs_core::PacsSink::verify): see the
    /// type's documentation.
    pub(super) async fn verify_instances(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        if instances.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let (service, result) = self.verify_by_best_service(instances).await;
        match &result {
            Ok(held) => tracing::debug!(
                sink = %self,
                service,
                instances = instances.len(),
                same = held.iter().filter(|h| h.is_same()).count(),
                different = held.iter().filter(|h| matches!(h, Holding::Different { .. })).count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "verify done"
            ),
            Err(e) => {
                // Probe again next time: the failure may have been ours
                // to misread (a restarted or reconfigured PACS).
                self.state.forget();
                tracing::debug!(sink = %self, service, error = %e, "verify failed");
            }
        }
        result
    }

    /// The answer and the service that gave it.
    async fn verify_by_best_service(
        &self,
        instances: &[Instance],
    ) -> (&'static str, Result<Vec<Holding>>) {
        if self.config.verify == VerifyMode::Content && self.state.capability().get != Some(false) {
            match self.verify_by_get(instances).await {
                Ok(Some(held)) => return ("C-GET", Ok(held)),
                Ok(None) => {}
                Err(e) => return ("C-GET", Err(e)),
            }
        }
        if self.state.capability().find != Some(false) {
            match self.verify_by_find(instances).await {
                Ok(Some(held)) => return ("C-FIND", Ok(held)),
                Ok(None) => {}
                Err(e) => return ("C-FIND", Err(e)),
            }
        }
        (
            "acknowledged C-STOREs",
            Ok(self.state.answer_from_record(instances)),
        )
    }

    /// Presence by C-FIND on an association of its own; `None` when the
    /// PACS does not accept Study Root C-FIND.
    async fn verify_by_find(&self, instances: &[Instance]) -> Result<Option<Vec<Holding>>> {
        let contexts = [(STUDY_ROOT_FIND.to_owned(), IMPLICIT_VR_LE.to_owned())];
        let accepted = match self.associate(&contexts, &[]).await? {
            None => None,
            Some((conn, accepted)) => match accepted.first().copied().flatten() {
                Some(ctx) => Some((conn, ctx)),
                None => {
                    conn.abort().await;
                    None
                }
            },
        };
        self.state.learn(|c| c.find = Some(accepted.is_some()));
        let Some((mut conn, ctx)) = accepted else {
            tracing::info!(
                sink = %self,
                "the PACS does not accept Study Root C-FIND: verify answers from the C-STOREs \
                 it acknowledged to this process"
            );
            return Ok(None);
        };
        let all: Vec<&Instance> = instances.iter().collect();
        let held = match self.find_held(&mut conn, ctx, &all).await {
            Ok(held) => held,
            Err(e) => {
                conn.abort().await;
                return Err(e);
            }
        };
        if let Err(e) = conn.release().await {
            tracing::warn!(sink = %self, error = %e, "C-FIND: A-RELEASE failed");
        }
        Ok(Some(instances.iter().map(|i| presence(i, &held)).collect()))
    }

    /// The SOP Instance UIDs the PACS holds among the series of
    /// `instances` (one IMAGE-level C-FIND per series). An `Err` leaves the
    /// association unusable: the caller aborts it.
    pub(super) async fn find_held(
        &self,
        conn: &mut Conn,
        ctx: u8,
        instances: &[&Instance],
    ) -> Result<HashSet<String>> {
        let mut series: Vec<(&Uid, &Uid)> = Vec::new();
        for i in instances {
            let key = (&i.dicom.study_instance_uid, &i.dicom.series_instance_uid);
            if !series.contains(&key) {
                series.push(key);
            }
        }
        let mut held = HashSet::new();
        for (study, ser) in series {
            self.find_series(conn, ctx, study, ser, &mut held).await?;
        }
        Ok(held)
    }

    /// Run one IMAGE-level C-FIND for a series; add the SOP Instance UIDs
    /// found to `held`.
    async fn find_series(
        &self,
        conn: &mut Conn,
        ctx: u8,
        study: &Uid,
        series: &Uid,
        held: &mut HashSet<String>,
    ) -> Result<()> {
        let message_id = conn.next_message_id();
        conn.send_whole(ctx, true, &dimse::c_find_rq(message_id))
            .await?;
        let query = dimse::image_level_query(study.as_str(), series.as_str());
        conn.send_whole(ctx, false, &query).await?;
        loop {
            let (rsp, identifier) = conn.read_message(ctx, MAX_IDENTIFIER).await?;
            if rsp.command_field != C_FIND_RSP || rsp.responding_to != message_id {
                return Err(conn.protocol(format!(
                    "expected C-FIND-RSP to message {message_id}, got command 0x{:04X} to {}",
                    rsp.command_field, rsp.responding_to
                )));
            }
            match rsp.status {
                0xFF00 | 0xFF01 => {
                    let uid = dimse::sop_instance_uid(&identifier).map_err(|e| conn.protocol(e))?;
                    held.extend(uid);
                }
                0x0000 => return Ok(()),
                s => {
                    let reason = format!(
                        "{self}: {}",
                        dimse::describe("C-FIND", s, rsp.error_comment.as_deref())
                    );
                    return Err(if dimse::is_transient(s) {
                        Error::pacs_transient(reason, None)
                    } else {
                        Error::pacs_permanent(reason, None)
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_is_learnt_and_forgotten() {
        let s = VerifyState::default();
        assert_eq!(s.capability(), Capability::default());
        s.learn(|c| c.get = Some(false));
        s.learn(|c| c.find = Some(true));
        let c = s.capability();
        assert_eq!((c.get, c.find), (Some(false), Some(true)));
        s.forget();
        assert_eq!(s.capability(), Capability::default());
        // Too old: unknown again.
        s.learn(|c| c.find = Some(false));
        if let Some(past) = Instant::now().checked_sub(CAPABILITY_TTL + Duration::from_secs(1)) {
            lock(&s.capability).learnt = Some(past);
            assert_eq!(s.capability(), Capability::default());
        }
    }
}

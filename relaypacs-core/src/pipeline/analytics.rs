//! Upload analytics: the facts recorded where outcomes happen, and the
//! report an actor may read (its own uploads; every user's for an admin).

use super::*;
use crate::analytics::{
    AnalyticsFilter, AnalyticsReport, FactKind, Grouping, UploadFact, aggregate, check_range,
};

/// What one analytics report may cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AnalyticsLimits {
    /// The longest date range, in days (both ends included).
    pub max_days: u32,
    /// The most delivery durations read for the percentiles (they are
    /// computed in memory from the durations of the filtered range).
    pub max_durations: usize,
}

impl Default for AnalyticsLimits {
    fn default() -> Self {
        Self {
            max_days: 366,
            max_durations: 1_000_000,
        }
    }
}

impl AnalyticsLimits {
    /// Limits of `max_days` days and `max_durations` durations.
    pub fn new(max_days: u32, max_durations: usize) -> Self {
        Self {
            max_days,
            max_durations,
        }
    }
}

/// The most frequent modality among `rec`'s valid files (ties: the
/// smallest), empty when none is known.
fn study_modality(rec: &SessionRecord) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for f in rec.files.values() {
        if let FileState::Valid { dicom } = &f.state
            && let Some(m) = dicom.modality.as_deref()
        {
            *counts.entry(m).or_default() += 1;
        }
    }
    let mut best: Option<(&str, usize)> = None;
    for (m, n) in counts {
        if best.is_none_or(|(_, b)| n > b) {
            best = Some((m, n));
        }
    }
    best.map(|(m, _)| m.to_owned()).unwrap_or_default()
}

impl Pipeline {
    /// A report on uploads grouped by `group`: uploads, files, bytes,
    /// failures by cause and the time from first byte to delivered. A
    /// non-admin sees its own uploads only: with no user in the filter
    /// it is set to the actor; naming another user is refused. Audited as
    /// data access (a refusal as a failure).
    ///
    /// Counts are grouped by the store; the percentiles are computed here
    /// from the durations of the filtered range, at most
    /// `limits.max_durations` of them.
    ///
    /// # Errors
    /// [`Error::Auth`] `RELAY_FORBIDDEN` for a non-admin naming another
    /// user; [`Error::Invalid`] `RELAY_BAD_RANGE` for a range backwards or
    /// longer than `limits.max_days`; [`Error::LimitExceeded`] beyond
    /// `limits.max_durations`; the store's errors.
    pub async fn analytics(
        &self,
        actor: &Actor,
        mut filter: AnalyticsFilter,
        group: Grouping,
        limits: AnalyticsLimits,
    ) -> Result<AnalyticsReport> {
        let mut ev = Self::event(
            actor,
            AuditAction::DataAccessed,
            AuditOutcome::Success,
            None,
        );
        ev.detail = format!(
            "analytics group={} from={} to={} user={} modality={}",
            group.as_str(),
            crate::analytics::day_text(filter.from),
            crate::analytics::day_text(filter.to),
            filter.user.as_deref().unwrap_or("*"),
            filter.modality.as_deref().unwrap_or("*"),
        );
        if !actor.admin {
            match &filter.user {
                Some(u) if *u != actor.user => {
                    let e = Error::Auth {
                        code: "RELAY_FORBIDDEN",
                        reason: "analytics of other users are for administrators".into(),
                    };
                    return self.refuse(ev, e).await;
                }
                _ => filter.user = Some(actor.user.clone()),
            }
        }
        if let Err(e) = check_range(&filter, limits.max_days) {
            return self.refuse(ev, e).await;
        }
        let sessions = &self.inner.sessions;
        let counts = sessions.count_upload_facts(&filter, group).await?;
        let durations = sessions
            .delivery_durations(&filter, group, limits.max_durations)
            .await?;
        let rows = aggregate(group, &counts, &durations);
        self.audit(ev).await?;
        Ok(AnalyticsReport {
            group,
            filter,
            rows,
        })
    }

    /// The fact of a study's outcome `kind` at `at`, from its record.
    pub(crate) fn study_fact(
        rec: &SessionRecord,
        kind: FactKind,
        cause: &str,
        at: OffsetDateTime,
    ) -> UploadFact {
        let mut f = UploadFact::new(rec.id, kind, rec.owner.clone(), at);
        f.cause = cause.to_owned();
        f.occurrence = rec.delivery.replays;
        f.modality = study_modality(rec);
        f.files = rec.files.len() as u64;
        f.bytes = rec.declared_bytes();
        f.started_at = Some(rec.created_at);
        f
    }

    /// The fact of a file refused for `err` (the root cause's code is the
    /// reason class).
    pub(crate) fn refused_fact(
        id: SessionId,
        owner: &str,
        file: FileId,
        size: u64,
        err: &Error,
    ) -> UploadFact {
        let mut f = UploadFact::new(id, FactKind::Refused, owner, OffsetDateTime::now_utc());
        f.file = Some(file);
        f.cause = err.root().code().to_owned();
        f.files = 1;
        f.bytes = size;
        f
    }

    /// The facts of a study that ends now as `kind` (aborted by its owner,
    /// expired or ended by the system): one while it is open, none once
    /// it was acknowledged (its outcome is its delivery's).
    pub(crate) fn ended_facts(rec: &SessionRecord, kind: FactKind) -> Vec<UploadFact> {
        if rec.state != SessionState::Open {
            return Vec::new();
        }
        vec![Self::study_fact(rec, kind, "", OffsetDateTime::now_utc())]
    }
}

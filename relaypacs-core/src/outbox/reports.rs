//! Reports after delivery: where they are looked for, the periodic check of a
//! delivered study, and fetching one for its owner.

use super::*;

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

    pub(super) fn report_next(
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
            .update_head(id, current, false, |r| {
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
        let rec = match self
            .load_owned_as(actor, id, crate::pipeline::Access::session("read_report"))
            .await
        {
            Ok(v) => v.value,
            // Another user's session is recorded, aggregated, by load_owned_as.
            Err(e @ Error::NotFound { .. }) => return Err(e),
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

//! [`SqlNotificationStore`]: per-user notifications in SQL tables (SQLite
//! or PostgreSQL), created once per study (or report) across gateways, and
//! (PostgreSQL) the channel that carries live events between gateways.

use std::fmt;

use relaypacs_core::{Error, ReportRef, Result, SessionState};
use sqlx::Row;

use crate::sql_state::{Engine, SqlState, corrupt, db_err};

/// The PostgreSQL `LISTEN`/`NOTIFY` channel of live events.
pub const EVENTS_CHANNEL: &str = "relaypacs_events";

/// The largest `NOTIFY` payload PostgreSQL takes is 8,000 bytes; a larger
/// event is sent by reference (see [`SqlNotificationStore::publish`]).
pub const MAX_EVENT_PAYLOAD: usize = 7_900;

/// Notifications kept per user: inserting one more deletes the oldest.
pub const MAX_PER_USER: i64 = 1_000;

/// The `kind` of a delivery notification (the repair pass's, see
/// [`SqlNotificationStore::missed`]).
pub const KIND_DELIVERED: &str = "delivered";
/// The `kind` of a dead-letter notification.
pub const KIND_FORWARD_FAILED: &str = "forward_failed";
/// The `kind` of a report notification (one per report: its SOP Instance
/// UID is the subject; see [`SqlNotificationStore::missed_reports`]).
pub const KIND_REPORT_READY: &str = "report_ready";

/// A notification to insert. `body` is whatever the caller keeps (JSON);
/// the other fields are indexed.
#[derive(Clone, Copy, Debug)]
pub struct NewNotification<'a> {
    /// Unique id.
    pub id: &'a str,
    /// The user who sees it (no one else does).
    pub owner: &'a str,
    /// What happened (`delivered`, `forward_failed`, `report_ready`, …).
    pub kind: &'a str,
    /// Study session id.
    pub study: &'a str,
    /// What makes it unique within (study, kind): `""` for one per study,
    /// a report's SOP Instance UID for one per report.
    pub subject: &'a str,
    /// RFC 3339.
    pub created_at: &'a str,
    /// The caller's encoding of the notification.
    pub body: &'a str,
}

/// A stored notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredNotification {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// Whether the owner marked it read.
    pub read: bool,
    /// What the caller stored.
    pub body: String,
}

/// A study delivered or dead-lettered whose notification was never
/// written (a crash between the state's commit and the notification's).
#[derive(Clone, Debug)]
pub struct MissedNotification {
    /// Study session id.
    pub session: String,
    /// Its owner.
    pub owner: String,
    /// Its state: `Delivered` or `DeadLetter`.
    pub state: SessionState,
    /// Instances the PACS was confirmed to hold.
    pub instances: usize,
}

/// A report recorded for a delivered study whose notification was never
/// written (a crash between the report check's commit and the
/// notification's).
#[derive(Clone, Debug)]
pub struct MissedReport {
    /// Study session id.
    pub session: String,
    /// Its owner.
    pub owner: String,
    /// The report.
    pub report: ReportRef,
}

/// Where a listing of [`SqlNotificationStore::missed_reports`] goes on:
/// after this session (by last write, then id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportCursor {
    updated_at: String,
    session: String,
}

/// Notifications in a [`SqlState`] database.
///
/// # Contract
/// - [`insert`](Self::insert) creates at most one notification per
///   (study, kind, subject), ever: the key goes into `notification_keys`
///   (`ON CONFLICT DO NOTHING`) in the same transaction as the row, so of
///   two gateways (or a gateway and a repair pass) racing, one inserts and
///   the other gets `None`; a notification deleted by the cap is not
///   created again. Durable when it returns (the commit).
/// - A user's list holds at most [`MAX_PER_USER`], oldest deleted first
///   (on PostgreSQL under a per-user transaction lock, so two gateways
///   inserting at once do not overshoot).
/// - Every call is one transaction, rolled back if its future is dropped.
#[derive(Clone, Debug)]
pub struct SqlNotificationStore {
    db: SqlState,
}

impl fmt::Display for SqlNotificationStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sql notifications ({})", self.db)
    }
}

fn stored(r: &sqlx::any::AnyRow, op: &'static str) -> Result<StoredNotification> {
    Ok(StoredNotification {
        id: r.try_get(0).map_err(|e| db_err(op, e))?,
        owner: r.try_get(1).map_err(|e| db_err(op, e))?,
        read: r.try_get::<i64, _>(2).map_err(|e| db_err(op, e))? != 0,
        body: r.try_get(3).map_err(|e| db_err(op, e))?,
    })
}

const COLUMNS: &str = "id, owner, read, body";

impl SqlNotificationStore {
    /// A store on `db` (already migrated by [`SqlState::connect`]).
    pub fn new(db: SqlState) -> Self {
        Self { db }
    }

    /// Which engine the store is on (live events cross gateways only on
    /// PostgreSQL).
    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    /// Insert `n` unless (study, kind, subject) was notified before, delete
    /// the owner's oldest beyond [`MAX_PER_USER`], and (PostgreSQL) send
    /// `event` on [`EVENTS_CHANNEL`] when it commits. `None`: already
    /// notified, nothing written or sent.
    pub async fn insert(
        &self,
        n: &NewNotification<'_>,
        event: Option<&str>,
    ) -> Result<Option<StoredNotification>> {
        Ok(self.insert_many(&[(*n, event)]).await?.pop().flatten())
    }

    /// [`insert`](Self::insert) of each of `items` in one transaction (one
    /// commit for a batch of deliveries); one answer per item, in order, as
    /// `insert`'s. The keys are inserted in (study, kind, subject) order
    /// and, on PostgreSQL, the owners' locks taken after every key in
    /// owner order: two gateways' batches never wait on each other in a
    /// cycle.
    pub async fn insert_many(
        &self,
        items: &[(NewNotification<'_>, Option<&str>)],
    ) -> Result<Vec<Option<StoredNotification>>> {
        const OP: &str = "store a notification";
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|i| {
            let n = &items[*i].0;
            (n.study, n.kind, n.subject)
        });
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        let mut fresh = vec![false; items.len()];
        for i in order {
            let n = &items[i].0;
            // First statement a write: SQLite takes its write lock here.
            let done = sqlx::query(
                "INSERT INTO notification_keys (study, kind, subject) VALUES ($1, $2, $3) \
                 ON CONFLICT (study, kind, subject) DO NOTHING",
            )
            .bind(n.study)
            .bind(n.kind)
            .bind(n.subject)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
            fresh[i] = done.rows_affected() == 1;
        }
        let made: Vec<&(NewNotification<'_>, Option<&str>)> = items
            .iter()
            .zip(&fresh)
            .filter_map(|(item, f)| f.then_some(item))
            .collect();
        let owners: std::collections::BTreeSet<&str> = made.iter().map(|(n, _)| n.owner).collect();
        if owners.is_empty() {
            // Every one notified before: nothing to write (the transaction
            // is dropped, rolled back).
            return Ok(items.iter().map(|_| None).collect());
        }
        if self.db.engine() == Engine::Postgres {
            // One inserter per user at a time, so the cap holds exactly.
            for owner in &owners {
                sqlx::query("SELECT pg_advisory_xact_lock(1852796276, hashtext($1))")
                    .bind(*owner)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_err(OP, e))?;
            }
        }
        for (n, _) in &made {
            sqlx::query(
                "INSERT INTO notifications (id, owner, kind, study, subject, created_at, read, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
            )
            .bind(n.id)
            .bind(n.owner)
            .bind(n.kind)
            .bind(n.study)
            .bind(n.subject)
            .bind(n.created_at)
            .bind(n.body)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        }
        for owner in &owners {
            sqlx::query(
                "DELETE FROM notifications WHERE owner = $1 AND seq <= \
                 (SELECT seq FROM notifications WHERE owner = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)",
            )
            .bind(*owner)
            .bind(MAX_PER_USER)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        }
        for (_, event) in &made {
            if let Some(payload) = event {
                self.notify_in(&mut tx, payload).await?;
            }
        }
        // Crash-safe point: the commit (WAL fsync / PostgreSQL commit); a
        // NOTIFY inside the transaction is sent only if it commits.
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(items
            .iter()
            .zip(fresh)
            .map(|((n, _), f)| {
                f.then(|| StoredNotification {
                    id: n.id.to_owned(),
                    owner: n.owner.to_owned(),
                    read: false,
                    body: n.body.to_owned(),
                })
            })
            .collect())
    }

    async fn notify_in(&self, conn: &mut sqlx::AnyConnection, payload: &str) -> Result<()> {
        if self.db.engine() != Engine::Postgres {
            return Ok(());
        }
        if payload.len() > MAX_EVENT_PAYLOAD {
            return Err(Error::invalid(
                "RELAY_EVENT_TOO_LARGE",
                "an event payload beyond PostgreSQL's NOTIFY limit",
            ));
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(EVENTS_CHANNEL)
            .bind(payload)
            .execute(conn)
            .await
            .map_err(|e| db_err("send a live event", e))?;
        Ok(())
    }

    /// Send `payload` to every gateway listening on [`EVENTS_CHANNEL`]
    /// (PostgreSQL; a no-op on SQLite, where one gateway is the only
    /// listener). A payload over [`MAX_EVENT_PAYLOAD`] is refused
    /// (`Invalid`): send a reference the listeners can read instead.
    pub async fn publish(&self, payload: &str) -> Result<()> {
        if self.db.engine() != Engine::Postgres {
            return Ok(());
        }
        let mut conn = self
            .db
            .pool()
            .acquire()
            .await
            .map_err(|e| db_err("send a live event", e))?;
        self.notify_in(&mut conn, payload).await
    }

    /// `owner`'s notifications, oldest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<StoredNotification>> {
        const OP: &str = "list notifications";
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE owner = $1 ORDER BY seq"
        ))
        .bind(owner)
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        rows.iter().map(|r| stored(r, OP)).collect()
    }

    /// Notification `id`, whoever owns it (for a listener that got it by
    /// reference; callers check the owner).
    pub async fn get(&self, id: &str) -> Result<Option<StoredNotification>> {
        const OP: &str = "load a notification";
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM notifications WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        row.map(|r| stored(&r, OP)).transpose()
    }

    /// Mark `owner`'s notification `id` read; `None` if `owner` has none
    /// with that id.
    pub async fn mark_read(&self, owner: &str, id: &str) -> Result<Option<StoredNotification>> {
        const OP: &str = "mark a notification read";
        let row = sqlx::query(&format!(
            "UPDATE notifications SET read = 1 WHERE id = $1 AND owner = $2 RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(owner)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        row.map(|r| stored(&r, OP)).transpose()
    }

    /// Whether notification `id` exists and belongs to someone other than
    /// `user` (a denied access to audit).
    pub async fn held_by_another(&self, user: &str, id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM notifications WHERE id = $1 AND owner <> $2")
            .bind(id)
            .bind(user)
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| db_err("load a notification", e))?;
        Ok(row.is_some())
    }

    /// Up to `limit` studies delivered (or dead-lettered) whose
    /// notification was never written: the repair pass creates them, so a
    /// crash between a delivery's commit and its notification's still
    /// leaves exactly one. Keys are never pruned, so a study notified once
    /// is never listed. With `since`, only sessions last written at or
    /// after it are considered (read through the index on state and
    /// time of last write): a periodic pass then costs what happened in
    /// its window, not every study ever delivered.
    pub async fn missed(
        &self,
        limit: i64,
        since: Option<time::OffsetDateTime>,
    ) -> Result<Vec<MissedNotification>> {
        const OP: &str = "find missed notifications";
        // The column holds RFC 3339 UTC text written by the session store;
        // such text orders as the times do (to the second, ample for a
        // window of minutes); the empty string is before every time.
        let since = rfc3339_or_start(OP, since)?;
        let rows = sqlx::query(
            "SELECT s.id, s.owner, s.head FROM sessions s \
             WHERE (s.state = 'delivered' AND s.updated_at >= $4 \
                    AND NOT EXISTS (SELECT 1 FROM notification_keys k \
                    WHERE k.study = s.id AND k.kind = $1 AND k.subject = '')) \
                OR (s.state = 'dead_letter' AND s.updated_at >= $4 \
                    AND NOT EXISTS (SELECT 1 FROM notification_keys k \
                    WHERE k.study = s.id AND k.kind = $2 AND k.subject = '')) \
             ORDER BY s.updated_at LIMIT $3",
        )
        .bind(KIND_DELIVERED)
        .bind(KIND_FORWARD_FAILED)
        .bind(limit)
        .bind(since)
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let session: String = r.try_get(0).map_err(|e| db_err(OP, e))?;
            let owner: String = r.try_get(1).map_err(|e| db_err(OP, e))?;
            let head: String = r.try_get(2).map_err(|e| db_err(OP, e))?;
            let decoded = serde_json::from_str::<serde_json::Value>(&head).and_then(|head| {
                serde_json::from_value::<SessionState>(head["state"].clone()).map(|s| (head, s))
            });
            let (head, state) = match decoded {
                Ok(d) => d,
                // One unreadable session must not stop the repair of the
                // others; loading it reports the corruption where it is
                // used.
                Err(e) => {
                    tracing::warn!(session = %session, error = %corrupt("decode session", e),
                        "notification repair skips a session");
                    continue;
                }
            };
            // `confirmed`: a map UID → verification (or, written by older
            // versions, a list of UIDs).
            let confirmed = &head["delivery"]["confirmed"];
            let instances = confirmed
                .as_object()
                .map(|o| o.len())
                .or_else(|| confirmed.as_array().map(Vec::len))
                .unwrap_or(0);
            out.push(MissedNotification {
                session,
                owner,
                state,
                instances,
            });
        }
        Ok(out)
    }

    /// Reports of delivered studies that have no `report_ready`
    /// notification: one page of at most `limit` delivered sessions that
    /// hold reports, last written at or after `since` (all when `None`),
    /// in order of last write, after `after`. Returns the page's missed
    /// reports and where the next page starts (`None` after the last).
    /// The reports live in the session's record (`delivery.reports`), so
    /// unlike [`missed`](Self::missed) the listing cannot skip notified
    /// sessions in SQL; the cursor moves past them instead.
    pub async fn missed_reports(
        &self,
        limit: i64,
        since: Option<time::OffsetDateTime>,
        after: Option<&ReportCursor>,
    ) -> Result<(Vec<MissedReport>, Option<ReportCursor>)> {
        const OP: &str = "find missed report notifications";
        let since = rfc3339_or_start(OP, since)?;
        let (after_at, after_id) = after.map_or(("", ""), |c| (&c.updated_at, &c.session));
        // Only sessions whose record holds a report: the JSON functions of
        // each engine (the record is JSON text in both).
        let has_reports = match self.db.engine() {
            Engine::Sqlite => "json_array_length(head, '$.delivery.reports') > 0",
            Engine::Postgres => "jsonb_array_length((head::jsonb)->'delivery'->'reports') > 0",
        };
        let rows = sqlx::query(&format!(
            "SELECT id, owner, head, updated_at FROM sessions \
             WHERE state = 'delivered' AND updated_at >= $1 \
               AND (updated_at > $2 OR (updated_at = $2 AND id > $3)) AND {has_reports} \
             ORDER BY updated_at, id LIMIT $4"
        ))
        .bind(since)
        .bind(after_at)
        .bind(after_id)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
        let mut next = None;
        let mut page = Vec::with_capacity(rows.len());
        for r in rows {
            let session: String = r.try_get(0).map_err(|e| db_err(OP, e))?;
            let owner: String = r.try_get(1).map_err(|e| db_err(OP, e))?;
            let head: String = r.try_get(2).map_err(|e| db_err(OP, e))?;
            let updated_at: String = r.try_get(3).map_err(|e| db_err(OP, e))?;
            next = Some(ReportCursor {
                updated_at,
                session: session.clone(),
            });
            let reports = serde_json::from_str::<serde_json::Value>(&head).and_then(|head| {
                serde_json::from_value::<Vec<ReportRef>>(head["delivery"]["reports"].clone())
            });
            match reports {
                Ok(r) => page.push((session, owner, r)),
                // One unreadable session must not stop the repair of the
                // others (as in `missed`).
                Err(e) => {
                    tracing::warn!(session = %session, error = %corrupt("decode session", e),
                        "report notification repair skips a session");
                }
            }
        }
        // The page's report notifications, in one query.
        let mut notified = std::collections::BTreeSet::new();
        if !page.is_empty() {
            let marks: Vec<String> = (0..page.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "SELECT study, subject FROM notification_keys WHERE kind = $1 AND study IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(KIND_REPORT_READY);
            for (session, _, _) in &page {
                q = q.bind(session.as_str());
            }
            for r in q
                .fetch_all(self.db.pool())
                .await
                .map_err(|e| db_err(OP, e))?
            {
                let study: String = r.try_get(0).map_err(|e| db_err(OP, e))?;
                let subject: String = r.try_get(1).map_err(|e| db_err(OP, e))?;
                notified.insert((study, subject));
            }
        }
        let mut out = Vec::new();
        for (session, owner, reports) in page {
            for report in reports {
                let key = (session.clone(), report.sop_instance_uid.as_str().to_owned());
                if !notified.contains(&key) {
                    out.push(MissedReport {
                        session: session.clone(),
                        owner: owner.clone(),
                        report,
                    });
                }
            }
        }
        Ok((out, if full { next } else { None }))
    }
}

/// `t` as the RFC 3339 UTC text the session store writes in `updated_at`
/// (such text orders as the times do); before every time when `None`.
fn rfc3339_or_start(op: &'static str, t: Option<time::OffsetDateTime>) -> Result<String> {
    match t {
        Some(t) => t
            .to_offset(time::UtcOffset::UTC)
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| corrupt(op, e)),
        None => Ok(String::new()),
    }
}

/// PostgreSQL: the payloads sent on [`EVENTS_CHANNEL`] by every gateway.
///
/// [`listen_events`] runs one `LISTEN` connection (outside the state pool)
/// and hands each payload to `deliver`; when the connection is lost it
/// reconnects (at most once a second) and calls `deliver(None)` once so
/// the caller can tell its streams that events may have been missed.
/// Runs until its task is aborted.
#[cfg(feature = "postgres")]
pub async fn listen_events(
    url: String,
    password: Option<String>,
    deliver: impl Fn(Option<&str>) + Send + Sync + 'static,
) {
    use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
    use std::str::FromStr;
    let options = match PgConnectOptions::from_str(&url) {
        Ok(o) => match &password {
            Some(p) => o.password(p),
            None => o,
        },
        Err(e) => {
            // The state pool connected with this URL: unreachable in
            // practice; logged once, live events stay local.
            tracing::error!(error = %e, "live events: the state URL does not parse");
            return;
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    let mut lost = false;
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                if !lost {
                    tracing::warn!(error = %e, "live events: cannot listen; retrying");
                    lost = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(EVENTS_CHANNEL).await {
            if !lost {
                tracing::warn!(error = %e, "live events: LISTEN failed; retrying");
                lost = true;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        if lost {
            tracing::info!("live events: listening again");
            deliver(None);
        }
        // Left only by an error, which sets `lost` again.
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => deliver(Some(n.payload())),
                // The connection was lost; the next call reconnects and
                // listens again.
                Ok(None) => {
                    tracing::warn!("live events: connection lost; reconnecting");
                    deliver(None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "live events: reconnecting failed");
                    lost = true;
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

//! The upload facts of [`SqlSessionStore`] (table `upload_facts`, migration
//! 0011): insert-if-absent, counts with `GROUP BY`, delivery durations.

use relaypacs_core::analytics::{
    AnalyticsFilter, FactCount, FactKind, GroupDurations, Grouping, UploadFact, day_text, unix_ms,
};
use relaypacs_core::{Error, Result};
use sqlx::Row;

use crate::SqlSessionStore;
use crate::sql_state::{corrupt, db_err};

/// The SQL expression of a grouping's key (a fixed column name, never
/// outside text).
fn key_column(group: Grouping) -> &'static str {
    match group {
        Grouping::Summary => "CAST('' AS TEXT)",
        Grouping::Day => "day",
        Grouping::Modality => "modality",
        Grouping::User => "owner",
    }
}

/// The `WHERE` clause of `filter` with its parameters numbered from `$1`,
/// and the values to bind after the two times (owner, then modality).
fn where_clause(filter: &AnalyticsFilter) -> (String, Vec<String>) {
    let mut sql = String::from("at_ms >= $1 AND at_ms < $2");
    let mut binds = Vec::new();
    if let Some(u) = &filter.user {
        binds.push(u.clone());
        sql.push_str(&format!(" AND owner = ${}", binds.len() + 2));
    }
    if let Some(m) = &filter.modality {
        binds.push(m.clone());
        sql.push_str(&format!(" AND modality = ${}", binds.len() + 2));
    }
    (sql, binds)
}

/// A count or size read back as u64 (a negative one is corrupt).
fn get_u64(row: &sqlx::any::AnyRow, i: usize, op: &'static str) -> Result<u64> {
    let v: i64 = row.try_get(i).map_err(|e| db_err(op, e))?;
    u64::try_from(v).map_err(|_| corrupt(op, format!("negative value {v}")))
}

/// Sizes are u64 in the model and BIGINT in SQL.
fn to_i64(v: u64, what: &'static str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid("RELAY_RANGE", format!("{what} beyond 2^63")))
}

impl SqlSessionStore {
    /// [`SessionStore::record_upload_fact`](relaypacs_core::SessionStore::record_upload_fact):
    /// one `INSERT … ON CONFLICT DO NOTHING` on the fact's key.
    pub(crate) async fn record_fact(&self, fact: &UploadFact) -> Result<()> {
        let mut conn = self
            .db
            .pool()
            .acquire()
            .await
            .map_err(|e| db_err("record upload fact", e))?;
        // Crash-safe point: the statement commits on its own (autocommit),
        // durable when it returns (see SqlState).
        Self::insert_fact(&mut conn, fact).await
    }

    /// Insert `fact` unless its key (session, file, kind, occurrence) is
    /// stored, on `conn`: alone (autocommit) or inside the caller's
    /// transaction, which then makes it durable with the outcome it
    /// records (the `…_with_facts` writes of [`SqlSessionStore`]).
    pub(crate) async fn insert_fact(
        conn: &mut sqlx::AnyConnection,
        fact: &UploadFact,
    ) -> Result<()> {
        const OP: &str = "record upload fact";
        sqlx::query(
            "INSERT INTO upload_facts (session_id, file_id, kind, occurrence, cause, owner, \
             modality, day, at_ms, files, bytes, started_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (session_id, file_id, kind, occurrence) DO NOTHING",
        )
        .bind(fact.session.to_string())
        .bind(fact.file.map(|f| f.to_string()).unwrap_or_default())
        .bind(fact.kind.as_str())
        .bind(i64::from(fact.occurrence))
        .bind(fact.cause.clone())
        .bind(fact.owner.clone())
        .bind(fact.modality.clone())
        .bind(day_text(fact.day()))
        .bind(unix_ms(fact.at))
        .bind(to_i64(fact.files, "file count")?)
        .bind(to_i64(fact.bytes, "byte count")?)
        .bind(fact.started_at.map(unix_ms))
        .execute(conn)
        .await
        .map_err(|e| db_err(OP, e))?;
        Ok(())
    }

    /// [`SessionStore::count_upload_facts`](relaypacs_core::SessionStore::count_upload_facts):
    /// one `GROUP BY` over the facts in the time range (index
    /// `upload_facts_at`, or `upload_facts_owner_at` for one user).
    pub(crate) async fn count_facts(
        &self,
        filter: &AnalyticsFilter,
        group: Grouping,
    ) -> Result<Vec<FactCount>> {
        const OP: &str = "count upload facts";
        let (cond, binds) = where_clause(filter);
        let sql = format!(
            "SELECT {key} AS k, kind, cause, COUNT(*), CAST(SUM(files) AS BIGINT), \
             CAST(SUM(bytes) AS BIGINT) FROM upload_facts WHERE {cond} \
             GROUP BY {key}, kind, cause",
            key = key_column(group)
        );
        let mut q = sqlx::query(&sql)
            .bind(filter.start_ms())
            .bind(filter.end_ms());
        for b in binds {
            q = q.bind(b);
        }
        let rows = q
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| db_err(OP, e))?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(1).map_err(|e| db_err(OP, e))?;
                let kind = FactKind::parse(&kind)
                    .ok_or_else(|| corrupt(OP, format!("unknown fact kind {kind:?}")))?;
                Ok(FactCount::new(
                    r.try_get(0).map_err(|e| db_err(OP, e))?,
                    kind,
                    r.try_get(2).map_err(|e| db_err(OP, e))?,
                    get_u64(r, 3, OP)?,
                    get_u64(r, 4, OP)?,
                    get_u64(r, 5, OP)?,
                ))
            })
            .collect()
    }

    /// [`SessionStore::delivery_durations`](relaypacs_core::SessionStore::delivery_durations):
    /// the durations of the delivered facts in the range, ascending, at
    /// most `limit` (one more is read to tell).
    pub(crate) async fn fact_durations(
        &self,
        filter: &AnalyticsFilter,
        group: Grouping,
        limit: usize,
    ) -> Result<GroupDurations> {
        const OP: &str = "read delivery durations";
        let (cond, binds) = where_clause(filter);
        let sql = format!(
            "SELECT {key} AS k, at_ms - started_ms AS d FROM upload_facts \
             WHERE {cond} AND kind = 'delivered' AND started_ms IS NOT NULL \
             AND started_ms <= at_ms ORDER BY d LIMIT {n}",
            key = key_column(group),
            n = limit.saturating_add(1).min(i64::MAX as usize)
        );
        let mut q = sqlx::query(&sql)
            .bind(filter.start_ms())
            .bind(filter.end_ms());
        for b in binds {
            q = q.bind(b);
        }
        let rows = q
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| db_err(OP, e))?;
        if rows.len() > limit {
            return Err(Error::LimitExceeded {
                what: "delivery durations in the range",
                limit: limit as u64,
                actual: rows.len() as u64,
            });
        }
        let mut out = GroupDurations::new();
        for r in &rows {
            let key: String = r.try_get(0).map_err(|e| db_err(OP, e))?;
            out.entry(key).or_default().push(get_u64(r, 1, OP)?);
        }
        Ok(out)
    }
}

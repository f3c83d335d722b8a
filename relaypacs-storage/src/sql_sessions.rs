//! [`SqlSessionStore`]: sessions, files, chunk records and the index of
//! accepted instances in SQL tables (SQLite or PostgreSQL).

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use relaypacs_core::analytics::UploadFact;
use relaypacs_core::{
    ChunkInsert, ChunkRecord, ClaimedWrite, Error, FileId, FileRecord, FileScope, FileState,
    InstanceClaim, Result, SessionId, SessionRecord, SessionState, SessionStore, Sha256Digest,
    StorageErrorKind, Uid, Versioned,
};
use sqlx::{Connection, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::sql_audit::{append_in, event_json};
use crate::sql_state::{Engine, SqlState, corrupt, db_err};

/// A [`SessionStore`] on a [`SqlState`] database.
///
/// A session is one row of `sessions` (its record without files, as JSON,
/// with the version and the owner and state as indexed columns) and one row
/// per file in `session_files`; chunk records and instance claims have
/// their own tables, keyed so that inserts are atomic insert-if-absent
/// (`ON CONFLICT DO NOTHING`). Every call is one transaction: durable when
/// it returns (see [`SqlState`]), atomic across every process sharing the
/// database, and rolled back if its future is dropped.
///
/// A whole-record update ([`update_session`](SessionStore::update_session))
/// writes only the files whose record changed, after reading the stored
/// ones: its cost grows with the number of files of the session. A scoped
/// update ([`update_file_scope`](SessionStore::update_file_scope)) reads
/// and writes only the files it carries; with none, only the session's
/// row (the delivery worker's lease and outcome, a completion).
///
/// Two valid files of one session never share a SOP Instance UID: a
/// partial unique index (migration 0009) refuses the write inside its own
/// transaction, answered as `Conflict` `RELAY_DUPLICATE_INSTANCE`.
#[derive(Clone, Debug)]
pub struct SqlSessionStore {
    pub(crate) db: SqlState,
    /// The audit chain on the same database, appended to in the chunk
    /// record's transaction ([`with_audit`](Self::with_audit)).
    trail: Option<crate::sql_audit::SqlAuditTrail>,
}

impl fmt::Display for SqlSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sql sessions ({})", self.db)
    }
}

fn state_name(s: &SessionState) -> &'static str {
    match s {
        SessionState::Open => "open",
        SessionState::Forwarding => "forwarding",
        SessionState::Delivered { .. } => "delivered",
        SessionState::DeadLetter { .. } => "dead_letter",
    }
}

fn now_text() -> String {
    // Formatting the current UTC time as RFC 3339 cannot fail (a year in
    // 0..=9999); the fallback keeps the column filled regardless.
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn to_json<T: serde::Serialize>(op: &'static str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt(op, e))
}

/// The record without its files, for the `head` column.
fn head_json(rec: &SessionRecord) -> Result<String> {
    let mut v = serde_json::to_value(rec).map_err(|e| corrupt("encode session", e))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("files");
    }
    to_json("encode session", &v)
}

/// Advisory lock class of an owner's session creations
/// ([`SessionStore::create_session_capped`]): "RPSC".
const SESSIONS_LOCK_CLASS: i32 = 0x5250_5343;

/// Advisory lock class of an owner's upload creations
/// ([`SessionStore::update_file_scope_capped`]): "RPUP".
const UPLOADS_LOCK_CLASS: i32 = 0x5250_5550;

/// PostgreSQL: hold `pg_advisory_xact_lock(class, key)` on `owner` until
/// the transaction ends, so the owner's capped writes of that class run
/// one at a time. The two-`int4` key space is apart from the one-`bigint`
/// keys of the instance locks; the key is the first 4 bytes of
/// SHA-256("relaypacs/sessions/" + owner): two owners sharing a key only
/// wait on each other, never count each other.
async fn lock_owner(
    tx: &mut sqlx::AnyConnection,
    class: i32,
    owner: &str,
    op: &'static str,
) -> Result<()> {
    use sha2::Digest as _;
    let h = sha2::Sha256::new()
        .chain_update(b"relaypacs/sessions/")
        .chain_update(owner.as_bytes())
        .finalize();
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(class)
        .bind(i32::from_be_bytes([h[0], h[1], h[2], h[3]]))
        .execute(tx)
        .await
        .map_err(|e| db_err(op, e))?;
    Ok(())
}

/// Milliseconds since the Unix epoch (saturating).
fn unix_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Offsets and lengths are u64 in the model and BIGINT in SQL: a value
/// beyond i64 cannot be a real byte count.
fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid("RELAY_RANGE", "offset beyond 2^63"))
}

/// A step's audit records (their JSON) to commit in the step's own
/// transaction, on the trail they extend.
struct Audit<'a> {
    trail: &'a crate::sql_audit::SqlAuditTrail,
    json: Vec<String>,
}

/// Commit a step's transaction `tx`, with `audit`'s records appended
/// first (all or nothing), then move the trail's head past them.
async fn commit_with(
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    audit: Option<&Audit<'_>>,
    op: &'static str,
) -> Result<()> {
    let head = match audit {
        Some(a) if !a.json.is_empty() => Some(append_in(&mut tx, &a.json).await?),
        _ => None,
    };
    // Crash-safe point: the commit (WAL fsync / PostgreSQL commit) of the
    // step's writes and, with `audit`, its audit records.
    tx.commit().await.map_err(|e| db_err(op, e))?;
    if let (Some(a), Some(head)) = (audit, head) {
        a.trail.committed(head).await;
    }
    Ok(())
}

impl SqlSessionStore {
    /// A session store on `db` (already migrated by [`SqlState::connect`]).
    pub fn new(db: SqlState) -> Self {
        Self { db, trail: None }
    }

    /// This store, appending a step's audit records to `audit`'s chain in
    /// the step's own transaction when the pipeline's audit sink is `audit`
    /// itself (see [`SessionStore::record_chunk_audited`] and the other
    /// `…_audited` writes): one commit, one sync per step instead of two.
    /// A sink on another database is not joined (the store stays as
    /// [`new`](Self::new) made it). Best on SQLite, where every write takes
    /// the one database lock anyway; on PostgreSQL each such transaction
    /// holds the chain head's row lock until it commits, so the steps of
    /// all gateways sharing the chain run one commit at a time (the
    /// server joins only on SQLite).
    pub fn with_audit(mut self, audit: &crate::SqlAuditSink) -> Self {
        let trail = audit.trail();
        if trail.key == self.db.instance().key {
            self.trail = Some(trail);
        }
        self
    }

    /// Insert-if-absent of a chunk record; with `audit`, its audit record
    /// (JSON) appended to that trail in the same transaction when the
    /// chunk is inserted.
    async fn record_chunk_with(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
        audit: Option<Audit<'_>>,
    ) -> Result<ChunkInsert> {
        let (_turn, mut tx) = self.db.begin_write("record chunk").await?;
        let inserted = sqlx::query(
            "INSERT INTO chunks (session_id, file_id, chunk_offset, length, sha256, receipt) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $1) \
             ON CONFLICT (session_id, file_id, chunk_offset) DO NOTHING",
        )
        .bind(id.to_string())
        .bind(file.to_string())
        .bind(to_i64(chunk.offset)?)
        .bind(to_i64(chunk.length)?)
        .bind(chunk.sha256.to_hex())
        .bind(&chunk.receipt)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err("record chunk", e))?;
        if inserted.rows_affected() == 1 {
            // The chunk record and, with `audit`, its audit record.
            commit_with(tx, audit.as_ref(), "record chunk").await?;
            return Ok(ChunkInsert::Inserted);
        }
        let row = sqlx::query(
            "SELECT chunk_offset, length, sha256, receipt FROM chunks \
             WHERE session_id = $1 AND file_id = $2 AND chunk_offset = $3",
        )
        .bind(id.to_string())
        .bind(file.to_string())
        .bind(to_i64(chunk.offset)?)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_err("record chunk", e))?;
        let Some(row) = row else {
            return Err(Error::NotFound { what: "session" });
        };
        let existing = chunk_from_row(&row)?;
        tx.commit().await.map_err(|e| db_err("record chunk", e))?;
        Ok(ChunkInsert::Existing(existing))
    }

    /// [`SessionStore::create_session_capped`]; with `audit`, the new
    /// session's audit record (JSON) appended to that trail in the same
    /// transaction.
    async fn create_capped_with(
        &self,
        session: &SessionRecord,
        cap: u32,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        audit: Option<Audit<'_>>,
    ) -> Result<Option<ClaimedWrite>> {
        const OP: &str = "create session";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        if self.db.engine() == Engine::Postgres {
            lock_owner(&mut tx, SESSIONS_LOCK_CLASS, &session.owner, OP).await?;
        }
        // With its file totals (its files' rows follow).
        let inserted = sqlx::query(
            "INSERT INTO sessions (id, owner, version, state, updated_at, head, file_count, \
             declared_bytes) SELECT $1, $2, 1, $3, $4, $5, $7, $8 WHERE (SELECT COUNT(*) \
             FROM sessions WHERE owner = $2 AND state = 'open') < $6 ON CONFLICT (id) DO NOTHING",
        )
        .bind(session.id.to_string())
        .bind(&session.owner)
        .bind(state_name(&session.state))
        .bind(now_text())
        .bind(head_json(session)?)
        .bind(i64::from(cap))
        .bind(to_i64(session.files.len() as u64)?)
        .bind(to_i64(session.declared_bytes())?)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        if inserted.rows_affected() == 0 {
            let taken = Self::exists(&mut tx, session.id).await?;
            tx.rollback().await.map_err(|e| db_err(OP, e))?;
            return if taken {
                Err(Error::AlreadyExists { what: "session" })
            } else {
                Ok(None)
            };
        }
        // A new session has no file rows yet: nothing to read or remove
        // first.
        let sid = session.id.to_string();
        for file in session.files.values() {
            let body = to_json("encode file", file)?;
            Self::put_file(&mut tx, &sid, file, body).await?;
        }
        Self::insert_chunks(&mut tx, session.id, chunks).await?;
        if let Some(held) = Self::claim_unless_held(&mut tx, claim).await? {
            tx.rollback().await.map_err(|e| db_err(OP, e))?;
            return Ok(Some(ClaimedWrite::Held(held)));
        }
        // The session, its files, their chunks and claim and, with
        // `audit`, its audit records; the commit also releases the owner's
        // advisory lock.
        commit_with(tx, audit.as_ref(), OP).await?;
        Ok(Some(ClaimedWrite::Written(1)))
    }

    /// [`create_capped_with`](Self::create_capped_with) of a session as
    /// [`SessionStore::create_session_capped`] takes it.
    async fn create_capped(
        &self,
        session: &SessionRecord,
        cap: u32,
        audit: Option<Audit<'_>>,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        Ok(self
            .create_capped_with(session, cap, &[], None, audit)
            .await?
            .map(|_| Versioned {
                value: session.clone(),
                version: 1,
            }))
    }

    /// [`SessionStore::update_file_scope_with_facts`]; with `audit`, the
    /// audit records (JSON) appended to that trail in the same
    /// transaction.
    async fn scope_with_facts(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
        audit: Option<Audit<'_>>,
    ) -> Result<u64> {
        const OP: &str = "update session";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        Self::write_scope(&mut tx, session, expected).await?;
        for fact in facts {
            Self::insert_fact(&mut tx, fact).await?;
        }
        // The session, its facts and, with `audit`, its audit records.
        commit_with(tx, audit.as_ref(), OP).await?;
        Ok(expected + 1)
    }

    /// The one transaction of a file's write with its chunk records
    /// ([`SessionStore::update_file_scope_with_chunks`]); with `claim`,
    /// the claim too, the transaction dropped (nothing written) when the
    /// claim in force is another file's; with `audit`, its audit records.
    async fn file_with_chunks(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        audit: Option<Audit<'_>>,
    ) -> Result<ClaimedWrite> {
        const OP: &str = "record file";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        Self::write_scope(&mut tx, session, expected).await?;
        Self::insert_chunks(&mut tx, session.id, chunks).await?;
        if let Some(held) = Self::claim_unless_held(&mut tx, claim).await? {
            tx.rollback().await.map_err(|e| db_err(OP, e))?;
            return Ok(ClaimedWrite::Held(held));
        }
        // Crash-safe point: the commit (WAL fsync / PostgreSQL commit) of
        // the file, its chunks, its claim and, with `audit`, its records.
        commit_with(tx, audit.as_ref(), OP).await?;
        Ok(ClaimedWrite::Written(expected + 1))
    }

    /// `events` as records of the audit trail this store appends to (see
    /// [`with_audit`](Self::with_audit)), or the refusal of `op`.
    fn audited(
        &self,
        op: &'static str,
        events: &[relaypacs_core::AuditEvent],
    ) -> Result<Audit<'_>> {
        let trail = self
            .trail
            .as_ref()
            .ok_or_else(|| relaypacs_core::session_store::no_trail(op))?;
        let json = events.iter().map(event_json).collect::<Result<Vec<_>>>()?;
        Ok(Audit { trail, json })
    }

    /// A pooled connection.
    async fn conn(&self, op: &'static str) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        self.db.pool().acquire().await.map_err(|e| db_err(op, e))
    }

    /// Does session `id` exist (inside `tx`)?
    async fn exists(conn: &mut sqlx::AnyConnection, id: SessionId) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM sessions WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(conn)
            .await
            .map_err(|e| db_err("load session", e))?;
        Ok(row.is_some())
    }

    async fn stored_files(
        conn: &mut sqlx::AnyConnection,
        id: SessionId,
    ) -> Result<BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT file_id, body FROM session_files WHERE session_id = $1")
            .bind(id.to_string())
            .fetch_all(conn)
            .await
            .map_err(|e| db_err("load session files", e))?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0)
                        .map_err(|e| db_err("load session files", e))?,
                    r.try_get::<String, _>(1)
                        .map_err(|e| db_err("load session files", e))?,
                ))
            })
            .collect()
    }

    /// The writes of [`update_file_scope`](SessionStore::update_file_scope)
    /// inside the caller's transaction: the head (compare-and-set on
    /// `expected`), the files `session` carries, the session's totals.
    async fn write_scope(
        tx: &mut sqlx::AnyConnection,
        session: &SessionRecord,
        expected: u64,
    ) -> Result<()> {
        Self::update_head(&mut *tx, session, expected).await?;
        let sid = session.id.to_string();
        let (mut count, mut bytes) = (0i64, 0i64);
        for (fid, file) in &session.files {
            let row = sqlx::query(
                "SELECT body, size FROM session_files WHERE session_id = $1 AND file_id = $2",
            )
            .bind(&sid)
            .bind(fid.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_err("load file", e))?;
            let body = to_json("encode file", file)?;
            let size = to_i64(file.size)?;
            match row {
                None => {
                    count += 1;
                    bytes += size;
                }
                Some(r) => {
                    let old: String = r.try_get(0).map_err(|e| db_err("load file", e))?;
                    if old == body {
                        continue;
                    }
                    let old_size: i64 = r.try_get(1).map_err(|e| db_err("load file", e))?;
                    bytes += size - old_size;
                }
            }
            Self::put_file(&mut *tx, &sid, file, body).await?;
        }
        if count != 0 || bytes != 0 {
            Self::add_to_totals(&mut *tx, &sid, count, bytes).await?;
        }
        Ok(())
    }

    /// Add `count` files and `bytes` declared bytes (either may be
    /// negative) to session `sid`'s totals, inside the caller's transaction.
    async fn add_to_totals(
        conn: &mut sqlx::AnyConnection,
        sid: &str,
        count: i64,
        bytes: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE sessions SET file_count = file_count + $1, \
             declared_bytes = declared_bytes + $2 WHERE id = $3",
        )
        .bind(count)
        .bind(bytes)
        .bind(sid)
        .execute(conn)
        .await
        .map_err(|e| db_err("store file totals", e))?;
        Ok(())
    }

    /// Forget the chunk records of file `fid` of session `sid`, inside the
    /// caller's transaction.
    async fn delete_chunks_in(conn: &mut sqlx::AnyConnection, sid: &str, fid: &str) -> Result<()> {
        sqlx::query("DELETE FROM chunks WHERE session_id = $1 AND file_id = $2")
            .bind(sid)
            .bind(fid)
            .execute(conn)
            .await
            .map_err(|e| db_err("delete chunks", e))?;
        Ok(())
    }

    /// Insert or replace one file's row.
    async fn put_file(
        conn: &mut sqlx::AnyConnection,
        sid: &str,
        file: &FileRecord,
        body: String,
    ) -> Result<()> {
        let sop = match &file.state {
            FileState::Valid { dicom } => Some(dicom.sop_instance_uid.as_str().to_owned()),
            FileState::Uploading => None,
        };
        let duplicate = sop.clone();
        sqlx::query(
            "INSERT INTO session_files (session_id, file_id, body, size, sop_instance_uid) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session_id, file_id) DO UPDATE SET \
             body = excluded.body, size = excluded.size, sop_instance_uid = excluded.sop_instance_uid",
        )
        .bind(sid)
        .bind(file.id.to_string())
        .bind(body)
        .bind(to_i64(file.size)?)
        .bind(sop)
        .execute(conn)
        .await
        .map_err(|e| match (&e, duplicate) {
            // The upsert's own key (session, file) cannot conflict: the one
            // other unique index of the table is session_files_one_instance
            // (migration 0009), another valid file of this session with
            // this SOP Instance UID. The caller's transaction is dropped,
            // so nothing of the write stays.
            (sqlx::Error::Database(d), Some(uid)) if d.is_unique_violation() => {
                Error::conflict(
                    "RELAY_DUPLICATE_INSTANCE",
                    format!("SOP Instance UID {uid} is already in this session"),
                )
            }
            _ => db_err("store file", e),
        })?;
        Ok(())
    }

    /// Write the files of `rec` that differ from what is stored, drop the
    /// stored ones it no longer has, and set the session's file totals.
    async fn write_files(conn: &mut sqlx::AnyConnection, rec: &SessionRecord) -> Result<()> {
        let mut stored = Self::stored_files(&mut *conn, rec.id).await?;
        let sid = rec.id.to_string();
        // Removed files go first: a file that takes over the SOP Instance
        // UID of a removed one in the same write must not meet it in the
        // unique index.
        for gone in stored
            .keys()
            .filter(|k| !FileId::parse(k).is_ok_and(|id| rec.files.contains_key(&id)))
        {
            sqlx::query("DELETE FROM session_files WHERE session_id = $1 AND file_id = $2")
                .bind(&sid)
                .bind(gone)
                .execute(&mut *conn)
                .await
                .map_err(|e| db_err("remove file", e))?;
        }
        for (fid, file) in &rec.files {
            let key = fid.to_string();
            let body = to_json("encode file", file)?;
            if stored.remove(&key).as_deref() == Some(body.as_str()) {
                continue;
            }
            Self::put_file(&mut *conn, &sid, file, body).await?;
        }
        sqlx::query("UPDATE sessions SET file_count = $1, declared_bytes = $2 WHERE id = $3")
            .bind(to_i64(rec.files.len() as u64)?)
            .bind(to_i64(rec.declared_bytes())?)
            .bind(&sid)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_err("store file totals", e))?;
        Ok(())
    }

    /// The conditional UPDATE of a session's row (all but its files): the
    /// first statement of every update, so the row's write lock (SQLite:
    /// the database's) is taken before anything is read. `NotFound` or
    /// `Precondition` when it matches no row.
    async fn update_head(
        conn: &mut sqlx::AnyConnection,
        session: &SessionRecord,
        expected: u64,
    ) -> Result<()> {
        let updated = sqlx::query(
            "UPDATE sessions SET version = version + 1, owner = $1, state = $2, \
             updated_at = $3, head = $4 WHERE id = $5 AND version = $6",
        )
        .bind(&session.owner)
        .bind(state_name(&session.state))
        .bind(now_text())
        .bind(head_json(session)?)
        .bind(session.id.to_string())
        .bind(to_i64(expected)?)
        .execute(&mut *conn)
        .await
        .map_err(|e| db_err("update session", e))?;
        if updated.rows_affected() == 1 {
            return Ok(());
        }
        let row = sqlx::query("SELECT version FROM sessions WHERE id = $1")
            .bind(session.id.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| db_err("update session", e))?;
        Err(match row {
            None => Error::NotFound { what: "session" },
            Some(r) => {
                let v: i64 = r.try_get(0).map_err(|e| db_err("update session", e))?;
                Error::Precondition {
                    what: format!("session version {v} (expected {expected})"),
                }
            }
        })
    }

    /// The session row at its version, as a record without files.
    async fn load_head(
        conn: &mut sqlx::AnyConnection,
        id: SessionId,
    ) -> Result<(serde_json::Value, u64, u64, u64)> {
        let row = sqlx::query(
            "SELECT version, head, file_count, declared_bytes FROM sessions WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(conn)
        .await
        .map_err(|e| db_err("load session", e))?
        .ok_or(Error::NotFound { what: "session" })?;
        let num = |i: usize| -> Result<u64> {
            let v: i64 = row.try_get(i).map_err(|e| db_err("load session", e))?;
            u64::try_from(v).map_err(|e| corrupt("load session", e))
        };
        let head: String = row.try_get(1).map_err(|e| db_err("load session", e))?;
        let value = serde_json::from_str(&head).map_err(|e| corrupt("decode session", e))?;
        Ok((value, num(0)?, num(2)?, num(3)?))
    }

    /// With `claim`, claim its instance inside the caller's transaction:
    /// the claim in force when another file holds it (the caller then
    /// drops the transaction: nothing of its write stays), else `None`.
    async fn claim_unless_held(
        tx: &mut sqlx::AnyConnection,
        claim: Option<&InstanceClaim>,
    ) -> Result<Option<InstanceClaim>> {
        let Some(claim) = claim else {
            return Ok(None);
        };
        let held = Self::claim_in(tx, claim).await?;
        Ok((!held.held_by(claim.session, claim.file)).then_some(held))
    }

    /// Record `chunks` of session `id` (inside the caller's transaction);
    /// a chunk already recorded at its offset must be the same chunk.
    async fn insert_chunks(
        tx: &mut sqlx::AnyConnection,
        id: SessionId,
        chunks: &[(FileId, ChunkRecord)],
    ) -> Result<()> {
        const OP: &str = "record file";
        let sid = id.to_string();
        for (file, chunk) in chunks {
            let inserted = sqlx::query(
                "INSERT INTO chunks (session_id, file_id, chunk_offset, length, sha256, receipt) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (session_id, file_id, chunk_offset) DO NOTHING",
            )
            .bind(&sid)
            .bind(file.to_string())
            .bind(to_i64(chunk.offset)?)
            .bind(to_i64(chunk.length)?)
            .bind(chunk.sha256.to_hex())
            .bind(&chunk.receipt)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
            if inserted.rows_affected() == 1 {
                continue;
            }
            let row = sqlx::query(
                "SELECT chunk_offset, length, sha256, receipt FROM chunks \
                 WHERE session_id = $1 AND file_id = $2 AND chunk_offset = $3",
            )
            .bind(&sid)
            .bind(file.to_string())
            .bind(to_i64(chunk.offset)?)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
            let existing = chunk_from_row(&row)?;
            if existing.length != chunk.length || existing.sha256 != chunk.sha256 {
                // The transaction is dropped: nothing of this call stays.
                return Err(Error::conflict(
                    "RELAY_CHUNK_CONFLICT",
                    "another chunk was recorded at this offset",
                ));
            }
        }
        Ok(())
    }

    /// Claim `claim`'s SOP Instance UID unless claimed (inside the
    /// caller's transaction); the claim in force.
    async fn claim_in(
        tx: &mut sqlx::AnyConnection,
        claim: &InstanceClaim,
    ) -> Result<InstanceClaim> {
        let at = claim
            .at
            .format(&Rfc3339)
            .map_err(|e| corrupt("claim time", e))?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO instance_claims ({CLAIM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (sop_instance_uid) DO NOTHING"
        ))
        .bind(claim.sop_instance_uid.as_str())
        .bind(claim.data_set_sha256.to_hex())
        .bind(claim.study_instance_uid.as_str())
        .bind(claim.session.to_string())
        .bind(claim.file.to_string())
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err("claim instance", e))?;
        if inserted.rows_affected() == 1 {
            // The row is `claim` as written: no need to read it back.
            return Ok(claim.clone());
        }
        let row = sqlx::query(&format!(
            "SELECT {CLAIM_COLUMNS} FROM instance_claims WHERE sop_instance_uid = $1"
        ))
        .bind(claim.sop_instance_uid.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_err("claim instance", e))?;
        claim_from_row(&row)
    }
}

/// A session record from its head and file bodies (JSON).
fn assemble(
    mut head: serde_json::Value,
    files: impl IntoIterator<Item = (String, String)>,
) -> Result<SessionRecord> {
    let mut map = serde_json::Map::new();
    for (k, body) in files {
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| corrupt("decode file", e))?;
        map.insert(k, v);
    }
    if let Some(o) = head.as_object_mut() {
        o.insert("files".into(), serde_json::Value::Object(map));
    }
    let value: SessionRecord =
        serde_json::from_value(head).map_err(|e| corrupt("decode session", e))?;
    // Files are keyed by id: check each body belongs under its key.
    if value.files.iter().any(|(k, f)| *k != f.id) {
        return Err(corrupt("decode session", "a file row holds another file"));
    }
    Ok(value)
}

fn claim_from_row(row: &sqlx::any::AnyRow) -> Result<InstanceClaim> {
    let get = |i: usize| -> Result<String> {
        row.try_get::<String, _>(i)
            .map_err(|e| db_err("load instance claim", e))
    };
    let at = OffsetDateTime::parse(&get(5)?, &Rfc3339).map_err(|e| corrupt("claim time", e))?;
    let mut claim = InstanceClaim::new(
        Uid::parse(&get(0)?).map_err(|e| corrupt("claim uid", e))?,
        Sha256Digest::from_hex(&get(1)?).map_err(|e| corrupt("claim digest", e))?,
        Uid::parse(&get(2)?).map_err(|e| corrupt("claim study", e))?,
        SessionId::parse(&get(3)?).map_err(|e| corrupt("claim session", e))?,
        FileId::parse(&get(4)?).map_err(|e| corrupt("claim file", e))?,
    );
    claim.at = at;
    Ok(claim)
}

const CLAIM_COLUMNS: &str =
    "sop_instance_uid, data_set_sha256, study_instance_uid, session_id, file_id, claimed_at";

#[async_trait]
impl SessionStore for SqlSessionStore {
    async fn record_upload_fact(&self, fact: &relaypacs_core::analytics::UploadFact) -> Result<()> {
        self.record_fact(fact).await
    }

    async fn count_upload_facts(
        &self,
        filter: &relaypacs_core::analytics::AnalyticsFilter,
        group: relaypacs_core::analytics::Grouping,
    ) -> Result<Vec<relaypacs_core::analytics::FactCount>> {
        self.count_facts(filter, group).await
    }

    async fn delivery_durations(
        &self,
        filter: &relaypacs_core::analytics::AnalyticsFilter,
        group: relaypacs_core::analytics::Grouping,
        limit: usize,
    ) -> Result<relaypacs_core::analytics::GroupDurations> {
        self.fact_durations(filter, group, limit).await
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<Versioned<SessionRecord>> {
        let (_turn, mut tx) = self.db.begin_write("create session").await?;
        let inserted = sqlx::query(
            "INSERT INTO sessions (id, owner, version, state, updated_at, head) \
             VALUES ($1, $2, 1, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(session.id.to_string())
        .bind(&session.owner)
        .bind(state_name(&session.state))
        .bind(now_text())
        .bind(head_json(session)?)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err("create session", e))?;
        if inserted.rows_affected() == 0 {
            return Err(Error::AlreadyExists { what: "session" });
        }
        Self::write_files(&mut tx, session).await?;
        // Crash-safe point: the commit (WAL fsync / PostgreSQL commit).
        tx.commit().await.map_err(|e| db_err("create session", e))?;
        Ok(Versioned {
            value: session.clone(),
            version: 1,
        })
    }

    /// Atomic across every gateway on the database. PostgreSQL: the
    /// transaction first takes an advisory lock on the owner
    /// (a hash of the owner), so creations of one owner run one at a time
    /// and each counts the sessions the previous one committed (READ
    /// COMMITTED: a new snapshot per statement). SQLite: the conditional
    /// INSERT is the transaction's first statement, which takes the
    /// database's write lock before it counts.
    async fn create_session_capped(
        &self,
        session: &SessionRecord,
        cap: u32,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        self.create_capped(session, cap, None).await
    }

    async fn create_session_capped_audited(
        &self,
        session: &SessionRecord,
        cap: u32,
        event: &relaypacs_core::AuditEvent,
    ) -> Result<Option<Versioned<SessionRecord>>> {
        let audit = self.audited(
            "create a session with its audit record",
            std::slice::from_ref(event),
        )?;
        self.create_capped(session, cap, Some(audit)).await
    }

    async fn create_session_with_file_audited(
        &self,
        session: &SessionRecord,
        cap: u32,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        events: &[relaypacs_core::AuditEvent],
    ) -> Result<Option<ClaimedWrite>> {
        let audit = self.audited("create a session with its first file", events)?;
        self.create_capped_with(session, cap, chunks, claim, Some(audit))
            .await
    }

    async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>> {
        // One read transaction: the head and the files of one version.
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| db_err("load session", e))?;
        let (head, version, _, _) = Self::load_head(&mut tx, id).await?;
        let files = Self::stored_files(&mut tx, id).await?;
        tx.commit().await.map_err(|e| db_err("load session", e))?;
        Ok(Versioned {
            value: assemble(head, files)?,
            version,
        })
    }

    async fn update_session(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
        self.update_session_with_facts(session, expected, &[]).await
    }

    /// One transaction: the conditional UPDATE of the session's row (it
    /// takes the write lock first), the files, then each fact
    /// insert-if-absent.
    async fn update_session_with_facts(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
    ) -> Result<u64> {
        const OP: &str = "update session";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        Self::update_head(&mut tx, session, expected).await?;
        Self::write_files(&mut tx, session).await?;
        for fact in facts {
            Self::insert_fact(&mut tx, fact).await?;
        }
        // Crash-safe point: the commit.
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(expected + 1)
    }

    async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()> {
        self.delete_session_with_facts(id, expected, &[]).await
    }

    /// One transaction: the conditional delete of the session's row (it
    /// takes the write lock first), its files, chunk records and
    /// reservations, then each fact insert-if-absent.
    async fn delete_session_with_facts(
        &self,
        id: SessionId,
        expected: u64,
        facts: &[UploadFact],
    ) -> Result<()> {
        const OP: &str = "delete session";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        let sid = id.to_string();
        let deleted = sqlx::query("DELETE FROM sessions WHERE id = $1 AND version = $2")
            .bind(&sid)
            .bind(to_i64(expected)?)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        if deleted.rows_affected() == 0 {
            return Err(if Self::exists(&mut tx, id).await? {
                Error::Precondition {
                    what: format!("session version (expected {expected})"),
                }
            } else {
                Error::NotFound { what: "session" }
            });
        }
        for table in ["session_files", "chunks", "range_reservations"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE session_id = $1"))
                .bind(&sid)
                .execute(&mut *tx)
                .await
                .map_err(|e| db_err(OP, e))?;
        }
        for fact in facts {
            Self::insert_fact(&mut tx, fact).await?;
        }
        // Crash-safe point: the commit (WAL fsync / PostgreSQL commit).
        tx.commit().await.map_err(|e| db_err(OP, e))
    }

    async fn list_sessions(&self) -> Result<Vec<SessionId>> {
        let rows = sqlx::query("SELECT id FROM sessions ORDER BY id")
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| db_err("list sessions", e))?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get(0).map_err(|e| db_err("list sessions", e))?;
                SessionId::parse(&s).map_err(|e| corrupt("session id", e))
            })
            .collect()
    }

    async fn load_file_scope(&self, id: SessionId, file: Option<FileId>) -> Result<FileScope> {
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| db_err("load session", e))?;
        let (head, version, file_count, declared_bytes) = Self::load_head(&mut tx, id).await?;
        let mut files = Vec::new();
        if let Some(f) = file {
            let row = sqlx::query(
                "SELECT body FROM session_files WHERE session_id = $1 AND file_id = $2",
            )
            .bind(id.to_string())
            .bind(f.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_err("load file", e))?;
            if let Some(r) = row {
                files.push((
                    f.to_string(),
                    r.try_get::<String, _>(0)
                        .map_err(|e| db_err("load file", e))?,
                ));
            }
        }
        tx.commit().await.map_err(|e| db_err("load session", e))?;
        let mut scope = FileScope::of(
            Versioned {
                value: assemble(head, files)?,
                version,
            },
            file,
        );
        scope.file_count = file_count;
        scope.declared_bytes = declared_bytes;
        Ok(scope)
    }

    async fn update_file_scope(&self, session: &SessionRecord, expected: u64) -> Result<u64> {
        self.update_file_scope_with_facts(session, expected, &[])
            .await
    }

    /// One transaction: the scoped write (its conditional UPDATE of the
    /// session's row takes the write lock first), then each fact
    /// insert-if-absent.
    async fn update_file_scope_with_facts(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
    ) -> Result<u64> {
        self.scope_with_facts(session, expected, facts, None).await
    }

    async fn update_file_scope_with_facts_audited(
        &self,
        session: &SessionRecord,
        expected: u64,
        facts: &[UploadFact],
        events: &[relaypacs_core::AuditEvent],
    ) -> Result<u64> {
        let audit = self.audited("update a session with its audit records", events)?;
        self.scope_with_facts(session, expected, facts, Some(audit))
            .await
    }

    /// One transaction for every write: each head conditionally on its
    /// version (a refused one is skipped, nothing of its own written),
    /// the facts of those written, then their audit records appended in
    /// one go. Rows are locked in the order given (callers sort by id).
    async fn update_heads(
        &self,
        writes: &[relaypacs_core::HeadWrite<'_>],
    ) -> Result<Vec<Result<u64>>> {
        const OP: &str = "update sessions";
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        // Refused before anything is written when the trail is not this
        // store's; the records join it write by write.
        let mut audit = if writes.iter().any(|w| !w.events.is_empty()) {
            Some(self.audited(OP, &[])?)
        } else {
            None
        };
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            // The head row only (`head_json` leaves the files out).
            match Self::update_head(&mut tx, w.session, w.expected).await {
                Ok(()) => {}
                Err(e @ (Error::Precondition { .. } | Error::NotFound { .. })) => {
                    out.push(Err(e));
                    continue;
                }
                Err(e) => return Err(e),
            }
            for fact in w.facts {
                Self::insert_fact(&mut tx, fact).await?;
            }
            if let Some(a) = audit.as_mut() {
                for e in w.events {
                    a.json.push(event_json(e)?);
                }
            }
            out.push(Ok(w.expected + 1));
        }
        // Crash-safe point: one commit for every head written, its facts
        // and its audit records.
        commit_with(tx, audit.as_ref(), OP).await?;
        Ok(out)
    }

    /// Atomic across every gateway on the database, as
    /// [`create_session_capped`](SessionStore::create_session_capped):
    /// PostgreSQL takes an advisory lock on the owner's uploads first;
    /// SQLite's first statement is a write (it takes the write lock), so
    /// the count and the write are one step.
    async fn update_file_scope_capped(
        &self,
        session: &SessionRecord,
        expected: u64,
        cap: u32,
    ) -> Result<Option<u64>> {
        const OP: &str = "update session";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        match self.db.engine() {
            Engine::Postgres => {
                lock_owner(&mut tx, UPLOADS_LOCK_CLASS, &session.owner, OP).await?;
            }
            Engine::Sqlite => {
                // A write that changes nothing, to hold the write lock
                // from here to the commit.
                sqlx::query("UPDATE sessions SET version = version WHERE id = $1")
                    .bind(session.id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_err(OP, e))?;
            }
        }
        let uploading: i64 = sqlx::query(
            "SELECT COUNT(*) FROM session_files f JOIN sessions s ON s.id = f.session_id \
             WHERE s.owner = $1 AND s.state = 'open' AND f.sop_instance_uid IS NULL",
        )
        .bind(&session.owner)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?
        .try_get(0)
        .map_err(|e| db_err(OP, e))?;
        let sid = session.id.to_string();
        let mut added = 0i64;
        for (fid, file) in &session.files {
            if file.state != FileState::Uploading {
                continue;
            }
            let stored =
                sqlx::query("SELECT 1 FROM session_files WHERE session_id = $1 AND file_id = $2")
                    .bind(&sid)
                    .bind(fid.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| db_err(OP, e))?;
            if stored.is_none() {
                added += 1;
            }
        }
        if added > 0 && uploading + added > i64::from(cap) {
            tx.rollback().await.map_err(|e| db_err(OP, e))?;
            return Ok(None);
        }
        Self::write_scope(&mut tx, session, expected).await?;
        // Crash-safe point: the commit, which also releases the lock.
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(Some(expected + 1))
    }

    /// One transaction: the scoped write first (its conditional UPDATE of
    /// the session's row takes the write lock, SQLite's or the row's, before
    /// anything is read), then each chunk insert-if-absent; a different
    /// chunk at an offset drops the transaction, so nothing is written.
    async fn update_file_scope_with_chunks(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
    ) -> Result<u64> {
        match self
            .file_with_chunks(session, expected, chunks, None, None)
            .await?
        {
            ClaimedWrite::Written(v) => Ok(v),
            // Only a write that claims meets another file's claim.
            ClaimedWrite::Held(_) => Err(Error::storage(
                StorageErrorKind::Io,
                "record file",
                "a write without a claim found one held",
            )),
        }
    }

    /// One transaction: the writes of
    /// [`update_file_scope_with_chunks`](SessionStore::update_file_scope_with_chunks),
    /// then the claim (insert-if-absent, as
    /// [`claim_instance`](SessionStore::claim_instance)); when the claim in
    /// force is another file's, the transaction is dropped (nothing
    /// written) and that claim returned.
    async fn update_file_scope_claiming(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
        claim: &InstanceClaim,
    ) -> Result<ClaimedWrite> {
        self.file_with_chunks(session, expected, chunks, Some(claim), None)
            .await
    }

    async fn files_with_instance(
        &self,
        id: SessionId,
        sop_instance_uid: &Uid,
    ) -> Result<Vec<FileId>> {
        let rows = sqlx::query(
            "SELECT file_id FROM session_files WHERE session_id = $1 AND sop_instance_uid = $2",
        )
        .bind(id.to_string())
        .bind(sop_instance_uid.as_str())
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| db_err("find instance", e))?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get(0).map_err(|e| db_err("find instance", e))?;
                FileId::parse(&s).map_err(|e| corrupt("file id", e))
            })
            .collect()
    }

    /// One indexed look-up (`session_files_instance`): a validated file
    /// is one with a SOP Instance UID.
    async fn has_valid_file_except(&self, id: SessionId, except: FileId) -> Result<bool> {
        let row = sqlx::query(
            "SELECT 1 FROM session_files WHERE session_id = $1 \
             AND sop_instance_uid IS NOT NULL AND file_id <> $2 LIMIT 1",
        )
        .bind(id.to_string())
        .bind(except.to_string())
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err("find a valid file", e))?;
        Ok(row.is_some())
    }

    /// One transaction: the conditional UPDATE of the session's row (it
    /// takes the write lock first), the file's row and chunk records
    /// deleted, the totals brought down by the file's, the facts.
    async fn remove_file_scoped(
        &self,
        session: &SessionRecord,
        expected: u64,
        file: FileId,
        facts: &[UploadFact],
    ) -> Result<u64> {
        const OP: &str = "remove file";
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        Self::update_head(&mut tx, session, expected).await?;
        let sid = session.id.to_string();
        let fid = file.to_string();
        let gone = sqlx::query(
            "DELETE FROM session_files WHERE session_id = $1 AND file_id = $2 RETURNING size",
        )
        .bind(&sid)
        .bind(&fid)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        let Some(row) = gone else {
            tx.rollback().await.map_err(|e| db_err(OP, e))?;
            return Err(Error::NotFound { what: "file" });
        };
        let size: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
        Self::delete_chunks_in(&mut tx, &sid, &fid).await?;
        Self::add_to_totals(&mut tx, &sid, -1, -size).await?;
        for fact in facts {
            Self::insert_fact(&mut tx, fact).await?;
        }
        // Crash-safe point: the commit of the session's head, the file's
        // removal with its chunk records and totals, and the facts.
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(expected + 1)
    }

    async fn list_files(
        &self,
        id: SessionId,
        after: Option<FileId>,
        limit: usize,
    ) -> Result<Vec<FileRecord>> {
        let rows = sqlx::query(
            "SELECT body FROM session_files WHERE session_id = $1 AND file_id > $2 \
             ORDER BY file_id LIMIT $3",
        )
        .bind(id.to_string())
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| db_err("list files", e))?;
        rows.iter()
            .map(|r| {
                let body: String = r.try_get(0).map_err(|e| db_err("list files", e))?;
                serde_json::from_str(&body).map_err(|e| corrupt("decode file", e))
            })
            .collect()
    }

    async fn reserve_range(
        &self,
        id: SessionId,
        file: FileId,
        range: std::ops::Range<u64>,
        holder: &str,
        until: OffsetDateTime,
    ) -> Result<()> {
        match self.db.engine() {
            Engine::Sqlite => {
                if !Self::exists(&mut *self.conn("reserve a byte range").await?, id).await? {
                    return Err(Error::NotFound { what: "session" });
                }
                reserve_local(&self.db, id, file, range, holder, until)
            }
            Engine::Postgres => {
                let op = "reserve a byte range";
                let mut conn = self.conn(op).await?;
                reserve_on(
                    &mut conn,
                    self.db.instance().key,
                    id,
                    file,
                    range,
                    holder,
                    until,
                )
                .await
            }
        }
    }

    fn instance_key(&self) -> Option<i64> {
        Some(self.db.instance().key)
    }

    /// PostgreSQL: a live gateway holds the session-level advisory lock on
    /// its key for as long as it runs ([`SqlState`]), so a lock taken here
    /// means its process is gone (the lock is released again at once).
    /// SQLite: one gateway process per database file (the data folder's
    /// server lock), so any key but this process's is an earlier run's.
    async fn instance_alive(&self, key: i64) -> Result<bool> {
        if key == self.db.instance().key {
            return Ok(true);
        }
        if self.db.engine() == Engine::Sqlite {
            return Ok(false);
        }
        let op = "check a gateway's liveness";
        // One connection for the lock and its release: advisory locks
        // belong to the session that took them.
        let mut conn = self.conn(op).await?;
        let taken: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| db_err(op, e))?;
        if taken {
            sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut *conn)
                .await
                .map_err(|e| db_err(op, e))?;
        }
        Ok(!taken)
    }

    async fn release_range(
        &self,
        id: SessionId,
        file: FileId,
        range: std::ops::Range<u64>,
        holder: &str,
    ) -> Result<()> {
        if self.db.engine() == Engine::Sqlite {
            let mut leases = lock(&self.db.instance().local_leases);
            if let Some(v) = leases.get_mut(&(id, file)) {
                v.retain(|(r, h, _)| !(*r == range && h == holder));
                if v.is_empty() {
                    leases.remove(&(id, file));
                }
            }
            return Ok(());
        }
        let op = "release a byte range";
        let mut conn = self.conn(op).await?;
        let mut tx = conn.begin().await.map_err(|e| db_err(op, e))?;
        // A lease, not acknowledged data: no wait for the WAL flush.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(op, e))?;
        sqlx::query(
            "DELETE FROM range_reservations WHERE session_id = $1 AND file_id = $2 \
             AND range_start = $3 AND range_end = $4 AND holder = $5",
        )
        .bind(id.to_string())
        .bind(file.to_string())
        .bind(to_i64(range.start)?)
        .bind(to_i64(range.end)?)
        .bind(holder)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(op, e))?;
        tx.commit().await.map_err(|e| db_err(op, e))
    }

    async fn record_chunk(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
    ) -> Result<ChunkInsert> {
        self.record_chunk_with(id, file, chunk, None).await
    }

    fn audit_trail_key(&self) -> Option<i64> {
        self.trail.as_ref().map(|t| t.key)
    }

    async fn record_chunk_audited(
        &self,
        id: SessionId,
        file: FileId,
        chunk: &ChunkRecord,
        event: &relaypacs_core::AuditEvent,
    ) -> Result<ChunkInsert> {
        let audit = self.audited(
            "record a chunk with its audit record",
            std::slice::from_ref(event),
        )?;
        self.record_chunk_with(id, file, chunk, Some(audit)).await
    }

    async fn update_file_scope_audited(
        &self,
        session: &SessionRecord,
        expected: u64,
        chunks: &[(FileId, ChunkRecord)],
        claim: Option<&InstanceClaim>,
        events: &[relaypacs_core::AuditEvent],
    ) -> Result<ClaimedWrite> {
        let audit = self.audited("record a file with its audit records", events)?;
        self.file_with_chunks(session, expected, chunks, claim, Some(audit))
            .await
    }

    async fn chunks(&self, id: SessionId, file: FileId) -> Result<Vec<ChunkRecord>> {
        let mut tx = self
            .db
            .pool()
            .begin()
            .await
            .map_err(|e| db_err("load chunks", e))?;
        let rows = sqlx::query(
            "SELECT chunk_offset, length, sha256, receipt FROM chunks \
             WHERE session_id = $1 AND file_id = $2 ORDER BY chunk_offset",
        )
        .bind(id.to_string())
        .bind(file.to_string())
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| db_err("load chunks", e))?;
        // On SQLite, chunk rows exist only in a session: the insert checks
        // for it and deleting the session deletes them, and writers are
        // serialized, so the session is looked up only when there are none,
        // to tell "none yet" from "no such session" (one statement fewer
        // per tus PATCH). On PostgreSQL an insert racing the deletion can
        // leave rows behind (until cleanup): always looked up.
        let check = rows.is_empty() || self.db.engine() == Engine::Postgres;
        if check && !Self::exists(&mut tx, id).await? {
            return Err(Error::NotFound { what: "session" });
        }
        tx.commit().await.map_err(|e| db_err("load chunks", e))?;
        rows.iter().map(chunk_from_row).collect()
    }

    async fn delete_chunks(&self, id: SessionId, file: FileId) -> Result<()> {
        let (_turn, mut tx) = self.db.begin_write("delete chunks").await?;
        Self::delete_chunks_in(&mut tx, &id.to_string(), &file.to_string()).await?;
        if !Self::exists(&mut tx, id).await? {
            return Err(Error::NotFound { what: "session" });
        }
        tx.commit().await.map_err(|e| db_err("delete chunks", e))
    }

    async fn claim_instance(&self, claim: &InstanceClaim) -> Result<InstanceClaim> {
        let (_turn, mut tx) = self.db.begin_write("claim instance").await?;
        let held = Self::claim_in(&mut tx, claim).await?;
        // Crash-safe point: the commit.
        tx.commit().await.map_err(|e| db_err("claim instance", e))?;
        Ok(held)
    }

    async fn instance_claim(&self, sop_instance_uid: &Uid) -> Result<Option<InstanceClaim>> {
        let row = sqlx::query(&format!(
            "SELECT {CLAIM_COLUMNS} FROM instance_claims WHERE sop_instance_uid = $1"
        ))
        .bind(sop_instance_uid.as_str())
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err("load instance claim", e))?;
        row.as_ref().map(claim_from_row).transpose()
    }

    async fn release_instance(
        &self,
        sop_instance_uid: &Uid,
        session: SessionId,
        file: FileId,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM instance_claims \
             WHERE sop_instance_uid = $1 AND session_id = $2 AND file_id = $3",
        )
        .bind(sop_instance_uid.as_str())
        .bind(session.to_string())
        .bind(file.to_string())
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("release instance claim", e))?;
        Ok(())
    }
}

fn chunk_from_row(row: &sqlx::any::AnyRow) -> Result<ChunkRecord> {
    let offset: i64 = row.try_get(0).map_err(|e| db_err("load chunk", e))?;
    let length: i64 = row.try_get(1).map_err(|e| db_err("load chunk", e))?;
    let sha: String = row.try_get(2).map_err(|e| db_err("load chunk", e))?;
    let receipt: String = row.try_get(3).map_err(|e| db_err("load chunk", e))?;
    Ok(ChunkRecord::new(
        u64::try_from(offset).map_err(|e| corrupt("chunk offset", e))?,
        u64::try_from(length).map_err(|e| corrupt("chunk length", e))?,
        Sha256Digest::from_hex(&sha).map_err(|e| corrupt("chunk digest", e))?,
        receipt,
    ))
}

/// A byte-range reservation on PostgreSQL, in one transaction on `conn`
/// (see [`SessionStore::reserve_range`]): the session's row is locked, so
/// reservations of one session are decided one at a time. A conflicting
/// reservation whose holder process is gone (its instance advisory lock is
/// free) is removed at once rather than waited out.
async fn reserve_on(
    conn: &mut sqlx::AnyConnection,
    instance: i64,
    id: SessionId,
    file: FileId,
    range: std::ops::Range<u64>,
    holder: &str,
    until: OffsetDateTime,
) -> Result<()> {
    let op = "reserve a byte range";
    let mut tx = conn.begin().await.map_err(|e| db_err(op, e))?;
    // A lease, not acknowledged data: no wait for the WAL flush.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(op, e))?;
    let sid = id.to_string();
    let fid = file.to_string();
    if sqlx::query("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE")
        .bind(&sid)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db_err(op, e))?
        .is_none()
    {
        return Err(Error::NotFound { what: "session" });
    }
    let now = unix_millis(OffsetDateTime::now_utc());
    sqlx::query(
        "DELETE FROM range_reservations \
         WHERE session_id = $1 AND file_id = $2 AND expires_at < $3",
    )
    .bind(&sid)
    .bind(&fid)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(|e| db_err(op, e))?;
    let (start, end) = (to_i64(range.start)?, to_i64(range.end)?);
    let rows = sqlx::query(
        "SELECT DISTINCT instance FROM range_reservations \
         WHERE session_id = $1 AND file_id = $2 AND range_start < $4 AND $3 < range_end \
         AND NOT (holder = $5 AND range_start = $3 AND range_end = $4)",
    )
    .bind(&sid)
    .bind(&fid)
    .bind(start)
    .bind(end)
    .bind(holder)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| db_err(op, e))?;
    for row in rows {
        let other: i64 = row.try_get(0).map_err(|e| db_err(op, e))?;
        let gone = other != instance && {
            let r = sqlx::query("SELECT pg_try_advisory_lock($1)")
                .bind(other)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db_err(op, e))?;
            r.try_get::<bool, _>(0).map_err(|e| db_err(op, e))?
        };
        if !gone {
            return Err(Error::Busy {
                what: format!(
                    "range {}..{} is being written by another request",
                    range.start, range.end
                ),
            });
        }
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(other)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(op, e))?;
        sqlx::query("DELETE FROM range_reservations WHERE instance = $1")
            .bind(other)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(op, e))?;
    }
    sqlx::query(
        "INSERT INTO range_reservations \
         (session_id, file_id, range_start, range_end, holder, instance, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (session_id, file_id, range_start, holder) \
         DO UPDATE SET range_end = excluded.range_end, expires_at = excluded.expires_at",
    )
    .bind(&sid)
    .bind(&fid)
    .bind(start)
    .bind(end)
    .bind(holder)
    .bind(instance)
    .bind(unix_millis(until))
    .execute(&mut *tx)
    .await
    .map_err(|e| db_err(op, e))?;
    tx.commit().await.map_err(|e| db_err(op, e))
}

/// A byte-range reservation on SQLite: kept in this process, the one
/// gateway on its SQLite file (the server holds its data folder locked).
fn reserve_local(
    db: &SqlState,
    id: SessionId,
    file: FileId,
    range: std::ops::Range<u64>,
    holder: &str,
    until: OffsetDateTime,
) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let mut leases = lock(&db.instance().local_leases);
    let held = leases.entry((id, file)).or_default();
    held.retain(|(_, _, u)| *u >= now);
    let overlaps = |r: &std::ops::Range<u64>| r.start < range.end && range.start < r.end;
    if held
        .iter()
        .any(|(r, h, _)| overlaps(r) && !(h == holder && *r == range))
    {
        return Err(Error::Busy {
            what: format!(
                "range {}..{} is being written by another request",
                range.start, range.end
            ),
        });
    }
    held.retain(|(r, h, _)| !(h == holder && *r == range));
    held.push((range, holder.to_owned(), until));
    Ok(())
}

/// A std mutex's guard; a poisoned lock only means a panic elsewhere, and
/// the map it guards stays consistent (every change is one call).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

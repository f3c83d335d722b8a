//! [`SqlAuditSink`]: the audit trail as an append-only, hash-chained table
//! of a [`SqlState`] database, one chain shared by every gateway on it.
//!
//! A row of `audit_events` is a record of the chain of the JSON-lines
//! trail ([`JsonlAuditSink`](crate::JsonlAuditSink)), the same fields and
//! the same hash; [`verify_sql_chain`] feeds the rows, as those lines, to
//! the same verifier ([`verify_reader`]).
//!
//! The chain head can be anchored outside the database
//! ([`SqlAuditSink::open_anchored`]): a file under the gateway's data
//! folder, replaced crash-safely ([`write_anchor`]) at start, every N
//! records, periodically and at close, which [`verify_sql_chain_against_all`]
//! checks the table against, so a table cut or rewritten by whoever can
//! lift the triggers (the owner, a superuser) is caught.

use std::fmt;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use relaypacs_core::{AuditEvent, AuditSink, Error, Result, StorageErrorKind};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use crate::audit_anchor::{read_anchor, sweep_anchor_temps, write_anchor};
use crate::local_audit::{ChainError, ChainErrorKind, ChainHead, link_hash, verify_reader};
use crate::sql_state::{SqlState, corrupt, db_err};

/// An [`AuditSink`] appending to the `audit_events` table of a
/// [`SqlState`] database.
///
/// # Chain
/// Each row carries its sequence number, the previous row's hash and its
/// own, computed as in the JSON-lines trail. Several gateways (processes)
/// append to one chain: an append's first statement updates the one-row
/// `audit_head` table, which takes its row lock (PostgreSQL) or the
/// database's write lock (SQLite) until the transaction ends, so sequence
/// numbers and links never fork. Rows are in the order their transactions
/// committed, which is the order their `record` calls returned.
///
/// # Durability
/// `record` returns once its transaction committed: durable (see
/// [`SqlState`]). Group commit: records asked for while a transaction
/// runs share the next one (up to 256), in the order they were asked for.
/// Transactions run in a task of their own, so a caller that gives up
/// mid-way leaves either the whole batch or nothing.
///
/// # Append-only
/// The migration installs triggers refusing UPDATE and DELETE (and
/// TRUNCATE, PostgreSQL) of `audit_events`, for the table's owner too; on
/// PostgreSQL, run the gateways as a role granted only `SELECT, INSERT` on
/// `audit_events` and `SELECT, UPDATE` on `audit_head` (see
/// `migrations/postgres/0002_audit.sql`).
///
/// # Anchor
/// Opened with [`open_anchored`](Self::open_anchored), the sink keeps the
/// chain head in a file outside the database (see
/// [`crate::audit_anchor`]); each gateway of a shared chain keeps its own.
#[derive(Clone)]
pub struct SqlAuditSink {
    db: SqlState,
    queue: Arc<Queue>,
    shared: Arc<Shared>,
}

/// What the writer task, the anchor timer and the sink share.
#[derive(Default)]
struct Shared {
    /// The head after the last batch this sink committed (or as read at
    /// open): the head naming this sink's last record.
    last: std::sync::Mutex<Option<ChainHead>>,
    /// The anchor file and when it is written, if anchored.
    anchor: Option<tokio::sync::Mutex<AnchorState>>,
}

impl Shared {
    fn last(&self) -> Option<ChainHead> {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remember `head` if it is past the one known (batches of one sink
    /// commit in order; a read at open may race a first append).
    fn advance(&self, head: ChainHead) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|l| l.count < head.count) {
            *last = Some(head);
        }
    }

    /// Write `head` to the anchor file when it is past the anchored one
    /// (`force`) or when a periodic anchor is due. Anchors never go
    /// backwards: one writer at a time, under the lock.
    async fn anchor(&self, head: ChainHead, force: bool) -> Result<()> {
        let Some(anchor) = &self.anchor else {
            return Ok(());
        };
        let mut st = anchor.lock().await;
        if head.count <= st.anchored.count || !(force || st.due(head.count)) {
            return Ok(());
        }
        let path = st.path.clone();
        // Crash-safe: temp file + fsync + rename + fsync dir (write_anchor).
        let res = tokio::task::spawn_blocking(move || write_anchor(&path, head))
            .await
            .map_err(|e| {
                Error::storage(StorageErrorKind::Io, "audit anchor task", e.to_string())
            })?;
        st.anchored_at = Instant::now();
        res?;
        st.anchored = head;
        Ok(())
    }
}

/// An anchored sink's anchor: where, what was last written, and when the
/// next is due.
struct AnchorState {
    path: PathBuf,
    anchored: ChainHead,
    anchored_at: Instant,
    every_records: u64,
    interval: Option<Duration>,
}

impl AnchorState {
    fn due(&self, count: u64) -> bool {
        let by_count = self.every_records > 0
            && count.saturating_sub(self.anchored.count) >= self.every_records;
        let by_time = self
            .interval
            .is_some_and(|t| self.anchored_at.elapsed() >= t);
        by_count || by_time
    }
}

impl fmt::Debug for SqlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlAuditSink")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for SqlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sql-audit:{}", self.db)
    }
}

fn parse_hash(op: &'static str, hex_text: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).map_err(|e| corrupt(op, e))?;
    Ok(out)
}

fn to_u64(op: &'static str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(op, format!("negative record count {v}")))
}

/// The head as the `audit_head` row says.
async fn read_head(db: &SqlState) -> Result<ChainHead> {
    const OP: &str = "read audit chain head";
    let row = sqlx::query("SELECT records, last_hash FROM audit_head WHERE id = 1")
        .fetch_one(db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
    let records: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
    let hash: String = row.try_get(1).map_err(|e| db_err(OP, e))?;
    Ok(ChainHead {
        count: to_u64(OP, records)?,
        hash: parse_hash(OP, &hash)?,
    })
}

/// An event as the JSON the chain stores and hashes.
pub(crate) fn event_json(event: &AuditEvent) -> Result<String> {
    serde_json::to_string(event)
        .map_err(|e| Error::storage(StorageErrorKind::Io, "encode audit event", e))
}

/// Append `events` (their JSON) as the next records, in one transaction;
/// returns the head after them.
async fn append(db: &SqlState, events: &[String]) -> Result<ChainHead> {
    const OP: &str = "append audit record";
    let (_turn, mut tx) = db.begin_write(OP).await?;
    let head = append_in(&mut tx, events).await?;
    // Durable point: the commit (WAL fsync on SQLite, synchronous_commit
    // on PostgreSQL).
    tx.commit().await.map_err(|e| db_err(OP, e))?;
    Ok(head)
}

/// Append `events` (their JSON) as the next records inside `tx` (the
/// caller's transaction, committed by the caller); returns the head after
/// them once committed.
pub(crate) async fn append_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    events: &[String],
) -> Result<ChainHead> {
    const OP: &str = "append audit record";
    let n = i64::try_from(events.len()).map_err(|_| corrupt(OP, "batch beyond 2^63"))?;
    // The first statement is a write: it takes the head's row lock
    // (PostgreSQL) or the write lock (SQLite; a deferred transaction that
    // read first could not upgrade once another gateway wrote), held to
    // the commit. Every other appender waits here.
    let row = sqlx::query(
        "UPDATE audit_head SET records = records + $1 WHERE id = 1 RETURNING records, last_hash",
    )
    .bind(n)
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| db_err(OP, e))?;
    let records: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
    let mut prev_hex: String = row.try_get(1).map_err(|e| db_err(OP, e))?;
    let mut prev = parse_hash(OP, &prev_hex)?;
    let first = records - n;
    // The records' links, then one INSERT per group of rows (a statement
    // per record cost a round trip to the database each).
    let mut rows = Vec::with_capacity(events.len());
    for (seq, event) in (first..records).zip(events) {
        let hash = link_hash(&prev, to_u64(OP, seq)?, event);
        let hash_hex = hex::encode(hash);
        rows.push((
            seq,
            std::mem::replace(&mut prev_hex, hash_hex.clone()),
            hash_hex,
            event,
        ));
        prev = hash;
    }
    for group in rows.chunks(INSERT_GROUP) {
        let sql = insert_rows_sql(group.len());
        let mut q = sqlx::query(&sql);
        for (seq, prev, hash, event) in group {
            q = q
                .bind(*seq)
                .bind(prev.as_str())
                .bind(hash.as_str())
                .bind(event.as_str());
        }
        q.execute(&mut **tx).await.map_err(|e| db_err(OP, e))?;
    }
    sqlx::query("UPDATE audit_head SET last_hash = $1 WHERE id = 1")
        .bind(&prev_hex)
        .execute(&mut **tx)
        .await
        .map_err(|e| db_err(OP, e))?;
    Ok(ChainHead {
        count: to_u64(OP, records)?,
        hash: prev,
    })
}

/// Most records one transaction appends.
const MAX_BATCH: usize = 256;

/// Most records one INSERT writes (4 parameters each, far below either
/// engine's limit; a few statement texts for the connections' caches).
const INSERT_GROUP: usize = 16;

/// `INSERT INTO audit_events … VALUES (…), (…)` of `n` rows, parameters
/// numbered from `$1` in row order.
fn insert_rows_sql(n: usize) -> String {
    let mut sql = String::from("INSERT INTO audit_events (seq, prev, hash, event) VALUES ");
    for i in 0..n {
        let p = 4 * i;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(${}, ${}, ${}, ${})", p + 1, p + 2, p + 3, p + 4));
    }
    sql
}

/// An event waiting for the next transaction, and who to tell.
type Pending = (String, oneshot::Sender<Result<()>>);

/// Group commit: events queue here; the writer that holds `writer` takes
/// every queued event (up to [`MAX_BATCH`]) into one transaction.
#[derive(Default)]
struct Queue {
    pending: std::sync::Mutex<Vec<Pending>>,
    writer: tokio::sync::Mutex<()>,
}

impl Queue {
    fn push(&self, item: Pending) {
        // Poisoning cannot leave the Vec half-changed (push and drain do
        // not panic midway): carry on with it.
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(item);
    }

    /// Queue several events at once, next to each other.
    fn push_all(&self, items: Vec<Pending>) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(items);
    }

    fn take(&self) -> Vec<Pending> {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let n = p.len().min(MAX_BATCH);
        p.drain(..n).collect()
    }
}

/// One batch failure, for each of its waiters (the last gets the original).
fn copy_err(e: &Error) -> Error {
    match e {
        Error::Storage { kind, op, source } => {
            Error::storage(*kind, op.clone(), source.to_string())
        }
        other => Error::storage(
            StorageErrorKind::Io,
            "append audit record",
            other.to_string(),
        ),
    }
}

/// Write what is queued (run once per queued event: each event is taken
/// by its own run or an earlier one).
async fn write_queued(db: SqlState, queue: Arc<Queue>, shared: Arc<Shared>) {
    let _writer = queue.writer.lock().await;
    let batch = queue.take();
    let Some(last) = batch.len().checked_sub(1) else {
        return; // an earlier run took them
    };
    let (events, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let appended = append(&db, &events).await;
    // Known before any waiter hears back: a caller reading the head
    // after its `record` (the syslog decorator) gets its batch's.
    let head = appended.as_ref().ok().copied();
    if let Some(h) = head {
        shared.advance(h);
    }
    let mut res = Some(appended.map(|_| ()));
    for (i, waiter) in waiters.into_iter().enumerate() {
        let answer = match &res {
            Some(Err(e)) if i < last => Err(copy_err(e)),
            _ if i == last => res.take().unwrap_or(Ok(())),
            _ => Ok(()),
        };
        // A waiter that gave up is not told; its record stands or not
        // with the others'.
        let _ = waiter.send(answer);
    }
    // The periodic anchor, once the records it counts are committed
    // (still under the writer lock: anchors follow commits in order).
    if let Some(h) = head
        && let Err(e) = shared.anchor(h, false).await
    {
        // The records are durable and acknowledged; the anchor is retried
        // at the next period. Logged here, the only place it is seen.
        tracing::error!(error = %e, "could not anchor the SQL audit chain");
    }
}

/// What a session store on the same database needs to append to this
/// sink's chain inside its own transactions (see
/// [`SqlSessionStore::with_audit`](crate::SqlSessionStore::with_audit)).
#[derive(Clone)]
pub(crate) struct SqlAuditTrail {
    /// The database's key ([`SqlState`]'s instance key).
    pub(crate) key: i64,
    shared: Arc<Shared>,
}

impl fmt::Debug for SqlAuditTrail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlAuditTrail")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl SqlAuditTrail {
    /// After the caller's transaction that appended up to `head`
    /// committed: the sink's head moves on and a periodic anchor is written
    /// when due, as after the sink's own batches.
    pub(crate) async fn committed(&self, head: ChainHead) {
        self.shared.advance(head);
        if let Err(e) = self.shared.anchor(head, false).await {
            // The records are durable and acknowledged; the anchor is
            // retried at the next period. Logged here, the only place it
            // is seen.
            tracing::error!(error = %e, "could not anchor the SQL audit chain");
        }
    }
}

impl SqlAuditSink {
    /// What a session store on this sink's database needs to append to its
    /// chain in the store's own transactions.
    pub(crate) fn trail(&self) -> SqlAuditTrail {
        SqlAuditTrail {
            key: self.db.instance().key,
            shared: self.shared.clone(),
        }
    }

    /// An audit sink on `db` (already migrated by [`SqlState::connect`]).
    pub fn new(db: SqlState) -> Self {
        Self {
            db,
            queue: Arc::default(),
            shared: Arc::default(),
        }
    }

    /// An audit sink on `db` whose chain head is anchored in the file
    /// `anchor` (kept outside the database: one per gateway).
    ///
    /// At open, the chain must still hold the anchored head (the record at
    /// its position carries its hash), else opening fails
    /// ([`StorageErrorKind::Corrupt`]): the table was cut or rewritten
    /// since. The head is then anchored, and again once `every_records`
    /// records were appended by this sink since the last anchor (0: not by
    /// count), every `interval` when the chain moved (by a timer task;
    /// `None`: not by time) and at [`close`](AuditSink::close). An anchor
    /// is written only once the records it counts are committed, so it
    /// never runs ahead of the chain; it never goes backwards.
    pub async fn open_anchored(
        db: SqlState,
        anchor: impl Into<PathBuf>,
        every_records: u64,
        interval: Option<Duration>,
    ) -> Result<Self> {
        const OP: &str = "check the SQL audit chain against its anchor";
        let path = anchor.into();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (p, d) = (path.clone(), dir.clone());
        let anchored = tokio::task::spawn_blocking(move || {
            crate::fs::create_dir_durable(&d)?;
            sweep_anchor_temps(&p)?;
            read_anchor(&p).map_err(|e| Error::storage(StorageErrorKind::Corrupt, OP, e))
        })
        .await
        .map_err(|e| Error::storage(StorageErrorKind::Io, OP, e.to_string()))??;
        if let Some(a) = anchored {
            check_holds(&db, a.head, &path).await?;
        }
        let head = read_head(&db).await?;
        let shared = Arc::new(Shared {
            last: std::sync::Mutex::new(Some(head)),
            anchor: Some(tokio::sync::Mutex::new(AnchorState {
                path: path.clone(),
                anchored: anchored.map_or(
                    ChainHead {
                        count: 0,
                        hash: [0; 32],
                    },
                    |a| a.head,
                ),
                anchored_at: Instant::now(),
                every_records,
                interval,
            })),
        });
        if anchored.is_none_or(|a| a.head != head) {
            // The first anchor of a new file, even of an empty chain.
            let p = path.clone();
            tokio::task::spawn_blocking(move || write_anchor(&p, head))
                .await
                .map_err(|e| Error::storage(StorageErrorKind::Io, OP, e.to_string()))??;
            if let Some(a) = &shared.anchor {
                a.lock().await.anchored = head;
            }
        }
        if let Some(every) = interval.filter(|d| !d.is_zero()) {
            tokio::spawn(anchor_timer(Arc::downgrade(&shared), db.clone(), every));
        }
        Ok(Self {
            db,
            queue: Arc::default(),
            shared,
        })
    }

    /// The anchor file, when anchored.
    pub async fn anchor_path(&self) -> Option<PathBuf> {
        match &self.shared.anchor {
            Some(a) => Some(a.lock().await.path.clone()),
            None => None,
        }
    }

    /// Write the chain head as the database records it now to the anchor
    /// file (crash-safe), when it moved; returns it. Without an anchor,
    /// only returns it.
    pub async fn anchor(&self) -> Result<ChainHead> {
        let head = read_head(&self.db).await?;
        self.shared.advance(head);
        self.shared.anchor(head, true).await?;
        Ok(head)
    }

    /// The head after this sink's last committed record (or the
    /// database's head as read at open or by [`head`](Self::head)), to
    /// name the chain position of a record just recorded; `None` before
    /// any is known.
    pub fn last_head(&self) -> Option<ChainHead> {
        self.shared.last()
    }

    /// The chain head as the database records it (`audit_head`), to keep
    /// as an anchor outside the database (see [`verify_sql_chain_against`]).
    pub async fn head(&self) -> Result<ChainHead> {
        let head = read_head(&self.db).await?;
        self.shared.advance(head);
        Ok(head)
    }
}

/// Check that the chain holds `anchor` (read from `path`): the record at
/// its position exists and carries its hash. One indexed read, not a
/// verification of the chain.
async fn check_holds(db: &SqlState, anchor: ChainHead, path: &Path) -> Result<()> {
    const OP: &str = "check the SQL audit chain against its anchor";
    let Some(last) = anchor.count.checked_sub(1) else {
        return Ok(());
    };
    let seq = i64::try_from(last).map_err(|_| corrupt(OP, "anchor beyond 2^63 records"))?;
    let row = sqlx::query("SELECT hash FROM audit_events WHERE seq = $1")
        .bind(seq)
        .fetch_optional(db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
    let why = match row {
        None => "the chain no longer holds the anchored record: its tail was cut",
        Some(r) => {
            let hash: String = r.try_get(0).map_err(|e| db_err(OP, e))?;
            if hash == hex::encode(anchor.hash) {
                return Ok(());
            }
            "the record at the anchored position is not the anchored one: the chain was rewritten"
        }
    };
    Err(corrupt(
        OP,
        format!(
            "{why} (anchor {}: {} records, last hash {}); run `relaypacs audit verify`",
            path.display(),
            anchor.count,
            hex::encode(anchor.hash)
        ),
    ))
}

/// Anchor the database's head every `every` when it moved, while the sink
/// lives and its pool is open.
async fn anchor_timer(shared: Weak<Shared>, db: SqlState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the chain was just anchored
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if db.pool().is_closed() {
            return;
        }
        let res = match read_head(&db).await {
            Ok(head) => shared.anchor(head, true).await,
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            // Nobody awaits this task: this is the one place the failure is seen.
            tracing::error!(error = %e, "could not anchor the SQL audit chain");
        }
    }
}

#[async_trait]
impl AuditSink for SqlAuditSink {
    /// The database's key: a [`SqlSessionStore`](crate::SqlSessionStore)
    /// given this sink ([`with_audit`](crate::SqlSessionStore::with_audit))
    /// appends a chunk's audit record in the chunk record's transaction.
    fn trail_key(&self) -> Option<i64> {
        Some(self.db.instance().key)
    }

    async fn record(&self, event: &AuditEvent) -> Result<()> {
        let json = event_json(event)?;
        // Queued, then written by a task of its own with whatever else is
        // queued (group commit: one transaction, one fsync for all): a
        // caller that gives up leaves the whole batch or nothing.
        let (tx, rx) = oneshot::channel();
        self.queue.push((json, tx));
        tokio::spawn(write_queued(
            self.db.clone(),
            self.queue.clone(),
            self.shared.clone(),
        ));
        rx.await.map_err(|_| {
            Error::storage(
                StorageErrorKind::Io,
                "audit append task",
                "the writer task ended without an answer",
            )
        })?
    }

    /// The events queued together, so one transaction (one fsync) takes
    /// them all unless more than [`MAX_BATCH`] are waiting; `Ok` once each
    /// one's transaction committed.
    async fn record_all(&self, events: &[AuditEvent]) -> Result<()> {
        let mut items = Vec::with_capacity(events.len());
        let mut answers = Vec::with_capacity(events.len());
        for event in events {
            let json = event_json(event)?;
            let (tx, rx) = oneshot::channel();
            items.push((json, tx));
            answers.push(rx);
        }
        if items.is_empty() {
            return Ok(());
        }
        self.queue.push_all(items);
        tokio::spawn(write_queued(
            self.db.clone(),
            self.queue.clone(),
            self.shared.clone(),
        ));
        for rx in answers {
            rx.await.map_err(|_| {
                Error::storage(
                    StorageErrorKind::Io,
                    "audit append task",
                    "the writer task ended without an answer",
                )
            })??;
        }
        Ok(())
    }

    async fn events(&self) -> Result<Vec<AuditEvent>> {
        const OP: &str = "read audit trail";
        let rows = sqlx::query("SELECT event FROM audit_events ORDER BY seq")
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| db_err(OP, e))?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(0).map_err(|e| db_err(OP, e))?;
                serde_json::from_str(&text).map_err(|e| corrupt("parse audit event", e))
            })
            .collect()
    }

    /// Anchor the database's head (crash-safe) when anchored, so that
    /// nothing committed before the stop can be cut unnoticed.
    async fn close(&self) -> Result<()> {
        if self.shared.anchor.is_some() {
            self.anchor().await?;
        }
        Ok(())
    }
}

/// The head naming this sink's last record, for the syslog decorator
/// (exact while every record of this sink goes through it: it serializes
/// record and head read). Before any record, the database's head; if that
/// cannot be read, the empty head (logged).
#[cfg(feature = "syslog")]
#[async_trait]
impl crate::syslog_audit::ChainHeadSource for SqlAuditSink {
    async fn chain_head(&self) -> ChainHead {
        if let Some(h) = self.shared.last() {
            return h;
        }
        match self.head().await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the SQL audit chain head");
                ChainHead {
                    count: 0,
                    hash: [0; 32],
                }
            }
        }
    }
}

/// Verify the chain in `audit_events` from its first row, and that it
/// holds at least the records `audit_head` counts, the last of those
/// hashing to its hash. Returns the head.
///
/// Detects a changed byte ([`ChainErrorKind::HashMismatch`]), a removed
/// row (a gap in seq: [`OutOfSequence`](ChainErrorKind::OutOfSequence)),
/// rows swapped or moved to another seq
/// ([`Unlinked`](ChainErrorKind::Unlinked)), and a cut tail
/// ([`Truncated`](ChainErrorKind::Truncated)) as long as `audit_head` was
/// not rewritten with it: whoever can delete rows can also rewrite the
/// head, so a cut tail is only certain to show against an anchor kept
/// outside the database ([`verify_sql_chain_against`]).
///
/// The error's `index` is the row's position in seq order (`line` is
/// `index + 1`); a database that cannot be read is
/// [`Unreadable`](ChainErrorKind::Unreadable). Rows are streamed: memory
/// is bounded by the largest record. Appends may go on meanwhile.
pub async fn verify_sql_chain(db: &SqlState) -> std::result::Result<ChainHead, ChainError> {
    let recorded = read_head(db)
        .await
        .map_err(|e| ChainError::file(e.to_string()))?;
    Ok(verify_rows(db, Some(recorded), false).await?.0)
}

/// [`verify_sql_chain`], returning the events too, oldest first: what an
/// export reads (only a chain that verifies is returned).
pub async fn read_verified_sql_events(
    db: &SqlState,
) -> std::result::Result<(ChainHead, Vec<AuditEvent>), ChainError> {
    let recorded = read_head(db)
        .await
        .map_err(|e| ChainError::file(e.to_string()))?;
    verify_rows(db, Some(recorded), true).await
}

/// [`verify_sql_chain`], and that the chain still holds `anchor`, a head
/// recorded earlier outside the database ([`SqlAuditSink::head`]): a cut
/// tail is then detected even if `audit_head` was rewritten with it.
pub async fn verify_sql_chain_against(
    db: &SqlState,
    anchor: ChainHead,
) -> std::result::Result<ChainHead, ChainError> {
    verify_sql_chain_against_all(db, &[anchor]).await
}

/// [`verify_sql_chain_against`] for several anchors at once (one per
/// gateway appending to the chain), in one pass over the table: the chain
/// must hold every one of them (at least its count of records, the record
/// at its position carrying its hash). Read the anchors before calling:
/// an anchor never runs ahead of the chain, so appends meanwhile cause no
/// false alarm. With no anchor, as [`verify_sql_chain`].
pub async fn verify_sql_chain_against_all(
    db: &SqlState,
    anchors: &[ChainHead],
) -> std::result::Result<ChainHead, ChainError> {
    let recorded = read_head(db)
        .await
        .map_err(|e| ChainError::file(e.to_string()))?;
    // The longest anchor goes to the verifier (cut tail, mismatch at its
    // position); the others are checked as their rows stream by.
    let longest = anchors.iter().copied().max_by_key(|a| a.count);
    let (head, _) = verify_rows_with(db, longest, anchors, false).await?;
    // The head row was read before the rows: the chain holds at least it.
    if head.count < recorded.count {
        return Err(ChainError::at(
            head.count,
            None,
            ChainErrorKind::Truncated,
            format!(
                "missing: the chain ends after {} records but audit_head records {}",
                head.count, recorded.count
            ),
        ));
    }
    Ok(head)
}

/// How many rows wait between the database reader and the verifier.
const ROWS_IN_FLIGHT: usize = 64;

/// Stream the rows in seq order, as chain lines, into [`verify_reader`]
/// (run on a blocking thread, reading from a bounded channel); with
/// `collect`, return the verified events.
async fn verify_rows(
    db: &SqlState,
    anchor: Option<ChainHead>,
    collect: bool,
) -> std::result::Result<(ChainHead, Vec<AuditEvent>), ChainError> {
    verify_rows_with(db, anchor, &[], collect).await
}

/// [`verify_rows`], also checking that each row at the position of one of
/// `more` anchors carries its hash (reported once the chain verified, so
/// a defect before it is named first).
async fn verify_rows_with(
    db: &SqlState,
    anchor: Option<ChainHead>,
    more: &[ChainHead],
    collect: bool,
) -> std::result::Result<(ChainHead, Vec<AuditEvent>), ChainError> {
    let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(ROWS_IN_FLIGHT);
    let verifier = tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        let head = verify_reader(RowReader::new(rx), anchor, |_, e| {
            if collect {
                events.push(e);
            }
        })?;
        Ok((head, events))
    });
    let feed = async move {
        let mut mismatch: Option<ChainError> = None;
        let mut rows = sqlx::query("SELECT seq, prev, hash, event FROM audit_events ORDER BY seq")
            .fetch(db.pool());
        loop {
            let item = match rows.try_next().await {
                Ok(Some(row)) => {
                    if mismatch.is_none() {
                        mismatch = anchor_mismatch(&row, more);
                    }
                    chain_line(&row)
                }
                Ok(None) => return mismatch,
                Err(e) => Err(io::Error::other(e)),
            };
            let failed = item.is_err();
            // A closed channel: the verifier stopped at a bad record.
            if tx.send(item).await.is_err() || failed {
                return mismatch;
            }
        }
    };
    let (mismatch, verified) = tokio::join!(feed, verifier);
    let verified = verified.map_err(|e| ChainError::file(format!("verifier task: {e}")))??;
    match mismatch {
        Some(e) => Err(e),
        None => Ok(verified),
    }
}

/// Whether `row` sits at the position of one of `anchors` without its
/// hash: the chain was rewritten after that anchor was written.
fn anchor_mismatch(row: &sqlx::any::AnyRow, anchors: &[ChainHead]) -> Option<ChainError> {
    let seq: i64 = row.try_get(0).ok()?;
    let hash: String = row.try_get(2).ok()?;
    let seq = u64::try_from(seq).ok()?;
    let a = anchors
        .iter()
        .find(|a| a.count == seq + 1 && hex::encode(a.hash) != hash)?;
    Some(ChainError::at(
        seq,
        Some(seq),
        ChainErrorKind::AnchorMismatch,
        format!(
            "differs from an anchored head ({} records, last hash {}): the chain was rewritten",
            a.count,
            hex::encode(a.hash)
        ),
    ))
}

/// One row as the line the JSON-lines trail holds for it. The strings are
/// JSON-escaped; the event goes in as stored, so a changed event fails
/// its hash (or, not being JSON, makes the line malformed).
fn chain_line(row: &sqlx::any::AnyRow) -> io::Result<Vec<u8>> {
    let get = |i: usize| -> io::Result<String> { row.try_get(i).map_err(io::Error::other) };
    let seq: i64 = row.try_get(0).map_err(io::Error::other)?;
    let json = |s: String| serde_json::to_string(&s).map_err(io::Error::other);
    let line = format!(
        "{{\"seq\":{seq},\"prev\":{},\"hash\":{},\"event\":{}}}\n",
        json(get(1)?)?,
        json(get(2)?)?,
        get(3)?
    );
    Ok(line.into_bytes())
}

/// A [`BufRead`] over lines received from a channel (on a blocking
/// thread); the end of the channel is the end of input.
struct RowReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl RowReader {
    fn new(rx: mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for RowReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for RowReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.buf.len() {
            match self.rx.blocking_recv() {
                Some(line) => {
                    self.buf = line?;
                    self.pos = 0;
                }
                None => return Ok(&[]),
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.buf.len());
    }
}

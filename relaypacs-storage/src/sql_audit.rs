//! [`SqlAuditSink`]: the audit trail as an append-only, hash-chained table
//! of a [`SqlState`] database, one chain shared by every gateway on it.
//!
//! A row of `audit_events` is a record of the chain of the JSON-lines
//! trail ([`JsonlAuditSink`](crate::JsonlAuditSink)), the same fields and
//! the same hash; [`verify_sql_chain`] feeds the rows, as those lines, to
//! the same verifier ([`verify_reader`]).

use std::fmt;
use std::io::{self, BufRead, Read};
use std::sync::{Arc, PoisonError};

use async_trait::async_trait;
use futures::TryStreamExt;
use relaypacs_core::{AuditEvent, AuditSink, Error, Result, StorageErrorKind};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

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
#[derive(Clone)]
pub struct SqlAuditSink {
    db: SqlState,
    queue: Arc<Queue>,
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

/// Append `events` (their JSON) as the next records, in one transaction.
async fn append(db: &SqlState, events: &[String]) -> Result<()> {
    const OP: &str = "append audit record";
    let n = i64::try_from(events.len()).map_err(|_| corrupt(OP, "batch beyond 2^63"))?;
    let mut tx = db.pool().begin().await.map_err(|e| db_err(OP, e))?;
    // The first statement is a write: it takes the head's row lock
    // (PostgreSQL) or the write lock (SQLite; a deferred transaction that
    // read first could not upgrade once another gateway wrote), held to
    // the commit. Every other appender waits here.
    let row = sqlx::query(
        "UPDATE audit_head SET records = records + $1 WHERE id = 1 RETURNING records, last_hash",
    )
    .bind(n)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| db_err(OP, e))?;
    let records: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
    let mut prev_hex: String = row.try_get(1).map_err(|e| db_err(OP, e))?;
    let mut prev = parse_hash(OP, &prev_hex)?;
    let first = records - n;
    for (seq, event) in (first..records).zip(events) {
        let hash = link_hash(&prev, to_u64(OP, seq)?, event);
        let hash_hex = hex::encode(hash);
        sqlx::query("INSERT INTO audit_events (seq, prev, hash, event) VALUES ($1, $2, $3, $4)")
            .bind(seq)
            .bind(&prev_hex)
            .bind(&hash_hex)
            .bind(event)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        (prev, prev_hex) = (hash, hash_hex);
    }
    sqlx::query("UPDATE audit_head SET last_hash = $1 WHERE id = 1")
        .bind(&prev_hex)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
    // Durable point: the commit (WAL fsync on SQLite, synchronous_commit
    // on PostgreSQL).
    tx.commit().await.map_err(|e| db_err(OP, e))
}

/// Most records one transaction appends.
const MAX_BATCH: usize = 256;

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
async fn write_queued(db: SqlState, queue: Arc<Queue>) {
    let _writer = queue.writer.lock().await;
    let batch = queue.take();
    let Some(last) = batch.len().checked_sub(1) else {
        return; // an earlier run took them
    };
    let (events, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let mut res = Some(append(&db, &events).await);
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
}

impl SqlAuditSink {
    /// An audit sink on `db` (already migrated by [`SqlState::connect`]).
    pub fn new(db: SqlState) -> Self {
        Self {
            db,
            queue: Arc::default(),
        }
    }

    /// The chain head as the database records it (`audit_head`), to keep
    /// as an anchor outside the database (see [`verify_sql_chain_against`]).
    pub async fn head(&self) -> Result<ChainHead> {
        read_head(&self.db).await
    }
}

#[async_trait]
impl AuditSink for SqlAuditSink {
    async fn record(&self, event: &AuditEvent) -> Result<()> {
        let json = serde_json::to_string(event)
            .map_err(|e| Error::storage(StorageErrorKind::Io, "encode audit event", e))?;
        // Queued, then written by a task of its own with whatever else is
        // queued (group commit: one transaction, one fsync for all): a
        // caller that gives up leaves the whole batch or nothing.
        let (tx, rx) = oneshot::channel();
        self.queue.push((json, tx));
        tokio::spawn(write_queued(self.db.clone(), self.queue.clone()));
        rx.await.map_err(|_| {
            Error::storage(
                StorageErrorKind::Io,
                "audit append task",
                "the writer task ended without an answer",
            )
        })?
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
    let recorded = read_head(db)
        .await
        .map_err(|e| ChainError::file(e.to_string()))?;
    let (head, _) = verify_rows(db, Some(anchor), false).await?;
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
        let mut rows = sqlx::query("SELECT seq, prev, hash, event FROM audit_events ORDER BY seq")
            .fetch(db.pool());
        loop {
            let item = match rows.try_next().await {
                Ok(Some(row)) => chain_line(&row),
                Ok(None) => return,
                Err(e) => Err(io::Error::other(e)),
            };
            let failed = item.is_err();
            // A closed channel: the verifier stopped at a bad record.
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    };
    let ((), verified) = tokio::join!(feed, verifier);
    verified.map_err(|e| ChainError::file(format!("verifier task: {e}")))?
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

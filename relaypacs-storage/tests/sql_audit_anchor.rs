//! The SQL audit chain's anchor outside the database
//! (`SqlAuditSink::open_anchored`), the chain head the syslog decorator
//! reads (`ChainHeadSource`: the head naming this gateway's last record,
//! not another gateway's), and `AuditFanOut` (a record acknowledged only
//! once every trail holds it). SQLite: the anchor's rules do not depend on
//! the engine, the shared chain's are tested on PostgreSQL in `sql_audit`.
#![cfg(all(feature = "sqlite", feature = "syslog"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::path::Path;
use std::sync::Arc;

use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink, StorageErrorKind};
use relaypacs_storage::audit_anchor::read_anchor;
use relaypacs_storage::syslog_audit::ChainHeadSource;
use relaypacs_storage::{
    AuditFanOut, ChainHead, JsonlAuditSink, SqlAuditSink, SqlOptions, SqlState,
    read_verified_events, verify_sql_chain,
};
use tempfile::TempDir;

async fn db(dir: &Path) -> SqlState {
    let url = format!("sqlite://{}", dir.join("state.db").display());
    SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .expect("connect sqlite")
}

fn event(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new("uma", AuditAction::ChunkStored, AuditOutcome::Success);
    e.detail = format!("event {i}");
    e
}

fn anchored(path: &Path) -> ChainHead {
    read_anchor(path).unwrap().expect("an anchor").head
}

#[tokio::test]
async fn anchored_at_open_every_n_records_and_at_close() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("audit").join("sql-chain.anchor");
    let sink = SqlAuditSink::open_anchored(db(dir.path()).await, &path, 5, None)
        .await
        .unwrap();
    assert_eq!(anchored(&path).count, 0, "an empty chain is anchored too");
    for i in 0..7 {
        sink.record(&event(i)).await.unwrap();
    }
    // The anchor is written after the 5th record's answer: wait for it.
    let mut waited = 0;
    while anchored(&path).count < 5 && waited < 100 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        waited += 1;
    }
    assert_eq!(anchored(&path).count, 5, "by count, not ahead of the chain");
    sink.close().await.unwrap();
    let head = sink.head().await.unwrap();
    assert_eq!(head.count, 7);
    assert_eq!(anchored(&path), head, "at close");
    // No temp file left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test]
async fn anchored_by_time_while_the_chain_moves() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sql-chain.anchor");
    let every = std::time::Duration::from_millis(100);
    let sink = SqlAuditSink::open_anchored(db(dir.path()).await, &path, 0, Some(every))
        .await
        .unwrap();
    for i in 0..3 {
        sink.record(&event(i)).await.unwrap();
    }
    let mut waited = 0;
    while anchored(&path).count < 3 && waited < 100 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        waited += 1;
    }
    assert_eq!(anchored(&path), sink.head().await.unwrap());
}

/// Cut (head rewritten to match) or rewritten behind the anchor: the sink
/// does not open, naming which.
#[tokio::test]
async fn does_not_open_on_a_chain_that_lost_its_anchored_head() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sql-chain.anchor");
    let state = db(dir.path()).await;
    let sink = SqlAuditSink::open_anchored(state.clone(), &path, 1000, None)
        .await
        .unwrap();
    for i in 0..10 {
        sink.record(&event(i)).await.unwrap();
    }
    sink.close().await.unwrap();
    drop(sink);
    let owner = |sql: &'static str| {
        let state = state.clone();
        async move {
            sqlx::query(sql).execute(state.pool()).await.unwrap();
        }
    };
    owner("DROP TRIGGER audit_events_no_delete").await;
    owner("DELETE FROM audit_events WHERE seq >= 8").await;
    owner(
        "UPDATE audit_head SET records = 8, last_hash = (SELECT hash FROM audit_events WHERE seq = 7)",
    )
    .await;
    assert_eq!(verify_sql_chain(&state).await.unwrap().count, 8);
    let err = SqlAuditSink::open_anchored(state.clone(), &path, 1000, None)
        .await
        .expect_err("cut");
    assert!(
        matches!(
            err,
            relaypacs_core::Error::Storage {
                kind: StorageErrorKind::Corrupt,
                ..
            }
        ),
        "{err:?}"
    );
    let text = format!("{:?}", err);
    assert!(text.contains("tail was cut"), "{text}");
    assert_eq!(anchored(&path).count, 10, "the anchor is left as it was");

    // Two other records where the anchored ones were: rewritten.
    let forger = SqlAuditSink::new(state.clone());
    forger.record(&event(100)).await.unwrap();
    forger.record(&event(101)).await.unwrap();
    let err = SqlAuditSink::open_anchored(state.clone(), &path, 1000, None)
        .await
        .expect_err("rewritten");
    let text = format!("{:?}", err);
    assert!(text.contains("rewritten"), "{text}");
}

/// Two gateways on one chain: after its `record`, each sink's chain head
/// names its own record, whatever the other appended since.
#[tokio::test]
async fn chain_head_names_this_sinks_last_record() {
    let dir = TempDir::new().unwrap();
    let a = SqlAuditSink::new(db(dir.path()).await);
    let b = SqlAuditSink::new(db(dir.path()).await);
    a.record(&event(0)).await.unwrap();
    let after_a = a.chain_head().await;
    b.record(&event(1)).await.unwrap();
    b.record(&event(2)).await.unwrap();
    assert_eq!(after_a.count, 1);
    assert_eq!(a.chain_head().await, after_a, "not moved by b");
    assert_eq!(b.chain_head().await.count, 3);
    assert_eq!(b.chain_head().await, a.head().await.unwrap());
    // Through the fan-out, the primary's.
    let fan = AuditFanOut::new(a.clone(), Vec::new());
    fan.record(&event(3)).await.unwrap();
    assert_eq!(fan.chain_head().await.count, 4);
}

/// Both trails hold every acknowledged record; a trail that fails makes
/// the record fail (fail closed).
#[tokio::test]
async fn fan_out_acknowledges_only_what_every_trail_holds() {
    let dir = TempDir::new().unwrap();
    let sql = SqlAuditSink::new(db(dir.path()).await);
    let jsonl = JsonlAuditSink::open(dir.path().join("audit.jsonl")).unwrap();
    let fan = AuditFanOut::new(
        sql.clone(),
        vec![Arc::new(jsonl.clone()) as Arc<dyn AuditSink>],
    );
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let fan = Arc::new(fan_clone(&sql, &jsonl));
            tokio::spawn(async move { fan.record(&event(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    fan.record(&event(20)).await.unwrap();
    let mut from_sql: Vec<String> = sql
        .events()
        .await
        .unwrap()
        .iter()
        .map(|e| e.detail.clone())
        .collect();
    let (head, events) = read_verified_events(&dir.path().join("audit.jsonl"), None).unwrap();
    let mut from_jsonl: Vec<String> = events.iter().map(|e| e.detail.clone()).collect();
    assert_eq!(head.count, 21);
    from_sql.sort();
    from_jsonl.sort();
    assert_eq!(from_sql, from_jsonl);
    assert_eq!(fan.events().await.unwrap().len(), 21);

    // A mirror whose database is gone: the record is refused.
    let other = TempDir::new().unwrap();
    let gone = db(other.path()).await;
    gone.close().await;
    let broken = AuditFanOut::new(
        sql.clone(),
        vec![Arc::new(SqlAuditSink::new(gone)) as Arc<dyn AuditSink>],
    );
    assert!(broken.record(&event(99)).await.is_err());
    assert!(fan.close().await.is_ok());
}

fn fan_clone(sql: &SqlAuditSink, jsonl: &JsonlAuditSink) -> AuditFanOut<SqlAuditSink> {
    AuditFanOut::new(
        sql.clone(),
        vec![Arc::new(jsonl.clone()) as Arc<dyn AuditSink>],
    )
}

/// Records a session store appends in its chunk transactions
/// (`SqlSessionStore::with_audit`) move the sink's head and its periodic
/// anchor as the sink's own do; the fan-out offers the primary's trail to
/// such a store only without mirrors (they would miss those records).
#[tokio::test]
async fn records_appended_with_chunks_move_the_head_and_the_anchor() {
    use relaypacs_core::testing::session_store::sample_session;
    use relaypacs_core::{ChunkRecord, SessionStore, Sha256Digest};
    use relaypacs_storage::SqlSessionStore;

    let dir = TempDir::new().unwrap();
    let path = dir.path().join("sql-chain.anchor");
    let state = db(dir.path()).await;
    let sink = Arc::new(
        SqlAuditSink::open_anchored(state.clone(), &path, 2, None)
            .await
            .unwrap(),
    );
    let store = SqlSessionStore::new(state.clone()).with_audit(&sink);
    let s = sample_session();
    let file = *s.files.keys().next().unwrap();
    store.create_session(&s).await.unwrap();
    for i in 0..3u64 {
        let chunk = ChunkRecord::new(i << 20, 1 << 20, Sha256Digest::of(&i.to_le_bytes()), "r");
        store
            .record_chunk_audited(s.id, file, &chunk, &event(i as usize))
            .await
            .unwrap();
    }
    assert_eq!(sink.last_head().map(|h| h.count), Some(3));
    assert_eq!(sink.last_head(), Some(sink.head().await.unwrap()));
    assert_eq!(anchored(&path).count, 2, "by count, after the commit");
    sink.close().await.unwrap();
    assert_eq!(anchored(&path).count, 3);
    assert_eq!(verify_sql_chain(&state).await.unwrap().count, 3);

    let alone = AuditFanOut::new(sink.clone(), Vec::new());
    assert_eq!(alone.trail_key(), sink.trail_key());
    let jsonl: Arc<dyn AuditSink> =
        Arc::new(JsonlAuditSink::open(dir.path().join("audit.jsonl")).unwrap());
    let mirrored = AuditFanOut::new(sink.clone(), vec![jsonl]);
    assert_eq!(mirrored.trail_key(), None);
}

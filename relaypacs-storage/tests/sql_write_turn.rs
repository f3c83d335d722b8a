//! Writers of one process on a SQLite state database take turns in the
//! process (`SqlState::begin_write`) instead of colliding on SQLite's lock:
//! with SQLite's own wait for a busy lock cut to 1 ms, many concurrent
//! write transactions (session writes and audit appends, as ingest and
//! delivery make at once) all commit, none refused as busy.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::time::Duration;

use relaypacs_core::testing::session_store::sample_session;
use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink, SessionStore};
use relaypacs_storage::{SqlAuditSink, SqlOptions, SqlSessionStore, SqlState};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_take_turns_instead_of_colliding() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let mut options = SqlOptions::default();
    // SQLite's busy_timeout: a writer that found the lock taken would give
    // up after 1 ms.
    options.statement_timeout = Duration::from_millis(1);
    let db = SqlState::connect(&url, None, &options).await.unwrap();
    let audit = SqlAuditSink::new(db.clone());
    let sessions = SqlSessionStore::new(db.clone()).with_audit(&audit);
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (sessions, audit) = (sessions.clone(), audit.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..4 {
                let mut rec = sample_session();
                let v = sessions.create_session(&rec).await?;
                rec.updated_at += time::Duration::seconds(1);
                sessions.update_session(&rec, v.version).await?;
                let mut ev =
                    AuditEvent::new("alice", AuditAction::SessionCreated, AuditOutcome::Success);
                ev.session = Some(rec.id);
                ev.detail = format!("writer {i}");
                audit.record(&ev).await?;
            }
            Ok::<_, relaypacs_core::Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("a write was refused");
    }
    assert_eq!(sessions.list_sessions().await.unwrap().len(), 48 * 4);
    assert_eq!(audit.events().await.unwrap().len(), 48 * 4);
}

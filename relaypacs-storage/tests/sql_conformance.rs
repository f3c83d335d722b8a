//! The shared conformance suites run against the SQL stores, on SQLite (a
//! file in a temp dir) and on PostgreSQL (a throwaway cluster).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_storage::{SqlOptions, SqlSessionStore, SqlState};
use tempfile::TempDir;

async fn sqlite_sessions() -> (SqlSessionStore, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let db = SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .expect("connect");
    (SqlSessionStore::new(db), dir)
}

relaypacs_core::session_store_conformance!(sqlite_session_store, sqlite_sessions);

/// A fresh PostgreSQL cluster per case (durable settings, as deployed),
/// kept alive by the returned guard.
async fn postgres_sessions() -> (SqlSessionStore, relaypacs_test_peers::Postgres) {
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
        .await
        .expect("start postgres");
    let url = pg.create_database("relay");
    let db = SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .expect("connect");
    (SqlSessionStore::new(db), pg)
}

relaypacs_core::session_store_conformance!(postgres_session_store, postgres_sessions);

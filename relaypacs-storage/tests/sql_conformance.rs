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

/// A reservation of a gateway that is gone (its process, hence its
/// instance lock, ended) does not wait for its lease: another gateway takes
/// the range at once; a live one's holds.
#[test]
fn postgres_reservations_of_a_dead_gateway_are_taken_over() {
    use relaypacs_core::SessionStore;
    relaypacs_core::testing::__rt::run(async {
        let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
            .await
            .expect("start postgres");
        let url = pg.create_database("relay");
        let a = SqlState::connect(&url, None, &SqlOptions::default())
            .await
            .expect("connect a");
        let b = SqlState::connect(&url, None, &SqlOptions::default())
            .await
            .expect("connect b");
        let (sa, sb) = (SqlSessionStore::new(a.clone()), SqlSessionStore::new(b));
        let s = relaypacs_core::testing::session_store::sample_session();
        let f = *s.files.keys().next().expect("file");
        sa.create_session(&s).await.expect("create");
        let long = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        sa.reserve_range(s.id, f, 0..100, "a", long)
            .await
            .expect("a reserves");
        assert!(matches!(
            sb.reserve_range(s.id, f, 0..100, "b", long).await,
            Err(relaypacs_core::Error::Busy { .. })
        ));
        // Gateway A goes away: its pool and its instance lock with it.
        a.close().await;
        drop(sa);
        drop(a);
        let start = std::time::Instant::now();
        loop {
            match sb.reserve_range(s.id, f, 0..100, "b", long).await {
                Ok(()) => break,
                Err(relaypacs_core::Error::Busy { .. })
                    if start.elapsed() < std::time::Duration::from_secs(5) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("not taken over: {e}"),
            }
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "waited for the lease"
        );
    })
}

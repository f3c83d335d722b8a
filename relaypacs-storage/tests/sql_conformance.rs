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

/// The cost of a head-only update (the delivery worker's lease and
/// outcome: `load_file_scope(id, None)` then `update_file_scope` with no
/// file) against the whole-record path it replaced (`load_session` then
/// `update_session`), on a session of 10,000 files and of 1. Prints the
/// medians; fails if the head-only update of the large session costs more
/// than a fifth of the whole-record one, or grows with the files (over 4×
/// the one-file session plus 10 ms).
async fn head_update_cost(store: &SqlSessionStore, engine: &str) {
    use relaypacs_core::{FileId, FileRecord, FileState, SessionStore};
    use std::time::{Duration, Instant};
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    let mut results = Vec::new();
    for files in [1usize, 10_000] {
        let mut s = relaypacs_core::testing::session_store::sample_session();
        s.files.clear();
        for i in 0..files {
            let f = FileRecord {
                id: FileId::random(),
                name: format!("slice-{i:05}.dcm"),
                size: 600,
                sha256: None,
                data_set_sha256: None,
                state: FileState::Uploading,
            };
            s.files.insert(f.id, f);
        }
        store.create_session(&s).await.expect("create");
        let rounds = 9;
        let (mut head, mut whole) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            let t = Instant::now();
            let scope = store.load_file_scope(s.id, None).await.expect("head");
            let mut rec = scope.session.value;
            rec.delivery.lease_owner = Some(format!("head-{i}"));
            store
                .update_file_scope(&rec, scope.session.version)
                .await
                .expect("head update");
            head.push(t.elapsed());
            let t = Instant::now();
            let v = store.load_session(s.id).await.expect("load");
            let mut rec = v.value;
            rec.delivery.lease_owner = Some(format!("whole-{i}"));
            store
                .update_session(&rec, v.version)
                .await
                .expect("whole update");
            whole.push(t.elapsed());
        }
        let loaded = store.load_session(s.id).await.expect("load");
        assert_eq!(loaded.value.files.len(), files, "no file lost");
        let (h, w) = (median(head), median(whole));
        println!(
            "{engine}: lease update of a {files}-file session, median of {rounds}: \
             head-only {h:?}, whole-record {w:?}"
        );
        results.push((h, w));
    }
    let ((h1, _), (h10k, w10k)) = (results[0], results[1]);
    assert!(
        h10k * 5 < w10k,
        "{engine}: head-only {h10k:?} vs whole-record {w10k:?} at 10,000 files"
    );
    assert!(
        h10k < h1 * 4 + Duration::from_millis(10),
        "{engine}: head-only grows with the files: {h1:?} at 1, {h10k:?} at 10,000"
    );
}

#[test]
fn sqlite_head_update_cost_does_not_grow_with_files() {
    relaypacs_core::testing::__rt::run(async {
        let (store, _dir) = sqlite_sessions().await;
        head_update_cost(&store, "sqlite").await;
    })
}

#[test]
fn postgres_head_update_cost_does_not_grow_with_files() {
    relaypacs_core::testing::__rt::run(async {
        let (store, _pg) = postgres_sessions().await;
        head_update_cost(&store, "postgres").await;
    })
}

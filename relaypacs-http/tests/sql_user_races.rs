//! Account changes from two gateways at once: two `SqlUserStore`s on two
//! connection pools of one database (PostgreSQL, and SQLite for the
//! embedded default). Each change is a conditional UPDATE of its own
//! columns, so neither overwrites the other (a whole-record write from a
//! copy read before the other change would). `ROUNDS` rounds per race.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use relaypacs_http::auth::{Role, SqlUserStore, UserStore};
use relaypacs_http::routes::auth::new_record;
use relaypacs_storage::{SqlOptions, SqlState};
use time::OffsetDateTime;
use tokio::sync::Barrier;

const ROUNDS: usize = 100;

async fn pair(url: &str) -> (Arc<SqlUserStore>, Arc<SqlUserStore>) {
    let options = SqlOptions::default();
    let a = SqlState::connect(url, None, &options).await.unwrap();
    let b = SqlState::connect(url, None, &options).await.unwrap();
    (
        Arc::new(SqlUserStore::new(a)),
        Arc::new(SqlUserStore::new(b)),
    )
}

/// Run `x` and `y` at once on two tasks, released by one barrier.
async fn at_once<T, X, Y>(x: X, y: Y) -> (T, T)
where
    T: Send + 'static,
    X: std::future::Future<Output = T> + Send + 'static,
    Y: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(2));
    let (bx, by) = (barrier.clone(), barrier);
    let x = tokio::spawn(async move {
        bx.wait().await;
        x.await
    });
    let y = tokio::spawn(async move {
        by.wait().await;
        y.await
    });
    (x.await.unwrap(), y.await.unwrap())
}

async fn races(a: Arc<SqlUserStore>, b: Arc<SqlUserStore>, engine: &str) {
    let mut first_wins = [0usize; 2];
    for i in 0..ROUNDS {
        let u = new_record(&format!("racer{i}"), Role::Uploader, "hash-0".into());
        let id = u.id.clone();
        a.create(u).await.unwrap();

        // 1. A password change on A and a TOTP enrolment on B: both hold.
        let when = OffsetDateTime::now_utc();
        let (ga, gb, ia, ib) = (a.clone(), b.clone(), id.clone(), id.clone());
        let (x, y) = at_once(
            async move { ga.change_password(&ia, "hash-0", "hash-1", when).await },
            async move { gb.begin_totp(&ib, "sealed-1").await },
        )
        .await;
        assert!(
            x.unwrap() && y.unwrap(),
            "{engine} round {i}: both changes apply"
        );
        for s in [&a, &b] {
            let r = s.by_id(&id).await.unwrap().unwrap();
            assert_eq!(
                r.password_hash, "hash-1",
                "{engine} round {i}: password kept"
            );
            assert_eq!(
                r.totp_pending.as_deref(),
                Some("sealed-1"),
                "{engine} round {i}: enrolment kept"
            );
            assert_eq!(r.tokens_valid_after.unix_timestamp(), when.unix_timestamp());
        }

        // 2. Two password changes from one hash: exactly one wins, and the
        //    stored hash is the winner's.
        let (ga, gb, ia, ib) = (a.clone(), b.clone(), id.clone(), id.clone());
        let (x, y) = at_once(
            async move { ga.change_password(&ia, "hash-1", "hash-a", when).await },
            async move { gb.change_password(&ib, "hash-1", "hash-b", when).await },
        )
        .await;
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(
            x != y,
            "{engine} round {i}: exactly one password change wins"
        );
        let stored = b.by_id(&id).await.unwrap().unwrap().password_hash;
        assert_eq!(
            stored,
            if x { "hash-a" } else { "hash-b" },
            "{engine} round {i}"
        );
        first_wins[usize::from(y)] += 1;

        // 3. Confirming the pending secret on A while B starts a new
        //    enrolment: one of them, and the record is one or the other.
        let (ga, gb, ia, ib) = (a.clone(), b.clone(), id.clone(), id.clone());
        let (x, y) = at_once(
            async move { ga.confirm_totp(&ia, "sealed-1").await },
            async move { gb.begin_totp(&ib, "sealed-2").await },
        )
        .await;
        let (x, y) = (x.unwrap(), y.unwrap());
        let r = a.by_id(&id).await.unwrap().unwrap();
        match (x, y) {
            (true, false) => {
                assert_eq!(r.totp.as_deref(), Some("sealed-1"), "{engine} round {i}");
                assert_eq!(r.totp_pending, None, "{engine} round {i}");
            }
            (false, true) => {
                assert_eq!(r.totp, None, "{engine} round {i}");
                assert_eq!(
                    r.totp_pending.as_deref(),
                    Some("sealed-2"),
                    "{engine} round {i}"
                );
            }
            other => panic!("{engine} round {i}: exactly one applies, got {other:?} ({r:?})"),
        }
        assert_eq!(
            r.password_hash, stored,
            "{engine} round {i}: password untouched"
        );
    }
    eprintln!(
        "{engine}: {ROUNDS} rounds; of the racing password changes A won {}, B won {}",
        first_wins[0], first_wins[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_gateways_change_one_account_at_once() {
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
        .await
        .unwrap();
    let url = pg.create_database("relay");
    let (a, b) = pair(&url).await;
    races(a, b, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_gateways_change_one_account_at_once() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let (a, b) = pair(&url).await;
    races(a, b, "sqlite").await;
}

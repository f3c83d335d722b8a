//! Guards shared by every gateway on one state database (issue 12, part
//! 4: "a lockout, a revoked refresh family or a used event ticket holds on
//! every instance"): two reference servers on one PostgreSQL database.
//! - login failures sent at once to both servers are all counted and lock
//!   the account on both;
//! - the per-address window counts attempts made on either server;
//! - an event-stream ticket issued on one server opens a stream on the
//!   other once, and is refused afterwards on both;
//! - two `Tokens` on two pools redeeming one ticket at once: exactly one
//!   gets the token back, 100 rounds, on PostgreSQL and SQLite;
//! - tus creations fired at both servers at once stop at the user's cap of
//!   unfinished uploads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use common::*;
use relaypacs_http::auth::{Role, TokenSettings, Tokens};
use relaypacs_storage::{SqlOptions, SqlState};
use relaypacs_test_peers::Postgres;
use reqwest::{Method, Response};
use sqlx::Row;

struct Pair {
    a: TestServer,
    b: TestServer,
    /// The shared database's URL.
    url: String,
}

/// Two servers on a new database `name` of `pg`, with one secret and the
/// settings `f` makes.
async fn two_servers(pg: &Postgres, name: &str, f: impl Fn(&mut relaypacs_http::Config)) -> Pair {
    let url = pg.create_database(name);
    let shared_secret = secret();
    let configure = |c: &mut relaypacs_http::Config| {
        c.state.url = Some(url.clone());
        c.secret = Some(shared_secret.clone());
        f(c);
    };
    let a = TestServer::start_with(configure).await;
    let b = TestServer::start_with(configure).await;
    Pair { a, b, url }
}

async fn login(t: &TestServer, name: &str, password: &str) -> Response {
    t.http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&serde_json::json!({"username": name, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Failures spread over two servers, sent at once, are all counted (one
/// atomic upsert each) and lock the account on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_on_two_servers_lock_the_account_on_both() {
    const LOCK_AFTER: u32 = 6;
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let p = two_servers(&pg, "lockout", |c| {
        c.auth.login_per_address_per_minute = 1000;
        c.auth.lockout_after_failures = LOCK_AFTER;
    })
    .await;
    p.a.add_user("dora", Role::Uploader).await;
    // Half on each server, all in flight together.
    let attempts: Vec<_> = (0..LOCK_AFTER)
        .map(|i| {
            let t = if i % 2 == 0 { &p.a } else { &p.b };
            let (http, url) = (t.http.clone(), t.url.clone());
            tokio::spawn(async move {
                http.post(format!("{url}/api/v1/auth/login"))
                    .json(&serde_json::json!({"username": "dora", "password": "wrong guess"}))
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    for a in attempts {
        expect_error(a.await.unwrap(), 401, "RELAY_INVALID_CREDENTIALS").await;
    }
    // Every failure was counted, whichever server took it.
    let db = SqlState::connect(&p.url, None, &SqlOptions::default())
        .await
        .unwrap();
    let row = sqlx::query("SELECT consecutive FROM login_accounts WHERE account = 'dora'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(row.try_get::<i64, _>(0).unwrap(), i64::from(LOCK_AFTER));
    // Locked on both: even the right password is refused, with Retry-After.
    for t in [&p.a, &p.b] {
        let r = login(t, "dora", PASSWORD).await;
        assert!(r.headers().get("retry-after").is_some());
        expect_error(r, 429, "RELAY_ACCOUNT_LOCKED").await;
    }
    // Another account is not locked.
    p.b.add_user("erin", Role::Uploader).await;
    assert_eq!(login(&p.a, "erin", PASSWORD).await.status(), 200);
    db.close().await;
    p.a.stop().await;
    p.b.stop().await;
}

/// The per-address window counts attempts made on either server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_window_spans_both_servers() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let p = two_servers(&pg, "addr_window", |c| {
        c.auth.login_per_address_per_minute = 6
    })
    .await;
    for i in 0..6 {
        let t = if i % 2 == 0 { &p.a } else { &p.b };
        // A different unknown account each time: no lockout involved.
        let r = login(t, &format!("nobody{i}"), "wrong guess").await;
        expect_error(r, 401, "RELAY_INVALID_CREDENTIALS").await;
    }
    for t in [&p.a, &p.b] {
        let r = login(t, "nobody-else", "wrong guess").await;
        assert!(r.headers().get("retry-after").is_some());
        expect_error(r, 429, "RELAY_RATE_LIMITED").await;
    }
    p.a.stop().await;
    p.b.stop().await;
}

/// A ticket issued on A opens a stream on B, once; afterwards it is
/// refused on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_from_one_server_is_redeemed_once_on_the_other() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let p = two_servers(&pg, "tickets", |_| {}).await;
    let u = p.a.user("fred", Role::Uploader).await;
    let tk: serde_json::Value =
        p.a.req(Method::POST, "/api/v1/events/ticket", &u)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let ticket = tk["ticket"].as_str().unwrap().to_string();
    let open = |t: &TestServer| {
        t.http
            .get(format!("{}/api/v1/events?ticket={ticket}", t.url))
            .send()
    };
    let r = open(&p.b).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    drop(r);
    for t in [&p.b, &p.a] {
        expect_error(open(t).await.unwrap(), 401, "RELAY_BAD_TICKET").await;
    }
    // Only the digest is stored, and the token without its signature.
    let db = SqlState::connect(&p.url, None, &SqlOptions::default())
        .await
        .unwrap();
    let left: i64 = sqlx::query("SELECT COUNT(*) FROM event_tickets")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(left, 0, "a redeemed ticket's row is gone");
    db.close().await;
    p.a.stop().await;
    p.b.stop().await;
}

/// The per-user cap of unfinished uploads counts the user's uploads on
/// both servers: 20 rounds, each a fresh user firing 2 x cap tus creations
/// at once, half on each server: exactly cap are created, the others get
/// 429 `RELAY_TOO_MANY_OPEN_UPLOADS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_uploads_cap_spans_both_servers() {
    const CAP: usize = 3;
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let p = two_servers(&pg, "open_uploads", |c| {
        c.http.max_open_uploads_per_user = CAP;
        c.auth.login_per_address_per_minute = 1000;
    })
    .await;
    for round in 0..20 {
        let u = p.a.user(&format!("gina{round}"), Role::Uploader).await;
        let sid = p.b.new_study(&u).await;
        let burst = (0..2 * CAP).map(|i| {
            let t = if i % 2 == 0 { &p.a } else { &p.b };
            t.create_upload_raw(&u, &sid, 1000, None)
        });
        let mut created = 0;
        for r in futures::future::join_all(burst).await {
            if r.status() == 201 {
                created += 1;
            } else {
                expect_error(r, 429, "RELAY_TOO_MANY_OPEN_UPLOADS").await;
            }
        }
        assert_eq!(created, CAP, "round {round}");
    }
    p.a.stop().await;
    p.b.stop().await;
}

fn tokens(db: SqlState) -> Tokens {
    let settings = TokenSettings {
        access_ttl_secs: 900,
        refresh_idle_secs: 3600,
        refresh_absolute_secs: 86_400,
        issuer: "relaypacs-test".into(),
        audience: "relaypacs-test".into(),
    };
    let secret = secrecy::SecretString::from("a shared server secret, the same on every gateway");
    Tokens::new(&secret, settings, db).unwrap()
}

/// 100 rounds: a ticket issued by one `Tokens`, redeemed by two on two
/// pools at once: exactly one gets the token (the very token it was
/// issued for, signed again), the other `None`, and a third try `None` on
/// either. An expired ticket is refused.
async fn ticket_race(url: &str) {
    let options = SqlOptions::default();
    let a = std::sync::Arc::new(tokens(
        SqlState::connect(url, None, &options).await.unwrap(),
    ));
    let b = std::sync::Arc::new(tokens(
        SqlState::connect(url, None, &options).await.unwrap(),
    ));
    let pair = a.login("user-1", Role::Uploader).await.unwrap();
    let token = pair.access_token;
    assert!(b.verify(&token).await.unwrap().is_some());
    for round in 0..100 {
        let issuer = if round % 2 == 0 { &a } else { &b };
        let ticket = issuer.ticket(&token).await.unwrap();
        let (x, y) = {
            let (ta, tb) = (ticket.clone(), ticket.clone());
            let (ga, gb) = (a.clone(), b.clone());
            let x = tokio::spawn(async move { ga.redeem(&ta).await.unwrap() });
            let y = tokio::spawn(async move { gb.redeem(&tb).await.unwrap() });
            (x.await.unwrap(), y.await.unwrap())
        };
        match (&x, &y) {
            (Some(t), None) | (None, Some(t)) => assert_eq!(*t, token, "round {round}"),
            other => panic!("round {round}: {other:?}"),
        }
        assert_eq!(a.redeem(&ticket).await.unwrap(), None, "round {round}");
        assert_eq!(b.redeem(&ticket).await.unwrap(), None, "round {round}");
    }
    // Expired: made 31 s old in the database, refused and gone.
    let db = SqlState::connect(url, None, &options).await.unwrap();
    let ticket = a.ticket(&token).await.unwrap();
    sqlx::query("UPDATE event_tickets SET expires_at = expires_at - 31000")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(b.redeem(&ticket).await.unwrap(), None);
    assert_eq!(a.redeem(&ticket).await.unwrap(), None);
    // Not a token: refused at issue.
    assert!(a.ticket("no-dots-here").await.is_err());
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ticket_two_gateways_one_redemption_on_postgres() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    ticket_race(&pg.create_database("race")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ticket_two_gateways_one_redemption_on_sqlite() {
    let dir = tempfile::TempDir::new().unwrap();
    ticket_race(&format!(
        "sqlite://{}",
        dir.path().join("state.db").display()
    ))
    .await;
}

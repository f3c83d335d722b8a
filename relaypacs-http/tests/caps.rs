//! Per-user caps hold under a concurrent burst (issue 11): 400 tus
//! creations released together open exactly `max_open_uploads_per_user`
//! uploads, 400 study creations exactly `max_open_sessions_per_user`
//! sessions; every other answer is 429 with `Retry-After`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;

use common::TestServer;
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::Value;
use tokio::sync::Barrier;

const BURST: usize = 400;

/// Status counts of a burst: (successes, 429s with Retry-After and `code`).
async fn burst<F, Fut>(make: F, code: &'static str) -> (usize, usize)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = reqwest::Response> + Send + 'static,
{
    let gate = Arc::new(Barrier::new(BURST));
    let mut tasks = Vec::new();
    for _ in 0..BURST {
        let (gate, fut) = (gate.clone(), make());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            fut.await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status().as_u16() {
            201 => ok += 1,
            429 => {
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], code, "{v}");
                refused += 1;
            }
            s => panic!("unexpected {s}: {:?}", r.text().await),
        }
    }
    (ok, refused)
}

fn burst_config(c: &mut relaypacs_http::Config) {
    // The burst's connections all come from 127.0.0.1: lift the
    // per-address connection cap so that only the per-user caps answer.
    c.http.max_connections_per_address = 2 * BURST;
    c.http.max_connections = 4 * BURST;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_tus_creations_opens_exactly_the_cap() {
    let t = Arc::new(TestServer::start_with(burst_config).await);
    let cap = t.config.http.max_open_uploads_per_user;
    assert_eq!(cap, 64);
    let u = Arc::new(t.user("ann", Role::Uploader).await);
    let study = Arc::new(t.new_study(&u).await);
    let (ok, refused) = burst(
        || {
            let (t, u, study) = (t.clone(), u.clone(), study.clone());
            async move { t.create_upload_raw(&u, &study, 1000, None).await }
        },
        "RELAY_TOO_MANY_OPEN_UPLOADS",
    )
    .await;
    assert_eq!((ok, refused), (cap, BURST - cap));
    // The pipeline's count, in the state database: the user's files still
    // uploading.
    let uploading: usize = t
        .server()
        .state()
        .pipeline()
        .list_sessions(&relaypacs_core::Actor::user(u.id.as_str()))
        .await
        .unwrap()
        .iter()
        .flat_map(|s| s.files.values())
        .filter(|f| f.state == relaypacs_core::FileState::Uploading)
        .count();
    assert_eq!(uploading, cap);
    // The refused creations left no reservation behind and released no
    // slot of an upload: the next one is still refused.
    let r = t.create_upload_raw(&u, &study, 1000, None).await;
    assert_eq!(r.status(), 429);
    let Ok(t) = Arc::try_unwrap(t) else {
        panic!("server still shared")
    };
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_study_creations_opens_exactly_the_session_cap() {
    let t = Arc::new(TestServer::start_with(burst_config).await);
    let cap = t.config.http.max_open_sessions_per_user as usize;
    assert_eq!(cap, 64);
    let u = Arc::new(t.user("bob", Role::Uploader).await);
    let (ok, refused) = burst(
        || {
            let (t, u) = (t.clone(), u.clone());
            async move {
                t.req(Method::POST, "/api/v1/studies", &u)
                    .send()
                    .await
                    .unwrap()
            }
        },
        "RELAY_TOO_MANY_SESSIONS",
    )
    .await;
    assert_eq!((ok, refused), (cap, BURST - cap));
    // Another user is not affected by bob's cap.
    let other = t.user("cy", Role::Uploader).await;
    t.new_study(&other).await;
    let Ok(t) = Arc::try_unwrap(t) else {
        panic!("server still shared")
    };
    t.stop().await;
}

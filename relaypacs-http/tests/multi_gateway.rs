//! Two reference servers on one PostgreSQL database and one S3 bucket
//! (issue 12, "several gateways, one service"): a user and a token made on
//! one work on the other; an upload's successive PATCHes go to either
//! gateway and the study completes and is delivered; two PATCHes of one
//! upload sent at once to the two gateways: exactly one 204, every round;
//! uploads created on one gateway and finished on the other leave the
//! user's cap of unfinished uploads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use relaypacs_http::auth::Role;
use relaypacs_http::config::{ChunksConfig, S3ChunksConfig};
use relaypacs_test_peers::{Postgres, S3Server};
use reqwest::Method;
use serde_json::Value;

struct Pair {
    a: TestServer,
    b: TestServer,
    /// The database URL both gateways share.
    url: String,
    _s3: S3Server,
    _pg: Postgres,
}

async fn two_gateways() -> Pair {
    two_gateways_with(|_| {}).await
}

/// [`two_gateways`] with the settings `f` makes.
async fn two_gateways_with(f: impl Fn(&mut relaypacs_http::Config)) -> Pair {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let url = pg.create_database("relay");
    let shared_secret = secret();
    let configure = |c: &mut relaypacs_http::Config| {
        c.state.url = Some(url.clone());
        c.secret = Some(shared_secret.clone());
        c.chunks = ChunksConfig::S3(S3ChunksConfig {
            endpoint: Some(s3.endpoint.clone()),
            bucket: s3.bucket.clone(),
            region: Some("us-east-1".into()),
            access_key_id: Some(s3.access_key.clone()),
            secret_access_key: Some(s3.secret_key.clone().into()),
            allow_http: true,
            ..Default::default()
        });
        f(c);
    };
    let a = TestServer::start_with(configure).await;
    let b = TestServer::start_with(configure).await;
    Pair {
        a,
        b,
        url,
        _s3: s3,
        _pg: pg,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_moves_between_gateways_and_is_delivered() {
    let p = two_gateways().await;
    // Made on A, used on B: users and refresh families are in the database.
    let u = p.a.user("clinic", Role::Uploader).await;
    let sid = p.a.new_study(&u).await;
    let data = dicom(None, 320);
    let third = data.len() / 3;
    let up =
        p.b.create_upload(&u, &sid, data.len() as u64, Some(&data))
            .await;
    let cuts = [0, third, 2 * third, data.len()];
    for (i, w) in cuts.windows(2).enumerate() {
        let t = if i % 2 == 0 { &p.a } else { &p.b };
        let other = if i % 2 == 0 { &p.b } else { &p.a };
        assert_eq!(other.head_offset(&u, &up).await, w[0] as u64);
        let r = t
            .patch(&u, &up, w[0] as u64, data[w[0]..w[1]].to_vec(), None)
            .await;
        assert_eq!(r.status(), 204, "PATCH {i}: {:?}", r.text().await);
    }
    let r =
        p.b.req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), &u)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let start = Instant::now();
    loop {
        let v: Value =
            p.a.req(Method::GET, &format!("/api/v1/studies/{sid}"), &u)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        if v["state"]["state"] == "delivered" {
            assert_eq!(v["state"]["verified"], "content", "{v:#}");
            assert_eq!(v["file_count"], 1, "{v:#}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_patches_of_one_upload_on_two_gateways_one_succeeds() {
    let p = two_gateways().await;
    let u = p.a.user("clinic", Role::Uploader).await;
    let sid = p.a.new_study(&u).await;
    let study = relaypacs_core::testing::dicom_gen::new_uid();
    for round in 0..100 {
        let data = dicom(Some(&study), 8);
        let up = p.a.create_upload(&u, &sid, data.len() as u64, None).await;
        let (ra, rb) = tokio::join!(
            p.a.patch(&u, &up, 0, data.clone(), Some(sha256_header(&data))),
            p.b.patch(&u, &up, 0, data.clone(), Some(sha256_header(&data))),
        );
        let (sa, sb) = (ra.status().as_u16(), rb.status().as_u16());
        let ok = [sa, sb].iter().filter(|s| **s == 204).count();
        assert_eq!(ok, 1, "round {round}: A {sa}, B {sb}");
        let loser = if sa == 204 { sb } else { sa };
        assert!(
            loser == 409 || loser == 404,
            "round {round}: the second PATCH answered {loser}"
        );
    }
}

/// Uploads created on one gateway and finished on the other no longer
/// count against the user's cap of unfinished uploads: 3 x cap rounds of
/// a tus creation on A and the whole file PATCHed on B, every creation
/// 201 (a count kept by A alone would have been full after cap rounds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_finished_on_the_other_gateway_leave_the_cap() {
    const CAP: usize = 2;
    let p = two_gateways_with(|c| c.http.max_open_uploads_per_user = CAP).await;
    let u = p.a.user("hugo", Role::Uploader).await;
    let sid = p.a.new_study(&u).await;
    let study = relaypacs_core::testing::dicom_gen::new_uid();
    for round in 0..3 * CAP {
        let data = dicom(Some(&study), 8);
        let r =
            p.a.create_upload_raw(&u, &sid, data.len() as u64, None)
                .await;
        assert_eq!(r.status(), 201, "round {round}: {:?}", r.text().await);
        let up = r.headers()["location"].to_str().unwrap().to_string();
        let r = p.b.patch(&u, &up, 0, data, None).await;
        assert_eq!(r.status(), 204, "round {round}: {:?}", r.text().await);
    }
    // The cap still holds: cap unfinished uploads, then 429.
    for _ in 0..CAP {
        p.b.create_upload(&u, &sid, 1000, None).await;
    }
    let r = p.a.create_upload_raw(&u, &sid, 1000, None).await;
    expect_error(r, 429, "RELAY_TOO_MANY_OPEN_UPLOADS").await;
}

/// An event stream opened on `t`, read line by line: every `data:`
/// payload, as JSON, in order.
async fn events(t: &TestServer, u: &common::User) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    use futures::StreamExt;
    let r = t
        .req(Method::GET, "/api/v1/events", u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = r.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = buf.find('\n') {
                let line: String = buf.drain(..=i).collect();
                if let Some(data) = line.trim_end().strip_prefix("data:")
                    && let Ok(v) = serde_json::from_str::<Value>(data.trim())
                {
                    let _ = tx.send(v);
                }
            }
        }
    });
    rx
}

/// Issue 12, "events reach the user's SSE stream whichever instance
/// handled the upload": a stream opened on gateway A shows the upload
/// progress, the file's completion and the `delivered` notification of a
/// study uploaded and completed through gateway B (LISTEN/NOTIFY); the
/// notification list is the same on both; exactly one `delivered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_study_on_gateway_b_reach_a_stream_on_gateway_a() {
    let p = two_gateways().await;
    let u = p.a.user("clinic", Role::Uploader).await;
    let mut rx = events(&p.a, &u).await;
    let sid = p.b.new_study(&u).await;
    let data = dicom(None, 64);
    let up = p.b.create_upload(&u, &sid, data.len() as u64, None).await;
    let r =
        p.b.patch(&u, &up, 0, data.clone(), Some(sha256_header(&data)))
            .await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let r =
        p.b.req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), &u)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);

    let mut seen = Vec::new();
    let delivered = loop {
        let v = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no delivered notification on A; saw {seen:#?}"))
            .expect("stream ended");
        seen.push(v.clone());
        if v["type"] == "notification" && v["study"] == sid.as_str() {
            break v;
        }
    };
    assert_eq!(delivered["kind"], "delivered", "{delivered:#}");
    assert_eq!(delivered["verified"], "content", "{delivered:#}");
    let progress = seen
        .iter()
        .filter(|v| v["type"] == "upload_progress" && v["study"] == sid.as_str())
        .map(|v| v["offset"].as_u64().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(
        progress.last().copied(),
        Some(data.len() as u64),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|v| v["type"] == "file_completed"
            && v["study"] == sid.as_str()
            && v["ok"] == true),
        "{seen:#?}"
    );

    // The same list on both gateways, with one `delivered` for the study.
    let la = p.a.wait_notifications(&u, 1).await;
    let lb = p.b.wait_notifications(&u, 1).await;
    assert_eq!(la, lb);
    let ones = la
        .iter()
        .filter(|n| n["study"] == sid.as_str() && n["kind"] == "delivered")
        .count();
    assert_eq!(ones, 1, "{la:#?}");
    assert_eq!(la.len(), 1, "{la:#?}");
    assert_eq!(la[0]["id"], delivered["id"]);
    // A repair pass on either gateway finds nothing missing.
    assert_eq!(p.a.server().state().hub().repair().await.unwrap(), 0);
    assert_eq!(p.b.server().state().hub().repair().await.unwrap(), 0);
    assert_eq!(p.a.wait_notifications(&u, 1).await, la);
    // Marked read on B, read on A.
    let id = la[0]["id"].as_str().unwrap();
    let r =
        p.b.req(
            Method::POST,
            &format!("/api/v1/notifications/{id}/read"),
            &u,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(p.a.wait_notifications(&u, 1).await[0]["read"], true);
    // Another user's notification is 404 on either gateway.
    let other = p.b.user("other", Role::Uploader).await;
    let r =
        p.a.req(
            Method::POST,
            &format!("/api/v1/notifications/{id}/read"),
            &other,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Events published on B reach A in order; their latency, measured.
    let id = relaypacs_http::upload_id::UploadId::parse(up.rsplit('/').next().unwrap()).unwrap();
    let n = 200u64;
    let mut latencies = Vec::new();
    for i in 1..=n {
        let sent = Instant::now();
        p.b.server().state().hub().publish(
            &u.id,
            relaypacs_http::notify::Event::UploadProgress {
                study: "latency".into(),
                upload: id,
                offset: i,
                length: n,
            },
        );
        let v = loop {
            let v = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("event not relayed")
                .expect("stream ended");
            if v["study"] == "latency" {
                break v;
            }
        };
        latencies.push(sent.elapsed());
        assert_eq!(v["offset"], i, "out of order");
    }
    latencies.sort();
    eprintln!(
        "B -> A event latency over {n} events: p50 {:?}, p99 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies[latencies.len() - 1]
    );
}

/// The next event on `rx` for `study`, within `secs`.
async fn next_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>,
    study: &str,
    secs: u64,
) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(v)) if v["study"] == study => return Some(v),
            Ok(Some(_)) => {}
            _ => return None,
        }
    }
}

/// A notification too large for a `NOTIFY` payload crosses by reference
/// (the listener reads the row); when a gateway's `LISTEN` connection is
/// killed, it reconnects and events from the other gateway flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_cross_by_reference_and_the_listener_reconnects() {
    use relaypacs_http::notify::{Event, NotificationKind};
    let p = two_gateways().await;
    let u = p.a.user("clinic", Role::Uploader).await;
    let mut rx = events(&p.a, &u).await;

    let long = "x".repeat(10_000);
    let n =
        p.b.server()
            .state()
            .hub()
            .notify(&u.id, NotificationKind::ReportReady, "big", &long)
            .await
            .unwrap();
    let v = next_of(&mut rx, "big", 10)
        .await
        .expect("large notification");
    assert_eq!(v["id"], n.id.as_str());
    assert_eq!(v["message"].as_str().unwrap().len(), long.len());

    // Kill every LISTEN connection on the server (both gateways').
    let db = relaypacs_storage::SqlState::connect(&p.url, None, &Default::default())
        .await
        .unwrap();
    let killed = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND query ILIKE '%LISTEN%relaypacs_events%'",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(killed.len(), 2, "one LISTEN connection per gateway");
    // Events published on B reach A again once A reconnected.
    let id = relaypacs_http::upload_id::UploadId::new(
        relaypacs_core::SessionId::random(),
        relaypacs_core::FileId::random(),
    );
    let start = Instant::now();
    let mut offset = 0;
    let again = loop {
        offset += 1;
        p.b.server().state().hub().publish(
            &u.id,
            Event::UploadProgress {
                study: "after".into(),
                upload: id,
                offset,
                length: 1_000_000,
            },
        );
        if let Some(v) = next_of(&mut rx, "after", 1).await {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no event after the LISTEN connection was killed"
        );
    };
    eprintln!(
        "events flowed again {:?} after the LISTEN connections were killed (event {})",
        start.elapsed(),
        again["offset"]
    );
    db.close().await;
}

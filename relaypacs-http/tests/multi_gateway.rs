//! Two reference servers on one PostgreSQL database and one S3 bucket
//! (issue 12, "several gateways, one service"): a user and a token made on
//! one work on the other; an upload's successive PATCHes go to either
//! gateway and the study completes and is delivered; two PATCHes of one
//! upload sent at once to the two gateways: exactly one 204, every round.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

mod common;

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
    _s3: S3Server,
    _pg: Postgres,
}

async fn two_gateways() -> Pair {
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
    };
    let a = TestServer::start_with(configure).await;
    let b = TestServer::start_with(configure).await;
    Pair {
        a,
        b,
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

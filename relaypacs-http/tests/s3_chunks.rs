//! `[chunks] kind = "s3"`: the server keeps uploaded bytes in a real
//! S3-compatible server (s3s-fs), one multipart upload per file, and a
//! study uploaded by tus is validated, delivered (to the archive) and its
//! objects removed from the bucket once the study is done; nothing lands
//! in the local chunk folder. A misconfigured bucket refuses to start.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use relaypacs_http::auth::Role;
use relaypacs_http::config::{ChunksConfig, S3ChunksConfig};
use relaypacs_test_peers::S3Server;
use reqwest::Method;
use serde_json::Value;

fn s3_config(s3: &S3Server) -> S3ChunksConfig {
    S3ChunksConfig {
        endpoint: Some(s3.endpoint.clone()),
        bucket: s3.bucket.clone(),
        region: Some("us-east-1".into()),
        access_key_id: Some(s3.access_key.clone()),
        secret_access_key: Some(s3.secret_key.clone().into()),
        allow_http: true,
        ..Default::default()
    }
}

/// Every regular file under `dir` (the s3s-fs bucket folder), by path.
fn objects(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_goes_through_s3_chunks_and_is_delivered() {
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let cfg = s3_config(&s3);
    let t = TestServer::start_with(|c| c.chunks = ChunksConfig::S3(cfg)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let sid = t.new_study(&u).await;
    let first = dicom(None, 64);
    let study =
        relaypacs_core::dicom::validate_dicom(&first, first.len() as u64, &Default::default())
            .unwrap()
            .study_instance_uid
            .to_string();
    let files = vec![first, dicom(Some(&study), 64), dicom(Some(&study), 64)];
    for f in &files {
        t.upload(&u, &sid, f).await;
    }
    // The bytes are in the bucket (an upload marker and a sealed data
    // object per file), not in the local chunk folder.
    let bucket = s3.root().join(&s3.bucket);
    let held = objects(&bucket);
    let data: Vec<&String> = held.iter().filter(|p| p.ends_with("data")).collect();
    assert_eq!(data.len(), 3, "{held:?}");
    assert!(
        objects(&t.data().join("chunks")).is_empty(),
        "local chunks written"
    );
    let r = t
        .req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), &u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let start = Instant::now();
    let v = loop {
        let v: Value = t
            .req(Method::GET, &format!("/api/v1/studies/{sid}"), &u)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if matches!(
            v["state"]["state"].as_str(),
            Some("delivered" | "dead_letter")
        ) {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["state"]["state"], "delivered", "{v:#}");
    assert_eq!(v["state"]["verified"], "content", "{v:#}");
    // The archive holds exactly the uploaded bytes.
    let mut archived: Vec<String> = snapshot(&t.data().join("archive").join(&study))
        .into_values()
        .collect();
    let mut sent: Vec<String> = files
        .iter()
        .map(|f| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(f))
        })
        .collect();
    archived.sort();
    sent.sort();
    assert_eq!(archived, sent);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_chunk_store_without_a_bucket_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = test_config(dir.path());
    c.chunks = ChunksConfig::S3(S3ChunksConfig::default());
    let Err(e) = relaypacs_http::Server::start(c).await else {
        panic!("an s3 chunk store without a bucket started");
    };
    assert!(e.to_string().contains("chunks.bucket"), "{e}");
}

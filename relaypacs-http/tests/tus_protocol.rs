//! tus 1.0.0 behaviour (UP-* requirements that touch HTTP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use relaypacs_http::auth::Role;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn discovery_creation_head_patch_termination() {
    let t = TestServer::start().await;
    let u = t.user("kai", Role::Uploader).await;
    let r = t
        .http
        .request(Method::OPTIONS, format!("{}/files", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["tus-version"], "1.0.0");
    assert_eq!(r.headers()["tus-checksum-algorithm"], "sha256,sha1");
    let ext = r.headers()["tus-extension"].to_str().unwrap();
    for e in [
        "creation",
        "creation-with-upload",
        "termination",
        "checksum",
        "expiration",
    ] {
        assert!(ext.split(',').any(|x| x == e), "{e} missing");
    }
    let study = t.new_study(&u).await;
    // Tus-Resumable is required.
    let r = t
        .req(Method::POST, "/files", &u)
        .header("upload-length", "10")
        .send()
        .await
        .unwrap();
    expect_error(r, 412, "RELAY_TUS_VERSION").await;
    // Creation with upload.
    let data = dicom(None, 200);
    let meta = format!("filename {},session {}", b64("x.dcm"), b64(&study));
    let half = 65536;
    let r = t
        .req(Method::POST, "/files", &u)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", data.len().to_string())
        .header("upload-metadata", meta)
        .header("content-type", "application/offset+octet-stream")
        .body(data[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["upload-offset"], half.to_string().as_str());
    assert!(r.headers().get("upload-expires").is_some());
    assert_eq!(r.headers()["tus-resumable"], "1.0.0");
    let up = r.headers()["location"].to_str().unwrap().to_string();
    let h = t
        .req(Method::HEAD, &up, &u)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(h.headers()["cache-control"], "no-store");
    assert_eq!(
        h.headers()["upload-length"],
        data.len().to_string().as_str()
    );
    // Wrong offset: 409, nothing changes.
    expect_error(
        t.patch(&u, &up, 0, data[..half].to_vec(), None).await,
        409,
        "RELAY_OFFSET_MISMATCH",
    )
    .await;
    // A stale offset is tus's 409 even when the body would also run past
    // Upload-Length (the offset is checked first), and an ahead offset too.
    expect_error(
        t.patch(&u, &up, 0, vec![0; data.len() + 1], None).await,
        409,
        "RELAY_OFFSET_MISMATCH",
    )
    .await;
    expect_error(
        t.patch(&u, &up, half as u64 + 1, vec![0; 10], None).await,
        409,
        "RELAY_OFFSET_MISMATCH",
    )
    .await;
    // At the right offset, a body past Upload-Length is 413.
    expect_error(
        t.patch(&u, &up, half as u64, vec![0; data.len() - half + 1], None)
            .await,
        413,
        "RELAY_UPLOAD_OVERFLOW",
    )
    .await;
    assert_eq!(t.head_offset(&u, &up).await, half as u64);
    // Wrong content type: 415.
    let r = t
        .req(Method::PATCH, &up, &u)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", half.to_string())
        .body(vec![0; 10])
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "RELAY_UNSUPPORTED_MEDIA_TYPE").await;
    // SHA-1 checksum (the algorithm tus requires): right bytes pass.
    let rest = data[half..].to_vec();
    let r = t
        .patch(&u, &up, half as u64, rest.clone(), Some(sha1_header(&rest)))
        .await;
    assert_eq!(r.status(), 204);
    assert!(r.headers().get("upload-expires").is_some());
    assert_eq!(t.head_offset(&u, &up).await, data.len() as u64);
    // Termination.
    let r = t
        .req(Method::DELETE, &up, &u)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = t
        .req(Method::HEAD, &up, &u)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    t.stop().await;
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// UP-1: a checksum mismatch answers 460 and keeps nothing; an unknown
/// algorithm is 400.
#[tokio::test]
async fn checksum_mismatch_is_460_and_keeps_nothing() {
    let t = TestServer::start().await;
    let u = t.user("lea", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    let up = t.create_upload(&u, &study, data.len() as u64, None).await;
    let piece = data[..100_000].to_vec();
    let mut flipped = piece.clone();
    flipped[500] ^= 1;
    for header in [sha256_header(&piece), sha1_header(&piece)] {
        let r = t.patch(&u, &up, 0, flipped.clone(), Some(header)).await;
        assert_eq!(r.status(), 460, "{:?}", r.text().await);
        assert_eq!(t.head_offset(&u, &up).await, 0);
    }
    for bad in ["md5 AAAA", "sha256", "sha256 !!!", "sha1 AAAA"] {
        let r = t
            .patch(&u, &up, 0, piece.clone(), Some(bad.to_string()))
            .await;
        expect_error(r, 400, "RELAY_BAD_CHECKSUM").await;
    }
    assert_eq!(t.head_offset(&u, &up).await, 0);
    let r = t
        .patch(&u, &up, 0, piece.clone(), Some(sha256_header(&piece)))
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(t.head_offset(&u, &up).await, 100_000);
    let m = t
        .http
        .get(format!("{}/metrics", t.url))
        .bearer_auth(std::fs::read_to_string(t.data().join("metrics-token")).unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("relaypacs_chunk_verifications_failed_total 2"),
        "{m}"
    );
    t.stop().await;
}

/// Send a PATCH over a raw socket: headers declaring `declared` bytes,
/// then only `sent` bytes, then close.
async fn torn_patch(
    t: &TestServer,
    u: &User,
    up: &str,
    offset: u64,
    body: &[u8],
    declared: usize,
    checksum: Option<String>,
) {
    let addr = t.server().addr();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "PATCH {up} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {declared}\r\n",
        u.token
    );
    if let Some(c) = checksum {
        head.push_str(&format!("Upload-Checksum: {c}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A dropped connection keeps exactly the durable segments (no
/// checksum), or nothing (checksummed PATCH); HEAD tells the truth and
/// the client resumes to a byte-identical file.
#[tokio::test]
async fn dropped_connection_keeps_only_durable_bytes() {
    let t = TestServer::start_with(|c| c.http.patch_segment_size = 64 << 10).await;
    let u = t.user("max", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 400); // ~320 KB
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    // Checksummed: 150 KB of a declared 200 KB arrive, nothing is kept.
    torn_patch(
        &t,
        &u,
        &up,
        0,
        &data[..150_000],
        200_000,
        Some(sha256_header(&data[..200_000])),
    )
    .await;
    assert_eq!(t.head_offset(&u, &up).await, 0);
    // Unchecksummed: the two complete 64 KiB segments are kept.
    torn_patch(&t, &u, &up, 0, &data[..150_000], 200_000, None).await;
    assert_eq!(t.head_offset(&u, &up).await, 128 << 10);
    // Resume from the reported offset.
    let off = t.head_offset(&u, &up).await as usize;
    let r = t
        .patch(&u, &up, off as u64, data[off..].to_vec(), None)
        .await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let r = t
        .req(
            Method::POST,
            &format!("/api/v1/studies/{study}/complete"),
            &u,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    t.wait_notifications(&u, 1).await;
    let stored: Vec<_> = walk(&t.data().join("archive"));
    assert_eq!(stored.len(), 1);
    assert_eq!(
        std::fs::read(&stored[0]).unwrap(),
        data,
        "stored file differs"
    );
    t.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "dcm") {
                out.push(p);
            }
        }
    }
    out
}

fn slow_body(data: Vec<u8>, pieces: usize, pause: Duration) -> reqwest::Body {
    let n = data.len() / pieces + 1;
    let parts: Vec<Vec<u8>> = data.chunks(n).map(<[u8]>::to_vec).collect();
    reqwest::Body::wrap_stream(futures::stream::iter(parts).then(move |p| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::io::Error>(bytes::Bytes::from(p))
    }))
}

/// UP-4: two PATCHes on one upload at once: exactly one succeeds, the
/// other gets 409, and the file is intact.
#[tokio::test]
async fn concurrent_patches_never_interleave() {
    let t = TestServer::start().await;
    let u = t.user("ned", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    let send = |body: reqwest::Body| {
        t.req(Method::PATCH, &up, &u)
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", "0")
            .header("content-type", "application/offset+octet-stream")
            .header("content-length", data.len().to_string())
            .body(body)
            .send()
    };
    let (a, b) = tokio::join!(
        send(slow_body(data.clone(), 5, Duration::from_millis(200))),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send(slow_body(data.clone(), 2, Duration::from_millis(10))).await
        }
    );
    let mut s = [a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
    s.sort_unstable();
    assert_eq!(s, [204, 409]);
    assert_eq!(t.head_offset(&u, &up).await, data.len() as u64);
    let v: serde_json::Value = t
        .req(Method::GET, &format!("/api/v1/studies/{study}"), &u)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["files"][0]["state"], "valid");
    t.stop().await;
}

/// A long upload outlives its access token: a PATCH that started with a
/// valid token finishes after the token expired; the next one needs a
/// refreshed token.
#[tokio::test]
async fn upload_outlives_token_expiry() {
    // Access tokens live 1 s (+5 s leeway); the PATCH streams for ~7.5 s.
    let t = TestServer::start_with(|c| c.auth.access_ttl_secs = 1).await;
    let u = t.user("ora", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    let first = data[..131072].to_vec();
    let r = t
        .req(Method::PATCH, &up, &u)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .header("content-length", first.len().to_string())
        .body(slow_body(first, 5, Duration::from_millis(1500)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        204,
        "a PATCH failed because its token expired mid-way"
    );
    let r = t
        .patch(&u, &up, 131072, data[131072..].to_vec(), None)
        .await;
    assert_eq!(r.status(), 401);
    let fresh: serde_json::Value = t
        .http
        .post(format!("{}/api/v1/auth/refresh", t.url))
        .json(&serde_json::json!({"refresh_token": u.refresh}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let u2 = User {
        id: u.id.clone(),
        token: fresh["access_token"].as_str().unwrap().into(),
        refresh: fresh["refresh_token"].as_str().unwrap().into(),
    };
    let r = t
        .patch(&u2, &up, 131072, data[131072..].to_vec(), None)
        .await;
    assert_eq!(r.status(), 204);
    t.stop().await;
}

/// DOS-5: per-user caps on parallel PATCHes and open uploads; another
/// user is unaffected.
#[tokio::test]
async fn per_user_upload_caps() {
    let t = TestServer::start_with(|c| {
        c.http.max_parallel_patches_per_user = 1;
        c.http.max_open_uploads_per_user = 2;
    })
    .await;
    let a = t.user("pia", Role::Uploader).await;
    let b = t.user("quin", Role::Uploader).await;
    let sa = t.new_study(&a).await;
    let sb = t.new_study(&b).await;
    let data = dicom(None, 300);
    let u1 = t.create_upload(&a, &sa, data.len() as u64, None).await;
    let u2 = t.create_upload(&a, &sa, data.len() as u64, None).await;
    let r = t.create_upload_raw(&a, &sa, 100, None).await;
    assert!(r.headers().get("retry-after").is_some());
    expect_error(r, 429, "RELAY_TOO_MANY_OPEN_UPLOADS").await;
    let ub = t.create_upload(&b, &sb, data.len() as u64, None).await;
    let slow = t
        .req(Method::PATCH, &u1, &a)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .header("content-length", data.len().to_string())
        .body(slow_body(data.clone(), 4, Duration::from_millis(300)))
        .send();
    let other = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let second = t.patch(&a, &u2, 0, data.clone(), None).await;
        let bees = t.patch(&b, &ub, 0, data.clone(), None).await;
        (second, bees)
    };
    let (r1, (r2, rb)) = tokio::join!(slow, other);
    assert_eq!(r1.unwrap().status(), 204);
    assert!(r2.headers().get("retry-after").is_some());
    expect_error(r2, 429, "RELAY_TOO_MANY_PARALLEL_UPLOADS").await;
    assert_eq!(rb.status(), 204, "user B was affected by A's cap");
    t.stop().await;
}

/// DOS-6: below the free-space watermark new uploads get 507 (and an
/// alert in the audit trail); readiness reports it.
#[tokio::test]
async fn disk_watermark_answers_507() {
    // The study is opened while there is room; then the volume is "full".
    let mut t = TestServer::start().await;
    let u = t.user("ray", Role::Uploader).await;
    let study = t.new_study(&u).await;
    t.restart(|c| c.http.min_free_bytes = Some(u64::MAX / 4))
        .await;
    let r = t.create_upload_raw(&u, &study, 1000, None).await;
    expect_error(r, 507, "RELAY_STORAGE_FULL").await;
    // Below the watermark no new study is opened either (the pipeline's
    // storage gauge).
    let r = t
        .req(Method::POST, "/api/v1/studies", &u)
        .send()
        .await
        .unwrap();
    expect_error(r, 507, "RELAY_INSUFFICIENT_STORAGE").await;
    let r = t
        .http
        .get(format!("{}/readyz", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        t.audit()
            .await
            .iter()
            .any(|e| e.action == relaypacs_core::AuditAction::SecurityAlert)
    );
    t.stop().await;
}

/// DOS-2: a body that stalls is cut after the idle timeout, nothing of
/// the stalled chunk is kept and the upload is not left locked.
#[tokio::test]
async fn stalled_body_is_cut_and_upload_unlocked() {
    let t = TestServer::start_with(|c| c.http.body_idle_timeout_secs = 1).await;
    let u = t.user("sam", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    let up = t.create_upload(&u, &study, data.len() as u64, None).await;
    let mut s = tokio::net::TcpStream::connect(t.server().addr())
        .await
        .unwrap();
    let head = format!(
        "PATCH {up} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        u.token,
        data.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&data[..1000]).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stalled body held for {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(t.head_offset(&u, &up).await, 0);
    let r = t.patch(&u, &up, 0, data.clone(), None).await;
    assert_eq!(r.status(), 204, "upload left locked");
    t.stop().await;
}

//! One test per finding of the earlier implementation's audit
//! (`shared/reference/relaypacs-python-audit-2026.md`). Each would fail if
//! that bug were present.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use relaypacs_core::testing::faults::{Fault, FaultPlan, FaultyChunkStore, Op};
use relaypacs_core::{AuditAction, AuditOutcome, SessionId};
use relaypacs_http::auth::Role;
use reqwest::Method;

// ---------------------------------------------------------------- #1

/// Finding 1: a default / weak secret was accepted. The binary must exit
/// non-zero before binding, name the setting and never print the value.
#[test]
fn finding_01_default_or_weak_secret_refuses_to_start() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bad = [
        "",
        "changeme",
        "short-but-random-9f8e",
        "dev-secret-key-change-in-production",
        &"a".repeat(64),
        &"01".repeat(40),
    ];
    for value in bad {
        let port = relaypacs_test_peers::free_port();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_relaypacs"))
            .env("RELAYPACS_SECRET", value)
            .env("RELAYPACS_DATA_DIR", dir.path().join("d"))
            .env("RELAYPACS_LISTEN", format!("127.0.0.1:{port}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "secret {value:?} accepted: {stderr}"
        );
        assert!(stderr.contains("secret"), "{stderr}");
        if value.len() > 4 {
            assert!(!stderr.contains(value), "the secret value was printed");
        }
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}

/// Finding 1, other half: with no secret configured, a random one is made
/// on first start (mode 0600), different per install, and a secret file
/// readable by others is refused.
#[tokio::test]
async fn finding_01_generated_secret_is_random_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut secrets = Vec::new();
    for i in 0..2 {
        let mut c = test_config(&dir.path().join(i.to_string()));
        c.secret = None;
        let s = relaypacs_http::AppState::open(c.clone()).await.unwrap();
        drop(s);
        let p = c.data_dir.join("secret");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let v = std::fs::read_to_string(&p).unwrap();
        assert!(v.len() >= 64);
        relaypacs_http::config::check_secret("secret", &v).unwrap();
        secrets.push(v);
        // The same secret is used on the next start.
        let again = c.resolve_secret().unwrap();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&again), secrets[i]);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            c.resolve_secret().is_err(),
            "a world-readable secret file was accepted"
        );
    }
    assert_ne!(secrets[0], secrets[1]);
}

// ---------------------------------------------------------------- #2 and #5

/// A server whose chunk store fails every `put_chunk` while the returned
/// plan says so (`Fault::Io`: EIO after taking part of the body, as a real
/// failing disk would; `Fault::Full`: ENOSPC).
async fn faulty_server() -> (TestServer, Arc<FaultPlan>) {
    let fault = FaultPlan::watching([Op::PutChunk]);
    let f2 = fault.clone();
    let t = TestServer::start_adapted(
        |_| {},
        move |mut a| {
            a.chunks = Arc::new(FaultyChunkStore::new(a.chunks, f2));
            a
        },
    )
    .await;
    (t, fault)
}

/// Finding 2: a chunk was marked complete although its write failed.
#[tokio::test]
async fn finding_02_failed_write_never_records_a_chunk() {
    let (t, fault) = faulty_server().await;
    let u = t.user("ana", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    for (code, status, err) in [
        (Fault::Io, 503u16, "RELAY_STORAGE_ERROR"),
        (Fault::Full, 507, "RELAY_STORAGE_FULL"),
    ] {
        fault.fail_always(code);
        for checksum in [Some(sha256_header(&data)), None] {
            let r = t.patch(&u, &up, 0, data.clone(), checksum).await;
            expect_error(r, status, err).await;
            assert_eq!(
                t.head_offset(&u, &up).await,
                0,
                "offset moved after a failed write"
            );
            let (sid, fid) = (
                SessionId::parse(&up[7..39]).unwrap(),
                relaypacs_core::FileId::parse(&up[39..]).unwrap(),
            );
            let chunks = t
                .server()
                .state()
                .pipeline()
                .file_chunks(&relaypacs_core::Actor::system(), sid, fid)
                .await
                .unwrap();
            assert!(
                chunks.is_empty(),
                "a chunk was recorded for a failed write: {chunks:?}"
            );
        }
    }
    let events = t.audit().await;
    assert!(
        events
            .iter()
            .any(|e| e.action == AuditAction::ChunkStored && e.outcome != AuditOutcome::Success)
    );
    assert!(
        !events
            .iter()
            .any(|e| e.action == AuditAction::ChunkStored && e.outcome == AuditOutcome::Success)
    );
    // Once the fault is gone the same upload completes byte-exact.
    fault.heal();
    let r = t
        .patch(&u, &up, 0, data.clone(), Some(sha256_header(&data)))
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(t.head_offset(&u, &up).await, data.len() as u64);
    t.stop().await;
}

/// Finding 5: broad exception handlers masked failures as success or as
/// a generic 500. Each failure must surface with its own status and code,
/// never leak internals, and be audited as a failure.
#[tokio::test]
async fn finding_05_failures_surface_typed_and_audited() {
    let (t, fault) = faulty_server().await;
    let u = t.user("bo", Role::Uploader).await;
    let study = t.new_study(&u).await;
    // Storage fault: 503 with a generic message (no paths, no OS text).
    let data = dicom(None, 200);
    let up = t.create_upload(&u, &study, data.len() as u64, None).await;
    fault.fail_always(Fault::Io);
    let v = expect_error(
        t.patch(&u, &up, 0, data.clone(), None).await,
        503,
        "RELAY_STORAGE_ERROR",
    )
    .await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        !msg.contains('/') && !msg.contains("os error"),
        "internals leaked: {msg}"
    );
    fault.heal();
    // Wrong checksum: 460, not 500.
    expect_error(
        t.patch(&u, &up, 0, data.clone(), Some(sha256_header(b"other")))
            .await,
        460,
        "RELAY_CHUNK_HASH_MISMATCH",
    )
    .await;
    // Not DICOM: 422 with the validator's code, audited as a failure.
    let junk = vec![7u8; 4096];
    let up2 = t.create_upload(&u, &study, junk.len() as u64, None).await;
    let r = t.patch(&u, &up2, 0, junk, None).await;
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]["code"]
            .as_str()
            .unwrap()
            .starts_with("RELAY_DICOM"),
        "{v}"
    );
    let events = t.audit().await;
    assert!(
        events
            .iter()
            .any(|e| e.action == AuditAction::FileCompleted && e.outcome != AuditOutcome::Success)
    );
    t.stop().await;
}

// ---------------------------------------------------------------- #3

/// Finding 3: no upload size limit.
#[tokio::test]
async fn finding_03_every_size_is_bounded() {
    let t = TestServer::start_with(|c| {
        c.http.max_upload_size = 1 << 20;
        c.http.max_checksummed_patch = 256 << 10;
        c.http.max_json_body = 2048;
    })
    .await;
    let u = t.user("cy", Role::Uploader).await;
    let study = t.new_study(&u).await;
    // Over Tus-Max-Size at creation.
    expect_error(
        t.create_upload_raw(&u, &study, (1 << 20) + 1, None).await,
        413,
        "RELAY_UPLOAD_TOO_LARGE",
    )
    .await;
    let opt = t
        .http
        .request(Method::OPTIONS, format!("{}/files", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(opt.headers()["tus-max-size"], "1048576");
    // More bytes than Upload-Length.
    let up = t.create_upload(&u, &study, 100_000, None).await;
    expect_error(
        t.patch(&u, &up, 0, vec![0; 100_001], None).await,
        413,
        "RELAY_UPLOAD_OVERFLOW",
    )
    .await;
    // A checksummed PATCH over its cap.
    let up2 = t.create_upload(&u, &study, 1 << 20, None).await;
    let big = vec![1u8; (256 << 10) + 1];
    expect_error(
        t.patch(&u, &up2, 0, big.clone(), Some(sha256_header(&big)))
            .await,
        413,
        "RELAY_PATCH_TOO_LARGE",
    )
    .await;
    assert_eq!(t.head_offset(&u, &up2).await, 0);
    // JSON bodies.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .header("content-type", "application/json")
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "RELAY_BODY_TOO_LARGE").await;
    // A STOW-RS part over the cap.
    let body = [
        b"--B\r\nContent-Type: application/dicom\r\n\r\n".to_vec(),
        vec![0u8; (1 << 20) + 10],
        b"\r\n--B--\r\n".to_vec(),
    ]
    .concat();
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=B",
        )
        .body(body)
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "RELAY_UPLOAD_TOO_LARGE").await;
    t.stop().await;
}

// ---------------------------------------------------------------- #4

/// Finding 4: notification ownership bypass. Every cross-user access to
/// notifications, studies, uploads and events answers 404 (never 403),
/// and no event of one user reaches another's stream.
#[tokio::test]
async fn finding_04_other_users_objects_do_not_exist() {
    let t = TestServer::start().await;
    let a = t.user("alma", Role::Uploader).await;
    let b = t.user("bert", Role::Uploader).await;
    // B listens for events.
    let mut b_stream = t
        .req(Method::GET, "/api/v1/events", &b)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let study = t.new_study(&a).await;
    let data = dicom(None, 64);
    let up = t.upload(&a, &study, &data).await;
    let r = t
        .req(
            Method::POST,
            &format!("/api/v1/studies/{study}/complete"),
            &a,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let list = t.wait_notifications(&a, 1).await;
    let nid = list[0]["id"].as_str().unwrap().to_string();
    let b_page = common::json_of(t.req(Method::GET, "/api/v1/notifications", &b)).await;
    assert!(b_page["items"].as_array().unwrap().is_empty());
    assert!(b_page["next"].is_null());
    let cross = [
        (Method::POST, format!("/api/v1/notifications/{nid}/read")),
        (Method::GET, format!("/api/v1/studies/{study}")),
        (Method::POST, format!("/api/v1/studies/{study}/complete")),
        (Method::DELETE, format!("/api/v1/studies/{study}")),
        (Method::DELETE, up.clone()),
    ];
    for (m, p) in cross {
        let r = t
            .req(m.clone(), &p, &b)
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .unwrap();
        expect_error(r, 404, "RELAY_NOT_FOUND").await;
    }
    let r = t
        .req(Method::HEAD, &up, &b)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = t.patch(&b, &up, 0, vec![0; 10], None).await;
    assert_eq!(r.status(), 404);
    // The owner can mark it read.
    let r = t
        .req(
            Method::POST,
            &format!("/api/v1/notifications/{nid}/read"),
            &a,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // B's stream received nothing but keep-alives (it is read until it
    // stays quiet; whatever arrived is kept).
    let mut got = String::new();
    while let Ok(Some(Ok(c))) =
        tokio::time::timeout(Duration::from_millis(500), b_stream.next()).await
    {
        got.push_str(&String::from_utf8_lossy(&c));
    }
    // The same stream does deliver B's own events.
    let own = t.new_study(&b).await;
    t.upload(&b, &own, &dicom(None, 64)).await;
    let mut mine = String::new();
    while let Ok(Some(Ok(c))) =
        tokio::time::timeout(Duration::from_millis(500), b_stream.next()).await
    {
        mine.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(
        mine.contains(&own),
        "B's stream does not deliver B's events: {mine}"
    );
    assert!(
        !got.contains("data:") && !got.contains(&study),
        "B saw A's events: {got}"
    );
    t.stop().await;
}

// ---------------------------------------------------------------- #6

/// Finding 6: no rate limit on login.
#[tokio::test]
async fn finding_06_login_brute_force_is_throttled() {
    let t = TestServer::start_with(|c| c.auth.login_per_address_per_minute = 1000).await;
    t.add_user("dora", Role::Uploader).await;
    let login = |name: &'static str, pw: &'static str| {
        let http = t.http.clone();
        let url = format!("{}/api/v1/auth/login", t.url);
        async move {
            http.post(url)
                .json(&serde_json::json!({"username": name, "password": pw}))
                .send()
                .await
                .unwrap()
        }
    };
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(
            login("dora", "wrong password guess 1")
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&statuses[..5], &[401; 5]);
    assert!(statuses[5..].iter().all(|&s| s == 429), "{statuses:?}");
    let r = login("dora", "wrong password guess 1").await;
    assert!(r.headers().get("retry-after").is_some());
    expect_error(r, 429, "RELAY_ACCOUNT_LOCKED").await;
    // The right password is refused during the lockout too.
    assert_eq!(login("dora", PASSWORD).await.status(), 429);
    let events = t.audit().await;
    assert!(
        events
            .iter()
            .any(|e| e.action == AuditAction::SecurityAlert),
        "lockout not audited"
    );
    assert!(
        events
            .iter()
            .filter(|e| e.action == AuditAction::Login && e.outcome == AuditOutcome::MinorFailure)
            .count()
            >= 5
    );
    // Unknown user and wrong password look the same.
    let a = login("nobody-here", "wrong password guess 1").await;
    let b = login("dora2", "wrong password guess 1").await;
    assert_eq!(a.status(), b.status());
    assert_eq!(a.text().await.unwrap(), b.text().await.unwrap());
    t.stop().await;

    // Per address: many accounts from one address hit the limit.
    let t = TestServer::start_with(|c| c.auth.login_per_address_per_minute = 5).await;
    let mut last = 0;
    for i in 0..7 {
        let r = t
            .http
            .post(format!("{}/api/v1/auth/login", t.url))
            .json(&serde_json::json!({"username": format!("user{i}"), "password": "x-wrong-password-123"}))
            .send()
            .await
            .unwrap();
        last = r.status().as_u16();
        if i < 5 {
            assert_eq!(last, 401);
        }
    }
    assert_eq!(last, 429);
    t.stop().await;
}

// ---------------------------------------------------------------- #7

/// Finding 7: the access token travelled in the SSE URL.
#[tokio::test]
async fn finding_07_no_credential_in_any_url() {
    let t = TestServer::start().await;
    let u = t.user("eli", Role::Uploader).await;
    for q in [
        "token",
        "access_token",
        "Access_Token",
        "jwt",
        "refresh_token",
    ] {
        for path in ["/api/v1/events", "/api/v1/studies", "/files"] {
            let r = t
                .http
                .get(format!("{}{path}?{q}={}", t.url, u.token))
                .send()
                .await
                .unwrap();
            expect_error(r, 400, "RELAY_CREDENTIAL_IN_URL").await;
        }
    }
    // The header works for fetch-based clients.
    let r = t
        .req(Method::GET, "/api/v1/events", &u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    drop(r);
    // EventSource: a single-use ticket, which is not a token.
    let tk = common::json_of(t.req(Method::POST, "/api/v1/events/ticket", &u)).await;
    let ticket = tk["ticket"].as_str().unwrap();
    assert!(!ticket.starts_with("eyJ"));
    let r = t
        .http
        .get(format!("{}/api/v1/events?ticket={ticket}", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let study = t.new_study(&u).await;
    t.upload(&u, &study, &dicom(None, 64)).await;
    let text = tokio::time::timeout(Duration::from_secs(5), async {
        let mut text = String::new();
        while let Some(Ok(c)) = s.next().await {
            text.push_str(&String::from_utf8_lossy(&c));
            if text.contains("file_completed") {
                break;
            }
        }
        text
    })
    .await
    .unwrap();
    assert!(
        text.contains("upload_progress") && text.contains("file_completed"),
        "{text}"
    );
    let again = t
        .http
        .get(format!("{}/api/v1/events?ticket={ticket}", t.url))
        .send()
        .await
        .unwrap();
    expect_error(again, 401, "RELAY_BAD_TICKET").await;
    // A ticket is not a bearer token.
    let r = t
        .http
        .get(format!("{}/api/v1/studies", t.url))
        .bearer_auth(ticket)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    t.stop().await;
}

// ---------------------------------------------------------------- #8

/// Finding 8: no audit log. Logins (success and failure), refresh,
/// logout, upload, validation failure, completion, forward and data
/// access are all recorded with user, address and outcome.
#[tokio::test]
async fn finding_08_every_action_is_audited() {
    let t = TestServer::start().await;
    let u = t.user("fay", Role::Uploader).await;
    let bad = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&serde_json::json!({"username":"fay","password":"not the password 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    let study = t.new_study(&u).await;
    let data = dicom(None, 64);
    t.upload(&u, &study, &data).await;
    let junk = vec![1u8; 1000];
    let up = t.create_upload(&u, &study, 1000, None).await;
    assert_eq!(t.patch(&u, &up, 0, junk, None).await.status(), 422);
    // A refused file leaves its study with its bytes (the pipeline removes
    // it), so terminating it afterwards finds nothing.
    assert_eq!(
        t.req(Method::DELETE, &up, &u)
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Termination of an unfinished upload is audited as a removal.
    let partial = t.create_upload(&u, &study, 1000, None).await;
    assert_eq!(
        t.req(Method::DELETE, &partial, &u)
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        t.req(Method::GET, &format!("/api/v1/studies/{study}"), &u)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        t.req(
            Method::POST,
            &format!("/api/v1/studies/{study}/complete"),
            &u
        )
        .send()
        .await
        .unwrap()
        .status(),
        202
    );
    // Delivery is the worker's: wait for it before reading the trail.
    t.wait_notifications(&u, 1).await;
    let r = t
        .http
        .post(format!("{}/api/v1/auth/refresh", t.url))
        .json(&serde_json::json!({"refresh_token": u.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        t.req(Method::POST, "/api/v1/auth/logout", &u)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        t.req(Method::GET, "/api/v1/auth/me", &u)
            .send()
            .await
            .unwrap()
            .status(),
        401,
        "token works after logout"
    );
    let events = t.audit().await;
    let has = |a: AuditAction, o: AuditOutcome| {
        events.iter().any(|e| {
            e.action == a
                && e.outcome == o
                && (e.user == u.id
                    || e.user == "anonymous"
                    || e.user == "system"
                    || e.user == "system:outbox")
        })
    };
    for (a, o) in [
        (AuditAction::Login, AuditOutcome::Success),
        (AuditAction::Login, AuditOutcome::MinorFailure),
        (AuditAction::SessionCreated, AuditOutcome::Success),
        (AuditAction::ChunkStored, AuditOutcome::Success),
        (AuditAction::FileCompleted, AuditOutcome::Success),
        (AuditAction::FileRemoved, AuditOutcome::Success),
        (AuditAction::DataAccessed, AuditOutcome::Success),
        (AuditAction::ForwardStarted, AuditOutcome::Success),
        (AuditAction::Forwarded, AuditOutcome::Success),
        (AuditAction::TokenRefreshed, AuditOutcome::Success),
        (AuditAction::Logout, AuditOutcome::Success),
        (AuditAction::ApplicationStart, AuditOutcome::Success),
    ] {
        assert!(has(a, o), "missing audit record {a:?}/{o:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == AuditAction::FileCompleted && e.outcome != AuditOutcome::Success)
    );
    let fwd = events
        .iter()
        .find(|e| e.action == AuditAction::Forwarded)
        .unwrap();
    assert_eq!(fwd.event_id, 110104);
    assert!(fwd.study.is_some(), "forward record names no study");
    assert!(
        events
            .iter()
            .filter(|e| e.user == u.id)
            .all(|e| e.address.as_deref() == Some("127.0.0.1")),
        "client address missing"
    );
    t.stop().await;
}

// ---------------------------------------------------------------- #9

/// Finding 9: weak passwords accepted.
#[tokio::test]
async fn finding_09_weak_passwords_are_refused_and_hashes_are_strong() {
    let t = TestServer::start().await;
    let admin = t.user("root-admin", Role::Admin).await;
    let create = |name: &str, pw: &str| {
        t.req(Method::POST, "/api/v1/users", &admin)
            .json(&serde_json::json!({"username": name, "password": pw, "role": "uploader"}))
            .send()
    };
    for weak in [
        "short",
        "password1234",
        "aaaaaaaaaaaaaaaa",
        "qwertyuiop123",
        "ginny-mcgee",
        "Password123!",
    ] {
        expect_error(
            create("ginny-mcgee", weak).await.unwrap(),
            400,
            "RELAY_WEAK_PASSWORD",
        )
        .await;
    }
    let long: String = "Correct-Horse-Battery-Staple-".repeat(4);
    assert_eq!(create("gil", &long).await.unwrap().status(), 201);
    assert_eq!(create("hal", &long).await.unwrap().status(), 201);
    // No truncation: a prefix of the password does not log in.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&serde_json::json!({"username": "gil", "password": &long[..72]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&serde_json::json!({"username": "gil", "password": long}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let users = common::state_rows(
        &t.data(),
        "SELECT password_hash FROM users WHERE username IN ('gil', 'hal')",
    )
    .await;
    let hashes: Vec<&str> = users.iter().map(|u| u[0].as_str()).collect();
    assert_eq!(hashes.len(), 2);
    assert_ne!(hashes[0], hashes[1], "same password, same hash: no salt");
    for h in hashes {
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    }
    // Only admins create users.
    let up = t.user("ivy", Role::Uploader).await;
    let r = t
        .req(Method::POST, "/api/v1/users", &up)
        .json(&serde_json::json!({"username":"x","password":long,"role":"admin"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "RELAY_FORBIDDEN").await;
    t.stop().await;
}

// ---------------------------------------------------------------- #10

/// Finding 10: permissive CORS.
#[tokio::test]
async fn finding_10_cors_is_closed_by_default_and_exact_when_configured() {
    let t = TestServer::start().await;
    for origin in ["https://evil.example", "null"] {
        let r = t
            .http
            .request(Method::OPTIONS, format!("{}/api/v1/studies", t.url))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none());
        let r = t
            .http
            .get(format!("{}/healthz", t.url))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("access-control-allow-origin").is_none());
    }
    t.stop().await;
    let t = TestServer::start_with(|c| c.http.cors_origins = vec!["https://viewer.example".into()])
        .await;
    for origin in [
        "https://evil.example",
        "null",
        "https://viewer.example.evil.example",
    ] {
        let r = t
            .http
            .get(format!("{}/healthz", t.url))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert!(
            r.headers().get("access-control-allow-origin").is_none(),
            "{origin} allowed"
        );
    }
    let r = t
        .http
        .request(Method::OPTIONS, format!("{}/files", t.url))
        .header("origin", "https://viewer.example")
        .header("access-control-request-method", "PATCH")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://viewer.example"
    );
    assert!(
        r.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );
    t.stop().await;
    // A wildcard is refused at start.
    let mut c = test_config(
        tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .path(),
    );
    c.http.cors_origins = vec!["*".into()];
    assert!(c.validate().is_err());
}

// ---------------------------------------------------------------- #11

/// Finding 10 of the audit ("expiry race"): the cleaner removed uploads
/// that were still active. With a 2 s TTL and a sweep every second, an
/// upload that keeps sending (PATCHes 1 s apart, and one slow PATCH that
/// streams for longer than the TTL) is never expired; an idle one is.
#[tokio::test]
async fn finding_11_expiry_never_removes_an_active_upload() {
    let t = TestServer::start_with(|c| {
        c.limits.session_ttl_secs = 2;
        c.http.sweep_interval_secs = 1;
    })
    .await;
    let u = t.user("jo", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 600); // ~720 KB
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    let piece = 128 << 10;
    let mut offset = 0;
    // PATCHes 1 s apart for longer than the TTL.
    for _ in 0..3 {
        let end = (offset + piece).min(data.len());
        let r = t
            .patch(&u, &up, offset as u64, data[offset..end].to_vec(), None)
            .await;
        assert_eq!(r.status(), 204, "{:?}", r.text().await);
        offset = end;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // One slow PATCH streaming the rest over ~3 s (longer than the TTL).
    let rest = data[offset..].to_vec();
    let parts: Vec<Vec<u8>> = rest
        .chunks(rest.len() / 6 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    let stream = futures::stream::iter(parts).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok::<_, std::io::Error>(bytes::Bytes::from(p))
    });
    let r = t
        .req(Method::PATCH, &up, &u)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", offset.to_string())
        .header("content-type", "application/offset+octet-stream")
        .header("content-length", rest.len().to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    assert_eq!(t.head_offset(&u, &up).await, data.len() as u64);
    // An idle session does expire.
    let idle = t.new_study(&u).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = t
        .req(Method::GET, &format!("/api/v1/studies/{idle}"), &u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "idle session was not expired");
    t.stop().await;
}

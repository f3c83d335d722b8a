//! Every denied access is audited once, aggregated (issue 11 item 6):
//! refused tokens as User Authentication failures, cross-user attempts on
//! studies, uploads and reports and uploaders on admin routes as Security
//! Alerts. Each request of the matrix answers as before (401/403/404) and
//! leaves exactly one record; the same request again in the same minute
//! adds none, and closing the minute adds one summary with `count=2`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;

use common::{TestServer, User};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome};
use relaypacs_http::auth::Role;
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A token for `sub` signed with `key`, expiring at `exp`.
fn token(key: &[u8], t: &TestServer, sub: &str, exp: i64) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "sub": sub, "role": "uploader", "sid": "f", "iss": t.config.auth.issuer,
        "aud": t.config.auth.audience, "iat": now - 7200, "nbf": now - 7200, "exp": exp,
        "jti": "j",
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// The server's signing key (as `Tokens::new` derives it).
fn server_key(t: &TestServer) -> Vec<u8> {
    Sha256::new()
        .chain_update(b"relaypacs/jwt/v1\0")
        .chain_update(t.secret.as_bytes())
        .finalize()
        .to_vec()
}

struct Case {
    name: &'static str,
    send: Box<dyn Fn() -> RequestBuilder>,
    status: u16,
    user: String,
    action: AuditAction,
    /// Text the record's detail names (the attempt and the object).
    names: Vec<String>,
}

async fn new_records(t: &TestServer, before: usize) -> Vec<AuditEvent> {
    t.audit().await.split_off(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_denied_access_of_the_matrix_leaves_one_aggregated_record() {
    let t = TestServer::start().await;
    let ann = t.user("ann", Role::Uploader).await;
    let eve = t.user("eve", Role::Uploader).await;
    let mal = t.user("mal", Role::Uploader).await;
    // One object per case, so that no two cases share an aggregation key.
    let mut studies = Vec::new();
    for _ in 0..5 {
        studies.push(t.new_study(&ann).await);
    }
    let mut uploads = Vec::new();
    for _ in 0..3 {
        let study = t.new_study(&ann).await;
        uploads.push(t.create_upload(&ann, &study, 1000, None).await);
    }
    let upload_object = |path: &str| {
        let hex = path.trim_start_matches("/files/").to_string();
        (hex[..32].to_string(), hex[32..].to_string())
    };

    // Every denial from here on happens in one fixed minute.
    let denials_at = time::OffsetDateTime::now_utc();
    t.server()
        .state()
        .pipeline()
        .denials()
        .set_clock(Arc::new(move || denials_at));

    let base = Arc::new(t.url.clone());
    let http = t.http.clone();
    let with = move |method: Method, path: String, bearer: String| {
        let (http, base) = (http.clone(), base.clone());
        Box::new(move || {
            http.request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&bearer)
        }) as Box<dyn Fn() -> RequestBuilder>
    };
    let as_user = |u: &User| u.token.clone();
    let addr = "address 127.0.0.1".to_string();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let forged = token(b"not the server's key", &t, &eve.id, now + 600);
    let expired = token(&server_key(&t), &t, &mal.id, now - 3600);
    let session = |sid: &str| format!("session {sid}");
    let tus = |m: Method, path: &str| {
        let patch = m == Method::PATCH;
        let b = with(m, path.to_string(), as_user(&eve));
        Box::new(move || {
            let r = b().header("tus-resumable", "1.0.0");
            if patch {
                r.header("content-type", "application/offset+octet-stream")
                    .header("upload-offset", "0")
                    .body(vec![0u8; 10])
            } else {
                r
            }
        }) as Box<dyn Fn() -> RequestBuilder>
    };
    let file_case = |name: &'static str, m: Method, i: usize, attempt: &str| {
        let (s, f) = upload_object(&uploads[i]);
        Case {
            name,
            send: tus(m, &uploads[i]),
            status: 404,
            user: eve.id.clone(),
            action: AuditAction::SecurityAlert,
            names: vec![attempt.to_string(), format!("file {f}"), s],
        }
    };
    let admin = |name: &'static str, m: Method, path: &str, template: &str| Case {
        name,
        send: {
            let b = with(m, path.to_string(), as_user(&eve));
            Box::new(move || {
                b().json(&json!({"username": "zed", "password": "x", "role": "admin"}))
            })
        },
        status: 403,
        user: eve.id.clone(),
        action: AuditAction::SecurityAlert,
        names: vec!["admin_route".into(), format!("route {template}")],
    };
    let cross = |name: &'static str, m: Method, path: String, sid: &str, attempt: &str| Case {
        name,
        send: with(m, path, as_user(&eve)),
        status: 404,
        user: eve.id.clone(),
        action: AuditAction::SecurityAlert,
        names: vec![attempt.into(), session(sid)],
    };
    let cases = vec![
        Case {
            name: "forged token",
            send: with(Method::GET, "/api/v1/studies".into(), forged),
            status: 401,
            user: eve.id.clone(),
            action: AuditAction::Login,
            names: vec!["bearer_token".into(), addr.clone()],
        },
        Case {
            name: "expired token",
            send: with(Method::GET, "/api/v1/studies".into(), expired),
            status: 401,
            user: mal.id.clone(),
            action: AuditAction::Login,
            names: vec!["bearer_token".into(), addr.clone()],
        },
        Case {
            name: "garbage token",
            send: with(Method::GET, "/api/v1/studies".into(), "garbage".into()),
            status: 401,
            user: "anonymous".into(),
            action: AuditAction::Login,
            names: vec!["bearer_token".into(), addr.clone()],
        },
        cross(
            "study read",
            Method::GET,
            format!("/api/v1/studies/{}", studies[0]),
            &studies[0],
            "read_session",
        ),
        cross(
            "study complete",
            Method::POST,
            format!("/api/v1/studies/{}/complete", studies[1]),
            &studies[1],
            "denied ",
        ),
        cross(
            "study delete",
            Method::DELETE,
            format!("/api/v1/studies/{}", studies[2]),
            &studies[2],
            "abort_session",
        ),
        cross(
            "report list",
            Method::GET,
            format!("/api/v1/studies/{}/reports", studies[3]),
            &studies[3],
            "read_session",
        ),
        cross(
            "report download",
            Method::GET,
            format!("/api/v1/studies/{}/reports/1.2.3.4", studies[4]),
            &studies[4],
            "read_report",
        ),
        file_case("tus HEAD", Method::HEAD, 0, "file_status"),
        file_case("tus PATCH", Method::PATCH, 1, "denied "),
        file_case("tus DELETE", Method::DELETE, 2, "denied "),
        admin(
            "admin outbox",
            Method::GET,
            "/api/v1/admin/outbox",
            "GET /api/v1/admin/outbox",
        ),
        admin(
            "admin dead letters",
            Method::GET,
            "/api/v1/admin/dead-letters",
            "GET /api/v1/admin/dead-letters",
        ),
        admin(
            "admin replay",
            Method::POST,
            "/api/v1/admin/dead-letters/x/replay",
            "POST /api/v1/admin/dead-letters/{id}/replay",
        ),
        admin(
            "audit trail",
            Method::GET,
            "/api/v1/audit",
            "GET /api/v1/audit",
        ),
        admin(
            "user list",
            Method::GET,
            "/api/v1/users",
            "GET /api/v1/users",
        ),
        admin(
            "user creation",
            Method::POST,
            "/api/v1/users",
            "POST /api/v1/users",
        ),
    ];

    let mut firsts = Vec::new();
    for c in &cases {
        let before = t.audit().await.len();
        let r = (c.send)().send().await.unwrap();
        assert_eq!(r.status().as_u16(), c.status, "{}", c.name);
        let new = new_records(&t, before).await;
        assert_eq!(new.len(), 1, "{}: {new:#?}", c.name);
        let e = &new[0];
        assert_eq!(e.user, c.user, "{}", c.name);
        assert_eq!(e.action, c.action, "{}", c.name);
        assert_eq!(e.outcome, AuditOutcome::MinorFailure, "{}", c.name);
        assert!(e.detail.contains("count=1"), "{}: {}", c.name, e.detail);
        for n in &c.names {
            assert!(
                e.detail.contains(n.as_str()),
                "{}: {n} in {}",
                c.name,
                e.detail
            );
        }
        if c.action == AuditAction::Login {
            assert_eq!(e.address.as_deref(), Some("127.0.0.1"), "{}", c.name);
        }
        // The key of the record: "denied <attempt> on <object>".
        let key = e.detail.split(':').next().unwrap().to_string();
        firsts.push(key);
        // The same request again within the minute: counted, not recorded.
        let before = t.audit().await.len();
        let r = (c.send)().send().await.unwrap();
        assert_eq!(r.status().as_u16(), c.status, "{} again", c.name);
        let again = new_records(&t, before).await;
        assert!(again.is_empty(), "{} again: {again:#?}", c.name);
    }

    // Closing the minute: one summary with count=2 per case.
    let before = t.audit().await.len();
    let written = t
        .server()
        .state()
        .pipeline()
        .denials()
        .flush_at(denials_at + time::Duration::seconds(61))
        .await
        .unwrap();
    assert_eq!(written, cases.len());
    let summaries = new_records(&t, before).await;
    assert_eq!(summaries.len(), cases.len());
    for (c, key) in cases.iter().zip(&firsts) {
        let of: Vec<&AuditEvent> = summaries
            .iter()
            .filter(|e| e.user == c.user && e.detail.split(':').next() == Some(key.as_str()))
            .collect();
        assert_eq!(of.len(), 1, "{}: {summaries:#?}", c.name);
        assert!(
            of[0].detail.contains("count=2"),
            "{}: {}",
            c.name,
            of[0].detail
        );
        assert!(of[0].detail.contains("summary"), "{}", c.name);
    }
    // The owner's things are untouched.
    let r = t
        .req(
            Method::GET,
            &format!("/api/v1/studies/{}", studies[2]),
            &ann,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _: Value = r.json().await.unwrap();
    t.stop().await;
}

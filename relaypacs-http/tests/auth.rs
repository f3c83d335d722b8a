//! AUTH-2/3/6/7: the JWT validation matrix, refresh rotation with reuse
//! detection, TOTP, logout and password change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};

fn key(secret: &str) -> Vec<u8> {
    Sha256::new()
        .chain_update(b"relaypacs/jwt/v1\0")
        .chain_update(secret.as_bytes())
        .finalize()
        .to_vec()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// AUTH-2: none of these tokens reaches a handler; each gets 401 JSON
/// with a WWW-Authenticate challenge.
#[tokio::test]
async fn jwt_matrix_rejects_every_forgery() {
    let t = TestServer::start().await;
    let u = t.user("tara", Role::Admin).await;
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let sid = decode_sid(&u.token);
        let mut c = json!({"sub": u.id, "role": "admin", "sid": sid, "iss": "relaypacs", "aud": "relaypacs-api",
            "iat": now(), "nbf": now(), "exp": now() + 600, "jti": "x"});
        f(&mut c);
        c
    };
    let k = key(&t.secret);
    let sign = |h: Header, c: serde_json::Value, key: &[u8]| {
        jsonwebtoken::encode(&h, &c, &EncodingKey::from_secret(key)).unwrap()
    };
    let at = || {
        let mut h = Header::new(Algorithm::HS256);
        h.typ = Some("at+jwt".into());
        h
    };
    // Sanity: a correctly forged token with the real key works, so the
    // rejections below are about the one thing each case changes.
    let good = sign(at(), claims(&|_| {}), &k);
    assert_eq!(t.me(&good).await.status(), 200);
    let none = {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            e.encode(r#"{"alg":"none","typ":"at+jwt"}"#),
            e.encode(claims(&|_| {}).to_string())
        )
    };
    let mut hs384 = Header::new(Algorithm::HS384);
    hs384.typ = Some("at+jwt".into());
    let mut jwt_typ = Header::new(Algorithm::HS256);
    jwt_typ.typ = Some("JWT".into());
    let mut jku = at();
    jku.jku = Some("https://evil.example/keys".into());
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none),
        (
            "wrong key",
            sign(
                at(),
                claims(&|_| {}),
                b"another-key-another-key-another-key",
            ),
        ),
        (
            "secret used directly as key",
            sign(at(), claims(&|_| {}), t.secret.as_bytes()),
        ),
        ("HS384", sign(hs384, claims(&|_| {}), &k)),
        (
            "typ JWT (not an access token)",
            sign(jwt_typ, claims(&|_| {}), &k),
        ),
        ("jku header", sign(jku, claims(&|_| {}), &k)),
        (
            "expired",
            sign(at(), claims(&|c| c["exp"] = json!(now() - 30)), &k),
        ),
        (
            "nbf in the future",
            sign(at(), claims(&|c| c["nbf"] = json!(now() + 600)), &k),
        ),
        (
            "no exp",
            sign(
                at(),
                claims(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                &k,
            ),
        ),
        (
            "wrong iss",
            sign(at(), claims(&|c| c["iss"] = json!("someone-else")), &k),
        ),
        (
            "wrong aud",
            sign(at(), claims(&|c| c["aud"] = json!("other-api")), &k),
        ),
        (
            "no aud",
            sign(
                at(),
                claims(&|c| {
                    c.as_object_mut().unwrap().remove("aud");
                }),
                &k,
            ),
        ),
        (
            "unknown family",
            sign(at(), claims(&|c| c["sid"] = json!("nope")), &k),
        ),
        (
            "unknown user",
            sign(
                at(),
                claims(&|c| c["sub"] = json!("0123456789abcdef0123456789abcdef")),
                &k,
            ),
        ),
        ("refresh token as access token", u.refresh.clone()),
        ("garbage", "not.a.token".into()),
        ("4 KiB token", "a".repeat(5000)),
    ];
    for (name, token) in cases {
        let r = t.me(&token).await;
        assert!(r.headers().get("www-authenticate").is_some(), "{name}");
        expect_error(r, 401, "RELAY_UNAUTHENTICATED").await;
    }
    // A 100 KiB header never reaches the parser: the head limit answers.
    let r = t.me(&"a".repeat(100 << 10)).await;
    assert_eq!(r.status(), 431);
    t.stop().await;
}

fn decode_sid(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    v["sid"].as_str().unwrap().to_string()
}

/// AUTH-3: rotation, reuse detection revoking the family (with a security
/// alert), parallel refresh with one winner, logout.
#[tokio::test]
async fn refresh_rotation_and_reuse_detection() {
    let t = TestServer::start().await;
    let u = t.user("uma", Role::Uploader).await;
    let r1 = u.refresh.clone();
    let p2: serde_json::Value = t.refresh(&r1).await.json().await.unwrap();
    let r2 = p2["refresh_token"].as_str().unwrap().to_string();
    let a2 = p2["access_token"].as_str().unwrap().to_string();
    assert_ne!(r1, r2);
    // Reuse of R1: refused, and the family (R2, A2) dies with it.
    expect_error(t.refresh(&r1).await, 401, "RELAY_REFRESH_REUSED").await;
    expect_error(t.refresh(&r2).await, 401, "RELAY_REFRESH_INVALID").await;
    let r = t.me(&a2).await;
    assert_eq!(r.status(), 401);
    assert!(
        t.audit()
            .await
            .iter()
            .any(|e| e.action == relaypacs_core::AuditAction::SecurityAlert && e.user == u.id)
    );
    // Parallel refresh of one token: exactly one success.
    let fresh: serde_json::Value = t.login("uma").await;
    let rt = fresh["refresh_token"].as_str().unwrap().to_string();
    let (x, y) = tokio::join!(t.refresh(&rt), t.refresh(&rt));
    let mut s = [x.status().as_u16(), y.status().as_u16()];
    s.sort_unstable();
    assert_eq!(s, [200, 401]);
    // Logout revokes the login: its access and refresh tokens stop working.
    let l: serde_json::Value = t.login("uma").await;
    let (a, rr) = (
        l["access_token"].as_str().unwrap(),
        l["refresh_token"].as_str().unwrap(),
    );
    assert_eq!(
        t.http
            .post(format!("{}/api/v1/auth/logout", t.url))
            .bearer_auth(a)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(t.me(a).await.status(), 401);
    assert_eq!(t.refresh(rr).await.status(), 401);
    // Refresh tokens are stored hashed only (nowhere in the files or the
    // state database's rows).
    let stored = format!("{:?}", stored_snapshot(&t.data()).await);
    assert!(!stored.contains(rr) && !stored.contains(&r2));
    t.stop().await;
}

/// Refresh tokens stop working after the idle timeout.
#[tokio::test]
async fn refresh_idle_timeout() {
    let t = TestServer::start_with(|c| {
        c.auth.refresh_idle_secs = 1;
        c.auth.refresh_absolute_secs = 1;
    })
    .await;
    let u = t.user("vic", Role::Uploader).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    expect_error(t.refresh(&u.refresh).await, 401, "RELAY_REFRESH_INVALID").await;
    t.stop().await;
}

/// AUTH-6: TOTP enrolment, login with the second factor, a code used
/// once only, password change revoking every login.
#[tokio::test]
async fn totp_second_factor_and_password_change() {
    let t = TestServer::start().await;
    let u = t.user("wen", Role::Radiologist).await;
    let e = common::json_of(t.req(Method::POST, "/api/v1/auth/totp", &u)).await;
    let totp = common::totp(e["secret"].as_str().unwrap(), "wen");
    let code = totp.generate_current().unwrap();
    let r = t
        .req(Method::POST, "/api/v1/auth/totp/confirm", &u)
        .json(&json!({"code": "000000"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "RELAY_TOTP_INVALID").await;
    assert_eq!(
        t.req(Method::POST, "/api/v1/auth/totp/confirm", &u)
            .json(&json!({"code": code}))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    // The secret is stored encrypted.
    let users = format!("{:?}", stored_snapshot(&t.data()).await);
    assert!(!users.contains(e["secret"].as_str().unwrap()));
    assert_eq!(t.login_response("wen", None).await.status(), 401);
    // The confirmation used the current step: wait for the next one.
    let step = time::OffsetDateTime::now_utc().unix_timestamp() / 30;
    while time::OffsetDateTime::now_utc().unix_timestamp() / 30 == step {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let code = totp.generate_current().unwrap();
    let ok = t.login_response("wen", Some(code.clone())).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(
        t.login_response("wen", Some(code)).await.status(),
        401,
        "a TOTP code worked twice"
    );
    let tok: serde_json::Value = ok.json().await.unwrap();
    let a = tok["access_token"].as_str().unwrap();
    let r = t
        .http
        .post(format!("{}/api/v1/auth/password", t.url))
        .bearer_auth(a)
        .json(&json!({"current": PASSWORD, "new": "Quiet-Lantern-Harbor-9042"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(t.me(a).await.status(), 401);
    assert_eq!(
        t.req(Method::GET, "/api/v1/auth/me", &u)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    t.stop().await;
}

//! The browser's refresh flow: refresh token in an `HttpOnly` cookie
//! scoped to the refresh route, CSRF token bound to it, same-origin check,
//! rotation and reuse detection as in the JSON flow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use relaypacs_http::auth::Role;
use reqwest::header::{HeaderMap, SET_COOKIE};
use serde_json::{Value, json};

/// The `Set-Cookie` header of cookie `name`.
fn set_cookie(h: &HeaderMap, name: &str) -> String {
    h.get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no Set-Cookie for {name} in {h:?}"))
}

/// The value a `Set-Cookie` header sets.
fn value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string()
}

struct Login {
    refresh: String,
    csrf: String,
    access: String,
}

async fn cookie_login(t: &TestServer, name: &str) -> Login {
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&json!({"username": name, "password": PASSWORD, "cookie": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rc = set_cookie(r.headers(), "relaypacs_refresh");
    let cc = set_cookie(r.headers(), "relaypacs_csrf");
    let body: Value = r.json().await.unwrap();
    assert!(body.get("refresh_token").is_none(), "{body}");
    assert_eq!(body["csrf_token"].as_str().unwrap(), value(&cc));
    Login {
        refresh: value(&rc),
        csrf: value(&cc),
        access: body["access_token"].as_str().unwrap().to_string(),
    }
}

/// A cookie refresh as a page of the gateway's own origin sends it.
async fn cookie_refresh(
    t: &TestServer,
    refresh: &str,
    csrf: Option<&str>,
    origin: &str,
) -> reqwest::Response {
    let mut b = t
        .http
        .post(format!("{}/api/v1/auth/refresh", t.url))
        .header(
            "cookie",
            format!("relaypacs_refresh={refresh}; relaypacs_csrf=x"),
        )
        .header("origin", origin)
        .json(&json!({}));
    if let Some(c) = csrf {
        b = b.header("x-csrf-token", c);
    }
    b.send().await.unwrap()
}

#[tokio::test]
async fn cookie_login_sets_scoped_httponly_refresh_cookie() {
    let t = TestServer::start().await;
    t.add_user("cora", Role::Uploader).await;
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&json!({"username": "cora", "password": PASSWORD, "cookie": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let rc = set_cookie(r.headers(), "relaypacs_refresh");
    let attrs: Vec<&str> = rc.split(';').map(str::trim).collect();
    for want in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/api/v1/auth/refresh",
    ] {
        assert!(attrs.contains(&want), "{want} missing in {rc}");
    }
    assert!(value(&rc).starts_with("rt_"));
    let cc = set_cookie(r.headers(), "relaypacs_csrf");
    let attrs: Vec<&str> = cc.split(';').map(str::trim).collect();
    for want in ["Secure", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&want), "{want} missing in {cc}");
    }
    assert!(!attrs.contains(&"HttpOnly"), "the page must read {cc}");
    // The JSON flow is unchanged: no cookie, the refresh token in the body.
    let j = t.login("cora").await;
    assert!(j["refresh_token"].as_str().unwrap().starts_with("rt_"));
    assert!(j.get("csrf_token").is_none());
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .json(&json!({"username": "cora", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get(SET_COOKIE).is_none());
}

#[tokio::test]
async fn cookie_refresh_needs_csrf_and_same_origin_and_rotates() {
    let t = TestServer::start().await;
    t.add_user("cleo", Role::Uploader).await;
    let l = cookie_login(&t, "cleo").await;
    let origin = t.url.clone();
    // No CSRF header, a wrong one, another login's: 403 JSON, cookies cleared.
    let r = cookie_refresh(&t, &l.refresh, None, &origin).await;
    let cleared = set_cookie(r.headers(), "relaypacs_refresh");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    expect_error(r, 403, "RELAY_CSRF").await;
    let other = cookie_login(&t, "cleo").await;
    expect_error(
        cookie_refresh(&t, &l.refresh, Some(&other.csrf), &origin).await,
        403,
        "RELAY_CSRF",
    )
    .await;
    expect_error(
        cookie_refresh(&t, &l.refresh, Some("x"), &origin).await,
        403,
        "RELAY_CSRF",
    )
    .await;
    // Another site, or no origin at all: 403 even with the right token.
    expect_error(
        cookie_refresh(&t, &l.refresh, Some(&l.csrf), "http://evil.example").await,
        403,
        "RELAY_CROSS_ORIGIN",
    )
    .await;
    let r = t
        .http
        .post(format!("{}/api/v1/auth/refresh", t.url))
        .header("cookie", format!("relaypacs_refresh={}", l.refresh))
        .header("x-csrf-token", &l.csrf)
        .header("origin", &origin)
        .header("sec-fetch-site", "cross-site")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "RELAY_CROSS_ORIGIN").await;
    // Each refusal is a security alert in the audit trail.
    let alerts = t
        .audit()
        .await
        .into_iter()
        .filter(|e| {
            e.action == relaypacs_core::AuditAction::SecurityAlert
                && e.detail.starts_with("cookie refresh refused")
        })
        .count();
    assert_eq!(alerts, 5, "CSRF and cross-origin refusals audited");
    // No cookie and no token in the body: 401.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/refresh", t.url))
        .header("origin", &origin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "RELAY_REFRESH_INVALID").await;
    // None of the refused attempts used the token: the right request rotates it.
    let r = cookie_refresh(&t, &l.refresh, Some(&l.csrf), &origin).await;
    assert_eq!(r.status(), 200);
    let rc2 = value(&set_cookie(r.headers(), "relaypacs_refresh"));
    let cc2 = value(&set_cookie(r.headers(), "relaypacs_csrf"));
    let body: Value = r.json().await.unwrap();
    assert_ne!(rc2, l.refresh);
    assert_ne!(cc2, l.csrf);
    assert_eq!(body["csrf_token"].as_str().unwrap(), cc2);
    let a2 = body["access_token"].as_str().unwrap().to_string();
    let me = t.me(&a2).await;
    assert_eq!(me.status(), 200);
    // The new CSRF token does not open the old cookie, nor the old one the new.
    expect_error(
        cookie_refresh(&t, &rc2, Some(&l.csrf), &origin).await,
        403,
        "RELAY_CSRF",
    )
    .await;
    // Sec-Fetch-Site alone (no Origin) from the same origin is accepted.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/refresh", t.url))
        .header("cookie", format!("relaypacs_refresh={rc2}"))
        .header("x-csrf-token", &cc2)
        .header("sec-fetch-site", "same-origin")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rc3 = value(&set_cookie(r.headers(), "relaypacs_refresh"));
    let cc3 = value(&set_cookie(r.headers(), "relaypacs_csrf"));
    drop((l.access, a2));
    // Reuse of a rotated-out cookie (with its own valid CSRF token):
    // refused, and the whole login is revoked, as in the JSON flow.
    expect_error(
        cookie_refresh(&t, &rc2, Some(&cc2), &origin).await,
        401,
        "RELAY_REFRESH_REUSED",
    )
    .await;
    expect_error(
        cookie_refresh(&t, &rc3, Some(&cc3), &origin).await,
        401,
        "RELAY_REFRESH_INVALID",
    )
    .await;
    assert!(
        t.audit()
            .await
            .iter()
            .any(|e| e.action == relaypacs_core::AuditAction::SecurityAlert)
    );
    // The other login of the same user is untouched.
    assert_eq!(
        cookie_refresh(&t, &other.refresh, Some(&other.csrf), &origin)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn logout_clears_the_cookies() {
    let t = TestServer::start().await;
    t.add_user("cato", Role::Uploader).await;
    let l = cookie_login(&t, "cato").await;
    let r = t
        .http
        .post(format!("{}/api/v1/auth/logout", t.url))
        .bearer_auth(&l.access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for name in ["relaypacs_refresh", "relaypacs_csrf"] {
        let c = set_cookie(r.headers(), name);
        assert!(c.contains("Max-Age=0") && value(&c).is_empty(), "{c}");
    }
    assert!(set_cookie(r.headers(), "relaypacs_refresh").contains("Path=/api/v1/auth/refresh"));
    expect_error(
        cookie_refresh(&t, &l.refresh, Some(&l.csrf), &t.url).await,
        401,
        "RELAY_REFRESH_INVALID",
    )
    .await;
}

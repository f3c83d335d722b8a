//! Account administration through the server: an admin disables an
//! account (its tokens and logins stop working at once), enables it again,
//! resets a lost second factor; an admin cannot disable themselves; a
//! non-admin is refused and the attempt audited; every change audited.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use common::{TestServer, User, expect_error};
use relaypacs_core::{AuditAction, AuditOutcome};
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::{Value, json};

async fn post(t: &TestServer, who: &User, path: &str) -> reqwest::Response {
    t.req(Method::POST, path, who).send().await.unwrap()
}

async fn me(t: &TestServer, who: &User) -> u16 {
    t.req(Method::GET, "/api/v1/auth/me", who)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn an_admin_disables_and_enables_an_account() {
    let t = TestServer::start().await;
    let admin = t.user("boss", Role::Admin).await;
    let u = t.user("clinic", Role::Uploader).await;
    // A second login of the same account (another device).
    let second = t
        .login_response("clinic", None)
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(me(&t, &u).await, 200);

    // A non-admin is refused, audited as a Security Alert.
    let other = t.user("nosy", Role::Uploader).await;
    let r = post(&t, &other, &format!("/api/v1/users/{}/disable", u.id)).await;
    expect_error(r, 403, "RELAY_FORBIDDEN").await;
    assert_eq!(me(&t, &u).await, 200, "nothing changed");

    // An admin cannot disable themselves.
    let r = post(&t, &admin, &format!("/api/v1/users/{}/disable", admin.id)).await;
    expect_error(r, 409, "RELAY_SELF_DISABLE").await;
    assert_eq!(me(&t, &admin).await, 200);
    // An unknown account: 404.
    let r = post(&t, &admin, "/api/v1/users/nobody/disable").await;
    expect_error(r, 404, "RELAY_NOT_FOUND").await;

    let r = post(&t, &admin, &format!("/api/v1/users/{}/disable", u.id)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["id"].as_str(), v["disabled"].as_bool()),
        (Some(u.id.as_str()), Some(true))
    );
    // At once: the access token, both logins' refresh tokens, a new login.
    assert_eq!(me(&t, &u).await, 401);
    assert_eq!(t.refresh(&u.refresh).await.status(), 401);
    assert_eq!(
        t.refresh(second["refresh_token"].as_str().unwrap())
            .await
            .status(),
        401
    );
    assert_eq!(t.login_response("clinic", None).await.status(), 401);
    // Disabling again changes nothing and is not an error.
    let r = post(&t, &admin, &format!("/api/v1/users/{}/disable", u.id)).await;
    assert_eq!(r.status(), 200);

    let r = post(&t, &admin, &format!("/api/v1/users/{}/enable", u.id)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["disabled"], false);
    assert_eq!(t.login_response("clinic", None).await.status(), 200);
    // The logins revoked at disabling stay revoked.
    assert_eq!(t.refresh(&u.refresh).await.status(), 401);

    let audit = t.audit().await;
    let changed = |what: &str| {
        audit
            .iter()
            .filter(|e| {
                e.action == AuditAction::UserChanged
                    && e.user == admin.id
                    && e.outcome == AuditOutcome::Success
                    && e.detail.contains(&format!("user {} {what}", u.id))
            })
            .count()
    };
    assert_eq!(changed("disabled"), 1, "{audit:#?}");
    assert_eq!(changed("enabled"), 1, "{audit:#?}");
    assert!(
        audit.iter().any(|e| e.action == AuditAction::SecurityAlert
            && e.user == other.id
            && e.detail.contains("POST /api/v1/users/{id}/disable")),
        "{audit:#?}"
    );
    t.stop().await;
}

#[tokio::test]
async fn an_admin_resets_a_lost_second_factor() {
    let t = TestServer::start().await;
    let admin = t.user("boss", Role::Admin).await;
    let u = t.user("wen", Role::Radiologist).await;
    let e: Value = post(&t, &u, "/api/v1/auth/totp")
        .await
        .json()
        .await
        .unwrap();
    let totp = common::totp(e["secret"].as_str().unwrap(), "wen");
    let r = t
        .req(Method::POST, "/api/v1/auth/totp/confirm", &u)
        .json(&json!({"code": totp.generate_current().unwrap()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        t.login_response("wen", None).await.status(),
        401,
        "a code is needed"
    );

    // Refused for a non-admin (the user themselves included).
    let r = post(&t, &u, &format!("/api/v1/users/{}/reset-totp", u.id)).await;
    expect_error(r, 403, "RELAY_FORBIDDEN").await;

    // Tokens are compared by the second they were issued in.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = post(&t, &admin, &format!("/api/v1/users/{}/reset-totp", u.id)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["totp"], false);
    assert_eq!(me(&t, &u).await, 401, "the old logins are revoked");
    assert_eq!(t.refresh(&u.refresh).await.status(), 401);
    let r = t.login_response("wen", None).await;
    assert_eq!(
        r.status(),
        200,
        "no code needed until the user enrols again"
    );
    let tok: Value = r.json().await.unwrap();
    let again = User {
        id: u.id.clone(),
        token: tok["access_token"].as_str().unwrap().into(),
        refresh: tok["refresh_token"].as_str().unwrap().into(),
    };
    // The user can enrol a new second factor.
    assert_eq!(post(&t, &again, "/api/v1/auth/totp").await.status(), 200);

    let audit = t.audit().await;
    assert!(
        audit.iter().any(|e| e.action == AuditAction::UserChanged
            && e.user == admin.id
            && e.detail
                .contains(&format!("second factor of user {} reset", u.id))),
        "{audit:#?}"
    );
    t.stop().await;
}

/// The store's conditional updates, on SQLite and PostgreSQL, from two
/// pools (two gateways) at once: of two disablings exactly one changes the
/// account; enabling leaves the token cut-off; a reset clears both TOTP
/// secrets.
async fn store_changes(url: &str) {
    use relaypacs_http::auth::{SqlUserStore, UserStore};
    use relaypacs_storage::{SqlOptions, SqlState};
    let options = SqlOptions::default();
    let a = SqlUserStore::new(SqlState::connect(url, None, &options).await.unwrap());
    let b = SqlUserStore::new(SqlState::connect(url, None, &options).await.unwrap());
    for i in 0..20 {
        let mut rec = relaypacs_http::routes::auth::new_record(
            &format!("acct{i}"),
            Role::Uploader,
            "$argon2id$v=19$m=19456,t=2,p=1$x$y".into(),
        );
        rec.totp = Some("sealed-secret".into());
        rec.totp_pending = Some("sealed-pending".into());
        let id = rec.id.clone();
        let before = rec.tokens_valid_after;
        a.create(rec).await.unwrap();
        let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(5);
        let (x, y) = tokio::join!(a.set_disabled(&id, true, at), b.set_disabled(&id, true, at));
        assert_eq!(
            [x.unwrap(), y.unwrap()].iter().filter(|c| **c).count(),
            1,
            "exactly one disabling changes the account"
        );
        let got = b.by_id(&id).await.unwrap().unwrap();
        assert!(got.disabled);
        assert_eq!(got.tokens_valid_after.unix_timestamp(), at.unix_timestamp());
        assert_ne!(got.tokens_valid_after, before);
        let later = at + time::Duration::seconds(60);
        assert!(b.set_disabled(&id, false, later).await.unwrap());
        assert!(!a.set_disabled(&id, false, later).await.unwrap());
        let got = a.by_id(&id).await.unwrap().unwrap();
        assert!(!got.disabled);
        assert_eq!(
            got.tokens_valid_after.unix_timestamp(),
            at.unix_timestamp(),
            "enabling keeps the cut-off"
        );
        assert!(a.reset_totp(&id, later).await.unwrap());
        let got = b.by_id(&id).await.unwrap().unwrap();
        assert_eq!((got.totp, got.totp_pending), (None, None));
        assert_eq!(
            got.tokens_valid_after.unix_timestamp(),
            later.unix_timestamp()
        );
    }
    assert!(
        !a.reset_totp("nobody", time::OffsetDateTime::now_utc())
            .await
            .unwrap()
    );
    assert!(
        !a.set_disabled("nobody", true, time::OffsetDateTime::now_utc())
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_changes_are_conditional_on_sqlite() {
    let dir = tempfile::TempDir::new().unwrap();
    store_changes(&format!(
        "sqlite://{}",
        dir.path().join("state.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_changes_are_conditional_on_postgresql() {
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
        .await
        .unwrap();
    store_changes(&pg.create_database("relay")).await;
    drop(pg);
}

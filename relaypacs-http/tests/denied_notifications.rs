//! Another user's notification (issue 11 item 6): marking it read answers
//! 404 exactly as an unknown id does, and is audited once as a Security
//! Alert naming the actor and the notification — also after a restart,
//! when the owner is known only from the files; an unknown id is not
//! recorded (its objects would be unbounded).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use common::TestServer;
use relaypacs_core::AuditAction;
use relaypacs_http::auth::Role;
use relaypacs_http::notify::NotificationKind;
use reqwest::Method;

async fn alerts_naming(t: &TestServer, id: &str) -> usize {
    t.audit()
        .await
        .iter()
        .filter(|e| e.action == AuditAction::SecurityAlert && e.detail.contains(id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_notification_is_404_and_audited_once() {
    let mut t = TestServer::start().await;
    let owner = t.user("nora", Role::Uploader).await;
    let other = t.user("otto", Role::Uploader).await;
    let n = t
        .server()
        .state()
        .hub()
        .notify(&owner.id, NotificationKind::Delivered, "s", "delivered")
        .await
        .unwrap();

    let path = format!("/api/v1/notifications/{}/read", n.id);
    let r = t.req(Method::POST, &path, &other).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let unknown = t
        .req(
            Method::POST,
            "/api/v1/notifications/00000000000000000000000000000000/read",
            &other,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let (a, b) = (r.text().await.unwrap(), unknown.text().await.unwrap());
    assert_eq!(
        a, b,
        "another's notification reads exactly as an unknown one"
    );
    assert_eq!(alerts_naming(&t, &n.id).await, 1);
    assert_eq!(
        alerts_naming(&t, "00000000000000000000000000000000").await,
        0
    );
    let alert = t
        .audit()
        .await
        .into_iter()
        .find(|e| e.action == AuditAction::SecurityAlert && e.detail.contains(&n.id))
        .unwrap();
    assert_eq!(alert.user, other.id);

    // The owner still can.
    let r = t.req(Method::POST, &path, &owner).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // After a restart the owner is known from the files.
    t.restart(|_| {}).await;
    let r = t.req(Method::POST, &path, &other).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(alerts_naming(&t, &n.id).await, 2);
}

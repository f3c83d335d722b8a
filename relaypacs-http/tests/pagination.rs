//! Every listing is paginated (issue 11 item 5): `limit` and an opaque
//! `cursor`, answering `{"items": [...], "next": cursor | null}`; pages
//! are bounded, walk the whole listing once in a stable order, and a
//! cursor the server did not make answers 400.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::{TestServer, User, expect_error};
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::Value;

/// Every item of `path` for `u`, `limit` at a time; the page sizes.
async fn walk(t: &TestServer, u: &User, path: &str, limit: u32) -> (Vec<Value>, Vec<usize>) {
    let (mut all, mut sizes, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
    loop {
        let mut url = format!("{path}?limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = t.req(Method::GET, &url, u).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let v: Value = r.json().await.unwrap();
        let items = v["items"].as_array().unwrap().clone();
        assert!(items.len() <= limit as usize);
        sizes.push(items.len());
        all.extend(items);
        match v["next"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(v["next"].is_null());
                return (all, sizes);
            }
        }
        assert!(sizes.len() < 1000, "the walk does not end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_users_and_the_audit_trail_are_listed_page_by_page() {
    let t = TestServer::start().await;
    let ann = t.user("ann", Role::Uploader).await;
    let bob = t.user("bob", Role::Uploader).await;
    let admin = t.user("ada", Role::Admin).await;
    let mut mine = Vec::new();
    for _ in 0..5 {
        mine.push(t.new_study(&ann).await);
    }
    let theirs = t.new_study(&bob).await;

    // Studies: 2 + 2 + 1, each once, only the caller's.
    let (all, sizes) = walk(&t, &ann, "/api/v1/studies", 2).await;
    assert_eq!(sizes, vec![2, 2, 1]);
    let mut ids: Vec<String> = all
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    mine.sort();
    assert_eq!(ids, mine);
    assert!(!ids.contains(&theirs));
    // No limit: the default page holds them all; limit 0 is the default.
    for q in ["", "?limit=0", "?limit=4294967295"] {
        let r = t
            .req(Method::GET, &format!("/api/v1/studies{q}"), &ann)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 5, "{q}");
        assert!(v["next"].is_null(), "{q}");
    }

    // Users (admin): by name, each once.
    for name in ["cy", "dee", "eli"] {
        t.add_user(name, Role::Uploader).await;
    }
    let (users, sizes) = walk(&t, &admin, "/api/v1/users", 2).await;
    assert_eq!(sizes, vec![2, 2, 2]);
    let names: Vec<&str> = users
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["ada", "ann", "bob", "cy", "dee", "eli"]);

    // The audit trail (admin): in trail order; every page read is itself
    // audited, appended after what the walk already passed.
    let before = t.audit().await;
    let (events, _) = walk(&t, &admin, "/api/v1/audit", 7).await;
    assert!(events.len() > before.len());
    for (got, want) in events.iter().zip(&before) {
        assert_eq!(got["detail"].as_str().unwrap_or(""), want.detail);
        assert_eq!(got["user"], want.user);
    }

    // Empty listings: one empty page.
    for path in ["/api/v1/admin/outbox", "/api/v1/admin/dead-letters"] {
        let (items, sizes) = walk(&t, &admin, path, 10).await;
        assert!(items.is_empty());
        assert_eq!(sizes, vec![0]);
    }
    let (items, _) = walk(&t, &ann, "/api/v1/notifications", 10).await;
    assert!(items.is_empty());

    // Cursors the server did not make, and unknown parameters: 400.
    for path in [
        "/api/v1/studies",
        "/api/v1/users",
        "/api/v1/audit",
        "/api/v1/notifications",
        "/api/v1/admin/outbox",
    ] {
        let r = t
            .req(Method::GET, &format!("{path}?cursor=%%%"), &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let long = "A".repeat(4000);
        let r = t
            .req(Method::GET, &format!("{path}?cursor={long}"), &admin)
            .send()
            .await
            .unwrap();
        expect_error(r, 400, "RELAY_BAD_CURSOR").await;
        let r = t
            .req(Method::GET, &format!("{path}?limit=-1"), &admin)
            .send()
            .await
            .unwrap();
        expect_error(r, 400, "RELAY_BAD_QUERY").await;
    }
    t.stop().await;
}

/// The study view pages its files (`files_limit`, `files_cursor`,
/// answering `file_count` and `files_next`): every file once, in file id
/// order, and a cursor that is not a file id answers 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_study_view_pages_its_files() {
    let t = TestServer::start().await;
    let ann = t.user("ann", Role::Uploader).await;
    let sid = t.new_study(&ann).await;
    let study = relaypacs_core::testing::dicom_gen::new_uid();
    let mut uploads = Vec::new();
    for _ in 0..5 {
        uploads.push(t.upload(&ann, &sid, &common::dicom(Some(&study), 8)).await);
    }
    let (mut seen, mut sizes, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
    loop {
        let mut url = format!("/api/v1/studies/{sid}?files_limit=2");
        if let Some(c) = &cursor {
            url.push_str(&format!("&files_cursor={c}"));
        }
        let r = t.req(Method::GET, &url, &ann).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["file_count"], 5, "{v}");
        let files = v["files"].as_array().unwrap();
        sizes.push(files.len());
        for f in files {
            assert_eq!(f["state"], "valid", "{f}");
            seen.push(f["upload_url"].as_str().unwrap().to_string());
        }
        match v["files_next"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(sizes.len() < 10, "the walk does not end");
    }
    assert_eq!(sizes, vec![2, 2, 1]);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "file id order");
    uploads.sort();
    assert_eq!(seen, uploads, "every file once");
    // The default page holds all five; a bad cursor is a 400 naming it.
    let v: Value = t
        .req(Method::GET, &format!("/api/v1/studies/{sid}"), &ann)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 5);
    assert!(v["files_next"].is_null());
    let r = t
        .req(
            Method::GET,
            &format!("/api/v1/studies/{sid}?files_cursor=../x"),
            &ann,
        )
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 400, "RELAY_BAD_QUERY").await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("files_cursor")
    );
    t.stop().await;
}

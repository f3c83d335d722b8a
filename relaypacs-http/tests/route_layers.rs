//! Per-route limits and the range reservation as clients see them: the
//! small JSON routes carry their body limit as a route layer, so a body
//! over `http.max_json_body` is refused even when it comes without a
//! Content-Length (chunked: the edge cannot see its size), while the
//! upload routes, which stream, are not bound by it; and a second PATCH of
//! an upload being written answers 409 `RELAY_UPLOAD_BUSY` from the
//! pipeline's reservation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use relaypacs_http::auth::Role;
use reqwest::Method;

/// `data` as a chunked body (no Content-Length) in `n` pieces, `pause`
/// before each.
fn chunked(data: Vec<u8>, n: usize, pause: Duration) -> reqwest::Body {
    let size = data.len().div_ceil(n.max(1));
    let parts: Vec<Vec<u8>> = data.chunks(size.max(1)).map(<[u8]>::to_vec).collect();
    reqwest::Body::wrap_stream(futures::stream::iter(parts).then(move |p| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::io::Error>(bytes::Bytes::from(p))
    }))
}

#[tokio::test]
async fn json_routes_limit_chunked_bodies_upload_routes_stream() {
    let t = TestServer::start_with(|c| c.http.max_json_body = 2048).await;
    let u = t.user("lia", Role::Uploader).await;
    // Login and study creation with a 4 KiB chunked body: 413.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .header("content-type", "application/json")
        .body(chunked(vec![b' '; 4096], 4, Duration::ZERO))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "RELAY_BODY_TOO_LARGE").await;
    let r = t
        .req(Method::POST, "/api/v1/studies", &u)
        .header("content-type", "application/json")
        .body(chunked(vec![b' '; 4096], 4, Duration::ZERO))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "{:?}", r.text().await);
    // Under the limit, chunked: accepted.
    let r = t
        .req(Method::POST, "/api/v1/studies", &u)
        .header("content-type", "application/json")
        .body(chunked(b"{}".to_vec(), 1, Duration::ZERO))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A tus PATCH of 40 KiB (twenty times the JSON limit) is stored.
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    assert!(data.len() > 20 * 2048);
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    let r = t.patch(&u, &up, 0, data.clone(), None).await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    assert_eq!(t.head_offset(&u, &up).await, data.len() as u64);
    t.stop().await;
}

#[tokio::test]
async fn a_second_patch_of_an_upload_being_written_is_busy() {
    let t = TestServer::start().await;
    let u = t.user("max", Role::Uploader).await;
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
        send(chunked(data.clone(), 5, Duration::from_millis(200))),
        async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            send(chunked(data.clone(), 1, Duration::ZERO)).await
        }
    );
    assert_eq!(a.unwrap().status(), 204);
    expect_error(b.unwrap(), 409, "RELAY_UPLOAD_BUSY").await;
    assert_eq!(t.head_offset(&u, &up).await, data.len() as u64);
    t.stop().await;
}

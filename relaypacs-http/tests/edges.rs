//! DOS-1/3/4, AUTH-10: timeouts, limits, headers, JSON errors, metrics and
//! the OpenAPI document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use relaypacs_http::auth::Role;
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// DOS-1: half-sent request heads are closed after the header timeout,
/// while other clients are served promptly.
#[tokio::test]
async fn slowloris_connections_are_closed() {
    let t = TestServer::start_with(|c| c.http.header_read_timeout_secs = 2).await;
    let addr = t.server().addr();
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
            .await
            .unwrap();
        conns.push(s);
    }
    let started = Instant::now();
    let r = t
        .http
        .get(format!("{}/healthz", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "health check waited behind slow clients"
    );
    for mut s in conns {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(8), s.read(&mut buf))
            .await
            .expect("slow connection still open after 8 s")
            .unwrap_or(0);
        // Closed (0 bytes) or a 408 answer, then closed.
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    t.stop().await;
}

async fn raw(t: &TestServer, request: &[u8]) -> String {
    let mut s = TcpStream::connect(t.server().addr()).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// DOS-3/4: header and body limits answer before reading what the client
/// claims, and compressed bodies are refused.
#[tokio::test]
async fn header_and_body_limits() {
    let t = TestServer::start().await;
    // 200 headers.
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let out = raw(&t, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // One 64 KiB header.
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let out = raw(&t, req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // A 4 GiB Content-Length with no body: refused at once.
    let started = Instant::now();
    let out = raw(&t, b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4294967296\r\nConnection: close\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("\"code\":\"RELAY_BODY_TOO_LARGE\""), "{out}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // gzip request bodies.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0])
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "RELAY_CONTENT_ENCODING").await;
    t.stop().await;
}

/// AUTH-10: every response carries the security headers; errors are JSON
/// without internals; unknown routes and methods too.
#[tokio::test]
async fn security_headers_everywhere_and_json_errors() {
    let t = TestServer::start().await;
    let u = t.user("xan", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let up = t.create_upload(&u, &study, 1000, None).await;
    let requests = vec![
        t.http.get(format!("{}/healthz", t.url)),
        t.http.get(format!("{}/nope", t.url)),
        t.http.request(Method::TRACE, format!("{}/healthz", t.url)),
        t.http.get(format!("{}/api/v1/studies", t.url)),
        t.req(Method::GET, "/api/v1/studies", &u),
        t.req(Method::HEAD, &up, &u)
            .header("tus-resumable", "1.0.0"),
        t.req(Method::GET, "/api/v1/events", &u),
        t.http.request(Method::OPTIONS, format!("{}/files", t.url)),
    ];
    for rb in requests {
        let r = rb.send().await.unwrap();
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'")
        );
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["cache-control"], "no-store");
        assert!(h.get("x-request-id").is_some());
        if r.status().is_client_error() && r.status() != 404 || r.status() == 405 {
            assert_eq!(h["content-type"], "application/json");
        }
    }
    let r = t
        .http
        .request(Method::TRACE, format!("{}/healthz", t.url))
        .send()
        .await
        .unwrap();
    expect_error(r, 405, "RELAY_METHOD_NOT_ALLOWED").await;
    let r = t.http.get(format!("{}/nope", t.url)).send().await.unwrap();
    expect_error(r, 404, "RELAY_NOT_FOUND").await;
    t.stop().await;
    // HSTS when configured (behind TLS).
    let t = TestServer::start_with(|c| c.http.hsts = true).await;
    let r = t
        .http
        .get(format!("{}/healthz", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    t.stop().await;
}

/// Every route is in the OpenAPI document and every documented route
/// exists.
#[tokio::test]
async fn openapi_matches_the_router() {
    let t = TestServer::start().await;
    let doc: serde_json::Value = t
        .http
        .get(format!("{}/openapi.json", t.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = 0;
    for (path, ops) in paths {
        for (method, _) in ops.as_object().unwrap() {
            documented += 1;
            let concrete = path
                .replace("{id}", "00000000000000000000000000000000")
                .replace("{study}", "1.2.3");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = t
                .http
                .request(m, format!("{}{concrete}", t.url))
                .send()
                .await
                .unwrap();
            if r.status() == 404 || r.status() == 405 {
                let body = r.text().await.unwrap();
                assert!(
                    !body.contains("no such route") && !body.contains("METHOD_NOT_ALLOWED"),
                    "{method} {path} documented but not routed"
                );
            }
        }
    }
    assert!(documented >= 30, "{documented}");
    t.stop().await;
}

/// Prometheus metrics count uploads, bytes and requests by route template.
#[tokio::test]
async fn metrics_count_uploads_and_requests() {
    let t = TestServer::start().await;
    let u = t.user("yor", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 64);
    t.upload(&u, &study, &data).await;
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
    assert!(m.contains("relaypacs_uploads_created_total 1"), "{m}");
    assert!(
        m.contains(&format!("relaypacs_upload_bytes_total {}", data.len())),
        "{m}"
    );
    assert!(m.contains("route=\"/files/{id}\""), "{m}");
    assert!(!m.contains(&study), "concrete ids in metric labels");
    t.stop().await;
}

//! Issue 11 item 1: `/metrics` stays bounded whatever clients send (every
//! label value from a closed set), and is readable only with its token or
//! on its own listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request};
use common::*;
use relaypacs_http::Config;
use relaypacs_http::metrics::KNOWN_METHODS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

/// The metrics token the server created in its data folder.
fn metrics_token(t: &TestServer) -> String {
    std::fs::read_to_string(t.data().join("metrics-token"))
        .unwrap()
        .trim()
        .to_string()
}

async fn scrape(t: &TestServer) -> String {
    let r = t
        .http
        .get(format!("{}/metrics", t.url))
        .bearer_auth(metrics_token(t))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// Every `name="value"` pair of the exposition's samples.
fn labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(open) = line.find('{') else { continue };
        let close = line.rfind('}').unwrap();
        let mut rest = &line[open + 1..close];
        while !rest.is_empty() {
            let eq = rest.find("=\"").unwrap();
            let name = rest[..eq].to_string();
            let after = &rest[eq + 2..];
            let end = after.find('"').unwrap();
            out.push((name, after[..end].to_string()));
            rest = after[end + 1..].trim_start_matches(',');
        }
    }
    out
}

/// Every label of the exposition is a route template of the router (or
/// `unmatched`), a known method (or `other`), a status class, a
/// histogram bucket bound or a delivery outcome: never client text.
fn assert_closed_labels(text: &str) {
    let templates: BTreeSet<String> = {
        let doc: serde_json::Value =
            serde_json::from_str(relaypacs_http::routes::ops::OPENAPI).unwrap();
        let mut set: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
        set.insert("unmatched".into());
        set
    };
    for (name, value) in labels(text) {
        match name.as_str() {
            "route" => assert!(templates.contains(&value), "route label {value:?}"),
            "method" => assert!(
                KNOWN_METHODS.contains(&value.as_str()) || value == "other",
                "method label {value:?}"
            ),
            "status" => assert!(
                ["1xx", "2xx", "3xx", "4xx", "5xx"].contains(&value.as_str()),
                "status label {value:?}"
            ),
            "le" => assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{value:?}"),
            "outcome" => assert!(value.len() < 32, "{value:?}"),
            other => panic!("unexpected label {other}={value:?}"),
        }
    }
}

/// 100,000 requests with unique method names (a few of 4,000 bytes) and
/// unique unknown paths, sent in-process through the whole edge stack:
/// the exposition stays far under 1 MiB and carries none of their text.
#[tokio::test]
async fn unique_methods_do_not_grow_metrics() {
    let t = TestServer::start().await;
    let app = relaypacs_http::edges::app(t.server().state().clone());
    let started = std::time::Instant::now();
    for i in 0..100_000u32 {
        let name = if i % 1000 == 0 {
            format!("ZQ{i:06}{}", "M".repeat(3992))
        } else {
            format!("ZQ{i:06}")
        };
        let path = if i % 2 == 0 {
            "/healthz".to_string()
        } else {
            format!("/zq-{i}/x")
        };
        let req = Request::builder()
            .method(Method::from_bytes(name.as_bytes()).unwrap())
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert!(res.status().is_client_error(), "{}", res.status());
    }
    eprintln!("100,000 requests in {:?}", started.elapsed());
    let m = scrape(&t).await;
    eprintln!("/metrics: {} bytes", m.len());
    assert!(m.len() < 1 << 20, "/metrics is {} bytes", m.len());
    assert!(
        !m.contains("ZQ0"),
        "a client's method text is in the metrics"
    );
    assert!(!m.contains("zq-"), "a client's path is in the metrics");
    assert!(m.contains("method=\"other\""), "{m}");
    assert!(m.contains("route=\"unmatched\""), "{m}");
    assert!(m.contains("route=\"/healthz\""), "{m}");
    assert_closed_labels(&m);
    t.stop().await;
}

/// The same over a real connection: 3,000 pipelined requests with unique
/// 4,000-byte methods on one loopback TCP connection to the server.
#[tokio::test]
async fn unique_methods_over_loopback_stay_bounded() {
    let t = TestServer::start().await;
    let before = scrape(&t).await.len();
    let stream = tokio::net::TcpStream::connect(t.server().addr())
        .await
        .unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        rd.read_to_end(&mut all).await.unwrap();
        all
    });
    let n = 3000;
    for i in 0..n {
        let close = if i == n - 1 {
            "connection: close\r\n"
        } else {
            ""
        };
        let req = format!(
            "QZ{i:05}{} /healthz HTTP/1.1\r\nhost: x\r\n{close}\r\n",
            "M".repeat(3993)
        );
        wr.write_all(req.as_bytes()).await.unwrap();
    }
    wr.flush().await.unwrap();
    let answers = String::from_utf8_lossy(&reader.await.unwrap()).to_string();
    assert_eq!(
        answers.matches("HTTP/1.1 405").count(),
        n,
        "every request answered"
    );
    let m = scrape(&t).await;
    assert!(
        !m.contains("QZ0"),
        "a client's method text is in the metrics"
    );
    assert!(
        m.len() < before + (16 << 10),
        "{} bytes before, {} after",
        before,
        m.len()
    );
    assert_closed_labels(&m);
    t.stop().await;
}

/// By default `/metrics` needs the bearer token of `<data_dir>/metrics-token`
/// (created 0600 on first start); no token or a wrong one is a JSON 401.
#[tokio::test]
async fn metrics_need_their_token_by_default() {
    let t = TestServer::start().await;
    let path = t.data().join("metrics-token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let token = metrics_token(&t);
    assert!(token.len() >= 32);
    let url = format!("{}/metrics", t.url);
    let r = t.http.get(&url).send().await.unwrap();
    let v = expect_error(r, 401, "RELAY_UNAUTHENTICATED").await;
    assert!(!v.to_string().contains(&token));
    let mut wrong = token.clone().into_bytes();
    wrong[0] = if wrong[0] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong).unwrap();
    for bad in [wrong.as_str(), &token[..token.len() - 1], "", "x"] {
        let r = t.http.get(&url).bearer_auth(bad).send().await.unwrap();
        expect_error(r, 401, "RELAY_UNAUTHENTICATED").await;
    }
    // The user's access token is not the metrics token.
    let u = t.user("mona", relaypacs_http::auth::Role::Admin).await;
    let r = t.http.get(&url).bearer_auth(&u.token).send().await.unwrap();
    expect_error(r, 401, "RELAY_UNAUTHENTICATED").await;
    let r = t.http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("relaypacs_http_requests_total")
    );
    // The token survives a restart (read back, not replaced).
    let mut t = t;
    t.restart(|_| {}).await;
    assert_eq!(metrics_token(&t), token);
    t.stop().await;
}

/// `[metrics] listen`: `/metrics` is served only there (404 on the main
/// port), without a token when `require_token = false` on loopback, and
/// with it otherwise.
#[tokio::test]
async fn metrics_on_their_own_listener() {
    let port = relaypacs_test_peers::free_port();
    let t = TestServer::start_with(|c| {
        c.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.metrics.require_token = false;
    })
    .await;
    let r = t
        .http
        .get(format!("{}/metrics", t.url))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "RELAY_NOT_FOUND").await;
    let side = format!("http://127.0.0.1:{port}");
    let r = t.http.get(format!("{side}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("relaypacs_http_requests_total")
    );
    // Only /metrics there: the API is not reachable on the metrics port.
    let r = t.http.get(format!("{side}/healthz")).send().await.unwrap();
    expect_error(r, 404, "RELAY_NOT_FOUND").await;
    t.stop().await;
    // The listener is gone with the server.
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );

    let port = relaypacs_test_peers::free_port();
    let t = TestServer::start_with(|c| {
        c.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    let side = format!("http://127.0.0.1:{port}/metrics");
    let r = t.http.get(&side).send().await.unwrap();
    expect_error(r, 401, "RELAY_UNAUTHENTICATED").await;
    let r = t
        .http
        .get(&side)
        .bearer_auth(metrics_token(&t))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    t.stop().await;
}

/// An open `/metrics` is refused by the configuration unless it is on a
/// loopback listener of its own.
#[test]
fn open_metrics_only_on_a_loopback_listener() {
    let mut c = Config::default();
    assert!(c.validate().is_ok());
    c.metrics.require_token = false;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("metrics.require_token")
    );
    c.metrics.listen = Some("0.0.0.0:9898".parse().unwrap());
    assert!(c.validate().is_err());
    c.metrics.listen = Some("127.0.0.1:9898".parse().unwrap());
    assert!(c.validate().is_ok());
    c.metrics.listen = Some(c.listen);
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("metrics.listen")
    );
}

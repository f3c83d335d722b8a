//! Issue 11 item 8: the server terminates TLS itself (reloaded on SIGHUP,
//! an invalid new pair keeps the old one, a silent client is cut at the
//! handshake deadline), and `http.trusted_proxies` is the only way
//! `Forwarded` / `X-Forwarded-For` changes the address used by the login
//! limiter and the audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use relaypacs_core::AuditAction;
use relaypacs_http::config::TlsConfig;
use relaypacs_test_peers::{TestCa, TestCert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client trusting only `ca_file`, opening a new connection per request.
fn client(ca_file: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_file).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Copy `cert` over the files the server reads.
fn install(cert: &TestCert, dir: &Path) {
    std::fs::copy(&cert.cert_file, dir.join("cert.pem")).unwrap();
    std::fs::copy(&cert.key_file, dir.join("key.pem")).unwrap();
}

async fn tls_server(dir: &Path, first: &TestCert) -> TestServer {
    install(first, dir);
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    TestServer::start_with(move |c| {
        c.http.hsts = true;
        c.tls = Some(TlsConfig {
            cert_file,
            key_file,
            handshake_timeout_secs: 1,
        });
    })
    .await
}

fn https(t: &TestServer, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", t.server().addr().port())
}

/// Whether a fresh connection trusting `ca_file` gets `/healthz`.
async fn trusted_by(t: &TestServer, ca_file: &Path) -> Result<reqwest::Response, reqwest::Error> {
    client(ca_file).get(https(t, "/healthz")).send().await
}

/// SIGHUP to this process (the server installed its handler in
/// `Server::start`, before this can run). By kill(1): `libc::kill` is an
/// `unsafe fn` and the workspace forbids unsafe code.
fn sighup() {
    let st = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -HUP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_served_and_a_new_certificate_is_taken_on_sighup() {
    let files = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (
        TestCa::new("relaypacs-ca-one"),
        TestCa::new("relaypacs-ca-two"),
    );
    let t = tls_server(files.path(), &ca1.issue("first")).await;
    assert!(t.server().is_tls());

    let r = trusted_by(&t, &ca1.ca_file()).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    let e = trusted_by(&t, &ca2.ca_file()).await.unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", t.server().addr()))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // A new pair from another CA, then SIGHUP: new connections get it
    // without a restart.
    install(&ca2.issue("second"), files.path());
    sighup();
    let started = Instant::now();
    loop {
        if let Ok(r) = trusted_by(&t, &ca2.ca_file()).await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the new certificate is not served 5 s after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(trusted_by(&t, &ca1.ca_file()).await.is_err());
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_new_certificate_keeps_the_old_one() {
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new("relaypacs-ca-keep");
    let t = tls_server(files.path(), &ca.issue("good")).await;

    // Not PEM at all.
    std::fs::write(files.path().join("cert.pem"), b"garbage\n").unwrap();
    let e = t.server().reload_tls().unwrap_err();
    assert!(e.to_string().contains("cert.pem"), "{e}");
    sighup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(trusted_by(&t, &ca.ca_file()).await.unwrap().status(), 200);

    // A certificate with the key of another one.
    let other = ca.issue("other");
    std::fs::copy(&other.cert_file, files.path().join("cert.pem")).unwrap();
    let e = t.server().reload_tls().unwrap_err();
    assert!(e.to_string().contains("cannot be used together"), "{e}");
    // A missing key file.
    std::fs::remove_file(files.path().join("key.pem")).unwrap();
    let e = t.server().reload_tls().unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
    assert_eq!(trusted_by(&t, &ca.ca_file()).await.unwrap().status(), 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_handshake_is_cut() {
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new("relaypacs-ca-slow");
    let t = tls_server(files.path(), &ca.issue("slow")).await;
    let mut silent = TcpStream::connect(t.server().addr()).await.unwrap();
    // Half a ClientHello record header, then nothing.
    silent.write_all(&[0x16, 0x03]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("connection still open 5 s after a 1 s handshake deadline")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Others are served meanwhile and after.
    assert_eq!(trusted_by(&t, &ca.ca_file()).await.unwrap().status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_file_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut c = test_config(dir.path());
    std::fs::write(dir.path().join("c.pem"), b"-----BEGIN CERTIFICATE-----\n").unwrap();
    c.tls = Some(TlsConfig {
        cert_file: dir.path().join("c.pem"),
        key_file: dir.path().join("k.pem"),
        ..TlsConfig::default()
    });
    let e = relaypacs_http::Server::start(c).await.unwrap_err();
    assert!(e.to_string().contains("c.pem"), "{e}");
}

/// Failed logins from distinct claimed addresses, each for a distinct
/// unknown user (no account lockout): the statuses, and the addresses the
/// audit trail recorded for them.
async fn logins_claiming(t: &TestServer, n: usize) -> (Vec<u16>, Vec<String>) {
    let mut statuses = Vec::new();
    for i in 0..n {
        let r = t
            .http
            .post(format!("{}/api/v1/auth/login", t.url))
            .header("x-forwarded-for", format!("6.6.6.6, 203.0.113.{i}"))
            .json(&serde_json::json!({"username": format!("nobody{i}"), "password": "x"}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    let addresses = t
        .audit()
        .await
        .into_iter()
        .filter(|e| e.action == AuditAction::Login)
        .map(|e| e.address.unwrap_or_default())
        .collect();
    (statuses, addresses)
}

fn limited(c: &mut relaypacs_http::Config) {
    c.auth.login_per_address_per_minute = 3;
}

#[tokio::test]
async fn without_trusted_proxies_forwarded_headers_change_nothing() {
    let t = TestServer::start_with(limited).await;
    let (statuses, addresses) = logins_claiming(&t, 4).await;
    // One socket address: the fourth attempt is over the per-address limit
    // whatever it claims.
    assert_eq!(statuses, vec![401, 401, 401, 429]);
    assert_eq!(addresses, vec!["127.0.0.1"; 3]);
    // Forwarded (RFC 7239) is ignored just the same.
    let r = t
        .http
        .post(format!("{}/api/v1/auth/login", t.url))
        .header("forwarded", "for=198.51.100.7")
        .json(&serde_json::json!({"username": "nobody", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    t.stop().await;
}

#[tokio::test]
async fn a_trusted_proxy_reports_the_client_address() {
    let t = TestServer::start_with(|c| {
        limited(c);
        c.http.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (statuses, addresses) = logins_claiming(&t, 4).await;
    // Four clients behind the proxy, one attempt each: none is limited, and
    // the trail names each (never the spoofed left-hand entry).
    assert_eq!(statuses, vec![401; 4]);
    assert_eq!(
        addresses,
        (0..4).map(|i| format!("203.0.113.{i}")).collect::<Vec<_>>()
    );
    // One client through the proxy is limited as itself.
    for want in [401, 401, 401, 429] {
        let r = t
            .http
            .post(format!("{}/api/v1/auth/login", t.url))
            .header("forwarded", "for=\"[2001:db8::7]:4711\"")
            .json(&serde_json::json!({"username": "nobody", "password": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want);
    }
    t.stop().await;
}

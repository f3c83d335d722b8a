//! Issue 11, item 3: password hashing runs in bounded memory. The real
//! binary takes 5,000 unknown-user logins (each costs one argon2id hash, for
//! timing equalization) from 250 distinct loopback source addresses; its
//! resident memory stays under 256 MiB afterwards, no attempt gets a 5xx,
//! and a real user can still log in.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";
const ATTEMPTS: usize = 5_000;
const ADDRESSES: u8 = 250;
/// Connections in flight per source address (1,000 in all).
const IN_FLIGHT_PER_ADDRESS: usize = 4;
const RSS_LIMIT_KIB: u64 = 256 * 1024;

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `VmRSS:`-style line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// One login over a fresh connection from `source`; the answer's status and
/// error code (empty on success), or `None` when the connection failed.
async fn login_from(
    source: Ipv4Addr,
    port: u16,
    username: &str,
    password: &str,
) -> Option<(u16, String)> {
    let sock = TcpSocket::new_v4().ok()?;
    sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).ok()?;
    let mut s = sock
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .ok()?;
    let body = serde_json::json!({"username": username, "password": password}).to_string();
    let req = format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let head = std::str::from_utf8(answer.get(..12)?).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.parse().ok()?;
    let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let body: serde_json::Value = serde_json::from_slice(&answer[body_at..]).ok()?;
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Some((status, code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_under_256_mib_after_5000_logins_from_250_addresses() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = relaypacs_test_peers::free_port();
    let config = dir.path().join("relaypacs.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {data:?}\n\n[http]\nmin_free_bytes = 0\n",
            data = dir.path().join("data").display().to_string(),
        ),
    )
    .unwrap();
    binary::add_user(
        &[OsStr::new("--config"), config.as_os_str()],
        &[],
        "lena",
        "uploader",
        PASSWORD,
    );
    let child = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gw = Gateway(child);
    let pid = gw.0.id();
    relaypacs_test_peers::wait_for_port(port, Duration::from_secs(20));
    let idle_kib = status_kib(pid, "VmRSS:");

    // 250 addresses × 20 attempts, 4 connections in flight per address.
    let started = Instant::now();
    let per_address = ATTEMPTS / usize::from(ADDRESSES);
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let mut tasks = Vec::new();
    for a in 0..ADDRESSES {
        let source = Ipv4Addr::new(127, 0, 0, 2 + a);
        for w in 0..IN_FLIGHT_PER_ADDRESS {
            let counts = counts.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..per_address).step_by(IN_FLIGHT_PER_ADDRESS) {
                    // A fresh unknown user each time: no account lockout, so
                    // every attempt past the address limiter costs a hash.
                    let user = format!("ghost-{a}-{i}");
                    let key = match login_from(source, port, &user, "not-the-password-1234").await {
                        Some((status, code)) => format!("{status} {code}"),
                        None => "connection failed".into(),
                    };
                    *counts.lock().unwrap().entry(key).or_default() += 1;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let rss_kib = status_kib(pid, "VmRSS:");
    let peak_kib = status_kib(pid, "VmHWM:");
    let counts = counts.lock().unwrap().clone();
    eprintln!(
        "login_memory: {ATTEMPTS} attempts in {elapsed:?}: {counts:?}; \
         RSS idle {} MiB, after {} MiB, peak {} MiB",
        idle_kib / 1024,
        rss_kib / 1024,
        peak_kib / 1024
    );
    assert_eq!(counts.values().sum::<usize>(), ATTEMPTS);
    assert_eq!(counts.get("connection failed"), None, "{counts:?}");
    assert!(
        counts.keys().all(|k| [
            "401 RELAY_INVALID_CREDENTIALS",
            "429 RELAY_LOGIN_BUSY",
            "429 RELAY_RATE_LIMITED"
        ]
        .contains(&k.as_str())),
        "only refusals (hashed), busy hasher or address limit expected: {counts:?}"
    );
    // Enough attempts reached the hasher for the figure to mean something.
    let hashed = counts
        .get("401 RELAY_INVALID_CREDENTIALS")
        .copied()
        .unwrap_or(0);
    assert!(hashed >= 200, "{counts:?}");
    assert!(
        rss_kib < RSS_LIMIT_KIB,
        "RSS {} MiB after the login flood (limit 256 MiB)",
        rss_kib / 1024
    );
    assert!(
        peak_kib < RSS_LIMIT_KIB,
        "peak RSS {} MiB during the login flood (limit 256 MiB)",
        peak_kib / 1024
    );

    // The hasher still serves a real user (fresh address: not limited).
    let mut status = None;
    for _ in 0..20 {
        status = login_from(Ipv4Addr::new(127, 0, 0, 252), port, "lena", PASSWORD).await;
        if status.as_ref().map(|s| s.0) == Some(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(status.map(|s| s.0), Some(200));
    drop(gw);
}

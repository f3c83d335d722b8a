//! The per-address connection cap counts the TCP peer, except a trusted
//! proxy: behind a reverse proxy every client arrives from the proxy's
//! address, so capping it would cap the whole clinic. A trusted proxy is
//! bounded by `max_connections` only; any other address by its cap.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A keep-alive connection from `src` that got its `/healthz` answer, or
/// the refusal it got instead.
async fn connect(server: SocketAddr, src: Ipv4Addr) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((src, 0))).unwrap();
    let mut s = sock.connect(server).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(head)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_not_held_to_the_per_address_cap() {
    let t = TestServer::start_with(|c| {
        c.http.max_connections_per_address = 2;
        c.http.trusted_proxies = vec!["127.0.0.3/32".parse().unwrap()];
    })
    .await;
    let addr = t.server().addr();
    let client = Ipv4Addr::new(127, 0, 0, 2);
    let proxy = Ipv4Addr::new(127, 0, 0, 3);

    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect(addr, client).await.unwrap());
    }
    let refused = connect(addr, client).await.unwrap_err();
    assert!(refused.contains("RELAY_TOO_MANY_CONNECTIONS"), "{refused}");

    for i in 0..8 {
        held.push(
            connect(addr, proxy)
                .await
                .unwrap_or_else(|e| panic!("proxy connection {i} refused: {e}")),
        );
    }
    assert_eq!(held.len(), 10);
}

//! The audit trail forwarded to a real syslog collector (rsyslogd with the
//! GnuTLS stream driver) over TLS on loopback: RFC 5424 messages with
//! octet-counting framing (RFC 5425), refused certificates, reconnection
//! after the collector comes back, and a full queue that never holds up
//! the local trail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::time::{Duration, Instant};

use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink, SessionId};
use relaypacs_storage::JsonlAuditSink;
use relaypacs_storage::syslog_audit::{SyslogConfig, SyslogFormat, SyslogForwardingSink};
use relaypacs_test_peers::{Rsyslog, TestCa};

const WAIT: Duration = Duration::from_secs(20);

fn config(port: u16, server_name: &str, ca_file: &std::path::Path) -> SyslogConfig {
    let mut c = SyslogConfig::new(format!("127.0.0.1:{port}"), server_name, ca_file);
    c.hostname = "relay-test".to_owned();
    c.source_id = "relaypacs-test".to_owned();
    c.anchor_interval = None;
    c.max_backoff = Duration::from_millis(200);
    c.io_timeout = Duration::from_secs(5);
    c
}

fn event(i: usize, outcome: AuditOutcome) -> AuditEvent {
    let action = if outcome == AuditOutcome::Success {
        AuditAction::Login
    } else {
        AuditAction::SecurityAlert
    };
    let mut e = AuditEvent::new(format!("user-{i}"), action, outcome);
    e.address = Some("192.0.2.7".to_owned());
    e.session = Some(SessionId::random());
    e.detail = format!("event {i}: \"quoted\" back\\slash ]bracket\nnew line");
    e
}

/// The `(seq, hash)` of every record in the trail file.
fn trail_hashes(sink: &JsonlAuditSink) -> Vec<(u64, String)> {
    std::fs::read_to_string(sink.path())
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["seq"].as_u64().unwrap(),
                v["hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_events_reach_rsyslog_as_rfc5424_over_tls() {
    let ca = TestCa::new("syslog-ca");
    let collector = Rsyslog::start(ca.issue("collector"));
    let dir = tempfile::tempdir().unwrap();
    let trail = JsonlAuditSink::open(dir.path().join("audit.jsonl")).unwrap();
    let sink =
        SyslogForwardingSink::with_chain(trail, config(collector.port, "localhost", &ca.ca_file()))
            .unwrap();

    let sent = [
        event(0, AuditOutcome::Success),
        event(1, AuditOutcome::MinorFailure),
        event(2, AuditOutcome::SeriousFailure),
    ];
    for e in &sent {
        sink.record(e).await.unwrap();
    }
    let got = collector.wait_for(3, WAIT);
    let hashes = trail_hashes(sink.inner());
    assert_eq!(hashes.len(), 3);
    let pid = std::process::id().to_string();
    for (i, (line, e)) in got.iter().zip(&sent).enumerate() {
        // Facility 10 (authpriv); severity 5, 4, 3 from the outcome.
        assert_eq!(line.pri, [85, 84, 83][i], "{line:?}");
        assert!(
            line.raw.starts_with(&format!("<{}>1 ", line.pri)),
            "{line:?}"
        );
        assert_eq!(line.hostname, "relay-test");
        assert_eq!(line.app_name, "relaypacs");
        assert_eq!(line.procid, pid);
        assert_eq!(line.msgid, e.event_id.to_string());
        let (seq, hash) = &hashes[i];
        assert_eq!(
            line.structured_data,
            format!("[relaypacs@32473 seq=\"{seq}\" hash=\"{hash}\"]")
        );
        // The MSG is one PS3.15 A.5 audit message, newlines and escaped
        // free text intact.
        assert!(
            line.msg
                .starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<AuditMessage"),
            "{:?}",
            line.msg
        );
        assert!(line.msg.ends_with("</AuditMessage>"), "{:?}", line.msg);
        assert!(line.msg.contains(&format!("code=\"{}\"", e.event_id)));
        assert!(line.msg.contains(&format!("user-{i}")));
        assert!(line.msg.contains("&quot;quoted&quot;") || line.msg.contains("\"quoted\""));
    }
    assert_eq!(sink.stats().sent, 3);

    // At close the chain head is anchored at the collector too.
    sink.close().await.unwrap();
    let got = collector.wait_for(4, WAIT);
    let anchor = &got[3];
    assert_eq!(anchor.msgid, "anchor");
    assert_eq!(
        anchor.structured_data,
        format!("[relaypacs@32473 count=\"3\" hash=\"{}\"]", hashes[2].1)
    );
    // The local trail has every event, as recorded.
    assert_eq!(sink.events().await.unwrap(), sent);

    // JSON MSG: the event comes back whole, SD-PARAM escaping through a
    // real RFC 5424 parser.
    let trail = JsonlAuditSink::open(dir.path().join("audit2.jsonl")).unwrap();
    let mut c = config(collector.port, "127.0.0.1", &ca.ca_file());
    c.format = SyslogFormat::Json;
    c.facility = 13;
    let sink = SyslogForwardingSink::new(trail, c).unwrap();
    let e = event(9, AuditOutcome::MajorFailure);
    sink.record(&e).await.unwrap();
    let got = collector.wait_for(5, WAIT);
    let line = &got[4];
    assert_eq!(line.pri, 13 * 8 + 2);
    assert_eq!(line.structured_data, "-");
    let back: AuditEvent = serde_json::from_str(&line.msg).unwrap();
    assert_eq!(back, e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_collector_is_refused_and_the_trail_is_unaffected() {
    let ca = TestCa::new("syslog-ca");
    let stranger = TestCa::new("stranger-ca");
    let collector = Rsyslog::start(ca.issue("collector"));
    let dir = tempfile::tempdir().unwrap();

    // A certificate from a CA we do not trust, then a trusted one for
    // another name: both refused in the handshake.
    for (name, ca_file, trail) in [
        ("localhost", stranger.ca_file(), "a.jsonl"),
        ("syslog.example.org", ca.ca_file(), "b.jsonl"),
    ] {
        let inner = JsonlAuditSink::open(dir.path().join(trail)).unwrap();
        let sink =
            SyslogForwardingSink::new(inner, config(collector.port, name, &ca_file)).unwrap();
        let sent: Vec<_> = (0..5).map(|i| event(i, AuditOutcome::Success)).collect();
        for e in &sent {
            sink.record(e).await.unwrap();
        }
        wait_until("two refused handshakes", || {
            sink.stats().connect_failures >= 2
        })
        .await;
        let stats = sink.stats();
        assert!(!stats.connected, "{name}: {stats:?}");
        assert_eq!(stats.sent, 0, "{name}: {stats:?}");
        assert_eq!(stats.queued, 5, "{name}: {stats:?}");
        assert_eq!(sink.events().await.unwrap(), sent, "{name}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        collector.received(),
        vec![],
        "nothing may reach the collector"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_recorded_while_the_collector_is_down_arrive_after_it_returns() {
    let ca = TestCa::new("syslog-ca");
    let mut collector = Rsyslog::start(ca.issue("collector"));
    let dir = tempfile::tempdir().unwrap();
    let trail = JsonlAuditSink::open(dir.path().join("audit.jsonl")).unwrap();
    let sink =
        SyslogForwardingSink::with_chain(trail, config(collector.port, "localhost", &ca.ca_file()))
            .unwrap();
    for i in 0..2 {
        sink.record(&event(i, AuditOutcome::Success)).await.unwrap();
    }
    collector.wait_for(2, WAIT);

    collector.stop();
    wait_until("the lost connection noticed", || !sink.stats().connected).await;
    for i in 2..7 {
        sink.record(&event(i, AuditOutcome::Success)).await.unwrap();
    }
    wait_until("a failed reconnection", || {
        sink.stats().connect_failures >= 1
    })
    .await;
    assert_eq!(sink.stats().queued, 5);

    collector.start_again();
    let got = collector.wait_for(7, WAIT);
    assert_eq!(got.len(), 7);
    let hashes = trail_hashes(sink.inner());
    for (line, (seq, hash)) in got.iter().zip(&hashes) {
        assert_eq!(
            line.structured_data,
            format!("[relaypacs@32473 seq=\"{seq}\" hash=\"{hash}\"]")
        );
    }
    let stats = sink.stats();
    assert_eq!((stats.sent, stats.queued, stats.dropped), (7, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_never_blocks_record() {
    let ca = TestCa::new("syslog-ca");
    let mut collector = Rsyslog::start(ca.issue("collector"));
    collector.stop();
    let dir = tempfile::tempdir().unwrap();
    let trail = JsonlAuditSink::open(dir.path().join("audit.jsonl")).unwrap();
    let mut c = config(collector.port, "localhost", &ca.ca_file());
    c.queue = 4;
    let sink = SyslogForwardingSink::with_chain(trail, c).unwrap();

    let start = Instant::now();
    for i in 0..300 {
        tokio::time::timeout(
            Duration::from_secs(5),
            sink.record(&event(i, AuditOutcome::Success)),
        )
        .await
        .expect("record must not wait for the collector")
        .unwrap();
    }
    let took = start.elapsed();
    let stats = sink.stats();
    assert_eq!(
        (stats.queued, stats.dropped, stats.sent),
        (4, 296, 0),
        "{stats:?}"
    );
    assert_eq!(
        sink.events().await.unwrap().len(),
        300,
        "the trail has them all"
    );
    eprintln!("300 records with the collector down and a full queue: {took:?}");

    // Back up: the four queued (the oldest) arrive, and only they.
    collector.start_again();
    let got = collector.wait_for(4, WAIT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(collector.received().len(), 4);
    let hashes = trail_hashes(sink.inner());
    for (line, (seq, hash)) in got.iter().zip(&hashes) {
        assert_eq!(
            line.structured_data,
            format!("[relaypacs@32473 seq=\"{seq}\" hash=\"{hash}\"]")
        );
    }
    // Forwarding resumes for new events.
    sink.record(&event(300, AuditOutcome::Success))
        .await
        .unwrap();
    let got = collector.wait_for(5, WAIT);
    assert!(
        got[4].structured_data.contains("seq=\"300\""),
        "{:?}",
        got[4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let ca = TestCa::new("syslog-ca");
    let collector = Rsyslog::start_mutual(ca.issue("collector"));
    let client = ca.issue("client");
    let dir = tempfile::tempdir().unwrap();

    // Without a client certificate the collector refuses the connection.
    let inner = JsonlAuditSink::open(dir.path().join("a.jsonl")).unwrap();
    let anonymous =
        SyslogForwardingSink::new(inner, config(collector.port, "localhost", &ca.ca_file()))
            .unwrap();
    anonymous
        .record(&event(0, AuditOutcome::Success))
        .await
        .unwrap();
    wait_until("two refused connections", || {
        anonymous.stats().connect_failures >= 2
    })
    .await;
    assert_eq!((anonymous.stats().sent, anonymous.stats().queued), (0, 1));

    // With one from the collector's CA the events arrive.
    let inner = JsonlAuditSink::open(dir.path().join("b.jsonl")).unwrap();
    let mut c = config(collector.port, "localhost", &ca.ca_file());
    c.client_cert_file = Some(client.cert_file.clone());
    c.client_key_file = Some(client.key_file.clone());
    let mutual = SyslogForwardingSink::new(inner, c).unwrap();
    mutual
        .record(&event(1, AuditOutcome::Success))
        .await
        .unwrap();
    let got = collector.wait_for(1, WAIT);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(collector.received().len(), 1);
    assert!(got[0].msg.contains("user-1"), "{:?}", got[0]);
    assert_eq!(anonymous.stats().sent, 0);
}

/// The decorator passes the `AuditSink` conformance suite, forwarding to a
/// live collector.
async fn forwarding_sink() -> (
    SyslogForwardingSink<JsonlAuditSink>,
    (Rsyslog, TestCa, tempfile::TempDir),
) {
    let ca = TestCa::new("syslog-ca");
    let collector = Rsyslog::start(ca.issue("collector"));
    let dir = tempfile::tempdir().unwrap();
    let trail = JsonlAuditSink::open(dir.path().join("audit.jsonl")).unwrap();
    let sink =
        SyslogForwardingSink::with_chain(trail, config(collector.port, "localhost", &ca.ca_file()))
            .unwrap();
    (sink, (collector, ca, dir))
}

relaypacs_core::audit_sink_conformance!(forwarding_conformance, forwarding_sink);

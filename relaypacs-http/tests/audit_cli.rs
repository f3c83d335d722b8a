//! `relaypacs audit verify` and `relaypacs audit export`, run as the real
//! binary: an intact trail verifies (count and head printed, exit 0); a cut
//! tail, a flipped byte, a deleted record and two swapped records each fail
//! (exit 1) with the first broken record named; export writes one DICOM
//! PS3.15 audit message (or JSON line) per event in the time range.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink, Uid};
use relaypacs_storage::audit_anchor::{default_anchor_path, read_anchor};
use relaypacs_storage::{ChainHead, JsonlAuditSink};
use time::macros::datetime;

const N: usize = 100;

/// A trail of `N` events, one per minute from 2026-01-01 00:00 UTC,
/// anchored at close, under `<dir>/audit/audit.jsonl` (the default place
/// for data folder `dir`).
async fn make_trail(dir: &Path) -> (PathBuf, ChainHead) {
    let path = dir.join("audit").join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    for i in 0..N {
        let mut e = AuditEvent::new(
            format!("user{i}"),
            AuditAction::DataAccessed,
            AuditOutcome::Success,
        );
        e.time = datetime!(2026-01-01 0:00 UTC) + time::Duration::minutes(i as i64);
        e.study = Some(Uid::parse(&format!("1.2.826.0.1.3680043.2.{}", i + 1)).unwrap());
        e.detail = format!("n={i} <&> \"quoted\"");
        sink.record(&e).await.unwrap();
    }
    sink.close().await.unwrap();
    let head = sink.head().await;
    assert_eq!(
        read_anchor(&default_anchor_path(&path))
            .unwrap()
            .unwrap()
            .head,
        head
    );
    (path, head)
}

/// Run the binary with `dir` as its data folder.
fn relaypacs(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relaypacs"))
        .args(args)
        .env_remove("RELAYPACS_CONFIG")
        .env("RELAYPACS_DATA_DIR", dir)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(p: &Path, l: &[String]) {
    std::fs::write(p, l.iter().map(|s| format!("{s}\n")).collect::<String>()).unwrap();
}

/// `audit verify` on the tampered trail fails with exit 1 and names `expect`.
fn assert_broken(dir: &Path, expect: &[&str]) {
    let out = relaypacs(dir, &["audit", "verify"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    for e in expect {
        assert!(err.contains(e), "{e:?} not in: {err}");
    }
    assert!(
        out.stdout.is_empty(),
        "nothing claims success: {}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn verify_accepts_an_intact_trail_printing_count_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_trail(dir.path()).await;
    let out = relaypacs(dir.path(), &["audit", "verify"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!("{N} records verified")),
        "{stdout}"
    );
    assert!(stdout.contains(&hex::encode(head.hash)), "{stdout}");
    assert!(stdout.contains(&format!("anchor: {N} records")), "{stdout}");

    // The same with explicit paths, the trail and anchor anywhere.
    let elsewhere = tempfile::tempdir().unwrap();
    let trail = elsewhere.path().join("t.jsonl");
    let anchor = elsewhere.path().join("head");
    std::fs::copy(&path, &trail).unwrap();
    std::fs::copy(default_anchor_path(&path), &anchor).unwrap();
    let out = relaypacs(
        elsewhere.path(),
        &[
            "audit",
            "verify",
            "--trail",
            trail.to_str().unwrap(),
            "--anchor",
            anchor.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&hex::encode(head.hash)));
}

#[tokio::test]
async fn verify_detects_a_cut_tail_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    let l = lines(&path);
    write_lines(&path, &l[..N - 3]);
    assert_broken(
        dir.path(),
        &["record 97 (line 98)", "the last 3 records were cut"],
    );
    // Without the anchor the shortened chain is consistent: the anchor is
    // what catches the cut.
    let out = relaypacs(dir.path(), &["audit", "verify", "--no-anchor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn verify_detects_a_flipped_byte_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"n=40 ")
        .expect("record 40's detail");
    bytes[at + 2] ^= 0x01; // '4' -> '5': one bit of one byte
    std::fs::write(&path, &bytes).unwrap();
    assert_broken(
        dir.path(),
        &["record 40 (line 41, seq 40)", "does not match its hash"],
    );
}

#[tokio::test]
async fn verify_detects_a_deleted_record_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    let mut l = lines(&path);
    l.remove(40);
    write_lines(&path, &l);
    assert_broken(
        dir.path(),
        &["record 40 (line 41, seq 41)", "record 40 is missing"],
    );
}

#[tokio::test]
async fn verify_detects_two_swapped_records_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    let mut l = lines(&path);
    l.swap(60, 61);
    write_lines(&path, &l);
    assert_broken(
        dir.path(),
        &["record 60 (line 61, seq 61)", "sequence number 61 where 60"],
    );
}

#[tokio::test]
async fn verify_refuses_without_an_anchor_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    std::fs::remove_file(default_anchor_path(&path)).unwrap();
    assert_broken(dir.path(), &["no anchor at", "--no-anchor"]);
    let out = relaypacs(dir.path(), &["audit", "verify", "--no-anchor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{N} records verified")));
    // No trail at all.
    let empty = tempfile::tempdir().unwrap();
    let out = relaypacs(empty.path(), &["audit", "verify", "--no-anchor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot open"));
}

#[tokio::test]
async fn export_writes_one_dicom_message_or_json_line_per_event_in_range() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    let out_file = dir.path().join("export.xml");
    // Events at minutes 10..=19: from inclusive, to exclusive.
    let out = relaypacs(
        dir.path(),
        &[
            "audit",
            "export",
            "--format",
            "dicom-xml",
            "--from",
            "2026-01-01T00:10:00Z",
            "--to",
            "2026-01-01T00:20:00Z",
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let xml = std::fs::read_to_string(&out_file).unwrap();
    assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));
    assert_eq!(xml.matches("<AuditMessage>").count(), 10);
    assert_eq!(xml.matches("</AuditMessage>").count(), 10);
    assert_eq!(
        xml.matches("csd-code=\"110103\"").count(),
        10,
        "DICOM Instances Accessed"
    );
    assert_eq!(
        xml.matches("csd-code=\"110180\"").count(),
        10,
        "a study per message"
    );
    assert!(xml.contains("ParticipantObjectID=\"1.2.826.0.1.3680043.2.11\""));
    assert!(xml.contains("EventDateTime=\"2026-01-01T00:10:00Z\""));
    assert!(!xml.contains("2026-01-01T00:20:00Z"), "--to is exclusive");
    assert!(
        xml.contains("n=10 &lt;&amp;&gt; &quot;quoted&quot;"),
        "escaped text"
    );

    // JSON lines to standard output, whole trail.
    let out = relaypacs(dir.path(), &["audit", "export", "--format", "jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<AuditEvent> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), N);
    assert_eq!(events[7].user, "user7");

    // A trail that does not verify is not exported; bad arguments are refused.
    let mut l = lines(&path);
    l.swap(3, 4);
    write_lines(&path, &l);
    let out = relaypacs(dir.path(), &["audit", "export", "--format", "jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("record 3 (line 4, seq 4)"));
    assert!(out.stdout.is_empty());
    let out = relaypacs(dir.path(), &["audit", "export", "--format", "pdf"]);
    assert!(!out.status.success());
    let out = relaypacs(
        dir.path(),
        &[
            "audit",
            "export",
            "--format",
            "jsonl",
            "--from",
            "yesterday",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("RFC 3339"));
}

/// The running server's own trail: it verifies with the binary after a
/// stop; the head anchored by `AuditSink::close` (what the shutdown path
/// calls) catches a tail cut below it.
#[tokio::test]
async fn the_servers_trail_verifies_and_its_closed_head_catches_a_cut() {
    let mut ts = common::TestServer::start().await;
    let alice = ts.user("alice", relaypacs_http::auth::Role::Uploader).await;
    ts.new_study(&alice).await;
    ts.server().state().audit().close().await.unwrap();
    let data = ts.data();
    let trail = data.join("audit").join("audit.jsonl");
    let anchored = read_anchor(&default_anchor_path(&trail))
        .unwrap()
        .unwrap()
        .head;
    assert_eq!(anchored.count as usize, lines(&trail).len());
    assert!(anchored.count >= 2, "start, login, study: {anchored:?}");
    // Stopped, keeping the data folder (`TestServer::stop` drops it).
    ts.server.take().unwrap().shutdown().await;

    let out = relaypacs(&data, &["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let l = lines(&trail);
    let k = anchored.count as usize;
    write_lines(&trail, &l[..k - 1]);
    assert_broken(&data, &[&format!("record {} (line {k})", k - 1), "cut"]);
}

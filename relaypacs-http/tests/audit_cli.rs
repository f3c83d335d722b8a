//! `relaypacs audit verify` and `relaypacs audit export`, run as the real
//! binary, on both trails: the chain in the state database (the default:
//! `[state]`, anchored in `<data_dir>/audit/sql-chain.anchor`) and a
//! JSON-lines trail (`--trail FILE`). An intact chain verifies (count and
//! head printed, exit 0); a cut tail, a flipped byte, a deleted record and
//! two swapped records each fail (exit 1) with the first broken record
//! named; export writes one DICOM PS3.15 audit message (or JSON line) per
//! event in the time range.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink, Uid};
use relaypacs_storage::audit_anchor::{default_anchor_path, read_anchor};
use relaypacs_storage::{ChainHead, JsonlAuditSink, SqlAuditSink, SqlOptions, SqlState};
use time::macros::datetime;

const N: usize = 100;

/// Event `i` of the test trails: one per minute from 2026-01-01 00:00 UTC.
fn event(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(
        format!("user{i}"),
        AuditAction::DataAccessed,
        AuditOutcome::Success,
    );
    e.time = datetime!(2026-01-01 0:00 UTC) + time::Duration::minutes(i as i64);
    e.study = Some(Uid::parse(&format!("1.2.826.0.1.3680043.2.{}", i + 1)).unwrap());
    e.detail = format!("n={i} <&> \"quoted\"");
    e
}

/// A JSON-lines trail of `N` events, anchored at close, at
/// `<dir>/audit/audit.jsonl` (where `[audit] jsonl = true` puts it).
async fn make_trail(dir: &Path) -> (PathBuf, ChainHead) {
    let path = dir.join("audit").join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    for i in 0..N {
        sink.record(&event(i)).await.unwrap();
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

/// `audit verify ARGS` on the tampered trail fails with exit 1 and names
/// `expect`.
fn assert_broken_with(dir: &Path, args: &[&str], expect: &[&str]) {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    let out = relaypacs(dir, &all);
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

/// `audit verify --trail PATH` fails naming `expect`.
fn assert_broken(dir: &Path, trail: &Path, expect: &[&str]) {
    assert_broken_with(dir, &["--trail", trail.to_str().unwrap()], expect);
}

/// `audit verify --trail PATH ARGS`.
fn verify_trail(dir: &Path, trail: &Path, args: &[&str]) -> Output {
    let mut all = vec!["audit", "verify", "--trail", trail.to_str().unwrap()];
    all.extend_from_slice(args);
    relaypacs(dir, &all)
}

#[tokio::test]
async fn verify_accepts_an_intact_trail_printing_count_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let (path, head) = make_trail(dir.path()).await;
    let out = verify_trail(dir.path(), &path, &[]);
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
        &path,
        &["record 97 (line 98)", "the last 3 records were cut"],
    );
    // Without the anchor the shortened chain is consistent: the anchor is
    // what catches the cut.
    let out = verify_trail(dir.path(), &path, &["--no-anchor"]);
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
        &path,
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
        &path,
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
        &path,
        &["record 60 (line 61, seq 61)", "sequence number 61 where 60"],
    );
}

#[tokio::test]
async fn verify_refuses_without_an_anchor_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    std::fs::remove_file(default_anchor_path(&path)).unwrap();
    assert_broken(dir.path(), &path, &["no anchor at", "--no-anchor"]);
    let out = verify_trail(dir.path(), &path, &["--no-anchor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{N} records verified")));
    // No trail at all.
    let empty = tempfile::tempdir().unwrap();
    let missing = empty.path().join("audit").join("audit.jsonl");
    let out = verify_trail(empty.path(), &missing, &["--no-anchor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot open"));
    // The database's chain: no anchor, no database.
    let (db, _) = make_sql_chain(empty.path()).await;
    db.close().await;
    std::fs::remove_file(empty.path().join("audit").join("sql-chain.anchor")).unwrap();
    assert_broken_with(
        empty.path(),
        &[],
        &["no anchor at", "sql-chain.anchor", "--no-anchor"],
    );
    let out = relaypacs(empty.path(), &["audit", "verify", "--no-anchor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{N} records verified")));
    let none = tempfile::tempdir().unwrap();
    assert_broken_with(none.path(), &["--no-anchor"], &["no state database at"]);
}

#[tokio::test]
async fn export_writes_one_dicom_message_or_json_line_per_event_in_range() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = make_trail(dir.path()).await;
    let out_file = dir.path().join("export.xml");
    let trail = path.to_str().unwrap();
    // Events at minutes 10..=19: from inclusive, to exclusive.
    let out = relaypacs(
        dir.path(),
        &[
            "audit",
            "export",
            "--trail",
            trail,
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
    let out = relaypacs(
        dir.path(),
        &["audit", "export", "--trail", trail, "--format", "jsonl"],
    );
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
    let out = relaypacs(
        dir.path(),
        &["audit", "export", "--trail", trail, "--format", "jsonl"],
    );
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

/// The state database of data folder `dir` (the default `[state]`).
async fn state_db(dir: &Path) -> SqlState {
    let url = format!("sqlite://{}", dir.join("state.db").display());
    SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .unwrap()
}

/// The chain of `N` events in the state database of data folder `dir`,
/// anchored at close where the server anchors it by default
/// (`<dir>/audit/sql-chain.anchor`).
async fn make_sql_chain(dir: &Path) -> (SqlState, ChainHead) {
    let db = state_db(dir).await;
    let anchor = dir.join("audit").join("sql-chain.anchor");
    let sink = SqlAuditSink::open_anchored(db.clone(), &anchor, 1000, None)
        .await
        .unwrap();
    for i in 0..N {
        sink.record(&event(i)).await.unwrap();
    }
    sink.close().await.unwrap();
    let head = sink.head().await.unwrap();
    assert_eq!(head.count, N as u64);
    assert_eq!(read_anchor(&anchor).unwrap().unwrap().head, head);
    (db, head)
}

/// Run `sql` as the database's owner on one connection, the append-only
/// triggers dropped first (what a superuser could do).
async fn tamper(db: &SqlState, sql: &[&str]) {
    let mut conn = db.pool().acquire().await.unwrap();
    for s in [
        "DROP TRIGGER IF EXISTS audit_events_no_update",
        "DROP TRIGGER IF EXISTS audit_events_no_delete",
    ]
    .iter()
    .chain(sql)
    {
        sqlx::query(s).execute(&mut *conn).await.unwrap();
    }
}

#[tokio::test]
async fn sql_chain_verifies_by_default_and_each_tampering_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (db, head) = make_sql_chain(dir.path()).await;
    let out = relaypacs(dir.path(), &["audit", "verify"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("audit chain in sqlite://"), "{stdout}");
    assert!(
        stdout.contains(&format!("{N} records verified")),
        "{stdout}"
    );
    assert!(stdout.contains(&hex::encode(head.hash)), "{stdout}");
    assert!(stdout.contains("sql-chain.anchor"), "{stdout}");
    assert!(
        stdout.contains(&format!("{N} records, anchored")),
        "{stdout}"
    );

    // One byte of record 40's event changed.
    tamper(
        &db,
        &["UPDATE audit_events SET event = replace(event, 'n=40 ', 'n=50 ') WHERE seq = 40"],
    )
    .await;
    assert_broken_with(
        dir.path(),
        &[],
        &["record 40 (line 41, seq 40)", "does not match its hash"],
    );
    tamper(
        &db,
        &["UPDATE audit_events SET event = replace(event, 'n=50 ', 'n=40 ') WHERE seq = 40"],
    )
    .await;
    assert!(relaypacs(dir.path(), &["audit", "verify"]).status.success());

    // Two records swapped: each row moved to the other's seq.
    tamper(
        &db,
        &[
            "CREATE TEMP TABLE swapped AS SELECT * FROM audit_events WHERE seq IN (60, 61)",
            "DELETE FROM audit_events WHERE seq IN (60, 61)",
            "INSERT INTO audit_events SELECT 121 - seq, prev, hash, event FROM swapped",
        ],
    )
    .await;
    assert_broken_with(
        dir.path(),
        &[],
        &["record 60 (line 61, seq 60)", "previous record's hash"],
    );

    // A record deleted.
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = make_sql_chain(dir.path()).await;
    tamper(&db, &["DELETE FROM audit_events WHERE seq = 40"]).await;
    assert_broken_with(
        dir.path(),
        &[],
        &["record 40 (line 41, seq 41)", "record 40 is missing"],
    );
}

/// A cut tail with `audit_head` rewritten to match: the chain is
/// consistent on its own (`--no-anchor` passes) and only the anchor outside
/// the database catches it; a rewritten tail (same length, other records)
/// is caught as well, and several anchors (one per gateway) are checked.
#[tokio::test]
async fn the_anchor_catches_a_cut_or_rewritten_tail_of_the_sql_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = make_sql_chain(dir.path()).await;
    tamper(
        &db,
        &[
            "DELETE FROM audit_events WHERE seq >= 97",
            "UPDATE audit_head SET records = 97, last_hash = (SELECT hash FROM audit_events WHERE seq = 96)",
        ],
    )
    .await;
    let out = relaypacs(dir.path(), &["audit", "verify", "--no-anchor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("97 records verified"));
    assert_broken_with(
        dir.path(),
        &[],
        &["record 97 (line 98)", "the last 3 records were cut"],
    );
    // Export reads only a chain that verifies; this one does (against
    // audit_head), export does not check anchors.
    let out = relaypacs(dir.path(), &["audit", "export", "--format", "jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 97);

    // Three records appended again: as long as the anchor, other content.
    let sink = SqlAuditSink::new(db.clone());
    for i in 0..3 {
        let mut e = event(97 + i);
        e.detail = format!("forged {i}");
        sink.record(&e).await.unwrap();
    }
    assert_broken_with(dir.path(), &[], &["record 99", "rewritten"]);

    // Several anchors: an older one that still holds, and the newest,
    // which does not.
    let old = dir.path().join("gw2.anchor");
    relaypacs_storage::audit_anchor::write_anchor(
        &old,
        ChainHead {
            count: 50,
            hash: hex_hash(&db, 49).await,
        },
    )
    .unwrap();
    let out = relaypacs(
        dir.path(),
        &["audit", "verify", "--anchor", old.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("gw2.anchor: 50 records"));
    let newest = dir.path().join("audit").join("sql-chain.anchor");
    assert_broken_with(
        dir.path(),
        &[
            "--anchor",
            old.to_str().unwrap(),
            "--anchor",
            newest.to_str().unwrap(),
        ],
        &["record 99", "rewritten"],
    );
}

/// The hash of row `seq`.
async fn hex_hash(db: &SqlState, seq: i64) -> [u8; 32] {
    use sqlx::Row;
    let row = sqlx::query("SELECT hash FROM audit_events WHERE seq = $1")
        .bind(seq)
        .fetch_one(db.pool())
        .await
        .unwrap();
    let mut out = [0u8; 32];
    hex::decode_to_slice(row.get::<String, _>(0), &mut out).unwrap();
    out
}

#[tokio::test]
async fn export_reads_the_sql_chain_by_default_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = make_sql_chain(dir.path()).await;
    let out = relaypacs(
        dir.path(),
        &[
            "audit",
            "export",
            "--format",
            "jsonl",
            "--from",
            "2026-01-01T00:10:00Z",
            "--to",
            "2026-01-01T00:20:00Z",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<AuditEvent> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events, (10..20).map(event).collect::<Vec<_>>());
    tamper(
        &db,
        &["UPDATE audit_events SET event = replace(event, 'user3', 'userX') WHERE seq = 3"],
    )
    .await;
    let out = relaypacs(dir.path(), &["audit", "export", "--format", "jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("record 3 (line 4, seq 3)"));
    assert!(out.stdout.is_empty());
}

/// The running server's own chain: it verifies with the binary after a
/// stop; the head anchored by `AuditSink::close` (what the shutdown path
/// calls) catches a tail cut below it, even with `audit_head` rewritten;
/// the server then refuses to start on it.
#[tokio::test]
async fn the_servers_chain_verifies_and_its_closed_head_catches_a_cut() {
    let mut ts = common::TestServer::start().await;
    let alice = ts.user("alice", relaypacs_http::auth::Role::Uploader).await;
    ts.new_study(&alice).await;
    ts.server().state().audit().close().await.unwrap();
    let data = ts.data();
    let anchored = read_anchor(&data.join("audit").join("sql-chain.anchor"))
        .unwrap()
        .unwrap()
        .head;
    let rows = common::state_rows(&data, "SELECT CAST(COUNT(*) AS TEXT) FROM audit_events").await;
    assert_eq!(rows[0][0], anchored.count.to_string());
    assert!(anchored.count >= 2, "start, login, study: {anchored:?}");
    assert!(
        !data.join("audit").join("audit.jsonl").exists(),
        "no JSON-lines trail unless [audit] jsonl = true"
    );
    // Stopped, keeping the data folder (`TestServer::stop` drops it).
    ts.server.take().unwrap().shutdown().await;

    let out = relaypacs(&data, &["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let k = anchored.count;
    let db = state_db(&data).await;
    tamper(
        &db,
        &[
            &format!("DELETE FROM audit_events WHERE seq >= {}", k - 1),
            &format!(
                "UPDATE audit_head SET records = {}, last_hash = (SELECT hash FROM audit_events WHERE seq = {})",
                k - 1,
                k - 2
            ),
        ],
    )
    .await;
    db.close().await;
    assert_broken_with(
        &data,
        &[],
        &[&format!("record {} (line {k})", k - 1), "cut"],
    );
    // The server does not start on a chain its anchor says was cut.
    let Err(err) = relaypacs_http::Server::start(common::test_config(data.parent().unwrap())).await
    else {
        panic!("the server started on a cut chain");
    };
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert!(text.contains("tail was cut"), "{text}");
}

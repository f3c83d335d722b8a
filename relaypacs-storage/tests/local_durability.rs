//! Durability and tamper-evidence of the embedded adapters beyond the
//! conformance suites: state survives reopening, torn tails from crashes are
//! cut, a second process cannot open the same folder, and every kind of
//! tampering with the audit chain is detected at the first bad record.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::Write;

use relaypacs_core::testing::session_store::sample_session;
use relaypacs_core::{
    AuditAction, AuditEvent, AuditOutcome, AuditSink, ChunkRecord, SessionStore, Sha256Digest,
};
use relaypacs_storage::audit_anchor::{default_anchor_path, read_anchor, write_anchor};
use relaypacs_storage::{
    AuditTrailOptions, ChainErrorKind, ChainHead, JsonlAuditSink, LocalChunkStore, SqlOptions,
    SqlSessionStore, SqlState, verify_chain, verify_chain_against, verify_trail,
};

#[tokio::test]
async fn sql_sessions_and_chunks_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let s = sample_session();
    let file = *s.files.keys().next().unwrap();
    let rec = ChunkRecord::new(0, 10, Sha256Digest::of(b"0123456789"), String::new());
    {
        let db = SqlState::connect(&url, None, &SqlOptions::default())
            .await
            .unwrap();
        let store = SqlSessionStore::new(db.clone());
        store.create_session(&s).await.unwrap();
        store.record_chunk(s.id, file, &rec).await.unwrap();
        db.close().await;
    }
    let db = SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .unwrap();
    let store = SqlSessionStore::new(db.clone());
    let v = store.load_session(s.id).await.unwrap();
    assert_eq!(v.value, s);
    assert_eq!(store.chunks(s.id, file).await.unwrap(), vec![rec.clone()]);
    let rec2 = ChunkRecord::new(10, 5, Sha256Digest::of(b"abcde"), String::new());
    store.record_chunk(s.id, file, &rec2).await.unwrap();
    db.close().await;
    let db = SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .unwrap();
    let store = SqlSessionStore::new(db);
    assert_eq!(store.chunks(s.id, file).await.unwrap(), vec![rec, rec2]);
}

#[tokio::test]
async fn chunk_store_refuses_second_process_and_sweeps_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("chunks");
    let a = LocalChunkStore::open(&root).unwrap();
    assert!(LocalChunkStore::open(&root).is_err());
    drop(a);
    std::fs::write(root.join(".x.deadbeef.tmp"), b"leftover").unwrap();
    let _b = LocalChunkStore::open(&root).unwrap();
    assert!(
        !root.join(".x.deadbeef.tmp").exists(),
        "leftover temp files are swept at open"
    );
}

fn ev(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(
        format!("user{i}"),
        AuditAction::ChunkStored,
        AuditOutcome::Success,
    );
    e.detail = format!("n={i}");
    e
}

fn lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(p: &std::path::Path, l: &[String]) {
    std::fs::write(p, l.iter().map(|s| format!("{s}\n")).collect::<String>()).unwrap();
}

/// AUD-5: flip a byte, delete, swap, truncate: each is detected, naming the first bad record.
#[tokio::test]
async fn audit_chain_detects_every_kind_of_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    let n = 2_000;
    for i in 0..n {
        sink.record(&ev(i)).await.unwrap();
    }
    let anchor = sink.head().await;
    drop(sink);
    assert_eq!(verify_chain(&path).unwrap(), anchor);
    assert_eq!(anchor.count, n as u64);
    let orig = lines(&path);
    let copy = dir.path().join("copy.jsonl");

    // 1. flip one byte inside record 1000's event
    let mut l = orig.clone();
    l[1000] = l[1000].replacen("n=1000", "n=1001", 1);
    write_lines(&copy, &l);
    assert_eq!(verify_chain(&copy).unwrap_err().index, 1000);
    // 2. delete record 1000
    let mut l = orig.clone();
    l.remove(1000);
    write_lines(&copy, &l);
    assert_eq!(verify_chain(&copy).unwrap_err().index, 1000);
    // 3. swap records 10 and 11
    let mut l = orig.clone();
    l.swap(10, 11);
    write_lines(&copy, &l);
    assert_eq!(verify_chain(&copy).unwrap_err().index, 10);
    // 4. truncate the last 5 records: the chain itself is consistent, the anchor catches it
    let l = orig[..n - 5].to_vec();
    write_lines(&copy, &l);
    assert!(verify_chain(&copy).is_ok());
    assert_eq!(
        verify_chain_against(&copy, anchor).unwrap_err().index,
        (n - 5) as u64
    );
    // A tampered file refuses to open as a sink.
    let mut l = orig.clone();
    l[3] = l[3].replacen("user3", "userX", 1);
    write_lines(&copy, &l);
    assert!(JsonlAuditSink::open(&copy).is_err());
}

#[tokio::test]
async fn audit_torn_tail_is_cut_and_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    for i in 0..3 {
        sink.record(&ev(i)).await.unwrap();
    }
    drop(sink);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"seq\":3,\"pr")
        .unwrap();
    let sink = JsonlAuditSink::open(&path).unwrap();
    sink.record(&ev(3)).await.unwrap();
    assert_eq!(sink.events().await.unwrap().len(), 4);
    assert_eq!(verify_chain(&path).unwrap().count, 4);
}

/// Each kind of tampering names the record: position, line and the
/// sequence number it carries, and what is wrong.
#[tokio::test]
async fn audit_chain_errors_name_the_record_line_and_defect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    for i in 0..50 {
        sink.record(&ev(i)).await.unwrap();
    }
    let anchor = sink.anchor().await.unwrap();
    drop(sink);
    let orig = lines(&path);
    let copy = dir.path().join("copy.jsonl");

    let mut l = orig.clone();
    l[20] = l[20].replacen("n=20", "n=21", 1);
    write_lines(&copy, &l);
    let e = verify_trail(&copy, Some(anchor)).unwrap_err();
    assert_eq!(
        (e.index, e.line, e.seq, e.kind),
        (20, 21, Some(20), ChainErrorKind::HashMismatch)
    );
    assert!(e.to_string().contains("record 20 (line 21, seq 20)"), "{e}");

    let mut l = orig.clone();
    l.remove(20);
    write_lines(&copy, &l);
    let e = verify_trail(&copy, Some(anchor)).unwrap_err();
    assert_eq!(
        (e.index, e.line, e.seq, e.kind),
        (20, 21, Some(21), ChainErrorKind::OutOfSequence)
    );
    assert!(e.reason.contains("record 20 is missing"), "{e}");

    let mut l = orig.clone();
    l.swap(30, 31);
    write_lines(&copy, &l);
    let e = verify_trail(&copy, Some(anchor)).unwrap_err();
    assert_eq!(
        (e.index, e.seq, e.kind),
        (30, Some(31), ChainErrorKind::OutOfSequence)
    );

    write_lines(&copy, &orig[..47]);
    let e = verify_trail(&copy, Some(anchor)).unwrap_err();
    assert_eq!(
        (e.index, e.line, e.seq, e.kind),
        (47, 48, None, ChainErrorKind::Truncated)
    );
    assert!(e.reason.contains("last 3 records were cut"), "{e}");

    // A tail cut inside a record: the torn line is named.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&copy, &bytes).unwrap();
    let e = verify_trail(&copy, Some(anchor)).unwrap_err();
    assert_eq!((e.index, e.kind), (49, ChainErrorKind::Torn));

    // A chain rewritten consistently up to the anchor still differs from it.
    let mut other = ChainHead {
        count: 50,
        hash: anchor.hash,
    };
    other.hash[0] ^= 1;
    let e = verify_trail(&path, Some(other)).unwrap_err();
    assert_eq!((e.index, e.kind), (49, ChainErrorKind::AnchorMismatch));

    assert_eq!(verify_trail(&path, Some(anchor)).unwrap(), anchor);
}

/// The head is anchored outside the trail at open, at close, every N
/// records and every T seconds; an anchor never runs ahead of the trail.
#[tokio::test]
async fn audit_anchor_is_written_at_open_close_every_n_records_and_periodically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trail/audit.jsonl");
    let anchor_path = dir.path().join("elsewhere/head.anchor");
    let opts = AuditTrailOptions::default()
        .anchor_path(&anchor_path)
        .anchor_every_records(5)
        .anchor_interval(None);
    let sink = JsonlAuditSink::open_with(&path, opts.clone()).unwrap();
    assert_eq!(sink.anchor_path(), anchor_path);
    let anchored = || read_anchor(&anchor_path).unwrap().unwrap().head;
    assert_eq!(anchored().count, 0, "anchored at open");
    for i in 0..4 {
        sink.record(&ev(i)).await.unwrap();
    }
    assert_eq!(anchored().count, 0);
    sink.record(&ev(4)).await.unwrap();
    assert_eq!(anchored(), sink.head().await, "anchored at the 5th record");
    for i in 5..9 {
        sink.record(&ev(i)).await.unwrap();
    }
    assert_eq!(anchored().count, 5);
    sink.close().await.unwrap();
    assert_eq!(anchored(), sink.head().await, "anchored at close");
    assert_eq!(anchored().count, 9);
    assert!(
        !default_anchor_path(&path).exists(),
        "only the configured anchor is written"
    );
    drop(sink);

    // By time: a timer anchors an idle trail's head.
    let opts = opts
        .anchor_every_records(0)
        .anchor_interval(Some(std::time::Duration::from_millis(700)));
    let opened = std::time::Instant::now();
    let sink = JsonlAuditSink::open_with(&path, opts).unwrap();
    sink.record(&ev(9)).await.unwrap();
    sink.record(&ev(10)).await.unwrap();
    if opened.elapsed() < std::time::Duration::from_millis(600) {
        // Neither the appends nor the timer were due yet: what follows is the timer's.
        assert_eq!(anchored().count, 9);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while anchored().count != 11 {
        assert!(
            std::time::Instant::now() < deadline,
            "the timer did not anchor the head"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(anchored(), sink.head().await);
    assert_eq!(verify_trail(&path, Some(anchored())).unwrap().count, 11);
    drop(sink);

    // A zero interval anchors at every append (and starts no timer).
    let opts = AuditTrailOptions::default()
        .anchor_path(&anchor_path)
        .anchor_every_records(0)
        .anchor_interval(Some(std::time::Duration::ZERO));
    let sink = JsonlAuditSink::open_with(&path, opts).unwrap();
    for i in 11..14 {
        sink.record(&ev(i)).await.unwrap();
        assert_eq!(anchored(), sink.head().await);
    }
}

/// With its anchor, a cut tail, a deleted trail or a rewritten anchor
/// refuses to open; temp files a crash left beside the anchor are swept.
#[tokio::test]
async fn audit_trail_cut_against_its_anchor_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    for i in 0..10 {
        sink.record(&ev(i)).await.unwrap();
    }
    sink.close().await.unwrap();
    let head = sink.head().await;
    drop(sink);
    let anchor_path = default_anchor_path(&path);
    assert_eq!(read_anchor(&anchor_path).unwrap().unwrap().head, head);
    let orig = lines(&path);

    // Cut the last 3 records: the chain alone verifies, the anchor does not.
    write_lines(&path, &orig[..7]);
    assert!(verify_chain(&path).is_ok());
    let err = JsonlAuditSink::open(&path).unwrap_err();
    // The message is in the cause chain (not repeated at each level).
    let mut err_chain = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        err_chain += &format!(": {c}");
        cause = c.source();
    }
    let err = err_chain;
    assert!(err.contains("record 7") && err.contains("cut"), "{err}");

    // The whole trail deleted.
    std::fs::remove_file(&path).unwrap();
    assert!(JsonlAuditSink::open(&path).is_err());

    // Restored, with an anchor rewritten to another head.
    write_lines(&path, &orig);
    let mut forged = head;
    forged.hash[5] ^= 0x40;
    write_anchor(&anchor_path, forged).unwrap();
    assert!(JsonlAuditSink::open(&path).is_err());

    // The true anchor back, plus a temp file left by a crash mid-anchor.
    write_anchor(&anchor_path, head).unwrap();
    let leftover = dir.path().join(".audit.jsonl.anchor.0123456789abcdef.tmp");
    std::fs::write(&leftover, b"{\"count\":9").unwrap();
    let sink = JsonlAuditSink::open(&path).unwrap();
    assert!(
        !leftover.exists(),
        "leftover anchor temp files are swept at open"
    );
    assert_eq!(sink.head().await, head);
    sink.record(&ev(10)).await.unwrap();
    sink.close().await.unwrap();
    assert_eq!(read_anchor(&anchor_path).unwrap().unwrap().head.count, 11);
}

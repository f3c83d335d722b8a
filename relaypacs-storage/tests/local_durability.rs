//! Durability and tamper-evidence of the local adapters beyond the
//! conformance suites: state survives reopening, torn tails from crashes are
//! cut, a second process cannot open the same folder, and every kind of
//! tampering with the audit chain is detected at the first bad record.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::Write;

use relaypacs_core::testing::session_store::sample_session;
use relaypacs_core::{
    AuditAction, AuditEvent, AuditOutcome, AuditSink, ChunkRecord, SessionStore, Sha256Digest,
};
use relaypacs_storage::{
    FileSessionStore, JsonlAuditSink, LocalChunkStore, verify_chain, verify_chain_against,
};

#[tokio::test]
async fn sessions_and_chunks_survive_reopen_and_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sessions");
    let s = sample_session();
    let file = *s.files.keys().next().unwrap();
    let rec = ChunkRecord::new(0, 10, Sha256Digest::of(b"0123456789"), String::new());
    {
        let store = FileSessionStore::open(&root).unwrap();
        store.create_session(&s).await.unwrap();
        store.record_chunk(s.id, file, &rec).await.unwrap();
        assert!(
            FileSessionStore::open(&root).is_err(),
            "a second open of the same folder must be refused"
        );
    }
    // A crash in the middle of an append leaves a torn line.
    let log = root
        .join(s.id.to_string())
        .join("chunks")
        .join(format!("{file}.jsonl"));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(b"{\"offset\":10,\"len")
        .unwrap();
    let store = FileSessionStore::open(&root).unwrap();
    let v = store.load_session(s.id).await.unwrap();
    assert_eq!(v.value, s);
    assert_eq!(store.chunks(s.id, file).await.unwrap(), vec![rec.clone()]);
    let rec2 = ChunkRecord::new(10, 5, Sha256Digest::of(b"abcde"), String::new());
    store.record_chunk(s.id, file, &rec2).await.unwrap();
    drop(store);
    let store = FileSessionStore::open(&root).unwrap();
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

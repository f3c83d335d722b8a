//! A caller that gives up mid-append (a client hanging up) never breaks
//! the audit hash chain: every started record is either whole and linked,
//! or absent.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::time::Duration;

use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink};
use relaypacs_storage::JsonlAuditSink;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_records_keep_the_chain_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlAuditSink::open(&path).unwrap();
    for i in 0..200u64 {
        let ev = AuditEvent::new("u", AuditAction::DataAccessed, AuditOutcome::Success);
        let fut = sink.record(&ev);
        // Cancel most appends at a varying point (often inside the fsync).
        if i % 4 != 0 {
            let _ = tokio::time::timeout(Duration::from_micros(i * 7), fut).await;
        } else {
            fut.await.unwrap();
        }
    }
    let ev = AuditEvent::new("u", AuditAction::DataAccessed, AuditOutcome::Success);
    sink.record(&ev).await.unwrap();
    // Let detached appends finish, then check every link.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let head = relaypacs_storage::verify_chain(&path).unwrap();
    assert!(head.count >= 51, "{}", head.count);
    assert_eq!(sink.events().await.unwrap().len() as u64, head.count);
}

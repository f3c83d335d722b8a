//! The shared conformance suites run against the local adapters.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_storage::{FileSessionStore, JsonlAuditSink, LocalChunkStore};
use tempfile::TempDir;

async fn chunks() -> (LocalChunkStore, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    (
        LocalChunkStore::open(dir.path().join("chunks")).expect("open"),
        dir,
    )
}

async fn sessions() -> (FileSessionStore, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    (
        FileSessionStore::open(dir.path().join("sessions")).expect("open"),
        dir,
    )
}

async fn audit() -> (JsonlAuditSink, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    (
        JsonlAuditSink::open(dir.path().join("audit/audit.jsonl")).expect("open"),
        dir,
    )
}

relaypacs_core::chunk_store_conformance!(local_chunk_store, chunks);
relaypacs_core::session_store_conformance!(file_session_store, sessions);
relaypacs_core::audit_sink_conformance!(jsonl_audit_sink, audit);

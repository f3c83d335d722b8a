//! The shared conformance suites run against the local adapters (the SQL
//! session store's run is in sql_conformance.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_storage::{JsonlAuditSink, LocalChunkStore};
use tempfile::TempDir;

async fn chunks() -> (LocalChunkStore, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    (
        LocalChunkStore::open(dir.path().join("chunks")).expect("open"),
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
relaypacs_core::audit_sink_conformance!(jsonl_audit_sink, audit);

//! The conformance suites in a crate that depends on neither `tokio` nor
//! `async-trait` (this one: see its Cargo.toml): several suites in one
//! module, a probe implemented with the `async_trait` re-exported by
//! `relaypacs_core::testing`. Naming `tokio` here would not compile.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

mod suites {
    use relaypacs_core::testing::async_trait;
    use relaypacs_core::testing::pacs_sink::SinkProbe;
    use relaypacs_core::testing::tempfile::TempDir;
    use relaypacs_core::{Instance, Result};
    use relaypacs_pacs::LocalArchiveSink;
    use relaypacs_storage::{
        JsonlAuditSink, LocalChunkStore, SqlOptions, SqlSessionStore, SqlState,
    };

    async fn chunks() -> (LocalChunkStore, TempDir) {
        let dir = TempDir::new().unwrap();
        (LocalChunkStore::open(dir.path().join("c")).unwrap(), dir)
    }

    async fn sessions() -> (SqlSessionStore, TempDir) {
        let dir = TempDir::new().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let db = SqlState::connect(&url, None, &SqlOptions::default())
            .await
            .unwrap();
        (SqlSessionStore::new(db), dir)
    }

    async fn audit() -> (JsonlAuditSink, TempDir) {
        let dir = TempDir::new().unwrap();
        (
            JsonlAuditSink::open(dir.path().join("a.jsonl")).unwrap(),
            dir,
        )
    }

    struct Probe(LocalArchiveSink);

    #[async_trait]
    impl SinkProbe for Probe {
        async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
            Ok(self
                .0
                .find(&instance.dicom.sop_instance_uid)?
                .map(|p| std::fs::read(p).unwrap()))
        }
    }

    async fn archive() -> (LocalArchiveSink, Probe, TempDir) {
        let dir = TempDir::new().unwrap();
        let sink = LocalArchiveSink::open(dir.path().join("archive")).unwrap();
        (sink.clone(), Probe(sink), dir)
    }

    relaypacs_core::chunk_store_conformance!(local_chunks, chunks);
    relaypacs_core::session_store_conformance!(sql_sessions, sessions);
    relaypacs_core::audit_sink_conformance!(jsonl_audit, audit);
    relaypacs_core::pacs_sink_conformance!(local_archive, archive);
    // The same suite twice in one module, under two names.
    relaypacs_core::chunk_store_conformance!(local_chunks_again, chunks);
}

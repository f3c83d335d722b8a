//! The shared PACS-sink conformance suite against the local archive.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use async_trait::async_trait;
use relaypacs_core::testing::pacs_sink::SinkProbe;
use relaypacs_core::{Instance, Result};
use relaypacs_pacs::LocalArchiveSink;
use tempfile::TempDir;

struct Probe(LocalArchiveSink);

#[async_trait]
impl SinkProbe for Probe {
    async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
        Ok(self
            .0
            .find(&instance.dicom.sop_instance_uid)?
            .map(|p| std::fs::read(p).expect("read archived file")))
    }
}

async fn archive() -> (LocalArchiveSink, Probe, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    let sink = LocalArchiveSink::open(dir.path().join("archive")).expect("open");
    (sink.clone(), Probe(sink), dir)
}

relaypacs_core::pacs_sink_conformance!(local_archive, archive);

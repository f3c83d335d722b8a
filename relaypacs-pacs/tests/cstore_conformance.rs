//! The shared PACS-sink conformance suite for the C-STORE sink: in full
//! against a real Orthanc that lets us retrieve by C-GET (content
//! verification), again against one that does not (C-FIND, presence only),
//! and against dcmtk's storescp (an independent C-STORE SCP with neither
//! C-GET nor C-FIND: verify answers from the acknowledged C-STOREs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use async_trait::async_trait;
use relaypacs_core::testing::pacs_sink::SinkProbe;
use relaypacs_core::{Instance, Result};
use relaypacs_pacs::{CStoreConfig, CStoreSink};
use relaypacs_test_peers::{Orthanc, OrthancOptions, StoreScp};

fn sink(port: u16, called_ae: &str) -> CStoreSink {
    CStoreSink::new(CStoreConfig {
        address: format!("127.0.0.1:{port}"),
        called_ae: called_ae.into(),
        ..CStoreConfig::default()
    })
    .expect("valid config")
}

/// Reads back what Orthanc stored (its own file meta group, our data set).
struct OrthancProbe(Orthanc);

#[async_trait]
impl SinkProbe for OrthancProbe {
    async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
        Ok(tokio::task::block_in_place(|| {
            self.0
                .instance_file(instance.dicom.sop_instance_uid.as_str())
        }))
    }

    fn preserves_file_meta(&self) -> bool {
        false
    }
}

async fn orthanc() -> (CStoreSink, OrthancProbe, ()) {
    let o = tokio::task::block_in_place(|| Orthanc::start_with_get(OrthancOptions::default()));
    (sink(o.dicom_port, &o.aet), OrthancProbe(o), ())
}

/// A C-STORE sink pointed at a port nothing listens on.
async fn cstore_to_nowhere() -> (CStoreSink, ()) {
    (sink(relaypacs_test_peers::free_port(), "NOWHERE"), ())
}

relaypacs_core::pacs_sink_conformance!(orthanc_with_get, orthanc, unreachable = cstore_to_nowhere);

/// Orthanc refusing C-GET to our AE (its default): the sink falls back to
/// C-FIND, presence only.
mod orthanc_without_get {
    use super::*;

    async fn orthanc() -> (CStoreSink, OrthancProbe, ()) {
        let o = tokio::task::block_in_place(Orthanc::start);
        (sink(o.dicom_port, &o.aet), OrthancProbe(o), ())
    }

    relaypacs_core::pacs_sink_conformance!(conformance, orthanc);
}

/// dcmtk's storescp has neither C-GET nor C-FIND: `verify` answers from
/// what it acknowledged to this sink.
mod storescp {
    use relaypacs_core::testing::pacs_sink::{
        delivers_byte_exact, kept_or_replaced_version_is_reported_as_held,
        outcomes_cover_every_instance, redelivery_is_idempotent, source_failure_leaves_nothing,
        verify_detects_other_content, verify_reports_what_is_held,
    };

    use super::*;

    struct Probe(StoreScp);

    #[async_trait]
    impl SinkProbe for Probe {
        async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
            Ok(self.0.received(instance.dicom.sop_instance_uid.as_str()))
        }

        fn preserves_file_meta(&self) -> bool {
            false
        }
    }

    fn storescp() -> (CStoreSink, Probe) {
        let scp = tokio::task::block_in_place(StoreScp::start);
        (sink(scp.port, &scp.aet), Probe(scp))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_delivers_byte_exact() {
        let (sink, probe) = storescp();
        delivers_byte_exact(&sink, &probe).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_redelivery_is_idempotent() {
        let (sink, probe) = storescp();
        redelivery_is_idempotent(&sink, &probe).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_source_failure_leaves_nothing() {
        let (sink, probe) = storescp();
        source_failure_leaves_nothing(&sink, &probe).await;
        assert_eq!(probe.0.count(), 0, "storescp wrote a file");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_verify_reports_what_is_held() {
        let (sink, probe) = storescp();
        verify_reports_what_is_held(&sink, &probe).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_verify_detects_other_content() {
        let (sink, probe) = storescp();
        verify_detects_other_content(&sink, &probe).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_kept_or_replaced_version_is_reported_as_held() {
        let (sink, probe) = storescp();
        kept_or_replaced_version_is_reported_as_held(&sink, &probe).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storescp_outcomes_cover_every_instance() {
        let (sink, probe) = storescp();
        outcomes_cover_every_instance(&sink, &probe).await;
    }
}

//! The shared conformance suites against a real Orthanc: the STOW-RS sink
//! (`PacsSink`), a fan-out of it with a local archive, and the DICOMweb
//! report source (`ReportSource`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use async_trait::async_trait;
use relaypacs_core::testing::pacs_sink::SinkProbe;
use relaypacs_core::testing::report_source::ReportPlanter;
use relaypacs_core::{Instance, PacsSink, Result};
use relaypacs_pacs::{
    DicomWebAuth, DicomWebConfig, DicomWebReports, FanOutSink, LocalArchiveSink, StowSink,
};
use relaypacs_test_peers::Orthanc;

struct Held(Arc<Orthanc>);

#[async_trait]
impl SinkProbe for Held {
    async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
        let o = self.0.clone();
        let sop = instance.dicom.sop_instance_uid.to_string();
        Ok(tokio::task::spawn_blocking(move || o.instance_file(&sop))
            .await
            .unwrap())
    }
}

#[async_trait]
impl ReportPlanter for Held {
    async fn plant(&self, part10: Vec<u8>) -> Result<()> {
        let o = self.0.clone();
        tokio::task::spawn_blocking(move || o.upload(&part10))
            .await
            .unwrap();
        Ok(())
    }
}

fn config(o: &Orthanc) -> DicomWebConfig {
    let mut c = DicomWebConfig::new(o.dicomweb());
    c.auth = DicomWebAuth::Basic {
        user: o.user.clone(),
        password: o.password.clone().into(),
    };
    c
}

async fn stow() -> (StowSink, Held, ()) {
    let o = Arc::new(tokio::task::spawn_blocking(Orthanc::start).await.unwrap());
    (StowSink::new(&config(&o)).unwrap(), Held(o), ())
}

/// A STOW-RS sink pointed at a port nothing listens on.
async fn stow_to_nowhere() -> (StowSink, ()) {
    let url = format!(
        "http://127.0.0.1:{}/dicom-web",
        relaypacs_test_peers::free_port()
    );
    (StowSink::new(&DicomWebConfig::new(url)).unwrap(), ())
}

relaypacs_core::pacs_sink_conformance!(stow_orthanc, stow, unreachable = stow_to_nowhere);

mod fan_out {
    use super::*;

    /// Held by both: the archive's copy must be there too.
    pub struct Both(Held, LocalArchiveSink);

    #[async_trait]
    impl SinkProbe for Both {
        async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
            let at_pacs = self.0.fetch(instance).await?;
            let archived = self
                .1
                .find(&instance.dicom.sop_instance_uid)?
                .map(|p| std::fs::read(p).unwrap());
            assert_eq!(at_pacs, archived, "the two destinations differ");
            Ok(at_pacs)
        }
    }

    pub async fn fan_out() -> (FanOutSink, Both, tempfile::TempDir) {
        let (stow, held, ()) = stow().await;
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchiveSink::open(dir.path()).unwrap();
        let sinks: Vec<Arc<dyn PacsSink>> = vec![Arc::new(archive.clone()), Arc::new(stow)];
        (FanOutSink::new(sinks).unwrap(), Both(held, archive), dir)
    }

    relaypacs_core::pacs_sink_conformance!(fan_out_conformance, fan_out);
}

async fn reports() -> (DicomWebReports, Held, ()) {
    let o = Arc::new(tokio::task::spawn_blocking(Orthanc::start).await.unwrap());
    (DicomWebReports::new(&config(&o)).unwrap(), Held(o), ())
}

relaypacs_core::report_source_conformance!(dicomweb_reports, reports);

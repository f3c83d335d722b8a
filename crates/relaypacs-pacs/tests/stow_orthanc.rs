//! STOW-RS sink against a real Orthanc: how each kind of failure is
//! classified, batching, and recovery after the PACS comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::testing::pacs_sink::study;
use relaypacs_core::testing::peers::{Orthanc, OrthancOptions};
use relaypacs_core::{InstanceOutcome, PacsSink};
use relaypacs_pacs::{DicomWebAuth, DicomWebConfig, StowSink};

fn config(o: &Orthanc, password: &str) -> DicomWebConfig {
    let mut c = DicomWebConfig::new(o.dicomweb());
    c.auth = DicomWebAuth::Basic {
        user: o.user.clone(),
        password: password.to_owned().into(),
    };
    c
}

fn failed(o: &InstanceOutcome) -> Option<bool> {
    match o {
        InstanceOutcome::Failed { transient, .. } => Some(*transient),
        _ => None,
    }
}

/// Lua that makes Orthanc refuse every instance, as a PACS rule would.
pub const REFUSE_ALL: &str =
    "function ReceivedInstanceFilter(dicom, origin, info)\n  return false\nend\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_permanent() {
    let o = Orthanc::start();
    let sink = StowSink::new(&config(&o, "not-the-password")).unwrap();
    let (src, insts) = study(2).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    for (_, out) in &r.outcomes {
        assert_eq!(failed(out), Some(false), "{out:?}");
        assert!(format!("{out:?}").contains("401"), "{out:?}");
    }
    assert_eq!(o.instance_count(), 0);
    assert!(
        sink.verify(&insts).await.is_err(),
        "an unauthorised query proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacs_down_is_transient_and_a_retry_delivers() {
    let mut o = Orthanc::start();
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(3).unwrap();
    o.stop();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert!(
        r.outcomes.iter().all(|(_, out)| failed(out) == Some(true)),
        "{r:?}"
    );
    let e = sink.verify(&insts).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    o.start_again();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert!(r.all_delivered(), "{r:?}");
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![true; 3]);
}

/// Orthanc's DICOMweb plugin answers a STOW-RS of instances its filter
/// discarded with 200 and a ReferencedSOPSequence: the sink's "stored" is
/// only a claim, and `verify` (QIDO-RS) shows the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_store_that_did_not_happen_is_caught_by_verify() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(REFUSE_ALL.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(2).unwrap();
    sink.deliver(&insts, &src).await.unwrap();
    assert_eq!(o.instance_count(), 0, "the filter discarded them");
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_order_and_every_instance() {
    let o = Orthanc::start();
    let mut c = config(&o, &o.password.clone());
    c.batch_instances = 3;
    let sink = StowSink::new(&c).unwrap();
    let (src, insts) = study(10).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert_eq!(r.outcomes.len(), 10);
    for ((uid, out), i) in r.outcomes.iter().zip(&insts) {
        assert_eq!(uid, &i.dicom.sop_instance_uid);
        assert_eq!(out, &InstanceOutcome::Stored);
    }
    assert_eq!(o.instance_count(), 10);
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![true; 10]);
}

/// Which instances `verify` finds the same as sent.
fn held(h: Vec<relaypacs_core::Holding>) -> Vec<bool> {
    h.iter().map(relaypacs_core::Holding::is_same).collect()
}

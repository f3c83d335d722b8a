//! STOW-RS and the DICOMweb report source against a real Orthanc serving
//! HTTPS with a certificate from a throwaway CA: refused (permanent, named
//! TLS) unless that CA is configured with `ca_file`; with it, delivered
//! and content-verified.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::testing::pacs_sink::study;
use relaypacs_core::{Holding, InstanceOutcome, PacsSink, ReportSource, Uid, Verification};
use relaypacs_pacs::{DicomWebAuth, DicomWebConfig, DicomWebReports, StowSink};
use relaypacs_test_peers::{Orthanc, OrthancOptions, TestCa};

fn config(o: &Orthanc, ca_file: Option<std::path::PathBuf>) -> DicomWebConfig {
    let mut c = DicomWebConfig::new(o.dicomweb());
    c.auth = DicomWebAuth::Basic {
        user: o.user.clone(),
        password: o.password.clone().into(),
    };
    c.ca_file = ca_file;
    c
}

fn tls_orthanc() -> (TestCa, Orthanc) {
    let ca = TestCa::new("relaypacs-test-pacs-ca");
    let cert = ca.issue("orthanc");
    let o = Orthanc::start_tls(OrthancOptions::default(), cert);
    assert!(o.dicomweb().starts_with("https://"), "{}", o.dicomweb());
    (ca, o)
}

/// Every outcome failed permanently, for a reason that names TLS.
fn assert_refused_by_tls(r: &relaypacs_core::DeliveryReport) {
    assert!(!r.outcomes.is_empty());
    for (_, out) in &r.outcomes {
        match out {
            InstanceOutcome::Failed { transient, reason } => {
                assert!(!transient, "a certificate problem is permanent: {out:?}");
                assert!(reason.contains("TLS"), "{reason}");
            }
            other => panic!("delivered to an untrusted PACS: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_pacs_certificate_is_refused_permanently() {
    let (_ca, o) = tls_orthanc();
    // Only the system roots: the throwaway CA is not among them.
    let sink = StowSink::new(&config(&o, None)).unwrap();
    let (src, insts) = study(2).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert_refused_by_tls(&r);
    let e = sink.verify(&insts).await.unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert!(e.to_string().contains("ca_file"), "{e}");
    // Nothing reached Orthanc (asked over HTTPS trusting the CA).
    assert_eq!(o.instance_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_does_not_make_the_pacs_trusted() {
    let (_ca, o) = tls_orthanc();
    let other = TestCa::new("relaypacs-test-other-ca");
    let sink = StowSink::new(&config(&o, Some(other.ca_file()))).unwrap();
    let (src, insts) = study(1).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert_refused_by_tls(&r);
    assert_eq!(o.instance_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_ca_configured_the_pacs_gets_and_proves_the_study() {
    let (ca, o) = tls_orthanc();
    let sink = StowSink::new(&config(&o, Some(ca.ca_file()))).unwrap();
    let (src, insts) = study(3).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert!(r.all_delivered(), "{r:?}");
    assert_eq!(
        sink.verify(&insts).await.unwrap(),
        vec![
            Holding::Same {
                verification: Verification::Content
            };
            3
        ]
    );
    assert_eq!(o.instance_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_source_trusts_the_same_ca_and_nothing_else() {
    let (ca, o) = tls_orthanc();
    let study_uid = Uid::parse(&relaypacs_core::testing::dicom_gen::new_uid()).unwrap();
    let refused = DicomWebReports::new(&config(&o, None)).unwrap();
    let e = refused.find_reports(&study_uid).await.unwrap_err();
    assert!(!e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("TLS"), "{e}");
    let trusted = DicomWebReports::new(&config(&o, Some(ca.ca_file()))).unwrap();
    assert!(trusted.find_reports(&study_uid).await.unwrap().is_empty());
}

#[test]
fn a_ca_file_without_a_certificate_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.pem");
    std::fs::write(&p, b"not a certificate\n").unwrap();
    let mut c = DicomWebConfig::new("https://127.0.0.1:1/dicom-web");
    c.ca_file = Some(p);
    let e = StowSink::new(&c).unwrap_err();
    assert!(e.to_string().contains("no certificate"), "{e}");
}

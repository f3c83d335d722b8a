//! The Orthanc test peer itself: starts, answers, stores, survives a kill.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_test_peers::Orthanc;

#[test]
fn orthanc_stores_and_survives_a_kill() {
    let mut o = Orthanc::start();
    let spec = DicomSpec {
        sop_instance_uid: new_uid(),
        ..DicomSpec::default()
    };
    let bytes = generate(&spec).unwrap();
    o.upload(&bytes);
    assert_eq!(o.instance_file(&spec.sop_instance_uid).unwrap(), bytes);
    o.stop();
    o.start_again();
    assert_eq!(o.instance_count(), 1, "{}", o.log());
}

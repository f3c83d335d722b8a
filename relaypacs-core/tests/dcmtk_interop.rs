//! Our generated files are real DICOM to an independent implementation
//! (dcmtk's `dcmftest`/`dcmdump` accept them), and a file made by dcmtk's
//! `dump2dcm` passes our validator.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::process::Command;

use relaypacs_core::dicom::{DicomLimits, validate_dicom};
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, TransferSyntax, generate};
use relaypacs_test_peers::tool;

#[test]
fn dcmtk_accepts_every_generated_kind() {
    let dir = tempfile::tempdir().unwrap();
    let dcmftest = tool("dcmftest");
    let dcmdump = tool("dcmdump");
    let classes = [
        SopClass::Ct,
        SopClass::Mr,
        SopClass::SecondaryCapture,
        SopClass::DigitalXRay,
    ];
    let syntaxes = [
        TransferSyntax::ExplicitLe,
        TransferSyntax::ImplicitLe,
        TransferSyntax::ExplicitBe,
        TransferSyntax::Deflated,
        TransferSyntax::JpegBaseline,
    ];
    for (i, class) in classes.iter().enumerate() {
        for (j, ts) in syntaxes.iter().enumerate() {
            let spec = DicomSpec {
                sop_class: *class,
                transfer_syntax: *ts,
                seed: (i * 10 + j) as u64,
                ..DicomSpec::default()
            };
            let bytes = generate(&spec).unwrap();
            let summary = validate_dicom(&bytes, bytes.len() as u64, &DicomLimits::default())
                .unwrap_or_else(|e| {
                    panic!("{class:?} {ts:?}: our validator refused our own file: {e}")
                });
            assert_eq!(summary.sop_class_uid.as_str(), class.uid());
            assert_eq!(summary.transfer_syntax.as_str(), ts.uid());
            let path = dir.path().join(format!("{i}-{j}.dcm"));
            std::fs::write(&path, &bytes).unwrap();
            let out = Command::new(&dcmftest).arg(&path).output().unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout).starts_with("yes"),
                "dcmftest {class:?} {ts:?}: {out:?}"
            );
            let out = Command::new(&dcmdump)
                .arg("-q")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "dcmdump {class:?} {ts:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&spec.sop_instance_uid),
                "dcmdump did not read the SOP Instance UID"
            );
        }
    }
}

#[test]
fn a_dcmtk_made_file_validates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pixel.raw"),
        relaypacs_core::testing::pattern(3, 32 * 32 * 2),
    )
    .unwrap();
    let dump = "\
(0002,0001) OB 00\\01
(0002,0002) UI =SecondaryCaptureImageStorage
(0002,0003) UI [1.2.826.0.1.3680043.9.7134.1.1]
(0002,0010) UI =LittleEndianExplicit
(0008,0016) UI =SecondaryCaptureImageStorage
(0008,0018) UI [1.2.826.0.1.3680043.9.7134.1.1]
(0008,0060) CS [OT]
(0010,0010) PN [Dcmtk^Made]
(0010,0020) LO [PAT-DCMTK]
(0020,000d) UI [1.2.826.0.1.3680043.9.7134.1]
(0020,000e) UI [1.2.826.0.1.3680043.9.7134.1.0]
(0028,0002) US 1
(0028,0004) CS [MONOCHROME2]
(0028,0010) US 32
(0028,0011) US 32
(0028,0100) US 16
(0028,0101) US 16
(0028,0102) US 15
(0028,0103) US 0
(7fe0,0010) OW =pixel.raw
";
    std::fs::write(dir.path().join("sc.dump"), dump).unwrap();
    let out = Command::new(tool("dump2dcm"))
        .current_dir(dir.path())
        .args(["+E", "sc.dump", "sc.dcm"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dump2dcm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(dir.path().join("sc.dcm")).unwrap();
    let s = validate_dicom(&bytes, bytes.len() as u64, &DicomLimits::default()).unwrap();
    assert_eq!(s.patient_id, "PAT-DCMTK");
    assert_eq!(
        s.study_instance_uid.as_str(),
        "1.2.826.0.1.3680043.9.7134.1"
    );
}

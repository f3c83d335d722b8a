//! The validator follows PS3.3 attribute types and PS3.5 encodings: every
//! standard variant the generator makes (Patient ID empty or absent, YBR
//! 4:2:2 and 4:2:0, 1-bit bitmaps, multi-frame, float pixel data, an SR
//! without pixel module, a CR image without Pixel Data, an odd value
//! length) is accepted with exactly the warnings it deserves, and dcmtk
//! reads each of them too; Type 1 UIDs and short native pixel data are
//! still refused. dcmtk must be installed (`scripts/install-peers.sh`):
//! without it these tests fail, they never skip.
#![cfg(feature = "testing")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::path::Path;
use std::process::Command;

use relaypacs_core::dicom::{
    DicomError, DicomLimits, PrescanLimits, WARNING_NO_PIXEL_DATA, WARNING_PATIENT_ID_ABSENT,
    prescan, validate_dicom,
};
use relaypacs_core::testing::dicom_gen::{
    DicomSpec, PixelData, SopClass, TransferSyntax, generate, odd_length_value, standard_refusals,
    standard_variant_specs, standard_variants,
};
use relaypacs_test_peers::tool;

fn validate(bytes: &[u8]) -> Result<relaypacs_core::DicomSummary, DicomError> {
    validate_dicom(bytes, bytes.len() as u64, &DicomLimits::default())
}

/// dcmtk reads `bytes` as DICOM: `dcmftest` says "yes" and `dcmdump -E`
/// (stop on error) exits 0. Panics (fails the test) when dcmtk is missing.
fn assert_dcmtk_reads(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(format!("{name}.dcm"));
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new(tool("dcmftest")).arg(&path).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("yes"),
        "dcmftest {name}: {out:?}"
    );
    let out = Command::new(tool("dcmdump"))
        .arg("-E")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dcmdump -E {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The warnings each standard variant is accepted with.
fn expected_warnings(name: &str) -> Vec<&'static str> {
    match name {
        "absent-patient-id" => vec![WARNING_PATIENT_ID_ABSENT],
        "cr-without-pixel-data" => vec![WARNING_NO_PIXEL_DATA],
        "odd-length-value" => vec!["odd value length"],
        _ => vec![],
    }
}

#[test]
fn standard_variants_are_accepted_with_their_warnings_and_read_by_dcmtk() {
    let dir = tempfile::tempdir().unwrap();
    let variants = standard_variants();
    assert_eq!(variants.len(), standard_variant_specs().len() + 1);
    for (name, bytes) in &variants {
        assert!(!bytes.is_empty(), "{name}: the generator failed");
        let s = validate(bytes).unwrap_or_else(|e| panic!("{name} refused: {e}"));
        let want = expected_warnings(name);
        assert_eq!(
            s.warnings.len(),
            want.len(),
            "{name}: warnings {:?}",
            s.warnings
        );
        for (got, want) in s.warnings.iter().zip(&want) {
            assert!(got.contains(want), "{name}: {got:?} is not {want:?}");
        }
        assert_dcmtk_reads(dir.path(), name, bytes);
    }
}

#[test]
fn patient_id_is_type_2() {
    let get = |name: &str| {
        standard_variants()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    };
    let strict = DicomLimits {
        require_patient_id: true,
        ..DicomLimits::default()
    };
    assert!(!DicomLimits::default().require_patient_id);
    // Present and empty: valid, no warning, with or without the requirement.
    let empty = get("empty-patient-id");
    for limits in [DicomLimits::default(), strict.clone()] {
        let s = validate_dicom(&empty, empty.len() as u64, &limits).unwrap();
        assert_eq!(s.patient_id, "");
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }
    // Absent: accepted with a warning by default, refused when required.
    let absent = get("absent-patient-id");
    let s = validate(&absent).unwrap();
    assert_eq!(s.patient_id, "");
    assert_eq!(s.warnings, vec![WARNING_PATIENT_ID_ABSENT.to_owned()]);
    assert_eq!(
        validate_dicom(&absent, absent.len() as u64, &strict),
        Err(DicomError::MissingAttribute { name: "PatientID" })
    );
    // The warning carries no patient data.
    let named = generate(&DicomSpec {
        patient_id: "PAT-SECRET-42".into(),
        ..DicomSpec::default()
    })
    .unwrap();
    let s = validate(&named).unwrap();
    assert_eq!(s.patient_id, "PAT-SECRET-42");
    assert!(s.warnings.is_empty());
}

#[test]
fn empty_type_1_uids_are_refused() {
    for (name, bytes) in standard_refusals() {
        let Some(keyword) = (match name {
            "empty-sop-instance-uid" => Some("SOPInstanceUID"),
            "empty-study-instance-uid" => Some("StudyInstanceUID"),
            "empty-series-instance-uid" => Some("SeriesInstanceUID"),
            _ => None,
        }) else {
            continue;
        };
        match validate(&bytes) {
            Err(DicomError::BadAttribute { name: n, .. }) => assert_eq!(n, keyword, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn native_pixel_data_shorter_than_its_attributes_is_refused() {
    let mut seen = 0;
    for (name, bytes) in standard_refusals() {
        if name.starts_with("empty-") {
            continue;
        }
        seen += 1;
        match validate(&bytes) {
            Err(DicomError::Malformed { reason, .. }) => {
                assert!(
                    reason.contains("image attributes call for"),
                    "{name}: {reason}"
                )
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(seen, 4, "ybr-422, 1-bit, float and multi-frame refusals");
    // The exact thresholds: YBR_FULL_422 16 x 16 needs 512 bytes (two
    // values per pixel), not 768 (three samples) nor 256 (one).
    let r = prescan_of(&generate(&ybr("YBR_FULL_422")).unwrap());
    assert_eq!(r.native_pixel_bytes().unwrap(), Some(512));
    assert_eq!(
        r.photometric_interpretation.as_deref(),
        Some("YBR_FULL_422")
    );
    let r = prescan_of(&generate(&ybr("YBR_PARTIAL_420")).unwrap());
    assert_eq!(r.native_pixel_bytes().unwrap(), Some(384));
    let r = prescan_of(&generate(&ybr("RGB")).unwrap());
    assert_eq!(r.native_pixel_bytes().unwrap(), Some(768));
}

fn ybr(photometric: &str) -> DicomSpec {
    DicomSpec {
        rows: 16,
        cols: 16,
        photometric: Some(photometric.into()),
        samples_per_pixel: Some(3),
        bits_allocated: Some(8),
        ..DicomSpec::default()
    }
}

fn prescan_of(bytes: &[u8]) -> relaypacs_core::dicom::PrescanReport {
    prescan(bytes, bytes.len() as u64, &PrescanLimits::default()).unwrap()
}

#[test]
fn one_bit_frames_are_packed_and_padding_is_optional() {
    let dir = tempfile::tempdir().unwrap();
    // 8 x 9 bits = 9 bytes: the generator pads to 10; 9 (odd, unpadded)
    // is read by dcmtk and accepted with the odd-length warning; 8 is short.
    let spec = DicomSpec {
        rows: 8,
        cols: 9,
        bits_allocated: Some(1),
        ..DicomSpec::default()
    };
    let padded = generate(&spec).unwrap();
    let r = prescan_of(&padded);
    assert_eq!(r.native_pixel_bytes().unwrap(), Some(9));
    assert!(validate(&padded).unwrap().warnings.is_empty());
    let at = usize::try_from(r.pixel_data_offset.unwrap()).unwrap();
    let with_len = |len: u32| {
        let mut b = padded[..at + 12 + len as usize].to_vec();
        b[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        b
    };
    let unpadded = with_len(9);
    let s = validate(&unpadded).unwrap();
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(s.warnings[0].contains("(7FE0,0010)"), "{:?}", s.warnings);
    assert_dcmtk_reads(dir.path(), "bitmap-unpadded", &unpadded);
    assert!(matches!(
        validate(&with_len(8)),
        Err(DicomError::Malformed { .. })
    ));
    // 3 frames of 5 x 5 bits: 75 bits = 10 bytes in all, not 3 x 4.
    let multi = generate(&DicomSpec {
        rows: 5,
        cols: 5,
        frames: Some(3),
        bits_allocated: Some(1),
        ..DicomSpec::default()
    })
    .unwrap();
    let r = prescan_of(&multi);
    assert_eq!(r.native_pixel_bytes().unwrap(), Some(10));
    assert_eq!(multi.len() as u64, r.pixel_data_offset.unwrap() + 12 + 10);
    assert!(validate(&multi).unwrap().warnings.is_empty());
}

#[test]
fn float_pixel_data_ends_the_header_and_need_not_fit_the_prefix() {
    for (kind, width, e) in [
        (PixelData::Float, 4u64, 0x0008u16),
        (PixelData::DoubleFloat, 8, 0x0009),
    ] {
        for ts in [
            TransferSyntax::ExplicitLe,
            TransferSyntax::ImplicitLe,
            TransferSyntax::ExplicitBe,
        ] {
            let spec = DicomSpec {
                sop_class: SopClass::ParametricMap,
                pixel_data: kind,
                transfer_syntax: ts,
                rows: 256,
                cols: 256,
                frames: Some(2),
                ..DicomSpec::default()
            };
            let bytes = generate(&spec).unwrap();
            let r = prescan_of(&bytes);
            assert_eq!(r.pixel_data_tag, Some((0x7FE0, e)));
            assert_eq!(r.native_pixel_bytes().unwrap(), Some(256 * 256 * 2 * width));
            // Only the header in hand, as the pipeline gives it: accepted.
            let prefix = &bytes[..r.header_end as usize + 12];
            let s = validate_dicom(prefix, bytes.len() as u64, &DicomLimits::default())
                .unwrap_or_else(|e| panic!("{kind:?} {ts:?}: {e}"));
            assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        }
    }
    // Float Pixel Data is never encapsulated: undefined length is refused.
    let spec = DicomSpec {
        sop_class: SopClass::ParametricMap,
        pixel_data: PixelData::Float,
        rows: 4,
        cols: 4,
        ..DicomSpec::default()
    };
    let mut bytes = generate(&spec).unwrap();
    let at = prescan_of(&bytes).pixel_data_offset.unwrap() as usize;
    bytes[at + 8..at + 12].copy_from_slice(&[0xFF; 4]);
    assert!(
        matches!(validate(&bytes), Err(DicomError::Malformed { .. })),
        "{:?}",
        validate(&bytes)
    );
}

#[test]
fn encapsulated_pixel_data_is_walked_never_sized_as_native() {
    // 512 x 512 x 3 x 8 bits would be 768 KiB native; the JPEG fragment is
    // far smaller and that is fine.
    let bytes = generate(&DicomSpec {
        transfer_syntax: TransferSyntax::JpegBaseline,
        photometric: Some("YBR_FULL_422".into()),
        samples_per_pixel: Some(3),
        rows: 512,
        cols: 512,
        frames: Some(3),
        ..DicomSpec::default()
    })
    .unwrap();
    assert!(bytes.len() < 768 << 10);
    let s = validate(&bytes).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn an_image_cut_at_an_element_boundary_before_pixel_data_is_read_by_dcmtk_and_accepted() {
    // What the hostile corpus test now accepts with a warning: cut exactly
    // before Pixel Data, or after Bits Allocated. dcmtk reads both.
    let dir = tempfile::tempdir().unwrap();
    for ts in [
        TransferSyntax::ExplicitLe,
        TransferSyntax::ImplicitLe,
        TransferSyntax::ExplicitBe,
        TransferSyntax::JpegBaseline,
    ] {
        let bytes = generate(&DicomSpec {
            transfer_syntax: ts,
            rows: 16,
            cols: 16,
            ..DicomSpec::default()
        })
        .unwrap();
        let at = prescan_of(&bytes).pixel_data_offset.unwrap() as usize;
        // Bits Stored, High Bit and Pixel Representation: 3 x 10 bytes.
        for cut in [at, at - 30] {
            let b = &bytes[..cut];
            let s = validate(b).unwrap_or_else(|e| panic!("{ts:?} cut at {cut}: {e}"));
            assert_eq!(s.warnings, vec![WARNING_NO_PIXEL_DATA.to_owned()]);
            assert_dcmtk_reads(dir.path(), &format!("cut-{ts:?}-{cut}"), b);
        }
        // One byte less is inside an element: refused.
        assert!(validate(&bytes[..at - 1]).is_err());
    }
}

#[test]
fn sr_without_pixel_module_gets_no_warning() {
    for (name, spec) in standard_variant_specs() {
        if spec.sop_class != SopClass::BasicTextSr {
            continue;
        }
        let bytes = generate(&spec).unwrap();
        let r = prescan_of(&bytes);
        assert_eq!(r.pixel_data_offset, None, "{name}");
        assert_eq!(r.rows, None, "{name}");
        assert!(r.max_depth_seen >= 2, "{name}: the content tree was walked");
        let s = validate(&bytes).unwrap();
        assert_eq!(s.sop_class_uid.as_str(), "1.2.840.10008.5.1.4.1.1.88.11");
        assert_eq!(s.modality.as_deref(), Some("SR"));
        assert!(s.warnings.is_empty(), "{name}: {:?}", s.warnings);
    }
}

#[test]
fn odd_value_lengths_are_read_as_declared_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let spec = DicomSpec {
        rows: 8,
        cols: 8,
        ..DicomSpec::default()
    };
    let bytes = odd_length_value(&spec).unwrap();
    let r = prescan_of(&bytes);
    assert_eq!(r.odd_length_elements, 1);
    assert_eq!(r.first_odd_length_tag, Some((0x0008, 0x1030)));
    let s = validate(&bytes).unwrap();
    assert_eq!(s.sop_instance_uid.as_str(), spec.sop_instance_uid);
    assert_eq!(s.warnings.len(), 1);
    assert!(s.warnings[0].contains("(0008,1030)"), "{:?}", s.warnings);
    assert_dcmtk_reads(dir.path(), "odd", &bytes);
}

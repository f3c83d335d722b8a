//! Validation: the pre-scan, required attributes, then dicom-object on the
//! header only, on a thread with an explicit stack.
//!
//! Attributes follow their PS3.3 types: the four identifying UIDs are
//! Type 1 (present, non-empty, valid UID syntax) and refused otherwise;
//! Patient ID is Type 2 (may be empty; absent is accepted with a warning
//! unless [`DicomLimits::require_patient_id`]). What is accepted but worth
//! knowing goes to [`DicomSummary::warnings`], never with patient data.

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::OddLengthStrategy;

use super::{DicomError, PrescanLimits, prescan};
use crate::ids::Uid;
use crate::model::DicomSummary;

/// Validation limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DicomLimits {
    /// Pre-scan limits.
    pub prescan: PrescanLimits,
    /// Most bytes read before Pixel Data (default 8 MiB). The caller hands
    /// [`validate_dicom`] at most this many bytes of the file.
    pub max_header_bytes: u64,
    /// Stack of the dicom-object parser thread (default 32 MiB).
    pub parser_stack_bytes: usize,
    /// Refuse a file without a (0010,0020) Patient ID element with
    /// [`DicomError::MissingAttribute`] (default `false`: Patient ID is
    /// Type 2, so its absence is accepted with
    /// [`WARNING_PATIENT_ID_ABSENT`]). An empty Patient ID is valid either way.
    pub require_patient_id: bool,
}

/// Warning when (0010,0020) Patient ID is absent and not required.
pub const WARNING_PATIENT_ID_ABSENT: &str = "PatientID (0010,0020) is absent (Type 2)";

/// Warning when Rows or Columns are present but no pixel data element is.
pub const WARNING_NO_PIXEL_DATA: &str = "image attributes present but no Pixel Data";

impl Default for DicomLimits {
    fn default() -> Self {
        Self {
            prescan: PrescanLimits::default(),
            max_header_bytes: 8 << 20,
            parser_stack_bytes: 32 << 20,
            require_patient_id: false,
        }
    }
}

fn uid(name: &'static str, v: Option<String>) -> Result<Uid, DicomError> {
    let v = v.ok_or(DicomError::MissingAttribute { name })?;
    Uid::parse(&v).map_err(|e| DicomError::BadAttribute {
        name,
        reason: e.to_string(),
    })
}

/// Validate a Part-10 file given its first bytes (`prefix`, at most
/// `limits.max_header_bytes`) and its size. Blocking: it runs dicom-object
/// on its own thread and waits for it.
///
/// Accepted files may carry warnings ([`DicomSummary::warnings`]):
/// [`WARNING_PATIENT_ID_ABSENT`], [`WARNING_NO_PIXEL_DATA`] (for every SOP
/// class), and one for data elements with odd value lengths (read as
/// declared, as dcmtk does).
///
/// # Errors
/// A [`DicomError`] when the file is not structurally sound DICOM, a Type 1
/// UID is missing, empty or malformed, Patient ID is absent while
/// `limits.require_patient_id` is set, native pixel data is shorter than the
/// image attributes call for, or dicom-object refuses the header.
pub fn validate_dicom(
    prefix: &[u8],
    total_len: u64,
    limits: &DicomLimits,
) -> Result<DicomSummary, DicomError> {
    let report = prescan(prefix, total_len, &limits.prescan)?;
    let mut warnings = Vec::new();
    let sop_class_uid = uid("SOPClassUID", report.sop_class_uid.clone())?;
    let sop_instance_uid = uid("SOPInstanceUID", report.sop_instance_uid.clone())?;
    let study_instance_uid = uid("StudyInstanceUID", report.study_instance_uid.clone())?;
    let series_instance_uid = uid("SeriesInstanceUID", report.series_instance_uid.clone())?;
    // Type 2: present and empty is a valid "unknown".
    let patient_id = match report.patient_id.clone() {
        Some(p) => p,
        None if limits.require_patient_id => {
            return Err(DicomError::MissingAttribute { name: "PatientID" });
        }
        None => {
            warnings.push(WARNING_PATIENT_ID_ABSENT.to_owned());
            String::new()
        }
    };
    // An image whose pixels are absent (e.g. a CR sent header-only) is
    // accepted for every SOP class; a data set with no pixel module at all
    // (SR, RT Plan, …) gets no warning.
    if (report.rows.is_some() || report.columns.is_some()) && report.pixel_data_offset.is_none() {
        warnings.push(WARNING_NO_PIXEL_DATA.to_owned());
    }
    if let Some((g, e)) = report.first_odd_length_tag {
        warnings.push(format!(
            "{} data element(s) with an odd value length, first ({g:04X},{e:04X}); read as declared",
            report.odd_length_elements
        ));
    }
    let summary = DicomSummary {
        sop_class_uid,
        sop_instance_uid,
        study_instance_uid,
        series_instance_uid,
        patient_id,
        transfer_syntax: uid("TransferSyntaxUID", Some(report.transfer_syntax.clone()))?,
        modality: report.modality.clone().filter(|m| !m.is_empty()),
        warnings,
    };
    // Only the bytes the pre-scan verified go to dicom-object: the header
    // before Pixel Data. A Deflated file is handed over already inflated
    // (its meta group relabelled Explicit VR Little Endian), so dicom-object
    // never runs an inflater of its own on hostile input.
    let header: Vec<u8> = match &report.inflated_header {
        Some(inflated) => {
            let meta_end = usize::try_from(report.meta_end)
                .unwrap_or(prefix.len())
                .min(prefix.len());
            let mut h = prefix[..meta_end].to_vec();
            relabel_deflated(&mut h)?;
            h.extend_from_slice(inflated);
            h
        }
        None => {
            let end = usize::try_from(report.header_end)
                .unwrap_or(prefix.len())
                .min(prefix.len());
            prefix[..end].to_vec()
        }
    };
    let parsed = std::thread::Builder::new()
        .name("relaypacs-dicom-parse".into())
        .stack_size(limits.parser_stack_bytes)
        .spawn(move || {
            OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                // As declared, like the pre-scan and dcmtk: all three agree
                // on where each element ends.
                .odd_length_strategy(OddLengthStrategy::Accept)
                .from_reader(std::io::Cursor::new(header))
                .map(|obj| {
                    let get = |t| {
                        obj.element(t).ok().and_then(|e| {
                            e.to_str()
                                .ok()
                                .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
                        })
                    };
                    (get(tags::SOP_INSTANCE_UID), get(tags::STUDY_INSTANCE_UID))
                })
                .map_err(|e| e.to_string())
        })
        .map_err(|e| DicomError::Parser {
            message: format!("cannot start parser thread: {e}"),
        })?
        .join()
        .map_err(|_| DicomError::Parser {
            message: "the parser panicked".into(),
        })?
        .map_err(|message| DicomError::Parser { message })?;
    if parsed.0.as_deref() != Some(summary.sop_instance_uid.as_str())
        || parsed.1.as_deref() != Some(summary.study_instance_uid.as_str())
    {
        return Err(DicomError::Parser {
            message: "the parser disagrees with the pre-scan on the instance or study UID".into(),
        });
    }
    Ok(summary)
}

/// Rewrite the Transfer Syntax UID value in a meta group from Deflated
/// Explicit VR LE to Explicit VR LE, in place (same length, NUL-padded).
pub(super) fn relabel_deflated(meta: &mut [u8]) -> Result<(), DicomError> {
    const FROM: &[u8] = b"1.2.840.10008.1.2.1.99";
    const TO: &[u8] = b"1.2.840.10008.1.2.1\0\0\0";
    let at = meta
        .windows(FROM.len())
        .position(|w| w == FROM)
        .ok_or(DicomError::Malformed {
            offset: 0,
            reason: "Deflated transfer syntax not found in the meta group".into(),
        })?;
    meta[at..at + TO.len()].copy_from_slice(TO);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dicom::test_part10::{Ids, el_raw as el, part10};

    /// A small Explicit VR Little Endian file: the four UIDs, then
    /// `patient_id` (absent when `None`), then `rest` (already encoded).
    fn file(sop_instance: &[u8], patient_id: Option<&[u8]>, rest: &[u8]) -> Vec<u8> {
        let ids = Ids {
            class: b"1.2.840.10008.5.1.4.1.1.7\0",
            instance: sop_instance,
            patient_name: None,
            patient_id,
        };
        part10(&ids, rest)
    }

    fn image(pixels: bool) -> Vec<u8> {
        let mut r = Vec::new();
        el(&mut r, 0x0028, 0x0010, b"US", &2u16.to_le_bytes());
        el(&mut r, 0x0028, 0x0011, b"US", &2u16.to_le_bytes());
        el(&mut r, 0x0028, 0x0100, b"US", &8u16.to_le_bytes());
        if pixels {
            el(&mut r, 0x7FE0, 0x0010, b"OB", &[0u8; 4]);
        }
        r
    }

    fn check(f: &[u8], limits: &DicomLimits) -> Result<DicomSummary, DicomError> {
        validate_dicom(f, f.len() as u64, limits)
    }

    #[test]
    fn patient_id_is_type_2() {
        let strict = DicomLimits {
            require_patient_id: true,
            ..DicomLimits::default()
        };
        let present = file(b"1.2.3.4\0", Some(b"P1"), &image(true));
        let s = check(&present, &DicomLimits::default()).unwrap();
        assert_eq!((s.patient_id.as_str(), s.warnings.len()), ("P1", 0));
        let empty = file(b"1.2.3.4\0", Some(b""), &image(true));
        for limits in [DicomLimits::default(), strict.clone()] {
            let s = check(&empty, &limits).unwrap();
            assert_eq!((s.patient_id.as_str(), s.warnings.len()), ("", 0));
        }
        let absent = file(b"1.2.3.4\0", None, &image(true));
        let s = check(&absent, &DicomLimits::default()).unwrap();
        assert_eq!(s.patient_id, "");
        assert_eq!(s.warnings, vec![WARNING_PATIENT_ID_ABSENT.to_owned()]);
        assert_eq!(
            check(&absent, &strict),
            Err(DicomError::MissingAttribute { name: "PatientID" })
        );
    }

    #[test]
    fn type_1_uids_stay_required() {
        for uid in [&b""[..], b"1..2", b"../x"] {
            let f = file(uid, Some(b"P1"), &image(true));
            let e = check(&f, &DicomLimits::default()).unwrap_err();
            assert!(
                matches!(
                    e,
                    DicomError::BadAttribute {
                        name: "SOPInstanceUID",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn an_image_without_pixel_data_is_accepted_with_a_warning() {
        let f = file(b"1.2.3.4\0", Some(b"P1"), &image(false));
        let s = check(&f, &DicomLimits::default()).unwrap();
        assert_eq!(s.warnings, vec![WARNING_NO_PIXEL_DATA.to_owned()]);
        // No pixel module at all (SR, RT Plan, …): no warning.
        let f = file(b"1.2.3.4\0", Some(b"P1"), &[]);
        let s = check(&f, &DicomLimits::default()).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn odd_lengths_are_accepted_with_a_warning_naming_only_the_tag() {
        let mut rest = Vec::new();
        el(&mut rest, 0x0020, 0x0011, b"IS", b"7");
        let f = file(b"1.2.3.4\0", Some(b"SECRET"), &rest);
        let s = check(&f, &DicomLimits::default()).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("(0020,0011)"), "{:?}", s.warnings);
        assert!(!s.warnings[0].contains("SECRET"));
    }
}

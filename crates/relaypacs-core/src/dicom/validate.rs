//! Validation: the pre-scan, required attributes, then dicom-object on the
//! header only, on a thread with an explicit stack.

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
}

impl Default for DicomLimits {
    fn default() -> Self {
        Self {
            prescan: PrescanLimits::default(),
            max_header_bytes: 8 << 20,
            parser_stack_bytes: 32 << 20,
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
pub fn validate_dicom(
    prefix: &[u8],
    total_len: u64,
    limits: &DicomLimits,
) -> Result<DicomSummary, DicomError> {
    let report = prescan(prefix, total_len, &limits.prescan)?;
    // An image (it has Rows) without Pixel Data lost its pixels, typically
    // to a truncation exactly at an element boundary.
    if report.rows.is_some() && report.pixel_data_offset.is_none() {
        return Err(DicomError::MissingAttribute { name: "PixelData" });
    }
    let summary = DicomSummary {
        sop_class_uid: uid("SOPClassUID", report.sop_class_uid.clone())?,
        sop_instance_uid: uid("SOPInstanceUID", report.sop_instance_uid.clone())?,
        study_instance_uid: uid("StudyInstanceUID", report.study_instance_uid.clone())?,
        series_instance_uid: uid("SeriesInstanceUID", report.series_instance_uid.clone())?,
        patient_id: match report.patient_id.clone() {
            Some(p) if !p.is_empty() => p,
            Some(_) => {
                return Err(DicomError::BadAttribute {
                    name: "PatientID",
                    reason: "empty".into(),
                });
            }
            None => return Err(DicomError::MissingAttribute { name: "PatientID" }),
        },
        transfer_syntax: uid("TransferSyntaxUID", Some(report.transfer_syntax.clone()))?,
        modality: report.modality.clone().filter(|m| !m.is_empty()),
        warnings: Vec::new(),
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
                .odd_length_strategy(OddLengthStrategy::Fail)
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
fn relabel_deflated(meta: &mut [u8]) -> Result<(), DicomError> {
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

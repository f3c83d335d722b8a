//! DICOM validation: a bounded structural pre-scan of our own, then
//! dicom-object on the header only, on a thread with an explicit stack.
//!
//! dicom-object 0.10.1 aborts the process on deeply nested sequences,
//! allocates whatever a declared length says and inflates Deflated files
//! without a cap, so nothing reaches it before [`prescan`] has checked
//! every declared length against the bytes that remain, capped nesting
//! depth and element count, and bounded any inflation.

mod content;
pub(crate) mod prescan;
pub mod sr;
#[cfg(test)]
mod test_part10;
mod validate;

pub use content::{ContentDigest, Part10Hasher};
pub use prescan::{PrescanLimits, PrescanReport, prescan};
pub use validate::{DicomLimits, WARNING_NO_PIXEL_DATA, WARNING_PATIENT_ID_ABSENT, validate_dicom};

/// Why a file is not acceptable DICOM. Every variant is the client's fault
/// (HTTP 422) and carries no patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DicomError {
    /// No 128-byte preamble followed by `DICM`.
    #[error("not a DICOM Part-10 file: {reason}")]
    NotDicom {
        /// Details.
        reason: String,
    },
    /// The file ends inside an element header or value.
    #[error("truncated at byte {offset}: {needed} more bytes needed")]
    Truncated {
        /// Where.
        offset: u64,
        /// How many bytes were missing.
        needed: u64,
    },
    /// A declared length is larger than the bytes that remain (or than its container).
    #[error("element {tag} at byte {offset} declares {declared} bytes, only {remaining} remain")]
    LengthOverrun {
        /// Tag as `(gggg,eeee)`.
        tag: String,
        /// Where.
        offset: u64,
        /// Declared length.
        declared: u64,
        /// Bytes left in the enclosing container or file.
        remaining: u64,
    },
    /// Sequences nested deeper than allowed.
    #[error("sequence nesting deeper than {max}")]
    TooDeep {
        /// The limit.
        max: u32,
    },
    /// More data elements than allowed.
    #[error("more than {max} data elements")]
    TooManyElements {
        /// The limit.
        max: u64,
    },
    /// A delimiter or item tag where none may stand.
    #[error("unexpected {tag} at byte {offset}")]
    StrayDelimiter {
        /// Tag as `(gggg,eeee)`.
        tag: String,
        /// Where.
        offset: u64,
    },
    /// The header (everything before Pixel Data) is larger than allowed.
    #[error("header larger than {max} bytes")]
    HeaderTooLarge {
        /// The limit.
        max: u64,
    },
    /// The transfer syntax is not accepted.
    #[error("unsupported transfer syntax {uid}")]
    UnsupportedTransferSyntax {
        /// The transfer syntax UID.
        uid: String,
    },
    /// A Deflated data set inflates past the cap.
    #[error("deflated data set inflates past {max} bytes")]
    InflateLimit {
        /// The cap.
        max: u64,
    },
    /// A required attribute is missing.
    #[error("missing required attribute {name}")]
    MissingAttribute {
        /// Keyword, e.g. "SOPInstanceUID".
        name: &'static str,
    },
    /// A required attribute is malformed.
    #[error("attribute {name} is invalid: {reason}")]
    BadAttribute {
        /// Keyword.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// Any other structural defect.
    #[error("malformed at byte {offset}: {reason}")]
    Malformed {
        /// Where.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// dicom-object refused the header after the pre-scan passed.
    #[error("DICOM parser: {message}")]
    Parser {
        /// The parser's message.
        message: String,
    },
}

impl DicomError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotDicom { .. } => "RELAY_DICOM_NOT_DICOM",
            Self::Truncated { .. } => "RELAY_DICOM_TRUNCATED",
            Self::LengthOverrun { .. } => "RELAY_DICOM_LENGTH_OVERRUN",
            Self::TooDeep { .. } => "RELAY_DICOM_TOO_DEEP",
            Self::TooManyElements { .. } => "RELAY_DICOM_TOO_MANY_ELEMENTS",
            Self::StrayDelimiter { .. } => "RELAY_DICOM_STRAY_DELIMITER",
            Self::HeaderTooLarge { .. } => "RELAY_DICOM_HEADER_TOO_LARGE",
            Self::UnsupportedTransferSyntax { .. } => "RELAY_DICOM_UNSUPPORTED_TRANSFER_SYNTAX",
            Self::InflateLimit { .. } => "RELAY_DICOM_INFLATE_LIMIT",
            Self::MissingAttribute { .. } => "RELAY_DICOM_MISSING_ATTRIBUTE",
            Self::BadAttribute { .. } => "RELAY_DICOM_BAD_ATTRIBUTE",
            Self::Malformed { .. } => "RELAY_DICOM_MALFORMED",
            Self::Parser { .. } => "RELAY_DICOM_PARSER",
        }
    }
}

/// Byte offset where the data set starts in a Part-10 file: after the
/// 128-byte preamble, `DICM` and the file meta group, whose length the
/// mandatory (0002,0000) File Meta Information Group Length gives.
/// `prefix` needs only the first 144 bytes. A C-STORE sends the data set
/// from here (the receiver writes its own meta group).
///
/// # Errors
/// [`DicomError::NotDicom`] when the prefix is not a Part-10 header with an
/// explicit-VR group length first.
pub fn data_set_offset(prefix: &[u8]) -> Result<u64, DicomError> {
    let bad = |reason: &str| DicomError::NotDicom {
        reason: reason.to_owned(),
    };
    let head = prefix
        .get(128..144)
        .ok_or_else(|| bad("shorter than the Part-10 header"))?;
    if &head[..4] != b"DICM" {
        return Err(bad("no DICM magic"));
    }
    // (0002,0000) UL, 4-byte value: tag 02 00 00 00, VR "UL", length 4.
    if head[4..12] != [0x02, 0x00, 0x00, 0x00, b'U', b'L', 0x04, 0x00] {
        return Err(bad(
            "the file meta group does not start with its group length",
        ));
    }
    let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
    Ok(144 + u64::from(len))
}

/// What identifies a file, as far as it could be read (for the client's
/// answer when the file is refused).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identified {
    /// (0008,0016), if read.
    pub sop_class_uid: Option<String>,
    /// (0008,0018), if read.
    pub sop_instance_uid: Option<String>,
    /// (0020,000D), if read.
    pub study_instance_uid: Option<String>,
    /// (0020,000E), if read.
    pub series_instance_uid: Option<String>,
    /// (0010,0020), if read.
    pub patient_id: Option<String>,
}

impl From<&crate::model::DicomSummary> for Identified {
    fn from(d: &crate::model::DicomSummary) -> Self {
        Self {
            sop_class_uid: Some(d.sop_class_uid.to_string()),
            sop_instance_uid: Some(d.sop_instance_uid.to_string()),
            study_instance_uid: Some(d.study_instance_uid.to_string()),
            series_instance_uid: Some(d.series_instance_uid.to_string()),
            patient_id: Some(d.patient_id.clone()),
        }
    }
}

/// Read the identifying attributes of a file that may be invalid: the
/// pre-scan's findings up to wherever it stopped. Pure and bounded like
/// [`prescan`].
pub fn identify(prefix: &[u8], total_len: u64, limits: &PrescanLimits) -> Identified {
    let report = prescan::prescan_partial(prefix, total_len, limits);
    Identified {
        sop_class_uid: report.sop_class_uid,
        sop_instance_uid: report.sop_instance_uid,
        study_instance_uid: report.study_instance_uid,
        series_instance_uid: report.series_instance_uid,
        patient_id: report.patient_id,
    }
}

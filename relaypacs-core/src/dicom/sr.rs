//! Reports as a clinician reads them: a DICOM Structured Report's content
//! tree (PS3.3 C.17.3) and the document of an Encapsulated PDF (PS3.3
//! C.24.2), read from Part-10 bytes by pure functions with their limits
//! as arguments.
//!
//! Both go through the same gate as uploads: [`prescan`] first (every
//! declared length against the bytes that remain, nesting and element
//! count capped, inflation bounded), then dicom-object on a thread with
//! an explicit stack, then a walk of the object that stops at the limits.

use std::fmt::Write as _;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::OddLengthStrategy;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use serde::Serialize;

use super::{DicomError, PrescanLimits, prescan};

/// SOP Class UID of Encapsulated PDF Storage.
pub const ENCAPSULATED_PDF_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.104.1";

/// Limits of [`read_structured_report`] and [`extract_encapsulated_pdf`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportLimits {
    /// Largest Part-10 file read (default 64 MiB).
    pub max_bytes: u64,
    /// Deepest content tree: the root's children are at depth 1 (default
    /// 32). The pre-scan allows this many sequences plus 3 (concept names,
    /// measured values and their units sit below an item).
    pub max_depth: u32,
    /// Most content items in the tree, the root included (default 10,000).
    /// The pre-scan allows 64 data elements per item plus 4,096.
    pub max_items: u64,
    /// Longest text value of an item, in bytes (default 1 MiB).
    pub max_text_len: usize,
    /// Stack of the dicom-object parser thread (default 32 MiB).
    pub parser_stack_bytes: usize,
}

impl Default for ReportLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_depth: 32,
            max_items: 10_000,
            max_text_len: 1 << 20,
            parser_stack_bytes: 32 << 20,
        }
    }
}

impl ReportLimits {
    fn prescan(&self) -> PrescanLimits {
        PrescanLimits {
            max_depth: self.max_depth.saturating_add(3),
            max_elements: self.max_items.saturating_mul(64).saturating_add(4096),
            max_inflated_bytes: self.max_bytes,
        }
    }
}

/// Why a report cannot be read. Every variant is the object's fault (it is
/// never the server's); none carries patient data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The file is larger than allowed.
    #[error("report of {actual} bytes, more than {max}")]
    TooLarge {
        /// The limit.
        max: u64,
        /// The file's size.
        actual: u64,
    },
    /// The file is not sound DICOM.
    #[error(transparent)]
    Dicom(#[from] DicomError),
    /// Not a Structured Report (its SOP class or its root item).
    #[error("not a structured report: {reason}")]
    NotStructuredReport {
        /// Why.
        reason: String,
    },
    /// Not an Encapsulated PDF, or its document is not a PDF.
    #[error("not an encapsulated PDF: {reason}")]
    NotPdf {
        /// Why.
        reason: String,
    },
    /// The content tree is deeper than allowed.
    #[error("content tree deeper than {max}")]
    TooDeep {
        /// The limit.
        max: u32,
    },
    /// The content tree has more items than allowed.
    #[error("more than {max} content items")]
    TooManyItems {
        /// The limit.
        max: u64,
    },
    /// A text value is longer than allowed.
    #[error("a text value of {actual} bytes, more than {max}")]
    TextTooLong {
        /// The limit.
        max: usize,
        /// Its length.
        actual: usize,
    },
    /// A content item breaks PS3.3 C.17.3 (a missing Value Type, a NUM
    /// without a number, …).
    #[error("malformed content item: {reason}")]
    Malformed {
        /// Why.
        reason: String,
    },
}

impl ReportError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "RELAY_REPORT_TOO_LARGE",
            Self::Dicom(d) => d.code(),
            Self::NotStructuredReport { .. } => "RELAY_REPORT_NOT_SR",
            Self::NotPdf { .. } => "RELAY_REPORT_NOT_PDF",
            Self::TooDeep { .. } => "RELAY_REPORT_TOO_DEEP",
            Self::TooManyItems { .. } => "RELAY_REPORT_TOO_MANY_ITEMS",
            Self::TextTooLong { .. } => "RELAY_REPORT_TEXT_TOO_LONG",
            Self::Malformed { .. } => "RELAY_REPORT_MALFORMED",
        }
    }

    /// Whether the object is sound but of a kind this reader does not
    /// handle (HTTP 415), rather than broken or over a limit (HTTP 422).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::NotStructuredReport { .. } | Self::NotPdf { .. })
    }
}

/// A coded concept: (code value, coding scheme, code meaning).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Code {
    /// Code Value, Long Code Value or URN Code Value.
    pub value: String,
    /// Coding Scheme Designator (e.g. `DCM`, `SCT`, `UCUM`).
    pub scheme: String,
    /// Code Meaning, the words a reader sees.
    pub meaning: String,
}

/// Patient and study attributes for a report's header (empty when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReportHeader {
    /// (0010,0010), as written (`Family^Given^…`).
    pub patient_name: String,
    /// (0010,0020).
    pub patient_id: String,
    /// (0010,0030), `YYYYMMDD`.
    pub patient_birth_date: String,
    /// (0010,0040).
    pub patient_sex: String,
    /// (0020,000D).
    pub study_instance_uid: String,
    /// (0008,0020), `YYYYMMDD`.
    pub study_date: String,
    /// (0008,0030).
    pub study_time: String,
    /// (0008,1030).
    pub study_description: String,
    /// (0008,0050).
    pub accession_number: String,
    /// (0008,0090), as written.
    pub referring_physician: String,
    /// (0008,0023), `YYYYMMDD`.
    pub content_date: String,
    /// (0008,0033).
    pub content_time: String,
    /// (0008,0080).
    pub institution: String,
    /// (0008,0070).
    pub manufacturer: String,
}

/// One verifier of a report (Verifying Observer Sequence).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verifier {
    /// (0040,A075), as written.
    pub name: String,
    /// (0040,A027).
    pub organization: String,
    /// (0040,A030).
    pub date_time: String,
}

/// A Structured Report as read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SrDocument {
    /// (0008,0016).
    pub sop_class_uid: String,
    /// (0008,0018).
    pub sop_instance_uid: String,
    /// The root's Concept Name (the document title).
    pub title: Option<Code>,
    /// Patient and study.
    pub header: ReportHeader,
    /// (0040,A491) `PARTIAL` or `COMPLETE`, empty when absent.
    pub completion_flag: String,
    /// (0040,A492).
    pub completion_description: String,
    /// (0040,A493) `UNVERIFIED` or `VERIFIED`, empty when absent.
    pub verification_flag: String,
    /// (0040,A496) `PRELIMINARY` or `FINAL`, empty when absent.
    pub preliminary_flag: String,
    /// Who verified it.
    pub verifiers: Vec<Verifier>,
    /// The root's children.
    pub items: Vec<SrItem>,
}

/// A content item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SrItem {
    /// (0040,A010) `CONTAINS`, `HAS PROPERTIES`, `INFERRED FROM`, …
    pub relationship: String,
    /// (0040,A043) Concept Name, if any.
    pub concept: Option<Code>,
    /// The value, by Value Type.
    pub value: SrValue,
    /// Its children.
    pub children: Vec<SrItem>,
}

/// The value of a content item, by Value Type (0040,A040).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SrValue {
    /// `CONTAINER`: a heading over its children.
    Container {
        /// Continuity of Content `SEPARATE` (false) or `CONTINUOUS`.
        continuous: bool,
    },
    /// `TEXT`.
    Text(String),
    /// `CODE`: the Concept Code.
    Code(Code),
    /// `NUM`: a measurement.
    Num {
        /// Numeric Value (DS, as written); `None` when the Measured Value
        /// Sequence is empty (the qualifier then says why).
        value: Option<String>,
        /// Measurement Units.
        units: Option<Code>,
        /// Numeric Value Qualifier (e.g. "Not a number").
        qualifier: Option<Code>,
    },
    /// `DATETIME`, as written.
    DateTime(String),
    /// `DATE`, as written.
    Date(String),
    /// `TIME`, as written.
    Time(String),
    /// `PNAME`, as written.
    PersonName(String),
    /// `UIDREF`.
    UidRef(String),
    /// `COMPOSITE`, `IMAGE` or `WAVEFORM`: a reference to another object.
    Reference {
        /// The Value Type.
        kind: String,
        /// Referenced SOP Class UID.
        sop_class_uid: String,
        /// Referenced SOP Instance UID.
        sop_instance_uid: String,
        /// Referenced Frame Number(s), as written.
        frames: String,
    },
    /// `SCOORD` or `SCOORD3D`: summarised.
    SpatialCoordinates {
        /// The Value Type.
        kind: String,
        /// Graphic Type (`POINT`, `POLYLINE`, …).
        graphic_type: String,
        /// Number of coordinate values in Graphic Data.
        values: u32,
    },
    /// `TCOORD`: summarised.
    TemporalCoordinates {
        /// Temporal Range Type (`POINT`, `SEGMENT`, …).
        range_type: String,
        /// Number of sample positions, time offsets or date-times.
        values: u32,
    },
    /// A by-reference relationship: the item it points to, as its
    /// Referenced Content Item Identifier (`1.2.3`).
    ByReference(String),
    /// A Value Type this reader does not know: only its name.
    Other(String),
}

/// Read a Structured Report (any SR storage class) from Part-10 bytes.
/// Pure and bounded by `limits`; blocking (dicom-object runs on a thread of
/// its own with `limits.parser_stack_bytes` of stack).
///
/// # Errors
/// [`ReportError::NotStructuredReport`] for another SOP class or a root
/// that is not a CONTAINER; [`ReportError::Dicom`] when the file is not
/// sound DICOM; the limit variants; [`ReportError::Malformed`] for a content
/// item without a Value Type or with a value missing for it.
pub fn read_structured_report(
    bytes: &[u8],
    limits: &ReportLimits,
) -> Result<SrDocument, ReportError> {
    let walk_limits = limits.clone();
    with_object(bytes, limits, move |obj| {
        let sop_class_uid = text_of(obj, tags::SOP_CLASS_UID);
        if !sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.88.") {
            return Err(ReportError::NotStructuredReport {
                reason: format!("SOP class {sop_class_uid:?} is not an SR storage class"),
            });
        }
        let root_type = text_of(obj, tags::VALUE_TYPE);
        if root_type != "CONTAINER" {
            return Err(ReportError::NotStructuredReport {
                reason: format!("the root content item is {root_type:?}, not a CONTAINER"),
            });
        }
        let mut walk = Walk {
            limits: &walk_limits,
            items: 1,
        };
        let items = walk.children(obj, 1)?;
        let verifiers = obj
            .element_opt(tags::VERIFYING_OBSERVER_SEQUENCE)
            .ok()
            .flatten()
            .and_then(|e| e.items())
            .unwrap_or(&[])
            .iter()
            .map(|v| Verifier {
                name: text_of(v, tags::VERIFYING_OBSERVER_NAME),
                organization: text_of(v, tags::VERIFYING_ORGANIZATION),
                date_time: text_of(v, tags::VERIFICATION_DATE_TIME),
            })
            .collect();
        Ok(SrDocument {
            sop_instance_uid: text_of(obj, tags::SOP_INSTANCE_UID),
            sop_class_uid,
            title: code_in(obj, tags::CONCEPT_NAME_CODE_SEQUENCE),
            header: ReportHeader {
                patient_name: text_of(obj, tags::PATIENT_NAME),
                patient_id: text_of(obj, tags::PATIENT_ID),
                patient_birth_date: text_of(obj, tags::PATIENT_BIRTH_DATE),
                patient_sex: text_of(obj, tags::PATIENT_SEX),
                study_instance_uid: text_of(obj, tags::STUDY_INSTANCE_UID),
                study_date: text_of(obj, tags::STUDY_DATE),
                study_time: text_of(obj, tags::STUDY_TIME),
                study_description: text_of(obj, tags::STUDY_DESCRIPTION),
                accession_number: text_of(obj, tags::ACCESSION_NUMBER),
                referring_physician: text_of(obj, tags::REFERRING_PHYSICIAN_NAME),
                content_date: text_of(obj, tags::CONTENT_DATE),
                content_time: text_of(obj, tags::CONTENT_TIME),
                institution: text_of(obj, tags::INSTITUTION_NAME),
                manufacturer: text_of(obj, tags::MANUFACTURER),
            },
            completion_flag: text_of(obj, tags::COMPLETION_FLAG),
            completion_description: text_of(obj, tags::COMPLETION_FLAG_DESCRIPTION),
            verification_flag: text_of(obj, tags::VERIFICATION_FLAG),
            preliminary_flag: text_of(obj, tags::PRELIMINARY_FLAG),
            verifiers,
            items,
        })
    })
}

/// The PDF held by an Encapsulated PDF object: the value of (0042,0011)
/// Encapsulated Document when (0042,0012) MIME Type of Encapsulated
/// Document is `application/pdf` and the bytes start with `%PDF-`. The one
/// pad byte that makes the value's length even is removed when (0042,0015)
/// Encapsulated Document Length says the document is one byte shorter, or,
/// without that attribute, when the value ends in `0x00` right after
/// `%%EOF` (and its line end). Pure and bounded by `limits.max_bytes`;
/// blocking like [`read_structured_report`].
///
/// # Errors
/// [`ReportError::NotPdf`] for another SOP class, another MIME type, a
/// missing document or one that does not start with `%PDF-`, or a declared
/// document length that does not fit the value; [`ReportError::Dicom`] and
/// [`ReportError::TooLarge`] as for any report.
pub fn extract_encapsulated_pdf(
    bytes: &[u8],
    limits: &ReportLimits,
) -> Result<Vec<u8>, ReportError> {
    with_object(bytes, limits, |obj| {
        let not_pdf = |reason: String| ReportError::NotPdf { reason };
        let class = text_of(obj, tags::SOP_CLASS_UID);
        if class != ENCAPSULATED_PDF_STORAGE {
            return Err(not_pdf(format!(
                "SOP class {class:?} is not Encapsulated PDF Storage"
            )));
        }
        let mime = text_of(obj, tags::MIME_TYPE_OF_ENCAPSULATED_DOCUMENT);
        if !mime.eq_ignore_ascii_case("application/pdf") {
            return Err(not_pdf(format!("MIME type {mime:?}, not application/pdf")));
        }
        let doc = obj
            .element_opt(tags::ENCAPSULATED_DOCUMENT)
            .ok()
            .flatten()
            .and_then(|e| e.to_bytes().ok())
            .ok_or_else(|| not_pdf("no Encapsulated Document (0042,0011)".into()))?;
        let declared = obj
            .element_opt(tags::ENCAPSULATED_DOCUMENT_LENGTH)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u64>().ok());
        let doc = trim_pdf(&doc, declared).map_err(not_pdf)?;
        Ok(doc.to_vec())
    })
}

/// The document without its pad byte (see [`extract_encapsulated_pdf`]).
fn trim_pdf(doc: &[u8], declared: Option<u64>) -> Result<&[u8], String> {
    if !doc.starts_with(b"%PDF-") {
        return Err("the document does not start with %PDF-".into());
    }
    let len = doc.len() as u64;
    match declared {
        Some(d) if d == len => Ok(doc),
        Some(d) if d + 1 == len && doc.last() == Some(&0) => Ok(&doc[..doc.len() - 1]),
        Some(d) => Err(format!(
            "Encapsulated Document Length {d} does not fit a value of {len} bytes"
        )),
        None => {
            if let Some(body) = doc.strip_suffix(&[0]) {
                let t = body.strip_suffix(b"\n").unwrap_or(body);
                let t = t.strip_suffix(b"\r").unwrap_or(t);
                if t.ends_with(b"%%EOF") {
                    return Ok(body);
                }
            }
            Ok(doc)
        }
    }
}

/// Pre-scan `bytes`, parse them with dicom-object and run `f` on the
/// object, both on a thread with `limits.parser_stack_bytes` of stack.
fn with_object<T: Send + 'static>(
    bytes: &[u8],
    limits: &ReportLimits,
    f: impl FnOnce(&InMemDicomObject) -> Result<T, ReportError> + Send + 'static,
) -> Result<T, ReportError> {
    let total = bytes.len() as u64;
    if total > limits.max_bytes {
        return Err(ReportError::TooLarge {
            max: limits.max_bytes,
            actual: total,
        });
    }
    let report = prescan(bytes, total, &limits.prescan())?;
    // What the pre-scan verified, as validate_dicom hands it over: a
    // Deflated data set already inflated (its meta group relabelled).
    let header: Vec<u8> = match &report.inflated_header {
        Some(inflated) => {
            let meta_end = usize::try_from(report.meta_end)
                .unwrap_or(bytes.len())
                .min(bytes.len());
            let mut h = bytes[..meta_end].to_vec();
            super::validate::relabel_deflated(&mut h)?;
            h.extend_from_slice(inflated);
            h
        }
        None => {
            let end = usize::try_from(report.header_end)
                .unwrap_or(bytes.len())
                .min(bytes.len());
            bytes[..end].to_vec()
        }
    };
    std::thread::Builder::new()
        .name("relaypacs-report-parse".into())
        .stack_size(limits.parser_stack_bytes)
        .spawn(move || {
            let obj = OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .odd_length_strategy(OddLengthStrategy::Accept)
                .from_reader(std::io::Cursor::new(header))
                .map_err(|e| DicomError::Parser {
                    message: e.to_string(),
                })?;
            f(&obj)
        })
        .map_err(|e| DicomError::Parser {
            message: format!("cannot start parser thread: {e}"),
        })?
        .join()
        .map_err(|_| DicomError::Parser {
            message: "the report parser panicked".into(),
        })?
}

/// A string attribute of `obj`, trimmed of padding; empty when absent or
/// not text.
fn text_of(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_owned())
        .unwrap_or_default()
}

/// The first item of a code sequence `tag` of `obj`, as a [`Code`].
fn code_in(obj: &InMemDicomObject, tag: Tag) -> Option<Code> {
    let item = obj.element_opt(tag).ok().flatten()?.items()?.first()?;
    let mut value = text_of(item, tags::CODE_VALUE);
    if value.is_empty() {
        value = text_of(item, tags::LONG_CODE_VALUE);
    }
    if value.is_empty() {
        value = text_of(item, tags::URN_CODE_VALUE);
    }
    Some(Code {
        value,
        scheme: text_of(item, tags::CODING_SCHEME_DESIGNATOR),
        meaning: text_of(item, tags::CODE_MEANING),
    })
}

/// Number of values of `tag` in `obj` (0 when absent).
fn count_of(obj: &InMemDicomObject, tag: Tag) -> u32 {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .map_or(0, |e| e.value().multiplicity())
}

struct Walk<'a> {
    limits: &'a ReportLimits,
    items: u64,
}

impl Walk<'_> {
    /// The items of `obj`'s Content Sequence, at content depth `depth`.
    fn children(&mut self, obj: &InMemDicomObject, depth: u32) -> Result<Vec<SrItem>, ReportError> {
        let Some(items) = obj
            .element_opt(tags::CONTENT_SEQUENCE)
            .ok()
            .flatten()
            .and_then(|e| e.items())
        else {
            return Ok(Vec::new());
        };
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if depth > self.limits.max_depth {
            return Err(ReportError::TooDeep {
                max: self.limits.max_depth,
            });
        }
        let mut out = Vec::with_capacity(items.len().min(1024));
        for item in items {
            self.items += 1;
            if self.items > self.limits.max_items {
                return Err(ReportError::TooManyItems {
                    max: self.limits.max_items,
                });
            }
            out.push(self.item(item, depth)?);
        }
        Ok(out)
    }

    fn text(&self, s: String) -> Result<String, ReportError> {
        if s.len() > self.limits.max_text_len {
            return Err(ReportError::TextTooLong {
                max: self.limits.max_text_len,
                actual: s.len(),
            });
        }
        Ok(s)
    }

    fn item(&mut self, obj: &InMemDicomObject, depth: u32) -> Result<SrItem, ReportError> {
        let relationship = text_of(obj, tags::RELATIONSHIP_TYPE);
        let by_ref = text_of(obj, tags::REFERENCED_CONTENT_ITEM_IDENTIFIER);
        let value_type = text_of(obj, tags::VALUE_TYPE);
        let value = if value_type.is_empty() && !by_ref.is_empty() {
            SrValue::ByReference(by_ref.replace('\\', "."))
        } else {
            self.value(obj, &value_type)?
        };
        let concept = code_in(obj, tags::CONCEPT_NAME_CODE_SEQUENCE);
        let concept = match concept {
            Some(c) => Some(Code {
                meaning: self.text(c.meaning)?,
                ..c
            }),
            None => None,
        };
        Ok(SrItem {
            relationship,
            concept,
            value,
            children: self.children(obj, depth + 1)?,
        })
    }

    fn value(&mut self, obj: &InMemDicomObject, value_type: &str) -> Result<SrValue, ReportError> {
        let malformed = |reason: String| ReportError::Malformed { reason };
        Ok(match value_type {
            "" => return Err(malformed("a content item without a Value Type".into())),
            "CONTAINER" => SrValue::Container {
                continuous: text_of(obj, tags::CONTINUITY_OF_CONTENT) == "CONTINUOUS",
            },
            "TEXT" => SrValue::Text(self.text(text_of(obj, tags::TEXT_VALUE))?),
            "CODE" => {
                let c = code_in(obj, tags::CONCEPT_CODE_SEQUENCE)
                    .ok_or_else(|| malformed("a CODE item without a Concept Code".into()))?;
                SrValue::Code(Code {
                    meaning: self.text(c.meaning)?,
                    ..c
                })
            }
            "NUM" => {
                let measured = obj
                    .element_opt(tags::MEASURED_VALUE_SEQUENCE)
                    .ok()
                    .flatten()
                    .and_then(|e| e.items())
                    .and_then(|i| i.first());
                let (value, units) = match measured {
                    Some(m) => {
                        let v = text_of(m, tags::NUMERIC_VALUE);
                        if v.is_empty() {
                            return Err(malformed("a NUM measured value without a number".into()));
                        }
                        (
                            Some(self.text(v)?),
                            code_in(m, tags::MEASUREMENT_UNITS_CODE_SEQUENCE),
                        )
                    }
                    None => (None, None),
                };
                SrValue::Num {
                    value,
                    units,
                    qualifier: code_in(obj, tags::NUMERIC_VALUE_QUALIFIER_CODE_SEQUENCE),
                }
            }
            "DATETIME" => SrValue::DateTime(text_of(obj, tags::DATE_TIME)),
            "DATE" => SrValue::Date(text_of(obj, tags::DATE)),
            "TIME" => SrValue::Time(text_of(obj, tags::TIME)),
            "PNAME" => SrValue::PersonName(self.text(text_of(obj, tags::PERSON_NAME))?),
            "UIDREF" => SrValue::UidRef(text_of(obj, tags::UID)),
            "COMPOSITE" | "IMAGE" | "WAVEFORM" => {
                let r = obj
                    .element_opt(tags::REFERENCED_SOP_SEQUENCE)
                    .ok()
                    .flatten()
                    .and_then(|e| e.items())
                    .and_then(|i| i.first());
                let get = |t| r.map(|r| text_of(r, t)).unwrap_or_default();
                SrValue::Reference {
                    kind: value_type.to_owned(),
                    sop_class_uid: get(tags::REFERENCED_SOP_CLASS_UID),
                    sop_instance_uid: get(tags::REFERENCED_SOP_INSTANCE_UID),
                    frames: get(tags::REFERENCED_FRAME_NUMBER),
                }
            }
            "SCOORD" | "SCOORD3D" => SrValue::SpatialCoordinates {
                kind: value_type.to_owned(),
                graphic_type: text_of(obj, tags::GRAPHIC_TYPE),
                values: count_of(obj, tags::GRAPHIC_DATA),
            },
            "TCOORD" => SrValue::TemporalCoordinates {
                range_type: text_of(obj, tags::TEMPORAL_RANGE_TYPE),
                values: count_of(obj, tags::REFERENCED_SAMPLE_POSITIONS)
                    + count_of(obj, tags::REFERENCED_TIME_OFFSETS)
                    + count_of(obj, tags::REFERENCED_DATE_TIME),
            },
            other => {
                let mut name = String::new();
                // Only printable ASCII of a hostile Value Type is kept.
                for ch in other.chars().take(16) {
                    if ch.is_ascii_graphic() || ch == ' ' {
                        let _ = write!(name, "{ch}");
                    }
                }
                SrValue::Other(name)
            }
        })
    }
}

/// A Person Name as a reader writes it: `Family^Given^Middle^Prefix^Suffix`
/// (its first component group) becomes `Prefix Given Middle Family, Suffix`.
///
/// ```
/// use relaypacs_core::dicom::sr::person_name;
/// assert_eq!(person_name("Doe^Jane^Q^Dr.^MD"), "Dr. Jane Q Doe, MD");
/// assert_eq!(person_name("Doe^Jane"), "Jane Doe");
/// assert_eq!(person_name(""), "");
/// ```
pub fn person_name(pn: &str) -> String {
    let first = pn.split('=').next().unwrap_or("");
    let mut parts = first.split('^').map(str::trim);
    let family = parts.next().unwrap_or("");
    let given = parts.next().unwrap_or("");
    let middle = parts.next().unwrap_or("");
    let prefix = parts.next().unwrap_or("");
    let suffix = parts.next().unwrap_or("");
    let mut out = [prefix, given, middle, family]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !suffix.is_empty() {
        out.push_str(", ");
        out.push_str(suffix);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dicom::test_part10::{self, Ids, el};
    use proptest::prelude::*;

    /// A sequence of `items` (each an encoded data set), of undefined
    /// length with undefined-length items when `undefined`.
    fn seq(out: &mut Vec<u8>, g: u16, e: u16, items: &[Vec<u8>], undefined: bool) {
        let mut body = Vec::new();
        for it in items {
            body.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            if undefined {
                body.extend_from_slice(&u32::MAX.to_le_bytes());
                body.extend_from_slice(it);
                body.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            } else {
                body.extend_from_slice(&(it.len() as u32).to_le_bytes());
                body.extend_from_slice(it);
            }
        }
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(b"SQ\0\0");
        if undefined {
            out.extend_from_slice(&u32::MAX.to_le_bytes());
            out.extend_from_slice(&body);
            out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        } else {
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&body);
        }
    }

    fn code(value: &str, scheme: &str, meaning: &str) -> Vec<u8> {
        let mut c = Vec::new();
        el(&mut c, 0x0008, 0x0100, b"SH", value.as_bytes());
        el(&mut c, 0x0008, 0x0102, b"SH", scheme.as_bytes());
        el(&mut c, 0x0008, 0x0104, b"LO", meaning.as_bytes());
        c
    }

    /// A Part-10 file (Explicit VR Little Endian) of class `class` around
    /// the data set elements `rest` (after the UIDs, in tag order).
    pub(crate) fn part10(class: &str, rest: &[u8]) -> Vec<u8> {
        let mut class = class.as_bytes().to_vec();
        if class.len() % 2 == 1 {
            class.push(0);
        }
        let ids = Ids {
            class: &class,
            instance: b"1.2.3.4\0",
            patient_name: Some(b"Doe^Jane"),
            patient_id: Some(b"P1"),
        };
        test_part10::part10(&ids, rest)
    }

    /// A content tree to encode.
    #[derive(Clone, Debug)]
    pub(crate) enum Node {
        Container(Vec<Node>, bool),
        Text(String),
        Code(String),
        Num(String, String),
        Junk(String),
    }

    /// The items of `nodes`, encoded.
    fn items(nodes: &[Node], undefined: bool) -> Vec<Vec<u8>> {
        nodes
            .iter()
            .map(|n| {
                let mut d = Vec::new();
                el(&mut d, 0x0040, 0xA010, b"CS", b"CONTAINS");
                let (vt, concept): (&[u8], _) = match n {
                    Node::Container(..) => (b"CONTAINER", code("111", "DCM", "Heading")),
                    Node::Text(_) => (b"TEXT", code("121071", "DCM", "Finding")),
                    Node::Code(_) => (b"CODE", code("121071", "DCM", "Finding")),
                    Node::Num(..) => (b"NUM", code("410668003", "SCT", "Length")),
                    Node::Junk(j) => (j.as_bytes(), code("1", "99X", "Junk")),
                };
                el(&mut d, 0x0040, 0xA040, b"CS", vt);
                seq(&mut d, 0x0040, 0xA043, &[concept], undefined);
                match n {
                    Node::Container(children, continuous) => {
                        let c: &[u8] = if *continuous {
                            b"CONTINUOUS"
                        } else {
                            b"SEPARATE"
                        };
                        el(&mut d, 0x0040, 0xA050, b"CS", c);
                        if !children.is_empty() {
                            seq(
                                &mut d,
                                0x0040,
                                0xA730,
                                &items(children, !undefined),
                                !undefined,
                            );
                        }
                    }
                    Node::Text(t) => el(&mut d, 0x0040, 0xA160, b"UT", t.as_bytes()),
                    Node::Code(m) => {
                        seq(&mut d, 0x0040, 0xA168, &[code("C1", "SCT", m)], undefined)
                    }
                    Node::Num(v, u) => {
                        let mut m = Vec::new();
                        seq(&mut m, 0x0040, 0x08EA, &[code(u, "UCUM", u)], undefined);
                        el(&mut m, 0x0040, 0xA30A, b"DS", v.as_bytes());
                        seq(&mut d, 0x0040, 0xA300, &[m], undefined);
                    }
                    Node::Junk(_) => {}
                }
                d
            })
            .collect()
    }

    /// A Comprehensive SR whose root holds `nodes`.
    pub(crate) fn sr(nodes: &[Node], undefined: bool) -> Vec<u8> {
        let mut d = Vec::new();
        el(&mut d, 0x0040, 0xA040, b"CS", b"CONTAINER");
        seq(
            &mut d,
            0x0040,
            0xA043,
            &[code("18748-4", "LN", "Diagnostic imaging report")],
            undefined,
        );
        el(&mut d, 0x0040, 0xA050, b"CS", b"SEPARATE");
        el(&mut d, 0x0040, 0xA491, b"CS", b"COMPLETE");
        el(&mut d, 0x0040, 0xA493, b"CS", b"VERIFIED");
        if !nodes.is_empty() {
            seq(&mut d, 0x0040, 0xA730, &items(nodes, undefined), undefined);
        }
        part10("1.2.840.10008.5.1.4.1.1.88.33", &d)
    }

    /// Whether `got` is exactly `want`.
    fn same(want: &[Node], got: &[SrItem]) -> bool {
        want.len() == got.len()
            && want.iter().zip(got).all(|(w, g)| match (w, &g.value) {
                (Node::Container(c, k), SrValue::Container { continuous }) => {
                    k == continuous && same(c, &g.children)
                }
                (Node::Text(t), SrValue::Text(v)) => t.trim_end() == v,
                (Node::Code(m), SrValue::Code(c)) => m.trim_end() == c.meaning,
                (Node::Num(v, u), SrValue::Num { value, units, .. }) => {
                    value.as_deref() == Some(v.trim_end())
                        && units.as_ref().map(|u| u.meaning.as_str()) == Some(u.trim_end())
                }
                _ => false,
            })
    }

    fn depth(nodes: &[Node]) -> u32 {
        nodes
            .iter()
            .map(|n| match n {
                Node::Container(c, _) => 1 + depth(c),
                _ => 1,
            })
            .max()
            .unwrap_or(0)
    }

    fn count(nodes: &[Node]) -> u64 {
        nodes
            .iter()
            .map(|n| match n {
                Node::Container(c, _) => 1 + count(c),
                _ => 1,
            })
            .sum()
    }

    fn has_junk(nodes: &[Node]) -> bool {
        nodes.iter().any(|n| match n {
            Node::Container(c, _) => has_junk(c),
            Node::Junk(j) => matches!(j.trim(), "" | "CODE"),
            _ => false,
        })
    }

    fn any_junk(nodes: &[Node]) -> bool {
        nodes.iter().any(|n| match n {
            Node::Container(c, _) => any_junk(c),
            Node::Junk(_) => true,
            _ => false,
        })
    }

    fn word() -> impl Strategy<Value = String> {
        "[A-Za-z0-9 .,()-]{1,24}".prop_map(|s| format!("x{s}"))
    }

    fn tree() -> impl Strategy<Value = Vec<Node>> {
        let leaf = prop_oneof![
            word().prop_map(Node::Text),
            word().prop_map(Node::Code),
            ("-?[0-9]{1,6}(\\.[0-9]{1,3})?", "[a-z]{1,4}").prop_map(|(v, u)| Node::Num(v, u)),
            "[A-Z ]{0,10}".prop_map(Node::Junk),
        ];
        let node = leaf.prop_recursive(12, 96, 6, |inner| {
            (prop::collection::vec(inner, 0..6), any::<bool>())
                .prop_map(|(c, k)| Node::Container(c, k))
        });
        prop::collection::vec(node, 0..6)
    }

    #[test]
    fn reads_a_nested_report() {
        let nodes = vec![
            Node::Container(
                vec![
                    Node::Text("No acute findings.".into()),
                    Node::Code("Normal".into()),
                    Node::Num("12.5".into(), "mm".into()),
                ],
                false,
            ),
            Node::Text("Impression: normal".into()),
        ];
        for undefined in [false, true] {
            let f = sr(&nodes, undefined);
            let doc = read_structured_report(&f, &ReportLimits::default()).unwrap();
            assert_eq!(
                doc.title.as_ref().unwrap().meaning,
                "Diagnostic imaging report"
            );
            assert_eq!(doc.title.as_ref().unwrap().value, "18748-4");
            assert_eq!(
                (doc.completion_flag.as_str(), doc.verification_flag.as_str()),
                ("COMPLETE", "VERIFIED")
            );
            assert_eq!(doc.header.patient_name, "Doe^Jane");
            assert!(same(&nodes, &doc.items), "{doc:#?}");
            assert_eq!(doc.items[0].relationship, "CONTAINS");
            let SrValue::Num { units, .. } = &doc.items[0].children[2].value else {
                panic!("{doc:#?}");
            };
            assert_eq!(units.as_ref().unwrap().scheme, "UCUM");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let deep = (0..10).fold(vec![Node::Text("leaf".into())], |c, _| {
            vec![Node::Container(c, false)]
        });
        let f = sr(&deep, false);
        let tight = ReportLimits {
            max_depth: 5,
            ..ReportLimits::default()
        };
        let e = read_structured_report(&f, &tight).unwrap_err();
        assert!(
            matches!(
                e,
                ReportError::TooDeep { .. } | ReportError::Dicom(DicomError::TooDeep { .. })
            ),
            "{e:?}"
        );
        let wide: Vec<Node> = (0..50).map(|i| Node::Text(format!("t{i}"))).collect();
        let few = ReportLimits {
            max_items: 10,
            ..ReportLimits::default()
        };
        assert_eq!(
            read_structured_report(&sr(&wide, true), &few).unwrap_err(),
            ReportError::TooManyItems { max: 10 }
        );
        let long = vec![Node::Text("y".repeat(100))];
        let short = ReportLimits {
            max_text_len: 50,
            ..ReportLimits::default()
        };
        assert_eq!(
            read_structured_report(&sr(&long, false), &short).unwrap_err(),
            ReportError::TextTooLong {
                max: 50,
                actual: 100
            }
        );
        let small = ReportLimits {
            max_bytes: 100,
            ..ReportLimits::default()
        };
        assert!(matches!(
            read_structured_report(&sr(&long, false), &small).unwrap_err(),
            ReportError::TooLarge { max: 100, .. }
        ));
    }

    #[test]
    fn other_objects_are_refused_with_a_typed_error() {
        let image = part10("1.2.840.10008.5.1.4.1.1.7", &[]);
        let e = read_structured_report(&image, &ReportLimits::default()).unwrap_err();
        assert!(e.is_unsupported(), "{e:?}");
        let e = extract_encapsulated_pdf(&image, &ReportLimits::default()).unwrap_err();
        assert!(e.is_unsupported(), "{e:?}");
        let e = read_structured_report(b"not dicom at all", &ReportLimits::default()).unwrap_err();
        assert!(matches!(e, ReportError::Dicom(_)), "{e:?}");
        assert!(!e.is_unsupported());
        // An SR class whose root is not a container.
        let mut d = Vec::new();
        el(&mut d, 0x0040, 0xA040, b"CS", b"TEXT");
        let f = part10("1.2.840.10008.5.1.4.1.1.88.11", &d);
        let e = read_structured_report(&f, &ReportLimits::default()).unwrap_err();
        assert_eq!(e.code(), "RELAY_REPORT_NOT_SR");
    }

    fn pdf_object(mime: &str, doc: &[u8], declared: Option<u32>) -> Vec<u8> {
        let mut d = Vec::new();
        el(&mut d, 0x0042, 0x0011, b"OB", doc);
        el(&mut d, 0x0042, 0x0012, b"LO", mime.as_bytes());
        if let Some(n) = declared {
            el(&mut d, 0x0042, 0x0015, b"UL", &n.to_le_bytes());
        }
        part10(ENCAPSULATED_PDF_STORAGE, &d)
    }

    #[test]
    fn extracts_the_pdf_without_its_pad_byte() {
        let pdf = b"%PDF-1.4\n% x\n%%EOF\n"; // odd: padded with one NUL
        assert_eq!(pdf.len() % 2, 1);
        for declared in [None, Some(pdf.len() as u32)] {
            let f = pdf_object("application/pdf", pdf, declared);
            assert_eq!(
                extract_encapsulated_pdf(&f, &ReportLimits::default()).unwrap(),
                pdf
            );
        }
        let even = b"%PDF-1.4\n%%EOF\n\n";
        let f = pdf_object("application/pdf", even, None);
        assert_eq!(
            extract_encapsulated_pdf(&f, &ReportLimits::default()).unwrap(),
            even
        );
        let f = pdf_object("text/html", pdf, None);
        assert_eq!(
            extract_encapsulated_pdf(&f, &ReportLimits::default())
                .unwrap_err()
                .code(),
            "RELAY_REPORT_NOT_PDF"
        );
        let f = pdf_object("application/pdf", b"<script>", None);
        assert!(extract_encapsulated_pdf(&f, &ReportLimits::default()).is_err());
        let f = pdf_object("application/pdf", pdf, Some(3));
        assert!(extract_encapsulated_pdf(&f, &ReportLimits::default()).is_err());
    }

    #[test]
    fn pdf_pad_byte_is_trimmed_only_when_it_is_one() {
        let pdf = b"%PDF-1.4\n1 0 obj\n%%EOF\n";
        // Declared length says one byte shorter than the value.
        let mut padded = pdf.to_vec();
        padded.push(0);
        assert_eq!(trim_pdf(&padded, Some(pdf.len() as u64)).unwrap(), pdf);
        assert_eq!(trim_pdf(&padded, None).unwrap(), pdf);
        assert_eq!(
            trim_pdf(&padded, Some(padded.len() as u64)).unwrap(),
            &padded[..]
        );
        // A NUL that is part of the document (not after %%EOF) stays.
        let binary = b"%PDF-1.4\nstream\0";
        assert_eq!(trim_pdf(binary, None).unwrap(), binary);
        assert!(trim_pdf(b"%PDF-1.4\n%%EOF", Some(99)).is_err());
        assert!(trim_pdf(b"<html>", None).is_err());
        assert!(trim_pdf(b"", None).is_err());
    }

    #[test]
    fn errors_have_codes_and_statuses() {
        assert!(ReportError::NotPdf { reason: "x".into() }.is_unsupported());
        assert!(!ReportError::TooDeep { max: 1 }.is_unsupported());
        assert_eq!(
            ReportError::TooManyItems { max: 1 }.code(),
            "RELAY_REPORT_TOO_MANY_ITEMS"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any tree of nested sequences: read exactly when it is well
        /// formed and within the limits, a typed error otherwise, never a
        /// panic; and cut anywhere, still no panic.
        #[test]
        fn walker_never_panics(nodes in tree(), undefined in any::<bool>(), max_depth in 1u32..8, max_items in 1u64..64, cut in any::<prop::sample::Index>()) {
            let limits = ReportLimits { max_depth, max_items, ..ReportLimits::default() };
            let f = sr(&nodes, undefined);
            let got = read_structured_report(&f, &limits);
            let fits = depth(&nodes) <= max_depth && count(&nodes) < max_items;
            match &got {
                Ok(doc) => {
                    prop_assert!(fits);
                    // Junk value types are read as they come; the rest exactly.
                    if !any_junk(&nodes) {
                        prop_assert!(same(&nodes, &doc.items));
                    }
                }
                Err(e) => prop_assert!(!fits || has_junk(&nodes), "{e:?}"),
            }
            let cut = cut.index(f.len());
            let _ = read_structured_report(&f[..cut], &limits);
        }
    }
}

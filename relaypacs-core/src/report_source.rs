//! The [`ReportSource`] trait: where radiologists' reports are found.
//!
//! A report is an instance added to the study at the PACS after delivery:
//! a DICOM Structured Report or an Encapsulated PDF. The gateway polls for
//! them and lets the uploader fetch them.

use std::fmt::{Debug, Display};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::digest::ByteStream;
use crate::error::Result;
use crate::ids::Uid;

/// What kind of report an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    /// A DICOM Structured Report (any SR storage class, 1.2.840.10008.5.1.4.1.1.88.*).
    StructuredReport,
    /// An Encapsulated PDF (1.2.840.10008.5.1.4.1.1.104.1).
    EncapsulatedPdf,
}

impl ReportKind {
    /// The kind of report an instance of `sop_class_uid` is, if any.
    ///
    /// ```
    /// use relaypacs_core::ReportKind;
    /// assert_eq!(ReportKind::of_sop_class("1.2.840.10008.5.1.4.1.1.88.33"), Some(ReportKind::StructuredReport));
    /// assert_eq!(ReportKind::of_sop_class("1.2.840.10008.5.1.4.1.1.104.1"), Some(ReportKind::EncapsulatedPdf));
    /// assert_eq!(ReportKind::of_sop_class("1.2.840.10008.5.1.4.1.1.2"), None);
    /// ```
    pub fn of_sop_class(sop_class_uid: &str) -> Option<Self> {
        if sop_class_uid == "1.2.840.10008.5.1.4.1.1.104.1" {
            Some(Self::EncapsulatedPdf)
        } else if sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.88.") {
            Some(Self::StructuredReport)
        } else {
            None
        }
    }
}

/// A report found in a study at the PACS.
///
/// Outside this crate, build one with [`ReportRef::new`] (fields may be
/// added).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReportRef {
    /// Study Instance UID.
    pub study_instance_uid: Uid,
    /// Series Instance UID.
    pub series_instance_uid: Uid,
    /// SOP Instance UID.
    pub sop_instance_uid: Uid,
    /// SOP Class UID.
    pub sop_class_uid: Uid,
    /// SR or PDF.
    pub kind: ReportKind,
}

impl ReportRef {
    /// The report `sop_instance_uid` of class `sop_class_uid` in the
    /// series and study named.
    pub fn new(
        study_instance_uid: Uid,
        series_instance_uid: Uid,
        sop_instance_uid: Uid,
        sop_class_uid: Uid,
        kind: ReportKind,
    ) -> Self {
        Self {
            study_instance_uid,
            series_instance_uid,
            sop_instance_uid,
            sop_class_uid,
            kind,
        }
    }
}

/// Finds and fetches reports at a PACS.
///
/// # Contract
/// - `find_reports` lists every report instance the PACS holds for the
///   study now (SR or Encapsulated PDF), and nothing else; an unknown study
///   yields an empty list, not an error.
/// - `fetch_report` streams the report as a Part-10 file.
///
/// - Both calls only read: nothing at the PACS changes.
///
/// # Errors
/// [`Error::Pacs`](crate::Error::Pacs) (transient or not) when the PACS
/// cannot be asked; [`Error::NotFound`](crate::Error::NotFound) when the
/// report is gone. An error in the middle of the stream of `fetch_report`
/// is an item of the stream; the caller discards what it received.
///
/// # Cancellation
/// Dropping either future, or the stream of `fetch_report`, stops the
/// query or the retrieval; as nothing was changed, it is harmless and the
/// call can be made again.
#[async_trait]
pub trait ReportSource: Debug + Display + Send + Sync + 'static {
    /// The reports in `study`.
    async fn find_reports(&self, study: &Uid) -> Result<Vec<ReportRef>>;

    /// The report's Part-10 bytes, streamed.
    async fn fetch_report(&self, report: &ReportRef) -> Result<ByteStream>;
}

// `Arc<S>` and `Box<S>` of an implementation (`dyn ReportSource` included)
// implement `ReportSource` too, forwarding every call: a shared or boxed
// adapter goes into code generic over `ReportSource` (a decorator, a builder).
macro_rules! forward_report_source {
    ($($ptr:ident)::+) => {
        #[async_trait]
        impl<S: ReportSource + ?Sized> ReportSource for $($ptr)::+<S> {
            async fn find_reports(&self, study: &Uid) -> Result<Vec<ReportRef>> {
                (**self).find_reports(study).await
            }

            async fn fetch_report(&self, report: &ReportRef) -> Result<ByteStream> {
                (**self).fetch_report(report).await
            }
        }
    };
}
forward_report_source!(std::sync::Arc);
forward_report_source!(Box);

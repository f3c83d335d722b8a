//! Reading a report for its owner: fetched as [`Pipeline::fetch_report`]
//! fetches it (same ownership rule, same audit), read up to a limit, then
//! parsed: a Structured Report's content tree or an Encapsulated PDF's
//! document.

use futures::StreamExt;

use super::Pipeline;
use crate::dicom::DicomError;
use crate::dicom::sr::{
    ReportError, ReportLimits, SrDocument, extract_encapsulated_pdf, read_structured_report,
};
use crate::error::Result;
use crate::ids::{Actor, SessionId};
use crate::report_source::{ReportKind, ReportRef};

/// What a report holds, ready to show.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ReportContent {
    /// A Structured Report's content tree.
    Structured(Box<SrDocument>),
    /// An Encapsulated PDF's document, exactly as embedded (pad byte removed).
    Pdf(Vec<u8>),
}

/// A report fetched for reading: which one, and its content or why it
/// cannot be read (the object's fault, never the gateway's).
#[derive(Clone, Debug, PartialEq)]
pub struct ReadReport {
    /// The report.
    pub report: ReportRef,
    /// Its content, or why it cannot be shown.
    pub content: std::result::Result<ReportContent, ReportError>,
}

impl Pipeline {
    /// Fetch a report of the actor's own delivered study (or any, for an
    /// admin) and read it, at most `limits.max_bytes` of it. Ownership and
    /// audit are those of [`Pipeline::fetch_report`]: the access is
    /// recorded when the PACS hands the report over, whether or not it can
    /// be read.
    ///
    /// # Errors
    /// As [`Pipeline::fetch_report`], and the stream's errors while it is
    /// read. A report that cannot be read is not an error here: see
    /// [`ReadReport::content`].
    pub async fn read_report(
        &self,
        actor: &Actor,
        id: SessionId,
        sop_instance_uid: &str,
        limits: &ReportLimits,
    ) -> Result<ReadReport> {
        let (report, mut stream) = self.fetch_report(actor, id, sop_instance_uid).await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let total = (bytes.len() + chunk.len()) as u64;
            if total > limits.max_bytes {
                let content = Err(ReportError::TooLarge {
                    max: limits.max_bytes,
                    actual: total,
                });
                return Ok(ReadReport { report, content });
            }
            bytes.extend_from_slice(&chunk);
        }
        let kind = report.kind;
        let limits = limits.clone();
        // Parsing is CPU work (and spawns the parser thread): off the runtime.
        let content = tokio::task::spawn_blocking(move || match kind {
            ReportKind::StructuredReport => read_structured_report(&bytes, &limits)
                .map(|d| ReportContent::Structured(Box::new(d))),
            ReportKind::EncapsulatedPdf => {
                extract_encapsulated_pdf(&bytes, &limits).map(ReportContent::Pdf)
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(ReportError::Dicom(DicomError::Parser {
                message: format!("the report reader stopped: {e}"),
            }))
        });
        Ok(ReadReport { report, content })
    }
}

//! [`DicomWebReports`]: reports found by QIDO-RS and fetched by WADO-RS.

use std::fmt;

use async_trait::async_trait;
use futures::StreamExt;
use relaypacs_core::{ByteStream, Error, ReportKind, ReportRef, ReportSource, Result, Uid};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use crate::dicomweb::{DicomWebClient, DicomWebConfig, check_status, string_of, transport};

/// Largest report accepted from the PACS (a PDF report is far smaller).
const MAX_REPORT_BYTES: u64 = 256 << 20;

/// A [`ReportSource`] over a DICOMweb PACS: lists the study's instances
/// with QIDO-RS and keeps the Structured Reports and Encapsulated PDFs;
/// fetches one with WADO-RS (`multipart/related; type="application/dicom"`),
/// streaming its single part.
#[derive(Clone, Debug)]
pub struct DicomWebReports {
    client: DicomWebClient,
}

impl fmt::Display for DicomWebReports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dicomweb-reports:{}", self.client.base())
    }
}

impl DicomWebReports {
    /// A report source for the DICOMweb root in `config`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad URL or CA file.
    pub fn new(config: &DicomWebConfig) -> Result<Self> {
        Ok(Self {
            client: DicomWebClient::new(config)?,
        })
    }
}

#[async_trait]
impl ReportSource for DicomWebReports {
    async fn find_reports(&self, study: &Uid) -> Result<Vec<ReportRef>> {
        let found = self
            .client
            .study_instances(study, &["00080016", "00080018", "0020000E"])
            .await?;
        Ok(found
            .iter()
            .filter_map(|v| {
                let class = string_of(v, "00080016")?;
                let kind = ReportKind::of_sop_class(&class)?;
                Some(ReportRef::new(
                    study.clone(),
                    Uid::parse(&string_of(v, "0020000E")?).ok()?,
                    Uid::parse(&string_of(v, "00080018")?).ok()?,
                    Uid::parse(&class).ok()?,
                    kind,
                ))
            })
            .collect())
    }

    async fn fetch_report(&self, r: &ReportRef) -> Result<ByteStream> {
        let path = format!(
            "studies/{}/series/{}/instances/{}",
            r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid
        );
        let resp = self
            .client
            .request(Method::GET, &path)?
            .header(ACCEPT, "multipart/related; type=\"application/dicom\"")
            .send()
            .await
            .map_err(|e| transport("WADO-RS", e))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Error::NotFound { what: "report" });
        }
        let resp = check_status("WADO-RS", resp).await?;
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // multer's own parser accepts only multipart/form-data.
        let boundary = ct
            .parse::<mime::Mime>()
            .ok()
            .filter(|m| m.type_() == mime::MULTIPART)
            .and_then(|m| m.get_param(mime::BOUNDARY).map(|b| b.to_string()))
            .ok_or_else(|| {
                Error::pacs_permanent(format!("WADO-RS answer is not multipart: {ct}"), None)
            })?;
        let limits = multer::Constraints::new()
            .size_limit(multer::SizeLimit::new().per_field(MAX_REPORT_BYTES));
        let mut parts = multer::Multipart::with_constraints(resp.bytes_stream(), boundary, limits);
        let part = parts
            .next_field()
            .await
            .map_err(|e| Error::pacs_transient(format!("WADO-RS body: {e}"), None))?
            .ok_or(Error::NotFound { what: "report" })?;
        Ok(part
            .map(|r| r.map_err(|e| Error::pacs_transient(format!("WADO-RS body: {e}"), None)))
            .boxed())
    }
}

//! Reports a clinician can read: a Structured Report rendered (HTML, PDF),
//! an Encapsulated PDF extracted. Same ownership and audit as the Part-10
//! download ([`super::delivery::report`]): the pipeline's
//! [`read_report`](relaypacs_core::Pipeline::read_report) fetches, reads
//! and parses; this module only renders and maps statuses.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relaypacs_core::Pipeline;
use relaypacs_core::dicom::sr::{ReportError, ReportLimits};
use relaypacs_core::pipeline::{ReadReport, ReportContent};

use super::studies::parse_id;
use super::{AuthUser, Path};
use crate::error::{ApiError, ApiResult};
use crate::report_render;

/// 415 for an object that is not a report of its kind, 422 for one that
/// is broken or over a limit: the object's fault, never a server error.
fn unreadable(e: &ReportError) -> ApiError {
    let status = if e.is_unsupported() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError::new(status, e.code(), format!("the report cannot be shown: {e}"))
}

/// A file name for `sop` with `ext` (a UID is digits and dots already; the
/// filter keeps the header safe whatever the PACS said).
fn filename(sop: &str, ext: &str) -> String {
    let safe: String = sop
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .take(64)
        .collect();
    format!("report-{safe}.{ext}")
}

fn pdf_response(bytes: Vec<u8>, disposition: &str, sop: &str) -> Response {
    let mut res = bytes.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pdf"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{disposition}; filename=\"{}\"",
        filename(sop, "pdf")
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    // Shown on its own, a PDF may not load anything or run script.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; object-src 'none'; sandbox"),
    );
    res
}

async fn read(pipeline: &Pipeline, user: &AuthUser, id: &str, sop: &str) -> ApiResult<ReadReport> {
    Ok(pipeline
        .read_report(&user.actor(), parse_id(id)?, sop, &ReportLimits::default())
        .await?)
}

/// `GET /api/v1/studies/{id}/reports/{sop}/view`: a Structured Report as
/// an HTML page (`text/html; charset=utf-8`, its own strict CSP), an
/// Encapsulated PDF as its PDF (`application/pdf`, inline). Owner or admin
/// only; audited.
pub async fn view(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path((id, sop)): Path<(String, String)>,
) -> ApiResult<Response> {
    let read = read(&pipeline, &user, &id, &sop).await?;
    match read.content.map_err(|e| unreadable(&e))? {
        ReportContent::Structured(doc) => {
            let mut res = report_render::html(&doc).into_response();
            let h = res.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(report_render::REPORT_CSP),
            );
            Ok(res)
        }
        ReportContent::Pdf(bytes) => Ok(pdf_response(bytes, "inline", &sop)),
        _ => Err(unreadable(&ReportError::NotStructuredReport {
            reason: "a report of a kind this server does not show".into(),
        })),
    }
}

/// `GET /api/v1/studies/{id}/reports/{sop}/pdf`: the report as a PDF to
/// keep (attachment): an Encapsulated PDF's own document, a Structured
/// Report rendered. Owner or admin only; audited.
pub async fn pdf(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path((id, sop)): Path<(String, String)>,
) -> ApiResult<Response> {
    let read = read(&pipeline, &user, &id, &sop).await?;
    let bytes = match read.content.map_err(|e| unreadable(&e))? {
        ReportContent::Structured(doc) => {
            tokio::task::spawn_blocking(move || report_render::pdf(&doc))
                .await
                .map_err(|e| ApiError::internal("rendering a report as PDF", &e))?
        }
        ReportContent::Pdf(bytes) => bytes,
        _ => {
            return Err(unreadable(&ReportError::NotStructuredReport {
                reason: "a report of a kind this server does not show".into(),
            }));
        }
    };
    Ok(pdf_response(bytes, "attachment", &sop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_keep_only_uid_characters() {
        assert_eq!(filename("1.2.3", "pdf"), "report-1.2.3.pdf");
        assert_eq!(filename("1.2\"; x=\r\n../", "pdf"), "report-1.2...pdf");
    }
}

//! Study sessions: open, inspect, complete (verify, validate, hand off to
//! the PACS sink), abort. Only the owner or an admin sees a session; for
//! anyone else it does not exist (404).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use relaypacs_core::{
    Actor, DicomSummary, FileState, NewSession, Pipeline, SessionId, SessionRecord, SessionState,
    Verification,
};
use serde::{Deserialize, Serialize};

use super::{AuthUser, Path};
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::routes::tus::refusal;
use crate::upload_id::UploadId;

/// Request to open a study session.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateStudy {
    /// Allow files of several studies in one session.
    allow_multiple_studies: bool,
}

/// One file as the API shows it.
#[derive(Debug, Serialize)]
pub struct FileView {
    id: String,
    upload_url: String,
    name: String,
    size: u64,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dicom: Option<DicomSummary>,
    /// What validation accepted but a reader should know (also in
    /// `dicom.warnings`); empty when there is nothing to say.
    warnings: Vec<String>,
    /// How the PACS was confirmed to hold this instance (`content` or
    /// `presence-only`); `null` until it is.
    verification: Option<Verification>,
}

/// A study session as the API shows it.
#[derive(Debug, Serialize)]
pub struct StudyView {
    id: String,
    owner: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: time::OffsetDateTime,
    allow_multiple_studies: bool,
    study_instance_uid: Option<String>,
    state: SessionState,
    delivery: DeliveryView,
    /// How many files the study has.
    file_count: u64,
    /// The files of this view: all of them, or (`GET
    /// /api/v1/studies/{id}`) one page of them, in file id order.
    files: Vec<FileView>,
    /// Where the next page of files starts (`?files_cursor=`), if more follow.
    files_next: Option<String>,
    limits: relaypacs_core::Limits,
}

/// Where the study is on its way to the PACS.
#[derive(Debug, Serialize)]
pub struct DeliveryView {
    attempts: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    next_attempt_at: Option<time::OffsetDateTime>,
    last_error: Option<String>,
    /// Instances the PACS was confirmed (by query) to hold.
    confirmed_instances: usize,
    /// Of those, the ones whose content could not be compared (the PACS
    /// reports the SOP Instance UID, nothing more).
    confirmed_presence_only: usize,
    /// How delivery was verified: once delivered, as the state says; before,
    /// the weakest verification of the instances confirmed so far.
    verified: Option<Verification>,
    reports: usize,
}

/// How a study's delivery was verified: the delivered state's, or the
/// weakest of the instances confirmed so far (`None` when none is).
pub(crate) fn verified_of(rec: &SessionRecord) -> Option<Verification> {
    match &rec.state {
        SessionState::Delivered { verified, .. } => Some(*verified),
        _ => rec.delivery.confirmed.values().min().copied(),
    }
}

/// How many confirmed instances were verified by presence only.
pub(crate) fn presence_only(rec: &SessionRecord) -> usize {
    rec.delivery
        .confirmed
        .values()
        .filter(|v| **v == Verification::PresenceOnly)
        .count()
}

async fn view(pipeline: &Pipeline, actor: &Actor, rec: SessionRecord) -> ApiResult<StudyView> {
    let offsets = pipeline.file_offsets(actor, rec.id).await?;
    let count = rec.files.len() as u64;
    Ok(build_view(rec, &offsets, count, None))
}

/// The view of `rec` with the files it carries.
fn build_view(
    rec: SessionRecord,
    offsets: &std::collections::BTreeMap<relaypacs_core::FileId, u64>,
    file_count: u64,
    files_next: Option<String>,
) -> StudyView {
    let mut files = Vec::with_capacity(rec.files.len());
    for f in rec.files.values() {
        let (offset, st, dicom) = match &f.state {
            FileState::Valid { dicom } => (f.size, "valid", Some(dicom.clone())),
            // A file added since the record was read has no offset yet.
            _ => (offsets.get(&f.id).copied().unwrap_or(0), "uploading", None),
        };
        let warnings = dicom
            .as_ref()
            .map(|d| d.warnings.clone())
            .unwrap_or_default();
        let verification = dicom.as_ref().and_then(|d| {
            rec.delivery
                .confirmed
                .get(d.sop_instance_uid.as_str())
                .copied()
        });
        files.push(FileView {
            id: f.id.to_string(),
            upload_url: format!("/files/{}", UploadId::new(rec.id, f.id)),
            name: f.name.clone(),
            size: f.size,
            offset,
            sha256: f.sha256.map(|d| d.to_hex()),
            state: st,
            dicom,
            warnings,
            verification,
        });
    }
    let ttl =
        time::Duration::seconds(i64::try_from(rec.limits.session_ttl_secs).unwrap_or(i64::MAX));
    StudyView {
        id: rec.id.to_string(),
        owner: rec.owner.clone(),
        created_at: rec.created_at,
        updated_at: rec.updated_at,
        expires_at: rec.updated_at.saturating_add(ttl),
        allow_multiple_studies: rec.allow_multiple_studies,
        study_instance_uid: rec
            .study_instance_uid
            .as_ref()
            .map(|u| u.as_str().to_string()),
        state: rec.state.clone(),
        delivery: DeliveryView {
            attempts: rec.delivery.attempts,
            next_attempt_at: rec.delivery.next_attempt_at,
            last_error: rec.delivery.last_error.clone(),
            confirmed_instances: rec.delivery.confirmed.len(),
            confirmed_presence_only: presence_only(&rec),
            verified: verified_of(&rec),
            reports: rec.delivery.reports.len(),
        },
        file_count,
        files,
        files_next,
        limits: rec.limits.clone(),
    }
}

/// `?files_limit=&files_cursor=` of a study view.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesQuery {
    /// Files wanted (default 100, at most 1000).
    pub files_limit: Option<u32>,
    /// The `files_next` of the previous page.
    pub files_cursor: Option<String>,
}

pub(crate) fn parse_id(id: &str) -> ApiResult<SessionId> {
    SessionId::parse(id).map_err(|_| ApiError::not_found("study session"))
}

/// `POST /api/v1/studies`.
pub async fn create(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, axum::Json<StudyView>)> {
    let req: CreateStudy = if body.iter().all(u8::is_ascii_whitespace) {
        CreateStudy::default()
    } else {
        let bad = |e: String| ApiError::bad_request("RELAY_BAD_JSON", e);
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        if !v.is_object() {
            return Err(bad("the body must be a JSON object".into()));
        }
        serde_json::from_value(v).map_err(|e| bad(e.to_string()))?
    };
    let actor = user.actor();
    let rec = pipeline
        .create_session(
            &actor,
            NewSession {
                allow_multiple_studies: req.allow_multiple_studies,
                request_scoped: false,
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(view(&pipeline, &actor, rec).await?),
    ))
}

/// `GET /api/v1/studies`: the caller's sessions (an admin sees all).
pub async fn list(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    super::Query(q): super::Query<super::PageQuery>,
) -> ApiResult<axum::Json<super::PageOut<StudyView>>> {
    let actor = user.actor();
    let after = match &q.cursor {
        Some(c) => Some(relaypacs_core::pipeline::PageCursor::parse(c)?),
        None => None,
    };
    let page = pipeline
        .list_sessions_page(
            &actor,
            relaypacs_core::pipeline::PageRequest {
                limit: q.limit(),
                after,
            },
        )
        .await?;
    let mut out = Vec::new();
    for rec in page.items {
        match view(&pipeline, &actor, rec).await {
            Ok(v) => out.push(v),
            // Removed (aborted, expired) since the list was read.
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    Ok(axum::Json(super::PageOut {
        items: out,
        next: page.next.map(|c| c.to_string()),
    }))
}

/// `GET /api/v1/studies/{id}` (audited as data access).
pub async fn show(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path(id): Path<String>,
    super::Query(q): super::Query<FilesQuery>,
) -> ApiResult<axum::Json<StudyView>> {
    let actor = user.actor();
    let limit = match q.files_limit {
        None | Some(0) => super::DEFAULT_PAGE,
        Some(n) => n.min(super::MAX_PAGE),
    };
    let after = match &q.files_cursor {
        Some(c) => Some(relaypacs_core::FileId::parse(c).map_err(|_| {
            ApiError::bad_request("RELAY_BAD_QUERY", "files_cursor is not a file id")
        })?),
        None => None,
    };
    let page = pipeline
        .session_page(&actor, parse_id(&id)?, after, limit as usize)
        .await?;
    Ok(axum::Json(build_view(
        page.session,
        &page.offsets,
        page.file_count,
        page.next.map(|f| f.to_string()),
    )))
}

/// `POST /api/v1/studies/{id}/complete`: verify and validate any fully
/// uploaded file not yet validated, then put the study in the outbox
/// (202: the gateway holds it durably; delivery follows, and the uploader
/// is notified once the PACS is confirmed to hold every instance).
///
/// A file still uploading answers 409 `RELAY_UPLOAD_INCOMPLETE`; a file
/// refused now answers as its refusal (409 or 422) and leaves the study,
/// which stays open; a study with no file answers 422
/// `RELAY_SESSION_EMPTY` and is ended (a later GET answers 404).
pub async fn complete(
    State(pipeline): State<Pipeline>,
    State(metrics): State<Arc<Metrics>>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, axum::Json<StudyView>)> {
    let sid = parse_id(&id)?;
    let actor = user.actor();
    let rec = pipeline.session(&actor, sid).await?;
    for f in rec.files.values() {
        if f.state == FileState::Uploading {
            let s = pipeline.file_status(&actor, sid, f.id).await?;
            if s.offset != f.size {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "RELAY_UPLOAD_INCOMPLETE",
                    format!("file {} has {} of {} bytes", f.id, s.offset, f.size),
                ));
            }
            if let Err(e) = pipeline.complete_file(&actor, sid, f.id).await {
                // A file refused now has left the study (with its bytes);
                // the study stays open and the caller learns why.
                if matches!(e, relaypacs_core::Error::FileRefused { .. }) {
                    metrics.files_refused.inc();
                }
                return Err(refusal(e));
            }
        }
    }
    // With no file left (every one refused, or none sent) this answers
    // 422 RELAY_SESSION_EMPTY and the pipeline ends the session.
    let rec = pipeline.complete_session(&actor, sid).await?;
    metrics.forward("queued");
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(view(&pipeline, &actor, rec).await?),
    ))
}

/// `DELETE /api/v1/studies/{id}`: abort and remove the session.
pub async fn abort(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let sid = parse_id(&id)?;
    pipeline.abort_session(&user.actor(), sid).await?;
    Ok(StatusCode::NO_CONTENT)
}

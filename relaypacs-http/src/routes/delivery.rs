//! Delivery: the admin's outbox and dead letters (with replay), and the
//! uploader's reports.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use relaypacs_core::{Pipeline, ReportKind, SessionRecord, SessionState, Verification};
use serde::Serialize;

use super::AuthUser;
use super::studies::{parse_id, presence_only, verified_of};
use crate::auth::Role;
use crate::error::ApiResult;

/// One outbox or dead-letter entry.
#[derive(Debug, Serialize)]
pub struct EntryView {
    id: String,
    owner: String,
    study_instance_uid: Option<String>,
    instances: usize,
    state: SessionState,
    #[serde(with = "time::serde::rfc3339::option")]
    queued_at: Option<time::OffsetDateTime>,
    attempts: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    next_attempt_at: Option<time::OffsetDateTime>,
    last_error: Option<String>,
    confirmed_instances: usize,
    /// Confirmed instances whose content could not be compared.
    confirmed_presence_only: usize,
    /// `content` or `presence-only` (see the study view's `delivery.verified`).
    verified: Option<Verification>,
    replays: u32,
}

fn entry(r: SessionRecord) -> EntryView {
    let verified = verified_of(&r);
    let confirmed_presence_only = presence_only(&r);
    EntryView {
        verified,
        confirmed_presence_only,
        id: r.id.to_string(),
        owner: r.owner,
        study_instance_uid: r.study_instance_uid.map(|u| u.to_string()),
        instances: r.files.len(),
        state: r.state,
        queued_at: r.delivery.queued_at,
        attempts: r.delivery.attempts,
        next_attempt_at: r.delivery.next_attempt_at,
        last_error: r.delivery.last_error,
        confirmed_instances: r.delivery.confirmed.len(),
        replays: r.delivery.replays,
    }
}

/// Admins only; a refusal is audited (see [`super::forbidden`]).
async fn admin_only(pipeline: &Pipeline, user: &AuthUser, route: &str) -> ApiResult<()> {
    if user.role == Role::Admin {
        Ok(())
    } else {
        Err(super::forbidden(pipeline, user, route, "the outbox is for administrators").await)
    }
}

/// `GET /api/v1/admin/outbox`: entries waiting for (re)delivery.
pub async fn outbox(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    super::Query(q): super::Query<super::PageQuery>,
) -> ApiResult<axum::Json<super::PageOut<EntryView>>> {
    admin_only(&pipeline, &user, "GET /api/v1/admin/outbox").await?;
    let list = pipeline.outbox_entries(&user.actor(), false).await?;
    let list = list.into_iter().map(entry).collect();
    Ok(axum::Json(super::page_by_key(list, |e| e.id.clone(), &q)?))
}

/// `GET /api/v1/admin/dead-letters`: deliveries given up, with the reason.
pub async fn dead_letters(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    super::Query(q): super::Query<super::PageQuery>,
) -> ApiResult<axum::Json<super::PageOut<EntryView>>> {
    admin_only(&pipeline, &user, "GET /api/v1/admin/dead-letters").await?;
    let list = pipeline.outbox_entries(&user.actor(), true).await?;
    let list = list.into_iter().map(entry).collect();
    Ok(axum::Json(super::page_by_key(list, |e| e.id.clone(), &q)?))
}

/// `POST /api/v1/admin/dead-letters/{id}/replay`: re-check every file's
/// SHA-256 and put the entry back in the outbox (202).
pub async fn replay(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, axum::Json<EntryView>)> {
    admin_only(
        &pipeline,
        &user,
        "POST /api/v1/admin/dead-letters/{id}/replay",
    )
    .await?;
    let rec = pipeline.replay(&user.actor(), parse_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(entry(rec))))
}

/// A report of a delivered study.
#[derive(Debug, Serialize)]
pub struct ReportView {
    sop_instance_uid: String,
    series_instance_uid: String,
    sop_class_uid: String,
    kind: ReportKind,
    url: String,
}

/// `GET /api/v1/studies/{id}/reports`: the reports found so far.
pub async fn reports(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Vec<ReportView>>> {
    let sid = parse_id(&id)?;
    let rec = pipeline.session(&user.actor(), sid).await?;
    Ok(axum::Json(
        rec.delivery
            .reports
            .iter()
            .map(|r| ReportView {
                sop_instance_uid: r.sop_instance_uid.to_string(),
                series_instance_uid: r.series_instance_uid.to_string(),
                sop_class_uid: r.sop_class_uid.to_string(),
                kind: r.kind,
                url: format!("/api/v1/studies/{sid}/reports/{}", r.sop_instance_uid),
            })
            .collect(),
    ))
}

/// `GET /api/v1/studies/{id}/reports/{sop}`: the report as a Part-10 file
/// (`application/dicom`), streamed from the PACS (WADO-RS). Owner or admin
/// only; audited.
pub async fn report(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    Path((id, sop)): Path<(String, String)>,
) -> ApiResult<Response> {
    let sid = parse_id(&id)?;
    let (_, stream) = pipeline.fetch_report(&user.actor(), sid, &sop).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/dicom".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{sop}.dcm\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

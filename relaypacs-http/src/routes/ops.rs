//! Health, readiness, metrics, the OpenAPI document, audit review, and
//! the JSON answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, Pipeline};

use super::AuthUser;
use crate::auth::Role;
use crate::disk::Watermark;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The OpenAPI document (kept in step with the router by a test).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: the data volume has room and the stores answer.
pub async fn readyz(
    State(watermark): State<Watermark>,
    State(pipeline): State<Pipeline>,
) -> ApiResult<Response> {
    match watermark.admit(0) {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "RELAY_STORAGE_FULL",
                "free space below the watermark",
            ));
        }
        Err(e) => return Err(ApiError::internal("readyz disk", &e)),
    }
    pipeline.check_ready().await?;
    Ok(axum::Json(serde_json::json!({ "status": "ready" })).into_response())
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut r = state.metrics().render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    let mut r = OPENAPI.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `GET /api/v1/audit` (admin): the audit trail; reading it is audited.
pub async fn audit(
    State(state): State<AppState>,
    user: AuthUser,
    super::Query(q): super::Query<super::PageQuery>,
) -> ApiResult<axum::Json<super::PageOut<AuditEvent>>> {
    if user.role != Role::Admin {
        return Err(super::forbidden(
            state.pipeline(),
            &user,
            "GET /api/v1/audit",
            "only admins read the audit trail",
        )
        .await);
    }
    state
        .audit_event(AppState::event(
            &user.id,
            &user.address,
            AuditAction::AuditLogUsed,
            AuditOutcome::Success,
        ))
        .await?;
    // The trail is append-only: a record's position is a stable key.
    let events: Vec<(usize, AuditEvent)> = state
        .audit()
        .events()
        .await?
        .into_iter()
        .enumerate()
        .collect();
    let page = super::page_by_key(events, |(i, _)| format!("{i:020}"), &q)?;
    Ok(axum::Json(super::PageOut {
        items: page.items.into_iter().map(|(_, e)| e).collect(),
        next: page.next,
    }))
}

/// Unknown route.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "RELAY_NOT_FOUND", "no such route")
}

/// Known route, wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "RELAY_METHOD_NOT_ALLOWED",
        "method not allowed on this route",
    )
}

//! Account administration: disable, enable, reset the second factor
//! (creating and listing users are in [`super::auth`]). Administrators
//! only; a refusal is audited as a Security Alert, every change as a User
//! Changed record.

use axum::extract::State;
use axum::http::StatusCode;
use relaypacs_core::{AuditAction, AuditOutcome};
use time::OffsetDateTime;

use super::auth::UserView;
use super::{AuthUser, Path};
use crate::auth::{Role, UserRecord};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Longest user id accepted in a path.
const MAX_ID: usize = 128;

/// The target account, after the caller is checked to be an admin
/// (`route`: the method and route template, for the audit).
async fn target(state: &AppState, user: &AuthUser, route: &str, id: &str) -> ApiResult<UserRecord> {
    if user.role != Role::Admin {
        return Err(
            super::forbidden(state.pipeline(), user, route, "only admins manage users").await,
        );
    }
    if id.is_empty() || id.len() > MAX_ID {
        return Err(ApiError::bad_request("RELAY_BAD_PATH", "not a user id"));
    }
    state
        .users()
        .by_id(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))
}

async fn audited(state: &AppState, user: &AuthUser, detail: String) -> ApiResult<()> {
    let mut ev = AppState::event(
        &user.id,
        &user.address,
        AuditAction::UserChanged,
        AuditOutcome::Success,
    );
    ev.detail = detail;
    state.audit_event(ev).await?;
    Ok(())
}

async fn view(state: &AppState, id: &str) -> ApiResult<axum::Json<UserView>> {
    let u = state
        .users()
        .by_id(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(axum::Json(UserView::from(&u)))
}

/// `POST /api/v1/users/{id}/disable`: the account can no longer log in;
/// its access tokens stop working and every refresh family is revoked.
/// An admin cannot disable their own account (409).
pub async fn disable(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<UserView>> {
    let t = target(&state, &user, "POST /api/v1/users/{id}/disable", &id).await?;
    if t.id == user.id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_SELF_DISABLE",
            "an administrator cannot disable their own account",
        ));
    }
    let changed = state
        .users()
        .set_disabled(&t.id, true, OffsetDateTime::now_utc())
        .await?;
    // Also when it was disabled already: nothing of it may stay usable.
    state.tokens().revoke_user(&t.id).await?;
    if changed {
        audited(
            &state,
            &user,
            format!("user {} disabled; its logins revoked", t.id),
        )
        .await?;
    }
    view(&state, &t.id).await
}

/// `POST /api/v1/users/{id}/enable`: the account may log in again (its
/// revoked logins stay revoked).
pub async fn enable(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<UserView>> {
    let t = target(&state, &user, "POST /api/v1/users/{id}/enable", &id).await?;
    if state
        .users()
        .set_disabled(&t.id, false, OffsetDateTime::now_utc())
        .await?
    {
        audited(&state, &user, format!("user {} enabled", t.id)).await?;
    }
    view(&state, &t.id).await
}

/// `POST /api/v1/users/{id}/reset-totp`: remove the account's second
/// factor (a lost phone): its logins are revoked, the next login needs no
/// code, and the user enrols again.
pub async fn reset_totp(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<UserView>> {
    let t = target(&state, &user, "POST /api/v1/users/{id}/reset-totp", &id).await?;
    if !state
        .users()
        .reset_totp(&t.id, OffsetDateTime::now_utc())
        .await?
    {
        return Err(ApiError::not_found("user"));
    }
    state.tokens().revoke_user(&t.id).await?;
    audited(
        &state,
        &user,
        format!("second factor of user {} reset; its logins revoked", t.id),
    )
    .await?;
    view(&state, &t.id).await
}

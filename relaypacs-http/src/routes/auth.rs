//! Login, token refresh and logout, TOTP enrolment, user management.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use relaypacs_core::{AuditAction, AuditOutcome};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{AuthUser, ClientAddr, Json};
use crate::auth::{RefreshError, Role, UserRecord, UserStore, check_policy};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Login request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: String,
    #[serde(default)]
    totp: Option<String>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest").finish_non_exhaustive()
    }
}

/// Count an attempt from `address` against the per-address limit.
async fn throttle(state: &AppState, address: &str) -> ApiResult<()> {
    state.limiter().attempt_from(address).await?.map_err(|r| {
        ApiError::too_many(
            "RELAY_RATE_LIMITED",
            "too many attempts from this address",
            r.0,
        )
    })
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized(
        "RELAY_INVALID_CREDENTIALS",
        "invalid username, password or code",
    )
}

/// `POST /api/v1/auth/login`.
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Json(req): Json<LoginRequest>,
) -> ApiResult<Response> {
    if req.username.is_empty() || req.username.len() > 128 || req.password.len() > 4096 {
        return Err(invalid_credentials());
    }
    throttle(&state, &addr).await?;
    let account = req.username.to_lowercase();
    if let Err(r) = state.limiter().check_account(&account).await? {
        return Err(ApiError::too_many(
            "RELAY_ACCOUNT_LOCKED",
            "too many failed attempts; try again later",
            r.0,
        ));
    }
    let user = state.users().by_name(&req.username).await?;
    let (ok, rehash) = state
        .hasher()
        .verify_bounded(
            req.password.clone(),
            user.as_ref().map(|u| u.password_hash.clone()),
        )
        .await
        .map_err(|b| ApiError::too_many("RELAY_LOGIN_BUSY", b.to_string(), b.retry_after_secs))?;
    let mut failure = None;
    let mut totp_step = None;
    match &user {
        Some(u) if ok && !u.disabled => {
            if let Some(sealed) = &u.totp {
                let step = req
                    .totp
                    .as_deref()
                    .and_then(|c| state.totp().check(sealed, &u.username, c, u.totp_last_step));
                // The step is taken in the store, atomically: of two logins
                // with one code, on any gateways, one gets it.
                let taken = match step {
                    Some(s) => state.users().accept_totp_step(&u.id, s).await?,
                    None => false,
                };
                match step {
                    Some(s) if taken => totp_step = Some(s),
                    _ => failure = Some("second factor missing, wrong or reused"),
                }
            }
        }
        Some(u) if u.disabled => failure = Some("account disabled"),
        _ => failure = Some("bad username or password"),
    }
    let who = user
        .as_ref()
        .map_or_else(|| "anonymous".to_string(), |u| u.id.clone());
    if let Some(reason) = failure {
        let locked = state.limiter().failed(&account).await?;
        let mut ev = AppState::event(&who, &addr, AuditAction::Login, AuditOutcome::MinorFailure);
        ev.detail = reason.to_string();
        state.audit_event(ev).await?;
        if locked {
            let mut ev = AppState::event(
                &who,
                &addr,
                AuditAction::SecurityAlert,
                AuditOutcome::MinorFailure,
            );
            ev.detail = "account locked after repeated login failures".into();
            state.audit_event(ev).await?;
        }
        return Err(invalid_credentials());
    }
    let Some(mut u) = user else {
        return Err(invalid_credentials());
    };
    state.limiter().succeeded(&account).await?;
    if let Some(s) = totp_step {
        // Already stored by accept_totp_step.
        u.totp_last_step = s;
    }
    if rehash {
        let new = state
            .hasher()
            .hash(req.password)
            .await
            .map_err(|e| ApiError::internal("rehash", &e))?;
        // Only the hash, and only if unchanged: a stale copy of the record
        // must not undo a change made meanwhile (disable, role, TOTP).
        if state
            .users()
            .rehash_password(&u.id, &u.password_hash, &new)
            .await?
        {
            u.password_hash = new;
        }
    }
    let pair = state.tokens().login(&u.id, u.role).await?;
    let ev = AppState::event(&u.id, &addr, AuditAction::Login, AuditOutcome::Success);
    state.audit_event(ev).await?;
    Ok(no_store(axum::Json(pair)))
}

/// Wraps a JSON answer with `Cache-Control: no-store` (it carries tokens).
fn no_store<T: IntoResponse>(body: T) -> Response {
    let mut r = body.into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}

/// Refresh request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    refresh_token: String,
}

impl std::fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshRequest")
    }
}

/// `POST /api/v1/auth/refresh`: rotate the refresh token.
pub async fn refresh(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    Json(req): Json<RefreshRequest>,
) -> ApiResult<Response> {
    throttle(&state, &addr).await?;
    let users: Vec<UserRecord> = state.users().list().await?;
    let role_of = |id: &str| {
        users
            .iter()
            .find(|u| u.id == id && !u.disabled)
            .map(|u| u.role)
    };
    match state.tokens().refresh(&req.refresh_token, role_of).await {
        Ok((pair, user)) => {
            let ev = AppState::event(
                &user,
                &addr,
                AuditAction::TokenRefreshed,
                AuditOutcome::Success,
            );
            state.audit_event(ev).await?;
            Ok(no_store(axum::Json(pair)))
        }
        Err(RefreshError::Reused { user }) => {
            let mut ev = AppState::event(
                &user,
                &addr,
                AuditAction::SecurityAlert,
                AuditOutcome::MinorFailure,
            );
            ev.detail = "refresh token reused: its login was revoked".into();
            state.audit_event(ev).await?;
            Err(ApiError::unauthorized(
                "RELAY_REFRESH_REUSED",
                "refresh token already used; log in again",
            ))
        }
        Err(RefreshError::Invalid) => {
            let mut ev = AppState::event(
                "anonymous",
                &addr,
                AuditAction::TokenRefreshed,
                AuditOutcome::MinorFailure,
            );
            ev.detail = "unknown, expired or revoked refresh token".into();
            state.audit_event(ev).await?;
            Err(ApiError::unauthorized(
                "RELAY_REFRESH_INVALID",
                "invalid or expired refresh token",
            ))
        }
    }
}

/// `POST /api/v1/auth/logout`: revoke this login (refresh family and its
/// access tokens).
pub async fn logout(State(state): State<AppState>, user: AuthUser) -> ApiResult<StatusCode> {
    state.tokens().revoke(&user.family).await?;
    let ev = AppState::event(
        &user.id,
        &user.address,
        AuditAction::Logout,
        AuditOutcome::Success,
    );
    state.audit_event(ev).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Public view of a user.
#[derive(Debug, Serialize)]
pub struct UserView {
    id: String,
    username: String,
    role: Role,
    totp: bool,
    disabled: bool,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> Self {
        Self {
            id: u.id.clone(),
            username: u.username.clone(),
            role: u.role,
            totp: u.totp.is_some(),
            disabled: u.disabled,
        }
    }
}

/// `GET /api/v1/auth/me`.
pub async fn me(
    State(users): State<Arc<dyn UserStore>>,
    user: AuthUser,
) -> ApiResult<axum::Json<UserView>> {
    let u = users
        .by_id(&user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    Ok(axum::Json(UserView::from(&u)))
}

/// Password change request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    current: String,
    new: String,
}

impl std::fmt::Debug for PasswordChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordChange")
    }
}

/// `POST /api/v1/auth/password`: change the caller's password; every
/// login of the account is revoked.
pub async fn change_password(
    State(state): State<AppState>,
    user: AuthUser,
    Json(req): Json<PasswordChange>,
) -> ApiResult<StatusCode> {
    let u = state
        .users()
        .by_id(&user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    let (ok, _) = state
        .hasher()
        .verify(req.current, Some(u.password_hash.clone()))
        .await;
    if !ok {
        state.limiter().failed(&u.username.to_lowercase()).await?;
        return Err(invalid_credentials());
    }
    check_policy(&req.new, &u.username)
        .map_err(|e| ApiError::bad_request("RELAY_WEAK_PASSWORD", e.to_string()))?;
    let new = state
        .hasher()
        .hash(req.new)
        .await
        .map_err(|e| ApiError::internal("hash", &e))?;
    // Conditional on the hash the current password was checked against:
    // a change made meanwhile (another gateway) is not overwritten.
    if !state
        .users()
        .change_password(&u.id, &u.password_hash, &new, OffsetDateTime::now_utc())
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_PASSWORD_CHANGED",
            "the password was changed meanwhile; log in again",
        ));
    }
    state.tokens().revoke_user(&user.id).await?;
    let mut ev = AppState::event(
        &user.id,
        &user.address,
        AuditAction::UserChanged,
        AuditOutcome::Success,
    );
    ev.detail = "password changed".into();
    state.audit_event(ev).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// TOTP enrolment answer (shown once).
#[derive(Debug, Serialize)]
pub struct TotpEnrolment {
    secret: String,
    otpauth_url: String,
}

/// `POST /api/v1/auth/totp`: start TOTP enrolment.
pub async fn totp_enroll(State(state): State<AppState>, user: AuthUser) -> ApiResult<Response> {
    let u = state
        .users()
        .by_id(&user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    if u.totp.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_TOTP_ENROLLED",
            "a second factor is already enrolled",
        ));
    }
    let (sealed, secret, url) = state
        .totp()
        .enroll(&u.username)
        .ok_or_else(|| ApiError::internal("totp enrol", &"secret generation failed"))?;
    // Only the pending secret, and only while none is enrolled.
    if !state.users().begin_totp(&u.id, &sealed).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_TOTP_ENROLLED",
            "a second factor is already enrolled",
        ));
    }
    Ok(no_store(axum::Json(TotpEnrolment {
        secret,
        otpauth_url: url,
    })))
}

/// TOTP confirmation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TotpConfirm {
    code: String,
}

/// `POST /api/v1/auth/totp/confirm`: activate the pending secret.
pub async fn totp_confirm(
    State(state): State<AppState>,
    user: AuthUser,
    Json(req): Json<TotpConfirm>,
) -> ApiResult<StatusCode> {
    let u = state
        .users()
        .by_id(&user.id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    let sealed = u.totp_pending.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_TOTP_NOT_PENDING",
            "start enrolment first",
        )
    })?;
    let step = state
        .totp()
        .check(&sealed, &u.username, &req.code, u.totp_last_step)
        .ok_or_else(|| ApiError::bad_request("RELAY_TOTP_INVALID", "wrong code"))?;
    // Taken atomically in the store: a code is usable once on any gateway.
    if !state.users().accept_totp_step(&u.id, step).await? {
        return Err(ApiError::bad_request("RELAY_TOTP_INVALID", "wrong code"));
    }
    // Only the secret, and only if still the pending one.
    if !state.users().confirm_totp(&u.id, &sealed).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_TOTP_NOT_PENDING",
            "the enrolment changed meanwhile; start it again",
        ));
    }
    let mut ev = AppState::event(
        &user.id,
        &user.address,
        AuditAction::UserChanged,
        AuditOutcome::Success,
    );
    ev.detail = "second factor enrolled".into();
    state.audit_event(ev).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// New user request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    username: String,
    password: String,
    role: Role,
}

impl std::fmt::Debug for NewUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUser")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Check a username: 1–64 characters of `[A-Za-z0-9._@-]`.
pub fn check_username(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
    {
        return Err(ApiError::bad_request(
            "RELAY_BAD_USERNAME",
            "usernames have 1-64 characters of letters, digits, '.', '_', '@' and '-'",
        ));
    }
    Ok(())
}

/// Build a user record (shared by the API and the CLI).
pub fn new_record(username: &str, role: Role, password_hash: String) -> UserRecord {
    let now = OffsetDateTime::now_utc();
    UserRecord {
        id: relaypacs_core::FileId::random().to_string(),
        username: username.to_string(),
        role,
        password_hash,
        totp: None,
        totp_pending: None,
        totp_last_step: 0,
        disabled: false,
        tokens_valid_after: now - time::Duration::seconds(1),
        created_at: now,
    }
}

/// `POST /api/v1/users` (admin): create a user.
pub async fn create_user(
    State(state): State<AppState>,
    user: AuthUser,
    Json(req): Json<NewUser>,
) -> ApiResult<(StatusCode, axum::Json<UserView>)> {
    if user.role != Role::Admin {
        return Err(super::forbidden(
            state.pipeline(),
            &user,
            "POST /api/v1/users",
            "only admins manage users",
        )
        .await);
    }
    throttle(&state, &user.address).await?;
    check_username(&req.username)?;
    check_policy(&req.password, &req.username)
        .map_err(|e| ApiError::bad_request("RELAY_WEAK_PASSWORD", e.to_string()))?;
    let hash = state
        .hasher()
        .hash(req.password)
        .await
        .map_err(|e| ApiError::internal("hash", &e))?;
    let rec = new_record(&req.username, req.role, hash);
    state.users().create(rec.clone()).await?;
    let mut ev = AppState::event(
        &user.id,
        &user.address,
        AuditAction::UserChanged,
        AuditOutcome::Success,
    );
    ev.detail = format!("user {} created with role {:?}", rec.id, rec.role);
    state.audit_event(ev).await?;
    Ok((StatusCode::CREATED, axum::Json(UserView::from(&rec))))
}

/// `GET /api/v1/users` (admin).
pub async fn list_users(
    State(users): State<Arc<dyn UserStore>>,
    State(pipeline): State<relaypacs_core::Pipeline>,
    user: AuthUser,
    super::Query(q): super::Query<super::PageQuery>,
) -> ApiResult<axum::Json<super::PageOut<UserView>>> {
    if user.role != Role::Admin {
        return Err(super::forbidden(
            &pipeline,
            &user,
            "GET /api/v1/users",
            "only admins manage users",
        )
        .await);
    }
    let list = users.list().await?.iter().map(UserView::from).collect();
    Ok(axum::Json(super::page_by_key(
        list,
        |u: &UserView| u.username.clone(),
        &q,
    )?))
}

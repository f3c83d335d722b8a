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
    /// Browser login: the refresh token goes into an `HttpOnly` cookie
    /// (see [`cookie`]) instead of the JSON body.
    #[serde(default)]
    cookie: bool,
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
    if req.cookie {
        return cookie::answer(&state, pair);
    }
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
    /// The JSON flow's token; absent in the cookie flow (`{}`).
    #[serde(default)]
    refresh_token: Option<String>,
}

impl std::fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshRequest")
    }
}

/// `POST /api/v1/auth/refresh`: rotate the refresh token. The JSON flow
/// takes `{"refresh_token": …}`; the cookie flow (`{}`) takes the
/// `HttpOnly` refresh cookie, a CSRF token header bound to it and a
/// same-origin request (see [`cookie`]), and answers like a cookie login.
pub async fn refresh(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    headers: axum::http::HeaderMap,
    Json(req): Json<RefreshRequest>,
) -> ApiResult<Response> {
    let (token, by_cookie) = match req.refresh_token {
        Some(t) => (t, false),
        None => match cookie::check(&state, &headers) {
            Ok(t) => (t, true),
            Err(e) => {
                // Counted against the address like a failed refresh; a
                // cross-site or tokenless attempt is a security alert.
                throttle(&state, &addr).await?;
                if e.status == StatusCode::FORBIDDEN {
                    let mut ev = AppState::event(
                        "anonymous",
                        &addr,
                        AuditAction::SecurityAlert,
                        AuditOutcome::MinorFailure,
                    );
                    ev.detail = format!("cookie refresh refused: {}", e.code);
                    state.audit_event(ev).await?;
                }
                return Ok(cookie::cleared(e));
            }
        },
    };
    match rotate(&state, &addr, &token).await {
        Ok(pair) if by_cookie => cookie::answer(&state, pair),
        Ok(pair) => Ok(no_store(axum::Json(pair))),
        Err(e) if by_cookie => Ok(cookie::cleared(e)),
        Err(e) => Err(e),
    }
}

/// The one rotation of both flows: rotate `token`, with reuse detection
/// (a rotated-out token revokes its family) and the audit records.
async fn rotate(state: &AppState, addr: &str, token: &str) -> ApiResult<crate::auth::TokenPair> {
    throttle(state, addr).await?;
    let users: Vec<UserRecord> = state.users().list().await?;
    let role_of = |id: &str| {
        users
            .iter()
            .find(|u| u.id == id && !u.disabled)
            .map(|u| u.role)
    };
    match state.tokens().refresh(token, role_of).await {
        Ok((pair, user)) => {
            let ev = AppState::event(
                &user,
                addr,
                AuditAction::TokenRefreshed,
                AuditOutcome::Success,
            );
            state.audit_event(ev).await?;
            Ok(pair)
        }
        Err(RefreshError::Reused { user }) => {
            let mut ev = AppState::event(
                &user,
                addr,
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
                addr,
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
/// access tokens); the refresh and CSRF cookies, if any, are cleared.
pub async fn logout(State(state): State<AppState>, user: AuthUser) -> ApiResult<Response> {
    state.tokens().revoke(&user.family).await?;
    let ev = AppState::event(
        &user.id,
        &user.address,
        AuditAction::Logout,
        AuditOutcome::Success,
    );
    state.audit_event(ev).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    cookie::clear(r.headers_mut());
    Ok(r)
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

/// The browser's refresh flow: the refresh token in an `HttpOnly` cookie
/// scoped to the refresh route, protected against cross-site requests.
///
/// - `relaypacs_refresh`: the refresh token; `HttpOnly; Secure;
///   SameSite=Strict; Path=/api/v1/auth/refresh` (scripts never see it).
/// - `relaypacs_csrf`: the CSRF token, readable by the page (`Secure;
///   SameSite=Strict; Path=/`) so that a reloaded page can still refresh;
///   also in the JSON answer as `csrf_token`.
///
/// The CSRF token is an HMAC-SHA256 (keyed by the server secret) of the
/// current refresh token, so it is bound to that token and thus to its
/// refresh family, changes at every rotation, and needs no storage. A
/// cookie refresh needs the `X-CSRF-Token` header equal to it
/// (double submit, checked against the server's own HMAC) and a
/// same-origin request (`Sec-Fetch-Site: same-origin`, and an `Origin`
/// whose host is the request's `Host`); otherwise 403. Rotation and
/// reuse detection are the JSON flow's ([`rotate`]).
pub mod cookie {
    use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use hmac::{Hmac, Mac};
    use secrecy::ExposeSecret;
    use serde::Serialize;
    use sha2::Sha256;

    use crate::auth::TokenPair;
    use crate::error::{ApiError, ApiResult};
    use crate::state::AppState;

    /// Name of the refresh cookie.
    pub const REFRESH: &str = "relaypacs_refresh";
    /// Name of the CSRF cookie (readable by the page).
    pub const CSRF: &str = "relaypacs_csrf";
    /// The header carrying the CSRF token.
    pub const CSRF_HEADER: &str = "x-csrf-token";
    /// Path of the refresh cookie: the refresh route only.
    pub const REFRESH_PATH: &str = "/api/v1/auth/refresh";
    /// Longest cookie header read.
    const MAX_COOKIE_HEADER: usize = 8192;

    /// A cookie login or refresh answer: the access token and the CSRF
    /// token (the refresh token is in the cookie only).
    #[derive(Debug, Serialize)]
    struct CookieTokens {
        access_token: String,
        token_type: &'static str,
        expires_in: u64,
        csrf_token: String,
    }

    fn forbidden(code: &'static str, message: &'static str) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }

    /// The CSRF token of `refresh` under `secret` (base64url, no padding).
    pub fn csrf_token(secret: &[u8], refresh: &str) -> String {
        use base64::Engine;
        // new_from_slice accepts keys of any length for HMAC.
        let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(b"relaypacs/csrf/v1\0");
        mac.update(refresh.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Equality in time independent of where the inputs differ.
    fn same(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }

    /// The value of cookie `name` in a `Cookie` header (pure; at most
    /// `max_len` bytes of header).
    pub fn cookie_value<'a>(cookie_header: &'a str, name: &str, max_len: usize) -> Option<&'a str> {
        if cookie_header.len() > max_len {
            return None;
        }
        cookie_header.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name && !v.is_empty()).then_some(v)
        })
    }

    /// Whether the request comes from this origin: `Sec-Fetch-Site`, when
    /// sent, is `same-origin`; `Origin`, when sent, names the `Host`; at
    /// least one of them is sent (every browser sends them on a POST).
    pub fn same_origin(headers: &HeaderMap) -> bool {
        same_origin_of(
            headers.get(header::HOST).map(HeaderValue::as_bytes),
            headers.get(header::ORIGIN).map(HeaderValue::as_bytes),
            headers.get("sec-fetch-site").map(HeaderValue::as_bytes),
        )
    }

    /// [`same_origin`] over the raw values of `Host`, `Origin` and
    /// `Sec-Fetch-Site` (pure; outside input).
    pub fn same_origin_of(host: Option<&[u8]>, origin: Option<&[u8]>, site: Option<&[u8]>) -> bool {
        let site = site.map(|v| v == b"same-origin");
        let origin = origin.map(|o| {
            let rest = o
                .strip_prefix(b"https://")
                .or_else(|| o.strip_prefix(b"http://"));
            matches!((rest, host), (Some(r), Some(h)) if r.eq_ignore_ascii_case(h))
        });
        match (site, origin) {
            (None, None) => false,
            (s, o) => s.unwrap_or(true) && o.unwrap_or(true),
        }
    }

    fn secret(state: &AppState) -> ApiResult<Vec<u8>> {
        let s = state
            .config()
            .resolve_secret()
            .map_err(|e| ApiError::internal("read the server secret", &e))?;
        Ok(s.expose_secret().as_bytes().to_vec())
    }

    /// Check a cookie refresh: same origin, the refresh cookie, and the
    /// CSRF header bound to it. Returns the refresh token.
    ///
    /// # Errors
    /// 401 `RELAY_REFRESH_INVALID` (no cookie and no `refresh_token`),
    /// 403 `RELAY_CROSS_ORIGIN`, 403 `RELAY_CSRF`.
    pub fn check(state: &AppState, headers: &HeaderMap) -> ApiResult<String> {
        let token = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| cookie_value(v, REFRESH, MAX_COOKIE_HEADER))
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "RELAY_REFRESH_INVALID",
                    "send refresh_token in the body, or the refresh cookie of a browser login",
                )
            })?;
        if !same_origin(headers) {
            return Err(forbidden(
                "RELAY_CROSS_ORIGIN",
                "a cookie refresh must come from this site's own pages",
            ));
        }
        let given = headers
            .get(CSRF_HEADER)
            .map(HeaderValue::as_bytes)
            .ok_or_else(|| {
                forbidden(
                    "RELAY_CSRF",
                    "a cookie refresh needs the X-CSRF-Token header",
                )
            })?;
        let want = csrf_token(&secret(state)?, &token);
        if want.is_empty() || !same(given, want.as_bytes()) {
            return Err(forbidden(
                "RELAY_CSRF",
                "the X-CSRF-Token header does not match the refresh cookie",
            ));
        }
        Ok(token)
    }

    fn set(headers: &mut HeaderMap, value: String) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.append(header::SET_COOKIE, v);
        }
    }

    /// Clear both cookies.
    pub fn clear(headers: &mut HeaderMap) {
        set(
            headers,
            format!(
                "{REFRESH}=; HttpOnly; Secure; SameSite=Strict; Path={REFRESH_PATH}; Max-Age=0"
            ),
        );
        set(
            headers,
            format!("{CSRF}=; Secure; SameSite=Strict; Path=/; Max-Age=0"),
        );
    }

    /// The answer of a refused cookie refresh: `e`, with both cookies
    /// cleared.
    pub fn cleared(e: ApiError) -> Response {
        let mut r = e.into_response();
        clear(r.headers_mut());
        r
    }

    /// The cookie answer of a login or refresh: access and CSRF tokens in
    /// JSON, the refresh token and the CSRF token in cookies.
    pub fn answer(state: &AppState, pair: TokenPair) -> ApiResult<Response> {
        let csrf = csrf_token(&secret(state)?, &pair.refresh_token);
        let age = state.config().auth.refresh_absolute_secs;
        let mut r = axum::Json(CookieTokens {
            access_token: pair.access_token,
            token_type: pair.token_type,
            expires_in: pair.expires_in,
            csrf_token: csrf.clone(),
        })
        .into_response();
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        set(
            h,
            format!(
                "{REFRESH}={}; HttpOnly; Secure; SameSite=Strict; Path={REFRESH_PATH}; Max-Age={age}",
                pair.refresh_token
            ),
        );
        set(
            h,
            format!("{CSRF}={csrf}; Secure; SameSite=Strict; Path=/; Max-Age={age}"),
        );
        Ok(r)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cookie_values_and_origins() {
            let h = "a=1; relaypacs_refresh=rt_x; b=";
            assert_eq!(cookie_value(h, REFRESH, 100), Some("rt_x"));
            assert_eq!(cookie_value(h, "b", 100), None);
            assert_eq!(cookie_value(h, REFRESH, 5), None);
            let mk = |pairs: &[(&'static str, &'static str)]| {
                let mut m = HeaderMap::new();
                for (k, v) in pairs {
                    m.insert(*k, HeaderValue::from_static(v));
                }
                m
            };
            assert!(!same_origin(&mk(&[("host", "a:1")])));
            assert!(same_origin(&mk(&[
                ("host", "a:1"),
                ("origin", "http://a:1")
            ])));
            assert!(same_origin(&mk(&[("sec-fetch-site", "same-origin")])));
            assert!(!same_origin(&mk(&[
                ("host", "a:1"),
                ("origin", "http://b:1")
            ])));
            assert!(!same_origin(&mk(&[
                ("host", "a:1"),
                ("origin", "http://a:1"),
                ("sec-fetch-site", "cross-site")
            ])));
            assert!(!same_origin(&mk(&[("host", "a:1"), ("origin", "null")])));
            let t = csrf_token(b"k", "rt_1");
            assert_eq!(t, csrf_token(b"k", "rt_1"));
            assert_ne!(t, csrf_token(b"k", "rt_2"));
            assert_ne!(t, csrf_token(b"j", "rt_1"));
        }
    }
}

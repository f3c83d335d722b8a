//! HTTP routes: thin adapters from requests to the pipeline.

pub mod analytics;
pub mod auth;
pub mod delivery;
pub mod events;
pub mod ops;
pub mod reports;
pub mod stow;
pub mod studies;
pub mod tus;
pub mod users;
pub mod web;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use relaypacs_core::Actor;
use serde::de::DeserializeOwned;

use crate::auth::Role;
use crate::error::ApiError;
use crate::state::AppState;

/// The client's address, for audit records and throttling: the socket
/// peer, or what trusted proxies report (`http.trusted_proxies`, see
/// [`crate::client_addr::client_address`]).
#[derive(Debug, Clone)]
pub struct ClientAddr(pub String);

impl<S> FromRequestParts<S> for ClientAddr
where
    S: Send + Sync,
    std::sync::Arc<crate::Config>: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let config = <std::sync::Arc<crate::Config> as axum::extract::FromRef<S>>::from_ref(state);
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| {
                    crate::client_addr::client_address(
                        c.0.ip(),
                        &parts.headers,
                        &config.http.trusted_proxies,
                    )
                    .to_string()
                })
                .unwrap_or_else(|| "unknown".into()),
        ))
    }
}

/// An authenticated caller (Bearer access token in the Authorization header).
#[derive(Debug, Clone)]
pub struct AuthUser {
    /// User id.
    pub id: String,
    /// Login name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Refresh family of the token.
    pub family: String,
    /// Client address.
    pub address: String,
    /// The raw access token (for issuing stream tickets only; never logged).
    pub token: String,
}

impl AuthUser {
    /// The pipeline actor.
    pub fn actor(&self) -> Actor {
        Actor {
            user: self.id.clone(),
            admin: self.role == Role::Admin,
            address: Some(self.address.clone()),
        }
    }
}

/// Checks an access token and the account behind it. A refused token
/// (forged, expired, revoked, of a disabled or unknown account) is audited
/// as a User Authentication failure, aggregated (see [`deny_token`]).
pub async fn authenticate(
    state: &AppState,
    token: &str,
    address: String,
) -> Result<AuthUser, ApiError> {
    let bad = || {
        ApiError::unauthorized(
            "RELAY_UNAUTHENTICATED",
            "missing, invalid or expired access token",
        )
    };
    let Some(claims) = state.tokens().decode(token) else {
        deny_token(state, token, &address, "invalid, forged or expired token").await;
        return Err(bad());
    };
    // The account and the login's revocation in one read.
    let Some(user) = state
        .users()
        .by_id_in_live_family(&claims.sub, &claims.sid)
        .await
        .map_err(ApiError::from)?
    else {
        deny_token(
            state,
            token,
            &address,
            "token of a revoked login or an unknown account",
        )
        .await;
        return Err(bad());
    };
    if user.disabled || claims.iat < user.tokens_valid_after.unix_timestamp() {
        deny_token(state, token, &address, "token revoked or account disabled").await;
        return Err(bad());
    }
    Ok(AuthUser {
        id: user.id,
        username: user.username,
        role: user.role,
        family: claims.sid,
        address,
        token: token.to_string(),
    })
}

/// The subject a token claims (its payload's `sub`, signature not
/// checked): a pure parse of outside input, at most `max_len` bytes of
/// token and 128 of subject.
pub fn claimed_subject(token: &str, max_len: usize) -> Option<String> {
    use base64::Engine;
    if token.len() > max_len {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = v.get("sub")?.as_str()?;
    (!sub.is_empty() && sub.len() <= 128).then(|| sub.to_string())
}

/// Audit a refused access token (PS3.15 User Authentication, failure),
/// aggregated per actor, address and minute by the pipeline's
/// [`DenialAudit`](relaypacs_core::pipeline::DenialAudit). The actor is
/// the subject the token claims when that account exists (so forged
/// subjects cannot create actors), else `anonymous`; the object is the
/// client address. A failure to record is logged; the answer stays 401.
pub async fn deny_token(state: &AppState, token: &str, address: &str, why: &str) {
    let user = match claimed_subject(token, 8192) {
        Some(sub) => match state.users().by_id(&sub).await {
            Ok(Some(_)) => sub,
            _ => "anonymous".to_string(),
        },
        None => "anonymous".to_string(),
    };
    let mut ev = AppState::event(
        &user,
        address,
        relaypacs_core::AuditAction::Login,
        relaypacs_core::AuditOutcome::MinorFailure,
    );
    ev.detail = format!("bearer token refused: {why}");
    if let Err(e) = state
        .pipeline()
        .denials()
        .record(ev, "bearer_token", &format!("address {address}"))
        .await
    {
        tracing::error!(error = %e, "refused token not recorded in the audit trail");
    }
}

/// 403 for a caller who is not an administrator on an admin route,
/// audited as a Security Alert (actor; object: method and route template,
/// e.g. `GET /api/v1/users`), aggregated.
pub async fn forbidden(
    pipeline: &relaypacs_core::Pipeline,
    user: &AuthUser,
    route: &str,
    message: &'static str,
) -> ApiError {
    security_alert(
        pipeline,
        user,
        "admin_route",
        &format!("route {route}"),
        "RELAY_FORBIDDEN: not an administrator",
    )
    .await;
    ApiError::new(StatusCode::FORBIDDEN, "RELAY_FORBIDDEN", message)
}

/// Record a denied access of `user` to `object` as a Security Alert
/// (PS3.15 DCM 110113), aggregated by the pipeline's denial audit; a
/// failure to record is logged (the caller's answer stays what it is).
pub async fn security_alert(
    pipeline: &relaypacs_core::Pipeline,
    user: &AuthUser,
    attempted: &str,
    object: &str,
    detail: &str,
) {
    let mut ev = relaypacs_core::AuditEvent::new(
        &user.id,
        relaypacs_core::AuditAction::SecurityAlert,
        relaypacs_core::AuditOutcome::MinorFailure,
    );
    ev.address = Some(user.address.clone());
    ev.detail = detail.to_owned();
    if let Err(e) = pipeline.denials().record(ev, attempted, object).await {
        tracing::error!(error = %e, attempted, "denied access not recorded in the audit trail");
    }
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let address = ClientAddr::from_request_parts(parts, state).await?.0;
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "RELAY_UNAUTHENTICATED",
                "an Authorization: Bearer header is required",
            )
        })?;
        authenticate(state, token, address).await
    }
}

/// Items per page when the client names no `limit`.
pub const DEFAULT_PAGE: u32 = 100;
/// Most items per page of any listing (a larger `limit` is cut to it).
pub const MAX_PAGE: u32 = 1000;
/// Longest `cursor` accepted.
const MAX_CURSOR: usize = 512;

/// `?limit=&cursor=` of a listing.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Items wanted (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    pub limit: Option<u32>,
    /// The `next` of the previous page (opaque).
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The page size: the default for none or 0, at most [`MAX_PAGE`].
    pub fn limit(&self) -> u32 {
        match self.limit {
            None | Some(0) => DEFAULT_PAGE,
            Some(n) => n.min(MAX_PAGE),
        }
    }
}

/// One page of a listing: `{"items": [...], "next": "<cursor>" | null}`.
#[derive(Debug, serde::Serialize)]
pub struct PageOut<T> {
    /// The items, in the listing's stable order.
    pub items: Vec<T>,
    /// Where the next page starts; `null` on the last page.
    pub next: Option<String>,
}

fn bad_cursor() -> ApiError {
    ApiError::bad_request("RELAY_BAD_CURSOR", "the page cursor is not valid")
}

/// The cursor of a key (base64url, no padding): the inverse of
/// [`cursor_key`].
pub fn cursor_of(key: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

/// The key a handler-made cursor carries (pure; at most `max_len` bytes of
/// cursor).
pub fn cursor_key(cursor: &str, max_len: usize) -> Option<String> {
    use base64::Engine;
    if cursor.len() > max_len {
        return None;
    }
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    String::from_utf8(b).ok()
}

/// One page of `items` in the stable order of `key` (unique per item),
/// for listings the pipeline does not page itself: the items after the
/// cursor's key, at most [`PageQuery::limit`]; the cursor is the last
/// key, base64url-encoded.
///
/// # Errors
/// 400 `RELAY_BAD_CURSOR` for a cursor this server did not make.
pub fn page_by_key<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    q: &PageQuery,
) -> Result<PageOut<T>, ApiError> {
    let after = match &q.cursor {
        Some(c) => Some(cursor_key(c, MAX_CURSOR).ok_or_else(bad_cursor)?),
        None => None,
    };
    let mut keyed: Vec<(String, T)> = items
        .into_iter()
        .map(|t| (key(&t), t))
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let limit = q.limit() as usize;
    let more = keyed.len() > limit;
    keyed.truncate(limit);
    let next = if more {
        keyed.last().map(|(k, _)| cursor_of(k))
    } else {
        None
    };
    Ok(PageOut {
        items: keyed.into_iter().map(|(_, t)| t).collect(),
        next,
    })
}

/// Query-string extractor whose rejections are JSON errors (400).
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Self(v))
            .map_err(|r| ApiError::bad_request("RELAY_BAD_QUERY", r.body_text()))
    }
}

/// JSON body extractor whose rejections are JSON errors.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(r) => {
                let status = r.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "RELAY_BODY_TOO_LARGE",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "RELAY_UNSUPPORTED_MEDIA_TYPE",
                    _ => "RELAY_BAD_JSON",
                };
                let status = if status.is_server_error() {
                    StatusCode::BAD_REQUEST
                } else {
                    status
                };
                Err(ApiError::new(status, code, r.body_text()))
            }
        }
    }
}

/// Path extractor whose rejections are JSON errors.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Self(v))
            .map_err(|r| ApiError::bad_request("RELAY_BAD_PATH", r.body_text()))
    }
}

/// `m` with its request bodies limited to `limit` bytes: a route layer for
/// the small JSON routes (a larger body answers 413
/// `RELAY_BODY_TOO_LARGE` through the [`Json`] extractor). The upload
/// routes (tus, STOW-RS) stream their bodies and are bounded by their own
/// declared lengths instead.
fn small_body<S: Clone + Send + Sync + 'static>(
    m: axum::routing::MethodRouter<S>,
    limit: usize,
) -> axum::routing::MethodRouter<S> {
    m.layer(axum::extract::DefaultBodyLimit::max(limit))
}

/// The router with every route of the API.
pub fn router(state: AppState) -> axum::Router {
    use axum::routing::{get, post};
    let json = state.config().http.max_json_body;
    axum::Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/api/v1/auth/login", small_body(post(auth::login), json))
        .route(
            "/api/v1/auth/refresh",
            small_body(post(auth::refresh), json),
        )
        .route("/api/v1/auth/logout", small_body(post(auth::logout), json))
        .route("/api/v1/auth/me", get(auth::me))
        .route(
            "/api/v1/auth/password",
            small_body(post(auth::change_password), json),
        )
        .route(
            "/api/v1/auth/totp",
            small_body(post(auth::totp_enroll), json),
        )
        .route(
            "/api/v1/auth/totp/confirm",
            small_body(post(auth::totp_confirm), json),
        )
        .route(
            "/api/v1/users",
            small_body(post(auth::create_user), json).get(auth::list_users),
        )
        .route(
            "/api/v1/users/{id}/disable",
            small_body(post(users::disable), json),
        )
        .route(
            "/api/v1/users/{id}/enable",
            small_body(post(users::enable), json),
        )
        .route(
            "/api/v1/users/{id}/reset-totp",
            small_body(post(users::reset_totp), json),
        )
        .route(
            "/api/v1/studies",
            small_body(post(studies::create), json).get(studies::list),
        )
        .route(
            "/api/v1/studies/{id}",
            get(studies::show).delete(studies::abort),
        )
        .route(
            "/api/v1/studies/{id}/complete",
            small_body(post(studies::complete), json),
        )
        .route("/api/v1/studies/{id}/reports", get(delivery::reports))
        .route("/api/v1/studies/{id}/reports/{sop}", get(delivery::report))
        .route(
            "/api/v1/studies/{id}/reports/{sop}/view",
            get(reports::view),
        )
        .route("/api/v1/studies/{id}/reports/{sop}/pdf", get(reports::pdf))
        .route("/api/v1/admin/outbox", get(delivery::outbox))
        .route("/api/v1/admin/dead-letters", get(delivery::dead_letters))
        .route(
            "/api/v1/admin/dead-letters/{id}/replay",
            small_body(post(delivery::replay), json),
        )
        .route("/api/v1/audit", get(ops::audit))
        .route("/api/v1/events", get(events::stream))
        .route(
            "/api/v1/events/ticket",
            small_body(post(events::ticket), json),
        )
        .route("/api/v1/notifications", get(events::notifications))
        .route(
            "/api/v1/notifications/{id}/read",
            small_body(post(events::mark_read), json),
        )
        .route("/files", post(tus::create).options(tus::options))
        .route(
            "/files/{id}",
            axum::routing::head(tus::head)
                .patch(tus::patch)
                .delete(tus::terminate)
                .options(tus::options),
        )
        .route("/dicomweb/studies", post(stow::store))
        .route("/dicomweb/studies/{study}", post(stow::store_in_study))
        .merge(analytics::routes())
        // The web app: `/` and the embedded files only (GET/HEAD).
        .merge(web::routes())
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .with_state(state)
}

#[cfg(test)]
mod listing_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn claimed_subject_reads_sub_within_bounds() {
        use base64::Engine;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let tok = |p: &str| format!("{}.{}.sig", enc("{}"), enc(p));
        assert_eq!(
            claimed_subject(&tok(r#"{"sub":"ab12"}"#), 8192).as_deref(),
            Some("ab12")
        );
        for bad in [
            tok(r#"{"sub":""}"#),
            tok(r#"{"sub":7}"#),
            tok(&format!(r#"{{"sub":"{}"}}"#, "a".repeat(129))),
            "garbage".into(),
            "a.%%%.b".into(),
        ] {
            assert_eq!(claimed_subject(&bad, 8192), None, "{bad}");
        }
        assert_eq!(claimed_subject(&tok(r#"{"sub":"ab12"}"#), 10), None);
    }

    #[test]
    fn pages_walk_every_item_once_in_key_order() {
        let items: Vec<u32> = (0..7).rev().collect();
        let mut q = PageQuery {
            limit: Some(3),
            cursor: None,
        };
        let mut seen = Vec::new();
        loop {
            let p = page_by_key(items.clone(), |i| format!("{i:03}"), &q).unwrap();
            seen.extend(p.items);
            match p.next {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        q.cursor = Some("!".into());
        assert_eq!(
            page_by_key(items, |i| i.to_string(), &q).unwrap_err().code,
            "RELAY_BAD_CURSOR"
        );
        assert_eq!(PageQuery::default().limit(), DEFAULT_PAGE);
        let big = PageQuery {
            limit: Some(u32::MAX),
            cursor: None,
        };
        assert_eq!(big.limit(), MAX_PAGE);
        assert_eq!(cursor_key(&cursor_of("k 1"), 512).as_deref(), Some("k 1"));
    }
}

//! Live events over server-sent events, and notifications.
//!
//! A stream is opened with the `Authorization` header (fetch-based
//! clients) or with a single-use ticket valid for 30 s (browsers'
//! `EventSource`, which cannot set headers): never with a token in the URL.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::{AuthUser, ClientAddr, Path, authenticate, bearer};
use crate::auth::Tokens;
use crate::error::{ApiError, ApiResult};
use crate::notify::{Hub, Notification};
use crate::state::AppState;

/// Ticket answer.
#[derive(Debug, Serialize)]
pub struct Ticket {
    ticket: String,
    expires_in: u64,
}

/// `POST /api/v1/events/ticket`: a single-use ticket to open one stream.
pub async fn ticket(State(tokens): State<Arc<Tokens>>, user: AuthUser) -> ApiResult<Response> {
    let mut r = axum::Json(Ticket {
        ticket: tokens.ticket(&user.token).await?,
        expires_in: 30,
    })
    .into_response();
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Ok(r)
}

/// Query of the stream endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    ticket: Option<String>,
}

/// `GET /api/v1/events`: the caller's live events.
pub async fn stream(
    State(state): State<AppState>,
    ClientAddr(addr): ClientAddr,
    parts: Parts,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let q: StreamQuery = Query::<StreamQuery>::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .map_err(|_| {
            ApiError::bad_request("RELAY_BAD_QUERY", "the only query parameter is 'ticket'")
        })?;
    let user = match (bearer(&parts), q.ticket) {
        (Some(token), None) => authenticate(&state, token, addr).await?,
        (None, Some(t)) => {
            let token = state.tokens().redeem(&t).await?.ok_or_else(|| {
                ApiError::unauthorized("RELAY_BAD_TICKET", "unknown, used or expired ticket")
            })?;
            authenticate(&state, &token, addr).await?
        }
        _ => {
            return Err(ApiError::unauthorized(
                "RELAY_UNAUTHENTICATED",
                "authenticate with the Authorization header or a stream ticket",
            ));
        }
    };
    let slot = state
        .admission()
        .open_stream(&user.id, state.config().http.max_event_streams_per_user)
        .ok_or_else(|| {
            ApiError::too_many("RELAY_TOO_MANY_STREAMS", "too many open event streams", 5)
        })?;
    let mut rx = state.hub().subscribe(&user.id);
    let s = async_stream::stream! {
        let _slot = slot;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    let data = serde_json::to_string(&ev).unwrap_or_default();
                    yield Ok(SseEvent::default().event("message").data(data));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    yield Ok(SseEvent::default().event("lagged").data(n.to_string()));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    };
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `GET /api/v1/notifications`: the caller's notifications, oldest first,
/// one page (`limit`, `cursor`).
pub async fn notifications(
    State(hub): State<Hub>,
    user: AuthUser,
    super::Query(q): super::Query<super::PageQuery>,
) -> ApiResult<axum::Json<super::PageOut<Notification>>> {
    let list = hub.list(&user.id).await?;
    Ok(axum::Json(super::page_by_key(
        list,
        |n| {
            format!(
                "{:040}.{}",
                n.created_at.unix_timestamp_nanos().max(0),
                n.id
            )
        },
        &q,
    )?))
}

/// `POST /api/v1/notifications/{id}/read`: only the owner's (404 otherwise).
/// Another user's notification answers 404 like an unknown one, and is
/// audited as a Security Alert (actor; object: the notification),
/// aggregated like every denied access.
pub async fn mark_read(
    State(hub): State<Hub>,
    State(pipeline): State<relaypacs_core::Pipeline>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Notification>> {
    match hub.mark_read(&user.id, &id).await {
        Ok(n) => Ok(axum::Json(n)),
        Err(e @ relaypacs_core::Error::NotFound { .. }) => {
            if hub.held_by_another(&user.id, &id).await? {
                super::security_alert(
                    &pipeline,
                    &user,
                    "mark_read",
                    &format!("notification {id}"),
                    "RELAY_NOT_FOUND: another user's notification",
                )
                .await;
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

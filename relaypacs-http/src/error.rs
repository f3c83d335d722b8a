//! The one error type of the HTTP layer: every failure becomes
//! `{"error": {"code", "message"}}` with the right status, logged once here
//! (server faults) with the request's context.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relaypacs_core::{Error, ErrorKind, IntegrityError};
use serde::Serialize;

/// An error answer: status, stable code, message, and optional extra headers.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message (never patient data, never secrets).
    pub message: String,
    /// Seconds for `Retry-After`, when the client should come back later.
    pub retry_after: Option<u64>,
    /// Extra `WWW-Authenticate` challenge for 401s.
    pub www_authenticate: bool,
}

/// Result of handlers.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            www_authenticate: false,
        }
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404: the resource does not exist or is not the caller's.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "RELAY_NOT_FOUND",
            format!("{what} not found"),
        )
    }

    /// 401 with a challenge.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, code, message);
        e.www_authenticate = true;
        e
    }

    /// 429 with `Retry-After`.
    pub fn too_many(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retry_after = Some(retry_after.max(1));
        e
    }

    /// 500 for a fault of ours; the detail goes to the log, not the client.
    pub fn internal(context: &str, detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(context, error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "RELAY_INTERNAL",
            "internal error; see the server log",
        )
    }

    /// The JSON body alone (used by the fallback that rewrites non-JSON
    /// error responses).
    pub fn body_json(code: &str, message: &str) -> String {
        serde_json::to_string(&Body {
            error: Inner { code, message },
        })
        .unwrap_or_else(|_| {
            String::from("{\"error\":{\"code\":\"RELAY_INTERNAL\",\"message\":\"\"}}")
        })
    }
}

/// HTTP status for a core error kind. A file refused for its content
/// ([`Error::FileRefused`]) answers as its cause does: 422 for invalid
/// DICOM, another study or a whole-file digest mismatch, 409 for a
/// duplicate or conflicting SOP Instance UID.
pub fn status_of(e: &Error) -> StatusCode {
    let root = e.root();
    match e.kind() {
        ErrorKind::Invalid => match root {
            Error::Dicom(_) | Error::StudyMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            // Completing a session with no valid file (it is ended).
            Error::Invalid {
                code: "RELAY_SESSION_EMPTY",
                ..
            } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        },
        // A per-user cap (open sessions): retry once one of them ends.
        ErrorKind::LimitExceeded if matches!(root, Error::TooMany { .. }) => {
            StatusCode::TOO_MANY_REQUESTS
        }
        // A size limit of the payload.
        ErrorKind::LimitExceeded => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Integrity => match root {
            Error::Integrity(IntegrityError::ChunkLength { .. }) => StatusCode::BAD_REQUEST,
            Error::Integrity(IntegrityError::StoredChunkCorrupt { .. })
            | Error::Integrity(IntegrityError::StoredSize { .. }) => StatusCode::CONFLICT,
            Error::Integrity(IntegrityError::FileHash { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
            // tus checksum extension: 460 Checksum Mismatch.
            _ => StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
        },
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Busy => StatusCode::CONFLICT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Gone => StatusCode::GONE,
        ErrorKind::Auth => StatusCode::FORBIDDEN,
        ErrorKind::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Storage | ErrorKind::Audit => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Pacs => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = status_of(&e);
        if status.is_server_error() {
            // Logged once, here at the edge, with the error chain.
            tracing::error!(code = e.code(), error = %e, source = ?std::error::Error::source(&e), "request failed");
        }
        let message = match e.kind() {
            // Not-found hides whether the resource exists for someone else.
            ErrorKind::NotFound => "not found".to_string(),
            ErrorKind::Storage | ErrorKind::Audit => {
                "the gateway cannot store data right now; retry later".to_string()
            }
            _ => e.to_string(),
        };
        let mut out = ApiError::new(status, e.code(), message);
        if e.is_retryable()
            || status == StatusCode::SERVICE_UNAVAILABLE
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            out.retry_after = Some(5);
        }
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ApiError::body_json(self.code, &self.message);
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.www_authenticate {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"relaypacs\""),
            );
        }
        res
    }
}

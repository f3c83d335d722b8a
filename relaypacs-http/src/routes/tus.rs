//! tus 1.0.0 uploads: core protocol, creation, creation-with-upload,
//! termination, checksum (sha256, sha1) and expiration.
//!
//! An upload is one file of a study session; its id is an
//! [`UploadId`] (the session id followed by the file id, 64 hex digits,
//! 256 random bits).
//!
//! A PATCH with `Upload-Checksum` is verified whole and stored as one
//! chunk: on mismatch the answer is 460 and nothing is kept. A PATCH
//! without a checksum is stored in durable segments of
//! `http.patch_segment_size` bytes, so a dropped connection keeps every
//! complete segment and the next HEAD reports exactly those bytes. The
//! segmenting and the range reservation are the pipeline's
//! ([`Pipeline::put_range`]): a second PATCH of an upload being written
//! answers 409 `RELAY_UPLOAD_BUSY`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use relaypacs_core::{
    ByteStream, Error, FileState, IntegrityError, NewFile, Pipeline, RangeWrite, SessionId,
    Sha256Digest,
};
use sha1::Digest as _;

use super::{AuthUser, Path};
use crate::config::Config;
use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::notify::Event;
use crate::state::AppState;
use crate::tus_headers::{
    Checksum, MetadataLimits, check_resumable, checksum, header_u64, metadata,
};
use crate::upload_id::UploadId;

pub use crate::tus_headers::TUS_VERSION;
/// Extensions we implement.
pub const TUS_EXTENSIONS: &str = "creation,creation-with-upload,termination,checksum,expiration";

/// The upload a path names; anything but an upload id is not found.
fn parse_upload_id(id: &str) -> Result<UploadId, ApiError> {
    UploadId::parse(id).map_err(|_| ApiError::not_found("upload"))
}

fn expires(at: time::OffsetDateTime) -> HeaderValue {
    let t: SystemTime = at.into();
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap_or(HeaderValue::from_static("0"))
}

fn tus_response(status: StatusCode) -> Response {
    let mut r = status.into_response();
    r.headers_mut()
        .insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    r
}

/// `OPTIONS /files`: discovery (no authentication, as tus requires).
pub async fn options(State(config): State<Arc<Config>>) -> Response {
    let mut r = tus_response(StatusCode::NO_CONTENT);
    let h = r.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(TUS_EXTENSIONS));
    h.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static("sha256,sha1"),
    );
    h.insert(
        "tus-max-size",
        HeaderValue::from(config.http.max_upload_size),
    );
    r
}

fn user_permit(
    state: &AppState,
    user: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    let max = state.config().http.max_parallel_patches_per_user;
    state.admission().patch_permit(user, max).ok_or_else(|| {
        ApiError::too_many(
            "RELAY_TOO_MANY_PARALLEL_UPLOADS",
            "too many uploads in progress for this user",
            1,
        )
    })
}

const BODY_INTERRUPTED: &str = "RELAY_BODY_INTERRUPTED";

/// The request body as the pipeline's byte stream: a transport error is
/// `RELAY_BODY_INTERRUPTED`; with a SHA-1 (`Upload-Checksum: sha1`), the
/// stream yields a checksum error after the last byte when the digest
/// differs, so the pipeline stores nothing of the range (it reads each
/// range to the body's end before its last chunk is durable).
fn body_stream(body: Body, offset: u64, sha1: Option<[u8; 20]>) -> ByteStream {
    let mut data = body.into_data_stream();
    Box::pin(async_stream::stream! {
        let mut h = sha1::Sha1::new();
        while let Some(item) = data.next().await {
            match item {
                Ok(b) => {
                    if sha1.is_some() {
                        h.update(&b);
                    }
                    yield Ok(b);
                }
                Err(e) => {
                    yield Err(Error::Invalid {
                        code: BODY_INTERRUPTED,
                        message: format!("the request body was interrupted or too slow: {e}"),
                    });
                    return;
                }
            }
        }
        if let Some(expected) = sha1 {
            let actual: [u8; 20] = h.finalize().into();
            if actual != expected {
                yield Err(Error::Integrity(IntegrityError::ChunkChecksum {
                    offset,
                    algorithm: "sha1",
                    expected: hex::encode(expected),
                    actual: hex::encode(actual),
                }));
            }
        }
    })
}

fn map_write_error(metrics: &Metrics, e: Error) -> ApiError {
    if e.code() == BODY_INTERRUPTED {
        return ApiError::new(StatusCode::REQUEST_TIMEOUT, BODY_INTERRUPTED, e.to_string());
    }
    if matches!(e, Error::Busy { .. }) {
        return ApiError::new(
            StatusCode::CONFLICT,
            "RELAY_UPLOAD_BUSY",
            "another request is writing this upload; retry after it ends",
        );
    }
    // A PATCH's range is never empty, so the core's RELAY_BAD_RANGE means
    // a body past the declared Upload-Length (checked after the offset).
    if e.code() == "RELAY_BAD_RANGE" {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RELAY_UPLOAD_OVERFLOW",
            "the body would exceed Upload-Length",
        );
    }
    if matches!(
        e,
        Error::Integrity(IntegrityError::ChunkHash { .. } | IntegrityError::ChunkChecksum { .. })
    ) {
        metrics.chunk_verifications_failed.inc();
    }
    ApiError::from(e)
}

/// Write one PATCH body at `offset`; returns the new durable offset.
async fn write_body(
    state: &AppState,
    user: &AuthUser,
    id: UploadId,
    offset: u64,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<(u64, time::OffsetDateTime)> {
    let (sid, fid) = (id.session(), id.file());
    let length = header_u64(headers, "content-length")?.ok_or_else(|| {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "RELAY_LENGTH_REQUIRED",
            "PATCH needs Content-Length",
        )
    })?;
    let checksum = checksum(headers)?;
    let _permit = user_permit(state, &user.id)?;
    let actor = user.actor();
    if length == 0 {
        // An empty PATCH writes nothing; at the end of the upload it
        // completes the file (a client that sent every byte and lost the
        // answer of the last PATCH).
        let status = state.pipeline().file_status(&actor, sid, fid).await?;
        if offset != status.offset {
            return Err(offset_mismatch(offset, status.offset));
        }
        let valid = matches!(status.file.state, FileState::Valid { .. });
        let done = finish_if_complete(state, user, id, offset, status.file.size, valid).await?;
        return Ok((done, status.expires_at));
    }
    match state.watermark().admit(0) {
        Ok(Ok(free)) if free >= length => {}
        Ok(_) => {
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "RELAY_STORAGE_FULL",
                "the gateway is low on disk space",
            ));
        }
        Err(e) => return Err(ApiError::internal("disk space", &e)),
    }
    // A checksummed PATCH is verified whole and stored as one chunk; any
    // other is cut into durable segments. The pipeline reserves the whole
    // range: a concurrent PATCH of this upload is refused as busy.
    let segment_size = if checksum.is_some() {
        if length > state.config().http.max_checksummed_patch {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RELAY_PATCH_TOO_LARGE",
                format!(
                    "a checksummed PATCH may carry at most {} bytes",
                    state.config().http.max_checksummed_patch
                ),
            ));
        }
        length
    } else {
        state.config().http.patch_segment_size
    };
    // The session's state, the chunk ranges and sizes are the core's rules
    // (RELAY_SESSION_NOT_OPEN, RELAY_CHUNK_TOO_SMALL, …), and so is tus's
    // offset rule (`continues`: a PATCH continues exactly where the upload
    // is, checked under the range's reservation, before the body's fit), so
    // nothing is read here first.
    let (sha256, sha1) = match &checksum {
        Some(Checksum::Sha256(d)) => (Some(*d), None),
        Some(Checksum::Sha1(d)) => (None, Some(*d)),
        None => (None, None),
    };
    let range = RangeWrite {
        offset,
        length,
        segment_size,
        sha256,
        // tus: the PATCH continues the upload where it is; re-checked
        // under the range's reservation (two PATCHes racing from one
        // offset, on one gateway or two: the second gets 409).
        continues: true,
    };
    let mut durable = offset;
    let done = state
        .pipeline()
        .put_range(
            &actor,
            sid,
            fid,
            range,
            body_stream(body, offset, sha1),
            |end, size| {
                state.metrics().upload_bytes.inc_by(end - durable);
                durable = end;
                state.hub().publish(
                    &user.id,
                    Event::UploadProgress {
                        study: sid.to_string(),
                        upload: id,
                        offset: end,
                        length: size,
                    },
                );
            },
        )
        .await
        .map_err(|e| map_write_error(state.metrics(), e))?;
    // The range was written, so the file was uploading (not yet valid).
    let at = finish_if_complete(state, user, id, done.end, done.size, false).await?;
    Ok((at, done.expires_at))
}

/// tus's 409 for a PATCH that does not continue where the upload is.
fn offset_mismatch(offset: u64, stored: u64) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "RELAY_OFFSET_MISMATCH",
        format!("Upload-Offset {offset} does not match the upload's offset {stored}"),
    )
}

/// When every byte is in, verify and validate the file.
async fn finish_if_complete(
    state: &AppState,
    user: &AuthUser,
    id: UploadId,
    offset: u64,
    size: u64,
    already_valid: bool,
) -> ApiResult<u64> {
    if offset != size || already_valid {
        return Ok(offset);
    }
    let (sid, fid) = (id.session(), id.file());
    match state
        .pipeline()
        .complete_file(&user.actor(), sid, fid)
        .await
    {
        Ok(_) => {
            state.hub().publish(
                &user.id,
                Event::FileCompleted {
                    study: sid.to_string(),
                    upload: id,
                    ok: true,
                    code: None,
                },
            );
            Ok(offset)
        }
        Err(e) => {
            state.metrics().files_refused.inc();
            // Refused for its content: the pipeline removed the file with
            // its bytes, so the upload no longer exists (HEAD answers 404)
            // and no longer counts as unfinished; the study stays open for
            // its other files.
            state.hub().publish(
                &user.id,
                Event::FileCompleted {
                    study: sid.to_string(),
                    upload: id,
                    ok: false,
                    code: Some(e.code().to_string()),
                },
            );
            Err(refusal(e))
        }
    }
}

/// The answer to a file that failed completion. A refusal for content
/// answers as its cause (409 for a duplicate or conflicting SOP Instance
/// UID, 422 for invalid DICOM, another study or a whole-file digest
/// mismatch), and its message says the upload was removed.
pub(crate) fn refusal(e: Error) -> ApiError {
    let (removed, uid) = match &e {
        Error::FileRefused {
            sop_instance_uid, ..
        } => (
            true,
            sop_instance_uid.as_ref().map(|u| u.as_str().to_owned()),
        ),
        _ => (false, None),
    };
    let mut out = ApiError::from(e);
    if let Some(uid) = uid
        && !out.message.contains(&uid)
    {
        out.message = format!("SOP Instance UID {uid}: {}", out.message);
    }
    if removed {
        out.message
            .push_str("; the upload was refused and removed, the study stays open");
    }
    out
}

/// `POST /files`: create an upload (optionally with its first bytes).
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_resumable(&headers)?;
    if headers.contains_key("upload-defer-length") {
        return Err(ApiError::bad_request(
            "RELAY_DEFER_LENGTH",
            "Upload-Defer-Length is not supported; send Upload-Length",
        ));
    }
    let length = header_u64(&headers, "upload-length")?
        .ok_or_else(|| ApiError::bad_request("RELAY_BAD_HEADER", "Upload-Length is required"))?;
    if length > state.config().http.max_upload_size {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RELAY_UPLOAD_TOO_LARGE",
            format!(
                "Upload-Length exceeds Tus-Max-Size ({})",
                state.config().http.max_upload_size
            ),
        ));
    }
    let meta = metadata(
        &headers,
        &MetadataLimits::within_header_bytes(state.config().http.max_header_bytes),
    )?;
    let session = meta.session.ok_or_else(|| {
        ApiError::bad_request(
            "RELAY_MISSING_SESSION",
            "Upload-Metadata must carry 'session' (the study session id)",
        )
    })?;
    let sid = SessionId::parse(&session).map_err(|_| ApiError::not_found("study session"))?;
    let name = meta.filename.unwrap_or_else(|| "upload".into());
    if name.len() > 255 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "RELAY_BAD_METADATA",
            "filename must be at most 255 bytes without control characters",
        ));
    }
    let sha256 = match meta.sha256 {
        Some(s) => Some(Sha256Digest::from_hex(&s).map_err(|_| {
            ApiError::bad_request(
                "RELAY_BAD_METADATA",
                "sha256 must be 64 hex digits (or 32 raw bytes)",
            )
        })?),
        None => None,
    };
    match state.watermark().admit(length) {
        Ok(Ok(_)) => {}
        Ok(Err((free, min))) => {
            tracing::warn!(
                free,
                min,
                requested = length,
                "upload refused: free space below the watermark"
            );
            let mut ev = AppState::event(
                &user.id,
                &user.address,
                relaypacs_core::AuditAction::SecurityAlert,
                relaypacs_core::AuditOutcome::MinorFailure,
            );
            ev.detail = format!("upload refused: free disk space {free} below watermark {min}");
            state.audit_event(ev).await?;
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "RELAY_STORAGE_FULL",
                "the gateway is low on disk space; try later",
            ));
        }
        Err(e) => return Err(ApiError::internal("disk space", &e)),
    }
    let actor = user.actor();
    // The cap of unfinished uploads: the pipeline's capped creation counts
    // the user's uploads on every gateway, in the state database, and
    // takes the new one in the same step (a burst cannot pass it together).
    let max_open = u32::try_from(state.config().http.max_open_uploads_per_user).unwrap_or(u32::MAX);
    let file = state
        .pipeline()
        .add_file_capped(
            &actor,
            sid,
            NewFile {
                name,
                size: length,
                sha256,
            },
            max_open,
        )
        .await?;
    let id = UploadId::new(sid, file.id);
    state.metrics().uploads_created.inc();
    let with_body = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/offset+octet-stream")
        && header_u64(&headers, "content-length")?.unwrap_or(0) > 0;
    let offset = if with_body {
        write_body(&state, &user, id, 0, &headers, body).await?.0
    } else {
        0
    };
    let status = state.pipeline().file_status(&actor, sid, file.id).await?;
    let mut r = tus_response(StatusCode::CREATED);
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/files/{id}"))
            .map_err(|e| ApiError::internal("location", &e))?,
    );
    h.insert("upload-expires", expires(status.expires_at));
    if with_body {
        h.insert("upload-offset", HeaderValue::from(offset));
    }
    Ok(r)
}

/// `HEAD /files/{id}`: the durable offset.
pub async fn head(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_resumable(&headers)?;
    let id = parse_upload_id(&id)?;
    let s = pipeline
        .file_status(&user.actor(), id.session(), id.file())
        .await?;
    let mut r = tus_response(StatusCode::OK);
    let h = r.headers_mut();
    h.insert("upload-offset", HeaderValue::from(s.offset));
    h.insert("upload-length", HeaderValue::from(s.file.size));
    h.insert("upload-expires", expires(s.expires_at));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `PATCH /files/{id}`: append bytes at `Upload-Offset`.
pub async fn patch(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    check_resumable(&headers)?;
    if headers.get(header::CONTENT_TYPE).map(|v| v.as_bytes())
        != Some(b"application/offset+octet-stream")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "RELAY_UNSUPPORTED_MEDIA_TYPE",
            "PATCH needs Content-Type: application/offset+octet-stream",
        ));
    }
    let offset = header_u64(&headers, "upload-offset")?
        .ok_or_else(|| ApiError::bad_request("RELAY_BAD_HEADER", "Upload-Offset is required"))?;
    let id = parse_upload_id(&id)?;
    let (new_offset, expires_at) = write_body(&state, &user, id, offset, &headers, body).await?;
    let mut r = tus_response(StatusCode::NO_CONTENT);
    let h = r.headers_mut();
    h.insert("upload-offset", HeaderValue::from(new_offset));
    h.insert("upload-expires", expires(expires_at));
    Ok(r)
}

/// `DELETE /files/{id}`: termination.
pub async fn terminate(
    State(pipeline): State<Pipeline>,
    user: AuthUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    check_resumable(&headers)?;
    let id = parse_upload_id(&id)?;
    pipeline
        .remove_file(&user.actor(), id.session(), id.file())
        .await?;
    Ok(tus_response(StatusCode::NO_CONTENT))
}

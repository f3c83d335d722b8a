//! STOW-RS ingest (DICOM PS3.18 §10.5): `multipart/related;
//! type="application/dicom"`, parsed as a stream. Each part is spooled to
//! disk (bounded by the file-size limit, hashed on the way), then goes
//! through the same pipeline as a tus upload: chunks, whole-file SHA-256,
//! DICOM validation. The answer is the DICOM JSON Store Instances Response.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use relaypacs_core::{
    ByteStream, DicomSummary, Error, ErrorKind, FileId, NewFile, NewSession, PutChunk, SessionId,
    Sha256Digest, Uid,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{AuthUser, Path};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// PS3.18 / PS3.4 failure reasons used in FailedSOPSequence.
mod reason {
    /// A700: Refused, out of resources.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// A900: Error, data set does not match SOP Class (also used when the
    /// instance belongs to another study than the target URL names).
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// C000: Error, cannot understand.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// C122: Referenced Transfer Syntax not supported.
    pub const TRANSFER_SYNTAX: u16 = 0xC122;
    /// 0110: Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// 0111: Duplicate SOP Instance.
    pub const DUPLICATE: u16 = 0x0111;
}

struct Stored {
    summary: DicomSummary,
}

struct Failed {
    sop_class: Option<String>,
    sop_instance: Option<String>,
    reason: u16,
}

fn reason_for(e: &Error) -> u16 {
    match e {
        Error::Dicom(d) if d.code().contains("TRANSFER_SYNTAX") => reason::TRANSFER_SYNTAX,
        Error::Dicom(_) | Error::Integrity(_) | Error::Invalid { .. } => reason::CANNOT_UNDERSTAND,
        Error::StudyMismatch { .. } => reason::DATA_SET_MISMATCH,
        Error::Conflict { code, .. } if code.contains("DUPLICATE") => reason::DUPLICATE,
        Error::LimitExceeded { .. } => reason::OUT_OF_RESOURCES,
        e if e.kind() == ErrorKind::InsufficientStorage => reason::OUT_OF_RESOURCES,
        _ => reason::PROCESSING_FAILURE,
    }
}

fn bad_media(msg: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "RELAY_UNSUPPORTED_MEDIA_TYPE",
        msg.to_string(),
    )
}

/// The multipart boundary of a STOW-RS request.
fn boundary(headers: &HeaderMap) -> ApiResult<String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            bad_media("Content-Type multipart/related; type=\"application/dicom\" is required")
        })?;
    let m: mime::Mime = ct
        .parse()
        .map_err(|_| bad_media("unparsable Content-Type"))?;
    if m.type_() != mime::MULTIPART || m.subtype().as_str() != "related" {
        return Err(bad_media("Content-Type must be multipart/related"));
    }
    if let Some(t) = m.get_param("type")
        && !t.as_str().eq_ignore_ascii_case("application/dicom")
    {
        return Err(bad_media("only type=\"application/dicom\" is supported"));
    }
    let b = m
        .get_param(mime::BOUNDARY)
        .map(|b| b.as_str().to_string())
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| {
            ApiError::bad_request(
                "RELAY_BAD_MULTIPART",
                "multipart boundary missing or longer than 70 characters",
            )
        })?;
    Ok(b)
}

/// Deletes a spool file when dropped.
struct Spool(std::path::PathBuf);

impl Drop for Spool {
    fn drop(&mut self) {
        // Best effort: leftovers are swept at the next start.
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "could not remove a STOW spool file");
        }
    }
}

/// Spool one part to disk: (file, size, digest).
async fn spool_part(
    state: &AppState,
    field: &mut multer::Field<'static>,
) -> Result<(Spool, u64, Sha256Digest), ApiError> {
    let name = format!(".stow-{}.tmp", FileId::random());
    let spool = Spool(state.spool.join(name));
    let mut f = tokio::fs::File::create(&spool.0)
        .await
        .map_err(|e| ApiError::from(Error::io("spool", e)))?;
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    let max = state.config.http.max_upload_size;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        n += chunk.len() as u64;
        if n > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RELAY_UPLOAD_TOO_LARGE",
                format!("a part exceeds {max} bytes"),
            ));
        }
        h.update(&chunk);
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::from(Error::io("spool", e)))?;
    }
    f.flush()
        .await
        .map_err(|e| ApiError::from(Error::io("spool", e)))?;
    Ok((spool, n, Sha256Digest(h.finalize().into())))
}

fn multipart_error(e: multer::Error) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RELAY_UPLOAD_TOO_LARGE",
                e.to_string(),
            )
        }
        multer::Error::StreamReadFailed(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "RELAY_BODY_INTERRUPTED",
            "the request body was interrupted or too slow",
        ),
        _ => ApiError::bad_request(
            "RELAY_BAD_MULTIPART",
            format!("malformed multipart body: {e}"),
        ),
    }
}

/// Feed a spooled part through the pipeline as one file.
async fn ingest(
    state: &AppState,
    user: &AuthUser,
    sid: SessionId,
    index: usize,
    spool: &Spool,
    size: u64,
    digest: Sha256Digest,
) -> relaypacs_core::Result<(FileId, DicomSummary)> {
    let actor = user.actor();
    let file = state
        .pipeline
        .add_file(
            &actor,
            sid,
            NewFile {
                name: format!("stow-part-{index}.dcm"),
                size,
                sha256: Some(digest),
            },
        )
        .await?;
    let seg = state.config.http.patch_segment_size;
    let mut f = tokio::fs::File::open(&spool.0)
        .await
        .map_err(|e| Error::io("read spool", e))?;
    let mut offset = 0u64;
    let plan = super::tus::plan_segments(0, size, seg, state.config.limits.min_chunk_size);
    for (_, len) in plan {
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        f.read_exact(&mut buf)
            .await
            .map_err(|e| Error::io("read spool", e))?;
        let body: ByteStream = relaypacs_core::bytes_stream(buf);
        state
            .pipeline
            .put_chunk(
                &actor,
                sid,
                file.id,
                PutChunk {
                    offset,
                    length: len,
                    sha256: None,
                },
                body,
            )
            .await?;
        offset += len;
    }
    let rec = state.pipeline.complete_file(&actor, sid, file.id).await?;
    match rec.state {
        relaypacs_core::FileState::Valid { dicom } => Ok((file.id, dicom)),
        _ => Err(Error::Invalid {
            code: "RELAY_NOT_VALIDATED",
            message: "the file was not validated".into(),
        }),
    }
}

/// `POST /dicomweb/studies`.
pub async fn store(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    run(state, user, headers, body, None).await
}

/// `POST /dicomweb/studies/{study}`: every instance must belong to `study`.
pub async fn store_in_study(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    Path(study): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let uid = Uid::parse(&study).map_err(|_| {
        ApiError::bad_request(
            "RELAY_BAD_UID",
            "the Study Instance UID in the URL is not a valid UID",
        )
    })?;
    run(state, user, headers, body, Some(uid)).await
}

async fn run(
    state: AppState,
    user: AuthUser,
    headers: HeaderMap,
    body: Body,
    study: Option<Uid>,
) -> ApiResult<Response> {
    let boundary = boundary(&headers)?;
    if let Ok(Err(_)) = state.watermark.admit(0) {
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "RELAY_STORAGE_FULL",
            "the gateway is low on disk space; try later",
        ));
    }
    let actor = user.actor();
    let session = state
        .pipeline
        .create_session(
            &actor,
            NewSession {
                allow_multiple_studies: study.is_none(),
            },
        )
        .await?;
    let sid = session.id;
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .per_field(state.config.http.max_upload_size)
            .whole_stream(state.config.limits.max_session_size),
    );
    let mut mp =
        multer::Multipart::with_constraints(body.into_data_stream(), boundary, constraints);
    let mut stored: Vec<Stored> = Vec::new();
    let mut failed: Vec<Failed> = Vec::new();
    let mut index = 0usize;
    let outcome: ApiResult<()> = async {
        loop {
            let next = mp.next_field().await.map_err(multipart_error)?;
            let Some(mut field) = next else { break };
            index += 1;
            if index > usize::try_from(state.config.limits.max_files).unwrap_or(usize::MAX) {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RELAY_TOO_MANY_PARTS",
                    "too many parts",
                ));
            }
            let ok_type = field
                .content_type()
                .is_none_or(|m| m.essence_str().eq_ignore_ascii_case("application/dicom"));
            if !ok_type {
                // Drain the part; it is reported as not understood.
                while field.chunk().await.map_err(multipart_error)?.is_some() {}
                failed.push(Failed {
                    sop_class: None,
                    sop_instance: None,
                    reason: reason::CANNOT_UNDERSTAND,
                });
                continue;
            }
            let (spool, size, digest) = spool_part(&state, &mut field).await?;
            match ingest(&state, &user, sid, index, &spool, size, digest).await {
                Ok((fid, summary)) => {
                    if let Some(want) = &study
                        && &summary.study_instance_uid != want
                    {
                        state.pipeline.remove_file(&actor, sid, fid).await?;
                        failed.push(Failed {
                            sop_class: Some(summary.sop_class_uid.as_str().to_string()),
                            sop_instance: Some(summary.sop_instance_uid.as_str().to_string()),
                            reason: reason::DATA_SET_MISMATCH,
                        });
                        continue;
                    }
                    stored.push(Stored { summary });
                }
                Err(e) => {
                    if e.kind() == ErrorKind::Audit || e.kind() == ErrorKind::Storage {
                        return Err(e.into());
                    }
                    state.metrics.files_refused.inc();
                    // Remove the refused file so the session can complete.
                    let rec = state.pipeline.session_store().load_session(sid).await?;
                    for (fid, f) in &rec.value.files {
                        if !matches!(f.state, relaypacs_core::FileState::Valid { .. }) {
                            state.pipeline.remove_file(&actor, sid, *fid).await?;
                        }
                    }
                    failed.push(Failed {
                        sop_class: None,
                        sop_instance: None,
                        reason: reason_for(&e),
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        // Nothing of a malformed or failed request is kept.
        if let Err(abort) = state.pipeline.abort_session(&actor, sid).await {
            tracing::error!(error = %abort, "could not remove the session of a failed STOW-RS request");
        }
        return Err(e);
    }
    if index == 0 {
        state.pipeline.abort_session(&actor, sid).await?;
        return Err(ApiError::bad_request(
            "RELAY_BAD_MULTIPART",
            "the request has no parts",
        ));
    }
    if stored.is_empty() {
        state.pipeline.abort_session(&actor, sid).await?;
    } else {
        // Stored, verified and in the outbox: the gateway answers for these
        // instances now (store and forward); delivery to the PACS follows.
        state.pipeline.complete_session(&actor, sid).await?;
        state.metrics.forward("queued");
    }
    let status = if failed.is_empty() {
        StatusCode::OK
    } else if stored.is_empty() {
        StatusCode::CONFLICT
    } else {
        StatusCode::ACCEPTED
    };
    let body = response_body(&stored, &failed);
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    Ok(r)
}

fn ui(v: &str) -> Value {
    json!({ "vr": "UI", "Value": [v] })
}

/// The Store Instances Response Module in DICOM JSON.
fn response_body(stored: &[Stored], failed: &[Failed]) -> Value {
    let mut out = serde_json::Map::new();
    if !stored.is_empty() {
        let items: Vec<Value> = stored
            .iter()
            .map(|s| {
                json!({
                    "00081150": ui(s.summary.sop_class_uid.as_str()),
                    "00081155": ui(s.summary.sop_instance_uid.as_str()),
                })
            })
            .collect();
        out.insert("00081199".into(), json!({ "vr": "SQ", "Value": items }));
    }
    if !failed.is_empty() {
        let items: Vec<Value> = failed
            .iter()
            .map(|f| {
                let mut m = serde_json::Map::new();
                if let Some(c) = &f.sop_class {
                    m.insert("00081150".into(), ui(c));
                }
                if let Some(i) = &f.sop_instance {
                    m.insert("00081155".into(), ui(i));
                }
                m.insert(
                    "00081197".into(),
                    json!({ "vr": "US", "Value": [f.reason] }),
                );
                Value::Object(m)
            })
            .collect();
        out.insert("00081198".into(), json!({ "vr": "SQ", "Value": items }));
    }
    Value::Object(out)
}

//! STOW-RS ingest (DICOM PS3.18 §10.5): `multipart/related;
//! type="application/dicom"`, parsed as a stream. Each part is held in
//! memory up to 1 MiB, spooled to disk beyond (bounded by the file-size
//! limit, hashed on the way), then goes
//! through the same pipeline as a tus upload: chunks, whole-file SHA-256,
//! DICOM validation, the index of accepted instances. The answer is the
//! DICOM JSON Store Instances Response (PS3.18 Annex I):
//!
//! - every refused part is an item of Failed SOP Sequence (0008,1198) with
//!   the SOP Class and Instance UIDs whenever they could be read, the most
//!   specific Failure Reason (0008,1197), and its cause in words in Error
//!   Comment (0000,0902);
//! - every stored instance is an item of Referenced SOP Sequence
//!   (0008,1199), with a Warning Reason (0008,1196) and the warnings in
//!   Error Comment when it was stored with warnings;
//! - the status is 200 when every instance was stored cleanly, 202 when
//!   some failed or carried a warning, 409 when none was stored
//!   (PS3.18 Table 10.5.3-1);
//! - each failure and warning is repeated in a `Warning` header field
//!   (`299 relaypacs "<status> <cause>"`, the DICOM status code first, as
//!   PS3.18 recommends for the Warning header), so a client that reads
//!   only headers still learns why.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use relaypacs_core::{
    ByteStream, DicomSummary, Error, ErrorKind, FileId, NewFile, NewSession, SessionId,
    Sha256Digest, Uid,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{AuthUser, Path};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// PS3.18 Annex I / PS3.4 status codes used in the Store Instances Response.
mod reason {
    /// A700: Refused, out of resources (storage full, a size limit).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// A900: Error, data set does not match SOP Class: the instance does
    /// not conform to its SOP Class (it was read, but is invalid), or it
    /// belongs to another study than the target (URL or request) names.
    pub const DATA_SET_MISMATCH: u16 = 0xA900;
    /// C000: Error, cannot understand: nothing identifying could be read.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// C122: Referenced Transfer Syntax not supported.
    pub const TRANSFER_SYNTAX: u16 = 0xC122;
    /// 0110: Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// 0111: Duplicate SOP Instance: the UID is already in this request,
    /// or the gateway accepted it before with other content.
    pub const DUPLICATE: u16 = 0x0111;

    /// Warning Reason B006 "Elements Discarded". Used when the gateway
    /// accepted this SOP Instance UID before with the same data set: the
    /// earlier copy is the one kept and delivered (the PACS is checked
    /// before sending and not sent a second time), so whatever this copy
    /// carries beyond that data set (e.g. its own file meta group) is
    /// discarded. None of the three codes PS3.18 I.2.1 documents is exact
    /// for an idempotent repeat; "nothing coerced, this copy not kept" is
    /// closest to B006.
    pub const ELEMENTS_DISCARDED: u16 = 0xB006;
    /// Warning Reason B007 "Data Set does not match SOP Class": stored
    /// although the data set departs from its IOD or encoding rules (a
    /// Type 2 attribute absent, image attributes without pixel data, odd
    /// value lengths), or, under `duplicates = "accept"`, although it
    /// differs from the data set accepted before under the same UID.
    pub const DATA_SET_DEVIATES: u16 = 0xB007;
}

/// Marks the warning of an idempotent repeat (see
/// [`relaypacs_core::Pipeline::complete_file`]).
const SAME_CONTENT: &str = "accepted before with the same content";

/// One stored instance.
struct Stored {
    summary: DicomSummary,
}

impl Stored {
    /// Warning Reason (0008,1196) for an instance stored with warnings.
    fn warning_reason(&self) -> Option<u16> {
        let w = &self.summary.warnings;
        if w.is_empty() {
            None
        } else if w.iter().all(|w| w.contains(SAME_CONTENT)) {
            Some(reason::ELEMENTS_DISCARDED)
        } else {
            Some(reason::DATA_SET_DEVIATES)
        }
    }
}

/// One refused part.
struct Failed {
    sop_class: Option<String>,
    sop_instance: Option<String>,
    reason: u16,
    /// The cause in words (no patient data).
    comment: String,
}

impl Failed {
    /// A refusal of `e`, referencing the UIDs it carries (see
    /// [`Error::FileRefused`]).
    fn of(e: &Error) -> Self {
        let (sop_class, sop_instance) = match e {
            Error::FileRefused {
                sop_class_uid,
                sop_instance_uid,
                ..
            } => (
                sop_class_uid.as_ref().map(|u| u.as_str().to_owned()),
                sop_instance_uid.as_ref().map(|u| u.as_str().to_owned()),
            ),
            _ => (None, None),
        };
        let identified = sop_class.is_some() || sop_instance.is_some();
        Self {
            reason: reason_for(e, identified),
            comment: comment_for(e, sop_instance.as_deref()),
            sop_class,
            sop_instance,
        }
    }
}

/// The most specific Failure Reason for `e`; `identified` says whether
/// any UID of the instance could be read.
fn reason_for(e: &Error, identified: bool) -> u16 {
    match e.root() {
        Error::Dicom(d) if d.code() == "RELAY_DICOM_UNSUPPORTED_TRANSFER_SYNTAX" => {
            reason::TRANSFER_SYNTAX
        }
        Error::StudyMismatch { .. } => reason::DATA_SET_MISMATCH,
        Error::Conflict { code, .. }
            if matches!(
                *code,
                "RELAY_DUPLICATE_INSTANCE" | "RELAY_INSTANCE_CONFLICT"
            ) =>
        {
            reason::DUPLICATE
        }
        Error::LimitExceeded { .. } => reason::OUT_OF_RESOURCES,
        r if r.kind() == ErrorKind::InsufficientStorage => reason::OUT_OF_RESOURCES,
        // Read far enough to be identified, yet not valid for its SOP Class.
        Error::Dicom(_) if identified => reason::DATA_SET_MISMATCH,
        Error::Dicom(_) | Error::Integrity(_) | Error::Invalid { .. } => reason::CANNOT_UNDERSTAND,
        _ => reason::PROCESSING_FAILURE,
    }
}

/// The cause of a refusal in words, naming the code and, for duplicates,
/// the UID (and for conflicts the earlier study, which the core's message
/// carries).
fn comment_for(e: &Error, sop_instance: Option<&str>) -> String {
    let root = e.root();
    let text = match root {
        // In a STOW-RS request the session is the request itself.
        Error::Conflict {
            code: "RELAY_DUPLICATE_INSTANCE",
            ..
        } => format!(
            "SOP Instance UID {} is in this request more than once; the first copy was stored",
            sop_instance.unwrap_or("?")
        ),
        Error::Conflict { reason, .. } => reason.clone(),
        Error::Storage { .. } | Error::Audit { .. } => {
            "the gateway cannot store data right now".to_owned()
        }
        other => other.to_string(),
    };
    format!("{}: {text}", root.code())
}
/// The multipart boundary of a STOW-RS request.
fn boundary(headers: &HeaderMap) -> ApiResult<String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    Ok(crate::stow_headers::stow_boundary(
        ct,
        crate::stow_headers::MAX_BOUNDARY_LEN,
    )?)
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

/// Parts up to this size are held in memory while they are ingested (one
/// part at a time per request, so a request holds at most this much);
/// larger ones are spooled to disk. A typical instance (a CT or MR slice
/// of 0.1-1 MiB) then costs no spool file: no create, write, read back
/// and unlink beside the chunk store's own write.
const SPOOL_IN_MEMORY: usize = 1 << 20;

/// One received part, before it enters the pipeline.
enum Spooled {
    /// A small part, whole.
    Memory(bytes::Bytes),
    /// A larger part, in a spool file (deleted when dropped).
    File(Spool),
}

/// Receive one part: (its bytes, size, digest of a spooled part). Nothing
/// of it needs to be durable: the pipeline makes its chunks durable before
/// the answer.
///
/// Only a part spilled to a spool file is hashed here (from the bytes as
/// received, before they reach the disk), and its digest is declared for
/// the file: reading the spool back is a trip through the disk, and the
/// pipeline then proves that what it stored is what was received. A part
/// held in memory is not hashed here: the bytes the pipeline reads are
/// the very buffer received, and the pipeline hashes them on their way to
/// the chunk store (a digest here would be a second pass over the same
/// memory).
async fn spool_part(
    state: &AppState,
    field: &mut multer::Field<'static>,
) -> Result<(Spooled, u64, Option<Sha256Digest>), ApiError> {
    let spool_err = |e| ApiError::from(Error::io("spool", e));
    let mut h: Option<Sha256> = None;
    let mut n: u64 = 0;
    let max = state.config().http.max_upload_size;
    let mut held = bytes::BytesMut::new();
    let mut file: Option<(Spool, tokio::fs::File)> = None;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        n += chunk.len() as u64;
        if n > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RELAY_UPLOAD_TOO_LARGE",
                format!("a part exceeds {max} bytes"),
            ));
        }
        if file.is_none() && held.len() + chunk.len() <= SPOOL_IN_MEMORY {
            held.extend_from_slice(&chunk);
            continue;
        }
        let (_, f) = match &mut file {
            Some(open) => open,
            None => {
                let name = format!(".stow-{}.tmp", FileId::random());
                let spool = Spool(state.spool().join(name));
                let mut f = tokio::fs::File::create(&spool.0).await.map_err(spool_err)?;
                h.get_or_insert_with(Sha256::new).update(&held);
                f.write_all(&held).await.map_err(spool_err)?;
                held = bytes::BytesMut::new();
                file.insert((spool, f))
            }
        };
        if let Some(h) = h.as_mut() {
            h.update(&chunk);
        }
        f.write_all(&chunk).await.map_err(spool_err)?;
    }
    let digest = h.map(|h| Sha256Digest(h.finalize().into()));
    match file {
        Some((spool, mut f)) => {
            f.flush().await.map_err(spool_err)?;
            Ok((Spooled::File(spool), n, digest))
        }
        None => Ok((Spooled::Memory(held.freeze()), n, digest)),
    }
}

fn multipart_error(e: multer::Error) -> ApiError {
    if let Some(refused) = crate::stow_headers::guard_refusal(&e) {
        return refused;
    }
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

/// The request's session: created, or to be created with its first file.
enum Session {
    Created(SessionId),
    /// Not created yet: the first part's write creates it
    /// ([`Pipeline::ingest_first_file`](relaypacs_core::Pipeline::ingest_first_file)).
    Deferred(NewSession),
}

/// One part's result in the request's session (`Err`: the id of the file
/// when one was declared; a refused file is already gone from the
/// session, one that failed otherwise is still there).
type PartResult = Result<(FileId, DicomSummary, bool), (Option<FileId>, Error)>;

/// Feed a spooled part through the pipeline as one file, in the request's
/// session (created here when it is still deferred). `Err` only when the
/// session could not be created; else the session's id and the part's
/// result.
async fn ingest(
    state: &AppState,
    user: &AuthUser,
    session: &mut Session,
    index: usize,
    part: &Received,
    queue: bool,
) -> Result<(SessionId, PartResult), Error> {
    let Received {
        spool,
        size,
        digest,
    } = part;
    let (size, digest) = (*size, *digest);
    let actor = user.actor();
    let req = NewFile {
        name: format!("stow-part-{index}.dcm"),
        size,
        sha256: digest,
    };
    let segment = state.config().http.patch_segment_size;
    let pipeline = state.pipeline();
    if let Spooled::Memory(b) = spool
        && size <= segment.min(pipeline.config().limits.max_chunk_size)
    {
        // A part of one chunk (a typical instance): declared, stored and
        // completed in one step, one write of the session state (which
        // with `queue` also completes a session of this one file, and for
        // the first part also creates the session); on error it is not in
        // the session.
        let body = relaypacs_core::bytes_stream(b.clone());
        let (sid, done) = match session {
            Session::Created(sid) => {
                let done = if queue {
                    pipeline
                        .ingest_file_and_queue(&actor, *sid, req, body)
                        .await
                } else {
                    pipeline
                        .ingest_file(&actor, *sid, req, body)
                        .await
                        .map(|f| (f, false))
                };
                (*sid, done)
            }
            Session::Deferred(new) => {
                let (sid, done) = pipeline
                    .ingest_first_file(&actor, new.clone(), req, body, queue)
                    .await?;
                *session = Session::Created(sid);
                (sid, done)
            }
        };
        let done = match done {
            Ok((rec, queued)) => match rec.state {
                relaypacs_core::FileState::Valid { dicom } => Ok((rec.id, dicom, queued)),
                _ => Err((
                    Some(rec.id),
                    Error::Invalid {
                        code: "RELAY_NOT_VALIDATED",
                        message: "the file was not validated".into(),
                    },
                )),
            },
            Err(e) => Err((None, e)),
        };
        return Ok((sid, done));
    }
    let sid = match session {
        Session::Created(sid) => *sid,
        Session::Deferred(new) => {
            let sid = pipeline.create_session(&actor, new.clone()).await?.id;
            *session = Session::Created(sid);
            sid
        }
    };
    Ok((sid, spooled_part(state, &actor, sid, req, spool).await))
}

/// A part larger than one chunk, or spooled to disk: declared, then
/// streamed in chunks and completed.
async fn spooled_part(
    state: &AppState,
    actor: &relaypacs_core::Actor,
    sid: SessionId,
    req: NewFile,
    spool: &Spooled,
) -> PartResult {
    let actor = actor.clone();
    let file = state
        .pipeline()
        .add_file(&actor, sid, req)
        .await
        .map_err(|e| (None, e))?;
    let fail = |e: Error| (Some(file.id), e);
    let bytes: ByteStream = match spool {
        Spooled::Memory(b) => relaypacs_core::bytes_stream(b.clone()),
        Spooled::File(spool) => {
            let f = tokio::fs::File::open(&spool.0)
                .await
                .map_err(|e| fail(Error::io("read spool", e)))?;
            Box::pin(
                tokio_util::io::ReaderStream::with_capacity(f, 256 << 10)
                    .map(|r| r.map_err(|e| Error::io("read spool", e))),
            )
        }
    };
    let rec = state
        .pipeline()
        .ingest_stream_chunked(
            &actor,
            sid,
            file.id,
            state.config().http.patch_segment_size,
            bytes,
        )
        .await
        .map_err(fail)?;
    match rec.state {
        relaypacs_core::FileState::Valid { dicom } => Ok((file.id, dicom, false)),
        _ => Err(fail(Error::Invalid {
            code: "RELAY_NOT_VALIDATED",
            message: "the file was not validated".into(),
        })),
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

/// The parts of a request, read one at a time, with a look at whether
/// another follows.
struct Parts {
    mp: multer::Multipart<'static>,
    /// The next field once looked at (`Some(None)`: there is none).
    peeked: Option<Option<multer::Field<'static>>>,
    /// Parts read so far.
    count: usize,
    max: usize,
}

/// A DICOM part, received whole (see [`spool_part`]).
struct Received {
    spool: Spooled,
    size: u64,
    digest: Option<Sha256Digest>,
}

/// One part as read.
enum Part {
    /// A DICOM part; `last` when no part follows it.
    Dicom { received: Received, last: bool },
    /// A part that is not `application/dicom`, drained.
    Refused(Failed),
}

impl Parts {
    async fn next_field(&mut self) -> ApiResult<Option<multer::Field<'static>>> {
        match self.peeked.take() {
            Some(f) => Ok(f),
            None => self.mp.next_field().await.map_err(multipart_error),
        }
    }

    /// The next part, received; `None` after the last. Whether another
    /// follows is known before this returns (its headers are read, not its
    /// body): a last part can then complete its session in its own write.
    async fn next(&mut self, state: &AppState) -> ApiResult<Option<Part>> {
        let Some(mut field) = self.next_field().await? else {
            return Ok(None);
        };
        self.count += 1;
        let index = self.count;
        if index > self.max {
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
            return Ok(Some(Part::Refused(Failed {
                sop_class: None,
                sop_instance: None,
                reason: reason::CANNOT_UNDERSTAND,
                comment: format!(
                    "RELAY_UNSUPPORTED_MEDIA_TYPE: part {index} is not application/dicom"
                ),
            })));
        }
        let (spool, size, digest) = spool_part(state, &mut field).await?;
        // multer reads the next field only once this one is dropped.
        drop(field);
        let after = self.mp.next_field().await.map_err(multipart_error)?;
        let last = after.is_none();
        self.peeked = Some(after);
        Ok(Some(Part::Dicom {
            received: Received {
                spool,
                size,
                digest,
            },
            last,
        }))
    }
}

async fn run(
    state: AppState,
    user: AuthUser,
    headers: HeaderMap,
    body: Body,
    study: Option<Uid>,
) -> ApiResult<Response> {
    let boundary = boundary(&headers)?;
    if let Ok(Err(_)) = state.watermark().admit(0) {
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "RELAY_STORAGE_FULL",
            "the gateway is low on disk space; try later",
        ));
    }
    let actor = user.actor();
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .per_field(state.config().http.max_upload_size)
            .whole_stream(state.config().limits.max_session_size),
    );
    // Part headers bounded in linear time before multer buffers them.
    let guarded = crate::stow_headers::guard_stream(
        body.into_data_stream(),
        &boundary,
        state.config().stow.part_header_limits(),
    );
    let mut parts = Parts {
        mp: multer::Multipart::with_constraints(guarded, boundary, constraints),
        peeked: None,
        count: 0,
        max: usize::try_from(state.config().limits.max_files).unwrap_or(usize::MAX),
    };
    let new = NewSession {
        allow_multiple_studies: study.is_none(),
        // Only this request knows the session: one left open by a dead run
        // is ended at the next start.
        request_scoped: true,
    };
    let (mut session, first) = if state.pipeline().creates_session_with_first_file() {
        // The session is created by its first part's write (one sync for
        // both), or on its own before a part that goes another way.
        (Session::Deferred(new), parts.next(&state).await)
    } else {
        // The session is created while the first part arrives (its commit
        // and the body's transfer overlap). Nothing is ingested before the
        // session exists; a part read for a session that could not be
        // created is dropped (a spooled one with its file).
        let (created, first) = tokio::join!(
            state.pipeline().create_session(&actor, new),
            parts.next(&state)
        );
        (Session::Created(created?.id), first)
    };
    let mut stored: Vec<Stored> = Vec::new();
    let mut failed: Vec<Failed> = Vec::new();
    // Whether the last part's write also completed the session.
    let mut queued = false;
    let outcome: ApiResult<()> = async {
        let mut next = first?;
        while let Some(part) = next {
            let index = parts.count;
            let (received, last) = match part {
                Part::Refused(f) => {
                    failed.push(f);
                    next = parts.next(&state).await?;
                    continue;
                }
                Part::Dicom { received, last } => (received, last),
            };
            // The last part completes the session in its own write when it
            // is the session's only file; not when the URL names a study
            // (a valid instance of another study is removed below, which
            // needs the session open).
            let queue = last && study.is_none();
            let (sid, done) = ingest(&state, &user, &mut session, index, &received, queue).await?;
            match done {
                Ok((fid, summary, was_queued)) => {
                    queued |= was_queued;
                    if let Some(want) = &study
                        && &summary.study_instance_uid != want
                    {
                        // Valid, but not of the study the URL names.
                        state.pipeline().remove_file(&actor, sid, fid).await?;
                        state.metrics().files_refused.inc();
                        failed.push(Failed {
                            sop_class: Some(summary.sop_class_uid.as_str().to_string()),
                            sop_instance: Some(summary.sop_instance_uid.as_str().to_string()),
                            reason: reason::DATA_SET_MISMATCH,
                            comment: format!(
                                "RELAY_STUDY_MISMATCH: the instance belongs to study {}, \
                                 not to study {want} named in the URL",
                                summary.study_instance_uid
                            ),
                        });
                    } else {
                        stored.push(Stored { summary });
                    }
                }
                Err((fid, e)) => {
                    if e.kind() == ErrorKind::Audit || e.kind() == ErrorKind::Storage {
                        return Err(e.into());
                    }
                    state.metrics().files_refused.inc();
                    // A file refused for its content has already left the
                    // session (the pipeline removes it); one that failed
                    // otherwise (e.g. storage full while its chunks were
                    // written) is removed here, so the session can complete.
                    if let Some(fid) = fid
                        && !matches!(e, Error::FileRefused { .. })
                    {
                        match state.pipeline().remove_file(&actor, sid, fid).await {
                            Ok(()) | Err(Error::NotFound { .. }) => {}
                            Err(other) => return Err(other.into()),
                        }
                    }
                    failed.push(Failed::of(&e));
                }
            }
            // The part's memory or spool file goes before the next is read.
            drop(received);
            next = parts.next(&state).await?;
        }
        Ok(())
    }
    .await;
    // None when no part reached the pipeline and the session was deferred:
    // nothing of it was ever written.
    let sid = match session {
        Session::Created(sid) => Some(sid),
        Session::Deferred(_) => None,
    };
    if let Err(e) = outcome {
        // Nothing of a malformed or failed request is kept.
        if let Some(sid) = sid
            && let Err(abort) = state.pipeline().abort_session(&actor, sid).await
        {
            tracing::error!(error = %abort, "could not remove the session of a failed STOW-RS request");
        }
        return Err(e);
    }
    if parts.count == 0 {
        if let Some(sid) = sid {
            state.pipeline().abort_session(&actor, sid).await?;
        }
        return Err(ApiError::bad_request(
            "RELAY_BAD_MULTIPART",
            "the request has no parts",
        ));
    }
    match sid {
        Some(sid) if stored.is_empty() => state.pipeline().abort_session(&actor, sid).await?,
        Some(sid) => {
            // Stored, verified and in the outbox: the gateway answers for
            // these instances now (store and forward); delivery to the PACS
            // follows.
            if !queued {
                state.pipeline().complete_session(&actor, sid).await?;
            }
            state.metrics().forward("queued");
        }
        // Every part was refused before it reached the pipeline.
        None => {}
    }
    let warned = stored.iter().any(|s| s.warning_reason().is_some());
    let status = if stored.is_empty() {
        StatusCode::CONFLICT
    } else if failed.is_empty() && !warned {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let body = response_body(&stored, &failed);
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    for w in warning_headers(&stored, &failed) {
        h.append(header::WARNING, w);
    }
    Ok(r)
}

/// Most `Warning` header fields in one answer (the body has them all).
const MAX_WARNING_HEADERS: usize = 20;
/// Longest warn-text of one `Warning` header field, in characters.
const MAX_WARNING_TEXT: usize = 400;

/// One `Warning` header field per failure and per warning (PS3.18 §8.4:
/// the text starts with the DICOM status code), in RFC 7234 syntax:
/// `299 relaypacs "<hex status> <text>"`.
fn warning_headers(stored: &[Stored], failed: &[Failed]) -> Vec<HeaderValue> {
    let failures = failed.iter().map(|f| (f.reason, f.comment.clone()));
    let warnings = stored.iter().filter_map(|s| {
        s.warning_reason().map(|code| {
            (
                code,
                format!(
                    "SOP Instance UID {} stored with warnings: {}",
                    s.summary.sop_instance_uid,
                    s.summary.warnings.join("; ")
                ),
            )
        })
    });
    let all: Vec<(u16, String)> = failures.chain(warnings).collect();
    let extra = all.len().saturating_sub(MAX_WARNING_HEADERS);
    let mut out: Vec<HeaderValue> = all
        .into_iter()
        .take(MAX_WARNING_HEADERS)
        .filter_map(|(code, text)| warning_value(&format!("{code:04X} {text}")))
        .collect();
    if extra > 0 {
        out.extend(warning_value(&format!(
            "{extra} more failure(s) or warning(s); see the response body"
        )));
    }
    out
}

/// `299 relaypacs "<text>"` with `text` made a valid quoted-string
/// (visible ASCII, quotes and backslashes escaped, bounded).
fn warning_value(text: &str) -> Option<HeaderValue> {
    let mut quoted = String::with_capacity(text.len().min(MAX_WARNING_TEXT) + 8);
    for c in text.chars().take(MAX_WARNING_TEXT) {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            ' '..='~' => quoted.push(c),
            '\u{2014}' | '\u{2013}' => quoted.push('-'),
            _ => quoted.push('?'),
        }
    }
    HeaderValue::from_str(&format!("299 relaypacs \"{quoted}\"")).ok()
}

fn ui(v: &str) -> Value {
    json!({ "vr": "UI", "Value": [v] })
}

fn us(v: u16) -> Value {
    json!({ "vr": "US", "Value": [v] })
}

/// Error Comment (0000,0902), VR LO. Its texts name UIDs and may exceed
/// the 64 characters LO nominally holds; DICOM JSON carries them whole.
fn comment(text: &str) -> Value {
    json!({ "vr": "LO", "Value": [text] })
}

/// The Store Instances Response Module in DICOM JSON.
fn response_body(stored: &[Stored], failed: &[Failed]) -> Value {
    let mut out = serde_json::Map::new();
    if !stored.is_empty() {
        let items: Vec<Value> = stored
            .iter()
            .map(|s| {
                let mut m = serde_json::Map::new();
                m.insert("00081150".into(), ui(s.summary.sop_class_uid.as_str()));
                m.insert("00081155".into(), ui(s.summary.sop_instance_uid.as_str()));
                if let Some(code) = s.warning_reason() {
                    m.insert("00081196".into(), us(code));
                    m.insert("00000902".into(), comment(&s.summary.warnings.join("; ")));
                }
                Value::Object(m)
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
                m.insert("00081197".into(), us(f.reason));
                m.insert("00000902".into(), comment(&f.comment));
                Value::Object(m)
            })
            .collect();
        out.insert("00081198".into(), json!({ "vr": "SQ", "Value": items }));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warning_values_are_quoted_strings() {
        let v = warning_value("0111 a \"quoted\" \\ text \u{2014} é");
        assert_eq!(
            v.as_ref().and_then(|v| v.to_str().ok()),
            Some(r#"299 relaypacs "0111 a \"quoted\" \\ text - ?""#)
        );
        let long = "x".repeat(2 * MAX_WARNING_TEXT);
        let v = warning_value(&long).map(|v| v.len());
        assert_eq!(v, Some(MAX_WARNING_TEXT + "299 relaypacs \"\"".len()));
    }

    #[test]
    fn failure_reasons_prefer_the_specific_code() {
        let refused = |source: Error, uid: bool| Error::FileRefused {
            sop_class_uid: None,
            sop_instance_uid: uid.then(|| Uid::parse("1.2.3").ok()).flatten(),
            source: Box::new(source),
        };
        let dup = Error::conflict("RELAY_INSTANCE_CONFLICT", "x");
        assert_eq!(Failed::of(&refused(dup, true)).reason, reason::DUPLICATE);
        let bad = || {
            Error::Dicom(relaypacs_core::dicom::DicomError::MissingAttribute {
                name: "SOPClassUID",
            })
        };
        assert_eq!(
            Failed::of(&refused(bad(), true)).reason,
            reason::DATA_SET_MISMATCH
        );
        assert_eq!(
            Failed::of(&refused(bad(), false)).reason,
            reason::CANNOT_UNDERSTAND
        );
        let full = Error::io("x", std::io::Error::from_raw_os_error(28));
        assert_eq!(Failed::of(&full).reason, reason::OUT_OF_RESOURCES);
    }
}

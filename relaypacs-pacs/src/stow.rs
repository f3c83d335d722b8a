//! [`StowSink`]: delivery to a PACS by DICOMweb STOW-RS (PS3.18 §10.5),
//! verified by QIDO-RS (presence) and WADO-RS (content).

use std::collections::{HashMap, HashSet};
use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, Stream, StreamExt, TryStreamExt};
use relaypacs_core::dicom::{ContentDigest, Part10Hasher, PrescanLimits, identify};
use relaypacs_core::{
    DeliveryReport, Error, Holding, Instance, InstanceOutcome, InstanceSource, IntegrityError,
    PacsSink, Result, Uid, Verification, VerifyMode, compare_content,
};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tracing::Instrument;

use crate::dicomweb::{
    DicomJsonError, DicomJsonLimits, DicomWebClient, DicomWebConfig, FramingError, FramingLimits,
    MultipartReader, PartEvent, is_transient_status, items_of, multipart_boundary, number_of,
    parse_dicom_json, status_error, string_of, transport,
};

/// DICOM JSON tags of the STOW-RS response.
mod tag {
    pub const SOP_INSTANCE_UID: &str = "00080018";
    pub const STUDY_INSTANCE_UID: &str = "0020000D";
    pub const SERIES_INSTANCE_UID: &str = "0020000E";
    pub const FAILED_SOP_SEQUENCE: &str = "00081198";
    pub const REFERENCED_SOP_SEQUENCE: &str = "00081199";
    pub const REFERENCED_SOP_INSTANCE_UID: &str = "00081155";
    pub const FAILURE_REASON: &str = "00081197";
    pub const WARNING_REASON: &str = "00081196";
}

/// A [`PacsSink`] that POSTs instances to `<base>/studies` as
/// `multipart/related; type="application/dicom"`, several per request up
/// to a byte and count budget, streamed from the source with an exact
/// `Content-Length` (no instance is held in memory). The PS3.18 answer is
/// read per instance: referenced → stored (or stored with a warning),
/// failed → its Failure Reason decides transient or permanent. HTTP 408,
/// 429 and 5xx are transient (with `Retry-After`); other 4xx are permanent.
/// A 200 that does not reference an instance does not count as stored.
///
/// # Verification
/// A PACS may answer a STOW-RS with success and keep the object it already
/// had under the SOP Instance UID (Orthanc does), so `verify` asks the
/// PACS what it holds:
/// 1. **Presence**, by QIDO-RS: the study's instances (one query per
///    study); a SOP Instance UID not found in its own study is looked up in
///    every study (UID list matching, 64 UIDs per query) and, if another
///    study holds it, is [`Holding::Different`] naming both UIDs.
/// 2. **Content** ([`VerifyMode::Content`], the default): each instance
///    found is retrieved by WADO-RS from the study and series where the
///    PACS holds it, as stored (`Accept: multipart/related;
///    type="application/dicom"; transfer-syntax=*`), four at a time,
///    in order. The answer is streamed through
///    [`Part10Hasher`], never held in memory, and compared by
///    [`compare_content`]: the PACS holds what was sent if it returns the
///    byte-identical Part-10 file, or the identical data set after a file
///    meta group of its own. A copy in another transfer syntax (a PACS
///    that transcodes on storage or ignores `transfer-syntax=*`) is a
///    mismatch by policy; configure `verify = "presence"` for such a PACS.
///    The retrieval is bounded: one part is expected, of at most the sent
///    size plus 64 KiB (room for a rewritten meta group); a larger part,
///    or a second one, is `Different` without being read further.
/// 3. **Content of a whole series** (one request instead of one per
///    instance): when the QIDO-RS answer shows that a series holds
///    exactly the instances being verified (the same SOP Instance UIDs,
///    no other, at least two), the series is retrieved by one WADO-RS
///    request (`GET …/studies/{study}/series/{series}`, same `Accept`) and
///    read as it streams (`digest_series`): each part's SOP Instance
///    UID is read from its first bytes (at most 64 KiB are kept), the part
///    is matched to its instance and hashed and compared as above. Each
///    part is bounded by its instance's limit (a larger one is
///    `Different`, the rest of it skipped unhashed), the answer by the sum
///    of the limits and by as many parts as instances. A part whose UID is
///    unknown, repeated or unreadable ends the use of the answer: every
///    instance of the series it has not decided (a repeated one included)
///    is retrieved on its own, as is any instance the answer did not
///    contain (a series answer never makes an instance `Absent`). A series
///    with other instances too, a single instance, or a series request
///    refused with a 4xx or an unusable answer also goes instance by
///    instance; a transient failure of the series request (5xx, 408, 429,
///    connection) fails `verify` as any other retrieval does.
///
/// With [`VerifyMode::Presence`] a found instance is
/// `Same { PresenceOnly }`. A 404 from WADO-RS for an instance QIDO-RS
/// listed is `Absent`; other HTTP failures are classified as for STOW-RS.
#[derive(Clone, Debug)]
pub struct StowSink {
    client: DicomWebClient,
    /// For series retrievals, each run on a runtime of its own.
    series_client: DicomWebClient,
    batch_bytes: u64,
    batch_instances: usize,
    verify: VerifyMode,
}

/// How many bytes a retrieved instance may exceed the size sent by: room
/// for a PACS that writes a file meta group of its own (another
/// implementation class and version, a source AE title, private meta
/// elements); the data set after it must still be identical.
pub const RETRIEVE_SLACK_BYTES: u64 = 64 << 10;

/// How many WADO-RS retrievals one `verify` runs at a time.
pub const RETRIEVALS_IN_FLIGHT: usize = 4;

/// Most bytes of multipart framing (preamble, part headers) accepted
/// around a retrieved instance.
const RETRIEVE_HEAD_BYTES: usize = 16 << 10;

/// A PACS error with what it was about appended to its reason.
fn naming(e: Error, what: std::fmt::Arguments<'_>) -> Error {
    match e {
        Error::Pacs {
            transient,
            reason,
            retry_after,
            source,
        } => Error::Pacs {
            transient,
            reason: format!("{reason} ({what})"),
            retry_after,
            source,
        },
        e => e,
    }
}

/// Most bytes of a file meta group [`Part10Hasher`] buffers.
const MAX_META_BYTES: usize = 1 << 20;

/// The WADO-RS media type asked for: the instance as stored (PS3.18
/// §8.7.3.5.2). Orthanc (DICOMweb plugin 1.7) honours `transfer-syntax=*`
/// and returns the stored file byte for byte; without it, it transcodes to
/// Explicit VR Little Endian (and fails with 500 on what it cannot decode).
const WADO_ACCEPT: &str = "multipart/related; type=\"application/dicom\"; transfer-syntax=*";

/// The framing limits of retrieving an instance of `size` bytes: one part
/// of at most `size + RETRIEVE_SLACK_BYTES`.
pub fn retrieve_limits(size: u64) -> FramingLimits {
    FramingLimits {
        max_parts: 1,
        max_part_bytes: size.saturating_add(RETRIEVE_SLACK_BYTES),
        max_head_bytes: RETRIEVE_HEAD_BYTES,
    }
}

/// What a WADO-RS answer for one instance held.
#[derive(Debug)]
pub enum Retrieved {
    /// No part: nothing returned for the instance.
    Nothing,
    /// One part, with its digests.
    One(ContentDigest),
    /// The answer broke its limits (see [`FramingError`]); it was not read
    /// further.
    Refused(FramingError),
}

/// Digest the single part of a WADO-RS answer `body` delimited by
/// `boundary`, within `limits`, streaming: each piece is hashed and
/// dropped. Stops reading at the first broken limit. The answer is read
/// to its closing boundary (and a short epilogue, so the connection can be
/// reused). With `whole`, the whole-file digest is computed too (needed
/// only when the data set digest of what was sent is unknown).
///
/// # Errors
/// [`Error::Pacs`] (transient) when the body cannot be read or is not
/// well-formed multipart; permanent when a part is not
/// `application/dicom`.
pub async fn digest_single_part<S, E>(
    body: S,
    boundary: &str,
    limits: FramingLimits,
    whole: bool,
) -> Result<Retrieved>
where
    S: Stream<Item = std::result::Result<Bytes, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut reader = MultipartReader::new(boundary, limits);
    // The data set digest alone decides when the sent one is known; the
    // whole-file digest (a second SHA-256 pass) only when it is not.
    let mut hasher = if whole {
        Part10Hasher::new(MAX_META_BYTES)
    } else {
        Part10Hasher::data_set_only(MAX_META_BYTES)
    };
    let mut not_dicom: Option<String> = None;
    let mut epilogue = 0usize;
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| {
            Error::pacs_transient("WADO-RS: transfer failed".to_owned(), Some(e.into()))
        })?;
        if reader.is_done() {
            epilogue += piece.len();
            if epilogue > limits.max_head_bytes {
                break;
            }
            continue;
        }
        let fed = reader.feed(&piece, |ev| match ev {
            PartEvent::Start {
                content_type: Some(ct),
            } if !is_dicom(ct) => not_dicom = Some(ct.chars().take(120).collect()),
            PartEvent::Data(d) => hasher.update(d),
            PartEvent::Start { .. } | PartEvent::End => {}
        });
        if let Some(ct) = not_dicom {
            return Err(Error::pacs_permanent(
                format!("WADO-RS returned a part of type {ct:?}, not application/dicom"),
                None,
            ));
        }
        match fed {
            Ok(()) => {}
            Err(e @ (FramingError::PartTooLarge { .. } | FramingError::TooManyParts { .. })) => {
                return Ok(Retrieved::Refused(e));
            }
            Err(e) => return Err(Error::pacs_transient(format!("WADO-RS: {e}"), None)),
        }
    }
    reader
        .finish()
        .map_err(|e| Error::pacs_transient(format!("WADO-RS: {e}"), None))?;
    Ok(if reader.parts() == 0 {
        Retrieved::Nothing
    } else {
        Retrieved::One(hasher.finish())
    })
}

fn is_dicom(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default();
    essence.trim().eq_ignore_ascii_case("application/dicom")
}

/// Most bytes of a part of a series answer kept to read its SOP Instance
/// UID (which a Part-10 file has within its first few hundred bytes).
pub const IDENTIFY_PREFIX_BYTES: usize = 64 << 10;

/// Prefix length at which a part's SOP Instance UID is first looked for;
/// then at every doubling, up to [`IDENTIFY_PREFIX_BYTES`].
const FIRST_IDENTIFY_BYTES: usize = 4 << 10;

/// What a WADO-RS answer for a whole series proved about each instance.
#[derive(Debug)]
pub struct SeriesDigest {
    /// Per instance, in the order given to [`digest_series`]: what the
    /// answer proved, or `None` when the instance must be retrieved on its
    /// own (the answer did not contain it, or stopped being used before
    /// it was decided).
    pub held: Vec<Option<Holding>>,
    /// Why the answer stopped being used before its end, if it did.
    pub abandoned: Option<String>,
}

/// Digest the parts of a WADO-RS answer for a whole series `body`,
/// delimited by `boundary`, against `instances` (distinct SOP Instance
/// UIDs), streaming: each part's SOP Instance UID is read from its first
/// bytes (at most [`IDENTIFY_PREFIX_BYTES`] are kept), then the part is
/// hashed by a [`Part10Hasher`] (the whole-file digest too when the
/// instance's data set digest is unknown) and decided by
/// [`compare_content`].
///
/// Bounds: each part at most its instance's [`retrieve_limits`] (a larger
/// part makes that instance `Different` and the rest of it is skipped,
/// not hashed), all parts together at most the sum of those limits, at
/// most one part per instance, [`FramingLimits::max_head_bytes`] of
/// framing as for one instance. A part whose SOP Instance UID is not one
/// of `instances`, repeats one (that instance is undecided again) or
/// cannot be read, a part that is not `application/dicom`, or a broken
/// bound or malformed framing abandons the answer: reading stops, and
/// what was decided before stays decided.
///
/// # Errors
/// [`Error::Pacs`] (transient) when the body cannot be read or ends before
/// its closing boundary.
pub async fn digest_series<S, E>(
    body: S,
    boundary: &str,
    instances: &[&Instance],
) -> Result<SeriesDigest>
where
    S: Stream<Item = std::result::Result<Bytes, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits: Vec<u64> = instances
        .iter()
        .map(|i| retrieve_limits(i.size).max_part_bytes)
        .collect();
    let mut parts = SeriesParts::new(instances, limits);
    // Each part is held to its own instance's limit by `parts` (and the
    // rest of a larger one skipped); the reader's bound on one part is the
    // bound on them all.
    let framing = FramingLimits {
        max_parts: instances.len(),
        max_part_bytes: parts.total_limit,
        max_head_bytes: RETRIEVE_HEAD_BYTES,
    };
    let mut reader = MultipartReader::new(boundary, framing);
    let mut body = std::pin::pin!(body);
    let mut epilogue = 0usize;
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| {
            Error::pacs_transient("WADO-RS: transfer failed".to_owned(), Some(e.into()))
        })?;
        if reader.is_done() {
            epilogue += piece.len();
            if epilogue > framing.max_head_bytes {
                break;
            }
            continue;
        }
        let fed = reader.feed(&piece, |ev| parts.on(ev));
        if parts.abandoned.is_some() {
            break;
        }
        match fed {
            Ok(()) => {}
            Err(e @ FramingError::PartTooLarge { .. }) => {
                parts.current_too_large(&e);
                parts.abandon(format!("the series answer has {e}"));
                break;
            }
            Err(
                e @ (FramingError::TooManyParts { .. }
                | FramingError::HeadTooLarge { .. }
                | FramingError::Malformed(_)),
            ) => {
                parts.abandon(format!("the series answer has {e}"));
                break;
            }
            Err(e) => return Err(Error::pacs_transient(format!("WADO-RS: {e}"), None)),
        }
    }
    if parts.abandoned.is_none() {
        reader
            .finish()
            .map_err(|e| Error::pacs_transient(format!("WADO-RS: {e}"), None))?;
    }
    Ok(SeriesDigest {
        held: parts.held,
        abandoned: parts.abandoned,
    })
}

/// Where [`digest_series`] is in the current part.
enum PartState {
    /// Between parts.
    Idle,
    /// Keeping the first bytes until the SOP Instance UID can be read.
    Identifying { prefix: Vec<u8>, next_try: usize },
    /// Matched to `instances[idx]`, hashed as it streams.
    Hashing {
        idx: usize,
        hasher: Box<Part10Hasher>,
        bytes: u64,
    },
    /// Over its instance's limit (already decided): not hashed.
    Skipping,
}

/// The state of [`digest_series`], fed the reader's events.
struct SeriesParts<'a> {
    instances: &'a [&'a Instance],
    limits: Vec<u64>,
    by_uid: HashMap<&'a str, usize>,
    held: Vec<Option<Holding>>,
    seen: Vec<bool>,
    part: PartState,
    total: u64,
    total_limit: u64,
    abandoned: Option<String>,
}

impl<'a> SeriesParts<'a> {
    fn new(instances: &'a [&'a Instance], limits: Vec<u64>) -> Self {
        let total_limit = limits.iter().fold(0u64, |a, l| a.saturating_add(*l));
        Self {
            instances,
            by_uid: instances
                .iter()
                .enumerate()
                .map(|(k, i)| (i.dicom.sop_instance_uid.as_str(), k))
                .collect(),
            limits,
            held: vec![None; instances.len()],
            seen: vec![false; instances.len()],
            part: PartState::Idle,
            total: 0,
            total_limit,
            abandoned: None,
        }
    }

    fn on(&mut self, ev: PartEvent<'_>) {
        if self.abandoned.is_some() {
            return;
        }
        match ev {
            PartEvent::Start { content_type } => {
                if let Some(ct) = content_type.filter(|ct| !is_dicom(ct)) {
                    let ct: String = ct.chars().take(120).collect();
                    self.abandon(format!("a part is of type {ct:?}, not application/dicom"));
                    return;
                }
                self.part = PartState::Identifying {
                    prefix: Vec::new(),
                    next_try: FIRST_IDENTIFY_BYTES,
                };
            }
            PartEvent::Data(d) => self.data(d),
            PartEvent::End => self.end(),
        }
    }

    fn data(&mut self, d: &[u8]) {
        self.total = self.total.saturating_add(d.len() as u64);
        if self.total > self.total_limit {
            // Only a part skipped over its own limit gets here; the one
            // being read is left to a retrieval of its own.
            self.abandon(format!(
                "the series answer is larger than the {} instances' limits together \
                 ({} bytes)",
                self.instances.len(),
                self.total_limit
            ));
            return;
        }
        let state = std::mem::replace(&mut self.part, PartState::Idle);
        let next = match state {
            PartState::Identifying {
                mut prefix,
                next_try,
            } => {
                let take = d.len().min(IDENTIFY_PREFIX_BYTES - prefix.len());
                prefix.extend_from_slice(&d[..take]);
                let full = prefix.len() >= IDENTIFY_PREFIX_BYTES;
                if prefix.len() < next_try && !full {
                    PartState::Identifying { prefix, next_try }
                } else {
                    // The part's size is not known yet: a hint beyond any
                    // prefix, so only the bytes held bound the reading.
                    match sop_instance_uid(&prefix, u64::MAX) {
                        Some(uid) => match self.claim(&uid) {
                            Some(idx) => {
                                let hashing = self.start_hashing(idx, &prefix);
                                self.hash(hashing, &d[take..])
                            }
                            None => PartState::Idle,
                        },
                        None if full => {
                            self.abandon(format!(
                                "no SOP Instance UID could be read in the first \
                                 {IDENTIFY_PREFIX_BYTES} bytes of a part"
                            ));
                            PartState::Idle
                        }
                        None => PartState::Identifying {
                            prefix,
                            next_try: next_try.saturating_mul(2),
                        },
                    }
                }
            }
            hashing @ PartState::Hashing { .. } => self.hash(hashing, d),
            other => other,
        };
        if self.abandoned.is_none() {
            self.part = next;
        }
    }

    fn end(&mut self) {
        match std::mem::replace(&mut self.part, PartState::Idle) {
            PartState::Identifying { prefix, .. } => {
                // The whole part is in `prefix` (it never filled it).
                match sop_instance_uid(&prefix, prefix.len() as u64) {
                    Some(uid) => {
                        if let Some(idx) = self.claim(&uid) {
                            let hashing = self.start_hashing(idx, &prefix);
                            self.decide(hashing);
                        }
                    }
                    None => self.abandon(
                        "a part is not a Part-10 file whose SOP Instance UID can be read"
                            .to_owned(),
                    ),
                }
            }
            hashing @ PartState::Hashing { .. } => self.decide(hashing),
            PartState::Skipping | PartState::Idle => {}
        }
    }

    /// The instance a part with `uid` belongs to, if it is one of ours not
    /// met before; otherwise the answer is abandoned.
    fn claim(&mut self, uid: &str) -> Option<usize> {
        let shown: String = uid.chars().take(64).collect();
        match self.by_uid.get(uid).copied() {
            None => {
                self.abandon(format!(
                    "a part holds SOP Instance UID {shown}, not one of the instances \
                     being verified"
                ));
                None
            }
            Some(idx) if self.seen[idx] => {
                // Two objects under one UID: the answer cannot say which
                // the PACS holds; the instance is retrieved on its own.
                self.held[idx] = None;
                self.abandon(format!("two parts hold SOP Instance UID {shown}"));
                None
            }
            Some(idx) => {
                self.seen[idx] = true;
                Some(idx)
            }
        }
    }

    fn start_hashing(&mut self, idx: usize, prefix: &[u8]) -> PartState {
        let hasher = if self.instances[idx].data_set_sha256.is_some() {
            Part10Hasher::data_set_only(MAX_META_BYTES)
        } else {
            Part10Hasher::new(MAX_META_BYTES)
        };
        let hashing = PartState::Hashing {
            idx,
            hasher: Box::new(hasher),
            bytes: 0,
        };
        self.hash(hashing, prefix)
    }

    /// Hash `d` into the part, within its instance's limit.
    fn hash(&mut self, state: PartState, d: &[u8]) -> PartState {
        match state {
            PartState::Hashing {
                idx,
                mut hasher,
                bytes,
            } => {
                let bytes = bytes.saturating_add(d.len() as u64);
                if bytes > self.limits[idx] {
                    let limit = self.limits[idx];
                    self.held[idx] = Some(too_large(
                        self.instances[idx],
                        &format_args!("a part of more than {limit} bytes"),
                    ));
                    return PartState::Skipping;
                }
                if !d.is_empty() {
                    hasher.update(d);
                }
                PartState::Hashing { idx, hasher, bytes }
            }
            other => other,
        }
    }

    fn decide(&mut self, state: PartState) {
        if let PartState::Hashing { idx, hasher, .. } = state {
            let digest = hasher.finish();
            self.held[idx] = Some(compare_content(self.instances[idx], &digest));
        }
    }

    /// The part being hashed went over a limit: its instance is
    /// `Different`.
    fn current_too_large(&mut self, what: &dyn fmt::Display) {
        if let PartState::Hashing { idx, .. } = self.part {
            self.held[idx] = Some(too_large(self.instances[idx], what));
            self.part = PartState::Skipping;
        }
    }

    fn abandon(&mut self, why: String) {
        self.part = PartState::Idle;
        self.abandoned.get_or_insert(why);
    }
}

/// The SOP Instance UID in the first bytes `prefix` of a Part-10 file of
/// `total_len` bytes (at least `prefix.len()`), if they hold it.
fn sop_instance_uid(prefix: &[u8], total_len: u64) -> Option<String> {
    // What the pre-scan read before it stopped (at the end of the prefix,
    // by design) is all that is needed.
    identify(prefix, total_len, &PrescanLimits::default())
        .sop_instance_uid
        .filter(|u| !u.is_empty())
}

/// `inst` came back larger than it may: `Different`.
fn too_large(inst: &Instance, what: &dyn fmt::Display) -> Holding {
    Holding::Different {
        reason: format!(
            "the PACS returned more bytes than were sent for SOP Instance UID {} \
             ({what}; {} bytes sent, {RETRIEVE_SLACK_BYTES} more allowed for a \
             rewritten file meta group); not read further",
            inst.dicom.sop_instance_uid, inst.size
        ),
    }
}

/// Retrieve the whole `series` of `study` by one WADO-RS request and
/// decide each of `members` from it (see [`digest_series`]). `None` for a
/// member the answer did not decide: it is retrieved on its own.
///
/// # Errors
/// [`Error::Pacs`] (transient) when the request fails in transit or with
/// a transient status, or the answer breaks off; any other refusal or an
/// unusable answer leaves every member undecided.
async fn fetch_series(
    client: &DicomWebClient,
    study: &Uid,
    series: &Uid,
    members: &[&Instance],
) -> Result<Vec<Option<Holding>>> {
    let path = format!("studies/{study}/series/{series}");
    let resp = client
        .request(Method::GET, &path)?
        .header(ACCEPT, WADO_ACCEPT)
        .send()
        .await
        .map_err(|e| transport("WADO-RS", e))?;
    let status = resp.status();
    if is_transient_status(status) {
        return Err(status_error("WADO-RS", resp).await);
    }
    let fall_back = |why: &dyn fmt::Display| {
        tracing::debug!(
            %series,
            instances = members.len(),
            "WADO-RS of the series not used ({why}): retrieving instance by instance"
        );
        vec![None; members.len()]
    };
    if !status.is_success() || status == StatusCode::NO_CONTENT {
        return Ok(fall_back(&format_args!("HTTP {status}")));
    }
    let content_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = match multipart_boundary(content_type) {
        Ok(b) => b,
        Err(e) => return Ok(fall_back(&e)),
    };
    let digest = digest_series(resp.bytes_stream(), &boundary, members)
        .await
        .map_err(|e| naming(e, format_args!("Series Instance UID {series}")))?;
    if let Some(why) = &digest.abandoned {
        let undecided = digest.held.iter().filter(|h| h.is_none()).count();
        tracing::debug!(
            %series,
            undecided,
            "WADO-RS of the series abandoned ({why}): retrieving the rest instance by instance"
        );
    }
    Ok(digest.held)
}

impl fmt::Display for StowSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stow-rs:{}", self.client.base())
    }
}

/// What the QIDO-RS answers of `verify` say.
struct Located<'a> {
    /// Per instance, the series the PACS holds it in (in its own study).
    at: Vec<Option<Uid>>,
    /// The SOP Instance UIDs the PACS holds per (study, series).
    series_holds: HashMap<(&'a Uid, Uid), HashSet<String>>,
}

impl StowSink {
    /// A sink for the DICOMweb root in `config`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad URL or CA file.
    pub fn new(config: &DicomWebConfig) -> Result<Self> {
        Ok(Self {
            client: DicomWebClient::new(config)?,
            series_client: DicomWebClient::new_unpooled(config)?,
            batch_bytes: config.batch_bytes.max(1),
            batch_instances: config.batch_instances.max(1),
            verify: config.verify,
        })
    }

    /// Where the PACS holds each instance in its own study: the series
    /// (the sent one if listed there), by QIDO-RS, one query per study;
    /// and the SOP Instance UIDs each (study, series) holds.
    async fn locate<'a>(&self, instances: &'a [Instance]) -> Result<Located<'a>> {
        let mut in_study: HashMap<&Uid, HashMap<String, Vec<Uid>>> = HashMap::new();
        for inst in instances {
            let study = &inst.dicom.study_instance_uid;
            if in_study.contains_key(study) {
                continue;
            }
            let found = self
                .client
                .study_instances(study, &[tag::SOP_INSTANCE_UID, tag::SERIES_INSTANCE_UID])
                .await?;
            let mut series_of: HashMap<String, Vec<Uid>> = HashMap::new();
            for v in &found {
                if let Some(sop) = string_of(v, tag::SOP_INSTANCE_UID) {
                    // A series UID that is not a UID cannot be asked for:
                    // then the sent one is.
                    let series =
                        string_of(v, tag::SERIES_INSTANCE_UID).and_then(|s| Uid::parse(&s).ok());
                    series_of.entry(sop).or_default().extend(series);
                }
            }
            in_study.insert(study, series_of);
        }
        let at = instances
            .iter()
            .map(|i| {
                let series = in_study
                    .get(&i.dicom.study_instance_uid)?
                    .get(i.dicom.sop_instance_uid.as_str())?;
                let ours = &i.dicom.series_instance_uid;
                Some(
                    series
                        .iter()
                        .find(|s| *s == ours)
                        .or(series.first())
                        .unwrap_or(ours)
                        .clone(),
                )
            })
            .collect();
        let mut series_holds: HashMap<(&Uid, Uid), HashSet<String>> = HashMap::new();
        for (study, series_of) in in_study {
            for (sop, series) in series_of {
                for s in series {
                    series_holds
                        .entry((study, s))
                        .or_default()
                        .insert(sop.clone());
                }
            }
        }
        Ok(Located { at, series_holds })
    }

    /// The other studies holding each of `sops` (QIDO-RS across studies).
    async fn elsewhere(&self, sops: &[&Uid]) -> Result<HashMap<String, Vec<String>>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        if sops.is_empty() {
            return Ok(out);
        }
        let found = self
            .client
            .instances_with_uids(sops, &[tag::SOP_INSTANCE_UID, tag::STUDY_INSTANCE_UID])
            .await?;
        for v in &found {
            if let (Some(sop), Some(study)) = (
                string_of(v, tag::SOP_INSTANCE_UID),
                string_of(v, tag::STUDY_INSTANCE_UID),
            ) {
                out.entry(sop).or_default().push(study);
            }
        }
        Ok(out)
    }

    /// Retrieve `inst` from `series` by WADO-RS and compare its content.
    async fn retrieve(&self, inst: &Instance, series: &Uid) -> Result<Holding> {
        let sop = &inst.dicom.sop_instance_uid;
        let path = format!(
            "studies/{}/series/{series}/instances/{sop}",
            inst.dicom.study_instance_uid
        );
        let resp = self
            .client
            .request(Method::GET, &path)?
            .header(ACCEPT, WADO_ACCEPT)
            .send()
            .await
            .map_err(|e| transport("WADO-RS", e))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::NO_CONTENT {
            // Listed by QIDO-RS, gone now (or never retrievable): not held.
            return Ok(Holding::Absent);
        }
        if status == StatusCode::NOT_ACCEPTABLE {
            return Err(Error::pacs_permanent(
                "WADO-RS: HTTP 406, the PACS cannot return instances as stored \
                 (transfer-syntax=*); verify = \"presence\" only checks the UID"
                    .to_owned(),
                None,
            ));
        }
        if !status.is_success() {
            return Err(status_error("WADO-RS", resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let boundary = multipart_boundary(content_type).map_err(|e| {
            Error::pacs_permanent(
                format!(
                    "WADO-RS of SOP Instance UID {sop}: {e}; \
                     verify = \"presence\" only checks the UID"
                ),
                None,
            )
        })?;
        let retrieved = digest_single_part(
            resp.bytes_stream(),
            &boundary,
            retrieve_limits(inst.size),
            inst.data_set_sha256.is_none(),
        )
        .await
        .map_err(|e| naming(e, format_args!("SOP Instance UID {sop}")))?;
        Ok(match retrieved {
            Retrieved::Nothing => Holding::Absent,
            Retrieved::One(digest) => compare_content(inst, &digest),
            Retrieved::Refused(FramingError::TooManyParts { .. }) => Holding::Different {
                reason: format!(
                    "the PACS returned more than one object for SOP Instance UID {sop}"
                ),
            },
            Retrieved::Refused(e) => too_large(inst, &e),
        })
    }

    /// Retrieve the whole `series` of `study` by one WADO-RS request and
    /// decide each of `members` from it (see [`fetch_series`]), on a
    /// thread of its own with a single-threaded runtime.
    ///
    /// Why a thread: Orthanc ends a multipart answer by closing the
    /// connection (no length, not chunked), and hyper hands such a body
    /// on in pieces of 8 KiB, each passed from the connection's task to
    /// the reader's. On a multi-threaded runtime each hand-off may cross
    /// threads: measured against Orthanc on two cores, 105 MB of series
    /// took 0.31–0.43 s to drain that way and 0.04–0.07 s on a runtime
    /// of one thread (as fast as curl). The thread stops when `verify` is
    /// dropped.
    async fn retrieve_series(
        &self,
        study: &Uid,
        series: &Uid,
        members: &[&Instance],
    ) -> Result<Vec<Option<Holding>>> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let owned: Vec<Instance> = members.iter().map(|i| (*i).clone()).collect();
        let (client, st, se) = (self.series_client.clone(), study.clone(), series.clone());
        // The caller's span, so the thread's log lines say whose they are.
        let span = tracing::Span::current();
        let work = move || {
            let mut tx = tx;
            let answer = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let answer = rt.block_on(async {
                        let refs: Vec<&Instance> = owned.iter().collect();
                        let fetch =
                            std::pin::pin!(fetch_series(&client, &st, &se, &refs).instrument(span));
                        match futures::future::select(fetch, tx.cancellation()).await {
                            futures::future::Either::Left((answer, _)) => Some(answer),
                            // `verify` was dropped: stop.
                            futures::future::Either::Right(_) => None,
                        }
                    });
                    // Its connections end with it, before the answer is
                    // handed on.
                    drop(rt);
                    answer
                }
                Err(e) => Some(Err(Error::pacs_transient(
                    "WADO-RS: no runtime for the series retrieval".to_owned(),
                    Some(Box::new(e)),
                ))),
            };
            if let Some(answer) = answer {
                let _ = tx.send(answer);
            }
        };
        match std::thread::Builder::new()
            .name("relaypacs-wado-series".to_owned())
            .spawn(work)
        {
            Ok(_) => rx.await.unwrap_or_else(|_| {
                Err(Error::pacs_transient(
                    "WADO-RS: the series retrieval ended without an answer".to_owned(),
                    None,
                ))
            }),
            // No thread to be had: on this runtime, slower.
            Err(_) => fetch_series(&self.client, study, series, members).await,
        }
    }

    /// Split into requests of at most `batch_bytes` (an instance larger
    /// than that goes alone) and `batch_instances`.
    fn batches<'a>(&self, instances: &'a [Instance]) -> Vec<&'a [Instance]> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0u64);
        for (i, inst) in instances.iter().enumerate() {
            let n = i - start;
            if n > 0 && (bytes + inst.size > self.batch_bytes || n >= self.batch_instances) {
                out.push(&instances[start..i]);
                start = i;
                bytes = 0;
            }
            bytes += inst.size;
        }
        if start < instances.len() {
            out.push(&instances[start..]);
        }
        out
    }

    /// One STOW-RS request for `batch`. `Err` of kind Pacs means the whole
    /// request failed; any other `Err` comes from the source.
    async fn post(
        &self,
        batch: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<Vec<(Uid, InstanceOutcome)>> {
        let boundary = format!("relaypacs-{:032x}", rand::random::<u128>());
        let head = Bytes::from(format!(
            "--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
        ));
        let tail = Bytes::from(format!("--{boundary}--\r\n"));
        let length: u64 = batch
            .iter()
            .map(|i| head.len() as u64 + i.size + 2)
            .sum::<u64>()
            + tail.len() as u64;
        // The body is fed through a small channel so the source (borrowed,
        // not 'static) can be read in this task while reqwest sends.
        let (mut tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(4);
        let producer = async move {
            for inst in batch {
                let mut sent = 0u64;
                let mut body = source.open(inst).await?;
                if tx.send(Ok(head.clone())).await.is_err() {
                    return Ok(());
                }
                loop {
                    match body.next().await {
                        Some(Ok(b)) => {
                            sent += b.len() as u64;
                            if tx.send(Ok(b)).await.is_err() {
                                return Ok(()); // the request ended early; its answer says why
                            }
                        }
                        Some(Err(e)) => {
                            // Abort the request: the PACS sees a torn body
                            // and stores nothing of this instance.
                            let _ = tx.send(Err(std::io::Error::other("source failed"))).await;
                            return Err(e);
                        }
                        None => break,
                    }
                }
                if sent != inst.size {
                    let _ = tx.send(Err(std::io::Error::other("length mismatch"))).await;
                    return Err(Error::Integrity(IntegrityError::ChunkLength {
                        offset: 0,
                        expected: inst.size,
                        actual: sent,
                    }));
                }
                if tx.send(Ok(Bytes::from_static(b"\r\n"))).await.is_err() {
                    return Ok(());
                }
            }
            let _ = tx.send(Ok(tail)).await;
            Ok(())
        };
        let request = async {
            self.client
                .request(Method::POST, "studies")?
                .header(
                    CONTENT_TYPE,
                    format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
                )
                .header(ACCEPT, "application/dicom+json")
                .header(CONTENT_LENGTH, length)
                .body(reqwest::Body::wrap_stream(rx))
                .send()
                .await
                .map_err(|e| transport("STOW-RS", e))
        };
        let (produced, response) = tokio::join!(producer, request);
        produced?;
        let resp = response?;
        let status = resp.status();
        if !matches!(
            status,
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::CONFLICT
        ) {
            return Err(status_error("STOW-RS", resp).await);
        }
        let body = resp.bytes().await.map_err(|e| transport("STOW-RS", e))?;
        let answer = parse_store_response(&body, &DicomJsonLimits::default()).map_err(|e| {
            Error::pacs_transient(
                format!("STOW-RS answered {status} with a body that is not DICOM JSON: {e}"),
                None,
            )
        })?;
        Ok(outcomes_of(batch, status, &answer))
    }
}

/// What a PS3.18 Store Instances Response says about each SOP Instance
/// UID it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreResponse {
    /// Referenced SOP Sequence (0008,1199): stored, with the item's
    /// Warning Reason (0008,1196) if any.
    pub referenced: HashMap<String, Option<u64>>,
    /// Failed SOP Sequence (0008,1198): not stored, with the item's
    /// Failure Reason (0008,1197) if any.
    pub failed: HashMap<String, Option<u64>>,
    /// The response's own Warning Reason.
    pub warning: Option<u64>,
}

impl StoreResponse {
    /// Read a parsed response: an object, or a one-element array (some
    /// servers); anything else names nothing. An item is named by its
    /// Referenced SOP Instance UID (0008,1155), else its SOP Instance UID.
    pub fn from_json(json: &Value) -> Self {
        let obj = match json {
            Value::Array(a) => a.first().unwrap_or(&Value::Null),
            v => v,
        };
        let uid_of = |item: &Value| {
            string_of(item, tag::REFERENCED_SOP_INSTANCE_UID)
                .or_else(|| string_of(item, tag::SOP_INSTANCE_UID))
        };
        Self {
            referenced: items_of(obj, tag::REFERENCED_SOP_SEQUENCE)
                .iter()
                .filter_map(|i| Some((uid_of(i)?, number_of(i, tag::WARNING_REASON))))
                .collect(),
            failed: items_of(obj, tag::FAILED_SOP_SEQUENCE)
                .iter()
                .filter_map(|i| Some((uid_of(i)?, number_of(i, tag::FAILURE_REASON))))
                .collect(),
            warning: number_of(obj, tag::WARNING_REASON),
        }
    }
}

/// Parse the body of a STOW-RS answer (DICOM JSON; an empty body names
/// nothing) within `limits`.
///
/// # Errors
/// [`DicomJsonError`] for a body over the limits or not JSON.
pub fn parse_store_response(
    body: &[u8],
    limits: &DicomJsonLimits,
) -> std::result::Result<StoreResponse, DicomJsonError> {
    Ok(parse_dicom_json(body, limits)?
        .map(|json| StoreResponse::from_json(&json))
        .unwrap_or_default())
}

/// Per-instance outcomes from a PS3.18 STOW-RS response body.
#[cfg(test)]
fn outcomes(batch: &[Instance], status: StatusCode, json: &Value) -> Vec<(Uid, InstanceOutcome)> {
    outcomes_of(batch, status, &StoreResponse::from_json(json))
}

/// Per-instance outcomes from a parsed PS3.18 STOW-RS response: named as
/// failed → its Failure Reason decides; referenced → stored (with its
/// warning, or the response's); not named → refused by a 409, else a
/// transient failure (silence is not success).
fn outcomes_of(
    batch: &[Instance],
    status: StatusCode,
    answer: &StoreResponse,
) -> Vec<(Uid, InstanceOutcome)> {
    let StoreResponse {
        referenced,
        failed,
        warning: top_warning,
    } = answer;
    let top_warning = *top_warning;
    batch
        .iter()
        .map(|inst| {
            let uid = inst.dicom.sop_instance_uid.clone();
            let outcome = if let Some(code) = failed.get(uid.as_str()) {
                failure(*code)
            } else if let Some(w) = referenced.get(uid.as_str()) {
                match w.or(top_warning) {
                    Some(code) => InstanceOutcome::Warning {
                        reason: format!("STOW-RS warning 0x{code:04X} ({})", warning_text(code)),
                    },
                    None => InstanceOutcome::Stored,
                }
            } else if status == StatusCode::CONFLICT {
                InstanceOutcome::Failed {
                    transient: false,
                    reason: "STOW-RS: HTTP 409 Conflict, nothing stored".into(),
                }
            } else {
                // "Stored" needs the PACS's word for it; silence is not success.
                InstanceOutcome::Failed {
                    transient: true,
                    reason: format!("STOW-RS: HTTP {status} did not reference this instance"),
                }
            };
            (uid, outcome)
        })
        .collect()
}

/// Outcome of a Failure Reason (0008,1197), PS3.18 Table 10.5.3-3 and
/// PS3.4 Annex B.
fn failure(code: Option<u64>) -> InstanceOutcome {
    let Some(code) = code else {
        return InstanceOutcome::Failed {
            transient: false,
            reason: "STOW-RS: failed without a Failure Reason".into(),
        };
    };
    let (transient, text) = match code {
        // The PACS already holds this instance: delivery is idempotent.
        0x0111 => return InstanceOutcome::AlreadyPresent,
        0xA700..=0xA7FF => (true, "out of resources"),
        0x0110 => (false, "processing failure"),
        0x0112 => (false, "no such object instance"),
        0x0117 => (false, "invalid object instance"),
        0x0122 => (false, "SOP class not supported"),
        0x0124 => (false, "not authorized"),
        0xA900..=0xA9FF => (false, "data set does not match SOP class"),
        0xC122 => (false, "transfer syntax not supported"),
        0xC000..=0xCFFF => (false, "cannot understand"),
        _ => (false, "refused"),
    };
    InstanceOutcome::Failed {
        transient,
        reason: format!("STOW-RS failure 0x{code:04X} ({text})"),
    }
}

fn warning_text(code: u64) -> &'static str {
    match code {
        0xB000 => "coercion of data elements",
        0xB006 => "elements discarded",
        0xB007 => "data set does not match SOP class",
        _ => "warning",
    }
}

#[async_trait]
impl PacsSink for StowSink {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        let mut report = DeliveryReport::default();
        let mut gave_up: Option<(bool, String)> = None;
        for batch in self.batches(instances) {
            if let Some((transient, reason)) = &gave_up {
                report.outcomes.extend(batch.iter().map(|i| {
                    let outcome = InstanceOutcome::Failed {
                        transient: *transient,
                        reason: reason.clone(),
                    };
                    (i.dicom.sop_instance_uid.clone(), outcome)
                }));
                continue;
            }
            match self.post(batch, source).await {
                Ok(o) => report.outcomes.extend(o),
                Err(Error::Pacs {
                    transient,
                    reason,
                    retry_after,
                    ..
                }) => {
                    report.retry_after = report.retry_after.max(retry_after);
                    report.outcomes.extend(batch.iter().map(|i| {
                        let outcome = InstanceOutcome::Failed {
                            transient,
                            reason: reason.clone(),
                        };
                        (i.dicom.sop_instance_uid.clone(), outcome)
                    }));
                    // A PACS that is down or refuses the request as such
                    // (credentials, media type) would answer the next batch
                    // the same way: do not hammer it.
                    gave_up = Some((transient, reason));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        let Located { at, series_holds } = self.locate(instances).await?;
        let missing: Vec<&Uid> = instances
            .iter()
            .zip(&at)
            .filter(|(_, at)| at.is_none())
            .map(|(i, _)| &i.dicom.sop_instance_uid)
            .collect();
        let elsewhere = self.elsewhere(&missing).await?;
        let mut held = vec![Holding::Absent; instances.len()];
        // The instances to retrieve, grouped by where the PACS holds them,
        // in order of first appearance.
        let mut series_order: Vec<(&Uid, &Uid)> = Vec::new();
        let mut members: HashMap<(&Uid, &Uid), Vec<usize>> = HashMap::new();
        for (k, (inst, at)) in instances.iter().zip(&at).enumerate() {
            let sop = &inst.dicom.sop_instance_uid;
            let ours = inst.dicom.study_instance_uid.as_str();
            match (at, self.verify) {
                (None, _) => {
                    let other = elsewhere
                        .get(sop.as_str())
                        .and_then(|studies| studies.iter().find(|s| *s != ours));
                    if let Some(other) = other {
                        held[k] = Holding::Different {
                            reason: format!(
                                "the PACS holds SOP Instance UID {sop} in another study, \
                                 Study Instance UID {other}, not in {ours} as sent"
                            ),
                        };
                    }
                }
                (Some(_), VerifyMode::Presence) => {
                    held[k] = Holding::Same {
                        verification: Verification::PresenceOnly,
                    };
                }
                (Some(series), VerifyMode::Content) => {
                    let key = (&inst.dicom.study_instance_uid, series);
                    members
                        .entry(key)
                        .or_insert_with(|| {
                            series_order.push(key);
                            Vec::new()
                        })
                        .push(k);
                }
            }
        }
        // One retrieval per series that holds exactly the instances being
        // verified (two or more); one per instance otherwise. Futures
        // built here, not in a stream combinator's closure, so the
        // async-trait future stays `Send`.
        let mut retrievals: Vec<BoxFuture<'_, Result<Vec<(usize, Option<Holding>)>>>> = Vec::new();
        for key in &series_order {
            let ks = members.remove(key).unwrap_or_default();
            let (study, series) = *key;
            let sops: HashSet<&str> = ks
                .iter()
                .map(|&k| instances[k].dicom.sop_instance_uid.as_str())
                .collect();
            let exactly = sops.len() == ks.len()
                && ks.len() >= 2
                && series_holds
                    .get(&(study, series.clone()))
                    .is_some_and(|holds| {
                        holds.len() == sops.len() && sops.iter().all(|s| holds.contains(*s))
                    });
            if exactly {
                retrievals.push(
                    async move {
                        let group: Vec<&Instance> = ks.iter().map(|&k| &instances[k]).collect();
                        let got = self.retrieve_series(study, series, &group).await?;
                        Ok(ks.into_iter().zip(got).collect())
                    }
                    .boxed(),
                );
            } else {
                for k in ks {
                    retrievals.push(
                        async move {
                            let h = self.retrieve(&instances[k], series).await?;
                            Ok(vec![(k, Some(h))])
                        }
                        .boxed(),
                    );
                }
            }
        }
        let retrieved: Vec<Vec<(usize, Option<Holding>)>> = futures::stream::iter(retrievals)
            .buffered(RETRIEVALS_IN_FLIGHT)
            .try_collect()
            .await?;
        // What a series answer left undecided is retrieved on its own.
        let mut again: Vec<BoxFuture<'_, Result<(usize, Holding)>>> = Vec::new();
        for (k, h) in retrieved.into_iter().flatten() {
            match h {
                Some(h) => held[k] = h,
                None => {
                    let Some(series) = at[k].as_ref() else {
                        continue;
                    };
                    again.push(
                        async move { self.retrieve(&instances[k], series).await.map(|h| (k, h)) }
                            .boxed(),
                    );
                }
            }
        }
        let retrieved: Vec<(usize, Holding)> = futures::stream::iter(again)
            .buffered(RETRIEVALS_IN_FLIGHT)
            .try_collect()
            .await?;
        for (k, h) in retrieved {
            held[k] = h;
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn batch(n: usize) -> Vec<Instance> {
        let (_, insts) = relaypacs_core::testing::pacs_sink::study(n).unwrap();
        insts
    }

    fn item(uid: &Uid, tag_: &str, code: Option<u64>) -> Value {
        let mut v = serde_json::json!({
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
            "00081155": {"vr": "UI", "Value": [uid.as_str()]},
        });
        if let Some(c) = code {
            v[tag_] = serde_json::json!({"vr": "US", "Value": [c]});
        }
        v
    }

    /// PS3.18 §10.5.3: a 202 names what was stored (with or without a
    /// warning) and what failed; each instance gets its own outcome.
    #[test]
    fn partial_success_is_read_per_instance() {
        let b = batch(4);
        let uid = |i: usize| &b[i].dicom.sop_instance_uid;
        let body = serde_json::json!({
            "00081199": {"vr": "SQ", "Value": [
                item(uid(0), tag::WARNING_REASON, None),
                item(uid(1), tag::WARNING_REASON, Some(0xB000)),
            ]},
            "00081198": {"vr": "SQ", "Value": [
                item(uid(2), tag::FAILURE_REASON, Some(0xA700)),
                item(uid(3), tag::FAILURE_REASON, Some(0xC000)),
            ]},
        });
        let o = outcomes(&b, StatusCode::ACCEPTED, &body);
        assert_eq!(o[0].1, InstanceOutcome::Stored);
        assert!(matches!(&o[1].1, InstanceOutcome::Warning { reason } if reason.contains("B000")));
        assert!(matches!(
            o[2].1,
            InstanceOutcome::Failed {
                transient: true,
                ..
            }
        ));
        assert!(
            matches!(&o[3].1, InstanceOutcome::Failed { transient: false, reason } if reason.contains("C000"))
        );
        assert!(
            o.iter()
                .zip(&b)
                .all(|((u, _), i)| u == &i.dicom.sop_instance_uid)
        );
    }

    /// A 200 is not taken on trust: an instance it lists as failed, or does
    /// not mention, is not stored (the lesson of S3's CompleteMultipartUpload).
    #[test]
    fn a_200_that_says_failure_is_a_failure() {
        let b = batch(3);
        let body = serde_json::json!({
            "00081199": {"vr": "SQ", "Value": [item(&b[0].dicom.sop_instance_uid, tag::WARNING_REASON, None)]},
            "00081198": {"vr": "SQ", "Value": [item(&b[1].dicom.sop_instance_uid, tag::FAILURE_REASON, Some(0x0110))]},
        });
        let o = outcomes(&b, StatusCode::OK, &body);
        assert_eq!(o[0].1, InstanceOutcome::Stored);
        assert!(matches!(
            o[1].1,
            InstanceOutcome::Failed {
                transient: false,
                ..
            }
        ));
        assert!(matches!(
            o[2].1,
            InstanceOutcome::Failed {
                transient: true,
                ..
            }
        ));
        let empty = outcomes(&b, StatusCode::OK, &Value::Null);
        assert!(empty.iter().all(|(_, o)| !o.is_delivered()));
    }

    /// A 409 without per-instance detail refuses the whole request.
    #[test]
    fn a_409_refuses_everything_permanently() {
        let b = batch(2);
        let o = outcomes(&b, StatusCode::CONFLICT, &Value::Null);
        assert!(o.iter().all(|(_, o)| matches!(
            o,
            InstanceOutcome::Failed {
                transient: false,
                ..
            }
        )));
    }

    #[test]
    fn duplicates_are_already_present() {
        let b = batch(1);
        let body = serde_json::json!({
            "00081198": {"vr": "SQ", "Value": [item(&b[0].dicom.sop_instance_uid, tag::FAILURE_REASON, Some(0x0111))]},
        });
        assert_eq!(
            outcomes(&b, StatusCode::CONFLICT, &body)[0].1,
            InstanceOutcome::AlreadyPresent
        );
    }

    #[test]
    fn failure_reasons_are_classified() {
        assert_eq!(failure(Some(0x0111)), InstanceOutcome::AlreadyPresent);
        assert!(matches!(
            failure(Some(0xA701)),
            InstanceOutcome::Failed {
                transient: true,
                ..
            }
        ));
        for code in [0x0110, 0x0122, 0xA900, 0xC000, 0xC122] {
            assert!(matches!(
                failure(Some(code)),
                InstanceOutcome::Failed {
                    transient: false,
                    ..
                }
            ));
        }
    }

    fn wado_body(parts: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        for p in parts {
            b.extend_from_slice(b"--B\r\nContent-Type: application/dicom\r\n\r\n");
            b.extend_from_slice(p);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--B--\r\n");
        b
    }

    fn stream_of(
        b: Vec<u8>,
        piece: usize,
    ) -> impl Stream<Item = std::result::Result<Bytes, std::io::Error>> {
        let pieces: Vec<_> = b.chunks(piece).map(Bytes::copy_from_slice).collect();
        futures::stream::iter(pieces.into_iter().map(Ok))
    }

    /// The retrieved part is hashed as it streams and compared with the
    /// one rule: the same file is the same, another pixel seed is not.
    #[tokio::test]
    async fn a_retrieved_part_is_compared_by_content() {
        use relaypacs_core::testing::dicom_gen::{DicomSpec, generate};
        let spec = DicomSpec::default();
        let sent = generate(&spec).unwrap();
        let summary =
            relaypacs_core::dicom::validate_dicom(&sent, sent.len() as u64, &Default::default())
                .unwrap();
        let key = relaypacs_core::FileKey {
            session: relaypacs_core::SessionId::random(),
            file: relaypacs_core::FileId::random(),
        };
        let inst = Instance::of_bytes(key, &sent, summary);
        let other = generate(&DicomSpec { seed: 7, ..spec }).unwrap();
        for (held, same) in [(&sent, true), (&other, false)] {
            let body = stream_of(wado_body(&[held]), 777);
            let got = digest_single_part(body, "B", retrieve_limits(inst.size), true)
                .await
                .unwrap();
            let Retrieved::One(digest) = got else {
                panic!("{got:?}")
            };
            let h = compare_content(&inst, &digest);
            assert_eq!(h.is_same(), same, "{h:?}");
            if !same {
                assert!(
                    matches!(&h, Holding::Different { reason } if reason.contains(inst.dicom.sop_instance_uid.as_str())),
                    "{h:?}"
                );
            }
        }
    }

    /// An answer larger than allowed is refused once over the limit:
    /// the stream (64 MiB, made on demand) is not read to its end.
    #[tokio::test]
    async fn a_retrieval_larger_than_allowed_is_refused_without_reading_it_all() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let pulled = AtomicU64::new(0);
        let piece = 64usize << 10;
        let head = Bytes::from_static(b"--B\r\nContent-Type: application/dicom\r\n\r\n");
        let body = futures::stream::iter(0..1024).map(|i| {
            let b = if i == 0 {
                head.clone()
            } else {
                Bytes::from(vec![0u8; piece])
            };
            pulled.fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok::<_, std::io::Error>(b)
        });
        let sent = 1u64 << 20;
        let got = digest_single_part(body, "B", retrieve_limits(sent), true)
            .await
            .unwrap();
        assert!(
            matches!(got, Retrieved::Refused(FramingError::PartTooLarge { limit }) if limit == sent + RETRIEVE_SLACK_BYTES),
            "{got:?}"
        );
        let read = pulled.load(Ordering::Relaxed);
        assert!(
            read <= sent + RETRIEVE_SLACK_BYTES + 2 * piece as u64,
            "{read} bytes read"
        );
    }

    #[tokio::test]
    async fn more_than_one_part_none_or_a_torn_body() {
        let limits = retrieve_limits(100);
        let two = wado_body(&[b"one", b"two"]);
        assert!(matches!(
            digest_single_part(stream_of(two, 5), "B", limits, true)
                .await
                .unwrap(),
            Retrieved::Refused(FramingError::TooManyParts { limit: 1 })
        ));
        assert!(matches!(
            digest_single_part(stream_of(wado_body(&[]), 5), "B", limits, true)
                .await
                .unwrap(),
            Retrieved::Nothing
        ));
        let mut torn = wado_body(&[b"one"]);
        torn.truncate(torn.len() - 10);
        let e = digest_single_part(stream_of(torn, 5), "B", limits, true)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        let other = b"--B\r\nContent-Type: application/json\r\n\r\n{}\r\n--B--".to_vec();
        let e = digest_single_part(stream_of(other, 5), "B", limits, true)
            .await
            .unwrap_err();
        assert!(!e.is_retryable(), "{e:?}");
    }

    /// A series of generated instances: (bytes, instance) each, with
    /// `rows` x `rows` pixels of 16 bits.
    fn series_of(n: usize, rows: u16) -> Vec<(Vec<u8>, Instance)> {
        use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
        let (study, series) = (new_uid(), new_uid());
        (0..n)
            .map(|i| {
                let bytes = generate(&DicomSpec {
                    study_uid: study.clone(),
                    series_uid: series.clone(),
                    rows,
                    cols: rows,
                    seed: i as u64,
                    ..DicomSpec::default()
                })
                .unwrap();
                let inst = of_bytes(&bytes);
                (bytes, inst)
            })
            .collect()
    }

    fn of_bytes(bytes: &[u8]) -> Instance {
        let summary =
            relaypacs_core::dicom::validate_dicom(bytes, bytes.len() as u64, &Default::default())
                .unwrap();
        let key = relaypacs_core::FileKey {
            session: relaypacs_core::SessionId::random(),
            file: relaypacs_core::FileId::random(),
        };
        Instance::of_bytes(key, bytes, summary)
    }

    /// `bytes` under another pixel seed, same UIDs.
    fn other_object_of(bytes: &[u8], seed: u64) -> Vec<u8> {
        use relaypacs_core::testing::dicom_gen::{DicomSpec, generate};
        let d = of_bytes(bytes).dicom;
        let rows = if bytes.len() > 100 << 10 { 256 } else { 64 };
        generate(&DicomSpec {
            study_uid: d.study_instance_uid.to_string(),
            series_uid: d.series_instance_uid.to_string(),
            sop_instance_uid: d.sop_instance_uid.to_string(),
            rows,
            cols: rows,
            seed,
            ..DicomSpec::default()
        })
        .unwrap()
    }

    async fn series_digest(parts: &[&[u8]], piece: usize, insts: &[&Instance]) -> SeriesDigest {
        digest_series(stream_of(wado_body(parts), piece), "B", insts)
            .await
            .unwrap()
    }

    const CONTENT: Holding = Holding::Same {
        verification: Verification::Content,
    };

    /// Parts come in any order and are matched by the SOP Instance UID
    /// read from their first bytes (small parts read at their end, large
    /// ones once enough bytes arrived); each is compared by content, a
    /// different object under one of the UIDs is `Different`, and an
    /// instance whose data set digest is unknown is decided by the whole
    /// file. Any piece size.
    #[tokio::test]
    async fn series_parts_in_any_order_are_matched_by_uid() {
        let mut small = series_of(3, 64);
        let big = series_of(2, 256);
        small[2].1.data_set_sha256 = None;
        let files: Vec<&(Vec<u8>, Instance)> = small.iter().chain(&big).collect();
        let insts: Vec<&Instance> = files.iter().map(|(_, i)| i).collect();
        let planted = other_object_of(&files[1].0, 99);
        // Reversed, with a different object under the second UID.
        let parts: Vec<&[u8]> = vec![&files[4].0, &files[3].0, &files[2].0, &planted, &files[0].0];
        for piece in [1000, 4096, 65536 + 17, 1 << 20] {
            let got = series_digest(&parts, piece, &insts).await;
            assert_eq!(got.abandoned, None, "piece {piece}");
            let held: Vec<Holding> = got.held.into_iter().map(Option::unwrap).collect();
            assert_eq!(held[0], CONTENT, "piece {piece}");
            assert!(
                matches!(&held[1], Holding::Different { reason } if reason.contains(insts[1].dicom.sop_instance_uid.as_str())),
                "piece {piece}: {:?}",
                held[1]
            );
            assert_eq!(&held[2..], &[CONTENT; 3], "piece {piece}");
        }
    }

    /// A part larger than its instance's limit makes that instance
    /// `Different` and is skipped to its end; the others are still
    /// decided. Once the answer is larger than all the limits together the
    /// reading stops: what was not decided yet is left to retrievals of
    /// its own.
    #[tokio::test]
    async fn a_series_part_too_large_is_different() {
        let small = series_of(2, 64);
        let big = series_of(1, 256);
        let insts = [&small[0].1, &small[1].1, &big[0].1];
        let padded = [small[0].0.clone(), vec![0u8; 100 << 10]].concat();
        let got = series_digest(&[&padded, &small[1].0, &big[0].0], 4096, &insts).await;
        assert_eq!(got.abandoned, None);
        assert!(
            matches!(&got.held[0], Some(Holding::Different { reason }) if reason.contains("more bytes than were sent") && reason.contains(insts[0].dicom.sop_instance_uid.as_str())),
            "{:?}",
            got.held[0]
        );
        assert_eq!(got.held[1..], [Some(CONTENT), Some(CONTENT)]);

        // Over every limit: refused there, the rest left undecided.
        let huge = [small[1].0.clone(), vec![0u8; 1 << 20]].concat();
        let got = series_digest(&[&small[0].0, &huge, &big[0].0], 4096, &insts).await;
        assert!(
            got.abandoned
                .as_deref()
                .is_some_and(|a| a.contains("limits together")),
            "{:?}",
            got.abandoned
        );
        assert_eq!(got.held[0], Some(CONTENT));
        assert!(
            matches!(&got.held[1], Some(Holding::Different { reason }) if reason.contains("more bytes than were sent")),
            "{:?}",
            got.held[1]
        );
        assert_eq!(got.held[2], None);
    }

    /// A part of an instance not being verified ends the use of the
    /// answer: what it decided before stays, the rest is left to
    /// retrievals of their own. So does a part whose UID repeats one
    /// (that instance is undecided again), a part that is not Part-10 (its
    /// UID cannot be read, short or long) and a part of another type.
    #[tokio::test]
    async fn an_unknown_repeated_or_unreadable_part_abandons_the_series_answer() {
        let files = series_of(3, 64);
        let stranger = series_of(1, 64);
        let insts: Vec<&Instance> = files.iter().map(|(_, i)| i).collect();
        let (a, b, c) = (&files[0].0[..], &files[1].0[..], &files[2].0[..]);
        let got = series_digest(&[a, &stranger[0].0, b, c], 1000, &insts).await;
        let why = got.abandoned.unwrap();
        assert!(
            why.contains(stranger[0].1.dicom.sop_instance_uid.as_str()),
            "{why}"
        );
        assert_eq!(got.held, [Some(CONTENT), None, None]);

        let got = series_digest(&[a, b, a, c], 1000, &insts).await;
        assert!(got.abandoned.unwrap().contains("two parts"));
        assert_eq!(got.held, [None, Some(CONTENT), None]);

        let junk = vec![7u8; 3000];
        let long_junk = vec![7u8; 200 << 10];
        for bad in [&junk[..], &long_junk[..], &a[..100]] {
            let got = series_digest(&[a, bad, b, c], 1000, &insts).await;
            assert!(
                got.abandoned
                    .as_deref()
                    .is_some_and(|w| w.contains("SOP Instance UID")),
                "{:?}",
                got.abandoned
            );
            assert_eq!(got.held, [Some(CONTENT), None, None]);
        }

        let mut body = b"--B\r\nContent-Type: application/json\r\n\r\n{}\r\n".to_vec();
        body.extend_from_slice(&wado_body(&[a]));
        let got = digest_series(stream_of(body, 100), "B", &insts)
            .await
            .unwrap();
        assert!(got.abandoned.unwrap().contains("application/json"));
        assert_eq!(got.held, [None, None, None]);
    }

    /// An instance the answer does not contain is not `Absent` on its
    /// word: it is left to a retrieval of its own. An empty answer
    /// decides nothing.
    #[tokio::test]
    async fn a_missing_instance_is_left_to_its_own_retrieval() {
        let files = series_of(3, 64);
        let insts: Vec<&Instance> = files.iter().map(|(_, i)| i).collect();
        let got = series_digest(&[&files[2].0, &files[0].0], 777, &insts).await;
        assert_eq!(got.abandoned, None);
        assert_eq!(got.held, [Some(CONTENT), None, Some(CONTENT)]);
        let got = series_digest(&[], 777, &insts).await;
        assert_eq!(got.abandoned, None);
        assert_eq!(got.held, [None, None, None]);
    }

    /// A body that breaks off is a transient failure, as for one instance;
    /// more parts than instances stop the reading (all are decided by
    /// then).
    #[tokio::test]
    async fn a_torn_series_answer_is_transient() {
        let files = series_of(2, 64);
        let insts: Vec<&Instance> = files.iter().map(|(_, i)| i).collect();
        let mut torn = wado_body(&[&files[0].0, &files[1].0]);
        torn.truncate(torn.len() - 3000);
        let e = digest_series(stream_of(torn, 1000), "B", &insts)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        let got = series_digest(&[&files[0].0, &files[1].0, &files[0].0], 1000, &insts).await;
        assert_eq!(got.held, [Some(CONTENT), Some(CONTENT)]);
        assert!(got.abandoned.is_some());
    }

    /// A Deflated file's SOP Instance UID is read by inflating the part's
    /// first bytes: a small file is decided from the series answer; from
    /// a large one (the pre-scan does not read a cut-off deflate stream)
    /// the UID cannot be read, so the answer is left and every instance
    /// is retrieved on its own: slower, never wrong.
    #[tokio::test]
    async fn a_large_deflated_part_is_left_to_its_own_retrieval() {
        use relaypacs_core::testing::dicom_gen::{DicomSpec, TransferSyntax, generate};
        for (rows, decided) in [(64u16, true), (512, false)] {
            let files: Vec<Vec<u8>> = (0..2)
                .map(|seed| {
                    generate(&DicomSpec {
                        transfer_syntax: TransferSyntax::Deflated,
                        rows,
                        cols: rows,
                        seed,
                        ..DicomSpec::default()
                    })
                    .unwrap()
                })
                .collect();
            let insts: Vec<Instance> = files.iter().map(|f| of_bytes(f)).collect();
            let refs: Vec<&Instance> = insts.iter().collect();
            let got = series_digest(&[&files[1], &files[0]], 4096, &refs).await;
            if decided {
                assert_eq!(got.held, [Some(CONTENT), Some(CONTENT)], "{rows}");
            } else {
                assert_eq!(got.held, [None, None], "{rows}");
                assert!(got.abandoned.is_some());
            }
        }
    }
}

//! [`StowSink`]: delivery to a PACS by DICOMweb STOW-RS (PS3.18 §10.5),
//! verified by QIDO-RS (presence) and WADO-RS (content).

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt, TryStreamExt};
use relaypacs_core::dicom::{ContentDigest, Part10Hasher};
use relaypacs_core::{
    DeliveryReport, Error, Holding, Instance, InstanceOutcome, InstanceSource, IntegrityError,
    PacsSink, Result, Uid, Verification, VerifyMode, compare_content,
};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::dicomweb::{
    DicomWebClient, DicomWebConfig, FramingError, FramingLimits, MultipartReader, PartEvent,
    items_of, multipart_boundary, number_of, status_error, string_of, transport,
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
///
/// With [`VerifyMode::Presence`] a found instance is
/// `Same { PresenceOnly }`. A 404 from WADO-RS for an instance QIDO-RS
/// listed is `Absent`; other HTTP failures are classified as for STOW-RS.
#[derive(Clone, Debug)]
pub struct StowSink {
    client: DicomWebClient,
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

impl fmt::Display for StowSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stow-rs:{}", self.client.base())
    }
}

impl StowSink {
    /// A sink for the DICOMweb root in `config`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad URL or CA file.
    pub fn new(config: &DicomWebConfig) -> Result<Self> {
        Ok(Self {
            client: DicomWebClient::new(config)?,
            batch_bytes: config.batch_bytes.max(1),
            batch_instances: config.batch_instances.max(1),
            verify: config.verify,
        })
    }

    /// Where the PACS holds each instance in its own study: the series
    /// (the sent one if listed there), by QIDO-RS, one query per study.
    async fn locate(&self, instances: &[Instance]) -> Result<Vec<Option<Uid>>> {
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
        Ok(instances
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
            .collect())
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
        .map_err(|e| match e {
            Error::Pacs {
                transient,
                reason,
                retry_after,
                source,
            } => Error::Pacs {
                transient,
                reason: format!("{reason} (SOP Instance UID {sop})"),
                retry_after,
                source,
            },
            e => e,
        })?;
        Ok(match retrieved {
            Retrieved::Nothing => Holding::Absent,
            Retrieved::One(digest) => compare_content(inst, &digest),
            Retrieved::Refused(FramingError::TooManyParts { .. }) => Holding::Different {
                reason: format!(
                    "the PACS returned more than one object for SOP Instance UID {sop}"
                ),
            },
            Retrieved::Refused(e) => Holding::Different {
                reason: format!(
                    "the PACS returned more bytes than were sent for SOP Instance UID {sop} \
                     ({e}; {} bytes sent, {RETRIEVE_SLACK_BYTES} more allowed for a \
                     rewritten file meta group); not read further",
                    inst.size
                ),
            },
        })
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
        let json: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| {
                Error::pacs_transient(
                    format!("STOW-RS answered {status} with a body that is not DICOM JSON: {e}"),
                    None,
                )
            })?
        };
        Ok(outcomes(batch, status, &json))
    }
}

/// Per-instance outcomes from a PS3.18 STOW-RS response body.
fn outcomes(batch: &[Instance], status: StatusCode, json: &Value) -> Vec<(Uid, InstanceOutcome)> {
    // A response may be an object or a one-element array (some servers).
    let obj = match json {
        Value::Array(a) => a.first().unwrap_or(&Value::Null),
        v => v,
    };
    let uid_of = |item: &Value| {
        string_of(item, tag::REFERENCED_SOP_INSTANCE_UID)
            .or_else(|| string_of(item, tag::SOP_INSTANCE_UID))
    };
    let referenced: HashMap<String, Option<u64>> = items_of(obj, tag::REFERENCED_SOP_SEQUENCE)
        .iter()
        .filter_map(|i| Some((uid_of(i)?, number_of(i, tag::WARNING_REASON))))
        .collect();
    let failed: HashMap<String, Option<u64>> = items_of(obj, tag::FAILED_SOP_SEQUENCE)
        .iter()
        .filter_map(|i| Some((uid_of(i)?, number_of(i, tag::FAILURE_REASON))))
        .collect();
    let top_warning = number_of(obj, tag::WARNING_REASON);
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
        let located = self.locate(instances).await?;
        let missing: Vec<&Uid> = instances
            .iter()
            .zip(&located)
            .filter(|(_, at)| at.is_none())
            .map(|(i, _)| &i.dicom.sop_instance_uid)
            .collect();
        let elsewhere = self.elsewhere(&missing).await?;
        let mut held = vec![Holding::Absent; instances.len()];
        let mut to_retrieve = Vec::new();
        for (k, (inst, at)) in instances.iter().zip(&located).enumerate() {
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
                    // Futures built here, not in a stream combinator's
                    // closure, so the async-trait future stays `Send`.
                    to_retrieve
                        .push(async move { self.retrieve(inst, series).await.map(|h| (k, h)) });
                }
            }
        }
        let retrieved: Vec<(usize, Holding)> = futures::stream::iter(to_retrieve)
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
}

//! [`StowSink`]: delivery to a PACS by DICOMweb STOW-RS (PS3.18 §10.5),
//! verified by QIDO-RS.

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use relaypacs_core::{
    DeliveryReport, Error, Instance, InstanceOutcome, InstanceSource, IntegrityError, PacsSink,
    Result, Uid, Holding, Verification,
};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::dicomweb::{
    DicomWebClient, DicomWebConfig, items_of, number_of, status_error, string_of, transport,
};

/// DICOM JSON tags of the STOW-RS response.
mod tag {
    pub const SOP_INSTANCE_UID: &str = "00080018";
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
/// `verify` asks QIDO-RS which SOP instances the study holds.
#[derive(Clone, Debug)]
pub struct StowSink {
    client: DicomWebClient,
    batch_bytes: u64,
    batch_instances: usize,
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
        let mut held: HashMap<&Uid, std::collections::HashSet<String>> = HashMap::new();
        for inst in instances {
            let study = &inst.dicom.study_instance_uid;
            if held.contains_key(study) {
                continue;
            }
            let found = self
                .client
                .study_instances(study, &[tag::SOP_INSTANCE_UID])
                .await?;
            held.insert(
                study,
                found
                    .iter()
                    .filter_map(|v| string_of(v, tag::SOP_INSTANCE_UID))
                    .collect(),
            );
        }
        Ok(instances
            .iter()
            .map(|i| {
                if held
                    .get(&i.dicom.study_instance_uid)
                    .is_some_and(|s| s.contains(i.dicom.sop_instance_uid.as_str()))
                {
                    Holding::Same {
                        verification: Verification::PresenceOnly,
                    }
                } else {
                    Holding::Absent
                }
            })
            .collect())
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
}

//! STOW-RS ingest (PS3.18 §10.5): statuses and the DICOM JSON response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::Value;

fn multipart(parts: &[(&str, Vec<u8>)], boundary: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (ct, body) in parts {
        out.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn seq_len(v: &Value, tag: &str) -> usize {
    v[tag]["Value"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn stow_statuses_and_response() {
    let t = TestServer::start().await;
    let u = t.user("zed", Role::Uploader).await;
    let study = new_uid();
    let a = dicom(Some(&study), 64);
    let b = dicom(Some(&study), 80);
    // All stored: 200 with ReferencedSOPSequence.
    let r = t.stow(&u, "/dicomweb/studies", stow_body(&[&a, &b])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/dicom+json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 2);
    assert_eq!(v["00081199"]["Value"][0]["00081155"]["vr"], "UI");
    // Accepted durably; delivered (to the archive sink) by the worker.
    t.wait_notifications(&u, 1).await;
    let archived = snapshot(&t.data().join("archive").join(&study));
    assert_eq!(archived.len(), 2, "both instances archived");
    // Some stored: 202 with FailedSOPSequence and a reason.
    let c = dicom(None, 64);
    let r = t
        .stow(&u, "/dicomweb/studies", stow_body(&[&c, &[0u8; 500]]))
        .await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 1);
    assert_eq!(seq_len(&v, "00081198"), 1);
    assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC000);
    // None stored: 409.
    let r = t
        .stow(&u, "/dicomweb/studies", stow_body(&[&[1u8; 300]]))
        .await;
    assert_eq!(r.status(), 409);
    // Target study mismatch: A900 for that instance.
    let other = dicom(None, 64);
    let r = t
        .stow(
            &u,
            &format!("/dicomweb/studies/{study}"),
            stow_body(&[&other]),
        )
        .await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xA900);
    // Duplicate SOP instance in one request: 0111 for the second.
    let r = t.stow(&u, "/dicomweb/studies", stow_body(&[&a, &a])).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 1, "{v}");
    // Wrong media type: 415.
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom+xml\"; boundary=XyZ",
        )
        .body(multipart(
            &[("application/dicom+xml", b"<x/>".to_vec())],
            "XyZ",
        ))
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "RELAY_UNSUPPORTED_MEDIA_TYPE").await;
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header("content-type", "application/dicom")
        .body(a)
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "RELAY_UNSUPPORTED_MEDIA_TYPE").await;
    // Malformed multipart: 400 and nothing kept. (First let the worker
    // deliver the two accepted requests.)
    t.wait_notifications(&u, 2).await;
    let before = snapshot(&t.data().join("archive"));
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=XyZ",
        )
        .body(format!(
            "--XyZ\r\nContent-Type: application/dicom\r\n\r\n{}",
            "x".repeat(100)
        ))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "RELAY_BAD_MULTIPART").await;
    assert_eq!(snapshot(&t.data().join("archive")), before);
    // Unauthenticated: 401.
    let r = t
        .http
        .post(format!("{}/dicomweb/studies", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    t.stop().await;
}

/// A file of `study` with SOP Instance UID `sop`; `seed` varies its pixels.
fn instance(study: &str, sop: &str, seed: u64) -> Vec<u8> {
    generate(&DicomSpec {
        study_uid: study.to_owned(),
        sop_instance_uid: sop.to_owned(),
        seed,
        ..DicomSpec::default()
    })
    .unwrap()
}

fn uid_of(item: &Value, tag: &str) -> Option<String> {
    item[tag]["Value"][0].as_str().map(str::to_owned)
}

fn comment_of(item: &Value) -> String {
    assert_eq!(item["00000902"]["vr"], "LO", "{item}");
    item["00000902"]["Value"][0].as_str().unwrap().to_owned()
}

fn warnings(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Failed SOP Sequence items reference the instance whenever it could be
/// read, carry the specific Failure Reason and say why in Error Comment;
/// each failure is also a `Warning` header field.
#[tokio::test]
async fn stow_failures_reference_uids_and_reasons() {
    let t = TestServer::start().await;
    let u = t.user("ola", Role::Uploader).await;
    let study = new_uid();
    let (sop_a, sop_b) = (new_uid(), new_uid());
    let a = instance(&study, &sop_a, 1);
    let b = instance(&study, &sop_b, 2);
    // An unsupported transfer syntax: same length as Explicit VR LE.
    let mut odd_ts = instance(&study, &new_uid(), 3);
    let at = odd_ts
        .windows(19)
        .position(|w| w == b"1.2.840.10008.1.2.1")
        .unwrap();
    odd_ts[at..at + 19].copy_from_slice(b"1.2.840.10008.1.2.9");
    // The same instance twice in one request, garbage, an unsupported
    // transfer syntax, and another valid instance.
    let r = t
        .stow(
            &u,
            "/dicomweb/studies",
            stow_body(&[&a, &a, &[0u8; 500], &odd_ts, &b]),
        )
        .await;
    assert_eq!(r.status(), 202);
    let headers = warnings(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 2, "{v}");
    assert_eq!(seq_len(&v, "00081198"), 3, "{v}");
    let failed = v["00081198"]["Value"].as_array().unwrap();
    // Duplicate in the request: 0x0111, both UIDs, the UID named.
    let dup = &failed[0];
    assert_eq!(dup["00081197"]["Value"][0], 0x0111, "{dup}");
    assert_eq!(dup["00081197"]["vr"], "US");
    assert_eq!(uid_of(dup, "00081155").as_deref(), Some(sop_a.as_str()));
    assert_eq!(
        uid_of(dup, "00081150").as_deref(),
        Some("1.2.840.10008.5.1.4.1.1.7")
    );
    let c = comment_of(dup);
    assert!(
        c.contains("RELAY_DUPLICATE_INSTANCE") && c.contains(&sop_a),
        "{c}"
    );
    // Nothing readable: 0xC000 and no UIDs.
    let junk = &failed[1];
    assert_eq!(junk["00081197"]["Value"][0], 0xC000, "{junk}");
    assert!(junk.get("00081150").is_none() && junk.get("00081155").is_none());
    assert!(comment_of(junk).starts_with("RELAY_DICOM"), "{junk}");
    // Unsupported transfer syntax: 0xC122.
    let ts = &failed[2];
    assert_eq!(ts["00081197"]["Value"][0], 0xC122, "{ts}");
    assert!(comment_of(ts).contains("TRANSFER_SYNTAX"), "{ts}");
    // Every failure is a Warning header field too, status code first.
    assert_eq!(headers.len(), 3, "{headers:?}");
    assert!(
        headers[0].starts_with("299 relaypacs \"0111 "),
        "{headers:?}"
    );
    assert!(headers[0].contains(&sop_a), "{headers:?}");
    assert!(
        headers[1].starts_with("299 relaypacs \"C000 "),
        "{headers:?}"
    );
    assert!(
        headers[2].starts_with("299 relaypacs \"C122 "),
        "{headers:?}"
    );
    // Stored cleanly: no Warning Reason.
    for item in v["00081199"]["Value"].as_array().unwrap() {
        assert!(item.get("00081196").is_none(), "{item}");
    }

    // Another study than the URL names: 0xA900 with the UIDs, whether it
    // comes first (checked against the URL) or after an instance of the
    // right study (the session holds that study).
    let other = new_uid();
    let (sop_d, sop_e) = (new_uid(), new_uid());
    let r = t
        .stow(
            &u,
            &format!("/dicomweb/studies/{study}"),
            stow_body(&[&instance(&other, &sop_d, 4)]),
        )
        .await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    let item = &v["00081198"]["Value"][0];
    assert_eq!(item["00081197"]["Value"][0], 0xA900, "{item}");
    assert_eq!(uid_of(item, "00081155").as_deref(), Some(sop_d.as_str()));
    assert!(uid_of(item, "00081150").is_some(), "{item}");
    let c = comment_of(item);
    assert!(c.contains(&other) && c.contains(&study), "{c}");
    let r = t
        .stow(
            &u,
            &format!("/dicomweb/studies/{study}"),
            stow_body(&[
                &instance(&study, &new_uid(), 5),
                &instance(&other, &sop_e, 6),
            ]),
        )
        .await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 1, "{v}");
    let item = &v["00081198"]["Value"][0];
    assert_eq!(item["00081197"]["Value"][0], 0xA900, "{item}");
    assert_eq!(uid_of(item, "00081155").as_deref(), Some(sop_e.as_str()));
    assert!(comment_of(item).contains("RELAY_STUDY_MISMATCH"), "{item}");
    // The refused instance left the gateway: it can be sent again to its
    // own study.
    let r = t
        .stow(
            &u,
            &format!("/dicomweb/studies/{other}"),
            stow_body(&[&instance(&other, &sop_e, 6)]),
        )
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    t.stop().await;
}

/// A SOP Instance UID accepted in an earlier request with other content
/// is refused with 0x0111, naming the UID and the earlier study.
#[tokio::test]
async fn stow_conflict_across_requests_names_uid_and_earlier_study() {
    let t = TestServer::start().await;
    let u = t.user("pim", Role::Uploader).await;
    let (first_study, second_study, sop) = (new_uid(), new_uid(), new_uid());
    let r = t
        .stow(
            &u,
            "/dicomweb/studies",
            stow_body(&[&instance(&first_study, &sop, 1)]),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = t
        .stow(
            &u,
            "/dicomweb/studies",
            stow_body(&[&instance(&second_study, &sop, 2)]),
        )
        .await;
    assert_eq!(r.status(), 409);
    let headers = warnings(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 0, "{v}");
    let item = &v["00081198"]["Value"][0];
    assert_eq!(item["00081197"]["Value"][0], 0x0111, "{item}");
    assert_eq!(uid_of(item, "00081155").as_deref(), Some(sop.as_str()));
    assert!(uid_of(item, "00081150").is_some(), "{item}");
    let c = comment_of(item);
    assert!(c.contains("RELAY_INSTANCE_CONFLICT"), "{c}");
    assert!(c.contains(&sop) && c.contains(&first_study), "{c}");
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert!(
        headers[0].starts_with("299 relaypacs \"0111 ") && headers[0].contains(&first_study),
        "{headers:?}"
    );
    t.stop().await;
}

/// Stored with warnings: 202, the item in Referenced SOP Sequence with a
/// Warning Reason and the warning in words; 200 only when all is clean.
#[tokio::test]
async fn stow_warnings_are_202_with_warning_reason() {
    let t = TestServer::start().await;
    let u = t.user("rue", Role::Uploader).await;
    let (study, sop) = (new_uid(), new_uid());
    let a = instance(&study, &sop, 1);
    let r = t.stow(&u, "/dicomweb/studies", stow_body(&[&a])).await;
    assert_eq!(r.status(), 200);
    assert!(warnings(&r).is_empty());
    // The same instance again, in a later request: an idempotent success
    // with a warning pointing at the earlier study (B006).
    let r = t.stow(&u, "/dicomweb/studies", stow_body(&[&a])).await;
    assert_eq!(r.status(), 202);
    let headers = warnings(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081198"), 0, "{v}");
    let item = &v["00081199"]["Value"][0];
    assert_eq!(uid_of(item, "00081155").as_deref(), Some(sop.as_str()));
    assert_eq!(item["00081196"]["vr"], "US");
    assert_eq!(item["00081196"]["Value"][0], 0xB006, "{item}");
    let c = comment_of(item);
    assert!(
        c.contains("accepted before with the same content") && c.contains(&study),
        "{c}"
    );
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert!(
        headers[0].starts_with("299 relaypacs \"B006 "),
        "{headers:?}"
    );
    // A validation warning (Patient ID absent, Type 2): B007.
    let no_pid = generate(&DicomSpec {
        omit_patient_id: true,
        ..DicomSpec::default()
    })
    .unwrap();
    let r = t.stow(&u, "/dicomweb/studies", stow_body(&[&no_pid])).await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    let item = &v["00081199"]["Value"][0];
    assert_eq!(item["00081196"]["Value"][0], 0xB007, "{item}");
    assert!(comment_of(item).contains("PatientID"), "{item}");
    // Every instance accepted is delivered (to the archive sink).
    t.wait_notifications(&u, 3).await;
    t.stop().await;
}

/// A request of one instance (the common STOW-RS client: one POST per
/// instance) is stored and queued by one write: its session enters the
/// outbox with one "queued" record, after the part's own records, and is
/// delivered. A request whose last part joins others, and one naming its
/// study in the URL, still complete the session after their parts.
#[tokio::test]
async fn stow_one_instance_is_queued_with_its_part() {
    use relaypacs_core::{AuditAction, AuditOutcome};
    let t = TestServer::start().await;
    let u = t.user("una", Role::Uploader).await;
    let queued = |events: &[relaypacs_core::AuditEvent], study: &str| {
        events
            .iter()
            .filter(|e| {
                e.action == AuditAction::ForwardStarted
                    && e.outcome == AuditOutcome::Success
                    && e.detail.starts_with("queued")
                    && e.study.as_ref().map(|s| s.as_str()) == Some(study)
            })
            .count()
    };
    // One part.
    let study = new_uid();
    let one = dicom(Some(&study), 64);
    let r = t.stow(&u, "/dicomweb/studies", stow_body(&[&one])).await;
    assert_eq!(r.status(), 200);
    t.wait_notifications(&u, 1).await;
    assert_eq!(
        snapshot(&t.data().join("archive").join(&study)).len(),
        1,
        "the instance was delivered"
    );
    let events = t.audit().await;
    assert_eq!(queued(&events, &study), 1, "one queued record");
    let completed = events
        .iter()
        .position(|e| e.action == AuditAction::FileCompleted)
        .unwrap();
    let queued_at = events
        .iter()
        .position(|e| e.action == AuditAction::ForwardStarted)
        .unwrap();
    assert!(completed < queued_at, "queued before its file completed");
    // A refused part, then a good one: the good one is the session's only
    // file and queues it.
    let study2 = new_uid();
    let two = dicom(Some(&study2), 64);
    let r = t
        .stow(&u, "/dicomweb/studies", stow_body(&[&[0u8; 400], &two]))
        .await;
    assert_eq!(r.status(), 202);
    t.wait_notifications(&u, 2).await;
    assert_eq!(queued(&t.audit().await, &study2), 1);
    // Three parts: the last is not the only file; the session is
    // completed after it, once.
    let study3 = new_uid();
    let parts: Vec<Vec<u8>> = (0..3).map(|_| dicom(Some(&study3), 64)).collect();
    let r = t
        .stow(
            &u,
            "/dicomweb/studies",
            stow_body(&[&parts[0], &parts[1], &parts[2]]),
        )
        .await;
    assert_eq!(r.status(), 200);
    t.wait_notifications(&u, 3).await;
    assert_eq!(queued(&t.audit().await, &study3), 1);
    assert_eq!(snapshot(&t.data().join("archive").join(&study3)).len(), 3);
    // The study in the URL: completed after the part, once.
    let study4 = new_uid();
    let four = dicom(Some(&study4), 64);
    let r = t
        .stow(
            &u,
            &format!("/dicomweb/studies/{study4}"),
            stow_body(&[&four]),
        )
        .await;
    assert_eq!(r.status(), 200);
    t.wait_notifications(&u, 4).await;
    assert_eq!(queued(&t.audit().await, &study4), 1);
}

/// A STOW-RS request's session is written with its first part: at the
/// owner's cap of open sessions the request is refused (429, JSON naming
/// the cap) and leaves no session, file or chunk; a request whose every
/// part is refused before the pipeline (not DICOM by its type) leaves no
/// session either; below the cap the instance is stored in one session.
#[tokio::test]
async fn stow_sessions_hold_the_cap_and_leave_nothing_when_refused() {
    let t = TestServer::start_with(|c| c.http.max_open_sessions_per_user = 1).await;
    let u = t.user("ivy", Role::Uploader).await;
    let count = |table: &'static str| {
        let data = t.data();
        async move {
            common::state_rows(
                &data,
                &format!("SELECT CAST(COUNT(*) AS TEXT) FROM {table}"),
            )
            .await[0][0]
                .clone()
        }
    };
    let open = t.new_study(&u).await;
    let study = new_uid();
    let one = stow_body(&[&dicom(Some(&study), 64)]);
    let r = t.stow(&u, "/dicomweb/studies", one.clone()).await;
    expect_error(r, 429, "RELAY_TOO_MANY_SESSIONS").await;
    assert_eq!(
        count("sessions").await,
        "1",
        "only the open study's session"
    );
    assert_eq!(count("session_files").await, "0");
    assert_eq!(count("chunks").await, "0");
    // Every part refused before the pipeline: 409, no session written.
    let body = multipart(&[("text/plain", b"not an instance".to_vec())], "XyZ");
    let r = t.stow(&u, "/dicomweb/studies", body).await;
    assert_eq!(r.status(), 409);
    assert_eq!(count("sessions").await, "1");
    // Below the cap: stored and delivered.
    let r = t
        .req(Method::DELETE, &format!("/api/v1/studies/{open}"), &u)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = t.stow(&u, "/dicomweb/studies", one).await;
    assert_eq!(r.status(), 200);
    t.wait_notifications(&u, 1).await;
    assert_eq!(snapshot(&t.data().join("archive").join(&study)).len(), 1);
}

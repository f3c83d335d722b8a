//! Files refused for their content (tus): they leave their study with
//! their bytes, the study stays open, an empty study cannot be completed
//! (and is ended), the index of accepted instances (same content again is
//! a success with a warning, other content a 409 naming the UID), and what
//! the study view and the notification say about verification.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::testing::faults::FaultyPacsSink;
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::Value;

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

async fn study_json(t: &TestServer, u: &User, id: &str) -> reqwest::Response {
    t.req(Method::GET, &format!("/api/v1/studies/{id}"), u)
        .send()
        .await
        .unwrap()
}

async fn complete(t: &TestServer, u: &User, id: &str) -> reqwest::Response {
    t.req(Method::POST, &format!("/api/v1/studies/{id}/complete"), u)
        .send()
        .await
        .unwrap()
}

async fn head_status(t: &TestServer, u: &User, upload: &str) -> u16 {
    t.req(Method::HEAD, upload, u)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Where the chunk store keeps an upload's bytes.
fn stored_path(t: &TestServer, upload: &str) -> PathBuf {
    let id = upload.trim_start_matches("/files/");
    let (session, file) = id.split_at(32);
    t.data()
        .join("chunks")
        .join(session)
        .join(format!("{file}.data"))
}

/// How many chunk records the state database (the server's SQLite file,
/// opened beside it) holds for an upload.
async fn chunk_records(t: &TestServer, upload: &str) -> usize {
    use relaypacs_core::{FileId, SessionId, SessionStore};
    let id = upload.trim_start_matches("/files/");
    let (session, file) = id.split_at(32);
    let url = format!("sqlite://{}", t.data().join("state.db").display());
    let db = relaypacs_storage::SqlState::connect(&url, None, &Default::default())
        .await
        .unwrap();
    let store = relaypacs_storage::SqlSessionStore::new(db.clone());
    let n = store
        .chunks(
            SessionId::parse(session).unwrap(),
            FileId::parse(file).unwrap(),
        )
        .await
        .unwrap()
        .len();
    db.close().await;
    n
}

/// A file refused at its last PATCH leaves the study with its bytes and
/// chunk records; the upload is forgotten (HEAD 404), the study stays
/// open and takes another valid file, and completes.
#[tokio::test]
async fn tus_refused_file_leaves_the_study_with_its_bytes() {
    let t = TestServer::start().await;
    let u = t.user("ada", Role::Uploader).await;
    let sid = t.new_study(&u).await;
    let study = new_uid();
    t.upload(&u, &sid, &instance(&study, &new_uid(), 1)).await;
    // Not DICOM, in two PATCHes: bytes are stored after the first.
    let junk = vec![7u8; 100_000];
    let up = t.create_upload(&u, &sid, junk.len() as u64, None).await;
    let first = 65_536;
    let r = t.patch(&u, &up, 0, junk[..first].to_vec(), None).await;
    assert_eq!(r.status(), 204);
    let data = stored_path(&t, &up);
    assert!(data.exists(), "{}", data.display());
    assert_eq!(chunk_records(&t, &up).await, 1);
    let r = t
        .patch(&u, &up, first as u64, junk[first..].to_vec(), None)
        .await;
    let v = expect_error(r, 422, "RELAY_DICOM_NOT_DICOM").await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("removed"), "{msg}");
    // Gone: the upload, its bytes and its chunk records.
    assert_eq!(head_status(&t, &u, &up).await, 404);
    assert!(!data.exists(), "refused bytes kept at {}", data.display());
    assert_eq!(chunk_records(&t, &up).await, 0, "chunk records kept");
    // The study stays open with its valid file, and takes another.
    let r = study_json(&t, &u, &sid).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"]["state"], "open", "{v}");
    assert_eq!(v["files"].as_array().unwrap().len(), 1, "{v}");
    t.upload(&u, &sid, &instance(&study, &new_uid(), 2)).await;
    let r = complete(&t, &u, &sid).await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    t.wait_notifications(&u, 1).await;
    let archived = snapshot(&t.data().join("archive").join(&study));
    assert_eq!(archived.len(), 2, "{archived:?}");
    t.stop().await;
}

/// The same SOP Instance UID twice in one study: the second is refused
/// (409 RELAY_DUPLICATE_INSTANCE) and removed; another study with other
/// content under a UID accepted before: 409 RELAY_INSTANCE_CONFLICT
/// naming the UID and the earlier study.
#[tokio::test]
async fn tus_duplicate_and_conflict_are_409_naming_the_uid() {
    let t = TestServer::start().await;
    let u = t.user("bea", Role::Uploader).await;
    let (study, sop) = (new_uid(), new_uid());
    let a = instance(&study, &sop, 1);
    let first = t.new_study(&u).await;
    t.upload(&u, &first, &a).await;
    let up = t.create_upload(&u, &first, a.len() as u64, Some(&a)).await;
    let r = t
        .patch(&u, &up, 0, a.clone(), Some(sha256_header(&a)))
        .await;
    let v = expect_error(r, 409, "RELAY_DUPLICATE_INSTANCE").await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&sop),
        "{v}"
    );
    assert_eq!(head_status(&t, &u, &up).await, 404);
    let v: Value = study_json(&t, &u, &first).await.json().await.unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 1, "{v}");
    // Other content under the same UID, in another study.
    let second = t.new_study(&u).await;
    let b = instance(&new_uid(), &sop, 2);
    let up = t.create_upload(&u, &second, b.len() as u64, Some(&b)).await;
    let r = t
        .patch(&u, &up, 0, b.clone(), Some(sha256_header(&b)))
        .await;
    let v = expect_error(r, 409, "RELAY_INSTANCE_CONFLICT").await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&sop) && msg.contains(&study), "{msg}");
    assert_eq!(head_status(&t, &u, &up).await, 404);
    // The second study stays open (empty) for other files.
    let v: Value = study_json(&t, &u, &second).await.json().await.unwrap();
    assert_eq!(v["state"]["state"], "open", "{v}");
    assert_eq!(v["files"].as_array().unwrap().len(), 0, "{v}");
    t.stop().await;
}

/// Completing a study whose only file was refused answers 422
/// RELAY_SESSION_EMPTY and ends the study (GET 404); a file still
/// uploading keeps answering 409 RELAY_UPLOAD_INCOMPLETE.
#[tokio::test]
async fn complete_with_only_a_refused_file_is_422_and_ends_the_study() {
    let t = TestServer::start().await;
    let u = t.user("cyd", Role::Uploader).await;
    let sid = t.new_study(&u).await;
    // A file still uploading: 409, the study untouched.
    let partial = t.create_upload(&u, &sid, 1000, None).await;
    expect_error(complete(&t, &u, &sid).await, 409, "RELAY_UPLOAD_INCOMPLETE").await;
    assert_eq!(study_json(&t, &u, &sid).await.status(), 200);
    // Its bytes turn out not to be DICOM: refused and removed.
    let r = t.patch(&u, &partial, 0, vec![3u8; 1000], None).await;
    assert_eq!(r.status(), 422);
    let v: Value = study_json(&t, &u, &sid).await.json().await.unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 0, "{v}");
    // Nothing left to deliver: 422, and the study is gone.
    expect_error(complete(&t, &u, &sid).await, 422, "RELAY_SESSION_EMPTY").await;
    assert_eq!(study_json(&t, &u, &sid).await.status(), 404);
    assert!(!t.data().join("chunks").join(&sid).exists());
    t.stop().await;
}

/// The same instance (same data set) in a later study is an idempotent
/// success: valid, with a warning pointing at the earlier study, and the
/// archive is not written twice.
#[tokio::test]
async fn tus_same_content_in_a_later_study_is_a_success_with_a_warning() {
    let t = TestServer::start().await;
    let u = t.user("dov", Role::Uploader).await;
    let (study, sop) = (new_uid(), new_uid());
    let a = instance(&study, &sop, 1);
    let first = t.new_study(&u).await;
    t.upload(&u, &first, &a).await;
    assert_eq!(complete(&t, &u, &first).await.status(), 202);
    t.wait_notifications(&u, 1).await;
    let second = t.new_study(&u).await;
    t.upload(&u, &second, &a).await;
    let v: Value = study_json(&t, &u, &second).await.json().await.unwrap();
    let file = &v["files"][0];
    assert_eq!(file["state"], "valid", "{v}");
    let w = file["warnings"][0].as_str().unwrap();
    assert!(
        w.contains("accepted before with the same content") && w.contains(&study),
        "{w}"
    );
    assert_eq!(file["dicom"]["warnings"], file["warnings"], "{v}");
    assert_eq!(complete(&t, &u, &second).await.status(), 202);
    let list = t.wait_notifications(&u, 2).await;
    assert_eq!(list[1]["kind"], "delivered", "{list:?}");
    let archived = snapshot(&t.data().join("archive").join(&study));
    assert_eq!(archived.len(), 1, "{archived:?}");
    t.stop().await;
}

/// After delivery to the local archive (content verification) the study
/// shows each file's warnings and verification, the delivered state's
/// `verified`, and the notification says the content was verified.
#[tokio::test]
async fn study_view_shows_warnings_and_content_verification() {
    let t = TestServer::start().await;
    let u = t.user("eve", Role::Uploader).await;
    let study = new_uid();
    let plain = instance(&study, &new_uid(), 1);
    let no_pid = generate(&DicomSpec {
        study_uid: study.clone(),
        omit_patient_id: true,
        ..DicomSpec::default()
    })
    .unwrap();
    let sid = t.new_study(&u).await;
    t.upload(&u, &sid, &plain).await;
    t.upload(&u, &sid, &no_pid).await;
    let v: Value = study_json(&t, &u, &sid).await.json().await.unwrap();
    for f in v["files"].as_array().unwrap() {
        assert!(f["verification"].is_null(), "{f}");
    }
    assert!(v["delivery"]["verified"].is_null(), "{v}");
    assert_eq!(complete(&t, &u, &sid).await.status(), 202);
    let list = t.wait_notifications(&u, 1).await;
    assert_eq!(list[0]["kind"], "delivered");
    assert_eq!(
        list[0]["message"],
        "study delivered: the PACS holds all 2 instance(s), content verified"
    );
    assert_eq!(list[0]["verified"], "content");
    let v: Value = study_json(&t, &u, &sid).await.json().await.unwrap();
    assert_eq!(v["state"]["state"], "delivered", "{v}");
    assert_eq!(v["state"]["verified"], "content", "{v}");
    assert_eq!(v["delivery"]["verified"], "content", "{v}");
    assert_eq!(v["delivery"]["confirmed_instances"], 2, "{v}");
    assert_eq!(v["delivery"]["confirmed_presence_only"], 0, "{v}");
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    let mut warned = 0;
    for f in files {
        assert_eq!(f["verification"], "content", "{f}");
        let w = f["warnings"].as_array().unwrap();
        if !w.is_empty() {
            warned += 1;
            assert!(w[0].as_str().unwrap().contains("PatientID"), "{f}");
        }
    }
    assert_eq!(warned, 1, "{v}");
    t.stop().await;
}

/// Delivered with presence-only verification: the notification does not
/// read as a plain "delivered", and the study shows it per instance.
#[tokio::test]
async fn presence_only_delivery_is_shown_as_such() {
    let t = TestServer::start_adapted(
        |_| {},
        |mut a| {
            // A destination that can report presence only: delivery is
            // delegated, every held instance is answered presence-only.
            let sink = FaultyPacsSink::counting(a.sink);
            sink.verify_presence_only(true);
            a.sink = Arc::new(sink);
            a
        },
    )
    .await;
    let u = t.user("fox", Role::Uploader).await;
    let study = new_uid();
    let sid = t.new_study(&u).await;
    t.upload(&u, &sid, &instance(&study, &new_uid(), 1)).await;
    assert_eq!(complete(&t, &u, &sid).await.status(), 202);
    let list = t.wait_notifications(&u, 1).await;
    let msg = list[0]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("study delivered (verified: presence-only"),
        "{msg}"
    );
    assert!(!msg.contains("content verified"), "{msg}");
    assert_eq!(list[0]["verified"], "presence-only");
    let v: Value = study_json(&t, &u, &sid).await.json().await.unwrap();
    assert_eq!(v["state"]["verified"], "presence-only", "{v}");
    assert_eq!(v["delivery"]["verified"], "presence-only", "{v}");
    assert_eq!(v["delivery"]["confirmed_presence_only"], 1, "{v}");
    assert_eq!(v["files"][0]["verification"], "presence-only", "{v}");
    t.stop().await;
}

/// `[ingest]` reaches the pipeline: `duplicates = "accept"` takes other
/// content under a known UID with a warning, `require_patient_id = true`
/// refuses a file without Patient ID.
#[tokio::test]
async fn ingest_config_sets_the_duplicate_policy_and_the_patient_id_rule() {
    use relaypacs_core::pipeline::DuplicatePolicy;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("relaypacs.toml");
    std::fs::write(
        &path,
        "[ingest]\nduplicates = \"accept\"\nrequire_patient_id = true\n",
    )
    .unwrap();
    let c = relaypacs_http::Config::load(Some(&path)).unwrap();
    let p = c.pipeline();
    assert_eq!(p.duplicates, DuplicatePolicy::Accept);
    assert!(p.dicom.require_patient_id);
    std::fs::write(&path, "[ingest]\nduplicates = \"maybe\"\n").unwrap();
    assert!(relaypacs_http::Config::load(Some(&path)).is_err());
    let d = relaypacs_http::Config::default().pipeline();
    assert_eq!(d.duplicates, DuplicatePolicy::Refuse);
    assert!(!d.dicom.require_patient_id);

    let t = TestServer::start_with(|c| {
        c.ingest.duplicates = DuplicatePolicy::Accept;
        c.ingest.require_patient_id = true;
    })
    .await;
    let u = t.user("gil", Role::Uploader).await;
    let (study, sop) = (new_uid(), new_uid());
    let first = t.new_study(&u).await;
    t.upload(&u, &first, &instance(&study, &sop, 1)).await;
    let second = t.new_study(&u).await;
    t.upload(&u, &second, &instance(&new_uid(), &sop, 2)).await;
    let v: Value = study_json(&t, &u, &second).await.json().await.unwrap();
    let w = v["files"][0]["warnings"][0].as_str().unwrap();
    assert!(w.contains("other content") && w.contains(&sop), "{w}");
    let no_pid = generate(&DicomSpec {
        omit_patient_id: true,
        ..DicomSpec::default()
    })
    .unwrap();
    let up = t
        .create_upload(&u, &second, no_pid.len() as u64, None)
        .await;
    let r = t.patch(&u, &up, 0, no_pid, None).await;
    expect_error(r, 422, "RELAY_DICOM_MISSING_ATTRIBUTE").await;
    t.stop().await;
}

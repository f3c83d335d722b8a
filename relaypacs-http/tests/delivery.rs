//! Delivery to a real Orthanc through the server: STOW-RS and C-STORE,
//! verified before "delivered", retried through PACS outages and gateway
//! restarts, dead letters and replay, and reports (FWD-1..3).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::time::Duration;

use common::{TestServer, User, dicom, fast_outbox, stow_sink};
use relaypacs_core::testing::dicom_gen::pdf_report;
use relaypacs_http::auth::Role;
use relaypacs_http::config::{CStoreSinkConfig, SinkConfig};
use relaypacs_test_peers::{Orthanc, OrthancOptions};
use reqwest::Method;
use serde_json::Value;

const REFUSE_ALL: &str =
    "function ReceivedInstanceFilter(dicom, origin, info)\n  return false\nend\n";

/// Poll the study until `pred` holds (or fail with its last state).
async fn wait_for(
    t: &TestServer,
    u: &User,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let timing = (Duration::from_secs(60), Duration::from_millis(100));
    t.wait_study(u, id, what, timing, pred).await
}

fn state_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["state"]["state"] == s
}

async fn notifications(t: &TestServer, u: &User, kind: &str) -> Vec<Value> {
    let r = t
        .req(Method::GET, "/api/v1/notifications", u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // Tests hold fewer notifications than one page.
    assert!(v["next"].is_null(), "{v}");
    let list = v["items"].as_array().cloned().unwrap();
    list.into_iter().filter(|n| n["kind"] == kind).collect()
}

/// Upload `n` instances of one new study and complete it (202, queued).
async fn upload_and_complete(t: &TestServer, u: &User, n: usize) -> (String, String, Vec<Vec<u8>>) {
    let sid = t.new_study(u).await;
    let first = dicom(None, 32);
    let study_uid =
        relaypacs_core::dicom::validate_dicom(&first, first.len() as u64, &Default::default())
            .unwrap()
            .study_instance_uid
            .to_string();
    let mut files = vec![first];
    for _ in 1..n {
        files.push(dicom(Some(&study_uid), 32));
    }
    for f in &files {
        t.upload(u, &sid, f).await;
    }
    let r = t
        .req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    (sid, study_uid, files)
}

fn sop_of(f: &[u8]) -> String {
    relaypacs_core::dicom::validate_dicom(f, f.len() as u64, &Default::default())
        .unwrap()
        .sop_instance_uid
        .to_string()
}

fn data_set(f: &[u8]) -> &[u8] {
    &f[relaypacs_core::dicom::data_set_offset(f).unwrap() as usize..]
}

/// An admin's (or anyone's) replay request for a dead letter.
async fn replay(t: &TestServer, u: &User, sid: &str) -> reqwest::Response {
    t.req(
        Method::POST,
        &format!("/api/v1/admin/dead-letters/{sid}/replay"),
        u,
    )
    .send()
    .await
    .unwrap()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_stow_delivers_byte_identical_and_notifies_after_verification() {
    let o = std::sync::Arc::new(blocking(Orthanc::start).await);
    let sink = stow_sink(&o, &o.password);
    let t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let (sid, _, files) = upload_and_complete(&t, &u, 3).await;
    let v = wait_for(&t, &u, &sid, "delivered", state_is("delivered")).await;
    assert_eq!(v["delivery"]["confirmed_instances"], 3, "{v:#}");
    for f in &files {
        let (o, sop) = (o.clone(), sop_of(f));
        let held = blocking(move || o.instance_file(&sop))
            .await
            .expect("Orthanc holds it");
        assert_eq!(&held, f, "byte-identical at the PACS");
    }
    assert_eq!(
        blocking({
            let o = o.clone();
            move || o.instance_count()
        })
        .await,
        3
    );
    assert_eq!(notifications(&t, &u, "delivered").await.len(), 1);
    let audit = t.audit().await;
    assert!(
        audit.iter().any(|e| e.detail.contains("verified")
            && e.session.map(|s| s.to_string()) == Some(sid.clone())),
        "a verified-delivery audit record"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_pacs_down_then_back_delivers_exactly_once() {
    let mut o = blocking(Orthanc::start).await;
    let sink = stow_sink(&o, &o.password);
    let t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    o.stop();
    let (sid, _, files) = upload_and_complete(&t, &u, 3).await;
    let v = wait_for(&t, &u, &sid, "two failed attempts", |v| {
        v["delivery"]["attempts"].as_u64() >= Some(2)
    })
    .await;
    assert_eq!(
        v["state"]["state"], "forwarding",
        "a PACS outage is retried: {v:#}"
    );
    assert!(
        v["delivery"]["last_error"]
            .as_str()
            .unwrap()
            .contains("connection"),
        "{v:#}"
    );
    assert!(notifications(&t, &u, "delivered").await.is_empty());
    let o = blocking(move || {
        o.start_again();
        o
    })
    .await;
    wait_for(&t, &u, &sid, "delivered", state_is("delivered")).await;
    let o = std::sync::Arc::new(o);
    assert_eq!(
        blocking({
            let o = o.clone();
            move || o.instance_count()
        })
        .await,
        files.len()
    );
    for f in &files {
        let (o, sop) = (o.clone(), sop_of(f));
        assert_eq!(&blocking(move || o.instance_file(&sop)).await.unwrap(), f);
    }
    // Exactly one notification, and it stays one.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(notifications(&t, &u, "delivered").await.len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_gateway_restart_with_a_pending_entry_delivers() {
    let mut o = blocking(Orthanc::start).await;
    let sink = stow_sink(&o, &o.password);
    let mut t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    o.stop();
    let (sid, _, files) = upload_and_complete(&t, &u, 2).await;
    wait_for(&t, &u, &sid, "a failed attempt", |v| {
        v["delivery"]["attempts"].as_u64() >= Some(1)
    })
    .await;
    // The gateway goes down with the entry pending; the PACS comes back
    // while it is down.
    t.restart(|_| {}).await;
    let o = blocking(move || {
        o.start_again();
        o
    })
    .await;
    wait_for(
        &t,
        &u,
        &sid,
        "delivered after restart",
        state_is("delivered"),
    )
    .await;
    assert_eq!(blocking(move || o.instance_count()).await, files.len());
    assert_eq!(notifications(&t, &u, "delivered").await.len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_permanent_rejection_dead_letters_at_once_and_replay_after_fix_delivers() {
    let o = blocking(Orthanc::start).await;
    let sink = stow_sink(&o, "a-wrong-password");
    let mut t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let admin = t.user("admin", Role::Admin).await;
    let (sid, _, files) = upload_and_complete(&t, &u, 2).await;
    let v = wait_for(&t, &u, &sid, "dead letter", state_is("dead_letter")).await;
    assert_eq!(v["delivery"]["attempts"], 1, "4xx is not retried: {v:#}");
    let reason = v["state"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("401"),
        "the PACS's reason is kept: {reason}"
    );
    assert_eq!(notifications(&t, &u, "forward_failed").await.len(), 1);
    assert!(notifications(&t, &u, "delivered").await.is_empty());

    // Dead letters are the admin's: listed with the reason; users get 403.
    let r = t
        .req(Method::GET, "/api/v1/admin/dead-letters", &u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = replay(&t, &u, &sid).await;
    assert_eq!(r.status(), 403);
    let r = t
        .req(Method::GET, "/api/v1/admin/dead-letters", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let list = page["items"].as_array().unwrap();
    assert!(
        list.iter()
            .any(|e| e["id"] == sid && e["last_error"].as_str().unwrap().contains("401"))
    );

    // The admin fixes the configuration and replays.
    let good = stow_sink(&o, &o.password);
    t.restart(|c| c.sinks = vec![good]).await;
    let admin = User {
        token: t.login("admin").await["access_token"]
            .as_str()
            .unwrap()
            .into(),
        ..admin
    };
    let r = replay(&t, &admin, &sid).await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    wait_for(
        &t,
        &u,
        &sid,
        "delivered after replay",
        state_is("delivered"),
    )
    .await;
    let o = std::sync::Arc::new(o);
    for f in &files {
        let (o, sop) = (o.clone(), sop_of(f));
        assert_eq!(&blocking(move || o.instance_file(&sop)).await.unwrap(), f);
    }
    let audit = t.audit().await;
    assert!(
        audit
            .iter()
            .any(|e| e.action == relaypacs_core::AuditAction::ForwardReplayed)
    );
    t.stop().await;
}

/// Orthanc's DICOMweb plugin answers 200 for instances its filter threw
/// away. The gateway does not believe it: QIDO shows they are missing, so
/// the study is never called delivered; after the retries it is a dead
/// letter, and once the PACS is fixed a replay delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_unverified_delivery_is_never_called_delivered() {
    let mut o = blocking(|| {
        Orthanc::start_with(OrthancOptions {
            lua: Some(REFUSE_ALL.into()),
        })
    })
    .await;
    let sink = stow_sink(&o, &o.password);
    let t = TestServer::start_with(|c| {
        fast_outbox(c, sink);
        c.outbox.max_attempts = 3;
    })
    .await;
    let u = t.user("clinic", Role::Uploader).await;
    let admin = t.user("admin", Role::Admin).await;
    let (sid, _, files) = upload_and_complete(&t, &u, 2).await;
    let v = wait_for(&t, &u, &sid, "dead letter", state_is("dead_letter")).await;
    assert_eq!(v["delivery"]["attempts"], 3);
    assert!(
        v["state"]["reason"]
            .as_str()
            .unwrap()
            .contains("does not hold 2 of 2"),
        "{v:#}"
    );
    assert!(notifications(&t, &u, "delivered").await.is_empty());
    let o2 = blocking(move || {
        o.stop();
        o.reconfigure(&OrthancOptions::default());
        o.start_again();
        o
    })
    .await;
    let r = replay(&t, &admin, &sid).await;
    assert_eq!(r.status(), 202);
    wait_for(&t, &u, &sid, "delivered", state_is("delivered")).await;
    assert_eq!(blocking(move || o2.instance_count()).await, files.len());
    assert_eq!(notifications(&t, &u, "delivered").await.len(), 1);
    t.stop().await;
}

/// FWD-3: a replay never forwards a file whose bytes changed at rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_replay_refuses_a_file_changed_at_rest() {
    let o = blocking(Orthanc::start).await;
    let sink = stow_sink(&o, "a-wrong-password");
    let t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let admin = t.user("admin", Role::Admin).await;
    let (sid, _, _) = upload_and_complete(&t, &u, 1).await;
    wait_for(&t, &u, &sid, "dead letter", state_is("dead_letter")).await;
    // Flip one byte of every stored chunk file.
    let mut flipped = 0;
    for e in walk(&t.data().join("chunks")) {
        let mut b = std::fs::read(&e).unwrap();
        if b.len() > 1000 {
            b[1000] ^= 0xFF;
            std::fs::write(&e, b).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0, "found the stored chunks");
    let r = replay(&t, &admin, &sid).await;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(
        body["error"]["code"].as_str().unwrap().contains("HASH"),
        "{body}"
    );
    let v = t.study_json(&u, &sid).await;
    assert_eq!(v["state"]["state"], "dead_letter");
    assert_eq!(blocking(move || o.instance_count()).await, 0);
    t.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_notify_the_uploader_and_only_they_can_fetch_them() {
    let o = std::sync::Arc::new(blocking(Orthanc::start).await);
    let sink = stow_sink(&o, &o.password);
    let t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let other = t.user("elsewhere", Role::Uploader).await;
    let (sid, study_uid, _) = upload_and_complete(&t, &u, 1).await;
    wait_for(&t, &u, &sid, "delivered", state_is("delivered")).await;
    assert!(
        notifications(&t, &u, "report_ready").await.is_empty(),
        "no report yet"
    );

    // The radiologist's system adds a PDF report to the study.
    let pdf = b"%PDF-1.4\n% report: no acute findings\n%%EOF\n".to_vec();
    let (sop, report) = pdf_report(&study_uid, "PAT0001", &pdf);
    blocking({
        let (o, report) = (o.clone(), report.clone());
        move || o.upload(&report)
    })
    .await;
    wait_for(&t, &u, &sid, "a report", |v| v["delivery"]["reports"] == 1).await;
    let ready = notifications(&t, &u, "report_ready").await;
    assert_eq!(ready.len(), 1);
    assert!(notifications(&t, &other, "report_ready").await.is_empty());

    let r = t
        .req(Method::GET, &format!("/api/v1/studies/{sid}/reports"), &u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Vec<Value> = r.json().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["sop_instance_uid"], sop);
    assert_eq!(list[0]["kind"], "encapsulated_pdf");
    let url = list[0]["url"].as_str().unwrap().to_owned();
    let r = t.req(Method::GET, &url, &u).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/dicom");
    let got = r.bytes().await.unwrap();
    assert_eq!(
        data_set(&got),
        data_set(&report),
        "the report as the PACS holds it"
    );

    // Another user: not found, for the list and for the file.
    for path in [format!("/api/v1/studies/{sid}/reports"), url.clone()] {
        let r = t.req(Method::GET, &path, &other).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let audit = t.audit().await;
    assert!(
        audit
            .iter()
            .any(|e| e.action == relaypacs_core::AuditAction::DataAccessed
                && e.detail.contains(&sop)
                && e.outcome == relaypacs_core::AuditOutcome::Success)
    );
    // The refused fetch is audited once (aggregated denials: a Security
    // Alert naming the actor, the attempt and the object), as a failure.
    let denied: Vec<_> = audit
        .iter()
        .filter(|e| {
            e.action == relaypacs_core::AuditAction::SecurityAlert
                && e.user == other.id
                && e.outcome != relaypacs_core::AuditOutcome::Success
                && e.detail.contains("denied read_report")
                && e.detail.contains(&format!("session {sid}"))
        })
        .collect();
    assert_eq!(denied.len(), 1, "{audit:#?}");
    assert!(
        !audit.iter().any(|e| e.user == other.id
            && e.outcome == relaypacs_core::AuditOutcome::Success
            && e.action == relaypacs_core::AuditAction::DataAccessed),
        "the other user accessed nothing"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd_cstore_delivers_byte_identical_data_sets() {
    let o = std::sync::Arc::new(blocking(Orthanc::start).await);
    let sink = SinkConfig::CStore(CStoreSinkConfig {
        address: format!("127.0.0.1:{}", o.dicom_port),
        called_ae: o.aet.clone(),
        calling_ae: "RELAYPACS".into(),
        ..CStoreSinkConfig::default()
    });
    let t = TestServer::start_with(|c| fast_outbox(c, sink)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let (sid, _, files) = upload_and_complete(&t, &u, 3).await;
    let v = wait_for(&t, &u, &sid, "delivered", state_is("delivered")).await;
    assert_eq!(
        v["delivery"]["confirmed_instances"], 3,
        "verified by C-FIND: {v:#}"
    );
    for f in &files {
        let (o, sop) = (o.clone(), sop_of(f));
        let held = blocking(move || o.instance_file(&sop)).await.unwrap();
        assert_eq!(
            data_set(&held),
            data_set(f),
            "the data set is byte-identical"
        );
    }
    assert_eq!(notifications(&t, &u, "delivered").await.len(), 1);
    t.stop().await;
}

/// The nice value in a thread's `stat` file at `path` (field 19).
fn nice_of(path: &str) -> i32 {
    let stat = std::fs::read_to_string(path).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(16).unwrap().parse().unwrap()
}

/// The delivery worker runs on threads of its own (its runtime and its
/// blocking pool), `[outbox] nice` below the requests' priority; the
/// threads serving requests keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_worker_runs_below_the_requests_priority() {
    let t = TestServer::start().await;
    let u = t.user("nicely", Role::Uploader).await;
    // A delivery, so the worker's blocking pool has started too.
    let (id, _, _) = upload_and_complete(&t, &u, 2).await;
    wait_for(&t, &u, &id, "delivered", state_is("delivered")).await;
    let base = nice_of("/proc/thread-self/stat");
    let mut worker = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let tid = task.unwrap().file_name().to_string_lossy().to_string();
        let Ok(name) = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")) else {
            continue; // the thread ended meanwhile
        };
        if name.trim() == "relay-outbox" {
            worker.push(nice_of(&format!("/proc/self/task/{tid}/stat")));
        }
    }
    assert!(
        worker.len() >= 2,
        "the worker's thread and a blocking one: {worker:?}"
    );
    let want = (base + 10).min(19);
    assert!(
        worker.iter().all(|n| *n == want),
        "{worker:?}, requests at {base}"
    );
}

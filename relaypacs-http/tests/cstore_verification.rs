//! The C-STORE path through the server: against Orthanc, which offers
//! C-GET, a study is delivered with its content proven; against dcmtk's
//! storescp, which can return nothing and answers no query, the study and
//! its notification say presence-only, never plain "delivered"; a PACS
//! keeping another object under a UID dead-letters the study naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, User, dicom};
use relaypacs_http::auth::Role;
use relaypacs_http::config::{CStoreSinkConfig, SinkConfig};
use relaypacs_test_peers::{Orthanc, OrthancOptions, StoreScp};
use reqwest::Method;
use serde_json::Value;

fn cstore(port: u16, aet: &str) -> SinkConfig {
    SinkConfig::CStore(CStoreSinkConfig {
        address: format!("127.0.0.1:{port}"),
        called_ae: aet.to_owned(),
        calling_ae: "RELAYPACS".into(),
        ..CStoreSinkConfig::default()
    })
}

async fn start(sink: SinkConfig) -> TestServer {
    TestServer::start_with(|c| {
        c.sinks = vec![sink];
        c.outbox.base_delay = Duration::from_millis(200);
        c.outbox.max_delay = Duration::from_millis(800);
        c.outbox.rescan_interval = Duration::from_secs(2);
    })
    .await
}

async fn send(t: &TestServer, u: &User, files: &[Vec<u8>]) -> String {
    let sid = t.new_study(u).await;
    for f in files {
        t.upload(u, &sid, f).await;
    }
    let r = t
        .req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    sid
}

async fn settle(t: &TestServer, u: &User, sid: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = common::json_of(t.req(Method::GET, &format!("/api/v1/studies/{sid}"), u)).await;
        if matches!(
            v["state"]["state"].as_str(),
            Some("delivered" | "dead_letter")
        ) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn study_files(n: usize) -> Vec<Vec<u8>> {
    let first = dicom(None, 32);
    let study =
        relaypacs_core::dicom::validate_dicom(&first, first.len() as u64, &Default::default())
            .unwrap()
            .study_instance_uid
            .to_string();
    let mut files = vec![first];
    files.extend((1..n).map(|_| dicom(Some(&study), 32)));
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_store_to_a_pacs_offering_c_get_is_delivered_with_content_proven() {
    let o = tokio::task::block_in_place(|| Orthanc::start_with_get(OrthancOptions::default()));
    let t = start(cstore(o.dicom_port, &o.aet)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let sid = send(&t, &u, &study_files(3)).await;
    let v = settle(&t, &u, &sid).await;
    assert_eq!(v["state"]["state"], "delivered", "{v:#}");
    assert_eq!(v["state"]["verified"], "content", "{v:#}");
    let n = t.wait_notifications(&u, 1).await;
    let delivered: Vec<&Value> = n.iter().filter(|n| n["kind"] == "delivered").collect();
    assert_eq!(delivered.len(), 1, "{n:#?}");
    let text = delivered[0].to_string();
    assert!(!text.contains("presence-only"), "{text}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_store_to_storescp_says_presence_only_in_the_study_and_the_notification() {
    let scp = tokio::task::block_in_place(StoreScp::start);
    let t = start(cstore(scp.port, &scp.aet)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let sid = send(&t, &u, &study_files(2)).await;
    let v = settle(&t, &u, &sid).await;
    assert_eq!(v["state"]["state"], "delivered", "{v:#}");
    assert_eq!(v["state"]["verified"], "presence-only", "{v:#}");
    let n = t.wait_notifications(&u, 1).await;
    let delivered: Vec<&Value> = n.iter().filter(|n| n["kind"] == "delivered").collect();
    assert_eq!(delivered.len(), 1, "{n:#?}");
    assert!(
        delivered[0].to_string().contains("presence-only"),
        "{:#}",
        delivered[0]
    );
    assert_eq!(scp.count(), 2);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_store_to_a_pacs_keeping_another_object_dead_letters_naming_the_uid() {
    let o = tokio::task::block_in_place(|| Orthanc::start_with_get(OrthancOptions::default()));
    let t = start(cstore(o.dicom_port, &o.aet)).await;
    let u = t.user("clinic", Role::Uploader).await;
    let files = study_files(2);
    // Orthanc already keeps another object under the second file's UID.
    let sop = relaypacs_core::dicom::validate_dicom(
        &files[1],
        files[1].len() as u64,
        &Default::default(),
    )
    .unwrap();
    let other = relaypacs_core::testing::dicom_gen::generate(
        &relaypacs_core::testing::dicom_gen::DicomSpec {
            study_uid: sop.study_instance_uid.to_string(),
            series_uid: sop.series_instance_uid.to_string(),
            sop_instance_uid: sop.sop_instance_uid.to_string(),
            rows: 32,
            cols: 32,
            seed: 4242,
            ..Default::default()
        },
    )
    .unwrap();
    tokio::task::block_in_place(|| o.upload(&other));
    let sid = send(&t, &u, &files).await;
    let v = settle(&t, &u, &sid).await;
    assert_eq!(v["state"]["state"], "dead_letter", "{v:#}");
    let reason = v["state"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(sop.sop_instance_uid.as_str()),
        "the reason names the UID: {reason}"
    );
    assert_eq!(v["delivery"]["attempts"], 1, "never retried blindly: {v:#}");
    // Nothing was sent: the first file is not at the PACS either.
    assert_eq!(tokio::task::block_in_place(|| o.instance_count()), 1);
    t.stop().await;
}

//! FWD-2 with the real binary: a study completed while the PACS is down is
//! in the durable outbox; the gateway is killed with SIGKILL, the PACS comes
//! back, the gateway starts again and delivers the study once, with no
//! user action.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::binary::{self, Gateway};
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_test_peers::{Orthanc, free_port};

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd2_kill9_with_a_pending_delivery_then_restart_delivers_once() {
    let mut o = tokio::task::spawn_blocking(Orthanc::start).await.unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = free_port();
    let config = dir.path().join("relaypacs.toml");
    let outbox = "base_delay = 0.2\nmax_delay = 0.5\n";
    let toml = o.gateway_config(port, &dir.path().join("data"), outbox);
    std::fs::write(&config, toml).unwrap();
    binary::add_user(
        &[OsStr::new("--config"), config.as_os_str()],
        &[],
        "lena",
        "uploader",
        PASSWORD,
    );

    o.stop();
    let mut gw = Gateway::start(&config, port, Stdio::null());
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let access = binary::access_token(&http, &url, "lena", PASSWORD).await;
    let sid = binary::new_study(&http, &url, &access).await;
    let spec = DicomSpec {
        study_uid: new_uid(),
        ..DicomSpec::default()
    };
    let file = generate(&spec).unwrap();
    binary::tus_upload(&http, &url, &access, &sid, &file).await;
    let r = http
        .post(format!("{url}/api/v1/studies/{sid}/complete"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let state = |http: reqwest::Client, url: String, access: String, sid: String| async move {
        common::json_of(
            http.get(format!("{url}/api/v1/studies/{sid}"))
                .bearer_auth(&access),
        )
        .await
    };
    // At least one failed attempt while the PACS is down, then SIGKILL.
    let start_wait = Instant::now();
    loop {
        let v = state(http.clone(), url.clone(), access.clone(), sid.clone()).await;
        if v["delivery"]["attempts"].as_u64() >= Some(1) {
            assert_eq!(v["state"]["state"], "forwarding");
            break;
        }
        assert!(start_wait.elapsed() < Duration::from_secs(30), "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.0.kill().unwrap(); // SIGKILL
    gw.0.wait().unwrap();
    drop(gw);

    let o = tokio::task::spawn_blocking(move || {
        o.start_again();
        o
    })
    .await
    .unwrap();
    let _gw = Gateway::start(&config, port, Stdio::null());
    let start_wait = Instant::now();
    loop {
        let v = state(http.clone(), url.clone(), access.clone(), sid.clone()).await;
        if v["state"]["state"] == "delivered" {
            break;
        }
        assert!(start_wait.elapsed() < Duration::from_secs(60), "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sop = spec.sop_instance_uid.clone();
    let (held, count) =
        tokio::task::spawn_blocking(move || (o.instance_file(&sop), o.instance_count()))
            .await
            .unwrap();
    assert_eq!(held.unwrap(), file, "byte-identical at the PACS");
    assert_eq!(count, 1, "delivered once");
    let page = common::json_of(
        http.get(format!("{url}/api/v1/notifications"))
            .bearer_auth(&access),
    )
    .await;
    let notes = page["items"].as_array().unwrap();
    assert_eq!(notes.iter().filter(|n| n["kind"] == "delivered").count(), 1);
}

//! FWD-2 with the real binary: a study completed while the PACS is down is
//! in the durable outbox; the gateway is killed with SIGKILL, the PACS comes
//! back, the gateway starts again and delivers the study once, with no
//! user action.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::testing::peers::{Orthanc, free_port, wait_for_port};
use serde_json::{Value, json};

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bin: &str, config: &std::path::Path, port: u16) -> Gateway {
    let child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(20));
    Gateway(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fwd2_kill9_with_a_pending_delivery_then_restart_delivers_once() {
    let mut o = tokio::task::spawn_blocking(Orthanc::start).await.unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = free_port();
    let config = dir.path().join("relaypacs.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"
data_dir = {data:?}

[http]
min_free_bytes = 0

[[sinks]]
kind = "stow_rs"
url = {url:?}
user = {user:?}
password = {password:?}

[outbox]
base_delay = 0.2
max_delay = 0.5
"#,
            data = dir.path().join("data").display().to_string(),
            url = o.dicomweb(),
            user = o.user,
            password = o.password,
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_relaypacs");
    let mut add = Command::new(bin)
        .args(["--config"])
        .arg(&config)
        .args(["user", "add", "lena", "--role", "uploader"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(add.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    o.stop();
    let mut gw = start(bin, &config, port);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let tok: Value = http
        .post(format!("{url}/api/v1/auth/login"))
        .json(&json!({"username": "lena", "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = tok["access_token"].as_str().unwrap().to_string();
    let study: Value = http
        .post(format!("{url}/api/v1/studies"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = study["id"].as_str().unwrap().to_string();
    let spec = DicomSpec {
        study_uid: new_uid(),
        ..DicomSpec::default()
    };
    let file = generate(&spec).unwrap();
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let r = http
        .post(format!("{url}/files"))
        .bearer_auth(&access)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", file.len().to_string())
        .header(
            "upload-metadata",
            format!("filename {},session {}", b64("x.dcm"), b64(&sid)),
        )
        .send()
        .await
        .unwrap();
    let up = r.headers()["location"].to_str().unwrap().to_string();
    let r = http
        .patch(format!("{url}{up}"))
        .bearer_auth(&access)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .body(file.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .post(format!("{url}/api/v1/studies/{sid}/complete"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let state = |http: reqwest::Client, url: String, access: String, sid: String| async move {
        let v: Value = http
            .get(format!("{url}/api/v1/studies/{sid}"))
            .bearer_auth(&access)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v
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
    let _gw = start(bin, &config, port);
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
    let notes: Vec<Value> = http
        .get(format!("{url}/api/v1/notifications"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(notes.iter().filter(|n| n["kind"] == "delivered").count(), 1);
}

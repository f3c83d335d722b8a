//! AUD-7 / AUTH-8: the server's own logs (the real binary's stderr) never
//! contain passwords, tokens, the secret or patient identifiers, and a
//! hostile username stays one escaped log line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::binary;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use serde_json::{Value, json};

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";

#[tokio::test]
async fn logs_hold_no_secrets_and_no_patient_data() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("data");
    let secret = "f3".repeat(8) + &hex_random();
    let bin = env!("CARGO_BIN_EXE_relaypacs");
    binary::add_user(
        &[],
        &[
            ("RELAYPACS_DATA_DIR", data.as_os_str()),
            ("RELAYPACS_SECRET", OsStr::new(&secret)),
        ],
        "lena",
        "uploader",
        PASSWORD,
    );
    let port = relaypacs_test_peers::free_port();
    let mut server = Command::new(bin)
        .env("RELAYPACS_DATA_DIR", &data)
        .env("RELAYPACS_SECRET", &secret)
        .env("RELAYPACS_LISTEN", format!("127.0.0.1:{port}"))
        .env("RELAYPACS_LOG", "debug")
        // This test is about logs, not the disk watermark: a CI volume with
        // less than a tenth free would refuse the study (507).
        .env("RELAYPACS_HTTP__MIN_FREE_BYTES", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = server.stderr.take().unwrap();
    // Kill the server if an assertion below fails, so no process outlives
    // the test.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.0.to_string())
                .status();
        }
    }
    let _guard = KillOnDrop(server.id());
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    relaypacs_test_peers::wait_for_port(port, Duration::from_secs(20));
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    // A failed login with a hostile username, then a real one.
    let evil = "eve\r\n{\"level\":\"ERROR\"}\u{1b}[31m";
    let r = http
        .post(format!("{url}/api/v1/auth/login"))
        .json(&json!({"username": evil, "password": "Wrong-Password-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let tok = binary::login(&http, &url, "lena", PASSWORD).await;
    let access = tok["access_token"].as_str().unwrap().to_string();
    let refresh = tok["refresh_token"].as_str().unwrap().to_string();
    let sid = binary::new_study(&http, &url, &access).await;
    let patient = "PATIENT-ZETA-4471";
    let file = generate(&DicomSpec {
        patient_id: patient.into(),
        study_uid: new_uid(),
        ..DicomSpec::default()
    })
    .unwrap();
    binary::tus_upload(&http, &url, &access, &sid, &file).await;
    let r = http
        .post(format!("{url}/api/v1/studies/{sid}/complete"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = http
        .post(format!("{url}/api/v1/auth/refresh"))
        .json(&json!({"refresh_token": refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{url}/api/v1/events?access_token={access}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Stop with SIGTERM and collect the log.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(server.id().to_string())
        .status();
    let _ = server.wait();
    let log = lines.join().unwrap();
    assert!(log.len() > 5, "no log lines");
    let text = log.join("\n");
    for (what, needle) in [
        ("password", PASSWORD),
        ("secret", secret.as_str()),
        ("access token", access.as_str()),
        ("JWT prefix", "eyJ"),
        ("refresh token", refresh.as_str()),
        ("patient id", patient),
        ("query credential", "access_token="),
    ] {
        assert!(!text.contains(needle), "the log contains the {what}");
    }
    // Every line is one JSON object: the hostile username did not split it.
    for l in &log {
        if l.starts_with('{') {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("not one JSON line ({e}): {l}"));
        }
    }
    assert!(!text.contains('\u{1b}'), "raw escape sequence in the log");
}

fn hex_random() -> String {
    let mut b = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    hex::encode(b)
}

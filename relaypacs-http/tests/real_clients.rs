//! Real tus clients against the real server: tuspy (PyPI) and
//! tus-js-client (npm, under node), each interrupted mid-file and resumed;
//! the archived files are byte-identical to the sources.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Install the pinned clients (idempotent) and return the venv's python.
fn clients() -> PathBuf {
    let st = Command::new("bash")
        .arg(repo().join("scripts/install-peers.sh"))
        .arg("clients")
        .status()
        .unwrap();
    assert!(st.success(), "installing the tus clients failed");
    let tools = std::env::var_os("RELAYPACS_TOOLS").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/relaypacs/tools"),
        PathBuf::from,
    );
    tools.join("venv/bin/python")
}

fn run(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn client_cmd(kind: &str, python: &Path) -> Command {
    match kind {
        "tuspy" => {
            let mut c = Command::new(python);
            c.arg(repo().join("clients/python/tus_upload.py"));
            c
        }
        _ => {
            let mut c = Command::new("node");
            c.arg(repo().join("clients/node/tus_upload.mjs"));
            c
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_and_tus_js_client_upload_interrupt_and_resume() {
    let python = clients();
    let t = TestServer::start().await;
    let u = t.user("nina", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let study_uid = new_uid();
    let mut sources = Vec::new();
    for i in 0..4 {
        let p = t.dir.path().join(format!("src-{i}.dcm"));
        let spec = DicomSpec {
            study_uid: study_uid.clone(),
            seed: i,
            ..DicomSpec::default()
        };
        write_large_file(&p, &spec, 6 << 20).unwrap();
        sources.push(p);
    }
    let endpoint = format!("{}/files", t.url);
    for (i, kind) in ["tuspy", "tus-js-client"].iter().enumerate() {
        // Whole file, with its SHA-256 declared.
        let whole = &sources[2 * i];
        let v = run(client_cmd(kind, &python)
            .args([
                "--endpoint",
                &endpoint,
                "--token",
                &u.token,
                "--session",
                &study,
                "--sha256",
                "--file",
            ])
            .arg(whole));
        assert_eq!(v["complete"], true, "{kind}");
        // Interrupted after ~2.5 MB of 1 MiB chunks, then resumed.
        let torn = &sources[2 * i + 1];
        let v = run(client_cmd(kind, &python)
            .args([
                "--endpoint",
                &endpoint,
                "--token",
                &u.token,
                "--session",
                &study,
                "--chunk-size",
                "1048576",
                "--stop-after",
                "2500000",
                "--file",
            ])
            .arg(torn));
        assert_eq!(v["complete"], false, "{kind} was not interrupted");
        let url = v["url"].as_str().unwrap().to_string();
        let path = url.strip_prefix(&t.url).unwrap();
        let offset = t.head_offset(&u, path).await;
        assert!(
            (2_500_000..6 << 20).contains(&offset),
            "{kind}: offset {offset}"
        );
        let v = run(client_cmd(kind, &python)
            .args([
                "--resume-url",
                &url,
                "--token",
                &u.token,
                "--session",
                &study,
                "--chunk-size",
                "1048576",
                "--file",
            ])
            .arg(torn));
        assert_eq!(v["complete"], true, "{kind} resume");
    }
    let v: Value = t
        .req(Method::GET, &format!("/api/v1/studies/{study}"), &u)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 4);
    assert!(files.iter().all(|f| f["state"] == "valid"), "{v}");
    let r = t
        .req(
            Method::POST,
            &format!("/api/v1/studies/{study}/complete"),
            &u,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Delivered (the worker notifies once verified), byte-identical.
    let note = t.wait_notifications(&u, 1).await;
    assert_eq!(note[0]["kind"], "delivered", "{note:?}");
    let mut archived: Vec<Vec<u8>> = snapshot(&t.data().join("archive"))
        .keys()
        .map(|k| std::fs::read(t.data().join("archive").join(k)).unwrap())
        .collect();
    let mut expected: Vec<Vec<u8>> = sources.iter().map(|p| std::fs::read(p).unwrap()).collect();
    archived.sort();
    expected.sort();
    assert!(
        archived == expected,
        "archived files differ from the sources"
    );
    t.stop().await;
}

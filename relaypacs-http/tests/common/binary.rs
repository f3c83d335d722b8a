//! Driving the real `relaypacs` binary and its API with a plain client, as
//! an operator and a user would.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

/// The real `relaypacs` binary running as a child; killed (SIGKILL) and
/// reaped when dropped.
pub struct Gateway(pub Child);

impl Gateway {
    /// `relaypacs --config CONFIG` with stdout discarded and stderr to
    /// `stderr`, once it listens on `port` (20 s at most).
    pub fn start(config: &Path, port: u16, stderr: Stdio) -> Self {
        Self::start_within(config, port, stderr, Duration::from_secs(20))
    }

    /// [`Gateway::start`], waiting up to `timeout` for the port.
    pub fn start_within(config: &Path, port: u16, stderr: Stdio, timeout: Duration) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let gw = Self(child);
        relaypacs_test_peers::wait_for_port(port, timeout);
        gw
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `relaypacs [ARGS] user add NAME --role ROLE` with the password on stdin
/// and `envs` set; panics with its stderr if it fails.
pub fn add_user(args: &[&OsStr], envs: &[(&str, &OsStr)], name: &str, role: &str, password: &str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relaypacs"));
    cmd.args(args).args(["user", "add", name, "--role", role]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut add = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(add.stdin.take().unwrap(), "{password}").unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Log in; returns the token answer.
pub async fn login(http: &reqwest::Client, url: &str, name: &str, password: &str) -> Value {
    let req = http
        .post(format!("{url}/api/v1/auth/login"))
        .json(&json!({"username": name, "password": password}));
    super::json_of(req).await
}

/// Log in; returns the access token.
pub async fn access_token(http: &reqwest::Client, url: &str, name: &str, password: &str) -> String {
    let tok = login(http, url, name, password).await;
    tok["access_token"].as_str().unwrap().to_owned()
}

/// Open a study; returns its id.
pub async fn new_study(http: &reqwest::Client, url: &str, token: &str) -> String {
    let v = super::json_of(
        http.post(format!("{url}/api/v1/studies"))
            .bearer_auth(token),
    )
    .await;
    match v["id"].as_str() {
        Some(id) => id.to_owned(),
        None => panic!("opening a study was refused: {v}"),
    }
}

/// Upload `file` into study `sid` with a tus creation and one PATCH (204).
pub async fn tus_upload(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    sid: &str,
    file: &[u8],
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let r = http
        .post(format!("{url}/files"))
        .bearer_auth(token)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", file.len().to_string())
        .header(
            "upload-metadata",
            format!("filename {},session {}", b64("x.dcm"), b64(sid)),
        )
        .send()
        .await
        .unwrap();
    let up = r.headers()["location"].to_str().unwrap().to_string();
    let r = http
        .patch(format!("{url}{up}"))
        .bearer_auth(token)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .body(file.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    up
}

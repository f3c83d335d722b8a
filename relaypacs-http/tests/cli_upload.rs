//! `relaypacs upload` against the real server binary (local archive as the
//! PACS): resume after SIGKILL of the client, retry across a SIGKILL and
//! restart of the server, `--json` output, local refusal of non-DICOM and
//! hostile files.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::binary::{self, Gateway};
use relaypacs_core::testing::dicom_gen::{
    DicomSpec, generate, huge_declared_length, new_uid, truncations, write_large_file,
};
use relaypacs_test_peers::free_port;
use serde_json::Value;
use sha2::{Digest, Sha256};

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";
const USER: &str = "rad";
const BIN: &str = env!("CARGO_BIN_EXE_relaypacs");

/// A server's folder, configuration and port, with user `rad`.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    url: String,
}

impl Setup {
    fn new() -> Self {
        Self::with("http", |_| String::new())
    }

    /// With more configuration (TOML appended, given the folder) and the
    /// URL's scheme.
    fn with(scheme: &str, more: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let port = free_port();
        let config = dir.path().join("relaypacs.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n\n[http]\nmin_free_bytes = 0\n\n{}",
                dir.path().join("data").display().to_string(),
                more(dir.path())
            ),
        )
        .unwrap();
        binary::add_user(
            &[OsStr::new("--config"), config.as_os_str()],
            &[],
            USER,
            "uploader",
            PASSWORD,
        );
        Self {
            dir,
            config,
            port,
            url: format!("{scheme}://127.0.0.1:{port}"),
        }
    }

    fn start(&self) -> Gateway {
        Gateway::start_within(
            &self.config,
            self.port,
            Stdio::null(),
            Duration::from_secs(30),
        )
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("client-state.json")
    }

    /// `relaypacs upload --json` on `paths`, password from the environment.
    fn upload_cmd(&self, paths: &[&Path], extra: &[&str]) -> Command {
        let mut cmd = self.upload_cmd_as(paths, extra);
        cmd.arg("--user")
            .arg(USER)
            .env("RELAYPACS_PASSWORD", PASSWORD);
        cmd
    }

    /// `relaypacs upload --json` on `paths`, credentials in `extra`.
    fn upload_cmd_as(&self, paths: &[&Path], extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("upload")
            .args(paths)
            .arg("--server")
            .arg(&self.url)
            .arg("--state")
            .arg(self.state_file())
            .arg("--json")
            .args(extra)
            .env_remove("RELAYPACS_PASSWORD")
            .env_remove("RELAYPACS_USER")
            .env_remove("RELAYPACS_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn upload(&self, paths: &[&Path], extra: &[&str]) -> (Output, Vec<Value>) {
        let out = self.upload_cmd(paths, extra).output().unwrap();
        let events = json_lines(&out.stdout);
        (out, events)
    }

    async fn token(&self, http: &reqwest::Client) -> String {
        binary::access_token(http, &self.url, USER, PASSWORD).await
    }

    /// The user's studies.
    async fn studies(&self, http: &reqwest::Client, token: &str) -> Vec<Value> {
        let v = common::json_of(
            http.get(format!("{}/api/v1/studies", self.url))
                .bearer_auth(token),
        )
        .await;
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// The offset the server reports for `upload` (a `/files/…` path).
    async fn head_offset(&self, http: &reqwest::Client, token: &str, upload: &str) -> u64 {
        let req = http
            .head(format!("{}{upload}", self.url))
            .bearer_auth(token);
        common::tus_offset(req).await
    }
}

/// Every line is one JSON object with an `event`.
fn json_lines(stdout: &[u8]) -> Vec<Value> {
    let text = String::from_utf8(stdout.to_vec()).unwrap();
    text.lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
            assert!(v["event"].is_string(), "no event: {l}");
            v
        })
        .collect()
}

fn events<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|e| e["event"] == kind).collect()
}

fn summary(all: &[Value]) -> &Value {
    let last = all.last().expect("no output");
    assert_eq!(last["event"], "summary", "the summary comes last: {last}");
    assert_eq!(events(all, "summary").len(), 1);
    last
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// SHA-256 of every archived file.
fn archived(data: &Path) -> Vec<(PathBuf, u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![data.join("archive")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let size = p.metadata().unwrap().len();
                let sum = sha256_file(&p);
                out.push((p, size, sum));
            }
        }
    }
    out
}

fn assert_archived(data: &Path, source: &Path) {
    let want = sha256_file(source);
    let all = archived(data);
    assert!(
        all.iter().any(|(_, _, s)| *s == want),
        "{} is not in the archive byte for byte: {all:?}",
        source.display()
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A 300 MiB file; the CLI is SIGKILLed once the server holds ~45 % of
/// it; the rerun sends only the rest (< 60 % of the file, as its summary
/// and the server's offset before the rerun both say), the study is
/// delivered and the archived file is the source byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_upload_resumes_and_sends_only_the_rest() {
    let s = Setup::new();
    let _gw = s.start();
    let src = s.dir.path().join("big");
    std::fs::create_dir(&src).unwrap();
    let file = src.join("ct-300mib.dcm");
    let spec = DicomSpec {
        study_uid: new_uid(),
        ..DicomSpec::default()
    };
    write_large_file(&file, &spec, 300 << 20).unwrap();
    let size = file.metadata().unwrap().len();
    let http = reqwest::Client::new();
    let token = s.token(&http).await;

    let started = Instant::now();
    let mut child = s
        .upload_cmd(&[&file], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill on observed progress: the server's offset past 45 %.
    let upload = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress to 45 %"
        );
        if let Some(st) = s.studies(&http, &token).await.first()
            && let Some(f) = st["files"].as_array().and_then(|f| f.first())
            && f["offset"].as_u64().unwrap_or(0) * 100 >= size * 45
        {
            break f["upload_url"].as_str().unwrap().to_owned();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the CLI ended before it was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The server's offset once it settles (a PATCH it had whole may still
    // be committing).
    let mut before = s.head_offset(&http, &token, &upload).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = s.head_offset(&http, &token, &upload).await;
        if now == before {
            break;
        }
        before = now;
    }
    assert!(
        before * 100 >= size * 40 && before < size,
        "offset {before} of {size}"
    );

    let (out, ev) = s.upload(&[&file], &["--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let sum = summary(&ev);
    let sent = sum["bytes_sent"].as_u64().unwrap();
    assert!(sent * 100 < size * 60, "second run sent {sent} of {size}");
    assert!(
        sent >= size - before,
        "sent {sent}, {} were missing",
        size - before
    );
    assert_eq!(sum["bytes_resumed"].as_u64(), Some(before), "{sum}");
    assert_eq!(sum["files_done"], 1);
    assert_eq!(sum["studies_delivered"], 1);
    let done = events(&ev, "file_done");
    assert_eq!(done[0]["resumed_from"].as_u64(), Some(before));
    assert_eq!(done[0]["sha256"].as_str().unwrap(), sha256_file(&file));
    let delivered = events(&ev, "study_delivered");
    assert_eq!(delivered[0]["verified"], "content");
    assert_archived(&s.data(), &file);
    // The state file no longer holds the completed study.
    let st: Value = serde_json::from_slice(&std::fs::read(s.state_file()).unwrap()).unwrap();
    assert_eq!(st["files"].as_object().unwrap().len(), 0, "{st}");
    assert_eq!(st["studies"].as_object().unwrap().len(), 0, "{st}");
}

/// The server is SIGKILLed with an upload in flight and started again on
/// the same folder and port: the CLI retries (reported as `retry`
/// events), resumes from the server's offset and completes with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_the_cli_retries_and_completes() {
    let s = Setup::new();
    let mut gw = s.start();
    let file = s.dir.path().join("mr-96mib.dcm");
    let spec = DicomSpec {
        study_uid: new_uid(),
        ..DicomSpec::default()
    };
    write_large_file(&file, &spec, 96 << 20).unwrap();
    let size = file.metadata().unwrap().len();
    let http = reqwest::Client::new();
    let token = s.token(&http).await;

    let cli = s
        .upload_cmd(&[&file], &["--wait", "--chunk-mib", "4"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress to 20 %"
        );
        if let Some(st) = s.studies(&http, &token).await.first()
            && let Some(f) = st["files"].as_array().and_then(|f| f.first())
            && f["offset"].as_u64().unwrap_or(0) * 100 >= size * 20
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.0.kill().unwrap(); // SIGKILL
    gw.0.wait().unwrap();
    drop(gw);
    // Down long enough for the CLI to see it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _gw = s.start();

    let out = tokio::task::spawn_blocking(move || cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let ev = json_lines(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}\n{ev:?}", stderr(&out));
    assert!(
        !events(&ev, "retry").is_empty(),
        "the outage was not seen: {ev:?}"
    );
    let sum = summary(&ev);
    assert_eq!(sum["files_done"], 1);
    assert_eq!(sum["studies_completed"], 1);
    assert_eq!(sum["studies_delivered"], 1);
    // Retries resent at most the chunks in flight, not the file.
    let sent = sum["bytes_sent"].as_u64().unwrap();
    assert!(sent < size + (12 << 20), "sent {sent} for {size}");
    assert_archived(&s.data(), &file);
}

/// `--json`: every line parses, and the summary counts what happened: two
/// studies of two files each, a non-DICOM file, a hostile one, a DICOMDIR
/// and a second copy of a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_parses_and_counts() {
    let s = Setup::new();
    let _gw = s.start();
    let src = s.dir.path().join("mixed");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    let mut valid = Vec::new();
    for (i, study) in [new_uid(), new_uid()].iter().enumerate() {
        for j in 0..2 {
            let bytes = generate(&DicomSpec {
                study_uid: study.clone(),
                rows: 64,
                cols: 64,
                ..DicomSpec::default()
            })
            .unwrap();
            let p = src
                .join(if i == 0 { "a" } else { "a/b" })
                .join(format!("im{j}.dcm"));
            std::fs::write(&p, &bytes).unwrap();
            valid.push(p);
        }
    }
    std::fs::copy(&valid[0], src.join("copy-of-im0.dcm")).unwrap();
    std::fs::write(src.join("README.txt"), b"not an image\n").unwrap();
    std::fs::write(src.join("hostile.dcm"), huge_declared_length()).unwrap();
    std::fs::write(src.join("DICOMDIR"), b"index").unwrap();

    let (out, ev) = s.upload(&[&src], &["--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refused files make exit 1: {}",
        stderr(&out)
    );
    let sum = summary(&ev);
    assert_eq!(sum["files_found"], 8, "{sum}");
    assert_eq!(sum["files_valid"], 4, "{sum}");
    assert_eq!(sum["files_done"], 4, "{sum}");
    assert_eq!(sum["files_refused_local"], 2, "{sum}");
    assert_eq!(sum["files_refused_server"], 0, "{sum}");
    assert_eq!(sum["files_skipped"], 2, "{sum}");
    assert_eq!(sum["studies"], 2, "{sum}");
    assert_eq!(sum["studies_completed"], 2, "{sum}");
    assert_eq!(sum["studies_delivered"], 2, "{sum}");
    let bytes: u64 = valid.iter().map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(sum["bytes_total"].as_u64(), Some(bytes));
    assert_eq!(sum["bytes_sent"].as_u64(), Some(bytes));
    assert_eq!(sum["exit_code"], 1);
    assert_eq!(events(&ev, "file_done").len(), 4);
    assert_eq!(events(&ev, "study_completed").len(), 2);
    assert_eq!(events(&ev, "study_delivered").len(), 2);
    assert!(events(&ev, "file_progress").is_empty());
    let refused = events(&ev, "file_refused");
    assert_eq!(refused.len(), 2);
    for r in &refused {
        assert_eq!(r["by"], "local");
        assert!(
            r["code"].as_str().unwrap().starts_with("RELAY_DICOM_"),
            "{r}"
        );
        assert!(!r["reason"].as_str().unwrap().is_empty());
    }
    for p in &valid {
        assert_archived(&s.data(), p);
    }
}

/// A non-DICOM file and hostile files (an absurd declared length, a
/// truncated file) are refused locally and never reach the server: no
/// login, no session, no upload, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_dicom_and_hostile_files_are_refused_locally() {
    let s = Setup::new();
    let _gw = s.start();
    let src = s.dir.path().join("bad");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("report.pdf"), b"%PDF-1.4\n%%EOF\n").unwrap();
    std::fs::write(src.join("length-overrun.dcm"), huge_declared_length()).unwrap();
    let valid = generate(&DicomSpec::default()).unwrap();
    let cut = truncations(&valid)
        .into_iter()
        .max_by_key(Vec::len)
        .unwrap();
    std::fs::write(src.join("truncated.dcm"), cut).unwrap();

    let (out, ev) = s.upload(&[&src], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let refused = events(&ev, "file_refused");
    assert_eq!(refused.len(), 3, "{ev:?}");
    let code = |name: &str| {
        refused
            .iter()
            .find(|r| r["path"].as_str().unwrap().ends_with(name))
            .map(|r| r["code"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(code("report.pdf"), "RELAY_DICOM_NOT_DICOM");
    assert_eq!(code("length-overrun.dcm"), "RELAY_DICOM_LENGTH_OVERRUN");
    assert!(code("truncated.dcm").starts_with("RELAY_DICOM_"));
    assert!(refused.iter().all(|r| r["by"] == "local"));
    let sum = summary(&ev);
    assert_eq!(sum["files_refused_local"], 3);
    assert_eq!(sum["bytes_sent"], 0);
    assert_eq!(sum["studies"], 0);

    // Nothing reached the server: no session, file or chunk, no login.
    let http = reqwest::Client::new();
    let token = s.token(&http).await;
    assert!(s.studies(&http, &token).await.is_empty());
    for table in ["sessions", "session_files", "chunks"] {
        let n = common::state_rows(
            &s.data(),
            &format!("SELECT CAST(count(*) AS TEXT) FROM {table}"),
        )
        .await;
        assert_eq!(n[0][0], "0", "{table}");
    }
    let logins = common::state_rows(
        &s.data(),
        r#"SELECT CAST(count(*) AS TEXT) FROM audit_events WHERE event LIKE '%"action":"login"%'"#,
    )
    .await;
    // Only the test's own login above.
    assert_eq!(logins[0][0], "1", "{logins:?}");
}

/// Mini study of `n` files of about `mib` MiB each, in a new folder.
fn study_files(dir: &Path, n: usize, mib: u64) -> PathBuf {
    let src = dir.join(format!("study-{}", new_uid()));
    std::fs::create_dir(&src).unwrap();
    let study = new_uid();
    for i in 0..n {
        let spec = DicomSpec {
            study_uid: study.clone(),
            sop_instance_uid: new_uid(),
            seed: i as u64,
            ..DicomSpec::default()
        };
        write_large_file(&src.join(format!("im{i}.dcm")), &spec, mib << 20).unwrap();
    }
    src
}

async fn refresh(http: &reqwest::Client, url: &str, token: &str) -> reqwest::StatusCode {
    http.post(format!("{url}/api/v1/auth/refresh"))
        .json(&serde_json::json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
        .status()
}

/// `--token-file` with a refresh token, access tokens living one second:
/// the CLI renews the access token while 3 files go up in parallel, one
/// refresh at a time (a refresh token used twice would revoke the login),
/// and writes each rotated refresh token back to the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_refresh_tokens_rotate_while_uploading() {
    let s = Setup::with("http", |_| "[auth]\naccess_ttl_secs = 1\n".into());
    let _gw = s.start();
    let src = study_files(s.dir.path(), 3, 24);
    let http = reqwest::Client::new();
    let first = binary::login(&http, &s.url, USER, PASSWORD).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let token_file = s.dir.path().join("token");
    std::fs::write(&token_file, format!("{first}\n")).unwrap();

    let out = s
        .upload_cmd_as(
            &[&src],
            &[
                "--token-file",
                token_file.to_str().unwrap(),
                "--chunk-mib",
                "1",
                "--wait",
            ],
        )
        .output()
        .unwrap();
    let ev = json_lines(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}\n{ev:?}", stderr(&out));
    let sum = summary(&ev);
    assert_eq!(sum["files_done"], 3);
    assert_eq!(sum["studies_delivered"], 1);
    // Long enough that the one-second tokens had to be renewed (--wait
    // polls once a second until delivered).
    assert!(sum["elapsed_secs"].as_f64().unwrap() > 1.0, "{sum}");
    let now = std::fs::read_to_string(&token_file).unwrap();
    let now = now.trim();
    assert_ne!(now, first, "the rotated token was not written back");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = token_file.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let audit = common::state_rows(&s.data(), "SELECT event FROM audit_events").await;
    let refreshed = audit
        .iter()
        .filter(|r| r[0].contains(r#""action":"token_refreshed""#))
        .count();
    assert!(refreshed >= 1, "{refreshed} refreshes");
    assert!(
        !audit.iter().any(|r| r[0].contains("reused")),
        "a refresh token was used twice"
    );
    // The file holds the live token; the first one is spent.
    assert_eq!(refresh(&http, &s.url, now).await, 200);
    assert_eq!(refresh(&http, &s.url, &first).await, 401);
}

/// An https:// gateway with a private CA: refused at once without
/// `--ca-file` (exit 2, no retries), sent with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_needs_ca_file() {
    let ca = relaypacs_test_peers::TestCa::new("relaypacs cli test CA");
    let cert = ca.issue("gateway");
    let s = Setup::with("https", |_| {
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.cert_file.display().to_string(),
            cert.key_file.display().to_string()
        )
    });
    let _gw = s.start();
    let src = study_files(s.dir.path(), 1, 1);

    let t0 = Instant::now();
    let (out, ev) = s.upload(&[&src], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "retried a TLS failure"
    );
    let sum = summary(&ev);
    assert!(sum["error"].as_str().unwrap().contains("TLS"), "{sum}");
    assert!(events(&ev, "retry").is_empty());

    let (out, ev) = s.upload(
        &[&src],
        &["--ca-file", cert.ca_file.to_str().unwrap(), "--wait"],
    );
    assert_eq!(out.status.code(), Some(0), "{}\n{ev:?}", stderr(&out));
    assert_eq!(summary(&ev)["studies_delivered"], 1);
    let file = std::fs::read_dir(&src)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_archived(&s.data(), &file);
}

/// SIGKILL the CLI uploading `file` once the server holds `percent` % of
/// it; returns the study session id.
async fn kill_at(s: &Setup, file: &Path, percent: u64, extra: &[&str]) -> String {
    let size = file.metadata().unwrap().len();
    let http = reqwest::Client::new();
    let token = s.token(&http).await;
    let mut child = s
        .upload_cmd(&[file], extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let sid = loop {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        if let Some(st) = s.studies(&http, &token).await.first()
            && let Some(f) = st["files"].as_array().and_then(|f| f.first())
            && f["offset"].as_u64().unwrap_or(0) * 100 >= size * percent
        {
            break st["id"].as_str().unwrap().to_owned();
        }
        assert!(child.try_wait().unwrap().is_none(), "the CLI ended early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    sid
}

/// A rerun whose session is gone (aborted here, as an expired one would
/// be) starts again cleanly in a new session; a rerun whose study an
/// earlier run completed (killed before it could record so) sends
/// nothing and reports it completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_after_the_session_is_gone_or_completed() {
    let s = Setup::new();
    let _gw = s.start();
    let file = s.dir.path().join("cr-48mib.dcm");
    let spec = DicomSpec {
        study_uid: new_uid(),
        ..DicomSpec::default()
    };
    write_large_file(&file, &spec, 48 << 20).unwrap();
    let size = file.metadata().unwrap().len();
    let http = reqwest::Client::new();
    let token = s.token(&http).await;

    let old = kill_at(&s, &file, 20, &["--chunk-mib", "1"]).await;
    let r = http
        .delete(format!("{}/api/v1/studies/{old}", s.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (out, ev) = s.upload(&[&file], &["--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{ev:?}", stderr(&out));
    let sum = summary(&ev);
    assert_eq!(sum["bytes_resumed"], 0, "{sum}");
    assert_eq!(sum["bytes_sent"].as_u64(), Some(size), "{sum}");
    let started = events(&ev, "study_started");
    assert_eq!(started[0]["resumed"], false);
    let new = started[0]["session"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_archived(&s.data(), &file);

    // As if the run that completed `new` had been killed before writing
    // its state: the state still names the session.
    let state = serde_json::json!({
        "version": 1,
        "studies": { format!("{}|{}", s.url, spec.study_uid): { "session": new } },
        "files": {},
    });
    std::fs::write(s.state_file(), serde_json::to_vec(&state).unwrap()).unwrap();
    let (out, ev) = s.upload(&[&file], &[]);
    assert_eq!(out.status.code(), Some(0), "{}\n{ev:?}", stderr(&out));
    let sum = summary(&ev);
    assert_eq!(sum["bytes_sent"], 0, "{sum}");
    assert_eq!(sum["studies_completed"], 1, "{sum}");
    assert_eq!(events(&ev, "study_completed")[0]["session"], new.as_str());
    assert_eq!(s.studies(&http, &token).await.len(), 1, "no new session");
}

/// Without `--json` and without a terminal: plain lines on standard
/// error, nothing on standard output, the same exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_lines_without_a_terminal() {
    let s = Setup::new();
    let _gw = s.start();
    let src = study_files(s.dir.path(), 2, 1);
    std::fs::write(src.join("notes.txt"), b"not DICOM").unwrap();
    let cmd = s.upload_cmd(&[&src], &[]);
    // upload_cmd asks for --json; this run must not.
    let args: Vec<_> = cmd
        .get_args()
        .filter(|a| *a != "--json")
        .map(|a| a.to_owned())
        .collect();
    let mut plain = Command::new(BIN);
    plain
        .args(args)
        .env("RELAYPACS_PASSWORD", PASSWORD)
        .stdin(Stdio::null());
    let out = plain.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("notes.txt: not sent: not a DICOM Part-10 file"),
        "{err}"
    );
    assert!(err.contains("im0.dcm: sent"), "{err}");
    assert!(err.contains("completed (2 file(s)"), "{err}");
    assert!(err.contains("2 of 3 file(s) sent"), "{err}");
}

/// A study killed after some files are complete: the state holds only the
/// upload in progress, and the rerun sends neither the complete files
/// (the session's list says they are valid) nor the acknowledged part of
/// the one in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_files_skips_the_complete_ones() {
    let s = Setup::new();
    let _gw = s.start();
    let src = study_files(s.dir.path(), 3, 16);
    let total: u64 = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let http = reqwest::Client::new();
    let token = s.token(&http).await;
    let mut child = s
        .upload_cmd(&[&src], &["--parallel", "1", "--chunk-mib", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // One file valid, the next one under way.
    loop {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        if let Some(st) = s.studies(&http, &token).await.first() {
            let files = st["files"].as_array().unwrap();
            let valid = files.iter().filter(|f| f["state"] == "valid").count();
            let partial = files
                .iter()
                .any(|f| f["state"] == "uploading" && f["offset"].as_u64().unwrap_or(0) > 0);
            if valid >= 1 && partial {
                break;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "the CLI ended early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let st: Value = serde_json::from_slice(&std::fs::read(s.state_file()).unwrap()).unwrap();
    assert!(
        st["files"].as_object().unwrap().len() <= 1,
        "only the upload in progress is kept: {st}"
    );
    // What the server holds once it settles.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = s.studies(&http, &token).await;
    let held: u64 = view[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .sum();

    let (out, ev) = s.upload(&[&src], &["--parallel", "1", "--chunk-mib", "1", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{}\n{ev:?}", stderr(&out));
    let sum = summary(&ev);
    assert_eq!(sum["files_done"], 3, "{sum}");
    assert_eq!(sum["studies_delivered"], 1, "{sum}");
    let sent = sum["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= total - held,
        "sent {sent}, {held} of {total} were held"
    );
    assert!(sent >= total - held - (1 << 20), "sent {sent}");
    let done = events(&ev, "file_done");
    assert!(
        done.iter()
            .any(|d| d["bytes_sent"] == 0 && d["resumed_from"] == d["size"]),
        "{done:?}"
    );
    assert_eq!(s.studies(&http, &token).await.len(), 1, "one session");
    for e in std::fs::read_dir(&src).unwrap() {
        assert_archived(&s.data(), &e.unwrap().path());
    }
}

/// The documented exit codes for what stops a run: 2 usage (no such path,
/// no credentials), 3 a refused login, 4 no server after the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_for_usage_auth_and_unreachable() {
    let s = Setup::new();
    let _gw = s.start();
    let src = study_files(s.dir.path(), 1, 1);

    let (out, ev) = s.upload(&[&s.dir.path().join("no-such-folder")], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        summary(&ev)["error"]
            .as_str()
            .unwrap()
            .contains("no such file")
    );

    let out = s.upload_cmd_as(&[&src], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no credentials"), "{}", stderr(&out));

    let out = s
        .upload_cmd_as(&[&src], &["--user", USER])
        .env("RELAYPACS_PASSWORD", "not-the-password-at-all")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(summary(&json_lines(&out.stdout))["exit_code"], 3);

    let mut down = s.upload_cmd(&[&src], &["--retries", "2"]);
    let args: Vec<_> = down.get_args().map(|a| a.to_owned()).collect();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let args: Vec<_> = args
        .into_iter()
        .map(|a| {
            if a == s.url.as_str() {
                url.clone().into()
            } else {
                a
            }
        })
        .collect();
    down = Command::new(BIN);
    let out = down
        .args(args)
        .env("RELAYPACS_PASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let ev = json_lines(&out.stdout);
    assert_eq!(events(&ev, "retry").len(), 1, "{ev:?}");
    assert_eq!(summary(&ev)["exit_code"], 4);
}

/// A file the local check passes but this server refuses (it requires
/// Patient ID; the client checks with the default limits, which accept
/// its absence with a warning): reported `by: server` with the server's
/// code, and the rest of the study is completed without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_server_refuses_leaves_the_rest_of_the_study() {
    let s = Setup::with("http", |_| "[ingest]\nrequire_patient_id = true\n".into());
    let _gw = s.start();
    let src = s.dir.path().join("mixed");
    std::fs::create_dir(&src).unwrap();
    let study = new_uid();
    for (name, omit) in [("a.dcm", false), ("b-no-patient-id.dcm", true)] {
        let bytes = generate(&DicomSpec {
            study_uid: study.clone(),
            omit_patient_id: omit,
            ..DicomSpec::default()
        })
        .unwrap();
        std::fs::write(src.join(name), bytes).unwrap();
    }
    let (out, ev) = s.upload(&[&src], &["--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{ev:?}", stderr(&out));
    let refused = events(&ev, "file_refused");
    assert_eq!(refused.len(), 1, "{ev:?}");
    assert_eq!(refused[0]["by"], "server");
    assert!(
        refused[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("b-no-patient-id.dcm")
    );
    assert_eq!(
        refused[0]["code"], "RELAY_DICOM_MISSING_ATTRIBUTE",
        "{ev:?}"
    );
    let sum = summary(&ev);
    assert_eq!(sum["files_done"], 1, "{sum}");
    assert_eq!(sum["files_refused_server"], 1, "{sum}");
    assert_eq!(sum["studies_delivered"], 1, "{sum}");
    assert_archived(&s.data(), &src.join("a.dcm"));
}

//! Issue 12, first "Done when": three real `relaypacs` processes on three
//! ports share one PostgreSQL (`[state]`), one S3 bucket (s3s-fs,
//! `[chunks] kind = "s3"`) and one Orthanc. Two users, made once with
//! `relaypacs user add`, log in on one gateway and use their tokens on all.
//! Twenty studies go up at once: most by tus, each file's successive
//! PATCHes sent round-robin to different gateways; some by STOW-RS, to
//! each gateway in turn. One gateway is SIGKILLed while requests to it are
//! in flight and a new process is started on a fresh port with its
//! configuration; the client retries what the kill cut on another gateway,
//! as a load balancer would, and resumes a cut PATCH as a tus client does
//! (HEAD on the next gateway, then PATCH from the offset it reports).
//!
//! Then: every study is delivered to Orthanc exactly once (Orthanc's
//! `ReceivedInstanceFilter` saw each SOP Instance UID once, its count per
//! study equals the files sent) and content-verified; every instance's
//! bytes at Orthanc hash to the file sent (so no acknowledged chunk was
//! lost), and no resumed upload ever reported an offset below what had
//! been acknowledged; `relaypacs audit verify` exits 0 on the shared state;
//! each user's notifications, read on every live gateway, hold exactly
//! one `delivered` per study.
//!
//! `THREE_GATEWAYS_KEEP=1` keeps the temporary folder (configurations,
//! each gateway's log) for a look after a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::binary;
use futures::StreamExt;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_test_peers::{
    Orthanc, OrthancOptions, Postgres, PostgresOptions, S3Server, free_port, wait_for_port,
};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use sha2::{Digest, Sha256};

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";
const USERS: [&str; 2] = ["alice", "bruno"];
/// Studies in all.
const STUDIES: usize = 20;
/// Studies from this index on start only once the replacement gateway
/// answers, so it takes uploads too.
const AFTER_RESTART: usize = 12;
/// The kill comes once this many studies are acknowledged.
const KILL_AFTER: usize = 5;
/// Index of the gateway that is killed.
const VICTIM: usize = 1;
/// Client tasks uploading at once.
const CLIENTS: usize = 4;
/// Planned PATCH size; the server refuses a non-final chunk under 64 KiB.
const PIECE: usize = 96 << 10;
const MIN_PIECE: usize = 64 << 10;

/// One `relaypacs` process, SIGKILLed on drop.
struct Gateway {
    child: Child,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `relaypacs --config <config>` listening on `port`
/// (`RELAYPACS_LISTEN`), its log in `log`.
fn start_gateway(config: &Path, port: u16, log: PathBuf) -> Gateway {
    let child = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
        .arg("--config")
        .arg(config)
        .env_remove("RELAYPACS_CONFIG")
        .env("RELAYPACS_LISTEN", format!("127.0.0.1:{port}"))
        .env("RELAYPACS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(60));
    Gateway { child }
}

/// The last lines of a gateway's log (for failure messages).
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A gateway as the client sees it.
struct Slot {
    url: String,
    alive: bool,
    log: PathBuf,
    /// PATCHes sent to it and not yet answered.
    patches: Arc<AtomicUsize>,
}

/// The client's view of the service: the live gateways, round-robin.
struct Cluster {
    http: reqwest::Client,
    slots: Mutex<Vec<Slot>>,
    next: AtomicUsize,
    /// Requests cut by the kill (connection errors), for the report.
    cut: Mutex<Vec<String>>,
    /// Answers no client should ever see (5xx, unexpected statuses).
    bad: Mutex<Vec<String>>,
}

impl Cluster {
    /// The next live gateway, round-robin: `(index, url)`.
    fn pick(&self) -> (usize, String) {
        let slots = self.slots.lock().unwrap();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % slots.len();
            if slots[i].alive {
                return (i, slots[i].url.clone());
            }
        }
    }

    /// The next live gateway other than `last` (when another is alive).
    fn pick_other(&self, last: Option<usize>) -> (usize, String) {
        loop {
            let (i, url) = self.pick();
            let alive = self
                .slots
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.alive)
                .count();
            if Some(i) != last || alive < 2 {
                return (i, url);
            }
        }
    }

    /// Gateway `i` if it is alive, else the newest one (the replacement)
    /// if that is, else the next live one.
    fn pick_preferred(&self, i: usize) -> (usize, String) {
        {
            let slots = self.slots.lock().unwrap();
            let last = slots.len() - 1;
            for k in [i, last] {
                if slots[k].alive {
                    return (k, slots[k].url.clone());
                }
            }
        }
        self.pick()
    }

    fn log_of(&self, i: usize) -> PathBuf {
        self.slots.lock().unwrap()[i].log.clone()
    }

    /// Send `req` to gateway `i`.
    async fn send(&self, _i: usize, req: RequestBuilder) -> reqwest::Result<Response> {
        req.send().await
    }

    /// Send the PATCH `req` to gateway `i`, counting it in flight meanwhile.
    async fn send_patch(&self, i: usize, req: RequestBuilder) -> reqwest::Result<Response> {
        let patches = self.slots.lock().unwrap()[i].patches.clone();
        patches.fetch_add(1, Ordering::SeqCst);
        let r = req.send().await;
        patches.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// A request that failed without an answer: the kill cut it. At most
    /// a handful per run; more means the service is down.
    fn record_cut(&self, what: &str, i: usize, e: &reqwest::Error) {
        let mut cut = self.cut.lock().unwrap();
        cut.push(format!("{what} on gateway {i}: {e}"));
        assert!(cut.len() < 40, "too many failed requests: {cut:#?}");
    }

    /// A status no client should get: recorded with the gateway's log and
    /// the test fails.
    async fn unexpected(&self, what: &str, i: usize, r: Response) -> ! {
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        let msg = format!(
            "{what} on gateway {i}: {status} {body}\n--- log of gateway {i}:\n{}",
            tail(&self.log_of(i))
        );
        self.bad.lock().unwrap().push(msg.clone());
        panic!("{msg}");
    }

    fn req(&self, method: Method, url: &str, path: &str, token: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{url}{path}"))
            .bearer_auth(token)
    }
}

/// One study to send.
struct Study {
    user: usize,
    uid: String,
    files: Vec<File>,
    /// `Some(i)`: one STOW-RS request to gateway `i`; `None`: tus.
    stow: Option<usize>,
}

struct File {
    sop: String,
    data: Vec<u8>,
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn make_studies() -> Vec<Study> {
    // STOW-RS studies, one to each first gateway before the kill and again
    // after it (the victim's turn then goes to the replacement).
    let stow: HashMap<usize, usize> = [(1, 0), (3, 1), (5, 2), (13, 0), (15, 1), (17, 2)].into();
    (0..STUDIES)
        .map(|n| {
            let uid = new_uid();
            // Small (one PATCH), middle (two) and large (six) files.
            let files = [64u16, 256, 512]
                .iter()
                .enumerate()
                .map(|(k, rows)| {
                    let spec = DicomSpec {
                        study_uid: uid.clone(),
                        patient_id: format!("PAT-{n:02}"),
                        rows: *rows,
                        cols: *rows,
                        seed: (n * 10 + k) as u64,
                        ..DicomSpec::default()
                    };
                    File {
                        sop: spec.sop_instance_uid.clone(),
                        data: generate(&spec).unwrap(),
                    }
                })
                .collect();
            Study {
                user: n % USERS.len(),
                uid,
                files,
                stow: stow.get(&n).copied(),
            }
        })
        .collect()
}

/// Upload one file by tus into study `sid`, each request to another
/// gateway than the one before; returns the upload path and the gateways
/// whose PATCHes were acknowledged, in order.
async fn tus_file(c: &Cluster, token: &str, sid: &str, data: &[u8]) -> (String, Vec<usize>) {
    let meta = format!(
        "filename {},session {},sha256 {}",
        STANDARD.encode("f.dcm"),
        STANDARD.encode(sid),
        STANDARD.encode(sha_hex(data)),
    );
    let (up, mut last) = loop {
        let (i, url) = c.pick();
        let req = c
            .req(Method::POST, &url, "/files", token)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", data.len().to_string())
            .header("upload-metadata", &meta);
        match c.send(i, req).await {
            Ok(r) if r.status() == 201 => {
                let up = r.headers()["location"].to_str().unwrap().to_owned();
                break (up, Some(i));
            }
            Ok(r) => c.unexpected("POST /files", i, r).await,
            Err(e) => c.record_cut("POST /files", i, &e),
        }
    };
    let len = data.len();
    let mut offset = 0usize;
    // The highest offset a 204 acknowledged: a resumed upload must never
    // report less (an acknowledged chunk lost).
    let mut acked = 0usize;
    let mut resume = false;
    let mut tries = 0;
    let mut acked_by = Vec::new();
    while offset < len {
        tries += 1;
        assert!(
            tries < 200,
            "upload {up} makes no progress at {offset}/{len}"
        );
        if resume {
            // As a tus client resumes: ask the next gateway where to go on.
            let (i, url) = c.pick_other(last);
            last = Some(i);
            let req = c
                .req(Method::HEAD, &url, &up, token)
                .header("tus-resumable", "1.0.0");
            match c.send(i, req).await {
                Ok(r) if r.status() == 200 => {
                    let at: usize = r.headers()["upload-offset"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(
                        at >= acked,
                        "upload {up}: gateway {i} reports offset {at} after {acked} bytes were \
                         acknowledged: an acknowledged chunk is lost"
                    );
                    assert!(at <= len);
                    offset = at;
                    resume = false;
                    continue;
                }
                Ok(r) if r.status() == 423 || r.status() == 409 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(r) => c.unexpected("HEAD", i, r).await,
                Err(e) => {
                    c.record_cut("HEAD", i, &e);
                    continue;
                }
            }
        }
        // The next planned cut at least MIN_PIECE ahead (after a resume
        // at an offset between cuts), or the end.
        let mut end = (offset / PIECE + 1) * PIECE;
        if end - offset < MIN_PIECE {
            end += PIECE;
        }
        let end = end.min(len);
        let piece = &data[offset..end];
        let (i, url) = c.pick_other(last);
        last = Some(i);
        let req = c
            .req(Method::PATCH, &url, &up, token)
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .header(
                "upload-checksum",
                format!("sha256 {}", STANDARD.encode(Sha256::digest(piece))),
            )
            .body(piece.to_vec());
        match c.send_patch(i, req).await {
            Ok(r) if r.status() == 204 => {
                let at: usize = r.headers()["upload-offset"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(at, end, "PATCH {offset}..{end} of {up} on gateway {i}");
                offset = at;
                acked = at;
                acked_by.push(i);
            }
            // Another PATCH of this upload still holds the range (the cut
            // one, until its gateway's reservation is gone), or the offset
            // moved: ask again.
            Ok(r) if r.status() == 409 || r.status() == 423 => {
                let _ = r.text().await;
                resume = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(r) => c.unexpected(&format!("PATCH {offset}..{end}"), i, r).await,
            Err(e) => {
                c.record_cut(&format!("PATCH {offset}..{end} of {up}"), i, &e);
                resume = true;
            }
        }
    }
    (up, acked_by)
}

/// The study view `GET /api/v1/studies/{sid}` from some live gateway.
async fn view(c: &Cluster, token: &str, sid: &str) -> Value {
    loop {
        let (i, url) = c.pick();
        let req = c.req(Method::GET, &url, &format!("/api/v1/studies/{sid}"), token);
        match c.send(i, req).await {
            Ok(r) if r.status() == 200 => return r.json().await.unwrap(),
            Ok(r) => c.unexpected("GET study", i, r).await,
            Err(e) => c.record_cut("GET study", i, &e),
        }
    }
}

/// Send one study by tus, then complete it; returns its session id.
async fn tus_study(c: &Cluster, token: &str, s: &Study) -> String {
    let sid = loop {
        let (i, url) = c.pick();
        match c
            .send(i, c.req(Method::POST, &url, "/api/v1/studies", token))
            .await
        {
            Ok(r) if r.status() == 201 => {
                let v: Value = r.json().await.unwrap();
                break v["id"].as_str().unwrap().to_owned();
            }
            Ok(r) => c.unexpected("POST /api/v1/studies", i, r).await,
            // The study opened on the dead gateway (if it was) expires.
            Err(e) => c.record_cut("POST /api/v1/studies", i, &e),
        }
    };
    let mut ours = BTreeSet::new();
    for f in &s.files {
        let (up, acked_by) = tus_file(c, token, &sid, &f.data).await;
        // Each PATCH goes to another gateway than the request before it
        // (`pick_other`); the large file's acknowledged PATCHes (at least
        // three) came from several.
        if f.data.len() > 4 * PIECE {
            let by: BTreeSet<usize> = acked_by.iter().copied().collect();
            assert!(
                acked_by.len() >= 3 && by.len() >= 2,
                "PATCHes of {up} acknowledged by {acked_by:?}"
            );
        }
        ours.insert(up);
    }
    // An upload created by a request the kill cut before its answer came
    // is the client's to remove (tus termination) before completing.
    let v = view(c, token, &sid).await;
    for f in v["files"].as_array().unwrap() {
        let up = f["upload_url"].as_str().unwrap();
        let path = up.find("/files/").map_or(up, |p| &up[p..]);
        if !ours.contains(path) {
            let (i, url) = c.pick();
            let req = c
                .req(Method::DELETE, &url, path, token)
                .header("tus-resumable", "1.0.0");
            match c.send(i, req).await {
                Ok(r) if r.status() == 204 => {}
                Ok(r) => c.unexpected("DELETE orphan upload", i, r).await,
                Err(e) => c.record_cut("DELETE orphan upload", i, &e),
            }
        }
    }
    let mut cut = false;
    loop {
        let (i, url) = c.pick();
        let req = c.req(
            Method::POST,
            &url,
            &format!("/api/v1/studies/{sid}/complete"),
            token,
        );
        match c.send(i, req).await {
            Ok(r) if r.status() == 202 => break,
            // A completion the kill cut may have been done: then the
            // study is no longer open and a second one is refused.
            Ok(r) if cut && r.status() == 409 => {
                let v = view(c, token, &sid).await;
                let st = v["state"]["state"].as_str().unwrap_or_default().to_owned();
                if st == "forwarding" || st == "delivered" {
                    break;
                }
                c.unexpected("POST complete (retried)", i, r).await
            }
            Ok(r) => c.unexpected("POST complete", i, r).await,
            Err(e) => {
                c.record_cut("POST complete", i, &e);
                cut = true;
            }
        }
    }
    sid
}

fn multipart(files: &[File], boundary: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(&f.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

/// Send one study in one STOW-RS request to gateway `target` (another if
/// it is dead or the kill cuts the request).
async fn stow_study(c: &Cluster, token: &str, s: &Study, target: usize) {
    let body = multipart(&s.files, "b0undary-3gw");
    let mut first = true;
    loop {
        let (i, url) = if first {
            c.pick_preferred(target)
        } else {
            c.pick()
        };
        first = false;
        let req = c
            .req(Method::POST, &url, "/dicomweb/studies", token)
            .header(
                "content-type",
                "multipart/related; type=\"application/dicom\"; boundary=b0undary-3gw",
            )
            .header("accept", "application/dicom+json")
            .body(body.clone());
        match c.send(i, req).await {
            Ok(r) if r.status() == 200 => {
                let v: Value = r.json().await.unwrap();
                let stored = v["00081199"]["Value"].as_array().map_or(0, Vec::len);
                assert_eq!(stored, s.files.len(), "STOW-RS on gateway {i}: {v}");
                return;
            }
            Ok(r) => c.unexpected("STOW-RS", i, r).await,
            Err(e) => c.record_cut("STOW-RS", i, &e),
        }
    }
}

/// Every page of a listing (`items`, `next`) at `path` from gateway `url`.
async fn all_pages(c: &Cluster, url: &str, path: &str, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut req = c
            .req(Method::GET, url, path, token)
            .query(&[("limit", "1000")]);
        if let Some(cur) = &cursor {
            req = req.query(&[("cursor", cur)]);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path} on {url}");
        let v: Value = r.json().await.unwrap();
        out.extend(v["items"].as_array().unwrap().iter().cloned());
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => return out,
        }
    }
}

/// What Orthanc holds of one study: SHA-256 of each instance's file, by
/// SOP Instance UID (the count per UID shows any duplicate).
fn orthanc_study(o: &Orthanc, study_uid: &str) -> BTreeMap<String, Vec<String>> {
    let (code, body) = o.rest("POST", "/tools/lookup", Some(study_uid.as_bytes()));
    assert_eq!(code, 200);
    let found: Value = serde_json::from_slice(&body).unwrap();
    let Some(id) = found
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["Type"] == "Study")
        .and_then(|v| v["ID"].as_str().map(str::to_owned))
    else {
        return BTreeMap::new();
    };
    let (code, body) = o.rest("GET", &format!("/studies/{id}/instances"), None);
    assert_eq!(code, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for inst in list.as_array().unwrap() {
        let iid = inst["ID"].as_str().unwrap();
        let sop = inst["MainDicomTags"]["SOPInstanceUID"]
            .as_str()
            .unwrap()
            .to_owned();
        let (code, file) = o.rest("GET", &format!("/instances/{iid}/file"), None);
        assert_eq!(code, 200, "file of {iid}");
        out.entry(sop).or_default().push(sha_hex(&file));
    }
    out
}

/// The configuration file of gateway `i` (`<dir>/gw<i>.toml`): its own
/// data folder; the secret, PostgreSQL database `db`, the S3 bucket and
/// Orthanc shared.
fn write_config(
    dir: &Path,
    i: usize,
    secret: &str,
    db: &str,
    s3: &S3Server,
    orthanc: &Orthanc,
) -> PathBuf {
    let path = dir.join(format!("gw{i}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"data_dir = {data:?}
secret = {secret:?}

[http]
min_free_bytes = 0

[state]
url = {db:?}

[chunks]
kind = "s3"
endpoint = {endpoint:?}
bucket = {bucket:?}
region = "us-east-1"
access_key_id = {ak:?}
secret_access_key = {sk:?}
allow_http = true

[[sinks]]
kind = "stow_rs"
url = {pacs:?}
user = {pacs_user:?}
password = {pacs_password:?}

# A dead gateway's delivery lease is taken over after `lease`; entries
# another gateway queued are found by the rescan.
[outbox]
base_delay = 0.2
max_delay = 1.0
lease = 15.0
rescan_interval = 1.0
"#,
            data = dir.join(format!("gw{i}")).display().to_string(),
            endpoint = s3.endpoint,
            bucket = s3.bucket,
            ak = s3.access_key,
            sk = s3.secret_key,
            pacs = orthanc.dicomweb(),
            pacs_user = orthanc.user,
            pacs_password = orthanc.password,
        ),
    )
    .unwrap();
    path
}

/// Orthanc holds each study exactly as sent (each SOP Instance UID once,
/// its file's SHA-256 that of the file sent, nothing else), and its
/// `ReceivedInstanceFilter` log (`received`) shows each instance received
/// once: never sent twice, not even as an identical copy.
async fn check_orthanc(orthanc: Arc<Orthanc>, studies: &[Study], received: &Path) {
    let uids: Vec<String> = studies.iter().map(|s| s.uid.clone()).collect();
    let (held, total) = tokio::task::spawn_blocking(move || {
        let held: Vec<BTreeMap<String, Vec<String>>> = uids
            .iter()
            .map(|uid| orthanc_study(&orthanc, uid))
            .collect();
        (held, orthanc.instance_count())
    })
    .await
    .unwrap();
    let sent_files: usize = studies.iter().map(|s| s.files.len()).sum();
    assert_eq!(
        total, sent_files,
        "Orthanc holds exactly the instances sent"
    );
    for (n, (s, h)) in studies.iter().zip(&held).enumerate() {
        let want: BTreeMap<String, Vec<String>> = s
            .files
            .iter()
            .map(|f| (f.sop.clone(), vec![sha_hex(&f.data)]))
            .collect();
        assert_eq!(
            h, &want,
            "study {n} at Orthanc (SOP UID → SHA-256 of each copy)"
        );
    }
    let log = std::fs::read_to_string(received).unwrap();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for l in log.lines() {
        *times.entry(l.trim()).or_default() += 1;
    }
    for (n, s) in studies.iter().enumerate() {
        for f in &s.files {
            assert_eq!(
                times.get(f.sop.as_str()).copied().unwrap_or(0),
                1,
                "study {n}: how many times Orthanc received instance {}",
                f.sop
            );
        }
    }
    assert_eq!(
        log.lines().count(),
        sent_files,
        "Orthanc received other instances"
    );
}

/// `relaypacs --config <c> audit verify` for each configuration: what
/// failed, with its output.
fn audit_verify(configs: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for config in configs {
        let out = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
            .arg("--config")
            .arg(config)
            .args(["audit", "verify"])
            .env_remove("RELAYPACS_CONFIG")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let name = config.file_name().unwrap().to_string_lossy();
        eprintln!("audit verify with {name}: {:?}\n{text}", out.status);
        if !out.status.success() {
            failures.push(format!(
                "`relaypacs --config {name} audit verify` exited {:?}: {text}",
                out.status.code()
            ));
        }
    }
    failures
}

/// Each user's notifications, read on every live gateway, hold exactly
/// one `delivered` per study of theirs (`sessions`: study index → session
/// id) and none for another: what differs.
async fn check_notifications(
    c: &Cluster,
    tokens: &[String],
    studies: &[Study],
    sessions: &BTreeMap<usize, String>,
) -> Vec<String> {
    let live: Vec<(usize, String)> = c
        .slots
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.alive)
        .map(|(i, s)| (i, s.url.clone()))
        .collect();
    let mut failures = Vec::new();
    for (u, token) in tokens.iter().enumerate() {
        let mine: BTreeSet<&str> = sessions
            .iter()
            .filter(|(n, _)| studies[**n].user == u)
            .map(|(_, sid)| sid.as_str())
            .collect();
        for (i, url) in &live {
            let notes = all_pages(c, url, "/api/v1/notifications", token).await;
            let mut delivered: BTreeMap<&str, usize> = BTreeMap::new();
            for n in &notes {
                if n["kind"] == "delivered" {
                    *delivered.entry(n["study"].as_str().unwrap()).or_default() += 1;
                }
            }
            let wrong: Vec<String> = mine
                .iter()
                .map(|sid| (*sid, delivered.get(sid).copied().unwrap_or(0)))
                .filter(|(_, k)| *k != 1)
                .map(|(sid, k)| format!("{sid}: {k}"))
                .chain(
                    delivered
                        .keys()
                        .filter(|sid| !mine.contains(*sid))
                        .map(|sid| format!("{sid}: not this user's study")),
                )
                .collect();
            if !wrong.is_empty() {
                failures.push(format!(
                    "{}'s notifications on gateway {i}: {} `delivered` for {} studies; \
                     studies without exactly one: {wrong:?}",
                    USERS[u],
                    delivered.values().sum::<usize>(),
                    mine.len()
                ));
            }
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_service_through_a_kill9_and_a_replacement() {
    let started = Instant::now();
    let mut dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if std::env::var_os("THREE_GATEWAYS_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    // Orthanc counts every instance it receives, before storing it (a
    // second copy of one SOP Instance UID is received but not stored
    // again, so only this log shows it).
    let received = dir.path().join("orthanc-received.log");
    let lua = format!(
        "function ReceivedInstanceFilter(dicom, origin, info)\n  \
         local f = io.open({path:?}, 'a')\n  \
         f:write(dicom.SOPInstanceUID .. '\\n')\n  \
         f:close()\n  \
         return true\n\
         end\n",
        path = received.display().to_string(),
    );
    let (pg, s3, orthanc) = tokio::join!(
        // A gateway crash is under test, not a machine crash: PostgreSQL
        // needs no fsync here.
        tokio::task::spawn_blocking(|| Postgres::start_with(PostgresOptions {
            durable: false,
            ..PostgresOptions::default()
        })),
        tokio::task::spawn_blocking(S3Server::start),
        tokio::task::spawn_blocking(move || Orthanc::start_with(OrthancOptions { lua: Some(lua) })),
    );
    let (pg, s3, orthanc) = (pg.unwrap(), s3.unwrap(), Arc::new(orthanc.unwrap()));
    let db = pg.create_database("relay");
    let secret = hex::encode(rand::random::<[u8; 32]>());

    // One configuration file per gateway: its own data folder, everything
    // else shared. The port comes from RELAYPACS_LISTEN.
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| write_config(dir.path(), i, &secret, &db, &s3, &orthanc))
        .collect();
    // Users are made once, in the shared database.
    for u in USERS {
        binary::add_user(
            &[OsStr::new("--config"), configs[0].as_os_str()],
            &[],
            u,
            "uploader",
            PASSWORD,
        );
    }
    let mut gateways: Vec<Gateway> = Vec::new();
    let mut slots = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let port = free_port();
        let log = dir.path().join(format!("gw{i}-{port}.log"));
        gateways.push(start_gateway(config, port, log.clone()));
        slots.push(Slot {
            url: format!("http://127.0.0.1:{port}"),
            alive: true,
            log,
            patches: Arc::new(AtomicUsize::new(0)),
        });
    }
    let c = Arc::new(Cluster {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        slots: Mutex::new(slots),
        next: AtomicUsize::new(0),
        cut: Mutex::new(Vec::new()),
        bad: Mutex::new(Vec::new()),
    });
    // Tokens from gateway 0, used on all.
    let mut tokens = Vec::new();
    for u in USERS {
        let url = c.slots.lock().unwrap()[0].url.clone();
        let t = binary::login(&c.http, &url, u, PASSWORD).await;
        tokens.push(t["access_token"].as_str().unwrap().to_owned());
    }
    let tokens = Arc::new(tokens);
    let studies = Arc::new(make_studies());
    eprintln!("peers and gateways up after {:?}", started.elapsed());

    // The clients: CLIENTS tasks taking studies in order.
    let queue = Arc::new(Mutex::new((0..STUDIES).collect::<VecDeque<usize>>()));
    let done = Arc::new(AtomicUsize::new(0));
    let replaced = Arc::new(tokio::sync::Notify::new());
    let replaced_flag = Arc::new(AtomicBool::new(false));
    let sessions: Arc<Mutex<BTreeMap<usize, String>>> = Arc::default();
    let finished: Arc<Mutex<BTreeSet<usize>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (c, queue, done, studies, tokens, sessions) = (
            c.clone(),
            queue.clone(),
            done.clone(),
            studies.clone(),
            tokens.clone(),
            sessions.clone(),
        );
        let (replaced, replaced_flag, finished) =
            (replaced.clone(), replaced_flag.clone(), finished.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let Some(n) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                if n >= AFTER_RESTART {
                    let wait = replaced.notified();
                    if !replaced_flag.load(Ordering::SeqCst) {
                        wait.await;
                    }
                }
                let s = &studies[n];
                let token = &tokens[s.user];
                match s.stow {
                    Some(target) => stow_study(&c, token, s, target).await,
                    None => {
                        let sid = tus_study(&c, token, s).await;
                        sessions.lock().unwrap().insert(n, sid);
                    }
                }
                finished.lock().unwrap().insert(n);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // The kill: once KILL_AFTER studies are acknowledged, wait for a
    // PATCH in flight to the victim, SIGKILL it, start a replacement
    // with its configuration on a fresh port. The STOW-RS studies before
    // the restart are acknowledged first: a gateway starting on the shared
    // database ends the STOW-RS requests the others are serving (the
    // server calls `Pipeline::end_orphaned_request_sessions` at every
    // start), a bug of its own; this test is about the kill.
    let early_stow: Vec<usize> = (0..AFTER_RESTART)
        .filter(|n| studies[*n].stow.is_some())
        .collect();
    let t0 = Instant::now();
    while done.load(Ordering::SeqCst) < KILL_AFTER
        || !early_stow
            .iter()
            .all(|n| finished.lock().unwrap().contains(n))
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "uploads stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let patches = c.slots.lock().unwrap()[VICTIM].patches.clone();
    let t1 = Instant::now();
    while patches.load(Ordering::SeqCst) == 0 {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "no PATCH to gateway {VICTIM} in flight"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let in_flight_at_kill = patches.load(Ordering::SeqCst);
    c.slots.lock().unwrap()[VICTIM].alive = false;
    gateways[VICTIM].child.kill().unwrap(); // SIGKILL
    gateways[VICTIM].child.wait().unwrap();
    let killed_at = started.elapsed();
    let port = free_port();
    let log = dir.path().join(format!("gw{VICTIM}-{port}.log"));
    gateways.push(start_gateway(&configs[VICTIM], port, log.clone()));
    c.slots.lock().unwrap().push(Slot {
        url: format!("http://127.0.0.1:{port}"),
        alive: true,
        log,
        patches: Arc::new(AtomicUsize::new(0)),
    });
    replaced_flag.store(true, Ordering::SeqCst);
    replaced.notify_waiters();
    eprintln!(
        "gateway {VICTIM} SIGKILLed at {killed_at:?} with {in_flight_at_kill} PATCH(es) in \
         flight after {} studies; replacement on port {port} after {:?}",
        KILL_AFTER,
        started.elapsed()
    );
    for t in clients {
        t.await.unwrap();
    }
    let uploaded_at = started.elapsed();
    let cut = c.cut.lock().unwrap().clone();
    eprintln!(
        "all {STUDIES} studies acknowledged after {uploaded_at:?}; {} request(s) cut by the \
         kill and retried: {cut:#?}",
        cut.len()
    );
    assert!(c.bad.lock().unwrap().is_empty());

    // The session of each study: tus ones known; STOW-RS ones found by
    // their Study Instance UID in the owner's list (read on a live gateway).
    let mut sessions = sessions.lock().unwrap().clone();
    for (u, token) in tokens.iter().enumerate() {
        let (_, url) = c.pick();
        let list = all_pages(&c, &url, "/api/v1/studies", token).await;
        for (n, s) in studies.iter().enumerate() {
            if s.user != u || s.stow.is_none() {
                continue;
            }
            let ids: Vec<&str> = list
                .iter()
                .filter(|v| v["study_instance_uid"] == s.uid.as_str())
                .map(|v| v["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids.len(), 1, "sessions of STOW-RS study {n}: {ids:?}");
            sessions.insert(n, ids[0].to_owned());
        }
    }
    assert_eq!(sessions.len(), STUDIES);

    // Every study delivered, content-verified, with all its files.
    let t2 = Instant::now();
    for (n, sid) in &sessions {
        let s = &studies[*n];
        loop {
            let v = view(&c, &tokens[s.user], sid).await;
            if v["state"]["state"] == "delivered" {
                assert_eq!(v["state"]["verified"], "content", "study {n}: {v:#}");
                assert_eq!(v["file_count"], s.files.len(), "study {n}: {v:#}");
                assert_eq!(v["study_instance_uid"], s.uid.as_str(), "study {n}");
                break;
            }
            assert!(
                t2.elapsed() < Duration::from_secs(120),
                "study {n} not delivered: {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let delivered_at = started.elapsed();
    eprintln!("all delivered after {delivered_at:?}");

    // Orthanc: each study exactly as sent, received once.
    check_orthanc(orthanc.clone(), &studies, &received).await;
    // The shared state's audit chain and the notifications: collected, so
    // one failure does not hide the other.
    let mut failures = audit_verify(&configs);
    failures.extend(check_notifications(&c, &tokens, &studies, &sessions).await);
    eprintln!(
        "checks done after {:?} (uploads {uploaded_at:?}, deliveries {delivered_at:?})",
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(gateways);
}

/// Starting a gateway on a shared database must not end a STOW-RS request
/// that another, live gateway is serving: the session of a request in
/// flight is not "left open by an earlier run". Gateway A takes a STOW-RS
/// request whose body stops after its first part; gateway B starts on the
/// same PostgreSQL meanwhile; then the rest of the body comes. The request
/// must store both instances (200) and the study be delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_starting_leaves_a_stow_request_on_another_alone() {
    let pg = tokio::task::spawn_blocking(|| {
        Postgres::start_with(PostgresOptions {
            durable: false,
            ..PostgresOptions::default()
        })
    })
    .await
    .unwrap();
    let db = pg.create_database("relay");
    let mut dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if std::env::var_os("THREE_GATEWAYS_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    // Chunks and the archive (the default sink) stay local to each
    // gateway: only A takes the request and delivers it.
    let configs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|name| {
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &path,
                format!(
                    "data_dir = {data:?}\nsecret = {secret:?}\n\n[http]\nmin_free_bytes = 0\n\n\
                     [state]\nurl = {db:?}\n",
                    data = dir.path().join(name).display().to_string(),
                ),
            )
            .unwrap();
            path
        })
        .collect();
    binary::add_user(
        &[OsStr::new("--config"), configs[0].as_os_str()],
        &[],
        "alice",
        "uploader",
        PASSWORD,
    );
    let port_a = free_port();
    let _a = start_gateway(&configs[0], port_a, dir.path().join("a.log"));
    let url = format!("http://127.0.0.1:{port_a}");
    let http = reqwest::Client::new();
    let token = binary::login(&http, &url, "alice", PASSWORD).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let uid = new_uid();
    let files: Vec<Vec<u8>> = (0..2)
        .map(|k| {
            generate(&DicomSpec {
                study_uid: uid.clone(),
                rows: 128,
                cols: 128,
                seed: k,
                ..DicomSpec::default()
            })
            .unwrap()
        })
        .collect();
    let head = |f: &[u8]| {
        let mut p = b"--b0undary-3gw\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
        p.extend_from_slice(f);
        p.extend_from_slice(b"\r\n");
        p
    };
    let first = head(&files[0]);
    let mut rest = head(&files[1]);
    rest.extend_from_slice(b"--b0undary-3gw--\r\n");
    let go_on = Arc::new(tokio::sync::Notify::new());
    let gate = go_on.clone();
    let body = futures::stream::iter([(0, first), (1, rest)]).then(move |(k, p)| {
        let gate = gate.clone();
        async move {
            // The second part waits until gateway B has started.
            if k == 1 {
                gate.notified().await;
            }
            Ok::<_, std::io::Error>(p)
        }
    });
    let req = http
        .post(format!("{url}/dicomweb/studies"))
        .bearer_auth(&token)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=b0undary-3gw",
        )
        .header("accept", "application/dicom+json")
        .body(reqwest::Body::wrap_stream(body));
    let stow = tokio::spawn(req.send());
    // The request's session is open on A (the first part is in).
    let t0 = Instant::now();
    let sid = loop {
        let list: Value = http
            .get(format!("{url}/api/v1/studies"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(s) = list["items"].as_array().unwrap().first() {
            break s["id"].as_str().unwrap().to_owned();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no STOW-RS session: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let port_b = free_port();
    let _b = start_gateway(&configs[1], port_b, dir.path().join("b.log"));
    go_on.notify_one();
    let r = stow.await.unwrap().unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(
        status,
        200,
        "the STOW-RS request on A after B started: {text}\n--- A's log:\n{}",
        tail(&dir.path().join("a.log"))
    );
    let t1 = Instant::now();
    loop {
        let r = http
            .get(format!("{url}/api/v1/studies/{sid}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        if v["state"]["state"] == "delivered" {
            assert_eq!(v["file_count"], 2, "{v:#}");
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(30), "{v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! The kill campaign behind `scripts/soak.sh` (outside CI: it runs for tens
//! of minutes). The real `relaypacs` binary (release build) forwards to a
//! real Orthanc over STOW-RS while parallel clients upload studies with tus
//! PATCHes and STOW-RS and complete them; the gateway is killed with
//! SIGKILL at random moments, again and again, and restarted.
//!
//! What is checked, and counted as a violation when it fails:
//! - after every restart, every byte a client saw acknowledged (tus 204 and
//!   its `Upload-Offset`) is still there: `HEAD` answers at least that
//!   offset, for every unfinished upload;
//! - every study whose completion was acknowledged (tus: 202 from
//!   `complete`; STOW-RS: 200) ends `delivered`, verified by content, and
//!   Orthanc holds each of its instances with exactly the bytes uploaded;
//! - Orthanc holds no instance of a study that was never completed, and no
//!   instance twice (its instance count is exactly the completed ones);
//! - the audit trail verifies (`relaypacs audit verify`) after restarts.
//!
//! `--power-loss` puts the data folder on an ext4 file system in a loop
//! device with the kernel's background writeback turned off, and at each
//! cut copies the device image instead of letting the kernel flush: what
//! was not fsync'd is lost, as in a power cut. Needs root; the VM settings
//! are restored at the end.
//!
//! Prints a JSON summary; exit code 1 when any violation was seen.

// A campaign tool: a failure to set up must stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rand::Rng;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_test_peers::{Orthanc, free_port};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PASSWORD: &str = "Velvet-Quarry-Lantern-5521";
const FILES_PER_STUDY: usize = 3;

#[derive(Debug)]
struct Args {
    kills: u64,
    clients: usize,
    gateway: PathBuf,
    power_loss: bool,
    work: PathBuf,
    out: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        kills: 1000,
        clients: 8,
        gateway: PathBuf::from("target/release/relaypacs"),
        power_loss: false,
        work: std::env::temp_dir().join("relaypacs-soak"),
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--kills" => a.kills = v().parse().expect("--kills N"),
            "--clients" => a.clients = v().parse().expect("--clients N"),
            "--gateway" => a.gateway = PathBuf::from(v()),
            "--work" => a.work = PathBuf::from(v()),
            "--out" => a.out = Some(PathBuf::from(v())),
            "--power-loss" => a.power_loss = true,
            other => panic!(
                "unknown argument {other}; usage: soak [--kills N] [--clients N] \
                 [--gateway PATH] [--work DIR] [--out FILE] [--power-loss]"
            ),
        }
    }
    a
}

/// One instance a client sent: its SOP Instance UID and the SHA-256 of its
/// bytes.
#[derive(Clone, Debug)]
struct Sent {
    sop: String,
    sha256: String,
}

/// A study whose completion the gateway acknowledged.
#[derive(Clone, Debug)]
struct Completed {
    /// Gateway session id (tus studies; STOW-RS answers no session id).
    session: Option<String>,
    client: usize,
    instances: Vec<Sent>,
}

/// An upload in progress and the highest offset the gateway acknowledged.
#[derive(Clone, Debug)]
struct Open {
    client: usize,
    acked: u64,
}

#[derive(Default, Debug)]
struct Ledger {
    completed: Vec<Completed>,
    /// Instances of studies that were never acknowledged as completed.
    abandoned: Vec<String>,
    open: BTreeMap<String, Open>,
    violations: Vec<String>,
    /// What each client is doing (for a stuck campaign's diagnosis).
    doing: BTreeMap<usize, String>,
    /// Violations where acknowledged data is missing or altered.
    lost: usize,
}

#[derive(Default, Debug)]
struct Counters {
    acked_bytes: AtomicU64,
    bytes_checked: AtomicU64,
    head_checks: AtomicU64,
    patches: AtomicU64,
    stow_requests: AtomicU64,
    interrupted: AtomicU64,
    orphans_removed: AtomicU64,
}

struct Gateway {
    bin: PathBuf,
    config: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Gateway {
    fn start(&mut self) {
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start relaypacs");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The data folder on a loop-mounted ext4 whose unsynced writes a cut
/// discards.
struct PowerLoss {
    image: PathBuf,
    mount: PathBuf,
    saved_vm: Vec<(&'static str, String)>,
}

const VM_KNOBS: [(&str, &str); 2] = [
    ("/proc/sys/vm/dirty_expire_centisecs", "360000"),
    ("/proc/sys/vm/dirty_writeback_centisecs", "0"),
];

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PowerLoss {
    fn new(work: &Path) -> Self {
        let image = work.join("data.img");
        let mount = work.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        run(Command::new("truncate").args(["-s", "4G"]).arg(&image));
        run(Command::new("mkfs.ext4").arg("-q").arg(&image));
        let mut saved_vm = Vec::new();
        for (knob, value) in VM_KNOBS {
            saved_vm.push((
                knob,
                std::fs::read_to_string(knob).unwrap().trim().to_owned(),
            ));
            std::fs::write(knob, value).expect("set a VM writeback knob (needs root)");
        }
        let p = Self {
            image,
            mount,
            saved_vm,
        };
        p.mount_image();
        p.self_check();
        p
    }

    /// Prove the cut loses what was not synced: a file written and synced
    /// survives it, the bytes of one written without fsync do not.
    fn self_check(&self) {
        let synced = self.mount.join("probe-synced");
        let unsynced = self.mount.join("probe-unsynced");
        let mut f = std::fs::File::create(&synced).unwrap();
        f.write_all(&[7u8; 65536]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        std::fs::write(&unsynced, [9u8; 65536]).unwrap();
        std::fs::File::open(&self.mount)
            .unwrap()
            .sync_all()
            .unwrap();
        self.cut();
        let kept = std::fs::read(&synced).unwrap_or_default();
        let lost = std::fs::read(&unsynced).unwrap_or_default();
        assert_eq!(kept.len(), 65536, "a synced file did not survive the cut");
        assert!(
            lost.len() < 65536,
            "unsynced bytes survived the cut: this file system does not simulate power loss"
        );
        std::fs::remove_file(&synced).unwrap();
        let _ = std::fs::remove_file(&unsynced);
        run(&mut Command::new("sync"));
    }

    fn mount_image(&self) {
        // commit=600: no periodic journal commit (which, with
        // data=ordered, would write unsynced data too) within a cycle.
        run(Command::new("mount")
            .args(["-o", "loop,commit=600"])
            .arg(&self.image)
            .arg(&self.mount));
    }

    /// The power cut: the device image as it is now (what was written to
    /// the device, i.e. synced or written back) replaces the file system;
    /// whatever was only in the page cache is gone.
    fn cut(&self) {
        let snap = self.image.with_extension("cut");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&self.image)
            .arg(&snap));
        run(Command::new("umount").arg(&self.mount));
        std::fs::rename(&snap, &self.image).unwrap();
        self.mount_image();
    }
}

impl Drop for PowerLoss {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
        for (knob, value) in &self.saved_vm {
            let _ = std::fs::write(knob, value);
        }
    }
}

fn add_user(gw: &Gateway, name: &str) {
    let mut add = Command::new(&gw.bin)
        .arg("--config")
        .arg(&gw.config)
        .args(["user", "add", name, "--role", "uploader"])
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
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct Client {
    n: usize,
    url: String,
    http: reqwest::Client,
    token: String,
    ledger: Arc<Mutex<Ledger>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

/// A request failed because the gateway went away (killed, restarting).
#[derive(Debug)]
struct Down;

type Step<T> = Result<T, Down>;

impl Client {
    fn doing(&self, what: impl Into<String>) {
        self.ledger
            .lock()
            .unwrap()
            .doing
            .insert(self.n, what.into());
    }

    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.ledger.lock().unwrap().violations.push(what);
    }

    async fn wait_up(&self) {
        self.counters.interrupted.fetch_add(1, Ordering::Relaxed);
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn login(&mut self) {
        loop {
            let r = self
                .http
                .post(format!("{}/api/v1/auth/login", self.url))
                .json(&json!({"username": format!("soak{}", self.n), "password": PASSWORD}))
                .send()
                .await;
            if let Ok(r) = r {
                if r.status().is_success() {
                    let v: Value = r.json().await.unwrap_or_default();
                    if let Some(t) = v["access_token"].as_str() {
                        self.token = t.to_owned();
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(3)).await; // rate limit
            } else {
                self.wait_up().await;
            }
        }
    }

    /// Send a request; `Down` when the connection failed; a 401 logs in
    /// again and retries.
    async fn send(
        &mut self,
        make: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Step<reqwest::Response> {
        loop {
            match make(&self.http, &self.url)
                .bearer_auth(&self.token)
                .send()
                .await
            {
                Ok(r) if r.status() == 401 => self.login().await,
                Ok(r) => return Ok(r),
                Err(_) => return Err(Down),
            }
        }
    }

    async fn create_study(&mut self) -> String {
        self.doing("create study");
        loop {
            match self
                .send(|h, u| h.post(format!("{u}/api/v1/studies")))
                .await
            {
                Ok(r) if r.status() == 201 => {
                    if let Ok(v) = r.json::<Value>().await
                        && let Some(id) = v["id"].as_str()
                    {
                        return id.to_owned();
                    }
                }
                Ok(r) if r.status() == 429 || r.status() == 507 || r.status() == 413 => {
                    let body = r.text().await.unwrap_or_default();
                    if body.contains("RELAY_TOO_MANY_SESSIONS") {
                        // Creations whose answer was lost left open, empty
                        // studies this client never heard of: at the cap,
                        // a client ends its own open studies (it has none
                        // in progress while it creates one).
                        self.end_orphan_studies().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                Ok(r) => {
                    let s = r.status();
                    let body = r.text().await.unwrap_or_default();
                    self.violation(format!("client {}: create study: {s} {body}", self.n));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(Down) => self.wait_up().await,
            }
        }
    }

    /// End every open study of this user (see `create_study`).
    async fn end_orphan_studies(&mut self) {
        let mut cursor: Option<String> = None;
        let mut open = Vec::new();
        loop {
            let c = cursor.clone();
            let Ok(r) = self
                .send(move |h, u| {
                    let q = c
                        .as_ref()
                        .map(|c| format!("?limit=1000&cursor={c}"))
                        .unwrap_or_else(|| "?limit=1000".into());
                    h.get(format!("{u}/api/v1/studies{q}"))
                })
                .await
            else {
                return;
            };
            let v: Value = r.json().await.unwrap_or_default();
            // `{items, next}` pages, or one bare array from older servers.
            let items = if v.is_array() { &v } else { &v["items"] };
            for s in items.as_array().into_iter().flatten() {
                if s["state"]["state"] == "open"
                    && let Some(id) = s["id"].as_str()
                {
                    open.push(id.to_owned());
                }
            }
            match v["next"].as_str() {
                Some(n) => cursor = Some(n.to_owned()),
                None => break,
            }
        }
        for id in open {
            let _ = self
                .send(move |h, u| h.delete(format!("{u}/api/v1/studies/{id}")))
                .await;
            self.counters
                .orphans_removed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Upload one file with tus, resuming across kills; checks after each
    /// interruption that the acknowledged offset survived.
    async fn tus_file(&mut self, study: &str, data: &[u8]) -> Step<String> {
        let meta = format!(
            "filename {},session {},sha256 {}",
            b64("image.dcm"),
            b64(study),
            b64(&hex_sha256(data))
        );
        let len = data.len();
        self.doing("tus create");
        let location = loop {
            let meta = meta.clone();
            match self
                .send(|h, u| {
                    h.post(format!("{u}/files"))
                        .header("tus-resumable", "1.0.0")
                        .header("upload-length", len.to_string())
                        .header("upload-metadata", meta.clone())
                })
                .await
            {
                Ok(r) if r.status() == 201 => {
                    break r.headers()["location"].to_str().unwrap().to_owned();
                }
                Ok(r) if r.status() == 429 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok(r) => {
                    let s = r.status();
                    let body = r.text().await.unwrap_or_default();
                    self.violation(format!("client {}: tus create: {s} {body}", self.n));
                    return Err(Down);
                }
                Err(Down) => self.wait_up().await,
            }
        };
        self.ledger.lock().unwrap().open.insert(
            location.clone(),
            Open {
                client: self.n,
                acked: 0,
            },
        );
        let mut offset = 0u64;
        while (offset as usize) < data.len() {
            self.doing(format!("PATCH {location} at {offset}"));
            let piece = rand::rng().random_range((64 << 10)..(400 << 10));
            let end = (offset as usize + piece).min(data.len());
            let end = if data.len() - end < (64 << 10) {
                data.len()
            } else {
                end
            };
            let body = data[offset as usize..end].to_vec();
            self.counters.patches.fetch_add(1, Ordering::Relaxed);
            let loc = location.clone();
            let r = self
                .send(move |h, u| {
                    h.patch(format!("{u}{loc}"))
                        .header("tus-resumable", "1.0.0")
                        .header("upload-offset", offset.to_string())
                        .header("content-type", "application/offset+octet-stream")
                        .body(body.clone())
                })
                .await;
            match r {
                Ok(r) if r.status() == 204 => {
                    let at: u64 = r.headers()["upload-offset"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    self.counters
                        .acked_bytes
                        .fetch_add(at - offset, Ordering::Relaxed);
                    offset = at;
                    if let Some(o) = self.ledger.lock().unwrap().open.get_mut(&location) {
                        o.acked = at;
                    }
                }
                Ok(r) if r.status() == 409 || r.status() == 429 => {
                    // Busy or a stale offset after an interruption: ask.
                    offset = self.resume_offset(&location).await?;
                }
                Ok(r) => {
                    let s = r.status();
                    let body = r.text().await.unwrap_or_default();
                    self.violation(format!("client {}: PATCH {location}: {s} {body}", self.n));
                    return Err(Down);
                }
                Err(Down) => {
                    self.wait_up().await;
                    offset = self.resume_offset(&location).await?;
                }
            }
        }
        Ok(location)
    }

    /// `HEAD` an upload after an interruption; the answer must cover what
    /// was acknowledged.
    async fn resume_offset(&mut self, location: &str) -> Step<u64> {
        loop {
            // Read what was acknowledged before asking: a PATCH of the
            // owner may still be running while a checker asks.
            let acked = self
                .ledger
                .lock()
                .unwrap()
                .open
                .get(location)
                .map_or(0, |o| o.acked);
            let loc = location.to_owned();
            match self
                .send(move |h, u| h.head(format!("{u}{loc}")).header("tus-resumable", "1.0.0"))
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let at: u64 = r.headers()["upload-offset"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    self.counters.head_checks.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .bytes_checked
                        .fetch_add(acked, Ordering::Relaxed);
                    if at < acked {
                        self.ledger.lock().unwrap().lost += 1;
                        self.violation(format!(
                            "client {}: {location} acknowledged {acked} bytes, HEAD says {at}",
                            self.n
                        ));
                    }
                    return Ok(at);
                }
                Ok(r)
                    if r.status() == 404
                        && !self.ledger.lock().unwrap().open.contains_key(location) =>
                {
                    // The owner finished or gave up the study meanwhile.
                    return Err(Down);
                }
                Ok(r) => {
                    let s = r.status();
                    self.violation(format!("client {}: HEAD {location}: {s}", self.n));
                    return Err(Down);
                }
                Err(Down) => self.wait_up().await,
            }
        }
    }

    /// `complete`, retried across kills; true once acknowledged.
    /// A creation whose answer was lost (the gateway was killed after it
    /// added the file) leaves a file the client never heard of: the
    /// study cannot complete with it. A client deletes it, as a tus client
    /// terminates an upload it gave up (tus termination extension).
    async fn remove_orphan(&mut self, study: &str, body: &str, known: &[String]) -> bool {
        let Some(fid) = body
            .split("file ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
        else {
            return false;
        };
        let location = format!("/files/{study}{fid}");
        if known.contains(&location) {
            return false;
        }
        let loc = location.clone();
        match self
            .send(move |h, u| {
                h.delete(format!("{u}{loc}"))
                    .header("tus-resumable", "1.0.0")
            })
            .await
        {
            Ok(r) if r.status() == 204 || r.status() == 404 => {
                self.counters
                    .orphans_removed
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    async fn complete(&mut self, study: &str, known: &[String]) -> bool {
        self.doing(format!("complete {study}"));
        loop {
            let s = study.to_owned();
            match self
                .send(move |h, u| h.post(format!("{u}/api/v1/studies/{s}/complete")))
                .await
            {
                Ok(r) if r.status() == 202 => return true,
                Ok(r) if r.status() == 409 => {
                    // Already completed by a request whose answer was lost,
                    // or still busy: the study's state tells.
                    let body = r.text().await.unwrap_or_default();
                    self.doing(format!("complete {study}: 409 {body}"));
                    if self.remove_orphan(study, &body, known).await {
                        continue;
                    }
                    let s = study.to_owned();
                    if let Ok(r) = self
                        .send(move |h, u| h.get(format!("{u}/api/v1/studies/{s}")))
                        .await
                        && let Ok(v) = r.json::<Value>().await
                        && v["state"]["state"] != "open"
                    {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(r) => {
                    let s = r.status();
                    let body = r.text().await.unwrap_or_default();
                    self.violation(format!("client {}: complete {study}: {s} {body}", self.n));
                    return false;
                }
                Err(Down) => self.wait_up().await,
            }
        }
    }

    async fn tus_study(&mut self) {
        let study_uid = new_uid();
        let files: Vec<(Sent, Vec<u8>)> = (0..FILES_PER_STUDY)
            .map(|i| make(&study_uid, i == 0))
            .collect();
        let sid = self.create_study().await;
        let mut known = Vec::new();
        for (_, data) in &files {
            if self.stop.load(Ordering::Relaxed) {
                self.abandon(&files);
                return;
            }
            match self.tus_file(&sid, data).await {
                Ok(location) => known.push(location),
                Err(Down) => {
                    self.abandon(&files);
                    return;
                }
            }
        }
        let done = self.complete(&sid, &known).await;
        let mut l = self.ledger.lock().unwrap();
        l.open.retain(|_, o| o.client != self.n);
        let instances = files.into_iter().map(|(s, _)| s).collect();
        if done {
            l.completed.push(Completed {
                session: Some(sid),
                client: self.n,
                instances,
            });
        } else {
            l.abandoned.extend(instances_sops(&instances));
        }
    }

    fn abandon(&self, files: &[(Sent, Vec<u8>)]) {
        let mut l = self.ledger.lock().unwrap();
        l.open.retain(|_, o| o.client != self.n);
        l.abandoned.extend(files.iter().map(|(s, _)| s.sop.clone()));
    }

    async fn stow_study(&mut self) {
        let study_uid = new_uid();
        let files: Vec<(Sent, Vec<u8>)> = (0..FILES_PER_STUDY)
            .map(|i| make(&study_uid, i == 0))
            .collect();
        let boundary = format!("soak{}", rand::random::<u64>());
        let mut body = Vec::new();
        for (_, data) in &files {
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.doing("STOW-RS");
        loop {
            self.counters.stow_requests.fetch_add(1, Ordering::Relaxed);
            let (b, bd, st) = (body.clone(), boundary.clone(), study_uid.clone());
            match self
                .send(move |h, u| {
                    h.post(format!("{u}/dicomweb/studies/{st}"))
                        .header(
                            "content-type",
                            format!("multipart/related; type=\"application/dicom\"; boundary={bd}"),
                        )
                        .header("accept", "application/dicom+json")
                        .body(b.clone())
                })
                .await
            {
                // 200: all stored; 202: stored with warnings (e.g. the same
                // content accepted before, when an earlier answer was lost).
                Ok(r) if r.status() == 200 || r.status() == 202 => {
                    let v: Value = r.json().await.unwrap_or_default();
                    if !v["00081198"].is_null() {
                        self.violation(format!("client {}: STOW-RS failures: {v}", self.n));
                        self.abandon(&files);
                        return;
                    }
                    self.counters
                        .acked_bytes
                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                    let instances = files.into_iter().map(|(s, _)| s).collect();
                    self.ledger.lock().unwrap().completed.push(Completed {
                        session: None,
                        client: self.n,
                        instances,
                    });
                    return;
                }
                Ok(r) if r.status() == 429 || r.status() == 507 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok(r) => {
                    let s = r.status();
                    let text = r.text().await.unwrap_or_default();
                    self.violation(format!("client {}: STOW-RS: {s} {text}", self.n));
                    self.abandon(&files);
                    return;
                }
                // Unknown whether it was taken: send it again (the same
                // content is an idempotent success).
                Err(Down) => self.wait_up().await,
            }
            if self.stop.load(Ordering::Relaxed) {
                // Whether the last attempt was taken is unknown: the
                // final check accepts either for these instances.
                self.abandon(&files);
                return;
            }
        }
    }

    async fn run(mut self) {
        self.login().await;
        let mut k = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            if (k + self.n) % 4 == 3 {
                self.stow_study().await;
            } else {
                self.tus_study().await;
            }
            k += 1;
            // A clinic does not send back to back: a short pause keeps
            // the campaign's data (and the final check) bounded.
            let pause = rand::rng().random_range(0..400);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self.doing("stopped");
    }
}

fn instances_sops(v: &[Sent]) -> Vec<String> {
    v.iter().map(|s| s.sop.clone()).collect()
}

/// One generated instance of `study_uid`: `big` ones (~130 KiB to 520 KiB)
/// take several PATCHes, the others (~8 KiB to 48 KiB) one.
fn make(study_uid: &str, big: bool) -> (Sent, Vec<u8>) {
    let mut rng = rand::rng();
    let rows = if big {
        rng.random_range(256..512)
    } else {
        rng.random_range(32..192)
    };
    let spec = DicomSpec {
        study_uid: study_uid.to_owned(),
        sop_instance_uid: new_uid(),
        rows,
        cols: if big { 256 } else { 128 },
        seed: rng.random(),
        ..DicomSpec::default()
    };
    let data = generate(&spec).expect("generate a DICOM file");
    (
        Sent {
            sop: spec.sop_instance_uid,
            sha256: hex_sha256(&data),
        },
        data,
    )
}

fn audit_verify(gw: &Gateway, ledger: &Mutex<Ledger>) -> bool {
    let out = Command::new(&gw.bin)
        .arg("--config")
        .arg(&gw.config)
        .args(["audit", "verify"])
        .output()
        .expect("run relaypacs audit verify");
    if !out.status.success() {
        ledger.lock().unwrap().violations.push(format!(
            "audit verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    out.status.success()
}

/// Every instance Orthanc holds: SOP Instance UID → Orthanc id, in one
/// `/tools/find` request.
async fn orthanc_index(http: &reqwest::Client, o: &Orthanc) -> BTreeMap<String, String> {
    let v: Value = http
        .post(format!("{}/tools/find", o.url()))
        .basic_auth(&o.user, Some(&o.password))
        .json(&json!({"Level": "Instance", "Expand": true, "Query": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["MainDicomTags"]["SOPInstanceUID"].as_str()?.to_owned(),
                i["ID"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

async fn wait_http(url: &str) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the gateway did not come back within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).unwrap();
    let power = a.power_loss.then(|| PowerLoss::new(&a.work));
    let data_dir = match &power {
        Some(p) => p.mount.join("data"),
        None => a.work.join("data"),
    };
    let orthanc = tokio::task::spawn_blocking(Orthanc::start).await.unwrap();
    let port = free_port();
    let config = a.work.join("relaypacs.toml");
    let outbox = "base_delay = 0.2\nmax_delay = 1.0\n";
    std::fs::write(&config, orthanc.gateway_config(port, &data_dir, outbox)).unwrap();
    let mut gw = Gateway {
        bin: std::fs::canonicalize(&a.gateway).expect("the relaypacs binary (build --release)"),
        config,
        port,
        child: None,
    };
    for n in 0..a.clients {
        add_user(&gw, &format!("soak{n}"));
    }
    if power.is_some() {
        run(&mut Command::new("sync"));
    }
    let url = gw.url();
    gw.start();
    wait_http(&url).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..a.clients {
        let c = Client {
            n,
            url: url.clone(),
            http: http.clone(),
            token: String::new(),
            ledger: ledger.clone(),
            counters: counters.clone(),
            stop: stop.clone(),
        };
        tasks.push(tokio::spawn(c.run()));
    }

    // One checker per user: after each restart it asks for every upload
    // not yet part of a completed study.
    let mut checkers: Vec<Client> = Vec::new();
    for n in 0..a.clients {
        let mut c = Client {
            n,
            url: url.clone(),
            http: http.clone(),
            token: String::new(),
            ledger: ledger.clone(),
            counters: counters.clone(),
            stop: stop.clone(),
        };
        c.login().await;
        checkers.push(c);
    }
    let mut audit_checks = 0u64;
    for kill in 1..=a.kills {
        let wait = rand::rng().random_range(100..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        gw.kill();
        if let Some(p) = &power {
            p.cut();
        }
        if kill % 50 == 0 || kill == a.kills {
            audit_checks += 1;
            audit_verify(&gw, &ledger);
        }
        gw.start();
        wait_http(&url).await;
        let open: Vec<(String, usize)> = ledger
            .lock()
            .unwrap()
            .open
            .iter()
            .map(|(loc, o)| (loc.clone(), o.client))
            .collect();
        for (loc, client) in open {
            let _ = checkers[client].resume_offset(&loc).await;
        }
        if kill % 50 == 0 {
            let l = ledger.lock().unwrap();
            eprintln!(
                "soak: {kill} kills, {} studies completed, {} violations, {:?}",
                l.completed.len(),
                l.violations.len(),
                started.elapsed()
            );
        }
    }
    eprintln!("soak: {} kills done after {:?}", a.kills, started.elapsed());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .is_err()
        {
            eprintln!(
                "soak: a client is stuck: {:?}",
                ledger.lock().unwrap().doing
            );
        }
    }
    eprintln!("soak: clients stopped after {:?}", started.elapsed());

    // Every acknowledged study delivered, content-verified, in Orthanc.
    let completed = ledger.lock().unwrap().completed.clone();
    let mut tokens = BTreeMap::new();
    for n in 0..a.clients {
        let v: Value = http
            .post(format!("{url}/api/v1/auth/login"))
            .json(&json!({"username": format!("soak{n}"), "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        tokens.insert(n, v["access_token"].as_str().unwrap_or_default().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut delivered = 0usize;
    for c in &completed {
        let Some(sid) = &c.session else { continue };
        loop {
            let v: Value = http
                .get(format!("{url}/api/v1/studies/{sid}"))
                .bearer_auth(&tokens[&c.client])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or_default();
            let state = &v["state"]["state"];
            if state == "delivered" {
                if v["state"]["verified"] != "content" {
                    ledger.lock().unwrap().violations.push(format!(
                        "study {sid} delivered without content verification: {v}"
                    ));
                }
                delivered += 1;
                break;
            }
            if state != "forwarding" || Instant::now() > deadline {
                ledger
                    .lock()
                    .unwrap()
                    .violations
                    .push(format!("study {sid} not delivered: {v}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("soak: deliveries checked after {:?}", started.elapsed());
    // STOW-RS studies have no session id to ask: Orthanc must hold them.
    let wait_orthanc = Instant::now() + Duration::from_secs(300);
    let expected: usize = completed.iter().map(|c| c.instances.len()).sum();
    let abandoned = ledger.lock().unwrap().abandoned.clone();
    let mut instances_checked = 0usize;
    let mut index = orthanc_index(&http, &orthanc).await;
    loop {
        let missing: Vec<&Sent> = completed
            .iter()
            .flat_map(|c| c.instances.iter())
            .filter(|s| !index.contains_key(&s.sop))
            .collect();
        if missing.is_empty() || Instant::now() > wait_orthanc {
            for s in missing {
                let mut l = ledger.lock().unwrap();
                l.lost += 1;
                l.violations
                    .push(format!("Orthanc lacks acknowledged instance {}", s.sop));
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        index = orthanc_index(&http, &orthanc).await;
    }
    for s in completed.iter().flat_map(|c| c.instances.iter()) {
        let Some(id) = index.get(&s.sop) else {
            continue;
        };
        let file = http
            .get(format!("{}/instances/{id}/file", orthanc.url()))
            .basic_auth(&orthanc.user, Some(&orthanc.password))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        instances_checked += 1;
        if hex_sha256(&file) != s.sha256 {
            let mut l = ledger.lock().unwrap();
            l.lost += 1;
            l.violations
                .push(format!("Orthanc holds other bytes for {}", s.sop));
        }
    }
    // Orthanc holds the completed instances, plus at most the abandoned
    // STOW-RS ones whose last answer was lost; never anything else.
    let held = index.len();
    let stray = held.saturating_sub(expected);
    if stray > 0 {
        let abandoned_held = abandoned
            .iter()
            .filter(|sop| index.contains_key(*sop))
            .count();
        if stray > abandoned_held {
            ledger.lock().unwrap().violations.push(format!(
                "Orthanc holds {held} instances, {expected} acknowledged, {abandoned_held} of \
                 unacknowledged requests"
            ));
        }
    }
    eprintln!("soak: Orthanc checked after {:?}", started.elapsed());
    // Delivered once: one successful forward record per session.
    // The trail is the state database's chain: read it as the CLI exports it.
    let exported = Command::new(&gw.bin)
        .arg("--config")
        .arg(&gw.config)
        .args(["audit", "export", "--format", "jsonl"])
        .output()
        .expect("run relaypacs audit export");
    let trail = String::from_utf8_lossy(&exported.stdout).into_owned();
    let mut forwards: BTreeMap<String, u32> = BTreeMap::new();
    for line in trail.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            let ev = if v["event"].is_object() {
                &v["event"]
            } else {
                &v
            };
            if ev["action"] == "forwarded"
                && ev["outcome"] == "success"
                && let Some(s) = ev["session"].as_str()
            {
                *forwards.entry(s.to_owned()).or_default() += 1;
            }
        }
    }
    let max_forward_records = forwards.values().copied().max().unwrap_or(0);
    audit_checks += 1;
    audit_verify(&gw, &ledger);
    gw.kill();

    let l = ledger.lock().unwrap();
    let summary = json!({
        "mode": if a.power_loss { "power-loss" } else { "sigkill" },
        "kills": a.kills,
        "clients": a.clients,
        "elapsed_secs": started.elapsed().as_secs(),
        "patches": counters.patches.load(Ordering::Relaxed),
        "stow_requests": counters.stow_requests.load(Ordering::Relaxed),
        "acknowledged_bytes": counters.acked_bytes.load(Ordering::Relaxed),
        "interruptions_seen_by_clients": counters.interrupted.load(Ordering::Relaxed),
        "orphan_uploads_and_studies_ended": counters.orphans_removed.load(Ordering::Relaxed),
        "head_checks_after_restart": counters.head_checks.load(Ordering::Relaxed),
        "acknowledged_bytes_checked_after_restart": counters.bytes_checked.load(Ordering::Relaxed),
        "studies_completed": completed.len(),
        "tus_studies_delivered_content_verified": delivered,
        "instances_acknowledged": expected,
        "instances_checked_in_orthanc": instances_checked,
        "orthanc_instances": held,
        "max_forward_records_per_session": max_forward_records,
        "audit_verifications": audit_checks,
        "violations": l.violations.len(),
        "lost": l.lost,
        "first_violations": l.violations.iter().take(20).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&summary).unwrap();
    println!("{text}");
    if let Some(out) = &a.out {
        std::fs::write(out, &text).unwrap();
    }
    drop(power);
    if !l.violations.is_empty() {
        std::process::exit(1);
    }
}

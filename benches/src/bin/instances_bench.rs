//! One gateway against several on one PostgreSQL (issue 12, "several
//! gateways, one service"). Starts a throwaway PostgreSQL 15 cluster
//! (durable settings) and an s3s-fs server (the shared chunk store: a tus
//! upload's requests may reach any gateway, so chunks under one gateway's
//! data folder would not do), then, for each entry of `--order` (default
//! `1,3,1,3`), N release `relaypacs` processes sharing both, each with its
//! own data folder (its default local-archive sink). All rounds use one
//! database, so later rounds see the rows of earlier ones; each round has
//! a fresh s3s-fs (its CPU per request grows with the objects it holds).
//!
//! The client: `--clients` tasks (default 16, one user each, as 16
//! modalities would be), each uploading `--studies` studies (default 3) of
//! `--files` files (default 20) of about `--kib` KiB (default 64): open the
//! study, one tus creation-with-upload POST per file (its SHA-256 in
//! `Upload-Checksum`), complete the study. Every request goes to the next
//! gateway in turn (one counter shared by all tasks), so the files of one
//! study land on every gateway. The DICOM files are generated and hashed
//! before the timing. Prints files/s from the first request to the last
//! completion answered, and to the last study delivered into an archive;
//! CPU seconds of the gateways, PostgreSQL, s3s-fs and this client over
//! the upload phase; and the client's ceiling: `GET /healthz` requests/s
//! with the same number of tasks against the same gateways.
//!
//! Needs the release server: `cargo build --release -p relaypacs-http
//! --bin relaypacs`; it is looked for beside this binary (or `--server
//! PATH`).
//!
//! Run: `cargo run --release -p relaypacs-benches --bin instances_bench`
//! (options: `--order 1,3,1,3`, `--clients N`, `--studies N`, `--files N`,
//! `--kib N`, `--server PATH`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use relaypacs_benches::Res;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_test_peers::{Postgres, S3Server, free_port};
use reqwest::{Client, StatusCode};
use sha2::{Digest, Sha256};

const PASSWORD: &str = "bench password long enough 123";

struct Args {
    order: Vec<usize>,
    clients: usize,
    studies: usize,
    files: usize,
    kib: usize,
    server: PathBuf,
}

fn parse_args() -> Res<Args> {
    let exe = std::env::current_exe()?;
    let mut a = Args {
        order: vec![1, 3, 1, 3],
        clients: 16,
        studies: 3,
        files: 20,
        kib: 64,
        server: exe.with_file_name("relaypacs"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--order" => {
                a.order = v
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<Vec<usize>, _>>()?;
                if a.order.contains(&0) {
                    return Err("--order: every entry at least 1".into());
                }
            }
            "--clients" => a.clients = v.parse::<usize>()?.max(1),
            "--studies" => a.studies = v.parse::<usize>()?.max(1),
            "--files" => a.files = v.parse::<usize>()?.max(1),
            "--kib" => a.kib = v.parse::<usize>()?.max(1),
            "--server" => a.server = PathBuf::from(v),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if !a.server.is_file() {
        return Err(format!(
            "no server at {}: cargo build --release -p relaypacs-http --bin relaypacs",
            a.server.display()
        )
        .into());
    }
    Ok(a)
}

fn hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What every gateway's configuration shares.
struct Shared {
    secret: String,
    db: String,
    /// A fresh s3s-fs for each round (its cost grows with what its
    /// folder holds, which would charge later rounds for earlier ones).
    s3: S3Server,
    dir: PathBuf,
    server: PathBuf,
}

impl Shared {
    /// Gateway `i`'s configuration file, listening on `port`.
    fn config(&self, i: usize, port: u16) -> Res<PathBuf> {
        let path = self.dir.join(format!("gw{i}.toml"));
        let text = format!(
            r#"listen = "127.0.0.1:{port}"
data_dir = {data:?}
secret = {secret:?}

[http]
min_free_bytes = 0

[auth]
login_per_address_per_minute = 100000

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
"#,
            data = self.dir.join(format!("gw{i}")).display().to_string(),
            secret = self.secret,
            db = self.db,
            endpoint = self.s3.endpoint,
            bucket = self.s3.bucket,
            ak = self.s3.access_key,
            sk = self.s3.secret_key,
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// A `relaypacs` process; killed on drop if still running.
struct Gateway {
    child: Option<Child>,
    url: String,
}

impl Gateway {
    fn start(shared: &Shared, i: usize) -> Res<Self> {
        let port = free_port();
        let config = shared.config(i, port)?;
        let log = std::fs::File::create(shared.dir.join(format!("gw{i}.log")))?;
        let child = Command::new(&shared.server)
            .arg("--config")
            .arg(&config)
            .env_remove("RELAYPACS_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut gw = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..600 {
            if relaypacs_test_peers::listening(port) {
                return Ok(gw);
            }
            if let Some(c) = gw.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                return Err(format!("gateway {i} exited ({status}): see gw{i}.log").into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("gateway {i} did not listen on {port}").into())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, as an operator stops it, and wait for the exit.
    fn stop(mut self) -> Res<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU seconds (user + system) used so far by `pid` (and its reaped
/// children, which a server does not have), from /proc/<pid>/stat.
fn cpu_secs(pid: u32) -> f64 {
    let ticks = 100.0; // CLK_TCK on Linux x86-64
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / ticks
}

/// This process's children named `comm` (the s3s-fs server).
fn children_named(comm: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let name = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
            let ppid = stat
                .get(stat.rfind(')')? + 2..)?
                .split_whitespace()
                .nth(1)?;
            (name == comm && ppid == me).then_some(pid)
        })
        .collect()
}

/// CPU seconds so far of: the gateways, PostgreSQL, s3s-fs, this client.
fn cpu_now(gws: &[Gateway], pg: &Postgres) -> [f64; 4] {
    let sum = |pids: &[u32]| pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let gw: Vec<u32> = gws.iter().filter_map(Gateway::pid).collect();
    [
        sum(&gw),
        sum(&pg.processes()),
        sum(&children_named("s3s-fs")),
        cpu_secs(std::process::id()),
    ]
}

/// One file ready to send.
struct File {
    body: bytes::Bytes,
    sum: String,
}

/// One client's studies: each a list of files.
type Work = Vec<Vec<File>>;

fn make_work(a: &Args) -> Res<Vec<Work>> {
    // 16-bit pixels: rows x cols x 2 bytes of pixel data, plus the header.
    let cols = 256u16;
    let rows = u16::try_from((a.kib * 1024 / 2 / usize::from(cols)).max(1))?;
    (0..a.clients)
        .map(|c| {
            (0..a.studies)
                .map(|s| {
                    let (study_uid, series_uid) = (new_uid(), new_uid());
                    (0..a.files)
                        .map(|f| {
                            let body = generate(&DicomSpec {
                                study_uid: study_uid.clone(),
                                series_uid: series_uid.clone(),
                                sop_instance_uid: new_uid(),
                                patient_id: format!("PAT-{c}-{s}"),
                                rows,
                                cols,
                                seed: (c * 1_000_000 + s * 1_000 + f) as u64,
                                ..DicomSpec::default()
                            })?;
                            let sum = STANDARD.encode(Sha256::digest(&body));
                            Ok(File {
                                body: body.into(),
                                sum,
                            })
                        })
                        .collect::<Res<Vec<File>>>()
                })
                .collect::<Res<Work>>()
        })
        .collect()
}

/// The gateways in turn: every request takes the next one.
#[derive(Clone)]
struct Turn {
    urls: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
}

impl Turn {
    fn url(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len();
        &self.urls[i]
    }
}

async fn login(client: &Client, url: &str, user: &str) -> Res<String> {
    let r = client
        .post(format!("{url}/api/v1/auth/login"))
        .header("Content-Type", "application/json")
        .body(serde_json::json!({ "username": user, "password": PASSWORD }).to_string())
        .send()
        .await?;
    if r.status() != StatusCode::OK {
        return Err(format!("login {user}: {}", r.status()).into());
    }
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    Ok(v["access_token"]
        .as_str()
        .ok_or("no access_token")?
        .to_owned())
}

/// One client's uploads; returns its study ids.
async fn upload(client: Client, turn: Turn, token: String, work: Arc<Work>) -> Res<Vec<String>> {
    let mut ids = Vec::new();
    for files in work.iter() {
        let r = client
            .post(format!("{}/api/v1/studies", turn.url()))
            .bearer_auth(&token)
            .send()
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(
                format!("POST /api/v1/studies: {}: {}", r.status(), r.text().await?).into(),
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        let sid = v["id"].as_str().ok_or("no study id")?.to_owned();
        for (i, f) in files.iter().enumerate() {
            let meta = format!(
                "filename {},session {}",
                STANDARD.encode(format!("f{i:03}.dcm")),
                STANDARD.encode(&sid)
            );
            let r = client
                .post(format!("{}/files", turn.url()))
                .bearer_auth(&token)
                .header("Tus-Resumable", "1.0.0")
                .header("Upload-Length", f.body.len().to_string())
                .header("Upload-Metadata", meta)
                .header("Upload-Checksum", format!("sha256 {}", f.sum))
                .header("Content-Type", "application/offset+octet-stream")
                .body(f.body.clone())
                .send()
                .await?;
            if r.status() != StatusCode::CREATED {
                return Err(format!("POST /files: {}: {}", r.status(), r.text().await?).into());
            }
        }
        let r = client
            .post(format!("{}/api/v1/studies/{sid}/complete", turn.url()))
            .bearer_auth(&token)
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("complete: {}: {}", r.status(), r.text().await?).into());
        }
        ids.push(sid);
    }
    Ok(ids)
}

/// Wait until every study is delivered; errors after `limit`.
async fn delivered(client: &Client, turn: &Turn, owned: &[(String, Vec<String>)]) -> Res<()> {
    let limit = Instant::now() + Duration::from_secs(600);
    for (token, ids) in owned {
        for sid in ids {
            loop {
                let r = client
                    .get(format!("{}/api/v1/studies/{sid}", turn.url()))
                    .bearer_auth(token)
                    .send()
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
                match v["state"]["state"].as_str() {
                    Some("delivered") => break,
                    Some("forwarding" | "open") if Instant::now() < limit => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => return Err(format!("study {sid}: {}", v["state"]).into()),
                }
            }
        }
    }
    Ok(())
}

/// `GET /healthz` requests/s with `tasks` tasks over `secs` seconds.
async fn healthz_ceiling(client: &Client, turn: &Turn, tasks: usize, secs: f64) -> Res<f64> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (client, turn) = (client.clone(), turn.clone());
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let r = client
                    .get(format!("{}/healthz", turn.url()))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status() != StatusCode::OK {
                    return Err(format!("healthz: {}", r.status()));
                }
                r.bytes().await.map_err(|e| e.to_string())?;
                n += 1;
            }
            Ok::<u64, String>(n)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// One round with `n` gateways; returns its JSON summary.
async fn round(a: &Args, shared: &mut Shared, pg: &Postgres, n: usize) -> Res<serde_json::Value> {
    shared.s3 = tokio::task::spawn_blocking(S3Server::start).await?;
    let shared = &*shared;
    let gws = (0..n)
        .map(|i| Gateway::start(shared, i))
        .collect::<Res<Vec<_>>>()?;
    let turn = Turn {
        urls: Arc::new(gws.iter().map(|g| g.url.clone()).collect()),
        next: Arc::new(AtomicUsize::new(0)),
    };
    let client = Client::builder()
        .pool_max_idle_per_host(a.clients)
        .build()?;
    let work = make_work(a)?;
    let mut tokens = Vec::new();
    for c in 0..a.clients {
        tokens.push(login(&client, turn.url(), &format!("user{c}")).await?);
    }
    let ceiling = healthz_ceiling(&client, &turn, a.clients, 3.0).await?;

    let cpu0 = cpu_now(&gws, pg);
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (c, w) in work.into_iter().enumerate() {
        let (client, turn, token) = (client.clone(), turn.clone(), tokens[c].clone());
        set.spawn(async move {
            let ids = upload(client, turn, token.clone(), Arc::new(w))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((token, ids))
        });
    }
    let mut owned = Vec::new();
    while let Some(r) = set.join_next().await {
        owned.push(r??);
    }
    let up_secs = t.elapsed().as_secs_f64();
    let cpu1 = cpu_now(&gws, pg);
    delivered(&client, &turn, &owned).await?;
    let all_secs = t.elapsed().as_secs_f64();

    let files = a.clients * a.studies * a.files;
    let requests = a.clients * a.studies * (a.files + 2);
    let cpu: Vec<f64> = cpu1.iter().zip(cpu0).map(|(b, a)| b - a).collect();
    let fps = files as f64 / up_secs;
    println!(
        "{n} gateway(s): {files} files in {up_secs:.2} s = {fps:.1} files/s ({:.1} requests/s; \
         client ceiling GET /healthz {ceiling:.0} requests/s); all delivered after {all_secs:.2} s \
         ({:.1} files/s); CPU s during upload: gateways {:.2}, PostgreSQL {:.2}, s3s-fs {:.2}, client {:.2}",
        requests as f64 / up_secs,
        files as f64 / all_secs,
        cpu[0],
        cpu[1],
        cpu[2],
        cpu[3],
    );
    for g in gws {
        g.stop()?;
    }
    Ok(serde_json::json!({
        "gateways": n,
        "files": files,
        "upload_secs": up_secs,
        "files_per_s": fps,
        "requests_per_s": requests as f64 / up_secs,
        "delivered_secs": all_secs,
        "healthz_per_s": ceiling,
        "cpu_secs": { "gateways": cpu[0], "postgres": cpu[1], "s3s_fs": cpu[2], "client": cpu[3] },
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let a = parse_args()?;
    let dir = tempfile::Builder::new()
        .prefix("instances-bench-")
        .tempdir()?;
    let pg = tokio::task::spawn_blocking(Postgres::start).await?;
    let s3 = tokio::task::spawn_blocking(S3Server::start).await?;
    let mut shared = Shared {
        secret: hex(32),
        db: pg.create_database("relay"),
        s3,
        dir: dir.path().to_path_buf(),
        server: a.server.clone(),
    };
    // Users through the operator's command (it also migrates the schema).
    let config = shared.config(0, free_port())?;
    for c in 0..a.clients {
        add_user(&shared.server, &config, &format!("user{c}"))?;
    }
    println!(
        "{} clients x {} studies x {} files of ~{} KiB, tus creation-with-upload; PostgreSQL 15 (durable), s3s-fs chunks",
        a.clients, a.studies, a.files, a.kib
    );
    let mut rounds = Vec::new();
    for &n in &a.order {
        rounds.push(round(&a, &mut shared, &pg, n).await?);
    }
    let rate = |n: u64| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r["gateways"] == n)
            .filter_map(|r| r["files_per_s"].as_f64())
            .collect()
    };
    let (one, three) = (rate(1), rate(3));
    if let (Some(o), Some(t)) = (one.first(), three.first()) {
        println!(
            "3 vs 1 gateway(s): {:.2}x (first of each); all: 1 = {one:.1?}, 3 = {three:.1?}",
            t / o
        );
    }
    println!(
        "{}",
        serde_json::json!({ "bench": "instances", "rounds": rounds })
    );
    Ok(())
}

/// `relaypacs --config CONFIG user add NAME --role uploader`, password on stdin.
fn add_user(server: &Path, config: &Path, name: &str) -> Res<()> {
    use std::io::Write as _;
    let mut child = Command::new(server)
        .arg("--config")
        .arg(config)
        .args(["user", "add", name, "--role", "uploader"])
        .env_remove("RELAYPACS_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    writeln!(child.stdin.take().ok_or("no stdin")?, "{PASSWORD}")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!("user add {name}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

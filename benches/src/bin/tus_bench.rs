//! tus 1.0 upload throughput over HTTP: the RelayPACS server (in process,
//! SHA-256 `Upload-Checksum` verified on every PATCH, each PATCH fsync'd,
//! whole-file verification and DICOM validation on the last PATCH) beside
//! the official tus Node server (`@tus/server` + `@tus/file-store`, started
//! from `clients/node/tus_server.mjs`; no checksum, no fsync) as baseline.
//!
//! One run writes a valid DICOM test file (default 1 GiB) on a real disk
//! (the system temp dir unless it is a tmpfs, then the current directory),
//! then uploads it alternately to both servers (ours, theirs, ours, …) in
//! PATCHes of `--patch-mib` MiB over one keep-alive client, and prints MB/s
//! per run (MB = 10^6 bytes), the medians and the ratio. The client reads
//! each piece from the file and computes its SHA-256 outside the timing;
//! the timing covers the HTTP requests only: the creation POST and every
//! PATCH, up to the response (so our last PATCH includes verification and
//! validation). Each run of ours uses a new study session. Both stored
//! copies are checked afterwards.
//!
//! Needs Node.js ≥ 20.19 and `npm ci --prefix clients/node` once.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin tus_bench`
//! (options: `--size-mib N` default 1024, `--patch-mib N` default 8,
//! `--runs N` default 3, `--dir DIR` for the scratch directory).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use relaypacs_benches::{login, mbps, median, ours_config, start_ours};
use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};
use reqwest::{Client, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

type BoxError = Box<dyn std::error::Error>;
type Res<T> = Result<T, BoxError>;

const OURS: &str = "relaypacs tus (sha256 per PATCH + fsync)";
const THEIRS: &str = "@tus/server (file-store, no checksum, no fsync)";

struct Args {
    size_mib: u64,
    patch_mib: u64,
    runs: usize,
    dir: Option<PathBuf>,
    /// Declare the whole file's SHA-256 at creation (`sha256` in
    /// Upload-Metadata), as the CLI and the web app do.
    declare_sha256: bool,
}

const USAGE: &str = "usage: tus_bench [--size-mib N (1024)] [--patch-mib N (8)] [--runs N (3)] [--dir DIR] [--declare-sha256]";

fn parse_args() -> Res<Args> {
    let mut a = Args {
        size_mib: 1024,
        patch_mib: 8,
        runs: 3,
        dir: None,
        declare_sha256: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if flag == "--declare-sha256" {
            a.declare_sha256 = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let num = || -> Res<u64> {
            match value.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{flag}: not a positive integer: {value}").into()),
            }
        };
        match flag.as_str() {
            "--size-mib" => a.size_mib = num()?,
            "--patch-mib" => a.patch_mib = num()?,
            "--runs" => a.runs = usize::try_from(num()?)?,
            "--dir" => a.dir = Some(PathBuf::from(&value)),
            _ => return Err(format!("unknown option {flag}\n{USAGE}").into()),
        }
    }
    Ok(a)
}

/// The mount entry (fs type, mount point) holding `path`, from /proc/self/mounts.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let path = path.canonicalize().ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _dev = f.next()?;
            let point = f.next()?.replace("\\040", " ");
            let fstype = f.next()?.to_string();
            path.starts_with(&point).then_some((fstype, point))
        })
        .max_by_key(|(_, point)| point.len())
}

/// Scratch location: `--dir`, else the temp dir unless it is a tmpfs, else
/// the current directory.
fn scratch_base(dir: Option<PathBuf>) -> Res<PathBuf> {
    if let Some(d) = dir {
        return Ok(d);
    }
    let tmp = std::env::temp_dir();
    match mount_of(&tmp) {
        Some((fstype, _)) if fstype != "tmpfs" && fstype != "ramfs" => Ok(tmp),
        _ => Ok(std::env::current_dir()?),
    }
}

/// An error naming the request, the status and the response body.
async fn http_error(what: &str, r: Response) -> BoxError {
    let status = r.status();
    let body = r
        .text()
        .await
        .unwrap_or_else(|e| format!("<body unreadable: {e}>"));
    format!("{what}: HTTP {status}: {body}").into()
}

fn header<'a>(r: &'a Response, name: &str) -> Res<&'a str> {
    Ok(r.headers()
        .get(name)
        .ok_or_else(|| format!("response without {name} (status {})", r.status()))?
        .to_str()?)
}

/// The test file and the client's per-PATCH digests.
struct Source {
    path: PathBuf,
    size: u64,
    patch: u64,
    /// Base64 SHA-256 of each PATCH body, computed before any timing.
    sums: Vec<String>,
    /// The whole file's SHA-256 (hex), declared at creation if asked.
    declared: Option<String>,
}

impl Source {
    fn pieces(&self) -> usize {
        self.sums.len()
    }
}

/// Reads the file piece by piece (outside the timing).
struct Reader {
    file: tokio::fs::File,
    left: u64,
    patch: u64,
}

impl Reader {
    async fn open(src: &Source) -> Res<Self> {
        Ok(Self {
            file: tokio::fs::File::open(&src.path).await?,
            left: src.size,
            patch: src.patch,
        })
    }

    async fn next(&mut self) -> Res<Vec<u8>> {
        let n = usize::try_from(self.left.min(self.patch))?;
        let mut buf = vec![0u8; n];
        self.file.read_exact(&mut buf).await?;
        self.left -= n as u64;
        Ok(buf)
    }
}

/// Absolute upload URL from a creation response's Location.
fn upload_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("http://{rest}")
    } else {
        format!("{base}{location}")
    }
}

/// Seconds spent in HTTP during one upload.
#[derive(Clone, Copy)]
struct Timing {
    /// POST and every PATCH.
    total: f64,
    /// The last PATCH alone (on our server: whole-file verification and
    /// DICOM validation happen in it).
    last: f64,
}

/// One tus upload: POST then PATCHes. Returns the timing and the upload URL.
async fn tus_upload(
    client: &Client,
    base: &str,
    src: &Source,
    token: Option<&str>,
    metadata: &str,
) -> Res<(Timing, String)> {
    let mut reader = Reader::open(src).await?;
    let mut http = Duration::ZERO;
    let mut req = client
        .post(format!("{base}/files"))
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", src.size.to_string())
        .header("Upload-Metadata", metadata);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let t = Instant::now();
    let r = req.send().await?;
    if r.status() != StatusCode::CREATED {
        return Err(http_error("POST /files", r).await);
    }
    let url = upload_url(base, header(&r, "location")?);
    r.bytes().await?;
    http += t.elapsed();

    let mut last = Duration::ZERO;
    let mut offset = 0u64;
    for i in 0..src.pieces() {
        let body = reader.next().await?;
        let n = body.len() as u64;
        let mut req = client
            .patch(&url)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Offset", offset.to_string())
            .header("Content-Type", "application/offset+octet-stream")
            .body(body);
        if let Some(t) = token {
            req = req
                .bearer_auth(t)
                .header("Upload-Checksum", format!("sha256 {}", src.sums[i]));
        }
        let t = Instant::now();
        let r = req.send().await?;
        if r.status() != StatusCode::NO_CONTENT {
            let what = format!("PATCH {} of {} at offset {offset}", i + 1, src.pieces());
            return Err(http_error(&what, r).await);
        }
        let got: u64 = header(&r, "upload-offset")?.parse()?;
        r.bytes().await?;
        last = t.elapsed();
        http += last;
        offset += n;
        if got != offset {
            return Err(format!("PATCH {}: Upload-Offset {got}, expected {offset}", i + 1).into());
        }
    }
    let timing = Timing {
        total: http.as_secs_f64(),
        last: last.as_secs_f64(),
    };
    Ok((timing, url))
}

/// Our server, running in this process, and the bench user's token.
struct Ours {
    server: relaypacs_http::Server,
    base: String,
    token: String,
    token_at: Instant,
}

impl Ours {
    async fn start(dir: &Path, client: &Client) -> Res<Self> {
        let (server, base) = start_ours(ours_config(dir)).await?;
        let token = login(client, &base).await?;
        Ok(Self {
            server,
            base,
            token,
            token_at: Instant::now(),
        })
    }

    /// A token with at least half its lifetime left.
    async fn token(&mut self, client: &Client) -> Res<String> {
        let ttl = self.server.state().config().auth.access_ttl_secs;
        if self.token_at.elapsed() > Duration::from_secs(ttl / 2) {
            self.token = login(client, &self.base).await?;
            self.token_at = Instant::now();
        }
        Ok(self.token.clone())
    }

    /// One upload in a new study session; returns the timing and the study id.
    async fn run(&mut self, client: &Client, src: &Source) -> Res<(Timing, String)> {
        let token = self.token(client).await?;
        let r = client
            .post(format!("{}/api/v1/studies", self.base))
            .bearer_auth(&token)
            .send()
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(http_error("POST /api/v1/studies", r).await);
        }
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        let study = v["id"]
            .as_str()
            .ok_or("POST /api/v1/studies: no id in the response")?
            .to_string();
        let name = src
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut meta = format!(
            "filename {},session {}",
            STANDARD.encode(name),
            STANDARD.encode(&study)
        );
        if let Some(d) = &src.declared {
            meta.push_str(&format!(",sha256 {}", STANDARD.encode(d)));
        }
        let (timing, _) = tus_upload(client, &self.base, src, Some(&token), &meta).await?;
        Ok((timing, study))
    }

    /// The study's one file is `valid` with the right size.
    async fn check(&mut self, client: &Client, study: &str, size: u64) -> Res<()> {
        let token = self.token(client).await?;
        let r = client
            .get(format!("{}/api/v1/studies/{study}", self.base))
            .bearer_auth(&token)
            .send()
            .await?;
        if r.status() != StatusCode::OK {
            return Err(http_error("GET /api/v1/studies/{id}", r).await);
        }
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        let files = v["files"].as_array().ok_or("study view without files")?;
        match files.as_slice() {
            [f] if f["state"] == "valid" && f["size"] == size => Ok(()),
            _ => Err(format!("study {study}: unexpected files: {}", v["files"]).into()),
        }
    }
}

/// The official tus Node server as a child process.
struct Theirs {
    child: tokio::process::Child,
    base: String,
    dir: PathBuf,
}

impl Theirs {
    async fn start(dir: &Path) -> Res<Self> {
        let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/node");
        let script = node_dir.join("tus_server.mjs");
        if !node_dir.join("node_modules/@tus/server").is_dir() {
            return Err(format!(
                "{} has no node_modules/@tus/server: run `npm ci --prefix clients/node`",
                node_dir.display()
            )
            .into());
        }
        std::fs::create_dir_all(dir)?;
        let mut child = tokio::process::Command::new("node")
            .arg(&script)
            .arg("0")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start node {}: {e}", script.display()))?;
        let stdout = child.stdout.take().ok_or("node: no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| "node tus server: no 'listening' line within 30 s")??
            .ok_or("node tus server exited before listening")?;
        let port: u16 = line
            .strip_prefix("listening ")
            .ok_or_else(|| format!("node tus server said: {line}"))?
            .trim()
            .parse()?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
        })
    }

    async fn run(&self, client: &Client, src: &Source) -> Res<(Timing, String)> {
        let meta = format!("filename {}", STANDARD.encode("source.dcm"));
        let (timing, url) = tus_upload(client, &self.base, src, None, &meta).await?;
        let id = url
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("no upload id in {url}"))?
            .to_string();
        Ok((timing, id))
    }

    fn check(&self, id: &str, size: u64) -> Res<()> {
        let got = std::fs::metadata(self.dir.join(id))?.len();
        if got == size {
            Ok(())
        } else {
            Err(format!("@tus/server upload {id}: {got} bytes stored, expected {size}").into())
        }
    }

    async fn stop(mut self) -> Res<()> {
        self.child.kill().await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let args = parse_args()?;
    let base = scratch_base(args.dir.clone())?;
    let work = tempfile::Builder::new()
        .prefix("tus_bench.")
        .tempdir_in(&base)?;
    let fs = mount_of(work.path())
        .map(|(t, m)| format!("{t} mounted on {m}"))
        .unwrap_or_else(|| "unknown filesystem".into());
    println!("scratch dir: {} ({fs})", work.path().display());

    // The test file and the client's digests of every PATCH body.
    let path = work.path().join("source.dcm");
    let spec = DicomSpec {
        study_uid: new_uid(),
        series_uid: new_uid(),
        sop_instance_uid: new_uid(),
        ..DicomSpec::default()
    };
    let t = Instant::now();
    write_large_file(&path, &spec, args.size_mib << 20)?;
    let size = std::fs::metadata(&path)?.len();
    let patch = args.patch_mib << 20;
    let mut src = Source {
        path,
        size,
        patch,
        sums: Vec::new(),
        declared: None,
    };
    let mut reader = Reader::open(&src).await?;
    let mut whole = Sha256::new();
    while reader.left > 0 {
        let piece = reader.next().await?;
        whole.update(&piece);
        src.sums.push(STANDARD.encode(Sha256::digest(&piece)));
    }
    if args.declare_sha256 {
        src.declared = Some(
            whole
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        );
    }
    println!(
        "test file: valid DICOM, {size} bytes ({:.1} MiB), {} PATCHes of {} MiB; written and hashed in {:.1} s",
        size as f64 / 1048576.0,
        src.pieces(),
        args.patch_mib,
        t.elapsed().as_secs_f64()
    );
    println!(
        "timed: HTTP requests only (creation POST + every PATCH until its response); MB = 10^6 bytes"
    );

    let client = Client::builder().pool_max_idle_per_host(4).build()?;
    let mut ours = Ours::start(&work.path().join("relaypacs"), &client).await?;
    let theirs = Theirs::start(&work.path().join("tus")).await?;

    let mut ours_mbps = Vec::new();
    let mut theirs_mbps = Vec::new();
    let mut studies = Vec::new();
    let mut uploads = Vec::new();
    for run in 1..=args.runs {
        let (t, study) = ours.run(&client, &src).await?;
        let r = mbps(size, t.total);
        println!(
            "{OURS}: run {run}: {r:.1} MB/s ({:.2} s, of which last PATCH {:.2} s)",
            t.total, t.last
        );
        ours_mbps.push(r);
        studies.push(study);

        let (t, id) = theirs.run(&client, &src).await?;
        let r = mbps(size, t.total);
        println!(
            "{THEIRS}: run {run}: {r:.1} MB/s ({:.2} s, of which last PATCH {:.2} s)",
            t.total, t.last
        );
        theirs_mbps.push(r);
        uploads.push(id);
    }

    for study in &studies {
        ours.check(&client, study, size).await?;
    }
    for id in &uploads {
        theirs.check(id, size)?;
    }
    println!(
        "verified: {} relaypacs studies with the file in state \"valid\", {} @tus/server files of {size} bytes",
        studies.len(),
        uploads.len()
    );

    let (mo, mt) = (median(&ours_mbps), median(&theirs_mbps));
    println!(
        "median ours {mo:.1} MB/s, @tus/server {mt:.1} MB/s, ratio {:.2}",
        mo / mt
    );

    theirs.stop().await?;
    ours.server.shutdown().await;
    work.close()?;
    Ok(())
}

//! `relaypacs upload` (the `relaypacs_http::client` uploader) beside what
//! radiology IT uses today, on the same files in the same run:
//!
//! - **ours, tus**: the uploader (local check, whole-file SHA-256, one
//!   session per study, 8 MiB checksummed PATCHes, 3 files at once) into
//!   our server, timed until every study is completed (the gateway holds
//!   it durably), and until delivered to the local archive;
//! - **storescu → Orthanc**: dcmtk's `storescu` (one association, all
//!   files) into a fresh Orthanc, timed until it exits;
//! - **STOW-RS → ours**: a plain STOW-RS client (one instance per POST,
//!   sequential, one keep-alive connection) into our server, timed until
//!   the last answer;
//! - **client ceiling**: the uploader's own per-byte work without a
//!   network: the local check and whole-file SHA-256 of every file, plus
//!   the SHA-256 of every chunk (its `Upload-Checksum`). A figure of ours
//!   near it is the client's limit, not the server's;
//! - **browser → ours** (the large file only): the web app in Debian's
//!   headless Chromium, driven by `clients/browser/bench.mjs` (Playwright):
//!   the file chosen in the page, sent, timed until the app has completed
//!   the study and until it shows it delivered; beside it the page's own
//!   ceiling (hash-wasm SHA-256 of the whole file and of each 8 MiB slice,
//!   as the app does it, without a network).
//!
//! Two data sets: one large file (`--big-mib`, default 1024) and one study
//! of `--files` (default 500) Secondary Capture instances of 512x512
//! 16-bit (525,074 B). New UIDs every round (nothing meets an instance a
//! server already holds), written outside the timing; the order of the
//! three senders rotates from round to round; Orthanc's study is deleted
//! and our delivery awaited between runs, untimed.
//!
//! Our server runs in this process on its own multi-thread runtime (as
//! `relaypacs serve` builds it), on its embedded defaults in a temp data
//! folder; the clients run on another runtime.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin upload_cli_bench`
//! (options: `--big-mib N`, `--files N`, `--rounds N` (default 3), `--dir
//! DIR` for the data, default the system temp dir, `--no-browser` to leave
//! Chromium out). Smoke run on a tiny input: `--big-mib 2 --files 3
//! --rounds 1`. The browser needs `scripts/install-peers.sh clients`
//! (run by the bench when `clients/browser/node_modules` is missing).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use relaypacs_benches::{
    PASSWORD, Res, clear_study, login, mbps, median, ours_config, secondary_capture_512,
};
use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};
use relaypacs_http::client::progress::Event;
use relaypacs_http::client::{Credentials, ProgressSink, UploadConfig, Uploader};
use relaypacs_test_peers::{Orthanc, tool};
use reqwest::Client;
use tokio::runtime::Runtime;

const BOUNDARY: &str = "relaypacs-bench-boundary";

/// One data set of one round: its files and their study.
struct Set {
    name: &'static str,
    study: String,
    files: Vec<PathBuf>,
    bytes: u64,
}

fn big_set(dir: &Path, mib: u64) -> Res<Set> {
    let study = new_uid();
    let path = dir.join(format!("big-{}.dcm", new_uid()));
    write_large_file(
        &path,
        &DicomSpec {
            study_uid: study.clone(),
            ..DicomSpec::default()
        },
        mib << 20,
    )?;
    let bytes = path.metadata()?.len();
    Ok(Set {
        name: "large file",
        study,
        files: vec![path],
        bytes,
    })
}

fn study_set(dir: &Path, count: usize) -> Res<Set> {
    let study = new_uid();
    let series = new_uid();
    let folder = dir.join(format!("study-{study}"));
    std::fs::create_dir_all(&folder)?;
    let mut files = Vec::with_capacity(count);
    let mut bytes = 0;
    for i in 0..count {
        let data = secondary_capture_512(&study, &series, i as u64)?;
        let p = folder.join(format!("im{i:05}.dcm"));
        std::fs::write(&p, &data)?;
        bytes += data.len() as u64;
        files.push(p);
    }
    Ok(Set {
        name: "study",
        study,
        files,
        bytes,
    })
}

/// Records when the last study was completed, and every failure.
#[derive(Debug, Default)]
struct Watch {
    completed: Mutex<Option<Instant>>,
    problems: Mutex<Vec<String>>,
}

impl ProgressSink for Watch {
    fn event(&self, e: &Event) {
        use relaypacs_storage::fs::lock;
        match e {
            Event::StudyCompleted { .. } => *lock(&self.completed) = Some(Instant::now()),
            Event::FileRefused { .. }
            | Event::StudyFailed { .. }
            | Event::StudyDeadLettered { .. }
            | Event::WaitTimedOut { .. } => {
                lock(&self.problems).push(serde_json::to_string(e).unwrap_or_default());
            }
            _ => {}
        }
    }
}

/// Our server on `rt` with the user `bench`; its base URL.
fn start_ours(rt: &Runtime, dir: &Path) -> Res<(relaypacs_http::Server, String)> {
    rt.block_on(relaypacs_benches::start_ours(ours_config(dir)))
}

/// The uploader on `set`: seconds until completed, until delivered.
async fn ours_tus(base: &str, set: &Set, state: &Path) -> Res<(f64, f64)> {
    let mut config = UploadConfig::new(
        base,
        Credentials::Password {
            user: "bench".into(),
            password: secrecy::SecretString::from(PASSWORD),
            totp: None,
        },
    );
    config.state_file = Some(state.to_path_buf());
    config.wait = true;
    config.wait_timeout = Duration::from_secs(1800);
    config.poll_interval = Duration::from_millis(100);
    let up = Uploader::new(config)?;
    let watch = Watch::default();
    let t0 = Instant::now();
    let summary = up.upload(&set.files, &watch).await;
    let delivered = t0.elapsed().as_secs_f64();
    let problems = relaypacs_storage::fs::lock(&watch.problems).clone();
    if summary.exit_code != 0 || !problems.is_empty() {
        return Err(format!(
            "upload exit {}: {:?} {problems:?}",
            summary.exit_code, summary.error
        )
        .into());
    }
    let completed = relaypacs_storage::fs::lock(&watch.completed)
        .ok_or("no study completed")?
        .duration_since(t0)
        .as_secs_f64();
    Ok((completed, delivered))
}

/// dcmtk's storescu into Orthanc, one association: seconds.
async fn storescu(orthanc: &Orthanc, set: &Set) -> Res<f64> {
    let t0 = Instant::now();
    let status = tokio::process::Command::new(tool("storescu"))
        .args(["-aet", "RELAYPACS", "-aec", &orthanc.aet, "127.0.0.1"])
        .arg(orthanc.dicom_port.to_string())
        .args(&set.files)
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("storescu failed: {status}").into());
    }
    let held = tokio::task::block_in_place(|| orthanc.instance_count());
    if held != set.files.len() {
        return Err(format!("storescu: Orthanc holds {held} of {}", set.files.len()).into());
    }
    Ok(secs)
}

/// A plain STOW-RS client into our server, one instance per POST (the
/// body streamed from the file): seconds.
async fn stow(client: &Client, base: &str, set: &Set) -> Res<f64> {
    use futures::StreamExt;
    let token = login(client, base).await?;
    let t0 = Instant::now();
    for f in &set.files {
        let len = tokio::fs::metadata(f).await?.len();
        let head = format!("--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n");
        let tail = format!("\r\n--{BOUNDARY}--\r\n");
        let total = head.len() as u64 + len + tail.len() as u64;
        let file = tokio::fs::File::open(f).await?;
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head.into()) })
            .chain(file_stream(file))
            .chain(futures::stream::once(async move { Ok(tail.into()) }));
        let r = client
            .post(format!("{base}/dicomweb/studies"))
            .bearer_auth(&token)
            .header(
                "content-type",
                format!("multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"),
            )
            .header("accept", "application/dicom+json")
            .header("content-length", total.to_string())
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await?;
        let status = r.status();
        let answer = r.bytes().await?;
        if status != reqwest::StatusCode::OK {
            return Err(format!(
                "STOW-RS: HTTP {status}: {}",
                String::from_utf8_lossy(&answer)
            )
            .into());
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// A file as a stream of 1 MiB pieces.
fn file_stream(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    use tokio::io::AsyncReadExt;
    futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 1 << 20];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((bytes::Bytes::from(buf), file)))
    })
}

/// The client's own per-byte work: local check + whole-file SHA-256,
/// and the SHA-256 of each 8 MiB chunk. Seconds.
fn ceiling(set: &Set) -> Res<f64> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let limits = relaypacs_core::dicom::DicomLimits::default();
    let t0 = Instant::now();
    for f in &set.files {
        match relaypacs_http::client::scan::check_file(f, &limits) {
            relaypacs_http::client::Checked::Valid(_) => {}
            other => return Err(format!("check: {other:?}").into()),
        }
        let file = std::fs::File::open(f)?;
        let size = file.metadata()?.len();
        let mut at = 0;
        let mut buf = vec![0u8; 8 << 20];
        while at < size {
            let n = (size - at).min(8 << 20) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            std::hint::black_box(sha2::Sha256::digest(&buf[..n]));
            at += n as u64;
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The browser part's folder (`clients/browser`), its npm packages
/// installed; Chromium's path.
fn browser_setup() -> Res<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/browser");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-peers.sh");
        let st = std::process::Command::new("bash")
            .arg(script)
            .arg("clients")
            .status()?;
        if !st.success() {
            return Err("scripts/install-peers.sh clients failed".into());
        }
    }
    Ok((dir, tool("chromium")))
}

/// Timings of one browser upload, from `clients/browser/bench.mjs`.
#[derive(Debug)]
struct BrowserRun {
    ceiling_secs: f64,
    completed_secs: f64,
    delivered_secs: f64,
}

/// The web app in headless Chromium uploads `set`'s one file to `base`.
async fn browser((dir, chromium): &(PathBuf, PathBuf), base: &str, set: &Set) -> Res<BrowserRun> {
    let [file] = set.files.as_slice() else {
        return Err("the browser run takes one file".into());
    };
    let out = tokio::process::Command::new("node")
        .arg("bench.mjs")
        .current_dir(dir)
        .env("RELAYPACS_URL", base)
        .env("CHROMIUM", chromium)
        .env("BENCH_USER", "bench")
        .env("BENCH_PASSWORD", PASSWORD)
        .env("BENCH_FILE", file)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!("bench.mjs failed: {}", out.status).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().ok_or("bench.mjs printed nothing")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let secs = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("bench.mjs: no {k} in {line}"))
    };
    Ok(BrowserRun {
        ceiling_secs: secs("ceiling_secs")?,
        completed_secs: secs("completed_secs")?,
        delivered_secs: secs("delivered_secs")?,
    })
}

/// Wait until our server has no study left open or forwarding.
fn settle(rt: &Runtime, server: &relaypacs_http::Server) -> Res<()> {
    relaypacs_benches::settle(rt, server, Instant::now(), Duration::from_secs(1800))
}

fn main() -> Res<()> {
    let (mut big_mib, mut count, mut rounds) = (1024u64, 500usize, 3usize);
    let mut with_browser = true;
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--big-mib" => big_mib = args.next().ok_or("--big-mib N")?.parse()?,
            "--files" => count = args.next().ok_or("--files N")?.parse()?,
            "--rounds" => rounds = args.next().ok_or("--rounds N")?.parse()?,
            "--dir" => dir = args.next().ok_or("--dir DIR")?.into(),
            "--no-browser" => with_browser = false,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let browser_env = if with_browser {
        Some(browser_setup()?)
    } else {
        None
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::Builder::new()
        .prefix("upload-cli-bench-")
        .tempdir_in(&dir)?;
    let (server, base) = start_ours(&server_rt, &work.path().join("data"))?;
    let orthanc = Orthanc::start();
    let client = Client::builder()
        .pool_idle_timeout(Duration::from_millis(500))
        .build()?;
    println!(
        "ours at {base} (local archive), Orthanc DICOM port {}; large file {big_mib} MiB, study of {count} files; {rounds} round(s)",
        orthanc.dicom_port
    );
    // name → (tus completed, tus delivered, storescu, stow, ceiling,
    // browser completed, browser delivered, browser ceiling) in MB/s
    let mut figures: Vec<(&str, [Vec<f64>; 8])> = vec![
        ("large file", Default::default()),
        ("study", Default::default()),
    ];
    for round in 1..=rounds {
        for (k, make) in [0usize, 1].iter().enumerate() {
            let files_dir = work.path().join(format!("files-{round}-{k}"));
            std::fs::create_dir_all(&files_dir)?;
            // Sets of the same shape, new UIDs each: one per sender (the
            // browser sends the large file only).
            let senders = if *make == 0 && browser_env.is_some() {
                4
            } else {
                3
            };
            let sets: Vec<Set> = (0..senders)
                .map(|_| match make {
                    0 => big_set(&files_dir, big_mib),
                    _ => study_set(&files_dir, count),
                })
                .collect::<Res<_>>()?;
            let name = sets[0].name;
            let bytes = sets[0].bytes;
            let f = &mut figures[k].1;
            let secs = ceiling(&sets[0])?;
            f[4].push(mbps(bytes, secs));
            for turn in 0..senders {
                match (turn + round) % senders {
                    0 => {
                        let state = work.path().join(format!("state-{round}-{k}.json"));
                        let (done, delivered) =
                            client_rt.block_on(ours_tus(&base, &sets[0], &state))?;
                        f[0].push(mbps(bytes, done));
                        f[1].push(mbps(bytes, delivered));
                        println!(
                            "round {round} {name}: ours tus       completed {done:8.3} s {:8.1} MB/s, delivered {delivered:8.3} s",
                            mbps(bytes, done)
                        );
                    }
                    1 => {
                        let secs = client_rt.block_on(storescu(&orthanc, &sets[1]))?;
                        f[2].push(mbps(bytes, secs));
                        println!(
                            "round {round} {name}: storescu→Orthanc        {secs:8.3} s {:8.1} MB/s",
                            mbps(bytes, secs)
                        );
                        clear_study(&orthanc, &sets[1].study)?;
                    }
                    3 => {
                        let env = browser_env.as_ref().ok_or("no browser")?;
                        let run = client_rt.block_on(browser(env, &base, &sets[3]))?;
                        f[5].push(mbps(bytes, run.completed_secs));
                        f[6].push(mbps(bytes, run.delivered_secs));
                        f[7].push(mbps(bytes, run.ceiling_secs));
                        println!(
                            "round {round} {name}: browser        completed {:8.3} s {:8.1} MB/s, delivered {:8.3} s; page ceiling {:8.1} MB/s",
                            run.completed_secs,
                            mbps(bytes, run.completed_secs),
                            run.delivered_secs,
                            mbps(bytes, run.ceiling_secs)
                        );
                        settle(&server_rt, &server)?;
                    }
                    _ => {
                        let secs = client_rt.block_on(stow(&client, &base, &sets[2]))?;
                        f[3].push(mbps(bytes, secs));
                        println!(
                            "round {round} {name}: STOW-RS→ours            {secs:8.3} s {:8.1} MB/s",
                            mbps(bytes, secs)
                        );
                        settle(&server_rt, &server)?;
                    }
                }
            }
            std::fs::remove_dir_all(&files_dir)?;
        }
    }
    println!();
    println!("medians, MB/s (10^6 B/s):");
    println!(
        "{:<12} {:>14} {:>14} {:>18} {:>14} {:>16} {:>10}",
        "data set",
        "ours tus",
        "ours delivered",
        "storescu→Orthanc",
        "STOW-RS→ours",
        "client ceiling",
        "ours/scu"
    );
    let mut json = serde_json::Map::new();
    for (name, f) in &figures {
        let m: Vec<f64> = f.iter().map(|v| median(v)).collect();
        println!(
            "{name:<12} {:>14.1} {:>14.1} {:>18.1} {:>14.1} {:>16.1} {:>10.2}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[0] / m[2]
        );
        json.insert(
            (*name).to_owned(),
            serde_json::json!({
                "ours_tus_completed_mbps": m[0],
                "ours_tus_delivered_mbps": m[1],
                "storescu_orthanc_mbps": m[2],
                "stow_rs_ours_mbps": m[3],
                "client_ceiling_mbps": m[4],
            }),
        );
        if !m[5].is_nan() {
            println!(
                "{:<12} browser completed {:.1}, delivered {:.1}, page ceiling {:.1}; CLI/browser {:.2}",
                "",
                m[5],
                m[6],
                m[7],
                m[0] / m[5]
            );
            if let Some(serde_json::Value::Object(o)) = json.get_mut(*name) {
                o.insert("browser_completed_mbps".into(), m[5].into());
                o.insert("browser_delivered_mbps".into(), m[6].into());
                o.insert("browser_ceiling_mbps".into(), m[7].into());
            }
        }
    }
    json.insert("bench".into(), "upload_cli".into());
    json.insert("big_mib".into(), big_mib.into());
    json.insert("files".into(), count.into());
    json.insert("rounds".into(), rounds.into());
    println!("{}", serde_json::Value::Object(json));
    server_rt.block_on(server.shutdown());
    Ok(())
}

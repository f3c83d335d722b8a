//! STOW-RS ingest into the gateway beside STOW-RS ingest into Orthanc, as a
//! user sees it: the same kind of files, one instance per POST, sequential
//! requests on one keep-alive connection per server, alternating runs in
//! one process, ratios taken within each round.
//!
//! Three servers on loopback:
//! - ours, on its embedded defaults (SQLite state, local chunks, the audit
//!   trail, the local archive as the PACS), in a temp data folder on a real
//!   disk, on its own multi-thread runtime as `relaypacs serve` builds it;
//! - a fresh Orthanc with its DICOMweb plugin (its own process);
//! - a discard server (same runtime as ours) that reads each request body
//!   and answers a fixed Store Instances Response: the **client's own
//!   ceiling**, so a figure near it is the client's limit, not the server's.
//!
//! The client runs on its own single-thread runtime. Each round generates
//! `--count` (default 200) new Secondary Capture instances of 512x512
//! 16-bit (525,074 B, new UIDs every run, so no run meets an instance a
//! server already holds) outside the timing, and POSTs them one by one to
//! each server, the order rotating from round to round. Every answer must
//! be 200 and reference its instance. After our run, untimed, the bench
//! waits until the local archive holds every instance of the run and every
//! session is delivered (so our delivery never runs into the next timed
//! run), and reports that time too ("ours, delivered": from the first POST
//! until the archive holds the last instance). Orthanc's study is deleted
//! and the page cache written back (`sync`) between runs, untimed.
//!
//! CPU: our process's CPU seconds over a run of ours (server + client)
//! minus those over Orthanc's run (client only) is our server's CPU per
//! instance; Orthanc's own is read from /proc.
//!
//! Latency: each request's time from sending to the answer read, as the
//! median and 99th percentile of a run (ours and Orthanc's).
//!
//! With `--strace`, one more run of each happens under `strace -f -c -w`
//! (attached to this process for ours, to Orthanc's process for Orthanc;
//! our run is counted until every instance is delivered to the local
//! archive, as the issue counted it), and the fsync, fdatasync, rename*
//! and open* calls per ingested instance are printed, with the wall time
//! spent inside fsync and fdatasync (summed over threads). The client does no
//! file I/O, so the counts of this process are the server's.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin stow_ingest_bench`
//! (options: `--count N`, `--rounds N` (default 5), `--strace`,
//! `--dir DIR` for our data folder, default the system temp dir).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relaypacs_benches::{
    Res, clear_study, login, median, orthanc_pid, ours_config, secondary_capture_512,
};
use relaypacs_core::testing::dicom_gen::new_uid;
use relaypacs_test_peers::Orthanc;
use reqwest::{Client, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

const BOUNDARY: &str = "relaypacs-bench-boundary";

/// `count` new instances of one new study and series.
fn instances(count: usize) -> Res<(String, String, Vec<Bytes>)> {
    let study = new_uid();
    let series = new_uid();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        out.push(Bytes::from(secondary_capture_512(
            &study, &series, i as u64,
        )?));
    }
    Ok((study, series, out))
}

fn multipart(file: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(file.len() + 128);
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    Bytes::from(body)
}

/// A server the client posts to.
struct Target {
    url: String,
    auth: Auth,
}

enum Auth {
    Bearer(String),
    Basic(String, String),
    None,
}

impl Target {
    fn authorize(&self, b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::Bearer(t) => b.bearer_auth(t),
            Auth::Basic(u, p) => b.basic_auth(u, Some(p)),
            Auth::None => b,
        }
    }
}

/// POST every file alone, in order; returns the seconds taken.
/// POST every file, one after the other: the run's seconds, and each
/// request's milliseconds (sent to answer read).
async fn post_all(client: &Client, target: &Target, files: &[Bytes]) -> Res<(f64, Vec<f64>)> {
    let bodies: Vec<Bytes> = files.iter().map(|f| multipart(f)).collect();
    let mut each = Vec::with_capacity(bodies.len());
    let t0 = Instant::now();
    for body in bodies {
        let sent = Instant::now();
        let r = target
            .authorize(client.post(&target.url))
            .header(
                "Content-Type",
                format!("multipart/related; type=\"application/dicom\"; boundary={BOUNDARY}"),
            )
            .header("Accept", "application/dicom+json")
            .body(body)
            .send()
            .await?;
        let status = r.status();
        let answer = r.bytes().await?;
        each.push(1e3 * sent.elapsed().as_secs_f64());
        if status != StatusCode::OK {
            return Err(format!(
                "POST {}: HTTP {status}: {}",
                target.url,
                String::from_utf8_lossy(&answer)
            )
            .into());
        }
        let json: serde_json::Value = serde_json::from_slice(&answer)?;
        let obj = match &json {
            serde_json::Value::Array(a) => a.first().cloned().unwrap_or_default(),
            v => v.clone(),
        };
        if obj["00081199"]["Value"].as_array().map(Vec::len) != Some(1) {
            return Err(format!("POST {}: instance not referenced: {obj}", target.url).into());
        }
    }
    Ok((t0.elapsed().as_secs_f64(), each))
}

/// The `q` quantile (0..=1) of `v`, nearest rank.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Our server on `rt`, with one uploader; returns it and its bearer token.
fn start_ours(
    rt: &Runtime,
    dir: &Path,
    client_rt: &Runtime,
    client: &Client,
) -> Res<(relaypacs_http::Server, Target)> {
    let (server, base) = rt.block_on(relaypacs_benches::start_ours(ours_config(dir)))?;
    let token = client_rt.block_on(login(client, &base))?;
    Ok((
        server,
        Target {
            url: format!("{base}/dicomweb/studies"),
            auth: Auth::Bearer(token),
        },
    ))
}

/// A server that reads each request's body and answers a fixed Store
/// Instances Response with one referenced instance: the client's ceiling.
fn start_discard(rt: &Runtime) -> Res<Target> {
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Err(e) = discard_conn(sock).await {
                    eprintln!("discard server: {e}");
                }
            });
        }
    });
    Ok(Target {
        url: format!("http://{addr}/studies"),
        auth: Auth::None,
    })
}

async fn discard_conn(sock: tokio::net::TcpStream) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let (r, mut w) = sock.into_split();
    let mut r = tokio::io::BufReader::with_capacity(256 << 10, r);
    let body = r#"{"00081199":{"vr":"SQ","Value":[{}]}}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/dicom+json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut line = String::new();
    loop {
        let mut length = None;
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse::<u64>().ok();
            }
        }
        let n = length.ok_or_else(|| std::io::Error::other("no content-length"))?;
        let copied = tokio::io::copy(&mut (&mut r).take(n), &mut tokio::io::sink()).await?;
        if copied != n {
            return Err(std::io::Error::other("short body"));
        }
        w.write_all(answer.as_bytes()).await?;
    }
}

fn sync() -> Res<()> {
    let s = std::process::Command::new("sync").status()?;
    if !s.success() {
        return Err(format!("sync: {s}").into());
    }
    Ok(())
}

/// How many `.dcm` files the local archive holds for a study and series.
fn archived(archive: &Path, study: &str, series: &str) -> usize {
    std::fs::read_dir(archive.join(study).join(series))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".dcm"))
                .count()
        })
        .unwrap_or(0)
}

/// Wait until the archive holds `count` instances of the run (returns the
/// seconds since `t0` when it did), then until no session is left in the
/// outbox (untimed). A dead-lettered session fails the bench.
fn wait_delivered(
    rt: &Runtime,
    server: &relaypacs_http::Server,
    archive: &Path,
    (study, series, count): (&str, &str, usize),
    t0: Instant,
) -> Res<f64> {
    let (start, limit) = (Instant::now(), Duration::from_secs(300));
    let deadline = start + limit;
    while archived(archive, study, series) < count {
        if Instant::now() > deadline {
            return Err("delivery to the local archive did not finish in 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let delivered = t0.elapsed().as_secs_f64();
    relaypacs_benches::settle(rt, server, start, limit)?;
    Ok(delivered)
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_secs(pid: u32) -> f64 {
    let ticks = 100.0; // CLK_TCK on Linux x86-64
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = stat.get(stat.rfind(')')? + 2..)?.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .map_or(f64::NAN, |t| t / ticks)
}

/// What `strace -c` reported: calls of fsync, fdatasync, rename* and
/// open*, and the seconds spent in fsync and fdatasync.
struct Counts {
    calls: [(&'static str, u64); 4],
    sync_secs: f64,
}

/// Counts of fsync, fdatasync, rename* and open* calls in `strace -c` output.
fn syscall_counts(summary: &str) -> Counts {
    let mut out = [("fsync", 0), ("fdatasync", 0), ("rename", 0), ("open", 0)];
    let mut sync_secs = 0.0;
    for line in summary.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        let (Some(name), Some(calls)) = (cols.last(), cols.get(3)) else {
            continue;
        };
        let Ok(calls) = calls.parse::<u64>() else {
            continue;
        };
        if matches!(*name, "fsync" | "fdatasync") {
            sync_secs += cols
                .get(1)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
        for (key, n) in &mut out {
            let hit = match *key {
                "rename" => name.starts_with("rename"),
                "open" => name.starts_with("open"),
                k => *name == k,
            };
            if hit {
                *n += calls;
            }
        }
    }
    Counts {
        calls: out,
        sync_secs,
    }
}

/// `strace -f -c -w` attached to every thread of `pid`.
struct Strace {
    child: std::process::Child,
    out: PathBuf,
}

impl Strace {
    fn attach(pid: u32) -> Res<Self> {
        let out = std::env::temp_dir().join(format!("stow-ingest-strace-{pid}-{}.txt", new_uid()));
        let child = std::process::Command::new("strace")
            .args(["-f", "-c", "-w", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // Wait until every thread of `pid` is traced.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let traced = std::fs::read_dir(format!("/proc/{pid}/task"))?
                .flatten()
                .all(|t| {
                    std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("TracerPid:"))
                            .is_some_and(|v| v.trim() != "0")
                    })
                });
            if traced {
                return Ok(Self { child, out });
            }
            if Instant::now() > deadline {
                return Err("strace did not attach in 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Detach (SIGINT makes strace write its summary); the counts.
    fn finish(mut self) -> Res<Counts> {
        std::process::Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        let summary = std::fs::read_to_string(&self.out)?;
        let _ = std::fs::remove_file(&self.out);
        Ok(syscall_counts(&summary))
    }
}

/// One timed run of each server, in `order`.
struct Round {
    ours: f64,
    ours_delivered: f64,
    orthanc: f64,
    discard: f64,
    ours_cpu_ms: f64,
    orthanc_cpu_ms: f64,
    /// Request latency, ms: median and 99th percentile, ours and Orthanc's.
    ours_p50: f64,
    ours_p99: f64,
    orthanc_p50: f64,
    orthanc_p99: f64,
}

fn main() -> Res<()> {
    let (mut count, mut rounds, mut strace) = (200usize, 5usize, false);
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--count" => count = args.next().ok_or("--count N")?.parse()?,
            "--rounds" => rounds = args.next().ok_or("--rounds N")?.parse()?,
            "--dir" => dir = args.next().ok_or("--dir DIR")?.into(),
            "--strace" => strace = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    // Ours as `relaypacs serve` runs it: a multi-thread runtime with the
    // default number of workers (one per core).
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let data = tempfile::Builder::new()
        .prefix("stow-ingest-")
        .tempdir_in(&dir)?;
    let archive = data.path().join("archive");
    let orthanc = Orthanc::start();
    let o_pid = orthanc_pid().ok_or("cannot find the Orthanc process")?;
    let me = std::process::id();
    // Idle connections are dropped after 500 ms: Orthanc closes an idle
    // keep-alive connection on its own, and a request sent on it as it
    // closes fails (hyper IncompleteMessage) after the untimed waits
    // between runs. A timed run reuses its one connection throughout.
    let client = Client::builder()
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(std::time::Duration::from_millis(500))
        .build()?;
    let (server, ours) = start_ours(&server_rt, data.path(), &client_rt, &client)?;
    let discard = start_discard(&server_rt)?;
    let theirs = Target {
        url: format!("{}/studies", orthanc.dicomweb()),
        auth: Auth::Basic(orthanc.user.clone(), orthanc.password.clone()),
    };
    let post = |t: &Target, files: &[Bytes]| client_rt.block_on(post_all(&client, t, files));
    // Warm-up, untimed: connections, Orthanc's first study, our first session.
    let (study, series, files) = instances(4)?;
    post(&ours, &files)?;
    wait_delivered(
        &server_rt,
        &server,
        &archive,
        (&study, &series, 4),
        Instant::now(),
    )?;
    post(&theirs, &files)?;
    post(&discard, &files)?;
    clear_study(&orthanc, &study)?;

    println!(
        "{count} instances of {} B per run, one POST each, one connection per server",
        instances(1)?.2[0].len()
    );
    println!(
        "round  ours inst/s  ours delivered  orthanc inst/s  ratio  client ceiling  ours CPU ms/inst  orthanc CPU ms/inst  ours ms p50/p99  orthanc ms p50/p99"
    );
    let mut all: Vec<Round> = Vec::new();
    for round in 0..rounds {
        let (study_a, series_a, a) = instances(count)?;
        let (study_b, _, b) = instances(count)?;
        let mut r = Round {
            ours: 0.0,
            ours_delivered: 0.0,
            orthanc: 0.0,
            discard: 0.0,
            ours_cpu_ms: 0.0,
            orthanc_cpu_ms: 0.0,
            ours_p50: 0.0,
            ours_p99: 0.0,
            orthanc_p50: 0.0,
            orthanc_p99: 0.0,
        };
        let mut client_cpu = 0.0;
        let mut ours_cpu = 0.0;
        for step in 0..3 {
            sync()?;
            match (round + step) % 3 {
                0 => {
                    let (c0, t0) = (cpu_secs(me), Instant::now());
                    let (secs, each) = post(&ours, &a)?;
                    (r.ours_p50, r.ours_p99) = (quantile(&each, 0.5), quantile(&each, 0.99));
                    ours_cpu = cpu_secs(me) - c0;
                    r.ours = count as f64 / secs;
                    let d = wait_delivered(
                        &server_rt,
                        &server,
                        &archive,
                        (&study_a, &series_a, count),
                        t0,
                    )?;
                    r.ours_delivered = count as f64 / d;
                }
                1 => {
                    let (c0, o0) = (cpu_secs(me), cpu_secs(o_pid));
                    let (secs, each) = post(&theirs, &b)?;
                    (r.orthanc_p50, r.orthanc_p99) = (quantile(&each, 0.5), quantile(&each, 0.99));
                    client_cpu = cpu_secs(me) - c0;
                    r.orthanc_cpu_ms = 1e3 * (cpu_secs(o_pid) - o0) / count as f64;
                    r.orthanc = count as f64 / secs;
                    clear_study(&orthanc, &study_b)?;
                }
                _ => {
                    let (secs, _) = post(&discard, &a)?;
                    r.discard = count as f64 / secs;
                }
            }
        }
        // Our process ran server and client; during Orthanc's run, the client alone.
        r.ours_cpu_ms = 1e3 * (ours_cpu - client_cpu) / count as f64;
        println!(
            "{round:>5}  {:>11.1}  {:>14.1}  {:>14.1}  {:>5.2}  {:>14.1}  {:>16.2}  {:>19.2}  {:>15}  {:>18}",
            r.ours,
            r.ours_delivered,
            r.orthanc,
            r.ours / r.orthanc,
            r.discard,
            r.ours_cpu_ms,
            r.orthanc_cpu_ms,
            format!("{:.2}/{:.2}", r.ours_p50, r.ours_p99),
            format!("{:.2}/{:.2}", r.orthanc_p50, r.orthanc_p99),
        );
        all.push(r);
    }
    let col = |f: fn(&Round) -> f64| all.iter().map(f).collect::<Vec<f64>>();
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
                (l.min(*x), h.max(*x))
            });
        format!("median {:.2} (range {lo:.2}-{hi:.2})", median(v))
    };
    let ratios = col(|r| r.ours / r.orthanc);
    println!("ours inst/s            {}", spread(&col(|r| r.ours)));
    println!(
        "ours delivered inst/s  {}",
        spread(&col(|r| r.ours_delivered))
    );
    println!("orthanc inst/s         {}", spread(&col(|r| r.orthanc)));
    println!("ratio ours/orthanc     {}", spread(&ratios));
    println!("client ceiling inst/s  {}", spread(&col(|r| r.discard)));
    let mut per_instance = serde_json::Map::new();
    if strace {
        for who in ["ours", "orthanc"] {
            let (study, series, files) = instances(count)?;
            sync()?;
            let counts = if who == "ours" {
                let t = Strace::attach(me)?;
                let t0 = Instant::now();
                post(&ours, &files)?;
                wait_delivered(&server_rt, &server, &archive, (&study, &series, count), t0)?;
                t.finish()?
            } else {
                let t = Strace::attach(o_pid)?;
                post(&theirs, &files)?;
                let c = t.finish()?;
                clear_study(&orthanc, &study)?;
                c
            };
            println!("{who}: syscalls per ingested instance (strace -f -c -w, {count} POSTs):");
            let mut m = serde_json::Map::new();
            for (name, n) in counts.calls {
                let per = n as f64 / count as f64;
                println!("  {name:<10} {per:.2}");
                m.insert(name.into(), serde_json::json!(per));
            }
            // Wall time inside the calls (strace -c -w), summed over all
            // threads: syncs of concurrent work (delivery) overlap.
            let ms = 1e3 * counts.sync_secs / count as f64;
            println!("  ms in fsync+fdatasync (wall, summed over threads) {ms:.2}");
            m.insert("sync_ms".into(), serde_json::json!(ms));
            per_instance.insert(who.into(), serde_json::Value::Object(m));
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "stow_ingest",
            "count": count,
            "ours_inst_per_s": col(|r| r.ours),
            "ours_delivered_inst_per_s": col(|r| r.ours_delivered),
            "orthanc_inst_per_s": col(|r| r.orthanc),
            "client_ceiling_inst_per_s": col(|r| r.discard),
            "ratios": ratios,
            "median_ratio": median(&ratios),
            "ours_server_cpu_ms_per_inst": col(|r| r.ours_cpu_ms),
            "orthanc_cpu_ms_per_inst": col(|r| r.orthanc_cpu_ms),
            "ours_ms_p50": col(|r| r.ours_p50),
            "ours_ms_p99": col(|r| r.ours_p99),
            "orthanc_ms_p50": col(|r| r.orthanc_p50),
            "orthanc_ms_p99": col(|r| r.orthanc_p99),
            "syscalls_per_instance": per_instance,
        })
    );
    server_rt.block_on(server.shutdown());
    Ok(())
}

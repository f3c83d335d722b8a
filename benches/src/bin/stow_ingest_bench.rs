//! STOW-RS ingest into the gateway beside STOW-RS ingest into Orthanc, as a
//! user sees it: the same files, one instance per POST, sequential requests
//! on one keep-alive connection, alternating runs in one process.
//!
//! Starts our server in this process on its embedded defaults (SQLite
//! state, local chunks, JSONL audit trail, local archive sink, in a temp
//! data folder on a real disk) and a fresh Orthanc with its DICOMweb plugin
//! on loopback. Each run generates `--count` (default 200) new Secondary
//! Capture instances of 512x512 16-bit (about 0.5 MiB each; new UIDs every
//! run, so no run meets an instance the gateway already holds) outside the
//! timing, then POSTs them one by one to `/dicomweb/studies` (ours, bearer
//! token) or Orthanc's `{dicomweb}/studies` (basic auth). Every answer must
//! be 200 and reference its instance. Orthanc's study is deleted and the
//! page cache written back (`sync`) after each run, untimed.
//!
//! With `--strace`, one more run of ours happens under `strace -f -c` of
//! this process (the server's threads; the client does no file I/O) and
//! the fsync, fdatasync, rename and open calls per ingested instance are
//! printed.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin stow_ingest_bench`
//! (options: `--count N`, `--rounds N` (default 3), `--strace`,
//! `--dir DIR` for the data folder, default the system temp dir).

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use relaypacs_benches::{Res, clear_study, median};
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, generate, new_uid};
use relaypacs_test_peers::Orthanc;
use reqwest::{Client, StatusCode};

const PASSWORD: &str = "bench password long enough 123";
const BOUNDARY: &str = "relaypacs-bench-boundary";

/// `count` new instances of one new study.
fn instances(count: usize) -> Res<(String, Vec<Bytes>)> {
    let study = new_uid();
    let series = new_uid();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        out.push(Bytes::from(generate(&DicomSpec {
            sop_class: SopClass::SecondaryCapture,
            study_uid: study.clone(),
            series_uid: series.clone(),
            sop_instance_uid: new_uid(),
            rows: 512,
            cols: 512,
            seed: i as u64,
            ..DicomSpec::default()
        })?));
    }
    Ok((study, out))
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

/// POST every file alone; returns instances per second.
async fn post_all(
    client: &Client,
    url: &str,
    auth: &dyn Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    files: &[Bytes],
) -> Res<f64> {
    let bodies: Vec<Bytes> = files.iter().map(|f| multipart(f)).collect();
    let t0 = Instant::now();
    for body in bodies {
        let r = auth(client.post(url))
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
        if status != StatusCode::OK {
            return Err(format!(
                "POST {url}: HTTP {status}: {}",
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
            return Err(format!("POST {url}: instance not referenced: {obj}").into());
        }
    }
    Ok(files.len() as f64 / t0.elapsed().as_secs_f64())
}

async fn start_ours(dir: &Path, client: &Client) -> Res<(relaypacs_http::Server, String, String)> {
    let mut config = relaypacs_http::Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        secret: Some(secrecy::SecretString::from(hex_secret())),
        ..relaypacs_http::Config::default()
    };
    config.http.min_free_bytes = Some(0);
    let server = relaypacs_http::Server::start(config).await?;
    let st = server.state();
    let hash = st.hasher().hash(PASSWORD.into()).await?;
    st.users()
        .create(relaypacs_http::routes::auth::new_record(
            "bench",
            relaypacs_http::auth::Role::Uploader,
            hash,
        ))
        .await?;
    let base = format!("http://{}", server.addr());
    let body = serde_json::json!({ "username": "bench", "password": PASSWORD });
    let r = client
        .post(format!("{base}/api/v1/auth/login"))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    let token = v["access_token"]
        .as_str()
        .ok_or("login: no access_token")?
        .to_owned();
    Ok((server, base, token))
}

fn hex_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sync() -> Res<()> {
    let s = std::process::Command::new("sync").status()?;
    if !s.success() {
        return Err(format!("sync: {s}").into());
    }
    Ok(())
}

/// Counts of fsync, fdatasync, rename* and open* calls in `strace -c` output.
fn syscall_counts(summary: &str) -> [(&'static str, u64); 4] {
    let mut out = [("fsync", 0), ("fdatasync", 0), ("rename", 0), ("open", 0)];
    for line in summary.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        let (Some(name), Some(calls)) = (cols.last(), cols.get(3)) else {
            continue;
        };
        let Ok(calls) = calls.parse::<u64>() else {
            continue;
        };
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
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let (mut count, mut rounds, mut strace) = (200usize, 3usize, false);
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
    let data = tempfile::Builder::new()
        .prefix("stow-ingest-")
        .tempdir_in(&dir)?;
    let orthanc = tokio::task::spawn_blocking(Orthanc::start).await?;
    let client = Client::builder().pool_max_idle_per_host(1).build()?;
    let (server, base, token) = start_ours(data.path(), &client).await?;
    let ours_url = format!("{base}/dicomweb/studies");
    let theirs_url = format!("{}/studies", orthanc.dicomweb());
    let bearer = |b: reqwest::RequestBuilder| b.bearer_auth(&token);
    let basic = |b: reqwest::RequestBuilder| b.basic_auth("orthanc", Some("orthanc"));
    // Warm-up, untimed: connections, Orthanc's first study.
    let (study, files) = instances(4)?;
    post_all(&client, &ours_url, &bearer, &files).await?;
    post_all(&client, &theirs_url, &basic, &files).await?;
    clear_study(&orthanc, &study)?;
    let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    println!("run  ours inst/s  orthanc inst/s  ratio");
    for round in 0..rounds {
        let (study_a, a) = instances(count)?;
        let (study_b, b) = instances(count)?;
        sync()?;
        let (o, t) = if round % 2 == 0 {
            let o = post_all(&client, &ours_url, &bearer, &a).await?;
            sync()?;
            let t = post_all(&client, &theirs_url, &basic, &b).await?;
            (o, t)
        } else {
            let t = post_all(&client, &theirs_url, &basic, &b).await?;
            sync()?;
            let o = post_all(&client, &ours_url, &bearer, &a).await?;
            (o, t)
        };
        clear_study(&orthanc, &study_b)?;
        let _ = study_a;
        println!("{round:>3}  {o:>11.1}  {t:>14.1}  {:.2}", o / t);
        ours.push(o);
        theirs.push(t);
        ratios.push(o / t);
    }
    let (mo, mt, mr) = (median(&ours), median(&theirs), median(&ratios));
    println!("median  ours {mo:.1} inst/s  orthanc {mt:.1} inst/s  ratio {mr:.2}");
    let mut per_instance = serde_json::Map::new();
    if strace {
        let (_, files) = instances(count)?;
        sync()?;
        let out =
            std::env::temp_dir().join(format!("stow-ingest-strace-{}.txt", std::process::id()));
        let mut child = std::process::Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&out)
            .args(["-p", &std::process::id().to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // strace needs a moment to attach to every thread.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        post_all(&client, &ours_url, &bearer, &files).await?;
        // SIGINT makes strace detach and write its summary.
        std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()?;
        child.wait()?;
        let summary = std::fs::read_to_string(&out)?;
        let _ = std::fs::remove_file(&out);
        println!("syscalls per ingested instance (strace -f -c, {count} POSTs):");
        for (name, n) in syscall_counts(&summary) {
            let per = n as f64 / count as f64;
            println!("  {name:<10} {per:.2}");
            per_instance.insert(name.into(), serde_json::json!(per));
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "stow_ingest",
            "count": count,
            "ours_inst_per_s": ours,
            "orthanc_inst_per_s": theirs,
            "median_ratio": mr,
            "syscalls_per_instance": per_instance,
        })
    );
    server.shutdown().await;
    Ok(())
}

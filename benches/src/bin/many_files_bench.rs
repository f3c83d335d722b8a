//! Does the cost of a file grow with its study? One study session of
//! `--files` (default 10,000) small DICOM files uploaded over HTTP, each by
//! one tus creation-with-upload POST (its SHA-256 in `Upload-Checksum`),
//! sequentially on one keep-alive connection, into our server running in
//! this process on its embedded defaults (local chunks, JSONL audit trail,
//! local archive) with the state database on SQLite (default) or on a
//! throwaway PostgreSQL 15 cluster (`--engine postgres`, durable settings).
//!
//! Prints the rate (files/s) of every window of `--window` files (default
//! 1,000), the ratio of the last window's rate to the first's, the time of
//! the first page of the study view (`GET /api/v1/studies/{id}`) and of the
//! study's completion (`POST /api/v1/studies/{id}/complete`), then one
//! JSON line.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin many_files_bench`
//! (options: `--files N`, `--window N`, `--engine sqlite|postgres`,
//! `--dir DIR` for the data folder, default the system temp dir).

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use relaypacs_benches::Res;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use reqwest::{Client, StatusCode};
use sha2::{Digest, Sha256};

const PASSWORD: &str = "bench password long enough 123";

fn hex_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let (mut files, mut window) = (10_000usize, 1_000usize);
    let mut engine = "sqlite".to_owned();
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--files" => files = args.next().ok_or("--files N")?.parse()?,
            "--window" => window = args.next().ok_or("--window N")?.parse()?,
            "--engine" => engine = args.next().ok_or("--engine sqlite|postgres")?,
            "--dir" => dir = args.next().ok_or("--dir DIR")?.into(),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let window = window.clamp(1, files.max(1));
    let data = tempfile::Builder::new()
        .prefix("many-files-")
        .tempdir_in(&dir)?;
    let mut config = relaypacs_http::Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data.path().to_path_buf(),
        secret: Some(secrecy::SecretString::from(hex_secret())),
        ..relaypacs_http::Config::default()
    };
    config.http.min_free_bytes = Some(0);
    config.limits.max_files = u32::try_from(files.max(1))?;
    let _pg = match engine.as_str() {
        "sqlite" => None,
        "postgres" => {
            let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start).await?;
            config.state.url = Some(pg.create_database("relay"));
            Some(pg)
        }
        other => return Err(format!("unknown engine {other}").into()),
    };
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
    let client = Client::builder().pool_max_idle_per_host(1).build()?;
    let login = serde_json::json!({ "username": "bench", "password": PASSWORD });
    let r = client
        .post(format!("{base}/api/v1/auth/login"))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&login)?)
        .send()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    let mut token = v["access_token"]
        .as_str()
        .ok_or("login: no access_token")?
        .to_owned();
    let mut token_at = Instant::now();
    let r = client
        .post(format!("{base}/api/v1/studies"))
        .bearer_auth(&token)
        .send()
        .await?;
    if r.status() != StatusCode::CREATED {
        return Err(format!("POST /api/v1/studies: {}", r.status()).into());
    }
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    let study_id = v["id"].as_str().ok_or("no study id")?.to_owned();
    let study_uid = new_uid();
    let series_uid = new_uid();
    let mut rates = Vec::new();
    let mut t_window = Instant::now();
    let mut size = 0;
    for i in 0..files {
        // Generated outside the timing of the request, not of the window:
        // a few microseconds for an 8x8 image.
        let file = generate(&DicomSpec {
            study_uid: study_uid.clone(),
            series_uid: series_uid.clone(),
            sop_instance_uid: new_uid(),
            rows: 8,
            cols: 8,
            seed: i as u64,
            ..DicomSpec::default()
        })?;
        size = file.len();
        if token_at.elapsed().as_secs() > 120 {
            let r = client
                .post(format!("{base}/api/v1/auth/login"))
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(&login)?)
                .send()
                .await?;
            let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
            token = v["access_token"].as_str().ok_or("login")?.to_owned();
            token_at = Instant::now();
        }
        let meta = format!(
            "filename {},session {}",
            STANDARD.encode(format!("f{i:05}.dcm")),
            STANDARD.encode(&study_id)
        );
        let sum = STANDARD.encode(Sha256::digest(&file));
        let r = client
            .post(format!("{base}/files"))
            .bearer_auth(&token)
            .header("Tus-Resumable", "1.0.0")
            .header("Upload-Length", file.len().to_string())
            .header("Upload-Metadata", meta)
            .header("Upload-Checksum", format!("sha256 {sum}"))
            .header("Content-Type", "application/offset+octet-stream")
            .body(file)
            .send()
            .await?;
        if r.status() != StatusCode::CREATED {
            let s = r.status();
            return Err(format!("file {i}: POST /files: {s}: {}", r.text().await?).into());
        }
        if (i + 1) % window == 0 {
            let rate = window as f64 / t_window.elapsed().as_secs_f64();
            println!(
                "files {:>6}..{:>6}: {rate:>8.1} files/s",
                i + 1 - window,
                i + 1
            );
            rates.push(rate);
            t_window = Instant::now();
        }
    }
    let t = Instant::now();
    let r = client
        .get(format!("{base}/api/v1/studies/{study_id}"))
        .bearer_auth(&token)
        .send()
        .await?;
    let status = r.status();
    let view: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    let view_secs = t.elapsed().as_secs_f64();
    if status != StatusCode::OK {
        return Err(format!("study view: {status}").into());
    }
    let shown = view["files"].as_array().map_or(0, Vec::len);
    let t = Instant::now();
    let r = client
        .post(format!("{base}/api/v1/studies/{study_id}/complete"))
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await?;
    let complete_secs = t.elapsed().as_secs_f64();
    if !r.status().is_success() {
        let s = r.status();
        return Err(format!("complete: {s}: {}", r.text().await?).into());
    }
    let ratio = match (rates.first(), rates.last()) {
        (Some(a), Some(b)) => b / a,
        _ => f64::NAN,
    };
    println!(
        "{engine}: {files} files of {size} bytes; last/first window {ratio:.2}; \
         study view {view_secs:.3} s ({shown} files on its first page); complete {complete_secs:.3} s"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "many_files",
            "engine": engine,
            "files": files,
            "file_bytes": size,
            "window": window,
            "rates_files_per_s": rates,
            "last_over_first": ratio,
            "view_secs": view_secs,
            "view_files": shown,
            "complete_secs": complete_secs,
        })
    );
    server.shutdown().await;
    Ok(())
}

//! Does the cost of a file grow with its study? One study session of
//! `--files` (default 10,000) small DICOM files uploaded over HTTP, each by
//! one tus creation-with-upload POST (its SHA-256 in `Upload-Checksum`),
//! sequentially on one keep-alive connection, into our server running in
//! this process on its embedded defaults (local chunks, JSONL audit trail,
//! local archive) with the state database on SQLite (default) or on a
//! throwaway PostgreSQL 15 cluster (`--engine postgres`, durable settings).
//!
//! Prints the rate (files/s) of every window of `--window` files (default
//! 1,000), the ratio of the last window's rate to the first's, the median
//! time of a file refused in the full study (21 files that are not DICOM,
//! each sent whole and refused with 422, which removes it from the
//! study), the time of the first page of the study view
//! (`GET /api/v1/studies/{id}`) and of the study's completion
//! (`POST /api/v1/studies/{id}/complete`), then one JSON line.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin many_files_bench`
//! (options: `--files N`, `--window N`, `--engine sqlite|postgres`,
//! `--dir DIR` for the data folder, default the system temp dir,
//! `--state-dir DIR` for the SQLite file alone, e.g. `/dev/shm`).
//!
//! `--latency N`: instead, the database's share of request time. Three
//! phases of N files each, one request at a time: (A) tus creation-with-
//! upload POSTs, (B) creation POSTs without a body, (C) one PATCH per file
//! created in B carrying the whole file. For each phase: the client's total
//! request time, per request. On PostgreSQL (`--engine postgres`, started
//! with `pg_stat_statements` and `track_wal_io_timing`), the statistics are
//! reset before each phase and read after it: the executor time of every
//! statement of the gateway's database (`total_exec_time` + planning, which
//! leaves out the commit's WAL flush, the round trips and the driver) plus
//! the cluster's WAL write and sync time (`pg_stat_wal`, where the commits'
//! flushes are counted). On SQLite, run once with the file on disk and once
//! with `--state-dir /dev/shm` (chunks and archive stay on disk): the
//! difference is what the state database's durable writes cost.

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use relaypacs_benches::{Res, login, ours_config, start_ours};
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use reqwest::{Client, StatusCode};
use sha2::{Digest, Sha256};

/// Files refused in the full study, one at a time (see `main`).
const REFUSED: usize = 21;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let (mut files, mut window) = (10_000usize, 1_000usize);
    let mut engine = "sqlite".to_owned();
    let mut dir = std::env::temp_dir();
    let mut state_dir: Option<std::path::PathBuf> = None;
    let mut latency = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--files" => files = args.next().ok_or("--files N")?.parse()?,
            "--window" => window = args.next().ok_or("--window N")?.parse()?,
            "--engine" => engine = args.next().ok_or("--engine sqlite|postgres")?,
            "--dir" => dir = args.next().ok_or("--dir DIR")?.into(),
            "--state-dir" => state_dir = Some(args.next().ok_or("--state-dir DIR")?.into()),
            "--latency" => latency = args.next().ok_or("--latency N")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let window = window.clamp(1, files.max(1));
    let data = tempfile::Builder::new()
        .prefix("many-files-")
        .tempdir_in(&dir)?;
    let mut config = ours_config(data.path());
    config.limits.max_files = u32::try_from((files + REFUSED).max(3 * latency).max(1))?;
    config.http.max_open_uploads_per_user = latency + 64;
    let state_tmp = match &state_dir {
        Some(d) => {
            let t = tempfile::Builder::new()
                .prefix("many-files-state-")
                .tempdir_in(d)?;
            config.state.url = Some(format!("sqlite://{}", t.path().join("state.db").display()));
            Some(t)
        }
        None => None,
    };
    let pg = match engine.as_str() {
        "sqlite" => None,
        "postgres" => {
            let mut options = relaypacs_test_peers::PostgresOptions::default();
            if latency > 0 {
                for (k, v) in [
                    ("shared_preload_libraries", "pg_stat_statements"),
                    ("pg_stat_statements.track_planning", "on"),
                    ("track_wal_io_timing", "on"),
                ] {
                    options.settings.push((k.into(), v.into()));
                }
            }
            let pg = tokio::task::spawn_blocking(move || {
                relaypacs_test_peers::Postgres::start_with(options)
            })
            .await?;
            let url = pg.create_database("relay");
            if latency > 0 {
                pg.psql(&url, "create extension pg_stat_statements");
            }
            config.state.url = Some(url);
            Some(pg)
        }
        other => return Err(format!("unknown engine {other}").into()),
    };
    let db_url = config.state.url.clone().unwrap_or_default();
    let (server, base) = start_ours(config).await?;
    let client = Client::builder().pool_max_idle_per_host(1).build()?;
    let mut token = login(&client, &base).await?;
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
    if latency > 0 {
        let on_disk = if state_dir.is_some() {
            "state on --state-dir"
        } else {
            "state in the data folder"
        };
        let ctx = Latency {
            client: &client,
            base: &base,
            token: &token,
            study: &study_id,
            pg: pg.as_ref().map(|p| (p, db_url.clone())),
        };
        let phases = ctx.run(latency, &study_uid, &series_uid).await?;
        println!(
            "{}",
            serde_json::json!({ "bench": "many_files_latency", "engine": engine, "state": on_disk, "files": latency, "phases": phases })
        );
        server.shutdown().await;
        drop(state_tmp);
        return Ok(());
    }
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
            token = login(&client, &base).await?;
            token_at = Instant::now();
        }
        let sum = STANDARD.encode(Sha256::digest(&file));
        let r = create_with_upload(
            &client,
            &base,
            &token,
            &study_id,
            &format!("f{i:05}.dcm"),
            file,
        )
        .header("Upload-Checksum", format!("sha256 {sum}"))
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
    // Files refused in the full study: not DICOM, each sent whole by tus
    // creation-with-upload; the refusal (422) removes it from the study
    // (`Pipeline::drop_file`), which must not cost more as the study grows.
    let mut refused_ms = Vec::new();
    for i in 0..REFUSED {
        let junk = vec![7u8; 1000 + i];
        let name = format!("junk{i:02}.bin");
        let t = Instant::now();
        let r = create_with_upload(&client, &base, &token, &study_id, &name, junk)
            .send()
            .await?;
        let status = r.status();
        let answer = r.bytes().await?;
        refused_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if status != StatusCode::UNPROCESSABLE_ENTITY {
            let text = String::from_utf8_lossy(&answer);
            return Err(format!("refused file {i}: {status}: {text}").into());
        }
    }
    refused_ms.sort_by(f64::total_cmp);
    let refused_median_ms = refused_ms[refused_ms.len() / 2];
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
         study view {view_secs:.3} s ({shown} files on its first page); complete {complete_secs:.3} s; \
         a refused file {refused_median_ms:.1} ms (median of {REFUSED})"
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
            "refused_file_ms_median": refused_median_ms,
        })
    );
    server.shutdown().await;
    Ok(())
}

/// A tus creation-with-upload of `body` as file `name` of study session
/// `study` (more headers may be added before it is sent).
fn create_with_upload(
    client: &Client,
    base: &str,
    token: &str,
    study: &str,
    name: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let meta = format!(
        "filename {},session {}",
        STANDARD.encode(name),
        STANDARD.encode(study)
    );
    client
        .post(format!("{base}/files"))
        .bearer_auth(token)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", body.len().to_string())
        .header("Upload-Metadata", meta)
        .header("Content-Type", "application/offset+octet-stream")
        .body(body)
}

/// The latency mode's shared context (see the module's documentation).
struct Latency<'a> {
    client: &'a Client,
    base: &'a str,
    token: &'a str,
    study: &'a str,
    /// The throwaway cluster and the gateway's database URL on it.
    pg: Option<(&'a relaypacs_test_peers::Postgres, String)>,
}

impl Latency<'_> {
    fn files(&self, n: usize, study_uid: &str, series_uid: &str) -> Res<Vec<Vec<u8>>> {
        (0..n)
            .map(|i| {
                Ok(generate(&DicomSpec {
                    study_uid: study_uid.to_owned(),
                    series_uid: series_uid.to_owned(),
                    sop_instance_uid: new_uid(),
                    rows: 8,
                    cols: 8,
                    seed: i as u64,
                    ..DicomSpec::default()
                })?)
            })
            .collect()
    }

    /// Statistics reset (PostgreSQL only).
    fn reset(&self) {
        if let Some((pg, url)) = &self.pg {
            pg.psql(
                url,
                "select pg_stat_statements_reset(); select pg_stat_reset_shared('wal')",
            );
        }
    }

    /// Milliseconds since the reset: statements' execution + planning of
    /// the gateway's database, their calls, WAL write and sync (PostgreSQL only).
    fn read(&self) -> Option<serde_json::Value> {
        let (pg, url) = self.pg.as_ref()?;
        let out = pg.psql(
            url,
            "select coalesce(sum(total_exec_time), 0), coalesce(sum(total_plan_time), 0), coalesce(sum(calls), 0) \
             from pg_stat_statements where dbid = (select oid from pg_database where datname = 'relay'); \
             select wal_write_time, wal_sync_time, wal_sync from pg_stat_wal",
        );
        let v: Vec<f64> = out
            .split(['|', '\n'])
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        match v.as_slice() {
            [exec, plan, calls, write, sync, syncs] => Some(serde_json::json!({
                "exec_ms": exec, "plan_ms": plan, "statements": calls,
                "wal_write_ms": write, "wal_sync_ms": sync, "wal_syncs": syncs,
            })),
            _ => None,
        }
    }

    fn meta(&self, i: usize) -> String {
        format!(
            "filename {},session {}",
            STANDARD.encode(format!("l{i:05}.dcm")),
            STANDARD.encode(self.study)
        )
    }

    /// One timed request; its status must be `want`. Returns the seconds
    /// and the response's Location.
    async fn timed(&self, req: reqwest::RequestBuilder, want: StatusCode) -> Res<(f64, String)> {
        let t = Instant::now();
        let r = req
            .bearer_auth(self.token)
            .header("Tus-Resumable", "1.0.0")
            .send()
            .await?;
        let status = r.status();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = r.bytes().await?;
        let secs = t.elapsed().as_secs_f64();
        if status != want {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)).into());
        }
        Ok((secs, location))
    }

    /// One phase's summary: client time and what the database reports.
    fn summary(&self, phase: &str, n: usize, secs: f64) -> serde_json::Value {
        let db = self.read();
        let ms_per = 1000.0 * secs / n as f64;
        let mut line = format!("{phase}: {n} requests, client {ms_per:.2} ms each");
        if let Some(d) = &db {
            let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
            let sql = f("exec_ms") + f("plan_ms");
            let wal = f("wal_write_ms") + f("wal_sync_ms");
            line += &format!(
                "; PostgreSQL: {:.1} statements, executor+planner {:.3} ms, WAL write+sync {:.3} ms ({:.1} syncs) per request = {:.0}% + {:.0}% of the client's time",
                f("statements") / n as f64,
                sql / n as f64,
                wal / n as f64,
                f("wal_syncs") / n as f64,
                100.0 * sql / (1000.0 * secs),
                100.0 * wal / (1000.0 * secs),
            );
        }
        println!("{line}");
        serde_json::json!({ "phase": phase, "requests": n, "client_ms_per_request": ms_per, "postgres": db })
    }

    async fn run(
        &self,
        n: usize,
        study_uid: &str,
        series_uid: &str,
    ) -> Res<Vec<serde_json::Value>> {
        let url = format!("{}/files", self.base);
        let mut out = Vec::new();

        let files = self.files(n, study_uid, series_uid)?;
        self.reset();
        let mut secs = 0.0;
        for (i, f) in files.into_iter().enumerate() {
            let sum = STANDARD.encode(Sha256::digest(&f));
            let req = self
                .client
                .post(&url)
                .header("Upload-Length", f.len().to_string())
                .header("Upload-Metadata", self.meta(i))
                .header("Upload-Checksum", format!("sha256 {sum}"))
                .header("Content-Type", "application/offset+octet-stream")
                .body(f);
            secs += self.timed(req, StatusCode::CREATED).await?.0;
        }
        out.push(self.summary("A creation-with-upload", n, secs));

        let files = self.files(n, study_uid, series_uid)?;
        self.reset();
        let mut secs = 0.0;
        let mut locations = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let req = self
                .client
                .post(&url)
                .header("Upload-Length", f.len().to_string())
                .header("Upload-Metadata", self.meta(n + i));
            let (s, loc) = self.timed(req, StatusCode::CREATED).await?;
            secs += s;
            locations.push(loc);
        }
        out.push(self.summary("B creation without body", n, secs));

        self.reset();
        let mut secs = 0.0;
        for (f, loc) in files.into_iter().zip(locations) {
            let sum = STANDARD.encode(Sha256::digest(&f));
            let target = if loc.starts_with("http") {
                loc
            } else {
                format!("{}{loc}", self.base)
            };
            let req = self
                .client
                .patch(target)
                .header("Upload-Offset", "0")
                .header("Upload-Checksum", format!("sha256 {sum}"))
                .header("Content-Type", "application/offset+octet-stream")
                .body(f);
            secs += self.timed(req, StatusCode::NO_CONTENT).await?.0;
        }
        out.push(self.summary("C PATCH (whole file)", n, secs));
        Ok(out)
    }
}

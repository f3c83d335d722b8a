//! STOW-RS forwarding throughput into a real Orthanc: our pipeline's
//! delivery through `StowSink` beside Orthanc's own STOW-RS ingest of the
//! same files, same Orthanc, same run.
//!
//! Generates `--count` (default 200) Secondary Capture instances of
//! 512x512 16-bit (about 0.5 MiB each, one study and series) in memory and
//! starts a fresh Orthanc on free loopback ports. Then, untimed, ingests
//! the files into one pipeline session per round (local chunk store,
//! session store and audit trail in a temp dir; every file uploaded in one
//! chunk and completed, so it is re-verified and DICOM-validated) and puts
//! each session in the outbox (`complete_session`). Then `--rounds`
//! (default 3) rounds, alternating:
//!
//! - **direct**: POST the files from memory straight to Orthanc's
//!   `{dicomweb}/studies` as `multipart/related; type="application/dicom"`
//!   with basic auth, batched exactly as `StowSink` batches by default
//!   (`DicomWebConfig::new` limits: 32 MiB or 64 instances per request),
//!   sequential requests on one keep-alive client (a new one each run).
//!   The bodies are built before the clock starts. Every answer must be
//!   200 and reference every instance of its request. This is Orthanc's
//!   own ingest rate.
//! - **ours**: `Pipeline::attempt_delivery` of that round's session with a
//!   `StowSink` (default `DicomWebConfig`, basic auth): every instance is
//!   streamed from the chunk store with its SHA-256 re-verified, POSTed in
//!   groups of the same size, each verified while the next is sent (with
//!   `--verify content`, the default, by QIDO-RS and a WADO-RS retrieval
//!   of every instance compared with what was sent; with `--verify
//!   presence` by QIDO-RS alone), after a QIDO-RS check before sending; the session record
//!   and audit trail are updated durably. The session must end `Delivered`.
//! - **sink** (to see where the difference goes): `StowSink::deliver`
//!   alone from an in-memory source (no chunk store, no pipeline), then,
//!   timed apart, its `verify` (the configured mode).
//!
//! The order of the three rotates from round to round. The study is
//! deleted through Orthanc's REST API after every run and the page cache
//! is written back (`sync`, untimed), so each run stores into the same
//! empty Orthanc with no writeback of the run before pending. Prints
//! instances/s and MB/s per run, the medians and the ratio ours/direct (of
//! the medians, and the median of the rounds' ratios) as a table, then one
//! JSON line; also Orthanc's CPU use during each run (and ours), in % of
//! one core, from /proc: the machine has two cores shared by client and
//! server.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin stow_bench`
//! (options: `--count N`, `--rounds N`, `--data DIR`: where the pipeline's
//! data folder goes, default the system temp dir, which is also where the
//! test Orthanc keeps its storage).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use relaypacs_benches::{Cpu, Res, clear_study, median};
use relaypacs_core::dicom::validate_dicom;
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, TransferSyntax, generate, new_uid};
use relaypacs_core::testing::pacs_sink::MemorySource;
use relaypacs_core::{
    Actor, InstanceOutcome, OutboxConfig, OutboxEvent, PacsSink, Pipeline, PipelineConfig,
    SessionId, SessionState, VerifyMode,
};
use relaypacs_integration::{Embedded, open_session, upload_file};
use relaypacs_pacs::{DicomWebAuth, DicomWebConfig, StowSink};
use relaypacs_test_peers::Orthanc;

const USAGE: &str = "usage: stow_bench [--count N (200)] [--rounds N (3)] [--data DIR (temp dir)] [--verify content|presence (content)]";

/// Delete the study from Orthanc, then flush the page cache's dirty data
/// so the next run does not pay for this one's writes.
fn clear(orthanc: &Orthanc, study_uid: &str) -> Res<()> {
    clear_study(orthanc, study_uid)?;
    let synced = std::process::Command::new("sync").status()?;
    if !synced.success() {
        return Err(format!("sync: {synced}").into());
    }
    Ok(())
}

/// Index ranges of the STOW-RS requests, by the same rule as `StowSink`:
/// a new request once the next file would pass `max_bytes` or the request
/// holds `max_count` files (a file larger than `max_bytes` goes alone).
fn batches(sizes: &[u64], max_bytes: u64, max_count: usize) -> Vec<std::ops::Range<usize>> {
    let (max_bytes, max_count) = (max_bytes.max(1), max_count.max(1));
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        let n = i - start;
        if n > 0 && (bytes + size > max_bytes || n >= max_count) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// A `multipart/related` body of `files`.
fn multipart(files: &[Vec<u8>], boundary: &str) -> Bytes {
    let mut body = Vec::with_capacity(files.iter().map(|f| f.len() + 128).sum());
    for f in files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Bytes::from(body)
}

/// The SOP Instance UIDs a STOW-RS answer lists as stored (00081199).
fn referenced(answer: &[u8]) -> Res<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(answer)?;
    let obj = match &json {
        serde_json::Value::Array(a) => a.first().unwrap_or(&serde_json::Value::Null),
        v => v,
    };
    if obj["00081198"]["Value"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        return Err(format!("STOW-RS reports failures: {}", obj["00081198"]).into());
    }
    Ok(obj["00081199"]["Value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["00081155"]["Value"][0].as_str().map(str::to_owned))
        .collect())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let (mut count, mut rounds) = (200usize, 3usize);
    let mut data = std::env::temp_dir();
    let mut verify = VerifyMode::Content;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let n: Option<usize> = value
            .as_deref()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0);
        match (flag.as_str(), n, value) {
            ("--count", Some(n), _) => count = n,
            ("--rounds", Some(n), _) => rounds = n,
            ("--data", _, Some(dir)) => data = dir.into(),
            ("--verify", _, Some(v)) if v == "content" => verify = VerifyMode::Content,
            ("--verify", _, Some(v)) if v == "presence" => verify = VerifyMode::Presence,
            _ => return Err(format!("bad arguments\n{USAGE}").into()),
        }
    }

    // The instances, in memory.
    let (study, series) = (new_uid(), new_uid());
    let mut files = Vec::with_capacity(count);
    let mut sops = Vec::with_capacity(count);
    for i in 0..count {
        let spec = DicomSpec {
            study_uid: study.clone(),
            series_uid: series.clone(),
            sop_instance_uid: new_uid(),
            sop_class: SopClass::SecondaryCapture,
            transfer_syntax: TransferSyntax::ExplicitLe,
            rows: 512,
            cols: 512,
            seed: i as u64,
            ..DicomSpec::default()
        };
        sops.push(spec.sop_instance_uid.clone());
        files.push(generate(&spec)?);
    }
    let mut memory = MemorySource::default();
    let mut instances = Vec::with_capacity(count);
    for f in &files {
        let dicom = validate_dicom(f, f.len() as u64, &Default::default())?;
        instances.push(memory.add(f.clone(), dicom));
    }
    let total_bytes: u64 = files.iter().map(|f| f.len() as u64).sum();
    let avg = total_bytes as f64 / count as f64;
    let mb = total_bytes as f64 / 1e6;
    println!(
        "{count} instances, Secondary Capture 512x512x16, {avg:.0} bytes each ({mb:.1} MB in all)"
    );

    let orthanc = tokio::task::block_in_place(Orthanc::start);
    let config = DicomWebConfig {
        auth: DicomWebAuth::Basic {
            user: orthanc.user.clone(),
            password: orthanc.password.clone().into(),
        },
        verify,
        ..DicomWebConfig::new(orthanc.dicomweb())
    };
    let sink = StowSink::new(&config)?;

    // The direct requests, built before any timing.
    let sizes: Vec<u64> = files.iter().map(|f| f.len() as u64).collect();
    let ranges = batches(&sizes, config.batch_bytes, config.batch_instances);
    let boundary = format!("stow-bench-{:032x}", rand::random::<u128>());
    let bodies: Vec<Bytes> = ranges
        .iter()
        .map(|r| multipart(&files[r.clone()], &boundary))
        .collect();
    let content_type =
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let url = format!("{}/studies", orthanc.dicomweb());
    println!(
        "Orthanc on {} (fresh storage); {} requests of {} instances; direct reqwest vs {sink}",
        orthanc.url(),
        ranges.len(),
        ranges
            .iter()
            .map(|r| r.len().to_string())
            .collect::<Vec<_>>()
            .join("+")
    );

    // The pipeline, with its sessions ingested and queued (untimed).
    let work = tempfile::Builder::new()
        .prefix("stow_bench.")
        .tempdir_in(&data)?;
    let embedded = Embedded::open(&work.path().join("data"), PipelineConfig::default()).await?;
    let local = &embedded.pipeline;
    let pipeline = Pipeline::new(
        Arc::new(embedded.chunks.clone()),
        Arc::new(embedded.sessions.clone()),
        Arc::new(sink.clone()),
        Arc::new(embedded.audit.clone()),
        local.config().clone(),
    );
    let actor = Actor::user("bench");
    let mut sessions: Vec<SessionId> = Vec::with_capacity(rounds);
    let t = Instant::now();
    for _ in 0..rounds {
        let sid = open_session(&pipeline, &actor).await?;
        for (i, f) in files.iter().enumerate() {
            upload_file(
                &pipeline,
                &actor,
                sid,
                &format!("sc-{i:05}.dcm"),
                f,
                8 << 20,
            )
            .await?;
        }
        pipeline.complete_session(&actor, sid).await?;
        sessions.push(sid);
    }
    println!(
        "ingested {rounds} sessions of {count} files in {:.1} s (untimed), data in {}",
        t.elapsed().as_secs_f64(),
        work.path().display()
    );

    let cpu = Cpu::of_orthanc_and_me()?;
    let outbox = OutboxConfig::default();
    let (mut direct, mut ours) = (Vec::new(), Vec::new());
    let (mut ocpu_direct, mut ocpu_ours) = (Vec::new(), Vec::new());
    let (mut mcpu_direct, mut mcpu_ours) = (Vec::new(), Vec::new());
    let (mut sink_only, mut verify_secs) = (Vec::new(), Vec::new());
    for (round, &sid) in (1..=rounds).zip(&sessions) {
        // The order rotates from round to round, so no mode always runs
        // first (the disk's speed drifts during a run).
        for step in 0..3 {
            match (step + round - 1) % 3 {
                0 => {
                    // Direct: Orthanc's own STOW-RS ingest. A new client each run, as
                    // Orthanc closes idle keep-alive connections between runs.
                    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
                    let c0 = cpu.now();
                    let t = Instant::now();
                    let mut answers = Vec::with_capacity(bodies.len());
                    for body in &bodies {
                        let resp = client
                            .post(&url)
                            .basic_auth(&orthanc.user, Some(&orthanc.password))
                            .header(reqwest::header::CONTENT_TYPE, &content_type)
                            .header(reqwest::header::ACCEPT, "application/dicom+json")
                            .body(body.clone())
                            .send()
                            .await?;
                        let status = resp.status();
                        let answer = resp.bytes().await?;
                        if status != reqwest::StatusCode::OK {
                            return Err(format!(
                                "direct STOW-RS: HTTP {status}: {}",
                                String::from_utf8_lossy(&answer)
                            )
                            .into());
                        }
                        answers.push(answer);
                    }
                    let secs = t.elapsed().as_secs_f64();
                    let (ocpu, mcpu) = cpu.since(c0, secs);
                    for (range, answer) in ranges.iter().zip(&answers) {
                        let stored = referenced(answer)?;
                        if let Some(missing) =
                            sops[range.clone()].iter().find(|s| !stored.contains(s))
                        {
                            return Err(format!("direct STOW-RS: {missing} not referenced").into());
                        }
                    }
                    let held = tokio::task::block_in_place(|| orthanc.instance_count());
                    if held != count {
                        return Err(format!("direct: Orthanc holds {held} of {count}").into());
                    }
                    direct.push(count as f64 / secs);
                    ocpu_direct.push(ocpu);
                    mcpu_direct.push(mcpu);
                    println!(
                        "round {round}: direct   {secs:7.3} s  {:6.1} inst/s  {:6.1} MB/s  Orthanc CPU {ocpu:3.0}%  client {mcpu:3.0}%",
                        count as f64 / secs,
                        mb / secs
                    );
                    tokio::task::block_in_place(|| clear(&orthanc, &study))?;
                }
                1 => {
                    // Ours: one delivery attempt of the queued session.
                    let c0 = cpu.now();
                    let t = Instant::now();
                    let (event, _) = pipeline.attempt_delivery(sid, "bench", &outbox).await?;
                    let secs = t.elapsed().as_secs_f64();
                    let (ocpu, mcpu) = cpu.since(c0, secs);
                    let record = pipeline.session(&actor, sid).await?;
                    if !matches!(record.state, SessionState::Delivered { .. })
                        || !matches!(event, Some(OutboxEvent::Delivered { instances, .. }) if instances == count)
                    {
                        return Err(
                            format!("ours: not delivered: {:?} / {event:?}", record.state).into(),
                        );
                    }
                    let held = tokio::task::block_in_place(|| orthanc.instance_count());
                    if held != count {
                        return Err(format!("ours: Orthanc holds {held} of {count}").into());
                    }
                    ours.push(count as f64 / secs);
                    ocpu_ours.push(ocpu);
                    mcpu_ours.push(mcpu);
                    println!(
                        "round {round}: ours     {secs:7.3} s  {:6.1} inst/s  {:6.1} MB/s  Orthanc CPU {ocpu:3.0}%  ours {mcpu:3.0}%",
                        count as f64 / secs,
                        mb / secs
                    );
                    tokio::task::block_in_place(|| clear(&orthanc, &study))?;
                }
                _ => {
                    // The sink alone, from memory; then its verification.
                    let t = Instant::now();
                    let report = sink.deliver(&instances, &memory).await?;
                    let secs = t.elapsed().as_secs_f64();
                    if let Some((uid, o)) = report
                        .outcomes
                        .iter()
                        .find(|(_, o)| *o != InstanceOutcome::Stored)
                    {
                        return Err(format!("sink: {uid}: {o:?}").into());
                    }
                    let t = Instant::now();
                    let held = sink.verify(&instances).await?;
                    let vsecs = t.elapsed().as_secs_f64();
                    if !held.iter().all(|h| h.is_same()) {
                        return Err("sink: verify finds instances missing".into());
                    }
                    sink_only.push(count as f64 / secs);
                    verify_secs.push(vsecs);
                    println!(
                        "round {round}: sink     {secs:7.3} s  {:6.1} inst/s  {:6.1} MB/s  (deliver from memory; verify {vsecs:.3} s)",
                        count as f64 / secs,
                        mb / secs
                    );
                    tokio::task::block_in_place(|| clear(&orthanc, &study))?;
                }
            }
        }
    }

    let (md, mo) = (median(&direct), median(&ours));
    let mbs = |ips: f64| ips * avg / 1e6;
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!();
    println!(
        "| client | runs (inst/s) | median inst/s | MB/s | Orthanc CPU (median) | client CPU (median) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| direct STOW-RS (reqwest, from memory) | {} | {md:.1} | {:.1} | {:.0}% | {:.0}% |",
        fmt_runs(&direct),
        mbs(md),
        median(&ocpu_direct),
        median(&mcpu_direct)
    );
    println!(
        "| RelayPACS pipeline + StowSink | {} | {mo:.1} | {:.1} | {:.0}% | {:.0}% |",
        fmt_runs(&ours),
        mbs(mo),
        median(&ocpu_ours),
        median(&mcpu_ours)
    );
    let ms = median(&sink_only);
    println!(
        "| StowSink::deliver alone, from memory | {} | {ms:.1} | {:.1} | | |",
        fmt_runs(&sink_only),
        mbs(ms)
    );
    println!(
        "StowSink::verify ({verify:?}, {count} instances): median {:.3} s",
        median(&verify_secs)
    );
    let per_round: Vec<f64> = ours.iter().zip(&direct).map(|(o, d)| o / d).collect();
    println!(
        "ratio ours/direct: {:.2} of the medians, {:.2} median of the rounds' ({}) (aim >= 0.90); \
         sink alone/direct: {:.2}",
        mo / md,
        median(&per_round),
        per_round
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        ms / md
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "stow",
            "instances": count,
            "instance_bytes": avg.round(),
            "rounds": rounds,
            "requests": ranges.len(),
            "direct_inst_per_s": direct,
            "ours_inst_per_s": ours,
            "direct_median": md,
            "ours_median": mo,
            "direct_median_mb_per_s": mbs(md),
            "ours_median_mb_per_s": mbs(mo),
            "ratio": mo / md,
            "ratio_per_round": per_round,
            "ratio_per_round_median": median(&per_round),
            "sink_only_inst_per_s": sink_only,
            "sink_only_median": ms,
            "verify_secs": verify_secs,
            "orthanc_cpu_pct_direct": ocpu_direct,
            "orthanc_cpu_pct_ours": ocpu_ours,
            "client_cpu_pct_direct": mcpu_direct,
            "our_cpu_pct": mcpu_ours,
        })
    );
    Ok(())
}

//! DIMSE C-STORE throughput into a real Orthanc: our `CStoreSink` beside
//! dcmtk's `storescu` as baseline, same files, same Orthanc, same run.
//!
//! Writes `--count` (default 200) Secondary Capture instances of 512x512
//! 16-bit (about 0.5 MiB each, one study and series) as Part-10 files into
//! a temp dir, starts a fresh Orthanc on free loopback ports, then runs
//! `--rounds` (default 3) rounds, alternating: `storescu -aet RELAYPACS -aec
//! ORTHANC 127.0.0.1 <port> <files...>` (one association, all files), then
//! `CStoreSink::deliver` of the same instances with one association, then
//! with the default configuration (2 associations at once), each timed end
//! to end and checked (exit status / every outcome `Stored`, and Orthanc
//! holds all of them). The study is deleted through Orthanc's REST
//! API between runs, so every run stores into the same empty Orthanc. Our
//! source streams each file from disk through the pipeline's
//! `VerifyingStream` (length and whole-file SHA-256), as in production.
//!
//! Prints instances/s per run, the medians and the ratios ours/storescu as
//! a table, then one JSON line. Also prints Orthanc's CPU use during each run
//! (and ours during ours), in % of one core, from /proc: the machine has
//! two cores shared by client and server, so this shows which side limits.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin cstore_bench`
//! (options: `--count N`, `--rounds N`; `--associations N` replaces the
//! default configuration's number of associations for the second run of
//! ours).

use std::path::PathBuf;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use relaypacs_benches::{Cpu, Res, clear_study, median};
use relaypacs_core::dicom::validate_dicom;
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, TransferSyntax, generate, new_uid};
use relaypacs_core::{
    ByteStream, Error, FileId, FileKey, Instance, InstanceOutcome, InstanceSource, PacsSink,
    Result as RelayResult, SessionId, VerifyingStream,
};
use relaypacs_pacs::{CStoreConfig, CStoreSink};
use relaypacs_test_peers::{Orthanc, tool};
use tokio::io::AsyncReadExt;

const USAGE: &str =
    "usage: cstore_bench [--count N (200)] [--rounds N (3)] [--associations N (default config)]";

/// Streams instances from their Part-10 files, verified like the pipeline does.
#[derive(Debug)]
struct DiskSource {
    paths: std::collections::HashMap<FileKey, PathBuf>,
}

#[async_trait]
impl InstanceSource for DiskSource {
    async fn open(&self, instance: &Instance) -> RelayResult<ByteStream> {
        let path = self
            .paths
            .get(&instance.key)
            .ok_or(Error::NotFound { what: "file" })?
            .clone();
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Error::io("open instance", e))?;
        let raw: ByteStream = Box::pin(futures::stream::try_unfold(file, |mut f| async move {
            let mut buf = vec![0u8; 256 << 10];
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| Error::io("read instance", e))?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            Ok(Some((Bytes::from(buf), f)))
        }));
        let (verified, _) = VerifyingStream::new(raw, 0, instance.size, Some(instance.sha256));
        Ok(Box::pin(verified))
    }
}

/// One timed delivery of all `instances` by `sink`, checked: every outcome
/// `Stored` and Orthanc holds `instances.len()`. Returns the seconds and
/// Orthanc's and our CPU %.
async fn run_ours(
    sink: &CStoreSink,
    instances: &[Instance],
    source: &DiskSource,
    orthanc: &Orthanc,
    cpu: Cpu,
) -> Res<(f64, f64, f64)> {
    let c0 = cpu.now();
    let t = Instant::now();
    let report = sink.deliver(instances, source).await?;
    let secs = t.elapsed().as_secs_f64();
    let (ocpu, mcpu) = cpu.since(c0, secs);
    if let Some((uid, o)) = report
        .outcomes
        .iter()
        .find(|(_, o)| *o != InstanceOutcome::Stored)
    {
        return Err(format!("{sink}: {uid}: {o:?}").into());
    }
    let held = tokio::task::block_in_place(|| orthanc.instance_count());
    if held != instances.len() {
        return Err(format!("{sink}: Orthanc holds {held} of {}", instances.len()).into());
    }
    Ok((secs, ocpu, mcpu))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let (mut count, mut rounds) = (200usize, 3usize);
    let mut associations = CStoreConfig::default().associations;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value: Option<usize> = args.next().and_then(|v| v.parse().ok()).filter(|n| *n > 0);
        match (flag.as_str(), value) {
            ("--count", Some(n)) => count = n,
            ("--rounds", Some(n)) => rounds = n,
            ("--associations", Some(n)) => associations = n,
            _ => return Err(format!("bad arguments\n{USAGE}").into()),
        }
    }
    // The instances, as Part-10 files on disk.
    let work = tempfile::Builder::new().prefix("cstore_bench.").tempdir()?;
    let (study, series) = (new_uid(), new_uid());
    let mut paths = Vec::with_capacity(count);
    let mut instances = Vec::with_capacity(count);
    let mut source = DiskSource {
        paths: Default::default(),
    };
    let mut total_bytes = 0u64;
    let session = SessionId::random();
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
        let bytes = generate(&spec)?;
        let dicom = validate_dicom(&bytes, bytes.len() as u64, &Default::default())?;
        let path = work.path().join(format!("sc-{i:05}.dcm"));
        std::fs::write(&path, &bytes)?;
        let key = FileKey {
            session,
            file: FileId::random(),
        };
        total_bytes += bytes.len() as u64;
        instances.push(Instance::of_bytes(key, &bytes, dicom));
        source.paths.insert(key, path.clone());
        paths.push(path);
    }
    let avg = total_bytes as f64 / count as f64;
    println!(
        "{count} instances, Secondary Capture 512x512x16, {avg:.0} bytes each ({:.1} MB in all), in {}",
        total_bytes as f64 / 1e6,
        work.path().display()
    );

    let orthanc = tokio::task::block_in_place(Orthanc::start);
    let storescu = tool("storescu");
    let config = CStoreConfig {
        address: format!("127.0.0.1:{}", orthanc.dicom_port),
        calling_ae: "RELAYPACS".into(),
        called_ae: orthanc.aet.clone(),
        associations,
        ..CStoreConfig::default()
    };
    let sink = CStoreSink::new(config.clone())?;
    let sink1 = CStoreSink::new(CStoreConfig {
        associations: 1,
        ..config
    })?;
    println!(
        "Orthanc on DICOM port {} (fresh storage); {} vs {sink} with 1 and {associations} associations",
        orthanc.dicom_port,
        storescu.display()
    );

    let cpu = Cpu::of_orthanc_and_me()?;
    let (mut theirs, mut ours1, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ocpu_theirs, mut ocpu_ours1, mut ocpu_ours) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_cpu1, mut our_cpu) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // dcmtk storescu: one association, all files.
        let c0 = cpu.now();
        let t = Instant::now();
        let status = tokio::process::Command::new(&storescu)
            .args(["-aet", "RELAYPACS", "-aec", &orthanc.aet, "127.0.0.1"])
            .arg(orthanc.dicom_port.to_string())
            .args(&paths)
            .status()
            .await?;
        let secs = t.elapsed().as_secs_f64();
        let (ocpu, _) = cpu.since(c0, secs);
        ocpu_theirs.push(ocpu);
        if !status.success() {
            return Err(format!("storescu failed: {status}").into());
        }
        let held = tokio::task::block_in_place(|| orthanc.instance_count());
        if held != count {
            return Err(format!("storescu: Orthanc holds {held} of {count}").into());
        }
        theirs.push(count as f64 / secs);
        println!(
            "round {round}: storescu              {secs:7.3} s  {:7.1} inst/s  Orthanc CPU {ocpu:3.0}%",
            count as f64 / secs
        );
        tokio::task::block_in_place(|| clear_study(&orthanc, &study))?;

        // Ours, one association, then the default configuration (or
        // `--associations`).
        for (label, sink, rates, ocpus, mcpus) in [
            (
                "1 association".to_owned(),
                &sink1,
                &mut ours1,
                &mut ocpu_ours1,
                &mut our_cpu1,
            ),
            (
                format!("{associations} associations"),
                &sink,
                &mut ours,
                &mut ocpu_ours,
                &mut our_cpu,
            ),
        ] {
            let (secs, ocpu, mcpu) = run_ours(sink, &instances, &source, &orthanc, cpu).await?;
            rates.push(count as f64 / secs);
            ocpus.push(ocpu);
            mcpus.push(mcpu);
            println!(
                "round {round}: ours, {label:15} {secs:7.3} s  {:7.1} inst/s  Orthanc CPU {ocpu:3.0}%  ours {mcpu:3.0}%",
                count as f64 / secs
            );
            tokio::task::block_in_place(|| clear_study(&orthanc, &study))?;
        }
    }

    let (mt, mo1, mo) = (median(&theirs), median(&ours1), median(&ours));
    let mbs = |ips: f64| ips * avg / 1e6;
    println!();
    println!(
        "| client | runs (inst/s) | median inst/s | MB/s | vs storescu | Orthanc CPU (median) | our CPU (median) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "| dcmtk storescu (1 association) | {} | {mt:.1} | {:.1} | 1.0x | {:.0}% | |",
        fmt_runs(&theirs),
        mbs(mt),
        median(&ocpu_theirs)
    );
    println!(
        "| RelayPACS CStoreSink, 1 association | {} | {mo1:.1} | {:.1} | {:.1}x | {:.0}% | {:.0}% |",
        fmt_runs(&ours1),
        mbs(mo1),
        mo1 / mt,
        median(&ocpu_ours1),
        median(&our_cpu1)
    );
    println!(
        "| RelayPACS CStoreSink, {associations} associations{} | {} | {mo:.1} | {:.1} | {:.1}x | {:.0}% | {:.0}% |",
        if associations == CStoreConfig::default().associations {
            " (default)"
        } else {
            ""
        },
        fmt_runs(&ours),
        mbs(mo),
        mo / mt,
        median(&ocpu_ours),
        median(&our_cpu)
    );
    println!(
        "ratio ours/storescu: {:.1}x (1 association), {:.1}x ({associations} associations)",
        mo1 / mt,
        mo / mt
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "cstore",
            "instances": count,
            "instance_bytes": avg.round(),
            "rounds": rounds,
            "associations": associations,
            "storescu_inst_per_s": theirs,
            "ours_1_inst_per_s": ours1,
            "ours_inst_per_s": ours,
            "storescu_median": mt,
            "ours_1_median": mo1,
            "ours_median": mo,
            "ratio_1": mo1 / mt,
            "ratio": mo / mt,
            "orthanc_cpu_pct_storescu": ocpu_theirs,
            "orthanc_cpu_pct_ours_1": ocpu_ours1,
            "orthanc_cpu_pct_ours": ocpu_ours,
            "our_cpu_pct_1": our_cpu1,
            "our_cpu_pct": our_cpu,
        })
    );
    Ok(())
}

//! DIMSE C-STORE throughput into a real Orthanc: our `CStoreSink` beside
//! dcmtk's `storescu` as baseline, same files, same Orthanc, same run.
//!
//! Writes `--count` (default 200) Secondary Capture instances of 512x512
//! 16-bit (about 0.5 MiB each, one study and series) as Part-10 files into
//! a temp dir, starts a fresh Orthanc on free loopback ports, then runs
//! `--rounds` (default 3) rounds, alternating: `storescu -aet RELAYPACS -aec
//! ORTHANC 127.0.0.1 <port> <files...>` (one association, all files), then
//! `CStoreSink::deliver` of the same instances (one association), each
//! timed end to end and checked (exit status / every outcome `Stored`, and
//! Orthanc holds all of them). The study is deleted through Orthanc's REST
//! API between runs, so every run stores into the same empty Orthanc. Our
//! source streams each file from disk through the pipeline's
//! `VerifyingStream` (length and whole-file SHA-256), as in production.
//!
//! Prints instances/s per run, the medians and the ratio ours/storescu as a
//! table, then one JSON line.
//!
//! Run: `cargo run --release -p relaypacs-benches --bin cstore_bench`
//! (options: `--count N`, `--rounds N`).

use std::path::PathBuf;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use relaypacs_core::dicom::validate_dicom;
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, TransferSyntax, generate, new_uid};
use relaypacs_core::testing::peers::{Orthanc, tool};
use relaypacs_core::{
    ByteStream, Error, FileId, FileKey, Instance, InstanceOutcome, InstanceSource, PacsSink,
    Result as RelayResult, SessionId, Sha256Digest, VerifyingStream,
};
use relaypacs_pacs::{CStoreConfig, CStoreSink};
use tokio::io::AsyncReadExt;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str = "usage: cstore_bench [--count N (200)] [--rounds N (3)]";

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

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Delete the study from Orthanc and check it is empty again.
fn clear(orthanc: &Orthanc, study_uid: &str) -> Res<()> {
    let (code, body) = orthanc.rest("POST", "/tools/lookup", Some(study_uid.as_bytes()));
    if code != 200 {
        return Err(format!("lookup: HTTP {code}").into());
    }
    let found: serde_json::Value = serde_json::from_slice(&body)?;
    for hit in found.as_array().into_iter().flatten() {
        if hit["Type"] == "Study"
            && let Some(id) = hit["ID"].as_str()
        {
            let (code, _) = orthanc.rest("DELETE", &format!("/studies/{id}"), None);
            if code != 200 {
                return Err(format!("delete study: HTTP {code}").into());
            }
        }
    }
    let left = orthanc.instance_count();
    if left != 0 {
        return Err(format!("{left} instances left after delete").into());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let (mut count, mut rounds) = (200usize, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value: Option<usize> = args.next().and_then(|v| v.parse().ok()).filter(|n| *n > 0);
        match (flag.as_str(), value) {
            ("--count", Some(n)) => count = n,
            ("--rounds", Some(n)) => rounds = n,
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
        instances.push(Instance {
            key,
            size: bytes.len() as u64,
            sha256: Sha256Digest::of(&bytes),
            dicom,
        });
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
    let sink = CStoreSink::new(CStoreConfig {
        address: format!("127.0.0.1:{}", orthanc.dicom_port),
        calling_ae: "RELAYPACS".into(),
        called_ae: orthanc.aet.clone(),
        ..CStoreConfig::default()
    })?;
    println!(
        "Orthanc on DICOM port {} (fresh storage); {} vs {sink}",
        orthanc.dicom_port,
        storescu.display()
    );

    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // dcmtk storescu: one association, all files.
        let t = Instant::now();
        let status = tokio::process::Command::new(&storescu)
            .args(["-aet", "RELAYPACS", "-aec", &orthanc.aet, "127.0.0.1"])
            .arg(orthanc.dicom_port.to_string())
            .args(&paths)
            .status()
            .await?;
        let secs = t.elapsed().as_secs_f64();
        if !status.success() {
            return Err(format!("storescu failed: {status}").into());
        }
        let held = tokio::task::block_in_place(|| orthanc.instance_count());
        if held != count {
            return Err(format!("storescu: Orthanc holds {held} of {count}").into());
        }
        theirs.push(count as f64 / secs);
        println!(
            "round {round}: storescu   {secs:7.3} s  {:7.1} inst/s",
            count as f64 / secs
        );
        tokio::task::block_in_place(|| clear(&orthanc, &study))?;

        // Ours: one deliver call, one association.
        let t = Instant::now();
        let report = sink.deliver(&instances, &source).await?;
        let secs = t.elapsed().as_secs_f64();
        if let Some((uid, o)) = report
            .outcomes
            .iter()
            .find(|(_, o)| *o != InstanceOutcome::Stored)
        {
            return Err(format!("ours: {uid}: {o:?}").into());
        }
        let held = tokio::task::block_in_place(|| orthanc.instance_count());
        if held != count {
            return Err(format!("ours: Orthanc holds {held} of {count}").into());
        }
        ours.push(count as f64 / secs);
        println!(
            "round {round}: CStoreSink {secs:7.3} s  {:7.1} inst/s",
            count as f64 / secs
        );
        tokio::task::block_in_place(|| clear(&orthanc, &study))?;
    }

    let (mt, mo) = (median(&theirs), median(&ours));
    let mbs = |ips: f64| ips * avg / 1e6;
    println!();
    println!("| client | runs (inst/s) | median inst/s | MB/s |");
    println!("|---|---|---|---|");
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "| dcmtk storescu | {} | {mt:.1} | {:.1} |",
        fmt_runs(&theirs),
        mbs(mt)
    );
    println!(
        "| RelayPACS CStoreSink | {} | {mo:.1} | {:.1} |",
        fmt_runs(&ours),
        mbs(mo)
    );
    println!("ratio ours/storescu: {:.1}x", mo / mt);
    println!(
        "{}",
        serde_json::json!({
            "bench": "cstore",
            "instances": count,
            "instance_bytes": avg.round(),
            "rounds": rounds,
            "storescu_inst_per_s": theirs,
            "ours_inst_per_s": ours,
            "storescu_median": mt,
            "ours_median": mo,
            "ratio": mo / mt,
        })
    );
    Ok(())
}

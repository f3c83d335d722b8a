//! Benchmarks of the RelayPACS pipeline: `benches/pipeline.rs` (criterion),
//! the `ingest_bench` binary (1 GiB through the pipeline beside the
//! machine's own write and SHA-256 throughput) and the `tus_bench` binary
//! (1 GiB over tus 1.0 HTTP to our server and to the official `@tus/server`),
//! and `stow_bench` / `cstore_bench` (delivery into a real Orthanc beside
//! Orthanc's direct ingest and dcmtk's `storescu`). This library holds what
//! the binaries share.

use relaypacs_test_peers::Orthanc;

/// The error type of the bench binaries.
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Median (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Throughput in MB/s (10^6 bytes).
pub fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// CPU seconds (user + system) used so far by process `pid`, from
/// /proc/<pid>/stat (Linux), with `ticks` clock ticks per second.
fn cpu_secs(pid: u32, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": state ppid … utime (14th field) is the 12th here.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let used = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(used / ticks)
}

/// The Orthanc process this bench started (our child named `Orthanc`).
pub fn orthanc_pid() -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let comm = stat.get(stat.find('(')? + 1..stat.rfind(')')?)?;
        let ppid = stat
            .get(stat.rfind(')')? + 2..)?
            .split_whitespace()
            .nth(1)?;
        (comm == "Orthanc" && ppid == me).then_some(pid)
    })
}

/// Clock ticks per second for /proc times (`getconf CLK_TCK`, else 100).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Orthanc's and our CPU seconds so far, to take CPU use over a run.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    orthanc: u32,
    me: u32,
    ticks: f64,
}

impl Cpu {
    /// Watch the Orthanc this process started, and this process.
    pub fn of_orthanc_and_me() -> Res<Self> {
        Ok(Self {
            orthanc: orthanc_pid().ok_or("cannot find the Orthanc process")?,
            me: std::process::id(),
            ticks: clock_ticks(),
        })
    }

    /// Orthanc's and our CPU seconds so far.
    pub fn now(&self) -> (f64, f64) {
        (
            cpu_secs(self.orthanc, self.ticks).unwrap_or(f64::NAN),
            cpu_secs(self.me, self.ticks).unwrap_or(f64::NAN),
        )
    }

    /// Orthanc's and our CPU use since `t0`, in % of one core over `secs`.
    pub fn since(&self, t0: (f64, f64), secs: f64) -> (f64, f64) {
        let (o, m) = self.now();
        (100.0 * (o - t0.0) / secs, 100.0 * (m - t0.1) / secs)
    }
}

/// Delete the study from Orthanc and check it is empty again.
pub fn clear_study(orthanc: &Orthanc, study_uid: &str) -> Res<()> {
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

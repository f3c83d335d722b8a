//! Benchmarks of the RelayPACS pipeline: `benches/pipeline.rs` (criterion),
//! the `ingest_bench` binary (1 GiB through the pipeline beside the
//! machine's own write and SHA-256 throughput) and the `tus_bench` binary
//! (1 GiB over tus 1.0 HTTP to our server and to the official `@tus/server`),
//! and `stow_bench` / `cstore_bench` (delivery into a real Orthanc beside
//! Orthanc's direct ingest and dcmtk's `storescu`). This library holds what
//! the binaries share.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// The bench user's name on our server.
pub const BENCH_USER: &str = "bench";

/// The bench user's password (long enough for the server's policy).
pub const PASSWORD: &str = "bench password long enough 123";

/// A random 32-byte secret as 64 hex digits (our server's `secret`).
pub fn hex_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Our server's config for a bench: loopback on any free port, data in
/// `dir`, a random secret, and no free-space watermark (the bench's temp
/// volume may be fuller than the default watermark).
pub fn ours_config(dir: &Path) -> relaypacs_http::Config {
    let mut config = relaypacs_http::Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        secret: Some(secrecy::SecretString::from(hex_secret())),
        ..relaypacs_http::Config::default()
    };
    config.http.min_free_bytes = Some(0);
    config
}

/// Our server started in this process (on the current runtime) with
/// `config`, with the uploader [`BENCH_USER`] / [`PASSWORD`] created; the
/// server and its base URL.
pub async fn start_ours(config: relaypacs_http::Config) -> Res<(relaypacs_http::Server, String)> {
    let server = relaypacs_http::Server::start(config).await?;
    let st = server.state();
    let hash = st.hasher().hash(PASSWORD.into()).await?;
    st.users()
        .create(relaypacs_http::routes::auth::new_record(
            BENCH_USER,
            relaypacs_http::auth::Role::Uploader,
            hash,
        ))
        .await?;
    let base = format!("http://{}", server.addr());
    Ok((server, base))
}

/// Log [`BENCH_USER`] in at our server's `base`: its access token.
pub async fn login(client: &reqwest::Client, base: &str) -> Res<String> {
    let body = serde_json::json!({ "username": BENCH_USER, "password": PASSWORD });
    let r = client
        .post(format!("{base}/api/v1/auth/login"))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await?;
    let status = r.status();
    let bytes = r.bytes().await?;
    if status != reqwest::StatusCode::OK {
        return Err(format!(
            "POST /api/v1/auth/login: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        )
        .into());
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    Ok(v["access_token"]
        .as_str()
        .ok_or("login: no access_token in the response")?
        .to_owned())
}

/// Wait (polling every 50 ms) until our server has no session left open
/// or forwarding. A dead-lettered session fails the bench, and so does any
/// left `limit` after `since`.
pub fn settle(
    rt: &tokio::runtime::Runtime,
    server: &relaypacs_http::Server,
    since: Instant,
    limit: Duration,
) -> Res<()> {
    use relaypacs_core::{Actor, SessionState};
    let deadline = since + limit;
    loop {
        let sessions = rt.block_on(server.state().pipeline().list_sessions(&Actor::system()))?;
        if let Some(s) = sessions
            .iter()
            .find(|s| matches!(s.state, SessionState::DeadLetter { .. }))
        {
            return Err(format!("session {} dead-lettered", s.id).into());
        }
        if !sessions
            .iter()
            .any(|s| matches!(s.state, SessionState::Open | SessionState::Forwarding))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            let secs = limit.as_secs();
            return Err(format!("sessions still in the outbox after {secs} s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A new 512x512 Secondary Capture instance (new SOP Instance UID) of
/// `study` and `series`, its pixels from `seed`.
pub fn secondary_capture_512(study: &str, series: &str, seed: u64) -> Res<Vec<u8>> {
    use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, generate, new_uid};
    Ok(generate(&DicomSpec {
        sop_class: SopClass::SecondaryCapture,
        study_uid: study.to_owned(),
        series_uid: series.to_owned(),
        sop_instance_uid: new_uid(),
        rows: 512,
        cols: 512,
        seed,
        ..DicomSpec::default()
    })?)
}

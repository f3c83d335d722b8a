//! Real peer processes for tests: find (or install) a tool, pick a free
//! loopback port, start an S3-compatible server. No mocks: tests talk to the
//! real thing on 127.0.0.1.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("scripts/install-peers.sh").exists() {
        if !dir.pop() {
            panic!(
                "cannot find scripts/install-peers.sh above {}",
                env!("CARGO_MANIFEST_DIR")
            );
        }
    }
    dir
}

fn tools_dir() -> PathBuf {
    std::env::var_os("RELAYPACS_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/relaypacs/tools")
        })
}

fn find(name: &str) -> Option<PathBuf> {
    let in_tools = tools_dir().join("bin").join(name);
    if in_tools.is_file() {
        return Some(in_tools);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// Path of a peer binary (`s3s-fs`, `dcmdump`, `Orthanc`, …). If missing,
/// runs `scripts/install-peers.sh` once and looks again; panics with a clear
/// message if it is still missing.
pub fn tool(name: &str) -> PathBuf {
    if let Some(p) = find(name) {
        return p;
    }
    let script = workspace_root().join("scripts/install-peers.sh");
    let status = Command::new("bash").arg(&script).arg("all").status();
    find(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed and {} failed ({status:?}); run ./scripts/test.sh",
            script.display()
        )
    })
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// Wait until something listens on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An `s3s-fs` server (S3-compatible, checks SigV4 signatures and
/// checksums) on a loopback port with a temporary root; killed on drop.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
    /// A bucket that exists.
    pub bucket: String,
    child: Child,
    root: tempfile::TempDir,
}

impl S3Server {
    /// Start a fresh server with random credentials and one bucket.
    pub fn start() -> Self {
        let bin = tool("s3s-fs");
        let root = tempfile::tempdir().expect("tempdir");
        let bucket = "relaypacs-test".to_owned();
        std::fs::create_dir(root.path().join(&bucket)).expect("create bucket folder");
        let access_key = format!("AK{}", &super::dicom_gen::new_uid()[5..21]);
        let secret_key = super::dicom_gen::new_uid();
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                &access_key,
                "--secret-key",
                &secret_key,
            ])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        wait_for_port(port, Duration::from_secs(10));
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            bucket,
            child,
            root,
        }
    }

    /// The server's data folder.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

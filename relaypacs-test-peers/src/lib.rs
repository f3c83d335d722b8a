//! Real peer processes for tests: find (or install) a tool, pick a free
//! loopback port, start an S3-compatible server, an Orthanc PACS or dcmtk's
//! `storescp`. No mocks: tests talk to the real thing on 127.0.0.1.
//!
//! This crate is unpublished and used only as a dev-dependency (and by the
//! benches): it runs `scripts/install-peers.sh` from the repository and
//! finds the repository from `CARGO_MANIFEST_DIR`. A vendor running the
//! conformance suites needs only `relaypacs-core` with its `testing`
//! feature, never this crate.

// Test peers: a peer that cannot start must stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod postgres;
pub use postgres::{Postgres, PostgresOptions, postgres_bin};
mod test_ca;
pub use test_ca::{TestCa, TestCert};

/// A random UID under the `2.25` root (UUID-derived, PS3.5 B.2).
fn random_uid() -> String {
    format!("2.25.{}", rand::random::<u128>())
}

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

/// A free TCP port on 127.0.0.1, never one this process handed out
/// before: the kernel may give the same ephemeral port to two `bind(0)`
/// calls once the first listener is closed, and two peers started side by
/// side on one port would answer each other's clients.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a loopback port");
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Whether something listens on `127.0.0.1:port`. A connection whose
/// local port is `port` itself is no listener but Linux's TCP self-connect
/// (simultaneous open: the client drew `port` as its own ephemeral source
/// port while nothing listened there); it is refused, or a peer still
/// starting, or one that could not bind that port, looks up.
pub fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port))
        .and_then(|s| s.local_addr())
        .is_ok_and(|local| local.port() != port)
}

/// Wait until something listens on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while !listening(port) {
        assert!(
            start.elapsed() < timeout,
            "nothing listens on port {port} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait until `child` listens on `127.0.0.1:port`: `Ok` once it does,
/// `Err` with its exit status if it exits first (e.g. it could not bind
/// the port); panics after `timeout`.
pub fn wait_for_child(
    child: &mut Child,
    port: u16,
    timeout: Duration,
) -> Result<(), std::process::ExitStatus> {
    let start = Instant::now();
    while !listening(port) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(status);
        }
        assert!(
            start.elapsed() < timeout,
            "pid {} does not listen on port {port} after {timeout:?}",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Start a server with `spawn(port)` on a port from [`free_port`] until
/// one listens: one that exits first (its port taken between `free_port`
/// and its bind) is reported by `exited` and started again on another
/// port, five times at most. Returns the child and its port.
fn start_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> Child,
    mut exited: impl FnMut(u16, std::process::ExitStatus),
) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        match wait_for_child(&mut child, port, Duration::from_secs(30)) {
            Ok(()) => return (child, port),
            Err(status) => exited(port, status),
        }
    }
    panic!("{what} exited five times before listening");
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
    /// Holds `s3s-fs.log` (its stdout and stderr).
    log_dir: tempfile::TempDir,
}

impl S3Server {
    /// Start a fresh server with random credentials and one bucket. A
    /// server that exits before it listens (its port was taken between
    /// [`free_port`] and its bind) is started again on another port.
    pub fn start() -> Self {
        let bin = tool("s3s-fs");
        let root = tempfile::tempdir().expect("tempdir");
        let bucket = "relaypacs-test".to_owned();
        std::fs::create_dir(root.path().join(&bucket)).expect("create bucket folder");
        let access_key = format!("AK{}", &random_uid()[5..21]);
        let secret_key = random_uid();
        // Its log sits beside the data folder, not in it (a file there
        // would be listed as an object store entry).
        let log_dir = tempfile::tempdir().expect("tempdir");
        let log_path = log_dir.path().join("s3s-fs.log");
        let (child, port) = start_on_free_port(
            "s3s-fs",
            |port| {
                let log = std::fs::File::create(&log_path).expect("s3s-fs log");
                Command::new(&bin)
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
                    // Errors only (its log goes to stdout), and any panic.
                    .env("RUST_LOG", "error")
                    .stdout(log.try_clone().expect("s3s-fs log"))
                    .stderr(log)
                    .spawn()
                    .expect("start s3s-fs")
            },
            |port, status| {
                eprintln!(
                    "s3s-fs on port {port} exited ({status}):\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            },
        );
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            bucket,
            child,
            root,
            log_dir,
        }
    }

    /// The server's data folder.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // A server that died under the test is the likely cause of its
        // failure: say so, with what it logged, in the test's output.
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!(
                "s3s-fs ({}) exited during the test ({status}):\n{}",
                self.endpoint,
                std::fs::read_to_string(self.log_dir.path().join("s3s-fs.log")).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian 12's Orthanc serves HTTPS through civetweb 1.15, which loads
/// `libssl.so` with `dlopen` and looks up `SSL_get_peer_certificate` by
/// name; OpenSSL 3 only has it as a macro, so civetweb calls a null
/// pointer and Orthanc dies on the first HTTPS request. This builds, in
/// `dir`, a `libssl.so` that depends on the real `libssl.so.3` (which
/// serves every other symbol) and adds that one function, forwarding to
/// `SSL_get1_peer_certificate`; Orthanc finds it through
/// `LD_LIBRARY_PATH`. Orthanc's TLS itself is untouched.
fn build_civetweb_ssl_shim(dir: &Path) {
    std::fs::create_dir_all(dir).expect("shim dir");
    let src = dir.join("shim.c");
    std::fs::write(
        &src,
        "typedef struct ssl_st SSL;\ntypedef struct x509_st X509;\n\
         X509 *SSL_get1_peer_certificate(const SSL *s);\n\
         X509 *SSL_get_peer_certificate(const SSL *s) { return SSL_get1_peer_certificate(s); }\n",
    )
    .expect("write shim");
    let out = Command::new(tool("cc"))
        .args(["-shared", "-fPIC", "-o"])
        .arg(dir.join("libssl.so"))
        .arg(&src)
        .arg("-l:libssl.so.3")
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "building the civetweb libssl shim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Options for a test [`Orthanc`].
#[derive(Clone, Debug, Default)]
pub struct OrthancOptions {
    /// A Lua script loaded at start (e.g. a `ReceivedInstanceFilter` that
    /// refuses instances, to provoke a permanent rejection).
    pub lua: Option<String>,
}

/// A real Orthanc PACS with its DICOMweb plugin, started as a plain process
/// on free loopback ports with a temporary storage folder and random
/// credentials. [`stop`](Self::stop) kills it like a crash;
/// [`start_again`](Self::start_again) brings it back on the same ports and
/// storage. Killed on drop.
#[derive(Debug)]
pub struct Orthanc {
    /// REST and DICOMweb port.
    pub http_port: u16,
    /// DIMSE port.
    pub dicom_port: u16,
    /// Its AE title.
    pub aet: String,
    /// HTTP basic-auth user.
    pub user: String,
    /// HTTP basic-auth password.
    pub password: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `DicomAlwaysAllowGet`: any calling AE may retrieve by C-GET.
    allow_get: bool,
    /// HTTPS with this certificate (curl trusts its CA).
    tls: Option<TestCert>,
}

impl Orthanc {
    /// Start a fresh Orthanc.
    pub fn start() -> Self {
        Self::start_with(OrthancOptions::default())
    }

    /// Start a fresh Orthanc with options.
    pub fn start_with(options: OrthancOptions) -> Self {
        Self::start_configured(options, false, None)
    }

    /// Start a fresh Orthanc that serves HTTPS only (`SslEnabled`) with
    /// `cert`: [`url`](Self::url) and [`dicomweb`](Self::dicomweb) are
    /// `https://` URLs and its own checks (curl) trust `cert.ca_file`.
    pub fn start_tls(options: OrthancOptions, cert: TestCert) -> Self {
        Self::start_configured(options, false, Some(cert))
    }

    /// Start a fresh Orthanc with options that also lets any calling AE
    /// retrieve by C-GET (`DicomAlwaysAllowGet`), as a PACS does for an AE
    /// it has registered. Without it, Orthanc accepts the C-GET context
    /// and aborts the association on the request.
    pub fn start_with_get(options: OrthancOptions) -> Self {
        Self::start_configured(options, true, None)
    }

    fn start_configured(options: OrthancOptions, allow_get: bool, tls: Option<TestCert>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Self {
            http_port: free_port(),
            dicom_port: free_port(),
            aet: "ORTHANC".into(),
            user: "relay".into(),
            password: random_uid(),
            child: None,
            dir,
            allow_get,
            tls,
        };
        // A port can still be taken between `free_port` and Orthanc's bind
        // (by another process); then whatever answers is not this Orthanc.
        // Try fresh ports a few times rather than test against a stranger.
        for _ in 0..5 {
            o.configure(&options);
            o.spawn_and_wait();
            if o.is_ours() {
                return o;
            }
            o.stop();
            o.http_port = free_port();
            o.dicom_port = free_port();
        }
        panic!("Orthanc did not start on its own ports:\n{}", o.log());
    }

    /// Whether the process started is alive and is the one answering: it
    /// has not exited and accepts this instance's random credentials.
    fn is_ours(&mut self) -> bool {
        let alive = match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        alive && self.rest("GET", "/system", None).0 == 200
    }

    fn configure(&self, options: &OrthancOptions) {
        let root = self.dir.path();
        let lua = match &options.lua {
            Some(script) => {
                let p = root.join("filter.lua");
                std::fs::write(&p, script).expect("write lua");
                format!("[{:?}]", p.display().to_string())
            }
            None => "[]".into(),
        };
        let plugin = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so";
        let ssl = match &self.tls {
            Some(t) => {
                build_civetweb_ssl_shim(&root.join("ssl-shim"));
                format!(
                    "\"SslEnabled\": true, \"SslCertificate\": {:?},",
                    t.combined_file.display().to_string()
                )
            }
            None => "\"SslEnabled\": false,".into(),
        };
        let config = format!(
            r#"{{
  "Name": "relaypacs-test",
  "StorageDirectory": {db:?},
  "IndexDirectory": {db:?},
  "StorageCompression": false,
  "Plugins": [{plugin:?}],
  "LuaScripts": {lua},
  "ConcurrentJobs": 2,
  "HttpServerEnabled": true,
  "HttpPort": {http},
  {ssl}
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": true,
  "RegisteredUsers": {{ {user:?}: {password:?} }},
  "HttpCompressionEnabled": false,
  "HttpDescribeErrors": true,
  "HttpThreadsCount": 50,
  "KeepAlive": true,
  "TcpNoDelay": true,
  "WebDavEnabled": false,
  "DicomServerEnabled": true,
  "DicomAet": {aet:?},
  "DicomPort": {dicom},
  "DicomCheckCalledAet": true,
  "DicomAlwaysAllowEcho": true,
  "DicomAlwaysAllowStore": true,
  "DicomAlwaysAllowFind": true,
  "DicomAlwaysAllowGet": {allow_get},
  "UnknownSopClassAccepted": false,
  "DicomWeb": {{ "Enable": true, "Root": "/dicom-web/", "EnableWado": true,
                 "WadoRoot": "/wado", "Host": "127.0.0.1:{http}", "Ssl": {https} }}
}}"#,
            db = root.join("db").display().to_string(),
            http = self.http_port,
            dicom = self.dicom_port,
            user = self.user,
            password = self.password,
            aet = self.aet,
            allow_get = self.allow_get,
            https = self.tls.is_some(),
        );
        std::fs::write(root.join("orthanc.json"), config).expect("write orthanc.json");
    }

    /// Start (again) on the same ports and storage; waits until both ports
    /// answer and checks that this Orthanc is the one answering.
    pub fn start_again(&mut self) {
        self.spawn_and_wait();
        assert!(
            self.is_ours(),
            "Orthanc did not come back on ports {} and {}:\n{}",
            self.http_port,
            self.dicom_port,
            self.log()
        );
    }

    /// Spawn Orthanc and wait until both its ports answer or it exits.
    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "orthanc is already running");
        let bin = tool("Orthanc");
        let root = self.dir.path();
        let mut cmd = Command::new(bin);
        if self.tls.is_some() {
            // See `build_civetweb_ssl_shim`.
            cmd.env("LD_LIBRARY_PATH", root.join("ssl-shim"));
        }
        let child = cmd
            .arg(format!("--logfile={}", root.join("orthanc.log").display()))
            .arg(root.join("orthanc.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Orthanc");
        self.child = Some(child);
        let start = Instant::now();
        for port in [self.dicom_port, self.http_port] {
            while !listening(port) {
                let exited = self
                    .child
                    .as_mut()
                    .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
                if exited {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "Orthanc does not listen on port {port} after 20 s:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Kill it (SIGKILL, like a crash or power cut). Its storage stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Replace the Lua scripts (takes effect at the next start).
    pub fn reconfigure(&self, options: &OrthancOptions) {
        self.configure(options);
    }

    /// `http://127.0.0.1:<port>` (`https://` when started with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.http_port)
    }

    /// The DICOMweb root, `<url>/dicom-web`.
    pub fn dicomweb(&self) -> String {
        format!("{}/dicom-web", self.url())
    }

    /// A config file (TOML) for the real `relaypacs` binary delivering into
    /// this Orthanc by STOW-RS: listening on loopback `port`, data in
    /// `data_dir`, no free-space watermark, and `outbox` (lines such as
    /// `base_delay = 0.2`) as the body of its `[outbox]` table.
    pub fn gateway_config(&self, port: u16, data_dir: &Path, outbox: &str) -> String {
        format!(
            r#"listen = "127.0.0.1:{port}"
data_dir = {data:?}

[http]
min_free_bytes = 0

[[sinks]]
kind = "stow_rs"
url = {url:?}
user = {user:?}
password = {password:?}

[outbox]
{outbox}"#,
            data = data_dir.display().to_string(),
            url = self.dicomweb(),
            user = self.user,
            password = self.password,
        )
    }

    /// Call Orthanc's REST API with `curl` (blocking; tests only). Returns
    /// the HTTP status and body.
    pub fn rest(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let mut cmd = Command::new(tool("curl"));
        cmd.args(["-s", "-X", method, "-o"])
            .arg(&out)
            .args(["-w", "%{http_code}", "-H", "Expect:", "-u"])
            .arg(format!("{}:{}", self.user, self.password));
        if let Some(t) = &self.tls {
            cmd.arg("--cacert").arg(&t.ca_file);
        }
        if let Some(b) = body {
            let inp = dir.path().join("in");
            std::fs::write(&inp, b).expect("write body");
            cmd.arg("--data-binary").arg(format!("@{}", inp.display()));
        }
        let res = cmd
            .arg(format!("{}{path}", self.url()))
            .output()
            .expect("run curl");
        let code = String::from_utf8_lossy(&res.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        (code, std::fs::read(&out).unwrap_or_default())
    }

    /// Orthanc's identifier of an instance, by SOP Instance UID.
    pub fn instance_id(&self, sop_instance_uid: &str) -> Option<String> {
        let (code, body) = self.rest("POST", "/tools/lookup", Some(sop_instance_uid.as_bytes()));
        assert_eq!(code, 200, "lookup: {}", String::from_utf8_lossy(&body));
        let found: serde_json::Value = serde_json::from_slice(&body).expect("lookup JSON");
        found
            .as_array()?
            .iter()
            .find(|v| v["Type"] == "Instance")
            .and_then(|v| v["ID"].as_str().map(str::to_owned))
    }

    /// The stored file of an instance, by SOP Instance UID.
    pub fn instance_file(&self, sop_instance_uid: &str) -> Option<Vec<u8>> {
        let id = self.instance_id(sop_instance_uid)?;
        let (code, body) = self.rest("GET", &format!("/instances/{id}/file"), None);
        assert_eq!(code, 200, "file of {id}");
        Some(body)
    }

    /// How many instances Orthanc holds in all.
    pub fn instance_count(&self) -> usize {
        let (code, body) = self.rest("GET", "/statistics", None);
        assert_eq!(code, 200, "statistics");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("statistics JSON");
        v["CountInstances"].as_u64().unwrap_or(0) as usize
    }

    /// Store a Part-10 file directly through the REST API (e.g. a report a
    /// radiologist's system would add). Returns Orthanc's answer as JSON.
    pub fn upload(&self, part10: &[u8]) -> serde_json::Value {
        let (code, body) = self.rest("POST", "/instances", Some(part10));
        assert_eq!(code, 200, "upload: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("upload JSON")
    }

    /// Orthanc's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("orthanc.log")).unwrap_or_default()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// dcmtk's `storescp`: an independent C-STORE SCP writing every received
/// instance to a temporary folder; killed on drop.
#[derive(Debug)]
pub struct StoreScp {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its AE title.
    pub aet: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl StoreScp {
    /// Start one accepting any calling AE and the common storage classes
    /// in their own transfer syntax (`+xa`: accept all supported).
    pub fn start() -> Self {
        let bin = tool("storescp");
        let dir = tempfile::tempdir().expect("tempdir");
        let aet = "STORESCP".to_owned();
        let (child, port) = start_on_free_port(
            "storescp",
            |port| {
                Command::new(&bin)
                    .args(["--aetitle", &aet, "+xa", "-uf", "--output-directory"])
                    .arg(dir.path())
                    .arg(port.to_string())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start storescp")
            },
            |port, status| eprintln!("storescp on port {port} exited ({status})"),
        );
        Self {
            port,
            aet,
            child,
            dir,
        }
    }

    /// The file it wrote for an instance, if any (dcmtk names it
    /// `<modality>.<SOPInstanceUID>`).
    pub fn received(&self, sop_instance_uid: &str) -> Option<Vec<u8>> {
        let suffix = format!(".{sop_instance_uid}");
        std::fs::read_dir(self.dir.path())
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))
            .and_then(|e| std::fs::read(e.path()).ok())
    }

    /// How many instances it wrote.
    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path()).map_or(0, |d| d.count())
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rsyslogd as a syslog collector over TLS (RFC 5425: `imtcp` with the
/// GnuTLS stream driver, octet-counted framing) on a free loopback port,
/// presenting a [`TestCert`], accepting any client (`AuthMode="anon"`) or
/// only those with a certificate from the same CA ([`start_mutual`](Self::start_mutual)).
/// Every message is written to a file, one JSON object per line, with the
/// fields rsyslog's RFC 5424 parser found. [`stop`](Self::stop) kills it;
/// [`start_again`](Self::start_again) brings it back on the same port.
/// Killed on drop.
#[derive(Debug)]
pub struct Rsyslog {
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
    cert: TestCert,
    /// `StreamDriver.AuthMode`: `anon`, or `x509/certvalid` (clients must
    /// present a certificate from the same CA).
    auth_mode: &'static str,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// One message as rsyslog received and parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyslogLine {
    /// PRI (facility × 8 + severity).
    pub pri: u8,
    /// HOSTNAME.
    pub hostname: String,
    /// APP-NAME.
    pub app_name: String,
    /// PROCID.
    pub procid: String,
    /// MSGID.
    pub msgid: String,
    /// STRUCTURED-DATA as sent (`-` when none).
    pub structured_data: String,
    /// MSG (a leading UTF-8 BOM removed).
    pub msg: String,
    /// The whole SYSLOG-MSG as received.
    pub raw: String,
}

impl Rsyslog {
    /// Start one presenting `cert` (its key and chain), accepting any client.
    pub fn start(cert: TestCert) -> Self {
        Self::start_auth(cert, "anon")
    }

    /// Start one presenting `cert` that accepts only clients presenting a
    /// certificate issued by `cert`'s CA (mutual TLS, `x509/certvalid`).
    pub fn start_mutual(cert: TestCert) -> Self {
        Self::start_auth(cert, "x509/certvalid")
    }

    fn start_auth(cert: TestCert, auth_mode: &'static str) -> Self {
        let mut r = Self {
            port: free_port(),
            cert,
            auth_mode,
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.configure();
        r.start_again();
        r
    }

    fn out_file(&self) -> PathBuf {
        self.dir.path().join("received.jsonl")
    }

    fn configure(&self) {
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("work")).expect("work dir");
        let q = |p: &Path| p.display().to_string();
        // `:::json` escapes each property for a JSON string (newlines
        // included); control characters are kept on receive so the MSG
        // arrives as sent.
        let conf = format!(
            r#"global(workDirectory="{work}" maxMessageSize="64k"
  parser.escapeControlCharactersOnReceive="off"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{ca}"
  DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="{auth}")
template(name="fields" type="string"
  string="{{\"pri\":\"%pri:::json%\",\"hostname\":\"%hostname:::json%\",\"app_name\":\"%app-name:::json%\",\"procid\":\"%procid:::json%\",\"msgid\":\"%msgid:::json%\",\"sd\":\"%structured-data:::json%\",\"msg\":\"%msg:::json%\",\"raw\":\"%rawmsg:::json%\"}}\n")
ruleset(name="collect") {{
  action(type="omfile" file="{out}" template="fields" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="collect")
"#,
            work = q(&d.join("work")),
            ca = q(&self.cert.ca_file),
            cert = q(&self.cert.cert_file),
            key = q(&self.cert.key_file),
            out = q(&self.out_file()),
            port = self.port,
            auth = self.auth_mode,
        );
        std::fs::write(d.join("rsyslog.conf"), conf).expect("write rsyslog.conf");
    }

    /// Start (again) on the same port; waits until it listens.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "rsyslogd already running");
        let d = self.dir.path();
        let log = std::fs::File::create(d.join("rsyslogd.log")).expect("log file");
        let child = Command::new(tool("rsyslogd"))
            .arg("-n")
            .arg("-f")
            .arg(d.join("rsyslog.conf"))
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start rsyslogd");
        self.child = Some(child);
        let start = Instant::now();
        while !listening(self.port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("rsyslogd exited ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "rsyslogd does not listen on {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kill it (its connections close).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its own diagnostics (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }

    /// Every message received so far, in order.
    pub fn received(&self) -> Vec<SyslogLine> {
        let text = std::fs::read_to_string(self.out_file()).unwrap_or_default();
        text.lines()
            .filter(|l| l.ends_with('}')) // a line being written is not complete yet
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("rsyslog output line {l:?}: {e}"));
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                SyslogLine {
                    pri: s("pri").parse().expect("pri"),
                    hostname: s("hostname"),
                    app_name: s("app_name"),
                    procid: s("procid"),
                    msgid: s("msgid"),
                    structured_data: s("sd"),
                    msg: s("msg").trim_start_matches(['\u{feff}', ' ']).to_owned(),
                    raw: s("raw"),
                }
            })
            .collect()
    }

    /// Wait until at least `n` messages arrived (panics after `timeout`
    /// with what did); returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<SyslogLine> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "rsyslog received {} of {n} messages after {timeout:?}:\n{}",
                got.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

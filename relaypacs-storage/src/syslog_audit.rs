//! Forwarding of the audit trail to a syslog collector over TLS (feature
//! `syslog`, on by default).
//!
//! [`SyslogForwardingSink`] decorates any [`AuditSink`]: `record` writes the
//! event to the inner sink first (the local trail stays the source of
//! truth, and its error is the only one `record` returns), then queues an
//! RFC 5424 message for a background task that sends it to the collector
//! over TLS with RFC 5425 octet-counting framing (`LEN SP SYSLOG-MSG`), as
//! DICOM PS3.15 A.6 (Audit Trail Message Transmission Profile - SYSLOG-TLS)
//! asks.
//!
//! # Messages
//! - PRI: the configured facility (default 10, security/authorization, as
//!   PS3.15 A.6 asks) and a severity from the outcome: success 5 (notice),
//!   minor failure 4 (warning), serious failure 3 (error), major failure 2
//!   (critical).
//! - TIMESTAMP: the event's time (UTC, microseconds); HOSTNAME configured;
//!   APP-NAME `relaypacs`; PROCID this process id; MSGID the DICOM Event ID
//!   (e.g. `110114`), or `anchor` for a chain-head anchor.
//! - STRUCTURED-DATA: `[relaypacs@32473 seq="N" hash="<hex>"]`, the record's
//!   place in the hash chain, when the inner sink exposes its chain head
//!   ([`ChainHeadSource`]); exact as long as every record goes through this
//!   decorator. (32473 is the example enterprise number of RFC 5612.)
//! - MSG: a UTF-8 BOM then the DICOM PS3.15 A.5 audit message (XML, from
//!   [`audit_export`](crate::audit_export)) or the event as JSON.
//!
//! # Delivery
//! The queue is bounded ([`SyslogConfig::queue`]); a message leaves it only
//! once written to the TLS stream. While the collector is unreachable the
//! queue holds what arrives and sends it after reconnecting (with a capped
//! exponential backoff); beyond its capacity new forwards are dropped and
//! counted ([`ForwardStats::dropped`]; the local trail still has those
//! events), logged once per outage. `record` never waits for the network
//! and never fails because of it. A message written just before the
//! collector vanished can be lost with the connection (syslog over TLS has
//! no acknowledgement); a closed connection is noticed while idle, before
//! the next write, and a new connection is used only after 250 ms without
//! a refusal (in TLS 1.3 a collector refuses a client certificate after
//! the client's side of the handshake is done).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use relaypacs_core::{AuditEvent, AuditOutcome, AuditSink, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::audit_export::{ExportFormat, TimeRange, export_events};
use crate::local_audit::{ChainHead, JsonlAuditSink};

/// The structured-data id of RelayPACS's parameters (RFC 5612 example
/// enterprise number).
pub const SD_ID: &str = "relaypacs@32473";

/// Largest CA, certificate or key file read ([`SyslogForwardingSink::new`]).
pub const MAX_PEM_FILE: u64 = 1 << 20;

/// What the MSG part of a forwarded event holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyslogFormat {
    /// The DICOM PS3.15 A.5 audit message (XML), as PS3.15 A.6 asks.
    #[default]
    DicomXml,
    /// The event as one JSON object (RelayPACS's own event model).
    Json,
}

/// Where and how to forward.
#[derive(Clone, Debug)]
pub struct SyslogConfig {
    /// The collector, `host:port`.
    pub address: String,
    /// The name its certificate must carry (DNS name or IP address).
    pub server_name: String,
    /// PEM file of the CA(s) trusted for the collector's certificate (the
    /// only ones: no system roots).
    pub ca_file: PathBuf,
    /// PEM certificate chain presented for mutual TLS (with `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    /// Messages held while the collector is slow or away; beyond, forwards
    /// are dropped and counted.
    pub queue: usize,
    /// Syslog facility (0–23; default 10, security/authorization).
    pub facility: u8,
    /// MSG content.
    pub format: SyslogFormat,
    /// HOSTNAME of the messages (default: this machine's name, or `-`).
    pub hostname: String,
    /// `AuditSourceID` of the DICOM messages.
    pub source_id: String,
    /// Send the chain head this often when it moved (needs a
    /// [`ChainHeadSource`]; `None`: only at close).
    pub anchor_interval: Option<Duration>,
    /// Longest wait between two connection attempts.
    pub max_backoff: Duration,
    /// Limit for one TCP connect + TLS handshake, and for one write.
    pub io_timeout: Duration,
    /// How long [`AuditSink::close`] waits for the queue to drain.
    pub drain_timeout: Duration,
}

impl SyslogConfig {
    /// A configuration with the defaults: queue 10,000, facility 10, DICOM
    /// XML, anchor every 60 s, backoff up to 30 s, 10 s I/O limit, 5 s drain.
    pub fn new(
        address: impl Into<String>,
        server_name: impl Into<String>,
        ca_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            address: address.into(),
            server_name: server_name.into(),
            ca_file: ca_file.into(),
            client_cert_file: None,
            client_key_file: None,
            queue: 10_000,
            facility: 10,
            format: SyslogFormat::DicomXml,
            hostname: local_hostname(),
            source_id: "relaypacs".to_owned(),
            anchor_interval: Some(Duration::from_secs(60)),
            max_backoff: Duration::from_secs(30),
            io_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// This machine's name: the kernel's (Linux), else `$HOSTNAME`, else `-`.
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "-".to_owned())
}

/// Why forwarding cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyslogError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("cannot use {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS configuration is refused.
    #[error("invalid TLS configuration")]
    Tls(#[source] rustls::Error),
    /// A setting is out of range.
    #[error("invalid syslog setting: {0}")]
    Config(String),
}

/// A sink whose chain head (record count and last hash) can be read.
#[async_trait]
pub trait ChainHeadSource: Send + Sync + 'static {
    /// The current chain head.
    async fn chain_head(&self) -> ChainHead;
}

#[async_trait]
impl ChainHeadSource for JsonlAuditSink {
    async fn chain_head(&self) -> ChainHead {
        self.head().await
    }
}

#[async_trait]
impl<S: ChainHeadSource + ?Sized> ChainHeadSource for Arc<S> {
    async fn chain_head(&self) -> ChainHead {
        (**self).chain_head().await
    }
}

/// Counters of a [`SyslogForwardingSink`], for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Messages written to the collector.
    pub sent: u64,
    /// Forwards dropped because the queue was full.
    pub dropped: u64,
    /// Messages waiting.
    pub queued: u64,
    /// Failed connection attempts (TCP or TLS).
    pub connect_failures: u64,
    /// Whether a connection is up now.
    pub connected: bool,
}

// ---------------------------------------------------------------------
// RFC 5424 formatting: pure functions.

/// Syslog severity of an outcome (see the module documentation).
pub fn severity(outcome: AuditOutcome) -> u8 {
    match outcome {
        AuditOutcome::Success => 5,
        AuditOutcome::MinorFailure => 4,
        AuditOutcome::SeriousFailure => 3,
        AuditOutcome::MajorFailure => 2,
    }
}

/// A header field (HOSTNAME, APP-NAME, PROCID, MSGID): printable US-ASCII
/// only (others become `_`), at most `max` characters, `-` when empty.
pub fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if out.is_empty() { "-".to_owned() } else { out }
}

/// An SD-PARAM value with `"`, `\` and `]` escaped by a backslash (RFC 5424
/// 6.3.3).
pub fn escape_sd_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An SD-NAME (SD-ID or PARAM-NAME): printable US-ASCII except `=`, space,
/// `]` and `"`, at most 32 characters; others become `_`.
fn sd_name(s: &str) -> String {
    let out: String = s
        .chars()
        .take(32)
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() { "_".to_owned() } else { out }
}

/// RFC 5424 TIMESTAMP of `t` in UTC with microseconds.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// One SD-ELEMENT: an id and its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdElement {
    /// SD-ID.
    pub id: String,
    /// PARAM-NAME, PARAM-VALUE pairs (values unescaped).
    pub params: Vec<(String, String)>,
}

/// The parts of one RFC 5424 message.
#[derive(Clone, Debug)]
pub struct Rfc5424<'a> {
    /// Facility (0–23).
    pub facility: u8,
    /// Severity (0–7).
    pub severity: u8,
    /// TIMESTAMP.
    pub time: OffsetDateTime,
    /// HOSTNAME.
    pub hostname: &'a str,
    /// APP-NAME.
    pub app_name: &'a str,
    /// PROCID.
    pub procid: &'a str,
    /// MSGID.
    pub msgid: &'a str,
    /// STRUCTURED-DATA (`-` when empty).
    pub sd: &'a [SdElement],
    /// MSG, UTF-8 (sent after a BOM); `None`: no MSG.
    pub msg: Option<&'a str>,
}

/// Format one SYSLOG-MSG (RFC 5424 section 6). Header fields are made
/// valid (see [`header_field`]); facility and severity are clamped.
pub fn format_message(m: &Rfc5424<'_>) -> Vec<u8> {
    let pri = u16::from(m.facility.min(23)) * 8 + u16::from(m.severity.min(7));
    let mut out = format!(
        "<{pri}>1 {} {} {} {} {} ",
        timestamp(m.time),
        header_field(m.hostname, 255),
        header_field(m.app_name, 48),
        header_field(m.procid, 128),
        header_field(m.msgid, 32),
    );
    if m.sd.is_empty() {
        out.push('-');
    }
    for el in m.sd {
        out.push('[');
        out.push_str(&sd_name(&el.id));
        for (k, v) in &el.params {
            out.push(' ');
            out.push_str(&sd_name(k));
            out.push_str("=\"");
            out.push_str(&escape_sd_value(v));
            out.push('"');
        }
        out.push(']');
    }
    let mut out = out.into_bytes();
    if let Some(msg) = m.msg {
        out.push(b' ');
        out.extend_from_slice(b"\xEF\xBB\xBF"); // BOM: MSG is UTF-8 (RFC 5424 6.4)
        out.extend_from_slice(msg.as_bytes());
    }
    out
}

/// RFC 5425 octet-counting frame: `MSG-LEN SP SYSLOG-MSG`.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg);
    out
}

/// The MSG of `event` in `format`: the single PS3.15 A.5 `AuditMessage`
/// as its own XML document, or the event's JSON.
pub fn event_msg(event: &AuditEvent, format: SyslogFormat, source_id: &str) -> String {
    let json = || serde_json::to_string(event).unwrap_or_default();
    match format {
        SyslogFormat::Json => json(),
        SyslogFormat::DicomXml => {
            match export_events(
                std::slice::from_ref(event),
                TimeRange::default(),
                ExportFormat::DicomXml,
                source_id,
            ) {
                Ok(doc) => {
                    let doc = String::from_utf8_lossy(&doc);
                    // The export wraps its messages in `<AuditMessages>`
                    // (not PS3.15); keep the one `AuditMessage` element.
                    match (
                        doc.find("<AuditMessage>")
                            .or_else(|| doc.find("<AuditMessage ")),
                        doc.rfind("</AuditMessage>"),
                    ) {
                        (Some(a), Some(b)) if a < b => format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}",
                            &doc[a..b + "</AuditMessage>".len()]
                        ),
                        _ => json(),
                    }
                }
                // Encoding into memory does not fail in practice; the JSON
                // still carries every field.
                Err(_) => json(),
            }
        }
    }
}

// ---------------------------------------------------------------------
// The decorator.

struct Shared {
    queue: StdMutex<VecDeque<Arc<[u8]>>>,
    capacity: usize,
    wake: Notify,
    sent: AtomicU64,
    dropped: AtomicU64,
    connect_failures: AtomicU64,
    connected: AtomicBool,
    /// A drop was already logged in the current outage.
    drop_logged: AtomicBool,
    /// Stop once drained (close) or at once if unreachable.
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<[u8]>>> {
        // A panic while holding this lock cannot leave the queue invalid
        // (push/pop only): keep going with it.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue one framed message, or count it dropped. Never waits.
    fn push(&self, framed: Vec<u8>) {
        let mut q = self.lock();
        if q.len() >= self.capacity {
            drop(q);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.drop_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    capacity = self.capacity,
                    dropped = n,
                    "syslog forwarding queue full: audit events are dropped from forwarding (the local trail keeps them)"
                );
            }
            return;
        }
        q.push_back(framed.into());
        drop(q);
        self.wake.notify_one();
    }
}

/// An [`AuditSink`] decorator forwarding every recorded event to a syslog
/// collector over TLS (see the [module documentation](self)).
pub struct SyslogForwardingSink<T> {
    inner: Arc<T>,
    chain: Option<Arc<dyn ChainHeadSource>>,
    /// Serializes record + head read so the head names this record.
    order: Mutex<()>,
    shared: Arc<Shared>,
    config: SyslogConfig,
    procid: String,
}

impl<T: fmt::Debug> fmt::Debug for SyslogForwardingSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyslogForwardingSink")
            .field("inner", &self.inner)
            .field("address", &self.config.address)
            .field("server_name", &self.config.server_name)
            .finish_non_exhaustive()
    }
}

impl<T: fmt::Display> fmt::Display for SyslogForwardingSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "syslog-tls:{}({})", self.config.address, self.inner)
    }
}

fn read_pem(path: &Path) -> std::result::Result<Vec<u8>, SyslogError> {
    let pem = |reason: String| SyslogError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| pem(e.to_string()))?;
    if meta.len() > MAX_PEM_FILE {
        return Err(pem(format!("larger than {MAX_PEM_FILE} bytes")));
    }
    std::fs::read(path).map_err(|e| pem(e.to_string()))
}

fn certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, SyslogError> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| SyslogError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SyslogError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate".to_owned(),
        });
    }
    Ok(certs)
}

/// The TLS client configuration of `config`: only its CA trusted, its
/// client certificate presented when given.
fn tls_config(config: &SyslogConfig) -> std::result::Result<rustls::ClientConfig, SyslogError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&config.ca_file)? {
        roots.add(c).map_err(|e| SyslogError::Pem {
            path: config.ca_file.clone(),
            reason: e.to_string(),
        })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(SyslogError::Tls)?
    .with_root_certificates(roots);
    match (&config.client_cert_file, &config.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert)?;
            let key_bytes = read_pem(key)?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| SyslogError::Pem {
                    path: key.clone(),
                    reason: e.to_string(),
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(SyslogError::Tls)
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(SyslogError::Config(
            "client_cert_file and client_key_file go together".to_owned(),
        )),
    }
}

impl<T: AuditSink> SyslogForwardingSink<T> {
    /// Wrap `inner`, forwarding without chain positions. Reads the PEM
    /// files now; starts the sender on the current tokio runtime (call
    /// from within one).
    pub fn new(inner: T, config: SyslogConfig) -> std::result::Result<Self, SyslogError> {
        Self::build(Arc::new(inner), None, config)
    }

    /// Wrap `inner`, whose chain head goes into every message and is
    /// anchored at the collector every [`SyslogConfig::anchor_interval`]
    /// and at close.
    pub fn with_chain(inner: T, config: SyslogConfig) -> std::result::Result<Self, SyslogError>
    where
        T: ChainHeadSource,
    {
        let inner = Arc::new(inner);
        let chain: Arc<dyn ChainHeadSource> = inner.clone();
        Self::build(inner, Some(chain), config)
    }

    fn build(
        inner: Arc<T>,
        chain: Option<Arc<dyn ChainHeadSource>>,
        config: SyslogConfig,
    ) -> std::result::Result<Self, SyslogError> {
        if config.queue == 0 {
            return Err(SyslogError::Config("queue must be at least 1".to_owned()));
        }
        if config.facility > 23 {
            return Err(SyslogError::Config(format!(
                "facility {} is not 0-23",
                config.facility
            )));
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            SyslogError::Config("forwarding needs a tokio runtime (its sender task)".to_owned())
        })?;
        let server_name = ServerName::try_from(config.server_name.clone()).map_err(|e| {
            SyslogError::Config(format!("server_name {:?}: {e}", config.server_name))
        })?;
        let connector = TlsConnector::from(Arc::new(tls_config(&config)?));
        let shared = Arc::new(Shared {
            queue: StdMutex::new(VecDeque::new()),
            capacity: config.queue,
            wake: Notify::new(),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            drop_logged: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let sender = Sender {
            shared: shared.clone(),
            connector,
            server_name,
            address: config.address.clone(),
            max_backoff: config.max_backoff,
            io_timeout: config.io_timeout,
        };
        rt.spawn(sender.run());
        let sink = Self {
            inner,
            chain,
            order: Mutex::new(()),
            shared,
            procid: std::process::id().to_string(),
            config,
        };
        if let (Some(chain), Some(every)) = (&sink.chain, sink.config.anchor_interval)
            && !every.is_zero()
        {
            rt.spawn(anchor_timer(
                Arc::downgrade(&sink.shared),
                chain.clone(),
                every,
                sink.anchor_template(),
            ));
        }
        Ok(sink)
    }

    /// The decorated sink.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Counters now.
    pub fn stats(&self) -> ForwardStats {
        ForwardStats {
            sent: self.shared.sent.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            queued: self.shared.lock().len() as u64,
            connect_failures: self.shared.connect_failures.load(Ordering::Relaxed),
            connected: self.shared.connected.load(Ordering::Relaxed),
        }
    }

    fn anchor_template(&self) -> AnchorTemplate {
        AnchorTemplate {
            facility: self.config.facility,
            hostname: self.config.hostname.clone(),
            procid: self.procid.clone(),
        }
    }

    fn event_message(&self, event: &AuditEvent, head: Option<ChainHead>) -> Vec<u8> {
        let sd: Vec<SdElement> = head
            .map(|h| SdElement {
                id: SD_ID.to_owned(),
                params: vec![
                    ("seq".to_owned(), h.count.saturating_sub(1).to_string()),
                    ("hash".to_owned(), hex::encode(h.hash)),
                ],
            })
            .into_iter()
            .collect();
        let msg = event_msg(event, self.config.format, &self.config.source_id);
        let msgid = event.event_id.to_string();
        frame(&format_message(&Rfc5424 {
            facility: self.config.facility,
            severity: severity(event.outcome),
            time: event.time,
            hostname: &self.config.hostname,
            app_name: "relaypacs",
            procid: &self.procid,
            msgid: &msgid,
            sd: &sd,
            msg: Some(&msg),
        }))
    }
}

impl<T> Drop for SyslogForwardingSink<T> {
    fn drop(&mut self) {
        // The sender drains what it can while connected, then stops.
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }
}

/// What an anchor message needs from the sink.
struct AnchorTemplate {
    facility: u8,
    hostname: String,
    procid: String,
}

impl AnchorTemplate {
    /// `MSGID anchor`, `[relaypacs@32473 count="N" hash="<hex>"]`.
    fn message(&self, head: ChainHead) -> Vec<u8> {
        let sd = [SdElement {
            id: SD_ID.to_owned(),
            params: vec![
                ("count".to_owned(), head.count.to_string()),
                ("hash".to_owned(), hex::encode(head.hash)),
            ],
        }];
        let msg = format!("audit chain head: {} records", head.count);
        frame(&format_message(&Rfc5424 {
            facility: self.facility,
            severity: 5,
            time: OffsetDateTime::now_utc(),
            hostname: &self.hostname,
            app_name: "relaypacs",
            procid: &self.procid,
            msgid: "anchor",
            sd: &sd,
            msg: Some(&msg),
        }))
    }
}

/// Queue the chain head every `every` when it moved, while the sink lives.
async fn anchor_timer(
    shared: Weak<Shared>,
    chain: Arc<dyn ChainHeadSource>,
    every: Duration,
    template: AnchorTemplate,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last: Option<ChainHead> = None;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let head = chain.chain_head().await;
        if last != Some(head) {
            shared.push(template.message(head));
            last = Some(head);
        }
    }
}

#[async_trait]
impl<T: AuditSink> AuditSink for SyslogForwardingSink<T> {
    async fn record(&self, event: &AuditEvent) -> Result<()> {
        let head = match &self.chain {
            Some(chain) => {
                let _order = self.order.lock().await;
                self.inner.record(event).await?;
                Some(chain.chain_head().await)
            }
            None => {
                self.inner.record(event).await?;
                None
            }
        };
        self.shared.push(self.event_message(event, head));
        Ok(())
    }

    async fn events(&self) -> Result<Vec<AuditEvent>> {
        self.inner.events().await
    }

    async fn close(&self) -> Result<()> {
        let res = self.inner.close().await;
        if let Some(chain) = &self.chain {
            let head = chain.chain_head().await;
            self.shared.push(self.anchor_template().message(head));
        }
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        while !self.shared.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.shared.lock().len();
        if left > 0 {
            // Nobody else sees this: the trail is closed, forwarding gave up.
            tracing::warn!(
                left,
                address = %self.config.address,
                "audit events not forwarded to syslog at close (the local trail keeps them)"
            );
        }
        res
    }
}

// ---------------------------------------------------------------------
// The sender task.

struct Sender {
    shared: Arc<Shared>,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    address: String,
    max_backoff: Duration,
    io_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed")]
    Io(#[source] std::io::Error),
    #[error(
        "the collector closed the connection after the handshake (client certificate refused?)"
    )]
    Refused,
}

/// How long a new connection is watched for a refusal before use.
const REFUSAL_SETTLE: Duration = Duration::from_millis(250);

impl Sender {
    async fn connect(&self) -> std::result::Result<TlsStream<TcpStream>, ConnectError> {
        let attempt = async {
            let tcp = TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            self.connector.connect(self.server_name.clone(), tcp).await
        };
        let mut stream = match tokio::time::timeout(self.io_timeout, attempt).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Err(_) => return Err(ConnectError::Timeout),
        };
        // In TLS 1.3 the server judges the client's certificate (or its
        // absence) after the client considers the handshake done: give a
        // refusal (an alert and a close) a moment to arrive before writing
        // anything that would be lost with it.
        let mut buf = [0u8; 64];
        match tokio::time::timeout(REFUSAL_SETTLE, stream.read(&mut buf)).await {
            Err(_) | Ok(Ok(1..)) => {}
            Ok(Ok(0)) => return Err(ConnectError::Refused),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
        }
        Ok(stream)
    }

    async fn run(self) {
        let mut conn: Option<TlsStream<TcpStream>> = None;
        let mut backoff = Duration::from_millis(100);
        // Whether the current outage was logged (once per outage).
        let mut outage_logged = false;
        loop {
            let front = self.shared.lock().front().cloned();
            let stopping = self.shared.stopping.load(Ordering::Relaxed);
            if stopping && front.is_none() {
                if let Some(mut c) = conn.take() {
                    let _ = tokio::time::timeout(self.io_timeout, c.shutdown()).await;
                }
                return;
            }
            let Some(stream) = conn.as_mut() else {
                match self.connect().await {
                    Ok(s) => {
                        conn = Some(s);
                        self.shared.connected.store(true, Ordering::Relaxed);
                        backoff = Duration::from_millis(100);
                        if outage_logged {
                            tracing::info!(
                                address = %self.address,
                                dropped = self.shared.dropped.load(Ordering::Relaxed),
                                "syslog collector reachable again"
                            );
                        }
                        outage_logged = false;
                        self.shared.drop_logged.store(false, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                        if stopping {
                            return; // closing and unreachable: the trail keeps them
                        }
                        if !outage_logged {
                            // The one place this failure is seen.
                            tracing::warn!(address = %self.address, error = %e, cause = ?std::error::Error::source(&e), "syslog collector unreachable; audit forwards are queued");
                            outage_logged = true;
                        }
                        // Wait out the backoff; a stop (also signalled on `wake`)
                        // cuts it short, new messages do not.
                        let until = tokio::time::Instant::now() + backoff;
                        while !self.shared.stopping.load(Ordering::Relaxed) {
                            tokio::select! {
                                () = tokio::time::sleep_until(until) => break,
                                () = self.shared.wake.notified() => {}
                            }
                        }
                        backoff = (backoff * 2).min(self.max_backoff);
                    }
                }
                continue;
            };
            match front {
                None => {
                    // Idle: wait for work, noticing a connection the collector closed.
                    let mut buf = [0u8; 512];
                    tokio::select! {
                        () = self.shared.wake.notified() => {}
                        r = stream.read(&mut buf) => {
                            if !matches!(r, Ok(n) if n > 0) {
                                self.lost(&mut conn, &mut outage_logged, "closed by the collector");
                            }
                        }
                    }
                }
                Some(msg) => {
                    let write = async {
                        stream.write_all(&msg).await?;
                        stream.flush().await
                    };
                    match tokio::time::timeout(self.io_timeout, write).await {
                        Ok(Ok(())) => {
                            let mut q = self.shared.lock();
                            // Only this task pops: the front is still `msg`.
                            q.pop_front();
                            drop(q);
                            self.shared.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => self.lost(&mut conn, &mut outage_logged, "write failed"),
                        Err(_) => self.lost(&mut conn, &mut outage_logged, "write timed out"),
                    }
                }
            }
        }
    }

    fn lost(&self, conn: &mut Option<TlsStream<TcpStream>>, outage_logged: &mut bool, why: &str) {
        *conn = None;
        self.shared.connected.store(false, Ordering::Relaxed);
        tracing::warn!(address = %self.address, why, "syslog connection lost; audit forwards are queued");
        *outage_logged = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relaypacs_core::AuditAction;

    fn sample_time() -> OffsetDateTime {
        time::macros::datetime!(2026-03-04 05:06:07.123456789 UTC)
    }

    #[test]
    fn sd_values_escape_quote_backslash_and_bracket() {
        assert_eq!(escape_sd_value(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        assert_eq!(escape_sd_value("plain [ok] é"), r"plain [ok\] é");
        assert_eq!(escape_sd_value(""), "");
    }

    #[test]
    fn message_has_every_rfc5424_field() {
        let sd = [SdElement {
            id: SD_ID.to_owned(),
            params: vec![
                ("seq".to_owned(), "7".to_owned()),
                ("note".to_owned(), r#"say "hi" \ ]"#.to_owned()),
            ],
        }];
        let m = format_message(&Rfc5424 {
            facility: 10,
            severity: severity(AuditOutcome::MinorFailure),
            time: sample_time(),
            hostname: "host one",
            app_name: "relaypacs",
            procid: "42",
            msgid: "110114",
            sd: &sd,
            msg: Some("<x/>"),
        });
        let expected = "<84>1 2026-03-04T05:06:07.123456Z host_one relaypacs 42 110114 [relaypacs@32473 seq=\"7\" note=\"say \\\"hi\\\" \\\\ \\]\"] \u{feff}<x/>";
        assert_eq!(String::from_utf8(m).unwrap(), expected);
    }

    #[test]
    fn empty_fields_are_nil_and_header_fields_are_bounded() {
        let m = format_message(&Rfc5424 {
            facility: 99,
            severity: 99,
            time: sample_time(),
            hostname: "",
            app_name: &"a".repeat(100),
            procid: "",
            msgid: "ü",
            sd: &[],
            msg: None,
        });
        let s = String::from_utf8(m).unwrap();
        assert_eq!(
            s,
            format!(
                "<191>1 2026-03-04T05:06:07.123456Z - {} - _ -",
                "a".repeat(48)
            )
        );
    }

    #[test]
    fn octet_counting_counts_bytes_not_chars() {
        assert_eq!(frame(b"abc"), b"3 abc");
        let msg = "é\n]".as_bytes();
        let f = frame(msg);
        assert_eq!(&f[..2], b"4 ");
        assert_eq!(&f[2..], msg);
        assert_eq!(frame(b""), b"0 ");
    }

    #[test]
    fn severity_follows_the_outcome() {
        assert_eq!(severity(AuditOutcome::Success), 5);
        assert_eq!(severity(AuditOutcome::MinorFailure), 4);
        assert_eq!(severity(AuditOutcome::SeriousFailure), 3);
        assert_eq!(severity(AuditOutcome::MajorFailure), 2);
    }

    #[test]
    fn dicom_msg_is_one_audit_message_document() {
        let mut e = AuditEvent::new("alice", AuditAction::Login, AuditOutcome::Success);
        e.detail = "a <b> & \"c\"".to_owned();
        let msg = event_msg(&e, SyslogFormat::DicomXml, "relaypacs-test");
        assert!(msg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<AuditMessage"));
        assert!(msg.ends_with("</AuditMessage>"));
        assert!(!msg.contains("AuditMessages"));
        assert!(msg.contains("110114"));
        assert!(msg.contains("relaypacs-test"));
        let json = event_msg(&e, SyslogFormat::Json, "x");
        let back: AuditEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }
}

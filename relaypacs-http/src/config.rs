//! Server configuration: a TOML file overlaid by `RELAYPACS_*` environment
//! variables (environment wins; nested keys use `__`, e.g.
//! `RELAYPACS_HTTP__BODY_IDLE_TIMEOUT_SECS=30`), validated before anything
//! binds a port.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use rand::RngCore;
use relaypacs_core::pipeline::DuplicatePolicy;
use relaypacs_core::{Limits, OutboxConfig, PipelineConfig, VerifyMode};
use relaypacs_pacs::{CStoreConfig, DicomWebAuth, DicomWebConfig};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable could not be parsed.
    #[error("configuration: {0}")]
    Parse(String),
    /// A value is out of range or inconsistent.
    #[error("configuration: {field}: {reason}")]
    Invalid {
        /// The setting (as written in the file).
        field: &'static str,
        /// What is wrong (never the secret's value).
        reason: String,
    },
    /// The secret file could not be read or created.
    #[error("configuration: secret file {path}: {source}")]
    SecretFile {
        /// Path of the secret file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Everything the server needs to start.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Data folder for the embedded adapters (default `./relaypacs-data`).
    pub data_dir: PathBuf,
    /// The token-signing secret. Prefer `secret_file` or the
    /// `RELAYPACS_SECRET` variable; never commit it.
    #[serde(skip_serializing)]
    pub secret: Option<SecretString>,
    /// File holding the secret; created with a random value (mode 0600) on
    /// first start when neither this file nor `secret` exists. Default:
    /// `<data_dir>/secret`.
    pub secret_file: Option<PathBuf>,
    /// Pipeline limits.
    pub limits: Limits,
    /// What uploads are accepted: duplicate policy, Patient ID rule.
    pub ingest: IngestConfig,
    /// HTTP edge limits.
    pub http: HttpConfig,
    /// Authentication settings.
    pub auth: AuthConfig,
    /// Where validated studies go: one or more sinks, each of which must
    /// hold every instance before a study counts as delivered. There is no
    /// fallback from one to another. Default: the local archive.
    pub sinks: Vec<SinkConfig>,
    /// Where reports are polled for after delivery (DICOMweb QIDO-RS and
    /// WADO-RS). Default: the first STOW-RS sink's PACS, if any.
    pub reports: Option<DicomWebSinkConfig>,
    /// Retries, dead letters and the report watch.
    pub outbox: OutboxConfig,
    /// Who may read `/metrics`, and where (`[metrics]`).
    pub metrics: MetricsConfig,
    /// STOW-RS multipart limits (`[stow]`).
    pub stow: StowConfig,
    /// Terminate TLS here (`[tls]`); without it the server speaks plain
    /// HTTP (behind a TLS proxy).
    pub tls: Option<TlsConfig>,
    /// The audit trail (`[audit]`): forwarding to a syslog collector.
    pub audit: AuditConfig,
    /// Where sessions and the other state live (`[state]`).
    pub state: StateConfig,
    /// Where uploaded bytes live (`[chunks]`): local files (default) or S3.
    pub chunks: ChunksConfig,
}

/// Where uploaded bytes live (`[chunks]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChunksConfig {
    /// Files under a local folder (default `<data_dir>/chunks`).
    Local {
        /// Folder; default `<data_dir>/chunks`.
        // Unset, it is not serialized: `Config::load` merges the file's
        // `[chunks]` over the serialized defaults, and a `path` left there
        // is an unknown field of `kind = "s3"`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    /// An S3 bucket (AWS or compatible): each file is one multipart
    /// upload, completed without copying its bytes.
    S3(S3ChunksConfig),
}

impl Default for ChunksConfig {
    fn default() -> Self {
        Self::Local { path: None }
    }
}

/// An S3 bucket for chunks. Credentials come from the standard `AWS_*`
/// environment variables unless set here; the secret key is never logged
/// (prefer `secret_access_key_file` or `AWS_SECRET_ACCESS_KEY`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3ChunksConfig {
    /// The endpoint for an S3-compatible server, e.g.
    /// `http://127.0.0.1:9000`; none for AWS.
    pub endpoint: Option<String>,
    /// The bucket (must exist).
    pub bucket: String,
    /// The region (default `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// The key prefix of every object (default `relaypacs`).
    pub prefix: String,
    /// The access key id (default `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// The secret access key (default `AWS_SECRET_ACCESS_KEY`).
    #[serde(skip_serializing)]
    pub secret_access_key: Option<SecretString>,
    /// A file holding the secret access key (first line).
    pub secret_access_key_file: Option<PathBuf>,
    /// Allow a plain-HTTP endpoint (a server on loopback); default false.
    pub allow_http: bool,
    /// Virtual-hosted-style requests (`bucket.host`); default false (path style).
    pub virtual_hosted_style: bool,
    /// The multipart grid in MiB (default 8; at least 5, S3's minimum part).
    pub part_size_mib: u64,
}

impl Default for S3ChunksConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            bucket: String::new(),
            region: None,
            prefix: "relaypacs".into(),
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            allow_http: false,
            virtual_hosted_style: false,
            part_size_mib: 8,
        }
    }
}

impl S3ChunksConfig {
    /// The S3 client these settings describe (the `AWS_*` environment
    /// first, then what is set here).
    pub fn client(&self) -> Result<relaypacs_storage::object_store::aws::AmazonS3, ConfigError> {
        use relaypacs_storage::object_store::aws::AmazonS3Builder;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_allow_http(self.allow_http)
            .with_virtual_hosted_style_request(self.virtual_hosted_style);
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        match &self.region {
            Some(r) => b = b.with_region(r),
            None if std::env::var_os("AWS_REGION").is_none() => b = b.with_region("us-east-1"),
            None => {}
        }
        if let Some(k) = &self.access_key_id {
            b = b.with_access_key_id(k);
        }
        let secret = match (&self.secret_access_key, &self.secret_access_key_file) {
            (Some(s), _) => Some(s.expose_secret().to_owned()),
            (None, Some(path)) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        path: path.clone(),
                        source,
                    })?;
                Some(text.lines().next().unwrap_or("").trim().to_owned())
            }
            (None, None) => None,
        };
        if let Some(s) = secret {
            b = b.with_secret_access_key(s);
        }
        b.build().map_err(|e| ConfigError::Invalid {
            field: "chunks",
            reason: format!("S3 client: {e}"),
        })
    }
}

/// The state database (`[state]`): SQLite embedded (the default, a file
/// under the data folder) or PostgreSQL, shared by several gateways.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// `sqlite://PATH` or `postgres://USER@HOST:PORT/DB`; default
    /// `sqlite://<data_dir>/state.db`. Put no password here: use
    /// `password_file` or `RELAYPACS_STATE__PASSWORD`.
    pub url: Option<String>,
    /// The database password (prefer `password_file` or the
    /// `RELAYPACS_STATE__PASSWORD` variable); never logged.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    /// A file holding the database password (first line).
    pub password_file: Option<PathBuf>,
    /// Connections in the pool (default 8).
    pub max_connections: u32,
    /// How long one statement may run, in seconds (default 30; SQLite: the
    /// wait for another writer's lock).
    pub statement_timeout_secs: u64,
    /// How long a request waits for a free connection, in seconds (default 30).
    pub acquire_timeout_secs: u64,
    /// Run the embedded migrations at start (default `true`). `false`, for
    /// a PostgreSQL role that may not change the schema: the server only
    /// checks that the schema is at its version and refuses to start if
    /// not; the owner runs `relaypacs migrate` first.
    pub migrate: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            url: None,
            password: None,
            password_file: None,
            max_connections: 8,
            statement_timeout_secs: 30,
            acquire_timeout_secs: 30,
            migrate: true,
        }
    }
}

/// The audit trail (`[audit]`): a hash chain in the state database's
/// `audit_events` table (one chain for every gateway on it), its head
/// anchored in a file outside the database; optionally also a JSON-lines
/// trail and forwarding to a syslog collector.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Forward every audit event to a syslog collector over TLS
    /// (`[audit.syslog]`); off when absent.
    pub syslog: Option<SyslogConfig>,
    /// Anchor the chain head (count + hash) outside the database after
    /// this many records (default 1000); it is also anchored at start and
    /// stop. The JSON-lines trail, when on, is anchored the same way.
    pub anchor_every_records: u64,
    /// Anchor the head this often when it moved, in seconds (default 10);
    /// 0: only by count, at start and at stop.
    pub anchor_interval_secs: u64,
    /// The anchor file of the database's chain; default
    /// `<data_dir>/audit/sql-chain.anchor` (each gateway its own).
    pub anchor_path: Option<PathBuf>,
    /// Also write every record to a hash-chained JSON-lines file (e.g. to
    /// ship to a SIEM), a second trail: a record is acknowledged only once
    /// both hold it durably. Default `false`.
    pub jsonl: bool,
    /// The JSON-lines trail (with `jsonl = true`); default
    /// `<data_dir>/audit/audit.jsonl`, anchored beside it (`<file>.anchor`).
    pub jsonl_path: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            syslog: None,
            anchor_every_records: 1000,
            anchor_interval_secs: 10,
            anchor_path: None,
            jsonl: false,
            jsonl_path: None,
        }
    }
}

impl AuditConfig {
    /// The trail's anchoring options.
    pub fn trail_options(&self) -> relaypacs_storage::AuditTrailOptions {
        let o = relaypacs_storage::AuditTrailOptions::default()
            .anchor_every_records(self.anchor_every_records)
            .anchor_interval(
                (self.anchor_interval_secs > 0)
                    .then(|| std::time::Duration::from_secs(self.anchor_interval_secs)),
            );
        match &self.anchor_path {
            Some(p) => o.anchor_path(p.clone()),
            None => o,
        }
    }
}

/// Forwarding of the audit trail to a syslog collector over TLS
/// (`[audit.syslog]`; RFC 5424 messages, RFC 5425 transport, DICOM
/// PS3.15 A.6). The local trail stays the record: forwards wait in a
/// bounded queue while the collector is away, and are dropped (counted,
/// logged once per outage) beyond it; recording never waits for it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// The collector, `host:port`.
    pub address: String,
    /// The name its certificate must carry (DNS name or IP address).
    pub server_name: String,
    /// PEM file of the CA(s) trusted for the collector (the only ones).
    pub ca_file: PathBuf,
    /// Client certificate chain (PEM) for mutual TLS, with `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Forwards held while the collector is away (default 10,000).
    #[serde(default = "default_syslog_queue")]
    pub queue: usize,
    /// Syslog facility, 0–23 (default 10, security/authorization).
    #[serde(default = "default_syslog_facility")]
    pub facility: u8,
    /// MSG content: `dicom-xml` (PS3.15 A.5 audit message, the default) or
    /// `json` (the event as recorded).
    #[serde(default)]
    pub format: SyslogMessageFormat,
    /// Send the trail's chain head this often when it moved (default 60);
    /// 0: only at stop.
    #[serde(default = "default_syslog_anchor_secs")]
    pub anchor_interval_secs: u64,
}

/// MSG content of forwarded audit events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyslogMessageFormat {
    /// DICOM PS3.15 A.5 audit message (XML).
    #[default]
    DicomXml,
    /// The audit event as JSON.
    Json,
}

fn default_syslog_queue() -> usize {
    10_000
}

fn default_syslog_facility() -> u8 {
    10
}

fn default_syslog_anchor_secs() -> u64 {
    60
}

impl SyslogConfig {
    /// The forwarding settings of `relaypacs-storage`.
    pub fn to_forwarding(&self) -> relaypacs_storage::SyslogConfig {
        let mut c = relaypacs_storage::SyslogConfig::new(
            self.address.clone(),
            self.server_name.clone(),
            self.ca_file.clone(),
        );
        c.client_cert_file = self.client_cert_file.clone();
        c.client_key_file = self.client_key_file.clone();
        c.queue = self.queue;
        c.facility = self.facility;
        c.format = match self.format {
            SyslogMessageFormat::DicomXml => {
                relaypacs_storage::syslog_audit::SyslogFormat::DicomXml
            }
            SyslogMessageFormat::Json => relaypacs_storage::syslog_audit::SyslogFormat::Json,
        };
        c.anchor_interval = (self.anchor_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(self.anchor_interval_secs));
        c
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self
            .address
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return inv("audit.syslog.address", "must be host:port");
        }
        if self.server_name.is_empty() {
            return inv(
                "audit.syslog.server_name",
                "must name the collector's certificate",
            );
        }
        if self.ca_file.as_os_str().is_empty() {
            return inv("audit.syslog.ca_file", "must name a PEM file");
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return inv(
                "audit.syslog.client_cert_file",
                "set both client_cert_file and client_key_file, or neither",
            );
        }
        if self.queue == 0 || self.queue > 1_000_000 {
            return inv("audit.syslog.queue", "must be 1..=1000000");
        }
        if self.facility > 23 {
            return inv("audit.syslog.facility", "must be 0..=23");
        }
        Ok(())
    }
}

/// TLS served by the gateway itself (`[tls]`), with rustls. The files are
/// read at start and again on SIGHUP: new connections get the new
/// certificate, open ones keep theirs; an unreadable or invalid new pair
/// keeps the old one (and logs an error). A separate `[metrics] listen`
/// stays plain HTTP (meant for loopback).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Time allowed for the TLS handshake of a new connection.
    pub handshake_timeout_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            handshake_timeout_secs: 10,
        }
    }
}

/// Exposure of `/metrics` (`[metrics]`). By default it is on the main
/// port and needs `Authorization: Bearer <token>`, the token being the
/// content of `token_file` (created with a random value, mode 0600, on
/// first start, like the signing secret); the comparison takes the same
/// time whatever the guess.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` only on this separate address (the main port then
    /// answers 404 there). It must be a loopback address unless
    /// `require_token` stays on. Default: none (the main port).
    pub listen: Option<SocketAddr>,
    /// The bearer token's file. Default `<data_dir>/metrics-token`.
    pub token_file: Option<PathBuf>,
    /// Require the token (default `true`). May be turned off only together
    /// with a loopback `listen` address.
    pub require_token: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            token_file: None,
            require_token: true,
        }
    }
}

/// STOW-RS multipart limits (`[stow]`), enforced on the body stream
/// before `multer` parses it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StowConfig {
    /// Most bytes of one part's header block (and of the preamble); 400
    /// `RELAY_PART_HEADER_TOO_LARGE` beyond. Default 16384, 1024..=1 MiB.
    pub max_part_header_bytes: usize,
    /// Most header lines of one part; 400 `RELAY_PART_HEADERS_TOO_MANY`
    /// beyond. Default 32, 1..=32 (`multer` reads at most 32).
    pub max_part_headers: usize,
}

impl Default for StowConfig {
    fn default() -> Self {
        Self {
            max_part_header_bytes: 16 << 10,
            max_part_headers: 32,
        }
    }
}

impl StowConfig {
    /// The guard's limits.
    pub fn part_header_limits(&self) -> crate::stow_headers::PartHeaderLimits {
        crate::stow_headers::PartHeaderLimits {
            max_header_bytes: self.max_part_header_bytes,
            max_headers: self.max_part_headers,
        }
    }
}

/// What the gateway accepts (`[ingest]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// A SOP Instance UID the gateway accepted before with other content:
    /// `refuse` (default; tus 409 `RELAY_INSTANCE_CONFLICT`, STOW-RS
    /// 0x0111) or `accept` (with a warning; the PACS is still checked
    /// before sending and never overwritten). The same content again is
    /// always an idempotent success.
    pub duplicates: DuplicatePolicy,
    /// Refuse files without a (0010,0020) Patient ID element. Default
    /// `false`: Patient ID is Type 2, so its absence is accepted with a
    /// warning.
    pub require_patient_id: bool,
}

/// Edge limits and policies (defaults from security-anchors §6).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time allowed to send the request line and headers (slowloris guard).
    pub header_read_timeout_secs: u64,
    /// Longest pause between two reads of a request body.
    pub body_idle_timeout_secs: u64,
    /// Largest JSON request body.
    pub max_json_body: usize,
    /// Largest request head (request line + headers), at least 8 KiB.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Largest tus PATCH that carries `Upload-Checksum` (it is verified and
    /// stored as one chunk).
    pub max_checksummed_patch: u64,
    /// tus PATCH bodies without a checksum are stored in durable pieces of
    /// this size, so a dropped connection keeps every complete piece.
    pub patch_segment_size: u64,
    /// Largest upload (`Tus-Max-Size`); at most the pipeline's file limit.
    pub max_upload_size: u64,
    /// Parallel PATCH requests per user.
    pub max_parallel_patches_per_user: usize,
    /// Unfinished uploads per user.
    pub max_open_uploads_per_user: usize,
    /// Open study sessions per user (the pipeline's cap; beyond: 429).
    pub max_open_sessions_per_user: u32,
    /// Open event streams per user.
    pub max_event_streams_per_user: usize,
    /// Free bytes that must remain on the data volume after a new upload is
    /// admitted; `None` means max(10% of the volume, 2 × max upload size).
    pub min_free_bytes: Option<u64>,
    /// Origins allowed by CORS (exact match). Empty: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Send HSTS (only behind TLS).
    pub hsts: bool,
    /// Proxies (CIDRs, e.g. `["10.0.0.0/8", "127.0.0.1/32"]`) whose
    /// `Forwarded` / `X-Forwarded-For` headers are believed. Empty (the
    /// default): those headers are ignored and the client address used for
    /// rate limits, login caps and audit is the socket peer. See
    /// [`crate::client_addr::client_address`].
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Most concurrent connections (excess ones wait in the listen queue).
    pub max_connections: usize,
    /// Length of the listen queue: connections the kernel completes before
    /// the server accepts them (capped by the kernel's
    /// `net.core.somaxconn`). Past it the kernel drops new connection
    /// attempts and their clients retry only after 1 s, so it is kept
    /// above the bursts a flood of reconnecting clients makes.
    pub listen_backlog: u32,
    /// Most concurrent connections from one client address (the TCP peer;
    /// IPv6 by /64); beyond it a new connection is closed at once. Raise it
    /// behind a reverse proxy, whose connections all share its address.
    pub max_connections_per_address: usize,
    /// Minimum average request-body rate after `body_rate_grace_secs`
    /// (bytes/s; far below a 256 kbit/s clinic link); slower: 408.
    pub body_min_rate_bytes_per_sec: u64,
    /// Time before `body_min_rate_bytes_per_sec` applies.
    pub body_rate_grace_secs: u64,
    /// Overall deadline of an authenticated request body (0: none); tus
    /// PATCH (resumable) has only the rate.
    pub body_deadline_secs: u64,
    /// Whole-body deadline of a body read before authentication (login,
    /// refresh, any request without `Authorization`).
    pub unauthenticated_body_deadline_secs: u64,
    /// Largest body read before authentication (and never more than
    /// `max_json_body`).
    pub unauthenticated_max_body: usize,
    /// Most bodies read before authentication at once (below
    /// `max_connections`); beyond it 503 with `Retry-After`.
    pub max_unauthenticated_bodies: usize,
    /// How often the expiry sweeper runs.
    pub sweep_interval_secs: u64,
}

/// Authentication settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Access token lifetime.
    pub access_ttl_secs: u64,
    /// A refresh token unused this long expires.
    pub refresh_idle_secs: u64,
    /// A login's refresh tokens stop working this long after the login.
    pub refresh_absolute_secs: u64,
    /// JWT `iss`.
    pub issuer: String,
    /// JWT `aud`.
    pub audience: String,
    /// Login attempts per client address per minute.
    pub login_per_address_per_minute: u32,
    /// Consecutive failures on one account before it is locked with backoff.
    pub lockout_after_failures: u32,
    /// Failed verifications allowed per account per hour.
    pub max_failures_per_hour: u32,
    /// Longest lockout.
    pub max_lockout_secs: u64,
    /// Argon2id memory in KiB (OWASP minimum 19456).
    pub argon2_memory_kib: u32,
    /// Argon2id iterations (OWASP minimum 2 at 19 MiB).
    pub argon2_iterations: u32,
    /// Memory for all concurrent password hashes together (MiB): a fixed
    /// pool of `budget / argon2_memory_kib` buffers, reused; must hold one.
    pub hash_memory_budget_mib: u32,
    /// Longest wait of a login for a hashing buffer before 429 (ms).
    pub hash_wait_ms: u64,
}

/// One PACS sink.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// A local archive folder (default `<data_dir>/archive`).
    Archive {
        /// Folder; default `<data_dir>/archive`.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// A DICOMweb PACS, by STOW-RS (verified by WADO-RS retrieval, or QIDO-RS).
    StowRs(DicomWebSinkConfig),
    /// A DIMSE PACS, by C-STORE (verified by C-GET, or C-FIND).
    CStore(CStoreSinkConfig),
}

/// A DICOMweb PACS.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DicomWebSinkConfig {
    /// The DICOMweb root, e.g. `https://pacs.example/dicom-web`.
    pub url: String,
    /// HTTP basic-auth user (with `password`).
    pub user: Option<String>,
    /// HTTP basic-auth password.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    /// A bearer token (instead of user and password).
    #[serde(skip_serializing)]
    pub token: Option<SecretString>,
    /// Extra PEM root certificates (a hospital CA), trusted in addition
    /// to the system roots; without it only the system roots are. The
    /// PACS certificate is always validated (never skipped); one that is
    /// not trusted fails delivery permanently, naming TLS.
    pub ca_file: Option<PathBuf>,
    /// Connect timeout.
    pub connect_timeout_secs: u64,
    /// Timeout of one request.
    pub request_timeout_secs: u64,
    /// Most instance bytes per STOW-RS request.
    pub batch_bytes: u64,
    /// Most instances per STOW-RS request.
    pub batch_instances: usize,
    /// `content` (default: every instance retrieved by WADO-RS and
    /// compared with what was sent) or `presence` (QIDO-RS finds the UID).
    pub verify: VerifyMode,
}

impl Default for DicomWebSinkConfig {
    fn default() -> Self {
        let d = DicomWebConfig::new("");
        Self {
            url: String::new(),
            user: None,
            password: None,
            token: None,
            ca_file: None,
            connect_timeout_secs: d.connect_timeout.as_secs(),
            request_timeout_secs: d.request_timeout.as_secs(),
            batch_bytes: d.batch_bytes,
            batch_instances: d.batch_instances,
            verify: d.verify,
        }
    }
}

impl DicomWebSinkConfig {
    /// The adapter configuration.
    pub fn to_dicomweb(&self) -> Result<DicomWebConfig, ConfigError> {
        let auth = match (&self.user, &self.password, &self.token) {
            (None, None, None) => DicomWebAuth::None,
            (Some(user), Some(password), None) => DicomWebAuth::Basic {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(token)) => DicomWebAuth::Bearer {
                token: token.clone(),
            },
            _ => {
                return Err(ConfigError::Invalid {
                    field: "sinks.user",
                    reason: "set user and password together, or token alone".into(),
                });
            }
        };
        let mut c = DicomWebConfig::new(self.url.clone());
        c.auth = auth;
        c.ca_file = self.ca_file.clone();
        c.connect_timeout = std::time::Duration::from_secs(self.connect_timeout_secs.max(1));
        c.request_timeout = std::time::Duration::from_secs(self.request_timeout_secs.max(1));
        c.batch_bytes = self.batch_bytes;
        c.batch_instances = self.batch_instances;
        c.verify = self.verify;
        Ok(c)
    }
}

/// A DIMSE PACS.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CStoreSinkConfig {
    /// `host:port` of the PACS's DICOM service.
    pub address: String,
    /// Our AE title.
    pub calling_ae: String,
    /// The PACS's AE title.
    pub called_ae: String,
    /// Connect (and association) timeout.
    pub connect_timeout_secs: u64,
    /// Timeout of each read or write.
    pub io_timeout_secs: u64,
    /// Largest PDU.
    pub max_pdu: u32,
    /// Associations opened at once for one delivery (1..=8).
    pub associations: usize,
    /// `content` (default: C-GET retrieves and compares each instance;
    /// presence-only where the PACS offers no C-GET) or `presence` (C-FIND).
    pub verify: VerifyMode,
}

impl Default for CStoreSinkConfig {
    fn default() -> Self {
        let d = CStoreConfig::default();
        Self {
            address: d.address,
            calling_ae: d.calling_ae,
            called_ae: d.called_ae,
            connect_timeout_secs: d.connect_timeout.as_secs(),
            io_timeout_secs: d.io_timeout.as_secs(),
            max_pdu: d.max_pdu,
            associations: d.associations,
            verify: d.verify,
        }
    }
}

impl CStoreSinkConfig {
    /// The adapter configuration.
    pub fn to_cstore(&self) -> CStoreConfig {
        CStoreConfig {
            address: self.address.clone(),
            calling_ae: self.calling_ae.clone(),
            called_ae: self.called_ae.clone(),
            connect_timeout: std::time::Duration::from_secs(self.connect_timeout_secs.max(1)),
            io_timeout: std::time::Duration::from_secs(self.io_timeout_secs.max(1)),
            max_pdu: self.max_pdu,
            associations: self.associations,
            verify: self.verify,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("relaypacs-data"),
            secret: None,
            secret_file: None,
            limits: Limits::default(),
            ingest: IngestConfig::default(),
            http: HttpConfig::default(),
            auth: AuthConfig::default(),
            sinks: vec![SinkConfig::Archive { path: None }],
            reports: None,
            outbox: OutboxConfig::default(),
            metrics: MetricsConfig::default(),
            stow: StowConfig::default(),
            tls: None,
            audit: AuditConfig::default(),
            state: StateConfig::default(),
            chunks: ChunksConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: 10,
            body_idle_timeout_secs: 30,
            max_json_body: 64 << 10,
            max_header_bytes: 16 << 10,
            max_headers: 100,
            max_checksummed_patch: 32 << 20,
            patch_segment_size: 8 << 20,
            max_upload_size: 2 << 30,
            max_parallel_patches_per_user: 4,
            max_open_uploads_per_user: 64,
            max_open_sessions_per_user: 64,
            max_event_streams_per_user: 5,
            min_free_bytes: None,
            cors_origins: Vec::new(),
            hsts: false,
            trusted_proxies: Vec::new(),
            max_connections: 1024,
            listen_backlog: 4096,
            max_connections_per_address: 64,
            body_min_rate_bytes_per_sec: 2048,
            body_rate_grace_secs: 10,
            body_deadline_secs: 6 * 3600,
            unauthenticated_body_deadline_secs: 5,
            unauthenticated_max_body: 16 << 10,
            max_unauthenticated_bodies: 128,
            sweep_interval_secs: 60,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_ttl_secs: 900,
            refresh_idle_secs: 1800,
            refresh_absolute_secs: 12 * 3600,
            issuer: "relaypacs".into(),
            audience: "relaypacs-api".into(),
            login_per_address_per_minute: 20,
            lockout_after_failures: 5,
            max_failures_per_hour: 100,
            max_lockout_secs: 900,
            argon2_memory_kib: 19456,
            argon2_iterations: 2,
            hash_memory_budget_mib: 64,
            hash_wait_ms: 2000,
        }
    }
}

/// Placeholders that must never be accepted as secrets.
const PLACEHOLDERS: &[&str] = &[
    "changeme",
    "change-me",
    "change_me",
    "secret",
    "your-secret-key",
    "your-secret-key-here",
    "supersecret",
    "dev-secret-key-change-in-production",
    "relaypacs-secret",
    "please-change-this-secret-in-production",
    "replace-with-a-long-random-secret-value",
];

/// Refuse a secret that is short, empty, a placeholder or low in entropy.
/// The message names the setting, never the value.
pub fn check_secret(field: &'static str, secret: &str) -> Result<(), ConfigError> {
    let bytes = secret.as_bytes();
    let bad = |reason: &str| ConfigError::Invalid {
        field,
        reason: reason.to_string(),
    };
    if bytes.is_empty() {
        return Err(bad("is empty"));
    }
    let lower = secret.to_ascii_lowercase();
    if PLACEHOLDERS.iter().any(|p| lower.contains(p)) {
        return Err(bad(
            "is a known placeholder value; generate a random secret",
        ));
    }
    if bytes.len() < 32 {
        return Err(bad("is shorter than 32 bytes"));
    }
    // Shannon entropy per byte: a repeated or patterned value is refused.
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    if entropy < 3.0 {
        return Err(bad("has too little entropy (use 32+ random bytes)"));
    }
    Ok(())
}

impl Config {
    /// Load from an optional TOML file, then `RELAYPACS_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::Parse(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig.merge(
            Env::prefixed("RELAYPACS_")
                .split("__")
                .ignore(&["config", "log"]),
        );
        let cfg: Config = fig
            .extract()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |field: &'static str, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if let Some(s) = &self.secret {
            check_secret("secret", s.expose_secret())?;
        }
        if self.sinks.is_empty() {
            return inv("sinks", "configure at least one sink");
        }
        if let Some(u) = &self.state.url
            && !(u.starts_with("sqlite:")
                || u.starts_with("postgres:")
                || u.starts_with("postgresql:"))
        {
            return inv("state.url", "must start with sqlite: or postgres:");
        }
        if let ChunksConfig::S3(c) = &self.chunks {
            if c.bucket.is_empty() {
                return inv("chunks.bucket", "an s3 chunk store needs its bucket");
            }
            if c.part_size_mib < 5 {
                return inv("chunks.part_size_mib", "S3 parts are at least 5 MiB");
            }
        }
        if self.state.max_connections == 0 {
            return inv("state.max_connections", "must be at least 1");
        }
        if self.state.statement_timeout_secs == 0 || self.state.acquire_timeout_secs == 0 {
            return inv("state", "timeouts must be at least 1 second");
        }
        if let Some(s) = &self.audit.syslog {
            s.validate()?;
        }
        if self.audit.jsonl_path.is_some() && !self.audit.jsonl {
            return inv(
                "audit.jsonl_path",
                "set audit.jsonl = true to write the JSON-lines trail (or remove jsonl_path)",
            );
        }
        if let Some(t) = &self.tls {
            if t.cert_file.as_os_str().is_empty() || t.key_file.as_os_str().is_empty() {
                return inv("tls", "set both cert_file and key_file");
            }
            if t.handshake_timeout_secs == 0 {
                return inv("tls.handshake_timeout_secs", "must be at least 1");
            }
        }
        for s in &self.sinks {
            match s {
                SinkConfig::StowRs(c) => {
                    c.to_dicomweb()?;
                    if c.url.is_empty() {
                        return inv("sinks.url", "a stow_rs sink needs its DICOMweb url");
                    }
                }
                SinkConfig::CStore(c) => {
                    if c.address.is_empty() {
                        return inv("sinks.address", "a c_store sink needs host:port");
                    }
                }
                SinkConfig::Archive { .. } => {}
            }
        }
        if let Some(r) = &self.reports {
            r.to_dicomweb()?;
        }
        let o = &self.outbox;
        if o.max_attempts == 0 || o.parallel == 0 || o.batch == 0 || o.base_delay.is_zero() {
            return inv(
                "outbox",
                "max_attempts, parallel, batch and base_delay must be positive",
            );
        }
        if !(0..=19).contains(&o.nice) {
            return inv("outbox", "nice must be 0 to 19");
        }
        if o.linger > std::time::Duration::from_secs(10) {
            return inv("outbox", "linger must be at most 10 s");
        }
        let h = &self.http;
        if h.header_read_timeout_secs == 0 || h.header_read_timeout_secs > 300 {
            return inv("http.header_read_timeout_secs", "must be 1..=300");
        }
        if h.body_idle_timeout_secs == 0 || h.body_idle_timeout_secs > 600 {
            return inv("http.body_idle_timeout_secs", "must be 1..=600");
        }
        if h.max_header_bytes < 8192 {
            return inv("http.max_header_bytes", "must be at least 8192");
        }
        if h.max_json_body < 1024 || h.max_json_body > 16 << 20 {
            return inv("http.max_json_body", "must be 1 KiB..=16 MiB");
        }
        if h.patch_segment_size < self.limits.min_chunk_size
            || h.patch_segment_size > self.limits.max_chunk_size
        {
            return inv(
                "http.patch_segment_size",
                "must lie within limits.min_chunk_size..=limits.max_chunk_size",
            );
        }
        if h.max_checksummed_patch > self.limits.max_chunk_size {
            return inv(
                "http.max_checksummed_patch",
                "must not exceed limits.max_chunk_size",
            );
        }
        if h.max_upload_size > self.limits.max_file_size {
            return inv(
                "http.max_upload_size",
                "must not exceed limits.max_file_size",
            );
        }
        if h.max_connections == 0
            || h.max_connections_per_address == 0
            || h.max_connections_per_address > h.max_connections
        {
            return inv(
                "http.max_connections_per_address",
                "must be 1..=http.max_connections",
            );
        }
        if h.listen_backlog == 0 || h.listen_backlog > 65_535 {
            return inv("http.listen_backlog", "must be 1..=65535");
        }
        if h.max_unauthenticated_bodies == 0 || h.max_unauthenticated_bodies >= h.max_connections {
            return inv(
                "http.max_unauthenticated_bodies",
                "must be at least 1 and below http.max_connections",
            );
        }
        if h.body_min_rate_bytes_per_sec == 0 || h.body_min_rate_bytes_per_sec > 1 << 20 {
            return inv("http.body_min_rate_bytes_per_sec", "must be 1..=1 MiB");
        }
        if h.body_rate_grace_secs == 0 || h.body_rate_grace_secs > 600 {
            return inv("http.body_rate_grace_secs", "must be 1..=600");
        }
        if h.unauthenticated_body_deadline_secs == 0 || h.unauthenticated_body_deadline_secs > 60 {
            return inv("http.unauthenticated_body_deadline_secs", "must be 1..=60");
        }
        if h.unauthenticated_max_body < 1024 {
            return inv("http.unauthenticated_max_body", "must be at least 1 KiB");
        }
        if h.max_parallel_patches_per_user == 0 || h.max_event_streams_per_user == 0 {
            return inv("http", "per-user limits must be at least 1");
        }
        for o in &h.cors_origins {
            if o == "*" || o == "null" || !(o.starts_with("https://") || o.starts_with("http://")) {
                return inv(
                    "http.cors_origins",
                    "each origin must be an exact http(s) origin; '*' and 'null' are refused",
                );
            }
        }
        let a = &self.auth;
        if a.access_ttl_secs == 0 || a.access_ttl_secs > 3600 {
            return inv("auth.access_ttl_secs", "must be 1..=3600");
        }
        if a.refresh_absolute_secs < a.refresh_idle_secs {
            return inv(
                "auth.refresh_absolute_secs",
                "must be at least auth.refresh_idle_secs",
            );
        }
        if a.argon2_memory_kib < 19456 || a.argon2_iterations < 2 {
            return inv(
                "auth.argon2_memory_kib",
                "argon2id below the OWASP minimum (19456 KiB, 2 iterations)",
            );
        }
        if u64::from(a.hash_memory_budget_mib) * 1024 < u64::from(a.argon2_memory_kib) {
            return inv(
                "auth.hash_memory_budget_mib",
                "must hold at least one hash (auth.argon2_memory_kib)",
            );
        }
        if a.hash_wait_ms > 60_000 {
            return inv("auth.hash_wait_ms", "must be at most 60000");
        }
        if a.issuer.is_empty() || a.audience.is_empty() {
            return inv("auth.issuer", "issuer and audience must be set");
        }
        let st = &self.stow;
        if !(1024..=1 << 20).contains(&st.max_part_header_bytes) {
            return inv("stow.max_part_header_bytes", "must be 1024..=1048576");
        }
        if !(1..=32).contains(&st.max_part_headers) {
            return inv("stow.max_part_headers", "must be 1..=32");
        }
        let m = &self.metrics;
        if !m.require_token && !m.listen.is_some_and(|l| l.ip().is_loopback()) {
            return inv(
                "metrics.require_token",
                "may be false only with a loopback metrics.listen address",
            );
        }
        if m.listen.is_some_and(|l| l == self.listen && l.port() != 0) {
            return inv("metrics.listen", "must differ from listen");
        }
        Ok(())
    }

    /// The metrics token's file.
    pub fn metrics_token_path(&self) -> PathBuf {
        self.metrics
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("metrics-token"))
    }

    /// The metrics bearer token: the content of its file, or a new random
    /// one written there (mode 0600, crash-safe as the secret) on first
    /// start. `None` when no token is required.
    pub fn resolve_metrics_token(&self) -> Result<Option<SecretString>, ConfigError> {
        if !self.metrics.require_token {
            return Ok(None);
        }
        read_or_create_secret_file(&self.metrics_token_path(), "metrics.token_file", 32).map(Some)
    }

    /// The secret file's path.
    pub fn secret_path(&self) -> PathBuf {
        self.secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("secret"))
    }

    /// The pipeline's settings: limits, DICOM validation and the duplicate
    /// policy.
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            limits: self.limits.clone(),
            dicom: relaypacs_core::dicom::DicomLimits {
                require_patient_id: self.ingest.require_patient_id,
                ..Default::default()
            },
            duplicates: self.ingest.duplicates,
            max_open_sessions_per_user: self.http.max_open_sessions_per_user,
            ..PipelineConfig::default()
        }
    }

    /// The state database URL: `[state] url`, else SQLite in the data folder.
    pub fn state_url(&self) -> String {
        self.state
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("state.db").display()))
    }

    /// Whether the state database belongs to this process alone: the
    /// default SQLite file in the data folder (which the server locks).
    pub fn state_is_private(&self) -> bool {
        self.state.url.is_none()
    }

    /// Whether the delivery worker runs on a thread and runtime of its own,
    /// `[outbox] nice` below the requests: when nothing it opens is a
    /// socket that requests share, i.e. SQLite state (its connections have
    /// worker threads of their own) and local chunks. With PostgreSQL
    /// state or S3 chunks it runs on the requests' runtime.
    pub fn delivery_runs_apart(&self) -> bool {
        self.state_url().starts_with("sqlite:") && matches!(self.chunks, ChunksConfig::Local { .. })
    }

    /// The state database password: `[state] password`, else the first
    /// line of `password_file`, else none (the URL's, if any).
    pub fn state_password(&self) -> Result<Option<SecretString>, ConfigError> {
        if let Some(p) = &self.state.password {
            return Ok(Some(p.clone()));
        }
        let Some(path) = &self.state.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
            path: path.clone(),
            source,
        })?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Err(ConfigError::Invalid {
                field: "state.password_file",
                reason: "the file is empty".into(),
            });
        }
        Ok(Some(SecretString::from(line.to_owned())))
    }

    /// Pool size and timeouts of the state database.
    pub fn state_options(&self) -> relaypacs_storage::SqlOptions {
        let mut o = relaypacs_storage::SqlOptions::default();
        o.max_connections = self.state.max_connections;
        o.statement_timeout = std::time::Duration::from_secs(self.state.statement_timeout_secs);
        o.acquire_timeout = std::time::Duration::from_secs(self.state.acquire_timeout_secs);
        o.migrate = self.state.migrate;
        o
    }

    /// The anchor file of the database's audit chain: `[audit]
    /// anchor_path`, else `<data_dir>/audit/sql-chain.anchor`.
    pub fn audit_anchor_path(&self) -> PathBuf {
        self.audit
            .anchor_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("audit").join("sql-chain.anchor"))
    }

    /// The JSON-lines audit trail, when on (`[audit] jsonl = true`):
    /// `jsonl_path`, else `<data_dir>/audit/audit.jsonl`.
    pub fn audit_jsonl_path(&self) -> Option<PathBuf> {
        self.audit.jsonl.then(|| {
            self.audit
                .jsonl_path
                .clone()
                .unwrap_or_else(|| self.data_dir.join("audit").join("audit.jsonl"))
        })
    }

    /// A local archive's folder.
    pub fn archive_path(&self, path: Option<&PathBuf>) -> PathBuf {
        path.cloned()
            .unwrap_or_else(|| self.data_dir.join("archive"))
    }

    /// Where reports are polled for: `reports`, else the first STOW-RS sink.
    pub fn reports_source(&self) -> Option<&DicomWebSinkConfig> {
        self.reports.as_ref().or_else(|| {
            self.sinks.iter().find_map(|s| match s {
                SinkConfig::StowRs(c) => Some(c),
                _ => None,
            })
        })
    }

    /// The configured secret, or the one in the secret file, or a new
    /// random one written to the secret file (mode 0600, fsync'd, then the
    /// folder fsync'd) on first start.
    pub fn resolve_secret(&self) -> Result<SecretString, ConfigError> {
        if let Some(s) = &self.secret {
            return Ok(s.clone());
        }
        // 384 random bits; checked on read like any secret file.
        read_or_create_secret_file(&self.secret_path(), "secret_file", 48)
    }
}

/// The secret in `path` (checked: mode 0600, 32+ bytes, not a
/// placeholder), or a new one of `random_bytes` random bytes (hex) written
/// there on first start.
/// Crash-safe as the signing secret: a temp file created with mode 0600,
/// fsync'd, renamed into place, then the folder fsync'd; a crash leaves
/// either no file or a complete one.
fn read_or_create_secret_file(
    path: &Path,
    field: &'static str,
    random_bytes: usize,
) -> Result<SecretString, ConfigError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| ConfigError::SecretFile {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!(
                        "{} is readable by other users (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    ),
                });
            }
            let s = s.trim().to_string();
            check_secret(field, &s)?;
            Ok(SecretString::from(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = vec![0u8; random_bytes];
            rand::rng().fill_bytes(&mut raw);
            let value = hex::encode(raw);
            if let Some(dir) = path.parent() {
                relaypacs_storage::fs::create_dir_durable(dir)
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            }
            // Crash-safe write: temp file (0600) + fsync + rename + fsync dir.
            let tmp = relaypacs_storage::fs::temp_path(path);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(value.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            drop(f);
            std::fs::rename(&tmp, path).map_err(io)?;
            if let Some(dir) = path.parent() {
                relaypacs_storage::fs::fsync_dir(dir)
                    .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            }
            tracing::info!(path = %path.display(), field, "generated a new random secret (first start)");
            Ok(SecretString::from(value))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod syslog_config_tests {
    use super::*;

    fn load(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("relaypacs.toml");
        std::fs::write(&f, toml).unwrap();
        Config::load(Some(&f))
    }

    #[test]
    fn audit_syslog_section_parses_with_defaults() {
        let c = load(
            "[audit.syslog]\naddress = \"logs.example.org:6514\"\nserver_name = \"logs.example.org\"\nca_file = \"/etc/relaypacs/syslog-ca.pem\"\n",
        )
        .unwrap();
        let s = c.audit.syslog.unwrap();
        assert_eq!(
            (s.queue, s.facility, s.anchor_interval_secs),
            (10_000, 10, 60)
        );
        assert_eq!(s.format, SyslogMessageFormat::DicomXml);
        let f = s.to_forwarding();
        assert_eq!(f.address, "logs.example.org:6514");
        assert_eq!(f.anchor_interval, Some(std::time::Duration::from_secs(60)));
        assert!(Config::default().audit.syslog.is_none());
    }

    #[test]
    fn audit_syslog_section_is_validated() {
        let base = "[audit.syslog]\nserver_name = \"l\"\nca_file = \"/ca.pem\"\n";
        for (extra, field) in [
            ("address = \"no-port\"\n", "audit.syslog.address"),
            ("address = \"h:1\"\nqueue = 0\n", "audit.syslog.queue"),
            (
                "address = \"h:1\"\nfacility = 24\n",
                "audit.syslog.facility",
            ),
            (
                "address = \"h:1\"\nclient_cert_file = \"/c.pem\"\n",
                "audit.syslog.client_cert_file",
            ),
        ] {
            match load(&format!("{base}{extra}")) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{extra}: {other:?}"),
            }
        }
        assert!(matches!(
            load(&format!("{base}address = \"h:1\"\nformat = \"xml\"\n")),
            Err(ConfigError::Parse(_))
        ));
    }
}

#[cfg(test)]
mod audit_anchor_config_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn audit_anchor_settings_parse_with_defaults() {
        let d = Config::default().audit;
        assert_eq!((d.anchor_every_records, d.anchor_interval_secs), (1000, 10));
        let o = d.trail_options();
        assert_eq!(o.anchor_every_records, 1000);
        assert_eq!(o.anchor_interval, Some(std::time::Duration::from_secs(10)));
        assert!(o.anchor_path.is_none());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("relaypacs.toml");
        std::fs::write(
            &f,
            "[audit]\nanchor_every_records = 5\nanchor_interval_secs = 0\nanchor_path = \"/var/lib/relaypacs-anchor/head\"\n",
        )
        .unwrap();
        let o = Config::load(Some(&f)).unwrap().audit.trail_options();
        assert_eq!(o.anchor_every_records, 5);
        assert_eq!(o.anchor_interval, None);
        assert_eq!(
            o.anchor_path.as_deref(),
            Some(std::path::Path::new("/var/lib/relaypacs-anchor/head"))
        );
    }
    #[test]
    fn audit_jsonl_and_state_migrate_settings() {
        let d = Config::default();
        assert!(!d.audit.jsonl && d.audit_jsonl_path().is_none());
        assert_eq!(
            d.audit_anchor_path(),
            d.data_dir.join("audit").join("sql-chain.anchor")
        );
        assert!(d.state.migrate && d.state_options().migrate);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("relaypacs.toml");
        std::fs::write(
            &f,
            "data_dir = \"/srv/r\"\n[state]\nmigrate = false\n[audit]\njsonl = true\n",
        )
        .unwrap();
        let c = Config::load(Some(&f)).unwrap();
        assert!(!c.state_options().migrate);
        assert_eq!(
            c.audit_jsonl_path().unwrap(),
            std::path::Path::new("/srv/r/audit/audit.jsonl")
        );
        std::fs::write(&f, "[audit]\njsonl_path = \"/srv/trail.jsonl\"\n").unwrap();
        let e = Config::load(Some(&f)).unwrap_err();
        assert!(e.to_string().contains("audit.jsonl_path"), "{e}");
    }

    #[test]
    fn outbox_batch_nice_and_thread_are_checked() {
        let d = Config::default();
        assert_eq!((d.outbox.batch, d.outbox.nice), (32, 10));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("relaypacs.toml");
        std::fs::write(
            &f,
            "[outbox]
batch = 4
nice = 0
",
        )
        .unwrap();
        let c = Config::load(Some(&f)).unwrap();
        assert_eq!((c.outbox.batch, c.outbox.nice), (4, 0));
        // A thread of its own only when no socket is shared with requests.
        assert!(d.delivery_runs_apart());
        let mut pg = Config::default();
        pg.state.url = Some("postgres://relay@127.0.0.1/relay".into());
        assert!(!pg.delivery_runs_apart());
        assert_eq!(d.outbox.linger, std::time::Duration::from_millis(50));
        std::fs::write(&f, "[outbox]\nlinger = 0\n").unwrap();
        assert!(Config::load(Some(&f)).unwrap().outbox.linger.is_zero());
        for bad in ["batch = 0", "nice = 20", "nice = -1", "linger = 10.5"] {
            std::fs::write(&f, format!("[outbox]\n{bad}\n")).unwrap();
            let e = Config::load(Some(&f)).unwrap_err();
            assert!(e.to_string().contains("outbox"), "{bad}: {e}");
        }
    }

    #[test]
    fn listen_backlog_is_read_and_checked() {
        assert_eq!(Config::default().http.listen_backlog, 4096);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("relaypacs.toml");
        std::fs::write(&f, "[http]\nlisten_backlog = 512\n").unwrap();
        assert_eq!(Config::load(Some(&f)).unwrap().http.listen_backlog, 512);
        for bad in ["listen_backlog = 0", "listen_backlog = 65536"] {
            std::fs::write(&f, format!("[http]\n{bad}\n")).unwrap();
            let e = Config::load(Some(&f)).unwrap_err();
            assert!(e.to_string().contains("http.listen_backlog"), "{bad}: {e}");
        }
    }
}

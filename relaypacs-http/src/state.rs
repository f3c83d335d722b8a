//! The server's shared state, wired from a [`Config`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::FromRef;

use crate::config::SinkConfig;
use relaypacs_core::pipeline::GaugeFn;
use relaypacs_core::{
    AuditAction, AuditEvent, AuditOutcome, AuditSink, ChunkStore, PacsSink, Pipeline, SessionStore,
};
use relaypacs_pacs::{CStoreSink, DicomWebReports, FanOutSink, LocalArchiveSink, StowSink};
use relaypacs_storage::{
    AuditFanOut, JsonlAuditSink, LocalChunkStore, SqlAuditSink, SqlSessionStore, SqlState,
};
use secrecy::ExposeSecret;

use crate::admission::Admission;
use crate::auth::{
    HashBudget, Hasher, LimiterConfig, LoginLimiter, SqlUserStore, TokenSettings, Tokens, TotpBox,
    UserStore,
};
use crate::config::{Config, ConfigError};
use crate::disk::Watermark;
use crate::metrics::Metrics;
use crate::notify::Hub;

/// Why the server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A store could not be opened.
    #[error("opening {what}: {source}")]
    Store {
        /// Which store.
        what: &'static str,
        /// The error.
        source: relaypacs_core::Error,
    },
    /// Anything else at start-up.
    #[error("{0}")]
    Other(String),
}

/// The pipeline's adapters. [`AppState::open_with`] hands the embedded
/// defaults to a function that may replace or wrap any of them (another
/// PACS sink, an object-store chunk store, fault injection in tests).
#[derive(Debug, Clone)]
pub struct Adapters {
    /// Chunk store.
    pub chunks: Arc<dyn ChunkStore>,
    /// Session store.
    pub sessions: Arc<dyn SessionStore>,
    /// PACS sink.
    pub sink: Arc<dyn PacsSink>,
    /// Audit sink.
    pub audit: Arc<dyn AuditSink>,
}

/// Everything handlers share. Cheap to clone. Its parts are reached
/// through methods, and handlers take the parts they use as
/// `State<Pipeline>`, `State<Hub>`, … (each implements
/// [`FromRef<AppState>`](axum::extract::FromRef)).
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// The shared state's parts (private: see the accessors).
#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    pipeline: Pipeline,
    audit: Arc<dyn AuditSink>,
    users: Arc<dyn UserStore>,
    hasher: Hasher,
    tokens: Arc<Tokens>,
    totp: TotpBox,
    limiter: LoginLimiter,
    hub: Hub,
    metrics: Arc<Metrics>,
    watermark: Watermark,
    admission: Admission,
    spool: PathBuf,
    /// The S3 chunk store, for the periodic cleanup of abandoned uploads.
    s3_chunks: Option<Arc<S3Chunks>>,
    _lock: std::fs::File,
}

/// The S3 chunk store of `[chunks] kind = "s3"`.
pub type S3Chunks =
    relaypacs_storage::MultipartChunkStore<relaypacs_storage::object_store::aws::AmazonS3>;

/// The configured sinks: one as is, several behind a fan-out (every one
/// must hold an instance; no fallback).
fn open_sinks(config: &Config) -> Result<Arc<dyn PacsSink>, StartError> {
    let mut sinks: Vec<Arc<dyn PacsSink>> = Vec::new();
    for s in &config.sinks {
        sinks.push(match s {
            SinkConfig::Archive { path } => Arc::new(
                LocalArchiveSink::open(config.archive_path(path.as_ref()))
                    .map_err(store("archive"))?,
            ),
            SinkConfig::StowRs(c) => {
                Arc::new(StowSink::new(&c.to_dicomweb()?).map_err(store("STOW-RS sink"))?)
            }
            SinkConfig::CStore(c) => {
                Arc::new(CStoreSink::new(c.to_cstore()).map_err(store("C-STORE sink"))?)
            }
        });
    }
    if sinks.len() == 1 {
        return Ok(sinks.remove(0));
    }
    Ok(Arc::new(FanOutSink::new(sinks).map_err(store("sinks"))?))
}

fn store(what: &'static str) -> impl FnOnce(relaypacs_core::Error) -> StartError {
    move |source| StartError::Store { what, source }
}

impl AppState {
    /// Open every store under the configured data folder.
    pub async fn open(config: Config) -> Result<Self, StartError> {
        Self::open_with(config, |a| a).await
    }

    /// Like [`open`](Self::open), letting `adapt` replace adapters.
    pub async fn open_with(
        config: Config,
        adapt: impl FnOnce(Adapters) -> Adapters,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let secret = config.resolve_secret()?;
        let root = config.data_dir.clone();
        relaypacs_storage::fs::create_dir_durable(&root).map_err(store("data folder"))?;
        let server_lock =
            relaypacs_storage::fs::lock_root(&root.join("server")).map_err(store("server lock"))?;
        let mut s3_chunks = None;
        let chunks: Arc<dyn ChunkStore> = match &config.chunks {
            crate::config::ChunksConfig::Local { path } => Arc::new(
                LocalChunkStore::open(path.clone().unwrap_or_else(|| root.join("chunks")))
                    .map_err(store("chunk store"))?,
            ),
            crate::config::ChunksConfig::S3(c) => {
                let s3 = Arc::new(
                    S3Chunks::new(Arc::new(c.client()?), c.prefix.as_str())
                        .with_part_size(c.part_size_mib << 20)
                        .map_err(store("chunk store"))?,
                );
                s3_chunks = Some(s3.clone());
                s3
            }
        };
        let password = config.state_password()?;
        let db = SqlState::connect(
            &config.state_url(),
            password.as_ref().map(|p| p.expose_secret()),
            &config.state_options(),
        )
        .await
        .map_err(store("state database"))?;
        // The audit trail: the hash chain in the state database (one chain
        // for every gateway on it), its head anchored in a file of this
        // gateway's; optionally a JSON-lines trail too (`[audit] jsonl`),
        // every record acknowledged only once both hold it.
        let trail = config.audit.trail_options();
        let sql_audit = SqlAuditSink::open_anchored(
            db.clone(),
            config.audit_anchor_path(),
            trail.anchor_every_records,
            trail.anchor_interval,
        )
        .await
        .map_err(store("audit trail"))?;
        // On SQLite, a step's audit records commit in the step's own
        // transaction when the trail is this chain alone (no JSON-lines
        // mirror, no syslog forwarding: the pipeline checks that its audit
        // sink answers this database's trail key): every write takes the
        // one database lock anyway, so this saves a sync per step. On
        // PostgreSQL, where several gateways write at once, the records go
        // through the sink's group commit instead: appending in every
        // step's transaction would hold the chain head's row lock through
        // each commit and serialize all gateways' steps on it.
        let sessions = SqlSessionStore::new(db.clone());
        let sessions = if db.engine() == relaypacs_storage::Engine::Sqlite {
            sessions.with_audit(&sql_audit)
        } else {
            sessions
        };
        let mut mirrors: Vec<Arc<dyn AuditSink>> = Vec::new();
        if let Some(path) = config.audit_jsonl_path() {
            let mut o = trail.clone();
            o.anchor_path = None; // beside the JSON-lines file
            mirrors.push(Arc::new(
                JsonlAuditSink::open_with(path, o).map_err(store("JSON-lines audit trail"))?,
            ));
        }
        let audit = AuditFanOut::new(sql_audit, mirrors);
        // Optional forwarding of the trail to a syslog collector over TLS
        // (`[audit.syslog]`); the local trails stay the record.
        let audit: Arc<dyn AuditSink> = match &config.audit.syslog {
            Some(s) => Arc::new(
                relaypacs_storage::SyslogForwardingSink::with_chain(audit, s.to_forwarding())
                    .map_err(|e| {
                        let cause = std::error::Error::source(&e)
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default();
                        StartError::Other(format!("audit.syslog: {e}{cause}"))
                    })?,
            ),
            None => Arc::new(audit),
        };
        let sink = open_sinks(&config)?;
        let a = adapt(Adapters {
            chunks,
            sessions: Arc::new(sessions),
            sink,
            audit,
        });
        let audit = a.audit.clone();
        let pipeline = Pipeline::new(a.chunks, a.sessions, a.sink, a.audit, config.pipeline());
        let watermark = Watermark {
            path: root.clone(),
            configured: config.http.min_free_bytes,
            max_upload: config.http.max_upload_size,
        };
        // New study sessions are refused (507) below the disk watermark.
        let gauge = watermark.clone();
        pipeline
            .set_storage_gauge(Arc::new(GaugeFn(move |n| match gauge.admit(n) {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((free, min))) => Err(relaypacs_core::Error::InsufficientStorage {
                    needed: n,
                    reason: format!("{free} bytes free, {min} must stay free"),
                }),
                Err(e) => Err(relaypacs_core::Error::io("measuring free disk space", e)),
            })))
            .map_err(store("storage gauge"))?;
        if let Some(r) = config.reports_source() {
            let src = DicomWebReports::new(&r.to_dicomweb()?).map_err(store("report source"))?;
            pipeline
                .set_report_source(Arc::new(src))
                .map_err(store("report source"))?;
        }
        let users = SqlUserStore::new(db.clone());
        let a = &config.auth;
        let tokens = Tokens::new(
            &secret,
            TokenSettings {
                access_ttl_secs: a.access_ttl_secs,
                refresh_idle_secs: a.refresh_idle_secs,
                refresh_absolute_secs: a.refresh_absolute_secs,
                issuer: a.issuer.clone(),
                audience: a.audience.clone(),
            },
            db.clone(),
        )
        .map_err(store("refresh tokens"))?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = Hasher::with_budget(
            a.argon2_memory_kib,
            a.argon2_iterations,
            HashBudget {
                memory_mib: a.hash_memory_budget_mib,
                max_parallel: 2 * cores,
                wait: std::time::Duration::from_millis(a.hash_wait_ms),
            },
        )
        .map_err(StartError::Other)?;
        let limiter = LoginLimiter::new(
            LimiterConfig {
                per_address_per_minute: a.login_per_address_per_minute,
                lockout_after: a.lockout_after_failures,
                max_failures_per_hour: a.max_failures_per_hour,
                max_lockout: std::time::Duration::from_secs(a.max_lockout_secs),
            },
            db.clone(),
        );
        // Notifications in the state database; on PostgreSQL live events
        // also cross gateways (LISTEN/NOTIFY).
        let hub = Hub::open(
            relaypacs_storage::SqlNotificationStore::new(db.clone()),
            Some(crate::notify::Listen {
                url: config.state_url(),
                password: password.as_ref().map(|p| p.expose_secret().to_owned()),
            }),
        )
        .await
        .map_err(store("notifications"))?;
        let spool = root.join("spool");
        relaypacs_storage::fs::create_dir_durable(&spool).map_err(store("spool"))?;
        relaypacs_storage::fs::sweep_temp(&spool).map_err(store("spool"))?;
        let state = Self {
            inner: Arc::new(Inner {
                totp: TotpBox::new(&secret),
                pipeline,
                audit,
                users: Arc::new(users),
                hasher,
                tokens: Arc::new(tokens),
                limiter,
                hub,
                metrics: Arc::new(Metrics::default()),
                watermark,
                admission: Admission::default(),
                spool,
                config: Arc::new(config),
                s3_chunks,
                _lock: server_lock,
            }),
        };
        Ok(state)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The S3 chunk store, when chunks are on S3 (`[chunks] kind = "s3"`).
    pub fn s3_chunks(&self) -> Option<&Arc<S3Chunks>> {
        self.inner.s3_chunks.as_ref()
    }

    /// The pipeline (the one door to sessions, chunks and delivery).
    pub fn pipeline(&self) -> &Pipeline {
        &self.inner.pipeline
    }

    /// The audit sink (also reachable through the pipeline).
    pub fn audit(&self) -> &Arc<dyn AuditSink> {
        &self.inner.audit
    }

    /// Accounts.
    pub fn users(&self) -> &Arc<dyn UserStore> {
        &self.inner.users
    }

    /// Password hashing.
    pub fn hasher(&self) -> &Hasher {
        &self.inner.hasher
    }

    /// Access and refresh tokens, stream tickets.
    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    /// TOTP secrets.
    pub fn totp(&self) -> &TotpBox {
        &self.inner.totp
    }

    /// Login throttling.
    pub fn limiter(&self) -> &LoginLimiter {
        &self.inner.limiter
    }

    /// Live events and durable notifications.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The disk watermark.
    pub fn watermark(&self) -> &Watermark {
        &self.inner.watermark
    }

    /// Per-user admission counters.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    /// The spool folder for STOW-RS parts.
    pub fn spool(&self) -> &Path {
        &self.inner.spool
    }

    /// Record an audit event; failures are returned (fail closed).
    pub async fn audit_event(&self, ev: AuditEvent) -> relaypacs_core::Result<()> {
        self.inner
            .audit
            .record(&ev)
            .await
            .map_err(|e| relaypacs_core::Error::Audit {
                source: Box::new(e),
            })
    }

    /// A new audit event for `user` from `address`.
    pub fn event(
        user: &str,
        address: &str,
        action: AuditAction,
        outcome: AuditOutcome,
    ) -> AuditEvent {
        let mut ev = AuditEvent::new(user, action, outcome);
        ev.address = Some(address.to_string());
        ev
    }
}

macro_rules! from_ref {
    ($($ty:ty => $get:ident),* $(,)?) => {$(
        impl FromRef<AppState> for $ty {
            fn from_ref(state: &AppState) -> Self {
                state.$get().clone()
            }
        }
    )*};
}

from_ref! {
    Pipeline => pipeline,
    Hub => hub,
    Arc<Metrics> => metrics,
    Watermark => watermark,
    Admission => admission,
    Arc<dyn AuditSink> => audit,
    Arc<dyn UserStore> => users,
}

impl FromRef<AppState> for Arc<Tokens> {
    fn from_ref(state: &AppState) -> Self {
        state.inner.tokens.clone()
    }
}

impl FromRef<AppState> for Arc<Config> {
    fn from_ref(state: &AppState) -> Self {
        state.inner.config.clone()
    }
}

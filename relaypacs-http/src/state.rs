//! The server's shared state, wired from a [`Config`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::SinkConfig;
use relaypacs_core::{
    Actor, AuditAction, AuditEvent, AuditOutcome, AuditSink, ChunkStore, FileState, PacsSink,
    Pipeline, SessionState, SessionStore,
};
use relaypacs_pacs::{CStoreSink, DicomWebReports, FanOutSink, LocalArchiveSink, StowSink};
use relaypacs_storage::{FileSessionStore, JsonlAuditSink, LocalChunkStore};
use tokio::sync::Semaphore;

use crate::auth::{
    FileUserStore, Hasher, LimiterConfig, LoginLimiter, TokenSettings, Tokens, TotpBox, UserStore,
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

/// Everything handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// Per-upload and per-user admission state.
#[derive(Debug, Default)]
pub struct Admission {
    /// Per-user PATCH permits.
    pub patches: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per-user open event streams.
    pub streams: Mutex<HashMap<String, usize>>,
    /// Per-user unfinished uploads (upload ids).
    pub open_uploads: Mutex<HashMap<String, std::collections::HashSet<String>>>,
}

/// The shared state's fields.
#[derive(Debug)]
pub struct Inner {
    /// Configuration.
    pub config: Config,
    /// The pipeline.
    pub pipeline: Pipeline,
    /// The audit sink (also reachable through the pipeline).
    pub audit: Arc<dyn AuditSink>,
    /// Accounts.
    pub users: Arc<dyn UserStore>,
    /// Password hashing.
    pub hasher: Hasher,
    /// Tokens.
    pub tokens: Tokens,
    /// TOTP.
    pub totp: TotpBox,
    /// Login throttling.
    pub limiter: LoginLimiter,
    /// Events and notifications.
    pub hub: Hub,
    /// Metrics.
    pub metrics: Metrics,
    /// Disk watermark.
    pub watermark: Watermark,
    /// Admission control.
    pub admission: Admission,
    /// Spool folder for STOW-RS parts.
    pub spool: PathBuf,
    _lock: std::fs::File,
}

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

use relaypacs_storage::fs::lock;

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
        let chunks = LocalChunkStore::open(root.join("chunks")).map_err(store("chunk store"))?;
        let sessions =
            FileSessionStore::open(root.join("sessions")).map_err(store("session store"))?;
        let audit = JsonlAuditSink::open(root.join("audit").join("audit.jsonl"))
            .map_err(store("audit trail"))?;
        let sink = open_sinks(&config)?;
        let a = adapt(Adapters {
            chunks: Arc::new(chunks),
            sessions: Arc::new(sessions),
            sink,
            audit: Arc::new(audit),
        });
        let audit = a.audit.clone();
        let pipeline = Pipeline::new(a.chunks, a.sessions, a.sink, a.audit, config.pipeline());
        if let Some(r) = config.reports_source() {
            let src = DicomWebReports::new(&r.to_dicomweb()?).map_err(store("report source"))?;
            pipeline
                .set_report_source(Arc::new(src))
                .map_err(store("report source"))?;
        }
        let auth_dir = crate::auth::users::auth_dir(&root).map_err(store("auth folder"))?;
        let users = FileUserStore::open(auth_dir.join("users.json")).map_err(store("users"))?;
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
            auth_dir.join("refresh.json"),
        )
        .map_err(store("refresh tokens"))?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = Hasher::new(a.argon2_memory_kib, a.argon2_iterations, 2 * cores)
            .map_err(StartError::Other)?;
        let limiter = LoginLimiter::new(LimiterConfig {
            per_address_per_minute: a.login_per_address_per_minute,
            lockout_after: a.lockout_after_failures,
            max_failures_per_hour: a.max_failures_per_hour,
            max_lockout: std::time::Duration::from_secs(a.max_lockout_secs),
        });
        let hub = Hub::open(root.join("notifications")).map_err(store("notifications"))?;
        let spool = root.join("spool");
        relaypacs_storage::fs::create_dir_durable(&spool).map_err(store("spool"))?;
        relaypacs_storage::fs::sweep_temp(&spool).map_err(store("spool"))?;
        let watermark = Watermark {
            path: root.clone(),
            configured: config.http.min_free_bytes,
            max_upload: config.http.max_upload_size,
        };
        let state = Self {
            inner: Arc::new(Inner {
                totp: TotpBox::new(&secret),
                pipeline,
                audit,
                users: Arc::new(users),
                hasher,
                tokens,
                limiter,
                hub,
                metrics: Metrics::default(),
                watermark,
                admission: Admission::default(),
                spool,
                config,
                _lock: server_lock,
            }),
        };
        state
            .count_open_uploads()
            .await
            .map_err(store("sessions"))?;
        Ok(state)
    }

    /// Rebuild the per-user count of unfinished uploads from the sessions.
    async fn count_open_uploads(&self) -> relaypacs_core::Result<()> {
        let mut map: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        for rec in self.pipeline.list_sessions(&Actor::system()).await? {
            if rec.state != SessionState::Open {
                continue;
            }
            for f in rec.files.values() {
                if f.state == FileState::Uploading {
                    map.entry(rec.owner.clone())
                        .or_default()
                        .insert(crate::routes::tus::upload_id(rec.id, f.id));
                }
            }
        }
        *lock(&self.admission.open_uploads) = map;
        Ok(())
    }

    /// Stop counting the unfinished uploads whose id matches `gone`
    /// (finished, terminated, aborted or expired).
    pub fn forget_uploads(&self, gone: impl Fn(&str) -> bool) {
        for set in lock(&self.admission.open_uploads).values_mut() {
            set.retain(|u| !gone(u));
        }
    }

    /// Record an audit event; failures are returned (fail closed).
    pub async fn audit_event(&self, ev: AuditEvent) -> relaypacs_core::Result<()> {
        self.audit
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

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

//! RelayPACS reference server: the pipeline of `relaypacs-core` behind
//! authenticated tus 1.0 uploads, a study-session API, STOW-RS ingest and
//! live events. Thin by design: every rule about bytes, chunks, DICOM and
//! audit lives in the core; this crate maps HTTP onto it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = relaypacs_http::Config::load(None)?;
//! let server = relaypacs_http::Server::start(config).await?;
//! println!("listening on {}", server.addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod auth;
pub mod body_guard;
#[cfg(feature = "client")]
pub mod client;
pub mod client_addr;
pub mod config;
mod delivery_thread;
pub mod disk;
pub mod edges;
pub mod error;
pub mod metrics;
pub mod notify;
pub mod report_render;
pub mod routes;
pub mod state;
pub mod stow_headers;
pub mod tls;
pub mod tus_headers;
pub mod upload_id;

use std::net::SocketAddr;
use std::time::Duration;

use relaypacs_core::{AuditAction, AuditOutcome};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::Config;
pub use error::ApiError;
pub use state::{Adapters, AppState, StartError};
pub use upload_id::UploadId;

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    state: AppState,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
    sweeper: JoinHandle<()>,
    /// The delivery worker (a thread of its own, or a task: see
    /// [`Config::delivery_runs_apart`]).
    outbox: delivery_thread::DeliveryThread,
    /// `[tls]`, and its SIGHUP reload task.
    tls: Option<(tls::Tls, JoinHandle<()>)>,
}

impl Server {
    /// Open the stores, bind the configured address and serve.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, |a| a).await
    }

    /// Like [`start`](Self::start), letting `adapt` replace adapters.
    pub async fn start_with(
        config: Config,
        adapt: impl FnOnce(state::Adapters) -> state::Adapters,
    ) -> Result<Self, StartError> {
        let listen = config.listen;
        let backlog = config.http.listen_backlog;
        let state = AppState::open_with(config, adapt).await?;
        let listener = edges::bind(listen, backlog)
            .map_err(|e| StartError::Other(format!("cannot listen on {listen}: {e}")))?;
        Self::with_listener(state, listener).await
    }

    /// Serve an opened state on a bound listener.
    pub async fn with_listener(
        state: AppState,
        listener: tokio::net::TcpListener,
    ) -> Result<Self, StartError> {
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let metrics = edges::bind_metrics(&state).await?;
        let tls = match &state.config().tls {
            Some(c) => {
                let t = tls::Tls::load(c).map_err(|e| StartError::Other(error_chain(&e)))?;
                let hup = t.reload_on_sighup().map_err(|e| {
                    StartError::Other(format!("cannot watch SIGHUP for TLS reload: {e}"))
                })?;
                Some((t, hup))
            }
            None => None,
        };
        let mut ev = relaypacs_core::AuditEvent::new(
            "system",
            AuditAction::ApplicationStart,
            AuditOutcome::Success,
        );
        ev.detail = format!("listening on {addr}");
        state
            .audit_event(ev)
            .await
            .map_err(|source| StartError::Store {
                what: "audit trail",
                source,
            })?;
        // Before any request is served: a STOW-RS request's session left
        // open by an earlier run can never complete (no client knows it).
        let ended = state
            .pipeline()
            .end_orphaned_request_sessions()
            .await
            .map_err(|source| StartError::Store {
                what: "sessions",
                source,
            })?;
        if !ended.is_empty() {
            tracing::info!(
                count = ended.len(),
                "ended request-scoped sessions left open by an earlier run"
            );
        }
        let (stop, rx) = oneshot::channel::<()>();
        let app = edges::app(state.clone());
        let cfg = state.config().http.clone();
        let served_tls = tls.as_ref().map(|(t, _)| t.clone());
        let task = tokio::spawn(async move {
            edges::serve_with_metrics(listener, app, metrics, &cfg, served_tls, async {
                let _ = rx.await;
            })
            .await
        });
        let sweeper = tokio::spawn(sweep(state.clone()));
        // The worker may take over leases at once only when it is the one
        // process on its state: SQLite in the data folder this process
        // holds locked. On a shared database (PostgreSQL, or a SQLite file
        // outside the folder) another gateway's lease is respected until it
        // runs out.
        let mut outbox_config = state.config().outbox.clone();
        outbox_config.exclusive &= state.config().state_is_private();
        let outbox = relaypacs_core::Outbox::new(
            state.pipeline().clone(),
            outbox_config,
            std::sync::Arc::new(notify::DeliveryNotifier::new(
                state.hub().clone(),
                state.metrics().clone(),
            )),
        );
        let outbox = if state.config().delivery_runs_apart() {
            let nice = state.config().outbox.nice;
            delivery_thread::DeliveryThread::spawn(outbox, nice)
                .map_err(|e| StartError::Other(format!("cannot start the delivery worker: {e}")))?
        } else {
            delivery_thread::DeliveryThread::on_this_runtime(outbox)
        };
        tracing::info!(%addr, "relaypacs listening");
        Ok(Self {
            addr,
            state,
            stop,
            task,
            sweeper,
            outbox,
            tls,
        })
    }

    /// Whether the server terminates TLS (`[tls]`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reload the TLS certificate and key now, as SIGHUP does: new
    /// connections get the new pair; on error the old one stays.
    ///
    /// # Errors
    /// [`tls::TlsError`] for an unreadable or invalid pair; `Ok` without
    /// `[tls]`.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        match &self.tls {
            Some((t, _)) => t.reload(),
            None => Ok(()),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (for tests and embedding).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Wait until the server stops by itself (it only does on error).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Stop accepting, let in-flight requests finish, record the stop.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        self.sweeper.abort();
        if let Some((_, hup)) = &self.tls {
            hup.abort();
        }
        // The worker finishes the attempt in progress (its state is durable
        // either way) and stops.
        self.outbox.stop(Duration::from_secs(10)).await;
        if let Ok(Err(e)) = self.task.await {
            tracing::error!(error = %e, "server ended with an error");
        }
        let ev = relaypacs_core::AuditEvent::new(
            "system",
            AuditAction::ApplicationStop,
            AuditOutcome::Success,
        );
        if let Err(e) = self.state.audit_event(ev).await {
            tracing::error!(error = %e, "could not record the application stop");
        }
        // The counts of denials still in memory, before the trail closes.
        if let Err(e) = self.state.pipeline().denials().flush().await {
            tracing::error!(error = %e, "could not record the denied-access summaries");
        }
        // Anchor the trail's head at stop (a cut tail is then detected).
        if let Err(e) = self.state.audit().close().await {
            tracing::error!(error = %e, "could not close the audit trail");
        }
    }
}

/// An error and its causes, `: `-separated (for a start error's text).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Expire idle sessions periodically.
async fn sweep(state: AppState) {
    let every = Duration::from_secs(state.config().http.sweep_interval_secs.max(1));
    // The first cleanup runs an hour after start.
    let mut last_s3_cleanup = std::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match state
            .pipeline()
            .expire_sessions(time::OffsetDateTime::now_utc())
            .await
        {
            Ok(gone) => {
                if !gone.is_empty() {
                    tracing::info!(count = gone.len(), "expired idle study sessions");
                }
            }
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
        }
        // S3 uploads neither sealed nor deleted (a crash between creating a
        // file's upload and recording the file), at most once an hour and
        // only when older than twice the session TTL: every session that
        // could still use them has expired by then. Safe on every instance
        // at once (see `abort_abandoned`).
        if let Some(s3) = state.s3_chunks()
            && last_s3_cleanup.elapsed() >= Duration::from_secs(3600)
        {
            last_s3_cleanup = std::time::Instant::now();
            let ttl = state.config().limits.session_ttl_secs;
            match s3
                .abort_abandoned(Duration::from_secs(ttl.saturating_mul(2)))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "aborted abandoned S3 uploads"),
                Err(e) => tracing::error!(error = %e, "S3 upload cleanup failed"),
            }
        }
        // Close the denied-access windows of past minutes (their summaries).
        if let Err(e) = state.pipeline().denials().flush().await {
            tracing::error!(error = %e, "could not record the denied-access summaries");
        }
    }
}

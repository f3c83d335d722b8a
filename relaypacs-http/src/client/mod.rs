//! The uploader behind `relaypacs upload` (feature `client`), reusable by
//! tests, benches and embedders:
//!
//! ```no_run
//! # async fn run() -> Result<(), relaypacs_http::client::ClientError> {
//! use relaypacs_http::client::{Credentials, UploadConfig, Uploader, progress::Silent};
//! let creds = Credentials::TokenFile("/home/rad/.relaypacs-token".into());
//! let up = Uploader::new(UploadConfig::new("https://relay.example.org", creds))?;
//! let summary = up.upload(&["/media/cdrom".into()], &Silent).await;
//! std::process::exit(summary.exit_code.into());
//! # }
//! ```
//!
//! What it does, in order:
//! 1. walks the paths and checks every file locally with the core's
//!    validator ([`relaypacs_core::dicom::validate_dicom`], the server's
//!    default limits): non-DICOM and hostile files are reported with the
//!    reason and never sent;
//! 2. groups the valid files by Study Instance UID and opens one study
//!    session per study (`POST /api/v1/studies`);
//! 3. sends each file with tus 1.0 (`POST /files` declaring the whole
//!    file's SHA-256, then `PATCH`es of `chunk_size` bytes, each with
//!    `Upload-Checksum: sha256 …`), at most `parallel` files at once;
//!    network errors, 5xx, 408, 423, 429 and a busy upload are retried
//!    with exponential backoff, learning the offset again by `HEAD`;
//! 4. completes each study (`POST /api/v1/studies/{id}/complete`) and,
//!    with `wait`, polls it until it is delivered or dead-lettered.
//!
//! A state file records each study's session and each file's upload URL
//! (keyed by server and file SHA-256 + size), so a run killed midway
//! resumes where the server says on the next run.

pub mod api;
pub mod cli;
pub mod progress;
pub mod scan;
pub mod state;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use relaypacs_core::dicom::DicomLimits;
use reqwest::{StatusCode, Url};
use serde::Serialize;
use serde_json::Value;

pub use api::{Credentials, Failure, RetryPolicy};
pub use progress::{Event, ProgressSink};
pub use scan::{Checked, LocalFile};

use state::{FileEntry, StateFile, StudyEntry, file_key, study_key};

/// Why a run stopped before its end. Each maps to an exit code.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Bad arguments or configuration, an unusable state file (exit 2).
    #[error("{0}")]
    Config(String),
    /// Login or token refresh refused (exit 3).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server could not be reached, after the retries (exit 4).
    #[error("server unreachable after retries: {0}")]
    Unreachable(String),
    /// The server answered with an error the run cannot go past (exit 1).
    #[error("{0}")]
    Server(String),
}

impl ClientError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Auth(_) => 3,
            Self::Unreachable(_) => 4,
            Self::Server(_) => 1,
        }
    }
}

/// Settings of an [`Uploader`].
#[derive(Clone, Debug)]
pub struct UploadConfig {
    /// The gateway's base URL.
    pub server: String,
    /// Who uploads.
    pub credentials: Credentials,
    /// Files sent at once (default 3; the server allows 4 PATCHes per user).
    pub parallel: usize,
    /// Bytes per PATCH (default 8 MiB; the server takes 64 KiB to 32 MiB).
    pub chunk_size: u64,
    /// The state file (default [`state::default_path`]).
    pub state_file: Option<PathBuf>,
    /// Wait for each completed study to be delivered (or dead-lettered).
    pub wait: bool,
    /// How long `wait` waits in all.
    pub wait_timeout: Duration,
    /// How often `wait` asks.
    pub poll_interval: Duration,
    /// Retries of failed requests.
    pub retry: RetryPolicy,
    /// The validator's limits (default: the server's defaults).
    pub dicom: DicomLimits,
    /// Extra trusted root certificates (PEM), e.g. a hospital's own CA;
    /// the system's roots are trusted too and certificates always checked.
    pub ca_file: Option<PathBuf>,
}

impl UploadConfig {
    /// The defaults for `server` and `credentials`.
    pub fn new(server: impl Into<String>, credentials: Credentials) -> Self {
        Self {
            server: server.into(),
            credentials,
            parallel: 3,
            chunk_size: 8 << 20,
            state_file: None,
            wait: false,
            wait_timeout: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            dicom: DicomLimits::default(),
            ca_file: None,
        }
    }
}

/// What a run did; the last [`Event`] (`summary`), and the exit code.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Files found under the paths.
    pub files_found: u64,
    /// Of those, valid DICOM.
    pub files_valid: u64,
    /// Files every byte of which is at the server, accepted.
    pub files_done: u64,
    /// Files refused by the local check (never sent).
    pub files_refused_local: u64,
    /// Files the server refused.
    pub files_refused_server: u64,
    /// Files left out without error (DICOMDIR, second copies).
    pub files_skipped: u64,
    /// Studies among the valid files.
    pub studies: u64,
    /// Studies completed (in the gateway's outbox).
    pub studies_completed: u64,
    /// Studies that could not be completed.
    pub studies_failed: u64,
    /// Studies delivered (`wait`).
    pub studies_delivered: u64,
    /// Studies dead-lettered (`wait`).
    pub studies_dead_lettered: u64,
    /// Studies still on their way when `wait` ran out.
    pub studies_wait_timed_out: u64,
    /// Bytes of the valid files.
    pub bytes_total: u64,
    /// Bytes this run put in PATCH bodies (retries included).
    pub bytes_sent: u64,
    /// Bytes the server already held from an earlier run.
    pub bytes_resumed: u64,
    /// Wall time of the run.
    pub elapsed_secs: f64,
    /// What stopped the run early, if anything.
    pub error: Option<String>,
    /// 0 all completed (delivered with `wait`); 1 some file or study
    /// refused; 2 usage or configuration; 3 authentication; 4 server
    /// unreachable; 5 dead-lettered; 6 `wait` ran out.
    pub exit_code: u8,
}

/// The exit codes, as `--help` and the README state them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  every file sent and every study completed (with --wait: delivered)
  1  some file refused (locally or by the server) or some study not completed
  2  usage or configuration error (bad arguments, no credentials, state file in use)
  3  authentication failed (login or token refresh refused)
  4  server unreachable after the retries
  5  with --wait: some study dead-lettered (delivery to the PACS failed)
  6  with --wait: some study not delivered before --wait-timeout";

/// The uploader. See the module docs.
#[derive(Debug)]
pub struct Uploader {
    config: UploadConfig,
    api: api::Api,
}

enum FileOutcome {
    Done { sop: String, upload: String },
    Refused,
    Stopped,
}

/// One run's shared state.
struct Run<'a> {
    sink: &'a dyn ProgressSink,
    state: tokio::sync::Mutex<StateFile>,
    permits: tokio::sync::Semaphore,
    summary: std::sync::Mutex<Summary>,
    stop: AtomicBool,
    fatal: std::sync::Mutex<Option<ClientError>>,
}

impl Run<'_> {
    fn count(&self, f: impl FnOnce(&mut Summary)) {
        f(&mut relaypacs_storage::fs::lock(&self.summary));
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Stop the run for `e` (the first reason wins).
    fn fail(&self, e: ClientError) {
        let mut f = relaypacs_storage::fs::lock(&self.fatal);
        if f.is_none() {
            *f = Some(e);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Change the state and write it durably; a write failure stops the
    /// run (resuming would no longer be possible).
    async fn update_state(&self, f: impl FnOnce(&mut state::StateData)) {
        let mut st = self.state.lock().await;
        f(&mut st.data);
        let snapshot = StateFile::save_bytes(&st.data);
        let path = st.path().to_path_buf();
        let res = match snapshot {
            Ok(bytes) => tokio::task::spawn_blocking(move || state::write_durable(&path, &bytes))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(e) => Err(e),
        };
        drop(st);
        if let Err(e) = res {
            self.fail(ClientError::Config(format!(
                "cannot write the state file: {e}"
            )));
        }
    }

    fn refused(&self, path: &str, by: &'static str, code: &str, reason: String) {
        self.count(|s| {
            if by == "local" {
                s.files_refused_local += 1;
            } else {
                s.files_refused_server += 1;
            }
        });
        self.sink.event(&Event::FileRefused {
            path: path.to_owned(),
            by,
            code: code.to_owned(),
            reason,
        });
    }
}

impl StateFile {
    fn save_bytes(data: &state::StateData) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec_pretty(data).map_err(std::io::Error::other)
    }
}

impl Uploader {
    /// An uploader with `config`.
    ///
    /// # Errors
    /// [`ClientError::Config`] for a bad server URL or settings.
    pub fn new(config: UploadConfig) -> Result<Self, ClientError> {
        if !(1..=16).contains(&config.parallel) {
            return Err(ClientError::Config("parallel must be 1 to 16".into()));
        }
        if !((64 << 10)..=(32 << 20)).contains(&config.chunk_size) {
            return Err(ClientError::Config(
                "the chunk size must be 64 KiB to 32 MiB".into(),
            ));
        }
        let api = api::Api::new(
            &config.server,
            config.credentials.clone(),
            config.retry.clone(),
            config.ca_file.as_deref(),
        )?;
        Ok(Self { config, api })
    }

    /// The API client (for callers that want to look at what was sent).
    pub fn api(&self) -> &api::Api {
        &self.api
    }

    /// Send every DICOM file under `paths`, reporting to `sink`, and
    /// return the summary (also sent to `sink` as the last event). Never
    /// fails as such: what stopped the run is in [`Summary::error`] and
    /// [`Summary::exit_code`].
    pub async fn upload(&self, paths: &[PathBuf], sink: &dyn ProgressSink) -> Summary {
        let started = Instant::now();
        let (mut summary, fatal) = self.run(paths, sink).await;
        summary.exit_code = match &fatal {
            Some(e) => e.exit_code(),
            None if summary.studies_dead_lettered > 0 => 5,
            None if summary.studies_wait_timed_out > 0 => 6,
            None if summary.files_refused_local
                + summary.files_refused_server
                + summary.studies_failed
                > 0 =>
            {
                1
            }
            None => 0,
        };
        summary.error = fatal.map(|e| e.to_string());
        summary.elapsed_secs = started.elapsed().as_secs_f64();
        sink.event(&Event::Summary(summary.clone()));
        summary
    }

    async fn run(
        &self,
        paths: &[PathBuf],
        sink: &dyn ProgressSink,
    ) -> (Summary, Option<ClientError>) {
        let bare = |e: ClientError| (Summary::default(), Some(e));
        let (files, unreadable) = match scan::walk(paths) {
            Ok(w) => w,
            Err(e) => return bare(ClientError::Config(e)),
        };
        let state_path = match &self.config.state_file {
            Some(p) => p.clone(),
            None => match state::default_path() {
                Some(p) => p,
                None => {
                    return bare(ClientError::Config(
                        "no $XDG_STATE_HOME or $HOME for the state file: pass --state FILE".into(),
                    ));
                }
            },
        };
        let state = match StateFile::open(&state_path) {
            Ok(s) => s,
            Err(e) => return bare(e),
        };
        let run = Run {
            sink,
            state: tokio::sync::Mutex::new(state),
            permits: tokio::sync::Semaphore::new(self.config.parallel),
            summary: std::sync::Mutex::new(Summary::default()),
            stop: AtomicBool::new(false),
            fatal: std::sync::Mutex::new(None),
        };
        run.count(|s| s.files_found = (files.len() + unreadable.len()) as u64);
        for (p, reason) in unreadable {
            run.refused(&p.display().to_string(), "local", scan::UNREADABLE, reason);
        }
        // 1. The local check (reads and hashes every file), a few at once.
        let limits = &self.config.dicom;
        let checked: Vec<Checked> = futures::stream::iter(files)
            .map(|p| {
                let limits = limits.clone();
                async move {
                    let p2 = p.clone();
                    tokio::task::spawn_blocking(move || scan::check_file(&p2, &limits))
                        .await
                        .unwrap_or_else(|e| Checked::Refused {
                            path: p,
                            size: 0,
                            code: scan::UNREADABLE.into(),
                            reason: format!("check failed: {e}"),
                        })
                }
            })
            .buffered(self.config.parallel.clamp(2, 4))
            .collect()
            .await;
        let mut groups: BTreeMap<String, Vec<LocalFile>> = BTreeMap::new();
        let mut seen: HashMap<(String, u64), PathBuf> = HashMap::new();
        for c in checked {
            match c {
                Checked::Valid(f) => {
                    if let Some(first) = seen.get(&(f.sha256.to_hex(), f.size)) {
                        run.count(|s| s.files_skipped += 1);
                        sink.event(&Event::FileSkipped {
                            path: f.path.display().to_string(),
                            reason: format!("same content as {}", first.display()),
                        });
                        continue;
                    }
                    seen.insert((f.sha256.to_hex(), f.size), f.path.clone());
                    run.count(|s| {
                        s.files_valid += 1;
                        s.bytes_total += f.size;
                    });
                    groups
                        .entry(f.dicom.study_instance_uid.as_str().to_owned())
                        .or_default()
                        .push(f);
                }
                Checked::Refused {
                    path, code, reason, ..
                } => run.refused(&path.display().to_string(), "local", &code, reason),
                Checked::Skipped { path, reason } => {
                    run.count(|s| s.files_skipped += 1);
                    sink.event(&Event::FileSkipped {
                        path: path.display().to_string(),
                        reason,
                    });
                }
            }
        }
        run.count(|s| s.studies = groups.len() as u64);
        let (valid, bytes) = {
            let s = relaypacs_storage::fs::lock(&run.summary);
            (s.files_valid, s.bytes_total)
        };
        sink.event(&Event::Scanned {
            files: relaypacs_storage::fs::lock(&run.summary).files_found,
            valid,
            bytes,
            studies: groups.len() as u64,
        });
        let finish = |run: Run<'_>| {
            let s = relaypacs_storage::fs::lock(&run.summary).clone();
            let fatal = relaypacs_storage::fs::lock(&run.fatal).take();
            (s, fatal)
        };
        if groups.is_empty() {
            return finish(run);
        }
        // 2. Credentials, before any study is opened.
        if let Err(f) = self.api.authenticate(sink).await {
            run.fail(f.into_client_error("log in"));
            return finish(run);
        }
        // 3. Studies (each with its files), a few at once; file uploads
        // share the `parallel` permits.
        let completed: Vec<String> = futures::stream::iter(groups)
            .map(|(uid, files)| self.send_study(&run, uid, files))
            .buffer_unordered(self.config.parallel)
            .filter_map(|s| async move { s })
            .collect()
            .await;
        // 4. Delivery.
        if self.config.wait && !run.stopped() && !completed.is_empty() {
            let deadline = Instant::now() + self.config.wait_timeout;
            futures::stream::iter(completed)
                .map(|sid| self.wait_delivered(&run, sid, deadline))
                .buffer_unordered(8)
                .collect::<Vec<()>>()
                .await;
        }
        finish(run)
    }

    /// One study: its session, its files, its completion. The session id
    /// when completed.
    async fn send_study(
        &self,
        run: &Run<'_>,
        uid: String,
        files: Vec<LocalFile>,
    ) -> Option<String> {
        if run.stopped() {
            return None;
        }
        let sink = run.sink;
        let server = self.api.server().to_owned();
        let skey = study_key(&server, &uid);
        let known = run.state.lock().await.data.studies.get(&skey).cloned();
        let mut session = None;
        let mut resumed = false;
        // The resumed session's files as the server has them, by SHA-256:
        // upload URL and whether it is complete and valid.
        let mut held: HashMap<String, (String, bool)> = HashMap::new();
        if let Some(e) = known {
            match self.api.study_files(&e.session, sink).await {
                Ok(Some((view, list))) if view["state"]["state"] == "open" => {
                    for f in &list {
                        if let (Some(sha), Some(url)) =
                            (f["sha256"].as_str(), f["upload_url"].as_str())
                        {
                            held.insert(sha.to_owned(), (url.to_owned(), f["state"] == "valid"));
                        }
                    }
                    session = Some(e.session);
                    resumed = true;
                }
                Ok(Some((_, list))) => {
                    // Completed by an earlier run that was stopped before it
                    // could record so: every file is in it, valid.
                    let held: HashSet<&str> = list
                        .iter()
                        .filter(|f| f["state"] == "valid")
                        .filter_map(|f| f["sha256"].as_str())
                        .collect();
                    let all = files
                        .iter()
                        .all(|f| held.contains(f.sha256.to_hex().as_str()));
                    self.forget_session(run, &skey, &e.session).await;
                    if all {
                        run.count(|s| {
                            s.studies_completed += 1;
                            s.files_done += files.len() as u64;
                            s.bytes_resumed += files.iter().map(|f| f.size).sum::<u64>();
                        });
                        sink.event(&Event::StudyCompleted {
                            study_instance_uid: uid,
                            session: e.session.clone(),
                            files: files.len() as u64,
                        });
                        return Some(e.session);
                    }
                }
                Ok(None) => self.forget_session(run, &skey, &e.session).await,
                Err(f) => {
                    run.fail(f.into_client_error("read the study session"));
                    return None;
                }
            }
        }
        let session = match session {
            Some(s) => s,
            None => match self.api.create_study(sink).await {
                Ok(s) => {
                    run.update_state(|d| {
                        d.studies
                            .insert(skey.clone(), StudyEntry { session: s.clone() });
                    })
                    .await;
                    s
                }
                Err(f)
                    if f.status().is_some_and(|s| s.is_client_error())
                        && f.status() != Some(StatusCode::UNAUTHORIZED) =>
                {
                    run.count(|s| s.studies_failed += 1);
                    sink.event(&Event::StudyFailed {
                        study_instance_uid: uid,
                        session: None,
                        code: f.code().to_owned(),
                        reason: f.message(),
                    });
                    return None;
                }
                Err(f) => {
                    run.fail(f.into_client_error("open a study session"));
                    return None;
                }
            },
        };
        sink.event(&Event::StudyStarted {
            study_instance_uid: uid.clone(),
            session: session.clone(),
            files: files.len() as u64,
            bytes: files.iter().map(|f| f.size).sum(),
            resumed,
        });
        let outcomes: Vec<(usize, FileOutcome)> = futures::stream::iter(files.iter().enumerate())
            .map(|(i, f)| {
                let (session, held) = (&session, &held);
                async move { (i, self.send_file(run, session, held, f).await) }
            })
            .buffer_unordered(self.config.parallel)
            .collect()
            .await;
        if run.stopped()
            || outcomes
                .iter()
                .any(|(_, o)| matches!(o, FileOutcome::Stopped))
        {
            // Left as it is: the next run resumes it.
            return None;
        }
        let mut done: HashMap<String, usize> = HashMap::new();
        let mut ours: HashSet<String> = HashSet::new();
        for (i, o) in &outcomes {
            if let FileOutcome::Done { sop, upload } = o {
                done.insert(sop.clone(), *i);
                ours.insert(upload.clone());
            }
        }
        if done.is_empty() {
            let _ = self.api.abort(&session, sink).await;
            self.forget_session(run, &skey, &session).await;
            run.count(|s| s.studies_failed += 1);
            sink.event(&Event::StudyFailed {
                study_instance_uid: uid,
                session: Some(session),
                code: "RELAY_CLIENT_NO_FILE_ACCEPTED".into(),
                reason: "no file of the study was accepted".into(),
            });
            return None;
        }
        // Complete; a file refused now leaves the study and the next try
        // completes the rest; an upload not ours (a creation retried after
        // its answer was lost) is removed.
        let mut cleaned = false;
        for _ in 0..=files.len() + 1 {
            match self.api.complete(&session, sink).await {
                Ok(_) => {
                    self.forget_session(run, &skey, &session).await;
                    run.count(|s| s.studies_completed += 1);
                    sink.event(&Event::StudyCompleted {
                        study_instance_uid: uid,
                        session: session.clone(),
                        files: done.len() as u64,
                    });
                    return Some(session);
                }
                Err(f) if f.code() == "RELAY_UPLOAD_INCOMPLETE" && !cleaned => {
                    cleaned = true;
                    if let Ok(Some((_, list))) = self.api.study_files(&session, sink).await {
                        for file in list {
                            let Some(u) = file["upload_url"].as_str() else {
                                continue;
                            };
                            let Ok(url) = self.api.url(u) else { continue };
                            if file["state"] != "valid" && !ours.contains(url.as_str()) {
                                let _ = self.api.terminate(&url, sink).await;
                            }
                        }
                    }
                }
                Err(f)
                    if matches!(f.status().map(|s| s.as_u16()), Some(409 | 422))
                        && f.code() != "RELAY_SESSION_EMPTY"
                        && f.code() != "RELAY_UPLOAD_INCOMPLETE" =>
                {
                    let msg = f.message();
                    let which = done
                        .iter()
                        .find(|(sop, _)| msg.contains(sop.as_str()))
                        .map(|(sop, i)| (sop.clone(), *i));
                    let path = match &which {
                        Some((_, i)) => files[*i].path.display().to_string(),
                        None => format!("(a file of study {uid})"),
                    };
                    run.count(|s| s.files_done = s.files_done.saturating_sub(1));
                    run.refused(&path, "server", f.code(), msg);
                    match which {
                        Some((sop, _)) => {
                            done.remove(&sop);
                        }
                        None => break,
                    }
                    if done.is_empty() {
                        break;
                    }
                }
                Err(f) if f.retryable() || !matches!(f, Failure::Http { .. }) => {
                    run.fail(f.into_client_error("complete the study"));
                    return None;
                }
                Err(f) => {
                    run.count(|s| s.studies_failed += 1);
                    sink.event(&Event::StudyFailed {
                        study_instance_uid: uid,
                        session: Some(session),
                        code: f.code().to_owned(),
                        reason: f.message(),
                    });
                    return None;
                }
            }
        }
        run.count(|s| s.studies_failed += 1);
        sink.event(&Event::StudyFailed {
            study_instance_uid: uid,
            session: Some(session),
            code: "RELAY_CLIENT_NOT_COMPLETED".into(),
            reason: "the study could not be completed".into(),
        });
        None
    }

    /// Drop a session and its files from the state.
    async fn forget_session(&self, run: &Run<'_>, skey: &str, session: &str) {
        run.update_state(|d| {
            d.studies.remove(skey);
            d.files.retain(|_, f| f.session != session);
        })
        .await;
    }

    /// `HEAD`, retried; `Ok(None)` when the upload is gone.
    async fn head_retrying(
        &self,
        run: &Run<'_>,
        url: &Url,
        what: &str,
    ) -> Result<Option<api::UploadStatus>, Failure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.api.head(url).await {
                Ok(s) => return Ok(s),
                Err(f) if f.retryable() && attempt < self.config.retry.attempts => {
                    self.api.backoff(what, attempt, &f, run.sink).await;
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// One file: resume or create its upload, then PATCH it to the end.
    async fn send_file(
        &self,
        run: &Run<'_>,
        session: &str,
        held: &HashMap<String, (String, bool)>,
        f: &LocalFile,
    ) -> FileOutcome {
        let Ok(_permit) = run.permits.acquire().await else {
            return FileOutcome::Stopped;
        };
        if run.stopped() {
            return FileOutcome::Stopped;
        }
        let sink = run.sink;
        let path = f.path.display().to_string();
        let hex = f.sha256.to_hex();
        let key = file_key(self.api.server(), &hex, f.size);
        let what = format!("upload {path}");
        let give_up = |run: &Run<'_>, e: Failure| {
            run.fail(e.into_client_error(&what));
            FileOutcome::Stopped
        };
        // Already complete and valid in the resumed session: nothing to send.
        if let Some((u, true)) = held.get(&hex)
            && let Ok(url) = self.api.url(u)
        {
            run.count(|s| {
                s.bytes_resumed += f.size;
                s.files_done += 1;
            });
            run.update_state(|d| {
                d.files.remove(&key);
            })
            .await;
            sink.event(&Event::FileDone {
                path,
                session: session.to_owned(),
                sha256: hex,
                size: f.size,
                bytes_sent: 0,
                resumed_from: f.size,
            });
            return FileOutcome::Done {
                sop: f.dicom.sop_instance_uid.as_str().to_owned(),
                upload: url.to_string(),
            };
        }
        // Resume an upload an earlier run created in this session (from
        // the state, else from the session's own list: a run killed
        // between creating the upload and recording it).
        let known = run
            .state
            .lock()
            .await
            .data
            .files
            .get(&key)
            .filter(|e| e.session == session)
            .map(|e| e.upload_url.clone())
            .or_else(|| held.get(&hex).map(|(u, _)| u.clone()));
        let mut upload: Option<(Url, u64)> = None;
        if let Some(u) = known
            && let Ok(url) = self.api.url(&u)
        {
            match self.head_retrying(run, &url, &what).await {
                Ok(Some(st)) if st.length == f.size => upload = Some((url, st.offset)),
                Ok(_) => {
                    run.update_state(|d| {
                        d.files.remove(&key);
                    })
                    .await;
                }
                Err(e) => return give_up(run, e),
            }
        }
        let (url, mut offset) = match upload {
            Some(u) => u,
            None => {
                let name = scan::upload_name(&f.path);
                match self
                    .api
                    .create_upload(session, &name, f.size, &hex, sink)
                    .await
                {
                    Ok(url) => {
                        run.update_state(|d| {
                            d.files.insert(
                                key.clone(),
                                FileEntry {
                                    session: session.to_owned(),
                                    upload_url: url.to_string(),
                                    path: path.clone(),
                                },
                            );
                        })
                        .await;
                        (url, 0)
                    }
                    Err(e)
                        if e.status().is_some_and(|s| s.is_client_error())
                            && e.status() != Some(StatusCode::UNAUTHORIZED) =>
                    {
                        run.refused(&path, "server", e.code(), e.message());
                        return FileOutcome::Refused;
                    }
                    Err(e) => return give_up(run, e),
                }
            }
        };
        let resumed_from = offset;
        run.count(|s| s.bytes_resumed += offset);
        sink.event(&Event::FileStarted {
            path: path.clone(),
            session: session.to_owned(),
            size: f.size,
            offset,
        });
        let file = match std::fs::File::open(&f.path) {
            Ok(file) => Arc::new(file),
            Err(e) => {
                run.refused(&path, "local", scan::UNREADABLE, e.to_string());
                return FileOutcome::Refused;
            }
        };
        let mut sent = 0u64;
        let mut attempt = 0u32;
        while offset < f.size {
            if run.stopped() {
                return FileOutcome::Stopped;
            }
            let n = self.config.chunk_size.min(f.size - offset);
            let chunk = {
                let file = Arc::clone(&file);
                let at = offset;
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
                    file.read_exact_at(&mut buf, at)
                        .map(|()| bytes::Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    run.refused(&path, "local", scan::UNREADABLE, e.to_string());
                    return FileOutcome::Refused;
                }
            };
            sent += n;
            run.count(|s| s.bytes_sent += n);
            let in_flight = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let patch = self.api.patch(&url, offset, chunk, &in_flight);
            tokio::pin!(patch);
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let result = loop {
                tokio::select! {
                    r = &mut patch => break r,
                    _ = tick.tick() => sink.event(&Event::FileSending {
                        path: path.clone(),
                        session: session.to_owned(),
                        position: offset + in_flight.load(Ordering::Relaxed),
                    }),
                }
            };
            let failure = match result {
                Ok(new) => {
                    let delta = new.saturating_sub(offset);
                    offset = new;
                    attempt = 0;
                    sink.event(&Event::FileProgress {
                        path: path.clone(),
                        session: session.to_owned(),
                        offset,
                        delta,
                    });
                    continue;
                }
                Err(e) => e,
            };
            attempt += 1;
            let mismatch = failure.code() == "RELAY_OFFSET_MISMATCH";
            if !(failure.retryable() || mismatch) || attempt >= self.config.retry.attempts {
                if failure.retryable() || !matches!(failure, Failure::Http { .. }) {
                    return give_up(run, failure);
                }
                // Refused: the server removed the upload (or never will
                // take it); the study goes on without it.
                run.update_state(|d| {
                    d.files.remove(&key);
                })
                .await;
                run.refused(&path, "server", failure.code(), failure.message());
                return FileOutcome::Refused;
            }
            if !mismatch {
                self.api.backoff(&what, attempt, &failure, sink).await;
            }
            // Where does the server stand now?
            match self.head_retrying(run, &url, &what).await {
                Ok(Some(st)) => {
                    if st.offset > offset {
                        sink.event(&Event::FileProgress {
                            path: path.clone(),
                            session: session.to_owned(),
                            offset: st.offset,
                            delta: st.offset - offset,
                        });
                    }
                    offset = st.offset;
                }
                Ok(None) => {
                    run.update_state(|d| {
                        d.files.remove(&key);
                    })
                    .await;
                    run.refused(
                        &path,
                        "server",
                        failure.code(),
                        format!("the upload is gone at the server after: {failure}"),
                    );
                    return FileOutcome::Refused;
                }
                Err(e) => return give_up(run, e),
            }
        }
        run.count(|s| s.files_done += 1);
        // Done: a rerun learns it from the session's list, so the state
        // keeps only the uploads in progress (small, whatever the study).
        run.update_state(|d| {
            d.files.remove(&key);
        })
        .await;
        sink.event(&Event::FileDone {
            path,
            session: session.to_owned(),
            sha256: hex,
            size: f.size,
            bytes_sent: sent,
            resumed_from,
        });
        FileOutcome::Done {
            sop: f.dicom.sop_instance_uid.as_str().to_owned(),
            upload: url.to_string(),
        }
    }

    /// Poll a completed study until it is delivered or dead-lettered, or
    /// `deadline` passes.
    async fn wait_delivered(&self, run: &Run<'_>, session: String, deadline: Instant) {
        let sink = run.sink;
        let mut last;
        loop {
            match self.api.study(&session, None, sink).await {
                Ok(Some(v)) => {
                    let st = &v["state"];
                    match st["state"].as_str().unwrap_or_default() {
                        "delivered" => {
                            run.count(|s| s.studies_delivered += 1);
                            sink.event(&Event::StudyDelivered {
                                session,
                                verified: st["verified"].as_str().unwrap_or("content").to_owned(),
                                sink: st["sink"].as_str().unwrap_or_default().to_owned(),
                            });
                            return;
                        }
                        "dead_letter" => {
                            run.count(|s| s.studies_dead_lettered += 1);
                            sink.event(&Event::StudyDeadLettered {
                                session,
                                reason: st["reason"].as_str().unwrap_or_default().to_owned(),
                            });
                            return;
                        }
                        other => last = other.to_owned(),
                    }
                }
                Ok(None) => {
                    run.fail(ClientError::Server(format!(
                        "study session {session} is gone while waiting for delivery"
                    )));
                    return;
                }
                Err(f) => {
                    run.fail(f.into_client_error("wait for delivery"));
                    return;
                }
            }
            if Instant::now() >= deadline {
                run.count(|s| s.studies_wait_timed_out += 1);
                sink.event(&Event::WaitTimedOut {
                    session,
                    state: last,
                });
                return;
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }
}

/// The study view's state name (`open`, `forwarding`, `delivered`,
/// `dead_letter`).
pub fn state_name(view: &Value) -> &str {
    view["state"]["state"].as_str().unwrap_or_default()
}

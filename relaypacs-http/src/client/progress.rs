//! What an upload reports while it runs: [`Event`]s pushed to a
//! [`ProgressSink`]. Three sinks come with the CLI: JSON lines for
//! scripts, `indicatif` bars on a terminal, and plain lines otherwise.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::Summary;

/// One thing that happened during an upload. Serialised as one JSON
/// object with an `event` field (`--json`).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The local check is over: what will be sent.
    Scanned {
        /// Files found.
        files: u64,
        /// Of those, valid DICOM to send.
        valid: u64,
        /// Bytes of the valid files.
        bytes: u64,
        /// Studies they belong to.
        studies: u64,
    },
    /// A file that will not be sent (`by`: `local`), or that the server
    /// refused (`by`: `server`).
    FileRefused {
        /// The file.
        path: String,
        /// `local` or `server`.
        by: &'static str,
        /// Stable code (`RELAY_…`).
        code: String,
        /// Why.
        reason: String,
    },
    /// A file left out without error (a DICOMDIR, a second copy).
    FileSkipped {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A study's session is open (or resumed) and its files start.
    StudyStarted {
        /// Study Instance UID.
        study_instance_uid: String,
        /// The session id.
        session: String,
        /// Files to send.
        files: u64,
        /// Their bytes.
        bytes: u64,
        /// Whether the session is one an earlier run opened.
        resumed: bool,
    },
    /// A file's upload starts, at `offset` (the server's, when resumed).
    FileStarted {
        /// The file.
        path: String,
        /// Study session.
        session: String,
        /// Size.
        size: u64,
        /// Where the upload starts.
        offset: u64,
    },
    /// Bytes acknowledged (not in `--json` output).
    FileProgress {
        /// The file.
        path: String,
        /// Study session.
        session: String,
        /// The server's offset now.
        offset: u64,
        /// Bytes newly acknowledged.
        delta: u64,
    },
    /// Bytes of a chunk handed to the connection, not yet acknowledged
    /// (not in `--json` output; for progress bars).
    FileSending {
        /// The file.
        path: String,
        /// Study session.
        session: String,
        /// The acknowledged offset plus the bytes of the chunk in flight.
        position: u64,
    },
    /// A request failed in a way worth retrying; the next try follows.
    Retry {
        /// What was being done.
        what: String,
        /// The try that failed (1 = the first).
        attempt: u32,
        /// Wait before the next, in milliseconds.
        delay_ms: u64,
        /// Why it failed.
        error: String,
    },
    /// Every byte of a file is at the server and it was accepted.
    FileDone {
        /// The file.
        path: String,
        /// Study session.
        session: String,
        /// Whole-file SHA-256 (hex).
        sha256: String,
        /// Size.
        size: u64,
        /// Bytes this run sent for it (PATCH bodies, retries included).
        bytes_sent: u64,
        /// Bytes the server already held when this run started it.
        resumed_from: u64,
    },
    /// The study was completed: the gateway holds it and will deliver it.
    StudyCompleted {
        /// Study Instance UID.
        study_instance_uid: String,
        /// The session id.
        session: String,
        /// Files in it.
        files: u64,
    },
    /// The study could not be completed.
    StudyFailed {
        /// Study Instance UID.
        study_instance_uid: String,
        /// The session id, if one was opened.
        session: Option<String>,
        /// Stable code.
        code: String,
        /// Why.
        reason: String,
    },
    /// The PACS holds the study (`--wait`).
    StudyDelivered {
        /// The session id.
        session: String,
        /// `content` or `presence-only` (see the README, "What delivered means").
        verified: String,
        /// The sink(s) it went to.
        sink: String,
    },
    /// Delivery gave up; an administrator must act (`--wait`).
    StudyDeadLettered {
        /// The session id.
        session: String,
        /// The PACS's reason.
        reason: String,
    },
    /// `--wait` ran out of time before the study was delivered.
    WaitTimedOut {
        /// The session id.
        session: String,
        /// The state it was last seen in.
        state: String,
    },
    /// The last event: the counts and the exit code.
    Summary(Summary),
}

/// Where events go. Called from the upload's task; keep it quick.
pub trait ProgressSink: Send + Sync + std::fmt::Debug {
    /// One event.
    fn event(&self, event: &Event);
}

/// A sink that drops everything.
#[derive(Debug, Default)]
pub struct Silent;

impl ProgressSink for Silent {
    fn event(&self, _: &Event) {}
}

/// One JSON object per line on standard output (`--json`), every event
/// but [`Event::FileProgress`] and [`Event::FileSending`].
#[derive(Debug, Default)]
pub struct JsonLines;

impl ProgressSink for JsonLines {
    fn event(&self, event: &Event) {
        if matches!(
            event,
            Event::FileProgress { .. } | Event::FileSending { .. }
        ) {
            return;
        }
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            // A closed pipe is not the upload's failure.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Plain lines on standard error (no terminal, no `--json`).
#[derive(Debug, Default)]
pub struct PlainLines;

impl ProgressSink for PlainLines {
    fn event(&self, event: &Event) {
        if let Some(line) = describe(event) {
            eprintln!("{line}");
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
}

/// The words for an event (`None` for progress).
pub fn describe(event: &Event) -> Option<String> {
    Some(match event {
        Event::Scanned {
            files,
            valid,
            bytes,
            studies,
        } => format!(
            "{files} file(s) found: {valid} valid DICOM ({}) in {studies} study(ies)",
            mib(*bytes)
        ),
        Event::FileRefused {
            path,
            by,
            code,
            reason,
        } => {
            let who = if *by == "local" {
                "not sent"
            } else {
                "refused by the server"
            };
            format!("{path}: {who}: {reason} ({code})")
        }
        Event::FileSkipped { path, reason } => format!("{path}: skipped: {reason}"),
        Event::StudyStarted {
            study_instance_uid,
            session,
            files,
            bytes,
            resumed,
        } => format!(
            "study {study_instance_uid}: {} session {session}, {files} file(s), {}",
            if *resumed { "resuming" } else { "opened" },
            mib(*bytes)
        ),
        Event::FileStarted { .. } | Event::FileProgress { .. } | Event::FileSending { .. } => {
            return None;
        }
        Event::Retry {
            what,
            attempt,
            delay_ms,
            error,
        } => format!("{what}: try {attempt} failed ({error}); retrying in {delay_ms} ms"),
        Event::FileDone {
            path,
            size,
            resumed_from,
            ..
        } => {
            if *resumed_from > 0 {
                format!(
                    "{path}: sent ({}, resumed at {})",
                    mib(*size),
                    mib(*resumed_from)
                )
            } else {
                format!("{path}: sent ({})", mib(*size))
            }
        }
        Event::StudyCompleted {
            study_instance_uid,
            session,
            files,
        } => format!(
            "study {study_instance_uid}: completed ({files} file(s), session {session}); the gateway delivers it"
        ),
        Event::StudyFailed {
            study_instance_uid,
            code,
            reason,
            ..
        } => format!("study {study_instance_uid}: not completed: {reason} ({code})"),
        Event::StudyDelivered {
            session,
            verified,
            sink,
        } => format!("session {session}: delivered to {sink} (verified: {verified})"),
        Event::StudyDeadLettered { session, reason } => {
            format!("session {session}: delivery failed (dead letter): {reason}")
        }
        Event::WaitTimedOut { session, state } => {
            format!("session {session}: still {state} when --wait ran out")
        }
        Event::Summary(s) => format!(
            "{} of {} file(s) sent ({} sent this run, {} already at the server), {} refused locally, {} by the server; \
             {} study(ies) completed, {} delivered, {} dead-lettered; exit {}",
            s.files_done,
            s.files_found,
            mib(s.bytes_sent),
            mib(s.bytes_resumed),
            s.files_refused_local,
            s.files_refused_server,
            s.studies_completed,
            s.studies_delivered,
            s.studies_dead_lettered,
            s.exit_code
        ),
    })
}

/// `indicatif` bars on standard error: the total, one per study being
/// sent, one per file being sent (MB/s and time left on each). Bytes in
/// flight move the bars; a chunk that failed moves them back to the
/// server's offset.
#[derive(Debug)]
pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    studies: Mutex<HashMap<String, ProgressBar>>,
    /// Each file's bar and the position it shows.
    files: Mutex<HashMap<String, (ProgressBar, u64)>>,
}

const BAR: &str = "{prefix:>6.bold} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {wide_msg}";

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Bars {
    /// Bars drawn on standard error.
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0));
        total.set_style(style());
        total.set_prefix("total");
        total.enable_steady_tick(Duration::from_millis(250));
        Self {
            multi,
            total,
            studies: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, len: u64, prefix: &str, msg: String) -> ProgressBar {
        let b = self
            .multi
            .insert_before(&self.total, ProgressBar::new(len).with_style(style()));
        b.set_prefix(prefix.to_owned());
        b.set_message(msg);
        b
    }

    /// Show `position` for the file, moving its study's bar and the total
    /// by the difference (back, too).
    fn show(&self, path: &str, session: &str, position: u64) {
        let mut files = relaypacs_storage::fs::lock(&self.files);
        let Some((bar, shown)) = files.get_mut(path) else {
            return;
        };
        let old = *shown;
        *shown = position;
        bar.set_position(position);
        drop(files);
        let studies = relaypacs_storage::fs::lock(&self.studies);
        let mut bars = vec![&self.total];
        bars.extend(studies.get(session));
        for b in bars {
            if position >= old {
                b.inc(position - old);
            } else {
                b.set_position(b.position().saturating_sub(old - position));
            }
        }
    }

    fn remove_file(&self, path: &str) {
        if let Some((b, _)) = relaypacs_storage::fs::lock(&self.files).remove(path) {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
    }

    fn println(&self, event: &Event) {
        if let Some(line) = describe(event) {
            // Drawing problems are not the upload's.
            let _ = self.multi.println(line);
        }
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(BAR)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn short(s: &str) -> String {
    let n = s.chars().count();
    if n <= 40 {
        s.to_owned()
    } else {
        let tail: String = s.chars().skip(n - 39).collect();
        format!("…{tail}")
    }
}

impl ProgressSink for Bars {
    fn event(&self, event: &Event) {
        match event {
            Event::Scanned { bytes, .. } => {
                self.total.set_length(*bytes);
                self.println(event);
            }
            Event::StudyStarted {
                study_instance_uid,
                session,
                bytes,
                ..
            } => {
                let b = self.bar(*bytes, "study", short(study_instance_uid));
                relaypacs_storage::fs::lock(&self.studies).insert(session.clone(), b);
            }
            Event::FileStarted {
                path,
                session,
                size,
                offset,
            } => {
                let b = self.bar(*size, "file", short(path));
                relaypacs_storage::fs::lock(&self.files).insert(path.clone(), (b.clone(), 0));
                self.show(path, session, *offset);
                // Bytes the server already held are not this run's speed.
                b.reset_eta();
            }
            Event::FileProgress {
                path,
                session,
                offset,
                ..
            } => self.show(path, session, *offset),
            Event::FileSending {
                path,
                session,
                position,
            } => self.show(path, session, *position),
            Event::FileDone { path, .. } => self.remove_file(path),
            Event::FileRefused { path, .. } => {
                self.remove_file(path);
                self.println(event);
            }
            Event::StudyCompleted { session, .. }
            | Event::StudyFailed {
                session: Some(session),
                ..
            } => {
                if let Some(b) = relaypacs_storage::fs::lock(&self.studies).remove(session) {
                    b.finish_and_clear();
                    self.multi.remove(&b);
                }
                self.println(event);
            }
            Event::Summary(_) => {
                self.total.finish_and_clear();
                self.println(event);
            }
            other => self.println(other),
        }
    }
}

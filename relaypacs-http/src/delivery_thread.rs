//! Where the delivery worker runs: on a thread of its own, below the
//! requests' CPU priority, so that acknowledging an upload comes first
//! when the cores are busy and delivery still gets every idle cycle; or,
//! when it would share sockets with requests, on the requests' runtime.
//!
//! On its own thread the worker ([`relaypacs_core::Outbox`]) runs on a
//! single-thread tokio runtime whose OS thread's nice value is raised by
//! `[outbox] nice` (Linux: a thread's own; the threads it starts, its
//! blocking pool for the sink's file work, inherit it). That is only done
//! when nothing the worker opens is shared with requests
//! ([`Config::delivery_runs_apart`](crate::Config::delivery_runs_apart)):
//! a socket belongs to the runtime that opens it, so a PostgreSQL
//! connection or an S3 connection the worker opened and a request then
//! reused would be served by the worker's thread. SQLite's connections
//! have worker threads of their own, all started when the state opens
//! (see `relaypacs_storage::SqlState::connect`), so none inherits the
//! lower priority. The one client both still share is the DICOMweb
//! report source's: a report the study view fetches over a connection
//! the worker opened is served by the worker's thread (it works, at the
//! worker's priority).

use std::time::Duration;

use relaypacs_core::Outbox;
use tokio::sync::oneshot;

/// The running worker, on a thread of its own or as a task: stopped
/// between steps, or dropped mid-step after a grace period.
#[derive(Debug)]
pub(crate) struct DeliveryThread {
    stop: oneshot::Sender<()>,
    kill: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

/// The worker's side of a [`DeliveryThread`]'s channels.
struct WorkerEnd {
    stopped: oneshot::Receiver<()>,
    killed: oneshot::Receiver<()>,
    done: oneshot::Sender<()>,
}

impl WorkerEnd {
    /// Run `outbox` until it is stopped (between steps) or killed (where
    /// it waits), then say so.
    async fn run(self, outbox: Outbox) {
        let Self {
            stopped,
            killed,
            done,
        } = self;
        tokio::select! {
            () = outbox.run(async { let _ = stopped.await; }) => {}
            _ = killed => {}
        }
        let _ = done.send(());
    }
}

impl DeliveryThread {
    /// Both ends of the channels between the server and the worker.
    fn channels() -> (Self, WorkerEnd) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (kill, killed) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel::<()>();
        let worker = WorkerEnd {
            stopped,
            killed,
            done: done_tx,
        };
        (Self { stop, kill, done }, worker)
    }

    /// Start `outbox` on a thread named `relay-outbox`, `nice` steps
    /// below the calling thread's priority (0: the same).
    pub(crate) fn spawn(outbox: Outbox, nice: i32) -> std::io::Result<Self> {
        let (this, worker) = Self::channels();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("relay-outbox")
            .build()?;
        std::thread::Builder::new()
            .name("relay-outbox".into())
            .spawn(move || {
                if nice != 0
                    && let Err(e) = lower_priority(nice)
                {
                    // Delivery then competes with requests as equals: slower
                    // answers under load, nothing lost.
                    tracing::warn!(error = %e, nice, "could not lower the delivery worker's priority");
                }
                rt.block_on(worker.run(outbox));
            })?;
        Ok(this)
    }

    /// Run `outbox` as a task of the calling runtime, stopped the same way.
    pub(crate) fn on_this_runtime(outbox: Outbox) -> Self {
        let (this, worker) = Self::channels();
        tokio::spawn(worker.run(outbox));
        this
    }

    /// Stop the worker after the step in progress; past `grace`, drop the
    /// step where it waits (its state is durable either way: the entry
    /// is attempted again once its lease runs out, at once on a private
    /// state).
    pub(crate) async fn stop(self, grace: Duration) {
        let Self { stop, kill, done } = self;
        let _ = stop.send(());
        let mut done = done;
        if tokio::time::timeout(grace, &mut done).await.is_err() {
            let _ = kill.send(());
            let _ = done.await;
        }
    }
}

/// Raise the calling thread's nice value by `by`.
#[cfg(target_os = "linux")]
fn lower_priority(by: i32) -> rustix::io::Result<()> {
    // setpriority(PRIO_PROCESS, tid) sets one thread's nice value on Linux
    // (not the whole process's): written here because neither std nor
    // tokio sets a thread's priority.
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid))?;
    rustix::process::setpriority_process(Some(tid), now.saturating_add(by).min(19))
}

/// Elsewhere a process-wide setting only: left as it is.
#[cfg(not(target_os = "linux"))]
fn lower_priority(_by: i32) -> std::io::Result<()> {
    Ok(())
}

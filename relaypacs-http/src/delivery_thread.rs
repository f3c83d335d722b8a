//! The delivery worker on a thread of its own, below the requests' CPU
//! priority: acknowledging an upload comes first when the cores are busy,
//! and delivery still gets every idle cycle.
//!
//! The worker ([`relaypacs_core::Outbox`]) runs on a single-thread tokio
//! runtime of its own, on an OS thread whose nice value is raised by
//! `[outbox] nice` (Linux: a thread's own; the threads it starts, its
//! blocking pool for the sink's file work, inherit it). Its SQL goes
//! through the same pool as the requests'; the SQLite connections' worker
//! threads are all started when the state opens (see
//! `relaypacs_storage::SqlState::connect`), so none inherits this
//! priority.

use std::time::Duration;

use relaypacs_core::Outbox;
use tokio::sync::oneshot;

/// A worker running on its own thread: stopped between steps, or dropped
/// mid-step after a grace period.
#[derive(Debug)]
pub(crate) struct DeliveryThread {
    stop: oneshot::Sender<()>,
    kill: oneshot::Sender<()>,
    done: oneshot::Receiver<()>,
}

impl DeliveryThread {
    /// Start `outbox` on a thread named `relaypacs-outbox`, `nice` steps
    /// below this process's priority (0: the same).
    pub(crate) fn spawn(outbox: Outbox, nice: i32) -> std::io::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (kill, killed) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("relaypacs-outbox")
            .build()?;
        std::thread::Builder::new()
            .name("relaypacs-outbox".into())
            .spawn(move || {
                if nice != 0
                    && let Err(e) = lower_priority(nice)
                {
                    // Delivery then competes with requests as equals: slower
                    // answers under load, nothing lost.
                    tracing::warn!(error = %e, nice, "could not lower the delivery worker's priority");
                }
                rt.block_on(async {
                    tokio::select! {
                        () = outbox.run(async { let _ = stopped.await; }) => {}
                        _ = killed => {}
                    }
                });
                let _ = done_tx.send(());
            })?;
        Ok(Self { stop, kill, done })
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

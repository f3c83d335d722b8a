//! Per-user admission: parallel PATCH permits and open event streams, this
//! process's own. Counters only: no byte range is locked here (the
//! pipeline reserves ranges), and the cap of unfinished uploads is the
//! pipeline's (`Pipeline::add_file_capped`), counted in the state database
//! on every gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use relaypacs_storage::fs::lock;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Per-user admission counters. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Admission {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Per-user PATCH permits.
    patches: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per-user open event streams.
    streams: Mutex<HashMap<String, usize>>,
}

/// One open event stream of a user; the slot is freed when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    admission: Admission,
    user: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.admission.inner.streams);
        if let Some(n) = m.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl Admission {
    /// One of `user`'s `max` parallel PATCH permits, or `None` when all
    /// are in use. The permit is returned when dropped.
    pub fn patch_permit(&self, user: &str, max: usize) -> Option<OwnedSemaphorePermit> {
        let sem = lock(&self.inner.patches)
            .entry(user.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(max)))
            .clone();
        sem.try_acquire_owned().ok()
    }

    /// One of `user`'s `max` event stream slots, or `None` when all are
    /// open.
    pub fn open_stream(&self, user: &str, max: usize) -> Option<StreamSlot> {
        let mut m = lock(&self.inner.streams);
        let n = m.entry(user.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            admission: self.clone(),
            user: user.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn permits_and_stream_slots_are_returned_when_dropped() {
        let a = Admission::default();
        let p1 = a.patch_permit("ann", 1).unwrap();
        assert!(a.patch_permit("ann", 1).is_none());
        drop(p1);
        assert!(a.patch_permit("ann", 1).is_some());

        let s = a.open_stream("ann", 1).unwrap();
        assert!(a.open_stream("ann", 1).is_none());
        drop(s);
        assert!(a.open_stream("ann", 1).is_some());
    }
}

//! Per-user admission: parallel PATCH permits, open event streams and
//! unfinished uploads. Counters only: no byte range is locked here (the
//! pipeline reserves ranges).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use relaypacs_core::SessionId;
use relaypacs_storage::fs::lock;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upload_id::UploadId;

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
    /// Per-user unfinished uploads.
    open_uploads: Mutex<HashMap<String, HashSet<UploadId>>>,
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

    /// How many unfinished uploads `user` has.
    pub fn open_uploads(&self, user: &str) -> usize {
        lock(&self.inner.open_uploads)
            .get(user)
            .map_or(0, HashSet::len)
    }

    /// Count `upload` as one of `user`'s unfinished uploads.
    pub fn track_upload(&self, user: &str, upload: UploadId) {
        lock(&self.inner.open_uploads)
            .entry(user.to_string())
            .or_default()
            .insert(upload);
    }

    /// Replace every count of unfinished uploads (at start-up).
    pub fn set_open_uploads(&self, uploads: HashMap<String, HashSet<UploadId>>) {
        *lock(&self.inner.open_uploads) = uploads;
    }

    /// Stop counting `upload` (finished, refused or terminated).
    pub fn forget_upload(&self, upload: UploadId) {
        for set in lock(&self.inner.open_uploads).values_mut() {
            set.remove(&upload);
        }
    }

    /// Stop counting every upload of `session` (completed, aborted or
    /// expired).
    pub fn forget_session(&self, session: SessionId) {
        for set in lock(&self.inner.open_uploads).values_mut() {
            set.retain(|u| u.session() != session);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use relaypacs_core::FileId;

    #[test]
    fn counts_and_forgets_by_typed_id() {
        let a = Admission::default();
        let (s1, s2) = (SessionId::random(), SessionId::random());
        let u1 = UploadId::new(s1, FileId::random());
        let u2 = UploadId::new(s1, FileId::random());
        let u3 = UploadId::new(s2, FileId::random());
        for u in [u1, u2, u3] {
            a.track_upload("ann", u);
        }
        assert_eq!(a.open_uploads("ann"), 3);
        a.forget_upload(u2);
        assert_eq!(a.open_uploads("ann"), 2);
        a.forget_session(s1);
        assert_eq!(a.open_uploads("ann"), 1);
        assert_eq!(a.open_uploads("bob"), 0);

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

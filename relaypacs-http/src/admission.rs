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
    /// Per user: the unfinished uploads, and the slots reserved by
    /// creations in progress (one lock: check and reserve are one step).
    open_uploads: Mutex<HashMap<String, UserUploads>>,
}

#[derive(Debug, Default)]
struct UserUploads {
    ids: HashSet<UploadId>,
    reserved: usize,
}

impl UserUploads {
    fn count(&self) -> usize {
        self.ids.len() + self.reserved
    }
}

/// A slot for one new upload of a user, taken before the upload exists so
/// that concurrent creations cannot pass the cap together. [`commit`]
/// turns it into the upload; dropping it without releases the slot.
///
/// [`commit`]: UploadSlot::commit
#[derive(Debug)]
pub struct UploadSlot {
    admission: Admission,
    user: String,
    held: bool,
}

impl UploadSlot {
    /// The upload now exists: count it instead of the reservation.
    pub fn commit(mut self, upload: UploadId) {
        let mut m = lock(&self.admission.inner.open_uploads);
        let u = m.entry(self.user.clone()).or_default();
        u.reserved = u.reserved.saturating_sub(1);
        u.ids.insert(upload);
        self.held = false;
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        if self.held {
            let mut m = lock(&self.admission.inner.open_uploads);
            if let Some(u) = m.get_mut(&self.user) {
                u.reserved = u.reserved.saturating_sub(1);
            }
        }
    }
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
            .map_or(0, UserUploads::count)
    }

    /// Count `upload` as one of `user`'s unfinished uploads.
    pub fn track_upload(&self, user: &str, upload: UploadId) {
        lock(&self.inner.open_uploads)
            .entry(user.to_string())
            .or_default()
            .ids
            .insert(upload);
    }

    /// Reserve a slot for a new upload of `user` when fewer than `max`
    /// are open or reserved; checked and taken under one lock.
    pub fn reserve_upload(&self, user: &str, max: usize) -> Option<UploadSlot> {
        let mut m = lock(&self.inner.open_uploads);
        let u = m.entry(user.to_string()).or_default();
        if u.count() >= max {
            return None;
        }
        u.reserved += 1;
        Some(UploadSlot {
            admission: self.clone(),
            user: user.to_string(),
            held: true,
        })
    }

    /// Replace every count of unfinished uploads (at start-up).
    pub fn set_open_uploads(&self, uploads: HashMap<String, HashSet<UploadId>>) {
        let mut m = lock(&self.inner.open_uploads);
        for (user, ids) in uploads {
            m.entry(user).or_default().ids = ids;
        }
    }

    /// Stop counting `upload` (finished, refused or terminated).
    pub fn forget_upload(&self, upload: UploadId) {
        for u in lock(&self.inner.open_uploads).values_mut() {
            u.ids.remove(&upload);
        }
    }

    /// Stop counting every upload of `session` (completed, aborted or
    /// expired).
    pub fn forget_session(&self, session: SessionId) {
        for u in lock(&self.inner.open_uploads).values_mut() {
            u.ids.retain(|u| u.session() != session);
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

        // Reservations count against the cap; a dropped one is released,
        // a committed one becomes the upload.
        let r1 = a.reserve_upload("cy", 2).unwrap();
        let r2 = a.reserve_upload("cy", 2).unwrap();
        assert!(a.reserve_upload("cy", 2).is_none());
        drop(r1);
        assert_eq!(a.open_uploads("cy"), 1);
        r2.commit(u3);
        assert_eq!(a.open_uploads("cy"), 1);
        let r3 = a.reserve_upload("cy", 2).unwrap();
        assert!(a.reserve_upload("cy", 2).is_none());
        drop(r3);
        a.forget_upload(u3);
        assert_eq!(a.open_uploads("cy"), 0);

        let s = a.open_stream("ann", 1).unwrap();
        assert!(a.open_stream("ann", 1).is_none());
        drop(s);
        assert!(a.open_stream("ann", 1).is_some());
    }
}

//! The pipeline's in-memory index of sessions by owner and creation time:
//! what makes the per-user cap on open sessions atomic and a page of one
//! user's sessions cheap (the [`SessionStore`] lists ids only, so without
//! it every session of every user would be loaded for one page).
//!
//! Built once by a full scan on first use, then kept by this pipeline's own
//! creations, state changes and removals. The owner and creation time of a
//! session never change, so a listing only has to pick up ids it has not
//! seen (another process sharing the store) and drop ids that are gone:
//! [`Pipeline::list_sessions_page`] does that with one id listing and loads
//! only the new ones. The "open" flag can go stale across processes; the
//! cap re-checks a user's open sessions against the store before refusing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::ids::SessionId;
use crate::model::{SessionRecord, SessionState};
use crate::pipeline::lock;

/// Position of a session in the listing order: creation time (Unix
/// nanoseconds), then id.
pub(crate) type Position = (i128, SessionId);

#[derive(Debug)]
struct Entry {
    owner: String,
    pos: Position,
    open: bool,
}

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<SessionId, Entry>,
    all: BTreeSet<Position>,
    by_owner: HashMap<String, BTreeSet<Position>>,
}

/// See the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct SessionIndex {
    /// Set once the first full scan is done.
    pub(crate) loaded: tokio::sync::OnceCell<()>,
    state: Mutex<State>,
    /// One lock per owner, held across "count open sessions, create one".
    creators: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub(crate) fn position(created_at: OffsetDateTime, id: SessionId) -> Position {
    (created_at.unix_timestamp_nanos(), id)
}

impl SessionIndex {
    /// Insert or refresh a session (idempotent).
    pub(crate) fn insert(&self, rec: &SessionRecord) {
        let pos = position(rec.created_at, rec.id);
        let open = rec.state == SessionState::Open;
        let mut st = lock(&self.state);
        if let Some(e) = st.by_id.get_mut(&rec.id) {
            e.open = open;
            return;
        }
        st.all.insert(pos);
        st.by_owner
            .entry(rec.owner.clone())
            .or_default()
            .insert(pos);
        st.by_id.insert(
            rec.id,
            Entry {
                owner: rec.owner.clone(),
                pos,
                open,
            },
        );
    }

    /// Mark a session as no longer open (completed into the outbox).
    pub(crate) fn closed(&self, id: SessionId) {
        if let Some(e) = lock(&self.state).by_id.get_mut(&id) {
            e.open = false;
        }
    }

    /// Forget a removed session.
    pub(crate) fn remove(&self, id: SessionId) {
        let mut st = lock(&self.state);
        if let Some(e) = st.by_id.remove(&id) {
            st.all.remove(&e.pos);
            let empty = match st.by_owner.get_mut(&e.owner) {
                Some(set) => {
                    set.remove(&e.pos);
                    set.is_empty()
                }
                None => false,
            };
            if empty {
                st.by_owner.remove(&e.owner);
            }
        }
    }

    /// Forget every id not in `present`; the ids of `present` not known.
    pub(crate) fn reconcile(&self, present: &[SessionId]) -> Vec<SessionId> {
        let present_set: std::collections::HashSet<SessionId> = present.iter().copied().collect();
        let gone: Vec<SessionId> = lock(&self.state)
            .by_id
            .keys()
            .filter(|id| !present_set.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id);
        }
        let st = lock(&self.state);
        present
            .iter()
            .filter(|id| !st.by_id.contains_key(id))
            .copied()
            .collect()
    }

    /// The sessions of `owner` believed open.
    pub(crate) fn open_of(&self, owner: &str) -> Vec<SessionId> {
        let st = lock(&self.state);
        st.by_owner
            .get(owner)
            .map(|set| {
                set.iter()
                    .filter(|(_, id)| st.by_id.get(id).is_some_and(|e| e.open))
                    .map(|(_, id)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Up to `n` positions after `after` (exclusive), of `owner` or of all.
    pub(crate) fn after(
        &self,
        owner: Option<&str>,
        after: Option<Position>,
        n: usize,
    ) -> Vec<Position> {
        let st = lock(&self.state);
        let set = match owner {
            Some(o) => match st.by_owner.get(o) {
                Some(s) => s,
                None => return Vec::new(),
            },
            None => &st.all,
        };
        match after {
            Some(a) => set
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .take(n)
                .copied()
                .collect(),
            None => set.iter().take(n).copied().collect(),
        }
    }

    /// The creation lock of `owner`.
    pub(crate) fn creator(&self, owner: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.creators)
            .entry(owner.to_owned())
            .or_default()
            .clone()
    }
}

/// Where a page of sessions resumes: opaque to clients, stable across
/// requests (it names a position, not an offset, so sessions created or
/// removed meanwhile never make a page repeat or skip another one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageCursor(String);

impl PageCursor {
    pub(crate) fn of(pos: Position) -> Self {
        Self(format!("s1.{}.{}", pos.0, pos.1))
    }

    /// Parse a cursor a client sent back (at most 128 bytes).
    ///
    /// # Errors
    /// [`Error::Invalid`] (`RELAY_BAD_CURSOR`) for anything this pipeline
    /// did not hand out.
    pub fn parse(s: &str) -> Result<Self> {
        let c = Self(s.to_owned());
        c.position()?;
        Ok(c)
    }

    pub(crate) fn position(&self) -> Result<Position> {
        let bad = || Error::invalid("RELAY_BAD_CURSOR", "the page cursor is not valid");
        if self.0.len() > 128 {
            return Err(bad());
        }
        let mut parts = self.0.split('.');
        let (Some("s1"), Some(nanos), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let nanos: i128 = nanos.parse().map_err(|_| bad())?;
        let id = SessionId::parse(id).map_err(|_| bad())?;
        Ok((nanos, id))
    }

    /// The cursor as text (for a `cursor` query parameter or JSON field).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PageCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request for one page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Items wanted; 0 means the configured default, anything above the
    /// configured maximum is cut to it.
    pub limit: u32,
    /// Resume after this cursor (the `next` of the previous page).
    pub after: Option<PageCursor>,
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in listing order.
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

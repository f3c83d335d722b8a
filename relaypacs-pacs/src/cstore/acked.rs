//! What this sink process saw the PACS acknowledge: the answer of
//! `verify` for a PACS that accepts neither C-GET nor C-FIND (dcmtk's
//! `storescp`, many modality-side archives), which cannot be asked at all.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use relaypacs_core::{Holding, Instance, Sha256Digest, Uid, Verification};

/// Most SOP Instance UIDs remembered (about 15 MiB at most). The one
/// acknowledged first is forgotten first; a forgotten instance is then
/// answered `Absent`, so it is sent again, which C-STORE tolerates.
pub(super) const MAX_ACKED: usize = 65_536;

/// The digests of what was sent under one SOP Instance UID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sent {
    whole: Sha256Digest,
    data_set: Option<Sha256Digest>,
}

impl Sent {
    fn of(inst: &Instance) -> Self {
        Self {
            whole: inst.sha256,
            data_set: inst.data_set_sha256,
        }
    }

    /// Whether `inst` has the content that was sent.
    fn matches(&self, inst: &Instance) -> bool {
        self.whole == inst.sha256
            || (self.data_set.is_some() && self.data_set == inst.data_set_sha256)
    }
}

/// SOP Instance UID → digests of the last content the PACS answered a
/// C-STORE of this process with success (or a warning), bounded to
/// [`MAX_ACKED`] UIDs.
pub(super) struct Acked {
    sent: HashMap<Uid, Sent>,
    /// UIDs in the order they were first acknowledged, for eviction.
    order: VecDeque<Uid>,
    max: usize,
}

impl fmt::Debug for Acked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acked")
            .field("uids", &self.sent.len())
            .field("max", &self.max)
            .finish()
    }
}

impl Default for Acked {
    fn default() -> Self {
        Self::with_capacity(MAX_ACKED)
    }
}

impl Acked {
    /// An empty record keeping at most `max` UIDs (at least one).
    pub(super) fn with_capacity(max: usize) -> Self {
        Self {
            sent: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// The PACS acknowledged a C-STORE of `inst`.
    pub(super) fn record(&mut self, inst: &Instance) {
        let uid = &inst.dicom.sop_instance_uid;
        if let Some(sent) = self.sent.get_mut(uid) {
            *sent = Sent::of(inst);
            return;
        }
        while self.sent.len() >= self.max {
            match self.order.pop_front() {
                Some(old) => {
                    self.sent.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(uid.clone());
        self.sent.insert(uid.clone(), Sent::of(inst));
    }

    /// What the record says the PACS holds under `inst`'s UID: presence
    /// only (nothing was read back), `Different` when the last content
    /// acknowledged under that UID was another, `Absent` when this process
    /// never saw it acknowledged (or has forgotten it).
    pub(super) fn holding(&self, inst: &Instance) -> Holding {
        let uid = &inst.dicom.sop_instance_uid;
        match self.sent.get(uid) {
            None => Holding::Absent,
            Some(sent) if sent.matches(inst) => Holding::Same {
                verification: Verification::PresenceOnly,
            },
            Some(_) => Holding::Different {
                reason: format!(
                    "the PACS acknowledged other content under SOP Instance UID {uid} from \
                     this sink (it offers neither C-GET nor C-FIND, so only what it \
                     acknowledged is known)"
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn answers_from_acknowledgements_and_forgets_the_oldest() {
        let (_, insts) = relaypacs_core::testing::pacs_sink::study(3).unwrap();
        let mut a = Acked::with_capacity(2);
        assert_eq!(a.holding(&insts[0]), Holding::Absent);
        a.record(&insts[0]);
        a.record(&insts[1]);
        let presence = Holding::Same {
            verification: Verification::PresenceOnly,
        };
        assert_eq!(a.holding(&insts[0]), presence);
        // The same UID with other content.
        let mut other = insts[0].clone();
        other.sha256 = Sha256Digest::of(b"other");
        other.data_set_sha256 = Some(Sha256Digest::of(b"other data set"));
        let Holding::Different { reason } = a.holding(&other) else {
            panic!("other content called the same")
        };
        assert!(reason.contains(insts[0].dicom.sop_instance_uid.as_str()));
        // Acknowledged again with the other content: that is what it holds.
        a.record(&other);
        assert_eq!(a.holding(&other), presence);
        assert!(matches!(a.holding(&insts[0]), Holding::Different { .. }));
        // Bounded: the first acknowledged is forgotten.
        a.record(&insts[2]);
        assert_eq!(a.holding(&insts[0]), Holding::Absent);
        assert_eq!(a.holding(&insts[1]), presence);
        assert_eq!(a.holding(&insts[2]), presence);
        assert_eq!(a.sent.len(), 2);
        assert_eq!(a.order.len(), 2);
    }
}

//! Content verification by C-GET (PS3.4 Annex C.4.3, PS3.7 §9.1.3): the
//! PACS sends each instance back as a C-STORE sub-operation on the same
//! association, where we are the Storage SCP (SCP/SCU Role Selection,
//! PS3.7 D.3.3.4, negotiated through dicom-ul's `with_role_selection`).
//! Returned data sets are hashed as they stream in and never held.

use std::collections::HashSet;

use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu, UserVariableItem};
use relaypacs_core::dicom::ContentDigest;
use relaypacs_core::{
    Error, Holding, Instance, Result, Sha256Digest, Verification, compare_content,
};
use sha2::{Digest, Sha256};

use super::dimse::{
    self, C_GET_RSP, C_STORE_RQ, IMPLICIT_VR_LE, STUDY_ROOT_FIND, STUDY_ROOT_GET, SubOperations,
};
use super::verify::presence;
use super::{CStoreSink, Conn, MAX_COMMAND, MAX_CONTEXTS, MAX_IDENTIFIER};

/// Bytes a returned data set may exceed the sent file by (besides 1/8 of
/// its size) before it counts as another object: room for attributes a
/// PACS adds. The sent size includes the file meta group, which a C-STORE
/// never carries.
const SLACK: u64 = 64 << 10;
/// Beyond this many bytes over the limit the association is given up
/// rather than drained.
const DRAIN_LIMIT: u64 = 16 << 20;
/// Storage contexts per association: the context ids left after C-GET and
/// C-FIND.
const MAX_STORAGE_CONTEXTS: usize = MAX_CONTEXTS - 2;
/// Status of our C-STORE-RSP to a sub-operation: success.
const STORE_SUCCESS: u16 = 0x0000;
/// Status of our C-STORE-RSP to a sub-operation too large to be the
/// instance: refused, out of resources.
const STORE_REFUSED: u16 = 0xA700;

/// Instances verified over one association: each SOP class appears in one
/// transfer syntax only, so the PACS has exactly one context to return an
/// instance in, the one it was sent in.
#[derive(Debug, Default)]
struct Round {
    /// Indices into the batch, in input order.
    members: Vec<usize>,
    /// `(SOP class, transfer syntax)` of the storage contexts.
    storage: Vec<(String, String)>,
}

impl Round {
    /// Whether `inst` can join without a second transfer syntax for its
    /// SOP class or too many contexts.
    fn fits(&self, inst: &Instance) -> bool {
        let class = inst.dicom.sop_class_uid.as_str();
        match self.storage.iter().find(|(c, _)| c == class) {
            Some((_, ts)) => ts == inst.dicom.transfer_syntax.as_str(),
            None => self.storage.len() < MAX_STORAGE_CONTEXTS,
        }
    }

    fn add(&mut self, i: usize, inst: &Instance) {
        let key = (
            inst.dicom.sop_class_uid.to_string(),
            inst.dicom.transfer_syntax.to_string(),
        );
        if !self.storage.contains(&key) {
            self.storage.push(key);
        }
        self.members.push(i);
    }
}

/// Split a batch into rounds (one association each); usually one.
fn rounds(instances: &[Instance]) -> Vec<Round> {
    let mut rounds: Vec<Round> = Vec::new();
    for (i, inst) in instances.iter().enumerate() {
        match rounds.iter_mut().find(|r| r.fits(inst)) {
            Some(r) => r.add(i, inst),
            None => {
                let mut r = Round::default();
                r.add(i, inst);
                rounds.push(r);
            }
        }
    }
    rounds
}

/// One data set the PACS returned.
#[derive(Debug)]
enum Copy {
    /// Hashed whole.
    Digest(ContentDigest),
    /// Longer than `limit` bytes: not the instance that was sent.
    TooLarge { limit: u64 },
}

/// The result of one C-GET.
#[derive(Debug)]
struct Retrieved {
    copies: Vec<Copy>,
    /// Final status.
    status: u16,
    comment: Option<String>,
    sub_operations: SubOperations,
}

/// What one instance's C-GET established.
#[derive(Debug)]
enum Finding {
    /// Compared, or known.
    Held(Holding),
    /// Nothing came back: presence is for C-FIND to say. `fallback` is the
    /// answer when the PACS has no C-FIND (`None`: nothing can be said).
    Unsure {
        why: String,
        fallback: Option<Holding>,
    },
}

/// The answer for an instance from the data sets the PACS returned.
fn judge(inst: &Instance, copies: &[Copy]) -> Holding {
    let uid = &inst.dicom.sop_instance_uid;
    let mut answer = Holding::Same {
        verification: Verification::Content,
    };
    for copy in copies {
        let h = match copy {
            Copy::Digest(d) => compare_content(inst, d),
            Copy::TooLarge { limit } => Holding::Different {
                reason: format!(
                    "the PACS returned more than {limit} bytes for SOP Instance UID {uid} \
                     ({} bytes sent): a different object",
                    inst.size
                ),
            },
        };
        if !h.is_same() {
            return h;
        }
        answer = h;
    }
    answer
}

/// What a C-GET that returned nothing means (PS3.4 C.4.3.1.4 statuses).
fn unsure(r: &Retrieved) -> Finding {
    let failed = r.sub_operations.failed.unwrap_or(0);
    let warned = r.sub_operations.warning.unwrap_or(0);
    let why = format!(
        "{} ({} completed, {failed} failed, {warned} warning sub-operations)",
        dimse::describe("C-GET", r.status, r.comment.as_deref()),
        r.sub_operations.completed.unwrap_or(0),
    );
    let fallback = match r.status {
        // Something matched but could not be sent to us.
        0x0000 | 0xB000 | 0xA702 | 0xC000..=0xCFFF if failed > 0 => Some(Holding::Same {
            verification: Verification::PresenceOnly,
        }),
        // Complete and nothing failed: nothing matched.
        0x0000 | 0xB000 if warned == 0 => Some(Holding::Absent),
        // Unable to process, with no sub-operation at all: how Orthanc
        // answers a C-GET that matches nothing.
        0xC000..=0xCFFF if warned == 0 => Some(Holding::Absent),
        // Refused (0xA701/0xA702 out of resources, 0x0122, 0x0124),
        // identifier rejected (0xA900), cancelled: says nothing about the
        // instance.
        _ => None,
    };
    Finding::Unsure { why, fallback }
}

/// Whether the PACS refuses C-GET as such (not for this instance).
fn refuses_get(status: u16) -> bool {
    matches!(status, 0x0122 | 0x0124)
}

/// Whether the acceptor's SCP/SCU Role Selection reply refuses us the SCP
/// role for `class`. A reply without the item leaves the default roles
/// (PS3.7 D.3.3.4), which would exclude C-GET of that class; the C-GET is
/// still tried, as some PACSes omit the item, and a failed sub-operation is
/// then handled like any other.
fn scp_role_refused(conn: &Conn, class: &str) -> bool {
    conn.assoc.user_variables().iter().any(|v| {
        matches!(v, UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles)
            if uid.trim_end_matches(['\0', ' ']) == class && !roles.scp)
    })
}

/// The next PDV; `None` when the PACS sent an A-ABORT.
async fn next_pdv(conn: &mut Conn) -> Result<Option<PDataValue>> {
    loop {
        if let Some(v) = conn.pending.pop_front() {
            return Ok(Some(v));
        }
        match conn.receive().await? {
            Pdu::PData { data } => conn.pending.extend(data),
            Pdu::AbortRQ { source } => {
                tracing::debug!(sink = %conn.label, ?source, "A-ABORT during C-GET");
                // Nothing may be written after an A-ABORT.
                conn.broken = true;
                return Ok(None);
            }
            other => {
                return Err(conn.protocol(format!("unexpected {}", other.short_description())));
            }
        }
    }
}

/// The next command set, on any context; `None` on an A-ABORT.
async fn read_command(conn: &mut Conn) -> Result<Option<(u8, dimse::Response)>> {
    let mut command = Vec::new();
    let mut ctx = None;
    loop {
        let Some(v) = next_pdv(conn).await? else {
            return Ok(None);
        };
        if v.value_type != PDataValueType::Command
            || ctx.is_some_and(|c| c != v.presentation_context_id)
        {
            return Err(conn.protocol("expected a command fragment"));
        }
        ctx = Some(v.presentation_context_id);
        command.extend_from_slice(&v.data);
        if command.len() > MAX_COMMAND {
            return Err(conn.protocol("command set too large"));
        }
        if v.is_last {
            let parsed = dimse::parse_request(&command).map_err(|e| conn.protocol(e))?;
            return Ok(Some((v.presentation_context_id, parsed)));
        }
    }
}

/// The data set following a command on `ctx`, each fragment handed to
/// `each`; returns its length. More than `max` bytes is a protocol error.
async fn read_data(
    conn: &mut Conn,
    ctx: u8,
    max: u64,
    mut each: impl FnMut(&[u8]),
) -> Result<Option<u64>> {
    let mut n = 0u64;
    loop {
        let Some(v) = next_pdv(conn).await? else {
            return Ok(None);
        };
        if v.value_type != PDataValueType::Data || v.presentation_context_id != ctx {
            return Err(conn.protocol("expected a data set fragment"));
        }
        n += v.data.len() as u64;
        if n > max {
            return Err(conn.protocol(format!("a data set of more than {max} bytes")));
        }
        each(&v.data);
        if v.is_last {
            return Ok(Some(n));
        }
    }
}

impl CStoreSink {
    /// Verify by C-GET. `None` when the PACS does not offer it (not
    /// accepted, or refused by an A-ABORT of the first request): the
    /// caller falls back to C-FIND.
    pub(super) async fn verify_by_get(
        &self,
        instances: &[Instance],
    ) -> Result<Option<Vec<Holding>>> {
        let mut out: Vec<Option<Holding>> = vec![None; instances.len()];
        for (n, round) in rounds(instances).iter().enumerate() {
            let Some(held) = self.get_round(instances, round, n == 0).await? else {
                return Ok(None);
            };
            for (i, h) in round.members.iter().zip(held) {
                out[*i] = Some(h);
            }
        }
        out.into_iter()
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| {
                Error::pacs_permanent(format!("{self}: C-GET left an instance unanswered"), None)
            })
    }

    /// One association: C-GET each member, C-FIND those that returned
    /// nothing. `None` when the PACS does not offer C-GET.
    async fn get_round(
        &self,
        instances: &[Instance],
        round: &Round,
        first: bool,
    ) -> Result<Option<Vec<Holding>>> {
        let mut contexts = vec![
            (STUDY_ROOT_GET.to_owned(), IMPLICIT_VR_LE.to_owned()),
            (STUDY_ROOT_FIND.to_owned(), IMPLICIT_VR_LE.to_owned()),
        ];
        contexts.extend(round.storage.iter().cloned());
        let mut classes: Vec<&str> = Vec::new();
        for (class, _) in &round.storage {
            if !classes.contains(&class.as_str()) {
                classes.push(class);
            }
        }
        let Some((mut conn, accepted)) = self.associate(&contexts, &classes).await? else {
            self.state.learn(|c| {
                c.get = Some(false);
                c.find = Some(false);
            });
            tracing::info!(sink = %self, "the PACS accepts neither C-GET nor C-FIND");
            return Ok(None);
        };
        let find_ctx = accepted.get(1).copied().flatten();
        let Some(get_ctx) = accepted.first().copied().flatten() else {
            self.state.learn(|c| {
                c.get = Some(false);
                c.find = Some(find_ctx.is_some());
            });
            tracing::info!(sink = %self, "the PACS does not accept Study Root C-GET: presence only");
            if let Err(e) = conn.release().await {
                tracing::debug!(sink = %self, error = %e, "A-RELEASE failed");
            }
            return Ok(None);
        };
        // (context id, SOP class, transfer syntax) of the accepted storage
        // contexts.
        let storage: Vec<(u8, &str, &str)> = round
            .storage
            .iter()
            .zip(&accepted[2..])
            .filter_map(|((class, ts), id)| id.map(|id| (id, class.as_str(), ts.as_str())))
            .collect();
        let mut findings = Vec::with_capacity(round.members.len());
        let mut asked = false;
        for &i in &round.members {
            let inst = &instances[i];
            let class = inst.dicom.sop_class_uid.as_str();
            let ts = inst.dicom.transfer_syntax.as_str();
            let why_not = if inst.data_set_sha256.is_none() {
                Some("no data set digest was recorded for it".to_owned())
            } else if !storage.iter().any(|(_, c, t)| *c == class && *t == ts) {
                Some(format!(
                    "the PACS did not accept SOP class {class} in transfer syntax {ts} for the \
                     C-GET sub-operation"
                ))
            } else if scp_role_refused(&conn, class) {
                Some(format!(
                    "the PACS refused us the SCP role for SOP class {class}"
                ))
            } else {
                None
            };
            if let Some(why) = why_not {
                findings.push(Finding::Unsure {
                    why,
                    fallback: None,
                });
                continue;
            }
            let retrieved = match self.retrieve(&mut conn, get_ctx, &storage, inst).await {
                Ok(r) => r,
                Err(e) => {
                    conn.abort().await;
                    return Err(e);
                }
            };
            let Some(r) = retrieved else {
                conn.abort().await;
                if first && !asked {
                    // Orthanc, for one: C-GET from an AE it does not
                    // allow is accepted at negotiation, then aborted.
                    self.state.learn(|c| {
                        c.get = Some(false);
                        c.find = Some(find_ctx.is_some());
                    });
                    tracing::warn!(
                        sink = %self,
                        "the PACS aborted the association on our first C-GET: it does not let \
                         this AE retrieve, so delivery is verified by presence only"
                    );
                    return Ok(None);
                }
                return Err(Error::pacs_transient(
                    format!("{self}: the PACS aborted the association during C-GET"),
                    None,
                ));
            };
            asked = true;
            if r.copies.is_empty() {
                if refuses_get(r.status) {
                    self.state.learn(|c| c.get = Some(false));
                }
                findings.push(unsure(&r));
            } else {
                findings.push(Finding::Held(judge(inst, &r.copies)));
            }
        }
        let unsure: Vec<&Instance> = round
            .members
            .iter()
            .zip(&findings)
            .filter(|(_, f)| matches!(f, Finding::Unsure { .. }))
            .map(|(i, _)| &instances[*i])
            .collect();
        let held = match (find_ctx, unsure.is_empty()) {
            (Some(ctx), false) => match self.find_held(&mut conn, ctx, &unsure).await {
                Ok(held) => Some(held),
                Err(e) => {
                    conn.abort().await;
                    return Err(e);
                }
            },
            _ => None,
        };
        if let Err(e) = conn.release().await {
            tracing::debug!(sink = %self, error = %e, "C-GET: A-RELEASE failed");
        }
        round
            .members
            .iter()
            .zip(findings)
            .map(|(i, f)| self.settle(&instances[*i], f, held.as_ref()))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The answer for an instance: its finding, with C-FIND's `held` (if
    /// the PACS has C-FIND) for one the C-GET returned nothing for.
    fn settle(
        &self,
        inst: &Instance,
        finding: Finding,
        held: Option<&HashSet<String>>,
    ) -> Result<Holding> {
        let (why, fallback) = match finding {
            Finding::Held(h) => return Ok(h),
            Finding::Unsure { why, fallback } => (why, fallback),
        };
        let uid = &inst.dicom.sop_instance_uid;
        match (held, fallback) {
            (Some(held), _) => {
                let h = presence(inst, held);
                if h.is_same() {
                    tracing::warn!(
                        sink = %self, sop_instance_uid = %uid, reason = %why,
                        "the PACS holds the instance, content not compared: presence only"
                    );
                }
                Ok(h)
            }
            (None, Some(h)) => Ok(h),
            (None, None) => Err(Error::pacs_transient(
                format!("{self}: cannot verify SOP Instance UID {uid}: {why}; no C-FIND either"),
                None,
            )),
        }
    }

    /// One IMAGE-level C-GET of `inst`, answering its C-STORE
    /// sub-operations. `None` when the PACS aborted the association
    /// without answering anything (an abort later is an `Err`). An `Err`
    /// leaves the association unusable: the caller aborts it.
    async fn retrieve(
        &self,
        conn: &mut Conn,
        get_ctx: u8,
        storage: &[(u8, &str, &str)],
        inst: &Instance,
    ) -> Result<Option<Retrieved>> {
        let message_id = conn.next_message_id();
        conn.send_whole(get_ctx, true, &dimse::c_get_rq(message_id))
            .await?;
        let keys = dimse::image_level_keys(
            inst.dicom.study_instance_uid.as_str(),
            inst.dicom.series_instance_uid.as_str(),
            inst.dicom.sop_instance_uid.as_str(),
        );
        conn.send_whole(get_ctx, false, &keys).await?;
        let limit = inst.size + inst.size / 8 + SLACK;
        let mut copies = Vec::new();
        let aborted = || {
            Error::pacs_transient(
                format!("{self}: the PACS aborted the association during C-GET"),
                None,
            )
        };
        let mut answered = false;
        loop {
            let Some((ctx, cmd)) = read_command(conn).await? else {
                return if answered { Err(aborted()) } else { Ok(None) };
            };
            answered = true;
            if cmd.command_field == C_STORE_RQ {
                let Some(&(_, class, ts)) = storage.iter().find(|(id, _, _)| *id == ctx) else {
                    return Err(conn.protocol(format!(
                        "a C-STORE sub-operation on context {ctx}, not a storage context"
                    )));
                };
                let sop = cmd.affected_sop_instance.as_deref().unwrap_or_default();
                if sop != inst.dicom.sop_instance_uid.as_str() || !cmd.has_data_set {
                    return Err(conn.protocol(format!(
                        "a C-GET of SOP Instance UID {} returned {sop:?}",
                        inst.dicom.sop_instance_uid
                    )));
                }
                let mut hasher = Sha256::new();
                let mut seen = 0u64;
                let read = read_data(conn, ctx, limit + DRAIN_LIMIT, |piece| {
                    seen += piece.len() as u64;
                    if seen <= limit {
                        hasher.update(piece);
                    }
                })
                .await?;
                let Some(size) = read else {
                    return Err(aborted());
                };
                let (status, copy) = if size > limit {
                    (STORE_REFUSED, Copy::TooLarge { limit })
                } else {
                    let digest = ContentDigest {
                        whole: None,
                        data_set: Some(Sha256Digest(hasher.finalize().into())),
                        transfer_syntax: Some(ts.to_owned()),
                        size,
                    };
                    (STORE_SUCCESS, Copy::Digest(digest))
                };
                copies.push(copy);
                let class = cmd.affected_sop_class.as_deref().unwrap_or(class);
                let rsp = dimse::c_store_rsp(class, sop, cmd.message_id, status);
                conn.send_whole(ctx, true, &rsp).await?;
            } else if cmd.command_field == C_GET_RSP
                && ctx == get_ctx
                && cmd.responding_to == message_id
            {
                if cmd.has_data_set {
                    // The Failed SOP Instance UID List: not needed.
                    let max = MAX_IDENTIFIER as u64;
                    if read_data(conn, ctx, max, |_| {}).await?.is_none() {
                        return Err(aborted());
                    }
                }
                if matches!(cmd.status, 0xFF00 | 0xFF01) {
                    continue;
                }
                return Ok(Some(Retrieved {
                    copies,
                    status: cmd.status,
                    comment: cmd.error_comment,
                    sub_operations: cmd.sub_operations,
                }));
            } else {
                return Err(conn.protocol(format!(
                    "expected a C-STORE sub-operation or C-GET-RSP to message {message_id}, got \
                     command 0x{:04X} to {} on context {ctx}",
                    cmd.command_field, cmd.responding_to
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use relaypacs_core::Uid;

    fn batch(spec: &[(&str, &str)]) -> Vec<Instance> {
        let (_, insts) = relaypacs_core::testing::pacs_sink::study(1).unwrap();
        spec.iter()
            .map(|(class, ts)| {
                let mut i = insts[0].clone();
                i.dicom.sop_class_uid = Uid::parse(class).unwrap();
                i.dicom.transfer_syntax = Uid::parse(ts).unwrap();
                i
            })
            .collect()
    }

    #[test]
    fn one_transfer_syntax_per_sop_class_and_association() {
        let (ct, sc) = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7");
        let (ex, im) = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2");
        let b = batch(&[(ct, ex), (sc, im), (ct, im), (ct, ex), (sc, im)]);
        let r = rounds(&b);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].members, vec![0, 1, 3, 4]);
        assert_eq!(r[1].members, vec![2]);
        assert_eq!(r[0].storage.len(), 2);
        // Never more storage contexts than ids left.
        let many: Vec<_> = (0..300)
            .map(|n| (format!("1.2.3.{n}"), ex.to_owned()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(c, t)| (c.as_str(), t.as_str())).collect();
        let r = rounds(&batch(&refs));
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|r| r.storage.len() <= MAX_STORAGE_CONTEXTS));
    }

    #[test]
    fn what_a_c_get_returned_decides() {
        let inst = &batch(&[("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1")])[0];
        let same = ContentDigest {
            whole: None,
            data_set: inst.data_set_sha256,
            transfer_syntax: Some(inst.dicom.transfer_syntax.to_string()),
            size: 10,
        };
        let other = ContentDigest {
            data_set: Some(Sha256Digest::of(b"other")),
            ..same.clone()
        };
        let content = Holding::Same {
            verification: Verification::Content,
        };
        assert_eq!(judge(inst, &[Copy::Digest(same.clone())]), content);
        let uid = inst.dicom.sop_instance_uid.as_str();
        for copies in [
            vec![Copy::Digest(other)],
            vec![Copy::Digest(same), Copy::TooLarge { limit: 5 }],
        ] {
            match judge(inst, &copies) {
                Holding::Different { reason } => assert!(reason.contains(uid), "{reason}"),
                h => panic!("{h:?}"),
            }
        }
        let got = |status, failed| Retrieved {
            copies: Vec::new(),
            status,
            comment: None,
            sub_operations: SubOperations {
                completed: Some(0),
                failed: Some(failed),
                ..SubOperations::default()
            },
        };
        let fallback = |f: Finding| match f {
            Finding::Unsure { fallback, .. } => fallback,
            Finding::Held(h) => panic!("{h:?}"),
        };
        // Without C-FIND: nothing matched, or something matched that could
        // not be sent, or nothing can be said.
        for status in [0x0000, 0xC000] {
            assert_eq!(fallback(unsure(&got(status, 0))), Some(Holding::Absent));
        }
        for status in [0xA702, 0xB000, 0xC000] {
            assert_eq!(
                fallback(unsure(&got(status, 1))),
                Some(Holding::Same {
                    verification: Verification::PresenceOnly
                })
            );
        }
        for status in [0xA701, 0xA702, 0xA900, 0xFE00, 0x0124] {
            assert_eq!(fallback(unsure(&got(status, 0))), None, "{status:04X}");
        }
        let Finding::Unsure { why, .. } = unsure(&got(0xA701, 0)) else {
            panic!()
        };
        assert!(
            why.contains("0xA701") && why.contains("unable to calculate"),
            "{why}"
        );
        assert!(refuses_get(0x0124) && !refuses_get(0xC000));
    }
}

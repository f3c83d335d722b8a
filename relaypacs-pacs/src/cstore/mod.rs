//! [`CStoreSink`]: delivery by DIMSE C-STORE, verification by C-GET
//! (content) or C-FIND (presence), as an SCU over dicom-ul's async
//! association.
//!
//! `mod.rs` holds the sink, the association set-up and the P-DATA framing;
//! `cget.rs` the content verification association, `verify.rs` the choice
//! of service (and C-FIND), `acked.rs` the record of acknowledged stores,
//! `dimse.rs` the DIMSE messages.

mod acked;
mod cget;
pub(crate) mod dimse;
mod verify;

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Buf;
use dicom_ul::association::{
    AsyncAssociation, AsyncClientAssociation, ClientAssociationOptions, Error as UlError,
};
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJResult, MINIMUM_PDU_SIZE, PDataValue, PDataValueType, Pdu,
};
use futures::StreamExt;
use relaypacs_core::dicom::{DicomError, data_set_offset};
use relaypacs_core::{
    DeliveryReport, Error, Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Result,
    Uid,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use dimse::{C_STORE_RSP, PDATA_HEADER, PDV_OVERHEAD};

/// Largest `max_pdu` accepted in a [`CStoreConfig`]: it bounds the memory
/// one instance in flight may take.
const MAX_PDU_LIMIT: u32 = 16 << 20;
/// Presentation context ids are the odd numbers 1..=255 (PS3.8 §9.3.2.2).
const MAX_CONTEXTS: usize = 128;
/// Bytes of a Part-10 file needed to find where its data set starts.
const PREFIX: usize = 144;
/// Largest response command set accepted.
const MAX_COMMAND: usize = 64 << 10;
/// Largest C-FIND response identifier accepted.
const MAX_IDENTIFIER: usize = 1 << 20;
/// Most associations one delivery may open at once.
const MAX_ASSOCIATIONS: usize = 8;
/// Longest wait for an A-ABORT to go out before the socket is closed anyway.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Settings of a [`CStoreSink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CStoreConfig {
    /// The PACS's DICOM port as `host:port` (e.g. `pacs.example:104`).
    pub address: String,
    /// Our AE title (the calling AE), 1 to 16 printable ASCII characters.
    pub calling_ae: String,
    /// The PACS's AE title (the called AE), 1 to 16 printable ASCII characters.
    pub called_ae: String,
    /// Limit for the TCP connect, and again for the association negotiation.
    pub connect_timeout: Duration,
    /// Limit for each network read or write once associated, including the
    /// wait for a C-STORE response while the PACS writes the instance.
    pub io_timeout: Duration,
    /// Largest PDU we receive, proposed in the association request, and the
    /// cap on the P-DATA PDUs we send (the PACS's own maximum also applies).
    /// Between 1018 bytes and 16 MiB.
    pub max_pdu: u32,
    /// Associations opened at once for one delivery; hospital PACSes
    /// commonly accept several; 1 = strictly sequential. Between 1 and 8.
    pub associations: usize,
    /// How delivery is proven: retrieve and compare content (C-GET, the
    /// default; presence-only where the PACS offers no retrieval) or only
    /// find the UID (C-FIND). A PACS offering neither is answered from the
    /// C-STOREs it acknowledged to this process (see [`CStoreSink`]).
    pub verify: relaypacs_core::VerifyMode,
}

impl Default for CStoreConfig {
    /// No address; `RELAYPACS` calling `ANY-SCP`, 10 s to connect, 60 s per
    /// read or write, 64 KiB PDUs, 2 associations at once.
    fn default() -> Self {
        Self {
            address: String::new(),
            calling_ae: "RELAYPACS".into(),
            called_ae: "ANY-SCP".into(),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            max_pdu: 64 << 10,
            associations: 2,
            verify: relaypacs_core::VerifyMode::Content,
        }
    }
}

/// An AE title: 1 to 16 characters of printable ASCII without backslash,
/// not all spaces (PS3.5 §6.2, VR AE).
fn check_ae(which: &str, ae: &str) -> Result<()> {
    let ok = (1..=16).contains(&ae.len())
        && ae.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
        && !ae.bytes().all(|b| b == b' ');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "RELAY_CSTORE_BAD_AE_TITLE",
            format!(
                "the {which} AE title must be 1 to 16 printable ASCII characters, \
                 without backslash and not all spaces"
            ),
        ))
    }
}

fn check_address(address: &str) -> Result<()> {
    let ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "RELAY_CSTORE_BAD_ADDRESS",
            format!("the PACS address must be host:port, not {address:?}"),
        ))
    }
}

/// A [`PacsSink`] storing instances in a PACS by DIMSE C-STORE and checking
/// them by C-GET (content) or C-FIND (presence), Study Root, IMAGE level.
///
/// A [`deliver`](PacsSink::deliver) call splits its batch into up to
/// [`CStoreConfig::associations`] contiguous groups of about equal bytes
/// and sends each group over its own association, all at once (one
/// instance in flight per association: a PACS answers each C-STORE only
/// once it has written the instance, so parallel associations keep it
/// busy). Outcomes come back in input order. Each distinct (SOP class, transfer syntax) of the batch is proposed
/// as its own presentation context with exactly the file's transfer syntax:
/// files are never transcoded, so an instance whose context the PACS rejects
/// fails (permanently) instead of being changed.
///
/// Each instance is streamed from its [`InstanceSource`] straight into
/// P-DATA-TF PDUs: the Part-10 preamble and file meta group are skipped (the
/// receiver writes its own), and besides the piece the source just yielded
/// at most one PDU of the data set is held in memory. The PDU carrying the
/// "last fragment" flag, which makes the PACS commit the instance, is sent
/// only after the source stream has ended successfully; the source checks
/// the whole-file SHA-256 at its end, so a late digest error still aborts
/// the association and nothing is stored.
///
/// # Verification
/// [`verify`](PacsSink::verify) uses the best service the PACS accepts:
/// - [`VerifyMode::Content`](relaypacs_core::VerifyMode::Content), the PACS
///   accepts Study Root C-GET: one association proposes C-GET, C-FIND and,
///   for each (SOP class, transfer syntax) of the batch, a storage context
///   with only that transfer syntax and the SCP role for us (SCP/SCU Role
///   Selection, PS3.7 D.3.3.4), so the PACS returns each instance as it was
///   sent, untranscoded. Each instance is fetched by its own IMAGE-level
///   C-GET; the data set of the returned C-STORE sub-operation is hashed as
///   it streams in (never held; more than the sent size plus 1/8 plus
///   64 KiB counts as another object) and judged by
///   [`compare_content`](relaypacs_core::compare_content): `Same { Content }`
///   or `Different` naming the SOP Instance UID. A SOP class that occurs in
///   two transfer syntaxes in one batch gets one association per transfer
///   syntax. An instance the C-GET returns nothing for is decided by C-FIND
///   on the same association: absent, or (present but not retrievable as
///   sent) `Same { PresenceOnly }`; a PACS without C-FIND is taken at its
///   C-GET status (no match, or "unable to process" with no
///   sub-operation: absent; failed sub-operations: presence only;
///   refusals: an error). Instances with no recorded data set digest are
///   only looked up by C-FIND.
/// - [`VerifyMode::Presence`](relaypacs_core::VerifyMode::Presence), or the
///   PACS does not accept the C-GET context (or aborts the association on
///   the first C-GET, as Orthanc does for an AE it does not allow): C-FIND,
///   answering `Same { PresenceOnly }` or `Absent`, never `Content`.
/// - The PACS accepts neither C-GET nor C-FIND (a plain C-STORE SCP such as
///   dcmtk's `storescp`) and so cannot be asked at all: the answer comes
///   from a record, kept in memory by this sink, of the instances the PACS
///   answered a C-STORE *from this process* with success or a warning
///   (SOP Instance UID → digests sent, at most 65,536 UIDs, the oldest
///   forgotten first): `Same { PresenceOnly }` when the digests are those
///   of the instance asked about, `Different` when other content was
///   acknowledged under its UID, and `Absent` otherwise, including after a
///   restart or once forgotten, so such instances are sent again, which
///   C-STORE tolerates. Nothing is read back from the PACS in that case.
///
/// What the PACS accepted is remembered per sink (and its clones) for ten
/// minutes, so each verify does not negotiate services the PACS refused;
/// a failed verify forgets it and the next one probes again.
#[derive(Clone, Debug)]
pub struct CStoreSink {
    config: CStoreConfig,
    state: Arc<verify::VerifyState>,
}

impl fmt::Display for CStoreSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "c-store:{}@{}",
            self.config.called_ae, self.config.address
        )
    }
}

/// An error as text with its causes, `outer: inner: …`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Split `instances` into at most `n` non-empty contiguous groups of about
/// equal size in bytes (an empty batch gives no group).
fn split_by_bytes(instances: &[Instance], n: usize) -> Vec<&[Instance]> {
    let n = n.clamp(1, instances.len().max(1));
    let weight = |i: &Instance| i.size.max(1);
    let total: u64 = instances.iter().map(weight).sum();
    let mut groups = Vec::with_capacity(n);
    let (mut start, mut acc) = (0, 0u64);
    for (i, inst) in instances.iter().enumerate() {
        acc += weight(inst);
        if groups.len() + 1 == n {
            break;
        }
        // Cut once this group reaches its share of the bytes, or when the
        // instances left are just enough for one per group still to come.
        let cut = groups.len() as u128 + 1;
        let groups_left = n - groups.len() - 1;
        let instances_left = instances.len() - i - 1;
        if u128::from(acc) * n as u128 >= u128::from(total) * cut || instances_left == groups_left {
            groups.push(&instances[start..=i]);
            start = i + 1;
        }
    }
    if start < instances.len() {
        groups.push(&instances[start..]);
    }
    groups
}

/// Why an instance was not sent at all.
fn not_accepted(inst: &Instance) -> InstanceOutcome {
    InstanceOutcome::Failed {
        transient: false,
        reason: format!(
            "transfer syntax/SOP class not accepted by the PACS (SOP class {}, transfer \
             syntax {}); instances are never transcoded",
            inst.dicom.sop_class_uid, inst.dicom.transfer_syntax
        ),
    }
}

impl CStoreSink {
    /// A sink for the PACS described by `config`; nothing is contacted yet.
    ///
    /// # Errors
    /// [`Error::Invalid`] with code `RELAY_CSTORE_BAD_AE_TITLE`,
    /// `RELAY_CSTORE_BAD_ADDRESS`, `RELAY_CSTORE_BAD_TIMEOUT`,
    /// `RELAY_CSTORE_BAD_MAX_PDU` or `RELAY_CSTORE_BAD_ASSOCIATIONS` for a
    /// setting out of range.
    pub fn new(config: CStoreConfig) -> Result<Self> {
        check_ae("calling", &config.calling_ae)?;
        check_ae("called", &config.called_ae)?;
        check_address(&config.address)?;
        if config.connect_timeout.is_zero() || config.io_timeout.is_zero() {
            return Err(Error::invalid(
                "RELAY_CSTORE_BAD_TIMEOUT",
                "C-STORE timeouts must be greater than zero",
            ));
        }
        if !(MINIMUM_PDU_SIZE..=MAX_PDU_LIMIT).contains(&config.max_pdu) {
            return Err(Error::invalid(
                "RELAY_CSTORE_BAD_MAX_PDU",
                format!("max_pdu must be between {MINIMUM_PDU_SIZE} and {MAX_PDU_LIMIT} bytes"),
            ));
        }
        if !(1..=MAX_ASSOCIATIONS).contains(&config.associations) {
            return Err(Error::invalid(
                "RELAY_CSTORE_BAD_ASSOCIATIONS",
                format!("associations must be between 1 and {MAX_ASSOCIATIONS}"),
            ));
        }
        Ok(Self {
            config,
            state: Arc::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &CStoreConfig {
        &self.config
    }

    /// Map a dicom-ul failure: a permanent association rejection (e.g.
    /// called AE title not recognized) is permanent, everything else
    /// (refused, reset, timed out, transient rejection) may pass.
    fn ul_error(&self, during: &str, e: UlError) -> Error {
        if let UlError::Rejected { association_rj, .. } = &e {
            let permanent = matches!(association_rj.result, AssociationRJResult::Permanent);
            let reason = format!(
                "{self}: association rejected ({}): {}",
                if permanent { "permanent" } else { "transient" },
                association_rj.source
            );
            return if permanent {
                Error::pacs_permanent(reason, Some(Box::new(e)))
            } else {
                Error::pacs_transient(reason, Some(Box::new(e)))
            };
        }
        Error::pacs_transient(
            format!("{self}: {during}: {}", chain(&e)),
            Some(Box::new(e)),
        )
    }

    /// Request an association proposing `contexts` (abstract syntax, one
    /// transfer syntax each, ids 1, 3, 5, … in order) and, for each SOP
    /// class of `scp_roles`, the SCP role only for us (SCP/SCU Role
    /// Selection, for the C-STORE sub-operations of a C-GET). Returns the
    /// connection and, per proposed context, its id if accepted; `None`
    /// when the PACS accepted none of them (dicom-ul has then aborted).
    async fn associate(
        &self,
        contexts: &[(String, String)],
        scp_roles: &[&str],
    ) -> Result<Option<(Conn, Vec<Option<u8>>)>> {
        let c = &self.config;
        let mut opts = ClientAssociationOptions::new()
            .calling_ae_title(c.calling_ae.as_str())
            .called_ae_title(c.called_ae.as_str())
            .max_pdu_length(c.max_pdu)
            .connection_timeout(c.connect_timeout)
            .read_timeout(c.io_timeout)
            .write_timeout(c.io_timeout);
        for (abstract_syntax, ts) in contexts {
            opts = opts.with_presentation_context(abstract_syntax.as_str(), vec![ts.as_str()]);
        }
        for class in scp_roles {
            opts = opts.with_role_selection(*class, false, true);
        }
        let limit = c.connect_timeout + c.io_timeout;
        let assoc =
            match tokio::time::timeout(limit, opts.establish_async(c.address.as_str())).await {
                Err(_) => {
                    return Err(Error::pacs_transient(
                        format!("{self}: no association within {limit:?}"),
                        None,
                    ));
                }
                Ok(Err(UlError::NoAcceptedPresentationContexts { .. })) => return Ok(None),
                Ok(Err(e)) => return Err(self.ul_error("association request", e)),
                Ok(Ok(a)) => a,
            };
        let mut conn = Conn::new(assoc, c, self.to_string());
        // TCP_NODELAY, set right after the association is up. Each C-STORE
        // is write-write-read: the command PDU, full data PDUs, a short last
        // PDU, then we wait for the response. With Nagle's algorithm that
        // short last PDU waits in our kernel until the data before it is
        // ACKed, and the PACS delays that ACK by up to 40 ms: one stall per
        // instance. dcmtk's storescu does not set TCP_NODELAY and manages
        // about 20 instances/s into Orthanc on loopback (~40 ms each).
        // Measured here with 200 x 0.5 MiB into Orthanc (quick ACKs on in
        // both cases): without TCP_NODELAY 20 instances/s, with it 107-140.
        // We write whole PDUs per call, so
        // disabling Nagle sends no tiny segments. The other direction (the
        // PACS's response waiting for our ACK) is handled in `Conn::receive`.
        if let Err(e) = conn.assoc.inner_stream().set_nodelay(true) {
            conn.abort().await;
            return Err(Error::pacs_transient(
                format!("{self}: set TCP_NODELAY: {e}"),
                Some(Box::new(e)),
            ));
        }
        let negotiated = conn.assoc.presentation_contexts();
        let accepted = contexts
            .iter()
            .enumerate()
            .map(|(i, (_, ts))| {
                // i < MAX_CONTEXTS (128), so the id fits in a u8.
                let id = (2 * i + 1) as u8;
                negotiated
                    .iter()
                    .find(|pc| {
                        pc.id == id && pc.transfer_syntax.trim_end_matches(['\0', ' ']) == ts
                    })
                    .map(|pc| pc.id)
            })
            .collect();
        Ok(Some((conn, accepted)))
    }

    /// Deliver a contiguous group of instances over one association (or
    /// one per [`MAX_CONTEXTS`] distinct contexts), returning their
    /// outcomes in order.
    async fn deliver_group(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<Vec<(Uid, InstanceOutcome)>> {
        let mut out = Vec::with_capacity(instances.len());
        let mut start = 0;
        while start < instances.len() {
            let mut seen = HashSet::new();
            let end = instances[start..]
                .iter()
                .position(|i| {
                    seen.insert((&i.dicom.sop_class_uid, &i.dicom.transfer_syntax));
                    seen.len() > MAX_CONTEXTS
                })
                .map_or(instances.len(), |n| start + n);
            self.deliver_run(&instances[start..end], source, &mut out)
                .await?;
            start = end;
        }
        Ok(out)
    }

    /// Deliver a run of instances (at most [`MAX_CONTEXTS`] distinct
    /// contexts) over one association, appending their outcomes.
    async fn deliver_run(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
        out: &mut Vec<(Uid, InstanceOutcome)>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut contexts: Vec<(String, String)> = Vec::new();
        let context_of: Vec<usize> = instances
            .iter()
            .map(|i| {
                let key = (
                    i.dicom.sop_class_uid.to_string(),
                    i.dicom.transfer_syntax.to_string(),
                );
                contexts.iter().position(|c| *c == key).unwrap_or_else(|| {
                    contexts.push(key);
                    contexts.len() - 1
                })
            })
            .collect();
        let Some((mut conn, accepted)) = self.associate(&contexts, &[]).await? else {
            tracing::debug!(sink = %self, contexts = contexts.len(), "C-STORE: no presentation context accepted");
            out.extend(
                instances
                    .iter()
                    .map(|i| (i.dicom.sop_instance_uid.clone(), not_accepted(i))),
            );
            return Ok(());
        };
        let mut bytes = 0u64;
        for (inst, &ci) in instances.iter().zip(&context_of) {
            let outcome = match accepted[ci] {
                None => not_accepted(inst),
                Some(id) => match self.store(&mut conn, id, inst, source).await {
                    Ok((outcome, n)) => {
                        bytes += n;
                        if outcome.is_delivered() {
                            self.state.acknowledged(inst);
                        }
                        outcome
                    }
                    Err(e) => {
                        conn.abort().await;
                        tracing::debug!(sink = %self, error = %e, "C-STORE association aborted");
                        return Err(e);
                    }
                },
            };
            out.push((inst.dicom.sop_instance_uid.clone(), outcome));
        }
        let released = conn.release().await;
        tracing::debug!(
            sink = %self,
            instances = instances.len(),
            contexts = contexts.len(),
            accepted = accepted.iter().flatten().count(),
            data_set_bytes = bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            released = released.is_ok(),
            "C-STORE association done"
        );
        if let Err(e) = released {
            // Every response is in: the instances are stored whatever the
            // release does.
            tracing::warn!(sink = %self, error = %e, "C-STORE: A-RELEASE failed");
        }
        Ok(())
    }

    /// Store one instance on an established association. Returns its
    /// outcome and the data set bytes sent. Any `Err` leaves the
    /// association unusable: the caller aborts it.
    async fn store(
        &self,
        conn: &mut Conn,
        ctx: u8,
        inst: &Instance,
        source: &dyn InstanceSource,
    ) -> Result<(InstanceOutcome, u64)> {
        let mut stream = source.open(inst).await?;
        let message_id = conn.next_message_id();
        let mut head: Vec<u8> = Vec::with_capacity(PREFIX);
        let mut skip: Option<u64> = None;
        let mut sent = 0u64;
        while let Some(piece) = stream.next().await {
            // A source error (I/O, size or digest mismatch) propagates
            // before the last fragment is sent: the caller aborts.
            let piece = piece?;
            let mut data: &[u8] = &piece;
            let to_skip = match skip {
                Some(s) => s,
                None => {
                    let take = (PREFIX - head.len()).min(data.len());
                    head.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if head.len() < PREFIX {
                        continue;
                    }
                    data_set_offset(&head)? - PREFIX as u64
                }
            };
            let now = to_skip.min(data.len() as u64);
            skip = Some(to_skip - now);
            // now <= data.len(), so it fits in usize.
            data = &data[now as usize..];
            if data.is_empty() {
                continue;
            }
            if sent == 0 {
                let command = dimse::c_store_rq(
                    inst.dicom.sop_class_uid.as_str(),
                    inst.dicom.sop_instance_uid.as_str(),
                    message_id,
                );
                conn.send_whole(ctx, true, &command).await?;
                conn.data_begin();
            }
            conn.data_push(ctx, data).await?;
            sent += data.len() as u64;
        }
        if skip != Some(0) {
            return Err(Error::Dicom(DicomError::NotDicom {
                reason: "the file ends inside its file meta group".into(),
            }));
        }
        if sent == 0 {
            return Err(Error::Dicom(DicomError::Malformed {
                offset: inst.size,
                reason: "no data set after the file meta group".into(),
            }));
        }
        // The source has ended without error: commit.
        conn.data_end(ctx).await?;
        let (rsp, _) = conn.read_message(ctx, MAX_COMMAND).await?;
        if rsp.command_field != C_STORE_RSP || rsp.responding_to != message_id {
            return Err(conn.protocol(format!(
                "expected C-STORE-RSP to message {message_id}, got command 0x{:04X} to {}",
                rsp.command_field, rsp.responding_to
            )));
        }
        let outcome = dimse::store_outcome(rsp.status, rsp.error_comment.as_deref());
        Ok((outcome, sent))
    }
}

#[async_trait]
impl PacsSink for CStoreSink {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        let mut report = DeliveryReport::new(Vec::with_capacity(instances.len()));
        // One association per group, all at once in this task (the source
        // is borrowed). Every group runs to its end even when another one
        // fails, so what it stored is confirmed by the caller's `verify`
        // and not sent again.
        let groups = split_by_bytes(instances, self.config.associations);
        let results =
            futures::future::join_all(groups.iter().map(|g| self.deliver_group(g, source))).await;
        // `Err` means nothing is known about the batch: the first error
        // (in input order) stands for the whole call.
        for r in results {
            report.outcomes.extend(r?);
        }
        Ok(report)
    }

    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        self.verify_instances(instances).await
    }
}

/// An established association with its PDU framing state.
///
/// P-DATA PDUs are framed here rather than with dicom-ul's
/// `AsyncPDataWriter`: that writer sends its buffered data as the *last*
/// fragment when it is dropped, so an error path or a cancelled future would
/// commit a truncated instance. Here the last-fragment flag is only ever set
/// by [`data_end`](Self::data_end); dropping a `Conn` mid-instance just
/// closes the socket, and the PACS discards the incomplete message.
struct Conn {
    assoc: AsyncClientAssociation<TcpStream>,
    /// PDVs received but not consumed yet (a PDU may carry several).
    pending: VecDeque<PDataValue>,
    io_timeout: Duration,
    /// Largest PDU we receive (our proposed maximum).
    max_receive: u32,
    /// Largest PDV value we send: the PDU maximum of both sides minus the
    /// PDV item header, even.
    max_value: usize,
    /// The data PDU being filled: header, then up to `max_value` bytes.
    buf: Vec<u8>,
    message_id: u16,
    /// A write was cut short: the stream is not at a PDU boundary, so no
    /// A-ABORT may be sent (its bytes could complete the partial PDU).
    broken: bool,
    /// `c-store:CALLED@host:port`, for messages.
    label: String,
}

impl Conn {
    fn new(assoc: AsyncClientAssociation<TcpStream>, config: &CStoreConfig, label: String) -> Self {
        // dicom-ul reports an unlimited peer (0) as its largest size.
        let max_pdu = assoc.acceptor_max_pdu_length().min(config.max_pdu);
        let max_value = (max_pdu.saturating_sub(PDV_OVERHEAD).max(2) & !1) as usize;
        Self {
            assoc,
            pending: VecDeque::new(),
            io_timeout: config.io_timeout,
            max_receive: config.max_pdu,
            max_value,
            buf: Vec::with_capacity(PDATA_HEADER + max_value),
            message_id: 0,
            broken: false,
            label,
        }
    }

    fn next_message_id(&mut self) -> u16 {
        self.message_id = self.message_id.checked_add(1).unwrap_or(1);
        self.message_id
    }

    /// A protocol violation by the peer: permanent.
    fn protocol(&self, what: impl fmt::Display) -> Error {
        Error::pacs_permanent(format!("{}: protocol error: {what}", self.label), None)
    }

    /// Write the PDU being built in `buf`.
    async fn write_buf(&mut self) -> Result<()> {
        let stream = self.assoc.inner_stream();
        let res = tokio::time::timeout(self.io_timeout, stream.write_all(&self.buf)).await;
        self.written(res)
    }

    /// Write a whole PDU.
    async fn write_pdu(&mut self, pdu: &[u8]) -> Result<()> {
        let stream = self.assoc.inner_stream();
        let res = tokio::time::timeout(self.io_timeout, stream.write_all(pdu)).await;
        self.written(res)
    }

    /// The result of a timed write; a failed or cut-short write leaves the
    /// stream mid-PDU.
    fn written(
        &mut self,
        res: std::result::Result<std::io::Result<()>, tokio::time::error::Elapsed>,
    ) -> Result<()> {
        let err = match res {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                Error::pacs_transient(format!("{}: send: {e}", self.label), Some(Box::new(e)))
            }
            Err(_) => Error::pacs_transient(
                format!("{}: send timed out after {:?}", self.label, self.io_timeout),
                None,
            ),
        };
        self.broken = true;
        Err(err)
    }

    /// Send a small message part (a command set or a C-FIND identifier) in
    /// as many PDVs as needed, the last one flagged.
    async fn send_whole(&mut self, ctx: u8, command: bool, value: &[u8]) -> Result<()> {
        let parts = value.len().div_ceil(self.max_value).max(1);
        for (i, part) in value.chunks(self.max_value).enumerate() {
            let mut pdu = vec![0u8; PDATA_HEADER];
            pdu.extend_from_slice(part);
            dimse::set_pdata_header(&mut pdu, ctx, command, i + 1 == parts);
            self.write_pdu(&pdu).await?;
        }
        Ok(())
    }

    /// Start a streamed data set.
    fn data_begin(&mut self) {
        self.buf.clear();
        self.buf.resize(PDATA_HEADER, 0);
    }

    /// Append data set bytes. A full PDU is sent (not last) only once more
    /// data follows it, so the final PDU is always still held when the
    /// source ends and can carry the last-fragment flag.
    async fn data_push(&mut self, ctx: u8, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.buf.len() - PDATA_HEADER == self.max_value {
                dimse::set_pdata_header(&mut self.buf, ctx, false, false);
                self.write_buf().await?;
                self.buf.truncate(PDATA_HEADER);
            }
            let room = self.max_value - (self.buf.len() - PDATA_HEADER);
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Send the held PDU with the last-fragment flag: the PACS now stores
    /// the instance.
    async fn data_end(&mut self, ctx: u8) -> Result<()> {
        dimse::set_pdata_header(&mut self.buf, ctx, false, true);
        self.write_buf().await?;
        self.buf.truncate(PDATA_HEADER);
        Ok(())
    }

    /// Receive one PDU, making the kernel ACK every read at once.
    ///
    /// This is dicom-ul's `read_pdu_from_wire_async` plus TCP_QUICKACK
    /// (Linux) after each read. dcmtk-based peers (Orthanc, storescp) write
    /// each response PDU in two calls, the 12-byte PDU and PDV header and
    /// then the command, without TCP_NODELAY: their kernel holds the second
    /// part until we ACK the first. Having just sent the data set we are in
    /// Linux's interactive ("pingpong") mode, which delays that ACK up to
    /// 40 ms. Measured against Orthanc 1.10 with TCP_NODELAY alone: the
    /// command of every C-STORE response came 42 ms after its header, 18
    /// instances/s. Setting TCP_QUICKACK once before waiting was not enough
    /// (half the responses still stalled); set after the header was read,
    /// it sends the ACK right away.
    async fn receive(&mut self) -> Result<Pdu> {
        let (max, timeout) = (self.max_receive, self.io_timeout);
        let (stream, buf) = AsyncAssociation::get_mut(&mut self.assoc);
        loop {
            let mut cur = std::io::Cursor::new(&buf[..]);
            match dicom_ul::pdu::read_pdu(&mut cur, max, true) {
                Ok(Some(pdu)) => {
                    // The position is within `buf`, so it fits in usize.
                    let used = cur.position() as usize;
                    buf.advance(used);
                    return Ok(pdu);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::pacs_permanent(
                        format!("{}: protocol error: {}", self.label, chain(&e)),
                        Some(Box::new(e)),
                    ));
                }
            }
            let read = match tokio::time::timeout(timeout, stream.read_buf(buf)).await {
                Err(_) => {
                    return Err(Error::pacs_transient(
                        format!("{}: no response within {timeout:?}", self.label),
                        None,
                    ));
                }
                Ok(Err(e)) => {
                    return Err(Error::pacs_transient(
                        format!("{}: receive: {e}", self.label),
                        Some(Box::new(e)),
                    ));
                }
                Ok(Ok(n)) => n,
            };
            if read == 0 {
                return Err(Error::pacs_transient(
                    format!("{}: the PACS closed the connection", self.label),
                    None,
                ));
            }
            #[cfg(target_os = "linux")]
            if let Err(e) = socket2::SockRef::from(&*stream).set_tcp_quickack(true) {
                tracing::trace!(error = %e, "TCP_QUICKACK");
            }
        }
    }

    async fn next_pdv(&mut self) -> Result<PDataValue> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Ok(v);
            }
            match self.receive().await? {
                Pdu::PData { data } => self.pending.extend(data),
                Pdu::AbortRQ { source } => {
                    return Err(Error::pacs_transient(
                        format!(
                            "{}: the PACS aborted the association ({source:?})",
                            self.label
                        ),
                        None,
                    ));
                }
                other => {
                    return Err(self.protocol(format!("unexpected {}", other.short_description())));
                }
            }
        }
    }

    /// Read one message on `ctx`: its command set, and its data set (at
    /// most `max_data` bytes) if the command announces one.
    async fn read_message(
        &mut self,
        ctx: u8,
        max_data: usize,
    ) -> Result<(dimse::Response, Vec<u8>)> {
        let mut command = Vec::new();
        loop {
            let v = self.next_pdv().await?;
            if v.value_type != PDataValueType::Command || v.presentation_context_id != ctx {
                return Err(self.protocol("expected a command fragment"));
            }
            command.extend_from_slice(&v.data);
            if command.len() > MAX_COMMAND {
                return Err(self.protocol("command set too large"));
            }
            if v.is_last {
                break;
            }
        }
        let rsp = dimse::parse_response(&command).map_err(|e| self.protocol(e))?;
        let mut data = Vec::new();
        if rsp.has_data_set {
            loop {
                let v = self.next_pdv().await?;
                if v.value_type != PDataValueType::Data || v.presentation_context_id != ctx {
                    return Err(self.protocol("expected a data set fragment"));
                }
                data.extend_from_slice(&v.data);
                if data.len() > max_data {
                    return Err(self.protocol("response data set too large"));
                }
                if v.is_last {
                    break;
                }
            }
        }
        Ok((rsp, data))
    }

    /// A-RELEASE, then close.
    async fn release(self) -> std::result::Result<(), String> {
        let t = self.io_timeout;
        match tokio::time::timeout(t, self.assoc.release()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(chain(&e)),
            Err(_) => Err(format!("no A-RELEASE response within {t:?}")),
        }
    }

    /// A-ABORT (as service user), then close. Anything the PACS had not
    /// received completely is discarded.
    async fn abort(mut self) {
        let grace = self.io_timeout.min(ABORT_GRACE);
        if !self.broken {
            let pdu = Pdu::AbortRQ {
                source: AbortRQSource::ServiceUser,
            };
            let _ = tokio::time::timeout(grace, self.assoc.send(&pdu)).await;
        }
        let _ = tokio::time::timeout(grace, self.assoc.inner_stream().shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failure must panic

    use super::*;

    fn sized(sizes: &[u64]) -> Vec<Instance> {
        let (_, insts) = relaypacs_core::testing::pacs_sink::study(1).unwrap();
        sizes
            .iter()
            .map(|&size| {
                let mut i = insts[0].clone();
                i.size = size;
                i
            })
            .collect()
    }

    fn lens(groups: &[&[Instance]]) -> Vec<usize> {
        groups.iter().map(|g| g.len()).collect()
    }

    #[test]
    fn split_is_contiguous_non_empty_and_balanced_by_bytes() {
        assert!(split_by_bytes(&[], 3).is_empty());
        let even = sized(&[10; 12]);
        assert_eq!(lens(&split_by_bytes(&even, 1)), vec![12]);
        assert_eq!(lens(&split_by_bytes(&even, 2)), vec![6, 6]);
        assert_eq!(lens(&split_by_bytes(&even, 3)), vec![4, 4, 4]);
        assert_eq!(lens(&split_by_bytes(&even, 5)), vec![3, 2, 3, 2, 2]);
        // Never more groups than instances.
        assert_eq!(lens(&split_by_bytes(&even[..2], 8)), vec![1, 1]);
        // By bytes, not count; every group keeps at least one instance.
        assert_eq!(
            lens(&split_by_bytes(&sized(&[100, 1, 1]), 3)),
            vec![1, 1, 1]
        );
        assert_eq!(
            lens(&split_by_bytes(&sized(&[1, 1, 100]), 3)),
            vec![1, 1, 1]
        );
        assert_eq!(
            lens(&split_by_bytes(&sized(&[30, 1, 1, 1, 1, 30]), 2)),
            vec![3, 3]
        );
        assert_eq!(lens(&split_by_bytes(&sized(&[0, 0, 0, 0]), 2)), vec![2, 2]);
        for n in 1..=8 {
            let groups = split_by_bytes(&even, n);
            assert_eq!(groups.concat(), even, "{n}");
        }
    }
}

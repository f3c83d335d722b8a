//! [`JsonlAuditSink`]: a tamper-evident, hash-chained audit trail in JSON lines.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use relaypacs_core::{AuditEvent, AuditSink, Error, Result, StorageErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::audit_anchor::{default_anchor_path, read_anchor, sweep_anchor_temps, write_anchor};
use crate::fs::{create_dir_durable, fsync_dir};

/// The head of a hash chain: how many records, and the last record's hash.
/// Keep a copy elsewhere (an external anchor) to detect truncation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// Number of records.
    pub count: u64,
    /// Hash of the last record (all zero for an empty chain).
    #[serde(with = "hex_array")]
    pub hash: [u8; 32],
}

mod hex_array {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// What is wrong with the first record that fails verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainErrorKind {
    /// The trail (or a line of it) cannot be read.
    Unreadable,
    /// The last line has no end: a write cut short (never acknowledged),
    /// or a tail cut in the middle of a record.
    Torn,
    /// The line is not a chain record (not JSON, missing fields).
    Malformed,
    /// The record's sequence number is not its position: a record before it
    /// was removed, or records were inserted or reordered.
    OutOfSequence,
    /// The record does not carry the previous record's hash.
    Unlinked,
    /// The record's content does not hash to the hash it carries: changed
    /// after it was written.
    HashMismatch,
    /// The record's event is not an audit event.
    NotAnEvent,
    /// The trail is shorter than the anchor says: its tail was cut.
    Truncated,
    /// The record at the anchored position is not the anchored one.
    AnchorMismatch,
}

/// Why a chain failed verification, naming the first bad record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainError {
    /// First record that does not verify (0-based position; equals the
    /// sequence number it should carry).
    pub index: u64,
    /// Its line number in the trail file (1-based; 0 for the whole file).
    pub line: u64,
    /// The sequence number the record carries, when it could be read.
    pub seq: Option<u64>,
    /// What kind of defect.
    pub kind: ChainErrorKind,
    /// What is wrong with it, in words.
    pub reason: String,
}

impl ChainError {
    pub(crate) fn at(
        index: u64,
        seq: Option<u64>,
        kind: ChainErrorKind,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            index,
            line: index + 1,
            seq,
            kind,
            reason: reason.into(),
        }
    }

    pub(crate) fn file(reason: impl Into<String>) -> Self {
        Self {
            index: 0,
            line: 0,
            seq: None,
            kind: ChainErrorKind::Unreadable,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "audit trail unreadable: {}", self.reason);
        }
        write!(
            f,
            "audit chain broken at record {} (line {}",
            self.index, self.line
        )?;
        if let Some(seq) = self.seq {
            write!(f, ", seq {seq}")?;
        }
        write!(f, "): {}", self.reason)
    }
}

impl std::error::Error for ChainError {}

#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    prev: String,
    hash: String,
    event: &'a RawValue,
}

#[derive(Deserialize)]
struct LineIn<'a> {
    seq: u64,
    prev: String,
    hash: String,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// Only the sequence number, to name a record whose other fields are bad.
#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

pub(crate) fn link_hash(prev: &[u8; 32], seq: u64, event_json: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_le_bytes());
    h.update(event_json.as_bytes());
    h.finalize().into()
}

/// Verify a chain read from `reader` from its first record, and, with an
/// `anchor` (a head recorded earlier, outside the trail), that the chain
/// still holds it: at least `anchor.count` records, the record at that
/// position hashing to `anchor.hash`. Every verified event is passed to
/// `on_event` with its position. Returns the head.
///
/// Detects a changed byte, a removed, inserted or reordered record, and,
/// against an anchor, a cut tail. The first bad record is named in the
/// error. Reads line by line: memory is bounded by the longest record.
pub fn verify_reader<R: BufRead>(
    mut reader: R,
    anchor: Option<ChainHead>,
    mut on_event: impl FnMut(u64, AuditEvent),
) -> std::result::Result<ChainHead, ChainError> {
    use ChainErrorKind as K;
    let mut head = ChainHead {
        count: 0,
        hash: [0; 32],
    };
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let index = head.count;
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| ChainError::at(index, None, K::Unreadable, format!("unreadable: {e}")))?;
        if n == 0 {
            break;
        }
        let seq_hint = serde_json::from_slice::<SeqOnly>(buf.trim_ascii_end())
            .ok()
            .map(|s| s.seq);
        let bad = |kind, reason: String| ChainError::at(index, seq_hint, kind, reason);
        if buf.last() != Some(&b'\n') {
            return Err(bad(
                K::Torn,
                "the last record has no end of line: a write cut short (never \
                 acknowledged; the server cuts it when it opens the trail) or a \
                 tail cut inside a record"
                    .into(),
            ));
        }
        let line = &buf[..buf.len() - 1];
        let rec: LineIn<'_> = serde_json::from_slice(line)
            .map_err(|e| bad(K::Malformed, format!("not a chain record: {e}")))?;
        if rec.seq != index {
            let why = if rec.seq > index {
                format!(
                    "carries sequence number {} where {index} was expected: record {index} \
                     is missing, or records were reordered",
                    rec.seq
                )
            } else {
                format!(
                    "carries sequence number {} where {index} was expected: a record was \
                     repeated, inserted or moved",
                    rec.seq
                )
            };
            return Err(bad(K::OutOfSequence, why));
        }
        if rec.prev != hex::encode(head.hash) {
            return Err(bad(
                K::Unlinked,
                "does not carry the previous record's hash".into(),
            ));
        }
        let h = link_hash(&head.hash, rec.seq, rec.event.get());
        if rec.hash != hex::encode(h) {
            return Err(bad(
                K::HashMismatch,
                "content does not match its hash (changed after it was written)".into(),
            ));
        }
        let event = serde_json::from_str::<AuditEvent>(rec.event.get())
            .map_err(|e| bad(K::NotAnEvent, format!("not an audit event: {e}")))?;
        if let Some(a) = anchor
            && a.count == index + 1
            && a.hash != h
        {
            return Err(bad(
                K::AnchorMismatch,
                format!(
                    "differs from the anchored head ({} records, last hash {}): the trail \
                     was rewritten",
                    a.count,
                    hex::encode(a.hash)
                ),
            ));
        }
        on_event(index, event);
        head = ChainHead {
            count: index + 1,
            hash: h,
        };
    }
    if let Some(a) = anchor
        && head.count < a.count
    {
        return Err(ChainError::at(
            head.count,
            None,
            K::Truncated,
            format!(
                "missing: the trail ends after {} records but the anchor records {}; the \
                 last {} records were cut",
                head.count,
                a.count,
                a.count - head.count
            ),
        ));
    }
    Ok(head)
}

/// Verify the trail at `path`, against `anchor` when given (see
/// [`verify_reader`]); returns its head.
pub fn verify_trail(
    path: &Path,
    anchor: Option<ChainHead>,
) -> std::result::Result<ChainHead, ChainError> {
    let f = File::open(path).map_err(|e| ChainError::file(format!("cannot open: {e}")))?;
    verify_reader(BufReader::new(f), anchor, |_, _| {})
}

/// Verify the trail at `path` (against `anchor` when given) and return its
/// events, oldest first: what an export reads.
pub fn read_verified_events(
    path: &Path,
    anchor: Option<ChainHead>,
) -> std::result::Result<(ChainHead, Vec<AuditEvent>), ChainError> {
    let f = File::open(path).map_err(|e| ChainError::file(format!("cannot open: {e}")))?;
    let mut events = Vec::new();
    let head = verify_reader(BufReader::new(f), anchor, |_, e| events.push(e))?;
    Ok((head, events))
}

/// Verify a chain file from its first record; returns its head.
///
/// Detects a changed byte, a removed, inserted or reordered record. A cut
/// tail is only detectable against an anchor: see [`verify_chain_against`].
pub fn verify_chain(path: &Path) -> std::result::Result<ChainHead, ChainError> {
    verify_trail(path, None)
}

/// Verify a chain and check it still contains `anchor` (a head recorded
/// earlier): detects a truncated tail as well.
pub fn verify_chain_against(
    path: &Path,
    anchor: ChainHead,
) -> std::result::Result<ChainHead, ChainError> {
    verify_trail(path, Some(anchor))
}

/// When [`JsonlAuditSink`] anchors its chain head outside the trail (see
/// [`crate::audit_anchor`]). It always anchors when it opens the trail and
/// at [`close`](AuditSink::close); these options add the periodic anchors.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditTrailOptions {
    /// The anchor file; `None`: [`default_anchor_path`] of the trail.
    pub anchor_path: Option<PathBuf>,
    /// Anchor once this many records were appended since the last anchor
    /// (0: not by count).
    pub anchor_every_records: u64,
    /// Anchor when the head is older than this: checked at each append and,
    /// when the trail is opened inside a tokio runtime, by a timer task
    /// (`None`: not by time; zero: at every append).
    pub anchor_interval: Option<Duration>,
}

impl Default for AuditTrailOptions {
    /// Anchor beside the trail, every 1,000 records and every 10 seconds.
    fn default() -> Self {
        Self {
            anchor_path: None,
            anchor_every_records: 1000,
            anchor_interval: Some(Duration::from_secs(10)),
        }
    }
}

impl AuditTrailOptions {
    /// The anchor file (default: beside the trail).
    pub fn anchor_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.anchor_path = Some(path.into());
        self
    }

    /// Anchor every `n` records (0: not by count).
    pub fn anchor_every_records(mut self, n: u64) -> Self {
        self.anchor_every_records = n;
        self
    }

    /// Anchor every `every` (`None`: not by time).
    pub fn anchor_interval(mut self, every: Option<Duration>) -> Self {
        self.anchor_interval = every;
        self
    }
}

/// An [`AuditSink`] appending hash-chained JSON lines to a file, the
/// embedded default. Each line carries the SHA-256 of the previous one; each
/// append is `fdatasync`ed before `record` returns. The chain head is
/// anchored in a separate file (see [`AuditTrailOptions`]); the trail is
/// never rotated (one file grows).
#[derive(Clone)]
pub struct JsonlAuditSink {
    path: PathBuf,
    anchor_path: PathBuf,
    state: Arc<Mutex<State>>,
}

struct State {
    file: File,
    head: ChainHead,
    anchor_path: PathBuf,
    /// The head last written to the anchor file.
    anchored: ChainHead,
    /// When the anchor was last written (or its writing last failed).
    anchored_at: Instant,
    every_records: u64,
    interval: Option<Duration>,
}

impl State {
    /// Whether a head of `count` records is due for a periodic anchor.
    fn anchor_due(&self, count: u64) -> bool {
        let by_count = self.every_records > 0
            && count.saturating_sub(self.anchored.count) >= self.every_records;
        let by_time = self
            .interval
            .is_some_and(|t| self.anchored_at.elapsed() >= t);
        count != self.anchored.count && (by_count || by_time)
    }

    /// Write the current head to the anchor (blocking, under the lock, so
    /// anchors never go backwards).
    async fn anchor_now(&mut self) -> Result<()> {
        if self.head == self.anchored {
            return Ok(());
        }
        let (path, head) = (self.anchor_path.clone(), self.head);
        let res = tokio::task::spawn_blocking(move || write_anchor(&path, head))
            .await
            .map_err(|e| {
                Error::storage(StorageErrorKind::Io, "audit anchor task", e.to_string())
            })?;
        self.anchored_at = Instant::now();
        res?;
        self.anchored = head;
        Ok(())
    }
}

impl fmt::Debug for JsonlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlAuditSink")
            .field("path", &self.path)
            .field("anchor_path", &self.anchor_path)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JsonlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "jsonl-audit:{}", self.path.display())
    }
}

impl JsonlAuditSink {
    /// Open (or create) the trail at `path` with the default
    /// [`AuditTrailOptions`] (anchor beside the trail).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, AuditTrailOptions::default())
    }

    /// Open (or create) the trail at `path`. The existing chain is verified,
    /// against the anchor when there is one; a torn last line left by a
    /// crash (never acknowledged) is cut off, any other defect (a cut tail
    /// included) refuses to open. The head is then anchored.
    pub fn open_with(path: impl AsRef<Path>, options: AuditTrailOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let anchor_path = options
            .anchor_path
            .clone()
            .unwrap_or_else(|| default_anchor_path(&path));
        if let Some(dir) = path.parent() {
            create_dir_durable(dir)?;
        }
        if let Some(dir) = anchor_path.parent() {
            create_dir_durable(dir)?;
        }
        sweep_anchor_temps(&anchor_path)?;
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open audit trail", e))?;
        if !existed {
            fsync_dir(path.parent().unwrap_or(Path::new(".")))?;
        }
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("seek audit trail", e))?;
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read audit trail", e))?;
        let complete = bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0) as u64;
        if complete < len {
            file.set_len(complete)
                .map_err(|e| Error::io("cut torn audit record", e))?;
            file.sync_data()
                .map_err(|e| Error::io("fsync audit trail", e))?;
        }
        let anchor = read_anchor(&anchor_path)
            .map_err(|e| Error::storage(StorageErrorKind::Corrupt, "read audit anchor", e))?;
        let head = verify_trail(&path, anchor.map(|a| a.head))
            .map_err(|e| Error::storage(StorageErrorKind::Corrupt, "verify audit trail", e))?;
        if anchor.map(|a| a.head) != Some(head) {
            write_anchor(&anchor_path, head)?;
        }
        let state = Arc::new(Mutex::new(State {
            file,
            head,
            anchor_path: anchor_path.clone(),
            anchored: head,
            anchored_at: Instant::now(),
            every_records: options.anchor_every_records,
            interval: options.anchor_interval,
        }));
        // A zero interval anchors at every append; only a positive one
        // needs the timer (`tokio::time::interval` refuses zero).
        if let (Some(every), Ok(rt)) = (
            options.anchor_interval.filter(|d| !d.is_zero()),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(anchor_timer(Arc::downgrade(&state), every));
        }
        Ok(Self {
            path,
            anchor_path,
            state,
        })
    }

    /// The file the trail is written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file the chain head is anchored in.
    pub fn anchor_path(&self) -> &Path {
        &self.anchor_path
    }

    /// The current head, to anchor externally.
    pub async fn head(&self) -> ChainHead {
        self.state.lock().await.head
    }

    /// Write the current head to the anchor file now (crash-safe); returns it.
    pub async fn anchor(&self) -> Result<ChainHead> {
        let mut st = self.state.lock().await;
        st.anchor_now().await?;
        Ok(st.head)
    }
}

/// Anchor the head every `every` while the sink lives, when it moved.
async fn anchor_timer(state: Weak<Mutex<State>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the trail was just anchored
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let mut st = state.lock().await;
        if st.head != st.anchored
            && let Err(e) = st.anchor_now().await
        {
            // Nobody awaits this task: this is the one place the failure is seen.
            tracing::error!(error = %e, anchor = %st.anchor_path.display(), "could not anchor the audit trail");
        }
    }
}

#[async_trait]
impl AuditSink for JsonlAuditSink {
    async fn record(&self, event: &AuditEvent) -> Result<()> {
        let json = serde_json::to_string(event)
            .map_err(|e| Error::storage(StorageErrorKind::Io, "encode audit event", e))?;
        let raw = RawValue::from_string(json)
            .map_err(|e| Error::storage(StorageErrorKind::Io, "encode audit event", e))?;
        // The append and the chain-head update run in their own task, so a
        // caller that gives up (a client hanging up mid-request) cannot
        // leave a record written but the head not advanced: the next record
        // would repeat its sequence number and break the chain.
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut st = state.lock().await;
            let seq = st.head.count;
            let hash = link_hash(&st.head.hash, seq, raw.get());
            let new_head = ChainHead {
                count: seq + 1,
                hash,
            };
            let mut line = serde_json::to_vec(&LineOut {
                seq,
                prev: hex::encode(st.head.hash),
                hash: hex::encode(hash),
                event: &raw,
            })
            .map_err(|e| Error::storage(StorageErrorKind::Io, "encode audit record", e))?;
            line.push(b'\n');
            let mut file = st
                .file
                .try_clone()
                .map_err(|e| Error::io("clone audit handle", e))?;
            let anchor_to = st.anchor_due(seq + 1).then(|| st.anchor_path.clone());
            let res = tokio::task::spawn_blocking(
                move || -> std::io::Result<Option<Result<()>>> {
                    let end = file.seek(SeekFrom::End(0))?;
                    // Durable append: the record is acknowledged only after fdatasync.
                    if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
                        let _ = file.set_len(end); // keep the chain well-formed; a torn line is also cut at open
                        return Err(e);
                    }
                    // The periodic anchor, only once the record it counts is durable.
                    Ok(anchor_to.map(|p| write_anchor(&p, new_head)))
                },
            )
            .await
            .map_err(|e| {
                Error::storage(StorageErrorKind::Io, "audit append task", e.to_string())
            })?;
            let anchored = res.map_err(|e| Error::io("append audit record", e))?;
            st.head = new_head;
            match anchored {
                None => {}
                Some(Ok(())) => {
                    st.anchored = new_head;
                    st.anchored_at = Instant::now();
                }
                Some(Err(e)) => {
                    // The record is durable, so `record` succeeds; the anchor is
                    // retried at the next period. Logged here, the only place it is seen.
                    st.anchored_at = Instant::now();
                    tracing::error!(error = %e, anchor = %st.anchor_path.display(), "could not anchor the audit trail");
                }
            }
            Ok::<(), Error>(())
        })
        .await
        .map_err(|e| Error::storage(StorageErrorKind::Io, "audit append task", e.to_string()))??;
        Ok(())
    }

    async fn events(&self) -> Result<Vec<AuditEvent>> {
        let _st = self.state.lock().await; // a consistent snapshot: no append in between
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| Error::io("read audit trail", e))?;
        text.lines()
            .map(|l| {
                let rec: LineIn<'_> = serde_json::from_str(l).map_err(|e| {
                    Error::storage(StorageErrorKind::Corrupt, "parse audit trail", e)
                })?;
                serde_json::from_str(rec.event.get())
                    .map_err(|e| Error::storage(StorageErrorKind::Corrupt, "parse audit event", e))
            })
            .collect()
    }

    /// Anchor the current head (crash-safe), so that nothing appended
    /// before the stop can be cut unnoticed.
    async fn close(&self) -> Result<()> {
        self.anchor().await.map(|_| ())
    }
}

//! [`JsonlAuditSink`]: a tamper-evident, hash-chained audit trail in JSON lines.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use relaypacs_core::{AuditEvent, AuditSink, Error, Result, StorageErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

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

/// Why a chain failed verification; `index` is the first bad record (0-based).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at record {index}: {reason}")]
pub struct ChainError {
    /// First record that does not verify.
    pub index: u64,
    /// What is wrong with it.
    pub reason: String,
}

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

fn link_hash(prev: &[u8; 32], seq: u64, event_json: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_le_bytes());
    h.update(event_json.as_bytes());
    h.finalize().into()
}

/// Verify a chain file from its first record; returns its head.
///
/// Detects a changed byte, a removed, inserted or reordered record. A cut
/// tail is only detectable against an anchor: see [`verify_chain_against`].
pub fn verify_chain(path: &Path) -> std::result::Result<ChainHead, ChainError> {
    let f = File::open(path).map_err(|e| ChainError {
        index: 0,
        reason: format!("cannot open: {e}"),
    })?;
    let mut head = ChainHead {
        count: 0,
        hash: [0; 32],
    };
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let index = i as u64;
        let bad = |reason: String| ChainError { index, reason };
        let line = line.map_err(|e| bad(format!("unreadable: {e}")))?;
        let rec: LineIn<'_> =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a chain record: {e}")))?;
        if rec.seq != index {
            return Err(bad(format!(
                "sequence number {} where {index} was expected",
                rec.seq
            )));
        }
        if rec.prev != hex::encode(head.hash) {
            return Err(bad("does not link to the previous record".into()));
        }
        let h = link_hash(&head.hash, rec.seq, rec.event.get());
        if rec.hash != hex::encode(h) {
            return Err(bad("content does not match its hash".into()));
        }
        serde_json::from_str::<AuditEvent>(rec.event.get())
            .map_err(|e| bad(format!("not an audit event: {e}")))?;
        head = ChainHead {
            count: index + 1,
            hash: h,
        };
    }
    Ok(head)
}

/// Verify a chain and check it still contains `anchor` (a head recorded
/// earlier): detects a truncated tail as well.
pub fn verify_chain_against(
    path: &Path,
    anchor: ChainHead,
) -> std::result::Result<ChainHead, ChainError> {
    let head = verify_chain(path)?;
    if head.count < anchor.count {
        return Err(ChainError {
            index: head.count,
            reason: format!(
                "chain has {} records, the anchor saw {}",
                head.count, anchor.count
            ),
        });
    }
    if anchor.count > 0 {
        // Recompute the hash at the anchor's position.
        let f = File::open(path).map_err(|e| ChainError {
            index: 0,
            reason: format!("cannot open: {e}"),
        })?;
        let idx = anchor.count - 1;
        let line = BufReader::new(f)
            .lines()
            .nth(idx as usize)
            .and_then(|l| l.ok())
            .ok_or(ChainError {
                index: idx,
                reason: "record missing".into(),
            })?;
        let rec: LineIn<'_> = serde_json::from_str(&line).map_err(|e| ChainError {
            index: idx,
            reason: format!("not a chain record: {e}"),
        })?;
        if rec.hash != hex::encode(anchor.hash) {
            return Err(ChainError {
                index: idx,
                reason: "differs from the anchored record".into(),
            });
        }
    }
    Ok(head)
}

/// An [`AuditSink`] appending hash-chained JSON lines to a file, the
/// embedded default. Each line carries the SHA-256 of the previous one; each
/// append is `fdatasync`ed before `record` returns.
#[derive(Clone)]
pub struct JsonlAuditSink {
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

struct State {
    file: File,
    head: ChainHead,
}

impl fmt::Debug for JsonlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlAuditSink")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JsonlAuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "jsonl-audit:{}", self.path.display())
    }
}

impl JsonlAuditSink {
    /// Open (or create) the trail at `path`. The existing chain is verified;
    /// a torn last line left by a crash (never acknowledged) is cut off, any
    /// other defect refuses to open.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            create_dir_durable(dir)?;
        }
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
        let head = verify_chain(&path)
            .map_err(|e| Error::storage(StorageErrorKind::Corrupt, "verify audit trail", e))?;
        Ok(Self {
            path,
            state: Arc::new(Mutex::new(State { file, head })),
        })
    }

    /// The file the trail is written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current head, to anchor externally.
    pub async fn head(&self) -> ChainHead {
        self.state.lock().await.head
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
            let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let end = file.seek(SeekFrom::End(0))?;
                // Durable append: the record is acknowledged only after fdatasync.
                if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
                    let _ = file.set_len(end); // keep the chain well-formed; a torn line is also cut at open
                    return Err(e);
                }
                Ok(())
            })
            .await
            .map_err(|e| {
                Error::storage(StorageErrorKind::Io, "audit append task", e.to_string())
            })?;
            res.map_err(|e| Error::io("append audit record", e))?;
            st.head = ChainHead {
                count: seq + 1,
                hash,
            };
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
}

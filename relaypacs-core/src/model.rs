//! The upload session model: sessions hold files, files hold chunks.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::digest::Sha256Digest;
use crate::ids::{FileId, SessionId, Uid};
use crate::pacs_sink::Verification;
use crate::report_source::ReportRef;

/// Limits checked when sessions and files are created and chunks arrive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest declared size of one file (default 2 GiB).
    pub max_file_size: u64,
    /// Largest sum of declared file sizes in one session (default 20 GiB).
    pub max_session_size: u64,
    /// Most files in one session (default 10,000).
    pub max_files: u32,
    /// Smallest chunk, except the last chunk of a file (default 64 KiB).
    pub min_chunk_size: u64,
    /// Largest chunk (default 64 MiB).
    pub max_chunk_size: u64,
    /// Inactivity after which a session expires (default 24 h).
    pub session_ttl_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_size: 2 << 30,
            max_session_size: 20 << 30,
            max_files: 10_000,
            min_chunk_size: 64 << 10,
            max_chunk_size: 64 << 20,
            session_ttl_secs: 24 * 3600,
        }
    }
}

/// State of an upload session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SessionState {
    /// Files may be added and uploaded.
    Open,
    /// Completed and in the outbox: the delivery worker hands the files to
    /// the PACS sink, retrying with backoff (see [`SessionRecord::delivery`]).
    Forwarding,
    /// The PACS holds every instance: the sink accepted them and a
    /// verification after sending confirmed it.
    Delivered {
        /// When the verification confirmed.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        /// Sink description (e.g. "local-archive:/data/archive").
        sink: String,
        /// The weakest verification of any instance: `content` when the
        /// PACS returned every instance and each is what was sent,
        /// `presence-only` when for some only the UID could be found.
        #[serde(default = "legacy_verification")]
        verified: Verification,
    },
    /// Delivery failed permanently or ran out of attempts; waits for an
    /// admin to replay it.
    DeadLetter {
        /// When it was given up.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        /// The PACS's reason(s).
        reason: String,
    },
}

/// The outbox bookkeeping of a completed session: attempts, schedule,
/// what the PACS was confirmed to hold, and reports found afterwards.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Delivery {
    /// When the session entered the outbox (first completion or replay).
    #[serde(with = "time::serde::rfc3339::option")]
    pub queued_at: Option<OffsetDateTime>,
    /// Attempts since `queued_at`.
    pub attempts: u32,
    /// When the next attempt is due.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// A worker holds the entry until then (see `lease_owner`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub lease_until: Option<OffsetDateTime>,
    /// Which worker holds the lease.
    pub lease_owner: Option<String>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// SOP Instance UIDs the PACS was confirmed to hold, and how.
    #[serde(deserialize_with = "confirmed_compat")]
    pub confirmed: BTreeMap<String, Verification>,
    /// How often an admin replayed the entry from dead letters.
    pub replays: u32,
    /// Reports found at the PACS after delivery.
    pub reports: Vec<ReportRef>,
    /// When the PACS was last asked for reports.
    #[serde(with = "time::serde::rfc3339::option")]
    pub reports_checked_at: Option<OffsetDateTime>,
}

/// Records written before verification modes existed were checked for
/// presence only.
fn legacy_verification() -> Verification {
    Verification::PresenceOnly
}

/// `confirmed` as written now (UID → verification), or as a plain list of
/// UIDs from before verification modes (presence only).
fn confirmed_compat<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Verification>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Map(BTreeMap<String, Verification>),
        Set(BTreeSet<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::Map(m) => m,
        Either::Set(s) => s
            .into_iter()
            .map(|u| (u, Verification::PresenceOnly))
            .collect(),
    })
}

/// State of one file of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum FileState {
    /// Chunks are arriving.
    Uploading,
    /// Every byte verified against the whole-file digest, and DICOM validated.
    Valid {
        /// What validation found.
        dicom: DicomSummary,
    },
}

/// The identifying attributes found in a validated DICOM file.
///
/// Outside this crate, build one with [`DicomSummary::new`] (fields may be
/// added).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DicomSummary {
    /// (0008,0016) SOP Class UID.
    pub sop_class_uid: Uid,
    /// (0008,0018) SOP Instance UID.
    pub sop_instance_uid: Uid,
    /// (0020,000D) Study Instance UID.
    pub study_instance_uid: Uid,
    /// (0020,000E) Series Instance UID.
    pub series_instance_uid: Uid,
    /// (0010,0020) Patient ID. Patient data: goes to the audit trail, never to logs.
    pub patient_id: String,
    /// (0002,0010) Transfer Syntax UID.
    pub transfer_syntax: Uid,
    /// (0008,0060) Modality, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modality: Option<String>,
    /// What validation accepted but a reader should know (e.g. a Type 2
    /// attribute absent, an image without Pixel Data). No patient data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl DicomSummary {
    /// The summary of an instance, with no modality and no warnings (see
    /// [`with_modality`](Self::with_modality),
    /// [`with_warnings`](Self::with_warnings)).
    pub fn new(
        sop_class_uid: Uid,
        sop_instance_uid: Uid,
        study_instance_uid: Uid,
        series_instance_uid: Uid,
        patient_id: impl Into<String>,
        transfer_syntax: Uid,
    ) -> Self {
        Self {
            sop_class_uid,
            sop_instance_uid,
            study_instance_uid,
            series_instance_uid,
            patient_id: patient_id.into(),
            transfer_syntax,
            modality: None,
            warnings: Vec::new(),
        }
    }

    /// The same summary with (0008,0060) Modality.
    #[must_use]
    pub fn with_modality(mut self, modality: Option<String>) -> Self {
        self.modality = modality;
        self
    }

    /// The same summary with what validation accepted but a reader should
    /// know.
    #[must_use]
    pub fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings = warnings;
        self
    }
}

/// One file of an upload session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File id.
    pub id: FileId,
    /// Client-given name, for display only (never used to build a path).
    pub name: String,
    /// Declared total size in bytes.
    pub size: u64,
    /// Declared whole-file SHA-256, when the client gave one (the
    /// verified one once valid).
    pub sha256: Option<Sha256Digest>,
    /// SHA-256 of the data set after the file meta group, once valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_set_sha256: Option<Sha256Digest>,
    /// State.
    pub state: FileState,
}

/// An upload session: one study upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub id: SessionId,
    /// Owner's user id; only the owner and admins see the session.
    pub owner: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change made through the pipeline (expiry counts from here).
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Whether files of several studies may share this session.
    pub allow_multiple_studies: bool,
    /// The study, once the first file validated.
    pub study_instance_uid: Option<Uid>,
    /// Limits in force for this session (copied at creation).
    pub limits: Limits,
    /// Files by id.
    pub files: BTreeMap<FileId, FileRecord>,
    /// Session state.
    pub state: SessionState,
    /// Outbox bookkeeping (empty until completion).
    #[serde(default)]
    pub delivery: Delivery,
    /// Opened by one request that completes or ends it itself (a STOW-RS
    /// POST): no client knows its id, so one still open when the gateway
    /// starts again can never complete and is ended by
    /// [`Pipeline::end_orphaned_request_sessions`](crate::Pipeline::end_orphaned_request_sessions).
    #[serde(default)]
    pub request_scoped: bool,
    /// For a request-scoped session: the key of the gateway process whose
    /// request serves it, when the store tells the processes sharing it
    /// apart ([`SessionStore::instance_key`](crate::SessionStore::instance_key)),
    /// so a gateway starting on a shared store leaves a live request of
    /// another gateway alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_instance: Option<i64>,
}

impl SessionRecord {
    /// Sum of declared file sizes.
    pub fn declared_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
}

/// One acknowledged chunk: bytes `[offset, offset + length)` of a file,
/// durable in the chunk store and verified against `sha256`.
///
/// Outside this crate, build one with [`ChunkRecord::new`] (fields may be
/// added).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChunkRecord {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Digest of the chunk's bytes.
    pub sha256: Sha256Digest,
    /// Store-specific receipt (e.g. an object version or ETag).
    pub receipt: String,
}

impl ChunkRecord {
    /// The record of `length` bytes at `offset`, their SHA-256 and the
    /// store's receipt for them.
    pub fn new(offset: u64, length: u64, sha256: Sha256Digest, receipt: impl Into<String>) -> Self {
        Self {
            offset,
            length,
            sha256,
            receipt: receipt.into(),
        }
    }

    /// End offset (exclusive).
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A stored session with the version used for compare-and-set updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Opaque version; changes on every successful update.
    pub version: u64,
}

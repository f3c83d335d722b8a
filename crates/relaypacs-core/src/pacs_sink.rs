//! The [`PacsSink`] trait: where validated instances are delivered.

use std::fmt::{Debug, Display};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::chunk_store::FileKey;
use crate::digest::{ByteStream, Sha256Digest};
use crate::error::Result;
use crate::ids::Uid;
use crate::model::DicomSummary;

/// One validated DICOM instance ready for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Where its bytes are in the chunk store.
    pub key: FileKey,
    /// Size in bytes of the Part-10 file.
    pub size: u64,
    /// Verified SHA-256 of the Part-10 file.
    pub sha256: Sha256Digest,
    /// Identifying attributes.
    pub dicom: DicomSummary,
}

/// Opens the bytes of instances for a sink (implemented by the pipeline
/// over its [`ChunkStore`](crate::ChunkStore)).
#[async_trait]
pub trait InstanceSource: Debug + Send + Sync {
    /// The whole Part-10 file of `instance`, streamed. The stream may fail
    /// at any point, including after its last byte (the pipeline's source
    /// checks the verified SHA-256 at the end): a sink must not commit an
    /// instance before its stream has ended without error.
    async fn open(&self, instance: &Instance) -> Result<ByteStream>;
}

/// What happened to one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum InstanceOutcome {
    /// Stored now.
    Stored,
    /// The PACS already held this instance with identical content.
    AlreadyPresent,
    /// Stored, with a warning (e.g. attributes coerced).
    Warning {
        /// The PACS's warning.
        reason: String,
    },
    /// Not stored.
    Failed {
        /// Whether a later retry may succeed.
        transient: bool,
        /// The PACS's reason.
        reason: String,
    },
}

impl InstanceOutcome {
    /// Whether the PACS holds the instance after this outcome.
    pub fn is_delivered(&self) -> bool {
        !matches!(self, Self::Failed { .. })
    }
}

/// Per-instance outcomes of one delivery, in input order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReport {
    /// `(SOP Instance UID, outcome)` for every instance handed over.
    pub outcomes: Vec<(Uid, InstanceOutcome)>,
    /// How long the destination asked to wait before a retry of the
    /// transient failures, if it said.
    #[serde(skip)]
    pub retry_after: Option<std::time::Duration>,
}

impl DeliveryReport {
    /// Whether every instance is held by the PACS.
    pub fn all_delivered(&self) -> bool {
        self.outcomes.iter().all(|(_, o)| o.is_delivered())
    }
}

/// A destination PACS (or archive) for validated instances.
///
/// # Contract
/// - `Ok(report)` has exactly one outcome per input instance, in order. An
///   outcome of `Stored`, `AlreadyPresent` or `Warning` means the instance
///   is **durably held** by the destination when the call returns.
/// - Delivery is idempotent: delivering an instance the destination already
///   holds yields `AlreadyPresent` (or `Stored`), never a duplicate.
/// - The sink reads instance bytes only through `source`, streaming; it
///   never holds a whole instance in memory.
/// - `Err` means nothing is known about the batch; the caller may retry the
///   whole batch.
///
/// # Errors
/// [`Error::Pacs`](crate::Error::Pacs) with `transient` set for failures a
/// retry may fix; errors from `source` are passed through.
///
/// # Cancellation
/// A dropped future may have delivered some instances; by idempotence a
/// retry is safe.
#[async_trait]
pub trait PacsSink: Debug + Display + Send + Sync + 'static {
    /// Deliver a batch of instances of one study.
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport>;

    /// Which of `instances` the destination holds now, in input order
    /// (QIDO-RS, C-FIND, a file check, …). Used after a delivery to confirm
    /// it before a study is called delivered: a sink's "stored" is a claim,
    /// this is the check.
    ///
    /// # Errors
    /// [`Error::Pacs`](crate::Error::Pacs) when the destination cannot be
    /// asked; nothing is inferred from a failed query.
    async fn verify(&self, instances: &[Instance]) -> Result<Vec<bool>>;
}

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
///
/// Outside this crate, build one with [`Instance::new`] or
/// [`Instance::of_bytes`] (fields may be added).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Instance {
    /// Where its bytes are in the chunk store.
    pub key: FileKey,
    /// Size in bytes of the Part-10 file.
    pub size: u64,
    /// Verified SHA-256 of the Part-10 file.
    pub sha256: Sha256Digest,
    /// SHA-256 of the data set after the file meta group (what a
    /// destination that writes its own meta group must hold unchanged);
    /// `None` only for files accepted before it was recorded.
    pub data_set_sha256: Option<Sha256Digest>,
    /// Identifying attributes.
    pub dicom: DicomSummary,
}

impl Instance {
    /// An instance from its parts: where its bytes are, their size and
    /// verified SHA-256, the SHA-256 of its data set after the file meta
    /// group (`None` only for files accepted before it was recorded), and
    /// its identifying attributes.
    pub fn new(
        key: FileKey,
        size: u64,
        sha256: Sha256Digest,
        data_set_sha256: Option<Sha256Digest>,
        dicom: DicomSummary,
    ) -> Self {
        Self {
            key,
            size,
            sha256,
            data_set_sha256,
            dicom,
        }
    }

    /// The instance of a whole Part-10 file held in memory (tests, tools):
    /// both digests computed from `bytes`.
    pub fn of_bytes(key: FileKey, bytes: &[u8], dicom: DicomSummary) -> Self {
        let mut h = crate::dicom::Part10Hasher::new(bytes.len());
        h.update(bytes);
        let d = h.finish();
        Self {
            key,
            size: bytes.len() as u64,
            sha256: d.whole.unwrap_or_else(|| Sha256Digest::of(bytes)),
            data_set_sha256: d.data_set,
            dicom,
        }
    }
}

/// Opens the bytes of instances for a sink (implemented by the pipeline
/// over its [`ChunkStore`](crate::ChunkStore)).
///
/// # Contract
/// - [`open`](Self::open) may be called any number of times per instance
///   (a retry, a verification); each call streams the whole Part-10 file
///   from its first byte.
/// - The stream ends without error only if every byte is what was
///   verified at upload: the pipeline's source re-checks the SHA-256 and
///   fails the stream at its end otherwise.
///
/// # Errors
/// [`Error::NotFound`](crate::Error::NotFound) when the instance's bytes
/// are gone; storage failures as [`Error::Storage`](crate::Error::Storage);
/// a mismatch as [`Error::Integrity`](crate::Error::Integrity), possibly as
/// the last item of the stream.
///
/// # Cancellation
/// Dropping the future or the stream only stops reading.
#[async_trait]
pub trait InstanceSource: Debug + Send + Sync {
    /// The whole Part-10 file of `instance`, streamed. The stream may fail
    /// at any point, including after its last byte (the pipeline's source
    /// checks the verified SHA-256 at the end): a sink must not commit an
    /// instance before its stream has ended without error.
    async fn open(&self, instance: &Instance) -> Result<ByteStream>;

    /// The instance's bytes as one plain local file, when the source keeps
    /// them so (see [`ChunkStore::local_file`](crate::ChunkStore::local_file)):
    /// a sink on the same filesystem may hard-link it instead of writing a
    /// copy, after [`open`](Self::open)'s stream has ended without error.
    /// The file is durable and never written again; a sink must never
    /// write to it. `None` (the default): only the stream.
    fn local_file(&self, instance: &Instance) -> Option<std::path::PathBuf> {
        let _ = instance;
        None
    }
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
///
/// Outside this crate, build one with [`DeliveryReport::new`] (and
/// [`DeliveryReport::with_retry_after`]) or `Default` (fields may be added).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeliveryReport {
    /// `(SOP Instance UID, outcome)` for every instance handed over.
    pub outcomes: Vec<(Uid, InstanceOutcome)>,
    /// How long the destination asked to wait before a retry of the
    /// transient failures, if it said.
    #[serde(skip)]
    pub retry_after: Option<std::time::Duration>,
}

impl DeliveryReport {
    /// The report of `outcomes`, `(SOP Instance UID, outcome)` in input
    /// order, with no retry delay asked.
    pub fn new(outcomes: Vec<(Uid, InstanceOutcome)>) -> Self {
        Self {
            outcomes,
            retry_after: None,
        }
    }

    /// The same report with how long the destination asked to wait
    /// before a retry of its transient failures (`None`: it did not say).
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Option<std::time::Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Whether every instance is held by the PACS.
    pub fn all_delivered(&self) -> bool {
        self.outcomes.iter().all(|(_, o)| o.is_delivered())
    }
}

/// How a sink proves that the destination holds an instance (a per-sink
/// setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Retrieve the instance and compare its content with what was sent
    /// (see [`compare_content`]).
    #[default]
    Content,
    /// Only ask whether an instance with the SOP Instance UID exists.
    Presence,
}

/// How it was established that a destination holds an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Verification {
    /// Only the SOP Instance UID was found; the content was not compared
    /// (the destination cannot return it, or the sink is configured so).
    #[serde(rename = "presence-only")]
    PresenceOnly,
    /// The destination returned the instance and its content is what was
    /// sent.
    #[serde(rename = "content")]
    Content,
}

impl Verification {
    /// Human-readable form, as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PresenceOnly => "presence-only",
            Self::Content => "content",
        }
    }
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a destination holds under an instance's SOP Instance UID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "held", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Holding {
    /// Nothing.
    Absent,
    /// The instance that was sent, established as `verification` says.
    Same {
        /// Content compared, or presence only.
        verification: Verification,
    },
    /// Another object: the destination kept a different version, or
    /// transcoded it. Never to be called delivered.
    Different {
        /// What differs, naming the SOP Instance UID.
        reason: String,
    },
}

impl Holding {
    /// Whether the destination holds what was sent.
    pub fn is_same(&self) -> bool {
        matches!(self, Self::Same { .. })
    }
}

/// The one comparison every sink uses between an instance and what a
/// destination returned for it:
/// 1. the same whole file (byte-identical Part-10), or
/// 2. the same data set after the file meta group (the destination wrote
///    a meta group of its own, or returned only the data set);
///
/// otherwise the destination holds a different object. A copy in another
/// transfer syntax (a PACS that transcodes) is **not** decoded and
/// compared: by policy it counts as different, and the reason says so
/// (configure such a sink with [`VerifyMode::Presence`]).
pub fn compare_content(instance: &Instance, got: &crate::dicom::ContentDigest) -> Holding {
    let same_whole = got.whole == Some(instance.sha256);
    let same_data_set = got.data_set.is_some() && got.data_set == instance.data_set_sha256;
    if same_whole || same_data_set {
        return Holding::Same {
            verification: Verification::Content,
        };
    }
    let sop = &instance.dicom.sop_instance_uid;
    let sent_ts = instance.dicom.transfer_syntax.as_str();
    match got.transfer_syntax.as_deref() {
        Some(ts) if ts != sent_ts => Holding::Different {
            reason: format!(
                "the PACS holds SOP Instance UID {sop} in transfer syntax {ts}, not {sent_ts} \
                 as sent: a transcoded copy is not compared (verify = \"presence\" accepts it)"
            ),
        },
        _ => Holding::Different {
            reason: format!(
                "the PACS holds a different object with SOP Instance UID {sop} \
                 ({} bytes returned, {} sent)",
                got.size, instance.size
            ),
        },
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

    /// What the destination holds now under each of `instances`' SOP
    /// Instance UIDs, in input order. The pipeline asks before sending
    /// (an identical copy needs no resend, a different one is a conflict)
    /// and after (a sink's "stored" is a claim, this is the check).
    ///
    /// A sink configured for [`VerifyMode::Content`] retrieves each held
    /// instance (WADO-RS, C-GET, reading a file, …), streaming and
    /// bounded, and decides with [`compare_content`]; where the
    /// destination cannot return content it answers
    /// [`Verification::PresenceOnly`], never `Content`.
    ///
    /// # Errors
    /// [`Error::Pacs`](crate::Error::Pacs) when the destination cannot be
    /// asked; nothing is inferred from a failed query.
    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>>;
}

// `Arc<S>` and `Box<S>` of an implementation (`dyn PacsSink` included)
// implement `PacsSink` too, forwarding every call: a shared or boxed
// adapter goes into code generic over `PacsSink` (a decorator, a builder).
macro_rules! forward_pacs_sink {
    ($($ptr:ident)::+) => {
        #[async_trait]
        impl<S: PacsSink + ?Sized> PacsSink for $($ptr)::+<S> {
            async fn deliver(
                &self,
                instances: &[Instance],
                source: &dyn InstanceSource,
            ) -> Result<DeliveryReport> {
                (**self).deliver(instances, source).await
            }

            async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
                (**self).verify(instances).await
            }
        }
    };
}
forward_pacs_sink!(std::sync::Arc);
forward_pacs_sink!(Box);

#[cfg(test)]
mod forwarding_tests {
    #![allow(clippy::unwrap_used)] // tests: a failure must panic
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    impl Display for Counting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("counting")
        }
    }

    #[async_trait]
    impl PacsSink for Counting {
        async fn deliver(
            &self,
            instances: &[Instance],
            _source: &dyn InstanceSource,
        ) -> Result<DeliveryReport> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(DeliveryReport::new(
                instances
                    .iter()
                    .map(|i| (i.dicom.sop_instance_uid.clone(), InstanceOutcome::Stored))
                    .collect(),
            ))
        }

        async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(vec![Holding::Absent; instances.len()])
        }
    }

    async fn verify_through<S: PacsSink>(sink: &S) -> usize {
        sink.verify(&[]).await.unwrap().len()
    }

    #[tokio::test]
    async fn arc_and_box_of_a_sink_forward_every_call() {
        let mine = Arc::new(Counting::default());
        let shared: Arc<dyn PacsSink> = Arc::new(Arc::clone(&mine));
        let boxed: Box<dyn PacsSink> = Box::new(Arc::clone(&mine));
        verify_through(&mine).await;
        verify_through(&shared).await;
        verify_through(&boxed).await;
        verify_through(&Box::new(Arc::clone(&shared))).await;
        assert_eq!(mine.0.load(Ordering::SeqCst), 4);
        assert_eq!(shared.to_string(), "counting");
        assert_eq!(format!("{boxed}"), "counting");
    }
}

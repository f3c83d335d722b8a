//! # relaypacs-core
//!
//! The verified DICOM ingestion pipeline of RelayPACS, with no HTTP and no
//! database inside. A study upload is a session of files; each file arrives
//! as checksummed chunks in any order, is verified byte for byte against its
//! whole-file SHA-256, validated as DICOM (bounded pre-scan first), and
//! handed to a [`PacsSink`]. Every state change is an [`AuditSink`] event.
//!
//! Storage and destinations are traits, so vendors bring their own:
//! [`ChunkStore`] (bytes), [`SessionStore`] (state with compare-and-set),
//! [`PacsSink`] (delivery) and [`AuditSink`] (audit trail). Each trait has a
//! conformance suite in [`testing`] (feature `testing`) that any
//! implementation runs with one macro call.
//!
//! Identifiers are checked when parsed, so none can smuggle a path:
//!
//! ```
//! use relaypacs_core::{SessionId, Sha256Digest, Uid};
//!
//! assert!(Uid::parse("1.2.840.10008.5.1.4.1.1.7").is_ok());
//! assert!(Uid::parse("../../etc/passwd").is_err());
//! let id = SessionId::random();
//! assert_eq!(SessionId::parse(&id.to_string())?, id);
//! assert_eq!(Sha256Digest::of(b"abc").to_hex().len(), 64);
//! # Ok::<(), relaypacs_core::Error>(())
//! ```

pub mod analytics;
pub mod audit;
pub mod chunk_store;
pub mod dicom;
pub mod digest;
pub mod error;
pub mod ids;
pub mod model;
pub mod outbox;
pub mod pacs_sink;
pub mod pipeline;
pub mod report_source;
pub mod session_store;
#[cfg(feature = "testing")]
pub mod testing;

/// The attribute the traits are declared with, re-exported so an adapter
/// crate implements them without its own `async-trait` dependency.
pub use async_trait::async_trait;
pub use audit::{AuditAction, AuditEvent, AuditOutcome, AuditSink};
pub use chunk_store::{ChunkPlacement, ChunkStore, FileKey, Syncing};
pub use digest::{ByteStream, Sha256Digest, VerifyingStream, bytes_stream};
pub use error::{Error, ErrorKind, IntegrityError, Result, StorageErrorKind};
pub use ids::{Actor, FileId, SessionId, Uid};
pub use model::{
    ChunkRecord, Delivery, DicomSummary, FileRecord, FileState, Limits, SessionRecord,
    SessionState, Versioned,
};
pub use outbox::{Attempted, Next, Outbox, OutboxConfig, OutboxEvent, OutboxListener};
pub use pacs_sink::{
    DeliveryReport, Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Verification,
    VerifyMode, compare_content,
};
pub use pipeline::{
    DuplicatePolicy, FileStatus, INGEST_CHUNK_SIZE, NewFile, NewSession, Pipeline, PipelineConfig,
    PutChunk, PutOutcome, RangeDone, RangeWrite, contiguous_end, plan_segments,
};
pub use report_source::{ReportKind, ReportRef, ReportSource};
pub use session_store::{
    ChunkInsert, ClaimedWrite, FileScope, HeadWrite, InstanceClaim, SessionStore,
};

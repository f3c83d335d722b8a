//! # relaypacs-storage
//!
//! Storage adapters for the RelayPACS core traits:
//! - [`LocalChunkStore`], [`JsonlAuditSink`]: plain
//!   files in a data folder, the embedded defaults (crash-safe: every
//!   acknowledged write is fsync'd, every replacement is an atomic rename
//!   followed by a directory fsync).
//! - `ObjectStoreChunkStore` (feature `object-store`, off by default):
//!   chunks in any `object_store` backend (in-memory, local; S3 and
//!   compatibles with feature `aws`).
//! - `MultipartChunkStore` (feature `object-store`; S3 with `aws`): each
//!   file is one multipart upload, sealed without copying its bytes.
//! - [`SqlState`] and the stores on it ([`SqlSessionStore`],
//!   [`SqlAuditSink`], [`SqlNotificationStore`]; features
//!   `sqlite` and `postgres`, both on by default): state in SQLite (one
//!   file, embedded) or PostgreSQL (several gateways), through sqlx.
//! - [`SyslogForwardingSink`] (feature `syslog`, on by default): an audit
//!   sink decorator forwarding the trail to a syslog collector over TLS.

pub mod audit_anchor;
pub mod audit_export;
mod audit_fanout;
pub mod fs;
mod local_audit;
mod local_chunks;
#[cfg(feature = "object-store")]
mod object_store_chunks;
#[cfg(feature = "object-store")]
pub mod s3_multipart_chunks;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql_analytics;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql_audit;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod sql_notifications;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql_sessions;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql_state;
#[cfg(feature = "syslog")]
pub mod syslog_audit;

pub use audit_fanout::AuditFanOut;
pub use local_audit::{
    AuditTrailOptions, ChainError, ChainErrorKind, ChainHead, JsonlAuditSink, read_verified_events,
    verify_chain, verify_chain_against, verify_reader, verify_trail,
};
pub use local_chunks::LocalChunkStore;
/// The `object_store` crate the chunk store is built on (feature
/// `object-store`; its S3 client `object_store::aws` with feature `aws`),
/// so an embedder builds its backend against the same version.
#[cfg(feature = "object-store")]
pub use object_store;
#[cfg(feature = "object-store")]
pub use object_store_chunks::ObjectStoreChunkStore;
#[cfg(feature = "object-store")]
pub use s3_multipart_chunks::MultipartChunkStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql_audit::{
    SqlAuditSink, read_verified_sql_events, verify_sql_chain, verify_sql_chain_against,
    verify_sql_chain_against_all,
};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql_notifications::SqlNotificationStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql_sessions::SqlSessionStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql_state::{Engine, SqlOptions, SqlState, WriteTurn};
#[cfg(feature = "syslog")]
pub use syslog_audit::{SyslogConfig, SyslogForwardingSink};

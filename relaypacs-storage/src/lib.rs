//! # relaypacs-storage
//!
//! Storage adapters for the RelayPACS core traits:
//! - [`LocalChunkStore`], [`FileSessionStore`], [`JsonlAuditSink`]: plain
//!   files in a data folder, the embedded defaults (crash-safe: every
//!   acknowledged write is fsync'd, every replacement is an atomic rename
//!   followed by a directory fsync).
//! - `ObjectStoreChunkStore` (feature `object-store`, off by default):
//!   chunks in any `object_store` backend (in-memory, local; S3 and
//!   compatibles with feature `aws`).

pub mod audit_anchor;
pub mod audit_export;
pub mod fs;
mod local_audit;
mod local_chunks;
mod local_sessions;
#[cfg(feature = "object-store")]
mod object_store_chunks;

pub use local_audit::{
    AuditTrailOptions, ChainError, ChainErrorKind, ChainHead, JsonlAuditSink, read_verified_events,
    verify_chain, verify_chain_against, verify_reader, verify_trail,
};
pub use local_chunks::LocalChunkStore;
pub use local_sessions::FileSessionStore;
/// The `object_store` crate the chunk store is built on (feature
/// `object-store`; its S3 client `object_store::aws` with feature `aws`),
/// so an embedder builds its backend against the same version.
#[cfg(feature = "object-store")]
pub use object_store;
#[cfg(feature = "object-store")]
pub use object_store_chunks::ObjectStoreChunkStore;

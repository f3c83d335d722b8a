//! # relaypacs-storage
//!
//! Storage adapters for the RelayPACS core traits:
//! - [`LocalChunkStore`], [`FileSessionStore`], [`JsonlAuditSink`]: plain
//!   files in a data folder, the embedded defaults (crash-safe: every
//!   acknowledged write is fsync'd, every replacement is an atomic rename
//!   followed by a directory fsync).
//! - [`ObjectStoreChunkStore`] (feature `object-store`): chunks in any
//!   `object_store` backend (S3 and compatibles, local, in-memory).

pub mod fs;
mod local_audit;
mod local_chunks;
mod local_sessions;
#[cfg(feature = "object-store")]
mod object_store_chunks;

pub use local_audit::{ChainError, ChainHead, JsonlAuditSink, verify_chain, verify_chain_against};
pub use local_chunks::LocalChunkStore;
pub use local_sessions::FileSessionStore;
#[cfg(feature = "object-store")]
pub use object_store_chunks::ObjectStoreChunkStore;

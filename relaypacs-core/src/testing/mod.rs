//! Conformance suites for the core traits, reusable fault decorators, and
//! test-data generators.
//!
//! Each suite is a set of public `async fn` cases plus a macro that expands
//! to a module of `#[test]`s, one per case, each on a fresh multi-threaded
//! runtime with a fresh store from your factory. A factory is an
//! `async fn() -> (Store, Guard)`; the guard (a temp dir, a server handle,
//! `()`) lives as long as the case runs. The first macro argument names the
//! module, so several suites (or the same suite twice) fit in one module.
//! The macros name everything through `$crate`: the calling crate needs
//! `relaypacs-core` with the `testing` feature, and neither `tokio` nor
//! `async-trait` of its own (this module re-exports [`macro@async_trait`] and
//! [`tempfile`] for probes and factories).
//!
//! ```text
//! async fn make() -> (MyChunkStore, relaypacs_core::testing::tempfile::TempDir) { /* … */ }
//! relaypacs_core::chunk_store_conformance!(my_chunk_store, make);
//! ```
//!
//! [`faults`] wraps any implementation of a core trait to fail chosen calls
//! (the k-th `put_chunk` with EIO, a stream cut after N bytes, refused SOP
//! Instance UIDs, …) and to count what it was asked.

// Conformance cases are tests: a broken contract must fail loudly, so they
// unwrap and panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod audit_sink;
pub mod chunk_store;
pub mod dicom_gen;
pub mod faults;
pub mod pacs_sink;
pub mod report_source;
pub mod session_store;

pub use async_trait::async_trait;
pub use tempfile;

/// What the suite macros expand to; not a public API.
#[doc(hidden)]
pub mod __rt {
    pub use async_trait;
    pub use tokio;

    /// Run one conformance case to its end on a fresh multi-threaded
    /// runtime with two workers (what `#[tokio::test(flavor =
    /// "multi_thread", worker_threads = 2)]` builds), so the calling crate
    /// needs no tokio of its own.
    pub fn run<F: std::future::Future>(case: F) -> F::Output {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build a tokio runtime for a conformance case")
            .block_on(case)
    }
}

/// Deterministic pseudo-random bytes (xorshift), for reproducible test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&bytes[..take]);
    }
    out
}

/// Collect a byte stream into memory (tests only).
pub async fn collect(stream: crate::ByteStream) -> crate::Result<Vec<u8>> {
    use futures::TryStreamExt;
    let parts: Vec<bytes::Bytes> = stream.try_collect().await?;
    Ok(parts.concat())
}

/// A body stream that yields `data` in pieces of `piece` bytes.
pub fn pieces(data: &[u8], piece: usize) -> crate::ByteStream {
    let parts: Vec<crate::Result<bytes::Bytes>> = data
        .chunks(piece.max(1))
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(parts))
}

/// A body stream that yields `data` and then fails with an I/O error.
pub fn failing(data: &[u8]) -> crate::ByteStream {
    let parts: Vec<crate::Result<bytes::Bytes>> = vec![
        Ok(bytes::Bytes::copy_from_slice(data)),
        Err(crate::Error::io(
            "client body",
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset"),
        )),
    ];
    Box::pin(futures::stream::iter(parts))
}

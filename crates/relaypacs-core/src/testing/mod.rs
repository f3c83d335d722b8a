//! Conformance suites for the core traits, and test-data generators.
//!
//! Each suite is a set of `async fn` cases plus a macro that expands to one
//! `#[tokio::test]` per case, each with a fresh store from your factory:
//!
//! ```ignore
//! async fn make() -> (MyStore, tempfile::TempDir) { /* … */ }
//! relaypacs_core::chunk_store_conformance!(make);
//! ```

pub mod dicom_gen;

//! # relaypacs-pacs
//!
//! [`PacsSink`](relaypacs_core::PacsSink) adapters: where validated
//! instances go. [`LocalArchiveSink`] writes them to a folder so the gateway
//! runs with no external PACS; DICOMweb STOW-RS and DIMSE C-STORE sinks
//! follow.

mod local_archive;

pub use local_archive::LocalArchiveSink;

//! # relaypacs-pacs
//!
//! [`PacsSink`](relaypacs_core::PacsSink) adapters: where validated
//! instances go. [`LocalArchiveSink`] writes them to a folder so the gateway
//! runs with no external PACS; [`StowSink`] speaks DICOMweb STOW-RS and
//! verifies content by WADO-RS retrieval (presence by QIDO-RS);
//! `CStoreSink` speaks DIMSE C-STORE and verifies content by C-GET (presence
//! by C-FIND where the PACS offers no retrieval); [`FanOutSink`] delivers
//! to several at once. [`DicomWebReports`]
//! finds reports by QIDO-RS and fetches them by WADO-RS.

mod cstore;
mod dicomweb;
mod dicomweb_reports;
mod fanout;
mod local_archive;
mod stow;

pub use cstore::{CStoreConfig, CStoreSink};
pub use dicomweb::{DicomWebAuth, DicomWebConfig};
pub use dicomweb_reports::DicomWebReports;
pub use fanout::FanOutSink;
pub use local_archive::LocalArchiveSink;
pub use stow::StowSink;

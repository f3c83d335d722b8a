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
//!
//! Features (both default): `stow-rs` (the DICOMweb sink and report source,
//! reqwest) and `c-store` (the DIMSE sink, dicom-ul). The local archive and
//! the fan-out are always built.

#[cfg(feature = "c-store")]
mod cstore;
#[cfg(feature = "stow-rs")]
mod dicomweb;
#[cfg(feature = "stow-rs")]
mod dicomweb_reports;
mod fanout;
mod local_archive;
#[cfg(feature = "stow-rs")]
mod stow;

#[cfg(feature = "c-store")]
pub use cstore::{CStoreConfig, CStoreSink};
#[cfg(feature = "stow-rs")]
pub use dicomweb::{DicomWebAuth, DicomWebConfig};
#[cfg(feature = "stow-rs")]
pub use dicomweb_reports::DicomWebReports;
pub use fanout::FanOutSink;
pub use local_archive::LocalArchiveSink;
#[cfg(feature = "stow-rs")]
pub use stow::StowSink;

/// The pure parsers of what a PACS sends, public for fuzzing and for
/// vendors' tests: bytes in, typed values or typed errors out, limits as
/// arguments, no I/O.
pub mod parse {
    /// DIMSE command sets (C-STORE-RSP, C-FIND-RSP, C-GET-RSP, and the
    /// C-STORE-RQ sub-operations of a C-GET) and C-FIND/C-GET identifiers.
    #[cfg(feature = "c-store")]
    pub mod dimse {
        pub use crate::cstore::dimse::{
            DimseError, MAX_IDENTIFIER_DEPTH, Response, SubOperations, identifier_sop_instance_uid,
            parse_request, parse_response,
        };
    }
    /// The `multipart/related` framing of WADO-RS answers, read
    /// incrementally as the bytes arrive.
    #[cfg(feature = "stow-rs")]
    pub mod multipart {
        pub use crate::dicomweb::{
            FramingError, FramingLimits, MultipartReader, PartEvent, multipart_boundary,
        };
    }
    /// DICOM JSON answers: the STOW-RS Store Instances Response and the
    /// QIDO-RS search results.
    #[cfg(feature = "stow-rs")]
    pub mod dicom_json {
        pub use crate::dicomweb::{
            DicomJsonError, DicomJsonLimits, items_of, number_of, parse_dicom_json,
            parse_qido_answer, string_of,
        };
        pub use crate::stow::{StoreResponse, parse_store_response};
    }
}

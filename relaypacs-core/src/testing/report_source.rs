//! Conformance suite for [`ReportSource`] implementations.
//!
//! Run it with [`report_source_conformance!`](crate::report_source_conformance).
//! The factory also returns a [`ReportPlanter`] that adds instances to the
//! PACS the way a reporting system would.

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::Uid;
use crate::report_source::{ReportKind, ReportSource};
use crate::testing::dicom_gen;

/// Adds a Part-10 instance to the PACS behind a [`ReportSource`].
#[async_trait]
pub trait ReportPlanter: Send + Sync {
    /// Store `part10` at the PACS.
    async fn plant(&self, part10: Vec<u8>) -> Result<()>;
}

fn uid(s: &str) -> Uid {
    Uid::parse(s).expect("generated UIDs are valid")
}

/// A report as a report check records it in a delivered study (an SR of
/// a fixed study and series) with SOP Instance UID `sop_instance_uid`.
///
/// # Panics
/// When `sop_instance_uid` is not a valid UID.
pub fn sample_report(sop_instance_uid: &str) -> crate::ReportRef {
    crate::ReportRef::new(
        uid("1.2.3"),
        uid("1.2.3.9"),
        uid(sop_instance_uid),
        uid("1.2.840.10008.5.1.4.1.1.88.33"),
        ReportKind::StructuredReport,
    )
}

fn data_set(bytes: &[u8]) -> &[u8] {
    let off = crate::dicom::data_set_offset(bytes).expect("a Part-10 file") as usize;
    &bytes[off..]
}

/// A study the PACS does not know has no reports (not an error).
pub async fn unknown_study_has_no_reports(src: &dyn ReportSource, _p: &dyn ReportPlanter) {
    let found = src
        .find_reports(&uid(&dicom_gen::new_uid()))
        .await
        .expect("find");
    assert!(found.is_empty(), "{found:?}");
}

/// Images are not reports; a PDF report added to the study is found and
/// fetched with its data set unchanged.
pub async fn finds_and_fetches_a_pdf_report(src: &dyn ReportSource, p: &dyn ReportPlanter) {
    let spec = dicom_gen::DicomSpec::default();
    p.plant(dicom_gen::generate(&spec).expect("image"))
        .await
        .expect("plant image");
    let study = uid(&spec.study_uid);
    assert!(
        src.find_reports(&study).await.expect("find").is_empty(),
        "an image is not a report"
    );
    let pdf = b"%PDF-1.4\n% RelayPACS test report\n%%EOF\n".to_vec();
    let (sop, report) = dicom_gen::pdf_report(&spec.study_uid, &spec.patient_id, &pdf);
    p.plant(report.clone()).await.expect("plant report");
    let found = src.find_reports(&study).await.expect("find");
    assert_eq!(found.len(), 1, "{found:?}");
    let r = &found[0];
    assert_eq!(r.sop_instance_uid.as_str(), sop);
    assert_eq!(r.study_instance_uid, study);
    assert_eq!(r.kind, ReportKind::EncapsulatedPdf);
    assert_eq!(r.sop_class_uid.as_str(), dicom_gen::ENCAPSULATED_PDF);
    let got = crate::testing::collect(src.fetch_report(r).await.expect("fetch"))
        .await
        .expect("read");
    assert_eq!(data_set(&got), data_set(&report), "report bytes differ");
}

/// Generates a module `$name` with one `#[test]` per [`ReportSource`]
/// conformance case. `$factory` is an `async fn() -> (impl ReportSource,
/// impl ReportPlanter, impl Sized)`; the calling crate needs no tokio of
/// its own.
///
/// ```text
/// relaypacs_core::report_source_conformance!(dicomweb_reports, make_reports);
/// ```
#[macro_export]
macro_rules! report_source_conformance {
    ($name:ident, $factory:path $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::report_source_conformance!(@cases $factory; unknown_study_has_no_reports, finds_and_fetches_a_pdf_report);
        }
    };
    (@cases $factory:path; $($case:ident),*) => {$(
        #[test]
        fn $case() {
            $crate::testing::__rt::run(async {
                let (src, planter, _guard) = $factory().await;
                $crate::testing::report_source::$case(&src, &planter).await;
            })
        }
    )*};
}

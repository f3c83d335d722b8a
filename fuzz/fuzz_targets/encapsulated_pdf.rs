//! An Encapsulated PDF's document: no crash, no abort, bounded memory; a
//! document found is a PDF, no longer than the file, and the value with at
//! most its one pad byte removed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_core::dicom::sr::{ReportLimits, extract_encapsulated_pdf};

fuzz_target!(|data: &[u8]| {
    let limits = ReportLimits {
        max_bytes: 1 << 20,
        ..ReportLimits::default()
    };
    if let Ok(pdf) = extract_encapsulated_pdf(data, &limits) {
        assert!(pdf.starts_with(b"%PDF-"));
        assert!(pdf.len() < data.len());
    }
});

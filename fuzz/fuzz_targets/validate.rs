//! Pre-scan then dicom-object on anything the pre-scan accepts: no crash,
//! no abort, bounded memory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_core::dicom::{DicomLimits, validate_dicom};

fuzz_target!(|data: &[u8]| {
    let _ = validate_dicom(data, data.len() as u64, &DicomLimits::default());
});

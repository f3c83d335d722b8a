//! The pre-scan must never panic, whatever the bytes, and must report a
//! prefix shorter than the file as such.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_core::dicom::{PrescanLimits, prescan};

fuzz_target!(|data: &[u8]| {
    let limits = PrescanLimits::default();
    let _ = prescan(data, data.len() as u64, &limits);
    // The same bytes as a prefix of a larger file.
    let _ = prescan(data, data.len() as u64 + 4096, &limits);
});

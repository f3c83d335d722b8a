//! Content digests of bytes a PACS returns (`Part10Hasher`) and the
//! identification of refused files (`identify`): never a panic, bounded
//! memory, and the digests do not depend on how the bytes are cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_core::dicom::{Part10Hasher, PrescanLimits, identify};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let mut whole = Part10Hasher::new(4096);
    whole.update(body);
    let mut pieces = Part10Hasher::new(4096);
    for p in body.chunks(usize::from(cut).max(1)) {
        pieces.update(p);
    }
    assert_eq!(whole.finish(), pieces.finish());
    let _ = identify(body, body.len() as u64, &PrescanLimits::default());
});

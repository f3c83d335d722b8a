//! Property tests of the pre-scan and validator on random bytes and on
//! random mutations of valid files: never a panic, never an abort, always
//! a typed result. (The cargo-fuzz targets in `fuzz/` explore further.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use proptest::prelude::*;
use relaypacs_core::dicom::{DicomLimits, PrescanLimits, prescan, validate_dicom};
use relaypacs_core::testing::dicom_gen::{DicomSpec, TransferSyntax, generate};

fn valid(ts: u8) -> Vec<u8> {
    let transfer_syntax = match ts % 5 {
        0 => TransferSyntax::ExplicitLe,
        1 => TransferSyntax::ImplicitLe,
        2 => TransferSyntax::ExplicitBe,
        3 => TransferSyntax::Deflated,
        _ => TransferSyntax::JpegBaseline,
    };
    generate(&DicomSpec {
        transfer_syntax,
        rows: 8,
        cols: 8,
        ..DicomSpec::default()
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..2048), dicm in any::<bool>()) {
        if dicm && data.len() >= 132 {
            data[128..132].copy_from_slice(b"DICM");
        }
        let _ = prescan(&data, data.len() as u64, &PrescanLimits::default());
        let _ = prescan(&data, data.len() as u64 + 100, &PrescanLimits::default());
    }

    #[test]
    fn mutated_valid_files_never_panic(ts in any::<u8>(), edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut data = valid(ts);
        for (at, v) in edits {
            let i = at % data.len();
            data[i] = v;
        }
        let keep = data.len() - cut % (data.len() / 4);
        data.truncate(keep);
        let _ = validate_dicom(&data, data.len() as u64, &DicomLimits::default());
    }
}

proptest! {
    /// FUZ-4: whatever a client or a DICOM file puts in an identifier
    /// (`../`, absolute paths, NUL, backslashes, 10k characters), what
    /// parses is digits and dots only, so no path built from it can leave
    /// its root; everything else is refused.
    #[test]
    fn identifiers_cannot_carry_paths(s in prop_oneof![
        "[0-9./\\\\\\x00a-z]{0,80}",
        "(\\.\\./)+[0-9.]{0,20}",
        "/[0-9.]{1,30}",
        proptest::string::string_regex("[0-9.]{10000}").unwrap(),
    ]) {
        if let Ok(u) = relaypacs_core::Uid::parse(&s) {
            prop_assert!(u.as_str().bytes().all(|b| b.is_ascii_digit() || b == b'.'));
            prop_assert!(!u.as_str().contains(".."));
            prop_assert!(u.as_str().len() <= 64);
            let p = std::path::Path::new("/archive").join(u.as_str());
            prop_assert!(p.components().count() == 3, "{p:?}");
        }
        prop_assert!(relaypacs_core::SessionId::parse(&s).is_err() || s.len() == 32);
    }
}

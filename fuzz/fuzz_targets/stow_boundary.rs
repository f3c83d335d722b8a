//! The boundary of a STOW-RS request's Content-Type (server side, before
//! `multer` frames the body), and of a WADO-RS answer's (the STOW sink's
//! retrievals): whatever the text, no panic, and a boundary found is 1 to
//! 70 characters.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::stow_headers::{MAX_BOUNDARY_LEN, stow_boundary};
use relaypacs_pacs::parse::multipart::multipart_boundary;

fuzz_target!(|data: &[u8]| {
    let Ok(ct) = std::str::from_utf8(data) else {
        let _ = stow_boundary(None, MAX_BOUNDARY_LEN);
        return;
    };
    if let Ok(b) = stow_boundary(Some(ct), MAX_BOUNDARY_LEN) {
        assert!((1..=MAX_BOUNDARY_LEN).contains(&b.len()));
        assert!(stow_boundary(Some(ct), b.len()).is_ok());
    }
    if let Ok(b) = multipart_boundary(ct) {
        assert!((1..=70).contains(&b.len()), "{b:?}");
    }
});

//! The STOW-RS part-header guard (`PartHeaderGuard`, run on the body
//! before `multer`): whatever the bytes, no panic; the verdict, the parts
//! seen and whether the body was closed are the same fed whole, in pieces
//! of the size the first byte names, and one byte at a time; a refusal
//! repeats on every later piece.
//!
//! Layout: `[piece][max_header_bytes][max_headers][body]`; the body is
//! framed by the boundary `XyZ`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::stow_headers::{PartHeaderGuard, PartHeaderLimits};

fn run(limits: PartHeaderLimits, body: &[u8], piece: usize) -> (Result<(), String>, usize, bool) {
    let mut g = PartHeaderGuard::new("XyZ", limits);
    let mut r = Ok(());
    for c in body.chunks(piece.max(1)) {
        if let Err(e) = g.feed(c) {
            r = Err(e.to_string());
            assert!(g.feed(b"--XyZ\r\n").is_err(), "a refusal must repeat");
            break;
        }
    }
    (r, g.parts(), g.is_closed())
}

fuzz_target!(|data: &[u8]| {
    let [piece, bytes, headers, body @ ..] = data else {
        return;
    };
    let limits = PartHeaderLimits {
        max_header_bytes: usize::from(*bytes).max(1) * 4,
        max_headers: usize::from(*headers % 40).max(1),
    };
    let whole = run(limits, body, body.len());
    assert_eq!(whole, run(limits, body, usize::from(*piece)));
    assert_eq!(whole, run(limits, body, 1));
});

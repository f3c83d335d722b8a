//! Outside text of the listings and of refused tokens: a page cursor
//! (`routes::cursor_key`) and a bearer token's claimed subject
//! (`routes::claimed_subject`). Whatever the bytes, no panic; a cursor
//! that decodes is exactly the encoding of its key (one cursor per key)
//! and within the length bound; a claimed subject is 1–128 bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::routes::{claimed_subject, cursor_key, cursor_of};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(key) = cursor_key(&text, 512) {
        assert!(text.len() <= 512);
        assert_eq!(cursor_of(&key), text);
    }
    if let Some(sub) = claimed_subject(&text, 8192) {
        assert!(!sub.is_empty() && sub.len() <= 128);
        assert!(text.len() <= 8192);
    }
});

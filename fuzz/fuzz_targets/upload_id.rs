//! The tus upload id of a request path: whatever the bytes, no panic; an
//! id that parses prints back as exactly the text it came from (so no two
//! texts name one upload: no prefix, extension or case variant parses).
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::UploadId;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = UploadId::parse(&text) {
        assert_eq!(id.to_string(), text);
        assert_eq!(UploadId::new(id.session(), id.file()), id);
    }
});

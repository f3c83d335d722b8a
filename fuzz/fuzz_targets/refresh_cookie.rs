//! The browser refresh flow's inputs: the `Cookie` header (the refresh
//! cookie's value) and the same-origin check (`Host`, `Origin`,
//! `Sec-Fetch-Site`). No panic; a value found is non-empty, free of `;`,
//! and part of the header; a header longer than the limit finds nothing;
//! an `Origin` naming another host, or no header at all, is never
//! same-origin.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::routes::auth::cookie::{REFRESH, cookie_value, same_origin_of};

fuzz_target!(|data: &[u8]| {
    // Cookie header, NUL, Host, NUL, Origin, NUL, Sec-Fetch-Site.
    let mut parts = data.split(|b| *b == 0);
    let cookie = parts.next().unwrap_or_default();
    if let Ok(text) = std::str::from_utf8(cookie) {
        if let Some(v) = cookie_value(text, REFRESH, 8192) {
            assert!(!v.is_empty() && !v.contains(';') && text.contains(v));
        }
        if !text.is_empty() {
            assert_eq!(cookie_value(text, REFRESH, text.len() - 1), None);
        }
    }
    let (host, origin, site) = (parts.next(), parts.next(), parts.next());
    let same = same_origin_of(host, origin, site);
    if let (Some(h), Some(o)) = (host, origin) {
        let rest = o
            .strip_prefix(b"https://")
            .or_else(|| o.strip_prefix(b"http://"));
        if rest.is_none_or(|r| !r.eq_ignore_ascii_case(h)) {
            assert!(!same);
        }
    }
    assert!(!same_origin_of(host, None, None));
    if site.is_some_and(|s| s != b"same-origin") {
        assert!(!same);
    }
});

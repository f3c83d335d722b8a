//! The client address behind trusted proxies: whatever the `Forwarded` and
//! `X-Forwarded-For` bytes, no panic; an untrusted peer is never replaced;
//! with no trusted proxy the headers change nothing.
#![no_main]
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use relaypacs_http::client_addr::client_address_from;

fuzz_target!(|data: &[u8]| {
    // First line(s) up to a NUL: Forwarded; the rest: X-Forwarded-For.
    let (fwd, xff) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let fwd: Vec<&[u8]> = fwd.split(|b| *b == b'\n').collect();
    let xff: Vec<&[u8]> = xff.split(|b| *b == b'\n').collect();
    let peer = IpAddr::from([127, 0, 0, 1]);
    let trusted = [
        "127.0.0.0/8".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
        "::/0".parse().unwrap(),
    ];
    let _ = client_address_from(peer, &fwd, &xff, &trusted, 16);
    let _ = client_address_from(peer, &[], &xff, &trusted, 16);
    let outside = ["10.0.0.0/8".parse().unwrap()];
    assert_eq!(client_address_from(peer, &fwd, &xff, &outside, 16), peer);
    assert_eq!(client_address_from(peer, &fwd, &xff, &[], 16), peer);
});

//! The client address behind trusted proxies: the only place where
//! `Forwarded` (RFC 7239) or `X-Forwarded-For` can change the address used
//! for rate limits, the login limiter's per-address caps and audit.
//!
//! The chain is walked from the right (the hop nearest to us), starting at
//! the socket peer: while the current hop is a trusted proxy, the address
//! it reports becomes the current hop. The first untrusted hop is the
//! client. Anything a client writes itself sits to the left of what its
//! first trusted proxy appended, so it is never reached. A hop that cannot
//! be read (`unknown`, an obfuscated name, garbage) stops the walk at the
//! last trusted proxy, as does the hop limit.
//!
//! When both headers are present, `Forwarded` is used (configure trusted
//! proxies to send one of them). Addresses are compared in canonical form
//! (an IPv4-mapped IPv6 address is its IPv4 address).

use std::net::{IpAddr, Ipv6Addr};

use axum::http::HeaderMap;
use axum::http::header::FORWARDED;
use ipnet::IpNet;

/// Most hops walked by [`client_address`].
pub const DEFAULT_MAX_HOPS: usize = 16;

/// The client address of a request from socket peer `peer`: `peer` itself
/// unless it is in `trusted`; then the first untrusted hop of `Forwarded`
/// (or else `X-Forwarded-For`) walked from the right.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    if trusted.is_empty() {
        return peer.to_canonical();
    }
    let forwarded: Vec<&[u8]> = headers
        .get_all(FORWARDED)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let xff: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    client_address_from(peer, &forwarded, &xff, trusted, DEFAULT_MAX_HOPS)
}

/// [`client_address`] over raw header values (each line of `Forwarded`,
/// each line of `X-Forwarded-For`, in arrival order), walking at most
/// `max_hops` forwarded entries. Pure; work linear in the header bytes.
pub fn client_address_from(
    peer: IpAddr,
    forwarded: &[&[u8]],
    x_forwarded_for: &[&[u8]],
    trusted: &[IpNet],
    max_hops: usize,
) -> IpAddr {
    let mut current = peer.to_canonical();
    let is_trusted = |a: &IpAddr| trusted.iter().any(|n| n.contains(a));
    if !is_trusted(&current) {
        return current;
    }
    // Entries, nearest hop last.
    let hops: Vec<Option<IpAddr>> = if !forwarded.is_empty() {
        forwarded
            .iter()
            .flat_map(|line| split_outside_quotes(line, b','))
            .map(forwarded_for)
            .collect()
    } else {
        x_forwarded_for
            .iter()
            .flat_map(|line| line.split(|b| *b == b','))
            .map(|e| node(trim(e)))
            .collect()
    };
    for hop in hops.iter().rev().take(max_hops) {
        match hop {
            Some(a) => {
                current = a.to_canonical();
                if !is_trusted(&current) {
                    return current;
                }
            }
            None => return current,
        }
    }
    current
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// Split `s` on `sep` outside double-quoted strings (with `\` escapes).
fn split_outside_quotes(s: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in s.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

/// The address of one `Forwarded` element's `for=` parameter.
fn forwarded_for(element: &[u8]) -> Option<IpAddr> {
    split_outside_quotes(element, b';')
        .into_iter()
        .find_map(|pair| {
            let pair = trim(pair);
            let eq = pair.iter().position(|b| *b == b'=')?;
            let (name, value) = (trim(&pair[..eq]), trim(&pair[eq + 1..]));
            if !name.eq_ignore_ascii_case(b"for") {
                return None;
            }
            let value = match value {
                [b'"', inner @ .., b'"'] => inner,
                v => v,
            };
            node(value)
        })
}

/// An address, optionally with a port: `192.0.2.1`, `192.0.2.1:8080`,
/// `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:8080`.
fn node(s: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(s).ok()?;
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return inside.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Some(a);
    }
    let (host, port) = s.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn without_trusted_proxies_the_headers_change_nothing() {
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=198.51.100.1"),
        ]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &[]), ip("127.0.0.1"));
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        let t = nets(&["10.0.0.0/8"]);
        assert_eq!(client_address(ip("192.0.2.7"), &h, &t), ip("192.0.2.7"));
    }

    #[test]
    fn a_trusted_proxy_reports_the_client() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        let t = nets(&["127.0.0.1/32"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip("203.0.113.9"));
    }

    #[test]
    fn a_spoofed_left_entry_is_never_reached() {
        // The client sent "1.2.3.4" itself; the proxy appended its address.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9")]);
        let t = nets(&["127.0.0.1/32"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip("203.0.113.9"));
        // Two trusted proxies: the walk passes the inner one.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.1.2.3")]);
        let t = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip("203.0.113.9"));
    }

    #[test]
    fn several_header_lines_form_one_chain() {
        let h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9, 10.0.0.2"),
        ]);
        let t = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip("203.0.113.9"));
    }

    #[test]
    fn forwarded_is_parsed_per_rfc_7239_and_preferred() {
        let t = nets(&["127.0.0.1/32"]);
        for (v, want) in [
            ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60"),
            ("For=\"[2001:db8:cafe::17]:4711\"", "2001:db8:cafe::17"),
            ("for=\"192.0.2.43:47011\"", "192.0.2.43"),
            ("for=192.0.2.43, for=198.51.100.17", "198.51.100.17"),
            (
                "proto=https;host=\"a,b\";for=198.51.100.17",
                "198.51.100.17",
            ),
        ] {
            let h = headers(&[("forwarded", v), ("x-forwarded-for", "9.9.9.9")]);
            assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip(want), "{v}");
        }
    }

    #[test]
    fn an_unreadable_hop_stops_at_the_last_trusted_proxy() {
        let t = nets(&["127.0.0.1/32", "10.0.0.0/8"]);
        for (name, v) in [
            ("forwarded", "for=192.0.2.1, for=unknown, for=10.0.0.5"),
            ("forwarded", "for=192.0.2.1, for=_hidden, for=10.0.0.5"),
            ("forwarded", "for=192.0.2.1, proto=https, for=10.0.0.5"),
            ("x-forwarded-for", "192.0.2.1, not-an-ip, 10.0.0.5"),
            ("x-forwarded-for", "192.0.2.1, [::1]x, 10.0.0.5"),
        ] {
            let h = headers(&[(name, v)]);
            assert_eq!(
                client_address(ip("127.0.0.1"), &h, &t),
                ip("10.0.0.5"),
                "{v}"
            );
        }
        // An empty header: the proxy itself.
        let h = headers(&[("x-forwarded-for", "")]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip("127.0.0.1"));
    }

    #[test]
    fn all_trusted_gives_the_leftmost_and_the_hop_limit_holds() {
        let t = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let h = headers(&[("x-forwarded-for", "10.0.0.1, 10.0.0.2")]);
        assert_eq!(client_address(ip("127.0.0.1"), &h, &t), ip("10.0.0.1"));
        let chain: Vec<String> = (0..40).map(|i| format!("10.0.0.{i}")).collect();
        let line = chain.join(",");
        let got = client_address_from(ip("127.0.0.1"), &[], &[line.as_bytes()], &t, 3);
        assert_eq!(got, ip("10.0.0.37"));
    }

    #[test]
    fn mapped_addresses_are_compared_as_ipv4() {
        let t = nets(&["127.0.0.1/32"]);
        let h = headers(&[("x-forwarded-for", "::ffff:203.0.113.9")]);
        assert_eq!(
            client_address(ip("::ffff:127.0.0.1"), &h, &t),
            ip("203.0.113.9")
        );
    }

    proptest::proptest! {
        /// Whatever the headers: no panic, and the peer when it is not a
        /// trusted proxy.
        #[test]
        fn an_untrusted_peer_is_never_replaced(
            fwd in "[ -~]{0,80}", xff in "[ -~]{0,80}", trusted_peer: bool,
        ) {
            let peer = ip("127.0.0.1");
            let t = if trusted_peer { nets(&["127.0.0.1/32"]) } else { nets(&["10.0.0.0/8"]) };
            let got = client_address_from(peer, &[fwd.as_bytes()], &[xff.as_bytes()], &t, 16);
            if !trusted_peer {
                proptest::prop_assert_eq!(got, peer);
            }
        }
    }
}

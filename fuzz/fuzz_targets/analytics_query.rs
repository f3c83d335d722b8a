//! The analytics query string (`relaypacs_http::routes::analytics::
//! parse_analytics_query`): whatever the bytes, no panic; a query that
//! parses spans `from..=to` within the range limit, its modality is 1-16
//! of `A-Z 0-9 _`, its user has no control character, and it parses the
//! same again (the parser is pure).
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::routes::analytics::{QueryLimits, parse_analytics_query};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let limits = QueryLimits::default();
    let today = time::macros::date!(2026 - 11 - 30);
    let parsed = parse_analytics_query(Some(&text), &limits, today);
    assert_eq!(parsed, parse_analytics_query(Some(&text), &limits, today));
    match parsed {
        Ok(q) => {
            assert!(q.from <= q.to);
            assert!((q.to - q.from).whole_days() < i64::from(limits.max_days));
            if let Some(m) = &q.modality {
                assert!((1..=16).contains(&m.len()));
                assert!(
                    m.bytes()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
                );
            }
            if let Some(u) = &q.user {
                assert!(!u.is_empty() && u.len() <= limits.max_value);
                assert!(!u.chars().any(char::is_control));
            }
        }
        Err(e) => assert!(!e.parameter.is_empty() && e.parameter.chars().count() <= 64),
    }
});

//! Issue 11 item 4: STOW-RS part headers are bounded (bytes and lines,
//! configurable, 400 beyond) by a linear-time guard on the body stream
//! before `multer` buffers them; framing does not depend on how the body
//! is cut.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use proptest::prelude::*;
use relaypacs_http::auth::Role;
use relaypacs_http::stow_headers::{PartHeaderError, PartHeaderGuard, PartHeaderLimits};
use tower::ServiceExt;

const CT: &str = "multipart/related; type=\"application/dicom\"; boundary=XyZ";

const LIMITS: PartHeaderLimits = PartHeaderLimits {
    max_header_bytes: 16 << 10,
    max_headers: 32,
};

/// A multipart body: each part's header lines, then its content.
fn body(parts: &[(Vec<String>, Vec<u8>)], boundary: &str) -> Vec<u8> {
    let mut out = b"preamble text\r\n".to_vec();
    for (headers, content) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        for h in headers {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\nepilogue").as_bytes());
    out
}

/// Feed `data` cut at `cuts` (sorted offsets).
fn feed_cut(
    boundary: &str,
    limits: PartHeaderLimits,
    data: &[u8],
    cuts: &[usize],
) -> (Result<(), PartHeaderError>, usize, bool) {
    let mut g = PartHeaderGuard::new(boundary, limits);
    let mut at = 0;
    let mut r = Ok(());
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        let c = c.clamp(at, data.len());
        r = g.feed(&data[at..c]);
        if r.is_err() {
            break;
        }
        at = c;
    }
    (r, g.parts(), g.is_closed())
}

/// The parts `multer` reads from `data` cut at `cuts`, through the guard
/// (header count of each part), or the guard's or multer's error.
fn multer_parts(boundary: &str, data: &[u8], cuts: &[usize]) -> Result<Vec<usize>, String> {
    let mut pieces = Vec::new();
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        let c = c.clamp(at, data.len());
        pieces.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(
            &data[at..c],
        )));
        at = c;
    }
    let guarded =
        relaypacs_http::stow_headers::guard_stream(futures::stream::iter(pieces), boundary, LIMITS);
    futures::executor::block_on(async move {
        let mut mp = multer::Multipart::new(guarded, boundary.to_string());
        let mut out = Vec::new();
        loop {
            match mp.next_field().await {
                Ok(Some(mut f)) => {
                    out.push(f.headers().len());
                    while f.chunk().await.map_err(|e| e.to_string())?.is_some() {}
                }
                Ok(None) => return Ok(out),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
}

fn part_strategy() -> impl Strategy<Value = (Vec<String>, Vec<u8>)> {
    let header = "[A-Za-z-]{1,12}: [ -~]{0,40}";
    let content = prop::collection::vec(
        prop_oneof![
            Just(b"\n--XyZ--".to_vec()),
            Just(b"\r--XyZ\r\n".to_vec()),
            Just(b"\r\n--Xy".to_vec()),
            Just(b"\r\r\n\r\n".to_vec()),
            Just(b"--XyZ".to_vec()),
            prop::collection::vec(any::<u8>(), 0..40),
        ],
        0..6,
    )
    .prop_map(|v| v.concat())
    // Content never holds its own delimiter.
    .prop_filter("delimiter in content", |c| {
        !c.windows(7).any(|w| w == b"\r\n--XyZ")
    });
    (prop::collection::vec(header, 1..6), content)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any valid body, however it is cut (including into 1-byte pieces),
    /// passes the guard with every part seen, and multer reads the same
    /// parts behind the guard as the whole body gives.
    #[test]
    fn framing_does_not_depend_on_the_cuts(
        parts in prop::collection::vec(part_strategy(), 1..4),
        mut cuts in prop::collection::vec(0usize..2000, 0..40),
        one_byte in any::<bool>(),
    ) {
        let data = body(&parts, "XyZ");
        if one_byte {
            cuts = (1..data.len()).collect();
        }
        cuts.sort_unstable();
        let (r, n, closed) = feed_cut("XyZ", LIMITS, &data, &cuts);
        prop_assert_eq!(r, Ok(()));
        prop_assert_eq!(n, parts.len());
        prop_assert!(closed);
        // multer keeps one value per header name (names are
        // case-insensitive): a part's count is its distinct names.
        let want: Vec<usize> = parts
            .iter()
            .map(|(h, _)| {
                h.iter()
                    .map(|line| line.split(':').next().unwrap_or("").to_ascii_lowercase())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .collect();
        prop_assert_eq!(multer_parts("XyZ", &data, &cuts), Ok(want.clone()));
        prop_assert_eq!(multer_parts("XyZ", &data, &[]), Ok(want));
    }

    /// Arbitrary bytes: the verdict (and where the guard stands) is the
    /// same whole and cut into pieces.
    #[test]
    fn verdict_does_not_depend_on_the_cuts(
        data in prop::collection::vec(prop_oneof![
            Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b'X'), Just(b'y'), Just(b'Z'), Just(b' '), any::<u8>()
        ], 0..600),
        mut cuts in prop::collection::vec(0usize..600, 0..30),
        max_header_bytes in 8usize..64,
        max_headers in 1usize..4,
    ) {
        cuts.sort_unstable();
        let limits = PartHeaderLimits { max_header_bytes, max_headers };
        let whole = feed_cut("XyZ", limits, &data, &[]);
        let cut = feed_cut("XyZ", limits, &data, &cuts);
        let ones = feed_cut("XyZ", limits, &data, &(1..data.len()).collect::<Vec<_>>());
        prop_assert_eq!(&whole, &cut);
        prop_assert_eq!(&whole, &ones);
    }

    /// A header block over the limit is refused wherever the cuts fall.
    #[test]
    fn long_header_refused_wherever_cut(
        extra in 1usize..200,
        mut cuts in prop::collection::vec(0usize..20_000, 0..20),
    ) {
        let limits = PartHeaderLimits { max_header_bytes: 1024, max_headers: 32 };
        // "X-Long: " + value + CRLF CRLF is exactly 1024 + extra bytes.
        let value = "v".repeat(1024 + extra - 12);
        let data = body(&[(vec![format!("X-Long: {value}")], b"DICM".to_vec())], "XyZ");
        cuts.sort_unstable();
        let (r, _, _) = feed_cut("XyZ", limits, &data, &cuts);
        prop_assert_eq!(r, Err(PartHeaderError::HeaderTooLarge { part: 1, max: 1024 }));
        // Exactly the limit passes.
        let ok = "v".repeat(1024 - 12);
        let data = body(&[(vec![format!("X-Long: {ok}")], b"DICM".to_vec())], "XyZ");
        prop_assert_eq!(feed_cut("XyZ", limits, &data, &cuts).0, Ok(()));
    }
}

/// Limits of lines, the preamble and malformed delimiter lines.
#[test]
fn lines_preamble_and_malformed_delimiters() {
    let limits = PartHeaderLimits {
        max_header_bytes: 4096,
        max_headers: 3,
    };
    let h = |n: usize| (0..n).map(|i| format!("X-H{i}: v")).collect::<Vec<_>>();
    let ok = body(&[(h(3), b"a".to_vec())], "b");
    assert_eq!(feed_cut("b", limits, &ok, &[]).0, Ok(()));
    let many = body(&[(h(1), b"a".to_vec()), (h(4), b"a".to_vec())], "b");
    assert_eq!(
        feed_cut("b", limits, &many, &[]).0,
        Err(PartHeaderError::TooManyHeaders { part: 2, max: 3 })
    );
    let preamble = vec![b'p'; 5000];
    assert_eq!(
        feed_cut("b", limits, &preamble, &[]).0,
        Err(PartHeaderError::PreambleTooLarge { max: 4096 })
    );
    for bad in [&b"--bX\r\n"[..], b"--b -\r\n", b"--b\rX", b"--b-X"] {
        assert_eq!(
            feed_cut("b", limits, bad, &[]).0,
            Err(PartHeaderError::Malformed { part: 1 }),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // Transport padding after a delimiter is allowed (and counted).
    assert_eq!(
        feed_cut("b", limits, b"--b \t \r\nA: b\r\n\r\nx\r\n--b--", &[]),
        (Ok(()), 1, true)
    );
    // Once refused, always refused.
    let mut g = PartHeaderGuard::new("b", limits);
    assert!(g.feed(&preamble).is_err());
    assert!(g.feed(b"--b\r\n").is_err());
}

/// A request through the whole router (edges, auth, the STOW-RS handler).
async fn stow_oneshot(
    t: &TestServer,
    u: &User,
    body: Body,
) -> (StatusCode, serde_json::Value, Duration) {
    let app = relaypacs_http::edges::app(t.server().state().clone());
    let req = Request::builder()
        .method("POST")
        .uri("/dicomweb/studies")
        .header("authorization", format!("Bearer {}", u.token))
        .header("content-type", CT)
        .header("accept", "application/dicom+json")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let res = app.oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let took = started.elapsed();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or_default(),
        took,
    )
}

/// The attack: one part whose header line is 256 MiB, streamed
/// lazily. It is refused with 400 `RELAY_PART_HEADER_TOO_LARGE` in well
/// under a second, having read little more than the limit.
#[tokio::test]
async fn huge_part_header_is_refused_fast() {
    let t = TestServer::start().await;
    let u = t.user("hugo", Role::Uploader).await;
    const TOTAL: u64 = 256 << 20;
    let piece = Bytes::from(vec![b'a'; 64 << 10]);
    let pulled = Arc::new(AtomicU64::new(0));
    let counter = pulled.clone();
    let head = Bytes::from_static(b"--XyZ\r\nContent-Type: application/dicom\r\nX-Long: ");
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(
        futures::stream::unfold(0u64, move |sent| {
            let piece = piece.clone();
            let counter = counter.clone();
            async move {
                (sent < TOTAL).then(|| {
                    counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    (Ok(piece.clone()), sent + piece.len() as u64)
                })
            }
        }),
    );
    let (status, v, took) = stow_oneshot(&t, &u, Body::from_stream(stream)).await;
    eprintln!(
        "refused after {took:?}, {} bytes pulled",
        pulled.load(Ordering::Relaxed)
    );
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "RELAY_PART_HEADER_TOO_LARGE", "{v}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(
        pulled.load(Ordering::Relaxed) < 1 << 20,
        "the server read on past the limit"
    );
    t.stop().await;
}

/// A valid STOW-RS body sent in 1-byte pieces is stored as sent whole.
#[tokio::test]
async fn one_byte_pieces_are_stored() {
    let t = TestServer::start().await;
    let u = t.user("ola", Role::Uploader).await;
    let a = dicom(None, 16);
    let data = body(
        &[(
            vec![
                "Content-Type: application/dicom".to_string(),
                "Content-Description: one instance".to_string(),
            ],
            a,
        )],
        "XyZ",
    );
    let pieces: Vec<Result<Bytes, std::io::Error>> = data
        .iter()
        .map(|b| Ok(Bytes::copy_from_slice(&[*b])))
        .collect();
    let (status, v, _) =
        stow_oneshot(&t, &u, Body::from_stream(futures::stream::iter(pieces))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["00081199"]["Value"].as_array().unwrap().len(), 1, "{v}");
    t.stop().await;
}

/// The limits come from `[stow]`: a 2,000-byte header passes by default,
/// not with `max_part_header_bytes = 1024`; more lines than
/// `max_part_headers` are refused with their own code.
#[tokio::test]
async fn limits_are_configurable() {
    let long = vec![
        "Content-Type: application/dicom".to_string(),
        format!("Content-Description: {}", "d".repeat(2000)),
    ];
    let t = TestServer::start().await;
    let u = t.user("ida", Role::Uploader).await;
    let (status, v, _) = stow_oneshot(
        &t,
        &u,
        Body::from(body(&[(long.clone(), dicom(None, 16))], "XyZ")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    t.stop().await;

    let t = TestServer::start_with(|c| {
        c.stow.max_part_header_bytes = 1024;
        c.stow.max_part_headers = 2;
    })
    .await;
    let u = t.user("ida", Role::Uploader).await;
    let (status, v, _) =
        stow_oneshot(&t, &u, Body::from(body(&[(long, dicom(None, 16))], "XyZ"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "RELAY_PART_HEADER_TOO_LARGE");
    let three = vec![
        "Content-Type: application/dicom".to_string(),
        "X-A: 1".to_string(),
        "X-B: 2".to_string(),
    ];
    let (status, v, _) =
        stow_oneshot(&t, &u, Body::from(body(&[(three, dicom(None, 16))], "XyZ"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "RELAY_PART_HEADERS_TOO_MANY");
    t.stop().await;
    let mut c = relaypacs_http::Config::default();
    c.stow.max_part_header_bytes = 100;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("stow.max_part_header_bytes")
    );
    c.stow.max_part_header_bytes = 16384;
    c.stow.max_part_headers = 33;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("stow.max_part_headers")
    );
}

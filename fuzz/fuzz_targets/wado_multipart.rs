//! The WADO-RS multipart reader: whatever the bytes, no panic, the limits
//! hold, and a body fed in random pieces gives exactly what it gives fed
//! whole (the same parts, or the same error).
//!
//! Input: `[piece][limits][n][n bytes of Content-Type][body]`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_pacs::parse::multipart::{
    FramingError, FramingLimits, MultipartReader, PartEvent, multipart_boundary,
};

/// Each part's content type and content, or the first error.
type Parsed = Result<Vec<(Option<String>, Vec<u8>)>, FramingError>;

fn parse(boundary: &str, limits: FramingLimits, body: &[u8], pieces: &[usize]) -> Parsed {
    let mut r = MultipartReader::new(boundary, limits);
    let mut parts: Vec<(Option<String>, Vec<u8>)> = Vec::new();
    let mut open = false;
    let mut rest = body;
    let mut cuts = pieces.iter().cycle();
    while !rest.is_empty() {
        let n = cuts
            .next()
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        r.feed(piece, |ev| match ev {
            PartEvent::Start { content_type } => {
                assert!(!open, "a part starts inside a part");
                open = true;
                parts.push((content_type.map(str::to_owned), Vec::new()));
            }
            PartEvent::Data(d) => {
                assert!(open, "data outside a part");
                if let Some(p) = parts.last_mut() {
                    p.1.extend_from_slice(d);
                }
            }
            PartEvent::End => {
                assert!(open, "an end outside a part");
                open = false;
            }
        })?;
        assert!(parts.len() <= limits.max_parts);
        assert!(
            parts
                .iter()
                .all(|p| p.1.len() as u64 <= limits.max_part_bytes)
        );
    }
    r.finish()?;
    assert!(!open, "done inside a part");
    assert_eq!(r.parts(), parts.len());
    Ok(parts)
}

fuzz_target!(|data: &[u8]| {
    let [piece, lim, n, rest @ ..] = data else {
        return;
    };
    let (ct, body) = rest.split_at(usize::from(*n).min(rest.len()));
    let boundary = match multipart_boundary(&String::from_utf8_lossy(ct)) {
        Ok(b) => {
            assert!((1..=70).contains(&b.len()));
            b
        }
        Err(_) => "b0undary".to_owned(),
    };
    let limits = FramingLimits {
        max_parts: usize::from(lim & 3) + 1,
        max_part_bytes: 1 << ((lim >> 2) & 15),
        max_head_bytes: 64 << (lim >> 6),
    };
    let whole = parse(&boundary, limits, body, &[body.len()]);
    // Pieces of `piece` bytes, and pieces of varying sizes drawn from the
    // body itself.
    let even = parse(&boundary, limits, body, &[usize::from(*piece).max(1)]);
    assert_eq!(whole, even, "pieces of {piece}");
    let varied: Vec<usize> = body
        .iter()
        .take(16)
        .map(|&b| usize::from(b % 17) + 1)
        .collect();
    if !varied.is_empty() {
        assert_eq!(
            whole,
            parse(&boundary, limits, body, &varied),
            "pieces {varied:?}"
        );
    }
});

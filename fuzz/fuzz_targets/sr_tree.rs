//! A Structured Report's content tree, then both renderings: no crash, no
//! abort, bounded memory; a tree read stays within the limits, and the
//! HTML carries no markup from the report.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_core::dicom::sr::{ReportLimits, SrItem, SrValue, read_structured_report};
use relaypacs_http::report_render;

const LIMITS: ReportLimits = ReportLimits {
    max_bytes: 1 << 20,
    max_depth: 12,
    max_items: 2_000,
    max_text_len: 16 << 10,
    parser_stack_bytes: 32 << 20,
};

/// The elements the renderer writes (each followed by '>' or ' ').
const TAGS: &[&str] = &[
    "!DOCTYPE ", "html>", "html ", "head>", "meta ", "title>", "style>", "body>", "header>",
    "table>", "tr>", "th>", "th ", "td>", "hr>", "main>", "h1>", "h2>", "h3>", "h4>", "h5>",
    "h6>", "section>", "div>", "div ", "b>", "br>", "span>", "span ", "footer>",
];

/// (items, deepest level) of `items` at `level`; every text within the cap.
fn walk(items: &[SrItem], level: u32) -> (u64, u32) {
    let mut n = 0;
    let mut deepest = if items.is_empty() { level - 1 } else { level };
    for i in items {
        if let SrValue::Text(t) = &i.value {
            assert!(t.len() <= LIMITS.max_text_len);
        }
        let (c, d) = walk(&i.children, level + 1);
        n += 1 + c;
        deepest = deepest.max(d);
    }
    (n, deepest)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = read_structured_report(data, &LIMITS) {
        let (items, depth) = walk(&doc.items, 1);
        assert!(items < LIMITS.max_items, "{items} items");
        assert!(depth <= LIMITS.max_depth, "depth {depth}");
        let html = report_render::html(&doc);
        // Every tag is one of the renderer's: the report's text is escaped.
        for (at, _) in html.match_indices('<') {
            let rest = html[at + 1..].trim_start_matches('/');
            assert!(
                TAGS.iter().any(|t| rest.starts_with(t)),
                "unexpected markup at {at}: {}",
                &rest[..rest.len().min(20)]
            );
        }
        assert!(report_render::pdf(&doc).starts_with(b"%PDF-"));
    }
});

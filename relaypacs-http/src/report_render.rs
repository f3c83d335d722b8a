//! A Structured Report's content tree ([`SrDocument`]) as a page a
//! clinician reads: HTML (escaped, no script, shown under
//! [`REPORT_CSP`]) and PDF.
//!
//! Both show the same words, in the spirit of dcmtk's `dsr2html`: a header
//! (patient, referring physician, study, flags, content date), the
//! document title, a heading per CONTAINER level, each other item as its
//! concept name followed by its value: text as written, a code as
//! "meaning (value, scheme)", a number with its units ("12.5 mm").
//!
//! The PDF is written with `pdf-writer` (typst's), which only serialises
//! PDF objects: the layout here is ours, written by hand because a layout
//! crate would bring font files and many dependencies for a one-column page
//! of text. It uses the standard Helvetica and Helvetica-Bold (no font
//! embedded) with WinAnsiEncoding; text is encoded to WinAnsi (characters
//! outside it become `?`), wrapped at spaces using the Adobe font metrics'
//! advance widths (tables below: exact for ASCII, the base letter's width
//! for accented Latin-1 letters, a generous width otherwise), and broken
//! into A4 pages with a footer.

use std::fmt::Write as _;

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};
use relaypacs_core::dicom::sr::{Code, SrDocument, SrItem, SrValue, person_name};

/// The Content-Security-Policy of a rendered report: nothing may load or
/// run; only the page's own `<style>` element applies.
pub const REPORT_CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'";

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:48rem;margin:1rem auto;padding:0 1rem;line-height:1.5;color:#111;background:#fff}\
table{border-collapse:collapse}th{text-align:left;padding-right:1rem;vertical-align:top}\
h1{font-size:1.5rem}h2{font-size:1.25rem}h3,h4,h5,h6{font-size:1.05rem}\
section{margin-left:.5rem}.item{margin:.5rem 0}.sub{margin-left:1.25rem;border-left:2px solid #ccc;padding-left:.5rem}\
.rel{color:#555;font-size:.9em}.flags{color:#333}footer{margin-top:2rem;color:#555;font-size:.85em}";

/// HTML-escape `s` (text and attribute values).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than line ends are dropped.
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// `YYYYMMDD` as `YYYY-MM-DD`; anything else as written.
fn date(d: &str) -> String {
    if d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()) {
        format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..])
    } else {
        d.to_owned()
    }
}

/// `HHMMSS[.F]` as `HH:MM:SS`; anything else as written.
fn time(t: &str) -> String {
    let b = t.as_bytes();
    if b.len() >= 6 && b[..6].iter().all(u8::is_ascii_digit) {
        format!("{}:{}:{}", &t[..2], &t[2..4], &t[4..6])
    } else if b.len() == 4 && b.iter().all(u8::is_ascii_digit) {
        format!("{}:{}", &t[..2], &t[2..4])
    } else {
        t.to_owned()
    }
}

/// A DICOM DT value as `YYYY-MM-DD HH:MM:SS`.
fn date_time(dt: &str) -> String {
    if dt.len() > 8 && dt.is_char_boundary(8) {
        format!("{} {}", date(&dt[..8]), time(&dt[8..]))
    } else {
        date(dt)
    }
}

/// A code as "meaning (value, scheme)".
fn code_text(c: &Code) -> String {
    format!("{} ({}, {})", c.meaning, c.value, c.scheme)
}

/// The symbol of a unit: the UCUM code itself ("mm"), else its meaning.
fn unit_text(u: &Code) -> &str {
    if u.scheme == "UCUM" && !u.value.is_empty() && u.value != "1" {
        &u.value
    } else if u.value == "1" {
        ""
    } else {
        &u.meaning
    }
}

/// An item's value in words.
fn value_text(v: &SrValue) -> String {
    match v {
        SrValue::Container { .. } => String::new(),
        SrValue::Text(t) => t.clone(),
        SrValue::Code(c) => code_text(c),
        SrValue::Num {
            value,
            units,
            qualifier,
        } => {
            let mut s = value.clone().unwrap_or_default();
            if let Some(u) = units {
                let u = unit_text(u);
                if !u.is_empty() {
                    s.push(' ');
                    s.push_str(u);
                }
            }
            if let Some(q) = qualifier {
                if !s.is_empty() {
                    s.push(' ');
                }
                let _ = write!(s, "[{}]", q.meaning);
            }
            s
        }
        SrValue::DateTime(d) => date_time(d),
        SrValue::Date(d) => date(d),
        SrValue::Time(t) => time(t),
        SrValue::PersonName(p) => person_name(p),
        SrValue::UidRef(u) => u.clone(),
        SrValue::Reference {
            kind,
            sop_class_uid,
            sop_instance_uid,
            frames,
        } => {
            let mut s = format!(
                "{} reference: {sop_instance_uid} (class {sop_class_uid})",
                kind.to_lowercase()
            );
            if !frames.is_empty() {
                let _ = write!(s, ", frames {}", frames.replace('\\', ", "));
            }
            s
        }
        SrValue::SpatialCoordinates {
            kind,
            graphic_type,
            values,
        } => format!("{kind} {graphic_type} ({values} values)"),
        SrValue::TemporalCoordinates { range_type, values } => {
            format!("TCOORD {range_type} ({values} values)")
        }
        SrValue::ByReference(id) => format!("see content item {id}"),
        _ => "(value not shown)".to_owned(),
    }
}

/// The concept name of an item, or a name for its value type.
fn label(item: &SrItem) -> String {
    match &item.concept {
        Some(c) if !c.meaning.is_empty() => c.meaning.clone(),
        _ => match &item.value {
            SrValue::Container { .. } => "Section".into(),
            SrValue::ByReference(_) => "Reference".into(),
            _ => String::new(),
        },
    }
}

/// A relationship worth showing next to the label (not the plain
/// `CONTAINS` / `HAS PROPERTIES`).
fn relationship(item: &SrItem) -> Option<String> {
    match item.relationship.as_str() {
        "" | "CONTAINS" | "HAS PROPERTIES" => None,
        r => Some(r.to_lowercase()),
    }
}

/// The header rows: (label, value), the empty ones left out.
fn header_rows(doc: &SrDocument) -> Vec<(&'static str, String)> {
    let h = &doc.header;
    let mut rows = Vec::new();
    let mut patient = person_name(&h.patient_name);
    let mut details = Vec::new();
    match h.patient_sex.as_str() {
        "F" => details.push("female".to_owned()),
        "M" => details.push("male".to_owned()),
        "O" => details.push("other".to_owned()),
        _ => {}
    }
    if !h.patient_birth_date.is_empty() {
        details.push(format!("*{}", date(&h.patient_birth_date)));
    }
    if !h.patient_id.is_empty() {
        details.push(format!("#{}", h.patient_id));
    }
    if !details.is_empty() {
        let _ = write!(patient, " ({})", details.join(", "));
    }
    rows.push(("Patient", patient));
    rows.push(("Referring Physician", person_name(&h.referring_physician)));
    let mut study = h.study_description.clone();
    if !h.study_date.is_empty() {
        let _ = write!(study, " {} {}", date(&h.study_date), time(&h.study_time));
    }
    rows.push(("Study", study.trim().to_owned()));
    rows.push(("Accession Number", h.accession_number.clone()));
    rows.push(("Institution", h.institution.clone()));
    rows.push(("Completion Flag", doc.completion_flag.clone()));
    rows.push(("Verification Flag", doc.verification_flag.clone()));
    rows.push(("Preliminary Flag", doc.preliminary_flag.clone()));
    for v in &doc.verifiers {
        let mut s = person_name(&v.name);
        if !v.organization.is_empty() {
            let _ = write!(s, ", {}", v.organization);
        }
        if !v.date_time.is_empty() {
            let _ = write!(s, ", {}", date_time(&v.date_time));
        }
        rows.push(("Verified by", s));
    }
    rows.push((
        "Content Date/Time",
        format!("{} {}", date(&h.content_date), time(&h.content_time))
            .trim()
            .to_owned(),
    ));
    rows.retain(|(_, v)| !v.is_empty());
    rows
}

fn title(doc: &SrDocument) -> String {
    doc.title
        .as_ref()
        .map(|t| t.meaning.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "Structured report".to_owned())
}

/// The report as a complete HTML page (UTF-8), to be served with
/// [`REPORT_CSP`]: every value escaped, no script, no URL.
pub fn html(doc: &SrDocument) -> String {
    let t = esc(&title(doc));
    let mut out = String::with_capacity(4096);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<header>\n<table>\n"
    );
    for (k, v) in header_rows(doc) {
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{k}:</th><td>{}</td></tr>",
            esc(&v)
        );
    }
    let _ = write!(out, "</table>\n</header>\n<hr>\n<main>\n<h1>{t}</h1>\n");
    html_items(&mut out, &doc.items, 1);
    let _ = write!(
        out,
        "</main>\n<hr>\n<footer>Rendered by RelayPACS from DICOM Structured Report {}.</footer>\n</body>\n</html>\n",
        esc(&doc.sop_instance_uid)
    );
    out
}

/// Text with its line ends kept.
fn html_text(s: &str) -> String {
    esc(s.trim_end())
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\n', "<br>\n")
}

fn html_items(out: &mut String, items: &[SrItem], level: usize) {
    for item in items {
        let name = esc(&label(item));
        let rel = relationship(item)
            .map(|r| format!(" <span class=\"rel\">({})</span>", esc(&r)))
            .unwrap_or_default();
        if let SrValue::Container { .. } = item.value {
            let h = (level + 1).min(6);
            let _ = writeln!(out, "<section>\n<h{h}>{name}{rel}</h{h}>");
            html_items(out, &item.children, level + 1);
            out.push_str("</section>\n");
            continue;
        }
        out.push_str("<div class=\"item\">");
        if !name.is_empty() {
            let _ = writeln!(out, "<b>{name}:</b>{rel}<br>");
        }
        let _ = writeln!(out, "{}", html_text(&value_text(&item.value)));
        if !item.children.is_empty() {
            out.push_str("<div class=\"sub\">\n");
            html_items(out, &item.children, level + 1);
            out.push_str("</div>\n");
        }
        out.push_str("</div>\n");
    }
}

// ---- PDF ----

/// Advance widths (1/1000 em) of Helvetica for ASCII 32..=126, from
/// Adobe's AFM (quotesingle and grave as WinAnsiEncoding places them).
const HELVETICA: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, // ' '../
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, // 0..?
    1015, 667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, // @..O
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469, 556, // P.._
    333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, // `..o
    556, 556, 333, 500, 278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584, // p..~
];

/// Advance widths of Helvetica-Bold for ASCII 32..=126 (Adobe's AFM).
const HELVETICA_BOLD: [u16; 95] = [
    278, 333, 474, 556, 556, 889, 722, 238, 333, 333, 389, 584, 278, 333, 278, 278, // ' '../
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, 333, 333, 584, 584, 584, 611, // 0..?
    975, 722, 722, 722, 722, 667, 611, 778, 722, 278, 556, 722, 611, 833, 722, 778, // @..O
    667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 333, 278, 333, 584, 556, // P.._
    333, 556, 611, 556, 611, 556, 333, 611, 611, 278, 278, 556, 278, 889, 611, 611, // `..o
    611, 611, 389, 556, 333, 611, 556, 778, 556, 556, 500, 389, 280, 389, 584, // p..~
];

/// A character in WinAnsiEncoding (Windows-1252), `?` when it has none.
fn win_ansi(c: char) -> u8 {
    match c {
        ' '..='~' => c as u8,
        '\u{A0}'..='\u{FF}' => c as u32 as u8,
        '\t' => b' ',
        '€' => 0x80,
        '‚' => 0x82,
        'ƒ' => 0x83,
        '„' => 0x84,
        '…' => 0x85,
        '†' => 0x86,
        '‡' => 0x87,
        'ˆ' => 0x88,
        '‰' => 0x89,
        'Š' => 0x8A,
        '‹' => 0x8B,
        'Œ' => 0x8C,
        'Ž' => 0x8E,
        '‘' => 0x91,
        '’' => 0x92,
        '“' => 0x93,
        '”' => 0x94,
        '•' => 0x95,
        '–' => 0x96,
        '—' => 0x97,
        '˜' => 0x98,
        '™' => 0x99,
        'š' => 0x9A,
        '›' => 0x9B,
        'œ' => 0x9C,
        'ž' => 0x9E,
        'Ÿ' => 0x9F,
        _ => b'?',
    }
}

/// The advance width of WinAnsi byte `b` (1/1000 em).
fn width(b: u8, bold: bool) -> u16 {
    let table = if bold { &HELVETICA_BOLD } else { &HELVETICA };
    let ascii = |c: u8| table[usize::from(c - 32)];
    match b {
        32..=126 => ascii(b),
        // Accented Latin-1 letters are as wide as their base letter.
        0xC0..=0xC5 => ascii(b'A'),
        0xC7 => ascii(b'C'),
        0xC8..=0xCB => ascii(b'E'),
        0xCC..=0xCF => ascii(b'I'),
        0xD0 => ascii(b'D'),
        0xD1 => ascii(b'N'),
        0xD2..=0xD6 | 0xD8 => ascii(b'O'),
        0xD9..=0xDC => ascii(b'U'),
        0xDD | 0x9F => ascii(b'Y'),
        0xE0..=0xE5 => ascii(b'a'),
        0xE7 => ascii(b'c'),
        0xE8..=0xEB => ascii(b'e'),
        0xEC..=0xEF => 278,
        0xF1 => ascii(b'n'),
        0xF2..=0xF6 | 0xF8 => ascii(b'o'),
        0xF9..=0xFC => ascii(b'u'),
        0xFD | 0xFF => ascii(b'y'),
        0x8A => ascii(b'S'),
        0x9A => ascii(b's'),
        0x8E => ascii(b'Z'),
        0x9E => ascii(b'z'),
        0xA0 => 278,
        0x91 | 0x92 | 0x82 => 278,
        0x93 | 0x94 | 0x84 => 500,
        0x95 => 350,
        0xD7 | 0xF7 | 0xB1 => 584,
        // Everything else (Æ, Œ, ‰, …, —): as wide as the widest glyphs,
        // so a wrapped line never overflows.
        _ => 1015,
    }
}

/// Width of `text` at `size` points.
fn text_width(text: &[u8], size: f32, bold: bool) -> f32 {
    text.iter().map(|&b| f32::from(width(b, bold))).sum::<f32>() * size / 1000.0
}

/// `text` (WinAnsi) wrapped to lines no wider than `max` points: at
/// spaces, and inside a word only when the word alone is too wide.
fn wrap(text: &[u8], size: f32, bold: bool, max: f32) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    for word in text.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let candidate_width = if line.is_empty() {
            text_width(word, size, bold)
        } else {
            text_width(&line, size, bold)
                + text_width(b" ", size, bold)
                + text_width(word, size, bold)
        };
        if candidate_width <= max {
            if !line.is_empty() {
                line.push(b' ');
            }
            line.extend_from_slice(word);
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        // A word wider than the line: cut by characters.
        for &b in word {
            if !line.is_empty()
                && text_width(&line, size, bold) + f32::from(width(b, bold)) * size / 1000.0 > max
            {
                lines.push(std::mem::take(&mut line));
            }
            line.push(b);
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// One line of text to lay out.
struct Line {
    text: Vec<u8>,
    size: f32,
    bold: bool,
    indent: f32,
    /// Space above it, in points.
    gap: f32,
}

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const MARGIN: f32 = 56.0;
const BODY: f32 = 10.5;

struct Layout {
    lines: Vec<Line>,
}

impl Layout {
    /// Add `text` (every paragraph of it) wrapped.
    fn add(&mut self, text: &str, size: f32, bold: bool, indent: f32, gap: f32) {
        let max = PAGE_W - 2.0 * MARGIN - indent;
        let mut gap = gap;
        for para in text.replace("\r\n", "\n").replace('\r', "\n").split('\n') {
            let bytes: Vec<u8> = para.chars().map(win_ansi).collect();
            for l in wrap(&bytes, size, bold, max) {
                self.lines.push(Line {
                    text: l,
                    size,
                    bold,
                    indent,
                    gap,
                });
                gap = 0.0;
            }
        }
    }

    fn items(&mut self, items: &[SrItem], level: usize) {
        let indent = 14.0 * (level.saturating_sub(1)) as f32;
        let indent = indent.min(160.0);
        for item in items {
            let mut name = label(item);
            if let Some(r) = relationship(item) {
                let _ = write!(name, " ({r})");
            }
            if let SrValue::Container { .. } = item.value {
                let size = (15.0 - 1.5 * level as f32).max(11.0);
                self.add(&name, size, true, indent, 10.0);
                self.items(&item.children, level + 1);
                continue;
            }
            if !name.is_empty() {
                self.add(&format!("{name}:"), BODY, true, indent, 6.0);
                self.add(&value_text(&item.value), BODY, false, indent, 0.0);
            } else {
                self.add(&value_text(&item.value), BODY, false, indent, 6.0);
            }
            self.items(&item.children, level + 1);
        }
    }
}

/// The report as a PDF document (A4, Helvetica).
pub fn pdf(doc: &SrDocument) -> Vec<u8> {
    let mut layout = Layout { lines: Vec::new() };
    for (k, v) in header_rows(doc) {
        layout.add(&format!("{k}: {v}"), 9.5, false, 0.0, 0.0);
    }
    layout.add(&title(doc), 18.0, true, 0.0, 18.0);
    layout.items(&doc.items, 1);

    // Pages: lines placed top to bottom, a new page when the next line
    // would run into the bottom margin.
    let mut pages: Vec<Vec<(f32, &Line)>> = vec![Vec::new()];
    let mut y = PAGE_H - MARGIN;
    for line in &layout.lines {
        let step = line.gap + line.size * 1.35;
        if y - step < MARGIN + 20.0 && pages.last().is_some_and(|p| !p.is_empty()) {
            pages.push(Vec::new());
            y = PAGE_H - MARGIN;
        }
        y -= step;
        if let Some(p) = pages.last_mut() {
            p.push((y, line));
        }
    }

    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let regular = Ref::new(3);
    let bold = Ref::new(4);
    let info = Ref::new(5);
    let first_page = 6;
    let mut pdf = Pdf::new();
    pdf.catalog(catalog).pages(tree);
    let page_ids: Vec<Ref> = (0..pages.len())
        .map(|i| Ref::new(first_page + 2 * i32::try_from(i).unwrap_or(i32::MAX / 4)))
        .collect();
    pdf.pages(tree)
        .kids(page_ids.iter().copied())
        .count(i32::try_from(pages.len()).unwrap_or(i32::MAX));
    pdf.type1_font(regular)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(bold)
        .base_font(Name(b"Helvetica-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.document_info(info)
        .title(TextStr(&title(doc)))
        .producer(TextStr("RelayPACS"));
    let n = pages.len();
    let footer_name: Vec<u8> = person_name(&doc.header.patient_name)
        .chars()
        .map(win_ansi)
        .collect();
    for (i, (page, id)) in pages.iter().zip(&page_ids).enumerate() {
        let content_id = Ref::new(id.get() + 1);
        let mut p = pdf.page(*id);
        p.parent(tree)
            .media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H))
            .contents(content_id);
        {
            let mut resources = p.resources();
            let mut fonts = resources.fonts();
            fonts.pair(Name(b"F1"), regular);
            fonts.pair(Name(b"F2"), bold);
            fonts.finish();
            resources.finish();
        }
        p.finish();
        let mut c = Content::new();
        c.begin_text();
        for (y, line) in page {
            let font = if line.bold { b"F2" } else { b"F1" };
            c.set_font(Name(font), line.size);
            c.set_text_matrix([1.0, 0.0, 0.0, 1.0, MARGIN + line.indent, *y]);
            c.show(Str(&line.text));
        }
        let mut footer = footer_name.clone();
        if !footer.is_empty() {
            footer.extend_from_slice(b" - ");
        }
        footer.extend_from_slice(format!("page {} of {n}", i + 1).as_bytes());
        c.set_font(Name(b"F1"), 8.0);
        c.set_text_matrix([1.0, 0.0, 0.0, 1.0, MARGIN, MARGIN - 24.0]);
        c.show(Str(&footer));
        c.end_text();
        pdf.stream(content_id, &c.finish());
    }
    pdf.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use relaypacs_core::dicom::sr::ReportHeader;

    fn code(v: &str, s: &str, m: &str) -> Option<Code> {
        Some(Code {
            value: v.into(),
            scheme: s.into(),
            meaning: m.into(),
        })
    }

    fn doc(items: Vec<SrItem>) -> SrDocument {
        SrDocument {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
            sop_instance_uid: "1.2.3".into(),
            title: code("18748-4", "LN", "Report <b>"),
            header: ReportHeader {
                patient_name: "Doe^Jane".into(),
                patient_id: "P1".into(),
                ..ReportHeader::default()
            },
            completion_flag: "COMPLETE".into(),
            completion_description: String::new(),
            verification_flag: "VERIFIED".into(),
            preliminary_flag: String::new(),
            verifiers: Vec::new(),
            items,
        }
    }

    fn leaf(concept: &str, value: SrValue) -> SrItem {
        SrItem {
            relationship: "CONTAINS".into(),
            concept: code("1", "DCM", concept),
            value,
            children: Vec::new(),
        }
    }

    fn sample() -> SrDocument {
        doc(vec![SrItem {
            relationship: "CONTAINS".into(),
            concept: code("121070", "DCM", "Findings"),
            value: SrValue::Container { continuous: false },
            children: vec![
                leaf(
                    "Finding",
                    SrValue::Text("<script>alert(1)</script> & more".into()),
                ),
                leaf(
                    "Length",
                    SrValue::Num {
                        value: Some("12.5".into()),
                        units: code("mm", "UCUM", "millimeter"),
                        qualifier: None,
                    },
                ),
                leaf(
                    "Finding",
                    SrValue::Code(code("27925004", "SCT", "Nodule").unwrap()),
                ),
            ],
        }])
    }

    #[test]
    fn html_is_escaped_and_readable() {
        let h = html(&sample());
        assert!(!h.contains("<script>"), "{h}");
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"));
        assert!(h.contains("<h1>Report &lt;b&gt;</h1>"));
        assert!(h.contains("<h2>Findings</h2>"));
        assert!(h.contains("12.5 mm"));
        assert!(h.contains("Nodule (27925004, SCT)"));
        assert!(h.contains("Jane Doe (#P1)"));
    }

    #[test]
    fn pdf_is_a_pdf_with_pages() {
        let p = pdf(&sample());
        assert!(p.starts_with(b"%PDF-"));
        let long: Vec<SrItem> = (0..300)
            .map(|i| leaf("Note", SrValue::Text(format!("paragraph {i} ").repeat(20))))
            .collect();
        let p = pdf(&doc(long));
        let pages = p
            .windows(b"/Type /Page\n".len())
            .filter(|w| w == b"/Type /Page\n")
            .count();
        let kids = String::from_utf8_lossy(&p).matches("/Type /Page").count();
        assert!(kids > 10 || pages > 10, "{kids} {pages}");
    }

    #[test]
    fn wrapping_respects_the_width() {
        let text: Vec<u8> = "word ".repeat(200).into_bytes();
        for l in wrap(&text, 10.0, false, 200.0) {
            assert!(text_width(&l, 10.0, false) <= 200.0);
        }
        let long = vec![b'W'; 500];
        let lines = wrap(&long, 10.0, true, 100.0);
        assert!(lines.len() > 1);
        assert_eq!(lines.iter().map(Vec::len).sum::<usize>(), 500);
        assert_eq!(win_ansi('é'), 0xE9);
        assert_eq!(win_ansi('€'), 0x80);
        assert_eq!(win_ansi('中'), b'?');
    }
}

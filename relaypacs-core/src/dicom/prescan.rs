//! The structural pre-scan: a pure, non-recursive walk over the element
//! headers of a Part-10 file, with every limit an argument.
//!
//! Written by hand because no DICOM crate offers a bounded walk: dicom-rs
//! recurses per nesting level and trusts declared lengths (see the module
//! docs of [`crate::dicom`]). This walk keeps an explicit stack, checks
//! every declared length against the bytes that remain in its container
//! before it moves, allocates nothing proportional to a declared length,
//! and runs in time linear in the bytes it looks at.

use std::io::Read;

use dicom_core::Tag;
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_dictionary_std::StandardDataDictionary;

use super::DicomError;

/// Limits of the pre-scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrescanLimits {
    /// Deepest sequence nesting accepted (default 32).
    pub max_depth: u32,
    /// Most data elements (items included) before Pixel Data (default 100,000).
    pub max_elements: u64,
    /// Cap on the inflated size of a Deflated data set's header (default 8 MiB).
    pub max_inflated_bytes: u64,
}

impl Default for PrescanLimits {
    fn default() -> Self {
        Self {
            max_depth: 32,
            max_elements: 100_000,
            max_inflated_bytes: 8 << 20,
        }
    }
}

/// What the pre-scan found. String values are top-level attributes with
/// trailing NUL/space padding removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrescanReport {
    /// (0002,0010) Transfer Syntax UID.
    pub transfer_syntax: String,
    /// Offset just past the file meta group.
    pub meta_end: u64,
    /// Offset of the top-level Pixel Data element, if any (in the inflated
    /// data set for Deflated files).
    pub pixel_data_offset: Option<u64>,
    /// End of the header: the Pixel Data offset, or the end of the data set.
    pub header_end: u64,
    /// Data elements seen.
    pub element_count: u64,
    /// Deepest sequence nesting seen.
    pub max_depth_seen: u32,
    /// Whether the data set was Deflated (and inflated through the cap).
    pub deflated: bool,
    /// (0008,0016) SOP Class UID.
    pub sop_class_uid: Option<String>,
    /// (0008,0018) SOP Instance UID.
    pub sop_instance_uid: Option<String>,
    /// (0020,000D) Study Instance UID.
    pub study_instance_uid: Option<String>,
    /// (0020,000E) Series Instance UID.
    pub series_instance_uid: Option<String>,
    /// (0010,0020) Patient ID.
    pub patient_id: Option<String>,
    /// (0008,0060) Modality.
    pub modality: Option<String>,
    /// (0028,0010) Rows.
    pub rows: Option<u16>,
    /// (0028,0011) Columns.
    pub columns: Option<u16>,
    /// (0028,0002) Samples per Pixel.
    pub samples_per_pixel: Option<u16>,
    /// (0028,0100) Bits Allocated.
    pub bits_allocated: Option<u16>,
    /// (0028,0008) Number of Frames.
    pub number_of_frames: Option<String>,
    /// (0028,0004) Photometric Interpretation.
    pub photometric_interpretation: Option<String>,
    /// Tag `(group, element)` of the top-level pixel data element found:
    /// (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data or (7FE0,0009)
    /// Double Float Pixel Data. `None` when there is none.
    pub pixel_data_tag: Option<(u16, u16)>,
    /// Data elements (pixel data included) whose value length is odd.
    /// PS3.5 7.1.1 asks for even lengths; dcmtk and dicom-object read odd
    /// ones as declared, and so does this scan.
    pub odd_length_elements: u64,
    /// Tag of the first element with an odd value length.
    pub first_odd_length_tag: Option<(u16, u16)>,
    /// For Deflated files: the inflated data set up to `header_end`, the
    /// exact bytes this scan verified (bounded by the inflation cap).
    pub inflated_header: Option<Vec<u8>>,
}

impl PrescanReport {
    /// Bytes the image attributes call for in the top-level pixel data
    /// element (checked arithmetic); `None` when the attributes needed are
    /// absent.
    ///
    /// For (7FE0,0010) Pixel Data: Rows x Columns x values per pixel x
    /// Number of Frames x Bits Allocated bits, rounded up to whole bytes
    /// once for all frames (PS3.5 8.1.1 and 8.2: 1-bit frames are packed
    /// without padding between them). Values per pixel are Samples per
    /// Pixel, except 2 for YBR_FULL_422 and YBR_PARTIAL_422 (Cb and Cr are
    /// shared by two pixels of a row) and 1.5 for YBR_PARTIAL_420 (shared by
    /// 2x2 pixels; PS3.3 C.7.6.3.1.2). For (7FE0,0008) Float Pixel Data and
    /// (7FE0,0009) Double Float Pixel Data: Rows x Columns x Samples x
    /// Frames x 4 or 8 bytes. The value may be longer (its padding to an
    /// even length, or more); only a shorter one is a defect.
    pub fn native_pixel_bytes(&self) -> Result<Option<u64>, DicomError> {
        let (Some(r), Some(c)) = (self.rows, self.columns) else {
            return Ok(None);
        };
        let overflow = || DicomError::BadAttribute {
            name: "Rows",
            reason: "Rows x Columns x Samples x Bits x Frames overflows".into(),
        };
        let frames: u64 = match self.number_of_frames.as_deref() {
            None | Some("") => 1,
            Some(f) => f.trim().parse().map_err(|_| DicomError::BadAttribute {
                name: "NumberOfFrames",
                reason: "not an unsigned integer".into(),
            })?,
        };
        let samples = u64::from(self.samples_per_pixel.unwrap_or(1));
        let pixels = u64::from(r) * u64::from(c);
        let float_bytes = match self.pixel_data_tag {
            Some((0x7FE0, 0x0008)) => Some(4u64),
            Some((0x7FE0, 0x0009)) => Some(8u64),
            _ => None,
        };
        if let Some(width) = float_bytes {
            return pixels
                .checked_mul(samples)
                .and_then(|x| x.checked_mul(frames))
                .and_then(|x| x.checked_mul(width))
                .map(Some)
                .ok_or_else(overflow);
        }
        let Some(bits) = self.bits_allocated else {
            return Ok(None);
        };
        // Values per frame, in half values so that 4:2:0 stays an integer.
        let halves = match self.photometric_interpretation.as_deref() {
            Some("YBR_FULL_422" | "YBR_PARTIAL_422") => pixels.checked_mul(4),
            Some("YBR_PARTIAL_420") => pixels.checked_mul(3),
            _ => pixels.checked_mul(samples).and_then(|x| x.checked_mul(2)),
        };
        let half_bits = halves
            .and_then(|x| x.checked_mul(frames))
            .and_then(|x| x.checked_mul(u64::from(bits)))
            .ok_or_else(overflow)?;
        Ok(Some(half_bits.div_ceil(16)))
    }
}

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const UNDEFINED: u32 = 0xFFFF_FFFF;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Syntax {
    ImplicitLe,
    ExplicitLe,
    ExplicitBe,
}

fn syntax_of(ts: &str) -> Option<(Syntax, bool)> {
    match ts {
        IMPLICIT_LE => Some((Syntax::ImplicitLe, false)),
        EXPLICIT_LE => Some((Syntax::ExplicitLe, false)),
        EXPLICIT_BE => Some((Syntax::ExplicitBe, false)),
        DEFLATED => Some((Syntax::ExplicitLe, true)),
        // Encapsulated (JPEG family, JPEG-LS, JPEG 2000, MPEG, HTJ2K, …) and RLE:
        // explicit VR little endian data sets with encapsulated pixel data.
        t if t.starts_with("1.2.840.10008.1.2.4.") || t == "1.2.840.10008.1.2.5" => {
            Some((Syntax::ExplicitLe, false))
        }
        _ => None,
    }
}

/// A declared length larger than the bytes left in its container.
fn overrun(g: u16, e: u16, offset: u64, declared: u64, remaining: u64) -> DicomError {
    DicomError::LengthOverrun {
        tag: tag_str(g, e),
        offset,
        declared,
        remaining,
    }
}

fn tag_str(g: u16, e: u16) -> String {
    format!("({g:04X},{e:04X})")
}

/// A view of the bytes with the file's real size: reading past `avail`
/// but within `total` means the header does not fit the prefix.
struct Bytes<'a> {
    data: &'a [u8],
    total: u64,
    /// Set when `total` is unknown because inflation stopped at its cap.
    capped: Option<u64>,
    max_header: u64,
}

impl Bytes<'_> {
    fn need(&self, pos: u64, n: u64) -> Result<&[u8], DicomError> {
        let end = pos.checked_add(n).ok_or(DicomError::Malformed {
            offset: pos,
            reason: "offset overflow".into(),
        })?;
        if end > self.total {
            if let Some(cap) = self.capped {
                return Err(DicomError::InflateLimit { max: cap });
            }
            return Err(DicomError::Truncated {
                offset: pos,
                needed: end - self.total,
            });
        }
        let (Ok(s), Ok(e)) = (usize::try_from(pos), usize::try_from(end)) else {
            return Err(DicomError::HeaderTooLarge {
                max: self.max_header,
            });
        };
        self.data.get(s..e).ok_or(DicomError::HeaderTooLarge {
            max: self.max_header,
        })
    }
}

fn u16_at(b: &[u8], i: usize, be: bool) -> u16 {
    let x = [
        b.get(i).copied().unwrap_or(0),
        b.get(i + 1).copied().unwrap_or(0),
    ];
    if be {
        u16::from_be_bytes(x)
    } else {
        u16::from_le_bytes(x)
    }
}

fn u32_at(b: &[u8], i: usize, be: bool) -> u32 {
    let mut x = [0u8; 4];
    for (k, v) in x.iter_mut().enumerate() {
        *v = b.get(i + k).copied().unwrap_or(0);
    }
    if be {
        u32::from_be_bytes(x)
    } else {
        u32::from_le_bytes(x)
    }
}

fn clean(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(v);
    s.trim_end_matches(['\0', ' '])
        .trim_start_matches(' ')
        .to_owned()
}

/// VRs with a 2-byte reserved field and a 4-byte length in explicit VR.
pub(crate) fn long_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// The VRs of PS3.5 Table 6.2-1. Any other pair of letters is refused:
/// parsers disagree on how long an unknown VR's length field is, and a
/// disagreement is exactly how a checked file turns into a huge allocation
/// in the next parser.
fn known_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FD"
            | b"FL"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SQ"
            | b"SS"
            | b"ST"
            | b"SV"
            | b"TM"
            | b"UC"
            | b"UI"
            | b"UL"
            | b"UN"
            | b"UR"
            | b"US"
            | b"UT"
            | b"UV"
    )
}

/// The VR an Implicit VR reader gives an element, as dicom-object does:
/// OW for Pixel Data and Overlay Data, else the dictionary's (its first
/// choice where it names several), else UN.
fn implicit_vr(g: u16, e: u16) -> [u8; 2] {
    if (g, e) == (0x7FE0, 0x0010) || (g >> 8 == 0x60 && e == 0x3000) {
        return *b"OW";
    }
    StandardDataDictionary
        .by_tag(Tag(g, e))
        .map(|entry| entry.vr().relaxed().to_bytes())
        .unwrap_or(*b"UN")
}

/// The size in bytes of one value of a binary VR (PS3.5 table 6.2-1);
/// None for VRs whose values are bytes or text.
fn binary_value_size(vr: [u8; 2]) -> Option<u64> {
    match &vr {
        b"US" | b"SS" | b"OW" => Some(2),
        b"UL" | b"SL" | b"FL" | b"OF" | b"OL" | b"AT" => Some(4),
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => Some(8),
        _ => None,
    }
}

fn dictionary_says_sequence(g: u16, e: u16) -> bool {
    StandardDataDictionary
        .by_tag(Tag(g, e))
        .is_some_and(|entry| matches!(entry.vr(), VirtualVr::Exact(dicom_core::VR::SQ)))
}

#[derive(Clone, Copy)]
enum Frame {
    /// A sequence; `end` is None for undefined length.
    Sequence { end: Option<u64> },
    /// An item of a sequence.
    Item { end: Option<u64> },
    /// Encapsulated pixel data fragments (undefined length).
    Fragments,
}

impl Frame {
    fn end(self) -> Option<u64> {
        match self {
            Frame::Sequence { end } | Frame::Item { end } => end,
            Frame::Fragments => None,
        }
    }
}

/// Pre-scan a Part-10 file. `bytes` is the file or a prefix of it;
/// `total_len` is the whole file's size. See the module docs.
pub fn prescan(
    bytes: &[u8],
    total_len: u64,
    limits: &PrescanLimits,
) -> Result<PrescanReport, DicomError> {
    let mut report = PrescanReport::default();
    prescan_into(bytes, total_len, limits, &mut report)?;
    Ok(report)
}

/// What [`prescan`] found before it stopped, whether or not it failed.
pub(crate) fn prescan_partial(
    bytes: &[u8],
    total_len: u64,
    limits: &PrescanLimits,
) -> PrescanReport {
    let mut report = PrescanReport::default();
    // The error is the caller's to report; only the findings matter here.
    let _ = prescan_into(bytes, total_len, limits, &mut report);
    report
}

fn prescan_into(
    bytes: &[u8],
    total_len: u64,
    limits: &PrescanLimits,
    report: &mut PrescanReport,
) -> Result<(), DicomError> {
    let view = Bytes {
        data: bytes,
        total: total_len,
        capped: None,
        max_header: bytes.len() as u64,
    };
    if total_len < 132 {
        return Err(DicomError::NotDicom {
            reason: format!("{total_len} bytes is too short for a preamble and DICM"),
        });
    }
    if view.need(128, 4)? != b"DICM" {
        return Err(DicomError::NotDicom {
            reason: "no DICM prefix after the 128-byte preamble".into(),
        });
    }
    let (ts, meta_end) = scan_meta(&view)?;
    let (syntax, deflated) =
        syntax_of(&ts).ok_or_else(|| DicomError::UnsupportedTransferSyntax { uid: ts.clone() })?;
    *report = PrescanReport {
        transfer_syntax: ts,
        meta_end,
        deflated,
        ..PrescanReport::default()
    };
    if deflated {
        // The data set after the meta group is raw deflate: inflate at most
        // the cap, plus one byte to tell "ended" from "capped".
        let start = usize::try_from(meta_end).map_err(|_| DicomError::HeaderTooLarge {
            max: bytes.len() as u64,
        })?;
        let compressed = bytes.get(start..).unwrap_or(&[]);
        let mut inflated = Vec::new();
        let cap = limits.max_inflated_bytes;
        flate2::read::DeflateDecoder::new(compressed)
            .take(cap.saturating_add(1))
            .read_to_end(&mut inflated)
            .map_err(|e| DicomError::Malformed {
                offset: meta_end,
                reason: format!("bad deflate stream: {e}"),
            })?;
        let capped = inflated.len() as u64 > cap;
        if capped {
            inflated.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
        }
        let iv = Bytes {
            data: &inflated,
            total: inflated.len() as u64,
            capped: capped.then_some(cap),
            max_header: cap,
        };
        walk(&iv, 0, Syntax::ExplicitLe, limits, report).map_err(|e| match e {
            // Running out of inflated bytes means the header is bigger than the cap.
            DicomError::LengthOverrun { .. }
            | DicomError::Truncated { .. }
            | DicomError::HeaderTooLarge { .. }
                if capped =>
            {
                DicomError::InflateLimit { max: cap }
            }
            e => e,
        })?;
        inflated.truncate(usize::try_from(report.header_end).unwrap_or(inflated.len()));
        report.inflated_header = Some(inflated);
    } else {
        walk(&view, meta_end, syntax, limits, report)?;
    }
    Ok(())
}

/// The transfer syntax and data set offset of a Part-10 file from its
/// first bytes. `total` is the file's size when known; with `None` the
/// answer is `Ok(None)` while `prefix` is too short to tell (more bytes
/// are needed). Pure and bounded by `prefix`.
pub(crate) fn file_meta(
    prefix: &[u8],
    total: Option<u64>,
) -> Result<Option<(String, u64)>, DicomError> {
    let view = Bytes {
        data: prefix,
        total: total.unwrap_or(u64::MAX),
        capped: None,
        max_header: prefix.len() as u64,
    };
    let scanned = view.need(128, 4).and_then(|magic| {
        if magic != b"DICM" {
            return Err(DicomError::NotDicom {
                reason: "no DICM prefix after the 128-byte preamble".into(),
            });
        }
        scan_meta(&view)
    });
    match scanned {
        Ok(found) => Ok(Some(found)),
        // Past the bytes we hold but within the (unknown) file: wait for more.
        Err(DicomError::HeaderTooLarge { .. }) if total.is_none() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Walk the file meta group (always explicit VR little endian).
fn scan_meta(view: &Bytes<'_>) -> Result<(String, u64), DicomError> {
    let mut pos = 132u64;
    let mut end: Option<u64> = None;
    let mut ts = None;
    loop {
        if let Some(e) = end
            && pos >= e
        {
            if pos > e {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: "meta group overruns its group length".into(),
                });
            }
            break;
        }
        if pos + 2 > view.total {
            break;
        }
        let h = view.need(pos, 2)?;
        let g = u16_at(h, 0, false);
        if g != 0x0002 {
            if end.is_some() {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: "non-meta element inside the meta group".into(),
                });
            }
            break; // no group length: the meta group ends at the first other group
        }
        let h = view.need(pos, 8)?;
        let e = u16_at(h, 2, false);
        let vr = [h[4], h[5]];
        if !known_vr(vr) {
            return Err(DicomError::Malformed {
                offset: pos,
                reason: "meta group is not explicit VR".into(),
            });
        }
        let (hdr, len) = if long_vr(vr) {
            let h = view.need(pos, 12)?;
            (12u64, u64::from(u32_at(h, 8, false)))
        } else {
            (8u64, u64::from(u16_at(h, 6, false)))
        };
        if len == u64::from(UNDEFINED) {
            return Err(DicomError::Malformed {
                offset: pos,
                reason: "undefined length in the meta group".into(),
            });
        }
        let vpos = pos + hdr;
        let remaining = view.total.saturating_sub(vpos);
        if len > remaining {
            return Err(overrun(g, e, pos, len, remaining));
        }
        if len > 1 << 20 {
            return Err(DicomError::Malformed {
                offset: pos,
                reason: "meta element larger than 1 MiB".into(),
            });
        }
        let value = view.need(vpos, len)?;
        match e {
            0x0000 => {
                // PS3.10 7.1: the group length is the meta group's first
                // element, once. A second one would move the group's end
                // after the first was checked against the file's size, so
                // a look at a prefix (size unknown) and one at the whole
                // file could disagree (found by fuzz target `content`).
                if pos != 132 {
                    return Err(DicomError::Malformed {
                        offset: pos,
                        reason: "group length (0002,0000) is not the first meta element".into(),
                    });
                }
                if len != 4 {
                    return Err(DicomError::Malformed {
                        offset: pos,
                        reason: "group length is not 4 bytes".into(),
                    });
                }
                let gl = u64::from(u32_at(value, 0, false));
                let meta_end = vpos + 4 + gl;
                if meta_end > view.total {
                    return Err(overrun(2, 0, pos, gl, view.total.saturating_sub(vpos + 4)));
                }
                end = Some(meta_end);
            }
            0x0010 => ts = Some(clean(value)),
            _ => {}
        }
        pos = vpos + len;
    }
    let ts = ts.ok_or(DicomError::MissingAttribute {
        name: "TransferSyntaxUID",
    })?;
    Ok((ts, pos))
}

/// Walk the data set from `start` with an explicit stack.
fn walk(
    view: &Bytes<'_>,
    start: u64,
    syntax: Syntax,
    limits: &PrescanLimits,
    report: &mut PrescanReport,
) -> Result<(), DicomError> {
    let be = syntax == Syntax::ExplicitBe;
    let explicit = syntax != Syntax::ImplicitLe;
    let mut stack: Vec<Frame> = Vec::new();
    let mut pos = start;
    let mut depth: u32 = 0;
    loop {
        // Close defined-length containers that end here.
        while let Some(top) = stack.last().copied() {
            match top.end() {
                Some(end) if pos == end => {
                    stack.pop();
                    if let Frame::Sequence { .. } = top {
                        depth -= 1;
                    }
                }
                Some(end) if pos > end => {
                    return Err(DicomError::Malformed {
                        offset: pos,
                        reason: "element runs past its container".into(),
                    });
                }
                _ => break,
            }
        }
        // The end of the container we are in, or of the data set.
        let limit = stack
            .iter()
            .rev()
            .find_map(|f| f.end())
            .unwrap_or(view.total);
        if stack.is_empty() && pos >= view.total {
            if view.capped.is_some() {
                return Err(DicomError::InflateLimit {
                    max: view.max_header,
                });
            }
            report.header_end = pos;
            return Ok(());
        }
        let h = view.need(pos, 8)?;
        let g = u16_at(h, 0, be);
        let e = u16_at(h, 2, be);
        report.element_count += 1;
        if report.element_count > limits.max_elements {
            return Err(DicomError::TooManyElements {
                max: limits.max_elements,
            });
        }
        if g == 0xFFFE {
            let len = u32_at(h, 4, be);
            let top = stack.last().copied();
            match (e, top) {
                (0xE000, Some(Frame::Sequence { .. })) => {
                    pos += 8;
                    if len == UNDEFINED {
                        stack.push(Frame::Item { end: None });
                    } else {
                        let remaining = limit.saturating_sub(pos);
                        if u64::from(len) > remaining {
                            return Err(overrun(g, e, pos - 8, u64::from(len), remaining));
                        }
                        stack.push(Frame::Item {
                            end: Some(pos + u64::from(len)),
                        });
                    }
                }
                (0xE000, Some(Frame::Fragments)) => {
                    if len == UNDEFINED {
                        return Err(DicomError::Malformed {
                            offset: pos,
                            reason: "fragment with undefined length".into(),
                        });
                    }
                    let remaining = limit.saturating_sub(pos + 8);
                    if u64::from(len) > remaining {
                        return Err(overrun(g, e, pos, u64::from(len), remaining));
                    }
                    view.need(pos + 8, u64::from(len))?;
                    pos += 8 + u64::from(len);
                }
                (0xE00D, Some(Frame::Item { end: None })) if len == 0 => {
                    stack.pop();
                    pos += 8;
                }
                (0xE0DD, Some(Frame::Sequence { end: None })) if len == 0 => {
                    stack.pop();
                    depth -= 1;
                    pos += 8;
                }
                (0xE0DD, Some(Frame::Fragments)) if len == 0 => {
                    stack.pop();
                    pos += 8;
                }
                _ => {
                    return Err(DicomError::StrayDelimiter {
                        tag: tag_str(g, e),
                        offset: pos,
                    });
                }
            }
            continue;
        }
        if matches!(
            stack.last(),
            Some(Frame::Sequence { .. } | Frame::Fragments)
        ) {
            return Err(DicomError::Malformed {
                offset: pos,
                reason: format!("element {} directly inside a sequence", tag_str(g, e)),
            });
        }
        // Element header.
        let (hdr, len, vr): (u64, u32, Option<[u8; 2]>) = if explicit {
            let vr = [h[4], h[5]];
            if !known_vr(vr) {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: format!("invalid VR in {}", tag_str(g, e)),
                });
            }
            if long_vr(vr) {
                let h12 = view.need(pos, 12)?;
                (12, u32_at(h12, 8, be), Some(vr))
            } else {
                (8, u32::from(u16_at(h, 6, be)), Some(vr))
            }
        } else {
            (8, u32_at(h, 4, false), None)
        };
        let vpos = pos + hdr;
        let is_sq = match vr {
            Some(v) => &v == b"SQ",
            None => dictionary_says_sequence(g, e),
        };
        let top_level = stack.is_empty();
        // Pixel Data, Float Pixel Data or Double Float Pixel Data at the top
        // level ends the header: its value is checked against the image
        // attributes and the file size, never read into memory.
        if g == 0x7FE0 && matches!(e, 0x0008 | 0x0009 | 0x0010) && top_level {
            report.pixel_data_offset = Some(pos);
            report.pixel_data_tag = Some((g, e));
            report.header_end = pos;
            if len != UNDEFINED {
                // Native pixel data must hold what the image attributes say
                // (it may be longer: padding to an even length, or more).
                if let Some(need) = report.native_pixel_bytes()?
                    && need > u64::from(len)
                {
                    return Err(DicomError::Malformed {
                        offset: pos,
                        reason: format!(
                            "pixel data has {len} bytes, the image attributes call for {need}"
                        ),
                    });
                }
                let remaining = limit.saturating_sub(vpos);
                if u64::from(len) > remaining {
                    return Err(overrun(g, e, pos, u64::from(len), remaining));
                }
                if len % 2 == 1 {
                    note_odd_length(report, g, e);
                }
            } else if e == 0x0010 {
                // Encapsulated: fragments, never a native length.
                walk_fragments(view, vpos, be, limits, report)?;
            } else {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: format!("undefined length on {}", tag_str(g, e)),
                });
            }
            return Ok(());
        }
        if len == UNDEFINED {
            let un = vr.is_some_and(|v| &v == b"UN");
            if is_sq || un || !explicit {
                depth += 1;
                report.max_depth_seen = report.max_depth_seen.max(depth);
                if depth > limits.max_depth {
                    return Err(DicomError::TooDeep {
                        max: limits.max_depth,
                    });
                }
                stack.push(Frame::Sequence { end: None });
            } else if g == 0x7FE0 && e == 0x0010 {
                stack.push(Frame::Fragments);
            } else {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: format!("undefined length on {}", tag_str(g, e)),
                });
            }
            pos = vpos;
            continue;
        }
        let len = u64::from(len);
        let remaining = limit.saturating_sub(vpos);
        if len > remaining {
            return Err(overrun(g, e, pos, len, remaining));
        }
        if len % 2 == 1 {
            // PS3.5 7.1.1 wants even lengths, but dcmtk (by default) and
            // dicom-object read an odd length as declared, as this walk does:
            // every parser agrees where the next element starts.
            note_odd_length(report, g, e);
        }
        // A binary value holds whole values of a fixed size (PS3.5 6.2). One
        // that does not is refused here: dicom-object reads `len / size`
        // values but counts `len` bytes, so it would lose its place in the
        // stream and read garbage as the next element's length.
        if !is_sq {
            let effective = vr.unwrap_or_else(|| implicit_vr(g, e));
            if let Some(size) = binary_value_size(effective)
                && len % size != 0
            {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: format!(
                        "value length {len} of {} ({}) is not a multiple of {size}, the size of one value",
                        tag_str(g, e),
                        String::from_utf8_lossy(&effective),
                    ),
                });
            }
        }
        if is_sq {
            depth += 1;
            report.max_depth_seen = report.max_depth_seen.max(depth);
            if depth > limits.max_depth {
                return Err(DicomError::TooDeep {
                    max: limits.max_depth,
                });
            }
            stack.push(Frame::Sequence {
                end: Some(vpos + len),
            });
            pos = vpos;
            continue;
        }
        // A plain value: it must lie inside the header bytes we hold.
        let value = view.need(vpos, len)?;
        if top_level {
            let slot = match (g, e) {
                (0x0008, 0x0016) => Some(&mut report.sop_class_uid),
                (0x0008, 0x0018) => Some(&mut report.sop_instance_uid),
                (0x0020, 0x000D) => Some(&mut report.study_instance_uid),
                (0x0020, 0x000E) => Some(&mut report.series_instance_uid),
                (0x0010, 0x0020) => Some(&mut report.patient_id),
                (0x0008, 0x0060) => Some(&mut report.modality),
                (0x0028, 0x0004) => Some(&mut report.photometric_interpretation),
                _ => None,
            };
            if let Some(slot) = slot {
                *slot = Some(clean(value));
            }
            let us = (value.len() == 2).then(|| u16_at(value, 0, be));
            match (g, e) {
                (0x0028, 0x0010) => report.rows = us,
                (0x0028, 0x0011) => report.columns = us,
                (0x0028, 0x0002) => report.samples_per_pixel = us,
                (0x0028, 0x0100) => report.bits_allocated = us,
                (0x0028, 0x0008) => report.number_of_frames = Some(clean(value)),
                _ => {}
            }
        }
        pos = vpos + len;
    }
}

/// Count an element whose value length is odd, remembering the first.
fn note_odd_length(report: &mut PrescanReport, g: u16, e: u16) {
    report.odd_length_elements += 1;
    report.first_odd_length_tag.get_or_insert((g, e));
}

/// Walk the items of top-level encapsulated Pixel Data as far as the bytes
/// we hold reach: every fragment length must fit the file, and when the
/// whole file is here, the Sequence Delimitation Item must end it.
fn walk_fragments(
    view: &Bytes<'_>,
    mut pos: u64,
    be: bool,
    limits: &PrescanLimits,
    report: &mut PrescanReport,
) -> Result<(), DicomError> {
    loop {
        if pos.saturating_add(8) > view.data.len() as u64 && pos.saturating_add(8) <= view.total {
            return Ok(()); // beyond the prefix: the rest is checked by the whole-file digest
        }
        let h = view.need(pos, 8)?;
        let (g, e, len) = (u16_at(h, 0, be), u16_at(h, 2, be), u32_at(h, 4, be));
        report.element_count += 1;
        if report.element_count > limits.max_elements {
            return Err(DicomError::TooManyElements {
                max: limits.max_elements,
            });
        }
        match (g, e) {
            (0xFFFE, 0xE000) if len != UNDEFINED => {
                let remaining = view.total.saturating_sub(pos + 8);
                if u64::from(len) > remaining {
                    return Err(overrun(g, e, pos, u64::from(len), remaining));
                }
                pos += 8 + u64::from(len);
            }
            (0xFFFE, 0xE0DD) if len == 0 => return Ok(()),
            _ => {
                return Err(DicomError::Malformed {
                    offset: pos,
                    reason: format!("{} inside encapsulated pixel data", tag_str(g, e)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ts: &str) -> Vec<u8> {
        let mut ts = ts.as_bytes().to_vec();
        if ts.len() % 2 == 1 {
            ts.push(0);
        }
        let mut body = Vec::new();
        body.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        body.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        body.extend_from_slice(&ts);
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        if long_vr(*vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(v);
    }

    fn minimal() -> Vec<u8> {
        let mut f = meta(EXPLICIT_LE);
        el(
            &mut f,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.7\0",
        );
        el(&mut f, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        el(&mut f, 0x0010, 0x0020, b"LO", b"PAT1");
        el(&mut f, 0x0020, 0x000D, b"UI", b"1.2.3\0");
        el(&mut f, 0x0020, 0x000E, b"UI", b"1.2.3.1\0");
        el(&mut f, 0x7FE0, 0x0010, b"OW", &[0u8; 16]);
        f
    }

    #[test]
    fn minimal_file_scans() {
        let f = minimal();
        let r = prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap();
        assert_eq!(r.transfer_syntax, EXPLICIT_LE);
        assert_eq!(r.sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert_eq!(r.patient_id.as_deref(), Some("PAT1"));
        assert_eq!(r.pixel_data_offset, Some(f.len() as u64 - 28));
    }

    #[test]
    fn huge_length_in_tiny_file() {
        let mut f = meta(EXPLICIT_LE);
        f.extend_from_slice(&[
            0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
        ]);
        f.extend_from_slice(&[0u8; 64]);
        let e = prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap_err();
        assert!(
            matches!(
                e,
                DicomError::LengthOverrun {
                    declared: 0xFFFF_FFF0,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn deep_nesting_is_capped_without_recursion() {
        let mut f = meta(EXPLICIT_LE);
        for _ in 0..100_000 {
            f.extend_from_slice(&[
                0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ]);
            f.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        let r = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || prescan(&f, f.len() as u64, &PrescanLimits::default()))
            .unwrap()
            .join()
            .unwrap();
        assert!(matches!(r, Err(DicomError::TooDeep { max: 32 })), "{r:?}");
    }

    #[test]
    fn prefix_too_short_is_header_too_large_and_truncation_is_truncated() {
        let f = minimal();
        let e = prescan(&f[..150], f.len() as u64, &PrescanLimits::default()).unwrap_err();
        assert!(matches!(e, DicomError::HeaderTooLarge { .. }), "{e:?}");
        let cut = &f[..f.len() - 40];
        let e = prescan(cut, cut.len() as u64, &PrescanLimits::default()).unwrap_err();
        assert!(matches!(e, DicomError::Truncated { .. }), "{e:?}");
    }

    #[test]
    fn stray_delimiters() {
        let mut f = meta(EXPLICIT_LE);
        f.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        let e = prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap_err();
        assert!(matches!(e, DicomError::StrayDelimiter { .. }), "{e:?}");
    }

    fn image(
        photometric: Option<&str>,
        samples: u16,
        bits: u16,
        frames: Option<&str>,
    ) -> PrescanReport {
        PrescanReport {
            rows: Some(16),
            columns: Some(16),
            samples_per_pixel: Some(samples),
            bits_allocated: Some(bits),
            number_of_frames: frames.map(str::to_owned),
            photometric_interpretation: photometric.map(str::to_owned),
            pixel_data_tag: Some((0x7FE0, 0x0010)),
            ..PrescanReport::default()
        }
    }

    #[test]
    fn native_pixel_bytes_follows_photometric_bits_and_frames() {
        let need = |r: PrescanReport| r.native_pixel_bytes().unwrap();
        assert_eq!(need(image(None, 1, 16, None)), Some(512));
        assert_eq!(need(image(Some("RGB"), 3, 8, Some("2"))), Some(1536));
        // 4:2:2 stores two values per pixel, 4:2:0 one and a half.
        assert_eq!(need(image(Some("YBR_FULL_422"), 3, 8, None)), Some(512));
        assert_eq!(need(image(Some("YBR_PARTIAL_422"), 3, 8, None)), Some(512));
        assert_eq!(need(image(Some("YBR_PARTIAL_420"), 3, 8, None)), Some(384));
        assert_eq!(need(image(Some("YBR_FULL"), 3, 8, None)), Some(768));
        // 1 bit: packed across frames, rounded up once.
        let mut r = image(None, 1, 1, Some("3"));
        (r.rows, r.columns) = (Some(5), Some(5));
        assert_eq!(need(r), Some(10));
        assert_eq!(need(image(None, 1, 1, None)), Some(32));
        // Float and double float: 4 and 8 bytes a sample, Bits Allocated aside.
        let mut r = image(None, 1, 16, Some("2"));
        r.pixel_data_tag = Some((0x7FE0, 0x0008));
        assert_eq!(need(r.clone()), Some(2048));
        r.pixel_data_tag = Some((0x7FE0, 0x0009));
        r.bits_allocated = None;
        assert_eq!(need(r), Some(4096));
        // Unknown without the attributes; a bad frame count is refused.
        let mut r = image(None, 1, 16, None);
        r.bits_allocated = None;
        assert_eq!(need(r), None);
        assert!(image(None, 1, 16, Some("-1")).native_pixel_bytes().is_err());
        let mut r = image(None, u16::MAX, 64, Some("4294967295"));
        (r.rows, r.columns) = (Some(u16::MAX), Some(u16::MAX));
        assert!(r.native_pixel_bytes().is_err(), "overflow is refused");
    }

    fn with_pixels(tag: u16, vr: &[u8; 2], photometric: &[u8], len: usize) -> Vec<u8> {
        let mut f = meta(EXPLICIT_LE);
        el(&mut f, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        el(&mut f, 0x0028, 0x0002, b"US", &3u16.to_le_bytes());
        el(&mut f, 0x0028, 0x0004, b"CS", photometric);
        el(&mut f, 0x0028, 0x0010, b"US", &4u16.to_le_bytes());
        el(&mut f, 0x0028, 0x0011, b"US", &4u16.to_le_bytes());
        el(&mut f, 0x0028, 0x0100, b"US", &8u16.to_le_bytes());
        el(&mut f, 0x7FE0, tag, vr, &vec![0u8; len]);
        f
    }

    #[test]
    fn pixel_data_length_is_checked_against_the_photometric_interpretation() {
        let l = PrescanLimits::default();
        // 4 x 4 YBR_FULL_422 at 8 bits: 32 bytes, and more is fine.
        for len in [32, 34, 48] {
            let f = with_pixels(0x0010, b"OB", b"YBR_FULL_422", len);
            let r = prescan(&f, f.len() as u64, &l).unwrap();
            assert_eq!(
                r.photometric_interpretation.as_deref(),
                Some("YBR_FULL_422")
            );
            assert_eq!(r.odd_length_elements, 0);
        }
        let f = with_pixels(0x0010, b"OB", b"YBR_FULL_422", 30);
        let e = prescan(&f, f.len() as u64, &l).unwrap_err();
        assert!(matches!(e, DicomError::Malformed { .. }), "{e:?}");
        // RGB needs all three samples.
        let f = with_pixels(0x0010, b"OB", b"RGB ", 32);
        assert!(prescan(&f, f.len() as u64, &l).is_err());
    }

    #[test]
    fn float_pixel_data_ends_the_header_beyond_the_prefix() {
        let l = PrescanLimits::default();
        for (tag, vr, width) in [(0x0008, b"OF", 4), (0x0009, b"OD", 8)] {
            let f = with_pixels(tag, vr, b"RGB ", 4 * 4 * 3 * width);
            let header_end = f.len() - 4 * 4 * 3 * width - 12;
            let r = prescan(&f[..header_end + 12], f.len() as u64, &l).unwrap();
            assert_eq!(r.pixel_data_tag, Some((0x7FE0, tag)));
            assert_eq!(r.header_end, header_end as u64);
            let short = with_pixels(tag, vr, b"RGB ", 4 * 4 * 3 * width - 4);
            assert!(prescan(&short, short.len() as u64, &l).is_err());
        }
        // Never encapsulated: undefined length is malformed.
        let mut f = with_pixels(0x0008, b"OF", b"RGB ", 0);
        let n = f.len();
        f[n - 4..].copy_from_slice(&[0xFF; 4]);
        let e = prescan(&f, f.len() as u64, &l).unwrap_err();
        assert!(matches!(e, DicomError::Malformed { .. }), "{e:?}");
    }

    #[test]
    fn binary_values_must_be_whole() {
        // FL of 3 bytes: dicom-object would read no float, count 3 bytes and
        // lose its place (the fuzzer's 1.4 GB allocation). Refused first.
        let mut f = meta(EXPLICIT_LE);
        el(&mut f, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        el(&mut f, 0x0008, 0x1030, b"FL", b"CHE");
        let e = prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap_err();
        assert!(
            matches!(&e, DicomError::Malformed { reason, .. } if reason.contains("(0008,1030) (FL) is not a multiple of 4")),
            "{e:?}"
        );
        // Implicit VR: the dictionary's VR (Rows is US) decides.
        let mut f = meta(IMPLICIT_LE);
        f.extend_from_slice(&[0x28, 0, 0x10, 0, 3, 0, 0, 0, 1, 2, 3]);
        let e = prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap_err();
        assert!(format!("{e:?}").contains("not a multiple of 2"), "{e:?}");
        // Whole values pass, at any depth.
        let mut f = meta(EXPLICIT_LE);
        el(&mut f, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        el(&mut f, 0x0018, 0x9087, b"FD", &[0; 16]);
        prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap();
    }

    #[test]
    fn odd_lengths_are_counted_not_refused() {
        let mut f = meta(EXPLICIT_LE);
        el(&mut f, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        el(&mut f, 0x0008, 0x1030, b"LO", b"ABC");
        el(&mut f, 0x0010, 0x0020, b"LO", b"P1");
        el(&mut f, 0x0020, 0x0011, b"IS", b"7");
        let r = prescan(&f, f.len() as u64, &PrescanLimits::default()).unwrap();
        assert_eq!(r.odd_length_elements, 2);
        assert_eq!(r.first_odd_length_tag, Some((0x0008, 0x1030)));
        assert_eq!(r.patient_id.as_deref(), Some("P1"));
        assert_eq!(r.header_end, f.len() as u64);
    }
}

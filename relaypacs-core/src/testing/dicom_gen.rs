//! DICOM test files made by our own code: valid Part-10 files of several
//! SOP classes and transfer syntaxes (checked against dcmtk in the tests),
//! standard variants that exercise PS3.3 attribute types and PS3.5 pixel
//! encodings ([`standard_variants`]: Patient ID empty or absent, YBR 4:2:2
//! and 4:2:0, 1-bit, multi-frame, float pixel data, SR, an image without
//! Pixel Data), large files written as a stream, and a hostile set.
//!
//! Files are encoded by hand from the PS3.5/PS3.10 rules rather than through
//! dicom-object, so that the hostile variants (which dicom-object cannot
//! write) and the valid ones share one small, visible encoder.

use std::io::Write;
use std::path::Path;

use rand::RngCore;

/// SOP classes the generator can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SopClass {
    /// CT Image Storage.
    Ct,
    /// MR Image Storage.
    Mr,
    /// Secondary Capture Image Storage.
    SecondaryCapture,
    /// Digital X-Ray Image Storage - For Presentation.
    DigitalXRay,
    /// Computed Radiography Image Storage.
    ComputedRadiography,
    /// Parametric Map Storage (float pixel data).
    ParametricMap,
    /// Basic Text SR Storage: no pixel module, a Content Sequence instead
    /// (the pixel fields of [`DicomSpec`] are ignored).
    BasicTextSr,
}

impl SopClass {
    /// The SOP Class UID.
    pub fn uid(self) -> &'static str {
        match self {
            Self::Ct => "1.2.840.10008.5.1.4.1.1.2",
            Self::Mr => "1.2.840.10008.5.1.4.1.1.4",
            Self::SecondaryCapture => "1.2.840.10008.5.1.4.1.1.7",
            Self::DigitalXRay => "1.2.840.10008.5.1.4.1.1.1.1",
            Self::ComputedRadiography => "1.2.840.10008.5.1.4.1.1.1",
            Self::ParametricMap => "1.2.840.10008.5.1.4.1.1.30",
            Self::BasicTextSr => "1.2.840.10008.5.1.4.1.1.88.11",
        }
    }

    fn modality(self) -> &'static str {
        match self {
            Self::Ct => "CT",
            Self::Mr => "MR",
            Self::SecondaryCapture => "OT",
            Self::DigitalXRay => "DX",
            Self::ComputedRadiography => "CR",
            Self::ParametricMap => "OT",
            Self::BasicTextSr => "SR",
        }
    }
}

/// Transfer syntaxes the generator can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferSyntax {
    /// Explicit VR Little Endian.
    ExplicitLe,
    /// Implicit VR Little Endian.
    ImplicitLe,
    /// Explicit VR Big Endian (retired, still seen).
    ExplicitBe,
    /// Deflated Explicit VR Little Endian.
    Deflated,
    /// JPEG Baseline (encapsulated pixel data; the fragment is opaque bytes).
    JpegBaseline,
}

impl TransferSyntax {
    /// The Transfer Syntax UID.
    pub fn uid(self) -> &'static str {
        match self {
            Self::ExplicitLe => "1.2.840.10008.1.2.1",
            Self::ImplicitLe => "1.2.840.10008.1.2",
            Self::ExplicitBe => "1.2.840.10008.1.2.2",
            Self::Deflated => "1.2.840.10008.1.2.1.99",
            Self::JpegBaseline => "1.2.840.10008.1.2.4.50",
        }
    }
}

/// Which pixel data element a generated image carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PixelData {
    /// (7FE0,0010) Pixel Data: native, or encapsulated for JPEG Baseline.
    #[default]
    Integer,
    /// (7FE0,0008) Float Pixel Data (OF, 32-bit floats; native syntaxes only).
    Float,
    /// (7FE0,0009) Double Float Pixel Data (OD, 64-bit; native syntaxes only).
    DoubleFloat,
    /// No pixel data element: the image attributes without their pixels.
    Absent,
}

/// What to generate. Every field added after the first nine has a default
/// that keeps the original output, so write `..DicomSpec::default()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DicomSpec {
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// SOP class.
    pub sop_class: SopClass,
    /// Transfer syntax.
    pub transfer_syntax: TransferSyntax,
    /// Patient ID.
    pub patient_id: String,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// Seed of the pixel bytes.
    pub seed: u64,
    /// (0028,0004) Photometric Interpretation; `None` writes MONOCHROME2.
    /// YBR_FULL_422 / YBR_PARTIAL_422 get two values per pixel and
    /// YBR_PARTIAL_420 one and a half, whatever Samples per Pixel says.
    pub photometric: Option<String>,
    /// (0028,0002) Samples per Pixel; `None` writes 1. Planar Configuration
    /// 0 is written when it is more than 1.
    pub samples_per_pixel: Option<u16>,
    /// (0028,0100) Bits Allocated (Bits Stored equal, High Bit one less);
    /// `None` writes 16, or 8 for JPEG Baseline. Float and double float
    /// pixel data always get 32 and 64.
    pub bits_allocated: Option<u16>,
    /// (0028,0008) Number of Frames; `None` writes no such element (one frame).
    pub frames: Option<u32>,
    /// Which pixel data element to write.
    pub pixel_data: PixelData,
    /// Write no (0010,0020) Patient ID element at all (Type 2 absent);
    /// an empty `patient_id` writes a present, empty one instead.
    pub omit_patient_id: bool,
}

impl Default for DicomSpec {
    fn default() -> Self {
        Self {
            study_uid: new_uid(),
            series_uid: new_uid(),
            sop_instance_uid: new_uid(),
            sop_class: SopClass::SecondaryCapture,
            transfer_syntax: TransferSyntax::ExplicitLe,
            patient_id: "PAT0001".into(),
            rows: 64,
            cols: 64,
            seed: 0,
            photometric: None,
            samples_per_pixel: None,
            bits_allocated: None,
            frames: None,
            pixel_data: PixelData::Integer,
            omit_patient_id: false,
        }
    }
}

/// A new random UID under the UUID root (`2.25.<128-bit decimal>`).
pub fn new_uid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    format!("2.25.{}", u128::from_be_bytes(b))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Enc {
    ExplicitLe,
    ImplicitLe,
    ExplicitBe,
}

/// Write one element header (value length `len`).
fn header(out: &mut Vec<u8>, enc: Enc, g: u16, e: u16, vr: &[u8; 2], len: u32) {
    let be = enc == Enc::ExplicitBe;
    let w16 = |out: &mut Vec<u8>, v: u16| {
        out.extend_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() })
    };
    let w32 = |out: &mut Vec<u8>, v: u32| {
        out.extend_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() })
    };
    w16(out, g);
    w16(out, e);
    match enc {
        Enc::ImplicitLe => w32(out, len),
        _ if crate::dicom::prescan::long_vr(*vr) => {
            out.extend_from_slice(vr);
            out.extend_from_slice(&[0, 0]);
            w32(out, len);
        }
        _ => {
            out.extend_from_slice(vr);
            w16(out, len as u16);
        }
    }
}

/// Write a string element, padded to even length (NUL for UI, space otherwise).
fn text(out: &mut Vec<u8>, enc: Enc, g: u16, e: u16, vr: &[u8; 2], v: &str) {
    let mut b = v.as_bytes().to_vec();
    if b.len() % 2 == 1 {
        b.push(if vr == b"UI" { 0 } else { b' ' });
    }
    header(out, enc, g, e, vr, b.len() as u32);
    out.extend_from_slice(&b);
}

fn us(out: &mut Vec<u8>, enc: Enc, g: u16, e: u16, v: u16) {
    header(out, enc, g, e, b"US", 2);
    out.extend_from_slice(&if enc == Enc::ExplicitBe {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    });
}

/// Preamble, DICM and the file meta group (explicit VR little endian).
fn meta(sop_class: &str, sop_instance: &str, ts: &str) -> Vec<u8> {
    let mut body = Vec::new();
    header(&mut body, Enc::ExplicitLe, 0x0002, 0x0001, b"OB", 2);
    body.extend_from_slice(&[0, 1]);
    text(&mut body, Enc::ExplicitLe, 0x0002, 0x0002, b"UI", sop_class);
    text(
        &mut body,
        Enc::ExplicitLe,
        0x0002,
        0x0003,
        b"UI",
        sop_instance,
    );
    text(&mut body, Enc::ExplicitLe, 0x0002, 0x0010, b"UI", ts);
    text(
        &mut body,
        Enc::ExplicitLe,
        0x0002,
        0x0012,
        b"UI",
        "2.25.271828182845904523536028747135266249",
    );
    text(
        &mut body,
        Enc::ExplicitLe,
        0x0002,
        0x0013,
        b"SH",
        "RELAYPACS_TEST",
    );
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    header(&mut out, Enc::ExplicitLe, 0x0002, 0x0000, b"UL", 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Start a sequence of undefined length.
fn seq_start(out: &mut Vec<u8>, enc: Enc, g: u16, e: u16) {
    header(out, enc, g, e, b"SQ", 0xFFFF_FFFF);
}

/// An item tag (FFFE,E000/E00D/E0DD) with its 4-byte length, no VR.
fn item_tag(out: &mut Vec<u8>, enc: Enc, e: u16, len: u32) {
    if enc == Enc::ExplicitBe {
        out.extend_from_slice(&0xFFFEu16.to_be_bytes());
        out.extend_from_slice(&e.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&0xFFFEu16.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
}

/// One item of undefined length holding `body`, in a sequence of
/// undefined length (delimiters written).
fn one_item_sequence(out: &mut Vec<u8>, enc: Enc, g: u16, e: u16, body: &[u8]) {
    seq_start(out, enc, g, e);
    item_tag(out, enc, 0xE000, 0xFFFF_FFFF);
    out.extend_from_slice(body);
    item_tag(out, enc, 0xE00D, 0);
    item_tag(out, enc, 0xE0DD, 0);
}

/// A code sequence item: Code Value, Coding Scheme Designator, Code Meaning.
fn code(enc: Enc, value: &str, scheme: &str, meaning: &str) -> Vec<u8> {
    let mut c = Vec::new();
    text(&mut c, enc, 0x0008, 0x0100, b"SH", value);
    text(&mut c, enc, 0x0008, 0x0102, b"SH", scheme);
    text(&mut c, enc, 0x0008, 0x0104, b"LO", meaning);
    c
}

/// Patient, study and series attributes shared by every kind of object.
fn patient_and_study(d: &mut Vec<u8>, spec: &DicomSpec, enc: Enc) {
    text(d, enc, 0x0010, 0x0010, b"PN", "Test^Patient");
    if !spec.omit_patient_id {
        text(d, enc, 0x0010, 0x0020, b"LO", &spec.patient_id);
    }
    text(d, enc, 0x0020, 0x000D, b"UI", &spec.study_uid);
    text(d, enc, 0x0020, 0x000E, b"UI", &spec.series_uid);
}

/// Bits Allocated for `spec` (see [`DicomSpec::bits_allocated`]).
fn bits_of(spec: &DicomSpec) -> u16 {
    match spec.pixel_data {
        PixelData::Float => 32,
        PixelData::DoubleFloat => 64,
        _ => {
            spec.bits_allocated
                .unwrap_or(if spec.transfer_syntax == TransferSyntax::JpegBaseline {
                    8
                } else {
                    16
                })
        }
    }
}

/// The data set up to (not including) Pixel Data.
fn dataset_header(spec: &DicomSpec, enc: Enc, bits: u16) -> Vec<u8> {
    let mut d = Vec::new();
    text(&mut d, enc, 0x0008, 0x0005, b"CS", "ISO_IR 100");
    text(
        &mut d,
        enc,
        0x0008,
        0x0008,
        b"CS",
        "ORIGINAL\\PRIMARY\\AXIAL",
    );
    text(&mut d, enc, 0x0008, 0x0016, b"UI", spec.sop_class.uid());
    text(&mut d, enc, 0x0008, 0x0018, b"UI", &spec.sop_instance_uid);
    text(&mut d, enc, 0x0008, 0x0020, b"DA", "20261122");
    text(
        &mut d,
        enc,
        0x0008,
        0x0060,
        b"CS",
        spec.sop_class.modality(),
    );
    patient_and_study(&mut d, spec, enc);
    text(&mut d, enc, 0x0020, 0x0013, b"IS", "1");
    let samples = spec.samples_per_pixel.unwrap_or(1);
    us(&mut d, enc, 0x0028, 0x0002, samples);
    text(
        &mut d,
        enc,
        0x0028,
        0x0004,
        b"CS",
        spec.photometric.as_deref().unwrap_or("MONOCHROME2"),
    );
    if samples > 1 {
        us(&mut d, enc, 0x0028, 0x0006, 0);
    }
    if let Some(frames) = spec.frames {
        text(&mut d, enc, 0x0028, 0x0008, b"IS", &frames.to_string());
    }
    us(&mut d, enc, 0x0028, 0x0010, spec.rows);
    us(&mut d, enc, 0x0028, 0x0011, spec.cols);
    us(&mut d, enc, 0x0028, 0x0100, bits);
    // The Floating Point Image Pixel Module has no Bits Stored, High Bit
    // or Pixel Representation.
    if !matches!(spec.pixel_data, PixelData::Float | PixelData::DoubleFloat) {
        us(&mut d, enc, 0x0028, 0x0101, bits);
        us(&mut d, enc, 0x0028, 0x0102, bits.saturating_sub(1));
        us(&mut d, enc, 0x0028, 0x0103, 0);
    }
    if spec.sop_class == SopClass::Ct {
        text(&mut d, enc, 0x0028, 0x1052, b"DS", "0");
        text(&mut d, enc, 0x0028, 0x1053, b"DS", "1");
    }
    d
}

/// A Basic Text SR document: SOP common, patient, study, series and the SR
/// document content (a CONTAINER with one TEXT item); no pixel module.
fn text_sr_dataset(spec: &DicomSpec, enc: Enc) -> Vec<u8> {
    let mut d = Vec::new();
    text(&mut d, enc, 0x0008, 0x0005, b"CS", "ISO_IR 100");
    text(&mut d, enc, 0x0008, 0x0016, b"UI", spec.sop_class.uid());
    text(&mut d, enc, 0x0008, 0x0018, b"UI", &spec.sop_instance_uid);
    text(&mut d, enc, 0x0008, 0x0020, b"DA", "20261122");
    text(&mut d, enc, 0x0008, 0x0023, b"DA", "20261122");
    text(&mut d, enc, 0x0008, 0x0033, b"TM", "120000");
    text(
        &mut d,
        enc,
        0x0008,
        0x0060,
        b"CS",
        spec.sop_class.modality(),
    );
    patient_and_study(&mut d, spec, enc);
    text(&mut d, enc, 0x0020, 0x0011, b"IS", "901");
    text(&mut d, enc, 0x0020, 0x0013, b"IS", "1");
    text(&mut d, enc, 0x0040, 0xA040, b"CS", "CONTAINER");
    one_item_sequence(
        &mut d,
        enc,
        0x0040,
        0xA043,
        &code(enc, "18748-4", "LN", "Diagnostic imaging report"),
    );
    text(&mut d, enc, 0x0040, 0xA050, b"CS", "SEPARATE");
    text(&mut d, enc, 0x0040, 0xA491, b"CS", "COMPLETE");
    text(&mut d, enc, 0x0040, 0xA493, b"CS", "UNVERIFIED");
    let mut item = Vec::new();
    text(&mut item, enc, 0x0040, 0xA010, b"CS", "CONTAINS");
    text(&mut item, enc, 0x0040, 0xA040, b"CS", "TEXT");
    one_item_sequence(
        &mut item,
        enc,
        0x0040,
        0xA043,
        &code(enc, "121071", "DCM", "Finding"),
    );
    text(&mut item, enc, 0x0040, 0xA160, b"UT", "No acute findings.");
    one_item_sequence(&mut d, enc, 0x0040, 0xA730, &item);
    d
}

/// Bytes of native pixel data the image attributes of `spec` call for
/// (before padding to an even length); the rule of
/// [`crate::dicom::PrescanReport::native_pixel_bytes`].
fn native_pixel_len(spec: &DicomSpec, bits: u16) -> usize {
    let pixels = usize::from(spec.rows) * usize::from(spec.cols);
    let frames = spec.frames.unwrap_or(1) as usize;
    let samples = usize::from(spec.samples_per_pixel.unwrap_or(1));
    let halves = match (spec.pixel_data, spec.photometric.as_deref()) {
        (PixelData::Float | PixelData::DoubleFloat, _) => pixels * samples * 2,
        (_, Some("YBR_FULL_422" | "YBR_PARTIAL_422")) => pixels * 4,
        (_, Some("YBR_PARTIAL_420")) => pixels * 3,
        _ => pixels * samples * 2,
    };
    (halves * frames * usize::from(bits)).div_ceil(16)
}

/// Generate a valid Part-10 file.
pub fn generate(spec: &DicomSpec) -> std::io::Result<Vec<u8>> {
    build(spec, 0)
}

/// Generate `spec` with native pixel data `short_by` bytes shorter than its
/// image attributes call for (rounded down to an even length): a file every
/// DICOM toolkit parses but whose pixels are incomplete.
pub fn short_pixel_data(spec: &DicomSpec, short_by: usize) -> std::io::Result<Vec<u8>> {
    if short_by == 0
        || spec.pixel_data == PixelData::Absent
        || spec.transfer_syntax == TransferSyntax::JpegBaseline
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "short_pixel_data needs native pixel data and short_by > 0",
        ));
    }
    build(spec, short_by)
}

/// Encode `spec`, its native pixel value `short_by` bytes short.
fn build(spec: &DicomSpec, short_by: usize) -> std::io::Result<Vec<u8>> {
    let ts = spec.transfer_syntax;
    let mut out = meta(spec.sop_class.uid(), &spec.sop_instance_uid, ts.uid());
    let enc = match ts {
        TransferSyntax::ImplicitLe => Enc::ImplicitLe,
        TransferSyntax::ExplicitBe => Enc::ExplicitBe,
        _ => Enc::ExplicitLe,
    };
    let d = if spec.sop_class == SopClass::BasicTextSr {
        text_sr_dataset(spec, enc)
    } else {
        let bits = bits_of(spec);
        let mut d = dataset_header(spec, enc, bits);
        match (spec.pixel_data, ts) {
            (PixelData::Absent, _) => {}
            (PixelData::Integer, TransferSyntax::JpegBaseline) => {
                let pixels = usize::from(spec.rows) * usize::from(spec.cols);
                header(&mut d, enc, 0x7FE0, 0x0010, b"OB", 0xFFFF_FFFF);
                d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]); // empty basic offset table
                let mut frag = vec![0xFF, 0xD8];
                frag.extend_from_slice(&super::pattern(spec.seed, pixels / 4 * 2));
                frag.extend_from_slice(&[0xFF, 0xD9]);
                d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
                d.extend_from_slice(&(frag.len() as u32).to_le_bytes());
                d.extend_from_slice(&frag);
                d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
            }
            (PixelData::Float | PixelData::DoubleFloat, TransferSyntax::JpegBaseline) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "float pixel data is never encapsulated",
                ));
            }
            (kind, _) => {
                let mut len = native_pixel_len(spec, bits).saturating_sub(short_by);
                if short_by > 0 {
                    len &= !1; // stay even: short, not odd
                }
                let mut px = super::pattern(spec.seed, len);
                if px.len() % 2 == 1 {
                    px.push(0); // PS3.5 7.1.1: padded to an even length
                }
                let (e, vr): (u16, &[u8; 2]) = match kind {
                    PixelData::Float => (0x0008, b"OF"),
                    PixelData::DoubleFloat => (0x0009, b"OD"),
                    _ if bits > 8 => (0x0010, b"OW"),
                    _ => (0x0010, b"OB"),
                };
                if enc == Enc::ExplicitBe && vr != b"OB" {
                    // OW, OF and OD are byte-swapped in big endian.
                    let width = usize::from(bits.min(64) / 8).max(1);
                    px.chunks_exact_mut(width).for_each(|c| c.reverse());
                }
                header(&mut d, enc, 0x7FE0, e, vr, px.len() as u32);
                d.extend_from_slice(&px);
            }
        }
        d
    };
    if ts == TransferSyntax::Deflated {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&d)?;
        let mut z = z.finish()?;
        if z.len() % 2 == 1 {
            z.push(0);
        }
        out.extend_from_slice(&z);
    } else {
        out.extend_from_slice(&d);
    }
    Ok(out)
}

/// Write a valid explicit-VR-LE file of at least `target_size` bytes to
/// `path`, streaming its pixel data in 1 MiB blocks (never held whole).
pub fn write_large_file(path: &Path, spec: &DicomSpec, target_size: u64) -> std::io::Result<()> {
    let side = ((target_size / 2) as f64).sqrt().ceil() as u64;
    let side =
        u16::try_from(side.max(1)).map_err(|_| std::io::Error::other("target size too large"))?;
    let spec = DicomSpec {
        rows: side,
        cols: side,
        transfer_syntax: TransferSyntax::ExplicitLe,
        ..spec.clone()
    };
    let mut out = meta(
        spec.sop_class.uid(),
        &spec.sop_instance_uid,
        spec.transfer_syntax.uid(),
    );
    out.extend_from_slice(&dataset_header(&spec, Enc::ExplicitLe, 16));
    let len = u64::from(side) * u64::from(side) * 2;
    let len32 = u32::try_from(len).map_err(|_| std::io::Error::other("pixel data over 4 GiB"))?;
    header(&mut out, Enc::ExplicitLe, 0x7FE0, 0x0010, b"OW", len32);
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    f.write_all(&out)?;
    let block = super::pattern(spec.seed ^ 0x5eed, 1 << 20);
    let mut left = len;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        // Vary blocks so that no two chunks of the file are identical.
        let mut b = block[..n].to_vec();
        b[..8.min(n)].copy_from_slice(&i.to_le_bytes()[..8.min(n)]);
        f.write_all(&b)?;
        left -= n as u64;
        i += 1;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

// ---- hostile files ----------------------------------------------------

fn hostile_meta(ts: &str) -> Vec<u8> {
    meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5", ts)
}

/// Sequences nested `depth` deep: undefined lengths (unterminated) or
/// defined lengths (all consistent).
pub fn nested_sequences(depth: usize, undefined: bool) -> Vec<u8> {
    let mut out = hostile_meta("1.2.840.10008.1.2.1");
    for i in 0..depth {
        if undefined {
            header(
                &mut out,
                Enc::ExplicitLe,
                0x0008,
                0x1115,
                b"SQ",
                0xFFFF_FFFF,
            );
            out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        } else {
            let level = ((depth - i) * 20) as u32;
            header(&mut out, Enc::ExplicitLe, 0x0008, 0x1115, b"SQ", level - 12);
            out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            out.extend_from_slice(&(level - 20).to_le_bytes());
        }
    }
    out
}

/// A tiny file with one element declaring `0xFFFFFFF0` bytes.
pub fn huge_declared_length() -> Vec<u8> {
    let mut out = hostile_meta("1.2.840.10008.1.2.1");
    header(
        &mut out,
        Enc::ExplicitLe,
        0x0009,
        0x1010,
        b"OB",
        0xFFFF_FFF0,
    );
    out.resize(382, 0);
    out
}

/// A Deflated file of about 0.5 MB whose data set inflates to `inflated` bytes.
pub fn deflate_bomb(inflated: u64) -> std::io::Result<Vec<u8>> {
    let mut out = hostile_meta("1.2.840.10008.1.2.1.99");
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let mut first = Vec::new();
    header(
        &mut first,
        Enc::ExplicitLe,
        0x0009,
        0x1010,
        b"OB",
        (inflated - 12).min(0xFFFF_FFF0) as u32,
    );
    enc.write_all(&first)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = inflated.saturating_sub(12);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        enc.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    let z = enc.finish()?;
    out.extend_from_slice(&z);
    Ok(out)
}

/// `n` stray Item Delimitation Items at the top level.
pub fn stray_delimiters(n: usize) -> Vec<u8> {
    let mut out = hostile_meta("1.2.840.10008.1.2.1");
    for _ in 0..n {
        out.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
    }
    out
}

/// Truncations of `valid` at a spread of offsets.
pub fn truncations(valid: &[u8]) -> Vec<Vec<u8>> {
    let n = valid.len();
    let mut at = vec![
        1,
        64,
        128,
        131,
        133,
        140,
        150,
        200,
        300,
        n / 3,
        n / 2,
        n - 2,
    ];
    at.retain(|&a| a < n);
    at.into_iter().map(|a| valid[..a].to_vec()).collect()
}

/// A valid-looking file whose image attributes call for far more pixel
/// bytes than its 128-byte Pixel Data holds.
pub fn pixel_mismatch(rows: u16, cols: u16, frames: &str) -> Vec<u8> {
    let spec = DicomSpec {
        rows,
        cols,
        ..DicomSpec::default()
    };
    let mut out = meta(
        spec.sop_class.uid(),
        &spec.sop_instance_uid,
        spec.transfer_syntax.uid(),
    );
    out.extend_from_slice(&dataset_header(&spec, Enc::ExplicitLe, 16));
    text(&mut out, Enc::ExplicitLe, 0x0028, 0x0008, b"IS", frames);
    header(&mut out, Enc::ExplicitLe, 0x7FE0, 0x0010, b"OW", 128);
    out.extend_from_slice(&[0u8; 128]);
    out
}

/// The hostile set: each entry is refused with a typed error.
pub fn hostile_set() -> Vec<(&'static str, Vec<u8>)> {
    let valid = |f: &dyn Fn(&mut DicomSpec)| {
        let mut spec = DicomSpec::default();
        f(&mut spec);
        generate(&spec).unwrap_or_default()
    };
    let mut set: Vec<(&'static str, Vec<u8>)> = vec![
        ("sq-depth-2000-undefined", nested_sequences(2_000, true)),
        ("sq-depth-2000-defined", nested_sequences(2_000, false)),
        ("sq-depth-100000-undefined", nested_sequences(100_000, true)),
        ("sq-depth-100000-defined", nested_sequences(100_000, false)),
        ("length-0xFFFFFFF0-in-382-bytes", huge_declared_length()),
        (
            "deflate-bomb-512MiB",
            deflate_bomb(512 << 20).unwrap_or_default(),
        ),
        ("stray-delimiters-200000", stray_delimiters(200_000)),
        ("no-dicm", super::pattern(11, 300)),
        ("random-bytes", super::pattern(12, 100_000)),
        (
            "uid-path-traversal",
            valid(&|s| s.sop_instance_uid = "../../etc/passwd".into()),
        ),
        // "missing-patient-id" left this set: Patient ID is Type 2, so a
        // file without it is accepted with a warning by default (it is
        // "absent-patient-id" in `standard_variants`) and refused only with
        // `DicomLimits::require_patient_id`.
    ];
    let mut gl = hostile_meta("1.2.840.10008.1.2.1");
    gl[140..144].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    set.push(("group-length-0xFFFFFFF0", gl));
    let mut odd = hostile_meta("1.2.840.10008.1.2.1");
    header(&mut odd, Enc::ExplicitLe, 0x0010, 0x0020, b"LO", 3);
    odd.extend_from_slice(b"ABC");
    set.push(("odd-length", odd));
    let mut sd = hostile_meta("1.2.840.10008.1.2.1");
    header(&mut sd, Enc::ExplicitLe, 0x0008, 0x1115, b"SQ", 0xFFFF_FFFF);
    sd.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 4, 0, 0, 0, 0, 0, 0, 0]);
    set.push(("sequence-delimiter-nonzero-length", sd));
    set.push(("unsupported-transfer-syntax", hostile_meta("1.2.3.4.5.6")));
    set.push((
        "pixel-dimensions-overflow",
        pixel_mismatch(65535, 65535, "4294967295"),
    ));
    set.push((
        "pixel-data-shorter-than-dimensions",
        pixel_mismatch(512, 512, "1"),
    ));
    for t in truncations(&valid(&|_| {})) {
        set.push(("truncated", t));
    }
    set.extend(standard_refusals());
    set
}

/// Named specs of valid files that exercise PS3.3 attribute types and
/// PS3.5 pixel encodings beyond the defaults: Patient ID empty or absent,
/// YBR 4:2:2 and 4:2:0, 1-bit bitmaps, multi-frame, float and double float
/// pixel data, a Basic Text SR (no pixel module) and a CR image without
/// Pixel Data. Small (16x16 or less) so that a mixed corpus stays cheap.
pub fn standard_variant_specs() -> Vec<(&'static str, DicomSpec)> {
    let base = || DicomSpec {
        rows: 16,
        cols: 16,
        ..DicomSpec::default()
    };
    let ybr = |p: &str, ts: TransferSyntax| DicomSpec {
        photometric: Some(p.into()),
        samples_per_pixel: Some(3),
        bits_allocated: Some(8),
        transfer_syntax: ts,
        ..base()
    };
    let sr = |ts: TransferSyntax| DicomSpec {
        sop_class: SopClass::BasicTextSr,
        transfer_syntax: ts,
        ..base()
    };
    let float = |kind: PixelData, ts: TransferSyntax| DicomSpec {
        sop_class: SopClass::ParametricMap,
        pixel_data: kind,
        transfer_syntax: ts,
        ..base()
    };
    vec![
        (
            "empty-patient-id",
            DicomSpec {
                patient_id: String::new(),
                ..base()
            },
        ),
        (
            "absent-patient-id",
            DicomSpec {
                omit_patient_id: true,
                ..base()
            },
        ),
        (
            "ybr-full-422",
            ybr("YBR_FULL_422", TransferSyntax::ExplicitLe),
        ),
        (
            "ybr-full-422-explicit-be",
            ybr("YBR_FULL_422", TransferSyntax::ExplicitBe),
        ),
        (
            "ybr-partial-422",
            ybr("YBR_PARTIAL_422", TransferSyntax::ExplicitLe),
        ),
        (
            "ybr-partial-420",
            ybr("YBR_PARTIAL_420", TransferSyntax::ExplicitLe),
        ),
        (
            // 8 x 9 bits = 9 bytes, padded to 10.
            "bitmap-1bit-odd-padded",
            DicomSpec {
                rows: 8,
                cols: 9,
                bits_allocated: Some(1),
                ..base()
            },
        ),
        (
            // 3 frames of 5 x 5 bits packed without padding between frames:
            // 75 bits = 10 bytes (frame-by-frame padding would make 12).
            "bitmap-1bit-multiframe-packed",
            DicomSpec {
                rows: 5,
                cols: 5,
                frames: Some(3),
                bits_allocated: Some(1),
                ..base()
            },
        ),
        (
            "multi-frame",
            DicomSpec {
                sop_class: SopClass::Mr,
                frames: Some(4),
                ..base()
            },
        ),
        (
            "multi-frame-rgb-implicit",
            DicomSpec {
                photometric: Some("RGB".into()),
                samples_per_pixel: Some(3),
                bits_allocated: Some(8),
                frames: Some(2),
                transfer_syntax: TransferSyntax::ImplicitLe,
                ..base()
            },
        ),
        (
            "float-pixel-data",
            float(PixelData::Float, TransferSyntax::ExplicitLe),
        ),
        (
            "float-pixel-data-deflated",
            float(PixelData::Float, TransferSyntax::Deflated),
        ),
        (
            "double-float-pixel-data",
            float(PixelData::DoubleFloat, TransferSyntax::ExplicitLe),
        ),
        (
            "double-float-pixel-data-implicit",
            float(PixelData::DoubleFloat, TransferSyntax::ImplicitLe),
        ),
        ("basic-text-sr", sr(TransferSyntax::ExplicitLe)),
        ("basic-text-sr-implicit", sr(TransferSyntax::ImplicitLe)),
        ("basic-text-sr-explicit-be", sr(TransferSyntax::ExplicitBe)),
        (
            "cr-without-pixel-data",
            DicomSpec {
                sop_class: SopClass::ComputedRadiography,
                pixel_data: PixelData::Absent,
                ..base()
            },
        ),
    ]
}

/// The files of [`standard_variant_specs`], encoded, plus
/// "odd-length-value" ([`odd_length_value`]). All valid DICOM (dcmtk reads
/// them); the validator accepts each, with a warning for
/// "absent-patient-id", "cr-without-pixel-data" and "odd-length-value".
pub fn standard_variants() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = standard_variant_specs()
        .into_iter()
        .map(|(name, spec)| (name, generate(&spec).unwrap_or_default()))
        .collect();
    let odd = odd_length_value(&DicomSpec {
        rows: 16,
        cols: 16,
        ..DicomSpec::default()
    });
    out.push(("odd-length-value", odd.unwrap_or_default()));
    out
}

/// `spec` (Explicit VR Little Endian only) with a (0008,1030) Study
/// Description of odd length 3, unpadded: against PS3.5 7.1.1, yet read by
/// dcmtk (as declared, with a warning) and by dicom-object.
pub fn odd_length_value(spec: &DicomSpec) -> std::io::Result<Vec<u8>> {
    if spec.transfer_syntax != TransferSyntax::ExplicitLe {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "odd_length_value writes Explicit VR Little Endian only",
        ));
    }
    let mut b = generate(spec)?;
    // Before (0010,0010) Patient's Name, the next tag in order.
    let at = b
        .windows(6)
        .position(|w| w == [0x10, 0x00, 0x10, 0x00, b'P', b'N'])
        .ok_or_else(|| std::io::Error::other("no Patient's Name to insert before"))?;
    let mut el = Vec::new();
    header(&mut el, Enc::ExplicitLe, 0x0008, 0x1030, b"LO", 3);
    el.extend_from_slice(b"CHE");
    b.splice(at..at, el);
    Ok(b)
}

/// Files that look like the standard variants but break a rule the
/// validator enforces, each refused: empty Type 1 UIDs, and native pixel
/// data shorter than YBR_FULL_422, a 1-bit bitmap, float pixel data or a
/// multi-frame image calls for.
pub fn standard_refusals() -> Vec<(&'static str, Vec<u8>)> {
    let base = || DicomSpec {
        rows: 16,
        cols: 16,
        ..DicomSpec::default()
    };
    let valid = |spec: DicomSpec| generate(&spec).unwrap_or_default();
    let short = |spec: DicomSpec, by: usize| short_pixel_data(&spec, by).unwrap_or_default();
    vec![
        (
            "empty-sop-instance-uid",
            valid(DicomSpec {
                sop_instance_uid: String::new(),
                ..base()
            }),
        ),
        (
            "empty-study-instance-uid",
            valid(DicomSpec {
                study_uid: String::new(),
                ..base()
            }),
        ),
        (
            "empty-series-instance-uid",
            valid(DicomSpec {
                series_uid: String::new(),
                ..base()
            }),
        ),
        (
            // 16 x 16 x 2 = 512 bytes called for, 510 present (and more
            // than the 256 a single sample per pixel would need).
            "ybr-full-422-short",
            short(
                DicomSpec {
                    photometric: Some("YBR_FULL_422".into()),
                    samples_per_pixel: Some(3),
                    bits_allocated: Some(8),
                    ..base()
                },
                2,
            ),
        ),
        (
            // 16 x 16 bits = 32 bytes called for, 30 present.
            "bitmap-1bit-short",
            short(
                DicomSpec {
                    bits_allocated: Some(1),
                    ..base()
                },
                2,
            ),
        ),
        (
            "float-pixel-data-short",
            short(
                DicomSpec {
                    sop_class: SopClass::ParametricMap,
                    pixel_data: PixelData::Float,
                    ..base()
                },
                4,
            ),
        ),
        (
            // One 16 x 16 x 16-bit frame of four missing.
            "multi-frame-short",
            short(
                DicomSpec {
                    frames: Some(4),
                    ..base()
                },
                512,
            ),
        ),
    ]
}

/// Encapsulated PDF Storage SOP Class UID (a radiologist's report).
pub const ENCAPSULATED_PDF: &str = "1.2.840.10008.5.1.4.1.1.104.1";

/// A valid Encapsulated PDF report instance (modality DOC) in a new series
/// of `study_uid`, as a reporting system would add it to the study.
/// Returns `(SOP Instance UID, Part-10 bytes)`.
pub fn pdf_report(study_uid: &str, patient_id: &str, pdf: &[u8]) -> (String, Vec<u8>) {
    let sop = new_uid();
    let enc = Enc::ExplicitLe;
    let mut out = meta(ENCAPSULATED_PDF, &sop, TransferSyntax::ExplicitLe.uid());
    let d = &mut out;
    text(d, enc, 0x0008, 0x0005, b"CS", "ISO_IR 100");
    text(d, enc, 0x0008, 0x0016, b"UI", ENCAPSULATED_PDF);
    text(d, enc, 0x0008, 0x0018, b"UI", &sop);
    text(d, enc, 0x0008, 0x0020, b"DA", "20261122");
    text(d, enc, 0x0008, 0x0023, b"DA", "20261122");
    text(d, enc, 0x0008, 0x002A, b"DT", "20261122120000");
    text(d, enc, 0x0008, 0x0060, b"CS", "DOC");
    text(d, enc, 0x0008, 0x0064, b"CS", "WSD");
    text(d, enc, 0x0010, 0x0010, b"PN", "Test^Patient");
    text(d, enc, 0x0010, 0x0020, b"LO", patient_id);
    text(d, enc, 0x0020, 0x000D, b"UI", study_uid);
    text(d, enc, 0x0020, 0x000E, b"UI", &new_uid());
    text(d, enc, 0x0020, 0x0011, b"IS", "900");
    text(d, enc, 0x0020, 0x0013, b"IS", "1");
    text(d, enc, 0x0028, 0x0301, b"CS", "NO");
    text(d, enc, 0x0042, 0x0010, b"ST", "Radiology report");
    let mut body = pdf.to_vec();
    if body.len() % 2 == 1 {
        body.push(0);
    }
    header(d, enc, 0x0042, 0x0011, b"OB", body.len() as u32);
    d.extend_from_slice(&body);
    text(d, enc, 0x0042, 0x0012, b"LO", "application/pdf");
    (sop, out)
}

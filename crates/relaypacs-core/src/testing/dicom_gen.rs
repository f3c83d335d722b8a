//! DICOM test files made by our own code: valid Part-10 files of several
//! SOP classes and transfer syntaxes (checked against dcmtk in the tests),
//! large files written as a stream, and a hostile set.
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
}

impl SopClass {
    /// The SOP Class UID.
    pub fn uid(self) -> &'static str {
        match self {
            Self::Ct => "1.2.840.10008.5.1.4.1.1.2",
            Self::Mr => "1.2.840.10008.5.1.4.1.1.4",
            Self::SecondaryCapture => "1.2.840.10008.5.1.4.1.1.7",
            Self::DigitalXRay => "1.2.840.10008.5.1.4.1.1.1.1",
        }
    }

    fn modality(self) -> &'static str {
        match self {
            Self::Ct => "CT",
            Self::Mr => "MR",
            Self::SecondaryCapture => "OT",
            Self::DigitalXRay => "DX",
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

/// What to generate.
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
    text(&mut d, enc, 0x0010, 0x0010, b"PN", "Test^Patient");
    text(&mut d, enc, 0x0010, 0x0020, b"LO", &spec.patient_id);
    text(&mut d, enc, 0x0020, 0x000D, b"UI", &spec.study_uid);
    text(&mut d, enc, 0x0020, 0x000E, b"UI", &spec.series_uid);
    text(&mut d, enc, 0x0020, 0x0013, b"IS", "1");
    us(&mut d, enc, 0x0028, 0x0002, 1);
    text(&mut d, enc, 0x0028, 0x0004, b"CS", "MONOCHROME2");
    us(&mut d, enc, 0x0028, 0x0010, spec.rows);
    us(&mut d, enc, 0x0028, 0x0011, spec.cols);
    us(&mut d, enc, 0x0028, 0x0100, bits);
    us(&mut d, enc, 0x0028, 0x0101, bits);
    us(&mut d, enc, 0x0028, 0x0102, bits - 1);
    us(&mut d, enc, 0x0028, 0x0103, 0);
    if spec.sop_class == SopClass::Ct {
        text(&mut d, enc, 0x0028, 0x1052, b"DS", "0");
        text(&mut d, enc, 0x0028, 0x1053, b"DS", "1");
    }
    d
}

/// Generate a valid Part-10 file.
pub fn generate(spec: &DicomSpec) -> std::io::Result<Vec<u8>> {
    let ts = spec.transfer_syntax;
    let mut out = meta(spec.sop_class.uid(), &spec.sop_instance_uid, ts.uid());
    let pixels = usize::from(spec.rows) * usize::from(spec.cols);
    match ts {
        TransferSyntax::ExplicitLe
        | TransferSyntax::ImplicitLe
        | TransferSyntax::ExplicitBe
        | TransferSyntax::Deflated => {
            let enc = match ts {
                TransferSyntax::ImplicitLe => Enc::ImplicitLe,
                TransferSyntax::ExplicitBe => Enc::ExplicitBe,
                _ => Enc::ExplicitLe,
            };
            let mut d = dataset_header(spec, enc, 16);
            let mut px = super::pattern(spec.seed, pixels * 2);
            if enc == Enc::ExplicitBe {
                // OW is byte-swapped in big endian.
                px.chunks_exact_mut(2).for_each(|c| c.swap(0, 1));
            }
            header(&mut d, enc, 0x7FE0, 0x0010, b"OW", px.len() as u32);
            d.extend_from_slice(&px);
            if ts == TransferSyntax::Deflated {
                let mut enc =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                enc.write_all(&d)?;
                let mut z = enc.finish()?;
                if z.len() % 2 == 1 {
                    z.push(0);
                }
                out.extend_from_slice(&z);
            } else {
                out.extend_from_slice(&d);
            }
        }
        TransferSyntax::JpegBaseline => {
            let mut d = dataset_header(spec, Enc::ExplicitLe, 8);
            header(&mut d, Enc::ExplicitLe, 0x7FE0, 0x0010, b"OB", 0xFFFF_FFFF);
            d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]); // empty basic offset table
            let mut frag = vec![0xFF, 0xD8];
            frag.extend_from_slice(&super::pattern(spec.seed, pixels / 4 * 2));
            frag.extend_from_slice(&[0xFF, 0xD9]);
            d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            d.extend_from_slice(&(frag.len() as u32).to_le_bytes());
            d.extend_from_slice(&frag);
            d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
            out.extend_from_slice(&d);
        }
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
        ("missing-patient-id", {
            let b = valid(&|s| s.patient_id = "X".into());
            // Rename (0010,0020) to a private tag (0011,0020): PatientID is gone.
            let needle = [0x10, 0x00, 0x20, 0x00, b'L', b'O'];
            let mut b2 = b.clone();
            if let Some(i) = b.windows(6).position(|w| w == needle) {
                b2[i] = 0x11;
            }
            b2
        }),
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
    set
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

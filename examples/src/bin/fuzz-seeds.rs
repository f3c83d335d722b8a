//! Write the seed corpus of every fuzz target in `fuzz/` (see
//! `fuzz/README.md`): `fuzz-seeds CORPUS_DIR` creates
//! `CORPUS_DIR/<target>/seed-<name>` for each target, in the input layout
//! that target reads. DICOM seeds come from the generators of
//! `relaypacs_core::testing::dicom_gen` (small valid files and variants,
//! their truncations, and hostile files as in its hostile set, each at
//! most 64 KiB); the others are well-formed messages
//! and a few broken ones. Existing files are overwritten, others kept.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use relaypacs_core::testing::dicom_gen::{
    DicomSpec, deflate_bomb, generate, huge_declared_length, nested_sequences, standard_refusals,
    standard_variants, stray_delimiters, truncations,
};

/// Largest seed: libFuzzer's default `-max_len` is the largest input of
/// the corpus.
const MAX_SEED: usize = 64 << 10;

fn main() -> ExitCode {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fuzz-seeds CORPUS_DIR");
        return ExitCode::from(2);
    };
    match write_all(&out) {
        Ok(n) => {
            println!("fuzz-seeds: {n} seeds under {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fuzz-seeds: {}: {e}", out.display());
            ExitCode::from(1)
        }
    }
}

/// The files the fuzzer once found, kept in the corpus so every run starts
/// from them (also regression tests in relaypacs-core's hostile_corpus).
fn with_findings(mut seeds: Seeds) -> Seeds {
    seeds.push((
        "finding-fl-length-3".into(),
        include_bytes!("../../../relaypacs-core/tests/data/fuzz-validate-fl-length-3.bin").to_vec(),
    ));
    seeds
}

/// The `content` target's findings (cut-dependent meta group judgements;
/// also unit tests of `Part10Hasher`).
fn with_content_findings(mut seeds: Seeds) -> Seeds {
    seeds.push((
        "finding-meta-past-limit".into(),
        include_bytes!("../../../relaypacs-core/tests/data/fuzz-content-meta-past-limit.bin")
            .to_vec(),
    ));
    seeds.push((
        "finding-second-group-length".into(),
        include_bytes!("../../../relaypacs-core/tests/data/fuzz-content-meta-cut.bin").to_vec(),
    ));
    seeds
}

fn write_all(out: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for (target, seeds) in [
        ("prescan", dicom()?),
        ("validate", with_findings(dicom()?)),
        ("content", with_content_findings(content()?)),
        ("tus_headers", tus_headers()),
        ("tus_metadata_roundtrip", tus_roundtrip()),
        ("wado_multipart", wado_multipart()),
        ("dimse_response", dimse()),
        ("dicom_json", dicom_json()),
        ("stow_boundary", stow_boundary()),
        ("analytics_query", analytics_query()),
        ("sr_tree", reports()?),
        ("encapsulated_pdf", reports()?),
    ] {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            if bytes.len() <= MAX_SEED {
                std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

type Seeds = Vec<(String, Vec<u8>)>;

fn named<S: Into<String>>(v: impl IntoIterator<Item = (S, Vec<u8>)>) -> Seeds {
    v.into_iter().map(|(k, b)| (k.into(), b)).collect()
}

/// Small valid files, their truncations, and the hostile set.
fn dicom() -> std::io::Result<Seeds> {
    let small = generate(&DicomSpec {
        rows: 8,
        cols: 8,
        ..DicomSpec::default()
    })?;
    let mut out = named([("valid-8x8", small.clone())]);
    out.extend(
        truncations(&small)
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("truncated-{i}"), t)),
    );
    out.extend(named(standard_variants()));
    out.extend(named([
        ("sq-depth-2000-undefined", nested_sequences(2_000, true)),
        ("sq-depth-2000-defined", nested_sequences(2_000, false)),
        ("huge-declared-length", huge_declared_length()),
        ("deflate-bomb-4MiB", deflate_bomb(4 << 20)?),
        ("stray-delimiters-1000", stray_delimiters(1_000)),
    ]));
    out.extend(
        standard_refusals()
            .into_iter()
            .enumerate()
            .map(|(i, (name, b))| (format!("refused-{i}-{name}"), b)),
    );
    Ok(out)
}

/// `content` reads a cut size, then the bytes.
fn content() -> std::io::Result<Seeds> {
    Ok(dicom()?
        .into_iter()
        .enumerate()
        .map(|(i, (name, b))| (name, [vec![(i * 37 % 251 + 1) as u8], b].concat()))
        .collect())
}

fn b64(v: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in v.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Header values (lines are repeated values of one header).
fn tus_headers() -> Seeds {
    let meta = format!(
        "filename {},session {},sha256 {},filetype {},empty",
        b64(b"image-00001.dcm"),
        b64(b"0123456789abcdef0123456789abcdef"),
        b64(&"ab".repeat(32).into_bytes()),
        b64(b"application/dicom"),
    );
    named([
        ("metadata", meta.into_bytes()),
        (
            "raw-sha256",
            format!("sha256 {}", b64(&[7; 32])).into_bytes(),
        ),
        (
            "checksum-sha1",
            format!("sha1 {}", b64(&[1; 20])).into_bytes(),
        ),
        ("length", b"1073741824".to_vec()),
        ("version", b"1.0.0".to_vec()),
        ("repeated", b"1.0.0\n1.0.0".to_vec()),
        ("bad", b"se ssion !!!,,\x7f".to_vec()),
    ])
}

/// Bytes read by `arbitrary` as pairs: any will do.
fn tus_roundtrip() -> Seeds {
    named([
        (
            "pairs",
            b"\x02\x07session\x0401234\x08filename\x05a.dcm".to_vec(),
        ),
        ("binary", (0..=255u8).collect()),
    ])
}

/// `[piece][limits][n][n bytes of Content-Type][body]`.
fn wado_multipart() -> Seeds {
    let ct = b"multipart/related; type=\"application/dicom\"; boundary=b0undary";
    let part = |content: &[u8]| {
        [
            &b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"[..],
            content,
            b"\r\n",
        ]
        .concat()
    };
    let one = [part(b"DICM-one"), b"--b0undary--\r\n".to_vec()].concat();
    let two = [
        b"preamble\r\n".to_vec(),
        part(b"one"),
        part(b"\r\n--b0undar\r"),
        b"--b0undary-- epilogue".to_vec(),
    ]
    .concat();
    let seed = |piece: u8, limits: u8, body: &[u8]| {
        [&[piece, limits, ct.len() as u8][..], ct, body].concat()
    };
    named([
        ("one-part", seed(7, 0b0011_1100, &one)),
        ("two-parts", seed(3, 0b0111_1101, &two)),
        ("torn", seed(1, 0xFF, &one[..one.len() - 4])),
        (
            "quoted-boundary",
            [
                &[5u8, 0x3D, 40][..],
                b"multipart/related; boundary=\"b0undary\"",
                &one,
            ]
            .concat(),
        ),
    ])
}

fn element(out: &mut Vec<u8>, group: u16, elem: u16, value: &[u8]) {
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// Command sets (C-STORE-RSP, C-FIND-RSP, C-GET-RSP, C-STORE-RQ) and
/// identifiers, Implicit VR Little Endian.
fn dimse() -> Seeds {
    let command = |field: u16, status: Option<u16>, extra: &[(u16, &[u8])]| {
        let mut out = Vec::new();
        element(&mut out, 0, 0x0002, b"1.2.840.10008.5.1.4.1.1.7\0");
        element(&mut out, 0, 0x0100, &field.to_le_bytes());
        element(&mut out, 0, 0x0120, &1u16.to_le_bytes());
        element(&mut out, 0, 0x0800, &0x0101u16.to_le_bytes());
        if let Some(s) = status {
            element(&mut out, 0, 0x0900, &s.to_le_bytes());
        }
        for (e, v) in extra {
            element(&mut out, 0, *e, v);
        }
        out
    };
    let mut get = command(
        0x8010,
        Some(0xFF00),
        &[
            (0x1020, &0u16.to_le_bytes()),
            (0x1021, &2u16.to_le_bytes()),
            (0x1022, &1u16.to_le_bytes()),
        ],
    );
    element(&mut get, 0x0008, 0x0058, b"1.2.345\0");
    let mut identifier = Vec::new();
    element(&mut identifier, 0x0008, 0x0052, b"IMAGE ");
    identifier.extend_from_slice(&[0x08, 0, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
    identifier.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    identifier.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
    identifier.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    element(&mut identifier, 0x0008, 0x0018, b"1.2.3.4\0");
    named([
        (
            "c-store-rsp",
            command(0x8001, Some(0x0000), &[(0x1000, b"1.2.3\0")]),
        ),
        (
            "c-store-rsp-failed",
            command(0x8001, Some(0xA700), &[(0x0902, b"out of space")]),
        ),
        ("c-find-rsp", command(0x8020, Some(0xFF00), &[])),
        ("c-get-rsp", get),
        (
            "c-store-rq",
            command(0x0001, None, &[(0x0110, &7u16.to_le_bytes())]),
        ),
        ("identifier", identifier),
    ])
}

/// STOW-RS Store Instances Responses and QIDO-RS answers.
fn dicom_json() -> Seeds {
    named([
        (
            "stow-partial",
            br#"{"00081199":{"vr":"SQ","Value":[{"00081150":{"vr":"UI","Value":["1.2.840.10008.5.1.4.1.1.7"]},"00081155":{"vr":"UI","Value":["1.2.3"]},"00081196":{"vr":"US","Value":[45056]}}]},"00081198":{"vr":"SQ","Value":[{"00081155":{"vr":"UI","Value":["1.2.4"]},"00081197":{"vr":"US","Value":[272]}}]}}"#.to_vec(),
        ),
        (
            "stow-array",
            br#"[{"00081199":{"vr":"SQ","Value":[{"00080018":{"vr":"UI","Value":["1.2.5\u0000"]}}]}}]"#.to_vec(),
        ),
        (
            "qido",
            br#"[{"00080018":{"vr":"UI","Value":["1.2.3"]},"0020000D":{"vr":"UI","Value":["1.2"]},"0020000E":{"vr":"UI","Value":["1.2.9"]}},{}]"#.to_vec(),
        ),
        ("empty", b" \r\n".to_vec()),
        ("nested", [vec![b'['; 200], vec![b']'; 200]].concat()),
    ])
}

/// `Content-Type` values.
fn stow_boundary() -> Seeds {
    named([
        (
            "stow",
            br#"multipart/related; type="application/dicom"; boundary=relaypacs-0123"#.to_vec(),
        ),
        (
            "quoted",
            br#"Multipart/Related; boundary="a \"b\" c"; type=application/dicom"#.to_vec(),
        ),
        ("mixed", b"multipart/mixed; boundary=x".to_vec()),
        ("bare", b"multipart/related".to_vec()),
    ])
}

/// Reports (`sr_tree`, `encapsulated_pdf`): a Basic Text SR and an
/// Encapsulated PDF of the generators, their truncations, and deep nesting.
fn reports() -> std::io::Result<Seeds> {
    use relaypacs_core::testing::dicom_gen::{SopClass, pdf_report};
    let sr = generate(&DicomSpec {
        sop_class: SopClass::BasicTextSr,
        ..DicomSpec::default()
    })?;
    let (_, pdf) = pdf_report("1.2.3", "P1", b"%PDF-1.4\n% seed\n%%EOF\n");
    let mut out = named([("sr", sr.clone()), ("pdf", pdf.clone())]);
    for (name, f) in [("sr", &sr), ("pdf", &pdf)] {
        out.extend(
            truncations(f)
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("{name}-truncated-{i}"), t)),
        );
    }
    out.push(("sq-depth-64".into(), nested_sequences(64, true)));
    Ok(out)
}

/// Analytics query strings (`analytics_query`): every parameter, percent
/// and `+` encoding, and the refusals (bad dates, a range too long,
/// unknown and repeated parameters).
fn analytics_query() -> Seeds {
    named([
        ("empty", b"".to_vec()),
        (
            "full",
            b"from=2026-01-01&to=2026-01-31&modality=CT&user=clinic&format=csv".to_vec(),
        ),
        ("encoded", b"user=%3D2%2B5&modality=MR&format=json".to_vec()),
        ("plus", b"user=dr+who".to_vec()),
        ("only-to", b"to=2026-02-28".to_vec()),
        ("bad-day", b"from=2026-02-30".to_vec()),
        ("too-long", b"from=2020-01-01&to=2026-01-01".to_vec()),
        ("repeated", b"user=a&user=b".to_vec()),
        ("unknown", b"sort=desc".to_vec()),
        ("bad-percent", b"user=%zz%".to_vec()),
        // The fuzzer's finding: a parameter without a name (an error that
        // named no parameter).
        (
            "finding-empty-name",
            b"from=2026-01-01&=%zz%to=2026-01mat=csv".to_vec(),
        ),
    ])
}

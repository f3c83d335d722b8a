//! FUZ-1 at the validator: about a thousand hostile files, generated here
//! in twelve classes (the named hostile set, truncation at every kind of
//! boundary, corrupted length fields, corrupted tags and VRs, random byte
//! flips of every transfer syntax, random bytes). Every one gets a typed
//! result (never a panic, never an abort), and memory stays bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use rand::{Rng, SeedableRng};
use relaypacs_core::dicom::{DicomLimits, WARNING_NO_PIXEL_DATA, validate_dicom};
use relaypacs_core::testing::dicom_gen::{DicomSpec, TransferSyntax, generate, hostile_set};
use relaypacs_core::testing::pattern;

fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_thousand_hostile_files_get_typed_results() {
    let seed: u64 = std::env::var("CORPUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let syntaxes = [
        TransferSyntax::ExplicitLe,
        TransferSyntax::ImplicitLe,
        TransferSyntax::ExplicitBe,
        TransferSyntax::Deflated,
        TransferSyntax::JpegBaseline,
    ];
    let valid: Vec<Vec<u8>> = syntaxes
        .iter()
        .map(|ts| {
            generate(&DicomSpec {
                transfer_syntax: *ts,
                rows: 16,
                cols: 16,
                ..DicomSpec::default()
            })
            .unwrap()
        })
        .collect();
    let mut corpus: Vec<(String, Vec<u8>)> = hostile_set()
        .into_iter()
        .map(|(n, b)| (n.to_owned(), b))
        .collect();
    for (k, v) in valid.iter().enumerate() {
        // Truncated at 80 places each. A cut that lands exactly on an
        // element boundary before Pixel Data of a non-image data set would
        // be well-formed DICOM; the pixel attributes (Rows) come before
        // Pixel Data, so cuts after Rows must be refused, except one exactly
        // at the end of an element between Rows and Pixel Data (all 10-byte
        // US elements here): that is a well-formed image without Pixel
        // Data, which dcmtk reads (dcmftest "yes", dcmdump -E exits 0; see
        // validation_standard.rs), so it is accepted with a warning.
        let rows_at = v
            .windows(4)
            .position(|w| w == [0x28, 0x00, 0x10, 0x00] || w == [0x00, 0x28, 0x00, 0x10])
            .unwrap_or(v.len());
        let pixel_at = v
            .windows(4)
            .position(|w| w == [0xE0, 0x7F, 0x10, 0x00] || w == [0x7F, 0xE0, 0x00, 0x10])
            .unwrap_or(v.len());
        for i in 0..80 {
            let at = 1 + (v.len() - 1) * i / 80;
            let class = if at > rows_at && at <= pixel_at && (at - rows_at) % 10 == 0 {
                "truncated-at-boundary"
            } else if at > rows_at + 10 {
                "truncated"
            } else {
                "truncated-header"
            };
            corpus.push((format!("{class}-{k}-{at}"), v[..at].to_vec()));
        }
        // 4-byte fields overwritten with huge or odd lengths at random places.
        for _ in 0..40 {
            let mut b = v.clone();
            let at = rng.random_range(132..b.len() - 4);
            let val: u32 =
                [0xFFFF_FFF0, 0xFFFF_FFFF, 0x7FFF_FFFF, 3, 0x0001_0001][rng.random_range(0..5)];
            b[at..at + 4].copy_from_slice(&val.to_le_bytes());
            corpus.push((format!("length-{k}-{at}"), b));
        }
        // Random byte flips (anywhere: some land in pixel data and are harmless).
        for _ in 0..60 {
            let mut b = v.clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..b.len());
                b[at] = rng.random();
            }
            corpus.push((format!("flip-{k}"), b));
        }
        // Delimiter or item tags inserted at element boundaries of the
        // header (found by their tags, in either byte order).
        let tags: [[u8; 4]; 8] = [
            [0x08, 0x00, 0x16, 0x00],
            [0x10, 0x00, 0x20, 0x00],
            [0x20, 0x00, 0x0D, 0x00],
            [0x28, 0x00, 0x10, 0x00],
            [0x00, 0x08, 0x00, 0x16],
            [0x00, 0x10, 0x00, 0x20],
            [0x00, 0x20, 0x00, 0x0D],
            [0x00, 0x28, 0x00, 0x10],
        ];
        let bounds: Vec<usize> = (132..v.len() - 4)
            .filter(|&i| tags.iter().any(|t| v[i..i + 4] == t[..]))
            .collect();
        for j in 0..20 {
            let Some(&at) = bounds.get(j % bounds.len().max(1)) else {
                break;
            };
            let item: [u8; 8] = match j % 3 {
                0 => [0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0],
                1 => [0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0],
                _ => [0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF],
            };
            let mut b = v[..at].to_vec();
            for _ in 0..=(j / 3) {
                b.extend_from_slice(&item);
            }
            b.extend_from_slice(&v[at..]);
            corpus.push((format!("delimiter-{k}-{at}"), b));
        }
    }
    for i in 0..50 {
        corpus.push((
            format!("random-{i}"),
            pattern(1000 + i, 500 + 97 * i as usize),
        ));
    }
    assert!(corpus.len() >= 1000, "corpus has {} files", corpus.len());
    let limits = DicomLimits::default();
    let mut refused = 0;
    let mut worst = (0u64, String::new());
    for (name, bytes) in &corpus {
        let before = peak_rss();
        let cap = bytes.len().min(limits.max_header_bytes as usize);
        // A panic here fails the test; an abort kills it: both are defects.
        match validate_dicom(&bytes[..cap], bytes.len() as u64, &limits) {
            Ok(s) if name.starts_with("truncated-at-boundary") => assert!(
                s.warnings.iter().any(|w| w == WARNING_NO_PIXEL_DATA),
                "{name} accepted without the no-Pixel-Data warning: {:?}",
                s.warnings
            ),
            Ok(_) => assert!(
                ["flip", "length", "truncated-header"]
                    .iter()
                    .any(|p| name.starts_with(p)),
                "{name} accepted"
            ),
            Err(e) => {
                refused += 1;
                assert!(e.code().starts_with("RELAY_DICOM_"), "{name}: {e}");
            }
        }
        let grew = peak_rss().saturating_sub(before);
        if grew > 100 << 20 && std::env::var_os("CORPUS_DUMP").is_some() {
            std::fs::write("/tmp/culprit.dcm", bytes).unwrap();
        }
        if grew > worst.0 {
            worst = (grew, name.clone());
        }
    }
    let peak = peak_rss();
    eprintln!(
        "{} files, {refused} refused with typed errors, peak RSS {:.1} MiB",
        corpus.len(),
        peak as f64 / 1048576.0
    );
    assert!(
        refused * 10 >= corpus.len() * 7,
        "only {refused} of {} refused",
        corpus.len()
    );
    assert!(
        peak < 256 << 20,
        "peak RSS {peak}; largest jump {} bytes at {}",
        worst.0,
        worst.1
    );
}

/// Files the fuzzer found, kept as regressions. `fl-length-3`: a Float
/// (FL) element of 3 bytes made dicom-object read no value, count 3 bytes
/// and then take pixel bytes for an element length (a 1.4 GB allocation).
#[test]
fn fuzzer_findings_are_refused_before_dicom_object() {
    let bytes = include_bytes!("data/fuzz-validate-fl-length-3.bin");
    let before = peak_rss();
    let e = validate_dicom(bytes, bytes.len() as u64, &DicomLimits::default()).unwrap_err();
    assert!(
        e.to_string().contains("not a multiple of 4"),
        "refused for the wrong reason: {e}"
    );
    assert!(peak_rss() - before < 64 << 20, "memory grew while refusing");
}

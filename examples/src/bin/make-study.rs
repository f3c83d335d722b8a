//! Write a synthetic study (valid DICOM Part 10 files of one study) to a
//! folder, for trying the gateway and for the client tests and benches.
//!
//! `make-study OUT_DIR [FILES] [BYTES_PER_FILE]` (defaults: 3 files of
//! about 1 MiB). Prints one path per line.

use std::path::PathBuf;
use std::process::ExitCode;

use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: make-study OUT_DIR [FILES] [BYTES_PER_FILE]");
        return ExitCode::from(2);
    };
    let files: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let bytes: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("make-study: {}: {e}", out.display());
        return ExitCode::from(1);
    }
    let study = new_uid();
    let series = new_uid();
    for i in 0..files {
        let spec = DicomSpec {
            study_uid: study.clone(),
            series_uid: series.clone(),
            sop_instance_uid: new_uid(),
            seed: i as u64,
            ..DicomSpec::default()
        };
        let path = out.join(format!("image-{i:05}.dcm"));
        if let Err(e) = write_large_file(&path, &spec, bytes) {
            eprintln!("make-study: {}: {e}", path.display());
            return ExitCode::from(1);
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}

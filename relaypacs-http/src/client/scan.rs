//! Finding the files to send, and checking each one locally with the
//! core's validator (the rules and default limits the server applies)
//! before a byte leaves the machine.

use std::io::Read;
use std::path::{Path, PathBuf};

use relaypacs_core::dicom::{DicomLimits, validate_dicom};
use relaypacs_core::{DicomSummary, Sha256Digest};
use sha2::{Digest, Sha256};

/// A file that passed the local check: its size, whole-file SHA-256 and
/// what identifies it.
#[derive(Clone, Debug)]
pub struct LocalFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file (declared at creation; the state file's key).
    pub sha256: Sha256Digest,
    /// The validator's summary (study, series, SOP instance, …).
    pub dicom: DicomSummary,
}

/// The outcome of the local check of one file.
#[derive(Clone, Debug)]
pub enum Checked {
    /// Valid DICOM: to be sent.
    Valid(LocalFile),
    /// Refused: never sent.
    Refused {
        /// Where it is.
        path: PathBuf,
        /// Its size, if it could be read.
        size: u64,
        /// A stable code (`RELAY_DICOM_…` as the server would answer, or
        /// `RELAY_CLIENT_UNREADABLE`).
        code: String,
        /// Why, in words (no patient data).
        reason: String,
    },
    /// Not an instance to send (a DICOMDIR): left out, not an error.
    Skipped {
        /// Where it is.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Code of a file or folder that could not be read.
pub const UNREADABLE: &str = "RELAY_CLIENT_UNREADABLE";

/// Every regular file under `paths` (folders walked recursively, symbolic
/// links inside folders not followed, each folder's entries in name
/// order), and the entries that could not be read (path and reason).
///
/// # Errors
/// The first `paths` entry that does not exist (a usage error).
#[allow(clippy::type_complexity)] // (files, unreadable entries): named at the one call site
pub fn walk(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, Vec<(PathBuf, String)>), String> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for root in paths {
        if std::fs::metadata(root).is_err() {
            return Err(format!("{}: no such file or folder", root.display()));
        }
        for entry in walkdir::WalkDir::new(root)
            .follow_links(false)
            .sort_by_file_name()
        {
            match entry {
                Ok(e) if e.file_type().is_file() => files.push(e.into_path()),
                // The root itself may be a symbolic link to a file.
                Ok(e) if e.depth() == 0 && e.path().is_file() => files.push(e.into_path()),
                Ok(_) => {}
                Err(e) => {
                    let p = e.path().map(Path::to_path_buf).unwrap_or_default();
                    errors.push((p, e.to_string()));
                }
            }
        }
    }
    Ok((files, errors))
}

/// Check one file (blocking: reads it whole to hash it). The header (its
/// first `limits.max_header_bytes`) goes through
/// [`validate_dicom`] exactly as the server validates it on completion;
/// the whole file is hashed only when it is valid.
pub fn check_file(path: &Path, limits: &DicomLimits) -> Checked {
    let unreadable = |size: u64, e: std::io::Error| Checked::Refused {
        path: path.to_path_buf(),
        size,
        code: UNREADABLE.into(),
        reason: format!("cannot read the file: {e}"),
    };
    if path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
    {
        return Checked::Skipped {
            path: path.to_path_buf(),
            reason: "a DICOMDIR (media directory) is an index, not an instance".into(),
        };
    }
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return unreadable(0, e),
    };
    let size = match f.metadata() {
        Ok(m) => m.len(),
        Err(e) => return unreadable(0, e),
    };
    // The server hands the validator at most max_header_bytes of the file.
    let cap = usize::try_from(limits.max_header_bytes.min(size)).unwrap_or(usize::MAX);
    let mut prefix = Vec::with_capacity(cap);
    if let Err(e) = (&mut f).take(cap as u64).read_to_end(&mut prefix) {
        return unreadable(size, e);
    }
    let dicom = match validate_dicom(&prefix, size, limits) {
        Ok(d) => d,
        Err(e) => {
            return Checked::Refused {
                path: path.to_path_buf(),
                size,
                code: e.code().into(),
                reason: e.to_string(),
            };
        }
    };
    let mut h = Sha256::new();
    h.update(&prefix);
    drop(prefix);
    let mut buf = vec![0u8; 1 << 20];
    let mut read = cap as u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                read += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return unreadable(size, e),
        }
    }
    if read != size {
        return unreadable(
            size,
            std::io::Error::other(format!(
                "its size changed while it was read ({size} then {read} bytes)"
            )),
        );
    }
    Checked::Valid(LocalFile {
        path: path.to_path_buf(),
        size,
        sha256: Sha256Digest(h.finalize().into()),
        dicom,
    })
}

/// A file name for the upload's metadata: the last path component, at
/// most 255 bytes, without control characters (what the server accepts).
pub fn upload_name(path: &Path) -> String {
    let name: String = path
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .filter(|c| !c.is_control())
                .collect()
        })
        .unwrap_or_default();
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let name = &name[..end];
    if name.is_empty() {
        "upload.dcm".into()
    } else {
        name.into()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upload_names_are_bounded_and_clean() {
        assert_eq!(upload_name(Path::new("/a/b/IM0001")), "IM0001");
        assert_eq!(upload_name(Path::new("/")), "upload.dcm");
        let long = "é".repeat(200);
        let n = upload_name(Path::new(&long));
        assert!(n.len() <= 255 && n.chars().all(|c| c == 'é'));
        assert_eq!(upload_name(Path::new("a\u{7}b")), "ab");
    }

    #[test]
    fn refuses_non_dicom_and_skips_dicomdir() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.txt");
        std::fs::write(&p, b"hello").unwrap();
        match check_file(&p, &DicomLimits::default()) {
            Checked::Refused { code, .. } => assert_eq!(code, "RELAY_DICOM_NOT_DICOM"),
            other => panic!("{other:?}"),
        }
        let d = dir.path().join("DICOMDIR");
        std::fs::write(&d, b"x").unwrap();
        assert!(matches!(
            check_file(&d, &DicomLimits::default()),
            Checked::Skipped { .. }
        ));
    }
}

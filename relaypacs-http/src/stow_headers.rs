//! The `Content-Type` of a STOW-RS request, parsed by a pure function: the
//! multipart boundary that `multer` then frames the body by, or a
//! [`StowContentTypeError`] (415 `RELAY_UNSUPPORTED_MEDIA_TYPE`, or 400
//! `RELAY_BAD_MULTIPART` for the boundary). Public so that the fuzz targets
//! can call it.
//!
//! ```
//! use relaypacs_http::stow_headers::{MAX_BOUNDARY_LEN, stow_boundary};
//!
//! let ct = r#"multipart/related; type="application/dicom"; boundary=b0"#;
//! assert_eq!(stow_boundary(Some(ct), MAX_BOUNDARY_LEN).unwrap(), "b0");
//! assert!(stow_boundary(Some("application/dicom"), MAX_BOUNDARY_LEN).is_err());
//! ```

use std::fmt;

use axum::http::StatusCode;

use crate::error::ApiError;

/// The longest boundary RFC 2046 §5.1.1 allows.
pub const MAX_BOUNDARY_LEN: usize = 70;

/// Why the `Content-Type` of a STOW-RS request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StowContentTypeError {
    /// No `Content-Type` (or one that is not visible ASCII).
    Missing,
    /// Not a media type.
    Unparsable,
    /// Not `multipart/related`.
    NotRelated,
    /// A `type` parameter other than `application/dicom`.
    NotDicom,
    /// The boundary is missing, empty or too long.
    Boundary {
        /// The longest boundary accepted.
        max_len: usize,
    },
}

impl StowContentTypeError {
    /// The stable error code of the answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Boundary { .. } => "RELAY_BAD_MULTIPART",
            _ => "RELAY_UNSUPPORTED_MEDIA_TYPE",
        }
    }

    /// The HTTP status of the answer: 400 for the boundary, else 415.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Boundary { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }
}

impl fmt::Display for StowContentTypeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str(
                "Content-Type multipart/related; type=\"application/dicom\" is required",
            ),
            Self::Unparsable => f.write_str("unparsable Content-Type"),
            Self::NotRelated => f.write_str("Content-Type must be multipart/related"),
            Self::NotDicom => f.write_str("only type=\"application/dicom\" is supported"),
            Self::Boundary { max_len } => write!(
                f,
                "multipart boundary missing or longer than {max_len} characters"
            ),
        }
    }
}

impl std::error::Error for StowContentTypeError {}

impl From<StowContentTypeError> for ApiError {
    fn from(e: StowContentTypeError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

/// The boundary of a STOW-RS request's `Content-Type` (`None`: absent):
/// `multipart/related`, with `type` (if given) `application/dicom`, and a
/// boundary of 1 to `max_len` bytes.
///
/// # Errors
/// [`StowContentTypeError`].
pub fn stow_boundary(
    content_type: Option<&str>,
    max_len: usize,
) -> Result<String, StowContentTypeError> {
    let ct = content_type.ok_or(StowContentTypeError::Missing)?;
    let m: mime::Mime = ct.parse().map_err(|_| StowContentTypeError::Unparsable)?;
    if m.type_() != mime::MULTIPART || m.subtype().as_str() != "related" {
        return Err(StowContentTypeError::NotRelated);
    }
    if let Some(t) = m.get_param("type")
        && !t.as_str().eq_ignore_ascii_case("application/dicom")
    {
        return Err(StowContentTypeError::NotDicom);
    }
    m.get_param(mime::BOUNDARY)
        .map(|b| b.as_str().to_string())
        .filter(|b| !b.is_empty() && b.len() <= max_len)
        .ok_or(StowContentTypeError::Boundary { max_len })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn boundaries_and_refusals() {
        let ok = |ct: &str| stow_boundary(Some(ct), MAX_BOUNDARY_LEN);
        assert_eq!(ok("multipart/related; boundary=abc").unwrap(), "abc");
        assert_eq!(
            ok("Multipart/Related; type=\"Application/DICOM\"; boundary=\"a b\"").unwrap(),
            "a b"
        );
        let b70 = "b".repeat(70);
        assert_eq!(
            ok(&format!("multipart/related; boundary={b70}")).unwrap(),
            b70
        );
        for (ct, e, status) in [
            (None, StowContentTypeError::Missing, 415),
            (Some("nonsense"), StowContentTypeError::Unparsable, 415),
            (
                Some("multipart/mixed; boundary=a"),
                StowContentTypeError::NotRelated,
                415,
            ),
            (
                Some("multipart/related; type=\"application/pdf\"; boundary=a"),
                StowContentTypeError::NotDicom,
                415,
            ),
            (
                Some("multipart/related"),
                StowContentTypeError::Boundary { max_len: 70 },
                400,
            ),
            (
                Some("multipart/related; type=\"application/dicom\""),
                StowContentTypeError::Boundary { max_len: 70 },
                400,
            ),
        ] {
            let got = stow_boundary(ct, MAX_BOUNDARY_LEN).unwrap_err();
            assert_eq!(got, e, "{ct:?}");
            assert_eq!(ApiError::from(got).status.as_u16(), status);
        }
        let long = format!("multipart/related; boundary={}", "b".repeat(71));
        assert_eq!(
            ApiError::from(stow_boundary(Some(&long), MAX_BOUNDARY_LEN).unwrap_err()).message,
            "multipart boundary missing or longer than 70 characters"
        );
        assert_eq!(
            stow_boundary(Some("multipart/related; boundary=abcd"), 3).unwrap_err(),
            StowContentTypeError::Boundary { max_len: 3 }
        );
    }
}

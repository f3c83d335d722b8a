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

/// Limits on the head of each part of a STOW-RS body (`[stow]` in the
/// configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartHeaderLimits {
    /// Most bytes of one part's header block (from the end of its
    /// delimiter line to the blank line, inclusive), of the transport
    /// padding after a delimiter, and of the preamble before the first
    /// delimiter.
    pub max_header_bytes: usize,
    /// Most header lines in one part.
    pub max_headers: usize,
}

/// Why [`PartHeaderGuard`] stopped a body.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartHeaderError {
    /// A part's header block (or the padding after its delimiter) is
    /// longer than allowed.
    HeaderTooLarge {
        /// The part, counted from 1.
        part: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A part has more header lines than allowed.
    TooManyHeaders {
        /// The part, counted from 1.
        part: usize,
        /// The limit in lines.
        max: usize,
    },
    /// No delimiter within the first `max` bytes of the body.
    PreambleTooLarge {
        /// The limit in bytes.
        max: usize,
    },
    /// A delimiter is followed by something other than transport padding
    /// and CRLF, or `--`.
    Malformed {
        /// The part, counted from 1, whose delimiter is malformed.
        part: usize,
    },
}

impl PartHeaderError {
    /// The stable error code of the answer (always 400).
    pub fn code(&self) -> &'static str {
        match self {
            Self::HeaderTooLarge { .. } => "RELAY_PART_HEADER_TOO_LARGE",
            Self::TooManyHeaders { .. } => "RELAY_PART_HEADERS_TOO_MANY",
            Self::PreambleTooLarge { .. } | Self::Malformed { .. } => "RELAY_BAD_MULTIPART",
        }
    }
}

impl fmt::Display for PartHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeaderTooLarge { part, max } => {
                write!(f, "the header block of part {part} exceeds {max} bytes")
            }
            Self::TooManyHeaders { part, max } => {
                write!(f, "part {part} has more than {max} header lines")
            }
            Self::PreambleTooLarge { max } => {
                write!(f, "no multipart delimiter within the first {max} bytes")
            }
            Self::Malformed { part } => write!(
                f,
                "the delimiter before part {part} is not followed by CRLF or \"--\""
            ),
        }
    }
}

impl std::error::Error for PartHeaderError {}

impl From<PartHeaderError> for ApiError {
    fn from(e: PartHeaderError) -> Self {
        ApiError::bad_request(e.code(), e.to_string())
    }
}

/// A streaming Knuth-Morris-Pratt matcher: each byte is examined a bounded
/// number of times (amortized), whatever the input and however it is cut.
#[derive(Clone, Debug)]
struct Matcher {
    pattern: Vec<u8>,
    /// `fail[i]`: length of the longest proper border of `pattern[..=i]`.
    fail: Vec<usize>,
    /// Bytes of `pattern` matched so far.
    state: usize,
}

impl Matcher {
    fn new(pattern: Vec<u8>) -> Self {
        let mut fail = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fail[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self {
            pattern,
            fail,
            state: 0,
        }
    }

    /// Feed one byte; `true` when it completes the pattern (the state is
    /// then reset: delimiters never overlap what follows them).
    fn step(&mut self, b: u8) -> bool {
        while self.state > 0 && self.pattern[self.state] != b {
            self.state = self.fail[self.state - 1];
        }
        if self.pattern[self.state] == b {
            self.state += 1;
        }
        if self.state == self.pattern.len() {
            self.state = 0;
            true
        } else {
            false
        }
    }
}

/// Where the guard is in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Before the first `--boundary`.
    Preamble,
    /// Just after `--boundary`: `--` closes, else padding then CRLF.
    AfterDelimiter,
    /// After a first `-`: the second one closes the body.
    CloseDash,
    /// Spaces and tabs after a delimiter.
    Padding,
    /// After the CR that ends a delimiter line.
    DelimiterLf,
    /// In a part's header block.
    Headers,
    /// In a part's content, looking for `CRLF--boundary`.
    Body,
    /// After the close delimiter: nothing more is framed.
    Epilogue,
}

/// A pure, linear-time guard over a STOW-RS body, run on the byte stream
/// before `multer` sees it, which frames it exactly as `multer` 3 does:
/// the first `--boundary` anywhere in the preamble, then `--` (close) or
/// transport padding and CRLF, then a header block that ends at the first
/// CRLF CRLF, then content up to the next `CRLF--boundary`. Each part's
/// header block is limited in bytes and lines, so `multer` (which buffers
/// a header block whole and searches it again on every read) never holds
/// more than the limit. Every byte is examined a bounded number of times
/// (a KMP automaton for the delimiter, a 4-state one for CRLF CRLF), a
/// delimiter or header end split across chunks is found all the same, and
/// the result does not depend on how the body is cut.
///
/// ```
/// use relaypacs_http::stow_headers::{PartHeaderGuard, PartHeaderLimits};
///
/// let limits = PartHeaderLimits { max_header_bytes: 64, max_headers: 4 };
/// let mut g = PartHeaderGuard::new("b0", limits);
/// g.feed(b"--b0\r\nContent-Type: application/dicom\r\n\r\nDICM").unwrap();
/// g.feed(b"\r\n--b0--\r\n").unwrap();
/// assert_eq!(g.parts(), 1);
/// assert!(g.is_closed());
///
/// let mut g = PartHeaderGuard::new("b0", limits);
/// assert!(g.feed(b"--b0\r\nX-Long: ").is_ok());
/// assert!(g.feed(&[b'a'; 100]).is_err());
/// ```
#[derive(Clone, Debug)]
pub struct PartHeaderGuard {
    limits: PartHeaderLimits,
    stage: Stage,
    /// `--boundary`, for the preamble (multer finds it anywhere there).
    first: Matcher,
    /// `CRLF--boundary`, in content.
    delimiter: Matcher,
    /// Bytes of CRLF CRLF matched in a header block (0..=3).
    blank: u8,
    /// Bytes counted against `max_header_bytes` in the current part (or
    /// the preamble).
    bytes: usize,
    /// Header lines of the current part.
    lines: usize,
    /// Parts whose header block has begun.
    parts: usize,
    /// The first refusal; every later feed repeats it.
    failed: Option<PartHeaderError>,
}

impl PartHeaderGuard {
    /// A guard for a body framed by `boundary` (as returned by
    /// [`stow_boundary`]).
    pub fn new(boundary: &str, limits: PartHeaderLimits) -> Self {
        let mut first = b"--".to_vec();
        first.extend_from_slice(boundary.as_bytes());
        let mut delimiter = b"\r\n".to_vec();
        delimiter.extend_from_slice(&first);
        Self {
            limits,
            stage: Stage::Preamble,
            first: Matcher::new(first),
            delimiter: Matcher::new(delimiter),
            blank: 0,
            bytes: 0,
            lines: 0,
            parts: 0,
            failed: None,
        }
    }

    /// Parts seen so far (whose header block has begun).
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Whether the close delimiter has been seen.
    pub fn is_closed(&self) -> bool {
        self.stage == Stage::Epilogue
    }

    /// Examine the next piece of the body.
    ///
    /// # Errors
    /// [`PartHeaderError`] once a limit is passed or a delimiter line is
    /// malformed; the guard then refuses every later piece the same way.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), PartHeaderError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.scan(chunk);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn count_byte(&mut self) -> Result<(), PartHeaderError> {
        self.bytes += 1;
        if self.bytes > self.limits.max_header_bytes {
            return Err(match self.stage {
                Stage::Preamble => PartHeaderError::PreambleTooLarge {
                    max: self.limits.max_header_bytes,
                },
                _ => PartHeaderError::HeaderTooLarge {
                    part: self.parts.max(1),
                    max: self.limits.max_header_bytes,
                },
            });
        }
        Ok(())
    }

    fn scan(&mut self, chunk: &[u8]) -> Result<(), PartHeaderError> {
        let mut i = 0;
        while i < chunk.len() {
            match self.stage {
                Stage::Body => {
                    // Fast path: outside a partial match only a CR can
                    // start a delimiter.
                    if self.delimiter.state == 0 {
                        match memchr::memchr(b'\r', &chunk[i..]) {
                            Some(p) => i += p,
                            None => return Ok(()),
                        }
                    }
                    if self.delimiter.step(chunk[i]) {
                        self.begin_delimiter();
                    }
                }
                Stage::Epilogue => return Ok(()),
                Stage::Preamble => {
                    self.count_byte()?;
                    if self.first.step(chunk[i]) {
                        self.begin_delimiter();
                    }
                }
                Stage::AfterDelimiter => {
                    self.count_byte()?;
                    self.stage = match chunk[i] {
                        b'-' => Stage::CloseDash,
                        b' ' | b'\t' => Stage::Padding,
                        b'\r' => Stage::DelimiterLf,
                        _ => return Err(self.malformed()),
                    };
                }
                Stage::CloseDash => {
                    if chunk[i] != b'-' {
                        return Err(self.malformed());
                    }
                    self.stage = Stage::Epilogue;
                    return Ok(());
                }
                Stage::Padding => {
                    self.count_byte()?;
                    match chunk[i] {
                        b' ' | b'\t' => {}
                        b'\r' => self.stage = Stage::DelimiterLf,
                        _ => return Err(self.malformed()),
                    }
                }
                Stage::DelimiterLf => {
                    if chunk[i] != b'\n' {
                        return Err(self.malformed());
                    }
                    self.stage = Stage::Headers;
                    self.parts += 1;
                    self.bytes = 0;
                    self.lines = 0;
                    self.blank = 0;
                }
                Stage::Headers => {
                    self.count_byte()?;
                    let b = chunk[i];
                    // CRLF CRLF: states 0..=3 matched, a CR restarts at 1.
                    self.blank = match (self.blank, b) {
                        (0 | 2, b'\r') => self.blank + 1,
                        (1 | 3, b'\n') => self.blank + 1,
                        (_, b'\r') => 1,
                        _ => 0,
                    };
                    if self.blank == 4 {
                        self.stage = Stage::Body;
                        self.delimiter.state = 0;
                    } else if b == b'\n' {
                        self.lines += 1;
                        if self.lines > self.limits.max_headers {
                            return Err(PartHeaderError::TooManyHeaders {
                                part: self.parts,
                                max: self.limits.max_headers,
                            });
                        }
                    }
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// A delimiter (`--boundary`) has just been read.
    fn begin_delimiter(&mut self) {
        self.stage = Stage::AfterDelimiter;
        self.bytes = 0;
    }

    fn malformed(&self) -> PartHeaderError {
        PartHeaderError::Malformed {
            part: self.parts + 1,
        }
    }
}

/// Boxed error of the guarded body stream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `stream` (a request body) passed through a [`PartHeaderGuard`]: each
/// piece is examined before it is handed on, and the first refusal is
/// handed on as the stream's error (a boxed [`PartHeaderError`], found
/// again by [`guard_refusal`]).
pub fn guard_stream<S, E>(
    stream: S,
    boundary: &str,
    limits: PartHeaderLimits,
) -> impl futures::Stream<Item = Result<bytes::Bytes, BoxError>> + Send + use<S, E>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send,
    E: Into<BoxError>,
{
    use futures::StreamExt;
    let mut guard = PartHeaderGuard::new(boundary, limits);
    stream.map(move |piece| match piece {
        Ok(b) => match guard.feed(&b) {
            Ok(()) => Ok(b),
            Err(e) => Err(Box::new(e) as BoxError),
        },
        Err(e) => Err(e.into()),
    })
}

/// The answer for a `multer` error that is a [`PartHeaderGuard`] refusal
/// (400 with its code), or `None` for any other error.
pub fn guard_refusal(e: &multer::Error) -> Option<ApiError> {
    match e {
        multer::Error::StreamReadFailed(inner) => inner
            .downcast_ref::<PartHeaderError>()
            .map(|p| ApiError::from(p.clone())),
        _ => None,
    }
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

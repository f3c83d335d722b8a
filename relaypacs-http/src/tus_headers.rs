//! The tus 1.0 request headers, parsed by pure functions: text in, typed
//! values or a [`TusHeaderError`] out, limits as arguments, no I/O and no
//! HTTP types (the `HeaderMap` helpers at the end only pick the values out
//! of a request). The routes turn an error into an answer with
//! `From<TusHeaderError> for ApiError` (400 `RELAY_BAD_HEADER`,
//! `RELAY_BAD_METADATA`, `RELAY_BAD_CHECKSUM`, or 412 `RELAY_TUS_VERSION`).
//! Public so that the fuzz targets can call them.
//!
//! ```
//! use relaypacs_http::tus_headers::{MetadataLimits, encode_metadata, parse_metadata};
//!
//! let header = encode_metadata([("session", &b"0123"[..]), ("filename", b"a.dcm")]);
//! let meta = parse_metadata(&header, &MetadataLimits::default()).unwrap();
//! assert_eq!(meta.filename.as_deref(), Some("a.dcm"));
//! ```

use std::collections::HashSet;
use std::fmt;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use relaypacs_core::Sha256Digest;

use crate::error::ApiError;

/// The protocol version we speak.
pub const TUS_VERSION: &str = "1.0.0";

/// Why a tus request header was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TusHeaderError {
    /// The header was given more than once.
    Repeated {
        /// The header's name.
        name: &'static str,
    },
    /// The value holds bytes other than visible ASCII, space and tab.
    NotVisibleAscii {
        /// The header's name.
        name: &'static str,
    },
    /// The value is not a non-negative decimal integer (digits only).
    NotAnInteger {
        /// The header's name.
        name: &'static str,
    },
    /// The value does not fit in 64 bits.
    OutOfRange {
        /// The header's name.
        name: &'static str,
    },
    /// `Tus-Resumable` is missing or names another version.
    Version,
    /// `Upload-Metadata` is malformed.
    Metadata(MetadataError),
    /// `Upload-Checksum` is malformed.
    Checksum(ChecksumError),
}

impl TusHeaderError {
    /// The stable error code of the answer.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Repeated { .. }
            | Self::NotVisibleAscii { .. }
            | Self::NotAnInteger { .. }
            | Self::OutOfRange { .. } => "RELAY_BAD_HEADER",
            Self::Version => "RELAY_TUS_VERSION",
            Self::Metadata(_) => "RELAY_BAD_METADATA",
            Self::Checksum(_) => "RELAY_BAD_CHECKSUM",
        }
    }

    /// The HTTP status of the answer: 412 for the version, else 400.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Version => StatusCode::PRECONDITION_FAILED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl fmt::Display for TusHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Repeated { name } => write!(f, "{name} given more than once"),
            Self::NotVisibleAscii { name } => write!(f, "{name} is not visible ASCII"),
            Self::NotAnInteger { name } => write!(f, "{name} must be a non-negative integer"),
            Self::OutOfRange { name } => write!(f, "{name} is out of range"),
            Self::Version => write!(f, "Tus-Resumable: {TUS_VERSION} is required"),
            Self::Metadata(e) => write!(f, "Upload-Metadata: {e}"),
            Self::Checksum(e) => write!(f, "Upload-Checksum: {e}"),
        }
    }
}

impl std::error::Error for TusHeaderError {}

impl From<TusHeaderError> for ApiError {
    fn from(e: TusHeaderError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

/// Why `Upload-Metadata` was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetadataError {
    /// A key is empty, too long or not visible ASCII.
    BadKey {
        /// [`MetadataLimits::max_key_len`].
        max_len: usize,
    },
    /// A key appears twice.
    RepeatedKey,
    /// More pairs than [`MetadataLimits::max_pairs`].
    TooManyPairs {
        /// The limit.
        limit: usize,
    },
    /// A value is not base64.
    NotBase64 {
        /// The key.
        key: String,
    },
    /// The value of a text key (`filename`, `session`, `sha256`) is not
    /// UTF-8.
    NotUtf8 {
        /// The key.
        key: String,
    },
}

impl fmt::Display for MetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey { max_len } => {
                write!(f, "keys must be 1-{max_len} visible ASCII characters")
            }
            Self::RepeatedKey => f.write_str("a key appears twice"),
            Self::TooManyPairs { limit } => write!(f, "more than {limit} pairs"),
            Self::NotBase64 { key } => write!(f, "the value of {key:?} is not base64"),
            Self::NotUtf8 { key } => write!(f, "the value of {key:?} is not UTF-8"),
        }
    }
}

/// Why `Upload-Checksum` was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChecksumError {
    /// Not `<algorithm> <base64>`.
    Syntax,
    /// The checksum is not base64.
    NotBase64,
    /// The checksum has the wrong length for its algorithm.
    Length {
        /// The algorithm.
        algorithm: &'static str,
        /// The bytes it has.
        expected: usize,
    },
    /// Neither `sha256` nor `sha1`.
    Algorithm,
}

impl fmt::Display for ChecksumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax => f.write_str("expected '<algorithm> <base64>'"),
            Self::NotBase64 => f.write_str("the checksum is not base64"),
            Self::Length {
                algorithm,
                expected,
            } => write!(f, "a {algorithm} checksum has {expected} bytes"),
            Self::Algorithm => f.write_str("unsupported algorithm (sha256, sha1)"),
        }
    }
}

/// The one value of a header from all the values a request gave it, as
/// text: `None` if absent; refused if given twice or not visible ASCII
/// (bytes 0x20-0x7E and tab, as `HeaderValue::to_str` accepts).
///
/// # Errors
/// [`TusHeaderError::Repeated`], [`TusHeaderError::NotVisibleAscii`].
pub fn single_value<'a>(
    name: &'static str,
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<&'a str>, TusHeaderError> {
    let mut all = values.into_iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(TusHeaderError::Repeated { name });
    }
    if !v.iter().all(|&b| b == b'\t' || (0x20..0x7F).contains(&b)) {
        return Err(TusHeaderError::NotVisibleAscii { name });
    }
    std::str::from_utf8(v)
        .map(Some)
        .map_err(|_| TusHeaderError::NotVisibleAscii { name })
}

/// A non-negative decimal header value (digits only, no sign or spaces,
/// at most 19 digits).
///
/// # Errors
/// [`TusHeaderError::NotAnInteger`], [`TusHeaderError::OutOfRange`].
pub fn parse_u64(name: &'static str, v: &str) -> Result<u64, TusHeaderError> {
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TusHeaderError::NotAnInteger { name });
    }
    v.parse().map_err(|_| TusHeaderError::OutOfRange { name })
}

/// `Tus-Resumable` must name [`TUS_VERSION`].
///
/// # Errors
/// [`TusHeaderError::Version`].
pub fn check_version(value: Option<&str>) -> Result<(), TusHeaderError> {
    match value {
        Some(TUS_VERSION) => Ok(()),
        _ => Err(TusHeaderError::Version),
    }
}

/// Limits on `Upload-Metadata`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataLimits {
    /// Longest key, in bytes.
    pub max_key_len: usize,
    /// Most pairs (empty ones between commas not counted).
    pub max_pairs: usize,
}

impl Default for MetadataLimits {
    /// Keys of at most 64 bytes; at most 8,192 pairs (what a 16 KiB
    /// header can hold).
    fn default() -> Self {
        Self {
            max_key_len: 64,
            max_pairs: 8 << 10,
        }
    }
}

impl MetadataLimits {
    /// The default key length, and as many pairs as a header of
    /// `header_bytes` can hold (each takes at least two bytes): the limit
    /// never refuses what the request head limit let through.
    pub fn within_header_bytes(header_bytes: usize) -> Self {
        Self {
            max_pairs: header_bytes / 2 + 1,
            ..Self::default()
        }
    }
}

/// The pairs of an `Upload-Metadata` value, in order: `key base64,…`
/// (a key alone has the empty value). Empty pairs are skipped; keys are
/// 1 to `max_key_len` visible ASCII characters and appear once.
#[derive(Debug)]
pub struct MetadataPairs<'a> {
    pairs: std::str::Split<'a, char>,
    seen: HashSet<&'a str>,
    limits: MetadataLimits,
    failed: bool,
}

impl<'a> Iterator for MetadataPairs<'a> {
    type Item = Result<(&'a str, Vec<u8>), MetadataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.step()?;
        self.failed = r.is_err();
        Some(r)
    }
}

impl<'a> MetadataPairs<'a> {
    fn step(&mut self) -> Option<Result<(&'a str, Vec<u8>), MetadataError>> {
        let pair = loop {
            let pair = self.pairs.next()?.trim();
            if !pair.is_empty() {
                break pair;
            }
        };
        let (key, value) = match pair.split_once(' ') {
            Some((k, v)) => (k, v.trim()),
            None => (pair, ""),
        };
        if key.is_empty()
            || key.len() > self.limits.max_key_len
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Some(Err(MetadataError::BadKey {
                max_len: self.limits.max_key_len,
            }));
        }
        if self.seen.len() >= self.limits.max_pairs {
            return Some(Err(MetadataError::TooManyPairs {
                limit: self.limits.max_pairs,
            }));
        }
        if !self.seen.insert(key) {
            return Some(Err(MetadataError::RepeatedKey));
        }
        Some(
            STANDARD
                .decode(value)
                .map(|v| (key, v))
                .map_err(|_| MetadataError::NotBase64 {
                    key: key.to_owned(),
                }),
        )
    }
}

/// The pairs of `value` (an `Upload-Metadata` header), checked one by one
/// as they are read (see [`MetadataPairs`]).
pub fn metadata_pairs<'a>(value: &'a str, limits: &MetadataLimits) -> MetadataPairs<'a> {
    MetadataPairs {
        pairs: value.split(','),
        seen: HashSet::new(),
        limits: *limits,
        failed: false,
    }
}

/// `Upload-Metadata` from pairs: `key base64` joined by commas (a pair
/// with an empty value is the key alone). The inverse of
/// [`metadata_pairs`] for keys it accepts (visible ASCII without a
/// comma, each once).
pub fn encode_metadata<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.to_owned()
            } else {
                format!("{k} {}", STANDARD.encode(v))
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What the gateway reads from `Upload-Metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metadata {
    /// `filename` (or `name`).
    pub filename: Option<String>,
    /// `session` (or `study_session`): the study session id.
    pub session: Option<String>,
    /// `sha256` (or `checksum_sha256`): 64 hex digits as given, or the raw
    /// 32 bytes turned into hex.
    pub sha256: Option<String>,
}

/// Parse `Upload-Metadata`: the keys the gateway uses, checked; other keys
/// (filetype, relativePath, …) are checked as pairs and ignored.
///
/// # Errors
/// [`TusHeaderError::Metadata`] for the first pair that breaks a rule.
pub fn parse_metadata(value: &str, limits: &MetadataLimits) -> Result<Metadata, TusHeaderError> {
    let mut out = Metadata::default();
    for pair in metadata_pairs(value, limits) {
        let (key, decoded) = pair.map_err(TusHeaderError::Metadata)?;
        let text = |decoded: Vec<u8>| {
            String::from_utf8(decoded).map_err(|_| {
                TusHeaderError::Metadata(MetadataError::NotUtf8 {
                    key: key.to_owned(),
                })
            })
        };
        match key {
            "filename" | "name" => out.filename = Some(text(decoded)?),
            "session" | "study_session" => out.session = Some(text(decoded)?),
            "sha256" | "checksum_sha256" => {
                // Hex (64 digits) or the raw 32 bytes.
                out.sha256 = Some(if decoded.len() == 32 {
                    hex::encode(&decoded)
                } else {
                    text(decoded)?
                })
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A checksum declared with `Upload-Checksum`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// `sha256 <base64 of 32 bytes>`.
    Sha256(Sha256Digest),
    /// `sha1 <base64 of 20 bytes>`.
    Sha1([u8; 20]),
}

/// Parse `Upload-Checksum`: `<algorithm> <base64>`, `sha256` or `sha1`.
///
/// # Errors
/// [`TusHeaderError::Checksum`].
pub fn parse_checksum(v: &str) -> Result<Checksum, TusHeaderError> {
    let bad = TusHeaderError::Checksum;
    let (alg, b64) = v.trim().split_once(' ').ok_or(bad(ChecksumError::Syntax))?;
    let raw = STANDARD
        .decode(b64.trim())
        .map_err(|_| bad(ChecksumError::NotBase64))?;
    match alg {
        "sha256" => {
            let a: [u8; 32] = raw.try_into().map_err(|_| {
                bad(ChecksumError::Length {
                    algorithm: "sha256",
                    expected: 32,
                })
            })?;
            Ok(Checksum::Sha256(Sha256Digest(a)))
        }
        "sha1" => {
            let a: [u8; 20] = raw.try_into().map_err(|_| {
                bad(ChecksumError::Length {
                    algorithm: "sha1",
                    expected: 20,
                })
            })?;
            Ok(Checksum::Sha1(a))
        }
        _ => Err(bad(ChecksumError::Algorithm)),
    }
}

/// The value of header `name` in `h` ([`single_value`]).
///
/// # Errors
/// As [`single_value`].
pub fn header_str<'a>(
    h: &'a HeaderMap,
    name: &'static str,
) -> Result<Option<&'a str>, TusHeaderError> {
    single_value(name, h.get_all(name).iter().map(|v| v.as_bytes()))
}

/// The value of header `name` in `h` as a number ([`parse_u64`]).
///
/// # Errors
/// As [`single_value`] and [`parse_u64`].
pub fn header_u64(h: &HeaderMap, name: &'static str) -> Result<Option<u64>, TusHeaderError> {
    header_str(h, name)?.map(|v| parse_u64(name, v)).transpose()
}

/// `Tus-Resumable` of `h` ([`check_version`]).
///
/// # Errors
/// As [`single_value`] and [`check_version`].
pub fn check_resumable(h: &HeaderMap) -> Result<(), TusHeaderError> {
    check_version(header_str(h, "tus-resumable")?)
}

/// `Upload-Metadata` of `h` ([`parse_metadata`]); none is empty metadata.
///
/// # Errors
/// As [`single_value`] and [`parse_metadata`].
pub fn metadata(h: &HeaderMap, limits: &MetadataLimits) -> Result<Metadata, TusHeaderError> {
    match header_str(h, "upload-metadata")? {
        Some(v) => parse_metadata(v, limits),
        None => Ok(Metadata::default()),
    }
}

/// `Upload-Checksum` of `h` ([`parse_checksum`]), if given.
///
/// # Errors
/// As [`single_value`] and [`parse_checksum`].
pub fn checksum(h: &HeaderMap) -> Result<Option<Checksum>, TusHeaderError> {
    header_str(h, "upload-checksum")?
        .map(parse_checksum)
        .transpose()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn meta(v: &str) -> Result<Metadata, TusHeaderError> {
        parse_metadata(v, &MetadataLimits::default())
    }

    #[test]
    fn metadata_keys_values_and_aliases() {
        let m = meta(" filename YS5kY20= , ,session MTIz,filetype,sha256 YWJj").unwrap();
        assert_eq!(m.filename.as_deref(), Some("a.dcm"));
        assert_eq!(m.session.as_deref(), Some("123"));
        assert_eq!(m.sha256.as_deref(), Some("abc"));
        let raw = STANDARD.encode([7u8; 32]);
        let m = meta(&format!(
            "name eA==,study_session eQ==,checksum_sha256 {raw}"
        ))
        .unwrap();
        assert_eq!(m.filename.as_deref(), Some("x"));
        assert_eq!(m.session.as_deref(), Some("y"));
        assert_eq!(m.sha256, Some("07".repeat(32)));
        assert_eq!(meta("").unwrap(), Metadata::default());
        assert_eq!(meta(",,,").unwrap(), Metadata::default());
    }

    #[test]
    fn metadata_errors_say_what_and_map_to_400() {
        let cases = [
            (
                format!("{} eA==", "k".repeat(65)),
                "Upload-Metadata: keys must be 1-64 visible ASCII characters",
            ),
            (
                "a eA==,a eA==".into(),
                "Upload-Metadata: a key appears twice",
            ),
            (
                "session !!!".into(),
                "Upload-Metadata: the value of \"session\" is not base64",
            ),
            (
                format!("filename {}", STANDARD.encode([0xff, 0xfe])),
                "Upload-Metadata: the value of \"filename\" is not UTF-8",
            ),
            (
                "se ssion eA==".into(),
                "Upload-Metadata: the value of \"se\" is not base64",
            ),
        ];
        for (v, msg) in cases {
            let e = meta(&v).unwrap_err();
            assert_eq!(e.to_string(), msg, "{v}");
            let api = ApiError::from(e);
            assert_eq!(api.status, StatusCode::BAD_REQUEST);
            assert_eq!(api.code, "RELAY_BAD_METADATA");
        }
        // Binary values of other keys are fine.
        let v = format!("other {}", STANDARD.encode([0xff]));
        assert!(meta(&v).is_ok());
    }

    #[test]
    fn the_pair_limit_is_an_argument() {
        let limits = MetadataLimits {
            max_key_len: 64,
            max_pairs: 2,
        };
        assert!(parse_metadata("a,b", &limits).is_ok());
        assert_eq!(
            parse_metadata("a,b,c", &limits).unwrap_err(),
            TusHeaderError::Metadata(MetadataError::TooManyPairs { limit: 2 })
        );
        // Never below what a header of that size can hold: single-byte
        // keys and commas.
        let v: String = (b'!'..=b'~')
            .filter(|&c| c != b',')
            .map(char::from)
            .map(String::from)
            .collect::<Vec<_>>()
            .join(",");
        assert!(parse_metadata(&v, &MetadataLimits::within_header_bytes(v.len())).is_ok());
    }

    #[test]
    fn metadata_round_trips() {
        let pairs: [(&str, &[u8]); 4] = [
            ("session", b"0123456789abcdef"),
            ("empty", b""),
            ("bin", &[0, 255, 10]),
            ("filename", "é.dcm".as_bytes()),
        ];
        let header = encode_metadata(pairs);
        let back: Vec<(&str, Vec<u8>)> = metadata_pairs(&header, &MetadataLimits::default())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back.len(), pairs.len());
        for ((k, v), (k2, v2)) in pairs.iter().zip(&back) {
            assert_eq!((k, *v), (k2, v2.as_slice()));
        }
    }

    #[test]
    fn numbers_values_versions_checksums() {
        assert_eq!(parse_u64("upload-length", "0"), Ok(0));
        assert_eq!(
            parse_u64("x", "18446744073709551615"),
            Err(TusHeaderError::NotAnInteger { name: "x" })
        );
        // 19 digits always fit in 64 bits.
        assert_eq!(
            parse_u64("x", "9999999999999999999"),
            Ok(9_999_999_999_999_999_999)
        );
        for bad in ["", "-1", "+1", " 1", "1 ", "0x1", "١"] {
            assert_eq!(
                parse_u64("x", bad),
                Err(TusHeaderError::NotAnInteger { name: "x" })
            );
        }
        assert_eq!(
            ApiError::from(TusHeaderError::OutOfRange {
                name: "upload-offset"
            })
            .message,
            "upload-offset is out of range"
        );
        assert_eq!(single_value("x", []), Ok(None));
        assert_eq!(single_value("x", [&b"a\tb"[..]]), Ok(Some("a\tb")));
        assert_eq!(
            single_value("x", [&b"a"[..], b"a"]),
            Err(TusHeaderError::Repeated { name: "x" })
        );
        assert_eq!(
            single_value("x", [&b"\xc3\xa9"[..]]),
            Err(TusHeaderError::NotVisibleAscii { name: "x" })
        );
        assert_eq!(check_version(Some("1.0.0")), Ok(()));
        let e = check_version(Some("0.2.2")).unwrap_err();
        assert_eq!(e.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(e.code(), "RELAY_TUS_VERSION");
        assert_eq!(e.to_string(), "Tus-Resumable: 1.0.0 is required");
        assert_eq!(check_version(None), Err(TusHeaderError::Version));

        let sha1 = STANDARD.encode([1u8; 20]);
        assert_eq!(
            parse_checksum(&format!(" sha1 {sha1} ")),
            Ok(Checksum::Sha1([1; 20]))
        );
        let sha256 = STANDARD.encode([2u8; 32]);
        assert_eq!(
            parse_checksum(&format!("sha256 {sha256}")),
            Ok(Checksum::Sha256(Sha256Digest([2; 32])))
        );
        for (v, msg) in [
            ("sha256", "expected '<algorithm> <base64>'"),
            ("sha256 !!", "the checksum is not base64"),
            ("sha256 AAAA", "a sha256 checksum has 32 bytes"),
            ("sha1 AAAA", "a sha1 checksum has 20 bytes"),
            ("md5 AAAA", "unsupported algorithm (sha256, sha1)"),
        ] {
            let e = parse_checksum(v).unwrap_err();
            assert_eq!(e.to_string(), format!("Upload-Checksum: {msg}"));
            assert_eq!(e.code(), "RELAY_BAD_CHECKSUM");
        }
    }
}

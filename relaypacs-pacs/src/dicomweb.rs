//! What the DICOMweb adapters share: configuration, an HTTP client with
//! the PACS's credentials, QIDO-RS paging and the classification of HTTP
//! failures into transient (retry) and permanent (dead letter).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use relaypacs_core::{Error, Result, Uid};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// How the gateway authenticates to the PACS.
#[derive(Clone, Default)]
pub enum DicomWebAuth {
    /// No credentials.
    #[default]
    None,
    /// HTTP basic authentication.
    Basic {
        /// User name.
        user: String,
        /// Password (never logged).
        password: SecretString,
    },
    /// An OAuth bearer token (never logged).
    Bearer {
        /// The token.
        token: SecretString,
    },
}

impl fmt::Debug for DicomWebAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Basic { user, .. } => write!(f, "Basic({user}, [redacted])"),
            Self::Bearer { .. } => f.write_str("Bearer([redacted])"),
        }
    }
}

/// Where and how to reach a DICOMweb PACS.
#[derive(Clone, Debug)]
pub struct DicomWebConfig {
    /// The DICOMweb root, e.g. `https://pacs.example/dicom-web` (no
    /// trailing slash needed).
    pub base_url: String,
    /// Credentials.
    pub auth: DicomWebAuth,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout (a STOW-RS batch must fit in it).
    pub request_timeout: Duration,
    /// Extra PEM root certificates to trust (a hospital CA), in addition
    /// to the system roots (so a PACS moving to a publicly trusted
    /// certificate keeps working). Without it only the system roots are
    /// trusted. Certificates and host names are always validated; a PACS
    /// whose certificate is not trusted is refused with a permanent error
    /// naming TLS.
    pub ca_file: Option<PathBuf>,
    /// Most bytes of instances in one STOW-RS request.
    pub batch_bytes: u64,
    /// Most instances in one STOW-RS request.
    pub batch_instances: usize,
    /// How delivery is proven: retrieve and compare content (WADO-RS,
    /// the default) or only find the UID (QIDO-RS).
    pub verify: relaypacs_core::VerifyMode,
}

impl DicomWebConfig {
    /// Defaults for `base_url`: 10 s connect, 10 min per request, batches of
    /// at most 32 MiB or 64 instances.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            auth: DicomWebAuth::None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            ca_file: None,
            batch_bytes: 32 << 20,
            batch_instances: 64,
            verify: relaypacs_core::VerifyMode::Content,
        }
    }
}

/// An HTTP client bound to one DICOMweb root and its credentials.
#[derive(Clone, Debug)]
pub(crate) struct DicomWebClient {
    http: reqwest::Client,
    base: reqwest::Url,
    auth: DicomWebAuth,
}

impl DicomWebClient {
    /// Build the client; refuses a base URL that is not http(s).
    pub(crate) fn new(config: &DicomWebConfig) -> Result<Self> {
        Self::build(config, true)
    }

    /// A client like [`new`](Self::new) that keeps no idle connection,
    /// for requests run on a runtime of their own: a connection is driven
    /// by a task of the runtime that opened it and must not be handed to a
    /// request after that runtime is gone.
    pub(crate) fn new_unpooled(config: &DicomWebConfig) -> Result<Self> {
        Self::build(config, false)
    }

    fn build(config: &DicomWebConfig, pooled: bool) -> Result<Self> {
        let mut base = reqwest::Url::parse(config.base_url.trim_end_matches('/')).map_err(|e| {
            Error::invalid(
                "RELAY_PACS_URL",
                format!("DICOMweb base URL {:?}: {e}", config.base_url),
            )
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Error::invalid(
                "RELAY_PACS_URL",
                format!("DICOMweb base URL {:?} is not http(s)", config.base_url),
            ));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // A PACS answering with a redirect is misconfigured; following it
            // could send PHI and credentials elsewhere (ASVS 15.3.2).
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .user_agent(concat!("relaypacs/", env!("CARGO_PKG_VERSION")));
        if !pooled {
            b = b.pool_max_idle_per_host(0);
        }
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| Error::io("read PACS CA file", e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::invalid(
                    "RELAY_PACS_CA",
                    format!("PACS CA file {}: {e}", path.display()),
                )
            })?;
            if certs.is_empty() {
                return Err(Error::invalid(
                    "RELAY_PACS_CA",
                    format!("PACS CA file {} holds no certificate", path.display()),
                ));
            }
            // Merged with the system roots (see `DicomWebConfig::ca_file`).
            b = b.tls_certs_merge(certs);
        }
        let http = b.build().map_err(|e| {
            Error::invalid(
                "RELAY_PACS_CLIENT",
                format!("HTTP client for the PACS: {e}"),
            )
        })?;
        Ok(Self {
            http,
            base,
            auth: config.auth.clone(),
        })
    }

    /// The root URL (for display; carries no credentials).
    pub(crate) fn base(&self) -> &reqwest::Url {
        &self.base
    }

    /// A request to `path` (relative to the root) with credentials.
    pub(crate) fn request(&self, method: Method, path: &str) -> Result<RequestBuilder> {
        let url = self.base.join(path).map_err(|e| {
            Error::invalid("RELAY_PACS_URL", format!("DICOMweb path {path:?}: {e}"))
        })?;
        let rb = self.http.request(method, url);
        Ok(match &self.auth {
            DicomWebAuth::None => rb,
            DicomWebAuth::Basic { user, password } => {
                rb.basic_auth(user, Some(password.expose_secret()))
            }
            DicomWebAuth::Bearer { token } => rb.bearer_auth(token.expose_secret()),
        })
    }

    /// Every instance-level QIDO-RS match in `study`, paged 1,000 at a time.
    /// An unknown study is an empty list.
    pub(crate) async fn study_instances(&self, study: &Uid, fields: &[&str]) -> Result<Vec<Value>> {
        self.qido_instances(&format!("studies/{study}/instances"), &[], fields)
            .await
    }

    /// Every instance, in any study, whose SOP Instance UID is one of
    /// `sops`: QIDO-RS `GET instances?00080018=<uid>,<uid>,…` (UID list
    /// matching, PS3.18 §8.3.4.1), [`UID_LIST_CHUNK`] UIDs per request so
    /// the URL stays short (Orthanc refuses requests over 16 KiB).
    pub(crate) async fn instances_with_uids(
        &self,
        sops: &[&Uid],
        fields: &[&str],
    ) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for chunk in sops.chunks(UID_LIST_CHUNK) {
            let list = chunk
                .iter()
                .map(|u| u.as_str())
                .collect::<Vec<_>>()
                .join(",");
            out.extend(
                self.qido_instances("instances", &[("00080018", list)], fields)
                    .await?,
            );
        }
        Ok(out)
    }

    /// Instance-level QIDO-RS at `path` with `filters`, paged 1,000 at a
    /// time. A 404 or 204 is an empty list.
    async fn qido_instances(
        &self,
        path: &str,
        filters: &[(&str, String)],
        fields: &[&str],
    ) -> Result<Vec<Value>> {
        const PAGE: usize = 1000;
        let mut out = Vec::new();
        loop {
            let mut q: Vec<(&str, String)> = filters.to_vec();
            q.push(("limit", PAGE.to_string()));
            q.push(("offset", out.len().to_string()));
            q.extend(fields.iter().map(|f| ("includefield", (*f).to_owned())));
            let resp = self
                .request(Method::GET, path)?
                .query(&q)
                .header(reqwest::header::ACCEPT, "application/dicom+json")
                .send()
                .await
                .map_err(|e| transport("QIDO-RS", e))?;
            let status = resp.status();
            if status == StatusCode::NOT_FOUND || status == StatusCode::NO_CONTENT {
                return Ok(out);
            }
            let resp = check_status("QIDO-RS", resp).await?;
            let body = resp.bytes().await.map_err(|e| transport("QIDO-RS", e))?;
            let page = parse_qido_answer(&body, &DicomJsonLimits::default()).map_err(|e| {
                Error::pacs_transient(
                    format!("QIDO-RS answer is not a DICOM JSON array: {e}"),
                    None,
                )
            })?;
            if page.is_empty() {
                return Ok(out);
            }
            let n = page.len();
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }
}

/// Limits on a DICOM JSON answer (QIDO-RS, the STOW-RS Store Instances
/// Response) before it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DicomJsonLimits {
    /// Most bytes of the answer.
    pub max_bytes: usize,
    /// Most objects in a QIDO-RS answer.
    pub max_objects: usize,
}

impl Default for DicomJsonLimits {
    /// 64 MiB and 100,000 objects: a page of 1,000 instances is a few
    /// MiB at most, and parsing never nests deeper than 128 (serde_json's
    /// recursion limit).
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_objects: 100_000,
        }
    }
}

/// Why a DICOM JSON answer was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum DicomJsonError {
    /// Larger than [`DicomJsonLimits::max_bytes`].
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// More objects than [`DicomJsonLimits::max_objects`].
    TooManyObjects {
        /// The limit.
        limit: usize,
    },
    /// Not JSON of the expected shape.
    Json(serde_json::Error),
}

impl fmt::Display for DicomJsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => write!(f, "more than {limit} bytes"),
            Self::TooManyObjects { limit } => write!(f, "more than {limit} objects"),
            Self::Json(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for DicomJsonError {}

/// The body of a DICOM JSON answer, whitespace only (an empty answer) as
/// `None`, within `limits`.
///
/// # Errors
/// [`DicomJsonError`].
pub fn parse_dicom_json(
    body: &[u8],
    limits: &DicomJsonLimits,
) -> std::result::Result<Option<Value>, DicomJsonError> {
    if body.len() > limits.max_bytes {
        return Err(DicomJsonError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(DicomJsonError::Json)
}

/// The objects of a QIDO-RS answer (a DICOM JSON array; an empty body is
/// no object), within `limits`. Read them with [`string_of`],
/// [`number_of`] and [`items_of`].
///
/// # Errors
/// [`DicomJsonError`]; a body that is not an array is
/// [`DicomJsonError::Json`].
pub fn parse_qido_answer(
    body: &[u8],
    limits: &DicomJsonLimits,
) -> std::result::Result<Vec<Value>, DicomJsonError> {
    if body.len() > limits.max_bytes {
        return Err(DicomJsonError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let page: Vec<Value> = serde_json::from_slice(body).map_err(DicomJsonError::Json)?;
    if page.len() > limits.max_objects {
        return Err(DicomJsonError::TooManyObjects {
            limit: limits.max_objects,
        });
    }
    Ok(page)
}

/// SOP Instance UIDs per QIDO-RS UID-list query: at most 64 × 65 bytes of
/// UIDs, well under the 8 KiB request line many HTTP servers allow.
pub(crate) const UID_LIST_CHUNK: usize = 64;

/// The first string value of `tag` (8 hex digits) in a DICOM JSON object.
pub fn string_of(obj: &Value, tag: &str) -> Option<String> {
    obj.get(tag)?
        .get("Value")?
        .get(0)?
        .as_str()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
}

/// The first numeric value of `tag` in a DICOM JSON object.
pub fn number_of(obj: &Value, tag: &str) -> Option<u64> {
    obj.get(tag)?.get("Value")?.get(0)?.as_u64()
}

/// The items of sequence `tag` in a DICOM JSON object.
pub fn items_of<'a>(obj: &'a Value, tag: &str) -> &'a [Value] {
    obj.get(tag)
        .and_then(|v| v.get("Value"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A failure to talk to the PACS. Worth a retry (transient), except when
/// TLS refused the PACS (an untrusted, expired or misnamed certificate, no
/// common protocol): that needs an operator (trust its CA with `ca_file`,
/// fix its certificate or the URL), so it is permanent and says "TLS".
pub(crate) fn transport(what: &str, e: reqwest::Error) -> Error {
    if let Some(tls) = tls_cause(&e) {
        let why = match tls {
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                "the PACS certificate is not trusted (configure its CA with ca_file, or fix \
                 the certificate or the URL's host name)"
            }
            _ => "no secure connection could be agreed with the PACS",
        };
        return Error::pacs_permanent(
            format!("{what}: TLS handshake refused: {why}"),
            Some(Box::new(e)),
        );
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transfer failed"
    };
    Error::pacs_transient(format!("{what}: {kind}"), Some(Box::new(e)))
}

/// The TLS error somewhere in `e`'s chain of causes, if TLS failed.
fn tls_cause(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        // tokio-rustls reports a handshake failure as an `io::Error` whose
        // inner error is the `rustls::Error`, possibly wrapped in another
        // `io::Error`; `io::Error::source` skips the inner error itself.
        cur = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    None
}

/// Whether an HTTP status from the PACS is worth a retry: timeouts, rate
/// limits and server errors are; every other 4xx means the request itself
/// is refused and will be refused again.
pub(crate) fn is_transient_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After` as a delay (seconds or an HTTP date), capped at a day.
pub(crate) fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    let d = match v.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(d.min(Duration::from_secs(24 * 3600)))
}

/// Pass a 2xx response; turn anything else into a typed PACS error that
/// keeps the status, a short excerpt of the body and any `Retry-After`.
pub(crate) async fn check_status(what: &str, resp: Response) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    Err(status_error(what, resp).await)
}

/// The typed error for a non-2xx answer.
pub(crate) async fn status_error(what: &str, resp: Response) -> Error {
    let status = resp.status();
    let wait = retry_after(&resp);
    let body = resp.bytes().await.unwrap_or_default();
    let excerpt: String = String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let reason = format!("{what}: HTTP {status} {}", excerpt.trim());
    if is_transient_status(status) {
        Error::Pacs {
            transient: true,
            reason,
            retry_after: wait,
            source: None,
        }
    } else {
        Error::pacs_permanent(reason, None)
    }
}

/// Limits on the `multipart/related` framing of a WADO-RS answer, checked
/// by [`MultipartReader`] as the bytes arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramingLimits {
    /// Most parts accepted (a retrieval of one instance: 1).
    pub max_parts: usize,
    /// Most content bytes of one part.
    pub max_part_bytes: u64,
    /// Most bytes of the preamble before the first boundary, of the
    /// transport padding after a boundary, and of one part's header block.
    pub max_head_bytes: usize,
}

/// Why the multipart framing of an answer was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FramingError {
    /// The `Content-Type` is not multipart with a usable boundary.
    NotMultipart(String),
    /// A part beyond [`FramingLimits::max_parts`] began.
    TooManyParts {
        /// The limit.
        limit: usize,
    },
    /// A part's content grew beyond [`FramingLimits::max_part_bytes`].
    PartTooLarge {
        /// The limit.
        limit: u64,
    },
    /// A preamble, padding or part header block grew beyond
    /// [`FramingLimits::max_head_bytes`].
    HeadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// Bytes that are not multipart framing.
    Malformed(&'static str),
    /// The body ended before its closing boundary.
    Truncated,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMultipart(ct) => write!(f, "the answer is not multipart ({ct:?})"),
            Self::TooManyParts { limit } => write!(f, "more than {limit} part(s)"),
            Self::PartTooLarge { limit } => write!(f, "a part of more than {limit} bytes"),
            Self::HeadTooLarge { limit } => {
                write!(f, "multipart framing of more than {limit} bytes")
            }
            Self::Malformed(what) => write!(f, "malformed multipart body: {what}"),
            Self::Truncated => f.write_str("the multipart body ended before its closing boundary"),
        }
    }
}

impl std::error::Error for FramingError {}

/// The boundary of a `multipart/*` `Content-Type` (RFC 2046 §5.1.1: 1 to
/// 70 characters). Lenient about other parameters (servers send
/// `type=application/dicom` unquoted).
///
/// # Errors
/// [`FramingError::NotMultipart`] for another media type or a missing or
/// unusable boundary.
pub fn multipart_boundary(content_type: &str) -> std::result::Result<String, FramingError> {
    let refuse = || FramingError::NotMultipart(content_type.chars().take(120).collect());
    let (media, mut rest) = content_type.split_once(';').unwrap_or((content_type, ""));
    let media = media.trim();
    let is_multipart = media.len() > 10
        && media
            .get(..10)
            .is_some_and(|t| t.eq_ignore_ascii_case("multipart/"));
    if !is_multipart {
        return Err(refuse());
    }
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            return Err(refuse());
        }
        let (name, after) = rest.split_once('=').ok_or_else(refuse)?;
        let (value, tail) = match after.trim_start().strip_prefix('"') {
            Some(quoted) => {
                let mut value = String::new();
                let mut end = None;
                let mut chars = quoted.char_indices();
                while let Some((at, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = Some(at + 1);
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, &quoted[end.ok_or_else(refuse)?..])
            }
            None => {
                let end = after.find(';').unwrap_or(after.len());
                (after[..end].trim().to_owned(), &after[end..])
            }
        };
        if name.trim().eq_ignore_ascii_case("boundary") {
            let usable = (1..=70).contains(&value.len())
                && !value.ends_with(' ')
                && value.bytes().all(|c| c == b' ' || c.is_ascii_graphic());
            return if usable { Ok(value) } else { Err(refuse()) };
        }
        rest = tail;
    }
}

/// One step of a multipart body, as [`MultipartReader::feed`] finds it.
#[derive(Debug, PartialEq, Eq)]
pub enum PartEvent<'a> {
    /// A part begins, with its `Content-Type` header if it has one.
    Start {
        /// The part's `Content-Type` value.
        content_type: Option<&'a str>,
    },
    /// The next bytes of the current part's content.
    Data(&'a [u8]),
    /// The current part ended at a boundary.
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Preamble,
    AfterBoundary,
    Headers,
    Body,
    Done,
}

/// An incremental parser of a multipart body (RFC 2046 §5.1.1) for
/// answers that must not be held in memory: bytes are fed as they arrive
/// and each part's content is handed on at once. It holds at most the
/// bytes of one feed plus a boundary's length while in a part, and at
/// most [`FramingLimits::max_head_bytes`] of preamble or part headers.
/// Every limit is checked before content is handed on, so an answer over
/// a limit is refused without reading further. Pure (no I/O), for
/// fuzzing.
#[derive(Debug)]
pub struct MultipartReader {
    /// `CRLF "--" boundary`.
    delimiter: Vec<u8>,
    limits: FramingLimits,
    stage: Stage,
    /// Bytes not yet handed on.
    buf: Vec<u8>,
    /// Bytes of preamble or padding seen in this stage.
    head: usize,
    /// Bytes at the front of `buf` that were assumed, not received (the
    /// CRLF before the first boundary): not counted as preamble.
    assumed: usize,
    /// How far `buf` has been searched for the end of a header block.
    scanned: usize,
    parts: usize,
    part_bytes: u64,
}

impl MultipartReader {
    /// A reader of a body delimited by `boundary` (see
    /// [`multipart_boundary`]).
    pub fn new(boundary: &str, limits: FramingLimits) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Self {
            delimiter,
            limits,
            stage: Stage::Preamble,
            // The first boundary may open the body without a CRLF before
            // it: with one assumed, every delimiter looks the same.
            buf: b"\r\n".to_vec(),
            head: 0,
            assumed: 2,
            scanned: 0,
            parts: 0,
            part_bytes: 0,
        }
    }

    /// Parts begun so far.
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Whether the closing boundary has been read (what follows it, the
    /// epilogue, is ignored).
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Parse the next bytes of the body, calling `on` for what they
    /// complete.
    ///
    /// # Errors
    /// A [`FramingError`] once the body breaks a limit or is not
    /// multipart; the reader must not be fed after that.
    pub fn feed<F: FnMut(PartEvent<'_>)>(
        &mut self,
        input: &[u8],
        mut on: F,
    ) -> std::result::Result<(), FramingError> {
        if self.stage == Stage::Done {
            return Ok(());
        }
        self.buf.extend_from_slice(input);
        while self.step(&mut on)? {}
        Ok(())
    }

    /// The body has ended.
    ///
    /// # Errors
    /// [`FramingError::Truncated`] unless the closing boundary was read.
    pub fn finish(&self) -> std::result::Result<(), FramingError> {
        if self.is_done() {
            Ok(())
        } else {
            Err(FramingError::Truncated)
        }
    }

    /// One step on the buffered bytes; `Ok(false)` when more are needed.
    fn step<F: FnMut(PartEvent<'_>)>(
        &mut self,
        on: &mut F,
    ) -> std::result::Result<bool, FramingError> {
        let dlen = self.delimiter.len();
        match self.stage {
            Stage::Preamble => {
                // The preamble is counted whether or not the first
                // boundary arrived in the same bytes: the limit does not
                // depend on how the body is cut.
                if let Some(i) = find(&self.buf, &self.delimiter) {
                    self.count_preamble(i)?;
                    self.buf.drain(..i + dlen);
                    self.enter(Stage::AfterBoundary);
                    return Ok(true);
                }
                let drop = self.buf.len().saturating_sub(dlen - 1);
                self.buf.drain(..drop);
                self.count_preamble(drop)?;
                Ok(false)
            }
            Stage::AfterBoundary => match self.buf.first() {
                None => Ok(false),
                // "--" closes the body right after a boundary, never after
                // transport padding (`head` counts the padding read).
                Some(b'-') if self.head == 0 => match self.buf.get(1) {
                    None => Ok(false),
                    Some(b'-') => {
                        self.buf = Vec::new();
                        self.enter(Stage::Done);
                        Ok(false)
                    }
                    Some(_) => Err(FramingError::Malformed("a boundary is followed by '-'")),
                },
                Some(_) => {
                    let pad = self
                        .buf
                        .iter()
                        .take_while(|b| matches!(b, b' ' | b'\t'))
                        .count();
                    self.buf.drain(..pad);
                    self.count_head(pad)?;
                    match self.buf.as_slice() {
                        [] | [b'\r'] => Ok(false),
                        [b'\r', b'\n', ..] => {
                            self.buf.drain(..2);
                            self.parts += 1;
                            if self.parts > self.limits.max_parts {
                                return Err(FramingError::TooManyParts {
                                    limit: self.limits.max_parts,
                                });
                            }
                            self.enter(Stage::Headers);
                            Ok(true)
                        }
                        _ => Err(FramingError::Malformed(
                            "a boundary is not followed by CRLF",
                        )),
                    }
                }
            },
            Stage::Headers => {
                let end = if self.buf.starts_with(b"\r\n") {
                    Some((0, 2))
                } else {
                    let from = self.scanned.saturating_sub(3);
                    find(&self.buf[from..], b"\r\n\r\n").map(|i| (from + i, from + i + 4))
                };
                let Some((block, rest)) = end else {
                    self.scanned = self.buf.len();
                    if self.buf.len() > self.limits.max_head_bytes {
                        return Err(self.head_too_large());
                    }
                    return Ok(false);
                };
                if rest > self.limits.max_head_bytes {
                    return Err(self.head_too_large());
                }
                let content_type = content_type_of(&self.buf[..block])?;
                on(PartEvent::Start {
                    content_type: content_type.map(|(a, b)| {
                        // Checked as UTF-8 by content_type_of.
                        std::str::from_utf8(&self.buf[a..b]).unwrap_or_default()
                    }),
                });
                self.buf.drain(..rest);
                self.part_bytes = 0;
                self.enter(Stage::Body);
                Ok(true)
            }
            Stage::Body => {
                if let Some(i) = find(&self.buf, &self.delimiter) {
                    self.emit(i, on)?;
                    self.buf.drain(..dlen);
                    on(PartEvent::End);
                    self.enter(Stage::AfterBoundary);
                    return Ok(true);
                }
                // Hold back what could be the start of a delimiter.
                let n = self.buf.len().saturating_sub(dlen - 1);
                self.emit(n, on)?;
                Ok(false)
            }
            Stage::Done => Ok(false),
        }
    }

    fn enter(&mut self, stage: Stage) {
        self.stage = stage;
        self.head = 0;
        self.scanned = 0;
    }

    /// Count `n` bytes leaving the front of the buffer as preamble, less
    /// the assumed CRLF.
    fn count_preamble(&mut self, n: usize) -> std::result::Result<(), FramingError> {
        let assumed = n.min(self.assumed);
        self.assumed -= assumed;
        self.count_head(n - assumed)
    }

    fn count_head(&mut self, n: usize) -> std::result::Result<(), FramingError> {
        self.head = self.head.saturating_add(n);
        if self.head > self.limits.max_head_bytes {
            return Err(self.head_too_large());
        }
        Ok(())
    }

    fn head_too_large(&self) -> FramingError {
        FramingError::HeadTooLarge {
            limit: self.limits.max_head_bytes,
        }
    }

    /// Hand on the first `n` buffered bytes as content, within the limit.
    fn emit<F: FnMut(PartEvent<'_>)>(
        &mut self,
        n: usize,
        on: &mut F,
    ) -> std::result::Result<(), FramingError> {
        if n == 0 {
            return Ok(());
        }
        let total = self.part_bytes.saturating_add(n as u64);
        if total > self.limits.max_part_bytes {
            return Err(FramingError::PartTooLarge {
                limit: self.limits.max_part_bytes,
            });
        }
        on(PartEvent::Data(&self.buf[..n]));
        self.buf.drain(..n);
        self.part_bytes = total;
        Ok(())
    }
}

/// The byte range of the `Content-Type` value in a part's header block
/// (lines `Name: value` separated by CRLF).
fn content_type_of(block: &[u8]) -> std::result::Result<Option<(usize, usize)>, FramingError> {
    let text = std::str::from_utf8(block)
        .map_err(|_| FramingError::Malformed("part headers are not UTF-8"))?;
    let mut found = None;
    let mut at = 0;
    for line in text.split("\r\n").filter(|_| !text.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(FramingError::Malformed("a part header line has no colon"));
        };
        if name.trim().eq_ignore_ascii_case("content-type") {
            let v = value.trim();
            let start = at + name.len() + 1 + (value.len() - value.trim_start().len());
            found = Some((start, start + v.len()));
        }
        at += line.len() + 2;
    }
    Ok(found)
}

/// The first position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(p) = position_of(hay.get(from..)?, first) {
        let at = from + p;
        let end = at + needle.len();
        if end > hay.len() {
            return None;
        }
        if &hay[at + 1..end] == rest {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The first position of `byte` in `hay`. Every part's content is
/// searched for the delimiter's first byte: blocks are tested whole
/// (without an early exit, so the compiler can compare many bytes at a
/// time), and only a block that holds the byte is searched byte by byte;
/// framing 105 MB took half the time of a plain search.
fn position_of(hay: &[u8], byte: u8) -> Option<usize> {
    const BLOCK: usize = 64;
    let mut blocks = hay.chunks_exact(BLOCK);
    let mut at = 0;
    for block in &mut blocks {
        if block.iter().fold(false, |seen, &b| seen | (b == byte)) {
            return block.iter().position(|&b| b == byte).map(|p| at + p);
        }
        at += BLOCK;
    }
    blocks
        .remainder()
        .iter()
        .position(|&b| b == byte)
        .map(|p| at + p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The block search finds what a plain search finds, wherever the
    /// byte is (or is not) and whatever the length.
    #[test]
    fn the_block_search_agrees_with_a_plain_one() {
        for len in [0, 1, 63, 64, 65, 127, 128, 200, 1000] {
            for at in (0..len).step_by(7).map(Some).chain([None]) {
                let mut hay = vec![b'x'; len];
                if let Some(a) = at {
                    hay[a] = b'\r';
                    if a + 70 < len {
                        hay[a + 70] = b'\r';
                    }
                }
                let plain = hay.iter().position(|&b| b == b'\r');
                assert_eq!(position_of(&hay, b'\r'), plain, "len {len} at {at:?}");
                assert_eq!(plain, at);
            }
        }
        let hay = b"ab\r\n--b0undar\r\n--b0undary";
        assert_eq!(find(hay, b"\r\n--b0undary"), Some(13));
        assert_eq!(find(hay, b"\r\n--b0undaryX"), None);
    }

    #[test]
    fn transient_statuses_are_the_retryable_ones() {
        for s in [500, 502, 503, 504, 408, 429] {
            assert!(is_transient_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 415] {
            assert!(
                !is_transient_status(StatusCode::from_u16(s).unwrap()),
                "{s}"
            );
        }
    }

    #[test]
    fn urls_must_be_http() {
        for bad in ["ftp://pacs/dicom-web", "not a url", "mailto:x@y"] {
            let e = DicomWebClient::new(&DicomWebConfig::new(bad)).unwrap_err();
            assert_eq!(e.code(), "RELAY_PACS_URL", "{bad}");
        }
        let c =
            DicomWebClient::new(&DicomWebConfig::new("https://pacs.example/dicom-web")).unwrap();
        assert_eq!(c.base().as_str(), "https://pacs.example/dicom-web/");
    }

    #[test]
    fn credentials_are_never_printed() {
        let a = DicomWebAuth::Basic {
            user: "relay".into(),
            password: "hunter2-very-secret".to_owned().into(),
        };
        let c = DicomWebConfig {
            auth: a,
            ..DicomWebConfig::new("http://x")
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
    const LIMITS: FramingLimits = FramingLimits {
        max_parts: 1,
        max_part_bytes: 1 << 20,
        max_head_bytes: 1024,
    };

    /// Each part's content type and content.
    type Parts = Vec<(Option<String>, Vec<u8>)>;

    /// Feed `body` in pieces of `piece` bytes; the parts' content types and
    /// contents, or the first error.
    fn parse(
        body: &[u8],
        piece: usize,
        limits: FramingLimits,
    ) -> std::result::Result<Parts, FramingError> {
        let mut r = MultipartReader::new("b0undary", limits);
        let mut parts: Parts = Vec::new();
        let mut open = false;
        for p in body.chunks(piece) {
            r.feed(p, |ev| match ev {
                PartEvent::Start { content_type } => {
                    assert!(!open);
                    open = true;
                    parts.push((content_type.map(str::to_owned), Vec::new()));
                }
                PartEvent::Data(d) => {
                    assert!(open);
                    parts.last_mut().unwrap().1.extend_from_slice(d);
                }
                PartEvent::End => {
                    assert!(open);
                    open = false;
                }
            })?;
        }
        r.finish()?;
        assert!(!open);
        assert_eq!(r.parts(), parts.len());
        Ok(parts)
    }

    fn content(n: usize) -> Vec<u8> {
        // Bytes that look like the start of a delimiter, without being one.
        let pattern = b"\r\n--b0undar\r";
        (0..n)
            .map(|i| pattern[i % pattern.len()] ^ u8::from(i % 97 == 0))
            .collect()
    }

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        for p in parts {
            b.extend_from_slice(
                b"--b0undary\r\nContent-Type: application/dicom\r\nContent-Length: 5\r\n\r\n",
            );
            b.extend_from_slice(p);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--b0undary--\r\n");
        b
    }

    /// Orthanc's framing (no preamble, headers, one part, close), in
    /// pieces of every size: the part's content exactly.
    #[test]
    fn one_part_in_any_pieces() {
        let data = content(3000);
        let b = body(&[&data]);
        for piece in (1..40).chain([1000, 4096, b.len()]) {
            let parts = parse(&b, piece, LIMITS).unwrap();
            assert_eq!(parts.len(), 1, "piece {piece}");
            assert_eq!(parts[0].0.as_deref(), Some("application/dicom"));
            assert!(parts[0].1 == data, "piece {piece}");
        }
    }

    #[test]
    fn preamble_padding_and_empty_headers_are_framing() {
        let b = b"preamble\r\n--b0undary \t\r\n\r\nabc\r\n--b0undary--";
        for piece in 1..8 {
            let parts = parse(b, piece, LIMITS).unwrap();
            assert_eq!(parts, vec![(None, b"abc".to_vec())]);
        }
        // No parts at all: a well-formed, empty answer.
        assert_eq!(parse(b"--b0undary--\r\n", 3, LIMITS).unwrap(), vec![]);
    }

    #[test]
    fn limits_are_enforced_as_the_bytes_arrive() {
        let data = content(5000);
        let small = FramingLimits {
            max_part_bytes: 4999,
            ..LIMITS
        };
        assert_eq!(
            parse(&body(&[&data]), 7, small),
            Err(FramingError::PartTooLarge { limit: 4999 })
        );
        let exact = FramingLimits {
            max_part_bytes: 5000,
            ..LIMITS
        };
        assert_eq!(parse(&body(&[&data]), 7, exact).unwrap().len(), 1);
        assert_eq!(
            parse(&body(&[b"one", b"two"]), 5, LIMITS),
            Err(FramingError::TooManyParts { limit: 1 })
        );
        let two = FramingLimits {
            max_parts: 2,
            ..LIMITS
        };
        assert_eq!(parse(&body(&[b"one", b"two"]), 5, two).unwrap().len(), 2);
        let long_preamble = [vec![b'x'; 2000], body(&[b"x"])].concat();
        assert_eq!(
            parse(&long_preamble, 100, LIMITS),
            Err(FramingError::HeadTooLarge { limit: 1024 })
        );
        let long_header = [
            b"--b0undary\r\nX-Pad: ".to_vec(),
            vec![b'y'; 2000],
            b"\r\n\r\nabc\r\n--b0undary--".to_vec(),
        ]
        .concat();
        assert_eq!(
            parse(&long_header, 100, LIMITS),
            Err(FramingError::HeadTooLarge { limit: 1024 })
        );
    }

    /// Found by the `wado_multipart` fuzz target: a preamble over the limit
    /// was refused when it arrived in pieces, and accepted when the first
    /// boundary came in the same bytes. Now it is refused however the
    /// body is cut, at exactly the limit (the CRLF before the first
    /// boundary belongs to it, not to the preamble).
    #[test]
    fn the_preamble_limit_does_not_depend_on_the_pieces() {
        let with_preamble = |n: usize| [vec![b'x'; n], b"\r\n".to_vec(), body(&[b"x"])].concat();
        for piece in [1, 3, 7, 100, 5000] {
            let ok = parse(&with_preamble(1024), piece, LIMITS).unwrap();
            assert_eq!(ok, vec![(Some("application/dicom".into()), b"x".to_vec())]);
            assert_eq!(
                parse(&with_preamble(1025), piece, LIMITS),
                Err(FramingError::HeadTooLarge { limit: 1024 }),
                "pieces of {piece}"
            );
        }
        // The fuzzer's input: the first "--boundary" lacks its CRLF, so the
        // preamble runs on to the next delimiter, over the limit of 64.
        let body = b"ry--b0undary\r\nContent-Type: application/dicom\r\n\r\nDICM-one\r\n--bm\r\n\r\none\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\n\r\n--b0undar\r\r0undary--\r\n";
        let small = FramingLimits {
            max_parts: 3,
            max_part_bytes: 1 << 15,
            max_head_bytes: 64,
        };
        for piece in [7, body.len()] {
            assert_eq!(
                parse(body, piece, small),
                Err(FramingError::HeadTooLarge { limit: 64 })
            );
        }
    }

    /// Found by the `wado_multipart` fuzz target: "--" after transport
    /// padding closed the body when the padding arrived in an earlier
    /// piece, and was refused when it came in the same piece. It is not a
    /// close delimiter (RFC 2046: `delimiter "--"`), however the body is cut.
    #[test]
    fn dashes_after_padding_do_not_close_the_body() {
        let b = b"\r\n\r\n--b0undary --b0uundary-- epilogue";
        for piece in 1..b.len() {
            assert_eq!(
                parse(b, piece, LIMITS),
                Err(FramingError::Malformed(
                    "a boundary is not followed by CRLF"
                )),
                "pieces of {piece}"
            );
        }
        // Padding before the CRLF of a part stays framing.
        let padded = b"--b0undary \t \r\n\r\nabc\r\n--b0undary--";
        for piece in 1..padded.len() {
            assert_eq!(parse(padded, piece, LIMITS).unwrap().len(), 1);
        }
    }

    /// A part whose content never ends is refused once over the limit,
    /// however long the rest of the body would be.
    #[test]
    fn an_endless_part_is_refused_at_the_limit() {
        let mut r = MultipartReader::new("b0undary", LIMITS);
        let mut seen = 0u64;
        r.feed(b"--b0undary\r\n\r\n", |_| {}).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut fed = 0u64;
        let err = loop {
            fed += chunk.len() as u64;
            if let Err(e) = r.feed(&chunk, |ev| {
                if let PartEvent::Data(d) = ev {
                    seen += d.len() as u64;
                }
            }) {
                break e;
            }
            assert!(fed < 4 << 20, "never refused");
        };
        assert_eq!(err, FramingError::PartTooLarge { limit: 1 << 20 });
        assert!(seen <= 1 << 20);
        assert!(fed <= (1 << 20) + (64 << 10), "{fed} bytes fed");
    }

    #[test]
    fn broken_bodies_are_refused() {
        assert_eq!(
            parse(b"--b0undary\r\n\r\nabc", 2, LIMITS),
            Err(FramingError::Truncated)
        );
        assert_eq!(parse(b"", 2, LIMITS), Err(FramingError::Truncated));
        assert!(matches!(
            parse(b"--b0undaryX\r\n\r\nabc\r\n--b0undary--", 2, LIMITS),
            Err(FramingError::Malformed(_))
        ));
        assert!(matches!(
            parse(
                b"--b0undary\r\nno colon\r\n\r\nabc\r\n--b0undary--",
                2,
                LIMITS
            ),
            Err(FramingError::Malformed(_))
        ));
    }

    #[test]
    fn the_boundary_comes_from_the_content_type() {
        assert_eq!(
            multipart_boundary("multipart/related; type=\"application/dicom\"; boundary=abc-1")
                .unwrap(),
            "abc-1"
        );
        assert_eq!(
            multipart_boundary("Multipart/Related; boundary=\"a b:c\"; type=application/dicom")
                .unwrap(),
            "a b:c"
        );
        assert_eq!(
            multipart_boundary("multipart/related;type=\"a;b\";BOUNDARY = \"x\\\"y\" ").unwrap(),
            "x\"y"
        );
        for bad in [
            "application/dicom",
            "multipart/related; type=\"application/dicom\"",
            "multipart/related; boundary=\"\"",
            "multipart/related; boundary=\"abc",
            "multipart/; boundary=abc",
            "text/plain; boundary=abc",
            &format!("multipart/related; boundary={}", "x".repeat(71)),
            "",
        ] {
            assert!(
                matches!(multipart_boundary(bad), Err(FramingError::NotMultipart(_))),
                "{bad}"
            );
        }
    }
}

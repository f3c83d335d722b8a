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
    /// Extra PEM root certificates to trust (a hospital CA); the system
    /// roots are always trusted and certificates are always validated.
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
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| Error::io("read PACS CA file", e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::invalid(
                    "RELAY_PACS_CA",
                    format!("PACS CA file {}: {e}", path.display()),
                )
            })?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
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
        const PAGE: usize = 1000;
        let mut out = Vec::new();
        loop {
            let mut q: Vec<(&str, String)> = vec![
                ("limit", PAGE.to_string()),
                ("offset", out.len().to_string()),
            ];
            q.extend(fields.iter().map(|f| ("includefield", (*f).to_owned())));
            let resp = self
                .request(Method::GET, &format!("studies/{study}/instances"))?
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
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(out);
            }
            let page: Vec<Value> = serde_json::from_slice(&body).map_err(|e| {
                Error::pacs_transient(
                    format!("QIDO-RS answer is not a DICOM JSON array: {e}"),
                    None,
                )
            })?;
            let n = page.len();
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }
}

/// The first string value of `tag` (8 hex digits) in a DICOM JSON object.
pub(crate) fn string_of(obj: &Value, tag: &str) -> Option<String> {
    obj.get(tag)?
        .get("Value")?
        .get(0)?
        .as_str()
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
}

/// The first numeric value of `tag` in a DICOM JSON object.
pub(crate) fn number_of(obj: &Value, tag: &str) -> Option<u64> {
    obj.get(tag)?.get("Value")?.get(0)?.as_u64()
}

/// The items of sequence `tag` in a DICOM JSON object.
pub(crate) fn items_of<'a>(obj: &'a Value, tag: &str) -> &'a [Value] {
    obj.get(tag)
        .and_then(|v| v.get("Value"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A failure to talk to the PACS at all: always worth a retry.
pub(crate) fn transport(what: &str, e: reqwest::Error) -> Error {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transfer failed"
    };
    Error::pacs_transient(format!("{what}: {kind}"), Some(Box::new(e)))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
}

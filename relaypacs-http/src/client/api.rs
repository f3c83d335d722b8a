//! The gateway's HTTP API as the uploader uses it: tokens (login, the
//! JSON refresh flow), study sessions, tus 1.0 with `Upload-Checksum`,
//! and retries with exponential backoff.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use super::ClientError;
use super::progress::{Event, ProgressSink};

/// How the uploader proves who it is. Never taken from the command line.
#[derive(Clone)]
pub enum Credentials {
    /// Log in with a password (and a TOTP code when the account has one);
    /// the refresh token that comes back renews the access token.
    Password {
        /// Login name.
        user: String,
        /// The password.
        password: SecretString,
        /// A TOTP code, for an account with a second factor.
        totp: Option<SecretString>,
    },
    /// A file holding a refresh token (as `POST /api/v1/auth/login`
    /// returns it). Refresh tokens are rotated at every use, so the file is
    /// rewritten (crash-safely, mode 0600) with each new one; a file
    /// holding a JWT access token instead is used as is, until it expires.
    TokenFile(PathBuf),
    /// An access token (JWT), used until it expires.
    AccessToken(SecretString),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Password { user, .. } => f
                .debug_struct("Password")
                .field("user", user)
                .finish_non_exhaustive(),
            Self::TokenFile(p) => f.debug_tuple("TokenFile").field(p).finish(),
            Self::AccessToken(_) => f.write_str("AccessToken(..)"),
        }
    }
}

/// Whether a token is a JWT (three base64url parts), not an opaque
/// refresh token.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Retries: exponential backoff with jitter.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Tries in all (at least 1).
    pub attempts: u32,
    /// First wait.
    pub base: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 10,
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after try `attempt` (1-based): base·2^(attempt−1), capped,
    /// plus up to 25 % jitter; a server's `Retry-After` when longer.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        let jitter = exp.mul_f64(rand::random::<f64>() * 0.25);
        let d = exp + jitter;
        match retry_after {
            // A server's Retry-After is honoured up to five minutes.
            Some(r) if r > d => r.min(Duration::from_secs(300)),
            _ => d,
        }
    }
}

/// A request that did not succeed.
#[derive(Debug, Clone)]
pub enum Failure {
    /// No answer (connection refused or reset, timeout, …).
    Network(String),
    /// An answer other than success.
    Http {
        /// The status.
        status: StatusCode,
        /// `error.code` of the JSON body (empty when there was none).
        code: String,
        /// `error.message`, or the status text.
        message: String,
        /// `Retry-After`, in seconds.
        retry_after: Option<Duration>,
    },
    /// Authentication failed for good.
    Auth(String),
    /// The server's TLS certificate is not trusted (not retried).
    Tls(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Network(e) => write!(f, "network: {e}"),
            Self::Http {
                status,
                code,
                message,
                ..
            } => {
                if code.is_empty() {
                    write!(f, "HTTP {}: {message}", status.as_u16())
                } else {
                    write!(f, "HTTP {}: {message} ({code})", status.as_u16())
                }
            }
            Self::Auth(e) => write!(f, "authentication: {e}"),
            Self::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl Failure {
    /// Worth another try: no answer, 5xx, 408, 423, 429, or a busy upload.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Network(_) => true,
            Self::Http { status, code, .. } => {
                status.is_server_error()
                    && *status != StatusCode::NOT_IMPLEMENTED
                    && *status != StatusCode::INSUFFICIENT_STORAGE
                    || matches!(status.as_u16(), 408 | 423 | 429)
                    || code == "RELAY_UPLOAD_BUSY"
            }
            Self::Auth(_) | Self::Tls(_) => false,
        }
    }

    /// The status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `RELAY_…` code, if any.
    pub fn code(&self) -> &str {
        match self {
            Self::Http { code, .. } => code,
            Self::Network(_) => "RELAY_CLIENT_UNREACHABLE",
            Self::Auth(_) => "RELAY_CLIENT_AUTH",
            Self::Tls(_) => "RELAY_CLIENT_TLS",
        }
    }

    /// The message alone.
    pub fn message(&self) -> String {
        match self {
            Self::Http { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// The error a caller gives up with: unreachable, auth, or the answer.
    pub fn into_client_error(self, what: &str) -> ClientError {
        match self {
            Self::Network(e) => ClientError::Unreachable(format!("{what}: {e}")),
            Self::Auth(e) => ClientError::Auth(e),
            Self::Tls(e) => {
                ClientError::Config(format!("{what}: TLS: {e} (a private CA: --ca-file FILE)"))
            }
            Self::Http { status, .. } if status == StatusCode::UNAUTHORIZED => {
                ClientError::Auth(format!("{what}: {self}"))
            }
            other => ClientError::Server(format!("{what}: {other}")),
        }
    }
}

fn network(e: &reqwest::Error) -> Failure {
    use std::error::Error as _;
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    // A certificate the client does not trust will not become trusted by
    // trying again.
    if s.contains("certificate") || s.contains("Certificate") {
        return Failure::Tls(s);
    }
    Failure::Network(s)
}

/// A non-success response as a [`Failure`] (reads its JSON error body).
async fn failure_of(r: Response) -> Failure {
    let status = r.status();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let message = body["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    Failure::Http {
        status,
        code,
        message,
        retry_after,
    }
}

#[derive(Debug)]
struct Tokens {
    access: Option<SecretString>,
    refresh: Option<SecretString>,
    /// Renew before this instant.
    renew_at: Option<Instant>,
    /// Bumped at every renewal: a 401 renews only the token it saw.
    generation: u64,
}

/// The gateway's API for one run.
#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    base: Url,
    creds: Credentials,
    tokens: tokio::sync::Mutex<Tokens>,
    retry: RetryPolicy,
}

/// What a HEAD says of an upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadStatus {
    /// Bytes the server holds durably.
    pub offset: u64,
    /// The declared length.
    pub length: u64,
}

impl Api {
    /// A client for `base` (e.g. `https://relay.example.org`).
    ///
    /// # Errors
    /// [`ClientError::Config`] for a URL that is not http(s) or a client
    /// that cannot be built.
    pub fn new(
        base: &str,
        creds: Credentials,
        retry: RetryPolicy,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let mut base = Url::parse(base.trim_end_matches('/'))
            .map_err(|e| ClientError::Config(format!("--server {base}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ClientError::Config(format!(
                "--server {base}: an http:// or https:// URL is needed"
            )));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(ClientError::Config(
                "--server must not carry credentials".into(),
            ));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| ClientError::Config(format!("--ca-file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ClientError::Config(format!("--ca-file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(ClientError::Config(format!(
                    "--ca-file {}: no certificate in it",
                    path.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .connect_timeout(Duration::from_secs(10))
            // A stalled connection is a network error (retried), not a hang.
            .read_timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("relaypacs-upload/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Config(format!("HTTP client: {e}")))?;
        let (access, refresh) = match &creds {
            Credentials::AccessToken(t) => (Some(t.clone()), None),
            _ => (None, None),
        };
        Ok(Self {
            http,
            base,
            creds,
            tokens: tokio::sync::Mutex::new(Tokens {
                access,
                refresh,
                renew_at: None,
                generation: 0,
            }),
            retry,
        })
    }

    /// The server's base URL, as the state file's keys name it.
    pub fn server(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// `path` (relative, e.g. `api/v1/studies`) or an absolute URL the
    /// server gave, resolved against the base.
    pub fn url(&self, path: &str) -> Result<Url, Failure> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| Failure::Network(format!("bad URL {path}: {e}")))
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Get a valid access token (logging in or refreshing as needed).
    async fn token(&self) -> Result<(SecretString, u64), Failure> {
        let mut t = self.tokens.lock().await;
        let due = t.renew_at.is_some_and(|at| Instant::now() >= at);
        if t.access.is_none() || due {
            self.renew(&mut t).await?;
        }
        match &t.access {
            Some(a) => Ok((a.clone(), t.generation)),
            None => Err(Failure::Auth("no access token".into())),
        }
    }

    /// After a 401 with the token of `generation`: renew it, unless another
    /// request already did.
    async fn renew_after_401(&self, generation: u64) -> Result<(), Failure> {
        let mut t = self.tokens.lock().await;
        if t.generation == generation {
            self.renew(&mut t).await?;
        }
        Ok(())
    }

    /// Refresh (rotating the refresh token), else log in again with the
    /// password, else fail. One try each: the request that needed the
    /// token is retried by its caller.
    async fn renew(&self, t: &mut Tokens) -> Result<(), Failure> {
        if t.refresh.is_none()
            && let Credentials::TokenFile(path) = &self.creds
        {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Auth(format!("token file {}: {e}", path.display())))?;
            let tok = text.trim().to_owned();
            if tok.is_empty() {
                return Err(Failure::Auth(format!(
                    "token file {} is empty",
                    path.display()
                )));
            }
            if looks_like_jwt(&tok) {
                if t.access.is_some() {
                    return Err(Failure::Auth(
                        "the access token in the token file was refused or expired; put a refresh token there"
                            .into(),
                    ));
                }
                t.access = Some(SecretString::from(tok));
                t.generation += 1;
                return Ok(());
            }
            t.refresh = Some(SecretString::from(tok));
        }
        if let Some(refresh) = t.refresh.clone() {
            let body = serde_json::json!({ "refresh_token": refresh.expose_secret() });
            match self.token_request("api/v1/auth/refresh", &body).await {
                Ok(v) => return self.take_pair(t, &v),
                Err(Failure::Http { status, .. })
                    if status == StatusCode::UNAUTHORIZED
                        && matches!(self.creds, Credentials::Password { .. }) =>
                {
                    t.refresh = None;
                }
                Err(Failure::Http {
                    status, message, ..
                }) if status == StatusCode::UNAUTHORIZED => {
                    return Err(Failure::Auth(format!("refresh refused: {message}")));
                }
                Err(e) => return Err(e),
            }
        }
        match &self.creds {
            Credentials::Password {
                user,
                password,
                totp,
            } => {
                let mut body = serde_json::json!({
                    "username": user,
                    "password": password.expose_secret(),
                });
                if let Some(code) = totp {
                    body["totp"] = Value::from(code.expose_secret());
                }
                match self.token_request("api/v1/auth/login", &body).await {
                    Ok(v) => self.take_pair(t, &v),
                    Err(Failure::Http {
                        status, message, ..
                    }) if status == StatusCode::UNAUTHORIZED => {
                        Err(Failure::Auth(format!("login refused: {message}")))
                    }
                    Err(e) => Err(e),
                }
            }
            Credentials::AccessToken(_) => Err(Failure::Auth(
                "the access token was refused or expired".into(),
            )),
            Credentials::TokenFile(_) => Err(Failure::Auth("no usable token".into())),
        }
    }

    /// POST a token request (one try: the caller's request is retried).
    async fn token_request(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        let url = self.url(path)?;
        match self.http.post(url).json(body).send().await {
            Ok(r) if r.status().is_success() => r
                .json::<Value>()
                .await
                .map_err(|e| Failure::Network(format!("token answer: {e}"))),
            Ok(r) => Err(failure_of(r).await),
            Err(e) => Err(network(&e)),
        }
    }

    fn take_pair(&self, t: &mut Tokens, v: &Value) -> Result<(), Failure> {
        let access = v["access_token"]
            .as_str()
            .ok_or_else(|| Failure::Auth("no access_token in the answer".into()))?;
        let ttl = v["expires_in"].as_u64().unwrap_or(300);
        t.access = Some(SecretString::from(access.to_owned()));
        // Renew at 80 % of the lifetime: never send a token about to lapse.
        t.renew_at = Some(Instant::now() + Duration::from_secs(ttl).mul_f64(0.8));
        t.generation += 1;
        if let Some(r) = v["refresh_token"].as_str() {
            t.refresh = Some(SecretString::from(r.to_owned()));
            if let Credentials::TokenFile(path) = &self.creds {
                // The old token is spent: the file must hold the new one.
                super::state::write_durable(path, format!("{r}\n").as_bytes()).map_err(|e| {
                    Failure::Auth(format!(
                        "cannot write the new refresh token to {}: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Log in (or refresh) now, so that bad credentials fail before any
    /// work; retried (and reported to `sink`) while the server is away.
    ///
    /// # Errors
    /// The failure.
    pub async fn authenticate(&self, sink: &dyn ProgressSink) -> Result<(), Failure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.token().await {
                Ok(_) => return Ok(()),
                Err(f) if f.retryable() && attempt < self.retry.attempts => {
                    self.backoff("log in", attempt, &f, sink).await;
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// One authenticated request (a 401 renews the token and tries once
    /// more); a non-success answer is a [`Failure`]. Not retried.
    pub async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, Failure> {
        for round in 0..2 {
            let (token, generation) = self.token().await?;
            let r = build(&self.http)
                .bearer_auth(token.expose_secret())
                .send()
                .await
                .map_err(|e| network(&e))?;
            if r.status() == StatusCode::UNAUTHORIZED && round == 0 {
                self.renew_after_401(generation).await?;
                continue;
            }
            if r.status().is_success() {
                return Ok(r);
            }
            return Err(failure_of(r).await);
        }
        Err(Failure::Auth("the server refused a renewed token".into()))
    }

    /// [`send`](Self::send), retried with backoff while the failure is
    /// retryable; each retry is reported to `sink` as `what`.
    pub async fn send_retrying(
        &self,
        what: &str,
        sink: &dyn ProgressSink,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, Failure> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send(&build).await {
                Ok(r) => return Ok(r),
                Err(f) if f.retryable() && attempt < self.retry.attempts => {
                    self.backoff(what, attempt, &f, sink).await;
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// Wait before the next try, reporting it.
    pub async fn backoff(&self, what: &str, attempt: u32, f: &Failure, sink: &dyn ProgressSink) {
        let ra = match f {
            Failure::Http { retry_after, .. } => *retry_after,
            _ => None,
        };
        let d = self.retry.delay(attempt, ra);
        sink.event(&Event::Retry {
            what: what.to_owned(),
            attempt,
            delay_ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            error: f.to_string(),
        });
        tokio::time::sleep(d).await;
    }

    /// `POST /api/v1/studies`: a new study session; its id.
    pub async fn create_study(&self, sink: &dyn ProgressSink) -> Result<String, Failure> {
        let url = self.url("api/v1/studies")?;
        let r = self
            .send_retrying("open a study session", sink, |c| {
                c.post(url.clone()).json(&serde_json::json!({}))
            })
            .await?;
        let v: Value = r
            .json()
            .await
            .map_err(|e| Failure::Network(format!("study answer: {e}")))?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Failure::Network("no id in the study answer".into()))
    }

    /// `GET /api/v1/studies/{id}` (first page of files); `None` when the
    /// session is gone (404).
    pub async fn study(
        &self,
        session: &str,
        cursor: Option<&str>,
        sink: &dyn ProgressSink,
    ) -> Result<Option<Value>, Failure> {
        let mut url = self.url(&format!("api/v1/studies/{session}"))?;
        url.query_pairs_mut().append_pair("files_limit", "1000");
        if let Some(c) = cursor {
            url.query_pairs_mut().append_pair("files_cursor", c);
        }
        match self
            .send_retrying("read the study session", sink, |c| c.get(url.clone()))
            .await
        {
            Ok(r) => r
                .json()
                .await
                .map(Some)
                .map_err(|e| Failure::Network(format!("study answer: {e}"))),
            Err(f) if f.status() == Some(StatusCode::NOT_FOUND) => Ok(None),
            Err(f) => Err(f),
        }
    }

    /// Every file of a session (all pages): `(upload_url, sha256, state)`.
    pub async fn study_files(
        &self,
        session: &str,
        sink: &dyn ProgressSink,
    ) -> Result<Option<(Value, Vec<Value>)>, Failure> {
        let Some(first) = self.study(session, None, sink).await? else {
            return Ok(None);
        };
        let mut files: Vec<Value> = first["files"].as_array().cloned().unwrap_or_default();
        let mut next = first["files_next"].as_str().map(str::to_owned);
        while let Some(c) = next {
            let Some(page) = self.study(session, Some(&c), sink).await? else {
                return Ok(None);
            };
            files.extend(page["files"].as_array().cloned().unwrap_or_default());
            next = page["files_next"].as_str().map(str::to_owned);
        }
        Ok(Some((first, files)))
    }

    /// `POST /files`: a tus upload in `session`, declaring the whole
    /// file's SHA-256; its absolute URL.
    pub async fn create_upload(
        &self,
        session: &str,
        name: &str,
        size: u64,
        sha256_hex: &str,
        sink: &dyn ProgressSink,
    ) -> Result<Url, Failure> {
        let url = self.url("files")?;
        let meta = crate::tus_headers::encode_metadata([
            ("session", session.as_bytes()),
            ("filename", name.as_bytes()),
            ("sha256", sha256_hex.as_bytes()),
        ]);
        let r = self
            .send_retrying(&format!("create the upload of {name}"), sink, |c| {
                c.post(url.clone())
                    .header("tus-resumable", "1.0.0")
                    .header("upload-length", size.to_string())
                    .header("upload-metadata", meta.clone())
            })
            .await?;
        let loc = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Failure::Network("no Location in the creation answer".into()))?;
        self.url(loc)
    }

    /// `HEAD` an upload; `None` when it is gone (404, 410).
    pub async fn head(&self, upload: &Url) -> Result<Option<UploadStatus>, Failure> {
        let r = self
            .send(|c| {
                c.request(Method::HEAD, upload.clone())
                    .header("tus-resumable", "1.0.0")
            })
            .await;
        let r = match r {
            Ok(r) => r,
            Err(f) if matches!(f.status().map(|s| s.as_u16()), Some(404 | 410)) => {
                return Ok(None);
            }
            Err(f) => return Err(f),
        };
        let num = |h: &str| {
            r.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        match (num("upload-offset"), num("upload-length")) {
            (Some(offset), Some(length)) => Ok(Some(UploadStatus { offset, length })),
            _ => Err(Failure::Network(
                "HEAD answer without Upload-Offset/Upload-Length".into(),
            )),
        }
    }

    /// `PATCH` one chunk at `offset` with its SHA-256 in
    /// `Upload-Checksum`; the server's new offset. `sent` counts the bytes
    /// of this chunk handed to the connection so far.
    pub async fn patch(
        &self,
        upload: &Url,
        offset: u64,
        chunk: bytes::Bytes,
        sent: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<u64, Failure> {
        use futures::StreamExt;
        use sha2::Digest;
        use std::sync::atomic::Ordering;
        /// Bytes handed to the connection at a time (progress granularity).
        const PIECE: usize = 256 << 10;
        let sum = format!("sha256 {}", B64.encode(sha2::Sha256::digest(&chunk)));
        let len = chunk.len();
        let r = self
            .send(|c| {
                // The body in pieces, counted as the connection takes them,
                // so that progress moves within a chunk on a slow link.
                sent.store(0, Ordering::Relaxed);
                let counter = std::sync::Arc::clone(sent);
                let pieces: Vec<bytes::Bytes> = (0..len)
                    .step_by(PIECE)
                    .map(|at| chunk.slice(at..(at + PIECE).min(len)))
                    .collect();
                let body = futures::stream::iter(pieces).map(move |b| {
                    counter.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok::<_, std::io::Error>(b)
                });
                c.patch(upload.clone())
                    .header("tus-resumable", "1.0.0")
                    .header("upload-offset", offset.to_string())
                    .header("upload-checksum", sum.clone())
                    .header("content-type", "application/offset+octet-stream")
                    // Set, not chunked: the server needs the length up front.
                    .header("content-length", len.to_string())
                    .body(reqwest::Body::wrap_stream(body))
            })
            .await?;
        r.headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| Failure::Network("PATCH answer without Upload-Offset".into()))
    }

    /// `DELETE` an upload (tus termination); gone already is fine.
    pub async fn terminate(&self, upload: &Url, sink: &dyn ProgressSink) -> Result<(), Failure> {
        match self
            .send_retrying("remove an unfinished upload", sink, |c| {
                c.delete(upload.clone()).header("tus-resumable", "1.0.0")
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(f) if f.status() == Some(StatusCode::NOT_FOUND) => Ok(()),
            Err(f) => Err(f),
        }
    }

    /// `POST /api/v1/studies/{id}/complete`.
    pub async fn complete(&self, session: &str, sink: &dyn ProgressSink) -> Result<Value, Failure> {
        let url = self.url(&format!("api/v1/studies/{session}/complete"))?;
        let r = self
            .send_retrying("complete the study", sink, |c| c.post(url.clone()))
            .await?;
        r.json()
            .await
            .map_err(|e| Failure::Network(format!("completion answer: {e}")))
    }

    /// `DELETE /api/v1/studies/{id}` (abort); gone already is fine.
    pub async fn abort(&self, session: &str, sink: &dyn ProgressSink) -> Result<(), Failure> {
        let url = self.url(&format!("api/v1/studies/{session}"))?;
        match self
            .send_retrying("abort the study session", sink, |c| c.delete(url.clone()))
            .await
        {
            Ok(_) => Ok(()),
            Err(f) if f.status() == Some(StatusCode::NOT_FOUND) => Ok(()),
            Err(f) => Err(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_or_refresh_token() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("0f3a9c"));
        assert!(!looks_like_jwt("a..b"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert!(p.delay(1, None) >= Duration::from_millis(500));
        assert!(p.delay(1, None) <= Duration::from_millis(625));
        assert!(p.delay(3, None) >= Duration::from_secs(2));
        assert!(p.delay(30, None) <= Duration::from_millis(37_500));
        assert!(p.delay(1, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
    }

    #[test]
    fn which_failures_are_retried() {
        let http = |s: u16, code: &str| Failure::Http {
            status: StatusCode::from_u16(s).unwrap_or(StatusCode::IM_A_TEAPOT),
            code: code.into(),
            message: String::new(),
            retry_after: None,
        };
        assert!(Failure::Network("reset".into()).retryable());
        for s in [500, 502, 503, 408, 423, 429] {
            assert!(http(s, "").retryable(), "{s}");
        }
        assert!(http(409, "RELAY_UPLOAD_BUSY").retryable());
        for s in [400, 401, 404, 409, 413, 422, 460, 507] {
            assert!(!http(s, "").retryable(), "{s}");
        }
    }
}

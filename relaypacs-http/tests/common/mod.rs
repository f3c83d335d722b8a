//! Test harness: a real server on a loopback port, users, and a client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod binary;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_http::auth::Role;
use relaypacs_http::config::{DicomWebSinkConfig, SinkConfig};
use relaypacs_http::routes::auth::new_record;
use relaypacs_http::{Config, Server};
use relaypacs_test_peers::Orthanc;
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const PASSWORD: &str = "plum-orbit-Cascade-7731";

pub struct TestServer {
    pub config: Config,
    pub secret: String,
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub http: Client,
}

pub fn secret() -> secrecy::SecretString {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    secrecy::SecretString::from(hex::encode(b))
}

/// A config for tests: loopback port 0, a fresh data folder, no watermark.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        secret: Some(secret()),
        ..Config::default()
    };
    c.http.min_free_bytes = Some(0);
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> Self {
        Self::start_adapted(f, |a| a).await
    }

    pub async fn start_adapted(
        f: impl FnOnce(&mut Config),
        adapt: impl FnOnce(relaypacs_http::Adapters) -> relaypacs_http::Adapters,
    ) -> Self {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut c = test_config(dir.path());
        f(&mut c);
        let secret = c
            .secret
            .as_ref()
            .map(|s| secrecy::ExposeSecret::expose_secret(s).to_string())
            .unwrap_or_default();
        let server = Server::start_with(c.clone(), adapt).await.unwrap();
        let url = format!("http://{}", server.addr());
        Self {
            config: c,
            secret,
            server: Some(server),
            dir,
            url,
            http: Client::builder().build().unwrap(),
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn add_user(&self, name: &str, role: Role) -> String {
        let st = self.server().state();
        let hash = st.hasher().hash(PASSWORD.to_string()).await.unwrap();
        let rec = new_record(name, role, hash);
        let id = rec.id.clone();
        st.users().create(rec).await.unwrap();
        id
    }

    pub async fn login(&self, name: &str) -> Value {
        let r = self.login_response(name, None).await;
        assert_eq!(r.status(), 200, "login of {name}");
        r.json().await.unwrap()
    }

    /// `POST /api/v1/auth/refresh` with `token` in the JSON body; the
    /// response as it is.
    pub async fn refresh(&self, token: &str) -> Response {
        self.http
            .post(format!("{}/api/v1/auth/refresh", self.url))
            .json(&serde_json::json!({"refresh_token": token}))
            .send()
            .await
            .unwrap()
    }

    /// `POST /api/v1/auth/login` as `name` with [`PASSWORD`] and, when
    /// given, the TOTP `code`; the response as it is.
    pub async fn login_response(&self, name: &str, code: Option<String>) -> Response {
        let mut body = serde_json::json!({"username": name, "password": PASSWORD});
        if let Some(c) = code {
            body["totp"] = serde_json::json!(c);
        }
        self.http
            .post(format!("{}/api/v1/auth/login", self.url))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// A new user of `role` and their access token.
    pub async fn user(&self, name: &str, role: Role) -> User {
        let id = self.add_user(name, role).await;
        let t = self.login(name).await;
        User {
            id,
            token: t["access_token"].as_str().unwrap().to_string(),
            refresh: t["refresh_token"].as_str().unwrap().to_string(),
        }
    }

    /// `GET /api/v1/auth/me` with `token` as the bearer.
    pub async fn me(&self, token: &str) -> Response {
        self.http
            .get(format!("{}/api/v1/auth/me", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// `POST` a STOW-RS `body` (multipart/related, boundary `XyZ`) to
    /// `path` as `user`, asking for the DICOM JSON response.
    pub async fn stow(&self, user: &User, path: &str, body: Vec<u8>) -> Response {
        self.req(Method::POST, path, user)
            .header(
                "content-type",
                "multipart/related; type=\"application/dicom\"; boundary=XyZ",
            )
            .header("accept", "application/dicom+json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// `GET /api/v1/studies/{id}` as `user` (200); the study's JSON.
    pub async fn study_json(&self, user: &User, id: &str) -> Value {
        let r = self
            .req(Method::GET, &format!("/api/v1/studies/{id}"), user)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Poll the study every `poll` until `pred` holds; fails naming `what`
    /// and the last state after `timeout`. Returns the study's JSON.
    pub async fn wait_study(
        &self,
        user: &User,
        id: &str,
        what: &str,
        (timeout, poll): (Duration, Duration),
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let v = self.study_json(user, id).await;
            if pred(&v) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "waiting for {what}; study is {v:#}"
            );
            tokio::time::sleep(poll).await;
        }
    }

    pub fn req(&self, method: Method, path: &str, user: &User) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&user.token)
    }

    pub async fn new_study(&self, user: &User) -> String {
        let r = self
            .req(Method::POST, "/api/v1/studies", user)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// tus creation; returns the upload path (`/files/…`).
    pub async fn create_upload(
        &self,
        user: &User,
        study: &str,
        len: u64,
        sha256: Option<&[u8]>,
    ) -> String {
        let r = self.create_upload_raw(user, study, len, sha256).await;
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        r.headers()["location"].to_str().unwrap().to_string()
    }

    pub async fn create_upload_raw(
        &self,
        user: &User,
        study: &str,
        len: u64,
        sha256: Option<&[u8]>,
    ) -> Response {
        let mut meta = format!(
            "filename {},session {}",
            STANDARD.encode("a.dcm"),
            STANDARD.encode(study)
        );
        if let Some(d) = sha256 {
            meta.push_str(&format!(
                ",sha256 {}",
                STANDARD.encode(hex::encode(Sha256::digest(d)))
            ));
        }
        self.req(Method::POST, "/files", user)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", len.to_string())
            .header("upload-metadata", meta)
            .send()
            .await
            .unwrap()
    }

    pub async fn patch(
        &self,
        user: &User,
        upload: &str,
        offset: u64,
        body: Vec<u8>,
        checksum: Option<String>,
    ) -> Response {
        let mut r = self
            .req(Method::PATCH, upload, user)
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream");
        if let Some(c) = checksum {
            r = r.header("upload-checksum", c);
        }
        r.body(body).send().await.unwrap()
    }

    pub async fn head_offset(&self, user: &User, upload: &str) -> u64 {
        tus_offset(self.req(Method::HEAD, upload, user)).await
    }

    /// Upload `data` whole through tus (one PATCH) into `study`.
    pub async fn upload(&self, user: &User, study: &str, data: &[u8]) -> String {
        let up = self
            .create_upload(user, study, data.len() as u64, Some(data))
            .await;
        let r = self
            .patch(user, &up, 0, data.to_vec(), Some(sha256_header(data)))
            .await;
        assert_eq!(r.status(), 204, "{:?}", r.text().await);
        up
    }

    /// Wait (up to 30 s) until `user` has at least `n` notifications.
    pub async fn wait_notifications(&self, user: &User, n: usize) -> Vec<Value> {
        let start = std::time::Instant::now();
        loop {
            // One page (`items`) is enough: tests wait for a few.
            let page = json_of(self.req(Method::GET, "/api/v1/notifications", user)).await;
            let list: Vec<Value> = serde_json::from_value(page["items"].clone()).unwrap();
            if list.len() >= n {
                return list;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "{} of {n} notifications",
                list.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn audit(&self) -> Vec<relaypacs_core::AuditEvent> {
        self.server().state().audit().events().await.unwrap()
    }

    /// Stop the server and start it again on the same data folder (and a
    /// new port), after `f` changed its configuration.
    pub async fn restart(&mut self, f: impl FnOnce(&mut Config)) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        f(&mut self.config);
        let server = Server::start_with(self.config.clone(), |a| a)
            .await
            .unwrap();
        self.url = format!("http://{}", server.addr());
        self.server = Some(server);
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub token: String,
    pub refresh: String,
}

/// The RFC 6238 generator (SHA-1, 6 digits, 30 s) for the base32 `secret`
/// the server gave at enrolment, as an authenticator app holds it.
pub fn totp(secret_b32: &str, account: &str) -> totp_rs::TOTP {
    let secret = totp_rs::Secret::Encoded(secret_b32.to_owned())
        .to_bytes()
        .unwrap();
    totp_rs::TOTP::new(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        30,
        secret,
        Some("RelayPACS".into()),
        account.into(),
    )
    .unwrap()
}

/// Send `req` and read the answer's body as JSON.
pub async fn json_of(req: RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// Send a tus `HEAD` (`req`, addressed and authenticated): 200, and the
/// Upload-Offset it reports.
pub async fn tus_offset(req: RequestBuilder) -> u64 {
    let r = req.header("tus-resumable", "1.0.0").send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["upload-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A STOW-RS request body (boundary `XyZ`) of `parts`, each
/// `application/dicom`.
pub fn stow_body(parts: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n");
        body.extend_from_slice(part);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    body
}

/// A STOW-RS sink into `o` with its user and `password`.
pub fn stow_sink(o: &Orthanc, password: &str) -> SinkConfig {
    SinkConfig::StowRs(DicomWebSinkConfig {
        url: o.dicomweb(),
        user: Some(o.user.clone()),
        password: Some(password.to_owned().into()),
        ..DicomWebSinkConfig::default()
    })
}

/// Deliver to `sink` alone, with fast retries, report polling and rescans
/// for tests.
pub fn fast_outbox(c: &mut Config, sink: SinkConfig) {
    c.sinks = vec![sink];
    c.outbox.base_delay = Duration::from_millis(200);
    c.outbox.max_delay = Duration::from_millis(800);
    c.outbox.report_poll_interval = Duration::from_millis(300);
    c.outbox.rescan_interval = Duration::from_secs(2);
}

pub fn sha256_header(data: &[u8]) -> String {
    format!("sha256 {}", STANDARD.encode(Sha256::digest(data)))
}

pub fn sha1_header(data: &[u8]) -> String {
    use sha1::Digest as _;
    format!("sha1 {}", STANDARD.encode(sha1::Sha1::digest(data)))
}

/// A valid DICOM file of a new study (or of `study`).
pub fn dicom(study: Option<&str>, rows: u16) -> Vec<u8> {
    generate(&DicomSpec {
        study_uid: study.map_or_else(new_uid, str::to_string),
        rows,
        cols: rows,
        ..DicomSpec::default()
    })
    .unwrap()
}

/// SHA-256 of every file under `dir` except the audit trail (which grows
/// with every request) and the state database's files (SQLite's WAL and
/// shared-memory index change with reads: see [`stored_snapshot`]), by
/// relative path.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if rel.starts_with("audit") || rel.ends_with(".lock") || rel.starts_with("state.db") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(rel, hex::encode(Sha256::digest(std::fs::read(&p).unwrap())));
            }
        }
    }
    out
}

/// Everything a server stored under its data folder `dir`: the files (as
/// [`snapshot`]) and every row of the state database's tables, by table
/// and key.
pub async fn stored_snapshot(dir: &Path) -> std::collections::BTreeMap<String, String> {
    use sqlx::Row;
    let mut out = snapshot(dir);
    let url = format!("sqlite://{}", dir.join("state.db").display());
    let db = relaypacs_storage::SqlState::connect(&url, None, &Default::default())
        .await
        .unwrap();
    for (table, cols) in [
        (
            "sessions",
            "id, CAST(version AS TEXT), owner, state, updated_at, head",
        ),
        ("session_files", "session_id || '/' || file_id, body"),
        (
            "chunks",
            "session_id || '/' || file_id || '@' || CAST(chunk_offset AS TEXT), \
             CAST(length AS TEXT) || ' ' || sha256 || ' ' || receipt",
        ),
        (
            "instance_claims",
            "sop_instance_uid, data_set_sha256 || ' ' || study_instance_uid || ' ' || \
             session_id || ' ' || file_id || ' ' || claimed_at",
        ),
        (
            "users",
            "id, username || ' ' || role || ' ' || password_hash || ' ' || \
             COALESCE(totp, '-') || ' ' || COALESCE(totp_pending, '-') || ' ' || \
             CAST(totp_last_step AS TEXT) || ' ' || CAST(disabled AS TEXT) || ' ' || \
             tokens_valid_after",
        ),
        (
            "refresh_families",
            "id, user_id || ' ' || current_hash || ' ' || CAST(last_used AS TEXT) || ' ' || \
             CAST(revoked AS TEXT)",
        ),
        ("refresh_rotated", "token_hash, family_id"),
    ] {
        let rows = sqlx::query(&format!("SELECT {cols} FROM {table}"))
            .fetch_all(db.pool())
            .await
            .unwrap();
        for r in rows {
            let n = r.len();
            let key: String = r.get(0);
            let value: Vec<String> = (1..n).map(|i| r.get::<String, _>(i)).collect();
            out.insert(format!("db:{table}:{key}"), value.join("|"));
        }
    }
    db.close().await;
    out
}

/// The rows `sql` selects from the state database of the data folder
/// `dir`, every column read as text.
pub async fn state_rows(dir: &Path, sql: &str) -> Vec<Vec<String>> {
    use sqlx::Row;
    let url = format!("sqlite://{}", dir.join("state.db").display());
    let db = relaypacs_storage::SqlState::connect(&url, None, &Default::default())
        .await
        .unwrap();
    let rows = sqlx::query(sql).fetch_all(db.pool()).await.unwrap();
    let out = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get::<String, _>(i)).collect())
        .collect();
    db.close().await;
    out
}

pub fn status(r: &Response) -> StatusCode {
    r.status()
}

/// Assert a JSON error body with `code`.
pub async fn expect_error(r: Response, status: u16, code: &str) -> Value {
    let s = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.text().await.unwrap();
    assert_eq!(s, status, "body: {body}");
    assert_eq!(ct.as_deref(), Some("application/json"), "body: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], code, "body: {body}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    v
}

//! A table of malformed requests (headers, offsets, lengths, checksums,
//! metadata, JSON, multipart boundaries, tokens, paths): every one gets a
//! 4xx with a JSON error body naming the problem, none a 5xx, and nothing
//! already stored changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use relaypacs_http::auth::Role;
use reqwest::Method;

struct Case {
    name: String,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    auth: bool,
}

fn case(name: impl Into<String>, method: Method, path: impl Into<String>) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.into(),
        headers: Vec::new(),
        body: Vec::new(),
        auth: true,
    }
}

impl Case {
    fn h(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    fn anon(mut self) -> Self {
        self.auth = false;
        self
    }
    fn tus(self) -> Self {
        self.h("tus-resumable", "1.0.0")
    }
}

fn cases(study: &str, up: &str, offset: u64) -> Vec<Case> {
    let mut v = Vec::new();
    let meta_ok = format!(
        "filename {},session {}",
        STANDARD.encode("a.dcm"),
        STANDARD.encode(study)
    );
    // Creation headers.
    // (Leading/trailing blanks are not listed: HTTP strips them, so " 5"
    // is the valid value 5.)
    for len in [
        "",
        "-1",
        "abc",
        "1e3",
        "5 5",
        "+5",
        "0x10",
        "99999999999999999999999",
        "1.5",
        "１２",
    ] {
        v.push(
            case(format!("Upload-Length {len:?}"), Method::POST, "/files")
                .tus()
                .h("upload-length", len)
                .h("upload-metadata", meta_ok.clone()),
        );
    }
    v.push(
        case("no Upload-Length", Method::POST, "/files")
            .tus()
            .h("upload-metadata", meta_ok.clone()),
    );
    v.push(
        case("Upload-Defer-Length", Method::POST, "/files")
            .tus()
            .h("upload-defer-length", "1")
            .h("upload-metadata", meta_ok.clone()),
    );
    v.push(
        case("Upload-Length over max", Method::POST, "/files")
            .tus()
            .h("upload-length", (3u64 << 30).to_string())
            .h("upload-metadata", meta_ok.clone()),
    );
    for tv in ["", "0.2.2", "1.0", "1.0.0.0", "2.0.0"] {
        v.push(
            case(format!("Tus-Resumable {tv:?}"), Method::POST, "/files")
                .h("tus-resumable", tv)
                .h("upload-length", "100")
                .h("upload-metadata", meta_ok.clone()),
        );
    }
    v.push(
        case("no Tus-Resumable", Method::POST, "/files")
            .h("upload-length", "100")
            .h("upload-metadata", meta_ok.clone()),
    );
    let e = |s: &str| STANDARD.encode(s);
    let metas = vec![
        String::new(),
        "filename".into(),
        format!("filename {}", e("a.dcm")),
        format!("session {}", e("not-a-session")),
        format!("session {}", e("../../etc/passwd")),
        format!("session {}", e(&study.to_uppercase())),
        format!("session {}", e("0123456789abcdef0123456789abcdef")),
        format!("session !!!notbase64"),
        format!("session {},session {}", e(study), e(study)),
        format!("session {},sha256 {}", e(study), e("nothex")),
        format!("session {},sha256 {}", e(study), e(&"ab".repeat(31))),
        format!("session {},filename {}", e(study), e("bad\nname")),
        format!("session {},filename {}", e(study), e(&"n".repeat(300))),
        format!(
            "session {},filename {}",
            e(study),
            STANDARD.encode([0xff, 0xfe])
        ),
        format!("{} {}", "k".repeat(100), e("v")),
        format!("session {}", STANDARD.encode([0xc3, 0x28])),
        ",,,".into(),
        format!("se ssion {}", e(study)),
    ];
    for m in metas {
        v.push(
            case(format!("Upload-Metadata {m:?}"), Method::POST, "/files")
                .tus()
                .h("upload-length", "1000")
                .h("upload-metadata", m),
        );
    }
    // Upload ids.
    let ids = [
        "x".to_string(),
        "../../etc/passwd".into(),
        "0".repeat(63),
        "g".repeat(64),
        "0".repeat(65),
        "%2e%2e%2fsecret".into(),
        format!("{}{}", study, "z".repeat(32)),
        format!("{}{}", "0".repeat(32), &up[39..]),
        "é".repeat(32),
        up[7..].to_uppercase(),
    ];
    for id in &ids {
        for m in [Method::HEAD, Method::DELETE] {
            v.push(case(format!("{m} id {id:?}"), m, format!("/files/{id}")).tus());
        }
        v.push(
            case(
                format!("PATCH id {id:?}"),
                Method::PATCH,
                format!("/files/{id}"),
            )
            .tus()
            .h("upload-offset", "0")
            .h("content-type", "application/offset+octet-stream")
            .body(vec![0u8; 70000]),
        );
    }
    // PATCH headers on the real upload.
    let patch = |name: String| {
        case(name, Method::PATCH, up.to_string())
            .tus()
            .h("content-type", "application/offset+octet-stream")
    };
    for off in [
        "",
        "-1",
        "abc",
        "1e3",
        " 0",
        "0x0",
        "99999999999999999999999",
        "+0",
        "0.0",
    ] {
        v.push(
            patch(format!("Upload-Offset {off:?}"))
                .h("upload-offset", off)
                .body(vec![0u8; 70000]),
        );
    }
    for off in [0, offset - 1, offset + 1, offset + 65536, u64::MAX / 2] {
        v.push(
            patch(format!("wrong offset {off}"))
                .h("upload-offset", off.to_string())
                .body(vec![0u8; 70000]),
        );
    }
    v.push(
        case("PATCH without offset", Method::PATCH, up.to_string())
            .tus()
            .h("content-type", "application/offset+octet-stream")
            .body(vec![0u8; 70000]),
    );
    for ct in [
        "",
        "application/octet-stream",
        "application/offset+octet-stream; x=1",
        "text/plain",
        "application/json",
    ] {
        v.push(
            case(
                format!("PATCH content-type {ct:?}"),
                Method::PATCH,
                up.to_string(),
            )
            .tus()
            .h("upload-offset", offset.to_string())
            .h("content-type", ct)
            .body(vec![0u8; 70000]),
        );
    }
    v.push(
        patch("PATCH no Tus-Resumable".into())
            .h("tus-resumable", "")
            .h("upload-offset", offset.to_string())
            .body(vec![0u8; 70000]),
    );
    v.push(
        patch("PATCH body too small".into())
            .h("upload-offset", offset.to_string())
            .body(vec![0u8; 100]),
    );
    v.push(
        patch("PATCH beyond Upload-Length".into())
            .h("upload-offset", offset.to_string())
            .body(vec![0u8; 2 << 20]),
    );
    let body = vec![9u8; 70000];
    let checksums = vec![
        "sha256".to_string(),
        "sha256 ".into(),
        "sha256 !!!".into(),
        "sha256 AAAA".into(),
        format!("sha256 {}", STANDARD.encode([0u8; 31])),
        format!("sha256 {}", STANDARD.encode([0u8; 32])),
        format!("sha1 {}", STANDARD.encode([0u8; 20])),
        format!("sha1 {}", STANDARD.encode([0u8; 19])),
        format!("md5 {}", STANDARD.encode([0u8; 16])),
        format!("crc32 {}", STANDARD.encode([0u8; 4])),
        format!("SHA256 {}", STANDARD.encode([0u8; 32])),
        format!("sha256  {}", STANDARD.encode([0u8; 32])),
        sha256_header(b"other bytes"),
        sha1_header(b"other bytes"),
    ];
    for c in checksums {
        v.push(
            patch(format!("Upload-Checksum {c:?}"))
                .h("upload-offset", offset.to_string())
                .h("upload-checksum", c)
                .body(body.clone()),
        );
    }
    v.push(
        patch("duplicate Upload-Offset".into())
            .h("upload-offset", offset.to_string())
            .h("upload-offset", offset.to_string())
            .body(body.clone()),
    );
    v.push(
        patch("Content-Encoding gzip".into())
            .h("upload-offset", offset.to_string())
            .h("content-encoding", "gzip")
            .body(body.clone()),
    );
    // Tokens.
    let tokens = [
        "Bearer".to_string(),
        "Bearer ".into(),
        "Basic YWxpY2U6c2VjcmV0".into(),
        "Bearer a.b.c".into(),
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.".into(),
        "Bearer  ".into(),
        format!("Bearer {}", "x".repeat(5000)),
        "Token abc".into(),
        "Bearer \u{7f}".into(),
        "bearer".into(),
    ];
    for (i, tok) in tokens.iter().enumerate() {
        for (m, p) in [
            (Method::GET, "/api/v1/studies".to_string()),
            (Method::POST, "/api/v1/studies".into()),
            (Method::HEAD, up.to_string()),
            (Method::GET, "/api/v1/events".into()),
            (Method::POST, "/dicomweb/studies".into()),
        ] {
            v.push(
                case(format!("token #{i} {m} {p}"), m, p)
                    .anon()
                    .tus()
                    .h("authorization", tok.clone()),
            );
        }
    }
    for (m, p) in [
        (Method::GET, "/api/v1/studies"),
        (Method::POST, "/files"),
        (Method::GET, "/api/v1/notifications"),
        (Method::GET, "/api/v1/audit"),
        (Method::POST, "/api/v1/auth/logout"),
    ] {
        v.push(case(format!("no token {m} {p}"), m, p).anon().tus());
    }
    // Credentials in URLs.
    for q in [
        "token=abc",
        "access_token=abc",
        "TOKEN=abc&x=1",
        "x=1&jwt=abc",
        "refresh_token=r",
        "password=p",
    ] {
        v.push(case(
            format!("query {q}"),
            Method::GET,
            format!("/api/v1/studies?{q}"),
        ));
    }
    v.push(
        case(
            "events with bad ticket",
            Method::GET,
            "/api/v1/events?ticket=nope",
        )
        .anon(),
    );
    v.push(case(
        "events with unknown query",
        Method::GET,
        "/api/v1/events?foo=bar",
    ));
    // JSON bodies.
    let json_bodies: Vec<&[u8]> = vec![
        b"",
        b"{",
        b"null",
        b"[]",
        b"\"x\"",
        b"{}",
        b"{\"username\":1,\"password\":2}",
        b"{\"username\":\"a\"}",
        b"{\"username\":\"a\",\"password\":\"b\",\"extra\":1}",
        b"{\"username\":\"a\",\"password\":\"b\",\"totp\":123}",
        b"\xff\xfe\x00",
        b"{\"username\":\"\",\"password\":\"\"}",
    ];
    for b in &json_bodies {
        v.push(
            case(
                format!("login body {:?}", String::from_utf8_lossy(b)),
                Method::POST,
                "/api/v1/auth/login",
            )
            .anon()
            .h("content-type", "application/json")
            .body(b.to_vec()),
        );
        v.push(
            case(
                format!("refresh body {:?}", String::from_utf8_lossy(b)),
                Method::POST,
                "/api/v1/auth/refresh",
            )
            .anon()
            .h("content-type", "application/json")
            .body(b.to_vec()),
        );
    }
    v.push(
        case(
            "login without content-type",
            Method::POST,
            "/api/v1/auth/login",
        )
        .anon()
        .body(b"{\"username\":\"a\",\"password\":\"b\"}".to_vec()),
    );
    v.push(
        case("login text/plain", Method::POST, "/api/v1/auth/login")
            .anon()
            .h("content-type", "text/plain")
            .body(b"{}".to_vec()),
    );
    v.push(
        case("login huge body", Method::POST, "/api/v1/auth/login")
            .anon()
            .h("content-type", "application/json")
            .body(vec![b' '; 100_000]),
    );
    for b in [
        &b"{"[..],
        b"[]",
        b"{\"allow_multiple_studies\":\"yes\"}",
        b"{\"x\":1}",
        b"\xff",
    ] {
        v.push(
            case(
                format!("study body {:?}", String::from_utf8_lossy(b)),
                Method::POST,
                "/api/v1/studies",
            )
            .h("content-type", "application/json")
            .body(b.to_vec()),
        );
    }
    for b in [
        &b"{}"[..],
        b"{\"username\":\"u\",\"password\":\"p\",\"role\":\"admin\"}",
        b"{\"current\":1}",
    ] {
        v.push(
            case(
                format!("password body {:?}", String::from_utf8_lossy(b)),
                Method::POST,
                "/api/v1/auth/password",
            )
            .h("content-type", "application/json")
            .body(b.to_vec()),
        );
        v.push(
            case(
                format!("users body (not admin) {:?}", String::from_utf8_lossy(b)),
                Method::POST,
                "/api/v1/users",
            )
            .h("content-type", "application/json")
            .body(b.to_vec()),
        );
        v.push(
            case(
                format!("totp confirm body {:?}", String::from_utf8_lossy(b)),
                Method::POST,
                "/api/v1/auth/totp/confirm",
            )
            .h("content-type", "application/json")
            .body(b.to_vec()),
        );
    }
    // Study paths.
    for id in [
        "x",
        "../x",
        &"0".repeat(32),
        &"G".repeat(32),
        &study.to_uppercase(),
        "%00",
        &"a".repeat(1000),
    ] {
        v.push(case(
            format!("GET study {id:?}"),
            Method::GET,
            format!("/api/v1/studies/{id}"),
        ));
        v.push(case(
            format!("complete study {id:?}"),
            Method::POST,
            format!("/api/v1/studies/{id}/complete"),
        ));
        v.push(case(
            format!("delete study {id:?}"),
            Method::DELETE,
            format!("/api/v1/studies/{id}"),
        ));
        v.push(case(
            format!("read notification {id:?}"),
            Method::POST,
            format!("/api/v1/notifications/{id}/read"),
        ));
    }
    v.push(case(
        "complete with an unfinished upload",
        Method::POST,
        format!("/api/v1/studies/{study}/complete"),
    ));
    // Multipart.
    let stow_ct = |b: &str| format!("multipart/related; type=\"application/dicom\"; boundary={b}");
    let mp: Vec<(String, String, Vec<u8>)> = vec![
        (
            "no content-type".into(),
            String::new(),
            b"--B\r\n\r\nx\r\n--B--".to_vec(),
        ),
        (
            "multipart/form-data".into(),
            "multipart/form-data; boundary=B".into(),
            b"--B\r\n\r\nx\r\n--B--".to_vec(),
        ),
        (
            "no boundary".into(),
            "multipart/related; type=\"application/dicom\"".into(),
            b"--B\r\n\r\nx\r\n--B--".to_vec(),
        ),
        (
            "empty boundary".into(),
            stow_ct("\"\""),
            b"--\r\n\r\nx".to_vec(),
        ),
        (
            "long boundary".into(),
            stow_ct(&"b".repeat(100)),
            b"x".to_vec(),
        ),
        (
            "type xml".into(),
            "multipart/related; type=\"application/dicom+xml\"; boundary=B".into(),
            b"--B\r\n\r\n<x/>\r\n--B--".to_vec(),
        ),
        ("no parts".into(), stow_ct("B"), b"--B--\r\n".to_vec()),
        ("empty body".into(), stow_ct("B"), Vec::new()),
        (
            "wrong boundary in body".into(),
            stow_ct("B"),
            b"--C\r\nContent-Type: application/dicom\r\n\r\nx\r\n--C--\r\n".to_vec(),
        ),
        (
            "unterminated".into(),
            stow_ct("B"),
            b"--B\r\nContent-Type: application/dicom\r\n\r\nxxxx".to_vec(),
        ),
        ("garbage".into(), stow_ct("B"), vec![0u8; 1000]),
        (
            "header without colon".into(),
            stow_ct("B"),
            b"--B\r\nnot a header\r\n\r\nx\r\n--B--\r\n".to_vec(),
        ),
        (
            "part not dicom".into(),
            stow_ct("B"),
            b"--B\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--B--\r\n".to_vec(),
        ),
        (
            "part text/plain".into(),
            stow_ct("B"),
            b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n--B--\r\n".to_vec(),
        ),
        (
            "application/dicom single".into(),
            "application/dicom".into(),
            b"DICM".to_vec(),
        ),
        ("gzip".into(), stow_ct("B"), b"\x1f\x8b".to_vec()),
    ];
    for (name, ct, body) in mp {
        let mut c = case(format!("STOW {name}"), Method::POST, "/dicomweb/studies").body(body);
        if !ct.is_empty() {
            c = c.h("content-type", ct);
        }
        if name == "gzip" {
            c = c.h("content-encoding", "gzip");
        }
        v.push(c);
    }
    v.push(
        case(
            "STOW bad study uid",
            Method::POST,
            "/dicomweb/studies/not..a..uid",
        )
        .h("content-type", stow_ct("B"))
        .body(b"--B--".to_vec()),
    );
    v.push(
        case(
            "STOW study uid with letters",
            Method::POST,
            "/dicomweb/studies/1.2.abc",
        )
        .h("content-type", stow_ct("B"))
        .body(b"--B--".to_vec()),
    );
    // Methods and routes.
    for (m, p) in [
        (Method::PUT, "/files"),
        (Method::GET, "/files"),
        (Method::PUT, "/api/v1/studies"),
        (Method::TRACE, "/api/v1/studies"),
        (Method::GET, "/api/v2/studies"),
        (Method::GET, "/.env"),
        (Method::GET, "/files/../../etc/passwd"),
        (Method::PATCH, "/api/v1/auth/login"),
    ] {
        v.push(case(format!("{m} {p}"), m, p));
    }
    v
}

#[tokio::test]
async fn malformed_requests_get_4xx_json_and_change_nothing() {
    let t = TestServer::start().await;
    let u = t.user("mallory", Role::Uploader).await;
    let study = t.new_study(&u).await;
    let data = dicom(None, 300);
    let up = t
        .create_upload(&u, &study, data.len() as u64, Some(&data))
        .await;
    let first = 65536usize;
    assert_eq!(
        t.patch(
            &u,
            &up,
            0,
            data[..first].to_vec(),
            Some(sha256_header(&data[..first]))
        )
        .await
        .status(),
        204
    );
    let before = stored_snapshot(&t.data()).await;
    let all = cases(&study, &up, first as u64);
    assert!(all.len() >= 200, "only {} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        let mut rb = t
            .http
            .request(c.method.clone(), format!("{}{}", t.url, c.path));
        if c.auth {
            rb = rb.bearer_auth(&u.token);
        }
        for (k, v) in &c.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        let r = match rb.body(c.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => {
                // Only the HTTP parser itself may refuse a request this bad
                // (e.g. a control byte in a header value never leaves reqwest).
                assert!(e.is_builder() || e.is_request(), "{}: {e}", c.name);
                continue;
            }
        };
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let body = r.text().await.unwrap_or_default();
        // STOW-RS answers a request whose every part failed with 409 and
        // the DICOM JSON response listing the failures (PS3.18 §10.5.3).
        let stow_failure = status == 409
            && ct.as_deref() == Some("application/dicom+json")
            && serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|v| v["00081198"]["Value"][0]["00081197"].is_object());
        let json_ok = c.method == Method::HEAD
            || stow_failure
            || (ct.as_deref() == Some("application/json")
                && serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                    v["error"]["code"].is_string() && v["error"]["message"].is_string()
                }));
        if !(400..500).contains(&status) || !json_ok {
            failures.push(format!("{}: {status} {ct:?} {body}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
    let after = stored_snapshot(&t.data()).await;
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    let added: Vec<_> = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .cloned()
        .collect();
    assert!(
        changed.is_empty() && added.is_empty(),
        "stored data changed: {changed:?} added: {added:?}"
    );
    // The upload is intact and completes.
    assert_eq!(t.head_offset(&u, &up).await, first as u64);
    let r = t
        .patch(&u, &up, first as u64, data[first..].to_vec(), None)
        .await;
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    println!(
        "{} malformed requests: all 4xx with JSON, nothing changed",
        all.len()
    );
    t.stop().await;
}

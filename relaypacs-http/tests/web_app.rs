//! The web app served at `/`: the page, its assets with their media types,
//! the page's CSP, ETag revalidation; other paths keep the API's JSON 404.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

#[tokio::test]
async fn page_and_assets_are_served_with_the_page_csp() {
    let t = TestServer::start().await;
    let get = |p: &str| t.http.get(format!("{}{p}", t.url)).send();
    let r = get("/").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.headers()[CACHE_CONTROL], "no-cache");
    let csp = r.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(csp, relaypacs_http::routes::web::PAGE_CSP);
    for d in [
        "script-src 'self' 'wasm-unsafe-eval'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ] {
        assert!(csp.contains(d), "{d} missing in {csp}");
    }
    assert!(!csp.contains("unsafe-inline"));
    let page = r.text().await.unwrap();
    // No inline script or style, no handler attributes: the CSP would block them.
    assert!(!page.contains("<script>") && !page.contains("<style") && !page.contains(" onclick="));
    assert!(page.contains("app.js"));
    assert_eq!(
        get("/index.html").await.unwrap().text().await.unwrap(),
        page
    );
    for (path, ct) in [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/manifest.webmanifest", "application/manifest+json"),
        ("/sw.js", "text/javascript; charset=utf-8"),
        (
            "/vendor/tus-js-client/tus.min.js",
            "text/javascript; charset=utf-8",
        ),
        ("/vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    ] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()[CONTENT_TYPE], ct, "{path}");
        assert!(r.headers().contains_key(CONTENT_SECURITY_POLICY), "{path}");
    }
    // The vendored file is the registry's, byte for byte.
    let tus = get("/vendor/tus-js-client/tus.min.js")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let on_disk = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/web/vendor/tus-js-client/tus.min.js"
    ))
    .unwrap();
    assert_eq!(tus.as_ref(), on_disk.as_slice());
    // ETag revalidation: 304 with no body while unchanged.
    let r = get("/app.js").await.unwrap();
    let etag = r.headers()[ETAG].to_str().unwrap().to_string();
    let r = t
        .http
        .get(format!("{}/app.js", t.url))
        .header(IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = t
        .http
        .get(format!("{}/app.js", t.url))
        .header(IF_NONE_MATCH, "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The API keeps its own CSP and no-store.
    let r = get("/healthz").await.unwrap();
    assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
    assert!(
        r.headers()[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    // Unknown paths, and paths outside the embedded set, stay JSON 404s.
    for p in [
        "/nope",
        "/api/v1/nope",
        "/vendor/../Cargo.toml",
        "/web/index.html",
        "/vendor/",
    ] {
        let r = get(p).await.unwrap();
        assert_eq!(r.status(), 404, "{p}");
        assert!(
            r.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{p}"
        );
    }
    // Only GET/HEAD.
    let r = t.http.post(format!("{}/", t.url)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = t
        .http
        .head(format!("{}/app.js", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

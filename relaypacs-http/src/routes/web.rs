//! The web app (`relaypacs-http/web/`), embedded in the binary and served
//! at `/`: the page, its modules, styles, icons, manifest, service worker
//! and vendored libraries (see `web/vendor/VERSIONS.md`).
//!
//! Only the embedded paths are routes (each one `GET`/`HEAD`), so every
//! other path keeps the API's JSON 404. Answers carry the page's own
//! Content-Security-Policy ([`PAGE_CSP`]: no inline script or style,
//! nothing from elsewhere), `X-Content-Type-Options: nosniff`, a strong
//! `ETag` (the file's SHA-256) and `Cache-Control: no-cache`, so a browser
//! revalidates each asset and gets `304 Not Modified` while it is unchanged.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

/// The embedded folder.
#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

/// The Content-Security-Policy of the page and its assets: scripts,
/// styles, frames and connections from this origin only (WebAssembly
/// compilation allowed for the SHA-256 of hash-wasm; blob: frames for
/// reports fetched with the token).
pub const PAGE_CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; \
style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; frame-src 'self' blob:; \
object-src 'none'; worker-src 'self'; manifest-src 'self'; base-uri 'none'; \
frame-ancestors 'none'; form-action 'self'";

/// A response extension telling the edge that this answer sets its own
/// `Cache-Control` (the API's `no-store` is not forced on it).
#[derive(Debug, Clone, Copy)]
pub struct OwnCacheControl;

/// The media type of an embedded file, by its extension (`None`: not
/// served).
pub fn content_type(path: &str) -> Option<&'static str> {
    let ext = path.rsplit_once('.').map(|(_, e)| e)?;
    Some(match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "md" | "txt" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

/// The embedded paths that are served (those with a known media type;
/// `LICENSE` files are served as text).
fn served_paths() -> Vec<String> {
    Assets::iter()
        .map(|p| p.into_owned())
        .filter(|p| content_type(p).is_some() || p.ends_with("LICENSE"))
        .collect()
}

/// The routes of the web app: `/`, `/index.html` and every embedded file.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new()
        .route("/", axum::routing::get(asset))
        .route("/index.html", axum::routing::get(asset));
    for p in served_paths() {
        if p != "index.html" {
            r = r.route(&format!("/{p}"), axum::routing::get(asset));
        }
    }
    r
}

/// `GET` (or `HEAD`) of `/` or of an embedded file.
async fn asset(req: Request) -> Response {
    let path = match req.uri().path() {
        "/" => "index.html",
        p => p.trim_start_matches('/'),
    };
    let Some(file) = Assets::get(path) else {
        return crate::error::ApiError::new(
            StatusCode::NOT_FOUND,
            "RELAY_NOT_FOUND",
            "no such route",
        )
        .into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut res = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let ct = content_type(path).unwrap_or("text/plain; charset=utf-8");
        let mut r = file.data.into_owned().into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The service worker controls the whole origin (its default scope
    // would be `/` anyway; said explicitly).
    if path == "sw.js" {
        h.insert("service-worker-allowed", HeaderValue::from_static("/"));
    }
    res.extensions_mut().insert(OwnCacheControl);
    res
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn known_types_and_the_page_is_embedded() {
        assert_eq!(
            content_type("a/b.webmanifest"),
            Some("application/manifest+json")
        );
        assert_eq!(content_type("x.wasm"), Some("application/wasm"));
        assert_eq!(content_type("x.exe"), None);
        assert_eq!(content_type("noext"), None);
        let paths = served_paths();
        assert!(paths.iter().any(|p| p == "index.html"));
        assert!(paths.iter().any(|p| p == "vendor/tus-js-client/tus.min.js"));
    }
}

//! The edge: connection handling with header-read and body-idle timeouts
//! (hyper directly, because `axum::serve` sets no header-read timeout),
//! security headers, CORS, request ids, logs, metrics, and JSON for every
//! error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::config::HttpConfig;
use crate::error::ApiError;
use crate::state::AppState;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Query parameters that would carry a credential in a URL.
const CREDENTIAL_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "jwt",
    "auth",
    "authorization",
    "password",
    "apikey",
    "api_key",
];

/// Refuses credentials in URLs, compressed request bodies, and bodies
/// whose declared length exceeds what the route accepts (answered before
/// a byte of the body is read).
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared {
        let path = req.uri().path();
        let limit = if path.starts_with("/files") {
            state.config().http.max_upload_size
        } else if path.starts_with("/dicomweb/") {
            state.config().limits.max_session_size
        } else {
            state.config().http.max_json_body as u64
        };
        if n > limit {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RELAY_BODY_TOO_LARGE",
                format!("the request body may have at most {limit} bytes"),
            )
            .into_response();
        }
    }
    if let Some(q) = req.uri().query() {
        for pair in q.split('&') {
            let key = pair.split('=').next().unwrap_or("");
            let key = key.to_ascii_lowercase();
            if CREDENTIAL_PARAMS.contains(&key.as_str()) {
                return ApiError::bad_request(
                    "RELAY_CREDENTIAL_IN_URL",
                    "credentials must never travel in a URL; use the Authorization header",
                )
                .into_response();
            }
        }
    }
    if let Some(enc) = req.headers().get(header::CONTENT_ENCODING)
        && enc.as_bytes() != b"identity"
    {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "RELAY_CONTENT_ENCODING",
            "compressed request bodies are not accepted",
        )
        .into_response();
    }
    next.run(req).await
}

/// Counts requests, measures latency, logs, and makes sure every error
/// answer has a JSON body.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().to_string();
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut res = next.run(req).await;
    let status = res.status();
    let is_json = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(b"application/json")
            || v.as_bytes().starts_with(b"application/dicom+json")
    });
    if (status.is_client_error() || status.is_server_error()) && !is_json && method != "HEAD" {
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "RELAY_BODY_TOO_LARGE",
            StatusCode::REQUEST_TIMEOUT => "RELAY_TIMEOUT",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "RELAY_UNSUPPORTED_MEDIA_TYPE",
            StatusCode::METHOD_NOT_ALLOWED => "RELAY_METHOD_NOT_ALLOWED",
            StatusCode::NOT_FOUND => "RELAY_NOT_FOUND",
            s if s.is_server_error() => "RELAY_INTERNAL",
            _ => "RELAY_BAD_REQUEST",
        };
        let message = status.canonical_reason().unwrap_or("error").to_string();
        let headers = res.headers().clone();
        res = (status, ApiError::body_json(code, &message)).into_response();
        for (k, v) in &headers {
            if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
                res.headers_mut().insert(k.clone(), v.clone());
            }
        }
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let elapsed = started.elapsed();
    let label = crate::metrics::RouteLabel {
        route: route.clone(),
        method: method.clone(),
        status: status.as_u16(),
    };
    state.metrics().requests.get_or_create(&label).inc();
    state
        .metrics()
        .latency
        .get_or_create(&label)
        .observe(elapsed.as_secs_f64());
    // Route templates only: no concrete ids, no query strings, no patient data.
    tracing::info!(
        request_id,
        method,
        route,
        status = status.as_u16(),
        ms = elapsed.as_millis() as u64,
        "request"
    );
    res
}

/// The router with every edge layer.
pub fn app(state: AppState) -> Router {
    let cfg = state.config().http.clone();
    let mut router = crate::routes::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    if !cfg.cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = cfg
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PATCH,
                Method::HEAD,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("tus-resumable"),
                HeaderName::from_static("upload-length"),
                HeaderName::from_static("upload-offset"),
                HeaderName::from_static("upload-metadata"),
                HeaderName::from_static("upload-checksum"),
                REQUEST_ID,
            ])
            .expose_headers([
                header::LOCATION,
                HeaderName::from_static("upload-offset"),
                HeaderName::from_static("upload-length"),
                HeaderName::from_static("upload-expires"),
                HeaderName::from_static("tus-resumable"),
                HeaderName::from_static("tus-version"),
                HeaderName::from_static("tus-extension"),
                HeaderName::from_static("tus-max-size"),
                REQUEST_ID,
            ])
            .max_age(Duration::from_secs(600));
        router = router.layer(cors);
    }
    let csp = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";
    router = router
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(csp),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        // Everything here may carry patient data or tokens: never cached
        // (overrides the event stream's "no-cache").
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    if cfg.hsts {
        router = router.layer(SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        ));
    }
    router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// Serve `app` on `listener` until `shutdown` resolves: HTTP/1.1 with the
/// header-read timeout, header limits, a per-read body idle timeout and a
/// connection cap. In-flight requests finish before this returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(cfg.header_read_timeout_secs))
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(cfg.max_headers)
        .keep_alive(true);
    let body_idle = Duration::from_secs(cfg.body_idle_timeout_secs);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Accept errors (EMFILE, aborted handshakes) are transient.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = tower::ServiceBuilder::new()
            .layer(RequestBodyTimeoutLayer::new(body_idle))
            .service(app.clone())
            .map_request(move |mut req: axum::http::Request<_>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            });
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("shutdown: connections still open after 10 s");
        }
    }
    Ok(())
}

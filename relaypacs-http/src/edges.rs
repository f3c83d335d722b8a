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
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
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
        .map(|m| m.as_str().to_owned());
    let method = req.method().clone();
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
    if (status.is_client_error() || status.is_server_error()) && !is_json && method != Method::HEAD
    {
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
    state
        .metrics()
        .request(route.as_deref(), &method, status, elapsed.as_secs_f64());
    // Route templates only: no concrete ids, no query strings, no patient
    // data; the method as its metrics label (a client's own method text is
    // neither kept nor logged).
    tracing::info!(
        request_id,
        method = crate::metrics::method_label(&method),
        route = route.as_deref().unwrap_or(crate::metrics::UNMATCHED_ROUTE),
        status = status.as_u16(),
        ms = elapsed.as_millis() as u64,
        "request"
    );
    res
}

/// Who may read `/metrics` on one listener (see `[metrics]` in
/// [`crate::config::MetricsConfig`]).
#[derive(Clone, Debug)]
enum MetricsAccess {
    /// Served on another listener: 404 here.
    Elsewhere,
    /// Anyone who reaches the listener (only a loopback metrics listener
    /// configured with `require_token = false`).
    Open,
    /// `Authorization: Bearer <token>`; the SHA-256 of the token.
    Token([u8; 32]),
    /// The token could not be read or created: nobody (fail closed).
    Unavailable,
}

impl MetricsAccess {
    /// The access on a listener that serves `/metrics`.
    fn serving(state: &AppState) -> Self {
        match state.config().resolve_metrics_token() {
            Ok(Some(t)) => Self::Token(Sha256::digest(t.expose_secret().as_bytes()).into()),
            Ok(None) => Self::Open,
            Err(e) => {
                tracing::error!(error = %e, "metrics token unavailable; /metrics refuses every request");
                Self::Unavailable
            }
        }
    }

    /// The access on the main listener.
    fn main(state: &AppState) -> Self {
        if state.config().metrics.listen.is_some() {
            Self::Elsewhere
        } else {
            Self::serving(state)
        }
    }
}

/// Equality of two digests in time independent of where they differ (the
/// token is hashed first, so neither its length nor its bytes leak).
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Applies [`MetricsAccess`] to `/metrics`; other paths pass.
async fn metrics_gate(
    State(access): State<Arc<MetricsAccess>>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() != "/metrics" {
        return next.run(req).await;
    }
    match &*access {
        MetricsAccess::Open => next.run(req).await,
        MetricsAccess::Elsewhere => {
            ApiError::new(StatusCode::NOT_FOUND, "RELAY_NOT_FOUND", "no such route").into_response()
        }
        MetricsAccess::Unavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "RELAY_METRICS_UNAVAILABLE",
            "the metrics token could not be read",
        )
        .into_response(),
        MetricsAccess::Token(want) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| Sha256::digest(t.trim().as_bytes()));
            match given {
                Some(d) if same_digest(&d.into(), want) => next.run(req).await,
                _ => ApiError::unauthorized(
                    "RELAY_UNAUTHENTICATED",
                    "/metrics needs Authorization: Bearer <metrics token>",
                )
                .into_response(),
            }
        }
    }
}

/// `GET /metrics` on the separate metrics listener.
async fn metrics_text(State(state): State<AppState>) -> Response {
    let mut r = state.metrics().render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

/// The router of the separate metrics listener (`[metrics] listen`):
/// `/metrics` only, behind the token unless `require_token = false`.
pub fn metrics_app(state: AppState) -> Router {
    let access = Arc::new(MetricsAccess::serving(&state));
    Router::new()
        .route("/metrics", axum::routing::get(metrics_text))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "RELAY_NOT_FOUND", "no such route")
        })
        .layer(axum::middleware::from_fn_with_state(access, metrics_gate))
        .with_state(state)
}

/// Bind `addr` with a listen queue of `backlog` connections (the kernel
/// caps it at `net.core.somaxconn`). `tokio::net::TcpListener::bind` leaves
/// a queue of 128 (measured: `a_burst_of_connections_waits_in_the_listen_queue`
/// in `tests/slow_body.rs`); a burst of reconnecting clients larger than the
/// queue makes the kernel drop new connection attempts, a health check's
/// among them, and a dropped attempt is retried only after 1 s.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does on Unix: a restarted server can bind
    // while the last run's connections are in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Prepare `/metrics`: resolve its token (creating the token file on
/// first start) and, when `[metrics] listen` is set, bind that address.
/// `Some` is the separate listener and its router, for
/// [`serve_with_metrics`].
pub async fn bind_metrics(
    state: &AppState,
) -> Result<Option<(TcpListener, Router)>, crate::StartError> {
    state.config().resolve_metrics_token()?;
    let Some(addr) = state.config().metrics.listen else {
        return Ok(None);
    };
    let listener = bind(addr, state.config().http.listen_backlog).map_err(|e| {
        crate::StartError::Other(format!("cannot listen on {addr} for metrics: {e}"))
    })?;
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "metrics listening");
    }
    Ok(Some((listener, metrics_app(state.clone()))))
}

/// [`serve`] `app` on `listener` (over `tls` when set), and the metrics
/// router on its own listener (plain HTTP) when there is one; both stop
/// when `shutdown` resolves.
pub async fn serve_with_metrics(
    listener: TcpListener,
    app: Router,
    metrics: Option<(TcpListener, Router)>,
    cfg: &HttpConfig,
    tls: Option<crate::tls::Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let Some((metrics_listener, metrics_router)) = metrics else {
        return serve(listener, app, cfg, tls, shutdown).await;
    };
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    // A scraper needs few connections; the API keeps its own cap.
    let metrics_cfg = HttpConfig {
        max_connections: 16,
        max_connections_per_address: 16,
        ..cfg.clone()
    };
    let main = async {
        let r = serve(listener, app, cfg, tls, shutdown).await;
        let _ = stop.send(true);
        r
    };
    let side = serve(
        metrics_listener,
        metrics_router,
        &metrics_cfg,
        None,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    );
    let (r, side) = tokio::join!(main, side);
    if let Err(e) = side {
        tracing::error!(error = %e, "metrics listener ended with an error");
    }
    r
}

/// The router with every edge layer.
pub fn app(state: AppState) -> Router {
    let cfg = state.config().http.clone();
    let access = Arc::new(MetricsAccess::main(&state));
    // Innermost, so `observe` counts and logs its 408/413/503 answers.
    let bodies = Arc::new(crate::body_guard::BodyGuard::new(&cfg));
    let mut router = crate::routes::router(state.clone())
        .layer(axum::middleware::from_fn_with_state(access, metrics_gate))
        .layer(axum::middleware::from_fn_with_state(
            bodies,
            crate::body_guard::BodyGuard::middleware,
        ))
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
            // The web app's static files revalidate with their ETag
            // instead (they carry no patient data or token).
            |res: &Response| {
                if res
                    .extensions()
                    .get::<crate::routes::web::OwnCacheControl>()
                    .is_some()
                {
                    res.headers().get(header::CACHE_CONTROL).cloned()
                } else {
                    Some(HeaderValue::from_static("no-store"))
                }
            },
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

/// Open connections per client address, capped.
///
/// Keyed on the TCP peer (never on `Forwarded`/`X-Forwarded-For`): the
/// socket's IPv4 address, or the /64 of an IPv6 one (one host usually
/// holds a whole /64). Only admitted connections are counted, so the map
/// never has more than `max_connections` entries.
#[derive(Debug)]
pub struct AddressSlots {
    cap: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One admitted connection of an address; released on drop.
#[derive(Debug)]
pub struct AddressSlot {
    slots: Arc<AddressSlots>,
    key: std::net::IpAddr,
}

impl AddressSlots {
    /// At most `cap` connections per address.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            open: Default::default(),
        })
    }

    /// The counting key of `ip`.
    fn key(ip: std::net::IpAddr) -> std::net::IpAddr {
        match ip {
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)).into(),
            },
            v4 => v4,
        }
    }

    /// A slot for a new connection from `ip`, or `None` at the cap.
    pub fn admit(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let key = Self::key(ip);
        // A poisoned lock only means a panic elsewhere while counting; the
        // counts themselves stay consistent (each update is one step).
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            slots: self.clone(),
            key,
        })
    }

    /// Connections open from `ip` now.
    pub fn open(&self, ip: std::net::IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&Self::key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The answer to a connection over its address's cap, written without
/// reading the request (the connection is closed right after).
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 5\r\nconnection: close\r\ncontent-length: 98\r\n\r\n{\"error\":{\"code\":\"RELAY_TOO_MANY_CONNECTIONS\",\"message\":\"too many connections from this address\"}}";

/// Serve `app` on `listener` until `shutdown` resolves: HTTP/1.1 with the
/// header-read timeout, header limits, a per-read body idle timeout, a
/// connection cap and a per-address connection cap (the body deadlines and
/// rates are a route layer, [`crate::body_guard`]). In-flight requests
/// finish before this returns.
///
/// A connection over its address's cap is answered 429 at once (without
/// reading it) and closed, so it never waits for a slot in front of other
/// clients; together with the unauthenticated body budget this keeps
/// `/healthz` and authenticated clients served under a slow-body flood
/// (see [`crate::body_guard`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &HttpConfig,
    tls: Option<crate::tls::Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    let per_address = AddressSlots::new(cfg.max_connections_per_address);
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
        // Admission by the TCP peer address, before anything else (a TLS
        // handshake included) is spent on the connection. A trusted proxy
        // carries many clients on its own address: it is bounded by
        // `max_connections` only, and its clients by the limits keyed on
        // the forwarded address.
        let trusted = cfg.trusted_proxies.iter().any(|n| n.contains(&peer.ip()));
        let slot = if trusted {
            None
        } else {
            match per_address.admit(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                    drop(stream);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = tower::ServiceBuilder::new()
            .layer(RequestBodyTimeoutLayer::new(body_idle))
            .service(app.clone())
            .map_request(move |mut req: axum::http::Request<_>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            });
        // TLS (when configured): the handshake runs, under its deadline, on
        // hyper's first read, in the connection's own task.
        let io = crate::tls::MaybeTls::new(tls.as_ref(), stream);
        let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_slots_cap_each_address_and_release_on_drop() {
        let slots = AddressSlots::new(2);
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = slots.admit(a).unwrap();
        let _s2 = slots.admit(a).unwrap();
        assert!(slots.admit(a).is_none());
        let _t = slots.admit(b).unwrap();
        drop(s1);
        assert_eq!(slots.open(a), 1);
        let _s3 = slots.admit(a).unwrap();
        assert!(slots.admit(a).is_none());
        // One IPv6 /64 is one address; the v4-mapped form is the v4 one.
        let v6 = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let _u = slots.admit(v6("2001:db8::1")).unwrap();
        let _v = slots.admit(v6("2001:db8::ffff:2")).unwrap();
        assert!(slots.admit(v6("2001:db8::3")).is_none());
        assert!(slots.admit(v6("2001:db8:0:1::3")).is_some());
        assert!(slots.admit(v6("::ffff:10.0.0.1")).is_none());
        drop(_t);
        assert_eq!(slots.open(b), 0);
        assert!(slots.open.lock().unwrap().get(&b).is_none());
    }

    #[test]
    fn the_refusal_is_a_whole_http_answer() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "RELAY_TOO_MANY_CONNECTIONS");
    }
}

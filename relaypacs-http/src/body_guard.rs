//! Request bodies that must keep moving: an overall deadline, a minimum
//! data rate after a grace period, and a small budget of concurrent
//! unauthenticated bodies (issue 11, slow-body denial of service).
//!
//! Three pieces:
//! - [`RateGuard`], pure accounting with the time passed in (unit-tested
//!   without a clock);
//! - [`GuardedBody`], an `http_body::Body` wrapper that applies a
//!   [`RateGuard`] with a timer, so a body that stops sending is refused
//!   even while nothing arrives;
//! - [`BodyGuard::middleware`], the route layer that picks the policy of a
//!   request, holds a permit of the unauthenticated budget while such a
//!   body is read, and turns a refused body into `408 RELAY_BODY_TOO_SLOW`
//!   (or `413`) with `Connection: close`.
//!
//! # Why `/healthz` and authenticated clients keep a share of capacity
//! A connection holds one of `http.max_connections` slots while it is
//! open. An unauthenticated client can hold one for long only by sending
//! a body (a head must arrive within `header_read_timeout_secs`; a request
//! without a body is answered at once). Bodies read before authentication
//! (the [`PUBLIC_BODY_ROUTES`], and any request without an `Authorization`
//! header) need a permit of the unauthenticated budget
//! (`http.max_unauthenticated_bodies`, which the configuration keeps below
//! `max_connections`): without one they are answered `503` with
//! `Retry-After` and the connection is closed, without waiting; with one
//! they must be whole within `unauthenticated_body_deadline_secs`. Every
//! other route extracts `AuthUser` before its body, so a request with a
//! bad token is answered before a byte of its body is read and its
//! connection closes. Hence unauthenticated slow bodies hold at most
//! `max_unauthenticated_bodies` slots, each for at most the short
//! deadline, and at least `max_connections - max_unauthenticated_bodies`
//! remain for everyone else; the per-address cap (in
//! [`crate::edges::serve`]) keeps one address from taking even those.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::config::HttpConfig;
use crate::error::ApiError;

/// Routes that read their body before any authentication (login and
/// refresh carry the credential in the body).
pub const PUBLIC_BODY_ROUTES: &[&str] = &["/api/v1/auth/login", "/api/v1/auth/refresh"];

/// What one request body must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyPolicy {
    /// The whole body must have arrived within this time.
    pub deadline: Option<Duration>,
    /// After `grace`, at least `bytes_per_sec` on average since the start:
    /// at time `t` at least `bytes_per_sec × (t − grace)` bytes.
    pub min_rate: Option<MinRate>,
    /// Most bytes (counted as they arrive, whatever was declared).
    pub max_bytes: Option<u64>,
}

/// A minimum average data rate after a grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinRate {
    /// Bytes per second, at least 1.
    pub bytes_per_sec: u64,
    /// Time before the rate is required.
    pub grace: Duration,
}

/// Why a body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyRefusal {
    /// Below the minimum rate after the grace period.
    #[error("the request body arrived too slowly: {received} bytes in {elapsed_ms} ms")]
    TooSlow {
        /// Bytes received.
        received: u64,
        /// Time since the body started (ms).
        elapsed_ms: u64,
    },
    /// Not whole by the overall deadline.
    #[error("the request body was not complete within {limit_secs} s")]
    Deadline {
        /// The deadline (s).
        limit_secs: u64,
    },
    /// More bytes than the policy allows.
    #[error("the request body may have at most {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

impl BodyRefusal {
    /// The answer: 408 `RELAY_BODY_TOO_SLOW` (the deadline and rate
    /// refusals) or 413 `RELAY_BODY_TOO_LARGE`, always closing the
    /// connection (the rest of the body is never read).
    pub fn response(&self) -> Response {
        let status = match self {
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooSlow { .. } | Self::Deadline { .. } => StatusCode::REQUEST_TIMEOUT,
        };
        let code = match self {
            Self::TooLarge { .. } => "RELAY_BODY_TOO_LARGE",
            Self::TooSlow { .. } | Self::Deadline { .. } => "RELAY_BODY_TOO_SLOW",
        };
        let mut r = ApiError::new(status, code, self.to_string()).into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// Pure accounting of one body against a [`BodyPolicy`]; every method
/// takes the time since the body started, so it needs no clock.
#[derive(Clone, Debug)]
pub struct RateGuard {
    policy: BodyPolicy,
    received: u64,
}

impl RateGuard {
    /// Nothing received yet.
    pub fn new(policy: BodyPolicy) -> Self {
        Self {
            policy,
            received: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Account `n` bytes that arrived at `elapsed`.
    pub fn on_data(&mut self, n: u64, elapsed: Duration) -> Result<(), BodyRefusal> {
        self.received = self.received.saturating_add(n);
        if let Some(limit) = self.policy.max_bytes
            && self.received > limit
        {
            return Err(BodyRefusal::TooLarge { limit });
        }
        self.check(elapsed)
    }

    /// Whether the body may still continue at `elapsed`.
    pub fn check(&self, elapsed: Duration) -> Result<(), BodyRefusal> {
        // `>=`: at the moment returned by `next_check` the body is refused,
        // so a timer that fires exactly then never re-arms for the same
        // instant.
        if let Some(d) = self.policy.deadline
            && elapsed >= d
        {
            return Err(BodyRefusal::Deadline {
                limit_secs: d.as_secs(),
            });
        }
        if let Some(due) = self.rate_due()
            && elapsed >= due
        {
            return Err(BodyRefusal::TooSlow {
                received: self.received,
                elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }

    /// The time from which what was received so far is too little, or the
    /// deadline if earlier; `None`: never (no deadline, no rate).
    pub fn next_check(&self) -> Option<Duration> {
        match (self.policy.deadline, self.rate_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `grace + received / rate`: until then `received` bytes are enough.
    fn rate_due(&self) -> Option<Duration> {
        let r = self.policy.min_rate?;
        let rate = r.bytes_per_sec.max(1);
        let secs = self.received / rate;
        let rem = self.received % rate;
        // rem < rate, so rem * 1e9 / rate < 1e9 and fits a u32.
        let nanos = u32::try_from(u128::from(rem) * 1_000_000_000 / u128::from(rate)).unwrap_or(0);
        Some(
            r.grace
                .saturating_add(Duration::new(secs, 0))
                .saturating_add(Duration::from_nanos(u64::from(nanos))),
        )
    }
}

/// The verdict a [`GuardedBody`] leaves for the middleware.
pub type Verdict = Arc<OnceLock<BodyRefusal>>;

/// A request body held to a [`BodyPolicy`]: refused with an error (and
/// the verdict set) as soon as it breaks the policy, whether or not data
/// arrives. An optional permit (of the unauthenticated budget) is released
/// when the body ends, fails or is dropped.
#[derive(Debug)]
pub struct GuardedBody<B> {
    inner: B,
    guard: RateGuard,
    started: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    verdict: Verdict,
    permit: Option<OwnedSemaphorePermit>,
    done: bool,
}

impl<B> GuardedBody<B> {
    /// Wrap `inner`, starting the clock now.
    pub fn new(
        inner: B,
        policy: BodyPolicy,
        verdict: Verdict,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let guard = RateGuard::new(policy);
        let started = Instant::now();
        let timer = guard
            .next_check()
            .map(|d| Box::pin(tokio::time::sleep_until(started + d)));
        Self {
            inner,
            guard,
            started,
            timer,
            verdict,
            permit,
            done: false,
        }
    }

    fn refuse(&mut self, why: BodyRefusal) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.done = true;
        self.permit = None;
        self.timer = None;
        let _ = self.verdict.set(why.clone());
        Poll::Ready(Some(Err(axum::Error::new(why))))
    }
}

impl<B> http_body::Body for GuardedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                let elapsed = this.started.elapsed();
                if let Err(why) = this.guard.on_data(n, elapsed) {
                    return this.refuse(why);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                this.permit = None;
                Poll::Ready(Some(Err(axum::Error::new(e))))
            }
            Poll::Ready(None) => {
                this.done = true;
                this.permit = None;
                this.timer = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Nothing arrived: wake at the next moment the body could
                // break the policy; re-arm while it has not.
                loop {
                    let Some(timer) = this.timer.as_mut() else {
                        return Poll::Pending;
                    };
                    ready!(timer.as_mut().poll(cx));
                    if let Err(why) = this.guard.check(this.started.elapsed()) {
                        return this.refuse(why);
                    }
                    match this.guard.next_check() {
                        Some(d) => timer.as_mut().reset(this.started + d),
                        None => this.timer = None,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body policies of one server and its unauthenticated budget.
#[derive(Debug)]
pub struct BodyGuard {
    authenticated: BodyPolicy,
    tus_patch: BodyPolicy,
    unauthenticated: BodyPolicy,
    unauthenticated_budget: Arc<Semaphore>,
    budget_size: usize,
}

impl BodyGuard {
    /// The policies from `[http]`.
    pub fn new(cfg: &HttpConfig) -> Self {
        let min_rate = Some(MinRate {
            bytes_per_sec: cfg.body_min_rate_bytes_per_sec.max(1),
            grace: Duration::from_secs(cfg.body_rate_grace_secs),
        });
        let authenticated = BodyPolicy {
            deadline: (cfg.body_deadline_secs > 0)
                .then(|| Duration::from_secs(cfg.body_deadline_secs)),
            min_rate,
            max_bytes: None,
        };
        Self {
            authenticated,
            // tus PATCH is resumable and stored in durable segments: no
            // overall deadline, only the rate (a 2 GiB PATCH on a 32 KB/s
            // link takes 18 h and is fine).
            tus_patch: BodyPolicy {
                deadline: None,
                ..authenticated
            },
            unauthenticated: BodyPolicy {
                deadline: Some(Duration::from_secs(cfg.unauthenticated_body_deadline_secs)),
                min_rate: None,
                max_bytes: Some(cfg.unauthenticated_max_body.min(cfg.max_json_body) as u64),
            },
            unauthenticated_budget: Arc::new(Semaphore::new(cfg.max_unauthenticated_bodies)),
            budget_size: cfg.max_unauthenticated_bodies,
        }
    }

    /// Unauthenticated bodies being read now.
    pub fn unauthenticated_in_flight(&self) -> usize {
        self.budget_size
            .saturating_sub(self.unauthenticated_budget.available_permits())
    }

    /// Route layer: wraps the body of every request that has one in a
    /// [`GuardedBody`] with its policy, and answers a refused body with
    /// [`BodyRefusal::response`] whatever the handler made of the error.
    pub async fn middleware(State(this): State<Arc<Self>>, req: Request, next: Next) -> Response {
        let (parts, body) = req.into_parts();
        // HTTP/1.1 (RFC 9112 §6.3): a request has a body only with a
        // Transfer-Encoding or a non-zero Content-Length. (The body's own
        // `is_end_stream` is not enough: the idle-timeout wrapper below
        // this layer does not report it.)
        let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
            || declared_length(&parts.headers).is_none_or(|n| n > 0)
                && parts.headers.contains_key(header::CONTENT_LENGTH);
        if !has_body || http_body::Body::is_end_stream(&body) {
            return next.run(Request::from_parts(parts, body)).await;
        }
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        let public = route.is_some_and(|r| PUBLIC_BODY_ROUTES.contains(&r))
            || !parts.headers.contains_key(header::AUTHORIZATION);
        let (policy, permit) = if public {
            if let Some(n) = declared_length(&parts.headers)
                && n > this.unauthenticated.max_bytes.unwrap_or(u64::MAX)
            {
                return BodyRefusal::TooLarge {
                    limit: this.unauthenticated.max_bytes.unwrap_or(u64::MAX),
                }
                .response();
            }
            match this.unauthenticated_budget.clone().try_acquire_owned() {
                Ok(p) => (this.unauthenticated, Some(p)),
                Err(_) => return busy(),
            }
        } else if parts.method == Method::PATCH && parts.uri.path().starts_with("/files/") {
            (this.tus_patch, None)
        } else {
            (this.authenticated, None)
        };
        let verdict = Verdict::default();
        let body = Body::new(GuardedBody::new(body, policy, verdict.clone(), permit));
        let res = next.run(Request::from_parts(parts, body)).await;
        match verdict.get() {
            Some(why) => why.response(),
            None => res,
        }
    }
}

/// The declared `Content-Length`, if any and valid.
fn declared_length(h: &axum::http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The unauthenticated budget is exhausted: 503 with `Retry-After`, and the
/// connection closed rather than kept.
fn busy() -> Response {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "RELAY_UNAUTHENTICATED_BUSY",
        "too many unauthenticated requests are sending bodies; retry later",
    );
    e.retry_after = Some(5);
    let mut r = e.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn rate(bps: u64, grace: u64) -> BodyPolicy {
        BodyPolicy {
            deadline: None,
            min_rate: Some(MinRate {
                bytes_per_sec: bps,
                grace: Duration::from_secs(grace),
            }),
            max_bytes: None,
        }
    }

    /// A 256 kbit/s link (32 KB/s) passes the default floor (2 KiB/s after
    /// 10 s) for a whole 2 GiB PATCH, in 64 KiB frames.
    #[test]
    fn a_clinic_link_is_never_too_slow() {
        let mut g = RateGuard::new(rate(2048, 10));
        let frame = 64 << 10;
        let per_frame = frame as f64 / 32_000.0;
        let mut t = 0.0;
        for _ in 0..(2u64 << 30) / frame {
            t += per_frame;
            g.on_data(frame, secs(t)).unwrap();
            g.check(secs(t)).unwrap();
        }
        assert_eq!(g.received(), 2 << 30);
        assert!(t > 18.0 * 3600.0, "{t}");
    }

    /// One byte every 10 s is refused right after the grace period; so is
    /// 100 B/s.
    #[test]
    fn a_trickle_is_refused_after_the_grace_period() {
        let mut g = RateGuard::new(rate(2048, 10));
        g.check(secs(9.9)).unwrap();
        g.on_data(1, secs(5.0)).unwrap();
        assert_eq!(g.next_check(), Some(secs(10.0 + 1.0 / 2048.0)));
        assert!(matches!(
            g.check(secs(10.1)),
            Err(BodyRefusal::TooSlow { received: 1, .. })
        ));
        let mut g = RateGuard::new(rate(2048, 10));
        let mut refused_at = None;
        for s in 1..=60u32 {
            if g.on_data(100, secs(f64::from(s))).is_err() {
                refused_at = Some(s);
                break;
            }
        }
        // 100 t < 2048 (t − 10) from t > 10.51 s.
        assert_eq!(refused_at, Some(11));
    }

    /// A pause is covered by what came before (average rate), up to the
    /// credit earned.
    #[test]
    fn earlier_bytes_buy_a_pause() {
        let mut g = RateGuard::new(rate(1000, 10));
        g.on_data(30_000, secs(3.0)).unwrap();
        // Enough until 10 + 30 = 40 s.
        assert_eq!(g.next_check(), Some(secs(40.0)));
        g.check(secs(39.9)).unwrap();
        assert!(g.check(secs(40.1)).is_err());
    }

    #[test]
    fn deadline_and_size() {
        let p = BodyPolicy {
            deadline: Some(Duration::from_secs(5)),
            min_rate: None,
            max_bytes: Some(4096),
        };
        let mut g = RateGuard::new(p);
        assert_eq!(g.next_check(), Some(secs(5.0)));
        g.on_data(4096, secs(4.0)).unwrap();
        assert_eq!(
            g.check(secs(5.5)),
            Err(BodyRefusal::Deadline { limit_secs: 5 })
        );
        assert_eq!(
            g.on_data(1, secs(4.5)),
            Err(BodyRefusal::TooLarge { limit: 4096 })
        );
        let none = RateGuard::new(BodyPolicy {
            deadline: None,
            min_rate: None,
            max_bytes: None,
        });
        assert_eq!(none.next_check(), None);
        none.check(Duration::MAX).unwrap();
    }

    /// The earlier of deadline and rate is the next check.
    #[test]
    fn next_check_is_the_earlier() {
        let mut p = rate(100, 10);
        p.deadline = Some(Duration::from_secs(12));
        let mut g = RateGuard::new(p);
        assert_eq!(g.next_check(), Some(secs(10.0)));
        g.on_data(1000, secs(1.0)).unwrap();
        assert_eq!(g.next_check(), Some(secs(12.0)));
    }

    /// The wrapper refuses a body that sends nothing, without any data
    /// arriving, sets the verdict and releases its permit.
    #[tokio::test(start_paused = true)]
    async fn the_wrapper_refuses_a_silent_body_on_time() {
        use http_body_util::BodyExt;
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let inner = http_body_util::StreamBody::new(tokio_stream_like(rx));
        let budget = Arc::new(Semaphore::new(1));
        let permit = budget.clone().try_acquire_owned().unwrap();
        let verdict = Verdict::default();
        let p = BodyPolicy {
            deadline: Some(Duration::from_secs(5)),
            min_rate: None,
            max_bytes: None,
        };
        let started = Instant::now();
        let body = GuardedBody::new(inner, p, verdict.clone(), Some(permit));
        assert_eq!(budget.available_permits(), 0);
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("within 5 s"), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(
            verdict.get(),
            Some(&BodyRefusal::Deadline { limit_secs: 5 })
        );
        assert_eq!(budget.available_permits(), 1);
    }

    /// Data that keeps coming fast enough passes through unchanged, and the
    /// permit is released at the end.
    #[tokio::test(start_paused = true)]
    async fn the_wrapper_passes_a_steady_body() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let inner = http_body_util::StreamBody::new(tokio_stream_like(rx));
        tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from(vec![7u8; 4096])))).await;
            }
        });
        let budget = Arc::new(Semaphore::new(1));
        let permit = budget.clone().try_acquire_owned().unwrap();
        let verdict = Verdict::default();
        let body = GuardedBody::new(inner, rate(2048, 10), verdict.clone(), Some(permit));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 30 * 4096);
        assert!(verdict.get().is_none());
        assert_eq!(budget.available_permits(), 1);
    }

    /// A body slowing to 100 B/s is refused after the grace period.
    #[tokio::test(start_paused = true)]
    async fn the_wrapper_refuses_a_trickle() {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let inner = http_body_util::StreamBody::new(tokio_stream_like(rx));
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from(vec![7u8; 100]))))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let verdict = Verdict::default();
        let started = Instant::now();
        let body = GuardedBody::new(inner, rate(2048, 10), verdict.clone(), None);
        assert!(body.collect().await.is_err());
        let t = started.elapsed();
        assert!(t > secs(10.4) && t < secs(11.5), "{t:?}");
        assert!(matches!(verdict.get(), Some(BodyRefusal::TooSlow { .. })));
    }

    /// An mpsc receiver as a stream (no tokio-stream dependency).
    fn tokio_stream_like<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

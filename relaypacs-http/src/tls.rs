//! TLS termination (`[tls]`): a rustls server configuration that can be
//! replaced while the server runs (SIGHUP), and a connection type that
//! performs the handshake, under a deadline, the first time hyper reads.
//!
//! The crypto provider is aws-lc-rs, the one reqwest already brings for
//! the PACS client, chosen explicitly (never the process default).
//! Only HTTP/1.1 is offered by ALPN, as the server speaks only that.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::TlsConfig;

/// Why a certificate and key could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("TLS: cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file is not the PEM expected (no certificate, no private key,
    /// bad base64).
    #[error("TLS: {} holds no usable {what} (PEM)", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// `certificate` or `private key`.
        what: &'static str,
        /// The parse error.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the pair (key does not match the certificate,
    /// unsupported key type).
    #[error("TLS: the certificate and key cannot be used together")]
    Config {
        /// The rustls error.
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Build a server configuration from PEM files: the chain (leaf first) in
/// `cert_file`, the private key in `key_file`.
///
/// # Errors
/// [`TlsError`] naming the file or the mismatch.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let pem_err = |path: &Path, what| {
        let path = path.to_owned();
        move |source| TlsError::Pem { path, what, source }
    };
    let cert_pem = read(cert_file)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert_file, "certificate"))?;
    if certs.is_empty() {
        return Err(pem_err(cert_file, "certificate")(
            rustls::pki_types::pem::Error::NoItemsFound,
        ));
    }
    let key_pem = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(pem_err(key_file, "private key"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config { source })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config { source })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The server's TLS: the current configuration, replaced as a whole by
/// [`reload`](Self::reload). Cheap to clone (shared).
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    cert_file: PathBuf,
    key_file: PathBuf,
    handshake_timeout: Duration,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.inner.cert_file)
            .field("key_file", &self.inner.key_file)
            .field("handshake_timeout", &self.inner.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Load the certificate and key named in `cfg`.
    ///
    /// # Errors
    /// [`TlsError`] when they cannot be read or used.
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let sc = server_config(&cfg.cert_file, &cfg.key_file)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cert_file: cfg.cert_file.clone(),
                key_file: cfg.key_file.clone(),
                handshake_timeout: Duration::from_secs(cfg.handshake_timeout_secs.max(1)),
                current: RwLock::new(Arc::new(sc)),
            }),
        })
    }

    /// Read the files again; on success new connections get the new
    /// certificate (open ones keep theirs). On error nothing changes.
    ///
    /// # Errors
    /// [`TlsError`]; the previous certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let sc = server_config(&self.inner.cert_file, &self.inner.key_file)?;
        // A poisoned lock only means a panic elsewhere while swapping an
        // Arc: the value inside is still a whole configuration.
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(sc);
        Ok(())
    }

    /// The configuration new connections get now.
    fn current(&self) -> Arc<ServerConfig> {
        self.inner
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reload on every SIGHUP until the returned task is aborted; a failed
    /// reload is logged (error) and the old certificate kept. The signal
    /// handler is installed before this returns.
    ///
    /// # Errors
    /// When the SIGHUP handler cannot be installed.
    pub fn reload_on_sighup(&self) -> io::Result<tokio::task::JoinHandle<()>> {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let tls = self.clone();
        Ok(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let t = tls.clone();
                match tokio::task::spawn_blocking(move || t.reload()).await {
                    Ok(Ok(())) => tracing::info!(
                        cert_file = %tls.inner.cert_file.display(),
                        "TLS certificate reloaded"
                    ),
                    Ok(Err(e)) => tracing::error!(
                        error = %e,
                        cause = ?std::error::Error::source(&e).map(ToString::to_string),
                        "TLS reload failed; the previous certificate stays in use"
                    ),
                    Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
                }
            }
        }))
    }
}

/// A server connection: plain, or TLS whose handshake runs on the first
/// read or write, and fails with `TimedOut` past the handshake timeout.
pub struct MaybeTls<IO> {
    state: State<IO>,
}

enum State<IO> {
    Plain(IO),
    Handshake {
        accept: Box<tokio_rustls::Accept<IO>>,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
    Tls(Box<tokio_rustls::server::TlsStream<IO>>),
    Failed,
}

impl<IO> std::fmt::Debug for MaybeTls<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.state {
            State::Plain(_) => "MaybeTls::Plain",
            State::Handshake { .. } => "MaybeTls::Handshake",
            State::Tls(_) => "MaybeTls::Tls",
            State::Failed => "MaybeTls::Failed",
        })
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> MaybeTls<IO> {
    /// `io` as is without `tls`, else TLS with its current certificate.
    pub fn new(tls: Option<&Tls>, io: IO) -> Self {
        let state = match tls {
            None => State::Plain(io),
            Some(t) => State::Handshake {
                accept: Box::new(tokio_rustls::TlsAcceptor::from(t.current()).accept(io)),
                deadline: Box::pin(tokio::time::sleep(t.inner.handshake_timeout)),
            },
        };
        Self { state }
    }

    /// Drive the handshake; `Ready(Ok)` once the stream is usable.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Handshake { accept, deadline } = &mut self.state {
            match Pin::new(accept.as_mut()).poll(cx) {
                Poll::Ready(Ok(s)) => self.state = State::Tls(Box::new(s)),
                Poll::Ready(Err(e)) => {
                    self.state = State::Failed;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        self.state = State::Failed;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        )));
                    }
                    return Poll::Pending;
                }
            }
        }
        match self.state {
            State::Failed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS handshake failed",
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Forward to the usable stream once the handshake is done.
macro_rules! ready_then {
    ($self:ident, $cx:ident, |$s:ident| $e:expr) => {{
        let this = $self.get_mut();
        match this.poll_ready($cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match &mut this.state {
            State::Plain($s) => $e,
            State::Tls(t) => {
                let $s = t.as_mut();
                $e
            }
            // poll_ready returned Ok: neither remains.
            State::Handshake { .. } | State::Failed => {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected)))
            }
        }
    }};
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready_then!(self, cx, |s| Pin::new(s).poll_read(cx, buf))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready_then!(self, cx, |s| Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready_then!(self, cx, |s| Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.state {
            State::Plain(s) => s.is_write_vectored(),
            // tokio-rustls buffers vectored writes into records.
            _ => true,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Plain(s) => Pin::new(s).poll_flush(cx),
            State::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
            State::Handshake { .. } | State::Failed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Plain(s) => Pin::new(s).poll_shutdown(cx),
            State::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
            // Dropping the connection closes the socket.
            State::Handshake { .. } | State::Failed => Poll::Ready(Ok(())),
        }
    }
}

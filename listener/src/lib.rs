//! Every HTTP listener Funcatron opens is built here: the embedded ingress
//! (the front of the request path), the Tron's management API, the dev
//! server and the metrics endpoint, and every listener added later (a
//! console, direct mode, TLS). One builder means no listener can forget
//! the limits that keep slow or silent clients from holding the process:
//!
//! - **header timeout**: a request's head must arrive within it, counted
//!   from the connection's start or the end of the previous answer (so on
//!   HTTP/1.1 it also bounds how long a kept-alive connection waits for its
//!   next request);
//! - **body timeout**: the longest pause between two pieces of a request
//!   body; past it the body fails and the handler answers 408;
//! - **idle timeout**: a connection with no request in progress and no
//!   bytes moving for this long is closed (HTTP/1.1 and HTTP/2);
//! - **connection limit**: past it, new connections wait in the kernel's
//!   backlog until one closes;
//! - **graceful shutdown**: on `shutdown` the listener stops accepting,
//!   lets requests in progress finish, and gives up after the grace;
//! - **TLS** (optional, rustls): with a certificate and key every listener
//!   of the command serves HTTPS (HTTP/1.1 and HTTP/2 by ALPN); the TLS
//!   handshake is bounded by the header timeout.
//!
//! Handlers see the client's address as `ConnectInfo<SocketAddr>`, as with
//! `axum::serve(..).into_make_service_with_connect_info()`.

#![warn(clippy::too_many_lines)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub use tower_http::timeout::TimeoutError as BodyTimeout;

/// Default time for a request's head to arrive.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 15_000;
/// Default longest pause inside a request body.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 30_000;
/// Default time an idle connection is kept.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default most connections one listener holds at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default time requests in progress get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

/// Why a listener's settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The certificate or key file could not be read or parsed.
    #[error("TLS {what} {path}: {why}")]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// rustls refused the certificate and key.
    #[error("TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
}

/// The limits every listener applies, and its TLS settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most time for a request's head to arrive (also the keep-alive wait
    /// for the next request on HTTP/1.1).
    pub header_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_timeout: Duration,
    /// A connection with nothing in progress is closed after this long.
    pub idle_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
    /// How long requests in progress may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Serve HTTPS with this configuration; plain HTTP when `None`.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_millis(DEFAULT_HEADER_TIMEOUT_MS),
            body_timeout: Duration::from_millis(DEFAULT_BODY_TIMEOUT_MS),
            idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: Duration::from_millis(DEFAULT_SHUTDOWN_GRACE_MS),
            tls: None,
        }
    }
}

/// A TLS server configuration from a PEM certificate chain and a PEM
/// private key (PKCS#8, PKCS#1 or SEC1), offering HTTP/2 and HTTP/1.1.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, ListenerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |what, path: &std::path::Path, why: String| ListenerError::Pem {
        what,
        path: path.display().to_string(),
        why,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem("certificate", cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("certificate", cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(
            "certificate",
            cert,
            "no certificate in the file".into(),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem("key", key, e.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listener flags, flattened into every command that serves HTTP; they
/// apply to each of its listeners.
#[derive(clap::Args, Clone, Debug)]
pub struct ListenerArgs {
    /// Most time for a request's head to arrive, in milliseconds (also how
    /// long a kept-alive HTTP/1.1 connection waits for its next request).
    #[arg(long, env = "FUNCATRON_HEADER_TIMEOUT_MS", default_value_t = DEFAULT_HEADER_TIMEOUT_MS)]
    pub header_timeout_ms: u64,
    /// Longest pause between two pieces of a request body, in milliseconds;
    /// past it the request is answered 408.
    #[arg(long, env = "FUNCATRON_BODY_TIMEOUT_MS", default_value_t = DEFAULT_BODY_TIMEOUT_MS)]
    pub body_timeout_ms: u64,
    /// A connection with no request in progress is closed after this many
    /// milliseconds.
    #[arg(long, env = "FUNCATRON_IDLE_TIMEOUT_MS", default_value_t = DEFAULT_IDLE_TIMEOUT_MS)]
    pub idle_timeout_ms: u64,
    /// Most connections one listener holds at once; more wait.
    #[arg(long, env = "FUNCATRON_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// How long requests in progress may take to finish at shutdown, in
    /// milliseconds.
    #[arg(long, env = "FUNCATRON_SHUTDOWN_GRACE_MS", default_value_t = DEFAULT_SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: u64,
    /// Serve HTTPS: the certificate chain (PEM); needs `--tls-key`.
    #[arg(long, env = "FUNCATRON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, env = "FUNCATRON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ListenerArgs {
    /// The limits these flags give (reading the TLS files, if any).
    pub fn limits(&self) -> Result<Limits, ListenerError> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
            _ => None,
        };
        Ok(Limits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections.max(1),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            tls,
        })
    }
}

/// Response headers a Func's answer cannot set: hop-by-hop headers
/// (RFC 9110 7.6.1) and the framing and request id the server sets itself.
pub const FRAMED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-request-id",
];

/// Append a Func's answer headers (names any case) to `h`, leaving out
/// [`FRAMED_HEADERS`] and pairs that are not valid HTTP (logged at debug):
/// the one copy both the ingress and the Runner's direct listener make.
pub fn append_answer_headers<'a>(
    h: &mut axum::http::HeaderMap,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) {
    use axum::http::{HeaderName, HeaderValue};
    for (k, v) in headers {
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            // Names compare lower-cased.
            (Ok(k), Ok(_)) if FRAMED_HEADERS.contains(&k.as_str()) => {}
            (Ok(k), Ok(v)) => {
                h.append(k, v);
            }
            _ => tracing::debug!(header = %k, "invalid response header dropped"),
        }
    }
}

/// Whether a body error is the body timeout (the handler answers 408).
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Serve `router` on `listener` under `limits` until `shutdown`, then let
/// requests in progress finish within the grace. `name` labels the log
/// lines and the `listener_connections_total` metric.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listener = name, %addr, "listening");
    }
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = Arc::clone(&slots).acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(name, &e).await;
                    continue;
                }
            },
        };
        metrics::counter!("listener_connections_total", "listener" => name).increment(1);
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            name,
            remote,
            router: router.clone(),
            limits: limits.clone(),
            builder: Arc::clone(&builder),
            watcher: graceful.watcher(),
        };
        tokio::spawn(async move {
            let _slot = slot;
            conn.run(stream).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "requests still in progress after the shutdown grace; closing"
        );
    }
    Ok(())
}

/// One accepted connection and what serving it needs.
struct Conn {
    name: &'static str,
    remote: SocketAddr,
    router: Router,
    limits: Limits,
    builder: Arc<Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Conn {
    /// The TLS handshake (if any, within the header timeout), then HTTP
    /// until the connection ends, idles out or the listener shuts down.
    async fn run(self, stream: TcpStream) {
        let activity = Arc::new(Activity::new());
        let tracked = Tracked {
            inner: stream,
            activity: Arc::clone(&activity),
        };
        match self.limits.tls.clone() {
            None => self.http(tracked, activity).await,
            Some(tls) => {
                let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tracked);
                match tokio::time::timeout(self.limits.header_timeout, accept).await {
                    Ok(Ok(stream)) => self.http(stream, activity).await,
                    Ok(Err(e)) => {
                        metrics::counter!("listener_tls_handshake_failures_total").increment(1);
                        tracing::debug!(listener = self.name, remote = %self.remote, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("listener_tls_handshake_failures_total").increment(1);
                        tracing::debug!(listener = self.name, remote = %self.remote, "TLS handshake timed out");
                    }
                }
            }
        }
    }

    async fn http<S>(self, io: S, activity: Arc<Activity>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (name, remote) = (self.name, self.remote);
        let service = hyper_util::service::TowerToHyperService::new(per_connection(
            self.router,
            remote,
            self.limits.body_timeout,
            Arc::clone(&activity),
        ));
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        let conn = self.watcher.watch(conn.into_owned());
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(listener = name, %remote, error = %e, "connection ended");
            },
            _ = activity.idle_for(self.limits.idle_timeout) => {
                tracing::debug!(listener = name, %remote, "idle connection closed");
            }
        }
    }
}

/// Accept errors are the listener's, not the server's end: out of file
/// descriptors (EMFILE) waits a moment for some to free, others retry.
async fn accept_failed(name: &str, e: &io::Error) {
    tracing::warn!(listener = name, error = %e, "accept failed");
    metrics::counter!("listener_accept_errors_total").increment(1);
    if !matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        // Without a pause an exhausted descriptor table spins the loop.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The router as one connection's service: the client's address as
/// `ConnectInfo`, the body timeout on the request body, and the request
/// counted as in progress (so the idle timeout leaves it alone) until its
/// response head is ready.
fn per_connection(
    router: Router,
    remote: SocketAddr,
    body_timeout: Duration,
    activity: Arc<Activity>,
) -> impl tower::Service<
    Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<axum::response::Response, std::convert::Infallible>,
    > + Send,
> + Clone {
    tower::service_fn(move |req: Request<Incoming>| {
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(ConnectInfo(remote));
        let body = Body::new(tower_http::timeout::TimeoutBody::new(body_timeout, body));
        let req = Request::from_parts(parts, body);
        let busy = InProgress::new(Arc::clone(&activity));
        let call = router.clone().oneshot(req);
        async move {
            let r = call.await;
            drop(busy);
            r
        }
    })
}

/// What a connection is doing, for the idle timeout.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` when bytes last moved.
    last_ms: AtomicU64,
    /// Requests whose response head is not ready yet.
    in_progress: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_progress: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle for `idle`.
    async fn idle_for(&self, idle: Duration) {
        let idle_ms = idle.as_millis() as u64;
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            let now = self.start.elapsed().as_millis() as u64;
            let quiet = now.saturating_sub(last);
            if self.in_progress.load(Ordering::Relaxed) == 0 && quiet >= idle_ms {
                return;
            }
            let wait = if quiet >= idle_ms {
                idle_ms
            } else {
                idle_ms - quiet
            };
            tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
        }
    }
}

/// Counts one request as in progress while it lives.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn new(a: Arc<Activity>) -> Self {
        a.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(a)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that notes when bytes move.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

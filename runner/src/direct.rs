//! Direct mode: the Runner's own HTTP listener, for bodies too big for a
//! queue and for streamed answers.
//!
//! ingress -> Func queue (the request's head only, [`headers::DIRECT`]) ->
//! **Runner**: instead of running the Func, the serve loop issues a
//! one-time ticket ([`Direct::issue`]) and answers the ingress with its
//! URL (`Response::direct_url`, on this listener's advertised address);
//! the ingress sends the request there (its body streamed) and streams
//! the answer back to its client. The ticket holds the delivery's job; the
//! request that claims it runs the Func through the same skeleton as any
//! delivery ([`crate::serve`]), with the body either read whole (bounded,
//! [`DirectOptions::max_buffered_bytes`]) or, on a direct route of a Func
//! that can read it in pieces (Lua's `req.read()`), streamed through a
//! bounded channel ([`DirectIo`]). A Func that writes its answer in pieces
//! (Lua's `req.write`) has each piece sent to the client as soon as it
//! writes it; any other answer is sent whole.
//!
//! Tickets are random (256 bits), claimed at most once and expire after
//! [`DirectOptions::ticket_ttl`] (or the request's deadline, if sooner);
//! at most [`MAX_TICKETS`] are open at once. An unknown, used or expired
//! ticket is answered 404 `direct_ticket_unknown`.
//!
//! [`headers::DIRECT`]: funcatron_control::headers::DIRECT

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response as HttpResponse;
use bytes::Bytes;
use funcatron_envelope::{error_body, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::invoke::Handled;

/// The path prefix of ticket URLs on a Runner's listener.
pub const DIRECT_PATH: &str = "/_funcatron/direct/";

/// Most tickets open at once; past it a direct request is answered 503
/// `direct_busy` (the client may retry).
pub const MAX_TICKETS: usize = 4096;

/// Default [`DirectOptions::ticket_ttl`].
pub const DEFAULT_TICKET_TTL_MS: u64 = 10_000;
/// Default [`DirectOptions::max_buffered_bytes`].
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;
/// Default [`DirectOptions::max_body_bytes`].
pub const DEFAULT_MAX_DIRECT_BODY_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// Pieces of a request body held between the listener and the Func.
const BODY_CHUNKS: usize = 4;
/// Pieces of an answer held between the Func and the listener.
const ANSWER_CHUNKS: usize = 8;

/// How a Runner's direct listener is set up.
#[derive(Debug, Clone)]
pub struct DirectOptions {
    /// Where it listens (`127.0.0.1:0` by default: a free loopback port,
    /// which in-process and same-host ingresses reach).
    pub listen: SocketAddr,
    /// `host:port` the ingresses reach it at, when not the bound address
    /// (on Docker or Kubernetes: the container's or pod's address).
    pub advertise: Option<String>,
    /// How long a ticket may wait to be claimed.
    pub ticket_ttl: Duration,
    /// Largest body read whole for a Func that does not read it in
    /// pieces; larger ones are answered 413.
    pub max_buffered_bytes: usize,
    /// Largest body streamed to a Func; larger ones are cut off with 413.
    pub max_body_bytes: u64,
}

impl Default for DirectOptions {
    fn default() -> Self {
        DirectOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            ticket_ttl: Duration::from_millis(DEFAULT_TICKET_TTL_MS),
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_body_bytes: DEFAULT_MAX_DIRECT_BODY_BYTES,
        }
    }
}

/// Why the direct listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// The address could not be bound.
    #[error("direct listener on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A piece of a streamed answer.
#[derive(Debug)]
pub enum Part {
    /// Status and headers: first, once.
    Head(u16, Vec<(String, String)>),
    /// Body bytes.
    Chunk(Bytes),
}

/// Why a streamed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The call's deadline passed while waiting.
    #[error("time limit exceeded while streaming")]
    Timeout,
    /// The client went away or its body broke off.
    #[error("{0}")]
    Broken(String),
}

/// A claimed direct request's streams, handed to the runtime with the job.
pub struct DirectIo {
    /// The request body in pieces (a streamed body; `None` once read to
    /// the end, or when it was read whole).
    body: Mutex<Option<mpsc::Receiver<Result<Bytes, String>>>>,
    out: mpsc::Sender<Part>,
    /// The status of the head sent (0: none yet).
    sent: AtomicU16,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for DirectIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectIo")
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .finish()
    }
}

impl DirectIo {
    /// Whether the body comes in pieces ([`DirectIo::read_blocking`]).
    pub fn streams_body(&self) -> bool {
        self.body.lock().map(|b| b.is_some()).unwrap_or(false)
    }

    /// The status of the answer's head, once sent.
    pub fn sent_status(&self) -> Option<u16> {
        match self.sent.load(Ordering::Acquire) {
            0 => None,
            s => Some(s),
        }
    }

    /// The next piece of the body (`None` at its end), waiting at most
    /// until `deadline`. For a runtime's own thread (not a runtime
    /// worker): it blocks.
    pub fn read_blocking(&self, deadline: Instant) -> Result<Option<Bytes>, IoError> {
        let Ok(mut guard) = self.body.lock() else {
            return Ok(None);
        };
        let Some(rx) = guard.as_mut() else {
            return Ok(None);
        };
        // The timer is made inside, in the runtime's context.
        let got = self.rt.block_on(async {
            tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), rx.recv()).await
        });
        match got {
            Err(_) => Err(IoError::Timeout),
            Ok(Some(Ok(b))) => Ok(Some(b)),
            Ok(Some(Err(why))) => {
                *guard = None;
                Err(IoError::Broken(why))
            }
            Ok(None) => {
                *guard = None;
                Ok(None)
            }
        }
    }

    /// Send the answer's head (first) or a piece of its body, waiting at
    /// most until `deadline` for the client to take the pieces before.
    /// Blocks, like [`DirectIo::read_blocking`].
    pub fn send_blocking(&self, part: Part, deadline: Instant) -> Result<(), IoError> {
        self.rt.block_on(self.send(part, deadline))
    }

    /// [`DirectIo::send_blocking`], for a runtime's async tasks.
    pub async fn send(&self, part: Part, deadline: Instant) -> Result<(), IoError> {
        if let Part::Head(status, _) = &part {
            self.sent.store(*status, Ordering::Release);
        }
        let sent = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            self.out.send(part),
        )
        .await;
        match sent {
            Err(_) => Err(IoError::Timeout),
            Ok(Err(_)) => Err(IoError::Broken(
                "the client stopped reading the answer".into(),
            )),
            Ok(Ok(())) => Ok(()),
        }
    }
}

/// What runs a ticket's job once claimed: the buffered body (when read
/// whole) and the streams; the task answers with what the skeleton made.
pub type Start =
    Box<dyn FnOnce(Option<Bytes>, Arc<DirectIo>) -> tokio::task::JoinHandle<Handled> + Send>;

/// An issued ticket.
pub struct Ticket {
    /// Until when it may be claimed.
    pub expires: Instant,
    /// Stream the body to the Func (it reads it in pieces) rather than
    /// reading it whole first.
    pub stream_body: bool,
    /// Runs the job.
    pub start: Start,
}

/// A Runner's direct listener and its open tickets.
pub struct Direct {
    tickets: Mutex<HashMap<String, Ticket>>,
    /// Why there is no listener (it could not bind): every ticket is
    /// refused with this.
    unavailable: Option<String>,
    /// `http://<advertised>/_funcatron/direct/`.
    base: String,
    options: DirectOptions,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("base", &self.base).finish()
    }
}

impl Direct {
    /// Bind the listener and serve tickets until `shutdown`.
    pub async fn start(
        options: DirectOptions,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Direct>, DirectError> {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|source| DirectError::Bind {
                addr: options.listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| DirectError::Bind {
            addr: options.listen,
            source,
        })?;
        let advertised = options.advertise.clone().unwrap_or_else(|| {
            if bound.ip().is_unspecified() {
                let host = std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "127.0.0.1".into());
                format!("{host}:{}", bound.port())
            } else {
                bound.to_string()
            }
        });
        let direct = Arc::new(Direct {
            tickets: Mutex::new(HashMap::new()),
            unavailable: None,
            base: format!("http://{advertised}{DIRECT_PATH}"),
            options,
        });
        tracing::info!(listen = %bound, advertised = %advertised, "direct listener up");
        let app = axum::Router::new()
            .route(
                &format!("{DIRECT_PATH}{{token}}"),
                axum::routing::any(claim),
            )
            .with_state(Arc::clone(&direct));
        let limits = funcatron_listener::Limits::default();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) =
                funcatron_listener::serve("runner-direct", listener, app, limits, shutdown).await
            {
                tracing::error!(error = %e, "direct listener failed");
            }
        });
        Ok(direct)
    }

    /// A Runner without a listener: every direct request is refused 503
    /// `direct_unavailable` with `why`.
    pub fn unavailable(why: String) -> Arc<Direct> {
        Arc::new(Direct {
            tickets: Mutex::new(HashMap::new()),
            unavailable: Some(why),
            base: String::new(),
            options: DirectOptions::default(),
        })
    }

    /// The URL prefix of this Runner's tickets.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Its settings.
    pub fn options(&self) -> &DirectOptions {
        &self.options
    }

    /// Open a ticket: its URL, or why not (error code and message).
    pub fn issue(&self, ticket: Ticket) -> Result<String, (&'static str, String)> {
        if let Some(why) = &self.unavailable {
            return Err((
                "direct_unavailable",
                format!("this Runner cannot serve direct requests: {why}"),
            ));
        }
        let busy = || {
            (
                "direct_busy",
                format!("this Runner has {MAX_TICKETS} direct requests waiting to be claimed; retry later"),
            )
        };
        let token = new_token();
        let Ok(mut open) = self.tickets.lock() else {
            return Err(busy());
        };
        if open.len() >= MAX_TICKETS / 2 {
            let now = Instant::now();
            open.retain(|_, t| t.expires > now);
        }
        if open.len() >= MAX_TICKETS {
            return Err(busy());
        }
        let url = format!("{}{token}", self.base);
        open.insert(token, ticket);
        metrics::gauge!("runner_direct_tickets_open").set(open.len() as f64);
        Ok(url)
    }

    /// Take a ticket that has not expired (at most once).
    fn take(&self, token: &str) -> Option<Ticket> {
        let mut open = self.tickets.lock().ok()?;
        let t = open.remove(token)?;
        metrics::gauge!("runner_direct_tickets_open").set(open.len() as f64);
        (t.expires > Instant::now()).then_some(t)
    }
}

/// 256 random bits, URL-safe.
fn new_token() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn json_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let mut r = HttpResponse::new(Body::from(error_body("", code, message)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// A ticket's URL claimed: run its job with this request's body and
/// answer with what the Func answers, streamed when it streams.
async fn claim(
    State(direct): State<Arc<Direct>>,
    Path(token): Path<String>,
    req: axum::http::Request<Body>,
) -> HttpResponse {
    let Some(ticket) = direct.take(&token) else {
        metrics::counter!("runner_direct_claims_total", "outcome" => "unknown").increment(1);
        return json_error(
            StatusCode::NOT_FOUND,
            "direct_ticket_unknown",
            "no such direct ticket: it was never issued, was already used, or expired",
        );
    };
    metrics::counter!("runner_direct_claims_total", "outcome" => "claimed").increment(1);
    let body = req.into_body();
    let (buffered, body_rx) = if ticket.stream_body {
        let (tx, rx) = mpsc::channel(BODY_CHUNKS);
        tokio::spawn(pump(body, tx, direct.options.max_body_bytes));
        (None, Some(rx))
    } else {
        let limit = direct.options.max_buffered_bytes;
        match Limited::new(body, limit).collect().await {
            Ok(b) => (Some(b.to_bytes()), None),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    &format!("this Func reads its body whole, and the body exceeds the limit of {limit} bytes"),
                )
            }
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("could not read the request body: {e}"),
                )
            }
        }
    };
    let (out, mut answer) = mpsc::channel(ANSWER_CHUNKS);
    let io = Arc::new(DirectIo {
        body: Mutex::new(body_rx),
        out,
        sent: AtomicU16::new(0),
        rt: tokio::runtime::Handle::current(),
    });
    let mut task = (ticket.start)(buffered, io);
    tokio::select! {
        biased;
        first = answer.recv() => match first {
            Some(Part::Head(status, headers)) => streamed(status, &headers, answer, task),
            // Nothing streamed: the answer is whole.
            _ => whole(task.await),
        },
        handled = &mut task => whole(handled),
    }
}

/// Copy the request body into `tx`, at most `limit` bytes.
async fn pump(body: Body, tx: mpsc::Sender<Result<Bytes, String>>, limit: u64) {
    let mut stream = body.into_data_stream();
    let mut seen: u64 = 0;
    use futures::StreamExt as _;
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(b) => b,
            Err(e) => {
                let _ = tx
                    .send(Err(format!("the request body broke off: {e}")))
                    .await;
                return;
            }
        };
        if piece.is_empty() {
            // HTTP/2 may end a body with an empty frame; a Func never
            // reads an empty piece.
            continue;
        }
        seen += piece.len() as u64;
        if seen > limit {
            let _ = tx
                .send(Err(format!(
                    "the request body exceeds the direct limit of {limit} bytes"
                )))
                .await;
            return;
        }
        if tx.send(Ok(piece)).await.is_err() {
            // The Func stopped reading.
            return;
        }
    }
}

/// A streamed answer: its head now, each piece as the Func writes it; a
/// Func that fails once its answer has started has the stream cut off
/// (the client sees an incomplete answer, not a false success).
fn streamed(
    status: u16,
    headers: &[(String, String)],
    answer: mpsc::Receiver<Part>,
    task: tokio::task::JoinHandle<Handled>,
) -> HttpResponse {
    metrics::counter!("runner_direct_answers_total", "kind" => "streamed").increment(1);
    let pieces =
        futures::stream::unfold((answer, Some(task)), move |(mut answer, task)| async move {
            match answer.recv().await {
                Some(Part::Chunk(b)) => Some((Ok(b), (answer, task))),
                Some(Part::Head(..)) => Some((Ok(Bytes::new()), (answer, task))),
                None => {
                    let task = task?;
                    match task.await {
                        Ok(Handled::Reply { status: s, .. }) if s == status => None,
                        _ => Some((
                            Err(std::io::Error::other(
                                "the Func failed after its answer started",
                            )),
                            (answer, None),
                        )),
                    }
                }
            }
        });
    let mut r = HttpResponse::new(Body::from_stream(pieces));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    funcatron_listener::append_answer_headers(
        r.headers_mut(),
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    r
}

/// A whole answer: the response envelope the skeleton made, as HTTP.
fn whole(handled: Result<Handled, tokio::task::JoinError>) -> HttpResponse {
    metrics::counter!("runner_direct_answers_total", "kind" => "whole").increment(1);
    let response = match handled {
        Ok(Handled::Reply { response, .. }) => response,
        Ok(Handled::Expired { .. }) => {
            return json_error(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request's deadline passed before the Func ran",
            )
        }
        Ok(Handled::Undecodable(why)) => {
            return json_error(StatusCode::BAD_GATEWAY, "malformed_request", &why)
        }
        Ok(Handled::Requeue(why)) => {
            return json_error(StatusCode::SERVICE_UNAVAILABLE, "runner_unavailable", &why)
        }
        Err(e) => {
            tracing::error!(error = %e, "a direct call's task failed");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the Runner failed while handling the request",
            );
        }
    };
    let resp = match Response::decode(&response) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_GATEWAY, "malformed_reply", &e.to_string()),
    };
    let body = match resp.body_bytes() {
        Ok(b) => Bytes::from(b.into_owned()),
        Err(e) => return json_error(StatusCode::BAD_GATEWAY, "malformed_reply", &e.to_string()),
    };
    let mut r = HttpResponse::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    funcatron_listener::append_answer_headers(
        r.headers_mut(),
        resp.headers.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
    );
    if let Ok(v) = HeaderValue::from_str(&resp.timings.server_timing(0.0)) {
        r.headers_mut().insert("server-timing", v);
    }
    r
}

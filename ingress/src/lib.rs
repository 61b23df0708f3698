//! The embedded ingress: the front of the request path.
//!
//! **ingress** -> the Func version's queue (routed here, at the edge: see
//! [`edge`]; or `funcatron.requests` -> Tron -> Func queue) -> Runner ->
//! `funcatron.reply.<instance>` -> **ingress**. Each HTTP request becomes a
//! request envelope on its Func's queue; the ingress waits on its own
//! long-lived exclusive reply queue, matching replies to waiting requests by
//! request id. Every accepted request gets exactly one answer: the Func's, or
//! a JSON error (408 body stalled, 413 too large, 429 too many in flight,
//! 502 malformed reply, 503 broker unavailable or connection lost, 504 no
//! answer before the deadline). Replies that arrive late, twice, or for no one are dropped.
//!
//! OpenFaaS's gateway paths work too: `/function/<func>/<rest>` calls Func
//! `<func>` at `<rest>` below its primary base path, `/async-function/...`
//! the same asynchronously. The ingress strips the prefix, sends path
//! `/<rest>` with the request header `x-funcatron-func: <func>` (a
//! client's own is always removed), and the Tron routes it. Before
//! queueing, [`admission`] refuses what a Func's async policy does not
//! take (`async_only`, `max_queued`), by the table the Trons broadcast.
//!
//! Production deployments put nginx with `ingress-lua/` in this role; both
//! speak the same envelope (`docs/wire.md`).

#![warn(clippy::too_many_lines)]

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Request as HttpRequest, StatusCode};
use axum::response::Response as HttpResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use funcatron_broker::{AnyBroker, Broker, BrokerError, ConsumeOptions, Message, QueueKind};
use funcatron_control::{headers, names};
use funcatron_envelope::{
    encode_body, error_body, new_request_id, now_ms, sane_request_id, Request, Response, VERSION,
};
use funcatron_routes::chain;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub mod args;
pub mod calls;
mod direct;
pub mod edge;
pub mod nginx;

/// The health endpoint, reserved on every host.
pub const HEALTH_PATH: &str = "/_funcatron/health";
/// OpenFaaS's synchronous call path: `/function/<func>/<rest>`.
pub const FUNCTION_PREFIX: &str = "/function/";
/// OpenFaaS's asynchronous call path: `/async-function/<func>/<rest>`
/// (recorded, unless `X-Funcatron-Async: no-result` says otherwise).
pub const ASYNC_FUNCTION_PREFIX: &str = "/async-function/";

/// Ingress settings.
#[derive(Debug, Clone)]
pub struct IngressOptions {
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a request may wait for its answer before 504.
    pub timeout: Duration,
    /// Most requests waiting at once; more get 429.
    pub max_in_flight: usize,
    /// Names this instance's reply queue; unique per ingress process.
    pub instance: String,
    /// Timeouts and the connection limit of its listener.
    pub limits: funcatron_listener::Limits,
    /// Where asynchronous calls are recorded; without a store only
    /// fire-and-forget calls are accepted ([`calls`]).
    pub calls: Option<funcatron_calls::Calls>,
    /// Who routes requests: this ingress, by the Trons' table ([`edge`]),
    /// or a Tron.
    pub routing: edge::Routing,
    /// Synchronous requests with bodies larger than this go in direct
    /// mode ([`direct`]); 0: never by size.
    pub direct_threshold_bytes: usize,
    /// Largest body of a request in direct mode.
    pub max_direct_body_bytes: u64,
}

impl Default for IngressOptions {
    fn default() -> Self {
        IngressOptions {
            max_body_bytes: args::DEFAULT_MAX_BODY_BYTES,
            timeout: Duration::from_millis(args::DEFAULT_TIMEOUT_MS),
            max_in_flight: args::DEFAULT_MAX_IN_FLIGHT,
            instance: format!("ingress-{}", &new_request_id()[..12]),
            limits: funcatron_listener::Limits::default(),
            calls: None,
            routing: edge::Routing::default(),
            direct_threshold_bytes: args::DEFAULT_DIRECT_THRESHOLD_BYTES,
            max_direct_body_bytes: args::DEFAULT_MAX_DIRECT_BODY_BYTES,
        }
    }
}

/// Why the ingress could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The broker refused the reply queue.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

enum Waiting {
    Reply(Bytes),
    BrokerLost,
}

struct Shared {
    broker: AnyBroker,
    reply_queue: String,
    /// Waiting requests: request id -> (this attempt's reply key, waker).
    pending: DashMap<String, (String, oneshot::Sender<Waiting>)>,
    in_flight: Semaphore,
    options: IngressOptions,
    /// The Trons' latest route table.
    edge: edge::Edge,
    /// Long-lived connections to Runners' direct listeners.
    http: reqwest::Client,
}

/// Removes a request's pending entry however its handler ends (answered,
/// timed out, or the client went away).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.remove(self.id);
    }
}

#[derive(Deserialize)]
struct ReplyId<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    reply_key: Option<Cow<'a, str>>,
}

/// Serve HTTP on `listener` until `shutdown`.
pub async fn run(
    listener: tokio::net::TcpListener,
    broker: AnyBroker,
    options: IngressOptions,
    shutdown: CancellationToken,
) -> Result<(), IngressError> {
    run_with(listener, broker, options, Router::new(), shutdown).await
}

/// [`run`], serving `extra` routes beside the Funcs (the dev server's
/// pages); every other path goes to the Funcs.
pub async fn run_with(
    listener: tokio::net::TcpListener,
    broker: AnyBroker,
    options: IngressOptions,
    extra: Router,
    shutdown: CancellationToken,
) -> Result<(), IngressError> {
    let limits = options.limits.clone();
    let app = extra.merge(app(broker, options, shutdown.clone()).await?);
    funcatron_listener::serve("ingress", listener, app, limits, shutdown).await?;
    Ok(())
}

/// The ingress as a router, without a listener: its reply queue consumed
/// until `shutdown`. Requests need a `ConnectInfo<SocketAddr>` extension
/// (the server adds it; callers of the router directly insert one). The
/// Tron's `invoke` call uses this.
pub async fn app(
    broker: AnyBroker,
    options: IngressOptions,
    shutdown: CancellationToken,
) -> Result<Router, IngressError> {
    let reply_queue = names::reply_queue(&options.instance);
    broker
        .declare(names::REQUESTS, QueueKind::Work)
        .await
        .or_else(deferred)?;
    let mut replies = broker
        .consume(
            &reply_queue,
            QueueKind::Exclusive,
            ConsumeOptions {
                prefetch: 1000,
                auto_ack: true,
            },
        )
        .await?;
    let shared = Arc::new(Shared {
        broker: broker.clone(),
        reply_queue,
        pending: DashMap::new(),
        in_flight: Semaphore::new(options.max_in_flight),
        edge: edge::Edge::start(
            broker.clone(),
            options.routing,
            options.instance.clone(),
            shutdown.clone(),
        ),
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?,
        options,
    });
    // Replies: wake the waiting request; drop late, duplicate or stray ones.
    let s = Arc::clone(&shared);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let d = tokio::select! {
                _ = stop.cancelled() => return,
                d = replies.next() => match d { Some(d) => d, None => return },
            };
            let payload = d.message.payload.clone();
            let reply = match serde_json::from_slice::<ReplyId>(&payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable message on the reply queue; dropped");
                    continue;
                }
            };
            // Only this attempt's answer: a late reply to an earlier request
            // with the same id carries another key. (A responder that does
            // not know reply keys sends none; it is matched by id.)
            let key = reply.reply_key.as_deref();
            match s
                .pending
                .remove_if(reply.id.as_ref(), |_, (k, _)| key.is_none_or(|rk| rk == k))
            {
                Some((_, (_, tx))) => {
                    let _ = tx.send(Waiting::Reply(payload.clone()));
                }
                None => tracing::debug!(request_id = %reply.id, "late or duplicate reply dropped"),
            }
            let _ = d.ack().await;
        }
    });
    // Connection loss: every waiting request's reply queue is gone with it.
    let s = Arc::clone(&shared);
    let mut up = broker.connected();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = up.changed() => if r.is_err() { return },
            }
            if !*up.borrow_and_update() {
                let ids: Vec<String> = s.pending.iter().map(|e| e.key().clone()).collect();
                for id in ids {
                    if let Some((_, (_, tx))) = s.pending.remove(&id) {
                        let _ = tx.send(Waiting::BrokerLost);
                    }
                }
            }
        }
    });
    Ok(Router::new()
        .route(HEALTH_PATH, get(health))
        .route(&format!("{}/{{id}}", calls::CALLS_PATH), get(calls::status))
        .fallback(handle)
        .with_state(shared))
}

fn deferred(e: BrokerError) -> Result<(), BrokerError> {
    match e {
        // Not connected yet: the adapter declares it once it is.
        BrokerError::Unavailable(_) => Ok(()),
        other => Err(other),
    }
}

async fn health(State(s): State<Arc<Shared>>) -> HttpResponse {
    let connected = *s.broker.connected().borrow();
    let body = serde_json::json!({
        "status": if connected { "ok" } else { "broker_unavailable" },
        "broker": s.broker.kind(),
        "connected": connected,
        "in_flight": s.pending.len(),
        // Funcs refusing async calls now (null: no table heard).
        "queue_full": s.edge.full(),
        "routing": s.edge.routing().as_str(),
        // The revision of the table routed by (null: a Tron routes).
        "edge_table_revision": s.edge.routing_revision(),
    });
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, body.to_string(), None)
}

fn json_response(status: StatusCode, body: String, id: Option<&str>) -> HttpResponse {
    let mut r = HttpResponse::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(id) = id.and_then(|i| HeaderValue::from_str(i).ok()) {
        r.headers_mut().insert("x-request-id", id);
    }
    r
}

fn error(
    status: StatusCode,
    id: &str,
    code: &str,
    message: &str,
    started: Instant,
) -> HttpResponse {
    metrics::counter!("ingress_requests_total", "status" => status.as_str().to_owned())
        .increment(1);
    metrics::histogram!("ingress_request_duration_seconds").record(started.elapsed().as_secs_f64());
    let mut r = json_response(status, error_body(id, code, message), Some(id));
    let total = started.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("total;dur={total:.3}")) {
        r.headers_mut().insert("server-timing", v);
    }
    r
}

fn request_id(headers: &HeaderMap) -> String {
    match headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(id) if sane_request_id(id) => id.to_owned(),
        _ => new_request_id(),
    }
}

/// Read the body, up to `limit` bytes (413 past it, without reading it
/// when `content-length` says so).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    id: &str,
    started: Instant,
) -> Result<bytes::Bytes, HttpResponse> {
    let too_large = || {
        let msg = format!("request body exceeds the limit of {limit} bytes");
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            id,
            "payload_too_large",
            &msg,
            started,
        )
    };
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(body_failed(e.as_ref(), id, started)),
    }
}

/// The answer to a body that could not be read: 408 when it stalled, else
/// 400.
fn body_failed(e: &(dyn std::error::Error + 'static), id: &str, started: Instant) -> HttpResponse {
    if funcatron_listener::is_body_timeout(e) {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            id,
            "body_timeout",
            "the request body stalled past the body timeout",
            started,
        );
    }
    error(
        StatusCode::BAD_REQUEST,
        id,
        "bad_request",
        &format!("could not read the request body: {e}"),
        started,
    )
}

/// Wait for a reply to request `id` (replaced by a fresh id when a
/// client-chosen one is already waiting: it would steal that request's
/// reply): this attempt's reply key and where the reply arrives.
fn register(s: &Shared, id: &mut String) -> (String, oneshot::Receiver<Waiting>) {
    let (tx, rx) = oneshot::channel();
    let reply_key = new_request_id();
    match s.pending.entry(id.clone()) {
        Entry::Vacant(v) => {
            v.insert((reply_key.clone(), tx));
        }
        Entry::Occupied(_) => {
            *id = new_request_id();
            s.pending.insert(id.clone(), (reply_key.clone(), tx));
        }
    }
    (reply_key, rx)
}

/// The envelope fields the HTTP request gives, borrowed from it (the
/// caller sets id, times, body and reply fields).
fn envelope_of(parts: &axum::http::request::Parts, remote: SocketAddr) -> Request<'_> {
    let host = host_of(parts);
    let scheme = parts
        .headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| matches!(*p, "http" | "https"))
        .unwrap_or("http");
    Request {
        version: Cow::Borrowed(VERSION),
        id: Cow::Borrowed(""),
        deadline_ms: 0,
        sent_ms: 0.0,
        method: Cow::Borrowed(parts.method.as_str()),
        scheme: Cow::Borrowed(scheme),
        host: Cow::Borrowed(host),
        path: Cow::Borrowed(parts.uri.path()),
        query: Cow::Borrowed(parts.uri.query().unwrap_or("")),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    Cow::Borrowed(k.as_str()),
                    String::from_utf8_lossy(v.as_bytes()),
                )
            })
            .collect(),
        remote: Some(Cow::Owned(remote.to_string())),
        body: Cow::Borrowed(""),
        body_base64: false,
        reply_to: None,
        reply_key: None,
        ..Request::default()
    }
}

/// The request's host, as the envelope carries it.
pub(crate) fn host_of(parts: &axum::http::request::Parts) -> &str {
    parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// A path naming its Func (OpenFaaS): the Func, the rest of the path
/// (`/` at least), and whether it is the asynchronous form.
fn named_func(path: &str) -> Option<(&str, &str, bool)> {
    let (tail, is_async) = match path.strip_prefix(ASYNC_FUNCTION_PREFIX) {
        Some(t) => (t, true),
        None => (path.strip_prefix(FUNCTION_PREFIX)?, false),
    };
    let (func, rest) = match tail.find('/') {
        Some(i) => (&tail[..i], &tail[i..]),
        None => (tail, "/"),
    };
    (!func.is_empty()).then_some((func, rest, is_async))
}

/// Before queueing: drop a client's Func header; turn an OpenFaaS path
/// into path `/<rest>` and the Func header; decide whether the call is
/// async; and ask [`edge`] where it goes and whether the Func takes it.
fn prepare(
    s: &Shared,
    parts: &mut axum::http::request::Parts,
) -> Result<(Option<calls::Async>, edge::Decision), edge::Refusal> {
    parts.headers.remove(headers::FUNC);
    let mut mode = calls::mode(&parts.headers);
    if parts.uri.path() == chain::CHAIN_PATH {
        return prepare_chain(s, parts, mode).map(|d| (None, d));
    }
    let mut named = None;
    if let Some((func, rest, is_async)) = named_func(parts.uri.path()) {
        let pq = match parts.uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        };
        if let (Ok(uri), Ok(v)) = (pq.parse(), HeaderValue::from_str(func)) {
            parts.headers.insert(headers::FUNC, v);
            named = Some(func.to_owned());
            parts.uri = uri;
            if is_async && mode.is_none() {
                mode = Some(calls::Async::Recorded);
            }
        }
    }
    let host = host_of(parts);
    let decision = s.edge.decide(parts, host, named.as_deref(), mode)?;
    Ok((mode, decision))
}

/// A chain (`POST /_funcatron/chain`, the expression in the
/// `X-Funcatron-Chain` header or the `chain` query parameter): parsed
/// here, resolved at the edge or by a Tron (`funcatron_routes::chain`).
fn prepare_chain(
    s: &Shared,
    parts: &mut axum::http::request::Parts,
    mode: Option<calls::Async>,
) -> Result<edge::Decision, edge::Refusal> {
    let refuse = |status: StatusCode, code: &'static str, message: String| edge::Refusal {
        status,
        code,
        message,
    };
    if parts.method != axum::http::Method::POST {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} takes POST", chain::CHAIN_PATH),
        ));
    }
    if mode.is_some() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "chain_async",
            "chains answer synchronously; an asynchronous chain is not supported".into(),
        ));
    }
    let expr = chain::expression(
        parts
            .headers
            .get(chain::CHAIN_HEADER)
            .and_then(|v| v.to_str().ok()),
        parts.uri.query(),
    )
    .map_err(|e| refuse(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    let stages = chain::parse(&expr)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    s.edge.decide_chain(parts, &stages)
}

/// The edge's decision: the routing (`None`: a Tron routes), or the
/// answer it gave (404, 405).
fn routed_or_answer(
    decision: edge::Decision,
    id: &str,
    started: Instant,
) -> Result<Option<edge::Routed>, Box<HttpResponse>> {
    match decision {
        edge::Decision::Tron => Ok(None),
        edge::Decision::Queue(r) => Ok(Some(r)),
        edge::Decision::Answer {
            status,
            code,
            message,
            allow,
        } => {
            metrics::counter!("ingress_edge_answered_total", "code" => code).increment(1);
            let mut answer = error(status, id, code, &message, started);
            if let Some(v) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
                answer.headers_mut().insert("allow", v);
            }
            Err(Box::new(answer))
        }
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    req: HttpRequest<Body>,
) -> HttpResponse {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let mut id = request_id(&parts.headers);
    let (mode, decision) = match prepare(&s, &mut parts) {
        Ok(m) => m,
        Err(r) => {
            metrics::counter!("ingress_admission_refused_total", "reason" => r.code).increment(1);
            let mut answer = error(r.status, &id, r.code, &r.message, started);
            r.decorate(&mut answer);
            return answer;
        }
    };
    let direct_route = matches!(&decision, edge::Decision::Queue(r) if r.direct);
    let is_chain = parts.uri.path() == chain::CHAIN_PATH
        || matches!(&decision, edge::Decision::Queue(r) if r.chain.is_some());
    let planned = direct::plan(
        &s,
        &parts.headers,
        body,
        mode.is_some() || is_chain,
        direct_route,
        &id,
        started,
    )
    .await;
    let body = match planned {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    // Taken once the request is ready to enqueue: a slow body holds a
    // connection (bounded by the listener's limits), not a request slot.
    let Ok(_permit) = s.in_flight.try_acquire() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            &id,
            "too_many_requests",
            "too many requests in flight; retry later",
            started,
        );
    };
    let mut routed = match routed_or_answer(decision, &id, started) {
        Ok(r) => r,
        Err(answer) => return *answer,
    };
    let body = match body {
        direct::Planned::Whole(b) => b,
        direct::Planned::Direct(d) => {
            return direct::call(&s, &parts, remote, d, routed, id, started).await
        }
    };
    if let Some(mode) = mode {
        return calls::submit(&s, &parts, remote, body, mode, &id, started, routed).await;
    }

    let (reply_key, rx) = register(&s, &mut id);
    let _guard = PendingGuard {
        shared: &s,
        id: &id,
    };

    let timeout = s.options.timeout;
    let sent_ms = now_ms();
    let deadline_ms = (sent_ms + timeout.as_millis() as f64) as u64;
    let payload = {
        let (body, body_base64) = encode_body(&body);
        Request {
            id: Cow::Borrowed(&id),
            deadline_ms,
            sent_ms,
            body,
            body_base64,
            reply_to: Some(Cow::Borrowed(&s.reply_queue)),
            reply_key: Some(Cow::Borrowed(&reply_key)),
            chain: routed.as_mut().and_then(|r| r.chain.take()),
            ..envelope_of(&parts, remote)
        }
        .encode()
    };
    let message = Message {
        payload: payload.into(),
        headers: Vec::new(),
        ttl_ms: Some(timeout.as_millis() as u64),
        persistent: false,
    };
    let span = tracing::debug_span!(
        "ingress.request",
        request_id = %id,
        func = routed.as_ref().map(|r| r.func.as_str())
    );
    wait_for_answer(&s, message, routed, rx, &id, started)
        .instrument(span)
        .await
}

async fn wait_for_answer(
    s: &Shared,
    message: Message,
    routed: Option<edge::Routed>,
    rx: oneshot::Receiver<Waiting>,
    id: &str,
    started: Instant,
) -> HttpResponse {
    match wait_for_reply(s, message, routed, rx, id, started).await {
        Ok(payload) => respond(&payload, id, started),
        Err(answer) => answer,
    }
}

/// Publish `message` (onto its Func's queue when routed here) and wait for
/// its reply; an error answer when it cannot be queued or is not answered
/// in time.
async fn wait_for_reply(
    s: &Shared,
    message: Message,
    routed: Option<edge::Routed>,
    rx: oneshot::Receiver<Waiting>,
    id: &str,
    started: Instant,
) -> Result<Bytes, HttpResponse> {
    let timeout = s.options.timeout;
    let publish = funcatron_calls::submit::publish_routed(
        &s.broker,
        message,
        routed.map(|r| (r.queue, r.headers)),
    );
    match tokio::time::timeout(timeout, publish).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "publish failed");
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                "broker_unavailable",
                &format!("the request could not be queued: {e}"),
                started,
            ));
        }
        Err(_) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                "broker_unavailable",
                "the request queue stayed full until the deadline",
                started,
            ));
        }
    }
    let remaining = timeout.saturating_sub(started.elapsed());
    let payload = match tokio::time::timeout(remaining, rx).await {
        Ok(Ok(Waiting::Reply(p))) => p,
        Ok(Ok(Waiting::BrokerLost)) | Ok(Err(_)) => {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, id, "broker_connection_lost", "the broker connection was lost while the request was in flight; its outcome is unknown", started));
        }
        Err(_) => {
            return Err(error(
                StatusCode::GATEWAY_TIMEOUT,
                id,
                "timeout",
                &format!("no answer within {} ms", timeout.as_millis()),
                started,
            ));
        }
    };
    Ok(payload)
}

fn respond(payload: &Bytes, id: &str, started: Instant) -> HttpResponse {
    let resp = match Response::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                id,
                "malformed_reply",
                &format!("the reply could not be decoded: {e}"),
                started,
            )
        }
    };
    let body = match (&resp.body, resp.body_base64) {
        // Text bodies without escapes point into the reply: no copy.
        (Cow::Borrowed(s), false) => payload.slice_ref(s.as_bytes()),
        _ => match resp.body_bytes() {
            Ok(b) => Bytes::from(b.into_owned()),
            Err(e) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    id,
                    "malformed_reply",
                    &e.to_string(),
                    started,
                )
            }
        },
    };
    let status = match StatusCode::from_u16(resp.status) {
        // 1xx (101 included) would desynchronise the client's connection.
        Ok(s) if !s.is_informational() => s,
        _ => {
            return error(
                StatusCode::BAD_GATEWAY,
                id,
                "malformed_reply",
                &format!("a Func may not answer with status {}", resp.status),
                started,
            )
        }
    };
    metrics::counter!("ingress_requests_total", "status" => status.as_str().to_owned())
        .increment(1);
    metrics::histogram!("ingress_request_duration_seconds").record(started.elapsed().as_secs_f64());
    let mut r = HttpResponse::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    funcatron_listener::append_answer_headers(
        h,
        resp.headers.iter().map(|(k, v)| (k.as_ref(), v.as_ref())),
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    let total = started.elapsed().as_secs_f64() * 1000.0;
    // Appended: a Func's own (a chain's per-stage entries) stays.
    if let Ok(v) = HeaderValue::from_str(&resp.timings.server_timing(total)) {
        h.append("server-timing", v);
    }
    r
}

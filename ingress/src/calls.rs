//! Asynchronous calls at the embedded ingress: the request is recorded and
//! queued durably, and the client is answered 202 at once.
//!
//! **ingress (here)** -> `funcatron.requests` -> Tron -> the Func's async
//! queue -> Runner -> `funcatron.outcomes` -> Tron -> the call's record,
//! which `GET /_funcatron/calls/<id>` (here too) reads. A call is async when
//! the client sends `Prefer: respond-async`, `X-Funcatron-Async: true`, or
//! tinyFaaS's `X-tinyFaaS-Async`; `X-Funcatron-Async: no-result` is
//! fire-and-forget (no record: the Func runs, its answer is discarded).
//! The 202 comes only after the record is written and the broker has
//! confirmed the persistent message.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response as HttpResponse;
use bytes::Bytes;
use funcatron_broker::{Broker, Message};
use funcatron_calls::{Submission, Submitted};
use funcatron_control::names;
use funcatron_envelope::{encode_body, new_request_id, now_ms, Request};

use crate::{envelope_of, error, json_response, Shared};

/// Where a call's status is read.
pub const CALLS_PATH: &str = "/_funcatron/calls";
/// The header that opens a call's answer.
pub const SECRET_HEADER: &str = "x-call-secret";

/// How an async call gets queued: its record kept, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Async {
    /// Recorded, pollable, retried.
    Recorded,
    /// Fire-and-forget.
    NoResult,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Is this request asynchronous, and how?
pub(crate) fn mode(headers: &HeaderMap) -> Option<Async> {
    match header(headers, "x-funcatron-async").map(str::to_ascii_lowercase) {
        Some(v) if v == "no-result" => return Some(Async::NoResult),
        Some(v) if v == "true" || v == "1" => return Some(Async::Recorded),
        _ => {}
    }
    if header(headers, "x-tinyfaas-async").is_some_and(|v| !v.eq_ignore_ascii_case("false")) {
        return Some(Async::Recorded);
    }
    let prefer = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"));
    prefer.then_some(Async::Recorded)
}

/// A callback URL a client may give: http or https, bounded. (Where it
/// may point is checked when it is called, by the outbound policy.)
fn callback_url(headers: &HeaderMap) -> Result<Option<&str>, String> {
    let Some(url) = header(headers, "x-callback-url") else {
        return Ok(None);
    };
    let ok = url.len() <= 2048
        && (url.starts_with("http://") || url.starts_with("https://"))
        && !url.chars().any(char::is_whitespace);
    if ok {
        Ok(Some(url))
    } else {
        Err(format!(
            "X-Callback-Url {url:?} is not an http(s) URL of at most 2048 characters"
        ))
    }
}

/// How long an asynchronous call may wait for its first attempt.
const MAX_AGE_MS: u64 = 6 * 3_600_000;
/// How long a finished call's record is kept, until the Func's policy
/// (applied by the Tron) says otherwise.
const RETENTION_MS: u64 = 24 * 3_600_000;
/// How long an `Idempotency-Key` names its first call.
const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3_600_000;

/// Record and queue an asynchronous call; answer 202 with its id.
pub(crate) async fn submit(
    s: &Shared,
    parts: &axum::http::request::Parts,
    remote: SocketAddr,
    body: Bytes,
    mode: Async,
    id: &str,
    started: Instant,
) -> HttpResponse {
    let refuse = |status, code, msg: &str| error(status, id, code, msg, started);
    let callback = match callback_url(&parts.headers) {
        Ok(c) => c,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "bad_callback_url", &why),
    };
    let calls = match (&s.options.calls, mode) {
        (Some(c), _) => Some(c),
        (None, Async::NoResult) => None,
        (None, Async::Recorded) => {
            return refuse(
                StatusCode::NOT_IMPLEMENTED,
                "async_unavailable",
                "this ingress has no state store, so it cannot keep asynchronous calls (funcatron up always has one; give funcatron ingress --store)",
            )
        }
    };
    let call_id = format!("c{}", new_request_id());
    let secret = new_request_id();
    let sent_ms = now_ms();
    let (body, body_base64) = encode_body(&body);
    let recorded = mode == Async::Recorded;
    let request = Request {
        id: Cow::Borrowed(id),
        deadline_ms: sent_ms as u64 + MAX_AGE_MS,
        sent_ms,
        body,
        body_base64,
        reply_to: recorded.then_some(Cow::Borrowed(names::OUTCOMES)),
        is_async: true,
        call_id: Some(Cow::Borrowed(&call_id)),
        callback_url: callback.map(Cow::Borrowed),
        attempt: Some(1),
        submitted_ms: Some(sent_ms as u64),
        ..envelope_of(parts, remote)
    };
    if let Some(calls) = calls.filter(|_| recorded) {
        let idempotency = header(&parts.headers, "idempotency-key")
            .filter(|k| !k.is_empty() && k.len() <= 256)
            .map(|k| (k, IDEMPOTENCY_WINDOW_MS));
        let submission = Submission {
            request: &request,
            secret: &secret,
            idempotency,
            retention_ms: RETENTION_MS,
            expires_ms: sent_ms as u64 + MAX_AGE_MS + RETENTION_MS,
        };
        match calls.submit(submission).await {
            Ok(Submitted::New) => {}
            Ok(Submitted::Existing(first)) => return accepted(id, &first, None, started),
            Err(e) => {
                tracing::warn!(error = %e, "call not recorded");
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "state_store_unavailable",
                    "the call could not be recorded; nothing was queued",
                );
            }
        }
    }
    let message = Message {
        payload: request.encode().into(),
        persistent: true,
        ..Message::default()
    };
    if let Err(e) = s.broker.publish(names::REQUESTS, message).await {
        tracing::warn!(error = %e, "async call not queued");
        if let Some(calls) = calls.filter(|_| recorded) {
            let _ = calls.withdraw(&call_id).await;
        }
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            &format!("the call could not be queued: {e}"),
        );
    }
    metrics::counter!("ingress_async_calls_total").increment(1);
    let secret = recorded.then_some(secret.as_str());
    accepted(id, &call_id, secret, started)
}

/// 202: the call id, where its status is, and (for a new recorded call)
/// the secret that opens its answer.
fn accepted(id: &str, call_id: &str, secret: Option<&str>, started: Instant) -> HttpResponse {
    let location = format!("{CALLS_PATH}/{call_id}");
    let mut body = serde_json::json!({
        "call_id": call_id,
        "status_url": location,
        "request_id": id,
    });
    if let Some(sec) = secret {
        body["secret"] = serde_json::Value::String(sec.to_owned());
    }
    let mut r = json_response(StatusCode::ACCEPTED, body.to_string(), Some(id));
    let h = r.headers_mut();
    for (name, value) in [
        ("x-call-id", Some(call_id)),
        ("location", Some(location.as_str())),
        (SECRET_HEADER, secret),
    ] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, v);
        }
    }
    metrics::counter!("ingress_requests_total", "status" => "202").increment(1);
    metrics::histogram!("ingress_request_duration_seconds").record(started.elapsed().as_secs_f64());
    r
}

/// `GET /_funcatron/calls/<id>`: where the call is; its answer too with
/// the call's secret in `X-Call-Secret`.
pub(crate) async fn status(
    State(s): State<Arc<Shared>>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
) -> HttpResponse {
    let started = Instant::now();
    let id = new_request_id();
    let Some(calls) = &s.options.calls else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            &id,
            "async_unavailable",
            "this ingress has no state store",
            started,
        );
    };
    match calls.get(&call_id).await {
        Ok(Some(call)) => {
            let reveal = header(&headers, SECRET_HEADER).is_some_and(|sec| call.opens(sec));
            let body = serde_json::to_string(&call.view(reveal)).unwrap_or_default();
            json_response(StatusCode::OK, body, Some(&id))
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            &id,
            "unknown_call",
            "no such call (or its record has expired)",
            started,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "call not read");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &id,
                "state_store_unavailable",
                "the call's record could not be read",
                started,
            )
        }
    }
}

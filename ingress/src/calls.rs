//! Asynchronous calls at the embedded ingress: the request is recorded and
//! queued durably, and the client is answered 202 at once.
//!
//! **ingress (here)** -> the Func's async queue (routed at the edge, or
//! through `funcatron.requests` and a Tron) -> Runner -> `funcatron.outcomes` -> Tron -> the call's record,
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
use funcatron_calls::submit::{self as shared, Queued};
use funcatron_envelope::{encode_body, new_request_id, Request};

pub(crate) use funcatron_calls::submit::{Async, CALLS_PATH, SECRET_HEADER};

use crate::{envelope_of, error, json_response, Shared};

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Is this request asynchronous, and how? (See [`shared::mode`].)
pub(crate) fn mode(headers: &HeaderMap) -> Option<Async> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))
        .collect();
    shared::mode(&pairs)
}

/// Record and queue an asynchronous call (onto its Func's async queue
/// when `routed` at the edge); answer 202 with its id.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn submit(
    s: &Shared,
    parts: &axum::http::request::Parts,
    remote: SocketAddr,
    body: Bytes,
    mode: Async,
    id: &str,
    started: Instant,
    routed: Option<crate::edge::Routed>,
) -> HttpResponse {
    let refuse = |status, code, msg: &str| error(status, id, code, msg, started);
    let callback = header(&parts.headers, "x-callback-url");
    if let Err(why) = callback.map(shared::check_callback_url).transpose() {
        return refuse(StatusCode::BAD_REQUEST, "bad_callback_url", &why);
    }
    let calls = match (&s.options.calls, mode) {
        (Some(c), Async::Recorded) => Some(c),
        (_, Async::NoResult) => None,
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
    let (body, body_base64) = encode_body(&body);
    let base = Request {
        id: Cow::Borrowed(id),
        body,
        body_base64,
        ..envelope_of(parts, remote)
    };
    let request = shared::first_attempt(base, &call_id, callback, mode);
    let idempotency = shared::idempotency_key(header(&parts.headers, "idempotency-key"));
    let routed = routed.map(|r| (r.queue, r.headers));
    match shared::queue(calls, &s.broker, &request, &secret, idempotency, routed).await {
        Ok(Queued::New) => {}
        Ok(Queued::Existing(first)) => return accepted(id, &first, None, started),
        Err(e) => {
            tracing::warn!(error = %e, "async call not queued");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.message());
        }
    }
    metrics::counter!("ingress_async_calls_total").increment(1);
    let secret = calls.is_some().then_some(secret.as_str());
    accepted(id, &call_id, secret, started)
}

/// 202: the call id, where its status is, and (for a new recorded call)
/// the secret that opens its answer.
fn accepted(id: &str, call_id: &str, secret: Option<&str>, started: Instant) -> HttpResponse {
    let body = shared::accepted_body(id, call_id, secret);
    let mut r = json_response(StatusCode::ACCEPTED, body, Some(id));
    let h = r.headers_mut();
    for (name, value) in shared::accepted_headers(call_id, secret) {
        if let Ok(v) = HeaderValue::from_str(&value) {
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

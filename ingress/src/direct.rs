//! Direct mode at the embedded ingress: large bodies and streamed answers
//! bypass the broker's payloads.
//!
//! A synchronous request goes direct when its operation is marked
//! `x-funcatron-direct` (known at the edge), when it asks for a stream
//! (`Accept: text/event-stream`), or when its body is larger than
//! [`IngressOptions::direct_threshold_bytes`] (declared by
//! `content-length`, or found while reading a body sent without one).
//! Then only its head is queued (the envelope's `direct`); the Runner that
//! takes it answers with a one-time URL on its own listener
//! (`funcatron_runner::direct`); the ingress sends the body there, streamed
//! as it arrives, and streams the Runner's answer back to the client
//! piece by piece. Asynchronous calls never go direct: their bodies must
//! be durable on the broker.
//!
//! [`IngressOptions::direct_threshold_bytes`]: crate::IngressOptions::direct_threshold_bytes

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response as HttpResponse;
use bytes::{Bytes, BytesMut};
use funcatron_broker::Message;
use funcatron_control::headers;
use funcatron_envelope::{now_ms, Request, Response};
use futures::StreamExt as _;

use crate::{edge, envelope_of, error, read_body, Shared};

/// How the request's body travels.
pub(crate) enum Planned {
    /// Whole, in the envelope.
    Whole(Bytes),
    /// In direct mode: what was read already, then the rest.
    Direct(DirectBody),
}

/// A direct request's body: what was read before deciding, then the rest.
pub(crate) struct DirectBody {
    prefix: Bytes,
    rest: Body,
}

/// Whether the client asks for a stream of events.
fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all("accept")
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/event-stream")))
}

/// Decide how the body travels and read what must be read: a body for
/// the envelope whole (at most `max_body_bytes`); for direct mode nothing,
/// or, without a declared length, the part read before it proved larger
/// than the threshold.
pub(crate) async fn plan(
    s: &Shared,
    headers: &HeaderMap,
    body: Body,
    whole: bool,
    direct_route: bool,
    id: &str,
    started: Instant,
) -> Result<Planned, HttpResponse> {
    let o = &s.options;
    // 0: never by size (direct routes and event streams still go direct).
    let threshold = (o.direct_threshold_bytes > 0).then_some(o.direct_threshold_bytes);
    if whole {
        return read_body(headers, body, o.max_body_bytes, id, started)
            .await
            .map(Planned::Whole);
    }
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let over = |n: u64| threshold.is_some_and(|t| n > t as u64);
    if direct_route || wants_stream(headers) || declared.is_some_and(over) {
        if declared.is_some_and(|n| n > o.max_direct_body_bytes) {
            return Err(too_large(o.max_direct_body_bytes, id, started));
        }
        return Ok(Planned::Direct(DirectBody {
            prefix: Bytes::new(),
            rest: body,
        }));
    }
    let Some(threshold) = threshold.filter(|_| declared.is_none()) else {
        return read_body(headers, body, o.max_body_bytes, id, started)
            .await
            .map(Planned::Whole);
    };
    // No length: read until the body ends or proves larger.
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    loop {
        match stream.next().await {
            None => return Ok(Planned::Whole(buf.freeze())),
            Some(Ok(piece)) => {
                buf.extend_from_slice(&piece);
                if buf.len() > o.max_body_bytes && o.max_body_bytes < threshold {
                    return Err(too_large(o.max_body_bytes as u64, id, started));
                }
                if buf.len() > threshold {
                    return Ok(Planned::Direct(DirectBody {
                        prefix: buf.freeze(),
                        rest: Body::from_stream(stream),
                    }));
                }
            }
            Some(Err(e)) => return Err(crate::body_failed(&e, id, started)),
        }
    }
}

fn too_large(limit: u64, id: &str, started: Instant) -> HttpResponse {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        id,
        "payload_too_large",
        &format!("request body exceeds the limit of {limit} bytes"),
        started,
    )
}

/// A request in direct mode: queue its head, wait for the Runner's
/// ticket, then send the body there and stream the answer back.
pub(crate) async fn call(
    s: &Shared,
    parts: &axum::http::request::Parts,
    remote: SocketAddr,
    body: DirectBody,
    routed: Option<edge::Routed>,
    mut id: String,
    started: Instant,
) -> HttpResponse {
    metrics::counter!("ingress_direct_total").increment(1);
    let (reply_key, rx) = crate::register(s, &mut id);
    let _guard = crate::PendingGuard { shared: s, id: &id };
    let timeout = s.options.timeout;
    let sent_ms = now_ms();
    let payload = Request {
        id: Cow::Borrowed(&id),
        deadline_ms: (sent_ms + timeout.as_millis() as f64) as u64,
        sent_ms,
        reply_to: Some(Cow::Borrowed(&s.reply_queue)),
        reply_key: Some(Cow::Borrowed(&reply_key)),
        direct: true,
        ..envelope_of(parts, remote)
    }
    .encode();
    let message = Message {
        payload: payload.into(),
        headers: Vec::new(),
        ttl_ms: Some(timeout.as_millis() as u64),
        persistent: false,
    };
    let routed = routed.map(|mut r| {
        r.headers.push((headers::DIRECT.to_owned(), "1".to_owned()));
        r
    });
    let reply = match crate::wait_for_reply(s, message, routed, rx, &id, started).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let url = match Response::decode(&reply) {
        Ok(Response {
            direct_url: Some(url),
            ..
        }) => url.into_owned(),
        // A refusal (no ticket) or an error: as any answer.
        _ => return crate::respond(&reply, &id, started),
    };
    proxy(s, &url, body, &id, started).await
}

/// Send the body to the Runner's ticket URL and stream its answer back.
async fn proxy(
    s: &Shared,
    url: &str,
    body: DirectBody,
    id: &str,
    started: Instant,
) -> HttpResponse {
    let limit = s.options.max_direct_body_bytes;
    let over = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&over);
    let mut seen: u64 = 0;
    let pieces = futures::stream::once(async move { Ok::<Bytes, axum::Error>(body.prefix) })
        .chain(body.rest.into_data_stream())
        .map(move |piece| {
            let piece = piece.map_err(std::io::Error::other)?;
            seen += piece.len() as u64;
            if seen > limit {
                flag.store(true, Ordering::Relaxed);
                return Err(std::io::Error::other("the request body exceeds the limit"));
            }
            Ok(piece)
        });
    let send = s
        .http
        .post(url)
        .header("x-request-id", id)
        .body(reqwest::Body::wrap_stream(pieces))
        .send();
    let remaining = s.options.timeout.saturating_sub(started.elapsed());
    let answer = match tokio::time::timeout(remaining, send).await {
        Ok(Ok(a)) => a,
        Ok(Err(_)) if over.load(Ordering::Relaxed) => return too_large(limit, id, started),
        Ok(Err(e)) => {
            tracing::warn!(request_id = id, error = %e, "direct request to the Runner failed");
            return error(
                StatusCode::BAD_GATEWAY,
                id,
                "direct_failed",
                &format!("the Runner holding the request could not be reached: {e}"),
                started,
            );
        }
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                id,
                "timeout",
                &format!("no answer within {} ms", s.options.timeout.as_millis()),
                started,
            )
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    metrics::counter!("ingress_requests_total", "status" => status.as_str().to_owned())
        .increment(1);
    let mut headers = HeaderMap::new();
    funcatron_listener::append_answer_headers(
        &mut headers,
        answer
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
    );
    let mut r = HttpResponse::new(Body::from_stream(answer.bytes_stream()));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

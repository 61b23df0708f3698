//! Accepting an asynchronous call: what the embedded ingress and the
//! Tron's submission endpoint (which the nginx ingress calls) share.
//!
//! ingress (embedded) or nginx -> Tron `POST /v1/calls` -> **here**: tell
//! whether a request is async and how ([`mode`]), check its callback URL,
//! make the envelope the call's first attempt ([`first_attempt`]), record
//! it and publish it persistent with confirm ([`queue`]), and build the
//! 202's body ([`accepted_body`]). The record comes first, so a 202
//! always has one; a publish that fails withdraws it.

use std::borrow::Cow;

use funcatron_broker::{Broker, BrokerError, Message};
use funcatron_control::names;
use funcatron_envelope::{now_ms, Request};

use crate::{CallError, Calls, Submission, Submitted};

/// Where a call's status is read.
pub const CALLS_PATH: &str = "/_funcatron/calls";
/// The header that opens a call's answer.
pub const SECRET_HEADER: &str = "x-call-secret";
/// How long an asynchronous call may wait for its first attempt.
pub const MAX_AGE_MS: u64 = 6 * 3_600_000;
/// How long a finished call's record is kept, until the Func's policy
/// (applied by the Tron) says otherwise.
pub const RETENTION_MS: u64 = 24 * 3_600_000;
/// How long an `Idempotency-Key` names its first call.
pub const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3_600_000;

/// How an async call gets queued: its record kept, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Async {
    /// Recorded, pollable, retried.
    Recorded,
    /// Fire-and-forget.
    NoResult,
}

/// Is a request with these headers (name, value) asynchronous, and how?
/// `Prefer: respond-async`, `X-Funcatron-Async: true` (or `1`), tinyFaaS's
/// `X-tinyFaaS-Async` (any value but `false`): recorded;
/// `X-Funcatron-Async: no-result`: fire-and-forget.
pub fn mode(headers: &[(&str, &str)]) -> Option<Async> {
    let first = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    match first("x-funcatron-async").map(str::to_ascii_lowercase) {
        Some(v) if v == "no-result" => return Some(Async::NoResult),
        Some(v) if v == "true" || v == "1" => return Some(Async::Recorded),
        _ => {}
    }
    if first("x-tinyfaas-async").is_some_and(|v| !v.eq_ignore_ascii_case("false")) {
        return Some(Async::Recorded);
    }
    let prefer = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("prefer"))
        .flat_map(|(_, v)| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"));
    prefer.then_some(Async::Recorded)
}

/// A callback URL a client may give: http or https, bounded. (Where it
/// may point is checked when it is called, by the outbound policy.)
pub fn check_callback_url(url: &str) -> Result<(), String> {
    let ok = url.len() <= 2048
        && (url.starts_with("http://") || url.starts_with("https://"))
        && !url.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "X-Callback-Url {url:?} is not an http(s) URL of at most 2048 characters"
        ))
    }
}

/// An `Idempotency-Key` worth keeping: 1 to 256 characters (others are
/// ignored, as if not sent).
pub fn idempotency_key(raw: Option<&str>) -> Option<&str> {
    raw.map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 256)
}

/// `base` (a request as the ingress saw it) as the first attempt of call
/// `call_id`: async, deadline at the maximum age, answered to
/// `funcatron.outcomes` when recorded, to no one when fire-and-forget.
pub fn first_attempt<'a>(
    base: Request<'a>,
    call_id: &'a str,
    callback: Option<&'a str>,
    mode: Async,
) -> Request<'a> {
    let sent_ms = now_ms();
    Request {
        deadline_ms: sent_ms as u64 + MAX_AGE_MS,
        sent_ms,
        reply_to: (mode == Async::Recorded).then_some(Cow::Borrowed(names::OUTCOMES)),
        reply_key: None,
        is_async: true,
        call_id: Some(Cow::Borrowed(call_id)),
        callback_url: callback.map(Cow::Borrowed),
        attempt: Some(1),
        submitted_ms: Some(sent_ms as u64),
        ..base
    }
}

/// What [`queue`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Queued {
    /// The call is recorded (when recorded) and on the broker.
    New,
    /// The idempotency key names this earlier call; nothing was queued.
    Existing(String),
}

/// Why a call was not queued (the client gets a 503: nothing was).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The record could not be written.
    #[error("the call could not be recorded: {0}")]
    StateStore(CallError),
    /// The broker did not take the message (the record is withdrawn).
    #[error("the call could not be queued: {0}")]
    Broker(BrokerError),
}

impl Refused {
    /// The error code the client sees.
    pub fn code(&self) -> &'static str {
        match self {
            Refused::StateStore(_) => "state_store_unavailable",
            Refused::Broker(_) => "broker_unavailable",
        }
    }

    /// The message the client sees.
    pub fn message(&self) -> String {
        match self {
            Refused::StateStore(_) => "the call could not be recorded; nothing was queued".into(),
            Refused::Broker(e) => format!("the call could not be queued: {e}"),
        }
    }
}

/// Publish `message` onto the Func queue `routed` names, with its routing
/// headers (an ingress routing at the edge), or to `funcatron.requests`
/// for a Tron to route: without a route, and when the Func queue is gone
/// (a version retired since the table was sent; the Tron routes by its
/// newer table). The one publish of the embedded ingress's synchronous
/// requests and of every submission of an async call.
pub async fn publish_routed<B: Broker>(
    broker: &B,
    message: Message,
    routed: Option<(String, Vec<(String, String)>)>,
) -> Result<(), BrokerError> {
    let Some((queue, headers)) = routed else {
        return broker.publish(names::REQUESTS, message).await;
    };
    let Message {
        payload,
        ttl_ms,
        persistent,
        ..
    } = message;
    let edge = Message {
        payload: payload.clone(),
        headers,
        ttl_ms,
        persistent,
    };
    match broker.publish(&queue, edge).await {
        Err(BrokerError::NoRoute(_)) => {
            metrics::counter!("edge_fallbacks_total").increment(1);
            let via_tron = Message {
                payload,
                headers: Vec::new(),
                ttl_ms,
                persistent,
            };
            broker.publish(names::REQUESTS, via_tron).await
        }
        other => other,
    }
}

/// Record `request` (when `calls` is given: a recorded call) and publish
/// it persistent with confirm, onto the Func's async queue when `routed`
/// names it with the routing headers (the ingress routed it at the
/// edge), else on `funcatron.requests` ([`publish_routed`]); a failed
/// publish withdraws the record.
pub async fn queue<B: Broker>(
    calls: Option<&Calls>,
    broker: &B,
    request: &Request<'_>,
    secret: &str,
    idempotency: Option<&str>,
    routed: Option<(String, Vec<(String, String)>)>,
) -> Result<Queued, Refused> {
    let payload: bytes::Bytes = request.encode().into();
    if let Some(calls) = calls {
        let submission = Submission {
            request,
            encoded: &payload,
            secret,
            idempotency: idempotency.map(|k| (k, IDEMPOTENCY_WINDOW_MS)),
            retention_ms: RETENTION_MS,
            expires_ms: request.sent_ms as u64 + MAX_AGE_MS + RETENTION_MS,
        };
        match calls.submit(submission).await {
            Ok(Submitted::New) => {}
            Ok(Submitted::Existing(first)) => return Ok(Queued::Existing(first)),
            Err(e) => return Err(Refused::StateStore(e)),
        }
    }
    let message = Message {
        payload,
        persistent: true,
        ..Message::default()
    };
    if let Err(e) = publish_routed(broker, message, routed).await {
        if let (Some(calls), Some(id)) = (calls, request.call_id.as_deref()) {
            let _ = calls.withdraw(id).await;
        }
        return Err(Refused::Broker(e));
    }
    Ok(Queued::New)
}

/// Where call `call_id`'s status is read.
pub fn status_url(call_id: &str) -> String {
    format!("{CALLS_PATH}/{call_id}")
}

/// The 202's headers: `X-Call-Id`, `Location` (the status URL) and, for a
/// new recorded call, `X-Call-Secret`.
pub fn accepted_headers(call_id: &str, secret: Option<&str>) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("x-call-id", call_id.to_owned()),
        ("location", status_url(call_id)),
    ];
    h.extend(secret.map(|s| (SECRET_HEADER, s.to_owned())));
    h
}

/// The 202's JSON body: the call id, where its status is, the request id,
/// and (for a new recorded call) the secret that opens its answer.
pub fn accepted_body(request_id: &str, call_id: &str, secret: Option<&str>) -> String {
    let mut body = serde_json::json!({
        "call_id": call_id,
        "status_url": status_url(call_id),
        "request_id": request_id,
    });
    if let Some(sec) = secret {
        body["secret"] = serde_json::Value::String(sec.to_owned());
    }
    body.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(h: &[(&'static str, &'static str)]) -> Option<Async> {
        mode(h)
    }

    #[test]
    fn header_forms_name_the_mode() {
        assert_eq!(
            m(&[("Prefer", "wait=5, respond-async")]),
            Some(Async::Recorded)
        );
        assert_eq!(m(&[("x-funcatron-async", "true")]), Some(Async::Recorded));
        assert_eq!(
            m(&[("x-funcatron-async", "no-result")]),
            Some(Async::NoResult)
        );
        assert_eq!(m(&[("x-tinyfaas-async", "")]), Some(Async::Recorded));
        assert_eq!(m(&[("x-tinyfaas-async", "false")]), None);
        assert_eq!(m(&[("accept", "*/*")]), None);
        assert!(check_callback_url("ftp://x").is_err());
        assert!(check_callback_url("http://x/y").is_ok());
        assert_eq!(idempotency_key(Some("  ")), None);
    }
}

//! The Funcatron wire format, envelope v1.
//!
//! Every hop of a request's path speaks these envelopes: the ingress (Rust or
//! nginx/Lua) encodes an HTTP request as a [`Request`] and enqueues it; the
//! Tron reads a cheap [`RouteView`] of it to route, forwarding the bytes
//! untouched; the Runner decodes the whole [`Request`], invokes the Func and
//! publishes a [`Response`] to the request's reply destination, which the
//! ingress turns back into HTTP. `docs/wire.md` is the normative description;
//! the JSON files in `envelope/vectors/` are checked by this crate's tests and
//! by the Lua ingress.
//!
//! Borrowing: every string field is a `Cow<str>`, so the ingress encodes
//! straight from the HTTP request it holds and the Tron decodes without
//! copying strings that carry no JSON escapes.

#![warn(clippy::too_many_lines)]

pub mod flow;

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The envelope version this build writes.
pub const VERSION: &str = "1.3";
/// The major version this build reads; any other major is dead-lettered.
pub const MAJOR: u32 = 1;

/// Why an envelope could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not an envelope of any version we recognise.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A well-formed envelope of a major version this build does not speak.
    #[error("unsupported envelope version {0:?} (this build reads major version {MAJOR})")]
    UnsupportedVersion(String),
}

impl EnvelopeError {
    /// A bounded label for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            EnvelopeError::Malformed(_) => "malformed",
            EnvelopeError::UnsupportedVersion(_) => "unsupported_version",
        }
    }
}

/// An HTTP header as it travels: name (lower-case) and value, in arrival order.
/// Repeated headers appear once per value.
pub type Header<'a> = (Cow<'a, str>, Cow<'a, str>);

/// A request envelope: one HTTP request on its way to a Func.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Request<'a> {
    /// `major.minor`; readers accept any minor of their major.
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// Request id: the client's `X-Request-Id` when sane, else generated.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// Absolute deadline, Unix epoch milliseconds. Work past it is skipped.
    pub deadline_ms: u64,
    /// When the ingress enqueued the request, Unix epoch milliseconds with a
    /// fraction; the Runner derives queue wait from it.
    #[serde(default)]
    pub sent_ms: f64,
    /// HTTP method, upper case.
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// `http` or `https`, as the client used.
    #[serde(borrow, default = "default_scheme")]
    pub scheme: Cow<'a, str>,
    /// The `Host` the client asked for, port included when given.
    #[serde(borrow, default)]
    pub host: Cow<'a, str>,
    /// The path, still percent-encoded, without the query.
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    /// The raw query string without `?`; empty when none.
    #[serde(borrow, default)]
    pub query: Cow<'a, str>,
    /// Headers in arrival order, names lower-case, repeats kept.
    #[serde(borrow, default)]
    pub headers: Vec<Header<'a>>,
    /// The client's address (`ip:port`) as the ingress saw it.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<Cow<'a, str>>,
    /// The body: UTF-8 text as is, or base64 when `body_base64` is set.
    #[serde(borrow, default)]
    pub body: Cow<'a, str>,
    /// Set when `body` is base64 of bytes that are not UTF-8.
    #[serde(default, skip_serializing_if = "is_false")]
    pub body_base64: bool,
    /// Queue the response goes to; absent means fire-and-forget.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Cow<'a, str>>,
    /// Opaque per-attempt token the responder copies into the response, so
    /// the requester can tell this attempt's answer from a late answer to an
    /// earlier attempt that used the same request id.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reply_key: Option<Cow<'a, str>>,
    /// An asynchronous call (1.1): the client was answered 202 with
    /// [`Request::call_id`]; the Tron routes it to the Func's async queue
    /// and its outcome is recorded (and POSTed to
    /// [`Request::callback_url`]) rather than awaited. `reply_to`, when
    /// set, names where the outcome goes (the outcomes queue), not a
    /// waiting client.
    #[serde(rename = "async", default, skip_serializing_if = "is_false")]
    pub is_async: bool,
    /// The call's id (1.1): unguessable, made by the ingress, the key of
    /// its status record. Present on asynchronous calls.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<Cow<'a, str>>,
    /// Where the outcome of an asynchronous call is POSTed (1.1).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<Cow<'a, str>>,
    /// Which attempt this is, from 1 (1.1); absent: the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How many attempts the call gets in all (1.1); absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The delay scheduled before this attempt, in ms (1.1); 0 or absent:
    /// none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
    /// When the call was accepted, Unix epoch ms (1.1): its age (for a
    /// maximum event age) counts from here across attempts; absent: the
    /// same as `sent_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_ms: Option<u64>,
    /// Direct mode (1.2): only the head travels; `body` is empty. The
    /// Runner that takes it answers with [`Response::direct_url`], where
    /// the ingress then sends the body and reads the answer over HTTP.
    #[serde(default, skip_serializing_if = "is_false")]
    pub direct: bool,
    /// A chain (1.3): this request is stage [`Chain::at`] of it. The
    /// Runner that answers it sends a 2xx answer on to the next stage's
    /// Func queue as that stage's request, and only the last stage (or
    /// the first that fails) replies to `reply_to`.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Chain<'a>>,
    /// A pipeline (1.3): this request is the current `apply` step of the
    /// flow whose state this is ([`flow::FlowState`]); the Runner that
    /// answers it continues the flow.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<flow::FlowState<'a>>,
}

/// A chain of Funcs (`a | b | c`) resolved by its router (an ingress at
/// the edge, or a Tron): every stage's queue and routing outcome, so a
/// Runner forwards without a route table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Chain<'a> {
    /// Which stage this request is, from 0.
    pub at: u32,
    /// Every stage, the first included.
    #[serde(borrow)]
    pub stages: Vec<ChainStage<'a>>,
    /// The Func's run time of each stage done so far, in ms (for the
    /// final answer's `Server-Timing`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec_ms: Vec<f64>,
}

/// One stage of a [`Chain`]: the request it makes and where it goes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChainStage<'a> {
    /// The Func.
    #[serde(borrow)]
    pub func: Cow<'a, str>,
    /// Its version's queue of synchronous requests.
    #[serde(borrow)]
    pub queue: Cow<'a, str>,
    /// The stage's request method.
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// Its Host: the Func's primary host, else the caller's.
    #[serde(borrow, default)]
    pub host: Cow<'a, str>,
    /// Its path, the Func's base path included.
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    /// Its query string: the stage's options.
    #[serde(borrow, default)]
    pub query: Cow<'a, str>,
    /// The routing outcome as message headers
    /// (`funcatron_routes::Route::headers`).
    #[serde(borrow, default)]
    pub headers: Vec<Header<'a>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_scheme() -> Cow<'static, str> {
    Cow::Borrowed("http")
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The few request fields the Tron needs to route, decoded without touching
/// the rest (the body is skipped, not copied).
#[derive(Debug, Deserialize)]
pub struct RouteView<'a> {
    /// See [`Request::version`].
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// See [`Request::id`].
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// See [`Request::deadline_ms`].
    pub deadline_ms: u64,
    /// See [`Request::method`].
    #[serde(borrow)]
    pub method: Cow<'a, str>,
    /// See [`Request::host`].
    #[serde(borrow, default)]
    pub host: Cow<'a, str>,
    /// See [`Request::path`].
    #[serde(borrow)]
    pub path: Cow<'a, str>,
    /// See [`Request::reply_to`].
    #[serde(borrow, default)]
    pub reply_to: Option<Cow<'a, str>>,
    /// See [`Request::reply_key`].
    #[serde(borrow, default)]
    pub reply_key: Option<Cow<'a, str>>,
    /// See [`Request::is_async`]: routed to the Func's async queue.
    #[serde(rename = "async", default)]
    pub is_async: bool,
    /// See [`Request::direct`]: the Tron marks the message for the Runner.
    #[serde(default)]
    pub direct: bool,
    /// See [`Request::call_id`]: copied into the Tron's own answers.
    #[serde(borrow, default)]
    pub call_id: Option<Cow<'a, str>>,
    /// The request header [`FUNC_HEADER`], when present: the call names
    /// its Func (an ingress's `/function/<func>/...` path); the other
    /// headers are skipped.
    #[serde(borrow, rename = "headers", default, deserialize_with = "named_func")]
    pub func: Option<Cow<'a, str>>,
}

/// The request header naming the Func a call is for (set by an ingress,
/// never by a client: `funcatron_control::headers::FUNC`).
pub const FUNC_HEADER: &str = "x-funcatron-func";

/// One `[name, value]` header pair, borrowed where it can be.
#[derive(Deserialize)]
struct Pair<'a>(#[serde(borrow)] Cow<'a, str>, #[serde(borrow)] Cow<'a, str>);

/// The value of the first [`FUNC_HEADER`] of a header list.
fn named_func<'de, D>(d: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Find;
    impl<'de> serde::de::Visitor<'de> for Find {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of [name, value] pairs")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(Pair(k, v)) = seq.next_element::<Pair<'de>>()? {
                if found.is_none() && k.eq_ignore_ascii_case(FUNC_HEADER) {
                    found = Some(v);
                }
            }
            Ok(found)
        }
    }
    d.deserialize_seq(Find)
}

/// Time spent on the way, reported back so the ingress can emit `Server-Timing`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From the ingress enqueueing the request to the Tron forwarding it
    /// (0 when the Tron did not say).
    #[serde(default)]
    pub dispatch_ms: f64,
    /// Waiting in the Func's queue: from the Tron forwarding the request
    /// (or the ingress enqueueing it) to a Runner picking it up.
    #[serde(default)]
    pub queue_ms: f64,
    /// Inside the Func.
    #[serde(default)]
    pub exec_ms: f64,
}

impl Timings {
    /// The `Server-Timing` header value, given the ingress's own total.
    pub fn server_timing(&self, total_ms: f64) -> String {
        format!(
            "dispatch;dur={:.3}, queue;dur={:.3}, exec;dur={:.3}, total;dur={:.3}",
            self.dispatch_ms, self.queue_ms, self.exec_ms, total_ms
        )
    }
}

/// A response envelope: a Func's answer or a platform error, on its way back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response<'a> {
    /// `major.minor`, as for requests.
    #[serde(borrow)]
    pub version: Cow<'a, str>,
    /// The request id this answers.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    /// HTTP status.
    pub status: u16,
    /// Response headers in order, repeats kept.
    #[serde(borrow, default)]
    pub headers: Vec<Header<'a>>,
    /// The body, encoded as for requests.
    #[serde(borrow, default)]
    pub body: Cow<'a, str>,
    /// Set when `body` is base64.
    #[serde(default, skip_serializing_if = "is_false")]
    pub body_base64: bool,
    /// Where the time went.
    #[serde(default)]
    pub timings: Timings,
    /// The request's `reply_key`, copied back.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reply_key: Option<Cow<'a, str>>,
    /// The call this is the outcome of (1.1): copied from
    /// [`Request::call_id`] by the responder.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<Cow<'a, str>>,
    /// The attempt this is the outcome of (1.1), copied from
    /// [`Request::attempt`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The answer to a [`Request::direct`] request (1.2): a one-time URL
    /// on the Runner that took it, where the ingress sends the request
    /// (its body) and reads the Func's answer, streamed. `status`,
    /// `headers` and `body` are unused.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub direct_url: Option<Cow<'a, str>>,
}

/// Encode bytes as an envelope body: borrowed text when UTF-8, else base64.
pub fn encode_body(bytes: &[u8]) -> (Cow<'_, str>, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Cow::Borrowed(s), false),
        Err(_) => (
            Cow::Owned(base64::engine::general_purpose::STANDARD.encode(bytes)),
            true,
        ),
    }
}

/// Decode an envelope body back to bytes.
pub fn decode_body(body: &str, base64: bool) -> Result<Cow<'_, [u8]>, EnvelopeError> {
    if base64 {
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .map(Cow::Owned)
            .map_err(|e| EnvelopeError::Malformed(format!("body is not valid base64: {e}")))
    } else {
        Ok(Cow::Borrowed(body.as_bytes()))
    }
}

/// The major number of a `major.minor` version string.
pub fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

#[derive(Deserialize)]
struct VersionProbe<'a> {
    #[serde(borrow)]
    version: Option<Cow<'a, str>>,
}

fn check_version(version: &str) -> Result<(), EnvelopeError> {
    if major(version) == Some(MAJOR) {
        Ok(())
    } else {
        Err(EnvelopeError::UnsupportedVersion(version.to_owned()))
    }
}

/// Decode as `T`; on failure, tell a foreign version apart from garbage.
fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    version_of: impl Fn(&T) -> &str,
) -> Result<T, EnvelopeError> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) => {
            check_version(version_of(&v))?;
            Ok(v)
        }
        Err(e) => {
            if let Ok(VersionProbe {
                version: Some(version),
            }) = serde_json::from_slice::<VersionProbe>(bytes)
            {
                check_version(&version)?;
            }
            Err(EnvelopeError::Malformed(e.to_string()))
        }
    }
}

impl<'a> Request<'a> {
    /// Make this request attempt `attempt` of its call, sent `delay_ms`
    /// from now, with the same time to run as before (a retry of an
    /// asynchronous call or of a flow's step).
    pub fn retry_as(&mut self, attempt: u32, delay_ms: u64) {
        let span = self.deadline_ms as f64 - self.sent_ms;
        self.attempt = Some(attempt);
        self.delay_ms = delay_ms;
        self.sent_ms = now_ms() + delay_ms as f64;
        self.deadline_ms = (self.sent_ms + span.max(1.0)) as u64;
    }

    /// Decode and check the version.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        decode(bytes, |r: &Request| &r.version)
    }

    /// Encode to JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The body as bytes.
    pub fn body_bytes(&self) -> Result<Cow<'_, [u8]>, EnvelopeError> {
        decode_body(&self.body, self.body_base64)
    }

    /// All values of a header (name compared case-insensitively).
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }
}

impl<'a> RouteView<'a> {
    /// Decode the routing fields and check the version.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        decode(bytes, |r: &RouteView| &r.version)
    }
}

impl<'a> Response<'a> {
    /// Decode and check the version.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        decode(bytes, |r: &Response| &r.version)
    }

    /// Encode to JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The body as bytes.
    pub fn body_bytes(&self) -> Result<Cow<'_, [u8]>, EnvelopeError> {
        decode_body(&self.body, self.body_base64)
    }

    /// A platform error answer: JSON body `{"error", "message", "request_id"}`.
    pub fn error(id: &str, status: u16, code: &str, message: &str) -> Response<'static> {
        Response {
            version: Cow::Borrowed(VERSION),
            id: Cow::Owned(id.to_owned()),
            status,
            headers: vec![(
                Cow::Borrowed("content-type"),
                Cow::Borrowed("application/json"),
            )],
            body: Cow::Owned(error_body(id, code, message)),
            body_base64: false,
            timings: Timings::default(),
            reply_key: None,
            call_id: None,
            attempt: None,
            direct_url: None,
        }
    }
}

/// The JSON body of every platform error: `{"error": code, "message": ..., "request_id": ...}`.
pub fn error_body(id: &str, code: &str, message: &str) -> String {
    serde_json::json!({"error": code, "message": message, "request_id": id}).to_string()
}

/// Is a client-supplied request id safe to adopt? 1 to 128 characters of
/// `A-Z a-z 0-9 - _ . :`; anything else is replaced by a generated id.
pub fn sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A fresh request id (UUID v4, simple form).
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Now as Unix epoch milliseconds with a fraction.
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

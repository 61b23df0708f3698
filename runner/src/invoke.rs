//! The steps around an invocation, run by the serve loop
//! ([`crate::serve`]) for every runtime: decoding the envelope, skipping
//! expired work, checking the request (400 `validation_failed`, 415
//! `unsupported_media_type`), and mapping Func results and failures to
//! response envelopes with timings. A Func's answer whose operation's
//! responses are to be checked is handed back beside its envelope, so the
//! serve loop checks it after the reply is published.

use std::borrow::Cow;
use std::time::Instant;

use std::sync::Arc;

use bytes::Bytes;
use funcatron_bundle::auth::{AuthInput, Guard, Principal};
use funcatron_bundle::cors::Cors;
use funcatron_bundle::validate::{Checks, Input, Refusal, ResponseChecks};
use funcatron_envelope::{encode_body, now_ms, EnvelopeError, Request, Response, Timings, VERSION};

/// One delivery, as the serve loop handles it.
#[derive(Debug)]
pub struct Job {
    /// The request envelope bytes, as the ingress wrote them.
    pub payload: Bytes,
    /// The `operationId` the Tron routed to (names the handler).
    pub operation: String,
    /// Path parameters the Tron extracted.
    pub params: Vec<(String, String)>,
    /// When the Runner took the message off the queue (epoch ms).
    pub picked_ms: f64,
    /// When the Tron forwarded it (epoch ms), if it said.
    pub dispatched_ms: Option<f64>,
    /// The operation's request checks from the API document, if any.
    pub checks: Option<Arc<Checks>>,
    /// The security requirement to pass first, for a secured operation.
    pub auth: Option<AuthJob>,
    /// The operation's documented responses, when the Func's answers are
    /// to be checked (`check_responses`); `None` costs nothing.
    pub responses: Option<Arc<ResponseChecks>>,
    /// The Runner's observer: failures are reported to `funcatron logs`.
    pub observer: crate::observe::Observer,
    /// Largest answer body sent as one message; larger answers 502.
    pub max_reply_bytes: usize,
    /// Answer failures with their full detail (tracebacks, paths, stderr)
    /// instead of a generic message: the Func's `debug` setting or the
    /// Runner's `--debug-errors` (dev mode). See
    /// [`InvokeError::client_message`].
    pub debug: bool,
    /// The Func's CORS policy: answers to allowed origins carry its
    /// headers.
    pub cors: Option<Arc<Cors>>,
    /// An `OPTIONS` the Tron sent as a preflight ([`preflight`]).
    pub preflight: Option<PreflightJob>,
    /// The Func's async policy takes only asynchronous calls: a
    /// synchronous one is refused (400 `async_only`) without running it,
    /// whatever an ingress let through.
    pub async_only: bool,
    /// A direct request's body, read whole by the direct listener (the
    /// envelope carries none): used instead of the envelope's.
    pub direct_body: Option<Bytes>,
    /// A direct request's streams ([`crate::direct`]): its body in pieces
    /// (when not read whole) and its answer, written in pieces.
    pub direct: Option<Arc<crate::direct::DirectIo>>,
    /// The Func's way to the document store, when its bundle declares
    /// collections (`store`).
    pub store: Option<Arc<crate::store::StoreScope>>,
}

/// What the Tron says about an `OPTIONS` on a path without an `options`
/// operation.
#[derive(Debug)]
pub struct PreflightJob {
    /// The path's methods (`GET, POST`).
    pub allow: String,
    /// The path template.
    pub template: String,
}

/// What the serve loop does with one delivery.
#[derive(Debug)]
pub enum Handled {
    /// Publish `response` to `reply_to` (if any), then acknowledge.
    Reply {
        /// The request id.
        request_id: String,
        /// Where to send it; `None` for fire-and-forget requests.
        reply_to: Option<String>,
        /// HTTP status, for metrics.
        status: u16,
        /// The encoded response envelope.
        response: Vec<u8>,
        /// The Func's own answer, to check against its document once the
        /// reply is out (only when [`Job::responses`] is set).
        unchecked: Option<Box<Unchecked>>,
    },
    /// The deadline passed before the Func ran; the ingress has answered.
    Expired {
        /// The request id.
        request_id: String,
    },
    /// Not a request envelope we can read: dead-letter it.
    Undecodable(String),
    /// The runtime could not take it (shutting down): put the request
    /// back for another Runner.
    Requeue(String),
}

/// A secured operation's check: the Func's guard and the route (`None`:
/// the message did not say, so the request is refused).
#[derive(Debug)]
pub struct AuthJob {
    /// The document's schemes with their credentials.
    pub guard: Arc<Guard>,
    /// The routed operation (`METHOD /template`).
    pub route: Option<String>,
}

/// A Func's answer and what its operation documents, checked by the serve
/// loop after the reply is published.
#[derive(Debug)]
pub struct Unchecked {
    /// The operation (`operationId`) it answered, for the report.
    pub operation: String,
    /// The operation's documented responses.
    pub checks: Arc<ResponseChecks>,
    /// The answer as the Func gave it.
    pub answer: FuncResponse,
}

/// The view of a request a Func runtime gets.
#[derive(Debug)]
pub struct FuncRequest<'a> {
    /// The decoded envelope.
    pub envelope: &'a Request<'a>,
    /// The body bytes (a slice of the payload when it needed no decoding).
    pub body: Bytes,
    /// The `operationId` to run.
    pub operation: &'a str,
    /// Path parameters.
    pub params: &'a [(String, String)],
    /// When the Func must have answered.
    pub deadline: Instant,
    /// A direct request's streams: the body in pieces (then
    /// [`FuncRequest::body`] is empty) and the answer, written in pieces
    /// (a runtime that cannot stream answers whole).
    pub direct: Option<Arc<crate::direct::DirectIo>>,
    /// Largest answer body ([`Job::max_reply_bytes`]): what a runtime
    /// collects of an answer written in pieces, when it is not streamed.
    pub max_reply_bytes: usize,
    /// The Func's way to the document store ([`Job::store`]).
    pub store: Option<Arc<crate::store::StoreScope>>,
}

/// A Func's answer.
#[derive(Debug, Default)]
pub struct FuncResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Why a Func did not answer.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// It ran past its time limit.
    #[error("time limit exceeded: {0}")]
    Timeout(String),
    /// It ran past its memory limit.
    #[error("memory limit exceeded: {0}")]
    Memory(String),
    /// It raised an error.
    #[error("{0}")]
    Handler(String),
    /// The request is unusable for it (for example invalid JSON).
    #[error("{0}")]
    BadRequest(String),
    /// The bundle could not be prepared.
    #[error("{0}")]
    Broken(String),
    /// The request does not match the API document; the Func did not run.
    #[error("the request does not match the API document: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The Func's processes cannot be isolated on this Runner; it was not run.
    #[error("{0}")]
    SandboxUnavailable(String),
    /// The worker process died or broke the protocol while handling the
    /// request; it has been replaced.
    #[error("{0}")]
    Crashed(String),
    /// The Func answered more than one message may carry.
    #[error("{0}")]
    ReplyTooLarge(String),
    /// The request's body is of a content type the operation does not
    /// declare; the Func did not run.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// An `OPTIONS` on a path without an `options` operation that is not
    /// a preflight the Func's CORS policy answers; the path's methods.
    #[error("OPTIONS is not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        /// The request's path.
        path: String,
        /// The path's methods.
        allow: String,
    },
    /// A CORS preflight the Func's policy refuses (the browser will not
    /// send the call).
    #[error("{0}")]
    CorsRefused(String),
    /// A synchronous call to a Func whose async policy is `async_only`;
    /// the Func did not run.
    #[error("Func {0} takes only asynchronous calls with a callback (Prefer: respond-async and X-Callback-Url)")]
    AsyncOnly(String),
    /// The request does not pass the operation's security requirement
    /// (401), or lacks a scope (403); the Func did not run.
    #[error("{reason}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// `WWW-Authenticate`'s challenges.
        challenge: String,
        /// Why (never a credential).
        reason: String,
    },
}

/// What the client reads instead of a hidden failure's detail; every one
/// points at the Func's log, where the detail is, under the answer's
/// `request_id`.
pub mod hidden {
    /// For [`super::InvokeError::Handler`].
    pub const HANDLER: &str =
        "the Func raised an error; its log has the details under this request_id";
    /// For [`super::InvokeError::Broken`].
    pub const BROKEN: &str = "the Func's bundle cannot run on this Runner (it failed to load or prepare); its log has the details under this request_id";
    /// For [`super::InvokeError::Crashed`].
    pub const CRASHED: &str = "the Func's worker process failed while handling the request and was replaced; its log has the details under this request_id";
    /// For [`super::InvokeError::SandboxUnavailable`].
    pub const SANDBOX_UNAVAILABLE: &str = "Func isolation is unavailable on this Runner, so the Func was not run; its log has the details under this request_id";
}

impl InvokeError {
    /// The `message` of the client's answer.
    ///
    /// The rule: a client learns what it sent wrong and which public limit
    /// its request hit, never how the Func or the Runner is built. So by
    /// default
    ///
    /// - kept: [`Invalid`](Self::Invalid) (the request's problems against
    ///   the API document), [`UnsupportedMediaType`](Self::UnsupportedMediaType)
    ///   (the content type and the ones accepted), [`BadRequest`](Self::BadRequest) (the body is
    ///   not valid JSON, with the parser's line and column),
    ///   [`ReplyTooLarge`](Self::ReplyTooLarge) (the answer's size and the
    ///   limit), [`Timeout`](Self::Timeout) (the limit in ms, or that no
    ///   worker was ready) and [`Memory`](Self::Memory) (that the Func's
    ///   limit was exceeded): their texts are made by the Runner from the
    ///   request, sizes and limits, and hold no path or Func output;
    /// - replaced by a generic message ([`hidden`]): [`Handler`](Self::Handler)
    ///   (a traceback, a Lua error with its file and line, an exec
    ///   process's stderr), [`Broken`](Self::Broken) (loader and compiler
    ///   output, build logs, file paths, missing secret files),
    ///   [`Crashed`](Self::Crashed) (how a worker died) and
    ///   [`SandboxUnavailable`](Self::SandboxUnavailable) (the sandbox
    ///   program's path and its probe's output).
    ///
    /// With `detailed` (the Func's `debug` setting, the Runner's
    /// `--debug-errors`, `funcatron dev`) every variant carries its full
    /// text. Either way the full text goes to the Runner's log and the
    /// Func's log.
    pub fn client_message(&self, detailed: bool) -> Cow<'_, str> {
        let generic = match self {
            _ if detailed => return Cow::Owned(self.to_string()),
            InvokeError::Handler(_) => hidden::HANDLER,
            InvokeError::Broken(_) => hidden::BROKEN,
            InvokeError::Crashed(_) => hidden::CRASHED,
            InvokeError::SandboxUnavailable(_) => hidden::SANDBOX_UNAVAILABLE,
            InvokeError::Timeout(_)
            | InvokeError::Memory(_)
            | InvokeError::BadRequest(_)
            | InvokeError::Invalid(_)
            | InvokeError::UnsupportedMediaType(_)
            | InvokeError::MethodNotAllowed { .. }
            | InvokeError::CorsRefused(_)
            | InvokeError::AsyncOnly(_)
            | InvokeError::Unauthorized { .. }
            | InvokeError::ReplyTooLarge(_) => return Cow::Owned(self.to_string()),
        };
        Cow::Borrowed(generic)
    }

    /// The status and error code the client sees.
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            InvokeError::Timeout(_) => (504, "func_timeout"),
            InvokeError::Memory(_) => (500, "func_out_of_memory"),
            InvokeError::Handler(_) => (500, "func_error"),
            InvokeError::BadRequest(_) => (400, "bad_request"),
            InvokeError::Broken(_) => (500, "func_broken"),
            InvokeError::Invalid(_) => (400, "validation_failed"),
            InvokeError::Crashed(_) => (500, "func_crashed"),
            InvokeError::ReplyTooLarge(_) => (502, "reply_too_large"),
            InvokeError::UnsupportedMediaType(_) => (415, "unsupported_media_type"),
            InvokeError::MethodNotAllowed { .. } => (405, "method_not_allowed"),
            InvokeError::CorsRefused(_) => (403, "cors_refused"),
            InvokeError::AsyncOnly(_) => (400, "async_only"),
            InvokeError::Unauthorized { status: 403, .. } => (403, "forbidden"),
            InvokeError::Unauthorized { .. } => (401, "unauthorized"),
            InvokeError::SandboxUnavailable(_) => (503, "sandbox_unavailable"),
        }
    }
}

/// Step 1: decode a job's envelope and body. A text body without escapes
/// is a slice of the payload (no copy); the rest is decoded once.
pub fn decode(job: &Job) -> Result<(Request<'_>, Bytes), EnvelopeError> {
    let req = Request::decode(&job.payload)?;
    if let Some(b) = &job.direct_body {
        return Ok((req, b.clone()));
    }
    let body = match (&req.body, req.body_base64) {
        (Cow::Borrowed(text), false) => {
            let text: &str = text;
            job.payload.slice_ref(text.as_bytes())
        }
        _ => Bytes::from(req.body_bytes()?.into_owned()),
    };
    Ok((req, body))
}

/// The request header that tells a Func who the caller is, as JSON
/// (`{"scheme": ..., "subject": ..., "claims": {...}}`), set by the Runner
/// once a secured operation's requirement passed; one sent by the client is
/// always removed.
pub const AUTH_HEADER: &str = "x-funcatron-auth";

/// The request header that tells a Func which attempt of an asynchronous
/// call it runs (from 1); a client's own is always removed.
pub const ATTEMPT_HEADER: &str = "x-funcatron-attempt";

/// The request header that tells a Func the id of the asynchronous call it
/// runs (the `X-Call-Id` of the 202), the same on every attempt; a client's
/// own is always removed.
pub const CALL_ID_HEADER: &str = "x-funcatron-call-id";

/// Step 1b, between [`decode`] and [`start`]: refuse a synchronous call
/// to an async-only Func; remove a client's [`AUTH_HEADER`]; for a
/// secured operation, check its requirement and tell the Func who passed
/// it.
pub fn authorize(func: &str, job: &Job, req: &mut Request<'_>) -> Result<(), InvokeError> {
    if job.async_only && !req.is_async {
        metrics::counter!("runner_async_only_refused_total", "func" => func.to_owned())
            .increment(1);
        return Err(InvokeError::AsyncOnly(func.to_owned()));
    }
    let ours = |k: &str| {
        k.eq_ignore_ascii_case(AUTH_HEADER)
            || k.eq_ignore_ascii_case(ATTEMPT_HEADER)
            || k.eq_ignore_ascii_case(CALL_ID_HEADER)
    };
    if req.headers.iter().any(|(k, _)| ours(k)) {
        req.headers.retain(|(k, _)| !ours(k));
    }
    if let Some(n) = req.attempt.filter(|_| req.is_async) {
        req.headers
            .push((Cow::Borrowed(ATTEMPT_HEADER), Cow::Owned(n.to_string())));
    }
    if let Some(id) = req.call_id.clone().filter(|_| req.is_async) {
        req.headers.push((Cow::Borrowed(CALL_ID_HEADER), id));
    }
    let Some(auth) = &job.auth else {
        return Ok(());
    };
    match admit(auth, req) {
        Ok(Some(who)) => {
            let json = serde_json::to_string(&who).unwrap_or_default();
            req.headers
                .push((Cow::Borrowed(AUTH_HEADER), Cow::Owned(json)));
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            metrics::counter!("runner_unauthorized_total", "func" => func.to_owned()).increment(1);
            Err(e)
        }
    }
}

/// The security requirement of a secured operation, checked.
fn admit(auth: &AuthJob, req: &Request<'_>) -> Result<Option<Principal>, InvokeError> {
    let Some(route) = &auth.route else {
        return Err(InvokeError::Unauthorized {
            status: 401,
            challenge: String::new(),
            reason: "the request's operation is not known (no route header), and the Func requires authentication".into(),
        });
    };
    auth.guard
        .check(
            route,
            &AuthInput {
                headers: &req.headers,
                query: &req.query,
            },
        )
        .map_err(|f| InvokeError::Unauthorized {
            status: f.status,
            challenge: f.www_authenticate,
            reason: f.reason,
        })
}

/// Step 2: what the Func gets; or, without running it, nothing for a request
/// whose deadline has passed, a 415 for a body of an undeclared content
/// type and a 400 for one that fails its checks. The Func's deadline is the
/// request's, or `max_time_ms` from now if sooner.
pub fn start<'a>(
    func: &str,
    req: &'a Request<'a>,
    body: Bytes,
    job: &'a Job,
    max_time_ms: u64,
) -> Result<FuncRequest<'a>, Handled> {
    let remaining = req.deadline_ms as f64 - now_ms();
    if remaining <= 0.0 && req.is_async {
        // No client waits, but the call's record does: it gets an outcome.
        let why = InvokeError::Timeout("the call passed its deadline before it ran".into());
        return Err(finish(func, job, req, Instant::now(), Err(why)));
    }
    if remaining <= 0.0 {
        return Err(Handled::Expired {
            request_id: req.id.to_string(),
        });
    }
    if let Some(checks) = &job.checks {
        // A body streamed to the Func is not here to check.
        let streamed = job.direct.as_ref().is_some_and(|d| d.streams_body());
        let checked = checks.check_parts(
            streamed,
            &Input {
                params: &job.params,
                query: &req.query,
                headers: &req.headers,
                body: &body,
            },
        );
        if let Err(refusal) = checked {
            metrics::counter!("runner_invalid_requests_total", "func" => func.to_owned())
                .increment(1);
            let why = match refusal {
                Refusal::Invalid(problems) => InvokeError::Invalid(problems),
                Refusal::UnsupportedMediaType(why) => InvokeError::UnsupportedMediaType(why),
            };
            return Err(finish(func, job, req, Instant::now(), Err(why)));
        }
    }
    let budget_ms = remaining.min(max_time_ms as f64);
    let deadline = Instant::now() + std::time::Duration::from_micros((budget_ms * 1000.0) as u64);
    Ok(FuncRequest {
        envelope: req,
        body,
        operation: &job.operation,
        params: &job.params,
        deadline,
        direct: job.direct.clone(),
        max_reply_bytes: job.max_reply_bytes,
        store: job.store.clone(),
    })
}

/// The whole skeleton around a synchronous call, for a runtime that runs
/// it on the thread holding the Func (Lua): the request crosses threads
/// once, undecoded, and its answer comes back encoded.
pub fn run_sync(
    func: &str,
    job: &Job,
    max_time_ms: u64,
    call: impl FnOnce(FuncRequest<'_>) -> crate::runtime::Called,
) -> Handled {
    let (mut req, body) = match decode(job) {
        Ok(r) => r,
        Err(why) => return Handled::Undecodable(why.to_string()),
    };
    if let Err(e) = authorize(func, job, &mut req) {
        return finish(func, job, &req, Instant::now(), Err(e));
    }
    let fr = match start(func, &req, body, job, max_time_ms) {
        Ok(fr) => fr,
        Err(h) => return h,
    };
    let called = call(fr);
    finish(func, job, &req, called.started, called.result)
}

fn header<'r>(req: &'r Request<'_>, name: &str) -> Option<&'r str> {
    req.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

/// A preflight, answered without the Func (and before its security
/// requirement: browsers send no credentials with one): 204 with the CORS
/// headers, 403 `cors_refused` with the reason, or, for a Func without a
/// CORS policy or an `OPTIONS` that is no preflight, 405 with `Allow`.
pub fn preflight(func: &str, job: &Job, p: &PreflightJob) -> Handled {
    let (req, _) = match decode(job) {
        Ok(r) => r,
        Err(why) => return Handled::Undecodable(why.to_string()),
    };
    if req.deadline_ms as f64 <= now_ms() {
        return Handled::Expired {
            request_id: req.id.to_string(),
        };
    }
    let origin = header(&req, "origin");
    let method = header(&req, "access-control-request-method");
    let result = match (&job.cors, origin, method) {
        (Some(cors), Some(origin), Some(method)) => {
            let requested = header(&req, "access-control-request-headers").unwrap_or("");
            match cors.preflight(origin, method, requested, &p.allow, &p.template) {
                Ok(headers) => Ok(FuncResponse {
                    status: 204,
                    headers: headers
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    body: Vec::new(),
                }),
                Err(refused) => Err(InvokeError::CorsRefused(refused.0)),
            }
        }
        _ => Err(InvokeError::MethodNotAllowed {
            path: req.path.to_string(),
            allow: p.allow.clone(),
        }),
    };
    finish(func, job, &req, Instant::now(), result)
}

/// The Func's CORS headers on an answer to `req` (none without a policy
/// or for a preflight, which has its own).
fn cors_headers(job: &Job, req: &Request<'_>) -> Vec<(&'static str, String)> {
    match &job.cors {
        Some(cors) if job.preflight.is_none() => cors.answer_headers(header(req, "origin")),
        _ => Vec::new(),
    }
}

/// An answer travels as one message: one larger than the limit (body and
/// headers) is refused rather than sent.
fn within_reply_limit(fr: FuncResponse, max: usize) -> Result<FuncResponse, InvokeError> {
    let size = fr.body.len()
        + fr.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    if size > max {
        metrics::counter!("runner_replies_too_large_total").increment(1);
        return Err(InvokeError::ReplyTooLarge(format!(
            "the Func's answer is {size} bytes, over the limit of {max} bytes"
        )));
    }
    Ok(fr)
}

/// Step 3: encode the response envelope (or the error) with timings.
pub fn finish(
    func: &str,
    job: &Job,
    req: &Request<'_>,
    started: Instant,
    result: Result<FuncResponse, InvokeError>,
) -> Handled {
    let exec_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (dispatch_ms, queue_ms) = match job.dispatched_ms {
        Some(d) => ((d - req.sent_ms).max(0.0), (job.picked_ms - d).max(0.0)),
        None => (0.0, (job.picked_ms - req.sent_ms).max(0.0)),
    };
    let timings = Timings {
        dispatch_ms,
        queue_ms,
        exec_ms,
    };
    metrics::histogram!("runner_queue_wait_seconds", "func" => func.to_owned())
        .record(queue_ms / 1000.0);
    metrics::histogram!("runner_dispatch_seconds", "func" => func.to_owned())
        .record(dispatch_ms / 1000.0);
    metrics::histogram!("runner_invocation_duration_seconds", "func" => func.to_owned())
        .record(exec_ms / 1000.0);
    let result = result.and_then(|fr| within_reply_limit(fr, job.max_reply_bytes));
    let mut unchecked = None;
    let (status, response) = match result {
        Ok(fr) => {
            let (body, body_base64) = encode_body(&fr.body);
            let cors = cors_headers(job, req);
            let replace = !cors.is_empty();
            let own = fr.headers.iter().filter(|(k, _)| {
                // With a policy, the platform's CORS headers replace the Func's.
                !replace
                    || !k
                        .get(..15)
                        .is_some_and(|p| p.eq_ignore_ascii_case("access-control-"))
            });
            let r = Response {
                version: Cow::Borrowed(VERSION),
                id: Cow::Borrowed(&req.id),
                status: fr.status,
                headers: own
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                    .chain(
                        cors.into_iter()
                            .map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v))),
                    )
                    .collect(),
                body,
                body_base64,
                timings,
                reply_key: req.reply_key.clone(),
                call_id: req.call_id.clone(),
                attempt: req.attempt,
                direct_url: None,
            };
            let encoded = (r.status, r.encode());
            drop(r);
            if let Some(checks) = &job.responses {
                unchecked = Some(Box::new(Unchecked {
                    operation: job.operation.clone(),
                    checks: Arc::clone(checks),
                    answer: fr,
                }));
            }
            encoded
        }
        Err(e) => failure(func, job, req, &e, timings),
    };
    metrics::counter!("runner_invocations_total", "func" => func.to_owned(), "status" => status_class(status)).increment(1);
    Handled::Reply {
        request_id: req.id.to_string(),
        reply_to: req.reply_to.as_ref().map(|r| r.to_string()),
        status,
        response,
        unchecked,
    }
}

/// The envelope of a failure: status, JSON reason, and the headers it
/// calls for (`WWW-Authenticate`, `Allow`, CORS).
fn failure(
    func: &str,
    job: &Job,
    req: &Request<'_>,
    e: &InvokeError,
    timings: Timings,
) -> (u16, Vec<u8>) {
    let (status, code) = e.status_code();
    tracing::warn!(request_id = %req.id, func, operation = %job.operation, error = %e, "Func failed");
    job.observer.func_log(
        func,
        "",
        &req.id,
        "error",
        &crate::observe::log_line(&format!("{} {}: {e}", status, job.operation)),
    );
    let mut r = Response::error(&req.id, status, code, &e.client_message(job.debug));
    if let InvokeError::Unauthorized { challenge, .. } = e {
        if !challenge.is_empty() {
            r.headers.push((
                Cow::Borrowed("www-authenticate"),
                Cow::Owned(challenge.clone()),
            ));
        }
    }
    if let InvokeError::MethodNotAllowed { allow, .. } = e {
        r.headers
            .push((Cow::Borrowed("allow"), Cow::Owned(allow.clone())));
    }
    for (k, v) in cors_headers(job, req) {
        r.headers.push((Cow::Borrowed(k), Cow::Owned(v)));
    }
    if let InvokeError::Invalid(problems) = e {
        r.body = std::borrow::Cow::Owned(
            serde_json::json!({
                "error": code,
                "message": "the request does not match the API document; the Func was not invoked",
                "problems": problems,
                "request_id": req.id,
            })
            .to_string(),
        );
    }
    r.timings = timings;
    r.reply_key = req.reply_key.clone();
    r.call_id = req.call_id.clone();
    r.attempt = req.attempt;
    (status, r.encode())
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What each failure tells a client by default: its own input and the
    /// public limits, kept; the Func's and the Runner's insides, hidden.
    #[test]
    fn clients_get_no_internals_unless_detailed() {
        let secret = "/srv/funcatron/cache/f/main.py, line 3";
        let hidden_ones = [
            (
                InvokeError::Handler(format!("Traceback: {secret}")),
                hidden::HANDLER,
            ),
            (
                InvokeError::Broken(format!("javac: {secret}")),
                hidden::BROKEN,
            ),
            (
                InvokeError::Crashed(format!("died: {secret}")),
                hidden::CRASHED,
            ),
            (
                InvokeError::SandboxUnavailable(format!("{secret}: not found")),
                hidden::SANDBOX_UNAVAILABLE,
            ),
        ];
        for (e, generic) in &hidden_ones {
            assert_eq!(e.client_message(false), *generic);
            assert!(e.client_message(true).contains(secret), "{e:?}");
        }
        let kept = [
            InvokeError::Timeout("the Func ran longer than 300 ms".into()),
            InvokeError::Memory("Func `f` exceeded its memory limit".into()),
            InvokeError::BadRequest("request body is not valid JSON: at line 1".into()),
            InvokeError::Invalid(vec!["query parameter `n`: required but missing".into()]),
            InvokeError::UnsupportedMediaType(
                "content-type \"text/plain\" is not accepted; the operation accepts application/json"
                    .into(),
            ),
            InvokeError::ReplyTooLarge(
                "the Func's answer is 9 bytes, over the limit of 8 bytes".into(),
            ),
        ];
        for e in &kept {
            assert_eq!(e.client_message(false), e.to_string());
            assert_eq!(e.client_message(true), e.to_string());
        }
    }
}

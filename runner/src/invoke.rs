//! What every runtime shares around an invocation: decoding the envelope,
//! skipping expired work, mapping Func results and failures to response
//! envelopes with timings. Runtimes call [`process`] on their own worker
//! thread with a closure that runs the Func.

use std::borrow::Cow;
use std::time::Instant;

use bytes::Bytes;
use funcatron_envelope::{encode_body, now_ms, Request, Response, Timings, VERSION};

/// One request handed to a runtime.
#[derive(Debug)]
pub struct Job {
    /// The request envelope bytes, as the ingress wrote them.
    pub payload: Bytes,
    /// The `operationId` the Tron routed to.
    pub operation: String,
    /// Path parameters the Tron extracted.
    pub params: Vec<(String, String)>,
    /// When the Runner took the message off the queue (epoch ms).
    pub picked_ms: f64,
}

/// What the runtime produced for one job.
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
    },
    /// The deadline passed before the Func ran; the ingress has answered.
    Expired {
        /// The request id.
        request_id: String,
    },
    /// Not a request envelope we can read: dead-letter it.
    Undecodable(String),
    /// The runtime could not take the job (shutting down): put the request
    /// back for another Runner.
    Requeue(String),
}

/// The view of a request a Func runtime gets.
pub struct FuncRequest<'a> {
    /// The decoded envelope.
    pub envelope: &'a Request<'a>,
    /// The body bytes.
    pub body: &'a [u8],
    /// The `operationId` to run.
    pub operation: &'a str,
    /// Path parameters.
    pub params: &'a [(String, String)],
    /// When the Func must have answered.
    pub deadline: Instant,
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
}

impl InvokeError {
    /// The status and error code the client sees.
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            InvokeError::Timeout(_) => (504, "func_timeout"),
            InvokeError::Memory(_) => (500, "func_out_of_memory"),
            InvokeError::Handler(_) => (500, "func_error"),
            InvokeError::BadRequest(_) => (400, "bad_request"),
            InvokeError::Broken(_) => (500, "func_broken"),
        }
    }
}

/// Decode `job`, run `invoke` unless the request has expired, and encode the
/// response envelope.
pub fn process(
    func: &str,
    job: &Job,
    max_time_ms: u64,
    invoke: impl FnOnce(&FuncRequest<'_>) -> Result<FuncResponse, InvokeError>,
) -> Handled {
    let req = match Request::decode(&job.payload) {
        Ok(r) => r,
        Err(e) => return Handled::Undecodable(e.to_string()),
    };
    let body = match req.body_bytes() {
        Ok(b) => b,
        Err(e) => return Handled::Undecodable(e.to_string()),
    };
    let now = now_ms();
    let remaining = req.deadline_ms as f64 - now;
    if remaining <= 0.0 {
        return Handled::Expired {
            request_id: req.id.into_owned(),
        };
    }
    let budget_ms = remaining.min(max_time_ms as f64);
    let started = Instant::now();
    let deadline = started + std::time::Duration::from_micros((budget_ms * 1000.0) as u64);
    let fr = FuncRequest {
        envelope: &req,
        body: &body,
        operation: &job.operation,
        params: &job.params,
        deadline,
    };
    let result = invoke(&fr);
    let exec_ms = started.elapsed().as_secs_f64() * 1000.0;
    let timings = Timings {
        queue_ms: (job.picked_ms - req.sent_ms).max(0.0),
        exec_ms,
    };
    metrics::histogram!("runner_invocation_duration_seconds", "func" => func.to_owned())
        .record(exec_ms / 1000.0);
    let (status, response) = match result {
        Ok(fr) => {
            let (body, body_base64) = encode_body(&fr.body);
            let r = Response {
                version: Cow::Borrowed(VERSION),
                id: Cow::Borrowed(&req.id),
                status: fr.status,
                headers: fr
                    .headers
                    .iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                    .collect(),
                body,
                body_base64,
                timings,
            };
            (r.status, r.encode())
        }
        Err(e) => {
            let (status, code) = e.status_code();
            tracing::warn!(request_id = %req.id, func, operation = %job.operation, error = %e, "Func failed");
            let mut r = Response::error(&req.id, status, code, &e.to_string());
            r.timings = timings;
            (status, r.encode())
        }
    };
    metrics::counter!("runner_invocations_total", "func" => func.to_owned(), "status" => status_class(status)).increment(1);
    Handled::Reply {
        request_id: req.id.into_owned(),
        reply_to: req.reply_to.map(Cow::into_owned),
        status,
        response,
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

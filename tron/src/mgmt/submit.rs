//! Asynchronous calls for ingresses without a state store of their own:
//! the nginx ingress hands each async request to a Tron here, and proxies
//! its clients' status reads here, so Lua never talks to the database.
//!
//! client -> nginx (`ingress-lua/`) -> **`POST /v1/calls` (here)**: record
//! the call ([`funcatron_calls::Calls::submit`]), publish it persistent
//! with confirm on `funcatron.requests`, answer 202 -> nginx -> client.
//! Later: client -> nginx -> **`GET /_funcatron/calls/{id}` (here)**, with
//! the semantics of the embedded ingress's (`ingress/src/calls.rs`): open
//! to anyone who has the id, the answer shown only with the call's
//! `X-Call-Secret` or a read or admin token.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use funcatron_calls::submit::{self as shared, Async, Queued, SECRET_HEADER};
use funcatron_envelope::{new_request_id, Request};

use super::{error, role, Role, Shared};

/// Queue an asynchronous call an ingress built.
#[utoipa::path(post, path = "/v1/calls", operation_id = "submitCall",
    security(("token" = ["admin"])),
    request_body(content = Object, description = "the request as an envelope v1 (docs/wire.md), \
        as the ingress built it; its headers say how the call is async (`X-Funcatron-Async: \
        no-result`: fire-and-forget; anything else: recorded), and carry `X-Callback-Url` and \
        `Idempotency-Key`. The Tron sets the call's fields (call id, attempt, deadline, reply)."),
    responses(
        (status = 202, description = "queued: `call_id`, `status_url`, `request_id`, and `secret` \
            for a new recorded call (also as X-Call-Id, Location, X-Call-Secret); a repeated \
            idempotency key answers the first call's id and no secret", body = Object),
        (status = 400, description = "not an envelope, or a bad X-Callback-Url", body = super::api::ApiError),
        (status = 501, description = "no state store for a recorded call", body = super::api::ApiError),
        (status = 503, description = "not recorded or not queued: nothing was", body = super::api::ApiError),
        (status = 401, description = "no or a wrong token", body = super::api::ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = super::api::ApiError),
    ))]
pub(super) async fn submit_call(State(api): Shared, body: Bytes) -> Response {
    let base = match Request::decode(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                400,
                "bad_envelope",
                &format!("not an envelope v1 request: {e}"),
            )
        }
    };
    let pairs: Vec<(&str, &str)> = base
        .headers
        .iter()
        .map(|(n, v)| (n.as_ref(), v.as_ref()))
        .collect();
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    // The ingress sends only async calls; `/async-function/` names no mode.
    let mode = shared::mode(&pairs).unwrap_or(Async::Recorded);
    let callback = first("x-callback-url");
    if let Err(why) = callback.map(shared::check_callback_url).transpose() {
        return error(400, "bad_callback_url", &why);
    }
    let named = first(funcatron_control::headers::FUNC);
    if let Some(refused) = admit(&api, &base, named, callback.is_some()).await {
        return refused;
    }
    let idempotency = shared::idempotency_key(first("idempotency-key"));
    let calls = match (&api.calls, mode) {
        (Some(c), Async::Recorded) => Some(c),
        (_, Async::NoResult) => None,
        (None, Async::Recorded) => {
            return error(
                501,
                "async_unavailable",
                "this Tron has no state store for asynchronous calls (--state-store)",
            )
        }
    };
    let call_id = format!("c{}", new_request_id());
    let secret = new_request_id();
    let request = shared::first_attempt(base.clone(), &call_id, callback, mode);
    let broker = api.registry.broker();
    let (call_id, secret) =
        match shared::queue(calls, broker, &request, &secret, idempotency, None).await {
            Ok(Queued::New) => (call_id.as_str(), calls.map(|_| secret.as_str())),
            Ok(Queued::Existing(first)) => return accepted(&request.id, &first, None),
            Err(e) => {
                tracing::warn!(error = %e, "async call not queued");
                return error(503, e.code(), &e.message());
            }
        };
    metrics::counter!("tron_async_submissions_total").increment(1);
    accepted(&request.id, call_id, secret)
}

/// The Func's admission limits, as the embedded ingress applies them
/// from the broadcast table, here from this Tron's own routes and a fresh
/// read of the Func's async queue: `Some` answer to refuse the call.
async fn admit(
    api: &super::Api,
    req: &Request<'_>,
    named: Option<&str>,
    callback: bool,
) -> Option<Response> {
    use funcatron_broker::Broker;
    use funcatron_control::admission;
    use funcatron_routes::RouteOutcome;
    let table = api.registry.table();
    let outcome = match named {
        Some(func) => table.route_func(func, &req.method, &req.path),
        None => Some(table.route(&req.host, &req.method, &req.path)),
    };
    let Some(RouteOutcome::Found(route)) = outcome else {
        // 404s, 405s and preflights are answered when the call runs.
        return None;
    };
    let info = table.func_infos().iter().find(|f| f.name() == route.func)?;
    let mut a = info.admission().clone();
    if a.max_queued.is_some() {
        // Unknown depth (broker away): admit, as the broadcast does.
        a.full = match api.registry.broker().depth(info.async_queue()).await {
            Ok(d) => admission::is_full(a.max_queued, d.ready),
            Err(_) => false,
        };
    }
    // Fire-and-forget is async too: the same rule.
    let r = admission::refusal(&a, true, callback)?;
    let mut answer = error(r.status, r.code, &r.message);
    if r.status == 429 {
        answer.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(admission::RETRY_AFTER_S),
        );
    }
    Some(answer)
}

/// 202, as the embedded ingress answers it.
fn accepted(request_id: &str, call_id: &str, secret: Option<&str>) -> Response {
    let mut r = (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        shared::accepted_body(request_id, call_id, secret),
    )
        .into_response();
    let h = r.headers_mut();
    for (name, value) in shared::accepted_headers(call_id, secret) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    r
}

/// Where a call is (the embedded ingress's `GET /_funcatron/calls/{id}`).
#[utoipa::path(get, path = "/_funcatron/calls/{id}", operation_id = "callStatus",
    params(
        ("id" = String, Path, description = "the call id (X-Call-Id)"),
        ("x-call-secret" = Option<String>, Header, description = "the secret the 202 gave: shows the answer"),
    ),
    responses(
        (status = 200, description = "the call's state and attempts; its answer too with the \
            call's X-Call-Secret or a read or admin token", body = Object),
        (status = 404, description = "no such call (or its record has expired)", body = super::api::ApiError),
        (status = 501, description = "no state store", body = super::api::ApiError),
        (status = 503, description = "the record could not be read", body = super::api::ApiError),
    ))]
pub(super) async fn call_status(
    State(api): Shared,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let calls = match super::calls::calls_of(&api) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match calls.get(&id).await {
        Ok(Some(call)) => {
            let secret = headers
                .get(SECRET_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim);
            let reveal =
                secret.is_some_and(|s| call.opens(s)) || role(&api, &headers) >= Role::Read;
            Json(call.view(reveal)).into_response()
        }
        Ok(None) => error(404, "unknown_call", &format!("no call {id}")),
        Err(e) => {
            tracing::warn!(error = %e, "call not read");
            error(
                503,
                "state_store_unavailable",
                "the call's record could not be read",
            )
        }
    }
}

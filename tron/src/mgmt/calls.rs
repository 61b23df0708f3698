//! The management API's view of asynchronous calls: one call in full, a
//! Func's dead-letter queue, redrive and purge.
//!
//! ingress -> ... -> outcomes -> the call records (`funcatron_calls`) <-
//! **operators, here** (read token to look, admin token to redrive or
//! purge). A redrive queues the call again from its first attempt on
//! `funcatron.requests`, persistent, as the ingress does.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use funcatron_broker::Broker;
use funcatron_calls::{CallError, CallState};
use funcatron_control::names;
use serde::{Deserialize, Serialize};

use super::{error, Api, Shared};

pub(super) fn calls_of(api: &Api) -> Result<&funcatron_calls::Calls, Box<Response>> {
    api.calls.as_ref().ok_or_else(|| {
        Box::new(error(
            501,
            "async_unavailable",
            "this Tron has no state store for asynchronous calls (--state-store)",
        ))
    })
}

pub(super) fn store_error(e: &CallError) -> Response {
    match e {
        CallError::NotFound(id) => error(404, "unknown_call", &format!("no call {id}")),
        CallError::Corrupt(why) => error(409, "call_not_redrivable", why),
        CallError::Store(e) => error(503, "state_store_unavailable", &e.to_string()),
    }
}

/// One call, its answer included.
#[utoipa::path(get, path = "/v1/calls/{id}", operation_id = "showCall",
    security(("token" = ["read"])),
    params(("id" = String, Path, description = "the call id (X-Call-Id)")),
    responses(
        (status = 200, description = "the call: state, attempts, reason and answer", body = Object),
        (status = 404, description = "no such call", body = super::api::ApiError),
        (status = 501, description = "no state store", body = super::api::ApiError),
        (status = 401, description = "no or a wrong token", body = super::api::ApiError),
    ))]
pub(super) async fn show_call(State(api): Shared, Path(id): Path<String>) -> Response {
    let calls = match calls_of(&api) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match calls.get(&id).await {
        Ok(Some(call)) => Json(call.view(true)).into_response(),
        Ok(None) => error(404, "unknown_call", &format!("no call {id}")),
        Err(e) => store_error(&e),
    }
}

/// Which page of a dead-letter queue.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct Page {
    /// Calls after this id.
    after: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

/// A Func's dead-lettered calls, by id.
#[utoipa::path(get, path = "/v1/funcs/{name}/dlq", operation_id = "listDeadLetters",
    security(("token" = ["read"])),
    params(("name" = String, Path, description = "the Func"), Page),
    responses(
        (status = 200, description = "the calls, oldest id first; pass the last id as `after` for the next page", body = Object),
        (status = 501, description = "no state store", body = super::api::ApiError),
        (status = 401, description = "no or a wrong token", body = super::api::ApiError),
    ))]
pub(super) async fn list_dead(
    State(api): Shared,
    Path(name): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let calls = match calls_of(&api) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    match calls
        .list(&name, CallState::DeadLettered, page.after.as_deref(), limit)
        .await
    {
        Ok(list) => {
            let views: Vec<_> = list.iter().map(|c| c.view(true)).collect();
            Json(serde_json::json!({ "func": name, "calls": views })).into_response()
        }
        Err(e) => store_error(&e),
    }
}

/// Which dead-lettered calls to act on.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Selection {
    /// These calls.
    #[serde(default)]
    ids: Vec<String>,
    /// Every dead-lettered call of the Func.
    #[serde(default)]
    all: bool,
}

/// What a redrive or purge did.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub(super) struct Acted {
    /// The calls acted on.
    ids: Vec<String>,
    /// Those that could not be, with why.
    refused: Vec<(String, String)>,
}

/// The store and the ids a redrive or purge of `func` names.
async fn selection<'a>(
    api: &'a Api,
    func: &str,
    s: Selection,
) -> Result<(&'a funcatron_calls::Calls, Vec<String>), Box<Response>> {
    let calls = calls_of(api)?;
    Ok((calls, selected(calls, func, s).await?))
}

/// The ids a selection names (every dead-lettered call of `func` for
/// `all`).
async fn selected(
    calls: &funcatron_calls::Calls,
    func: &str,
    s: Selection,
) -> Result<Vec<String>, Box<Response>> {
    if !s.all {
        if s.ids.is_empty() {
            return Err(Box::new(error(
                400,
                "bad_request",
                "name the calls (`ids`) or `all`",
            )));
        }
        return Ok(s.ids);
    }
    let mut out = Vec::new();
    loop {
        let page = calls
            .list(
                func,
                CallState::DeadLettered,
                out.last().map(String::as_str),
                1000,
            )
            .await
            .map_err(|e| Box::new(store_error(&e)))?;
        let done = page.len() < 1000;
        out.extend(page.into_iter().map(|c| c.id));
        if done {
            return Ok(out);
        }
    }
}

/// Queue dead-lettered calls again from their first attempt.
#[utoipa::path(post, path = "/v1/funcs/{name}/dlq/redrive", operation_id = "redriveDeadLetters",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    request_body = Selection,
    responses(
        (status = 200, description = "the calls queued again, and those that could not be", body = Acted),
        (status = 400, description = "no calls named", body = super::api::ApiError),
        (status = 501, description = "no state store", body = super::api::ApiError),
        (status = 401, description = "no or a wrong token", body = super::api::ApiError),
    ))]
pub(super) async fn redrive(
    State(api): Shared,
    Path(name): Path<String>,
    Json(s): Json<Selection>,
) -> Response {
    let (calls, ids) = match selection(&api, &name, s).await {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let mut acted = Acted::default();
    let broker = api.registry.broker();
    for id in ids {
        match calls.redrive(&id).await {
            Ok(request) => {
                let message = funcatron_calls::request_message(request);
                match broker.publish(names::REQUESTS, message).await {
                    Ok(()) => acted.ids.push(id),
                    Err(e) => acted.refused.push((id, format!("not queued: {e}"))),
                }
            }
            Err(e) => acted.refused.push((id, e.to_string())),
        }
    }
    Json(acted).into_response()
}

/// Delete dead-lettered calls' records.
#[utoipa::path(post, path = "/v1/funcs/{name}/dlq/purge", operation_id = "purgeDeadLetters",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    request_body = Selection,
    responses(
        (status = 200, description = "the calls deleted, and those that were not there", body = Acted),
        (status = 400, description = "no calls named", body = super::api::ApiError),
        (status = 501, description = "no state store", body = super::api::ApiError),
        (status = 401, description = "no or a wrong token", body = super::api::ApiError),
    ))]
pub(super) async fn purge(
    State(api): Shared,
    Path(name): Path<String>,
    Json(s): Json<Selection>,
) -> Response {
    let (calls, ids) = match selection(&api, &name, s).await {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let mut acted = Acted::default();
    for id in ids {
        match calls.get(&id).await {
            Ok(Some(c)) if c.state == CallState::DeadLettered => match calls.purge(&id).await {
                Ok(true) => acted.ids.push(id),
                Ok(false) => acted.refused.push((id, "not there".into())),
                Err(e) => acted.refused.push((id, e.to_string())),
            },
            Ok(Some(_)) => acted.refused.push((id, "not dead-lettered".into())),
            Ok(None) => acted.refused.push((id, "not there".into())),
            Err(e) => acted.refused.push((id, e.to_string())),
        }
    }
    Json(acted).into_response()
}

/// Which callback key to show.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct KeyFor {
    /// The Func whose callbacks it signs (needed when keys are per Func).
    func: Option<String>,
}

/// The key that signs callbacks.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CallbackKey {
    /// `func` (a key per Func) or `cluster` (one key).
    scope: &'static str,
    /// The Func, for a per-Func key.
    #[serde(skip_serializing_if = "Option::is_none")]
    func: Option<String>,
    /// The HMAC-SHA256 key, hex (use its bytes, hex-decoded).
    key: String,
    /// The header that carries signatures.
    header: &'static str,
}

/// The key a receiver verifies callbacks with: `x-funcatron-signature` is
/// `t=<unix seconds>,v1=<hex HMAC-SHA256(key, "<t>.<call id>.<body>")>`.
#[utoipa::path(get, path = "/v1/callback-key", operation_id = "showCallbackKey",
    security(("token" = ["admin"])),
    params(KeyFor),
    responses(
        (status = 200, description = "the key", body = CallbackKey),
        (status = 400, description = "keys are per Func and no Func was named", body = super::api::ApiError),
        (status = 501, description = "no state store", body = super::api::ApiError),
        (status = 401, description = "no or a wrong token", body = super::api::ApiError),
    ))]
pub(super) async fn callback_key(State(api): Shared, Query(q): Query<KeyFor>) -> Response {
    use funcatron_calls::callbacks::{self, KeyScope};
    let calls = match calls_of(&api) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let scope = calls.key_scope();
    let func = match (scope, q.func) {
        (KeyScope::Func, None) => {
            return error(
                400,
                "func_required",
                "callback keys are per Func on this cluster: name one (?func=NAME)",
            )
        }
        (KeyScope::Func, Some(f)) => Some(f),
        (KeyScope::Cluster, _) => None,
    };
    match callbacks::cluster_key(calls).await {
        Ok(cluster) => {
            let key = callbacks::signing_key(&cluster, scope, func.as_deref().unwrap_or_default());
            Json(CallbackKey {
                scope: match scope {
                    KeyScope::Func => "func",
                    KeyScope::Cluster => "cluster",
                },
                func,
                key: callbacks::hex(&key),
                header: callbacks::SIGNATURE_HEADER,
            })
            .into_response()
        }
        Err(e) => store_error(&e),
    }
}

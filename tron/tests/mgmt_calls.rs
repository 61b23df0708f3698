//! The management API's asynchronous calls: one call in full (with the
//! read token), a Func's dead-letter queue, redrive (the call queued again
//! from its first attempt, on `funcatron.requests`) and purge.

#![allow(clippy::unwrap_used)]

mod common;

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use funcatron_broker::{Broker, ConsumeOptions, QueueKind};
use funcatron_calls::{Applied, CallState, Calls, Submission};
use funcatron_control::calls::AsyncPolicy;
use funcatron_control::names;
use funcatron_envelope::{Request, Response};
use funcatron_store::AnyStore;
use funcatron_tron::mgmt;
use serde_json::{json, Value};

async fn call(app: &axum::Router, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer t")
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .unwrap();
    let r = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
    let status = r.status().as_u16();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A call of Func `f` that failed until it was dead-lettered.
async fn dead_call(calls: &Calls, id: &str) {
    let req = Request {
        version: Cow::Borrowed("1.1"),
        id: Cow::Owned(format!("r-{id}")),
        deadline_ms: 4_000_000_000_000,
        sent_ms: 1.0,
        method: Cow::Borrowed("POST"),
        path: Cow::Borrowed("/f"),
        is_async: true,
        call_id: Some(Cow::Owned(id.to_owned())),
        reply_to: Some(Cow::Borrowed(names::OUTCOMES)),
        attempt: Some(1),
        ..Request::default()
    };
    calls
        .submit(Submission {
            request: &req,
            encoded: &req.encode(),
            secret: "s",
            idempotency: None,
            retention_ms: 60_000,
            expires_ms: 4_000_000_000_000,
        })
        .await
        .unwrap();
    let policy = AsyncPolicy {
        retries: Some(0),
        ..AsyncPolicy::default()
    }
    .resolved()
    .unwrap();
    let mut out = Response::error(&req.id, 500, "func_error", "boom");
    out.call_id = Some(Cow::Owned(id.to_owned()));
    out.attempt = Some(1);
    let applied = calls
        .apply_outcome(&out, Some("f"), &policy, 0.0)
        .await
        .unwrap();
    assert_eq!(applied, Applied::Finished(CallState::DeadLettered));
}

#[tokio::test]
async fn dead_letters_are_listed_shown_redriven_and_purged() {
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let broker = registry.broker().clone();
    broker
        .declare(names::REQUESTS, QueueKind::Work)
        .await
        .unwrap();
    let calls = Calls::new(AnyStore::memory().unwrap());
    for id in ["c1", "c2", "c3"] {
        dead_call(&calls, id).await;
    }
    let app = mgmt::router_with_calls(
        Arc::clone(&registry),
        mgmt::MgmtOptions::new("t"),
        None,
        Some(calls.clone()),
    );

    let (s, v) = call(&app, "GET", "/v1/calls/c1", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "dead_lettered");
    assert_eq!(
        v["result"]["status"], 500,
        "the operator sees the answer: {v}"
    );
    let (s, _) = call(&app, "GET", "/v1/calls/nope", None).await;
    assert_eq!(s, 404);

    let (s, v) = call(&app, "GET", "/v1/funcs/f/dlq?limit=2", None).await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["c1", "c2"]);
    let (_, v) = call(&app, "GET", "/v1/funcs/f/dlq?after=c2", None).await;
    assert_eq!(v["calls"][0]["id"], "c3");

    // Redrive one: queued again, its first attempt on the request queue.
    let mut requests = broker
        .consume(
            names::REQUESTS,
            QueueKind::Work,
            ConsumeOptions {
                prefetch: 10,
                auto_ack: true,
            },
        )
        .await
        .unwrap();
    let (s, v) = call(
        &app,
        "POST",
        "/v1/funcs/f/dlq/redrive",
        Some(json!({"ids": ["c2"]})),
    )
    .await;
    assert_eq!((s, &v["ids"]), (200, &json!(["c2"])), "{v}");
    let d = tokio::time::timeout(std::time::Duration::from_secs(5), requests.next())
        .await
        .unwrap()
        .unwrap();
    let again = Request::decode(&d.message.payload).unwrap();
    assert_eq!(
        (again.call_id.as_deref(), again.attempt),
        (Some("c2"), Some(1))
    );
    assert!(d.message.persistent);
    assert_eq!(
        calls.get("c2").await.unwrap().unwrap().state,
        CallState::Queued
    );
    let (_, v) = call(&app, "GET", "/v1/funcs/f/dlq", None).await;
    assert_eq!(
        v["calls"].as_array().unwrap().len(),
        2,
        "c2 left the queue: {v}"
    );
    // A queued call is not redriven twice.
    let (_, v) = call(
        &app,
        "POST",
        "/v1/funcs/f/dlq/redrive",
        Some(json!({"ids": ["c2"]})),
    )
    .await;
    assert_eq!(v["refused"][0][0], "c2", "{v}");

    // Purge the rest; nothing named is a 400.
    let (s, v) = call(
        &app,
        "POST",
        "/v1/funcs/f/dlq/purge",
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ids"], json!(["c1", "c3"]));
    assert!(calls.get("c1").await.unwrap().is_none());
    let (s, _) = call(&app, "POST", "/v1/funcs/f/dlq/purge", Some(json!({}))).await;
    assert_eq!(s, 400);
    // A token is needed to look.
    let req = axum::http::Request::get("/v1/calls/c2")
        .body(Body::empty())
        .unwrap();
    let r = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
    assert_eq!(r.status(), 401);
}

/// The callback key: per Func by default (a Func must be named), the
/// cluster key under `cluster` scope, the same from two Trons sharing a
/// store, admin token only.
#[tokio::test]
async fn the_callback_key_is_shown_to_the_admin() {
    use funcatron_calls::callbacks::KeyScope;
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let shared = AnyStore::memory().unwrap();
    let per_func = Calls::new(shared.clone());
    let app = mgmt::router_with_calls(
        Arc::clone(&registry),
        mgmt::MgmtOptions::new("t"),
        None,
        Some(per_func),
    );
    let (s, v) = call(&app, "GET", "/v1/callback-key", None).await;
    assert_eq!((s, &v["error"]), (400, &json!("func_required")), "{v}");
    let (s, a) = call(&app, "GET", "/v1/callback-key?func=a", None).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["scope"], "func");
    assert_eq!(a["header"], "x-funcatron-signature");
    let (_, b) = call(&app, "GET", "/v1/callback-key?func=b", None).await;
    let key = |v: &Value| v["key"].as_str().unwrap().to_owned();
    assert_eq!(key(&a).len(), 64, "{a}");
    assert_ne!(key(&a), key(&b), "a key per Func");

    // Another Tron on the same store, one key for the cluster.
    let cluster = Calls::new(shared).with_key_scope(KeyScope::Cluster);
    let other = mgmt::router_with_calls(
        Arc::clone(&registry),
        mgmt::MgmtOptions::new("t"),
        None,
        Some(cluster.clone()),
    );
    let (s, c) = call(&other, "GET", "/v1/callback-key", None).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["scope"], "cluster");
    let stored = funcatron_calls::callbacks::cluster_key(&cluster)
        .await
        .unwrap();
    assert_eq!(key(&c), funcatron_calls::callbacks::hex(&stored));
    assert_ne!(key(&c), key(&a));

    // The read token does not open it.
    let mut opts = mgmt::MgmtOptions::new("t");
    opts.tokens.read = Some("r".into());
    let app = mgmt::router_with_calls(registry, opts, None, Some(cluster));
    let req = axum::http::Request::get("/v1/callback-key")
        .header("authorization", "Bearer r")
        .body(Body::empty())
        .unwrap();
    let r = tower::ServiceExt::oneshot(app, req).await.unwrap();
    assert_eq!(r.status(), 403);
}

//! OpenFaaS-style paths and async admission end to end, in-process on the
//! embedded broker: `/function/<func>/<rest>` and
//! `/async-function/<func>/<rest>`, 404 `unknown_func`, 429 `queue_full`
//! once a Func has `max_queued` async calls waiting (and admission again
//! once they drain), and `async_only` refused at the ingress both ways and
//! by the Runner for a sync request that bypasses the ingress.

#![allow(clippy::unwrap_used)]

mod common;

use std::borrow::Cow;
use std::time::Duration;

use common::*;
use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, EmbeddedBroker, Message, QueueKind};
use funcatron_bundle::Bundle;
use funcatron_calls::Calls;
use funcatron_control::names;
use funcatron_envelope::{now_ms, Request, Response, VERSION};
use funcatron_ingress::IngressOptions;
use funcatron_runner::{RunnerNode, RunnerOptions};
use funcatron_store::AnyStore;
use funcatron_tron::TronNode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn bundle(root: &std::path::Path, name: &str, policy: &str, paths: &str, lua: &str) -> Bundle {
    let doc = format!(
        "swagger: '2.0'\ninfo: {{title: t, version: '1'}}\nbasePath: /{name}\nx-funcatron: {{name: {name}, runtime: lua, async: {policy}}}\npaths:\n{paths}"
    );
    let dir = write_bundle(root, name, &[("swagger.yaml", &doc), ("main.lua", lua)]);
    Bundle::load(&dir).unwrap()
}

/// `plain` echoes its path parameter; `held` (at most 2 calls waiting)
/// has no Runner until the test starts one, so its calls wait; `only`
/// takes only async calls with a callback.
fn bundles(root: &std::path::Path) -> (Vec<Bundle>, Bundle) {
    let plain = bundle(
        root,
        "plain",
        "{}",
        "  /echo/{word}:\n    get: {operationId: echo, parameters: [{name: word, in: path, required: true, type: string}], responses: {'200': {description: ok}}}\n",
        "return { echo = function(r) return r.params.word .. ' ' .. r.path end }",
    );
    let x = "  /x: {post: {operationId: x, responses: {'200': {description: ok}}}}\n";
    let held = bundle(
        root,
        "held",
        "{max_queued: 2}",
        x,
        "return { x = function() return 'held' end }",
    );
    let only = bundle(
        root,
        "only",
        "{async_only: true}",
        x,
        "return { x = function() return 'ran' end }",
    );
    (vec![plain, held.clone(), only], held)
}

async fn call(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = reqwest::Client::new().request(method.parse().unwrap(), format!("{base}{path}"));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let (status, h) = (r.status().as_u16(), r.headers().clone());
    (status, h, r.text().await.unwrap())
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    v["error"].as_str().unwrap_or_default().to_owned()
}

/// The Funcs the ingress's admission table marks full (`None`: no table).
async fn full(base: &str) -> Option<Vec<String>> {
    let (_, _, body) = call(base, "GET", "/_funcatron/health", &[]).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let list = v["queue_full"].as_array()?;
    Some(
        list.iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect(),
    )
}

async fn finished(base: &str, call_id: &str, secret: &str) -> Value {
    let url = format!("{base}/_funcatron/calls/{call_id}");
    let mut last = Value::Null;
    for _ in 0..1500 {
        let r = reqwest::Client::new()
            .get(&url)
            .header("x-call-secret", secret)
            .send()
            .await
            .unwrap();
        last = r.json().await.unwrap();
        if last["state"] != "queued" {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never finished: {last}");
}

/// A sync request straight onto the request queue, past any ingress: the
/// answer the Runner (or Tron) gives it.
async fn bypassing_the_ingress(broker: &AnyBroker, path: &str) -> (u16, String) {
    let reply = names::reply_queue("admission-test");
    let mut sub = broker
        .consume(
            &reply,
            QueueKind::Exclusive,
            ConsumeOptions {
                prefetch: 10,
                auto_ack: true,
            },
        )
        .await
        .unwrap();
    let sent = now_ms();
    let req = Request {
        version: Cow::Borrowed(VERSION),
        id: Cow::Borrowed("bypass-1"),
        deadline_ms: sent as u64 + 20_000,
        sent_ms: sent,
        method: Cow::Borrowed("POST"),
        host: Cow::Borrowed("localhost"),
        path: Cow::Borrowed(path),
        reply_to: Some(Cow::Borrowed(&reply)),
        ..Request::default()
    };
    broker
        .publish(names::REQUESTS, Message::new(req.encode()))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap()
        .unwrap();
    let r = Response::decode(&d.message.payload).unwrap();
    (r.status, r.body.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openfaas_paths_and_async_admission() {
    let root = tempfile::tempdir().unwrap();
    let (all, held) = bundles(root.path());
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let calls = Calls::new(AnyStore::memory().unwrap());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let tron = TronNode::new(broker.clone())
        .bundles(all.clone())
        .calls(calls.clone());
    tokio::spawn(tron.run(shutdown.clone()));
    let ropts = RunnerOptions {
        workers: 2,
        ..RunnerOptions::default()
    };
    let served: Vec<Bundle> = all.iter().filter(|b| b.name != "held").cloned().collect();
    tokio::spawn(
        RunnerNode::new(broker.clone())
            .options(ropts.clone())
            .bundles(served)
            .run(shutdown.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ingress = IngressOptions {
        calls: Some(calls),
        ..IngressOptions::default()
    };
    tokio::spawn(funcatron_ingress::run(
        listener,
        broker.clone(),
        ingress,
        shutdown.clone(),
    ));
    wait_ready(&format!("{base}/plain/echo/ready")).await;

    // The OpenFaaS paths: the rest of the path below the Func's base; the
    // Func sees the rest as its path.
    let (s, _, body) = call(&base, "GET", "/function/plain/echo/hi", &[]).await;
    assert_eq!((s, body.as_str()), (200, "hi /echo/hi"));
    let (s, h, body) = call(&base, "GET", "/async-function/plain/echo/later", &[]).await;
    assert_eq!(s, 202, "{body}");
    let id = h["x-call-id"].to_str().unwrap();
    let secret = h["x-call-secret"].to_str().unwrap();
    let v = finished(&base, id, secret).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["body"], "later /echo/later", "{v}");
    assert_eq!(v["func"], "plain");
    let (s, _, body) = call(&base, "GET", "/function/nope/echo/hi", &[]).await;
    assert_eq!(
        (s, error_of(&body).as_str()),
        (404, "unknown_func"),
        "{body}"
    );
    // A route of the Func, not any path: the Tron's 404 below the base.
    let (s, _, body) = call(&base, "GET", "/function/plain/nowhere", &[]).await;
    assert_eq!((s, error_of(&body).as_str()), (404, "no_route"), "{body}");
    // A client cannot name the Func on an ordinary path.
    let named = [("x-funcatron-func", "nope")];
    let (s, _, body) = call(&base, "GET", "/plain/echo/hi", &named).await;
    assert_eq!((s, body.as_str()), (200, "hi /plain/echo/hi"));

    // The Trons' admission table reaches the ingress.
    eventually("the ingress has an admission table", || async {
        full(&base).await.is_some()
    })
    .await;

    // async_only: sync refused, async without a callback refused, with
    // one taken; by every path form.
    for path in ["/only/x", "/function/only/x"] {
        let (s, _, body) = call(&base, "POST", path, &[]).await;
        assert_eq!(
            (s, error_of(&body).as_str()),
            (400, "async_only"),
            "{path}: {body}"
        );
        let (s, _, body) = call(&base, "POST", path, &[("prefer", "respond-async")]).await;
        assert_eq!(
            (s, error_of(&body).as_str()),
            (400, "callback_required"),
            "{body}"
        );
    }
    let (s, _, body) = call(&base, "POST", "/async-function/only/x", &[]).await;
    assert_eq!(
        (s, error_of(&body).as_str()),
        (400, "callback_required"),
        "{body}"
    );
    let cb = [
        ("prefer", "respond-async"),
        ("x-callback-url", "http://127.0.0.1:9/cb"),
    ];
    let (s, _, body) = call(&base, "POST", "/only/x", &cb).await;
    assert_eq!(s, 202, "{body}");
    // The Runner refuses a sync call the ingress did not see: the Func
    // does not run.
    let (s, body) = bypassing_the_ingress(&broker, "/only/x").await;
    assert_eq!((s, error_of(&body).as_str()), (400, "async_only"), "{body}");

    // max_queued: two calls wait (no Runner serves `held`), the third is
    // refused, by either path form, until they drain.
    let queue = names::func_async_queue("held", &held.version);
    for _ in 0..2 {
        let (s, _, body) = call(&base, "POST", "/held/x", &[("prefer", "respond-async")]).await;
        assert_eq!(s, 202, "{body}");
    }
    eventually("the ingress sees held full", || async {
        full(&base).await == Some(vec!["held".to_owned()])
    })
    .await;
    for path in ["/held/x", "/async-function/held/x"] {
        let (s, h, body) = call(&base, "POST", path, &[("x-funcatron-async", "true")]).await;
        assert_eq!((s, error_of(&body).as_str()), (429, "queue_full"), "{body}");
        assert_eq!(h["retry-after"], "1");
    }
    assert_eq!(
        broker.depth(&queue).await.unwrap().ready,
        2,
        "nothing more was queued"
    );
    // A Runner drains them; the Func takes calls again.
    tokio::spawn(
        RunnerNode::new(broker.clone())
            .options(ropts)
            .bundles(vec![held])
            .run(shutdown.clone()),
    );
    eventually("the queue drains and held has room", || async {
        full(&base).await == Some(vec![])
    })
    .await;
    let (s, _, body) = call(&base, "POST", "/held/x", &[("prefer", "respond-async")]).await;
    assert_eq!(s, 202, "{body}");
}

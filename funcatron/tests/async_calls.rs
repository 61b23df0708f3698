//! Asynchronous calls end to end on the embedded broker and an in-memory
//! state store: 202 with a call id and a secret, the status record through
//! the ingress, retries with backoff stamped on each attempt, dead
//! letters, answers the policy does not retry, idempotency keys, and an
//! ingress without a store.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_calls::Calls;
use funcatron_ingress::IngressOptions;
use funcatron_store::AnyStore;
use serde_json::Value;

const DOC: &str = r#"swagger: '2.0'
info: {title: t, version: '1'}
basePath: /a
x-funcatron:
  name: asy
  runtime: lua
  async: {retries: 2, backoff_initial_ms: 80, backoff_factor: 2.0, backoff_max_ms: 1000}
paths:
  /up: {post: {operationId: up, responses: {'200': {description: ok}}}}
  /flaky: {post: {operationId: flaky, responses: {'200': {description: ok}}}}
  /broken: {post: {operationId: broken, responses: {'200': {description: ok}}}}
  /missing: {post: {operationId: missing, responses: {'200': {description: ok}}}}
"#;

/// `flaky` fails until its third attempt (it reads which one it runs);
/// `broken` always fails; `missing` answers 404, which is not retried.
const LUA: &str = r#"return {
  up = function(r) return string.upper(r.body) end,
  flaky = function(r)
    local n = tonumber(r.headers['x-funcatron-attempt'] or '1')
    if n < 3 then return {status = 503, body = 'not yet ' .. n} end
    return 'third time ' .. n
  end,
  broken = function() return {status = 500, body = 'always'} end,
  missing = function() return {status = 404, body = 'no such thing'} end,
}"#;

fn bundle(root: &std::path::Path) -> Bundle {
    let dir = root.join("asy");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("swagger.yaml"), DOC).unwrap();
    std::fs::write(dir.join("main.lua"), LUA).unwrap();
    Bundle::load(&dir).unwrap()
}

struct Accepted {
    call_id: String,
    location: String,
    secret: Option<String>,
}

async fn submit(base: &str, path: &str, headers: &[(&str, &str)]) -> Accepted {
    let mut rb = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .body("hello");
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 202, "{body}");
    let call_id = h["x-call-id"].to_str().unwrap().to_owned();
    assert_eq!(body["call_id"], call_id.as_str());
    Accepted {
        location: h["location"].to_str().unwrap().to_owned(),
        secret: h
            .get("x-call-secret")
            .map(|v| v.to_str().unwrap().to_owned()),
        call_id,
    }
}

async fn status(base: &str, a: &Accepted, with_secret: bool) -> (u16, Value) {
    let mut rb = reqwest::Client::new().get(format!("{base}{}", a.location));
    if let (true, Some(s)) = (with_secret, &a.secret) {
        rb = rb.header("x-call-secret", s);
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Poll the status until the call is final (bounded: the test fails
/// rather than hangs).
async fn finished(base: &str, a: &Accepted) -> Value {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = status(base, a, true).await;
        assert_eq!(s, 200, "{v}");
        if v["state"] != "queued" && v["state"] != "running" {
            return v;
        }
        assert!(Instant::now() < until, "call never finished: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cluster(root: &std::path::Path, calls: Option<Calls>) -> InProcess {
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let c = spawn_cluster(
        broker,
        vec![bundle(root)],
        IngressOptions {
            calls,
            ..IngressOptions::default()
        },
        Some(funcatron_runner::RunnerOptions {
            workers: 2,
            ..Default::default()
        }),
    )
    .await;
    let until = Instant::now() + Duration::from_secs(30);
    let client = reqwest::Client::new();
    while client
        .post(format!("{}/a/up", c.base))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < until, "the Func never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_are_accepted_recorded_retried_and_dead_lettered() {
    let root = tempfile::tempdir().unwrap();
    let calls = Calls::new(AnyStore::memory().unwrap());
    let c = cluster(root.path(), Some(calls)).await;
    let base = &c.base;

    // Every header form is an async call with a record.
    for h in [
        ("prefer", "respond-async"),
        ("x-funcatron-async", "true"),
        ("x-tinyfaas-async", "true"),
    ] {
        let a = submit(base, "/a/up", &[h]).await;
        assert!(a.call_id.len() >= 32, "unguessable: {}", a.call_id);
        assert_eq!(a.location, format!("/_funcatron/calls/{}", a.call_id));
        let v = finished(base, &a).await;
        assert_eq!(v["state"], "succeeded", "{h:?}: {v}");
        assert_eq!(v["result"]["body"], "HELLO", "{v}");
        assert_eq!(v["func"], "asy");
        // Without the secret: the state, not the answer.
        let (_, hidden) = status(base, &a, false).await;
        assert_eq!(hidden["state"], "succeeded");
        assert!(hidden.get("result").is_none(), "{hidden}");
    }

    // Fails twice, then succeeds: each retry waited its backoff (80 ms
    // then 160 ms, less up to half of jitter), stamped on the attempt.
    let a = submit(base, "/a/flaky", &[("prefer", "respond-async")]).await;
    let v = finished(base, &a).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["result"]["body"], "third time 3", "{v}");
    let attempts = v["attempts"].as_array().unwrap();
    let statuses: Vec<u64> = attempts
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![503, 503, 200], "{v}");
    let delays: Vec<u64> = attempts
        .iter()
        .map(|a| a["delay_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(delays[0], 0);
    assert!((40..=80).contains(&delays[1]), "{delays:?}");
    assert!((80..=160).contains(&delays[2]), "{delays:?}");
    let at: Vec<u64> = attempts
        .iter()
        .map(|a| a["finished_ms"].as_u64().unwrap())
        .collect();
    assert!(
        at[1] - at[0] >= delays[1],
        "the retry really waited: {at:?}"
    );
    assert!(at[2] - at[1] >= delays[2], "{at:?}");

    // Always failing: three attempts, then the dead-letter state.
    let a = submit(base, "/a/broken", &[("x-funcatron-async", "true")]).await;
    let v = finished(base, &a).await;
    assert_eq!(v["state"], "dead_lettered", "{v}");
    assert_eq!(v["attempts"].as_array().unwrap().len(), 3, "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("no attempts left"),
        "{v}"
    );

    // 404 is not retried: failed after one attempt. So is a path no Func
    // serves (the Tron's own answer).
    for path in ["/a/missing", "/nowhere"] {
        let a = submit(base, path, &[("x-funcatron-async", "true")]).await;
        let v = finished(base, &a).await;
        assert_eq!(v["state"], "failed", "{path}: {v}");
        assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["result"]["status"], 404, "{v}");
    }

    // An idempotency key names its first call.
    let key = [("prefer", "respond-async"), ("idempotency-key", "order-7")];
    let first = submit(base, "/a/up", &key).await;
    let again = submit(base, "/a/up", &key).await;
    assert_eq!(again.call_id, first.call_id);
    assert!(again.secret.is_none(), "the secret is given once");

    // Unknown ids, bad callback URLs.
    let r = reqwest::get(format!("{base}/_funcatron/calls/cnope"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::Client::new()
        .post(format!("{base}/a/up"))
        .header("prefer", "respond-async")
        .header("x-callback-url", "ftp://example.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_without_a_store_takes_only_fire_and_forget_calls() {
    let root = tempfile::tempdir().unwrap();
    let c = cluster(root.path(), None).await;
    let r = reqwest::Client::new()
        .post(format!("{}/a/up", c.base))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 501);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "async_unavailable");
    let r = reqwest::Client::new()
        .post(format!("{}/a/up", c.base))
        .header("x-funcatron-async", "no-result")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("x-call-secret").is_none());
}

/// `funcatron up --store` on the embedded broker, killed with calls still
/// waiting (each failed once; its retry waits a minute in the broker's
/// memory) and a callback waiting for its second delivery, and started
/// again: the store's queued calls are queued again and every one reaches
/// its final state, and the callback is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_calls_survive_a_kill_of_up() {
    let root = tempfile::tempdir().unwrap();
    let bundles = root.path().join("bundles");
    write_bundle(
        &bundles,
        "late",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\ninfo: {title: t, version: '1'}\nbasePath: /late\nx-funcatron: {name: late, runtime: lua, async: {retries: 1, backoff_initial_ms: 60000}}\npaths:\n  /x: {post: {operationId: x, responses: {'200': {description: ok}}}}\n  /ok: {post: {operationId: ok, responses: {'200': {description: ok}}}}\n",
            ),
            (
                "main.lua",
                "return { x = function(r) return {status = 503, body = 'later ' .. (r.headers['x-funcatron-attempt'] or 'sync')} end, ok = function() return 'done' end }",
            ),
        ],
    );
    let cmd = UpCmd::new(&bundles, &root.path().join("store"));
    let log = root.path().join("up.log");
    let base = cmd.base.clone();
    let start = || async {
        let up = cmd.spawn("tok", &log);
        eventually("the Func answers", || async {
            text_post(&format!("{base}/late/x")).await == (503, "later sync".to_owned())
        })
        .await;
        up
    };
    let up = start().await;
    let mut accepted = Vec::new();
    for _ in 0..40 {
        accepted.push(submit(&base, "/late/x", &[("prefer", "respond-async")]).await);
    }
    for a in &accepted {
        eventually("the first attempt is recorded", || async {
            let (_, v) = status(&base, a, true).await;
            v["attempts"].as_array().is_some_and(|l| l.len() == 1)
        })
        .await;
    }
    // A finished call whose callback's receiver is down: its next
    // delivery waits a minute, in memory.
    let hook = free_addr();
    let r = reqwest::Client::new()
        .post(format!("{base}/late/ok"))
        .header("prefer", "respond-async")
        .header("x-callback-url", format!("http://{hook}/hook"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let called = Accepted {
        call_id: r.headers()["x-call-id"].to_str().unwrap().to_owned(),
        location: r.headers()["location"].to_str().unwrap().to_owned(),
        secret: None,
    };
    eventually("the first delivery fails", || async {
        let (_, v) = status(&base, &called, false).await;
        v["callback"]["deliveries"]
            .as_array()
            .is_some_and(|d| d.len() == 1)
    })
    .await;
    drop(up); // SIGKILL: the retries waiting in memory are gone with it.
    let (mut got, _receiver) = receiver(hook).await;
    let _up = start().await;
    // The pending callback is queued again at start.
    let g = tokio::time::timeout(Duration::from_secs(30), got.recv())
        .await
        .expect("the callback after the restart")
        .unwrap();
    assert_eq!(g.headers["x-call-id"], called.call_id.as_str());
    assert_eq!(g.headers["x-funcatron-callback-attempt"], "2");
    assert_eq!(&g.body[..], b"done");
    for a in &accepted {
        let v = finished(&base, a).await;
        assert_eq!(v["state"], "dead_lettered", "{v}");
        let attempts = v["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{v}");
        assert_eq!(v["result"]["body"], "later 2", "{v}");
    }
}

async fn text_post(url: &str) -> (u16, String) {
    match reqwest::Client::new().post(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

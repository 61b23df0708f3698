//! Pipelines with an asynchronous phase (`mode: async`, `docs/flows.md`):
//! the caller gets 202 and a call id once the flow reaches its first
//! async step; the rest runs from the broker, each step retried by its
//! Func's async policy and noted in the call's record; a step out of
//! attempts runs `on_failure` and `finally`, dead-letters the call, and a
//! redrive starts again from that step. On the embedded broker with an
//! in-memory state store (every role in this process).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, Broker, EmbeddedBroker};
use funcatron_calls::Calls;
use funcatron_control::names;
use funcatron_ingress::IngressOptions;
use funcatron_store::AnyStore;
use serde_json::Value;

/// Every execution of `tally` asks the test's counter what to answer,
/// reporting its call id, the step's tag and its attempt: the counter
/// counts it and says `ok` (echo the body) or why to fail (503).
const TALLY_PY: &str = r#"import os
import urllib.request

from funcatron import Response


def work(req):
    cid = req.headers.get("x-funcatron-call-id", "sync")
    n = req.headers.get("x-funcatron-attempt", "0")
    tag = req.query.get("tag", "none")
    url = f"{os.environ['COUNTER']}/hit/{cid}/{tag}/{n}"
    with urllib.request.urlopen(url, timeout=10) as r:
        verdict = r.read().decode()
    if verdict != "ok":
        return Response(verdict, 503, {"content-type": "text/plain"})
    return Response(req.body, 200, {"content-type": req.headers.get("content-type", "text/plain")})
"#;

/// The counter: executions by (call id, tag) -> attempts, in arrival
/// order; tags whose executions fail (`closed`), and `flaky`, whose first
/// two attempts fail.
/// Executions by (call id, tag): their attempts in arrival order.
type Hits = HashMap<(String, String), Vec<u32>>;

#[derive(Clone, Default)]
struct Counter {
    hits: Arc<Mutex<Hits>>,
    closed: Arc<Mutex<Vec<String>>>,
    /// How long each execution takes (ms), so that steps are in flight
    /// when a Runner is killed.
    work_ms: Arc<std::sync::atomic::AtomicU64>,
    /// The state store the cluster keeps flow values in, and how many it
    /// held at each execution tagged `peek`.
    store: Arc<Mutex<Option<AnyStore>>>,
    peeked: Arc<Mutex<Vec<u64>>>,
}

impl Counter {
    fn executions(&self) -> usize {
        self.hits.lock().unwrap().values().map(Vec::len).sum()
    }

    fn attempts(&self, call: &str, tag: &str) -> Vec<u32> {
        self.hits
            .lock()
            .unwrap()
            .get(&(call.to_owned(), tag.to_owned()))
            .cloned()
            .unwrap_or_default()
    }
}

async fn counter() -> (String, Counter) {
    use axum::extract::{Path, State};
    let c = Counter::default();
    let app = axum::Router::new()
        .route(
            "/hit/{cid}/{tag}/{n}",
            axum::routing::get(
                |State(c): State<Counter>, Path((cid, tag, n)): Path<(String, String, u32)>| async move {
                    c.hits
                        .lock()
                        .unwrap()
                        .entry((cid, tag.clone()))
                        .or_default()
                        .push(n);
                    if tag == "peek" {
                        let store = c.store.lock().unwrap().clone();
                        if let Some(store) = store {
                            let n = funcatron_store::Store::count(
                                &store,
                                funcatron_runner::flow::VALUES,
                                None,
                                None,
                            )
                            .await
                            .unwrap();
                            c.peeked.lock().unwrap().push(n);
                        }
                    }
                    let ms = c.work_ms.load(std::sync::atomic::Ordering::Relaxed);
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let closed = c.closed.lock().unwrap().contains(&tag);
                    if closed || (tag == "flaky" && n < 3) {
                        format!("{tag} is closed at attempt {n}")
                    } else {
                        "ok".to_owned()
                    }
                },
            ),
        )
        .with_state(c.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), c)
}

/// `tally` (Python, retried twice, 40 ms then 80 ms, less jitter),
/// `to-upper`, and `later`, whose flows start asynchronous phases:
/// `order` (a sync phase, then `flaky`, then a sync apply and a modify in
/// the async phase) and `doomed` (a sync apply, then `gate` until it runs
/// out of attempts).
fn write_bundles(root: &std::path::Path, counter: &str, hook: &str) {
    copy_examples(root, &["hello", "to-upper"]);
    write_bundle(
        root,
        "tally",
        &[
            (
                "swagger.yaml",
                &format!(
                    "swagger: '2.0'\ninfo: {{title: tally, version: '1'}}\nbasePath: /tally\n\
                     x-funcatron:\n  name: tally\n  runtime: python\n  handler: main.py\n  timeout_ms: 10000\n  env: {{COUNTER: '{counter}'}}\n  async: {{retries: 2, backoff_initial_ms: 40, backoff_factor: 2.0, backoff_max_ms: 1000}}\n\
                     paths:\n  /:\n    post: {{operationId: work, consumes: ['*/*'], responses: {{'200': {{description: ok}}}}}}\n"
                ),
            ),
            ("main.py", TALLY_PY),
        ],
    );
    let later = format!(
        r#"swagger: '2.0'
info: {{title: later, version: '1'}}
basePath: /later
x-funcatron: {{name: later, runtime: lua}}
paths:
  /order:
    post:
      operationId: order
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - modify: 'set("seen", data); return data'
          - apply: {{func: to-upper}}
          - apply: {{func: tally, mode: async, query: {{tag: flaky}}}}
          - apply: {{func: tally, query: {{tag: after}}}}
          - modify: 'return {{ got = data, first = get("seen") }}'
        finally:
          callback: {{url: "{hook}"}}
      responses: {{'200': {{description: ok}}}}
  /doomed:
    post:
      operationId: doomed
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - apply: {{func: tally, query: {{tag: before}}}}
          - apply: {{func: tally, mode: async, query: {{tag: gate}}}}
          - apply: {{func: tally, query: {{tag: last}}}}
        on_failure:
          modify: 'return {{ failed = json.decode(data).step }}'
        finally:
          callback: {{url: "{hook}"}}
      responses: {{'200': {{description: ok}}}}
  /big:
    post:
      operationId: big
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - modify: 'set("big", string.rep("x", 5000)); set("small", "s"); return data'
          - apply: {{func: tally, query: {{tag: peek}}}}
          - modify: 'return {{ n = #get("big"), small = get("small"), echoed = data }}'
      responses: {{'200': {{description: ok}}}}
  /relay:
    post:
      operationId: relay
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - apply: {{func: tally, mode: async, query: {{tag: a}}}}
          - apply: {{func: tally, query: {{tag: b}}}}
          - apply: {{func: tally, query: {{tag: c}}}}
      responses: {{'200': {{description: ok}}}}
"#
    );
    write_bundle(
        root,
        "later",
        &[("swagger.yaml", &later), ("main.lua", "return {}")],
    );
}

/// Wait until `tally` (Python: its worker starts on first use) answers
/// through the ingress at `base`.
async fn warm(base: &str) {
    eventually_within("tally answers", Duration::from_secs(120), || async {
        reqwest::Client::new()
            .post(format!("{base}/tally/?tag=warm"))
            .body("x")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

struct Accepted {
    call_id: String,
    secret: String,
}

/// POST `body` to `url`: must be 202 with a call id, its status URL and
/// its secret.
async fn submit(url: &str, body: &str) -> Accepted {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "text/plain")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let (status, h) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    assert_eq!(status, 202, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let call_id = h["x-call-id"].to_str().unwrap().to_owned();
    assert_eq!(v["call_id"], call_id.as_str(), "{v}");
    assert_eq!(
        h["location"].to_str().unwrap(),
        format!("/_funcatron/calls/{call_id}")
    );
    Accepted {
        secret: h["x-call-secret"].to_str().unwrap().to_owned(),
        call_id,
    }
}

/// Poll the call's status (with its secret) until it is in `state`.
async fn reaches(base: &str, a: &Accepted, state: &str, limit: Duration) -> Value {
    let until = Instant::now() + limit;
    let client = reqwest::Client::new();
    loop {
        let v: Value = client
            .get(format!("{base}/_funcatron/calls/{}", a.call_id))
            .header("x-call-secret", &a.secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < until, "never {state}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (step, attempt, outcome) of each noted step.
fn noted(v: &Value) -> Vec<(String, u64, String)> {
    v["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|n| {
                    (
                        n["step"].as_str().unwrap().to_owned(),
                        n["attempt"].as_u64().unwrap(),
                        n["outcome"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn sorted(mut v: Vec<(String, u64, String)>) -> Vec<(String, u64, String)> {
    v.sort();
    v
}

async fn next_hook(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Got>) -> Value {
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a callback")
        .unwrap();
    serde_json::from_slice(&got.body).unwrap()
}

struct Cluster {
    c: InProcess,
    calls: Option<Calls>,
    counter: Counter,
    hooks: tokio::sync::mpsc::UnboundedReceiver<Got>,
    _dir: tempfile::TempDir,
    _hook: tokio_util::sync::CancellationToken,
}

async fn cluster(with_store: bool) -> Cluster {
    let hook = free_addr();
    let (hooks, stop) = receiver(hook).await;
    let (counter_url, counter) = counter().await;
    let dir = tempfile::tempdir().unwrap();
    write_bundles(dir.path(), &counter_url, &format!("http://{hook}/hook"));
    let calls = with_store.then(|| Calls::new(AnyStore::memory().unwrap()));
    *counter.store.lock().unwrap() = calls.as_ref().map(|c| c.store().clone());
    let mut ropts = funcatron_runner::RunnerOptions {
        workers: 3,
        flow_outbound: funcatron_control::outbound::OutboundPolicy::new(&["127.0.0.1"]).unwrap(),
        // Values past 1 KiB go to the cluster's store.
        flow_store: calls
            .as_ref()
            .map(|c| funcatron_runner::flow::FlowStore::Open(c.store().clone())),
        flow_inline_bytes: 1024,
        ..Default::default()
    };
    ropts.worker.cache_dir = test_cache_dir();
    let c = spawn_cluster(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        load(dir.path()),
        IngressOptions {
            calls: calls.clone(),
            ..IngressOptions::default()
        },
        Some(ropts),
    )
    .await;
    wait_ready(&format!("{}/hello/ready", c.base)).await;
    warm(&c.base).await;
    Cluster {
        c,
        calls,
        counter,
        hooks,
        _dir: dir,
        _hook: stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_step_answers_202_and_the_flow_finishes_from_the_broker_retried_by_its_policy() {
    let mut k = cluster(true).await;
    let a = submit(&format!("{}/later/order", k.c.base), "hello").await;
    let v = reaches(&k.c.base, &a, "succeeded", Duration::from_secs(60)).await;
    // The answer of the flow's last step, built from the sync phase's
    // value and the async phase's data.
    let result = &v["result"];
    assert_eq!(result["status"], 200, "{v}");
    let body: Value = serde_json::from_str(result["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, serde_json::json!({"got": "HELLO", "first": "hello"}));
    // The async phase's steps, each attempt noted; flaky failed twice and
    // was retried after the policy's delays (jitter takes up to half).
    assert_eq!(
        sorted(noted(&v)),
        vec![
            ("steps[2]".into(), 1, "retry".into()),
            ("steps[2]".into(), 2, "retry".into()),
            ("steps[2]".into(), 3, "done".into()),
            ("steps[3]".into(), 1, "done".into()),
        ],
        "{v}"
    );
    for n in v["steps"].as_array().unwrap() {
        let delay = n["delay_ms"].as_u64().unwrap();
        match (n["step"].as_str().unwrap(), n["attempt"].as_u64().unwrap()) {
            ("steps[2]", 1) => assert!((20..=40).contains(&delay), "{n}"),
            ("steps[2]", 2) => assert!((40..=80).contains(&delay), "{n}"),
            _ => assert_eq!(delay, 0, "{n}"),
        }
        assert_eq!(n["func"], "tally", "{n}");
        assert!(n.get("request").is_none(), "requests are not shown: {n}");
    }
    // What the Func saw: the call id on every attempt, attempts counted
    // per step.
    assert_eq!(k.counter.attempts(&a.call_id, "flaky"), vec![1, 2, 3]);
    assert_eq!(k.counter.attempts(&a.call_id, "after"), vec![1]);
    assert_eq!(v["func"], "later", "{v}");
    // finally ran, told of success.
    assert_eq!(
        next_hook(&mut k.hooks).await,
        serde_json::json!({"ok": true, "status": 200})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_out_of_attempts_dead_letters_the_flow_and_a_redrive_starts_from_that_step() {
    let mut k = cluster(true).await;
    k.counter.closed.lock().unwrap().push("gate".into());
    let a = submit(&format!("{}/later/doomed", k.c.base), "x").await;
    let v = reaches(&k.c.base, &a, "dead_lettered", Duration::from_secs(60)).await;
    assert!(
        v["reason"].as_str().unwrap().contains("steps[1] (tally)"),
        "{v}"
    );
    // on_failure's answer, with the failing step's status.
    assert_eq!(v["result"]["status"], 503, "{v}");
    let body: Value = serde_json::from_str(v["result"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, serde_json::json!({"failed": "steps[1]"}));
    assert_eq!(
        sorted(noted(&v)),
        vec![
            ("steps[1]".into(), 1, "retry".into()),
            ("steps[1]".into(), 2, "retry".into()),
            ("steps[1]".into(), 3, "exhausted".into()),
        ],
        "{v}"
    );
    assert_eq!(
        next_hook(&mut k.hooks).await,
        serde_json::json!({"ok": false, "status": 503})
    );
    assert_eq!(k.counter.attempts(&a.call_id, "gate"), vec![1, 2, 3]);
    // The sync phase ran before the call existed: no call id.
    assert_eq!(k.counter.attempts("sync", "before"), vec![0]);

    // Whatever the gate waited for is fixed: redrive, as `funcatron dlq
    // redrive` does (the record's request, now the failed step's).
    k.counter.closed.lock().unwrap().clear();
    let calls = k.calls.as_ref().unwrap();
    let request = calls.redrive(&a.call_id).await.unwrap();
    k.c.broker
        .publish(names::REQUESTS, funcatron_calls::request_message(request))
        .await
        .unwrap();
    let v = reaches(&k.c.base, &a, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(v["result"]["body"], "x", "{v}");
    assert_eq!(
        sorted(noted(&v)),
        vec![
            ("steps[1]".into(), 1, "done".into()),
            ("steps[2]".into(), 1, "done".into()),
        ],
        "{v}"
    );
    // From the failed step: the step before it did not run again.
    assert_eq!(k.counter.attempts(&a.call_id, "gate"), vec![1, 2, 3, 1]);
    assert_eq!(k.counter.attempts(&a.call_id, "last"), vec![1]);
    assert_eq!(k.counter.attempts("sync", "before"), vec![0]);
    assert_eq!(
        next_hook(&mut k.hooks).await,
        serde_json::json!({"ok": true, "status": 200})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_state_store_an_async_phase_is_refused_with_501() {
    let k = cluster(false).await;
    let r = reqwest::Client::new()
        .post(format!("{}/later/order", k.c.base))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 501);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "async_unavailable", "{v}");
    // The async step never ran.
    assert!(k
        .counter
        .hits
        .lock()
        .unwrap()
        .keys()
        .all(|(_, t)| t == "warm"));
}

fn cli(mgmt: &str, args: &[&str]) -> (bool, String) {
    cli_with(args, &format!("http://{mgmt}"), "tok")
}

/// `funcatron up` and the CLI: `call show` lists the async phase's steps,
/// `dlq list` finds the flow's dead-lettered call under the flow's Func,
/// and `dlq redrive` runs it again from the failed step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_show_lists_the_steps_and_dlq_redrive_restarts_the_failed_step_on_up() {
    let hook = free_addr();
    let (mut hooks, _stop) = receiver(hook).await;
    let (counter_url, counter) = counter().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("bundles");
    write_bundles(&dir, &counter_url, &format!("http://{hook}/hook"));
    let (listen, mgmt) = (free_addr(), free_addr());
    let cache = test_cache_dir();
    let _up = funcatron_logged(
        &[
            "up",
            "--bundles",
            dir.to_str().unwrap(),
            "--store",
            root.path().join("store").to_str().unwrap(),
            "--listen",
            &listen.to_string(),
            "--mgmt-listen",
            &mgmt.to_string(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        "tok",
        &root.path().join("up.log"),
    );
    let base = format!("http://{listen}");
    warm(&base).await;
    counter.closed.lock().unwrap().push("gate".into());
    let a = submit(&format!("{base}/later/doomed"), "x").await;
    reaches(&base, &a, "dead_lettered", Duration::from_secs(60)).await;
    let mgmt = mgmt.to_string();
    let (ok, out) = cli(&mgmt, &["call", "show", &a.call_id]);
    assert!(ok, "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        sorted(noted(&shown)),
        vec![
            ("steps[1]".into(), 1, "retry".into()),
            ("steps[1]".into(), 2, "retry".into()),
            ("steps[1]".into(), 3, "exhausted".into()),
        ],
        "{shown}"
    );
    let (ok, out) = cli(&mgmt, &["dlq", "list", "later"]);
    assert!(ok && out.contains(&a.call_id), "{out}");
    assert_eq!(
        next_hook(&mut hooks).await,
        serde_json::json!({"ok": false, "status": 503})
    );
    counter.closed.lock().unwrap().clear();
    let (ok, out) = cli(&mgmt, &["dlq", "redrive", "later", "--id", &a.call_id]);
    assert!(ok, "{out}");
    let v = reaches(&base, &a, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(v["result"]["body"], "x", "{v}");
    assert_eq!(counter.attempts(&a.call_id, "gate"), vec![1, 2, 3, 1]);
    assert_eq!(counter.attempts(&a.call_id, "last"), vec![1]);
    assert_eq!(counter.attempts("sync", "before"), vec![0]);
}

/// Flows whose async phase is running on two Runners over RabbitMQ (a
/// Tron and an ingress sharing a PostgreSQL state store) while one Runner
/// is killed with SIGKILL and another started: every flow finishes, every
/// step's side effect happened at least once, and the duplicates (steps
/// the killed Runner had run but not acknowledged) are counted, reported
/// and bounded by what it could hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_phase_survives_kill_9_of_a_runner_over_rabbitmq() {
    const FLOWS: usize = 120;
    const PREFETCH: usize = 8;
    let started = Instant::now();
    let schema = fresh_pg_schema();
    let broker = fresh_vhost();
    let hook = free_addr();
    let (_hooks, _stop) = receiver(hook).await;
    let (counter_url, counter) = counter().await;
    let root = tempfile::tempdir().unwrap();
    write_bundles(root.path(), &counter_url, &format!("http://{hook}/hook"));
    let d = root.path().to_str().unwrap().to_owned();
    let cache = test_cache_dir();
    let cache = cache.to_str().unwrap().to_owned();
    let prefetch = PREFETCH.to_string();
    let runner_args = [
        "--bundles",
        d.as_str(),
        "--workers",
        "3",
        "--cache-dir",
        cache.as_str(),
        "--runner-prefetch",
        prefetch.as_str(),
    ];
    let _tron = spawn(
        "tron",
        &broker,
        &["--bundles", &d, "--state-store", &schema.url],
    );
    let mut r1 = spawn("runner", &broker, &runner_args);
    let _r2 = spawn("runner", &broker, &runner_args);
    let (_ingress, base) = spawn_ingress(
        &broker,
        &["--calls-store", &schema.url, "--timeout-ms", "20000"],
    )
    .await;
    warm(&base).await;
    println!("cluster ready after {:?}", started.elapsed());
    counter
        .work_ms
        .store(25, std::sync::atomic::Ordering::Relaxed);
    let url = format!("{base}/later/relay");
    let submitter = tokio::spawn(async move {
        let mut submitted = Vec::new();
        for chunk in 0..FLOWS / 8 {
            let batch = (0..8).map(|i| {
                let url = url.clone();
                async move { submit(&url, &format!("flow-{chunk}-{i}")).await }
            });
            submitted.extend(futures::future::join_all(batch).await);
        }
        submitted
    });
    // Mid-way through the async phases: kill one Runner, start another.
    eventually_within(
        "a third of the steps ran",
        Duration::from_secs(120),
        || async { counter.executions() >= FLOWS },
    )
    .await;
    let at_kill = counter.executions();
    r1.child.kill().unwrap(); // SIGKILL
    r1.child.wait().unwrap();
    let _r3 = spawn("runner", &broker, &runner_args);
    let submitted = submitter.await.unwrap();
    let calls = Calls::new(AnyStore::open(&schema.url).await.unwrap());
    for a in &submitted {
        eventually_within("the flow finishes", Duration::from_secs(180), || async {
            calls
                .get(&a.call_id)
                .await
                .unwrap()
                .is_some_and(|c| c.state.is_final())
        })
        .await;
        let c = calls.get(&a.call_id).await.unwrap().unwrap();
        assert_eq!(c.state, funcatron_calls::CallState::Succeeded, "{c:?}");
        let body = &c.result.as_ref().unwrap().body;
        assert!(body.starts_with("flow-"), "{body}");
    }
    let mut duplicates = 0;
    for a in &submitted {
        for tag in ["a", "b", "c"] {
            let n = counter.attempts(&a.call_id, tag).len();
            assert!(n >= 1, "{} step {tag} never ran", a.call_id);
            duplicates += n - 1;
        }
    }
    // What the killed Runner could hold unacknowledged: a prefetch of
    // tally's async queue (where every async-phase step waits).
    let bound = PREFETCH;
    println!(
        "flows: {FLOWS}, step executions {} ({at_kill} before the kill), duplicates {duplicates} (bound {bound}), in {:?}",
        counter.executions(),
        started.elapsed()
    );
    assert!(duplicates <= bound, "{duplicates} duplicates > {bound}");

    // Dead-lettered over RabbitMQ, redriven from the failed step.
    counter
        .work_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    counter.closed.lock().unwrap().push("gate".into());
    let a = submit(&format!("{base}/later/doomed"), "x").await;
    reaches(&base, &a, "dead_lettered", Duration::from_secs(60)).await;
    counter.closed.lock().unwrap().clear();
    let amqp = funcatron_broker::AmqpBroker::connect(&broker);
    eventually("the test's broker connection", || async {
        *amqp.connected().borrow()
    })
    .await;
    let request = calls.redrive(&a.call_id).await.unwrap();
    amqp.publish(names::REQUESTS, funcatron_calls::request_message(request))
        .await
        .unwrap();
    let v = reaches(&base, &a, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(v["result"]["body"], "x", "{v}");
    assert_eq!(counter.attempts(&a.call_id, "gate"), vec![1, 2, 3, 1]);
    assert_eq!(counter.attempts(&a.call_id, "last"), vec![1]);
}

/// A `set` value past the threshold travels as a reference to the state
/// store (there while the flow runs, read back by a later step) and is
/// deleted when the flow ends; a small one stays in the envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_flow_values_live_in_the_state_store_until_the_flow_ends() {
    let k = cluster(true).await;
    let r = reqwest::Client::new()
        .post(format!("{}/later/big", k.c.base))
        .header("content-type", "text/plain")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"n": 5000, "small": "s", "echoed": "abc"})
    );
    // While the applied step ran, one value (the large one) was stored.
    assert_eq!(*k.counter.peeked.lock().unwrap(), vec![1]);
    let store = k.calls.as_ref().unwrap().store().clone();
    eventually("the flow's values are deleted", || async {
        funcatron_store::Store::count(&store, funcatron_runner::flow::VALUES, None, None)
            .await
            .unwrap()
            == 0
    })
    .await;
}

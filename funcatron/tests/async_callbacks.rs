//! Callbacks end to end on the embedded broker: a finished call's outcome
//! POSTed to its `X-Callback-Url` with the call's headers and a signature
//! the receiver verifies (computed here independently), dead-lettered
//! calls called back too, a receiver that is down at first and up later
//! (the failed delivery recorded, the next one delivered), and a URL the
//! outbound policy refuses (failed at once, not retried).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, Broker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_calls::Calls;
use funcatron_control::outbound::OutboundPolicy;
use funcatron_ingress::IngressOptions;
use funcatron_runner::{RunnerNode, RunnerOptions};
use funcatron_store::AnyStore;
use funcatron_tron::TronNode;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DOC: &str = r#"swagger: '2.0'
info: {title: t, version: '1'}
basePath: /cb
x-funcatron:
  name: cbf
  runtime: lua
  async: {retries: 1, backoff_initial_ms: 50, backoff_factor: 2.0, backoff_max_ms: 200, callback_retries: 30}
paths:
  /up: {post: {operationId: up, responses: {'200': {description: ok}}}}
  /broken: {post: {operationId: broken, responses: {'200': {description: ok}}}}
"#;

const LUA: &str = r#"return {
  up = function(r) return {status = 201, headers = {['content-type'] = 'text/x-shout'}, body = string.upper(r.body)} end,
  broken = function() return {status = 500, body = 'always'} end,
}"#;

struct Cluster {
    base: String,
    calls: Calls,
    _stop: tokio_util::sync::DropGuard,
}

async fn cluster(root: &std::path::Path) -> Cluster {
    let dir = root.join("cbf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("swagger.yaml"), DOC).unwrap();
    std::fs::write(dir.join("main.lua"), LUA).unwrap();
    // A Python Func that runs long enough to be seen running.
    let slow = root.join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(
        slow.join("swagger.yaml"),
        "swagger: '2.0'\ninfo: {title: t, version: '1'}\nbasePath: /slow\nx-funcatron: {name: slow, runtime: python, handler: main.py}\npaths:\n  /nap: {post: {operationId: nap, responses: {'200': {description: ok}}}}\n",
    )
    .unwrap();
    std::fs::write(
        slow.join("main.py"),
        "import time\n\ndef nap(req):\n    time.sleep(1.5)\n    return 'rested'\n",
    )
    .unwrap();
    let bundles = vec![Bundle::load(&dir).unwrap(), Bundle::load(&slow).unwrap()];
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let calls = Calls::new(AnyStore::memory().unwrap());
    let shutdown = CancellationToken::new();
    let tron = TronNode::new(broker.clone())
        .bundles(bundles.clone())
        .calls(calls.clone())
        .callbacks_to(OutboundPolicy::new(&["127.0.0.1"]).unwrap());
    tokio::spawn(tron.run(shutdown.clone()));
    tokio::spawn(
        RunnerNode::new(broker.clone())
            .options(RunnerOptions {
                workers: 2,
                ..RunnerOptions::default()
            })
            .bundles(bundles)
            .run(shutdown.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(funcatron_ingress::run(
        listener,
        broker,
        IngressOptions {
            calls: Some(calls.clone()),
            ..IngressOptions::default()
        },
        shutdown.clone(),
    ));
    eventually("the Func answers", || async {
        reqwest::Client::new()
            .post(format!("{base}/cb/up"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 201)
    })
    .await;
    Cluster {
        base,
        calls,
        _stop: shutdown.drop_guard(),
    }
}

/// Submit an async call with a callback; its id.
async fn submit(base: &str, path: &str, callback: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("prefer", "respond-async")
        .header("x-callback-url", callback)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.headers()["x-call-id"].to_str().unwrap().to_owned()
}

async fn record(calls: &Calls, id: &str) -> Value {
    let call = calls.get(id).await.unwrap().unwrap();
    serde_json::to_value(call.view(true)).unwrap()
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Got>) -> Got {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a callback within 30 s")
        .unwrap()
}

fn header<'a>(g: &'a Got, name: &str) -> &'a str {
    g.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", g.headers))
        .to_str()
        .unwrap()
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Verify `x-funcatron-signature` as a receiver would, with the Func's
/// key derived here from the cluster key.
fn verify(g: &Got, cluster_key: &[u8], func: &str) {
    let key = hmac(
        cluster_key,
        format!("funcatron callback key\n{func}").as_bytes(),
    );
    let sig = header(g, "x-funcatron-signature");
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap_or_else(|| panic!("signature {sig}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(t.parse().unwrap()) < 60, "timestamp {t}");
    let mut msg = format!("{t}.{}.", header(g, "x-call-id")).into_bytes();
    msg.extend_from_slice(&g.body);
    assert_eq!(v1, hex(&hmac(&key, &msg)), "the signature verifies");
    // A body changed in transit does not.
    let mut forged = format!("{t}.{}.", header(g, "x-call-id")).into_bytes();
    forged.extend_from_slice(b"HELLO!");
    assert_ne!(v1, hex(&hmac(&key, &forged)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_called_back_signed_and_recorded() {
    let root = tempfile::tempdir().unwrap();
    let c = cluster(root.path()).await;
    let addr = free_addr();
    let (mut rx, _stop) = receiver(addr).await;
    let hook = format!("http://{addr}/hook");
    let cluster_key = funcatron_calls::callbacks::cluster_key(&c.calls)
        .await
        .unwrap();

    // A success: the Func's answer, its status and headers.
    let id = submit(&c.base, "/cb/up", &hook).await;
    let g = next(&mut rx).await;
    assert_eq!(header(&g, "x-call-id"), id);
    assert_eq!(header(&g, "x-function-name"), "cbf");
    assert_eq!(header(&g, "x-function-status"), "201");
    assert_eq!(header(&g, "x-funcatron-call-state"), "succeeded");
    assert_eq!(header(&g, "x-funcatron-attempts"), "1");
    assert_eq!(header(&g, "x-funcatron-callback-attempt"), "1");
    assert_eq!(header(&g, "content-type"), "text/x-shout");
    let secs: f64 = header(&g, "x-duration-seconds").parse().unwrap();
    assert!((0.0..5.0).contains(&secs), "{secs}");
    assert_eq!(&g.body[..], b"HELLO");
    verify(&g, &cluster_key, "cbf");
    eventually("the delivery is recorded", || async {
        record(&c.calls, &id).await["callback"]["state"] == "delivered"
    })
    .await;
    let v = record(&c.calls, &id).await;
    let deliveries = v["callback"]["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{v}");
    assert_eq!(deliveries[0]["status"], 200, "{v}");

    // A dead-lettered call is called back too, once, after its last attempt.
    let id = submit(&c.base, "/cb/broken", &hook).await;
    let g = next(&mut rx).await;
    assert_eq!(header(&g, "x-call-id"), id);
    assert_eq!(header(&g, "x-funcatron-call-state"), "dead_lettered");
    assert_eq!(header(&g, "x-function-status"), "500");
    assert_eq!(header(&g, "x-funcatron-attempts"), "2");
    assert_eq!(&g.body[..], b"always");
    verify(&g, &cluster_key, "cbf");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_then_up_gets_the_callback_and_refused_urls_fail_at_once() {
    let root = tempfile::tempdir().unwrap();
    let c = cluster(root.path()).await;
    // Nothing listens there yet.
    let addr = free_addr();
    let id = submit(&c.base, "/cb/up", &format!("http://{addr}/hook")).await;
    eventually("a failed delivery is recorded", || async {
        record(&c.calls, &id).await["callback"]["deliveries"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    })
    .await;
    let v = record(&c.calls, &id).await;
    assert_eq!(v["callback"]["state"], "pending", "{v}");
    assert!(v["callback"]["deliveries"][0]["status"].is_null(), "{v}");
    assert!(v["callback"]["deliveries"][0]["error"].is_string(), "{v}");

    // The receiver comes up: a later delivery reaches it.
    let (mut rx, _stop) = receiver(addr).await;
    let g = next(&mut rx).await;
    assert_eq!(header(&g, "x-call-id"), id);
    let n: u32 = header(&g, "x-funcatron-callback-attempt").parse().unwrap();
    assert!(n >= 2, "delivered on a retry: {n}");
    eventually("the delivery is recorded", || async {
        record(&c.calls, &id).await["callback"]["state"] == "delivered"
    })
    .await;
    let v = record(&c.calls, &id).await;
    let d = v["callback"]["deliveries"].as_array().unwrap();
    assert_eq!(d.len() as u32, n, "every delivery recorded: {v}");
    assert_eq!(d.last().unwrap()["status"], 200);
    // Each retry waited (the policy's backoff, 50 ms doubling up to 200
    // ms, less up to half of jitter).
    for w in d.windows(2) {
        let gap = w[1]["at_ms"].as_u64().unwrap() - w[0]["at_ms"].as_u64().unwrap();
        assert!(gap >= 25, "{v}");
    }

    // Cloud metadata is refused even with loopback allowed: failed after
    // one delivery, with why.
    let started = Instant::now();
    let id = submit(&c.base, "/cb/up", "http://169.254.169.254/latest").await;
    eventually("the callback fails", || async {
        record(&c.calls, &id).await["callback"]["state"] == "failed"
    })
    .await;
    let v = record(&c.calls, &id).await;
    assert_eq!(
        v["callback"]["deliveries"].as_array().unwrap().len(),
        1,
        "{v}"
    );
    assert!(
        v["callback"]["reason"]
            .as_str()
            .unwrap()
            .contains("outbound policy"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// An attempt that runs for a while shows `running` (with when it
/// started) until its outcome; then the call is final and no longer says
/// it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_attempt_shows_running_until_it_ends() {
    let root = tempfile::tempdir().unwrap();
    let c = cluster(root.path()).await;
    let r = reqwest::Client::new()
        .post(format!("{}/slow/nap", c.base))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.headers()["x-call-id"].to_str().unwrap().to_owned();
    let submitted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    eventually("the call is running", || async {
        record(&c.calls, &id).await["state"] == "running"
    })
    .await;
    let v = record(&c.calls, &id).await;
    let since = v["running_since_ms"].as_u64().unwrap();
    assert!(since + 5_000 > submitted, "{v}");
    assert_eq!(v["func"], "slow", "{v}");
    eventually("the call succeeds", || async {
        record(&c.calls, &id).await["state"] == "succeeded"
    })
    .await;
    let v = record(&c.calls, &id).await;
    assert!(v.get("running_since_ms").is_none(), "{v}");
    assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
}

/// A finished call with a callback to `hook`, queued as an ingress does
/// (on `broker`, where nothing consumes it) and its outcome applied
/// straight through the calls API (no Tron applied it): the job its
/// callback needs.
async fn finished_call(
    calls: &Calls,
    broker: &AnyBroker,
    id: &str,
    hook: &str,
) -> funcatron_calls::callbacks::Job {
    use std::borrow::Cow;
    let req = funcatron_envelope::Request {
        id: Cow::Owned(format!("r-{id}")),
        host: Cow::Borrowed("localhost"),
        deadline_ms: 4_000_000_000_000,
        sent_ms: funcatron_envelope::now_ms(),
        method: Cow::Borrowed("POST"),
        path: Cow::Borrowed("/cb/up"),
        is_async: true,
        call_id: Some(Cow::Owned(id.to_owned())),
        callback_url: Some(Cow::Owned(hook.to_owned())),
        attempt: Some(1),
        ..funcatron_envelope::Request::default()
    };
    let queued = funcatron_calls::submit::queue(Some(calls), broker, &req, "s", None, None)
        .await
        .unwrap();
    assert_eq!(queued, funcatron_calls::submit::Queued::New);
    let mut out = funcatron_envelope::Response::error("r", 200, "none", "x");
    out.body = Cow::Borrowed("done");
    out.call_id = Some(Cow::Owned(id.to_owned()));
    out.attempt = Some(1);
    let policy = funcatron_control::calls::AsyncPolicy::default()
        .resolved()
        .unwrap();
    match calls
        .apply_outcome(&out, Some("cbf"), &policy, 0.0)
        .await
        .unwrap()
    {
        funcatron_calls::Applied::Callback(job) => job,
        other => panic!("expected a callback job, got {other:?}"),
    }
}

/// The Tron that finishes a call delivers its callback at once. On
/// RabbitMQ it leaves a job delayed behind (the watchdog): a Tron that
/// stopped before its delivery leaves only the job, which delivers it; a
/// job arriving after the delivery finds it recorded and sends nothing
/// again. On the embedded broker (which forgets with the process, as the
/// delivery does; the pending index covers both) the delivery made at once
/// has no job behind it: none is on the queue once it is recorded.
async fn delivered_at_once_or_by_the_job(broker: AnyBroker) {
    use funcatron_calls::callbacks::{self, Deliverer};
    for q in [
        funcatron_control::names::CALLBACKS,
        funcatron_control::names::REQUESTS,
    ] {
        broker
            .declare(q, funcatron_broker::QueueKind::Work)
            .await
            .unwrap();
    }
    let calls = Calls::new(AnyStore::memory().unwrap());
    let addr = free_addr();
    let (mut rx, _stop_receiver) = receiver(addr).await;
    let hook = format!("http://{addr}/hook");
    let policy = OutboundPolicy::new(&["127.0.0.1"]).unwrap();
    let d = Deliverer::new(calls.clone(), policy)
        .await
        .unwrap()
        .watchdog(Duration::from_millis(100));
    let stop = CancellationToken::new();
    tokio::spawn(callbacks::run(broker.clone(), d.clone(), stop.clone()));

    // The finishing Tron stopped after publishing the job: the job
    // delivers the callback, once.
    let job = finished_call(&calls, &broker, "c-lost", &hook).await;
    callbacks::schedule(&broker, &calls, &job, 100)
        .await
        .unwrap();
    let g = next(&mut rx).await;
    assert_eq!(header(&g, "x-call-id"), "c-lost");
    assert_eq!(&g.body[..], b"done");
    eventually("the job is settled", || async { d.jobs_handled() == 1 }).await;
    let v = record(&calls, "c-lost").await;
    assert_eq!(v["callback"]["state"], "delivered", "{v}");
    assert_eq!(v["callback"]["deliveries"].as_array().unwrap().len(), 1);

    // Delivered at once.
    let job = finished_call(&calls, &broker, "c-inline", &hook).await;
    let t0 = Instant::now();
    d.schedule(&broker, &job).await.unwrap();
    let g = next(&mut rx).await;
    assert_eq!(header(&g, "x-call-id"), "c-inline");
    eventually("the delivery is recorded", || async {
        record(&calls, "c-inline").await["callback"]["state"] == "delivered"
    })
    .await;
    if matches!(broker, AnyBroker::Amqp(_)) {
        // The job behind it arrives later and sends nothing.
        eventually("the watchdog job is settled", || async {
            d.jobs_handled() == 2
        })
        .await;
        assert!(t0.elapsed() >= Duration::from_millis(100), "the job waited");
    }
    assert!(rx.try_recv().is_err(), "no second POST");
    let depth = broker
        .depth(funcatron_control::names::CALLBACKS)
        .await
        .unwrap();
    assert_eq!(depth.ready, 0, "no job left");
    let v = record(&calls, "c-inline").await;
    assert_eq!(v["callback"]["deliveries"].as_array().unwrap().len(), 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_delivered_at_once_or_by_their_job_on_the_embedded_broker() {
    delivered_at_once_or_by_the_job(AnyBroker::Embedded(EmbeddedBroker::new(1_000))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_delivered_at_once_or_by_their_job_on_rabbitmq() {
    let broker = AnyBroker::from_url(&fresh_vhost(), 1_000).unwrap();
    if let AnyBroker::Amqp(a) = &broker {
        assert!(a.wait_connected(Duration::from_secs(10)).await);
    }
    delivered_at_once_or_by_the_job(broker).await;
}

//! `funcatron-bench --triggers`: document write -> triggered Func start,
//! on RabbitMQ (`--amqp`) and on the embedded broker, in one process: a
//! Tron node (with the document relay), a Runner and a Python Func whose
//! operation has a `store` trigger. Each sample writes one document
//! ([`Documents::put`], answered once the document and its event are
//! durable) and waits for the Func's answer, which carries the moment the
//! Func started (`time.time()`, the same clock); the latency is from just
//! before the write to that start. One write at a time, so each sample is
//! the whole path: the commit, the relay waking, the call recorded and
//! published, routed by the Tron, taken by the Runner, handed to the warm
//! Python worker.
//!
//! Target (the triggers issue): p50 at most 5 ms on RabbitMQ.

use std::time::Duration;

use anyhow::{Context, Result};
use funcatron_broker::{AmqpBroker, AnyBroker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_calls::Calls;
use funcatron_documents::{Documents, Precondition};
use funcatron_store::{AnyStore, Query, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const DOC: &str = "swagger: '2.0'\ninfo: {title: bench-trigger, version: '1'}\nbasePath: /bench-trigger\n\
x-funcatron:\n  name: bench-trigger\n  runtime: python\n  handler: main.py\n  collections: {bench: {}}\n\
paths:\n  /on:\n    post:\n      operationId: on\n      consumes: ['application/json']\n      responses: {'200': {description: ok}}\n      x-funcatron-triggers:\n        - name: bench-changes\n          store: {collection: bench, events: [created, updated]}\n";

const PY: &str = "import time\n\n\ndef on(req):\n    return '%.3f' % (time.time() * 1000.0)\n";

/// The target, ms.
const TARGET_P50_MS: f64 = 5.0;

fn now_ms_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The calls triggered so far, by idempotency key (one per event).
async fn triggered(store: &AnyStore) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = Query::new(funcatron_calls::IDEMPOTENCY).limit(funcatron_store::MAX_LIST);
        q.after_key = after.clone();
        let page = store.list(&q).await?;
        for r in &page {
            out.push((
                r.key.clone(),
                String::from_utf8_lossy(&r.value).into_owned(),
            ));
        }
        if page.len() < funcatron_store::MAX_LIST {
            return Ok(out);
        }
        after = page.last().map(|r| r.key.clone());
    }
}

/// Wait (bounded) for a call id not in `seen`; then for its answer: the
/// Func's start, ms since the epoch.
async fn next_start(
    store: &AnyStore,
    calls: &Calls,
    seen: &mut std::collections::HashSet<String>,
) -> Result<f64> {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let call_id = loop {
        anyhow::ensure!(std::time::Instant::now() < until, "no triggered call");
        if let Some((k, id)) = triggered(store)
            .await?
            .into_iter()
            .find(|(k, _)| !seen.contains(k))
        {
            seen.insert(k);
            break id;
        }
        tokio::task::yield_now().await;
    };
    loop {
        anyhow::ensure!(
            std::time::Instant::now() < until,
            "the triggered call never finished"
        );
        if let Some(call) = calls.get(&call_id).await? {
            if let Some(r) = &call.result {
                let body = funcatron_envelope::decode_body(&r.body, r.body_base64)
                    .map_err(|e| anyhow::anyhow!("the answer's body: {e}"))?;
                return String::from_utf8_lossy(&body)
                    .trim()
                    .parse()
                    .context("the Func's start time");
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn one_broker(label: &str, make: &dyn Fn() -> AnyBroker, samples: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bdir = dir.path().join("bench-trigger");
    std::fs::create_dir_all(&bdir)?;
    std::fs::write(bdir.join("swagger.yaml"), DOC)?;
    std::fs::write(bdir.join("main.py"), PY)?;
    let bundle = Bundle::load(&bdir).context("the bench-trigger bundle")?;
    let store = AnyStore::open_embedded(dir.path().join("records.redb")).await?;
    let calls = Calls::new(store.clone());
    let docs = Documents::new(store.clone());
    let (tron, runner) = (make(), make());
    for b in [&tron, &runner] {
        if let AnyBroker::Amqp(a) = b {
            anyhow::ensure!(
                a.wait_connected(Duration::from_secs(10)).await,
                "cannot reach RabbitMQ"
            );
        }
    }
    let stop = CancellationToken::new();
    tokio::spawn(
        funcatron_tron::TronNode::new(tron)
            .bundles(vec![bundle.clone()])
            .calls(calls.clone())
            .documents(docs.clone())
            .run(stop.clone()),
    );
    tokio::spawn(
        funcatron_runner::RunnerNode::new(runner)
            .bundles(vec![bundle])
            .run(stop.clone()),
    );
    // Ready once the bundle's collection is defined and a triggered call
    // is answered (the Python worker warm).
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while docs.collection("bench").await.is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < until,
            "the collection was never defined"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        docs.put(
            "bench",
            &format!("warm-{i}"),
            json!({"i": i}),
            Precondition::None,
        )
        .await?;
        next_start(&store, &calls, &mut seen).await?;
    }
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        let t0 = now_ms_f64();
        docs.put(
            "bench",
            &format!("d{}", i % 50),
            json!({"i": i}),
            Precondition::None,
        )
        .await?;
        let started = next_start(&store, &calls, &mut seen).await?;
        lat.push(started - t0);
    }
    stop.cancel();
    lat.sort_by(f64::total_cmp);
    let pick = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    let (p50, p99) = (pick(0.5), pick(0.99));
    println!(
        "{:<44} {:>10} {:>9.3} {:>9.3}",
        format!("(t) document write -> Func start, {label}"),
        samples,
        p50,
        p99
    );
    println!(
        "{:<44} {:>10} {:>9.2}",
        format!("(t) ratio p50 / {TARGET_P50_MS} ms target, {label}"),
        "",
        p50 / TARGET_P50_MS
    );
    Ok(())
}

/// The rows: RabbitMQ at `amqp`, then the embedded broker.
pub async fn run(amqp: &str, samples: usize) -> Result<()> {
    println!(
        "machine: {} CPUs; {samples} writes, one at a time",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9}",
        "measurement", "samples", "p50 ms", "p99 ms"
    );
    let url = amqp.to_owned();
    one_broker(
        "RabbitMQ",
        &move || AnyBroker::Amqp(AmqpBroker::connect(&url)),
        samples,
    )
    .await?;
    // One embedded broker, shared by the Tron and the Runner.
    let embedded = AnyBroker::Embedded(EmbeddedBroker::new(4096));
    one_broker("embedded", &move || embedded.clone(), samples).await
}

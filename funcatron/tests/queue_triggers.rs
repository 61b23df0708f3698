//! Queue and exchange triggers on a real RabbitMQ (a fresh virtual host),
//! with separate Tron and Runner processes sharing a PostgreSQL state
//! store (a schema of the test's own). Another application's durable
//! queue (`orders.in`, declared by the test with arguments of its own)
//! feeds one operation, a topic exchange (`shop`, binding `order.*`)
//! feeds another in batches. The Func reports every execution to a
//! receiver in the test. Midway the Runner is killed with SIGKILL; the
//! Tron still holds the messages of the calls in flight unacknowledged,
//! and once another Runner is started every message is handled: one call
//! per message id, the queues empty, a message whose call is
//! dead-lettered acknowledged too, messages of other routing keys never
//! seen.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use funcatron_calls::{CallState, Calls};
use funcatron_store::AnyStore;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

const ORDERS: usize = 240;
const EVENTS: usize = 40;

/// Reports (message ids, routing keys, bodies, call id, attempt, trigger)
/// to `HOOK`, works 40 ms, and refuses (500) a batch holding a body with
/// `"fail": true`.
const PY: &str = r#"import json
import os
import time
import urllib.request


def handle(req):
    ev = json.loads(req.body)
    evs = ev if isinstance(ev, list) else [ev]
    report = {
        "batch": isinstance(ev, list),
        "ids": [e["message_id"] for e in evs],
        "keys": [e["routing_key"] for e in evs],
        "bodies": [e["body"] for e in evs],
        "call": req.headers.get("x-funcatron-call-id", ""),
        "attempt": req.headers.get("x-funcatron-attempt", ""),
        "trigger": req.headers.get("x-funcatron-trigger", ""),
    }
    r = urllib.request.Request(os.environ["HOOK"], data=json.dumps(report).encode(), method="POST")
    urllib.request.urlopen(r, timeout=10).read()
    time.sleep(0.04)
    if any(isinstance(b, dict) and b.get("fail") for b in report["bodies"]):
        return ("refused", 500)
    return "ok"
"#;

fn bundle(root: &std::path::Path, hook: &str) {
    let op = |path: &str, id: &str, trigger: &str| {
        format!(
            "  {path}:\n    post:\n      operationId: {id}\n      responses: {{'200': {{description: ok}}}}\n      x-funcatron-triggers:\n        - name: {trigger}\n"
        )
    };
    let swagger = format!(
        "swagger: '2.0'\ninfo: {{title: qt, version: '1'}}\nbasePath: /qt\n\
         x-funcatron:\n  name: qt\n  runtime: python\n  handler: main.py\n  concurrency: 4\n  timeout_ms: 10000\n  env: {{HOOK: '{hook}'}}\n  async: {{retries: 1, backoff_initial_ms: 20}}\n\
         paths:\n{}          queue: {{queue: orders.in, concurrency: 4}}\n{}          queue: {{exchange: shop, binding_key: 'order.*', batch: 5, batch_window_ms: 300, concurrency: 2}}\n",
        op("/orders", "handle", "orders"),
        op("/events", "handle_events", "shop-orders"),
    );
    let py = format!("{PY}\n\nhandle_events = handle\n");
    write_bundle(
        root,
        "qt",
        &[("swagger.yaml", swagger.as_str()), ("main.py", py.as_str())],
    );
}

/// What the Func reported, per execution.
#[derive(Debug, serde::Deserialize, Clone)]
struct Report {
    batch: bool,
    ids: Vec<String>,
    keys: Vec<Option<String>>,
    call: String,
    trigger: String,
}

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, id: &str, body: &str) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn depth(broker: &str, queue: &str) -> (u64, u64) {
    queue_depths(broker)
        .into_iter()
        .find(|(n, _, _)| n == queue)
        .map_or((0, 0), |(_, r, u)| (r, u))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_triggers_lose_nothing_when_the_runner_is_killed() {
    let schema = fresh_pg_schema();
    let broker = fresh_vhost();
    let hook = free_addr();
    let (mut got, _r) = receiver(hook).await;
    let root = tempfile::tempdir().unwrap();
    bundle(root.path(), &format!("http://{hook}/hook"));

    // The other application's queue and exchange.
    let conn = lapin::Connection::connect(&broker, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(100_000));
    ch.queue_declare("orders.in".into(), QueueDeclareOptions::durable(), args)
        .await
        .unwrap();
    ch.exchange_declare(
        "shop".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();

    let dir = root.path().to_str().unwrap().to_owned();
    let cache = test_cache_dir();
    let cache = cache.to_str().unwrap();
    let _tron = spawn(
        "tron",
        &broker,
        &["--bundles", &dir, "--state-store", &schema.url],
    );
    let runner_args = ["--bundles", &dir, "--workers", "2", "--cache-dir", cache];
    let runner = spawn("runner", &broker, &runner_args);

    // The exchange trigger's queue is bound once the Tron serves the
    // bundle: what is published to the exchange before is not for it.
    let trigger_queue = "funcatron.trigger.qt.shop-orders";
    eventually("the exchange trigger's queue is consumed", || async {
        let b = broker.clone();
        tokio::task::spawn_blocking(move || {
            queue_depths(&b).iter().any(|(n, _, _)| n == trigger_queue)
        })
        .await
        .unwrap()
    })
    .await;
    for i in 0..ORDERS {
        publish(
            &ch,
            "",
            "orders.in",
            &format!("m{i}"),
            &format!("{{\"n\": {i}}}"),
        )
        .await;
    }
    publish(&ch, "", "orders.in", "f1", "{\"fail\": true}").await;
    // Over the 10 MiB a triggered call may carry: dead-lettered, never called.
    let big = "x".repeat(11 << 20);
    publish(&ch, "", "orders.in", "big", &big).await;
    for i in 0..EVENTS {
        publish(&ch, "shop", "order.created", &format!("e{i}"), "plain text").await;
    }
    for i in 0..5 {
        publish(&ch, "shop", "stock.changed", &format!("x{i}"), "{}").await;
    }

    let mut reports: Vec<Report> = Vec::new();
    let mut next = async |reports: &mut Vec<Report>| {
        let g = tokio::time::timeout(Duration::from_secs(60), got.recv())
            .await
            .expect("a triggered call within a minute")
            .unwrap();
        reports.push(serde_json::from_slice(&g.body).unwrap());
    };
    while reports.len() < 40 {
        next(&mut reports).await;
    }

    // kill -9 of the Runner: the calls in flight are not final, so their
    // messages stay unacknowledged with the Tron.
    drop(runner);
    let b = broker.clone();
    let (ready, unacked) = tokio::task::spawn_blocking(move || depth(&b, "orders.in"))
        .await
        .unwrap();
    assert!(
        unacked > 0 && ready > 0,
        "with the Runner dead the Tron holds messages unacknowledged: ready {ready}, unacked {unacked}"
    );
    let _runner2 = spawn("runner", &broker, &runner_args);

    let wanted: BTreeSet<String> = (0..ORDERS)
        .map(|i| format!("m{i}"))
        .chain(std::iter::once("f1".to_owned()))
        .chain((0..EVENTS).map(|i| format!("e{i}")))
        .collect();
    let seen = |reports: &[Report]| -> BTreeSet<String> {
        reports.iter().flat_map(|r| r.ids.iter().cloned()).collect()
    };
    while !wanted.is_subset(&seen(&reports)) {
        next(&mut reports).await;
    }
    // Every message settled: nothing ready or unacknowledged in either
    // queue (the dead-lettered call's message included).
    eventually_within(
        "the trigger queues are empty",
        Duration::from_secs(60),
        || {
            let b = broker.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    depth(&b, "orders.in") == (0, 0) && depth(&b, trigger_queue) == (0, 0)
                })
                .await
                .unwrap()
            }
        },
    )
    .await;
    while let Ok(g) = got.try_recv() {
        reports.push(serde_json::from_slice(&g.body).unwrap());
    }

    // One call per message (executions of a call may repeat after the
    // kill: attempts redelivered), exchange messages in batches of at
    // most 5 with their routing key, other routing keys never delivered.
    let mut calls_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &reports {
        for id in &r.ids {
            calls_of
                .entry(id.clone())
                .or_default()
                .insert(r.call.clone());
        }
        if r.trigger == "shop-orders" {
            assert!(r.batch && !r.ids.is_empty() && r.ids.len() <= 5, "{r:?}");
            assert!(
                r.keys.iter().all(|k| k.as_deref() == Some("order.created")),
                "{r:?}"
            );
        } else {
            assert_eq!(
                (r.trigger.as_str(), r.batch, r.ids.len()),
                ("orders", false, 1),
                "{r:?}"
            );
        }
    }
    let seen: BTreeSet<String> = calls_of.keys().cloned().collect();
    assert_eq!(seen, wanted, "exactly the matching messages were handled");
    for (id, calls) in &calls_of {
        assert_eq!(calls.len(), 1, "message {id} made one call: {calls:?}");
    }
    let batches = reports
        .iter()
        .filter(|r| r.trigger == "shop-orders")
        .count();
    assert!(
        batches < EVENTS,
        "exchange messages were batched ({batches} calls for {EVENTS})"
    );

    // Each call is final: the failing message's dead-lettered (its one
    // retry refused too), every other succeeded.
    let store = AnyStore::open(&schema.url).await.unwrap();
    let calls = Calls::new(store);
    for (id, ids) in &calls_of {
        let call = ids.iter().next().unwrap();
        let record = calls.get(call).await.unwrap().expect("the call's record");
        let want = if id == "f1" {
            CallState::DeadLettered
        } else {
            CallState::Succeeded
        };
        assert_eq!(record.state, want, "message {id}, call {call}");
    }
    // The oversized message is on funcatron.dead with its reason.
    let mut reasons = Vec::new();
    while let Some(m) = ch
        .basic_get(
            funcatron_control::names::DEAD_LETTERS.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let reason = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| {
                h.inner()
                    .get(funcatron_control::headers::DEAD_REASON)
                    .and_then(|v| v.as_long_string())
                    .map(|v| v.to_string())
            })
            .unwrap_or_default();
        reasons.push((m.delivery.data.len(), reason));
    }
    assert!(
        reasons
            .iter()
            .any(|(len, why)| *len == big.len() && why.contains("over")),
        "the oversized message is dead-lettered with its reason: {:?}",
        reasons
            .iter()
            .map(|(l, w)| (l, w.as_str()))
            .collect::<Vec<_>>()
    );
    conn.close(200, "done".into()).await.unwrap();
}

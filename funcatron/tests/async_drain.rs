//! A backlog of asynchronous calls does not starve synchronous requests:
//! 10,000 async calls are queued for a Func while no Runner runs, then a
//! Runner starts and drains them while synchronous requests to the same
//! Func keep coming. Every call must reach `succeeded` and every sync
//! request be answered 200. (Correctness only: how the sync p99 during the
//! drain compares with an idle run is measured by `funcatron-bench`, see
//! docs/performance.md; timing goals live in the benchmark.)

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, Broker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_calls::{CallState, Calls};
use funcatron_ingress::IngressOptions;
use funcatron_store::{AnyStore, Store};

const CALLS: usize = 10_000;

const DOC: &str = r#"swagger: '2.0'
info: {title: t, version: '1'}
basePath: /d
x-funcatron: {name: drain, runtime: lua}
paths:
  /work: {post: {operationId: work, responses: {'200': {description: ok}}}}
"#;

const LUA: &str = r#"return {
  work = function(r) return 'ok ' .. (r.headers['x-funcatron-attempt'] or 'sync') end,
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_queued_calls_drain_while_sync_requests_are_answered() {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let dir = write_bundle(
        root.path(),
        "drain",
        &[("swagger.yaml", DOC), ("main.lua", LUA)],
    );
    let bundle = Bundle::load(&dir).unwrap();
    let async_queue = funcatron_control::names::func_async_queue(&bundle.name, &bundle.version);
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(100_000));
    let store = AnyStore::memory().unwrap();
    let calls = Calls::new(store.clone());
    // No Runner yet: the calls wait in the Func's async queue.
    let c = spawn_cluster(
        broker.clone(),
        vec![bundle.clone()],
        IngressOptions {
            calls: Some(calls.clone()),
            ..IngressOptions::default()
        },
        None,
    )
    .await;
    wait_ready(&format!("{}/_funcatron/health", c.base)).await;

    let http = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (http, base, next) = (http.clone(), c.base.clone(), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < CALLS {
                let r = http
                    .post(format!("{base}/d/work"))
                    .header("prefer", "respond-async")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                ids.push(r.headers()["x-call-id"].to_str().unwrap().to_owned());
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), CALLS);
    eventually("every call waits in the async queue", || async {
        broker.depth(&async_queue).await.unwrap().ready == CALLS as u64
    })
    .await;
    println!("{CALLS} queued after {:?}", started.elapsed());

    // The Runner starts; sync requests go on until the backlog is gone.
    let drain_started = Instant::now();
    tokio::spawn(
        funcatron_runner::RunnerNode::new(broker.clone())
            .options(funcatron_runner::RunnerOptions {
                workers: 2,
                ..Default::default()
            })
            .bundles(vec![bundle])
            .run(c.shutdown.clone()),
    );
    let done = Arc::new(AtomicBool::new(false));
    let mut sync = Vec::new();
    for _ in 0..4 {
        let (http, base, done) = (http.clone(), c.base.clone(), Arc::clone(&done));
        sync.push(tokio::spawn(async move {
            let (mut answered, mut during) = (Vec::new(), 0usize);
            while !done.load(Ordering::Relaxed) || answered.is_empty() {
                let r = http
                    .post(format!("{base}/d/work"))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .unwrap();
                let draining = !done.load(Ordering::Relaxed);
                answered.push((r.status().as_u16(), r.text().await.unwrap()));
                during += usize::from(draining);
            }
            (answered, during)
        }));
    }
    eventually_within(
        "every queued call is finished",
        Duration::from_secs(120),
        || async {
            let mut waiting = 0;
            for state in ["queued", "running"] {
                waiting += store
                    .count(funcatron_calls::COLLECTION, None, Some(state))
                    .await
                    .unwrap();
            }
            waiting == 0
        },
    )
    .await;
    done.store(true, Ordering::Relaxed);
    let drained = drain_started.elapsed();

    let (mut answered, mut during) = (0, 0);
    for t in sync {
        let (list, d) = t.await.unwrap();
        for (status, body) in &list {
            assert_eq!((*status, body.as_str()), (200, "ok sync"));
        }
        answered += list.len();
        during += d;
    }
    assert!(during > 0, "sync requests were answered during the drain");
    for id in &ids {
        let call = calls.get(id).await.unwrap().expect("a record");
        assert_eq!(call.state, CallState::Succeeded, "{id}: {call:?}");
        assert_eq!(call.attempts.len(), 1, "{id}: {call:?}");
        let body = call.result.unwrap().body;
        assert_eq!(body, "ok 1");
    }
    println!(
        "drained {CALLS} calls in {drained:?} ({:.0}/s); {answered} sync requests answered 200 ({during} during the drain); took {:?}",
        CALLS as f64 / drained.as_secs_f64(),
        started.elapsed()
    );
}

//! At-least-once delivery of asynchronous calls, measured under crashes:
//! separate ingress, Tron and Runner processes on a real RabbitMQ (a fresh
//! virtual host) sharing one PostgreSQL state store (a schema of the
//! test's own). 2,000 calls are submitted while a Runner is killed with
//! SIGKILL (another is started), a Tron is killed with SIGKILL (a second
//! one keeps running; the first is started again) and RabbitMQ is
//! restarted. Every accepted call must reach exactly one final state; the
//! Func reports every execution to a counter in the test, keyed by the
//! call id it gets in `x-funcatron-call-id`, so duplicates are counted and
//! checked against what could have been in flight at the kills.
//!
//! Its own test binary, because it restarts the broker every other test
//! shares.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use funcatron_calls::{CallState, Calls};
use funcatron_store::{AnyStore, Store};

const CALLS: usize = 2_000;
/// Submitting clients at once.
const SUBMITTERS: usize = 32;
/// Each client's pause after an accepted submission.
const PACE: Duration = Duration::from_millis(150);
/// Async calls one Runner holds unacknowledged (its prefetch).
const RUNNER_PREFETCH: usize = 32;
/// Requests one Tron holds unacknowledged.
const TRON_PREFETCH: usize = 64;
/// Outcomes one Tron applies at once (`funcatron_calls::outcomes`).
const OUTCOME_PREFETCH: usize = 64;

/// Every execution calls the counter with its call id and attempt, then
/// works for 25 ms (four worker processes: at most ~160 calls/s, below the
/// submission rate, so a backlog is queued and held at every kill); one
/// call in a hundred (by its id, [`fails_once`]) fails its first attempt with a
/// 503, so retries (delayed publishes) are in flight at the kills too.
const PY: &str = r#"import os
import time
import urllib.request


def work(req):
    cid = req.headers.get("x-funcatron-call-id", "sync")
    n = req.headers.get("x-funcatron-attempt", "0")
    urllib.request.urlopen(f"{os.environ['COUNTER']}/hit/{cid}/{n}", timeout=10).read()
    time.sleep(0.025)
    if n == "1" and sum(cid.encode()) % 100 == 0:
        return ("failing once", 503)
    return "done " + cid
"#;

/// The Func's choice of the calls that fail once (the sum of the id's
/// bytes, a multiple of 100: about one in a hundred).
fn fails_once(call_id: &str) -> bool {
    call_id.bytes().map(u32::from).sum::<u32>() % 100 == 0
}

/// Executions seen: call id -> attempt numbers, in arrival order.
type Hits = Arc<Mutex<HashMap<String, Vec<u32>>>>;

async fn counter() -> (String, Hits) {
    use axum::extract::{Path, State};
    let hits: Hits = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hit/{cid}/{n}",
            axum::routing::get(
                |State(h): State<Hits>, Path((cid, n)): Path<(String, u32)>| async move {
                    h.lock().unwrap().entry(cid).or_default().push(n);
                    "ok"
                },
            ),
        )
        .with_state(Arc::clone(&hits));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

fn executions(hits: &Hits) -> usize {
    hits.lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.as_str() != "sync")
        .map(|(_, v)| v.len())
        .sum()
}

struct Accepted {
    call_id: String,
    secret: String,
}

/// Submit until `CALLS` are accepted; a refusal (503 while the broker is
/// down) is a call not accepted: that client waits a little and submits
/// a new one. Returns the accepted calls and the refusals by status.
async fn submit_all(
    base: String,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    count: Arc<AtomicUsize>,
) -> HashMap<u16, usize> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let slots = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SUBMITTERS {
        let (http, base, accepted, count, slots) = (
            http.clone(),
            base.clone(),
            Arc::clone(&accepted),
            Arc::clone(&count),
            Arc::clone(&slots),
        );
        tasks.push(tokio::spawn(async move {
            let mut refused: HashMap<u16, usize> = HashMap::new();
            let until = Instant::now() + Duration::from_secs(90);
            while slots.fetch_add(1, Ordering::SeqCst) < CALLS {
                // This slot is filled by the first submission accepted.
                loop {
                    assert!(Instant::now() < until, "submissions never accepted");
                    let r = http
                        .post(format!("{base}/crash/work"))
                        .header("prefer", "respond-async")
                        .body("x")
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 202 => {
                            let h = r.headers();
                            let a = Accepted {
                                call_id: h["x-call-id"].to_str().unwrap().to_owned(),
                                secret: h["x-call-secret"].to_str().unwrap().to_owned(),
                            };
                            accepted.lock().unwrap().push(a);
                            count.fetch_add(1, Ordering::SeqCst);
                            // Clients pace themselves (about 200 calls/s
                            // in all), so submissions go on through the
                            // kills.
                            tokio::time::sleep(PACE).await;
                            break;
                        }
                        Ok(r) => *refused.entry(r.status().as_u16()).or_default() += 1,
                        Err(_) => *refused.entry(0).or_default() += 1,
                    }
                    // The client's backoff after a refusal, not a wait
                    // for the system.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            refused
        }));
    }
    let mut refused = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *refused.entry(k).or_default() += v;
        }
    }
    refused
}

/// Calls of this test not yet final (the store's queued and running
/// records that are among `ids`).
async fn unfinished(calls: &Calls, ids: &std::collections::HashSet<String>) -> usize {
    let mut n = 0;
    for state in [CallState::Queued, CallState::Running] {
        let mut after: Option<String> = None;
        loop {
            let Ok(page) = calls.waiting(state, after.as_deref(), 500).await else {
                return usize::MAX;
            };
            n += page.iter().filter(|c| ids.contains(&c.id)).count();
            if page.len() < 500 {
                break;
            }
            after = page.last().map(|c| c.id.clone());
        }
    }
    n
}

/// Where the run is at a kill: calls accepted, executions, records queued.
async fn snapshot(what: &str, count: &AtomicUsize, hits: &Hits, store: &AnyStore) -> String {
    let queued = store
        .count(funcatron_calls::COLLECTION, None, Some("queued"))
        .await
        .unwrap();
    format!(
        "{what}: {} accepted, {} executed, {queued} queued",
        count.load(Ordering::SeqCst),
        executions(hits),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_call_reaches_one_final_state_through_kills_and_a_broker_restart() {
    let started = Instant::now();
    // Dropped last: the processes go first.
    let schema = fresh_pg_schema();
    let broker = fresh_vhost();
    let (counter_url, hits) = counter().await;
    let root = tempfile::tempdir().unwrap();
    write_bundle(
        root.path(),
        "crash",
        &[
            (
                "swagger.yaml",
                &format!(
                    "swagger: '2.0'\ninfo: {{title: t, version: '1'}}\nbasePath: /crash\n\
                     x-funcatron:\n  name: crash\n  runtime: python\n  handler: main.py\n  concurrency: 4\n  timeout_ms: 10000\n  env: {{COUNTER: '{counter_url}'}}\n  async: {{retries: 3, backoff_initial_ms: 50, backoff_factor: 2.0, backoff_max_ms: 200}}\n\
                     paths:\n  /work: {{post: {{operationId: work, responses: {{'200': {{description: ok}}}}}}}}\n"
                ),
            ),
            ("main.py", PY),
        ],
    );
    let dir = root.path().to_str().unwrap().to_owned();
    let cache = test_cache_dir();
    let cache = cache.to_str().unwrap();
    let (rp, tp) = (RUNNER_PREFETCH.to_string(), TRON_PREFETCH.to_string());
    let tron_args = [
        "--bundles",
        &dir,
        "--state-store",
        &schema.url,
        "--tron-prefetch",
        &tp,
    ];
    let runner_args = [
        "--bundles",
        &dir,
        "--workers",
        "2",
        "--cache-dir",
        cache,
        "--runner-prefetch",
        &rp,
    ];
    let mut tron_a = spawn("tron", &broker, &tron_args);
    let mut tron_b = spawn("tron", &broker, &tron_args);
    let runner = spawn("runner", &broker, &runner_args);
    let (mut ingress, base) = spawn_ingress(
        &broker,
        &["--calls-store", &schema.url, "--timeout-ms", "10000"],
    )
    .await;
    let http = reqwest::Client::new();
    eventually_within("the Func answers", Duration::from_secs(60), || async {
        http.post(format!("{base}/crash/work"))
            .body("x")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let store = AnyStore::open(&schema.url).await.unwrap();
    let calls = Calls::new(store.clone());
    println!("cluster ready after {:?}", started.elapsed());

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let submitter = tokio::spawn(submit_all(
        base.clone(),
        Arc::clone(&accepted),
        Arc::clone(&count),
    ));
    let reached = |n: usize| {
        let count = Arc::clone(&count);
        move || {
            let count = Arc::clone(&count);
            async move { count.load(Ordering::SeqCst) >= n }
        }
    };
    let mut kills = Vec::new();

    // 1. kill -9 a Runner mid-stream; another takes its place.
    eventually_within("400 calls accepted", Duration::from_secs(60), reached(400)).await;
    eventually("the Runner executes async calls", || async {
        executions(&hits) >= 100
    })
    .await;
    kills.push(snapshot("Runner kill", &count, &hits, &store).await);
    drop(runner);
    let mut runner2 = spawn("runner", &broker, &runner_args);

    // 2. kill -9 a Tron; the other keeps routing and applying outcomes,
    // and the first is started again.
    eventually_within("900 calls accepted", Duration::from_secs(60), reached(900)).await;
    let before = executions(&hits);
    eventually("the new Runner executes async calls", || async {
        executions(&hits) >= before + 50
    })
    .await;
    kills.push(snapshot("Tron kill", &count, &hits, &store).await);
    drop(tron_a);
    tron_a = spawn("tron", &broker, &tron_args);

    // 3. RabbitMQ stopped and started again under everything.
    eventually_within(
        "1400 calls accepted",
        Duration::from_secs(60),
        reached(1400),
    )
    .await;
    kills.push(snapshot("RabbitMQ restart", &count, &hits, &store).await);
    let restart_started = Instant::now();
    tokio::task::spawn_blocking(restart_rabbitmq).await.unwrap();
    kills.push(format!(
        "RabbitMQ back after {:?}",
        restart_started.elapsed()
    ));

    let refused = tokio::time::timeout(Duration::from_secs(90), submitter)
        .await
        .expect("every submission answered")
        .unwrap();
    let accepted = std::mem::take(&mut *accepted.lock().unwrap());
    assert_eq!(accepted.len(), CALLS);
    let ids: std::collections::HashSet<String> =
        accepted.iter().map(|a| a.call_id.clone()).collect();
    assert_eq!(ids.len(), CALLS, "call ids are unique");
    println!(
        "{CALLS} accepted after {:?}; refused submissions by status: {refused:?}",
        started.elapsed()
    );

    // Every accepted call leaves the queued state...
    let mut left = usize::MAX;
    let drained = Instant::now() + Duration::from_secs(60);
    while Instant::now() < drained {
        left = unfinished(&calls, &ids).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and the broker has nothing left for them: no message ready or
    // unacknowledged in the request, async, outcome or delay queues (so
    // no further attempt can run and no record can change again).
    let ours = |n: &str| {
        n == "funcatron.requests"
            || n == "funcatron.outcomes"
            || n.starts_with("funcatron.async.")
            || n.starts_with("funcatron.delay.")
    };
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let b = broker.clone();
        let depths = tokio::task::spawn_blocking(move || queue_depths(&b))
            .await
            .unwrap();
        let busy: Vec<_> = depths
            .iter()
            .filter(|(n, r, u)| ours(n) && (*r > 0 || *u > 0))
            .collect();
        if busy.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "the broker still holds messages: {busy:?} ({left} calls unfinished)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Per call: one record, in one final state, with attempts 1..=k each
    // recorded once; every recorded attempt was executed; executions past
    // the recorded attempts are duplicates.
    let hits = hits.lock().unwrap().clone();
    let mut states: HashMap<&'static str, usize> = HashMap::new();
    let mut problems = Vec::new();
    let mut duplicates: Vec<(String, Vec<u32>, usize)> = Vec::new();
    let mut retried = 0;
    for a in &accepted {
        let Some(call) = calls.get(&a.call_id).await.unwrap() else {
            problems.push(format!("{}: lost (no record)", a.call_id));
            continue;
        };
        *states.entry(call.state.as_str()).or_default() += 1;
        let ns: Vec<u32> = call.attempts.iter().map(|t| t.n).collect();
        let want: Vec<u32> = (1..=ns.len() as u32).collect();
        let ran = hits.get(&a.call_id).cloned().unwrap_or_default();
        match call.state {
            CallState::Succeeded | CallState::DeadLettered => {}
            s => problems.push(format!("{}: {} (not final)", a.call_id, s.as_str())),
        }
        if ns != want {
            problems.push(format!("{}: attempts {ns:?}", a.call_id));
        }
        let expected: Vec<u16> = if fails_once(&a.call_id) {
            retried += 1;
            vec![503, 200]
        } else {
            vec![200]
        };
        let statuses: Vec<u16> = call.attempts.iter().map(|t| t.status).collect();
        if call.state == CallState::Succeeded && statuses != expected {
            problems.push(format!("{}: statuses {statuses:?}", a.call_id));
        }
        for n in &ns {
            if !ran.contains(n) {
                problems.push(format!("{}: attempt {n} recorded, never ran", a.call_id));
            }
        }
        if ran.len() > ns.len() {
            duplicates.push((a.call_id.clone(), ran.clone(), ran.len() - ns.len()));
        }
    }
    // The status endpoint agrees (a sample, with the secret).
    for a in accepted.iter().step_by(20) {
        let r = http
            .get(format!("{base}/_funcatron/calls/{}", a.call_id))
            .header("x-call-secret", &a.secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        let want = calls.get(&a.call_id).await.unwrap().unwrap();
        assert_eq!(v["state"], want.state.as_str(), "{v}");
    }
    let unaccepted: usize = hits
        .iter()
        .filter(|(k, _)| k.as_str() != "sync" && !ids.contains(*k))
        .map(|(_, v)| v.len())
        .sum();
    let extra: usize = duplicates.iter().map(|d| d.2).sum();
    // What could have been in flight at each kill: the killed Runner's
    // prefetch; the killed Tron's requests and outcomes; at the broker
    // restart, everything every component held unacknowledged (one
    // Runner, two Trons).
    let bound = RUNNER_PREFETCH
        + (TRON_PREFETCH + OUTCOME_PREFETCH)
        + (RUNNER_PREFETCH + 2 * (TRON_PREFETCH + OUTCOME_PREFETCH));
    for k in &kills {
        println!("{k}");
    }
    println!("final states: {states:?}; {retried} calls failed their first attempt by design");
    println!(
        "executions: {} of accepted calls, {} duplicate executions over {} calls (bound {bound}), \
         {unaccepted} of calls refused to their client (the broker had them when the connection dropped)",
        hits.iter()
            .filter(|(k, _)| ids.contains(*k))
            .map(|(_, v)| v.len())
            .sum::<usize>(),
        extra,
        duplicates.len()
    );
    for (id, ran, _) in duplicates.iter().take(10) {
        println!("  duplicate: {id} ran attempts {ran:?}");
    }
    println!("took {:?}", started.elapsed());
    assert_eq!(left, 0, "calls never finished");
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    assert!(
        extra <= bound,
        "{extra} duplicate executions, more than the {bound} that could be in flight"
    );
    assert_eq!(states.values().sum::<usize>(), CALLS);
    for p in [&mut tron_a, &mut tron_b, &mut runner2, &mut ingress] {
        assert!(p.alive(), "{} exited", p.name);
    }
}

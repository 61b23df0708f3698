//! Schedules fire once per tick across Trons, on an injected clock: two
//! schedulers (two Trons) share one state store and step through half an
//! hour of ticks of an every-10-seconds schedule in a few milliseconds of
//! the test; one of them is killed (it stops, holding the lease) and the
//! other takes over once the lease expires, with no tick missed and none
//! fired twice. Then a total outage: the catch-up rule decides what the
//! missed ticks fire. And the document relay, which shares the trigger
//! set: it waits for the served triggers before its first pass.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use funcatron_broker::{AnyBroker, Broker, EmbeddedBroker, QueueKind};
use funcatron_bundle::Bundle;
use funcatron_calls::Calls;
use funcatron_store::{AnyStore, Query, Store};
use funcatron_tron::schedules::{state_of, Scheduler};
use funcatron_tron::triggers::TriggerSet;

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;

fn bundle(cron: &str, catch_up: &str) -> Bundle {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("swagger.yaml"),
        format!(
            "swagger: '2.0'\ninfo: {{title: t, version: '1'}}\nbasePath: /clock\n\
             x-funcatron: {{name: clock, runtime: lua}}\npaths:\n  /tick:\n    post:\n      operationId: tick\n      responses: {{'200': {{description: ok}}}}\n      x-funcatron-triggers:\n        - name: every-10s\n          schedule: {{cron: '{cron}', catch_up: {catch_up}}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("main.lua"),
        "return { tick = function() return 'ok' end }",
    )
    .unwrap();
    let b = Bundle::load(dir.path()).unwrap();
    std::mem::forget(dir);
    b
}

async fn setup() -> (AnyStore, Calls, AnyBroker) {
    let store = AnyStore::memory().unwrap();
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(4096));
    broker
        .declare(funcatron_control::names::REQUESTS, QueueKind::Work)
        .await
        .unwrap();
    (store.clone(), Calls::new(store), broker)
}

/// The ticks that got a call, from the calls' idempotency keys.
async fn fired_ticks(store: &AnyStore) -> Vec<u64> {
    let keys = store
        .list(&Query::new(funcatron_calls::IDEMPOTENCY).limit(1000))
        .await
        .unwrap();
    let mut ticks: Vec<u64> = keys
        .iter()
        .filter_map(|r| r.key.rsplit("tick-").next()?.parse().ok())
        .collect();
    ticks.sort_unstable();
    ticks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_firing_per_tick_across_two_trons_one_killed() {
    let (store, calls, broker) = setup().await;
    let set = TriggerSet::of(&[bundle("*/10 * * * * *", "latest")]);
    let ttl = Duration::from_millis(300);
    let mut a = Some(Scheduler::new(
        calls.clone(),
        broker.clone(),
        "tron-a".into(),
        ttl,
    ));
    let mut b = Scheduler::new(calls.clone(), broker.clone(), "tron-b".into(), ttl);
    // First seen at T0 + 5 s: it starts after the tick at T0.
    let mut fired = 0;
    for s in [a.as_mut().unwrap(), &mut b] {
        fired += s.step(&set, T0 + 5_000).await.unwrap();
    }
    assert_eq!(fired, 0, "nothing fires when a schedule is first seen");
    for i in 1..=180u64 {
        let now = T0 + i * 10_000 + 3; // each tick, 3 ms late
        if i == 60 {
            a = None; // killed: it never releases its lease
        }
        let mut this_tick = 0;
        if let Some(a) = a.as_mut() {
            this_tick += a.step(&set, now).await.unwrap();
        }
        this_tick += b.step(&set, now).await.unwrap();
        if this_tick == 0 {
            // A's lease has not expired yet: B takes over once it has, at
            // this same tick (the injected clock waits; nothing is missed).
            let until = Instant::now() + Duration::from_secs(10);
            while this_tick == 0 {
                assert!(Instant::now() < until, "B never took over");
                tokio::task::yield_now().await;
                this_tick = b.step(&set, now).await.unwrap();
            }
        }
        assert_eq!(this_tick, 1, "tick {i} fired once");
        fired += this_tick;
    }
    assert_eq!(fired, 180);
    let want: Vec<u64> = (1..=180).map(|i| T0 + i * 10_000).collect();
    assert_eq!(
        fired_ticks(&store).await,
        want,
        "every tick has exactly one call"
    );
    let state = state_of(&store, "clock", "every-10s")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.fired, 180);
    assert_eq!(state.last_tick_ms, T0 + 1_800_000);
    // A pass at the same time again fires nothing.
    assert_eq!(b.step(&set, T0 + 1_800_003).await.unwrap(), 0);
}

/// After a total outage of ten minutes, the missed ticks follow the
/// trigger's catch-up rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_after_an_outage_follow_catch_up() {
    for (rule, expect) in [("latest", 1usize), ("skip", 0), ("all", 10)] {
        let (store, calls, broker) = setup().await;
        let set = TriggerSet::of(&[bundle("0 * * * * *", rule)]);
        let ttl = Duration::from_secs(5);
        let mut s = Scheduler::new(calls.clone(), broker.clone(), "tron".into(), ttl);
        s.step(&set, T0 + 1).await.unwrap();
        assert_eq!(
            s.step(&set, T0 + 60_001).await.unwrap(),
            1,
            "{rule}: on time"
        );
        s.release().await;
        // Every Tron down for ten minutes; one starts 30 s past a tick.
        let mut s = Scheduler::new(calls, broker, "tron".into(), ttl);
        let now = T0 + 60_000 + 600_000 + 30_000;
        let n = s.step(&set, now).await.unwrap();
        assert_eq!(n, expect, "{rule}: ticks fired for the outage");
        let ticks: BTreeSet<u64> = fired_ticks(&store).await.into_iter().collect();
        assert_eq!(ticks.len(), 1 + expect, "{rule}: one call per fired tick");
        if rule == "latest" {
            assert!(
                ticks.contains(&(T0 + 660_000)),
                "latest: the newest missed tick"
            );
        }
        // Then the schedule goes on from now.
        assert_eq!(
            s.step(&set, T0 + 720_001).await.unwrap(),
            1,
            "{rule}: the next tick"
        );
    }
}

/// A Func `audit` whose `POST /audit/on` is triggered by `orders`.
fn audit_bundle() -> Bundle {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("swagger.yaml"),
        "swagger: '2.0'\ninfo: {title: t, version: '1'}\nbasePath: /audit\nx-funcatron: {name: audit, runtime: lua}\npaths:\n  /on:\n    post:\n      operationId: on\n      responses: {'200': {description: ok}}\n      x-funcatron-triggers:\n        - store: {collection: orders}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("main.lua"),
        "return { on = function() return 'ok' end }",
    )
    .unwrap();
    Bundle::load(dir.path()).unwrap()
}

/// The document relay does not start before the served triggers are
/// known: an event waiting in the outbox at start is delivered to its
/// trigger, not removed by a first pass that knew no subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_for_the_served_triggers() {
    use funcatron_documents::{Definition, Documents, Precondition};
    let (store, calls, broker) = setup().await;
    let docs = Documents::new(store.clone());
    docs.define("orders", Definition::default()).await.unwrap();
    docs.put(
        "orders",
        "o1",
        serde_json::json!({"n": 1}),
        Precondition::None,
    )
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(TriggerSet::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(funcatron_tron::triggers::relay(
        docs.clone(),
        calls,
        broker,
        rx,
        "tron".into(),
        funcatron_tron::triggers::RELAY_POLL,
        stop.clone(),
    ));
    // Longer than the relay's poll: a relay that ran now would drop it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(docs.backlog().await.unwrap(), 1, "the event waits");
    let bundle = audit_bundle();
    tx.send_replace(std::sync::Arc::new(TriggerSet::of(&[bundle])));
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = store
            .list(&Query::new(funcatron_calls::IDEMPOTENCY))
            .await
            .unwrap();
        if keys.iter().any(|r| r.key.contains("trigger audit on ")) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the waiting event was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
}

/// Wait (bounded by 10 s) until the relay has queued a call for the
/// event of document `id`'s version `version` of `orders`.
async fn wait_delivered(store: &AnyStore, docs: &funcatron_documents::Documents) -> usize {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = store
            .list(&Query::new(funcatron_calls::IDEMPOTENCY))
            .await
            .unwrap();
        let n = keys
            .iter()
            .filter(|r| r.key.contains("trigger audit on "))
            .count();
        if docs.backlog().await.unwrap() == 0 && n > 0 {
            return n;
        }
        assert!(Instant::now() < until, "the event was never delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A change committed by another process (a second handle on the same
/// store, as a standalone ingress or another Tron has) wakes the relay
/// through its announcement on the broker: with the relay's poll an hour
/// long, only the announcement can deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_s_change_wakes_the_relay() {
    use funcatron_documents::{Definition, Documents, Precondition};
    let (store, calls, broker) = setup().await;
    let relays = Documents::new(store.clone());
    let other = Documents::new(store.clone());
    relays
        .define("orders", Definition::default())
        .await
        .unwrap();
    let bundle = audit_bundle();
    let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(TriggerSet::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(funcatron_tron::triggers::relay(
        relays.clone(),
        calls,
        broker.clone(),
        rx,
        "tron".into(),
        Duration::from_secs(3600),
        stop.clone(),
    ));
    tokio::spawn(funcatron_tron::triggers::announce(
        other.clone(),
        broker,
        "ingress".into(),
        stop.clone(),
    ));
    // The first pass (at start) delivers a change made before it.
    other
        .put(
            "orders",
            "o1",
            serde_json::json!({"n": 1}),
            Precondition::None,
        )
        .await
        .unwrap();
    tx.send_replace(std::sync::Arc::new(TriggerSet::of(&[bundle])));
    assert_eq!(wait_delivered(&store, &relays).await, 1);
    // Then only the announcement can wake it.
    other
        .put(
            "orders",
            "o1",
            serde_json::json!({"n": 2}),
            Precondition::None,
        )
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while wait_delivered(&store, &relays).await < 2 {
        assert!(
            Instant::now() < until,
            "the second change was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
}

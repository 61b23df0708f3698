//! Node contexts: two Trons and three Runners in one process (as `funcatron
//! up` and the tests run them) keep what is theirs. Each Runner's
//! heartbeats and Func log lines arrive under its own id; each Tron counts
//! only the requests it dispatched itself.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, Broker, EmbeddedBroker};
use funcatron_control::names::{LOGS_TOPIC, STATS_TOPIC};
use funcatron_control::state::RunnerStats;
use funcatron_ingress::edge::Routing;
use funcatron_ingress::IngressOptions;
use funcatron_runner::{RunnerNode, RunnerOptions};
use funcatron_tron::TronNode;
use tokio_util::sync::CancellationToken;

const FUNCS: [&str; 3] = ["f1", "f2", "f3"];
const N: u64 = 20;

fn lua_bundle(root: &std::path::Path, name: &str) {
    let spec = format!(
        "swagger: \"2.0\"\ninfo: {{title: {name}, version: \"1\"}}\nbasePath: /{name}\n\
         x-funcatron: {{name: {name}, runtime: lua}}\npaths:\n  /hi:\n    get:\n      \
         operationId: hi\n      responses: {{\"200\": {{description: ok}}}}\n"
    );
    let code = format!(
        "return {{ hi = function(req) print(\"{name} says hi to \" .. req.id) return \"ok\" end }}\n"
    );
    write_bundle(root, name, &[("swagger.yaml", &spec), ("main.lua", &code)]);
}

/// An embedded ingress on port 0; its base URL.
async fn ingress(broker: &AnyBroker, shutdown: &CancellationToken, routing: Routing) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(funcatron_ingress::run(
        listener,
        broker.clone(),
        IngressOptions {
            routing,
            ..IngressOptions::default()
        },
        shutdown.clone(),
    ));
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trons_and_three_runners_in_one_process_keep_their_own_state() {
    let root = tempfile::tempdir().unwrap();
    for f in FUNCS {
        lua_bundle(root.path(), f);
    }
    let bundles = load(root.path());
    assert_eq!(bundles.len(), 3);
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let shutdown = CancellationToken::new();
    let mut stats = broker.subscribe(STATS_TOPIC).await.unwrap();
    let mut logs = broker.subscribe(LOGS_TOPIC).await.unwrap();

    let mut demands = Vec::new();
    for _ in 0..2 {
        let tron = TronNode::new(broker.clone()).bundles(bundles.clone());
        demands.push(std::sync::Arc::clone(&tron.context().demand));
        tokio::spawn(tron.run(shutdown.clone()));
    }
    // Runner i serves Func i only.
    let mut ids: HashMap<String, String> = HashMap::new();
    for f in FUNCS {
        let mine: Vec<_> = bundles.iter().filter(|b| b.name == f).cloned().collect();
        let runner = RunnerNode::new(broker.clone())
            .options(RunnerOptions {
                workers: 1,
                ..RunnerOptions::default()
            })
            .bundles(mine);
        ids.insert(f.to_owned(), runner.id().to_owned());
        tokio::spawn(runner.run(shutdown.clone()));
    }
    let distinct: std::collections::HashSet<_> = ids.values().collect();
    assert_eq!(distinct.len(), 3, "every Runner has its own id: {ids:?}");

    // Routed by the Trons: each counts what it dispatched (at the edge,
    // every Tron hears every ingress's report, by design).
    let base = ingress(&broker, &shutdown, Routing::Tron).await;
    let http = reqwest::Client::new();
    for f in FUNCS {
        for _ in 0..N {
            let r = http.get(format!("{base}/{f}/hi")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }

    // Each Tron counted only what it dispatched: together, every request
    // once (one shared counter would show every request on both).
    // (A Tron counts after its forward is confirmed, which may be just
    // after the answer came back.)
    for f in FUNCS {
        let sum = || demands.iter().map(|d| d.count(f)).sum::<u64>();
        eventually(&format!("{f} counted once"), || async { sum() >= N }).await;
        let counts: Vec<u64> = demands.iter().map(|d| d.count(f)).collect();
        assert_eq!(counts.iter().sum::<u64>(), N, "{f}: {counts:?}");
    }

    // Every line a Func printed comes from the Runner serving it.
    let mut lines: HashMap<String, u64> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(30);
    while lines.values().sum::<u64>() < N * 3 {
        let d = tokio::time::timeout_at(until.into(), logs.next())
            .await
            .expect("every print reaches the logs topic")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&d.message.payload).unwrap();
        let func = v["func"].as_str().unwrap().to_owned();
        assert_eq!(
            v["runner"].as_str(),
            Some(ids[&func].as_str()),
            "a line of {func} under another Runner's id: {v}"
        );
        assert!(v["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{func} says hi")));
        *lines.entry(func).or_default() += 1;
    }
    for f in FUNCS {
        assert_eq!(lines.get(f).copied(), Some(N), "{f}: {lines:?}");
    }

    // Each Runner's heartbeat reports its own Func, served N times.
    let mut heard: HashMap<String, RunnerStats> = HashMap::new();
    let served = |s: &RunnerStats, f: &str| s.funcs.get(f).map(|l| l.served);
    while FUNCS
        .iter()
        .any(|f| heard.get(&ids[*f]).and_then(|s| served(s, f)) != Some(N))
    {
        let d = tokio::time::timeout_at(until.into(), stats.next())
            .await
            .expect("every Runner's heartbeat arrives")
            .unwrap();
        let s: RunnerStats = serde_json::from_slice(&d.message.payload).unwrap();
        heard.insert(s.runner.clone(), s);
    }
    for f in FUNCS {
        let s = &heard[&ids[f]];
        let others: Vec<_> = s.funcs.keys().filter(|k| k.as_str() != f).collect();
        assert!(others.is_empty(), "{f}'s Runner reports others: {others:?}");
    }
    shutdown.cancel();
}

/// The Tron node with its registry and management API on port 0, a Runner
/// node following the registry and an ingress, all in this process: a
/// bundle pushed through the API is served, and the Tron's status shows
/// the requests it dispatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tron_node_with_its_management_api_runs_in_process() {
    let root = tempfile::tempdir().unwrap();
    lua_bundle(root.path(), "pushed");
    let store = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let shutdown = CancellationToken::new();

    let mgmt = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", mgmt.local_addr().unwrap());
    let tron = TronNode::new(broker.clone()).management(funcatron_tron::Management {
        registry: funcatron_tron::registry::RegistryOptions {
            store: store.path().to_owned(),
            environment: None,
            static_bundles: Vec::new(),
            advertise: api.clone(),
            limits: Default::default(),
            check: None,
            ..Default::default()
        },
        listener: mgmt,
        api: funcatron_tron::mgmt::MgmtOptions {
            tokens: funcatron_tron::mgmt::Tokens {
                admin: "secret".into(),
                read: Some("reader".into()),
            },
            max_upload: 1 << 20,
            ..funcatron_tron::mgmt::MgmtOptions::new("secret")
        },
        extra: axum::Router::new(),
        limits: Default::default(),
    });
    let demand = std::sync::Arc::clone(&tron.context().demand);
    tokio::spawn(tron.run(shutdown.clone()));
    tokio::spawn(
        RunnerNode::new(broker.clone())
            .follow(funcatron_runner::follow::FollowOptions {
                static_bundles: Vec::new(),
                cache_dir: cache.path().to_owned(),
                environment: None,
                only: Vec::new(),
                // Downloads need a token: the Runner fetches with the read one.
                read_token: Some("reader".into()),
                // The Tron this Runner follows is on loopback.
                outbound: funcatron_control::outbound::OutboundPolicy::new(&["127.0.0.1"]).unwrap(),
            })
            .run(shutdown.clone()),
    );
    let base = ingress(&broker, &shutdown, Routing::Edge).await;
    wait_ready(&format!("{api}/v1/health")).await;

    let (_, archive) = funcatron_bundle::archive::build(&root.path().join("pushed")).unwrap();
    let http = reqwest::Client::new();
    let up = |token: &'static str| {
        http.post(format!("{api}/v1/bundles?name=pushed&enable=true"))
            .bearer_auth(token)
            .header("content-type", "application/gzip")
            .body(archive.clone())
            .send()
    };
    assert_eq!(up("wrong").await.unwrap().status(), 401);
    assert_eq!(up("secret").await.unwrap().status(), 201);

    // The Runner fetches the enabled version from the Tron and serves it.
    eventually("the pushed Func answers", || async {
        text(&format!("{base}/pushed/hi")).await == (200, "ok".to_owned())
    })
    .await;
    // Routed at the edge: the ingress's demand report reaches the Tron.
    eventually("the Tron counts the routed request", || async {
        demand.count("pushed") >= 1
    })
    .await;
    let status: serde_json::Value = http
        .get(format!("{api}/v1/status"))
        .bearer_auth("secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        status["funcs"]["pushed"]["queue"]
            .as_str()
            .is_some_and(|q| q.starts_with("funcatron.func.pushed.")),
        "{status}"
    );
    shutdown.cancel();
}

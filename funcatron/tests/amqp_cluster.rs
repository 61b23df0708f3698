//! A three-node RabbitMQ cluster on this machine (distinct node names and
//! ports, joined with `rabbitmqctl`), with every work queue a quorum
//! queue (`--queue-type quorum`): separate ingress, Tron and Runner
//! processes given all three nodes in their broker URL, a PostgreSQL
//! state store. Under a stream of synchronous requests and asynchronous
//! calls, the Erlang VM of the node every component is connected to (the
//! first listed) is killed with SIGKILL. Checked: every synchronous
//! request is answered, 200 or a JSON error; every accepted asynchronous
//! call reaches `succeeded` (none lost with the node); and the components
//! move to the surviving nodes: requests succeed again after the kill.
//!
//! Its own test binary: it runs its own RabbitMQ nodes (killed at the
//! end), beside the shared one.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use funcatron_calls::{CallState, Calls};
use funcatron_store::AnyStore;

/// Three RabbitMQ nodes, clustered; their VMs killed when dropped.
struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<String>,
    ports: Vec<u16>,
    pids: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

fn ctl(node: &str, args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-n")
        .arg(node)
        .args(args)
        .output()
        .expect("rabbitmqctl on PATH");
    assert!(
        out.status.success(),
        "rabbitmqctl -n {node} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Wait (bounded by 90 s) until `node` is up: `await_startup` fails at
/// once while the node is not yet registered with epmd.
fn await_startup(node: &str) {
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let ok = Command::new("rabbitmqctl")
            .args(["-n", node, "await_startup", "--timeout", "10"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(Instant::now() < until, "RabbitMQ node {node} never started");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn free_port() -> u16 {
    free_addr().port()
}

/// Start three nodes and join the second and third to the first.
fn start_cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let tag = &funcatron_envelope::new_request_id()[..8];
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for i in 0..3 {
        let (port, dist) = (free_port(), free_port());
        let home = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(
            home.join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\nloopback_users = none\n"),
        )
        .unwrap();
        std::fs::write(home.join("plugins"), "").unwrap();
        nodes.push(format!("fc{i}-{tag}@localhost"));
        ports.push(port);
        // As root, rabbitmq-server runs as the rabbitmq user: its
        // directories must be that user's.
        let _ = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir.path())
            .status();
        let started = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &nodes[i])
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", home.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", home.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", home.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", home.join("plugins"))
            .env("RABBITMQ_PID_FILE", home.join("pid"))
            .status()
            .expect("rabbitmq-server on PATH");
        assert!(started.success());
    }
    let mut pids = Vec::new();
    for n in &nodes {
        await_startup(n);
        pids.push(
            ctl(n, &["eval", "os:getpid()."])
                .trim()
                .trim_matches('"')
                .to_owned(),
        );
    }
    for n in &nodes[1..] {
        ctl(n, &["stop_app"]);
        ctl(n, &["join_cluster", &nodes[0]]);
        ctl(n, &["start_app"]);
    }
    let status = ctl(&nodes[0], &["cluster_status"]);
    for n in &nodes {
        assert!(
            status.contains(n.as_str()),
            "{n} not in the cluster: {status}"
        );
    }
    Cluster {
        _dir: dir,
        nodes,
        ports,
        pids,
    }
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Sync answers: (status, body is a JSON error) per request, and when.
    sync: Vec<(u16, bool, Instant)>,
    /// Accepted async calls.
    accepted: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_no_accepted_call_and_everyone_moves_on() {
    let started = Instant::now();
    let schema = fresh_pg_schema();
    let cluster = start_cluster();
    println!("cluster of 3 up after {:?}", started.elapsed());
    let hosts: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let broker = format!("amqp://guest:guest@{}/%2f", hosts.join(","));
    let root = tempfile::tempdir().unwrap();
    write_bundle(
        root.path(),
        "q",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\ninfo: {title: q, version: '1'}\nbasePath: /q\nx-funcatron: {name: q, runtime: lua}\npaths:\n  /work:\n    post: {operationId: work, responses: {'200': {description: ok}}}\n",
            ),
            ("main.lua", "function work(req) return 'done' end\n"),
        ],
    );
    let dir = root.path().to_str().unwrap().to_owned();
    let quorum = ["--queue-type", "quorum"];
    let _tron = spawn(
        "tron",
        &broker,
        &[
            &["--bundles", &dir, "--state-store", &schema.url],
            &quorum[..],
        ]
        .concat(),
    );
    let _runner = spawn(
        "runner",
        &broker,
        &[&["--bundles", &dir, "--workers", "2"], &quorum[..]].concat(),
    );
    let (_ingress, base) = spawn_ingress(
        &broker,
        &[&["--calls-store", &schema.url], &quorum[..]].concat(),
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    eventually_within("the Func answers", Duration::from_secs(60), || async {
        http.post(format!("{base}/q/work"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let listing = ctl(&cluster.nodes[1], &["-q", "list_queues", "name", "type"]);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("funcatron.requests") && l.contains("quorum")),
        "work queues are quorum queues: {listing}"
    );

    // Four clients, each alternating a sync request and an async call.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (http, base, seen, stop) = (
            http.clone(),
            base.clone(),
            Arc::clone(&seen),
            Arc::clone(&stop),
        );
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = http.post(format!("{base}/q/work")).send().await.unwrap();
                let status = r.status().as_u16();
                let body: Option<serde_json::Value> = r.json().await.ok();
                let json_error = body.is_some_and(|b| b["error"].is_string());
                seen.lock()
                    .unwrap()
                    .sync
                    .push((status, json_error, Instant::now()));
                let r = http
                    .post(format!("{base}/q/work"))
                    .header("prefer", "respond-async")
                    .send()
                    .await
                    .unwrap();
                if r.status() == 202 {
                    let id = r.headers()["x-call-id"].to_str().unwrap().to_owned();
                    seen.lock().unwrap().accepted.push(id);
                }
            }
        }));
    }
    let count = || seen.lock().unwrap().sync.len();
    eventually_within(
        "200 requests before the kill",
        Duration::from_secs(60),
        || async { count() >= 200 },
    )
    .await;

    // kill -9 of the first node's Erlang VM.
    let killed_at = Instant::now();
    let killed = Command::new("kill")
        .args(["-9", &cluster.pids[0]])
        .status()
        .unwrap();
    assert!(killed.success());
    let at_kill = count();
    println!("node {} killed after {at_kill} requests", cluster.nodes[0]);
    // The cluster carries on: successes again after the kill.
    let ok_after = || {
        seen.lock()
            .unwrap()
            .sync
            .iter()
            .filter(|(s, _, at)| *s == 200 && *at > killed_at)
            .count()
    };
    let until = Instant::now() + Duration::from_secs(90);
    while ok_after() < 200 {
        if Instant::now() > until {
            let queues = ctl(
                &cluster.nodes[1],
                &[
                    "-q",
                    "list_queues",
                    "name",
                    "type",
                    "leader",
                    "online",
                    "messages",
                ],
            );
            let log = cluster
                ._dir
                .path()
                .join("n1/log")
                .join(format!("{}.log", cluster.nodes[1]));
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "never 200 answers after the kill; the queues:\n{queues}\nnode 1's log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut by_status = std::collections::BTreeMap::new();
    for (s, json, _) in &seen.sync {
        *by_status.entry(*s).or_insert(0usize) += 1;
        assert!(*s == 200 || *json, "a {s} without a JSON error body");
    }
    println!(
        "{} sync requests by status {by_status:?}; {} async calls accepted; back after {:?}",
        seen.sync.len(),
        seen.accepted.len(),
        killed_at.elapsed()
    );

    // Every accepted call succeeds: nothing was lost with the node.
    let calls = Calls::new(AnyStore::open(&schema.url).await.unwrap());
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let mut left = Vec::new();
        for id in &seen.accepted {
            match calls.get(id).await.unwrap() {
                Some(c) if c.state == CallState::Succeeded => {}
                other => left.push((id.clone(), other.map(|c| c.state))),
            }
        }
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < until,
            "{} accepted calls not succeeded, such as {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(cluster);
}

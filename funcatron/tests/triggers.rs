//! Document-store triggers end to end: `funcatron up --store` (embedded
//! broker, the embedded state store in a file) serving a Python Func with
//! a `store` trigger; documents written over HTTP at the ingress
//! (`/_funcatron/store/...`); the Func reports every event it gets to a
//! receiver in the test. Checked: the Func is invoked once per subscribed
//! change, with the event as its body and the trigger's headers, in
//! commit order for one document, unsubscribed kinds left out; and events
//! whose write was answered just before a SIGKILL of `up` are delivered
//! after it starts again (the outbox).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Reports the event it is called with to `HOOK`, with the trigger's
/// headers, then answers 200.
const AUDIT_PY: &str = r#"import os
import urllib.request


def on_order(req):
    data = req.body if isinstance(req.body, bytes) else req.body.encode()
    r = urllib.request.Request(os.environ["HOOK"], data=data, method="POST")
    r.add_header("x-trigger", req.headers.get("x-funcatron-trigger", ""))
    r.add_header("x-event-id", req.headers.get("x-funcatron-event-id", ""))
    urllib.request.urlopen(r, timeout=10).read()
    return "seen"
"#;

fn audit_bundle(root: &std::path::Path, hook: &str) -> std::path::PathBuf {
    let swagger = format!(
        "swagger: '2.0'\ninfo: {{title: audit, version: '1'}}\nbasePath: /audit\n\
         x-funcatron:\n  name: audit\n  runtime: python\n  handler: main.py\n  env: {{HOOK: '{hook}'}}\n  async: {{retries: 2, backoff_initial_ms: 50}}\n  collections:\n    orders: {{}}\n\
         paths:\n  /on-order:\n    post:\n      operationId: on_order\n      consumes: ['application/json']\n      responses: {{'200': {{description: ok}}}}\n      x-funcatron-triggers:\n        - name: order-changes\n          store: {{collection: orders, events: [created, updated]}}\n"
    );
    write_bundle(
        root,
        "audit",
        &[("swagger.yaml", swagger.as_str()), ("main.py", AUDIT_PY)],
    )
}

struct Up {
    _proc: Proc,
    base: String,
    mgmt: String,
}

async fn start_up(bundles: &std::path::Path, store: &std::path::Path, log: &std::path::Path) -> Up {
    let cmd = UpCmd::new(bundles, store);
    let proc = cmd.spawn("tok", log);
    let base = cmd.base.clone();
    eventually("the bundle's collection is defined", || async {
        let r = reqwest::Client::new()
            .get(format!("{base}/_funcatron/store/orders/_collection"))
            .bearer_auth("tok")
            .send()
            .await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    Up {
        _proc: proc,
        base,
        mgmt: cmd.mgmt,
    }
}

async fn store_call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}/_funcatron/store/{path}"))
        .bearer_auth("tok");
    if let Some(b) = body {
        req = req
            .header("content-type", "application/merge-patch+json")
            .body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The next report of the Func, as (trigger header, event id header, event).
async fn next_report(
    got: &mut tokio::sync::mpsc::UnboundedReceiver<Got>,
) -> (String, String, Value) {
    let g = tokio::time::timeout(Duration::from_secs(60), got.recv())
        .await
        .expect("a triggered call within a minute")
        .unwrap();
    let h = |n: &str| g.headers[n].to_str().unwrap().to_owned();
    (
        h("x-trigger"),
        h("x-event-id"),
        serde_json::from_slice(&g.body).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_changes_invoke_the_func_in_commit_order() {
    let root = tempfile::tempdir().unwrap();
    let hook = free_addr();
    let (mut got, _r) = receiver(hook).await;
    let bundles = root.path().join("bundles");
    audit_bundle(&bundles, &format!("http://{hook}/hook"));
    let up = start_up(
        &bundles,
        &root.path().join("store"),
        &root.path().join("up.log"),
    )
    .await;
    let b = &up.base;
    use reqwest::Method;
    let (s, _) = store_call(b, Method::PUT, "orders/o1", Some(json!({"n": 0}))).await;
    assert_eq!(s, 200);
    for n in 1..=3 {
        let (s, _) = store_call(b, Method::PATCH, "orders/o1", Some(json!({"n": n}))).await;
        assert_eq!(s, 200);
    }
    let (s, _) = store_call(b, Method::DELETE, "orders/o1", None).await;
    assert_eq!(s, 200);
    let (s, _) = store_call(b, Method::PUT, "orders/o2", Some(json!({"n": 9}))).await;
    assert_eq!(s, 200);

    let mut per_doc: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for _ in 0..5 {
        let (trigger, event_id, e) = next_report(&mut got).await;
        assert_eq!(trigger, "order-changes");
        assert_eq!(
            e["event_id"],
            event_id.as_str(),
            "the header names the body's event"
        );
        ids.insert(event_id);
        per_doc
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default()
            .push(e);
    }
    assert_eq!(ids.len(), 5, "five distinct events");
    let o1 = &per_doc["o1"];
    let versions: Vec<u64> = o1.iter().map(|e| e["version"].as_u64().unwrap()).collect();
    assert_eq!(
        versions,
        [1, 2, 3, 4],
        "o1's events in commit order, its delete left out"
    );
    assert_eq!(o1[0]["type"], "created");
    assert!(o1[0]["old"].is_null());
    for (i, e) in o1.iter().enumerate().skip(1) {
        assert_eq!(e["type"], "updated");
        assert_eq!(e["old"]["n"], i as u64 - 1, "old is the document before");
        assert_eq!(e["new"]["n"], i as u64, "new is the document after");
    }
    assert_eq!(per_doc["o2"][0]["new"], json!({"n": 9}));
    // Nothing more: the delete is not a subscribed change.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), got.recv())
            .await
            .is_err(),
        "no call for the unsubscribed delete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_writes_answered_before_a_kill_are_delivered_after_restart() {
    const DOCS: usize = 40;
    let root = tempfile::tempdir().unwrap();
    let hook = free_addr();
    let (mut got, _r) = receiver(hook).await;
    let bundles = root.path().join("bundles");
    audit_bundle(&bundles, &format!("http://{hook}/hook"));
    let store = root.path().join("store");
    let log = root.path().join("up.log");
    let up = start_up(&bundles, &store, &log).await;
    for i in 0..DOCS {
        let (s, _) = store_call(
            &up.base,
            reqwest::Method::PUT,
            &format!("orders/k{i:03}"),
            Some(json!({"i": i})),
        )
        .await;
        assert_eq!(s, 200, "write {i}");
    }
    drop(up); // SIGKILL right after the last write was answered.
    let _up = start_up(&bundles, &store, &log).await;
    let mut seen = BTreeSet::new();
    while seen.len() < DOCS {
        let (_, _, e) = next_report(&mut got).await;
        // At least once: a repeat (a call in flight at the kill) has the
        // same event and is counted once.
        seen.insert(e["id"].as_str().unwrap().to_owned());
    }
    let want: BTreeSet<String> = (0..DOCS).map(|i| format!("k{i:03}")).collect();
    assert_eq!(seen, want, "every answered write's event reached the Func");
}

/// A Lua Func `name` at `/<name>` with a store trigger on `collection`.
fn lua_triggered(root: &std::path::Path, name: &str, collection: &str) -> std::path::PathBuf {
    let swagger = format!(
        "swagger: '2.0'\ninfo: {{title: {name}, version: '1'}}\nbasePath: /{name}\n\
         x-funcatron: {{name: {name}, runtime: lua}}\npaths:\n  /on:\n    post:\n      operationId: on\n      responses: {{'200': {{description: ok}}}}\n      x-funcatron-triggers:\n        - name: {name}-changes\n          store: {{collection: {collection}}}\n"
    );
    write_bundle(
        root,
        name,
        &[
            ("swagger.yaml", swagger.as_str()),
            ("main.lua", "return { on = function(r) return 'seen' end }"),
        ],
    )
}

/// An upload whose trigger names a collection that is neither defined nor
/// declared is refused, naming the field; one on a defined collection is
/// served, and `funcatron func show` lists its trigger and what it fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_checked_and_func_show_lists_triggers() {
    let root = tempfile::tempdir().unwrap();
    let hook = free_addr();
    let (_got, _r) = receiver(hook).await;
    let bundles = root.path().join("bundles");
    audit_bundle(&bundles, &format!("http://{hook}/hook"));
    let up = start_up(
        &bundles,
        &root.path().join("store"),
        &root.path().join("up.log"),
    )
    .await;
    let uploads = root.path().join("uploads");
    let bad = lua_triggered(&uploads, "bad", "nowhere");
    let (ok, out) = cli_with(
        &["bundle", "push", bad.to_str().unwrap(), "--enable"],
        &up.mgmt,
        "tok",
    );
    assert!(!ok, "refused: {out}");
    assert!(
        out.contains("400") && out.contains("no collection \"nowhere\""),
        "{out}"
    );
    assert!(
        out.contains("/paths/~1on/post/x-funcatron-triggers/0/store/collection"),
        "the field is named: {out}"
    );
    let good = lua_triggered(&uploads, "good", "orders");
    let (ok, out) = cli_with(
        &["bundle", "push", good.to_str().unwrap(), "--enable"],
        &up.mgmt,
        "tok",
    );
    assert!(ok, "accepted: {out}");
    let (ok, out) = cli_with(&["func", "show", "good"], &up.mgmt, "tok");
    assert!(
        ok && out.contains("good-changes"),
        "the trigger is listed: {out}"
    );
    // A write fires it; `func show` counts it.
    eventually("the trigger fires and is counted", || async {
        let _ = store_call(
            &up.base,
            reqwest::Method::PUT,
            "orders/n1",
            Some(json!({"n": rand_n()})),
        )
        .await;
        let (ok, out) = cli_with(&["func", "show", "good"], &up.mgmt, "tok");
        ok && out.contains("\"fired\"") && out.contains("last_fired_ms")
    })
    .await;
}

/// A fresh value, so every write changes the document.
fn rand_n() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

//! Pipelines (`x-funcatron-flow`, `docs/flows.md`): an operation whose
//! steps (modify, apply, parallel, callback, on_failure, finally) run
//! across the Runners of the Funcs they apply, the flow's state signed in
//! the envelope. On the embedded broker (every role in this process) and
//! on RabbitMQ (separate processes, one shared key).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, EmbeddedBroker, Message, QueueKind};
use funcatron_control::{headers, names};
use funcatron_ingress::IngressOptions;
use serde_json::Value;

/// The shipped examples the flows apply, the `pipeline` example with its
/// callbacks sent to `hook`, and a `checks` bundle of failing and
/// parallel flows.
fn bundles(hook: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(
        dir.path(),
        &[
            "hello",
            "sed",
            "to-upper",
            "echo-lua",
            "echo-exec",
            "pipeline",
        ],
    );
    let doc = dir.path().join("pipeline/swagger.yaml");
    let text = std::fs::read_to_string(&doc)
        .unwrap()
        .replace("http://127.0.0.1:8080/echo-lua/", hook);
    std::fs::write(&doc, text).unwrap();
    write_failing_func(dir.path());
    let checks = format!(
        r#"swagger: '2.0'
info: {{title: checks, version: '1'}}
basePath: /checks
x-funcatron: {{name: checks, runtime: lua}}
paths:
  /strict:
    post:
      operationId: strict
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - apply: {{func: to-upper}}
          - apply: {{func: fail}}
          - apply: {{func: echo-lua}}
        on_failure:
          modify: 'return {{ failed = json.decode(data).step, func = json.decode(data).func, why = json.decode(data).answer.why }}'
        finally:
          callback: {{url: "{hook}"}}
      responses: {{'200': {{description: ok}}}}
  /fan:
    post:
      operationId: fan
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - parallel:
              - {{func: to-upper}}
              - {{func: echo-lua}}
              - {{func: sed, query: {{e: 's/a/o/g'}}}}
      responses: {{'200': {{description: ok}}}}
  /bare:
    post:
      operationId: bare
      consumes: ['*/*']
      x-funcatron-flow:
        steps:
          - modify: 'error("broken on purpose")'
      responses: {{'200': {{description: ok}}}}
"#
    );
    write_bundle(
        dir.path(),
        "checks",
        &[("swagger.yaml", &checks), ("main.lua", "return {}")],
    );
    dir
}

async fn post(url: &str, body: &str) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "text/plain")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    text_and_timing(r).await
}

/// The next POST the receiver got, as JSON, within 10 s.
async fn hooked(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Got>) -> (Value, Option<String>) {
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a callback")
        .unwrap();
    let header = got
        .headers
        .get("x-review")
        .map(|v| v.to_str().unwrap().to_owned());
    (serde_json::from_slice(&got.body).unwrap(), header)
}

/// Every step kind in the success case: the answer, both callbacks (the
/// step's with the data so far, `finally`'s told of success) and a
/// `Server-Timing` entry per step.
async fn review(base: &str, rx: &mut tokio::sync::mpsc::UnboundedReceiver<Got>) {
    let (status, timing, body) = post(&format!("{base}/pipeline/review"), "I hate this\n").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"review": "I LOVE THIS", "original": "I hate this\n", "agree": true})
    );
    for step in [
        "steps0", "steps1", "steps2", "steps3", "steps4", "steps5", "finally",
    ] {
        assert!(timing.contains(&format!("{step};dur=")), "{step}: {timing}");
    }
    let (data, header) = hooked(rx).await;
    assert_eq!(
        (data["review"].as_str(), header.as_deref()),
        (Some("I LOVE THIS"), Some("done"))
    );
    let (fin, _) = hooked(rx).await;
    assert_eq!(fin, serde_json::json!({"ok": true, "status": 200}));
}

/// A cluster in this process and the receiver its callbacks reach
/// (stopped with the token).
type Embedded = (
    InProcess,
    tempfile::TempDir,
    tokio::sync::mpsc::UnboundedReceiver<Got>,
    tokio_util::sync::CancellationToken,
);

async fn embedded() -> Embedded {
    let hook = free_addr();
    let (rx, stop) = receiver(hook).await;
    let dir = bundles(&format!("http://{hook}/hook"));
    let mut bundles = load(dir.path());
    bundles.sort_by(|a, b| a.name.cmp(&b.name));
    let c = spawn_cluster(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        bundles,
        IngressOptions::default(),
        Some(funcatron_runner::RunnerOptions {
            workers: 2,
            flow_outbound: funcatron_control::outbound::OutboundPolicy::new(&["127.0.0.1"])
                .unwrap(),
            ..Default::default()
        }),
    )
    .await;
    wait_ready(&format!("{}/hello/ready", c.base)).await;
    (c, dir, rx, stop)
}

#[tokio::test]
async fn a_pipeline_runs_every_kind_of_step_and_its_callbacks() {
    let (c, _dir, mut rx, _hook) = embedded().await;
    review(&c.base, &mut rx).await;
}

#[tokio::test]
async fn a_failing_step_runs_on_failure_then_finally_and_ends_the_flow() {
    let (c, _dir, mut rx, _hook) = embedded().await;
    let (status, _, body) = post(&format!("{}/checks/strict", c.base), "x").await;
    // The failing step's status, on_failure's answer as the body; the
    // step after the failing one never ran.
    assert_eq!(status, 422, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"failed": "steps[1]", "func": "fail", "why": "no X"})
    );
    let (fin, _) = hooked(&mut rx).await;
    assert_eq!(fin, serde_json::json!({"ok": false, "status": 422}));
    // Without on_failure or finally: the flow's own error, naming the step.
    let (status, _, body) = post(&format!("{}/checks/bare", c.base), "x").await;
    assert_eq!(status, 500, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["error"].as_str(), v["step"].as_str()),
        (Some("flow_step_failed"), Some("steps[0]"))
    );
    assert!(
        v["answer"]["message"]
            .as_str()
            .unwrap()
            .contains("broken on purpose"),
        "{v}"
    );
}

#[tokio::test]
async fn parallel_branches_are_joined_in_order() {
    let (c, _dir, _rx, _hook) = embedded().await;
    let (status, _, body) = post(&format!("{}/checks/fan", c.base), "banana").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, serde_json::json!(["BANANA", "banana", "bonono"]));
}

#[tokio::test]
async fn a_forged_or_altered_flow_state_is_refused() {
    let (c, dir, _rx, _hook) = embedded().await;
    let echo = load(dir.path())
        .into_iter()
        .find(|b| b.name == "echo-lua")
        .unwrap();
    let queue = names::func_queue(&echo.name, &echo.version);
    let replies = "funcatron.reply.forged-test";
    let mut sub = c
        .broker
        .consume(
            replies,
            QueueKind::Exclusive,
            ConsumeOptions {
                prefetch: 10,
                auto_ack: true,
            },
        )
        .await
        .unwrap();
    let state = |sig: &str| {
        serde_json::json!({
            "name": "pipeline/review", "at": 0, "sig": sig,
            "spec": {"steps": [{"apply": {"func": "echo-lua"}},
                               {"callback": {"url": "http://169.254.169.254/steal"}}]},
        })
    };
    for sig in ["", "00", &"ab".repeat(32)] {
        let payload = serde_json::json!({
            "version": "1.3", "id": "forged-1", "deadline_ms": (funcatron_envelope::now_ms() + 30_000.0) as u64,
            "method": "POST", "path": "/echo-lua/", "headers": [], "body": "x",
            "reply_to": replies, "reply_key": "k", "flow": state(sig),
        });
        c.broker
            .publish(
                &queue,
                Message {
                    payload: serde_json::to_vec(&payload).unwrap().into(),
                    headers: vec![
                        (headers::OPERATION.to_owned(), "echo".to_owned()),
                        (headers::ROUTE.to_owned(), "POST /".to_owned()),
                        (headers::FLOW.to_owned(), "1".to_owned()),
                    ],
                    ..Message::default()
                },
            )
            .await
            .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        let r: Value = serde_json::from_slice(&d.message.payload).unwrap();
        assert_eq!(r["status"], 403, "{r}");
        let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["error"], "flow_state_invalid", "{body}");
    }
}

#[tokio::test]
async fn a_pipeline_runs_across_processes_over_rabbitmq() {
    let hook = free_addr();
    let (mut rx, _stop) = receiver(hook).await;
    let broker = fresh_vhost();
    let dir = bundles(&format!("http://{hook}/hook"));
    let d = dir.path().to_str().unwrap();
    let _tron = spawn("tron", &broker, &["--bundles", d]);
    // Two Runners: steps move between processes, which share the key.
    let _r1 = spawn("runner", &broker, &["--bundles", d, "--workers", "2"]);
    let _r2 = spawn("runner", &broker, &["--bundles", d, "--workers", "2"]);
    let (_ingress, base) = spawn_ingress(&broker, &[]).await;
    wait_ready(&format!("{base}/hello/ready")).await;
    review(&base, &mut rx).await;
    let (status, _, body) = post(&format!("{base}/checks/fan"), "banana").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"["BANANA","banana","bonono"]"#)
    );
    // The failure case across processes: on_failure, then finally.
    let (status, _, body) = post(&format!("{base}/checks/strict"), "x").await;
    assert_eq!(status, 422, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["failed"], "steps[1]", "{v}");
    let (fin, _) = hooked(&mut rx).await;
    assert_eq!(fin, serde_json::json!({"ok": false, "status": 422}));
}

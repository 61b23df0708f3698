//! Chains of Funcs (`docs/flows.md`): `POST /_funcatron/chain` with an
//! expression runs each stage's Func in turn, each Runner forwarding the
//! answer to the next stage's queue, the last replying. On the embedded
//! broker (every role in this process, routed at the edge and by a Tron),
//! on RabbitMQ (separate processes), through nginx, and from the CLI.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_ingress::edge::Routing;
use funcatron_ingress::IngressOptions;
use serde_json::Value;

/// The chain examples and test Funcs: `opts` answers its query as JSON,
/// `fail` answers 422, `closed` did not opt in to chains.
fn bundles() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(
        dir.path(),
        &[
            "hello",
            "sed",
            "to-upper",
            "echo-lua",
            "echo-python",
            "echo-node",
            "echo-exec",
        ],
    );
    let doc = |name: &str, chain: bool| {
        format!(
            "swagger: '2.0'\ninfo: {{title: {name}, version: '1'}}\nbasePath: /{name}\nx-funcatron: {{name: {name}, runtime: lua, chain: {chain}}}\npaths:\n  /:\n    post: {{operationId: run, consumes: ['*/*'], responses: {{'200': {{description: ok}}}}}}\n"
        )
    };
    write_bundle(
        dir.path(),
        "opts",
        &[
            ("swagger.yaml", &doc("opts", true)),
            (
                "main.lua",
                "return { run = function(r) return { query = r.query, body = r.body, auth = r.headers['authorization'] } end }",
            ),
        ],
    );
    write_failing_func(dir.path());
    write_bundle(
        dir.path(),
        "closed",
        &[
            ("swagger.yaml", &doc("closed", false)),
            ("main.lua", "return { run = function(r) return r.body end }"),
        ],
    );
    dir
}

/// POST `body` to `base`'s chain endpoint with `expr` in the header:
/// (status, Server-Timing, body).
async fn chain(base: &str, expr: &str, body: &str) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/_funcatron/chain"))
        .header("x-funcatron-chain", expr)
        .header("content-type", "text/plain")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    text_and_timing(r).await
}

/// The btrfaas walkthrough: both lines print what btrfaas prints.
async fn walkthrough(base: &str) {
    let (status, timing, body) =
        chain(base, "sed e=s/hate/love/ | to-upper", "I hate this\n").await;
    assert_eq!((status, body.as_str()), (200, "I LOVE THIS\n"), "{timing}");
    assert!(
        timing.contains("stage0;desc=\"sed\"") && timing.contains("stage1;desc=\"to-upper\""),
        "{timing}"
    );
    let (status, _, body) = chain(
        base,
        "echo-lua | echo-python | echo-node | echo-exec",
        "foobar\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "foobar\n"));
}

async fn embedded(routing: Routing) -> (InProcess, tempfile::TempDir) {
    let dir = bundles();
    let c = start_in_process(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        load(dir.path()),
        IngressOptions {
            routing,
            ..IngressOptions::default()
        },
    )
    .await;
    if routing == Routing::Edge {
        wait_edge_table(&c.base).await;
    }
    (c, dir)
}

#[tokio::test]
async fn chains_run_every_stage_and_mix_runtimes_at_the_edge_and_through_a_tron() {
    for routing in [Routing::Edge, Routing::Tron] {
        let (c, _dir) = embedded(routing).await;
        walkthrough(&c.base).await;
    }
}

#[tokio::test]
async fn options_reach_their_stage_as_its_query_and_credentials_reach_every_stage() {
    let (c, _dir) = embedded(Routing::Edge).await;
    let r = reqwest::Client::new()
        .post(format!("{}/_funcatron/chain", c.base))
        .query(&[("chain", "to-upper | opts a=1 'b=x y|z' a=2")])
        .header("authorization", "Bearer abc")
        .body("in")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["query"]["a"], serde_json::json!(["1", "2"]), "{v}");
    assert_eq!(v["query"]["b"], "x y|z", "{v}");
    assert_eq!(v["body"], "IN", "{v}");
    assert_eq!(v["auth"], "Bearer abc", "{v}");
}

#[tokio::test]
async fn the_first_failing_stage_ends_the_chain_and_is_named() {
    let (c, _dir) = embedded(Routing::Edge).await;
    let (status, _, body) = chain(&c.base, "to-upper | fail | echo-lua", "x").await;
    assert_eq!(status, 422, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "chain_stage_failed", "{v}");
    assert_eq!(
        (v["stage"].as_u64(), v["func"].as_str()),
        (Some(1), Some("fail"))
    );
    // The failing stage's own answer, which got the first stage's output.
    assert_eq!(v["answer"]["body"]["why"], "no X", "{v}");
}

#[tokio::test]
async fn chains_that_cannot_run_are_refused_before_anything_runs() {
    for routing in [Routing::Edge, Routing::Tron] {
        let (c, _dir) = embedded(routing).await;
        for (expr, status, code) in [
            ("to-upper | closed", 403, "chain_not_allowed"),
            ("to-upper | nope", 404, "unknown_func"),
            ("to-upper | hello", 403, "chain_not_allowed"),
            ("to-upper 'x", 400, "chain_syntax"),
            ("to-upper | | sed", 400, "chain_syntax"),
            ("to-upper GET /", 400, "chain_operation"),
        ] {
            let (got, _, body) = chain(&c.base, expr, "x").await;
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                (got, v["error"].as_str()),
                (status, Some(code)),
                "{routing:?} {expr}: {v}"
            );
        }
        let r = reqwest::Client::new()
            .post(format!("{}/_funcatron/chain", c.base))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = reqwest::Client::new()
            .post(format!("{}/_funcatron/chain", c.base))
            .header("x-funcatron-chain", "to-upper")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
}

#[tokio::test]
async fn chains_run_over_rabbitmq_and_through_nginx() {
    let broker = fresh_vhost();
    let dir = bundles();
    let d = dir.path().to_str().unwrap();
    let _tron = spawn("tron", &broker, &["--bundles", d]);
    let _runner = spawn("runner", &broker, &["--bundles", d, "--workers", "2"]);
    let (_ingress, base) = spawn_ingress(&broker, &[]).await;
    wait_edge_table(&base).await;
    walkthrough(&base).await;
    let (status, _, body) = chain(&base, "echo-lua | fail", "y").await;
    assert_eq!(status, 422, "{body}");
    // nginx sends chains to a Tron, which resolves them.
    let nginx = start_nginx(&broker, &[]).await;
    walkthrough(&nginx.base).await;
}

/// `echo "I hate this" | funcatron invoke "sed e=s/hate/love/ | to-upper"`.
fn invoke(mgmt: &str, expr: &str, input: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args(["invoke", expr])
        .env("FUNCATRON_TRON_URL", format!("http://{mgmt}"))
        .env("FUNCATRON_TOKEN", "tok")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn funcatron_invoke_runs_a_chain_from_stdin() {
    let dir = bundles();
    let (listen, mgmt) = (free_addr(), free_addr());
    let store = tempfile::tempdir().unwrap();
    let log = store.path().join("up.log");
    let _up = funcatron_logged(
        &[
            "up",
            "--bundles",
            dir.path().to_str().unwrap(),
            "--store",
            store.path().join("s").to_str().unwrap(),
            "--listen",
            &listen.to_string(),
            "--mgmt-listen",
            &mgmt.to_string(),
        ],
        "tok",
        &log,
    );
    let base = format!("http://{listen}");
    eventually("every stage answers", || async {
        reqwest::Client::new()
            .post(format!("{base}/_funcatron/chain"))
            .header(
                "x-funcatron-chain",
                "echo-lua | echo-python | echo-node | echo-exec",
            )
            .body("ok")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let mgmt = mgmt.to_string();
    let (ok, out) = invoke(&mgmt, "sed e=s/hate/love/ | to-upper", "I hate this\n");
    assert!(ok, "{out}");
    assert_eq!(out, "I LOVE THIS\n");
    let (ok, out) = invoke(
        &mgmt,
        "echo-lua | echo-python | echo-node | echo-exec",
        "foobar\n",
    );
    assert_eq!((ok, out.as_str()), (true, "foobar\n"));
    let (ok, out) = invoke(&mgmt, "to-upper | fail", "x");
    assert!(!ok);
    assert!(out.contains("chain_stage_failed"), "{out}");
}

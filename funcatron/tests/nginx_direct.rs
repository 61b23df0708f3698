//! Direct mode at the production ingress: real nginx with the Lua module
//! (`ingress-lua/`) in front of a real RabbitMQ with real Tron and Runner
//! processes. Only a request's head is queued; nginx's proxy streams the
//! body to the Runner's one-time URL and the answer back, as the embedded
//! ingress does (`funcatron/tests/direct.rs`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use funcatron_ingress::edge::Routing;
use funcatron_ingress::nginx::{self, NginxDirectArgs};
use futures::StreamExt as _;
use serde_json::Value;
use sha2::Digest as _;

/// nginx started from a config rendered here, stopped with SIGTERM on
/// drop (so its workers exit with it).
struct NginxProc {
    base: String,
    prefix: tempfile::TempDir,
    child: Child,
}

impl Drop for NginxProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// A Tron, a Runner (unless the test plays it) and nginx on a fresh
/// vhost, serving hello, petshop and stream; nginx (two workers) routes at
/// the edge.
struct Stack {
    nginx: NginxProc,
    broker: String,
    bundles: Vec<funcatron_bundle::Bundle>,
    _procs: Vec<Proc>,
    _dir: tempfile::TempDir,
}

/// The health answer of nginx.
async fn health(base: &str) -> Value {
    let (_, body) = text(&format!("{base}/_funcatron/health")).await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn start_nginx_with(
    broker: &str,
    prefix: tempfile::TempDir,
    max_body_bytes: usize,
    direct: &NginxDirectArgs,
    routing: Routing,
) -> NginxProc {
    let addr = free_addr().to_string();
    let conf = prefix.path().join("nginx.conf");
    let text = nginx::render_with(
        &nginx::NginxConfig {
            broker: broker.to_owned(),
            listen: addr.clone(),
            prefix: prefix.path().to_owned(),
            lua_dir: repo().join("ingress-lua/lib"),
            workers: "2".into(),
            timeout_ms: 30_000,
            max_body_bytes,
            load_modules: true,
            log_level: "info".into(),
            routing,
        },
        None,
        direct,
    )
    .unwrap();
    std::fs::write(&conf, text).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx on PATH (./scripts/test.sh installs it)");
    NginxProc {
        base: format!("http://{addr}"),
        prefix,
        child,
    }
}

async fn stack(max_body_bytes: usize, direct: NginxDirectArgs) -> Stack {
    stack_with(max_body_bytes, direct, true, Routing::Edge).await
}

async fn stack_with(
    max_body_bytes: usize,
    direct: NginxDirectArgs,
    runner: bool,
    routing: Routing,
) -> Stack {
    let broker = fresh_vhost();
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello", "petshop", "stream"]);
    let bundles = load(root.path());
    let dir = root.path().to_str().unwrap().to_owned();
    let mut procs = vec![spawn("tron", &broker, &["--bundles", &dir])];
    if runner {
        procs.push(spawn(
            "runner",
            &broker,
            &["--bundles", &dir, "--workers", "2"],
        ));
    }
    let nginx = start_nginx_with(
        &broker,
        tempfile::tempdir().unwrap(),
        max_body_bytes,
        &direct,
        routing,
    );
    // Direct routes are known at the edge: every worker needs the table
    // (with a Tron routing, every worker its reply queue).
    let tables = if routing == Routing::Edge { 2 } else { 0 };
    let logs = nginx.prefix.path().join("logs/error.log");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(&nginx.base).await;
        if h["workers_ready"] == 2 && h["workers_with_table"] == tables {
            break;
        }
        assert!(
            Instant::now() < until,
            "nginx never routed by a table ({h}); see {}",
            logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if runner {
        // The Runner serves the stream Func (queued, not direct: no Accept).
        wait_ready(&format!("{}/stream/events?n=1", nginx.base)).await;
    }
    Stack {
        nginx,
        broker,
        bundles,
        _procs: procs,
        _dir: root,
    }
}

/// The error log, for assertion messages.
fn error_log(prefix: &Path) -> String {
    std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_48_mib_body_streams_both_ways_on_a_direct_route() {
    let s = stack(1024 * 1024, NginxDirectArgs::default()).await;
    let http = reqwest::Client::new();
    let total = 48 * 1024 * 1024;
    let body: Vec<u8> = pieces(total, total).next().unwrap();
    let sent = sha2::Sha256::digest(&body);
    // With a length (reqwest sends one for a whole body); echoed back as
    // the Func reads it.
    let r = http
        .post(format!("{}/stream/echo", s.nginx.base))
        .header("content-type", "application/x-test")
        .header("x-request-id", "direct-echo-1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", error_log(s.nginx.prefix.path()));
    assert_eq!(r.headers()["content-type"], "application/x-test");
    assert_eq!(r.headers()["x-request-id"], "direct-echo-1");
    let mut got = sha2::Sha256::new();
    let mut n = 0;
    let mut stream = r.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap_or_else(|e| {
            panic!(
                "the echo broke off after {n} bytes: {e}; {}",
                error_log(s.nginx.prefix.path())
            )
        });
        n += piece.len();
        got.update(&piece);
    }
    assert_eq!(n, total);
    assert_eq!(got.finalize(), sent, "the echo is the body, byte for byte");

    // Without a length (chunked): direct too, counted by a Func reading
    // it in pieces.
    let chunked =
        futures::stream::iter(pieces(5 * 1024 * 1024, 64 * 1024).map(Ok::<_, std::io::Error>));
    let r = http
        .post(format!("{}/stream/count", s.nginx.base))
        .body(reqwest::Body::wrap_stream(chunked))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 5 * 1024 * 1024);

    // A small body on a direct route goes direct too.
    let r = http
        .post(format!("{}/stream/count", s.nginx.base))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_threshold_goes_direct_where_the_queue_limit_refuses_it() {
    // Queued bodies at most 1 MiB, direct past 1 MiB (the default): a
    // 3 MiB body can only be answered in direct mode.
    let s = stack(1024 * 1024, NginxDirectArgs::default()).await;
    let http = reqwest::Client::new();
    let body: Vec<u8> = pieces(3 * 1024 * 1024, 3 * 1024 * 1024).next().unwrap();
    let r = http
        .post(format!("{}/petshop/echo", s.nginx.base))
        .header("content-type", "application/octet-stream")
        .header("x-request-id", "direct-size-1")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", error_log(s.nginx.prefix.path()));
    assert_eq!(r.headers()["x-request-id"], "direct-size-1");
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert!(r.headers().contains_key("server-timing"));
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());

    // Small bodies still travel in the envelope.
    let r = http
        .post(format!("{}/petshop/echo", s.nginx.base))
        .body("small")
        .send()
        .await
        .unwrap();
    assert!(r
        .headers()
        .get("server-timing")
        .is_some_and(|v| v.to_str().unwrap().starts_with("dispatch;dur=")));
    assert_eq!(r.text().await.unwrap(), "small");

    // Asynchronous calls never go direct: the queued limit holds, for a
    // declared length and for a body sent without one.
    let r = http
        .post(format!("{}/petshop/echo", s.nginx.base))
        .header("x-funcatron-async", "no-result")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "payload_too_large", "{v}");
    assert_eq!(v["request_id"], id.as_str());
    let chunked = futures::stream::iter(
        body.chunks(100 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = http
        .post(format!("{}/petshop/echo", s.nginx.base))
        .header("x-funcatron-async", "no-result")
        .body(reqwest::Body::wrap_stream(chunked))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "payload_too_large", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("1048576 bytes"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_to_a_client_that_asks_for_them() {
    let s = stack(1024 * 1024, NginxDirectArgs::default()).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/stream/events?n=3", s.nginx.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", error_log(s.nginx.prefix.path()));
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(r.headers().contains_key("x-request-id"));
    assert!(
        !r.headers().contains_key("content-length"),
        "streamed, not sent whole"
    );
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    for n in 1..=3 {
        assert_eq!(
            next_event(&mut stream, &mut buf).await.unwrap(),
            format!("id: {n}\ndata: {{\"n\":{n}}}")
        );
    }
    assert!(next_event(&mut stream, &mut buf).await.is_none());
    assert!(buf.is_empty(), "{buf:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_piece_of_a_streamed_body_is_answered_before_the_next_is_sent() {
    let s = stack(1024 * 1024, NginxDirectArgs::default()).await;
    let http = reqwest::Client::new();
    // The client's body is sent piece by piece, each only after the
    // Func's answer to the one before arrived: the Func is still running
    // (waiting for the next piece) while the client reads its events.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let r = http
        .post(format!("{}/stream/chat", s.nginx.base))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", error_log(s.nginx.prefix.path()));
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
    // Before any byte of the body was sent.
    assert_eq!(
        next_event(&mut stream, &mut buf).await.unwrap(),
        "data: ready"
    );
    for word in ["hello", "world"] {
        tx.send(Ok(word.as_bytes().to_vec())).await.unwrap();
        let want = format!("data: {}", word.to_uppercase());
        assert_eq!(next_event(&mut stream, &mut buf).await.unwrap(), want);
    }
    drop(tx);
    assert_eq!(
        next_event(&mut stream, &mut buf).await.unwrap(),
        "data: bye"
    );
    assert!(next_event(&mut stream, &mut buf).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_head_is_queued_and_a_runner_that_cannot_be_reached_is_a_502() {
    use funcatron_broker::{Broker, ConsumeOptions, Message, QueueKind};
    // The test plays the Runner: it takes the request off the Func's
    // queue and answers with tickets of its own.
    let s = stack_with(
        1024 * 1024,
        NginxDirectArgs::default(),
        false,
        Routing::Edge,
    )
    .await;
    let stream = s.bundles.iter().find(|b| b.name == "stream").unwrap();
    let broker = funcatron_broker::AmqpBroker::connect(&s.broker);
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    let mut requests = broker
        .consume(
            &funcatron_control::names::func_queue("stream", &stream.version),
            QueueKind::Work,
            ConsumeOptions {
                prefetch: 10,
                auto_ack: false,
            },
        )
        .await
        .unwrap();
    // Nothing listens here.
    let closed = free_addr();
    let tickets = [
        (
            format!("http://{closed}/_funcatron/direct/{}", "0".repeat(64)),
            502,
            "direct_failed",
        ),
        (
            "http://127.0.0.1:1/elsewhere".to_owned(),
            502,
            "malformed_reply",
        ),
    ];
    let http = reqwest::Client::new();
    for (n, (url, status, error)) in tickets.into_iter().enumerate() {
        let id = format!("played-runner-{n}");
        let call = tokio::spawn({
            let (http, url, id) = (
                http.clone(),
                format!("{}/stream/count", s.nginx.base),
                id.clone(),
            );
            async move {
                http.post(url)
                    .header("x-request-id", id)
                    .body("abc")
                    .send()
                    .await
                    .unwrap()
            }
        });
        let d = tokio::time::timeout(Duration::from_secs(20), requests.next())
            .await
            .expect("the request's head on the Func's queue")
            .unwrap();
        // Routed at the edge and marked for the Runner; the envelope
        // carries the head only.
        assert_eq!(
            d.message.header(funcatron_control::headers::DIRECT),
            Some("1")
        );
        assert_eq!(
            d.message.header(funcatron_control::headers::FUNC),
            Some("stream")
        );
        let head: Value = serde_json::from_slice(&d.message.payload).unwrap();
        assert_eq!(head["id"], id.as_str());
        assert_eq!(head["direct"], true, "{head}");
        assert_eq!(head["version"], "1.2", "{head}");
        assert_eq!(head["body"], "", "{head}");
        let reply = serde_json::json!({
            "version": "1.2", "id": id, "status": 200,
            "reply_key": head["reply_key"], "direct_url": url,
        });
        broker
            .publish(
                head["reply_to"].as_str().unwrap(),
                Message::new(serde_json::to_vec(&reply).unwrap()),
            )
            .await
            .unwrap();
        d.ack().await.unwrap();
        let r = call.await.unwrap();
        assert_eq!(r.status(), status, "{url}");
        assert_eq!(r.headers()["x-request-id"], id.as_str());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], error, "{v}");
        assert_eq!(v["request_id"], id.as_str(), "{v}");
    }

    // A Runner that cannot take it answers as any reply (here: too many
    // tickets open).
    let call = tokio::spawn({
        let (http, url) = (http.clone(), format!("{}/stream/count", s.nginx.base));
        async move { http.post(url).body("abc").send().await.unwrap() }
    });
    let d = tokio::time::timeout(Duration::from_secs(20), requests.next())
        .await
        .unwrap()
        .unwrap();
    let head: Value = serde_json::from_slice(&d.message.payload).unwrap();
    let busy =
        funcatron_envelope::error_body(head["id"].as_str().unwrap(), "direct_busy", "retry later");
    let reply = serde_json::json!({
        "version": "1.2", "id": head["id"], "status": 503, "reply_key": head["reply_key"],
        "headers": [["content-type", "application/json"]], "body": busy,
    });
    broker
        .publish(
            head["reply_to"].as_str().unwrap(),
            Message::new(serde_json::to_vec(&reply).unwrap()),
        )
        .await
        .unwrap();
    d.ack().await.unwrap();
    let r = call.await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "direct_busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tron_routes_a_request_nginx_sent_direct() {
    // No table at the edge: direct routes are not known here, but a body
    // past the threshold or a request for events still goes direct, and
    // the Tron marks it for the Runner.
    let s = stack_with(1024 * 1024, NginxDirectArgs::default(), true, Routing::Tron).await;
    let http = reqwest::Client::new();
    let body: Vec<u8> = pieces(3 * 1024 * 1024, 3 * 1024 * 1024).next().unwrap();
    let r = http
        .post(format!("{}/petshop/echo", s.nginx.base))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", error_log(s.nginx.prefix.path()));
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());
    let r = http
        .get(format!("{}/stream/events?n=2", s.nginx.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("content-length"), "streamed");
    assert_eq!(
        r.text().await.unwrap(),
        "id: 1\ndata: {\"n\":1}\n\nid: 2\ndata: {\"n\":2}\n\n"
    );
}

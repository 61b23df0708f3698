//! Request and response checks through a whole Runner on the embedded
//! broker: rules found by the route the Tron sends (`x-funcatron-route`),
//! the fallback for messages without one, 415s, and answers reported when
//! they do not match the document.

#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::time::Duration;

use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, Message, QueueKind};
use funcatron_bundle::Bundle;
use funcatron_control::headers;
use funcatron_envelope::{encode_body, now_ms, Request, Response, VERSION};
use tokio_util::sync::CancellationToken;

/// Two operations share `same` (one handler) with different rules; `other`
/// takes JSON only.
const DOC: &str = r#"openapi: 3.0.3
info: {title: t, version: '1'}
x-funcatron: {runtime: lua}
paths:
  /a:
    get:
      operationId: same
      parameters: [{name: n, in: query, required: true, schema: {type: integer}}]
      responses: {'200': {description: ok}}
  /b/{id}:
    get:
      operationId: same
      parameters: [{name: id, in: path, required: true, schema: {type: string, format: uuid}}]
      responses:
        '200':
          description: ok
          content: {application/json: {schema: {type: object, required: [x]}}}
  /c:
    post:
      operationId: other
      requestBody: {content: {application/json: {schema: {type: object}}}}
      responses: {'204': {description: done}}
"#;

const LUA: &str =
    "return { same = function(r) return { ok = true } end, other = function() return nil end }";

const ID: &str = "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10";

fn bundle(dir: &std::path::Path) -> Bundle {
    std::fs::write(dir.join("openapi.yaml"), DOC).unwrap();
    std::fs::write(dir.join("main.lua"), LUA).unwrap();
    Bundle::load(dir).unwrap()
}

/// One request as the Tron forwards it.
#[derive(Clone, Copy)]
struct Sent<'a> {
    operation: &'a str,
    route: Option<&'a str>,
    params: &'a str,
    query: &'a str,
    content_type: &'a str,
    body: &'a [u8],
}

impl Sent<'_> {
    fn message(&self, id: &str) -> Message {
        let (body, body_base64) = encode_body(self.body);
        let req = Request {
            version: Cow::Borrowed(VERSION),
            id: Cow::Owned(id.to_owned()),
            deadline_ms: (now_ms() + 10_000.0) as u64,
            sent_ms: now_ms(),
            method: Cow::Borrowed("GET"),
            scheme: Cow::Borrowed("http"),
            host: Cow::Borrowed("localhost"),
            path: Cow::Borrowed("/"),
            query: Cow::Owned(self.query.to_owned()),
            headers: vec![(
                Cow::Borrowed("content-type"),
                Cow::Owned(self.content_type.to_owned()),
            )],
            remote: None,
            body,
            body_base64,
            reply_to: Some(Cow::Borrowed("replies")),
            reply_key: None,
            ..Request::default()
        };
        let mut m = Message::new(req.encode());
        m.headers
            .push((headers::OPERATION.into(), self.operation.into()));
        if let Some(r) = self.route {
            m.headers.push((headers::ROUTE.into(), r.into()));
        }
        m.headers
            .push((headers::PATH_PARAMS.into(), self.params.into()));
        m
    }
}

fn get<'a>(route: Option<&'a str>, params: &'a str, query: &'a str) -> Sent<'a> {
    Sent {
        operation: "same",
        route,
        params,
        query,
        content_type: "",
        body: b"",
    }
}

/// A Runner serving `b` on a fresh embedded broker; each `send` answers
/// (status, JSON or text body).
struct Harness {
    broker: AnyBroker,
    queue: String,
    replies: funcatron_broker::Subscription,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<()>,
    n: usize,
}

impl Harness {
    async fn start(b: Bundle, broker: AnyBroker) -> Harness {
        let queue = funcatron_control::names::func_queue(&b.name, &b.version);
        broker.declare(&queue, QueueKind::Work).await.unwrap();
        broker.declare("replies", QueueKind::Work).await.unwrap();
        let replies = broker
            .consume(
                "replies",
                QueueKind::Work,
                ConsumeOptions {
                    prefetch: 1,
                    auto_ack: true,
                },
            )
            .await
            .unwrap();
        let options = funcatron_runner::RunnerOptions {
            workers: 1,
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let node = funcatron_runner::RunnerNode::new(broker.clone())
            .options(options)
            .bundles(vec![b]);
        let running = tokio::spawn(node.run(shutdown.clone()));
        Harness {
            broker,
            queue,
            replies,
            shutdown,
            running,
            n: 0,
        }
    }

    async fn send(&mut self, s: &Sent<'_>) -> (u16, serde_json::Value) {
        self.n += 1;
        let id = format!("r-{}", self.n);
        self.broker
            .publish(&self.queue, s.message(&id))
            .await
            .unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(20), self.replies.next())
            .await
            .unwrap()
            .unwrap();
        let r = Response::decode(&reply.message.payload).unwrap();
        assert_eq!(r.id, id);
        let body = r.body_bytes().unwrap();
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
        (r.status, v)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap();
    }
}

fn problems(v: &serde_json::Value) -> String {
    assert_eq!(v["error"], "validation_failed", "{v}");
    v["problems"].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_sharing_an_operation_id_are_each_checked_by_their_own_rules() {
    let dir = tempfile::tempdir().unwrap();
    let broker = AnyBroker::from_url("embedded", 1024).unwrap();
    let mut h = Harness::start(bundle(dir.path()), broker).await;
    let a = Some("GET /a");
    let b = Some("GET /b/{id}");
    let id_param = format!(r#"{{"id": "{ID}"}}"#);

    assert_eq!(h.send(&get(a, "{}", "n=1")).await.0, 200);
    let (status, v) = h.send(&get(a, "{}", "n=one")).await;
    assert_eq!(status, 400);
    assert!(problems(&v).contains("query parameter `n`"), "{v}");
    // GET /b/{id} has no `n`, but its own uuid.
    assert_eq!(h.send(&get(b, &id_param, "")).await.0, 200);
    let (status, v) = h.send(&get(b, r#"{"id": "12"}"#, "n=1")).await;
    assert_eq!(status, 400);
    let p = problems(&v);
    assert!(
        p.contains("path parameter `id`") && p.contains("uuid"),
        "{v}"
    );
    assert!(!p.contains("`n`"), "{v}");

    // A message without a route (an older Tron): a shared operationId is
    // not validated, a unique one is.
    assert_eq!(h.send(&get(None, r#"{"id": "12"}"#, "")).await.0, 200);
    let text = Sent {
        operation: "other",
        route: None,
        params: "{}",
        query: "",
        content_type: "text/plain",
        body: b"hi",
    };
    let (status, v) = h.send(&text).await;
    assert_eq!(status, 415, "{v}");

    // An undeclared content type: 415 with a JSON reason, the Func not run.
    let (status, v) = h
        .send(&Sent {
            route: Some("POST /c"),
            ..text
        })
        .await;
    assert_eq!(status, 415);
    assert_eq!(v["error"], "unsupported_media_type", "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(
        m.contains("text/plain") && m.contains("application/json"),
        "{v}"
    );
    assert_eq!(v["request_id"], format!("r-{}", h.n));
    let json = Sent {
        content_type: "application/json",
        body: b"{}",
        ..text
    };
    assert_eq!(
        h.send(&Sent {
            route: Some("POST /c"),
            ..json
        })
        .await
        .0,
        204
    );
    h.stop().await;
}

/// With `check_responses`, an answer that does not match its document is
/// reported on the Func's log (stream `response`) and still sent as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_do_not_match_the_document_are_reported_not_changed() {
    use funcatron_control::state::FuncSettings;
    let dir = tempfile::tempdir().unwrap();
    let broker = AnyBroker::from_url("embedded", 1024).unwrap();
    let mut logs = broker
        .subscribe(funcatron_control::names::LOGS_TOPIC)
        .await
        .unwrap();
    let checked = bundle(dir.path()).with_settings(&FuncSettings {
        check_responses: Some(true),
        ..FuncSettings::default()
    });
    let mut h = Harness::start(checked, broker).await;
    let id_param = format!(r#"{{"id": "{ID}"}}"#);
    // The Func answers {"ok": true}; the document wants `x`.
    let (status, v) = h.send(&get(Some("GET /b/{id}"), &id_param, "")).await;
    assert_eq!((status, &v), (200, &serde_json::json!({"ok": true})));
    let line = loop {
        let d = tokio::time::timeout(Duration::from_secs(20), logs.next())
            .await
            .unwrap()
            .unwrap();
        let line: serde_json::Value = serde_json::from_slice(&d.message.payload).unwrap();
        if line["stream"] == funcatron_runner::serve::RESPONSE_STREAM {
            break line;
        }
    };
    assert_eq!(line["request_id"], "r-1");
    let m = line["message"].as_str().unwrap();
    assert!(
        m.contains("same answered 200") && m.contains("\"x\" is a required property"),
        "{line}"
    );
    h.stop().await;
}

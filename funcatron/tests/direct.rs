//! Direct mode and streamed answers on the embedded broker, every role in
//! this process: bodies too big for a queue go to the Runner over HTTP,
//! answers written in pieces reach the client piece by piece.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, EmbeddedBroker, Message, QueueKind};
use funcatron_control::{headers, names};
use funcatron_ingress::IngressOptions;
use futures::StreamExt as _;
use serde_json::Value;
use sha2::Digest as _;

/// Queued bodies at most 1 MiB, direct past 64 KiB: a body between the
/// two can only be answered in direct mode.
fn options() -> IngressOptions {
    IngressOptions {
        max_body_bytes: 1024 * 1024,
        direct_threshold_bytes: 64 * 1024,
        ..IngressOptions::default()
    }
}

struct Cluster {
    c: InProcess,
    _dir: tempfile::TempDir,
    bundles: Vec<funcatron_bundle::Bundle>,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path(), &["hello", "petshop", "stream"]);
    let bundles = load(dir.path());
    let c = start_in_process(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        bundles.clone(),
        options(),
    )
    .await;
    // Direct routes are known at the edge: wait for the table.
    wait_edge_table(&c.base).await;
    Cluster {
        c,
        _dir: dir,
        bundles,
    }
}

#[tokio::test]
async fn a_body_larger_than_any_queue_takes_streams_both_ways_on_a_direct_route() {
    let k = cluster().await;
    let http = reqwest::Client::new();
    let total = 48 * 1024 * 1024;
    let mut sent = sha2::Sha256::new();
    for p in pieces(total, 256 * 1024) {
        sent.update(&p);
    }
    let sent = sent.finalize();
    // Sent without a length, echoed back as it arrives.
    let body = futures::stream::iter(pieces(total, 256 * 1024).map(Ok::<_, std::io::Error>));
    let r = http
        .post(format!("{}/stream/echo", k.c.base))
        .header("content-type", "application/x-test")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-test");
    assert!(r.headers().contains_key("x-request-id"));
    let mut got = sha2::Sha256::new();
    let mut n = 0;
    let mut stream = r.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        n += piece.len();
        got.update(&piece);
    }
    assert_eq!(n, total);
    assert_eq!(got.finalize(), sent, "the echo is the body, byte for byte");

    // With a length: counted by a Func reading it in pieces.
    let five: Vec<u8> = pieces(5 * 1024 * 1024, 5 * 1024 * 1024).next().unwrap();
    let r = http
        .post(format!("{}/stream/count", k.c.base))
        .body(five)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 5 * 1024 * 1024);

    // A small body on a direct route goes direct too.
    let r = http
        .post(format!("{}/stream/count", k.c.base))
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 3);
}

#[tokio::test]
async fn a_body_past_the_threshold_goes_direct_to_a_func_that_reads_it_whole() {
    let k = cluster().await;
    let http = reqwest::Client::new();
    // 3 MiB: more than a queued body may be (1 MiB), so only direct mode
    // can answer it; petshop's echo reads `req.body` whole.
    let body: Vec<u8> = pieces(3 * 1024 * 1024, 3 * 1024 * 1024).next().unwrap();
    let r = http
        .post(format!("{}/petshop/echo", k.c.base))
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("server-timing"));
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());

    // Without a length: found larger than the threshold while reading.
    let stream = futures::stream::iter(
        body.chunks(100 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = http
        .post(format!("{}/petshop/echo", k.c.base))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());

    // Small bodies still travel in the envelope, and the queued limit
    // still holds for asynchronous calls (which never go direct).
    let r = http
        .post(format!("{}/petshop/echo", k.c.base))
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "small");
    let r = http
        .post(format!("{}/petshop/echo", k.c.base))
        .header("x-funcatron-async", "no-result")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn each_written_piece_reaches_the_client_before_the_func_ends() {
    let k = cluster().await;
    let http = reqwest::Client::new();
    // The client's body is sent piece by piece, each only after the
    // Func's answer to the one before arrived: the Func is still running
    // (waiting for the next piece) while the client reads its events.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let r = http
        .post(format!("{}/stream/chat", k.c.base))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let mut buf = String::new();
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

#[tokio::test]
async fn events_stream_to_a_client_that_asks_and_are_collected_otherwise() {
    let k = cluster().await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/stream/events?n=3", k.c.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(
        !r.headers().contains_key("content-length"),
        "streamed, not sent whole"
    );
    let streamed = r.text().await.unwrap();
    let r = http
        .get(format!("{}/stream/events?n=3", k.c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert!(
        r.headers().contains_key("server-timing"),
        "answered from the queue"
    );
    let collected = r.text().await.unwrap();
    assert_eq!(streamed, collected);
    assert_eq!(
        streamed,
        "id: 1\ndata: {\"n\":1}\n\nid: 2\ndata: {\"n\":2}\n\nid: 3\ndata: {\"n\":3}\n\n"
    );
}

#[tokio::test]
async fn a_direct_ticket_is_claimed_once_and_unknown_tickets_are_refused() {
    let k = cluster().await;
    let stream = k.bundles.iter().find(|b| b.name == "stream").unwrap();
    let reply_queue = "direct-test-replies";
    let mut replies =
        k.c.broker
            .consume(
                reply_queue,
                QueueKind::Exclusive,
                ConsumeOptions {
                    prefetch: 10,
                    auto_ack: true,
                },
            )
            .await
            .unwrap();
    let head = serde_json::json!({
        "version": "1.2", "id": "ticket-1", "deadline_ms": (funcatron_envelope::now_ms() + 30_000.0) as u64,
        "method": "POST", "path": "/stream/count", "headers": [],
        "reply_to": reply_queue, "reply_key": "k1", "direct": true,
    });
    let message = Message {
        payload: serde_json::to_vec(&head).unwrap().into(),
        headers: vec![
            (headers::FUNC.into(), "stream".into()),
            (headers::OPERATION.into(), "count".into()),
            (headers::ROUTE.into(), "POST /count".into()),
            (headers::DIRECT.into(), "1".into()),
        ],
        ttl_ms: None,
        persistent: false,
    };
    k.c.broker
        .publish(&names::func_queue("stream", &stream.version), message)
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
        .await
        .unwrap()
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.message.payload).unwrap();
    assert_eq!(reply["id"], "ticket-1");
    assert_eq!(reply["reply_key"], "k1");
    let url = reply["direct_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let token = url.rsplit('/').next().unwrap();
    assert_eq!(token.len(), 64, "256 random bits");

    let http = reqwest::Client::new();
    let r = http.post(&url).body("12345").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["bytes"], 5);
    // Once only.
    let r = http.post(&url).body("12345").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "direct_ticket_unknown"
    );
    // Nor a made-up one.
    let forged = format!("{}{}", &url[..url.len() - 64], "0".repeat(64));
    let r = http.post(&forged).body("x").send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn with_tron_routing_a_tron_marks_a_direct_request_for_the_runner() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path(), &["hello", "petshop", "stream"]);
    let c = start_in_process(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        load(dir.path()),
        IngressOptions {
            routing: funcatron_ingress::edge::Routing::Tron,
            ..options()
        },
    )
    .await;
    let http = reqwest::Client::new();
    // Past the queued limit: only direct mode, through the Tron, answers.
    let body: Vec<u8> = pieces(3 * 1024 * 1024, 3 * 1024 * 1024).next().unwrap();
    let r = http
        .post(format!("{}/petshop/echo", c.base))
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());
    // An event stream through the Tron.
    let r = http
        .get(format!("{}/stream/events?n=2", c.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("content-length"));
    assert_eq!(
        r.text().await.unwrap(),
        "id: 1\ndata: {\"n\":1}\n\nid: 2\ndata: {\"n\":2}\n\n"
    );
}

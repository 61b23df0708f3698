//! End to end over a real RabbitMQ with separate `funcatron tron`, `runner`
//! and `ingress` processes, several of each. Each test gets its own vhost.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use funcatron_broker::{AmqpBroker, Broker, Message};
use funcatron_control::names;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_give_the_same_answers() {
    let p = start_processes(2, 2, 2, &["--timeout-ms", "5000"]).await;
    let http = reqwest::Client::new();
    for base in &p.bases {
        let r = http
            .get(format!("{base}/hello/world"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["server-timing"]
            .to_str()
            .unwrap()
            .contains("exec;dur="));
        assert_eq!(r.text().await.unwrap(), "Hello, world!");

        let r = http
            .post(format!("{base}/petshop/pets"))
            .json(&serde_json::json!({"name": "Kit"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.json::<Value>().await.unwrap()["name"], "Kit");

        let binary: Vec<u8> = (0..=255u8).rev().cycle().take(1024 * 1024).collect();
        let r = http
            .post(format!("{base}/petshop/echo"))
            .body(binary.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().as_ref(), binary.as_slice());

        let r = http.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "no_route");
        let r = http.put(format!("{base}/hello/x")).send().await.unwrap();
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET");

        let r = http
            .get(format!("{base}/trouble/loop"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "func_timeout");
    }
    // Many requests in flight across both ingresses, each answered correctly.
    each_request_gets_its_own_answer(&p.bases, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_request_queue_is_dead_lettered_and_good_requests_succeed() {
    let mut p = start_processes(1, 1, 1, &[]).await;
    let broker = AmqpBroker::connect(&p.broker);
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    for junk in [&b"garbage \xff\xfe"[..], br#"{"version":"9.1","id":"v9"}"#] {
        broker
            .publish(names::REQUESTS, Message::new(junk.to_vec()))
            .await
            .unwrap();
    }
    let r = reqwest::get(format!("{}/hello/good", p.bases[0]))
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, good!");

    let reasons = dead_letter_reasons(&broker, 2).await;
    assert!(reasons[0].starts_with("malformed envelope"), "{reasons:?}");
    assert!(
        reasons[1].contains("unsupported envelope version \"9.1\""),
        "{reasons:?}"
    );
    for proc in &mut p.procs {
        assert!(proc.alive(), "{} exited", proc.name);
    }
}

//! The production ingress: real nginx with the Lua module (`ingress-lua/`)
//! in front of a real RabbitMQ with real Tron and Runner processes. Answers
//! must match the embedded ingress's.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::Broker;
use serde_json::Value;

/// A request body and its content type.
type Body<'a> = Option<(&'a str, Vec<u8>)>;

async fn fetch(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Body<'_>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut req = http.request(method.parse().unwrap(), url);
    if let Some((ct, b)) = body {
        req = req.header("content-type", ct).body(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let mut headers: Vec<(String, String)> = r
        .headers()
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "content-type"
                    | "location"
                    | "x-total-count"
                    | "allow"
                    | "set-cookie"
                    | "x-kept"
                    | "upgrade"
                    | "te"
                    | "trailer"
            )
        })
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_answers_like_the_embedded_ingress() {
    let p = start_processes(1, 2, 1, &[]).await;
    let nginx = start_nginx(&p.broker, &[]).await;
    let http = reqwest::Client::new();
    let json = |v: Value| Some(("application/json", serde_json::to_vec(&v).unwrap()));
    let cases: Vec<(&str, &str, Body)> = vec![
        ("GET", "/hello/world", None),
        ("GET", "/hello/", None),
        ("GET", "/petshop/pets?tag=dog&limit=1", None),
        ("GET", "/petshop/pets/3", None),
        ("GET", "/petshop/pets/42", None),
        (
            "POST",
            "/petshop/pets",
            json(serde_json::json!({"name": "Ana", "tag": "cat"})),
        ),
        (
            "POST",
            "/petshop/pets",
            json(serde_json::json!({"tag": "nameless"})),
        ),
        (
            "POST",
            "/petshop/pets",
            Some(("application/json", b"{broken".to_vec())),
        ),
        (
            "POST",
            "/petshop/echo",
            Some((
                "text/plain; charset=utf-8",
                "Grüße, 世界\n".as_bytes().to_vec(),
            )),
        ),
        (
            "POST",
            "/petshop/echo",
            Some(("application/octet-stream", (0..=255u8).collect())),
        ),
        ("DELETE", "/petshop/pets/1", None),
        ("PATCH", "/hello/x", None),
        ("GET", "/no/such/func", None),
        ("GET", "/function/hello/world", None),
        ("GET", "/function/nope/world", None),
        ("GET", "/trouble/raise", None),
        ("GET", "/trouble/hop", None),
        ("GET", "/trouble/switch", None),
    ];
    for (method, path, body) in cases {
        let a = fetch(
            &http,
            method,
            &format!("{}{path}", p.bases[0]),
            body.clone(),
        )
        .await;
        let b = fetch(&http, method, &format!("{}{path}", nginx.base), body).await;
        assert_eq!(a.0, b.0, "{method} {path}: status");
        assert_eq!(a.1, b.1, "{method} {path}: headers");
        let is_json =
            a.1.iter()
                .any(|(k, v)| k == "content-type" && v.contains("json"));
        if a.0 < 400 && !is_json {
            assert_eq!(a.2, b.2, "{method} {path}: body");
        } else if a.0 < 400 {
            // Lua tables have no key order: compare JSON as values.
            let (ja, jb): (Value, Value) = (
                serde_json::from_slice(&a.2).unwrap(),
                serde_json::from_slice(&b.2).unwrap(),
            );
            assert_eq!(ja, jb, "{method} {path}: JSON body");
        } else {
            // Error bodies carry each request's own id; compare the rest.
            let (mut ja, mut jb): (Value, Value) = (
                serde_json::from_slice(&a.2).unwrap(),
                serde_json::from_slice(&b.2).unwrap(),
            );
            ja.as_object_mut().unwrap().remove("request_id");
            jb.as_object_mut().unwrap().remove("request_id");
            if ja.get("error") == Some(&Value::String("no_route".into())) {
                // The message names the Host, which differs by port.
                ja.as_object_mut().unwrap().remove("message");
                jb.as_object_mut().unwrap().remove("message");
            }
            assert_eq!(ja, jb, "{method} {path}: error body");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_round_trip_byte_exact_and_oversized_ones_get_413() {
    let p = start_processes(1, 1, 0, &[]).await;
    // Queued bodies only (direct mode has its own tests, nginx_direct.rs).
    let nginx = start_nginx(
        &p.broker,
        &[
            "--max-body-bytes",
            "12000000",
            "--direct-threshold-bytes",
            "0",
        ],
    )
    .await;
    let http = reqwest::Client::new();
    // 9 MiB of binary: far past client_body_buffer_size, so nginx spills it
    // to a temp file that the ingress must read.
    let big: Vec<u8> = (0..9 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let r = http
        .post(format!("{}/petshop/echo", nginx.base))
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), big.as_slice());

    let text = "naïve café ".repeat(50_000);
    let r = http
        .post(format!("{}/petshop/echo", nginx.base))
        .header("content-type", "text/plain")
        .body(text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), text);

    let r = http
        .post(format!("{}/petshop/echo", nginx.base))
        .body(vec![0u8; 12_500_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "payload_too_large");
    assert_eq!(body["request_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_server_timing_and_the_access_log() {
    let p = start_processes(1, 1, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &[]).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/petshop/inspect?x=1&x=2", nginx.base))
        .header("x-request-id", "trace-me-123")
        .header("x-rep", "a")
        .header("x-rep", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-123");
    let timing = r.headers()["server-timing"].to_str().unwrap().to_owned();
    assert!(
        timing.starts_with("dispatch;dur=")
            && timing.contains(", queue;dur=")
            && timing.contains(", exec;dur=")
            && timing.contains(", total;dur="),
        "{timing}"
    );
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["id"], "trace-me-123");
    assert_eq!(seen["headers"]["x-rep"], "a, b");
    assert_eq!(seen["query"]["x"], serde_json::json!(["1", "2"]));

    let r = http
        .get(format!("{}/hello/x", nginx.base))
        .header("x-request-id", "no spaces allowed")
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);

    // nginx writes the access log after the response: wait for the lines.
    let until = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(nginx.prefix.path().join("logs/access.log")).unwrap();
        if log.contains(&format!("request_id={generated}")) || Instant::now() > until {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(log.contains("request_id=trace-me-123"), "{log}");
    assert!(log.contains(&format!("request_id={generated}")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_each_get_their_own_answer() {
    let p = start_processes(2, 2, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &[]).await;
    each_request_gets_its_own_answer(std::slice::from_ref(&nginx.base), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_runner_means_504_at_the_deadline() {
    let mut p = start_processes(1, 1, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &["--timeout-ms", "1500"]).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{}/hello/up", nginx.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let runner = p.procs.iter_mut().find(|x| x.name == "runner").unwrap();
    runner.child.kill().unwrap();
    runner.child.wait().unwrap();
    let started = Instant::now();
    let r = http
        .get(format!("{}/hello/down", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The Tron still answers what it can answer alone.
    assert_eq!(
        http.get(format!("{}/nowhere", nginx.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_request_queue_is_a_fast_503_from_both_ingresses() {
    let p = start_processes(0, 0, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &[]).await;
    let (_ingress, embedded) = spawn_ingress(&p.broker, &[]).await;
    let http = reqwest::Client::new();
    // Someone deletes the request queue by hand: publishes are returned
    // (they are `mandatory`) and the client hears so at once.
    let vhost = p.broker.rsplit('/').next().unwrap();
    let out = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", "-p", vhost, "funcatron.requests"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for base in [&nginx.base, &embedded] {
        let started = Instant::now();
        let r = http.get(format!("{base}/hello/x")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{base}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "broker_unavailable", "{base}: {body}");
        assert!(started.elapsed() < Duration::from_secs(5), "{base}");
    }
}

/// The reply queues of a vhost, from the broker.
fn reply_queues(vhost: &str) -> Vec<String> {
    queues(vhost)
        .into_iter()
        .filter(|q| q.starts_with("funcatron.reply."))
        .collect()
}

/// Every queue of `vhost`.
fn queues(vhost: &str) -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "--quiet",
            "name",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_replies_are_502_and_late_replies_reach_no_one() {
    // A Tron but no Runner: requests wait, and the test answers them itself.
    let p = start_processes(1, 0, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &["--timeout-ms", "3000"]).await;
    let (_ingress, embedded) = spawn_ingress(&p.broker, &["--timeout-ms", "3000"]).await;
    let http = reqwest::Client::new();
    let vhost = p.broker.rsplit('/').next().unwrap().to_owned();
    let broker = funcatron_broker::AmqpBroker::connect(&p.broker);
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    let queues = reply_queues(&vhost);
    assert_eq!(
        queues.len(),
        3,
        "two nginx workers and one embedded ingress: {queues:?}"
    );

    for (n, base) in [&nginx.base, &embedded].into_iter().enumerate() {
        let id = format!("malformed-{n}");
        let waiting = tokio::spawn({
            let (http, url, id) = (http.clone(), format!("{base}/hello/x"), id.clone());
            async move {
                http.get(url)
                    .header("x-request-id", id)
                    .send()
                    .await
                    .unwrap()
            }
        });
        // A reply with the waiting request's id but no usable status, sent to
        // every reply queue: only the ingress that waits for it takes it.
        let bad = format!(r#"{{"version":"1.0","id":"{id}","status":"two hundred"}}"#);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut answered = None;
        while answered.is_none() && Instant::now() < deadline {
            for q in &queues {
                let _ = broker
                    .publish(q, funcatron_broker::Message::new(bad.clone().into_bytes()))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if waiting.is_finished() {
                answered = Some(waiting.await.unwrap());
                break;
            }
        }
        let r = match answered {
            Some(r) => r,
            None => panic!("{base}: no answer to a malformed reply"),
        };
        assert_eq!(r.status(), 502, "{base}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "malformed_reply", "{base}: {body}");
        assert_eq!(body["request_id"], id.as_str());

        // A late reply to an earlier attempt with the same id is dropped: the
        // next request with that id waits for its own answer (504 here, as
        // no Runner runs) instead of receiving the stale one, however the
        // broker orders the two.
        // (Our Runners copy each attempt's reply key; this one is another attempt's.)
        let good = format!(
            r#"{{"version":"1.0","id":"{id}","status":200,"body":"stale","reply_key":"an-earlier-attempt"}}"#
        );
        for q in &queues {
            broker
                .publish(q, funcatron_broker::Message::new(good.clone().into_bytes()))
                .await
                .unwrap();
        }
        let r = http
            .get(format!("{base}/hello/y"))
            .header("x-request-id", id.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504, "{base}: a stale reply was delivered");
    }
}

/// The health answer of an ingress.
async fn health(base: &str) -> Value {
    let (_, body) = text(&format!("{base}/_funcatron/health")).await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_routes_at_the_edge_by_the_trons_table_and_reports_its_demand() {
    let p = start_processes(1, 1, 0, &[]).await;
    // What the ingresses report they routed at the edge, counted from
    // the moment the test's own probe report comes back (the
    // subscription is bound).
    let broker = funcatron_broker::AmqpBroker::connect(&p.broker);
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    let mut reports = broker
        .subscribe(funcatron_control::names::DEMAND_TOPIC)
        .await
        .unwrap();
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bound = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let (counted, bound) = (counted.clone(), bound.clone());
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            while let Some(d) = reports.next().await {
                let r: funcatron_control::admission::EdgeDemand =
                    serde_json::from_slice(&d.message.payload).unwrap();
                if r.ingress == "test-probe" {
                    bound.store(true, SeqCst);
                } else if r.ingress.starts_with("funcatron.reply.nginx-") {
                    let n: u64 = r
                        .counts
                        .iter()
                        .filter(|(f, _)| f == "hello")
                        .map(|(_, n)| n)
                        .sum();
                    counted.fetch_add(n, SeqCst);
                }
            }
        }
    });
    let probe = serde_json::json!({"ingress": "test-probe", "counts": [["nothing", 0]]});
    eventually("the test hears demand reports", || async {
        let m = funcatron_broker::Message::new(serde_json::to_vec(&probe).unwrap());
        broker
            .broadcast(funcatron_control::names::DEMAND_TOPIC, m)
            .await
            .unwrap();
        bound.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let nginx = start_nginx(&p.broker, &[]).await;
    // Every worker asks for the table when it connects; both get it.
    eventually("both nginx workers route by a table", || async {
        let h = health(&nginx.base).await;
        h["routing"] == "edge" && h["edge_table_revision"].is_u64() && h["workers_with_table"] == 2
    })
    .await;
    let http = reqwest::Client::new();
    for i in 0..10 {
        let r = http
            .get(format!("{}/hello/edge{i}", nginx.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), format!("Hello, edge{i}!"));
    }
    let r = http
        .get(format!("{}/function/hello/named", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, named!");
    // Path parameters reach the Func decoded, as the Tron sends them.
    let r = http
        .get(format!("{}/petshop/pets/3", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // 404 and 405 are answered at the edge, as a Tron answers them.
    let r = http
        .get(format!("{}/no/such/func", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_route", "{v}");
    let r = http
        .patch(format!("{}/hello/x", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    let r = http
        .get(format!("{}/function/nope/x", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown_func");
    // The requests for hello were counted by nginx, for the autoscaler.
    let hello = || counted.load(std::sync::atomic::Ordering::SeqCst);
    eventually("nginx reported its demand", || async { hello() >= 11 }).await;
    assert_eq!(hello(), 11, "every request for hello counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_with_tron_routing_sends_every_request_through_a_tron() {
    let p = start_processes(1, 1, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &["--routing", "tron"]).await;
    let h = health(&nginx.base).await;
    assert_eq!(h["routing"], "tron", "{h}");
    assert!(h["edge_table_revision"].is_null(), "{h}");
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/hello/tron", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, tron!");
    let r = http
        .get(format!("{}/no/such/func", nginx.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // No worker binds a queue to the Trons' tables.
    let vhost = p.broker.rsplit('/').next().unwrap().to_owned();
    let all = queues(&vhost);
    assert_eq!(reply_queues(&vhost).len(), 2, "{all:?}");
    assert!(
        all.iter().all(|q| !q.starts_with("funcatron.tables.")),
        "tables heard with --routing tron: {all:?}"
    );
}

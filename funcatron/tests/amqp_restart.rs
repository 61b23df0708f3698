//! RabbitMQ is stopped and started again under running processes (and an
//! nginx ingress): nothing
//! exits, requests during the outage get a JSON 503 at once, and requests
//! succeed again once the broker is back. Its own test binary, because it
//! restarts the broker every other test shares.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_reconnects_after_a_broker_restart() {
    let mut p = start_processes(1, 1, 1, &["--timeout-ms", "5000"]).await;
    let mut nginx = start_nginx(&p.broker, &["--timeout-ms", "5000"]).await;
    let nginx_base = nginx.base.clone();
    let base = p.bases[0].clone();
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/hello/before"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "Hello, before!"
    );

    // On a second vhost a Tron runs but no Runner, so requests wait: park
    // one in each ingress and make sure both sit in the Func queue.
    let parked = start_processes(1, 0, 0, &[]).await;
    let (_parked_ingress, parked_embedded) =
        spawn_ingress(&parked.broker, &["--timeout-ms", "20000"]).await;
    let parked_nginx = start_nginx(&parked.broker, &["--timeout-ms", "20000"]).await;
    let parked_calls: Vec<_> = [parked_embedded.clone(), parked_nginx.base.clone()]
        .into_iter()
        .map(|b| {
            let http = http.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = http.get(format!("{b}/hello/parked")).send().await.unwrap();
                let status = r.status().as_u16();
                (
                    b,
                    status,
                    r.json::<Value>().await.unwrap(),
                    started.elapsed(),
                )
            })
        })
        .collect();
    let vhost = parked.broker.rsplit('/').next().unwrap().to_owned();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-p",
                &vhost,
                "--no-table-headers",
                "--quiet",
                "name",
                "messages",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.lines().any(|l| {
            let cols: Vec<_> = l.split_whitespace().collect();
            cols.len() == 2 && cols[0].starts_with("funcatron.func.hello.") && cols[1] == "2"
        }) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the parked requests never reached the Func queue: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stop the node; while it is down the ingress answers 503 quickly.
    let base2 = base.clone();
    let nginx2 = nginx_base.clone();
    let restart = std::thread::spawn(move || {
        let out = std::process::Command::new("rabbitmqctl")
            .arg("shutdown")
            .output()
            .unwrap();
        assert!(out.status.success());
        // While the broker is down: a fast 503 with a reason, not a hang.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let during = rt.block_on(async {
            let mut out = Vec::new();
            for b in [&base2, &nginx2] {
                let started = Instant::now();
                let r = reqwest::get(format!("{b}/hello/during")).await.unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                out.push((status, body, started.elapsed()));
            }
            out
        });
        let ok = rabbitmq_server().status().unwrap();
        assert!(ok.success());
        wait_rabbitmq();
        during
    });
    let during = tokio::task::spawn_blocking(move || restart.join().unwrap())
        .await
        .unwrap();
    // The parked requests learnt of the lost connection at once, not at
    // their 20 s deadline.
    for call in parked_calls {
        let (base, status, body, took) = call.await.unwrap();
        assert_eq!(status, 503, "{base}: {body}");
        assert_eq!(body["error"], "broker_connection_lost", "{base}: {body}");
        assert!(
            took < Duration::from_secs(15),
            "{base}: answered after {took:?}"
        );
    }
    for (status, body, took) in during {
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"].as_str().unwrap().starts_with("broker_"),
            "{body}"
        );
        assert!(took < Duration::from_secs(2), "503 came after {took:?}");
    }

    // Back: requests succeed again through both ingresses without restarting anything.
    for b in [&base, &nginx_base] {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let r = http.get(format!("{b}/hello/after")).send().await.unwrap();
            if r.status() == 200 {
                assert_eq!(r.text().await.unwrap(), "Hello, after!");
                break;
            }
            assert!(
                Instant::now() < until,
                "{b}: no recovery: last status {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(nginx.alive(), "nginx exited during the restart");
    for _ in 0..20 {
        let r = http
            .get(format!("{base}/petshop/pets/1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for proc in &mut p.procs {
        assert!(proc.alive(), "{} exited during the restart", proc.name);
    }
}

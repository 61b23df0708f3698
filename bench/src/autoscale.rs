//! `funcatron-bench --autoscale`: how fast the autoscaler reacts, on
//! RabbitMQ with the `process` substrate (Runners as child processes).
//!
//! (a) zero to first answer: a Func scaled to zero gets one request; the
//!     time until its answer (a Runner process started, connected,
//!     prepared the bundle and served it). Lua `hello` and Python
//!     `python-demo`, five rounds each (target for Lua < 500 ms);
//! (b) a load step from idle to saturation on an exec Func that takes
//!     ~50 ms (target concurrency 4, at most 8 Runners, 200 requests/s in
//!     an open loop, so the queue grows until enough Runners run): time
//!     from the first request to the first scale decision (target < 1 s),
//!     and until the queue is empty with every wanted Runner running.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::switch::{free, funcatron, until, Kill};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn scaling(http: &reqwest::Client, mgmt: &str, func: &str) -> Value {
    let v: Value = match http.get(format!("{mgmt}/v1/status")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    v["funcs"][func]["scaling"].clone()
}

async fn at_zero(http: &reqwest::Client, mgmt: &str, func: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scaling(http, mgmt, func).await;
        if s["target"] == 0 && s["running"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{func} never went back to zero Runners: {s}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    (ms(d[d.len() / 2]), ms(d[d.len() - 1]))
}

/// Run the measurements against `amqp` and print them.
pub async fn run(amqp: &str) -> Result<()> {
    let bin = funcatron()?;
    let tmp = tempfile::tempdir()?;
    let bundles = tmp.path().join("bundles");
    for name in ["hello", "python-demo"] {
        let dst = bundles.join(name);
        std::fs::create_dir_all(&dst)?;
        for e in std::fs::read_dir(std::path::Path::new("func-bundles").join(name))? {
            let e = e?;
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    let step = bundles.join("step");
    std::fs::create_dir_all(&step)?;
    std::fs::write(
        step.join("swagger.yaml"),
        "swagger: \"2.0\"\ninfo: {title: Step, version: \"1\"}\nbasePath: /step\nx-funcatron: {name: step, runtime: exec, handler: fn.sh}\npaths:\n  /:\n    get: {operationId: work, responses: {\"200\": {description: ok}}}\n",
    )?;
    std::fs::write(step.join("fn.sh"), "#!/bin/sh\nsleep 0.05\necho done\n")?;
    std::fs::set_permissions(
        step.join("fn.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let (addr, mgmt) = (free()?, free()?);
    let _up = Kill(
        Command::new(&bin)
            .args([
                "up",
                "--broker",
                amqp,
                "--listen",
                &addr,
                "--mgmt-listen",
                &mgmt,
                "--substrate",
                "process",
                "--min-runners",
                "0",
                "--max-runners",
                "8",
                "--target-concurrency",
                "4",
                "--scale-down-delay-ms",
                "300",
            ])
            .arg("--bundles")
            .arg(&bundles)
            .arg("--store")
            .arg(tmp.path().join("store"))
            .env("FUNCATRON_TOKEN", "bench-token")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let http = reqwest::Client::new();
    let (base, mgmt) = (format!("http://{addr}"), format!("http://{mgmt}"));
    until(
        &http,
        &format!("{mgmt}/v1/health"),
        "{\"ok\":true}",
        Instant::now(),
    )
    .await?;
    until(
        &http,
        &format!("{base}/_funcatron/health"),
        "{\"ok\":true}",
        Instant::now(),
    )
    .await
    .ok();

    println!("autoscaler on RabbitMQ, process substrate (Runners as child processes)");
    // (a) zero to first answer. A first Python round prepares its
    // environment; it is not counted.
    for (func, path, want, target) in [
        ("hello", "/hello/zero", "Hello, zero!", Some(500)),
        ("python-demo", "/py/hello/zero", "", None),
    ] {
        let mut took = Vec::new();
        for round in 0..6 {
            at_zero(&http, &mgmt, func).await?;
            let t = Instant::now();
            let r = http.get(format!("{base}{path}")).send().await?;
            let status = r.status();
            let body = r.text().await?;
            if !status.is_success() || (!want.is_empty() && body != want) {
                bail!("{func}: {status} {body}");
            }
            if round > 0 {
                took.push(t.elapsed());
            }
        }
        let (p50, max) = median(took);
        let goal = target.map_or(String::new(), |t| {
            format!("  (target < {t} ms: {:.2} of it)", p50 / f64::from(t))
        });
        println!(
            "zero Runners -> first answer, {func:<12} p50 {p50:>7.1} ms  max {max:>7.1} ms{goal}"
        );
    }

    // (b) load step: open loop, 200 requests/s for 8 s (about 10 in
    // service at once, so 3 Runners at target concurrency 4).
    at_zero(&http, &mgmt, "step").await?;
    let rate = 200u64;
    let t0 = now_ms();
    let started = Instant::now();
    let sender = {
        let (http, url) = (http.clone(), format!("{base}/step/"));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            let mut calls = Vec::new();
            while started.elapsed() < Duration::from_secs(8) {
                tick.tick().await;
                let (http, url) = (http.clone(), url.clone());
                calls.push(tokio::spawn(async move {
                    http.get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }));
            }
            let mut ok = 0u64;
            let n = calls.len();
            for c in calls {
                if c.await.unwrap_or(false) {
                    ok += 1;
                }
            }
            (ok, n)
        })
    };
    let mut first_decision = None;
    let mut first_up_to = 0;
    let mut drained = None;
    let mut most = 0;
    let mut peak_ready = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let s = scaling(&http, &mgmt, "step").await;
        most = most.max(s["target"].as_u64().unwrap_or(0));
        peak_ready = peak_ready.max(s["ready"].as_u64().unwrap_or(0));
        if first_decision.is_none() {
            if let Some(d) = s["decisions"].as_array().and_then(|d| {
                d.iter()
                    .find(|d| d["at_ms"].as_u64().unwrap_or(0) >= t0 && d["to"] != 0)
            }) {
                first_decision = Some(d["at_ms"].as_u64().unwrap_or(t0) - t0);
                first_up_to = d["to"].as_u64().unwrap_or(0);
            }
        } else if drained.is_none()
            && peak_ready > 0
            && s["ready"] == 0
            && s["running"] == s["target"]
            && s["target"].as_u64().unwrap_or(0) >= 2
        {
            drained = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (ok, sent) = sender.await?;
    match first_decision {
        Some(ms) => println!(
            "load step ({rate}/s open loop, 50 ms exec Func): first scale decision after {ms} ms (0 -> {first_up_to}; target < 1000 ms: {:.2} of it)",
            ms as f64 / 1000.0
        ),
        None => println!("load step: no scale decision within 8 s"),
    }
    match drained {
        Some(d) => println!(
            "load step: backlog (peak {peak_ready} ready) drained, every wanted Runner running, after {:.0} ms (at most {most} Runners)",
            d.as_secs_f64() * 1000.0
        ),
        None => println!(
            "load step: backlog (peak {peak_ready} ready) not drained within 8 s (at most {most} Runners)"
        ),
    }
    println!("load step: {ok} of {sent} requests answered 200");
    Ok(())
}

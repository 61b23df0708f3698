//! Metrics, capture and replay, Func logs and per-Func log levels, against
//! real `funcatron` processes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const TOKEN: &str = "observe-token-123";

fn funcatron(args: &[&str], log: &Path) -> Proc {
    funcatron_logged(args, TOKEN, log)
}

fn cli(args: &[&str], mgmt: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args(args)
        .env("FUNCATRON_TRON_URL", mgmt)
        .env("FUNCATRON_TOKEN", TOKEN)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn get(url: &str) -> String {
    text_with(url, TOKEN).await.1
}

/// The value of one sample line `name{labels} value` (0 when absent).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_known_traffic_and_cover_the_dashboard() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello", "petshop"]);
    let addr = free_addr().to_string();
    let base = format!("http://{addr}");
    let _up = funcatron(
        &[
            "up",
            "--listen",
            &addr,
            "--bundles",
            root.path().to_str().unwrap(),
        ],
        &root.path().join("up.log"),
    );
    wait_ready(&format!("{base}/hello/ready")).await;
    let metrics = format!("{base}/_funcatron/metrics");
    let before = get(&metrics).await;
    let http = reqwest::Client::new();
    for i in 0..5 {
        let r = http.get(format!("{base}/hello/m{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let timing = r.headers()["server-timing"].to_str().unwrap().to_owned();
        assert!(
            timing.starts_with("dispatch;dur=") && timing.contains("queue;dur="),
            "{timing}"
        );
    }
    for _ in 0..2 {
        assert_eq!(
            http.get(format!("{base}/nowhere"))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
    let r = http
        .post(format!("{base}/petshop/pets"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let after = get(&metrics).await;
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta("ingress_requests_total{status=\"200\"}"),
        5.0,
        "{after}"
    );
    assert_eq!(delta("ingress_requests_total{status=\"404\"}"), 2.0);
    assert_eq!(delta("ingress_requests_total{status=\"400\"}"), 1.0);
    // 404s are answered at the edge (the ingress routes by the Trons'
    // table) or by a Tron, never both.
    assert_eq!(
        delta("tron_requests_total{outcome=\"no_route\"}")
            + delta("ingress_edge_answered_total{code=\"no_route\"}"),
        2.0
    );
    // Routed at the edge, the ingress counts them in its next demand
    // report (or a Tron counted them as it dispatched).
    let routed = |m: &str| {
        sample(m, "tron_dispatched_total{func=\"hello\"}")
            + sample(m, "ingress_edge_routed_total{func=\"hello\"}")
    };
    // Every request the Runner ran for hello (the readiness probe too)
    // is counted as routed exactly once, by the ingress or by a Tron.
    let invoked = |m: &str| sample(m, "runner_invocations_total{func=\"hello\",status=\"2xx\"}");
    let was = routed(&before);
    eventually("every request to hello counted as routed once", || async {
        let m = get(&metrics).await;
        routed(&m) - was >= 5.0 && routed(&m) == invoked(&m)
    })
    .await;
    // What the dashboard is checked against: everything exported by now.
    let exported = get(&metrics).await;
    assert_eq!(
        delta("runner_invocations_total{func=\"hello\",status=\"2xx\"}"),
        5.0
    );
    assert_eq!(
        delta("runner_invocations_total{func=\"petshop\",status=\"4xx\"}"),
        1.0
    );
    assert_eq!(
        delta("runner_invalid_requests_total{func=\"petshop\"}"),
        1.0
    );
    assert_eq!(
        delta("runner_queue_wait_seconds_count{func=\"hello\"}"),
        5.0
    );
    // Names follow <component>_<name>_<unit>[_total]; no ids as labels.
    for line in after
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        assert!(
            ["ingress_", "tron_", "runner_", "listener_", "broker_"]
                .iter()
                .any(|p| name.starts_with(p)),
            "{name}"
        );
        assert!(
            !line.contains("request_id") && !line.contains("sha="),
            "{line}"
        );
    }
    // Every series the Grafana dashboard plots exists (but those only
    // capture, dead letters, worker restarts and failed scale calls
    // produce, checked where they happen).
    let dash = std::fs::read_to_string(repo().join("deploy/dashboards/funcatron.json")).unwrap();
    let dash: Value = serde_json::from_str(&dash).unwrap();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let is_metric = ["ingress_", "tron_", "runner_"]
                    .iter()
                    .any(|p| word.starts_with(p));
                if !is_metric
                    || word.contains("captured")
                    || word.contains("dead_lettered")
                    || word.contains("restarts")
                    || word.contains("scale_errors")
                {
                    continue;
                }
                assert!(
                    exported.contains(word),
                    "the dashboard plots {word}, which is not exported"
                );
            }
        }
    }
}

/// `up --store` with no static bundles; hello pushed and enabled.
async fn registry_up(root: &Path) -> (Proc, String, String, std::path::PathBuf) {
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (addr, mgmt) = (free_addr().to_string(), free_addr().to_string());
    let log = root.join("up.log");
    let up = funcatron(
        &[
            "up",
            "--listen",
            &addr,
            "--mgmt-listen",
            &mgmt,
            "--bundles",
            empty.to_str().unwrap(),
            "--store",
            root.join("store").to_str().unwrap(),
        ],
        &log,
    );
    let (base, mgmt) = (format!("http://{addr}"), format!("http://{mgmt}"));
    wait_ready(&format!("{mgmt}/v1/health")).await;
    (up, base, mgmt, log)
}

fn hello_dir(root: &Path, greeting: &str) -> std::path::PathBuf {
    let dir = root.join(format!("bundle-{greeting}"));
    let src = repo().join("func-bundles/hello");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("swagger.yaml"), dir.join("swagger.yaml")).unwrap();
    let lua = std::fs::read_to_string(src.join("main.lua")).unwrap();
    let lua = lua.replace("Hello, ", &format!("{greeting}, "));
    // Print a line per call, for `funcatron logs`.
    let lua = format!("local function say(n) print('greeting ' .. n) end\n{lua}");
    std::fs::write(dir.join("main.lua"), lua).unwrap();
    dir
}

/// Wait until the Runner in `log` follows registry revision `rev`.
async fn runner_follows(log: &Path, rev: &Value) {
    let needle = format!("following the registry state revision={rev}");
    eventually(&needle, || async { log_has(log, &needle) }).await;
}

#[tokio::test]
async fn capture_samples_redacts_exports_and_replays() {
    let root = tempfile::tempdir().unwrap();
    let (_up, base, mgmt, log) = registry_up(root.path()).await;
    let v1 = hello_dir(root.path(), "Hello");
    let (code, out) = cli(&["bundle", "push", v1.to_str().unwrap(), "--enable"], &mgmt);
    assert_eq!(code, 0, "{out}");
    eventually("hello answers", || async {
        get(&format!("{base}/hello/x")).await == "Hello, x!"
    })
    .await;
    let http = reqwest::Client::new();

    // A sampled capture: about 40% of 400 requests, sensitive headers redacted.
    let r: Value = http
        .post(format!("{mgmt}/v1/funcs/hello/capture"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"sample": 0.4, "redact": ["X-Secret"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    runner_follows(&log, &r["revision"]).await;
    for i in 0..400 {
        let r = http
            .get(format!("{base}/hello/s{i}"))
            .header("authorization", "Bearer very-secret")
            .header("cookie", "session=abc")
            .header("x-secret", "shh")
            .header("x-keep", "visible")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (code, out) = cli(&["capture", "stop", "hello"], &mgmt);
    assert_eq!(code, 0, "{out}");
    let captured = sample(
        &get(&format!("{base}/_funcatron/metrics")).await,
        "runner_captured_total{func=\"hello\"}",
    );
    let file = root.path().join("sampled.jsonl");
    eventually("every captured pair is written", || async {
        let (code, out) = cli(
            &["capture", "export", "hello", "-o", file.to_str().unwrap()],
            &mgmt,
        );
        let n = std::fs::read_to_string(&file).map_or(0, |t| t.lines().count());
        if code != 0 || n as f64 != captured {
            eprintln!("export: {code} {out} {n} of {captured}");
        }
        code == 0 && n as f64 == captured
    })
    .await;
    assert!(
        (120.0..=200.0).contains(&captured),
        "{captured} of 400 at 0.4"
    );
    for line in std::fs::read_to_string(&file).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["schema"], "funcatron.capture/1");
        let headers = v["request"]["headers"].as_array().unwrap();
        let h = |name: &str| {
            headers
                .iter()
                .find(|p| p[0] == name)
                .map(|p| p[1].as_str().unwrap().to_owned())
        };
        assert_eq!(h("authorization").as_deref(), Some("[redacted]"));
        assert_eq!(h("cookie").as_deref(), Some("[redacted]"));
        assert_eq!(h("x-secret").as_deref(), Some("[redacted]"));
        assert_eq!(h("x-keep").as_deref(), Some("visible"));
        assert!(!line.contains("very-secret") && !line.contains("session=abc"));
    }

    // Full capture of a fresh stream, export, replay: no differences on the
    // unchanged Func (over HTTP and through the management API)...
    std::fs::remove_file(root.path().join("store/captures/hello.jsonl")).unwrap();
    let (code, out) = cli(&["capture", "start", "hello", "--max", "20"], &mgmt);
    assert_eq!(code, 0, "{out}");
    let state: Value = serde_json::from_str(&get(&format!("{mgmt}/v1/state")).await).unwrap();
    runner_follows(&log, &state["revision"]).await;
    for i in 0..25 {
        http.get(format!("{base}/hello/r{i}")).send().await.unwrap();
    }
    let file = root.path().join("stream.jsonl");
    eventually("the capture stops itself at --max 20", || async {
        cli(
            &["capture", "export", "hello", "-o", file.to_str().unwrap()],
            &mgmt,
        )
        .0 == 0
            && std::fs::read_to_string(&file).unwrap().lines().count() == 20
            && !get(&format!("{mgmt}/v1/state"))
                .await
                .contains("\"captures\"")
    })
    .await;
    let (code, out) = cli(
        &[
            "replay",
            file.to_str().unwrap(),
            "--target",
            &base,
            "--allow-outbound",
            "127.0.0.1",
        ],
        &mgmt,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 20: 20 same, 0 differ"), "{out}");
    let (code, out) = cli(
        &[
            "replay",
            file.to_str().unwrap(),
            "--target",
            "hello",
            "--concurrency",
            "4",
        ],
        &mgmt,
    );
    assert_eq!(code, 0, "{out}");

    // ...and exactly the differences once the Func changes.
    let v2 = hello_dir(root.path(), "Howdy");
    let (code, out) = cli(&["bundle", "push", v2.to_str().unwrap(), "--enable"], &mgmt);
    assert_eq!(code, 0, "{out}");
    eventually("v2 answers", || async {
        get(&format!("{base}/hello/x")).await == "Howdy, x!"
    })
    .await;
    let (code, out) = cli(
        &[
            "replay",
            file.to_str().unwrap(),
            "--target",
            &base,
            "--allow-outbound",
            "127.0.0.1",
            "--rate",
            "200",
        ],
        &mgmt,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("replayed 20: 0 same, 20 differ"), "{out}");
    assert!(
        out.contains("body: \"Hello, r0!\" -> \"Howdy, r0!\""),
        "{out}"
    );
}

#[tokio::test]
async fn log_levels_change_on_every_runner_and_logs_follow_a_request() {
    let root = tempfile::tempdir().unwrap();
    let broker = fresh_vhost();
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mgmt_addr = free_addr().to_string();
    let mgmt = format!("http://{mgmt_addr}");
    let tron_log = root.path().join("tron.log");
    let _tron = funcatron(
        &[
            "tron",
            "--broker",
            &broker,
            "--bundles",
            empty.to_str().unwrap(),
            "--store",
            root.path().join("store").to_str().unwrap(),
            "--mgmt-listen",
            &mgmt_addr,
        ],
        &tron_log,
    );
    let logs = [root.path().join("r1.log"), root.path().join("r2.log")];
    let _runners: Vec<Proc> = logs
        .iter()
        .map(|l| {
            funcatron(
                &[
                    "runner",
                    "--broker",
                    &broker,
                    "--bundles",
                    empty.to_str().unwrap(),
                ],
                l,
            )
        })
        .collect();
    let addr = free_addr().to_string();
    let _ingress = funcatron(
        &["ingress", "--broker", &broker, "--listen", &addr],
        &root.path().join("i.log"),
    );
    let base = format!("http://{addr}");
    wait_ready(&format!("{mgmt}/v1/health")).await;
    let dir = hello_dir(root.path(), "Hi");
    // Say hello in the handler, so `funcatron logs` has a line per request.
    let lua = std::fs::read_to_string(dir.join("main.lua")).unwrap();
    std::fs::write(
        dir.join("main.lua"),
        lua.replace(
            "function M.helloName(req)",
            "function M.helloName(req)\n  say(req.params.name)",
        ),
    )
    .unwrap();
    let (code, out) = cli(
        &["bundle", "push", dir.to_str().unwrap(), "--enable"],
        &mgmt,
    );
    assert_eq!(code, 0, "{out}");
    for l in &logs {
        eventually("both Runners serve hello", || async {
            log_has(l, "serving Func")
        })
        .await;
    }
    eventually("hello answers", || async {
        get(&format!("{base}/hello/x")).await == "Hi, x!"
    })
    .await;
    let http = reqwest::Client::new();
    for i in 0..30 {
        http.get(format!("{base}/hello/a{i}")).send().await.unwrap();
    }
    for l in &logs {
        assert!(
            !log_has(l, "DEBUG"),
            "debug before the change in {}",
            l.display()
        );
    }
    let (code, out) = cli(&["func", "log-level", "hello", "debug"], &mgmt);
    assert_eq!(code, 0, "{out}");
    for l in &logs {
        eventually("the level reaches every Runner", || async {
            log_has(l, "log levels changed")
        })
        .await;
    }
    for i in 0..30 {
        http.get(format!("{base}/hello/b{i}")).send().await.unwrap();
    }
    for l in &logs {
        eventually("debug lines for hello on both Runners", || async {
            std::fs::read_to_string(l).is_ok_and(|t| {
                t.lines()
                    .any(|line| line.contains("DEBUG") && line.contains("func=\"hello\""))
            })
        })
        .await;
    }

    // Follow one request: its Func's log line, found by request id.
    let r = http
        .get(format!("{base}/hello/traced"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hi, traced!");
    eventually("funcatron logs finds the request's line", || async {
        let (code, out) = cli(&["logs", "hello", "--request-id", "trace-me-42"], &mgmt);
        code == 0 && out.contains("trace-me-42 [print] greeting traced") && out.lines().count() == 1
    })
    .await;
}

#[tokio::test]
async fn status_reports_load_per_func_from_runner_heartbeats() {
    let root = tempfile::tempdir().unwrap();
    let (_up, base, mgmt, _log) = registry_up(root.path()).await;
    let v1 = hello_dir(root.path(), "Hello");
    let (code, out) = cli(&["bundle", "push", v1.to_str().unwrap(), "--enable"], &mgmt);
    assert_eq!(code, 0, "{out}");
    eventually("hello answers", || async {
        get(&format!("{base}/hello/x")).await == "Hello, x!"
    })
    .await;
    let http = reqwest::Client::new();
    for i in 0..50 {
        http.get(format!("{base}/hello/st{i}"))
            .send()
            .await
            .unwrap();
    }
    // Heartbeats come every second: wait for one that counts them all.
    eventually("status counts the requests", || async {
        let v: Value = serde_json::from_str(&get(&format!("{mgmt}/v1/status")).await).unwrap();
        let f = &v["funcs"]["hello"];
        f["served"].as_u64().unwrap_or(0) >= 51
            && f["runners"] == 1
            && f["consumers"] == 1
            && f["ready"] == 0
            && f["in_flight"] == 0
            && f["service_ms"].as_f64().is_some_and(|s| s > 0.0)
    })
    .await;
    let (code, out) = cli(&["status"], &mgmt);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("hello ")), "{out}");
}

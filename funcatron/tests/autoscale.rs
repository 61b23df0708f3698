//! The autoscaler on the `process` substrate, against a real RabbitMQ and
//! real Runner child processes: step load up to the bound and back down to
//! zero, scale from zero, SIGKILL of a Runner under load, scale-in under
//! load without redelivery.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

const TOKEN: &str = "autoscale-test-token";

/// A Func that takes ~200 ms and writes each request's id to a ledger, so
/// a test can tell how often each request ran.
fn slow_bundle(root: &Path) -> PathBuf {
    let ledger = root.join("ledger");
    let dir = write_bundle(
        root,
        "slow",
        &[
            (
                "swagger.yaml",
                &format!(
                    r#"swagger: "2.0"
info: {{title: Slow, version: "1.0"}}
basePath: /slow
x-funcatron:
  name: slow
  runtime: exec
  handler: fn.sh
  env: {{LEDGER: "{}"}}
paths:
  /work/{{id}}:
    get:
      operationId: work
      parameters: [{{name: id, in: path, required: true, type: string}}]
      responses: {{"200": {{description: done}}}}
"#,
                    ledger.display()
                ),
            ),
            (
                "fn.sh",
                "#!/bin/sh\nsleep 0.2\necho \"$FUNCATRON_PARAM_id\" >> \"$LEDGER\"\nprintf 'done %s' \"$FUNCATRON_PARAM_id\"\n",
            ),
        ],
    );
    std::fs::set_permissions(dir.join("fn.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    ledger
}

struct Scaled {
    up: Proc,
    base: String,
    mgmt: String,
    log: PathBuf,
    broker: String,
    ledger: PathBuf,
    _root: tempfile::TempDir,
}

/// `funcatron up` on a fresh RabbitMQ vhost with the process substrate,
/// serving `hello` and `slow`.
async fn scaled_up(extra: &[&str]) -> Scaled {
    let root = tempfile::tempdir().unwrap();
    let bundles = root.path().join("bundles");
    copy_examples(&bundles, &["hello"]);
    let ledger = slow_bundle(&bundles);
    let broker = fresh_vhost();
    let (addr, mgmt) = (free_addr().to_string(), free_addr().to_string());
    let log = root.path().join("up.log");
    let store = root.path().join("store");
    let store = store.to_str().unwrap().to_owned();
    let mut args = vec![
        "up",
        "--broker",
        &broker,
        "--listen",
        &addr,
        "--mgmt-listen",
        &mgmt,
        "--store",
        &store,
        "--bundles",
        bundles.to_str().unwrap(),
        "--substrate",
        "process",
        // The ledger (the test's record of every run, outside the bundle)
        // must be writable by the Func, which the sandbox forbids: these
        // scaling tests run their Runners unsandboxed.
        "--runner-arg=--insecure-no-sandbox",
    ];
    args.extend_from_slice(extra);
    let up = funcatron_logged(&args, TOKEN, &log);
    let (base, mgmt) = (format!("http://{addr}"), format!("http://{mgmt}"));
    wait_ready(&format!("{mgmt}/v1/health")).await;
    wait_ready(&format!("{base}/_funcatron/health")).await;
    Scaled {
        up,
        base,
        mgmt,
        log,
        broker,
        ledger,
        _root: root,
    }
}

impl Scaled {
    async fn scaling(&self, func: &str) -> Value {
        let (_, body) = text_with(&format!("{}/v1/status", self.mgmt), TOKEN).await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["funcs"][func]["scaling"].clone()
    }

    async fn wait_runners(&self, func: &str, n: u64) {
        eventually(&format!("{func} has {n} Runners"), || async {
            let s = self.scaling(func).await;
            s["target"] == n && s["running"] == n
        })
        .await;
    }

    /// Process ids of this instance's Runners for `func` (children of
    /// `up`, not the Runners' own short-lived forks for exec Funcs).
    fn runner_pids(&self, func: &str) -> Vec<i32> {
        let out = std::process::Command::new("pgrep")
            .args([
                "-P",
                &self.up.child.id().to_string(),
                "-f",
                &format!(" runner .*--func {func}$"),
            ])
            .output()
            .unwrap();
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        // The broker URL carries credentials: it reaches a Runner through
        // its environment, never its command line (readable by every user).
        for pid in &pids {
            if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline);
                assert!(
                    !cmdline.contains(&self.broker),
                    "the broker URL is in a Runner's argv: {cmdline}"
                );
            }
        }
        pids
    }

    /// Every request in `ids` ran exactly once (nothing redelivered).
    fn assert_each_ran_once(&self, ids: &[String]) {
        let ledger = self.ledger();
        for id in ids {
            assert_eq!(
                ledger.get(id),
                Some(&1),
                "request {id} ran {:?} times",
                ledger.get(id)
            );
        }
    }

    /// How often each request id ran.
    fn ledger(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for l in std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
        {
            *m.entry(l.to_owned()).or_insert(0) += 1;
        }
        m
    }
}

/// Clients calling `/slow/work/{id}` in a loop until stopped; every
/// answer (id, status, body) is kept.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(String, u16, String)>>>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, clients: usize, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicU64::new(0));
        let http = reqwest::Client::new();
        let tasks = (0..clients)
            .map(|c| {
                let (stop, answers, done, http) =
                    (stop.clone(), answers.clone(), done.clone(), http.clone());
                let (base, tag) = (base.to_owned(), tag.to_owned());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("{tag}-{c}-{i}");
                        i += 1;
                        let r = http.get(format!("{base}/slow/work/{id}")).send().await;
                        let (status, body) = match r {
                            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                            Err(e) => (0, e.to_string()),
                        };
                        answers.lock().unwrap().push((id, status, body));
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            answers,
            done,
            tasks,
        }
    }

    /// Stop and return every answer, asserting each was the Func's own.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        for (id, status, body) in &answers {
            assert_eq!(
                (*status, body.as_str()),
                (200, format!("done {id}").as_str()),
                "request {id}"
            );
        }
        answers.into_iter().map(|(id, _, _)| id).collect()
    }
}

#[tokio::test]
async fn step_load_scales_up_to_the_bound_and_back_to_zero() {
    let s = scaled_up(&[
        "--min-runners",
        "0",
        "--max-runners",
        "3",
        "--target-concurrency",
        "2",
        "--scale-down-delay-ms",
        "1500",
    ])
    .await;
    s.wait_runners("slow", 0).await;
    assert!(s.runner_pids("slow").is_empty());
    // Watch the bound while the load runs.
    let most = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (most, watching, mgmt) = (most.clone(), watching.clone(), s.mgmt.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let (_, body) = text_with(&format!("{mgmt}/v1/status"), TOKEN).await;
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let sc = &v["funcs"]["slow"]["scaling"];
                for k in ["target", "running", "requested"] {
                    most.fetch_max(sc[k].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    let load = Load::start(&s.base, 10, "step");
    s.wait_runners("slow", 3).await;
    assert_eq!(s.runner_pids("slow").len(), 3);
    let ids = load.finish().await;
    s.wait_runners("slow", 0).await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    assert_eq!(
        most.load(Ordering::Relaxed),
        3,
        "max-runners 3 was exceeded"
    );
    eventually("the stopped Runners exited", || async {
        s.runner_pids("slow").is_empty()
    })
    .await;
    // Every request ran exactly once: scale-in redelivered nothing.
    s.assert_each_ran_once(&ids);
    let sc = s.scaling("slow").await;
    let decisions = sc["decisions"].as_array().unwrap();
    assert!(
        decisions
            .iter()
            .any(|d| d["from"] == 0 && d["reason"].as_str().unwrap().starts_with("scale up")),
        "{sc}"
    );
    assert!(
        decisions
            .iter()
            .any(|d| d["to"] == 0 && d["reason"].as_str().unwrap().starts_with("scale down")),
        "{sc}"
    );
    // The CLI shows the decisions and their reasons.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args(["status", "--tron", &s.mgmt])
        .env("FUNCATRON_TOKEN", TOKEN)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("autoscaler: substrate process"), "{out}");
    assert!(out.contains("slow: 0 -> "), "{out}");
    // The answer is exactly what the management API's shared types say.
    let (_, body) = text_with(&format!("{}/v1/status", s.mgmt), TOKEN).await;
    let raw: Value = serde_json::from_str(&body).unwrap();
    let typed: funcatron_tron::mgmt::api::Status = serde_json::from_value(raw.clone()).unwrap();
    assert!(typed.autoscaler.is_some() && typed.funcs["slow"].scaling.is_some());
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        raw,
        "api::Status misses a field"
    );
    // The metrics carry the signals and decisions.
    let (_, metrics) = text(&format!("{}/metrics", s.mgmt)).await;
    for m in [
        "tron_autoscaler_desired_runners{func=\"slow\"}",
        "tron_autoscaler_queue_ready{func=\"slow\"}",
        "tron_autoscaler_arrival_per_second{func=\"slow\"}",
        "tron_autoscaler_decisions_total{func=\"slow\",direction=\"up\"}",
        "tron_autoscaler_decisions_total{func=\"slow\",direction=\"down\"}",
    ] {
        assert!(metrics.contains(m), "{m} missing");
    }
}

#[tokio::test]
async fn a_request_for_a_func_at_zero_starts_a_runner_and_is_answered() {
    from_zero("edge").await;
}

#[tokio::test]
async fn a_request_for_a_func_at_zero_through_a_tron_starts_a_runner_and_is_answered() {
    from_zero("tron").await;
}

/// Scale from zero with the ingress routing `routing`: at the edge the
/// ingress's demand report wakes the autoscaler, through a Tron its
/// dispatcher does.
async fn from_zero(routing: &str) {
    let s = scaled_up(&["--min-runners", "0", "--routing", routing]).await;
    s.wait_runners("hello", 0).await;
    let (code, body) = text(&format!("{}/hello/zero", s.base)).await;
    assert_eq!((code, body.as_str()), (200, "Hello, zero!"));
    let sc = s.scaling("hello").await;
    assert!(
        sc["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["from"] == 0 && d["to"] == 1),
        "{sc}"
    );
}

#[tokio::test]
async fn a_runner_killed_under_load_loses_no_request_and_is_replaced() {
    let s = scaled_up(&[
        "--min-runners",
        "2",
        "--max-runners",
        "2",
        "--target-concurrency",
        "2",
    ])
    .await;
    s.wait_runners("slow", 2).await;
    let load = Load::start(&s.base, 6, "kill");
    eventually("some answers", || async {
        load.done.load(Ordering::Relaxed) >= 12
    })
    .await;
    let pids = s.runner_pids("slow");
    assert_eq!(pids.len(), 2, "{pids:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let at_kill = load.done.load(Ordering::Relaxed);
    eventually("answers go on after the kill", || async {
        load.done.load(Ordering::Relaxed) >= at_kill + 20
    })
    .await;
    eventually("the killed Runner is replaced", || async {
        let p = s.runner_pids("slow");
        p.len() == 2 && !p.contains(&pids[0])
    })
    .await;
    // Every request got the Func's answer (those the killed Runner held
    // were redelivered to the other one).
    let ids = load.finish().await;
    let ledger = s.ledger();
    for id in &ids {
        assert!(ledger.contains_key(id), "request {id} never ran");
    }
    s.wait_runners("slow", 2).await;
}

#[tokio::test]
async fn scale_in_under_load_fails_nothing_and_redelivers_nothing() {
    let s = scaled_up(&[
        "--min-runners",
        "1",
        "--max-runners",
        "3",
        "--target-concurrency",
        "2",
        "--scale-down-delay-ms",
        "1000",
    ])
    .await;
    s.wait_runners("slow", 1).await;
    let heavy = Load::start(&s.base, 10, "heavy");
    s.wait_runners("slow", 3).await;
    // Demand drops while one client keeps calling: two Runners stop
    // while requests flow.
    let light = Load::start(&s.base, 1, "light");
    let mut ids = heavy.finish().await;
    s.wait_runners("slow", 1).await;
    let at_one = light.done.load(Ordering::Relaxed);
    eventually("requests go on after scale-in", || async {
        light.done.load(Ordering::Relaxed) >= at_one + 3
    })
    .await;
    ids.extend(light.finish().await);
    s.assert_each_ran_once(&ids);
    assert!(
        !log_has(&s.log, "handling a redelivered request"),
        "a Runner saw a redelivery"
    );
}

#[tokio::test]
async fn runners_stop_when_their_tron_is_killed() {
    let mut s = scaled_up(&[]).await;
    s.wait_runners("hello", 1).await;
    assert_eq!(s.runner_pids("hello").len(), 1);
    // The Runners this instance started: they serve its own bundles
    // directory (after the Tron dies they are no longer its children).
    let bundles = std::fs::canonicalize(s._root.path().join("bundles")).unwrap();
    let pattern = format!("runner --bundles={}.*--func ", bundles.display());
    let alive = || {
        std::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(alive());
    s.up.child.kill().unwrap();
    s.up.child.wait().unwrap();
    eventually("the orphaned Runners exited", || async { !alive() }).await;
}

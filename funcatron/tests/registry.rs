//! The bundle registry and management API, against real `funcatron`
//! processes: upload, enable and switch under load, rollback, disable,
//! restart recovery, auth, hostile archives, the CLI; and two Trons over
//! RabbitMQ seeing each other's changes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use funcatron_bundle::archive;
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789";

/// `funcatron <role> --store ...` with a known token; stderr to `log`.
fn start(role: &str, store: &Path, listen: &str, mgmt: &str, extra: &[&str], log: &Path) -> Proc {
    let store = store.to_str().unwrap();
    let mut args = vec![role, "--store", store, "--mgmt-listen", mgmt];
    if role == "up" {
        args.extend(["--listen", listen]);
    }
    args.extend_from_slice(extra);
    funcatron_logged(&args, TOKEN, log)
}

/// A hello bundle that greets with `greeting`, packed.
fn hello_archive(root: &Path, greeting: &str) -> (String, Vec<u8>) {
    let dir = root.join(format!("hello-{greeting}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = repo().join("func-bundles/hello");
    std::fs::copy(src.join("swagger.yaml"), dir.join("swagger.yaml")).unwrap();
    let lua = std::fs::read_to_string(src.join("main.lua")).unwrap();
    std::fs::write(
        dir.join("main.lua"),
        lua.replace("Hello, ", &format!("{greeting}, ")),
    )
    .unwrap();
    let (_, bytes) = archive::build(&dir).unwrap();
    (archive::sha256_hex(&bytes), bytes)
}

async fn upload(mgmt: &str, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{mgmt}/v1/bundles?{query}"))
        .bearer_auth(TOKEN)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn post(mgmt: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{mgmt}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn cli(args: &[&str], mgmt: &str) -> (bool, String) {
    cli_with(args, mgmt, TOKEN)
}

#[tokio::test]
async fn upload_enable_switch_under_load_rollback_disable_and_restart_routed_at_the_edge() {
    switch_under_load("edge").await;
}

#[tokio::test]
async fn upload_enable_switch_under_load_rollback_disable_and_restart_routed_by_the_tron() {
    switch_under_load("tron").await;
}

/// The registry's whole life under load, with the ingress routing
/// `routing` (`edge` or `tron`).
async fn switch_under_load(routing: &str) {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let empty = root.path().join("no-bundles");
    std::fs::create_dir_all(&empty).unwrap();
    let (addr, mgmt_addr) = (free_addr().to_string(), free_addr().to_string());
    let base = format!("http://{addr}");
    let mgmt = format!("http://{mgmt_addr}");
    let log = root.path().join("up.log");
    let cache = test_cache_dir();
    let extra = [
        "--bundles",
        empty.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--routing",
        routing,
    ];
    let up = start("up", &store, &addr, &mgmt_addr, &extra, &log);
    wait_ready(&format!("{mgmt}/v1/health")).await;

    // Auth on every call but health and the API's own document.
    let (v1_sha, v1) = hello_archive(root.path(), "Hello");
    let r = reqwest::Client::new()
        .post(format!("{mgmt}/v1/bundles"))
        .body(v1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = reqwest::Client::new()
        .post(format!("{mgmt}/v1/funcs/hello/disable"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(text(&format!("{mgmt}/v1/funcs")).await.0, 401);
    assert_eq!(text_with(&format!("{mgmt}/v1/funcs"), TOKEN).await.0, 200);
    assert!(text(&format!("{mgmt}/v1/openapi.yaml"))
        .await
        .1
        .contains("enableFunc"));

    // Upload and enable v1.
    let (s, v) = upload(&mgmt, v1, "enable=true").await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["sha"].as_str(), v["enabled"].as_bool()),
        (Some(v1_sha.as_str()), Some(true))
    );
    eventually("v1 answers", || async {
        text(&format!("{base}/hello/you")).await.1 == "Hello, you!"
    })
    .await;

    // Continuous load through the switch to v2 and the rollback.
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let (stop, url) = (Arc::clone(&stop), format!("{base}/hello/you"));
        loaders.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut n, mut bad) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = http.get(&url).send().await.unwrap();
                let s = r.status();
                let t = r.text().await.unwrap();
                if s != 200 || !(t == "Hello, you!" || t == "Yo, you!") {
                    bad.push(format!("{s} {t}"));
                }
                n += 1;
            }
            (n, bad)
        }));
    }
    let (v2_sha, v2) = hello_archive(root.path(), "Yo");
    let (s, v) = upload(&mgmt, v2, "").await;
    assert_eq!((s, v["enabled"].as_bool()), (201, Some(false)), "{v}");
    let (s, v) = post(
        &mgmt,
        "/v1/funcs/hello/enable",
        serde_json::json!({"sha": v2_sha}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    eventually("v2 answers", || async {
        text(&format!("{base}/hello/you")).await.1 == "Yo, you!"
    })
    .await;
    let (s, v) = post(&mgmt, "/v1/funcs/hello/rollback", Value::Null).await;
    assert_eq!(
        (s, v["enabled"].as_str()),
        (200, Some(v1_sha.as_str())),
        "{v}"
    );
    eventually("v1 answers again", || async {
        text(&format!("{base}/hello/you")).await.1 == "Hello, you!"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in loaders {
        let (n, bad) = l.await.unwrap();
        total += n;
        assert!(
            bad.is_empty(),
            "failed during the switch: {:?}",
            &bad[..bad.len().min(5)]
        );
    }
    assert!(total >= 4, "{total}");
    // The load went the way asked: straight onto the Func's queue from
    // the ingress, or through the Tron.
    let (_, health) = text(&format!("{base}/_funcatron/health")).await;
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["routing"], routing, "{health}");
    let count = |m: &str, series: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let edge_routed = "ingress_edge_routed_total{func=\"hello\"}";
    if routing == "edge" {
        assert!(health["edge_table_revision"].as_u64().is_some(), "{health}");
        eventually("the ingress counts what it routed", || async {
            count(
                &text(&format!("{base}/_funcatron/metrics")).await.1,
                edge_routed,
            ) > 0.0
        })
        .await;
    } else {
        let (_, m) = text(&format!("{base}/_funcatron/metrics")).await;
        assert_eq!(
            count(&m, edge_routed),
            0.0,
            "routed at the edge with --routing tron"
        );
        assert!(count(&m, "tron_dispatched_total{func=\"hello\"}") > 0.0);
    }

    // History and the CLI.
    let (_, h) = text_with(&format!("{mgmt}/v1/funcs/hello/history"), TOKEN).await;
    let h: Value = serde_json::from_str(&h).unwrap();
    let actions: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["enable", "enable", "rollback"]);
    let (ok, out) = cli(&["func", "list"], &mgmt);
    assert!(
        ok && out.contains("hello") && out.contains(&v1_sha[..12]),
        "{out}"
    );
    let (ok, out) = cli(&["invoke", "hello", "/cli"], &mgmt);
    assert!(ok, "{out}");
    assert_eq!(out, "Hello, cli!");
    let (ok, out) = cli(
        &[
            "func", "enable", "hello", "--sha", &v2_sha, "--env", "A=b", "--debug",
        ],
        &mgmt,
    );
    assert!(ok, "{out}");
    let (_, show) = text_with(&format!("{mgmt}/v1/funcs/hello"), TOKEN).await;
    let shown: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(shown["settings"]["env"]["A"], "b", "{show}");
    assert_eq!(shown["settings"]["debug"], true, "{show}");
    eventually("v2 via the CLI", || async {
        text(&format!("{base}/hello/you")).await.1 == "Yo, you!"
    })
    .await;

    // Restart: the store brings back what was enabled, with no API call.
    drop(up);
    let _up = start("up", &store, &addr, &mgmt_addr, &extra, &log);
    eventually("v2 after a restart", || async {
        text(&format!("{base}/hello/you")).await.1 == "Yo, you!"
    })
    .await;

    // Disable: its routes answer 404.
    let (s, _) = post(&mgmt, "/v1/funcs/hello/disable", Value::Null).await;
    assert_eq!(s, 200);
    eventually("404 once disabled", || async {
        text(&format!("{base}/hello/you")).await.0 == 404
    })
    .await;
    let (ok, out) = cli(
        &[
            "bundle",
            "push",
            repo().join("func-bundles/hello").to_str().unwrap(),
            "--enable",
        ],
        &mgmt,
    );
    assert!(ok && out.contains("enabled"), "{out}");
    eventually("pushed from a directory", || async {
        text(&format!("{base}/hello/you")).await.1 == "Hello, you!"
    })
    .await;
}

/// (raw name, entry type, data, link target) of one archive entry.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a [u8]>);

/// A tar.gz whose raw headers say what we want (what `tar` would refuse).
fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                old.linkname[..l.len()].copy_from_slice(l);
            }
        }
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<RawEntry<'_>> = files
        .iter()
        .map(|(n, t)| (n.as_bytes(), tar::EntryType::Regular, t.as_bytes(), None))
        .collect();
    raw_archive(&entries)
}

#[tokio::test]
async fn hostile_and_invalid_archives_are_refused_with_a_reason() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let static_dir = root.path().join("static");
    copy_examples(&static_dir, &["hello"]);
    let (addr, mgmt_addr) = (free_addr().to_string(), free_addr().to_string());
    let mgmt = format!("http://{mgmt_addr}");
    let _up = start(
        "up",
        &store,
        &addr,
        &mgmt_addr,
        &[
            "--bundles",
            static_dir.to_str().unwrap(),
            "--max-upload-bytes",
            "2000000",
        ],
        &root.path().join("up.log"),
    );
    wait_ready(&format!("{mgmt}/v1/health")).await;
    let swagger = "swagger: '2.0'\nbasePath: /x\nx-funcatron: {runtime: lua, name: x}\npaths:\n  /:\n    get: {operationId: go}\n";
    let bomb = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(300 * 1024 * 1024);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(
            &mut h,
            "zeros.lua",
            std::io::Read::take(std::io::repeat(0), 300 * 1024 * 1024),
        )
        .unwrap();
        b.finish().unwrap();
        drop(b);
        gz.finish().unwrap()
    };
    assert!(
        bomb.len() < 2_000_000,
        "the bomb must fit the upload limit: {}",
        bomb.len()
    );
    let cases: Vec<(&str, Vec<u8>, u16, Vec<&str>)> = vec![
        (
            "garbage",
            b"this is not an archive".to_vec(),
            422,
            vec!["not a bundle archive"],
        ),
        (
            "path traversal",
            raw_archive(&[(b"../evil.lua", tar::EntryType::Regular, b"x", None)]),
            422,
            vec!["../evil.lua", "leaves the bundle"],
        ),
        (
            "absolute path",
            raw_archive(&[(b"/tmp/evil.lua", tar::EntryType::Regular, b"x", None)]),
            422,
            vec!["absolute"],
        ),
        (
            "symlink",
            raw_archive(&[(
                b"main.lua",
                tar::EntryType::Symlink,
                b"",
                Some(b"/etc/passwd"),
            )]),
            422,
            vec!["main.lua", "links are not allowed"],
        ),
        ("bomb", bomb, 422, vec!["too large"]),
        (
            "bad document",
            tar_of(&[
                ("swagger.yaml", "swagger: '2.0'\npaths: ["),
                ("main.lua", "return {}"),
            ]),
            422,
            vec!["swagger.yaml", "not valid YAML"],
        ),
        (
            "unknown runtime",
            tar_of(&[
                ("swagger.yaml", &swagger.replace("lua", "cobol")),
                ("main.lua", ""),
            ]),
            422,
            vec!["runtime", "cobol"],
        ),
        (
            "missing handler",
            tar_of(&[
                ("swagger.yaml", swagger),
                ("main.lua", "return { other = function() end }"),
            ]),
            422,
            vec!["operationId", "go"],
        ),
        ("oversized", vec![0u8; 2_500_000], 413, vec![]),
    ];
    for (what, bytes, status, needles) in cases {
        let (s, v) = upload(&mgmt, bytes, "name=x").await;
        assert_eq!(s, status, "{what}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        for n in needles {
            assert!(msg.contains(n), "{what}: {n:?} not in {msg}");
        }
    }
    // Nothing of a refused bundle stays in the store, nothing escaped it.
    let kept: Vec<PathBuf> = std::fs::read_dir(store.join("bundles"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        kept.iter()
            .all(|p| p.file_name().unwrap().to_string_lossy().starts_with('.')),
        "{kept:?}"
    );
    assert!(!root.path().join("evil.lua").exists() && !Path::new("/tmp/evil.lua").exists());

    // A valid bundle that claims the static hello's basePath: stored, but
    // enabling it is refused naming both.
    let clash = tar_of(&[
        (
            "swagger.yaml",
            &swagger
                .replace("/x", "/hello")
                .replace("name: x", "name: clash"),
        ),
        ("main.lua", "return { go = function() return 'x' end }"),
    ]);
    let (s, v) = upload(&mgmt, clash, "").await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = post(&mgmt, "/v1/funcs/clash/enable", Value::Null).await;
    assert_eq!(s, 409, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("hello") && msg.contains("clash") && msg.contains("/hello"),
        "{msg}"
    );
    assert_eq!(
        text(&format!("http://{addr}/hello/still")).await.1,
        "Hello, still!"
    );
}

#[tokio::test]
async fn two_trons_over_rabbitmq_see_each_others_changes() {
    let root = tempfile::tempdir().unwrap();
    let broker = fresh_vhost();
    let empty = root.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    let (m1, m2) = (free_addr().to_string(), free_addr().to_string());
    let (mgmt1, mgmt2) = (format!("http://{m1}"), format!("http://{m2}"));
    let log = root.path().join("trons.log");
    let bundles = [
        "--broker",
        broker.as_str(),
        "--bundles",
        empty.to_str().unwrap(),
    ];
    let _t1 = start("tron", &root.path().join("s1"), "", &m1, &bundles, &log);
    let _t2 = start("tron", &root.path().join("s2"), "", &m2, &bundles, &log);
    let cache = root.path().join("runner-cache");
    let runner_args = [
        "--bundles",
        empty.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let mut runner = spawn("runner", &broker, &runner_args);
    let addr = free_addr().to_string();
    let _ingress = spawn("ingress", &broker, &["--listen", &addr]);
    let base = format!("http://{addr}");
    wait_ready(&format!("{mgmt1}/v1/health")).await;
    wait_ready(&format!("{mgmt2}/v1/health")).await;
    wait_ready(&format!("{base}/_funcatron/health")).await;

    // Upload and enable on Tron 1: Tron 2 adopts it (fetching the archive
    // from Tron 1) and either Tron routes it.
    let (v1_sha, v1) = hello_archive(root.path(), "Hello");
    let (s, v) = upload(&mgmt1, v1, "enable=true").await;
    assert_eq!(s, 201, "{v}");
    eventually("Tron 2 sees v1", || async {
        text_with(&format!("{mgmt2}/v1/funcs/hello"), TOKEN)
            .await
            .1
            .contains(&v1_sha)
    })
    .await;
    let blob = root.path().join(format!("s2/blobs/{v1_sha}.tar.gz"));
    assert!(
        blob.is_file(),
        "{}: {:?} {}",
        blob.display(),
        std::fs::read_dir(root.path().join("s2/blobs")).map(|d| d
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect::<Vec<_>>()),
        text_with(&format!("{mgmt2}/v1/state"), TOKEN).await.1
    );
    eventually("v1 answers through the cluster", || async {
        text(&format!("{base}/hello/you")).await.1 == "Hello, you!"
    })
    .await;

    // Upload and enable v2 on Tron 2: Tron 1 and the Runner follow.
    let (v2_sha, v2) = hello_archive(root.path(), "Yo");
    let (s, _) = upload(&mgmt2, v2, "enable=true").await;
    assert_eq!(s, 201);
    eventually("Tron 1 sees v2", || async {
        let (_, t) = text_with(&format!("{mgmt1}/v1/funcs/hello"), TOKEN).await;
        serde_json::from_str::<Value>(&t).is_ok_and(|v| v["enabled"] == v2_sha.as_str())
    })
    .await;
    // Every request now answers v2, whichever Tron routes it.
    eventually("v2 answers through the cluster", || async {
        let mut all = true;
        for _ in 0..10 {
            all &= text(&format!("{base}/hello/you")).await.1 == "Yo, you!";
        }
        all
    })
    .await;

    // A Runner that restarts asks for the state and serves v2 again.
    drop(std::mem::replace(
        &mut runner,
        spawn("runner", &broker, &runner_args),
    ));
    eventually("the restarted Runner serves v2", || async {
        text(&format!("{base}/hello/again")).await.1 == "Yo, again!"
    })
    .await;
}

#[tokio::test]
async fn a_request_routed_to_the_old_version_finishes_on_it() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let empty = root.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    let (addr, mgmt_addr) = (free_addr().to_string(), free_addr().to_string());
    let (base, mgmt) = (format!("http://{addr}"), format!("http://{mgmt_addr}"));
    let _up = start(
        "up",
        &store,
        &addr,
        &mgmt_addr,
        &["--bundles", empty.to_str().unwrap()],
        &root.path().join("up.log"),
    );
    wait_ready(&format!("{mgmt}/v1/health")).await;
    let version = |answer: &str| {
        let dir = root.path().join(format!("slow-{answer}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("swagger.yaml"),
            "swagger: '2.0'\nbasePath: /slow\nx-funcatron: {runtime: lua, name: slow}\npaths:\n  /:\n    get: {operationId: slow}\n  /fast:\n    get: {operationId: fast}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("main.lua"),
            format!("return {{\n  slow = function() local x = 0 for i = 1, 1.5e8 do x = x + i end return '{answer}' end,\n  fast = function() return '{answer}' end,\n}}\n"),
        )
        .unwrap();
        archive::build(&dir).unwrap().1
    };
    let (s, _) = upload(&mgmt, version("A"), "enable=true").await;
    assert_eq!(s, 201);
    eventually("A answers", || async {
        text(&format!("{base}/slow/fast")).await.1 == "A"
    })
    .await;
    let metrics = format!("{base}/_funcatron/metrics");
    // Routed by the Tron, or at the edge by the ingress.
    let dispatched = |m: &str| {
        m.lines()
            .filter_map(|l| {
                l.strip_prefix("tron_dispatched_total{func=\"slow\"}")
                    .or_else(|| l.strip_prefix("ingress_edge_routed_total{func=\"slow\"}"))?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .sum::<f64>()
    };
    let before = dispatched(&text(&metrics).await.1);
    // A slow call, routed to A's queue before the switch...
    let slow = tokio::spawn(text(format!("{base}/slow").leak()));
    eventually("the slow call is routed to A", || async {
        dispatched(&text(&metrics).await.1) > before
    })
    .await;
    // ...then B is enabled while A is still working on it.
    let (s, _) = upload(&mgmt, version("B"), "enable=true").await;
    assert_eq!(s, 201);
    eventually("B answers new calls", || async {
        text(&format!("{base}/slow/fast")).await.1 == "B"
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the slow call must still be running on A"
    );
    assert_eq!(
        slow.await.unwrap(),
        (200, "A".to_owned()),
        "the in-flight call finished on A"
    );
}

//! The hostile suite: one test per class of attack in the security issue,
//! each run as an attacker would, against the real `funcatron up` binary
//! (embedded ingress, Tron with its management API, Runners): a Func author
//! uploading what they like, an HTTP client sending what it likes (and,
//! for forged control messages, a Runner on RabbitMQ and another broker
//! user publishing what they like). Each
//! test fails on the code before its defence and passes after; the finer
//! cases of each class are tested beside the code (`runner/tests/lua.rs`,
//! `bundle/tests/archive.rs`, `listener/tests/limits.rs`, ...). After every
//! attack the cluster must still answer a well-behaved Func.
//!
//! See `docs/security.md` for the threat model.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::{eventually, free_addr, funcatron_logged, log_has, test_cache_dir, wait_ready, Proc};
use funcatron_bundle::archive;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "hostile-token";

struct Cluster {
    root: tempfile::TempDir,
    base: String,
    mgmt: String,
    log: std::path::PathBuf,
    _up: Proc,
}

/// `funcatron up` with a store, no bundles of its own, and `extra` flags.
async fn cluster(extra: &[&str]) -> Cluster {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    let empty = root.path().join("no-bundles");
    std::fs::create_dir_all(&empty).unwrap();
    let (addr, mgmt_addr) = (free_addr().to_string(), free_addr().to_string());
    let log = root.path().join("up.log");
    let cache = test_cache_dir();
    let mut args = vec![
        "up",
        "--store",
        store.to_str().unwrap(),
        "--mgmt-listen",
        &mgmt_addr,
        "--listen",
        &addr,
        "--bundles",
        empty.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let up = funcatron_logged(&args, TOKEN, &log);
    let (base, mgmt) = (format!("http://{addr}"), format!("http://{mgmt_addr}"));
    wait_ready(&format!("{mgmt}/v1/health")).await;
    wait_ready(&format!("{base}/_funcatron/health")).await;
    Cluster {
        root,
        base,
        mgmt,
        log,
        _up: up,
    }
}

/// A Lua Func `name` at `/name` (operation `go`), packed.
fn lua_bundle(root: &Path, name: &str, lua: &[u8], manifest: &str) -> Vec<u8> {
    let dir = root.join(format!("src-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("swagger.yaml"),
        format!("swagger: '2.0'\nbasePath: /{name}\npaths:\n  /:\n    get: {{operationId: go}}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("funcatron.yaml"),
        format!("runtime: lua\nname: {name}\n{manifest}"),
    )
    .unwrap();
    std::fs::write(dir.join("main.lua"), lua).unwrap();
    archive::build(&dir).unwrap().1
}

impl Cluster {
    async fn upload(&self, bytes: Vec<u8>) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/bundles?enable=true", self.mgmt))
            .bearer_auth(TOKEN)
            .body(bytes)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Upload and enable a Lua Func; wait until its route answers.
    async fn deploy(&self, name: &str, lua: &str, manifest: &str) {
        let bytes = lua_bundle(self.root.path(), name, lua.as_bytes(), manifest);
        let (s, v) = self.upload(bytes).await;
        assert_eq!(s, 201, "{v}");
        let url = format!("{}/{name}", self.base);
        eventually(&format!("{name} is routed"), || async {
            reqwest::get(&url).await.is_ok_and(|r| r.status() != 404)
        })
        .await;
    }

    async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let r = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        let (s, h) = (r.status().as_u16(), r.headers().clone());
        (s, h, r.text().await.unwrap())
    }

    /// The cluster still serves a well-behaved Func.
    async fn still_serves(&self) {
        self.deploy("good", "return { go = function() return 'fine' end }", "")
            .await;
        let (s, _, body) = self.get("/good").await;
        assert_eq!((s, body.as_str()), (200, "fine"));
    }
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<Value>(body).unwrap_or(Value::Null)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Class 1: precompiled Lua crashed the process that checked the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_lua_bytecode_is_refused_and_crashes_nothing() {
    let c = cluster(&[]).await;
    let mut bytecode = b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08xV".to_vec();
    bytecode.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let (s, v) = c
        .upload(lua_bundle(c.root.path(), "dumped", &bytecode, ""))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("binary"), "{v}");
    c.still_serves().await;
}

/// Class 2: the time limit escaped by pcall, coroutines and patterns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_lua_cannot_escape_its_time_limit() {
    let c = cluster(&["--workers", "2"]).await;
    let tricks = [
        ("pcalls", "while true do pcall(function() while true do end end) end"),
        (
            "coros",
            "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
        ),
        ("patterns", "return string.rep('a', 300000):find('.-.-.-.-b')"),
    ];
    for (name, body) in tricks {
        let lua = format!("return {{ go = function() {body} end }}");
        c.deploy(name, &lua, "timeout_ms: 300\n").await;
        // More stuck calls than the Runner has Lua threads. A refused
        // pattern is a Func error; why is in the log, not the answer.
        for _ in 0..3 {
            let (s, _, body) = c.get(&format!("/{name}")).await;
            assert!(
                (s == 504 && error_of(&body) == "func_timeout")
                    || (s == 500
                        && error_of(&body) == "func_error"
                        && log_has(&c.log, "too costly")),
                "{name}: {s} {body}"
            );
        }
    }
    c.still_serves().await;
}

/// Class 3: an archive whose headers announce gigabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_are_refused_before_they_cost_memory() {
    let c = cluster(&[]).await;
    // One PAX extension header announcing 1 GiB, made of one repeated byte:
    // a few MiB on the wire once compressed.
    let mut header = tar::Header::new_ustar();
    header.set_path("PaxHeader/main.lua").unwrap();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(1 << 30);
    header.set_mode(0o644);
    header.set_cksum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(header.as_bytes()).unwrap();
    let block = vec![b'a'; 1 << 20];
    for _ in 0..64 {
        gz.write_all(&block).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let (s, v) = c.upload(bomb).await;
    assert_eq!(s, 422, "{v}");
    let funcs = reqwest::Client::new()
        .get(format!("{}/v1/funcs", c.mgmt))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(funcs["funcs"], json!([]), "{funcs}");
    c.still_serves().await;
}

/// Class 4: slow and silent clients held connections for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_slow_clients_are_cut_off() {
    let c = cluster(&["--header-timeout-ms", "300", "--body-timeout-ms", "300"]).await;
    c.deploy("echo", "return { go = function(r) return r.body end }", "")
        .await;
    let addr = c.base.trim_start_matches("http://").to_owned();
    // A head that never ends: the connection is closed.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the slow head was not cut off")
        .unwrap();
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
    // A body that stops: 408 with a JSON reason.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the stalled body was not cut off")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408") && text.contains("body_timeout"),
        "{text}"
    );
    c.still_serves().await;
}

/// Class 6: an answer's own framing headers desynchronised the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_cannot_desynchronise_the_client() {
    let c = cluster(&[]).await;
    c.deploy(
        "frames",
        "return { go = function() return { status = 200, headers = { ['Content-Length'] = '1', ['TRANSFER-ENCODING'] = 'chunked', Connection = 'close', Upgrade = 'h2c' }, body = 'hello' } end }",
        "",
    )
    .await;
    let (s, h, body) = c.get("/frames").await;
    assert_eq!((s, body.as_str()), (200, "hello"));
    assert_eq!(h["content-length"], "5");
    assert!(h.get("transfer-encoding").is_none() && h.get("upgrade").is_none());
    c.deploy(
        "switch",
        "return { go = function() return { status = 101, headers = { Upgrade = 'websocket' } } end }",
        "",
    )
    .await;
    let (s, _, body) = c.get("/switch").await;
    assert_eq!(
        (s, error_of(&body).as_str()),
        (502, "malformed_reply"),
        "{body}"
    );
    c.still_serves().await;
}

/// Class 8: settings that name files outside the secrets directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_settings_cannot_name_files() {
    let c = cluster(&[]).await;
    c.deploy(
        "plain",
        "return { go = function() return env.X or 'none' end }",
        "",
    )
    .await;
    for settings in [
        json!({"secrets": ["../../etc/passwd"]}),
        json!({"env": {"A=B": "1"}}),
    ] {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/funcs/plain/enable", c.mgmt))
            .bearer_auth(TOKEN)
            .json(&json!({ "settings": settings }))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (s, v["error"].as_str()),
            (422, Some("invalid_settings")),
            "{v}"
        );
    }
    c.still_serves().await;
}

/// Error answers told a client the Func's insides: its traceback, file
/// paths, a worker's stderr. By default the answer is a generic message and
/// the detail goes to the log; the Func's `debug` setting, set on the
/// version already serving, answers in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_learn_no_internals_from_error_answers() {
    let c = cluster(&[]).await;
    c.deploy(
        "leaky",
        "return { go = function() error('boom at /secret/path') end }",
        "",
    )
    .await;
    let (s, _, body) = c.get("/leaky").await;
    assert_eq!((s, error_of(&body).as_str()), (500, "func_error"), "{body}");
    assert!(body.contains("its log has the details"), "{body}");
    for secret in ["/secret/path", "main.lua", "boom"] {
        assert!(!body.contains(secret), "{secret:?} in {body}");
    }
    eventually("the error is logged", || async {
        log_has(&c.log, "boom at /secret/path")
    })
    .await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/funcs/leaky/enable", c.mgmt))
        .bearer_auth(TOKEN)
        .json(&json!({ "settings": { "debug": true } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = &c;
    eventually("with `debug` the answer carries the error", || async move {
        let (s, _, body) = c.get("/leaky").await;
        s == 500 && body.contains("boom at /secret/path")
    })
    .await;
    c.still_serves().await;
}

/// Class 9: unbounded replies and log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_replies_and_log_lines_are_bounded() {
    let c = cluster(&["--max-reply-bytes", "1000000"]).await;
    c.deploy(
        "huge",
        "return { go = function() print('first\\nFORGED-LINE ' .. string.rep('y', 100000)) return string.rep('x', 2000000) end }",
        "",
    )
    .await;
    let (s, _, body) = c.get("/huge").await;
    assert_eq!(
        (s, error_of(&body).as_str()),
        (502, "reply_too_large"),
        "{body}"
    );
    // An exec Func's answer is capped too (its stdout is read no further
    // than the limit, the rest drained).
    let dir = c.root.path().join("src-bigout");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("swagger.yaml"),
        "swagger: '2.0'\nbasePath: /bigout\npaths:\n  /:\n    get: {operationId: go}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("funcatron.yaml"),
        "runtime: exec\nname: bigout\nhandler: run.sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("run.sh"),
        "head -c 50000000 /dev/zero | tr '\\0' x\n",
    )
    .unwrap();
    let (s, v) = c.upload(archive::build(&dir).unwrap().1).await;
    assert_eq!(s, 201, "{v}");
    eventually("bigout is routed", || async {
        reqwest::get(format!("{}/bigout", c.base))
            .await
            .is_ok_and(|r| r.status() != 404)
    })
    .await;
    let (s, _, body) = c.get("/bigout").await;
    assert_eq!(
        (s, error_of(&body).as_str()),
        (502, "reply_too_large"),
        "{body}"
    );
    eventually("the print is logged", || async {
        log_has(&c.log, "first\\nFORGED-LINE")
    })
    .await;
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED-LINE")),
        "a forged log line"
    );
    assert!(log.contains("more bytes cut"));
    assert!(
        log.lines().all(|l| l.len() < 16 * 1024),
        "an unbounded log line"
    );
    c.still_serves().await;
}

/// Another broker user publishes a registry state whose fetch URL points
/// inside the operator's network (127.0.0.2 here: loopback, and not the
/// 127.0.0.1 the test cluster allows for its Trons; in production the
/// cloud's metadata address): the Runner refuses it without connecting,
/// says why, and keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fetch_urls_cannot_reach_internal_addresses() {
    use funcatron_broker::Broker;
    use funcatron_control::state::{ClusterState, Control, FuncState};

    let root = tempfile::tempdir().unwrap();
    let empty = root.path().join("no-bundles");
    std::fs::create_dir_all(&empty).unwrap();
    let url = common::fresh_vhost();
    let log = root.path().join("runner.log");
    let cache = root.path().join("cache");
    let mut runner = funcatron_logged(
        &[
            "runner",
            "--broker",
            &url,
            "--bundles",
            empty.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        TOKEN,
        &log,
    );
    let inside = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    inside.set_nonblocking(true).unwrap();
    let mut state = ClusterState {
        revision: 7,
        origin: "forged".into(),
        ..ClusterState::default()
    };
    state.funcs.insert(
        "hello".into(),
        FuncState {
            enabled: Some(archive::sha256_hex(b"whatever")),
            ..FuncState::default()
        },
    );
    let forged = serde_json::to_vec(&Control::State {
        state,
        fetch: format!("http://{}", inside.local_addr().unwrap()),
    })
    .unwrap();
    let broker = funcatron_broker::AmqpBroker::connect(&url);
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    let topic = funcatron_control::names::CONTROL_TOPIC;
    eventually("the Runner refuses the forged fetch URL", || {
        let (broker, forged, log) = (&broker, forged.clone(), &log);
        async move {
            let _ = broker
                .broadcast(topic, funcatron_broker::Message::new(forged))
                .await;
            log_has(log, "is a loopback address")
        }
    })
    .await;
    assert!(
        matches!(inside.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the Runner connected to the internal address"
    );
    assert!(runner.alive(), "the Runner keeps running");
}

/// An exec Func `name` at `/name` running `script` (sandboxed, as `up`
/// runs every exec Func by default), packed.
fn exec_bundle(root: &Path, name: &str, script: &str) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(format!("src-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("swagger.yaml"),
        format!("swagger: '2.0'\nbasePath: /{name}\npaths:\n  /x:\n    get: {{operationId: go}}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("funcatron.yaml"),
        format!("runtime: exec\nname: {name}\nhandler: run.sh\n"),
    )
    .unwrap();
    std::fs::write(dir.join("run.sh"), script).unwrap();
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    archive::build(&dir).unwrap().1
}

impl Cluster {
    /// Upload and enable `bytes`; wait until `/name/x` answers.
    async fn deploy_archive(&self, name: &str, bytes: Vec<u8>) {
        let (s, v) = self.upload(bytes).await;
        assert_eq!(s, 201, "{v}");
        let url = format!("{}/{name}/x", self.base);
        eventually(&format!("{name} is routed"), || async {
            reqwest::get(&url).await.is_ok_and(|r| r.status() != 404)
        })
        .await;
    }
}

/// A Func author's exec Func looks for the control plane's secrets: the
/// Runner's environment (the management and read tokens are in it), its
/// command line, its processes, the store with the token file. It sees
/// none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_funcs_cannot_see_the_control_plane() {
    let c = cluster(&[]).await;
    let store = c.root.path().join("store");
    let script = format!(
        "#!/bin/sh\necho ran\nenv\ncat /proc/1/cmdline\nls /proc\ncat {0}/token {0}/read-token 2>&1\nls {0} 2>&1\nexit 0\n",
        store.display()
    );
    c.deploy_archive("peek", exec_bundle(c.root.path(), "peek", &script))
        .await;
    let (s, _, body) = c.get("/peek/x").await;
    assert_eq!(s, 200, "{body}");
    assert!(body.starts_with("ran"), "{body}");
    for secret in [
        TOKEN,
        common::TEST_READ_TOKEN,
        "FUNCATRON_TOKEN",
        "FUNCATRON_READ_TOKEN",
        "--mgmt-listen",
    ] {
        assert!(!body.contains(secret), "the Func saw {secret:?}:\n{body}");
    }
    let no_store = format!("ls: cannot access '{}'", store.display());
    assert!(body.contains(&no_store), "the Func saw the store:\n{body}");
    c.still_serves().await;
}

/// A client sends headers named like the exec runtime's request variables
/// (`Method: DELETE` would become `Http_Method`): the Func still sees the
/// real method, path and query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_cannot_pose_as_request_variables() {
    let c = cluster(&[]).await;
    let script = "#!/bin/sh\nprintf '%s|%s|%s' \"$Http_Method\" \"$Http_Path\" \"$Http_Query\"\n";
    c.deploy_archive("vars", exec_bundle(c.root.path(), "vars", script))
        .await;
    let r = reqwest::Client::new()
        .get(format!("{}/vars/x?a=1", c.base))
        .header("Method", "DELETE")
        .header("Path", "/evil")
        .header("Query", "evil=1")
        .header("Http-Method", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert_eq!(body, "GET|/vars/x|a=1");
}

/// Every read that exposes data needs a token: an HTTP client without one
/// gets 401 for the state, settings, logs, captures and bundle downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_reads_without_a_token_are_refused() {
    let c = cluster(&[]).await;
    let bytes = lua_bundle(
        c.root.path(),
        "s",
        b"return { go = function() return 'x' end }",
        "",
    );
    let (s, v) = c.upload(bytes).await;
    assert_eq!(s, 201, "{v}");
    let sha = v["sha"].as_str().unwrap().to_owned();
    let http = reqwest::Client::new();
    for path in [
        "/v1/state".to_owned(),
        "/v1/funcs".to_owned(),
        "/v1/funcs/s".to_owned(),
        "/v1/funcs/s/logs".to_owned(),
        "/v1/captures/s".to_owned(),
        format!("/v1/bundles/{sha}"),
    ] {
        let r = http.get(format!("{}{path}", c.mgmt)).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, 401, "GET {path}: {body}");
        assert_eq!(error_of(&body), "unauthorized", "GET {path}");
        let r = http
            .get(format!("{}{path}", c.mgmt))
            .bearer_auth(common::TEST_READ_TOKEN)
            .send()
            .await
            .unwrap();
        assert_ne!(r.status().as_u16(), 401, "GET {path} with the read token");
    }
}

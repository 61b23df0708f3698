//! Helpers shared by the end-to-end tests: clusters in-process or as real
//! child processes, temporary bundles, readiness waits.
#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use funcatron_broker::AnyBroker;
use funcatron_bundle::Bundle;
use funcatron_ingress::IngressOptions;
use funcatron_runner::{RunnerNode, RunnerOptions};
use funcatron_tron::{RouteTable, TronNode};
use tokio_util::sync::CancellationToken;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Copy the shipped example bundles `names` into `root`.
pub fn copy_examples(root: &Path, names: &[&str]) {
    fn copy_dir(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            let to = dst.join(p.file_name().unwrap());
            if p.is_dir() {
                copy_dir(&p, &to);
            } else {
                std::fs::copy(&p, to).unwrap();
            }
        }
    }
    for ex in names {
        copy_dir(&repo().join("func-bundles").join(ex), &root.join(ex));
    }
}

/// A cache directory for Python environments and compiled Java shared by
/// the test runs of one build (so pip and javac run once, not per test).
pub fn test_cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("funcatron-cache")
}

/// Write a bundle directory from (file name, contents) pairs.
pub fn write_bundle(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, text) in files {
        let path = dir.join(f);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// A bundles directory with the shipped examples plus a `trouble` Func whose
/// operations misbehave on purpose (loop forever, eat memory, raise).
pub fn bundles_with_trouble() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello", "petshop", "shell"]);
    write_bundle(
        root.path(),
        "trouble",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /trouble\nx-funcatron: {runtime: lua, timeout_ms: 300, memory_mb: 16}\npaths:\n  /loop:\n    get: {operationId: spin}\n  /eat:\n    get: {operationId: eat}\n  /raise:\n    get: {operationId: raise}\n  /ok:\n    get: {operationId: ok}\n  /hop:\n    get: {operationId: hop}\n  /switch:\n    get: {operationId: switch}\n",
            ),
            (
                "main.lua",
                "return {\n  spin = function() while true do end end,\n  eat = function() local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end end,\n  raise = function() error('the handler gave up') end,\n  ok = function() return 'still fine' end,\n  hop = function() return {status = 200, headers = {['Connection'] = 'close', ['Transfer-Encoding'] = 'chunked', ['Upgrade'] = 'h2c', ['TE'] = 'trailers', ['Trailer'] = 'X-A', ['Keep-Alive'] = 'timeout=1', ['Content-Length'] = '999', ['X-Kept'] = 'yes'}, body = 'short'} end,\n  switch = function() return {status = 101, headers = {['Upgrade'] = 'websocket'}} end,\n}\n",
            ),
        ],
    );
    write_bundle(
        root.path(),
        "trouble-exec",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /trouble-exec\nx-funcatron: {runtime: exec, timeout_ms: 300, memory_mb: 64}\npaths:\n  /sleep:\n    get: {operationId: sleep}\n  /fail:\n    get: {operationId: fail}\n  /hog:\n    get: {operationId: hog}\n  /small:\n    get: {operationId: small}\n",
            ),
            (
                "fn.sh",
                "case \"$FUNCATRON_OPERATION\" in\n  sleep) sleep 5.123 ;;\n  fail) echo 'disk on fire' >&2; exit 3 ;;\n  hog) dd if=/dev/zero of=/dev/null bs=200M count=1 ;;\n  small) dd if=/dev/zero of=/dev/null bs=8M count=1 2>/dev/null && echo fits ;;\nesac\n",
            ),
        ],
    );
    root
}

/// `bundles` with the Funcs named in `funcs` enabled with the `debug`
/// setting: their failures are answered in full (tracebacks, paths,
/// stderr); the others' get a generic message.
pub fn with_debug(bundles: Vec<Bundle>, funcs: &[&str]) -> Vec<Bundle> {
    let debug = funcatron_control::state::FuncSettings {
        debug: Some(true),
        ..Default::default()
    };
    bundles
        .into_iter()
        .map(|b| {
            if funcs.contains(&b.name.as_str()) {
                b.with_settings(&debug)
            } else {
                b
            }
        })
        .collect()
}

/// Does a Func failure's answer hide its detail? The generic message
/// points at the Func's log; none of `secrets` is in the body.
pub fn hides_detail(v: &serde_json::Value, secrets: &[&str]) -> bool {
    let body = v.to_string();
    v["message"]
        .as_str()
        .is_some_and(|m| m.contains("its log has the details"))
        && v["request_id"].is_string()
        && secrets.iter().all(|s| !body.contains(s))
}

/// Load bundles, panicking on any rejected one.
pub fn load(dir: &Path) -> Vec<Bundle> {
    let (bundles, errors) = Bundle::load_all(dir);
    assert!(errors.is_empty(), "{errors:?}");
    bundles
}

/// Every role in this process on one broker, HTTP on a free port.
pub struct InProcess {
    pub base: String,
    pub broker: AnyBroker,
    pub shutdown: CancellationToken,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start_in_process(
    broker: AnyBroker,
    bundles: Vec<Bundle>,
    ingress: IngressOptions,
) -> InProcess {
    let c = spawn_in_process(broker, bundles, ingress, true).await;
    wait_ready(&format!("{}/hello/ready", c.base)).await;
    c
}

/// Start the roles without waiting for them (and without a Runner when
/// `with_runner` is false).
pub async fn spawn_in_process(
    broker: AnyBroker,
    bundles: Vec<Bundle>,
    ingress: IngressOptions,
    with_runner: bool,
) -> InProcess {
    let ropts = with_runner.then(|| RunnerOptions {
        workers: 2,
        ..RunnerOptions::default()
    });
    spawn_cluster(broker, bundles, ingress, ropts).await
}

/// Start the roles with these Runner options (no Runner for `None`).
pub async fn spawn_cluster(
    broker: AnyBroker,
    bundles: Vec<Bundle>,
    ingress: IngressOptions,
    runner: Option<RunnerOptions>,
) -> InProcess {
    let shutdown = CancellationToken::new();
    RouteTable::build(&bundles).expect("the bundles route");
    let mut tron = TronNode::new(broker.clone()).bundles(bundles.clone());
    // An ingress that records async calls has a Tron applying their
    // outcomes to the same store.
    if let Some(calls) = &ingress.calls {
        tron = tron.calls(calls.clone());
    }
    tokio::spawn(tron.run(shutdown.clone()));
    if let Some(ropts) = runner {
        tokio::spawn(
            RunnerNode::new(broker.clone())
                .options(ropts)
                .bundles(bundles)
                .run(shutdown.clone()),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(funcatron_ingress::run(
        listener,
        broker.clone(),
        ingress,
        shutdown.clone(),
    ));
    InProcess {
        base: format!("http://{addr}"),
        broker,
        shutdown,
    }
}

/// Poll `url` until it answers 200 (readiness, bounded by 30 s).
pub async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(2)).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < until, "{url} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The AMQP URL tests use (`FUNCATRON_TEST_AMQP`, default local guest).
pub fn amqp_base() -> String {
    std::env::var("FUNCATRON_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl on PATH");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh RabbitMQ virtual host, so tests do not share queues.
pub fn fresh_vhost() -> String {
    let name = format!(
        "funcatron-test-{}",
        &funcatron_envelope::new_request_id()[..10]
    );
    rabbitmqctl(&["add_vhost", &name]);
    rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
    format!("{}/{}", amqp_base(), name)
}

/// A `funcatron` child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// Where its stderr goes: its tail is printed when a test fails.
    pub log: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Some(text) = self
                .log
                .as_ref()
                .and_then(|l| std::fs::read_to_string(l).ok())
            {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                eprintln!("---- the last lines of {}'s log ----\n{tail}", self.name);
            }
        }
    }
}

impl Proc {
    /// Still running (it has not exited, crashed or been killed)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The read token every process a test starts shares (peer Trons and
/// their Runners must agree on it to fetch archives from each other).
pub const TEST_READ_TOKEN: &str = "test-read-token-4242";

pub fn spawn(role: &str, broker: &str, extra: &[&str]) -> Proc {
    let log =
        std::env::temp_dir().join(format!("funcatron-test-{role}-{}.log", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .arg(role)
        .arg("--broker")
        .arg(broker)
        .args(extra)
        .env("RUST_LOG", "info")
        .env("FUNCATRON_READ_TOKEN", TEST_READ_TOKEN)
        // The test cluster's Trons are on loopback: allowed as an operator
        // allows the network its Trons are on.
        .env("FUNCATRON_ALLOW_OUTBOUND", "127.0.0.1")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    Proc {
        child,
        name: role.into(),
        log: Some(log),
    }
}

/// `rabbitmq-server -detached` with the configuration `scripts/test.sh`
/// started it with (its TLS listener), so later tests find the same broker.
pub fn rabbitmq_server() -> Command {
    let mut start = Command::new("rabbitmq-server");
    start.arg("-detached");
    let dir = std::env::var("FUNCATRON_TEST_TLS_DIR")
        .unwrap_or_else(|_| "/var/tmp/funcatron-test-tls".to_owned());
    let conf = std::path::Path::new(&dir).join("rabbitmq.conf");
    if conf.is_file() {
        start.env("RABBITMQ_CONFIG_FILE", conf);
    }
    start
}

/// Stop the RabbitMQ node and start it again (a real broker restart), then
/// wait until it accepts work.
pub fn restart_rabbitmq() {
    rabbitmqctl(&["shutdown"]);
    let started = rabbitmq_server().status().expect("rabbitmq-server on PATH");
    assert!(started.success());
    wait_rabbitmq();
}

/// Wait until the RabbitMQ node is up (bounded by 60 s).
pub fn wait_rabbitmq() {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(Instant::now() < until, "RabbitMQ did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Ingress, Tron and Runner processes on one AMQP broker.
pub struct Processes {
    pub procs: Vec<Proc>,
    pub bases: Vec<String>,
    pub broker: String,
    pub _bundles: tempfile::TempDir,
}

/// Start `trons` Trons, `runners` Runners and `ingresses` ingresses on a
/// fresh vhost, and wait until every ingress serves `/hello/ready`.
pub async fn start_processes(
    trons: usize,
    runners: usize,
    ingresses: usize,
    ingress_extra: &[&str],
) -> Processes {
    let broker = fresh_vhost();
    let bundles = bundles_with_trouble();
    let dir = bundles.path().to_str().unwrap().to_owned();
    let mut procs = Vec::new();
    for _ in 0..trons {
        procs.push(spawn("tron", &broker, &["--bundles", &dir]));
    }
    for _ in 0..runners {
        procs.push(spawn(
            "runner",
            &broker,
            &["--bundles", &dir, "--workers", "2"],
        ));
    }
    let mut bases = Vec::new();
    for _ in 0..ingresses {
        let addr = free_addr().to_string();
        let mut args = vec!["--listen", addr.as_str()];
        args.extend_from_slice(ingress_extra);
        procs.push(spawn("ingress", &broker, &args));
        bases.push(format!("http://{addr}"));
    }
    for b in &bases {
        wait_ready(&format!("{b}/hello/ready")).await;
    }
    Processes {
        procs,
        bases,
        broker,
        _bundles: bundles,
    }
}

/// nginx with the Lua ingress, configured by `funcatron nginx-config`,
/// stopped with SIGTERM on drop (so its workers exit with it).
pub struct Nginx {
    pub base: String,
    pub prefix: tempfile::TempDir,
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Nginx {
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Start nginx (two workers) in front of `broker`, and wait until every
/// worker consumes its reply queue.
pub async fn start_nginx(broker: &str, extra: &[&str]) -> Nginx {
    let prefix = tempfile::tempdir().unwrap();
    let addr = free_addr().to_string();
    let conf = prefix.path().join("nginx.conf");
    let lua_dir = repo().join("ingress-lua/lib");
    let out = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args([
            "nginx-config",
            "--broker",
            broker,
            "--listen",
            &addr,
            "--workers",
            "2",
            "--log-level",
            "info",
        ])
        .arg("--prefix")
        .arg(prefix.path())
        .arg("--lua-dir")
        .arg(&lua_dir)
        .arg("--out")
        .arg(&conf)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nginx-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = Command::new("nginx")
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx on PATH (./scripts/test.sh installs it)");
    let nginx = Nginx {
        base: format!("http://{addr}"),
        prefix,
        child,
    };
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client
            .get(format!("{}/_funcatron/health", nginx.base))
            .send()
            .await
        {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                if v["workers_ready"] == v["workers"] && v["workers"].as_u64() > Some(0) {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < until,
            "nginx never became ready; see {}/logs/error.log",
            nginx.prefix.path().display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nginx
}

/// Send `n` hello requests at once, spread over `bases`, each with its own
/// `X-Request-Id`, and check every one gets its own answer and id back.
pub async fn each_request_gets_its_own_answer(bases: &[String], n: usize) {
    let http = reqwest::Client::new();
    let calls = (0..n).map(|i| {
        let http = http.clone();
        let url = format!("{}/hello/n{i}", bases[i % bases.len()]);
        async move {
            let r = http
                .get(url)
                .header("x-request-id", format!("req-{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["x-request-id"], format!("req-{i}").as_str());
            (i, r.text().await.unwrap())
        }
    });
    for (i, text) in futures::future::join_all(calls).await {
        assert_eq!(text, format!("Hello, n{i}!"));
    }
}

/// Take `n` messages off the dead-letter queue (acking them), check they came
/// from the request queue, and return their reasons, sorted.
pub async fn dead_letter_reasons(broker: &impl funcatron_broker::Broker, n: usize) -> Vec<String> {
    use funcatron_broker::{ConsumeOptions, QueueKind};
    use funcatron_control::{headers, names};
    let mut dead = broker
        .consume(
            names::DEAD_LETTERS,
            QueueKind::Work,
            ConsumeOptions {
                prefetch: 10,
                auto_ack: false,
            },
        )
        .await
        .unwrap();
    let mut reasons = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(15), dead.next())
            .await
            .expect("a dead letter")
            .unwrap();
        assert_eq!(
            d.message.header(headers::DEAD_SOURCE),
            Some(names::REQUESTS)
        );
        reasons.push(
            d.message
                .header(headers::DEAD_REASON)
                .unwrap_or_default()
                .to_owned(),
        );
        d.ack().await.unwrap();
    }
    reasons.sort();
    reasons
}

/// A `funcatron ingress` process on a free port, ready (health 200).
pub async fn spawn_ingress(broker: &str, extra: &[&str]) -> (Proc, String) {
    let addr = free_addr().to_string();
    let mut args = vec!["--listen", addr.as_str()];
    args.extend_from_slice(extra);
    let proc = spawn("ingress", broker, &args);
    let base = format!("http://{addr}");
    wait_ready(&format!("{base}/_funcatron/health")).await;
    (proc, base)
}

/// `funcatron ARGS` with `FUNCATRON_TOKEN=token` (and the shared read
/// token, loopback allowed outbound) and `RUST_LOG=info`, its
/// stderr appended to `log`; killed when dropped.
pub fn funcatron_logged(args: &[&str], token: &str, log: &Path) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args(args)
        .env("FUNCATRON_TOKEN", token)
        .env("FUNCATRON_READ_TOKEN", TEST_READ_TOKEN)
        // Its Trons are on loopback (see `spawn`).
        .env("FUNCATRON_ALLOW_OUTBOUND", "127.0.0.1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Proc {
        child,
        name: args.first().copied().unwrap_or_default().into(),
        log: Some(log.to_path_buf()),
    }
}

/// `funcatron up` serving `bundles` with its store in `store`, on free
/// ports: its ingress at `base`, its management API at `mgmt`.
pub struct UpCmd {
    pub args: Vec<String>,
    pub base: String,
    pub mgmt: String,
}

impl UpCmd {
    pub fn new(bundles: &Path, store: &Path) -> Self {
        let (listen, mgmt) = (free_addr().to_string(), free_addr().to_string());
        let args = [
            "up",
            "--bundles",
            bundles.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--listen",
            &listen,
            "--mgmt-listen",
            &mgmt,
        ];
        UpCmd {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            base: format!("http://{listen}"),
            mgmt: format!("http://{mgmt}"),
        }
    }

    /// Start it with `token` as its admin token, its log in `log`.
    pub fn spawn(&self, token: &str, log: &Path) -> Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        funcatron_logged(&args, token, log)
    }
}

/// Poll until `f` holds (bounded by 30 s), for changes another process makes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < until, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `url`: (status, body), or (0, the error).
pub async fn text(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// GET `url` with the bearer `token` (management reads need one): (status,
/// body), or (0, the error).
pub async fn text_with(url: &str, token: &str) -> (u16, String) {
    match reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// Does the file `log` contain `needle` yet?
pub fn log_has(log: &Path, needle: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle))
}

/// What a callback receiver got.
pub struct Got {
    pub headers: axum::http::HeaderMap,
    pub body: bytes::Bytes,
}

/// A callback receiver on `addr` (`POST /hook`) that answers 200 and
/// hands each POST over.
pub async fn receiver(
    addr: SocketAddr,
) -> (tokio::sync::mpsc::UnboundedReceiver<Got>, CancellationToken) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Got { headers, body });
                "thanks"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    (rx, stop)
}

/// Poll until `f` holds, bounded by `limit` (for waits longer than
/// [`eventually`]'s 30 s: thousands of calls draining).
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < until, "never (in {limit:?}): {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PostgreSQL server tests use (`FUNCATRON_TEST_POSTGRES`, which
/// `scripts/test.sh` sets; the same default as `store/tests/postgres.rs`).
pub fn postgres_base() -> String {
    std::env::var("FUNCATRON_TEST_POSTGRES").unwrap_or_else(|_| {
        "postgres://funcatron:funcatron@127.0.0.1:5432/funcatron_test".to_owned()
    })
}

/// A PostgreSQL schema of one test's own, dropped (with its records) when
/// this is dropped; `url` is the server's URL with that schema as the
/// search path, so every process given it keeps its records there.
pub struct PgSchema {
    pub url: String,
    pub name: String,
    base: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = psql(
            &self.base,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

/// Run one SQL statement with `psql` (installed with the server).
fn psql(url: &str, sql: &str) -> std::io::Result<std::process::Output> {
    Command::new("psql")
        .arg(url)
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
}

/// A fresh schema on the test server (fails, not skips, when unreachable).
pub fn fresh_pg_schema() -> PgSchema {
    let base = postgres_base();
    let name = format!(
        "test_{}",
        funcatron_envelope::new_request_id()[..12].to_ascii_lowercase()
    );
    let out = psql(&base, &format!("CREATE SCHEMA {name}")).expect("psql on PATH");
    assert!(
        out.status.success(),
        "PostgreSQL at FUNCATRON_TEST_POSTGRES is unreachable or refused a schema (run scripts/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sep = if base.contains('?') { '&' } else { '?' };
    PgSchema {
        url: format!("{base}{sep}options=-c%20search_path%3D{name}"),
        name,
        base,
    }
}

/// (messages ready, unacknowledged) of every queue of a RabbitMQ virtual
/// host (the last part of `broker`), by name.
pub fn queue_depths(broker: &str) -> Vec<(String, u64, u64)> {
    let vhost = broker.rsplit('/').next().unwrap();
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "--quiet",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl on PATH");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let c: Vec<_> = l.split_whitespace().collect();
            match c.as_slice() {
                [name, ready, unacked] => Some((
                    (*name).to_owned(),
                    ready.parse().ok()?,
                    unacked.parse().ok()?,
                )),
                _ => None,
            }
        })
        .collect()
}

/// Poll an ingress's health until it routes at the edge by a table (direct
/// routes are known only there), bounded by 30 s.
pub async fn wait_edge_table(base: &str) {
    let http = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let h: serde_json::Value = http
            .get(format!("{base}/_funcatron/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["edge_table_revision"].is_u64() {
            return;
        }
        assert!(
            Instant::now() < until,
            "no route table reached the ingress: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` bytes that are not all alike, in pieces of `piece`.
pub fn pieces(n: usize, piece: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut x: u32 = 0x9e37_79b9;
    let mut left = n;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let len = piece.min(left);
        left -= len;
        Some(
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect(),
        )
    })
}

/// Read server-sent events from `stream` until one whole event (ending in
/// a blank line) is in `buf`; return its text (`None`: the answer ended).
pub async fn next_event(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
) -> Option<String> {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let event = buf[..end].to_owned();
            buf.drain(..end + 2);
            return Some(event);
        }
        let piece = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(stream))
            .await
            .expect("the next event never came")?
            .unwrap();
        buf.push_str(std::str::from_utf8(&piece).unwrap());
    }
}

/// An answer's status, every `Server-Timing` value joined, and its body.
pub async fn text_and_timing(r: reqwest::Response) -> (u16, String, String) {
    let timing = r
        .headers()
        .get_all("server-timing")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(", ");
    (r.status().as_u16(), timing, r.text().await.unwrap())
}

/// A Lua Func `fail` (`POST /fail/`, may be a chain stage) that answers
/// 422 `{"why": "no <body>"}`: the failing step of chain and flow tests.
pub fn write_failing_func(root: &Path) -> PathBuf {
    write_bundle(
        root,
        "fail",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\ninfo: {title: fail, version: '1'}\nbasePath: /fail\nx-funcatron: {name: fail, runtime: lua, chain: true}\npaths:\n  /:\n    post: {operationId: run, consumes: ['*/*'], responses: {'200': {description: ok}}}\n",
            ),
            (
                "main.lua",
                "return { run = function(r) return { status = 422, headers = { ['content-type'] = 'application/json' }, body = json.encode({ why = 'no ' .. r.body }) } end }",
            ),
        ],
    )
}

/// `funcatron ARGS` against the management API at `mgmt` (a URL) with
/// `token`: whether it succeeded, and its stdout then stderr.
pub fn cli_with(args: &[&str], mgmt: &str, token: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args(args)
        .env("FUNCATRON_TRON_URL", mgmt)
        .env("FUNCATRON_TOKEN", token)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

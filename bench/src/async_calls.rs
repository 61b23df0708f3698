//! Asynchronous calls (issue 15's performance rows), on one broker:
//!
//! (e) async submissions per second (each answered 202 once its record is
//!     written and the broker confirmed it) against sync requests per
//!     second, on the same Func at concurrency 64;
//! (f) draining 10,000 queued async calls (queued while no Runner runs,
//!     then a Runner starts), 1% of them failing their first attempt and
//!     retried after the policy's backoff: calls/s from the Runner's start
//!     to the last final state, and that none was lost or stuck;
//! (g) sync p99 at concurrency 8 while (f) drains, against the same load
//!     with no async backlog (idle).
//!
//! (h) the time from a submission (its 202) to its callback's arrival at a
//!     receiver in this process, p50/p99, one call at a time, against a
//!     sync call's p50 at concurrency 1 (target within 2x).
//!
//! Ingress, Tron and Runner run in this process, each with its own broker
//! handle, and share one [`Calls`] (`--calls-store`, default in memory).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use funcatron_broker::{AnyBroker, Broker};
use funcatron_bundle::Bundle;
use funcatron_calls::{CallState, Calls};
use funcatron_store::{AnyStore, Store};
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{connect, drive, row, stats, Conn, Stats};

/// Calls queued for the drain row.
pub const DRAIN_CALLS: usize = 10_000;
/// Sync callers during the drain and in the idle run it is compared with.
const SYNC_CONCURRENCY: usize = 8;
/// Sync requests of the idle run.
const IDLE_REQUESTS: usize = 4_000;

const DOC: &str = r#"swagger: '2.0'
info: {title: bench async, version: '1'}
basePath: /bench-async
x-funcatron:
  name: bench-async
  runtime: lua
  async: {retries: 2, backoff_initial_ms: 100, backoff_factor: 2.0, backoff_max_ms: 1000CONCURRENCY}
paths:
  /work: {post: {operationId: work, responses: {'200': {description: ok}}}}
"#;

/// A call fails its first attempt when the sum of its id's bytes is a
/// multiple of 100 (about 1% of calls); sync requests never fail.
const LUA: &str = r#"return {
  work = function(r)
    local id = r.headers['x-funcatron-call-id']
    if id and r.headers['x-funcatron-attempt'] == '1' then
      local sum = 0
      for i = 1, #id do sum = sum + string.byte(id, i) end
      if sum % 100 == 0 then return {status = 503, body = 'failing once'} end
    end
    return 'done'
  end,
}"#;

/// Does the Func fail this call's first attempt? (As [`LUA`] decides.)
fn fails_once(call_id: &str) -> bool {
    call_id.bytes().map(u32::from).sum::<u32>() % 100 == 0
}

/// Ingress and Tron with a state store, and a Runner that can be stopped
/// and started again.
struct AsyncPath {
    addr: SocketAddr,
    make: Box<dyn Fn() -> AnyBroker>,
    bundle: Bundle,
    calls: Calls,
    store: AnyStore,
    /// The ingress's broker handle, for queue depths.
    broker: AnyBroker,
    stop: CancellationToken,
    runner: Option<(CancellationToken, JoinHandle<()>)>,
    _dir: tempfile::TempDir,
}

impl AsyncPath {
    async fn start(
        make: Box<dyn Fn() -> AnyBroker>,
        store: &str,
        concurrency: Option<u16>,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let bdir = dir.path().join("bench-async");
        std::fs::create_dir_all(&bdir)?;
        let concurrency = concurrency.map_or(String::new(), |n| format!(", concurrency: {n}"));
        std::fs::write(
            bdir.join("swagger.yaml"),
            DOC.replace("CONCURRENCY", &concurrency),
        )?;
        std::fs::write(bdir.join("main.lua"), LUA)?;
        let bundle = Bundle::load(&bdir).context("the bench-async bundle")?;
        let store = AnyStore::open(store)
            .await
            .with_context(|| format!("the state store {store}"))?;
        let calls = Calls::new(store.clone());
        let (tron, ingress) = (make(), make());
        for b in [&tron, &ingress] {
            if let AnyBroker::Amqp(a) = b {
                anyhow::ensure!(
                    a.wait_connected(Duration::from_secs(10)).await,
                    "cannot reach RabbitMQ"
                );
            }
        }
        let stop = CancellationToken::new();
        tokio::spawn(
            funcatron_tron::TronNode::new(tron)
                .bundles(vec![bundle.clone()])
                .calls(calls.clone())
                .callbacks_to(funcatron_control::outbound::OutboundPolicy::new(&[
                    "127.0.0.1",
                ])?)
                .run(stop.clone()),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(funcatron_ingress::run(
            listener,
            ingress.clone(),
            funcatron_ingress::IngressOptions {
                calls: Some(calls.clone()),
                ..Default::default()
            },
            stop.clone(),
        ));
        let mut path = AsyncPath {
            addr,
            make,
            bundle,
            calls,
            store,
            broker: ingress,
            stop,
            runner: None,
            _dir: dir,
        };
        path.start_runner().await?;
        let conn = tokio::sync::Mutex::new(connect(addr).await?);
        // Ready when a call is answered and the ingress routes at the edge.
        let health = format!("http://{addr}/_funcatron/health");
        for _ in 0..400 {
            let edge = match reqwest::get(&health).await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["edge_table_revision"].is_u64()),
                Err(_) => false,
            };
            if !edge {
                tokio::time::sleep(Duration::from_millis(25)).await;
                continue;
            }
            if let Ok((200, _)) = post(&conn, addr, &[]).await {
                return Ok(path);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("the async path never became ready")
    }

    async fn start_runner(&mut self) -> Result<()> {
        let broker = (self.make)();
        if let AnyBroker::Amqp(a) = &broker {
            anyhow::ensure!(
                a.wait_connected(Duration::from_secs(10)).await,
                "cannot reach RabbitMQ"
            );
        }
        let stop = self.stop.child_token();
        let task = tokio::spawn(
            funcatron_runner::RunnerNode::new(broker)
                .bundles(vec![self.bundle.clone()])
                .run(stop.clone()),
        );
        let task = tokio::spawn(async move {
            let _ = task.await;
        });
        self.runner = Some((stop, task));
        Ok(())
    }

    /// Stop the Runner and wait until it has let go of its messages.
    async fn stop_runner(&mut self) -> Result<()> {
        if let Some((stop, task)) = self.runner.take() {
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .context("the Runner did not stop")??;
        }
        Ok(())
    }

    /// Calls not final yet: queued or running.
    async fn queued(&self) -> Result<u64> {
        let mut n = 0;
        for state in [CallState::Queued, CallState::Running] {
            n += self
                .store
                .count(funcatron_calls::COLLECTION, None, Some(state.as_str()))
                .await?;
        }
        Ok(n)
    }

    /// Wait (bounded) until the store has no queued call left.
    async fn drained(&self, limit: Duration) -> Result<bool> {
        let until = Instant::now() + limit;
        while self.queued().await? > 0 {
            if Instant::now() > until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(true)
    }
}

/// POST /bench-async/work with `headers`: (status, the call id when 202).
async fn post(
    conn: &tokio::sync::Mutex<Conn>,
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<(u16, Option<String>)> {
    let mut send = conn.lock().await;
    if send.ready().await.is_err() {
        *send = connect(addr).await?;
    }
    let mut req =
        hyper::Request::post(format!("http://{addr}/bench-async/work")).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(Empty::<Bytes>::new())?).await?;
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-call-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status == 200 || status == 202,
        "bad answer {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok((status, id))
}

async fn conns(addr: SocketAddr, n: usize) -> Result<Arc<Vec<tokio::sync::Mutex<Conn>>>> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::sync::Mutex::new(connect(addr).await?));
    }
    Ok(Arc::new(v))
}

/// `total` calls with `headers` from `concurrency` callers, each checked
/// (200 sync, 202 async); the call ids of the 202s.
async fn load(
    addr: SocketAddr,
    concurrency: usize,
    total: usize,
    headers: &'static [(&'static str, &'static str)],
) -> Result<(Stats, Vec<String>)> {
    let conns = conns(addr, concurrency).await?;
    let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ids2 = Arc::clone(&ids);
    let s = drive(concurrency, total, move |worker| {
        let (conns, ids) = (Arc::clone(&conns), Arc::clone(&ids2));
        async move {
            let (status, id) = post(&conns[worker % conns.len()], addr, headers).await?;
            let want = if headers.is_empty() { 200 } else { 202 };
            anyhow::ensure!(status == want, "answered {status}, not {want}");
            if let Some(id) = id {
                ids.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(id);
            }
            Ok(())
        }
    })
    .await?;
    let ids = std::mem::take(&mut *ids.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok((s, ids))
}

/// Sync requests from `concurrency` callers until `done`: their stats and
/// how many were not answered 200.
async fn sync_until(
    addr: SocketAddr,
    concurrency: usize,
    done: Arc<AtomicBool>,
) -> Result<(Stats, u64)> {
    let conns = conns(addr, concurrency).await?;
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (conns, done, failed) = (Arc::clone(&conns), Arc::clone(&done), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                match post(&conns[worker], addr, &[]).await {
                    Ok((200, _)) => lat.push(t.elapsed().as_micros() as u64),
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    anyhow::ensure!(!all.is_empty(), "no sync request was answered");
    Ok((
        stats(all, started.elapsed()),
        failed.load(Ordering::Relaxed),
    ))
}

/// What draining a backlog found.
struct Drain {
    /// Calls queued (the warm-up's with them).
    calls: usize,
    secs: f64,
    finished: bool,
    succeeded: usize,
    retried: usize,
    lost: usize,
    stuck: usize,
    wrong: usize,
}

/// Queue [`DRAIN_CALLS`] calls with no Runner, start one, and time it
/// until every call is final, with sync load meanwhile.
async fn drain(path: &mut AsyncPath) -> Result<(Drain, Stats, u64)> {
    path.stop_runner().await?;
    let queue = funcatron_control::names::func_async_queue(&path.bundle.name, &path.bundle.version);
    let before = path
        .broker
        .depth(&queue)
        .await
        .map(|d| d.ready)
        .unwrap_or(0);
    let (_, ids) = load(path.addr, 64, DRAIN_CALLS, &[("prefer", "respond-async")]).await?;
    // Every call routed into the async queue before the Runner starts.
    let until = Instant::now() + Duration::from_secs(60);
    while path.broker.depth(&queue).await?.ready < before + ids.len() as u64 {
        anyhow::ensure!(Instant::now() < until, "the calls never reached {queue}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    path.start_runner().await?;
    let sync = tokio::spawn(sync_until(path.addr, SYNC_CONCURRENCY, Arc::clone(&done)));
    let finished = path.drained(Duration::from_secs(300)).await?;
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let (during, failed) = sync.await??;
    let mut d = Drain {
        calls: ids.len(),
        secs,
        finished,
        succeeded: 0,
        retried: 0,
        lost: 0,
        stuck: 0,
        wrong: 0,
    };
    for id in &ids {
        match path.calls.get(id).await? {
            None => d.lost += 1,
            Some(c) if !c.state.is_final() => d.stuck += 1,
            Some(c) => {
                let statuses: Vec<u16> = c.attempts.iter().map(|a| a.status).collect();
                let want: &[u16] = if fails_once(id) { &[503, 200] } else { &[200] };
                if c.state == CallState::Succeeded && statuses == want {
                    d.succeeded += 1;
                } else {
                    d.wrong += 1;
                }
                d.retried += usize::from(statuses.len() > 1);
            }
        }
    }
    Ok((d, during, failed))
}

/// Calls of the callback row.
const CALLBACK_CALLS: usize = 500;

/// (h): one call at a time, from its submission to its callback's arrival
/// at a receiver here; and sync calls at concurrency 1 to compare.
async fn callback_latency(path: &AsyncPath) -> Result<(Stats, Stats)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let tx = tx.clone();
            async move {
                let at = Instant::now();
                if let Some(id) = headers.get("x-call-id").and_then(|v| v.to_str().ok()) {
                    let _ = tx.send((id.to_owned(), at));
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    let stop = path.stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    let conn = tokio::sync::Mutex::new(connect(path.addr).await?);
    let headers = [
        ("prefer", "respond-async"),
        ("x-callback-url", hook.as_str()),
    ];
    let mut lat = Vec::with_capacity(CALLBACK_CALLS);
    let started = Instant::now();
    for i in 0..CALLBACK_CALLS + 20 {
        let t0 = Instant::now();
        let (_, id) = post(&conn, path.addr, &headers).await?;
        let id = id.context("a 202 without x-call-id")?;
        loop {
            let (got, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("no callback within 30 s")?
                .context("the receiver stopped")?;
            if got == id {
                // The first 20 warm up.
                if i >= 20 {
                    lat.push(at.duration_since(t0).as_micros() as u64);
                }
                break;
            }
        }
    }
    let cb = stats(lat, started.elapsed());
    let sync1 = load(path.addr, 1, CALLBACK_CALLS, &[]).await?.0;
    Ok((cb, sync1))
}

/// How the async rows run.
pub struct Options<'a> {
    /// The state store (`memory:`, a path, `postgres://`).
    pub store: &'a str,
    /// Requests of each c=64 row.
    pub requests: usize,
    /// The Func's async concurrency (the policy's `concurrency`; default:
    /// the Runner's prefetch).
    pub concurrency: Option<u16>,
}

/// Runs of the ratio rows (e) and (h); their medians are the figures
/// (they move by 10-20% from run to run on a 2-core machine).
const REPEATS: usize = 3;

/// The middle of `v` (its length odd), and `v` as measured.
fn median(mut v: Vec<f64>) -> (f64, String) {
    let listed = v
        .iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    v.sort_by(f64::total_cmp);
    (v.get(v.len() / 2).copied().unwrap_or(f64::NAN), listed)
}

/// The async rows on the broker `make` gives (`label`: which broker).
pub async fn run(label: &str, make: Box<dyn Fn() -> AnyBroker>, o: &Options<'_>) -> Result<()> {
    let requests = o.requests;
    let mut path = AsyncPath::start(make, o.store, o.concurrency).await?;
    let mut throughput = Vec::with_capacity(REPEATS);
    for n in 1..=REPEATS {
        let sync64 = load(path.addr, 64, requests, &[]).await?.0;
        row(&format!("(e) sync, {label}, c=64, run {n}"), sync64);
        let (async64, _) = load(path.addr, 64, requests, &[("prefer", "respond-async")]).await?;
        row(
            &format!("(e) async submissions (202), {label}, c=64, run {n}"),
            async64,
        );
        throughput.push(async64.rps / sync64.rps);
        // Let the submissions drain before the next row.
        anyhow::ensure!(
            path.drained(Duration::from_secs(300)).await?,
            "the submitted calls never finished"
        );
    }
    let idle = load(path.addr, SYNC_CONCURRENCY, IDLE_REQUESTS, &[])
        .await?
        .0;
    row(&format!("(g) sync, idle, {label}, c=8"), idle);
    let (d, during, failed) = drain(&mut path).await?;
    row(&format!("(g) sync, during the drain, {label}, c=8"), during);
    let (mut callback, mut cb_p99) = (Vec::with_capacity(REPEATS), Vec::new());
    for n in 1..=REPEATS {
        let (cb, sync1) = callback_latency(&path).await?;
        row(&format!("(h) sync, {label}, c=1, run {n}"), sync1);
        row(
            &format!("(h) submission to callback, {label}, c=1, run {n}"),
            cb,
        );
        callback.push(cb.p50_ms / sync1.p50_ms);
        cb_p99.push(cb.p99_ms);
    }
    path.stop.cancel();
    println!(
        "(f) drain of {} queued calls, {label}: {:.0} calls/s ({:.2} s); \
         {} succeeded ({} retried once), {} lost, {} stuck, {} wrong{}",
        d.calls,
        d.calls as f64 / d.secs,
        d.secs,
        d.succeeded,
        d.retried,
        d.lost,
        d.stuck,
        d.wrong,
        if d.finished {
            ""
        } else {
            " (NOT FINISHED in 300 s)"
        }
    );
    let (tp, tp_runs) = median(throughput);
    println!(
        "async/sync throughput at c=64, {label}: {tp:.2}   (target >= 1.00; median of {REPEATS} runs: {tp_runs})"
    );
    println!(
        "sync p99 during the drain / idle, {label}: {:.2}x  (target <= 2x; {failed} sync requests not answered 200)",
        during.p99_ms / idle.p99_ms
    );
    let (cb, cb_runs) = median(callback);
    let (_, p99_runs) = median(cb_p99);
    println!(
        "callback p50 / sync p50 at c=1, {label}: {cb:.2}x  (target <= 2x; median of {REPEATS} runs: {cb_runs}; callback p99 ms: {p99_runs})"
    );
    Ok(())
}

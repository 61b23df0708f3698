//! `funcatron-bench`: what the Funcatron path costs over a bare broker round
//! trip, measured in one run on one machine.
//!
//! (a) raw AMQP request/reply: a lapin client publishes (with confirm) to a
//!     queue, an echo consumer publishes the payload back (with confirm) to
//!     the client's exclusive reply queue and then acks: the same delivery
//!     guarantees as Funcatron's hops, with no Funcatron in between;
//! (b) the full path over the same RabbitMQ: HTTP -> embedded ingress ->
//!     request queue -> Tron -> Func queue -> Runner (hello, Lua) -> reply
//!     queue -> ingress -> HTTP;
//! (c) the full path on the embedded broker (`funcatron up`);
//! (d) the full path over RabbitMQ through the production nginx + Lua
//!     ingress instead of the embedded one (same Tron and Runner as (b)).
//!
//! Each at concurrency 1 and 64 (keep-alive HTTP/1.1 connections, one per
//! concurrent caller), printing requests/s, p50 and p99, and the ratios.
//!
//! With `--runtimes`: warm worker processes (Python, Node.js, Java) against
//! starting a process per request for the same code, see [`runtimes`].
//! With `--switch`: time to the first answer of a new version after
//! `bundle push --enable` and after a save in dev mode, see [`switch`].
//! With `--capture`: throughput with capture off and on, see [`switch::capture`].
//!
//! Then the speed rows (h)-(l), see [`speed`]: `funcatron up` and nginx
//! `return 200` under wrk, 1 Func against 100, 1 GiB through direct mode
//! with each process's peak RSS, server-sent events, idle RSS.
//!
//! After (a)-(d), the chain rows (m), see [`chains`]; `--chains-only` runs
//! just them.
//!
//! After those rows, the asynchronous calls' rows (e)-(g) on the embedded
//! broker and (unless `--embedded-only`) on RabbitMQ, see [`async_calls`];
//! `--async-only` runs just them.
//!
//! With `--documents`: the document store's writes with their events and
//! the outbox drained, embedded and on PostgreSQL, rows (n), see
//! [`documents`] (not part of the default run).
//!
//! With `--triggers`: document write -> triggered Func start on RabbitMQ
//! and the embedded broker, rows (t), see [`triggers`] (not part of the
//! default run).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use dashmap::DashMap;
use funcatron_broker::{AmqpBroker, AnyBroker, EmbeddedBroker};
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Raw AMQP round trip vs the full Funcatron path vs the embedded broker")]
struct Args {
    /// RabbitMQ to measure against.
    #[arg(
        long,
        env = "FUNCATRON_BENCH_AMQP",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp: String,
    /// Requests per measurement at concurrency 64 (a tenth at concurrency 1).
    #[arg(long, default_value_t = 40_000)]
    requests: usize,
    /// Skip the RabbitMQ measurements (embedded only).
    #[arg(long)]
    embedded_only: bool,
    /// Bundles directory (the hello Func is called).
    #[arg(long, default_value = "func-bundles")]
    bundles: PathBuf,
    /// Skip the nginx ingress measurement.
    #[arg(long)]
    no_nginx: bool,
    /// Measure the Func runtimes instead: warm Python, Node.js, Java (and
    /// Lua) against starting a process per request, on the embedded path.
    #[arg(long)]
    runtimes: bool,
    /// Measure version switches instead: `bundle push --enable` and a dev
    /// mode save to the first new answer (needs `cargo build --release`).
    #[arg(long)]
    switch: bool,
    /// Measure the cost of capture instead: full-path throughput with
    /// capture off and capturing 100% of one Func (needs `cargo build --release`).
    #[arg(long)]
    capture: bool,
    /// Measure the autoscaler instead, on RabbitMQ (`--amqp`) with the
    /// process substrate: zero Runners to the first answer (Lua, Python),
    /// and a load step's time to the first scale decision and until the
    /// backlog is drained (needs `cargo build --release`).
    #[arg(long)]
    autoscale: bool,
    /// Run only the asynchronous calls' rows (e)-(g).
    #[arg(long)]
    async_only: bool,
    /// Run only the speed rows (h)-(l): `up` and nginx under wrk, 100
    /// Funcs, 1 GiB in direct mode, server-sent events, idle RSS (needs
    /// `cargo build --release` and wrk).
    #[arg(long)]
    speed_only: bool,
    /// Skip the speed rows (h)-(l).
    #[arg(long)]
    no_speed: bool,
    /// Run only the chain rows (m): a 3-stage chain against the three
    /// calls one after another.
    #[arg(long)]
    chains_only: bool,
    /// State store of the asynchronous calls' rows (`memory:`, a path, or
    /// `postgres://...`).
    #[arg(long, default_value = "memory:")]
    calls_store: String,
    /// The async rows' Func's async concurrency (its policy's
    /// `concurrency`); default: the Runner's prefetch (64).
    #[arg(long)]
    async_concurrency: Option<u16>,
    /// Measure the document store instead, rows (n): writes with their
    /// events from 1 and 64 writers, embedded and on PostgreSQL, and the
    /// outbox drained.
    #[arg(long, alias = "documents-only")]
    documents: bool,
    /// Writes of each embedded document row.
    #[arg(long, default_value_t = 5_000)]
    documents_writes: usize,
    /// Writes of each PostgreSQL document row.
    #[arg(long, default_value_t = 2_000)]
    documents_postgres_writes: usize,
    /// PostgreSQL for the document rows (a table of the run's own, dropped
    /// after); none: only the embedded rows.
    #[arg(long, env = "FUNCATRON_TEST_POSTGRES")]
    documents_postgres: Option<String>,
    /// Measure triggers instead, rows (t): document write -> triggered
    /// Func start, on RabbitMQ and the embedded broker.
    #[arg(long, alias = "triggers-only")]
    triggers: bool,
    /// Writes of each trigger row.
    #[arg(long, default_value_t = 300)]
    trigger_samples: usize,
}

mod async_calls;
mod autoscale;
mod chains;
mod documents;
mod runtimes;
mod speed;
mod switch;
mod triggers;

/// nginx with the Lua ingress, stopped (with its workers) on drop.
struct Nginx {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _prefix: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

async fn start_nginx(amqp: &str) -> Result<Nginx> {
    let prefix = tempfile::tempdir()?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let conf = funcatron_ingress::nginx::render(&funcatron_ingress::nginx::NginxConfig {
        broker: amqp.to_owned(),
        listen: addr.to_string(),
        prefix: prefix.path().to_owned(),
        lua_dir: PathBuf::from("ingress-lua/lib"),
        workers: "auto".into(),
        timeout_ms: 30_000,
        max_body_bytes: 10 * 1024 * 1024,
        load_modules: true,
        log_level: "error".into(),
        routing: funcatron_ingress::edge::Routing::Edge,
    })?;
    let path = prefix.path().join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = std::process::Command::new("nginx")
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .spawn()
        .context("starting nginx (apt-get install nginx libnginx-mod-http-lua lua-cjson)")?;
    let nginx = Nginx {
        child,
        addr,
        _prefix: prefix,
    };
    // Ready when every worker consumes its reply queue and holds a table.
    for _ in 0..400 {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(io).await {
                tokio::spawn(conn);
                let req = hyper::Request::get(format!("http://{addr}/_funcatron/health"))
                    .header("host", "localhost")
                    .body(Empty::<Bytes>::new())?;
                if let Ok(resp) = send.send_request(req).await {
                    let body = resp.into_body().collect().await?.to_bytes();
                    let text = String::from_utf8_lossy(&body);
                    let count = |k: &str| {
                        text.split(&format!("\"{k}\":"))
                            .nth(1)
                            .and_then(|r| r.split([',', '}']).next())
                            .map(str::to_owned)
                    };
                    // And every worker routes at the edge by a table.
                    if count("workers_ready").is_some()
                        && count("workers_ready") == count("workers")
                        && count("workers_with_table") == count("workers")
                    {
                        return Ok(nginx);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("nginx never became ready")
}

#[derive(Clone, Copy)]
struct Stats {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn stats(mut lat_us: Vec<u64>, elapsed: Duration) -> Stats {
    lat_us.sort_unstable();
    let pick = |q: f64| lat_us[((lat_us.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    Stats {
        rps: lat_us.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
    }
}

/// Run `total` calls of `call` from `concurrency` callers; latency per call.
async fn drive<F, Fut>(concurrency: usize, total: usize, call: F) -> Result<Stats>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    // Warm up: connections, JIT-free but caches and pools.
    for i in 0..concurrency.min(64) {
        call.clone()(i).await?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let call = call.clone();
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total / concurrency + 1);
            while next.fetch_add(1, Ordering::Relaxed) < total as u64 {
                let t = Instant::now();
                call(worker).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(stats(all, started.elapsed()))
}

/// (a) The raw AMQP round trip.
async fn raw_amqp(url: &str, concurrency: usize, total: usize, payload: Bytes) -> Result<Stats> {
    let queue = format!("bench.echo.{}", funcatron_envelope::new_request_id());
    let open = || {
        tokio::time::timeout(
            Duration::from_secs(30),
            Connection::connect(url, ConnectionProperties::default()),
        )
    };
    let server = open().await.context("AMQP handshake took over 30 s")??;
    let sch = server.create_channel().await?;
    sch.confirm_select(ConfirmSelectOptions::default()).await?;
    sch.basic_qos(256, BasicQosOptions::default()).await?;
    sch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = sch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let echo_ch = sch.clone();
    let echo = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let ch = echo_ch.clone();
            tokio::spawn(async move {
                let reply_to = d.properties.reply_to().clone().unwrap_or_default();
                let props = BasicProperties::default()
                    .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default());
                if let Ok(c) = ch
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &d.data,
                        props,
                    )
                    .await
                {
                    let _ = c.await;
                }
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            });
        }
    });

    let client = open().await.context("AMQP handshake took over 30 s")??;
    let cch = client.create_channel().await?;
    cch.confirm_select(ConfirmSelectOptions::default()).await?;
    let reply = cch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive(),
            FieldTable::default(),
        )
        .await?;
    let reply_name = reply.name().clone();
    let pending: Arc<DashMap<String, oneshot::Sender<()>>> = Arc::new(DashMap::new());
    let mut replies = cch
        .basic_consume(
            reply_name.clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let p2 = Arc::clone(&pending);
    let reader = tokio::spawn(async move {
        while let Some(Ok(d)) = replies.next().await {
            if let Some(id) = d.properties.correlation_id() {
                if let Some((_, tx)) = p2.remove(id.as_str()) {
                    let _ = tx.send(());
                }
            }
        }
    });
    let counter = Arc::new(AtomicU64::new(0));
    let q = queue.clone();
    let result = drive(concurrency, total, move |_| {
        let (cch, pending, payload, reply_name, counter, q) = (
            cch.clone(),
            Arc::clone(&pending),
            payload.clone(),
            reply_name.clone(),
            Arc::clone(&counter),
            q.clone(),
        );
        async move {
            let id = counter.fetch_add(1, Ordering::Relaxed).to_string();
            let (tx, rx) = oneshot::channel();
            pending.insert(id.clone(), tx);
            let props = BasicProperties::default()
                .with_reply_to(reply_name)
                .with_correlation_id(id.as_str().into());
            // Bounded like the reply: a connection RabbitMQ blocks (a
            // memory or disk alarm) holds confirms back indefinitely, which
            // would hang the run instead of failing it.
            let confirm = cch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &payload,
                props,
            );
            tokio::time::timeout(Duration::from_secs(30), async { confirm.await?.await })
                .await
                .context("no publisher confirm in 30 s (see `rabbitmqctl status`: alarms)")??;
            tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .context("no reply in 30 s")??;
            Ok(())
        }
    })
    .await;
    let _ = sch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    echo.abort();
    reader.abort();
    let _ = client.close(200, "done".into()).await;
    let _ = server.close(200, "done".into()).await;
    result
}

type Conn = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A keep-alive HTTP/1.1 connection to `addr` sending bodies of type `B`.
async fn connect<B>(
    addr: std::net::SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Keep-alive HTTP/1.1 load: one connection per caller, reopened when the
/// server closes it (nginx does after `keepalive_requests`).
async fn http_load(addr: std::net::SocketAddr, concurrency: usize, total: usize) -> Result<Stats> {
    http_load_path(addr, "/hello/bench", b"Hello, bench!", concurrency, total).await
}

/// [`http_load`] on any path, checking each answer is 200 with `expect`.
async fn http_load_path(
    addr: std::net::SocketAddr,
    path: &str,
    expect: &'static [u8],
    concurrency: usize,
    total: usize,
) -> Result<Stats> {
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        conns.push(Arc::new(tokio::sync::Mutex::new(connect(addr).await?)));
    }
    let conns = Arc::new(conns);
    let uri: hyper::Uri = format!("http://{addr}{path}").parse()?;
    drive(concurrency, total, move |worker| {
        let conns = Arc::clone(&conns);
        let uri = uri.clone();
        async move {
            let mut send = conns[worker % conns.len()].lock().await;
            if send.ready().await.is_err() {
                *send = connect(addr).await?;
            }
            let req = hyper::Request::get(uri)
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())?;
            let resp = send.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                status == 200 && body.as_ref() == expect,
                "bad answer {status}: {}",
                String::from_utf8_lossy(&body)
            );
            Ok(())
        }
    })
    .await
}

/// Start ingress, Tron and Runner in this process, each with its own broker
/// handle (for AMQP: its own connection, as separate processes would have).
async fn start_path(
    make: impl Fn() -> AnyBroker,
    bundles: &std::path::Path,
    routing: funcatron_ingress::edge::Routing,
    stop: &CancellationToken,
) -> Result<std::net::SocketAddr> {
    let (list, errors) = funcatron_bundle::Bundle::load_all(bundles);
    anyhow::ensure!(errors.is_empty(), "bundles: {errors:?}");
    // Only what is measured: hello (Lua), the chain rows' Lua Funcs and
    // the runtime benchmark's Funcs.
    let list: Vec<_> = list
        .into_iter()
        .filter(|b| {
            matches!(b.name.as_str(), "hello" | "echo-lua" | "to-upper")
                || b.name.starts_with("bench-")
        })
        .collect();
    funcatron_tron::RouteTable::build(&list)?;
    let tron = make();
    let runner = make();
    let ingress = make();
    for b in [&tron, &runner, &ingress] {
        if let AnyBroker::Amqp(a) = b {
            anyhow::ensure!(
                a.wait_connected(Duration::from_secs(10)).await,
                "cannot reach RabbitMQ"
            );
        }
    }
    tokio::spawn(
        funcatron_tron::TronNode::new(tron)
            .bundles(list.clone())
            .run(stop.clone()),
    );
    tokio::spawn(
        funcatron_runner::RunnerNode::new(runner)
            .bundles(list)
            .run(stop.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(funcatron_ingress::run(
        listener,
        ingress,
        funcatron_ingress::IngressOptions {
            routing,
            ..Default::default()
        },
        stop.clone(),
    ));
    // Ready when hello answers and, routing at the edge, the ingress
    // routes by the Tron's table.
    let health = format!("http://{addr}/_funcatron/health");
    for _ in 0..400 {
        let edge_ready = match routing {
            funcatron_ingress::edge::Routing::Tron => true,
            funcatron_ingress::edge::Routing::Edge => match reqwest::get(&health).await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .is_ok_and(|v| v["edge_table_revision"].is_u64()),
                Err(_) => false,
            },
        };
        if edge_ready && http_load(addr, 1, 1).await.is_ok() {
            return Ok(addr);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("the path never became ready")
}

fn row(name: &str, s: Stats) {
    println!(
        "{name:<44} {:>10.0} {:>9.3} {:>9.3}",
        s.rps, s.p50_ms, s.p99_ms
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.runtimes {
        return runtimes::run().await;
    }
    if args.autoscale {
        return autoscale::run(&args.amqp).await;
    }
    if args.switch {
        return switch::run().await;
    }
    if args.capture {
        return switch::capture(args.requests).await;
    }
    // Both in one run: `--triggers --documents` (the event-trigger
    // issue's numbers).
    if args.triggers || args.documents {
        if args.triggers {
            triggers::run(&args.amqp, args.trigger_samples).await?;
        }
        if args.documents {
            documents::run(&documents::Options {
                postgres: args.documents_postgres.as_deref(),
                embedded_writes: args.documents_writes,
                postgres_writes: args.documents_postgres_writes,
            })
            .await?;
        }
        return Ok(());
    }
    let c1 = (args.requests / 10).max(100);
    let c64 = args.requests;
    println!(
        "machine: {} CPUs; requests: {c1} at c=1, {c64} at c=64",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9}",
        "measurement", "req/s", "p50 ms", "p99 ms"
    );

    if args.chains_only {
        return chains::rows(&args.amqp, &args.bundles, args.embedded_only, c64).await;
    }
    if !args.async_only && !args.speed_only {
        base_rows(&args, c1, c64).await?;
        chains::rows(&args.amqp, &args.bundles, args.embedded_only, c64)
            .await
            .context("chain rows (m)")?;
    }
    if !args.async_only && !args.no_speed {
        speed::up_rows(&args.bundles)
            .await
            .context("speed rows (h), (i)")?;
        if !args.embedded_only {
            speed::direct_rows(&args.amqp, &args.bundles)
                .await
                .context("speed rows (j)-(l)")?;
        }
    }
    if args.speed_only {
        return Ok(());
    }
    let opts = async_calls::Options {
        store: &args.calls_store,
        requests: c64,
        concurrency: args.async_concurrency,
    };
    let embedded = AnyBroker::Embedded(EmbeddedBroker::new(100_000));
    async_calls::run("embedded", Box::new(move || embedded.clone()), &opts)
        .await
        .context("async rows, embedded")?;
    if !args.embedded_only {
        let url = args.amqp.clone();
        async_calls::run(
            "RabbitMQ",
            Box::new(move || AnyBroker::Amqp(AmqpBroker::connect(&url))),
            &opts,
        )
        .await
        .context("async rows, RabbitMQ")?;
    }
    Ok(())
}

/// Rows (a) to (d).
async fn base_rows(args: &Args, c1: usize, c64: usize) -> Result<()> {
    if !args.embedded_only {
        // A realistic payload: the size of a hello request envelope.
        let payload = Bytes::from(vec![b'x'; 420]);
        let raw1 = raw_amqp(&args.amqp, 1, c1, payload.clone())
            .await
            .context("raw AMQP")?;
        row("(a) raw AMQP round trip, c=1", raw1);
        let raw64 = raw_amqp(&args.amqp, 64, c64, payload).await?;
        row("(a) raw AMQP round trip, c=64", raw64);

        let stop = CancellationToken::new();
        let url = args.amqp.clone();
        let tron_addr = start_path(
            || AnyBroker::Amqp(AmqpBroker::connect(&url)),
            &args.bundles,
            funcatron_ingress::edge::Routing::Tron,
            &stop,
        )
        .await?;
        let tron1 = http_load(tron_addr, 1, c1)
            .await
            .context("tron routing c=1")?;
        row("(b) full path over RabbitMQ, Tron routing, c=1", tron1);
        let tron64 = http_load(tron_addr, 64, c64)
            .await
            .context("tron routing c=64")?;
        row("(b) full path over RabbitMQ, Tron routing, c=64", tron64);
        stop.cancel();
        let stop = CancellationToken::new();
        let addr = start_path(
            || AnyBroker::Amqp(AmqpBroker::connect(&url)),
            &args.bundles,
            funcatron_ingress::edge::Routing::Edge,
            &stop,
        )
        .await?;
        let full1 = http_load(addr, 1, c1).await.context("full path c=1")?;
        row("(b) full path over RabbitMQ, edge routing, c=1", full1);
        let full64 = http_load(addr, 64, c64).await.context("full path c=64")?;
        row("(b) full path over RabbitMQ, edge routing, c=64", full64);
        let nginx = if args.no_nginx {
            None
        } else {
            let n = start_nginx(&args.amqp).await?;
            let n1 = http_load(n.addr, 1, c1).await.context("nginx c=1")?;
            row("(d) full path, nginx + Lua ingress, c=1", n1);
            let n64 = http_load(n.addr, 64, c64).await.context("nginx c=64")?;
            row("(d) full path, nginx + Lua ingress, c=64", n64);
            Some((n1, n64))
        };
        stop.cancel();

        println!();
        println!(
            "ratio full/raw p50 at c=1, edge routing:         {:.2}x  (target <= 1.3x)",
            full1.p50_ms / raw1.p50_ms
        );
        println!(
            "ratio full/raw throughput at c=64, edge routing: {:.2}   (target >= 0.85)",
            full64.rps / raw64.rps
        );
        println!(
            "ratio full/raw p50 at c=1, Tron routing:         {:.2}x",
            tron1.p50_ms / raw1.p50_ms
        );
        println!(
            "ratio full/raw throughput at c=64, Tron routing: {:.2}",
            tron64.rps / raw64.rps
        );
        if let Some((n1, n64)) = nginx {
            println!(
                "nginx/embedded ingress throughput at c=64: {:.2} (target >= 1.00)",
                n64.rps / full64.rps
            );
            println!(
                "nginx/embedded ingress p50 at c=1:         {:.2}",
                n1.p50_ms / full1.p50_ms
            );
            println!(
                "nginx path/raw throughput at c=64:         {:.2}",
                n64.rps / raw64.rps
            );
        }
    }

    let stop = CancellationToken::new();
    let embedded = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let addr = start_path(
        || embedded.clone(),
        &args.bundles,
        funcatron_ingress::edge::Routing::Edge,
        &stop,
    )
    .await?;
    let emb1 = http_load(addr, 1, c1).await.context("embedded c=1")?;
    row("(c) funcatron up (embedded), c=1", emb1);
    let emb64 = http_load(addr, 64, c64).await.context("embedded c=64")?;
    row("(c) funcatron up (embedded), c=64", emb64);
    println!(
        "embedded throughput at c=64:        {:.0} req/s (target >= 20000)",
        emb64.rps
    );
    stop.cancel();
    Ok(())
}

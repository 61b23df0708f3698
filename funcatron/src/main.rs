//! `funcatron`: one binary for every role on the request path.
//!
//! `up` runs ingress, Tron and Runner in one process (on the embedded broker
//! by default, so nothing else is needed); `ingress`, `tron` and `runner` run
//! one role each against a shared broker (RabbitMQ), any number of each.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use funcatron_broker::AnyBroker;
use funcatron_bundle::Bundle;
use funcatron_ingress::IngressOptions;
use funcatron_runner::exec::ExecLimits;
use funcatron_runner::follow::FollowOptions;
use funcatron_runner::lua::LuaLimits;
use funcatron_runner::node::spawn_follower;
use funcatron_runner::observe::LevelHook;
use funcatron_runner::{RunnerNode, RunnerOptions};
use funcatron_tron::{Management, TronNode, TronOptions};
use tokio_util::sync::CancellationToken;

use funcatron_ingress::nginx;

mod bundle_cmd;
mod client;
mod dev;
mod local;
mod replay;
mod scale;

#[derive(Parser)]
#[command(
    name = "funcatron",
    version,
    about = "Serverless on your cluster: Swagger-defined Funcs served through a message broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role (ingress, Tron, Runner) in one process.
    Up(UpArgs),
    /// Run a Tron: route requests from the request queue to Func queues.
    Tron(TronArgs),
    /// Run a Runner: serve Func queues with the bundles' code.
    Runner(RunnerArgs),
    /// Run the embedded HTTP ingress: HTTP in, envelopes on the broker, replies out.
    Ingress(IngressArgs),
    /// Print an nginx config for the production nginx + Lua ingress (`ingress-lua/`).
    NginxConfig(NginxArgs),
    /// Work with bundles: show effective routes.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCmd),
    /// Manage Funcs on a Tron: list, show, history, enable, disable, rollback.
    #[command(subcommand)]
    Func(client::FuncCmd),
    /// Call a Func through a Tron's management API.
    Invoke(client::InvokeArgs),
    /// Record a Func's request/response pairs: start, stop, export.
    #[command(subcommand)]
    Capture(client::CaptureCmd),
    /// Replay captured requests against a Funcatron (or any HTTP endpoint)
    /// and compare the answers with the recorded ones.
    Replay(replay::ReplayArgs),
    /// Show a Func's log lines from its Runners.
    Logs(client::LogsArgs),
    /// Per Func: queue depth, arrival rate, service time, Runners.
    Status(client::Remote),
    /// Save and reload: serve the bundle(s) in DIR on the embedded broker,
    /// switching to each saved version that loads.
    Dev(DevArgs),
}

#[derive(Args)]
struct DevArgs {
    /// A bundle directory, or a directory of bundles.
    dir: PathBuf,
    /// Address to serve on.
    #[arg(long, env = "FUNCATRON_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Deployment environment whose rewrite rules apply.
    #[arg(long, env = "FUNCATRON_ENVIRONMENT")]
    environment: Option<String>,
    #[command(flatten)]
    runner: RunnerOpts,
}

#[derive(Args)]
struct NginxArgs {
    /// The cluster's RabbitMQ, as an AMQP URL (nginx connects to it directly).
    #[arg(long, env = "FUNCATRON_BROKER")]
    broker: String,
    /// nginx `listen` value.
    #[arg(long, env = "FUNCATRON_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Directory for nginx's logs, pid and temp files (created).
    #[arg(long, default_value = "nginx-run")]
    prefix: PathBuf,
    /// Directory holding `funcatron/*.lua` (the repository's `ingress-lua/lib`).
    #[arg(long, env = "FUNCATRON_LUA_DIR", default_value = "ingress-lua/lib")]
    lua_dir: PathBuf,
    /// nginx worker processes.
    #[arg(long, default_value = "auto")]
    workers: String,
    /// How long a request waits for its answer before 504, in milliseconds.
    #[arg(long, env = "FUNCATRON_TIMEOUT_MS", default_value_t = 30_000)]
    timeout_ms: u64,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "FUNCATRON_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Do not emit `load_module` lines (OpenResty, or modules compiled in).
    #[arg(long)]
    no_load_modules: bool,
    /// nginx error_log level.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Write the config here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct BrokerArgs {
    /// Broker to use: `embedded` (in-process; only with `up`) or an AMQP URL
    /// such as `amqp://guest:guest@127.0.0.1:5672/%2f`.
    #[arg(long, env = "FUNCATRON_BROKER", default_value = "embedded")]
    broker: String,
    /// Capacity of each embedded queue; publishers wait when it is full.
    #[arg(long, env = "FUNCATRON_EMBEDDED_CAPACITY", default_value_t = 10_000)]
    embedded_capacity: usize,
}

#[derive(Args, Clone)]
struct MetricsArgs {
    /// Serve Prometheus metrics at http://<addr>/metrics (the ingress also
    /// serves them at /_funcatron/metrics, the management API at /metrics).
    #[arg(long, env = "FUNCATRON_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

/// Logging to stderr with `RUST_LOG` (default `info`), plus per-Func levels
/// set through the registry (`funcatron func log-level`), applied by
/// reloading the filter with span-field directives.
fn init_logging() -> LevelHook {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    Arc::new(move |levels| {
        let mut directives = base.clone();
        for (func, level) in levels {
            directives.push_str(&format!(
                ",[runner.invoke{{func={func}}}]={level},[tron.dispatch{{func={func}}}]={level}"
            ));
        }
        match EnvFilter::try_new(&directives) {
            Ok(f) => {
                if handle.reload(f).is_ok() {
                    tracing::info!(directives, "log levels changed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot apply the Func log levels"),
        }
    })
}

/// The process's Prometheus recorder (every role in it reports to it).
static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

fn install_metrics() {
    let built = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0,
        ])
        .and_then(|b| b.install_recorder());
    match built {
        Ok(h) => {
            let _ = METRICS.set(h);
        }
        Err(e) => tracing::warn!(error = %e, "metrics are off"),
    }
}

/// Routes serving the metrics at `path`.
fn metrics_routes(path: &str) -> axum::Router {
    axum::Router::new().route(
        path,
        axum::routing::get(|| async {
            (
                [("content-type", "text/plain; version=0.0.4")],
                METRICS.get().map(|h| h.render()).unwrap_or_default(),
            )
        }),
    )
}

async fn serve_metrics(m: &MetricsArgs, shutdown: &CancellationToken) -> Result<()> {
    let Some(addr) = m.metrics_listen else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, metrics_routes("/metrics"))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    Ok(())
}

#[derive(Args, Clone)]
struct BundleArgs {
    /// Directory of Func bundles (each subdirectory one bundle), or one bundle directory.
    #[arg(long, env = "FUNCATRON_BUNDLES", default_value = "func-bundles")]
    bundles: PathBuf,
    /// Deployment environment: bundles' `environments` rewrite rules for it
    /// are applied to their documents (host, basePath, servers, ...).
    #[arg(long, env = "FUNCATRON_ENVIRONMENT")]
    environment: Option<String>,
}

#[derive(Args, Clone)]
struct TronOpts {
    /// Requests one Tron dispatches concurrently (AMQP prefetch on the request queue).
    #[arg(long, env = "FUNCATRON_TRON_PREFETCH", default_value_t = 256)]
    tron_prefetch: u16,
    /// Bundle store directory: turns on the registry and its management API
    /// (uploaded bundles, enabled versions; survives restarts).
    #[arg(long, env = "FUNCATRON_STORE")]
    store: Option<PathBuf>,
    /// Address the management API listens on (with --store).
    #[arg(long, env = "FUNCATRON_MGMT_LISTEN", default_value = "127.0.0.1:9090")]
    mgmt_listen: SocketAddr,
    /// The management API's URL as other Trons and Runners reach it
    /// (default: http://<mgmt-listen>).
    #[arg(long, env = "FUNCATRON_ADVERTISE")]
    advertise: Option<String>,
    /// Management token (default: --token-file, else <store>/token,
    /// generated and printed once at first start).
    #[arg(long, env = "FUNCATRON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the management token.
    #[arg(long, env = "FUNCATRON_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Largest bundle archive accepted, in bytes.
    #[arg(long, env = "FUNCATRON_MAX_UPLOAD_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_upload_bytes: usize,
    #[command(flatten)]
    scale: scale::ScaleOpts,
}

/// The management token: given, from a file, or generated once into the store.
fn management_token(o: &TronOpts, store: &std::path::Path) -> Result<String> {
    if let Some(t) = &o.token {
        return Ok(t.trim().to_owned());
    }
    if let Some(f) = &o.token_file {
        return Ok(std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_owned());
    }
    let path = store.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_owned());
    }
    let token = format!(
        "{}{}",
        funcatron_envelope::new_request_id(),
        funcatron_envelope::new_request_id()
    );
    std::fs::create_dir_all(store)?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(token.as_bytes())?;
    }
    eprintln!(
        "funcatron: management token (printed once; kept in {}): {token}",
        path.display()
    );
    Ok(token)
}

#[derive(Args, Clone)]
struct RunnerOpts {
    /// Requests held per Func queue (AMQP prefetch).
    #[arg(long, env = "FUNCATRON_RUNNER_PREFETCH", default_value_t = 64)]
    runner_prefetch: u16,
    /// Lua worker threads; default: one per CPU.
    #[arg(long, env = "FUNCATRON_WORKERS")]
    workers: Option<usize>,
    /// Default time limit of one Func invocation, in milliseconds.
    #[arg(long, env = "FUNCATRON_FUNC_TIMEOUT_MS", default_value_t = 10_000)]
    func_timeout_ms: u64,
    /// Default memory limit of a Func's Lua state, in MiB.
    #[arg(long, env = "FUNCATRON_FUNC_MEMORY_MB", default_value_t = 64)]
    func_memory_mb: usize,
    /// Default address-space limit of an exec Func's process, in MiB.
    #[arg(long, env = "FUNCATRON_EXEC_MEMORY_MB", default_value_t = 1024)]
    exec_memory_mb: usize,
    /// Worker processes per Python, Node.js or Java Func (a bundle's
    /// `concurrency` wins); default: one per CPU.
    #[arg(long, env = "FUNCATRON_WORKER_PROCESSES")]
    worker_processes: Option<usize>,
    /// Default memory limit of a Python, Node.js or Java worker, in MiB.
    #[arg(long, env = "FUNCATRON_WORKER_MEMORY_MB", default_value_t = 512)]
    worker_memory_mb: usize,
    /// Where Python environments and compiled Java are cached; default
    /// `$XDG_CACHE_HOME/funcatron` or `~/.cache/funcatron`.
    #[arg(long, env = "FUNCATRON_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Directory of secret values: `<dir>/<func>/<NAME>` or `<dir>/<NAME>`.
    #[arg(long, env = "FUNCATRON_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Serve only this Func (repeat for more; default: every Func). The
    /// autoscaler starts Runners with one `--func` each.
    #[arg(long = "func", env = "FUNCATRON_FUNCS", value_delimiter = ',')]
    funcs: Vec<String>,
}

#[derive(Args, Clone)]
struct IngressOpts {
    /// Address the HTTP ingress listens on.
    #[arg(long, env = "FUNCATRON_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "FUNCATRON_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: usize,
    /// How long a request waits for its answer before 504, in milliseconds.
    #[arg(long, env = "FUNCATRON_TIMEOUT_MS", default_value_t = 30_000)]
    timeout_ms: u64,
    /// Most requests waiting at once; more get 429.
    #[arg(long, env = "FUNCATRON_MAX_IN_FLIGHT", default_value_t = 10_000)]
    max_in_flight: usize,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    bundles: BundleArgs,
    #[command(flatten)]
    ingress: IngressOpts,
    #[command(flatten)]
    tron: TronOpts,
    #[command(flatten)]
    runner: RunnerOpts,
}

#[derive(Args)]
struct TronArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    bundles: BundleArgs,
    #[command(flatten)]
    tron: TronOpts,
}

#[derive(Args)]
struct RunnerArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    bundles: BundleArgs,
    #[command(flatten)]
    runner: RunnerOpts,
}

#[derive(Args)]
struct IngressArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    ingress: IngressOpts,
}

fn main() -> Result<()> {
    let levels = init_logging();
    let cli = Cli::parse();
    install_metrics();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        match cli.command {
            Command::Up(a) => {
                serve_metrics(&a.metrics, &shutdown).await?;
                up(a, levels, shutdown).await
            }
            Command::Tron(a) => {
                serve_metrics(&a.metrics, &shutdown).await?;
                let broker = broker(&a.broker, false)?;
                let substrate =
                    scale::substrate(&a.tron.scale, &a.broker.broker, &a.bundles, false).await?;
                tron(broker, &a.bundles, &a.tron, substrate, shutdown).await
            }
            Command::Runner(a) => {
                exit_with_parent();
                serve_metrics(&a.metrics, &shutdown).await?;
                let broker = broker(&a.broker, false)?;
                runner(broker, &a.bundles, &a.runner, levels, shutdown).await
            }
            Command::Ingress(a) => {
                serve_metrics(&a.metrics, &shutdown).await?;
                let broker = broker(&a.broker, false)?;
                ingress(broker, &a.ingress, shutdown).await
            }
            Command::NginxConfig(a) => nginx_config(a),
            Command::Bundle(c) => bundle_cmd::run(c).await,
            Command::Func(c) => {
                print!("{}", client::func(c).await?);
                Ok(())
            }
            Command::Capture(c) => {
                use std::io::Write;
                std::io::stdout().write_all(&client::capture(c).await?)?;
                Ok(())
            }
            Command::Logs(a) => client::logs(a).await,
            Command::Status(r) => {
                print!("{}", client::status(&r).await?);
                Ok(())
            }
            Command::Replay(a) => {
                let differ = replay::run(a).await?;
                if differ {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Invoke(a) => {
                use std::io::Write;
                let (out, ok) = client::invoke(a).await?;
                std::io::stdout().write_all(&out)?;
                if !ok {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Dev(a) => {
                let opts = runner_options(&a.runner);
                let extra = metrics_routes("/_funcatron/metrics");
                dev::run(a.dir, a.environment, a.listen, opts, extra, shutdown).await
            }
        }
    })
}

/// A Runner started by the `process` substrate (which sets
/// `FUNCATRON_PARENT_PID`) is asked to stop (SIGTERM: finish, then exit)
/// when its Tron dies, even by SIGKILL, so no Runner is left orphaned.
fn exit_with_parent() {
    let Some(parent) = std::env::var("FUNCATRON_PARENT_PID")
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        tracing::warn!(error = %e, "cannot follow the Tron's exit");
    }
    // The Tron may have died before the line above.
    if nix::unistd::getppid().as_raw() != parent {
        tracing::warn!("the Tron that started this Runner is gone; exiting");
        std::process::exit(0);
    }
}

async fn signal_shutdown(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down: finishing in-flight work");
    shutdown.cancel();
}

fn nginx_config(a: NginxArgs) -> Result<()> {
    let text = nginx::render(&nginx::NginxConfig {
        broker: a.broker,
        listen: a.listen,
        prefix: a.prefix,
        lua_dir: a.lua_dir,
        workers: a.workers,
        timeout_ms: a.timeout_ms,
        max_body_bytes: a.max_body_bytes,
        load_modules: !a.no_load_modules,
        log_level: a.log_level,
    })?;
    match a.out {
        Some(p) => std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

fn broker(a: &BrokerArgs, embedded_ok: bool) -> Result<AnyBroker> {
    let b = AnyBroker::from_url(&a.broker, a.embedded_capacity)?;
    if matches!(b, AnyBroker::Embedded(_)) && !embedded_ok {
        bail!("the embedded broker lives inside one process: use `funcatron up`, or give --broker amqp://... to run roles separately");
    }
    Ok(b)
}

fn load_bundles(a: &BundleArgs) -> Vec<Bundle> {
    let dir = &a.bundles;
    let (bundles, errors) = Bundle::load_all_in(dir, a.environment.as_deref());
    for e in &errors {
        tracing::error!(error = %e, "bundle rejected");
    }
    if bundles.is_empty() {
        tracing::warn!(dir = %dir.display(), "no usable bundles");
    }
    bundles
}

async fn tron(
    broker: AnyBroker,
    dir: &BundleArgs,
    o: &TronOpts,
    substrate: Option<Arc<dyn funcatron_tron::autoscale::Substrate>>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut node = TronNode::new(broker)
        .options(TronOptions {
            prefetch: o.tron_prefetch,
        })
        .bundles(load_bundles(dir));
    if let Some(substrate) = substrate {
        node = node.autoscaler(substrate, o.scale.options());
    }
    if let Some(store) = &o.store {
        let token = management_token(o, store)?;
        let lua_check: funcatron_tron::registry::Check = Arc::new(|b: &Bundle| {
            if b.runtime == funcatron_bundle::RuntimeKind::Lua {
                funcatron_runner::lua::LuaFunc::prepare(b, LuaLimits::default())
                    .map(drop)
                    .map_err(|e| e.to_string())
            } else {
                Ok(())
            }
        });
        let listener = tokio::net::TcpListener::bind(o.mgmt_listen)
            .await
            .with_context(|| format!("binding the management API to {}", o.mgmt_listen))?;
        node = node.management(Management {
            registry: funcatron_tron::registry::RegistryOptions {
                store: store.clone(),
                environment: dir.environment.clone(),
                static_bundles: Vec::new(),
                advertise: o
                    .advertise
                    .clone()
                    .unwrap_or_else(|| format!("http://{}", o.mgmt_listen)),
                limits: Default::default(),
                check: Some(lua_check),
            },
            listener,
            token,
            max_upload_bytes: o.max_upload_bytes,
            extra: metrics_routes("/metrics"),
        });
    }
    node.run(shutdown).await?;
    Ok(())
}

fn runner_options(o: &RunnerOpts) -> RunnerOptions {
    let mut opts = RunnerOptions {
        prefetch: o.runner_prefetch,
        lua_limits: LuaLimits {
            timeout: Duration::from_millis(o.func_timeout_ms),
            memory_bytes: o.func_memory_mb * 1024 * 1024,
        },
        exec_limits: ExecLimits {
            timeout: Duration::from_millis(o.func_timeout_ms),
            memory_bytes: o.exec_memory_mb * 1024 * 1024,
        },
        ..RunnerOptions::default()
    };
    if let Some(w) = o.workers {
        opts.workers = w;
    }
    opts.worker.timeout = Duration::from_millis(o.func_timeout_ms);
    opts.worker.memory_bytes = o.worker_memory_mb * 1024 * 1024;
    if let Some(n) = o.worker_processes {
        opts.worker.concurrency = n.max(1);
    }
    if let Some(d) = &o.cache_dir {
        opts.worker.cache_dir = d.clone();
    }
    opts.secrets_dir = o.secrets_dir.clone();
    opts
}

/// What a Runner follows: the static bundles of `dir` plus what the
/// registry enables (only `o.funcs` if given).
fn follow_options(dir: &BundleArgs, o: &RunnerOpts) -> FollowOptions {
    FollowOptions {
        static_bundles: load_bundles(dir),
        cache_dir: runner_options(o).worker.cache_dir,
        environment: dir.environment.clone(),
        only: o.funcs.clone(),
    }
}

async fn runner(
    broker: AnyBroker,
    dir: &BundleArgs,
    o: &RunnerOpts,
    levels: LevelHook,
    shutdown: CancellationToken,
) -> Result<()> {
    RunnerNode::new(broker)
        .options(runner_options(o))
        .follow(follow_options(dir, o))
        .log_levels(levels)
        .run(shutdown)
        .await;
    Ok(())
}

async fn ingress(broker: AnyBroker, o: &IngressOpts, shutdown: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("binding {}", o.listen))?;
    let opts = IngressOptions {
        max_body_bytes: o.max_body_bytes,
        timeout: Duration::from_millis(o.timeout_ms),
        max_in_flight: o.max_in_flight,
        ..IngressOptions::default()
    };
    funcatron_ingress::run_with(
        listener,
        broker,
        opts,
        metrics_routes("/_funcatron/metrics"),
        shutdown,
    )
    .await?;
    Ok(())
}

async fn up(a: UpArgs, levels: LevelHook, shutdown: CancellationToken) -> Result<()> {
    let broker = broker(&a.broker, true)?;
    let dir = a.bundles.clone();
    // `up` scales its Runners itself unless told `--substrate none`: on
    // the embedded broker as tasks of this process, else as the substrate
    // says (child processes by default).
    let substrate: Option<Arc<dyn funcatron_tron::autoscale::Substrate>> =
        if matches!(broker, AnyBroker::Embedded(_))
            && a.tron.scale.substrate.as_deref().unwrap_or("process") == "process"
        {
            let rx = spawn_follower(&broker, follow_options(&dir, &a.runner), &shutdown);
            Some(Arc::new(local::LocalSubstrate::new(
                broker.clone(),
                rx,
                runner_options(&a.runner),
                Arc::clone(&levels),
            )))
        } else {
            scale::substrate(&a.tron.scale, &a.broker.broker, &dir, true).await?
        };
    let own_runner = substrate.is_none();
    let t = tokio::spawn({
        let (b, s, o, d) = (
            broker.clone(),
            shutdown.clone(),
            a.tron.clone(),
            dir.clone(),
        );
        async move { tron(b, &d, &o, substrate, s).await }
    });
    let r = tokio::spawn({
        let (b, s, o, d) = (
            broker.clone(),
            shutdown.clone(),
            a.runner.clone(),
            dir.clone(),
        );
        async move {
            if own_runner {
                runner(b, &d, &o, levels, s).await
            } else {
                Ok(())
            }
        }
    });
    let i = tokio::spawn({
        let (b, s, o) = (broker.clone(), shutdown.clone(), a.ingress.clone());
        async move { ingress(b, &o, s).await }
    });
    tracing::info!(listen = %a.ingress.listen, broker = broker.kind(), bundles = %dir.bundles.display(), "funcatron up");
    // If any role fails, stop the others and report it.
    let mut roles = tokio::task::JoinSet::new();
    roles.spawn(async move { t.await? });
    roles.spawn(async move { r.await? });
    roles.spawn(async move { i.await? });
    let mut first_err = None;
    while let Some(done) = roles.join_next().await {
        let result = done.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            shutdown.cancel();
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

//! `funcatron`: one binary for every role on the request path.
//!
//! `up` runs ingress, Tron and Runner in one process (on the embedded broker
//! by default, so nothing else is needed); `ingress`, `tron` and `runner` run
//! one role each against a shared broker (RabbitMQ), any number of each.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use funcatron_broker::AnyBroker;
use funcatron_bundle::Bundle;
use funcatron_control::outbound::OutboundPolicy;
use funcatron_ingress::args::IngressArgs;
use funcatron_ingress::IngressOptions;
use funcatron_listener::{Limits, ListenerArgs};
use funcatron_runner::args::RunnerArgs;
use funcatron_runner::follow::FollowOptions;
use funcatron_runner::lua::LuaLimits;
use funcatron_runner::node::spawn_follower;
use funcatron_runner::observe::LevelHook;
use funcatron_runner::RunnerNode;
use funcatron_tron::args::TronArgs;
use funcatron_tron::mgmt::{MgmtOptions, Tokens};
use funcatron_tron::{Management, TronNode};
use tokio_util::sync::CancellationToken;

use funcatron_ingress::nginx;

mod bundle_cmd;
mod calls_cmd;
mod client;
mod dev;
mod local;
mod replay;
mod scale;
mod store_cmd;

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

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run every role (ingress, Tron, Runner) in one process.
    Up(UpArgs),
    /// Run a Tron: route requests from the request queue to Func queues.
    Tron(TronCmd),
    /// Run a Runner: serve Func queues with the bundles' code.
    Runner(RunnerCmd),
    /// Run the embedded HTTP ingress: HTTP in, envelopes on the broker, replies out.
    Ingress(IngressCmd),
    /// Print an nginx config for the production nginx + Lua ingress (`ingress-lua/`).
    NginxConfig(NginxArgs),
    /// Work with bundles: show effective routes.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCmd),
    /// Manage Funcs on a Tron: list, show, history, enable, disable, rollback.
    #[command(subcommand)]
    Func(client::FuncCmd),
    /// Call a Func, or a chain of Funcs (`"sed e=s/a/b/ | to-upper"`, input
    /// from stdin), through a Tron's management API.
    Invoke(client::InvokeArgs),
    /// Asynchronous calls: show one.
    #[command(subcommand)]
    Call(calls_cmd::CallCmd),
    /// A Func's dead-letter queue: list, show, redrive, purge.
    #[command(subcommand)]
    Dlq(calls_cmd::DlqCmd),
    /// The document store: collections (define, show, drop, tokens) and
    /// their JSON documents (get, put, create, patch, delete, list).
    #[command(subcommand)]
    Store(store_cmd::StoreCmd),
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
    #[arg(long, env = "FUNCATRON_LISTEN", default_value = funcatron_ingress::args::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Deployment environment whose rewrite rules apply.
    #[arg(long, env = "FUNCATRON_ENVIRONMENT")]
    environment: Option<String>,
    #[command(flatten)]
    runner: RunnerArgs,
    #[command(flatten)]
    listener: ListenerArgs,
}

#[derive(Args)]
struct NginxArgs {
    /// The cluster's RabbitMQ, as an AMQP URL (nginx connects to it directly).
    #[arg(long, env = "FUNCATRON_BROKER")]
    broker: String,
    /// nginx `listen` value.
    #[arg(long, env = "FUNCATRON_LISTEN", default_value = funcatron_ingress::args::DEFAULT_LISTEN)]
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
    #[arg(long, env = "FUNCATRON_TIMEOUT_MS", default_value_t = funcatron_ingress::args::DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "FUNCATRON_MAX_BODY_BYTES", default_value_t = funcatron_ingress::args::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Do not emit `load_module` lines (OpenResty, or modules compiled in).
    #[arg(long)]
    no_load_modules: bool,
    /// nginx error_log level.
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// A Tron's management API (`http://host:port`, no path) with a state
    /// store (`--state-store`): nginx hands it asynchronous calls (`Prefer:
    /// respond-async`, `X-Funcatron-Async`, `X-tinyFaaS-Async`,
    /// `/async-function/`) to record and queue, and proxies `GET
    /// /_funcatron/calls/<id>` to it. Without it they answer 501
    /// `async_unavailable`.
    #[arg(long, env = "FUNCATRON_TRON_URL", requires = "tron_token_file")]
    tron_url: Option<String>,
    /// File holding the Tron's admin token, sent with each submission; read
    /// once when nginx starts (never taken from a request).
    #[arg(long, env = "FUNCATRON_TRON_TOKEN_FILE", requires = "tron_url")]
    tron_token_file: Option<PathBuf>,
    /// Who routes requests: `edge` (the Lua ingress, by the route table
    /// the Trons broadcast, straight onto the Func's queue) or `tron`
    /// (every request through a Tron).
    #[arg(long, env = "FUNCATRON_ROUTING", value_enum, default_value_t = funcatron_ingress::edge::Routing::Edge)]
    routing: funcatron_ingress::edge::Routing,
    /// Direct mode: its threshold, largest body and resolver.
    #[command(flatten)]
    direct: nginx::NginxDirectArgs,
    /// Write the config here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct BrokerArgs {
    /// Broker to use: `embedded` (in-process; only with `up`) or an AMQP URL
    /// such as `amqp://guest:guest@127.0.0.1:5672/%2f`; for a RabbitMQ
    /// cluster, its nodes separated by commas
    /// (`amqp://u:p@node1:5672,node2:5672/%2f`), tried in turn.
    #[arg(long, env = "FUNCATRON_BROKER", default_value = "embedded")]
    broker: String,
    /// How work queues are declared on RabbitMQ: `classic` (default) or
    /// `quorum` (replicated across the cluster; see docs/brokers.md).
    /// Passed on in the broker URL (`queue_type=`) to the Runners it starts.
    #[arg(long, env = "FUNCATRON_QUEUE_TYPE")]
    queue_type: Option<String>,
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
    /// Timeouts and connection limit of every HTTP listener of the command.
    #[command(flatten)]
    listener: ListenerArgs,
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
    let limits = m.listener.limits()?;
    tokio::spawn(funcatron_listener::serve(
        "metrics",
        listener,
        metrics_routes("/metrics"),
        limits,
        stop,
    ));
    Ok(())
}

/// Where requests Funcatron makes on someone else's word may go (fetch
/// URLs named by control messages, replay targets): see
/// `funcatron_control::outbound` and docs/security.md.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct OutboundArgs {
    /// Networks, addresses or host names that requests made on someone
    /// else's word (fetch URLs in control messages, replay targets) may
    /// reach although they are loopback, private, link-local or cloud
    /// metadata addresses (comma-separated), e.g. `10.0.0.0/8,tron.internal`.
    /// A Tron's and `up`'s own advertised host is always allowed.
    #[arg(
        long = "allow-outbound",
        env = "FUNCATRON_ALLOW_OUTBOUND",
        value_delimiter = ','
    )]
    allow_outbound: Vec<String>,
}

impl OutboundArgs {
    /// The policy these flags give.
    pub(crate) fn policy(&self) -> Result<OutboundPolicy> {
        Ok(OutboundPolicy::new(&self.allow_outbound)?)
    }

    /// The policy plus the host of `tron` (the Tron a Runner is started
    /// for, whatever its address).
    fn policy_trusting(&self, tron: &str) -> Result<OutboundPolicy> {
        let mut p = self.policy()?;
        p.allow_host_of(tron)?;
        Ok(p)
    }
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

/// The management tokens of a Tron with a store (`None` without one):
/// the admin token (given, from a file, or generated once into
/// `<store>/token`) and the read token (given, or generated once into
/// `<store>/read-token`).
fn management_tokens(o: &TronArgs) -> Result<Option<Tokens>> {
    let Some(store) = &o.store else {
        return Ok(None);
    };
    let admin = match (&o.token, &o.token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => stored_token(store, "token", "management token")?,
    };
    let read = match &o.read_token {
        Some(t) => t.trim().to_owned(),
        None => stored_token(store, "read-token", "read-only token")?,
    };
    if read == admin {
        bail!("the read token must differ from the admin token");
    }
    Ok(Some(Tokens {
        admin,
        read: Some(read),
    }))
}

/// The token kept in `<store>/<file>`, generated (and printed once) when
/// the file is not there.
fn stored_token(store: &std::path::Path, file: &str, what: &str) -> Result<String> {
    let path = store.join(file);
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
        "funcatron: {what} (printed once; kept in {}): {token}",
        path.display()
    );
    Ok(token)
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    outbound: OutboundArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    bundles: BundleArgs,
    #[command(flatten)]
    ingress: IngressArgs,
    #[command(flatten)]
    tron: TronArgs,
    #[command(flatten)]
    runner: RunnerArgs,
}

#[derive(Args)]
struct TronCmd {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    outbound: OutboundArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    bundles: BundleArgs,
    #[command(flatten)]
    tron: TronArgs,
}

#[derive(Args)]
struct RunnerCmd {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    outbound: OutboundArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    bundles: BundleArgs,
    #[command(flatten)]
    runner: RunnerArgs,
}

#[derive(Args)]
struct IngressCmd {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    ingress: IngressArgs,
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
                let broker_url = a.broker.url();
                let tokens = management_tokens(&a.tron)?;
                let read = tokens.as_ref().and_then(|t| t.read.as_deref());
                let outbound = a.outbound.policy()?;
                let runners = RunnerGrants {
                    broker_url: &broker_url,
                    read_token: read,
                    outbound: &a.outbound.policy_trusting(&a.tron.advertise())?,
                };
                let substrate = scale::substrate(&a.tron.scale, runners, &a.bundles, false).await?;
                let calls = open_calls(a.tron.state_store.as_deref()).await?;
                let setup = TronSetup {
                    tokens,
                    substrate,
                    limits: a.metrics.listener.limits()?,
                    outbound,
                    documents: documents_of(calls.as_ref()),
                    calls,
                };
                tron(broker, &a.bundles, &a.tron, setup, shutdown).await
            }
            Command::Runner(a) => {
                exit_with_parent();
                serve_metrics(&a.metrics, &shutdown).await?;
                let broker = broker(&a.broker, false)?;
                let read_token = funcatron_runner::args::read_token_from_env();
                let follow =
                    follow_options(&a.bundles, &a.runner, read_token, a.outbound.policy()?);
                runner(broker, &a.runner, follow, levels, None, shutdown).await
            }
            Command::Ingress(a) => {
                serve_metrics(&a.metrics, &shutdown).await?;
                let broker = broker(&a.broker, false)?;
                let calls = open_calls(a.ingress.calls_store.as_deref()).await?;
                // Its store's documents, opened by collection rules and
                // tokens (no operator tokens here: operators use a Tron).
                let documents = documents_of(calls.as_ref()).map(|d| (d, None));
                // Its writes wake the Trons' relay at once.
                if let Some((docs, _)) = &documents {
                    let origin = format!("ingress-{}", &funcatron_envelope::new_request_id()[..12]);
                    tokio::spawn(funcatron_tron::triggers::announce(
                        docs.clone(),
                        broker.clone(),
                        origin,
                        shutdown.clone(),
                    ));
                }
                ingress(
                    broker,
                    &a.ingress,
                    (calls, documents),
                    a.metrics.listener.limits()?,
                    shutdown,
                )
                .await
            }
            Command::NginxConfig(a) => nginx_config(a),
            Command::Bundle(c) => bundle_cmd::run(c).await,
            Command::Func(c) => {
                print!("{}", client::func(c).await?);
                Ok(())
            }
            Command::Call(c) => {
                print!("{}", calls_cmd::call(c).await?);
                Ok(())
            }
            Command::Store(c) => {
                print!("{}", store_cmd::run(c).await?);
                Ok(())
            }
            Command::Dlq(c) => {
                print!("{}", calls_cmd::dlq(c).await?);
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
                let opts = a.runner.options();
                let extra = metrics_routes("/_funcatron/metrics");
                let limits = a.listener.limits()?;
                dev::run(
                    a.dir,
                    a.environment,
                    a.listen,
                    opts,
                    limits,
                    extra,
                    shutdown,
                )
                .await
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
    let tron = match (a.tron_url, a.tron_token_file) {
        (Some(url), Some(token_file)) => Some(nginx::TronTarget { url, token_file }),
        _ => None,
    };
    let text = nginx::render_with(
        &nginx::NginxConfig {
            broker: a.broker,
            listen: a.listen,
            prefix: a.prefix,
            lua_dir: a.lua_dir,
            workers: a.workers,
            timeout_ms: a.timeout_ms,
            max_body_bytes: a.max_body_bytes,
            load_modules: !a.no_load_modules,
            log_level: a.log_level,
            routing: a.routing,
        },
        tron.as_ref(),
        &a.direct,
    )?;
    match a.out {
        Some(p) => std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

impl BrokerArgs {
    /// The broker URL with `--queue-type` in its query.
    fn url(&self) -> String {
        match &self.queue_type {
            Some(t) if self.broker.starts_with("amqp") => {
                let sep = if self.broker.contains('?') { '&' } else { '?' };
                format!("{}{sep}queue_type={t}", self.broker)
            }
            _ => self.broker.clone(),
        }
    }
}

fn broker(a: &BrokerArgs, embedded_ok: bool) -> Result<AnyBroker> {
    let b = AnyBroker::from_url(&a.url(), a.embedded_capacity)?;
    if matches!(b, AnyBroker::Embedded(_)) && !embedded_ok {
        bail!("the embedded broker lives inside one process: use `funcatron up`, or give --broker amqp://... to run roles separately");
    }
    Ok(b)
}

/// The bundles of `--bundles` that can serve: each broken one is
/// refused with its reason, and bundles that cannot be routed beside
/// another (the same name, conflicting bases) are refused in pairs, each
/// reason naming both; the rest serve. Tron and Runner alike load through
/// here, so a Runner never serves what its Tron refused.
fn load_bundles(a: &BundleArgs) -> Vec<Bundle> {
    let dir = &a.bundles;
    let (bundles, errors) = Bundle::load_all_in(dir, a.environment.as_deref());
    for e in &errors {
        tracing::error!(error = %e, "bundle rejected");
    }
    let (bundles, conflicts) = funcatron_tron::servable(bundles);
    for e in &conflicts {
        tracing::error!(error = %e, "bundle rejected");
    }
    if bundles.is_empty() {
        tracing::warn!(dir = %dir.display(), "no usable bundles");
    }
    bundles
}

/// What a Tron is started with beside its flags.
struct TronSetup {
    /// Its management tokens (with a store).
    tokens: Option<Tokens>,
    /// Where its autoscaler starts Runners, if it has one.
    substrate: Option<Arc<dyn funcatron_tron::autoscale::Substrate>>,
    /// Its listeners' limits.
    limits: Limits,
    /// Where peers' fetch URLs may point.
    outbound: OutboundPolicy,
    /// Where asynchronous calls are recorded, if anywhere.
    calls: Option<funcatron_calls::Calls>,
    /// The document store on that state store.
    documents: Option<funcatron_documents::Documents>,
}

/// The document store on the calls' state store.
fn documents_of(calls: Option<&funcatron_calls::Calls>) -> Option<funcatron_documents::Documents> {
    calls.map(|c| funcatron_documents::Documents::new(c.store().clone()))
}

/// Who may do what at `/_funcatron/store/...`, beside collection rules.
type StoreOperators = Option<Arc<dyn funcatron_documents::http::Operators>>;

/// The state store at `target` for asynchronous calls.
async fn open_calls(target: Option<&str>) -> Result<Option<funcatron_calls::Calls>> {
    let Some(target) = target else {
        return Ok(None);
    };
    let store = funcatron_store::AnyStore::open(target)
        .await
        .with_context(|| format!("opening the state store {target}"))?;
    Ok(Some(funcatron_calls::Calls::new(store)))
}

/// What the Runners a substrate starts are given beside their flags.
#[derive(Clone, Copy)]
pub(crate) struct RunnerGrants<'a> {
    /// The broker URL (by environment: it may hold credentials).
    pub broker_url: &'a str,
    /// The Tron's read token, to fetch archives with.
    pub read_token: Option<&'a str>,
    /// Where their fetches may go (the operator's allowlist and the Tron).
    pub outbound: &'a OutboundPolicy,
}

async fn tron(
    broker: AnyBroker,
    dir: &BundleArgs,
    o: &TronArgs,
    setup: TronSetup,
    shutdown: CancellationToken,
) -> Result<()> {
    let TronSetup {
        tokens,
        substrate,
        limits,
        outbound,
        calls,
        documents,
    } = setup;
    let mut node = TronNode::new(broker)
        .options(o.options())
        .bundles(load_bundles(dir));
    if let Some(docs) = &documents {
        node = node.documents(docs.clone());
    }
    if let Some(calls) = calls {
        node = node
            .calls(calls.with_key_scope(o.callback_key_scope))
            .callbacks_to(outbound.clone());
    }
    if let Some(substrate) = substrate {
        node = node.autoscaler(substrate, o.scale.options());
    }
    if let (Some(store), Some(tokens)) = (&o.store, tokens) {
        let lua_check: funcatron_tron::registry::Check = Arc::new(|b: &Bundle| {
            if b.runtime == funcatron_bundle::RuntimeKind::Lua {
                funcatron_runner::lua::LuaFunc::prepare(b, LuaLimits::default())
                    .map(drop)
                    .map_err(Into::into)
            } else {
                Ok(())
            }
        });
        let store_tokens = tokens.clone();
        let listener = tokio::net::TcpListener::bind(o.mgmt_listen)
            .await
            .with_context(|| format!("binding the management API to {}", o.mgmt_listen))?;
        node = node.management(Management {
            registry: funcatron_tron::registry::RegistryOptions {
                store: store.clone(),
                environment: dir.environment.clone(),
                static_bundles: Vec::new(),
                advertise: o.advertise(),
                // What the management API accepts, the replication path
                // accepts from a peer.
                limits: funcatron_bundle::archive::Limits {
                    max_archive_bytes: o.max_upload_bytes as u64,
                    ..Default::default()
                },
                check: Some(lua_check),
                ceilings: o.ceilings(),
                read_token: tokens.read.clone(),
                outbound,
                documents: documents.clone(),
            },
            listener,
            api: MgmtOptions {
                tokens,
                max_upload: o.max_upload_bytes,
                redact_query: o.redact_query.clone(),
                redact_json_fields: o.redact_json_fields.clone(),
            },
            extra: match documents {
                Some(docs) => metrics_routes("/metrics").merge(funcatron_documents::http::router(
                    docs,
                    Some(Arc::new(store_tokens)),
                )),
                None => metrics_routes("/metrics"),
            },
            limits,
        });
    }
    node.run(shutdown).await?;
    Ok(())
}

/// What a Runner follows: the static bundles of `dir` plus what the
/// registry enables (only `o.funcs` if given), fetched with `read_token`
/// where `outbound` allows.
fn follow_options(
    dir: &BundleArgs,
    o: &RunnerArgs,
    read_token: Option<String>,
    outbound: OutboundPolicy,
) -> FollowOptions {
    FollowOptions {
        static_bundles: load_bundles(dir),
        cache_dir: o.options().worker.cache_dir,
        environment: dir.environment.clone(),
        only: o.funcs.clone(),
        read_token,
        outbound,
    }
}

async fn runner(
    broker: AnyBroker,
    o: &RunnerArgs,
    follow: FollowOptions,
    levels: LevelHook,
    flow_store: Option<funcatron_runner::flow::FlowStore>,
    shutdown: CancellationToken,
) -> Result<()> {
    let base = o.options();
    let options = funcatron_runner::RunnerOptions {
        // Callback steps of pipelines go where the operator allows.
        flow_outbound: follow.outbound.clone(),
        flow_store: flow_store.or(base.flow_store.clone()),
        ..base
    };
    RunnerNode::new(broker)
        .options(options)
        .follow(follow)
        .log_levels(levels)
        .run(shutdown)
        .await;
    Ok(())
}

async fn ingress(
    broker: AnyBroker,
    o: &IngressArgs,
    (calls, documents): (
        Option<funcatron_calls::Calls>,
        Option<(funcatron_documents::Documents, StoreOperators)>,
    ),
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut extra = metrics_routes("/_funcatron/metrics");
    if let Some((docs, operators)) = documents {
        extra = extra.merge(funcatron_documents::http::router(docs, operators));
    }
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("binding {}", o.listen))?;
    funcatron_ingress::run_with(
        listener,
        broker,
        IngressOptions {
            limits,
            calls,
            ..o.options()
        },
        extra,
        shutdown,
    )
    .await?;
    Ok(())
}

async fn up(a: UpArgs, levels: LevelHook, shutdown: CancellationToken) -> Result<()> {
    let broker = broker(&a.broker, true)?;
    let dir = a.bundles.clone();
    let limits = a.metrics.listener.limits()?;
    let tokens = management_tokens(&a.tron)?;
    let read_token = tokens
        .as_ref()
        .and_then(|t| t.read.clone())
        .or_else(funcatron_runner::args::read_token_from_env);
    // Its Runners fetch from its Tron, whatever that Tron's address.
    let runner_outbound = a.outbound.policy_trusting(&a.tron.advertise())?;
    // One state store for the Tron and the ingress of `up` (an embedded
    // file is opened by one process, once).
    let state_target = match (&a.tron.state_store, &a.tron.store) {
        (Some(t), _) => t.clone(),
        (None, Some(dir)) => dir.join("records.redb").display().to_string(),
        (None, None) => "memory:".to_owned(),
    };
    let calls = open_calls(Some(&state_target)).await?;
    // Its in-process Runners keep pipelines' large values in that store.
    let flow_store = calls
        .as_ref()
        .map(|c| funcatron_runner::flow::FlowStore::Open(c.store().clone()));
    // `up` scales its Runners itself unless told `--substrate none`: on
    // the embedded broker as tasks of this process, else as the substrate
    // says (child processes by default).
    let substrate: Option<Arc<dyn funcatron_tron::autoscale::Substrate>> =
        if matches!(broker, AnyBroker::Embedded(_))
            && a.tron.scale.substrate.as_deref().unwrap_or("process") == "process"
        {
            let follow =
                follow_options(&dir, &a.runner, read_token.clone(), runner_outbound.clone());
            let rx = spawn_follower(&broker, follow, &shutdown);
            let base = a.runner.options();
            let options = funcatron_runner::RunnerOptions {
                flow_outbound: a.outbound.policy()?,
                flow_store: flow_store.clone().or(base.flow_store.clone()),
                ..base
            };
            let shared = funcatron_runner::RunnerShared::start(&options, &shutdown).await;
            Some(Arc::new(local::LocalSubstrate::new(
                broker.clone(),
                rx,
                options,
                Arc::clone(&levels),
                shared,
            )))
        } else {
            let broker_url = a.broker.url();
            let runners = RunnerGrants {
                broker_url: &broker_url,
                read_token: read_token.as_deref(),
                outbound: &runner_outbound,
            };
            scale::substrate(&a.tron.scale, runners, &dir, true).await?
        };
    let own_runner = substrate.is_none();
    // The embedded broker kept nothing across a restart: what the store
    // still has queued is queued again.
    if let (Some(c), AnyBroker::Embedded(_), Some(_)) = (&calls, &broker, &a.tron.store) {
        funcatron_calls::outcomes::requeue_pending(&broker, c)
            .await
            .context("queueing again the calls of the last run")?;
    }
    // The ingress of `up` serves the document store with the Tron's tokens.
    let operators: StoreOperators = tokens.clone().map(|t| Arc::new(t) as _);
    let shared_documents = documents_of(calls.as_ref());
    let documents = shared_documents.clone().map(|d| (d, operators));
    let setup = TronSetup {
        documents: shared_documents,
        tokens,
        substrate,
        limits: limits.clone(),
        outbound: a.outbound.policy()?,
        calls: calls.clone(),
    };
    let t = tokio::spawn({
        let (b, s, o, d) = (
            broker.clone(),
            shutdown.clone(),
            a.tron.clone(),
            dir.clone(),
        );
        async move { tron(b, &d, &o, setup, s).await }
    });
    let r = tokio::spawn({
        let (b, s, o) = (broker.clone(), shutdown.clone(), a.runner.clone());
        let follow =
            own_runner.then(|| follow_options(&dir, &a.runner, read_token, runner_outbound));
        async move {
            if let Some(follow) = follow {
                runner(b, &o, follow, levels, flow_store, s).await
            } else {
                Ok(())
            }
        }
    });
    let i = tokio::spawn({
        let (b, s, o) = (broker.clone(), shutdown.clone(), a.ingress.clone());
        async move { ingress(b, &o, (calls, documents), limits, s).await }
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

#[cfg(test)]
mod tests {
    /// Every subcommand's flags are consistent (clap checks names, groups
    /// and defaults only when asked, or at parse time in debug builds).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}

//! The Runner's consume loop: one subscription per Func queue, one task per
//! delivery, acknowledge only after the response is published.
//!
//! Every delivery goes through one skeleton, here, whatever its runtime:
//! decode, expiry check, request checks (found by the route the Tron sent,
//! [`headers::ROUTE`]), deadline, the runtime's call
//! ([`crate::runtime::Prepared`]), the response envelope with timings,
//! metrics and error logging ([`crate::invoke`]), publish the reply, then
//! acknowledge, then capture, then (for Funcs whose answers are checked)
//! compare the answer with the document and report what differs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;

use funcatron_broker::{
    AnyBroker, Broker, BrokerError, ConsumeOptions, Delivery, Message, QueueKind,
};
use funcatron_bundle::{Bundle, RuntimeKind};
use funcatron_control::headers;
use funcatron_control::names;
use funcatron_envelope::now_ms;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use std::collections::{BTreeMap, HashMap};

use std::path::{Path, PathBuf};
use tokio::sync::watch;

use funcatron_bundle::auth::{AuthRules, Guard};
use funcatron_bundle::cors::Cors;
use funcatron_bundle::validate::{self, Answer, Checks, ResponseChecks};

use crate::direct::Direct;
use crate::error::{DeliveryError, PrepareError, SecretError};
use crate::exec::ExecLimits;
use crate::follow::Desired;
use crate::invoke::InvokeError;
use crate::invoke::{self, Handled, Job, Unchecked};
use crate::lua::LuaLimits;
use crate::observe::{Load, Observer};
use crate::runtime::{Called, Prepared, Runtime};
use crate::worker::WorkerOptions;

/// One prepared Func version: the runtime its bundle names (and no other)
/// and its request and response checks per route (`METHOD /template`).
struct Version {
    prepared: Prepared,
    checks: HashMap<String, Arc<Checks>>,
    /// Documented responses, compiled once; empty when they do not compile
    /// (the reason is logged; requests are not affected).
    responses: HashMap<String, Arc<ResponseChecks>>,
    /// For messages without a route (from a Tron older than the route
    /// header): an `operationId`'s route when only one operation has it.
    routes: HashMap<String, Option<String>>,
    /// Whether a message without a route, for a shared `operationId`, was
    /// logged (once per version).
    ambiguous_logged: OnceLock<()>,
    /// The document's security schemes with their credentials; `None`
    /// when no operation requires any.
    guard: Option<Arc<Guard>>,
    /// The Func's CORS policy, if it has one.
    cors: Option<Arc<Cors>>,
    /// Its async policy's `async_only` ([`Job::async_only`]).
    async_only: bool,
    /// The routes (`METHOD /template`) whose direct requests stream their
    /// body to the Func: direct operations (`x-funcatron-direct`) of a
    /// runtime that reads bodies in pieces (Lua).
    streams_body: std::collections::HashSet<String>,
    /// Its pipelines (`x-funcatron-flow`) by route: requests to them
    /// start a flow instead of calling the Func's code ([`crate::flow`]).
    flows: std::collections::BTreeMap<String, Arc<funcatron_envelope::flow::FlowSpec>>,
    /// Its way to the document store, when its bundle declares `store`.
    store: Option<Arc<crate::store::StoreScope>>,
}

impl Version {
    fn broken(why: String) -> Version {
        Version {
            prepared: Prepared::Broken(why),
            checks: HashMap::new(),
            responses: HashMap::new(),
            routes: HashMap::new(),
            ambiguous_logged: OnceLock::new(),
            guard: None,
            cors: None,
            async_only: false,
            streams_body: std::collections::HashSet::new(),
            flows: std::collections::BTreeMap::new(),
            store: None,
        }
    }

    /// The route of a delivery: its header, else the only operation of its
    /// `operationId` (`None` when several share it: logged once, and the
    /// request runs unchecked).
    fn route<'a>(&'a self, func: &str, route: Option<&'a str>, operation: &str) -> Option<&'a str> {
        if route.is_some() {
            return route;
        }
        match self.routes.get(operation) {
            Some(Some(r)) => Some(r),
            Some(None) => {
                self.ambiguous_logged.get_or_init(|| {
                    tracing::warn!(func, operation, "a request without a route header (from an older Tron) for an operationId several operations share: not validated");
                });
                None
            }
            None => None,
        }
    }
}

/// Each `operationId`'s route, `None` for one several operations share.
fn routes_by_operation(b: &Bundle) -> HashMap<String, Option<String>> {
    let mut out: HashMap<String, Option<String>> = HashMap::new();
    for op in &b.operations {
        let key = validate::route_key(&op.method, &op.path);
        out.entry(op.operation_id.clone())
            .and_modify(|r| {
                if r.as_deref() != Some(key.as_str()) {
                    *r = None;
                }
            })
            .or_insert(Some(key));
    }
    out
}

/// The value of secret `name` for `bundle`: `<dir>/<func>/<NAME>`, else
/// `<dir>/<NAME>` (one trailing newline dropped).
pub fn read_secret(
    bundle: &Bundle,
    secrets_dir: Option<&Path>,
    name: &str,
) -> Result<String, SecretError> {
    // The name becomes a path under the secrets directory.
    if !funcatron_bundle::valid_var_name(name) {
        return Err(SecretError::BadName(name.to_owned()));
    }
    let Some(dir) = secrets_dir else {
        return Err(SecretError::NoSecretsDir(name.to_owned()));
    };
    let candidates = [dir.join(&bundle.name).join(name), dir.join(name)];
    let value = candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .ok_or_else(|| SecretError::Missing {
            name: name.to_owned(),
            per_func: candidates[0].display().to_string(),
            shared: candidates[1].display().to_string(),
        })?;
    let value = value.strip_suffix('\n').unwrap_or(&value);
    Ok(value.strip_suffix('\r').unwrap_or(value).to_owned())
}

/// The values of a bundle's secrets ([`read_secret`]), merged into its
/// `env`.
pub fn resolve_env(
    bundle: &Bundle,
    secrets_dir: Option<&Path>,
) -> Result<BTreeMap<String, String>, SecretError> {
    let mut env = bundle.env.clone();
    for name in &bundle.secrets {
        env.insert(name.clone(), read_secret(bundle, secrets_dir, name)?);
    }
    Ok(env)
}

/// The document's security schemes with the credentials the Func was
/// enabled with (`None` when no operation requires any).
fn guard_of(b: &Bundle, secrets_dir: Option<&Path>) -> Result<Option<Arc<Guard>>, String> {
    let rules = AuthRules::compile(&b.doc, &b.spec_file).map_err(|e| e.to_string())?;
    if rules.is_empty() {
        return Ok(None);
    }
    let secret = |name: &str| read_secret(b, secrets_dir, name).map_err(|e| e.to_string());
    Guard::new(rules, &b.auth, &secret)
        .map(|g| Some(Arc::new(g)))
        .map_err(|e| format!("security schemes: {e}"))
}

/// The Func's CORS policy, with the request headers each operation's
/// document declares (see [`funcatron_bundle::cors`]).
fn cors_of(b: &Bundle, checks: &HashMap<String, Checks>) -> Result<Option<Arc<Cors>>, String> {
    let Some(settings) = &b.cors else {
        return Ok(None);
    };
    let mut cors = Cors::new(settings).map_err(|e| e.to_string())?;
    let rules = AuthRules::compile(&b.doc, &b.spec_file).map_err(|e| e.to_string())?;
    for op in &b.operations {
        let route = validate::route_key(&op.method, &op.path);
        let mut headers = rules.header_names(&route);
        if let Some(c) = checks.get(&route) {
            headers.extend(c.header_names());
        }
        cors.declare(route, headers);
    }
    Ok(Some(Arc::new(cors)))
}

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Unacknowledged requests held per Func queue.
    pub prefetch: u16,
    /// Largest answer body a Func may give, in bytes: the answer travels
    /// as one broker message; a larger one is answered 502
    /// `reply_too_large`.
    pub max_reply_bytes: usize,
    /// Lua threads per Lua Func version (each holds the version prepared).
    pub workers: usize,
    /// Default limits for Lua Funcs.
    pub lua_limits: LuaLimits,
    /// Default limits for exec Funcs.
    pub exec_limits: ExecLimits,
    /// Defaults for Python, Node.js and Java Funcs.
    pub worker: WorkerOptions,
    /// Where secret values are read from (see [`resolve_env`]).
    pub secrets_dir: Option<PathBuf>,
    /// How worker and exec Funcs are isolated ([`crate::sandbox`]).
    pub sandbox: crate::sandbox::SandboxOptions,
    /// Answer every Func's failures with their full detail (tracebacks,
    /// paths, stderr), as a Func's `debug` setting does for that Func; by
    /// default clients get a generic message
    /// ([`crate::invoke::InvokeError::client_message`]). `funcatron dev`
    /// sets it; not for production.
    pub debug_errors: bool,
    /// Check every Func's answers against its document's responses and
    /// report mismatches, as a Func's `check_responses` setting does for
    /// that Func. `funcatron dev` sets it.
    pub check_responses: bool,
    /// The direct listener ([`crate::direct`]).
    pub direct: crate::direct::DirectOptions,
    /// The cluster secret pipelines' state is signed with (every Runner a
    /// flow passes must have the same; the read token serves): `None`
    /// signs with a key of this process only ([`crate::flow`]).
    pub flow_key: Option<String>,
    /// Where pipelines' `callback` steps may send (the operator's
    /// `--allow-outbound`; by default no private or loopback address).
    pub flow_outbound: funcatron_control::outbound::OutboundPolicy,
    /// Where pipelines' large `set` values go ([`crate::flow::FlowStore`]).
    pub flow_store: Option<crate::flow::FlowStore>,
    /// From which size (JSON bytes) a value goes there.
    pub flow_inline_bytes: usize,
}

/// Where caches go unless told: `$XDG_CACHE_HOME/funcatron`,
/// `$HOME/.cache/funcatron`, else the temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("funcatron");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".cache/funcatron");
    }
    std::env::temp_dir().join("funcatron-cache")
}

/// Check that `bundle` can run here without serving it: its secrets are
/// supplied, its document's schemas compile, and its code loads (Lua:
/// prepared; Python, Node.js, Java: prepared and one worker started). What
/// `funcatron dev` runs before it switches to a saved version.
pub async fn check(bundle: &Bundle, options: &RunnerOptions) -> Result<(), PrepareError> {
    let env = resolve_env(bundle, options.secrets_dir.as_deref())?;
    validate::compile_bundle(bundle)?;
    let mut b = bundle.clone();
    b.env = env;
    match b.runtime {
        RuntimeKind::Lua => {
            let limits = options.lua_limits;
            tokio::task::spawn_blocking(move || crate::lua::LuaFunc::prepare(&b, limits).map(drop))
                .await
                .map_err(|e| PrepareError::Lua(e.to_string()))?
        }
        RuntimeKind::Python | RuntimeKind::Node | RuntimeKind::Java => {
            let isolation = sandboxed(&options.sandbox).await?;
            crate::worker::check(&b, &options.worker, &isolation).await
        }
        RuntimeKind::Exec => sandboxed(&options.sandbox).await.map(drop),
    }
}

/// The isolation worker and exec Funcs get, or why they cannot run here.
async fn sandboxed(
    options: &crate::sandbox::SandboxOptions,
) -> Result<crate::sandbox::Isolation, PrepareError> {
    match options.isolation().await {
        crate::sandbox::Isolation::Unavailable(why) => Err(PrepareError::Sandbox(why)),
        other => Ok(other),
    }
}

/// One version of one Func being served: its runtimes, its queue's
/// consumer and the deliveries in flight.
struct Serving {
    name: String,
    queue: String,
    /// Its queue of asynchronous calls, drained before it is retired too.
    async_queue: String,
    /// Stops the consumer (deliveries in flight finish).
    stop: CancellationToken,
    tasks: TaskTracker,
    load: Arc<Load>,
    /// Shared with its consumer ([`Consumer::debug`]).
    debug: Arc<AtomicBool>,
    /// Shared with its consumer ([`Consumer::check_responses`]).
    check_responses: Arc<AtomicBool>,
    /// The settings it was prepared with ([`PreparedWith::of`]).
    prepared_with: PreparedWith,
}

/// The parts of a version's settings that its preparation depends on
/// (its process environment and secrets, limits, workers, security
/// credentials): re-enabled with others, the version is prepared again.
#[derive(Debug, Clone, PartialEq)]
struct PreparedWith {
    env: BTreeMap<String, String>,
    secrets: Vec<String>,
    timeout_ms: Option<u64>,
    memory_bytes: Option<usize>,
    concurrency: Option<usize>,
    auth: BTreeMap<String, funcatron_control::state::SchemeCredentials>,
    cors: Option<funcatron_control::state::CorsSettings>,
    async_policy: funcatron_control::calls::AsyncPolicy,
}

impl PreparedWith {
    fn of(b: &Bundle) -> Self {
        PreparedWith {
            env: b.env.clone(),
            secrets: b.secrets.clone(),
            timeout_ms: b.timeout_ms,
            memory_bytes: b.memory_bytes,
            concurrency: b.concurrency,
            auth: b.auth.clone(),
            cors: b.cors.clone(),
            async_policy: b.async_policy.clone(),
        }
    }
}

/// Serve whatever set of bundle versions `desired` holds, following its
/// changes: a new version is prepared and consumed at once; a version no
/// longer wanted keeps consuming until its queue is empty and nothing is in
/// flight (requests routed to it before a switch finish on it), then its
/// runtimes are dropped. Returns after `shutdown`, with everything in flight
/// finished and acknowledged.
pub(crate) async fn serve(
    broker: AnyBroker,
    mut desired: watch::Receiver<Desired>,
    options: RunnerOptions,
    observer: Observer,
    shared: crate::node::RunnerShared,
    shutdown: CancellationToken,
) {
    let mut active: HashMap<(String, String), Serving> = HashMap::new();
    // One reply queue for every Func's store calls, opened at the first.
    let store = crate::store::StoreClient::new(broker.clone());
    // One pool of Lua threads for every Lua Func served.
    let ctx = VersionCtx {
        broker: &broker,
        options: &options,
        observer: &observer,
        direct: &shared.direct,
        lua: &shared.lua,
        flows: &shared.flows,
        store: &store,
    };
    let retiring = TaskTracker::new();
    let mut watching = true;
    // Timed log levels end on their own: look again every second.
    let mut expire = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let want = desired.borrow_and_update().clone();
        observer.apply(&want.captures, &want.log_levels);
        let keys: std::collections::HashSet<(String, String)> = want
            .bundles
            .iter()
            .map(|b| (b.name.clone(), b.version.clone()))
            .collect();
        for b in &want.bundles {
            let key = (b.name.clone(), b.version.clone());
            match active.entry(key) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(start_version(&ctx, b).await);
                }
                // Re-enabled with settings its preparation depends on:
                // prepared again, the old one stops taking work and
                // finishes what it holds.
                std::collections::hash_map::Entry::Occupied(mut serving)
                    if serving.get().prepared_with != PreparedWith::of(b) =>
                {
                    tracing::info!(func = %b.name, version = %b.version, "settings changed: preparing the version again");
                    let fresh = start_version(&ctx, b).await;
                    let old = std::mem::replace(serving.get_mut(), fresh);
                    old.stop.cancel();
                    old.tasks.close();
                    retiring.spawn(async move { old.tasks.wait().await });
                }
                // Re-enabled with other settings: `debug` and
                // `check_responses` apply at once.
                std::collections::hash_map::Entry::Occupied(serving) => {
                    let s = serving.get();
                    s.debug
                        .store(options.debug_errors || b.debug, Ordering::Relaxed);
                    s.check_responses.store(
                        options.check_responses || b.check_responses,
                        Ordering::Relaxed,
                    );
                }
            }
        }
        let gone: Vec<(String, String)> = active
            .keys()
            .filter(|k| !keys.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(s) = active.remove(&key) {
                retiring.spawn(retire(broker.clone(), s, shutdown.clone()));
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = expire.tick(), if !want.log_levels.is_empty() => {
                    observer.apply(&want.captures, &want.log_levels);
                    continue;
                }
                changed = desired.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                    }
                }
            }
            break;
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    for s in active.values() {
        s.stop.cancel();
        s.tasks.close();
    }
    for s in active.values() {
        s.tasks.wait().await;
    }
    retiring.close();
    retiring.wait().await;
}

/// What preparing and serving a version uses: the Runner's broker, settings,
/// observer, direct listener and Lua threads.
struct VersionCtx<'a> {
    broker: &'a AnyBroker,
    options: &'a RunnerOptions,
    observer: &'a Observer,
    direct: &'a Arc<Direct>,
    lua: &'a Arc<crate::lua::LuaThreads>,
    flows: &'a Arc<crate::flow::FlowEngine>,
    store: &'a Arc<crate::store::StoreClient>,
}

/// Prepare one bundle version: its secrets, its checks, then its runtime.
/// A version that cannot run is still served: its requests get 500 with
/// the reason.
async fn prepare_version(ctx: &VersionCtx<'_>, b: &Bundle) -> Version {
    let (options, observer) = (ctx.options, ctx.observer);
    let ready = resolve_env(b, options.secrets_dir.as_deref())
        .map_err(PrepareError::from)
        .and_then(|env| Ok((env, validate::compile_bundle(b)?)));
    let ready = ready.map_err(|e| e.to_string()).and_then(|(env, checks)| {
        let guard = guard_of(b, options.secrets_dir.as_deref())?;
        let cors = cors_of(b, &checks)?;
        Ok((env, checks, guard, cors))
    });
    let (env, checks, guard, cors) = match ready {
        Ok(r) => r,
        Err(why) => {
            tracing::error!(func = %b.name, error = %why, "bundle cannot run; its requests get 500 with this reason");
            return Version::broken(why.to_string());
        }
    };
    let responses = match validate::compile_responses(b) {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(func = %b.name, error = %why, "the document's responses do not compile; answers are not checked");
            HashMap::new()
        }
    };
    let mut b = b.clone();
    b.env = env;
    let prepared = match Prepared::prepare(&b, options, observer, ctx.lua).await {
        Ok(p) => p,
        Err(why) => {
            tracing::error!(func = %b.name, error = %why, "bundle failed to prepare; its requests get 500 with this reason");
            Prepared::Broken(match why {
                PrepareError::Lua(msg) => format!("bundle failed to load: {msg}"),
                other => other.to_string(),
            })
        }
    };
    Version {
        prepared,
        checks: checks.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        responses: responses
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
        routes: routes_by_operation(&b),
        ambiguous_logged: OnceLock::new(),
        guard,
        cors,
        async_only: b.async_policy.async_only.unwrap_or(false),
        streams_body: if b.runtime == RuntimeKind::Lua {
            b.operations
                .iter()
                .filter(|op| op.direct)
                .map(|op| validate::route_key(&op.method, &op.path))
                .collect()
        } else {
            std::collections::HashSet::new()
        },
        flows: crate::flow::flows_of(&b),
        store: (!b.store_access.is_empty()).then(|| crate::store::StoreScope::of(ctx.store, &b)),
    }
}

/// Prepare one bundle version and start consuming its queue.
async fn start_version(vctx: &VersionCtx<'_>, b: &Bundle) -> Serving {
    let (broker, options, observer, direct) =
        (vctx.broker, vctx.options, vctx.observer, vctx.direct);
    let version = Arc::new(prepare_version(vctx, b).await);
    let queue = names::func_queue(&b.name, &b.version);
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let load = observer.load_for(&b.name);
    let debug = Arc::new(AtomicBool::new(options.debug_errors || b.debug));
    let check_responses = Arc::new(AtomicBool::new(
        options.check_responses || b.check_responses,
    ));
    let outcome_headers = Arc::new(vec![
        (headers::FUNC.to_owned(), b.name.clone()),
        (
            headers::ASYNC_POLICY.to_owned(),
            serde_json::to_string(&b.async_policy).unwrap_or_default(),
        ),
    ]);
    let policy = Arc::new(b.async_policy.resolved().unwrap_or_default());
    let async_queue = names::func_async_queue(&b.name, &b.version);
    // Async calls run at most `concurrency` at once (default: one worker
    // fewer than the Runner has, at least one), so a synchronous request
    // always finds a worker free however long the async backlog; the
    // broker still delivers a prefetch's worth ahead.
    let async_running = b
        .async_policy
        .concurrency
        .map_or(options.workers.saturating_sub(1).max(1), usize::from);
    let async_prefetch = b.async_policy.concurrency.unwrap_or(options.prefetch);
    let async_permits = Arc::new(tokio::sync::Semaphore::new(async_running));
    for (q, is_async, prefetch) in [
        (&queue, false, options.prefetch),
        (&async_queue, true, async_prefetch),
    ] {
        let consumed = broker
            .consume(
                q,
                QueueKind::Work,
                ConsumeOptions {
                    prefetch,
                    auto_ack: false,
                },
            )
            .await;
        match consumed {
            Ok(sub) => {
                tracing::info!(func = %b.name, version = %b.version, queue = %q, "serving Func");
                let ctx = Consumer {
                    broker: broker.clone(),
                    observer: observer.clone(),
                    version: Arc::clone(&version),
                    func: Arc::from(b.name.as_str()),
                    version_name: Arc::from(b.version.as_str()),
                    queue: Arc::from(q.as_str()),
                    is_async,
                    running: is_async.then(|| Arc::clone(&async_permits)),
                    outcome_headers: Arc::clone(&outcome_headers),
                    policy: Arc::clone(&policy),
                    load: Arc::clone(&load),
                    max_reply_bytes: options.max_reply_bytes,
                    debug: Arc::clone(&debug),
                    check_responses: Arc::clone(&check_responses),
                    direct: Arc::clone(direct),
                    flows: Arc::clone(vctx.flows),
                    tasks: tasks.clone(),
                };
                tasks.spawn(consume(Arc::new(ctx), sub, stop.clone()));
            }
            Err(e) => {
                tracing::error!(func = %b.name, queue = %q, error = %e, "cannot consume the Func's queue")
            }
        }
    }
    Serving {
        name: b.name.clone(),
        queue,
        async_queue,
        stop,
        tasks,
        load,
        debug,
        check_responses,
        prepared_with: PreparedWith::of(b),
    }
}

/// Stop serving a version once nothing is left for it: its queue empty and
/// no request in flight (at least a moment after it was retired, so
/// requests routed just before a switch arrive), or at `shutdown`.
async fn retire(broker: AnyBroker, s: Serving, shutdown: CancellationToken) {
    let retired = std::time::Instant::now();
    let grace = std::time::Duration::from_millis(500);
    let limit = std::time::Duration::from_secs(120);
    loop {
        let mut idle = s.load.in_flight() == 0;
        for q in [&s.queue, &s.async_queue] {
            if idle {
                idle = broker.depth(q).await.map(|d| d.ready == 0).unwrap_or(true);
            }
        }
        if (idle && retired.elapsed() >= grace) || retired.elapsed() >= limit {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
        }
    }
    tracing::info!(func = %s.name, queue = %s.queue, "retired a Func version");
    s.stop.cancel();
    s.tasks.close();
    s.tasks.wait().await;
}

/// What every delivery of one Func version's queue shares.
struct Consumer {
    broker: AnyBroker,
    observer: Observer,
    version: Arc<Version>,
    func: Arc<str>,
    version_name: Arc<str>,
    queue: Arc<str>,
    /// This consumes the version's queue of asynchronous calls: outcomes
    /// are published persistent, with [`Consumer::outcome_headers`].
    is_async: bool,
    /// For the async queue: permits to run a call (see [`start_version`]).
    running: Option<Arc<tokio::sync::Semaphore>>,
    /// The Func and its async policy, for the Tron applying an outcome.
    outcome_headers: Arc<Vec<(String, String)>>,
    /// That policy, resolved: it retries the steps of asynchronous flows
    /// this version runs.
    policy: Arc<funcatron_control::calls::Resolved>,
    load: Arc<Load>,
    /// Largest answer body sent as one message ([`RunnerOptions::max_reply_bytes`]).
    max_reply_bytes: usize,
    /// Failures answered in full: the version's `debug` setting (it
    /// follows re-enables of the same version) or
    /// [`RunnerOptions::debug_errors`].
    debug: Arc<AtomicBool>,
    /// Answers checked against the document: the version's
    /// `check_responses` setting (it follows re-enables) or
    /// [`RunnerOptions::check_responses`].
    check_responses: Arc<AtomicBool>,
    /// The Runner's direct listener, where direct requests are claimed.
    direct: Arc<Direct>,
    /// The Runner's flow engine ([`crate::flow`]).
    flows: Arc<crate::flow::FlowEngine>,
    /// The version's tasks: a claimed direct request runs as one of them,
    /// so retiring the version waits for it.
    tasks: TaskTracker,
}

/// Consume one Func queue until `stop`. On `stop` the consumer is
/// cancelled, what the broker had already delivered (prefetch) is handled
/// too, and the subscription stays open until every delivery is
/// acknowledged: scale-in and shutdown make the broker redeliver nothing.
async fn consume(
    ctx: Arc<Consumer>,
    mut sub: funcatron_broker::Subscription,
    stop: CancellationToken,
) {
    let in_flight = TaskTracker::new();
    let mut stopping = false;
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                sub.cancel().await;
                continue;
            }
            d = sub.next() => match d { Some(d) => d, None => break },
        };
        ctx.load.begin();
        let ctx = Arc::clone(&ctx);
        in_flight.spawn(async move {
            let started = std::time::Instant::now();
            handle(&ctx, delivery).await;
            ctx.load.end(started.elapsed());
        });
    }
    in_flight.close();
    in_flight.wait().await;
    drop(sub);
}

async fn dead_letter(broker: &AnyBroker, queue: &str, delivery: Delivery, why: &str) {
    metrics::counter!("runner_dead_lettered_total").increment(1);
    broker.dead_letter(queue, delivery, why).await;
}

/// Acknowledge `delivery`. A failure is logged and counted by the broker
/// seam (`broker_settle_failures_total`); the broker redelivers it.
async fn ack(delivery: Delivery) {
    let _ = delivery.ack().await;
}

/// Put `delivery` back on its queue. A failure is logged and counted by
/// the broker seam; the broker redelivers it when the channel closes.
async fn requeue(delivery: Delivery) {
    let _ = delivery.nack(true).await;
}

fn path_params(delivery: &Delivery) -> Result<Vec<(String, String)>, DeliveryError> {
    let Some(raw) = delivery.message.header(headers::PATH_PARAMS) else {
        return Ok(Vec::new());
    };
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(raw).map_err(|source| DeliveryError::PathParams { source })?;
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect())
}

/// What the Tron's headers say about a delivery, or why it cannot be
/// handled (it goes to the dead-letter queue).
fn job_for(ctx: &Consumer, delivery: &Delivery, picked_ms: f64) -> Result<Job, DeliveryError> {
    let Some(operation) = delivery
        .message
        .header(headers::OPERATION)
        .map(str::to_owned)
    else {
        return Err(DeliveryError::NoOperation);
    };
    let params = path_params(delivery)?;
    let route = ctx.version.route(
        &ctx.func,
        delivery.message.header(headers::ROUTE),
        &operation,
    );
    let checks = route.and_then(|r| ctx.version.checks.get(r)).cloned();
    // Only secured operations pay for the check (and an unknown route of
    // a secured Func is refused: fail closed).
    let auth = ctx.version.guard.as_ref().and_then(|g| match route {
        Some(r) if !g.guards(r) => None,
        r => Some(invoke::AuthJob {
            guard: Arc::clone(g),
            route: r.map(str::to_owned),
        }),
    });
    let responses = if ctx.check_responses.load(Ordering::Relaxed) {
        route.and_then(|r| ctx.version.responses.get(r)).cloned()
    } else {
        None
    };
    let dispatched_ms = delivery
        .message
        .header(headers::DISPATCHED_MS)
        .and_then(|v| v.parse::<f64>().ok());
    let preflight = delivery.message.header(headers::PREFLIGHT).map(|allow| {
        let template = delivery
            .message
            .header(headers::ROUTE)
            .and_then(|r| r.split_once(' '))
            .map_or("", |(_, t)| t);
        invoke::PreflightJob {
            allow: allow.to_owned(),
            template: template.to_owned(),
        }
    });
    Ok(Job {
        payload: delivery.message.payload.clone(),
        operation,
        params,
        picked_ms,
        dispatched_ms,
        checks,
        auth,
        responses,
        observer: ctx.observer.clone(),
        max_reply_bytes: ctx.max_reply_bytes,
        debug: ctx.debug.load(Ordering::Relaxed),
        cors: ctx.version.cors.clone(),
        preflight,
        async_only: ctx.version.async_only,
        direct_body: None,
        direct: None,
        store: ctx.version.store.clone(),
    })
}

/// One delivery, start to end: decode, expiry, checks, deadline, the
/// runtime's call, the response envelope; then [`settle`] publishes the
/// reply, acknowledges and captures.
async fn handle(ctx: &Arc<Consumer>, delivery: Delivery) {
    let picked_ms = now_ms();
    let func = &*ctx.func;
    if delivery.redelivered {
        // Another Runner took it and died (or a connection broke) before
        // acknowledging; it runs again here.
        metrics::counter!("runner_redelivered_total").increment(1);
        tracing::info!(func, "handling a redelivered request");
    }
    let job = match job_for(ctx, &delivery, picked_ms) {
        Ok(job) => job,
        Err(why) => return dead_letter(&ctx.broker, &ctx.queue, delivery, &why.to_string()).await,
    };
    if !ctx.is_async && delivery.message.header(headers::DIRECT).is_some() {
        return offer_direct(ctx, delivery, job).await;
    }
    let flow = match flow_call(ctx, &delivery, &job) {
        Ok(f) => f,
        Err(()) => return refuse_forged_flow(ctx, delivery).await,
    };
    let span = tracing::debug_span!(
        "runner.invoke",
        func,
        version = &*ctx.version_name,
        request_id = tracing::field::Empty,
        stage = tracing::field::Empty,
    );
    if let Some(stage) = stage_of(&delivery) {
        span.record("stage", stage.as_str());
    }
    async {
        let payload = job.payload.clone();
        let handled = match &job.preflight {
            // Answered here: the Func never sees a preflight.
            Some(p) => invoke::preflight(func, &job, p),
            None => {
                let _permit = match &ctx.running {
                    Some(p) => Arc::clone(p).acquire_owned().await.ok(),
                    None => None,
                };
                let notice = ctx.is_async.then(|| announce_start(ctx, &payload));
                let handled = match &flow {
                    // The flow's first data: the request, checked like
                    // any request to the operation.
                    FlowCall::Start(..) => invoke::run_sync(func, &job, u64::MAX, |req| {
                        Called::now(Ok(crate::invoke::FuncResponse {
                            status: 200,
                            headers: req
                                .envelope
                                .header_values("content-type")
                                .next()
                                .map(|ct| ("content-type".to_owned(), ct.to_owned()))
                                .into_iter()
                                .collect(),
                            body: req.body.to_vec(),
                        }))
                    }),
                    _ => call_version(&ctx.func, &ctx.version.prepared, job).await,
                };
                if let Some(n) = notice {
                    n.abort();
                }
                handled
            }
        };
        settle(ctx, delivery, &payload, handled, flow).await;
    }
    .instrument(span)
    .await
}

/// A direct request: issue a ticket holding its job, answer the ingress
/// with the ticket's URL, then acknowledge ([`crate::direct`]). The job
/// runs when the ingress claims the ticket.
async fn offer_direct(ctx: &Arc<Consumer>, delivery: Delivery, job: Job) {
    let payload = job.payload.clone();
    // The routing fields are all a ticket needs (headers and body skipped).
    let head = match funcatron_envelope::RouteView::decode(&payload) {
        Ok(r) => r,
        Err(why) => return dead_letter(&ctx.broker, &ctx.queue, delivery, &why.to_string()).await,
    };
    let Some(reply_to) = head.reply_to.as_deref() else {
        // Nobody could claim it.
        return ack(delivery).await;
    };
    let left_ms = head.deadline_ms as f64 - now_ms();
    if left_ms <= 0.0 {
        metrics::counter!("runner_expired_total").increment(1);
        return ack(delivery).await;
    }
    let ttl = ctx
        .direct
        .options()
        .ticket_ttl
        .min(std::time::Duration::from_millis(left_ms as u64));
    let route = ctx.version.route(
        &ctx.func,
        delivery.message.header(headers::ROUTE),
        &job.operation,
    );
    let stream_body = route.is_some_and(|r| ctx.version.streams_body.contains(r));
    let run_ctx = Arc::clone(ctx);
    let start: crate::direct::Start = Box::new(move |body, io| {
        let tasks = run_ctx.tasks.clone();
        tasks.spawn(async move {
            let mut job = job;
            job.direct_body = body;
            job.direct = Some(io);
            run_ctx.load.begin();
            let started = std::time::Instant::now();
            let handled = call_version(&run_ctx.func, &run_ctx.version.prepared, job).await;
            run_ctx.load.end(started.elapsed());
            handled
        })
    });
    let ticket = crate::direct::Ticket {
        expires: std::time::Instant::now() + ttl,
        stream_body,
        start,
    };
    let answer = match ctx.direct.issue(ticket) {
        Ok(url) => funcatron_envelope::Response {
            version: std::borrow::Cow::Borrowed(funcatron_envelope::VERSION),
            id: head.id.clone(),
            status: 200,
            reply_key: head.reply_key.clone(),
            direct_url: Some(std::borrow::Cow::Owned(url)),
            ..Default::default()
        },
        Err((code, why)) => {
            let mut r = funcatron_envelope::Response::error(&head.id, 503, code, &why);
            r.reply_key = head.reply_key.clone();
            r
        }
    };
    match ctx
        .broker
        .publish(reply_to, Message::new(answer.encode()))
        .await
    {
        Ok(()) | Err(BrokerError::NoRoute(_)) => ack(delivery).await,
        Err(e) => {
            tracing::warn!(func = &*ctx.func, request_id = %head.id, error = %e, "direct ticket not sent; requeueing the request");
            requeue(delivery).await;
        }
    }
}

/// How long an async attempt runs before the Trons are told it started:
/// a call that ends sooner goes from queued to its outcome, and costs no
/// record write for a state nobody could have seen.
const ANNOUNCE_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// Tell the Trons an async call's attempt has started (its record shows
/// `running`) once it has run for [`ANNOUNCE_AFTER`], off the call's path:
/// the notice is advisory, so it is not persistent and nothing waits for
/// it. The caller aborts the returned task when the attempt ends.
fn announce_start(ctx: &Consumer, payload: &bytes::Bytes) -> tokio::task::JoinHandle<()> {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow)]
        call_id: Option<std::borrow::Cow<'a, str>>,
        attempt: Option<u32>,
    }
    let started_ms = now_ms() as u64;
    let (broker, func, payload) = (ctx.broker.clone(), Arc::clone(&ctx.func), payload.clone());
    tokio::spawn(async move {
        tokio::time::sleep(ANNOUNCE_AFTER).await;
        let Ok(Ids {
            call_id: Some(call_id),
            attempt,
        }) = serde_json::from_slice::<Ids>(&payload)
        else {
            return;
        };
        let message = Message {
            payload: start_notice(&call_id, attempt.unwrap_or(1), started_ms).into(),
            headers: vec![
                (headers::FUNC.to_owned(), func.to_string()),
                (headers::PHASE.to_owned(), headers::PHASE_STARTED.to_owned()),
            ],
            persistent: false,
            ttl_ms: None,
        };
        if let Err(e) = broker.publish(names::OUTCOMES, message).await {
            tracing::debug!(error = %e, "start of an async attempt not announced");
        }
    })
}

/// The body of a start notice: `{"call_id", "attempt", "started_ms"}`
/// (`funcatron_calls::outcomes::Started`).
fn start_notice(call_id: &str, attempt: u32, started_ms: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "call_id": call_id,
        "attempt": attempt,
        "started_ms": started_ms,
    }))
    .unwrap_or_default()
}

/// Decode, skip if expired, check, start, call, finish.
/// One request through the skeleton, by the version's runtime.
async fn call_version(func: &Arc<str>, prepared: &Prepared, job: Job) -> Handled {
    match prepared {
        // Lua runs the same skeleton on the thread holding its state.
        Prepared::Lua(pool) => pool.run(func, job).await,
        Prepared::Exec(r) => run(func, r, &job).await,
        Prepared::Worker(r) => run(func, r, &job).await,
        Prepared::Broken(why) => invoke::run_sync(func, &job, 0, |_| {
            Called::now(Err(InvokeError::Broken(why.clone())))
        }),
        Prepared::Refused(why) => invoke::run_sync(func, &job, 0, |_| {
            Called::now(Err(InvokeError::SandboxUnavailable(why.clone())))
        }),
    }
}

/// The skeleton around an awaited runtime call.
async fn run(func: &str, runtime: &impl Runtime, job: &Job) -> Handled {
    let (mut req, body) = match invoke::decode(job) {
        Ok(r) => r,
        Err(why) => return Handled::Undecodable(why.to_string()),
    };
    if let Err(e) = invoke::authorize(func, job, &mut req) {
        return invoke::finish(func, job, &req, std::time::Instant::now(), Err(e));
    }
    let fr = match invoke::start(func, &req, body, job, runtime.max_time_ms()) {
        Ok(fr) => fr,
        Err(h) => return h,
    };
    let called = runtime.call(fr).await;
    invoke::finish(func, job, &req, called.started, called.result)
}

/// After the reply is out: how the Func's answer differs from its
/// document, reported to the Runner's log, the Func's log (stream
/// `response`, which `funcatron dev` shows) and
/// `runner_response_mismatches_total`. The answer itself was sent as is.
fn report_mismatches(ctx: &Consumer, request_id: &str, u: &Unchecked) {
    let operation = u.operation.as_str();
    let problems = u.checks.check(&Answer {
        status: u.answer.status,
        headers: &u.answer.headers,
        body: &u.answer.body,
    });
    if problems.is_empty() {
        return;
    }
    let func = &*ctx.func;
    metrics::counter!("runner_response_mismatches_total", "func" => func.to_owned()).increment(1);
    let problems = problems.join("; ");
    tracing::warn!(request_id, func, operation, status = u.answer.status, problems = %problems, "the Func's answer does not match its document");
    ctx.observer.func_log(
        func,
        &ctx.version_name,
        request_id,
        RESPONSE_STREAM,
        &crate::observe::log_line(&format!(
            "{operation} answered {} not as documented: {problems}",
            u.answer.status
        )),
    );
}

/// The Func log stream response mismatches are reported on.
pub const RESPONSE_STREAM: &str = "response";

/// Publish the reply, then acknowledge, then capture; or skip, dead-letter
/// or requeue. An answer to check is checked last, off the answer's path.
async fn settle(
    ctx: &Consumer,
    delivery: Delivery,
    payload: &bytes::Bytes,
    handled: Handled,
    flow: FlowCall,
) {
    match handled {
        Handled::Reply {
            request_id,
            reply_to,
            status,
            response,
            unchecked,
        } => {
            tracing::Span::current().record("request_id", request_id.as_str());
            tracing::debug!(status, "invoked");
            if !matches!(flow, FlowCall::None) {
                let phase = ctx.is_async.then(|| crate::flow::AsyncPhase {
                    policy: &ctx.policy,
                    outcome_headers: &ctx.outcome_headers,
                });
                let start = match &flow {
                    FlowCall::Start(name, spec) => Some((name.as_str(), &**spec)),
                    _ => None,
                };
                let next = ctx
                    .flows
                    .next(&ctx.broker, payload, &response, start, phase)
                    .await;
                let (next, cleanup) = match next {
                    Ok(advanced) => {
                        if let Err(e) = publish_notes(ctx, advanced.notes).await {
                            tracing::warn!(error = %e, "flow step notes not published; requeueing the request");
                            return requeue(delivery).await;
                        }
                        (Ok(advanced.next), advanced.cleanup)
                    }
                    Err(e) => (Err(e), Vec::new()),
                };
                // A fire-and-forget flow runs to its end; its answer goes
                // to no one.
                let to = reply_to.as_deref().unwrap_or_default();
                if send_next(ctx, delivery, payload, to, next).await {
                    ctx.flows.forget(cleanup);
                }
                return;
            }
            let Some(reply_to) = reply_to else {
                ack(delivery).await;
                if let Some(u) = &unchecked {
                    report_mismatches(ctx, &request_id, u);
                }
                return;
            };
            if !ctx.is_async && delivery.message.header(headers::CHAIN).is_some() {
                let next = crate::chain::next(payload, &response);
                send_next(ctx, delivery, payload, &reply_to, next).await;
                return;
            }
            let response = bytes::Bytes::from(response);
            let message = if ctx.is_async {
                // An outcome, for the Tron to record: it must survive a
                // broker restart, and says whose policy applies.
                Message {
                    payload: response.clone(),
                    headers: ctx.outcome_headers.as_ref().clone(),
                    persistent: true,
                    ttl_ms: None,
                }
            } else {
                Message::new(response.clone())
            };
            match ctx.broker.publish(&reply_to, message).await {
                // NoRoute: the ingress that asked is gone; the work is done.
                Ok(()) | Err(BrokerError::NoRoute(_)) => {
                    ack(delivery).await;
                    ctx.observer
                        .maybe_capture(&ctx.func, &ctx.version_name, payload, &response);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reply not published; requeueing the request");
                    return requeue(delivery).await;
                }
            }
            if let Some(u) = &unchecked {
                report_mismatches(ctx, &request_id, u);
            }
        }
        Handled::Expired { request_id } => {
            tracing::debug!(%request_id, "skipped: deadline passed before the Func ran");
            metrics::counter!("runner_expired_total").increment(1);
            ack(delivery).await;
        }
        Handled::Undecodable(why) => dead_letter(&ctx.broker, &ctx.queue, delivery, &why).await,
        Handled::Requeue(why) => {
            tracing::warn!(reason = %why, "requeueing the request");
            requeue(delivery).await;
        }
    }
}

/// Which stage of a chain (`stages[i]`) or step of a pipeline
/// (`steps[i]`, `on_failure`, `finally`) a delivery is, for its log lines;
/// `None` for a plain request (not decoded then).
fn stage_of(delivery: &Delivery) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct At {
        #[serde(default)]
        at: u32,
        #[serde(default)]
        phase: Option<funcatron_envelope::flow::Phase>,
    }
    #[derive(serde::Deserialize)]
    struct View {
        flow: Option<At>,
        chain: Option<At>,
    }
    let m = &delivery.message;
    if m.header(headers::FLOW).is_none() && m.header(headers::CHAIN).is_none() {
        return None;
    }
    let v: View = serde_json::from_slice(&m.payload).ok()?;
    use funcatron_envelope::flow::Phase;
    match (v.flow, v.chain) {
        (Some(f), _) => Some(match f.phase.unwrap_or_default() {
            Phase::Steps => format!("steps[{}]", f.at),
            Phase::OnFailure => "on_failure".into(),
            Phase::Finally => "finally".into(),
        }),
        (None, Some(c)) => Some(format!("stages[{}]", c.at)),
        (None, None) => None,
    }
}

/// How a delivery takes part in a pipeline.
enum FlowCall {
    /// It does not.
    None,
    /// It is a request to a flow operation: the flow starts with it.
    Start(String, Arc<funcatron_envelope::flow::FlowSpec>),
    /// It is a flow's `apply` step (its state verified): the flow goes on
    /// with the Func's answer.
    Continue,
}

/// Whether this delivery starts or continues a flow; `Err` when it claims
/// to continue one whose state this Runner's key did not sign.
fn flow_call(ctx: &Consumer, delivery: &Delivery, job: &Job) -> Result<FlowCall, ()> {
    if delivery.message.header(headers::FLOW).is_some() {
        return if ctx.flows.verify(&delivery.message.payload) {
            Ok(FlowCall::Continue)
        } else {
            Err(())
        };
    }
    if ctx.version.flows.is_empty() {
        return Ok(FlowCall::None);
    }
    let route = ctx.version.route(
        &ctx.func,
        delivery.message.header(headers::ROUTE),
        &job.operation,
    );
    Ok(match route.and_then(|r| ctx.version.flows.get(r)) {
        Some(spec) => FlowCall::Start(format!("{}/{}", ctx.func, job.operation), Arc::clone(spec)),
        None => FlowCall::None,
    })
}

/// A flow step whose state does not verify (forged, altered, or signed
/// with another key): answered 403 `flow_state_invalid` without running
/// anything.
async fn refuse_forged_flow(ctx: &Consumer, delivery: Delivery) {
    metrics::counter!("runner_flow_state_refused_total").increment(1);
    let Ok(head) = funcatron_envelope::RouteView::decode(&delivery.message.payload) else {
        return dead_letter(&ctx.broker, &ctx.queue, delivery, "malformed flow step").await;
    };
    tracing::warn!(func = &*ctx.func, request_id = %head.id, "a flow step's state does not verify; refused");
    if let Some(reply_to) = head.reply_to.as_deref() {
        let mut r = funcatron_envelope::Response::error(
            &head.id,
            403,
            "flow_state_invalid",
            "the flow's state is not signed by this cluster (forged or altered); refused",
        );
        r.reply_key = head.reply_key.clone();
        let _ = ctx.broker.publish(reply_to, Message::new(r.encode())).await;
    }
    ack(delivery).await;
}

/// Publish the notes of an asynchronous flow's step, before what follows
/// it: a crash in between runs the step again, noted again (the Tron
/// keeps one note per step and attempt).
async fn publish_notes(ctx: &Consumer, notes: Vec<Message>) -> Result<(), BrokerError> {
    for note in notes {
        ctx.broker.publish(names::OUTCOMES, note).await?;
    }
    Ok(())
}

/// A chain stage's or flow step's outcome ([`crate::chain`],
/// [`crate::flow`]): forward it or reply, then acknowledge; requeue when
/// it cannot be sent.
async fn send_next(
    ctx: &Consumer,
    delivery: Delivery,
    payload: &bytes::Bytes,
    reply_to: &str,
    next: Result<crate::chain::Next, String>,
) -> bool {
    let (to, message) = match next {
        Ok(crate::chain::Next::Reply(_)) if reply_to.is_empty() => {
            ack(delivery).await;
            return true;
        }
        Ok(crate::chain::Next::Reply(r)) => (reply_to.to_owned(), Message::new(r)),
        Ok(crate::chain::Next::Forward { queue, message }) => (queue, message),
        Ok(crate::chain::Next::Retry {
            queue,
            message,
            delay_ms,
        }) => {
            return match ctx.broker.publish_delayed(&queue, message, delay_ms).await {
                Ok(()) => {
                    ack(delivery).await;
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, "flow step retry not scheduled; requeueing the request");
                    requeue(delivery).await;
                    false
                }
            };
        }
        Ok(crate::chain::Next::Expired) => {
            metrics::counter!("runner_expired_total").increment(1);
            ack(delivery).await;
            return true;
        }
        Err(why) => {
            dead_letter(&ctx.broker, &ctx.queue, delivery, &why).await;
            return false;
        }
    };
    match ctx.broker.publish(&to, message).await {
        Ok(()) | Err(BrokerError::NoRoute(_)) if to == reply_to => {
            ack(delivery).await;
            true
        }
        Ok(()) => {
            ack(delivery).await;
            true
        }
        Err(BrokerError::NoRoute(q)) => {
            // The next stage's queue is gone (its version was switched
            // since the chain was resolved): the caller is told.
            let id = funcatron_envelope::RouteView::decode(payload)
                .map(|v| (v.id.into_owned(), v.reply_key.map(|k| k.into_owned())))
                .unwrap_or_default();
            let mut r = funcatron_envelope::Response::error(
                &id.0,
                503,
                "chain_stage_unavailable",
                &format!("the next stage's queue {q} is gone; retry the chain"),
            );
            r.reply_key = id.1.map(std::borrow::Cow::Owned);
            let _ = ctx.broker.publish(reply_to, Message::new(r.encode())).await;
            ack(delivery).await;
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, queue = %to, "chain stage not sent on; requeueing the request");
            requeue(delivery).await;
            false
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::borrow::Cow;

    use funcatron_envelope::{Request, Response, VERSION};

    use super::*;

    fn bundle(dir: &Path, runtime: &str, manifest: Option<&str>, lua: &str) -> Bundle {
        let doc = format!(
            "swagger: '2.0'\nx-funcatron: {{runtime: {runtime}}}\npaths:\n  /hi:\n    post: {{operationId: hi}}\n"
        );
        std::fs::write(dir.join("swagger.yaml"), doc).unwrap();
        std::fs::write(dir.join("main.lua"), lua).unwrap();
        std::fs::write(dir.join("main.py"), "def hi(req):\n    return 'hi'\n").unwrap();
        if let Some(m) = manifest {
            std::fs::write(dir.join("funcatron.yaml"), m).unwrap();
        }
        Bundle::load(dir).unwrap()
    }

    fn job(deadline_ms: u64) -> Job {
        job_with(deadline_ms, vec![])
    }

    fn job_with(deadline_ms: u64, headers: Vec<(Cow<'static, str>, Cow<'static, str>)>) -> Job {
        let req = Request {
            version: Cow::Borrowed(VERSION),
            id: Cow::Borrowed("t-1"),
            deadline_ms,
            sent_ms: now_ms(),
            method: Cow::Borrowed("POST"),
            scheme: Cow::Borrowed("http"),
            host: Cow::Borrowed("localhost"),
            path: Cow::Borrowed("/hi"),
            query: Cow::Borrowed(""),
            headers,
            remote: None,
            body: Cow::Borrowed("world"),
            body_base64: false,
            reply_to: Some(Cow::Borrowed("r")),
            reply_key: None,
            ..Request::default()
        };
        Job {
            payload: req.encode().into(),
            operation: "hi".into(),
            params: vec![],
            picked_ms: now_ms(),
            dispatched_ms: None,
            checks: None,
            auth: None,
            responses: None,
            observer: Observer::detached(),
            max_reply_bytes: 1024,
            debug: false,
            cors: None,
            preflight: None,
            async_only: false,
            direct_body: None,
            direct: None,
            store: None,
        }
    }

    fn options() -> RunnerOptions {
        RunnerOptions {
            workers: 2,
            ..RunnerOptions::default()
        }
    }

    /// [`prepare_version`] on a Runner of its own.
    async fn prepare_for_test(b: &Bundle, options: &RunnerOptions) -> Version {
        let broker = AnyBroker::Embedded(funcatron_broker::EmbeddedBroker::new(10));
        let direct = Direct::unavailable("a test".into());
        let lua = crate::lua::LuaThreads::start(options.workers);
        let flows = crate::flow::FlowEngine::new(None, Default::default(), options.lua_limits);
        let ctx = VersionCtx {
            broker: &broker,
            options,
            observer: &Observer::detached(),
            direct: &direct,
            lua: &lua,
            flows: &flows,
            store: &crate::store::StoreClient::new(broker.clone()),
        };
        prepare_version(&ctx, b).await
    }

    fn reply(h: Handled) -> (u16, String) {
        match h {
            Handled::Reply { response, .. } => {
                let r = Response::decode(&response).unwrap();
                let body = String::from_utf8(r.body_bytes().unwrap().into_owned()).unwrap();
                (r.status, body)
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_lua_version_answers_on_its_threads_and_skips_expired_requests() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(
            dir.path(),
            "lua",
            None,
            "return { hi = function(r) return 'hello ' .. r.body end }",
        );
        let v = prepare_for_test(&b, &options()).await;
        assert!(matches!(v.prepared, Prepared::Lua(_)));
        let deadline = (now_ms() + 10_000.0) as u64;
        for _ in 0..3 {
            let (status, body) =
                reply(call_version(&Arc::from("t"), &v.prepared, job(deadline)).await);
            assert_eq!((status, body.as_str()), (200, "hello world"));
        }
        let expired = call_version(&Arc::from("t"), &v.prepared, job(1)).await;
        assert!(matches!(expired, Handled::Expired { .. }), "{expired:?}");
    }

    #[tokio::test]
    async fn an_answer_over_the_reply_limit_is_answered_502() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(
            dir.path(),
            "lua",
            None,
            "return { hi = function(r) return string.rep('x', tonumber(r.headers.n or '10')) end }",
        );
        let v = prepare_for_test(&b, &options()).await;
        let deadline = (now_ms() + 10_000.0) as u64;
        // The test job's limit is 1024 bytes (body and headers).
        let sized = |n: usize| {
            job_with(
                deadline,
                vec![(Cow::Borrowed("n"), Cow::Owned(n.to_string()))],
            )
        };
        let (status, body) = reply(call_version(&Arc::from("t"), &v.prepared, sized(900)).await);
        assert_eq!((status, body.len()), (200, 900));
        let (status, body) = reply(call_version(&Arc::from("t"), &v.prepared, sized(5000)).await);
        assert_eq!(status, 502, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "reply_too_large", "{v}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_expires_waiting_for_a_lua_thread_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(
            dir.path(),
            "lua",
            Some("timeout_ms: 300\n"),
            "return { hi = function(r) if r.body == 'spin' then while true do end end return 'ok' end }",
        );
        let o = RunnerOptions {
            workers: 1,
            ..RunnerOptions::default()
        };
        let v = Arc::new(prepare_for_test(&b, &o).await);
        let mut spin = job((now_ms() + 10_000.0) as u64);
        spin.payload = String::from_utf8(spin.payload.to_vec())
            .unwrap()
            .replace("\"world\"", "\"spin\"")
            .into();
        let busy = {
            let v = Arc::clone(&v);
            tokio::spawn(
                async move { reply(call_version(&Arc::from("t"), &v.prepared, spin).await) },
            )
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Its Func time limit (300 ms) would start only when the thread is
        // free; its deadline passes before that.
        let waiting =
            call_version(&Arc::from("t"), &v.prepared, job((now_ms() + 100.0) as u64)).await;
        assert!(matches!(waiting, Handled::Expired { .. }), "{waiting:?}");
        assert_eq!(busy.await.unwrap().0, 504);
    }

    #[tokio::test]
    async fn versions_that_cannot_run_answer_500_func_broken() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(dir.path(), "lua", None, "this is not lua");
        let v = prepare_for_test(&b, &options()).await;
        let Prepared::Broken(why) = &v.prepared else {
            panic!("a broken Lua bundle must not be served")
        };
        assert!(why.starts_with("bundle failed to load: main.lua"), "{why}");
        let (status, body) = reply(
            call_version(
                &Arc::from("t"),
                &v.prepared,
                job((now_ms() + 10_000.0) as u64),
            )
            .await,
        );
        assert_eq!(status, 500);
        assert!(body.contains("func_broken"), "{body}");
        // The reason is in the log; the client gets it only with `debug`.
        assert!(!body.contains("main.lua"), "{body}");
        let mut detailed = job((now_ms() + 10_000.0) as u64);
        detailed.debug = true;
        let (_, body) = reply(call_version(&Arc::from("t"), &v.prepared, detailed).await);
        assert!(body.contains("bundle failed to load: main.lua"), "{body}");

        let dir = tempfile::tempdir().unwrap();
        let b = bundle(
            dir.path(),
            "lua",
            Some("secrets: [API_TOKEN]\n"),
            "return { hi = function() return 'x' end }",
        );
        let v = prepare_for_test(&b, &options()).await;
        let Prepared::Broken(why) = &v.prepared else {
            panic!("a bundle without its secret must not be served")
        };
        assert_eq!(
            why,
            "secret `API_TOKEN` is not supplied: this Runner has no --secrets-dir"
        );
    }

    /// An answer is kept for checking only when its operation's responses
    /// are to be checked: nothing is kept (or checked) otherwise.
    #[tokio::test]
    async fn answers_are_kept_for_checking_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bundle(
            dir.path(),
            "lua",
            None,
            "return { hi = function(r) return { got = r.body } end }",
        );
        b.doc = Arc::new(serde_json::json!({
            "swagger": "2.0",
            "paths": {"/hi": {"post": {
                "operationId": "hi",
                "responses": {"201": {"description": "made"}},
            }}},
        }));
        let v = prepare_for_test(&b, &options()).await;
        let deadline = (now_ms() + 10_000.0) as u64;
        let unchecked = |h: Handled| match h {
            Handled::Reply { unchecked, .. } => unchecked,
            other => panic!("{other:?}"),
        };
        let plain = call_version(&Arc::from("t"), &v.prepared, job(deadline)).await;
        assert!(unchecked(plain).is_none());
        let mut asked = job(deadline);
        asked.responses = v.responses.get("POST /hi").cloned();
        assert!(asked.responses.is_some());
        let u = unchecked(call_version(&Arc::from("t"), &v.prepared, asked).await).unwrap();
        assert_eq!(u.answer.status, 200);
        let problems = u.checks.check(&Answer {
            status: u.answer.status,
            headers: &u.answer.headers,
            body: &u.answer.body,
        });
        assert!(
            problems[0].contains("status 200 is not documented"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_operation_id_has_a_fallback_route_only_when_it_is_unique() {
        let dir = tempfile::tempdir().unwrap();
        let doc = "swagger: '2.0'\nx-funcatron: {runtime: lua}\npaths:\n  /a:\n    get: {operationId: same}\n    post: {operationId: one}\n  /b:\n    get: {operationId: same}\n";
        std::fs::write(dir.path().join("swagger.yaml"), doc).unwrap();
        std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
        let routes = routes_by_operation(&Bundle::load(dir.path()).unwrap());
        assert_eq!(routes["one"].as_deref(), Some("POST /a"));
        assert_eq!(routes["same"], None);
    }

    #[tokio::test]
    async fn a_python_version_holds_only_its_worker_pool() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bundle(dir.path(), "python", None, "");
        b.handler = "main.py".into();
        let mut o = options();
        let cache = tempfile::tempdir().unwrap();
        o.worker.cache_dir = cache.path().to_owned();
        let v = prepare_for_test(&b, &o).await;
        assert!(matches!(v.prepared, Prepared::Worker(_)));
    }
}

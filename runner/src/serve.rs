//! The Runner's consume loop: one subscription per Func queue, one task per
//! delivery, acknowledge only after the response is published.

use std::sync::Arc;

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

use funcatron_bundle::validate::{self, Checks};

use crate::exec::{ExecLimits, ExecRuntime};
use crate::follow::Desired;
use crate::invoke::{self, Handled, InvokeError, Job};
use crate::lua::{LuaLimits, LuaRuntime};
use crate::observe::{Load, Observer};
use crate::runtime::Runtime;
use crate::worker::{WorkerOptions, WorkerRuntime};

/// Every runtime this Runner serves, picked per Func by its bundle.
struct Runtimes {
    lua: LuaRuntime,
    exec: ExecRuntime,
    workers: WorkerRuntime,
    kinds: HashMap<String, RuntimeKind>,
    /// Funcs that cannot run here, and why (a secret not supplied, a
    /// document whose schemas do not compile).
    broken: HashMap<String, String>,
    /// Request checks per Func and operation.
    checks: HashMap<String, HashMap<String, Arc<Checks>>>,
}

impl Runtime for Runtimes {
    async fn invoke(&self, func: &str, job: Job) -> Handled {
        if let Some(why) = self.broken.get(func) {
            return invoke::process(func, &job, 0, |_| Err(InvokeError::Broken(why.clone())));
        }
        match self.kinds.get(func) {
            Some(RuntimeKind::Exec) => self.exec.invoke(func, job).await,
            Some(RuntimeKind::Python | RuntimeKind::Node | RuntimeKind::Java) => {
                self.workers.invoke(func, job).await
            }
            _ => self.lua.invoke(func, job).await,
        }
    }
}

/// The values of a bundle's secrets: `<dir>/<func>/<NAME>`, else
/// `<dir>/<NAME>` (one trailing newline dropped), merged into its `env`.
pub fn resolve_env(
    bundle: &Bundle,
    secrets_dir: Option<&Path>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = bundle.env.clone();
    for name in &bundle.secrets {
        let Some(dir) = secrets_dir else {
            return Err(format!(
                "secret `{name}` is not supplied: this Runner has no --secrets-dir"
            ));
        };
        let candidates = [dir.join(&bundle.name).join(name), dir.join(name)];
        let value = candidates
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .ok_or_else(|| {
                format!(
                    "secret `{name}` is not supplied: expected {} or {}",
                    candidates[0].display(),
                    candidates[1].display()
                )
            })?;
        let value = value.strip_suffix('\n').unwrap_or(&value);
        env.insert(
            name.clone(),
            value.strip_suffix('\r').unwrap_or(value).to_owned(),
        );
    }
    Ok(env)
}

/// Runner settings.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Unacknowledged requests held per Func queue.
    pub prefetch: u16,
    /// Lua worker threads (each holds every Lua Func prepared).
    pub workers: usize,
    /// Default limits for Lua Funcs.
    pub lua_limits: LuaLimits,
    /// Default limits for exec Funcs.
    pub exec_limits: ExecLimits,
    /// Defaults for Python, Node.js and Java Funcs.
    pub worker: WorkerOptions,
    /// Where secret values are read from (see [`resolve_env`]).
    pub secrets_dir: Option<PathBuf>,
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
pub async fn check(bundle: &Bundle, options: &RunnerOptions) -> Result<(), String> {
    let env = resolve_env(bundle, options.secrets_dir.as_deref())?;
    validate::compile_bundle(bundle).map_err(|e| e.to_string())?;
    let mut b = bundle.clone();
    b.env = env;
    match b.runtime {
        RuntimeKind::Lua => {
            let limits = options.lua_limits;
            tokio::task::spawn_blocking(move || crate::lua::LuaFunc::prepare(&b, limits).map(drop))
                .await
                .map_err(|e| e.to_string())?
        }
        RuntimeKind::Python | RuntimeKind::Node | RuntimeKind::Java => {
            crate::worker::check(&b, &options.worker).await
        }
        RuntimeKind::Exec => Ok(()),
    }
}

/// One version of one Func being served: its runtimes, its queue's
/// consumer and the deliveries in flight.
struct Serving {
    name: String,
    queue: String,
    /// Stops the consumer (deliveries in flight finish).
    stop: CancellationToken,
    tasks: TaskTracker,
    load: Arc<Load>,
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
    shutdown: CancellationToken,
) {
    let mut active: HashMap<(String, String), Serving> = HashMap::new();
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
            if let std::collections::hash_map::Entry::Vacant(slot) = active.entry(key) {
                slot.insert(start_version(&broker, b, &options, &observer).await);
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

/// Prepare one bundle version and start consuming its queue.
async fn start_version(
    broker: &AnyBroker,
    b: &Bundle,
    options: &RunnerOptions,
    observer: &Observer,
) -> Serving {
    let mut broken = HashMap::new();
    let mut checks = HashMap::new();
    let mut runnable = Vec::with_capacity(1);
    let prepared = resolve_env(b, options.secrets_dir.as_deref()).and_then(|env| {
        let c = validate::compile_bundle(b).map_err(|e| e.to_string())?;
        Ok((env, c))
    });
    match prepared {
        Ok((env, c)) => {
            let mut b = b.clone();
            b.env = env;
            checks.insert(
                b.name.clone(),
                c.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            );
            runnable.push(b);
        }
        Err(why) => {
            tracing::error!(func = %b.name, error = %why, "bundle cannot run; its requests get 500 with this reason");
            broken.insert(b.name.clone(), why);
        }
    }
    let has_lua = runnable.iter().any(|b| b.runtime == RuntimeKind::Lua);
    let (lua, failures) = LuaRuntime::start(
        &runnable,
        if has_lua { options.workers } else { 1 },
        options.lua_limits,
        observer,
    );
    for (func, why) in &failures {
        tracing::error!(func, error = %why, "bundle failed to prepare; its requests get 500 with this reason");
    }
    let runtime = Arc::new(Runtimes {
        lua,
        exec: ExecRuntime::new(&runnable, options.exec_limits, observer),
        workers: WorkerRuntime::start(&runnable, &options.worker, observer),
        kinds: std::iter::once((b.name.clone(), b.runtime)).collect(),
        broken,
        checks,
    });
    let queue = names::func_queue(&b.name, &b.version);
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let load = observer.load_for(&b.name);
    match broker
        .consume(
            &queue,
            QueueKind::Work,
            ConsumeOptions {
                prefetch: options.prefetch,
                auto_ack: false,
            },
        )
        .await
    {
        Ok(sub) => {
            tracing::info!(func = %b.name, version = %b.version, queue, "serving Func");
            tasks.spawn(consume(
                broker.clone(),
                observer.clone(),
                runtime,
                Arc::from(b.name.as_str()),
                Arc::from(b.version.as_str()),
                queue.clone(),
                sub,
                stop.clone(),
                Arc::clone(&load),
            ));
        }
        Err(e) => {
            tracing::error!(func = %b.name, queue, error = %e, "cannot consume the Func's queue")
        }
    }
    Serving {
        name: b.name.clone(),
        queue,
        stop,
        tasks,
        load,
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
        let idle = s.load.in_flight() == 0
            && broker
                .depth(&s.queue)
                .await
                .map(|d| d.ready == 0)
                .unwrap_or(true);
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

/// Consume one Func queue until `stop`. On `stop` the consumer is
/// cancelled, what the broker had already delivered (prefetch) is handled
/// too, and the subscription stays open until every delivery is
/// acknowledged: scale-in and shutdown make the broker redeliver nothing.
#[allow(clippy::too_many_arguments)]
async fn consume(
    broker: AnyBroker,
    observer: Observer,
    runtime: Arc<Runtimes>,
    func: Arc<str>,
    version: Arc<str>,
    queue: String,
    mut sub: funcatron_broker::Subscription,
    stop: CancellationToken,
    load: Arc<Load>,
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
        load.begin();
        let broker = broker.clone();
        let observer = observer.clone();
        let runtime = Arc::clone(&runtime);
        let func = Arc::clone(&func);
        let version = Arc::clone(&version);
        let queue = queue.clone();
        let load = Arc::clone(&load);
        in_flight.spawn(async move {
            let started = std::time::Instant::now();
            handle(
                &broker, &observer, &runtime, &func, &version, &queue, delivery,
            )
            .await;
            load.end(started.elapsed());
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

fn path_params(delivery: &Delivery) -> Result<Vec<(String, String)>, String> {
    let Some(raw) = delivery.message.header(headers::PATH_PARAMS) else {
        return Ok(Vec::new());
    };
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
        .map_err(|e| format!("bad {} header: {e}", headers::PATH_PARAMS))?;
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

async fn handle(
    broker: &AnyBroker,
    observer: &Observer,
    runtime: &Runtimes,
    func: &str,
    version: &str,
    queue: &str,
    delivery: Delivery,
) {
    let picked_ms = now_ms();
    if delivery.redelivered {
        // Another Runner took it and died (or a connection broke) before
        // acknowledging; it runs again here.
        metrics::counter!("runner_redelivered_total").increment(1);
        tracing::info!(func, "handling a redelivered request");
    }
    let Some(operation) = delivery
        .message
        .header(headers::OPERATION)
        .map(str::to_owned)
    else {
        dead_letter(
            broker,
            queue,
            delivery,
            "no operation header: the message did not come through a Tron",
        )
        .await;
        return;
    };
    let params = match path_params(&delivery) {
        Ok(p) => p,
        Err(why) => {
            dead_letter(broker, queue, delivery, &why).await;
            return;
        }
    };
    let checks = runtime
        .checks
        .get(func)
        .and_then(|c| c.get(&operation))
        .cloned();
    let dispatched_ms = delivery
        .message
        .header(headers::DISPATCHED_MS)
        .and_then(|v| v.parse::<f64>().ok());
    let delivery_payload = delivery.message.payload.clone();
    let job = Job {
        payload: delivery.message.payload.clone(),
        operation,
        params,
        picked_ms,
        dispatched_ms,
        checks,
        observer: observer.clone(),
    };
    let span = tracing::debug_span!(
        "runner.invoke",
        func,
        version,
        request_id = tracing::field::Empty
    );
    async {
        match runtime.invoke(func, job).await {
            Handled::Reply {
                request_id,
                reply_to,
                status,
                response,
            } => {
                tracing::Span::current().record("request_id", request_id.as_str());
                tracing::debug!(status, "invoked");
                let Some(reply_to) = reply_to else {
                    let _ = delivery.ack().await;
                    return;
                };
                let response = bytes::Bytes::from(response);
                match broker
                    .publish(&reply_to, Message::new(response.clone()))
                    .await
                {
                    // NoRoute: the ingress that asked is gone; the work is done.
                    Ok(()) | Err(BrokerError::NoRoute(_)) => {
                        let _ = delivery.ack().await;
                        observer.maybe_capture(func, version, &delivery_payload, &response);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reply not published; requeueing the request");
                        let _ = delivery.nack(true).await;
                    }
                }
            }
            Handled::Expired { request_id } => {
                tracing::debug!(%request_id, "skipped: deadline passed before the Func ran");
                metrics::counter!("runner_expired_total").increment(1);
                let _ = delivery.ack().await;
            }
            Handled::Undecodable(why) => dead_letter(broker, queue, delivery, &why).await,
            Handled::Requeue(why) => {
                tracing::warn!(reason = %why, "requeueing the request");
                let _ = delivery.nack(true).await;
            }
        }
    }
    .instrument(span)
    .await
}

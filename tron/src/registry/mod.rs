//! The bundle registry: the cluster state of which version of each Func
//! is enabled, and the state machine that changes it.
//!
//! management API / control topic -> **registry** -> route table (this Tron)
//! and the state broadcast to every Tron and Runner.
//!
//! Split by responsibility: [`store`] keeps archives and the saved state
//! (atomic writes; on start the Tron loads its state and routes as they
//! were); [`plan`] decides which bundles this Tron routes and which it
//! refuses (a conflicting pair never stops the rest); [`replicate`]
//! shares changes with the other Trons over the control topic;
//! [`crate::telemetry`] keeps Func log lines and capture files;
//! [`crate::status`] assembles the status view. This module holds
//! the state machine (upload, enable, disable, rollback, captures, log
//! levels): each change is checked to route, saved, applied to this
//! Tron's route table and broadcast, or nothing changes.

pub mod plan;
pub mod replicate;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use funcatron_broker::{AnyBroker, Broker};
use funcatron_bundle::archive::Limits;
use funcatron_bundle::Bundle;
use funcatron_control::names::{CAPTURE_TOPIC, LOGS_TOPIC};
use funcatron_control::state::{Capture, ClusterState, Event, FuncSettings, LogLevel, Upload};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::autoscale::FuncSettingsMap;
use crate::context::TronContext;
use crate::routes::RouteTable;
use crate::telemetry::Telemetry;
pub use plan::{Refusal, Served};
use store::Store;

/// A registry operation failed; `status` is the HTTP status to answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RegistryError {
    /// HTTP status.
    pub status: u16,
    /// Short machine-readable code.
    pub code: &'static str,
    /// What went wrong, naming the file and field where there is one.
    pub message: String,
}

impl RegistryError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
        }
    }
}

/// Extra checks a bundle must pass before it is stored (the binary plugs in
/// the Runner's code check for Lua bundles).
pub type Check = Arc<dyn Fn(&Bundle) -> Result<(), CheckError> + Send + Sync>;

/// Why a bundle failed a [`Check`].
pub type CheckError = Box<dyn std::error::Error + Send + Sync>;

/// Operator ceilings on what a Func may ask for, in its bundle or in the
/// settings it is enabled with: past one, the upload is a 422
/// `invalid_bundle` and the enable a 422 `invalid_settings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    /// Largest per-invocation time limit (`timeout_ms`).
    pub max_timeout_ms: u64,
    /// Largest memory limit (`memory_mb`).
    pub max_memory_mb: usize,
}

/// Default [`Ceilings::max_timeout_ms`]: 15 minutes.
pub const DEFAULT_MAX_FUNC_TIMEOUT_MS: u64 = 15 * 60 * 1000;
/// Default [`Ceilings::max_memory_mb`]: 4 GiB.
pub const DEFAULT_MAX_FUNC_MEMORY_MB: usize = 4096;

impl Default for Ceilings {
    fn default() -> Self {
        Ceilings {
            max_timeout_ms: DEFAULT_MAX_FUNC_TIMEOUT_MS,
            max_memory_mb: DEFAULT_MAX_FUNC_MEMORY_MB,
        }
    }
}

impl Ceilings {
    /// Why `timeout_ms` / `memory_mb` pass a ceiling, if they do.
    fn check(&self, timeout_ms: Option<u64>, memory_mb: Option<usize>) -> Result<(), String> {
        if let Some(t) = timeout_ms.filter(|t| *t > self.max_timeout_ms) {
            return Err(format!(
                "timeout_ms {t} is above this Tron's ceiling of {} (--max-func-timeout-ms)",
                self.max_timeout_ms
            ));
        }
        if let Some(m) = memory_mb.filter(|m| *m > self.max_memory_mb) {
            return Err(format!(
                "memory_mb {m} is above this Tron's ceiling of {} (--max-func-memory-mb)",
                self.max_memory_mb
            ));
        }
        Ok(())
    }

    /// Why a bundle's own limits pass a ceiling, if they do.
    fn check_bundle(&self, b: &Bundle) -> Result<(), String> {
        // Rounded up: a bundle asking for a byte past the ceiling is past it.
        let mb = b.memory_bytes.map(|bytes| bytes.div_ceil(1024 * 1024));
        self.check(b.timeout_ms, mb)
    }
}

/// Registry settings.
#[derive(Default)]
pub struct RegistryOptions {
    /// The store directory.
    pub store: PathBuf,
    /// Deployment environment for staging rewrites.
    pub environment: Option<String>,
    /// Bundles loaded from a directory at start (not managed by the API).
    pub static_bundles: Vec<Bundle>,
    /// This Tron's management API base URL, as other hosts reach it.
    pub advertise: String,
    /// Archive limits.
    pub limits: Limits,
    /// Extra checks at upload.
    pub check: Option<Check>,
    /// Ceilings on Funcs' timeouts and memory.
    pub ceilings: Ceilings,
    /// The read token this Tron fetches peers' archives with.
    pub read_token: Option<String>,
    /// Where peers' fetch URLs may point (control messages name them):
    /// the operator's allowlist; this Tron's own `advertise` host is
    /// added.
    pub outbound: funcatron_control::outbound::OutboundPolicy,
    /// The document store an upload's store triggers and `store` entries
    /// must name collections of (or declare them, `collections`); `None`:
    /// not checked.
    pub documents: Option<funcatron_documents::Documents>,
}

/// The registry of one Tron.
pub struct Registry {
    /// Archives and the saved state.
    store: Store,
    /// Func log lines and capture files.
    telemetry: Telemetry,
    /// The Tron's demand (arrival rates) and Runner heartbeats, for status.
    ctx: TronContext,
    options: RegistryOptions,
    /// This Tron's id as the origin of the revisions it makes.
    id: String,
    broker: AnyBroker,
    /// The state; held while a change is checked, saved and applied.
    state: Mutex<ClusterState>,
    /// The route table this Tron dispatches with.
    routes: watch::Sender<Arc<RouteTable>>,
    /// The bundles in that table and the ones refused.
    served: watch::Sender<Arc<Served>>,
    /// Each Func's settings, for the autoscaler.
    settings: watch::Sender<FuncSettingsMap>,
    /// Fetches archives from peers, where the outbound policy allows.
    fetcher: funcatron_control::fetch::Fetcher,
    /// The autoscaler running beside this registry, if any (its view
    /// joins `status`).
    autoscaler: std::sync::OnceLock<crate::autoscale::Shared>,
}

fn now_ms() -> u64 {
    funcatron_envelope::now_ms() as u64
}

/// Every collection `b`'s store triggers and `store` entries name is
/// declared by it or defined in `docs`: else a 400 naming the field.
async fn check_collections(
    docs: &funcatron_documents::Documents,
    b: &Bundle,
) -> Result<(), RegistryError> {
    let mut named: Vec<(String, &str)> = Vec::new();
    for op in &b.operations {
        for (i, t) in op.triggers.iter().enumerate() {
            if let funcatron_bundle::triggers::TriggerKind::Store(s) = &t.kind {
                let path = op.path.replace('~', "~0").replace('/', "~1");
                let method = op.method.to_ascii_lowercase();
                let at =
                    format!("/paths/{path}/{method}/x-funcatron-triggers/{i}/store/collection");
                named.push((at, &s.collection));
            }
        }
    }
    for c in b.store_access.keys() {
        named.push((format!("x-funcatron.store.{c}"), c));
    }
    for (at, c) in named {
        if b.collections.contains_key(c) {
            continue;
        }
        match docs.collection(c).await {
            Ok(_) => {}
            Err(funcatron_documents::DocError::UnknownCollection(_)) => {
                return Err(RegistryError::new(
                    400,
                    "unknown_collection",
                    format!("{at}: no collection {c:?}: define it (funcatron store define {c}) or declare it in the bundle's `collections`"),
                ))
            }
            Err(e) => return Err(RegistryError::new(503, "state_store_unavailable", e.to_string())),
        }
    }
    Ok(())
}

/// Settings are checked like the bundle fields they override: `env` keys
/// and secret names (the Func's and those its `auth` credentials name) are
/// variable names (a secret name names a file),
/// timeouts and memory are within the operator's ceilings, and a `cors`
/// setting is usable (`funcatron_bundle::cors::Cors::new`).
fn check_settings(s: &FuncSettings, ceilings: &Ceilings) -> Result<(), RegistryError> {
    ceilings
        .check(s.timeout_ms, s.memory_mb)
        .map_err(|m| RegistryError::new(422, "invalid_settings", m))?;
    if let Some(policy) = &s.async_policy {
        policy
            .resolved()
            .map_err(|e| RegistryError::new(422, "invalid_settings", e.to_string()))?;
    }
    if let Some(cors) = &s.cors {
        funcatron_bundle::cors::Cors::new(cors)
            .map_err(|e| RegistryError::new(422, "invalid_settings", e.to_string()))?;
    }
    let auth_secrets = s
        .auth
        .values()
        .flat_map(|c| c.secret.iter().chain(c.jwks_secret.iter()));
    let bad = s
        .env
        .keys()
        .chain(s.secrets.iter())
        .chain(auth_secrets)
        .find(|k| !funcatron_bundle::valid_var_name(k));
    match bad {
        Some(k) => Err(RegistryError::new(
            422,
            "invalid_settings",
            format!("{k:?} is not a usable env key or secret name (letters, digits, _; not FUNCATRON_*)"),
        )),
        None => Ok(()),
    }
}

impl Registry {
    /// The broker this registry talks on.
    pub fn broker(&self) -> &AnyBroker {
        &self.broker
    }

    /// Open (or create) the store, load the saved state and apply it:
    /// everything that can be routed is; bundles that conflict (with a
    /// static bundle, with each other) are refused and logged, see
    /// [`plan`]. Returns the registry and the route table watch its Tron
    /// follows.
    pub async fn open(
        options: RegistryOptions,
        ctx: TronContext,
    ) -> Result<(Arc<Registry>, watch::Receiver<Arc<RouteTable>>), RegistryError> {
        let store = Store::open(
            options.store.clone(),
            options.environment.clone(),
            options.limits,
        )?;
        let state = store.load_state()?;
        let fetcher = Self::fetcher(&options)?;
        let (routes_tx, routes_rx) = watch::channel(Arc::new(RouteTable::default()));
        let r = Arc::new(Registry {
            telemetry: Telemetry::new(store.dir()),
            store,
            broker: ctx.broker.clone(),
            ctx,
            options,
            id: funcatron_envelope::new_request_id()[..12].to_owned(),
            state: Mutex::new(state),
            routes: routes_tx,
            served: watch::channel(Arc::new(Served::default())).0,
            settings: watch::channel(FuncSettingsMap::default()).0,
            fetcher,
            autoscaler: std::sync::OnceLock::new(),
        });
        let state = r.state.lock().await.clone();
        let (table, served) = r.prepare(&state).await?;
        r.install(&state, table, served).await;
        Ok((r, routes_rx))
    }

    /// The fetcher for peers' archives: the operator's policy plus this
    /// Tron's own advertised host.
    fn fetcher(
        options: &RegistryOptions,
    ) -> Result<funcatron_control::fetch::Fetcher, RegistryError> {
        let mut policy = options.outbound.clone();
        let refuse = |e: &dyn std::fmt::Display| {
            RegistryError::new(500, "bad_outbound_policy", e.to_string())
        };
        if !options.advertise.is_empty() {
            policy
                .allow_host_of(&options.advertise)
                .map_err(|e| refuse(&e))?;
        }
        funcatron_control::fetch::Fetcher::new(policy).map_err(|e| refuse(&e))
    }

    /// What an archive must pass before it is stored (uploaded or fetched
    /// from a peer): the ceilings, then the binary's extra checks.
    fn check(&self) -> Check {
        let ceilings = self.options.ceilings;
        let extra = self.options.check.clone();
        Arc::new(move |b: &Bundle| {
            ceilings.check_bundle(b)?;
            match &extra {
                Some(check) => check(b),
                None => Ok(()),
            }
        })
    }

    /// The current state.
    pub async fn state(&self) -> ClusterState {
        self.state.lock().await.clone()
    }

    /// The bundle serving `func` on this Tron now (enabled in the
    /// registry, or static), with its settings; `None` when none is, or
    /// it is refused ([`Registry::refused`]).
    pub async fn serving(&self, func: &str) -> Option<Bundle> {
        self.served
            .borrow()
            .bundles
            .iter()
            .find(|b| b.name == func)
            .cloned()
    }

    /// What this Tron serves, as it changes (the triggers follow it).
    pub fn served_watch(&self) -> watch::Receiver<Arc<Served>> {
        self.served.subscribe()
    }

    /// The bundles this Tron does not route, each with its reason: an
    /// enabled version or a static bundle that conflicts with another
    /// (see [`plan`]), or an enabled version that cannot be loaded.
    pub fn refused(&self) -> Vec<Refusal> {
        self.served.borrow().refused.clone()
    }

    /// Store an upload and record it under its Func; enable it if asked.
    pub async fn upload(
        &self,
        bytes: &[u8],
        name: &str,
        enable: Option<FuncSettings>,
    ) -> Result<(String, Bundle), RegistryError> {
        let (sha, bundle) = self.store.put(bytes, name, Some(&self.check())).await?;
        if let Some(docs) = &self.options.documents {
            check_collections(docs, &bundle).await?;
        }
        {
            let mut st = self.state.lock().await;
            let mut next = st.clone();
            let f = next.funcs.entry(bundle.name.clone()).or_default();
            if !f.uploads.iter().any(|u| u.sha == sha) {
                f.uploads.push(Upload {
                    sha: sha.clone(),
                    version: bundle.version.clone(),
                    at_ms: now_ms(),
                    bytes: bytes.len() as u64,
                });
                self.commit(&mut st, next).await?;
            }
        }
        if let Some(settings) = enable {
            self.enable(&bundle.name, Some(&sha), Some(settings), "enable")
                .await?;
        }
        Ok((sha, bundle))
    }

    /// Enable a version of a Func (`sha` `None`: the latest upload). The
    /// route table switches atomically; Runners switch as they learn it.
    pub async fn enable(
        &self,
        func: &str,
        sha: Option<&str>,
        settings: Option<FuncSettings>,
        action: &str,
    ) -> Result<ClusterState, RegistryError> {
        if let Some(s) = &settings {
            check_settings(s, &self.options.ceilings)?;
        }
        let mut st = self.state.lock().await;
        let mut next = st.clone();
        let f = next.funcs.get_mut(func).ok_or_else(|| {
            RegistryError::new(404, "no_func", format!("no Func named {func} was uploaded"))
        })?;
        let sha = match sha {
            Some(s) => s.to_owned(),
            None => f
                .uploads
                .last()
                .map(|u| u.sha.clone())
                .ok_or_else(|| RegistryError::new(404, "no_bundle", "nothing uploaded"))?,
        };
        if !f.uploads.iter().any(|u| u.sha == sha) {
            return Err(RegistryError::new(
                404,
                "no_bundle",
                format!("{func} has no uploaded version {sha}"),
            ));
        }
        f.enabled = Some(sha.clone());
        if let Some(s) = settings {
            f.settings = s;
        }
        f.history.push(Event {
            at_ms: now_ms(),
            action: action.to_owned(),
            sha: Some(sha),
        });
        self.commit(&mut st, next.clone()).await?;
        Ok(next)
    }

    /// Stop routing to a Func.
    pub async fn disable(&self, func: &str) -> Result<ClusterState, RegistryError> {
        let mut st = self.state.lock().await;
        let mut next = st.clone();
        let f = next
            .funcs
            .get_mut(func)
            .ok_or_else(|| RegistryError::new(404, "no_func", format!("no Func named {func}")))?;
        f.enabled = None;
        f.history.push(Event {
            at_ms: now_ms(),
            action: "disable".into(),
            sha: None,
        });
        self.commit(&mut st, next.clone()).await?;
        Ok(next)
    }

    /// Start capturing `func`'s request/response pairs.
    pub async fn capture_start(
        &self,
        func: &str,
        capture: Capture,
    ) -> Result<ClusterState, RegistryError> {
        if !(0.0..=1.0).contains(&capture.sample) || capture.sample == 0.0 {
            return Err(RegistryError::new(
                400,
                "bad_request",
                "sample must be in (0, 1]",
            ));
        }
        let mut st = self.state.lock().await;
        let mut next = st.clone();
        next.captures.insert(func.to_owned(), capture);
        self.commit(&mut st, next.clone()).await?;
        Ok(next)
    }

    /// Stop capturing `func`.
    pub async fn capture_stop(&self, func: &str) -> Result<ClusterState, RegistryError> {
        let mut st = self.state.lock().await;
        if !st.captures.contains_key(func) {
            return Ok(st.clone());
        }
        let mut next = st.clone();
        next.captures.remove(func);
        self.commit(&mut st, next.clone()).await?;
        Ok(next)
    }

    /// Set (or, with `None`, reset) `func`'s log level on every Runner.
    pub async fn set_log_level(
        &self,
        func: &str,
        level: Option<LogLevel>,
    ) -> Result<ClusterState, RegistryError> {
        if let Some(l) = &level {
            if !["error", "warn", "info", "debug", "trace"].contains(&l.level.as_str()) {
                return Err(RegistryError::new(
                    400,
                    "bad_request",
                    format!(
                        "unknown log level {:?} (error, warn, info, debug, trace)",
                        l.level
                    ),
                ));
            }
        }
        let mut st = self.state.lock().await;
        let mut next = st.clone();
        match level {
            Some(l) => next.log_levels.insert(func.to_owned(), l),
            None => next.log_levels.remove(func),
        };
        self.commit(&mut st, next.clone()).await?;
        Ok(next)
    }

    /// Where the archive `sha` is kept.
    pub fn blob_path(&self, sha: &str) -> Option<PathBuf> {
        self.store.blob_path(sha)
    }

    /// The bundle stored under `sha`, loaded.
    pub async fn bundle(&self, sha: &str) -> Result<Bundle, RegistryError> {
        self.store.bundle(sha).await
    }

    /// The capture file of `func` (JSON Lines).
    pub fn capture_path(&self, func: &str) -> Option<PathBuf> {
        self.telemetry.capture_path(func)
    }

    /// Recent log lines (JSON) and a receiver of new ones.
    pub fn logs(&self) -> (Vec<Arc<str>>, tokio::sync::broadcast::Receiver<Arc<str>>) {
        self.telemetry.logs()
    }

    /// The route table this Tron dispatches with now.
    pub fn table(&self) -> Arc<RouteTable> {
        Arc::clone(&self.routes.borrow())
    }

    /// The status view ([`crate::status`]) of this Tron's routes.
    pub async fn status(&self) -> serde_json::Value {
        let table = Arc::clone(&self.routes.borrow());
        crate::status::status(&self.ctx, &table, self.autoscaler.get().map(|a| &**a)).await
    }

    /// Stop a capture that reached its maximum (unless it was replaced).
    async fn capture_finished(&self, func: &str, id: &str) {
        let still_running = self
            .state
            .lock()
            .await
            .captures
            .get(func)
            .is_some_and(|c| c.id == id);
        if still_running {
            if let Err(e) = self.capture_stop(func).await {
                tracing::warn!(func, error = %e, "cannot stop a finished capture");
            }
        }
    }

    /// Each Func's settings as they change (what the autoscaler reads).
    pub fn settings(&self) -> watch::Receiver<FuncSettingsMap> {
        self.settings.subscribe()
    }

    /// Show `autoscaler`'s decisions in [`Registry::status`].
    pub fn attach_autoscaler(&self, autoscaler: crate::autoscale::Shared) {
        let _ = self.autoscaler.set(autoscaler);
    }

    /// Collect captured pairs and Func log lines until `shutdown`.
    pub async fn collect(self: Arc<Self>, shutdown: CancellationToken) {
        let (mut captures, mut logs) = match (
            self.broker.subscribe(CAPTURE_TOPIC).await,
            self.broker.subscribe(LOGS_TOPIC).await,
        ) {
            (Ok(c), Ok(l)) => (c, l),
            _ => {
                tracing::error!("cannot subscribe to the capture and log topics");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                d = captures.next() => match d {
                    Some(d) => {
                        if let Some((func, id)) = self.telemetry.write_capture(&d.message) {
                            self.capture_finished(&func, &id).await;
                        }
                    }
                    None => return,
                },
                d = logs.next() => match d {
                    Some(d) => self.telemetry.remember_log(&d.message.payload),
                    None => return,
                },
            }
        }
    }

    /// Enable the version that was enabled before the current one.
    pub async fn rollback(&self, func: &str) -> Result<ClusterState, RegistryError> {
        let previous = {
            let st = self.state.lock().await;
            let f = st.funcs.get(func).ok_or_else(|| {
                RegistryError::new(404, "no_func", format!("no Func named {func}"))
            })?;
            let current = f.enabled.clone();
            f.history
                .iter()
                .rev()
                .filter_map(|e| e.sha.clone())
                .find(|s| Some(s) != current.as_ref())
                .ok_or_else(|| {
                    RegistryError::new(
                        409,
                        "no_previous",
                        format!("{func} has no earlier version to roll back to"),
                    )
                })?
        };
        self.enable(func, Some(&previous), None, "rollback").await
    }

    /// Make `next` the state: check it routes, save it, apply it, tell the
    /// others. On any failure nothing changes.
    async fn commit(
        &self,
        st: &mut ClusterState,
        mut next: ClusterState,
    ) -> Result<(), RegistryError> {
        next.revision = st.revision + 1;
        next.origin = self.id.clone();
        let (table, served) = self.prepare(&next).await?;
        if let Some(r) = served.new_refusal(&self.served.borrow()) {
            return Err(r.error());
        }
        self.store.save_state(&next)?;
        self.install(&next, table, served).await;
        *st = next.clone();
        self.announce(&next).await;
        Ok(())
    }

    /// The bundles `state` enables, with their settings (or why one
    /// cannot be loaded).
    async fn enabled(&self, state: &ClusterState) -> Vec<plan::Stored> {
        let mut list = Vec::new();
        for (name, sha, settings) in state.enabled() {
            let b = match self.bundle(sha).await {
                Ok(b) if b.name == name => Ok(b.with_settings(settings)),
                Ok(b) => Err(RegistryError::new(
                    422,
                    "invalid_bundle",
                    format!("bundle {sha} is named {}, not {name}", b.name),
                )),
                Err(e) => Err(e),
            };
            list.push((name.to_owned(), sha.to_owned(), b));
        }
        list
    }

    /// What this Tron would route for `state` (the static bundles and
    /// what it enables, less what [`plan`] refuses) and its table.
    async fn prepare(&self, state: &ClusterState) -> Result<(RouteTable, Served), RegistryError> {
        let served = plan::plan(&self.options.static_bundles, self.enabled(state).await);
        let table = RouteTable::build(&served.bundles)
            .map_err(|e| RegistryError::new(409, "route_conflict", e.to_string()))?;
        Ok((table, served))
    }

    /// Switch this Tron's routes to `table` (`served`, for `state`);
    /// log each refusal that is new.
    async fn install(&self, state: &ClusterState, table: RouteTable, served: Served) {
        self.telemetry.know(&state.captures);
        {
            let before = self.served.borrow();
            for r in &served.refused {
                if !before.refused.contains(r) {
                    tracing::error!(
                        func = %r.func,
                        sha = r.sha.as_deref().unwrap_or("static"),
                        reason = %r.reason,
                        "bundle refused: this Tron does not route it"
                    );
                }
            }
        }
        crate::dispatch::declare_routes(&self.broker, &table).await;
        self.routes
            .send_replace(Arc::new(table.at_revision(state.revision)));
        self.served.send_replace(Arc::new(served));
        self.settings.send_replace(Arc::new(
            state
                .funcs
                .iter()
                .map(|(n, f)| (n.clone(), f.settings.clone()))
                .collect(),
        ));
    }
}

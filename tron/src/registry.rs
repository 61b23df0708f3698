//! The bundle registry: the Tron's store of uploaded bundles and the
//! cluster state of which version of each Func is enabled.
//!
//! management API / control topic -> **registry** -> route table (this Tron)
//! and the state broadcast to every Tron and Runner.
//!
//! The store is a directory: `blobs/<sha>.tar.gz` (archives, by SHA-256),
//! `bundles/<sha>/<name>/` (unpacked), `state.json`; every write goes to a
//! scratch file or directory and is renamed into place, so a crash never
//! leaves half a bundle or half a state. On start the Tron loads its state
//! and routes as they were.
//!
//! Several Trons share changes through the broker's control topic
//! ([`CONTROL_TOPIC`]): every change is broadcast as the whole state with a
//! revision; a Tron or Runner adopts a state newer than its own and fetches
//! the archives it lacks by SHA from the sender's management API. The
//! broker is already what every component shares, so no extra shared store
//! (database, NFS) is needed; a newcomer says `hello` and the Trons answer
//! with their state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_bundle::archive::{self, Limits};
use funcatron_bundle::Bundle;
use funcatron_control::headers;
use funcatron_control::names::{CAPTURE_TOPIC, CONTROL_TOPIC, LOGS_TOPIC};
use funcatron_control::state::{
    Capture, ClusterState, Control, Event, FuncSettings, LogLevel, Upload,
};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::context::TronContext;
use crate::routes::RouteTable;

/// A registry operation failed; `status` is the HTTP status to answer.
#[derive(Debug, thiserror::Error)]
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
pub type Check = Arc<dyn Fn(&Bundle) -> Result<(), String> + Send + Sync>;

/// Registry settings.
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
}

/// The registry of one Tron.
pub struct Registry {
    /// Recent Func log lines (JSON), newest last, and live ones.
    logs: std::sync::Mutex<std::collections::VecDeque<Arc<str>>>,
    live_logs: tokio::sync::broadcast::Sender<Arc<str>>,
    /// Pairs written per capture id.
    captured: std::sync::Mutex<HashMap<String, u64>>,
    /// Every capture this Tron has seen (id -> max): pairs still in flight
    /// when a capture stops are written too.
    known_captures: std::sync::Mutex<HashMap<String, Option<u64>>>,
    /// The Tron's demand (arrival rates) and Runner heartbeats, for status.
    ctx: TronContext,
    /// Capture files kept open for appending, by Func.
    capture_files: std::sync::Mutex<HashMap<String, std::fs::File>>,
    options: RegistryOptions,
    id: String,
    broker: AnyBroker,
    state: Mutex<ClusterState>,
    loaded: Mutex<HashMap<String, Bundle>>,
    routes: watch::Sender<Arc<RouteTable>>,
    http: reqwest::Client,
    /// The autoscaler running beside this registry, if any (its view
    /// joins `status`).
    autoscaler: std::sync::OnceLock<crate::autoscale::Shared>,
}

fn now_ms() -> u64 {
    funcatron_envelope::now_ms() as u64
}

fn io_err(what: &Path, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::new(500, "store_failed", format!("{}: {e}", what.display()))
}

/// Write `bytes` to `path` atomically (scratch file, then rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let dir = path.parent().ok_or_else(|| io_err(path, "no parent"))?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_err(dir, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| io_err(path, e))?;
    tmp.as_file().sync_all().map_err(|e| io_err(path, e))?;
    tmp.persist(path).map_err(|e| io_err(path, e))?;
    Ok(())
}

impl Registry {
    /// Open (or create) the store, load the saved state and apply it.
    /// Returns the registry and the route table watch its Tron follows.
    pub async fn open(
        options: RegistryOptions,
        ctx: TronContext,
    ) -> Result<(Arc<Registry>, watch::Receiver<Arc<RouteTable>>), RegistryError> {
        std::fs::create_dir_all(options.store.join("blobs"))
            .map_err(|e| io_err(&options.store, e))?;
        let state_path = options.store.join("state.json");
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                RegistryError::new(
                    500,
                    "store_failed",
                    format!("{}: {e}", state_path.display()),
                )
            })?,
            Err(_) => ClusterState::default(),
        };
        let (routes_tx, routes_rx) = watch::channel(Arc::new(RouteTable::default()));
        let r = Arc::new(Registry {
            logs: std::sync::Mutex::new(std::collections::VecDeque::new()),
            live_logs: tokio::sync::broadcast::channel(1024).0,
            captured: std::sync::Mutex::new(HashMap::new()),
            known_captures: std::sync::Mutex::new(HashMap::new()),
            capture_files: std::sync::Mutex::new(HashMap::new()),
            broker: ctx.broker.clone(),
            ctx,
            options,
            id: funcatron_envelope::new_request_id()[..12].to_owned(),
            state: Mutex::new(state),
            loaded: Mutex::new(HashMap::new()),
            routes: routes_tx,
            http: reqwest::Client::new(),
            autoscaler: std::sync::OnceLock::new(),
        });
        let state = r.state.lock().await.clone();
        r.apply(&state).await?;
        Ok((r, routes_rx))
    }

    /// The current state.
    pub async fn state(&self) -> ClusterState {
        self.state.lock().await.clone()
    }

    /// The bundle serving `func` now (enabled in the registry, or static).
    pub async fn serving(&self, func: &str) -> Option<Bundle> {
        let st = self.state().await;
        if let Some(sha) = st.funcs.get(func).and_then(|f| f.enabled.clone()) {
            return self.bundle(&sha).await.ok();
        }
        self.options
            .static_bundles
            .iter()
            .find(|b| b.name == func)
            .cloned()
    }

    /// Where archives are kept.
    pub fn blob_path(&self, sha: &str) -> Option<PathBuf> {
        let valid = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| {
            self.options
                .store
                .join("blobs")
                .join(format!("{sha}.tar.gz"))
        })
    }

    /// The bundle stored under `sha`, loaded (for this Tron's environment).
    pub async fn bundle(&self, sha: &str) -> Result<Bundle, RegistryError> {
        if let Some(b) = self.loaded.lock().await.get(sha) {
            return Ok(b.clone());
        }
        let path = self
            .blob_path(sha)
            .filter(|p| p.is_file())
            .ok_or_else(|| RegistryError::new(404, "no_bundle", format!("no bundle {sha}")))?;
        let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        let (_, dir) = archive::unpack_into(
            &bytes,
            &self.options.store.join("bundles"),
            "bundle",
            self.options.limits,
        )
        .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))?;
        let b = Bundle::load_in(&dir, self.options.environment.as_deref())
            .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))?;
        self.loaded.lock().await.insert(sha.to_owned(), b.clone());
        Ok(b)
    }

    /// Validate and store an archive. `name` names bundles that do not name
    /// themselves.
    pub async fn store(&self, bytes: &[u8], name: &str) -> Result<(String, Bundle), RegistryError> {
        let bad = |m: String| RegistryError::new(422, "invalid_bundle", m);
        let (sha, dir) = archive::unpack_into(
            bytes,
            &self.options.store.join("bundles"),
            name,
            self.options.limits,
        )
        .map_err(|e| bad(e.to_string()))?;
        let loaded = Bundle::load_in(&dir, self.options.environment.as_deref())
            .and_then(|b| funcatron_bundle::validate::compile_bundle(&b).map(|_| b))
            .map_err(|e| e.to_string())
            .and_then(|b| match &self.options.check {
                Some(check) => check(&b).map(|()| b),
                None => Ok(b),
            });
        let bundle = match loaded {
            Ok(b) => b,
            Err(why) => {
                // Keep nothing of a bundle that is refused.
                let _ = std::fs::remove_dir_all(self.options.store.join("bundles").join(&sha));
                return Err(bad(why));
            }
        };
        let blob = self.blob_path(&sha).ok_or_else(|| bad("bad sha".into()))?;
        if !blob.is_file() {
            write_atomic(&blob, bytes)?;
        }
        self.loaded.lock().await.insert(sha.clone(), bundle.clone());
        Ok((sha, bundle))
    }

    /// Store an upload and record it under its Func; enable it if asked.
    pub async fn upload(
        &self,
        bytes: &[u8],
        name: &str,
        enable: Option<FuncSettings>,
    ) -> Result<(String, Bundle), RegistryError> {
        let (sha, bundle) = self.store(bytes, name).await?;
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

    /// The capture file of `func` (JSON Lines).
    pub fn capture_path(&self, func: &str) -> Option<PathBuf> {
        funcatron_bundle::valid_name(func).then(|| {
            self.options
                .store
                .join("captures")
                .join(format!("{func}.jsonl"))
        })
    }

    /// Append a captured pair to its Func's file, up to the capture's max.
    /// The Func and capture come in message headers: the record is written
    /// as it arrived, through a file kept open.
    async fn write_capture(&self, msg: &Message) {
        let (Some(func), Some(id)) = (msg.header(headers::FUNC), msg.header(headers::CAPTURE))
        else {
            return;
        };
        let max = match self
            .known_captures
            .lock()
            .ok()
            .and_then(|k| k.get(id).copied())
        {
            Some(max) => max,
            None => return, // not a capture this Tron started or adopted
        };
        let n = {
            let Ok(mut counts) = self.captured.lock() else {
                return;
            };
            let n = counts.entry(id.to_owned()).or_insert(0);
            if max.is_some_and(|m| *n >= m) {
                return;
            }
            *n += 1;
            *n
        };
        let Some(path) = self.capture_path(func) else {
            return;
        };
        let written = (|| -> std::io::Result<()> {
            let mut files = self
                .capture_files
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            if !path.is_file() {
                files.remove(func);
            }
            let file = match files.entry(func.to_owned()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    e.insert(
                        std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)?,
                    )
                }
            };
            let mut line = Vec::with_capacity(msg.payload.len() + 1);
            line.extend_from_slice(&msg.payload);
            line.push(b'\n');
            std::io::Write::write_all(file, &line)
        })();
        if let Err(e) = written {
            tracing::error!(func, error = %e, "cannot write a captured pair");
        }
        let still_running = self
            .state
            .lock()
            .await
            .captures
            .get(func)
            .is_some_and(|c| c.id == id);
        if still_running && max.is_some_and(|m| n >= m) {
            if let Err(e) = self.capture_stop(func).await {
                tracing::warn!(func, error = %e, "cannot stop a finished capture");
            }
        }
    }

    fn remember_log(&self, bytes: &[u8]) {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        let line: Arc<str> = Arc::from(text);
        if let Ok(mut logs) = self.logs.lock() {
            if logs.len() >= 5000 {
                logs.pop_front();
            }
            logs.push_back(Arc::clone(&line));
        }
        let _ = self.live_logs.send(line);
    }

    /// Recent log lines (JSON) and a receiver of new ones.
    pub fn logs(&self) -> (Vec<Arc<str>>, tokio::sync::broadcast::Receiver<Arc<str>>) {
        let rx = self.live_logs.subscribe();
        let recent = self
            .logs
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        (recent, rx)
    }

    /// Show `autoscaler`'s decisions in [`Registry::status`].
    pub fn attach_autoscaler(&self, autoscaler: crate::autoscale::Shared) {
        let _ = self.autoscaler.set(autoscaler);
    }

    /// Per Func: queue depth, arrival rate, service time, requests in
    /// flight and Runners serving it (heard from in the last 3 s), and,
    /// with an autoscaler, its signals, desired and running Runners and
    /// last decisions.
    pub async fn status(&self) -> serde_json::Value {
        let table = Arc::clone(&self.routes.borrow());
        let scaling = self
            .autoscaler
            .get()
            .map(|a| a.status())
            .unwrap_or(serde_json::Value::Null);
        let mut out = serde_json::Map::new();
        for (func, queue) in table.funcs() {
            let depth = self.broker.depth(queue).await.ok();
            let heard = self.ctx.heartbeats.sum(func);
            out.insert(
                func.to_owned(),
                serde_json::json!({
                    "queue": queue,
                    "ready": depth.map(|d| d.ready),
                    "consumers": depth.map(|d| d.consumers),
                    "arrival_per_s": self.ctx.demand.arrival_per_s(func),
                    "service_ms": heard.service_ms(),
                    "in_flight": heard.in_flight,
                    "served": heard.served,
                    "runners": heard.runners,
                    "scaling": scaling["funcs"].get(func),
                }),
            );
        }
        serde_json::json!({"funcs": out, "autoscaler": scaling.get("substrate").map(|_| &scaling)})
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
                    Some(d) => self.write_capture(&d.message).await,
                    None => return,
                },
                d = logs.next() => match d {
                    Some(d) => self.remember_log(&d.message.payload),
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
        self.apply(&next).await?;
        self.save(&next)?;
        *st = next.clone();
        self.announce(&next).await;
        Ok(())
    }

    fn save(&self, state: &ClusterState) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))?;
        write_atomic(&self.options.store.join("state.json"), &bytes)
    }

    /// The bundles `state` enables (plus the static ones), with settings.
    async fn desired(&self, state: &ClusterState) -> Result<Vec<Bundle>, RegistryError> {
        let mut list = self.options.static_bundles.clone();
        for (name, sha, settings) in state.enabled() {
            let b = self.bundle(sha).await?;
            if b.name != name {
                return Err(RegistryError::new(
                    422,
                    "invalid_bundle",
                    format!("bundle {sha} is named {}, not {name}", b.name),
                ));
            }
            list.push(b.with_settings(settings));
        }
        Ok(list)
    }

    /// Switch this Tron's routes to `state`.
    async fn apply(&self, state: &ClusterState) -> Result<(), RegistryError> {
        if let Ok(mut known) = self.known_captures.lock() {
            for c in state.captures.values() {
                known.insert(c.id.clone(), c.max);
            }
        }
        let list = self.desired(state).await?;
        let table = RouteTable::build(&list)
            .map_err(|e| RegistryError::new(409, "route_conflict", e.to_string()))?;
        crate::dispatch::declare_routes(&self.broker, &table).await;
        self.routes.send_replace(Arc::new(table));
        Ok(())
    }

    async fn announce(&self, state: &ClusterState) {
        let msg = Control::State {
            state: state.clone(),
            fetch: self.options.advertise.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&msg) {
            if let Err(e) = self
                .broker
                .broadcast(CONTROL_TOPIC, Message::new(bytes))
                .await
            {
                tracing::warn!(error = %e, "could not broadcast the registry state");
            }
        }
    }

    /// Fetch an archive from a peer's management API and store it.
    async fn fetch(&self, base: &str, sha: &str, name: &str) -> Result<(), RegistryError> {
        if self.blob_path(sha).is_some_and(|p| p.is_file()) {
            return Ok(());
        }
        let bytes = funcatron_control::fetch::fetch_archive(&self.http, base, sha)
            .await
            .map_err(|e| RegistryError::new(502, "fetch_failed", e.to_string()))?;
        self.store(&bytes, name).await.map(drop)
    }

    /// Follow the control topic until `shutdown`: adopt newer states from
    /// other Trons, answer newcomers.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sub = match self.broker.subscribe(CONTROL_TOPIC).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the control topic");
                return;
            }
        };
        self.hello().await;
        loop {
            let d = tokio::select! {
                _ = shutdown.cancelled() => return,
                d = sub.next() => match d { Some(d) => d, None => return },
            };
            match serde_json::from_slice::<Control>(&d.message.payload) {
                Ok(Control::Hello) => {
                    let st = self.state().await;
                    if st.revision > 0 {
                        self.announce(&st).await;
                    }
                }
                Ok(Control::State { state, fetch }) => self.adopt(state, &fetch).await,
                Err(e) => tracing::warn!(error = %e, "undecodable control message ignored"),
            }
        }
    }

    /// Ask the others for their state (and tell them ours).
    async fn hello(&self) {
        if let Ok(bytes) = serde_json::to_vec(&Control::Hello) {
            let _ = self
                .broker
                .broadcast(CONTROL_TOPIC, Message::new(bytes))
                .await;
        }
        let st = self.state().await;
        if st.revision > 0 {
            self.announce(&st).await;
        }
    }

    async fn adopt(&self, state: ClusterState, fetch: &str) {
        if !self.state.lock().await.older_than(&state) {
            return;
        }
        // Every uploaded version, so any Tron can enable or roll back to any.
        for (name, f) in &state.funcs {
            for u in &f.uploads {
                if let Err(e) = self.fetch(fetch, &u.sha, name).await {
                    tracing::error!(func = %name, sha = %u.sha, error = %e, "cannot fetch a bundle; keeping the current state");
                    return;
                }
            }
        }
        let mut st = self.state.lock().await;
        if !st.older_than(&state) {
            return;
        }
        match self.apply(&state).await {
            Ok(()) => {
                if let Err(e) = self.save(&state) {
                    tracing::error!(error = %e, "cannot save the adopted state");
                }
                tracing::info!(revision = state.revision, origin = %state.origin, "adopted the registry state of another Tron");
                *st = state;
            }
            Err(e) => tracing::error!(error = %e, "cannot apply another Tron's state"),
        }
    }
}

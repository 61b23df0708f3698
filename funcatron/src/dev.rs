//! `funcatron dev DIR`: save and reload.
//!
//! Everything in one process on the embedded broker (ingress, Tron, Runner),
//! serving the bundle(s) in DIR. The directory is watched; on a save the
//! changed bundle is loaded, checked (document, schemas, secrets, and its
//! code: Lua prepared, a Python/Node.js/Java worker started) and only then
//! switched to, the Runner first (it consumes the new version's queue), the
//! Tron's routes second. A broken save keeps the last good version serving
//! and prints why. The ingress also serves, under `/_funcatron/dev/`, each
//! Func's document and an interactive page to call its operations.
//!
//! A state store in memory backs asynchronous calls, triggers and the
//! document store (`/_funcatron/store/...`, where any bearer token is an
//! operator's: the server is the developer's), so Funcs that use the
//! store or are triggered run as on a cluster; it starts empty each run.
//!
//! Every Func's answers are checked against its document (the Runner's
//! `check_responses`): what does not match is printed and listed on the
//! pages, from the Runner's Func log lines on the embedded broker.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_bundle::{Bundle, SPEC_FILES};
use funcatron_ingress::IngressOptions;
use funcatron_runner::follow::Desired;
use funcatron_runner::{RunnerNode, RunnerOptions};
use funcatron_tron::{RouteTable, TronNode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the dev pages live on the ingress.
pub const DEV_PREFIX: &str = "/_funcatron/dev";

/// What the dev server serves now.
#[derive(Default)]
struct DevState {
    /// The last good version per bundle directory.
    good: BTreeMap<PathBuf, Bundle>,
    /// Why a directory's latest save is not served.
    errors: BTreeMap<PathBuf, String>,
    /// The latest answers that did not match their document, newest last
    /// (at most [`MAX_MISMATCHES`]).
    mismatches: VecDeque<Mismatch>,
}

/// An answer that did not match its document, as the Runner reported it.
#[derive(Debug, Clone)]
struct Mismatch {
    func: String,
    request_id: String,
    message: String,
}

/// How many mismatches the pages list.
const MAX_MISMATCHES: usize = 50;

/// Collect the Runner's reports of answers that do not match their
/// document (Func log lines on the `response` stream) until `shutdown`:
/// printed, and kept for the pages.
async fn collect_mismatches(
    mut logs: funcatron_broker::Subscription,
    state: Arc<RwLock<DevState>>,
    shutdown: CancellationToken,
) {
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = logs.next() => match d { Some(d) => d, None => return },
        };
        let Ok(line) = serde_json::from_slice::<serde_json::Value>(&d.message.payload) else {
            continue;
        };
        if line["stream"] != funcatron_runner::serve::RESPONSE_STREAM {
            continue;
        }
        let text = |k: &str| line[k].as_str().unwrap_or_default().to_owned();
        let m = Mismatch {
            func: text("func"),
            request_id: text("request_id"),
            message: text("message"),
        };
        eprintln!(
            "funcatron dev: {} answered not as its document says (request {}): {}",
            m.func, m.request_id, m.message
        );
        let mut s = state.write().unwrap_or_else(|e| e.into_inner());
        if s.mismatches.len() >= MAX_MISMATCHES {
            s.mismatches.pop_front();
        }
        s.mismatches.push_back(m);
    }
}

/// The running dev server's moving parts.
pub struct Dev {
    root: PathBuf,
    environment: Option<String>,
    broker: AnyBroker,
    runner: RunnerOptions,
    routes: watch::Sender<Arc<RouteTable>>,
    bundles: watch::Sender<Desired>,
    /// The same bundles for the Tron's triggers and store access.
    served: watch::Sender<Arc<funcatron_tron::registry::Served>>,
    state: Arc<RwLock<DevState>>,
}

/// In dev mode every bearer token is an operator's.
struct Developer;

impl funcatron_documents::http::Operators for Developer {
    fn role(&self, _token: &str) -> funcatron_documents::http::OperatorRole {
        funcatron_documents::http::OperatorRole::Admin
    }
}

fn is_bundle_dir(dir: &Path) -> bool {
    dir.join("funcatron.yaml").is_file()
        || SPEC_FILES.iter().any(|f| dir.join(f).is_file())
        || ["fn.py", "package.json", "fn.sh"]
            .iter()
            .any(|f| dir.join(f).is_file())
}

/// The bundle directories under `root` (or `root` itself).
fn bundle_dirs(root: &Path) -> Vec<PathBuf> {
    if is_bundle_dir(root) {
        return vec![root.to_owned()];
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && !p
                            .file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

impl Dev {
    /// Load what is there and switch to every good bundle; report the rest.
    pub async fn reload(&self) {
        let started = Instant::now();
        let (last, old_errors) = {
            let s = self.state.read().unwrap_or_else(|e| e.into_inner());
            (s.good.clone(), s.errors.clone())
        };
        let mut good = last.clone();
        let mut errors = BTreeMap::new();
        let mut changed = Vec::new();
        let dirs = bundle_dirs(&self.root);
        good.retain(|d, _| dirs.contains(d));
        for dir in &dirs {
            let loaded = match Bundle::load_in(dir, self.environment.as_deref()) {
                Ok(b) => b,
                Err(e) => {
                    errors.insert(dir.clone(), e.to_string());
                    continue;
                }
            };
            if good.get(dir).is_some_and(|b| b.version == loaded.version) {
                continue;
            }
            if let Err(why) = funcatron_runner::check(&loaded, &self.runner).await {
                errors.insert(dir.clone(), format!("{}: {why}", loaded.name));
                continue;
            }
            changed.push(dir.clone());
            good.insert(dir.clone(), loaded);
        }
        let table = settle(&mut good, &last, &mut changed, &mut errors);
        if !changed.is_empty() || good.len() != self.bundles.borrow().bundles.len() {
            match table {
                Ok(table) => {
                    // The Runner first: it consumes the new versions' queues;
                    // then the Tron, once those queues exist.
                    let bundles: Vec<Bundle> = good.values().cloned().collect();
                    self.served
                        .send_replace(Arc::new(funcatron_tron::registry::Served {
                            bundles: bundles.clone(),
                            ..Default::default()
                        }));
                    self.bundles.send_replace(Desired::from(bundles));
                    funcatron_tron::declare_routes(&self.broker, &table).await;
                    self.routes.send_replace(Arc::new(table));
                    for dir in &changed {
                        let b = &good[dir];
                        eprintln!(
                            "funcatron dev: {} {} is live ({} ms)",
                            b.name,
                            b.version,
                            started.elapsed().as_millis()
                        );
                    }
                    self.state.write().unwrap_or_else(|e| e.into_inner()).good = good;
                }
                Err(e) => {
                    eprintln!(
                        "funcatron dev: not switched, the last good versions keep serving: {e}"
                    );
                }
            }
        }
        report(&errors, &old_errors);
        self.state.write().unwrap_or_else(|e| e.into_inner()).errors = errors;
    }
}

/// Make `good` servable together. What served before (`last`, less the
/// directories that are gone) is the starting point; each changed bundle
/// (in `changed`) goes live if it can be served beside what is live so
/// far, else it keeps its last good version (or stays out, if new) with
/// the reason in `errors`. Changes that keep a bundle's routes go first,
/// so a bundle that only changed its code is never held back by another
/// one's new conflicting routes.
fn settle(
    good: &mut BTreeMap<PathBuf, Bundle>,
    last: &BTreeMap<PathBuf, Bundle>,
    changed: &mut Vec<PathBuf>,
    errors: &mut BTreeMap<PathBuf, String>,
) -> Result<RouteTable, funcatron_tron::RouteError> {
    let mut live: BTreeMap<PathBuf, Bundle> = last
        .iter()
        .filter(|(d, _)| good.contains_key(*d))
        .map(|(d, b)| (d.clone(), b.clone()))
        .collect();
    let mut order = std::mem::take(changed);
    order.sort_by_key(|d| last.get(d).is_none_or(|b| !same_routes(b, &good[d])));
    for dir in order {
        let mut next = live.clone();
        next.insert(dir.clone(), good[&dir].clone());
        let (_, why) = funcatron_tron::servable(next.values().cloned().collect());
        if why.is_empty() {
            live = next;
            changed.push(dir);
        } else {
            let name = format!("`{}`", good[&dir].name);
            let reason: Vec<String> = why
                .iter()
                .map(ToString::to_string)
                .filter(|w| w.contains(&name))
                .collect();
            errors.insert(dir, reason.join("; "));
        }
    }
    *good = live;
    RouteTable::build(&good.values().cloned().collect::<Vec<_>>())
}

/// Do `a` and `b` claim the same routes (name, bases, operations)?
fn same_routes(a: &Bundle, b: &Bundle) -> bool {
    let key = |x: &Bundle| {
        x.operations
            .iter()
            .map(|o| (o.method.clone(), o.path.clone(), o.bases.clone()))
            .collect::<Vec<_>>()
    };
    a.name == b.name && a.bases == b.bases && key(a) == key(b)
}

/// Print what broke and what was fixed since the last reload.
fn report(errors: &BTreeMap<PathBuf, String>, old_errors: &BTreeMap<PathBuf, String>) {
    for (dir, e) in errors {
        if old_errors.get(dir) != Some(e) {
            eprintln!(
                "funcatron dev: {} is broken; the last good version keeps serving:\n  {e}",
                dir.display()
            );
        }
    }
    for dir in old_errors.keys() {
        if !errors.contains_key(dir) {
            eprintln!("funcatron dev: {} is fixed", dir.display());
        }
    }
}

/// Run the dev server until `shutdown`.
pub async fn run(
    root: PathBuf,
    environment: Option<String>,
    listen: std::net::SocketAddr,
    runner: RunnerOptions,
    limits: funcatron_listener::Limits,
    extra: Router,
    shutdown: CancellationToken,
) -> Result<()> {
    let root = root
        .canonicalize()
        .with_context(|| format!("{}: no such directory", root.display()))?;
    // A developer sees every failure in full, in the answer too, and every
    // answer that does not match its document.
    let runner = RunnerOptions {
        debug_errors: true,
        check_responses: true,
        ..runner
    };
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let logs = funcatron_broker::Broker::subscribe(&broker, funcatron_control::names::LOGS_TOPIC)
        .await
        .context("subscribing to the Func logs")?;
    let (routes_tx, routes_rx) = watch::channel(Arc::new(RouteTable::default()));
    let (bundles_tx, bundles_rx) = watch::channel(Desired::default());
    let (served_tx, served_rx) = watch::channel(Arc::default());
    let calls = funcatron_calls::Calls::new(
        funcatron_store::AnyStore::memory().context("opening the in-memory state store")?,
    );
    let documents = funcatron_documents::Documents::new(calls.store().clone());
    let dev = Arc::new(Dev {
        root: root.clone(),
        environment,
        broker: broker.clone(),
        runner: runner.clone(),
        routes: routes_tx,
        bundles: bundles_tx,
        served: served_tx,
        state: Arc::default(),
    });
    dev.reload().await;
    tokio::spawn(collect_mismatches(
        logs,
        Arc::clone(&dev.state),
        shutdown.clone(),
    ));

    let mut roles = tokio::task::JoinSet::new();
    roles.spawn(
        TronNode::new(broker.clone())
            .routes(routes_rx)
            .calls(calls.clone())
            .documents(documents.clone())
            .served(served_rx)
            .run(shutdown.clone()),
    );
    roles.spawn({
        let node = RunnerNode::new(broker.clone())
            .options(runner)
            .desired(bundles_rx);
        let s = shutdown.clone();
        async move {
            node.run(s).await;
            Ok(())
        }
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let pages = Router::new()
        .route(&format!("{DEV_PREFIX}/"), get(index))
        .route(&format!("{DEV_PREFIX}/{{func}}/"), get(func_page))
        .route(
            &format!("{DEV_PREFIX}/{{func}}/openapi.json"),
            get(func_doc),
        )
        .with_state(Arc::clone(&dev.state))
        .merge(funcatron_documents::http::router(
            documents,
            Some(Arc::new(Developer)),
        ))
        .merge(extra);
    let ingress = tokio::spawn(funcatron_ingress::run_with(
        listener,
        broker.clone(),
        IngressOptions {
            limits,
            calls: Some(calls),
            ..IngressOptions::default()
        },
        pages,
        shutdown.clone(),
    ));
    eprintln!(
        "funcatron dev: serving {} on http://{listen}/ ; API pages at http://{listen}{DEV_PREFIX}/ ; watching for saves",
        root.display()
    );

    // Watch: any change under the root, debounced, reloads.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if e.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })
    .context("starting the file watcher")?;
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .context("watching the bundle directory")?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            got = rx.recv() => {
                if got.is_none() {
                    break;
                }
                // Editors write in bursts (temp file, rename, chmod).
                tokio::time::sleep(Duration::from_millis(15)).await;
                while rx.try_recv().is_ok() {}
                dev.reload().await;
            }
        }
    }
    drop(watcher);
    ingress.await??;
    while let Some(r) = roles.join_next().await {
        r??;
    }
    Ok(())
}

type Shared = State<Arc<RwLock<DevState>>>;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn index(State(state): Shared) -> Html<String> {
    let s = state.read().unwrap_or_else(|e| e.into_inner());
    let mut out = String::from(
        "<!doctype html><meta charset=utf-8><title>Funcatron dev</title><h1>Funcatron dev</h1><ul>",
    );
    for b in s.good.values() {
        out.push_str(&format!(
            "<li><a href=\"{DEV_PREFIX}/{n}/\">{n}</a> ({rt}, version {v}) - <a href=\"{DEV_PREFIX}/{n}/openapi.json\">document</a></li>",
            n = escape(&b.name),
            rt = b.runtime.as_str(),
            v = b.version
        ));
    }
    out.push_str("</ul>");
    for (dir, e) in &s.errors {
        out.push_str(&format!(
            "<h2>Broken save in {}</h2><pre>{}</pre>",
            escape(&dir.display().to_string()),
            escape(e)
        ));
    }
    mismatches(&s, None, &mut out);
    Html(out)
}

/// The latest answers (of `func`, or of every Func) that did not match
/// their document, newest first.
fn mismatches(s: &DevState, func: Option<&str>, out: &mut String) {
    let shown: Vec<&Mismatch> = s
        .mismatches
        .iter()
        .rev()
        .filter(|m| func.is_none_or(|f| m.func == f))
        .collect();
    if shown.is_empty() {
        return;
    }
    out.push_str("<h2>Answers that do not match the document</h2><ul>");
    for m in shown {
        out.push_str(&format!(
            "<li><b>{}</b> (request <code>{}</code>): <pre>{}</pre></li>",
            escape(&m.func),
            escape(&m.request_id),
            escape(&m.message)
        ));
    }
    out.push_str("</ul>");
}

fn find(state: &RwLock<DevState>, func: &str) -> Option<Bundle> {
    let s = state.read().unwrap_or_else(|e| e.into_inner());
    s.good.values().find(|b| b.name == func).cloned()
}

fn not_found(func: &str) -> Response {
    (
        axum::http::StatusCode::NOT_FOUND,
        axum::Json(
            serde_json::json!({"error": "not_found", "message": format!("no Func named {func}")}),
        ),
    )
        .into_response()
}

async fn func_doc(State(state): Shared, UrlPath(func): UrlPath<String>) -> Response {
    match find(&state, &func) {
        Some(b) => axum::Json(b.doc.as_ref().clone()).into_response(),
        None => not_found(&func),
    }
}

/// A page with one form per operation: path parameters, query, body; the
/// answer shown below it. Calls go to this same server (the ingress).
async fn func_page(State(state): Shared, UrlPath(func): UrlPath<String>) -> Response {
    let Some(b) = find(&state, &func) else {
        return not_found(&func);
    };
    let base = if b.base_path == "/" {
        ""
    } else {
        b.base_path.as_str()
    };
    let mut out = format!(
        "<!doctype html><meta charset=utf-8><title>{n}</title>\
         <style>body{{font-family:sans-serif;max-width:60em}} form{{border:1px solid #ccc;padding:.5em;margin:.5em 0}} pre{{background:#f4f4f4;padding:.5em;white-space:pre-wrap}}</style>\
         <h1>{n}</h1><p>{rt}, version {v}; host {h}; basePath {bp}; served on {all}. <a href=\"openapi.json\">The document</a>.</p>",
        n = escape(&b.name),
        rt = b.runtime.as_str(),
        v = b.version,
        h = escape(b.host.as_deref().unwrap_or("*")),
        bp = escape(&b.base_path),
        all = escape(
            &b.bases
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    for (i, op) in b.operations.iter().enumerate() {
        let template = if op.path == "/" && !base.is_empty() {
            base.to_owned()
        } else {
            format!("{base}{}", op.path)
        };
        let params: Vec<&str> = op
            .path
            .split('{')
            .skip(1)
            .filter_map(|p| p.split('}').next())
            .collect();
        out.push_str(&format!(
            "<form data-method=\"{m}\" data-template=\"{t}\" onsubmit=\"return call(this)\"><b>{m} {t}</b> - <code>{id}</code><br>",
            m = op.method,
            t = escape(&template),
            id = escape(&op.operation_id)
        ));
        for p in params {
            out.push_str(&format!(
                "{p}: <input name=\"param:{p}\" required> ",
                p = escape(p)
            ));
        }
        out.push_str("query: <input name=\"query\" placeholder=\"a=1&amp;b=2\"> ");
        if !matches!(op.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS") {
            out.push_str("<br>content-type: <input name=\"ctype\" value=\"application/json\"><br><textarea name=\"body\" rows=4 cols=60></textarea>");
        }
        out.push_str(&format!(
            "<br><button>Send</button><pre id=\"out{i}\"></pre></form>"
        ));
    }
    out.push_str(
        r#"<script>
async function call(form) {
  let path = form.dataset.template;
  for (const el of form.elements) {
    if (el.name && el.name.startsWith('param:')) path = path.replace('{' + el.name.slice(6) + '}', encodeURIComponent(el.value));
  }
  const q = form.elements.query.value;
  const init = { method: form.dataset.method, headers: {} };
  if (form.elements.body) { init.body = form.elements.body.value; init.headers['content-type'] = form.elements.ctype.value; }
  const out = form.querySelector('pre');
  const t = performance.now();
  try {
    const r = await fetch(path + (q ? '?' + q : ''), init);
    const text = await r.text();
    const hs = [...r.headers].map(([k, v]) => k + ': ' + v).join('\n');
    out.textContent = r.status + ' ' + r.statusText + ' (' + Math.round(performance.now() - t) + ' ms)\n' + hs + '\n\n' + text;
  } catch (e) { out.textContent = String(e); }
  return false;
}
</script>"#,
    );
    mismatches(
        &state.read().unwrap_or_else(|e| e.into_inner()),
        Some(&b.name),
        &mut out,
    );
    Html(out).into_response()
}

//! Edge routing and admission at the embedded ingress: a request is
//! routed here, by the table the Trons push, straight onto its Func
//! version's queue; what a Func's async policy does not take is refused
//! before anything is recorded or queued.
//!
//! Tron (broadcasts its table on `funcatron.admission`) -> **ingress:
//! edge routing (here)** -> the Func version's queue -> Runner. The table
//! names every routed Func with its bases and operations; the ingress
//! builds the Tron's own route table from it
//! (`funcatron_routes::RouteTable::from_admission`), so it matches a
//! request exactly as a Tron would, marks the routing outcome with the
//! same headers (`funcatron_routes::Route::headers`) and answers 404 and
//! 405 itself. A request goes to `funcatron.requests` for a Tron to route
//! instead when the ingress runs with [`Routing::Tron`], holds no current
//! table (no Tron heard yet, or the last table older than its `ttl_ms`),
//! or its table is behind the registry (a newer registry state was heard
//! on the control topic than the table was built from: a switch is under
//! way, and the Trons route by the new state already).
//!
//! The ingress counts what it routes per Func and reports the counts on
//! `funcatron.demand` every `DEMAND_EVERY_MS` (at once for a Func the
//! table marks cold, so a request for a Func at zero Runners wakes the
//! autoscaler without waiting), since those requests never pass a Tron.
//!
//! Without a current table every request is admitted: the Runner still
//! refuses a synchronous call to an async-only Func, and the limits are
//! the Trons' advice, not a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response as HttpResponse;
use dashmap::DashMap;
use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_control::admission::{self, AdmissionTable, EdgeDemand, FuncAdmission};
use funcatron_control::names::{ADMISSION_TOPIC, CONTROL_TOPIC, DEMAND_TOPIC};
use funcatron_routes::chain::StageSpec;
use funcatron_routes::{RouteOutcome, RouteTable};
use serde::Deserialize;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::calls::Async;

/// Who routes the requests of an ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Routing {
    /// The ingress, by the Trons' table, straight onto the Func's queue
    /// (a Tron when the table is missing or behind).
    #[default]
    Edge,
    /// A Tron: every request goes to `funcatron.requests`.
    Tron,
}

impl Routing {
    /// Its name, as the flag and the health answer spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Edge => "edge",
            Routing::Tron => "tron",
        }
    }
}

/// The latest table this ingress heard, ready to route by.
pub(crate) struct Current {
    /// Built from the table's Funcs, in the sending Tron's order (kept
    /// while only the admission state changes).
    routes: Arc<RouteTable>,
    /// The table's Funcs, by position in `routes`.
    funcs: Vec<FuncAdmission>,
    /// The registry revision it was built from.
    revision: u64,
    /// When it stops counting.
    expires: Instant,
}

/// The table an ingress routes and admits by: a handle on the latest one
/// heard, and on the newest registry revision heard.
#[derive(Clone)]
pub(crate) struct Edge {
    routing: Routing,
    current: watch::Receiver<Option<Arc<Current>>>,
    /// The newest registry revision announced on the control topic.
    newest_state: Arc<AtomicU64>,
    /// Wakes the demand reporter (a request for a cold Func).
    report_now: Arc<Notify>,
    /// Requests routed here per Func since the last report (by name, so
    /// no count is lost when tables are swapped).
    counts: Arc<DashMap<String, AtomicU64>>,
}

/// Why a request is refused (`funcatron_control::admission::refusal`).
pub(crate) struct Refusal {
    /// 400 or 429.
    pub status: StatusCode,
    /// The JSON error code.
    pub code: &'static str,
    /// What the client reads.
    pub message: String,
}

/// Where a request goes.
pub(crate) enum Decision {
    /// To `funcatron.requests`: a Tron routes it.
    Tron,
    /// Straight onto its Func version's queue.
    Queue(Routed),
    /// Answered here, as a Tron would (404, 405).
    Answer {
        /// 404 or 405.
        status: StatusCode,
        /// The JSON error code.
        code: &'static str,
        /// What the client reads.
        message: String,
        /// For a 405: the path's methods.
        allow: Option<String>,
    },
}

/// A request routed at the edge.
pub(crate) struct Routed {
    /// The Func.
    pub func: String,
    /// The queue it goes to: its version's queue of synchronous
    /// requests, or of asynchronous calls for an async call.
    pub queue: String,
    /// The routing outcome, as message headers.
    pub headers: Vec<(String, String)>,
    /// The operation is direct (`x-funcatron-direct`).
    pub direct: bool,
    /// A chain's stages, when this is its first stage.
    pub chain: Option<funcatron_envelope::Chain<'static>>,
}

impl Edge {
    /// Hear tables from the Trons and registry revisions on the control
    /// topic, and report demand, until `shutdown`.
    pub(crate) fn start(
        broker: AnyBroker,
        routing: Routing,
        instance: String,
        shutdown: CancellationToken,
    ) -> Edge {
        let (tx, rx) = watch::channel(None);
        let edge = Edge {
            routing,
            current: rx,
            newest_state: Arc::default(),
            report_now: Arc::default(),
            counts: Arc::default(),
        };
        tokio::spawn(hear(broker.clone(), tx, instance.clone(), shutdown.clone()));
        if routing == Routing::Edge {
            tokio::spawn(hear_revisions(
                broker.clone(),
                Arc::clone(&edge.newest_state),
                shutdown.clone(),
            ));
            tokio::spawn(report(broker, edge.clone(), instance, shutdown));
        }
        edge
    }

    /// Who routes this ingress's requests.
    pub(crate) fn routing(&self) -> Routing {
        self.routing
    }

    /// The current table, unless there is none or it is stale.
    fn current(&self) -> Option<Arc<Current>> {
        let c = self.current.borrow().clone()?;
        (Instant::now() < c.expires).then_some(c)
    }

    /// The revision of the table routed by now (`None`: requests go to a
    /// Tron), for the health answer.
    pub(crate) fn routing_revision(&self) -> Option<u64> {
        let c = self.current()?;
        (self.routing == Routing::Edge && !self.behind(&c)).then_some(c.revision)
    }

    /// Is `c` older than the newest registry state heard?
    fn behind(&self, c: &Current) -> bool {
        c.revision < self.newest_state.load(Ordering::Relaxed)
    }

    /// The Funcs that are full now (for the health answer).
    pub(crate) fn full(&self) -> Option<Vec<String>> {
        let c = self.current()?;
        Some(
            c.funcs
                .iter()
                .filter(|f| f.full)
                .map(|f| f.func.clone())
                .collect(),
        )
    }

    /// Where this request goes, or why it is refused. `named`: the Func
    /// a `/function/<func>/` path names (the path is already below it).
    pub(crate) fn decide(
        &self,
        parts: &Parts,
        host: &str,
        named: Option<&str>,
        mode: Option<Async>,
    ) -> Result<Decision, Refusal> {
        let Some(c) = self.current() else {
            return Ok(Decision::Tron);
        };
        let edge = self.routing == Routing::Edge && !self.behind(&c);
        let (method, path) = (parts.method.as_str(), parts.uri.path());
        let outcome = match named {
            Some(func) => c.routes.route_func(func, method, path),
            None => Some(c.routes.route(host, method, path)),
        };
        let (route, preflight) = match outcome {
            Some(RouteOutcome::Found(r)) => {
                let f = &c.funcs[r.index];
                refusal(f, mode, parts.headers.contains_key("x-callback-url"))?;
                (r, None)
            }
            // An async call is accepted whatever its route: a Tron records
            // its 404 or 405 as the call's outcome, as without a table.
            _ if !edge || mode.is_some() => return Ok(Decision::Tron),
            Some(RouteOutcome::Preflight(r, allow)) => (r, Some(allow.join(", "))),
            None => {
                let func = named.unwrap_or_default();
                return Ok(Decision::Answer {
                    status: StatusCode::NOT_FOUND,
                    code: "unknown_func",
                    message: format!("no enabled Func is named {func:?}"),
                    allow: None,
                });
            }
            Some(RouteOutcome::NotFound) => {
                return Ok(Decision::Answer {
                    status: StatusCode::NOT_FOUND,
                    code: "no_route",
                    message: format!("no Func serves {method} {host}{path}"),
                    allow: None,
                })
            }
            Some(RouteOutcome::MethodNotAllowed(allow)) => {
                let allow = allow.join(", ");
                return Ok(Decision::Answer {
                    status: StatusCode::METHOD_NOT_ALLOWED,
                    code: "method_not_allowed",
                    message: format!("{method} is not allowed on {path}; allowed: {allow}"),
                    allow: Some(allow),
                });
            }
        };
        if !edge {
            return Ok(Decision::Tron);
        }
        self.count(route.func);
        if c.funcs[route.index].cold {
            self.report_now.notify_one();
        }
        Ok(Decision::Queue(Routed {
            func: route.func.to_owned(),
            queue: if mode.is_some() {
                route.async_queue
            } else {
                route.queue
            }
            .to_owned(),
            headers: route.headers(preflight),
            direct: route.direct,
            chain: None,
        }))
    }

    /// Where a chain goes (`funcatron_routes::chain`): resolved here by the
    /// current table, onto its first stage's queue, with `parts` rewritten
    /// to that stage's request; to a Tron (which resolves it) when this
    /// ingress does not route at the edge now.
    pub(crate) fn decide_chain(
        &self,
        parts: &mut Parts,
        stages: &[StageSpec],
    ) -> Result<Decision, Refusal> {
        let Some(c) = self.current() else {
            return Ok(Decision::Tron);
        };
        if self.routing != Routing::Edge || self.behind(&c) {
            return Ok(Decision::Tron);
        }
        let host = crate::host_of(parts).to_owned();
        let resolved = c.routes.resolve_chain(stages, &host).map_err(|e| Refusal {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            code: e.code(),
            message: e.to_string(),
        })?;
        for s in &resolved {
            self.count(&s.func);
            if c.funcs.iter().any(|f| f.func == *s.func && f.cold) {
                self.report_now.notify_one();
            }
        }
        let Some(first) = resolved.first() else {
            return Ok(Decision::Tron);
        };
        let pq = match first.query.as_ref() {
            "" => first.path.to_string(),
            q => format!("{}?{q}", first.path),
        };
        let (Ok(uri), Ok(method), Ok(host)) = (
            pq.parse(),
            axum::http::Method::from_bytes(first.method.as_bytes()),
            HeaderValue::from_str(&first.host),
        ) else {
            return Ok(Decision::Tron);
        };
        parts.uri = uri;
        parts.method = method;
        parts.headers.insert(axum::http::header::HOST, host);
        parts.headers.remove(funcatron_routes::chain::CHAIN_HEADER);
        Ok(Decision::Queue(Routed {
            func: first.func.to_string(),
            queue: first.queue.to_string(),
            headers: funcatron_routes::chain::message_headers(first),
            direct: false,
            chain: Some(funcatron_envelope::Chain {
                at: 0,
                stages: resolved,
                exec_ms: Vec::new(),
            }),
        }))
    }
}

impl Edge {
    /// Count a request routed here for `func` (its name allocated only
    /// for its first request).
    fn count(&self, func: &str) {
        if let Some(n) = self.counts.get(func) {
            n.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counts
            .entry(func.to_owned())
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// What `f`'s policy says of a call in `mode`, with a callback or not.
fn refusal(f: &FuncAdmission, mode: Option<Async>, callback: bool) -> Result<(), Refusal> {
    match admission::refusal(f, mode.is_some(), callback) {
        None => Ok(()),
        Some(r) => Err(Refusal {
            status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
            code: r.code,
            message: r.message,
        }),
    }
}

pub(crate) use admission::RETRY_AFTER_S;

impl Refusal {
    /// Add what the refusal's status needs to its answer.
    pub(crate) fn decorate(&self, r: &mut HttpResponse) {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static(RETRY_AFTER_S));
        }
    }
}

/// Keep the latest table in `tx` until `shutdown`.
async fn hear(
    broker: AnyBroker,
    tx: watch::Sender<Option<Arc<Current>>>,
    instance: String,
    shutdown: CancellationToken,
) {
    let mut sub = match broker.subscribe(ADMISSION_TOPIC).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot hear the Trons' tables; every request goes to a Tron and is admitted");
            return;
        }
    };
    // Ask for the table now rather than at the Trons' next resend.
    send_demand(&broker, instance, Vec::new()).await;
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        let table: AdmissionTable = match serde_json::from_slice(&d.message.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable route table ignored");
                continue;
            }
        };
        // The borrow ends before the send (it holds the watch's lock).
        let held = tx.borrow().clone();
        if let Some(current) = adopt(held.as_deref(), table) {
            tx.send_replace(Some(Arc::new(current)));
        }
    }
}

/// What replaces `old` when `table` arrives: `None` to keep `old` (the
/// table is for an older registry revision than `old`'s while `old`
/// stands, or it does not route).
fn adopt(old: Option<&Current>, table: AdmissionTable) -> Option<Current> {
    let now = Instant::now();
    let live = old.filter(|o| now < o.expires);
    if live.is_some_and(|o| table.revision < o.revision) {
        tracing::debug!(tron = %table.tron, revision = table.revision, "a table older than the one held ignored");
        return None;
    }
    let kept = match live {
        // Only the admission state changed (the usual case): keep the
        // built table.
        Some(o) if same_routes(&o.funcs, &table.funcs) => Some(Arc::clone(&o.routes)),
        _ => None,
    };
    let routes = match kept {
        Some(r) => r,
        None => match RouteTable::from_admission(&table.funcs) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::warn!(tron = %table.tron, error = %e, "route table does not route; ignored");
                return None;
            }
        },
    };
    Some(Current {
        routes,
        funcs: table.funcs,
        revision: table.revision,
        expires: now + Duration::from_millis(table.ttl_ms),
    })
}

/// Do two tables route alike (they differ in admission state at most)?
fn same_routes(a: &[FuncAdmission], b: &[FuncAdmission]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.func == y.func
                && x.version == y.version
                && x.host == y.host
                && x.base_path == y.base_path
                && x.bases == y.bases
                && x.operations == y.operations
        })
}

/// The part of a control message the ingress reads: a registry state's
/// revision.
#[derive(Deserialize)]
struct ControlRevision {
    #[serde(default)]
    state: Option<Revision>,
}

#[derive(Deserialize)]
struct Revision {
    revision: u64,
}

/// Keep the newest registry revision announced on the control topic in
/// `newest` until `shutdown`.
async fn hear_revisions(broker: AnyBroker, newest: Arc<AtomicU64>, shutdown: CancellationToken) {
    let mut sub = match broker.subscribe(CONTROL_TOPIC).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hear registry states; a table behind the registry is routed by until it expires");
            return;
        }
    };
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        if let Ok(ControlRevision { state: Some(s) }) = serde_json::from_slice(&d.message.payload) {
            newest.fetch_max(s.revision, Ordering::Relaxed);
        }
    }
}

/// Report what was routed here every `DEMAND_EVERY_MS`, and at once when
/// a request for a cold Func arrives, until `shutdown`.
async fn report(broker: AnyBroker, edge: Edge, instance: String, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(admission::DEMAND_EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = edge.report_now.notified() => {}
        }
        let counts: Vec<(String, u64)> = edge
            .counts
            .iter()
            .filter_map(|e| {
                let n = e.value().swap(0, Ordering::Relaxed);
                (n > 0).then(|| (e.key().clone(), n))
            })
            .collect();
        if counts.is_empty() {
            continue;
        }
        for (func, n) in &counts {
            metrics::counter!("ingress_edge_routed_total", "func" => func.clone()).increment(*n);
        }
        send_demand(&broker, instance.clone(), counts).await;
    }
}

/// Broadcast a demand report (no counts: a request for the table).
async fn send_demand(broker: &AnyBroker, ingress: String, counts: Vec<(String, u64)>) {
    let report = EdgeDemand { ingress, counts };
    let Ok(bytes) = serde_json::to_vec(&report) else {
        return;
    };
    if let Err(e) = broker.broadcast(DEMAND_TOPIC, Message::new(bytes)).await {
        tracing::debug!(error = %e, "demand report not sent");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use funcatron_control::admission::{AdmissionBase, AdmissionOperation};

    fn table(revision: u64, funcs: Vec<FuncAdmission>) -> AdmissionTable {
        AdmissionTable {
            tron: "t".into(),
            sent_ms: 0,
            ttl_ms: 60_000,
            revision,
            funcs,
            matchers: Vec::new(),
        }
    }

    fn func(name: &str, version: &str) -> FuncAdmission {
        let base = format!("/{name}");
        FuncAdmission {
            func: name.into(),
            version: version.into(),
            base_path: base.clone(),
            bases: vec![AdmissionBase {
                host: None,
                path: base,
            }],
            operations: vec![AdmissionOperation {
                method: "GET".into(),
                path: "/{who}".into(),
                operation_id: "greet".into(),
                bases: None,
                direct: false,
            }],
            ..FuncAdmission::default()
        }
    }

    fn edge(routing: Routing, current: Current, newest: u64) -> Edge {
        Edge {
            routing,
            current: watch::channel(Some(Arc::new(current))).1,
            newest_state: Arc::new(AtomicU64::new(newest)),
            report_now: Arc::default(),
            counts: Arc::default(),
        }
    }

    fn parts(method: &str, path: &str) -> Parts {
        axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn decide(e: &Edge, method: &str, path: &str) -> Decision {
        match e.decide(&parts(method, path), "h", None, None) {
            Ok(d) => d,
            Err(r) => panic!("refused: {}", r.message),
        }
    }

    #[test]
    fn a_current_table_routes_onto_the_func_queue_with_the_trons_headers() {
        let c = adopt(None, table(3, vec![func("hello", "v1")])).unwrap();
        let e = edge(Routing::Edge, c, 3);
        let Decision::Queue(r) = decide(&e, "GET", "/hello/you") else {
            panic!("not routed at the edge");
        };
        assert_eq!(r.queue, "funcatron.func.hello.v1");
        let h = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("x-funcatron-operation"), Some("greet"));
        assert_eq!(h("x-funcatron-route"), Some("GET /{who}"));
        assert_eq!(h("x-funcatron-path-params"), Some(r#"{"who":"you"}"#));
        let counted = e.counts.get("hello").map(|n| n.load(Ordering::Relaxed));
        assert_eq!(counted, Some(1), "counted");
        let Ok(Decision::Queue(a)) = e.decide(
            &parts("GET", "/hello/you"),
            "h",
            None,
            Some(Async::NoResult),
        ) else {
            panic!("an async call not routed at the edge");
        };
        assert_eq!(a.queue, "funcatron.async.hello.v1");
        assert!(matches!(
            decide(&e, "GET", "/nobody/x"),
            Decision::Answer { status, .. } if status == StatusCode::NOT_FOUND
        ));
        assert!(matches!(
            decide(&e, "POST", "/hello/you"),
            Decision::Answer { status, allow: Some(ref a), .. } if status == StatusCode::METHOD_NOT_ALLOWED && a == "GET"
        ));
    }

    #[test]
    fn a_table_behind_the_registry_or_tron_routing_sends_to_a_tron() {
        let behind = edge(
            Routing::Edge,
            adopt(None, table(3, vec![func("hello", "v1")])).unwrap(),
            4,
        );
        assert!(matches!(
            decide(&behind, "GET", "/hello/you"),
            Decision::Tron
        ));
        assert!(matches!(decide(&behind, "GET", "/nobody"), Decision::Tron));
        let tron = edge(
            Routing::Tron,
            adopt(None, table(3, vec![func("hello", "v1")])).unwrap(),
            3,
        );
        assert!(matches!(decide(&tron, "GET", "/hello/you"), Decision::Tron));
        let none = Edge {
            routing: Routing::Edge,
            current: watch::channel(None).1,
            newest_state: Arc::default(),
            report_now: Arc::default(),
            counts: Arc::default(),
        };
        assert!(matches!(decide(&none, "GET", "/hello/you"), Decision::Tron));
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_table() {
        let new = adopt(None, table(5, vec![func("hello", "v2")])).unwrap();
        assert!(adopt(Some(&new), table(4, vec![func("hello", "v1")])).is_none());
        let same = adopt(Some(&new), table(5, vec![func("hello", "v3")])).unwrap();
        assert_eq!(same.funcs[0].version, "v3");
        assert!(!Arc::ptr_eq(&same.routes, &new.routes), "rebuilt");
        let mut cold = func("hello", "v3");
        cold.cold = true;
        let kept = adopt(Some(&same), table(5, vec![cold])).unwrap();
        assert!(Arc::ptr_eq(&kept.routes, &same.routes), "only cold changed");
    }

    #[test]
    fn a_control_message_gives_its_states_revision() {
        let v: ControlRevision = serde_json::from_str(
            r#"{"kind":"state","state":{"revision":9,"origin":"t","funcs":{}},"fetch":"http://x"}"#,
        )
        .unwrap();
        assert_eq!(v.state.map(|s| s.revision), Some(9));
        let v: ControlRevision = serde_json::from_str(r#"{"kind":"hello"}"#).unwrap();
        assert!(v.state.is_none());
    }
}

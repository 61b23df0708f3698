//! Admission at the embedded ingress: async calls a Func has no room for,
//! and calls an async-only Func does not take, are refused here, before
//! anything is recorded or queued.
//!
//! Tron (broadcasts its table on `funcatron.admission`) -> **ingress:
//! admission (here)** -> `funcatron.requests` -> Tron -> Func queue. The
//! table names every routed Func with its bases and operations; the
//! ingress builds the Tron's own route table from it
//! (`funcatron_routes::RouteTable::from_admission`) and so matches a
//! request to the Func the Tron will route it to. Without a current table
//! (no Tron heard yet, or the last one older than its `ttl_ms`) every
//! request is admitted: the Runner still refuses a synchronous call to an
//! async-only Func, and the limits are the Trons' advice, not a lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response as HttpResponse;
use funcatron_broker::{AnyBroker, Broker};
use funcatron_control::admission::{self, AdmissionTable, FuncAdmission};
use funcatron_control::names::ADMISSION_TOPIC;
use funcatron_routes::{RouteOutcome, RouteTable};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::calls::Async;

/// The latest admission table this ingress heard, ready to match.
pub(crate) struct Current {
    /// Built from the table's Funcs, in the sending Tron's order (kept
    /// while only `full` changes).
    routes: Arc<RouteTable>,
    /// The table's Funcs, by position in `routes`.
    funcs: Vec<FuncAdmission>,
    /// When it stops counting.
    expires: Instant,
}

/// The table an ingress admits by: a handle on the latest one heard.
#[derive(Clone)]
pub(crate) struct Admission {
    current: watch::Receiver<Option<Arc<Current>>>,
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

impl Admission {
    /// Hear tables from the Trons until `shutdown`.
    pub(crate) fn start(broker: AnyBroker, shutdown: CancellationToken) -> Admission {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(hear(broker, tx, shutdown));
        Admission { current: rx }
    }

    /// The current table, unless there is none or it is stale.
    fn current(&self) -> Option<Arc<Current>> {
        let c = self.current.borrow().clone()?;
        (Instant::now() < c.expires).then_some(c)
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

    /// May this request be queued? `named`: the Func a
    /// `/function/<func>/` path names (the path is already below it).
    pub(crate) fn check(
        &self,
        parts: &Parts,
        host: &str,
        named: Option<&str>,
        mode: Option<Async>,
    ) -> Result<(), Refusal> {
        let Some(c) = self.current() else {
            return Ok(());
        };
        let (method, path) = (parts.method.as_str(), parts.uri.path());
        let outcome = match named {
            Some(func) => c.routes.route_func(func, method, path),
            None => Some(c.routes.route(host, method, path)),
        };
        let func = match outcome {
            Some(RouteOutcome::Found(r)) => r.func,
            // A preflight runs no Func; 404s and 405s are the Tron's.
            _ => return Ok(()),
        };
        let Some(f) = c.funcs.iter().find(|f| f.func == func) else {
            return Ok(());
        };
        refusal(f, mode, parts.headers.contains_key("x-callback-url"))
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
    shutdown: CancellationToken,
) {
    let mut sub = match broker.subscribe(ADMISSION_TOPIC).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot hear admission tables; every call is admitted");
            return;
        }
    };
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        let table: AdmissionTable = match serde_json::from_slice(&d.message.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable admission table ignored");
                continue;
            }
        };
        let expires = Instant::now() + Duration::from_millis(table.ttl_ms);
        let kept = match tx.borrow().as_ref() {
            // Only `full` changed (the usual case): keep the built table.
            Some(o) if same_routes(&o.funcs, &table.funcs) => Some(Arc::clone(&o.routes)),
            _ => None,
        };
        let routes = match kept {
            Some(r) => r,
            None => match RouteTable::from_admission(&table.funcs) {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    tracing::warn!(tron = %table.tron, error = %e, "admission table does not route; ignored");
                    continue;
                }
            },
        };
        let current = Current {
            routes,
            funcs: table.funcs,
            expires,
        };
        tx.send_replace(Some(Arc::new(current)));
    }
}

/// Do two tables route alike (they differ in `full` at most)?
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

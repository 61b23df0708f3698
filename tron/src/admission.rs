//! The route and admission broadcast: this Tron's routes, its Funcs'
//! async limits, whether their async queue is full and whether they have
//! a Runner, for the ingresses that route at the edge; and the demand
//! those ingresses report back.
//!
//! **Tron (here)** -> `funcatron.admission` -> ingress (routes and admits
//! by the table) -> Func queue -> Runner; ingress -> `funcatron.demand`
//! -> **Tron (here)** -> [`Demand`] -> autoscaler. The table is sent at
//! once when the routes change (a registry switch, a dev-mode reload),
//! at every [`POLL`] when its admission state changed (the depth of each
//! limited Func's async queue, read with the broker seam's queue-depth
//! operation as the autoscaler does; the cold set), at once when an
//! ingress asks (an empty demand report: it just started), and every
//! [`admission::RESEND_MS`] anyway (`funcatron_control::admission`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_control::admission::{self, AdmissionTable, EdgeDemand, EdgeMatcher, FuncAdmission};
use funcatron_control::names::{ADMISSION_TOPIC, DEMAND_TOPIC};
use funcatron_envelope::now_ms;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::demand::Demand;
use crate::routes::RouteTable;

/// How often queue depths and the cold set are read.
pub const POLL: Duration = Duration::from_millis(250);

/// The table's Funcs now: each with `full` from its async queue's depth
/// and `cold` from the autoscaler's cold set.
pub async fn funcs(broker: &AnyBroker, demand: &Demand, table: &RouteTable) -> Vec<FuncAdmission> {
    let infos = table.func_infos();
    let mut out = Vec::with_capacity(infos.len());
    for f in infos {
        let mut a = f.admission().clone();
        if a.max_queued.is_some() {
            // Unknown depth (broker away): admit; the table is advice.
            a.full = match broker.depth(f.async_queue()).await {
                Ok(d) => admission::is_full(a.max_queued, d.ready),
                Err(e) => {
                    tracing::debug!(func = f.name(), error = %e, "async queue depth unknown");
                    false
                }
            };
        }
        a.cold = demand.is_cold(f.name());
        out.push(a);
    }
    out
}

/// Broadcast the table of the current routes until `shutdown`.
pub async fn run(
    broker: AnyBroker,
    demand: Arc<Demand>,
    mut routes: watch::Receiver<Arc<RouteTable>>,
    tron: String,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(u64, Vec<FuncAdmission>, Instant)> = None;
    // The flat matchers, built again only when the routes change.
    let mut matchers: Option<(Arc<RouteTable>, Vec<EdgeMatcher>)> = None;
    let resend = Duration::from_millis(admission::RESEND_MS);
    let mut watching = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            changed = routes.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                }
            }
            // A new ingress: send at once rather than at the next resend.
            _ = demand.table_wanted() => last = None,
        }
        let table = Arc::clone(&routes.borrow_and_update());
        let now = funcs(&broker, &demand, &table).await;
        let revision = table.revision();
        let due = match &last {
            Some((rev, prev, at)) => *rev != revision || *prev != now || at.elapsed() >= resend,
            None => true,
        };
        if !due {
            continue;
        }
        let flat = match &matchers {
            Some((t, m)) if Arc::ptr_eq(t, &table) => m.clone(),
            _ => {
                let m = table.matchers();
                matchers = Some((Arc::clone(&table), m.clone()));
                m
            }
        };
        let msg = AdmissionTable {
            tron: tron.clone(),
            sent_ms: now_ms() as u64,
            ttl_ms: admission::TTL_MS,
            revision,
            funcs: now.clone(),
            matchers: flat,
        };
        let Ok(bytes) = serde_json::to_vec(&msg) else {
            continue;
        };
        match broker.broadcast(ADMISSION_TOPIC, Message::new(bytes)).await {
            Ok(()) => {
                metrics::counter!("tron_admission_broadcasts_total").increment(1);
                last = Some((revision, now, Instant::now()));
            }
            Err(e) => tracing::debug!(error = %e, "admission table not broadcast"),
        }
    }
}

/// Add what the ingresses report they routed at the edge to `demand`
/// until `shutdown`.
pub async fn hear_demand(broker: AnyBroker, demand: Arc<Demand>, shutdown: CancellationToken) {
    let mut sub = match broker.subscribe(DEMAND_TOPIC).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot hear the ingresses' demand; requests routed at the edge are not counted");
            return;
        }
    };
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        match serde_json::from_slice::<EdgeDemand>(&d.message.payload) {
            Ok(report) if report.counts.is_empty() => demand.want_table(),
            Ok(report) => {
                for (func, n) in &report.counts {
                    demand.add(func, *n);
                }
            }
            Err(e) => {
                metrics::counter!("tron_bad_demand_reports_total").increment(1);
                tracing::debug!(error = %e, "undecodable demand report ignored");
            }
        }
    }
}

//! The admission broadcast: this Tron's Funcs, their async policy's
//! limits and whether their async queue is full, for the ingresses.
//!
//! ingress (admits by the table) -> `funcatron.requests` -> **Tron** ->
//! the Func's async queue. Every [`POLL`] the Tron reads the depth of each
//! limited Func's async queue (the broker seam's queue-depth operation, as
//! the autoscaler does) and broadcasts the table on
//! `funcatron.admission` when it changed, and every
//! [`admission::RESEND_MS`] anyway (`funcatron_control::admission`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_control::admission::{self, AdmissionTable, FuncAdmission};
use funcatron_control::names::ADMISSION_TOPIC;
use funcatron_envelope::now_ms;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::routes::RouteTable;

/// How often queue depths are read.
pub const POLL: Duration = Duration::from_millis(250);

/// The table's Funcs now: each with `full` from its async queue's depth.
/// Empty when no Func has a limit (nothing for an ingress to refuse).
pub async fn funcs(broker: &AnyBroker, table: &RouteTable) -> Vec<FuncAdmission> {
    let infos = table.func_infos();
    let limited = infos.iter().any(|f| {
        let a = f.admission();
        a.async_only || a.max_queued.is_some()
    });
    if !limited {
        return Vec::new();
    }
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
        out.push(a);
    }
    out
}

/// Broadcast the table of the current routes until `shutdown`.
pub async fn run(
    broker: AnyBroker,
    routes: watch::Receiver<Arc<RouteTable>>,
    tron: String,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    let mut last: Option<(Vec<FuncAdmission>, Instant)> = None;
    let resend = Duration::from_millis(admission::RESEND_MS);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let table = Arc::clone(&routes.borrow());
        let now = funcs(&broker, &table).await;
        let due = match &last {
            Some((prev, at)) => *prev != now || at.elapsed() >= resend,
            None => true,
        };
        if !due {
            continue;
        }
        let msg = AdmissionTable {
            tron: tron.clone(),
            sent_ms: now_ms() as u64,
            ttl_ms: admission::TTL_MS,
            funcs: now.clone(),
        };
        let Ok(bytes) = serde_json::to_vec(&msg) else {
            continue;
        };
        match broker.broadcast(ADMISSION_TOPIC, Message::new(bytes)).await {
            Ok(()) => {
                metrics::counter!("tron_admission_broadcasts_total").increment(1);
                last = Some((now, Instant::now()));
            }
            Err(e) => tracing::debug!(error = %e, "admission table not broadcast"),
        }
    }
}

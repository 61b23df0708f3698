//! The status view (`funcatron status`, `GET /v1/status`): per Func, what
//! the broker, this Tron's demand, the Runners' heartbeats and the
//! autoscaler say, assembled from the node's context.

use funcatron_broker::Broker;
use serde_json::{json, Map, Value};

use crate::autoscale::Autoscaler;
use crate::context::TronContext;
use crate::routes::RouteTable;

/// Per Func: queue depth, arrival rate, service time, requests in flight
/// and Runners serving it (heard from in the last 3 s), and, with an
/// autoscaler, its signals, desired and running Runners and last
/// decisions.
pub async fn status(
    ctx: &TronContext,
    routes: &RouteTable,
    autoscaler: Option<&Autoscaler>,
) -> Value {
    let scaling = autoscaler.map(|a| a.status()).unwrap_or(Value::Null);
    let mut out = Map::new();
    for (func, queue) in routes.funcs() {
        let depth = ctx.broker.depth(queue).await.ok();
        let heard = ctx.heartbeats.sum(func);
        out.insert(
            func.to_owned(),
            json!({
                "queue": queue,
                "ready": depth.map(|d| d.ready),
                "consumers": depth.map(|d| d.consumers),
                "arrival_per_s": ctx.demand.arrival_per_s(func),
                "service_ms": heard.service_ms(),
                "in_flight": heard.in_flight,
                "served": heard.served,
                "runners": heard.runners,
                "scaling": scaling["funcs"].get(func),
            }),
        );
    }
    json!({"funcs": out, "autoscaler": scaling.get("substrate").map(|_| &scaling)})
}

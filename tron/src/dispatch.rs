//! The dispatch loop: consume the request queue, route, forward, acknowledge.

use std::sync::Arc;

use funcatron_broker::{
    AnyBroker, Broker, BrokerError, ConsumeOptions, Delivery, Message, QueueKind,
};
use funcatron_control::{headers, names};
use funcatron_envelope::{now_ms, Response, RouteView};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::context::TronContext;
use crate::demand::Demand;
use crate::routes::{Route, RouteOutcome, RouteTable};

/// Tron settings.
#[derive(Debug, Clone)]
pub struct TronOptions {
    /// Unacknowledged requests one Tron holds at once; each is dispatched
    /// concurrently, so this bounds in-flight forwards.
    pub prefetch: u16,
}

/// Default requests one Tron dispatches concurrently.
pub const DEFAULT_PREFETCH: u16 = 256;

impl Default for TronOptions {
    fn default() -> Self {
        TronOptions {
            prefetch: DEFAULT_PREFETCH,
        }
    }
}

/// A route table that never changes (bundles from a directory).
pub fn fixed(routes: RouteTable) -> watch::Receiver<Arc<RouteTable>> {
    watch::channel(Arc::new(routes)).1
}

/// Declare every Func queue of `routes`: do this before publishing a new
/// table, so no request is routed to a queue that does not exist yet.
pub async fn declare_routes(broker: &AnyBroker, routes: &RouteTable) {
    for (func, queue) in routes.funcs() {
        tracing::info!(func, queue, "routing to Func");
        declare_when_connected(broker, queue).await;
    }
    for queue in routes.async_queues() {
        declare_when_connected(broker, queue).await;
    }
}

/// Run a Tron until `shutdown` fires; in-flight dispatches finish first.
/// Each request is routed by the table current when it arrives; a new
/// table replaces the old one atomically (requests being dispatched keep
/// the table they started with).
pub async fn run(
    ctx: TronContext,
    mut routes: watch::Receiver<Arc<RouteTable>>,
    options: TronOptions,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    let broker = ctx.broker.clone();
    let initial = Arc::clone(&routes.borrow_and_update());
    declare_routes(&broker, &initial).await;
    declare_when_connected(&broker, names::DEAD_LETTERS).await;
    let mut sub = broker
        .consume(
            names::REQUESTS,
            QueueKind::Work,
            ConsumeOptions {
                prefetch: options.prefetch,
                auto_ack: false,
            },
        )
        .await?;
    // Exported from the start: with edge routing a Tron may forward
    // nothing for a long time.
    metrics::counter!("tron_requests_total", "outcome" => "forwarded").increment(0);
    let tracker = TaskTracker::new();
    let mut current = initial;
    let mut watching = true;
    tokio::spawn(observe_depths(
        broker.clone(),
        routes.clone(),
        shutdown.clone(),
    ));
    let tron = format!("tron-{}", &funcatron_envelope::new_request_id()[..12]);
    tokio::spawn(crate::admission::run(
        broker.clone(),
        Arc::clone(&ctx.demand),
        routes.clone(),
        tron,
        shutdown.clone(),
    ));
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = routes.changed(), if watching => {
                match changed {
                    Ok(()) => {
                        current = Arc::clone(&routes.borrow_and_update());
                        declare_routes(&broker, &current).await;
                    }
                    Err(_) => watching = false,
                }
                continue;
            }
            d = sub.next() => match d { Some(d) => d, None => break },
        };
        let ctx = ctx.clone();
        let routes = Arc::clone(&current);
        tracker.spawn(async move { dispatch(&ctx.broker, &ctx.demand, &routes, delivery).await });
    }
    drop(sub);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Every second, each routed Func's queue depth and consumer count as
/// gauges (`tron_queue_ready_messages`, `tron_queue_consumers`, by Func).
async fn observe_depths(
    broker: AnyBroker,
    routes: watch::Receiver<Arc<RouteTable>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let table = Arc::clone(&routes.borrow());
        for (func, queue) in table.funcs() {
            if let Ok(d) = broker.depth(queue).await {
                metrics::gauge!("tron_queue_ready_messages", "func" => func.to_owned())
                    .set(d.ready as f64);
                metrics::gauge!("tron_queue_consumers", "func" => func.to_owned())
                    .set(d.consumers as f64);
            }
        }
    }
}

/// Declare now, or remember the queue so the adapter declares it on connect.
async fn declare_when_connected(broker: &AnyBroker, queue: &str) {
    if let Err(e) = broker.declare(queue, QueueKind::Work).await {
        tracing::debug!(queue, error = %e, "declare deferred until the broker is reachable");
    }
}

async fn dispatch(broker: &AnyBroker, demand: &Demand, routes: &RouteTable, delivery: Delivery) {
    let payload = delivery.message.payload.clone();
    let view = match RouteView::decode(&payload) {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!("tron_dead_lettered_total", "reason" => e.kind()).increment(1);
            broker
                .dead_letter(names::REQUESTS, delivery, &e.to_string())
                .await;
            return;
        }
    };
    let span = tracing::debug_span!(
        "tron.dispatch",
        request_id = %view.id,
        func = tracing::field::Empty,
        version = tracing::field::Empty
    );
    async {
        let now = now_ms();
        if (view.deadline_ms as f64) <= now {
            // The ingress has already answered 504; nothing left to do.
            tracing::debug!("request expired before dispatch");
            metrics::counter!("tron_requests_total", "outcome" => "expired").increment(1);
            let _ = delivery.ack().await;
            return;
        }
        let ttl_ms = (view.deadline_ms as f64 - now).ceil() as u64;
        if view.path == funcatron_routes::chain::CHAIN_PATH && view.func.is_none() {
            return chain(broker, demand, routes, &view, delivery, ttl_ms).await;
        }
        let outcome = match view.func.as_deref() {
            None => routes.route(&view.host, &view.method, &view.path),
            Some(func) => match routes.route_func(func, &view.method, &view.path) {
                Some(outcome) => outcome,
                None => {
                    let msg = format!("no enabled Func is named {func:?}");
                    answer(broker, &view, delivery, 404, "unknown_func", &msg, None).await;
                    return;
                }
            },
        };
        match outcome {
            RouteOutcome::Found(route) => {
                tracing::Span::current().record("func", route.func);
                tracing::Span::current().record("version", route.version);
                forward(broker, demand, &view, route, None, delivery, now, ttl_ms).await;
            }
            RouteOutcome::Preflight(route, allow) => {
                tracing::Span::current().record("func", route.func);
                let allow = allow.join(", ");
                forward(
                    broker,
                    demand,
                    &view,
                    route,
                    Some(allow),
                    delivery,
                    now,
                    ttl_ms,
                )
                .await;
            }
            RouteOutcome::NotFound => {
                let msg = format!("no Func serves {} {}{}", view.method, view.host, view.path);
                answer(broker, &view, delivery, 404, "no_route", &msg, None).await;
            }
            RouteOutcome::MethodNotAllowed(allow) => {
                let allow = allow.join(", ");
                let msg = format!(
                    "{} is not allowed on {}; allowed: {allow}",
                    view.method, view.path
                );
                answer(
                    broker,
                    &view,
                    delivery,
                    405,
                    "method_not_allowed",
                    &msg,
                    Some(allow),
                )
                .await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Forward a routed request to its Func queue with the routing outcome in
/// headers (a preflight with the path's methods, `preflight`); acknowledge
/// once the forward is confirmed.
#[allow(clippy::too_many_arguments)]
async fn forward(
    broker: &AnyBroker,
    demand: &Demand,
    view: &RouteView<'_>,
    route: Route<'_>,
    preflight: Option<String>,
    delivery: Delivery,
    now: f64,
    ttl_ms: u64,
) {
    let message = |preflight| {
        let mut hdrs = route.headers(preflight);
        if view.direct {
            hdrs.push((headers::DIRECT.to_owned(), "1".to_owned()));
        }
        if delivery.message.header(headers::FLOW).is_some() {
            hdrs.push((headers::FLOW.to_owned(), "1".to_owned()));
        }
        Message {
            payload: delivery.message.payload.clone(),
            headers: hdrs,
            ttl_ms: Some(ttl_ms),
            persistent: delivery.message.persistent || view.is_async,
        }
    };
    // Asynchronous calls wait in their own queue, so a backlog of them
    // never holds up a synchronous request.
    let queue = if view.is_async {
        route.async_queue
    } else {
        route.queue
    };
    // (A preflight's methods are cloned, not a plain request's headers.)
    let mut published = broker.publish(queue, message(preflight.clone())).await;
    if let Err(BrokerError::NoRoute(_)) = &published {
        // The table's queues are declared before it is used, but a declare
        // made while the broker was still connecting is deferred: declare
        // it now and publish once more.
        declare_when_connected(broker, queue).await;
        published = broker.publish(queue, message(preflight)).await;
    }
    match published {
        Ok(()) => {
            metrics::counter!("tron_requests_total", "outcome" => "forwarded").increment(1);
            metrics::counter!("tron_dispatched_total", "func" => route.func.to_owned())
                .increment(1);
            demand.dispatched(route.func);
            metrics::histogram!("tron_dispatch_duration_seconds").record((now_ms() - now) / 1000.0);
            let _ = delivery.ack().await;
        }
        Err(BrokerError::NoRoute(q)) => {
            // The Func queue vanished (deleted by hand?): say so.
            let msg = format!("the queue {q} of Func {} does not exist", route.func);
            answer(broker, view, delivery, 503, "func_unavailable", &msg, None).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "forward failed; requeueing");
            let _ = delivery.nack(true).await;
        }
    }
}

/// A chain an ingress did not resolve (nginx, or no current table):
/// resolve it here (`funcatron_routes::chain`), rewrite the request to
/// its first stage and forward it there; or answer why it cannot run.
async fn chain(
    broker: &AnyBroker,
    demand: &Demand,
    routes: &RouteTable,
    view: &RouteView<'_>,
    delivery: Delivery,
    ttl_ms: u64,
) {
    use funcatron_routes::chain as c;
    let payload = delivery.message.payload.clone();
    let Ok(mut req) = funcatron_envelope::Request::decode(&payload) else {
        // RouteView decoded; the rest did not.
        broker
            .dead_letter(names::REQUESTS, delivery, "malformed chain request")
            .await;
        return;
    };
    let header = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(c::CHAIN_HEADER))
        .map(|(_, v)| v.as_ref());
    let query = (!req.query.is_empty()).then_some(req.query.as_ref());
    let resolved = c::expression(header, query)
        .and_then(|e| c::parse(&e))
        .and_then(|stages| routes.resolve_chain(&stages, &req.host));
    let stages = match resolved {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => {
            return answer(
                broker,
                view,
                delivery,
                400,
                "chain_syntax",
                "no stages",
                None,
            )
            .await
        }
        Err(e) => {
            let msg = e.to_string();
            return answer(broker, view, delivery, e.status(), e.code(), &msg, None).await;
        }
    };
    for s in &stages {
        demand.dispatched(&s.func);
    }
    let first = &stages[0];
    let queue = first.queue.to_string();
    let func = first.func.to_string();
    let hdrs = c::message_headers(first);
    req.headers.retain(|(k, _)| {
        !k.eq_ignore_ascii_case(c::CHAIN_HEADER) && !k.eq_ignore_ascii_case("host")
    });
    req.headers
        .push((std::borrow::Cow::Borrowed("host"), first.host.clone()));
    req.method = first.method.clone();
    req.host = first.host.clone();
    req.path = first.path.clone();
    req.query = first.query.clone();
    req.chain = Some(funcatron_envelope::Chain {
        at: 0,
        stages: stages.clone(),
        exec_ms: Vec::new(),
    });
    let message = Message {
        payload: req.encode().into(),
        headers: hdrs,
        ttl_ms: Some(ttl_ms),
        persistent: false,
    };
    match broker.publish(&queue, message).await {
        Ok(()) => {
            metrics::counter!("tron_requests_total", "outcome" => "forwarded").increment(1);
            let _ = delivery.ack().await;
        }
        Err(BrokerError::NoRoute(q)) => {
            let msg = format!("the queue {q} of Func {func} does not exist");
            answer(broker, view, delivery, 503, "func_unavailable", &msg, None).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "chain forward failed; requeueing");
            let _ = delivery.nack(true).await;
        }
    }
}

/// The Tron answers a request itself (404, 405, 503).
async fn answer(
    broker: &AnyBroker,
    view: &RouteView<'_>,
    delivery: Delivery,
    status: u16,
    code: &'static str,
    message: &str,
    allow: Option<String>,
) {
    metrics::counter!("tron_requests_total", "outcome" => code).increment(1);
    let Some(reply_to) = view.reply_to.as_deref() else {
        let _ = delivery.ack().await;
        return;
    };
    let mut resp = Response::error(&view.id, status, code, message);
    resp.reply_key = view.reply_key.clone();
    resp.call_id = view.call_id.clone();
    if let Some(allow) = allow {
        resp.headers.push(("allow".into(), allow.into()));
    }
    let msg = Message {
        payload: resp.encode().into(),
        // An asynchronous call's outcome must survive a broker restart.
        persistent: view.is_async,
        ..Message::default()
    };
    match broker.publish(reply_to, msg).await {
        // NoRoute: the ingress is gone; no one is left to tell.
        Ok(()) | Err(BrokerError::NoRoute(_)) => {
            let _ = delivery.ack().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "answer failed; requeueing");
            let _ = delivery.nack(true).await;
        }
    }
}

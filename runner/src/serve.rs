//! The Runner's consume loop: one subscription per Func queue, one task per
//! delivery, acknowledge only after the response is published.

use std::sync::Arc;

use funcatron_broker::{
    names, AnyBroker, Broker, BrokerError, ConsumeOptions, Delivery, Message, QueueKind,
};
use funcatron_bundle::{Bundle, RuntimeKind};
use funcatron_envelope::{headers, now_ms};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::exec::{ExecLimits, ExecRuntime};
use crate::invoke::{Handled, Job};
use crate::lua::{LuaLimits, LuaRuntime};
use crate::runtime::Runtime;

/// Every runtime this Runner serves, picked per Func by its bundle.
struct Runtimes {
    lua: LuaRuntime,
    exec: ExecRuntime,
    kinds: std::collections::HashMap<String, RuntimeKind>,
}

impl Runtime for Runtimes {
    async fn invoke(&self, func: &str, job: Job) -> Handled {
        match self.kinds.get(func) {
            Some(RuntimeKind::Exec) => self.exec.invoke(func, job).await,
            _ => self.lua.invoke(func, job).await,
        }
    }
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
}

impl Default for RunnerOptions {
    fn default() -> Self {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        RunnerOptions {
            prefetch: 64,
            workers,
            lua_limits: LuaLimits::default(),
            exec_limits: ExecLimits {
                timeout: std::time::Duration::from_secs(10),
                memory_bytes: 1024 * 1024 * 1024,
            },
        }
    }
}

/// Serve `bundles` until `shutdown`: stop consuming, finish and acknowledge
/// what is in flight, then return.
pub async fn run(
    broker: AnyBroker,
    bundles: Vec<Bundle>,
    options: RunnerOptions,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    let (lua, failures) = LuaRuntime::start(&bundles, options.workers, options.lua_limits);
    for (func, why) in &failures {
        tracing::error!(func, error = %why, "bundle failed to prepare; its requests get 500 with this reason");
    }
    let runtime = Arc::new(Runtimes {
        lua,
        exec: ExecRuntime::new(&bundles, options.exec_limits),
        kinds: bundles
            .iter()
            .map(|b| (b.name.clone(), b.runtime))
            .collect(),
    });
    let tracker = TaskTracker::new();
    for b in &bundles {
        let queue = names::func_queue(&b.name);
        let sub = broker
            .consume(
                &queue,
                QueueKind::Work,
                ConsumeOptions {
                    prefetch: options.prefetch,
                    auto_ack: false,
                },
            )
            .await?;
        tracing::info!(func = %b.name, queue, "serving Func");
        tracker.spawn(consume(
            broker.clone(),
            Arc::clone(&runtime),
            Arc::from(b.name.as_str()),
            queue,
            sub,
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    shutdown.cancelled().await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn consume(
    broker: AnyBroker,
    runtime: Arc<Runtimes>,
    func: Arc<str>,
    queue: String,
    mut sub: funcatron_broker::Subscription,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = sub.next() => match d { Some(d) => d, None => break },
        };
        let broker = broker.clone();
        let runtime = Arc::clone(&runtime);
        let func = Arc::clone(&func);
        let queue = queue.clone();
        tracker.spawn(async move { handle(&broker, &*runtime, &func, &queue, delivery).await });
    }
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
    runtime: &impl Runtime,
    func: &str,
    queue: &str,
    delivery: Delivery,
) {
    let picked_ms = now_ms();
    let Some(operation) = delivery
        .message
        .header(headers::OPERATION)
        .map(str::to_owned)
    else {
        broker
            .dead_letter(
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
            broker.dead_letter(queue, delivery, &why).await;
            return;
        }
    };
    let job = Job {
        payload: delivery.message.payload.clone(),
        operation,
        params,
        picked_ms,
    };
    let span = tracing::debug_span!("runner.invoke", func, request_id = tracing::field::Empty);
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
                match broker.publish(&reply_to, Message::new(response)).await {
                    // NoRoute: the ingress that asked is gone; the work is done.
                    Ok(()) | Err(BrokerError::NoRoute(_)) => {
                        let _ = delivery.ack().await;
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
            Handled::Undecodable(why) => broker.dead_letter(queue, delivery, &why).await,
            Handled::Requeue(why) => {
                tracing::warn!(reason = %why, "requeueing the request");
                let _ = delivery.nack(true).await;
            }
        }
    }
    .instrument(span)
    .await
}

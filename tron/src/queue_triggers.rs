//! Queue and exchange triggers on a Tron: messages of an AMQP queue the
//! Func does not own (or of an exchange, through a queue of the trigger's
//! own) become asynchronous calls of the operation that declared them.
//!
//! another application -> its queue (or exchange -> `funcatron.trigger.
//! <func>.<trigger>`) -> **this consumer, on every Tron (competing
//! consumers: each message reaches one)** -> one async call per batch on
//! `funcatron.requests` -> a Tron routes it to the Func's async queue ->
//! Runner -> `funcatron.outcomes` -> retries, dead letters as the Func's
//! async policy says.
//!
//! Nothing is lost: a message is acknowledged only once its call is final
//! (succeeded, failed with an answer the policy does not retry, or
//! dead-lettered, where it waits for a redrive). Until then the broker
//! holds it unacknowledged, so a Runner killed mid-call only delays it (the
//! call's own attempt is redelivered to another Runner) and a Tron killed
//! while waiting gives the message back to the broker, which delivers it
//! to another Tron. The call's idempotency key is the trigger and the
//! message id (AMQP `message-id`), so a redelivered message with an id is
//! still one call; a message without one may make a second call then
//! (at-least-once).
//!
//! A triggered call's body is the message's event (`batch: 1`) or an
//! array of up to `batch` of them (see `docs/triggers.md`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, Delivery, QueueKind, Subscription};
use funcatron_bundle::triggers::QueueTrigger;
use funcatron_calls::Calls;
use funcatron_control::names;
use futures::FutureExt as _;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::triggers::{submit, Target, TriggerSet};

/// The largest message a trigger turns into a call (the ingress's default
/// body limit); a larger one is dead-lettered with the reason.
pub const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// How long a stopping consumer lets its calls in flight settle their
/// messages before its channel closes (the broker then redelivers them).
const DRAIN: Duration = Duration::from_secs(5);

/// The longest pause between two reads of a waiting call's record.
const POLL_MAX: Duration = Duration::from_millis(500);

/// One running trigger: what it consumes and where its calls go.
type Key = (QueueTrigger, Target);

/// Run one consumer per queue trigger of the served bundles, starting and
/// stopping them as the served set changes, until `shutdown`.
pub async fn run(
    calls: Calls,
    broker: AnyBroker,
    mut triggers: watch::Receiver<Arc<TriggerSet>>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<Key, (CancellationToken, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    loop {
        let set = Arc::clone(&triggers.borrow_and_update());
        let wanted: HashSet<&Key> = set.queues().iter().collect();
        running.retain(|k, (stop, _)| {
            let keep = wanted.contains(k);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for k in wanted {
            if running.contains_key(k) {
                continue;
            }
            let stop = shutdown.child_token();
            let span =
                tracing::info_span!("queue_trigger", func = %k.1.func, trigger = %k.1.trigger);
            let task = tokio::spawn(
                consume(calls.clone(), broker.clone(), k.clone(), stop.clone()).instrument(span),
            );
            running.insert(k.clone(), (stop, task));
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = triggers.changed() => if r.is_err() {
                // A fixed set (a Tron without a registry): it stays.
                shutdown.cancelled().await;
                break;
            },
        }
    }
    for (_, (stop, task)) in running {
        stop.cancel();
        let _ = task.await;
    }
}

/// The queue a trigger consumes, bound to its exchange first when it has
/// one (retried until it works or `stop`).
async fn source(
    broker: &AnyBroker,
    key: &Key,
    stop: &CancellationToken,
) -> Option<(String, QueueKind)> {
    let (q, target) = key;
    if let Some(queue) = &q.queue {
        return Some((queue.clone(), QueueKind::External));
    }
    let exchange = q.exchange.as_deref()?;
    let queue = names::trigger_queue(&target.func, &target.trigger);
    let binding = q.binding_key.as_deref().unwrap_or("#");
    let mut backoff = Duration::from_millis(250);
    loop {
        match broker.bind(&queue, exchange, binding).await {
            Ok(()) => return Some((queue, QueueKind::Work)),
            Err(e) => {
                metrics::counter!("trigger_queue_failures_total", "func" => target.func.clone(), "trigger" => target.trigger.clone(), "why" => "bind")
                    .increment(1);
                tracing::warn!(exchange, error = %e, "cannot bind the trigger's queue; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Consume one trigger's queue until `stop`: batches handed to at most
/// `concurrency` calls at once.
async fn consume(calls: Calls, broker: AnyBroker, key: Key, stop: CancellationToken) {
    let Some((queue, kind)) = source(&broker, &key, &stop).await else {
        return;
    };
    let q = &key.0;
    let prefetch = u16::try_from(q.batch * q.concurrency).unwrap_or(u16::MAX);
    let options = ConsumeOptions {
        prefetch,
        auto_ack: false,
    };
    let mut sub = match broker.consume(&queue, kind, options).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(queue, error = %e, "cannot consume the trigger's queue");
            return;
        }
    };
    tracing::info!(
        queue,
        batch = q.batch,
        concurrency = q.concurrency,
        "queue trigger consuming"
    );
    let slots = Arc::new(Semaphore::new(q.concurrency));
    let target = Arc::new(key.1.clone());
    let source = Arc::new(Source {
        queue: queue.clone(),
        exchange: q.exchange.clone(),
    });
    let mut in_flight = JoinSet::new();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let first = tokio::select! {
            () = stop.cancelled() => break,
            d = sub.next() => match d { Some(d) => d, None => break },
        };
        let mut batch = vec![first];
        fill(&mut sub, &mut batch, q.batch, q.batch_window_ms).await;
        let batch = admit(&broker, &queue, batch).await;
        if batch.is_empty() {
            continue;
        }
        let job = Job {
            calls: calls.clone(),
            broker: broker.clone(),
            target: Arc::clone(&target),
            source: Arc::clone(&source),
            as_array: q.batch > 1,
            stop: stop.clone(),
        };
        in_flight.spawn(
            async move {
                job.handle(batch).await;
                drop(permit);
            }
            .in_current_span(),
        );
        while in_flight.try_join_next().is_some() {}
    }
    // Take nothing more; give back what was delivered and not started,
    // and let the calls in flight settle their messages for a moment.
    sub.cancel().await;
    while let Some(d) = sub.next().await {
        let _ = d.nack(true).await;
    }
    let drained = tokio::time::timeout(DRAIN, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!("calls still running at stop; their messages go back to the broker");
    }
}

/// Add to `batch` up to `max` messages: those already delivered, and
/// those arriving within `window_ms`.
async fn fill(sub: &mut Subscription, batch: &mut Vec<Delivery>, max: usize, window_ms: u64) {
    let until = tokio::time::Instant::now() + Duration::from_millis(window_ms);
    while batch.len() < max {
        let next = if window_ms == 0 {
            sub.next().now_or_never().flatten()
        } else {
            tokio::time::timeout_at(until, sub.next())
                .await
                .ok()
                .flatten()
        };
        match next {
            Some(d) => batch.push(d),
            None => break,
        }
    }
}

/// The messages of `batch` a call can carry; a larger one is
/// dead-lettered with the reason.
async fn admit(broker: &AnyBroker, queue: &str, batch: Vec<Delivery>) -> Vec<Delivery> {
    let mut kept = Vec::with_capacity(batch.len());
    for d in batch {
        if d.message.payload.len() > MAX_MESSAGE_BYTES {
            let why = format!(
                "a trigger's message of {} bytes, over {MAX_MESSAGE_BYTES}",
                d.message.payload.len()
            );
            broker.dead_letter(queue, d, &why).await;
        } else {
            kept.push(d);
        }
    }
    kept
}

/// Where a trigger's messages come from, as its events name it.
struct Source {
    queue: String,
    exchange: Option<String>,
}

/// One batch's call.
struct Job {
    calls: Calls,
    broker: AnyBroker,
    target: Arc<Target>,
    source: Arc<Source>,
    /// The trigger's `batch` is above 1: the body is always an array.
    as_array: bool,
    stop: CancellationToken,
}

impl Job {
    /// Make the batch's call and settle its messages once the call is
    /// final; a call that cannot be queued gives them back.
    async fn handle(self, batch: Vec<Delivery>) {
        let event_id = event_id(&batch);
        let events: Vec<Value> = batch.iter().map(|d| self.event(d)).collect();
        let body = if self.as_array {
            Value::Array(events)
        } else {
            events.into_iter().next().unwrap_or(Value::Null)
        }
        .to_string();
        let t = &self.target;
        let span =
            tracing::debug_span!("trigger_call", event_id = %event_id, messages = batch.len());
        let call_id = match submit(&self.calls, &self.broker, t, &body, &event_id)
            .instrument(span)
            .await
        {
            Ok((id, new)) => {
                if new {
                    let now = funcatron_store::now_ms();
                    if let Err(e) =
                        crate::schedules::count_firings(self.calls.store(), t, 1, now).await
                    {
                        tracing::debug!(error = %e, "a trigger's firing was not counted");
                    }
                }
                id
            }
            Err(e) => {
                metrics::counter!("trigger_queue_failures_total", "func" => t.func.clone(), "trigger" => t.trigger.clone(), "why" => "submit")
                    .increment(1);
                tracing::warn!(error = %e, "a triggered call could not be queued; its messages go back");
                // A pause, so a broker or store outage is not a hot loop.
                tokio::select! {
                    () = self.stop.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                for d in batch {
                    let _ = d.nack(true).await;
                }
                return;
            }
        };
        let Some(outcome) = self.wait_final(&call_id).await else {
            // Stopping: the messages go back (unacknowledged) when the
            // channel closes, and their redelivery finds this call again.
            return;
        };
        for d in batch {
            let _ = d.ack().await;
        }
        metrics::counter!("trigger_messages_total", "func" => t.func.clone(), "trigger" => t.trigger.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// Wait until call `id` is final, and say how it ended; `None` when
    /// stopping first.
    async fn wait_final(&self, id: &str) -> Option<&'static str> {
        let mut pause = Duration::from_millis(5);
        loop {
            match self.calls.get(id).await {
                Ok(Some(c)) if c.state.is_final() => return Some(c.state.as_str()),
                Ok(Some(_)) => {}
                Ok(None) => {
                    // Purged by an operator (or expired): nothing more
                    // will happen to it.
                    tracing::warn!(
                        call_id = id,
                        "the triggered call's record is gone; its messages are acknowledged"
                    );
                    return Some("gone");
                }
                Err(e) => {
                    tracing::warn!(call_id = id, error = %e, "cannot read the triggered call")
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return None,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// A message as its call sees it.
    fn event(&self, d: &Delivery) -> Value {
        let payload = &d.message.payload;
        let (content, body) = match serde_json::from_slice::<Value>(payload) {
            Ok(v) => ("json", v),
            Err(_) => match std::str::from_utf8(payload) {
                Ok(s) => ("text", Value::String(s.to_owned())),
                Err(_) => (
                    "base64",
                    Value::String(base64::engine::general_purpose::STANDARD.encode(payload)),
                ),
            },
        };
        let headers: Map<String, Value> = d
            .message
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({
            "type": "message",
            "trigger": self.target.trigger,
            "queue": self.source.queue,
            "exchange": self.source.exchange,
            "routing_key": d.routing_key,
            "message_id": d.message_id,
            "redelivered": d.redelivered,
            "headers": headers,
            "content": content,
            "body": body,
        })
    }
}

/// The event id of a batch: its one message's id, a digest of its
/// messages' ids, or (when one has none) a fresh id.
fn event_id(batch: &[Delivery]) -> String {
    let ids: Option<Vec<&str>> = batch.iter().map(|d| d.message_id.as_deref()).collect();
    match ids.as_deref() {
        Some([one]) => format!("m-{one}"),
        Some(many) if !many.is_empty() => {
            let mut h = Sha256::new();
            for id in many {
                h.update(id.as_bytes());
                h.update([0]);
            }
            let digest = h.finalize();
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("b-{hex}")
        }
        _ => format!("r-{}", funcatron_envelope::new_request_id()),
    }
}

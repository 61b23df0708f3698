//! The broker seam of the request path: ingress -> **broker** -> Tron ->
//! **broker** (Func queue) -> Runner -> **broker** (reply queue) -> ingress.
//!
//! [`Broker`] is the small trait every adapter implements: declare a queue,
//! publish with confirmation, consume with explicit ack/nack, read queue
//! depth. Two adapters sit beside it and never depend on each other:
//! [`embedded`] (in-process, bounded, with backpressure; the default that
//! makes `funcatron up` a single process) and [`amqp`] (RabbitMQ through
//! `lapin`, with publisher confirms and reconnection). Components hold an
//! [`AnyBroker`], the closed enum chosen from configuration.

#![warn(clippy::too_many_lines)]

use std::future::Future;

use bytes::Bytes;
use tokio::sync::watch;

pub mod amqp;
pub mod embedded;

use funcatron_control::{headers, names};

pub use amqp::{AmqpBroker, QueueType};
pub use embedded::EmbeddedBroker;

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached now; callers answer 503 and retry later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The queue is full and stayed full (embedded backpressure).
    #[error("queue {0} is full")]
    Full(String),
    /// No queue of that name exists, so the message went nowhere.
    #[error("no queue named {0}")]
    NoRoute(String),
    /// The broker refused the message (publisher confirm nack).
    #[error("broker refused the message for {0}")]
    Nacked(String),
    /// The broker rejected an operation (bad arguments, access refused...).
    #[error("broker error: {0}")]
    Protocol(String),
}

impl BrokerError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::Full(_) => "full",
            BrokerError::NoRoute(_) => "no_route",
            BrokerError::Nacked(_) => "nacked",
            BrokerError::Protocol(_) => "protocol",
        }
    }
}

/// A message: an envelope's bytes plus the few headers Funcatron routes on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The envelope bytes, shared rather than copied between hops.
    pub payload: Bytes,
    /// String headers (see `funcatron_control::headers`).
    pub headers: Vec<(String, String)>,
    /// Drop the message if not consumed within this many milliseconds
    /// (derived from the request deadline so no one works on stale requests).
    pub ttl_ms: Option<u64>,
    /// Survive a broker restart (written to disk by RabbitMQ).
    pub persistent: bool,
}

impl Message {
    /// A transient message with no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What kind of queue to declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueKind {
    /// Shared work queue (requests, Func queues, dead letters): durable,
    /// consumed by any number of competing consumers.
    Work,
    /// One consumer's private queue (an ingress's replies): removed when its
    /// owner's connection goes away.
    Exclusive,
    /// A broadcast topic (the name is a fanout exchange): each subscriber
    /// gets its own private queue bound to it, and every message published
    /// while it is subscribed.
    Broadcast,
    /// A queue another application owns (a queue trigger's): it must
    /// exist, and is only checked (a passive declare on RabbitMQ), never
    /// created or changed, so its arguments (quorum, TTLs) stay its
    /// owner's. The embedded broker creates it, as any queue.
    External,
}

/// How to consume.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeOptions {
    /// Most unacknowledged deliveries this consumer holds at once.
    pub prefetch: u16,
    /// Deliveries count as acknowledged on receipt (reply queues only: a
    /// reply has nowhere else to go).
    pub auto_ack: bool,
}

/// Depth of a queue, the autoscaler's main signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Waiting to be delivered.
    pub ready: u64,
    /// Delivered, not yet acknowledged, where the adapter can tell.
    pub unacked: Option<u64>,
    /// Consumers attached.
    pub consumers: u64,
}

/// A received message that must be settled with [`Delivery::ack`] or
/// [`Delivery::nack`] once its outcome is published.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// The broker delivered it before and it was not acknowledged.
    pub redelivered: bool,
    /// The publisher's message id (AMQP `message-id`), when it set one.
    pub message_id: Option<String>,
    /// The routing key it was published with (AMQP), when it had one.
    pub routing_key: Option<String>,
    acker: Acker,
    settled: bool,
}

enum Acker {
    None,
    Embedded(embedded::Acker),
    Amqp(lapin::Acker),
}

/// A failed ack or nack is logged and counted here, once for every
/// caller (`broker_settle_failures_total{op}`); the broker redelivers the
/// message (ack) or keeps it unacknowledged until the channel closes
/// (nack), so nothing is lost, but it must not pass unseen.
fn settled(op: &'static str, result: Result<(), BrokerError>) -> Result<(), BrokerError> {
    if let Err(e) = &result {
        tracing::warn!(op, error = %e, "settling a delivery failed; the broker will redeliver it");
        metrics::counter!("broker_settle_failures_total", "op" => op).increment(1);
    }
    result
}

impl Delivery {
    /// Acknowledge: the message's outcome is safely published. A failure
    /// is logged and counted.
    pub async fn ack(mut self) -> Result<(), BrokerError> {
        self.settled = true;
        let result = match &self.acker {
            Acker::None => Ok(()),
            Acker::Embedded(a) => {
                a.settle();
                Ok(())
            }
            Acker::Amqp(a) => a
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map(drop)
                .map_err(|e| BrokerError::Unavailable(e.to_string())),
        };
        settled("ack", result)
    }

    /// Negative acknowledgement; `requeue` puts it back for another
    /// consumer. A failure is logged and counted.
    pub async fn nack(mut self, requeue: bool) -> Result<(), BrokerError> {
        self.settled = true;
        let result = match &self.acker {
            Acker::None => Ok(()),
            Acker::Embedded(a) => {
                a.settle();
                if requeue {
                    a.requeue(std::mem::take(&mut self.message));
                }
                Ok(())
            }
            Acker::Amqp(a) => a
                .nack(lapin::options::BasicNackOptions {
                    requeue,
                    multiple: false,
                })
                .await
                .map(drop)
                .map_err(|e| BrokerError::Unavailable(e.to_string())),
        };
        settled("nack", result)
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Never lose a message because a handler forgot it or panicked: the
        // embedded broker requeues it, as RabbitMQ does when the channel closes.
        if let Acker::Embedded(a) = &self.acker {
            a.settle();
            a.requeue(std::mem::take(&mut self.message));
        } else if let Acker::Amqp(_) = &self.acker {
            tracing::warn!(
                "AMQP delivery dropped unsettled; RabbitMQ redelivers it when the channel closes"
            );
        }
    }
}

/// A stream of deliveries from one queue. Dropping it stops consuming.
pub struct Subscription {
    inner: SubInner,
}

enum SubInner {
    Embedded(embedded::Receiver),
    Topic(async_channel::Receiver<Message>),
    Amqp(Box<amqp::AmqpSubscription>),
}

impl Subscription {
    /// The next delivery; `None` once the subscription is closed.
    pub async fn next(&mut self) -> Option<Delivery> {
        match &mut self.inner {
            SubInner::Embedded(r) => r.next().await,
            SubInner::Topic(r) => r.recv().await.ok().map(|message| Delivery {
                message,
                redelivered: false,
                message_id: None,
                routing_key: None,
                acker: Acker::None,
                settled: false,
            }),
            SubInner::Amqp(s) => s.next().await,
        }
    }

    /// Stop receiving new deliveries but keep the subscription open, so
    /// deliveries already received can still be acknowledged: after this,
    /// [`Subscription::next`] yields what the broker had already sent
    /// (AMQP prefetch) and then `None`. How a Runner scales in without
    /// any message being redelivered.
    pub async fn cancel(&mut self) {
        match &mut self.inner {
            SubInner::Embedded(r) => r.cancel(),
            SubInner::Topic(r) => {
                r.close();
            }
            SubInner::Amqp(s) => s.cancel().await,
        }
    }
}

/// The broker seam. Adapters: [`EmbeddedBroker`], [`AmqpBroker`].
pub trait Broker: Clone + Send + Sync + 'static {
    /// Create the queue if it does not exist (idempotent). Adapters that can
    /// lose queues (a broker restart) declare them again on reconnect.
    fn declare(
        &self,
        queue: &str,
        kind: QueueKind,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Publish to a queue and wait until the broker has taken responsibility
    /// for the message (publisher confirm, or room in an embedded queue).
    fn publish(
        &self,
        queue: &str,
        message: Message,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Publish to `queue` after `delay_ms` (0: now), the broker holding
    /// the message meanwhile; waits until it has taken responsibility, as
    /// [`Broker::publish`]. RabbitMQ keeps it durably in a delay queue
    /// ([`names::delay_queue`]) whose TTL dead-letters it into `queue`, so
    /// no crash of ours loses it; the embedded broker keeps it in memory
    /// (what must survive a restart of `up` is re-enqueued from the state
    /// store). `ttl_ms` counts from when it reaches `queue`.
    fn publish_delayed(
        &self,
        queue: &str,
        message: Message,
        delay_ms: u64,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Consume a queue (declaring it as `kind` first: when the broker is
    /// reachable the queue exists once this returns, so what is published
    /// to it from then on is kept for this subscription).
    fn consume(
        &self,
        queue: &str,
        kind: QueueKind,
        options: ConsumeOptions,
    ) -> impl Future<Output = Result<Subscription, BrokerError>> + Send;

    /// Bind `queue` (a durable work queue, declared if missing) to
    /// `exchange`, which another application owns and must have
    /// declared, with `binding_key`: what is published there with a
    /// matching routing key reaches `queue` from then on (an exchange
    /// trigger's). RabbitMQ keeps the binding across its restarts. The
    /// embedded broker has no exchanges: [`BrokerError::Protocol`].
    fn bind(
        &self,
        queue: &str,
        exchange: &str,
        binding_key: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// How deep a queue is.
    fn depth(&self, queue: &str) -> impl Future<Output = Result<QueueDepth, BrokerError>> + Send;

    /// Publish to every current subscriber of a broadcast topic (none is
    /// fine; later subscribers do not see it).
    fn broadcast(
        &self,
        topic: &str,
        message: Message,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Subscribe to a broadcast topic; deliveries need no acknowledgement.
    fn subscribe(
        &self,
        topic: &str,
    ) -> impl Future<Output = Result<Subscription, BrokerError>> + Send;

    /// Whether the broker is reachable now, as a watch: `false` while
    /// reconnecting. Waiting requesters use it to answer 503 at once.
    fn connected(&self) -> watch::Receiver<bool>;
}

/// The adapter chosen from configuration.
#[derive(Clone)]
pub enum AnyBroker {
    /// In-process.
    Embedded(EmbeddedBroker),
    /// RabbitMQ.
    Amqp(AmqpBroker),
}

impl AnyBroker {
    /// Pick an adapter from a URL: `embedded` (or `memory:`) for a fresh
    /// in-process broker, `amqp://...` for RabbitMQ.
    pub fn from_url(url: &str, embedded_capacity: usize) -> Result<Self, BrokerError> {
        if url == "embedded" || url.starts_with("memory:") {
            Ok(AnyBroker::Embedded(EmbeddedBroker::new(embedded_capacity)))
        } else if url.starts_with("amqp://") {
            amqp::QueueType::of_uri(url)?;
            Ok(AnyBroker::Amqp(AmqpBroker::connect(url)))
        } else if url.starts_with("amqps://") {
            Err(BrokerError::Protocol(
                "amqps:// (TLS) is not built into this release; use amqp:// (for example through a TLS tunnel)".into(),
            ))
        } else {
            Err(BrokerError::Protocol(format!(
                "unsupported broker URL {url:?}: use `embedded` or `amqp://user:pass@host:5672/%2f`"
            )))
        }
    }

    /// Move a delivery that cannot be processed to [`names::DEAD_LETTERS`],
    /// with the reason and source queue in headers, then acknowledge it. If
    /// the dead-letter publish fails the delivery is requeued, never dropped.
    pub async fn dead_letter(&self, source: &str, delivery: Delivery, reason: &str) {
        let mut message = delivery.message.clone();
        message
            .headers
            .push((headers::DEAD_REASON.into(), reason.into()));
        message
            .headers
            .push((headers::DEAD_SOURCE.into(), source.into()));
        message.ttl_ms = None;
        message.persistent = true;
        match self.publish(names::DEAD_LETTERS, message).await {
            Ok(()) => {
                tracing::warn!(queue = source, reason, "dead-lettered a message");
                let _ = delivery.ack().await;
            }
            Err(e) => {
                tracing::error!(queue = source, reason, error = %e, "cannot dead-letter; requeueing");
                let _ = delivery.nack(true).await;
            }
        }
    }

    /// A short name for logs and health checks.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyBroker::Embedded(_) => "embedded",
            AnyBroker::Amqp(_) => "amqp",
        }
    }
}

impl Broker for AnyBroker {
    async fn declare(&self, queue: &str, kind: QueueKind) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.declare(queue, kind).await,
            AnyBroker::Amqp(b) => b.declare(queue, kind).await,
        }
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.publish(queue, message).await,
            AnyBroker::Amqp(b) => b.publish(queue, message).await,
        }
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: Message,
        delay_ms: u64,
    ) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.publish_delayed(queue, message, delay_ms).await,
            AnyBroker::Amqp(b) => b.publish_delayed(queue, message, delay_ms).await,
        }
    }

    async fn consume(
        &self,
        queue: &str,
        kind: QueueKind,
        options: ConsumeOptions,
    ) -> Result<Subscription, BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.consume(queue, kind, options).await,
            AnyBroker::Amqp(b) => b.consume(queue, kind, options).await,
        }
    }

    async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        binding_key: &str,
    ) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.bind(queue, exchange, binding_key).await,
            AnyBroker::Amqp(b) => b.bind(queue, exchange, binding_key).await,
        }
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.depth(queue).await,
            AnyBroker::Amqp(b) => b.depth(queue).await,
        }
    }

    async fn broadcast(&self, topic: &str, message: Message) -> Result<(), BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.broadcast(topic, message).await,
            AnyBroker::Amqp(b) => b.broadcast(topic, message).await,
        }
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription, BrokerError> {
        match self {
            AnyBroker::Embedded(b) => b.subscribe(topic).await,
            AnyBroker::Amqp(b) => b.subscribe(topic).await,
        }
    }

    fn connected(&self) -> watch::Receiver<bool> {
        match self {
            AnyBroker::Embedded(b) => b.connected(),
            AnyBroker::Amqp(b) => b.connected(),
        }
    }
}

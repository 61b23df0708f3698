//! The AMQP adapter: RabbitMQ through `lapin`.
//!
//! One supervised connection per process. A supervisor task connects with
//! exponential backoff, opens a publisher channel in confirm mode, declares
//! every queue this process has declared so far, and publishes the
//! connection through a watch; when the connection fails it is withdrawn
//! (publishes fail fast with [`BrokerError::Unavailable`], so callers answer
//! 503 instead of hanging) and the supervisor reconnects. Each subscription
//! runs its own task with its own channel and prefetch, and resubscribes on
//! every new connection. Messages carry an AMQP `expiration` from their TTL
//! and are published `mandatory`, so a missing queue is reported, not lost.
//!
//! The URI may carry a `connection_name` query parameter
//! (`amqp://host/%2f?connection_name=tron-1`): RabbitMQ then shows that name
//! for the connection (the `connection_name` client property, in the
//! management UI and `rabbitmqctl list_connections client_properties`), so
//! an operator, or a test, can tell one process's connection from another.
//!
//! `amqps://` connects over TLS (rustls): the server's certificate is
//! checked against the system's roots, plus the CA certificates (PEM) of
//! the file a `cacertfile` query parameter names
//! (`amqps://host:5671/%2f?cacertfile=/etc/funcatron/ca.pem`, the parameter
//! RabbitMQ's own URI spec uses).
//!
//! A cluster is given as its nodes in one URI
//! (`amqp://u:p@node1:5672,node2:5672/vhost`, [`addresses`]): the
//! supervisor connects to one, and on a failure tries the next at once,
//! backing off only after a whole round failed. `queue_type=quorum` in the
//! query declares work and delay queues as quorum queues ([`QueueType`];
//! `docs/brokers.md`).

use funcatron_control::names;
use funcatron_control::sync::poisoned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    Acker, Broker, BrokerError, ConsumeOptions, Delivery, Message, QueueDepth, QueueKind, SubInner,
    Subscription,
};

/// RabbitMQ adapter. Cloning shares the connection.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where to connect, `amqp://user:pass@host:port/vhost`: one URI
    /// per node of a cluster, tried in turn.
    uris: Vec<String>,
    /// How work queues are declared.
    queue_type: QueueType,
    /// The live connection, `None` while (re)connecting.
    current: watch::Sender<Option<Arc<Live>>>,
    /// `current.is_some()`, for callers that only need up/down.
    up: watch::Sender<bool>,
    /// Queues declared through this handle, declared again after a reconnect
    /// (a broker that lost its state must get them back).
    declared: Mutex<HashMap<String, QueueKind>>,
    /// Stops the supervisor when the last handle is dropped.
    stop: CancellationToken,
}

struct Live {
    connection: Connection,
    /// Publishes go through one confirm-mode channel; lapin matches confirms
    /// to publishes, so concurrent publishers share it safely. Replaced
    /// when the broker nacks on it ([`Live::renew_publisher`]).
    publisher: Mutex<Channel>,
    /// Counts connections, so subscribers can tell a new one from the old.
    generation: u64,
    /// How work queues are declared.
    queue_type: QueueType,
    /// Delay queues declared on this connection, and when: declared again
    /// after [`REDECLARE_DELAY_QUEUE`], since publishing does not count as
    /// use against their `x-expires`.
    delays: Mutex<HashMap<String, std::time::Instant>>,
}

/// How long an idle delay queue outlives its delay (`x-expires`).
const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(3600);
/// How often a delay queue in use is declared again, well within
/// [`DELAY_QUEUE_IDLE`].
const REDECLARE_DELAY_QUEUE: Duration = Duration::from_secs(600);

impl Live {
    /// The publisher channel now.
    fn publisher(&self) -> Channel {
        self.publisher
            .lock()
            .unwrap_or_else(|e| poisoned("amqp.publisher", e))
            .clone()
    }

    /// Replace the publisher channel `failed` with a fresh confirm-mode
    /// channel on the same connection (once, whoever of the publishers that
    /// saw it fail asks first); the old one is closed.
    async fn renew_publisher(&self, failed: &Channel) {
        if self.publisher().id() != failed.id() {
            return;
        }
        let fresh = match self.connection.create_channel().await {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a new publisher channel");
                return;
            }
        };
        if let Err(e) = fresh.confirm_select(ConfirmSelectOptions::default()).await {
            tracing::warn!(error = %e, "cannot put the new publisher channel in confirm mode");
            return;
        }
        let replaced = {
            let mut p = self
                .publisher
                .lock()
                .unwrap_or_else(|e| poisoned("amqp.publisher", e));
            if p.id() == failed.id() {
                Ok(std::mem::replace(&mut *p, fresh))
            } else {
                Err(fresh)
            }
        };
        match replaced {
            Ok(old) => {
                tracing::warn!("RabbitMQ refused a publish; publishing through a new channel");
                metrics::counter!("broker_publisher_renewals_total").increment(1);
                let _ = old.close(200, "renewed".into()).await;
            }
            // Another publisher renewed it meanwhile.
            Err(unused) => {
                let _ = unused.close(200, "not needed".into()).await;
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// How work queues are declared (`queue_type` in the broker URL's query,
/// `--queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Classic queues: on one node (the default).
    #[default]
    Classic,
    /// Quorum queues: replicated across a RabbitMQ cluster's nodes (Raft);
    /// they survive the loss of a minority of nodes.
    Quorum,
}

impl QueueType {
    /// The type a broker URL asks for (`?queue_type=quorum`).
    pub fn of_uri(uri: &str) -> Result<QueueType, BrokerError> {
        match query_param(uri, "queue_type").as_deref() {
            None | Some("classic") => Ok(QueueType::Classic),
            Some("quorum") => Ok(QueueType::Quorum),
            Some(other) => Err(BrokerError::Protocol(format!(
                "queue_type={other}: use classic or quorum"
            ))),
        }
    }
}

/// The arguments of a queue of `kind` when work queues are `qt`.
fn declare_args(kind: QueueKind, qt: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if kind == QueueKind::Work && qt == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    args
}

/// One AMQP URI per host of `uri`, in order: `amqp://u:p@h1:5672,h2:5673/v?q`
/// is `amqp://u:p@h1:5672/v?q` then `amqp://u:p@h2:5673/v?q`; a URI with
/// one host is itself.
pub fn addresses(uri: &str) -> Vec<String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return vec![uri.to_owned()];
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (user, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let all: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{user}{h}{tail}"))
        .collect();
    if all.is_empty() {
        vec![uri.to_owned()]
    } else {
        all
    }
}

fn declare_options(kind: QueueKind) -> QueueDeclareOptions {
    match kind {
        QueueKind::Work => QueueDeclareOptions::durable(),
        QueueKind::Exclusive | QueueKind::Broadcast => {
            QueueDeclareOptions::exclusive().auto_delete()
        }
        QueueKind::External => QueueDeclareOptions::default().passive(),
    }
}

async fn declare_exchange(channel: &Channel, topic: &str) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            topic.into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::Protocol(format!("declaring exchange {topic}: {e}")))
}

async fn declare_on(
    channel: &Channel,
    queue: &str,
    kind: QueueKind,
    qt: QueueType,
) -> Result<(), BrokerError> {
    if kind == QueueKind::Broadcast {
        return declare_exchange(channel, queue).await;
    }
    channel
        .queue_declare(queue.into(), declare_options(kind), declare_args(kind, qt))
        .await
        .map(drop)
        .map_err(|e| BrokerError::Protocol(format!("declaring {queue}: {e}")))
}

impl AmqpBroker {
    /// Start connecting to `uri` in the background; returns at once. Until
    /// the first connection is up, publishes fail with `Unavailable`.
    pub fn connect(uri: &str) -> Self {
        let (current, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            uris: addresses(uri),
            queue_type: QueueType::of_uri(uri).unwrap_or_default(),
            current,
            up: watch::Sender::new(false),
            declared: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(supervise(Arc::downgrade(&inner), inner.stop.clone()));
        AmqpBroker { inner }
    }

    /// Wait until connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut up = self.inner.up.subscribe();
        let ok = tokio::time::timeout(timeout, up.wait_for(|u| *u))
            .await
            .is_ok();
        ok
    }

    /// Declare `queue` again on every new connection.
    fn remember(&self, queue: &str, kind: QueueKind) {
        self.inner
            .declared
            .lock()
            .unwrap_or_else(|e| poisoned("amqp.declared", e))
            .insert(queue.to_owned(), kind);
    }

    fn live(&self) -> Result<Arc<Live>, BrokerError> {
        self.inner
            .current
            .borrow()
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("not connected to RabbitMQ".into()))
    }
}

/// The supervisor: connect, serve, notice the loss, back off, repeat.
async fn supervise(inner: std::sync::Weak<Inner>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    let mut generation = 0u64;
    // Which node to try next: the one after a node that failed.
    let mut turn = 0usize;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        // The next node of the cluster after one that failed.
        let nodes = strong.uris.len();
        let uri = strong.uris[turn % nodes].clone();
        drop(strong);
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = establish(&uri) => r,
        };
        match attempt {
            Ok((connection, publisher)) => {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                let queues: Vec<(String, QueueKind)> = strong
                    .declared
                    .lock()
                    .unwrap_or_else(|e| poisoned("amqp.declared", e))
                    .iter()
                    .map(|(q, k)| (q.clone(), *k))
                    .collect();
                let mut redeclared = true;
                // Another application's queue is checked by its consumer
                // (a passive declare that fails would close the publisher).
                for (q, k) in queues.iter().filter(|(_, k)| *k != QueueKind::External) {
                    if let Err(e) = declare_on(&publisher, q, *k, strong.queue_type).await {
                        tracing::warn!(queue = %q, error = %e, "redeclare after reconnect failed");
                        redeclared = false;
                    }
                }
                if !redeclared {
                    let _ = connection.close(0, "redeclare failed".into()).await;
                    continue;
                }
                generation += 1;
                let events = connection.events_listener();
                let live = Arc::new(Live {
                    connection,
                    publisher: Mutex::new(publisher),
                    generation,
                    queue_type: strong.queue_type,
                    delays: Mutex::new(HashMap::new()),
                });
                strong.current.send_replace(Some(Arc::clone(&live)));
                strong.up.send_replace(true);
                // A queue recorded after the snapshot above, by a `declare`
                // that found no live connection yet, is declared now (later
                // ones find the connection live themselves).
                let later: Vec<(String, QueueKind)> = strong
                    .declared
                    .lock()
                    .unwrap_or_else(|e| poisoned("amqp.declared", e))
                    .iter()
                    .filter(|(q, _)| !queues.iter().any(|(s, _)| s == *q))
                    .map(|(q, k)| (q.clone(), *k))
                    .collect();
                drop(strong);
                for (q, k) in later.into_iter().filter(|(_, k)| *k != QueueKind::External) {
                    if let Err(e) = declare_on(&live.publisher(), &q, k, live.queue_type).await {
                        tracing::warn!(queue = %q, error = %e, "declare after connecting failed");
                    }
                }
                tracing::info!(generation, node = turn % nodes, "connected to RabbitMQ");
                backoff = Duration::from_millis(100);
                wait_for_loss(&live, events, &stop).await;
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                strong.current.send_replace(None);
                strong.up.send_replace(false);
                tracing::warn!(generation, "lost the RabbitMQ connection; reconnecting");
                let _ = live.connection.close(0, "reconnecting".into()).await;
            }
            Err(e) => {
                turn += 1;
                if !turn.is_multiple_of(nodes) {
                    // Another node of the cluster may be up: try it now.
                    tracing::warn!(error = %e, node = turn % nodes, "cannot connect to a RabbitMQ node; trying the next");
                    continue;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to RabbitMQ");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The `connection_name` query parameter of an AMQP URI, percent-decoded
/// (lapin ignores query parameters it does not know).
fn connection_name(uri: &str) -> Option<String> {
    query_param(uri, "connection_name")
}

/// The TLS settings of an AMQP URI: the CA certificates of its
/// `cacertfile` parameter, beside the system's roots.
fn tls_config(uri: &str) -> Result<OwnedTLSConfig, lapin::Error> {
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = query_param(uri, "cacertfile") {
        let pem = std::fs::read_to_string(&path).map_err(|e| {
            lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
                e.kind(),
                format!("cacertfile {path}: {e}"),
            ))))
        })?;
        tls.cert_chain = Some(pem);
    }
    Ok(tls)
}

/// One query parameter of a URI, percent-decoded.
fn query_param(uri: &str, name: &str) -> Option<String> {
    let (_, query) = uri.split_once('?')?;
    let raw = query.split('&').find_map(|pair| {
        pair.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })?;
    let raw = raw.replace('+', " ");
    Some(
        percent_encoding::percent_decode_str(&raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

async fn establish(uri: &str) -> Result<(Connection, Channel), lapin::Error> {
    let mut properties = ConnectionProperties::default();
    if let Some(name) = connection_name(uri) {
        properties = properties.with_connection_name(LongString::from(name));
    }
    let connection = lapin::DefaultConnectionBuilder::new()?
        .with_uri_str(uri.to_owned())
        .with_properties(properties)
        .with_tls_config(tls_config(uri)?)
        .connect()
        .await?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, publisher))
}

/// Return when the connection or its publisher channel is no longer usable.
async fn wait_for_loss(
    live: &Live,
    mut events: impl futures::Stream<Item = lapin::Event> + Unpin,
    stop: &CancellationToken,
) {
    // Errors arrive as events; the status poll catches anything that does not
    // (a closed publisher channel, for one).
    let usable = || live.connection.status().connected() && live.publisher().status().connected();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = events.next() => match ev {
                // lapin reports channel-level errors here too (the broker
                // closing the throwaway channel of a `depth` of a missing
                // queue, a subscription's failed declare): those leave the
                // connection up and must not tear it down.
                Some(lapin::Event::Error(e)) if usable() => {
                    tracing::debug!(error = %e, "RabbitMQ channel error; the connection is fine");
                }
                Some(lapin::Event::Error(e)) => {
                    tracing::warn!(error = %e, "RabbitMQ connection error");
                    return;
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {
                if !usable() {
                    return;
                }
            }
        }
    }
}

fn to_field_table(headers: &[(String, String)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    t
}

fn from_field_table(table: Option<&FieldTable>) -> Vec<(String, String)> {
    let Some(table) = table else {
        return Vec::new();
    };
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| {
            let v = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => return None,
            };
            Some((k.as_str().to_owned(), v))
        })
        .collect()
}

/// Declare the queue messages wait in for `delay_ms` before RabbitMQ
/// dead-letters them into `target` (once per connection and
/// [`REDECLARE_DELAY_QUEUE`]).
async fn declare_delay(live: &Live, target: &str, delay_ms: u64) -> Result<String, BrokerError> {
    let name = names::delay_queue(target, delay_ms);
    let fresh = live
        .delays
        .lock()
        .unwrap_or_else(|e| poisoned("amqp.delays", e))
        .get(&name)
        .is_some_and(|at| at.elapsed() < REDECLARE_DELAY_QUEUE);
    if fresh {
        return Ok(name);
    }
    let ms = i64::try_from(delay_ms).unwrap_or(i64::MAX);
    let idle = i64::try_from(DELAY_QUEUE_IDLE.as_millis()).unwrap_or(i64::MAX);
    let mut args = declare_args(QueueKind::Work, live.queue_type);
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(target)),
    );
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(ms.saturating_add(idle)),
    );
    if live.queue_type == QueueType::Quorum {
        // Replicated too (above), and dead-lettered into the target at
        // least once (a quorum queue's default is at most once).
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
    }
    live.publisher()
        .queue_declare(name.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(|e| BrokerError::Protocol(format!("declaring {name}: {e}")))?;
    live.delays
        .lock()
        .unwrap_or_else(|e| poisoned("amqp.delays", e))
        .insert(name.clone(), std::time::Instant::now());
    Ok(name)
}

impl Broker for AmqpBroker {
    async fn declare(&self, queue: &str, kind: QueueKind) -> Result<(), BrokerError> {
        self.remember(queue, kind);
        let live = self.live()?;
        declare_on(&live.publisher(), queue, kind, live.queue_type).await
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), BrokerError> {
        let live = self.live()?;
        let mut props =
            BasicProperties::default().with_delivery_mode(if message.persistent { 2 } else { 1 });
        if !message.headers.is_empty() {
            props = props.with_headers(to_field_table(&message.headers));
        }
        if let Some(ttl) = message.ttl_ms {
            props = props.with_expiration(ShortString::from(ttl.max(1).to_string()));
        }
        let publisher = live.publisher();
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &message.payload,
                props,
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        if confirm.is_nack() {
            // A quorum queue's leader that moved while this channel knew
            // the old one (a node of the cluster died) leaves the channel
            // refusing every publish to it: the next publishes go through
            // a fresh channel, which finds the new leader.
            live.renew_publisher(&publisher).await;
            return Err(BrokerError::Nacked(queue.to_owned()));
        }
        if confirm.take_message().is_some() {
            return Err(BrokerError::NoRoute(queue.to_owned()));
        }
        Ok(())
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        mut message: Message,
        delay_ms: u64,
    ) -> Result<(), BrokerError> {
        if delay_ms == 0 {
            return self.publish(queue, message).await;
        }
        let live = self.live()?;
        let delay = declare_delay(&live, queue, delay_ms).await?;
        // RabbitMQ drops a message's own expiration when it dead-letters
        // it, so a TTL would not carry over into `queue`: none is set.
        message.ttl_ms = None;
        self.publish(&delay, message).await
    }

    async fn consume(
        &self,
        queue: &str,
        kind: QueueKind,
        options: ConsumeOptions,
    ) -> Result<Subscription, BrokerError> {
        self.remember(queue, kind);
        // Declared now, while connected, so the queue exists once this
        // returns: a reply published to it at once (a Runner's answer to a
        // flow's parallel branch) would otherwise find no queue and be
        // dropped as unroutable. The consumer itself starts on the first
        // `next()`, declaring again on whatever connection it gets.
        // On a channel of its own: a refused declare closes its channel.
        if let Ok(live) = self.live() {
            let declared = match live.connection.create_channel().await {
                Ok(ch) => {
                    let d = declare_on(&ch, queue, kind, live.queue_type).await;
                    let _ = ch.close(200, "declared".into()).await;
                    d
                }
                Err(e) => Err(unavailable(e)),
            };
            if let Err(e) = declared {
                tracing::debug!(queue, error = %e, "declared when the consumer starts");
            }
        }
        Ok(Subscription {
            inner: SubInner::Amqp(Box::new(AmqpSubscription {
                current: self.inner.current.subscribe(),
                queue: queue.to_owned(),
                kind,
                options,
                active: None,
                cancelled: false,
            })),
        })
    }

    async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        binding_key: &str,
    ) -> Result<(), BrokerError> {
        self.remember(queue, QueueKind::Work);
        let live = self.live()?;
        // On a channel of its own: a missing exchange closes it.
        let ch = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let bound = async {
            declare_on(&ch, queue, QueueKind::Work, live.queue_type).await?;
            ch.queue_bind(
                queue.into(),
                exchange.into(),
                binding_key.into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                BrokerError::Protocol(format!("binding {queue} to exchange {exchange}: {e}"))
            })
        }
        .await;
        let _ = ch.close(200, "bound".into()).await;
        bound
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let live = self.live()?;
        // A passive declare on a throwaway channel: if the queue is missing
        // the broker closes that channel, not the shared publisher.
        let ch = live
            .connection
            .create_channel()
            .await
            .map_err(unavailable)?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .map_err(|_| BrokerError::NoRoute(queue.to_owned()));
        let _ = ch.close(200, "depth".into()).await;
        let q = q?;
        Ok(QueueDepth {
            ready: u64::from(q.message_count()),
            unacked: None,
            consumers: u64::from(q.consumer_count()),
        })
    }

    async fn broadcast(&self, topic: &str, message: Message) -> Result<(), BrokerError> {
        let live = self.live()?;
        declare_exchange(&live.publisher(), topic).await?;
        let mut props = BasicProperties::default();
        if !message.headers.is_empty() {
            props = props.with_headers(to_field_table(&message.headers));
        }
        let confirm = live
            .publisher()
            .basic_publish(
                topic.into(),
                "".into(),
                BasicPublishOptions::default(),
                &message.payload,
                props,
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        if confirm.is_nack() {
            return Err(BrokerError::Nacked(topic.to_owned()));
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription, BrokerError> {
        Ok(Subscription {
            inner: SubInner::Amqp(Box::new(AmqpSubscription {
                current: self.inner.current.subscribe(),
                queue: topic.to_owned(),
                kind: QueueKind::Broadcast,
                options: ConsumeOptions {
                    prefetch: 0,
                    auto_ack: true,
                },
                active: None,
                cancelled: false,
            })),
        })
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.inner.up.subscribe()
    }
}

/// A subscription that follows the supervised connection: it consumes on
/// the live connection and, when that connection fails or is replaced,
/// subscribes again on the next one. Deliveries are read straight from
/// lapin's consumer, with no forwarding task in between.
pub(crate) struct AmqpSubscription {
    current: watch::Receiver<Option<Arc<Live>>>,
    queue: String,
    kind: QueueKind,
    options: ConsumeOptions,
    /// The channel and consumer on the current connection, with its generation.
    active: Option<(Channel, lapin::Consumer, u64)>,
    /// Cancelled: hand out what was already delivered, then end; never
    /// subscribe again.
    cancelled: bool,
}

impl AmqpSubscription {
    /// Ask RabbitMQ to stop delivering; the channel stays open so the
    /// deliveries already received can be acknowledged on it.
    pub(crate) async fn cancel(&mut self) {
        self.cancelled = true;
        if let Some((channel, consumer, _)) = &self.active {
            if let Err(e) = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
            {
                tracing::warn!(queue = %self.queue, error = %e, "cancelling the consumer failed");
            }
        }
    }

    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.cancelled {
                // After basic.cancel the consumer yields what it had
                // buffered, then ends; a lost connection ends it too.
                let (_, consumer, _) = self.active.as_mut()?;
                return match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
                    Ok(Some(Ok(d))) => Some(self.delivery(d)),
                    _ => None,
                };
            }
            let Some((_, consumer, generation)) = &mut self.active else {
                let live = loop {
                    let cur = self.current.borrow_and_update().clone();
                    match cur {
                        Some(l) if l.connection.status().connected() => break l,
                        _ => self.current.changed().await.ok()?,
                    }
                };
                match open_consumer(&live, &self.queue, self.kind, self.options).await {
                    Ok((ch, c)) => {
                        tracing::debug!(queue = %self.queue, "consuming");
                        self.active = Some((ch, c, live.generation));
                    }
                    Err(e) => {
                        tracing::warn!(queue = %self.queue, error = %e, "cannot consume; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            r = self.current.changed() => r.ok()?,
                        }
                    }
                }
                continue;
            };
            let generation = *generation;
            let next = tokio::select! {
                d = consumer.next() => d,
                // A new connection (or none) while we wait: the old consumer is dead.
                r = self.current.changed() => {
                    r.ok()?;
                    let same = self.current.borrow().as_ref().is_some_and(|l| l.generation == generation);
                    if !same {
                        self.active = None;
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(d)) => return Some(self.delivery(d)),
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %e, "consumer failed; resubscribing");
                    self.active = None;
                }
                None => self.active = None,
            }
        }
    }
}

impl AmqpSubscription {
    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        Delivery {
            message: Message {
                headers: from_field_table(d.properties.headers().as_ref()),
                payload: Bytes::from(d.data),
                ttl_ms: None,
                persistent: d.properties.delivery_mode() == &Some(2),
            },
            redelivered: d.redelivered,
            message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
            routing_key: Some(d.routing_key.to_string()).filter(|k| !k.is_empty()),
            acker: if self.options.auto_ack {
                Acker::None
            } else {
                Acker::Amqp(d.acker)
            },
            settled: false,
        }
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        // Close the channel so RabbitMQ requeues what this consumer held
        // and stops delivering to it.
        if let Some((channel, consumer, _)) = self.active.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                        .await;
                    let _ = channel.close(200, "unsubscribed".into()).await;
                });
            }
        }
    }
}

async fn open_consumer(
    live: &Live,
    queue: &str,
    kind: QueueKind,
    options: ConsumeOptions,
) -> Result<(Channel, lapin::Consumer), BrokerError> {
    let channel = live
        .connection
        .create_channel()
        .await
        .map_err(unavailable)?;
    declare_on(&channel, queue, kind, live.queue_type).await?;
    // A broadcast topic: consume a private queue bound to its exchange.
    let bound;
    let queue = if kind == QueueKind::Broadcast {
        let q = channel
            .queue_declare("".into(), declare_options(kind), FieldTable::default())
            .await
            .map_err(|e| BrokerError::Protocol(format!("declaring a queue for {queue}: {e}")))?;
        bound = q.name().to_string();
        channel
            .queue_bind(
                bound.as_str().into(),
                queue.into(),
                "".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| BrokerError::Protocol(format!("binding to {queue}: {e}")))?;
        bound.as_str()
    } else {
        queue
    };
    if !options.auto_ack {
        channel
            .basic_qos(options.prefetch, BasicQosOptions::default())
            .await
            .map_err(unavailable)?;
    }
    let consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: options.auto_ack,
                exclusive: kind == QueueKind::Exclusive,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    Ok((channel, consumer))
}

#[cfg(test)]
mod tests {
    use super::connection_name;

    #[test]
    fn a_cluster_uri_is_one_uri_per_node() {
        use super::addresses;
        assert_eq!(addresses("amqp://h:5672/%2f"), ["amqp://h:5672/%2f"]);
        assert_eq!(
            addresses("amqp://u:p@a:5672,b:5673/v?heartbeat=10"),
            [
                "amqp://u:p@a:5672/v?heartbeat=10",
                "amqp://u:p@b:5673/v?heartbeat=10"
            ]
        );
        assert_eq!(addresses("amqp://a,b"), ["amqp://a", "amqp://b"]);
        assert_eq!(
            addresses("amqp://u:p%40x@a,b/v"),
            ["amqp://u:p%40x@a/v", "amqp://u:p%40x@b/v"]
        );
        assert_eq!(addresses("nonsense"), ["nonsense"]);
    }

    #[test]
    fn the_queue_type_comes_from_the_uri_query() {
        use super::QueueType;
        assert_eq!(
            QueueType::of_uri("amqp://h/%2f").unwrap(),
            QueueType::Classic
        );
        assert_eq!(
            QueueType::of_uri("amqp://h/%2f?queue_type=quorum").unwrap(),
            QueueType::Quorum
        );
        assert!(QueueType::of_uri("amqp://h/%2f?queue_type=stream").is_err());
    }

    #[test]
    fn connection_name_comes_from_the_uri_query() {
        assert_eq!(connection_name("amqp://h:5672/%2f"), None);
        assert_eq!(connection_name("amqp://h/%2f?heartbeat=10"), None);
        assert_eq!(
            connection_name("amqp://h/%2f?heartbeat=10&connection_name=tron%2D1+a").as_deref(),
            Some("tron-1 a")
        );
        assert_eq!(
            connection_name("amqp://h/%2f?connection_name=x%zz").as_deref(),
            Some("x%zz")
        );
    }
}

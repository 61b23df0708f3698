//! The embedded broker: in-process bounded queues, so `funcatron up` runs the
//! whole path in one process with no RabbitMQ.
//!
//! Each queue is an MPMC channel bounded by a semaphore of free places:
//! publishers wait for room (backpressure) and competing consumers share
//! the work. The channel grows in small blocks as messages arrive, so an
//! idle queue costs a few hundred bytes whatever its bound (a channel
//! allocated at its bound cost about 1 MB per queue, two queues per Func). Unacknowledged
//! deliveries are counted for [`QueueDepth::unacked`]; a nack with requeue,
//! or a delivery dropped unsettled, goes back on the queue (at its tail)
//! and is delivered again with [`Delivery::redelivered`] set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::{
    Acker as DeliveryAcker, Broker, BrokerError, ConsumeOptions, Delivery, Message, QueueDepth,
    QueueKind, SubInner, Subscription,
};

/// In-process broker. Cloning shares the same queues.
#[derive(Clone)]
pub struct EmbeddedBroker {
    queues: Arc<DashMap<String, Arc<Queue>>>,
    /// Bound of every queue; a full queue makes publishers wait.
    capacity: usize,
    connected: watch::Sender<bool>,
    /// Broadcast topics: one channel per subscriber.
    topics: Arc<DashMap<String, Vec<async_channel::Sender<Message>>>>,
}

struct Queue {
    name: String,
    /// Free places: a publisher takes one, a consumer taking a message
    /// gives it back. Closed when the queue is deleted.
    room: tokio::sync::Semaphore,
    tx: async_channel::Sender<Queued>,
    rx: async_channel::Receiver<Queued>,
    unacked: AtomicU64,
    consumers: AtomicU64,
}

impl Queue {
    /// Wait for a free place, then queue `queued`; `Err` once the queue
    /// is deleted.
    async fn put(&self, queued: Queued) -> Result<(), ()> {
        self.room.acquire().await.map_err(|_| ())?.forget();
        self.tx.try_send(queued).map_err(|_| ())
    }

    /// Queue `queued` now if there is a free place; else hand it back.
    fn try_put(&self, queued: Queued) -> Result<(), Option<Queued>> {
        match self.room.try_acquire() {
            Ok(p) => {
                p.forget();
                self.tx.try_send(queued).map_err(|_| None)
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(Some(queued)),
            Err(tokio::sync::TryAcquireError::Closed) => Err(None),
        }
    }
}

/// A message waiting in an embedded queue.
struct Queued {
    message: Message,
    /// It was delivered before and went back unacknowledged.
    redelivered: bool,
}

impl EmbeddedBroker {
    /// A broker whose queues each hold at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        EmbeddedBroker {
            queues: Arc::new(DashMap::new()),
            capacity: capacity.max(1),
            connected: watch::Sender::new(true),
            topics: Arc::new(DashMap::new()),
        }
    }

    fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.get(name).map(|q| Arc::clone(q.value()))
    }

    fn get_or_create(&self, name: &str) -> Arc<Queue> {
        if let Some(q) = self.queue(name) {
            return q;
        }
        let entry = self.queues.entry(name.to_owned()).or_insert_with(|| {
            let (tx, rx) = async_channel::unbounded();
            Arc::new(Queue {
                name: name.to_owned(),
                room: tokio::sync::Semaphore::new(
                    self.capacity.min(tokio::sync::Semaphore::MAX_PERMITS),
                ),
                tx,
                rx,
                unacked: AtomicU64::new(0),
                consumers: AtomicU64::new(0),
            })
        });
        Arc::clone(entry.value())
    }

    /// Remove a queue; its pending messages are dropped.
    pub fn delete(&self, name: &str) {
        if let Some((_, q)) = self.queues.remove(name) {
            q.room.close();
            q.rx.close();
        }
    }
}

impl Broker for EmbeddedBroker {
    async fn broadcast(&self, topic: &str, message: Message) -> Result<(), BrokerError> {
        if let Some(mut subs) = self.topics.get_mut(topic) {
            // Gone subscribers are dropped here.
            subs.retain(|tx| tx.try_send(message.clone()).is_ok());
        }
        Ok(())
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription, BrokerError> {
        let (tx, rx) = async_channel::unbounded();
        self.topics.entry(topic.to_owned()).or_default().push(tx);
        Ok(Subscription {
            inner: SubInner::Topic(rx),
        })
    }

    async fn declare(&self, queue: &str, _kind: QueueKind) -> Result<(), BrokerError> {
        self.get_or_create(queue);
        Ok(())
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), BrokerError> {
        let q = self
            .queue(queue)
            .ok_or_else(|| BrokerError::NoRoute(queue.to_owned()))?;
        q.put(Queued {
            message,
            redelivered: false,
        })
        .await
        .map_err(|()| BrokerError::NoRoute(queue.to_owned()))
    }

    async fn publish_delayed(
        &self,
        queue: &str,
        message: Message,
        delay_ms: u64,
    ) -> Result<(), BrokerError> {
        if delay_ms == 0 {
            return self.publish(queue, message).await;
        }
        // Refuse a queue that does not exist now, as `publish` would.
        self.queue(queue)
            .ok_or_else(|| BrokerError::NoRoute(queue.to_owned()))?;
        let broker = self.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
            if let Err(e) = broker.publish(&queue, message).await {
                tracing::warn!(queue, error = %e, "a delayed message could not be delivered");
            }
        });
        Ok(())
    }

    async fn consume(
        &self,
        queue: &str,
        _kind: QueueKind,
        options: ConsumeOptions,
    ) -> Result<Subscription, BrokerError> {
        let q = self.get_or_create(queue);
        q.consumers.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            inner: SubInner::Embedded(Receiver {
                queue: q,
                auto_ack: options.auto_ack,
                cancelled: false,
            }),
        })
    }

    async fn bind(&self, _queue: &str, exchange: &str, _key: &str) -> Result<(), BrokerError> {
        Err(BrokerError::Protocol(format!(
            "cannot bind to exchange {exchange:?}: the embedded broker has no exchanges (use RabbitMQ, --broker amqp://...)"
        )))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let q = self
            .queue(queue)
            .ok_or_else(|| BrokerError::NoRoute(queue.to_owned()))?;
        Ok(QueueDepth {
            ready: q.rx.len() as u64,
            unacked: Some(q.unacked.load(Ordering::Relaxed)),
            consumers: q.consumers.load(Ordering::Relaxed),
        })
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }
}

/// One consumer of an embedded queue.
pub(crate) struct Receiver {
    queue: Arc<Queue>,
    auto_ack: bool,
    cancelled: bool,
}

impl Receiver {
    /// Take no more messages (nothing is held on the consumer's side).
    pub(crate) fn cancel(&mut self) {
        self.cancelled = true;
    }

    pub(crate) async fn next(&mut self) -> Option<Delivery> {
        if self.cancelled {
            return None;
        }
        let Queued {
            message,
            redelivered,
        } = self.queue.rx.recv().await.ok()?;
        // Its place is free again.
        self.queue.room.add_permits(1);
        let acker = if self.auto_ack {
            DeliveryAcker::None
        } else {
            self.queue.unacked.fetch_add(1, Ordering::Relaxed);
            DeliveryAcker::Embedded(Acker {
                queue: Arc::clone(&self.queue),
            })
        };
        Some(Delivery {
            message,
            redelivered,
            message_id: None,
            routing_key: None,
            acker,
            settled: false,
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.queue.consumers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Settles one embedded delivery.
pub(crate) struct Acker {
    queue: Arc<Queue>,
}

impl Acker {
    pub(crate) fn settle(&self) {
        self.queue.unacked.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn requeue(&self, message: Message) {
        // Requeueing must not block (it runs in Drop); a full queue gets the
        // message back from a task as soon as there is room.
        let queued = Queued {
            message,
            redelivered: true,
        };
        match self.queue.try_put(queued) {
            Ok(()) => {}
            Err(Some(queued)) => {
                let queue = Arc::clone(&self.queue);
                tokio::spawn(async move {
                    let _ = queue.put(queued).await;
                });
            }
            Err(None) => {
                tracing::warn!(queue = %self.queue.name, "queue deleted; requeued message dropped");
            }
        }
    }
}

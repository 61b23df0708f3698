//! A Runner's private reply queues: where what it asks of others (a
//! flow's parallel branches, Funcs' store calls) is answered.
//!
//! Runner -> a request naming this queue and a key -> another component
//! -> **this queue** -> the waiter of that key. One exclusive queue per
//! use per Runner, consumed from the first wait on; an answer nobody
//! waits for any more (its waiter timed out) is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use funcatron_broker::{AnyBroker, Broker, BrokerError, ConsumeOptions, QueueKind};
use funcatron_control::names;
use tokio::sync::oneshot;

use crate::observe::poisoned;

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Bytes>>>>;

/// One reply queue and its waiters.
pub(crate) struct Replies {
    /// The queue's name, for the requests' reply-to.
    pub queue: String,
    waiting: Waiting,
}

impl Replies {
    /// Consume a fresh queue `funcatron.reply.<prefix>-<id>`; each message
    /// goes to the waiter of the key `key_of` reads from it.
    pub async fn start(
        broker: &AnyBroker,
        prefix: &str,
        key_of: fn(&[u8]) -> Option<String>,
    ) -> Result<Replies, BrokerError> {
        let queue = names::reply_queue(&format!(
            "{prefix}-{}",
            &funcatron_envelope::new_request_id()[..16]
        ));
        let mut sub = broker
            .consume(
                &queue,
                QueueKind::Exclusive,
                ConsumeOptions {
                    prefetch: 1000,
                    auto_ack: true,
                },
            )
            .await?;
        let waiting: Waiting = Arc::default();
        let w = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(d) = sub.next().await {
                let waiter = key_of(&d.message.payload).and_then(|k| {
                    w.lock()
                        .unwrap_or_else(|e| poisoned("replies.waiting", e))
                        .remove(&k)
                });
                if let Some(tx) = waiter {
                    let _ = tx.send(d.message.payload.clone());
                }
                let _ = d.ack().await;
            }
        });
        Ok(Replies { queue, waiting })
    }

    /// Wait for the answer of `key` (before sending its request).
    pub fn wait(&self, key: &str) -> oneshot::Receiver<Bytes> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| poisoned("replies.waiting", e))
            .insert(key.to_owned(), tx);
        rx
    }

    /// Stop waiting for `key` (timed out, or its request was not sent).
    pub fn forget(&self, key: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| poisoned("replies.waiting", e))
            .remove(key);
    }
}

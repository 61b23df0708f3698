//! The document store for Funcs, through their Runner.
//!
//! Func (Lua `store.*`; Python, Node.js and Java helpers, over the worker
//! protocol's `store` frame) -> **here: the operation checked against the
//! bundle's `store` declaration, named with the Func and version, sent on
//! `funcatron.store`** -> a Tron with a document store
//! (`funcatron_tron::store_rpc`, which checks the declaration again and
//! runs it) -> this Runner's reply queue -> the waiting Func.
//!
//! Funcs never hold database credentials: the Tron does. One reply queue
//! per Runner process, consumed from the first store call on; answers
//! find their call by key. A call waits at most until the Func's own
//! deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use funcatron_broker::{AnyBroker, Broker, BrokerError, Message};
use funcatron_bundle::store::StoreOp;
use funcatron_bundle::Bundle;
use funcatron_control::names;
use funcatron_documents::rpc::{refusal, Answer, Op, Request, REPLY_HEADER};
use serde_json::Value;
use tokio::sync::{oneshot, OnceCell};

use crate::replies::Replies;

/// Largest operation a Func may send (a 1 MiB document and its envelope).
pub const MAX_OP_BYTES: usize = 2 * 1024 * 1024;

/// The longest one store call waits, whatever the Func's deadline.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// This process's store calls: the broker and the reply queue.
pub struct StoreClient {
    broker: AnyBroker,
    replies: OnceCell<Replies>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient").finish_non_exhaustive()
    }
}

/// One Func version's access: who asks, and what its bundle declares.
#[derive(Debug, Clone)]
pub struct StoreScope {
    client: Arc<StoreClient>,
    /// Where [`StoreScope::call_blocking`] runs its call.
    runtime: Option<tokio::runtime::Handle>,
    func: String,
    version: String,
    access: BTreeMap<String, Vec<StoreOp>>,
}

impl StoreScope {
    /// The scope of `bundle`'s Func through `client`.
    pub fn of(client: &Arc<StoreClient>, bundle: &Bundle) -> Arc<StoreScope> {
        Arc::new(StoreScope {
            client: Arc::clone(client),
            runtime: tokio::runtime::Handle::try_current().ok(),
            func: bundle.name.clone(),
            version: bundle.version.clone(),
            access: bundle.store_access.clone(),
        })
    }

    /// Run the operation `op` (the Func's JSON: `{"op": "get",
    /// "collection": ..., ...}`, see `funcatron_documents::rpc::Op`),
    /// waiting at most until `deadline`: the answer's status and body.
    pub async fn call(&self, op: &[u8], deadline: Instant) -> (u16, Value) {
        if op.len() > MAX_OP_BYTES {
            return refusal(
                413,
                "too_large",
                format!("a store operation over {MAX_OP_BYTES} bytes"),
            );
        }
        let op: Op = match serde_json::from_slice(op) {
            Ok(op) => op,
            Err(e) => return refusal(400, "invalid", format!("store operation: {e}")),
        };
        let need = if op.writes() {
            StoreOp::Write
        } else {
            StoreOp::Read
        };
        let declared = self
            .access
            .get(op.collection())
            .is_some_and(|ops| ops.contains(&need));
        if !declared {
            let how = if need == StoreOp::Write {
                "write"
            } else {
                "read"
            };
            return refusal(
                403,
                "forbidden",
                format!(
                    "this Func may not {how} collection {:?}: declare `store: {{{}: [{how}]}}` in its bundle",
                    op.collection(),
                    op.collection()
                ),
            );
        }
        let deadline = deadline.min(Instant::now() + MAX_WAIT);
        match self
            .client
            .send(&self.func, &self.version, op, deadline)
            .await
        {
            Ok(a) => (a.status, a.body),
            Err(e) => e,
        }
    }

    /// [`StoreScope::call`] from a thread outside the runtime (a Lua
    /// thread), on the runtime the scope was made on.
    pub fn call_blocking(self: &Arc<Self>, op: Vec<u8>, deadline: Instant) -> (u16, Value) {
        let Some(runtime) = &self.runtime else {
            return refusal(
                500,
                "store_failed",
                "no runtime to reach the document store from",
            );
        };
        let (tx, rx) = oneshot::channel();
        let me = Arc::clone(self);
        runtime.spawn(async move {
            let _ = tx.send(me.call(&op, deadline).await);
        });
        rx.blocking_recv()
            .unwrap_or_else(|_| refusal(500, "store_failed", "the store call was dropped"))
    }
}

fn unavailable(e: &BrokerError) -> (u16, Value) {
    match e {
        BrokerError::NoRoute(_) => refusal(
            503,
            "store_unavailable",
            "no Tron serves the document store (a Tron needs --state-store)",
        ),
        e => refusal(
            503,
            "store_unavailable",
            format!("the document store cannot be reached: {e}"),
        ),
    }
}

impl StoreClient {
    /// A client on `broker`; nothing is consumed until the first call.
    pub fn new(broker: AnyBroker) -> Arc<StoreClient> {
        Arc::new(StoreClient {
            broker,
            replies: OnceCell::new(),
        })
    }

    async fn replies(&self) -> Result<&Replies, BrokerError> {
        fn key_of(payload: &[u8]) -> Option<String> {
            #[derive(serde::Deserialize)]
            struct Key {
                key: String,
            }
            serde_json::from_slice::<Key>(payload).ok().map(|k| k.key)
        }
        self.replies
            .get_or_try_init(|| Replies::start(&self.broker, "store", key_of))
            .await
    }

    async fn send(
        &self,
        func: &str,
        version: &str,
        op: Op,
        deadline: Instant,
    ) -> Result<Answer, (u16, Value)> {
        let replies = self.replies().await.map_err(|e| unavailable(&e))?;
        let key = funcatron_envelope::new_request_id();
        let left = deadline.saturating_duration_since(Instant::now());
        let request = Request {
            func: func.to_owned(),
            version: version.to_owned(),
            key: key.clone(),
            deadline_ms: funcatron_store::now_ms() + left.as_millis() as u64,
            op,
        };
        let payload = serde_json::to_vec(&request)
            .map_err(|e| refusal(500, "store_failed", e.to_string()))?;
        let rx = replies.wait(&key);
        let message = Message {
            payload: payload.into(),
            headers: vec![(REPLY_HEADER.to_owned(), replies.queue.clone())],
            ttl_ms: Some(left.as_millis().max(1) as u64),
            persistent: false,
        };
        if let Err(e) = self.broker.publish(names::STORE_REQUESTS, message).await {
            replies.forget(&key);
            return Err(unavailable(&e));
        }
        let got = tokio::time::timeout_at(deadline.into(), rx).await;
        replies.forget(&key);
        match got {
            Ok(Ok(bytes)) => serde_json::from_slice::<Answer>(&bytes).map_err(|e| {
                refusal(
                    502,
                    "store_failed",
                    format!("an undecodable store answer: {e}"),
                )
            }),
            _ => Err(refusal(
                504,
                "store_timeout",
                "the document store did not answer in time",
            )),
        }
    }
}

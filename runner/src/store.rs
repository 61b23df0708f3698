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
        let mut op: Op = match serde_json::from_slice(op) {
            Ok(op) => op,
            Err(e) => return refusal(400, "invalid", format!("store operation: {e}")),
        };
        // A create gets its id here, not at the Tron: a request the broker
        // delivers twice (a Tron died before answering) then finds its
        // document (412) instead of making a second one.
        if let Op::Create { id: id @ None, .. } = &mut op {
            *id = Some(funcatron_envelope::new_request_id());
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    //! The Runner's side against a stand-in Tron on the embedded broker:
    //! what reaches `funcatron.store`, and what comes back.

    use super::*;
    use funcatron_broker::{ConsumeOptions, EmbeddedBroker, QueueKind};

    /// A Tron stand-in: answers each request with the operation it got.
    async fn echo_tron(broker: &AnyBroker) {
        let mut sub = broker
            .consume(
                names::STORE_REQUESTS,
                QueueKind::Work,
                ConsumeOptions {
                    prefetch: 10,
                    auto_ack: false,
                },
            )
            .await
            .unwrap();
        let b = broker.clone();
        tokio::spawn(async move {
            while let Some(d) = sub.next().await {
                let reply = d.message.header(REPLY_HEADER).unwrap().to_owned();
                let r: Request = serde_json::from_slice(&d.message.payload).unwrap();
                let body = serde_json::json!({"func": r.func, "version": r.version, "op": r.op});
                let answer = Answer {
                    key: r.key,
                    status: 200,
                    body,
                };
                let m = Message::new(serde_json::to_vec(&answer).unwrap());
                b.publish(&reply, m).await.unwrap();
                d.ack().await.unwrap();
            }
        });
    }

    fn scope(broker: &AnyBroker, access: &[(&str, &[StoreOp])]) -> Arc<StoreScope> {
        Arc::new(StoreScope {
            client: StoreClient::new(broker.clone()),
            runtime: None,
            func: "f".into(),
            version: "v1".into(),
            access: access
                .iter()
                .map(|(c, ops)| ((*c).to_owned(), ops.to_vec()))
                .collect(),
        })
    }

    #[tokio::test]
    async fn calls_name_the_func_get_an_id_for_creates_and_stay_within_the_declaration() {
        let broker = AnyBroker::Embedded(EmbeddedBroker::new(100));
        echo_tron(&broker).await;
        let s = scope(
            &broker,
            &[
                ("notes", &[StoreOp::Read, StoreOp::Write]),
                ("audit", &[StoreOp::Read]),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);

        let (status, body) = s
            .call(
                br#"{"op":"create","collection":"notes","doc":{"a":1}}"#,
                deadline,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["func"].as_str(), body["version"].as_str()),
            (Some("f"), Some("v1"))
        );
        // The Runner chose the id: a repeated delivery finds the document.
        let id = body["op"]["id"].as_str().unwrap();
        assert_eq!(id.len(), 32, "{body}");
        // A Func's own id is kept.
        let (_, body) = s
            .call(
                br#"{"op":"create","collection":"notes","id":"n1","doc":{}}"#,
                deadline,
            )
            .await;
        assert_eq!(body["op"]["id"], "n1");

        // Refused before anything is sent.
        let (status, body) = s
            .call(
                br#"{"op":"put","collection":"audit","id":"x","doc":{}}"#,
                deadline,
            )
            .await;
        assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
        let (status, _) = s
            .call(br#"{"op":"get","collection":"secrets","id":"x"}"#, deadline)
            .await;
        assert_eq!(status, 403);
        let (status, body) = s.call(b"{\"op\":\"drop\"}", deadline).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("invalid")));
    }

    #[tokio::test]
    async fn without_a_tron_a_call_is_503() {
        let broker = AnyBroker::Embedded(EmbeddedBroker::new(100));
        let s = scope(&broker, &[("notes", &[StoreOp::Read])]);
        let (status, body) = s
            .call(
                br#"{"op":"get","collection":"notes","id":"x"}"#,
                Instant::now() + Duration::from_secs(5),
            )
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("store_unavailable")),
            "{body}"
        );
    }
}

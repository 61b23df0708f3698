//! Funcs' document store requests, answered by a Tron with a document
//! store.
//!
//! Func -> its Runner -> `funcatron.store` -> **here: the request checked
//! against the bundle's `store` declaration (`x-funcatron: {store:
//! {orders: [read, write]}}`), then run on the document store** -> the
//! Runner's reply queue -> the Func. The Runner names the Func and its
//! version; the Func's own code cannot. The declaration is the one of the
//! version asking, or, for a version no longer served (draining after a
//! switch), of the version served now.
//!
//! A request is acknowledged once its answer is published (or could not
//! be: the Runner is gone, and the Func has stopped waiting); one that
//! cannot be decoded is dead-lettered with the reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, Delivery, Message, QueueKind};
use funcatron_bundle::store::StoreOp;
use funcatron_control::names;
use funcatron_documents::rpc::{execute, refusal, Answer, Request, REPLY_HEADER};
use funcatron_documents::Documents;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::registry::Served;

/// Requests one Tron runs at once.
const PREFETCH: u16 = 64;

/// Largest request accepted (a 1 MiB document and its envelope).
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// Answer Funcs' store requests until `shutdown`.
pub async fn serve(
    docs: Documents,
    broker: AnyBroker,
    served: watch::Receiver<Arc<Served>>,
    shutdown: CancellationToken,
) {
    let options = ConsumeOptions {
        prefetch: PREFETCH,
        auto_ack: false,
    };
    let mut sub = match broker
        .consume(names::STORE_REQUESTS, QueueKind::Work, options)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot consume Funcs' store requests");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(usize::from(PREFETCH)));
    loop {
        let permit = match Arc::clone(&slots).acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let d = tokio::select! {
            () = shutdown.cancelled() => return,
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        let (docs, broker, served) = (docs.clone(), broker.clone(), served.clone());
        tokio::spawn(async move {
            handle(&docs, &broker, &served, d).await;
            drop(permit);
        });
    }
}

/// What a Func declared: (name, version, its `store`).
type Declared<'a> = (&'a str, &'a str, &'a BTreeMap<String, Vec<StoreOp>>);

/// What `func` at `version` may do with `collection`: the declaration of
/// that version, else of the version of it served now.
fn allowed<'a, I>(declared: I, func: &str, version: &str, collection: &str, op: StoreOp) -> bool
where
    I: IntoIterator<Item = Declared<'a>>,
    I::IntoIter: Clone,
{
    let declared = declared.into_iter();
    let of = |d: &Declared<'_>| d.2.get(collection).is_some_and(|ops| ops.contains(&op));
    match declared.clone().find(|d| d.0 == func && d.1 == version) {
        Some(d) => of(&d),
        None => declared.filter(|d| d.0 == func).any(|d| of(&d)),
    }
}

async fn handle(
    docs: &Documents,
    broker: &AnyBroker,
    served: &watch::Receiver<Arc<Served>>,
    d: Delivery,
) {
    let Some(reply_to) = d.message.header(REPLY_HEADER).map(str::to_owned) else {
        broker
            .dead_letter(
                names::STORE_REQUESTS,
                d,
                "a store request without a reply queue",
            )
            .await;
        return;
    };
    if d.message.payload.len() > MAX_REQUEST_BYTES {
        broker
            .dead_letter(names::STORE_REQUESTS, d, "a store request over 2 MiB")
            .await;
        return;
    }
    let request: Request = match serde_json::from_slice(&d.message.payload) {
        Ok(r) => r,
        Err(e) => {
            // The key, if it can be read, lets the Func hear why.
            let key = serde_json::from_slice::<serde_json::Value>(&d.message.payload)
                .ok()
                .and_then(|v| v.get("key").and_then(|k| k.as_str()).map(str::to_owned));
            if let Some(key) = key {
                let (status, body) = refusal(400, "invalid", format!("store request: {e}"));
                reply(broker, &reply_to, Answer { key, status, body }, 30_000).await;
                let _ = d.ack().await;
            } else {
                broker
                    .dead_letter(
                        names::STORE_REQUESTS,
                        d,
                        &format!("an undecodable store request: {e}"),
                    )
                    .await;
            }
            return;
        }
    };
    let now = funcatron_store::now_ms();
    if request.deadline_ms <= now {
        // Its Func has stopped waiting: nothing is done.
        metrics::counter!("store_requests_total", "func" => request.func.clone(), "outcome" => "expired").increment(1);
        let _ = d.ack().await;
        return;
    }
    let span = tracing::debug_span!("store_request", func = %request.func, version = %request.version, collection = %request.op.collection());
    let (status, body) = async {
        let need = if request.op.writes() { StoreOp::Write } else { StoreOp::Read };
        let now_served = Arc::clone(&served.borrow());
        let declared = now_served
            .bundles
            .iter()
            .map(|b| (b.name.as_str(), b.version.as_str(), &b.store_access));
        let ok = allowed(
            declared,
            &request.func,
            &request.version,
            request.op.collection(),
            need,
        );
        if !ok {
            let how = if need == StoreOp::Write { "write" } else { "read" };
            return refusal(
                403,
                "forbidden",
                format!(
                    "{} may not {how} collection {:?}: its bundle declares `store: {{{}: [{how}]}}` to allow it",
                    request.func,
                    request.op.collection(),
                    request.op.collection()
                ),
            );
        }
        execute(docs, request.op.clone()).await
    }
    .instrument(span)
    .await;
    let outcome = if status < 400 { "ok" } else { "refused" };
    metrics::counter!("store_requests_total", "func" => request.func.clone(), "outcome" => outcome)
        .increment(1);
    let answer = Answer {
        key: request.key,
        status,
        body,
    };
    reply(
        broker,
        &reply_to,
        answer,
        request.deadline_ms.saturating_sub(now),
    )
    .await;
    let _ = d.ack().await;
}

async fn reply(broker: &AnyBroker, queue: &str, answer: Answer, ttl_ms: u64) {
    let payload = match serde_json::to_vec(&answer) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "a store answer could not be encoded");
            return;
        }
    };
    let message = Message {
        payload: payload.into(),
        ttl_ms: Some(ttl_ms.max(1)),
        ..Message::default()
    };
    if let Err(e) = broker.publish(queue, message).await {
        // The Runner went away; its Func answers with a timeout.
        tracing::debug!(queue, error = %e, "a store answer found no Runner");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_follows_the_asking_version_then_the_served_one() {
        let mut access = BTreeMap::new();
        access.insert("orders".to_owned(), vec![StoreOp::Read, StoreOp::Write]);
        access.insert("audit".to_owned(), vec![StoreOp::Read]);
        let declared = [("f", "v2", &access)];
        assert!(allowed(declared, "f", "v2", "orders", StoreOp::Write));
        assert!(allowed(declared, "f", "v2", "audit", StoreOp::Read));
        assert!(!allowed(declared, "f", "v2", "audit", StoreOp::Write));
        assert!(!allowed(declared, "f", "v2", "other", StoreOp::Read));
        // A draining version: the served version's declaration.
        assert!(allowed(declared, "f", "v1", "orders", StoreOp::Write));
        // Another Func: nothing.
        assert!(!allowed(declared, "g", "v2", "orders", StoreOp::Read));
    }
}

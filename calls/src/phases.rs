//! The start of a pipeline's asynchronous phase, run by every Tron.
//!
//! A synchronous request to a pipeline -> its Runners run the steps ->
//! the first `mode: async` step -> `funcatron.flow-phases` -> **Tron:
//! here**: record the call (queued), publish the step as the call's first
//! attempt (persistent, confirmed, through `funcatron.requests` to its
//! Func's async queue), then answer the waiting caller 202 with the call
//! id, as an async call's ingress does. The rest of the flow continues
//! from the broker; its outcome is the call's (`docs/flows.md`).
//!
//! A phase is acknowledged after the caller's answer is sent. Delivered
//! again (a Tron killed in between), it finds the call its idempotency key
//! (the request id and the step) names and answers with that call's id, so
//! the step is queued once. A Tron without a state store answers 501
//! `async_unavailable`.

use std::borrow::Cow;

use funcatron_broker::{AnyBroker, Broker, BrokerError, Delivery, Message};
use funcatron_control::{headers, names};
use funcatron_envelope::{new_request_id, now_ms, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::submit::{self, Async, Queued};
use crate::Calls;

/// Phases started at once by one Tron.
const PREFETCH: u16 = 64;

/// Start asynchronous phases until `shutdown`: with `calls` as async
/// calls, without (no state store) refusing each with 501.
pub async fn run(
    broker: AnyBroker,
    calls: Option<Calls>,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    crate::consume_each(
        &broker.clone(),
        names::FLOW_PHASES,
        PREFETCH,
        shutdown,
        move |d| {
            let (broker, calls) = (broker.clone(), calls.clone());
            async move { start(&broker, calls.as_ref(), d).await }
        },
    )
    .await
}

async fn start(broker: &AnyBroker, calls: Option<&Calls>, d: Delivery) {
    let payload = d.message.payload.clone();
    let req = match Request::decode(&payload) {
        Ok(r) if r.flow.is_some() => r,
        Ok(_) => {
            return broker
                .dead_letter(names::FLOW_PHASES, d, "not a flow's step")
                .await
        }
        Err(e) => {
            return broker
                .dead_letter(names::FLOW_PHASES, d, &e.to_string())
                .await
        }
    };
    let span = tracing::info_span!(
        "tron.flow_phase",
        request_id = %req.id,
        func = req.header_values(headers::FUNC).next().unwrap_or_default(),
    );
    let _enter = span.enter();
    if (req.deadline_ms as f64) <= now_ms() {
        // The caller has been answered 504 already.
        let _ = d.ack().await;
        return;
    }
    let answer = match calls {
        None => Response::error(
            &req.id,
            501,
            "async_unavailable",
            "the flow's asynchronous phase needs a Tron with a state store (funcatron up always has one; give funcatron tron --store)",
        ),
        Some(calls) => match queue(broker, calls, &req).await {
            Ok(answer) => answer,
            Err(e) => {
                // Nothing was queued; the caller waits on, and the phase
                // is delivered again.
                tracing::warn!(error = %e, "asynchronous phase not started; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let _ = d.nack(true).await;
                return;
            }
        },
    };
    if let Some(to) = req.reply_to.as_deref() {
        let mut answer = answer;
        answer.reply_key = req.reply_key.clone();
        match broker.publish(to, Message::new(answer.encode())).await {
            Ok(()) | Err(BrokerError::NoRoute(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the caller's 202 not sent; retrying");
                let _ = d.nack(true).await;
                return;
            }
        }
    }
    let _ = d.ack().await;
}

/// Record the call and queue the step as its first attempt; the caller's
/// answer: 202, or a refusal (a bad callback URL, the store or broker
/// down: 400 or 503).
async fn queue(
    broker: &AnyBroker,
    calls: &Calls,
    req: &Request<'_>,
) -> Result<Response<'static>, crate::submit::Refused> {
    let callback = req.header_values("x-callback-url").next();
    if let Some(why) = callback.and_then(|u| submit::check_callback_url(u).err()) {
        return Ok(Response::error(&req.id, 400, "bad_callback_url", &why));
    }
    let call_id = format!("c{}", new_request_id());
    let secret = new_request_id();
    let at = req.flow.as_ref().map_or(0, |f| f.at);
    let idempotency = format!("flow {} steps[{at}]", req.id);
    let first = submit::first_attempt(req.clone(), &call_id, callback, Async::Recorded);
    // Through a Tron's routing to the step's Func async queue, marked as
    // a flow's step for the Runner.
    let routed = Some((
        names::REQUESTS.to_owned(),
        vec![(headers::FLOW.to_owned(), "1".to_owned())],
    ));
    let (id, secret) = match submit::queue(
        Some(calls),
        broker,
        &first,
        &secret,
        Some(&idempotency),
        routed,
    )
    .await
    {
        Ok(Queued::New) => (call_id.clone(), Some(secret.as_str())),
        Ok(Queued::Existing(first)) => (first, None),
        Err(e @ crate::submit::Refused::Broker(_)) => {
            return Ok(Response::error(&req.id, 503, e.code(), &e.message()))
        }
        Err(e) => return Err(e),
    };
    metrics::counter!("flow_async_phases_total").increment(1);
    tracing::info!(call_id = %id, "the flow's asynchronous phase is queued");
    let mut headers: Vec<(Cow<'static, str>, Cow<'static, str>)> = vec![(
        Cow::Borrowed("content-type"),
        Cow::Borrowed("application/json"),
    )];
    for (name, value) in submit::accepted_headers(&id, secret) {
        headers.push((Cow::Borrowed(name), Cow::Owned(value)));
    }
    Ok(Response {
        version: Cow::Borrowed(funcatron_envelope::VERSION),
        id: Cow::Owned(req.id.to_string()),
        status: 202,
        headers,
        body: Cow::Owned(submit::accepted_body(&req.id, &id, secret)),
        ..Response::default()
    })
}

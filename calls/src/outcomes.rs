//! The outcomes consumer, run by every Tron with a state store.
//!
//! Runner -> `funcatron.outcomes` -> **Tron: here** -> the call's record
//! ([`Calls::apply_outcome`]) -> a delayed retry on `funcatron.requests`
//! (the broker holds it; [`funcatron_broker::Broker::publish_delayed`]), or
//! a final state. An outcome is acknowledged only once its record is
//! written and its retry (if any) published: a crash before that makes the
//! broker deliver it again, and applying it again is safe.

use std::time::Duration;

use funcatron_broker::{AnyBroker, Broker, BrokerError, Delivery, QueueKind};
use funcatron_control::calls::AsyncPolicy;
use funcatron_control::{headers, names};
use funcatron_envelope::Response;
use tokio_util::sync::CancellationToken;

use crate::callbacks::{Deliverer, Job, ScheduleError};
use crate::{Applied, CallError, Calls};

/// Outcomes applied at once by one Tron.
const PREFETCH: u16 = 64;

/// Apply outcomes until `shutdown`; those being applied finish first. A
/// finished call's callback is delivered at once by `deliverer` when it has
/// a slot (see [`Deliverer::schedule`]); without one, only by its job.
pub async fn run(
    broker: AnyBroker,
    calls: Calls,
    deliverer: Option<Deliverer>,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    crate::consume_each(
        &broker.clone(),
        names::OUTCOMES,
        PREFETCH,
        shutdown,
        move |d| {
            let (broker, calls, deliverer) = (broker.clone(), calls.clone(), deliverer.clone());
            async move { apply(&broker, &calls, deliverer.as_ref(), d).await }
        },
    )
    .await
}

/// Queue again, as its next attempt and at once, every call the store
/// still has queued, and every pending callback: for a broker that kept nothing across a restart (the
/// embedded one of `funcatron up --store`), whose delayed retries and
/// waiting calls were in memory. A call whose attempt was running runs
/// again (at least once). Returns how many were queued.
pub async fn requeue_pending(broker: &AnyBroker, calls: &Calls) -> Result<usize, CallError> {
    const PAGE: usize = 500;
    if let Err(e) = broker.declare(names::REQUESTS, QueueKind::Work).await {
        tracing::debug!(error = %e, "request queue declared once the broker is reachable");
    }
    let mut queued = 0;
    for state in [crate::CallState::Queued, crate::CallState::Running] {
        let mut after: Option<String> = None;
        loop {
            let page = calls.waiting(state, after.as_deref(), PAGE).await?;
            for call in &page {
                let next = call.attempts.last().map_or(1, |a| a.n + 1);
                let message =
                    crate::request_message(crate::next_request(&call.request, next, 0, None)?);
                match broker.publish(names::REQUESTS, message).await {
                    Ok(()) => queued += 1,
                    Err(e) => {
                        tracing::warn!(call_id = %call.id, error = %e, "call not queued again")
                    }
                }
            }
            if page.len() < PAGE {
                break;
            }
            after = page.last().map(|c| c.id.clone());
        }
    }
    queued += requeue_callbacks(broker, calls).await?;
    if queued > 0 {
        tracing::info!(
            queued,
            "queued again the calls that were waiting when the last run stopped"
        );
    }
    Ok(queued)
}

/// Publish again every pending callback's next job (see
/// [`requeue_pending`]).
async fn requeue_callbacks(broker: &AnyBroker, calls: &Calls) -> Result<usize, CallError> {
    const PAGE: usize = 500;
    if let Err(e) = broker.declare(names::CALLBACKS, QueueKind::Work).await {
        tracing::debug!(error = %e, "callbacks queue declared once the broker is reachable");
    }
    let (mut after, mut queued) = (None::<String>, 0);
    loop {
        let (jobs, last) = crate::callbacks::pending(calls, after.as_deref(), PAGE).await?;
        for job in &jobs {
            match crate::callbacks::schedule(broker, calls, job, 0).await {
                Ok(()) => queued += 1,
                Err(e) => {
                    tracing::warn!(call_id = %job.call_id, error = %e, "callback not queued again")
                }
            }
        }
        match last {
            Some(l) => after = Some(l),
            None => return Ok(queued),
        }
    }
}

/// The policy an outcome says its Func version runs under (the default
/// when it does not say or says something unusable).
fn policy_of(d: &Delivery) -> funcatron_control::calls::Resolved {
    let stated = d
        .message
        .header(headers::ASYNC_POLICY)
        .and_then(|p| serde_json::from_str::<AsyncPolicy>(p).ok())
        .unwrap_or_default();
    stated.resolved().unwrap_or_default()
}

/// A Runner's notice that an attempt started (header
/// [`headers::PHASE`] `started`; body [`Started`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Started<'a> {
    /// The call.
    #[serde(borrow)]
    pub call_id: std::borrow::Cow<'a, str>,
    /// Which attempt.
    pub attempt: u32,
    /// When it started (Unix ms).
    pub started_ms: u64,
}

/// A note of an asynchronous pipeline's step: kept in the call's record;
/// acknowledged once written (a store outage makes it come again).
async fn step(broker: &AnyBroker, calls: &Calls, d: Delivery) {
    let note = match serde_json::from_slice::<crate::StepNote>(&d.message.payload) {
        Ok(n) => n,
        Err(e) => return broker.dead_letter(names::OUTCOMES, d, &e.to_string()).await,
    };
    match calls.apply_step(&note).await {
        Ok(_) => {
            let _ = d.ack().await;
        }
        Err(CallError::Corrupt(why)) => broker.dead_letter(names::OUTCOMES, d, &why).await,
        Err(e) => {
            tracing::warn!(call_id = %note.call_id, error = %e, "flow step note not applied; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = d.nack(true).await;
        }
    }
}

async fn started(calls: &Calls, d: Delivery) {
    if let Ok(s) = serde_json::from_slice::<Started>(&d.message.payload) {
        let func = d.message.header(headers::FUNC);
        if let Err(e) = calls
            .apply_started(&s.call_id, s.attempt, func, s.started_ms)
            .await
        {
            // Advisory: the outcome will move the call on anyway.
            tracing::debug!(call_id = %s.call_id, error = %e, "start of an attempt not recorded");
        }
    }
    let _ = d.ack().await;
}

async fn apply(broker: &AnyBroker, calls: &Calls, deliverer: Option<&Deliverer>, d: Delivery) {
    match d.message.header(headers::PHASE) {
        Some(headers::PHASE_STARTED) => return started(calls, d).await,
        Some(headers::PHASE_STEP) => return step(broker, calls, d).await,
        _ => {}
    }
    let payload = d.message.payload.clone();
    let response = match Response::decode(&payload) {
        Ok(r) => r,
        Err(e) => return broker.dead_letter(names::OUTCOMES, d, &e.to_string()).await,
    };
    let policy = policy_of(&d);
    let func = d.message.header(headers::FUNC).map(str::to_owned);
    let span = tracing::debug_span!(
        "tron.outcome",
        request_id = %response.id,
        call_id = response.call_id.as_deref().unwrap_or_default(),
        func = func.as_deref().unwrap_or_default(),
    );
    let _enter = span.enter();
    let jitter: f64 = rand::random();
    let end = match d.message.header(headers::FLOW_END) {
        Some(headers::FLOW_END_DEAD) => Some(crate::FlowEnd::Dead(
            d.message
                .header(headers::DEAD_REASON)
                .unwrap_or("a step ran out of attempts")
                .to_owned(),
        )),
        Some(_) => Some(crate::FlowEnd::Ended),
        None => None,
    };
    let applied = match end {
        Some(end) => {
            calls
                .apply_flow_end(&response, func.as_deref(), &policy, end)
                .await
        }
        None => {
            calls
                .apply_outcome(&response, func.as_deref(), &policy, jitter)
                .await
        }
    };
    match applied {
        Ok(Applied::Retry { request, delay_ms }) => {
            let message = crate::request_message(request);
            match broker
                .publish_delayed(names::REQUESTS, message, delay_ms)
                .await
            {
                Ok(()) => {
                    tracing::debug!(delay_ms, "retry scheduled");
                    let _ = d.ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retry not scheduled; the outcome is applied again");
                    let _ = d.nack(true).await;
                }
            }
        }
        Ok(Applied::Callback(job)) => match schedule_callback(broker, calls, deliverer, &job).await
        {
            Ok(()) => {
                tracing::debug!("call finished; callback scheduled");
                let _ = d.ack().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "callback not scheduled; the outcome is applied again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = d.nack(true).await;
            }
        },
        Ok(Applied::Finished(state)) => {
            tracing::debug!(state = state.as_str(), "call finished");
            if let Some(trigger) = response.call_id.as_deref().and_then(crate::trigger_of) {
                metrics::counter!("trigger_calls_total",
                    "func" => func.clone().unwrap_or_default(),
                    "trigger" => trigger.to_owned(),
                    "outcome" => state.as_str())
                .increment(1);
            }
            let _ = d.ack().await;
        }
        Ok(Applied::Duplicate | Applied::Gone) => {
            let _ = d.ack().await;
        }
        Err(CallError::Corrupt(why)) => broker.dead_letter(names::OUTCOMES, d, &why).await,
        Err(e) => {
            // The store is unreachable: wait a little so a store outage
            // does not spin, then let the broker deliver it again.
            tracing::warn!(error = %e, "outcome not applied; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = d.nack(true).await;
        }
    }
}

async fn schedule_callback(
    broker: &AnyBroker,
    calls: &Calls,
    deliverer: Option<&Deliverer>,
    job: &Job,
) -> Result<(), ScheduleError> {
    match deliverer {
        Some(d) => d.schedule(broker, job).await,
        None => crate::callbacks::schedule(broker, calls, job, 0).await,
    }
}

//! Callbacks: a finished call's outcome POSTed to its `X-Callback-Url`,
//! signed, retried with backoff until delivered, every delivery recorded.
//!
//! Runner -> `funcatron.outcomes` -> Tron ([`crate::outcomes`]: the call is
//! final, [`arm`] marks its callback pending, a [`Job`] goes on
//! `funcatron.callbacks`) -> **Tron: here** ([`run`]: POST, record the
//! delivery, and if it failed publish the next job delayed by the call's
//! backoff; acknowledge after) -> the receiver.
//!
//! Like outcomes, jobs are handled at least once: a crash after the POST
//! and before the acknowledgement POSTs again, so a receiver de-duplicates
//! by `X-Call-Id`. A job is only a pointer (call id, delivery number):
//! what is sent comes from the record, and a job whose delivery is already
//! recorded is dropped. The embedded broker keeps jobs in memory, so with
//! it the store also keeps an index of pending callbacks ([`PENDING`])
//! that [`crate::outcomes::requeue_pending`] publishes again at start; a
//! broker that keeps its messages (RabbitMQ) needs no index, and skips its
//! two writes per callback.
//!
//! Requests go only where the Tron's outbound policy allows (no private,
//! loopback or metadata addresses unless the operator allows them); a
//! refused URL fails the callback at once, without retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use funcatron_broker::{AnyBroker, Broker, BrokerError, Delivery, Message};
use funcatron_control::calls::Resolved;
use funcatron_control::names;
use funcatron_control::outbound::{OutboundError, OutboundPolicy};
use funcatron_store::{Record, Store, StoreError};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::{decode, encode, CallError, CallRecord, Calls, COLLECTION};

/// The store collection indexing calls whose callback is pending (key: the
/// call id), for a broker that keeps nothing across a restart.
pub const PENDING: &str = "callbacks";
/// The store collection of cluster secrets.
pub const SECRETS: &str = "secrets";
/// The key of the cluster's callback signing key in [`SECRETS`].
const CLUSTER_KEY: &str = "callback-key";
/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-funcatron-signature";
/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Jobs delivered at once by one Tron.
const PREFETCH: u16 = 32;
/// Deliveries made at once by the Tron that finished their calls.
const INLINE: usize = 64;
/// How long a job waits behind a delivery made at once: longer than a
/// delivery may take, so the job finds it recorded.
const WATCHDOG: Duration = Duration::from_secs(30);
/// How long a job waits after its delivery could not be handled.
const RETRY_PAUSE_MS: u64 = 500;

/// Which key signs a Func's callbacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyScope {
    /// A key per Func, derived from the cluster key (a receiver of one
    /// Func's callbacks cannot forge another's).
    #[default]
    Func,
    /// One key for the whole cluster.
    Cluster,
}

impl std::str::FromStr for KeyScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "func" => Ok(KeyScope::Func),
            "cluster" => Ok(KeyScope::Cluster),
            other => Err(format!("{other:?}: expected func or cluster")),
        }
    }
}

/// Where a callback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackState {
    /// Waiting for its (next) delivery.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Out of deliveries, or refused by the outbound policy.
    Failed,
}

/// One delivery's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackDelivery {
    /// From 1.
    pub n: u32,
    /// When it was made (Unix ms).
    pub at_ms: u64,
    /// The receiver's status, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed without an answer (connection refused, timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took, ms.
    pub ms: f64,
}

/// A call's callback: its state, its deliveries, and the backoff its
/// Func's policy gave when the call finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Callback {
    /// Where it is.
    pub state: CallbackState,
    /// Deliveries in all, at most.
    pub max_deliveries: u32,
    /// Before the second delivery, ms.
    pub backoff_initial_ms: u64,
    /// Each further delivery waits this much longer.
    pub backoff_factor: f64,
    /// No wait is longer, ms.
    pub backoff_max_ms: u64,
    /// Deliveries so far.
    #[serde(default)]
    pub deliveries: Vec<CallbackDelivery>,
    /// Why it failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Callback {
    fn delay_before(&self, next: u32, jitter: f64) -> u64 {
        Resolved {
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_factor: self.backoff_factor,
            backoff_max_ms: self.backoff_max_ms,
            ..Resolved::default()
        }
        .delay_before(next, jitter)
    }
}

/// A delivery to make: a pointer into the call's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The call.
    pub call_id: String,
    /// Which delivery (from 1).
    pub n: u32,
}

impl Job {
    fn message(&self) -> Message {
        Message {
            payload: serde_json::to_vec(self).unwrap_or_default().into(),
            persistent: true,
            ..Message::default()
        }
    }
}

/// A call just became final: with a callback URL its callback is now
/// pending (under `policy`'s backoff) and its first job due.
pub(crate) fn arm(call: &mut CallRecord, policy: &Resolved) -> crate::Applied {
    if call.callback_url.is_none() {
        return crate::Applied::Finished(call.state);
    }
    call.callback = Some(Callback {
        state: CallbackState::Pending,
        max_deliveries: policy.callback_attempts,
        backoff_initial_ms: policy.backoff_initial_ms,
        backoff_factor: policy.backoff_factor,
        backoff_max_ms: policy.backoff_max_ms,
        deliveries: Vec::new(),
        reason: None,
    });
    crate::Applied::Callback(Job {
        call_id: call.id.clone(),
        n: 1,
    })
}

/// The job still due for a final call, if its callback is pending.
pub(crate) fn due(call: &CallRecord) -> Option<Job> {
    let cb = call.callback.as_ref()?;
    (call.state.is_final() && cb.state == CallbackState::Pending).then(|| Job {
        call_id: call.id.clone(),
        n: cb.deliveries.last().map_or(1, |d| d.n + 1),
    })
}

/// Does `broker` forget its messages when it stops (so pending callbacks
/// are indexed in the store)?
fn forgets(broker: &AnyBroker) -> bool {
    matches!(broker, AnyBroker::Embedded(_))
}

/// Publish `job` (persistent, delayed by `delay_ms`) and, on a broker that
/// forgets, index it as pending, so a restart finds it again.
pub async fn schedule(
    broker: &AnyBroker,
    calls: &Calls,
    job: &Job,
    delay_ms: u64,
) -> Result<(), ScheduleError> {
    if forgets(broker) {
        index(calls, job).await?;
    }
    if delay_ms == 0 {
        broker.publish(names::CALLBACKS, job.message()).await?;
    } else {
        broker
            .publish_delayed(names::CALLBACKS, job.message(), delay_ms)
            .await?;
    }
    Ok(())
}

/// Index `job`'s call as having a callback pending.
async fn index(calls: &Calls, job: &Job) -> Result<(), ScheduleError> {
    let index = Record::new(PENDING, job.call_id.clone());
    match calls.store.insert(&index).await {
        Ok(_) | Err(StoreError::Exists { .. }) => Ok(()),
        Err(e) => Err(ScheduleError::Store(e)),
    }
}

/// Why a callback job was not scheduled.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The pending index could not be written.
    #[error("state store: {0}")]
    Store(StoreError),
    /// The job could not be published.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
}

/// The cluster's callback signing key: made once (32 random bytes) and
/// kept in the state store, so every Tron sharing the store signs alike.
pub async fn cluster_key(calls: &Calls) -> Result<Vec<u8>, CallError> {
    if let Some(r) = calls.store.get(SECRETS, CLUSTER_KEY).await? {
        return Ok(r.value.to_vec());
    }
    let fresh: [u8; 32] = rand::random();
    let rec = Record::new(SECRETS, CLUSTER_KEY).with_value(fresh.to_vec());
    match calls.store.insert(&rec).await {
        Ok(_) => Ok(fresh.to_vec()),
        // Another Tron made it first: use that one.
        Err(StoreError::Exists { .. }) => Ok(calls
            .store
            .get(SECRETS, CLUSTER_KEY)
            .await?
            .map(|r| r.value.to_vec())
            .unwrap_or_else(|| fresh.to_vec())),
        Err(e) => Err(e.into()),
    }
}

/// The key that signs `func`'s callbacks under `scope`, from the cluster
/// key: the cluster key itself, or HMAC-SHA256(cluster key, "funcatron
/// callback key\n" + func).
pub fn signing_key(cluster: &[u8], scope: KeyScope, func: &str) -> Vec<u8> {
    match scope {
        KeyScope::Cluster => cluster.to_vec(),
        KeyScope::Func => {
            hmac_sha256(cluster, &[b"funcatron callback key\n", func.as_bytes()]).to_vec()
        }
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The signature header's value for a callback of `call_id` with `body`
/// sent at `t` (Unix seconds): `t=<t>,v1=<hex HMAC-SHA256(key,
/// "<t>.<call_id>.<body>")>`.
pub fn signature(key: &[u8], t: u64, call_id: &str, body: &[u8]) -> String {
    let t_s = t.to_string();
    let mac = hmac_sha256(key, &[t_s.as_bytes(), b".", call_id.as_bytes(), b".", body]);
    format!("t={t},v1={}", hex(&mac))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Delivers callbacks: the HTTP client (inside the outbound policy), the
/// cluster key, and the slots for deliveries made at once by the Tron that
/// finished the call ([`Deliverer::schedule`]). Cloning shares them.
#[derive(Clone)]
pub struct Deliverer {
    calls: Calls,
    client: reqwest::Client,
    policy: OutboundPolicy,
    cluster_key: Vec<u8>,
    inline: Arc<tokio::sync::Semaphore>,
    watchdog: Duration,
    /// Jobs taken off `funcatron.callbacks` and settled.
    handled: Arc<AtomicU64>,
}

impl Deliverer {
    /// Deliver `calls`' callbacks to where `outbound` allows (the cluster
    /// key is read from the store, or made).
    pub async fn new(calls: Calls, outbound: OutboundPolicy) -> Result<Self, RunError> {
        let cluster_key = cluster_key(&calls).await?;
        let client = outbound.client(reqwest::Client::builder().timeout(DELIVERY_TIMEOUT))?;
        Ok(Deliverer {
            calls,
            client,
            policy: outbound,
            cluster_key,
            inline: Arc::new(tokio::sync::Semaphore::new(INLINE)),
            watchdog: WATCHDOG,
            handled: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How long a job waits behind a delivery made at once (default 30 s,
    /// longer than a delivery may take; shorter in tests).
    pub fn watchdog(mut self, after: Duration) -> Self {
        self.watchdog = after;
        self
    }

    /// How many jobs this deliverer (and its clones) took off
    /// `funcatron.callbacks` and settled, delivered or found done.
    pub fn jobs_handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Schedule `job` and, when a slot is free, make its delivery at once
    /// here rather than after a trip through `funcatron.callbacks`. On a
    /// broker that keeps its messages the job is then published delayed by
    /// the watchdog time, and finds the delivery recorded (and is dropped)
    /// unless this Tron stopped before making it. A broker that forgets
    /// (the embedded one) would lose a delayed job with the process, just
    /// as it loses this delivery; the pending index brings both back at
    /// start, so there the job is published only if the delivery could not
    /// be made or recorded. Returns once the job (or the index) is written;
    /// the delivery goes on.
    pub async fn schedule(&self, broker: &AnyBroker, job: &Job) -> Result<(), ScheduleError> {
        let Ok(slot) = Arc::clone(&self.inline).try_acquire_owned() else {
            return schedule(broker, &self.calls, job, 0).await;
        };
        let watched = !forgets(broker);
        if watched {
            let after = u64::try_from(self.watchdog.as_millis()).unwrap_or(u64::MAX);
            schedule(broker, &self.calls, job, after.max(1)).await?;
        } else {
            index(&self.calls, job).await?;
        }
        let (d, broker, job) = (self.clone(), broker.clone(), job.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Err(e) = d.deliver(&broker, &job).await else {
                return;
            };
            tracing::debug!(call_id = %job.call_id, error = %e, "callback left to its job");
            if !watched {
                // Nothing else would make it before a restart: its job,
                // after a pause so an outage does not spin.
                if let Err(e) = schedule(&broker, &d.calls, &job, RETRY_PAUSE_MS).await {
                    tracing::warn!(call_id = %job.call_id, error = %e, "callback pending until the next start");
                }
            }
        });
        Ok(())
    }
}

/// Deliver callbacks until `shutdown` (the jobs on `funcatron.callbacks`).
pub async fn run(
    broker: AnyBroker,
    deliverer: Deliverer,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    crate::consume_each(
        &broker.clone(),
        names::CALLBACKS,
        PREFETCH,
        shutdown,
        move |m| {
            let (broker, d) = (broker.clone(), deliverer.clone());
            async move { d.handle(&broker, m).await }
        },
    )
    .await
}

/// Why the callback deliverer could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The cluster key could not be read or made.
    #[error("callback key: {0}")]
    Key(#[from] CallError),
    /// The HTTP client could not be built.
    #[error("callback client: {0}")]
    Client(#[from] reqwest::Error),
}

/// What one delivery came to.
struct Sent {
    at_ms: u64,
    status: Option<u16>,
    error: Option<String>,
    ms: f64,
    /// Do not try again (the URL is refused).
    permanent: bool,
}

impl Sent {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

impl Deliverer {
    async fn handle(&self, broker: &AnyBroker, d: Delivery) {
        let job: Job = match serde_json::from_slice(&d.message.payload) {
            Ok(j) => j,
            Err(e) => {
                return broker
                    .dead_letter(names::CALLBACKS, d, &format!("not a callback job: {e}"))
                    .await
            }
        };
        let span = tracing::debug_span!("calls.callback", call_id = %job.call_id, n = job.n, request_id = tracing::field::Empty, func = tracing::field::Empty);
        let _enter = span.enter();
        match self.deliver(broker, &job).await {
            Ok(()) => {
                let _ = d.ack().await;
                self.handled.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // The store or the broker is unreachable: wait a little so
                // an outage does not spin, then let the broker deliver it
                // again.
                tracing::warn!(error = %e, "callback not handled; retrying");
                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                let _ = d.nack(true).await;
            }
        }
    }

    /// Make delivery `job.n` unless it is already recorded, record it, and
    /// schedule the next one if it failed and deliveries remain.
    async fn deliver(&self, broker: &AnyBroker, job: &Job) -> Result<(), HandleError> {
        let Some(call) = self.calls.get(&job.call_id).await? else {
            self.unindex(broker, &job.call_id).await?;
            return Ok(());
        };
        let pending = due(&call).filter(|d| d.n == job.n);
        let (Some(_), Some(url)) = (pending, call.callback_url.as_deref()) else {
            // Delivered, failed, or this delivery recorded already.
            if due(&call).is_none() {
                self.unindex(broker, &job.call_id).await?;
            }
            return Ok(());
        };
        let sent = self.send(&call, url, job.n).await;
        let next = self.record(&job.call_id, job.n, &sent).await?;
        match next {
            Some((job, delay_ms)) => {
                metrics::counter!("calls_callback_retried_total").increment(1);
                broker
                    .publish_delayed(names::CALLBACKS, job.message(), delay_ms)
                    .await?;
            }
            None => self.unindex(broker, &job.call_id).await?,
        }
        Ok(())
    }

    async fn unindex(&self, broker: &AnyBroker, id: &str) -> Result<(), StoreError> {
        if !forgets(broker) {
            return Ok(());
        }
        self.calls.store.delete(PENDING, id).await.map(drop)
    }

    /// POST the call's outcome to `url`.
    async fn send(&self, call: &CallRecord, url: &str, n: u32) -> Sent {
        let started = Instant::now();
        let at_ms = funcatron_store::now_ms();
        let done = |status: Option<u16>, error: Option<String>, permanent: bool| Sent {
            at_ms,
            status,
            error,
            ms: started.elapsed().as_secs_f64() * 1e3,
            permanent,
        };
        if let Err(e) = self.policy.check_url(url) {
            return done(None, Some(e.to_string()), true);
        }
        let func = call.func.as_deref().unwrap_or_default();
        let (status, headers, body) = match &call.result {
            Some(r) => {
                let body = if r.body_base64 {
                    base64::engine::general_purpose::STANDARD
                        .decode(&r.body)
                        .unwrap_or_default()
                } else {
                    r.body.clone().into_bytes()
                };
                (r.status, r.headers.as_slice(), body)
            }
            None => (0, &[][..], Vec::new()),
        };
        let key = signing_key(&self.cluster_key, self.calls.key_scope, func);
        let t = at_ms / 1000;
        let exec_s = call.attempts.last().map_or(0.0, |a| a.exec_ms / 1e3);
        let mut req = self
            .client
            .post(url)
            .header("x-call-id", &call.id)
            .header("x-function-name", func)
            .header("x-function-status", status.to_string())
            .header("x-duration-seconds", format!("{exec_s:.6}"))
            .header("x-funcatron-call-state", call.state.as_str())
            .header("x-funcatron-attempts", call.attempts.len().to_string())
            .header("x-funcatron-callback-attempt", n.to_string())
            .header(SIGNATURE_HEADER, signature(&key, t, &call.id, &body));
        if let Some((_, ct)) = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", ct);
        }
        match req.body(body).send().await {
            Ok(resp) => done(Some(resp.status().as_u16()), None, false),
            Err(e) => {
                // The policy's resolver refuses a name resolving to a
                // forbidden address: as final as a refused literal.
                let refused = is_refused(&e);
                done(None, Some(error_text(&e)), refused)
            }
        }
    }

    /// Record a delivery; the next job and its delay if it is to be tried
    /// again.
    async fn record(&self, id: &str, n: u32, sent: &Sent) -> Result<Option<(Job, u64)>, CallError> {
        let jitter: f64 = rand::random();
        loop {
            let Some(rec) = self.calls.store.get(COLLECTION, id).await? else {
                return Ok(None);
            };
            let mut call = decode(&rec)?;
            let Some(cb) = call.callback.as_mut() else {
                return Ok(None);
            };
            if cb.state != CallbackState::Pending || cb.deliveries.iter().any(|d| d.n >= n) {
                return Ok(None);
            }
            cb.deliveries.push(CallbackDelivery {
                n,
                at_ms: sent.at_ms,
                status: sent.status,
                error: sent.error.clone(),
                ms: sent.ms,
            });
            let mut next = None;
            if sent.ok() {
                cb.state = CallbackState::Delivered;
                metrics::counter!("calls_callback_delivered_total").increment(1);
            } else if sent.permanent || n >= cb.max_deliveries {
                cb.state = CallbackState::Failed;
                cb.reason = Some(if sent.permanent {
                    "the callback URL is refused by the outbound policy".to_owned()
                } else {
                    format!("{n} deliveries failed")
                });
                metrics::counter!("calls_callback_failed_total").increment(1);
            } else {
                next = Some((
                    Job {
                        call_id: id.to_owned(),
                        n: n + 1,
                    },
                    cb.delay_before(n + 1, jitter),
                ));
            }
            call.updated_ms = funcatron_store::now_ms();
            match self
                .calls
                .store
                .replace(&encode(&call, &rec), rec.revision)
                .await
            {
                Ok(_) => return Ok(next),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Was the connection refused by the outbound policy's resolver?
fn is_refused(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<OutboundError>().is_some() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A reqwest error with its causes (its own text is only "error sending
/// request").
fn error_text(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Why a job was not handled (it is delivered again).
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error("{0}")]
    Call(#[from] CallError),
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
}

/// A page of calls whose callback is pending, by id, `limit` index
/// entries at most after `after` (for
/// [`crate::outcomes::requeue_pending`]): the jobs due, and the last index
/// key read (`None` at the end).
pub(crate) async fn pending(
    calls: &Calls,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Job>, Option<String>), CallError> {
    let mut q = funcatron_store::Query::new(PENDING).limit(limit);
    if let Some(a) = after {
        q = q.after(a);
    }
    let page = calls.store.list(&q).await?;
    let mut jobs = Vec::new();
    for rec in &page {
        match calls.get(&rec.key).await? {
            Some(call) => jobs.extend(due(&call)),
            None => {
                calls.store.delete(PENDING, &rec.key).await?;
            }
        }
    }
    let last = (page.len() >= limit)
        .then(|| page.last().map(|r| r.key.clone()))
        .flatten();
    Ok((jobs, last))
}

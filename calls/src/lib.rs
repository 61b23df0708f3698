//! Asynchronous calls: their records in the state store, from submission
//! to a final state.
//!
//! ingress (**[`Calls::submit`]**, then 202 + call id) -> `funcatron.requests`
//! -> Tron -> the Func's async queue -> Runner -> `funcatron.outcomes` ->
//! Tron (**[`outcomes::run`]**: [`Calls::apply_outcome`], then a delayed
//! retry, or done) -> the record, which `GET /_funcatron/calls/<id>` reads
//! ([`Calls::get`], [`CallView`]).
//!
//! A record is the durable truth of a call: written (queued) before the
//! call is published, so a 202 always has a record; updated by
//! compare-and-set, so Trons applying outcomes at once lose nothing; and it
//! keeps the request envelope, so a retry or a redrive re-publishes it.
//! Outcomes are applied at least once: an attempt already recorded is
//! recognised and not applied twice.

pub mod callbacks;
pub mod outcomes;
pub mod phases;
pub mod submit;

use std::borrow::Cow;

use bytes::Bytes;
pub use funcatron_control::calls::StepNote;
use funcatron_control::calls::{next_step, Resolved, Step};
use funcatron_envelope::{Request, Response};
use funcatron_store::{AnyStore, Query, Record, Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The store collection of call records.
pub const COLLECTION: &str = "calls";
/// The store collection of idempotency keys (value: the call id).
pub const IDEMPOTENCY: &str = "idempotency";

/// The trigger a call was made by (`funcatron_tron::triggers`), from its
/// id: `c<32 hex digits>:<trigger>`; `None` for a call a client made.
pub fn trigger_of(call_id: &str) -> Option<&str> {
    call_id
        .split_once(':')
        .map(|(_, t)| t)
        .filter(|t| !t.is_empty())
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// Accepted, waiting for its (next) attempt.
    Queued,
    /// An attempt has started on a Runner (it said so; until its outcome).
    Running,
    /// Finished with an answer the policy does not retry, below 400.
    Succeeded,
    /// Finished with an answer the policy does not retry, 400 or above.
    Failed,
    /// Out of attempts or of age; waiting for a redrive or a purge.
    DeadLettered,
}

impl CallState {
    /// The store status string.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Queued => "queued",
            CallState::Running => "running",
            CallState::Succeeded => "succeeded",
            CallState::Failed => "failed",
            CallState::DeadLettered => "dead_lettered",
        }
    }

    /// No further attempt will run on its own.
    pub fn is_final(self) -> bool {
        !matches!(self, CallState::Queued | CallState::Running)
    }
}

/// One attempt's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// From 1.
    pub n: u32,
    /// When its outcome was recorded (Unix ms).
    pub finished_ms: u64,
    /// The answer's status.
    pub status: u16,
    /// The platform's error code, when the answer was one (`func_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time inside the Func, ms.
    pub exec_ms: f64,
    /// The delay that was scheduled before it, ms.
    pub delay_ms: u64,
}

/// A finished call's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallResult {
    /// HTTP status.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// The body, as in envelopes.
    pub body: String,
    /// `body` is base64.
    #[serde(default)]
    pub body_base64: bool,
}

/// A call's record, as stored (JSON in [`Record::value`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The call id.
    pub id: String,
    /// Where it is.
    pub state: CallState,
    /// When it was accepted (Unix ms).
    pub submitted_ms: u64,
    /// When the record last changed (Unix ms).
    pub updated_ms: u64,
    /// SHA-256 (hex) of the secret returned with the 202.
    pub secret_sha256: String,
    /// The Func, once an attempt has told (the Tron routes after the 202).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub func: Option<String>,
    /// The request line, for listings.
    pub method: String,
    /// The request's host.
    pub host: String,
    /// The request's path.
    pub path: String,
    /// Where the outcome is POSTed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// The `Idempotency-Key` it was submitted with (freed if it is
    /// withdrawn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Outcomes so far, in order.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The last answer, once final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CallResult>,
    /// Why it failed or was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it is kept once final, ms.
    pub retention_ms: u64,
    /// The request envelope of its first attempt (JSON), re-published by
    /// retries and redrives.
    pub request: String,
    /// The delay scheduled before the attempt now waiting, ms.
    #[serde(default)]
    pub next_delay_ms: u64,
    /// When the running attempt started (Unix ms), while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since_ms: Option<u64>,
    /// The delivery of the outcome to `callback_url`, once final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<callbacks::Callback>,
    /// For a pipeline's asynchronous phase: each step's attempts, in the
    /// order they were noted (without their requests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepNote>,
}

/// What a client may see of a call: everything but the request; the
/// answer only to the holder of its secret (or an operator's token).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallView<'a> {
    /// The call id.
    pub id: &'a str,
    /// Where it is.
    pub state: CallState,
    /// When it was accepted (Unix ms).
    pub submitted_ms: u64,
    /// When it last changed (Unix ms).
    pub updated_ms: u64,
    /// The Func, once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub func: Option<&'a str>,
    /// When the running attempt started (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running_since_ms: Option<u64>,
    /// Outcomes so far.
    pub attempts: &'a [Attempt],
    /// Why it failed or was dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// The answer (with the secret, once final).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a CallResult>,
    /// The callback's deliveries, for a call with a callback URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<&'a callbacks::Callback>,
    /// A pipeline's steps and their attempts.
    #[serde(skip_serializing_if = "<[StepNote]>::is_empty")]
    pub steps: &'a [StepNote],
}

impl CallRecord {
    /// The client's view; the answer only when `reveal`.
    pub fn view(&self, reveal: bool) -> CallView<'_> {
        CallView {
            id: &self.id,
            state: self.state,
            submitted_ms: self.submitted_ms,
            updated_ms: self.updated_ms,
            func: self.func.as_deref(),
            running_since_ms: self.running_since_ms,
            attempts: &self.attempts,
            reason: self.reason.as_deref(),
            result: self.result.as_ref().filter(|_| reveal),
            callback: self.callback.as_ref(),
            steps: &self.steps,
        }
    }

    /// Does `secret` open this call's answer? (Compared by digest, in
    /// constant time.)
    pub fn opens(&self, secret: &str) -> bool {
        let digest = sha256_hex(secret);
        digest
            .as_bytes()
            .ct_eq(self.secret_sha256.as_bytes())
            .into()
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a call operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The store refused or is unreachable.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A record that is not a call record (or an outcome that is not a
    /// response envelope).
    #[error("{0}")]
    Corrupt(String),
    /// No such call.
    #[error("no call {0}")]
    NotFound(String),
}

/// A call to accept.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    /// The envelope to publish (with `call_id` set).
    pub request: &'a Request<'a>,
    /// `request` encoded: what is published, and kept in the record.
    pub encoded: &'a [u8],
    /// The secret the client gets with the 202.
    pub secret: &'a str,
    /// `Idempotency-Key`, if sent, with how long it holds (ms).
    pub idempotency: Option<(&'a str, u64)>,
    /// How long the record is kept once final, ms (until the Func's
    /// policy says otherwise).
    pub retention_ms: u64,
    /// When the record expires even if never finished (the maximum age
    /// plus the retention), Unix ms.
    pub expires_ms: u64,
}

/// What [`Calls::submit`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Submitted {
    /// A new call: publish its request.
    New,
    /// The idempotency key names an earlier call: its id; publish nothing.
    Existing(String),
}

/// How an asynchronous pipeline ended (header `x-funcatron-flow-end`).
#[derive(Debug, Clone, PartialEq)]
pub enum FlowEnd {
    /// It ran to its end: succeeded or failed as its status says.
    Ended,
    /// A step ran out of attempts (why): dead-lettered, to be redriven
    /// from that step.
    Dead(String),
}

/// Most step notes one call's record keeps (retries included).
pub const MAX_STEP_NOTES: usize = 256;

/// What applying an outcome calls for next.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The call reached a final state.
    Finished(CallState),
    /// The call is final (now, or already: a redelivered outcome) and its
    /// callback is due: publish this job on `funcatron.callbacks`.
    Callback(callbacks::Job),
    /// Publish this request again after `delay_ms`.
    Retry {
        /// The next attempt's envelope.
        request: Bytes,
        /// How long to wait.
        delay_ms: u64,
    },
    /// This attempt's outcome was already recorded (a redelivery).
    Duplicate,
    /// The record is gone (purged, expired): nothing to do.
    Gone,
}

/// The call records of one store.
#[derive(Clone)]
pub struct Calls {
    store: AnyStore,
    /// Which key signs callbacks (the operator's choice, one per node).
    key_scope: callbacks::KeyScope,
}

fn decode(rec: &Record) -> Result<CallRecord, CallError> {
    serde_json::from_slice(&rec.value)
        .map_err(|e| CallError::Corrupt(format!("call record {}: {e}", rec.key)))
}

fn encode(call: &CallRecord, template: &Record) -> Record {
    let expires = if call.state.is_final() {
        call.updated_ms.saturating_add(call.retention_ms)
    } else {
        template.expires_ms
    };
    Record::new(COLLECTION, call.id.clone())
        .with_partition(call.func.clone().unwrap_or_default())
        .with_status(call.state.as_str())
        .with_value(serde_json::to_vec(call).unwrap_or_default())
        .expiring_at(expires)
}

impl Calls {
    /// Call records in `store`.
    pub fn new(store: AnyStore) -> Self {
        Calls {
            store,
            key_scope: callbacks::KeyScope::default(),
        }
    }

    /// Sign callbacks with a key of this scope (a key per Func by
    /// default).
    pub fn with_key_scope(mut self, scope: callbacks::KeyScope) -> Self {
        self.key_scope = scope;
        self
    }

    /// Which key signs callbacks.
    pub fn key_scope(&self) -> callbacks::KeyScope {
        self.key_scope
    }

    /// The store.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Record a new call as queued (before it is published), or find the
    /// earlier call its idempotency key names.
    pub async fn submit(&self, s: Submission<'_>) -> Result<Submitted, CallError> {
        let req = s.request;
        let id = req.call_id.as_deref().unwrap_or_default().to_owned();
        let now = funcatron_store::now_ms();
        if let Some((key, window_ms)) = s.idempotency {
            let idem = Record::new(IDEMPOTENCY, idempotency_key(&req.host, key))
                .with_value(id.clone().into_bytes())
                .expiring_at(now.saturating_add(window_ms));
            if let Some(first) = self.claim_key(&idem).await? {
                return Ok(Submitted::Existing(first));
            }
        }
        let call = CallRecord {
            id: id.clone(),
            state: CallState::Queued,
            submitted_ms: req.submitted_ms.unwrap_or(now),
            updated_ms: now,
            secret_sha256: sha256_hex(s.secret),
            func: None,
            method: req.method.to_string(),
            host: req.host.to_string(),
            path: req.path.to_string(),
            callback_url: req.callback_url.as_deref().map(str::to_owned),
            idempotency_key: s.idempotency.map(|(k, _)| k.to_owned()),
            attempts: Vec::new(),
            result: None,
            reason: None,
            retention_ms: s.retention_ms,
            request: String::from_utf8_lossy(s.encoded).into_owned(),
            next_delay_ms: 0,
            running_since_ms: None,
            callback: None,
            steps: Vec::new(),
        };
        let template = Record::new(COLLECTION, id.clone()).expiring_at(s.expires_ms);
        if let Err(e) = self.store.insert(&encode(&call, &template)).await {
            // The key must not name a call that was never recorded.
            let _ = self
                .release_key(&req.host, s.idempotency.map(|k| k.0), &id)
                .await;
            return Err(e.into());
        }
        Ok(Submitted::New)
    }

    /// Take an idempotency key for a new call, or return the call it
    /// names. A key naming a call with no record (withdrawn, or purged)
    /// is taken over: a repeat after a refusal must not get a dead id.
    async fn claim_key(&self, idem: &Record) -> Result<Option<String>, CallError> {
        for _ in 0..3 {
            match self.store.insert(idem).await {
                Ok(_) => return Ok(None),
                Err(StoreError::Exists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let Some(held) = self.store.get(IDEMPOTENCY, &idem.key).await? else {
                continue; // expired meanwhile: take it
            };
            let first = String::from_utf8_lossy(&held.value).into_owned();
            if self.store.get(COLLECTION, &first).await?.is_some() {
                return Ok(Some(first));
            }
            match self.store.replace(idem, held.revision).await {
                Ok(_) => return Ok(None),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CallError::Corrupt(format!(
            "idempotency key {} keeps changing",
            idem.key
        )))
    }

    /// Free idempotency key `key` of `host` if it still names call `id`.
    async fn release_key(&self, host: &str, key: Option<&str>, id: &str) -> Result<(), CallError> {
        let Some(key) = key else { return Ok(()) };
        let k = idempotency_key(host, key);
        if let Some(held) = self.store.get(IDEMPOTENCY, &k).await? {
            if held.value == id.as_bytes() {
                self.store.delete(IDEMPOTENCY, &k).await?;
            }
        }
        Ok(())
    }

    /// Forget a call whose request could not be published (the client
    /// got an error, not a 202), and free its idempotency key, so that
    /// the client's repeat is a new call.
    pub async fn withdraw(&self, id: &str) -> Result<(), CallError> {
        if let Some(rec) = self.store.get(COLLECTION, id).await? {
            let call = decode(&rec)?;
            if let Some(key) = call.idempotency_key.as_deref() {
                self.release_key(&call.host, Some(key), id).await?;
            }
        }
        self.store.delete(COLLECTION, id).await?;
        Ok(())
    }

    /// A call's record.
    pub async fn get(&self, id: &str) -> Result<Option<CallRecord>, CallError> {
        match self.store.get(COLLECTION, id).await? {
            Some(r) => Ok(Some(decode(&r)?)),
            None => Ok(None),
        }
    }

    /// Calls of `func` in `state`, by id, `limit` at most after `after`.
    pub async fn list(
        &self,
        func: &str,
        state: CallState,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CallRecord>, CallError> {
        let mut q = Query::new(COLLECTION)
            .partition(func)
            .status(state.as_str())
            .limit(limit);
        if let Some(a) = after {
            q = q.after(a);
        }
        self.store.list(&q).await?.iter().map(decode).collect()
    }

    /// Calls in `state` (queued or running), of every Func, by id, `limit`
    /// at most after `after`.
    pub async fn waiting(
        &self,
        state: CallState,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CallRecord>, CallError> {
        let mut q = Query::new(COLLECTION).status(state.as_str()).limit(limit);
        if let Some(a) = after {
            q = q.after(a);
        }
        self.store.list(&q).await?.iter().map(decode).collect()
    }

    /// Record one attempt's outcome (`response`, from the Func `func`
    /// under `policy`) and say what comes next; `jitter` (0..1) spreads
    /// retries. Safe to repeat: an attempt already recorded is a
    /// [`Applied::Duplicate`].
    pub async fn apply_outcome(
        &self,
        response: &Response<'_>,
        func: Option<&str>,
        policy: &Resolved,
        jitter: f64,
    ) -> Result<Applied, CallError> {
        self.apply_outcome_of(response, func, policy, jitter, None)
            .await
    }

    /// [`Calls::apply_outcome`] for the outcome of an asynchronous
    /// pipeline: its steps were retried already (each by its Func's
    /// policy), so the flow is final as `end` says: as its status says
    /// ([`FlowEnd::Ended`]), or dead-lettered ([`FlowEnd::Dead`], why).
    pub async fn apply_flow_end(
        &self,
        response: &Response<'_>,
        func: Option<&str>,
        policy: &Resolved,
        end: FlowEnd,
    ) -> Result<Applied, CallError> {
        self.apply_outcome_of(response, func, policy, 0.0, Some(end))
            .await
    }

    async fn apply_outcome_of(
        &self,
        response: &Response<'_>,
        func: Option<&str>,
        policy: &Resolved,
        jitter: f64,
        end: Option<FlowEnd>,
    ) -> Result<Applied, CallError> {
        let id = response
            .call_id
            .as_deref()
            .ok_or_else(|| CallError::Corrupt("an outcome without a call_id".into()))?;
        loop {
            let Some(rec) = self.store.get(COLLECTION, id).await? else {
                return Ok(Applied::Gone);
            };
            let mut call = decode(&rec)?;
            // A flow's attempts are its steps'; the flow's own outcome is
            // the call's next attempt.
            let n = match end {
                Some(_) if call.state.is_final() => call.attempts.len() as u32,
                Some(_) => call.attempts.len() as u32 + 1,
                None => response.attempt.unwrap_or(1),
            };
            if !call.state.is_final() && call.attempts.last().is_some_and(|a| a.n == n) {
                // Recorded, but the retry's publish may not have happened
                // (a crash before the outcome was acknowledged): again.
                return Ok(Applied::Retry {
                    request: next_request(&call.request, n + 1, call.next_delay_ms, None)?,
                    delay_ms: call.next_delay_ms,
                });
            }
            if call.state.is_final() || call.attempts.iter().any(|a| a.n >= n) {
                // A callback whose job may not have been published yet (a
                // crash before this outcome's acknowledgement): again.
                return Ok(callbacks::due(&call).map_or(Applied::Duplicate, Applied::Callback));
            }
            let now = funcatron_store::now_ms();
            let step = match &end {
                Some(FlowEnd::Ended) => Step::Done,
                Some(FlowEnd::Dead(why)) => Step::DeadLetter(why.clone()),
                None => next_step(
                    policy,
                    response.status,
                    n,
                    now.saturating_sub(call.submitted_ms),
                    jitter,
                ),
            };
            let applied = record_attempt(&mut call, response, n, func, policy, step, now)?;
            match self.store.replace(&encode(&call, &rec), rec.revision).await {
                Ok(_) => return Ok(applied),
                // Another Tron moved the record: read it again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Note a step of an asynchronous pipeline (once per step and
    /// attempt: a note delivered again changes nothing). A failed
    /// attempt's request becomes the call's request, so a redrive of the
    /// call starts again from that step. Returns whether it was new.
    pub async fn apply_step(&self, note: &StepNote) -> Result<bool, CallError> {
        loop {
            let Some(rec) = self.store.get(COLLECTION, &note.call_id).await? else {
                return Ok(false);
            };
            let mut call = decode(&rec)?;
            let seen = call
                .steps
                .iter()
                .any(|s| s.step == note.step && s.attempt == note.attempt && s.func == note.func);
            if seen || call.steps.len() >= MAX_STEP_NOTES {
                return Ok(false);
            }
            let mut kept = note.clone();
            if let Some(request) = kept.request.take() {
                call.request = request;
            }
            call.steps.push(kept);
            call.updated_ms = funcatron_store::now_ms();
            match self.store.replace(&encode(&call, &rec), rec.revision).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A Runner started attempt `n` of call `id` (of `func`) at
    /// `started_ms`: the call is running, unless that attempt's outcome
    /// is already recorded (the notice came late) or the call is final.
    /// The notice is advisory: nothing depends on it but what a client
    /// sees.
    pub async fn apply_started(
        &self,
        id: &str,
        n: u32,
        func: Option<&str>,
        started_ms: u64,
    ) -> Result<bool, CallError> {
        loop {
            let Some(rec) = self.store.get(COLLECTION, id).await? else {
                return Ok(false);
            };
            let mut call = decode(&rec)?;
            if call.state.is_final() || call.attempts.iter().any(|a| a.n >= n) {
                return Ok(false);
            }
            call.state = CallState::Running;
            call.running_since_ms = Some(started_ms);
            if call.func.is_none() {
                call.func = func.map(str::to_owned);
            }
            call.updated_ms = funcatron_store::now_ms();
            match self.store.replace(&encode(&call, &rec), rec.revision).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Queue a dead-lettered (or failed) call again from its first
    /// attempt: its record is queued and the request to publish returned.
    pub async fn redrive(&self, id: &str) -> Result<Bytes, CallError> {
        loop {
            let Some(rec) = self.store.get(COLLECTION, id).await? else {
                return Err(CallError::NotFound(id.to_owned()));
            };
            let mut call = decode(&rec)?;
            if !call.state.is_final() {
                return Err(CallError::Corrupt(format!("call {id} is still queued")));
            }
            let now = funcatron_store::now_ms();
            call.state = CallState::Queued;
            call.updated_ms = now;
            call.attempts.clear();
            call.result = None;
            call.reason = None;
            call.next_delay_ms = 0;
            call.submitted_ms = now;
            call.callback = None;
            call.steps.clear();
            let request = next_request(&call.request, 1, 0, Some(now))?;
            let mut template = rec.clone();
            template.expires_ms = 0;
            match self
                .store
                .replace(&encode(&call, &template), rec.revision)
                .await
            {
                Ok(_) => {
                    metrics::counter!("calls_redriven_total").increment(1);
                    return Ok(request);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Delete a call's record; false when there was none.
    pub async fn purge(&self, id: &str) -> Result<bool, CallError> {
        Ok(self.store.delete(COLLECTION, id).await?)
    }
}

/// The store key of an idempotency key: per host, since keys are chosen
/// by clients of different APIs.
fn idempotency_key(host: &str, key: &str) -> String {
    let host = host
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    format!("{host} {key}")
}

/// Add the attempt and move the call as `step` says.
fn record_attempt(
    call: &mut CallRecord,
    response: &Response<'_>,
    n: u32,
    func: Option<&str>,
    policy: &Resolved,
    step: Step,
    now: u64,
) -> Result<Applied, CallError> {
    let delay_ms = std::mem::take(&mut call.next_delay_ms);
    call.running_since_ms = None;
    call.attempts.push(Attempt {
        n,
        finished_ms: now,
        status: response.status,
        error: error_code(response),
        exec_ms: response.timings.exec_ms,
        delay_ms,
    });
    if let Some(f) = func {
        call.func = Some(f.to_owned());
    }
    call.updated_ms = now;
    call.retention_ms = policy.retention_ms;
    let result = || CallResult {
        status: response.status,
        headers: response
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: response.body.to_string(),
        body_base64: response.body_base64,
    };
    Ok(match step {
        Step::Done => {
            call.state = if response.status < 400 {
                CallState::Succeeded
            } else {
                CallState::Failed
            };
            if call.state == CallState::Failed {
                call.reason = Some(format!("attempt {n} answered {}", response.status));
            }
            call.result = Some(result());
            metrics::counter!("calls_finished_total", "state" => call.state.as_str()).increment(1);
            callbacks::arm(call, policy)
        }
        Step::DeadLetter(why) => {
            call.state = CallState::DeadLettered;
            call.reason = Some(why);
            call.result = Some(result());
            metrics::counter!("calls_dead_lettered_total").increment(1);
            callbacks::arm(call, policy)
        }
        Step::Retry { attempt, delay_ms } => {
            metrics::counter!("calls_retried_total").increment(1);
            call.state = CallState::Queued;
            call.next_delay_ms = delay_ms;
            Applied::Retry {
                request: next_request(&call.request, attempt, delay_ms, None)?,
                delay_ms,
            }
        }
    })
}

fn error_code(response: &Response<'_>) -> Option<String> {
    if response.status < 400 {
        return None;
    }
    let is_json = response
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("application/json"));
    if !is_json {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&response.body)
        .ok()?
        .get("error")?
        .as_str()
        .map(str::to_owned)
}

/// The request envelope of attempt `attempt`, scheduled `delay_ms`
/// after now, from the first attempt's (`submitted` resets the call's
/// age, for a redrive).
pub(crate) fn next_request(
    first: &str,
    attempt: u32,
    delay_ms: u64,
    submitted: Option<u64>,
) -> Result<Bytes, CallError> {
    let mut req = Request::decode(first.as_bytes())
        .map_err(|e| CallError::Corrupt(format!("stored request: {e}")))?;
    req.retry_as(attempt, delay_ms);
    if let Some(s) = submitted {
        req.submitted_ms = Some(s);
    }
    req.reply_key = req.reply_key.take().map(|k| Cow::Owned(k.into_owned()));
    Ok(Bytes::from(req.encode()))
}

/// The message that publishes a stored request again (a retry, a
/// redrive, a requeue after a restart): persistent, and marked as a
/// pipeline's step when its envelope carries a flow's state, so the
/// Runner continues the flow (`x-funcatron-flow`).
pub fn request_message(payload: Bytes) -> funcatron_broker::Message {
    #[derive(serde::Deserialize)]
    struct Flow {
        #[serde(default)]
        flow: Option<serde::de::IgnoredAny>,
    }
    let is_flow = serde_json::from_slice::<Flow>(&payload).is_ok_and(|f| f.flow.is_some());
    funcatron_broker::Message {
        payload,
        headers: if is_flow {
            vec![(funcatron_control::headers::FLOW.to_owned(), "1".to_owned())]
        } else {
            Vec::new()
        },
        persistent: true,
        ttl_ms: None,
    }
}

/// Consume `queue` until `shutdown`, each delivery handled by `handle` on
/// a task of its own (at most `prefetch` at once, as the broker holds
/// back); those being handled finish first.
pub(crate) async fn consume_each<F, Fut>(
    broker: &funcatron_broker::AnyBroker,
    queue: &str,
    prefetch: u16,
    shutdown: tokio_util::sync::CancellationToken,
    handle: F,
) -> Result<(), funcatron_broker::BrokerError>
where
    F: Fn(funcatron_broker::Delivery) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use funcatron_broker::{Broker, ConsumeOptions, QueueKind};
    if let Err(e) = broker.declare(queue, QueueKind::Work).await {
        tracing::debug!(queue, error = %e, "queue declared once the broker is reachable");
    }
    let options = ConsumeOptions {
        prefetch,
        auto_ack: false,
    };
    let mut sub = broker.consume(queue, QueueKind::Work, options).await?;
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = sub.next() => match d { Some(d) => d, None => break },
        };
        tracker.spawn(handle(d));
    }
    drop(sub);
    tracker.close();
    tracker.wait().await;
    Ok(())
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("store", &self.store.kind())
            .field("key_scope", &self.key_scope)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::borrow::Cow;

    use funcatron_control::calls::AsyncPolicy;

    use super::*;

    /// Submit call `id` (with a callback URL, an idempotency key).
    async fn submit_call(
        calls: &Calls,
        id: &str,
        callback: Option<&str>,
        key: Option<&str>,
    ) -> Submitted {
        let req = Request {
            version: Cow::Borrowed("1.1"),
            id: Cow::Owned(format!("r-{id}")),
            host: Cow::Borrowed("shop.example"),
            deadline_ms: 4_000_000_000_000,
            method: Cow::Borrowed("POST"),
            path: Cow::Borrowed("/f"),
            is_async: true,
            call_id: Some(Cow::Owned(id.to_owned())),
            callback_url: callback.map(|c| Cow::Owned(c.to_owned())),
            attempt: Some(1),
            ..Request::default()
        };
        calls
            .submit(Submission {
                request: &req,
                encoded: &req.encode(),
                secret: "s",
                idempotency: key.map(|k| (k, 60_000)),
                retention_ms: 60_000,
                expires_ms: 4_000_000_000_000,
            })
            .await
            .unwrap()
    }

    fn outcome(id: &str, n: u32, status: u16) -> Response<'static> {
        let mut out = Response::error("r", status, "func_error", "x");
        out.call_id = Some(Cow::Owned(id.to_owned()));
        out.attempt = Some(n);
        out
    }

    async fn state(calls: &Calls, id: &str) -> CallRecord {
        calls.get(id).await.unwrap().unwrap()
    }

    /// Queued -> running (a start notice) -> queued again for a retry ->
    /// running -> succeeded; a notice arriving after its attempt's
    /// outcome changes nothing.
    #[tokio::test]
    async fn a_started_attempt_shows_running_until_its_outcome() {
        let calls = Calls::new(AnyStore::memory().unwrap());
        assert_eq!(submit_call(&calls, "c1", None, None).await, Submitted::New);
        let policy = AsyncPolicy::default().resolved().unwrap();
        assert_eq!(state(&calls, "c1").await.state, CallState::Queued);

        assert!(calls.apply_started("c1", 1, Some("f"), 7).await.unwrap());
        let c = state(&calls, "c1").await;
        assert_eq!((c.state, c.running_since_ms), (CallState::Running, Some(7)));
        assert_eq!(c.func.as_deref(), Some("f"));
        let listed = calls.waiting(CallState::Running, None, 10).await.unwrap();
        assert_eq!(listed.len(), 1);

        let applied = calls
            .apply_outcome(&outcome("c1", 1, 503), Some("f"), &policy, 0.0)
            .await
            .unwrap();
        assert!(matches!(applied, Applied::Retry { .. }), "{applied:?}");
        let c = state(&calls, "c1").await;
        assert_eq!((c.state, c.running_since_ms), (CallState::Queued, None));

        // Attempt 1's notice, late: nothing changes.
        assert!(!calls.apply_started("c1", 1, Some("f"), 8).await.unwrap());
        assert_eq!(state(&calls, "c1").await.state, CallState::Queued);

        assert!(calls.apply_started("c1", 2, Some("f"), 9).await.unwrap());
        let mut ok = outcome("c1", 2, 200);
        ok.body = Cow::Borrowed("fine");
        let applied = calls
            .apply_outcome(&ok, Some("f"), &policy, 0.0)
            .await
            .unwrap();
        assert_eq!(applied, Applied::Finished(CallState::Succeeded));
        let c = state(&calls, "c1").await;
        assert_eq!((c.state, c.running_since_ms), (CallState::Succeeded, None));
        // A notice after the end changes nothing either.
        assert!(!calls.apply_started("c1", 3, Some("f"), 10).await.unwrap());
        assert_eq!(state(&calls, "c1").await.state, CallState::Succeeded);
    }

    /// A call with a callback URL arms its callback when it finishes, and
    /// a redelivered outcome asks for the job again while it is pending.
    #[tokio::test]
    async fn a_final_call_with_a_callback_url_asks_for_its_job_until_delivered() {
        let calls = Calls::new(AnyStore::memory().unwrap());
        let hook = Some("https://example.com/hook");
        submit_call(&calls, "c2", hook, None).await;
        let policy = AsyncPolicy {
            callback_retries: Some(3),
            ..AsyncPolicy::default()
        }
        .resolved()
        .unwrap();
        let job = callbacks::Job {
            call_id: "c2".into(),
            n: 1,
        };
        let out = outcome("c2", 1, 404);
        let first = calls
            .apply_outcome(&out, Some("f"), &policy, 0.0)
            .await
            .unwrap();
        assert_eq!(first, Applied::Callback(job.clone()));
        let again = calls
            .apply_outcome(&out, Some("f"), &policy, 0.0)
            .await
            .unwrap();
        assert_eq!(again, Applied::Callback(job), "redelivered: the job again");
        let c = state(&calls, "c2").await;
        let cb = c.callback.unwrap();
        assert_eq!(cb.state, callbacks::CallbackState::Pending);
        assert_eq!(cb.max_deliveries, 4);
    }

    /// A call withdrawn after a failed publish frees its idempotency key:
    /// the client's repeat is a new call, not the dead id; so is a repeat
    /// after the first call's record was purged. A live call's key still
    /// names it.
    #[tokio::test]
    async fn a_withdrawn_call_frees_its_idempotency_key() {
        let calls = Calls::new(AnyStore::memory().unwrap());
        let submit = |id: &'static str| submit_call(&calls, id, None, Some("order-1"));
        assert_eq!(submit("c1").await, Submitted::New);
        calls.withdraw("c1").await.unwrap();
        assert_eq!(submit("c2").await, Submitted::New, "not the withdrawn c1");
        assert_eq!(submit("c3").await, Submitted::Existing("c2".into()));
        assert!(calls.purge("c2").await.unwrap());
        assert_eq!(submit("c4").await, Submitted::New, "not the purged c2");
        assert_eq!(submit("c5").await, Submitted::Existing("c4".into()));
    }
}

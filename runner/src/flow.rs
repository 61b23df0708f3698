//! Pipelines (flows) at the Runner: start a flow, and continue it after
//! each `apply` step's answer.
//!
//! Ingress -> the flow operation's Func queue -> **Runner: starts the
//! flow** (its request, checked like any request to that operation, is
//! the first data) -> `modify` and `callback` steps run here, `parallel`
//! branches are called and awaited here -> an `apply` step goes to
//! `funcatron.requests` naming its Func (a Tron routes it), carrying the
//! flow's state ([`FlowState`], signed) -> that Func's Runner answers it
//! and **continues the flow here** -> ... -> the Runner that ends it
//! replies to the ingress. So a flow holds no Runner while a Func it
//! applies runs, and needs no store: its state travels with it.
//!
//! A step that fails (an apply or branch answering non-2xx, a transform
//! raising, a callback not answering 2xx) runs `on_failure` with the
//! failure as its data, then `finally`; the caller gets the failing status
//! with `on_failure`'s answer (or a `flow_step_failed` error). `finally`
//! always runs last and its answer is not used. The serve loop
//! acknowledges a delivery only after what [`FlowEngine::next`] returns is
//! published: a Runner that dies mid-way leaves its step to run again.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_control::outbound::OutboundPolicy;
use funcatron_control::{headers, names};
use funcatron_envelope::flow::{Apply, FlowSpec, FlowState, Held, Parallel, Phase, Step};
use funcatron_envelope::{encode_body, now_ms, Request, Response};
use hmac::Mac as _;

use crate::chain::Next;
use crate::lua::LuaLimits;
use crate::replies::Replies;
use funcatron_control::calls::{next_step, Resolved, StepNote};
use funcatron_store::{AnyStore, Store as _};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Most bytes of a failing step's answer quoted in the flow's error.
const QUOTED_BODY: usize = 4 * 1024;

/// Longest a `callback` step waits for its receiver.
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a `parallel` step waits for its branches (less when the
/// request's deadline is sooner): an asynchronous call's deadline is
/// hours away.
const BRANCH_WAIT_MS: f64 = 60_000.0;

/// The step being continued is an attempt of a recorded asynchronous call
/// run by this Runner's version of the step's Func: its policy retries
/// the step, and its outcome headers go on the call's outcome.
pub(crate) struct AsyncPhase<'a> {
    /// The Func version's async policy.
    pub policy: &'a Resolved,
    /// `x-funcatron-func` and the policy, as on any outcome.
    pub outcome_headers: &'a [(String, String)],
}

/// What follows a flow's step: what to publish next, after `notes` (to
/// `funcatron.outcomes`: the steps of an asynchronous flow).
pub(crate) struct Advanced {
    pub next: Next,
    pub notes: Vec<Message>,
    /// The store keys of a flow that ended here: deleted once its answer
    /// is sent ([`FlowEngine::forget`]).
    pub cleanup: Vec<String>,
}

/// A step of the asynchronous phase answered `resp` (to `request`, whose
/// envelope is `raw`): its note, and the retry to publish (with its delay)
/// when its Func's policy retries it.
fn step_outcome(
    p: &AsyncPhase<'_>,
    req: &Request<'_>,
    resp: &Response<'_>,
    raw: &[u8],
    label: &str,
    func: &str,
) -> (StepNote, Option<(Message, u64)>) {
    let attempt = req.attempt.unwrap_or(1);
    let now = now_ms();
    let mut note = StepNote {
        call_id: req.call_id.as_deref().unwrap_or_default().to_owned(),
        step: label.to_owned(),
        func: func.to_owned(),
        attempt,
        status: resp.status,
        outcome: "done".into(),
        delay_ms: 0,
        exec_ms: resp.timings.exec_ms,
        finished_ms: now as u64,
        request: None,
    };
    if (200..300).contains(&resp.status) {
        return (note, None);
    }
    let age = (now as u64).saturating_sub(req.submitted_ms.unwrap_or(now as u64));
    match next_step(p.policy, resp.status, attempt, age, rand::random()) {
        funcatron_control::calls::Step::Retry { attempt, delay_ms } => {
            let mut again = req.clone();
            again.retry_as(attempt, delay_ms);
            note.outcome = "retry".into();
            note.delay_ms = delay_ms;
            tracing::info!(request_id = %req.id, call_id = %note.call_id, step = label, func, attempt, delay_ms, "flow step retried");
            let message = Message {
                payload: again.encode().into(),
                headers: vec![(headers::FLOW.to_owned(), "1".to_owned())],
                ttl_ms: None,
                persistent: true,
            };
            (note, Some((message, delay_ms)))
        }
        funcatron_control::calls::Step::DeadLetter(why) => {
            tracing::info!(request_id = %req.id, call_id = %note.call_id, step = label, func, reason = %why, "flow step out of attempts");
            note.outcome = "exhausted".into();
            note.request = Some(String::from_utf8_lossy(raw).into_owned());
            (note, None)
        }
        funcatron_control::calls::Step::Done => {
            note.outcome = "failed".into();
            note.request = Some(String::from_utf8_lossy(raw).into_owned());
            (note, None)
        }
    }
}

/// A step note as the message Trons apply.
fn note_message(note: &StepNote) -> Message {
    Message {
        payload: serde_json::to_vec(note).unwrap_or_default().into(),
        headers: vec![(headers::PHASE.to_owned(), headers::PHASE_STEP.to_owned())],
        ttl_ms: None,
        persistent: true,
    }
}

/// The outcome of an asynchronous flow: its answer, with the Func's
/// outcome headers and how the flow ended (`dead`: a step ran out of
/// attempts, why).
///
/// The call is the flow's: `x-funcatron-func` names the flow's Func (from
/// its name, `<func>/<operationId>`) when known, whichever step's Runner
/// ends it.
fn flow_outcome(
    p: &AsyncPhase<'_>,
    answer: Vec<u8>,
    dead: Option<&str>,
    flow: Option<&str>,
) -> Message {
    let mut headers = p.outcome_headers.to_vec();
    if let Some(func) = flow.and_then(|f| f.split('/').next()) {
        for (k, v) in &mut headers {
            if k == headers::FUNC {
                *v = func.to_owned();
            }
        }
    }
    match dead {
        Some(why) => {
            headers.push((
                headers::FLOW_END.to_owned(),
                headers::FLOW_END_DEAD.to_owned(),
            ));
            headers.push((headers::DEAD_REASON.to_owned(), why.to_owned()));
        }
        None => headers.push((
            headers::FLOW_END.to_owned(),
            headers::FLOW_END_OK.to_owned(),
        )),
    }
    Message {
        payload: answer.into(),
        headers,
        ttl_ms: None,
        persistent: true,
    }
}

/// The data passing from step to step.
#[derive(Debug, Clone)]
struct Data {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Data {
    fn json(v: &serde_json::Value) -> Data {
        Data {
            status: 200,
            content_type: Some("application/json".into()),
            body: v.to_string().into_bytes(),
        }
    }

    fn held(&self) -> Held {
        let (body, b64) = encode_body(&self.body);
        Held {
            status: self.status,
            content_type: self.content_type.clone(),
            body: body.into_owned(),
            body_base64: b64,
        }
    }

    /// The body as JSON when it is JSON, else as a string.
    fn as_value(&self) -> serde_json::Value {
        let text = String::from_utf8_lossy(&self.body[..self.body.len().min(QUOTED_BODY)]);
        serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text.into_owned()))
    }
}

/// What the flows of a Runner share: the key that signs their state, the
/// policy and client for callbacks, the limits of transforms and the
/// reply queue of parallel branches.
pub struct FlowEngine {
    key: Vec<u8>,
    http: reqwest::Client,
    outbound: OutboundPolicy,
    limits: LuaLimits,
    branches: tokio::sync::OnceCell<Replies>,
    values: Option<Values>,
}

/// Where a Runner keeps flows' large `set` values (`--flow-store`): a
/// store to open at first use, or one this process has open already
/// (`funcatron up`'s).
#[derive(Clone)]
pub enum FlowStore {
    /// `memory:`, a path or `postgres://...` ([`AnyStore::open`]).
    Url(String),
    /// An open store.
    Open(AnyStore),
}

impl std::fmt::Debug for FlowStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The URL may hold a password.
            FlowStore::Url(_) => f.write_str("FlowStore::Url(..)"),
            FlowStore::Open(s) => write!(f, "FlowStore::Open({s:?})"),
        }
    }
}

/// The default size (JSON bytes) from which a `set` value is kept in the
/// flow store rather than in the envelope.
pub const DEFAULT_INLINE_BYTES: usize = 64 * 1024;

/// The state store collection of flows' large values.
pub const VALUES: &str = "flow_values";

/// How long a large value outlives its flow's deadline if the flow never
/// ends (its Runners all gone): then the store expires it. In the
/// asynchronous phase a day more: a dead-lettered flow keeps its values
/// for a redrive as long as its record is kept by default.
const VALUE_GRACE_MS: u64 = 3_600_000;

/// The store of large values and the size from which a value goes there.
struct Values {
    source: FlowStore,
    opened: tokio::sync::OnceCell<AnyStore>,
    inline_bytes: usize,
}

impl Values {
    async fn store(&self) -> Result<&AnyStore, String> {
        self.opened
            .get_or_try_init(|| async {
                match &self.source {
                    FlowStore::Open(s) => Ok(s.clone()),
                    FlowStore::Url(u) => AnyStore::open(u).await.map_err(|e| e.to_string()),
                }
            })
            .await
    }
}

impl FlowEngine {
    /// An engine signing with a key derived from `secret` (the cluster's
    /// shared secret: every Runner of a flow must have the same), or a
    /// random key (flows then verify only within this process).
    pub fn new(secret: Option<&str>, outbound: OutboundPolicy, limits: LuaLimits) -> Arc<Self> {
        let key = match secret {
            Some(s) => {
                let mut mac = HmacSha256::new_from_slice(s.as_bytes()).expect("any key length");
                mac.update(b"funcatron flow state v1");
                mac.finalize().into_bytes().to_vec()
            }
            None => {
                use rand::RngCore as _;
                let mut k = vec![0u8; 32];
                rand::rng().fill_bytes(&mut k);
                k
            }
        };
        let http = outbound
            .client(reqwest::Client::builder().timeout(CALLBACK_TIMEOUT))
            .unwrap_or_default();
        Arc::new(FlowEngine {
            key,
            http,
            outbound,
            limits,
            branches: tokio::sync::OnceCell::new(),
            values: None,
        })
    }

    /// The same engine keeping `set` values whose JSON is longer than
    /// `inline_bytes` in `store` (every Runner of a flow needs the same
    /// store); without, every value travels in the envelope.
    pub fn with_values(
        secret: Option<&str>,
        outbound: OutboundPolicy,
        limits: LuaLimits,
        store: Option<FlowStore>,
        inline_bytes: usize,
    ) -> Arc<Self> {
        let mut engine = Arc::into_inner(Self::new(secret, outbound, limits)).expect("just made");
        engine.values = store.map(|source| Values {
            source,
            opened: tokio::sync::OnceCell::new(),
            inline_bytes,
        });
        Arc::new(engine)
    }

    /// Bring back the values `state` keeps in the store (before steps
    /// that read them run).
    async fn load_values(&self, state: &mut FlowState<'_>) -> Result<(), String> {
        if state.refs.is_empty() {
            return Ok(());
        }
        let values = self.values.as_ref().ok_or(
            "the flow keeps values in a state store this Runner has not got (--flow-store)",
        )?;
        let store = values.store().await?;
        for (name, key) in std::mem::take(&mut state.refs) {
            let rec = store
                .get(VALUES, &key)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("the flow's value {name:?} is gone from the state store"))?;
            let v = serde_json::from_slice(&rec.value).map_err(|e| e.to_string())?;
            state.vars.insert(name, v);
        }
        Ok(())
    }

    /// Move the values longer than the threshold into the store, keyed by
    /// the request id and their digest (a step run again writes the same
    /// keys). A value the store does not take stays inline.
    async fn keep_values(&self, id: &str, expires_ms: u64, state: &mut FlowState<'_>) {
        use sha2::Digest as _;
        let Some(values) = &self.values else {
            return;
        };
        let large: Vec<(String, Vec<u8>)> = state
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_vec(v).unwrap_or_default()))
            .filter(|(_, bytes)| bytes.len() > values.inline_bytes)
            .collect();
        if large.is_empty() {
            return;
        }
        let store = match values.store().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(request_id = %id, error = %e, "flow values kept inline: no state store");
                return;
            }
        };
        for (name, bytes) in large {
            let digest: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let key = format!("{id}/{digest}");
            let rec = funcatron_store::Record::new(VALUES, key.clone())
                .with_value(bytes)
                .expiring_at(expires_ms);
            match store.insert(&rec).await {
                Ok(_) | Err(funcatron_store::StoreError::Exists { .. }) => {
                    state.vars.remove(&name);
                    if !state.stored.contains(&key) {
                        state.stored.push(key.clone());
                    }
                    state.refs.insert(name, key);
                }
                Err(e) => {
                    tracing::warn!(request_id = %id, error = %e, "a flow value kept inline: the store refused it")
                }
            }
        }
    }

    /// Delete a finished flow's stored values (after its answer is sent).
    pub(crate) fn forget(self: &Arc<Self>, keys: Vec<String>) {
        if keys.is_empty() || self.values.is_none() {
            return;
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            let Some(values) = &engine.values else {
                return;
            };
            let Ok(store) = values.store().await else {
                return;
            };
            for key in keys {
                if let Err(e) = store.delete(VALUES, &key).await {
                    tracing::debug!(key, error = %e, "a flow value left to expire");
                }
            }
        });
    }

    fn mac(&self, id: &str, state: &FlowState<'_>) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("any key length");
        mac.update(&state.signed_bytes(id));
        mac
    }

    fn sign(&self, id: &str, state: &mut FlowState<'_>) {
        state.sig = Cow::Borrowed("");
        let sig = self.mac(id, state).finalize().into_bytes();
        state.sig = Cow::Owned(sig.iter().map(|b| format!("{b:02x}")).collect());
    }

    /// Does the state in this request envelope carry this engine's
    /// signature? (`false` when it has none or does not decode.)
    pub fn verify(&self, request: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct View<'a> {
            #[serde(borrow)]
            id: Cow<'a, str>,
            #[serde(borrow)]
            flow: Option<FlowState<'a>>,
        }
        let Ok(View {
            id,
            flow: Some(state),
        }) = serde_json::from_slice::<View<'_>>(request)
        else {
            return false;
        };
        let Some(sig) = hex(&state.sig) else {
            return false;
        };
        self.mac(&id, &state).verify_slice(&sig).is_ok()
    }

    /// What follows an answer: `request` (a flow's apply step, or with
    /// `start` the request to the flow operation `start` names) was
    /// answered `response`. `Err`: the envelopes do not decode.
    pub(crate) async fn next(
        &self,
        broker: &AnyBroker,
        request: &[u8],
        response: &[u8],
        start: Option<(&str, &FlowSpec)>,
        phase: Option<AsyncPhase<'_>>,
    ) -> Result<Advanced, String> {
        let req = Request::decode(request).map_err(|e| e.to_string())?;
        let resp = Response::decode(response).map_err(|e| e.to_string())?;
        let phase = phase.filter(|_| req.is_async && req.call_id.is_some());
        let mut notes = Vec::new();
        let mut cleanup = Vec::new();
        let next = self
            .next_of(
                broker,
                request,
                &req,
                &resp,
                response,
                start,
                phase.as_ref(),
                (&mut notes, &mut cleanup),
            )
            .await?;
        let next = match (next, &phase) {
            // Answered before the flow began (refused), or not a flow: the
            // call's outcome all the same.
            (Next::Reply(answer), Some(p)) => Next::Forward {
                queue: names::OUTCOMES.to_owned(),
                message: flow_outcome(p, answer, None, None),
            },
            (next, _) => next,
        };
        Ok(Advanced {
            next,
            notes,
            cleanup,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn next_of(
        &self,
        broker: &AnyBroker,
        request: &[u8],
        req: &Request<'_>,
        resp: &Response<'_>,
        response: &[u8],
        start: Option<(&str, &FlowSpec)>,
        phase: Option<&AsyncPhase<'_>>,
        (notes, cleanup): (&mut Vec<Message>, &mut Vec<String>),
    ) -> Result<Next, String> {
        let answered = Data {
            status: resp.status,
            content_type: resp
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.to_string()),
            body: resp
                .body_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default(),
        };
        let mut run = match (start, &req.flow) {
            (Some((name, spec)), _) => {
                if !(200..300).contains(&resp.status) {
                    // Refused before the flow began (auth, validation).
                    return Ok(Next::Reply(response.to_vec()));
                }
                Run {
                    state: FlowState {
                        name: Cow::Owned(name.to_owned()),
                        spec: Some(spec.clone()),
                        ..FlowState::default()
                    },
                    cursor: 0,
                    data: answered,
                }
            }
            (None, Some(state)) => {
                let mut run = Run {
                    state: state.to_owned_state(),
                    cursor: state.at as usize + 1,
                    data: answered,
                };
                if let Err(e) = self.load_values(&mut run.state).await {
                    tracing::warn!(request_id = %req.id, flow = %run.state.name, error = %e, "the flow's stored values cannot be read");
                    run.data = Data {
                        status: 503,
                        ..Data::json(&serde_json::json!({
                            "error": "flow_values_unavailable",
                            "message": e,
                        }))
                    };
                }
                let label = run.label(state.at as usize);
                let func = match run.step(state.at as usize) {
                    Some(Step::Apply(a)) => a.func.clone(),
                    _ => String::new(),
                };
                let ok = (200..300).contains(&run.data.status);
                if let Some(p) = phase {
                    // A step of the asynchronous phase: noted in the
                    // call's record; a failure retried by its Func's
                    // policy, from the broker.
                    let (note, retry) = step_outcome(p, req, resp, request, &label, &func);
                    let exhausted = note.outcome == "exhausted";
                    notes.push(note_message(&note));
                    if let Some((message, delay_ms)) = retry {
                        return Ok(Next::Retry {
                            queue: names::REQUESTS.to_owned(),
                            message,
                            delay_ms,
                        });
                    }
                    if exhausted {
                        run.state.dead = Some(format!("{label} ({func}) ran out of attempts"));
                    }
                }
                run.state
                    .timings
                    .push((label.clone(), resp.timings.exec_ms));
                if !ok {
                    let (status, data) = (run.data.status, run.data.clone());
                    run.fail(&req.id, &label, &func, status, &data);
                }
                run
            }
            (None, None) => return Ok(Next::Reply(response.to_vec())),
        };
        if req.deadline_ms as f64 <= now_ms() {
            return Ok(Next::Expired);
        }
        self.advance(broker, req, &mut run, phase, cleanup).await
    }

    /// Run steps here until one must be applied elsewhere or the flow ends.
    async fn advance(
        &self,
        broker: &AnyBroker,
        req: &Request<'_>,
        run: &mut Run,
        phase: Option<&AsyncPhase<'_>>,
        cleanup: &mut Vec<String>,
    ) -> Result<Next, String> {
        loop {
            let at = run.cursor;
            let label = run.label(at);
            let Some(step) = run.step(at).cloned() else {
                match run.end_of_phase() {
                    Some(held) => {
                        // A failed asynchronous flow keeps its values for
                        // a redrive (they expire with its record).
                        if phase.is_none() || held.status < 400 {
                            cleanup.append(&mut run.state.stored);
                        }
                        let answer = reply(req, &held, &run.state);
                        return Ok(match phase {
                            // The call's outcome, for a Tron to record.
                            Some(p) => Next::Forward {
                                queue: names::OUTCOMES.to_owned(),
                                message: flow_outcome(
                                    p,
                                    answer,
                                    run.state.dead.as_deref(),
                                    Some(&run.state.name),
                                ),
                            },
                            None => Next::Reply(answer),
                        });
                    }
                    None => continue,
                }
            };
            let started = Instant::now();
            let outcome = match &step {
                Step::Apply(a) => {
                    let grace = if phase.is_some() {
                        // Kept as long as a failed call's record.
                        VALUE_GRACE_MS + 24 * 3_600_000
                    } else {
                        VALUE_GRACE_MS
                    };
                    self.keep_values(
                        &req.id,
                        req.deadline_ms.saturating_add(grace),
                        &mut run.state,
                    )
                    .await;
                    return Ok(self.forward(req, run, a, at, phase.is_some()));
                }
                Step::Modify(src) => self.modify(src, run).await,
                Step::Callback(c) => self.callback(c, &run.data).await,
                Step::Parallel(p) => self.parallel(broker, req, p, &run.data).await,
            };
            run.state
                .timings
                .push((label.clone(), started.elapsed().as_secs_f64() * 1000.0));
            match outcome {
                Ok(Some(data)) => run.data = data,
                Ok(None) => {}
                Err((func, status, data)) => {
                    // The next phase starts at its first step.
                    run.fail(&req.id, &label, &func, status, &data);
                    continue;
                }
            }
            run.cursor += 1;
        }
    }

    /// The request of an `apply` step (`at` in the running phase): to a
    /// Tron, naming its Func, with the signed state.
    ///
    /// In the asynchronous phase (`in_async`: the request is an attempt of
    /// a recorded call) the step is a new call attempt of the same call,
    /// persistent, at its first attempt. A synchronous flow reaching a
    /// `mode: async` step goes to `funcatron.flow-phases` instead, where a
    /// Tron records the call, queues the step and answers the caller 202.
    fn forward(
        &self,
        req: &Request<'_>,
        run: &mut Run,
        a: &Apply,
        at: usize,
        in_async: bool,
    ) -> Next {
        run.state.at = at as u32;
        let mut state = run.state.clone();
        self.sign(&req.id, &mut state);
        let mut next = step_request(req, a, &run.data, Some(state));
        let headers = vec![(headers::FLOW.to_owned(), "1".to_owned())];
        if in_async {
            next.attempt = Some(1);
            next.delay_ms = 0;
            return Next::Forward {
                queue: names::REQUESTS.to_owned(),
                message: Message {
                    payload: next.encode().into(),
                    headers,
                    ttl_ms: None,
                    persistent: true,
                },
            };
        }
        let queue = if a.is_async() {
            tracing::info!(request_id = %req.id, flow = %run.state.name, step = %run.label(at), func = %a.func, "the flow's asynchronous phase starts");
            names::FLOW_PHASES
        } else {
            names::REQUESTS
        };
        Next::Forward {
            queue: queue.to_owned(),
            message: Message {
                payload: next.encode().into(),
                headers,
                ttl_ms: Some((req.deadline_ms as f64 - now_ms()).max(1.0) as u64),
                persistent: false,
            },
        }
    }

    async fn modify(&self, src: &str, run: &mut Run) -> StepResult {
        let (flow, src) = (run.state.name.to_string(), src.to_owned());
        let data = run.data.clone();
        let mut vars = std::mem::take(&mut run.state.vars);
        let limits = self.limits;
        let (out, vars) = tokio::task::spawn_blocking(move || {
            let out = crate::lua::transform(
                &flow,
                &src,
                &data.body,
                data.content_type.as_deref(),
                &mut vars,
                limits,
            );
            (out, vars)
        })
        .await
        .map_err(|e| failure("", 500, "flow_modify_failed", &e.to_string()))?;
        run.state.vars = vars;
        match out {
            Ok(t) => Ok(Some(Data {
                status: run.data.status,
                content_type: t.content_type,
                body: t.body,
            })),
            Err(why) => Err(failure("", 500, "flow_modify_failed", &why)),
        }
    }

    async fn callback(&self, c: &funcatron_envelope::flow::Callback, data: &Data) -> StepResult {
        let mut url = reqwest::Url::parse(&c.url)
            .map_err(|e| failure("", 502, "flow_callback_failed", &e.to_string()))?;
        if !c.query.is_empty() {
            url.query_pairs_mut().extend_pairs(c.query.iter());
        }
        self.outbound
            .check_url(url.as_str())
            .map_err(|e| failure("", 502, "flow_callback_refused", &e.to_string()))?;
        let mut r = self.http.post(url).body(data.body.clone());
        if let Some(ct) = &data.content_type {
            r = r.header("content-type", ct);
        }
        for (k, v) in &c.headers {
            r = r.header(k, v);
        }
        match r.send().await {
            Ok(resp) if resp.status().is_success() => Ok(None),
            Ok(resp) => Err(failure(
                "",
                502,
                "flow_callback_failed",
                &format!("{} answered {}", c.url, resp.status()),
            )),
            Err(e) => Err(failure("", 502, "flow_callback_failed", &e.to_string())),
        }
    }

    /// Call every branch with the data at once (each through a Tron, its
    /// answer to this Runner's branch queue) and join their answers.
    async fn parallel(
        &self,
        broker: &AnyBroker,
        req: &Request<'_>,
        p: &Parallel,
        data: &Data,
    ) -> StepResult {
        let branches = self
            .branches
            .get_or_try_init(|| start_branches(broker))
            .await
            .map_err(|e| failure("", 503, "flow_branches_unavailable", &e))?;
        let mut waits = Vec::new();
        for (name, a) in p.branches() {
            let key = funcatron_envelope::new_request_id();
            let rx = branches.wait(&key);
            let mut r = step_request(req, a, data, None);
            r.reply_to = Some(Cow::Borrowed(&branches.queue));
            r.reply_key = Some(Cow::Owned(key.clone()));
            // A branch is a synchronous request even in the asynchronous
            // phase: this step waits for it (and is retried as a whole).
            r.is_async = false;
            r.call_id = None;
            r.callback_url = None;
            r.attempt = None;
            r.submitted_ms = None;
            r.deadline_ms = r.deadline_ms.min((now_ms() + BRANCH_WAIT_MS) as u64);
            let published = broker
                .publish(names::REQUESTS, Message::new(r.encode()))
                .await;
            if let Err(e) = published {
                branches.forget(&key);
                return Err(failure(&a.func, 503, "broker_unavailable", &e.to_string()));
            }
            waits.push((name, a.func.clone(), key, rx));
        }
        let until = (req.deadline_ms as f64).min(now_ms() + BRANCH_WAIT_MS);
        let left = Duration::from_millis((until - now_ms()).max(0.0) as u64);
        let mut joined_list = Vec::new();
        let mut joined_map = serde_json::Map::new();
        for (name, func, key, rx) in waits {
            let got = tokio::time::timeout(left, rx).await;
            branches.forget(&key);
            let Ok(Ok(bytes)) = got else {
                return Err(failure(
                    &func,
                    504,
                    "flow_branch_timeout",
                    "no answer in time",
                ));
            };
            let resp = Response::decode(&bytes)
                .map_err(|e| failure(&func, 502, "malformed_reply", &e.to_string()))?;
            let d = Data {
                status: resp.status,
                content_type: None,
                body: resp
                    .body_bytes()
                    .map(|b| b.into_owned())
                    .unwrap_or_default(),
            };
            if !(200..300).contains(&resp.status) {
                return Err((func, resp.status, d));
            }
            match name {
                Some(n) => {
                    joined_map.insert(n.to_owned(), d.as_value());
                }
                None => joined_list.push(d.as_value()),
            }
        }
        Ok(Some(Data::json(&match p {
            Parallel::List(_) => serde_json::Value::Array(joined_list),
            Parallel::Named(_) => serde_json::Value::Object(joined_map),
        })))
    }
}

/// A step's outcome: new data (`None`: unchanged), or why it failed:
/// (Func, status, the answer or error).
type StepResult = Result<Option<Data>, (String, u16, Data)>;

fn failure(func: &str, status: u16, code: &str, message: &str) -> (String, u16, Data) {
    (
        func.to_owned(),
        status,
        Data::json(&serde_json::json!({ "error": code, "message": message })),
    )
}

/// Start consuming this Runner's reply queue of parallel branches: each
/// answer is a response envelope naming its `reply_key`.
async fn start_branches(broker: &AnyBroker) -> Result<Replies, String> {
    #[derive(serde::Deserialize)]
    struct Key {
        reply_key: Option<String>,
    }
    fn key_of(payload: &[u8]) -> Option<String> {
        serde_json::from_slice::<Key>(payload).ok()?.reply_key
    }
    Replies::start(broker, "flow", key_of)
        .await
        .map_err(|e| e.to_string())
}

/// The request a step makes of Func `a.func` with `data`, from the flow's
/// current request `req`: the caller's headers (credentials reach every
/// step), the step's own over them, the data's content type; through a
/// Tron by the Func's name (`x-funcatron-func`, the path below its base).
fn step_request<'a>(
    req: &Request<'a>,
    a: &Apply,
    data: &Data,
    state: Option<FlowState<'static>>,
) -> Request<'a> {
    let drop = |k: &str| {
        matches!(k, "content-type" | "content-length" | headers::FUNC)
            || a.headers.keys().any(|h| h.eq_ignore_ascii_case(k))
    };
    let mut hdrs: Vec<_> = req
        .headers
        .iter()
        .filter(|(k, _)| !drop(k))
        .cloned()
        .collect();
    for (k, v) in &a.headers {
        hdrs.push((Cow::Owned(k.to_ascii_lowercase()), Cow::Owned(v.clone())));
    }
    if let Some(ct) = &data.content_type {
        hdrs.push((Cow::Borrowed("content-type"), Cow::Owned(ct.clone())));
    }
    hdrs.push((Cow::Borrowed(headers::FUNC), Cow::Owned(a.func.clone())));
    let (body, body_base64) = encode_body(&data.body);
    Request {
        method: Cow::Owned(a.method.clone().unwrap_or_else(|| "POST".into())),
        path: Cow::Owned(a.path.clone().unwrap_or_else(|| "/".into())),
        query: Cow::Owned(
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(a.query.iter())
                .finish(),
        ),
        headers: hdrs,
        body: Cow::Owned(body.into_owned()),
        body_base64,
        sent_ms: now_ms(),
        flow: state,
        chain: None,
        ..req.clone()
    }
}

/// A flow being run on this Runner: its state, the step to run next in
/// the state's phase, and the current data.
struct Run {
    state: FlowState<'static>,
    cursor: usize,
    data: Data,
}

impl Run {
    fn spec(&self) -> Option<&FlowSpec> {
        self.state.spec.as_ref()
    }

    /// Step `i` of the running phase.
    fn step(&self, i: usize) -> Option<&Step> {
        let spec = self.spec()?;
        match self.state.phase {
            Phase::Steps => spec.steps.get(i),
            Phase::OnFailure => spec.on_failure.as_deref().filter(|_| i == 0),
            Phase::Finally => spec.finally.as_deref().filter(|_| i == 0),
        }
    }

    /// How logs, errors and `Server-Timing` name step `i`.
    fn label(&self, i: usize) -> String {
        match self.state.phase {
            Phase::Steps => format!("steps[{i}]"),
            Phase::OnFailure => "on_failure".into(),
            Phase::Finally => "finally".into(),
        }
    }

    /// The running phase is done: the answer for the caller when the
    /// flow is over, else `None` with the next phase set up.
    fn end_of_phase(&mut self) -> Option<Held> {
        let has_finally = self.spec().is_some_and(|s| s.finally.is_some());
        match self.state.phase {
            Phase::Steps if has_finally => {
                self.state.held = Some(self.data.held());
                self.begin_finally(true);
                None
            }
            Phase::Steps => Some(self.data.held()),
            Phase::OnFailure => {
                // `on_failure`'s answer is the body; the status stays the
                // failing step's.
                let status = self.state.held.as_ref().map_or(500, |h| h.status);
                let mut held = self.data.held();
                held.status = status;
                if has_finally {
                    self.state.held = Some(held);
                    self.begin_finally(false);
                    None
                } else {
                    Some(held)
                }
            }
            Phase::Finally => Some(self.state.held.clone().unwrap_or_default()),
        }
    }

    fn begin_finally(&mut self, ok: bool) {
        let status = self.state.held.as_ref().map_or(200, |h| h.status);
        self.state.phase = Phase::Finally;
        self.cursor = 0;
        self.data = Data::json(&serde_json::json!({ "ok": ok, "status": status }));
    }

    /// Step `label` (Func `func`, if any) failed with `status` and
    /// `answer`: set up `on_failure` or `finally`, or end the flow with
    /// the error (the cursor is left before the next phase's first step).
    fn fail(&mut self, id: &str, label: &str, func: &str, status: u16, answer: &Data) {
        let status = if status >= 400 { status } else { 502 };
        tracing::info!(request_id = %id, flow = %self.state.name, step = label, func, status, "flow step failed");
        let error = Data {
            status,
            ..Data::json(&serde_json::json!({
                "error": "flow_step_failed",
                "message": format!("{} {label}{} answered {status}", self.state.name,
                    if func.is_empty() { String::new() } else { format!(" ({func})") }),
                "request_id": id,
                "step": label,
                "func": func,
                "status": status,
                "answer": answer.as_value(),
            }))
        };
        let spec = self.spec().cloned().unwrap_or(FlowSpec {
            steps: Vec::new(),
            on_failure: None,
            finally: None,
        });
        match self.state.phase {
            Phase::Steps if spec.on_failure.is_some() => {
                self.state.held = Some(error.held());
                self.state.phase = Phase::OnFailure;
                self.data = error;
            }
            Phase::Steps | Phase::OnFailure if spec.finally.is_some() => {
                if self.state.phase == Phase::Steps {
                    self.state.held = Some(error.held());
                }
                self.begin_finally(false);
            }
            Phase::Steps => {
                self.state.held = Some(error.held());
                self.state.phase = Phase::Finally;
                self.state.spec = Some(FlowSpec {
                    finally: None,
                    ..spec
                });
            }
            Phase::OnFailure | Phase::Finally => {
                // The held answer stands; a failing `finally` is logged.
                self.state.phase = Phase::Finally;
                self.state.spec = Some(FlowSpec {
                    finally: None,
                    ..spec
                });
            }
        }
        self.cursor = 0;
    }
}

/// The caller's answer: `held`, with a `Server-Timing` entry per step.
fn reply(req: &Request<'_>, held: &Held, state: &FlowState<'_>) -> Vec<u8> {
    let mut headers = Vec::new();
    if let Some(ct) = &held.content_type {
        headers.push((Cow::Borrowed("content-type"), Cow::Owned(ct.clone())));
    }
    let timing = state
        .timings
        .iter()
        .map(|(label, ms)| format!("{};dur={ms:.3}", label.replace(['[', ']'], "")))
        .collect::<Vec<_>>()
        .join(", ");
    if !timing.is_empty() {
        headers.push((Cow::Borrowed("server-timing"), Cow::Owned(timing)));
    }
    Response {
        version: Cow::Borrowed(funcatron_envelope::VERSION),
        id: req.id.clone(),
        status: held.status,
        headers,
        body: Cow::Borrowed(&held.body),
        body_base64: held.body_base64,
        reply_key: req.reply_key.clone(),
        call_id: req.call_id.clone(),
        attempt: req.attempt,
        ..Default::default()
    }
    .encode()
}

/// Hex to bytes (`None`: not hex).
fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The flows of a bundle version: its flow operations' documents by route
/// key (`METHOD /template`), checked when the bundle loaded.
pub fn flows_of(b: &funcatron_bundle::Bundle) -> BTreeMap<String, Arc<FlowSpec>> {
    b.operations
        .iter()
        .filter_map(|op| {
            let spec = funcatron_bundle::openapi::flow_of(&b.doc, &op.method, &op.path)?.ok()?;
            Some((
                funcatron_bundle::validate::route_key(&op.method, &op.path),
                Arc::new(spec),
            ))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> LuaLimits {
        LuaLimits {
            timeout: Duration::from_millis(200),
            memory_bytes: 16 << 20,
        }
    }

    fn signed(engine: &FlowEngine, at: u32) -> Vec<u8> {
        let mut state = FlowState {
            name: Cow::Borrowed("p/x"),
            spec: Some(FlowSpec {
                steps: vec![Step::Modify("return data".into())],
                on_failure: None,
                finally: None,
            }),
            at,
            ..FlowState::default()
        };
        engine.sign("r1", &mut state);
        Request {
            version: Cow::Borrowed(funcatron_envelope::VERSION),
            id: Cow::Borrowed("r1"),
            flow: Some(state),
            ..Default::default()
        }
        .encode()
    }

    #[test]
    fn a_state_verifies_only_unaltered_and_under_the_same_key() {
        let a = FlowEngine::new(Some("cluster secret"), OutboundPolicy::default(), limits());
        let same = FlowEngine::new(Some("cluster secret"), OutboundPolicy::default(), limits());
        let other = FlowEngine::new(Some("another"), OutboundPolicy::default(), limits());
        let bytes = signed(&a, 0);
        assert!(a.verify(&bytes) && same.verify(&bytes));
        assert!(!other.verify(&bytes));
        // Moving the position, or another request id, breaks it.
        let text = String::from_utf8(bytes).unwrap();
        assert!(!a.verify(text.replace("\"at\":0", "\"at\":1").as_bytes()));
        assert!(!a.verify(text.replace("\"r1\"", "\"r2\"").as_bytes()));
        assert!(!a.verify(b"{\"id\":\"r1\"}"));
    }

    #[test]
    fn a_transform_sees_data_and_vars_and_returns_text_or_json() {
        let mut vars = BTreeMap::new();
        vars.insert("n".to_owned(), serde_json::json!(2));
        let t = crate::lua::transform(
            "p/x",
            "set('seen', data); return { twice = data:rep(get('n')) }",
            b"ab",
            Some("text/plain"),
            &mut vars,
            limits(),
        )
        .unwrap();
        assert_eq!(t.body, br#"{"twice":"abab"}"#);
        assert_eq!(t.content_type.as_deref(), Some("application/json"));
        assert_eq!(vars["seen"], "ab");
        let same =
            crate::lua::transform("p/x", "return nil", b"ab", None, &mut vars, limits()).unwrap();
        assert_eq!(same.body, b"ab");
        for (src, needle) in [
            ("while true do end", "past its limit"),
            ("return io.open('/etc/passwd')", "io"),
            ("return require('x')", "require"),
            ("return function() end", "not a string"),
        ] {
            let e = crate::lua::transform("p/x", src, b"", None, &mut vars, limits()).unwrap_err();
            assert!(e.contains(needle), "{src}: {e}");
        }
    }
}

//! Broker message headers Funcatron sets beside the envelope body.
//!
//! The router (the ingress routing at the edge, or a Tron) routes once
//! and records the outcome here (`funcatron_routes::Route::headers`, the
//! one function both use), so the Runner never parses Swagger paths again
//! and the envelope bytes travel unchanged.

/// Name of the Func (bundle) whose queue the message is on. Also a
/// request header, in the envelope's headers: an ingress sets it on a
/// call to `/function/<func>/<rest>` (or `/async-function/...`), with the
/// envelope's path `/<rest>`, and the Tron routes such a request to that
/// Func below its primary base path. A client's own is removed.
pub const FUNC: &str = "x-funcatron-func";
/// The Swagger `operationId` the request routed to.
pub const OPERATION: &str = "x-funcatron-operation";
/// The operation the request routed to as `METHOD /template` (upper-case
/// method, the document's path template relative to the server's base
/// path): what validation and security rules are keyed by, since an
/// `operationId` may name several operations (one handler).
pub const ROUTE: &str = "x-funcatron-route";
/// On an `OPTIONS` request to a path whose document declares no `options`
/// operation: the path's methods (`GET, POST`). The Runner answers it as a
/// CORS preflight (or 405 with these methods) without running the Func;
/// [`ROUTE`] is `OPTIONS /template` and [`OPERATION`] is empty.
pub const PREFLIGHT: &str = "x-funcatron-preflight";
/// Path parameters extracted by the Tron, as a JSON object of strings.
pub const PATH_PARAMS: &str = "x-funcatron-path-params";
/// When the request was routed onto its Func queue (Unix ms, with a
/// fraction): splits the time before the Runner into dispatch and queue
/// wait.
pub const DISPATCHED_MS: &str = "x-funcatron-dispatched-ms";
/// Header on a capture record: the capture it belongs to (the Func is in
/// [`FUNC`]), so a Tron files it without parsing it.
pub const CAPTURE: &str = "x-funcatron-capture";
/// Header on a dead-lettered message: why it was dead-lettered.
pub const DEAD_REASON: &str = "x-funcatron-dead-reason";
/// Header on a dead-lettered message: the queue it came from.
pub const DEAD_SOURCE: &str = "x-funcatron-dead-source";
/// On an asynchronous call's outcome: the async policy of the Func version
/// that ran it (JSON, `funcatron_control::calls::AsyncPolicy`), which the
/// Tron applying the outcome follows.
pub const ASYNC_POLICY: &str = "x-funcatron-async-policy";

/// On a message to `funcatron.outcomes`: what it is, when it is not an
/// outcome ([`PHASE_STARTED`]: a Runner started an attempt).
pub const PHASE: &str = "x-funcatron-phase";
/// [`PHASE`]: an async call's attempt started on a Runner.
pub const PHASE_STARTED: &str = "started";

/// On a request message in direct mode (the envelope's `direct`, value
/// `1`): only the head is queued. The Runner that takes it answers with a
/// one-time URL on its own HTTP listener instead of running the Func; the
/// ingress sends the body there and streams the answer back. Set by the
/// router (an ingress at the edge, or the Tron for a request the ingress
/// marked), so the Runner knows without decoding the envelope.
pub const DIRECT: &str = "x-funcatron-direct";

/// On a request message that is a stage of a chain (the envelope's
/// `chain`, value `1`): the Runner that answers it forwards a 2xx answer
/// to the next stage instead of replying (`docs/flows.md`). Set by
/// whoever publishes a stage, so the Runner knows without decoding.
pub const CHAIN: &str = "x-funcatron-chain";

/// On a request message that is an `apply` step of a pipeline (the
/// envelope's `flow`, value `1`): the Runner verifies the flow's signed
/// state before running the Func and continues the flow with its answer
/// (`docs/flows.md`). A Tron forwarding the request keeps it.
pub const FLOW: &str = "x-funcatron-flow";

/// [`PHASE`]: a note of one step of an asynchronous pipeline (body
/// `funcatron_calls::StepNote`): which step, its Func and attempt, how it
/// ended; for a failed attempt also the step's request, from which a
/// redrive starts again.
pub const PHASE_STEP: &str = "step";

/// On the outcome of an asynchronous pipeline (the answer of its last
/// step): how the flow ended, `ok` (as the status says, never retried as
/// a whole) or `dead` (a step ran out of attempts: the call is
/// dead-lettered, redriven from that step).
pub const FLOW_END: &str = "x-funcatron-flow-end";
/// [`FLOW_END`]: the flow ran to its end.
pub const FLOW_END_OK: &str = "ok";
/// [`FLOW_END`]: a step exhausted its attempts.
pub const FLOW_END_DEAD: &str = "dead";

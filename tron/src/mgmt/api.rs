//! The management API's request and response bodies, shared by the server
//! ([`super::router`]) and the CLI client (`funcatron bundle|func|status|...`).
//!
//! These types are the API's wire format: the OpenAPI document served at
//! `/v1/openapi.yaml` is generated from them ([`super::openapi`]). Where an
//! answer holds a registry type from [`funcatron_control::state`], that type
//! derives its own schema (the crate's `openapi` feature); the document test
//! checks real answers against the schemas.

use std::collections::BTreeMap;

use funcatron_control::state::{Capture, ClusterState, Event, FuncSettings, LogLevel, Upload};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Every error: `{"error": code, "message": text}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ApiError {
    /// A stable code: `unauthorized`, `no_func`, `conflict`, `too_large`, ...
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always true.
    pub ok: bool,
}

/// One operation of a bundle: method, path template, handler, and where
/// it is served when that is not the bundle's `bases`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RouteOperation {
    /// Upper-case HTTP method.
    pub method: String,
    /// Path template relative to the base path, e.g. `/pets/{petId}`.
    pub path: String,
    /// Names the handler.
    #[serde(rename = "operationId")]
    pub operation_id: String,
    /// Its own bases, when its path item or itself declares `servers`
    /// (they replace the bundle's `bases` for it); absent: the bundle's.
    /// Written like the bundle's `bases`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bases: Option<Vec<String>>,
}

/// Query of `POST /v1/bundles`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Names a bundle that does not name itself.
    pub name: Option<String>,
    /// Enable it at once.
    #[serde(default)]
    pub enable: bool,
}

/// `POST /v1/bundles` (201): the stored bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Uploaded {
    /// SHA-256 of the archive.
    pub sha: String,
    /// The Func's name.
    pub name: String,
    /// The bundle's content version (its queue suffix).
    pub version: String,
    /// `lua`, `python`, `node`, `java`, `exec`, ...
    pub runtime: String,
    /// The primary base's host (its variables at their defaults), if
    /// it names one; `bases` lists every base.
    pub host: Option<String>,
    /// The primary base's path (its variables at their defaults).
    #[serde(rename = "basePath")]
    pub base_path: String,
    /// Every base it is served on, the primary (`host` + `basePath`)
    /// first: each server and each enum value of its variables, written
    /// `api.example.com/v1` (`*/v1`: any host; `{name}`: a server
    /// variable, any text within its label or segment). An operation
    /// with its own servers lists its own. `invoke` takes one as `base`.
    #[serde(default)]
    pub bases: Vec<String>,
    /// Its operations.
    pub operations: Vec<RouteOperation>,
    /// Whether this upload is now the enabled version.
    pub enabled: bool,
}

/// The routes a Func's enabled version serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EffectiveRoutes {
    /// The runtime.
    pub runtime: String,
    /// The bundle's content version.
    pub version: String,
    /// The primary base's host, its variables at their defaults (`*`:
    /// any); `bases` lists every base.
    pub host: String,
    /// The primary base's path (its variables at their defaults).
    #[serde(rename = "basePath")]
    pub base_path: String,
    /// Every base it is served on, the primary (`host` + `basePath`)
    /// first: each server and each enum value of its variables, written
    /// `api.example.com/v1` (`*/v1`: any host; `{name}`: a server
    /// variable, any text within its label or segment). An operation
    /// with its own servers lists its own. `invoke` takes one as `base`.
    #[serde(default)]
    pub bases: Vec<String>,
    /// Its operations.
    pub operations: Vec<RouteOperation>,
}

/// The enabled version's bundle could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RoutesUnavailable {
    /// Why.
    pub error: String,
}

/// A Func's routes, or why they cannot be shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Routes {
    /// The routes.
    Effective(EffectiveRoutes),
    /// The bundle could not be read.
    Unavailable(RoutesUnavailable),
}

/// One Func in `GET /v1/funcs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FuncSummary {
    /// The Func.
    pub name: String,
    /// The enabled version (archive SHA-256), if any.
    pub enabled: Option<String>,
    /// How many versions were uploaded.
    pub uploads: usize,
    /// The enabled version's routes (null when disabled).
    pub routes: Option<Routes>,
    /// Why this Tron does not route the enabled version, if it does
    /// not: its bases conflict with a static bundle's (which is kept) or
    /// with another enabled Func's (both are refused), or it cannot be
    /// loaded. The reason names both bundles of a pair.
    #[serde(default)]
    pub refused: Option<String>,
}

/// `GET /v1/funcs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FuncList {
    /// The registry's revision.
    pub revision: u64,
    /// Every Func, by name.
    pub funcs: Vec<FuncSummary>,
}

/// `GET /v1/funcs/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FuncDetail {
    /// The Func.
    pub name: String,
    /// The enabled version (archive SHA-256), if any.
    pub enabled: Option<String>,
    /// Settings of the enabled version.
    pub settings: FuncSettings,
    /// Every uploaded version, oldest first.
    pub uploads: Vec<Upload>,
    /// The enabled version's routes (null when disabled).
    pub routes: Option<Routes>,
    /// Why this Tron does not route the enabled version, if it does
    /// not: its bases conflict with a static bundle's (which is kept) or
    /// with another enabled Func's (both are refused), or it cannot be
    /// loaded. The reason names both bundles of a pair.
    #[serde(default)]
    pub refused: Option<String>,
    /// The enabled version's triggers (`x-funcatron-triggers`), each with
    /// what it has done: `name`, `operation`, its declaration (`schedule`,
    /// `queue` or `store`), `fired`, `last_fired_ms` and a schedule's
    /// `last_tick_ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub triggers: Vec<serde_json::Value>,
}

/// `GET /v1/funcs/{name}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FuncHistory {
    /// The Func.
    pub name: String,
    /// Enables, disables and rollbacks, oldest first.
    pub history: Vec<Event>,
    /// Every uploaded version, oldest first.
    pub uploads: Vec<Upload>,
}

/// Body of `POST /v1/funcs/{name}/enable` (optional, as are its fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnableRequest {
    /// The version; default the latest upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha: Option<String>,
    /// Settings; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<FuncSettings>,
}

/// `POST /v1/funcs/{name}/enable|disable|rollback`: what is enabled now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Enabled {
    /// The Func.
    pub name: String,
    /// The enabled version (null after `disable`).
    pub enabled: Option<String>,
    /// The registry's revision after the change.
    pub revision: u64,
}

/// Body of `POST /v1/funcs/{name}/invoke`: the HTTP request to make.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    /// HTTP method (default `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Which of the Func's bases to call, written as its routes show it
    /// (`bases`, or an operation's own); default the primary (`host` +
    /// `basePath`, its variables at their defaults). Another base's
    /// variables are replaced by their names (a port's by `80`), any
    /// host by `localhost`; a `host` header in `headers` replaces the
    /// Host. An unknown base is a 400 `unknown_base` listing the Func's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Path below the base's path (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Query string, without `?`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Body of `POST /v1/chain`: a chain of Funcs to run (`docs/flows.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChainRequest {
    /// The expression, e.g. `sed e=s/hate/love/ | to-upper`.
    pub chain: String,
    /// Request headers (the first stage's `Content-Type`, credentials
    /// every stage checks).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The first stage's request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Body of `POST /v1/funcs/{name}/capture` (optional, as are its fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Fraction sampled (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
    /// Stop after this many pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Stop after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_ms: Option<u64>,
    /// Header names to redact besides the default ones.
    #[serde(default)]
    pub redact: Vec<String>,
    /// Query parameter names to redact besides the operator's
    /// (`--redact-query`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_query: Vec<String>,
    /// JSON body field names to redact besides the operator's
    /// (`--redact-json-field`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact_json_fields: Vec<String>,
}

/// `POST /v1/funcs/{name}/capture`: the capture running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaptureStarted {
    /// The Func.
    pub name: String,
    /// The capture.
    pub capture: Option<Capture>,
    /// The registry's revision after the change.
    pub revision: u64,
}

/// `POST /v1/funcs/{name}/capture/stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaptureStopped {
    /// The Func.
    pub name: String,
    /// Always false.
    pub capturing: bool,
    /// The registry's revision after the change.
    pub revision: u64,
}

/// Body of `POST /v1/funcs/{name}/log-level`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogLevelRequest {
    /// `error`, `warn`, `info`, `debug`, `trace`, or `default` to reset.
    pub level: String,
    /// Reset after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_ms: Option<u64>,
}

/// `POST /v1/funcs/{name}/log-level`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLevelSet {
    /// The Func.
    pub name: String,
    /// The level set (null: back to the default).
    pub log_level: Option<LogLevel>,
    /// The registry's revision after the change.
    pub revision: u64,
}

/// Query of `GET /v1/funcs/{name}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines about this request.
    pub request_id: Option<String>,
    /// Keep the answer open and send new lines as they come.
    #[serde(default)]
    pub follow: bool,
}

/// One line of `GET /v1/funcs/{name}/logs` (JSON Lines), as Runners send
/// them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// When (Unix ms).
    #[serde(default)]
    pub at_ms: Option<u64>,
    /// The Func.
    #[serde(default)]
    pub func: String,
    /// Its version.
    #[serde(default)]
    pub version: Option<String>,
    /// The request it is about.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The Runner that sent it.
    #[serde(default)]
    pub runner: Option<String>,
    /// `stdout`, `stderr`, ...
    #[serde(default)]
    pub stream: Option<String>,
    /// The line.
    #[serde(default)]
    pub message: String,
}

/// `GET /v1/status`: load (and scaling) per Func. The registry and the
/// autoscaler build this body; these types describe it, and read it with
/// defaults for what is missing, so a client keeps working with a Tron
/// that sends less.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Status {
    /// By Func name.
    pub funcs: BTreeMap<String, FuncStatus>,
    /// The autoscaler, when this Tron runs one.
    pub autoscaler: Option<AutoscalerStatus>,
}

/// One Func in [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct FuncStatus {
    /// Its queue.
    pub queue: String,
    /// Messages waiting (null when the broker cannot tell).
    pub ready: Option<u64>,
    /// Consumers attached (null when the broker cannot tell).
    pub consumers: Option<u64>,
    /// Requests routed to it per second.
    pub arrival_per_s: f64,
    /// Mean time Runners spend on a request, lately.
    pub service_ms: Option<f64>,
    /// Requests Runners are handling now.
    pub in_flight: u64,
    /// Requests Runners handled since they started.
    pub served: u64,
    /// Runners heard from.
    pub runners: u32,
    /// The autoscaler's view of it, when there is one.
    pub scaling: Option<Scaling>,
}

/// The autoscaler in [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct AutoscalerStatus {
    /// The substrate Runners are started on.
    pub substrate: String,
    /// How often it decides.
    pub tick_ms: u64,
    /// Its view, by Func.
    #[serde(default)]
    pub funcs: BTreeMap<String, Scaling>,
}

/// What the autoscaler sees and decided for one Func.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Scaling {
    /// Its queue.
    pub queue: String,
    /// Messages waiting.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Where `unacked` comes from: `broker` or `runners`.
    pub unacked_source: String,
    /// Consumers attached.
    pub consumers: u64,
    /// Requests per second.
    pub arrival_per_s: f64,
    /// Mean service time.
    pub service_ms: Option<f64>,
    /// Requests in flight on the Runners.
    pub in_flight: u64,
    /// Runners heard from.
    pub runners_heard: u32,
    /// Runners the rule asks for.
    pub desired: u32,
    /// Runners after hysteresis and bounds.
    pub target: u32,
    /// Runners asked of the substrate.
    pub requested: u32,
    /// Runners the substrate runs.
    pub running: u32,
    /// Fewest Runners.
    pub min: u32,
    /// Most Runners.
    pub max: u32,
    /// Requests one Runner should handle at once.
    pub target_concurrency: f64,
    /// Why the target is what it is.
    pub last_reason: String,
    /// The last decisions, oldest first.
    pub decisions: Vec<Decision>,
    /// The substrate's last error.
    pub error: Option<String>,
}

/// One scaling decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Decision {
    /// When (Unix ms).
    pub at_ms: u64,
    /// Runners before.
    pub from: u32,
    /// Runners after.
    pub to: u32,
    /// Why.
    pub reason: String,
}

/// `GET /v1/state`: the whole registry, as the registry keeps it (its
/// schema is derived from it).
pub type State = ClusterState;

//! The Tron: the dispatcher between the request firehose and the Func queues.
//!
//! ingress -> `funcatron.requests` -> **Tron** -> `funcatron.func.<name>.<version>` ->
//! Runner. A Tron decodes only the routing fields of each request envelope
//! ([`funcatron_envelope::RouteView`]), finds the Func by host + basePath and
//! the operation by path template + method ([`routes`]), and forwards the
//! envelope bytes untouched with the routing outcome in message headers. It
//! answers 404/405 itself, dead-letters what it cannot decode, and
//! acknowledges a request only after its forward (or answer) is confirmed.
//! Any number of Trons may consume the same request queue.
//!
//! A request whose envelope names its Func (header `x-funcatron-func`,
//! set by an ingress for `/function/<func>/<rest>`) is routed among that
//! Func's routes only, `<rest>` below its primary base path. Every Tron
//! broadcasts an [`admission`] table so ingresses refuse async calls a
//! Func has no room for, or does not take, before queueing them.
//!
//! A Tron also keeps the bundle registry ([`registry`], [`mgmt`]) and may
//! run the [`autoscale`]r, which starts and stops Runners per Func.

#![warn(clippy::too_many_lines)]

pub mod admission;
pub mod args;
pub mod autoscale;
pub mod context;
pub mod demand;
pub mod dispatch;
pub mod heartbeats;
pub mod mgmt;
pub mod node;
pub mod queue_triggers;
pub mod registry;
pub mod schedules;
pub use funcatron_routes as routes;
pub mod status;
pub mod store_rpc;
pub mod telemetry;
pub mod triggers;

pub use context::TronContext;
pub use dispatch::{declare_routes, TronOptions};
pub use node::{Management, NodeError, TronNode};
pub use routes::{servable, RouteError, RouteOutcome, RouteTable};

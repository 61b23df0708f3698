#![warn(clippy::too_many_lines)]
//! The Runner: the end of the request path.
//!
//! Tron -> `funcatron.func.<name>.<version>` -> **Runner** -> reply queue -> ingress.
//! A Runner consumes the queue of every Func it serves, hands each request
//! to the Func's runtime ([`runtime::Prepared`]: Lua in-process, see [`lua`];
//! Python, Node.js and Java in warm worker processes, see [`worker`];
//! any executable, one process per call, see [`exec`]; worker and exec
//! processes each in a sandbox, see [`sandbox`]), publishes the response envelope to the request's reply queue,
//! and only then acknowledges the request. Messages it cannot decode go to
//! the dead-letter queue; expired requests are skipped. Direct requests
//! (large bodies, streamed answers) are claimed over HTTP on the Runner's
//! own listener instead, see [`direct`]. Funcs reach the document store
//! through their Runner, see [`store`].

pub mod args;
mod chain;
pub mod direct;
pub mod error;
pub mod exec;
pub mod flow;
pub mod follow;
pub mod invoke;
pub mod lua;
pub mod node;
pub mod observe;
mod replies;
pub mod runtime;
pub mod sandbox;
pub mod serve;
pub mod store;
pub mod worker;

pub use node::{RunnerNode, RunnerShared};
pub use serve::{check, default_cache_dir, resolve_env, RunnerOptions};

//! The runtime seam: prepare a bundle version once, call it many times.
//!
//! The serve loop ([`crate::serve`]) owns everything around a call (decode,
//! expiry, checks, the deadline, the response envelope, publish, ack,
//! capture); a runtime only prepares a version and answers one
//! [`FuncRequest`]. A Func version holds only the runtime its bundle names
//! ([`Prepared`], chosen by [`RuntimeKind`]).

use std::future::Future;
use std::time::Instant;

use funcatron_bundle::{Bundle, RuntimeKind};

use crate::error::PrepareError;
use crate::exec::ExecFunc;
use crate::invoke::{FuncRequest, FuncResponse, InvokeError};
use crate::lua::{LuaPool, LuaThreads};
use crate::observe::Observer;
use crate::sandbox::Isolation;
use crate::serve::RunnerOptions;
use crate::worker::WorkerPool;

/// What a runtime did with one call.
#[derive(Debug)]
pub struct Called {
    /// When the Func started (the invocation's timing starts here).
    pub started: Instant,
    /// Its answer or why there is none.
    pub result: Result<FuncResponse, InvokeError>,
}

impl Called {
    /// A call that starts now and ends with `result`.
    pub fn now(result: Result<FuncResponse, InvokeError>) -> Self {
        Called {
            started: Instant::now(),
            result,
        }
    }
}

/// One language runtime: a bundle version prepared once, then called.
pub trait Runtime: Sized + Send + Sync + 'static {
    /// Prepare `bundle` (its secrets already in its `env`).
    fn prepare(
        bundle: &Bundle,
        options: &RunnerOptions,
        observer: &Observer,
    ) -> impl Future<Output = Result<Self, PrepareError>> + Send;

    /// The longest a call may run, counted by the serve loop from its
    /// start; `u64::MAX` when the runtime counts it itself (from when the
    /// Func actually starts).
    fn max_time_ms(&self) -> u64;

    /// Answer one request.
    fn call(&self, req: FuncRequest<'_>) -> impl Future<Output = Called> + Send;
}

/// A bundle version prepared by the runtime it names.
pub enum Prepared {
    /// Lua, on the Runner's Lua threads (which run the serve loop's
    /// skeleton around each call themselves: [`LuaPool::run`]).
    Lua(LuaPool),
    /// One process per call.
    Exec(ExecFunc),
    /// Python, Node.js or Java worker processes.
    Worker(WorkerPool),
    /// It cannot run here; every request is answered 500 with this reason.
    Broken(String),
    /// A worker or exec Func on a Runner whose sandbox does not work (and
    /// no opt-out): every request is answered 503 `sandbox_unavailable`.
    Refused(String),
}

impl Prepared {
    /// Prepare `bundle` with the runtime its `runtime` names (a Lua Func
    /// on the Runner's shared Lua threads, `lua`).
    pub async fn prepare(
        bundle: &Bundle,
        options: &RunnerOptions,
        observer: &Observer,
        lua: &std::sync::Arc<LuaThreads>,
    ) -> Result<Prepared, PrepareError> {
        if bundle.runtime != RuntimeKind::Lua {
            if let Isolation::Unavailable(why) = options.sandbox.isolation().await {
                tracing::error!(func = %bundle.name, reason = %why, "Func refused: its processes cannot be isolated here");
                return Ok(Prepared::Refused(format!(
                    "Func isolation is unavailable on this Runner, so this Func is refused: {why}"
                )));
            }
        }
        Ok(match bundle.runtime {
            RuntimeKind::Lua => {
                Prepared::Lua(LuaPool::prepare(bundle, options, observer, lua).await?)
            }
            RuntimeKind::Exec => {
                Prepared::Exec(ExecFunc::prepare(bundle, options, observer).await?)
            }
            RuntimeKind::Python | RuntimeKind::Node | RuntimeKind::Java => {
                Prepared::Worker(WorkerPool::prepare(bundle, options, observer).await?)
            }
        })
    }
}

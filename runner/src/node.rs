//! One Runner node, composed in one place: `funcatron runner`, the
//! in-process Runners of `funcatron up`, `funcatron dev`, the benchmarks
//! and the tests all build a Runner here.
//!
//! A node is its id, its [`Observer`] (heartbeats, Func logs, captures
//! under that id) and what it serves: fixed bundles, the registry's state
//! followed on the control topic ([`crate::follow`]), or a [`Desired`]
//! watch someone else keeps (several in-process Runners share one
//! follower). [`RunnerNode::run`] serves until `shutdown`, then finishes
//! and acknowledges what is in flight.

use funcatron_broker::AnyBroker;
use funcatron_bundle::Bundle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::direct::Direct;
use crate::follow::{self, Desired, FollowOptions};
use crate::lua::LuaThreads;
use crate::observe::{new_runner_id, LevelHook, Observer};
use crate::serve::{serve, RunnerOptions};

/// Where a Runner's set of bundle versions comes from.
enum Source {
    /// These, always.
    Fixed(Vec<Bundle>),
    /// The registry's state, followed on the control topic.
    Follow(FollowOptions),
    /// A watch kept by the caller.
    Watch(watch::Receiver<Desired>),
}

/// What several Runners of one process may share: the Lua threads and the
/// direct listener (`funcatron up` runs a Runner per Func; threads and
/// ports do not grow with the number of Funcs).
#[derive(Clone)]
pub struct RunnerShared {
    /// Lua threads for every Lua Func of the Runners.
    pub lua: Arc<LuaThreads>,
    /// One direct listener for all of them.
    pub direct: Arc<Direct>,
    /// One flow engine (signing key, callbacks, branch replies).
    pub flows: Arc<crate::flow::FlowEngine>,
}

impl RunnerShared {
    /// Start the threads and the listener `options` ask for; the listener
    /// serves until `shutdown`.
    pub async fn start(options: &RunnerOptions, shutdown: &CancellationToken) -> RunnerShared {
        let direct = match Direct::start(options.direct.clone(), shutdown).await {
            Ok(d) => d,
            Err(e) => {
                // Without it direct requests cannot be served; everything
                // else can.
                tracing::error!(error = %e, "direct listener not started; direct requests are answered 503");
                Direct::unavailable(e.to_string())
            }
        };
        RunnerShared {
            lua: LuaThreads::start(options.workers),
            direct,
            flows: crate::flow::FlowEngine::with_values(
                options.flow_key.as_deref(),
                options.flow_outbound.clone(),
                options.lua_limits,
                options.flow_store.clone(),
                options.flow_inline_bytes,
            ),
        }
    }
}

/// A Runner, to configure and [`run`](RunnerNode::run).
pub struct RunnerNode {
    broker: AnyBroker,
    id: String,
    options: RunnerOptions,
    source: Source,
    levels: Option<LevelHook>,
    shared: Option<RunnerShared>,
}

impl RunnerNode {
    /// A Runner on `broker` with default options, serving nothing yet.
    pub fn new(broker: AnyBroker) -> Self {
        RunnerNode {
            broker,
            id: new_runner_id(),
            options: RunnerOptions::default(),
            source: Source::Fixed(Vec::new()),
            levels: None,
            shared: None,
        }
    }

    /// Use these Lua threads and direct listener (shared with other
    /// Runners of this process) instead of starting its own.
    pub fn shared(mut self, shared: RunnerShared) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The Runner's options.
    pub fn options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// Serve these bundles.
    pub fn bundles(mut self, bundles: Vec<Bundle>) -> Self {
        self.source = Source::Fixed(bundles);
        self
    }

    /// Serve the static bundles of `follow` plus what the registry enables.
    pub fn follow(mut self, follow: FollowOptions) -> Self {
        self.source = Source::Follow(follow);
        self
    }

    /// Serve whatever `desired` holds, following its changes.
    pub fn desired(mut self, desired: watch::Receiver<Desired>) -> Self {
        self.source = Source::Watch(desired);
        self
    }

    /// Apply per-Func log levels with `hook` (the binary reloads its log
    /// filter).
    pub fn log_levels(mut self, hook: LevelHook) -> Self {
        self.levels = Some(hook);
        self
    }

    /// This Runner's id (in its heartbeats and log lines).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Serve until `shutdown`; what is in flight finishes and is
    /// acknowledged first.
    pub async fn run(self, shutdown: CancellationToken) {
        let RunnerNode {
            broker,
            id,
            options,
            source,
            levels,
            shared,
        } = self;
        // Decided (and logged) once; the runtimes reuse the probe's result.
        options.sandbox.decide_and_log().await;
        let observer = Observer::start(&broker, id, levels, &shutdown);
        let (_keep, desired) = match source {
            Source::Fixed(bundles) => {
                let (tx, rx) = watch::channel(Desired::from(bundles));
                (Some(tx), rx)
            }
            Source::Follow(f) => (None, spawn_follower(&broker, f, &shutdown)),
            Source::Watch(rx) => (None, rx),
        };
        let shared = match shared {
            Some(s) => s,
            None => RunnerShared::start(&options, &shutdown).await,
        };
        serve(broker, desired, options, observer, shared, shutdown).await;
    }
}

/// Follow the registry on `broker` in the background; the watch starts
/// with the static bundles (those `follow.only` wants).
pub fn spawn_follower(
    broker: &AnyBroker,
    follow: FollowOptions,
    shutdown: &CancellationToken,
) -> watch::Receiver<Desired> {
    let mut statics = follow.static_bundles.clone();
    statics.retain(|b| follow.wants(&b.name));
    let (tx, rx) = watch::channel(Desired::from(statics));
    tokio::spawn(follow::follow(broker.clone(), follow, tx, shutdown.clone()));
    rx
}

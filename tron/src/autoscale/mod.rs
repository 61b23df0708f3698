//! The autoscaler, run by a Tron: reads each Func's signals, decides how
//! many Runners it needs ([`policy`]) and tells the [`substrate`] where
//! Runners run.
//!
//! Signals, per Func, every tick (200 ms by default):
//! - queue depth from the broker (ready; unacknowledged where the broker
//!   reports it, else what Runners report in flight),
//! - arrival rate from this Tron's dispatch counts ([`crate::demand`]),
//! - service time and in-flight requests from Runner heartbeats on the
//!   `funcatron.stats` topic (Runner liveness too),
//! - the substrate's own count of requested and running Runners.
//!
//! A request for a Func with no Runner wakes the loop at once
//! ([`Demand::dispatched`](crate::demand::Demand::dispatched)), so scale from zero does
//! not wait for the next tick. A Runner that died is replaced: the
//! substrate's count falls below the target and the loop scales again.

pub mod args;
pub mod docker;
pub mod kubernetes;
pub mod marathon;
pub mod policy;
pub mod substrate;

use funcatron_control::sync::poisoned;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use funcatron_broker::Broker;
use funcatron_control::state::FuncSettings;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::context::TronContext;
use crate::routes::RouteTable;
pub use args::ScaleArgs;
pub use policy::{Hysteresis, ScaleParams, Signals};
pub use substrate::{BoxFut, Observed, ProcessSubstrate, RunnerCommand, ScaleError, Substrate};

/// The settings each enabled Func was given, by Func.
pub type FuncSettingsMap = Arc<BTreeMap<String, FuncSettings>>;

/// Autoscaler settings.
#[derive(Debug, Clone)]
pub struct AutoscalerOptions {
    /// Parameters for Funcs that set none of their own.
    pub defaults: ScaleParams,
    /// How often signals are read and decisions made.
    pub tick: Duration,
}

/// Default tick, in milliseconds.
pub const DEFAULT_TICK_MS: u64 = 200;

impl Default for AutoscalerOptions {
    fn default() -> Self {
        AutoscalerOptions {
            defaults: ScaleParams::default(),
            tick: Duration::from_millis(DEFAULT_TICK_MS),
        }
    }
}

/// One scaling decision, kept for `funcatron status`.
#[derive(Debug, Clone, serde::Serialize)]
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

/// What `status` shows of one Func.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct View {
    queue: String,
    ready: u64,
    unacked: u64,
    unacked_source: &'static str,
    consumers: u64,
    arrival_per_s: f64,
    service_ms: Option<f64>,
    in_flight: u64,
    runners_heard: u32,
    desired: u32,
    target: u32,
    requested: u32,
    running: u32,
    min: u32,
    max: u32,
    target_concurrency: f64,
    last_reason: String,
    decisions: VecDeque<Decision>,
    error: Option<String>,
}

/// Decisions kept per Func.
const KEPT: usize = 20;

/// Per Func state the loop keeps between ticks.
struct FuncScale {
    hysteresis: Hysteresis,
    service_ms: Option<f64>,
}

/// The autoscaler of one Tron.
pub struct Autoscaler {
    substrate: Arc<dyn Substrate>,
    options: AutoscalerOptions,
    /// The Tron's broker, demand and heartbeats.
    ctx: TronContext,
    routes: watch::Receiver<Arc<RouteTable>>,
    /// Per-Func settings from the registry, when there is one.
    settings: Option<watch::Receiver<FuncSettingsMap>>,
    views: Mutex<BTreeMap<String, View>>,
}

/// Shared handle.
pub type Shared = Arc<Autoscaler>;

fn now_ms() -> u64 {
    funcatron_envelope::now_ms() as u64
}

/// The autoscaler's gauges for one Func.
fn record_gauges(
    func: &str,
    signals: &Signals,
    service_ms: Option<f64>,
    runners_heard: u32,
    desired: u32,
    running: u32,
) {
    let f = func.to_owned();
    metrics::gauge!("tron_autoscaler_queue_ready", "func" => f.clone()).set(signals.ready as f64);
    metrics::gauge!("tron_autoscaler_queue_unacked", "func" => f.clone())
        .set(signals.unacked as f64);
    metrics::gauge!("tron_autoscaler_arrival_per_second", "func" => f.clone())
        .set(signals.arrival_per_s);
    metrics::gauge!("tron_autoscaler_service_seconds", "func" => f.clone())
        .set(service_ms.unwrap_or(0.0) / 1000.0);
    metrics::gauge!("tron_autoscaler_in_flight", "func" => f.clone()).set(signals.in_flight as f64);
    metrics::gauge!("tron_autoscaler_runners_heard", "func" => f.clone())
        .set(f64::from(runners_heard));
    metrics::gauge!("tron_autoscaler_desired_runners", "func" => f.clone()).set(f64::from(desired));
    metrics::gauge!("tron_autoscaler_running_runners", "func" => f).set(f64::from(running));
}

impl Autoscaler {
    /// An autoscaler for the Funcs of `routes` on `substrate`, reading the
    /// signals of the Tron `ctx` belongs to; per-Func settings come from
    /// the registry's `settings` watch when there is one.
    pub fn new(
        substrate: Arc<dyn Substrate>,
        options: AutoscalerOptions,
        ctx: TronContext,
        routes: watch::Receiver<Arc<RouteTable>>,
        settings: Option<watch::Receiver<FuncSettingsMap>>,
    ) -> Shared {
        Arc::new(Autoscaler {
            substrate,
            options,
            ctx,
            routes,
            settings,
            views: Mutex::default(),
        })
    }

    /// The substrate's name.
    pub fn substrate(&self) -> &'static str {
        self.substrate.kind()
    }

    /// Per Func: signals, desired/target/actual Runners and the last
    /// decisions with their reasons.
    pub fn status(&self) -> serde_json::Value {
        let views = self
            .views
            .lock()
            .unwrap_or_else(|e| poisoned("autoscaler.views", e))
            .clone();
        json!({
            "substrate": self.substrate.kind(),
            "tick_ms": self.options.tick.as_millis() as u64,
            "funcs": views,
        })
    }

    fn params(&self, settings: Option<&FuncSettings>) -> ScaleParams {
        let mut p = self.options.defaults;
        if let Some(s) = settings {
            if let Some(n) = s.min_runners {
                p.min = n;
            }
            if let Some(n) = s.max_runners {
                p.max = n;
            }
            if let Some(t) = s.target_concurrency {
                p.target_concurrency = t;
            }
            if let Some(d) = s.scale_down_delay_ms {
                p.scale_down_delay = Duration::from_millis(d);
            }
        }
        p
    }

    /// Run until `shutdown`, then let the substrate stop what it started.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut funcs: HashMap<String, FuncScale> = HashMap::new();
        let mut tick = tokio::time::interval(self.options.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(substrate = self.substrate.kind(), "autoscaler running");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.ctx.demand.woken() => {
                    metrics::counter!("tron_autoscaler_wakeups_total").increment(1);
                }
            }
            let settings = self
                .settings
                .as_ref()
                .map(|s| Arc::clone(&s.borrow()))
                .unwrap_or_default();
            let table = Arc::clone(&self.routes.borrow());
            let live: Vec<(String, String)> = table
                .funcs()
                .map(|(f, q)| (f.to_owned(), q.to_owned()))
                .collect();
            for (func, queue) in &live {
                let p = self.params(settings.get(func));
                self.reconcile(&mut funcs, func, queue, &p).await;
            }
            // Funcs no longer routed: scale them to nothing.
            let gone: Vec<String> = funcs
                .keys()
                .filter(|f| !live.iter().any(|(l, _)| l == *f))
                .cloned()
                .collect();
            for func in gone {
                funcs.remove(&func);
                if let Err(e) = self.substrate.scale(&func, 0).await {
                    tracing::warn!(func, error = %e, "cannot stop the Runners of a removed Func");
                }
                self.views
                    .lock()
                    .unwrap_or_else(|e| poisoned("autoscaler.views", e))
                    .remove(&func);
            }
            let cold: HashSet<String> = funcs
                .iter()
                .filter(|(_, s)| s.hysteresis.target == 0)
                .map(|(f, _)| f.clone())
                .collect();
            self.ctx.demand.set_cold(cold);
        }
        self.ctx.demand.set_cold(HashSet::new());
        self.substrate.shutdown().await;
    }

    /// Ask the substrate for `target` Runners of `func`.
    async fn scale(&self, func: &str, target: u32) -> Result<(), ScaleError> {
        let started = Instant::now();
        match self.substrate.scale(func, target).await {
            Ok(()) => {
                metrics::histogram!("tron_autoscaler_scale_call_seconds", "substrate" => self.substrate.kind())
                    .record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                metrics::counter!("tron_autoscaler_scale_errors_total", "func" => func.to_owned())
                    .increment(1);
                tracing::warn!(func, error = %e, "scaling failed; retrying at the next tick");
                Err(e)
            }
        }
    }

    async fn reconcile(
        &self,
        funcs: &mut HashMap<String, FuncScale>,
        func: &str,
        queue: &str,
        p: &ScaleParams,
    ) {
        let observed = self.substrate.observe(func).await;
        let now = Instant::now();
        let state = match funcs.get_mut(func) {
            Some(s) => s,
            None => {
                let start = observed.as_ref().map(|o| o.requested).unwrap_or(0);
                funcs.entry(func.to_owned()).or_insert(FuncScale {
                    hysteresis: Hysteresis::new(start),
                    service_ms: None,
                })
            }
        };
        let arrival_per_s = self.ctx.demand.arrival_per_s(func);
        let heard = self.ctx.heartbeats.sum(func);
        let in_flight = heard.in_flight;
        if let Some(m) = heard.service_ms() {
            state.service_ms = Some(state.service_ms.map_or(m, |s| 0.5 * s + 0.5 * m));
        }
        let depth = self.ctx.broker.depth(queue).await.ok();
        let (unacked, unacked_source) = match depth.and_then(|d| d.unacked) {
            Some(u) => (u, "broker"),
            None => (in_flight, "runners"),
        };
        let signals = Signals {
            ready: depth.map_or(0, |d| d.ready),
            unacked,
            arrival_per_s,
            service_ms: state.service_ms,
            in_flight,
        };
        let before = state.hysteresis.target;
        let eval = state.hysteresis.evaluate(p, &signals, now);
        let mut error = None;
        let (requested, running) = match &observed {
            Ok(o) => (o.requested, o.running),
            Err(e) => {
                error = Some(e.to_string());
                (0, 0)
            }
        };
        // Scale when the target moved, or when the substrate runs another
        // count than the target (a Runner died, someone scaled by hand).
        if eval.target != before || (observed.is_ok() && requested != eval.target) {
            if let Err(e) = self.scale(func, eval.target).await {
                error = Some(e.to_string());
            }
        }
        let decided = eval.target != before;
        if decided {
            let direction = if eval.target > before { "up" } else { "down" };
            metrics::counter!("tron_autoscaler_decisions_total", "func" => func.to_owned(), "direction" => direction)
                .increment(1);
            tracing::info!(func, from = before, to = eval.target, reason = %eval.reason, "scaling decision");
        }
        record_gauges(
            func,
            &signals,
            state.service_ms,
            heard.runners,
            eval.target,
            running,
        );
        {
            let mut views = self
                .views
                .lock()
                .unwrap_or_else(|e| poisoned("autoscaler.views", e));
            let v = views.entry(func.to_owned()).or_default();
            if decided {
                v.decisions.push_back(Decision {
                    at_ms: now_ms(),
                    from: before,
                    to: eval.target,
                    reason: eval.reason.clone(),
                });
                while v.decisions.len() > KEPT {
                    v.decisions.pop_front();
                }
            }
            v.queue = queue.to_owned();
            v.ready = signals.ready;
            v.unacked = unacked;
            v.unacked_source = unacked_source;
            v.consumers = depth.map_or(0, |d| d.consumers);
            v.arrival_per_s = arrival_per_s;
            v.service_ms = state.service_ms;
            v.in_flight = in_flight;
            v.runners_heard = heard.runners;
            v.desired = eval.desired;
            v.target = eval.target;
            v.requested = requested;
            v.running = running;
            v.min = p.min;
            v.max = p.max;
            v.target_concurrency = p.target_concurrency;
            v.last_reason = eval.reason;
            v.error = error;
        }
    }
}

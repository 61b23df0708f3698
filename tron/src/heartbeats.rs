//! Runner heartbeats as a Tron hears them on the `funcatron.stats` topic:
//! each Runner's last two reports, summed per Func. What `funcatron
//! status` shows and what the autoscaler reads its service time, in-flight
//! count and Runner liveness from.

use funcatron_control::sync::poisoned;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use funcatron_control::state::RunnerStats;

/// A Runner counts while heard from within this.
const FRESH: Duration = Duration::from_secs(3);
/// A Runner not heard from for this long is forgotten.
const FORGET: Duration = Duration::from_secs(10);

/// A Runner's last heartbeat, when it came, and the one before.
type Heard = (Instant, RunnerStats, Option<RunnerStats>);

/// One Func summed over the Runners heard from lately.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FuncHeard {
    /// Runners serving it.
    pub runners: u32,
    /// Requests in flight.
    pub in_flight: u64,
    /// Requests served since those Runners started.
    pub served: u64,
    /// Requests served between each Runner's last two heartbeats...
    pub recent_served: u64,
    /// ...and the milliseconds spent on them.
    pub recent_busy_ms: f64,
}

impl FuncHeard {
    /// Mean service time over the last heartbeat interval, if anything
    /// was served in it.
    pub fn service_ms(&self) -> Option<f64> {
        (self.recent_served > 0).then(|| self.recent_busy_ms / self.recent_served as f64)
    }
}

/// The heartbeats heard so far.
#[derive(Default)]
pub struct Heartbeats {
    heard: Mutex<HashMap<String, Heard>>,
}

impl Heartbeats {
    /// Take one heartbeat message; `false` if it is not one.
    pub fn record(&self, bytes: &[u8]) -> bool {
        let Ok(stats) = serde_json::from_slice::<RunnerStats>(bytes) else {
            return false;
        };
        let mut h = self
            .heard
            .lock()
            .unwrap_or_else(|e| poisoned("heartbeats", e));
        h.retain(|_, (seen, _, _)| seen.elapsed() < FORGET);
        let previous = h.remove(&stats.runner).map(|(_, last, _)| last);
        h.insert(stats.runner.clone(), (Instant::now(), stats, previous));
        true
    }

    /// `func` summed over the Runners heard from lately.
    pub fn sum(&self, func: &str) -> FuncHeard {
        let mut out = FuncHeard::default();
        let h = self
            .heard
            .lock()
            .unwrap_or_else(|e| poisoned("heartbeats", e));
        for (seen, s, prev) in h.values() {
            if seen.elapsed() >= FRESH {
                continue;
            }
            let Some(l) = s.funcs.get(func) else { continue };
            out.runners += 1;
            out.in_flight += l.in_flight;
            out.served += l.served;
            let p = prev.as_ref().and_then(|p| p.funcs.get(func));
            let (pb, ps) = p.map_or((0.0, 0), |p| (p.busy_ms, p.served));
            if l.served > ps {
                out.recent_busy_ms += l.busy_ms - pb;
                out.recent_served += l.served - ps;
            }
        }
        out
    }
}

//! The scaling rule: from one Func's signals to how many Runners it should
//! have. Pure (no I/O), so every case is tested directly.
//!
//! ```text
//! service_s  = measured service time (else the default)
//! concurrent = arrival_per_s * service_s                 (Little's law)
//! backlog    = ready * service_s / drain_s               (drain the queue in drain_s)
//! busy       = max(in_flight, unacked)                   (work already taken)
//! raw        = max(concurrent + backlog, busy) / target_concurrency
//! desired    = clamp(ceil(raw), min, max)
//!              (at least 1 while there is any work and max > 0)
//! ```
//!
//! Hysteresis: a higher `desired` applies at once unless `raw` is within
//! `tolerance` of the current target; a lower one applies only after it has
//! stayed lower for `scale_down_delay`, and then to the highest value seen
//! during that window.

use std::time::{Duration, Instant};

/// Scaling parameters of one Func (defaults from the Tron's flags, each
/// overridable per Func at `func enable`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleParams {
    /// Fewest Runners (0: scale to zero when idle).
    pub min: u32,
    /// Most Runners.
    pub max: u32,
    /// Requests one Runner should handle at once.
    pub target_concurrency: f64,
    /// How long demand must stay lower before Runners are removed.
    pub scale_down_delay: Duration,
    /// Drain a backlog within this time.
    pub drain: Duration,
    /// Relative change ignored when scaling up (against flapping).
    pub tolerance: f64,
    /// Service time assumed before any Runner has reported one, in ms.
    pub default_service_ms: f64,
}

/// Default fewest Runners per Func.
pub const DEFAULT_MIN_RUNNERS: u32 = 1;
/// Default most Runners per Func.
pub const DEFAULT_MAX_RUNNERS: u32 = 10;
/// Default requests one Runner should handle at once.
pub const DEFAULT_TARGET_CONCURRENCY: f64 = 16.0;
/// Default scale-down delay, in milliseconds.
pub const DEFAULT_SCALE_DOWN_DELAY_MS: u64 = 30_000;
/// Default backlog drain time, in milliseconds.
pub const DEFAULT_DRAIN_MS: u64 = 2_000;
/// Default tolerance on scale-up.
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// Default service time before Runners report one, in milliseconds.
pub const DEFAULT_SERVICE_MS: f64 = 50.0;

impl Default for ScaleParams {
    fn default() -> Self {
        ScaleParams {
            min: DEFAULT_MIN_RUNNERS,
            max: DEFAULT_MAX_RUNNERS,
            target_concurrency: DEFAULT_TARGET_CONCURRENCY,
            scale_down_delay: Duration::from_millis(DEFAULT_SCALE_DOWN_DELAY_MS),
            drain: Duration::from_millis(DEFAULT_DRAIN_MS),
            tolerance: DEFAULT_TOLERANCE,
            default_service_ms: DEFAULT_SERVICE_MS,
        }
    }
}

/// What the autoscaler knows about one Func right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// Messages waiting in the Func's queue.
    pub ready: u64,
    /// Messages delivered to Runners and not yet acknowledged.
    pub unacked: u64,
    /// Requests per second dispatched to the Func.
    pub arrival_per_s: f64,
    /// Mean time a Runner spends on one request, if measured.
    pub service_ms: Option<f64>,
    /// Requests Runners report handling now.
    pub in_flight: u64,
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Runners wanted by the formula before bounds and hysteresis.
    pub raw: f64,
    /// Bounded by min and max.
    pub desired: u32,
    /// The new target after hysteresis.
    pub target: u32,
    /// Why, in words (shown by `funcatron status`).
    pub reason: String,
}

/// One Func's hysteresis state.
#[derive(Debug, Clone, Default)]
pub struct Hysteresis {
    /// The current target.
    pub target: u32,
    /// Since when the desired count has been below the target, and the
    /// highest desired count seen since.
    below: Option<(Instant, u32)>,
}

impl Hysteresis {
    /// Start at `target` (what the substrate runs now).
    pub fn new(target: u32) -> Self {
        Hysteresis {
            target,
            below: None,
        }
    }

    /// Evaluate `s` under `p` at `now` and move the target.
    pub fn evaluate(&mut self, p: &ScaleParams, s: &Signals, now: Instant) -> Evaluation {
        let service_ms = s.service_ms.unwrap_or(p.default_service_ms).max(0.001);
        let service_s = service_ms / 1000.0;
        let concurrent = s.arrival_per_s * service_s;
        let backlog = s.ready as f64 * service_s / p.drain.as_secs_f64().max(0.001);
        let busy = s.in_flight.max(s.unacked) as f64;
        let tc = p.target_concurrency.max(0.001);
        let raw = (concurrent + backlog).max(busy) / tc;
        let work = s.ready > 0 || s.unacked > 0 || s.in_flight > 0 || s.arrival_per_s > 0.0;
        let mut desired = raw.ceil().min(f64::from(u32::MAX)) as u32;
        if work {
            desired = desired.max(1);
        }
        let desired = desired.clamp(p.min.min(p.max), p.max);
        let why = format!(
            "arrival {:.1}/s x service {:.1} ms = {:.2} + backlog {} ready / {:.1} s drain = {:.2}; busy {}; / target {} per Runner = {:.2} -> {} (min {}, max {})",
            s.arrival_per_s,
            service_ms,
            concurrent,
            s.ready,
            p.drain.as_secs_f64(),
            backlog,
            busy,
            p.target_concurrency,
            raw,
            desired,
            p.min,
            p.max
        );
        let reason;
        if desired > self.target {
            self.below = None;
            // Against flapping: a raw value barely above the current
            // target does not add a Runner (never when starting from zero
            // or when a bound forces it).
            if self.target > 0
                && self.target >= p.min
                && raw <= f64::from(self.target) * (1.0 + p.tolerance)
            {
                reason = format!("{why}; within {:.0}% tolerance", p.tolerance * 100.0);
            } else {
                self.target = desired;
                reason = format!("scale up: {why}");
            }
        } else if desired < self.target {
            if self.target > p.max {
                // A lowered bound applies at once.
                self.target = desired;
                self.below = None;
                reason = format!("scale down to the bound: {why}");
            } else {
                let (since, highest) = self.below.get_or_insert((now, desired));
                *highest = (*highest).max(desired);
                if now.duration_since(*since) >= p.scale_down_delay {
                    self.target = *highest;
                    self.below = None;
                    reason = format!(
                        "scale down after {:.1} s lower: {why}",
                        p.scale_down_delay.as_secs_f64()
                    );
                } else {
                    reason = format!(
                        "lower for {:.1} s of {:.1} s: {why}",
                        now.duration_since(*since).as_secs_f64(),
                        p.scale_down_delay.as_secs_f64()
                    );
                }
            }
        } else {
            self.below = None;
            reason = format!("steady: {why}");
        }
        if self.target < p.min {
            self.target = p.min.min(p.max);
        }
        Evaluation {
            raw,
            desired,
            target: self.target,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params() -> ScaleParams {
        ScaleParams {
            min: 0,
            max: 5,
            target_concurrency: 2.0,
            scale_down_delay: Duration::from_secs(10),
            drain: Duration::from_secs(1),
            tolerance: 0.1,
            default_service_ms: 100.0,
        }
    }

    #[test]
    fn littles_law_and_backlog() {
        let mut h = Hysteresis::new(0);
        let s = Signals {
            arrival_per_s: 20.0,
            service_ms: Some(200.0),
            ..Signals::default()
        };
        // 20/s x 0.2 s = 4 busy / 2 per Runner = 2.
        let e = h.evaluate(&params(), &s, Instant::now());
        assert_eq!((e.desired, e.target), (2, 2));
        let s = Signals {
            ready: 10,
            service_ms: Some(200.0),
            ..Signals::default()
        };
        // 10 x 0.2 s / 1 s = 2 / 2 = 1.
        let mut h = Hysteresis::new(0);
        assert_eq!(h.evaluate(&params(), &s, Instant::now()).target, 1);
    }

    #[test]
    fn any_work_wakes_a_func_at_zero_and_bounds_hold() {
        let mut h = Hysteresis::new(0);
        let s = Signals {
            ready: 1,
            service_ms: Some(1.0),
            ..Signals::default()
        };
        assert_eq!(h.evaluate(&params(), &s, Instant::now()).target, 1);
        let s = Signals {
            ready: 100_000,
            ..Signals::default()
        };
        assert_eq!(h.evaluate(&params(), &s, Instant::now()).target, 5);
        let p = ScaleParams { max: 0, ..params() };
        let mut h = Hysteresis::new(0);
        assert_eq!(h.evaluate(&p, &s, Instant::now()).target, 0);
        let p = ScaleParams { min: 3, ..params() };
        let mut h = Hysteresis::new(0);
        assert_eq!(
            h.evaluate(&p, &Signals::default(), Instant::now()).target,
            3
        );
    }

    #[test]
    fn scale_down_waits_for_the_delay_and_takes_the_window_max() {
        let p = params();
        let t0 = Instant::now();
        let mut h = Hysteresis::new(4);
        let low = Signals {
            in_flight: 1,
            ..Signals::default()
        };
        let mid = Signals {
            in_flight: 5,
            ..Signals::default()
        };
        assert_eq!(h.evaluate(&p, &low, t0).target, 4);
        assert_eq!(h.evaluate(&p, &mid, t0 + Duration::from_secs(5)).target, 4);
        let e = h.evaluate(&p, &low, t0 + Duration::from_secs(10));
        // The highest desired during the window was 3 (5 in flight / 2).
        assert_eq!(e.target, 3, "{}", e.reason);
        // Back to zero after another quiet window.
        let idle = Signals::default();
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(h.evaluate(&p, &idle, t1).target, 3);
        assert_eq!(
            h.evaluate(&p, &idle, t1 + Duration::from_secs(10)).target,
            0
        );
    }

    #[test]
    fn demand_back_above_resets_the_window() {
        let p = params();
        let t0 = Instant::now();
        let mut h = Hysteresis::new(2);
        let idle = Signals::default();
        let busy = Signals {
            in_flight: 4,
            ..Signals::default()
        };
        h.evaluate(&p, &idle, t0);
        h.evaluate(&p, &busy, t0 + Duration::from_secs(8));
        assert_eq!(
            h.evaluate(&p, &idle, t0 + Duration::from_secs(12)).target,
            2
        );
        assert_eq!(
            h.evaluate(&p, &idle, t0 + Duration::from_secs(22)).target,
            0
        );
    }

    #[test]
    fn tolerance_ignores_a_small_excess() {
        let p = params();
        let mut h = Hysteresis::new(2);
        // 4.2 busy / 2 = 2.1: within 10% of 2.
        let s = Signals {
            arrival_per_s: 42.0,
            service_ms: Some(100.0),
            ..Signals::default()
        };
        let e = h.evaluate(&p, &s, Instant::now());
        assert_eq!(e.target, 2, "{}", e.reason);
        let s = Signals {
            arrival_per_s: 50.0,
            service_ms: Some(100.0),
            ..Signals::default()
        };
        assert_eq!(h.evaluate(&p, &s, Instant::now()).target, 3);
    }
}

//! Demand: what this Tron's dispatcher has seen, per Func, for the
//! autoscaler and the status view.
//!
//! dispatch ([`crate::dispatch`]) and the ingresses' edge reports
//! ([`crate::admission::hear_demand`]) -> **Demand** -> autoscaler
//! ([`crate::autoscale`]) and status ([`crate::registry`]). The dispatcher
//! counts every request it forwards, an ingress routing at the edge
//! reports what it routed, and a request for a Func with no Runner (its
//! target is zero) wakes the autoscaler so scale from zero does not wait
//! for a tick. Arrival rates are computed here, once, from samples of
//! the counts (a background task of the node samples every
//! [`SAMPLE_EVERY`]). One `Demand` belongs to one Tron: two Trons in one
//! process keep separate counts.

use funcatron_control::sync::poisoned;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the counts are sampled for the arrival rate.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The arrival rate is taken over this much of the newest samples.
const WINDOW: Duration = Duration::from_secs(1);

/// Dispatch counts sampled over the last [`WINDOW`], oldest first.
type Samples = VecDeque<(Instant, HashMap<String, u64>)>;

/// Per-Func dispatch counts, the cold set and its wake signal of one Tron.
#[derive(Default)]
pub struct Demand {
    /// Requests forwarded per Func since start.
    dispatched: Mutex<HashMap<String, u64>>,
    /// Funcs whose target is zero Runners: a request for one wakes the
    /// autoscaler.
    cold: RwLock<HashSet<String>>,
    /// Is any Func cold? (The dispatcher's fast path: one atomic load.)
    any_cold: AtomicBool,
    /// Wakes the autoscaler.
    wake: Notify,
    /// Samples of `dispatched` the arrival rates come from.
    samples: Mutex<Samples>,
    /// An ingress asked for the route table (it just started).
    table_wanted: Notify,
}

impl Demand {
    /// A request for `func` was forwarded: count it and, if `func` has no
    /// Runner, wake the autoscaler.
    pub fn dispatched(&self, func: &str) {
        self.add(func, 1);
    }

    /// `n` requests for `func` were routed (here, or at the edge by an
    /// ingress that reported them): count them and, if `func` has no
    /// Runner, wake the autoscaler.
    pub fn add(&self, func: &str, n: u64) {
        if n == 0 {
            return;
        }
        {
            let mut d = self
                .dispatched
                .lock()
                .unwrap_or_else(|e| poisoned("demand.dispatched", e));
            // Allocate the key only for a Func's first request.
            match d.get_mut(func) {
                Some(c) => *c += n,
                None => {
                    d.insert(func.to_owned(), n);
                }
            }
        }
        if self.is_cold(func) {
            self.wake.notify_one();
        }
    }

    /// An ingress asked for the route table: the broadcaster sends it now.
    pub fn want_table(&self) {
        self.table_wanted.notify_one();
    }

    /// Completes when an ingress asked for the route table.
    pub async fn table_wanted(&self) {
        self.table_wanted.notified().await;
    }

    /// Has `func` no Runner now (by the autoscaler's last round)?
    pub fn is_cold(&self, func: &str) -> bool {
        self.any_cold.load(Ordering::Relaxed)
            && self
                .cold
                .read()
                .unwrap_or_else(|e| poisoned("demand.cold", e))
                .contains(func)
    }

    /// Requests forwarded to `func` since start.
    pub fn count(&self, func: &str) -> u64 {
        self.dispatched
            .lock()
            .unwrap_or_else(|e| poisoned("demand.dispatched", e))
            .get(func)
            .copied()
            .unwrap_or(0)
    }

    /// The Funcs that now have no Runner (the autoscaler says after each
    /// round).
    pub fn set_cold(&self, cold: HashSet<String>) {
        self.any_cold.store(!cold.is_empty(), Ordering::Relaxed);
        *self
            .cold
            .write()
            .unwrap_or_else(|e| poisoned("demand.cold", e)) = cold;
    }

    /// Completes when a request arrived for a cold Func.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Take a sample of the counts (the node does every [`SAMPLE_EVERY`]).
    pub fn sample(&self) {
        let counts = self
            .dispatched
            .lock()
            .unwrap_or_else(|e| poisoned("demand.dispatched", e))
            .clone();
        let now = Instant::now();
        let mut s = self
            .samples
            .lock()
            .unwrap_or_else(|e| poisoned("demand.samples", e));
        s.push_back((now, counts));
        while s.len() > 2
            && s.front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            s.pop_front();
        }
    }

    /// Requests per second forwarded to `func` over the last second of
    /// samples (0 until there are two).
    pub fn arrival_per_s(&self, func: &str) -> f64 {
        let s = self
            .samples
            .lock()
            .unwrap_or_else(|e| poisoned("demand.samples", e));
        match (s.front(), s.back()) {
            (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
                let dt = t1.duration_since(*t0).as_secs_f64().max(0.05);
                let n = |c: &HashMap<String, u64>| c.get(func).copied().unwrap_or(0);
                n(c1).saturating_sub(n(c0)) as f64 / dt
            }
            _ => 0.0,
        }
    }

    /// Sample every [`SAMPLE_EVERY`] until `shutdown`.
    pub async fn run_sampler(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sample(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_demand() {
        let (a, b) = (Demand::default(), Demand::default());
        a.dispatched("f");
        a.dispatched("f");
        b.dispatched("g");
        assert_eq!(a.count("f"), 2);
        assert_eq!(b.count("f"), 0);
        assert_eq!(b.count("g"), 1);
    }

    #[test]
    fn arrival_rate_from_two_samples() {
        let d = Demand::default();
        assert_eq!(d.arrival_per_s("f"), 0.0);
        d.sample();
        for _ in 0..10 {
            d.dispatched("f");
        }
        d.sample();
        // 10 requests over the interval, floored at 50 ms.
        let rate = d.arrival_per_s("f");
        assert!(rate > 0.0 && rate <= 10.0 / 0.05 + 1e-9, "{rate}");
        assert_eq!(d.arrival_per_s("g"), 0.0);
    }

    #[test]
    fn only_a_request_for_a_cold_func_wakes() {
        use futures::FutureExt;
        let d = Demand::default();
        d.set_cold(["f".to_owned()].into_iter().collect());
        d.dispatched("g");
        assert!(
            d.woken().now_or_never().is_none(),
            "a warm Func woke the autoscaler"
        );
        d.dispatched("f");
        assert!(
            d.woken().now_or_never().is_some(),
            "a cold Func did not wake it"
        );
        d.set_cold(HashSet::new());
        d.dispatched("f");
        assert!(d.woken().now_or_never().is_none());
    }
}

//! Schedules: the cron triggers of the served bundles, fired once per tick
//! across every Tron.
//!
//! the served bundles' `schedule` triggers -> **the scheduler (here, on
//! the Tron holding the `schedules` lease)** -> at each tick, one
//! asynchronous call per trigger (as [`crate::triggers::submit`]: `POST`
//! to the operation, body `{"type": "schedule", "trigger", "tick_ms",
//! "fired_ms", "late_ms"}`) -> the Func's async queue.
//!
//! Once per tick: each trigger's state record (`trigger_state`,
//! `<func>/<trigger>`) holds the last tick fired, advanced by
//! compare-and-set after the call is queued, and the call's idempotency
//! key names the tick. Two Trons that both believe they hold the lease
//! (clocks apart) still queue one call: the second's compare-and-set
//! fails, or its submission finds the key. A Tron killed after queuing and
//! before advancing leaves the tick to the next holder, whose submission
//! finds the key: still one call.
//!
//! A schedule seen for the first time starts at its next tick. After an
//! outage (no Tron running), the ticks missed since the last one fired
//! follow the trigger's `catch_up`: `latest` (the default) fires once, for
//! the newest; `skip` fires none (a tick is missed when it is more than
//! [`GRACE_MS`] late); `all` fires each, oldest first, at most
//! `funcatron_bundle::triggers::MAX_CATCH_UP`.
//!
//! The clock is the caller's ([`Scheduler::step`] takes "now"), so tests
//! run an hour of ticks without waiting for them.

use std::sync::Arc;
use std::time::Duration;

use funcatron_broker::AnyBroker;
use funcatron_calls::Calls;
use funcatron_store::lease::Lease;
use funcatron_store::{now_ms, AnyStore, Record, Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::triggers::{submit, Target, TriggerSet};

/// The store collection of trigger states (key `<func>/<trigger>`).
pub const STATE: &str = "trigger_state";

/// The lease the scheduler runs under.
pub const SCHEDULES_LEASE: &str = "schedules";

/// How late a tick may fire and still count as on time.
pub const GRACE_MS: u64 = 10_000;

/// How long the scheduler's lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// What a trigger has done: shown by `funcatron func show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerState {
    /// Calls it queued.
    #[serde(default)]
    pub fired: u64,
    /// When it last queued one (ms since the epoch; 0 never).
    #[serde(default)]
    pub last_fired_ms: u64,
    /// A schedule's last tick fired (or the tick it started after).
    #[serde(default)]
    pub last_tick_ms: u64,
}

/// The state record's key for `target`.
pub fn state_key(func: &str, trigger: &str) -> String {
    format!("{func}/{trigger}")
}

/// A trigger's state, if it has one.
pub async fn state_of(
    store: &AnyStore,
    func: &str,
    trigger: &str,
) -> Result<Option<TriggerState>, StoreError> {
    Ok(store
        .get(STATE, &state_key(func, trigger))
        .await?
        .and_then(|r| serde_json::from_slice(&r.value).ok()))
}

/// Add `n` firings at `now` to a trigger's state (store triggers; a
/// schedule's state moves with its ticks).
pub async fn count_firings(
    store: &AnyStore,
    target: &Target,
    n: u64,
    now: u64,
) -> Result<(), StoreError> {
    let key = state_key(&target.func, &target.trigger);
    for _ in 0..8 {
        let current = store.get(STATE, &key).await?;
        let mut state: TriggerState = current
            .as_ref()
            .and_then(|r| serde_json::from_slice(&r.value).ok())
            .unwrap_or_default();
        state.fired += n;
        state.last_fired_ms = now;
        let record = state_record(&key, &state);
        let written = match &current {
            Some(r) => store.replace(&record, r.revision).await,
            None => store.insert(&record).await,
        };
        match written {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. } | StoreError::Exists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn state_record(key: &str, state: &TriggerState) -> Record {
    Record::new(STATE, key).with_value(serde_json::to_vec(state).unwrap_or_default())
}

/// Fires schedules (see the module).
pub struct Scheduler {
    store: AnyStore,
    calls: Calls,
    broker: AnyBroker,
    lease: Lease<AnyStore>,
}

impl Scheduler {
    /// A scheduler queuing calls through `calls` on `broker`, as `holder`
    /// of the schedules lease (for `lease_ttl` per renewal).
    pub fn new(calls: Calls, broker: AnyBroker, holder: String, lease_ttl: Duration) -> Self {
        let store = calls.store().clone();
        Scheduler {
            lease: Lease::new(store.clone(), SCHEDULES_LEASE, holder, lease_ttl),
            store,
            calls,
            broker,
        }
    }

    /// One pass at `now` (ms since the epoch): if this scheduler holds the
    /// lease, fire every due tick of `set`'s schedules; how many calls it
    /// queued.
    pub async fn step(&mut self, set: &TriggerSet, now: u64) -> Result<usize, String> {
        if set.schedules().is_empty() || !self.lease.hold().await.map_err(|e| e.to_string())? {
            return Ok(0);
        }
        let mut fired = 0;
        for (schedule, target) in set.schedules() {
            let key = state_key(&target.func, &target.trigger);
            let Some(current) = self
                .store
                .get(STATE, &key)
                .await
                .map_err(|e| e.to_string())?
            else {
                // First seen: it starts after the last tick before now.
                let start = TriggerState {
                    last_tick_ms: schedule.last_at_or_before(now).unwrap_or(now),
                    ..TriggerState::default()
                };
                match self.store.insert(&state_record(&key, &start)).await {
                    Ok(_) | Err(StoreError::Exists { .. }) => {}
                    Err(e) => return Err(e.to_string()),
                }
                continue;
            };
            let mut state: TriggerState =
                serde_json::from_slice(&current.value).unwrap_or_default();
            let mut revision = current.revision;
            for tick in schedule.due(state.last_tick_ms, now, GRACE_MS) {
                let body = serde_json::json!({
                    "type": "schedule",
                    "trigger": target.trigger,
                    "tick_ms": tick,
                    "fired_ms": now,
                    "late_ms": now.saturating_sub(tick),
                })
                .to_string();
                submit(
                    &self.calls,
                    &self.broker,
                    target,
                    &body,
                    &format!("tick-{tick}"),
                )
                .await
                .map_err(|e| format!("schedule {} of {}: {e}", target.trigger, target.func))?;
                metrics::histogram!("trigger_lag_seconds", "func" => target.func.clone(), "trigger" => target.trigger.clone())
                    .record(now.saturating_sub(tick) as f64 / 1000.0);
                state.last_tick_ms = tick;
                state.fired += 1;
                state.last_fired_ms = now;
                match self
                    .store
                    .replace(&state_record(&key, &state), revision)
                    .await
                {
                    Ok(r) => {
                        revision = r;
                        fired += 1;
                    }
                    // Another Tron advanced it: its ticks are its own.
                    Err(StoreError::Conflict { .. }) => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        Ok(fired)
    }

    /// Give the lease up.
    pub async fn release(&mut self) {
        if let Err(e) = self.lease.release().await {
            tracing::debug!(error = %e, "the schedules lease was not released");
        }
    }
}

/// Fire schedules until `shutdown`: a pass at every tick (or at least
/// every second, and whenever the served triggers change).
pub async fn run(
    mut scheduler: Scheduler,
    mut triggers: watch::Receiver<Arc<TriggerSet>>,
    shutdown: CancellationToken,
) {
    loop {
        let set = Arc::clone(&triggers.borrow_and_update());
        let now = now_ms();
        if let Err(e) = scheduler.step(&set, now).await {
            metrics::counter!("trigger_schedule_failures_total").increment(1);
            tracing::warn!(error = %e, "firing schedules failed; trying again");
        }
        let next = set
            .schedules()
            .iter()
            .filter_map(|(s, _)| s.next_after(now))
            .min();
        let wait = next.map_or(1000, |n| n.saturating_sub(now_ms()).clamp(1, 1000));
        tokio::select! {
            () = shutdown.cancelled() => {
                scheduler.release().await;
                return;
            }
            () = tokio::time::sleep(Duration::from_millis(wait)) => {}
            r = triggers.changed() => if r.is_err() {
                // No more changes: keep firing what is there.
                tokio::time::sleep(Duration::from_millis(wait)).await;
            },
        }
    }
}

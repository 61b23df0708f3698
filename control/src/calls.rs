//! Asynchronous calls: a Func's async policy and what happens after each
//! attempt.
//!
//! ingress (202 + call id) -> Tron -> the Func's async queue -> Runner ->
//! outcomes queue -> **Tron: [`next_step`]** -> retry later (the broker's
//! delayed publish), dead-letter, or done. The policy comes from the
//! bundle (`x-funcatron: {async: {...}}`) and from enable-time settings,
//! which override it field by field ([`AsyncPolicy::merged`]).

use serde::{Deserialize, Serialize};

/// How a Func's asynchronous calls are retried, aged and bounded. Every
/// field is optional; [`AsyncPolicy::resolved`] fills in the defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AsyncPolicy {
    /// Attempts after the first (default 2: three in all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Delay before the first retry, ms (default 1,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_initial_ms: Option<u64>,
    /// Each further retry waits this much longer (default 2.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_factor: Option<f64>,
    /// No retry waits longer, ms (default 60,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_max_ms: Option<u64>,
    /// A call older than this (from its submission) is not tried again
    /// and, if still queued, not run; ms (default 6 hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// The answer statuses that are retried (default 408, 429, 500, 502,
    /// 503, 504: which includes the platform's timeouts, 504
    /// `func_timeout`, and crashes, 500 `func_crashed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<u16>>,
    /// Async calls one Runner runs at once, apart from its synchronous
    /// requests (default: one fewer than the Runner's workers, at least
    /// one, so a synchronous request always finds a worker free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u16>,
    /// Most calls waiting at once; more are answered 429 with
    /// `Retry-After` (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u64>,
    /// How long a finished call's record and answer are kept, ms (default
    /// 24 hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    /// Only asynchronous calls with a callback URL are accepted; others
    /// are answered 400 (ryo-faas semantics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_only: Option<bool>,
    /// Deliveries of a callback after the first that failed (no answer,
    /// or not 2xx), with the same backoff as attempts (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_retries: Option<u32>,
}

/// An [`AsyncPolicy`] with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Attempts in all (retries + 1).
    pub max_attempts: u32,
    /// See [`AsyncPolicy::backoff_initial_ms`].
    pub backoff_initial_ms: u64,
    /// See [`AsyncPolicy::backoff_factor`].
    pub backoff_factor: f64,
    /// See [`AsyncPolicy::backoff_max_ms`].
    pub backoff_max_ms: u64,
    /// See [`AsyncPolicy::max_age_ms`].
    pub max_age_ms: u64,
    /// See [`AsyncPolicy::retry_on`].
    pub retry_on: Vec<u16>,
    /// See [`AsyncPolicy::retention_ms`].
    pub retention_ms: u64,
    /// Callback deliveries in all (callback retries + 1).
    pub callback_attempts: u32,
}

impl Default for Resolved {
    /// The policy of a Func that sets nothing.
    fn default() -> Self {
        Resolved {
            max_attempts: 3,
            backoff_initial_ms: 1_000,
            backoff_factor: 2.0,
            backoff_max_ms: 60_000,
            max_age_ms: 6 * 3_600_000,
            retry_on: DEFAULT_RETRY_ON.to_vec(),
            retention_ms: 24 * 3_600_000,
            callback_attempts: 6,
        }
    }
}

/// The statuses retried by default.
pub const DEFAULT_RETRY_ON: &[u16] = &[408, 429, 500, 502, 503, 504];

/// Why a policy cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    /// A field out of range.
    #[error("async policy: {0}")]
    Invalid(String),
}

impl AsyncPolicy {
    /// `self` with `over`'s fields where `over` sets them (enable-time
    /// settings over the bundle's).
    pub fn merged(&self, over: &AsyncPolicy) -> AsyncPolicy {
        AsyncPolicy {
            retries: over.retries.or(self.retries),
            backoff_initial_ms: over.backoff_initial_ms.or(self.backoff_initial_ms),
            backoff_factor: over.backoff_factor.or(self.backoff_factor),
            backoff_max_ms: over.backoff_max_ms.or(self.backoff_max_ms),
            max_age_ms: over.max_age_ms.or(self.max_age_ms),
            retry_on: over.retry_on.clone().or_else(|| self.retry_on.clone()),
            concurrency: over.concurrency.or(self.concurrency),
            max_queued: over.max_queued.or(self.max_queued),
            retention_ms: over.retention_ms.or(self.retention_ms),
            async_only: over.async_only.or(self.async_only),
            callback_retries: over.callback_retries.or(self.callback_retries),
        }
    }

    /// Check the fields and fill in the defaults.
    pub fn resolved(&self) -> Result<Resolved, PolicyError> {
        let bad = |m: String| Err(PolicyError::Invalid(m));
        let d = Resolved::default();
        let retries = self.retries.unwrap_or(d.max_attempts - 1);
        if retries > 100 {
            return bad(format!("retries {retries} is more than 100"));
        }
        let factor = self.backoff_factor.unwrap_or(d.backoff_factor);
        if !(1.0..=100.0).contains(&factor) {
            return bad(format!("backoff_factor {factor} is not between 1 and 100"));
        }
        let initial = self.backoff_initial_ms.unwrap_or(d.backoff_initial_ms);
        let max = self.backoff_max_ms.unwrap_or(d.backoff_max_ms).max(initial);
        if max > 7 * 24 * 3_600_000 {
            return bad(format!("backoff_max_ms {max} is more than a week"));
        }
        let retry_on = self.retry_on.clone().unwrap_or(d.retry_on);
        if let Some(s) = retry_on.iter().find(|s| !(100..=599).contains(*s)) {
            return bad(format!("retry_on: {s} is not an HTTP status"));
        }
        let callback_retries = self.callback_retries.unwrap_or(d.callback_attempts - 1);
        if callback_retries > 100 {
            return bad(format!(
                "callback_retries {callback_retries} is more than 100"
            ));
        }
        if self.concurrency == Some(0) {
            return bad("concurrency 0 would never run a call".into());
        }
        Ok(Resolved {
            max_attempts: retries + 1,
            backoff_initial_ms: initial,
            backoff_factor: factor,
            backoff_max_ms: max,
            max_age_ms: self.max_age_ms.unwrap_or(d.max_age_ms),
            retry_on,
            retention_ms: self.retention_ms.unwrap_or(d.retention_ms),
            callback_attempts: callback_retries + 1,
        })
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The call is finished: succeeded (a status not retried) or failed
    /// for good with a status the policy does not retry.
    Done,
    /// Try again after `delay_ms`, as attempt `attempt`.
    Retry {
        /// The next attempt's number.
        attempt: u32,
        /// How long to wait first.
        delay_ms: u64,
    },
    /// Out of attempts or of age: to the dead-letter queue, with why.
    DeadLetter(String),
}

impl Resolved {
    /// The delay before attempt `next` (2 for the first retry):
    /// `initial * factor^(next-2)`, capped at the maximum, then reduced by
    /// up to half by `jitter` (0.0..1.0: a random draw), so retries of
    /// many calls that failed together spread out.
    pub fn delay_before(&self, next: u32, jitter: f64) -> u64 {
        let exp = i32::try_from(next.saturating_sub(2)).unwrap_or(i32::MAX);
        let base = (self.backoff_initial_ms as f64 * self.backoff_factor.powi(exp))
            .min(self.backoff_max_ms as f64);
        (base * (1.0 - 0.5 * jitter.clamp(0.0, 1.0))).round() as u64
    }
}

/// After attempt `attempt` (from 1) of a call submitted `age_ms` ago
/// answered `status`: done, retry (when the status is retried, attempts
/// remain and the retry would still start within the maximum age), or
/// dead-letter.
pub fn next_step(policy: &Resolved, status: u16, attempt: u32, age_ms: u64, jitter: f64) -> Step {
    if !policy.retry_on.contains(&status) {
        return Step::Done;
    }
    if attempt >= policy.max_attempts {
        return Step::DeadLetter(format!(
            "attempt {attempt} of {} answered {status}; no attempts left",
            policy.max_attempts
        ));
    }
    let next = attempt + 1;
    let delay_ms = policy.delay_before(next, jitter);
    if age_ms.saturating_add(delay_ms) > policy.max_age_ms {
        return Step::DeadLetter(format!(
            "attempt {attempt} answered {status}; a retry in {delay_ms} ms would pass the maximum age of {} ms",
            policy.max_age_ms
        ));
    }
    Step::Retry {
        attempt: next,
        delay_ms,
    }
}

/// A note of one step of an asynchronous pipeline, from the Runner that
/// ran it to the Trons (`funcatron.outcomes`, header `x-funcatron-phase:
/// step`): the call's record lists the steps (`funcatron call show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepNote {
    /// The call.
    pub call_id: String,
    /// The step's label (`steps[2]`, `on_failure`, `finally`).
    pub step: String,
    /// The Func it applied.
    pub func: String,
    /// Which attempt of the step (from 1).
    pub attempt: u32,
    /// Its answer's status.
    pub status: u16,
    /// What comes of it: `done`, `retry` (in `delay_ms`), `exhausted`
    /// (out of attempts: `on_failure` and `finally` run, the call is
    /// dead-lettered) or `failed` (a status the policy does not retry).
    pub outcome: String,
    /// The delay before the next attempt, for `retry`, ms.
    #[serde(default)]
    pub delay_ms: u64,
    /// Time inside the Func, ms.
    pub exec_ms: f64,
    /// When the Runner had the answer (Unix ms).
    pub finished_ms: u64,
    /// For a failed attempt: the step's request (envelope JSON), from
    /// which a redrive of the call starts again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(retries: u32) -> Resolved {
        AsyncPolicy {
            retries: Some(retries),
            backoff_initial_ms: Some(100),
            backoff_factor: Some(3.0),
            backoff_max_ms: Some(1_000),
            max_age_ms: Some(10_000),
            ..AsyncPolicy::default()
        }
        .resolved()
        .unwrap()
    }

    #[test]
    fn backoff_grows_by_the_factor_up_to_the_cap_and_jitter_takes_up_to_half() {
        let p = policy(5);
        let delays: Vec<u64> = (2..=6).map(|n| p.delay_before(n, 0.0)).collect();
        assert_eq!(delays, vec![100, 300, 900, 1_000, 1_000]);
        assert_eq!(p.delay_before(3, 1.0), 150);
        assert_eq!(p.delay_before(3, 0.5), 225);
    }

    #[test]
    fn retried_statuses_retry_until_attempts_or_age_run_out() {
        let p = policy(2);
        assert_eq!(next_step(&p, 200, 1, 0, 0.0), Step::Done);
        assert_eq!(next_step(&p, 404, 1, 0, 0.0), Step::Done, "not retried");
        assert_eq!(
            next_step(&p, 503, 1, 0, 0.0),
            Step::Retry {
                attempt: 2,
                delay_ms: 100
            }
        );
        assert_eq!(
            next_step(&p, 504, 2, 0, 0.0),
            Step::Retry {
                attempt: 3,
                delay_ms: 300
            }
        );
        assert!(
            matches!(next_step(&p, 500, 3, 0, 0.0), Step::DeadLetter(m) if m.contains("no attempts left"))
        );
        assert!(
            matches!(next_step(&p, 500, 1, 9_950, 0.0), Step::DeadLetter(m) if m.contains("maximum age"))
        );
    }

    #[test]
    fn settings_override_the_bundle_field_by_field_and_bad_ones_are_refused() {
        let bundle = AsyncPolicy {
            retries: Some(5),
            max_queued: Some(10),
            ..AsyncPolicy::default()
        };
        let over = AsyncPolicy {
            retries: Some(1),
            ..AsyncPolicy::default()
        };
        let m = bundle.merged(&over);
        assert_eq!((m.retries, m.max_queued), (Some(1), Some(10)));
        let r = AsyncPolicy::default().resolved().unwrap();
        assert_eq!(
            (r.max_attempts, r.retry_on.as_slice()),
            (3, DEFAULT_RETRY_ON)
        );
        for bad in [
            AsyncPolicy {
                backoff_factor: Some(0.5),
                ..AsyncPolicy::default()
            },
            AsyncPolicy {
                retry_on: Some(vec![42]),
                ..AsyncPolicy::default()
            },
            AsyncPolicy {
                concurrency: Some(0),
                ..AsyncPolicy::default()
            },
        ] {
            assert!(bad.resolved().is_err(), "{bad:?}");
        }
    }
}

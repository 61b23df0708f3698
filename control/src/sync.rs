//! The one lock idiom of the workspace: a poisoned lock (a thread
//! panicked while holding it) is logged and counted, then its data is
//! used; never silently skipped, never a second panic.
//!
//! ```
//! # use std::sync::Mutex;
//! use funcatron_control::sync::poisoned;
//! let m = Mutex::new(1);
//! let n = *m.lock().unwrap_or_else(|e| poisoned("example", e));
//! assert_eq!(n, 1);
//! ```

/// Log and count (`funcatron_poisoned_locks_total{lock}`) a poisoned
/// lock and hand back its guard.
pub fn poisoned<T>(lock: &'static str, e: std::sync::PoisonError<T>) -> T {
    tracing::error!(lock, "a lock was poisoned by a panic; using its data");
    metrics::counter!("funcatron_poisoned_locks_total", "lock" => lock).increment(1);
    e.into_inner()
}

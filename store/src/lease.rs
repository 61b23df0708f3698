//! Leases: one holder at a time for a piece of work every Tron could do
//! (relaying the document outbox, firing a schedule), through the store.
//!
//! Trons -> **[`Lease::hold`]** -> a record `("leases", name)` naming its
//! holder, expiring after the lease's time to live. Taking it is an
//! insert (atomic: of two Trons, one wins); keeping it is a
//! compare-and-set renewal by its holder; a holder that dies stops
//! renewing, the record expires, and another Tron takes it. A holder that
//! cannot reach the store stops counting itself the holder once its own
//! lease would have expired, so two holders never overlap by more than
//! the clocks of two Trons disagree.

use std::time::Duration;

use crate::{now_ms, Record, Store, StoreError};

/// The store collection of leases.
pub const LEASES: &str = "leases";

/// One lease, as one would-be holder sees it.
#[derive(Debug, Clone)]
pub struct Lease<S> {
    store: S,
    name: String,
    holder: String,
    ttl_ms: u64,
    /// The held record's revision and when it expires, while held.
    held: Option<(u64, u64)>,
}

impl<S: Store> Lease<S> {
    /// The lease `name`, for `holder` (unique per process), held for `ttl`
    /// per renewal.
    pub fn new(
        store: S,
        name: impl Into<String>,
        holder: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Lease {
            store,
            name: name.into(),
            holder: holder.into(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            held: None,
        }
    }

    /// Take or renew the lease: whether this holder holds it now. Renews
    /// only once a third of its time has passed (cheap to call often). A
    /// store failure is an error: do none of the lease's work this time
    /// (another holder may take it once it expires).
    pub async fn hold(&mut self) -> Result<bool, StoreError> {
        let now = now_ms();
        if let Some((_, until)) = self.held {
            if now + self.ttl_ms * 2 / 3 < until {
                return Ok(true);
            }
        }
        let outcome = self.take_or_renew(now).await;
        if outcome.is_err() && self.held.is_some_and(|(_, until)| until <= now) {
            self.held = None;
        }
        outcome
    }

    async fn take_or_renew(&mut self, now: u64) -> Result<bool, StoreError> {
        let until = now + self.ttl_ms;
        let record = Record::new(LEASES, &self.name)
            .with_value(self.holder.clone())
            .expiring_at(until);
        if let Some((revision, _)) = self.held {
            match self.store.replace(&record, revision).await {
                Ok(r) => {
                    self.held = Some((r, until));
                    return Ok(true);
                }
                Err(StoreError::Conflict { .. }) => self.held = None,
                Err(e) => return Err(e),
            }
        }
        match self.store.insert(&record).await {
            Ok(r) => {
                self.held = Some((r, until));
                Ok(true)
            }
            Err(StoreError::Exists { .. }) => {
                // Ours from before (a restart of this holder): take it over.
                match self.store.get(LEASES, &self.name).await? {
                    Some(r) if r.value == self.holder.as_bytes() => {
                        match self.store.replace(&record, r.revision).await {
                            Ok(rev) => {
                                self.held = Some((rev, until));
                                Ok(true)
                            }
                            Err(StoreError::Conflict { .. }) => Ok(false),
                            Err(e) => Err(e),
                        }
                    }
                    _ => Ok(false),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (at shutdown), so another holder takes it at
    /// once rather than when it expires.
    pub async fn release(&mut self) -> Result<(), StoreError> {
        if self.held.take().is_some() {
            if let Some(r) = self.store.get(LEASES, &self.name).await? {
                if r.value == self.holder.as_bytes() {
                    let _ = self.store.delete(LEASES, &self.name).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AnyStore;

    #[tokio::test]
    async fn one_holder_at_a_time() {
        let store = AnyStore::memory().expect("memory store");
        let ttl = Duration::from_secs(30);
        let mut a = Lease::new(store.clone(), "relay", "a", ttl);
        let mut b = Lease::new(store.clone(), "relay", "b", ttl);
        assert!(a.hold().await.expect("a"));
        assert!(!b.hold().await.expect("b"));
        assert!(a.hold().await.expect("a renews"));
        a.release().await.expect("release");
        assert!(b.hold().await.expect("b takes it once released"));
        assert!(!a.hold().await.expect("a no longer"));
        // A holder restarted under the same name takes its lease back.
        let mut b2 = Lease::new(store.clone(), "relay", "b", ttl);
        assert!(b2.hold().await.expect("b again"));
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken() {
        let store = AnyStore::memory().expect("memory store");
        let mut a = Lease::new(store.clone(), "relay", "a", Duration::from_millis(1));
        assert!(a.hold().await.expect("a"));
        // Expired by now + 1 ms; wait on the clock, not a sleep: spin until
        // the record's expiry has passed.
        let until = now_ms() + 2;
        while now_ms() < until {
            tokio::task::yield_now().await;
        }
        let mut b = Lease::new(store, "relay", "b", Duration::from_secs(30));
        assert!(b.hold().await.expect("b takes the expired lease"));
    }
}

//! The context of one Tron node: what its dispatcher, registry, status
//! view and autoscaler share, passed to each explicitly (never a
//! process-wide static), so two Trons in one process keep their own.
//!
//! ingress -> requests queue -> **Tron** (dispatch writes [`Demand`]) ->
//! Func queue -> Runner -> `funcatron.stats` -> **Tron** ([`Heartbeats`],
//! heard once) -> autoscaler and status; an ingress routing at the edge
//! -> `funcatron.demand` -> **Tron** ([`Demand`] too).

use std::sync::Arc;

use funcatron_broker::{AnyBroker, Broker};
use funcatron_control::names::STATS_TOPIC;
use tokio_util::sync::CancellationToken;

use crate::demand::Demand;
use crate::heartbeats::Heartbeats;

/// What the parts of one Tron share.
#[derive(Clone)]
pub struct TronContext {
    /// The broker every part talks to.
    pub broker: AnyBroker,
    /// This Tron's dispatch counts, arrival rates and cold set.
    pub demand: Arc<Demand>,
    /// Runner heartbeats as this Tron hears them (one subscription).
    pub heartbeats: Arc<Heartbeats>,
}

impl TronContext {
    /// A fresh context on `broker`; [`TronContext::start`] runs its
    /// background work.
    pub fn new(broker: AnyBroker) -> Self {
        TronContext {
            broker,
            demand: Arc::default(),
            heartbeats: Arc::default(),
        }
    }

    /// Sample demand and hear Runner heartbeats until `shutdown`.
    pub fn start(&self, shutdown: &CancellationToken) {
        let demand = Arc::clone(&self.demand);
        tokio::spawn({
            let s = shutdown.clone();
            async move { demand.run_sampler(s).await }
        });
        let (broker, heartbeats, s) = (
            self.broker.clone(),
            Arc::clone(&self.heartbeats),
            shutdown.clone(),
        );
        tokio::spawn(async move { hear(broker, heartbeats, s).await });
        tokio::spawn(crate::admission::hear_demand(
            self.broker.clone(),
            Arc::clone(&self.demand),
            shutdown.clone(),
        ));
    }
}

/// Record every heartbeat on the stats topic until `shutdown`.
async fn hear(broker: AnyBroker, heartbeats: Arc<Heartbeats>, shutdown: CancellationToken) {
    let mut sub = match broker.subscribe(STATS_TOPIC).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot hear Runner heartbeats; scaling and status go without them");
            return;
        }
    };
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        if !heartbeats.record(&d.message.payload) {
            metrics::counter!("tron_bad_heartbeats_total").increment(1);
        }
    }
}

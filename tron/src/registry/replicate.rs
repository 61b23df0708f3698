//! Replication: how the Trons of a cluster share the registry through the
//! broker's control topic.
//!
//! Every change is broadcast as the whole state with a revision
//! ([`Control::State`]); a Tron adopts a state newer than its own and
//! fetches the archives it lacks by SHA-256 from the sender's management
//! API ([`funcatron_control::fetch`], the same code Runners use, with the
//! read token, [`super::RegistryOptions::read_token`]); a
//! newcomer says [`Control::Hello`] and the Trons answer with their state.
//! The broker is already what every component shares, so no extra shared
//! store (database, NFS) is needed.

use std::sync::Arc;

use funcatron_broker::{Broker, Message};
use funcatron_control::names::CONTROL_TOPIC;
use funcatron_control::state::{ClusterState, Control};
use tokio_util::sync::CancellationToken;

use super::{Registry, RegistryError};

impl Registry {
    pub(super) async fn announce(&self, state: &ClusterState) {
        let msg = Control::State {
            state: state.clone(),
            fetch: self.options.advertise.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&msg) {
            if let Err(e) = self
                .broker
                .broadcast(CONTROL_TOPIC, Message::new(bytes))
                .await
            {
                tracing::warn!(error = %e, "could not broadcast the registry state");
            }
        }
    }

    /// Fetch an archive from a peer's management API (at most the archive
    /// limit, its SHA-256 checked) and store it (checked like an upload, on
    /// a blocking thread: a hostile archive is never stored).
    async fn fetch(&self, base: &str, sha: &str, name: &str) -> Result<(), RegistryError> {
        // A SHA from a control message: checked before it names a file
        // (blob_path) or a URL (fetch_archive).
        let blob = self.store.blob_path(sha).ok_or_else(|| {
            RegistryError::new(400, "bad_sha", format!("{sha:?} is not a SHA-256"))
        })?;
        if blob.is_file() {
            return Ok(());
        }
        let max = self.options.limits.max_archive_bytes;
        let token = self.options.read_token.as_deref();
        let bytes = self
            .fetcher
            .archive(base, sha, max, token)
            .await
            .map_err(|e| RegistryError::new(502, "fetch_failed", e.to_string()))?;
        self.store
            .put(&bytes, name, Some(&self.check()))
            .await
            .map(drop)
    }

    /// Follow the control topic until `shutdown`: adopt newer states from
    /// other Trons, answer newcomers.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sub = match self.broker.subscribe(CONTROL_TOPIC).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the control topic");
                return;
            }
        };
        self.hello().await;
        loop {
            let d = tokio::select! {
                _ = shutdown.cancelled() => return,
                d = sub.next() => match d { Some(d) => d, None => return },
            };
            match serde_json::from_slice::<Control>(&d.message.payload) {
                Ok(Control::Hello) => {
                    let st = self.state().await;
                    if st.revision > 0 {
                        self.announce(&st).await;
                    }
                }
                Ok(Control::State { state, fetch }) => self.adopt(state, &fetch).await,
                Err(e) => tracing::warn!(error = %e, "undecodable control message ignored"),
            }
        }
    }

    /// Ask the others for their state (and tell them ours).
    async fn hello(&self) {
        if let Ok(bytes) = serde_json::to_vec(&Control::Hello) {
            let _ = self
                .broker
                .broadcast(CONTROL_TOPIC, Message::new(bytes))
                .await;
        }
        let st = self.state().await;
        if st.revision > 0 {
            self.announce(&st).await;
        }
    }

    async fn adopt(&self, state: ClusterState, fetch: &str) {
        if !self.state.lock().await.older_than(&state) {
            return;
        }
        // Every uploaded version, so any Tron can enable or roll back to any.
        for (name, f) in &state.funcs {
            for u in &f.uploads {
                if let Err(e) = self.fetch(fetch, &u.sha, name).await {
                    tracing::error!(func = %name, sha = %u.sha, error = %e, "cannot fetch a bundle; keeping the current state");
                    return;
                }
            }
        }
        let mut st = self.state.lock().await;
        if !st.older_than(&state) {
            return;
        }
        // What a peer enabled is adopted whatever it conflicts with here
        // (this Tron's static bundles): the conflicting ones are refused
        // and logged, the rest route (see `super::plan`).
        match self.prepare(&state).await {
            Ok((table, served)) => {
                if let Err(e) = self.store.save_state(&state) {
                    tracing::error!(error = %e, "cannot save the adopted state");
                }
                self.install(&state, table, served).await;
                tracing::info!(revision = state.revision, origin = %state.origin, "adopted the registry state of another Tron");
                *st = state;
            }
            Err(e) => tracing::error!(error = %e, "cannot apply another Tron's state"),
        }
    }
}

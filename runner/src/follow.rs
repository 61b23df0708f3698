//! Following the registry: the Runner side of the control topic.
//!
//! Tron registry -> control topic -> **Runner (here)** -> the set of bundle
//! versions [`crate::serve`] serves. The Runner asks for the current state
//! when it starts (`hello`), adopts every newer state, fetches the archives
//! of enabled versions it lacks by SHA-256 from the announcing Tron's
//! management API, verifies and caches them (`<cache>/bundles/<sha>/`), and
//! switches its desired set ([`Desired`]): static bundles plus the enabled
//! ones with their settings, and the captures and log levels that each
//! Runner following it applies to its own observer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_bundle::archive::{self, Limits};
use funcatron_bundle::Bundle;
use funcatron_control::names::CONTROL_TOPIC;
use funcatron_control::state::{Capture, ClusterState, Control, LogLevel};
use tokio::sync::watch;

use crate::error::FollowError;
use tokio_util::sync::CancellationToken;

/// What a Runner should serve and report, as the registry says.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// The bundle versions to serve.
    pub bundles: Vec<Bundle>,
    /// Captures running, by Func.
    pub captures: BTreeMap<String, Capture>,
    /// Per-Func log levels.
    pub log_levels: BTreeMap<String, LogLevel>,
}

impl From<Vec<Bundle>> for Desired {
    fn from(bundles: Vec<Bundle>) -> Self {
        Desired {
            bundles,
            ..Desired::default()
        }
    }
}

/// What the follower needs.
pub struct FollowOptions {
    /// Bundles from a directory, always served.
    pub static_bundles: Vec<Bundle>,
    /// Where fetched bundles are cached.
    pub cache_dir: PathBuf,
    /// Deployment environment for staging rewrites.
    pub environment: Option<String>,
    /// Serve only these Funcs (empty: every Func). How a substrate starts
    /// a Runner for one Func.
    pub only: Vec<String>,
}

impl FollowOptions {
    /// Is `func` one of the Funcs this Runner serves?
    pub fn wants(&self, func: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == func)
    }
}

/// The bundles `state` enables, fetched and loaded.
async fn load(
    http: &reqwest::Client,
    options: &FollowOptions,
    state: &ClusterState,
    fetch_from: &str,
) -> Result<Vec<Bundle>, FollowError> {
    let root = options.cache_dir.join("bundles");
    let mut list: Vec<Bundle> = options
        .static_bundles
        .iter()
        .filter(|b| options.wants(&b.name))
        .cloned()
        .collect();
    for (name, sha, settings) in state.enabled() {
        if !options.wants(name) {
            continue;
        }
        let dir = root.join(sha);
        let bundle_dir = match std::fs::read_dir(&dir)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path()).filter(|p| p.is_dir())))
        {
            Some(d) => d,
            None => {
                let bytes = funcatron_control::fetch::fetch_archive(http, fetch_from, sha).await?;
                archive::unpack_into(&bytes, &root, name, Limits::default())
                    .map_err(|source| FollowError::Unpack {
                        sha: sha.to_owned(),
                        source,
                    })?
                    .1
            }
        };
        let b = Bundle::load_in(&bundle_dir, options.environment.as_deref())?;
        list.push(b.with_settings(settings));
    }
    Ok(list)
}

/// Follow the control topic until `shutdown`, keeping `desired` current.
pub async fn follow(
    broker: AnyBroker,
    options: FollowOptions,
    desired: watch::Sender<Desired>,
    shutdown: CancellationToken,
) {
    let mut sub = match broker.subscribe(CONTROL_TOPIC).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot follow the control topic; serving static bundles only");
            return;
        }
    };
    let http = reqwest::Client::new();
    let mut current = ClusterState::default();
    let hello = serde_json::to_vec(&Control::Hello).unwrap_or_default();
    // The control topic is not stored: ask until a Tron answers (and again
    // after each reconnect the subscription goes through).
    let mut asked = 0u32;
    let mut ask = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        let d = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ask.tick(), if current.revision == 0 && asked < 20 => {
                asked += 1;
                let _ = broker.broadcast(CONTROL_TOPIC, Message::new(hello.clone())).await;
                continue;
            }
            d = sub.next() => match d { Some(d) => d, None => return },
        };
        let Ok(Control::State { state, fetch }) =
            serde_json::from_slice::<Control>(&d.message.payload)
        else {
            continue;
        };
        if !current.older_than(&state) {
            continue;
        }
        match load(&http, &options, &state, &fetch).await {
            Ok(list) => {
                tracing::info!(
                    revision = state.revision,
                    funcs = list.len(),
                    "following the registry state"
                );
                desired.send_replace(Desired {
                    bundles: list,
                    captures: state.captures.clone(),
                    log_levels: state.log_levels.clone(),
                });
                current = state;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot adopt the registry state; keeping the current one")
            }
        }
    }
}

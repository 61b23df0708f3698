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
use std::path::{Path, PathBuf};

use funcatron_broker::{AnyBroker, Broker, Message};
use funcatron_bundle::archive::{self, Limits};
use funcatron_bundle::Bundle;
use funcatron_control::fetch::{FetchError, Fetcher};
use funcatron_control::names::CONTROL_TOPIC;
use funcatron_control::outbound::OutboundPolicy;
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
    /// The Tron's read token, sent when fetching archives (downloads need
    /// it). Runners get it from `FUNCATRON_READ_TOKEN`, never argv.
    pub read_token: Option<String>,
    /// Where fetch URLs may point (control messages name them): the
    /// operator's allowlist plus the Tron this Runner was started for.
    pub outbound: OutboundPolicy,
}

impl FollowOptions {
    /// Is `func` one of the Funcs this Runner serves?
    pub fn wants(&self, func: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == func)
    }
}

/// The bundles `state` enables, fetched and loaded.
async fn load(
    fetcher: &Fetcher,
    options: &FollowOptions,
    state: &ClusterState,
    fetch_from: &str,
) -> Result<Vec<Bundle>, FollowError> {
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
        let b = load_one(fetcher, options, name, sha, fetch_from).await?;
        list.push(b.with_settings(settings));
    }
    Ok(list)
}

/// One enabled version: from the cache, else fetched (at most the archive
/// limit, its SHA-256 checked) and unpacked. The SHA comes from a control
/// message, so it is checked before it names a path or URL; unpacking and
/// loading run on a blocking thread.
async fn load_one(
    fetcher: &Fetcher,
    options: &FollowOptions,
    name: &str,
    sha: &str,
    fetch_from: &str,
) -> Result<Bundle, FollowError> {
    if !funcatron_control::fetch::valid_sha(sha) {
        return Err(FetchError::BadSha(sha.to_owned()).into());
    }
    let limits = Limits::default();
    let root = options.cache_dir.join("bundles");
    let have = match cached_dir(&root.join(sha)) {
        Some(dir) => Have::Cached(dir),
        None => Have::Fetched(
            fetcher
                .archive(
                    fetch_from,
                    sha,
                    limits.max_archive_bytes,
                    options.read_token.as_deref(),
                )
                .await?,
        ),
    };
    let (name, sha, env) = (name.to_owned(), sha.to_owned(), options.environment.clone());
    tokio::task::spawn_blocking(move || {
        let dir = match have {
            Have::Cached(dir) => dir,
            Have::Fetched(bytes) => {
                archive::unpack_into(&bytes, &root, &name, limits)
                    .map_err(|source| FollowError::Unpack { sha, source })?
                    .1
            }
        };
        Ok(Bundle::load_in(&dir, env.as_deref())?)
    })
    .await
    .map_err(|e| FollowError::Join(e.to_string()))?
}

/// A version this Runner has unpacked already, or its archive, fetched.
enum Have {
    Cached(PathBuf),
    Fetched(bytes::Bytes),
}

/// The bundle directory of a cached version, if it is there.
fn cached_dir(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path()).filter(|p| p.is_dir())))
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
    let fetcher = match Fetcher::new(options.outbound.clone()) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot fetch archives; serving static bundles only");
            return;
        }
    };
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
        match load(&fetcher, &options, &state, &fetch).await {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use funcatron_control::state::FuncState;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn options(cache: &Path) -> FollowOptions {
        FollowOptions {
            static_bundles: Vec::new(),
            cache_dir: cache.to_owned(),
            environment: None,
            only: Vec::new(),
            read_token: None,
            outbound: OutboundPolicy::new(&["127.0.0.1"]).unwrap(),
        }
    }

    fn fetcher() -> Fetcher {
        Fetcher::new(OutboundPolicy::new(&["127.0.0.1"]).unwrap()).unwrap()
    }

    fn enabling(sha: &str) -> ClusterState {
        let mut state = ClusterState::default();
        state.funcs.insert(
            "s".into(),
            FuncState {
                enabled: Some(sha.to_owned()),
                ..FuncState::default()
            },
        );
        state
    }

    /// A SHA like `../evil` would make `<cache>/bundles/../evil` the
    /// bundle's directory: it is refused before it names any path (or URL).
    #[tokio::test]
    async fn a_sha_that_is_not_one_is_refused_before_it_names_a_path() {
        let cache = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(cache.path().join("bundles")).unwrap();
        let evil = cache.path().join("evil/s");
        std::fs::create_dir_all(&evil).unwrap();
        std::fs::write(
            evil.join("swagger.yaml"),
            "swagger: '2.0'\nbasePath: /s\nx-funcatron: {name: s, runtime: lua}\npaths:\n  /:\n    get: {operationId: hi}\n",
        )
        .unwrap();
        std::fs::write(
            evil.join("main.lua"),
            "return { hi = function() return 'hi' end }",
        )
        .unwrap();

        for sha in ["../evil", "../evil/", &"A".repeat(64)] {
            let e = load(
                &fetcher(),
                &options(cache.path()),
                &enabling(sha),
                "http://127.0.0.1:1",
            )
            .await
            .err()
            .unwrap_or_else(|| panic!("{sha:?} was used as a path"));
            assert!(e.to_string().contains("is not a SHA-256"), "{sha:?}: {e}");
        }
        let cached: Vec<_> = std::fs::read_dir(cache.path().join("bundles"))
            .unwrap()
            .collect();
        assert!(cached.is_empty(), "nothing was written to the cache");
    }

    /// A body past the archive limit is refused while it streams, without
    /// a `Content-Length` to go by; nothing is unpacked.
    #[tokio::test]
    async fn an_archive_larger_than_the_limit_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = conn.read(&mut req).await;
                    let head = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n";
                    if conn.write_all(head).await.is_err() {
                        return;
                    }
                    let chunk = vec![0u8; 1 << 20];
                    let limit = Limits::default().max_archive_bytes;
                    for _ in 0..=(limit >> 20) {
                        if conn.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let cache = tempfile::tempdir().unwrap();
        let sha = funcatron_control::fetch::sha256_hex(b"some archive");
        let e = load(&fetcher(), &options(cache.path()), &enabling(&sha), &base)
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
        assert!(!cache.path().join("bundles").join(&sha).exists());
    }

    /// A control message can name any fetch URL: one at an address the
    /// outbound policy refuses (loopback, not allowed here) is refused
    /// before anything connects to it, by IP literal and by name.
    #[tokio::test]
    async fn a_fetch_url_the_policy_refuses_is_never_connected_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cache = tempfile::tempdir().unwrap();
        let sha = funcatron_control::fetch::sha256_hex(b"some archive");
        let strict = Fetcher::new(OutboundPolicy::default()).unwrap();
        for base in [
            format!("http://127.0.0.1:{port}"),
            format!("http://localhost:{port}"),
            "http://169.254.169.254".to_owned(),
        ] {
            let e = load(&strict, &options(cache.path()), &enabling(&sha), &base)
                .await
                .err()
                .unwrap();
            assert!(
                matches!(e, FollowError::Fetch(FetchError::Refused(_))),
                "{base}: {e}"
            );
        }
        // Non-blocking: a connection made would be waiting in the backlog.
        let listener = listener.into_std().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted = listener.accept();
        assert!(
            accepted
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "something connected to the refused address: {accepted:?}"
        );
    }
}

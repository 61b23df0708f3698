//! The bundle store: archives by SHA-256 and the saved cluster state, in
//! one directory.
//!
//! `blobs/<sha>.tar.gz` (archives), `bundles/<sha>/<name>/` (unpacked),
//! `state.json`. Every write goes to a scratch file or directory and is
//! renamed into place, so a crash never leaves half a bundle or half a
//! state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use funcatron_bundle::archive::{self, Limits};
use funcatron_bundle::Bundle;
use funcatron_control::state::ClusterState;
use tokio::sync::Mutex;

use super::{Check, RegistryError};

/// The store of one Tron.
pub struct Store {
    /// The store directory.
    dir: PathBuf,
    /// Deployment environment the bundles are loaded for (staging rewrites).
    environment: Option<String>,
    /// Archive limits.
    limits: Limits,
    /// Bundles loaded so far, by archive SHA-256.
    loaded: Mutex<HashMap<String, Bundle>>,
}

fn io_err(what: &Path, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::new(500, "store_failed", format!("{}: {e}", what.display()))
}

/// Write `bytes` to `path` atomically (scratch file, then rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let dir = path.parent().ok_or_else(|| io_err(path, "no parent"))?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| io_err(dir, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| io_err(path, e))?;
    tmp.as_file().sync_all().map_err(|e| io_err(path, e))?;
    tmp.persist(path).map_err(|e| io_err(path, e))?;
    Ok(())
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(
        dir: PathBuf,
        environment: Option<String>,
        limits: Limits,
    ) -> Result<Store, RegistryError> {
        std::fs::create_dir_all(dir.join("blobs")).map_err(|e| io_err(&dir, e))?;
        Ok(Store {
            dir,
            environment,
            limits,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved state (empty for a new store).
    pub fn load_state(&self) -> Result<ClusterState, RegistryError> {
        let path = self.dir.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io_err(&path, e)),
            Err(_) => Ok(ClusterState::default()),
        }
    }

    /// Save `state`, atomically.
    pub fn save_state(&self, state: &ClusterState) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))?;
        write_atomic(&self.dir.join("state.json"), &bytes)
    }

    /// Where the archive `sha` is kept (`None` unless `sha` is 64
    /// lower-case hex digits).
    pub fn blob_path(&self, sha: &str) -> Option<PathBuf> {
        funcatron_control::fetch::valid_sha(sha)
            .then(|| self.dir.join("blobs").join(format!("{sha}.tar.gz")))
    }

    /// What the blocking work of [`Store::put`] and [`Store::bundle`] needs.
    fn disk(&self) -> Disk {
        Disk {
            dir: self.dir.clone(),
            environment: self.environment.clone(),
            limits: self.limits,
        }
    }

    /// The bundle stored under `sha`, loaded (for this Tron's environment).
    pub async fn bundle(&self, sha: &str) -> Result<Bundle, RegistryError> {
        if let Some(b) = self.loaded.lock().await.get(sha) {
            return Ok(b.clone());
        }
        let path = self
            .blob_path(sha)
            .filter(|p| p.is_file())
            .ok_or_else(|| RegistryError::new(404, "no_bundle", format!("no bundle {sha}")))?;
        let disk = self.disk();
        let b = blocking(move || disk.load(&path)).await?;
        self.loaded.lock().await.insert(sha.to_owned(), b.clone());
        Ok(b)
    }

    /// Validate and store an archive (limits, document, schemas, and
    /// `check`). `name` names bundles that do not name themselves. A
    /// refused archive leaves nothing in the store. The archive is
    /// unpacked and checked on a blocking thread.
    pub async fn put(
        &self,
        bytes: &[u8],
        name: &str,
        check: Option<&Check>,
    ) -> Result<(String, Bundle), RegistryError> {
        let disk = self.disk();
        let (bytes, name, check) = (bytes.to_vec(), name.to_owned(), check.cloned());
        let (sha, bundle) = blocking(move || disk.put(&bytes, &name, check.as_ref())).await?;
        self.loaded.lock().await.insert(sha.clone(), bundle.clone());
        Ok((sha, bundle))
    }
}

/// Run blocking store work (unpacking, validating, writing) off the async
/// runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))?
}

/// The store's directory and settings, for work on a blocking thread.
struct Disk {
    dir: PathBuf,
    environment: Option<String>,
    limits: Limits,
}

impl Disk {
    /// Unpack (if not yet) and load the archive at `path`.
    fn load(&self, path: &Path) -> Result<Bundle, RegistryError> {
        let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let (_, dir) =
            archive::unpack_into(&bytes, &self.dir.join("bundles"), "bundle", self.limits)
                .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))?;
        Bundle::load_in(&dir, self.environment.as_deref())
            .map_err(|e| RegistryError::new(500, "store_failed", e.to_string()))
    }

    fn put(
        &self,
        bytes: &[u8],
        name: &str,
        check: Option<&Check>,
    ) -> Result<(String, Bundle), RegistryError> {
        let bad = |m: String| RegistryError::new(422, "invalid_bundle", m);
        let (sha, dir) = archive::unpack_into(bytes, &self.dir.join("bundles"), name, self.limits)
            .map_err(|e| bad(e.to_string()))?;
        let loaded = Bundle::load_in(&dir, self.environment.as_deref())
            .and_then(|b| funcatron_bundle::validate::compile_bundle(&b).map(|_| b))
            .map_err(|e| e.to_string())
            .and_then(|b| match check {
                Some(check) => check(&b).map(|()| b).map_err(|e| e.to_string()),
                None => Ok(b),
            });
        let bundle = match loaded {
            Ok(b) => b,
            Err(why) => {
                // Keep nothing of a bundle that is refused.
                let _ = std::fs::remove_dir_all(self.dir.join("bundles").join(&sha));
                return Err(bad(why));
            }
        };
        let blob = self.dir.join("blobs").join(format!("{sha}.tar.gz"));
        if !blob.is_file() {
            write_atomic(&blob, bytes)?;
        }
        Ok((sha, bundle))
    }
}

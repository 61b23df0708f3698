//! Fetching a bundle archive by SHA-256 from a Tron's management API
//! (`GET {base}/v1/bundles/{sha}`) and verifying it: what a Tron does when
//! it adopts a peer's state and what a Runner does for an enabled version
//! it lacks. The archive's bytes are returned only when their SHA-256 is
//! the one asked for.

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request failed or the Tron answered with an error status.
    #[error("{url}: {source}")]
    Http {
        /// What was fetched.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The bytes are not the archive asked for.
    #[error("{url}: the archive's SHA-256 does not match")]
    Mismatch {
        /// What was fetched.
        url: String,
    },
}

/// The SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The archive `sha` from the management API at `base`, verified.
pub async fn fetch_archive(
    http: &reqwest::Client,
    base: &str,
    sha: &str,
) -> Result<Bytes, FetchError> {
    let url = format!("{}/v1/bundles/{sha}", base.trim_end_matches('/'));
    let http_err = |source| FetchError::Http {
        url: url.clone(),
        source,
    };
    let bytes = http
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(http_err)?
        .bytes()
        .await
        .map_err(http_err)?;
    if sha256_hex(&bytes) != sha {
        return Err(FetchError::Mismatch { url });
    }
    Ok(bytes)
}

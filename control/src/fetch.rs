//! Fetching a bundle archive by SHA-256 from a Tron's management API
//! (`GET {base}/v1/bundles/{sha}`) and verifying it: what a Tron does when
//! it adopts a peer's state and what a Runner does for an enabled version
//! it lacks. Both take the SHA and the base URL from a control message, so
//! both are checked first: the SHA is 64 lower-case hex digits (it becomes
//! a path and part of the URL), the URL is `http` or `https`. The body is
//! read as a stream and refused once it passes the size limit (whatever
//! `Content-Length` says); the bytes are returned only when their SHA-256
//! is the one asked for. The request goes only where the outbound address
//! policy ([`crate::outbound`]) allows: a forged control message cannot
//! point a node at its cloud's metadata service or an internal service.

use bytes::{Bytes, BytesMut};

use crate::outbound::{OutboundError, OutboundPolicy};
use sha2::{Digest, Sha256};

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not a SHA-256 (64 lower-case hex digits); nothing was fetched.
    #[error("{0:?} is not a SHA-256 (64 lower-case hex digits)")]
    BadSha(String),
    /// The outbound policy refuses the URL's address; nothing was fetched.
    #[error(transparent)]
    Refused(#[from] OutboundError),
    /// Not an `http` or `https` URL; nothing was fetched.
    #[error("{url:?}: {why}")]
    BadUrl {
        /// The base URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The request failed or the Tron answered with an error status.
    #[error("{url}: {source}")]
    Http {
        /// What was fetched.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The body is larger than the limit.
    #[error("{url}: the archive is larger than the limit of {max} bytes")]
    TooLarge {
        /// What was fetched.
        url: String,
        /// The limit.
        max: u64,
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

/// Is `sha` a SHA-256 as [`sha256_hex`] writes it (64 lower-case hex
/// digits)? Only such a SHA may become part of a path or URL.
pub fn valid_sha(sha: &str) -> bool {
    sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The URL of archive `sha` under the management API at `base`, checked.
fn archive_url(base: &str, sha: &str) -> Result<String, FetchError> {
    if !valid_sha(sha) {
        return Err(FetchError::BadSha(sha.to_owned()));
    }
    let bad = |why: String| FetchError::BadUrl {
        url: base.to_owned(),
        why,
    };
    let parsed = reqwest::Url::parse(base).map_err(|e| bad(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not http or https",
            parsed.scheme()
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a base URL has no query or fragment".into()));
    }
    Ok(format!("{}/v1/bundles/{sha}", base.trim_end_matches('/')))
}

/// Fetches archives from Trons' management APIs, only where the outbound
/// policy allows (a fetch URL comes from a control message, which any
/// broker user can publish): see [`crate::outbound`].
#[derive(Clone, Debug)]
pub struct Fetcher {
    http: reqwest::Client,
    policy: OutboundPolicy,
}

impl Fetcher {
    /// A fetcher sending only where `policy` allows.
    pub fn new(policy: OutboundPolicy) -> Result<Self, FetchError> {
        let http = policy
            .client(reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT))
            .map_err(|source| FetchError::Http {
                url: String::new(),
                source,
            })?;
        Ok(Fetcher { http, policy })
    }

    /// The archive `sha` from the management API at `base`, at most
    /// `max_bytes` long, verified. `token` (the Tron's read token) goes in
    /// `Authorization: Bearer`: downloads need it.
    pub async fn archive(
        &self,
        base: &str,
        sha: &str,
        max_bytes: u64,
        token: Option<&str>,
    ) -> Result<Bytes, FetchError> {
        let url = archive_url(base, sha)?;
        self.policy.check_url(&url)?;
        let http_err = |source: reqwest::Error| match refusal(&source) {
            Some(e) => FetchError::Refused(e),
            None => FetchError::Http {
                url: url.clone(),
                source,
            },
        };
        let too_large = || FetchError::TooLarge {
            url: url.clone(),
            max: max_bytes,
        };
        let mut rb = self.http.get(&url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let mut resp = rb
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(http_err)?;
        if resp.content_length().is_some_and(|n| n > max_bytes) {
            return Err(too_large());
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
            if body.len() as u64 + chunk.len() as u64 > max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let bytes = body.freeze();
        if sha256_hex(&bytes) != sha {
            return Err(FetchError::Mismatch { url });
        }
        Ok(bytes)
    }
}

/// How long connecting to a Tron may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The policy's refusal behind a failed request (refused after a name
/// resolved), as the policy wrote it.
fn refusal(e: &reqwest::Error) -> Option<OutboundError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(OutboundError::Refused { url, ip, class }) = err.downcast_ref::<OutboundError>()
        {
            return Some(OutboundError::Refused {
                url: url.clone(),
                ip: *ip,
                class,
            });
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_case_sha256_hex_is_a_sha() {
        assert!(valid_sha(&sha256_hex(b"x")));
        assert!(!valid_sha(&sha256_hex(b"x").to_uppercase()));
        assert!(!valid_sha("../../etc/passwd"));
        assert!(!valid_sha(&format!("{}/", &sha256_hex(b"x")[..63])));
    }

    #[test]
    fn only_http_and_https_base_urls_are_fetched() {
        let sha = sha256_hex(b"x");
        assert!(archive_url("http://tron:8081", &sha).is_ok());
        assert!(archive_url("https://tron", &sha).is_ok());
        for base in ["file:///etc", "ftp://tron", "tron:8081", "http://tron/?x="] {
            assert!(
                matches!(archive_url(base, &sha), Err(FetchError::BadUrl { .. })),
                "{base}"
            );
        }
    }
}

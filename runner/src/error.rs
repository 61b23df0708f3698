//! The Runner's errors. Their texts are what users see (in 500 answers,
//! `funcatron dev` and the logs), so they are kept word for word.

use funcatron_bundle::BundleError;

/// Why a bundle version cannot be served here.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A declared secret is not supplied.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Its API document's schemas do not compile.
    #[error(transparent)]
    Schema(#[from] BundleError),
    /// Its Lua code does not load.
    #[error("{0}")]
    Lua(String),
    /// Preparing or starting its worker processes failed.
    #[error("{0}")]
    Worker(String),
}

/// A declared secret this Runner cannot supply.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The Runner has no secrets directory.
    #[error("secret `{0}` is not supplied: this Runner has no --secrets-dir")]
    NoSecretsDir(String),
    /// Neither file is there.
    #[error("secret `{name}` is not supplied: expected {per_func} or {shared}")]
    Missing {
        /// The secret.
        name: String,
        /// `<dir>/<func>/<NAME>`.
        per_func: String,
        /// `<dir>/<NAME>`.
        shared: String,
    },
}

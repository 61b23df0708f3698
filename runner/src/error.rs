//! The Runner's errors. Their texts are what users see (in the logs,
//! `funcatron dev` and the answers of Funcs with `debug` on; other clients
//! get a generic message, see [`crate::invoke::InvokeError::client_message`]),
//! so they are kept word for word.

use std::path::{Path, PathBuf};

use funcatron_bundle::archive::ArchiveError;
use funcatron_bundle::BundleError;

use crate::worker::frame::FrameError;

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
    /// Its processes cannot be isolated here (and isolation is required).
    #[error(
        "Func isolation is unavailable on this Runner, so worker and exec Funcs are refused: {0}"
    )]
    Sandbox(String),
    /// Preparing or starting its worker processes failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// Why a worker-process bundle could not be prepared or a worker started.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Creating a directory for a shim failed.
    #[error("{0}")]
    Dir(std::io::Error),
    /// The cache directory is a root.
    #[error("cache path has no parent")]
    CacheRoot,
    /// A build step could not start.
    #[error("{what}: cannot start: {source}")]
    Spawn {
        /// The step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A build step failed.
    #[error("{what} failed ({status}):\n{tail}")]
    Build {
        /// The step.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its output.
        tail: String,
    },
    /// Installing `requirements.txt` failed.
    #[error("requirements.txt: {0}")]
    Requirements(Box<WorkerError>),
    /// A Java bundle without sources.
    #[error("field `handler`: no .java files under {0}")]
    NoJavaSources(String),
    /// Not a runtime of worker processes.
    #[error("{0} is not a worker-process runtime")]
    NotWorker(&'static str),
    /// The worker's socket could not be bound.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The worker process could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Start {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Accepting the worker's connection failed.
    #[error("accepting the worker: {0}")]
    Accept(std::io::Error),
    /// The worker exited before it was ready.
    #[error("the worker exited ({status}) before it was ready: {stderr}")]
    Exited {
        /// Its exit status (or why that is unknown).
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The worker did not connect in time.
    #[error("the worker did not connect within {0} ms")]
    NoConnect(u128),
    /// The worker said its bundle does not load, and why.
    #[error("{0}")]
    Load(String),
    /// The worker's first frame was not `ready`.
    #[error("the worker sent something other than `ready`")]
    NotReady,
    /// Reading the worker's first frame failed.
    #[error("{source}: {stderr}")]
    Frame {
        /// Why.
        source: FrameError,
        /// The end of its stderr.
        stderr: String,
    },
    /// The worker did not load its bundle in time.
    #[error("the worker did not load its bundle within {0} ms")]
    LoadTimeout(u128),
}

impl WorkerError {
    /// An I/O failure on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
        move |source| WorkerError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Why a registry state could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// Fetching the archive failed, or it is not the one announced.
    #[error(transparent)]
    Fetch(#[from] funcatron_control::fetch::FetchError),
    /// The archive does not unpack.
    #[error("bundle {sha}: {source}")]
    Unpack {
        /// The archive's SHA-256.
        sha: String,
        /// Why.
        source: ArchiveError,
    },
    /// The unpacked bundle does not load.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The blocking task that unpacks and loads a bundle failed.
    #[error("unpacking a bundle: {0}")]
    Join(String),
}

/// Why a delivery cannot be handled (it goes to the dead-letter queue).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// It did not come through a Tron.
    #[error("no operation header: the message did not come through a Tron")]
    NoOperation,
    /// Its path parameters are not a JSON object.
    #[error("bad {header} header: {source}", header = funcatron_control::headers::PATH_PARAMS)]
    PathParams {
        /// Why.
        source: serde_json::Error,
    },
}

/// A declared secret this Runner cannot supply.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The Runner has no secrets directory.
    #[error("secret `{0}` is not supplied: this Runner has no --secrets-dir")]
    NoSecretsDir(String),
    /// Not a variable name, so not a file this Runner reads.
    #[error("secret {0:?} is not a usable secret name (letters, digits, _; not FUNCATRON_*)")]
    BadName(String),
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

//! The Tron's command-line options (flattened into `funcatron tron` and
//! `funcatron up`); each default is defined once, here or beside the
//! options it gives ([`TronOptions`], [`ScaleArgs`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::autoscale::ScaleArgs;
use crate::dispatch::{TronOptions, DEFAULT_PREFETCH};

/// Default address of the management API.
pub const DEFAULT_MGMT_LISTEN: &str = "127.0.0.1:9090";
/// Default largest bundle archive, in bytes.
pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// Tron flags.
#[derive(clap::Args, Clone, Debug)]
pub struct TronArgs {
    /// Requests one Tron dispatches concurrently (AMQP prefetch on the request queue).
    #[arg(long, env = "FUNCATRON_TRON_PREFETCH", default_value_t = DEFAULT_PREFETCH)]
    pub tron_prefetch: u16,
    /// Bundle store directory: turns on the registry and its management API
    /// (uploaded bundles, enabled versions; survives restarts).
    #[arg(long, env = "FUNCATRON_STORE")]
    pub store: Option<PathBuf>,
    /// Address the management API listens on (with --store).
    #[arg(long, env = "FUNCATRON_MGMT_LISTEN", default_value = DEFAULT_MGMT_LISTEN)]
    pub mgmt_listen: SocketAddr,
    /// The management API's URL as other Trons and Runners reach it
    /// (default: http://<mgmt-listen>).
    #[arg(long, env = "FUNCATRON_ADVERTISE")]
    pub advertise: Option<String>,
    /// Management token (default: --token-file, else <store>/token,
    /// generated and printed once at first start).
    #[arg(long, env = "FUNCATRON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the management token.
    #[arg(long, env = "FUNCATRON_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Largest bundle archive accepted, in bytes.
    #[arg(long, env = "FUNCATRON_MAX_UPLOAD_BYTES", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: usize,
    /// The autoscaler's flags.
    #[command(flatten)]
    pub scale: ScaleArgs,
}

impl TronArgs {
    /// The dispatcher options these flags give.
    pub fn options(&self) -> TronOptions {
        TronOptions {
            prefetch: self.tron_prefetch,
        }
    }

    /// The management API's URL as peers reach it.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.mgmt_listen))
    }
}

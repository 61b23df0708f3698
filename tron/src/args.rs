//! The Tron's command-line options (flattened into `funcatron tron` and
//! `funcatron up`); each default is defined once, here or beside the
//! options it gives ([`TronOptions`], [`ScaleArgs`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::autoscale::ScaleArgs;
use crate::dispatch::{TronOptions, DEFAULT_PREFETCH};
use crate::registry::{Ceilings, DEFAULT_MAX_FUNC_MEMORY_MB, DEFAULT_MAX_FUNC_TIMEOUT_MS};
use funcatron_control::state::{DEFAULT_REDACT_JSON_FIELDS, DEFAULT_REDACT_QUERY};

fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

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
    /// Where asynchronous calls are recorded (their outcomes applied,
    /// retries scheduled): `postgres://user:pass@host/db` (shared by every
    /// Tron and ingress), a file path (embedded, one process), or
    /// `memory:`. `funcatron up` defaults to `<store>/records.redb`, or
    /// memory without --store.
    #[arg(long, env = "FUNCATRON_STATE_STORE")]
    pub state_store: Option<String>,
    /// Which key signs async callbacks (`x-funcatron-signature`): `func`, a
    /// key per Func derived from the cluster key, or `cluster`, one key
    /// for all (`funcatron callback-key [--func NAME]` prints it).
    #[arg(long, env = "FUNCATRON_CALLBACK_KEY_SCOPE", default_value = "func")]
    pub callback_key_scope: funcatron_calls::callbacks::KeyScope,
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
    /// Read-only management token: reads and archive downloads, no
    /// changes; what Runners and peer Trons fetch with (default:
    /// <store>/read-token, generated and printed once at first start).
    /// Runners the autoscaler starts get it as FUNCATRON_READ_TOKEN.
    #[arg(long, env = "FUNCATRON_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// Largest `timeout_ms` a bundle or its settings may ask for.
    #[arg(long, env = "FUNCATRON_MAX_FUNC_TIMEOUT_MS", default_value_t = DEFAULT_MAX_FUNC_TIMEOUT_MS)]
    pub max_func_timeout_ms: u64,
    /// Largest `memory_mb` a bundle or its settings may ask for.
    #[arg(long, env = "FUNCATRON_MAX_FUNC_MEMORY_MB", default_value_t = DEFAULT_MAX_FUNC_MEMORY_MB)]
    pub max_func_memory_mb: usize,
    /// Query parameters whose values every capture redacts (comma-separated;
    /// replaces the default list).
    #[arg(long, env = "FUNCATRON_REDACT_QUERY", value_delimiter = ',',
        default_values_t = owned(DEFAULT_REDACT_QUERY))]
    pub redact_query: Vec<String>,
    /// JSON body fields (at any depth) whose values every capture redacts
    /// (comma-separated; replaces the default list).
    #[arg(long = "redact-json-field", env = "FUNCATRON_REDACT_JSON_FIELDS", value_delimiter = ',',
        default_values_t = owned(DEFAULT_REDACT_JSON_FIELDS))]
    pub redact_json_fields: Vec<String>,
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

    /// The operator's ceilings on Funcs' timeouts and memory.
    pub fn ceilings(&self) -> Ceilings {
        Ceilings {
            max_timeout_ms: self.max_func_timeout_ms,
            max_memory_mb: self.max_func_memory_mb,
        }
    }

    /// The management API's URL as peers reach it.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.mgmt_listen))
    }
}

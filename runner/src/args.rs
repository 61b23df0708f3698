//! The Runner's command-line options (flattened into `funcatron runner`,
//! `up` and `dev`); each default is defined once, here, and also gives
//! [`RunnerOptions::default`].

use std::path::PathBuf;
use std::time::Duration;

use crate::exec::ExecLimits;
use crate::lua::LuaLimits;
use crate::serve::{default_cache_dir, RunnerOptions};

/// Default requests held per Func queue.
pub const DEFAULT_PREFETCH: u16 = 64;
/// Default time limit of one invocation, in milliseconds.
pub const DEFAULT_FUNC_TIMEOUT_MS: u64 = 10_000;
/// Default largest answer (body and headers) a Func may give, in bytes.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;
/// Default memory limit of a Lua Func's state, in MiB.
pub const DEFAULT_FUNC_MEMORY_MB: usize = 64;
/// Default address-space limit of an exec Func's process, in MiB.
pub const DEFAULT_EXEC_MEMORY_MB: usize = 1024;
/// Default memory limit of a Python, Node.js or Java worker, in MiB.
pub const DEFAULT_WORKER_MEMORY_MB: usize = 512;
/// How long a worker process may take to start and connect.
pub const WORKER_START_TIMEOUT: Duration = Duration::from_secs(30);

const MIB: usize = 1024 * 1024;

/// One per CPU (the default of Lua threads and worker processes).
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Runner flags.
#[derive(clap::Args, Clone, Debug)]
pub struct RunnerArgs {
    /// Requests held per Func queue (AMQP prefetch).
    #[arg(long, env = "FUNCATRON_RUNNER_PREFETCH", default_value_t = DEFAULT_PREFETCH)]
    pub runner_prefetch: u16,
    /// Lua worker threads; default: one per CPU.
    #[arg(long, env = "FUNCATRON_WORKERS")]
    pub workers: Option<usize>,
    /// Default time limit of one Func invocation, in milliseconds.
    #[arg(long, env = "FUNCATRON_FUNC_TIMEOUT_MS", default_value_t = DEFAULT_FUNC_TIMEOUT_MS)]
    pub func_timeout_ms: u64,
    /// Largest answer (body and headers) a Func may give, in bytes; the
    /// answer travels as one message, a larger one is answered 502.
    #[arg(long, env = "FUNCATRON_MAX_REPLY_BYTES", default_value_t = DEFAULT_MAX_REPLY_BYTES)]
    pub max_reply_bytes: usize,
    /// Default memory limit of a Func's Lua state, in MiB.
    #[arg(long, env = "FUNCATRON_FUNC_MEMORY_MB", default_value_t = DEFAULT_FUNC_MEMORY_MB)]
    pub func_memory_mb: usize,
    /// Default address-space limit of an exec Func's process, in MiB.
    #[arg(long, env = "FUNCATRON_EXEC_MEMORY_MB", default_value_t = DEFAULT_EXEC_MEMORY_MB)]
    pub exec_memory_mb: usize,
    /// Worker processes per Python, Node.js or Java Func (a bundle's
    /// `concurrency` wins); default: one per CPU.
    #[arg(long, env = "FUNCATRON_WORKER_PROCESSES")]
    pub worker_processes: Option<usize>,
    /// Default memory limit of a Python, Node.js or Java worker, in MiB.
    #[arg(long, env = "FUNCATRON_WORKER_MEMORY_MB", default_value_t = DEFAULT_WORKER_MEMORY_MB)]
    pub worker_memory_mb: usize,
    /// Where Python environments and compiled Java are cached; default
    /// `$XDG_CACHE_HOME/funcatron` or `~/.cache/funcatron`.
    #[arg(long, env = "FUNCATRON_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Directory of secret values: `<dir>/<func>/<NAME>` or `<dir>/<NAME>`.
    #[arg(long, env = "FUNCATRON_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// The bubblewrap program worker and exec Funcs are isolated with.
    #[arg(long, env = "FUNCATRON_BWRAP", default_value = "bwrap")]
    pub bwrap: PathBuf,
    /// INSECURE: run worker and exec Funcs without isolation (as plain child
    /// processes that can read this Runner's environment, every Func's
    /// secrets and bundles). Only where the container is the boundary and
    /// bubblewrap cannot work in it (see docs/runtimes.md).
    #[arg(long, env = "FUNCATRON_INSECURE_NO_SANDBOX")]
    pub insecure_no_sandbox: bool,
    /// Serve only this Func (repeat for more; default: every Func). The
    /// autoscaler starts Runners with one `--func` each.
    #[arg(long = "func", env = "FUNCATRON_FUNCS", value_delimiter = ',')]
    pub funcs: Vec<String>,
    /// NOT FOR PRODUCTION: answer every Func's failures with their full
    /// detail (tracebacks, file paths, stderr, build output) instead of a
    /// generic message pointing at the Func's log. One Func's `debug`
    /// setting does this for that Func; `funcatron dev` always does.
    #[arg(long, env = "FUNCATRON_DEBUG_ERRORS")]
    pub debug_errors: bool,
    /// Check every Func's answers against its document's `responses`
    /// (status codes, content types, body schemas) and report mismatches
    /// in the logs and `runner_response_mismatches_total`; answers are not
    /// changed. One Func's `check_responses` setting does this for that
    /// Func; `funcatron dev` always does.
    #[arg(long, env = "FUNCATRON_CHECK_RESPONSES")]
    pub check_responses: bool,
    /// Where the Runner's direct listener binds (direct mode: large
    /// bodies and streamed answers travel over HTTP between the ingress
    /// and this listener). Default: a free port on loopback, which
    /// ingresses on the same host reach; in a cluster bind `0.0.0.0:PORT`
    /// and set `--direct-advertise`.
    #[arg(long, env = "FUNCATRON_DIRECT_LISTEN", default_value = "127.0.0.1:0")]
    pub direct_listen: std::net::SocketAddr,
    /// `host:port` at which ingresses reach the direct listener (on
    /// Kubernetes the pod IP, on Docker the container's name); default:
    /// the bound address (the host name when bound to `0.0.0.0`). Named
    /// apart from the Tron's `--advertise` (`funcatron up` has both).
    #[arg(long, env = "FUNCATRON_DIRECT_ADVERTISE")]
    pub direct_advertise: Option<String>,
    /// How long a direct ticket may wait for the ingress to claim it.
    #[arg(long, env = "FUNCATRON_DIRECT_TICKET_TTL_MS", default_value_t = crate::direct::DEFAULT_TICKET_TTL_MS)]
    pub direct_ticket_ttl_ms: u64,
    /// Largest direct body read whole for a Func that does not read its
    /// body in pieces.
    #[arg(long, env = "FUNCATRON_MAX_DIRECT_BUFFERED_BYTES", default_value_t = crate::direct::DEFAULT_MAX_BUFFERED_BYTES)]
    pub max_direct_buffered_bytes: usize,
    /// Largest direct body streamed to a Func (the ingress's
    /// `--max-direct-body-bytes` is checked first; this is the Runner's
    /// own bound on what its listener takes).
    #[arg(long, env = "FUNCATRON_RUNNER_MAX_DIRECT_BODY_BYTES", default_value_t = crate::direct::DEFAULT_MAX_DIRECT_BODY_BYTES)]
    pub runner_max_direct_body_bytes: u64,
    /// Where pipelines' large `set` values are kept instead of in their
    /// envelopes (`postgres://...`, shared by every Runner of the
    /// cluster; a path or `memory:` for one process). `funcatron up`
    /// uses its own state store. Without: values travel inline.
    #[arg(long, env = "FUNCATRON_FLOW_STORE", hide_env_values = true)]
    pub flow_store: Option<String>,
    /// A `set` value whose JSON is longer than this goes to the flow
    /// store.
    #[arg(long, env = "FUNCATRON_FLOW_INLINE_BYTES", default_value_t = crate::flow::DEFAULT_INLINE_BYTES)]
    pub flow_inline_bytes: usize,
}

/// Where a Runner finds the Tron's read token (it fetches archives with
/// it). An environment variable only, never an argument: argv is visible
/// to every user of the host.
pub const READ_TOKEN_ENV: &str = "FUNCATRON_READ_TOKEN";

/// The cluster secret pipelines' state is signed with
/// ([`crate::flow`]); without it the read token serves. An environment
/// variable only, like the read token.
pub const FLOW_KEY_ENV: &str = "FUNCATRON_FLOW_KEY";

/// The read token from [`READ_TOKEN_ENV`], if set.
pub fn read_token_from_env() -> Option<String> {
    std::env::var(READ_TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

impl RunnerArgs {
    /// The Runner options these flags give.
    pub fn options(&self) -> RunnerOptions {
        let timeout = Duration::from_millis(self.func_timeout_ms);
        let workers = self.workers.unwrap_or_else(cpus).max(1);
        RunnerOptions {
            prefetch: self.runner_prefetch,
            max_reply_bytes: self.max_reply_bytes,
            workers,
            lua_limits: LuaLimits {
                timeout,
                memory_bytes: self.func_memory_mb * MIB,
            },
            exec_limits: ExecLimits {
                timeout,
                memory_bytes: self.exec_memory_mb * MIB,
            },
            worker: crate::worker::WorkerOptions {
                timeout,
                memory_bytes: self.worker_memory_mb * MIB,
                concurrency: self.worker_processes.unwrap_or_else(cpus).max(1),
                cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
                start_timeout: WORKER_START_TIMEOUT,
            },
            secrets_dir: self.secrets_dir.clone(),
            sandbox: crate::sandbox::SandboxOptions {
                bwrap: self.bwrap.clone(),
                insecure_no_sandbox: self.insecure_no_sandbox,
            },
            debug_errors: self.debug_errors,
            check_responses: self.check_responses,
            direct: crate::direct::DirectOptions {
                listen: self.direct_listen,
                advertise: self.direct_advertise.clone(),
                ticket_ttl: Duration::from_millis(self.direct_ticket_ttl_ms),
                max_buffered_bytes: self.max_direct_buffered_bytes,
                max_body_bytes: self.runner_max_direct_body_bytes,
            },
            flow_key: std::env::var(FLOW_KEY_ENV)
                .ok()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .or_else(read_token_from_env),
            flow_outbound: Default::default(),
            flow_store: self.flow_store.clone().map(crate::flow::FlowStore::Url),
            flow_inline_bytes: self.flow_inline_bytes,
        }
    }
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerArgs {
            runner_prefetch: DEFAULT_PREFETCH,
            workers: None,
            func_timeout_ms: DEFAULT_FUNC_TIMEOUT_MS,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            func_memory_mb: DEFAULT_FUNC_MEMORY_MB,
            exec_memory_mb: DEFAULT_EXEC_MEMORY_MB,
            worker_processes: None,
            worker_memory_mb: DEFAULT_WORKER_MEMORY_MB,
            cache_dir: None,
            secrets_dir: None,
            bwrap: PathBuf::from("bwrap"),
            insecure_no_sandbox: false,
            funcs: Vec::new(),
            debug_errors: false,
            check_responses: false,
            direct_listen: crate::direct::DirectOptions::default().listen,
            direct_advertise: None,
            direct_ticket_ttl_ms: crate::direct::DEFAULT_TICKET_TTL_MS,
            flow_store: None,
            flow_inline_bytes: crate::flow::DEFAULT_INLINE_BYTES,
            max_direct_buffered_bytes: crate::direct::DEFAULT_MAX_BUFFERED_BYTES,
            runner_max_direct_body_bytes: crate::direct::DEFAULT_MAX_DIRECT_BODY_BYTES,
        }
        .options()
    }
}

impl Default for LuaLimits {
    fn default() -> Self {
        LuaLimits {
            timeout: Duration::from_millis(DEFAULT_FUNC_TIMEOUT_MS),
            memory_bytes: DEFAULT_FUNC_MEMORY_MB * MIB,
        }
    }
}

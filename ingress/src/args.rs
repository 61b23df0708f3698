//! The ingress's command-line options (flattened into `funcatron ingress`
//! and `funcatron up`); each default is defined once, here, and also
//! gives [`IngressOptions::default`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::edge::Routing;
use crate::IngressOptions;

/// Default address the HTTP ingress listens on.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default largest request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Default request deadline, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Default size past which a synchronous request's body goes in direct
/// mode, in bytes.
pub const DEFAULT_DIRECT_THRESHOLD_BYTES: usize = 1024 * 1024;
/// Default largest body in direct mode, in bytes.
pub const DEFAULT_MAX_DIRECT_BODY_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Default most requests waiting at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;

/// Ingress flags.
#[derive(clap::Args, Clone, Debug)]
pub struct IngressArgs {
    /// Address the HTTP ingress listens on.
    #[arg(long, env = "FUNCATRON_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Largest request body queued in its envelope, in bytes (async
    /// calls, and synchronous ones up to the direct threshold); larger
    /// ones get 413.
    #[arg(long, env = "FUNCATRON_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Synchronous requests with a larger body go in direct mode: only
    /// the head is queued and the body streams to the Runner over HTTP;
    /// 0: never by size (direct routes and `Accept: text/event-stream`
    /// still go direct).
    #[arg(long, env = "FUNCATRON_DIRECT_THRESHOLD_BYTES", default_value_t = DEFAULT_DIRECT_THRESHOLD_BYTES)]
    pub direct_threshold_bytes: usize,
    /// Largest body of a request in direct mode, in bytes.
    #[arg(long, env = "FUNCATRON_MAX_DIRECT_BODY_BYTES", default_value_t = DEFAULT_MAX_DIRECT_BODY_BYTES)]
    pub max_direct_body_bytes: u64,
    /// How long a request waits for its answer before 504, in milliseconds.
    #[arg(long, env = "FUNCATRON_TIMEOUT_MS", default_value_t = DEFAULT_TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// Most requests waiting at once; more get 429.
    #[arg(long, env = "FUNCATRON_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Where asynchronous calls are recorded (the Trons' state store:
    /// `postgres://...`); without one only fire-and-forget calls are
    /// accepted. `funcatron up` shares its Tron's.
    #[arg(long = "calls-store", env = "FUNCATRON_CALLS_STORE")]
    pub calls_store: Option<String>,
    /// Who routes requests: `edge` (this ingress, by the route table the
    /// Trons push, straight onto the Func's queue; through a Tron while
    /// it has no current table) or `tron` (every request through a Tron,
    /// one broker hop more).
    #[arg(long, env = "FUNCATRON_ROUTING", value_enum, default_value_t = Routing::Edge)]
    pub routing: Routing,
}

impl IngressArgs {
    /// The ingress options these flags give.
    pub fn options(&self) -> IngressOptions {
        IngressOptions {
            max_body_bytes: self.max_body_bytes,
            timeout: Duration::from_millis(self.timeout_ms),
            max_in_flight: self.max_in_flight,
            routing: self.routing,
            direct_threshold_bytes: self.direct_threshold_bytes,
            max_direct_body_bytes: self.max_direct_body_bytes,
            ..IngressOptions::default()
        }
    }
}

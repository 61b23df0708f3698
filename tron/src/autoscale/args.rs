//! The autoscaler's command-line options (flattened into `funcatron tron`
//! and `funcatron up`); each default is defined once (the constants of
//! [`super::policy`]) and also gives [`ScaleParams::default`].

use std::time::Duration;

use super::policy::{
    DEFAULT_DRAIN_MS, DEFAULT_MAX_RUNNERS, DEFAULT_MIN_RUNNERS, DEFAULT_SCALE_DOWN_DELAY_MS,
    DEFAULT_SERVICE_MS, DEFAULT_TARGET_CONCURRENCY, DEFAULT_TOLERANCE,
};
use super::{AutoscalerOptions, ScaleParams, DEFAULT_TICK_MS};

/// Autoscaler flags (on `tron` and `up`).
#[derive(clap::Args, Clone, Debug)]
pub struct ScaleArgs {
    /// Where the autoscaler runs Runners: `process` (child processes; on the
    /// embedded broker, tasks of `up`), `docker`, `swarm`, `kubernetes`,
    /// `marathon`, or `none` (you run Runners yourself). Default: `process`
    /// for `up`, `none` for `tron`.
    #[arg(long, env = "FUNCATRON_SUBSTRATE")]
    pub substrate: Option<String>,
    /// Fewest Runners per Func (0 allows scale to zero); a Func's
    /// `--min-runners` at enable wins.
    #[arg(long, env = "FUNCATRON_MIN_RUNNERS", default_value_t = DEFAULT_MIN_RUNNERS)]
    pub min_runners: u32,
    /// Most Runners per Func.
    #[arg(long, env = "FUNCATRON_MAX_RUNNERS", default_value_t = DEFAULT_MAX_RUNNERS)]
    pub max_runners: u32,
    /// Requests one Runner should handle at once.
    #[arg(long, env = "FUNCATRON_TARGET_CONCURRENCY", default_value_t = DEFAULT_TARGET_CONCURRENCY)]
    pub target_concurrency: f64,
    /// How long demand must stay lower before Runners are removed, in ms.
    #[arg(long, env = "FUNCATRON_SCALE_DOWN_DELAY_MS", default_value_t = DEFAULT_SCALE_DOWN_DELAY_MS)]
    pub scale_down_delay_ms: u64,
    /// Drain a backlog within this time, in ms.
    #[arg(long, env = "FUNCATRON_DRAIN_MS", default_value_t = DEFAULT_DRAIN_MS)]
    pub drain_ms: u64,
    /// Relative excess over the current Runners that is ignored (0.1 = 10%).
    #[arg(long, env = "FUNCATRON_SCALE_TOLERANCE", default_value_t = DEFAULT_TOLERANCE)]
    pub scale_tolerance: f64,
    /// Service time assumed before Runners report one, in ms.
    #[arg(long, env = "FUNCATRON_DEFAULT_SERVICE_MS", default_value_t = DEFAULT_SERVICE_MS)]
    pub default_service_ms: f64,
    /// How often signals are read and decisions made, in ms.
    #[arg(long, env = "FUNCATRON_SCALE_TICK_MS", default_value_t = DEFAULT_TICK_MS)]
    pub scale_tick_ms: u64,
    /// Extra argument for every Runner the substrate starts (repeatable),
    /// e.g. `--runner-arg=--secrets-dir=/run/secrets`.
    #[arg(long = "runner-arg", allow_hyphen_values = true)]
    pub runner_args: Vec<String>,
    /// The Runner image (`docker`, `swarm`).
    #[arg(
        long,
        env = "FUNCATRON_RUNNER_IMAGE",
        default_value = "funcatron-runner:latest"
    )]
    pub runner_image: String,
    /// Network of Runner containers (`docker`, `swarm`); `host` reaches a
    /// broker on the host's loopback.
    #[arg(long, env = "FUNCATRON_DOCKER_NETWORK", default_value = "host")]
    pub docker_network: String,
    /// Bind mount for Runner containers, HOST:CONTAINER[:ro] (repeatable).
    #[arg(long = "docker-bind")]
    pub docker_binds: Vec<String>,
    /// Namespace of the Runner Deployments (`kubernetes`).
    #[arg(long, env = "FUNCATRON_K8S_NAMESPACE", default_value = "funcatron")]
    pub kubernetes_namespace: String,
    /// Deployment per Func, `{func}` replaced by the Func's name
    /// (`kubernetes`); without `{func}`, one shared Deployment.
    #[arg(
        long,
        env = "FUNCATRON_K8S_DEPLOYMENT",
        default_value = "funcatron-runner-{func}"
    )]
    pub kubernetes_deployment: String,
    /// The API server (`kubernetes`); default: in-cluster or kubeconfig.
    #[arg(long, env = "FUNCATRON_K8S_API")]
    pub kubernetes_api: Option<String>,
    /// Marathon's base URL (`marathon`).
    #[arg(long, env = "FUNCATRON_MARATHON_URL")]
    pub marathon_url: Option<String>,
    /// Marathon app per Func, `{func}` replaced by the Func's name.
    #[arg(
        long,
        env = "FUNCATRON_MARATHON_APP",
        default_value = "/funcatron/runner-{func}"
    )]
    pub marathon_app: String,
}

impl ScaleArgs {
    /// The autoscaler options these flags give.
    pub fn options(&self) -> AutoscalerOptions {
        AutoscalerOptions {
            defaults: ScaleParams {
                min: self.min_runners,
                max: self.max_runners,
                target_concurrency: self.target_concurrency,
                scale_down_delay: Duration::from_millis(self.scale_down_delay_ms),
                drain: Duration::from_millis(self.drain_ms),
                tolerance: self.scale_tolerance,
                default_service_ms: self.default_service_ms,
            },
            tick: Duration::from_millis(self.scale_tick_ms.max(10)),
        }
    }
}

//! The Tron's autoscaler settings and the substrate they choose.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use funcatron_tron::autoscale::docker::{ContainerTemplate, DockerSubstrate, SwarmSubstrate};
use funcatron_tron::autoscale::kubernetes::KubernetesSubstrate;
use funcatron_tron::autoscale::marathon::MarathonSubstrate;
use funcatron_tron::autoscale::{
    AutoscalerOptions, ProcessSubstrate, RunnerCommand, ScaleParams, Substrate,
};

use crate::BundleArgs;

/// Autoscaler flags (on `tron` and `up`).
#[derive(Args, Clone, Debug)]
pub struct ScaleOpts {
    /// Where the autoscaler runs Runners: `process` (child processes; on the
    /// embedded broker, tasks of `up`), `docker`, `swarm`, `kubernetes`,
    /// `marathon`, or `none` (you run Runners yourself). Default: `process`
    /// for `up`, `none` for `tron`.
    #[arg(long, env = "FUNCATRON_SUBSTRATE")]
    pub substrate: Option<String>,
    /// Fewest Runners per Func (0 allows scale to zero); a Func's
    /// `--min-runners` at enable wins.
    #[arg(long, env = "FUNCATRON_MIN_RUNNERS", default_value_t = 1)]
    pub min_runners: u32,
    /// Most Runners per Func.
    #[arg(long, env = "FUNCATRON_MAX_RUNNERS", default_value_t = 10)]
    pub max_runners: u32,
    /// Requests one Runner should handle at once.
    #[arg(long, env = "FUNCATRON_TARGET_CONCURRENCY", default_value_t = 16.0)]
    pub target_concurrency: f64,
    /// How long demand must stay lower before Runners are removed, in ms.
    #[arg(long, env = "FUNCATRON_SCALE_DOWN_DELAY_MS", default_value_t = 30_000)]
    pub scale_down_delay_ms: u64,
    /// Drain a backlog within this time, in ms.
    #[arg(long, env = "FUNCATRON_DRAIN_MS", default_value_t = 2_000)]
    pub drain_ms: u64,
    /// Relative excess over the current Runners that is ignored (0.1 = 10%).
    #[arg(long, env = "FUNCATRON_SCALE_TOLERANCE", default_value_t = 0.1)]
    pub scale_tolerance: f64,
    /// Service time assumed before Runners report one, in ms.
    #[arg(long, env = "FUNCATRON_DEFAULT_SERVICE_MS", default_value_t = 50.0)]
    pub default_service_ms: f64,
    /// How often signals are read and decisions made, in ms.
    #[arg(long, env = "FUNCATRON_SCALE_TICK_MS", default_value_t = 200)]
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

impl ScaleOpts {
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

    /// What every started Runner is given: the broker, the bundles, the
    /// environment, a prefetch matching the target concurrency, and the
    /// operator's extra arguments.
    fn runner_args(&self, broker_url: &str, bundles: &BundleArgs) -> Vec<String> {
        let dir: PathBuf =
            std::fs::canonicalize(&bundles.bundles).unwrap_or_else(|_| bundles.bundles.clone());
        let mut args = vec![
            format!("--broker={broker_url}"),
            format!("--bundles={}", dir.display()),
        ];
        if let Some(e) = &bundles.environment {
            args.push(format!("--environment={e}"));
        }
        if !self
            .runner_args
            .iter()
            .any(|a| a.starts_with("--runner-prefetch"))
        {
            // A Runner holds about what it should work on: extra Runners
            // then find work in the queue instead of behind a full prefetch.
            let prefetch = self.target_concurrency.ceil().clamp(1.0, 65_535.0) as u16;
            args.push(format!("--runner-prefetch={prefetch}"));
        }
        args.extend(self.runner_args.iter().cloned());
        args
    }
}

/// The substrate the flags choose (`None`: no autoscaler). `up` defaults
/// to `process`, `tron` to `none`.
pub async fn substrate(
    o: &ScaleOpts,
    broker_url: &str,
    bundles: &BundleArgs,
    up: bool,
) -> Result<Option<Arc<dyn Substrate>>> {
    let kind = o
        .substrate
        .as_deref()
        .unwrap_or(if up { "process" } else { "none" });
    let args = o.runner_args(broker_url, bundles);
    Ok(match kind {
        "none" => None,
        "process" => {
            let program = std::env::current_exe().context("finding the funcatron executable")?;
            Some(Arc::new(ProcessSubstrate::new(RunnerCommand {
                program,
                args,
            })))
        }
        "docker" | "swarm" => {
            let template = ContainerTemplate {
                image: o.runner_image.clone(),
                network: o.docker_network.clone(),
                binds: o.docker_binds.clone(),
                command: RunnerCommand {
                    program: PathBuf::from("funcatron"),
                    args,
                },
                cluster: cluster_id(broker_url),
            };
            if kind == "docker" {
                Some(Arc::new(DockerSubstrate::connect(template).await?))
            } else {
                Some(Arc::new(SwarmSubstrate::connect(template).await?))
            }
        }
        "kubernetes" => Some(Arc::new(
            KubernetesSubstrate::connect(
                o.kubernetes_api.as_deref(),
                &o.kubernetes_namespace,
                &o.kubernetes_deployment,
            )
            .await?,
        )),
        "marathon" => {
            let url = o
                .marathon_url
                .as_deref()
                .context("--substrate marathon needs --marathon-url")?;
            Some(Arc::new(MarathonSubstrate::new(url, &o.marathon_app)))
        }
        other => bail!(
            "unknown substrate {other:?}: use none, process, docker, swarm, kubernetes or marathon"
        ),
    })
}

/// Names the Runners of one cluster (every Tron on the same broker
/// agrees): the first 12 hex digits of the broker URL's SHA-256.
pub fn cluster_id(broker_url: &str) -> String {
    funcatron_bundle::archive::sha256_hex(broker_url.as_bytes())[..12].to_owned()
}

//! The substrate the autoscaler flags ([`ScaleArgs`]) choose, and what
//! the Runners it starts are given.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use funcatron_tron::autoscale::docker::{ContainerTemplate, DockerSubstrate, SwarmSubstrate};
use funcatron_tron::autoscale::kubernetes::KubernetesSubstrate;
use funcatron_tron::autoscale::marathon::MarathonSubstrate;
use funcatron_tron::autoscale::{ProcessSubstrate, RunnerCommand, ScaleArgs, Substrate};

use crate::{BundleArgs, RunnerGrants};

/// What every started Runner is given: the broker, the bundles, the
/// environment, a prefetch matching the target concurrency, and the
/// operator's extra arguments.
fn runner_args(o: &ScaleArgs, bundles: &BundleArgs) -> Vec<String> {
    let dir: PathBuf =
        std::fs::canonicalize(&bundles.bundles).unwrap_or_else(|_| bundles.bundles.clone());
    let mut args = vec![format!("--bundles={}", dir.display())];
    if let Some(e) = &bundles.environment {
        args.push(format!("--environment={e}"));
    }
    if !o
        .runner_args
        .iter()
        .any(|a| a.starts_with("--runner-prefetch"))
    {
        // A Runner holds about what it should work on: extra Runners
        // then find work in the queue instead of behind a full prefetch.
        let prefetch = o.target_concurrency.ceil().clamp(1.0, 65_535.0) as u16;
        args.push(format!("--runner-prefetch={prefetch}"));
    }
    args.extend(o.runner_args.iter().cloned());
    args
}

/// The environment every started Runner gets: the broker URL and the
/// Tron's read token (credentials, so never in the arguments), and where
/// its fetches may go (the operator's allowlist and the Tron's host).
fn runner_env(grants: RunnerGrants<'_>) -> Vec<(String, String)> {
    let mut env = vec![
        ("FUNCATRON_BROKER".to_owned(), grants.broker_url.to_owned()),
        (
            "FUNCATRON_ALLOW_OUTBOUND".to_owned(),
            grants.outbound.to_arg(),
        ),
    ];
    if let Some(t) = grants.read_token {
        env.push((
            funcatron_runner::args::READ_TOKEN_ENV.to_owned(),
            t.to_owned(),
        ));
    }
    env
}

/// The substrate the flags choose (`None`: no autoscaler); the Runners
/// it starts are given `grants`. `up` defaults to `process`, `tron` to
/// `none`.
pub async fn substrate(
    o: &ScaleArgs,
    grants: RunnerGrants<'_>,
    bundles: &BundleArgs,
    up: bool,
) -> Result<Option<Arc<dyn Substrate>>> {
    let kind = o
        .substrate
        .as_deref()
        .unwrap_or(if up { "process" } else { "none" });
    let args = runner_args(o, bundles);
    Ok(match kind {
        "none" => None,
        "process" => {
            let program = std::env::current_exe().context("finding the funcatron executable")?;
            Some(Arc::new(ProcessSubstrate::new(RunnerCommand {
                program,
                args,
                env: runner_env(grants),
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
                    env: runner_env(grants),
                },
                cluster: cluster_id(grants.broker_url),
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

//! The `kubernetes` substrate: one Runner Deployment per Func (or one
//! shared), scaled through the Deployment's `scale` subresource
//! (`GET`/`PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`,
//! a JSON merge patch of `spec.replicas`). Kubernetes stops a removed Pod
//! with SIGTERM and its grace period, so the Runner drains before it exits
//! (`deploy/kubernetes/` sets `terminationGracePeriodSeconds`).
//!
//! With a Deployment name without `{func}`, one Deployment is shared by
//! every Func (its Runners serve all of them) and runs the sum of what
//! each Func needs.

use funcatron_control::sync::poisoned;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};

use super::substrate::{BoxFut, Observed, ScaleError, Substrate};

/// Runner Deployments in one namespace.
pub struct KubernetesSubstrate {
    api: Api<Deployment>,
    /// Deployment name, `{func}` replaced by the Func's name.
    deployment: String,
    /// One Deployment shared by every Func (its Runners serve them all):
    /// what each Func asked for; the Deployment runs their sum.
    shared: Option<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>,
}

fn err(e: impl std::fmt::Display) -> ScaleError {
    ScaleError::new("kubernetes", e)
}

impl KubernetesSubstrate {
    /// Talk to the API server at `api_url` (else the in-cluster or
    /// kubeconfig configuration), in `namespace`.
    pub async fn connect(
        api_url: Option<&str>,
        namespace: &str,
        deployment: &str,
    ) -> Result<Self, ScaleError> {
        let config = match api_url {
            Some(url) => kube::Config::new(url.parse().map_err(err)?),
            None => kube::Config::infer().await.map_err(err)?,
        };
        let client = kube::Client::try_from(config).map_err(err)?;
        Ok(KubernetesSubstrate {
            api: Api::namespaced(client, namespace),
            deployment: deployment.to_owned(),
            shared: (!deployment.contains("{func}")).then(Default::default),
        })
    }

    fn name(&self, func: &str) -> String {
        self.deployment.replace("{func}", func)
    }
}

impl Substrate for KubernetesSubstrate {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>> {
        Box::pin(async move {
            let name = self.name(func);
            let scale = self
                .api
                .get_scale(&name)
                .await
                .map_err(|e| err(format!("deployment {name}: {e}")))?;
            let mut requested = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
            let running = scale.status.map(|s| s.replicas).unwrap_or(0).max(0) as u32;
            if let Some(wants) = &self.shared {
                // This Func's share, as long as the Deployment runs the sum.
                let wants = wants
                    .lock()
                    .unwrap_or_else(|e| poisoned("kubernetes.wants", e));
                if wants.values().sum::<u32>() == requested {
                    requested = wants.get(func).copied().unwrap_or(0);
                }
            }
            Ok(Observed { requested, running })
        })
    }

    fn scale<'a>(&'a self, func: &'a str, runners: u32) -> BoxFut<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let name = self.name(func);
            let replicas = match &self.shared {
                Some(wants) => {
                    let mut wants = wants
                        .lock()
                        .unwrap_or_else(|e| poisoned("kubernetes.wants", e));
                    wants.insert(func.to_owned(), runners);
                    wants.values().sum::<u32>()
                }
                None => runners,
            };
            let patch = serde_json::json!({"spec": {"replicas": replicas}});
            self.api
                .patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| err(format!("deployment {name}: {e}")))?;
            tracing::info!(func, deployment = %name, replicas, "scaled the Runner Deployment");
            Ok(())
        })
    }
}

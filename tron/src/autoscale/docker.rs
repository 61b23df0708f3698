//! The `docker` and `swarm` substrates, through the Docker Engine API
//! (`bollard`, the local socket, API version negotiated).
//!
//! `docker`: one container per Runner, labelled with its Func and its
//! cluster (so a restarted Tron finds the Runners it started); scale-in is
//! a container stop (SIGTERM, then SIGKILL after the grace period), which
//! the Runner answers by draining. `swarm`: one replicated service per
//! Func whose `Replicas` the autoscaler sets; Swarm stops removed tasks
//! the same way (`StopGracePeriod`).

use funcatron_control::sync::poisoned;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use bollard::models::{
    ContainerCreateBody, HostConfig, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectServiceOptions, ListContainersOptionsBuilder,
    ListTasksOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use bollard::Docker;

use super::substrate::{BoxFut, Observed, RunnerCommand, ScaleError};
use super::Substrate;

/// Label naming the Func a Runner container or service serves.
pub const FUNC_LABEL: &str = "io.funcatron.func";
/// Label naming the cluster (the Trons sharing one broker) it belongs to.
pub const CLUSTER_LABEL: &str = "io.funcatron.cluster";

/// How long a stopping Runner may drain, in seconds.
const GRACE_S: i64 = 60;

/// What a Runner container looks like.
#[derive(Debug, Clone)]
pub struct ContainerTemplate {
    /// The Runner image (its entrypoint is `funcatron`).
    pub image: String,
    /// `host`, `bridge` or a network name.
    pub network: String,
    /// Bind mounts, `HOST:CONTAINER[:ro]`.
    pub binds: Vec<String>,
    /// The Runner's command line (after the entrypoint).
    pub command: RunnerCommand,
    /// Labels every Runner of this cluster carries.
    pub cluster: String,
}

fn err(kind: &'static str) -> impl Fn(bollard::errors::Error) -> ScaleError {
    move |e| ScaleError::new(kind, e)
}

/// Connect to the local engine and agree on an API version it speaks.
async fn connect(kind: &'static str) -> Result<Docker, ScaleError> {
    Docker::connect_with_local_defaults()
        .map_err(err(kind))?
        .negotiate_version()
        .await
        .map_err(err(kind))
}

impl ContainerTemplate {
    fn labels(&self, func: &str) -> HashMap<String, String> {
        HashMap::from([
            (FUNC_LABEL.to_owned(), func.to_owned()),
            (CLUSTER_LABEL.to_owned(), self.cluster.clone()),
        ])
    }

    fn filters(&self, func: &str) -> HashMap<String, Vec<String>> {
        HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{FUNC_LABEL}={func}"),
                format!("{CLUSTER_LABEL}={}", self.cluster),
            ],
        )])
    }

    /// `funcatron runner ... --func F`, without the program (the image's
    /// entrypoint).
    fn args(&self, func: &str) -> Vec<String> {
        self.command.argv(func)
    }

    /// `NAME=value` for every variable of the Runner's command, plus the
    /// container case of Func isolation: Docker's default seccomp profile
    /// refuses the user namespaces bubblewrap needs, so the container (one
    /// Func, that Func's secrets, a non-root user of the image) is the
    /// boundary and the Runner is told so (`--insecure-no-sandbox`,
    /// docs/runtimes.md "What a Func can see"); its cache goes where any
    /// user may write.
    fn env(&self) -> Vec<String> {
        let mut env: Vec<String> = self
            .command
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for (k, v) in CONTAINER_ENV {
            if !self.command.env.iter().any(|(have, _)| have == k) {
                env.push(format!("{k}={v}"));
            }
        }
        env
    }
}

/// The user Runner containers run as (`nobody` in Debian images): never
/// root, whatever the image says. Bind-mounted bundles must be readable by
/// it.
pub const RUNNER_USER: &str = "65534:65534";

/// What every Runner container gets unless the command sets it.
const CONTAINER_ENV: &[(&str, &str)] = &[
    ("FUNCATRON_INSECURE_NO_SANDBOX", "true"),
    ("FUNCATRON_CACHE_DIR", "/tmp/funcatron-cache"),
    // Direct mode: the Runner's listener on the container's network; it
    // advertises the container's host name (its short id, which Docker's
    // DNS resolves on user-defined and overlay networks).
    ("FUNCATRON_DIRECT_LISTEN", "0.0.0.0:8090"),
];

/// Runners as containers on the local Docker engine.
pub struct DockerSubstrate {
    docker: Docker,
    template: ContainerTemplate,
    /// Containers asked to stop and not yet gone.
    stopping: std::sync::Arc<Mutex<HashSet<String>>>,
}

impl DockerSubstrate {
    /// Connect to the local engine.
    pub async fn connect(template: ContainerTemplate) -> Result<Self, ScaleError> {
        Ok(DockerSubstrate {
            docker: connect("docker").await?,
            template,
            stopping: Default::default(),
        })
    }

    /// `func`'s running containers, newest first, minus those stopping.
    async fn running(&self, func: &str) -> Result<Vec<String>, ScaleError> {
        let mut list = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .filters(&self.template.filters(func))
                    .build(),
            ))
            .await
            .map_err(err("docker"))?;
        list.sort_by_key(|c| std::cmp::Reverse(c.created.unwrap_or(0)));
        let stopping = self
            .stopping
            .lock()
            .unwrap_or_else(|e| poisoned("docker.stopping", e))
            .clone();
        Ok(list
            .into_iter()
            .filter_map(|c| c.id)
            .filter(|id| !stopping.contains(id))
            .collect())
    }
}

impl Substrate for DockerSubstrate {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>> {
        Box::pin(async move {
            let n = self.running(func).await?.len() as u32;
            Ok(Observed {
                requested: n,
                running: n,
            })
        })
    }

    fn scale<'a>(&'a self, func: &'a str, runners: u32) -> BoxFut<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let running = self.running(func).await?;
            let have = running.len() as u32;
            for _ in have..runners {
                let t = &self.template;
                let name = format!(
                    "funcatron-runner-{}-{}",
                    func.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
                    &funcatron_envelope::new_request_id()[..8]
                );
                let body = ContainerCreateBody {
                    image: Some(t.image.clone()),
                    cmd: Some(t.args(func)),
                    env: Some(t.env()),
                    labels: Some(t.labels(func)),
                    stop_timeout: Some(GRACE_S),
                    user: Some(RUNNER_USER.to_owned()),
                    host_config: Some(HostConfig {
                        network_mode: Some(t.network.clone()),
                        binds: (!t.binds.is_empty()).then(|| t.binds.clone()),
                        auto_remove: Some(true),
                        init: Some(true),
                        // A Runner needs no capability and never gains one.
                        cap_drop: Some(vec!["ALL".to_owned()]),
                        security_opt: Some(vec!["no-new-privileges".to_owned()]),
                        ..HostConfig::default()
                    }),
                    ..ContainerCreateBody::default()
                };
                let created = self
                    .docker
                    .create_container(
                        Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                        body,
                    )
                    .await
                    .map_err(err("docker"))?;
                self.docker
                    .start_container(&created.id, None)
                    .await
                    .map_err(err("docker"))?;
                tracing::info!(func, container = %name, "started a Runner container");
            }
            if have > runners {
                for id in running.into_iter().take((have - runners) as usize) {
                    self.stopping
                        .lock()
                        .unwrap_or_else(|e| poisoned("docker.stopping", e))
                        .insert(id.clone());
                    let (docker, stopping) = (self.docker.clone(), self.stopping.clone());
                    tracing::info!(func, container = %id, "stopping a Runner container");
                    tokio::spawn(async move {
                        if let Err(e) = docker
                            .stop_container(
                                &id,
                                Some(StopContainerOptionsBuilder::new().t(GRACE_S as i32).build()),
                            )
                            .await
                        {
                            tracing::warn!(container = %id, error = %e, "cannot stop a Runner container");
                        }
                        if let Err(e) = docker
                            .remove_container(
                                &id,
                                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
                            )
                            .await
                        {
                            tracing::warn!(container = %id, error = %e, "cannot remove a Runner container");
                        }
                        stopping
                            .lock()
                            .unwrap_or_else(|e| poisoned("docker.stopping", e))
                            .remove(&id);
                    });
                }
            }
            Ok(())
        })
    }
}

/// A `HOST:CONTAINER[:ro]` bind as a Swarm mount.
fn bind_mount(bind: &str) -> bollard::models::Mount {
    let mut parts = bind.splitn(3, ':');
    let source = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or(&source).to_owned();
    let read_only = parts
        .next()
        .is_some_and(|o| o.split(',').any(|f| f == "ro"));
    bollard::models::Mount {
        source: Some(source),
        target: Some(target),
        typ: Some(bollard::models::MountType::BIND),
        read_only: Some(read_only),
        ..bollard::models::Mount::default()
    }
}

/// Runners as the tasks of one Swarm service per Func.
pub struct SwarmSubstrate {
    docker: Docker,
    template: ContainerTemplate,
}

impl SwarmSubstrate {
    /// Connect to the local engine (a Swarm manager).
    pub async fn connect(template: ContainerTemplate) -> Result<Self, ScaleError> {
        Ok(SwarmSubstrate {
            docker: connect("swarm").await?,
            template,
        })
    }

    /// The service of `func`.
    pub fn service(&self, func: &str) -> String {
        format!(
            "funcatron-{}-{}",
            &self.template.cluster,
            func.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        )
    }

    fn spec(&self, func: &str, replicas: u32) -> ServiceSpec {
        let t = &self.template;
        ServiceSpec {
            name: Some(self.service(func)),
            labels: Some(t.labels(func)),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(t.image.clone()),
                    args: Some(t.args(func)),
                    env: Some(t.env()),
                    labels: Some(t.labels(func)),
                    stop_grace_period: Some(GRACE_S * 1_000_000_000),
                    init: Some(true),
                    user: Some(RUNNER_USER.to_owned()),
                    capability_drop: Some(vec!["ALL".to_owned()]),
                    mounts: (!t.binds.is_empty())
                        .then(|| t.binds.iter().map(|b| bind_mount(b)).collect()),
                    ..TaskSpecContainerSpec::default()
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some(t.network.clone()),
                    ..NetworkAttachmentConfig::default()
                }]),
                ..TaskSpec::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated {
                    replicas: Some(i64::from(replicas)),
                }),
                ..ServiceSpecMode::default()
            }),
            ..ServiceSpec::default()
        }
    }

    async fn inspect(&self, func: &str) -> Result<Option<bollard::models::Service>, ScaleError> {
        match self
            .docker
            .inspect_service(&self.service(func), None::<InspectServiceOptions>)
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(err("swarm")(e)),
        }
    }
}

impl Substrate for SwarmSubstrate {
    fn kind(&self) -> &'static str {
        "swarm"
    }

    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>> {
        Box::pin(async move {
            let Some(service) = self.inspect(func).await? else {
                return Ok(Observed::default());
            };
            let requested = service
                .spec
                .and_then(|s| s.mode)
                .and_then(|m| m.replicated)
                .and_then(|r| r.replicas)
                .unwrap_or(0)
                .max(0) as u32;
            let filters = HashMap::from([
                ("service".to_owned(), vec![self.service(func)]),
                ("desired-state".to_owned(), vec!["running".to_owned()]),
            ]);
            let tasks = self
                .docker
                .list_tasks(Some(
                    ListTasksOptionsBuilder::new().filters(&filters).build(),
                ))
                .await
                .map_err(err("swarm"))?;
            let running = tasks
                .iter()
                .filter(|t| {
                    t.status
                        .as_ref()
                        .and_then(|s| s.state)
                        .is_some_and(|s| s == bollard::models::TaskState::RUNNING)
                })
                .count() as u32;
            Ok(Observed { requested, running })
        })
    }

    fn scale<'a>(&'a self, func: &'a str, runners: u32) -> BoxFut<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            match self.inspect(func).await? {
                None => {
                    self.docker
                        .create_service(self.spec(func, runners), None)
                        .await
                        .map_err(err("swarm"))?;
                    tracing::info!(func, service = %self.service(func), replicas = runners, "created the Runner service");
                }
                Some(service) => {
                    let version = service.version.and_then(|v| v.index).unwrap_or(0);
                    let mut spec = service.spec.unwrap_or_else(|| self.spec(func, runners));
                    spec.mode = Some(ServiceSpecMode {
                        replicated: Some(ServiceSpecModeReplicated {
                            replicas: Some(i64::from(runners)),
                        }),
                        ..ServiceSpecMode::default()
                    });
                    self.docker
                        .update_service(
                            &self.service(func),
                            spec,
                            UpdateServiceOptionsBuilder::new()
                                .version(version as i32)
                                .build(),
                            None,
                        )
                        .await
                        .map_err(err("swarm"))?;
                    tracing::info!(func, service = %self.service(func), replicas = runners, "scaled the Runner service");
                }
            }
            Ok(())
        })
    }
}

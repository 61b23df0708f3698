//! Each substrate's scale calls, observed where they land: a fake
//! Kubernetes API server and a fake Marathon that follow the real APIs'
//! documented requests and responses (neither can run here), and the real
//! local Docker engine for `docker` and `swarm` (with a Runner image built
//! locally from a base made of this machine's files).
//!
//! Every case: a Func at zero Runners gets a request, the autoscaler asks
//! the substrate for one at once; when the demand is gone it asks for zero.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use common::*;
use serde_json::{json, Value};

/// Serve `app` on a free port; its base URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// `funcatron up` on a fresh vhost serving `bundles`, with the given
/// substrate flags (and `--min-runners 0` unless they set it).
async fn up_with(bundles: &Path, log: &Path, broker: &str, extra: &[&str]) -> (Proc, String) {
    let addr = free_addr().to_string();
    let mgmt = free_addr().to_string();
    let mut args = vec![
        "up",
        "--broker",
        broker,
        "--listen",
        &addr,
        "--mgmt-listen",
        &mgmt,
        "--bundles",
        bundles.to_str().unwrap(),
        "--scale-down-delay-ms",
        "300",
    ];
    if !extra.contains(&"--min-runners") {
        args.extend_from_slice(&["--min-runners", "0"]);
    }
    args.extend_from_slice(extra);
    let p = funcatron_logged(&args, "substrate-token", log);
    let base = format!("http://{addr}");
    wait_ready(&format!("{base}/_funcatron/health")).await;
    (p, base)
}

fn hello_bundles(root: &Path) -> PathBuf {
    let dir = root.join("bundles");
    copy_examples(&dir, &["hello"]);
    // Runner containers run as nobody: what is bind-mounted into them
    // must be readable by it, as an operator grants.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------- Kubernetes

/// What the fake API server holds and saw.
#[derive(Default)]
struct Cluster {
    /// Deployment name -> spec.replicas.
    replicas: HashMap<String, i64>,
    /// Every PATCH: (deployment, content type, body).
    patches: Vec<(String, String, Value)>,
    resource_version: u64,
}

type Kube = Arc<Mutex<Cluster>>;

/// The `autoscaling/v1` Scale object the API server returns.
fn scale_object(ns: &str, name: &str, replicas: i64, rv: u64) -> Value {
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": "6f1c6a3e-0000-4000-8000-000000000001",
            "resourceVersion": rv.to_string(),
            "creationTimestamp": "2026-11-23T00:00:00Z"
        },
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": format!("app=funcatron-runner,func={name}")}
    })
}

fn not_found(name: &str) -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure",
            "message": format!("deployments.apps \"{name}\" not found"),
            "reason": "NotFound",
            "details": {"name": name, "group": "apps", "kind": "deployments"},
            "code": 404
        })),
    )
}

async fn get_scale(
    State(k): State<Kube>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> (StatusCode, Json<Value>) {
    let c = k.lock().unwrap();
    match c.replicas.get(&name) {
        Some(r) => (
            StatusCode::OK,
            Json(scale_object(&ns, &name, *r, c.resource_version)),
        ),
        None => not_found(&name),
    }
}

async fn patch_scale(
    State(k): State<Kube>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, Json<Value>) {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // The API server takes JSON patch, merge patch, strategic merge patch
    // and apply patch; anything else is 415.
    if ![
        "application/merge-patch+json",
        "application/json-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ]
    .contains(&ct.as_str())
    {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"),
                "reason": "UnsupportedMediaType", "code": 415}),
            ),
        );
    }
    let patch: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut c = k.lock().unwrap();
    if !c.replicas.contains_key(&name) {
        return not_found(&name);
    }
    c.patches.push((name.clone(), ct, patch.clone()));
    if let Some(r) = patch["spec"]["replicas"].as_i64() {
        c.replicas.insert(name.clone(), r);
    }
    c.resource_version += 1;
    let r = c.replicas[&name];
    (
        StatusCode::OK,
        Json(scale_object(&ns, &name, r, c.resource_version)),
    )
}

/// A fake API server holding one Deployment at zero replicas; its URL.
async fn fake_kubernetes(deployment: &str) -> (Kube, String) {
    let kube: Kube = Default::default();
    kube.lock().unwrap().replicas.insert(deployment.into(), 0);
    let api = serve(
        Router::new()
            .route(
                "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
                get(get_scale).patch(patch_scale),
            )
            .with_state(kube.clone()),
    )
    .await;
    (kube, api)
}

#[tokio::test]
async fn kubernetes_deployment_scale_subresource_is_patched_up_and_down() {
    let (kube, api) = fake_kubernetes("funcatron-runner-hello").await;
    let root = tempfile::tempdir().unwrap();
    let broker = fresh_vhost();
    let (_up, base) = up_with(
        &hello_bundles(root.path()),
        &root.path().join("up.log"),
        &broker,
        &[
            "--substrate",
            "kubernetes",
            "--kubernetes-api",
            &api,
            "--kubernetes-namespace",
            "funcatron",
            "--timeout-ms",
            "1500",
        ],
    )
    .await;
    // No Pod will come (there is no kubelet): the request waits in the
    // queue and times out, but it has asked for a Runner at once.
    let (code, body) = text(&format!("{base}/hello/k8s")).await;
    assert_eq!(code, 504, "{body}");
    {
        let c = kube.lock().unwrap();
        let (name, ct, body) = c.patches.first().expect("a scale PATCH").clone();
        assert_eq!(name, "funcatron-runner-hello");
        assert_eq!(ct, "application/merge-patch+json");
        assert_eq!(body, json!({"spec": {"replicas": 1}}));
    }
    // The request expired; nothing is left: back to zero after the delay.
    eventually("the Deployment is scaled back to zero", || async {
        let c = kube.lock().unwrap();
        c.replicas["funcatron-runner-hello"] == 0
            && c.patches.last().unwrap().2 == json!({"spec": {"replicas": 0}})
    })
    .await;
}

#[tokio::test]
async fn a_shared_kubernetes_deployment_runs_the_sum_of_what_funcs_need() {
    let (kube, api) = fake_kubernetes("funcatron-runners").await;
    let root = tempfile::tempdir().unwrap();
    let bundles = root.path().join("bundles");
    copy_examples(&bundles, &["hello", "petshop"]);
    let (_up, _) = up_with(
        &bundles,
        &root.path().join("up.log"),
        &fresh_vhost(),
        &[
            "--substrate",
            "kubernetes",
            "--kubernetes-api",
            &api,
            "--kubernetes-deployment",
            "funcatron-runners",
            "--min-runners",
            "2",
        ],
    )
    .await;
    // Two Funcs, at least two Runners each: one Deployment of four.
    eventually("the shared Deployment runs 4", || async {
        kube.lock().unwrap().replicas["funcatron-runners"] == 4
    })
    .await;
    assert!(kube
        .lock()
        .unwrap()
        .patches
        .iter()
        .all(|(_, _, p)| p["spec"]["replicas"].as_i64().unwrap() <= 4));
}

// ------------------------------------------------------------------ Marathon

#[derive(Default)]
struct Marathon {
    instances: HashMap<String, u64>,
    puts: Vec<(String, Value)>,
}

type Mara = Arc<Mutex<Marathon>>;

async fn get_app(State(m): State<Mara>, UrlPath(id): UrlPath<String>) -> (StatusCode, Json<Value>) {
    let id = format!("/{id}");
    let m = m.lock().unwrap();
    match m.instances.get(&id) {
        Some(n) => (
            StatusCode::OK,
            Json(json!({"app": {
                "id": id, "instances": n, "cpus": 0.5, "mem": 256.0,
                "tasksRunning": n, "tasksStaged": 0, "tasksHealthy": 0, "tasksUnhealthy": 0,
                "version": "2026-11-23T00:00:00.000Z", "deployments": []
            }})),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"message": format!("App '{id}' does not exist")})),
        ),
    }
}

async fn put_app(
    State(m): State<Mara>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let id = format!("/{id}");
    let mut m = m.lock().unwrap();
    if !m.instances.contains_key(&id) {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": format!("App '{id}' does not exist")})),
        );
    }
    m.puts.push((id.clone(), body.clone()));
    if let Some(n) = body["instances"].as_u64() {
        m.instances.insert(id, n);
    }
    (
        StatusCode::OK,
        Json(json!({"version": "2026-11-23T00:00:01.000Z",
            "deploymentId": "5ed4c0c5-9ff8-4a6f-a0cd-f57f59a34b43"})),
    )
}

#[tokio::test]
async fn marathon_app_instances_are_put_up_and_down() {
    let mara: Mara = Default::default();
    mara.lock()
        .unwrap()
        .instances
        .insert("/funcatron/runner-hello".into(), 0);
    let url = serve(
        Router::new()
            .route("/v2/apps/{*id}", get(get_app).put(put_app))
            .with_state(mara.clone()),
    )
    .await;
    let root = tempfile::tempdir().unwrap();
    let broker = fresh_vhost();
    let (_up, base) = up_with(
        &hello_bundles(root.path()),
        &root.path().join("up.log"),
        &broker,
        &[
            "--substrate",
            "marathon",
            "--marathon-url",
            &url,
            "--timeout-ms",
            "1500",
        ],
    )
    .await;
    let (code, body) = text(&format!("{base}/hello/mesos")).await;
    assert_eq!(code, 504, "{body}");
    {
        let m = mara.lock().unwrap();
        let (id, body) = m.puts.first().expect("a PUT").clone();
        assert_eq!(id, "/funcatron/runner-hello");
        assert_eq!(body, json!({"instances": 1}));
    }
    eventually("the app is scaled back to zero", || async {
        let m = mara.lock().unwrap();
        m.instances["/funcatron/runner-hello"] == 0
    })
    .await;
}

// -------------------------------------------------------------------- Docker

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Runner image, built with deploy/images/Dockerfile on a base made of
/// this machine's own files (no registry here): the test binary and the
/// shared libraries it links, plus /tmp.
fn runner_image() -> &'static str {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    const TAG: &str = "funcatron-runner:test";
    BUILT.get_or_init(|| {
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_funcatron"));
        let ctx = tempfile::tempdir().unwrap();
        let rootfs = ctx.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
        {
            // Anyone may write /tmp (the Runner, as nobody, caches there).
            use std::os::unix::fs::PermissionsExt;
            let sticky = std::fs::Permissions::from_mode(0o1777);
            std::fs::set_permissions(rootfs.join("tmp"), sticky).unwrap();
        }
        let ldd = Command::new("ldd").arg(&bin).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from);
            let Some(path) = path else { continue };
            let dest = rootfs.join(path.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&path, &dest).unwrap();
        }
        let tar = ctx.path().join("base.tar");
        let ok = Command::new("tar")
            .args([
                "-C",
                rootfs.to_str().unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        docker(&["import", tar.to_str().unwrap(), "funcatron-base:test"]);
        let build = ctx.path().join("build");
        std::fs::create_dir_all(&build).unwrap();
        std::fs::copy(&bin, build.join("funcatron")).unwrap();
        let dockerfile = repo().join("deploy/images/Dockerfile");
        docker(&[
            "build",
            "-q",
            "--build-arg",
            "BASE=funcatron-base:test",
            "-f",
            dockerfile.to_str().unwrap(),
            "-t",
            TAG,
            build.to_str().unwrap(),
        ]);
    });
    TAG
}

/// `up` on the `kind` substrate (`docker` or `swarm`), Runners from
/// `image` with the bundles mounted at the same path.
async fn up_on_docker(
    root: &tempfile::TempDir,
    bundles: &Path,
    broker: &str,
    kind: &str,
    image: &str,
) -> (Proc, String) {
    let bind = format!("{0}:{0}:ro", bundles.display());
    up_with(
        bundles,
        &root.path().join("up.log"),
        broker,
        &[
            "--substrate",
            kind,
            "--runner-image",
            image,
            "--docker-bind",
            &bind,
            "--timeout-ms",
            "30000",
        ],
    )
    .await
}

/// Container ids (running) with the Func label `hello` of `cluster`.
fn hello_containers(cluster: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-q",
        "--filter",
        "label=io.funcatron.func=hello",
        "--filter",
        &format!("label=io.funcatron.cluster={cluster}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

fn cluster_of(broker: &str) -> String {
    funcatron_bundle::archive::sha256_hex(broker.as_bytes())[..12].to_owned()
}

#[tokio::test]
async fn docker_containers_start_on_demand_answer_and_stop_when_idle() {
    let image = runner_image();
    let root = tempfile::tempdir().unwrap();
    let bundles = hello_bundles(root.path());
    let broker = fresh_vhost();
    let cluster = cluster_of(&broker);
    let (_up, base) = up_on_docker(&root, &bundles, &broker, "docker", image).await;
    assert!(hello_containers(&cluster).is_empty());
    // From zero: a container starts and the request is answered by it.
    let (code, body) = text(&format!("{base}/hello/docker")).await;
    assert_eq!((code, body.as_str()), (200, "Hello, docker!"));
    let ids = hello_containers(&cluster);
    assert_eq!(ids.len(), 1);
    let cmd = docker(&["inspect", "-f", "{{json .Config.Cmd}}", &ids[0]]);
    assert!(cmd.contains("\"--func\",\"hello\""), "{cmd}");
    // Not root, no capabilities: the container is the Func's boundary.
    let user = docker(&[
        "inspect",
        "-f",
        "{{.Config.User}} {{json .HostConfig.CapDrop}}",
        &ids[0],
    ]);
    assert_eq!(user.trim(), "65534:65534 [\"ALL\"]");
    // Idle: stopped (drained on SIGTERM) and removed.
    eventually("the Runner container is gone", || async {
        hello_containers(&cluster).is_empty()
    })
    .await;
}

#[tokio::test]
async fn swarm_service_replicas_follow_demand() {
    let image = runner_image();
    // A single-node Swarm on the local engine (kept if already there).
    let state = docker(&["info", "-f", "{{.Swarm.LocalNodeState}}"]);
    if state.trim() != "active" {
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
    }
    let root = tempfile::tempdir().unwrap();
    let bundles = hello_bundles(root.path());
    let broker = fresh_vhost();
    let cluster = cluster_of(&broker);
    let service = format!("funcatron-{cluster}-hello");
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("docker")
                .args(["service", "rm", &self.0])
                .output();
        }
    }
    let _cleanup = Remove(service.clone());
    let (_up, base) = up_on_docker(&root, &bundles, &broker, "swarm", image).await;
    let (code, body) = text(&format!("{base}/hello/swarm")).await;
    assert_eq!((code, body.as_str()), (200, "Hello, swarm!"));
    let replicas = || {
        docker(&[
            "service",
            "inspect",
            "-f",
            "{{.Spec.Mode.Replicated.Replicas}}",
            &service,
        ])
        .trim()
        .to_owned()
    };
    assert_eq!(replicas(), "1");
    let user = docker(&[
        "service",
        "inspect",
        "-f",
        "{{.Spec.TaskTemplate.ContainerSpec.User}}",
        &service,
    ]);
    assert_eq!(user.trim(), "65534:65534", "swarm tasks do not run as root");
    eventually("the service is scaled to zero", || async {
        replicas() == "0"
    })
    .await;
}

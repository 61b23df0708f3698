//! The management API: HTTP on the Tron, beside the request path.
//!
//! CLI / operators -> **management API** -> [`Registry`]. Its OpenAPI
//! document is served at `/v1/openapi.yaml`. Reads are open (bind the API to
//! an internal address); every mutating call needs `Authorization: Bearer
//! <token>`. Errors are JSON: `{"error": code, "message": ...}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use funcatron_control::state::FuncSettings;
use serde::Deserialize;
use serde_json::json;

use crate::registry::{Registry, RegistryError};

/// The API's own OpenAPI document.
pub const OPENAPI: &str = include_str!("../mgmt-openapi.yaml");

struct Api {
    registry: Arc<Registry>,
    token: String,
    max_upload: usize,
    /// An in-process ingress for `invoke`.
    ingress: Option<Router>,
}

type Shared = State<Arc<Api>>;

fn error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(json!({"error": code, "message": message})),
    )
        .into_response()
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        error(self.status, self.code, &self.message)
    }
}

/// The 401 to answer, unless the call carries the token.
fn unauthorized(api: &Api, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit on the first differing byte.
    let ok = given.is_some_and(|g| {
        g.len() == api.token.len()
            && g.bytes()
                .zip(api.token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    (!ok).then(|| {
        error(
            401,
            "unauthorized",
            "this call needs `Authorization: Bearer <token>` with the Tron's management token",
        )
    })
}

/// The management API routes. `max_upload` limits archive uploads;
/// `ingress` (see `funcatron_ingress::app`) serves `invoke`.
pub fn router(
    registry: Arc<Registry>,
    token: String,
    max_upload: usize,
    ingress: Option<Router>,
) -> Router {
    let api = Arc::new(Api {
        registry,
        token,
        max_upload,
        ingress,
    });
    Router::new()
        .route("/v1/openapi.yaml", get(openapi))
        .route("/v1/health", get(|| async { Json(json!({"ok": true})) }))
        .route(
            "/v1/bundles",
            post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/bundles/{sha}", get(download))
        .route("/v1/state", get(state))
        .route("/v1/status", get(status))
        .route("/v1/funcs", get(list))
        .route("/v1/funcs/{name}", get(show))
        .route("/v1/funcs/{name}/history", get(history))
        .route("/v1/funcs/{name}/enable", post(enable))
        .route("/v1/funcs/{name}/disable", post(disable))
        .route("/v1/funcs/{name}/rollback", post(rollback))
        .route("/v1/funcs/{name}/capture", post(capture_start))
        .route("/v1/funcs/{name}/capture/stop", post(capture_stop))
        .route("/v1/captures/{name}", get(capture_export))
        .route("/v1/funcs/{name}/log-level", post(log_level))
        .route("/v1/funcs/{name}/logs", get(logs))
        .route(
            "/v1/funcs/{name}/invoke",
            post(invoke).layer(DefaultBodyLimit::disable()),
        )
        .fallback(|| async { error(404, "not_found", "no such management API path") })
        .with_state(api)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

#[derive(Deserialize)]
struct UploadQuery {
    /// Names a bundle that does not name itself.
    name: Option<String>,
    /// Enable it at once.
    #[serde(default)]
    enable: bool,
}

/// The body, or a JSON 413 when it is larger than the upload limit.
async fn limited(api: &Api, body: axum::body::Body) -> Result<Bytes, Box<Response>> {
    axum::body::to_bytes(body, api.max_upload)
        .await
        .map_err(|_| {
            Box::new(error(
                413,
                "too_large",
                &format!("larger than the upload limit of {} bytes", api.max_upload),
            ))
        })
}

async fn upload(
    State(api): Shared,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    body: axum::body::Body,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    let body = match limited(&api, body).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let name = q.name.as_deref().unwrap_or("bundle");
    let enable = q.enable.then(FuncSettings::default);
    match api.registry.upload(&body, name, enable).await {
        Ok((sha, b)) => {
            let enabled = api
                .registry
                .state()
                .await
                .funcs
                .get(&b.name)
                .and_then(|f| f.enabled.clone())
                == Some(sha.clone());
            (
                StatusCode::CREATED,
                Json(json!({
                    "sha": sha,
                    "name": b.name,
                    "version": b.version,
                    "runtime": b.runtime.as_str(),
                    "host": b.host,
                    "basePath": b.base_path,
                    "operations": b.operations.iter().map(|o| json!({"method": o.method, "path": o.path, "operationId": o.operation_id})).collect::<Vec<_>>(),
                    "enabled": enabled,
                })),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn download(State(api): Shared, Path(sha): Path<String>) -> Response {
    match api.registry.blob_path(&sha).filter(|p| p.is_file()) {
        Some(p) => match tokio::fs::read(&p).await {
            Ok(bytes) => ([(header::CONTENT_TYPE, "application/gzip")], bytes).into_response(),
            Err(e) => error(500, "store_failed", &e.to_string()),
        },
        None => error(404, "no_bundle", &format!("no bundle {sha}")),
    }
}

async fn status(State(api): Shared) -> Response {
    Json(api.registry.status().await).into_response()
}

async fn state(State(api): Shared) -> Response {
    Json(api.registry.state().await).into_response()
}

async fn routes_of(api: &Api, sha: &str) -> serde_json::Value {
    match api.registry.bundle(sha).await {
        Ok(b) => json!({
            "runtime": b.runtime.as_str(),
            "version": b.version,
            "host": b.host.as_deref().unwrap_or("*"),
            "basePath": b.base_path,
            "operations": b.operations.iter().map(|o| json!({"method": o.method, "path": o.path, "operationId": o.operation_id})).collect::<Vec<_>>(),
        }),
        Err(e) => json!({"error": e.message}),
    }
}

async fn list(State(api): Shared) -> Response {
    let st = api.registry.state().await;
    let mut out = Vec::new();
    for (name, f) in &st.funcs {
        let routes = match &f.enabled {
            Some(sha) => routes_of(&api, sha).await,
            None => serde_json::Value::Null,
        };
        out.push(json!({
            "name": name,
            "enabled": f.enabled,
            "uploads": f.uploads.len(),
            "routes": routes,
        }));
    }
    Json(json!({"revision": st.revision, "funcs": out})).into_response()
}

async fn show(State(api): Shared, Path(name): Path<String>) -> Response {
    let st = api.registry.state().await;
    let Some(f) = st.funcs.get(&name) else {
        return error(404, "no_func", &format!("no Func named {name}"));
    };
    let routes = match &f.enabled {
        Some(sha) => routes_of(&api, sha).await,
        None => serde_json::Value::Null,
    };
    Json(json!({
        "name": name,
        "enabled": f.enabled,
        "settings": f.settings,
        "uploads": f.uploads,
        "routes": routes,
    }))
    .into_response()
}

async fn history(State(api): Shared, Path(name): Path<String>) -> Response {
    let st = api.registry.state().await;
    match st.funcs.get(&name) {
        Some(f) => {
            Json(json!({"name": name, "history": f.history, "uploads": f.uploads})).into_response()
        }
        None => error(404, "no_func", &format!("no Func named {name}")),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EnableBody {
    /// The version; default the latest upload.
    sha: Option<String>,
    /// Settings; default none.
    settings: Option<FuncSettings>,
}

async fn enable(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    let req: EnableBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let settings = Some(req.settings.unwrap_or_default());
    match api
        .registry
        .enable(&name, req.sha.as_deref(), settings, "enable")
        .await
    {
        Ok(st) => {
            Json(json!({"name": name, "enabled": st.funcs[&name].enabled, "revision": st.revision}))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn disable(State(api): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    match api.registry.disable(&name).await {
        Ok(st) => {
            Json(json!({"name": name, "enabled": null, "revision": st.revision})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn rollback(State(api): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    match api.registry.rollback(&name).await {
        Ok(st) => {
            Json(json!({"name": name, "enabled": st.funcs[&name].enabled, "revision": st.revision}))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    #[serde(default)]
    method: Option<String>,
    /// Path below the Func's basePath.
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
}

/// Call a Func through the request path (an in-process ingress on this
/// Tron), answering with exactly what the Func answered.
async fn invoke(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    let body = match limited(&api, body).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(ingress) = api.ingress.clone() else {
        return error(503, "no_ingress", "this Tron cannot invoke Funcs");
    };
    let req: InvokeBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(b) = api.registry.serving(&name).await else {
        return error(404, "no_func", &format!("no Func named {name} is enabled"));
    };
    let rel = req.path.unwrap_or_else(|| "/".into());
    let mut path = if b.base_path == "/" {
        rel.clone()
    } else if rel == "/" || rel.is_empty() {
        b.base_path.clone()
    } else {
        format!("{}/{}", b.base_path, rel.trim_start_matches('/'))
    };
    if let Some(q) = req.query.filter(|q| !q.is_empty()) {
        path = format!("{path}?{q}");
    }
    let mut builder = axum::http::Request::builder()
        .method(req.method.as_deref().unwrap_or("GET"))
        .uri(&path)
        .header(header::HOST, b.host.as_deref().unwrap_or("localhost"));
    for (k, v) in &req.headers {
        builder = builder.header(k, v);
    }
    let Ok(mut http) = builder.body(axum::body::Body::from(req.body.unwrap_or_default())) else {
        return error(
            400,
            "bad_request",
            "method, path or headers are not valid HTTP",
        );
    };
    http.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            0,
        ))));
    match tower::ServiceExt::oneshot(ingress, http).await {
        Ok(r) => r.into_response(),
        Err(e) => match e {},
    }
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Box<Response>> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| Box::new(error(400, "bad_request", &format!("request body: {e}"))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CaptureBody {
    /// Fraction sampled (default 1).
    sample: Option<f64>,
    /// Stop after this many pairs.
    max: Option<u64>,
    /// Stop after this long.
    for_ms: Option<u64>,
    /// Header names to redact besides the default ones.
    #[serde(default)]
    redact: Vec<String>,
}

async fn capture_start(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    let req: CaptureBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let mut redact: Vec<String> = funcatron_control::state::DEFAULT_REDACT
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    redact.extend(req.redact.iter().map(|h| h.to_ascii_lowercase()));
    let capture = funcatron_control::state::Capture {
        id: funcatron_envelope::new_request_id()[..12].to_owned(),
        sample: req.sample.unwrap_or(1.0),
        until_ms: req
            .for_ms
            .map(|ms| funcatron_envelope::now_ms() as u64 + ms),
        max: req.max,
        redact,
    };
    match api.registry.capture_start(&name, capture).await {
        Ok(st) => {
            Json(json!({"name": name, "capture": st.captures.get(&name), "revision": st.revision}))
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn capture_stop(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    match api.registry.capture_stop(&name).await {
        Ok(st) => {
            Json(json!({"name": name, "capturing": false, "revision": st.revision})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn capture_export(State(api): Shared, Path(name): Path<String>) -> Response {
    let Some(path) = api.registry.capture_path(&name) else {
        return error(400, "bad_request", "not a Func name");
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/x-ndjson")], bytes).into_response(),
        Err(_) => error(
            404,
            "no_capture",
            &format!("nothing was captured for {name}"),
        ),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LevelBody {
    /// `error` ... `trace`, or `default` to reset.
    level: String,
    /// Reset after this long.
    for_ms: Option<u64>,
}

async fn log_level(
    State(api): Shared,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers) {
        return r;
    }
    let req: LevelBody = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let level = (req.level != "default").then(|| funcatron_control::state::LogLevel {
        level: req.level.clone(),
        until_ms: req
            .for_ms
            .map(|ms| funcatron_envelope::now_ms() as u64 + ms),
    });
    match api.registry.set_log_level(&name, level).await {
        Ok(st) => Json(
            json!({"name": name, "log_level": st.log_levels.get(&name), "revision": st.revision}),
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    request_id: Option<String>,
    #[serde(default)]
    follow: bool,
}

/// A Func's recent log lines from every Runner (JSON Lines), then, with
/// `follow`, new ones as they come.
async fn logs(
    State(api): Shared,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let keep = move |line: &str| -> bool {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        v["func"] == name.as_str()
            && q.request_id
                .as_deref()
                .is_none_or(|id| v["request_id"] == id)
    };
    let (recent, rx) = api.registry.logs();
    let mut head = String::new();
    for l in recent.iter().filter(|l| keep(l)) {
        head.push_str(l);
        head.push('\n');
    }
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow {
        return (ndjson, head).into_response();
    }
    let first = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
    let live = futures::stream::unfold((rx, keep), |(mut rx, keep)| async move {
        loop {
            match rx.recv().await {
                Ok(line) if keep(&line) => {
                    return Some((Ok(Bytes::from(format!("{line}\n"))), (rx, keep)))
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    (
        ndjson,
        axum::body::Body::from_stream(futures::StreamExt::chain(first, live)),
    )
        .into_response()
}

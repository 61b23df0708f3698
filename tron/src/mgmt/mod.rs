//! The management API: HTTP on the Tron, beside the request path.
//!
//! CLI / operators -> **management API** -> [`Registry`]. Its request and
//! response bodies are the types in [`api`]; its OpenAPI document is
//! generated from them and the handlers ([`openapi`]) and served at
//! `/v1/openapi.yaml` (and `/v1/openapi.json`). Only the health check and
//! the document are open: every read that shows data (state, status, Funcs,
//! their settings, logs, captures, archive downloads) needs `Authorization:
//! Bearer <token>` with the read token or the admin token, and every
//! mutating call needs the admin token ([`Tokens`]); one layer on those
//! routes checks it ([`require`]). A missing or wrong token is a 401, the
//! read token on a mutating call a 403.
//! Errors are JSON: `{"error": code, "message": ...}` ([`api::ApiError`]).

pub mod api;
mod calls;
mod submit;

use std::sync::{Arc, LazyLock};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use funcatron_control::state::FuncSettings;
use utoipa::OpenApi as _;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use crate::registry::{Registry, RegistryError};
use crate::RouteOutcome;
use api::{
    ApiError, CaptureRequest, CaptureStarted, CaptureStopped, EffectiveRoutes, EnableRequest,
    Enabled, FuncDetail, FuncHistory, FuncList, FuncSummary, Health, InvokeRequest,
    LogLevelRequest, LogLevelSet, LogsQuery, RouteOperation, Routes, RoutesUnavailable,
    UploadQuery, Uploaded,
};
use funcatron_bundle::{Base, Bundle};

/// The name of the bearer-token security scheme in the document. Its
/// requirement names the role an operation needs: `read` (the read token
/// or the admin token) or `admin` (the admin token only).
pub const TOKEN_SCHEME: &str = "token";

/// The bearer tokens the API accepts.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// Can do everything.
    pub admin: String,
    /// Can only read (and fetch archives): what Runners and peer Trons
    /// use. `None`: only the admin token reads.
    pub read: Option<String>,
}

/// The management API's settings.
#[derive(Clone, Debug)]
pub struct MgmtOptions {
    /// The tokens.
    pub tokens: Tokens,
    /// Largest archive upload (and invoke body), in bytes.
    pub max_upload: usize,
    /// Query parameter names every capture redacts (besides those a
    /// capture asks for).
    pub redact_query: Vec<String>,
    /// JSON body field names every capture redacts (besides those a
    /// capture asks for).
    pub redact_json_fields: Vec<String>,
}

impl MgmtOptions {
    /// `admin` as the only token, the default upload limit and the default
    /// redaction lists.
    pub fn new(admin: impl Into<String>) -> Self {
        MgmtOptions {
            tokens: Tokens {
                admin: admin.into(),
                read: None,
            },
            max_upload: crate::args::DEFAULT_MAX_UPLOAD_BYTES,
            redact_query: owned(funcatron_control::state::DEFAULT_REDACT_QUERY),
            redact_json_fields: owned(funcatron_control::state::DEFAULT_REDACT_JSON_FIELDS),
        }
    }
}

fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

struct Api {
    registry: Arc<Registry>,
    tokens: Tokens,
    max_upload: usize,
    redact_query: Vec<String>,
    redact_json_fields: Vec<String>,
    /// An in-process ingress for `invoke`.
    ingress: Option<Router>,
    /// The records of asynchronous calls, if this Tron keeps them.
    calls: Option<funcatron_calls::Calls>,
}

type Shared = State<Arc<Api>>;

fn error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(ApiError {
            error: code.to_owned(),
            message: message.to_owned(),
        }),
    )
        .into_response()
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        error(self.status, self.code, &self.message)
    }
}

/// Is `given` equal to `token`? Compared without an early exit on the
/// first differing byte.
fn same(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The document store's operators (`/_funcatron/store/...`): the read
/// token reads every collection, the admin token does everything.
impl funcatron_documents::http::Operators for Tokens {
    fn role(&self, token: &str) -> funcatron_documents::http::OperatorRole {
        use funcatron_documents::http::OperatorRole;
        if same(token, &self.admin) {
            OperatorRole::Admin
        } else if self.read.as_deref().is_some_and(|r| same(token, r)) {
            OperatorRole::Read
        } else {
            OperatorRole::None
        }
    }
}

/// What a call's token lets it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// No token, or a wrong one.
    None,
    /// The read token.
    Read,
    /// The admin token.
    Admin,
}

/// The role the call's `Authorization: Bearer` token gives.
fn role(api: &Api, headers: &HeaderMap) -> Role {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return Role::None;
    };
    if same(given, &api.tokens.admin) {
        Role::Admin
    } else if api.tokens.read.as_deref().is_some_and(|r| same(given, r)) {
        Role::Read
    } else {
        Role::None
    }
}

/// The auth layer on every route but the health check and the document
/// (those the document marks with the `token` scheme, see [`guarded`]):
/// a 401 `unauthorized` unless the call carries a token with at least
/// `needed`'s role, a 403 `forbidden` for the read token on a mutating call.
async fn require(api: Arc<Api>, needed: Role, request: Request, next: Next) -> Response {
    let has = role(&api, request.headers());
    if has == Role::None {
        return error(
            401,
            "unauthorized",
            "this call needs `Authorization: Bearer <token>` with the Tron's read or admin token",
        );
    }
    if has < needed {
        return error(
            403,
            "forbidden",
            "the read token can only read: this call needs the admin token",
        );
    }
    next.run(request).await
}

async fn require_read(
    Extension(api): Extension<Arc<Api>>,
    request: Request,
    next: Next,
) -> Response {
    require(api, Role::Read, request, next).await
}

async fn require_admin(
    Extension(api): Extension<Arc<Api>>,
    request: Request,
    next: Next,
) -> Response {
    require(api, Role::Admin, request, next).await
}

/// The document's top: info, servers, the security scheme, and the
/// schemas no handler names.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Funcatron management API",
        version = "1",
        description = "Upload, enable, disable and roll back Func bundles on a Tron. Only \
            /v1/health and this document are open. Every read needs `Authorization: Bearer \
            <token>` with the read token (FUNCATRON_READ_TOKEN / --read-token, else \
            <store>/read-token) or the admin token; every POST needs the admin token (the \
            token a Tron prints at its first start, or FUNCATRON_TOKEN / --token-file). A \
            missing or wrong token is a 401, the read token on a POST a 403. The `token` \
            scheme's requirement names the role: `read` or `admin`. Errors are JSON: \
            {\"error\": code, \"message\": text}. This document is generated from the server's types (tron/src/mgmt/api.rs)."
    ),
    servers((url = "/")),
    components(schemas(api::LogLine)),
    modifiers(&TokenScheme)
)]
struct ApiDoc;

struct TokenScheme;

impl utoipa::Modify for TokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            TOKEN_SCHEME,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Routes open to every caller.
fn open_routes() -> OpenApiRouter<Arc<Api>> {
    OpenApiRouter::new()
        .routes(routes!(openapi_yaml))
        .routes(routes!(openapi_json))
        .routes(routes!(health))
        .routes(routes!(submit::call_status))
}

/// `routes` behind a token with `role`: [`require`] on their methods only
/// (any other method still answers 405).
fn guarded(routes: UtoipaMethodRouter<Arc<Api>>, role: Role) -> UtoipaMethodRouter<Arc<Api>> {
    let (schemas, paths, methods) = routes;
    let methods = match role {
        Role::Admin => methods.route_layer(axum::middleware::from_fn(require_admin)),
        _ => methods.route_layer(axum::middleware::from_fn(require_read)),
    };
    (schemas, paths, methods)
}

/// Reads: the read token or the admin token.
fn read_routes() -> OpenApiRouter<Arc<Api>> {
    let r = |routes| guarded(routes, Role::Read);
    OpenApiRouter::new()
        .routes(r(routes!(download)))
        .routes(r(routes!(state)))
        .routes(r(routes!(status)))
        .routes(r(routes!(list)))
        .routes(r(routes!(show)))
        .routes(r(routes!(history)))
        .routes(r(routes!(capture_export)))
        .routes(r(routes!(logs)))
        .routes(r(routes!(calls::show_call)))
        .routes(r(routes!(calls::list_dead)))
}

/// Routes that need the admin token.
fn token_routes() -> OpenApiRouter<Arc<Api>> {
    let a = |routes| guarded(routes, Role::Admin);
    let unlimited = OpenApiRouter::new()
        .routes(a(routes!(upload)))
        .routes(a(routes!(invoke)))
        .routes(a(routes!(chain)))
        .routes(a(routes!(submit::submit_call)))
        .layer(DefaultBodyLimit::disable());
    OpenApiRouter::new()
        .routes(a(routes!(enable)))
        .routes(a(routes!(disable)))
        .routes(a(routes!(rollback)))
        .routes(a(routes!(capture_start)))
        .routes(a(routes!(capture_stop)))
        .routes(a(routes!(log_level)))
        .routes(a(routes!(calls::redrive)))
        .routes(a(routes!(calls::purge)))
        .routes(a(routes!(calls::callback_key)))
        .merge(unlimited)
}

/// The API's OpenAPI document, generated from the routes, their handlers'
/// `#[utoipa::path]` and the types in [`api`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    OpenApiRouter::<Arc<Api>>::with_openapi(ApiDoc::openapi())
        .merge(open_routes())
        .merge(read_routes())
        .merge(token_routes())
        .into_openapi()
}

static DOCUMENT: LazyLock<(String, String)> = LazyLock::new(|| {
    let doc = openapi();
    (
        doc.to_yaml().unwrap_or_else(|e| format!("# {e}\n")),
        doc.to_pretty_json().unwrap_or_else(|e| format!("\"{e}\"")),
    )
});

/// The document as served at `/v1/openapi.yaml`.
pub fn openapi_yaml_text() -> &'static str {
    &DOCUMENT.0
}

/// The management API routes, with `options` (tokens, upload limit,
/// capture redaction); `ingress` (see `funcatron_ingress::app`) serves
/// `invoke`.
pub fn router(registry: Arc<Registry>, options: MgmtOptions, ingress: Option<Router>) -> Router {
    router_with_calls(registry, options, ingress, None)
}

/// [`router`], with the records of asynchronous calls (`/v1/calls`, the
/// dead-letter queues).
pub fn router_with_calls(
    registry: Arc<Registry>,
    options: MgmtOptions,
    ingress: Option<Router>,
    calls: Option<funcatron_calls::Calls>,
) -> Router {
    let api = Arc::new(Api {
        registry,
        tokens: options.tokens,
        max_upload: options.max_upload,
        redact_query: options.redact_query,
        redact_json_fields: options.redact_json_fields,
        ingress,
        calls,
    });
    let (routes, _) = open_routes()
        .merge(read_routes())
        .merge(token_routes())
        .split_for_parts();
    routes
        .fallback(|| async { error(404, "not_found", "no such management API path") })
        .layer(Extension(Arc::clone(&api)))
        .with_state(api)
}

/// This document, as YAML.
#[utoipa::path(get, path = "/v1/openapi.yaml", operation_id = "openapi",
    responses((status = 200, description = "this document", content_type = "application/yaml", body = String)))]
async fn openapi_yaml() -> Response {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        openapi_yaml_text(),
    )
        .into_response()
}

/// This document, as JSON.
#[utoipa::path(get, path = "/v1/openapi.json", operation_id = "openapiJson",
    responses((status = 200, description = "this document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.1.as_str(),
    )
        .into_response()
}

/// Is the API up?
#[utoipa::path(get, path = "/v1/health", operation_id = "health",
    responses((status = 200, description = "the API is up", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { ok: true })
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

/// Bases as answers show them (`api.example.com/v1`, `*/v1`).
fn shown(bases: &[Base]) -> Vec<String> {
    bases.iter().map(ToString::to_string).collect()
}

fn operations(b: &Bundle) -> Vec<RouteOperation> {
    b.operations
        .iter()
        .map(|o| RouteOperation {
            method: o.method.clone(),
            path: o.path.clone(),
            operation_id: o.operation_id.clone(),
            bases: o.bases.as_deref().map(shown),
        })
        .collect()
}

/// Upload a bundle archive (from `funcatron bundle build`).
#[utoipa::path(post, path = "/v1/bundles", operation_id = "uploadBundle",
    security(("token" = ["admin"])),
    params(UploadQuery),
    request_body(content = inline(String), content_type = "application/gzip", description = "the .tar.gz"),
    responses(
        (status = 201, description = "stored (validated): its SHA-256, name, version and routes", body = Uploaded),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 409, description = "conflict", body = ApiError),
        (status = 413, description = "larger than the upload limit", body = ApiError),
        (status = 422, description = "not a valid bundle", body = ApiError),
    ))]
async fn upload(
    State(api): Shared,
    Query(q): Query<UploadQuery>,
    body: axum::body::Body,
) -> Response {
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
                Json(Uploaded {
                    sha,
                    name: b.name.clone(),
                    version: b.version.clone(),
                    runtime: b.runtime.as_str().to_owned(),
                    host: b.host.clone(),
                    base_path: b.base_path.clone(),
                    bases: shown(&b.bases),
                    operations: operations(&b),
                    enabled,
                }),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The archive with this SHA-256 (Trons and Runners fetch bundles here).
#[utoipa::path(get, path = "/v1/bundles/{sha}", operation_id = "downloadBundle",
    security(("token" = ["read"])),
    params(("sha" = String, Path, pattern = "^[0-9a-f]{64}$", description = "the archive's SHA-256")),
    responses(
        (status = 200, description = "the archive", content_type = "application/gzip", body = inline(String)),
        (status = 404, description = "no such bundle", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
async fn download(State(api): Shared, Path(sha): Path<String>) -> Response {
    match api.registry.blob_path(&sha).filter(|p| p.is_file()) {
        Some(p) => match tokio::fs::read(&p).await {
            Ok(bytes) => ([(header::CONTENT_TYPE, "application/gzip")], bytes).into_response(),
            Err(e) => error(500, "store_failed", &e.to_string()),
        },
        None => error(404, "no_bundle", &format!("no bundle {sha}")),
    }
}

/// Per Func: queue depth, consumers, arrival rate, service time, requests
/// in flight, Runners heard from; with an autoscaler, `scaling` holds its
/// signals, the desired, target, requested and running Runners, the bounds,
/// the last reason and decisions, and `autoscaler` names the substrate.
#[utoipa::path(get, path = "/v1/status", operation_id = "status",
    security(("token" = ["read"])),
    responses(
        (status = 200, description = "load and scaling per Func", body = api::Status),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
async fn status(State(api): Shared) -> Response {
    // The registry builds this body; `api::Status` describes it.
    Json(api.registry.status().await).into_response()
}

/// The whole registry state (revision, every Func's uploads, enabled
/// version, settings, history).
#[utoipa::path(get, path = "/v1/state", operation_id = "state",
    security(("token" = ["read"])),
    responses(
        (status = 200, description = "the state", body = api::State),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
async fn state(State(api): Shared) -> Json<api::State> {
    let mut st = api.registry.state().await;
    for f in st.funcs.values_mut() {
        f.settings = shown_settings(&api, &f.settings, f.enabled.as_deref()).await;
    }
    Json(st)
}

/// What a secret's value reads in answers.
pub const SECRET_VALUE: &str = "[secret]";

/// `settings` as answers show them: an `env` key that is also a secret
/// (named in the settings or in the enabled bundle) shows [`SECRET_VALUE`],
/// never its value; secrets themselves are names only.
async fn shown_settings(api: &Api, settings: &FuncSettings, sha: Option<&str>) -> FuncSettings {
    let mut shown = settings.clone();
    let bundle_secrets = match sha {
        Some(sha) if !shown.env.is_empty() => api
            .registry
            .bundle(sha)
            .await
            .map(|b| b.secrets)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    for (k, v) in shown.env.iter_mut() {
        if settings.secrets.contains(k) || bundle_secrets.contains(k) {
            *v = SECRET_VALUE.to_owned();
        }
    }
    shown
}

/// Why `func`'s enabled version `sha` is not routed here, if it is not.
fn refusal(refused: &[crate::registry::Refusal], func: &str, sha: Option<&str>) -> Option<String> {
    let sha = sha?;
    refused
        .iter()
        .find(|r| r.func == func && r.sha.as_deref() == Some(sha))
        .map(|r| r.reason.clone())
}

async fn routes_of(api: &Api, sha: &str) -> Routes {
    match api.registry.bundle(sha).await {
        Ok(b) => Routes::Effective(EffectiveRoutes {
            runtime: b.runtime.as_str().to_owned(),
            version: b.version.clone(),
            host: b.host.as_deref().unwrap_or("*").to_owned(),
            base_path: b.base_path.clone(),
            bases: shown(&b.bases),
            operations: operations(&b),
        }),
        Err(e) => Routes::Unavailable(RoutesUnavailable { error: e.message }),
    }
}

/// Every Func, its enabled version and routes.
#[utoipa::path(get, path = "/v1/funcs", operation_id = "listFuncs",
    security(("token" = ["read"])),
    responses(
        (status = 200, description = "every Func, its enabled version and routes", body = FuncList),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
async fn list(State(api): Shared) -> Json<FuncList> {
    let st = api.registry.state().await;
    let refused = api.registry.refused();
    let mut funcs = Vec::new();
    for (name, f) in &st.funcs {
        let routes = match &f.enabled {
            Some(sha) => Some(routes_of(&api, sha).await),
            None => None,
        };
        funcs.push(FuncSummary {
            refused: refusal(&refused, name, f.enabled.as_deref()),
            name: name.clone(),
            enabled: f.enabled.clone(),
            uploads: f.uploads.len(),
            routes,
        });
    }
    Json(FuncList {
        revision: st.revision,
        funcs,
    })
}

/// One Func: its settings, uploads and effective routes.
#[utoipa::path(get, path = "/v1/funcs/{name}", operation_id = "showFunc",
    security(("token" = ["read"])),
    params(("name" = String, Path, description = "the Func")),
    responses(
        (status = 200, description = "the Func, its settings, uploads and effective routes", body = FuncDetail),
        (status = 404, description = "no such Func", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
async fn show(State(api): Shared, Path(name): Path<String>) -> Response {
    let st = api.registry.state().await;
    let Some(f) = st.funcs.get(&name) else {
        return error(404, "no_func", &format!("no Func named {name}"));
    };
    let routes = match &f.enabled {
        Some(sha) => Some(routes_of(&api, sha).await),
        None => None,
    };
    let triggers = match &f.enabled {
        Some(sha) => triggers_of(&api, &name, sha).await,
        None => Vec::new(),
    };
    Json(FuncDetail {
        settings: shown_settings(&api, &f.settings, f.enabled.as_deref()).await,
        refused: refusal(&api.registry.refused(), &name, f.enabled.as_deref()),
        triggers,
        name,
        enabled: f.enabled.clone(),
        uploads: f.uploads.clone(),
        routes,
    })
    .into_response()
}

/// The triggers of `func`'s version `sha`, each with its state (what it
/// fired, when) from the state store when this Tron has one.
async fn triggers_of(api: &Api, func: &str, sha: &str) -> Vec<serde_json::Value> {
    let Ok(b) = api.registry.bundle(sha).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for op in &b.operations {
        for t in &op.triggers {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            v["operation"] = serde_json::Value::String(op.operation_id.clone());
            if let Some(calls) = &api.calls {
                if let Ok(Some(state)) =
                    crate::schedules::state_of(calls.store(), func, &t.name).await
                {
                    v["fired"] = state.fired.into();
                    v["last_fired_ms"] = state.last_fired_ms.into();
                    if matches!(t.kind, funcatron_bundle::triggers::TriggerKind::Schedule(_)) {
                        v["last_tick_ms"] = state.last_tick_ms.into();
                    }
                }
            }
            out.push(v);
        }
    }
    out
}

/// Uploads and enable/disable/rollback events.
#[utoipa::path(get, path = "/v1/funcs/{name}/history", operation_id = "funcHistory",
    security(("token" = ["read"])),
    params(("name" = String, Path, description = "the Func")),
    responses(
        (status = 200, description = "uploads and enable/disable/rollback events", body = FuncHistory),
        (status = 404, description = "no such Func", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
async fn history(State(api): Shared, Path(name): Path<String>) -> Response {
    let st = api.registry.state().await;
    match st.funcs.get(&name) {
        Some(f) => Json(FuncHistory {
            name,
            history: f.history.clone(),
            uploads: f.uploads.clone(),
        })
        .into_response(),
        None => error(404, "no_func", &format!("no Func named {name}")),
    }
}

/// Route to a version (default the latest upload) with settings; atomic on
/// every Tron.
#[utoipa::path(post, path = "/v1/funcs/{name}/enable", operation_id = "enableFunc",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    request_body(content = EnableRequest, description = "optional"),
    responses(
        (status = 200, description = "enabled", body = Enabled),
        (status = 400, description = "a malformed body", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func or version", body = ApiError),
        (status = 409, description = "one of its bases conflicts with an enabled or a static bundle's (`route_conflict`, naming both)", body = ApiError),
    ))]
async fn enable(State(api): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    let req: EnableRequest = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let settings = Some(req.settings.unwrap_or_default());
    match api
        .registry
        .enable(&name, req.sha.as_deref(), settings, "enable")
        .await
    {
        Ok(st) => Json(Enabled {
            enabled: st.funcs.get(&name).and_then(|f| f.enabled.clone()),
            name,
            revision: st.revision,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Stop routing to a Func; its routes answer 404.
#[utoipa::path(post, path = "/v1/funcs/{name}/disable", operation_id = "disableFunc",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    responses(
        (status = 200, description = "disabled; its routes answer 404", body = Enabled),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func", body = ApiError),
    ))]
async fn disable(State(api): Shared, Path(name): Path<String>) -> Response {
    match api.registry.disable(&name).await {
        Ok(st) => Json(Enabled {
            name,
            enabled: None,
            revision: st.revision,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Enable the version enabled before the current one.
#[utoipa::path(post, path = "/v1/funcs/{name}/rollback", operation_id = "rollbackFunc",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    responses(
        (status = 200, description = "rolled back", body = Enabled),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func", body = ApiError),
        (status = 409, description = "nothing to roll back to", body = ApiError),
    ))]
async fn rollback(State(api): Shared, Path(name): Path<String>) -> Response {
    match api.registry.rollback(&name).await {
        Ok(st) => Json(Enabled {
            enabled: st.funcs.get(&name).and_then(|f| f.enabled.clone()),
            name,
            revision: st.revision,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Call a Func through the request path (an in-process ingress on this
/// Tron), answering with exactly what the Func answered.
#[utoipa::path(post, path = "/v1/funcs/{name}/invoke", operation_id = "invokeFunc",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    request_body(content = InvokeRequest, description = "the request to make; optional"),
    responses(
        (status = "default", description = "the Func's answer, as is"),
        (status = 400, description = "a malformed body, or a `base` the Func is not served on (the message lists its bases)", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func is enabled", body = ApiError),
        (status = 409, description = "this Tron does not route the Func (`route_conflict`, with the reason), or routes that request to another Func (`routed_elsewhere`)", body = ApiError),
        (status = 413, description = "larger than the upload limit", body = ApiError),
        (status = 503, description = "this Tron cannot invoke Funcs", body = ApiError),
    ))]
async fn invoke(State(api): Shared, Path(name): Path<String>, body: axum::body::Body) -> Response {
    let body = match limited(&api, body).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(ingress) = api.ingress.clone() else {
        return error(503, "no_ingress", "this Tron cannot invoke Funcs");
    };
    let req: InvokeRequest = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(b) = api.registry.serving(&name).await else {
        if let Some(r) = api.registry.refused().iter().find(|r| r.func == name) {
            let message = format!("{name} is not routed on this Tron: {}", r.reason);
            return error(409, "route_conflict", &message);
        }
        return error(404, "no_func", &format!("no Func named {name} is enabled"));
    };
    let http = match invoke_request(&b, req) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let host = http
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let table = api.registry.table();
    if let RouteOutcome::Found(r) = table.route(host, http.method().as_str(), http.uri().path()) {
        if r.func != name {
            let message = format!(
                "{} {host}{} is routed to {}, not {name}, on this Tron: choose another `base` or give a `host` header",
                http.method(),
                http.uri().path(),
                r.func
            );
            return error(409, "routed_elsewhere", &message);
        }
    }
    match tower::ServiceExt::oneshot(ingress, http).await {
        Ok(r) => r.into_response(),
        Err(e) => match e {},
    }
}

/// Run a chain of Funcs through the request path (an in-process ingress
/// on this Tron, at its chain endpoint), answering with the last stage's
/// answer or the first failing stage's error.
#[utoipa::path(post, path = "/v1/chain", operation_id = "runChain",
    security(("token" = ["admin"])),
    request_body(content = api::ChainRequest, description = "the chain and its input"),
    responses(
        (status = "default", description = "the last stage's answer, as is; or the first failing stage's status with a JSON `chain_stage_failed` error naming it"),
        (status = 400, description = "a malformed body or expression, or a stage naming no single operation", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token, or a stage's Func did not opt in (`chain_not_allowed`)", body = ApiError),
        (status = 404, description = "a stage names no enabled Func", body = ApiError),
        (status = 503, description = "this Tron cannot invoke Funcs", body = ApiError),
    ))]
async fn chain(State(api): Shared, body: axum::body::Body) -> Response {
    let body = match limited(&api, body).await {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(ingress) = api.ingress.clone() else {
        return error(503, "no_ingress", "this Tron cannot invoke Funcs");
    };
    let req: api::ChainRequest = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let builder = axum::http::Request::builder()
        .method("POST")
        .uri(funcatron_routes::chain::CHAIN_PATH)
        .header(funcatron_routes::chain::CHAIN_HEADER, &req.chain);
    let Some(http) = local_request(builder, "localhost".into(), &req.headers, req.body) else {
        return error(
            400,
            "bad_request",
            "the chain or headers are not valid HTTP header values",
        );
    };
    match tower::ServiceExt::oneshot(ingress, http).await {
        Ok(r) => r.into_response(),
        Err(e) => match e {},
    }
}

/// The HTTP request `req` asks of `b`: on its `base` (default the
/// primary), with its Host (a caller's `host` header wins).
fn invoke_request(
    b: &Bundle,
    req: InvokeRequest,
) -> Result<axum::http::Request<axum::body::Body>, Box<Response>> {
    let (host, base_path) = invoke_base(b, req.base.as_deref())?;
    let rel = req.path.unwrap_or_else(|| "/".into());
    let mut path = if base_path == "/" {
        rel.clone()
    } else if rel == "/" || rel.is_empty() {
        base_path
    } else {
        format!("{base_path}/{}", rel.trim_start_matches('/'))
    };
    if let Some(q) = req.query.filter(|q| !q.is_empty()) {
        path = format!("{path}?{q}");
    }
    let builder = axum::http::Request::builder()
        .method(req.method.as_deref().unwrap_or("GET"))
        .uri(&path);
    local_request(builder, host, &req.headers, req.body).ok_or_else(|| {
        Box::new(error(
            400,
            "bad_request",
            "method, path or headers are not valid HTTP",
        ))
    })
}

/// A request for the in-process ingress: `builder` with `headers` (a
/// `host` among them replacing `host`), the body, and a loopback peer.
fn local_request(
    mut builder: axum::http::request::Builder,
    mut host: String,
    headers: &std::collections::BTreeMap<String, String>,
    body: Option<String>,
) -> Option<axum::http::Request<axum::body::Body>> {
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("host") {
            host.clone_from(v);
        } else {
            builder = builder.header(k, v);
        }
    }
    let mut http = builder
        .header(header::HOST, host)
        .body(axum::body::Body::from(body.unwrap_or_default()))
        .ok()?;
    http.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            0,
        ))));
    Some(http)
}

/// Every base `b` is served on: its own, then its operations' own, each
/// once.
fn every_base(b: &Bundle) -> Vec<&Base> {
    let mut all: Vec<&Base> = b.bases.iter().collect();
    for base in b.operations.iter().filter_map(|o| o.bases.as_deref()) {
        for x in base {
            if !all.contains(&x) {
                all.push(x);
            }
        }
    }
    all
}

/// The Host and base path of an invoke of `b` on `base` (as the routes
/// show it; `None`: the primary, its variables at their defaults). Any
/// host is `localhost`; another base's variables are filled in so the
/// route table matches them: each by its name (lower-case in a host), a
/// port's by `80`.
fn invoke_base(b: &Bundle, base: Option<&str>) -> Result<(String, String), Box<Response>> {
    let primary = || {
        let host = b.host.clone().unwrap_or_else(|| "localhost".into());
        (host, b.base_path.clone())
    };
    let Some(wanted) = base else {
        return Ok(primary());
    };
    let all = every_base(b);
    let same = |x: &Base| x.to_string().trim_end_matches('/') == wanted.trim_end_matches('/');
    match all.iter().position(|x| same(x)) {
        Some(0) if !b.bases.is_empty() => Ok(primary()),
        Some(i) => {
            let host = all[i]
                .host
                .as_deref()
                .map_or_else(|| "localhost".to_owned(), concrete_host);
            Ok((host, fill(&all[i].path, str::to_owned)))
        }
        None => {
            let list: Vec<String> = all.iter().map(ToString::to_string).collect();
            Err(Box::new(error(
                400,
                "unknown_base",
                &format!(
                    "{} is not served on {wanted:?}; its bases: {}",
                    b.name,
                    list.join(", ")
                ),
            )))
        }
    }
}

/// A host pattern as a Host it matches: variables in the name by their
/// names, lower-case; in the port by `80`.
fn concrete_host(host: &str) -> String {
    let name = |v: &str| v.to_ascii_lowercase();
    match host.rsplit_once(':') {
        Some((h, port))
            if !h.is_empty()
                && !port.is_empty()
                && port
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"{}_-".contains(&c))
                && (port.bytes().all(|c| c.is_ascii_digit()) || port.contains('{')) =>
        {
            format!("{}:{}", fill(h, name), fill(port, |_| "80".to_owned()))
        }
        _ => fill(host, name),
    }
}

/// `text` with each `{name}` replaced by `with(name)` (an empty name by
/// `x`: a variable matches one character or more).
fn fill(text: &str, with: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}').map(|c| c + open) else {
            break;
        };
        out.push_str(&rest[..open]);
        let name = &rest[open + 1..close];
        out.push_str(&if name.is_empty() {
            "x".to_owned()
        } else {
            with(name)
        });
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Box<Response>> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| Box::new(error(400, "bad_request", &format!("request body: {e}"))))
}

/// Start recording a Func's request/response pairs.
#[utoipa::path(post, path = "/v1/funcs/{name}/capture", operation_id = "captureStart",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    request_body(content = CaptureRequest, description = "optional"),
    responses(
        (status = 200, description = "capturing", body = CaptureStarted),
        (status = 400, description = "a malformed body", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func", body = ApiError),
    ))]
async fn capture_start(State(api): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    let req: CaptureRequest = match json_body(&body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let lower = |list: &[String], extra: &[String]| -> Vec<String> {
        let mut all: Vec<String> = list
            .iter()
            .chain(extra)
            .map(|h| h.to_ascii_lowercase())
            .collect();
        all.sort();
        all.dedup();
        all
    };
    let capture = funcatron_control::state::Capture {
        id: funcatron_envelope::new_request_id()[..12].to_owned(),
        sample: req.sample.unwrap_or(1.0),
        until_ms: req
            .for_ms
            .map(|ms| funcatron_envelope::now_ms() as u64 + ms),
        max: req.max,
        redact: lower(
            &owned(funcatron_control::state::DEFAULT_REDACT),
            &req.redact,
        ),
        redact_query: lower(&api.redact_query, &req.redact_query),
        redact_json_fields: lower(&api.redact_json_fields, &req.redact_json_fields),
    };
    match api.registry.capture_start(&name, capture).await {
        Ok(st) => Json(CaptureStarted {
            capture: st.captures.get(&name).cloned(),
            name,
            revision: st.revision,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Stop recording.
#[utoipa::path(post, path = "/v1/funcs/{name}/capture/stop", operation_id = "captureStop",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    responses(
        (status = 200, description = "stopped", body = CaptureStopped),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func", body = ApiError),
    ))]
async fn capture_stop(State(api): Shared, Path(name): Path<String>) -> Response {
    match api.registry.capture_stop(&name).await {
        Ok(st) => Json(CaptureStopped {
            name,
            capturing: false,
            revision: st.revision,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// The recorded pairs, as JSON Lines.
#[utoipa::path(get, path = "/v1/captures/{name}", operation_id = "captureExport",
    security(("token" = ["read"])),
    params(("name" = String, Path, description = "the Func")),
    responses(
        (status = 200, description = "one request/response pair a line", content_type = "application/x-ndjson", body = String),
        (status = 400, description = "not a Func name", body = ApiError),
        (status = 404, description = "nothing was captured", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
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

/// Set a Func's log level on every Runner at once, without a restart.
#[utoipa::path(post, path = "/v1/funcs/{name}/log-level", operation_id = "setLogLevel",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "the Func")),
    request_body(content = LogLevelRequest),
    responses(
        (status = 200, description = "set", body = LogLevelSet),
        (status = 400, description = "a malformed body", body = ApiError),
        (status = 401, description = "no or a wrong token", body = ApiError),
        (status = 403, description = "the read token: this call needs the admin token", body = ApiError),
        (status = 404, description = "no such Func", body = ApiError),
    ))]
async fn log_level(State(api): Shared, Path(name): Path<String>, body: Bytes) -> Response {
    let req: LogLevelRequest = match json_body(&body) {
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
        Ok(st) => Json(LogLevelSet {
            log_level: st.log_levels.get(&name).cloned(),
            name,
            revision: st.revision,
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// A Func's recent log lines from every Runner (JSON Lines, each a
/// `LogLine`), then, with `follow`, new ones as they come.
#[utoipa::path(get, path = "/v1/funcs/{name}/logs", operation_id = "funcLogs",
    security(("token" = ["read"])),
    params(("name" = String, Path, description = "the Func"), LogsQuery),
    responses(
        (status = 200, description = "one `LogLine` a line", content_type = "application/x-ndjson", body = String),
        (status = 401, description = "no or a wrong token", body = ApiError),
    ))]
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

//! The management API shows every base a Func is served on (the upload
//! answer, `GET /v1/funcs`, each operation with its own servers) and
//! `invoke` calls the base the caller names: its variables filled in so
//! the route table matches, any host as `localhost`, a caller's `host`
//! header kept; an unknown base is a 400 listing the Func's; a request
//! this Tron would route to another Func is refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use funcatron_control::state::FuncSettings;
use funcatron_tron::mgmt::{self, api};
use funcatron_tron::RouteOutcome;
use serde_json::{json, Value};

const DOC: &str = "openapi: 3.1.0
info: {title: multi, version: '1'}
x-funcatron: {name: multi, runtime: lua}
servers:
  - url: https://api.example.com/v1
  - url: 'https://{tenant}.example.com:{port}/v2'
    variables: {tenant: {default: acme}, port: {default: '8443'}}
  - url: /rel
paths:
  /pets:
    get: {operationId: pets}
  /own:
    servers: [{url: 'https://own.example.com/o'}]
    get: {operationId: own}
";

fn multi_archive() -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("openapi.yaml"), DOC).unwrap();
    std::fs::write(
        src.path().join("main.lua"),
        "return { pets = function() end, own = function() end }",
    )
    .unwrap();
    funcatron_bundle::archive::build(src.path()).unwrap().1
}

/// A Lua bundle `name` on one server `url` with `GET /pets`.
fn other_archive(name: &str, url: &str) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("openapi.yaml"),
        format!("openapi: 3.1.0\ninfo: {{title: {name}, version: '1'}}\nx-funcatron: {{name: {name}, runtime: lua}}\nservers: [{{url: '{url}'}}]\npaths:\n  /pets:\n    get: {{operationId: pets}}\n"),
    )
    .unwrap();
    std::fs::write(
        src.path().join("main.lua"),
        "return { pets = function() end }",
    )
    .unwrap();
    funcatron_bundle::archive::build(src.path()).unwrap().1
}

/// An ingress that answers with the request it got: method, Host, URI.
fn echo() -> Router {
    Router::new().fallback(|req: Request| async move {
        let host = req
            .headers()
            .get_all("host")
            .iter()
            .map(|h| h.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        format!("{} {host} {}", req.method(), req.uri())
    })
}

async fn call(app: &Router, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer t")
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let r = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
    let status = r.status().as_u16();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

const BASES: [&str; 3] = [
    "api.example.com/v1",
    "{tenant}.example.com:{port}/v2",
    "*/rel",
];

#[tokio::test]
async fn answers_list_every_base_and_invoke_calls_the_one_asked_for() {
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let app = mgmt::router(
        Arc::clone(&registry),
        mgmt::MgmtOptions::new("t"),
        Some(echo()),
    );
    let req = axum::http::Request::post("/v1/bundles?enable=true")
        .header("authorization", "Bearer t")
        .body(Body::from(multi_archive()))
        .unwrap();
    let r = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value =
        serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap())
            .unwrap();
    common::check_answer("POST", "/v1/bundles", 201, &v);
    let up: api::Uploaded = serde_json::from_value(v).unwrap();
    // The primary fields as before, every base beside them.
    assert_eq!(
        (up.host.as_deref(), up.base_path.as_str()),
        (Some("api.example.com"), "/v1")
    );
    assert_eq!(up.bases, BASES);
    let own: Vec<_> = up.operations.iter().map(|o| o.bases.clone()).collect();
    assert_eq!(own, [Some(vec!["own.example.com/o".to_owned()]), None]);

    let (s, text) = call(&app, "GET", "/v1/funcs", None).await;
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    common::check_answer("GET", "/v1/funcs", 200, &v);
    let list: api::FuncList = serde_json::from_value(v).unwrap();
    let Some(api::Routes::Effective(routes)) = &list.funcs[0].routes else {
        panic!("{text}")
    };
    assert_eq!(
        (routes.host.as_str(), routes.bases.as_slice()),
        ("api.example.com", &BASES.map(String::from)[..])
    );
    assert_eq!(
        routes.operations[0].bases.as_deref(),
        Some(&["own.example.com/o".to_owned()][..])
    );

    let invoke = |body: Value| {
        let app = app.clone();
        async move { call(&app, "POST", "/v1/funcs/multi/invoke", Some(body)).await }
    };
    // No base: the primary, as before.
    let (s, text) = invoke(json!({"path": "/pets"})).await;
    assert_eq!((s, text.as_str()), (200, "GET api.example.com /v1/pets"));
    // The primary named: its variables' defaults (it has none here).
    let (_, text) = invoke(json!({"base": "api.example.com/v1", "path": "/pets"})).await;
    assert_eq!(text, "GET api.example.com /v1/pets");
    // Variables filled in: a host and path the route table takes.
    let (s, text) = invoke(json!({"base": BASES[1], "path": "/pets", "query": "a=1"})).await;
    assert_eq!(
        (s, text.as_str()),
        (200, "GET tenant.example.com:80 /v2/pets?a=1")
    );
    match registry
        .table()
        .route("tenant.example.com:80", "GET", "/v2/pets")
    {
        RouteOutcome::Found(r) => assert_eq!(r.func, "multi"),
        other => panic!("{other:?}"),
    }
    // The caller's Host wins, once.
    let (_, text) = invoke(
        json!({"base": BASES[1], "path": "/pets", "headers": {"Host": "globex.example.com:8443"}}),
    )
    .await;
    assert_eq!(text, "GET globex.example.com:8443 /v2/pets");
    // Any host; a trailing `/` or none.
    let (_, text) = invoke(json!({"base": "*/rel/", "method": "GET", "path": "pets"})).await;
    assert_eq!(text, "GET localhost /rel/pets");
    // An operation's own base.
    let (_, text) = invoke(json!({"base": "own.example.com/o", "path": "/own"})).await;
    assert_eq!(text, "GET own.example.com /o/own");
    // An unknown base: 400, listing them.
    let (s, text) = invoke(json!({"base": "nope.example.com/v1"})).await;
    assert_eq!(s, 400, "{text}");
    common::check_answer(
        "POST",
        "/v1/funcs/{name}/invoke",
        400,
        &serde_json::from_str(&text).unwrap(),
    );
    let e: api::ApiError = serde_json::from_str(&text).unwrap();
    assert_eq!(e.error, "unknown_base");
    for b in BASES.iter().chain(&["own.example.com/o"]) {
        assert!(e.message.contains(b), "{b}: {}", e.message);
    }

    // A literal host beside the variable one takes that request: invoke
    // refuses to call the other Func.
    registry
        .upload(
            &other_archive("literal", "https://tenant.example.com:80/v2"),
            "literal",
            Some(FuncSettings::default()),
        )
        .await
        .unwrap();
    let (s, text) = invoke(json!({"base": BASES[1], "path": "/pets"})).await;
    assert_eq!(s, 409, "{text}");
    common::check_answer(
        "POST",
        "/v1/funcs/{name}/invoke",
        409,
        &serde_json::from_str(&text).unwrap(),
    );
    let e: api::ApiError = serde_json::from_str(&text).unwrap();
    assert_eq!(e.error, "routed_elsewhere");
    assert!(e.message.contains("literal"), "{}", e.message);
    // With a Host of its own it goes through.
    let (s, _) = invoke(
        json!({"base": BASES[1], "path": "/pets", "headers": {"host": "initech.example.com:1"}}),
    )
    .await;
    assert_eq!(s, 200);
}

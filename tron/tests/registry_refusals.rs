//! A registry whose bundles conflict still opens and routes the rest: an
//! enabled upload whose bases conflict with a static bundle's (`--bundles`)
//! is refused and the static one kept; two enabled uploads that conflict
//! with each other are both refused; each refusal names both bundles, is
//! shown by `GET /v1/funcs`, and blocks no unrelated change.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use funcatron_bundle::Bundle;
use funcatron_control::state::{ClusterState, FuncSettings};
use funcatron_tron::mgmt::{self, api};
use funcatron_tron::registry::{Registry, RegistryOptions};
use funcatron_tron::RouteOutcome;

/// A Lua bundle directory `root/name` on `servers`, one operation at `path`.
fn bundle_dir(root: &Path, name: &str, servers: &str, path: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("openapi.yaml"),
        format!(
            "openapi: 3.1.0\ninfo: {{title: {name}, version: '1'}}\nx-funcatron: {{name: {name}, runtime: lua}}\nservers: {servers}\npaths:\n  {path}:\n    get: {{operationId: hi}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("main.lua"),
        "return { hi = function() return 'hi' end }",
    )
    .unwrap();
    dir
}

fn archive(name: &str, servers: &str, path: &str) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    let dir = bundle_dir(src.path(), name, servers, path);
    funcatron_bundle::archive::build(&dir).unwrap().1
}

async fn open(store: &Path, static_bundles: Vec<Bundle>) -> Arc<Registry> {
    let broker = funcatron_broker::AnyBroker::Embedded(funcatron_broker::EmbeddedBroker::new(256));
    let (registry, _routes) = Registry::open(
        RegistryOptions {
            store: store.to_owned(),
            advertise: "http://127.0.0.1:1".into(),
            static_bundles,
            ..Default::default()
        },
        funcatron_tron::TronContext::new(broker),
    )
    .await
    .unwrap_or_else(|e| panic!("the registry does not open: {e}"));
    registry
}

/// The Func `GET host/path` routes to, if any.
fn routed(registry: &Registry, path: &str) -> Option<String> {
    match registry.table().route("any.example", "GET", path) {
        RouteOutcome::Found(r) => Some(r.func.to_owned()),
        _ => None,
    }
}

async fn func_list(registry: &Arc<Registry>) -> api::FuncList {
    let app = mgmt::router(Arc::clone(registry), mgmt::MgmtOptions::new("t"), None);
    let req = axum::http::Request::get("/v1/funcs")
        .header("authorization", "Bearer t")
        .body(Body::empty())
        .unwrap();
    let r = tower::ServiceExt::oneshot(app, req).await.unwrap();
    assert_eq!(r.status(), 200);
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    common::check_answer("GET", "/v1/funcs", 200, &v);
    serde_json::from_value(v).unwrap()
}

fn refused_of<'a>(list: &'a api::FuncList, name: &str) -> Option<&'a str> {
    list.funcs
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
        .refused
        .as_deref()
}

#[tokio::test]
async fn a_stored_bundle_conflicting_with_a_static_one_is_refused_and_the_rest_route() {
    let store = tempfile::tempdir().unwrap();
    let on = Some(FuncSettings::default());
    let uploaded_sha = {
        let registry = open(store.path(), Vec::new()).await;
        let (sha, _) = registry
            .upload(
                &archive("uploaded", "[{url: /mine}, {url: /shared}]", "/x"),
                "uploaded",
                on.clone(),
            )
            .await
            .unwrap();
        registry
            .upload(
                &archive("other", "[{url: /other}]", "/z"),
                "other",
                on.clone(),
            )
            .await
            .unwrap();
        sha
    };
    // The Tron restarts with a static bundle on `uploaded`'s second base.
    let dirs = tempfile::tempdir().unwrap();
    let fixed = Bundle::load(&bundle_dir(dirs.path(), "fixed", "[{url: /shared}]", "/y")).unwrap();
    let registry = open(store.path(), vec![fixed]).await;
    assert_eq!(routed(&registry, "/shared/y").as_deref(), Some("fixed"));
    assert_eq!(routed(&registry, "/other/z").as_deref(), Some("other"));
    assert_eq!(routed(&registry, "/shared/x"), None);
    assert_eq!(
        routed(&registry, "/mine/x"),
        None,
        "not even on its other base"
    );
    let refused = registry.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let r = &refused[0];
    assert_eq!(
        (r.func.as_str(), r.sha.as_deref()),
        ("uploaded", Some(uploaded_sha.as_str()))
    );
    assert!(
        r.reason.contains("`uploaded`") && r.reason.contains("`fixed`"),
        "{r:?}"
    );
    assert!(registry.serving("uploaded").await.is_none());
    let list = func_list(&registry).await;
    assert_eq!(refused_of(&list, "uploaded"), Some(r.reason.as_str()));
    assert_eq!(refused_of(&list, "other"), None);
    // The state is as it was: `uploaded` is still enabled, for the Trons
    // that do not have `fixed`.
    assert_eq!(
        registry.state().await.funcs["uploaded"].enabled.as_deref(),
        Some(uploaded_sha.as_str())
    );

    // Unrelated changes go through; a new conflict is refused as before.
    registry
        .upload(
            &archive("third", "[{url: /third}]", "/t"),
            "third",
            on.clone(),
        )
        .await
        .unwrap();
    assert_eq!(routed(&registry, "/third/t").as_deref(), Some("third"));
    let e = registry
        .upload(
            &archive("fourth", "[{url: /shared}]", "/w"),
            "fourth",
            on.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (409, "route_conflict"), "{e}");
    assert!(
        e.message.contains("`fourth`") && e.message.contains("`fixed`"),
        "{e}"
    );
    assert_eq!(registry.state().await.funcs["fourth"].enabled, None);
    // Disabling the refused one clears its refusal.
    registry.disable("uploaded").await.unwrap();
    assert!(registry.refused().is_empty());
    assert_eq!(routed(&registry, "/shared/y").as_deref(), Some("fixed"));
}

#[tokio::test]
async fn two_enabled_uploads_that_conflict_are_both_refused_and_the_rest_route() {
    let store = tempfile::tempdir().unwrap();
    {
        let registry = open(store.path(), Vec::new()).await;
        for name in ["left", "right"] {
            let servers = "[{url: 'https://{t}.example.com/v1', variables: {t: {default: a}}}]";
            registry
                .upload(&archive(name, servers, &format!("/{name}")), name, None)
                .await
                .unwrap();
        }
        registry
            .upload(
                &archive("keep", "[{url: /keep}]", "/k"),
                "keep",
                Some(FuncSettings::default()),
            )
            .await
            .unwrap();
    }
    // Both enabled, as a store written by an older Tron (whose loader
    // routed on fewer bases) could hold them.
    let path = store.path().join("state.json");
    let mut state: ClusterState = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for name in ["left", "right"] {
        let f = state.funcs.get_mut(name).unwrap();
        f.enabled = Some(f.uploads[0].sha.clone());
    }
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();

    let registry = open(store.path(), Vec::new()).await;
    assert_eq!(routed(&registry, "/keep/k").as_deref(), Some("keep"));
    let host = |h: &str, p: &str| match registry.table().route(h, "GET", p) {
        RouteOutcome::Found(r) => Some(r.func.to_owned()),
        _ => None,
    };
    assert_eq!(host("a.example.com", "/v1/left"), None);
    assert_eq!(host("a.example.com", "/v1/right"), None);
    let refused = registry.refused();
    let mut names: Vec<&str> = refused.iter().map(|r| r.func.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["left", "right"]);
    for r in &refused {
        assert!(
            r.reason.contains("`left`") && r.reason.contains("`right`"),
            "{r:?}"
        );
    }
    let list = func_list(&registry).await;
    assert!(refused_of(&list, "left").is_some() && refused_of(&list, "right").is_some());
    assert_eq!(refused_of(&list, "keep"), None);

    // Disabling one of the pair lets the other route.
    registry.disable("left").await.unwrap();
    assert!(registry.refused().is_empty(), "{:?}", registry.refused());
    assert_eq!(host("b.example.com", "/v1/right").as_deref(), Some("right"));
}

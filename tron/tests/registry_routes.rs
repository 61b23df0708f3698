//! The registry and the loader agree: an upload enabled beside a Func
//! whose bases (any server, any operation's own) conflict with its own is
//! refused naming both, and a bundle split over files (external `$ref`s)
//! is accepted and routes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use funcatron_control::state::FuncSettings;
use funcatron_tron::RouteOutcome;

/// A Lua bundle archive named `name` with these `servers` and one
/// operation at `path`.
fn archive(name: &str, servers: &str, path: &str) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("openapi.yaml"),
        format!(
            "openapi: 3.1.0\ninfo: {{title: {name}, version: '1'}}\nx-funcatron: {{name: {name}, runtime: lua}}\nservers: {servers}\npaths:\n  {path}:\n    get: {{operationId: hi}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        src.path().join("main.lua"),
        "return { hi = function() return 'hi' end }",
    )
    .unwrap();
    funcatron_bundle::archive::build(src.path()).unwrap().1
}

#[tokio::test]
async fn an_upload_conflicting_on_any_base_is_refused_naming_both() {
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let on = Some(FuncSettings::default());
    registry
        .upload(
            &archive(
                "first",
                "[{url: 'https://a.example.com/v1'}, {url: /shared}]",
                "/x",
            ),
            "first",
            on.clone(),
        )
        .await
        .unwrap();
    // Its second server is `first`'s second.
    let e = registry
        .upload(
            &archive("second", "[{url: /own}, {url: './shared/'}]", "/y"),
            "second",
            on.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!((e.status, e.code), (409, "route_conflict"), "{e}");
    assert!(
        e.message.contains("`first`")
            && e.message.contains("`second`")
            && e.message.contains("/shared"),
        "{e}"
    );
    assert_eq!(registry.state().await.funcs["second"].enabled, None);
    // A variable host beside the first's literal one is no conflict (the
    // literal one is more specific); two variable hosts of one shape are.
    registry
        .upload(
            &archive(
                "third",
                "[{url: 'https://{t}.example.com/v1', variables: {t: {default: b}}}]",
                "/z",
            ),
            "third",
            on.clone(),
        )
        .await
        .unwrap();
    let e = registry
        .upload(
            &archive(
                "fourth",
                "[{url: 'https://{u}.example.com/v1/', variables: {u: {default: c}}}]",
                "/w",
            ),
            "fourth",
            on.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status, 409, "{e}");
    assert!(
        e.message.contains("`third`") && e.message.contains("`fourth`"),
        "{e}"
    );
}

#[tokio::test]
async fn a_bundle_split_over_files_uploads_and_routes() {
    let store = tempfile::tempdir().unwrap();
    let (registry, routes) = {
        let broker =
            funcatron_broker::AnyBroker::Embedded(funcatron_broker::EmbeddedBroker::new(64));
        funcatron_tron::registry::Registry::open(
            funcatron_tron::registry::RegistryOptions {
                store: store.path().to_owned(),
                advertise: "http://127.0.0.1:1".into(),
                ..Default::default()
            },
            funcatron_tron::TronContext::new(broker),
        )
        .await
        .unwrap()
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../swagger-examples/multi-file");
    let (_, bytes) = funcatron_bundle::archive::build(&dir).unwrap();
    let (_, b) = registry
        .upload(&bytes, "multi-file", Some(FuncSettings::default()))
        .await
        .unwrap();
    assert_eq!(b.operations.len(), 5);
    let table = routes.borrow().clone();
    match table.route("any", "GET", "/multi/pets/4") {
        RouteOutcome::Found(r) => assert_eq!(
            (r.operation_id, r.template),
            ("showPetById", "/pets/{petId}")
        ),
        other => panic!("{other:?}"),
    }
}

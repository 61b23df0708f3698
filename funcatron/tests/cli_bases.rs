//! The CLI shows every base a Func is served on and invokes the one
//! asked for: `funcatron func list` prints each base (and why this Tron
//! refuses a Func), `funcatron invoke --base` calls that base, and an
//! unknown base fails with the Func's bases. Against an in-process
//! management API whose ingress echoes the request it gets.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;

use axum::extract::Request;
use axum::Router;
use funcatron_control::state::FuncSettings;
use funcatron_tron::mgmt;
use funcatron_tron::registry::{Registry, RegistryOptions};

const TOKEN: &str = "cli-token";

const DOC: &str = "openapi: 3.1.0
info: {title: multi, version: '1'}
x-funcatron: {name: multi, runtime: lua}
servers:
  - url: https://api.example.com/v1
  - url: 'https://{tenant}.example.com/v2'
    variables: {tenant: {default: acme}}
  - url: /rel
paths:
  /pets:
    get: {operationId: pets}
";

fn cli(args: &[&str], mgmt: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_funcatron"))
        .args(args)
        .env("FUNCATRON_TRON_URL", mgmt)
        .env("FUNCATRON_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn func_list_prints_every_base_and_invoke_calls_the_one_asked_for() {
    let store = tempfile::tempdir().unwrap();
    let broker = funcatron_broker::AnyBroker::Embedded(funcatron_broker::EmbeddedBroker::new(64));
    let (registry, _routes) = Registry::open(
        RegistryOptions {
            store: store.path().to_owned(),
            advertise: "http://127.0.0.1:1".into(),
            ..Default::default()
        },
        funcatron_tron::TronContext::new(broker),
    )
    .await
    .unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("openapi.yaml"), DOC).unwrap();
    std::fs::write(
        src.path().join("main.lua"),
        "return { pets = function() end }",
    )
    .unwrap();
    let (_, bytes) = funcatron_bundle::archive::build(src.path()).unwrap();
    registry
        .upload(&bytes, "multi", Some(FuncSettings::default()))
        .await
        .unwrap();
    let echo = Router::new().fallback(|req: Request| async move {
        let host = req.headers()["host"].to_str().unwrap().to_owned();
        format!("{host} {}", req.uri())
    });
    let app = mgmt::router(
        Arc::clone(&registry),
        mgmt::MgmtOptions::new(TOKEN),
        Some(echo),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let run = |args: Vec<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || cli(&args, &url))
    };
    let (ok, out) = run(vec!["func", "list"]).await.unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains("api.example.com/v1, {tenant}.example.com/v2, */rel"),
        "{out}"
    );
    let (ok, out) = run(vec!["invoke", "multi", "/pets"]).await.unwrap();
    assert_eq!((ok, out.as_str()), (true, "api.example.com /v1/pets"));
    let (ok, out) = run(vec![
        "invoke",
        "multi",
        "/pets",
        "--base",
        "{tenant}.example.com/v2",
    ])
    .await
    .unwrap();
    assert_eq!((ok, out.as_str()), (true, "tenant.example.com /v2/pets"));
    let (ok, out) = run(vec!["invoke", "multi", "--base", "*/nope"])
        .await
        .unwrap();
    assert!(
        !ok && out.contains("unknown_base") && out.contains("*/rel"),
        "{out}"
    );
}

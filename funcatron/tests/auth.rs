//! Security schemes of a Func's document, enforced end to end: an HTTP
//! client through the embedded ingress, a Tron and a Runner that reads the
//! credentials the Func was enabled with from its secrets directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_control::state::{FuncSettings, SchemeCredentials};
use funcatron_ingress::IngressOptions;
use funcatron_runner::RunnerOptions;
use serde_json::{json, Value};

const DOC: &str = r#"openapi: 3.0.3
info: {title: t, version: '1'}
servers: [{url: /SEC}]
x-funcatron: {name: NAME, runtime: lua}
security: [{token: []}]
components:
  securitySchemes:
    key: {type: apiKey, in: header, name: X-API-Key}
    token: {type: http, scheme: bearer, bearerFormat: JWT}
paths:
  /open: {get: {operationId: open, security: [], responses: {'200': {description: ok}}}}
  /key: {get: {operationId: key, security: [{key: []}], responses: {'200': {description: ok}}}}
  /jwt: {get: {operationId: jwt, responses: {'200': {description: ok}}}}
"#;

/// `jwt` answers who the Runner says the caller is; `open` shows what a
/// client claiming to be someone gets through (nothing).
const LUA: &str = "return { open = function(r) return r.headers['x-funcatron-auth'] or 'open' end, key = function() return 'key' end, jwt = function(r) return r.headers['x-funcatron-auth'] end }";
const HS: &str = "end-to-end-hs256-key";

fn bundle(root: &std::path::Path, name: &str) -> Bundle {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let doc = DOC.replace("SEC", name).replace("NAME", name);
    std::fs::write(dir.join("openapi.yaml"), doc).unwrap();
    std::fs::write(dir.join("main.lua"), LUA).unwrap();
    Bundle::load(&dir).unwrap()
}

fn token(exp: u64) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(HS.as_bytes()).unwrap();
    let claims = json!({"sub": "u-1", "exp": exp});
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

async fn get(url: &str, header: Option<(&str, &str)>) -> (u16, Option<String>, String) {
    let mut rb = reqwest::Client::new().get(url);
    if let Some((k, v)) = header {
        rb = rb.header(k, v);
    }
    let r = rb.send().await.unwrap();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status().as_u16(), challenge, r.text().await.unwrap())
}

fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (
        v["error"].as_str().unwrap_or_default().to_owned(),
        v["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_operations_need_the_credentials_the_func_was_enabled_with() {
    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("API_KEYS"), "k-1\nk-2\n").unwrap();
    std::fs::write(secrets.join("JWT_KEY"), format!("{HS}\n")).unwrap();
    let configured = bundle(root.path(), "guarded").with_settings(&FuncSettings {
        auth: BTreeMap::from([
            (
                "key".to_owned(),
                SchemeCredentials {
                    secret: Some("API_KEYS".into()),
                    ..Default::default()
                },
            ),
            (
                "token".to_owned(),
                SchemeCredentials {
                    secret: Some("JWT_KEY".into()),
                    ..Default::default()
                },
            ),
        ]),
        ..FuncSettings::default()
    });
    // Uploaded but never given credentials: fail closed.
    let bare = bundle(root.path(), "bare");
    let ropts = RunnerOptions {
        workers: 2,
        secrets_dir: Some(secrets.clone()),
        ..RunnerOptions::default()
    };
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let c = spawn_cluster(
        broker,
        vec![configured, bare],
        IngressOptions::default(),
        Some(ropts),
    )
    .await;
    wait_ready(&format!("{}/guarded/open", c.base)).await;

    let base = &c.base;
    assert_eq!(get(&format!("{base}/guarded/open"), None).await.0, 200);

    let (s, challenge, body) = get(&format!("{base}/guarded/key"), None).await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(error_of(&body).0, "unauthorized", "{body}");
    assert!(challenge.unwrap().contains("name=\"x-api-key\""));
    let (s, _, body) = get(&format!("{base}/guarded/key"), Some(("x-api-key", "k-3"))).await;
    assert_eq!(s, 401, "{body}");
    let (s, _, body) = get(&format!("{base}/guarded/key"), Some(("x-api-key", "k-2"))).await;
    assert_eq!((s, body.as_str()), (200, "key"));

    let now = jsonwebtoken::get_current_timestamp();
    let good = format!("Bearer {}", token(now + 600));
    let expired = format!("Bearer {}", token(now - 3600));
    let (s, challenge, _) = get(&format!("{base}/guarded/jwt"), None).await;
    assert_eq!(
        (s, challenge.as_deref()),
        (401, Some("Bearer realm=\"funcatron\""))
    );
    let (s, _, body) = get(
        &format!("{base}/guarded/jwt"),
        Some(("authorization", &expired)),
    )
    .await;
    assert_eq!(s, 401, "{body}");
    let (s, _, body) = get(
        &format!("{base}/guarded/jwt"),
        Some(("authorization", &good)),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let who: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(who["scheme"], "token", "{who}");
    assert_eq!(who["subject"], "u-1", "{who}");
    assert_eq!(
        who["claims"]["sub"], "u-1",
        "the verified claims reach the Func: {who}"
    );
    // A client cannot pose as an authenticated caller.
    let forged = r#"{"scheme":"token","subject":"admin"}"#;
    let (s, _, body) = get(
        &format!("{base}/guarded/open"),
        Some(("x-funcatron-auth", forged)),
    )
    .await;
    assert_eq!(
        (s, body.as_str()),
        (200, "open"),
        "the forged header was removed"
    );

    // The Func without credentials serves its open operation only.
    assert_eq!(get(&format!("{base}/bare/open"), None).await.0, 200);
    let (s, _, body) = get(&format!("{base}/bare/jwt"), Some(("authorization", &good))).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        error_of(&body).1.contains("no credentials are configured"),
        "{body}"
    );
}

/// The operator's usual order: enable the version, then enable it again
/// with `--auth`. The serving version is prepared again with the new
/// credentials: closed before, open to the right key after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_given_to_a_serving_version_apply_without_a_restart() {
    use funcatron_runner::follow::Desired;
    use tokio_util::sync::CancellationToken;

    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("API_KEYS"), "k-1\n").unwrap();
    let b = bundle(root.path(), "later");
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(
        funcatron_tron::TronNode::new(broker.clone())
            .bundles(vec![b.clone()])
            .run(shutdown.clone()),
    );
    let (tx, rx) = tokio::sync::watch::channel(Desired::from(vec![b.clone()]));
    let ropts = RunnerOptions {
        workers: 2,
        secrets_dir: Some(secrets),
        ..RunnerOptions::default()
    };
    tokio::spawn(
        funcatron_runner::RunnerNode::new(broker.clone())
            .options(ropts)
            .desired(rx)
            .run(shutdown.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(funcatron_ingress::run(
        listener,
        broker,
        IngressOptions::default(),
        shutdown.clone(),
    ));
    wait_ready(&format!("{base}/later/open")).await;
    let url = format!("{base}/later/key");
    let (s, _, body) = get(&url, Some(("x-api-key", "k-1"))).await;
    assert_eq!(s, 401, "no credentials yet: {body}");

    tx.send_replace(Desired::from(vec![b.with_settings(&FuncSettings {
        auth: BTreeMap::from([(
            "key".to_owned(),
            SchemeCredentials {
                secret: Some("API_KEYS".into()),
                ..Default::default()
            },
        )]),
        ..FuncSettings::default()
    })]));
    eventually("the new credentials apply", || async {
        get(&url, Some(("x-api-key", "k-1"))).await.0 == 200
    })
    .await;
    assert_eq!(get(&url, Some(("x-api-key", "k-9"))).await.0, 401);
}

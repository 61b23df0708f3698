//! CORS end to end: a browser's preflight and calls through the embedded
//! ingress, a Tron that sends an `OPTIONS` without an `options` operation
//! to the Func as a preflight, and a Runner that answers it from the
//! Func's `cors` setting and its document.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_control::state::{CorsSettings, FuncSettings, SchemeCredentials};
use funcatron_ingress::IngressOptions;
use funcatron_runner::RunnerOptions;
use reqwest::header::HeaderMap;
use serde_json::Value;

const DOC: &str = r#"openapi: 3.0.3
info: {title: t, version: '1'}
servers: [{url: /NAME}]
x-funcatron: {name: NAME, runtime: lua}
components:
  securitySchemes:
    key: {type: apiKey, in: header, name: X-API-Key}
paths:
  /pets:
    get:
      operationId: list
      parameters: [{name: X-Trace, in: header, schema: {type: string}}]
      responses: {'200': {description: ok}}
    post:
      operationId: add
      security: [{key: []}]
      responses: {'200': {description: ok}}
  /own:
    options: {operationId: own, responses: {'200': {description: ok}}}
"#;

/// `list` sets its own (too wide) CORS header, which the policy replaces.
const LUA: &str = "return { list = function() return {status = 200, headers = {['access-control-allow-origin'] = '*', ['x-count'] = '2'}, body = 'pets'} end, add = function() return 'added' end, own = function() return 'own options' end }";

fn bundle(root: &std::path::Path, name: &str) -> Bundle {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("openapi.yaml"), DOC.replace("NAME", name)).unwrap();
    std::fs::write(dir.join("main.lua"), LUA).unwrap();
    Bundle::load(&dir).unwrap()
}

async fn send(method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
    let mut rb = reqwest::Client::new().request(method.parse().unwrap(), url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let (s, h) = (r.status().as_u16(), r.headers().clone());
    (s, h, r.text().await.unwrap())
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    (
        v["error"].as_str().unwrap_or_default().to_owned(),
        v["message"].as_str().unwrap_or_default().to_owned(),
    )
}

const APP: &str = "https://app.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_what_the_funcs_cors_setting_and_document_allow() {
    let root = tempfile::tempdir().unwrap();
    let secrets = root.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("KEYS"), "k-1\n").unwrap();
    let open = bundle(root.path(), "open").with_settings(&FuncSettings {
        cors: Some(CorsSettings {
            origins: vec![APP.into(), "https://*.example.org".into()],
            expose: vec!["X-Count".into()],
            max_age_s: Some(600),
            ..CorsSettings::default()
        }),
        auth: BTreeMap::from([(
            "key".to_owned(),
            SchemeCredentials {
                secret: Some("KEYS".into()),
                ..Default::default()
            },
        )]),
        ..FuncSettings::default()
    });
    let closed = bundle(root.path(), "closed");
    let ropts = RunnerOptions {
        workers: 2,
        secrets_dir: Some(secrets),
        ..RunnerOptions::default()
    };
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let c = spawn_cluster(
        broker,
        vec![open, closed],
        IngressOptions::default(),
        Some(ropts),
    )
    .await;
    let pets = format!("{}/open/pets", c.base);
    wait_ready(&pets).await;

    // A preflight for the secured POST with the header its scheme reads:
    // answered without credentials, the Func not run.
    let (s, h, body) = send(
        "OPTIONS",
        &pets,
        &[
            ("origin", APP),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type, x-api-key"),
        ],
    )
    .await;
    assert_eq!(s, 204, "{body}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP));
    assert_eq!(
        header(&h, "access-control-allow-methods"),
        Some("GET, POST")
    );
    assert_eq!(
        header(&h, "access-control-allow-headers"),
        Some("content-type, x-api-key")
    );
    assert_eq!(header(&h, "access-control-max-age"), Some("600"));
    assert!(header(&h, "vary").unwrap().contains("Origin"));

    // What the document does not declare for that operation is refused:
    // X-Trace belongs to GET, not POST.
    let (s, _, body) = send(
        "OPTIONS",
        &pets,
        &[
            ("origin", APP),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-trace"),
        ],
    )
    .await;
    assert_eq!(s, 403, "{body}");
    let (code, msg) = error_of(&body);
    assert_eq!(code, "cors_refused", "{body}");
    assert!(msg.contains("x-trace"), "{body}");
    let (s, _, _) = send(
        "OPTIONS",
        &pets,
        &[
            ("origin", "https://a.example.org"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "X-Trace"),
        ],
    )
    .await;
    assert_eq!(s, 204, "a subdomain origin, GET's declared header");
    for (origin, method) in [("https://evil.test", "GET"), (APP, "DELETE")] {
        let (s, _, body) = send(
            "OPTIONS",
            &pets,
            &[
                ("origin", origin),
                ("access-control-request-method", method),
            ],
        )
        .await;
        assert_eq!(
            (s, error_of(&body).0.as_str()),
            (403, "cors_refused"),
            "{origin} {method}: {body}"
        );
    }

    // The call itself: the policy's headers replace the Func's own.
    let (s, h, body) = send("GET", &pets, &[("origin", APP)]).await;
    assert_eq!((s, body.as_str()), (200, "pets"));
    let acao: Vec<_> = h.get_all("access-control-allow-origin").iter().collect();
    assert_eq!(acao, vec![APP], "the Func's `*` was replaced");
    assert_eq!(header(&h, "access-control-expose-headers"), Some("x-count"));
    let (_, h, _) = send("GET", &pets, &[("origin", "https://evil.test")]).await;
    assert_eq!(header(&h, "access-control-allow-origin"), None);
    assert_eq!(header(&h, "vary"), Some("Origin"));
    // An error answer is readable by the page too.
    let (s, h, _) = send("POST", &pets, &[("origin", APP)]).await;
    assert_eq!(s, 401);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(APP));

    // A declared `options` operation is the Func's.
    let (s, _, body) = send("OPTIONS", &format!("{}/open/own", c.base), &[]).await;
    assert_eq!((s, body.as_str()), (200, "own options"));
    // An OPTIONS that is no preflight: 405 with the path's methods.
    let (s, h, body) = send("OPTIONS", &pets, &[]).await;
    assert_eq!((s, header(&h, "allow")), (405, Some("GET, POST")), "{body}");

    // A Func without a `cors` setting: preflights get 405, calls no CORS
    // headers of the platform's.
    let closed = format!("{}/closed/pets", c.base);
    let (s, h, body) = send(
        "OPTIONS",
        &closed,
        &[("origin", APP), ("access-control-request-method", "GET")],
    )
    .await;
    assert_eq!(s, 405, "{body}");
    assert_eq!(error_of(&body).0, "method_not_allowed");
    assert_eq!(header(&h, "access-control-allow-origin"), None);
}

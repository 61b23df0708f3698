//! Who may read what on the management API, and what reads show.
//!
//! Only the health check (and the document) is open: every other read
//! answers 401 with a JSON reason without a token; the read token reads
//! (and downloads archives) but every change answers it 403; the admin
//! token does both. A secret's value never appears in an answer. A
//! captured pair is stored with the operator's query parameters and JSON
//! body fields redacted, besides the headers.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use funcatron_broker::Message;
use funcatron_control::headers;
use funcatron_tron::mgmt::{self, api};
use funcatron_tron::registry::Registry;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token";
const READ: &str = "read-token";

struct Api {
    base: String,
    http: reqwest::Client,
    registry: Arc<Registry>,
    store: tempfile::TempDir,
}

async fn start() -> Api {
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let app = mgmt::router(
        Arc::clone(&registry),
        mgmt::MgmtOptions {
            tokens: mgmt::Tokens {
                admin: ADMIN.into(),
                read: Some(READ.into()),
            },
            redact_query: vec!["token".into(), "api_key".into()],
            redact_json_fields: vec!["password".into()],
            ..mgmt::MgmtOptions::new(ADMIN)
        },
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Api {
        base,
        http: reqwest::Client::new(),
        registry,
        store,
    }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, String) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn reason(status: u16, text: &str) -> String {
    let e: api::ApiError = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{status}: not a JSON reason ({e}): {text}"));
    e.error
}

#[tokio::test]
async fn reads_need_a_token_and_the_read_token_cannot_write() {
    let a = start().await;
    let (s, text) = a
        .call(
            "POST",
            "/v1/bundles?name=s",
            Some(ADMIN),
            Some(common::lua_archive("")),
        )
        .await;
    assert_eq!(s, 201, "{text}");
    let sha = serde_json::from_str::<Value>(&text).unwrap()["sha"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::create_dir_all(a.store.path().join("captures")).unwrap();
    std::fs::write(a.store.path().join("captures/s.jsonl"), "{}\n").unwrap();

    let (s, _) = a.call("GET", "/v1/health", None, None).await;
    assert_eq!(s, 200, "the health check stays open");

    let reads = [
        "/v1/state".to_owned(),
        "/v1/status".to_owned(),
        "/v1/funcs".to_owned(),
        "/v1/funcs/s".to_owned(),
        "/v1/funcs/s/history".to_owned(),
        "/v1/funcs/s/logs".to_owned(),
        "/v1/captures/s".to_owned(),
        format!("/v1/bundles/{sha}"),
    ];
    for path in &reads {
        for token in [None, Some("wrong")] {
            let (s, text) = a.call("GET", path, token, None).await;
            assert_eq!(s, 401, "GET {path} with {token:?}: {text}");
            assert_eq!(reason(s, &text), "unauthorized", "GET {path}");
        }
        for token in [READ, ADMIN] {
            let (s, text) = a.call("GET", path, Some(token), None).await;
            assert_eq!(s, 200, "GET {path} with {token}: {text}");
        }
    }

    let writes = [
        ("/v1/bundles?name=s", Some(common::lua_archive(""))),
        ("/v1/funcs/s/enable", None),
        ("/v1/funcs/s/capture", None),
        ("/v1/funcs/s/capture/stop", None),
        ("/v1/funcs/s/disable", None),
    ];
    for (path, body) in writes {
        let (s, text) = a.call("POST", path, None, body.clone()).await;
        assert_eq!(s, 401, "POST {path} without a token: {text}");
        let (s, text) = a.call("POST", path, Some(READ), body.clone()).await;
        assert_eq!(s, 403, "POST {path} with the read token: {text}");
        assert_eq!(reason(s, &text), "forbidden");
        let (s, text) = a.call("POST", path, Some(ADMIN), body).await;
        assert!(
            (200..300).contains(&s),
            "POST {path} with the admin token: {s} {text}"
        );
    }
}

#[tokio::test]
async fn settings_never_show_a_secret_value() {
    let a = start().await;
    // The bundle declares DB_PASSWORD a secret; the settings API_KEY.
    let archive = common::lua_archive(", secrets: [DB_PASSWORD]");
    let (s, text) = a
        .call("POST", "/v1/bundles?name=s", Some(ADMIN), Some(archive))
        .await;
    assert_eq!(s, 201, "{text}");
    let settings = json!({"settings": {
        "env": {"API_KEY": "hunter2", "DB_PASSWORD": "swordfish", "MODE": "fast"},
        "secrets": ["API_KEY"],
    }});
    let (s, text) = a
        .call(
            "POST",
            "/v1/funcs/s/enable",
            Some(ADMIN),
            Some(serde_json::to_vec(&settings).unwrap()),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    for path in ["/v1/funcs/s", "/v1/state"] {
        let (s, text) = a.call("GET", path, Some(READ), None).await;
        assert_eq!(s, 200, "{text}");
        for secret in ["hunter2", "swordfish"] {
            assert!(!text.contains(secret), "GET {path} shows {secret}: {text}");
        }
        assert!(
            text.contains("API_KEY") && text.contains("DB_PASSWORD"),
            "{text}"
        );
        assert!(text.contains("\"fast\""), "other env values show: {text}");
    }
    let show: api::FuncDetail =
        serde_json::from_str(&a.call("GET", "/v1/funcs/s", Some(READ), None).await.1).unwrap();
    assert_eq!(show.settings.env["API_KEY"], mgmt::SECRET_VALUE);
    assert_eq!(show.settings.env["DB_PASSWORD"], mgmt::SECRET_VALUE);
}

#[tokio::test]
async fn a_captured_pair_is_stored_with_query_and_json_fields_redacted() {
    let a = start().await;
    let (s, text) = a
        .call(
            "POST",
            "/v1/bundles?name=s",
            Some(ADMIN),
            Some(common::lua_archive("")),
        )
        .await;
    assert_eq!(s, 201, "{text}");
    let (s, text) = a
        .call("POST", "/v1/funcs/s/capture", Some(ADMIN), None)
        .await;
    assert_eq!(s, 200, "{text}");
    let state = a.registry.state().await;
    let capture = state.captures["s"].clone();

    // What a Runner that redacts only headers would broadcast.
    let record = json!({
        "schema": funcatron_control::state::CAPTURE_SCHEMA,
        "capture": capture.id, "func": "s", "version": "v",
        "request": {"method": "POST", "path": "/s", "query": "token=abc&page=2",
            "headers": [["authorization", "Bearer abc"], ["content-type", "application/json"]],
            "body": "{\"user\":\"u\",\"password\":\"x\"}"},
        "response": {"status": 200, "headers": [["set-cookie", "sid=abc"]],
            "body": "{\"ok\":true,\"password\":\"x\"}"},
    });
    let mut msg = Message::new(serde_json::to_vec(&record).unwrap());
    msg.headers = vec![
        (headers::FUNC.into(), "s".into()),
        (headers::CAPTURE.into(), capture.id.clone()),
    ];
    let telemetry = funcatron_tron::telemetry::Telemetry::new(a.store.path());
    telemetry.know(&state.captures);
    telemetry.write_capture(&msg);

    let (s, text) = a.call("GET", "/v1/captures/s", Some(READ), None).await;
    assert_eq!(s, 200, "{text}");
    let stored: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let req = &stored["request"];
    assert_eq!(req["query"], "token=[redacted]&page=2");
    let body: Value = serde_json::from_str(req["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"user": "u", "password": "[redacted]"}));
    assert_eq!(req["headers"][0], json!(["authorization", "[redacted]"]));
    let resp = &stored["response"];
    assert_eq!(resp["headers"][0], json!(["set-cookie", "[redacted]"]));
    let body: Value = serde_json::from_str(resp["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["password"], "[redacted]");
    assert!(!text.contains("abc") && !text.contains("\"x\""), "{text}");
}

//! The management API's OpenAPI document matches the API: the document
//! served at `/v1/openapi.yaml` (and `.json`) is the generated one; every
//! path and method it lists is served (and no other method on those paths),
//! the operations it marks with the `token` scheme, and only those, answer
//! 401 without the token (every read but the health check and the
//! document), those it marks `admin` answer 403 to the read token and those
//! marked `read` serve it; and real answers validate against its schemas,
//! made strict (no properties besides the documented ones), and read back
//! into the shared types unchanged.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use funcatron_tron::mgmt::{self, api};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

const TOKEN: &str = "test-token";
const READ_TOKEN: &str = "read-token";

struct Mgmt {
    base: String,
    http: reqwest::Client,
    doc: Value,
    _store: tempfile::TempDir,
}

async fn start() -> Mgmt {
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let app = mgmt::router(
        Arc::clone(&registry),
        mgmt::MgmtOptions {
            tokens: mgmt::Tokens {
                admin: TOKEN.into(),
                read: Some(READ_TOKEN.into()),
            },
            max_upload: 1 << 20,
            ..mgmt::MgmtOptions::new(TOKEN)
        },
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Mgmt {
        base,
        http: reqwest::Client::new(),
        doc: serde_json::to_value(mgmt::openapi()).unwrap(),
        _store: store,
    }
}

impl Mgmt {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: bool,
        body: Option<Value>,
    ) -> (u16, String) {
        let method: reqwest::Method = method.to_ascii_uppercase().parse().unwrap();
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if token {
            rb = rb.bearer_auth(TOKEN);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Call with the read token.
    async fn read(&self, method: &str, path: &str) -> (u16, String) {
        let method: reqwest::Method = method.to_ascii_uppercase().parse().unwrap();
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Call, check the status, validate the JSON answer against the
    /// document's schema for (`template`, `method`, status), read it into
    /// `T` and check that `T` writes it back unchanged.
    async fn checked<T: DeserializeOwned + Serialize>(
        &self,
        method: &str,
        template: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
    ) -> T {
        let (s, text) = self.call(method, path, true, body).await;
        assert_eq!(s, status, "{method} {path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        self.validate(method, template, s, &v);
        let typed: T = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {v}"));
        assert_eq!(serde_json::to_value(&typed).unwrap(), v, "{method} {path}");
        typed
    }

    fn validate(&self, method: &str, template: &str, status: u16, v: &Value) {
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        let schema = &op["responses"][status.to_string()]["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {template}: no JSON schema for {status} in the document"
        );
        let mut root = schema.clone();
        let mut components = self.doc["components"].clone();
        strict(&mut components);
        root["components"] = components;
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(v)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: {v}\n  does not match the document: {errors:#?}"
        );
    }
}

/// No properties besides the documented ones, anywhere.
fn strict(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                m.insert("additionalProperties".into(), Value::Bool(false));
            }
            m.values_mut().for_each(strict);
        }
        Value::Array(a) => a.iter_mut().for_each(strict),
        _ => {}
    }
}

/// A concrete path for a template.
fn concrete(template: &str) -> String {
    template
        .replace("{sha}", &"0".repeat(64))
        .replace("{name}", "nope")
}

#[tokio::test]
async fn served_document_is_the_generated_one_and_lists_every_route() {
    let m = start().await;
    let (s, yaml) = m.call("GET", "/v1/openapi.yaml", false, None).await;
    assert_eq!(s, 200);
    let served: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(served, m.doc, "the YAML document is not the generated one");
    let (s, text) = m.call("GET", "/v1/openapi.json", false, None).await;
    assert_eq!(s, 200);
    let served: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(served, m.doc, "the JSON document is not the generated one");
    assert_eq!(
        m.doc["components"]["securitySchemes"]["token"]["scheme"],
        "bearer"
    );

    let methods = ["get", "post", "put", "delete", "patch"];
    let paths = m.doc["paths"].as_object().unwrap();
    let mut ids = Vec::new();
    for (template, item) in paths {
        let path = concrete(template);
        for method in methods {
            let (s, text) = m.call(method, &path, false, None).await;
            let Some(op) = item.get(method) else {
                assert_eq!(
                    s, 405,
                    "{method} {template} is served but not documented: {text}"
                );
                continue;
            };
            ids.push(op["operationId"].as_str().unwrap().to_owned());
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("token").is_some()));
            if secured {
                assert_eq!(s, 401, "{method} {template} without the token: {text}");
                let e: api::ApiError = serde_json::from_str(&text).unwrap();
                assert_eq!(e.error, "unauthorized");
                let (s, text) = m.call(method, &path, true, None).await;
                assert!(
                    s != 401 && s != 403 && s != 405,
                    "{method} {template} with the token: {s} {text}"
                );
                // The requirement names the role: the read token reads,
                // and answers 403 where the admin token is needed.
                let admin = op["security"][0]["token"] == json!(["admin"]);
                let read = op["security"][0]["token"] == json!(["read"]);
                assert!(admin || read, "{method} {template}: {}", op["security"]);
                let (s, text) = m.read(method, &path).await;
                if admin {
                    assert_eq!(s, 403, "{method} {template} with the read token: {text}");
                    assert_eq!(
                        serde_json::from_str::<api::ApiError>(&text).unwrap().error,
                        "forbidden"
                    );
                } else {
                    assert!(
                        s != 401 && s != 403,
                        "{method} {template} with the read token: {s} {text}"
                    );
                }
            } else {
                assert!(
                    s != 401 && s != 405,
                    "{method} {template} is open: {s} {text}"
                );
            }
            // Not the fallback: the route exists.
            let fallback =
                serde_json::from_str::<api::ApiError>(&text).is_ok_and(|e| e.error == "not_found");
            assert!(
                !fallback,
                "{method} {template} is documented but not served"
            );
        }
    }
    for id in [
        "openapi",
        "health",
        "uploadBundle",
        "downloadBundle",
        "state",
        "status",
        "listFuncs",
        "showFunc",
        "funcHistory",
        "enableFunc",
        "disableFunc",
        "rollbackFunc",
        "invokeFunc",
        "captureStart",
        "captureStop",
        "captureExport",
        "setLogLevel",
        "funcLogs",
    ] {
        assert!(ids.iter().any(|i| i == id), "{id} is not in the document");
    }
    // Paths the document does not list answer the JSON 404.
    let (s, text) = m.call("GET", "/v1/nothing", false, None).await;
    assert_eq!(s, 404);
    let e: api::ApiError = serde_json::from_str(&text).unwrap();
    assert_eq!(e.error, "not_found");
}

fn hello_archive(root: &Path) -> Vec<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../func-bundles/hello");
    let dir = root.join("hello");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["swagger.yaml", "main.lua"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    funcatron_bundle::archive::build(&dir).unwrap().1
}

#[tokio::test]
async fn real_answers_match_the_documented_schemas() {
    let m = start().await;
    let h: api::Health = m
        .checked("GET", "/v1/health", "/v1/health", None, 200)
        .await;
    assert!(h.ok);
    let st: api::Status = m
        .checked("GET", "/v1/status", "/v1/status", None, 200)
        .await;
    assert!(st.funcs.is_empty() && st.autoscaler.is_none());

    // Errors: no token, a malformed body, no such Func, no ingress.
    let (s, text) = m.call("POST", "/v1/funcs/hello/disable", false, None).await;
    assert_eq!(s, 401);
    m.validate(
        "POST",
        "/v1/funcs/{name}/disable",
        s,
        &serde_json::from_str(&text).unwrap(),
    );
    let _: api::ApiError = m
        .checked("GET", "/v1/funcs/{name}", "/v1/funcs/nope", None, 404)
        .await;
    let _: api::ApiError = m
        .checked(
            "POST",
            "/v1/funcs/{name}/enable",
            "/v1/funcs/hello/enable",
            Some(json!({"bogus": 1})),
            400,
        )
        .await;
    let _: api::ApiError = m
        .checked(
            "POST",
            "/v1/funcs/{name}/invoke",
            "/v1/funcs/hello/invoke",
            None,
            503,
        )
        .await;

    // Upload, then enable with settings.
    let root = tempfile::tempdir().unwrap();
    let r = m
        .http
        .post(format!("{}/v1/bundles?name=hello", m.base))
        .bearer_auth(TOKEN)
        .body(hello_archive(root.path()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    m.validate("POST", "/v1/bundles", 201, &v);
    let up: api::Uploaded = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(serde_json::to_value(&up).unwrap(), v);
    assert_eq!((up.name.as_str(), up.enabled), ("hello", false));

    let list: api::FuncList = m.checked("GET", "/v1/funcs", "/v1/funcs", None, 200).await;
    assert!(list.funcs[0].routes.is_none());
    let en: api::Enabled = m
        .checked(
            "POST",
            "/v1/funcs/{name}/enable",
            "/v1/funcs/hello/enable",
            Some(json!({"sha": up.sha, "settings": {"env": {"A": "b"}, "concurrency": 2, "target_concurrency": 1.5}})),
            200,
        )
        .await;
    assert_eq!(en.enabled.as_deref(), Some(up.sha.as_str()));
    let list: api::FuncList = m.checked("GET", "/v1/funcs", "/v1/funcs", None, 200).await;
    assert!(
        matches!(&list.funcs[0].routes, Some(api::Routes::Effective(r)) if r.base_path == "/hello")
    );
    let show: api::FuncDetail = m
        .checked("GET", "/v1/funcs/{name}", "/v1/funcs/hello", None, 200)
        .await;
    assert_eq!(show.settings.concurrency, Some(2));
    let _: api::FuncHistory = m
        .checked(
            "GET",
            "/v1/funcs/{name}/history",
            "/v1/funcs/hello/history",
            None,
            200,
        )
        .await;
    let st: api::Status = m
        .checked("GET", "/v1/status", "/v1/status", None, 200)
        .await;
    assert!(st.funcs.contains_key("hello"), "{st:?}");

    // Capture and log level, and the state that holds them.
    let cap: api::CaptureStarted = m
        .checked(
            "POST",
            "/v1/funcs/{name}/capture",
            "/v1/funcs/hello/capture",
            Some(json!({"sample": 0.5, "max": 3, "for_ms": 60000, "redact": ["X-Secret"]})),
            200,
        )
        .await;
    assert!(cap.capture.unwrap().redact.contains(&"x-secret".to_owned()));
    let _: api::LogLevelSet = m
        .checked(
            "POST",
            "/v1/funcs/{name}/log-level",
            "/v1/funcs/hello/log-level",
            Some(json!({"level": "debug", "for_ms": 60000})),
            200,
        )
        .await;
    let state: api::State = m.checked("GET", "/v1/state", "/v1/state", None, 200).await;
    assert!(state.captures.contains_key("hello") && state.log_levels.contains_key("hello"));
    let _: api::CaptureStopped = m
        .checked(
            "POST",
            "/v1/funcs/{name}/capture/stop",
            "/v1/funcs/hello/capture/stop",
            None,
            200,
        )
        .await;
    let lvl: api::LogLevelSet = m
        .checked(
            "POST",
            "/v1/funcs/{name}/log-level",
            "/v1/funcs/hello/log-level",
            Some(json!({"level": "default"})),
            200,
        )
        .await;
    assert!(lvl.log_level.is_none());

    // Disable, roll back.
    let dis: api::Enabled = m
        .checked(
            "POST",
            "/v1/funcs/{name}/disable",
            "/v1/funcs/hello/disable",
            None,
            200,
        )
        .await;
    assert!(dis.enabled.is_none());
    let back: api::Enabled = m
        .checked(
            "POST",
            "/v1/funcs/{name}/rollback",
            "/v1/funcs/hello/rollback",
            None,
            200,
        )
        .await;
    assert_eq!(back.enabled.as_deref(), Some(up.sha.as_str()));
    let _: api::State = m.checked("GET", "/v1/state", "/v1/state", None, 200).await;
}

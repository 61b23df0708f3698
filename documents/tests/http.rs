//! `/_funcatron/store/...` through its router (the one the embedded
//! ingress and every Tron serve), on the embedded store in a file: access
//! rules and tokens, status codes, ETags and preconditions, schema
//! refusals with their problems, merge patch, listing, bad bodies.

use std::sync::Arc;

use anyhow::{ensure, Result};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use funcatron_documents::http::{router, OperatorRole, Operators};
use funcatron_documents::Documents;
use funcatron_store::AnyStore;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The operator tokens a Tron would recognise.
struct Tokens;

impl Operators for Tokens {
    fn role(&self, token: &str) -> OperatorRole {
        match token {
            "admin-secret" => OperatorRole::Admin,
            "read-secret" => OperatorRole::Read,
            _ => OperatorRole::None,
        }
    }
}

struct Client {
    app: axum::Router,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Client {
    async fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = AnyStore::open_embedded(dir.path().join("store.redb")).await?;
        let app = router(Documents::new(store), Some(Arc::new(Tokens)));
        Ok(Client { app, _dir: dir })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<Answer> {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(body.map_or_else(Body::empty, Body::from))?;
        let resp = self.app.clone().oneshot(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
            })?
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

fn etag(a: &Answer) -> &str {
    a.headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_define_and_rules_open_collections() -> Result<()> {
    let c = Client::new().await?;
    let define = json!({"read": "public", "write": "token"}).to_string();
    let a = c
        .call(
            Method::PUT,
            "/_funcatron/store/notes/_collection",
            None,
            &[],
            Some(define.clone()),
        )
        .await?;
    ensure!(
        a.status == 401 && a.body["error"] == "unauthorized",
        "no token: {}",
        a.body
    );
    let a = c
        .call(
            Method::PUT,
            "/_funcatron/store/notes/_collection",
            Some("read-secret"),
            &[],
            Some(define.clone()),
        )
        .await?;
    ensure!(
        a.status == 403,
        "the read token cannot define: {}",
        a.status
    );
    let a = c
        .call(
            Method::PUT,
            "/_funcatron/store/notes/_collection",
            Some("admin-secret"),
            &[],
            Some(define),
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["read"] == "public",
        "defined: {}",
        a.body
    );
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/notes",
            None,
            &[],
            Some(json!({"t": "hi"}).to_string()),
        )
        .await?;
    ensure!(a.status == 401, "writing needs a token: {}", a.status);
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/notes/_tokens",
            Some("admin-secret"),
            &[],
            Some(json!({"write": true}).to_string()),
        )
        .await?;
    ensure!(a.status == 201, "token made: {}", a.body);
    let token = a.body["token"].as_str().unwrap_or_default().to_owned();
    let token_id = a.body["id"].as_str().unwrap_or_default().to_owned();
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/notes",
            Some("fst_wrong"),
            &[],
            Some(json!({"t": "hi"}).to_string()),
        )
        .await?;
    ensure!(a.status == 403, "a wrong token: {}", a.status);
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/notes",
            Some(&token),
            &[],
            Some(json!({"t": "hi"}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 201 && a.body["version"] == 1,
        "created with the token: {}",
        a.body
    );
    let id = a.body["id"].as_str().unwrap_or_default().to_owned();
    let location = a
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ensure!(
        location == format!("/_funcatron/store/notes/{id}"),
        "Location: {location}"
    );
    let a = c.call(Method::GET, location, None, &[], None).await?;
    ensure!(
        a.status == 200 && a.body["doc"]["t"] == "hi",
        "public read: {}",
        a.body
    );
    ensure!(etag(&a) == "\"1\"", "ETag: {}", etag(&a));
    let a = c
        .call(
            Method::DELETE,
            &format!("/_funcatron/store/notes/_tokens/{token_id}"),
            Some("admin-secret"),
            &[],
            None,
        )
        .await?;
    ensure!(a.status == 200, "revoked");
    let a = c
        .call(Method::DELETE, location, Some(&token), &[], None)
        .await?;
    ensure!(
        a.status == 403,
        "a revoked token writes nothing: {}",
        a.status
    );
    // A token made without a body reads only; `write` must be a boolean.
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/notes/_tokens",
            Some("admin-secret"),
            &[],
            None,
        )
        .await?;
    ensure!(
        a.status == 201 && a.body["write"] == false,
        "a read token: {}",
        a.body
    );
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/notes/_tokens",
            Some("admin-secret"),
            &[],
            Some(json!({"write": "yes"}).to_string()),
        )
        .await?;
    ensure!(a.status == 400, "write is a boolean: {}", a.body);
    // A token that writes a collection it may not read gets no document back.
    let a = c
        .call(
            Method::PUT,
            "/_funcatron/store/drop-box/_collection",
            Some("admin-secret"),
            &[],
            Some(json!({"write": "token"}).to_string()),
        )
        .await?;
    ensure!(a.status == 200, "defined");
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/drop-box/_tokens",
            Some("admin-secret"),
            &[],
            Some(json!({"write": true}).to_string()),
        )
        .await?;
    let writer = a.body["token"].as_str().unwrap_or_default().to_owned();
    let a = c
        .call(
            Method::PUT,
            "/_funcatron/store/drop-box/x",
            Some(&writer),
            &[],
            Some(json!({"secret": 1}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["version"] == 1 && a.body.get("doc").is_none(),
        "no document back: {}",
        a.body
    );
    let a = c
        .call(
            Method::GET,
            "/_funcatron/store/drop-box/x",
            Some(&writer),
            &[],
            None,
        )
        .await?;
    ensure!(a.status == 403, "nor by reading: {}", a.status);
    let a = c
        .call(
            Method::GET,
            "/_funcatron/store",
            Some("read-secret"),
            &[],
            None,
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["collections"][1]["name"] == "notes",
        "listed: {}",
        a.body
    );
    let a = c
        .call(
            Method::GET,
            "/_funcatron/store/nope/x",
            Some("admin-secret"),
            &[],
            None,
        )
        .await?;
    ensure!(
        a.status == 404 && a.body["error"] == "unknown_collection",
        "{}",
        a.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_preconditions_patches_and_refusals() -> Result<()> {
    let c = Client::new().await?;
    let admin = Some("admin-secret");
    let schema = json!({"schema": {"type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}}});
    let a = c
        .call(
            Method::PUT,
            "/_funcatron/store/people/_collection",
            admin,
            &[],
            Some(schema.to_string()),
        )
        .await?;
    ensure!(a.status == 200, "defined: {}", a.body);
    let path = "/_funcatron/store/people/ada";
    let a = c
        .call(
            Method::PUT,
            path,
            admin,
            &[],
            Some(json!({"name": 1}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 400 && a.body["error"] == "schema_violation",
        "schema: {}",
        a.body
    );
    ensure!(
        a.body["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("/name")),
        "the problems name the field: {}",
        a.body
    );
    let a = c
        .call(
            Method::PUT,
            path,
            admin,
            &[("if-none-match", "*")],
            Some(json!({"name": "Ada", "n": 1}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 200 && etag(&a) == "\"1\"",
        "created: {} {}",
        a.status,
        a.body
    );
    let a = c
        .call(
            Method::PUT,
            path,
            admin,
            &[("if-none-match", "*")],
            Some(json!({"name": "Bob"}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 412 && etag(&a) == "\"1\"",
        "If-None-Match on an existing one: {}",
        a.status
    );
    let a = c
        .call(
            Method::PATCH,
            path,
            admin,
            &[
                ("if-match", "\"7\""),
                ("content-type", "application/merge-patch+json"),
            ],
            Some(json!({"n": 2}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 412 && a.body["error"] == "precondition_failed",
        "a stale If-Match: {}",
        a.body
    );
    let a = c
        .call(
            Method::PATCH,
            path,
            admin,
            &[
                ("if-match", "\"1\""),
                ("content-type", "application/merge-patch+json"),
            ],
            Some(json!({"n": 2, "extra": {"a": 1}}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["doc"] == json!({"name": "Ada", "n": 2, "extra": {"a": 1}}),
        "merged: {}",
        a.body
    );
    let a = c
        .call(
            Method::PATCH,
            path,
            admin,
            &[("content-type", "application/json-patch+json")],
            Some(json!([{"op": "remove", "path": "/extra"}]).to_string()),
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["doc"] == json!({"name": "Ada", "n": 2}) && etag(&a) == "\"3\"",
        "JSON Patch: {}",
        a.body
    );
    let a = c
        .call(Method::PUT, path, admin, &[], Some("{not json".into()))
        .await?;
    ensure!(
        a.status == 400 && a.body["error"] == "bad_json",
        "bad JSON: {}",
        a.body
    );
    let a = c
        .call(
            Method::PUT,
            path,
            admin,
            &[],
            Some(format!("{{\"name\":\"{}\"}}", "x".repeat(1_100_000))),
        )
        .await?;
    ensure!(
        a.status == 413 && a.body["error"] == "body_too_large",
        "too large: {}",
        a.status
    );
    let a = c
        .call(
            Method::PUT,
            path,
            admin,
            &[("if-match", "soon")],
            Some(json!({"name": "x"}).to_string()),
        )
        .await?;
    ensure!(
        a.status == 400 && a.body["error"] == "bad_precondition",
        "bad If-Match: {}",
        a.body
    );
    for i in 0..5 {
        let doc = json!({"name": format!("p{i}"), "n": i % 2});
        let a = c
            .call(
                Method::PUT,
                &format!("/_funcatron/store/people/p{i}"),
                admin,
                &[],
                Some(doc.to_string()),
            )
            .await?;
        ensure!(a.status == 200, "p{i}");
    }
    let a = c
        .call(
            Method::GET,
            "/_funcatron/store/people?n=1&limit=1",
            Some("read-secret"),
            &[],
            None,
        )
        .await?;
    ensure!(
        a.status == 200 && a.body["documents"][0]["id"] == "p1",
        "filtered: {}",
        a.body
    );
    let next = a.body["next"].as_str().unwrap_or_default().to_owned();
    let a = c
        .call(
            Method::GET,
            &format!("/_funcatron/store/people?n=1&after={next}"),
            Some("read-secret"),
            &[],
            None,
        )
        .await?;
    let ids: Vec<&str> = a.body["documents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect();
    ensure!(
        ids == ["p3"] && a.body["next"].is_null(),
        "the next page: {}",
        a.body
    );
    let a = c
        .call(
            Method::GET,
            "/_funcatron/store/people?limit=lots",
            Some("read-secret"),
            &[],
            None,
        )
        .await?;
    ensure!(a.status == 400, "a bad limit");
    let a = c
        .call(Method::DELETE, path, Some("read-secret"), &[], None)
        .await?;
    ensure!(a.status == 403, "the read token does not delete");
    let a = c
        .call(Method::DELETE, path, admin, &[("if-match", "\"3\"")], None)
        .await?;
    ensure!(
        a.status == 200 && a.body["doc"]["name"] == "Ada",
        "deleted: {}",
        a.body
    );
    let a = c.call(Method::GET, path, admin, &[], None).await?;
    ensure!(
        a.status == 404 && a.body["error"] == "not_found",
        "gone: {}",
        a.body
    );
    let a = c
        .call(
            Method::DELETE,
            "/_funcatron/store/people/_collection",
            admin,
            &[],
            None,
        )
        .await?;
    ensure!(
        a.status == 409 && a.body["error"] == "collection_not_empty",
        "{}",
        a.body
    );
    Ok(())
}

/// A wrong method and an unknown path below the prefix are answered with a
/// JSON reason, not an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_unknown_routes_answer_json() -> Result<()> {
    let c = Client::new().await?;
    let a = c
        .call(
            Method::PATCH,
            "/_funcatron/store/orders",
            Some("admin"),
            &[],
            None,
        )
        .await?;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.body["error"], "method_not_allowed");
    let a = c
        .call(
            Method::POST,
            "/_funcatron/store/orders/o1",
            Some("admin"),
            &[],
            None,
        )
        .await?;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    let a = c
        .call(
            Method::GET,
            "/_funcatron/store/orders/o1/extra/parts",
            None,
            &[],
            None,
        )
        .await?;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["error"], "not_found");
    assert!(a.body["request_id"].is_string());
    Ok(())
}

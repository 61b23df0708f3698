//! The document store through the production ingress: real nginx with the
//! Lua module proxies `/_funcatron/store...` to a real Tron (its
//! management listener, with a state store: PostgreSQL when
//! `FUNCATRON_TEST_POSTGRES` names one, else an embedded file), the
//! client's token and body with it; without a Tron nginx answers a JSON
//! 501, and a Tron it cannot reach is a JSON 503.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use funcatron_documents::MAX_DOCUMENT_BYTES;
use funcatron_ingress::nginx::STORE_MAX_BODY_BYTES;
use serde_json::{json, Value};

const TOKEN: &str = "nginx-store-admin-token-31";

/// The Tron's state store, and the schema holding it on PostgreSQL
/// (dropped with it).
fn state_store(dir: &std::path::Path) -> (String, Option<PgSchema>) {
    if std::env::var_os("FUNCATRON_TEST_POSTGRES").is_some() {
        let schema = fresh_pg_schema();
        (schema.url.clone(), Some(schema))
    } else {
        (dir.join("records.redb").display().to_string(), None)
    }
}

/// What nginx answered: status, headers and the body (JSON, or `Null`).
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// `method path` through `base` with the bearer `token` (if any), the
/// extra `headers` and `body` (JSON text, if any).
async fn send(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        r = r.header("content-type", "application/json").body(b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// A collection name of this run's own.
fn fresh_collection() -> String {
    format!(
        "orders-{}",
        funcatron_envelope::new_request_id()[..10].to_ascii_lowercase()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_store_through_nginx_is_the_trons() {
    let root = tempfile::tempdir().unwrap();
    let broker = fresh_vhost();
    let bundles = bundles_with_trouble();
    let dir = bundles.path().to_str().unwrap().to_owned();
    let mgmt = free_addr().to_string();
    let store = root.path().join("store");
    let (records, _schema) = state_store(root.path());
    let _tron = spawn(
        "tron",
        &broker,
        &[
            "--bundles",
            &dir,
            "--store",
            store.to_str().unwrap(),
            "--state-store",
            &records,
            "--mgmt-listen",
            &mgmt,
            "--token",
            TOKEN,
        ],
    );
    let token_file = root.path().join("tron-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let tron_url = format!("http://{mgmt}");
    let nginx = start_nginx(
        &broker,
        &[
            "--tron-url",
            &tron_url,
            "--tron-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let base = nginx.base.clone();
    eventually("the Tron's management API is up", || async {
        text(&format!("{tron_url}/v1/health")).await.0 == 200
    })
    .await;

    // Define a collection through nginx with the admin token: a schema,
    // and collection tokens to read and write.
    let c = fresh_collection();
    let definition = json!({
        "schema": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"enum": ["open", "paid"]}}
        },
        "read": "token",
        "write": "token"
    });
    let defined = send(
        &base,
        "PUT",
        &format!("/_funcatron/store/{c}/_collection"),
        Some(TOKEN),
        &[],
        Some(definition.to_string()),
    )
    .await;
    assert_eq!(defined.status, 200, "{}", defined.body);
    assert_eq!(defined.body["name"], c.as_str());
    assert_eq!(defined.body["write"], "token");

    // No token: the Tron's JSON 401, the client's request id kept.
    for (method, path, body) in [
        ("GET", "/_funcatron/store".to_owned(), None),
        ("GET", format!("/_funcatron/store/{c}/o1"), None),
        (
            "PUT",
            format!("/_funcatron/store/{c}/o1"),
            Some(json!({"status": "open"}).to_string()),
        ),
        (
            "PUT",
            format!("/_funcatron/store/{c}/_collection"),
            Some("{}".to_owned()),
        ),
    ] {
        let a = send(
            &base,
            method,
            &path,
            None,
            &[("x-request-id", "anon-1")],
            body,
        )
        .await;
        assert_eq!(a.status, 401, "{method} {path}: {}", a.body);
        assert_eq!(a.body["error"], "unauthorized", "{method} {path}");
        assert_eq!(a.body["request_id"], "anon-1", "{method} {path}");
        assert_eq!(a.header("x-request-id"), Some("anon-1"));
    }
    // A token that is not enough: 403.
    let a = send(
        &base,
        "GET",
        &format!("/_funcatron/store/{c}/o1"),
        Some("not-a-token"),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (403, Some("forbidden"))
    );

    // Write and read a document with the admin token.
    let doc_path = format!("/_funcatron/store/{c}/o1");
    let w = send(
        &base,
        "PUT",
        &doc_path,
        Some(TOKEN),
        &[("x-request-id", "put-1")],
        Some(json!({"status": "open", "total": 12}).to_string()),
    )
    .await;
    assert_eq!(w.status, 200, "{}", w.body);
    assert_eq!(w.header("etag"), Some("\"1\""));
    assert_eq!(w.header("x-request-id"), Some("put-1"));
    assert_eq!(w.body["version"], 1);
    let r = send(&base, "GET", &doc_path, Some(TOKEN), &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["doc"], json!({"status": "open", "total": 12}));
    assert_eq!(r.header("etag"), Some("\"1\""));

    // A collection token (made through nginx) writes with a precondition;
    // a stale one is a 412 naming the current version.
    let made = send(
        &base,
        "POST",
        &format!("/_funcatron/store/{c}/_tokens"),
        Some(TOKEN),
        &[],
        Some(json!({"write": true}).to_string()),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let writer = made.body["token"].as_str().unwrap().to_owned();
    let patched = send(
        &base,
        "PATCH",
        &doc_path,
        Some(&writer),
        &[("if-match", "\"1\"")],
        Some(json!({"status": "paid"}).to_string()),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(
        patched.body["doc"],
        json!({"status": "paid", "total": 12}),
        "a merge patch"
    );
    let stale = send(
        &base,
        "PUT",
        &doc_path,
        Some(&writer),
        &[("if-match", "\"1\"")],
        Some(json!({"status": "open"}).to_string()),
    )
    .await;
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert_eq!(stale.header("etag"), Some("\"2\""));

    // The schema holds through nginx; a create answers where it is.
    let bad = send(
        &base,
        "POST",
        &format!("/_funcatron/store/{c}"),
        Some(&writer),
        &[],
        Some(json!({"status": "lost"}).to_string()),
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.body["error"], "schema_violation");
    let created = send(
        &base,
        "POST",
        &format!("/_funcatron/store/{c}"),
        Some(&writer),
        &[],
        Some(json!({"status": "open"}).to_string()),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let location = created.header("location").unwrap().to_owned();
    assert_eq!(
        location,
        format!(
            "/_funcatron/store/{c}/{}",
            created.body["id"].as_str().unwrap()
        )
    );
    let listed = send(
        &base,
        "GET",
        &format!("/_funcatron/store/{c}?status=open"),
        Some(&writer),
        &[],
        None,
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let ids: Vec<&str> = listed.body["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [created.body["id"].as_str().unwrap()], "the filter");
    let all = send(&base, "GET", "/_funcatron/store", Some(TOKEN), &[], None).await;
    assert_eq!(all.status, 200, "{}", all.body);
    assert!(
        all.body["collections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == c.as_str()),
        "{}",
        all.body
    );

    // A document near the limit passes nginx; a body past the Tron's
    // limit is the Tron's JSON 413, one past nginx's is nginx's.
    let big = json!({"status": "open", "blob": "x".repeat(MAX_DOCUMENT_BYTES - 100)}).to_string();
    let w = send(
        &base,
        "PUT",
        &format!("/_funcatron/store/{c}/big"),
        Some(&writer),
        &[],
        Some(big),
    )
    .await;
    assert_eq!(w.status, 200, "{}", w.body);
    let past_tron = format!("{{\"blob\":\"{}\"}}", "x".repeat(MAX_DOCUMENT_BYTES + 4096));
    assert!(past_tron.len() < STORE_MAX_BODY_BYTES);
    let a = send(
        &base,
        "PUT",
        &format!("/_funcatron/store/{c}/big"),
        Some(&writer),
        &[],
        Some(past_tron),
    )
    .await;
    assert_eq!(a.status, 413);
    assert_eq!(a.body["error"], "body_too_large", "the Tron's: {}", a.body);
    let past_nginx = "x".repeat(STORE_MAX_BODY_BYTES + 1);
    let a = send(
        &base,
        "PUT",
        &format!("/_funcatron/store/{c}/big"),
        Some(&writer),
        &[("x-request-id", "huge-1")],
        Some(past_nginx),
    )
    .await;
    assert_eq!(a.status, 413);
    assert_eq!(a.body["error"], "payload_too_large", "nginx's: {}", a.body);
    assert_eq!(a.body["request_id"], "huge-1");

    // Delete; then the document is gone.
    let d = send(&base, "DELETE", &doc_path, Some(&writer), &[], None).await;
    assert_eq!(d.status, 200, "{}", d.body);
    let r = send(&base, "GET", &doc_path, Some(&writer), &[], None).await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (404, Some("not_found"))
    );

    // Only the store's paths go to the Tron.
    let (s, body) = text(&format!("{base}/_funcatron/storefront")).await;
    assert_eq!(s, 404, "{body}");
    assert!(!body.contains("unauthorized"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tron_nginx_answers_the_store_with_a_501() {
    let nginx = start_nginx(&fresh_vhost(), &[]).await;
    for (method, path, body) in [
        ("GET", "/_funcatron/store", None),
        ("GET", "/_funcatron/store/orders/o1", None),
        (
            "PUT",
            "/_funcatron/store/orders/_collection",
            Some("{}".to_owned()),
        ),
    ] {
        let a = send(
            &nginx.base,
            method,
            path,
            Some(TOKEN),
            &[("x-request-id", "no-tron-1")],
            body,
        )
        .await;
        assert_eq!(a.status, 501, "{method} {path}: {}", a.body);
        assert_eq!(a.body["error"], "store_unavailable", "{method} {path}");
        assert_eq!(a.body["request_id"], "no-tron-1");
        assert_eq!(a.header("content-type"), Some("application/json"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tron_that_cannot_be_reached_is_a_json_503() {
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("tron-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let nowhere = format!("http://{}", free_addr());
    let nginx = start_nginx(
        &fresh_vhost(),
        &[
            "--tron-url",
            &nowhere,
            "--tron-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let a = send(
        &nginx.base,
        "PUT",
        "/_funcatron/store/orders/o1",
        Some(TOKEN),
        &[("x-request-id", "gone-1")],
        Some("{}".to_owned()),
    )
    .await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.body["error"], "tron_unavailable");
    assert_eq!(a.body["request_id"], "gone-1");
}

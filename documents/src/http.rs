//! The document store over HTTP: `/_funcatron/store/...`, served by the
//! embedded ingress (`funcatron up`, `funcatron ingress --store`) and by
//! every Tron's management listener (where the nginx ingress proxies it
//! and the CLI talks to it), the same routes and answers everywhere.
//!
//! client -> ingress or Tron -> **[`router`]** -> [`Documents`] -> the
//! state store. Each request is checked against its collection's access
//! rules ([`crate::collections`]) with the `Authorization: Bearer` token it
//! carries: a collection token, or an operator token ([`Operators`], the
//! Tron's read and admin tokens). Errors are JSON, `{"error", "message",
//! "request_id"}` (and `problems` for a schema refusal), never a panic.
//!
//! | Route | Does | Needs |
//! |---|---|---|
//! | `GET /_funcatron/store` | the collections | read operator |
//! | `GET, PUT, DELETE /_funcatron/store/{c}/_collection` | its definition | read / admin operator |
//! | `POST /_funcatron/store/{c}/_tokens`, `DELETE .../_tokens/{id}` | make, revoke a token | admin operator |
//! | `GET /_funcatron/store/{c}?field=value&limit=&after=` | list | read |
//! | `POST /_funcatron/store/{c}` | create (fresh id) | write |
//! | `GET /_funcatron/store/{c}/{id}` | one document | read |
//! | `PUT, PATCH, DELETE /_funcatron/store/{c}/{id}` | write | write |

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use serde_json::{json, Value};

use crate::collections::Access;
use crate::{Collection, DocError, Document, Documents, Filter, Precondition, MAX_DOCUMENT_BYTES};

/// The path prefix of every route.
pub const PREFIX: &str = "/_funcatron/store";

/// What an operator token is worth: given by the owner of the listener
/// (a Tron knows its read and admin tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OperatorRole {
    /// Not an operator token.
    None,
    /// The read token: reads every collection.
    Read,
    /// The admin token: everything.
    Admin,
}

/// Recognises operator tokens.
pub trait Operators: Send + Sync + 'static {
    /// What `token` (the bearer token of a request) is worth.
    fn role(&self, token: &str) -> OperatorRole;
}

struct Http {
    docs: Documents,
    operators: Option<Arc<dyn Operators>>,
}

type Shared = State<Arc<Http>>;

/// A refusal answered before the handler's work (boxed: a response is
/// large).
type Refused = Box<Response>;

/// The routes, for the owner to merge into its router. Without
/// `operators` only `public` collections and collection tokens open
/// anything.
pub fn router(docs: Documents, operators: Option<Arc<dyn Operators>>) -> Router {
    let state = Arc::new(Http { docs, operators });
    // A wrong method or an unknown path below the prefix is answered in
    // JSON too (the owner's router keeps its own fallback).
    Router::new()
        .route(PREFIX, get(list_collections).fallback(wrong_method))
        .route(
            &format!("{PREFIX}/{{c}}"),
            get(list_documents)
                .post(create_document)
                .fallback(wrong_method),
        )
        .route(
            &format!("{PREFIX}/{{c}}/_collection"),
            get(show_collection)
                .put(define_collection)
                .delete(drop_collection)
                .fallback(wrong_method),
        )
        .route(
            &format!("{PREFIX}/{{c}}/_tokens"),
            axum::routing::post(add_token).fallback(wrong_method),
        )
        .route(
            &format!("{PREFIX}/{{c}}/_tokens/{{token}}"),
            delete(revoke_token).fallback(wrong_method),
        )
        .route(
            &format!("{PREFIX}/{{c}}/{{id}}"),
            get(get_document)
                .put(put_document)
                .patch(patch_document)
                .delete(delete_document)
                .fallback(wrong_method),
        )
        .route(
            &format!("{PREFIX}/{{c}}/{{id}}/{{*rest}}"),
            axum::routing::any(no_route),
        )
        .with_state(state)
}

async fn wrong_method(method: axum::http::Method, headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    refuse(
        405,
        "method_not_allowed",
        &format!("{method} is not a document store operation here (docs/store.md)"),
        &rid,
    )
}

async fn no_route(headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    refuse(
        404,
        "not_found",
        "no such document store route: /_funcatron/store/<collection>[/<id>] (docs/store.md)",
        &rid,
    )
}

/// The request's id: its `X-Request-Id` when sane, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    match headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        Some(id) if funcatron_envelope::sane_request_id(id) => id.to_owned(),
        _ => funcatron_envelope::new_request_id(),
    }
}

fn json_answer(status: StatusCode, body: &Value, id: &str) -> Response {
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-request-id", v);
    }
    metrics::counter!("documents_http_requests_total", "status" => status.as_str().to_owned())
        .increment(1);
    r
}

fn refuse(status: u16, code: &str, message: &str, id: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_answer(
        status,
        &json!({"error": code, "message": message, "request_id": id}),
        id,
    )
}

fn failed(e: &DocError, id: &str) -> Response {
    if matches!(e, DocError::Store(_) | DocError::Corrupt(_)) {
        tracing::warn!(request_id = id, error = %e, "document store request failed");
    }
    let mut body = json!({"error": e.code(), "message": e.to_string(), "request_id": id});
    if let DocError::Schema(problems) = e {
        body["problems"] = json!(problems);
    }
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_answer(status, &body, id);
    if let DocError::Precondition {
        current: Some(version),
    } = e
    {
        set_etag(&mut r, *version);
    }
    r
}

fn set_etag(r: &mut Response, version: u64) {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
}

fn document_answer(status: StatusCode, d: &Document, id: &str) -> Response {
    let body = serde_json::to_value(d).unwrap_or(Value::Null);
    let mut r = json_answer(status, &body, id);
    set_etag(&mut r, d.version);
    r
}

/// A write's answer: the document, or only its id and version when the
/// caller may write the collection but not read it.
fn written_answer(
    s: &Http,
    headers: &HeaderMap,
    c: &Collection,
    status: StatusCode,
    d: &Document,
    id: &str,
) -> Response {
    if authorize(s, headers, Some(c), Need::Read, id).is_ok() {
        return document_answer(status, d, id);
    }
    let body = json!({"collection": d.collection, "id": d.id, "version": d.version, "updated_ms": d.updated_ms});
    let mut r = json_answer(status, &body, id);
    set_etag(&mut r, d.version);
    r
}

/// What a request must be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Read,
    Write,
    OperatorRead,
    OperatorAdmin,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// `Ok` when the request's token (or the collection's rules) allow
/// `need`; else the 401 (no token) or 403 (a token that is not enough).
fn authorize(
    s: &Http,
    headers: &HeaderMap,
    collection: Option<&Collection>,
    need: Need,
    id: &str,
) -> Result<(), Refused> {
    let token = bearer(headers);
    let role = match (&s.operators, token) {
        (Some(ops), Some(t)) => ops.role(t),
        _ => OperatorRole::None,
    };
    let rule = |c: &Collection, write: bool| {
        let d = c.definition();
        match if write { d.write } else { d.read } {
            Access::Public => true,
            Access::Token => token.is_some_and(|t| c.token_allows(t, write)),
            Access::Operator => false,
        }
    };
    let allowed = match need {
        Need::OperatorAdmin => role == OperatorRole::Admin,
        Need::OperatorRead => role >= OperatorRole::Read,
        Need::Read => role >= OperatorRole::Read || collection.is_some_and(|c| rule(c, false)),
        Need::Write => role == OperatorRole::Admin || collection.is_some_and(|c| rule(c, true)),
    };
    if allowed {
        Ok(())
    } else if token.is_none() {
        Err(Box::new(refuse(
            401,
            "unauthorized",
            "this needs `Authorization: Bearer <token>`: a token of the collection or an operator token",
            id,
        )))
    } else {
        Err(Box::new(refuse(
            403,
            "forbidden",
            "this token does not allow this here",
            id,
        )))
    }
}

/// The collection (404 when undefined) once `need` is allowed on it.
async fn open(
    s: &Http,
    headers: &HeaderMap,
    name: &str,
    need: Need,
    id: &str,
) -> Result<Arc<Collection>, Refused> {
    let c = s
        .docs
        .collection(name)
        .await
        .map_err(|e| Box::new(failed(&e, id)))?;
    authorize(s, headers, Some(&c), need, id)?;
    Ok(c)
}

/// The body, at most `limit` bytes (else a JSON 413), parsed as JSON.
async fn json_body(body: Body, id: &str) -> Result<Value, Refused> {
    let limit = MAX_DOCUMENT_BYTES + 1024;
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        Box::new(refuse(
            413,
            "body_too_large",
            &format!("the body is larger than {limit} bytes (or was cut off)"),
            id,
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Box::new(refuse(
            400,
            "bad_json",
            &format!("the body is not JSON: {e}"),
            id,
        ))
    })
}

/// `If-Match` / `If-None-Match` as a [`Precondition`].
fn precondition(headers: &HeaderMap, id: &str) -> Result<Precondition, Refused> {
    let get = |name: header::HeaderName| {
        headers
            .get(name)
            .map(|v| v.to_str().map(str::trim).unwrap_or("?"))
    };
    if let Some(v) = get(header::IF_NONE_MATCH) {
        return if v == "*" {
            Ok(Precondition::Absent)
        } else {
            Err(Box::new(refuse(
                400,
                "bad_precondition",
                "If-None-Match takes only `*` here",
                id,
            )))
        };
    }
    match get(header::IF_MATCH) {
        None => Ok(Precondition::None),
        Some("*") => Ok(Precondition::Exists),
        Some(v) => v
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse()
            .map(Precondition::Version)
            .map_err(|_| {
                Box::new(refuse(
                    400,
                    "bad_precondition",
                    "If-Match takes `*` or a version (the ETag, \"3\")",
                    id,
                ))
            }),
    }
}

async fn list_collections(State(s): Shared, headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = authorize(&s, &headers, None, Need::OperatorRead, &rid) {
        return *r;
    }
    match s.docs.collections().await {
        Ok(all) => json_answer(StatusCode::OK, &json!({"collections": all}), &rid),
        Err(e) => failed(&e, &rid),
    }
}

async fn show_collection(State(s): Shared, Path(c): Path<String>, headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = authorize(&s, &headers, None, Need::OperatorRead, &rid) {
        return *r;
    }
    match s.docs.collection(&c).await {
        Ok(col) => {
            let count = s.docs.count(&c).await.ok();
            let mut body = serde_json::to_value(col.view()).unwrap_or(Value::Null);
            body["documents"] = json!(count);
            json_answer(StatusCode::OK, &body, &rid)
        }
        Err(e) => failed(&e, &rid),
    }
}

async fn define_collection(
    State(s): Shared,
    Path(c): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = authorize(&s, &headers, None, Need::OperatorAdmin, &rid) {
        return *r;
    }
    let value = match json_body(body, &rid).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let definition = match serde_json::from_value(value) {
        Ok(d) => d,
        Err(e) => {
            return refuse(
                400,
                "bad_definition",
                &format!("a collection definition is {{\"schema\"?, \"read\"?, \"write\"?}}: {e}"),
                &rid,
            )
        }
    };
    match s.docs.define(&c, definition).await {
        Ok(view) => json_answer(
            StatusCode::OK,
            &serde_json::to_value(view).unwrap_or(Value::Null),
            &rid,
        ),
        Err(e) => failed(&e, &rid),
    }
}

async fn drop_collection(State(s): Shared, Path(c): Path<String>, headers: HeaderMap) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = authorize(&s, &headers, None, Need::OperatorAdmin, &rid) {
        return *r;
    }
    match s.docs.drop_collection(&c).await {
        Ok(()) => json_answer(StatusCode::OK, &json!({"dropped": c}), &rid),
        Err(e) => failed(&e, &rid),
    }
}

async fn add_token(
    State(s): Shared,
    Path(c): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = authorize(&s, &headers, None, Need::OperatorAdmin, &rid) {
        return *r;
    }
    // The body is optional: `{"write": true}` makes a token that writes.
    let bytes = match axum::body::to_bytes(body, 4096).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                413,
                "body_too_large",
                "a token request is a small JSON object",
                &rid,
            )
        }
    };
    let write = if bytes.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => match v.get("write") {
                None => false,
                Some(Value::Bool(w)) => *w,
                Some(_) => return refuse(400, "bad_request", "`write` is true or false", &rid),
            },
            Err(e) => return refuse(400, "bad_json", &format!("the body is not JSON: {e}"), &rid),
        }
    };
    match s.docs.add_token(&c, write).await {
        Ok((token, id)) => json_answer(
            StatusCode::CREATED,
            &json!({"id": id, "token": token, "write": write}),
            &rid,
        ),
        Err(e) => failed(&e, &rid),
    }
}

async fn revoke_token(
    State(s): Shared,
    Path((c, token)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = authorize(&s, &headers, None, Need::OperatorAdmin, &rid) {
        return *r;
    }
    match s.docs.revoke_token(&c, &token).await {
        Ok(true) => json_answer(StatusCode::OK, &json!({"revoked": token}), &rid),
        Ok(false) => refuse(
            404,
            "unknown_token",
            &format!("no token {token} on {c}"),
            &rid,
        ),
        Err(e) => failed(&e, &rid),
    }
}

/// A filter value: JSON when it reads as JSON (numbers, `true`, `null`,
/// `"quoted"`), else the string itself.
fn filter_value(raw: &str) -> Value {
    match serde_json::from_str::<Value>(raw) {
        Ok(v) if !v.is_object() && !v.is_array() => v,
        _ => Value::String(raw.to_owned()),
    }
}

fn parse_filter(query: Option<&str>, rid: &str) -> Result<Filter, Refused> {
    let mut f = Filter::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "limit" => {
                f.limit = Some(
                    v.parse()
                        .map_err(|_| refuse(400, "bad_query", "limit is a whole number", rid))?,
                );
            }
            "after" => f.after = Some(v.into_owned()),
            field => {
                let field = field.strip_prefix("where.").unwrap_or(field);
                if f.equals.len() >= 16 || field.is_empty() {
                    return Err(Box::new(refuse(
                        400,
                        "bad_query",
                        "at most 16 filters, each `field=value`",
                        rid,
                    )));
                }
                f.equals.push((field.to_owned(), filter_value(&v)));
            }
        }
    }
    Ok(f)
}

async fn list_documents(
    State(s): Shared,
    Path(c): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = open(&s, &headers, &c, Need::Read, &rid).await {
        return *r;
    }
    let filter = match parse_filter(query.as_deref(), &rid) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    match s.docs.list(&c, &filter).await {
        Ok(page) => json_answer(
            StatusCode::OK,
            &serde_json::to_value(page).unwrap_or(Value::Null),
            &rid,
        ),
        Err(e) => failed(&e, &rid),
    }
}

async fn create_document(
    State(s): Shared,
    Path(c): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rid = request_id(&headers);
    let col = match open(&s, &headers, &c, Need::Write, &rid).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let doc = match json_body(body, &rid).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match s.docs.create(&c, None, doc).await {
        Ok(d) => {
            let mut r = written_answer(&s, &headers, &col, StatusCode::CREATED, &d, &rid);
            if let Ok(v) = HeaderValue::from_str(&format!("{PREFIX}/{c}/{}", d.id)) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e) => failed(&e, &rid),
    }
}

async fn get_document(
    State(s): Shared,
    Path((c, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers);
    if let Err(r) = open(&s, &headers, &c, Need::Read, &rid).await {
        return *r;
    }
    match s.docs.get(&c, &id).await {
        Ok(Some(d)) => document_answer(StatusCode::OK, &d, &rid),
        Ok(None) => failed(&DocError::NotFound { collection: c, id }, &rid),
        Err(e) => failed(&e, &rid),
    }
}

async fn put_document(
    State(s): Shared,
    Path(target): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write_document(&s, target, &headers, body, false).await
}

async fn patch_document(
    State(s): Shared,
    Path(target): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    write_document(&s, target, &headers, body, true).await
}

/// PUT (the whole document) or PATCH: a JSON Patch when sent as
/// `application/json-patch+json`, else a merge patch.
async fn write_document(
    s: &Http,
    (c, id): (String, String),
    headers: &HeaderMap,
    body: Body,
    patch: bool,
) -> Response {
    let rid = request_id(headers);
    let col = match open(s, headers, &c, Need::Write, &rid).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let (pre, value) = match (precondition(headers, &rid), json_body(body, &rid).await) {
        (Ok(p), Ok(d)) => (p, d),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    let json_patch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim().starts_with("application/json-patch+json"));
    let outcome = match (patch, json_patch) {
        (false, _) => s.docs.put(&c, &id, value, pre).await,
        (true, true) => match serde_json::from_value::<json_patch::Patch>(value) {
            Ok(p) => s.docs.json_patch(&c, &id, &p, pre).await,
            Err(e) => Err(DocError::Invalid(format!("not a JSON Patch: {e}"))),
        },
        (true, false) => s.docs.merge(&c, &id, &value, pre).await,
    };
    match outcome {
        Ok(d) => written_answer(s, headers, &col, StatusCode::OK, &d, &rid),
        Err(e) => failed(&e, &rid),
    }
}

async fn delete_document(
    State(s): Shared,
    Path((c, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers);
    let col = match open(&s, &headers, &c, Need::Write, &rid).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let pre = match precondition(&headers, &rid) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match s.docs.delete(&c, &id, pre).await {
        Ok(d) => written_answer(&s, &headers, &col, StatusCode::OK, &d, &rid),
        Err(e) => failed(&e, &rid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_values_read_as_json_when_they_can() {
        assert_eq!(filter_value("3"), json!(3));
        assert_eq!(filter_value("true"), json!(true));
        assert_eq!(filter_value("\"3\""), json!("3"));
        assert_eq!(filter_value("open"), json!("open"));
        assert_eq!(filter_value("007"), json!("007"));
        assert_eq!(filter_value("{\"a\":1}"), json!("{\"a\":1}"));
    }
}

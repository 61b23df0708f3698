//! Request and response validation against the real Petstore documents
//! (Swagger 2.0 and OpenAPI 3.0) and the `validation-*` fixtures in
//! `swagger-examples/`: parameters, bodies, formats, content types, forms,
//! readOnly/writeOnly, OpenAPI 3.1 schemas, shared operationIds, answers.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use funcatron_bundle::validate::{
    compile_bundle, compile_responses, Answer, Checks, Input, Refusal, ResponseChecks,
};
use funcatron_bundle::Bundle;
use proptest::prelude::*;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../swagger-examples")
}

/// The bundle of document `file` with `manifest` lines added.
fn load(file: &str, manifest: &str) -> (tempfile::TempDir, Bundle) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(examples().join(file)).unwrap();
    let name = if text.starts_with("swagger") || text.contains("\nswagger:") {
        "swagger.yaml"
    } else {
        "openapi.yaml"
    };
    std::fs::write(
        dir.path().join("funcatron.yaml"),
        format!("name: fixture\nruntime: lua\n{manifest}"),
    )
    .unwrap();
    std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
    if text.contains("\nopenapi: 3.1") {
        // Loaded through a 3.0 stand-in, then given the 3.1 document: these
        // tests are about the checks, not the loader.
        std::fs::write(
            dir.path().join(name),
            "openapi: 3.0.3\ninfo: {title: t, version: '1'}\npaths:\n  /x:\n    get: {operationId: x, responses: {}}\n",
        )
        .unwrap();
        let mut b = Bundle::load(dir.path()).unwrap();
        b.doc = Arc::new(serde_yaml_ng::from_str(&text).unwrap());
        return (dir, b);
    }
    std::fs::write(dir.path().join(name), text).unwrap();
    let b = Bundle::load(dir.path()).unwrap();
    (dir, b)
}

struct Fixture {
    _dir: tempfile::TempDir,
    checks: HashMap<String, Checks>,
    responses: HashMap<String, ResponseChecks>,
}

fn fixture(file: &str, manifest: &str) -> Fixture {
    let (dir, b) = load(file, manifest);
    Fixture {
        checks: compile_bundle(&b).unwrap(),
        responses: compile_responses(&b).unwrap(),
        _dir: dir,
    }
}

/// A request to check.
#[derive(Default, Clone)]
struct Req<'a> {
    params: &'a [(&'a str, &'a str)],
    query: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: &'a [u8],
}

impl Fixture {
    fn run(&self, route: &str, r: &Req<'_>) -> Result<(), Refusal> {
        let params: Vec<(String, String)> = r
            .params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let checks = self
            .checks
            .get(route)
            .unwrap_or_else(|| panic!("no checks for {route}: {:?}", self.checks.keys()));
        checks.check(&Input {
            params: &params,
            query: r.query,
            headers: r.headers,
            body: r.body,
        })
    }

    /// The request's problems (none when it passes); a 415 fails the test.
    fn problems(&self, route: &str, r: &Req<'_>) -> Vec<String> {
        match self.run(route, r) {
            Ok(()) => vec![],
            Err(Refusal::Invalid(p)) => p,
            Err(other) => panic!("{route}: {other:?}"),
        }
    }

    /// Why the request's content type is refused (415); anything else fails.
    fn unsupported(&self, route: &str, r: &Req<'_>) -> String {
        match self.run(route, r) {
            Err(Refusal::UnsupportedMediaType(why)) => why,
            other => panic!("{route}: expected a 415, got {other:?}"),
        }
    }

    /// How the answer differs from the document.
    fn answer(&self, route: &str, status: u16, ct: &str, body: &str) -> Vec<String> {
        let headers: Vec<(&str, &str)> = if ct.is_empty() {
            vec![]
        } else {
            vec![("Content-Type", ct)]
        };
        self.responses
            .get(route)
            .unwrap_or_else(|| panic!("no response checks for {route}"))
            .check(&Answer {
                status,
                headers: &headers,
                body: body.as_bytes(),
            })
    }
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

fn json(body: &str) -> Req<'_> {
    Req {
        headers: JSON,
        body: body.as_bytes(),
        ..Req::default()
    }
}

fn query(q: &str) -> Req<'_> {
    Req {
        query: q,
        ..Req::default()
    }
}

fn one_problem(p: &[String], needles: &[&str]) {
    assert_eq!(p.len(), 1, "{p:?}");
    for n in needles {
        assert!(p[0].contains(n), "{n:?} not in {p:?}");
    }
}

#[test]
fn swagger2_parameters_and_bodies_are_checked() {
    let f = fixture("petstore-swagger2.yaml", "");
    let pet = |id: &'static str| Req {
        params: Box::leak(Box::new([("petId", id)])),
        ..Req::default()
    };
    assert!(f.problems("GET /pet/{petId}", &pet("12")).is_empty());
    let p = f.problems("GET /pet/{petId}", &pet("twelve"));
    one_problem(&p, &["path parameter `petId`", "not an integer"]);
    // int64: one past i64::MAX is out of range.
    let p = f.problems("GET /pet/{petId}", &pet("9223372036854775808"));
    one_problem(&p, &["petId", "int64"]);
    // Arrays one value per occurrence (collectionFormat multi), items by enum.
    let by_status = "GET /pet/findByStatus";
    assert!(f
        .problems(by_status, &query("status=available&status=sold"))
        .is_empty());
    one_problem(
        &f.problems(by_status, &query("status=available&status=lost")),
        &["lost"],
    );
    one_problem(
        &f.problems(by_status, &query("")),
        &["required but missing"],
    );
    // Body against a $ref'd definition.
    let ok = r#"{"name": "rex", "photoUrls": ["a"], "status": "sold"}"#;
    assert!(f.problems("POST /pet", &json(ok)).is_empty());
    let all = f
        .problems("POST /pet", &json(r#"{"name": 3, "status": "lost"}"#))
        .join("\n");
    assert!(
        all.contains("photoUrls") && all.contains("/name") && all.contains("/status"),
        "{all}"
    );
    let p = f.problems("POST /pet", &json(""));
    assert!(p[0].contains("required but empty"), "{p:?}");
    let p = f.problems("POST /pet", &json("{oops"));
    assert!(p[0].contains("not valid JSON"), "{p:?}");
    // A declared non-JSON body (the operation also consumes XML) is not
    // checked against the schema; an undeclared type is refused.
    let xml = Req {
        headers: &[("content-type", "application/xml")],
        body: b"<pet/>",
        ..Req::default()
    };
    assert!(f.problems("POST /pet", &xml).is_empty());
    let text = Req {
        headers: &[("content-type", "text/plain")],
        body: b"rex",
        ..Req::default()
    };
    let why = f.unsupported("POST /pet", &text);
    assert!(
        why.contains("text/plain") && why.contains("application/json, application/xml"),
        "{why}"
    );
    // Without consumes (operation or document), any content type goes.
    assert!(f.problems("PUT /pet", &text).is_empty());
    // Headers by case-insensitive name, optional ones may be absent.
    let del = Req {
        params: &[("petId", "1")],
        headers: &[("API_KEY", "k")],
        ..Req::default()
    };
    assert!(f.problems("DELETE /pet/{petId}", &del).is_empty());
    let del = Req {
        params: &[("petId", "1")],
        ..Req::default()
    };
    assert!(f.problems("DELETE /pet/{petId}", &del).is_empty());
}

#[test]
fn openapi3_parameters_and_request_bodies_are_checked() {
    let f = fixture("petstore-openapi3.yaml", "");
    let by_status = "GET /pet/findByStatus";
    assert!(f.problems(by_status, &query("status=pending")).is_empty());
    one_problem(
        &f.problems(by_status, &query("status=gone")),
        &["query parameter `status`"],
    );
    assert!(f
        .problems("GET /pet/findByTags", &query("tags=a&tags=b"))
        .is_empty());
    let p = f.problems("POST /pet", &json(r#"{"id": "x"}"#));
    assert!(p.join(" ").contains("name"), "{p:?}");
    // The only content type is JSON: anything else is refused (415).
    let text = Req {
        headers: &[("content-type", "text/plain")],
        body: b"rex",
        ..Req::default()
    };
    let why = f.unsupported("POST /pet", &text);
    assert!(why.contains("\"text/plain\" is not accepted"), "{why}");
}

#[test]
fn validate_false_compiles_no_checks() {
    let f = fixture("petstore-swagger2.yaml", "validate: false\n");
    assert!(f.checks.is_empty());
    // Answers are checked on request, whatever `validate` says.
    assert!(!f.responses.is_empty());
}

/// Rules are filed by route: two operations sharing an operationId keep
/// their own parameters and bodies.
#[test]
fn operations_sharing_an_operation_id_keep_their_own_rules() {
    let f = fixture("validation-openapi3.yaml", "");
    let id = "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10";
    // `items`: the list has `limit`, the single item a uuid path parameter.
    one_problem(
        &f.problems("GET /items", &query("limit=0")),
        &["query parameter `limit`", "minimum"],
    );
    let item = |id: &'static str, q: &'static str| Req {
        params: Box::leak(Box::new([("id", id)])),
        query: q,
        ..Req::default()
    };
    assert!(f
        .problems("GET /items/{id}", &item(id, "limit=0"))
        .is_empty());
    one_problem(
        &f.problems("GET /items/{id}", &item("12", "")),
        &["path parameter `id`", "uuid"],
    );
    // `save`: POST an Item, PUT a Patch (no other fields).
    assert!(f
        .problems("POST /items", &json(r#"{"name": "a"}"#))
        .is_empty());
    one_problem(
        &f.problems("POST /items", &json(r#"{"note": null}"#)),
        &["\"name\" is a required property"],
    );
    let put = |body: &'static str| Req {
        params: &[("id", "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10")],
        headers: JSON,
        body: body.as_bytes(),
        ..Req::default()
    };
    assert!(f
        .problems("PUT /items/{id}", &put(r#"{"note": null}"#))
        .is_empty());
    let p = f.problems("PUT /items/{id}", &put(r#"{"name": "a"}"#));
    one_problem(&p, &["name"]);
}

#[test]
fn operations_without_an_operation_id_are_checked_by_route() {
    let (_d, mut b) = load("petstore-openapi3.yaml", "");
    let doc = "openapi: 3.0.3\ninfo: {title: t, version: '1'}\npaths:\n  /n:\n    get:\n      parameters:\n        - {name: n, in: query, required: true, schema: {type: integer}}\n";
    b.doc = Arc::new(serde_yaml_ng::from_str(doc).unwrap());
    let c = compile_bundle(&b).unwrap();
    let f = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        checks: c,
        responses: HashMap::new(),
    };
    one_problem(&f.problems("GET /n", &query("n=x")), &["not an integer"]);
}

#[test]
fn formats_are_checked_unless_the_bundle_turns_them_off() {
    let f = fixture("validation-openapi3.yaml", "");
    let good = r#"{"i32": 2147483647, "i64": -9223372036854775808, "f": 1.5, "d": 1e300,
        "day": "2024-02-29", "at": "2024-02-29T12:00:00.5+01:00",
        "id": "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10", "mail": "a@example.com",
        "b64": "aGVsbG8=", "raw": "\u0000anything"}"#;
    assert!(f.problems("POST /formats", &json(good)).is_empty());
    for (field, bad, needle) in [
        ("i32", "2147483648", "int32"),
        ("i32", "-2147483649", "int32"),
        ("i64", "9223372036854775808", "int64"),
        ("f", "1e39", "float"),
        ("day", "\"2024-02-30\"", "date"),
        ("day", "\"29.02.2024\"", "date"),
        ("at", "\"2024-02-29 12:00\"", "date-time"),
        ("id", "\"6f1c1b3e8a6a4d8e9c551f0e7d3b2a10\"", "uuid"),
        ("mail", "\"not an address\"", "email"),
        ("b64", "\"not base64!\"", "byte"),
    ] {
        let body = format!("{{\"{field}\": {bad}}}");
        let p = f.problems("POST /formats", &json(&body));
        one_problem(&p, &[&format!("/{field}"), needle]);
    }
    // Parameters, after coercion from their strings.
    one_problem(
        &f.problems("GET /items", &query("limit=3000000000")),
        &["limit", "int32"],
    );
    one_problem(
        &f.problems("GET /items", &query("since=yesterday")),
        &["since", "date"],
    );
    let traced = Req {
        params: &[("id", "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10")],
        headers: &[("x-trace", "99999999999999999999")],
        ..Req::default()
    };
    let p = f.problems("GET /items/{id}", &traced);
    one_problem(&p, &["header parameter `X-Trace`"]);

    let off = fixture("validation-openapi3.yaml", "check_formats: false\n");
    for body in [
        r#"{"i32": 2147483648, "day": "2024-02-30", "id": "x", "mail": "x", "b64": "!"}"#,
        r#"{"i64": 9223372036854775808, "f": 1e39}"#,
    ] {
        assert!(
            off.problems("POST /formats", &json(body)).is_empty(),
            "{body}"
        );
    }
    assert!(off
        .problems("GET /items", &query("limit=3000000000"))
        .is_empty());
    // Types still are.
    assert_eq!(
        off.problems("POST /formats", &json(r#"{"i32": "1"}"#))
            .len(),
        1
    );
}

#[test]
fn undeclared_content_types_are_refused_415() {
    let f = fixture("validation-openapi3.yaml", "");
    let with = |ct: &'static str, body: &'static str| Req {
        headers: Box::leak(Box::new([("content-type", ct)])),
        body: body.as_bytes(),
        ..Req::default()
    };
    // text/plain and image/* are declared.
    assert_eq!(
        f.run("POST /uploads", &with("text/plain; charset=utf-8", "hi")),
        Ok(())
    );
    assert_eq!(
        f.run("POST /uploads", &with("image/png", "\u{1}PNG")),
        Ok(())
    );
    assert_eq!(f.run("POST /uploads", &with("IMAGE/webp", "x")), Ok(()));
    let why = f.unsupported("POST /uploads", &with("application/json", "{}"));
    assert!(
        why.contains("text/plain") && why.contains("image/*"),
        "{why}"
    );
    // A body without a content type, where only non-JSON types are declared.
    let bare = Req {
        body: b"hi",
        ..Req::default()
    };
    let why = f.unsupported("POST /uploads", &bare);
    assert!(why.contains("no content-type"), "{why}");
    // No body, nothing to type: a required body is a 400.
    one_problem(
        &f.problems("POST /uploads", &Req::default()),
        &["required but empty"],
    );
    // */* takes anything, with or without a content type.
    assert_eq!(
        f.run("POST /anything", &with("application/x-tar", "x")),
        Ok(())
    );
    assert_eq!(f.run("POST /anything", &bare), Ok(()));
    // A JSON-only operation: other types 415, no content type read as JSON.
    f.unsupported("POST /items", &with("text/plain", "{}"));
    one_problem(
        &f.problems(
            "POST /items",
            &Req {
                body: b"{}",
                ..Req::default()
            },
        ),
        &["name"],
    );
    // Swagger 2.0: the operation's consumes, else the document's.
    let s = fixture("validation-swagger2.yaml", "");
    s.unsupported("POST /orders", &with("text/plain", "{}"));
    let order = |ct: &'static str, body: &'static str| Req {
        params: &[("id", "7")],
        headers: Box::leak(Box::new([("content-type", ct)])),
        body: body.as_bytes(),
        ..Req::default()
    };
    s.unsupported("POST /orders/{id}", &order("application/json", "{}"));
}

#[test]
fn urlencoded_and_multipart_forms_are_checked_field_by_field() {
    let f = fixture("validation-openapi3.yaml", "");
    let form = |body: &'static str| Req {
        headers: &[("content-type", "application/x-www-form-urlencoded")],
        body: body.as_bytes(),
        ..Req::default()
    };
    assert!(f
        .problems(
            "POST /login",
            &form("user=al&remember=true&age=3&tags=a&tags=b")
        )
        .is_empty());
    for (body, needles) in [
        ("user=al&age=x", &["field `age`", "not an integer"][..]),
        ("user=al&age=-1", &["/age", "minimum"]),
        ("user=al&age=2147483648", &["/age", "int32"]),
        ("user=al&remember=maybe", &["field `remember`", "boolean"]),
        ("user=al&tags=c", &["/tags/0"]),
        ("user=al&extra=1", &["extra"]),
        ("age=1", &["\"user\" is a required property"]),
        ("user=a", &["/user"]),
    ] {
        one_problem(&f.problems("POST /login", &form(body)), needles);
    }

    let multipart = |parts: &[(&str, &str)]| -> Vec<u8> {
        let mut b = Vec::new();
        for (name, value) in parts {
            let file = if *name == "file" {
                "; filename=\"p.jpg\"\r\nContent-Type: image/jpeg"
            } else {
                ""
            };
            b.extend_from_slice(
                format!("--B0undary\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        b.extend_from_slice(b"--B0undary--\r\n");
        b
    };
    let mp = &[("content-type", "multipart/form-data; boundary=B0undary")];
    let send = |body: &[u8]| {
        f.problems(
            "POST /photos",
            &Req {
                headers: mp,
                body: Box::leak(body.to_vec().into_boxed_slice()),
                ..Req::default()
            },
        )
    };
    let ok = multipart(&[
        ("title", "cat"),
        ("count", "3"),
        ("meta", r#"{"w": 4}"#),
        ("file", "\u{ff}\u{d8}"),
    ]);
    assert!(send(&ok).is_empty(), "{:?}", send(&ok));
    one_problem(
        &send(&multipart(&[("file", "x")])),
        &["\"title\" is a required property"],
    );
    one_problem(
        &send(&multipart(&[
            ("title", "cat"),
            ("count", "11"),
            ("file", "x"),
        ])),
        &["/count", "maximum"],
    );
    one_problem(
        &send(&multipart(&[
            ("title", "cat"),
            ("meta", "{"),
            ("file", "x"),
        ])),
        &["field `meta`", "JSON object"],
    );
    one_problem(
        &send(&multipart(&[
            ("title", "cat"),
            ("meta", r#"{"w": "x"}"#),
            ("file", "x"),
        ])),
        &["/meta/w"],
    );
    one_problem(&send(b"--B0undary\r\ngarbage"), &["multipart"]);

    // Swagger 2.0 formData parameters, urlencoded or multipart.
    let s = fixture("validation-swagger2.yaml", "");
    let order = |ct: &'static str, body: &'static str| Req {
        params: &[("id", "7")],
        headers: Box::leak(Box::new([("content-type", ct)])),
        body: body.as_bytes(),
        ..Req::default()
    };
    let urlenc = "application/x-www-form-urlencoded";
    assert!(s
        .problems(
            "POST /orders/{id}",
            &order(urlenc, "qty=2&express=true&labels=a&labels=b")
        )
        .is_empty());
    one_problem(
        &s.problems("POST /orders/{id}", &order(urlenc, "qty=0")),
        &["/qty", "minimum"],
    );
    one_problem(
        &s.problems("POST /orders/{id}", &order(urlenc, "express=true")),
        &["\"qty\" is a required property"],
    );
    one_problem(
        &s.problems("POST /orders/{id}", &order(urlenc, "qty=1&express=yes")),
        &["express", "boolean"],
    );
    let body = String::from_utf8(multipart(&[("qty", "3"), ("file", "x")]))
        .unwrap()
        .replace("name=\"file\"", "name=\"receipt\"");
    let body: &'static str = Box::leak(body.into_boxed_str());
    assert!(s
        .problems(
            "POST /orders/{id}",
            &order("multipart/form-data; boundary=B0undary", body)
        )
        .is_empty());
}

#[test]
fn read_only_properties_are_refused_in_requests() {
    let f = fixture("validation-openapi3.yaml", "");
    let p = f.problems(
        "POST /items",
        &json(r#"{"id": "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10", "name": "a"}"#),
    );
    one_problem(&p, &["/id", "read-only"]);
    // Required, but only in answers; writeOnly only matters in answers.
    assert!(f
        .problems("POST /items", &json(r#"{"name": "a", "secret": "s"}"#))
        .is_empty());
    let s = fixture("validation-swagger2.yaml", "");
    one_problem(
        &s.problems("POST /orders", &json(r#"{"id": 1, "qty": 1}"#)),
        &["/id", "read-only"],
    );
    assert!(s
        .problems("POST /orders", &json(r#"{"qty": 1, "note": null}"#))
        .is_empty());
}

#[test]
fn openapi31_schemas_are_json_schema_2020_12() {
    let f = fixture("validation-openapi31.yaml", "");
    let person = |q: &'static str, body: &'static str| Req {
        query: q,
        headers: JSON,
        body: body.as_bytes(),
        ..Req::default()
    };
    let ok = r#"{"name": null, "kind": "person", "age": 3, "password": "p", "friends": ["b"]}"#;
    assert!(f.problems("POST /people", &person("page=2", ok)).is_empty());
    one_problem(
        &f.problems("POST /people", &person("page=0", ok)),
        &["query parameter `page`", "minimum of 0"],
    );
    for (body, needle) in [
        (r#"{"name": 3, "kind": "person"}"#, "/name"),
        (r#"{"name": "a", "kind": "robot"}"#, "/kind"),
        (r#"{"name": "a", "kind": "person", "age": 0}"#, "/age"),
        (
            r#"{"name": "a", "kind": "person", "age": 3000000000}"#,
            "int32",
        ),
        (
            r#"{"name": "a", "kind": "person", "friends": [""]}"#,
            "/friends/0",
        ),
        (
            r#"{"id": "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10", "name": "a", "kind": "person"}"#,
            "read-only",
        ),
        (r#"{"name": "a"}"#, "\"kind\" is a required property"),
    ] {
        one_problem(&f.problems("POST /people", &person("", body)), &[needle]);
    }
    // uuid is 2020-12's own format.
    let answer = |body: &str| f.answer("POST /people", 200, "application/json", body);
    one_problem(
        &answer(r#"{"id": "nope", "name": "a", "kind": "person"}"#),
        &["/id", "uuid"],
    );
    // writeOnly values must not be answered; readOnly ones are required there.
    one_problem(
        &answer(
            r#"{"id": "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10", "name": "a", "kind": "person", "password": "p"}"#,
        ),
        &["/password", "write-only"],
    );
    one_problem(
        &answer(r#"{"name": "a", "kind": "person"}"#),
        &["\"id\" is a required property"],
    );
}

#[test]
fn unknown_json_schema_dialects_are_named() {
    let (_d, mut b) = load("validation-openapi31.yaml", "");
    let mut doc = (*b.doc).clone();
    doc["jsonSchemaDialect"] = "https://example.com/my-dialect".into();
    b.doc = Arc::new(doc);
    let err = compile_bundle(&b).unwrap_err().to_string();
    assert!(
        err.contains("jsonSchemaDialect") && err.contains("my-dialect"),
        "{err}"
    );
}

#[test]
fn answers_are_compared_with_the_documented_responses() {
    let f = fixture("validation-openapi3.yaml", "");
    let id = "6f1c1b3e-8a6a-4d8e-9c55-1f0e7d3b2a10";
    let item = format!(r#"{{"id": "{id}", "name": "a"}}"#);
    let json = "application/json; charset=utf-8";
    assert!(f
        .answer("GET /items", 200, json, &format!("[{item}]"))
        .is_empty());
    // readOnly values are required in answers; writeOnly ones refused.
    one_problem(
        &f.answer("GET /items", 200, json, r#"[{"name": "a"}]"#),
        &["/0", "\"id\" is a required property"],
    );
    one_problem(
        &f.answer(
            "GET /items/{id}",
            200,
            json,
            &format!(r#"{{"id": "{id}", "name": "a", "secret": "s"}}"#),
        ),
        &["/secret", "write-only"],
    );
    // Status codes: explicit, 4XX ranges, default.
    one_problem(
        &f.answer("GET /items", 500, json, r#"{"error": "x"}"#),
        &["status 500 is not documented", "200, 4XX"],
    );
    assert!(f
        .answer("GET /items", 404, json, r#"{"error": "x"}"#)
        .is_empty());
    one_problem(
        &f.answer("GET /items", 409, json, "{}"),
        &["\"error\" is a required property"],
    );
    assert!(f
        .answer("POST /items", 503, json, r#"{"error": "x"}"#)
        .is_empty());
    one_problem(&f.answer("GET /items/{id}", 500, "", ""), &["status 500"]);
    // Content types and bodies.
    one_problem(
        &f.answer("GET /items", 200, "text/plain", "hi"),
        &["\"text/plain\" is not documented for status 200"],
    );
    one_problem(&f.answer("GET /items", 200, "", "hi"), &["no content-type"]);
    // A response without content leaves the body undescribed.
    assert!(f
        .answer("GET /items/{id}", 404, "text/plain", "no such item")
        .is_empty());
    one_problem(
        &f.answer("GET /items", 200, json, "[oops"),
        &["not valid JSON"],
    );

    // Swagger 2.0: a response `schema` with the operation's produces.
    let s = fixture("validation-swagger2.yaml", "");
    assert!(s
        .answer(
            "POST /orders",
            200,
            "application/json",
            r#"{"id": 1, "qty": 2}"#
        )
        .is_empty());
    one_problem(
        &s.answer("POST /orders", 200, "application/json", r#"{"id": 1}"#),
        &["qty"],
    );
    one_problem(
        &s.answer("POST /orders", 200, "text/plain", "bad"),
        &["\"text/plain\" is not documented", "application/json"],
    );
}

/// Every fixture route, for the property test.
fn every_route() -> &'static [(Fixture, Vec<String>)] {
    static ALL: std::sync::OnceLock<Vec<(Fixture, Vec<String>)>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        [
            "validation-openapi3.yaml",
            "validation-openapi31.yaml",
            "validation-swagger2.yaml",
            "petstore-swagger2.yaml",
            "petstore-openapi3.yaml",
        ]
        .iter()
        .map(|f| {
            let fx = fixture(f, "");
            let mut routes: Vec<String> = fx
                .checks
                .keys()
                .chain(fx.responses.keys())
                .cloned()
                .collect();
            routes.sort();
            routes.dedup();
            (fx, routes)
        })
        .collect()
    })
}

fn content_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("application/json".to_owned()),
        Just("application/x-www-form-urlencoded".to_owned()),
        Just("multipart/form-data; boundary=B".to_owned()),
        Just("multipart/form-data".to_owned()),
        Just("text/plain".to_owned()),
        "[ -~]{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// Whatever a client sends, and whatever a Func answers, the checks
    /// give a verdict, never a panic.
    #[test]
    fn random_requests_and_answers_never_panic_the_checks(
        which in any::<usize>(),
        route in any::<usize>(),
        param in "\\PC{0,20}",
        query in "[ -~]{0,60}",
        ct in content_type(),
        header in "\\PC{0,20}",
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "\\PC{0,200}".prop_map(String::into_bytes),
            "(--B\r\nContent-Disposition: form-data; name=\"[a-z]{1,5}\"\r\n\r\n[ -~]{0,10}\r\n){0,4}(--B--\r\n)?".prop_map(String::into_bytes),
            "([a-z]{1,6}=[ -~&&[^&]]{0,8}&){0,6}".prop_map(String::into_bytes),
        ],
        status in 100u16..600,
    ) {
        let all = every_route();
        let (f, routes) = &all[which % all.len()];
        let key = &routes[route % routes.len()];
        let params: Vec<(String, String)> = ["id", "petId", "orderId", "username"]
            .iter()
            .map(|k| (k.to_string(), param.clone()))
            .collect();
        let headers = [("content-type", ct.as_str()), ("x-trace", header.as_str()), ("api_key", header.as_str())];
        if let Some(c) = f.checks.get(key) {
            let _ = c.check(&Input { params: &params, query: &query, headers: &headers, body: &body });
        }
        if let Some(r) = f.responses.get(key) {
            let _ = r.check(&Answer { status, headers: &headers, body: &body });
        }
    }
}

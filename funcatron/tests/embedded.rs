//! End to end on the embedded broker, all roles in this process: the path a
//! developer gets from `funcatron up`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use funcatron_broker::{AnyBroker, Broker, EmbeddedBroker, Message};
use funcatron_control::names;
use funcatron_ingress::IngressOptions;
use serde_json::Value;

fn embedded() -> AnyBroker {
    AnyBroker::Embedded(EmbeddedBroker::new(10_000))
}

async fn cluster(ingress: IngressOptions) -> (InProcess, tempfile::TempDir) {
    let dir = bundles_with_trouble();
    let c = start_in_process(embedded(), load(dir.path()), ingress).await;
    (c, dir)
}

#[tokio::test]
async fn hello_and_petshop_answer_through_the_whole_path() {
    let (c, _d) = cluster(IngressOptions::default()).await;
    let http = reqwest::Client::new();

    let r = http
        .get(format!("{}/hello/world", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "a generated id is returned");
    let timing = r.headers()["server-timing"].to_str().unwrap().to_owned();
    assert!(
        timing.starts_with("dispatch;dur=")
            && timing.contains(", queue;dur=")
            && timing.contains("exec;dur=")
            && timing.contains("total;dur="),
        "{timing}"
    );
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "Hello, world!");

    // Path parameters are percent-decoded.
    let r = http
        .get(format!("{}/hello/J%C3%BCrgen", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, Jürgen!");

    // Query parameters, JSON out, Func-set headers.
    let r = http
        .get(format!("{}/petshop/pets?tag=dog&limit=5", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-total-count"], "2");
    let pets: Value = r.json().await.unwrap();
    let names: Vec<&str> = pets
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Rex", "Fido"]);

    // JSON in, 201 out with a Location header.
    let r = http
        .post(format!("{}/petshop/pets", c.base))
        .json(&serde_json::json!({"name": "Bo", "tag": "cat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], "/petshop/pets/5");
    let pet: Value = r.json().await.unwrap();
    assert_eq!(pet["name"], "Bo");

    // The Func's own 400 and 404.
    let r = http
        .post(format!("{}/petshop/pets", c.base))
        .json(&serde_json::json!({"tag": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/petshop/pets/99", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "no pet 99");

    // Invalid JSON with a JSON content type is refused before the Func runs.
    let r = http
        .post(format!("{}/petshop/pets", c.base))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v = r.json::<Value>().await.unwrap();
    assert_eq!(v["error"], "validation_failed");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{v}"
    );
}

#[tokio::test]
async fn request_ids_repeated_headers_and_query_reach_the_func() {
    let (c, _d) = cluster(IngressOptions::default()).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/petshop/inspect?a=1&a=2&b=x%20y", c.base))
        .header("x-request-id", "client-chosen-42")
        .header("x-tag", "one")
        .header("x-tag", "two")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-42");
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["id"], "client-chosen-42");
    assert_eq!(seen["headers"]["x-tag"], "one, two");
    assert_eq!(seen["query"]["a"], serde_json::json!(["1", "2"]));
    assert_eq!(seen["query"]["b"], "x y");
    assert_eq!(seen["path"], "/petshop/inspect");

    // An id that is not sane is replaced, and the replacement returned.
    let r = http
        .get(format!("{}/petshop/inspect", c.base))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "bad id with spaces");
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id);
}

#[tokio::test]
async fn binary_and_large_bodies_round_trip_byte_exact() {
    let (c, _d) = cluster(IngressOptions::default()).await;
    let http = reqwest::Client::new();
    let binary: Vec<u8> = (0..=255u8).cycle().take(3 * 1024 * 1024 + 7).collect();
    let r = http
        .post(format!("{}/petshop/echo", c.base))
        .header("content-type", "application/octet-stream")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap().as_ref(), binary.as_slice());

    let text = "héllo wörld\n".repeat(100_000);
    let r = http
        .post(format!("{}/petshop/echo", c.base))
        .header("content-type", "text/plain")
        .body(text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), text);
}

#[tokio::test]
async fn platform_errors_are_json_with_reasons() {
    let opts = IngressOptions {
        max_body_bytes: 1024,
        ..IngressOptions::default()
    };
    let (c, _d) = cluster(opts).await;
    let http = reqwest::Client::new();

    let r = http
        .get(format!("{}/nowhere", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["request_id"], id);

    let r = http
        .delete(format!("{}/petshop/pets/1", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );

    // Too large, declared up front and streamed without a length.
    let r = http
        .post(format!("{}/petshop/echo", c.base))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![b'y'; 512])).collect();
    let stream = futures::stream::iter(chunks);
    let r = http
        .post(format!("{}/petshop/echo", c.base))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

#[tokio::test]
async fn misbehaving_funcs_get_clear_errors_and_others_keep_serving() {
    let (c, _d) = cluster(IngressOptions::default()).await;
    let http = reqwest::Client::new();
    let get = |p: &str| http.get(format!("{}/trouble/{p}", c.base)).send();

    let r = get("loop").await.unwrap();
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "func_timeout");
    assert!(
        body["message"].as_str().unwrap().contains("300 ms"),
        "{body}"
    );

    let r = get("eat").await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "func_out_of_memory"
    );

    // The error's text (and its file and line) stays in the Func's log.
    let r = get("raise").await.unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "func_error");
    assert!(
        hides_detail(&body, &["the handler gave up", "main.lua"]),
        "{body}"
    );

    // Framing and hop-by-hop headers are the ingress's, whatever their
    // case in the Func's answer; a 1xx/101 answer is refused.
    let r = get("hop").await.unwrap();
    assert_eq!(r.status(), 200);
    for h in [
        "connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
    ] {
        assert!(
            r.headers().get(h).is_none(),
            "{h} passed: {:?}",
            r.headers()
        );
    }
    assert_eq!(r.headers()["x-kept"], "yes");
    assert_eq!(r.headers()["content-length"], "5");
    assert_eq!(r.text().await.unwrap(), "short");
    let r = get("switch").await.unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "malformed_reply", "{body}");

    // The same Lua states keep serving afterwards.
    for _ in 0..4 {
        let r = get("ok").await.unwrap();
        assert_eq!(r.text().await.unwrap(), "still fine");
    }
    let r = http
        .get(format!("{}/hello/after", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, after!");
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let (c, _d) = cluster(IngressOptions::default()).await;
    each_request_gets_its_own_answer(std::slice::from_ref(&c.base), 300).await;
}

#[tokio::test]
async fn garbage_and_foreign_versions_are_dead_lettered_while_good_requests_succeed() {
    let (c, _d) = cluster(IngressOptions::default()).await;
    for junk in [
        &b"\x00\xffnot json at all"[..],
        br#"{"version":"2.0","id":"x","whatever":1}"#,
        b"[1,2,3]",
    ] {
        c.broker
            .publish(names::REQUESTS, Message::new(junk.to_vec()))
            .await
            .unwrap();
    }
    let r = reqwest::get(format!("{}/hello/still", c.base))
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, still!");

    let reasons = dead_letter_reasons(&c.broker, 3).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unsupported envelope version \"2.0\"")),
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| r.contains("malformed")).count(),
        2,
        "{reasons:?}"
    );
}

#[tokio::test]
async fn no_runner_means_504_at_the_deadline_not_a_hang() {
    let dir = bundles_with_trouble();
    let opts = IngressOptions {
        timeout: Duration::from_millis(400),
        ..IngressOptions::default()
    };
    let c = spawn_in_process(embedded(), load(dir.path()), opts, false).await;
    // Routing works without a Runner: a 404 proves the Tron is up.
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{}/nowhere", c.base)).await {
            if r.status() == 404 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready);
    let started = Instant::now();
    let r = reqwest::get(format!("{}/hello/x", c.base)).await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn exec_funcs_get_stdin_env_and_limits() {
    // `trouble-exec` is enabled with `debug`: its failures are answered
    // with the end of the process's stderr (`trouble`'s are not, see
    // `misbehaving_funcs_get_clear_errors_and_others_keep_serving`).
    let dir = bundles_with_trouble();
    let bundles = with_debug(load(dir.path()), &["trouble-exec"]);
    let c = start_in_process(embedded(), bundles, IngressOptions::default()).await;
    let http = reqwest::Client::new();
    // Byte-exact both ways, no newline added.
    let binary: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let r = http
        .post(format!("{}/shell/echo", c.base))
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.unwrap().as_ref(), binary.as_slice());
    let r = http
        .post(format!("{}/shell/echo", c.base))
        .body("no newline")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "no newline");
    // The request in OpenFaaS-style environment variables.
    let r = http
        .get(format!("{}/shell/whoami/ann%20b?x=1", c.base))
        .header("x-agent", "007")
        // Headers that would map onto the request variables do not.
        .header("method", "DELETE")
        .header("path", "/elsewhere")
        .header("query", "admin=1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "method=GET path=/shell/whoami/ann%20b query=x=1 name=ann b agent=007\n"
    );
    // Limits and failures.
    let started = Instant::now();
    let r = http
        .get(format!("{}/trouble-exec/sleep", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "func_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "killed at its limit, not after `sleep 5`"
    );
    // The shell's child went with it (the whole process group is killed).
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let alive = std::process::Command::new("pgrep")
            .args(["-f", "sleep 5.123"])
            .status()
            .unwrap()
            .success();
        if !alive {
            break;
        }
        assert!(
            Instant::now() < until,
            "the Func's child process outlived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = http
        .get(format!("{}/trouble-exec/fail", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "func_error");
    assert!(
        body["message"].as_str().unwrap().contains("disk on fire"),
        "{body}"
    );
    // A 200 MiB buffer does not fit under the bundle's 64 MiB limit; 8 MiB does.
    let r = http
        .get(format!("{}/trouble-exec/hog", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("memory exhausted"),
        "{body}"
    );
    let r = http
        .get(format!("{}/trouble-exec/small", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "fits\n");
}

/// A bundle whose operations take forms and JSON only, for the refusals
/// the Runner answers before a Func runs.
const FORMS_DOC: &str = r#"openapi: 3.0.3
info: {title: forms, version: "1"}
servers: [{url: /forms}]
x-funcatron: {runtime: lua}
paths:
  /login:
    post:
      operationId: login
      requestBody:
        content:
          application/x-www-form-urlencoded:
            schema:
              type: object
              required: [user]
              properties:
                user: {type: string}
                age: {type: integer, format: int32, minimum: 0}
      responses: {"200": {description: welcome}}
  /photos:
    post:
      operationId: photo
      requestBody:
        content:
          multipart/form-data:
            schema:
              type: object
              required: [title]
              properties:
                title: {type: string, maxLength: 10}
      responses: {"200": {description: stored}}
"#;

#[tokio::test]
async fn undeclared_content_types_and_bad_forms_are_refused_as_json() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    write_bundle(
        root.path(),
        "forms",
        &[
            ("openapi.yaml", FORMS_DOC),
            (
                "main.lua",
                "return { login = function(r) return 'hi ' .. r.body end, photo = function() return 'stored' end }",
            ),
        ],
    );
    let c = start_in_process(embedded(), load(root.path()), IngressOptions::default()).await;
    let http = reqwest::Client::new();
    let login = format!("{}/forms/login", c.base);
    let form = "application/x-www-form-urlencoded";

    let r = http
        .post(&login)
        .header("content-type", form)
        .body("user=al&age=3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hi user=al&age=3");

    // A content type the operation does not declare: 415, as JSON.
    let r = http
        .post(&login)
        .header("content-type", "application/json")
        .body(r#"{"user": "al"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unsupported_media_type", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("application/x-www-form-urlencoded"),
        "{v}"
    );
    assert_eq!(v["request_id"].as_str().unwrap().len(), 32, "{v}");

    // A form whose fields do not match: 400 with the problems, as JSON.
    let r = http
        .post(&login)
        .header("content-type", form)
        .body("age=-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "validation_failed", "{v}");
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("\\\"user\\\" is a required property") && problems.contains("/age"),
        "{v}"
    );

    let photo = |title: &str| {
        format!("--b\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n{title}\r\n--b--\r\n")
    };
    let send = |body: String| {
        http.post(format!("{}/forms/photos", c.base))
            .header("content-type", "multipart/form-data; boundary=b")
            .body(body)
            .send()
    };
    assert_eq!(send(photo("cat")).await.unwrap().status(), 200);
    let r = send(photo("a title far too long")).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["problems"].to_string().contains("/title"), "{v}");
}

/// Bundles from the OpenAPI fixtures in `swagger-examples/`: `events`
/// (OpenAPI 3.1, two servers, webhooks), `handlers` (operations without
/// operationIds), `multi-file` (external `$ref`s), and `hello`.
fn openapi_bundles() -> tempfile::TempDir {
    fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            let to = dst.join(p.file_name().unwrap());
            if p.is_dir() {
                copy_dir(&p, &to);
            } else {
                std::fs::copy(&p, to).unwrap();
            }
        }
    }
    let examples = repo().join("swagger-examples");
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    copy_dir(
        &examples.join("multi-file"),
        &root.path().join("multi-file"),
    );
    let doc = |f: &str| std::fs::read_to_string(examples.join(f)).unwrap();
    write_bundle(
        root.path(),
        "events",
        &[
            ("openapi.yaml", &doc("openapi31-webhooks.yaml")),
            ("funcatron.yaml", "runtime: lua\n"),
            (
                "main.lua",
                "return {\n  listPets = function(req) return {{name = 'Rex'}} end,\n  addPet = function(req) return {status = 201, body = req.json} end,\n  showPetById = function(req) return {id = tonumber(req.params.petId), name = 'Rex'} end,\n}\n",
            ),
        ],
    );
    write_bundle(
        root.path(),
        "handlers",
        &[
            ("swagger.yaml", &doc("no-operation-ids.yaml")),
            ("funcatron.yaml", "runtime: lua\n"),
            (
                "main.lua",
                "local function op(req) return req.operation end\nreturn {get_root = op, get_pets_petId = op, delete_pets_petId = op, put_pets_petId_photo_jpg = op, shared = op}\n",
            ),
        ],
    );
    root
}

#[tokio::test]
async fn an_openapi31_bundle_answers_on_both_servers_and_external_refs_validate() {
    let dir = openapi_bundles();
    let c = start_in_process(embedded(), load(dir.path()), IngressOptions::default()).await;
    let http = reqwest::Client::new();
    let get = |host: &'static str, path: &str| {
        http.get(format!("{}{path}", c.base))
            .header("host", host)
            .send()
    };
    for (host, base) in [
        ("pets.example.com", "/api"),
        ("localhost:8080", "/events/v1"),
        ("localhost:8080", "/events/v2"),
    ] {
        let r = get(host, &format!("{base}/pets/3")).await.unwrap();
        assert_eq!(r.status(), 200, "{host}{base}");
        let pet: Value = r.json().await.unwrap();
        assert_eq!(pet["id"], 3);
        let r = get(host, &format!("{base}/pets")).await.unwrap();
        assert_eq!(r.json::<Value>().await.unwrap()[0]["name"], "Rex");
    }
    for (host, path) in [
        ("other.example.com", "/api/pets"),
        ("localhost:8080", "/events/v3/pets"),
        ("pets.example.com", "/events/v1/pets"),
    ] {
        assert_eq!(get(host, path).await.unwrap().status(), 404, "{host}{path}");
    }
    // The request body's schema ($ref with a 3.1 sibling) is checked.
    let r = http
        .post(format!("{}/api/pets", c.base))
        .header("host", "pets.example.com")
        .json(&serde_json::json!({"tag": "no name"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Default handler names and a shared operationId reach their handlers.
    for (method, path, op) in [
        (reqwest::Method::GET, "/h/pets/1", "get_pets_petId"),
        (reqwest::Method::DELETE, "/h/pets/1", "delete_pets_petId"),
        (reqwest::Method::POST, "/h/b", "shared"),
    ] {
        let r = http
            .request(method, format!("{}{path}", c.base))
            .header("host", "handlers.example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), op);
    }

    // A document split over files: its schemas (in other files) validate.
    let multi = |m: reqwest::Method, path: &str| http.request(m, format!("{}/multi{path}", c.base));
    let r = multi(reqwest::Method::GET, "/tree").send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["children"][0]["value"], 2);
    let r = multi(reqwest::Method::PUT, "/tree")
        .json(&serde_json::json!({"value": 1, "children": [{"value": "two"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a recursive schema from another file");
    let r = multi(reqwest::Method::PUT, "/tree")
        .json(&serde_json::json!({"value": 1, "children": [{"value": 2, "children": []}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = multi(reqwest::Method::POST, "/pets")
        .json(&serde_json::json!({"name": "Bo", "tag": "much too long a tag"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a local $ref inside a referenced file");
    let r = multi(reqwest::Method::GET, "/pets?limit=1000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a parameter from common.yaml");
    let r = multi(reqwest::Method::GET, "/pets?limit=10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_tron_sends_the_routed_operation_and_its_key() {
    use funcatron_broker::{ConsumeOptions, QueueKind};
    use funcatron_control::headers;
    let dir = openapi_bundles();
    let bundles = load(dir.path());
    let queue = |name: &str| {
        let b = bundles.iter().find(|b| b.name == name).unwrap();
        names::func_queue(&b.name, &b.version)
    };
    let (events, handlers) = (queue("events"), queue("handlers"));
    let opts = IngressOptions {
        timeout: Duration::from_millis(500),
        ..IngressOptions::default()
    };
    let c = spawn_in_process(embedded(), bundles, opts, false).await;
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{}/nowhere", c.base)).await {
            if r.status() == 404 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready);
    for (host, path, queue, op, route, params) in [
        (
            "localhost:8080",
            "/events/v2/pets/5",
            &events,
            "showPetById",
            "GET /pets/{petId}",
            Some(r#"{"petId":"5"}"#),
        ),
        (
            "handlers.example.com",
            "/h/pets/9/photo.jpg",
            &handlers,
            "put_pets_petId_photo_jpg",
            "PUT /pets/{petId}/photo.jpg",
            Some(r#"{"petId":"9"}"#),
        ),
        (
            "handlers.example.com",
            "/h/",
            &handlers,
            "get_root",
            "GET /",
            None,
        ),
    ] {
        let mut sub = c
            .broker
            .consume(
                queue,
                QueueKind::Work,
                ConsumeOptions {
                    prefetch: 1,
                    auto_ack: false,
                },
            )
            .await
            .unwrap();
        let method = route.split(' ').next().unwrap().parse().unwrap();
        let req = reqwest::Client::new()
            .request(method, format!("{}{path}", c.base))
            .header("host", host)
            .send();
        // Nobody answers: the ingress gives up at its deadline.
        let pending = tokio::spawn(req);
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a forwarded request")
            .unwrap();
        assert_eq!(d.message.header(headers::OPERATION), Some(op));
        assert_eq!(d.message.header(headers::ROUTE), Some(route));
        assert_eq!(d.message.header(headers::PATH_PARAMS), params);
        d.ack().await.unwrap();
        drop(sub);
        assert_eq!(pending.await.unwrap().unwrap().status(), 504);
    }
}

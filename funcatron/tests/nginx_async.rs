//! Asynchronous calls through the production ingress: real nginx with the
//! Lua module hands each async request to a real Tron (with a state
//! store) that records and queues it on a real RabbitMQ, and proxies the
//! clients' status reads to it; a real Runner runs the calls.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;

const TOKEN: &str = "nginx-async-admin-token-77";

/// The state store: PostgreSQL when `FUNCATRON_TEST_POSTGRES` names one,
/// else an embedded file in `dir`.
fn state_store(dir: &std::path::Path) -> String {
    std::env::var("FUNCATRON_TEST_POSTGRES")
        .unwrap_or_else(|_| dir.join("records.redb").display().to_string())
}

struct Accepted {
    call_id: String,
    location: String,
    secret: Option<String>,
    body: Value,
}

/// GET `path` (hello answers GET) with `headers`.
async fn call(base: &str, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(format!("{base}{path}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

async fn submit(base: &str, path: &str, headers: &[(&str, &str)]) -> Accepted {
    let r = call(base, path, headers).await;
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let text = r.text().await.unwrap();
    assert_eq!(status, 202, "{path} {headers:?}: {text}");
    assert_eq!(h["content-type"], "application/json");
    let body: Value = serde_json::from_str(&text).unwrap();
    let a = Accepted {
        call_id: h["x-call-id"].to_str().unwrap().to_owned(),
        location: h["location"].to_str().unwrap().to_owned(),
        secret: h
            .get("x-call-secret")
            .map(|v| v.to_str().unwrap().to_owned()),
        body,
    };
    assert_eq!(a.body["call_id"], a.call_id.as_str());
    assert_eq!(a.body["status_url"], a.location.as_str());
    assert_eq!(a.location, format!("/_funcatron/calls/{}", a.call_id));
    assert_eq!(a.body["secret"].as_str(), a.secret.as_deref());
    assert_eq!(
        a.body["request_id"].as_str(),
        h.get("x-request-id").map(|v| v.to_str().unwrap())
    );
    a
}

async fn status(base: &str, a: &Accepted, secret: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("{base}{}", a.location));
    if let Some(s) = secret {
        r = r.header("x-call-secret", s);
    }
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// An async call (`how`: `respond-async` or `no-result`) with a callback
/// URL that is not http(s): 400 `bad_callback_url` with its request id.
async fn bad_callback_url(base: &str, how: &str) {
    let form = if how == "no-result" {
        ("x-funcatron-async", how)
    } else {
        ("prefer", how)
    };
    let headers = [
        form,
        ("x-callback-url", "ftp://x/y"),
        ("x-request-id", "bad-cb"),
    ];
    let r = call(base, "/hello/world", &headers).await;
    assert_eq!(r.status(), 400, "{how}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_callback_url", "{how}");
    assert_eq!(v["request_id"], "bad-cb", "{how}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_calls_through_nginx_are_queued_by_a_tron() {
    let root = tempfile::tempdir().unwrap();
    let broker = fresh_vhost();
    let bundles = bundles_with_trouble();
    // A Func whose side effect the test sees: it POSTs its request id to
    // the test's receiver.
    let hook = free_addr();
    let (mut got, _receiver) = receiver(hook).await;
    write_bundle(
        bundles.path(),
        "mark",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /mark\nx-funcatron: {runtime: exec, timeout_ms: 5000}\npaths:\n  /it:\n    get: {operationId: it}\n",
            ),
            (
                "fn.sh",
                &format!("curl -s -X POST --data \"ran $FUNCATRON_REQUEST_ID\" http://{hook}/hook\n"),
            ),
        ],
    );
    // Funcs whose policy refuses calls: the Tron applies it for nginx.
    for (name, policy) in [("full", "max_queued: 0"), ("only", "async_only: true")] {
        write_bundle(
            bundles.path(),
            name,
            &[
                (
                    "swagger.yaml",
                    &format!("swagger: '2.0'\nbasePath: /{name}\nx-funcatron: {{runtime: lua, async: {{{policy}}}}}\npaths:\n  /x:\n    get: {{operationId: x}}\n"),
                ),
                ("main.lua", "return { x = function() return 'ran' end }"),
            ],
        );
    }
    let dir = bundles.path().to_str().unwrap().to_owned();
    let mgmt = free_addr().to_string();
    let store = root.path().join("store");
    let records = state_store(root.path());
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
    let _runner = spawn("runner", &broker, &["--bundles", &dir, "--workers", "2"]);
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
    eventually("the Func answers through nginx", || async {
        text(&format!("{base}/hello/world")).await.0 == 200
    })
    .await;
    eventually("the Tron's management API is up", || async {
        text(&format!("{tron_url}/v1/health")).await.0 == 200
    })
    .await;

    // Admission, applied by the Tron: a Func with no room answers 429
    // with Retry-After, an async-only one wants a callback.
    let r = call(&base, "/full/x", &[("prefer", "respond-async")]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "queue_full", "{v}");
    let r = call(&base, "/async-function/only/x", &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "callback_required", "{v}");

    let forms: [(&str, &[(&str, &str)]); 5] = [
        ("/hello/world", &[("prefer", "respond-async")]),
        ("/hello/world", &[("x-funcatron-async", "true")]),
        ("/hello/world", &[("x-tinyfaas-async", "true")]),
        ("/async-function/hello/world", &[]),
        (
            "/hello/world",
            &[
                ("prefer", "wait=1, respond-async"),
                ("x-request-id", "mine-1"),
            ],
        ),
    ];
    let mut accepted = Vec::new();
    for (path, headers) in forms {
        let a = submit(&base, path, headers).await;
        assert!(
            a.secret.is_some(),
            "{path} {headers:?}: a new call has a secret"
        );
        accepted.push(a);
    }
    assert_eq!(accepted[4].body["request_id"], "mine-1");
    for a in &accepted {
        let secret = a.secret.as_deref();
        eventually("the call succeeds", || async {
            status(&base, a, secret).await.1["state"] == "succeeded"
        })
        .await;
        let (s, open) = status(&base, a, secret).await;
        assert_eq!(s, 200);
        assert_eq!(open["id"], a.call_id.as_str());
        assert_eq!(open["result"]["status"], 200, "{open}");
        // Without the secret (or with a wrong one): where it is, not its answer.
        for wrong in [None, Some("not-the-secret")] {
            let (s, shut) = status(&base, a, wrong).await;
            assert_eq!(s, 200);
            assert_eq!(shut["state"], "succeeded");
            assert!(shut.get("result").is_none(), "{shut}");
        }
    }

    // A repeated idempotency key names the first call.
    let key = [("prefer", "respond-async"), ("idempotency-key", "k-42")];
    let first = submit(&base, "/hello/world", &key).await;
    let again = submit(&base, "/hello/world", &key).await;
    assert_eq!(again.call_id, first.call_id);
    assert!(again.secret.is_none());
    eventually("the first call succeeds", || async {
        status(&base, &first, None).await.1["state"] == "succeeded"
    })
    .await;

    // Fire-and-forget: 202 and an id, no secret, no record (nginx
    // publishes it without the Tron).
    let ff = submit(
        &base,
        "/mark/it",
        &[("x-funcatron-async", "no-result"), ("x-request-id", "ff-1")],
    )
    .await;
    assert!(ff.secret.is_none());
    let (s, v) = status(&base, &ff, None).await;
    assert_eq!((s, v["error"].as_str()), (404, Some("unknown_call")));
    let ran = tokio::time::timeout(std::time::Duration::from_secs(30), got.recv())
        .await
        .expect("the fire-and-forget call ran")
        .unwrap();
    assert_eq!(ran.body, "ran ff-1");

    // A callback URL travels with the call: the Tron POSTs the result.
    let cb = format!("http://{hook}/hook");
    let a = submit(
        &base,
        "/hello/world",
        &[("prefer", "respond-async"), ("x-callback-url", &cb)],
    )
    .await;
    let delivered = tokio::time::timeout(std::time::Duration::from_secs(30), got.recv())
        .await
        .expect("the callback arrived")
        .unwrap();
    assert_eq!(delivered.headers["x-call-id"], a.call_id.as_str());

    // Bad input: the embedded ingress's JSON errors.
    bad_callback_url(&base, "respond-async").await;

    // The ingress's token stays between nginx and the Tron.
    let r = reqwest::Client::new()
        .get(format!("{base}/_funcatron/tron/submit"))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tron_nginx_refuses_recorded_async_calls() {
    let p = start_processes(1, 1, 0, &[]).await;
    let nginx = start_nginx(&p.broker, &[]).await;
    let base = nginx.base.clone();
    eventually("the Func answers through nginx", || async {
        text(&format!("{base}/hello/world")).await.0 == 200
    })
    .await;
    for (path, headers) in [
        ("/hello/world", &[("prefer", "respond-async")][..]),
        ("/async-function/hello/world", &[][..]),
    ] {
        let r = call(&base, path, headers).await;
        assert_eq!(r.status(), 501, "{path} {headers:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "async_unavailable");
    }
    let (s, body) = text(&format!("{base}/_funcatron/calls/cnope")).await;
    assert_eq!(s, 501, "{body}");
    // Fire-and-forget needs no record: nginx publishes it itself.
    let ff = submit(&base, "/hello/world", &[("x-funcatron-async", "no-result")]).await;
    assert!(ff.secret.is_none());
    bad_callback_url(&base, "no-result").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tron_that_cannot_be_reached_is_a_503() {
    let p = start_processes(1, 1, 0, &[]).await;
    let root = tempfile::tempdir().unwrap();
    let token_file = root.path().join("tron-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let nowhere = format!("http://{}", free_addr());
    let nginx = start_nginx(
        &p.broker,
        &[
            "--tron-url",
            &nowhere,
            "--tron-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let r = call(
        &nginx.base,
        "/hello/world",
        &[("prefer", "respond-async"), ("x-request-id", "no-tron")],
    )
    .await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "tron_unavailable");
    assert_eq!(v["request_id"], "no-tron");
}

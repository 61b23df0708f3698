//! Python, Node.js and Java Funcs in worker processes, tinyFaaS and
//! OpenFaaS-classic folders, request validation, env and secrets: end to end
//! on the embedded broker and on RabbitMQ with separate processes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_ingress::IngressOptions;
use funcatron_runner::RunnerOptions;
use serde_json::{json, Value};

const DEMOS: &[(&str, &str, &str)] = &[
    ("python-demo", "py", "python"),
    ("node-demo", "js", "nodejs"),
    ("java-demo", "java", "java"),
];

/// The demo bundles (with a secret declared on top, as a deployer would) and
/// the secrets directory that supplies it.
fn demo_bundles() -> (tempfile::TempDir, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    copy_examples(
        root.path(),
        &[
            "hello",
            "python-demo",
            "node-demo",
            "java-demo",
            "tinyfaas-python",
            "tinyfaas-node",
            "openfaas-classic",
        ],
    );
    for (name, _, _) in DEMOS {
        std::fs::write(
            root.path().join(name).join("funcatron.yaml"),
            "secrets: [API_TOKEN]\n",
        )
        .unwrap();
    }
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("API_TOKEN"), "s3cret\n").unwrap();
    std::fs::create_dir_all(secrets.path().join("java-demo")).unwrap();
    std::fs::write(secrets.path().join("java-demo/API_TOKEN"), "java-only").unwrap();
    (root, secrets)
}

fn runner_options(secrets: &Path) -> RunnerOptions {
    let mut o = RunnerOptions {
        workers: 2,
        ..RunnerOptions::default()
    };
    o.worker.concurrency = 2;
    o.worker.cache_dir = test_cache_dir();
    o.secrets_dir = Some(secrets.to_owned());
    o
}

async fn embedded(bundles: &Path, secrets: &Path) -> InProcess {
    embedded_with_debug(bundles, secrets, &[]).await
}

/// [`embedded`], the Funcs named in `debug` enabled with the `debug`
/// setting (their failures answered in full).
async fn embedded_with_debug(bundles: &Path, secrets: &Path, debug: &[&str]) -> InProcess {
    let c = spawn_cluster(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        with_debug(load(bundles), debug),
        IngressOptions::default(),
        Some(runner_options(secrets)),
    )
    .await;
    wait_ready(&format!("{}/hello/ready", c.base)).await;
    c
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}"));
    (status, v)
}

fn problems(v: &Value) -> String {
    assert_eq!(v["error"], "validation_failed", "{v}");
    v["problems"].to_string()
}

/// Everything a Func author relies on, checked against one runtime's demo;
/// `debug`: the Func is enabled with the `debug` setting.
async fn contract(base: &str, prefix: &str, runtime: &str, token: &str, debug: bool) {
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{base}/{prefix}{p}");

    // Path and query parameters, a header, JSON out, declared env.
    let (s, v) = json_of(
        http.get(url("/hello/J%C3%BCrgen?times=2"))
            .header("x-trace", "t-1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{runtime}: {v}");
    assert_eq!(v["greeting"], "Hello, Jürgen! Hello, Jürgen!", "{runtime}");
    assert_eq!(v["runtime"], runtime);
    assert_eq!(v["trace"], "t-1");

    // Binary bodies cross byte for byte, both ways; headers set by the Func.
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let r = http
        .post(url("/echo"))
        .header("content-type", "application/octet-stream")
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{runtime}");
    assert_eq!(r.headers()["x-echo-length"], "70000", "{runtime}");
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        binary.as_slice(),
        "{runtime}"
    );
    let text = "héllo wörld ✓";
    let r = http
        .post(url("/echo"))
        .header("content-type", "text/plain; charset=utf-8")
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), text, "{runtime}");

    // JSON in, status and JSON out.
    let (s, v) = json_of(
        http.post(url("/items"))
            .json(&json!({"name": "bolt", "qty": 21, "tags": ["m4"]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, &v),
        (201, &json!({"name": "bolt", "qty": 21, "total": 42})),
        "{runtime}"
    );

    // Validation: the Func is not invoked (it would fail with a 500 on
    // these bodies), every problem is listed.
    let (s, v) = json_of(
        http.post(url("/items"))
            .json(&json!({"qty": 0, "colour": "red"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400, "{runtime}: {v}");
    let p = problems(&v);
    assert!(
        p.contains("name") && p.contains("qty") && p.contains("colour"),
        "{runtime}: {p}"
    );
    let (s, v) = json_of(
        http.post(url("/items"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(problems(&v).contains("not valid JSON"), "{v}");
    let (s, v) = json_of(http.post(url("/items")).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(problems(&v).contains("required"), "{v}");
    let (s, v) = json_of(http.get(url("/hello/bob?times=many")).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(problems(&v).contains("not an integer"), "{v}");
    let (s, v) = json_of(http.get(url("/hello/bob?times=9")).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(problems(&v).contains("maximum"), "{v}");
    let (s, v) = json_of(http.get(url("/sleep")).send().await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(problems(&v).contains("`ms`: required"), "{v}");
    let (s, _) = json_of(http.get(url("/status/abc")).send().await.unwrap()).await;
    assert_eq!(s, 400);

    // Any status the Func chooses.
    let r = http.get(url("/status/418")).send().await.unwrap();
    assert_eq!(r.status(), 418, "{runtime}");
    assert_eq!(r.text().await.unwrap(), "status 418");

    // Headers and request fields the Func sees.
    let (_, v) = json_of(
        http.get(url("/headers?a=1"))
            .header("x-custom", "yes")
            .header("x-request-id", format!("rid-{runtime}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["headers"]["x-custom"], "yes", "{runtime}: {v}");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], format!("/{prefix}/headers"));
    assert_eq!(v["id"], format!("rid-{runtime}"));

    // Declared env and the secret from the secrets directory; nothing else
    // of the Runner's environment leaks in.
    // `HOME` is the Func's own scratch directory, not the Runner's.
    let (_, mut v) = json_of(http.get(url("/env")).send().await.unwrap()).await;
    let home = v["HOME"].take();
    assert!(
        home.as_str()
            .is_some_and(|h| h.contains("funcatron-scratch")),
        "{runtime}: HOME {home}"
    );
    assert_eq!(
        v,
        json!({"GREETING": "Hello", "API_TOKEN": token, "HOME": null}),
        "{runtime}"
    );

    // A Func error is a 500 whose message (the error's text, its
    // traceback) is in the Func's log, and in the answer only with
    // `debug`; the worker lives on.
    let (s, v) = json_of(http.get(url("/fail")).send().await.unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (500, Some("func_error")),
        "{runtime}: {v}"
    );
    if debug {
        assert!(
            v["message"].as_str().unwrap().contains("always fails"),
            "{runtime}: {v}"
        );
    } else {
        assert!(hides_detail(&v, &["always fails"]), "{runtime}: {v}");
    }

    // Junk on stdout and stderr does not disturb the protocol.
    for _ in 0..3 {
        let r = http.get(url("/noisy")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{runtime}");
        assert_eq!(r.text().await.unwrap(), "still fine");
    }

    // A worker that dies mid-request: 500 with a reason, then replaced.
    let (s, v) = json_of(http.get(url("/crash")).send().await.unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (500, Some("func_crashed")),
        "{runtime}: {v}"
    );
    // A Func that never answers: 504, its worker killed and replaced.
    let (s, v) = json_of(http.get(url("/sleep?ms=60000")).send().await.unwrap()).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (504, Some("func_timeout")),
        "{runtime}: {v}"
    );
    // Both replacements serve (the pool has two workers; use both).
    let calls = (0..4).map(|_| http.get(url("/hello/again")).send());
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200, "{runtime}");
    }
}

#[tokio::test]
async fn python_node_and_java_funcs_keep_the_contract_on_the_embedded_broker() {
    let (bundles, secrets) = demo_bundles();
    // One of them with `debug`: its errors are answered in full.
    let c = embedded_with_debug(bundles.path(), secrets.path(), &["python-demo"]).await;
    let runs = DEMOS.iter().map(|(name, prefix, runtime)| {
        let token = if *name == "java-demo" {
            "java-only"
        } else {
            "s3cret"
        };
        contract(&c.base, prefix, runtime, token, *name == "python-demo")
    });
    futures::future::join_all(runs).await;
}

#[tokio::test]
async fn tinyfaas_and_openfaas_folders_run_unchanged() {
    let (bundles, secrets) = demo_bundles();
    let c = embedded(bundles.path(), secrets.path()).await;
    let http = reqwest::Client::new();

    // tinyFaaS python3: fn(body, headers) -> str, None for an empty body.
    let r = http
        .post(format!("{}/tinyfaas-python", c.base))
        .header("user-agent", "tester/1")
        .body("one two three")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap(),
        json!({"words": 3, "agent": "tester/1"})
    );
    let r = http
        .get(format!("{}/tinyfaas-python", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");

    // tinyFaaS nodejs: Express-style (req, res), req.body a string.
    let r = http
        .post(format!("{}/tinyfaas-node", c.base))
        .body("100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"n": 100, "primes": 25, "largest": 97})
    );
    let r = http
        .post(format!("{}/tinyfaas-node", c.base))
        .body("many")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().await.unwrap(), "send an integer >= 2");

    // OpenFaaS classic: a command, stdin/stdout, Http_* variables.
    let r = http
        .put(format!("{}/openfaas-classic", c.base))
        .header("x-name", "zed")
        .body("quiet words")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "PUT QUIET WORDS zed");
}

#[tokio::test]
async fn broken_worker_funcs_answer_500_with_the_reason_and_the_rest_serve() {
    // Each is enabled with `debug`, so the reason is in the answer; one
    // more (`py-quiet`) is not: its answer hides the reason.
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    let doc = |base: &str, runtime: &str, op: &str, extra: &str| {
        format!(
            "swagger: '2.0'\nbasePath: /{base}\nx-funcatron: {{runtime: {runtime}{extra}}}\npaths:\n  /:\n    get: {{operationId: \"{op}\"}}\n"
        )
    };
    let d = doc("py-import", "python", "go", "");
    write_bundle(
        root.path(),
        "py-import",
        &[
            ("swagger.yaml", &d),
            ("main.py", "raise RuntimeError('boom at import')\n"),
        ],
    );
    let d = doc("py-quiet", "python", "go", "");
    write_bundle(
        root.path(),
        "py-quiet",
        &[
            ("swagger.yaml", &d),
            ("main.py", "raise RuntimeError('boom at import')\n"),
        ],
    );
    let d = doc("py-missing", "python", "absent", "");
    write_bundle(
        root.path(),
        "py-missing",
        &[
            ("swagger.yaml", &d),
            ("main.py", "def present(req):\n    return 1\n"),
        ],
    );
    let d = doc("py-pip", "python", "go", "");
    write_bundle(
        root.path(),
        "py-pip",
        &[
            ("swagger.yaml", &d),
            ("main.py", "def go(req):\n    return 1\n"),
            (
                "requirements.txt",
                "funcatron-no-such-package-xyzzy==9.9.9\n",
            ),
        ],
    );
    let d = doc("js-syntax", "nodejs", "go", "");
    write_bundle(
        root.path(),
        "js-syntax",
        &[
            ("swagger.yaml", &d),
            ("main.js", "exports.go = (req) => {{{\n"),
        ],
    );
    let d = doc("java-bad", "java", "app.Main::go", "");
    let java_bad = write_bundle(root.path(), "java-bad", &[("swagger.yaml", &d)]);
    std::fs::create_dir_all(java_bad.join("src/app")).unwrap();
    std::fs::write(
        java_bad.join("src/app/Main.java"),
        "package app;\npublic class Main {\n  public Object go(funcatron.Request r) { return undefinedThing; }\n}\n",
    )
    .unwrap();
    let d = doc("java-nomethod", "java", "app.Main::missing", "");
    let java_nm = write_bundle(root.path(), "java-nomethod", &[("swagger.yaml", &d)]);
    std::fs::create_dir_all(java_nm.join("src/app")).unwrap();
    std::fs::write(
        java_nm.join("src/app/Main.java"),
        "package app;\npublic class Main {\n  public Object go(funcatron.Request r) { return 1; }\n}\n",
    )
    .unwrap();
    let d = doc("py-secret", "python", "go", ", secrets: [NOT_SUPPLIED]");
    write_bundle(
        root.path(),
        "py-secret",
        &[
            ("swagger.yaml", &d),
            ("main.py", "def go(req):\n    return 1\n"),
        ],
    );
    let secrets = tempfile::tempdir().unwrap();
    let debug = [
        "py-import",
        "py-missing",
        "py-pip",
        "js-syntax",
        "java-bad",
        "java-nomethod",
        "py-secret",
    ];
    let c = embedded_with_debug(root.path(), secrets.path(), &debug).await;
    let http = reqwest::Client::new();
    for (path, needles) in [
        ("py-quiet", &[][..]),
        ("py-import", &["boom at import"][..]),
        ("py-missing", &["absent"]),
        (
            "py-pip",
            &["requirements.txt", "funcatron-no-such-package-xyzzy"],
        ),
        ("js-syntax", &["main.js", "SyntaxError"]),
        ("java-bad", &["javac", "Main.java:3", "undefinedThing"]),
        ("java-nomethod", &["app.Main", "missing"]),
        ("py-secret", &["NOT_SUPPLIED"]),
    ] {
        // Preparing (a virtualenv, javac) can outlast one request's deadline
        // on a loaded machine: such a request is answered 504 "still
        // preparing"; the answer once preparing has failed is the point.
        let mut attempts = 0;
        let (s, v) = loop {
            let (s, v) =
                json_of(http.get(format!("{}/{path}", c.base)).send().await.unwrap()).await;
            let preparing = s == 504
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("still preparing"));
            attempts += 1;
            if !preparing || attempts == 10 {
                break (s, v);
            }
        };
        assert_eq!(
            (s, v["error"].as_str()),
            (500, Some("func_broken")),
            "{path}: {v}"
        );
        if path == "py-quiet" {
            assert!(
                hides_detail(&v, &["boom at import", "main.py", "Traceback"]),
                "{path}: {v}"
            );
            continue;
        }
        let msg = v["message"].as_str().unwrap();
        for n in needles {
            assert!(msg.contains(n), "{path}: {n:?} not in {msg}");
        }
    }
    let r = http
        .get(format!("{}/hello/still", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hello, still!");
}

#[tokio::test]
async fn python_requirements_install_once_into_a_cached_venv_and_memory_is_capped() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    write_bundle(
        root.path(),
        "py-deps",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /deps\nx-funcatron: {runtime: python, memory_mb: 128, concurrency: 1}\npaths:\n  /version:\n    get: {operationId: version}\n  /hog:\n    get: {operationId: hog}\n",
            ),
            ("requirements.txt", "six==1.16.0\n"),
            (
                "main.py",
                "import sys, six\n\ndef version(req):\n    return {'six': six.__version__, 'prefix': sys.prefix}\n\ndef hog(req):\n    block = bytearray(300 * 1024 * 1024)\n    return len(block)\n",
            ),
        ],
    );
    let secrets = tempfile::tempdir().unwrap();
    // With `debug`, so the answer names the MemoryError.
    let c = embedded_with_debug(root.path(), secrets.path(), &["py-deps"]).await;
    let http = reqwest::Client::new();
    let (s, v) = json_of(
        http.get(format!("{}/deps/version", c.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["six"], "1.16.0");
    let prefix = v["prefix"].as_str().unwrap();
    assert!(
        Path::new(prefix).starts_with(test_cache_dir().join("python")),
        "{prefix}"
    );
    // Over the address-space cap: Python raises MemoryError (a 500 naming
    // it) and the worker serves on.
    let (s, v) = json_of(
        http.get(format!("{}/deps/hog", c.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (500, Some("func_error")), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("MemoryError"),
        "{v}"
    );
    let r = http
        .get(format!("{}/deps/version", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn validation_can_be_turned_off_per_bundle() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    for (name, validate) in [("strict", "true"), ("loose", "false")] {
        write_bundle(
            root.path(),
            name,
            &[
                (
                    "swagger.yaml",
                    &format!("swagger: '2.0'\nbasePath: /{name}\nx-funcatron: {{runtime: python, validate: {validate}}}\npaths:\n  /n:\n    get:\n      operationId: n\n      parameters:\n        - {{name: n, in: query, required: true, type: integer}}\n"),
                ),
                ("main.py", "def n(req):\n    return 'got ' + repr(req.query.get('n'))\n"),
            ],
        );
    }
    let secrets = tempfile::tempdir().unwrap();
    let c = embedded(root.path(), secrets.path()).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/strict/n?n=x", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/loose/n?n=x", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "got 'x'");
    let r = http
        .get(format!("{}/loose/n", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "got None");
}

#[tokio::test]
async fn worker_runtimes_serve_through_rabbitmq_with_separate_processes() {
    let (bundles, secrets) = demo_bundles();
    let broker = fresh_vhost();
    let dir = bundles.path().to_str().unwrap();
    let cache = test_cache_dir();
    let cache = cache.to_str().unwrap();
    let _tron = spawn("tron", &broker, &["--bundles", dir]);
    let _runners: Vec<Proc> = (0..2)
        .map(|_| {
            spawn(
                "runner",
                &broker,
                &[
                    "--bundles",
                    dir,
                    "--worker-processes",
                    "2",
                    "--cache-dir",
                    cache,
                    "--secrets-dir",
                    secrets.path().to_str().unwrap(),
                ],
            )
        })
        .collect();
    let addr = free_addr().to_string();
    let _ingress = spawn("ingress", &broker, &["--listen", &addr]);
    let base = format!("http://{addr}");
    wait_ready(&format!("{base}/hello/ready")).await;
    let runs = DEMOS.iter().map(|(name, prefix, runtime)| {
        let token = if *name == "java-demo" {
            "java-only"
        } else {
            "s3cret"
        };
        let base = base.clone();
        async move { contract(&base, prefix, runtime, token, false).await }
    });
    futures::future::join_all(runs).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/tinyfaas-node"))
        .body("10")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["largest"], 7);
}

#[tokio::test]
async fn lua_and_exec_funcs_get_their_env_and_secrets() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    write_bundle(
        root.path(),
        "lua-env",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /lua-env\nx-funcatron: {runtime: lua, env: {GREETING: Hej}, secrets: [TOKEN]}\npaths:\n  /:\n    get: {operationId: show}\n",
            ),
            ("main.lua", "return { show = function() return env.GREETING .. ' ' .. env.TOKEN end }\n"),
        ],
    );
    write_bundle(
        root.path(),
        "exec-env",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /exec-env\nx-funcatron: {runtime: exec, env: {GREETING: Hoi}, secrets: [TOKEN]}\npaths:\n  /:\n    get: {operationId: show}\n",
            ),
            ("fn.sh", "printf '%s %s %s' \"$GREETING\" \"$TOKEN\" \"$(touch \"$HOME/f\" && test \"$HOME\" = \"$TMPDIR\" && echo scratch-home)\"\n"),
        ],
    );
    let secrets = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(secrets.path().join("lua-env")).unwrap();
    std::fs::write(secrets.path().join("lua-env/TOKEN"), "for-lua\n").unwrap();
    std::fs::write(secrets.path().join("TOKEN"), "for-everyone").unwrap();
    let c = embedded(root.path(), secrets.path()).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/lua-env", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hej for-lua");
    let r = http
        .get(format!("{}/exec-env", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "Hoi for-everyone scratch-home");
}

/// An exec Func that probes what it can reach, one `name=value` per line.
const PEEK_SH: &str = r#"t() { if eval "$2" >/dev/null 2>&1; then echo "$1=ok"; else echo "$1=no"; fi; }
t runner_visible 'grep -q runtimes /proc/$RUNNER_PID/cmdline'
t other_secret 'cat "$SECRETS/other/TOKEN"'
t secrets_dir 'ls "$SECRETS"'
t other_bundle 'ls "$OTHER"'
t write_bundle 'touch ./escape'
t write_outside 'touch "$OTHER/../escape-sh"'
t write_tmp 'touch /tmp/funcatron-escape-sh'
t own_file 'grep -q RUNNER_PID ./fn.sh'
t scratch 'test -n "$HOME" && touch "$HOME/f" && test -f "$TMPDIR/f"'
echo "own_secret=$MINE"
echo "pids=$(ls /proc | grep -c '^[0-9]')"
own=$(env | cut -d= -f1 | sort -u)
foreign=0
for f in /proc/1/environ /proc/$PPID/environ; do
  for n in $(tr '\0' '\n' < "$f" 2>/dev/null | cut -d= -f1 | sort -u); do
    echo "$own" | grep -qx "$n" || foreign=$((foreign + 1))
  done
done
echo "foreign_env=$foreign"
"#;

/// The same probes from a Python worker.
const PEEK_PY: &str = r#"import os

def _t(f):
    try:
        f()
        return 'ok'
    except Exception:
        return 'no'

def _read(p):
    with open(p, 'rb') as fh:
        return fh.read()

def _touch(p):
    with open(p, 'w') as fh:
        fh.write('x')

def _visible(p):
    if b'runtimes' not in _read(p):
        raise RuntimeError('not the Runner')

def _foreign():
    own = set(os.environ)
    n = 0
    for p in ('/proc/1/environ', '/proc/%d/environ' % os.getppid()):
        try:
            names = {v.split(b'=', 1)[0].decode() for v in _read(p).split(b'\0') if v}
        except Exception:
            continue
        n += len(names - own)
    return n

def peek(req):
    e = os.environ
    home = e.get('HOME', '')
    return {
        'runner_visible': _t(lambda: _visible('/proc/%s/cmdline' % e['RUNNER_PID'])),
        'other_secret': _t(lambda: _read(e['SECRETS'] + '/other/TOKEN')),
        'secrets_dir': _t(lambda: os.listdir(e['SECRETS'])),
        'other_bundle': _t(lambda: os.listdir(e['OTHER'])),
        'write_bundle': _t(lambda: _touch('escape')),
        'write_outside': _t(lambda: _touch(e['OTHER'] + '/../escape-py')),
        'write_tmp': _t(lambda: _touch('/tmp/funcatron-escape-py')),
        'own_file': _t(lambda: _read('main.py')),
        'scratch': _t(lambda: _touch(home + '/f') if home else 1 / 0),
        'own_secret': e.get('MINE', ''),
        'pids': str(len([p for p in os.listdir('/proc') if p.isdigit()])),
        'foreign_env': str(_foreign()),
    }
"#;

#[tokio::test]
async fn worker_and_exec_funcs_see_only_their_bundle_secrets_and_scratch() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    let secrets = tempfile::tempdir().unwrap();
    let env = format!(
        "{{RUNNER_PID: '{}', SECRETS: '{}', OTHER: '{}'}}",
        std::process::id(),
        secrets.path().display(),
        root.path().join("hello").display()
    );
    for (name, runtime, file, code) in [
        ("peek-sh", "exec", "fn.sh", PEEK_SH),
        ("peek-py", "python", "main.py", PEEK_PY),
    ] {
        let doc = format!(
            "swagger: '2.0'\nbasePath: /{name}\nx-funcatron: {{runtime: {runtime}, env: {env}, secrets: [MINE]}}\npaths:\n  /:\n    get: {{operationId: peek}}\n"
        );
        write_bundle(root.path(), name, &[("swagger.yaml", &doc), (file, code)]);
        std::fs::create_dir_all(secrets.path().join(name)).unwrap();
        std::fs::write(
            secrets.path().join(name).join("MINE"),
            format!("{name}-own"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(secrets.path().join("other")).unwrap();
    std::fs::write(secrets.path().join("other/TOKEN"), "not-yours").unwrap();
    let c = embedded(root.path(), secrets.path()).await;
    let http = reqwest::Client::new();
    for name in ["peek-sh", "peek-py"] {
        let r = http.get(format!("{}/{name}", c.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let text = r.text().await.unwrap();
        let got: std::collections::BTreeMap<String, String> =
            match serde_json::from_str::<Value>(&text) {
                Ok(v) => v
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect(),
                Err(_) => text
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            };
        let get = |k: &str| got.get(k).map(String::as_str).unwrap_or("missing");
        for denied in [
            "runner_visible",
            "other_secret",
            "secrets_dir",
            "other_bundle",
            "write_bundle",
            "write_outside",
            "write_tmp",
        ] {
            assert_eq!(get(denied), "no", "{name}: {denied} must fail: {got:?}");
        }
        assert_eq!(get("own_file"), "ok", "{name}: {got:?}");
        assert_eq!(get("scratch"), "ok", "{name}: {got:?}");
        assert_eq!(get("own_secret"), format!("{name}-own"), "{name}");
        assert_eq!(get("foreign_env"), "0", "{name}: {got:?}");
        let pids: usize = get("pids").parse().unwrap();
        assert!(pids <= 8, "{name}: {pids} processes visible: {got:?}");
    }
    assert!(!root.path().join("escape-sh").exists());
    assert!(!root.path().join("escape-py").exists());
}

#[tokio::test]
async fn without_a_working_sandbox_worker_and_exec_funcs_answer_503_unless_opted_out() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(
        root.path(),
        &["hello", "openfaas-classic", "tinyfaas-python"],
    );
    let secrets = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    for insecure in [false, true] {
        let mut o = runner_options(secrets.path());
        o.sandbox.bwrap = "/nonexistent/funcatron-test/bwrap".into();
        o.sandbox.insecure_no_sandbox = insecure;
        let c = spawn_cluster(
            AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
            load(root.path()),
            IngressOptions::default(),
            Some(o),
        )
        .await;
        wait_ready(&format!("{}/hello/ready", c.base)).await;
        for (path, body) in [("openfaas-classic", "quiet"), ("tinyfaas-python", "a b")] {
            let r = http
                .post(format!("{}/{path}", c.base))
                .body(body)
                .send()
                .await
                .unwrap();
            if insecure {
                assert_eq!(r.status(), 200, "{path} with the opt-out");
            } else {
                let (s, v) = json_of(r).await;
                assert_eq!(
                    (s, v["error"].as_str()),
                    (503, Some("sandbox_unavailable")),
                    "{path}: {v}"
                );
                // The sandbox program's path stays in the logs.
                assert!(
                    hides_detail(&v, &["/nonexistent/funcatron-test/bwrap"])
                        && v["message"]
                            .as_str()
                            .unwrap()
                            .contains("isolation is unavailable"),
                    "{v}"
                );
            }
        }
        // Lua Funcs run in-process, sandbox or not.
        let r = http
            .get(format!("{}/hello/lua", c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "Hello, lua!");
    }
}

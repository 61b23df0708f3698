//! `funcatron dev`: save and reload, as a real child process watching a
//! real directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

/// `funcatron dev DIR` on a free port, with the tests' cache: the process,
/// its base URL and its log.
fn start_dev(dir: &std::path::Path) -> (Proc, String, std::path::PathBuf) {
    let addr = free_addr();
    let log = dir.join("dev.log");
    let dev = funcatron_logged(
        &[
            "dev",
            dir.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--cache-dir",
            test_cache_dir().to_str().unwrap(),
        ],
        "",
        &log,
    );
    (dev, format!("http://{addr}"), log)
}

#[tokio::test]
async fn saves_go_live_broken_saves_keep_the_last_good_version() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    let py = write_bundle(
        root.path(),
        "py",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /py\nx-funcatron: {runtime: python, concurrency: 1}\npaths:\n  /:\n    get: {operationId: hi}\n",
            ),
            ("main.py", "def hi(req):\n    return 'py one'\n"),
        ],
    );
    let (_dev, base, log) = start_dev(root.path());
    wait_ready(&format!("{base}/hello/ready")).await;
    wait_ready(&format!("{base}/py")).await;

    // Load throughout the switches that keep the route: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (stop, served, url) = (
            Arc::clone(&stop),
            Arc::clone(&served),
            format!("{base}/hello/load"),
        );
        async move {
            let http = reqwest::Client::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http.get(&url).send().await.unwrap();
                let status = r.status();
                let text = r.text().await.unwrap();
                if status != 200 || !text.ends_with("load!") {
                    failures.push(format!("{status} {text}"));
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }
    });

    let hello = root.path().join("hello/main.lua");
    let original = std::fs::read_to_string(&hello).unwrap();
    assert_eq!(text(&format!("{base}/hello/you")).await.1, "Hello, you!");
    std::fs::write(&hello, original.replace("Hello, ", "Howdy, ")).unwrap();
    eventually("the saved Lua answers", || async {
        text(&format!("{base}/hello/you")).await.1 == "Howdy, you!"
    })
    .await;

    // A Lua syntax error: reported, the last good version serves on.
    std::fs::write(&hello, "return {").unwrap();
    eventually("the broken save is reported", || async {
        log_has(&log, "unexpected symbol")
    })
    .await;
    assert_eq!(text(&format!("{base}/hello/you")).await.1, "Howdy, you!");

    // A broken document, likewise.
    let spec = root.path().join("hello/swagger.yaml");
    let doc = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, "swagger: '2.0'\npaths: [").unwrap();
    eventually("the broken document is reported", || async {
        log_has(&log, "not valid YAML")
    })
    .await;
    assert_eq!(text(&format!("{base}/hello/you")).await.1, "Howdy, you!");

    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during switches (and broken saves): {:?}",
        failures.len(),
        served.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(served.load(Ordering::Relaxed) > 20);

    // Fixed: the new version goes live, the route change with it.
    std::fs::write(&spec, doc.replace("basePath: /hello", "basePath: /greet")).unwrap();
    std::fs::write(&hello, original.replace("Hello, ", "Hey, ")).unwrap();
    eventually("the fixed bundle answers on its new basePath", || async {
        text(&format!("{base}/greet/you")).await == (200, "Hey, you!".into())
    })
    .await;
    assert_eq!(text(&format!("{base}/hello/you")).await.0, 404);
    std::fs::write(&spec, doc).unwrap();
    eventually("back on /hello", || async {
        text(&format!("{base}/hello/you")).await.1 == "Hey, you!"
    })
    .await;

    // Python: a save is a new warm worker; a syntax error is kept out.
    std::fs::write(py.join("main.py"), "def hi(req):\n    return 'py two'\n").unwrap();
    eventually("the saved Python answers", || async {
        text(&format!("{base}/py")).await.1 == "py two"
    })
    .await;
    std::fs::write(py.join("main.py"), "def hi(req:\n").unwrap();
    eventually("the Python syntax error is reported", || async {
        log_has(&log, "SyntaxError")
    })
    .await;
    assert_eq!(text(&format!("{base}/py")).await.1, "py two");

    // The document and the interactive page.
    let (s, doc) = text(&format!("{base}/_funcatron/dev/hello/openapi.json")).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["basePath"], "/hello");
    let (s, page) = text(&format!("{base}/_funcatron/dev/hello/")).await;
    assert_eq!(s, 200);
    assert!(
        page.contains("helloName") && page.contains("data-template=\"/hello/{name}\""),
        "{page}"
    );
    let (_, index) = text(&format!("{base}/_funcatron/dev/")).await;
    assert!(
        index.contains("Broken save") && index.contains("SyntaxError"),
        "{index}"
    );

    // In dev a Func's error is answered in full.
    std::fs::write(
        py.join("main.py"),
        "def hi(req):\n    raise ValueError('dev sees this')\n",
    )
    .unwrap();
    eventually("the error is answered in full", || async {
        let (s, body) = text(&format!("{base}/py")).await;
        s == 500 && body.contains("ValueError: dev sees this")
    })
    .await;
}

/// `funcatron dev` checks every answer against its document: one that does
/// not match is printed and listed on the pages, and still answered as is.
#[tokio::test]
async fn answers_that_do_not_match_the_document_are_shown() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    write_bundle(
        root.path(),
        "shapes",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /shapes\nx-funcatron: {runtime: lua}\nproduces: [application/json]\npaths:\n  /square:\n    get:\n      operationId: square\n      responses:\n        '200': {description: a square, schema: {type: object, required: [side], properties: {side: {type: integer}}}}\n",
            ),
            ("main.lua", "return { square = function() return { side = 'wide' } end }"),
        ],
    );
    let (_dev, base, log) = start_dev(root.path());
    wait_ready(&format!("{base}/hello/ready")).await;
    let (status, body) = text(&format!("{base}/shapes/square")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"side":"wide"}"#));
    eventually("the mismatch is printed", || async {
        log_has(&log, "answered not as its document says")
    })
    .await;
    eventually("the mismatch is on the pages", || async {
        let (_, index) = text(&format!("{base}/_funcatron/dev/")).await;
        let (_, page) = text(&format!("{base}/_funcatron/dev/shapes/")).await;
        index.contains("do not match the document") && page.contains("/side")
    })
    .await;
    // An answer as documented is not listed.
    let (_, hello) = text(&format!("{base}/_funcatron/dev/hello/")).await;
    assert!(!hello.contains("do not match the document"), "{hello}");
}

#[tokio::test]
async fn a_save_that_conflicts_keeps_its_last_good_version_and_the_others_switch() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    let doc = |base: &str, word: &str| {
        format!("openapi: 3.1.0\ninfo: {{title: t, version: '1'}}\nx-funcatron: {{runtime: lua}}\nservers: [{{url: /{word}}}, {{url: {base}}}]\npaths:\n  /w:\n    get: {{operationId: w}}\n")
    };
    let lua = |word: &str| format!("return {{w = function() return '{word}' end}}");
    let one = write_bundle(
        root.path(),
        "one",
        &[
            ("openapi.yaml", &doc("/one-b", "one")),
            ("main.lua", &lua("one")),
        ],
    );
    let two = write_bundle(
        root.path(),
        "two",
        &[
            ("openapi.yaml", &doc("/two-b", "two")),
            ("main.lua", &lua("two")),
        ],
    );
    let (_dev, base, log) = start_dev(root.path());
    wait_ready(&format!("{base}/one/w")).await;
    wait_ready(&format!("{base}/two-b/w")).await;
    // `two`'s second server now claims `one`'s, and `one` changes too:
    // `two` keeps its last good version, `one`'s save goes live.
    std::fs::write(two.join("openapi.yaml"), doc("/one-b", "two")).unwrap();
    std::fs::write(one.join("main.lua"), lua("one again")).unwrap();
    eventually("the conflict is reported", || async {
        log_has(&log, "two is broken") && log_has(&log, "`one`")
    })
    .await;
    eventually("one's save is live", || async {
        text(&format!("{base}/one-b/w")).await.1 == "one again"
    })
    .await;
    assert_eq!(text(&format!("{base}/two-b/w")).await.1, "two");
    // Resolved: two switches.
    std::fs::write(two.join("openapi.yaml"), doc("/two-c", "two")).unwrap();
    eventually("two's fix is live", || async {
        text(&format!("{base}/two-c/w")).await.1 == "two"
    })
    .await;
    assert_eq!(text(&format!("{base}/two-b/w")).await.0, 404);
}

/// Dev mode has a state store (in memory): a Func uses the document store
/// through its Runner, a store trigger fires on what it wrote, and the
/// developer reads both over HTTP with any token.
#[tokio::test]
async fn funcs_use_the_store_and_triggers_in_dev_mode() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["word-count"]);
    write_bundle(
        root.path(),
        "writer",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /writer\nx-funcatron:\n  runtime: lua\n  store: {articles: [read, write]}\npaths:\n  /{id}:\n    post:\n      operationId: write\n      parameters: [{name: id, in: path, required: true, type: string}]\n      responses: {'200': {description: ok}}\n",
            ),
            (
                "main.lua",
                "function write(req)\n  local d = assert(store.put('articles', req.params.id, {text = req.body}))\n  return {version = d.version}\nend\n",
            ),
        ],
    );
    let (_dev, base, _log) = start_dev(root.path());
    let http = reqwest::Client::new();
    eventually("the writer answers", || async {
        http.post(format!("{base}/writer/a1"))
            .body("three little words")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    // word-count's trigger counted what the Lua Func wrote.
    eventually("the derived document", || async {
        let Ok(r) = http
            .get(format!("{base}/_funcatron/store/article-stats/a1"))
            .bearer_auth("any")
            .send()
            .await
        else {
            return false;
        };
        r.status() == 200
            && r.json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v["doc"]["words"] == 3)
    })
    .await;
}

//! `funcatron store ...` against a real `funcatron up` (its Tron's
//! management listener and its ingress, on the embedded state store):
//! collections with a schema and access rules, documents written with and
//! without preconditions, merge and JSON patches, filtered and paged
//! listings, collection tokens used over the ingress, refusals.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

/// The Tron's admin token in these tests.
const ADMIN: &str = "store-cli-admin-token-0123";

/// A running `funcatron up` and where it listens.
struct Up {
    _proc: Proc,
    root: tempfile::TempDir,
    /// The ingress (`http://host:port`).
    base: String,
    /// The Tron's management listener.
    mgmt: String,
}

/// `funcatron up` with a store directory, no bundles, known tokens; ready
/// (both listeners answer their health checks).
async fn start_up() -> Up {
    let root = tempfile::tempdir().unwrap();
    let bundles = root.path().join("bundles");
    std::fs::create_dir_all(&bundles).unwrap();
    let store = root.path().join("store");
    let cmd = UpCmd::new(&bundles, &store);
    let proc = cmd.spawn(ADMIN, &root.path().join("up.log"));
    let UpCmd { base, mgmt, .. } = cmd;
    wait_ready(&format!("{mgmt}/v1/health")).await;
    wait_ready(&format!("{base}/_funcatron/health")).await;
    Up {
        _proc: proc,
        root,
        base,
        mgmt,
    }
}

/// What a `funcatron store` run did.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Its JSON output, asserting it succeeded.
    fn json(&self) -> Value {
        assert!(self.ok, "refused: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    /// Its error, asserting it failed.
    fn refused(&self) -> &str {
        assert!(!self.ok, "not refused: {}", self.stdout);
        &self.stderr
    }
}

/// How a run authenticates: `FUNCATRON_TOKEN` and `FUNCATRON_READ_TOKEN`.
#[derive(Clone, Copy)]
struct As<'a> {
    token: Option<&'a str>,
    read_token: Option<&'a str>,
}

const AS_ADMIN: As = As {
    token: Some(ADMIN),
    read_token: None,
};

/// `funcatron store ARGS` against `tron` as `who`, `stdin` on its input.
fn run(tron: &str, who: As, args: &[&str], stdin: Option<&str>) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_funcatron"));
    cmd.arg("store")
        .args(args)
        .env("FUNCATRON_TRON_URL", tron)
        .env_remove("FUNCATRON_TOKEN")
        .env_remove("FUNCATRON_TOKEN_FILE")
        .env_remove("FUNCATRON_READ_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = who.token {
        cmd.env("FUNCATRON_TOKEN", t);
    }
    if let Some(t) = who.read_token {
        cmd.env("FUNCATRON_READ_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Up {
    /// `funcatron store ARGS` against the Tron with the admin token.
    fn store(&self, args: &[&str]) -> Out {
        run(&self.mgmt, AS_ADMIN, args, None)
    }
}

/// The ids of a list of documents, in its order.
fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn collections_schemas_and_documents_from_the_cli() {
    let up = start_up().await;
    assert_eq!(
        up.store(&["collections"]).json(),
        json!({"collections": []})
    );

    let schema = up.root.path().join("people.yaml");
    std::fs::write(
        &schema,
        "type: object\nrequired: [name]\nproperties:\n  name: {type: string}\n  age: {type: integer, minimum: 0}\n",
    )
    .unwrap();
    let defined = up
        .store(&[
            "define",
            "people",
            "--schema",
            schema.to_str().unwrap(),
            "--read",
            "token",
            "--write",
            "token",
        ])
        .json();
    assert_eq!(defined["name"], "people");
    assert_eq!(defined["read"], "token");
    assert_eq!(defined["schema"]["required"], json!(["name"]));
    let shown = up.store(&["collection", "people"]).json();
    assert_eq!(shown["documents"], 0);
    assert_eq!(shown["write"], "token");
    let all = up.store(&["collections"]).json();
    assert_eq!(all["collections"][0]["name"], "people");

    // The schema refuses, naming the field.
    let bad = up.store(&[
        "put",
        "people",
        "ann",
        "--data",
        r#"{"name": "Ann", "age": "old"}"#,
    ]);
    let why = bad.refused();
    assert!(
        why.contains("400") && why.contains("schema_violation"),
        "{why}"
    );
    assert!(why.contains("/age"), "{why}");
    assert!(up
        .store(&["get", "people", "ann"])
        .refused()
        .contains("404"));

    // Create with a fresh id, read it back.
    let bob = up
        .store(&["create", "people", "--data", r#"{"name": "Bob", "age": 3}"#])
        .json();
    assert_eq!(bob["version"], 1);
    let bob_id = bob["id"].as_str().unwrap().to_owned();
    let got = up.store(&["get", "people", &bob_id]).json();
    assert_eq!(got["doc"], json!({"name": "Bob", "age": 3}));

    documents_with_preconditions(&up);

    // Not dropped while it holds documents; then emptied and dropped.
    let why = up.store(&["drop", "people"]);
    assert!(
        why.refused().contains("collection_not_empty"),
        "{}",
        why.stderr
    );
    up.store(&["delete", "people", &bob_id]).json();
    assert_eq!(up.store(&["collection", "people"]).json()["documents"], 0);
    assert_eq!(
        up.store(&["drop", "people"]).json(),
        json!({"dropped": "people"})
    );
    assert!(up
        .store(&["collection", "people"])
        .refused()
        .contains("unknown_collection"));
    assert_eq!(
        up.store(&["collections"]).json(),
        json!({"collections": []})
    );
}

/// `ann` in `people` through put, patch and delete with and without
/// `--if-match` / `--create-only`; stale versions refused.
fn documents_with_preconditions(up: &Up) {
    let ann = r#"{"name": "Ann", "age": 40}"#;
    let v1 = up
        .store(&["put", "people", "ann", "--create-only", "--data", ann])
        .json();
    assert_eq!(
        (v1["id"].as_str(), v1["version"].as_u64()),
        (Some("ann"), Some(1))
    );
    let again = up.store(&["put", "people", "ann", "--create-only", "--data", ann]);
    assert!(again.refused().contains("412"), "{}", again.stderr);

    // From stdin, at the version read.
    let v2 = run(
        &up.mgmt,
        AS_ADMIN,
        &["put", "people", "ann", "--if-match", "1", "--file", "-"],
        Some(r#"{"name": "Ann", "age": 41}"#),
    )
    .json();
    assert_eq!(v2["version"], 2);
    let stale = up.store(&["put", "people", "ann", "--if-match", "1", "--data", ann]);
    let why = stale.refused();
    assert!(
        why.contains("412") && why.contains("precondition_failed"),
        "{why}"
    );
    assert_eq!(up.store(&["get", "people", "ann"]).json()["doc"]["age"], 41);

    // A merge patch keeps what it does not name; a JSON Patch at a version.
    let v3 = up
        .store(&["patch", "people", "ann", "--data", r#"{"age": 42}"#])
        .json();
    assert_eq!(
        (v3["version"].as_u64(), &v3["doc"]),
        (Some(3), &json!({"name": "Ann", "age": 42}))
    );
    let rename = r#"[{"op": "replace", "path": "/name", "value": "Anne"}]"#;
    let v4 = up
        .store(&[
            "patch",
            "people",
            "ann",
            "--json-patch",
            "--if-match",
            "3",
            "--data",
            rename,
        ])
        .json();
    assert_eq!(v4["doc"], json!({"name": "Anne", "age": 42}));
    let stale = up.store(&[
        "patch",
        "people",
        "ann",
        "--if-match",
        "3",
        "--data",
        r#"{"age": 1}"#,
    ]);
    assert!(
        stale.refused().contains("precondition_failed"),
        "{}",
        stale.stderr
    );
    // A merge patch that removes a required field is checked too.
    let unnamed = up.store(&["patch", "people", "ann", "--data", r#"{"name": null}"#]);
    let why = unnamed.refused();
    assert!(
        why.contains("schema_violation") && why.contains("name"),
        "{why}"
    );

    refused_before_sending(up);

    let stale = up.store(&["delete", "people", "ann", "--if-match", "3"]);
    assert!(
        stale.refused().contains("precondition_failed"),
        "{}",
        stale.stderr
    );
    let gone = up
        .store(&["delete", "people", "ann", "--if-match", "4"])
        .json();
    assert_eq!(gone["doc"]["name"], "Anne");
    assert!(up
        .store(&["get", "people", "ann"])
        .refused()
        .contains("not_found"));
}

/// Bad JSON, and names and ids the store could not have, refused by the
/// CLI itself (`_collection` as an id would be another route).
fn refused_before_sending(up: &Up) {
    let why = up.store(&["put", "people", "ann", "--data", "{not json"]);
    assert!(
        why.refused().contains("--data is not JSON"),
        "{}",
        why.stderr
    );
    let why = up.store(&["get", "people", ".."]);
    assert!(
        why.refused().contains(r#"document id "..""#),
        "{}",
        why.stderr
    );
    // `_collection` is the API's, not an id: not a definition by mistake.
    let why = up.store(&["put", "people", "_collection", "--data", "{}"]);
    assert!(
        why.refused().contains(r#"document id "_collection""#),
        "{}",
        why.stderr
    );
    let why = up.store(&["drop", "People"]);
    assert!(
        why.refused().contains(r#"collection name "People""#),
        "{}",
        why.stderr
    );
    let why = up.store(&["token", "revoke", "people", ".."]);
    assert!(why.refused().contains("names nothing"), "{}", why.stderr);
    let shown = up.store(&["collection", "people"]).json();
    assert_eq!(shown["schema"]["required"], json!(["name"]));
}

#[tokio::test]
async fn listings_and_collection_tokens_from_the_cli() {
    let up = start_up().await;
    up.store(&["define", "notes", "--read", "token", "--write", "token"])
        .json();
    for n in 1..=5 {
        // `limit`: a field named as a query parameter is still a filter.
        let kind = if n % 2 == 1 { "a" } else { "b" };
        let doc = json!({"kind": kind, "n": n, "limit": n * 10}).to_string();
        up.store(&["put", "notes", &format!("n{n}"), "--data", &doc])
            .json();
    }

    // Filters: text, and a number read as JSON.
    let a = up.store(&["list", "notes", "--where", "kind=a"]).json();
    assert_eq!(ids(&a["documents"]), ["n1", "n3", "n5"]);
    assert_eq!(a["next"], Value::Null);
    let named = up.store(&["list", "notes", "--where", "limit=30"]).json();
    assert_eq!(ids(&named["documents"]), ["n3"]);
    let two = up
        .store(&["list", "notes", "--where", "n=2", "--where", "kind=b"])
        .json();
    assert_eq!(ids(&two["documents"]), ["n2"]);

    // Pages by hand, then every page.
    let p1 = up.store(&["list", "notes", "--limit", "2"]).json();
    assert_eq!(
        (ids(&p1["documents"]), p1["next"].as_str()),
        (vec!["n1", "n2"], Some("n2"))
    );
    let p2 = up
        .store(&["list", "notes", "--limit", "2", "--after", "n2"])
        .json();
    assert_eq!(
        (ids(&p2["documents"]), p2["next"].as_str()),
        (vec!["n3", "n4"], Some("n4"))
    );
    let p3 = up
        .store(&["list", "notes", "--limit", "2", "--after", "n4"])
        .json();
    assert_eq!(
        (ids(&p3["documents"]), &p3["next"]),
        (vec!["n5"], &Value::Null)
    );
    let all = up.store(&["list", "notes", "--all", "--limit", "2"]).json();
    assert_eq!(ids(&all), ["n1", "n2", "n3", "n4", "n5"]);
    assert_eq!(all[4]["doc"], json!({"kind": "a", "n": 5, "limit": 50}));
    let b = up
        .store(&[
            "list", "notes", "--all", "--limit", "1", "--where", "kind=b",
        ])
        .json();
    assert_eq!(ids(&b), ["n2", "n4"]);

    // The read token reads, and only reads.
    let reader = As {
        token: None,
        read_token: Some(TEST_READ_TOKEN),
    };
    let got = run(&up.mgmt, reader, &["get", "notes", "n1"], None).json();
    assert_eq!(got["doc"]["n"], 1);
    let write = run(
        &up.mgmt,
        reader,
        &["put", "notes", "n9", "--data", "{}"],
        None,
    );
    assert!(write.refused().contains("401"), "{}", write.stderr);

    collection_tokens(&up).await;
}

/// Tokens made by the CLI open the collection over the ingress; revoked,
/// they do not.
async fn collection_tokens(up: &Up) {
    let writer = up.store(&["token", "add", "notes", "--write"]).json();
    assert_eq!(writer["write"], true);
    let reader = up.store(&["token", "add", "notes"]).json();
    assert_eq!(reader["write"], false);
    let (write_token, write_id) = (
        writer["token"].as_str().unwrap(),
        writer["id"].as_str().unwrap(),
    );
    let read_token = reader["token"].as_str().unwrap();
    let shown = up.store(&["collection", "notes"]).json();
    assert_eq!(shown["tokens"].as_array().unwrap().len(), 2);
    assert!(!shown.to_string().contains(write_token), "{shown}");

    let http = reqwest::Client::new();
    let url = format!("{}/_funcatron/store/notes/n6", up.base);
    let put = |token: Option<&str>| {
        let mut rb = http.put(&url).json(&json!({"kind": "c", "n": 6}));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        async move { rb.send().await.unwrap() }
    };
    let r = put(Some(write_token)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "\"1\"");
    assert_eq!(put(Some(read_token)).await.status(), 403);
    assert_eq!(put(None).await.status(), 401);
    let r = http.get(&url).bearer_auth(read_token).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["doc"]["kind"], "c");
    // The CLI works there too, with a collection token.
    let on_ingress = As {
        token: Some(write_token),
        read_token: None,
    };
    let c = run(
        &up.base,
        on_ingress,
        &["list", "notes", "--all", "--where", "kind=c"],
        None,
    )
    .json();
    assert_eq!(ids(&c), ["n6"]);

    assert_eq!(
        up.store(&["token", "revoke", "notes", write_id]).json(),
        json!({"revoked": write_id})
    );
    let again = up.store(&["token", "revoke", "notes", write_id]);
    assert!(
        again.refused().contains("unknown_token"),
        "{}",
        again.stderr
    );
    // Definitions are cached for up to a second where another node reads them.
    eventually("the revoked token is refused", || async {
        put(Some(write_token)).await.status() == 403
    })
    .await;
    assert_eq!(
        up.store(&["collection", "notes"]).json()["tokens"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

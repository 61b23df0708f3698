//! Funcs reach the document store through their Runner: `funcatron up
//! --store` (embedded broker, the embedded state store in a file) serving
//! the same script of store operations in Lua, Python, Node.js and Java.
//! Each Func writes, patches, reads, lists and deletes a document of a
//! collection its bundle declares read-write (with a JSON Schema), and is
//! refused what it did not declare (writing a read-only collection,
//! reading an undeclared one), a stale version and a schema violation;
//! it answers with what it saw, and the test checks each runtime saw the
//! same. Then the ryo-faas pattern with the `word-count` example: a new
//! document in `articles` triggers a Func that writes a derived document
//! in `article-stats`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// What each bundle declares: `notes` read-write with a schema, `audit`
/// read-only; `secrets` exists but is not declared.
fn manifest(name: &str, runtime: &str, handler: &str, op: &str) -> String {
    format!(
        "swagger: '2.0'\ninfo: {{title: {name}, version: '1'}}\nbasePath: /{name}\n\
         x-funcatron:\n  name: {name}\n  runtime: {runtime}\n  handler: {handler}\n  timeout_ms: 20000\n\
         \x20 store: {{notes: [read, write], audit: [read]}}\n\
         \x20 collections:\n    notes: {{schema: {{type: object, required: [text], properties: {{text: {{type: string}}}}}}}}\n    audit: {{}}\n\
         paths:\n  /run/{{id}}:\n    post:\n      operationId: '{op}'\n      parameters: [{{name: id, in: path, required: true, type: string}}]\n      responses: {{'200': {{description: ok}}}}\n"
    )
}

const LUA: &str = r#"
function run(req)
  local id, rt = req.params.id, "lua"
  local out = {}
  local a = assert(store.put("notes", id, {text = "hi", owner = rt}))
  out.v1 = a.version
  local b = assert(store.merge("notes", id, {text = "bye"}))
  out.v2 = b.version
  out.text = assert(store.get("notes", id)).doc.text
  local page = assert(store.list("notes", {filter = {owner = rt}}))
  out.listed = #page.documents
  local _, e1 = store.put("audit", id, {x = 1})
  out.read_only = e1.status .. " " .. e1.error
  local _, e2 = store.get("secrets", "s1")
  out.undeclared = e2.status .. " " .. e2.error
  local _, e3 = store.put("notes", id, {text = "late"}, {if_version = 1})
  out.stale = e3.status .. " " .. e3.error
  local _, e4 = store.put("notes", id, {text = 5})
  out.schema = e4.status .. " " .. e4.error
  local missing, e5 = store.get("notes", "nobody")
  out.missing = (missing == nil) and e5.error or "found"
  out.deleted = assert(store.delete("notes", id)).deleted
  out.created = #assert(store.create("notes", {text = "made"})).id
  return out
end
"#;

const PY: &str = r#"from funcatron import store, StoreError


def err(f):
    try:
        f()
    except StoreError as e:
        return f"{e.status} {e.code}"
    return "allowed"


def run(req):
    id, rt = req.params["id"], "python"
    out = {}
    out["v1"] = store.put("notes", id, {"text": "hi", "owner": rt})["version"]
    out["v2"] = store.merge("notes", id, {"text": "bye"})["version"]
    out["text"] = store.get("notes", id)["doc"]["text"]
    out["listed"] = len(store.list("notes", filter={"owner": rt})["documents"])
    out["read_only"] = err(lambda: store.put("audit", id, {"x": 1}))
    out["undeclared"] = err(lambda: store.get("secrets", "s1"))
    out["stale"] = err(lambda: store.put("notes", id, {"text": "late"}, if_version=1))
    out["schema"] = err(lambda: store.put("notes", id, {"text": 5}))
    out["missing"] = "not_found" if store.get("notes", "nobody") is None else "found"
    out["deleted"] = store.delete("notes", id)["deleted"]
    out["created"] = len(store.create("notes", {"text": "made"})["id"])
    return out
"#;

const JS: &str = r#"
async function err(p) {
  try { await p; } catch (e) { return `${e.status} ${e.code}`; }
  return 'allowed';
}
exports.run = async (req) => {
  const id = req.params.id, rt = 'node', s = req.store, out = {};
  out.v1 = (await s.put('notes', id, { text: 'hi', owner: rt })).version;
  out.v2 = (await s.merge('notes', id, { text: 'bye' })).version;
  out.text = (await s.get('notes', id)).doc.text;
  out.listed = (await s.list('notes', { filter: { owner: rt } })).documents.length;
  out.read_only = await err(s.put('audit', id, { x: 1 }));
  out.undeclared = await err(s.get('secrets', 's1'));
  out.stale = await err(s.put('notes', id, { text: 'late' }, { ifVersion: 1 }));
  out.schema = await err(s.put('notes', id, { text: 5 }));
  out.missing = (await s.get('notes', 'nobody')) === null ? 'not_found' : 'found';
  out.deleted = (await s.delete('notes', id)).deleted;
  out.created = (await s.create('notes', { text: 'made' })).id.length;
  return out;
};
"#;

const JAVA: &str = r#"package demo;

import funcatron.Request;
import funcatron.Store;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.Supplier;

public class Notes {
    static String err(Supplier<Object> f) {
        try { f.get(); } catch (Store.StoreException e) { return e.status + " " + e.code; }
        return "allowed";
    }

    @SuppressWarnings("unchecked")
    public static Object run(Request req) {
        String id = req.params.get("id"), rt = "java";
        Store s = req.store;
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("v1", s.put("notes", id, Map.of("text", "hi", "owner", rt)).get("version"));
        out.put("v2", s.merge("notes", id, Map.of("text", "bye")).get("version"));
        out.put("text", ((Map<String, Object>) s.get("notes", id).get("doc")).get("text"));
        out.put("listed", ((List<Object>) s.list("notes", Map.of("owner", rt), null, null).get("documents")).size());
        out.put("read_only", err(() -> s.put("audit", id, Map.of("x", 1))));
        out.put("undeclared", err(() -> s.get("secrets", "s1")));
        out.put("stale", err(() -> s.put("notes", id, Map.of("text", "late"), 1L)));
        out.put("schema", err(() -> s.put("notes", id, Map.of("text", 5))));
        out.put("missing", s.get("notes", "nobody") == null ? "not_found" : "found");
        out.put("deleted", s.delete("notes", id).get("deleted"));
        out.put("created", ((String) s.create("notes", Map.of("text", "made")).get("id")).length());
        return out;
    }
}
"#;

/// The JSON of the first 200 answer to `request()`, polled within `limit`.
async fn first_200(
    what: &str,
    limit: Duration,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> Value {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Ok(r) = request().send().await {
            if r.status() == 200 {
                return r.json().await.unwrap();
            }
        }
        assert!(
            std::time::Instant::now() < until,
            "never (in {limit:?}): {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funcs_in_every_runtime_use_the_store_they_declare() {
    let root = tempfile::tempdir().unwrap();
    let bundles = root.path().join("bundles");
    let notes = [
        ("notes-lua", "lua", "main.lua", "run", "main.lua", LUA),
        ("notes-py", "python", "main.py", "run", "main.py", PY),
        ("notes-js", "nodejs", "main.js", "run", "main.js", JS),
        (
            "notes-java",
            "java",
            "src",
            "demo.Notes::run",
            "src/demo/Notes.java",
            JAVA,
        ),
    ];
    for (name, runtime, handler, op, file, code) in notes {
        let swagger = manifest(name, runtime, handler, op);
        write_bundle(
            &bundles,
            name,
            &[("swagger.yaml", swagger.as_str()), (file, code)],
        );
    }
    copy_examples(&bundles, &["word-count"]);
    let cmd = UpCmd::new(&bundles, &root.path().join("store"));
    let _up = cmd.spawn("tok", &root.path().join("up.log"));
    let base = cmd.base.clone();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // `secrets` is the operator's, declared by no bundle.
    eventually("the store serves", || async {
        http.put(format!("{base}/_funcatron/store/secrets/_collection"))
            .bearer_auth("tok")
            .json(&json!({}))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;

    let want = json!({
        "v1": 1, "v2": 2, "text": "bye", "listed": 1,
        "read_only": "403 forbidden",
        "undeclared": "403 forbidden",
        "stale": "412 precondition_failed",
        "schema": "400 schema_violation",
        "missing": "not_found",
        "deleted": true,
        // A create without an id gets one (32 hex digits).
        "created": 32,
    });
    for (name, ..) in notes {
        let url = format!("{base}/{name}/run/n-{name}");
        let got = first_200(&format!("{name} answers"), Duration::from_secs(120), || {
            http.post(&url)
        })
        .await;
        assert_eq!(got, want, "{name}");
        // The Func's delete reached the store.
        let r = http
            .get(format!("{base}/_funcatron/store/notes/n-{name}"))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{name}");
    }
    // Nothing was written where writing was refused.
    let r: Value = http
        .get(format!("{base}/_funcatron/store/audit"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["documents"], json!([]));

    // ryo-faas: a new article -> its derived stats document.
    let r = http
        .put(format!("{base}/_funcatron/store/articles/a1"))
        .bearer_auth("tok")
        .json(&json!({"title": "t", "text": "one two  three\nfour"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stats = first_200("the derived document", Duration::from_secs(60), || {
        http.get(format!("{base}/_funcatron/store/article-stats/a1"))
            .bearer_auth("tok")
    })
    .await;
    assert_eq!(stats["doc"]["words"], 4, "{stats}");
    assert_eq!(stats["doc"]["source_version"], 1, "{stats}");
}

//! The document store on every backend: the memory store, the embedded
//! store (redb, in a file) and PostgreSQL (`FUNCATRON_TEST_POSTGRES`,
//! started by `scripts/test.sh`; these fail, not skip, without it). Each
//! case runs once per backend, on a store of its own.

use std::collections::BTreeSet;

use anyhow::{bail, ensure, Context, Result};
use funcatron_documents::{
    Access, Definition, DocError, Documents, EventKind, Filter, Precondition,
};
use funcatron_store::{AnyStore, PostgresOptions, PostgresStore};
use serde_json::{json, Value};

const DEFAULT_URL: &str = "postgres://funcatron:funcatron@127.0.0.1:5432/funcatron_test";

/// A backend for one case, and what to clean up after it.
enum Backend {
    Memory,
    /// Held so the directory outlives the store.
    File {
        _dir: tempfile::TempDir,
    },
    Postgres(PostgresStore),
}

impl Backend {
    async fn open(kind: &str) -> Result<(AnyStore, Backend)> {
        Ok(match kind {
            "memory" => (AnyStore::memory()?, Backend::Memory),
            "file" => {
                let dir = tempfile::tempdir()?;
                let store = AnyStore::open_embedded(dir.path().join("store.redb")).await?;
                (store, Backend::File { _dir: dir })
            }
            _ => {
                let url = std::env::var("FUNCATRON_TEST_POSTGRES")
                    .unwrap_or_else(|_| DEFAULT_URL.to_owned());
                let table = format!("docs_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
                let options = PostgresOptions {
                    table,
                    ..PostgresOptions::default()
                };
                let pg = PostgresStore::connect_with(&url, options)
                    .await
                    .context("PostgreSQL at FUNCATRON_TEST_POSTGRES (scripts/test.sh starts it)")?;
                (AnyStore::Postgres(pg.clone()), Backend::Postgres(pg))
            }
        })
    }

    async fn close(self) -> Result<()> {
        if let Backend::Postgres(pg) = self {
            pg.drop_table().await?;
        }
        Ok(())
    }
}

macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::*;
                async fn run(kind: &str) -> Result<()> {
                    let (store, backend) = Backend::open(kind).await?;
                    let outcome = super::$case(Documents::new(store)).await;
                    backend.close().await?;
                    outcome
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn memory() -> Result<()> { run("memory").await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn embedded_file() -> Result<()> { run("file").await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() -> Result<()> { run("postgres").await }
            }
        )*
    };
}

on_every_backend!(
    crud_and_events,
    filters_and_pages,
    schema_refusal,
    bad_requests,
    one_document_events_in_commit_order,
    tokens_and_definitions,
    unchanged_writes_and_preconditions,
);

/// A write that changes nothing makes no version and no event; `If-Match:
/// *` on a missing document is a failed precondition, a plain patch of
/// one is not found.
async fn unchanged_writes_and_preconditions(docs: Documents) -> Result<()> {
    docs.define("c", Definition::default()).await?;
    docs.create("c", Some("d"), json!({"a": 1})).await?;
    let same = docs
        .put("c", "d", json!({"a": 1}), Precondition::None)
        .await?;
    ensure!(same.version == 1, "the same document is no new version");
    let merged = docs.merge("c", "d", &json!({}), Precondition::None).await?;
    ensure!(
        merged.version == 1 && merged.doc == json!({"a": 1}),
        "an empty merge changes nothing"
    );
    ensure!(docs.backlog().await? == 1, "only the create's event");
    match docs
        .merge("c", "gone", &json!({"a": 1}), Precondition::Exists)
        .await
    {
        Err(DocError::Precondition { current: None }) => {}
        other => {
            bail!("If-Match: * on a missing document is a precondition failure, got {other:?}")
        }
    }
    match docs
        .merge("c", "gone", &json!({"a": 1}), Precondition::None)
        .await
    {
        Err(DocError::NotFound { .. }) => {}
        other => bail!("a patch of a missing document is NotFound, got {other:?}"),
    }
    Ok(())
}

/// The events waiting in the outbox for one document, in order.
async fn events_of(docs: &Documents, collection: &str, id: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = docs.pending(after.as_deref(), 500).await?;
        for p in &page {
            let e = p.event.clone().map_err(anyhow::Error::msg)?;
            if e.collection == collection && e.id == id {
                out.push(serde_json::to_value(e)?);
            }
        }
        match page.last() {
            Some(last) if page.len() == 500 => after = Some(last.key.clone()),
            _ => return Ok(out),
        }
    }
}

async fn crud_and_events(docs: Documents) -> Result<()> {
    docs.define("orders", Definition::default()).await?;
    let created = docs
        .create(
            "orders",
            Some("o1"),
            json!({"item": "tea", "qty": 1, "note": "x"}),
        )
        .await?;
    ensure!(created.version == 1, "a new document is version 1");
    let read = docs.get("orders", "o1").await?.context("o1 exists")?;
    ensure!(
        read.doc == json!({"item": "tea", "qty": 1, "note": "x"}),
        "read back"
    );
    ensure!(read.version == 1, "version read back");
    match docs
        .create("orders", Some("o1"), json!({"item": "coffee"}))
        .await
    {
        Err(DocError::Precondition { current: Some(1) }) => {}
        other => bail!("a create of a taken id should fail, got {other:?}"),
    }
    let put = docs
        .put(
            "orders",
            "o1",
            json!({"item": "tea", "qty": 2, "note": "x"}),
            Precondition::Version(1),
        )
        .await?;
    ensure!(put.version == 2, "a put is version 2");
    match docs
        .put(
            "orders",
            "o1",
            json!({"item": "stale"}),
            Precondition::Version(1),
        )
        .await
    {
        Err(DocError::Precondition { current: Some(2) }) => {}
        other => bail!("a stale put should be refused naming version 2, got {other:?}"),
    }
    let merged = docs
        .merge(
            "orders",
            "o1",
            &json!({"qty": 3, "note": null, "ship": {"to": "Lyon"}}),
            Precondition::None,
        )
        .await?;
    ensure!(
        merged.doc == json!({"item": "tea", "qty": 3, "ship": {"to": "Lyon"}}),
        "merge patch: replaced, removed (null), added: {}",
        merged.doc
    );
    ensure!(merged.version == 3, "the merge is version 3");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/qty", "value": 3},
        {"op": "replace", "path": "/ship/to", "value": "Nantes"}
    ]))?;
    let patched = docs
        .json_patch("orders", "o1", &patch, Precondition::None)
        .await?;
    ensure!(
        patched.doc["ship"]["to"] == "Nantes",
        "a JSON Patch applied"
    );
    let failing: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/qty", "value": 99}]))?;
    ensure!(
        matches!(
            docs.json_patch("orders", "o1", &failing, Precondition::None)
                .await,
            Err(DocError::Invalid(_))
        ),
        "a failing JSON Patch test is refused"
    );
    let deleted = docs.delete("orders", "o1", Precondition::None).await?;
    ensure!(
        deleted.version == 4 && deleted.doc["ship"]["to"] == "Nantes",
        "delete answers the old document"
    );
    ensure!(docs.get("orders", "o1").await?.is_none(), "deleted");
    ensure!(
        matches!(
            docs.delete("orders", "o1", Precondition::None).await,
            Err(DocError::NotFound { .. })
        ),
        "a second delete is NotFound"
    );
    ensure!(
        matches!(
            docs.merge("orders", "o1", &json!({"a": 1}), Precondition::None)
                .await,
            Err(DocError::NotFound { .. })
        ),
        "a patch of a missing document is NotFound"
    );
    let again = docs
        .put(
            "orders",
            "o1",
            json!({"item": "cake"}),
            Precondition::Absent,
        )
        .await?;
    ensure!(
        again.version == 6,
        "a re-created document continues its versions (6), got {}",
        again.version
    );
    let fresh = docs.create("orders", None, json!({"item": "x"})).await?;
    ensure!(fresh.id.len() == 32, "a fresh id");

    let events = events_of(&docs, "orders", "o1").await?;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    ensure!(
        kinds == ["created", "updated", "updated", "updated", "deleted", "created"],
        "one event per change, in order: {kinds:?}"
    );
    let versions: Vec<u64> = events
        .iter()
        .filter_map(|e| e["version"].as_u64())
        .collect();
    ensure!(versions == [1, 2, 3, 4, 5, 6], "versions {versions:?}");
    ensure!(
        events[0]["old"].is_null() && events[0]["new"]["qty"] == 1,
        "created: new only"
    );
    ensure!(
        events[1]["old"]["qty"] == 1 && events[1]["new"]["qty"] == 2,
        "updated: old and new"
    );
    ensure!(
        events[4]["old"]["ship"]["to"] == "Nantes" && events[4]["new"].is_null(),
        "deleted: old only"
    );
    let ids: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    ensure!(ids.len() == 6, "event ids are unique");
    // Delivered events leave the outbox.
    let pending = docs.pending(None, 100).await?;
    ensure!(
        pending.len() == 7,
        "seven events wait, got {}",
        pending.len()
    );
    let keys: Vec<&str> = pending.iter().map(|p| p.key.as_str()).collect();
    docs.delivered(&keys[..3]).await?;
    docs.delivered(&keys[..3]).await?;
    ensure!(
        docs.backlog().await? == 4,
        "three delivered, a repeat is harmless"
    );
    Ok(())
}

async fn filters_and_pages(docs: Documents) -> Result<()> {
    docs.define("tasks", Definition::default()).await?;
    for i in 0..25u64 {
        let state = if i % 3 == 0 { "open" } else { "closed" };
        docs.create(
            "tasks",
            Some(&format!("t{i:02}")),
            json!({"state": state, "n": i % 2, "tag": "x"}),
        )
        .await?;
    }
    let mut seen = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = docs
            .list(
                "tasks",
                &Filter {
                    equals: vec![("state".into(), json!("open"))],
                    after: after.clone(),
                    limit: Some(3),
                },
            )
            .await?;
        ensure!(page.documents.len() <= 3, "a page holds at most the limit");
        seen.extend(page.documents.iter().map(|d| d.id.clone()));
        ensure!(
            page.documents.iter().all(|d| d.doc["state"] == "open"),
            "only open ones"
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let want: Vec<String> = (0..25)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("t{i:02}"))
        .collect();
    ensure!(seen == want, "every open task once, in id order: {seen:?}");
    let both = docs
        .list(
            "tasks",
            &Filter {
                equals: vec![("state".into(), json!("open")), ("n".into(), json!(1))],
                ..Filter::default()
            },
        )
        .await?;
    let ids: Vec<&str> = both.documents.iter().map(|d| d.id.as_str()).collect();
    ensure!(ids == ["t03", "t09", "t15", "t21"], "two filters: {ids:?}");
    ensure!(both.next.is_none(), "the last page has no next");
    let all = docs.list("tasks", &Filter::default()).await?;
    ensure!(
        all.documents.len() == 25 && all.next.is_none(),
        "everything in one page"
    );
    docs.delete("tasks", "t00", Precondition::None).await?;
    let after_delete = docs
        .list(
            "tasks",
            &Filter {
                limit: Some(1),
                ..Filter::default()
            },
        )
        .await?;
    ensure!(
        after_delete.documents[0].id == "t01",
        "deleted documents are not listed"
    );
    ensure!(docs.count("tasks").await? == 24, "counted");
    Ok(())
}

async fn schema_refusal(docs: Documents) -> Result<()> {
    let schema = json!({
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}
    });
    docs.define(
        "people",
        Definition {
            schema: Some(schema),
            ..Definition::default()
        },
    )
    .await?;
    match docs
        .create("people", Some("p1"), json!({"name": 7, "age": -1}))
        .await
    {
        Err(DocError::Schema(problems)) => {
            let all = problems.join("\n");
            ensure!(
                all.contains("/name") && all.contains("/age"),
                "the problems name the fields: {all}"
            );
        }
        other => bail!("a document off its schema should be refused, got {other:?}"),
    }
    ensure!(docs.get("people", "p1").await?.is_none(), "nothing written");
    ensure!(docs.backlog().await? == 0, "a refused write has no event");
    docs.create("people", Some("p1"), json!({"name": "Ada", "age": 36}))
        .await?;
    match docs
        .merge("people", "p1", &json!({"name": null}), Precondition::None)
        .await
    {
        Err(DocError::Schema(_)) => {}
        other => bail!("a patch leaving the schema should be refused, got {other:?}"),
    }
    ensure!(
        docs.get("people", "p1").await?.context("p1")?.doc["name"] == "Ada",
        "unchanged"
    );
    ensure!(
        matches!(
            docs.define(
                "bad",
                Definition {
                    schema: Some(json!({"type": 12})),
                    ..Definition::default()
                }
            )
            .await,
            Err(DocError::Invalid(_))
        ),
        "a schema that is not one is refused"
    );
    Ok(())
}

async fn bad_requests(docs: Documents) -> Result<()> {
    ensure!(
        matches!(
            docs.get("nope", "x").await,
            Err(DocError::UnknownCollection(_))
        ),
        "an undefined collection"
    );
    ensure!(
        matches!(
            docs.create("nope", None, json!({})).await,
            Err(DocError::UnknownCollection(_))
        ),
        "no write to an undefined collection"
    );
    ensure!(
        matches!(
            docs.define("Bad Name", Definition::default()).await,
            Err(DocError::Invalid(_))
        ),
        "a bad collection name"
    );
    docs.define("c", Definition::default()).await?;
    ensure!(
        matches!(
            docs.create("c", Some("_x"), json!({})).await,
            Err(DocError::Invalid(_))
        ),
        "a reserved id"
    );
    ensure!(
        matches!(
            docs.create("c", Some("a/b"), json!({})).await,
            Err(DocError::Invalid(_))
        ),
        "a bad id"
    );
    ensure!(
        matches!(
            docs.create("c", None, json!([1, 2])).await,
            Err(DocError::Invalid(_))
        ),
        "a document is an object"
    );
    let big = json!({"blob": "x".repeat(funcatron_documents::MAX_DOCUMENT_BYTES)});
    ensure!(
        matches!(docs.create("c", None, big).await, Err(DocError::Invalid(_))),
        "a document over the size limit"
    );
    ensure!(docs.backlog().await? == 0, "no event for refused writes");
    Ok(())
}

/// Writers racing on one document: every change is committed with its
/// event, and the events come out in commit order, each one's `old` the
/// previous one's `new`.
async fn one_document_events_in_commit_order(docs: Documents) -> Result<()> {
    const TASKS: usize = 6;
    const EACH: u64 = 8;
    docs.define("counters", Definition::default()).await?;
    docs.create("counters", Some("n"), json!({"n": 0})).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let docs = docs.clone();
        tasks.spawn(async move {
            for _ in 0..EACH {
                loop {
                    let d = docs.get("counters", "n").await?.context("n")?;
                    let n = d.doc["n"].as_u64().context("n is a number")?;
                    match docs
                        .put(
                            "counters",
                            "n",
                            json!({"n": n + 1}),
                            Precondition::Version(d.version),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(DocError::Precondition { .. }) => {}
                        Err(e) => return Err(anyhow::Error::new(e)),
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let total = TASKS as u64 * EACH;
    let last = docs.get("counters", "n").await?.context("n")?;
    ensure!(
        last.doc["n"] == total && last.version == total + 1,
        "no update lost"
    );
    let events = events_of(&docs, "counters", "n").await?;
    ensure!(events.len() as u64 == total + 1, "one event per change");
    for (i, e) in events.iter().enumerate() {
        ensure!(e["version"] == i as u64 + 1, "in commit order");
        if i > 0 {
            ensure!(
                e["old"] == events[i - 1]["new"],
                "each old is the previous new"
            );
            ensure!(e["type"] == EventKind::Updated.as_str(), "updates");
        }
    }
    Ok(())
}

async fn tokens_and_definitions(docs: Documents) -> Result<()> {
    docs.define(
        "notes",
        Definition {
            read: Access::Public,
            write: Access::Token,
            ..Definition::default()
        },
    )
    .await?;
    let (reader, reader_id) = docs.add_token("notes", false).await?;
    let (writer, _) = docs.add_token("notes", true).await?;
    let c = docs.collection("notes").await?;
    ensure!(
        c.token_allows(&reader, false) && !c.token_allows(&reader, true),
        "a read token reads"
    );
    ensure!(c.token_allows(&writer, true), "a write token writes");
    ensure!(
        !c.token_allows("fst_guess", false),
        "a wrong token opens nothing"
    );
    let view = c.view();
    ensure!(view.tokens.len() == 2, "two tokens listed");
    ensure!(
        !serde_json::to_string(&view)?.contains(&writer),
        "a token is never shown again"
    );
    ensure!(docs.revoke_token("notes", &reader_id).await?, "revoked");
    ensure!(
        !docs.revoke_token("notes", &reader_id).await?,
        "revoked once"
    );
    ensure!(
        !docs.collection("notes").await?.token_allows(&reader, false),
        "a revoked token opens nothing"
    );
    let names: Vec<String> = docs
        .collections()
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect();
    ensure!(names == ["notes"], "listed: {names:?}");
    docs.create("notes", Some("n1"), json!({})).await?;
    ensure!(
        matches!(
            docs.drop_collection("notes").await,
            Err(DocError::NotEmpty(_))
        ),
        "a collection with documents is not dropped"
    );
    docs.delete("notes", "n1", Precondition::None).await?;
    docs.drop_collection("notes").await?;
    ensure!(
        matches!(
            docs.get("notes", "n1").await,
            Err(DocError::UnknownCollection(_))
        ),
        "dropped"
    );
    Ok(())
}

/// The outbox is durable: events written before the store closes are
/// there after it opens again (a Tron killed between the write and the
/// delivery still delivers).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_survive_reopening_the_embedded_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    {
        let docs = Documents::new(AnyStore::open_embedded(&path).await?);
        docs.define("orders", Definition::default()).await?;
        docs.create("orders", Some("o1"), json!({"a": 1})).await?;
        docs.merge("orders", "o1", &json!({"b": 2}), Precondition::None)
            .await?;
    }
    let docs = Documents::new(AnyStore::open_embedded(&path).await?);
    let events = events_of(&docs, "orders", "o1").await?;
    ensure!(events.len() == 2, "both events kept");
    ensure!(
        events[1]["new"] == json!({"a": 1, "b": 2}),
        "with their documents"
    );
    Ok(())
}

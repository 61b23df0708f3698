//! The JSON document store, beside the request path: clients (HTTP on the
//! ingress, `/_funcatron/store/...`), operators (the CLI, through a Tron)
//! and Funcs (through their Runner and a Tron) -> **[`Documents`]** -> the
//! state store ([`funcatron_store`]) -> the outbox -> the relay on a Tron ->
//! triggered Funcs.
//!
//! A collection holds JSON objects by id. It exists once defined
//! ([`Documents::define`]: an optional JSON Schema every write is checked
//! against, and who may read and write it, see [`collections`]). Every
//! document has a version, 1 when created and one more on every change; it
//! is the document's `ETag`, and a write may name the version it expects
//! ([`Precondition`]), so no update is lost.
//!
//! Every change emits an [`Event`] (created, updated, deleted) carrying the
//! old and the new document. The change and its event are written in one
//! atomic batch of the state store ([`funcatron_store::Store::commit`]): the
//! document's record and the event's record in the outbox ([`outbox`]), so
//! no event is lost (a crash after the write still has it) and none is
//! invented (a refused write has none). A write is answered only once that
//! batch is durable. The relay reads the outbox in order, per document in
//! commit order, and delivers each event at least once; the event id lets
//! a subscriber drop a repeat.
//!
//! Records: `doc:<collection>` holds the documents (key: the id, status
//! `live`, or `deleted` for a tombstone that keeps the version counter for
//! [`TOMBSTONE_MS`] so a re-created document continues its versions),
//! [`collections::COLLECTIONS`] the definitions, [`outbox::OUTBOX`] the
//! events not yet delivered. A store shared by several Trons (PostgreSQL)
//! shares all of it.

#![warn(clippy::too_many_lines)]

pub mod collections;
pub mod http;
pub mod outbox;
pub mod rpc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use funcatron_store::{now_ms, AnyStore, Query, Record, Store, StoreError, Write};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use collections::{Access, Collection, CollectionView, Definition};
pub use outbox::{Event, EventKind, Pending};

/// Most bytes of one document, as JSON.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Most records one [`Documents::list`] reads before it answers (with a
/// cursor to go on from), so a filter matching little never scans a whole
/// collection in one request.
pub const MAX_SCAN: usize = 2_000;

/// Most documents one [`Documents::list`] returns.
pub const MAX_PAGE: usize = 1_000;

/// How long a deleted document's tombstone (its version counter) is kept:
/// 30 days.
pub const TOMBSTONE_MS: u64 = 30 * 24 * 3600 * 1000;

/// How long a collection's definition is cached before it is read again:
/// a change made on another Tron takes effect within this.
pub const DEFINITION_TTL: Duration = Duration::from_secs(1);

/// Times a write without a precondition is tried again when another
/// writer changed the document between its read and its commit.
const WRITE_TRIES: usize = 32;

/// Status of a live document's record.
const LIVE: &str = "live";
/// Status of a tombstone.
const DELETED: &str = "deleted";

/// Why a document operation failed; each maps to one HTTP status
/// ([`DocError::status`]) and code ([`DocError::code`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DocError {
    /// No collection of this name is defined.
    #[error("no collection {0:?} (define it first: PUT /_funcatron/store/{0}/_collection)")]
    UnknownCollection(String),
    /// No live document of this id.
    #[error("no document {id:?} in {collection:?}")]
    NotFound {
        /// The collection.
        collection: String,
        /// The id.
        id: String,
    },
    /// The request cannot be done as given (a bad name, not a JSON
    /// object, too large); retrying does not help.
    #[error("{0}")]
    Invalid(String),
    /// The document does not match its collection's schema.
    #[error("the document does not match the collection's schema: {}", .0.join("; "))]
    Schema(Vec<String>),
    /// The write's precondition does not hold: the document's version is
    /// not the one expected (`If-Match`), or it exists (`If-None-Match: *`,
    /// a create with a taken id).
    #[error("precondition failed: {}", match current {
        Some(v) => format!("the document is at version {v}"),
        None => "there is no such document".to_owned(),
    })]
    Precondition {
        /// The live document's version, `None` when there is none.
        current: Option<u64>,
    },
    /// A collection to be removed still holds documents.
    #[error("collection {0:?} still holds documents")]
    NotEmpty(String),
    /// Other writers kept changing the document; try again.
    #[error("the document kept changing under the write; try again")]
    Busy,
    /// A stored record could not be read back (written by something else).
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    /// The state store failed or cannot be reached.
    #[error("state store: {0}")]
    Store(StoreError),
}

impl From<StoreError> for DocError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(why) => DocError::Invalid(why),
            e => DocError::Store(e),
        }
    }
}

impl DocError {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            DocError::UnknownCollection(_) | DocError::NotFound { .. } => 404,
            DocError::Invalid(_) | DocError::Schema(_) => 400,
            DocError::Precondition { .. } => 412,
            DocError::NotEmpty(_) => 409,
            DocError::Busy | DocError::Store(_) => 503,
            DocError::Corrupt(_) => 500,
        }
    }

    /// The error code of the JSON answer (bounded: also a metrics label).
    pub fn code(&self) -> &'static str {
        match self {
            DocError::UnknownCollection(_) => "unknown_collection",
            DocError::NotFound { .. } => "not_found",
            DocError::Invalid(_) => "bad_request",
            DocError::Schema(_) => "schema_violation",
            DocError::Precondition { .. } => "precondition_failed",
            DocError::NotEmpty(_) => "collection_not_empty",
            DocError::Busy => "busy",
            DocError::Corrupt(_) => "corrupt_record",
            DocError::Store(_) => "state_store_unavailable",
        }
    }
}

/// A stored document, as every read and write answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Its collection.
    pub collection: String,
    /// Its id in the collection.
    pub id: String,
    /// 1 when created, one more on every change: its `ETag`.
    pub version: u64,
    /// When it was last written (ms since the Unix epoch).
    pub updated_ms: u64,
    /// The document (a JSON object).
    pub doc: Value,
}

/// What a write requires of the document before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Nothing: the write applies to whatever is there.
    None,
    /// No live document (`If-None-Match: *`, a create).
    Absent,
    /// A live document, of any version (`If-Match: *`); else
    /// [`DocError::Precondition`].
    Exists,
    /// A live document, else [`DocError::NotFound`]: what a patch or a
    /// delete without a precondition requires.
    Live,
    /// A live document of this version (`If-Match: "<version>"`).
    Version(u64),
}

/// A document record's value: the version counter, and the document
/// (`None` in a tombstone).
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u64,
    #[serde(default)]
    doc: Option<Value>,
}

/// What a change did: the document before and after (`None`: there was
/// none, it was deleted).
struct Changed {
    old: Option<Document>,
    new: Option<Document>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    /// The matching documents, in id order (bytewise).
    pub documents: Vec<Document>,
    /// Pass as `after` for the next page; `None` when the listing is done.
    pub next: Option<String>,
}

/// Which documents [`Documents::list`] returns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Top-level fields and the values they must equal.
    pub equals: Vec<(String, Value)>,
    /// Only ids after this one (the previous page's `next`).
    pub after: Option<String>,
    /// Most documents to return (default 100, at most [`MAX_PAGE`]).
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, doc: &Value) -> bool {
        self.equals
            .iter()
            .all(|(field, want)| doc.get(field).is_some_and(|v| v == want))
    }
}

/// A cached definition, and when it was read.
type Cached = (Instant, Arc<Collection>);

/// The document store on a state store. Cloning shares it (and its cache
/// of definitions and the outbox signal).
#[derive(Clone)]
pub struct Documents {
    store: AnyStore,
    definitions: Arc<Mutex<HashMap<String, Cached>>>,
    /// Signalled after every committed change, for the relay.
    changed: Arc<tokio::sync::Notify>,
    /// Counts committed changes, for telling other processes.
    writes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Documents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Documents")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// The store collection holding a document collection's records.
pub(crate) fn records_of(collection: &str) -> String {
    format!("doc:{collection}")
}

/// A document id: 1 to 200 characters of `A-Z a-z 0-9 . _ ~ - : @`, not
/// starting with `_` or `.` (names such as `_collection` are the API's).
pub fn check_id(id: &str) -> Result<(), DocError> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with(['_', '.'])
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-' | b':' | b'@')
        });
    if ok {
        Ok(())
    } else {
        Err(DocError::Invalid(format!(
            "document id {id:?}: use 1 to 200 of A-Z a-z 0-9 . _ ~ - : @, not starting with _ or ."
        )))
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DocError {
    DocError::Corrupt(format!("{what}: {e}"))
}

impl Documents {
    /// The document store on `store`.
    pub fn new(store: AnyStore) -> Self {
        Documents {
            store,
            definitions: Arc::default(),
            changed: Arc::default(),
            writes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// The state store under it.
    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    /// Signalled (one permit) after every change committed through this
    /// handle or its clones: the relay waits on it.
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.changed)
    }

    /// The number of changes committed through this handle or its clones,
    /// as a watch (for telling other processes' relays:
    /// `funcatron_tron::triggers::announce`).
    pub fn writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writes.subscribe()
    }

    /// The live document, if any.
    pub async fn get(&self, collection: &str, id: &str) -> Result<Option<Document>, DocError> {
        self.collection(collection).await?;
        check_id(id)?;
        let found = self.store.get(&records_of(collection), id).await?;
        match found {
            Some(r) if r.status == LIVE => Ok(Some(document(collection, &r)?)),
            _ => Ok(None),
        }
    }

    /// Create a document; `id` `None` picks a fresh one. Fails with
    /// [`DocError::Precondition`] when a live document has the id.
    pub async fn create(
        &self,
        collection: &str,
        id: Option<&str>,
        doc: Value,
    ) -> Result<Document, DocError> {
        let fresh;
        let id = match id {
            Some(id) => id,
            None => {
                fresh = uuid::Uuid::new_v4().simple().to_string();
                &fresh
            }
        };
        let written = self
            .change(collection, id, Precondition::Absent, |_| {
                Ok(Some(doc.clone()))
            })
            .await?;
        written
            .new
            .ok_or_else(|| DocError::Corrupt("a create wrote no document".into()))
    }

    /// Write the whole document (creating it if `precondition` allows);
    /// the document written.
    pub async fn put(
        &self,
        collection: &str,
        id: &str,
        doc: Value,
        precondition: Precondition,
    ) -> Result<Document, DocError> {
        let written = self
            .change(collection, id, precondition, |_| Ok(Some(doc.clone())))
            .await?;
        written
            .new
            .ok_or_else(|| DocError::Corrupt("a put wrote no document".into()))
    }

    /// Apply a JSON merge patch (RFC 7396) to the live document.
    pub async fn merge(
        &self,
        collection: &str,
        id: &str,
        patch: &Value,
        precondition: Precondition,
    ) -> Result<Document, DocError> {
        self.patch_with(collection, id, precondition, |doc| {
            json_patch::merge(doc, patch);
            Ok(())
        })
        .await
    }

    /// Apply a JSON Patch (RFC 6902) to the live document; a failing
    /// operation (a `test`, a missing path) changes nothing.
    pub async fn json_patch(
        &self,
        collection: &str,
        id: &str,
        patch: &json_patch::Patch,
        precondition: Precondition,
    ) -> Result<Document, DocError> {
        self.patch_with(collection, id, precondition, |doc| {
            json_patch::patch(doc, patch).map_err(|e| DocError::Invalid(format!("JSON Patch: {e}")))
        })
        .await
    }

    async fn patch_with(
        &self,
        collection: &str,
        id: &str,
        precondition: Precondition,
        apply: impl Fn(&mut Value) -> Result<(), DocError>,
    ) -> Result<Document, DocError> {
        let precondition = match precondition {
            Precondition::None => Precondition::Live,
            p => p,
        };
        let written = self
            .change(collection, id, precondition, |old| {
                let mut doc = old.cloned().unwrap_or(Value::Null);
                apply(&mut doc)?;
                Ok(Some(doc))
            })
            .await?;
        written
            .new
            .ok_or_else(|| DocError::Corrupt("a patch wrote no document".into()))
    }

    /// Delete the live document; the document as it was.
    pub async fn delete(
        &self,
        collection: &str,
        id: &str,
        precondition: Precondition,
    ) -> Result<Document, DocError> {
        let precondition = match precondition {
            Precondition::None => Precondition::Live,
            p => p,
        };
        let changed = self
            .change(collection, id, precondition, |_| Ok(None))
            .await?;
        changed.old.ok_or_else(|| DocError::NotFound {
            collection: collection.to_owned(),
            id: id.to_owned(),
        })
    }

    /// One change: read the document, check the precondition, compute the
    /// new document (`None`: delete), check it, and commit it with its
    /// event; again from the read when another writer came first and the
    /// precondition does not pin a version.
    async fn change(
        &self,
        collection: &str,
        id: &str,
        precondition: Precondition,
        next: impl Fn(Option<&Value>) -> Result<Option<Value>, DocError>,
    ) -> Result<Changed, DocError> {
        let def = self.collection(collection).await?;
        check_id(id)?;
        let records = records_of(collection);
        for attempt in 0..WRITE_TRIES {
            if attempt > 0 {
                // Writers racing on one document: apart a little, at random.
                let ms = rand::random_range(0..(1u64 << attempt.min(5)));
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let current = self.store.get(&records, id).await?;
            let (stored, revision) = match &current {
                Some(r) => (
                    serde_json::from_slice::<Stored>(&r.value)
                        .map_err(|e| corrupt("a document record", e))?,
                    Some(r.revision),
                ),
                None => (
                    Stored {
                        version: 0,
                        doc: None,
                    },
                    None,
                ),
            };
            let live = stored.doc.as_ref().map(|_| stored.version);
            let holds = match precondition {
                Precondition::None => true,
                Precondition::Absent => live.is_none(),
                Precondition::Exists | Precondition::Live => live.is_some(),
                Precondition::Version(v) => live == Some(v),
            };
            if !holds {
                return Err(if precondition == Precondition::Live {
                    DocError::NotFound {
                        collection: collection.to_owned(),
                        id: id.to_owned(),
                    }
                } else {
                    DocError::Precondition { current: live }
                });
            }
            let new = next(stored.doc.as_ref())?;
            if new == stored.doc {
                // Nothing changes (a delete of nothing, a write of the
                // same document): no new version, no event.
                let unchanged = new.map(|doc| Document {
                    collection: collection.to_owned(),
                    id: id.to_owned(),
                    version: stored.version,
                    updated_ms: current.as_ref().map_or(0, |r| r.updated_ms),
                    doc,
                });
                return Ok(Changed {
                    old: unchanged.clone(),
                    new: unchanged,
                });
            }
            if let Some(doc) = &new {
                def.check(doc)?;
            }
            let version = stored.version + 1;
            let at = now_ms();
            let mut event = Event::new(collection, id, version, stored.doc, new.clone(), at);
            let write = document_write(&records, id, revision, version, new.as_ref(), at)?;
            match self.store.commit(&[write, event.record()?]).await {
                Ok(_) => {
                    self.changed.notify_one();
                    self.writes.send_modify(|n| *n += 1);
                    metrics::counter!("documents_writes_total", "kind" => event.kind.as_str())
                        .increment(1);
                    let as_document = |version, updated_ms, doc| Document {
                        collection: collection.to_owned(),
                        id: id.to_owned(),
                        version,
                        updated_ms,
                        doc,
                    };
                    let old_updated = current.as_ref().map_or(0, |r| r.updated_ms);
                    return Ok(Changed {
                        old: event
                            .old
                            .take()
                            .map(|doc| as_document(stored.version, old_updated, doc)),
                        new: new.map(|doc| as_document(version, at, doc)),
                    });
                }
                Err(StoreError::Conflict { .. } | StoreError::Exists { .. })
                    if !matches!(precondition, Precondition::Version(_)) =>
                {
                    metrics::counter!("documents_write_conflicts_total").increment(1);
                }
                Err(StoreError::Conflict { .. } | StoreError::Exists { .. }) => {
                    let now = self.get(collection, id).await?;
                    return Err(DocError::Precondition {
                        current: now.map(|d| d.version),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(DocError::Busy)
    }

    /// Documents matching `filter`, in id order, a page at a time. Reads
    /// at most [`MAX_SCAN`] records per call: a page may hold fewer than
    /// `limit` documents and still have a `next`.
    pub async fn list(&self, collection: &str, filter: &Filter) -> Result<Page, DocError> {
        self.collection(collection).await?;
        if let Some(after) = &filter.after {
            check_id(after)?;
        }
        let limit = filter.limit.unwrap_or(100).clamp(1, MAX_PAGE);
        let records = records_of(collection);
        let mut after = filter.after.clone();
        let mut documents = Vec::new();
        let mut scanned = 0;
        loop {
            let mut q = Query::new(&records)
                .status(LIVE)
                .limit(if filter.equals.is_empty() {
                    limit - documents.len()
                } else {
                    funcatron_store::MAX_LIST
                });
            q.after_key = after.clone();
            let batch = self.store.list(&q).await?;
            let full = batch.len() == q.limit;
            for r in &batch {
                scanned += 1;
                after = Some(r.key.clone());
                let d = document(collection, r)?;
                if filter.matches(&d.doc) {
                    documents.push(d);
                    if documents.len() == limit {
                        return Ok(Page {
                            documents,
                            next: after,
                        });
                    }
                }
                if scanned >= MAX_SCAN {
                    return Ok(Page {
                        documents,
                        next: after,
                    });
                }
            }
            if !full {
                return Ok(Page {
                    documents,
                    next: None,
                });
            }
        }
    }

    /// How many live documents the collection holds.
    pub async fn count(&self, collection: &str) -> Result<u64, DocError> {
        self.collection(collection).await?;
        Ok(self
            .store
            .count(&records_of(collection), None, Some(LIVE))
            .await?)
    }
}

/// The write of a document's new state: a live record, or a tombstone
/// (`doc` `None`); a replace of the record read (`revision`) or an insert.
fn document_write(
    records: &str,
    id: &str,
    revision: Option<u64>,
    version: u64,
    doc: Option<&Value>,
    at: u64,
) -> Result<Write, DocError> {
    // `{"version":N,"doc":...}`, with the document written once.
    let mut value = format!("{{\"version\":{version},\"doc\":").into_bytes();
    let start = value.len();
    serde_json::to_writer(&mut value, &doc)
        .map_err(|e| DocError::Invalid(format!("the document: {e}")))?;
    if value.len() - start > MAX_DOCUMENT_BYTES {
        return Err(DocError::Invalid(format!(
            "the document has {} bytes as JSON, more than {MAX_DOCUMENT_BYTES}",
            value.len() - start
        )));
    }
    value.push(b'}');
    let record = match doc {
        Some(_) => Record::new(records, id).with_status(LIVE),
        None => Record::new(records, id)
            .with_status(DELETED)
            .expiring_at(at.saturating_add(TOMBSTONE_MS)),
    }
    .with_value(value);
    Ok(match revision {
        Some(expected_revision) => Write::Replace {
            record,
            expected_revision,
        },
        None => Write::Insert(record),
    })
}

/// A live document record as a [`Document`].
fn document(collection: &str, r: &Record) -> Result<Document, DocError> {
    let stored: Stored =
        serde_json::from_slice(&r.value).map_err(|e| corrupt("a document record", e))?;
    Ok(Document {
        collection: collection.to_owned(),
        id: r.key.clone(),
        version: stored.version,
        updated_ms: r.updated_ms,
        doc: stored.doc.unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "order-1", "A.b_c~d:e@f", &"x".repeat(200)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_collection", ".x", "a/b", "a b", "é", &"x".repeat(201)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_compare_top_level_fields() {
        let f = Filter {
            equals: vec![("status".into(), "open".into()), ("n".into(), 3.into())],
            ..Filter::default()
        };
        assert!(f.matches(&serde_json::json!({"status": "open", "n": 3, "x": 1})));
        assert!(!f.matches(&serde_json::json!({"status": "open", "n": 4})));
        assert!(!f.matches(&serde_json::json!({"status": "open"})));
        assert!(Filter::default().matches(&serde_json::json!({})));
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(DocError::Schema(vec![]).status(), 400);
        assert_eq!(DocError::Precondition { current: None }.status(), 412);
        assert_eq!(
            DocError::UnknownCollection("x".into()).code(),
            "unknown_collection"
        );
        assert_eq!(
            DocError::from(StoreError::Invalid("x".into())),
            DocError::Invalid("x".into())
        );
        assert_eq!(
            DocError::from(StoreError::Unavailable("x".into())).status(),
            503
        );
    }
}

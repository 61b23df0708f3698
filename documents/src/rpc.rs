//! The document store as Funcs reach it: one operation per message, from
//! a Func's Runner to a Tron, never with database credentials of the
//! Func's own.
//!
//! Func (Lua `store.*`, the Python / Node.js / Java helpers) -> its Runner
//! (which names the Func and version: the Func cannot) ->
//! `funcatron.store` -> **a Tron with a document store: [`Request`]
//! checked against the bundle's `store` declaration, then [`execute`]** ->
//! the Runner's reply queue -> the Func.
//!
//! The answer is `{"status": N, "body": ...}` with the bodies of the HTTP
//! routes (`crate::http`): a document is `{collection, id, version,
//! updated_ms, doc}`, an error `{"error", "message"}` (and `problems` for
//! a schema refusal).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{DocError, Documents, Filter, Precondition};

/// The message header naming the Runner's reply queue.
pub const REPLY_HEADER: &str = "x-funcatron-store-reply";

/// Most equality filters in one `list`.
pub const MAX_FILTERS: usize = 16;

/// One operation of a Func on the document store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// One document.
    Get {
        /// The collection.
        collection: String,
        /// The document's id.
        id: String,
    },
    /// Documents whose top-level fields equal `filter`'s, a page at a time.
    List {
        /// The collection.
        collection: String,
        /// Field -> the value it must equal.
        #[serde(default)]
        filter: Map<String, Value>,
        /// The `next` of the previous page.
        #[serde(default)]
        after: Option<String>,
        /// Page size.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// A new document (`id` chosen by the store when absent); 412 when
    /// `id` is taken.
    Create {
        /// The collection.
        collection: String,
        /// Its id, if the Func chooses it.
        #[serde(default)]
        id: Option<String>,
        /// The document.
        doc: Value,
    },
    /// Write the whole document (created if missing).
    Put {
        /// The collection.
        collection: String,
        /// The document's id.
        id: String,
        /// The document.
        doc: Value,
        /// Only if it is at this version now (412 otherwise).
        #[serde(default)]
        if_version: Option<u64>,
    },
    /// Change the document by a JSON merge patch (RFC 7396); 404 when
    /// missing.
    Merge {
        /// The collection.
        collection: String,
        /// The document's id.
        id: String,
        /// The patch.
        patch: Value,
        /// Only if it is at this version now.
        #[serde(default)]
        if_version: Option<u64>,
    },
    /// Remove the document; 404 when missing.
    Delete {
        /// The collection.
        collection: String,
        /// The document's id.
        id: String,
        /// Only if it is at this version now.
        #[serde(default)]
        if_version: Option<u64>,
    },
}

impl Op {
    /// The collection it reaches.
    pub fn collection(&self) -> &str {
        match self {
            Op::Get { collection, .. }
            | Op::List { collection, .. }
            | Op::Create { collection, .. }
            | Op::Put { collection, .. }
            | Op::Merge { collection, .. }
            | Op::Delete { collection, .. } => collection,
        }
    }

    /// It changes the collection (needs `write`, else `read`).
    pub fn writes(&self) -> bool {
        !matches!(self, Op::Get { .. } | Op::List { .. })
    }
}

/// A Runner's request, as it travels on `funcatron.store`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The Func asking (set by its Runner).
    pub func: String,
    /// Its version (set by its Runner).
    pub version: String,
    /// Matches the answer to the waiting call on the Runner.
    pub key: String,
    /// When the Func stops waiting (Unix ms): a Tron skips it after.
    pub deadline_ms: u64,
    /// What it asks.
    pub op: Op,
}

/// A Tron's answer, on the Runner's reply queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// The request's key.
    pub key: String,
    /// The HTTP status the operation would have had.
    pub status: u16,
    /// The HTTP body it would have had.
    pub body: Value,
}

/// An error answer's status and body.
pub fn refusal(status: u16, code: &str, message: impl Into<String>) -> (u16, Value) {
    (status, json!({"error": code, "message": message.into()}))
}

fn failed(e: &DocError) -> (u16, Value) {
    let mut body = json!({"error": e.code(), "message": e.to_string()});
    if let DocError::Schema(problems) = e {
        body["problems"] = json!(problems);
    }
    if let DocError::Precondition {
        current: Some(version),
    } = e
    {
        body["version"] = json!(version);
    }
    (e.status(), body)
}

fn document(status: u16, d: &crate::Document) -> (u16, Value) {
    (status, serde_json::to_value(d).unwrap_or(Value::Null))
}

fn precondition(if_version: Option<u64>, otherwise: Precondition) -> Precondition {
    if_version.map_or(otherwise, Precondition::Version)
}

/// Run `op` (already allowed) on `docs`.
pub async fn execute(docs: &Documents, op: Op) -> (u16, Value) {
    let outcome = match op {
        Op::Get { collection, id } => match docs.get(&collection, &id).await {
            Ok(Some(d)) => Ok(document(200, &d)),
            Ok(None) => Ok(refusal(
                404,
                "not_found",
                format!("no document {id} in {collection}"),
            )),
            Err(e) => Err(e),
        },
        Op::List {
            collection,
            filter,
            after,
            limit,
        } => {
            if filter.len() > MAX_FILTERS {
                return refusal(
                    400,
                    "invalid",
                    format!("at most {MAX_FILTERS} filters"),
                );
            }
            let f = Filter {
                equals: filter.into_iter().collect(),
                after,
                limit,
            };
            docs.list(&collection, &f)
                .await
                .map(|page| (200, serde_json::to_value(page).unwrap_or(Value::Null)))
        }
        Op::Create {
            collection,
            id,
            doc,
        } => docs
            .create(&collection, id.as_deref(), doc)
            .await
            .map(|d| document(201, &d)),
        Op::Put {
            collection,
            id,
            doc,
            if_version,
        } => docs
            .put(
                &collection,
                &id,
                doc,
                precondition(if_version, Precondition::None),
            )
            .await
            .map(|d| document(200, &d)),
        Op::Merge {
            collection,
            id,
            patch,
            if_version,
        } => docs
            .merge(
                &collection,
                &id,
                &patch,
                precondition(if_version, Precondition::Live),
            )
            .await
            .map(|d| document(200, &d)),
        Op::Delete {
            collection,
            id,
            if_version,
        } => docs
            .delete(&collection, &id, precondition(if_version, Precondition::None))
            .await
            .map(|d| (200, json!({"collection": d.collection, "id": d.id, "deleted": true, "version": d.version}))),
    };
    outcome.unwrap_or_else(|e| failed(&e))
}

//! The outbox: change events committed with their change, waiting to be
//! delivered.
//!
//! A write ([`crate::Documents`]) -> **an event record here, in the same
//! atomic batch** -> the relay on a Tron reads [`Documents::pending`] in
//! order, hands each event to the Funcs subscribed to it (as asynchronous
//! calls, with the event id in their idempotency key), and only then
//! removes it ([`Documents::delivered`]). A Tron killed anywhere in between
//! leaves the record, so the next relay delivers it: at least once, never
//! lost, and a subscriber told twice sees the same event id.
//!
//! Keys are `<collection> US <id> US <version, 20 digits> US <event id>`
//! (US: the unit separator, `\x1f`, which neither names nor ids hold), so
//! listing in key order gives each document's events in commit order.

use bytes::Bytes;
use funcatron_store::{Query, Record, Store, Write, MAX_BATCH};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{DocError, Documents};

/// The state store collection of events not yet delivered.
pub const OUTBOX: &str = "doc_outbox";

/// Status of an event record.
const PENDING: &str = "pending";

/// What happened to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// It was written with no live document before.
    Created,
    /// A live document was changed.
    Updated,
    /// It was deleted.
    Deleted,
}

impl EventKind {
    /// Its name in events and declarations.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Updated => "updated",
            EventKind::Deleted => "deleted",
        }
    }
}

/// One change of one document, as subscribers receive it (the body of a
/// triggered call).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per change: the key to drop a repeated delivery by.
    pub event_id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The document's collection.
    pub collection: String,
    /// The document's id.
    pub id: String,
    /// The document's version after the change (a delete's is one more
    /// than the deleted document's).
    pub version: u64,
    /// The document before (`null` for a create).
    pub old: Option<Value>,
    /// The document after (`null` for a delete).
    pub new: Option<Value>,
    /// When the change was committed (ms since the Unix epoch).
    pub at_ms: u64,
}

impl Event {
    pub(crate) fn new(
        collection: &str,
        id: &str,
        version: u64,
        old: Option<Value>,
        new: Option<Value>,
        at_ms: u64,
    ) -> Self {
        let kind = match (&old, &new) {
            (_, None) => EventKind::Deleted,
            (None, Some(_)) => EventKind::Created,
            (Some(_), Some(_)) => EventKind::Updated,
        };
        Event {
            event_id: format!("e{}", uuid::Uuid::new_v4().simple()),
            kind,
            collection: collection.to_owned(),
            id: id.to_owned(),
            version,
            old,
            new,
            at_ms,
        }
    }

    /// Its outbox key (see the module).
    fn key(&self) -> String {
        format!(
            "{}\x1f{}\x1f{:020}\x1f{}",
            self.collection, self.id, self.version, self.event_id
        )
    }

    /// The outbox record to insert with the change.
    pub(crate) fn record(&self) -> Result<Write, DocError> {
        let value =
            serde_json::to_vec(self).map_err(|e| DocError::Invalid(format!("the event: {e}")))?;
        Ok(Write::Insert(
            Record::new(OUTBOX, self.key())
                .with_partition(&self.collection)
                .with_status(PENDING)
                .with_value(Bytes::from(value)),
        ))
    }
}

/// An event waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Its outbox key: pass it to [`Documents::delivered`].
    pub key: String,
    /// The event, or why its record cannot be read (then it is only
    /// removed).
    pub event: Result<Event, String>,
}

impl Documents {
    /// Events not yet delivered, oldest of each document first, in key
    /// order after `after` (the last key of the previous page), at most
    /// `limit` (at most [`funcatron_store::MAX_LIST`]).
    pub async fn pending(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Pending>, DocError> {
        let mut q = Query::new(OUTBOX).status(PENDING).limit(limit);
        q.after_key = after.map(str::to_owned);
        let records = self.store.list(&q).await?;
        Ok(records
            .into_iter()
            .map(|r| Pending {
                event: serde_json::from_slice(&r.value)
                    .map_err(|e| format!("an outbox record is not an event: {e}")),
                key: r.key,
            })
            .collect())
    }

    /// Remove delivered events from the outbox (a key already gone is
    /// fine: another relay removed it).
    pub async fn delivered(&self, keys: &[&str]) -> Result<(), DocError> {
        for chunk in keys.chunks(MAX_BATCH) {
            let writes: Vec<Write> = chunk
                .iter()
                .map(|k| Write::Delete {
                    collection: OUTBOX.to_owned(),
                    key: (*k).to_owned(),
                    expected_revision: None,
                })
                .collect();
            self.store.commit(&writes).await?;
        }
        Ok(())
    }

    /// How many events wait in the outbox (the relay's lag, for metrics).
    pub async fn backlog(&self) -> Result<u64, DocError> {
        Ok(self.store.count(OUTBOX, None, Some(PENDING)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_old_and_new() {
        let doc = Some(serde_json::json!({}));
        assert_eq!(
            Event::new("c", "i", 1, None, doc.clone(), 0).kind,
            EventKind::Created
        );
        assert_eq!(
            Event::new("c", "i", 2, doc.clone(), doc.clone(), 0).kind,
            EventKind::Updated
        );
        assert_eq!(
            Event::new("c", "i", 3, doc, None, 0).kind,
            EventKind::Deleted
        );
    }

    #[test]
    fn keys_sort_by_document_then_version() {
        let a = Event::new("c", "a", 2, None, None, 0).key();
        let b = Event::new("c", "a", 10, None, None, 0).key();
        let c = Event::new("c", "ab", 1, None, None, 0).key();
        assert!(a < b, "version 2 before 10");
        assert!(b < c, "document a before ab");
    }
}

//! The state store seam, beside the request path: ingress -> broker ->
//! **Tron (store)** -> broker -> Runner -> broker -> ingress.
//!
//! The Tron keeps what must outlive one request and be shared by every Tron
//! here: asynchronous calls (202 + call id, status polling, retries, dead
//! letters), idempotency keys, and later pipeline state and JSON documents.
//! Runners never touch it.
//!
//! [`Store`] is the small trait every adapter implements, over one record
//! model ([`Record`]): atomic insert (fails when the key is taken), get,
//! compare-and-set replace on a revision, delete, an all-or-nothing batch of
//! those writes ([`Store::commit`], how a document change and its event are
//! committed together), ordered listing through an index ([`Query`]),
//! counting, and expiry. Three adapters sit beside it and
//! never depend on each other: [`memory`] (maps under a lock, gone with the
//! process; `funcatron up` without `--store`), [`embedded`] (redb in one
//! file: the durable single-node default) and [`postgres`] (PostgreSQL,
//! shared by several Trons at once). Owners hold an [`AnyStore`], the
//! closed enum chosen from configuration with [`AnyStore::open`], and
//! spawn [`expire_periodically`] to remove expired records.

#![warn(clippy::too_many_lines)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub mod embedded;
pub mod lease;
pub mod memory;
pub mod postgres;
#[cfg(feature = "suite")]
pub mod suite;

pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;
pub use postgres::{PostgresOptions, PostgresStore};

/// Most bytes in a record's collection, key, partition or status. Together
/// they stay under PostgreSQL's limit for one index entry, so a record the
/// embedded store takes is one PostgreSQL takes too.
pub const MAX_NAME_BYTES: usize = 512;

/// Most records one [`Store::list`] returns; a larger [`Query::limit`] is
/// cut to this.
pub const MAX_LIST: usize = 1000;

/// Most writes in one [`Store::commit`].
pub const MAX_BATCH: usize = 64;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// [`Store::insert`]: a live record already holds this collection and
    /// key. How an idempotency key is claimed once across Trons.
    #[error("a record with this key exists (revision {revision})")]
    Exists {
        /// The existing record's revision.
        revision: u64,
    },
    /// [`Store::replace`]: the record moved on since it was read (another
    /// writer replaced it), or it is gone (deleted or expired). Read it
    /// again and retry.
    #[error("the record changed (current revision {current:?})")]
    Conflict {
        /// The live record's revision now, `None` when there is none.
        current: Option<u64>,
    },
    /// The request cannot be stored as given (an empty or too long name, a
    /// NUL character, an expiry past `i64::MAX`, a bad URL); retrying does
    /// not help.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The store cannot be reached or failed (I/O, database down, a lost
    /// connection); callers answer 503 and retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Exists { .. } => "exists",
            StoreError::Conflict { .. } => "conflict",
            StoreError::Invalid(_) => "invalid",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

/// One stored record: a value under (collection, key), with the two fields
/// listings filter on and the bookkeeping for compare-and-set and expiry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// What kind of record this is (`calls`, `idempotency`, ...): each
    /// collection is its own key space.
    pub collection: String,
    /// The record's name in its collection (a call id, an idempotency key).
    pub key: String,
    /// A grouping listings filter on, such as the Func a call belongs to.
    pub partition: String,
    /// A state listings and counts filter on (`queued`, `running`,
    /// `succeeded`, `failed`, `dead_lettered`).
    pub status: String,
    /// The payload, usually JSON; may hold a large request or answer body.
    pub value: Bytes,
    /// Set by the store on every write and never reused in one store (not
    /// even after a delete), so a compare-and-set on a stale read always
    /// fails. Ignored on input.
    pub revision: u64,
    /// When the record stops existing, in ms since the Unix epoch; `0`
    /// never. An expired record is invisible at once and removed by
    /// [`Store::expire`].
    pub expires_ms: u64,
    /// When the record was last written (ms since the epoch, the writer's
    /// clock). Set by the store; ignored on input.
    pub updated_ms: u64,
}

impl Record {
    /// A record with an empty partition, status and value that never expires.
    pub fn new(collection: impl Into<String>, key: impl Into<String>) -> Self {
        Record {
            collection: collection.into(),
            key: key.into(),
            ..Record::default()
        }
    }

    /// With this partition.
    pub fn with_partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = partition.into();
        self
    }

    /// With this status.
    pub fn with_status(mut self, status: impl Into<String>) -> Self {
        self.status = status.into();
        self
    }

    /// With this value.
    pub fn with_value(mut self, value: impl Into<Bytes>) -> Self {
        self.value = value.into();
        self
    }

    /// Expiring at `expires_ms` (ms since the epoch; `0` never).
    pub fn expiring_at(mut self, expires_ms: u64) -> Self {
        self.expires_ms = expires_ms;
        self
    }

    /// Whether the record still exists at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        is_live(self.expires_ms, now_ms)
    }
}

/// Whether a record expiring at `expires_ms` still exists at `now_ms`.
pub(crate) fn is_live(expires_ms: u64, now_ms: u64) -> bool {
    expires_ms == 0 || expires_ms > now_ms
}

/// Which records [`Store::list`] returns: those of one collection, with an
/// optional partition and status, in key order (bytewise), after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The collection to list.
    pub collection: String,
    /// Only records of this partition.
    pub partition: Option<String>,
    /// Only records with this status.
    pub status: Option<String>,
    /// Only keys after this one: the last key of the previous page.
    pub after_key: Option<String>,
    /// Most records to return (at most [`MAX_LIST`]).
    pub limit: usize,
}

impl Query {
    /// The first 100 records of a collection.
    pub fn new(collection: impl Into<String>) -> Self {
        Query {
            collection: collection.into(),
            partition: None,
            status: None,
            after_key: None,
            limit: 100,
        }
    }

    /// Only this partition.
    pub fn partition(mut self, partition: impl Into<String>) -> Self {
        self.partition = Some(partition.into());
        self
    }

    /// Only this status.
    pub fn status(mut self, status: impl Into<String>) -> Self {
        self.status = Some(status.into());
        self
    }

    /// Only keys after this one.
    pub fn after(mut self, key: impl Into<String>) -> Self {
        self.after_key = Some(key.into());
        self
    }

    /// At most this many records.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The limit an adapter applies.
    pub(crate) fn effective_limit(&self) -> usize {
        self.limit.min(MAX_LIST)
    }
}

/// One write of an all-or-nothing [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Store a new record, as [`Store::insert`]: refused with
    /// [`StoreError::Exists`] when a live record holds the key.
    Insert(Record),
    /// Compare-and-set, as [`Store::replace`]: refused with
    /// [`StoreError::Conflict`] when the revision moved or the record is
    /// gone.
    Replace {
        /// What to write; its collection and key name the record.
        record: Record,
        /// The revision the live record must still have.
        expected_revision: u64,
    },
    /// Remove a record, as [`Store::delete`]; with an expected revision,
    /// only if the live record still has it (else [`StoreError::Conflict`]).
    Delete {
        /// The record's collection.
        collection: String,
        /// The record's key.
        key: String,
        /// The revision the live record must have, if any is required.
        expected_revision: Option<u64>,
    },
}

impl Write {
    /// The (collection, key) this write touches.
    pub fn target(&self) -> (&str, &str) {
        match self {
            Write::Insert(r) | Write::Replace { record: r, .. } => (&r.collection, &r.key),
            Write::Delete {
                collection, key, ..
            } => (collection, key),
        }
    }
}

/// What one write of a [`Store::commit`] came to, in the batch's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// An insert or replace: the record's new revision.
    Revision(u64),
    /// A delete: whether a live record was there.
    Deleted(bool),
}

/// The state store seam. Adapters: [`MemoryStore`], [`EmbeddedStore`],
/// [`PostgresStore`].
///
/// "Now", for what is live, is the caller's clock ([`now_ms`]); only
/// [`Store::expire`] takes it as an argument.
pub trait Store: Clone + Send + Sync + 'static {
    /// Store a new record and return its revision. Fails with
    /// [`StoreError::Exists`] when a live record holds its collection and
    /// key; an expired one is replaced. Atomic across every user of the
    /// store: of two inserts of one key, exactly one succeeds.
    fn insert(&self, record: &Record) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The live record under (collection, key).
    fn get(
        &self,
        collection: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Compare-and-set: overwrite the live record under the record's
    /// collection and key if its revision is still `expected_revision`, and
    /// return the new revision. Fails with [`StoreError::Conflict`] when the
    /// revision moved or the record is gone; no update is ever lost.
    fn replace(
        &self,
        record: &Record,
        expected_revision: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Remove the record; whether a live one was there.
    fn delete(
        &self,
        collection: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Apply every write or none, atomically across every user of the
    /// store (one transaction): the outcome of each, in order, once all are
    /// durable. The first write refused (an existing key, a moved revision)
    /// fails the whole batch with its error, and nothing is written. At
    /// most [`MAX_BATCH`] writes, each touching a different record (else
    /// [`StoreError::Invalid`]); each write gets a revision of its own.
    fn commit(
        &self,
        writes: &[Write],
    ) -> impl Future<Output = Result<Vec<Written>, StoreError>> + Send;

    /// Live records matching the query, in key order, read through an index
    /// (never a scan of other collections, partitions or statuses).
    fn list(&self, query: &Query) -> impl Future<Output = Result<Vec<Record>, StoreError>> + Send;

    /// How many live records a collection holds, optionally of one
    /// partition and status (for limits such as "most queued calls"). Costs
    /// a walk of the matching index entries (in proportion to the count),
    /// never a scan of the collection.
    fn count(
        &self,
        collection: &str,
        partition: Option<&str>,
        status: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Remove every record whose `expires_ms` is at or before `now_ms`,
    /// through the expiry index, in batches; how many were removed.
    fn expire(&self, now_ms: u64) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The adapter chosen from configuration.
#[derive(Clone)]
pub enum AnyStore {
    /// Maps in memory, gone with the process: one node.
    Memory(MemoryStore),
    /// redb, in a file (or in memory, for its tests): one node.
    Embedded(EmbeddedStore),
    /// PostgreSQL: shared by several Trons.
    Postgres(PostgresStore),
}

impl std::fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AnyStore::Memory(_) => "AnyStore::Memory",
            AnyStore::Embedded(_) => "AnyStore::Embedded",
            AnyStore::Postgres(_) => "AnyStore::Postgres",
        })
    }
}

impl AnyStore {
    /// Pick an adapter: `memory:` for a fresh in-memory store,
    /// `postgres://...` (or `postgresql://`) for PostgreSQL with the
    /// default options, anything else is a path for the embedded store (a
    /// directory holds it as [`embedded::FILE_NAME`]).
    pub async fn open(target: &str) -> Result<Self, StoreError> {
        if target.starts_with("memory:") {
            Self::memory()
        } else if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            Self::connect_postgres(target).await
        } else if target.is_empty() || target.contains("://") {
            Err(StoreError::Invalid(format!(
                "unsupported store {target:?}: use `memory:`, a path, or postgres://user:pass@host:5432/db"
            )))
        } else {
            let path = Path::new(target);
            if path.is_dir() {
                Self::open_embedded(path.join(embedded::FILE_NAME)).await
            } else {
                Self::open_embedded(path).await
            }
        }
    }

    /// The embedded store in this file (created, with its directories, if
    /// missing).
    pub async fn open_embedded(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        EmbeddedStore::open(path).await.map(AnyStore::Embedded)
    }

    /// A fresh in-memory store (gone with the process).
    pub fn memory() -> Result<Self, StoreError> {
        Ok(AnyStore::Memory(MemoryStore::new()))
    }

    /// PostgreSQL at this URL with the default [`PostgresOptions`]; creates
    /// the table and indexes if missing.
    pub async fn connect_postgres(url: &str) -> Result<Self, StoreError> {
        PostgresStore::connect(url).await.map(AnyStore::Postgres)
    }

    /// A short name for logs and health checks.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Memory(_) => "memory",
            AnyStore::Embedded(_) => "embedded",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

impl Store for AnyStore {
    async fn insert(&self, record: &Record) -> Result<u64, StoreError> {
        match self {
            AnyStore::Memory(s) => s.insert(record).await,
            AnyStore::Embedded(s) => s.insert(record).await,
            AnyStore::Postgres(s) => s.insert(record).await,
        }
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Record>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.get(collection, key).await,
            AnyStore::Embedded(s) => s.get(collection, key).await,
            AnyStore::Postgres(s) => s.get(collection, key).await,
        }
    }

    async fn replace(&self, record: &Record, expected_revision: u64) -> Result<u64, StoreError> {
        match self {
            AnyStore::Memory(s) => s.replace(record, expected_revision).await,
            AnyStore::Embedded(s) => s.replace(record, expected_revision).await,
            AnyStore::Postgres(s) => s.replace(record, expected_revision).await,
        }
    }

    async fn delete(&self, collection: &str, key: &str) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(s) => s.delete(collection, key).await,
            AnyStore::Embedded(s) => s.delete(collection, key).await,
            AnyStore::Postgres(s) => s.delete(collection, key).await,
        }
    }

    async fn commit(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.commit(writes).await,
            AnyStore::Embedded(s) => s.commit(writes).await,
            AnyStore::Postgres(s) => s.commit(writes).await,
        }
    }

    async fn list(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.list(query).await,
            AnyStore::Embedded(s) => s.list(query).await,
            AnyStore::Postgres(s) => s.list(query).await,
        }
    }

    async fn count(
        &self,
        collection: &str,
        partition: Option<&str>,
        status: Option<&str>,
    ) -> Result<u64, StoreError> {
        match self {
            AnyStore::Memory(s) => s.count(collection, partition, status).await,
            AnyStore::Embedded(s) => s.count(collection, partition, status).await,
            AnyStore::Postgres(s) => s.count(collection, partition, status).await,
        }
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, StoreError> {
        match self {
            AnyStore::Memory(s) => s.expire(now_ms).await,
            AnyStore::Embedded(s) => s.expire(now_ms).await,
            AnyStore::Postgres(s) => s.expire(now_ms).await,
        }
    }
}

/// Now, in ms since the Unix epoch: the clock every adapter judges
/// liveness by.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Run [`Store::expire`] now and then every `every` until `shutdown` is
/// cancelled; returns how many records it removed. The owner spawns it
/// (one per node is enough; several Trons running it on one PostgreSQL
/// store share the work). A failed pass is logged and counted
/// (`store_expire_failures_total`) and tried again next time; removed
/// records are counted in `store_expired_records_total`.
pub async fn expire_periodically<S: Store>(
    store: S,
    every: Duration,
    shutdown: CancellationToken,
) -> u64 {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut total = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return total,
            _ = ticks.tick() => {}
        }
        match store.expire(now_ms()).await {
            Ok(removed) => {
                total += removed;
                metrics::counter!("store_expired_records_total").increment(removed);
                if removed > 0 {
                    tracing::debug!(removed, "expired store records");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "expiring store records failed; trying again later");
                metrics::counter!("store_expire_failures_total", "kind" => e.kind()).increment(1);
            }
        }
    }
}

/// Check a collection or key (and the like) before it reaches an adapter:
/// non-empty where `required`, at most [`MAX_NAME_BYTES`], no NUL.
pub(crate) fn check_name(what: &str, name: &str, required: bool) -> Result<(), StoreError> {
    if required && name.is_empty() {
        Err(StoreError::Invalid(format!("the {what} is empty")))
    } else if name.len() > MAX_NAME_BYTES {
        Err(StoreError::Invalid(format!(
            "the {what} has {} bytes, more than {MAX_NAME_BYTES}",
            name.len()
        )))
    } else if name.contains('\0') {
        Err(StoreError::Invalid(format!(
            "the {what} holds a NUL character"
        )))
    } else {
        Ok(())
    }
}

/// Check a record to be written, the same way for every adapter.
pub(crate) fn check_record(record: &Record) -> Result<(), StoreError> {
    check_name("collection", &record.collection, true)?;
    check_name("key", &record.key, true)?;
    check_name("partition", &record.partition, false)?;
    check_name("status", &record.status, false)?;
    if i64::try_from(record.expires_ms).is_err() {
        return Err(StoreError::Invalid(format!(
            "expires_ms {} is past i64::MAX",
            record.expires_ms
        )));
    }
    Ok(())
}

/// Why `write` of a batch is refused when the live record under its key
/// has revision `live` (`None`: there is none), if it is.
pub(crate) fn refusal(write: &Write, live: Option<u64>) -> Option<StoreError> {
    match (write, live) {
        (Write::Insert(_), Some(revision)) => Some(StoreError::Exists { revision }),
        (
            Write::Replace {
                expected_revision, ..
            }
            | Write::Delete {
                expected_revision: Some(expected_revision),
                ..
            },
            current,
        ) if current != Some(*expected_revision) => Some(StoreError::Conflict { current }),
        _ => None,
    }
}

/// Check a batch for [`Store::commit`], the same way for every adapter:
/// at most [`MAX_BATCH`] writes, each valid, no record touched twice.
pub(crate) fn check_batch(writes: &[Write]) -> Result<(), StoreError> {
    if writes.len() > MAX_BATCH {
        return Err(StoreError::Invalid(format!(
            "a batch of {} writes, more than {MAX_BATCH}",
            writes.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(writes.len());
    for w in writes {
        match w {
            Write::Insert(r) | Write::Replace { record: r, .. } => check_record(r)?,
            Write::Delete {
                collection, key, ..
            } => {
                check_name("collection", collection, true)?;
                check_name("key", key, true)?;
            }
        }
        if !seen.insert(w.target()) {
            let (c, k) = w.target();
            return Err(StoreError::Invalid(format!(
                "the batch writes {c}/{k} twice"
            )));
        }
    }
    Ok(())
}

/// The checked query a [`Store::count`] walks.
pub(crate) fn count_query(
    collection: &str,
    partition: Option<&str>,
    status: Option<&str>,
) -> Result<Query, StoreError> {
    let mut q = Query::new(collection);
    q.partition = partition.map(str::to_owned);
    q.status = status.map(str::to_owned);
    check_query(&q)?;
    Ok(q)
}

/// Check a query, the same way for every adapter.
pub(crate) fn check_query(query: &Query) -> Result<(), StoreError> {
    check_name("collection", &query.collection, true)?;
    for (what, name) in [
        ("partition", &query.partition),
        ("status", &query.status),
        ("after_key", &query.after_key),
    ] {
        if let Some(name) = name {
            check_name(what, name, false)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_record(&Record::new("c", "k")).is_ok());
        assert!(matches!(
            check_record(&Record::new("", "k")),
            Err(StoreError::Invalid(_))
        ));
        assert!(check_record(&Record::new("c", "")).is_err());
        assert!(check_record(&Record::new("c", "a\0b")).is_err());
        assert!(check_record(&Record::new("c", "k").with_status("x\0")).is_err());
        assert!(check_record(&Record::new("c", "k".repeat(MAX_NAME_BYTES + 1))).is_err());
        assert!(check_record(&Record::new("c", "k".repeat(MAX_NAME_BYTES))).is_ok());
        assert!(check_record(&Record::new("c", "k").expiring_at(u64::MAX)).is_err());
        assert!(check_query(&Query::new("c").after("a\0")).is_err());
        assert!(check_query(&Query::new("c").partition("")).is_ok());
    }

    #[test]
    fn liveness() {
        assert!(is_live(0, u64::MAX));
        assert!(is_live(11, 10));
        assert!(!is_live(10, 10));
        assert!(!is_live(9, 10));
    }

    #[test]
    fn limits_are_capped() {
        assert_eq!(Query::new("c").effective_limit(), 100);
        assert_eq!(Query::new("c").limit(10_000).effective_limit(), MAX_LIST);
    }

    #[test]
    fn error_kinds_are_bounded() {
        assert_eq!(StoreError::Exists { revision: 1 }.kind(), "exists");
        assert_eq!(StoreError::Conflict { current: None }.kind(), "conflict");
        assert_eq!(StoreError::Invalid("x".into()).kind(), "invalid");
        assert_eq!(StoreError::Unavailable("x".into()).kind(), "unavailable");
    }

    /// The loop runs a pass at once and then every period, until
    /// cancelled (virtual time: no waiting, no sleeps as synchronisation).
    #[tokio::test(start_paused = true)]
    async fn expire_periodically_removes_expired_records() {
        let store = AnyStore::memory().expect("memory store");
        for key in ["a", "b", "c"] {
            store
                .insert(&Record::new("calls", key).expiring_at(1))
                .await
                .expect("insert");
        }
        let live = Record::new("calls", "live").expiring_at(now_ms() + 3_600_000);
        store.insert(&live).await.expect("insert");
        let shutdown = CancellationToken::new();
        let every = Duration::from_secs(60);
        let task = tokio::spawn(expire_periodically(store.clone(), every, shutdown.clone()));
        // Two passes (at 0 s and 60 s); the blocking store calls hold the
        // virtual clock while they run.
        tokio::time::sleep(Duration::from_secs(90)).await;
        shutdown.cancel();
        assert_eq!(task.await.expect("the loop ends"), 3);
        assert!(store.get("calls", "live").await.expect("get").is_some());
        // The expired records were removed, not only hidden: a pass far
        // ahead finds only the live one.
        assert_eq!(store.expire(u64::MAX >> 1).await.expect("expire"), 1);
    }

    #[tokio::test]
    async fn open_picks_the_adapter() {
        let memory = AnyStore::open("memory:").await.expect("memory store");
        assert_eq!(memory.kind(), "memory");
        assert!(matches!(
            AnyStore::open("redis://x").await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            AnyStore::open("").await,
            Err(StoreError::Invalid(_))
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let in_dir = AnyStore::open(dir.path().to_str().expect("utf-8 path"))
            .await
            .expect("embedded store in a directory");
        assert_eq!(in_dir.kind(), "embedded");
        assert!(dir.path().join(embedded::FILE_NAME).is_file());
        let file = dir.path().join("sub/other.redb");
        AnyStore::open(file.to_str().expect("utf-8 path"))
            .await
            .expect("embedded store in a new file");
        assert!(file.is_file());
    }
}

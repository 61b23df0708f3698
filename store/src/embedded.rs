//! The embedded store: redb (pure Rust, ACID, crash-safe copy-on-write
//! B-trees) in one file, or in memory, held by one Tron. The default for a
//! single node; `funcatron up` without `--store` uses the in-memory form.
//!
//! redb is synchronous, so reads run on [`tokio::task::spawn_blocking`]
//! (on a snapshot, beside writes) and the async runtime is never blocked.
//! Writes go to one writer thread that commits them in groups (group
//! commit): it takes every write waiting when it starts a transaction (up
//! to [`GROUP_MAX`]), applies them in order in that one transaction, and
//! answers each only after the commit is durable (fsync). Concurrent
//! writers share one fsync instead of queueing for one each; a lone write
//! costs what it did. An operation that refuses (a conflict, an existing
//! key, a refused batch of [`Store::commit`]) changes nothing, so it does
//! not disturb the others of its group;
//! a failure of the database fails the whole group, none of it written.
//!
//! Tables: `records` ((collection, key) -> partition, status, revision,
//! expiry, update time, value), three listing indexes in key order
//! (collection, partition, key), (collection, status, key) and (collection,
//! partition, status, key), each holding the record's expiry so counts and
//! listings skip expired records without reading them, the expiry index
//! (expires_ms, collection, key) for records that expire, and `meta` with
//! the revision counter, so a revision is never given twice.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::{
    check_batch, check_name, check_query, check_record, count_query, is_live, now_ms, refusal,
    Query, Record, Store, StoreError, Write, Written,
};

/// The file name of the embedded store in a store directory.
pub const FILE_NAME: &str = "records.redb";

/// What `records` holds for a key: partition, status, revision,
/// expires_ms, updated_ms, value.
type Stored = (&'static str, &'static str, u64, u64, u64, &'static [u8]);

const RECORDS: TableDefinition<(&str, &str), Stored> = TableDefinition::new("records");
/// (collection, partition, key) -> expires_ms.
const BY_PARTITION: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("by_partition");
/// (collection, status, key) -> expires_ms.
const BY_STATUS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("by_status");
/// (collection, partition, status, key) -> expires_ms.
const BY_BOTH: TableDefinition<(&str, &str, &str, &str), u64> =
    TableDefinition::new("by_partition_status");
/// (expires_ms, collection, key) for records with an expiry.
const BY_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("by_expiry");
/// Counters: `revision` (the last revision given).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most writes committed in one transaction by the writer thread.
const GROUP_MAX: usize = 256;

/// Records [`Store::expire`] removes per write transaction, so a large
/// backlog does not hold the writer for long.
const EXPIRE_BATCH: usize = 1000;

/// A redb failure inside a transaction (the outer `Result` of the
/// transaction functions; the inner one is the operation's own outcome).
type Db<T> = Result<T, redb::Error>;

/// A write for the writer thread.
enum WriteOp {
    Insert(Record),
    Replace(Record, u64),
    Delete(String, String),
    /// All of them or none ([`Store::commit`]).
    Batch(Vec<Write>),
}

/// What a write came to (the operation's own outcome).
enum WriteOut {
    Revision(Result<u64, StoreError>),
    Deleted(bool),
    Batch(Result<Vec<Written>, StoreError>),
}

type Reply = tokio::sync::oneshot::Sender<Result<WriteOut, StoreError>>;

/// The embedded adapter. Cloning shares the same database.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// Shared with the blocking tasks that run its transactions.
    db: Arc<Database>,
    /// The writer thread's queue; the thread ends with the last clone.
    writes: std::sync::mpsc::Sender<(WriteOp, Reply)>,
}

impl EmbeddedStore {
    /// The store in this file, created (with its directories) if missing.
    /// Fails with [`StoreError::Unavailable`] if another process holds it.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            Database::create(&path).map_err(|e| {
                StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))
            })
        })
        .await
        .map_err(task_failed)??;
        Self::with_database(db).await
    }

    /// A fresh store in memory, gone when its last clone is dropped.
    pub fn memory() -> Result<Self, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(unavailable)?;
        let db = Arc::new(db);
        create_tables(&db).map_err(unavailable)?;
        Self::with_writer(db)
    }

    async fn with_database(db: Database) -> Result<Self, StoreError> {
        let db = Arc::new(db);
        let d = Arc::clone(&db);
        tokio::task::spawn_blocking(move || create_tables(&d))
            .await
            .map_err(task_failed)?
            .map_err(unavailable)?;
        Self::with_writer(db)
    }

    fn with_writer(db: Arc<Database>) -> Result<Self, StoreError> {
        let (writes, queue) = std::sync::mpsc::channel();
        // Weak: the database closes (its file lock released) as soon as
        // the last store handle is dropped, not when the thread notices.
        let d = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(&d, &queue))
            .map_err(|e| StoreError::Unavailable(format!("embedded store writer: {e}")))?;
        Ok(EmbeddedStore { db, writes })
    }

    /// Hand `op` to the writer thread; its outcome once committed.
    async fn write(&self, op: WriteOp) -> Result<WriteOut, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writes
            .send((op, tx))
            .map_err(|_| StoreError::Unavailable("embedded store writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("embedded store writer stopped".into()))?
    }

    /// Run `op` on a blocking thread. Its outer error is redb's; the inner
    /// one the operation's.
    async fn blocking<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Db<Result<T, StoreError>> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(task_failed)?
            .map_err(unavailable)?
    }
}

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {}", e.into()))
}

fn task_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Unavailable(format!("embedded store task failed: {e}"))
}

/// Create every table, so read transactions find them.
fn create_tables(db: &Database) -> Db<()> {
    let txn = db.begin_write()?;
    Tables::open(&txn)?;
    txn.commit()?;
    Ok(())
}

/// A stored record's bookkeeping, read before a write.
struct Meta {
    partition: String,
    status: String,
    revision: u64,
    expires_ms: u64,
}

/// Every table, open in one write transaction.
struct Tables<'t> {
    records: redb::Table<'t, (&'static str, &'static str), Stored>,
    by_partition: redb::Table<'t, (&'static str, &'static str, &'static str), u64>,
    by_status: redb::Table<'t, (&'static str, &'static str, &'static str), u64>,
    by_both: redb::Table<'t, (&'static str, &'static str, &'static str, &'static str), u64>,
    by_expiry: redb::Table<'t, (u64, &'static str, &'static str), ()>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Db<Self> {
        Ok(Tables {
            records: txn.open_table(RECORDS)?,
            by_partition: txn.open_table(BY_PARTITION)?,
            by_status: txn.open_table(BY_STATUS)?,
            by_both: txn.open_table(BY_BOTH)?,
            by_expiry: txn.open_table(BY_EXPIRY)?,
            meta: txn.open_table(META)?,
        })
    }

    fn meta_of(&self, collection: &str, key: &str) -> Db<Option<Meta>> {
        Ok(self.records.get((collection, key))?.map(|guard| {
            let (partition, status, revision, expires_ms, _, _) = guard.value();
            Meta {
                partition: partition.to_owned(),
                status: status.to_owned(),
                revision,
                expires_ms,
            }
        }))
    }

    fn next_revision(&mut self) -> Db<u64> {
        let last = self.meta.get("revision")?.map_or(0, |g| g.value());
        let next = last + 1;
        self.meta.insert("revision", next)?;
        Ok(next)
    }

    /// Write the record and its index entries (the old ones are removed
    /// first with [`Tables::remove`]).
    fn put(&mut self, r: &Record, revision: u64, updated_ms: u64) -> Db<()> {
        let (c, k, p, s, exp) = (
            &*r.collection,
            &*r.key,
            &*r.partition,
            &*r.status,
            r.expires_ms,
        );
        self.records
            .insert((c, k), (p, s, revision, exp, updated_ms, &r.value[..]))?;
        self.by_partition.insert((c, p, k), exp)?;
        self.by_status.insert((c, s, k), exp)?;
        self.by_both.insert((c, p, s, k), exp)?;
        if exp > 0 {
            self.by_expiry.insert((exp, c, k), ())?;
        }
        Ok(())
    }

    /// Remove a record and its index entries.
    fn remove(&mut self, c: &str, k: &str, old: &Meta) -> Db<()> {
        let (p, s) = (&*old.partition, &*old.status);
        self.records.remove((c, k))?;
        self.by_partition.remove((c, p, k))?;
        self.by_status.remove((c, s, k))?;
        self.by_both.remove((c, p, s, k))?;
        if old.expires_ms > 0 {
            self.by_expiry.remove((old.expires_ms, c, k))?;
        }
        Ok(())
    }
}

/// The writer thread: take the writes waiting, apply them in order in one
/// transaction, commit, answer each (see the module).
fn writer(db: &std::sync::Weak<Database>, queue: &std::sync::mpsc::Receiver<(WriteOp, Reply)>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        // A write comes from a live handle, which holds the database; the
        // writer holds it only while it commits (and before it answers).
        let Some(live) = db.upgrade() else {
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::Unavailable("the store is closed".into())));
            }
            continue;
        };
        let committed = commit_group(&live, &group);
        drop(live);
        match committed {
            Ok(outs) => {
                for ((_, reply), out) in group.into_iter().zip(outs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) => {
                let why = unavailable(e).to_string();
                for (_, reply) in group {
                    let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
                }
            }
        }
    }
}

fn commit_group(db: &Database, group: &[(WriteOp, Reply)]) -> Db<Vec<WriteOut>> {
    let txn = db.begin_write()?;
    let mut outs = Vec::with_capacity(group.len());
    {
        let mut t = Tables::open(&txn)?;
        let now = now_ms();
        for (op, _) in group {
            outs.push(match op {
                WriteOp::Insert(r) => WriteOut::Revision(insert_in(&mut t, r, now)?),
                WriteOp::Replace(r, expected) => {
                    WriteOut::Revision(replace_in(&mut t, r, *expected, now)?)
                }
                WriteOp::Delete(c, k) => WriteOut::Deleted(match t.meta_of(c, k)? {
                    Some(old) => {
                        t.remove(c, k, &old)?;
                        is_live(old.expires_ms, now)
                    }
                    None => false,
                }),
                WriteOp::Batch(writes) => WriteOut::Batch(batch_in(&mut t, writes, now)?),
            });
        }
    }
    txn.commit()?;
    Ok(outs)
}

/// Run `op` in a write transaction: committed when it succeeds, aborted
/// when it refuses.
fn write<T>(
    db: &Database,
    op: impl FnOnce(&mut Tables<'_>) -> Db<Result<T, StoreError>>,
) -> Db<Result<T, StoreError>> {
    let txn = db.begin_write()?;
    let outcome = {
        let mut tables = Tables::open(&txn)?;
        op(&mut tables)?
    };
    if outcome.is_ok() {
        txn.commit()?;
    } else {
        txn.abort()?;
    }
    Ok(outcome)
}

fn insert_in(t: &mut Tables<'_>, r: &Record, now: u64) -> Db<Result<u64, StoreError>> {
    if let Some(old) = t.meta_of(&r.collection, &r.key)? {
        if is_live(old.expires_ms, now) {
            return Ok(Err(StoreError::Exists {
                revision: old.revision,
            }));
        }
        t.remove(&r.collection, &r.key, &old)?;
    }
    let revision = t.next_revision()?;
    t.put(r, revision, now)?;
    Ok(Ok(revision))
}

fn replace_in(
    t: &mut Tables<'_>,
    r: &Record,
    expected: u64,
    now: u64,
) -> Db<Result<u64, StoreError>> {
    let old = match t.meta_of(&r.collection, &r.key)? {
        Some(old) if is_live(old.expires_ms, now) => old,
        _ => return Ok(Err(StoreError::Conflict { current: None })),
    };
    if old.revision != expected {
        return Ok(Err(StoreError::Conflict {
            current: Some(old.revision),
        }));
    }
    t.remove(&r.collection, &r.key, &old)?;
    let revision = t.next_revision()?;
    t.put(r, revision, now)?;
    Ok(Ok(revision))
}

/// A [`Store::commit`] inside the group's transaction: every precondition
/// checked first (no record is touched twice, so each holds against the
/// state before the batch), so a refused batch changes nothing.
fn batch_in(
    t: &mut Tables<'_>,
    writes: &[Write],
    now: u64,
) -> Db<Result<Vec<Written>, StoreError>> {
    let mut olds = Vec::with_capacity(writes.len());
    for w in writes {
        let (c, k) = w.target();
        let old = t.meta_of(c, k)?;
        let live = old
            .as_ref()
            .filter(|m| is_live(m.expires_ms, now))
            .map(|m| m.revision);
        if let Some(refused) = refusal(w, live) {
            return Ok(Err(refused));
        }
        olds.push(old);
    }
    let mut outs = Vec::with_capacity(writes.len());
    for (w, old) in writes.iter().zip(olds) {
        let (c, k) = w.target();
        let was_live = old.as_ref().is_some_and(|m| is_live(m.expires_ms, now));
        if let Some(old) = &old {
            t.remove(c, k, old)?;
        }
        outs.push(match w {
            Write::Insert(r) | Write::Replace { record: r, .. } => {
                let revision = t.next_revision()?;
                t.put(r, revision, now)?;
                Written::Revision(revision)
            }
            Write::Delete { .. } => Written::Deleted(was_live),
        });
    }
    Ok(Ok(outs))
}

/// Remove up to [`EXPIRE_BATCH`] records expired at `now`; how many.
fn expire_batch(t: &mut Tables<'_>, now: u64) -> Db<u64> {
    let upper = match now.checked_add(1) {
        Some(next) => Bound::Excluded((next, "", "")),
        None => Bound::Unbounded,
    };
    let mut due = Vec::new();
    for entry in t
        .by_expiry
        .range::<(u64, &str, &str)>((Bound::Unbounded, upper))?
    {
        let (key, _) = entry?;
        let (_, c, k) = key.value();
        due.push((c.to_owned(), k.to_owned()));
        if due.len() == EXPIRE_BATCH {
            break;
        }
    }
    for (c, k) in &due {
        if let Some(old) = t.meta_of(c, k)? {
            t.remove(c, k, &old)?;
        }
    }
    Ok(due.len() as u64)
}

/// A record as read from `records`.
fn record(collection: &str, key: &str, stored: (&str, &str, u64, u64, u64, &[u8])) -> Record {
    let (partition, status, revision, expires_ms, updated_ms, value) = stored;
    Record {
        collection: collection.to_owned(),
        key: key.to_owned(),
        partition: partition.to_owned(),
        status: status.to_owned(),
        value: Bytes::copy_from_slice(value),
        revision,
        expires_ms,
        updated_ms,
    }
}

/// Live keys of one index range, in order: `entries` yields (prefix
/// matches, key, expires_ms) and stops at the first entry past the prefix.
fn live_keys<I>(entries: I, now: u64, limit: usize) -> Db<Vec<String>>
where
    I: Iterator<Item = Db<(bool, String, u64)>>,
{
    let mut keys = Vec::new();
    for entry in entries {
        let (matches, key, expires_ms) = entry?;
        if !matches || keys.len() == limit {
            break;
        }
        if is_live(expires_ms, now) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// The live keys a query selects, through the index it needs.
fn query_keys(txn: &redb::ReadTransaction, q: &Query, now: u64, limit: usize) -> Db<Vec<String>> {
    let c = q.collection.as_str();
    let after = q.after_key.as_deref().unwrap_or("");
    match (q.partition.as_deref(), q.status.as_deref()) {
        (None, None) => {
            let table = txn.open_table(RECORDS)?;
            let range =
                table.range::<(&str, &str)>((Bound::Excluded((c, after)), Bound::Unbounded))?;
            live_keys(
                range.map(|e| {
                    let (key, value) = e?;
                    let (kc, kk) = key.value();
                    Ok((kc == c, kk.to_owned(), value.value().3))
                }),
                now,
                limit,
            )
        }
        (Some(p), None) | (None, Some(p)) => {
            let def = if q.partition.is_some() {
                BY_PARTITION
            } else {
                BY_STATUS
            };
            let table = txn.open_table(def)?;
            let range = table
                .range::<(&str, &str, &str)>((Bound::Excluded((c, p, after)), Bound::Unbounded))?;
            live_keys(
                range.map(|e| {
                    let (key, value) = e?;
                    let (kc, kp, kk) = key.value();
                    Ok((kc == c && kp == p, kk.to_owned(), value.value()))
                }),
                now,
                limit,
            )
        }
        (Some(p), Some(s)) => {
            let table = txn.open_table(BY_BOTH)?;
            let start = Bound::Excluded((c, p, s, after));
            let range = table.range::<(&str, &str, &str, &str)>((start, Bound::Unbounded))?;
            live_keys(
                range.map(|e| {
                    let (key, value) = e?;
                    let (kc, kp, ks, kk) = key.value();
                    Ok((kc == c && kp == p && ks == s, kk.to_owned(), value.value()))
                }),
                now,
                limit,
            )
        }
    }
}

impl Store for EmbeddedStore {
    async fn insert(&self, record: &Record) -> Result<u64, StoreError> {
        check_record(record)?;
        match self.write(WriteOp::Insert(record.clone())).await? {
            WriteOut::Revision(r) => r,
            _ => Err(StoreError::Unavailable(
                "embedded store: a wrong answer".into(),
            )),
        }
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Record>, StoreError> {
        check_name("collection", collection, true)?;
        check_name("key", key, true)?;
        let (c, k) = (collection.to_owned(), key.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(RECORDS)?;
            let found = table.get((c.as_str(), k.as_str()))?;
            Ok(Ok(found
                .map(|guard| record(&c, &k, guard.value()))
                .filter(|r| r.is_live(now_ms()))))
        })
        .await
    }

    async fn replace(&self, record: &Record, expected_revision: u64) -> Result<u64, StoreError> {
        check_record(record)?;
        match self
            .write(WriteOp::Replace(record.clone(), expected_revision))
            .await?
        {
            WriteOut::Revision(r) => r,
            _ => Err(StoreError::Unavailable(
                "embedded store: a wrong answer".into(),
            )),
        }
    }

    async fn delete(&self, collection: &str, key: &str) -> Result<bool, StoreError> {
        check_name("collection", collection, true)?;
        check_name("key", key, true)?;
        let op = WriteOp::Delete(collection.to_owned(), key.to_owned());
        match self.write(op).await? {
            WriteOut::Deleted(d) => Ok(d),
            _ => Err(StoreError::Unavailable(
                "embedded store: a wrong answer".into(),
            )),
        }
    }

    async fn commit(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        check_batch(writes)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        match self.write(WriteOp::Batch(writes.to_vec())).await? {
            WriteOut::Batch(outcome) => outcome,
            _ => Err(StoreError::Unavailable(
                "embedded store: a wrong answer".into(),
            )),
        }
    }

    async fn list(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        check_query(query)?;
        let q = query.clone();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let keys = query_keys(&txn, &q, now_ms(), q.effective_limit())?;
            let table = txn.open_table(RECORDS)?;
            let mut records = Vec::with_capacity(keys.len());
            for k in &keys {
                if let Some(guard) = table.get((q.collection.as_str(), k.as_str()))? {
                    records.push(record(&q.collection, k, guard.value()));
                }
            }
            Ok(Ok(records))
        })
        .await
    }

    async fn count(
        &self,
        collection: &str,
        partition: Option<&str>,
        status: Option<&str>,
    ) -> Result<u64, StoreError> {
        let q = count_query(collection, partition, status)?;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let keys = query_keys(&txn, &q, now_ms(), usize::MAX)?;
            Ok(Ok(keys.len() as u64))
        })
        .await
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let removed = self
                .blocking(move |db| write(db, |t| expire_batch(t, now_ms).map(Ok)))
                .await?;
            total += removed;
            if removed < EXPIRE_BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

//! The in-memory store: maps and ordered sets under one lock, gone with
//! the process. What `funcatron up` uses without `--store`, and the tests'
//! store.
//!
//! Where it sits: ingress and Tron -> [`crate::Store`] -> **here**, on the
//! caller's thread. An operation takes microseconds and never waits for
//! anything but the lock, so it runs in place: no thread hand-off, no
//! transaction to commit, and a value is shared, never copied. (redb's
//! in-memory backend, used before, pays for a copy-on-write commit on
//! every write and a thread hand-off on every read: on the bench's async
//! rows it took about half the submissions per second this adapter takes,
//! 8,590 against 17,584.)
//!
//! Each collection keeps its records by key and, for listings, the keys in
//! order under each filter a [`Query`] can name: none, the partition, the
//! status, both. A listing walks only its own filter's keys; an expiry
//! index, (expires_ms, collection, key), lets [`Store::expire`] find what
//! is due without a scan, and lets a count skip the walk while nothing has
//! expired.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::{
    check_batch, check_name, check_query, check_record, count_query, is_live, now_ms, refusal,
    Query, Record, Store, StoreError, Write, Written,
};

/// Records [`Store::expire`] removes per hold of the lock.
const EXPIRE_BATCH: usize = 1000;

/// Seeded per process, so keys a client picks (idempotency keys) cannot be
/// made to collide.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A name held once and shared by the record and its index entries.
type Name = Arc<str>;

/// A listing's filter: (partition, status).
type Filter = (Option<Name>, Option<Name>);

struct Stored {
    partition: Name,
    status: Name,
    revision: u64,
    expires_ms: u64,
    updated_ms: u64,
    value: Bytes,
}

struct Collection {
    name: Name,
    records: HashMap<Name, Stored>,
    /// For each filter, the keys of the records it matches, in order.
    lists: HashMap<Filter, BTreeSet<Name>>,
}

/// The four filters a record is listed under.
fn filters(s: &Stored) -> [Filter; 4] {
    let (p, st) = (Some(Arc::clone(&s.partition)), Some(Arc::clone(&s.status)));
    [(None, None), (p.clone(), None), (None, st.clone()), (p, st)]
}

impl Collection {
    fn put(&mut self, key: Name, stored: Stored) {
        for f in filters(&stored) {
            self.lists.entry(f).or_default().insert(Arc::clone(&key));
        }
        self.records.insert(key, stored);
    }

    fn remove(&mut self, key: &str) -> Option<(Name, Stored)> {
        let (key, old) = self.records.remove_entry(key)?;
        for f in filters(&old) {
            if let Some(keys) = self.lists.get_mut(&f) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.lists.remove(&f);
                }
            }
        }
        Some((key, old))
    }

    /// The live records under `q`'s filter after its key, in order.
    fn listed<'a>(&'a self, q: &'a Query, now: u64) -> impl Iterator<Item = (&'a str, &'a Stored)> {
        let lower: Bound<&str> = q
            .after_key
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded);
        self.lists
            .get(&filter_of(q))
            .into_iter()
            .flat_map(move |keys| keys.range::<str, _>((lower, Bound::Unbounded)))
            .filter_map(move |k| {
                self.records
                    .get(k)
                    .filter(|s| is_live(s.expires_ms, now))
                    .map(|s| (&**k, s))
            })
    }
}

/// The filter a query names.
fn filter_of(q: &Query) -> Filter {
    (
        q.partition.as_deref().map(Name::from),
        q.status.as_deref().map(Name::from),
    )
}

#[derive(Default)]
struct Inner {
    /// The last revision given.
    revision: u64,
    collections: HashMap<Name, Collection>,
    /// (expires_ms, collection, key) of records that expire.
    by_expiry: BTreeSet<(u64, Name, Name)>,
}

impl Inner {
    /// Remove a record and its expiry entry.
    fn remove(&mut self, collection: &str, key: &str) -> Option<Stored> {
        let c = self.collections.get_mut(collection)?;
        let (key, old) = c.remove(key)?;
        if old.expires_ms > 0 {
            self.by_expiry
                .remove(&(old.expires_ms, Arc::clone(&c.name), key));
        }
        Some(old)
    }

    /// Write `r` (whatever held its key removed first) as a new revision.
    fn put(&mut self, r: &Record, now: u64) -> u64 {
        self.revision += 1;
        let key = Name::from(r.key.as_str());
        let stored = Stored {
            partition: Name::from(r.partition.as_str()),
            status: Name::from(r.status.as_str()),
            revision: self.revision,
            expires_ms: r.expires_ms,
            updated_ms: now,
            value: r.value.clone(),
        };
        let c = self
            .collections
            .entry(Name::from(r.collection.as_str()))
            .or_insert_with_key(|name| Collection {
                name: Arc::clone(name),
                records: HashMap::default(),
                lists: HashMap::default(),
            });
        if r.expires_ms > 0 {
            self.by_expiry
                .insert((r.expires_ms, Arc::clone(&c.name), Arc::clone(&key)));
        }
        c.put(key, stored);
        self.revision
    }

    /// The record under (collection, key), live or not.
    fn stored(&self, collection: &str, key: &str) -> Option<&Stored> {
        self.collections.get(collection)?.records.get(key)
    }
}

fn record(collection: &str, key: &str, s: &Stored) -> Record {
    Record {
        collection: collection.to_owned(),
        key: key.to_owned(),
        partition: s.partition.to_string(),
        status: s.status.to_string(),
        value: s.value.clone(),
        revision: s.revision,
        expires_ms: s.expires_ms,
        updated_ms: s.updated_ms,
    }
}

/// The in-memory adapter. Cloning shares the same records.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryStore {
    /// A fresh, empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store: a writer panicked".into()))
    }
}

impl Store for MemoryStore {
    async fn insert(&self, r: &Record) -> Result<u64, StoreError> {
        check_record(r)?;
        let now = now_ms();
        let mut inner = self.lock()?;
        if let Some(old) = inner.stored(&r.collection, &r.key) {
            if is_live(old.expires_ms, now) {
                return Err(StoreError::Exists {
                    revision: old.revision,
                });
            }
            inner.remove(&r.collection, &r.key);
        }
        Ok(inner.put(r, now))
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Record>, StoreError> {
        check_name("collection", collection, true)?;
        check_name("key", key, true)?;
        let now = now_ms();
        let inner = self.lock()?;
        Ok(inner
            .stored(collection, key)
            .filter(|s| is_live(s.expires_ms, now))
            .map(|s| record(collection, key, s)))
    }

    async fn replace(&self, r: &Record, expected_revision: u64) -> Result<u64, StoreError> {
        check_record(r)?;
        let now = now_ms();
        let mut inner = self.lock()?;
        let current = inner
            .stored(&r.collection, &r.key)
            .filter(|s| is_live(s.expires_ms, now))
            .map(|s| s.revision);
        match current {
            Some(rev) if rev == expected_revision => {
                inner.remove(&r.collection, &r.key);
                Ok(inner.put(r, now))
            }
            current => Err(StoreError::Conflict { current }),
        }
    }

    async fn delete(&self, collection: &str, key: &str) -> Result<bool, StoreError> {
        check_name("collection", collection, true)?;
        check_name("key", key, true)?;
        let now = now_ms();
        let mut inner = self.lock()?;
        Ok(inner
            .remove(collection, key)
            .is_some_and(|old| is_live(old.expires_ms, now)))
    }

    async fn commit(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        check_batch(writes)?;
        let now = now_ms();
        let mut inner = self.lock()?;
        // Every precondition first (no record is touched twice, so each
        // holds against the state before the batch), then every write.
        for w in writes {
            let (c, k) = w.target();
            let live = inner
                .stored(c, k)
                .filter(|s| is_live(s.expires_ms, now))
                .map(|s| s.revision);
            if let Some(refused) = refusal(w, live) {
                return Err(refused);
            }
        }
        Ok(writes
            .iter()
            .map(|w| {
                let (c, k) = w.target();
                let old = inner.remove(c, k);
                match w {
                    Write::Insert(r) | Write::Replace { record: r, .. } => {
                        Written::Revision(inner.put(r, now))
                    }
                    Write::Delete { .. } => {
                        Written::Deleted(old.is_some_and(|o| is_live(o.expires_ms, now)))
                    }
                }
            })
            .collect())
    }

    async fn list(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        check_query(query)?;
        let now = now_ms();
        let inner = self.lock()?;
        let Some(c) = inner.collections.get(query.collection.as_str()) else {
            return Ok(Vec::new());
        };
        Ok(c.listed(query, now)
            .take(query.effective_limit())
            .map(|(k, s)| record(&query.collection, k, s))
            .collect())
    }

    async fn count(
        &self,
        collection: &str,
        partition: Option<&str>,
        status: Option<&str>,
    ) -> Result<u64, StoreError> {
        let q = count_query(collection, partition, status)?;
        let now = now_ms();
        let inner = self.lock()?;
        let Some(c) = inner.collections.get(collection) else {
            return Ok(0);
        };
        // Nothing has expired yet (the usual case): every key listed counts.
        if inner
            .by_expiry
            .first()
            .is_none_or(|(at, _, _)| is_live(*at, now))
        {
            return Ok(c.lists.get(&filter_of(&q)).map_or(0, |k| k.len() as u64));
        }
        Ok(c.listed(&q, now).count() as u64)
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let mut inner = self.lock()?;
            let upper = match now_ms.checked_add(1) {
                Some(next) => Bound::Excluded((next, Name::from(""), Name::from(""))),
                None => Bound::Unbounded,
            };
            let due: Vec<(Name, Name)> = inner
                .by_expiry
                .range((Bound::Unbounded, upper))
                .take(EXPIRE_BATCH)
                .map(|(_, c, k)| (Arc::clone(c), Arc::clone(k)))
                .collect();
            for (c, k) in &due {
                inner.remove(c, k);
            }
            total += due.len() as u64;
            if due.len() < EXPIRE_BATCH {
                return Ok(total);
            }
        }
    }
}

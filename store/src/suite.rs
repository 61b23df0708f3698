//! The test suite every adapter passes (feature `suite`): each adapter's
//! integration tests (`store/tests/`) call these cases on a store of their
//! own, so the guarantees of [`Store`] are checked once, the same way, for
//! the embedded and the PostgreSQL store.
//!
//! Every case works in collections of its own (a random suffix), so cases
//! may share a store. [`expire_by_time`] counts what one expiry pass
//! removes, so it must not run while another case writes to the same store.

use std::collections::BTreeSet;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;

use crate::{now_ms, Query, Record, Store, StoreError, Write, Written, MAX_BATCH};

/// A collection name no other case or run uses.
fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4().simple())
}

/// The record under (collection, key), which must exist.
async fn must_get<S: Store>(store: &S, collection: &str, key: &str) -> Result<Record> {
    store
        .get(collection, key)
        .await?
        .with_context(|| format!("{collection}/{key} should exist"))
}

/// Whether a stored record holds what was written.
fn ensure_same(stored: &Record, written: &Record) -> Result<()> {
    ensure!(
        stored.collection == written.collection,
        "collection differs"
    );
    ensure!(stored.key == written.key, "key differs: {:?}", stored.key);
    ensure!(stored.partition == written.partition, "partition differs");
    ensure!(stored.status == written.status, "status differs");
    ensure!(stored.value == written.value, "value differs");
    ensure!(
        stored.expires_ms == written.expires_ms,
        "expires_ms differs"
    );
    Ok(())
}

fn keys(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.key.as_str()).collect()
}

/// Every case but the restart pair and the concurrent ones' multi-store
/// form, one after another on one store.
pub async fn run_all<S: Store>(store: &S) -> Result<()> {
    insert_get_exists(store)
        .await
        .context("insert_get_exists")?;
    claim_once(std::slice::from_ref(store))
        .await
        .context("claim_once")?;
    expired_invisible_and_replaceable(store)
        .await
        .context("expired_invisible_and_replaceable")?;
    compare_and_set(store).await.context("compare_and_set")?;
    revisions_never_reused(store)
        .await
        .context("revisions_never_reused")?;
    concurrent_counter(std::slice::from_ref(store))
        .await
        .context("concurrent_counter")?;
    commit_all_or_nothing(store)
        .await
        .context("commit_all_or_nothing")?;
    commit_invalid_batches(store)
        .await
        .context("commit_invalid_batches")?;
    commit_concurrent(std::slice::from_ref(store))
        .await
        .context("commit_concurrent")?;
    list_filters_and_pages(store)
        .await
        .context("list_filters_and_pages")?;
    count_live(store).await.context("count_live")?;
    delete_records(store).await.context("delete_records")?;
    large_values(store).await.context("large_values")?;
    odd_names(store).await.context("odd_names")?;
    invalid_requests(store).await.context("invalid_requests")?;
    expire_by_time(store).await.context("expire_by_time")?;
    Ok(())
}

/// Insert, read back, and a second insert of the key refused with the
/// first one's revision.
pub async fn insert_get_exists<S: Store>(store: &S) -> Result<()> {
    let c = unique("insert");
    let written = Record::new(&c, "call-1")
        .with_partition("hello")
        .with_status("queued")
        .with_value(&br#"{"body":"hi"}"#[..]);
    let before = now_ms();
    let revision = store.insert(&written).await?;
    let after = now_ms();
    let stored = must_get(store, &c, "call-1").await?;
    ensure_same(&stored, &written)?;
    ensure!(
        stored.revision == revision,
        "get returns the insert's revision"
    );
    ensure!(
        (before..=after).contains(&stored.updated_ms),
        "updated_ms {} is the write time ({before}..={after})",
        stored.updated_ms
    );
    match store.insert(&written.clone().with_status("running")).await {
        Err(StoreError::Exists { revision: r }) => {
            ensure!(r == revision, "Exists names the revision")
        }
        other => bail!("a second insert should fail with Exists, got {other:?}"),
    }
    ensure!(
        must_get(store, &c, "call-1").await?.status == "queued",
        "a refused insert changes nothing"
    );
    ensure!(
        store.get(&c, "call-2").await?.is_none(),
        "a missing key is None"
    );
    ensure!(
        store.get(&unique("other"), "call-1").await?.is_none(),
        "collections are apart"
    );
    Ok(())
}

/// Of many inserts of one key at once (spread over `stores`, as over
/// several Trons), exactly one succeeds: an idempotency key is claimed once.
pub async fn claim_once<S: Store>(stores: &[S]) -> Result<()> {
    ensure!(!stores.is_empty(), "claim_once needs a store");
    let c = unique("idempotency");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = stores[i % stores.len()].clone();
        let record = Record::new(&c, "key-1").with_value(format!("\"call-{i}\""));
        tasks.spawn(async move { (i, store.insert(&record).await) });
    }
    let mut winners = Vec::new();
    let mut refused = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            (i, Ok(revision)) => winners.push((i, revision)),
            (_, Err(StoreError::Exists { revision })) => refused.push(revision),
            (_, Err(e)) => bail!("an insert failed: {e}"),
        }
    }
    ensure!(
        winners.len() == 1,
        "exactly one insert wins, not {}",
        winners.len()
    );
    let (winner, revision) = winners[0];
    ensure!(
        refused.iter().all(|r| *r == revision),
        "the others see the winner"
    );
    let stored = stores[0]
        .get(&c, "key-1")
        .await?
        .context("the claim exists")?;
    ensure!(
        stored.value == format!("\"call-{winner}\""),
        "the winner's value is kept"
    );
    Ok(())
}

/// An expired record is invisible to get, list and count, cannot be
/// replaced, and a new insert takes its place.
pub async fn expired_invisible_and_replaceable<S: Store>(store: &S) -> Result<()> {
    let c = unique("expired");
    let old = Record::new(&c, "k")
        .with_partition("p")
        .with_status("queued")
        .expiring_at(1);
    let old_revision = store.insert(&old).await?;
    ensure!(
        store.get(&c, "k").await?.is_none(),
        "an expired record is not returned"
    );
    ensure!(store.list(&Query::new(&c)).await?.is_empty(), "nor listed");
    ensure!(
        store
            .list(&Query::new(&c).partition("p").status("queued"))
            .await?
            .is_empty(),
        "nor listed by partition and status"
    );
    ensure!(store.count(&c, None, None).await? == 0, "nor counted");
    match store.replace(&old, old_revision).await {
        Err(StoreError::Conflict { current: None }) => {}
        other => bail!("replacing an expired record should be a Conflict, got {other:?}"),
    }
    let later = now_ms() + 3_600_000;
    let new = Record::new(&c, "k")
        .with_partition("q")
        .with_status("running")
        .with_value(&b"2"[..])
        .expiring_at(later);
    let revision = store.insert(&new).await?;
    ensure!(
        revision != old_revision,
        "the new record has a new revision"
    );
    ensure_same(&must_get(store, &c, "k").await?, &new)?;
    ensure!(
        store.list(&Query::new(&c).partition("p")).await?.is_empty(),
        "the old record's index entries are gone"
    );
    ensure!(
        keys(&store.list(&Query::new(&c).partition("q")).await?) == ["k"],
        "new entries"
    );
    ensure!(store.delete(&c, "k").await?, "clean up");
    Ok(())
}

/// Compare-and-set: a replace on the current revision wins, one on a stale
/// revision or a missing record is a Conflict, and a status change moves
/// the record between listings.
pub async fn compare_and_set<S: Store>(store: &S) -> Result<()> {
    let c = unique("cas");
    let first = Record::new(&c, "call")
        .with_partition("f")
        .with_status("queued");
    let r1 = store.insert(&first).await?;
    let running = first.clone().with_status("running").with_value(&b"{}"[..]);
    let r2 = store.replace(&running, r1).await?;
    ensure!(r2 != r1, "a replace gives a new revision");
    let stored = must_get(store, &c, "call").await?;
    ensure_same(&stored, &running)?;
    ensure!(stored.revision == r2, "get returns the new revision");
    match store
        .replace(&first.clone().with_status("failed"), r1)
        .await
    {
        Err(StoreError::Conflict { current }) => {
            ensure!(
                current == Some(r2),
                "the Conflict names the current revision"
            )
        }
        other => bail!("a stale replace should be a Conflict, got {other:?}"),
    }
    ensure!(
        must_get(store, &c, "call").await?.status == "running",
        "the stale write lost"
    );
    ensure!(
        store
            .list(&Query::new(&c).status("queued"))
            .await?
            .is_empty(),
        "no longer listed as queued"
    );
    let listed = store
        .list(&Query::new(&c).partition("f").status("running"))
        .await?;
    ensure!(keys(&listed) == ["call"], "listed as running");
    ensure!(
        store.count(&c, Some("f"), Some("queued")).await? == 0,
        "counted as running"
    );
    ensure!(
        store.count(&c, None, Some("running")).await? == 1,
        "counted as running"
    );
    match store.replace(&Record::new(&c, "missing"), 1).await {
        Err(StoreError::Conflict { current: None }) => {}
        other => bail!("replacing a missing record should be a Conflict, got {other:?}"),
    }
    ensure!(
        store.get(&c, "missing").await?.is_none(),
        "replace never creates"
    );
    Ok(())
}

/// A revision is never given twice, not even to a record deleted and
/// inserted again, so a compare-and-set on a stale read always fails.
pub async fn revisions_never_reused<S: Store>(store: &S) -> Result<()> {
    let c = unique("revisions");
    let record = Record::new(&c, "k");
    let mut seen = BTreeSet::new();
    let r1 = store.insert(&record).await?;
    seen.insert(r1);
    ensure!(store.delete(&c, "k").await?, "deleted");
    let r2 = store.insert(&record).await?;
    ensure!(seen.insert(r2), "a re-inserted record gets a new revision");
    match store.replace(&record.clone().with_status("x"), r1).await {
        Err(StoreError::Conflict { current }) => ensure!(current == Some(r2), "current is r2"),
        other => bail!("a replace on the deleted record's revision must fail, got {other:?}"),
    }
    let other = store.insert(&Record::new(&c, "other")).await?;
    ensure!(seen.insert(other), "revisions are unique across keys");
    Ok(())
}

/// Several tasks (spread over `stores`, as over several Trons) increment
/// one counter through get + replace retry loops; no update is lost.
pub async fn concurrent_counter<S: Store>(stores: &[S]) -> Result<()> {
    const TASKS: usize = 8;
    const INCREMENTS: u64 = 25;
    ensure!(!stores.is_empty(), "concurrent_counter needs a store");
    let c = unique("counter");
    stores[0]
        .insert(
            &Record::new(&c, "n")
                .with_status("running")
                .with_value(&b"0"[..]),
        )
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let store = stores[i % stores.len()].clone();
        let c = c.clone();
        tasks.spawn(async move {
            let mut conflicts = 0u64;
            for _ in 0..INCREMENTS {
                loop {
                    let current = must_get(&store, &c, "n").await?;
                    let n: u64 = std::str::from_utf8(&current.value)?.parse()?;
                    let next = current.clone().with_value((n + 1).to_string());
                    match store.replace(&next, current.revision).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => return Err(anyhow::Error::new(e)),
                    }
                }
            }
            Ok::<_, anyhow::Error>(conflicts)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let last = must_get(&stores[0], &c, "n").await?;
    let n: u64 = std::str::from_utf8(&last.value)?.parse()?;
    ensure!(
        n == TASKS as u64 * INCREMENTS,
        "the counter is {n}, not {}",
        TASKS as u64 * INCREMENTS
    );
    Ok(())
}

/// A batch applies every write or none: inserts, a replace and deletes
/// together; the first refusal (an existing key, a moved revision, a
/// delete on a stale revision) leaves everything as it was; a batch that
/// touches a record twice, or is too long, is invalid.
pub async fn commit_all_or_nothing<S: Store>(store: &S) -> Result<()> {
    let c = unique("commit");
    ensure!(store.commit(&[]).await?.is_empty(), "an empty batch");
    let doc = Record::new(&c, "doc").with_status("live");
    let r_doc = store.insert(&doc).await?;
    let gone = store.insert(&Record::new(&c, "gone")).await?;
    let updated = doc.clone().with_value(&b"{\"v\":2}"[..]);
    let outs = store
        .commit(&[
            Write::Replace {
                record: updated.clone(),
                expected_revision: r_doc,
            },
            Write::Insert(Record::new(&c, "event-1").with_status("pending")),
            Write::Delete {
                collection: c.clone(),
                key: "gone".into(),
                expected_revision: Some(gone),
            },
            Write::Delete {
                collection: c.clone(),
                key: "never-was".into(),
                expected_revision: None,
            },
        ])
        .await?;
    let [Written::Revision(r2), Written::Revision(r3), Written::Deleted(true), Written::Deleted(false)] =
        outs[..]
    else {
        bail!("the batch's outcomes: {outs:?}");
    };
    ensure!(
        r2 != r3 && r2 > r_doc && r3 > r_doc,
        "each write has a new revision"
    );
    ensure_same(&must_get(store, &c, "doc").await?, &updated)?;
    ensure!(
        must_get(store, &c, "event-1").await?.revision == r3,
        "inserted"
    );
    ensure!(store.get(&c, "gone").await?.is_none(), "deleted");
    // Refusals: nothing of the batch is written.
    let stale = [
        Write::Insert(Record::new(&c, "event-2")),
        Write::Replace {
            record: doc.clone().with_value(&b"stale"[..]),
            expected_revision: r_doc,
        },
    ];
    match store.commit(&stale).await {
        Err(StoreError::Conflict { current }) => {
            ensure!(
                current == Some(r2),
                "the Conflict names the current revision"
            )
        }
        other => bail!("a stale replace in a batch should be a Conflict, got {other:?}"),
    }
    let taken = [
        Write::Insert(Record::new(&c, "event-2")),
        Write::Insert(Record::new(&c, "event-1")),
    ];
    match store.commit(&taken).await {
        Err(StoreError::Exists { revision }) => ensure!(revision == r3, "Exists names it"),
        other => bail!("an insert of a taken key in a batch should be Exists, got {other:?}"),
    }
    let stale_delete = [
        Write::Insert(Record::new(&c, "event-2")),
        Write::Delete {
            collection: c.clone(),
            key: "event-1".into(),
            expected_revision: Some(r_doc),
        },
    ];
    match store.commit(&stale_delete).await {
        Err(StoreError::Conflict { current }) => ensure!(current == Some(r3), "names r3"),
        other => bail!("a delete on a stale revision should be a Conflict, got {other:?}"),
    }
    ensure!(
        store.get(&c, "event-2").await?.is_none(),
        "refused batches wrote nothing"
    );
    ensure!(
        must_get(store, &c, "event-1").await?.revision == r3,
        "event-1 kept"
    );
    ensure!(must_get(store, &c, "doc").await?.revision == r2, "doc kept");
    Ok(())
}

/// A batch that touches a record twice, is too long or names a bad key is
/// invalid, and writes nothing.
pub async fn commit_invalid_batches<S: Store>(store: &S) -> Result<()> {
    let c = unique("commit-invalid");
    let twice = [
        Write::Insert(Record::new(&c, "x")),
        Write::Delete {
            collection: c.clone(),
            key: "x".into(),
            expected_revision: None,
        },
    ];
    ensure!(
        matches!(store.commit(&twice).await, Err(StoreError::Invalid(_))),
        "a record touched twice is invalid"
    );
    let long: Vec<Write> = (0..=MAX_BATCH)
        .map(|i| Write::Insert(Record::new(&c, format!("long-{i}"))))
        .collect();
    ensure!(
        matches!(store.commit(&long).await, Err(StoreError::Invalid(_))),
        "a batch over MAX_BATCH is invalid"
    );
    ensure!(
        matches!(
            store
                .commit(&[Write::Insert(Record::new(&c, "a\0b"))])
                .await,
            Err(StoreError::Invalid(_))
        ),
        "a bad name in a batch is invalid"
    );
    ensure!(
        store.get(&c, "x").await?.is_none(),
        "nothing of an invalid batch"
    );
    Ok(())
}

/// The transactional outbox under contention: tasks (spread over
/// `stores`, as over several Trons) bump a counter and insert its event in
/// one batch, retrying on conflicts; every committed bump has exactly one
/// event, and every event one bump.
pub async fn commit_concurrent<S: Store>(stores: &[S]) -> Result<()> {
    const TASKS: usize = 6;
    const BUMPS: u64 = 15;
    ensure!(!stores.is_empty(), "commit_concurrent needs a store");
    let c = unique("outbox");
    stores[0]
        .insert(&Record::new(&c, "n").with_value(&b"0"[..]))
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let store = stores[i % stores.len()].clone();
        let c = c.clone();
        tasks.spawn(async move {
            for _ in 0..BUMPS {
                loop {
                    let current = must_get(&store, &c, "n").await?;
                    let n: u64 = std::str::from_utf8(&current.value)?.parse()?;
                    let batch = [
                        Write::Replace {
                            record: current.clone().with_value((n + 1).to_string()),
                            expected_revision: current.revision,
                        },
                        Write::Insert(
                            Record::new(&c, format!("event-{:06}", n + 1)).with_status("pending"),
                        ),
                    ];
                    match store.commit(&batch).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => {}
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
    let total = TASKS as u64 * BUMPS;
    let last = must_get(&stores[0], &c, "n").await?;
    ensure!(
        std::str::from_utf8(&last.value)? == total.to_string(),
        "the counter"
    );
    let events = stores[0]
        .list(&Query::new(&c).status("pending").limit(1000))
        .await?;
    let expected: Vec<String> = (1..=total).map(|n| format!("event-{n:06}")).collect();
    ensure!(keys(&events) == expected, "one event per bump, in order");
    Ok(())
}

/// Listing by collection, partition, status and both, in key order, paged
/// with `after_key`, skipping expired records and other collections.
pub async fn list_filters_and_pages<S: Store>(store: &S) -> Result<()> {
    let c = unique("list");
    // Collections whose names extend this one's, sharing its keys.
    for other in [format!("{c}x"), format!("{c}/x")] {
        store
            .insert(&Record::new(other, "k00").with_partition("f1"))
            .await?;
    }
    let mut all = Vec::new();
    // Inserted out of order; listed in key order.
    for i in [7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6] {
        let record = Record::new(&c, format!("k{i:02}"))
            .with_partition(if i % 2 == 0 { "f1" } else { "f2" })
            .with_status(if i % 3 == 0 { "queued" } else { "running" })
            .with_value(format!("{i}"));
        store.insert(&record).await?;
        all.push(record);
    }
    store
        .insert(
            &Record::new(&c, "k05a")
                .with_partition("f2")
                .with_status("running")
                .expiring_at(1),
        )
        .await?;
    all.sort_by(|a, b| a.key.cmp(&b.key));
    let filters: [(Option<&str>, Option<&str>); 6] = [
        (None, None),
        (Some("f1"), None),
        (Some("f2"), None),
        (None, Some("queued")),
        (Some("f1"), Some("queued")),
        (Some("f2"), Some("running")),
    ];
    for (partition, status) in filters {
        let expected: Vec<&Record> = all
            .iter()
            .filter(|r| partition.is_none_or(|p| r.partition == p))
            .filter(|r| status.is_none_or(|s| r.status == s))
            .collect();
        let mut query = Query::new(&c);
        query.partition = partition.map(str::to_owned);
        query.status = status.map(str::to_owned);
        let listed = store.list(&query).await?;
        ensure!(
            listed.len() == expected.len(),
            "{partition:?}/{status:?}: {:?}",
            keys(&listed)
        );
        for (got, want) in listed.iter().zip(&expected) {
            ensure_same(got, want)?;
        }
        // The same, in pages of 2.
        let mut paged = Vec::new();
        loop {
            let page = store.list(&query.clone().limit(2)).await?;
            ensure!(page.len() <= 2, "a page holds at most its limit");
            let Some(last) = page.last() else { break };
            query.after_key = Some(last.key.clone());
            paged.extend(page);
        }
        ensure!(
            keys(&paged) == keys(&listed),
            "{partition:?}/{status:?}: pages join up"
        );
        let count = store.count(&c, partition, status).await?;
        ensure!(
            count == expected.len() as u64,
            "{partition:?}/{status:?}: count {count}"
        );
    }
    ensure!(
        store.list(&Query::new(&c).limit(0)).await?.is_empty(),
        "limit 0 lists none"
    );
    ensure!(
        store
            .list(&Query::new(&c).partition("f3"))
            .await?
            .is_empty(),
        "no such partition"
    );
    let tail = store.list(&Query::new(&c).after("k10")).await?;
    ensure!(
        keys(&tail) == ["k11"],
        "after the last but one: {:?}",
        keys(&tail)
    );
    Ok(())
}

/// Counts of live records by partition and status.
pub async fn count_live<S: Store>(store: &S) -> Result<()> {
    let c = unique("count");
    let rows = [
        ("a", "f1", "queued", 0),
        ("b", "f1", "queued", 0),
        ("c", "f1", "queued", now_ms() + 3_600_000),
        ("d", "f1", "running", 0),
        ("e", "f1", "running", 0),
        ("f", "f2", "queued", 0),
        ("g", "f1", "queued", 1),
    ];
    for (key, partition, status, expires) in rows {
        let record = Record::new(&c, key)
            .with_partition(partition)
            .with_status(status)
            .expiring_at(expires);
        store.insert(&record).await?;
    }
    ensure!(store.count(&c, None, None).await? == 6, "all live records");
    ensure!(
        store.count(&c, Some("f1"), None).await? == 5,
        "by partition"
    );
    ensure!(
        store.count(&c, None, Some("queued")).await? == 4,
        "by status"
    );
    ensure!(
        store.count(&c, Some("f1"), Some("queued")).await? == 3,
        "by both"
    );
    ensure!(
        store.count(&c, Some("f3"), None).await? == 0,
        "an empty partition"
    );
    ensure!(
        store.count(&unique("none"), None, None).await? == 0,
        "an empty collection"
    );
    Ok(())
}

/// Delete removes a record and its index entries; deleting again, or an
/// expired record, reports false.
pub async fn delete_records<S: Store>(store: &S) -> Result<()> {
    let c = unique("delete");
    store
        .insert(
            &Record::new(&c, "a")
                .with_partition("f")
                .with_status("queued"),
        )
        .await?;
    store
        .insert(
            &Record::new(&c, "b")
                .with_partition("f")
                .with_status("queued"),
        )
        .await?;
    store
        .insert(&Record::new(&c, "gone").expiring_at(1))
        .await?;
    ensure!(store.delete(&c, "a").await?, "a live record is deleted");
    ensure!(store.get(&c, "a").await?.is_none(), "and gone");
    ensure!(
        !store.delete(&c, "a").await?,
        "a second delete finds nothing"
    );
    ensure!(!store.delete(&c, "missing").await?, "nor for a missing key");
    ensure!(
        !store.delete(&c, "gone").await?,
        "nor for an expired record"
    );
    let listed = store
        .list(&Query::new(&c).partition("f").status("queued"))
        .await?;
    ensure!(
        keys(&listed) == ["b"],
        "the index lost it: {:?}",
        keys(&listed)
    );
    ensure!(
        store.count(&c, Some("f"), None).await? == 1,
        "the count too"
    );
    store.insert(&Record::new(&c, "a")).await?;
    ensure!(
        store.get(&c, "a").await?.is_some(),
        "a deleted key can be inserted again"
    );
    Ok(())
}

/// Expiry by an explicit time: each pass removes what expired by then,
/// nothing else, and keeps records that never expire. Removes every record
/// of the store that expires within ten years.
pub async fn expire_by_time<S: Store>(store: &S) -> Result<()> {
    let c = unique("expire");
    let hour = 3_600_000;
    // Times ten years ahead, past every other case's expiries; whatever
    // expires before then (other cases' leftovers) is removed first.
    let t = now_ms() + 10 * 365 * 24 * hour;
    store.expire(t).await?;
    store
        .insert(
            &Record::new(&c, "soon")
                .with_status("queued")
                .expiring_at(t + hour),
        )
        .await?;
    store
        .insert(
            &Record::new(&c, "later")
                .with_status("queued")
                .expiring_at(t + 2 * hour),
        )
        .await?;
    store
        .insert(&Record::new(&c, "never").with_status("queued"))
        .await?;
    ensure!(store.expire(t + hour - 1).await? == 0, "nothing is due yet");
    ensure!(
        store.expire(t + hour).await? == 1,
        "one is due at its expiry"
    );
    ensure!(store.get(&c, "soon").await?.is_none(), "removed");
    ensure!(store.get(&c, "later").await?.is_some(), "not yet due");
    ensure!(store.expire(t + 3 * hour).await? == 1, "the next one");
    ensure!(
        store.expire(t + 3 * hour).await? == 0,
        "a second pass removes nothing"
    );
    ensure!(
        keys(&store.list(&Query::new(&c)).await?) == ["never"],
        "a record without expiry stays"
    );
    ensure!(
        keys(&store.list(&Query::new(&c).status("queued")).await?) == ["never"],
        "the index lost the expired ones"
    );
    // Expiring a record moved to a later expiry by replace uses the new one.
    let revision = store
        .insert(&Record::new(&c, "moved").expiring_at(t + hour))
        .await?;
    store
        .replace(
            &Record::new(&c, "moved").expiring_at(t + 5 * hour),
            revision,
        )
        .await?;
    ensure!(
        store.expire(t + 4 * hour).await? == 0,
        "the old expiry is forgotten"
    );
    ensure!(store.expire(t + 5 * hour).await? == 1, "the new one holds");
    // More than one batch (adapters remove at most 1000 per transaction),
    // written by a few tasks at once.
    const MANY: usize = 1001;
    let mut tasks = tokio::task::JoinSet::new();
    for first in 0..4 {
        let (store, c) = (store.clone(), c.clone());
        tasks.spawn(async move {
            for i in (first..MANY).step_by(4) {
                let record = Record::new(&c, format!("batch-{i:04}")).expiring_at(t + hour);
                store.insert(&record).await?;
            }
            Ok::<_, StoreError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    ensure!(
        store.expire(t + hour).await? == MANY as u64,
        "every batch is removed"
    );
    ensure!(
        store.count(&c, None, None).await? == 1,
        "only the record without expiry is left"
    );
    Ok(())
}

/// 1 MiB values, and values holding every byte.
pub async fn large_values<S: Store>(store: &S) -> Result<()> {
    let c = unique("large");
    let mib = |seed: u64| -> Bytes {
        let mut x = seed;
        (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
            .into()
    };
    let record = Record::new(&c, "big")
        .with_partition("f")
        .with_value(mib(1));
    let revision = store.insert(&record).await?;
    ensure_same(&must_get(store, &c, "big").await?, &record)?;
    let bigger = record.clone().with_value(mib(2));
    store.replace(&bigger, revision).await?;
    ensure_same(&must_get(store, &c, "big").await?, &bigger)?;
    let listed = store.list(&Query::new(&c).partition("f")).await?;
    ensure!(listed.len() == 1, "listed");
    ensure_same(&listed[0], &bigger)?;
    let every_byte = Record::new(&c, "bytes").with_value((0..=255u8).collect::<Vec<u8>>());
    store.insert(&every_byte).await?;
    ensure_same(&must_get(store, &c, "bytes").await?, &every_byte)?;
    Ok(())
}

/// Keys, partitions and statuses with slashes, quotes, wildcards, spaces
/// and non-ASCII text round-trip, and sort bytewise.
pub async fn odd_names<S: Store>(store: &S) -> Result<()> {
    let c = unique("odd/ü");
    let names = [
        "a",
        "a/b",
        "a/b/c",
        "a0",
        "ab",
        "B",
        "Z",
        "_",
        "%",
        "a%",
        "' OR 1=1 --",
        "\"quoted\"",
        "back\\slash",
        " leading space",
        "tab\there",
        "ключ",
        "🚀/launch",
        "é",
        "e\u{301}",
        "日本語",
        "line\nbreak",
    ];
    for (i, name) in names.iter().enumerate() {
        let record = Record::new(&c, *name)
            .with_partition(format!("func/{name}"))
            .with_status(*name)
            .with_value(format!("{i}"));
        store.insert(&record).await?;
        ensure_same(&must_get(store, &c, name).await?, &record)?;
        let listed = store
            .list(
                &Query::new(&c)
                    .partition(format!("func/{name}"))
                    .status(*name),
            )
            .await?;
        ensure!(
            keys(&listed) == [*name],
            "{name:?} by its partition and status"
        );
    }
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    let listed = store.list(&Query::new(&c)).await?;
    ensure!(
        keys(&listed) == sorted,
        "bytewise key order: {:?}",
        keys(&listed)
    );
    let after = store.list(&Query::new(&c).after("a/b").limit(2)).await?;
    ensure!(
        keys(&after) == ["a/b/c", "a0"],
        "paging after a prefix: {:?}",
        keys(&after)
    );
    ensure!(store.get(&c, "a/").await?.is_none(), "no prefix matching");
    ensure!(
        store.count(&c, Some("func/%"), None).await? == 1,
        "no wildcard matching"
    );
    Ok(())
}

/// Requests no adapter can store are refused with `Invalid`, the same way
/// for every adapter.
pub async fn invalid_requests<S: Store>(store: &S) -> Result<()> {
    let c = unique("invalid");
    let long = "k".repeat(crate::MAX_NAME_BYTES + 1);
    let bad = [
        Record::new(&c, ""),
        Record::new("", "k"),
        Record::new(&c, "nul\0key"),
        Record::new(&c, "k").with_partition("p\0"),
        Record::new(&c, "k").with_status("s\0"),
        Record::new(&c, long.as_str()),
        Record::new(&c, "k").expiring_at(u64::MAX),
    ];
    for record in &bad {
        match store.insert(record).await {
            Err(StoreError::Invalid(_)) => {}
            other => bail!("inserting {record:?} should be Invalid, got {other:?}"),
        }
    }
    let r = store.insert(&Record::new(&c, "k")).await?;
    match store
        .replace(&Record::new(&c, "k").with_status("s\0"), r)
        .await
    {
        Err(StoreError::Invalid(_)) => {}
        other => bail!("replace with a NUL should be Invalid, got {other:?}"),
    }
    ensure!(
        matches!(store.get(&c, "a\0").await, Err(StoreError::Invalid(_))),
        "get"
    );
    ensure!(
        matches!(store.delete(&c, "").await, Err(StoreError::Invalid(_))),
        "delete"
    );
    let query = Query::new(&c).after("a\0");
    ensure!(
        matches!(store.list(&query).await, Err(StoreError::Invalid(_))),
        "list"
    );
    let counted = store.count(&c, Some("p\0"), None).await;
    ensure!(matches!(counted, Err(StoreError::Invalid(_))), "count");
    Ok(())
}

/// Write records for [`check_after_restart`]: call this, close the store
/// (drop every clone), open it again and check. Returns what was written,
/// as stored.
pub async fn write_before_restart<S: Store>(store: &S) -> Result<Vec<Record>> {
    let c = unique("restart");
    let big = Bytes::from(vec![7u8; 1 << 20]);
    let first = Record::new(&c, "call/1")
        .with_partition("f")
        .with_status("queued");
    let revision = store.insert(&first).await?;
    store
        .replace(
            &first.clone().with_status("succeeded").with_value(big),
            revision,
        )
        .await?;
    store
        .insert(
            &Record::new(&c, "call/2")
                .with_partition("f")
                .with_status("queued")
                .expiring_at(now_ms() + 3_600_000),
        )
        .await?;
    store
        .insert(&Record::new(&c, "ключ").with_partition("g"))
        .await?;
    let mut stored = Vec::new();
    for key in ["call/1", "call/2", "ключ"] {
        stored.push(must_get(store, &c, key).await?);
    }
    Ok(stored)
}

/// After a restart, every record [`write_before_restart`] wrote is there
/// unchanged (revision and time included), the indexes still answer, and
/// new writes get revisions not given before.
pub async fn check_after_restart<S: Store>(store: &S, written: &[Record]) -> Result<()> {
    let first = written.first().context("nothing was written")?;
    let c = &first.collection;
    for record in written {
        let stored = must_get(store, c, &record.key).await?;
        ensure!(stored == *record, "{} survives unchanged", record.key);
    }
    let listed = store.list(&Query::new(c).partition("f")).await?;
    ensure!(
        keys(&listed) == ["call/1", "call/2"],
        "the partition index survives"
    );
    ensure!(
        store.count(c, None, Some("queued")).await? == 1,
        "the status index survives"
    );
    let old: BTreeSet<u64> = written.iter().map(|r| r.revision).collect();
    let revision = store.insert(&Record::new(c, "after")).await?;
    ensure!(!old.contains(&revision), "a new revision after the restart");
    let replaced = store.replace(first, first.revision).await?;
    ensure!(!old.contains(&replaced), "and after a replace");
    ensure!(
        store.expire(now_ms() + 2 * 3_600_000).await? >= 1,
        "the expiry index survives"
    );
    ensure!(
        store.get(c, "call/2").await?.is_none(),
        "expired after the restart"
    );
    Ok(())
}

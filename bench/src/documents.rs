//! `funcatron-bench --documents`: rows (n), the document store's writes
//! with their events ([`Documents::put`]: the document's record and its
//! outbox event committed in one atomic batch, answered once durable), on
//! the embedded state store (a redb file in a temporary directory) and on
//! PostgreSQL (`--documents-postgres`, default `FUNCATRON_TEST_POSTGRES`;
//! a table of the run's own, dropped at the end), called in this process
//! (no HTTP):
//!
//! - creates (a put of a fresh id, a `created` event with the new
//!   document) from 1 writer and from 64 concurrent writers;
//! - updates (a put of an existing id, an `updated` event with the old
//!   and the new document) from 64 writers, each write its own document;
//! - contended updates: 64 writers on 16 documents, so most writes find
//!   their document changed under them and read it again (the retries are
//!   in the latency; a write given up on is counted, not fatal);
//! - the outbox drained: every event of the rows read in order
//!   ([`Documents::pending`]) and removed ([`Documents::delivered`]) as a
//!   relay would, timed, with the check that each write left exactly one
//!   event and each document's events come in version order, none missing.
//!
//! Target (the document store's issue): embedded >= 5,000 writes/s with
//! their events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use funcatron_documents::{DocError, Documents, EventKind, Precondition};
use funcatron_store::{AnyStore, PostgresOptions, PostgresStore};
use serde_json::{json, Value};

use crate::{drive, row, Stats};

/// The collection written.
const COLLECTION: &str = "bench";
/// Writers of the concurrent rows.
const WRITERS: usize = 64;
/// Documents the contended row's writers share.
const HOT_DOCUMENTS: usize = 16;
/// The target, embedded, in writes per second with events.
const TARGET_EMBEDDED: f64 = 5_000.0;
/// Events read per [`Documents::pending`] page while draining.
const DRAIN_PAGE: usize = funcatron_store::MAX_LIST;

/// How the rows run.
pub struct Options<'a> {
    /// PostgreSQL to measure on; `None` skips its rows.
    pub postgres: Option<&'a str>,
    /// Writes of each embedded row.
    pub embedded_writes: usize,
    /// Writes of each PostgreSQL row.
    pub postgres_writes: usize,
}

/// A document of a realistic size (about 200 bytes as JSON).
fn document(n: u64) -> Value {
    json!({
        "status": if n.is_multiple_of(2) { "open" } else { "paid" },
        "customer": format!("c-{}", n % 977),
        "total": n * 7 % 10_000,
        "currency": "EUR",
        "items": [
            {"sku": "a-100", "quantity": 1 + n % 3, "price": 1250},
            {"sku": "b-220", "quantity": 1, "price": 4990}
        ],
        "note": "bench document"
    })
}

/// What the write rows did, to check the outbox against.
#[derive(Default)]
struct Written {
    /// Numbers every write of the run, so each one changes its document.
    seq: AtomicU64,
    /// Writes that committed (each with one event).
    ok: AtomicU64,
    /// Writes given up on ([`DocError::Busy`]: the document kept changing).
    busy: AtomicU64,
}

/// `total` puts from `writers` writers, the id of write `i` given by
/// `id(i)`; every committed one counted in `written`.
async fn writes(
    docs: &Documents,
    writers: usize,
    total: usize,
    written: &Arc<Written>,
    id: fn(u64) -> String,
) -> Result<Stats> {
    let next = Arc::new(AtomicU64::new(0));
    let (docs, written) = (docs.clone(), Arc::clone(written));
    drive(writers, total, move |_| {
        let (docs, next, written) = (docs.clone(), Arc::clone(&next), Arc::clone(&written));
        async move {
            let n = next.fetch_add(1, Ordering::Relaxed);
            // Every write a change: a write of the same document again
            // commits nothing (no version, no event).
            let mut doc = document(n);
            doc["seq"] = written.seq.fetch_add(1, Ordering::Relaxed).into();
            match docs.put(COLLECTION, &id(n), doc, Precondition::None).await {
                Ok(_) => {
                    written.ok.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(DocError::Busy) => {
                    written.busy.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err(anyhow::anyhow!("a write failed: {e} ({})", e.code())),
            }
        }
    })
    .await
}

/// What draining the outbox found.
struct Drained {
    events: u64,
    secs: f64,
    created: u64,
    updated: u64,
    /// Records that are not events.
    unreadable: u64,
    /// Events whose version is not the one after their document's last.
    out_of_order: u64,
    /// Events left after the drain.
    left: u64,
}

/// Read every pending event in order and remove it, a page at a time.
async fn drain(docs: &Documents) -> Result<Drained> {
    let mut d = Drained {
        events: 0,
        secs: 0.0,
        created: 0,
        updated: 0,
        unreadable: 0,
        out_of_order: 0,
        left: 0,
    };
    let mut last: HashMap<String, u64> = HashMap::new();
    let started = Instant::now();
    let mut after: Option<String> = None;
    loop {
        let page = docs.pending(after.as_deref(), DRAIN_PAGE).await?;
        for p in &page {
            d.events += 1;
            match &p.event {
                Ok(e) => {
                    match e.kind {
                        EventKind::Created => d.created += 1,
                        EventKind::Updated => d.updated += 1,
                        EventKind::Deleted => {}
                    }
                    let before = last.insert(e.id.clone(), e.version).unwrap_or(0);
                    if e.version != before + 1 {
                        d.out_of_order += 1;
                    }
                }
                Err(_) => d.unreadable += 1,
            }
        }
        let keys: Vec<&str> = page.iter().map(|p| p.key.as_str()).collect();
        docs.delivered(&keys).await?;
        if page.len() < DRAIN_PAGE {
            break;
        }
        after = page.last().map(|p| p.key.clone());
    }
    d.secs = started.elapsed().as_secs_f64();
    d.left = docs.backlog().await?;
    Ok(d)
}

/// The rows on one state store; the c=1 and c=64 create rows' stats.
async fn rows(label: &str, store: AnyStore, total: usize) -> Result<(Stats, Stats)> {
    let docs = Documents::new(store);
    docs.define(COLLECTION, funcatron_documents::Definition::default())
        .await
        .context("defining the collection")?;
    let written = Arc::new(Written::default());
    // Each row its own ids: a row's creates all create.
    let c1 = writes(&docs, 1, total, &written, |n| format!("one-{n}")).await?;
    row(&format!("(n) {label}: create, 1 writer"), c1);
    let c64 = writes(&docs, WRITERS, total, &written, |n| format!("many-{n}")).await?;
    row(&format!("(n) {label}: create, {WRITERS} writers"), c64);
    // The same ids again (the warm-up's first, then the measured ones'):
    // each an update of a document of its own.
    let upd = writes(&docs, WRITERS, total, &written, |n| format!("many-{n}")).await?;
    row(&format!("(n) {label}: update, {WRITERS} writers"), upd);
    let busy_before = written.busy.load(Ordering::Relaxed);
    let hot = writes(&docs, WRITERS, total, &written, |n| {
        format!("hot-{}", n % HOT_DOCUMENTS as u64)
    })
    .await?;
    let busy = written.busy.load(Ordering::Relaxed) - busy_before;
    row(
        &format!("(n) {label}: update, {WRITERS} on {HOT_DOCUMENTS} docs"),
        hot,
    );
    if busy > 0 {
        println!("    {busy} contended writes given up on (busy: the document kept changing)");
    }

    let d = drain(&docs).await?;
    let ok = written.ok.load(Ordering::Relaxed);
    println!(
        "(n) {label}: outbox drained: {} events in {:.2} s, {:.0} events/s (read + delete); \
         {} created, {} updated; {} writes committed; {} unreadable, {} out of order, {} left{}",
        d.events,
        d.secs,
        d.events as f64 / d.secs,
        d.created,
        d.updated,
        ok,
        d.unreadable,
        d.out_of_order,
        d.left,
        if d.events == ok && d.unreadable == 0 && d.out_of_order == 0 && d.left == 0 {
            " (every write one event, in order)"
        } else {
            " (MISMATCH)"
        }
    );
    Ok((c1, c64))
}

/// The embedded rows, in a redb file of a temporary directory.
async fn embedded(total: usize) -> Result<(Stats, Stats)> {
    let dir = tempfile::tempdir()?;
    let store = AnyStore::open_embedded(dir.path().join(funcatron_store::embedded::FILE_NAME))
        .await
        .context("the embedded store")?;
    rows("embedded", store, total).await
}

/// The PostgreSQL rows, in a table of their own, dropped at the end
/// (whatever the rows did).
async fn postgres(url: &str, total: usize) -> Result<(Stats, Stats)> {
    let table = format!("bench_docs_{}", &funcatron_envelope::new_request_id()[..12]);
    let pg = PostgresStore::connect_with(
        url,
        PostgresOptions {
            table,
            ..PostgresOptions::default()
        },
    )
    .await
    .with_context(|| format!("PostgreSQL at {url}"))?;
    let outcome = rows("PostgreSQL", AnyStore::Postgres(pg.clone()), total).await;
    pg.drop_table().await.context("dropping the bench table")?;
    outcome
}

/// Rows (n) and the ratio rows.
pub async fn run(o: &Options<'_>) -> Result<()> {
    println!(
        "machine: {} CPUs; document writes per row: {} embedded, {} PostgreSQL",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        o.embedded_writes,
        o.postgres_writes
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9}",
        "measurement", "writes/s", "p50 ms", "p99 ms"
    );
    let (e1, e64) = embedded(o.embedded_writes)
        .await
        .context("document rows, embedded")?;
    let pg = match o.postgres {
        Some(url) => Some(
            postgres(url, o.postgres_writes)
                .await
                .context("document rows, PostgreSQL")?,
        ),
        None => {
            println!(
                "(n) PostgreSQL: skipped (no --documents-postgres or FUNCATRON_TEST_POSTGRES)"
            );
            None
        }
    };
    println!();
    println!(
        "embedded writes with events, {WRITERS} writers: {:.0} writes/s, {:.2} of the target (target >= {TARGET_EMBEDDED:.0})",
        e64.rps,
        e64.rps / TARGET_EMBEDDED
    );
    println!(
        "embedded writes with events, 1 writer:   {:.0} writes/s, {:.2} of the target",
        e1.rps,
        e1.rps / TARGET_EMBEDDED
    );
    if let Some((p1, p64)) = pg {
        println!(
            "PostgreSQL/embedded writes, {WRITERS} writers:  {:.2} ({:.0} writes/s)",
            p64.rps / e64.rps,
            p64.rps
        );
        println!(
            "PostgreSQL/embedded writes, 1 writer:    {:.2} ({:.0} writes/s)",
            p1.rps / e1.rps,
            p1.rps
        );
    }
    Ok(())
}

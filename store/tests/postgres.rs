//! The shared suite (`funcatron_store::suite`) on PostgreSQL, plus what only
//! a shared server can show: two stores (two Trons) on one table, records
//! surviving a new connection, reconnection after the server drops the
//! connections, and errors instead of panics when it is unreachable.
//!
//! The server is `FUNCATRON_TEST_POSTGRES` (default
//! `postgres://funcatron:funcatron@127.0.0.1:5432/funcatron_test`, which
//! `scripts/test.sh` installs and starts). These tests fail, not skip, when
//! it cannot be reached. Each test uses a table of its own, dropped at the
//! end, so tests run in parallel.

use std::time::Duration;

use funcatron_store::{suite, AnyStore, PostgresOptions, PostgresStore, Record, Store, StoreError};

const DEFAULT_URL: &str = "postgres://funcatron:funcatron@127.0.0.1:5432/funcatron_test";

fn url() -> String {
    std::env::var("FUNCATRON_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn options(table: &str) -> PostgresOptions {
    PostgresOptions {
        table: table.to_owned(),
        ..PostgresOptions::default()
    }
}

fn fresh_table() -> String {
    format!("test_{}", &uuid::Uuid::new_v4().simple().to_string()[..20])
}

/// A store on `table` at the test server; a clear failure when it is not
/// there.
async fn connect(url: &str, table: &str) -> PostgresStore {
    match PostgresStore::connect_with(url, options(table)).await {
        Ok(store) => store,
        Err(e) => panic!(
            "PostgreSQL at FUNCATRON_TEST_POSTGRES ({}) is unreachable: {e}. \
             Run scripts/test.sh, which installs and starts it, or point \
             FUNCATRON_TEST_POSTGRES at a server",
            url.split('@').next_back().unwrap_or(url)
        ),
    }
}

/// A store on a fresh table of its own.
async fn fresh() -> PostgresStore {
    connect(&url(), &fresh_table()).await
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() -> anyhow::Result<()> {
                let store = fresh().await;
                let outcome = suite::$case(&AnyStore::Postgres(store.clone())).await;
                store.drop_table().await?;
                outcome
            }
        )*
    };
}

cases!(
    insert_get_exists,
    expired_invisible_and_replaceable,
    compare_and_set,
    commit_all_or_nothing,
    commit_invalid_batches,
    revisions_never_reused,
    list_filters_and_pages,
    count_live,
    delete_records,
    expire_by_time,
    large_values,
    odd_names,
    invalid_requests,
);

/// Two stores with pools of their own on one table: two Trons.
async fn two_trons() -> (AnyStore, AnyStore, PostgresStore) {
    let table = fresh_table();
    let a = connect(&url(), &table).await;
    let b = connect(&url(), &table).await;
    (AnyStore::Postgres(a.clone()), AnyStore::Postgres(b), a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_counter_from_two_trons() -> anyhow::Result<()> {
    let (a, b, owner) = two_trons().await;
    let outcome = suite::concurrent_counter(&[a, b]).await;
    owner.drop_table().await?;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_concurrent_from_two_trons() -> anyhow::Result<()> {
    let (a, b, owner) = two_trons().await;
    let outcome = suite::commit_concurrent(&[a, b]).await;
    owner.drop_table().await?;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_once_from_two_trons() -> anyhow::Result<()> {
    let (a, b, owner) = two_trons().await;
    let outcome = suite::claim_once(&[a, b]).await;
    owner.drop_table().await?;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_case_on_one_store() -> anyhow::Result<()> {
    let store = fresh().await;
    let outcome = suite::run_all(&AnyStore::Postgres(store.clone())).await;
    store.drop_table().await?;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_connection_keeps_records() -> anyhow::Result<()> {
    let table = fresh_table();
    let first = connect(&url(), &table).await;
    let written = suite::write_before_restart(&AnyStore::Postgres(first.clone())).await?;
    drop(first);
    let second = connect(&url(), &table).await;
    let outcome = suite::check_after_restart(&AnyStore::Postgres(second.clone()), &written).await;
    second.drop_table().await?;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_picks_postgres() -> anyhow::Result<()> {
    let store = AnyStore::open(&url()).await.expect("the test server");
    assert_eq!(store.kind(), "postgres");
    let AnyStore::Postgres(pg) = &store else {
        unreachable!()
    };
    assert_eq!(pg.table(), PostgresOptions::default().table);
    pg.drop_table().await?;
    Ok(())
}

/// The server drops every connection of the store; the store answers
/// `Unavailable` (never panics) and then works again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_after_the_server_drops_connections() -> anyhow::Result<()> {
    let table = fresh_table();
    let name = format!("reconnect_{table}");
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let store = connect(&format!("{base}{sep}application_name={name}"), &table).await;
    let admin = connect(&base, &table).await;
    store.insert(&Record::new("c", "before")).await?;
    // Several connections open, then all of them killed.
    let records: Vec<_> = (0..3).map(|i| Record::new("c", format!("k{i}"))).collect();
    let held: Vec<_> = records.iter().map(|r| store.insert(r)).collect();
    for outcome in futures::future::join_all(held).await {
        outcome?;
    }
    let killed = terminate(&base, &name).await?;
    assert!(killed >= 1, "the store's connections were found");
    let mut failures = 0;
    let mut recovered = false;
    for _ in 0..10 {
        match store.get("c", "before").await {
            Ok(found) => {
                assert!(found.is_some(), "the record is still there");
                recovered = true;
                break;
            }
            Err(StoreError::Unavailable(_)) => failures += 1,
            Err(e) => panic!("a dropped connection should be Unavailable, got {e:?}"),
        }
    }
    assert!(
        recovered,
        "the store reconnects by itself ({failures} failures)"
    );
    assert!(
        failures <= 8,
        "each broken connection fails at most once: {failures}"
    );
    store.insert(&Record::new("c", "after")).await?;
    admin.drop_table().await?;
    Ok(())
}

/// Terminate every backend with this application name; how many.
async fn terminate(url: &str, application_name: &str) -> anyhow::Result<u64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&application_name],
        )
        .await?;
    drop(client);
    let _ = task.await;
    Ok(rows.len() as u64)
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    let options = PostgresOptions {
        timeout: Duration::from_secs(2),
        ..PostgresOptions::default()
    };
    // Port 1 on loopback: nothing listens there.
    let url = "postgres://funcatron:funcatron@127.0.0.1:1/funcatron_test";
    match PostgresStore::connect_with(url, options).await {
        Err(StoreError::Unavailable(reason)) => assert!(!reason.is_empty()),
        Ok(_) => panic!("nothing listens on port 1"),
        Err(e) => panic!("an unreachable server should be Unavailable, got {e:?}"),
    }
}

#[tokio::test]
async fn bad_urls_and_options_are_invalid() {
    for (url, table) in [
        ("postgres://u:p@127.0.0.1/db?sslmode=require", "t"),
        ("postgres://u:p@127.0.0.1/db?no_such_option=1", "t"),
        ("postgres://u:p@127.0.0.1/db", "Bad-Name"),
        ("postgres://u:p@127.0.0.1/db", "t; DROP TABLE x"),
        ("postgres://u:p@127.0.0.1/db", ""),
    ] {
        match PostgresStore::connect_with(url, options(table)).await {
            Err(StoreError::Invalid(_)) => {}
            Ok(_) => panic!("{url} with table {table:?} should be refused"),
            Err(e) => panic!("{url} with table {table:?} should be Invalid, got {e:?}"),
        }
    }
}

//! The shared suite (`funcatron_store::suite`) on the single-node stores:
//! the memory adapter, and the embedded (redb) one in memory and in a
//! file, plus what only a file can show: records survive closing and
//! reopening it.

use funcatron_store::{suite, AnyStore, EmbeddedStore};

fn redb_in_memory() -> anyhow::Result<AnyStore> {
    Ok(AnyStore::Embedded(EmbeddedStore::memory()?))
}

/// Each case, once on a fresh in-memory store and once on a fresh file.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() -> anyhow::Result<()> {
                    let store = AnyStore::memory()?;
                    suite::$case(&store).await
                }
            )*
        }
        mod redb_memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() -> anyhow::Result<()> {
                    let store = redb_in_memory()?;
                    suite::$case(&store).await
                }
            )*
        }
        mod file {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() -> anyhow::Result<()> {
                    let dir = tempfile::tempdir()?;
                    let store = AnyStore::open_embedded(dir.path().join("store.redb")).await?;
                    suite::$case(&store).await
                }
            )*
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_counter_in_memory() -> anyhow::Result<()> {
    let store = AnyStore::memory()?;
    suite::concurrent_counter(&[store.clone(), store]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_counter_in_a_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = AnyStore::open_embedded(dir.path().join("store.redb")).await?;
    suite::concurrent_counter(&[store.clone(), store]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claim_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = AnyStore::open_embedded(dir.path().join("store.redb")).await?;
    suite::claim_once(&[store.clone(), store]).await?;
    suite::claim_once(&[AnyStore::memory()?]).await?;
    suite::claim_once(&[redb_in_memory()?]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_case_on_one_store() -> anyhow::Result<()> {
    suite::run_all(&AnyStore::memory()?).await?;
    suite::run_all(&redb_in_memory()?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reopening_the_file_keeps_records() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let target = dir
        .path()
        .to_str()
        .expect("a UTF-8 temporary path")
        .to_owned();
    let store = AnyStore::open(&target).await?;
    let written = suite::write_before_restart(&store).await?;
    drop(store);
    let store = AnyStore::open(&target).await?;
    suite::check_after_restart(&store, &written).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_is_held_by_one_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let _first = AnyStore::open_embedded(&path).await?;
    match AnyStore::open_embedded(&path).await {
        Err(funcatron_store::StoreError::Unavailable(reason)) => {
            assert!(
                reason.contains("store.redb"),
                "the reason names the file: {reason}"
            );
        }
        Ok(_) => panic!("a second open of one file must fail"),
        Err(e) => panic!("a second open should be Unavailable, got {e:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_concurrent_in_memory_and_a_file() -> anyhow::Result<()> {
    let store = AnyStore::memory()?;
    suite::commit_concurrent(&[store.clone(), store]).await?;
    let dir = tempfile::tempdir()?;
    let store = AnyStore::open_embedded(dir.path().join("store.redb")).await?;
    suite::commit_concurrent(&[store.clone(), store]).await
}

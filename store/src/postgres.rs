//! The PostgreSQL store: one table shared by every Tron of a cluster, for
//! production. Through `tokio-postgres` with a small `deadpool-postgres`
//! pool, which replaces a broken connection with a new one by itself; every
//! failure is a [`StoreError::Unavailable`] naming the reason, never a
//! panic.
//!
//! [`PostgresStore::connect`] creates what it needs if missing (under an
//! advisory lock, so Trons starting together do not race): the table
//! (primary key (collection, key), text in the `C` collation so keys sort
//! bytewise as in the embedded store, the value as `bytea`), a sequence
//! giving revisions (never reused), the listing indexes (collection,
//! partition, status, key), (collection, partition, key) and (collection,
//! status, key), and a partial index on `expires_ms` for records that
//! expire.
//!
//! Insert is `INSERT ... ON CONFLICT DO UPDATE ... WHERE` the existing row
//! has expired, so it is atomic across Trons; replace is `UPDATE ... WHERE
//! revision = $expected`; a batch ([`Store::commit`]) runs the same
//! statements in one transaction, rolled back at the first refusal;
//! expiry deletes in batches with `FOR UPDATE SKIP LOCKED`, so several
//! Trons expiring at once share the work.
//!
//! TLS is not supported yet: a URL with `sslmode=require` is refused
//! (`prefer`, the default, connects without TLS).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::{
    check_batch, check_name, check_query, check_record, count_query, is_live, now_ms, Query,
    Record, Store, StoreError, Write, Written,
};

/// How to connect: the table and the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The table holding the records (lower-case letters, digits and `_`,
    /// at most 40 characters); its sequence and indexes are named after it.
    /// Tests use one of their own; clusters sharing a database may too.
    pub table: String,
    /// Most connections this store holds open.
    pub pool_size: usize,
    /// How long to wait for a connection (to connect, or for a free one in
    /// the pool) before failing with [`StoreError::Unavailable`]; also the
    /// connect timeout when the URL gives none.
    pub timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            table: "funcatron_records".into(),
            pool_size: 8,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL adapter. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The statements, written once for the table.
    sql: Arc<Sql>,
}

/// Records [`Store::expire`] deletes per statement.
const EXPIRE_BATCH: u64 = 1000;

/// Times an insert that found an expired row which changed under it is
/// tried again before giving up.
const INSERT_TRIES: usize = 5;

const COLUMNS: &str = "collection, key, partition, status, value, revision, expires_ms, updated_ms";
const LIVE: &str = "(expires_ms = 0 OR expires_ms > $2)";

/// Every statement, for one table.
struct Sql {
    table: String,
    insert: String,
    live_revision: String,
    get: String,
    replace: String,
    delete: String,
    /// A delete on an expected revision.
    delete_expected: String,
    /// By (partition given, status given).
    list: [String; 4],
    count: [String; 4],
    expire: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        // $1 collection, $2 now; then the filters.
        let filters = |partition: bool, status: bool| {
            let mut sql = format!("collection = $1 AND {LIVE}");
            let mut n = 3;
            if partition {
                sql += &format!(" AND partition = ${n}");
                n += 1;
            }
            if status {
                sql += &format!(" AND status = ${n}");
                n += 1;
            }
            (sql, n)
        };
        let combos = [(false, false), (true, false), (false, true), (true, true)];
        let list = combos.map(|(p, s)| {
            let (w, n) = filters(p, s);
            let m = n + 1;
            format!("SELECT {COLUMNS} FROM {t} WHERE {w} AND key > ${n} ORDER BY key LIMIT ${m}")
        });
        let count = combos.map(|(p, s)| {
            let (w, _) = filters(p, s);
            format!("SELECT count(*) FROM {t} WHERE {w}")
        });
        Sql {
            table: t.to_owned(),
            insert: format!(
                "INSERT INTO {t} AS r ({COLUMNS}) VALUES ($1, $3, $4, $5, $6, nextval('{t}_revision'), $7, $2) \
                 ON CONFLICT (collection, key) DO UPDATE SET partition = EXCLUDED.partition, \
                 status = EXCLUDED.status, value = EXCLUDED.value, revision = EXCLUDED.revision, \
                 expires_ms = EXCLUDED.expires_ms, updated_ms = EXCLUDED.updated_ms \
                 WHERE r.expires_ms <> 0 AND r.expires_ms <= $2 RETURNING revision"
            ),
            live_revision: format!(
                "SELECT revision FROM {t} WHERE collection = $1 AND {LIVE} AND key = $3"
            ),
            get: format!("SELECT {COLUMNS} FROM {t} WHERE collection = $1 AND {LIVE} AND key = $3"),
            replace: format!(
                "UPDATE {t} SET partition = $4, status = $5, value = $6, \
                 revision = nextval('{t}_revision'), expires_ms = $7, updated_ms = $2 \
                 WHERE collection = $1 AND {LIVE} AND key = $3 AND revision = $8 RETURNING revision"
            ),
            delete: format!("DELETE FROM {t} WHERE collection = $1 AND key = $2 RETURNING expires_ms"),
            delete_expected: format!(
                "DELETE FROM {t} WHERE collection = $1 AND {LIVE} AND key = $3 AND revision = $4 RETURNING revision"
            ),
            list,
            count,
            expire: format!(
                "WITH due AS (SELECT collection, key FROM {t} WHERE expires_ms > 0 AND expires_ms <= $1 \
                 ORDER BY expires_ms LIMIT {EXPIRE_BATCH} FOR UPDATE SKIP LOCKED) \
                 DELETE FROM {t} USING due WHERE {t}.collection = due.collection AND {t}.key = due.key"
            ),
        }
    }

    fn schema(&self) -> String {
        let t = &self.table;
        format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('funcatron-store'));
             CREATE TABLE IF NOT EXISTS {t} (
               collection text COLLATE \"C\" NOT NULL,
               key text COLLATE \"C\" NOT NULL,
               partition text COLLATE \"C\" NOT NULL,
               status text COLLATE \"C\" NOT NULL,
               value bytea NOT NULL,
               revision bigint NOT NULL,
               expires_ms bigint NOT NULL,
               updated_ms bigint NOT NULL,
               PRIMARY KEY (collection, key));
             CREATE SEQUENCE IF NOT EXISTS {t}_revision;
             CREATE INDEX IF NOT EXISTS {t}_partition_status ON {t} (collection, partition, status, key) INCLUDE (expires_ms);
             CREATE INDEX IF NOT EXISTS {t}_partition ON {t} (collection, partition, key) INCLUDE (expires_ms);
             CREATE INDEX IF NOT EXISTS {t}_status ON {t} (collection, status, key) INCLUDE (expires_ms);
             CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires_ms) WHERE expires_ms > 0;
             COMMIT;"
        )
    }
}

fn unavailable(reason: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("postgres: {reason}"))
}

/// A client or pool failure with its causes: tokio-postgres keeps the
/// useful part ("Connection refused", the server's message) in the chain.
fn failed<E: std::error::Error>(e: E) -> StoreError {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !reason.contains(&text) {
            reason = format!("{reason}: {text}");
        }
        source = cause.source();
    }
    unavailable(reason)
}

/// A stored `bigint` as the `u64` it was written from.
fn unsigned(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| unavailable(format!("a stored number is negative ({v})")))
}

/// A `u64` the seam checked fits (or a clock reading) as a `bigint`.
fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn check_table(table: &str) -> Result<(), StoreError> {
    let ok = !table.is_empty()
        && table.len() <= 40
        && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && table
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "table name {table:?}: use at most 40 lower-case letters, digits and _"
        )))
    }
}

fn record_of(row: &Row) -> Result<Record, StoreError> {
    let get = failed::<tokio_postgres::Error>;
    Ok(Record {
        collection: row.try_get(0).map_err(get)?,
        key: row.try_get(1).map_err(get)?,
        partition: row.try_get(2).map_err(get)?,
        status: row.try_get(3).map_err(get)?,
        value: Bytes::from(row.try_get::<_, Vec<u8>>(4).map_err(get)?),
        revision: unsigned(row.try_get(5).map_err(get)?)?,
        expires_ms: unsigned(row.try_get(6).map_err(get)?)?,
        updated_ms: unsigned(row.try_get(7).map_err(get)?)?,
    })
}

impl PostgresStore {
    /// Connect with the default [`PostgresOptions`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connect to `url` (`postgres://user:password@host:5432/database`, or
    /// a key=value string) and create the table, its sequence and indexes
    /// if missing. Fails with [`StoreError::Unavailable`] when the server
    /// cannot be reached, [`StoreError::Invalid`] for a bad URL or options.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        check_table(&options.table)?;
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("PostgreSQL URL: {e}")))?;
        if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
            return Err(StoreError::Invalid(
                "sslmode=require is not supported yet: connect without TLS (a local socket, a private network or a TLS tunnel)".into(),
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("funcatron-store");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.timeout))
            .create_timeout(Some(options.timeout))
            .recycle_timeout(Some(options.timeout))
            .build()
            .map_err(|e| StoreError::Invalid(format!("PostgreSQL pool: {e}")))?;
        let store = PostgresStore {
            pool,
            sql: Arc::new(Sql::new(&options.table)),
        };
        let client = store.client().await?;
        client
            .batch_execute(&store.sql.schema())
            .await
            .map_err(failed)?;
        Ok(store)
    }

    /// The table this store uses.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// Remove the table and its sequence, with every record (tests,
    /// decommissioning).
    pub async fn drop_table(&self) -> Result<(), StoreError> {
        let t = &self.sql.table;
        self.client()
            .await?
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {t}; DROP SEQUENCE IF EXISTS {t}_revision;"
            ))
            .await
            .map_err(failed)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(failed)
    }

    /// Run a prepared (cached) statement and return its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(failed)?;
        client.query(&statement, params).await.map_err(failed)
    }

    /// The live record's revision, if any.
    async fn live_revision(&self, c: &str, k: &str, now: i64) -> Result<Option<u64>, StoreError> {
        let rows = self.query(&self.sql.live_revision, &[&c, &now, &k]).await?;
        rows.first()
            .map(|row| row.try_get(0).map_err(failed).and_then(unsigned))
            .transpose()
    }
}

impl Store for PostgresStore {
    async fn insert(&self, record: &Record) -> Result<u64, StoreError> {
        check_record(record)?;
        let r = record;
        let value: &[u8] = &r.value;
        let expires = signed(r.expires_ms);
        for _ in 0..INSERT_TRIES {
            let now = signed(now_ms());
            let params: [&(dyn ToSql + Sync); 7] = [
                &r.collection,
                &now,
                &r.key,
                &r.partition,
                &r.status,
                &value,
                &expires,
            ];
            if let Some(row) = self.query(&self.sql.insert, &params).await?.first() {
                return unsigned(row.try_get(0).map_err(failed)?);
            }
            // Not inserted: a live row holds the key, unless it changed
            // (deleted, or expired) since; then try again.
            if let Some(revision) = self.live_revision(&r.collection, &r.key, now).await? {
                return Err(StoreError::Exists { revision });
            }
        }
        Err(unavailable("the key kept changing under the insert"))
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Record>, StoreError> {
        check_name("collection", collection, true)?;
        check_name("key", key, true)?;
        let now = signed(now_ms());
        let rows = self
            .query(&self.sql.get, &[&collection, &now, &key])
            .await?;
        rows.first().map(record_of).transpose()
    }

    async fn replace(&self, record: &Record, expected_revision: u64) -> Result<u64, StoreError> {
        check_record(record)?;
        let r = record;
        let value: &[u8] = &r.value;
        let (now, expires, expected) = (
            signed(now_ms()),
            signed(r.expires_ms),
            signed(expected_revision),
        );
        let params: [&(dyn ToSql + Sync); 8] = [
            &r.collection,
            &now,
            &r.key,
            &r.partition,
            &r.status,
            &value,
            &expires,
            &expected,
        ];
        if let Some(row) = self.query(&self.sql.replace, &params).await?.first() {
            return unsigned(row.try_get(0).map_err(failed)?);
        }
        let current = self.live_revision(&r.collection, &r.key, now).await?;
        Err(StoreError::Conflict { current })
    }

    async fn delete(&self, collection: &str, key: &str) -> Result<bool, StoreError> {
        check_name("collection", collection, true)?;
        check_name("key", key, true)?;
        let rows = self.query(&self.sql.delete, &[&collection, &key]).await?;
        let now = now_ms();
        match rows.first() {
            None => Ok(false),
            Some(row) => Ok(is_live(unsigned(row.try_get(0).map_err(failed)?)?, now)),
        }
    }

    async fn commit(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        check_batch(writes)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        // Dropped without a commit (a refusal, an error): rolled back.
        let tx = client.transaction().await.map_err(failed)?;
        let now = signed(now_ms());
        let mut outs = Vec::with_capacity(writes.len());
        for w in writes {
            let (c, k) = w.target();
            let row = match w {
                Write::Insert(r) | Write::Replace { record: r, .. } => {
                    let value: &[u8] = &r.value;
                    let expires = signed(r.expires_ms);
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                        &r.collection,
                        &now,
                        &r.key,
                        &r.partition,
                        &r.status,
                        &value,
                        &expires,
                    ];
                    let expected;
                    let sql = if let Write::Replace {
                        expected_revision, ..
                    } = w
                    {
                        expected = signed(*expected_revision);
                        params.push(&expected);
                        &self.sql.replace
                    } else {
                        &self.sql.insert
                    };
                    let statement = tx.prepare_cached(sql).await.map_err(failed)?;
                    tx.query_opt(&statement, &params).await.map_err(failed)?
                }
                Write::Delete {
                    expected_revision: None,
                    ..
                } => {
                    let statement = tx.prepare_cached(&self.sql.delete).await.map_err(failed)?;
                    let row = tx.query_opt(&statement, &[&c, &k]).await.map_err(failed)?;
                    let deleted = match row {
                        Some(row) => is_live(unsigned(row.try_get(0).map_err(failed)?)?, now_ms()),
                        None => false,
                    };
                    outs.push(Written::Deleted(deleted));
                    continue;
                }
                Write::Delete {
                    expected_revision: Some(expected),
                    ..
                } => {
                    let expected = signed(*expected);
                    let statement = tx
                        .prepare_cached(&self.sql.delete_expected)
                        .await
                        .map_err(failed)?;
                    tx.query_opt(&statement, &[&c, &now, &k, &expected])
                        .await
                        .map_err(failed)?
                }
            };
            if let Some(row) = row {
                let revision = unsigned(row.try_get(0).map_err(failed)?)?;
                outs.push(match w {
                    Write::Delete { .. } => Written::Deleted(true),
                    _ => Written::Revision(revision),
                });
                continue;
            }
            // Refused: name the live revision, as the single writes do.
            let statement = tx
                .prepare_cached(&self.sql.live_revision)
                .await
                .map_err(failed)?;
            let current = tx
                .query_opt(&statement, &[&c, &now, &k])
                .await
                .map_err(failed)?
                .map(|row| row.try_get(0).map_err(failed).and_then(unsigned))
                .transpose()?;
            return Err(match (w, current) {
                (Write::Insert(_), Some(revision)) => StoreError::Exists { revision },
                (Write::Insert(_), None) => unavailable("the key changed under the batch"),
                (_, current) => StoreError::Conflict { current },
            });
        }
        tx.commit().await.map_err(failed)?;
        Ok(outs)
    }

    async fn list(&self, query: &Query) -> Result<Vec<Record>, StoreError> {
        check_query(query)?;
        let now = signed(now_ms());
        let after = query.after_key.as_deref().unwrap_or("");
        let limit = i64::try_from(query.effective_limit()).unwrap_or(i64::MAX);
        let (sql, mut params) = self.filtered(&self.sql.list, query, &now);
        params.push(&after);
        params.push(&limit);
        let rows = self.query(sql, &params).await?;
        rows.iter().map(record_of).collect()
    }

    async fn count(
        &self,
        collection: &str,
        partition: Option<&str>,
        status: Option<&str>,
    ) -> Result<u64, StoreError> {
        let q = count_query(collection, partition, status)?;
        let now = signed(now_ms());
        let (sql, params) = self.filtered(&self.sql.count, &q, &now);
        let rows = self.query(sql, &params).await?;
        let row = rows
            .first()
            .ok_or_else(|| unavailable("count returned no row"))?;
        unsigned(row.try_get(0).map_err(failed)?)
    }

    async fn expire(&self, now_ms: u64) -> Result<u64, StoreError> {
        let now = signed(now_ms);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&self.sql.expire)
            .await
            .map_err(failed)?;
        let mut total = 0;
        loop {
            let removed = client.execute(&statement, &[&now]).await.map_err(failed)?;
            total += removed;
            if removed < EXPIRE_BATCH {
                return Ok(total);
            }
        }
    }
}

impl PostgresStore {
    /// The statement of `variants` for the query's filters, with its
    /// leading parameters: collection, now, then partition and status as
    /// given.
    fn filtered<'q>(
        &self,
        variants: &'q [String; 4],
        query: &'q Query,
        now: &'q i64,
    ) -> (&'q str, Vec<&'q (dyn ToSql + Sync)>) {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&query.collection, now];
        let mut variant = 0;
        if let Some(p) = &query.partition {
            params.push(p);
            variant += 1;
        }
        if let Some(s) = &query.status {
            params.push(s);
            variant += 2;
        }
        (&variants[variant], params)
    }
}

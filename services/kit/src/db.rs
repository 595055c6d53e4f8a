//! A service's own SQLite database: opening it and migrating it.
//!
//! Every service keeps its data in one file. WAL mode lets readers run while
//! one writer writes, and a busy timeout makes a writer wait for another
//! writer, in this process or in another one (two product-service instances
//! may share a file), instead of failing with `database is locked`.
//!
//! Migrations are plain SQL run in one `BEGIN IMMEDIATE` transaction keyed by
//! `PRAGMA user_version`. The immediate transaction takes the write lock
//! before the version is read, so when two processes start together on a new
//! file one migrates (and seeds) and the other then sees the new version and
//! does nothing. (sqlx's own migrator was not used: on SQLite it takes no
//! lock, and two processes starting together could both apply a migration.)

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, SqlitePool};

/// How long a writer waits for the write lock before giving up. Long enough
/// to ride out a burst of concurrent orders from two instances, short enough
/// that a stuck database surfaces as an error rather than a hung request.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reading connections per process; reads proceed alongside the writer
/// (WAL). Writes go through one connection of their own ([`Db`]).
pub const MAX_CONNECTIONS: u32 = 8;

/// How long a request waits for a free connection before it gets a 503.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between attempts to open a database another process is busy
/// creating.
const OPEN_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// One step of a service's schema, applied once, in order.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Position in the sequence, starting at 1; stored as `user_version`.
    pub version: i64,
    /// SQL script; may hold several statements.
    pub sql: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot create the directory for {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open { path: PathBuf, source: sqlx::Error },
    #[error("migration {version} of {path} failed: {source}")]
    Migrate {
        path: PathBuf,
        version: i64,
        source: sqlx::Error,
    },
    #[error(
        "database {path} is at schema version {found}, newer than this binary knows ({known}); refusing to run an older binary on it"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
}

/// A service's database: one connection that writes, a few that read.
///
/// SQLite has one writer at a time. With writes spread over a pool, a
/// writer that finds the write lock taken sleeps in SQLite's busy handler
/// (in steps up to 100 ms) and tries again: under load, long tails. Here
/// every write of the process goes through one connection, so writers
/// queue for it in order (the pool's acquire queue, without sleeping), and
/// the busy timeout is left for writers in other processes (two
/// product-service instances on one file). Readers never wait for the
/// writer (WAL); their connections are read-only, so a write sent to them
/// fails loudly instead of contending.
///
/// Never acquire the writer while holding it (a transaction that calls
/// code which writes through [`Db::write`] would wait for itself): pass
/// the transaction instead.
#[derive(Debug, Clone)]
pub struct Db {
    reader: SqlitePool,
    writer: SqlitePool,
}

impl Db {
    /// For queries that only read.
    pub fn read(&self) -> &SqlitePool {
        &self.reader
    }

    /// For every statement or transaction that writes.
    pub fn write(&self) -> &SqlitePool {
        &self.writer
    }
    /// Closes every connection (waiting for those in use).
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// Opens (creating if needed) the SQLite file at `path`, then applies the
/// migrations it has not seen yet.
pub async fn open(path: &Path, migrations: &[Migration]) -> Result<Db, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| DbError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
    }
    let open_err = |source| DbError::Open {
        path: path.to_owned(),
        source,
    };
    let options = SqliteConnectOptions::from_str("sqlite:")
        .map_err(open_err)?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL is durable against process crashes in WAL mode; only a power
        // loss can drop the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    // Two processes opening a new file together can see SQLITE_BUSY where
    // the busy timeout does not apply (switching the file to WAL, WAL
    // recovery). Such a failure is transient: retry the whole open.
    let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        let attempt = async {
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options.clone())
                .await
                .map_err(open_err)?;
            migrate(&writer, path, migrations).await?;
            let reader = SqlitePoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options.clone().read_only(true))
                .await
                .map_err(open_err)?;
            Ok::<_, DbError>(Db { reader, writer })
        };
        match attempt.await {
            Err(err) if err.is_busy() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(db = %path.display(), "database busy while opening; retrying");
                tokio::time::sleep(OPEN_RETRY_PAUSE).await;
            }
            result => return result,
        }
    }
}

impl DbError {
    fn is_busy(&self) -> bool {
        match self {
            DbError::Open { source, .. } | DbError::Migrate { source, .. } => is_busy(source),
            DbError::CreateDir { .. } | DbError::TooNew { .. } => false,
        }
    }
}

/// SQLITE_BUSY, plain or extended (the primary code is the low byte).
fn is_busy(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| code & 0xff == 5),
        _ => false,
    }
}

async fn migrate(pool: &SqlitePool, path: &Path, migrations: &[Migration]) -> Result<(), DbError> {
    let known = migrations.last().map_or(0, |m| m.version);
    let fail = |version| {
        move |source| DbError::Migrate {
            path: path.to_owned(),
            version,
            source,
        }
    };
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(fail(0))?;
    let current: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(fail(0))?;
    if current > known {
        return Err(DbError::TooNew {
            path: path.to_owned(),
            found: current,
            known,
        });
    }
    for migration in migrations.iter().filter(|m| m.version > current) {
        sqlx::raw_sql(migration.sql)
            .execute(&mut *tx)
            .await
            .map_err(fail(migration.version))?;
        tracing::info!(db = %path.display(), version = migration.version, "applied migration");
    }
    if known > current {
        // PRAGMA takes no bound parameters; `known` is an integer we own.
        sqlx::query(AssertSqlSafe(format!("PRAGMA user_version = {known}")))
            .execute(&mut *tx)
            .await
            .map_err(fail(known))?;
    }
    tx.commit().await.map_err(fail(known))?;
    Ok(())
}

/// True when `err` is a UNIQUE constraint violation on `table.column`.
pub fn is_unique_violation(err: &sqlx::Error, table_column: &str) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation() && db.message().contains(table_column)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATIONS: &[Migration] = &[
        Migration {
            version: 1,
            sql: "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);",
        },
        Migration {
            version: 2,
            sql: "INSERT INTO t (v) VALUES ('seed');",
        },
    ];

    #[tokio::test]
    async fn migrations_run_once_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/t.db");
        let pool = open(&path, MIGRATIONS).await.unwrap();
        sqlx::query("INSERT INTO t (v) VALUES ('mine')")
            .execute(pool.write())
            .await
            .unwrap();
        pool.close().await;

        let pool = open(&path, MIGRATIONS).await.unwrap();
        let rows: Vec<String> = sqlx::query_scalar("SELECT v FROM t ORDER BY id")
            .fetch_all(pool.read())
            .await
            .unwrap();
        assert_eq!(rows, ["seed", "mine"]);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool.read())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn concurrent_openers_seed_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (a, b) = tokio::join!(open(&path, MIGRATIONS), open(&path, MIGRATIONS));
        let (a, _b) = (a.unwrap(), b.unwrap());
        let seeds: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t WHERE v = 'seed'")
            .fetch_one(a.read())
            .await
            .unwrap();
        assert_eq!(seeds, 1);
    }

    #[tokio::test]
    async fn refuses_a_database_from_a_newer_binary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        open(&path, MIGRATIONS).await.unwrap().close().await;
        let err = open(&path, &MIGRATIONS[..1]).await.unwrap_err();
        assert!(
            matches!(
                err,
                DbError::TooNew {
                    found: 2,
                    known: 1,
                    ..
                }
            ),
            "{err}"
        );
    }
}

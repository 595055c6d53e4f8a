//! A service's own SQLite database: opening it, migrating it, reading it
//! and writing it.
//!
//! Every service keeps its data in one file, in WAL mode: readers run while
//! one writer writes. The access layer is `rusqlite` (SQLite's C API, a
//! statement cache per connection) in two halves:
//!
//! - **Reads** ([`Db::read`]) run on the caller's own thread, on a
//!   read-only connection taken from a small idle list: no thread is
//!   crossed and nothing waits for the writer. A read is a primary-key
//!   lookup or one page of a list, micro- to milliseconds; it blocks the
//!   calling task for that long and never longer than SQLite takes (the
//!   closure cannot await).
//! - **Writes** ([`Db::write`]) are closures sent to the database's one
//!   writing connection, owned by a thread of its own. The thread takes
//!   every closure queued at that moment (up to [`GROUP_MAX`]), runs them
//!   in **one** `BEGIN IMMEDIATE` transaction, each after the first inside
//!   a savepoint of its own, and commits once (group commit). A closure
//!   that returns an error (or panics) has its savepoint rolled back (the
//!   first: the transaction, which holds nothing else yet; the rest of the
//!   group goes on in a new one) and leaves the others alone; a failed
//!   commit fails every closure of the group. Each caller
//!   is answered after the commit, never before: an answer means the write
//!   is in the file. One thread handoff per transaction, instead of one per
//!   statement.
//!
//! Statements on the request path avoid two shapes that make SQLite build
//! a temporary b-tree (`OpenEphemeral`: a b-tree opened, a page allocated
//! and zeroed, closed again) every time they run: `RETURNING` (its rows are
//! collected in one) and `x IN (a, b, c, ...)` with more than two
//! constants, in a statement or in a `CHECK` it evaluates (written as `x =
//! a OR x = b ...` instead). Each service's tests hold its hot statements
//! to that (`testing::ephemeral_tables`).
//!
//! Writers in other processes (two product-service instances sharing a
//! file) are waited for by SQLite's busy timeout ([`BUSY_TIMEOUT`]); in
//! this process writers queue for the thread in order and never contend.
//!
//! Migrations are plain SQL run in one `BEGIN IMMEDIATE` transaction keyed by
//! `PRAGMA user_version`. The immediate transaction takes the write lock
//! before the version is read, so when two processes start together on a new
//! file one migrates (and seeds) and the other then sees the new version and
//! does nothing.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

/// How long a writer waits for the write lock held by another process
/// before giving up, and a reader for a file another process is busy
/// recovering. Long enough to ride out a burst of orders from two
/// instances, short enough that a stuck database surfaces as an error
/// rather than a hung request.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most write closures committed in one transaction.
pub const GROUP_MAX: usize = 64;

/// Idle reading connections kept; more are opened while more threads read
/// at once, and the extra ones are closed when they are handed back.
const MAX_IDLE_READERS: usize = 16;

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

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot create the directory for {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("migration {version} of {path} failed: {source}")]
    Migrate {
        path: PathBuf,
        version: i64,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} is at schema version {found}, newer than this binary knows ({known}); refusing to run an older binary on it"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("cannot start the writer of {path}: {source}")]
    Start {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a read or a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// [`Db::close`] was called.
    #[error("the database is closed")]
    Closed,
    /// The write closure panicked; its changes were rolled back.
    #[error("the write panicked; its changes were rolled back")]
    Panicked,
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

impl Error {
    /// The database cannot serve now (closed, or locked by another process
    /// past the busy timeout), as opposed to a fault in the statement.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Closed => true,
            Error::Panicked => false,
            Error::Sqlite(err) => matches!(
                err.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            ),
        }
    }
}

/// A service's database: one thread that writes, connections that read.
///
/// Cheap to clone; every clone is the same database.
#[derive(Clone)]
pub struct Db {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// Idle reading connections; `None` once closed.
    readers: Mutex<Option<Vec<Connection>>>,
    /// The writer thread's queue; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    /// Says the writer thread has finished (after the last queued write).
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent whatever panicked while holding
    // them (a push or a pop): carry on.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Db {
    /// Runs `read` on a read-only connection, on this thread. Each
    /// statement sees the latest commit; open a transaction in `read`
    /// (`conn.unchecked_transaction()`) for several statements to see the
    /// same one. A statement that writes fails (`SQLITE_READONLY`).
    pub fn read<T, E>(&self, read: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T, E>
    where
        E: From<Error>,
    {
        let conn = self.take_reader()?;
        let result = read(&conn);
        if let Some(idle) = lock(&self.shared.readers).as_mut()
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push(conn);
        }
        result
    }

    fn take_reader(&self) -> Result<Connection, Error> {
        match lock(&self.shared.readers).as_mut() {
            None => return Err(Error::Closed),
            Some(idle) => {
                if let Some(conn) = idle.pop() {
                    return Ok(conn);
                }
            }
        }
        Ok(open_reader(&self.shared.path)?)
    }

    /// Runs `write` in a transaction on the writing connection and answers
    /// once it is committed (see the module documentation). `Err` from
    /// `write` rolls back what it did, and only that. Every statement or
    /// transaction that writes goes through here; `write` must not open or
    /// end a transaction itself.
    pub async fn write<T, E, F>(&self, write: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Pending {
            write,
            reply,
            request: telemetry::request::current(),
        });
        {
            let writer = lock(&self.shared.writer);
            let sent = writer.as_ref().map(|queue| queue.send(job));
            if !matches!(sent, Some(Ok(()))) {
                return Err(Error::Closed.into());
            }
        }
        // The writer drops the reply only when it stops (closed).
        answer.await.unwrap_or_else(|_| Err(Error::Closed.into()))
    }

    /// Refuses new reads and writes, lets the writes already queued
    /// commit, and closes every connection.
    pub async fn close(&self) {
        lock(&self.shared.readers).take();
        lock(&self.shared.writer).take();
        let done = lock(&self.shared.writer_done).take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }
}

/// A queued write, type-erased for the writer thread.
trait Job: Send {
    /// Runs the closure inside the group's transaction; whether its
    /// changes stay, and the answer to send once the group is over.
    fn run(self: Box<Self>, conn: &Connection) -> (bool, Box<dyn Answer>);
    /// The group could not start or the savepoint could not be taken.
    fn refuse(self: Box<Self>, err: rusqlite::Error);
}

/// An answer held until the group's commit.
trait Answer: Send {
    fn send(self: Box<Self>, commit: Result<(), &rusqlite::Error>);
}

struct Pending<F, T, E> {
    write: F,
    reply: oneshot::Sender<Result<T, E>>,
    /// The caller's request: the closure's log lines name it.
    request: Option<telemetry::request::RequestContext>,
}

impl<F, T, E> Job for Pending<F, T, E>
where
    F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<Error> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> (bool, Box<dyn Answer>) {
        let Pending {
            write,
            reply,
            request,
        } = *self;
        let run = || {
            let outcome = catch_unwind(AssertUnwindSafe(|| write(conn)));
            if outcome.is_err() {
                tracing::error!("a database write panicked; rolled back");
            }
            outcome
        };
        let outcome = match request {
            Some(request) => telemetry::request::within_sync(request, run),
            None => run(),
        };
        let (keep, result) = match outcome {
            Ok(Ok(value)) => (true, Ok(value)),
            Ok(Err(err)) => (false, Err(err)),
            Err(_) => (false, Err(Error::Panicked.into())),
        };
        (keep, Box::new(Held { reply, result }))
    }

    fn refuse(self: Box<Self>, err: rusqlite::Error) {
        let _ = self.reply.send(Err(Error::Sqlite(err).into()));
    }
}

struct Held<T, E> {
    reply: oneshot::Sender<Result<T, E>>,
    result: Result<T, E>,
}

impl<T, E> Answer for Held<T, E>
where
    T: Send + 'static,
    E: From<Error> + Send + 'static,
{
    fn send(self: Box<Self>, commit: Result<(), &rusqlite::Error>) {
        let result = match commit {
            Ok(()) => self.result,
            Err(err) => Err(Error::Sqlite(copy_error(err)).into()),
        };
        let _ = self.reply.send(result);
    }
}

/// `rusqlite::Error` is not `Clone`; a commit's failure goes to every
/// caller of the group. SQLite's own errors keep their code (busy stays
/// busy), the rest their text.
fn copy_error(err: &rusqlite::Error) -> rusqlite::Error {
    match err {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// The writer thread: groups of queued closures, one transaction each,
/// until the queue is closed and empty.
fn run_writer(conn: Connection, jobs: mpsc::Receiver<Box<dyn Job>>) {
    while let Ok(first) = jobs.recv() {
        let mut group = VecDeque::with_capacity(8);
        group.push_back(first);
        group.extend(jobs.try_iter().take(GROUP_MAX - 1));
        while !group.is_empty() {
            commit_group(&conn, &mut group);
        }
    }
}

/// The statements that begin and end the writer's transactions and
/// savepoints, prepared once on the writing connection and kept in its
/// statement cache (rusqlite's `Transaction` and `Savepoint` send them as
/// text, which SQLite parses again on every group and every write).
const BEGIN: &str = "BEGIN IMMEDIATE";
const COMMIT: &str = "COMMIT";
const ROLLBACK: &str = "ROLLBACK";
const SAVEPOINT: &str = "SAVEPOINT write";
const RELEASE: &str = "RELEASE write";
const ROLLBACK_TO: &str = "ROLLBACK TO write";

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Ends the transaction `conn` is in, if any, undoing it.
fn roll_back(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(err) = exec(conn, ROLLBACK)
    {
        tracing::warn!(error = %err, "database: a write transaction could not be rolled back");
    }
}

/// Runs the jobs of `group` in one transaction and commits it, answering
/// each; returns early, with the jobs not yet run left in `group`, when
/// the first job fails.
///
/// The first job runs on the transaction itself, without a savepoint:
/// nothing else is in the transaction yet, so if it fails, rolling the
/// whole transaction back undoes exactly its changes, and the rest of the
/// group starts a new one. Every later job runs in a savepoint of its own,
/// which SQLite makes by copying each page the job touches into a
/// sub-journal first: the cost of isolating it from the jobs before it.
fn commit_group(conn: &Connection, group: &mut VecDeque<Box<dyn Job>>) {
    let Some(first) = group.pop_front() else {
        return;
    };
    // A transaction left open by a failure that could not be rolled back
    // is ended before a new one begins.
    roll_back(conn);
    if let Err(err) = exec(conn, BEGIN) {
        tracing::warn!(error = %err, "database: cannot begin a write transaction");
        first.refuse(copy_error(&err));
        for job in group.drain(..) {
            job.refuse(copy_error(&err));
        }
        return;
    }
    let (keep, answer) = first.run(conn);
    if !keep {
        // Only the first job's changes are in it: undo them all.
        roll_back(conn);
        answer.send(Ok(()));
        return;
    }
    let mut answers = Vec::with_capacity(group.len() + 1);
    answers.push(answer);
    let mut broken = None;
    for job in group.drain(..) {
        if broken.is_some() {
            job.refuse(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("an earlier write of the same transaction broke it".to_owned()),
            ));
            continue;
        }
        if let Err(err) = exec(conn, SAVEPOINT) {
            job.refuse(copy_error(&err));
            broken = Some(err);
            continue;
        }
        let (keep, answer) = job.run(conn);
        answers.push(answer);
        // An unkept savepoint is rolled back, then released; one that
        // cannot be ended leaves the transaction in doubt, so the whole
        // group fails rather than keep half a write.
        let ended = if keep {
            exec(conn, RELEASE)
        } else {
            exec(conn, ROLLBACK_TO).and_then(|()| exec(conn, RELEASE))
        };
        if let Err(err) = ended {
            broken = Some(err);
        }
    }
    let committed = match broken {
        Some(err) => Err(err),
        None => exec(conn, COMMIT),
    };
    if let Err(err) = &committed {
        // A failed COMMIT (or a broken group) leaves the transaction open.
        roll_back(conn);
        tracing::warn!(error = %err, writes = answers.len(), "database: a write transaction failed");
    }
    for answer in answers {
        answer.send(committed.as_ref().map(|_| ()));
    }
}

fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn open_writer(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    // NORMAL is durable against process crashes in WAL mode; only a power
    // loss can drop the last transactions.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The savepoints of a group journal in memory (up to the build's
    // `SQLITE_STMTJRNL_SPILL`, `.cargo/config.toml`), in large chunks: no
    // temporary file, and not `temp_store = MEMORY`, whose journal takes a
    // malloc per KiB copied.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Opens (creating if needed) the SQLite file at `path`, applies the
/// migrations it has not seen yet, and starts its writer.
pub async fn open(path: &Path, migrations: &'static [Migration]) -> Result<Db, DbError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| DbError::CreateDir {
                path: path.to_owned(),
                source,
            })?;
    }
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || open_blocking(&owned, migrations))
        .await
        .map_err(|err| DbError::Start {
            path: path.to_owned(),
            source: std::io::Error::other(err.to_string()),
        })?
}

fn open_blocking(path: &Path, migrations: &[Migration]) -> Result<Db, DbError> {
    let open_err = |source| DbError::Open {
        path: path.to_owned(),
        source,
    };
    // Two processes opening a new file together can see SQLITE_BUSY where
    // the busy timeout does not apply (switching the file to WAL, WAL
    // recovery). Such a failure is transient: retry the whole open.
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let (writer, reader) = loop {
        let attempt = open_writer(path).map_err(open_err).and_then(|mut writer| {
            migrate(&mut writer, path, migrations)?;
            let reader = open_reader(path).map_err(open_err)?;
            Ok((writer, reader))
        });
        match attempt {
            Err(err) if err.is_busy() && Instant::now() < deadline => {
                tracing::debug!(db = %path.display(), "database busy while opening; retrying");
                std::thread::sleep(OPEN_RETRY_PAUSE);
            }
            result => break result?,
        }
    };
    let (queue, jobs) = mpsc::channel();
    let (done, writer_done) = oneshot::channel();
    std::thread::Builder::new()
        .name("db-writer".to_owned())
        .spawn(move || {
            run_writer(writer, jobs);
            let _ = done.send(());
        })
        .map_err(|source| DbError::Start {
            path: path.to_owned(),
            source,
        })?;
    Ok(Db {
        shared: Arc::new(Shared {
            path: path.to_owned(),
            readers: Mutex::new(Some(vec![reader])),
            writer: Mutex::new(Some(queue)),
            writer_done: Mutex::new(Some(writer_done)),
        }),
    })
}

impl DbError {
    fn is_busy(&self) -> bool {
        match self {
            DbError::Open { source, .. } | DbError::Migrate { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            ),
            DbError::CreateDir { .. } | DbError::TooNew { .. } | DbError::Start { .. } => false,
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path, migrations: &[Migration]) -> Result<(), DbError> {
    let known = migrations.last().map_or(0, |m| m.version);
    let fail = |version| {
        move |source| DbError::Migrate {
            path: path.to_owned(),
            version,
            source,
        }
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail(0))?;
    let current: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(fail(0))?;
    if current > known {
        return Err(DbError::TooNew {
            path: path.to_owned(),
            found: current,
            known,
        });
    }
    for migration in migrations.iter().filter(|m| m.version > current) {
        tx.execute_batch(migration.sql)
            .map_err(fail(migration.version))?;
        tracing::info!(db = %path.display(), version = migration.version, "applied migration");
    }
    if known > current {
        tx.pragma_update(None, "user_version", known)
            .map_err(fail(known))?;
    }
    tx.commit().map_err(fail(known))?;
    Ok(())
}

/// For the `from_row` functions, which read a row by position: by name,
/// rusqlite compares the name with every column's on each read (4 % of a
/// `GET /users/{id}`'s instructions). In debug builds (so in every test
/// that reads a row) this checks that the statement's first columns are
/// `names`, in that order; in release builds it is nothing.
#[inline]
pub fn check_columns(row: &rusqlite::Row<'_>, names: &[&str]) {
    if cfg!(debug_assertions) {
        let statement: &rusqlite::Statement<'_> = row.as_ref();
        let columns = statement.column_names();
        assert!(
            columns.get(..names.len()) == Some(names),
            "the statement's columns are {columns:?}, read as {names:?}"
        );
    }
}

/// Now as the services store a time: RFC 3339, UTC, whole seconds
/// (`2026-12-08T01:02:03Z`), the text `strftime('%Y-%m-%dT%H:%M:%SZ',
/// 'now')` gives. Statements on the request path bind this instead of
/// calling `strftime`, which formats through SQLite's general printf
/// (thousands of instructions a call, several calls per order).
pub fn now_text() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// True when `err` is a UNIQUE constraint violation on `table.column`.
pub fn is_unique_violation(err: &rusqlite::Error, table_column: &str) -> bool {
    match err {
        rusqlite::Error::SqliteFailure(code, Some(message)) => {
            code.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                && message.contains(table_column)
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
            sql: "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE);",
        },
        Migration {
            version: 2,
            sql: "INSERT INTO t (v) VALUES ('seed');",
        },
    ];

    fn values(db: &Db) -> Vec<String> {
        db.read(|conn| {
            let mut stmt = conn.prepare("SELECT v FROM t ORDER BY id")?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            rows.collect::<Result<Vec<String>, _>>()
                .map_err(Error::from)
        })
        .unwrap()
    }

    async fn insert(db: &Db, v: &str) -> Result<usize, Error> {
        let v = v.to_owned();
        db.write(move |conn| Ok(conn.execute("INSERT INTO t (v) VALUES (?)", [v])?))
            .await
    }

    #[tokio::test]
    async fn migrations_run_once_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/t.db");
        let db = open(&path, MIGRATIONS).await.unwrap();
        insert(&db, "mine").await.unwrap();
        db.close().await;

        let db = open(&path, MIGRATIONS).await.unwrap();
        assert_eq!(values(&db), ["seed", "mine"]);
        let mode: String = db
            .read(|conn| {
                conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))
                    .map_err(Error::from)
            })
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn concurrent_openers_seed_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (a, b) = tokio::join!(open(&path, MIGRATIONS), open(&path, MIGRATIONS));
        let (a, _b) = (a.unwrap(), b.unwrap());
        assert_eq!(values(&a), ["seed"]);
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

    /// Polls `future` once: a write is queued on its first poll.
    async fn queue<F: std::future::Future + Unpin>(future: &mut F) {
        std::future::poll_fn(|cx| {
            assert!(std::pin::Pin::new(&mut *future).poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
    }

    fn insert_then(v: &'static str, fail: bool) -> impl FnOnce(&Connection) -> Result<(), Error> {
        move |conn| {
            conn.execute("INSERT INTO t (v) VALUES (?)", [v])?;
            if fail {
                conn.execute("INSERT INTO t (v) VALUES ('seed')", [])?;
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failing_first_write_of_a_group_undoes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), MIGRATIONS).await.unwrap();
        // Hold the writer until four writes are queued behind it: they are
        // then one group, the first of which fails (no savepoint: the
        // transaction is rolled back and the rest go on in a new one whose
        // first succeeds, and whose third fails in its savepoint).
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let mut blocker = Box::pin(db.write(move |_| {
            started.send(()).ok();
            hold.recv().ok();
            Ok::<_, Error>(())
        }));
        queue(&mut blocker).await;
        running.await.unwrap();
        let mut a = Box::pin(db.write(insert_then("a", true)));
        let mut b = Box::pin(db.write(insert_then("b", false)));
        let mut c = Box::pin(db.write(insert_then("c", true)));
        let mut d = Box::pin(db.write(insert_then("d", false)));
        for write in [&mut a, &mut b, &mut c, &mut d] {
            queue(write).await;
        }
        release.send(()).unwrap();
        blocker.await.unwrap();
        let failed = |r: Result<(), Error>| r.unwrap_err().to_string();
        assert!(failed(a.await).contains("UNIQUE constraint failed: t.v"));
        b.await.unwrap();
        assert!(failed(c.await).contains("UNIQUE constraint failed: t.v"));
        d.await.unwrap();
        assert_eq!(values(&db), ["seed", "b", "d"]);
    }

    #[tokio::test]
    async fn now_text_is_what_strftime_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), MIGRATIONS).await.unwrap();
        let ours = now_text();
        let sqlite: String = db
            .read(|conn| {
                conn.query_row("SELECT strftime('%Y-%m-%dT%H:%M:%SZ', 'now')", [], |r| {
                    r.get(0)
                })
                .map_err(Error::from)
            })
            .unwrap();
        assert_eq!(ours.len(), sqlite.len(), "{ours} / {sqlite}");
        let apart = humantime::parse_rfc3339(&sqlite)
            .unwrap()
            .duration_since(humantime::parse_rfc3339(&ours).unwrap())
            .unwrap();
        assert!(apart <= Duration::from_secs(1), "{ours} / {sqlite}");
    }

    #[tokio::test]
    async fn ephemeral_tables_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), MIGRATIONS).await.unwrap();
        db.read(|conn| {
            let count = |sql| crate::testing::ephemeral_tables(conn, sql).unwrap();
            assert_eq!(count("INSERT INTO t (v) VALUES (?)"), 0);
            assert_eq!(count("INSERT INTO t (v) VALUES (?) RETURNING id"), 1);
            // As a CHECK evaluates it: a value against a list of constants.
            assert_eq!(count("SELECT ?1 IN ('a', 'b', 'c')"), 1);
            assert_eq!(count("SELECT ?1 = 'a' OR ?1 = 'b' OR ?1 = 'c'"), 0);
            Ok::<_, Error>(())
        })
        .unwrap();
    }

    /// Many writers at once: all committed, and a writer whose closure
    /// fails (a UNIQUE violation, a panic) loses its own changes only,
    /// even when it shares a group with the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_writes_commit_together_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), MIGRATIONS).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let db = db.clone();
            tasks.spawn(async move {
                match i % 10 {
                    // A duplicate of the seed, after a change that must
                    // not survive it.
                    3 => {
                        db.write(move |conn| {
                            conn.execute("INSERT INTO t (v) VALUES (?)", [format!("gone {i}")])?;
                            conn.execute("INSERT INTO t (v) VALUES ('seed')", [])?;
                            Ok::<_, Error>(())
                        })
                        .await
                    }
                    7 => {
                        db.write(move |conn| {
                            conn.execute("INSERT INTO t (v) VALUES (?)", [format!("gone {i}")])?;
                            panic!("a bug in a handler");
                        })
                        .await
                    }
                    _ => insert(&db, &format!("kept {i}")).await.map(drop),
                }
                .map_err(|err| (i, err.to_string()))
            });
        }
        let mut failed = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Err(err) = done.unwrap() {
                failed.push(err);
            }
        }
        failed.sort();
        assert_eq!(failed.len(), 40, "{failed:?}");
        assert!(failed.iter().all(|(i, err)| match i % 10 {
            3 => err.contains("UNIQUE constraint failed: t.v"),
            7 => err.contains("panicked"),
            _ => false,
        }));
        let stored = values(&db);
        assert_eq!(stored.len(), 1 + 160);
        assert!(stored.iter().all(|v| !v.starts_with("gone")));
        // The writer survived the panics.
        insert(&db, "after").await.unwrap();
    }

    #[tokio::test]
    async fn readers_cannot_write_and_a_closed_database_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir.path().join("t.db"), MIGRATIONS).await.unwrap();
        let err = db
            .read(|conn| {
                conn.execute("INSERT INTO t (v) VALUES ('x')", [])
                    .map_err(Error::from)
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "attempt to write a readonly database",
            "{err:?}"
        );
        // Writes queued before close are committed, not dropped.
        let queued = insert(&db, "last");
        let (written, ()) = tokio::join!(queued, db.close());
        written.unwrap();
        assert!(matches!(insert(&db, "late").await, Err(Error::Closed)));
        assert!(matches!(
            db.read(|_| Ok::<_, Error>(())),
            Err(Error::Closed)
        ));
        assert!(Error::Closed.is_unavailable());
    }

    #[test]
    fn rows_read_by_position_are_checked_against_their_names() {
        let conn = Connection::open_in_memory().unwrap();
        let read = |sql: &str| {
            conn.query_row(sql, [], |row| {
                check_columns(row, &["id", "name"]);
                row.get::<_, String>(1)
            })
        };
        assert_eq!(read("SELECT 1 AS id, 'x' AS name, 2 AS more").unwrap(), "x");
        let swapped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read("SELECT 'x' AS name, 1 AS id")
        }));
        assert!(
            swapped.is_err(),
            "a statement with other columns must not be read"
        );
        let fewer =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read("SELECT 1 AS id")));
        assert!(fewer.is_err());
    }

    #[test]
    fn the_bundled_sqlite_is_built_with_the_server_options() {
        // `.cargo/config.toml` passes them to libsqlite3-sys's build: a
        // build without them (the file lost, or the variable overridden)
        // takes a global mutex on every allocation and page fetch again.
        let conn = Connection::open_in_memory().unwrap();
        let mut stmt = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = stmt
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            options.iter().any(|o| o == "STMTJRNL_SPILL=4194304"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
    }

    #[test]
    fn unique_violations_are_told_apart_by_column() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0].sql).unwrap();
        conn.execute("INSERT INTO t (v) VALUES ('a')", []).unwrap();
        let err = conn
            .execute("INSERT INTO t (v) VALUES ('a')", [])
            .unwrap_err();
        assert!(is_unique_violation(&err, "t.v"));
        assert!(!is_unique_violation(&err, "t.w"));
    }
}

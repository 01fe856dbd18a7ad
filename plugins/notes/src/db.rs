//! The notes database: the SQLite file and its table, the connections kept to it and
//! the queries. `bench/src/bin/sqlite_baseline.rs` compiles this same file, so the bare
//! server `cargo xtask bench` measures `notes` against opens, keeps and queries its
//! database exactly as the plugin does.
//!
//! The connections are sqlx's (`SqliteConnection`, each with a thread of its own that
//! runs its statements), kept in a `deadpool` pool rather than in sqlx's `Pool`. sqlx's
//! pool spawns a task every time a connection goes back to it (the task pings the
//! connection's thread, then puts the connection back); in a plugin that spawn comes
//! from one of the host's threads, where the handler is polled, so it has to wake one of
//! the plugin runtime's own workers for every request. deadpool puts a connection back
//! where it is dropped, at once and without a task, so a request that finds a free
//! connection wakes no thread but the connection's own.

use std::path::Path;
use std::time::Duration;

use deadpool::managed::{self, Manager, Metrics, Object, PoolError, RecycleResult};
use deadpool::Runtime;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

/// Handlers are short, and SQLite has one writer at a time: a few connections are
/// enough for concurrent readers.
pub const MAX_CONNECTIONS: usize = 4;

/// How long a query waits for a lock another connection (or process) holds, and a
/// request for a free connection, before it fails (`notes` then answers 503).
pub const WAIT: Duration = Duration::from_secs(5);

/// How long the health check waits for a connection: well within the host's 1 s for a
/// health hook.
pub const CHECK_WAIT: Duration = Duration::from_millis(500);

/// `AUTOINCREMENT`: an id is never given out twice, even after its note was deleted.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL
)";

/// A database's connections: at most [`MAX_CONNECTIONS`], opened when first needed.
pub struct Database {
    pool: managed::Pool<Connector>,
}

/// How the pool opens a connection (and that it reuses one as it is: see `recycle`).
struct Connector(SqliteConnectOptions);

impl Manager for Connector {
    type Type = SqliteConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<SqliteConnection, sqlx::Error> {
        self.0.connect().await
    }

    /// Nothing to check: the statements run in autocommit mode (no transaction can be
    /// left open), a statement whose request went away is reset by the connection's
    /// thread, and a connection that failed is not put back (`kept`).
    async fn recycle(&self, _: &mut SqliteConnection, _: &Metrics) -> RecycleResult<sqlx::Error> {
        Ok(())
    }
}

impl Database {
    /// Opens `file` (creating it if missing) in WAL mode and creates the table if it is
    /// not there. Fails with SQLite's reason if the file cannot be opened as a database.
    pub async fn open(file: &Path) -> Result<Database, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode this loses nothing when the process stops, only (possibly)
            // the last commits when the machine does.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(WAIT);
        let pool = managed::Pool::builder(Connector(options))
            .max_size(MAX_CONNECTIONS)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
        let db = Database { pool };
        let mut conn = db.connection().await?;
        let created = sqlx::query(SCHEMA).execute(&mut *conn).await;
        drop(conn);
        if let Err(e) = created {
            db.close().await;
            return Err(e);
        }
        Ok(db)
    }

    /// A free connection, waiting at most [`WAIT`] for one (then
    /// `sqlx::Error::PoolTimedOut`). Dropping it puts it back.
    async fn connection(&self) -> Result<Object<Connector>, sqlx::Error> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Whether the database answers a query on the notes table, with a free connection
    /// found (or opened) within [`CHECK_WAIT`]: the health hook's question.
    pub async fn check(&self) -> Result<(), sqlx::Error> {
        let timeouts = managed::Timeouts {
            wait: Some(CHECK_WAIT),
            create: Some(CHECK_WAIT),
            recycle: None,
        };
        let mut conn = self.pool.timeout_get(&timeouts).await.map_err(pool_error)?;
        let answered = sqlx::query("SELECT 1 FROM notes LIMIT 1")
            .fetch_optional(&mut *conn)
            .await;
        kept(conn, answered.map(drop))
    }

    /// Every note, by id.
    pub async fn notes(&self) -> Result<Vec<(i64, String)>, sqlx::Error> {
        let mut conn = self.connection().await?;
        let rows = sqlx::query_as("SELECT id, text FROM notes ORDER BY id")
            .fetch_all(&mut *conn)
            .await;
        kept(conn, rows)
    }

    /// The note `id`, if there is one.
    pub async fn note(&self, id: i64) -> Result<Option<(i64, String)>, sqlx::Error> {
        let mut conn = self.connection().await?;
        let row = sqlx::query_as("SELECT id, text FROM notes WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await;
        kept(conn, row)
    }

    /// Adds a note unless `max` are kept already; its id, or `None` when full. One
    /// statement, so the count and the insert are one write transaction: two requests
    /// at once cannot both take the last place.
    pub async fn add(&self, text: &str, max: u32) -> Result<Option<i64>, sqlx::Error> {
        let mut conn = self.connection().await?;
        let id = sqlx::query_as::<_, (i64,)>(
            "INSERT INTO notes (text) SELECT ?1 WHERE (SELECT count(*) FROM notes) < ?2
             RETURNING id",
        )
        .bind(text)
        .bind(max)
        .fetch_optional(&mut *conn)
        .await;
        kept(conn, id.map(|row| row.map(|(id,)| id)))
    }

    /// Deletes the note `id`; whether there was one.
    pub async fn delete(&self, id: i64) -> Result<bool, sqlx::Error> {
        let mut conn = self.connection().await?;
        let done = sqlx::query("DELETE FROM notes WHERE id = ?1")
            .bind(id)
            .execute(&mut *conn)
            .await;
        kept(conn, done.map(|done| done.rows_affected() > 0))
    }

    /// No connection is handed out any more (`sqlx::Error::PoolClosed`), and the free
    /// ones are closed, each waited for (the last to close checkpoints the WAL into the
    /// database file). One still in use closes when its query ends.
    pub async fn close(&self) {
        let free = self.pool.retain(|_, _| false).removed;
        self.pool.close();
        for conn in free {
            let _ = conn.close().await;
        }
    }
}

/// The pool's error as sqlx's.
fn pool_error(e: PoolError<sqlx::Error>) -> sqlx::Error {
    match e {
        PoolError::Backend(e) => e,
        PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
        PoolError::Closed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Configuration(other.to_string().into()),
    }
}

/// `result` as it is; `conn` goes back to the pool unless the connection itself failed
/// (anything but an error SQLite answered: an I/O error, its thread gone), in which case
/// it is dropped, and a new one is opened when needed.
fn kept<T>(conn: Object<Connector>, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
    if matches!(&result, Err(e) if !matches!(e, sqlx::Error::Database(_))) {
        drop(Object::take(conn));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file of this test's own, with nothing left of an earlier run.
    /// (Standalone: `sqlite-baseline` compiles this file too.)
    fn temp_file(label: &str) -> std::path::PathBuf {
        let name = format!("notes-db-{label}-{}.sqlite3", std::process::id());
        let file = std::env::temp_dir().join(name);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
        file
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_connection_goes_back_on_drop_and_none_free_fails_after_the_wait() {
        let file = temp_file("busy");
        runtime().block_on(async {
            let db = Database::open(&file).await.unwrap();
            assert_eq!(db.add("one", 10).await.unwrap(), Some(1));
            // Every connection in use: the next request waits, then fails as sqlx's
            // pool would (which `notes` answers with 503).
            let mut held = Vec::new();
            for _ in 0..MAX_CONNECTIONS {
                held.push(db.connection().await.unwrap());
            }
            assert_eq!(db.pool.status().size, MAX_CONNECTIONS);
            let started = std::time::Instant::now();
            let e = db.note(1).await.unwrap_err();
            assert!(matches!(e, sqlx::Error::PoolTimedOut), "{e}");
            assert!(started.elapsed() >= WAIT, "{:?}", started.elapsed());
            // One back (dropped): it serves the next request, and no connection is added.
            held.pop();
            assert_eq!(db.note(1).await.unwrap(), Some((1, "one".to_owned())));
            assert_eq!(db.pool.status().size, MAX_CONNECTIONS);
            drop(held);
            db.close().await;
        });
    }

    #[test]
    fn the_check_fails_without_a_free_connection_within_its_wait_and_once_closed() {
        let file = temp_file("check");
        runtime().block_on(async {
            let db = Database::open(&file).await.unwrap();
            db.check().await.unwrap();
            let mut held = Vec::new();
            for _ in 0..MAX_CONNECTIONS {
                held.push(db.connection().await.unwrap());
            }
            let started = std::time::Instant::now();
            let e = db.check().await.unwrap_err();
            assert!(matches!(e, sqlx::Error::PoolTimedOut), "{e}");
            assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
            drop(held);
            db.check().await.unwrap();
            db.close().await;
            let e = db.check().await.unwrap_err();
            assert!(matches!(e, sqlx::Error::PoolClosed), "{e}");
        });
    }

    #[test]
    fn a_failed_connection_is_not_put_back() {
        let file = temp_file("failed");
        runtime().block_on(async {
            let db = Database::open(&file).await.unwrap();
            assert_eq!(db.pool.status().size, 1);
            // A connection that failed itself is dropped.
            let conn = db.connection().await.unwrap();
            let answered = kept(conn, Err::<(), _>(sqlx::Error::Protocol("test".into())));
            assert!(answered.is_err());
            assert_eq!(db.pool.status().size, 0, "dropped, not put back");
            // An error SQLite answered keeps the connection.
            let mut conn = db.connection().await.unwrap();
            let bad = sqlx::query("SELECT * FROM no_such_table")
                .execute(&mut *conn)
                .await;
            assert!(matches!(bad, Err(sqlx::Error::Database(_))));
            let _ = kept(conn, bad);
            assert_eq!(db.pool.status().size, 1, "kept");
            db.close().await;
        });
    }

    #[test]
    fn close_closes_every_free_connection_and_refuses_new_requests() {
        let file = temp_file("close");
        let wal = std::path::PathBuf::from(format!("{}-wal", file.display()));
        runtime().block_on(async {
            let db = Database::open(&file).await.unwrap();
            db.add("kept", 10).await.unwrap();
            assert!(wal.exists(), "WAL mode");
            db.close().await;
            // The last connection to close checkpointed the WAL into the file and
            // removed it.
            assert!(!wal.exists());
            assert!(matches!(db.note(1).await, Err(sqlx::Error::PoolClosed)));
            let again = Database::open(&file).await.unwrap();
            assert_eq!(again.notes().await.unwrap(), vec![(1, "kept".to_owned())]);
            again.close().await;
        });
    }
}

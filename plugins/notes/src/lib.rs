//! `notes`: a small JSON API that keeps its records in SQLite. Run it with
//! `cargo xtask build-plugins && cargo run -p host`, then
//! `curl -d '{"text":"buy milk"}' http://notes.localhost:7777/notes`.
//!
//! Routes: `GET /notes`, `POST /notes` (`{"text": "..."}`: 201 with a `location`; 400
//! for empty text; 409 once `max_notes` are kept), `GET /notes/{id}`, `DELETE
//! /notes/{id}` (204); 404 for an id that is not there.
//!
//! Config (all optional):
//! - `database`: the SQLite file, created with its table on first start. A relative
//!   path is relative to the host's working directory. Default: `<server name>.sqlite3`
//!   there (`notes.sqlite3` for the server `notes`, or for the library served at
//!   `notes.localhost` without a config entry).
//! - `max_notes` (default 1000): how many notes it keeps before refusing new ones.
//!
//! The notes live in the file, so they survive a reload and a restart of the host. The
//! plugin runs on a tokio runtime of its own (`export_plugin!(Notes, tokio)`), which
//! sqlx needs: init opens the database (WAL mode; `db.rs` keeps up to 4 connections),
//! handlers await their queries, and the shutdown hook closes the connections. A
//! database that cannot be opened fails init with a message naming the file (the host
//! answers 503 with it); a database error in a handler answers 500 (503 while the
//! database is locked or no connection is free) with the request id, and the details
//! go to the host's log under that id. Its health hook reports it unhealthy while the
//! database cannot be queried (no free connection within 500 ms, or SQLite's error).

mod db;

use std::path::PathBuf;
use std::sync::Arc;

use plugin_api::tracing::error;
use plugin_api::{export_plugin, Error, InitContext, Microserver, Request, Response, Routes};
use serde::{Deserialize, Serialize};

use crate::db::Database;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// The SQLite file; `None`: `<server name>.sqlite3` in the working directory.
    database: Option<PathBuf>,
    /// How many notes the server keeps before refusing new ones.
    max_notes: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database: None,
            max_notes: 1000,
        }
    }
}

#[derive(Serialize)]
struct Note {
    id: i64,
    text: String,
}

impl From<(i64, String)> for Note {
    fn from((id, text): (i64, String)) -> Self {
        Note { id, text }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    text: String,
}

pub struct Notes {
    max_notes: u32,
    db: Database,
}

impl Microserver for Notes {
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {
        let config: Config = ctx.config::<Option<Config>>()?.unwrap_or_default();
        let file = config
            .database
            .unwrap_or_else(|| format!("{}.sqlite3", ctx.server_name()).into());
        let db = plugin_api::block_on(Database::open(&file)).map_err(|e| {
            // Name the file as the host's working directory makes it.
            let shown = std::path::absolute(&file).unwrap_or(file);
            Error::internal(format!(
                "cannot open the notes database {}: {e}",
                shown.display()
            ))
        })?;
        Ok(Notes {
            max_notes: config.max_notes,
            db,
        })
    }

    fn routes(routes: &mut Routes<Self>) {
        routes
            .get("/notes", Self::list)
            .post("/notes", Self::create)
            .get("/notes/{id}", Self::get)
            .delete("/notes/{id}", Self::delete);
    }

    /// Unhealthy (not ready, in the host's health endpoints) while the database cannot
    /// be queried: no free connection within half a second, or SQLite's error.
    fn health(&self) -> Result<(), String> {
        plugin_api::block_on(self.db.check())
            .map_err(|e| format!("the notes database cannot be queried: {e}"))
    }

    fn shutdown(&self) {
        // Waits for the free connections to close, which also checkpoints the WAL into
        // the database file.
        plugin_api::block_on(self.db.close());
    }
}

impl Notes {
    async fn list(self: Arc<Self>, req: Request) -> Response {
        match self.db.notes().await {
            Ok(rows) => Response::json(&rows.into_iter().map(Note::from).collect::<Vec<_>>()),
            Err(e) => database_failed(&req, e),
        }
    }

    async fn create(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let new: NewNote = req.json()?;
        if new.text.trim().is_empty() {
            return Err(Error::bad_request("text must not be empty"));
        }
        let id = match self.db.add(&new.text, self.max_notes).await {
            Ok(Some(id)) => id,
            Ok(None) => {
                return Err(Error::new(
                    409,
                    format!("the limit of {} notes is reached", self.max_notes),
                ))
            }
            Err(e) => return Ok(database_failed(&req, e)),
        };
        let note = Note { id, text: new.text };
        Ok(Response::json(&note)
            .with_status(201)
            .with_header("location", &format!("/notes/{id}")))
    }

    async fn get(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let id = note_id(&req)?;
        match self.db.note(id).await {
            Ok(Some(row)) => Ok(Response::json(&Note::from(row))),
            Ok(None) => Err(missing(id)),
            Err(e) => Ok(database_failed(&req, e)),
        }
    }

    async fn delete(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let id = note_id(&req)?;
        match self.db.delete(id).await {
            Ok(false) => Err(missing(id)),
            Ok(true) => Ok(Response::new(204)),
            Err(e) => Ok(database_failed(&req, e)),
        }
    }
}

fn note_id(req: &Request) -> Result<i64, Error> {
    let raw = req.param("id").unwrap_or_default();
    raw.parse()
        .map_err(|_| Error::bad_request(format!("note id must be a number, not {raw:?}")))
}

fn missing(id: i64) -> Error {
    Error::not_found(format!("no note with id {id}"))
}

/// The answer to a query that failed: 503 when waiting may help (the database is
/// locked, or every connection is busy), else 500; with the request id, under which
/// the host's log has the details. (`Error` answers `{"error": ...}` only, so this
/// response is built here.)
fn database_failed(req: &Request, e: sqlx::Error) -> Response {
    let request_id = req.request_id();
    error!(request_id, error = %e, "notes database query failed");
    let status = if is_temporary(&e) { 503 } else { 500 };
    Response::json(&serde_json::json!({
        "error": "the notes database failed; the host's log has the details under this request id",
        "request_id": request_id,
    }))
    .with_status(status)
}

/// Whether `e` says the database is busy rather than broken: SQLite's `SQLITE_BUSY` (5)
/// and `SQLITE_LOCKED` (6), with any extended code, or no connection free in time.
fn is_temporary(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
        _ => false,
    }
}

// One worker thread: the handlers are polled on the host's threads and the queries run on
// sqlx's own threads (one per connection); the runtime only drives the timers of a
// request that waits for a connection, and a thread that is never woken costs nothing.
export_plugin!(Notes, tokio(worker_threads = 1));

#[cfg(test)]
mod tests {
    use plugin_api::testing::{TestRequest, TestServer};
    use serde_json::{json, Value};

    use super::Notes;

    /// A fresh folder for one test's database.
    fn temp_dir(label: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("notes-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn start(config: Value) -> TestServer<Notes> {
        TestServer::<Notes>::start_tokio(config).unwrap_or_else(|e| panic!("init failed: {e}"))
    }

    fn post(server: &TestServer<Notes>, text: &str) -> plugin_api::Response {
        server.call(TestRequest::post("/notes").json(&json!({ "text": text })))
    }

    fn json_of(r: &plugin_api::Response) -> Value {
        serde_json::from_slice(r.body()).unwrap()
    }

    #[test]
    fn create_list_get_delete_with_the_status_of_each() {
        let dir = temp_dir("crud");
        let server = start(json!({ "database": dir.join("n.sqlite3") }));
        let created = post(&server, "buy milk");
        assert_eq!(created.status(), 201);
        assert_eq!(created.header("location"), Some("/notes/1"));
        assert_eq!(json_of(&created), json!({"id": 1, "text": "buy milk"}));
        post(&server, "call mum");
        let list = server.get("/notes");
        assert_eq!(
            json_of(&list),
            json!([{"id": 1, "text": "buy milk"}, {"id": 2, "text": "call mum"}])
        );
        assert_eq!(json_of(&server.get("/notes/2"))["text"], "call mum");

        let delete = server.call(TestRequest::new("DELETE", "/notes/1"));
        assert_eq!(delete.status(), 204);
        let gone = server.get("/notes/1");
        assert_eq!(gone.status(), 404);
        assert_eq!(json_of(&gone), json!({"error": "no note with id 1"}));
        assert_eq!(
            server.call(TestRequest::new("DELETE", "/notes/1")).status(),
            404
        );
        assert_eq!(server.get("/notes/abc").status(), 400);
        // An id is never given out twice.
        assert_eq!(json_of(&post(&server, "again"))["id"], 3);
    }

    #[test]
    fn bad_input_is_400_and_the_limit_is_409() {
        let dir = temp_dir("limits");
        let server = start(json!({ "database": dir.join("n.sqlite3"), "max_notes": 2 }));
        assert_eq!(post(&server, "  ").status(), 400);
        let bad = server.call(TestRequest::post("/notes").body("{not json"));
        assert_eq!(bad.status(), 400);
        assert_eq!(post(&server, "one").status(), 201);
        assert_eq!(post(&server, "two").status(), 201);
        let full = post(&server, "three");
        assert_eq!(full.status(), 409);
        assert_eq!(
            json_of(&full),
            json!({"error": "the limit of 2 notes is reached"})
        );
        server.call(TestRequest::new("DELETE", "/notes/1"));
        assert_eq!(post(&server, "three").status(), 201);
    }

    #[test]
    fn notes_are_in_the_file_for_the_next_instance() {
        let dir = temp_dir("file");
        let config = json!({ "database": dir.join("kept.sqlite3") });
        let first = start(config.clone());
        post(&first, "kept");
        // As in a reload: the next instance starts while the first one still runs.
        let second = start(config.clone());
        assert_eq!(
            json_of(&second.get("/notes")),
            json!([{"id": 1, "text": "kept"}])
        );
        drop(first);
        assert_eq!(json_of(&post(&second, "more"))["id"], 2);
        drop(second);
        // And as after a restart.
        let third = start(config);
        assert_eq!(json_of(&third.get("/notes")).as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_locked_database_answers_503_with_the_request_id_and_reads_go_on() {
        use sqlx::Connection;
        let dir = temp_dir("locked");
        let file = dir.join("n.sqlite3");
        let server = start(json!({ "database": &file }));
        assert_eq!(post(&server, "first").status(), 201);
        // Another process (here: another connection) holds the write lock.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&file);
        let mut other = runtime
            .block_on(sqlx::SqliteConnection::connect_with(&options))
            .unwrap();
        runtime
            .block_on(sqlx::query("BEGIN IMMEDIATE").execute(&mut other))
            .unwrap();

        let started = std::time::Instant::now();
        let r = post(&server, "waits for the lock");
        assert!(
            started.elapsed() >= super::db::WAIT,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(r.status(), 503);
        assert_eq!(
            json_of(&r)["request_id"],
            "0000000000000000",
            "the test server's request id"
        );
        // WAL mode: readers do not wait for the writer.
        assert_eq!(json_of(&server.get("/notes")).as_array().unwrap().len(), 1);

        runtime
            .block_on(sqlx::query("ROLLBACK").execute(&mut other))
            .unwrap();
        assert_eq!(post(&server, "now").status(), 201);
    }

    #[test]
    fn a_database_that_cannot_be_opened_fails_init_naming_the_file() {
        let dir = temp_dir("unopenable");
        let error = TestServer::<Notes>::start_tokio(json!({ "database": &dir }))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(error.status(), 500);
        let message = error.message();
        assert!(
            message.starts_with(&format!(
                "cannot open the notes database {}: ",
                dir.display()
            )),
            "{message}"
        );
        let missing = dir.join("no/such/folder/n.sqlite3");
        let error = TestServer::<Notes>::start_tokio(json!({ "database": &missing }))
            .map(|_| ())
            .unwrap_err();
        assert!(
            error.message().contains(&missing.display().to_string()),
            "{error}"
        );
        let text = dir.join("text.txt");
        std::fs::write(
            &text,
            "this is not a database, but it is long enough to look at",
        )
        .unwrap();
        let error = TestServer::<Notes>::start_tokio(json!({ "database": &text }))
            .map(|_| ())
            .unwrap_err();
        assert!(
            error.message().contains("file is not a database"),
            "{error}"
        );
    }
}

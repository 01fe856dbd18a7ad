//! `sqlite-baseline`: the `notes` plugin's `GET /notes/{id}` as a bare server: hyper with
//! the host's connection settings and runtime, sqlx with the plugin's pool settings
//! (SQLite in WAL mode, 4 connections), the same query and the same JSON, and nothing
//! else. `cargo xtask bench` compares the host running `notes` with it.
//!
//! Usage: `sqlite-baseline --database FILE [--listen ADDR]`. It creates the table if
//! needed, adds one note if there is none, and prints `listening on http://ADDR` on
//! stderr once ready.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bench::{request_id, status, X_REQUEST_ID};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:7779".parse().expect("valid");
    let mut database = None;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr.parse().expect("--listen takes IP:port"),
            ("--database", Some(file)) => database = Some(file),
            _ => usage(),
        }
    }
    let Some(database) = database else { usage() };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let pool = open(&database).await.expect("open the database");
        bench::serve(listen, move |req| answer(pool.clone(), req)).await
    });
}

fn usage() -> ! {
    eprintln!("usage: sqlite-baseline --database FILE [--listen ADDR]");
    std::process::exit(2);
}

async fn open(file: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::new()
        .filename(file)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO notes (text) SELECT 'buy milk' WHERE NOT EXISTS (SELECT 1 FROM notes)",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}

#[derive(serde::Serialize)]
struct Note {
    id: i64,
    text: String,
}

async fn answer(
    pool: SqlitePool,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let id = match (req.method(), path.strip_prefix("/notes/")) {
        (&Method::GET, Some(id)) => match id.parse::<i64>() {
            Ok(id) => id,
            Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
        },
        _ => return Ok(status(StatusCode::NOT_FOUND)),
    };
    let row = sqlx::query_as::<_, (i64, String)>("SELECT id, text FROM notes WHERE id = ?1")
        .bind(id)
        .fetch_optional(&pool)
        .await;
    let (id, text) = match row {
        Ok(Some(row)) => row,
        Ok(None) => return Ok(status(StatusCode::NOT_FOUND)),
        Err(_) => return Ok(status(StatusCode::INTERNAL_SERVER_ERROR)),
    };
    let body = serde_json::to_vec(&Note { id, text }).expect("a note serialises");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_REQUEST_ID.clone(), request_id());
    Ok(response)
}

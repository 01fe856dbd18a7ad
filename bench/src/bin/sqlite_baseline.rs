//! `sqlite-baseline`: the `notes` plugin's `GET /notes/{id}` as a bare server: hyper with
//! the host's connection settings and runtime, the plugin's own database code
//! (`plugins/notes/src/db.rs`, compiled in here: sqlx, SQLite in WAL mode, the same
//! connections kept the same way, the same query), the same JSON, and nothing else.
//! `cargo xtask bench` compares the host running `notes` with it.
//!
//! Usage: `sqlite-baseline --database FILE [--listen ADDR]`. It creates the table if
//! needed, adds one note if there is none, and prints `listening on http://ADDR` on
//! stderr once ready.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bench::{request_id, status, X_REQUEST_ID};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use db::Database;

// The plugin's other queries are not served here.
#[allow(dead_code)]
#[path = "../../../plugins/notes/src/db.rs"]
mod db;

fn main() {
    let (listen, database, runtime) = bench::sqlite_server("sqlite-baseline", "127.0.0.1:7779");
    runtime.block_on(async {
        let db = Arc::new(open(Path::new(&database)).await.expect("open the database"));
        bench::serve(listen, move |req| answer(db.clone(), req)).await
    });
}

async fn open(file: &Path) -> Result<Database, sqlx::Error> {
    let db = Database::open(file).await?;
    // One note if there is none.
    db.add("buy milk", 1).await?;
    Ok(db)
}

#[derive(serde::Serialize)]
struct Note {
    id: i64,
    text: String,
}

async fn answer(
    db: Arc<Database>,
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
    let (id, text) = match db.note(id).await {
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

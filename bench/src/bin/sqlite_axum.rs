//! `sqlite-axum`: the `notes` plugin's `GET /notes/{id}` as a bare axum server, the
//! reference the issue "Microservers that do real work" names for the SQLite case: axum's
//! router, extractors and `Json`, served by `axum::serve`, with the plugin's own database
//! code (`plugins/notes/src/db.rs`, compiled in here, as in `sqlite-baseline`) and the
//! same JSON and request id header. `cargo xtask bench` compares the host running
//! `notes` with it and with `sqlite-baseline` (bare hyper).
//!
//! Usage: `sqlite-axum --database FILE [--listen ADDR]`. It creates the table if needed,
//! adds one note if there is none, and prints `listening on http://ADDR` on stderr once
//! ready.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use bench::{request_id, X_REQUEST_ID};

use db::Database;

// The plugin's other queries are not served here.
#[allow(dead_code)]
#[path = "../../../plugins/notes/src/db.rs"]
mod db;

fn main() {
    let (listen, database, runtime) = bench::sqlite_server("sqlite-axum", "127.0.0.1:7780");
    runtime.block_on(async {
        let db = Database::open(Path::new(&database))
            .await
            .expect("open the database");
        db.add("buy milk", 1).await.expect("add a note");
        let app = Router::new()
            .route("/notes/:id", get(note))
            .with_state(Arc::new(db));
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        eprintln!(
            "listening on http://{}",
            listener.local_addr().expect("addr")
        );
        axum::serve(listener, app).await.expect("serve");
    });
}

#[derive(serde::Serialize)]
struct Note {
    id: i64,
    text: String,
}

async fn note(
    State(db): State<Arc<Database>>,
    UrlPath(id): UrlPath<i64>,
) -> Result<
    (
        [(axum::http::HeaderName, axum::http::HeaderValue); 1],
        Json<Note>,
    ),
    StatusCode,
> {
    match db.note(id).await {
        Ok(Some((id, text))) => Ok((
            [(X_REQUEST_ID.clone(), request_id())],
            Json(Note { id, text }),
        )),
        Ok(None) => Err(StatusCode::NOT_FOUND),
        Err(_) => Err(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

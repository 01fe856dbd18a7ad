//! `notes` keeps its notes in SQLite: across a restart and a reload, a database that
//! cannot be opened, and one that fails under a handler (and in its health hook).

use serde_json::json;

use crate::support::{Host, Reply, Setup};

fn notes_config(notes: &str) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20}}}},
      "servers": [{{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes", "config": {notes}}},
                  {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    )
}

fn notes_host(label: &str, notes: &str) -> Host {
    Setup::new(label, &notes_config(notes))
        .plugin("notes", "notes.so")
        .plugin("hello", "hello.so")
        .start()
}

fn post(host: &Host, text: &str) -> Reply {
    let body = json!({ "text": text }).to_string();
    host.send("POST", "notes.localhost", "/notes", body.as_bytes(), &[])
}

fn list(host: &Host) -> serde_json::Value {
    let r = host.get("notes.localhost", "/notes");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn notes_are_read_back_after_the_host_is_stopped_and_started_again() {
    let mut host = notes_host("db-restart", r#"{"database": "kept.sqlite3"}"#);
    assert_eq!(post(&host, "one").status, 201);
    assert_eq!(post(&host, "two").status, 201);
    let deleted = host.send("DELETE", "notes.localhost", "/notes/1", b"", &[]);
    assert_eq!(deleted.status, 204);
    // The file is where the config says, relative to the host's working directory.
    let file = host.dir().join("kept.sqlite3");
    assert!(file.is_file());

    assert!(host.terminate().success());
    // The shutdown hook closed the pool: the last connection checkpointed the WAL into
    // the database file and removed it.
    assert!(!host.dir().join("kept.sqlite3-wal").exists());

    let host = host.setup().clone().start();
    assert_eq!(list(&host), json!([{"id": 2, "text": "two"}]));
    // Ids go on from the last one ever given out.
    let r = post(&host, "three");
    assert_eq!((r.status, r.json()["id"].clone()), (201, json!(3)));
}

#[test]
fn notes_survive_a_reload_for_a_changed_config() {
    let host = notes_host("db-reload", r#"{"max_notes": 5}"#);
    assert_eq!(post(&host, "before").status, 201);
    // No "database": the default file is named after the server.
    assert!(host.dir().join("notes.sqlite3").is_file());

    host.write_config(&notes_config(r#"{"max_notes": 1}"#));
    let line = host.wait_for_log(&["reloaded", "server=notes", "generation=2"]);
    assert!(
        line.contains("state_bytes=0"),
        "nothing is handed over: {line}"
    );
    assert_eq!(list(&host), json!([{"id": 1, "text": "before"}]));
    // The new generation serves, with the new limit.
    assert_eq!(post(&host, "after").status, 409);
}

#[test]
fn a_database_that_cannot_be_opened_leaves_notes_waiting_with_the_reason() {
    let setup = Setup::new(
        "db-unopenable",
        &notes_config(r#"{"database": "a-folder"}"#),
    )
    .plugin("notes", "notes.so")
    .plugin("hello", "hello.so");
    std::fs::create_dir(setup.dir.join("a-folder")).unwrap();
    let host = setup.start();

    let r = host.get("notes.localhost", "/notes");
    assert_eq!(r.status, 503);
    let error = r.json()["error"].as_str().unwrap().to_owned();
    let file = host.dir().join("a-folder");
    assert!(
        error.contains(&format!(
            "failed to initialise: cannot open the notes database {}: ",
            file.display()
        )),
        "{error}"
    );
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    // A folder that does not exist is no better.
    host.write_config(&notes_config(r#"{"database": "missing/notes.sqlite3"}"#));
    host.wait_until("notes names the new file", || {
        host.get("notes.localhost", "/notes")
            .body
            .contains("missing/notes.sqlite3")
    });
    assert_eq!(host.get("notes.localhost", "/notes").status, 503);

    // Pointed at a file it can make, it serves.
    host.write_config(&notes_config(r#"{"database": "a-folder/notes.sqlite3"}"#));
    host.wait_until("notes serves", || {
        host.get("notes.localhost", "/notes").status == 200
    });
    assert_eq!(post(&host, "now").status, 201);
}

#[test]
fn a_database_error_in_a_handler_is_a_json_500_with_the_request_id() {
    let mut host = notes_host("db-corrupt", "null");
    assert_eq!(post(&host, "soon unreadable").status, 201);
    assert_eq!(host.admin().get("admin", "/health/ready").status, 200);
    assert!(host.terminate().success());

    // Overwrite every page but the first, which holds the schema: init still opens the
    // database and finds its table, and reading the table then fails.
    let file = host.dir().join("notes.sqlite3");
    let mut bytes = std::fs::read(&file).unwrap();
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    assert!(bytes.len() > page_size, "the table has a page of its own");
    bytes[page_size..].fill(0xff);
    std::fs::write(&file, bytes).unwrap();

    let host = host.setup().clone().start();
    for _ in 0..2 {
        let r = host.get("notes.localhost", "/notes");
        assert_eq!(r.status, 500, "{}", r.body);
        let id = r.header("x-request-id").unwrap().to_owned();
        assert_eq!(
            r.json(),
            json!({
                "error": "the notes database failed; the host's log has the details under this request id",
                "request_id": id,
            })
        );
        let line = host.wait_for_log(&["notes database query failed", &id]);
        assert!(line.contains("malformed"), "{line}");
    }
    assert_eq!(host.get("notes.localhost", "/notes/1").status, 500);
    assert_eq!(post(&host, "more").status, 500);
    // Its health hook says so: the host is not ready, naming notes and SQLite's reason.
    let ready = host.admin().get("admin", "/health/ready");
    assert_eq!(ready.status, 503, "{}", ready.body);
    let not_ready = &ready.json()["not_ready"];
    assert_eq!(not_ready.as_array().unwrap().len(), 1, "{not_ready}");
    assert_eq!(not_ready[0]["name"], "notes");
    let reason = not_ready[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("its plugin is unhealthy: the notes database cannot be queried: ")
            && reason.contains("malformed"),
        "{reason}"
    );
    // Nothing else is affected.
    assert_eq!(host.get("notes.localhost", "/notes/x").status, 400);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

//! Loading plugin files: good ones serve, bad ones are refused with a reason, and a
//! server without a working plugin waits instead of taking others down.

use crate::support::{library, Setup};

const TWO_SERVERS: &str = r#"{"servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
    {"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}]}"#;

/// A library cut at `len` bytes. A third of a debug build still holds every loadable
/// segment (glibc would load it); 4 KiB cuts into the code.
fn truncated_library(len: impl Fn(usize) -> usize) -> Vec<u8> {
    let bytes = std::fs::read(library("hello")).unwrap();
    bytes[..len(bytes.len())].to_vec()
}

#[test]
fn bad_libraries_are_refused_with_a_one_line_reason_and_good_ones_serve() {
    let host = Setup::new("refused", TWO_SERVERS)
        .plugin("hello", "hello.so")
        .plugin("notes", "notes.so")
        .file("garbage.so", b"this is not a library at all")
        .file("truncated.so", &truncated_library(|n| n / 3))
        .file("short.so", &truncated_library(|_| 4096))
        .plugin("fixture-old-api", "old.so")
        .start();

    let garbage = host.wait_for_log(&["refused plugin", "garbage.so"]);
    assert!(
        garbage.contains("not a loadable shared library: it has no ELF header"),
        "{garbage}"
    );
    for file in ["truncated.so", "short.so"] {
        let line = host.wait_for_log(&["refused plugin", file]);
        assert!(
            line.contains("it is incomplete") && line.contains("truncated, or still being written"),
            "{line}"
        );
    }
    let old = host.wait_for_log(&["refused plugin", "old.so"]);
    assert!(
        old.contains("built against plugin-api 99.0.0, but this host needs plugin-api 0.3.0"),
        "{old}"
    );

    assert_eq!(host.get("hello.localhost", "/").status, 200);
    assert_eq!(host.get("notes.localhost", "/notes").status, 200);
}

#[test]
fn a_server_whose_plugin_is_missing_waits_with_503_and_others_serve() {
    let host = Setup::new("missing", TWO_SERVERS)
        .plugin("hello", "hello.so")
        .start();
    host.wait_for_log(&["server=notes", "not serving", "no plugin named \"notes\""]);
    let r = host.get("notes.localhost", "/notes");
    assert_eq!(r.status, 503);
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("microserver \"notes\" is not available: no plugin named \"notes\""),
        "{error}"
    );
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn a_server_whose_plugin_was_refused_says_why() {
    let host = Setup::new("refused-503", TWO_SERVERS)
        .plugin("hello", "hello.so")
        .file("notes.so", b"garbage")
        .start();
    let r = host.get("notes.localhost", "/notes");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("its plugin was refused"),
        "{}",
        r.body
    );
}

#[test]
fn init_failure_and_init_panic_leave_the_server_waiting_with_the_reason() {
    let config = r#"{"servers": [
        {"name": "fails", "domains": ["fails.localhost"], "plugin": "misbehave", "config": {"init": "fail"}},
        {"name": "panics", "domains": ["panics.localhost"], "plugin": "misbehave", "config": {"init": "panic"}},
        {"name": "fine", "domains": ["fine.localhost"], "plugin": "misbehave"}]}"#;
    let host = Setup::new("init", config)
        .plugin("fixture-misbehave", "misbehave.so")
        .start();

    let r = host.get("fails.localhost", "/ok");
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("failed to initialise: the database at db.invalid is unreachable"));
    let r = host.get("panics.localhost", "/ok");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("init panicked: init exploded"),
        "{}",
        r.body
    );
    assert_eq!(host.get("fine.localhost", "/ok").body, "ok");
}

#[test]
fn a_library_without_a_config_entry_is_served_at_its_name_dot_localhost() {
    let host = Setup::new("implicit", r#"{"servers": []}"#)
        .plugin("notes", "notes.so")
        .start();
    host.wait_for_log(&["serving", "server=notes", "domains=notes.localhost"]);
    let r = host.get("notes.localhost", "/notes");
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
}

#[test]
fn the_plugin_field_matches_a_lib_prefixed_file_or_the_plugin_name() {
    let config = r#"{"servers": [
        {"name": "a", "domains": ["a.localhost"], "plugin": "hello"},
        {"name": "b", "domains": ["b.localhost"], "plugin": "fixture-misbehave"}]}"#;
    let host = Setup::new("names", config)
        .plugin("hello", "libhello.so")
        .plugin("fixture-misbehave", "renamed.so")
        .start();
    assert_eq!(host.get("a.localhost", "/").status, 200);
    assert_eq!(host.get("b.localhost", "/ok").body, "ok");
}

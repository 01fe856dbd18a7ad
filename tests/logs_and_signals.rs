//! Operating the host: JSON log lines (`--log-format json`) and SIGHUP.

use std::time::Duration;

use serde_json::Value;

use crate::support::{standard_config, Setup};

/// The log's lines, each parsed as JSON (panics on one that is not).
fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\nlogs:\n{logs}"))
        })
        .collect()
}

#[test]
fn json_log_lines_carry_the_fields_of_the_text_format_plugin_fields_included() {
    let host = Setup::new("json-logs", &standard_config())
        .plugin("hello", "hello.so")
        .plugin("notes", "notes.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .start_with_args(&["--log-format", "json"]);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    // A handler's panic is logged by the host with the request's fields.
    assert_eq!(host.get("bad.localhost", "/panic").status, 500);
    host.wait_for_log(&["handler exploded"]);
    let lines = json_lines(&host.logs());
    for line in &lines {
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&line["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(
            line["target"].is_string() && line["message"].is_string(),
            "{line}"
        );
    }
    // The host's own event, with its fields as JSON values (numbers as numbers).
    let serving = lines
        .iter()
        .find(|l| l["message"] == "serving" && l["server"] == "hello")
        .unwrap_or_else(|| panic!("no serving line for hello: {lines:?}"));
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["target"], "host::control::servers");
    assert_eq!(serving["generation"], 1);
    assert_eq!(serving["plugin"], "hello");
    assert!(serving["took_ms"].is_number(), "{serving}");
    // A plugin's own line, through the plugin log bridge: its fields are fields too.
    let ready = lines
        .iter()
        .find(|l| l["message"] == "hello is ready")
        .unwrap_or_else(|| panic!("no line from hello's init: {lines:?}"));
    assert_eq!(ready["target"], "plugin");
    assert_eq!(ready["plugin"], "hello");
    assert_eq!(ready["server"], "hello");
    assert_eq!(ready["greeting"], "Howdy");
    let panic = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("handler exploded"))
        })
        .unwrap();
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["server"], "bad");
    assert!(panic["request_id"].is_string(), "{panic}");
}

#[test]
fn text_logs_stay_as_they_were() {
    let host = Setup::new("text-logs", &standard_config())
        .plugin("hello", "hello.so")
        .start_with_args(&["--log-format", "text"]);
    host.wait_for_log(&["serving", "server=hello", "generation=1"]);
    host.wait_for_log(&["hello is ready", "server=\"hello\"", "greeting=Howdy"]);
}

#[test]
fn an_unknown_log_format_is_refused_with_exit_2() {
    let setup = Setup::new("bad-log-format", &standard_config());
    let out = setup.run(&["--log-format", "xml"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--log-format"), "{}", out.stderr);
}

/// A config with hot reload off: only SIGHUP makes the host look again.
fn unwatched_config(greeting: &str, with_notes: bool) -> String {
    let notes = if with_notes {
        r#",{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}"#
    } else {
        ""
    };
    format!(
        r#"{{
          "global": {{"plugin_dir": "plugins", "reload": {{"watch": false}}}},
          "servers": [
            {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
             "config": {{"greeting": "{greeting}"}}}},
            {{"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave"}}{notes}
          ]
        }}"#
    )
}

#[test]
fn sighup_reads_the_config_and_the_plugin_folder_again_and_keeps_serving() {
    let host = Setup::new("sighup", &unwatched_config("Howdy", false))
        .plugin("hello", "hello.so")
        .start();
    assert_eq!(host.get("bad.localhost", "/ok").status, 503);
    let greeting = |host: &crate::support::Host| host.get("hello.localhost", "/").body;
    assert!(greeting(&host).contains("Howdy"), "{}", greeting(&host));

    // Changed on disk with the watcher off: nothing happens by itself.
    host.write_config(&unwatched_config("Bonjour", true));
    host.install(
        &crate::support::library("fixture-misbehave"),
        "misbehave.so",
    );
    host.install(&crate::support::library("notes"), "notes.so");
    std::thread::sleep(Duration::from_millis(500));
    assert!(greeting(&host).contains("Howdy"));
    assert_eq!(host.get("bad.localhost", "/ok").status, 503);

    host.signal("HUP");
    host.wait_for_log(&["SIGHUP received"]);
    host.wait_for_log(&["applied config change"]);
    host.wait_until("the new greeting", || greeting(&host).contains("Bonjour"));
    host.wait_until("the new plugin", || {
        host.get("bad.localhost", "/ok").status == 200
    });
    assert_eq!(host.get("notes.localhost", "/notes").status, 200);
    assert_eq!(host.count_log_lines(&["SIGHUP received"]), 1);
    let reloads = host.count_log_lines(&["reloaded", "server=hello"]);
    assert_eq!(reloads, 1, "{}", host.logs());

    // Nothing changed since: a second SIGHUP changes nothing, and the host serves on.
    host.signal("HUP");
    host.wait_until("the second SIGHUP's line", || {
        host.count_log_lines(&["SIGHUP received"]) == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(host.get("bad.localhost", "/ok").status, 200);
    assert!(greeting(&host).contains("Bonjour"));
    assert_eq!(host.count_log_lines(&["reloaded", "server=hello"]), reloads);
    assert_eq!(host.count_log_lines(&["applied config change"]), 1);
}

//! The plugin boundary's promises, held against a plugin that misbehaves in the ways an
//! outside review found: panics whose payload panics again, a waker that panics, a
//! library of another plugin under a server's file name, and the order of requests,
//! plugin-made values and shutdown hooks at reload and at exit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{library, Host, Setup};

/// A config with `hello` and the misbehaving fixture as `bad` (with `bad_config`), plus
/// `extra_servers` (JSON objects, each with a leading comma) and `global` settings.
fn config(global: &str, bad_config: &str, extra_servers: &str) -> String {
    format!(
        r#"{{"global": {{"plugin_dir": "plugins", "limits": {{"request_timeout_ms": 1000}} {global}}},
          "servers": [
            {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}},
            {{"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave", "config": {bad_config}}}
            {extra_servers}]}}"#
    )
}

fn start(label: &str, config: &str) -> Host {
    Setup::new(label, config)
        .plugin("hello", "hello.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .start()
}

#[test]
fn panics_whose_payload_panics_when_dropped_never_take_the_host_down() {
    let bombs = r#"{"export": "bomb", "shutdown": "bomb", "drop": "bomb", "label": "1"}"#;
    let init_bomb = r#", {"name": "bad-init", "domains": ["bad-init.localhost"], "plugin": "misbehave", "config": {"init": "bomb"}}"#;
    let mut host = start("bombs", &config("", bombs, init_bomb));

    // In a handler before its future exists, after an await, and in the future's drop.
    for (path, status) in [("/bomb", 500), ("/bomb-later", 500), ("/bomb-on-drop", 504)] {
        assert_eq!(host.get("bad.localhost", path).status, status, "{path}");
        assert_eq!(host.get("hello.localhost", "/").status, 200, "after {path}");
    }
    host.wait_for_log(&["handler panicked", "route=\"GET /bomb\""]);
    host.wait_for_log(&["handler's future panicked while it was dropped"]);
    // In the drop of a response body's owner, after the host sent it.
    let r = host.get("bad.localhost", "/owner-bomb");
    assert_eq!((r.status, r.body.as_str()), (200, "sent, then dropped"));
    host.wait_for_log(&["a response body's owner panicked while it was dropped"]);
    // In init: the server waits with the reason.
    let r = host.get("bad-init.localhost", "/ok");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("init panicked"),
        "{}",
        r.body
    );
    // In export_state, the replaced generation's shutdown hook and its drop.
    host.write_config(&config(
        "",
        &bombs.replace(r#""label": "1""#, r#""label": "2""#),
        init_bomb,
    ));
    host.wait_for_log(&["retired", "server=bad", "generation=1"]);
    host.wait_for_log(&["export_state panicked"]);
    host.wait_for_log(&["the shutdown hook panicked"]);
    host.wait_for_log(&["dropping the instance panicked"]);
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    // And at exit.
    assert_eq!(host.terminate().code(), Some(0), "{}", host.logs());
}

#[test]
fn a_waker_that_panics_when_woken_is_contained() {
    let host = start("waker", &config("", "null", ""));
    let r = host.get("bad.localhost", "/waker");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "survived a panicking waker")
    );
    let line = host.wait_for_log(&["a waker panicked", "this waker panics when woken"]);
    assert!(line.contains("fixture-misbehave"), "{line}");
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn repeated_panics_of_a_route_log_one_line_then_one_summary() {
    let host = start("panic-log", &config("", "null", ""));
    for _ in 0..20 {
        assert_eq!(host.get("bad.localhost", "/panic").status, 500);
    }
    let first = host.wait_for_log(&["handler panicked: handler exploded"]);
    assert!(
        first.contains("server=bad")
            && first.contains("plugin=fixture-misbehave")
            && first.contains("route=\"GET /panic\"")
            && first.contains("request_id=")
            && first.contains("misbehave/src/lib.rs"),
        "{first}"
    );
    let summary = host.wait_for_log(&["handler panicked 19 more time(s) in the last 5 s"]);
    assert!(
        summary.contains("route=\"GET /panic\"") && summary.contains("handler exploded"),
        "{summary}"
    );
    // One line for the first panic, one for the other 19: nothing else names it.
    assert_eq!(
        host.count_log_lines(&["handler exploded"]),
        2,
        "{}",
        host.logs()
    );
    // Other panic lines are limited the same way: ten panics in a response body's drop
    // are one line, then one summary.
    for _ in 0..10 {
        assert_eq!(host.get("bad.localhost", "/owner-bomb").status, 200);
    }
    host.wait_for_log(&[
        "a response body's owner panicked while it was dropped: 9 more time(s) in the last 5 s",
    ]);
    assert_eq!(
        host.count_log_lines(&["a response body's owner panicked"]),
        2,
        "{}",
        host.logs()
    );
    // A panic on a thread of the plugin's own is nobody's to report but the plugin's
    // panic hook: one line, with the plugin's name.
    let r = host.get("bad.localhost", "/thread-panic");
    assert_eq!((r.status, r.body.as_str()), (200, "joined: true"));
    let line = host.wait_for_log(&["panicked: a thread of the plugin's own panicked"]);
    assert!(line.contains("plugin=\"fixture-misbehave\""), "{line}");
    assert_eq!(
        host.count_log_lines(&["a thread of the plugin's own panicked"]),
        1
    );
}

/// Sends the head of a POST with a 5-byte body, and holds the body back: the caller
/// writes it when it wants.
fn post_with_late_body(host: &Host) -> TcpStream {
    let mut stream = TcpStream::connect(host.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(b"POST /len HTTP/1.1\r\nhost: bad.localhost\r\ncontent-length: 5\r\n\r\n")
        .unwrap();
    stream
}

#[test]
fn at_exit_no_request_enters_a_generation_whose_shutdown_hook_has_run() {
    let global = r#", "shutdown_timeout_ms": 1000"#;
    let config = config(global, r#"{"shutdown_ms": 1500}"#, "").replace(
        r#""request_timeout_ms": 1000"#,
        r#""request_timeout_ms": 10000"#,
    );
    let mut host = start("late-body", &config);
    let mut stream = post_with_late_body(&host);
    std::thread::sleep(Duration::from_millis(200));
    host.signal_term();
    // The grace period ends with the request still waiting for its body; the server
    // stops and its shutdown hook runs. Only then does the body arrive.
    host.wait_for_log(&["misbehave shutdown hook ran"]);
    stream.write_all(b"hello").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        !response.contains("after the shutdown hook"),
        "a handler ran after its shutdown hook:\n{response}"
    );
    assert!(
        response.starts_with("HTTP/1.1 503") && response.contains("the host is shutting down"),
        "{response}"
    );
    assert_eq!(
        host.wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// Sends SIGTERM and checks that the host exits 0 within 5 s (its deadline is 500 ms; a
/// plugin in these tests would hold it for 30 s).
fn exits_0_within_5_s_of_sigterm(host: &mut Host) {
    let started = Instant::now();
    host.signal_term();
    let status = host.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", host.logs());
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

#[test]
fn sigterm_waits_for_a_replaced_generations_hook_only_until_the_deadline() {
    let global = r#", "shutdown_timeout_ms": 500"#;
    let mut host = start(
        "slow-hook",
        &config(global, r#"{"shutdown_ms": 30000, "label": "1"}"#, ""),
    );
    // Generation 1 is replaced; its hook starts and sleeps for 30 s.
    host.write_config(&config(global, r#"{"label": "2"}"#, ""));
    host.wait_for_log(&["reloaded", "server=bad", "generation=2"]);
    host.wait_for_log(&["misbehave shutdown hook ran"]);
    exits_0_within_5_s_of_sigterm(&mut host);
    let missed = host.wait_for_log(&["shutdown hook did not return within 500 ms"]);
    assert!(
        missed.contains("server=bad") && missed.contains("generation=1"),
        "{missed}"
    );
    // Generation 2's hook returned at once, and only that one is said to be shut down.
    host.wait_for_log(&["shut down", "server=bad", "generation=2"]);
    assert_eq!(
        host.count_log_lines(&["shut down", "server=bad", "generation=1"]),
        0,
        "{}",
        host.logs()
    );
}

#[test]
fn sigterm_waits_for_an_instances_slow_drop_only_until_the_deadline() {
    let global = r#", "shutdown_timeout_ms": 500"#;
    let mut host = start("slow-drop", &config(global, r#"{"drop_ms": 30000}"#, ""));
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
    // The request's connection lets go of its generation a moment after the client has
    // the response; a SIGTERM before that leaves the last reference (and so the slow
    // drop) to the connection, not to the shutdown (seen once on a loaded machine).
    std::thread::sleep(Duration::from_millis(200));
    exits_0_within_5_s_of_sigterm(&mut host);
    host.wait_for_log(&["shut down", "server=bad", "generation=1"]);
    host.wait_for_log(&["dropping the plugins' instances did not finish within 500 ms"]);
}

#[test]
fn plugin_made_parts_of_a_response_are_freed_before_the_request_stops_counting() {
    let mut host = start("tattle", &config("", r#"{"label": "1"}"#, ""));
    std::thread::scope(|s| {
        // Two requests on generation 1. The HEAD request's body is not sent: the host
        // frees it, which takes the body 300 ms. 50 ms into that, the other request is
        // let go (from a thread outside the host's workers) and ends, so from then on
        // only the first request's in-flight count keeps generation 1's shutdown hook
        // waiting.
        let other = s.spawn(|| host.get("bad.localhost", "/released"));
        std::thread::sleep(Duration::from_millis(50));
        let head = s.spawn(|| {
            host.send(
                "HEAD",
                "bad.localhost",
                "/tattle?ms=400&release=1",
                b"",
                &[],
            )
        });
        std::thread::sleep(Duration::from_millis(100));
        // Generation 1 is replaced while both run: it drains, then its hook runs.
        host.write_config(&config("", r#"{"label": "2"}"#, ""));
        let r = head.join().unwrap();
        assert_eq!((r.status, r.header("content-length")), (200, Some("6")));
        assert_eq!(other.join().unwrap().body, "released");
    });
    host.wait_for_log(&["retired", "server=bad", "generation=1"]);
    let freed = host.wait_for_log(&["tattle body freed"]);
    assert!(freed.contains("after_shutdown_hook=false"), "{freed}");
    assert_eq!(host.terminate().code(), Some(0));
}

#[test]
fn another_plugins_library_under_a_servers_file_name_does_not_replace_it() {
    let servers = r#"{"global": {"plugin_dir": "plugins"}, "servers": [
        {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let host = Setup::new("foreign", servers)
        .plugin("hello", "hello.so")
        .start();
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    host.install(&library("notes"), "hello.so");
    let line = host.wait_for_log(&["refused a library of another plugin"]);
    assert!(
        line.contains("server=hello")
            && line.contains("holds plugin \"notes\"")
            && line.contains("runs plugin \"hello\"")
            && line.contains("generation 1 keeps serving"),
        "{line}"
    );
    // The same instance answers: hello counts the requests it has served.
    let after = host.get("hello.localhost", "/");
    assert_eq!(
        (after.status, after.body.as_str()),
        (
            200,
            "Hello from hello.localhost! (request 2 to this instance)\n"
        )
    );
    assert_eq!(host.get("hello.localhost", "/notes").status, 404);
    // Naming the new plugin in the config switches the server over.
    host.write_config(&servers.replace(r#""plugin": "hello""#, r#""plugin": "notes""#));
    host.wait_for_log(&["reloaded", "server=hello", "plugin=notes"]);
    assert_eq!(host.get("hello.localhost", "/notes").status, 200);
}

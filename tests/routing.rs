//! Routing by domain, then by path and method, and the example plugins' behaviour.

use crate::support::{standard_host, Setup};

#[test]
fn each_example_domain_answers() {
    let host = standard_host("examples");
    let hello = host.get("hello.localhost", "/");
    assert_eq!(hello.status, 200);
    assert!(
        hello.body.starts_with("Howdy from hello.localhost!"),
        "{}",
        hello.body
    );
    assert_eq!(
        hello.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(hello.header("x-request-id").map(str::len), Some(16));

    let notes = host.get("notes.localhost", "/notes");
    assert_eq!((notes.status, notes.body.as_str()), (200, "[]"));
}

#[test]
fn a_raw_body_goes_back_out_untouched_with_its_content_type() {
    let host = standard_host("echo-raw");
    let body: Vec<u8> = (b'a'..=b'z').cycle().take(30_000).collect();
    let r = host.send("POST", "hello.localhost", "/echo-raw", &body, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert!(r.body.as_bytes() == body, "the body came back changed");
}

#[test]
fn domains_are_matched_case_insensitively_without_port_or_trailing_dot() {
    let host = standard_host("normalise");
    for h in [
        "HELLO.localhost",
        "hello.localhost.:7777",
        "Hello.LocalHost:1",
    ] {
        let r = host.get(h, "/");
        assert_eq!(r.status, 200, "{h}: {}", r.body);
        assert!(r.body.contains("from hello.localhost!"), "{h}: {}", r.body);
    }
}

#[test]
fn wildcard_domains_route_to_their_server() {
    let host = standard_host("wildcard");
    let r = host.get("api.v2.hello.localhost", "/");
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("from api.v2.hello.localhost!"),
        "{}",
        r.body
    );
}

#[test]
fn unknown_domain_is_404_naming_the_domain() {
    let host = standard_host("unknown");
    let r = host.get("nobody.example", "/");
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json()["error"],
        "no microserver serves the domain \"nobody.example\""
    );
}

#[test]
fn the_default_server_answers_unknown_domains() {
    let config = r#"{"global": {"default_server": "notes"},
        "servers": [{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}]}"#;
    let host = Setup::new("default", config)
        .plugin("notes", "notes.so")
        .start();
    let r = host.get("whatever.example", "/notes");
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
}

#[test]
fn missing_or_invalid_host_is_400() {
    let host = standard_host("nohost");
    let r = host.raw(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "missing Host header");
    let r = host.raw(b"GET / HTTP/1.1\r\nhost: bad host!\r\nconnection: close\r\n\r\n");
    assert_eq!(r.status, 400);
    // Not a configured name and not text: refused before any normalising.
    let r = host.raw(b"GET / HTTP/1.1\r\nhost: h\xe9llo.localhost\r\nconnection: close\r\n\r\n");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "the Host header is not text");
    // HTTP/1.0 may omit Host; with no default server that is a 404 that says why.
    let r = host.raw(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("no Host header"));
}

#[test]
fn path_parameters_query_and_route_errors() {
    let host = standard_host("paths");
    let r = host.get("hello.localhost", "/hello/w%C3%B6rld?shout=true");
    assert_eq!((r.status, r.body.as_str()), (200, "HOWDY, WÖRLD!\n"));

    let r = host.get("hello.localhost", "/no/such/path");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no route for GET /no/such/path");

    let r = host.send("DELETE", "hello.localhost", "/", b"", &[]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    let r = host.send("HEAD", "hello.localhost", "/", b"", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, ""));
}

#[test]
fn json_round_trip_through_the_notes_api() {
    let host = standard_host("notes");
    let created = host.send(
        "POST",
        "notes.localhost",
        "/notes",
        br#"{"text": "buy milk"}"#,
        &[],
    );
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.header("location"), Some("/notes/1"));
    assert_eq!(
        created.json(),
        serde_json::json!({"id": 1, "text": "buy milk"})
    );

    let got = host.get("notes.localhost", "/notes/1");
    assert_eq!(got.json(), serde_json::json!({"id": 1, "text": "buy milk"}));
    let list = host.get("notes.localhost", "/notes");
    assert_eq!(
        list.json(),
        serde_json::json!([{"id": 1, "text": "buy milk"}])
    );

    let bad = host.send("POST", "notes.localhost", "/notes", b"{not json", &[]);
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid JSON body"));

    let bad_id = host.get("notes.localhost", "/notes/abc");
    assert_eq!(bad_id.status, 400);

    assert_eq!(
        host.send("DELETE", "notes.localhost", "/notes/1", b"", &[])
            .status,
        204
    );
    let gone = host.get("notes.localhost", "/notes/1");
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"], "no note with id 1");
}

#[test]
fn echo_sees_body_headers_and_request_id() {
    let host = standard_host("echo");
    let r = host.send(
        "POST",
        "hello.localhost",
        "/echo",
        br#"{"a": [1, 2]}"#,
        &[("content-type", "application/json")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert_eq!(body["you_sent"], serde_json::json!({"a": [1, 2]}));
    assert_eq!(body["content_type"], "application/json");
    assert_eq!(body["request_id"].as_str(), r.header("x-request-id"));
}

#[test]
fn plugins_can_await_the_host_timer() {
    let host = standard_host("timer");
    let started = std::time::Instant::now();
    let r = host.get("hello.localhost", "/slow?ms=150");
    assert_eq!((r.status, r.body.as_str()), (200, "slept 150 ms\n"));
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
}

#[test]
fn plugin_logs_land_in_the_host_log_with_the_plugin_name() {
    let host = standard_host("logs");
    let line = host.wait_for_log(&["hello is ready"]);
    assert!(line.contains("plugin=\"hello\""), "{line}");
    assert!(line.contains("greeting=Howdy"), "{line}");
}

//! A misbehaving plugin or client never takes the host down or loses a request.

use std::time::Duration;

use crate::support::standard_host;

#[test]
fn a_panicking_handler_is_a_500_and_everything_else_keeps_serving() {
    let host = standard_host("panic");
    std::thread::scope(|s| {
        // Requests to other domains run concurrently with the panics.
        let others: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..10 {
                        assert_eq!(host.get("hello.localhost", "/").status, 200);
                        assert_eq!(host.get("notes.localhost", "/notes").status, 200);
                    }
                })
            })
            .collect();
        for path in ["/panic", "/panic-later", "/panic"] {
            let r = host.get("bad.localhost", path);
            assert_eq!(r.status, 500, "{path}");
            let body = r.json();
            assert_eq!(
                body["error"],
                "the microserver failed while handling this request"
            );
            assert_eq!(body["request_id"].as_str(), r.header("x-request-id"));
        }
        for t in others {
            t.join().unwrap();
        }
    });
    let line = host.wait_for_log(&["handler panicked: handler exploded after an await"]);
    assert!(
        line.contains("plugin=fixture-misbehave")
            && line.contains("server=bad")
            && line.contains("route=\"GET /panic-later\"")
            && line.contains("(at tests/fixtures/misbehave/src/lib.rs:"),
        "{line}"
    );
    // The same instance still serves.
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn a_hanging_handler_times_out_with_504_and_the_host_keeps_serving() {
    let host = standard_host("hang");
    let r = host.get("bad.localhost", "/hang");
    assert_eq!(r.status, 504);
    assert_eq!(
        r.json()["error"],
        "the microserver did not answer within 2000 ms"
    );
    host.wait_for_log(&["handler timed out", "server=bad"]);
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
}

#[test]
fn a_handler_that_returns_err_with_text_answers_500_with_the_text() {
    let host = standard_host("err-text");
    let r = host.get("bad.localhost", "/err-text");
    assert_eq!((r.status, r.body.as_str()), (500, "the store is down"));
}

#[test]
fn invalid_responses_from_a_plugin_become_500() {
    let host = standard_host("bad-response");
    for path in ["/bad-header", "/bad-status", "/switching"] {
        assert_eq!(host.get("bad.localhost", path).status, 500, "{path}");
    }
    host.wait_for_log(&["invalid response: header name \"bad header\" is not valid"]);
    host.wait_for_log(&["invalid response: status 42 is not a valid final HTTP status"]);
    host.wait_for_log(&["invalid response: status 101 is not a valid final HTTP status"]);
}

#[test]
fn a_plugin_cannot_break_message_framing() {
    let host = standard_host("framing");
    let mut conn = host.connect();
    let r = conn.get("bad.localhost", "/framing").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "12345"));
    assert_eq!(r.header("content-length"), Some("5"));
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("x-kept"), Some("yes"));
    // The content-type set last replaces the one `Response::text` set: one, not two.
    let types: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(types, ["text/csv"]);
    // The connection was not closed or desynchronised.
    assert_eq!(conn.get("bad.localhost", "/ok").unwrap().body, "ok");
}

#[test]
fn a_panic_while_dropping_a_timed_out_handler_does_not_take_the_host_down() {
    let host = standard_host("drop-panic");
    assert_eq!(host.get("bad.localhost", "/drop-panic").status, 504);
    host.wait_for_log(&["panic while the host dropped the handler's future"]);
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn head_answers_with_the_get_length_and_no_body() {
    let host = standard_host("head");
    let get = host.get("hello.localhost", "/hello/x");
    let head = host.send("HEAD", "hello.localhost", "/hello/x", b"", &[]);
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(
        head.header("content-length").map(str::to_owned),
        Some(get.body.len().to_string())
    );
}

#[test]
fn a_body_that_never_arrives_times_out_with_408() {
    let host = standard_host("slow-body");
    let r = host
        .raw(b"POST /len HTTP/1.1\r\nhost: bad.localhost\r\ncontent-length: 100\r\n\r\nonly ten..");
    assert_eq!(r.status, 408);
    assert_eq!(
        r.json()["error"],
        "the request body did not arrive within 2000 ms"
    );
}

#[test]
fn ambiguous_or_unsupported_requests_are_refused() {
    let host = standard_host("ambiguous");
    let two_hosts = host.raw(b"GET / HTTP/1.1\r\nhost: hello.localhost\r\nhost: notes.localhost\r\nconnection: close\r\n\r\n");
    assert_eq!(two_hosts.status, 400);
    assert_eq!(two_hosts.json()["error"], "more than one Host header");
    let connect = host.raw(b"CONNECT hello.localhost:443 HTTP/1.1\r\nhost: hello.localhost:443\r\nconnection: close\r\n\r\n");
    assert_eq!(connect.status, 405);
}

#[test]
fn bodies_over_the_limit_are_413_and_bodies_under_it_arrive_whole() {
    let host = standard_host("limits");
    let under = vec![b'x'; 65536];
    let r = host.send("POST", "bad.localhost", "/len", &under, &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "65536"));

    let over = vec![b'x'; 65537];
    let r = host.send("POST", "bad.localhost", "/len", &over, &[]);
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json()["error"],
        "the request body is larger than the limit of 65536 bytes"
    );

    // Without Content-Length the limit still holds (chunked body).
    let mut raw = b"POST /len HTTP/1.1\r\nhost: bad.localhost\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        raw.extend_from_slice(format!("{:x}\r\n", 30000).as_bytes());
        raw.extend_from_slice(&[b'y'; 30000]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(host.raw(&raw).status, 413);
}

#[test]
fn malformed_requests_get_a_4xx_and_do_not_disturb_the_host() {
    let host = standard_host("malformed");
    let r = host.raw(b"THIS IS NOT HTTP\r\n\r\n");
    assert!(r.status == 400 || r.status == 0, "{r:?}");
    let mut too_many =
        String::from("GET / HTTP/1.1\r\nhost: hello.localhost\r\nconnection: close\r\n");
    for i in 0..150 {
        too_many.push_str(&format!("x-h{i}: v\r\n"));
    }
    too_many.push_str("\r\n");
    assert_eq!(host.raw(too_many.as_bytes()).status, 431);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn sigterm_lets_in_flight_requests_finish_runs_shutdown_hooks_and_exits_0() {
    let mut host = standard_host("sigterm");
    std::thread::scope(|s| {
        let slow = s.spawn(|| host.get("bad.localhost", "/slow?ms=700"));
        host.wait_for_log(&["listening on"]);
        std::thread::sleep(Duration::from_millis(200));
        let pid_status = {
            // Terminate while the slow request is in flight.
            let h: &crate::support::Host = &host;
            std::process::Command::new("kill")
                .args(["-TERM", &h_pid(h)])
                .status()
                .unwrap()
        };
        assert!(pid_status.success());
        let r = slow.join().unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "slept 700"));
    });
    let status = host.terminate();
    assert_eq!(status.code(), Some(0));
    let logs = host.logs();
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("misbehave shutdown hook ran"), "{logs}");
    assert!(logs.contains("stopped"), "{logs}");
}

fn h_pid(host: &crate::support::Host) -> String {
    host.pid().to_string()
}

#[test]
fn more_path_parameters_than_the_record_holds_inline_all_arrive() {
    let host = standard_host("six");
    let r = host.get("bad.localhost", "/six/1/2/3/4/5/six%20!");
    assert_eq!((r.status, r.body.as_str()), (200, "1 2 3 4 5 six !"));
}

#[test]
fn a_plugin_reads_the_whole_request_and_may_keep_it_after_answering() {
    let host = standard_host("seen");
    let r = host.send(
        "GET",
        "Bad.Localhost:80",
        "/seen/one%20x/two/three?q=1&r",
        b"",
        &[
            ("x-twice", "first"),
            ("x-other", "o"),
            ("X-Twice", "second"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.header("x-request-id").expect("an id").to_owned();
    for line in [
        "method=GET",
        "path=/seen/one%20x/two/three",
        "query=q=1&r",
        // Normalised: lower case, no port.
        "domain=bad.localhost",
        "client=127.0.0.1:",
        &format!("id={id}"),
        "a=Some(\"one x\")",
        "rest=Some(\"two/three\")",
        // Names compare case-insensitively; the first value wins.
        "x-twice=Some(\"first\")",
        "header host=Bad.Localhost:80",
        "header x-twice=first\nheader x-twice=second\nheader x-other=o",
    ] {
        assert!(r.body.contains(line), "{line:?} missing from:\n{}", r.body);
    }

    // A request kept past its handler (and its connection) stays whole: the host frees
    // it only when the plugin drops it.
    let kept = host.send(
        "GET",
        "bad.localhost",
        "/keep?k=v",
        b"",
        &[("x-twice", "kept")],
    );
    assert_eq!(kept.body, "kept");
    for _ in 0..20 {
        assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
    }
    let r = host.get("bad.localhost", "/kept");
    for line in [
        "path=/keep",
        "query=k=v",
        "x-twice=Some(\"kept\")",
        "domain=bad.localhost",
    ] {
        assert!(r.body.contains(line), "{line:?} missing from:\n{}", r.body);
    }
}

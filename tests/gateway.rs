//! `gateway` calls an upstream over HTTP and wraps its JSON. The upstream here is a
//! small HTTP server in the test, answering by path: good JSON, a 404, a 500, text, or
//! nothing for seconds; and a closed port for a refused connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{Host, Setup};

/// Starts the test upstream on a free port. It answers each connection on a thread of
/// its own, so a slow answer holds up no other.
fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer(stream));
        }
    });
    addr
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn answer(mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let target = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':') {
                    headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                }
            }
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
            .to_owned()
    };
    const JSON: &str = "application/json";
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match path {
        "/api/weather/paris" => (
            "200 OK",
            JSON,
            json!({
                "city": "Paris",
                "temp_c": 21,
                "target": target,
                "host": header("host"),
                "request_id": header("x-request-id"),
            })
            .to_string(),
        ),
        "/api/missing" => ("404 Not Found", JSON, r#"{"error":"no such city"}"#.into()),
        "/api/fail" => (
            "500 Internal Server Error",
            JSON,
            r#"{"error":"boom"}"#.into(),
        ),
        "/api/text" => ("200 OK", "text/plain", "sunny".into()),
        "/api/slow" => {
            std::thread::sleep(Duration::from_secs(3));
            ("200 OK", JSON, "{}".into())
        }
        _ => ("404 Not Found", JSON, "{}".into()),
    };
    // The gateway may have given up on a slow answer: a failed write is fine.
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn gateway_host(label: &str, upstream: SocketAddr) -> Host {
    let config = format!(
        r#"{{"servers": [
        {{"name": "gateway", "domains": ["gateway.localhost"], "plugin": "gateway",
          "config": {{"upstream": "http://{upstream}/api/", "timeout_ms": 300}}}},
        {{"name": "down", "domains": ["down.localhost"], "plugin": "gateway",
          "config": {{"upstream": "http://127.0.0.1:{}"}}}},
        {{"name": "misconfigured", "domains": ["misconfigured.localhost"], "plugin": "gateway",
          "config": {{"upstream": "https://example.com"}}}},
        {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#,
        closed_port()
    );
    Setup::new(label, &config)
        .plugin("gateway", "gateway.so")
        .plugin("hello", "hello.so")
        .start()
}

/// `GET path` at `domain`: the status, the JSON body and the request id.
fn call(host: &Host, domain: &str, path: &str) -> (u16, Value, String) {
    let r = host.get(domain, path);
    let id = r.header("x-request-id").unwrap().to_owned();
    (r.status, r.json(), id)
}

#[test]
fn upstream_json_is_wrapped_with_its_url_and_status() {
    let upstream = upstream();
    let host = gateway_host("gateway-ok", upstream);
    let (status, body, id) = call(&host, "gateway.localhost", "/weather/paris?units=metric");
    let url = format!("http://{upstream}/api/weather/paris?units=metric");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({
            "upstream": url,
            "status": 200,
            "data": {
                "city": "Paris",
                "temp_c": 21,
                "target": "/api/weather/paris?units=metric",
                "host": upstream.to_string(),
                "request_id": id,
            },
        })
    );
    // A 4xx keeps its status, wrapped the same way.
    let (status, body, _) = call(&host, "gateway.localhost", "/missing");
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({
            "upstream": format!("http://{upstream}/api/missing"),
            "status": 404,
            "data": {"error": "no such city"},
        })
    );
}

#[test]
fn upstream_failures_are_502_or_504_with_the_request_id_and_the_host_serves_on() {
    let upstream = upstream();
    let host = gateway_host("gateway-failures", upstream);
    let base = format!("http://{upstream}/api");
    for (domain, path, status, url, error) in [
        (
            "gateway.localhost",
            "/fail",
            502,
            format!("{base}/fail"),
            format!("upstream {base}/fail answered 500 Internal Server Error"),
        ),
        (
            "gateway.localhost",
            "/text",
            502,
            format!("{base}/text"),
            format!("upstream {base}/text answered 200 OK with a body that is not JSON (expected value at line 1 column 1)"),
        ),
        (
            "gateway.localhost",
            "/slow",
            504,
            format!("{base}/slow"),
            format!("upstream {base}/slow did not answer within 300 ms"),
        ),
    ] {
        let (got, body, id) = call(&host, domain, path);
        assert_eq!(got, status, "{path}: {body}");
        assert_eq!(
            body,
            json!({ "error": error, "upstream": url, "request_id": id }),
            "{path}"
        );
        host.wait_for_log(&["WARN", &id, &error]);
    }

    // Nothing listens where `down` points.
    let (status, body, id) = call(&host, "down.localhost", "/anything");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["request_id"], id);
    let error = body["error"].as_str().unwrap();
    let url = body["upstream"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("cannot reach upstream {url}: "))
            && error.contains("Connection refused"),
        "{error}"
    );

    // An upstream the client cannot call leaves that server waiting with the reason.
    let r = host.get("misconfigured.localhost", "/");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains(r#"invalid config: upstream "https://example.com" is not an http:// URL"#),
        "{}",
        r.body
    );

    // The host, the gateway and its upstream all carry on.
    assert_eq!(call(&host, "gateway.localhost", "/weather/paris").0, 200);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn the_shipped_setup_reads_notes_through_the_host_itself() {
    // As in servers.config.json: the upstream is the host, and `host` picks the server.
    let port = closed_port();
    let config = format!(
        r#"{{"global": {{"listen": ["127.0.0.1:{port}"]}},
          "servers": [
            {{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}},
            {{"name": "gateway", "domains": ["gateway.localhost"], "plugin": "gateway",
              "config": {{"upstream": "http://127.0.0.1:{port}", "host": "notes.localhost"}}}}]}}"#
    );
    let host = Setup::new("gateway-shipped", &config)
        .plugin("gateway", "gateway.so")
        .plugin("notes", "notes.so")
        .start_with_config_listen();
    let created = host.send(
        "POST",
        "notes.localhost",
        "/notes",
        br#"{"text":"via the gateway"}"#,
        &[],
    );
    assert_eq!(created.status, 201);
    let (status, body, _) = call(&host, "gateway.localhost", "/notes");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({
            "upstream": format!("http://127.0.0.1:{port}/notes"),
            "status": 200,
            "data": [{"id": 1, "text": "via the gateway"}],
        })
    );
}

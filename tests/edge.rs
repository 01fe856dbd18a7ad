//! Connection limits at the edge (`global.connections`): deadlines for the first
//! request, the headers, idle and stuck connections; connections in all and per client
//! address; the request head's size on HTTP/1 and HTTP/2.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Host, Setup};

fn host(label: &str, connections: &str) -> Host {
    let config = format!(
        r#"{{"global": {{"connections": {connections}}},
          "servers": [{{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    );
    Setup::new(label, &config)
        .plugin("hello", "hello.so")
        .start()
}

/// Waits (up to `limit`) until the host closes `stream`; how long that took.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

#[test]
fn silent_half_open_and_slow_connections_are_closed_at_their_deadlines() {
    let host = host(
        "edge-deadlines",
        r#"{"first_request_timeout_ms": 1000, "header_timeout_ms": 1000}"#,
    );
    let openers: [(&str, &[u8]); 4] = [
        ("nothing", b""),
        ("half an HTTP/2 preface", &H2_PREFACE[..10]),
        (
            "an HTTP/2 preface and SETTINGS, then silence",
            &[H2_PREFACE, H2_SETTINGS].concat(),
        ),
        (
            "half a request head",
            b"GET / HTTP/1.1\r\nhost: hello.localhost\r\n",
        ),
    ];
    let opened = Instant::now();
    let mut streams: Vec<(&str, TcpStream)> = openers
        .iter()
        .map(|(what, bytes)| {
            let mut s = TcpStream::connect(host.addr).unwrap();
            s.write_all(bytes).unwrap();
            (*what, s)
        })
        .collect();
    // A client that does send requests is served meanwhile.
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    for (what, stream) in &mut streams {
        closed_within(stream, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("a connection that sent {what} was not closed in 5 s"));
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(700),
            "{what}: closed after {took:?}"
        );
    }
    host.wait_for_log(&["closed connections: no request within first_request_timeout_ms"]);
    // A connection that is being used is not.
    let mut conn = host.connect();
    for _ in 0..3 {
        assert_eq!(conn.get("hello.localhost", "/").unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn idle_and_stuck_connections_are_closed() {
    let host = host(
        "edge-idle",
        r#"{"idle_timeout_ms": 1000, "write_timeout_ms": 1000, "header_timeout_ms": 30000}"#,
    );
    // Idle after a request (HTTP/1: asked to finish, which closes it at once).
    let mut idle = TcpStream::connect(host.addr).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: hello.localhost\r\n\r\n")
        .unwrap();
    let took =
        closed_within(&mut idle, Duration::from_secs(5)).expect("an idle connection is closed");
    assert!(took >= Duration::from_millis(700), "closed after {took:?}");

    // A client that asks for a megabyte again and again and never reads: the host's
    // writes stop making progress, and the connection is closed.
    let mut stuck = TcpStream::connect(host.addr).unwrap();
    let ask = b"GET /bytes/1048576 HTTP/1.1\r\nhost: hello.localhost\r\n\r\n".repeat(16);
    stuck.write_all(&ask).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    host.wait_for_log(&["closed connections: the client read nothing for write_timeout_ms"]);
    // Reading now finds the end after what the host had sent.
    stuck
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stuck.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got < 16 << 20,
        "the host sent all {got} bytes: it was not stuck"
    );
}

#[test]
fn connections_per_address_and_in_all_are_limited() {
    let host = host("edge-per-ip", r#"{"max_per_ip": 3}"#);
    let mut held: Vec<_> = (0..3).map(|_| host.connect()).collect();
    for conn in &mut held {
        assert_eq!(conn.get("hello.localhost", "/").unwrap().status, 200);
    }
    let mut fourth = TcpStream::connect(host.addr).unwrap();
    let _ = fourth.write_all(b"GET / HTTP/1.1\r\nhost: hello.localhost\r\n\r\n");
    closed_within(&mut fourth, Duration::from_secs(5)).expect("the fourth is closed");
    host.wait_for_log(&["connections refused", "max_per_ip", "refused=1"]);
    // One goes; another may come.
    held.pop();
    host.wait_until("a place is free", || {
        host.connect().get("hello.localhost", "/").is_ok()
    });

    drop(held);
    drop(host);
    let host = self::host("edge-max", r#"{"max": 2, "max_per_ip": 0}"#);
    let mut a = host.connect();
    let mut b = host.connect();
    assert_eq!(a.get("hello.localhost", "/").unwrap().status, 200);
    assert_eq!(b.get("hello.localhost", "/").unwrap().status, 200);
    let mut third = TcpStream::connect(host.addr).unwrap();
    closed_within(&mut third, Duration::from_secs(5)).expect("the third is closed");
    host.wait_for_log(&["connections refused: global.connections.max are open"]);
}

#[test]
fn slow_header_connections_do_not_starve_other_clients() {
    // The first-request deadline is set far off: the header deadline is what is tested.
    let host = host(
        "edge-slowloris",
        r#"{"header_timeout_ms": 2000, "first_request_timeout_ms": 600000, "max_per_ip": 0}"#,
    );
    // 2,000 connections, each sending a request head one byte at a time, until the
    // host has closed them all.
    let mut slow: Vec<TcpStream> = (0..2000)
        .map(|_| {
            let s = TcpStream::connect(host.addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let head = b"GET / HTTP/1.1\r\nhost: hello.localhost\r\nx-slow: ";
    let client_done = std::sync::atomic::AtomicBool::new(false);
    let (latencies, open) = std::thread::scope(|scope| {
        let dripper = scope.spawn(|| {
            let started = Instant::now();
            let mut sent = 0usize;
            loop {
                let byte = [head.get(sent).copied().unwrap_or(b'x')];
                let mut open = 0;
                for s in &mut slow {
                    // Closed: the read finds the end (after hyper's 408) or an error.
                    let mut buf = [0u8; 1024];
                    let closed = loop {
                        match s.read(&mut buf) {
                            Ok(0) => break true,
                            Ok(_) => continue,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                            Err(_) => break true,
                        }
                    };
                    if !closed {
                        open += 1;
                        let _ = s.write(&byte);
                    }
                }
                sent += 1;
                let client_done = client_done.load(std::sync::atomic::Ordering::Relaxed);
                if (open == 0 && client_done) || started.elapsed() > Duration::from_secs(30) {
                    return open;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let mut latencies = Vec::new();
        let mut conn = host.connect();
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let start = Instant::now();
            let reply = conn
                .get("hello.localhost", "/")
                .expect("a normal client is served");
            assert_eq!(reply.status, 200);
            latencies.push(start.elapsed());
        }
        client_done.store(true, std::sync::atomic::Ordering::Relaxed);
        (latencies, dripper.join().unwrap())
    });
    let mut sorted = latencies;
    sorted.sort();
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    println!(
        "a normal client beside 2,000 slow-header connections: {} requests, p50 {:?}, p99 {:?}",
        sorted.len(),
        sorted[sorted.len() / 2],
        p99
    );
    // Still sending, a byte every 200 ms, yet closed by the header deadline.
    assert_eq!(open, 0, "slow-header connections still open after 30 s");
}

#[test]
fn request_heads_are_limited_on_http1_and_http2() {
    let host = host(
        "edge-heads",
        r#"{"max_uri_bytes": 100, "max_header_bytes": 8192}"#,
    );
    let long = format!("/hello/{}", "a".repeat(200));
    assert_eq!(host.get("hello.localhost", &long).status, 414);
    let big = "v".repeat(10_000);
    let reply = host.send("GET", "hello.localhost", "/", b"", &[("x-big", &big)]);
    assert_eq!(reply.status, 431);

    // HTTP/2 (h2c, prior knowledge): max_headers (100 by default) holds there too.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = host.addr;
    let statuses = runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut statuses = Vec::new();
        for n in [10, 150] {
            let mut client = client.clone().ready().await.unwrap();
            let mut request = hyper::Request::get("http://hello.localhost/")
                .body(())
                .unwrap();
            for i in 0..n {
                request.headers_mut().insert(
                    format!("x-h{i}")
                        .parse::<hyper::header::HeaderName>()
                        .unwrap(),
                    "v".parse().unwrap(),
                );
            }
            let (response, _) = client.send_request(request, true).unwrap();
            statuses.push(response.await.unwrap().status().as_u16());
        }
        statuses
    });
    assert_eq!(statuses, [200, 431]);
}

#[test]
fn drop_in_plugins_are_served_only_on_loopback_unless_asked() {
    // No server names `hello`; on a loopback listener it is served as a drop-in.
    let local = Setup::new("edge-dropin-local", r#"{"servers": []}"#)
        .plugin("hello", "hello.so")
        .start();
    assert_eq!(local.get("hello.localhost", "/").status, 200);
    // Listening on every address, it is not (404), unless the config says so.
    let public = |label: &str, setting: &str| {
        let config =
            format!(r#"{{"global": {{"listen": ["0.0.0.0:0"]{setting}}}, "servers": []}}"#);
        Setup::new(label, &config)
            .plugin("hello", "hello.so")
            .start_with_config_listen()
    };
    let host = public("edge-dropin-public", "");
    host.wait_for_log(&[
        "plugin=hello",
        "drop-in plugins are served only on loopback",
    ]);
    assert_eq!(host.get("hello.localhost", "/").status, 404);
    let host = public("edge-dropin-asked", r#", "drop_in_plugins": true"#);
    host.wait_until("the drop-in is served", || {
        host.get("hello.localhost", "/").status == 200
    });
}

#[test]
fn a_library_or_folder_that_other_users_can_write_is_not_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let config =
        r#"{"servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let setup = Setup::new("edge-unprotected", config).plugin("hello", "hello.so");
    let library = setup.dir.join("plugins/hello.so");
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o757)).unwrap();
    let host = setup.start();
    host.wait_for_log(&[
        "hello.so",
        "the library is writable by every user (mode 757; chmod o-w)",
    ]);
    let reply = host.get("hello.localhost", "/");
    assert_eq!(reply.status, 503, "{}", reply.body);
    // Fixed: it loads (the folder is watched).
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o755)).unwrap();
    host.install(&crate::support::library("hello"), "hello.so");
    host.wait_until("the library loads", || {
        host.get("hello.localhost", "/").status == 200
    });
    // A folder anyone can write to is refused too.
    let folder = host.dir().join("plugins");
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o777)).unwrap();
    let host2 = host.setup().clone().start();
    host2.wait_for_log(&["its folder is writable by every user"]);
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn request_targets_and_hosts_follow_one_rule() {
    let host = host("edge-targets", "{}");
    let ask = |head: &str| host.raw(format!("{head}\r\nconnection: close\r\n\r\n").as_bytes());
    // Absolute form: the target's authority routes it, and a valid Host is still needed.
    let routed = ask("GET http://hello.localhost/ HTTP/1.1\r\nhost: elsewhere.example");
    assert_eq!(routed.status, 200, "{}", routed.body);
    for (head, why) in [
        (
            "GET http://hello.localhost/ HTTP/1.1",
            "missing Host header",
        ),
        (
            "GET http://hello.localhost/ HTTP/1.1\r\nhost: not a host",
            "invalid Host header",
        ),
        (
            "GET ftp://hello.localhost/ HTTP/1.1\r\nhost: hello.localhost",
            "unsupported scheme",
        ),
        (
            "GET hello.localhost:80 HTTP/1.1\r\nhost: hello.localhost",
            "only for CONNECT",
        ),
        (
            "GET / HTTP/1.1\r\nhost: hello.localhost:99999",
            "invalid Host",
        ),
        ("GET / HTTP/1.1\r\nhost: a..hello.localhost", "invalid Host"),
    ] {
        let reply = ask(head);
        assert_eq!(reply.status, 400, "{head:?}: {}", reply.body);
        assert!(reply.body.contains(why), "{head:?}: {}", reply.body);
    }
    let long = format!("GET / HTTP/1.1\r\nhost: {}.hello.localhost", "a".repeat(64));
    assert_eq!(ask(&long).status, 400);
}

#[test]
fn past_max_in_flight_a_server_sheds_requests_with_503() {
    let config = r#"{"global": {"limits": {"max_in_flight": 3}},
      "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let host = Setup::new("edge-shed", config)
        .plugin("hello", "hello.so")
        .start();
    std::thread::scope(|scope| {
        // A slow request that meets the probe below while two others are in flight is
        // shed itself: it tries again, so that three end up in flight.
        let slow: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| loop {
                    let status = host.get("hello.localhost", "/slow?ms=2000").status;
                    if status != 503 {
                        return status;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                })
            })
            .collect();
        // The 503 is looked at as it came: by the time another request is sent, the
        // first slow ones may be done (a slow one may have been shed for a while).
        let mut shed = None;
        host.wait_until("three requests are in flight", || {
            let reply = host.get("hello.localhost", "/");
            let refused = reply.status == 503;
            shed = Some(reply);
            refused
        });
        let reply = shed.unwrap();
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert!(reply.body.contains("max_in_flight"), "{}", reply.body);
        assert!(reply.header("x-request-id").is_some());
        for s in slow {
            assert_eq!(s.join().unwrap(), 200);
        }
    });
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    host.wait_for_log(&[
        "requests refused with 503",
        "server=hello",
        "max_in_flight=3",
    ]);
}

#[test]
fn an_idle_http2_connection_is_closed() {
    let host = host("edge-h2-idle", r#"{"idle_timeout_ms": 1000}"#);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = host.addr;
    let ended = runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let request = hyper::Request::get("http://hello.localhost/")
            .body(())
            .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        assert_eq!(response.await.unwrap().status(), 200);
        // Quiet from here: the host asks it to finish (GOAWAY) and it ends.
        tokio::time::timeout(Duration::from_secs(8), conn)
            .await
            .is_ok()
    });
    assert!(ended, "an idle HTTP/2 connection was still open after 8 s");
}

#[test]
fn the_access_log_has_one_line_per_request_in_json_or_combined_form() {
    let config = r#"{"global": {"access_log": {"format": "json", "file": "logs/access.log"}},
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
                    {"name": "app", "domains": ["*.app.localhost"], "plugin": "hello",
                     "tenant_from_subdomain": "app.localhost"}]}"#;
    let setup = Setup::new("access-log-json", config).plugin("hello", "hello.so");
    std::fs::create_dir_all(setup.dir.join("logs")).unwrap();
    let host = setup.start();
    let ok = host.send(
        "GET",
        "hello.localhost",
        "/hello/ada?shout=true",
        b"",
        &[
            ("referer", "http://example.test/"),
            ("user-agent", "tester \"1\""),
        ],
    );
    assert_eq!(ok.status, 200);
    assert_eq!(host.get("nobody.localhost", "/x").status, 404);
    let long = format!("/{}", "a".repeat(9000));
    assert_eq!(host.get("hello.localhost", &long).status, 414);
    assert_eq!(host.get("Shop.App.localhost:80", "/plain").status, 200);
    let file = host.dir().join("logs/access.log");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    host.wait_until("four access log lines", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        lines = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        lines.len() == 4
    });
    let first = &lines[0];
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/hello/ada?shout=true");
    assert_eq!(first["status"], 200);
    assert_eq!(first["server"], "hello");
    assert_eq!(first["tenant"], serde_json::Value::Null);
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(first["bytes"], ok.body.len());
    assert_eq!(first["referer"], "http://example.test/");
    assert_eq!(first["user_agent"], "tester \"1\"");
    assert_eq!(first["request_id"], ok.header("x-request-id").unwrap());
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["status"], 404);
    assert_eq!(lines[1]["server"], serde_json::Value::Null);
    assert_eq!(lines[1]["tenant"], serde_json::Value::Null);
    // Refused at the edge, and logged all the same.
    assert_eq!(lines[2]["status"], 414);
    // The tenant its subdomain names.
    assert_eq!(lines[3]["server"], "app");
    assert_eq!(lines[3]["tenant"], "shop");
    drop(host);

    // Combined, to stderr: the common fields, then server, tenant, request id and
    // milliseconds.
    let config = r#"{"global": {"access_log": {"format": "combined"}},
        "tenants": [{"id": "acme"}],
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
                     "tenant": "acme"},
                    {"name": "other", "domains": ["other.localhost"], "plugin": "hello"}]}"#;
    let host = Setup::new("access-log-combined", config)
        .plugin("hello", "hello.so")
        .start();
    let ok = host.send(
        "GET",
        "hello.localhost",
        "/hello/ada",
        b"",
        &[("user-agent", "tester")],
    );
    let id = ok.header("x-request-id").unwrap().to_owned();
    let line = host.wait_for_log(&[&id]);
    let want = format!(
        "\"GET /hello/ada HTTP/1.1\" 200 {} \"-\" \"tester\" hello acme {id} ",
        ok.body.len()
    );
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains(" +0000] "), "{line}");
    assert!(line.contains(&want), "{line}\nwanted {want}");
    let ok = host.get("other.localhost", "/plain");
    let id = ok.header("x-request-id").unwrap().to_owned();
    let line = host.wait_for_log(&[&id]);
    assert!(line.contains(&format!(" other - {id} ")), "{line}");
}

#[test]
fn a_well_formed_incoming_request_id_is_kept_and_any_other_replaced() {
    let config = r#"{"global": {"access_log": {"format": "json", "file": "access.log"}},
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let host = Setup::new("request-id", config)
        .plugin("hello", "hello.so")
        .start();
    let echo = |sent: Option<&str>| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(id) = sent {
            headers.push(("x-request-id", id));
        }
        let r = host.send("POST", "hello.localhost", "/echo", b"{}", &headers);
        assert_eq!(r.status, 200, "{}", r.body);
        let header = r.header("x-request-id").expect("an id").to_owned();
        // What the plugin read is what the client is told.
        assert_eq!(r.json()["request_id"], header.as_str());
        header
    };
    let uuid = "f47ac10b-58cc-4372-a567-0e02b2c3d479";
    let longest = "A".repeat(64);
    let kept = [
        uuid,
        "0123456789abcdef0123456789abcdef",
        "req_1:edge.2+x/y=",
        &longest,
    ];
    for id in kept {
        assert_eq!(echo(Some(id)), id);
    }
    let too_long = "A".repeat(65);
    let replaced = ["has space", "quote\"d", "semi;colon", "", &too_long];
    let mut made = Vec::new();
    for id in replaced {
        let got = echo(Some(id));
        assert_ne!(got, id);
        assert_eq!(got.len(), 16, "{got}");
        assert!(got.bytes().all(|b| b.is_ascii_hexdigit()), "{got}");
        made.push(got);
    }
    let fresh = echo(None);
    assert_eq!(fresh.len(), 16);
    made.push(fresh);
    made.sort();
    made.dedup();
    assert_eq!(made.len(), replaced.len() + 1, "every new id differs");
    // Refused at the edge (414) keeps it too.
    let long = format!("/{}", "a".repeat(9000));
    let r = host.send(
        "GET",
        "hello.localhost",
        &long,
        b"",
        &[("x-request-id", uuid)],
    );
    assert_eq!(r.status, 414);
    assert_eq!(r.header("x-request-id"), Some(uuid));
    // And the access log has the id the client sent.
    let file = host.dir().join("access.log");
    host.wait_until("the access log's lines", || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        text.lines().count() == kept.len() + replaced.len() + 2
    });
    let text = std::fs::read_to_string(&file).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(&ids[..kept.len()], &kept.map(str::to_owned)[..]);
    assert_eq!(ids.last().map(String::as_str), Some(uuid));
}

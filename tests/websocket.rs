//! WebSockets handled by plugins: real clients (tungstenite) against the real host:
//! echo, refusal, rooms and broadcasts, the plugin closing, panics, heartbeat, limits,
//! and connections that stay open while their plugin is reloaded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use crate::support::{build_variant, Host, Setup, Ws};

fn config(websocket: &str) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20, "drain_timeout_ms": 2000}},
                   "connections": {{"max_per_ip": 0}},
                   "websocket": {{{websocket}}}}},
      "servers": [{{"name": "sockets", "domains": ["sockets.localhost"], "plugin": "sockets"}},
                  {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    )
}

fn host_with(label: &str, websocket: &str) -> Host {
    Setup::new(label, &config(websocket))
        .plugin("fixture-sockets", "sockets.so")
        .plugin("hello", "hello.so")
        .start()
}

/// Opens a WebSocket to `path` at `sockets.localhost`.
fn open(host: &Host, path: &str) -> Result<Ws, tungstenite::Error> {
    let (ws, response) = host.websocket(&format!("ws://sockets.localhost{path}"))?;
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    Ok(ws)
}

/// The next text message (pings and pongs skipped).
fn text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

fn say(ws: &mut Ws, s: &str) {
    ws.send(Message::text(s)).unwrap();
}

/// Reads until the server's close frame; returns its code and reason.
fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.as_str().to_owned())
            }
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("the connection ended without a close frame: {e}"),
        }
    }
}

#[test]
fn echo_refusal_and_an_ordinary_get() {
    let host = host_with("ws-echo", "");
    let mut ws = open(&host, "/ws").unwrap();
    say(&mut ws, "hello");
    assert_eq!(text(&mut ws), "v1:hello");
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    // The attachment set at open (from the query) is there for later events. (The
    // first connection goes first, so that its close is announced to nobody.)
    drop(ws);
    host.wait_until("the first connection is gone", || {
        host.get("sockets.localhost", "/count").body == "0"
    });
    let mut ws = open(&host, "/ws?name=ada").unwrap();
    say(&mut ws, "name");
    assert_eq!(text(&mut ws), "ada");

    // The route's handler refuses: its response goes out, and no connection opens.
    match open(&host, "/ws?refuse") {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("refused by the fixture"), "{body}");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // Not an upgrade: 426 from the route; an unknown path: 404 as for any request.
    let plain = host.get("sockets.localhost", "/ws");
    assert_eq!(plain.status, 426, "{}", plain.body);
    assert_eq!(plain.header("upgrade"), Some("websocket"));
    assert!(matches!(
        open(&host, "/nowhere"),
        Err(tungstenite::Error::Http(r)) if r.status() == 404
    ));
    // A WebSocket asked of a server without WebSocket routes is an ordinary request.
    let mut raw = TcpStream::connect(host.addr).unwrap();
    raw.write_all(b"GET /hello/ws HTTP/1.1\r\nhost: hello.localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; 4096];
    let n = raw.read(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got[..n]);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // The wrong version: 426 naming the one supported.
    let mut raw = TcpStream::connect(host.addr).unwrap();
    raw.write_all(b"GET /ws HTTP/1.1\r\nhost: sockets.localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 8\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; 4096];
    let n = raw.read(&mut got).unwrap();
    let got = String::from_utf8_lossy(&got[..n]).to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 426"), "{got}");
    assert!(got.contains("sec-websocket-version: 13"), "{got}");
}

#[test]
fn rooms_broadcasts_and_close_events() {
    let host = host_with("ws-rooms", "");
    let mut a = open(&host, "/ws?room=r").unwrap();
    let mut b = open(&host, "/ws?room=r").unwrap();
    let mut c = open(&host, "/ws").unwrap();
    say(&mut a, "id");
    let a_id: u64 = text(&mut a).parse().unwrap();
    say(&mut b, "id");
    let b_id: u64 = text(&mut b).parse().unwrap();
    say(&mut c, "members:r");
    let mut expected = [a_id, b_id];
    expected.sort_unstable();
    assert_eq!(text(&mut c), format!("{},{}", expected[0], expected[1]));

    say(&mut a, "room:r:to the room");
    assert_eq!(text(&mut a), "to the room");
    assert_eq!(text(&mut b), "to the room");
    say(&mut a, "others:r:not to me");
    assert_eq!(text(&mut b), "not to me");
    say(&mut c, "all:to everyone");
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(text(ws), "to everyone", "c got no room message in between");
    }
    say(&mut c, "join:r");
    assert_eq!(text(&mut c), "joined:r");
    say(&mut b, "leave:r");
    assert_eq!(text(&mut b), "left:r");
    say(&mut a, "room:r:after the change");
    assert_eq!(text(&mut a), "after the change");
    assert_eq!(text(&mut c), "after the change");

    // A client's close reaches the plugin once, after the connection left its rooms.
    b.close(None).unwrap();
    let announced = format!("closed:{b_id}:1005:");
    assert_eq!(text(&mut a), announced);
    assert_eq!(text(&mut c), announced);
    let count = host.get("sockets.localhost", "/count");
    assert_eq!(count.body, "2");
    // A connection cut without a close frame: 1006.
    drop(c);
    let next = text(&mut a);
    assert!(
        next.starts_with("closed:") && next.contains(":1006:"),
        "{next}"
    );
}

#[test]
fn the_plugin_closes_a_connection_and_a_panic_closes_only_its_own() {
    let host = host_with("ws-close", "");
    let mut ws = open(&host, "/ws").unwrap();
    say(&mut ws, "close");
    assert_eq!(close_of(&mut ws), (4000, "asked".to_owned()));

    let mut bystander = open(&host, "/ws").unwrap();
    let mut ws = open(&host, "/ws").unwrap();
    say(&mut ws, "panic");
    let (code, reason) = close_of(&mut ws);
    assert_eq!(code, 1011, "{reason}");
    host.wait_for_log(&["server=sockets", "the fixture panics on request"]);
    say(&mut bystander, "still here");
    // (The bystander first hears of the two closes.)
    loop {
        let got = text(&mut bystander);
        if !got.starts_with("closed:") {
            assert_eq!(got, "v1:still here");
            break;
        }
    }
    // A slow handler: the connection's next message waits for it, in order.
    say(&mut bystander, "sleep:200");
    say(&mut bystander, "after");
    assert_eq!(text(&mut bystander), "slept");
    assert_eq!(text(&mut bystander), "v1:after");
}

/// Reads raw bytes until the peer closes or `limit` passes.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(got),
        }
    }
    None
}

#[test]
fn heartbeat_closes_a_silent_client_and_keeps_a_live_one() {
    let host = host_with("ws-ping", r#""ping_interval_ms": 200"#);
    // A client that completes the handshake and then never reads, so never answers a
    // ping.
    let mut silent = TcpStream::connect(host.addr).unwrap();
    silent.write_all(b"GET /ws HTTP/1.1\r\nhost: sockets.localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    // A client that reads all along (tungstenite answers pings as it reads).
    let mut live = open(&host, "/ws").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let reader = std::thread::spawn(move || {
        live.get_mut()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut pings = 0;
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            match live.read() {
                Ok(Message::Ping(_)) => pings += 1,
                // The silent client's close, announced by the plugin.
                Ok(Message::Text(t)) => assert!(
                    t.starts_with("closed:") && t.ends_with(":1001:no pong"),
                    "{t}"
                ),
                Err(tungstenite::Error::Io(_)) => {}
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => panic!("the live client was closed: {e}"),
            }
            let _ = live.flush();
        }
        assert!(pings >= 3, "{pings} pings");
        live.get_mut()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        live
    });
    let started = Instant::now();
    let got = read_until_closed(&mut silent, Duration::from_secs(8))
        .expect("the host closes a client that answers no ping");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "closed after {waited:?}"
    );
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let (head, frames) = got.split_at(head_end);
    assert!(head.starts_with(b"HTTP/1.1 101"), "{got:?}");
    // Pings (an empty 0x89 frame) came first, then a close frame (0x88) with 1001
    // (0x03e9) and "no pong".
    assert!(frames.starts_with(&[0x89, 0x00]), "{frames:?}");
    let close = [&[0x88, 9, 0x03, 0xe9][..], b"no pong"].concat();
    assert!(frames.ends_with(&close), "{frames:?}");
    // The host waited for the silent client's close frame (2 s) before it let go.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut live = reader.join().unwrap();
    say(&mut live, "alive");
    // The silent client's close is announced to the live one (`closed:1:1001:no
    // pong`) whenever the plugin gets it: before or after the reply, under load.
    let reply = loop {
        let t = text(&mut live);
        if !t.starts_with("closed:") {
            break t;
        }
    };
    assert_eq!(reply, "v1:alive");
}

#[test]
fn a_slow_reader_and_a_large_message_are_closed_and_the_limit_of_connections_holds() {
    let host = host_with(
        "ws-limits",
        r#""send_queue_bytes": 65536, "max_message_bytes": 1024, "max_connections": 3"#,
    );
    let mut slow = open(&host, "/ws").unwrap();
    // 1,000 messages of 1 KiB at once: far past the 64 KiB queue.
    say(&mut slow, "flood:1000:1024");
    let mut received = 0;
    let (code, reason) = loop {
        match slow.read().expect("the close frame") {
            Message::Binary(_) => received += 1,
            Message::Close(Some(frame)) => {
                break (u16::from(frame.code), frame.reason.as_str().to_owned())
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((code, reason.as_str()), (1008, "send queue full"));
    assert!(
        received < 64,
        "{received} messages were queued past the budget"
    );
    host.wait_for_log(&["server=sockets", "its send queue is full"]);

    let mut big = open(&host, "/ws").unwrap();
    big.send(Message::text("x".repeat(2000))).unwrap();
    assert_eq!(close_of(&mut big).0, u16::from(CloseCode::Size));

    // Three at once, no more: the fourth gets 503. (The two closed above are gone once
    // their clients leave.)
    drop((slow, big));
    host.wait_until("the closed connections are gone", || {
        host.get("sockets.localhost", "/count").body == "0"
    });
    let _kept: Vec<Ws> = (0..3).map(|_| open(&host, "/ws").unwrap()).collect();
    match open(&host, "/ws") {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected a 503, got {:?}", other.map(|_| "a connection")),
    }
    host.wait_for_log(&["refused a WebSocket connection", "max_connections=3"]);
}

#[test]
fn connections_stay_open_across_reloads_with_their_attachments_and_order() {
    let v2 = build_variant(
        "fixture-sockets",
        ("FIXTURE_VARIANT", "v2"),
        Some("sockets-v2"),
    );
    let v1 = build_variant(
        "fixture-sockets",
        ("FIXTURE_VARIANT", "v1"),
        Some("sockets-v1"),
    );
    let host = host_with("ws-reload", "");
    let mut clients: Vec<Ws> = (0..20).map(|_| open(&host, "/ws").unwrap()).collect();
    let mut next = vec![1u64; clients.len()];
    let mut variants_seen = std::collections::BTreeSet::new();
    for round in 0..6 {
        let lib = if round % 2 == 0 { &v2 } else { &v1 };
        host.install(lib, "sockets.so");
        // Messages keep flowing while the swap happens.
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            for (i, ws) in clients.iter_mut().enumerate() {
                say(ws, &format!("seq:{}", next[i]));
                let reply = text(ws);
                let parts: Vec<&str> = reply.split(':').collect();
                assert_eq!(parts.len(), 3, "{reply}");
                assert_eq!(parts[1], next[i].to_string(), "lost or reordered: {reply}");
                // The count lives in the connection's attachment: it carries across
                // generations, once per message.
                assert_eq!(parts[2], next[i].to_string(), "attachment: {reply}");
                variants_seen.insert(parts[0].to_owned());
                next[i] += 1;
            }
        }
        host.wait_for_log(&[&format!("generation={}", round + 2), "reloaded"]);
    }
    assert!(variants_seen.contains("v1") && variants_seen.contains("v2"));
    // Every connection is still open and answers the last build.
    for ws in &mut clients {
        say(ws, "which");
        assert_eq!(text(ws), "v1:which");
    }
    assert_eq!(host.get("sockets.localhost", "/count").body, "20");
}

#[test]
fn removing_the_server_and_stopping_the_host_close_connections_with_1001() {
    let setup = Setup::new("ws-remove", &config(""))
        .plugin("fixture-sockets", "sockets.so")
        .plugin("hello", "hello.so");
    let mut host = setup.clone().start();
    let mut ws = open(&host, "/ws").unwrap();
    say(&mut ws, "x");
    assert_eq!(text(&mut ws), "v1:x");
    host.write_config(
        r#"{"global": {"reload": {"debounce_ms": 20}},
            "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#,
    );
    assert_eq!(close_of(&mut ws).0, 1001);

    host.write_config(&config(""));
    host.wait_until("the server is back", || {
        host.get("sockets.localhost", "/count").status == 200
    });
    let mut ws = open(&host, "/ws").unwrap();
    say(&mut ws, "y");
    assert_eq!(text(&mut ws), "v1:y");
    host.signal_term();
    assert_eq!(
        close_of(&mut ws),
        (1001, "the host is shutting down".to_owned())
    );
    let status = host
        .wait_exit(Duration::from_secs(10))
        .expect("the host exits");
    assert!(status.success(), "{status:?}");
}

/// Raises this process's limit of open files to its hard limit (the host started from
/// it inherits it): a thousand connections need two thousand descriptors.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    #[allow(unsafe_code)]
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[test]
fn a_thousand_connections_stay_open_across_twenty_reloads_in_order_with_nothing_lost() {
    use futures_util::{SinkExt, StreamExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio_tungstenite::tungstenite::Message as AsyncMessage;

    raise_fd_limit();
    let v2 = build_variant(
        "fixture-sockets",
        ("FIXTURE_VARIANT", "v2"),
        Some("sockets-v2"),
    );
    let v1 = build_variant(
        "fixture-sockets",
        ("FIXTURE_VARIANT", "v1"),
        Some("sockets-v1"),
    );
    let host = Setup::new("ws-thousand", &config(""))
        .plugin("fixture-sockets", "sockets.so")
        .plugin("hello", "hello.so")
        .start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = host.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // 1,000 connections, each sending `seq:N` every 200 ms and checking every answer.
    let clients: Vec<_> = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..1000 {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = "ws://sockets.localhost/ws".into_client_request().unwrap();
            let (ws, _) = tokio_tungstenite::client_async(request, stream)
                .await
                .expect("a connection");
            clients.push(ws);
        }
        clients
    });
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let stop = stop.clone();
            runtime.spawn(async move {
                let mut next = 1u64;
                let mut variants = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    ws.send(AsyncMessage::text(format!("seq:{next}"))).await?;
                    let reply = loop {
                        match ws.next().await {
                            // Others' closes, once the test stops them all.
                            Some(Ok(AsyncMessage::Text(t))) if t.starts_with("closed:") => continue,
                            Some(Ok(AsyncMessage::Text(t))) => break t.as_str().to_owned(),
                            Some(Ok(AsyncMessage::Ping(_) | AsyncMessage::Pong(_))) => continue,
                            other => return Err(format!("after {next}: {other:?}").into()),
                        }
                    };
                    let parts: Vec<&str> = reply.split(':').collect();
                    if parts.len() != 3
                        || parts[1] != next.to_string()
                        || parts[2] != next.to_string()
                    {
                        return Err(format!("sent seq:{next}, got {reply}").into());
                    }
                    variants.insert(parts[0].to_owned());
                    next += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((next - 1, variants))
            })
        })
        .collect();
    for round in 0..20 {
        let lib = if round % 2 == 0 { &v2 } else { &v1 };
        host.install(lib, "sockets.so");
        host.wait_for_log(&[
            "server=sockets",
            &format!("generation={}", round + 2),
            "reloaded",
        ]);
    }
    // A moment for every connection to speak to the last build; all still open.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(host.get("sockets.localhost", "/count").body, "1000");
    stop.store(true, Ordering::Relaxed);
    let mut messages = 0;
    let mut saw_both = 0;
    let mut failures = Vec::new();
    for task in tasks {
        match runtime.block_on(task).unwrap() {
            Ok((sent, variants)) => {
                messages += sent;
                if variants.len() == 2 {
                    saw_both += 1;
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} connections failed, for example: {:?}\n{}",
        failures.len(),
        failures
            .iter()
            .filter(|f| !f.contains("closed:"))
            .take(5)
            .collect::<Vec<_>>(),
        host.logs()
            .lines()
            .filter(|l| l.contains("failed") || l.contains("ERROR") || l.contains("WARN"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        saw_both > 900,
        "only {saw_both} connections spoke to both builds"
    );
    // Every answer was checked in order above; this only says the traffic went on
    // through the reloads (at least ten rounds per connection: two seconds of it),
    // whatever the reloads' own speed.
    assert!(messages >= 10_000, "{messages} messages");
}

/// One HTTP/2 stream as a byte stream, for a WebSocket opened by extended CONNECT
/// (RFC 8441): what a browser does on an HTTP/2 connection.
struct H2Stream {
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    unread: bytes::Bytes,
}

impl tokio::io::AsyncRead for H2Stream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if self.unread.is_empty() {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(std::io::Error::other(e))),
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.unread = data;
                }
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for H2Stream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        self.send.reserve_capacity(data.len());
        match self.send.poll_capacity(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(std::io::Error::other(e))),
            Poll::Ready(Some(Ok(n))) => {
                let chunk = bytes::Bytes::copy_from_slice(&data[..n.min(data.len())]);
                let sent = chunk.len();
                self.send
                    .send_data(chunk, false)
                    .map_err(std::io::Error::other)?;
                Poll::Ready(Ok(sent))
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let _ = self.send.send_data(bytes::Bytes::new(), true);
        std::task::Poll::Ready(Ok(()))
    }
}

#[test]
fn websockets_over_http2_extended_connect() {
    extended_connect_round_trip(&host_with("ws-h2", ""));
}

#[test]
fn websockets_over_http2_reach_a_server_in_a_worker_process() {
    // The worker speaks HTTP/1.1 to the host for upgrades: the host turns the extended
    // CONNECT into an Upgrade, and the worker's 101 into HTTP/2's 200.
    let config = config("").replace(
        r#""plugin": "sockets"}"#,
        r#""plugin": "sockets", "isolation": "process"}"#,
    );
    let host = Setup::new("ws-h2-worker", &config)
        .plugin("fixture-sockets", "sockets.so")
        .plugin("hello", "hello.so")
        .start();
    let health = host.admin().get("admin", "/health/servers/sockets").json();
    assert_eq!(health["isolation"]["kind"], "process", "{health}");
    extended_connect_round_trip(&host);
}

/// A WebSocket over HTTP/2 to `sockets.localhost`: refused at open, then accepted,
/// messages both ways, and the plugin's close.
fn extended_connect_round_trip(host: &Host) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message as AsyncMessage;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = host.addr;
    let (statuses, replies, close) = runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        // The host's SETTINGS came with the first round trip.
        let mut waited = 0;
        while !client.is_extended_connect_protocol_enabled() && waited < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
        }
        assert!(
            client.is_extended_connect_protocol_enabled(),
            "the host did not send SETTINGS_ENABLE_CONNECT_PROTOCOL"
        );
        let connect = |path: &str| {
            let mut request = hyper::Request::builder()
                .method("CONNECT")
                .uri(format!("http://sockets.localhost{path}"))
                .header("sec-websocket-version", "13")
                .body(())
                .unwrap();
            request
                .extensions_mut()
                .insert(h2::ext::Protocol::from_static("websocket"));
            request
        };
        let mut statuses = Vec::new();
        // Refused by the route's handler before the upgrade: its status, on this stream.
        let (refused, _) = client.send_request(connect("/ws?refuse"), false).unwrap();
        statuses.push(refused.await.unwrap().status().as_u16());

        let (response, send) = client
            .send_request(connect("/ws?name=grace"), false)
            .unwrap();
        let response = response.await.unwrap();
        statuses.push(response.status().as_u16());
        let stream = H2Stream {
            send,
            recv: response.into_body(),
            unread: bytes::Bytes::new(),
        };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
        let mut replies = Vec::new();
        for message in [
            AsyncMessage::text("hello"),
            AsyncMessage::text("name"),
            AsyncMessage::binary(vec![0u8, 1, 2, 255]),
        ] {
            ws.send(message).await.unwrap();
            loop {
                match ws.next().await.expect("a reply").unwrap() {
                    AsyncMessage::Ping(_) | AsyncMessage::Pong(_) => continue,
                    AsyncMessage::Text(t) => replies.push(t.as_str().to_owned()),
                    AsyncMessage::Binary(b) => replies.push(format!("{:?}", &b[..])),
                    other => panic!("unexpected {other:?}"),
                }
                break;
            }
        }
        // The plugin closes it on request, with its code and reason.
        ws.send(AsyncMessage::text("close")).await.unwrap();
        let close = loop {
            match ws.next().await {
                Some(Ok(AsyncMessage::Close(Some(frame)))) => {
                    break (u16::from(frame.code), frame.reason.as_str().to_owned())
                }
                Some(Ok(AsyncMessage::Close(None))) => break (1005, String::new()),
                Some(Ok(_)) => continue,
                other => panic!("the stream ended without a close frame: {other:?}"),
            }
        };
        (statuses, replies, close)
    });
    assert_eq!(statuses, [403, 200]);
    assert_eq!(replies, ["v1:hello", "grace", "[0, 1, 2, 255]"]);
    assert_eq!(close, (4000, "asked".to_owned()));
    host.wait_until("the connection is gone", || {
        host.get("sockets.localhost", "/count").body == "0"
    });
}

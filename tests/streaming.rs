//! Streamed bodies: responses sent as they are produced (server-sent events included),
//! with backpressure, and request bodies read chunk by chunk.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{rss_kib, Host, Setup};

fn config(drain_ms: u64, n: u64) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20, "drain_timeout_ms": {drain_ms}}},
                   "limits": {{"max_body_bytes": 65536}}}},
      "servers": [{{"name": "tasks", "domains": ["tasks.localhost"], "plugin": "tasks",
                   "config": {{"n": {n}}}}},
                  {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    )
}

fn host(label: &str, drain_ms: u64) -> Host {
    Setup::new(label, &config(drain_ms, 1))
        .plugin("fixture-tasks", "tasks.so")
        .plugin("hello", "hello.so")
        .start()
}

/// An HTTP/1.1 connection read a little at a time.
struct Raw {
    stream: TcpStream,
    got: Vec<u8>,
}

impl Raw {
    fn get(host: &Host, domain: &str, path: &str) -> Raw {
        Raw::send(
            host,
            &format!("GET {path} HTTP/1.1\r\nhost: {domain}\r\n\r\n"),
        )
    }

    fn send(host: &Host, head: &str) -> Raw {
        let mut stream = TcpStream::connect(host.addr).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Raw {
            stream,
            got: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).into_owned()
    }

    /// Reads until `needle` has arrived; panics after `limit`.
    fn until(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not arrive; got {:?}",
                self.text()
            );
            if !self.read_some() {
                assert!(
                    self.text().contains(needle),
                    "closed before {needle:?}: {:?}",
                    self.text()
                );
            }
        }
        self.text()
    }

    /// Reads what is there; false once the connection is closed.
    fn read_some(&mut self) -> bool {
        let mut buf = [0; 16384];
        match self.stream.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.got.extend_from_slice(&buf[..n]);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(_) => false,
        }
    }

    /// Reads until the server closes the connection (at most `limit`).
    fn until_closed(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while self.read_some() {
            assert!(Instant::now() < deadline, "still open: {:?}", self.text());
        }
        self.text()
    }
}

#[test]
fn server_sent_events_arrive_as_they_are_produced() {
    let host = host("sse", 2000);
    // hello's endless tick (no runtime of its own: the host's timer): each event arrives
    // while the stream is still open.
    let mut events = Raw::get(&host, "hello.localhost", "/events?every_ms=30");
    let head = events.until("id: 3\n", Duration::from_secs(10));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: text/event-stream\r\n"),
        "{head}"
    );
    assert!(lower.contains("cache-control: no-cache\r\n"), "{head}");
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(
        head.contains("event: tick\nid: 1\ndata: Hello #1\n\n"),
        "{head}"
    );
    drop(events);

    // A finite stream on a tokio interval inside the plugin's runtime ends cleanly.
    let mut five = Raw::get(&host, "tasks.localhost", "/sse?ms=20&n=5");
    let all = five.until("0\r\n\r\n", Duration::from_secs(10));
    let data: Vec<&str> = all.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(
        data,
        ["data: 1", "data: 2", "data: 3", "data: 4", "data: 5"]
    );
    host.wait_for_log(&["stream dropped", "stream=\"sse\""]);
    // The connection stays usable after the stream.
    five.stream
        .write_all(b"GET /n HTTP/1.1\r\nhost: tasks.localhost\r\n\r\n")
        .unwrap();
    five.got.clear();
    five.until("\r\n\r\n1", Duration::from_secs(5));
}

#[test]
fn a_client_that_stops_reading_stops_the_producer_and_one_that_leaves_drops_it() {
    let host = host("backpressure", 2000);
    let before = rss_kib(host.pid());
    let mut slow = Raw::get(&host, "tasks.localhost", "/firehose");
    slow.until("HTTP/1.1 200 OK", Duration::from_secs(5));
    // The client reads nothing more: production stops once the socket buffers are full.
    let produced = |host: &Host| -> u64 {
        host.get("tasks.localhost", "/produced")
            .body
            .parse()
            .unwrap()
    };
    let mut last = produced(&host);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = produced(&host);
        if now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the producer never stopped ({now} bytes)"
        );
        last = now;
    }
    assert!(
        last < 64 << 20,
        "{last} bytes were produced for a client that reads nothing"
    );
    let grown = rss_kib(host.pid()).saturating_sub(before);
    assert!(grown < 32 << 10, "the host grew by {grown} KiB");
    // Reading again resumes it.
    host.wait_until("production resumes", || {
        for _ in 0..20 {
            slow.got.clear();
            slow.read_some();
        }
        produced(&host) > last
    });
    // A client that goes away: the stream is dropped (on its generation).
    drop(slow);
    host.wait_for_log(&["stream dropped", "stream=\"firehose\""]);

    let mut sse = Raw::get(&host, "tasks.localhost", "/sse?ms=20");
    sse.until("data: 2\n", Duration::from_secs(5));
    drop(sse);
    host.wait_for_log(&["stream dropped", "stream=\"sse\""]);
}

#[test]
fn a_stream_that_fails_or_panics_aborts_its_response_only() {
    let host = host("stream-fail", 2000);
    let mut failing = Raw::get(&host, "tasks.localhost", "/fail-stream");
    let text = failing.until_closed(Duration::from_secs(10));
    assert!(
        text.contains("chunk 0\n") && text.contains("chunk 1\n"),
        "{text}"
    );
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "an aborted response must not look complete: {text:?}"
    );
    let line = host.wait_for_log(&["response stream failed: disk on fire"]);
    assert!(
        line.contains("server=tasks") && line.contains("request_id="),
        "{line}"
    );
    host.wait_for_log(&["stream dropped", "stream=\"fail-stream\""]);

    let mut panicking = Raw::get(&host, "tasks.localhost", "/panic-stream");
    let text = panicking.until_closed(Duration::from_secs(10));
    assert!(
        text.contains("chunk 1\n") && !text.ends_with("0\r\n\r\n"),
        "{text:?}"
    );
    host.wait_for_log(&["response stream failed", "stream exploded"]);
    assert_eq!(host.get("tasks.localhost", "/spawn").body, "42");

    // HEAD: no body, and the stream is dropped unread.
    let head = host.send("HEAD", "tasks.localhost", "/sse?ms=20", b"", &[]);
    assert_eq!(
        (head.status, head.body.as_str()),
        (200, ""),
        "{:?}",
        head.headers
    );
}

#[test]
fn a_reload_lets_a_stream_finish_or_ends_it_cleanly_at_the_drain_deadline() {
    let host = host("stream-reload", 1500);
    // Endless: ends cleanly (final chunk) at the drain deadline, before the old
    // generation's shutdown hook runs.
    let mut endless = Raw::get(&host, "tasks.localhost", "/sse?ms=20");
    endless.until("data: 2\n", Duration::from_secs(5));
    // Finite, shorter than the deadline: finishes in full on the old generation.
    let mut finite = Raw::get(&host, "tasks.localhost", "/sse?ms=20&n=10");
    finite.until("data: 1\n", Duration::from_secs(5));
    let reloaded_at = Instant::now();
    host.write_config(&config(1500, 2));
    host.wait_until("generation 2 serves", || {
        host.get("tasks.localhost", "/n").body == "2"
    });
    let all = finite.until("0\r\n\r\n", Duration::from_secs(10));
    assert!(all.contains("data: 10\n"), "{all}");
    let cut = endless.until("0\r\n\r\n", Duration::from_secs(10));
    assert!(cut.ends_with("\r\n0\r\n\r\n"), "ended cleanly: {cut:?}");
    assert!(reloaded_at.elapsed() >= Duration::from_millis(1400));
    host.wait_for_log(&["tasks shutdown hook ran"]);
    let logs = host.logs();
    let dropped = logs
        .rfind("stream=\"sse\"")
        .expect("the stream was dropped");
    let hook = logs.find("tasks shutdown hook ran").expect("the hook ran");
    assert!(dropped < hook, "the stream ended before the hook:\n{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[test]
fn a_streaming_route_reads_a_50_mib_upload_with_flat_memory_and_its_own_limit() {
    let host = host("upload", 2000);
    let pid = host.pid();
    let total: usize = 50 << 20;
    let before = rss_kib(pid);
    let mut up = Raw::send(
        &host,
        &format!(
            "PUT /upload HTTP/1.1\r\nhost: tasks.localhost\r\ncontent-length: {total}\r\n\r\n"
        ),
    );
    let chunk = vec![b'u'; 64 << 10];
    let mut peak = before;
    for i in 0..total / chunk.len() {
        up.stream.write_all(&chunk).unwrap();
        if i % 16 == 0 {
            peak = peak.max(rss_kib(pid));
        }
    }
    let reply = up.until("chunks", Duration::from_secs(30));
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains(&format!("{total} bytes in ")), "{reply}");
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 16 << 10,
        "the host grew by {grown} KiB during a 50 MiB upload"
    );

    // Over the route's own limit: by its declared length, before the handler...
    let r = host.send(
        "PUT",
        "tasks.localhost",
        "/upload-small",
        &[b'x'; 2000],
        &[],
    );
    assert_eq!(r.status, 413, "{}", r.body);
    // ...or as it grows past it (chunked, no length declared): the handler's stream ends
    // with TooLarge, which its `?` turns into 413.
    let mut chunked = Raw::send(
        &host,
        "PUT /upload-small HTTP/1.1\r\nhost: tasks.localhost\r\ntransfer-encoding: chunked\r\n\r\n",
    );
    // The host may answer and close before the last chunks are written.
    for _ in 0..4 {
        let _ = chunked.stream.write_all(b"200\r\n");
        let _ = chunked.stream.write_all(&[b'y'; 0x200]);
        let _ = chunked.stream.write_all(b"\r\n");
    }
    let reply = chunked.until("limit of 1000 bytes", Duration::from_secs(10));
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Other routes keep the server's limit.
    let r = host.send(
        "POST",
        "hello.localhost",
        "/echo-raw",
        &vec![b'z'; 70_000],
        &[],
    );
    assert_eq!(r.status, 413);
    // Within the limit, and an empty body.
    let r = host.send(
        "PUT",
        "tasks.localhost",
        "/upload-small",
        &[b'x'; 1000],
        &[],
    );
    assert_eq!(r.body, "1000 bytes in 1 chunks");
    let r = host.send("PUT", "tasks.localhost", "/upload-small", b"", &[]);
    assert_eq!(r.body, "0 bytes in 0 chunks");
}

#[test]
fn a_client_that_reads_nothing_cannot_hold_a_replaced_generation() {
    let host = host("stream-stalled", 500);
    let mut stalled = Raw::get(&host, "tasks.localhost", "/firehose");
    stalled.until("HTTP/1.1 200 OK", Duration::from_secs(5));
    // It reads nothing more: the socket buffers fill and hyper stops polling the body.
    std::thread::sleep(Duration::from_millis(500));
    host.write_config(&config(500, 2));
    host.wait_until("generation 2 serves", || {
        host.get("tasks.localhost", "/n").body == "2"
    });
    // At the drain deadline the host drops the stream itself, and the old generation's
    // hook runs, though the client is still connected and still reads nothing.
    host.wait_for_log(&["stream dropped", "stream=\"firehose\""]);
    host.wait_for_log(&["tasks shutdown hook ran"]);
    host.wait_for_log(&["retired", "server=tasks", "generation=1"]);
    let logs = host.logs();
    let dropped = logs.find("stream=\"firehose\"").unwrap();
    let hook = logs.find("tasks shutdown hook ran").unwrap();
    assert!(dropped < hook, "{logs}");
    drop(stalled);
}

//! The bus over Redis (`global.bus.backend = "redis"`): two host processes share a real
//! `redis-server`, started here on a free port (and killed and started again mid-test);
//! a broadcast on one reaches WebSockets on the other, an event published on one
//! reaches the subscribers on the other, and while Redis is away each host goes on alone
//! and counts what it could not send.
//!
//! Needs `redis-server` on the PATH (Debian package `redis-server`; `.ci/run` installs
//! it when missing).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::bus::publish;
use crate::support::{temp_dir, Host, Setup, Ws};

/// A `redis-server` of our own, killed when dropped.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            port,
            dir: temp_dir("redis-data"),
            child: None,
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers PING.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let mut answer = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut answer).is_ok()
                    && &answer == b"+PONG\r\n"
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn host(label: &str, redis_url: &str) -> Host {
    let config = r#"{"global": {"bus": {"backend": "redis", "url": "${REDIS_URL}"}},
      "servers": [{"name": "a", "domains": ["a.localhost"], "plugin": "a"},
                  {"name": "b", "domains": ["b.localhost"], "plugin": "b"}]}"#;
    Setup::new(label, config)
        .plugin("fixture-sockets", "a.so")
        .plugin("fixture-sockets", "b.so")
        .env("REDIS_URL", redis_url)
        .start()
}

fn connect(host: &Host, server: &str, query: &str) -> Ws {
    host.websocket(&format!("ws://{server}.localhost/ws{query}"))
        .unwrap()
        .0
}

/// The next text message, leaving out pings and the fixture's event announcements.
fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) if t.as_str().starts_with("event:") => {}
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn say(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

/// The events a server got, one `topic:payload` a line.
fn events(host: &Host, server: &str) -> Vec<String> {
    let reply = host.get(&format!("{server}.localhost"), "/events");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body.lines().map(str::to_owned).collect()
}

#[test]
fn two_hosts_act_as_one_and_go_on_alone_while_redis_is_away() {
    let mut redis = Redis::start();
    let one = host("redis-one", &redis.url());
    let two = host("redis-two", &redis.url());
    for host in [&one, &two] {
        host.wait_for_log(&["bus over Redis: connected;"]);
    }

    // Room `r` of server `a` has a member on each host; `b` has a room `r` too.
    let mut a_one = connect(&one, "a", "?room=r");
    let mut a_two = connect(&two, "a", "?room=r");
    let mut a_two_outside = connect(&two, "a", "");
    let mut b_two = connect(&two, "b", "?room=r");

    // Fifty messages to the room on host one arrive on host two, in order, and once
    // each on host one (its own copy back from Redis is not delivered again).
    for n in 1..=50 {
        say(&mut a_one, &format!("room:r:m{n}"));
    }
    say(&mut a_one, "all:end");
    for ws in [&mut a_one, &mut a_two] {
        for n in 1..=50 {
            assert_eq!(next_text(ws), format!("m{n}"));
        }
        assert_eq!(next_text(ws), "end");
    }
    // Outside the room, and in another server's room of the same name: only `all`.
    assert_eq!(next_text(&mut a_two_outside), "end");
    say(&mut b_two, "all:b-only");
    assert_eq!(next_text(&mut b_two), "b-only");

    // An event published on host one reaches both subscribers on both hosts, once.
    assert_eq!(publish(&one, "b", "ev-1"), "2", "local subscribers");
    for host in [&one, &two] {
        for server in ["a", "b"] {
            host.wait_until("the event arrives", || {
                events(host, server) == ["fixture.events:ev-1"]
            });
        }
    }

    // Redis dies: each host says so once and goes on alone.
    redis.kill();
    for host in [&one, &two] {
        host.wait_for_log(&["bus over Redis: lost the connection"]);
    }
    say(&mut a_one, "room:r:alone");
    assert_eq!(next_text(&mut a_one), "alone");
    assert_eq!(one.get("a.localhost", "/count").body, "1");
    assert_eq!(two.get("a.localhost", "/count").body, "2");
    for n in 2..=4 {
        assert_eq!(publish(&one, "a", &format!("ev-{n}")), "2");
    }
    one.wait_until("local delivery goes on", || events(&one, "b").len() == 4);
    // Lost for host two: one broadcast, three events, and the broadcast each of the
    // two subscribers on host one makes of each event.
    let lost_on_one = 1 + 3 + 3 * 2;

    // Back: each host reconnects by itself (1 s, then 2 s, ...), and says how many
    // messages were lost meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    redis.restart();
    let back = one.wait_for_log(&["bus over Redis: connected again"]);
    assert!(back.contains(&format!("lost={lost_on_one}")), "{back}");
    let back = two.wait_for_log(&["bus over Redis: connected again"]);
    assert!(back.contains("lost=0"), "{back}");
    for host in [&one, &two] {
        let logs = host.logs();
        assert_eq!(logs.matches("lost the connection").count(), 1, "{logs}");
        assert_eq!(logs.matches("cannot connect").count(), 0, "{logs}");
    }
    assert_eq!(
        events(&two, "a"),
        ["fixture.events:ev-1"],
        "nothing while away"
    );

    // Remote delivery resumes, both ways.
    say(&mut a_one, "room:r:after");
    assert_eq!(next_text(&mut a_two), "after");
    assert_eq!(next_text(&mut a_one), "after");
    assert_eq!(publish(&two, "a", "ev-5"), "2");
    one.wait_until("the event from host two arrives", || {
        events(&one, "b").last().map(String::as_str) == Some("fixture.events:ev-5")
    });
}

#[test]
fn a_host_starts_without_redis_and_connects_when_it_comes() {
    // A port where nothing listens yet.
    let mut redis = Redis::start();
    redis.kill();
    let host = host("redis-late", &redis.url());
    host.wait_for_log(&["bus over Redis: cannot connect", "retrying with backoff"]);
    // HTTP and the bus on this host work without it.
    assert_eq!(publish(&host, "a", "early"), "2");
    host.wait_until("local delivery", || {
        events(&host, "b") == ["fixture.events:early"]
    });
    redis.restart();
    let back = host.wait_for_log(&["bus over Redis: connected again"]);
    // The event and the two broadcasts its subscribers made of it.
    assert!(back.contains("lost=3"), "{back}");
    assert_eq!(host.logs().matches("cannot connect").count(), 1);
}

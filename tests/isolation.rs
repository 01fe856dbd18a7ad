//! Process isolation (`isolation: "process"`): a server's plugin in a worker process of
//! its own. Crashes that no catch contains (abort, a wild pointer, a stack overflow,
//! running out of memory, a handler that never yields) end only that worker: its
//! requests in flight get 502, the host restarts it with backoff, and every other
//! server, in the host or in a worker, keeps answering.

use std::time::{Duration, Instant};

use crate::support::{rss_kib, variant, Client, Host, Reply, Setup};

const CRASHY: &str = r#"{
  "global": {"plugin_dir": "plugins", "limits": {"request_timeout_ms": 5000}},
  "servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
    {"name": "hello-w", "domains": ["w.localhost"], "plugin": "hello", "isolation": "process"},
    {"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave",
     "isolation": "process", "worker": {"max_memory_mb": 200}}
  ]
}"#;

fn crashy(label: &str) -> Host {
    Setup::new(label, CRASHY)
        .plugin("hello", "hello.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .start()
}

/// The pid `bad`'s worker answers with, waiting (up to `limit`) until it answers.
fn worker_pid(host: &Host, limit: Duration) -> (u32, Duration) {
    let started = Instant::now();
    loop {
        let reply = host.get("bad.localhost", "/pid");
        if reply.status == 200 {
            return (reply.body.parse().expect("a pid"), started.elapsed());
        }
        assert_eq!(reply.status, 503, "while it restarts: {}", reply.body);
        assert!(
            started.elapsed() < limit,
            "no worker within {limit:?}: {}",
            reply.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_crash_ends_only_its_worker_which_comes_back_and_a_crash_loop_says_so_once() {
    let host = crashy("iso-crash");
    let (first, _) = worker_pid(&host, Duration::from_secs(10));
    assert_ne!(first, host.pid(), "bad runs in a process of its own");
    let w = host.get("w.localhost", "/");
    assert_eq!(w.status, 200, "{}", w.body);

    // The others under load all along: one in the host, one in a worker.
    let others = ["hello.localhost", "w.localhost"];
    let ok = |r: &Reply| r.status == 200 && r.body.starts_with("Hello from");
    let ((), failures, served) = host.under_load(&others, 2, "/", ok, || {
        let mut pid = first;
        let crashes = [
            ("/abort", "SIGABRT"),
            ("/segfault", "SIGSEGV"),
            ("/overflow", "SIGABRT"),
            ("/hog", "it ran out of memory (worker.max_memory_mb is 200)"),
        ];
        for (i, (path, said)) in crashes.iter().enumerate() {
            // A request in flight on the worker when it dies gets 502 too.
            let addr = host.addr;
            let slow =
                std::thread::spawn(move || Client { addr }.get("bad.localhost", "/slow?ms=1500"));
            std::thread::sleep(Duration::from_millis(100));
            let crashed = host.get("bad.localhost", path);
            assert_eq!(crashed.status, 502, "{path}: {}", crashed.body);
            let request_id = crashed
                .header("x-request-id")
                .expect("a request id")
                .to_owned();
            assert_eq!(crashed.json()["request_id"], request_id.as_str(), "{path}");
            let in_flight = slow.join().unwrap();
            assert_eq!(
                in_flight.status, 502,
                "{path}, in flight: {}",
                in_flight.body
            );
            // Back within its backoff (100 ms doubled per crash), plus its start.
            let (next, took) = worker_pid(&host, Duration::from_secs(10));
            assert_ne!(next, pid, "{path}: a new worker");
            let backoff = Duration::from_millis(100 << i);
            println!("{path}: back in {took:?} (backoff {backoff:?})");
            assert!(took < backoff + Duration::from_secs(3), "{path}: {took:?}");
            host.wait_for_log(&["died", said, &format!("pid {pid}")]);
            pid = next;
        }
        // A fifth crash within a minute is a crash loop: said once, and the server
        // answers 503 with why until its (longer) backoff has passed.
        assert_eq!(host.get("bad.localhost", "/abort").status, 502);
        // (The host notes the death a moment after the 502.)
        host.wait_until("the server says it keeps crashing", || {
            let waiting = host.get("bad.localhost", "/pid");
            waiting.status == 503 && waiting.body.contains("keeps crashing (5 times")
        });
        let (next, _) = worker_pid(&host, Duration::from_secs(10));
        assert_eq!(host.get("bad.localhost", "/abort").status, 502);
        worker_pid(&host, Duration::from_secs(10));
        assert_eq!(host.count_log_lines(&["crash loop", "server=bad"]), 1);
        assert_ne!(next, pid);
    });
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(served > 100, "the load barely ran");
    // The host itself never restarted.
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    let health = host.admin().get("admin", "/health/servers/bad").json();
    assert_eq!(health["isolation"]["kind"], "process");
    assert_eq!(health["isolation"]["restarts"], 6);
    let metrics = host.admin().get("admin", "/metrics").body;
    assert!(
        metrics.contains("host_worker_crashes_total{server=\"bad\"} 6"),
        "{metrics}"
    );
}

#[test]
fn a_handler_that_spins_past_the_request_timeout_gets_its_worker_replaced() {
    let host = crashy("iso-spin");
    let (pid, _) = worker_pid(&host, Duration::from_secs(10));
    let started = Instant::now();
    let spun = host.get("bad.localhost", "/spin?ms=20000");
    assert!(
        [502, 504].contains(&spun.status),
        "{} {}",
        spun.status,
        spun.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    host.wait_for_log(&[
        "held its thread past the request timeout",
        "route=GET /spin",
    ]);
    host.wait_for_log(&["died", "a handler held its thread past the request timeout"]);
    let (next, _) = worker_pid(&host, Duration::from_secs(10));
    assert_ne!(next, pid);
}

const VERSIONED: &str = r#"{
  "global": {"reload": {"debounce_ms": 20, "drain_timeout_ms": 5000, "init_timeout_ms": 5000}},
  "servers": [{"name": "v", "domains": ["v.localhost"], "plugin": "versioned",
               "config": {"label": "x"}, "isolation": "process"}]
}"#;

/// How many processes have `parent` as their parent.
fn children(parent: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // `pid (comm) state ppid ...`: comm may hold spaces, so read after its `)`.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after.split_whitespace().nth(1) == Some(&parent.to_string())
        })
        .count()
}

#[test]
fn reloads_in_worker_processes_fail_no_request_and_give_memory_back() {
    let (a, b) = (variant("a"), variant("b"));
    let setup = Setup::new("iso-reload", VERSIONED);
    std::fs::copy(&a, setup.dir.join("plugins/versioned.so")).unwrap();
    let host = setup.start();
    assert_eq!(host.get("v.localhost", "/").body, "a x");
    let worker = |host: &Host| -> u32 {
        let health = host.admin().get("admin", "/health/servers/v").json();
        health["isolation"]["pid"].as_u64().expect("a worker") as u32
    };
    let ok = |r: &Reply| r.status == 200 && (r.body == "a x" || r.body == "b x");
    let (rss, failures, served) = host.under_load(&["v.localhost"], 4, "/", ok, || {
        let mut rss = Vec::new();
        for round in 0..20 {
            let (lib, expected) = if round % 2 == 0 {
                (&b, "b x")
            } else {
                (&a, "a x")
            };
            host.install(lib, "versioned.so");
            host.wait_until(&format!("round {round} serves {expected}"), || {
                host.get("v.localhost", "/").body == expected
            });
            // Each generation is a process of its own; the old one exits once drained.
            let pid = worker(&host);
            rss.push(rss_kib(host.pid()) + rss_kib(pid));
        }
        rss
    });
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(served > 100, "the load barely ran");
    host.wait_for_log(&[
        "reloaded",
        "server=v",
        "generation=21",
        "isolation=\"process\"",
    ]);
    // Replaced workers exit: only the current one is left.
    host.wait_until("old workers exited", || children(host.pid()) == 1);
    println!("host + worker RSS (KiB) after each reload: {rss:?}");
    // Flat: what the 5th reload left, the 20th does too (within the noise of a
    // debug build's allocator; `cargo xtask bench` measures it over 50).
    let (early, late) = (rss[4], rss[19]);
    assert!(late < early + 3072, "RSS grew from {early} to {late} KiB");
}

#[test]
fn websockets_and_service_calls_reach_into_and_out_of_a_worker() {
    let config = r#"{
      "global": {"connections": {"max_per_ip": 0}},
      "servers": [
        {"name": "sockets", "domains": ["sockets.localhost"], "plugin": "sockets",
         "isolation": "process"},
        {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
        {"name": "caller", "domains": ["caller.localhost"], "plugin": "sockets-caller"}
      ]
    }"#;
    let setup = Setup::new("iso-ws", config)
        .plugin("fixture-sockets", "sockets.so")
        .plugin("fixture-sockets", "sockets-caller.so")
        .plugin("hello", "hello.so");
    let host = setup.start();
    // A WebSocket over HTTP/1.1, through the host to the worker and back.
    let (mut ws, response) = host
        .websocket("ws://sockets.localhost/ws?name=ada")
        .expect("the upgrade");
    assert_eq!(response.status(), 101);
    ws.send(tungstenite::Message::text("seq:1")).unwrap();
    ws.send(tungstenite::Message::text("name")).unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        match ws.read().expect("a message") {
            tungstenite::Message::Text(t) => got.push(t.as_str().to_owned()),
            _ => continue,
        }
    }
    assert_eq!(got, ["v1:1:1", "ada"]);
    // Refused at open, with the plugin's status.
    let refused = host.websocket("ws://sockets.localhost/ws?refuse");
    match refused {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    // A plugin in the host calls the server in the worker.
    let called = host.get("caller.localhost", "/call/sockets/variant");
    assert_eq!((called.status, called.body.as_str()), (200, "200 v1"));
    // The server in the worker calls servers in the host (the host makes the call)...
    let out = host.get("sockets.localhost", "/call/hello/plain");
    assert_eq!(
        (out.status, out.body.as_str()),
        (200, "200 Hello, world!\n")
    );
    let out = host.get("sockets.localhost", "/call/caller/variant");
    assert_eq!((out.status, out.body.as_str()), (200, "200 v1"));
    // ...and itself, in the worker, and a server nobody runs is the host's 503.
    let own = host.get("sockets.localhost", "/call/sockets/count");
    assert_eq!((own.status, own.body.as_str()), (200, "200 1"));
    let none = host.get("sockets.localhost", "/call/nobody/x");
    assert_call_answered_503(&none, "no microserver is named");
    drop(ws);
}

#[test]
fn a_worker_outlives_the_thread_that_started_it() {
    // Linux ends a child whose parent *thread* ends (PR_SET_PDEATHSIG); the runtime's
    // blocking threads, which start workers, end after 10 s idle. Seen: every worker
    // killed 10 s after it started.
    let host = crashy("iso-outlive");
    let (pid, _) = worker_pid(&host, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(12));
    let (still, _) = worker_pid(&host, Duration::from_secs(1));
    assert_eq!(still, pid, "the worker was replaced: {}", host.logs());
    assert_eq!(host.count_log_lines(&["died"]), 0, "{}", host.logs());
}

#[test]
fn a_restart_that_fails_counts_as_a_crash_said_once_and_is_tried_again() {
    let setup = Setup::new("iso-failed-restart", "{}").plugin("fixture-misbehave", "misbehave.so");
    let marker = setup.dir.join("no-restart");
    let config = serde_json::json!({
        "global": {"plugin_dir": "plugins"},
        "servers": [{"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave",
                     "isolation": "process", "config": {"fail_if_exists": marker}}]
    });
    std::fs::write(setup.dir.join("servers.config.json"), config.to_string()).unwrap();
    let host = setup.start();
    let (first, _) = worker_pid(&host, Duration::from_secs(10));

    // From now on the plugin's init fails; its worker dies.
    std::fs::write(&marker, "").unwrap();
    assert_eq!(host.get("bad.localhost", "/abort").status, 502);
    // The restart fails: one line for it, as a crash, with the init's error, and the
    // server waits with that reason.
    let line = host.wait_for_log(&["server=bad", "its worker process did not start again"]);
    assert!(line.contains("no-restart exists"), "{line}");
    let waiting = host.get("bad.localhost", "/pid");
    assert_eq!(waiting.status, 503, "{}", waiting.body);
    assert!(
        waiting.body.contains("no-restart exists"),
        "{}",
        waiting.body
    );
    assert_eq!(
        host.count_log_lines(&["server=bad", "not serving"]),
        0,
        "{}",
        host.logs()
    );

    // It is tried again after its backoff, and serves once init succeeds.
    std::fs::remove_file(&marker).unwrap();
    let (again, _) = worker_pid(&host, Duration::from_secs(15));
    assert_ne!(again, first);
    host.wait_for_log(&["server=bad", "worker process restarted"]);
}

/// Every event `server` has handled so far, as `payload` lines (its topic is always
/// `fixture.events`), waiting (up to 10 s) until there are `count`.
fn events_seen(host: &Host, server: &str, count: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let reply = host.get(&format!("{server}.localhost"), "/events");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let seen: Vec<String> = reply
            .body
            .lines()
            .map(|l| {
                l.strip_prefix("fixture.events:")
                    .expect("the topic")
                    .to_owned()
            })
            .collect();
        if seen.len() >= count || started.elapsed() > Duration::from_secs(10) {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bus_events_cross_into_and_out_of_a_worker_in_order() {
    let config = r#"{
      "servers": [
        {"name": "w", "domains": ["w.localhost"], "plugin": "w", "isolation": "process"},
        {"name": "p", "domains": ["p.localhost"], "plugin": "p"}
      ]
    }"#;
    let host = Setup::new("iso-bus", config)
        .plugin("fixture-sockets", "w.so")
        .plugin("fixture-sockets", "p.so")
        .start();
    let publish = |from: &str, payload: &str| crate::bus::publish(&host, from, payload);
    // From the host into the worker: both servers subscribe, and the host counts both.
    assert_eq!(publish("p", "p0"), "2");
    // Out of the worker: handed to the host (1), which publishes it to both.
    assert_eq!(publish("w", "w0"), "1");
    for i in 1..=30 {
        publish("p", &format!("p{i}"));
        publish("w", &format!("w{i}"));
    }
    let expected = |prefix: &str| (0..=30).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    for server in ["w", "p"] {
        let seen = events_seen(&host, server, 62);
        // Each publisher's events arrive once each, in the order published (the two
        // publishers' events may interleave either way).
        let from = |prefix: &str| {
            seen.iter()
                .filter(|e| e.starts_with(prefix))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(from("p"), expected("p"), "at {server}: {seen:?}");
        assert_eq!(from("w"), expected("w"), "at {server}: {seen:?}");
        assert_eq!(seen.len(), 62, "at {server}: {seen:?}");
    }
    // An event handler that panics in the worker is reported, and the next event
    // still arrives.
    publish("p", "panic");
    publish("p", "after");
    let seen = events_seen(&host, "w", 64);
    assert_eq!(seen[62..], ["panic", "after"]);
    // The worker's log lines name it, and its pid.
    host.wait_for_log(&["the fixture panics on an event", "server=w", " worker_pid="]);
    // A client cannot pass its request off as a bus event: the header is removed, and
    // the request is routed as any other.
    let forged = host.send(
        "POST",
        "w.localhost",
        "/publish/fixture.events",
        b"forged",
        &[("x-plugin-host-event", "bus")],
    );
    assert_eq!((forged.status, forged.body.as_str()), (200, "1"));
    assert_eq!(
        events_seen(&host, "w", 65).last().map(String::as_str),
        Some("forged")
    );
    assert!(
        !host.logs().contains("cannot deliver bus events"),
        "{}",
        host.logs()
    );
}

#[test]
fn a_workers_init_can_call_other_servers() {
    // The call's answer comes on the worker's stdin while init still runs (before the
    // worker is ready): a worker that read its stdin only once ready never got it.
    let config = |n: u32| {
        format!(
            r#"{{
      "global": {{"limits": {{"request_timeout_ms": 3000}}, "reload": {{"debounce_ms": 20}}}},
      "servers": [
        {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}},
        {{"name": "t", "domains": ["t.localhost"], "plugin": "tasks", "isolation": "process",
         "config": {{"init_call": "hello/plain", "n": {n}}}}}
      ]
    }}"#
        )
    };
    let host = Setup::new("iso-init-call", &config(1))
        .plugin("hello", "hello.so")
        .plugin("fixture-tasks", "tasks.so")
        .start();
    // At start-up, before every server is up, calls are not taken yet.
    let reply = host.get("t.localhost", "/init-call");
    assert_call_answered_503(&reply, "the host is still starting");
    // A new worker (its config changed) calls the server in the host from its init.
    host.write_config(&config(2));
    host.wait_until("the new worker's init made its call", || {
        host.get("t.localhost", "/init-call").body == "200 Hello, world!\n"
    });
    assert_eq!(host.get("t.localhost", "/n").body, "2");
}

/// A fixture's report of a service call (`<status> <body>`): 503, saying `why`.
fn assert_call_answered_503(reply: &Reply, why: &str) {
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.body.starts_with("503 ") && reply.body.contains(why),
        "{}",
        reply.body
    );
}

#[test]
fn a_workers_commands_do_not_queue_behind_each_other() {
    // Four health checks of a worker whose health hook hangs: each gives up after the
    // hook's 1 s, all at once; queued one behind another they took 4 s and more.
    let host = crashy("iso-health");
    let set = host.get("bad.localhost", "/health/hang");
    assert_eq!(set.status, 200, "{}", set.body);
    let admin = host.admin();
    let started = Instant::now();
    let checks: Vec<_> = (0..4)
        .map(|_| {
            let admin = admin.clone();
            std::thread::spawn(move || admin.get("admin", "/health/servers/bad").json())
        })
        .collect();
    for check in checks {
        let health = check.join().unwrap();
        assert_eq!(health["health"]["ok"], false, "{health}");
        let said = health["health"].to_string();
        assert!(
            said.contains("did not answer") || said.contains("timed out"),
            "{health}"
        );
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "four health checks took {took:?}"
    );
    // A late reply is never taken for a later command's.
    host.get("bad.localhost", "/health/ok");
    let health = host.admin().get("admin", "/health/servers/bad").json();
    assert_eq!(health["health"]["ok"], true, "{health}");
}

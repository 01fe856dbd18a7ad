//! Bulkheads in process: a server whose handlers block their thread holds at most
//! `servers[].max_threads` of the runtime's worker threads, so the others keep
//! answering; and the watchdog names the server and route that block.

use std::time::{Duration, Instant};

use crate::support::Setup;

fn config(global_extra: &str, bad_extra: &str) -> String {
    format!(
        r#"{{
          "global": {{"plugin_dir": "plugins", "blocking_warn_ms": 100{global_extra},
                      "limits": {{"request_timeout_ms": 30000}}}},
          "servers": [
            {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}},
            {{"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave"{bad_extra}}}
          ]
        }}"#
    )
}

#[test]
fn handlers_that_block_their_thread_do_not_stall_another_server() {
    // Two worker threads, as on the 2-core machine where this was seen to stall hello
    // for 5.7 s: by default a server may hold one of them.
    let host = Setup::new("bulkhead", &config("", ""))
        .plugin("hello", "hello.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .env("TOKIO_WORKER_THREADS", "2")
        .start();
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    let blocked_for = Duration::from_millis(1500);
    let started = Instant::now();
    let mut latencies = Vec::new();
    std::thread::scope(|s| {
        // Four handlers that block their thread: two in their first poll, two in a
        // later one.
        let blockers: Vec<_> = ["/block", "/block", "/block-later", "/block-later"]
            .into_iter()
            .map(|path| {
                let host = &host;
                s.spawn(move || {
                    host.get(
                        "bad.localhost",
                        &format!("{path}?ms={}", blocked_for.as_millis()),
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        // Meanwhile, hello on a connection of its own, request after request.
        let mut conn = host.connect();
        while latencies.len() < 200 && started.elapsed() < blocked_for * 3 {
            let t = Instant::now();
            let reply = conn.get("hello.localhost", "/").expect("hello answers");
            latencies.push(t.elapsed());
            assert_eq!(reply.status, 200);
            std::thread::sleep(Duration::from_millis(10));
        }
        for blocker in blockers {
            let reply = blocker.join().unwrap();
            assert_eq!((reply.status, reply.body.as_str()), (200, "blocked 1500"));
        }
    });
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    let max = latencies.last().unwrap();
    println!(
        "hello while bad blocked its threads: {} requests, p50 {:?}, p99 {p99:?}, max {max:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
    );
    // A behaviour check, not a benchmark: without the bound hello waited for the
    // blocked threads (p99 0.9 s with 1 s blocks; 5.7 s seen with 3 s blocks).
    assert!(p99 < blocked_for / 3, "p99 {p99:?}");
    // The blocking requests shared one thread, one after another.
    assert!(
        started.elapsed() >= blocked_for * 4,
        "{:?}",
        started.elapsed()
    );
    // The watchdog names the server and each route (repeats within 5 s are summed up
    // in one line later).
    for route in ["route=GET /block ", "route=GET /block-later "] {
        let line = host.wait_for_log(&["has held a runtime thread", route]);
        assert!(
            line.contains(" WARN ") && line.contains("server=bad"),
            "{line}"
        );
    }
}

#[test]
fn max_threads_lets_a_server_use_more_threads_at_once() {
    let host = Setup::new("bulkhead-wide", &config("", r#", "max_threads": 3"#))
        .plugin("hello", "hello.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .env("TOKIO_WORKER_THREADS", "4")
        .start();
    let started = Instant::now();
    std::thread::scope(|s| {
        let blockers: Vec<_> = (0..3)
            .map(|_| s.spawn(|| host.get("bad.localhost", "/block?ms=800")))
            .collect();
        for blocker in blockers {
            assert_eq!(blocker.join().unwrap().status, 200);
        }
    });
    // Three at once, not one after another (2.4 s).
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn bad_bulkhead_settings_are_refused_naming_their_path() {
    for (extra, global, path) in [
        (r#", "max_threads": 0"#, "", "servers[1].max_threads"),
        (r#", "max_threads": "two""#, "", "servers[1].max_threads"),
        ("", r#", "blocking_warn_ms": -1"#, "global.blocking_warn_ms"),
    ] {
        // A repeated key keeps its last value (serde_json), so the bad one counts.
        let out = Setup::new("bulkhead-config", &config(global, extra)).run(&["--check"]);
        assert_eq!(out.status.code(), Some(2), "{extra}{global}: {out:?}");
        assert!(out.stderr.contains(path), "{path}: {}", out.stderr);
    }
}

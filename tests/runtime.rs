//! Plugins with a tokio runtime of their own (`export_plugin!(T, tokio)`): ordinary tokio
//! code in init, handlers and background tasks, and the runtime's life per generation.

use std::time::{Duration, Instant};

use crate::support::{Host, Setup};

fn tasks_config(n: u64) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20, "drain_timeout_ms": 2000}}}},
      "servers": [{{"name": "tasks", "domains": ["tasks.localhost"], "plugin": "tasks",
                   "config": {{"n": {n}}}}},
                  {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    )
}

fn tasks_host(label: &str) -> Host {
    Setup::new(label, &tasks_config(1))
        .plugin("fixture-tasks", "tasks.so")
        .plugin("hello", "hello.so")
        .start()
}

fn body(host: &Host, path: &str) -> String {
    let reply = host.get("tasks.localhost", path);
    assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    reply.body
}

/// How many entries `/proc/PID/{what}` has: `task` for threads, `fd` for open file
/// descriptors.
fn proc_count(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}"))
        .unwrap()
        .count()
}

fn threads(pid: u32) -> usize {
    proc_count(pid, "task")
}

#[test]
fn tokio_works_in_init_handlers_and_background_tasks() {
    let host = tasks_host("tokio-works");
    // A background task started in init keeps running between requests.
    let first: u64 = body(&host, "/ticks").parse().unwrap();
    host.wait_until("the ticker ticks", || {
        body(&host, "/ticks").parse::<u64>().unwrap() > first + 3
    });
    // Timers, spawned tasks, the blocking pool and sockets, from a handler.
    let slept: u64 = body(&host, "/sleep?ms=60").parse().unwrap();
    assert!(slept >= 60, "tokio::time::sleep returned after {slept} ms");
    assert_eq!(body(&host, "/spawn"), "42");
    assert!(body(&host, "/blocking").starts_with("fixture-tas-rt"));
    assert_eq!(body(&host, "/echo?text=round%20trip"), "round trip");
    assert_eq!(body(&host, "/host-sleep-in-task"), "slept");
    // Many at once, interleaved on the host's threads.
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let addr = host.addr;
            std::thread::spawn(move || {
                let client = crate::support::Host::at(addr);
                client
                    .get("tasks.localhost", &format!("/echo?text=n{i}"))
                    .body
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), format!("n{i}"));
    }
    // A plugin without a runtime is untouched beside it.
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn a_panic_in_a_spawned_task_is_logged_with_the_plugin_and_nothing_else_happens() {
    let host = tasks_host("task-panic");
    assert_eq!(body(&host, "/task-panic"), "spawned");
    let line = host.wait_for_log(&["task exploded"]);
    assert!(
        line.contains("fixture-tasks") && line.contains("ERROR"),
        "the panic names the plugin: {line}"
    );
    assert_eq!(body(&host, "/spawn"), "42");
    let ticks: u64 = body(&host, "/ticks").parse().unwrap();
    host.wait_until("the ticker still ticks", || {
        body(&host, "/ticks").parse::<u64>().unwrap() > ticks
    });
}

#[test]
fn each_generation_has_its_runtime_and_reloads_leave_no_threads_behind() {
    let host = tasks_host("runtime-threads");
    assert_eq!(body(&host, "/n"), "1");
    // One reload first, so that everything the host starts once has started.
    host.write_config(&tasks_config(2));
    host.wait_until("generation 2 serves", || body(&host, "/n") == "2");
    // Generation 1's tasks were cancelled after its shutdown hook.
    host.wait_for_log(&["tasks shutdown hook ran"]);
    host.wait_for_log(&["background task dropped", "task=\"ticker\""]);
    host.wait_for_log(&["background task dropped", "task=\"echo\""]);
    let pid = host.pid();
    let settled = |host: &Host| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = threads(pid);
        // The count is read until it holds still for a moment (a retired generation's
        // threads end shortly after its hook).
        let mut still_since = Instant::now();
        while Instant::now() < deadline && still_since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(50));
            let now = threads(pid);
            if now != last {
                last = now;
                still_since = Instant::now();
            }
        }
        let _ = host;
        last
    };
    let after_first = settled(&host);
    for n in 3..=52 {
        host.write_config(&tasks_config(n));
        host.wait_until("the new generation serves", || {
            body(&host, "/n") == n.to_string()
        });
    }
    assert_eq!(body(&host, "/spawn"), "42");
    // No more than after the first (fewer is fine: an idle pool thread of the host's
    // may end meanwhile).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = settled(&host);
    while now > after_first && Instant::now() < deadline {
        now = settled(&host);
    }
    assert!(
        now <= after_first,
        "threads after 50 more reloads: {now}, after the first: {after_first}"
    );
    assert_eq!(
        host.count_log_lines(&["background task dropped", "task=\"ticker\""]),
        51
    );
}

#[test]
fn new_builds_of_a_tokio_plugin_leave_no_threads_or_descriptors_behind() {
    let host = tasks_host("runtime-builds");
    let library = std::fs::read(crate::support::library("fixture-tasks")).unwrap();
    // Each install is a new build to the host (different bytes), loaded from a copy of
    // its own, as a developer's rebuild is.
    let install = |n: usize| {
        let mut bytes = library.clone();
        bytes.extend_from_slice(format!("build {n}").as_bytes());
        host.install_bytes(&bytes, "tasks.so");
        host.wait_until("the new build serves", || {
            host.count_log_lines(&["reloaded", "server=tasks"]) >= n
        });
    };
    install(1);
    let pid = host.pid();
    let settle = || {
        std::thread::sleep(Duration::from_millis(500));
        (threads(pid), proc_count(pid, "fd"))
    };
    let first = settle();
    for n in 2..=11 {
        install(n);
    }
    assert_eq!(body(&host, "/spawn"), "42");
    // No more than after the first (fewer is fine: an idle pool thread of the host's
    // may end meanwhile).
    let grew = |now: (usize, usize)| now.0 > first.0 || now.1 > first.1;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = settle();
    while grew(now) && Instant::now() < deadline {
        now = settle();
    }
    assert!(
        !grew(now),
        "(threads, descriptors) after 10 more builds: {now:?}, after the first: {first:?}"
    );
}

#[test]
fn reloading_a_tokio_plugin_under_load_fails_no_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let host = tasks_host("runtime-load");
    let library = std::fs::read(crate::support::library("fixture-tasks")).unwrap();
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let served = Mutex::new(0usize);
    std::thread::scope(|s| {
        for i in 0..4 {
            let (stop, failures, served, host) = (&stop, &failures, &served, &host);
            s.spawn(move || {
                // Handlers that await a tokio timer and a spawned task, so that requests are
                // in flight inside the runtime when its generation is replaced.
                let path = if i % 2 == 0 { "/sleep?ms=3" } else { "/spawn" };
                let ok = |r: &crate::support::Reply| r.status == 200;
                let n = host.ask_until("tasks.localhost", path, ok, stop, failures);
                *served.lock().unwrap() += n;
            });
        }
        for n in 1..=10 {
            let mut bytes = library.clone();
            bytes.extend_from_slice(format!("load build {n}").as_bytes());
            host.install_bytes(&bytes, "tasks.so");
            host.wait_until("the new build serves", || {
                host.count_log_lines(&["reloaded", "server=tasks"]) >= n
            });
        }
        // The last replaced generation drains too.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(*served.lock().unwrap() > 100, "the load barely ran");
    host.wait_until("the ten replaced generations ran their hooks", || {
        host.count_log_lines(&["tasks shutdown hook ran"]) >= 10
    });
    assert_eq!(host.count_log_lines(&["tasks shutdown hook ran"]), 10);
}

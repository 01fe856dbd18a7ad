//! `cargo xtask bench-sse`: many clients each listening to a server-sent event stream
//! (hello's `/events`) at a fixed rate; reports the events delivered and the host's CPU,
//! resident memory and threads while it serves them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::bench::{host_cmd, prepare, proc_status, tool, CpuTimes, Target};
use crate::{cargo, root};

pub fn run(args: &[String]) -> Result<()> {
    let num = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let clients = num("--clients", 1000) as usize;
    let rate = num("--rate", 10).max(1);
    let seconds = num("--seconds", 10).max(1);
    let every_ms = 1000 / rate;

    let root = root();
    let out = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    println!("building the host and the hello plugin (release)...");
    let status = cargo()
        .args(["build", "--release", "-p", "host", "-p", "hello"])
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(status.success(), "building failed");
    let release = crate::target_dir().join("release");
    let dir = out.join("sse");
    let hello = release.join(format!("libhello{}", std::env::consts::DLL_SUFFIX));
    let config = json!({"global": {"reload": {"watch": false}, "connections": {"max": 1_000_000, "max_per_ip": 0}},
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]});
    prepare(&dir, &config.to_string(), &[(hello, "hello")])?;
    // The host on core 0, the clients (this process) elsewhere, as in `cargo xtask bench`.
    let mut cmd = match tool("taskset") {
        Some(t) => {
            let mut c = Command::new(t);
            c.args(["-c", "0"]).arg(release.join("host"));
            c
        }
        None => Command::new(release.join("host")),
    };
    let mut host = Target::start("host", "hello.localhost", host_cmd(&mut cmd, &dir))?;
    let pid = host.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = proc_status(pid, "VmRSS:");

    println!("{clients} clients, {rate} events/s each, measured for {seconds} s...");
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, events, connected) = (stop.clone(), events.clone(), connected.clone());
            let addr = host.addr;
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || listen(addr, every_ms, &stop, &events, &connected))
        })
        .collect::<std::io::Result<_>>()
        .context("starting the client threads")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (connected.load(Ordering::Relaxed) as usize) < clients {
        anyhow::ensure!(Instant::now() < deadline, "the clients did not all connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Warm-up: every stream has started.
    std::thread::sleep(Duration::from_secs(2));
    let (events_0, cpu_0, started) = (
        events.load(Ordering::Relaxed),
        CpuTimes::read(&[pid]),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (events_1, cpu_1, took) = (
        events.load(Ordering::Relaxed),
        CpuTimes::read(&[pid]),
        started.elapsed(),
    );
    let rss = proc_status(pid, "VmRSS:");
    let threads = proc_status(pid, "Threads:");
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    host.stop();

    let delivered = events_1 - events_0;
    let expected = clients as f64 * rate as f64 * took.as_secs_f64();
    let cpu_s = cpu_1.since(&cpu_0) as f64 / 1e9;
    let report = json!({
        "clients": clients,
        "events_per_s_each": rate,
        "seconds": took.as_secs_f64(),
        "events_delivered": delivered,
        "events_expected": expected,
        "host_cpu_percent_of_one_core": 100.0 * cpu_s / took.as_secs_f64(),
        "host_cpu_us_per_event": cpu_s * 1e6 / delivered.max(1) as f64,
        "host_rss_idle_kib": idle_rss,
        "host_rss_kib": rss,
        "host_rss_per_client_kib": (rss as f64 - idle_rss as f64) / clients as f64,
        "host_threads": threads,
    });
    std::fs::write(out.join("sse.json"), serde_json::to_string_pretty(&report)?)?;
    println!("\n## Server-sent events: {clients} clients x {rate} events/s (hello /events)\n");
    println!("| measure | value |\n|---|---|");
    println!(
        "| events delivered / expected | {delivered} / {expected:.0} ({:.1}%) |",
        100.0 * delivered as f64 / expected
    );
    println!(
        "| host CPU | {:.1}% of one core, {:.1} us per event |",
        report["host_cpu_percent_of_one_core"]
            .as_f64()
            .unwrap_or(0.0),
        report["host_cpu_us_per_event"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| host resident memory idle -> with the clients | {idle_rss} KiB -> {rss} KiB ({:.1} KiB per client) |",
        report["host_rss_per_client_kib"].as_f64().unwrap_or(0.0)
    );
    println!("| host threads | {threads} |");
    println!("\nraw figures: {}", out.join("sse.json").display());
    Ok(())
}

/// One client: opens the stream and counts the events (each ends with a blank line).
fn listen(
    addr: SocketAddr,
    every_ms: u64,
    stop: &AtomicBool,
    events: &AtomicU64,
    connected: &AtomicU64,
) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let request =
        format!("GET /events?every_ms={every_ms} HTTP/1.1\r\nhost: hello.localhost\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    connected.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 4096];
    let mut last = 0u8;
    while !stop.load(Ordering::Relaxed) {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(_) => continue,
        };
        let mut seen = 0;
        for &b in &buf[..n] {
            if b == b'\n' && last == b'\n' {
                seen += 1;
            }
            last = b;
        }
        events.fetch_add(seen, Ordering::Relaxed);
    }
}

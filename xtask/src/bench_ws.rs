//! `cargo xtask bench-ws`: WebSockets through the host, against a bare tokio-tungstenite
//! echo server (`bench/src/bin/ws_baseline.rs`), with the sockets test fixture as the
//! plugin:
//!
//! 1. echo, side by side: the host and the baseline share core 0, each with its own
//!    load generator (`ws-load echo`) on core 1 at the same time; server CPU per
//!    message, and messages per second, host over baseline, per round and median;
//! 2. idle connections: N connections opened and left idle (host memory per
//!    connection);
//! 3. one broadcast to all N (time until the last has it);
//! 4. the N connections held while the plugin is replaced 20 times (alternating two
//!    builds), then each asked to answer: how many were closed.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::bench::{host_cmd, prepare, proc_status, tool, Target};
use crate::{cargo, root};

pub fn run(args: &[String]) -> Result<()> {
    let num = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let rounds = num("--rounds", 5).max(1) as usize;
    let seconds = num("--duration", 3).max(1);
    let echo_conns = num("--echo-connections", 64).max(1);
    let held = num("--connections", 10_000).max(1) as usize;
    let reloads = num("--reloads", 20) as usize;
    raise_fd_limit();

    let root = root();
    let out = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    println!("building the host, the WebSocket baseline and load generator, and the fixture (release)...");
    let build = |args: &[&str], env: Option<(&str, &str)>| -> Result<()> {
        let mut cmd = cargo();
        cmd.arg("build")
            .arg("--release")
            .args(args)
            .current_dir(&root);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        anyhow::ensure!(cmd.status()?.success(), "building {args:?} failed");
        Ok(())
    };
    build(&["-p", "host"], None)?;
    build(
        &["-p", "bench", "--bin", "ws-baseline", "--bin", "ws-load"],
        None,
    )?;
    let release = crate::target_dir().join("release");
    let fixture = release.join(format!(
        "libfixture_sockets{}",
        std::env::consts::DLL_SUFFIX
    ));
    build(&["-p", "fixture-sockets"], Some(("FIXTURE_VARIANT", "v2")))?;
    let v2 = out.join(format!(
        "fixture-sockets-v2{}",
        std::env::consts::DLL_SUFFIX
    ));
    std::fs::copy(&fixture, &v2)?;
    build(&["-p", "fixture-sockets"], Some(("FIXTURE_VARIANT", "v1")))?;
    let v1 = out.join(format!(
        "fixture-sockets-v1{}",
        std::env::consts::DLL_SUFFIX
    ));
    std::fs::copy(&fixture, &v1)?;

    let taskset = tool("taskset");
    let pin = |cmd: &Path, core: u32| -> Command {
        match &taskset {
            Some(t) => {
                let mut c = Command::new(t);
                c.arg("-c").arg(core.to_string()).arg(cmd);
                c
            }
            None => Command::new(cmd),
        }
    };
    let dir = out.join("ws");
    let config = json!({"global": {"reload": {"debounce_ms": 20, "drain_timeout_ms": 2000}, "connections": {"max": 1_000_000, "max_per_ip": 0},
                                   "websocket": {"max_connections": held + 100}},
        "servers": [{"name": "sockets", "domains": ["sockets.localhost"], "plugin": "sockets"}]});
    prepare(&dir, &config.to_string(), &[(v1.clone(), "sockets")])?;
    let load = release.join("ws-load");

    // 1. Echo, side by side.
    println!(
        "\n1. echo: {echo_conns} connections each, 32-byte binary messages, {rounds} rounds of {seconds} s, side by side on core 0"
    );
    let mut host = Target::start(
        "host",
        "sockets.localhost",
        host_cmd(&mut pin(&release.join("host"), 0), &dir),
    )?;
    let mut baseline = Target::start(
        "ws-baseline",
        "",
        pin(&release.join("ws-baseline"), 0).args(["--listen", "127.0.0.1:0"]),
    )?;
    let mut cpu_ratios = Vec::new();
    let mut rate_ratios = Vec::new();
    let mut rows = Vec::new();
    for round in 0..=rounds {
        let run = |addr: SocketAddr, domain: &str| -> Result<std::process::Child> {
            Ok(pin(&load, 1)
                .arg("echo")
                .arg(addr.to_string())
                .arg(domain)
                .arg("/ws")
                .arg(echo_conns.to_string())
                .arg(seconds.to_string())
                .stdout(Stdio::piped())
                .spawn()?)
        };
        let (h0, b0) = (host.cpu_times(), baseline.cpu_times());
        let on_host = run(host.addr, "sockets.localhost")?;
        let on_baseline = run(baseline.addr, "localhost")?;
        let messages = |child: std::process::Child| -> Result<u64> {
            let output = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&output.stdout);
            text.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("ws-load said {text:?}"))
        };
        let (host_msgs, base_msgs) = (messages(on_host)?, messages(on_baseline)?);
        let host_ns = host.cpu_times().since(&h0) as f64 / host_msgs.max(1) as f64;
        let base_ns = baseline.cpu_times().since(&b0) as f64 / base_msgs.max(1) as f64;
        if round == 0 {
            println!("   (warm-up round not counted)");
            continue;
        }
        let (cpu, rate) = (host_ns / base_ns, host_msgs as f64 / base_msgs as f64);
        println!(
            "   round {round}: host {:.2} µs/msg ({host_msgs} msgs), baseline {:.2} µs/msg ({base_msgs} msgs): CPU {cpu:.3}x, messages/s {rate:.3}x",
            host_ns / 1000.0,
            base_ns / 1000.0
        );
        cpu_ratios.push(cpu);
        rate_ratios.push(rate);
        rows.push(
            json!({"host_ns_per_msg": host_ns, "baseline_ns_per_msg": base_ns,
                         "host_msgs": host_msgs, "baseline_msgs": base_msgs}),
        );
    }
    baseline.stop();
    host.stop();
    let echo_cpu = median(&mut cpu_ratios);
    let echo_rate = median(&mut rate_ratios);
    println!("   median: CPU per message {echo_cpu:.3}x, messages/s {echo_rate:.3}x (goal: CPU within 1.10x)");

    // 2-4. Many connections: memory, a broadcast, reloads.
    println!("\n2. {held} idle connections, 3. a broadcast to all, 4. {reloads} reloads while they are open");
    prepare(&dir, &config.to_string(), &[(v1.clone(), "sockets")])?;
    let mut host = Target::start(
        "host",
        "sockets.localhost",
        host_cmd(&mut pin(&release.join("host"), 0), &dir),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = host.child.id();
    let rss_before = proc_status(pid, "VmRSS:");
    let mut holder = pin(&load, 1)
        .arg("hold")
        .arg(host.addr.to_string())
        .arg("sockets.localhost")
        .arg("/ws")
        .arg(held.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut said = BufReader::new(holder.stdout.take().context("stdout")?).lines();
    let mut ask = holder.stdin.take().context("stdin")?;
    let mut answer = |command: &str| -> Result<String> {
        if !command.is_empty() {
            writeln!(ask, "{command}")?;
            ask.flush()?;
        }
        said.next()
            .context("ws-load ended")?
            .map_err(anyhow::Error::from)
    };
    let opened = answer("")?;
    println!("   {opened}");
    std::thread::sleep(Duration::from_secs(2));
    let rss_open = proc_status(pid, "VmRSS:");
    let per_conn_kib = (rss_open.saturating_sub(rss_before)) as f64 / held as f64;
    println!(
        "   host RSS {rss_before} KiB idle, {rss_open} KiB with {held} connections: {per_conn_kib:.2} KiB per connection (goal: at most 10 KiB)"
    );
    let mut broadcasts = Vec::new();
    for _ in 0..3 {
        let line = answer("broadcast")?;
        println!("   {line}");
        if let Some(ms) = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            broadcasts.push(ms);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let broadcast_ms = median(&mut broadcasts);
    let started = Instant::now();
    for round in 0..reloads {
        let (lib, variant) = if round % 2 == 0 {
            (&v2, "v2")
        } else {
            (&v1, "v1")
        };
        install(
            lib,
            &dir.join("plugins")
                .join(format!("sockets{}", std::env::consts::DLL_SUFFIX)),
        )?;
        wait_for_variant(host.addr, variant)?;
    }
    let reload_s = started.elapsed().as_secs_f64();
    let check = answer("check")?;
    println!("   after {reloads} reloads ({reload_s:.1} s): {check}");
    let closed: usize = check
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    // The host goes first: closing 10,000 connections from the client side would have
    // the fixture announce each close to all the others.
    host.stop();
    let _ = answer("quit");
    let _ = holder.kill();
    let _ = holder.wait();

    println!("\nsummary");
    println!("   echo CPU per message, host over bare tokio-tungstenite: {echo_cpu:.3}x (messages/s {echo_rate:.3}x)");
    println!("   host memory per idle connection: {per_conn_kib:.2} KiB");
    println!("   one broadcast to {held} connections: {broadcast_ms:.1} ms until the last has it (median of 3)");
    println!("   {held} connections across {reloads} reloads: {closed} closed");
    let report = json!({
        "echo": {"cpu_ratio": echo_cpu, "rate_ratio": echo_rate, "rounds": rows,
                 "connections": echo_conns, "seconds": seconds},
        "idle_kib_per_connection": per_conn_kib,
        "broadcast_ms": broadcast_ms,
        "held": held, "reloads": reloads, "closed_during_reloads": closed,
    });
    std::fs::write(
        out.join("bench-ws.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("   (written to target/bench/bench-ws.json)");
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Installs a library as the host expects: a hidden temporary name, then a rename.
fn install(from: &PathBuf, to: &Path) -> Result<()> {
    let tmp = to.with_file_name(".sockets.tmp");
    std::fs::copy(from, &tmp)?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// Waits until the fixture answers `GET /variant` with `variant` (the reload is done).
fn wait_for_variant(addr: SocketAddr, variant: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /variant HTTP/1.1\r\nhost: sockets.localhost\r\nconnection: close\r\n\r\n"
        )?;
        let mut reply = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut reply);
        if reply.ends_with(variant) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the host did not switch to {variant}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises this process's open-file limit to its hard limit (the servers and load
/// generators started from here inherit it): each held connection costs a descriptor
/// on both sides.
fn raise_fd_limit() {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit with a valid struct.
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

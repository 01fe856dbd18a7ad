//! `cargo xtask bench-reload`: replace a plugin library N times under load and report
//! failed requests, reload latency, and the host's memory, threads and file descriptors
//! before and after.
//!
//! The plugin is `tests/fixtures/versioned`, built in release twice (variants `a` and
//! `b`); like the examples it uses serde, tracing and std. Each install appends a unique
//! trailer to the library, so every reload loads a fresh, never-seen build (the host
//! skips identical bytes), which is what a developer's rebuild looks like to the host.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{cargo, root};

const DEBOUNCE_MS: u64 = 50;

pub fn run(args: &[String]) -> Result<()> {
    let reloads: usize = flag(args, "--reloads").unwrap_or(50);
    let clients: usize = flag(args, "--clients").unwrap_or(4);
    // `--tokio`: the plugin runs a tokio runtime of its own (2 worker threads and a
    // background task per generation).
    let tokio = args.iter().any(|a| a == "--tokio");
    // `--process`: the server's plugin runs in a worker process (`isolation:
    // "process"`); memory, threads and descriptors are the host's and its workers'.
    let process = args.iter().any(|a| a == "--process");
    let root = root();
    let out_dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;

    println!("building the host and two builds of the versioned fixture (release)...");
    let status = cargo()
        .args(["build", "--release", "-p", "host"])
        .current_dir(&root)
        .status()?;
    anyhow::ensure!(status.success(), "building the host failed");
    let a = build_variant("a", tokio, &out_dir)?;
    let b = build_variant("b", tokio, &out_dir)?;

    let run_dir = out_dir.join("reload-run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(run_dir.join("plugins"))?;
    std::fs::write(
        run_dir.join("servers.config.json"),
        json!({
            "global": {"reload": {"debounce_ms": DEBOUNCE_MS}},
            "servers": [{"name": "v", "domains": ["v.localhost"], "plugin": "versioned",
                         "config": {"label": "bench"},
                         "isolation": if process { "process" } else { "in_process" }}]
        })
        .to_string(),
    )?;
    install(&a, &run_dir, 0)?;
    let mut host = Host::start(&crate::target_dir().join("release/host"), &run_dir)?;
    let pid = host.child.id();

    // Load: `clients` keep-alive connections asking as fast as they can.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let watch: Arc<Mutex<Option<Expect>>> = Arc::default();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, ok, failed, watch, addr) = (
                stop.clone(),
                ok.clone(),
                failed.clone(),
                watch.clone(),
                host.addr,
            );
            std::thread::spawn(move || load(addr, &stop, &ok, &failed, &watch))
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    let before = Proc::read(pid)?;
    let mut latencies = Vec::with_capacity(reloads);
    for i in 1..=reloads {
        let (lib, variant) = if i % 2 == 1 { (&b, "b") } else { (&a, "a") };
        let start = Instant::now();
        *watch.lock().unwrap() = Some(Expect {
            variant: variant.to_owned(),
            seen: None,
        });
        install(lib, &run_dir, i)?;
        let seen = loop {
            if let Some(seen) = watch.lock().unwrap().as_ref().and_then(|e| e.seen) {
                break seen;
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "reload {i} was not observed within 20 s; host log:\n{}",
                    host.log()
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        latencies.push(seen.duration_since(start));
        // Let the replaced generation drain and retire before the next swap.
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = Proc::read(pid)?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let log = host.log();
    host.stop();

    let work_ms: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("reloaded server=v"))
        .filter_map(|l| {
            l.split("work_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let mut observed_ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let failures = failed.lock().unwrap().clone();
    let report = json!({
        "reloads": reloads,
        "clients": clients,
        "plugin_runtime": if tokio { "tokio" } else { "none" },
        "isolation": if process { "process" } else { "in_process" },
        "requests_ok": ok.load(Ordering::Relaxed),
        "requests_failed": failures.len(),
        "failures": failures.iter().take(20).collect::<Vec<_>>(),
        "debounce_ms": DEBOUNCE_MS,
        "observed_latency_ms": summary(&mut observed_ms),
        "observed_minus_debounce_ms": summary(&mut observed_ms.iter().map(|v| v - DEBOUNCE_MS as f64).collect::<Vec<_>>()),
        "host_work_ms": summary(&mut work_ms.clone()),
        "before": before.json(),
        "after": after.json(),
        "rss_growth_per_reload_kib": (after.rss_kib as f64 - before.rss_kib as f64) / reloads as f64,
    });
    std::fs::write(
        out_dir.join("reload.json"),
        serde_json::to_string_pretty(&report)?,
    )?;

    let s = |k: &str, f: &str| report[k][f].as_f64().unwrap_or(f64::NAN);
    let runtime = match (tokio, process) {
        (true, false) => ", the plugin with a tokio runtime of its own",
        (false, true) => ", the plugin in a worker process; figures for host + worker",
        (true, true) => {
            ", the plugin in a worker process with a tokio runtime; figures for host + worker"
        }
        (false, false) => "",
    };
    println!(
        "\n## Hot reload under load ({reloads} reloads, {clients} keep-alive clients{runtime})\n"
    );
    println!("| measure | value |\n|---|---|");
    println!(
        "| requests served / failed | {} / {} |",
        report["requests_ok"],
        failures.len()
    );
    println!(
        "| file rename -> first response from new build (median / max) | {:.1} ms / {:.1} ms |",
        s("observed_latency_ms", "median"),
        s("observed_latency_ms", "max")
    );
    println!(
        "| same, minus the {DEBOUNCE_MS} ms debounce window (median / max) | {:.1} ms / {:.1} ms |",
        s("observed_minus_debounce_ms", "median"),
        s("observed_minus_debounce_ms", "max")
    );
    println!(
        "| host work per reload: read, copy, dlopen, checks, init, swap (median / max) | {:.2} ms / {:.2} ms |",
        s("host_work_ms", "median"),
        s("host_work_ms", "max")
    );
    println!(
        "| resident memory before -> after | {} KiB -> {} KiB ({:+.0} KiB per reload) |",
        before.rss_kib,
        after.rss_kib,
        report["rss_growth_per_reload_kib"].as_f64().unwrap_or(0.0)
    );
    println!(
        "| of which file-backed / anonymous after | {} KiB / {} KiB |",
        after.rss_file_kib, after.rss_anon_kib
    );
    println!(
        "| threads before -> after | {} -> {} |",
        before.threads, after.threads
    );
    println!(
        "| open file descriptors before -> after | {} -> {} |",
        before.fds, after.fds
    );
    println!("\nraw figures: {}", out_dir.join("reload.json").display());
    if !failures.is_empty() {
        bail!("{} requests failed during reloads", failures.len());
    }
    Ok(())
}

fn flag(args: &[String], name: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn build_variant(variant: &str, tokio: bool, out_dir: &Path) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "fixture-versioned"]);
    if tokio {
        cmd.args(["--features", "tokio"]);
    }
    let status = cmd
        .env("FIXTURE_VARIANT", variant)
        .current_dir(root())
        .status()?;
    anyhow::ensure!(status.success(), "building variant {variant} failed");
    let built = root().join(format!(
        "target/release/libfixture_versioned{}",
        std::env::consts::DLL_SUFFIX
    ));
    let copy = out_dir.join(format!(
        "versioned-{variant}{}",
        std::env::consts::DLL_SUFFIX
    ));
    std::fs::copy(&built, &copy).with_context(|| format!("copying {}", built.display()))?;
    Ok(copy)
}

/// Installs `lib` as `plugins/versioned.so` with a unique trailer (a new build to the
/// host), through a temporary name and a rename.
fn install(lib: &Path, run_dir: &Path, n: usize) -> Result<()> {
    let mut bytes = std::fs::read(lib)?;
    bytes.extend_from_slice(format!("bench-reload-{n}").as_bytes());
    let tmp = run_dir.join("plugins/.versioned.so.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(
        &tmp,
        run_dir.join(format!("plugins/versioned{}", std::env::consts::DLL_SUFFIX)),
    )?;
    Ok(())
}

struct Expect {
    variant: String,
    seen: Option<Instant>,
}

fn load(
    addr: SocketAddr,
    stop: &AtomicBool,
    ok: &AtomicU64,
    failed: &Mutex<Vec<String>>,
    watch: &Mutex<Option<Expect>>,
) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match TcpStream::connect(addr) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    conn.insert(BufReader::new(s))
                }
                Err(e) => {
                    failed.lock().unwrap().push(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match get(c) {
            Ok((200, body)) => {
                ok.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if let Some(expect) = watch.lock().unwrap().as_mut() {
                    if expect.seen.is_none() && body.starts_with(&expect.variant) {
                        expect.seen = Some(now);
                    }
                }
            }
            Ok((status, body)) => failed.lock().unwrap().push(format!("{status} {body}")),
            Err(e) => {
                failed.lock().unwrap().push(e);
                conn = None;
            }
        }
    }
}

/// One GET on a keep-alive connection: (status, body).
fn get(conn: &mut BufReader<TcpStream>) -> Result<(u16, String), String> {
    conn.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nhost: v.localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut status = 0;
    let mut len = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(rest) = l.strip_prefix("HTTP/1.1 ") {
            status = rest.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
        } else if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn summary(values: &mut [f64]) -> serde_json::Value {
    if values.is_empty() {
        return json!(null);
    }
    values.sort_by(f64::total_cmp);
    json!({
        "median": values[values.len() / 2],
        "min": values[0],
        "max": values[values.len() - 1],
        "n": values.len(),
    })
}

/// The figures read from /proc for the host process and its children (worker processes).
struct Proc {
    rss_kib: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    threads: u64,
    fds: usize,
}

impl Proc {
    fn read(pid: u32) -> Result<Proc> {
        let mut all = Self::read_one(pid)?;
        for child in crate::bench::children(pid) {
            if let Ok(p) = Self::read_one(child) {
                all.rss_kib += p.rss_kib;
                all.rss_anon_kib += p.rss_anon_kib;
                all.rss_file_kib += p.rss_file_kib;
                all.threads += p.threads;
                all.fds += p.fds;
            }
        }
        Ok(all)
    }

    fn read_one(pid: u32) -> Result<Proc> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        Ok(Proc {
            rss_kib: field("VmRSS:"),
            rss_anon_kib: field("RssAnon:"),
            rss_file_kib: field("RssFile:") + field("RssShmem:"),
            threads: field("Threads:"),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        })
    }

    fn json(&self) -> serde_json::Value {
        json!({"rss_kib": self.rss_kib, "rss_anon_kib": self.rss_anon_kib, "rss_file_kib": self.rss_file_kib,
               "threads": self.threads, "fds": self.fds})
    }
}

/// The host under test, its stderr collected.
struct Host {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Host {
    fn start(binary: &Path, dir: &Path) -> Result<Host> {
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(dir.join("servers.config.json"))
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the host")?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let public = line
                    .split("listening on http://")
                    .nth(1)
                    .filter(|_| !line.contains("admin listening on"));
                if let Some(addr) = public {
                    let _ = tx.send(addr.trim().to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the host did not start listening")?
            .parse()?;
        Ok(Host { child, addr, log })
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

//! `cargo xtask bench`: the host side by side with bare hyper (the `baseline` binary) and,
//! when installed, nginx.
//!
//! Each target runs pinned to core 0 and the load generator to core 1, so the figure that
//! tells is the server's CPU time per request (from /proc, summed over its threads), not
//! only requests/s (at full rate the generator, not the server, is the bottleneck).
//! Targets run interleaved (A, B, A, B...) for several rounds; the report gives medians
//! with min-max, and host/baseline ratios.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cargo, root};

struct Settings {
    rounds: usize,
    duration: u64,
    rate: u64,
    connections: Vec<u32>,
    quick: bool,
}

pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let num = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let settings = Settings {
        rounds: num("--rounds", 3) as usize,
        duration: num("--duration", if quick { 1 } else { 5 }),
        rate: num("--rate", 20_000),
        connections: if quick { vec![64] } else { vec![64, 256] },
        quick,
    };
    let wrk = tool("wrk").context("wrk is needed: apt-get install -y wrk")?;
    let oha = tool("oha").context("oha is needed: cargo install oha --locked")?;
    let nginx = tool("nginx");
    let taskset = tool("taskset");
    if taskset.is_none() {
        println!("note: taskset not found (apt-get install -y util-linux); server and load generator share cores");
    }

    let root = root();
    let out = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    println!("building host, baseline and the hello plugin (release)...");
    for (what, args) in [
        ("host", vec!["-p", "host"]),
        (
            "baselines",
            vec![
                "-p",
                "bench",
                "--bin",
                "baseline",
                "--bin",
                "sqlite-baseline",
                "--bin",
                "sqlite-axum",
            ],
        ),
        ("plugins", vec!["-p", "hello", "-p", "notes"]),
    ] {
        let status = cargo()
            .arg("build")
            .arg("--release")
            .args(&args)
            .current_dir(&root)
            .status()?;
        anyhow::ensure!(status.success(), "building {what} failed");
    }
    let release = crate::target_dir().join("release");
    let lib = |name: &str| release.join(format!("lib{name}{}", std::env::consts::DLL_SUFFIX));

    // Start-up and idle memory, with the shipped example plugins.
    let examples = out.join("examples");
    prepare(
        &examples,
        &std::fs::read_to_string(root.join("servers.config.json"))?,
        &[(lib("hello"), "hello"), (lib("notes"), "notes")],
    )?;
    let (startup_ms, idle_rss_kib) =
        startup(&release.join("host"), &examples, if quick { 3 } else { 7 })?;

    // The targets.
    let one = out.join("host-1-domain");
    prepare(&one, &config_with_domains(1), &[(lib("hello"), "hello")])?;
    // The same, with a rate limit per client address (high enough never to refuse) and
    // with the access log to a file: what each costs per request.
    let limited = out.join("host-rate-limited");
    let mut config: Value = serde_json::from_str(&config_with_domains(1))?;
    config["global"]["rate_limit"] =
        json!({"per_second": 1_000_000, "burst": 1_000_000, "per": "client_ip"});
    prepare(&limited, &config.to_string(), &[(lib("hello"), "hello")])?;
    let logged = out.join("host-access-log");
    let mut config: Value = serde_json::from_str(&config_with_domains(1))?;
    config["global"]["access_log"] = json!({"format": "combined", "file": "access.log"});
    prepare(&logged, &config.to_string(), &[(lib("hello"), "hello")])?;
    // The same with requests not counted for the metrics: what counting costs.
    let unmetered = out.join("host-metrics-off");
    let mut config: Value = serde_json::from_str(&config_with_domains(1))?;
    config["global"]["metrics"] = json!(false);
    prepare(&unmetered, &config.to_string(), &[(lib("hello"), "hello")])?;
    // The same server with its plugin in a worker process (`isolation: "process"`):
    // what the hop to the worker costs. The worker inherits the host's CPU pinning, and
    // its CPU time counts with the host's (a target's children count).
    let isolated = out.join("host-worker");
    let mut config: Value = serde_json::from_str(&config_with_domains(1))?;
    config["servers"][0]["isolation"] = json!("process");
    prepare(&isolated, &config.to_string(), &[(lib("hello"), "hello")])?;
    let many = out.join("host-10k-domains");
    prepare(
        &many,
        &config_with_domains(10_000),
        &[(lib("hello"), "hello")],
    )?;
    // notes on SQLite, and the same query in a bare server, each on a database of its own
    // holding one note. Without the security headers, which the bare server does not
    // send either (as for hello).
    let notes_dir = out.join("host-notes");
    let notes_db = notes_dir.join("notes.sqlite3");
    let notes_config = json!({"global": {"reload": {"watch": false}},
        "servers": [{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes",
                     "headers": false, "config": {"database": notes_db}}]});
    prepare(
        &notes_dir,
        &notes_config.to_string(),
        &[(lib("notes"), "notes")],
    )?;
    let sqlite_dir = out.join("sqlite-baseline");
    let axum_dir = out.join("sqlite-axum");
    for dir in [&sqlite_dir, &axum_dir] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
    }
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
    let mut targets = vec![
        Target::start(
            "baseline",
            "hello.localhost",
            pin(&release.join("baseline"), 0).args(["--listen", "127.0.0.1:0"]),
        )?,
        Target::start(
            "host",
            "hello.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &one),
        )?,
        Target::start(
            "host-rate-limited",
            "hello.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &limited),
        )?,
        Target::start(
            "host-access-log",
            "hello.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &logged),
        )?,
        Target::start(
            "host-metrics-off",
            "hello.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &unmetered),
        )?,
        Target::start(
            "host-worker",
            "hello.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &isolated),
        )?,
        Target::start(
            "host-10k",
            "d4242.bench.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &many),
        )?,
    ];
    for (name, dir) in [("sqlite-baseline", &sqlite_dir), ("sqlite-axum", &axum_dir)] {
        targets.push(Target::start(
            name,
            "notes.localhost",
            pin(&release.join(name), 0)
                .args(["--listen", "127.0.0.1:0", "--database"])
                .arg(dir.join("notes.sqlite3")),
        )?);
    }
    let notes = Target::start(
        "host-notes",
        "notes.localhost",
        host_cmd(&mut pin(&release.join("host"), 0), &notes_dir),
    )?;
    http_post(
        notes.addr,
        "notes.localhost",
        "/notes",
        br#"{"text": "buy milk"}"#,
    )
    .context("adding a note to the notes server")?;
    targets.push(notes);
    if let Some(nginx) = &nginx {
        targets.push(start_nginx(
            pin(nginx, 0),
            &out,
            "nginx",
            "d42.bench.localhost",
            nginx_config,
        )?);
    } else {
        println!("note: nginx not installed (apt-get install -y nginx); it is left out");
    }
    // Static files: the same 1 KiB and 1 MiB files from the host (`servers[].static`, no
    // plugin: `host-static` keeps them in memory, as by default, `host-static-uncached`
    // has `cache_mb: 0`) and from nginx (its defaults, plus sendfile as most installs
    // have it). All send Last-Modified, ETag and Accept-Ranges; none compresses.
    let site = out.join("static-site");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("1k.bin"), vec![b'x'; 1024])?;
    std::fs::write(site.join("1m.bin"), vec![b'x'; 1024 * 1024])?;
    // The host keeps a file once its last change is a second old.
    std::thread::sleep(Duration::from_millis(1100));
    for (name, cache_mb) in [("host-static", 16), ("host-static-uncached", 0)] {
        let static_dir = out.join(name);
        let config = json!({"global": {"reload": {"watch": false}},
            "servers": [{"name": "files", "domains": ["files.localhost"], "headers": false,
                         "static": {"root": site, "cache_mb": cache_mb}}]});
        prepare(&static_dir, &config.to_string(), &[])?;
        targets.push(Target::start(
            name,
            "files.localhost",
            host_cmd(&mut pin(&release.join("host"), 0), &static_dir),
        )?);
    }
    if let Some(nginx) = &nginx {
        targets.push(start_nginx(
            pin(nginx, 0),
            &out,
            "nginx-static",
            "files.localhost",
            |dir, port| nginx_static_config(dir, port, &site),
        )?);
    }
    // HTTPS: the host and nginx with the same certificate (ECDSA P-256, from openssl),
    // TLS 1.3 and HTTP/1.1 for both. Compared with nginx: the minimal hyper server has no
    // TLS.
    match tls_files(&out.join("tls")) {
        Err(e) => println!("note: no HTTPS cases: {e}"),
        Ok((cert, key)) => {
            let dir = out.join("host-tls");
            let config = json!({"global": {"reload": {"watch": false},
                "listen": [{"address": "127.0.0.1:0", "tls": true, "protocols": ["http/1.1"]}],
                "tls": {"certificates": [{"cert": cert, "key": key}]}},
                "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]});
            prepare(&dir, &config.to_string(), &[(lib("hello"), "hello")])?;
            let mut cmd = pin(&release.join("host"), 0);
            cmd.arg("--config")
                .arg(dir.join("servers.config.json"))
                .env("RUST_LOG", "warn,host::edge::serve=info");
            targets.push(Target::start("host-tls", "hello.localhost", &mut cmd)?.https());
            if let Some(nginx) = &nginx {
                let start = start_nginx(
                    pin(nginx, 0),
                    &out,
                    "nginx-tls",
                    "hello.localhost",
                    |dir, port| nginx_tls_config(dir, port, &cert, &key),
                );
                targets.push(start?.https());
            }
        }
    }

    let echo_body = out.join("echo-64k.bin");
    std::fs::write(&echo_body, vec![b'x'; 64 * 1024])?;
    let wrk_post = out.join("post-64k.lua");
    std::fs::write(
        &wrk_post,
        "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", 65536)\n",
    )?;
    let cases = [
        Case {
            name: "hello",
            path: "/plain",
            post: false,
            new_connections: false,
            targets: &[
                "baseline",
                "host",
                "host-10k",
                "nginx",
                "host-rate-limited",
                "host-access-log",
                "host-metrics-off",
                "host-worker",
            ],
            baseline: "baseline",
        },
        Case {
            name: "two path parameters",
            path: "/greet/ada/lovelace",
            post: false,
            new_connections: false,
            targets: &["baseline", "host"],
            baseline: "baseline",
        },
        Case {
            name: "16 KiB response",
            path: "/bytes/16384",
            post: false,
            new_connections: false,
            targets: &["baseline", "host"],
            baseline: "baseline",
        },
        Case {
            name: "64 KiB POST echoed",
            path: "/echo-raw",
            post: true,
            new_connections: false,
            targets: &["baseline", "host"],
            baseline: "baseline",
        },
        Case {
            name: "HTTPS keep-alive",
            path: "/plain",
            post: false,
            new_connections: false,
            targets: &["nginx-tls", "host-tls"],
            baseline: "nginx-tls",
        },
        Case {
            name: "HTTPS new handshakes",
            path: "/plain",
            post: false,
            new_connections: true,
            targets: &["nginx-tls", "host-tls"],
            baseline: "nginx-tls",
        },
        Case {
            name: "static file 1 KiB",
            path: "/1k.bin",
            post: false,
            new_connections: false,
            targets: &["nginx-static", "host-static", "host-static-uncached"],
            baseline: "nginx-static",
        },
        Case {
            name: "static file 1 MiB",
            path: "/1m.bin",
            post: false,
            new_connections: false,
            targets: &["nginx-static", "host-static", "host-static-uncached"],
            baseline: "nginx-static",
        },
        Case {
            name: "SQLite read by key",
            path: "/notes/1",
            post: false,
            new_connections: false,
            // Against the same handler in bare axum, as the issue asks; bare hyper
            // (`sqlite-baseline`) is shown beside it.
            targets: &["sqlite-axum", "host-notes", "sqlite-baseline"],
            baseline: "sqlite-axum",
        },
    ];

    let load = Load {
        wrk: &wrk,
        oha: &oha,
        taskset: taskset.as_deref(),
        echo_body: &echo_body,
        wrk_post: &wrk_post,
    };
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    // `--targets baseline,host` runs only those (the baseline always runs: the ratios
    // need it).
    let wanted: Option<Vec<&str>> = args
        .iter()
        .position(|a| a == "--targets")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').collect());
    let mut results = Vec::new();
    for case in cases
        .iter()
        .filter(|c| only.is_none_or(|o| c.name.contains(o.as_str())))
    {
        let names: Vec<&str> = case
            .targets
            .iter()
            .copied()
            .filter(|n| targets.iter().any(|t| t.name == *n))
            .filter(|n| *n == case.baseline || wanted.as_ref().is_none_or(|w| w.contains(n)))
            .collect();
        println!(
            "case {:?}: {} rounds of {} ({} s per run)",
            case.name,
            settings.rounds,
            names.join(", "),
            settings.duration
        );
        let mut runs: Vec<Value> = Vec::new();
        for round in 0..settings.rounds {
            for name in &names {
                let target = targets.iter().find(|t| t.name == *name).expect("listed");
                // Separate wrk runs drift too much to tell much in a quick run; the
                // side-by-side wrk run below gives its requests/s ratio.
                for &c in settings.connections.iter().filter(|_| !settings.quick) {
                    let r = load.wrk(target, case, c, settings.duration)?;
                    runs.push(json!({"target": name, "round": round, "mode": format!("wrk c={c}"), "result": r}));
                }
                let r = load.oha(target, case, 64, settings.rate, settings.duration)?;
                runs.push(json!({"target": name, "round": round, "mode": format!("oha {} req/s c=64", settings.rate), "result": r}));
            }
            let baseline = targets.iter().find(|t| t.name == case.baseline);
            for name in names.iter().filter(|n| **n != case.baseline) {
                let (Some(target), Some(baseline)) =
                    (targets.iter().find(|t| t.name == *name), baseline)
                else {
                    continue;
                };
                let each = settings.rate / 2;
                let r = load.side_by_side(target, baseline, case, each, settings.duration)?;
                runs.push(json!({"target": name, "round": round, "mode": format!("{SIDE_BY_SIDE}, oha {each} req/s each"), "result": r}));
                for &c in &settings.connections {
                    let r = load.side_by_side_wrk(target, baseline, case, c, settings.duration)?;
                    runs.push(json!({"target": name, "round": round, "mode": format!("{SIDE_BY_SIDE}, wrk c={c} each"), "result": r}));
                }
            }
        }
        results.push(
            json!({"case": case.name, "path": case.path, "baseline": case.baseline, "runs": runs}),
        );
    }
    for t in &mut targets {
        t.stop();
    }

    let report = json!({
        "settings": {"rounds": settings.rounds, "duration_s": settings.duration, "rate": settings.rate,
                     "connections": settings.connections, "quick": settings.quick, "pinned": taskset.is_some()},
        "startup_ms": startup_ms,
        "idle_rss_kib": idle_rss_kib,
        "cases": results,
    });
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    print_report(&report, &settings);
    println!("\nraw figures: {}", out.join("bench.json").display());
    Ok(())
}

/// The mode where a target and the baseline run at the same time (see `side_by_side`).
const SIDE_BY_SIDE: &str = "side by side with the baseline";

struct Case {
    name: &'static str,
    path: &'static str,
    post: bool,
    /// A new connection (a TCP and, over TLS, a full handshake) per request.
    new_connections: bool,
    targets: &'static [&'static str],
    /// The target the others are compared with (side by side, and in the ratios).
    baseline: &'static str,
}

pub(crate) fn tool(name: &str) -> Option<PathBuf> {
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin").join(name));
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .chain(home_bin)
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A folder with a config and a plugins/ folder holding `libs` as `<name>.so`.
pub(crate) fn prepare(dir: &Path, config: &str, libs: &[(PathBuf, &str)]) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("plugins"))?;
    std::fs::write(dir.join("servers.config.json"), config)?;
    for (lib, name) in libs {
        std::fs::copy(
            lib,
            dir.join("plugins")
                .join(format!("{name}{}", std::env::consts::DLL_SUFFIX)),
        )
        .with_context(|| format!("copying {}", lib.display()))?;
    }
    Ok(())
}

/// `hello` on hello.localhost, plus (for n > 1) 100 servers sharing n domains
/// `d<i>.bench.localhost` in all.
fn config_with_domains(n: usize) -> String {
    // Security headers off: nginx and the baseline send none (like with like).
    let mut servers = vec![
        json!({"name": "hello", "domains": ["hello.localhost"], "plugin": "hello", "headers": false}),
    ];
    if n > 1 {
        let per = n / 100;
        for s in 0..100 {
            let domains: Vec<String> = (s * per..(s + 1) * per)
                .map(|i| format!("d{i}.bench.localhost"))
                .collect();
            servers.push(json!({"name": format!("s{s}"), "domains": domains, "plugin": "hello"}));
        }
    }
    json!({"global": {"reload": {"watch": false}}, "servers": servers}).to_string()
}

/// nginx (`cmd`: its binary, pinned like the servers it is compared with), with the
/// config `config(dir, port)` written in `out/<name>`, listening on a free port.
fn start_nginx(
    mut cmd: Command,
    out: &Path,
    name: &'static str,
    domain: &'static str,
    config: impl FnOnce(&Path, u16) -> String,
) -> Result<Target> {
    let dir = out.join(name);
    let port = free_port()?;
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("nginx.conf"), config(&dir, port))?;
    cmd.arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir);
    Target::start_at(name, domain, &mut cmd, port)
}

fn nginx_config(dir: &Path, port: u16) -> String {
    let mut servers = String::new();
    for i in 0..100 {
        servers.push_str(&format!(
            "  server {{ listen 127.0.0.1:{port}; server_name d{i}.bench.localhost; \
             location / {{ default_type \"text/plain; charset=utf-8\"; return 200 \"Hello, world!\\n\"; }} }}\n"
        ));
    }
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  keepalive_requests 100000000;\n{servers}}}\n"
    )
}

/// nginx on `port` with TLS 1.3, HTTP/1.1, the certificate the host has, answering
/// `/plain` as `hello` does.
fn nginx_tls_config(dir: &Path, port: u16, cert: &Path, key: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  keepalive_requests 100000000;\n\
         server {{ listen 127.0.0.1:{port} ssl; server_name hello.localhost; ssl_certificate {}; ssl_certificate_key {}; ssl_protocols TLSv1.3; \
         location / {{ default_type \"text/plain; charset=utf-8\"; return 200 \"Hello, world!\\n\"; }} }}\n}}\n",
        cert.display(),
        key.display()
    )
}

/// nginx on `port` serving the folder `root` at files.localhost, with sendfile.
fn nginx_static_config(dir: &Path, port: u16, root: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  default_type application/octet-stream;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  keepalive_requests 100000000;\n\
         server {{ listen 127.0.0.1:{port}; server_name files.localhost; root {}; }}\n}}\n",
        root.display()
    )
}

/// An ECDSA P-256 certificate for hello.localhost and its key, made by openssl in `dir`.
fn tls_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=hello.localhost"])
        .args(["-addext", "subjectAltName=DNS:hello.localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl is needed for the HTTPS cases")?;
    anyhow::ensure!(status.success(), "openssl could not make a certificate");
    Ok((cert, key))
}

pub(crate) fn host_cmd<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    cmd.arg("--config")
        .arg(dir.join("servers.config.json"))
        .args(["--listen", "127.0.0.1:0"])
        // Targets run at the same time: each admin listener on a free port.
        .args(["--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,host::edge::serve=info")
}

/// Median time from spawning the host to its first served request, and its resident
/// memory once idle.
fn startup(host: &Path, dir: &Path, times: usize) -> Result<(f64, u64)> {
    let mut samples = Vec::new();
    let mut rss = 0;
    for _ in 0..times {
        let port = free_port()?;
        let started = Instant::now();
        let mut child = Command::new(host)
            .arg("--config")
            .arg(dir.join("servers.config.json"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        loop {
            if let Ok(status) = http_get(addr, "hello.localhost", "/plain") {
                if status == 200 {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                bail!("the host did not answer within 20 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(500));
        rss = proc_status(child.id(), "VmRSS:");
        let _ = child.kill();
        let _ = child.wait();
    }
    samples.sort_by(f64::total_cmp);
    Ok((samples[samples.len() / 2], rss))
}

/// Sends one POST with a JSON body and checks that it succeeded.
fn http_post(addr: SocketAddr, host: &str, path: &str, body: &[u8]) -> Result<()> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    anyhow::ensure!(
        reply.starts_with("HTTP/1.1 2"),
        "POST {path} answered {}",
        reply.lines().next().unwrap_or("nothing")
    );
    Ok(())
}

fn http_get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(100))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0))
}

/// The processes whose parent is `parent` (nginx's workers, the host's worker
/// processes).
pub(crate) fn children(parent: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let ppid = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit(')').next()?;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            ppid == Some(parent)
        })
        .collect()
}

pub(crate) fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// User and kernel CPU time of a process (all its threads), in milliseconds.
fn user_sys_ms(pid: u32) -> (f64, f64) {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let mut fields = s.rsplit(')').next()?.split_whitespace();
            // After the command: state is field 3; utime and stime are fields 14 and 15.
            let utime: f64 = fields.nth(11)?.parse().ok()?;
            let stime: f64 = fields.next()?.parse().ok()?;
            Some((utime * 1000.0 / ticks_per_s, stime * 1000.0 / ticks_per_s))
        })
        .unwrap_or((0.0, 0.0))
}

/// The CPU time each thread of some processes has spent so far (ns, from schedstat).
/// Compared by thread, so that a thread ending between two readings (an idle pool
/// thread timing out) takes only its own time out of the sum, not the difference.
#[derive(Default)]
pub(crate) struct CpuTimes(std::collections::HashMap<(u32, u32), u64>);

impl CpuTimes {
    pub(crate) fn read(pids: &[u32]) -> CpuTimes {
        let mut times = CpuTimes::default();
        for &pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.filter_map(Result::ok) {
                let tid = task.file_name().to_str().and_then(|t| t.parse().ok());
                let ns = std::fs::read_to_string(task.path().join("schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
                if let (Some(tid), Some(ns)) = (tid, ns) {
                    times.0.insert((pid, tid), ns);
                }
            }
        }
        times
    }

    /// The CPU time spent since `before` (ns) by the threads alive now (a thread that
    /// ended meanwhile is left out: one that ends is one that was idle).
    pub(crate) fn since(&self, before: &CpuTimes) -> u64 {
        self.0
            .iter()
            .map(|(thread, ns)| ns.saturating_sub(before.0.get(thread).copied().unwrap_or(0)))
            .sum()
    }
}

/// A server under test. For nginx, the CPU of every process in its group counts.
pub(crate) struct Target {
    name: &'static str,
    domain: &'static str,
    pub(crate) addr: SocketAddr,
    pub(crate) child: Child,
    /// `http` or `https` (load generators do not check the certificate).
    scheme: &'static str,
}

impl Target {
    pub(crate) fn start(
        name: &'static str,
        domain: &'static str,
        cmd: &mut Command,
    ) -> Result<Target> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let addr = line
                    .split("listening on http://")
                    .nth(1)
                    .or_else(|| line.split("listening on https://").nth(1));
                if let (Some(addr), Some(tx)) = (addr, tx.as_ref()) {
                    let _ = tx.send(addr.trim().to_owned());
                    let _ = tx;
                }
                if line.contains("listening on") {
                    tx = None;
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .with_context(|| format!("{name} did not start"))?
            .parse()?;
        Ok(Target {
            name,
            domain,
            addr,
            child,
            scheme: "http",
        })
    }

    /// The same target, reached over TLS.
    fn https(mut self) -> Target {
        self.scheme = "https";
        self
    }

    fn start_at(
        name: &'static str,
        domain: &'static str,
        cmd: &mut Command,
        port: u16,
    ) -> Result<Target> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // A TCP connection is enough: a TLS port does not answer plain HTTP.
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("{name} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Target {
            name,
            domain,
            addr,
            child,
            scheme: "http",
        })
    }

    /// The CPU time of the target's threads (nginx: master and workers, found by parent
    /// pid).
    pub(crate) fn cpu_times(&self) -> CpuTimes {
        CpuTimes::read(&self.pids())
    }

    /// User and kernel CPU milliseconds of the target, as `cpu_times` counts processes.
    fn user_sys_ms(&self) -> (f64, f64) {
        self.pids()
            .into_iter()
            .map(user_sys_ms)
            .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu, s + ps))
    }

    /// The target's process and its children.
    fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let mut pids = vec![pid];
        pids.extend(children(pid));
        pids
    }

    pub(crate) fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

struct Load<'a> {
    wrk: &'a Path,
    oha: &'a Path,
    taskset: Option<&'a Path>,
    echo_body: &'a Path,
    wrk_post: &'a Path,
}

impl Load<'_> {
    fn command(&self, tool: &Path) -> Command {
        match self.taskset {
            Some(t) => {
                let mut c = Command::new(t);
                c.arg("-c").arg("1").arg(tool);
                c
            }
            None => Command::new(tool),
        }
    }

    /// A wrk command for the maximum rate against `target`.
    fn wrk_command(&self, target: &Target, case: &Case, connections: u32, seconds: u64) -> Command {
        let mut cmd = self.command(self.wrk);
        cmd.args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args(["-H", &format!("Host: {}", target.domain)]);
        if case.post {
            cmd.arg("-s").arg(self.wrk_post);
        }
        if case.new_connections {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("{}://{}{}", target.scheme, target.addr, case.path));
        cmd
    }

    /// Maximum rate: requests/s, latency p50/p99 (ms) and server CPU per request (us).
    fn wrk(&self, target: &Target, case: &Case, connections: u32, seconds: u64) -> Result<Value> {
        let mut cmd = self.wrk_command(target, case, connections, seconds);
        let usage = Usage::start(target);
        let out = cmd.output().context("running wrk")?;
        let usage = usage.end(target);
        let mut result = wrk_result(&out)?;
        let requests = result["requests"].as_f64().unwrap_or(0.0);
        usage.record(&mut result, requests);
        Ok(result)
    }

    /// `target` and the baseline at the same time, both on the server core, each under
    /// its own wrk (both on the generator core): the requests/s each gets from the same
    /// machine at the same moment. A server that costs more per request serves fewer of
    /// them; drifts in the machine's speed touch both alike, so their ratio holds steady
    /// where separate wrk runs drift by tens of percent.
    fn side_by_side_wrk(
        &self,
        target: &Target,
        baseline: &Target,
        case: &Case,
        connections: u32,
        seconds: u64,
    ) -> Result<Value> {
        let a = self.wrk_command(target, case, connections, seconds);
        let b = self.wrk_command(baseline, case, connections, seconds);
        let mut r = pair([a, b], [target, baseline], wrk_result)?;
        let rps = |field: &str| r[field].as_f64().unwrap_or(f64::NAN);
        r["rps_ratio"] = json!(rps("rps") / rps("baseline_rps"));
        Ok(r)
    }

    /// An oha command for a fixed rate against `target`.
    fn oha_command(
        &self,
        target: &Target,
        case: &Case,
        connections: u32,
        rate: u64,
        seconds: u64,
    ) -> Command {
        let mut cmd = self.command(self.oha);
        cmd.args([
            "-z",
            &format!("{seconds}s"),
            "-q",
            &rate.to_string(),
            "-c",
            &connections.to_string(),
        ])
        .args(["--no-tui", "--output-format", "json"])
        .args(["-H", &format!("Host: {}", target.domain)]);
        if case.post {
            cmd.args(["-m", "POST", "-D"]).arg(self.echo_body);
        }
        if case.new_connections {
            cmd.arg("--disable-keepalive");
        }
        if target.scheme == "https" {
            cmd.arg("--insecure");
        }
        cmd.arg(format!("{}://{}{}", target.scheme, target.addr, case.path));
        cmd
    }

    /// Fixed rate: requests/s, latency p50/p99 (ms) and server CPU per request (us).
    fn oha(
        &self,
        target: &Target,
        case: &Case,
        connections: u32,
        rate: u64,
        seconds: u64,
    ) -> Result<Value> {
        let mut cmd = self.oha_command(target, case, connections, rate, seconds);
        let usage = Usage::start(target);
        let out = cmd.output().context("running oha")?;
        let usage = usage.end(target);
        let mut result = oha_result(&out)?;
        let requests = result["requests"].as_f64().unwrap_or(0.0);
        usage.record(&mut result, requests);
        Ok(result)
    }

    /// `target` and the baseline at the same time, on the same core, each under its own
    /// oha at `rate` requests/s: whatever disturbs the machine disturbs both alike, so
    /// their ratio holds steady where separate runs drift. Returns both CPU times per
    /// request and their ratio.
    fn side_by_side(
        &self,
        target: &Target,
        baseline: &Target,
        case: &Case,
        rate: u64,
        seconds: u64,
    ) -> Result<Value> {
        let a = self.oha_command(target, case, 64, rate, seconds);
        let b = self.oha_command(baseline, case, 64, rate, seconds);
        pair([a, b], [target, baseline], oha_result)
    }
}

/// Runs two load generators at once, one per server, and returns the first's result
/// with both servers' CPU time per request, their ratio, and the second's requests/s and
/// latency under `baseline_*`.
fn pair(
    mut commands: [Command; 2],
    targets: [&Target; 2],
    parse: fn(&std::process::Output) -> Result<Value>,
) -> Result<Value> {
    for cmd in &mut commands {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let before = targets.map(Target::cpu_times);
    let [mut a, mut b] = commands;
    let a = a.spawn().context("running a load generator")?;
    let b = b.spawn().context("running a load generator")?;
    let (a, b) = (a.wait_with_output()?, b.wait_with_output()?);
    let after = targets.map(Target::cpu_times);
    let (mut a, b) = (parse(&a)?, parse(&b)?);
    let per_request = |i: usize, r: &Value| {
        after[i].since(&before[i]) as f64 / 1000.0 / r["requests"].as_f64().unwrap_or(0.0).max(1.0)
    };
    let (a_us, b_us) = (per_request(0, &a), per_request(1, &b));
    a["cpu_us_per_request"] = json!(a_us);
    a["baseline_cpu_us_per_request"] = json!(b_us);
    a["cpu_ratio"] = json!(a_us / b_us);
    for field in ["rps", "p50_ms", "p99_ms"] {
        a[format!("baseline_{field}")] = b[field].clone();
    }
    Ok(a)
}

/// A target's CPU time over a run: total (ns, from schedstat) and user / kernel (ms, from
/// /proc/<pid>/stat's clock ticks: coarse, but it tells user from kernel).
struct Usage {
    cpu: CpuTimes,
    cpu_ns: u64,
    user_ms: f64,
    sys_ms: f64,
}

impl Usage {
    fn start(target: &Target) -> Usage {
        let (user_ms, sys_ms) = target.user_sys_ms();
        Usage {
            cpu: target.cpu_times(),
            cpu_ns: 0,
            user_ms,
            sys_ms,
        }
    }

    /// The usage since `start`.
    fn end(self, target: &Target) -> Usage {
        let (user_ms, sys_ms) = target.user_sys_ms();
        let cpu = target.cpu_times();
        Usage {
            cpu_ns: cpu.since(&self.cpu),
            cpu,
            user_ms: user_ms - self.user_ms,
            sys_ms: sys_ms - self.sys_ms,
        }
    }

    /// Adds the per-request figures to a run's result.
    fn record(&self, result: &mut Value, requests: f64) {
        let n = requests.max(1.0);
        result["cpu_us_per_request"] = json!(self.cpu_ns as f64 / 1000.0 / n);
        result["user_us_per_request"] = json!(self.user_ms * 1000.0 / n);
        result["sys_us_per_request"] = json!(self.sys_ms * 1000.0 / n);
    }
}

/// Requests/s, latency, request count and errors from wrk's report.
fn wrk_result(out: &std::process::Output) -> Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let requests: f64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("wrk output without a request count:\n{text}"))?;
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .unwrap_or("");
    let pct = |p: &str| -> f64 {
        text.lines()
            .find(|l| l.trim_start().starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .map_or(f64::NAN, wrk_duration_ms)
    };
    Ok(
        json!({"rps": rps, "p50_ms": pct("50%"), "p99_ms": pct("99%"),
                  "requests": requests, "errors": errors}),
    )
}

/// Requests/s, latency, request and error counts from oha's JSON report.
fn oha_result(out: &std::process::Output) -> Result<Value> {
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "oha output is not JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let ok = report["statusCodeDistribution"]["200"]
        .as_f64()
        .unwrap_or(0.0);
    let all: f64 = report["statusCodeDistribution"]
        .as_object()
        .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let errors: f64 = report["errorDistribution"]
        .as_object()
        .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let p = |k: &str| {
        report["latencyPercentiles"][k]
            .as_f64()
            .map_or(f64::NAN, |s| s * 1000.0)
    };
    Ok(
        json!({"rps": report["summary"]["requestsPerSec"], "p50_ms": p("p50"), "p99_ms": p("p99"),
              "requests": all, "non_200": all - ok, "errors": errors}),
    )
}

fn wrk_duration_ms(v: &str) -> f64 {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// median, min, max of one field over the runs of (target, mode).
fn stats(runs: &[Value], target: &str, mode: &str, field: &str) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = runs
        .iter()
        .filter(|r| r["target"] == target && r["mode"] == mode)
        .filter_map(|r| r["result"][field].as_f64())
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

/// A target's figure over the baseline's in the same round and mode, one ratio per round:
/// median, min, max. Paired rounds run seconds apart, so slow drifts in the machine's
/// speed (other tenants, frequency) cancel out of each ratio.
fn paired(
    runs: &[Value],
    target: &str,
    baseline: &str,
    mode: &str,
    field: &str,
) -> Option<(f64, f64, f64)> {
    let figure = |t: &str, round: &Value| {
        runs.iter()
            .find(|r| r["target"] == t && r["mode"] == mode && r["round"] == *round)
            .and_then(|r| r["result"][field].as_f64())
            .filter(|x| x.is_finite() && *x > 0.0)
    };
    let mut v: Vec<f64> = runs
        .iter()
        .filter(|r| r["target"] == target && r["mode"] == mode)
        .filter_map(|r| Some(figure(target, &r["round"])? / figure(baseline, &r["round"])?))
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

fn print_report(report: &Value, settings: &Settings) {
    println!(
        "\n## Benchmarks{}\n",
        if settings.quick { " (quick)" } else { "" }
    );
    println!(
        "{} rounds, interleaved, {} s per run; server pinned to core 0, load generator to core 1: {}.",
        settings.rounds, settings.duration, report["settings"]["pinned"]
    );
    println!("Figures are medians (min-max). CPU/req is the server's CPU time per request. The ratios to the baseline are per round (each run against the baseline's run of the same round), then the median (min-max) of those.\n");
    println!("Start-up to first served request (example plugins): {:.1} ms; idle resident memory: {:.1} MiB\n",
        report["startup_ms"].as_f64().unwrap_or(f64::NAN), report["idle_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0);
    let fmt = |s: Option<(f64, f64, f64)>, digits: usize| match s {
        Some((m, lo, hi)) => format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})"),
        None => "-".to_owned(),
    };
    for case in report["cases"].as_array().into_iter().flatten() {
        let runs = case["runs"].as_array().cloned().unwrap_or_default();
        let baseline = case["baseline"].as_str().unwrap_or("baseline");
        println!(
            "### {} (`{}`, against {baseline})\n",
            case["case"].as_str().unwrap_or(""),
            case["path"].as_str().unwrap_or("")
        );
        println!("| target | load | req/s | p50 ms | p99 ms | CPU/req us | user / kernel us | CPU/req vs baseline | req/s vs baseline |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut modes: Vec<String> = runs
            .iter()
            .filter_map(|r| r["mode"].as_str().map(str::to_owned))
            .collect();
        modes.dedup();
        modes.sort();
        modes.dedup();
        let mut targets: Vec<String> = Vec::new();
        for r in &runs {
            let t = r["target"].as_str().unwrap_or("").to_owned();
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        let ratio = |s: Option<(f64, f64, f64)>| match s {
            Some((m, lo, hi)) => format!("{m:.3}x ({lo:.3}-{hi:.3})"),
            None => "-".to_owned(),
        };
        for mode in &modes {
            let side_by_side = mode.starts_with(SIDE_BY_SIDE);
            for t in &targets {
                if !runs
                    .iter()
                    .any(|r| r["target"] == t.as_str() && r["mode"] == mode.as_str())
                {
                    continue;
                }
                let split = match (
                    stats(&runs, t, mode, "user_us_per_request"),
                    stats(&runs, t, mode, "sys_us_per_request"),
                ) {
                    (Some(u), Some(k)) => format!("{:.2} / {:.2}", u.0, k.0),
                    _ => "-".to_owned(),
                };
                println!(
                    "| {t} | {mode} | {} | {} | {} | {} | {split} | {} | {} |",
                    fmt(stats(&runs, t, mode, "rps"), 0),
                    fmt(stats(&runs, t, mode, "p50_ms"), 3),
                    fmt(stats(&runs, t, mode, "p99_ms"), 3),
                    fmt(stats(&runs, t, mode, "cpu_us_per_request"), 2),
                    ratio(if side_by_side {
                        stats(&runs, t, mode, "cpu_ratio")
                    } else {
                        paired(&runs, t, baseline, mode, "cpu_us_per_request")
                    }),
                    ratio(if side_by_side {
                        stats(&runs, t, mode, "rps_ratio")
                    } else {
                        paired(&runs, t, baseline, mode, "rps")
                    }),
                );
            }
        }
        println!();
    }
}

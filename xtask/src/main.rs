//! Project tasks: `cargo xtask <task>`. Run `cargo xtask help` for the list.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

mod bench;
mod bench_reload;
mod bench_sse;
mod bench_ws;
mod dev;
mod new_plugin;

const HELP: &str = "\
cargo xtask <task>

tasks:
  build-plugins [--release]   build every crate under plugins/ and install each library
                              as plugins/<name>.so (via a temporary name and a rename)
  new-plugin NAME             a new plugin crate in plugins/NAME (workspace member, a server
                              at NAME.localhost in servers.config.json, a test) that
                              builds and serves at once
  dev [-- HOST_ARGS...]       build the plugins, start the host, and rebuild and install a
                              plugin whenever its sources change (the host reloads it)
  bench [--quick] [--rounds N] [--duration S] [--rate R] [--only CASE] [--targets A,B]
                              the host against bare hyper (and nginx if installed):
                              req/s, latency, server CPU per request, start-up, memory.
                              Needs wrk (apt-get install -y wrk) and oha (cargo install
                              oha --locked); --quick takes about a minute
  bench-reload [--reloads N] [--clients C] [--tokio] [--process]
                              replace a plugin library N times (default 50) under load and
                              report failed requests, reload latency, memory, threads, fds
                              (--tokio: the plugin runs a tokio runtime of its own;
                              --process: in a worker process, isolation: process)
  bench-sse [--clients N] [--rate R] [--seconds S]
                              N clients (default 1000) each on hello's server-sent events at
                              R events/s (default 10): events delivered, host CPU, memory
  bench-ws [--rounds N] [--duration S] [--connections C] [--reloads R]
                              WebSockets: echo CPU per message side by side with a bare
                              tokio-tungstenite server, memory per idle connection, one
                              broadcast to C connections (default 10000), and C connections
                              held across R reloads (default 20)
  help                        this text
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let release = args.iter().any(|a| a == "--release");
    match args.first().map(String::as_str) {
        Some("build-plugins") => build_plugins(release).map(|_| ()),
        Some("dev") => {
            let host_args: Vec<String> = args
                .iter()
                .skip(1)
                .skip_while(|a| *a == "--")
                .cloned()
                .collect();
            dev::run(&host_args)
        }
        Some("new-plugin") => new_plugin::run(&args[1..]),
        Some("bench-reload") => bench_reload::run(&args[1..]),
        Some("bench-sse") => bench_sse::run(&args[1..]),
        Some("bench-ws") => bench_ws::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("help") | Some("--help") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n\n{HELP}"),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Where cargo builds: `$CARGO_TARGET_DIR` when set (cargo honours it, so the built
/// binaries are there), else the workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Every package of the workspace, as cargo metadata describes it.
fn workspace_packages() -> Result<Vec<Value>> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout)?;
    Ok(meta["packages"].as_array().cloned().unwrap_or_default())
}

/// Workspace packages whose manifest lives under `dir` and that build a cdylib, as
/// (name, manifest path).
fn cdylib_packages(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut names = Vec::new();
    for package in &workspace_packages()? {
        let manifest = Path::new(package["manifest_path"].as_str().unwrap_or_default());
        let is_cdylib = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| {
                t["crate_types"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c == "cdylib")
            });
        if is_cdylib && manifest.starts_with(dir) {
            names.push((
                package["name"].as_str().unwrap_or_default().to_owned(),
                manifest.to_owned(),
            ));
        }
    }
    names.sort();
    Ok(names)
}

/// Builds the packages and returns (package, library path) for each cdylib built.
fn build_cdylibs(packages: &[String], release: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--message-format=json-render-diagnostics")
        .current_dir(root());
    if release {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("building the plugins failed (the compiler's errors are above)");
    }
    let mut libs = Vec::new();
    for line in out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(msg) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = msg["target"]["crate_types"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c == "cdylib");
        if !is_cdylib {
            continue;
        }
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for file in msg["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if file.ends_with(std::env::consts::DLL_SUFFIX) {
                libs.push((name.clone(), PathBuf::from(file)));
            }
        }
    }
    Ok(libs)
}

/// Copies `from` to `dir/<name>.so` through a temporary file and a rename, so a host
/// watching `dir` never sees a half-written library.
fn install(from: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let dest = dir.join(format!("{name}{}", std::env::consts::DLL_SUFFIX));
    let tmp = dir.join(format!(".{name}{}.tmp", std::env::consts::DLL_SUFFIX));
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(dest)
}

fn build_plugins(release: bool) -> Result<Vec<PathBuf>> {
    let root = root();
    let plugins_dir = root.join("plugins");
    let packages: Vec<String> = cdylib_packages(&plugins_dir)?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    if packages.is_empty() {
        bail!("no plugin crates found under {}", plugins_dir.display());
    }
    let built = build_cdylibs(&packages, release)?;
    let mut installed = Vec::new();
    for (name, lib) in built {
        let dest = install(&lib, &plugins_dir, &name)?;
        println!(
            "built {name}: {}",
            dest.strip_prefix(&root).unwrap_or(&dest).display()
        );
        installed.push(dest);
    }
    Ok(installed)
}

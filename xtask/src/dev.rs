//! `cargo xtask dev`: the save-rebuild-see-it-live loop.
//!
//! Builds the plugins, starts the host, and watches every plugin crate's sources. When a
//! file in `plugins/<crate>/` changes, only that crate is rebuilt and installed (through
//! a temporary name and a rename); the running host picks the new library up by itself.
//! A failing build prints the compiler's errors and installs nothing, so the running
//! version keeps serving.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use notify_debouncer_full::notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};

use crate::{build_cdylibs, cargo, cdylib_packages, install, root};

pub fn run(host_args: &[String]) -> Result<()> {
    let root = root();
    let plugins_dir = root.join("plugins");
    crate::build_plugins(false)?;
    let status = cargo()
        .args(["build", "-p", "host"])
        .current_dir(&root)
        .status()
        .context("building the host")?;
    anyhow::ensure!(status.success(), "building the host failed");

    let (tx, rx) = mpsc::channel::<BTreeSet<PathBuf>>();
    let watched = plugins_dir.clone();
    let mut debouncer = new_debouncer(
        Duration::from_millis(200),
        None,
        move |result: DebounceEventResult| {
            let Ok(events) = result else { return };
            // The crate folders (plugins/<crate>) that saw a change in their sources.
            let crates: BTreeSet<PathBuf> = events
                .iter()
                .filter(|e| is_write(&e.kind))
                .flat_map(|e| e.paths.iter())
                .filter_map(|p| {
                    let rel = p.strip_prefix(&watched).ok()?;
                    let mut parts = rel.components();
                    let first = parts.next()?;
                    parts.next()?; // a file directly in plugins/ (an installed .so) is not a source
                    let name = first.as_os_str().to_str()?;
                    let hidden = rel
                        .components()
                        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
                    (!hidden && name != "target").then(|| watched.join(name))
                })
                .collect();
            if !crates.is_empty() {
                let _ = tx.send(crates);
            }
        },
    )?;
    debouncer.watch(&plugins_dir, RecursiveMode::Recursive)?;

    let mut host = Command::new(crate::target_dir().join("debug/host"))
        .args(host_args)
        .current_dir(&root)
        .spawn()
        .context("starting the host")?;
    println!(
        "dev: watching {} for changes; Ctrl-C stops the host and this task",
        plugins_dir.display()
    );

    loop {
        if let Some(status) = host.try_wait()? {
            anyhow::bail!("the host exited ({status})");
        }
        let Ok(mut crates) = rx.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        // Saves often come in bursts; take them all.
        while let Ok(more) = rx.try_recv() {
            crates.extend(more);
        }
        let packages = packages_in(&crates)?;
        if packages.is_empty() {
            continue;
        }
        println!("dev: rebuilding {}", packages.join(", "));
        match build_cdylibs(&packages, false) {
            Ok(built) => {
                for (name, lib) in built {
                    let dest = install(&lib, &plugins_dir, &name)?;
                    println!(
                        "dev: installed {}",
                        dest.strip_prefix(&root).unwrap_or(&dest).display()
                    );
                }
            }
            Err(e) => println!("dev: {e}; the running version keeps serving"),
        }
    }
}

/// Whether an event is a change. Reads are not: cargo opens every source when it builds,
/// and counting that would rebuild forever.
fn is_write(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The workspace packages whose manifests live in `crate_dirs`.
fn packages_in(crate_dirs: &BTreeSet<PathBuf>) -> Result<Vec<String>> {
    let all = cdylib_packages(&root().join("plugins"))?;
    Ok(all
        .into_iter()
        .filter(|(_, manifest)| {
            crate_dirs
                .iter()
                .any(|d| manifest.parent() == Some(d.as_path()))
        })
        .map(|(name, _)| name)
        .collect())
}

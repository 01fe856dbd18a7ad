//! Watching the plugin folder and the config file (notify, through a debouncer).
//!
//! The watcher only says *that* something changed and when it was first noticed; the
//! control loop then looks at the folder or the file itself. So a missed, merged or
//! out-of-order event cannot leave the host in a wrong state: the next look fixes it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify_debouncer_full::notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult, Debouncer, RecommendedCache};
use tokio::sync::mpsc;

/// Something changed on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A library in the plugin folder was created, changed, renamed or removed.
    Plugins { since: Instant },
    /// The config file was written or replaced.
    Config { since: Instant },
    /// A certificate or key file named in `global.tls` was written, replaced or removed.
    Certificates,
}

/// Keeps the watch alive; dropping it stops watching.
pub struct Watch {
    debouncer: Mutex<Debouncer<RecommendedWatcher, RecommendedCache>>,
    /// The certificate and key files that count, as absolute paths.
    certificates: Arc<Mutex<HashSet<PathBuf>>>,
    /// Folders watched for them (beyond the plugin and config folders).
    folders: Mutex<HashSet<PathBuf>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

/// Watches `plugin_dir`, `config_file` and the `certificates` files, and sends a
/// [`Change`] to `tx` for each debounced batch of events that concerns them.
pub fn watch(
    plugin_dir: &Path,
    config_file: &Path,
    certificates: &[PathBuf],
    debounce: Duration,
    tx: mpsc::UnboundedSender<Change>,
) -> Result<Watch, String> {
    let plugin_dir = plugin_dir
        .canonicalize()
        .map_err(|e| format!("cannot watch plugin folder {}: {e}", plugin_dir.display()))?;
    let config_file = absolute(config_file)?;
    let config_dir = config_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tx_first = tx.clone();
    let dir = plugin_dir.clone();
    let file = config_file.clone();
    let cert_files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
    let certs = cert_files.clone();
    let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
        let events = match result {
            Ok(events) => events,
            Err(errors) => {
                for e in errors {
                    tracing::warn!("file watcher: {e}");
                }
                // Something may have been missed: look at everything again.
                let _ = tx.send(Change::Plugins {
                    since: Instant::now(),
                });
                let _ = tx.send(Change::Config {
                    since: Instant::now(),
                });
                let _ = tx.send(Change::Certificates);
                return;
            }
        };
        let mut plugins: Option<Instant> = None;
        let mut config: Option<Instant> = None;
        let mut certificates = false;
        let certs = certs.lock().unwrap_or_else(|p| p.into_inner());
        for event in events.iter().filter(|e| is_change(&e.kind)) {
            for path in &event.paths {
                let earliest =
                    |t: Option<Instant>| Some(t.map_or(event.time, |t| t.min(event.time)));
                if certs.contains(path) {
                    certificates = true;
                }
                if path == &file {
                    config = earliest(config);
                } else if path == &dir
                    || (path.parent() == Some(dir.as_path())
                        && crate::control::servers::is_library(path))
                {
                    // A library in the folder, or the folder itself (moved away, removed
                    // or put back: seen by the config folder's watch when it is the
                    // parent, as the folder's own watch may not report it).
                    plugins = earliest(plugins);
                }
            }
        }
        if let Some(since) = plugins {
            let _ = tx.send(Change::Plugins { since });
        }
        if let Some(since) = config {
            let _ = tx.send(Change::Config { since });
        }
        if certificates {
            let _ = tx.send(Change::Certificates);
        }
    })
    .map_err(|e| format!("cannot start the file watcher: {e}"))?;
    debouncer
        .watch(&plugin_dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch plugin folder {}: {e}", plugin_dir.display()))?;
    if config_dir != plugin_dir {
        // The folder, not the file: editors and `mv` replace the file with a new inode.
        debouncer
            .watch(&config_dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch config folder {}: {e}", config_dir.display()))?;
    }
    // Whatever changed between start-up's look and the watch being in place is found by
    // one look right away.
    let _ = tx_first.send(Change::Plugins {
        since: Instant::now(),
    });
    let _ = tx_first.send(Change::Config {
        since: Instant::now(),
    });
    let watch = Watch {
        debouncer: Mutex::new(debouncer),
        certificates: cert_files,
        folders: Mutex::new(HashSet::from([plugin_dir, config_dir])),
    };
    watch.certificates(certificates);
    Ok(watch)
}

impl Watch {
    /// Watches these certificate and key files from now on (instead of those named
    /// before): their folders, as tools replace such files by renaming a new one in.
    /// A folder that cannot be watched is logged; its files are read again only when the
    /// config changes.
    pub fn certificates(&self, files: &[PathBuf]) {
        let mut wanted = HashSet::new();
        let mut folders = self.folders.lock().unwrap_or_else(|p| p.into_inner());
        let mut debouncer = self.debouncer.lock().unwrap_or_else(|p| p.into_inner());
        for file in files {
            let Ok(file) = absolute(file) else {
                tracing::warn!(
                    "cannot watch {} for changes: its folder cannot be read",
                    file.display()
                );
                continue;
            };
            if let Some(folder) = file.parent() {
                if !folders.contains(folder) {
                    match debouncer.watch(folder, RecursiveMode::NonRecursive) {
                        Ok(()) => {
                            folders.insert(folder.to_owned());
                        }
                        Err(e) => tracing::warn!(
                            "cannot watch {} for certificate changes: {e}",
                            folder.display()
                        ),
                    }
                }
            }
            wanted.insert(file);
        }
        *self.certificates.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
    }
}

/// Reads (ours included) are not changes.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn absolute(file: &Path) -> Result<PathBuf, String> {
    let name = file
        .file_name()
        .ok_or_else(|| format!("{} is not a file name", file.display()))?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent
        .canonicalize()
        .map_err(|e| format!("cannot watch {}: {e}", parent.display()))?;
    Ok(parent.join(name))
}

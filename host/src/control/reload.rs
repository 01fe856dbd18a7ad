//! The control loop: applies plugin-folder and config-file changes while the host
//! serves, from the file watcher and from SIGHUP.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::control::config;
use crate::control::servers::Microservers;
use crate::control::watch::{Change, Watch};
use crate::edge::serve::Listeners;
use crate::edge::tls::Tls;

/// How often to look again at a library that was incomplete (still being written).
const RETRY_INCOMPLETE: Duration = Duration::from_millis(200);
/// How many times to look again before leaving it to the next file event.
const RETRY_LIMIT: u32 = 25;

/// Where the control loop gets its inputs.
#[derive(Debug)]
pub struct ControlLoop {
    pub servers: Arc<Microservers>,
    pub listeners: Arc<Listeners>,
    pub tls: Arc<Tls>,
    /// To watch the certificate files a new config names.
    pub watch: Weak<Watch>,
    pub config_file: PathBuf,
    /// Listen addresses were given on the command line: they win over the config's.
    pub listen_override: bool,
}

/// Sends every kind of change for each SIGHUP (the config file, the plugin folder and
/// the certificates are all looked at again, as if each had changed), until `changes`
/// closes. Works with the watcher off (`global.reload.watch: false`) too.
#[cfg(unix)]
pub async fn forward_hangups(
    mut hangups: tokio::signal::unix::Signal,
    changes: mpsc::UnboundedSender<Change>,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received: reading the config file and the plugin folder again");
        let since = Instant::now();
        let sent = [
            Change::Config { since },
            Change::Plugins { since },
            Change::Certificates,
        ]
        .into_iter()
        .all(|change| changes.send(change).is_ok());
        if !sent {
            return;
        }
    }
}

impl ControlLoop {
    /// Runs until `changes` closes.
    pub async fn run(self, mut changes: mpsc::UnboundedReceiver<Change>) {
        let mut retries = 0u32;
        loop {
            let change = if retries > 0 {
                match tokio::time::timeout(RETRY_INCOMPLETE, changes.recv()).await {
                    Ok(Some(change)) => change,
                    Ok(None) => return,
                    Err(_) => Change::Plugins {
                        since: Instant::now(),
                    },
                }
            } else {
                match changes.recv().await {
                    Some(change) => change,
                    None => return,
                }
            };
            // Take everything already queued, so a burst is handled once.
            let mut plugins: Option<Instant> = None;
            let mut config: Option<Instant> = None;
            let mut certificates = false;
            let mut note = |c: Change| match c {
                Change::Plugins { since } => {
                    plugins = Some(plugins.map_or(since, |p| p.min(since)))
                }
                Change::Config { since } => config = Some(config.map_or(since, |p| p.min(since))),
                Change::Certificates => certificates = true,
            };
            note(change);
            while let Ok(more) = changes.try_recv() {
                note(more);
            }
            if let Some(since) = config {
                self.apply_config(since).await;
            } else if certificates {
                // With the certificate settings in force.
                let servers = self.servers.clone();
                let tls = self.tls.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let config = servers.config();
                    tls.apply(
                        &config.global.tls,
                        &config.domains(),
                        config.global.has_tls(),
                    );
                })
                .await;
            }
            if let Some(since) = plugins {
                let servers = self.servers.clone();
                let report = tokio::task::spawn_blocking(move || servers.sync_plugins(since))
                    .await
                    .unwrap_or_default();
                retries = if report.retry && retries < RETRY_LIMIT {
                    retries + 1
                } else {
                    0
                };
            }
        }
    }

    async fn apply_config(&self, since: Instant) {
        let new = match config::load(&self.config_file) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(
                    "config change rejected; the running configuration stays in force: {}",
                    e.one_line()
                );
                return;
            }
        };
        if !self.listen_override {
            if let Err(e) = self.listeners.apply(&new.global.listen).await {
                tracing::error!(
                    "config change rejected; the running configuration stays in force: {e}"
                );
                return;
            }
        }
        let servers = self.servers.clone();
        let keep_listen = self.listen_override;
        let (tls, tls_settings, domains) =
            (self.tls.clone(), new.global.tls.clone(), new.domains());
        let certificate_files = Tls::files(&tls_settings);
        // Listeners from the command line (all plain) win over the config's.
        let in_use = !self.listen_override && new.global.has_tls();
        let access_log = new.global.access_log.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let applied = servers.apply_config(new, since, keep_listen);
            if applied.is_some() {
                if let Err(e) = crate::request::access_log::configure(access_log.as_ref()) {
                    tracing::error!("{e}; the access log stays as it was");
                }
            }
            // Certificates are read again in any case: the config's change may have been
            // one of theirs.
            tls.apply(&tls_settings, &domains, in_use);
            applied
        })
        .await;
        if let Some(watch) = self.watch.upgrade() {
            watch.certificates(&certificate_files);
        }
        if let Ok(Some(_)) = applied {
            tracing::info!(
                took_ms = since.elapsed().as_micros() as f64 / 1000.0,
                "applied config change from {}",
                self.config_file.display()
            );
        }
    }
}

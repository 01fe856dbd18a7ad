//! Steering servers from the admin API: reload one, enable or disable it, drain it; and
//! the history of the last reloads.
//!
//! Each change takes the control lock for its whole length, as a plugin-folder or
//! config-file change does, so it is serialised with the watcher's reloads: it never
//! runs halfway through one of theirs, nor they through it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::{Microservers, Report, Resolution, Server, ServerState, Timing};

/// How many reloads the history keeps.
pub const HISTORY: usize = 100;

/// Why a drained server's domains answer 503.
const DRAINED: &str = "drained through the admin API; enable it to serve again";

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The host starting.
    Start,
    /// A library in the plugin folder changed.
    PluginFolder,
    /// The config file changed.
    ConfigFile,
    /// The admin API (reload or enable).
    AdminApi,
    /// A worker process died, and was restarted.
    WorkerCrash,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::PluginFolder => "plugin_folder",
            Cause::ConfigFile => "config_file",
            Cause::AdminApi => "admin_api",
            Cause::WorkerCrash => "worker_crash",
        }
    }
}

/// One reload: a generation started (or not) for a server.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: SystemTime,
    pub server: Arc<str>,
    pub cause: Cause,
    /// The generation started, or why none was.
    pub outcome: Result<u64, String>,
    /// From the change being noticed to the generation serving (or the failure).
    pub took: Duration,
    /// From the host starting on it.
    pub work: Duration,
}

/// Why a change asked through the admin API was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No server has this name.
    NoSuchServer,
    /// The change cannot be applied; the reason says why.
    Conflict(String),
}

/// What a change did.
#[derive(Debug, Clone)]
pub struct Steered {
    pub message: String,
    /// The generation serving afterwards, if any.
    pub generation: Option<u64>,
}

impl Server {
    /// Whether it was drained through the admin API (and not enabled since).
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }
}

impl Microservers {
    /// Adds a reload to the history (where it is logged).
    pub(super) fn note_reload(
        &self,
        server: &Server,
        timing: Timing,
        outcome: Result<u64, String>,
    ) {
        let mut reloads = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
        if reloads.len() == HISTORY {
            reloads.pop_front();
        }
        reloads.push_back(ReloadRecord {
            at: SystemTime::now(),
            server: server.name.clone(),
            cause: timing.cause,
            outcome,
            took: timing.since.elapsed(),
            work: timing.started.elapsed(),
        });
    }

    /// The last reloads ([`HISTORY`] at most), oldest first.
    pub fn reload_history(&self) -> Vec<ReloadRecord> {
        let reloads = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
        reloads.iter().cloned().collect()
    }

    /// Starts a new generation of the server called `name`, even if its library did not
    /// change (a changed library in the plugin folder is loaded first). Its state is
    /// handed over as in any reload; on failure the current generation keeps serving.
    pub fn reload_server(&self, name: &str) -> Result<Steered, Refusal> {
        let timing = Timing::new(Instant::now(), Cause::AdminApi);
        let mut report = Report::default();
        let mut control = self.control();
        if control.stopping {
            return Err(Refusal::Conflict("the host is stopping".to_owned()));
        }
        let Some(index) = control.servers.iter().position(|e| e.spec.name == name) else {
            return Err(
                match control.config.servers.iter().any(|s| s.name == name) {
                    true => Refusal::Conflict(format!(
                        "server {name:?} is disabled: enable it to start it"
                    )),
                    false => Refusal::NoSuchServer,
                },
            );
        };
        if control.drained.contains(name) {
            return Err(Refusal::Conflict(format!(
                "server {name:?} is drained: enable it to start it again"
            )));
        }
        let entry = &mut control.servers[index];
        if entry.spec.plugin.is_none() {
            return Err(Refusal::Conflict(format!(
                "server {name:?} serves static files only: it has no plugin to reload"
            )));
        }
        let server = entry.server.clone();
        let before = server.generation_number();
        // Forgetting what was tried, and what serves, is what makes the same library
        // start again.
        entry.tried = None;
        entry.serving = None;
        self.sync_files(&mut control, &mut report);
        self.sync_servers(&mut control, timing, &mut report);
        self.publish(&control);
        match server.generation_number() {
            Some(number) if Some(number) != before => Ok(Steered {
                message: format!("reloaded: generation {number} serving"),
                generation: Some(number),
            }),
            _ => Err(Refusal::Conflict(why_not(&server, &report))),
        }
    }

    /// Enables or disables the server called `name` (its config entry's `enabled`, until
    /// the host stops; the file is the caller's business). Enabling a drained server
    /// starts it again. An enable that cannot start the server (its plugin missing,
    /// refused, or failing its init) changes nothing.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<Steered, Refusal> {
        let timing = Timing::new(Instant::now(), Cause::AdminApi);
        let mut report = Report::default();
        let mut control = self.control();
        if control.stopping {
            return Err(Refusal::Conflict("the host is stopping".to_owned()));
        }
        let Some(index) = control.config.servers.iter().position(|s| s.name == name) else {
            let drop_in = control
                .servers
                .iter()
                .any(|e| e.spec.implicit && e.spec.name == name);
            return Err(match drop_in {
                true => Refusal::Conflict(format!(
                    "server {name:?} is a drop-in plugin without a config entry: give it an entry in servers to enable or disable it"
                )),
                false => Refusal::NoSuchServer,
            });
        };
        let was_enabled = control.config.servers[index].enabled;
        let was_drained = control.drained.contains(name);
        if was_enabled == enabled && !was_drained {
            let state = if enabled { "enabled" } else { "disabled" };
            return Ok(Steered {
                message: format!("already {state}"),
                generation: self.generation_of(&control.servers, name),
            });
        }
        if enabled {
            // Refused before anything changes: a plugin that is not there.
            self.sync_files(&mut control, &mut report);
            if let Some(plugin) = control.config.servers[index].plugin.as_deref() {
                match Self::resolve(&control, plugin) {
                    Resolution::Library(_) => {}
                    Resolution::Missing(reason) => return Err(Refusal::Conflict(reason)),
                    Resolution::Refused(e) => {
                        return Err(Refusal::Conflict(format!("its plugin was refused: {e}")))
                    }
                }
            }
        }
        let set = |control: &mut super::Control, enabled: bool, drained: bool| {
            control.enabled.insert(name.to_owned(), enabled);
            control.config.servers[index].enabled = enabled;
            if drained {
                control.drained.insert(name.to_owned());
            } else {
                control.drained.remove(name);
            }
        };
        set(&mut control, enabled, false);
        // A library checked only for worker processes is opened here if an in-process
        // server now needs it.
        self.sync_files(&mut control, &mut report);
        self.sync_servers(&mut control, timing, &mut report);
        self.publish(&control);
        if !enabled {
            return Ok(Steered {
                message: "disabled".to_owned(),
                generation: None,
            });
        }
        let started = control
            .servers
            .iter()
            .find(|e| e.spec.name == name)
            .map(|e| e.server.clone());
        match started {
            Some(server) if !matches!(**server.state(), ServerState::Waiting(_)) => Ok(Steered {
                message: "enabled".to_owned(),
                generation: server.generation_number(),
            }),
            started => {
                let reason = started.map_or_else(
                    || "the server did not start".to_owned(),
                    |s| why_not(&s, &report),
                );
                set(&mut control, was_enabled, was_drained);
                self.sync_servers(&mut control, timing, &mut Report::default());
                self.publish(&control);
                Err(Refusal::Conflict(reason))
            }
        }
    }

    /// Drains the server called `name`: no new request enters it (its domains answer
    /// 503), the requests in flight finish (up to `global.reload.drain_timeout`), then
    /// its generation's shutdown hook runs. It stays so until it is enabled again.
    pub fn drain_server(&self, name: &str) -> Result<Steered, Refusal> {
        let timing = Timing::new(Instant::now(), Cause::AdminApi);
        let mut control = self.control();
        if control.stopping {
            return Err(Refusal::Conflict("the host is stopping".to_owned()));
        }
        if !control.servers.iter().any(|e| e.spec.name == name) {
            return Err(
                match control.config.servers.iter().any(|s| s.name == name) {
                    true => Refusal::Conflict(format!(
                        "server {name:?} is disabled: it has nothing to drain"
                    )),
                    false => Refusal::NoSuchServer,
                },
            );
        }
        if !control.drained.insert(name.to_owned()) {
            return Ok(Steered {
                message: "already drained".to_owned(),
                generation: None,
            });
        }
        self.sync_servers(&mut control, timing, &mut Report::default());
        self.publish(&control);
        Ok(Steered {
            message: "drained".to_owned(),
            generation: None,
        })
    }

    /// Puts a server in the drained state, retiring what it was serving.
    pub(super) fn drain(&self, server: &Arc<Server>, timeout: Duration) {
        server.drained.store(true, Ordering::Relaxed);
        if server.waiting_reason().as_deref() == Some(DRAINED) {
            return;
        }
        tracing::info!(server = %server.name, "drained: its domains answer 503 until it is enabled again");
        server.sockets.close_all("the server is drained", false);
        let previous = server
            .state
            .swap(Arc::new(ServerState::Waiting(DRAINED.to_owned())));
        self.retire_state(&previous, timeout);
    }

    fn generation_of(&self, servers: &[super::ServerEntry], name: &str) -> Option<u64> {
        let entry = servers.iter().find(|e| e.spec.name == name)?;
        entry.server.generation_number()
    }
}

/// Why a server did not reach a new generation: what the change reported about it, or
/// its last reload's error, or its waiting reason.
fn why_not(server: &Server, report: &Report) -> String {
    let prefix = format!("server {:?}: ", &*server.name);
    if let Some(problem) = report
        .problems
        .iter()
        .rev()
        .find(|p| p.starts_with(&prefix))
    {
        return problem[prefix.len()..].to_owned();
    }
    if let (Some(note), _) = server.meter.last_reload() {
        if let (false, Some(error)) = (note.ok, note.error) {
            return error;
        }
    }
    server
        .waiting_reason()
        .unwrap_or_else(|| "no new generation started".to_owned())
}

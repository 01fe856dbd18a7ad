//! The set of microservers: which library and config each server runs, and the routing
//! snapshot requests read.
//!
//! Invariant: routing is never mutated in place. A [`Routing`] snapshot is built whole
//! and swapped in atomically; a server's current generation is swapped the same way, so
//! every domain of a server changes generation at the same instant.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Limits};
use crate::domain::{DomainPattern, DomainTable};
use crate::loader::{self, LoadError, PluginLibrary};
use crate::plugin::{Generation, Instance};

/// A server from the config (or a library served without an entry).
#[derive(Debug)]
pub struct Server {
    pub name: Arc<str>,
    pub domains: Vec<DomainPattern>,
    /// The `plugin` the config asked for.
    pub plugin: String,
    /// True for a library served at `<name>.localhost` without a config entry.
    pub implicit: bool,
    state: ArcSwap<ServerState>,
    generations: AtomicU64,
}

/// What a server is doing right now.
#[derive(Debug)]
pub enum ServerState {
    Serving(Arc<Generation>),
    /// Not serving; its domains answer 503 with this reason.
    Waiting(String),
}

impl Server {
    pub fn state(&self) -> arc_swap::Guard<Arc<ServerState>> {
        self.state.load()
    }

    fn set_state(&self, state: ServerState) -> Arc<ServerState> {
        self.state.swap(Arc::new(state))
    }

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The snapshot every request reads: domains to servers, and the request limits.
#[derive(Debug)]
pub struct Routing {
    pub domains: DomainTable<Arc<Server>>,
    pub servers: Vec<Arc<Server>>,
    pub limits: Limits,
}

/// What went wrong while bringing servers up; `--check` turns these into exit code 2.
#[derive(Debug, Default)]
pub struct StartReport {
    pub problems: Vec<String>,
}

/// All microservers of this host and the libraries they run.
pub struct Microservers {
    routing: ArcSwap<Routing>,
    plugin_dir: PathBuf,
    copies_dir: PathBuf,
}

impl std::fmt::Debug for Microservers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Microservers")
            .field("plugin_dir", &self.plugin_dir)
            .finish_non_exhaustive()
    }
}

/// The name a library file is known by: `hello` for `hello.so` and `libhello.so`.
pub fn file_stem(file: &Path) -> Option<String> {
    let stem = file.file_stem()?.to_str()?;
    Some(
        stem.strip_prefix("lib")
            .filter(|s| !s.is_empty())
            .unwrap_or(stem)
            .to_owned(),
    )
}

fn same_name(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let norm = |c: u8| {
                if c == b'-' {
                    b'_'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            norm(x) == norm(y)
        })
}

/// Library files in `dir`, sorted by name.
pub fn scan_plugin_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(std::env::consts::DLL_EXTENSION))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

impl Microservers {
    /// Loads every library in the plugin folder and starts every enabled server.
    /// A server that cannot start is left waiting; the report lists why.
    pub fn start(config: &Config, plugin_dir: PathBuf) -> (Self, StartReport) {
        let copies_dir = std::env::temp_dir().join(format!("plugin-host-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&copies_dir);
        let mut report = StartReport::default();

        let files = match scan_plugin_dir(&plugin_dir) {
            Ok(files) => files,
            Err(e) => {
                let message = format!("plugin folder {}: {e}", plugin_dir.display());
                tracing::error!("{message}");
                report.problems.push(message);
                Vec::new()
            }
        };
        let mut libraries: Vec<Arc<PluginLibrary>> = Vec::new();
        let mut failures: Vec<LoadError> = Vec::new();
        for file in files {
            match loader::load(&file, &copies_dir) {
                Ok(library) => {
                    tracing::info!(
                        plugin = %library.name,
                        version = %library.version,
                        api = %library.api_version,
                        file = %file.display(),
                        "loaded plugin library"
                    );
                    libraries.push(Arc::new(library));
                }
                Err(e) => {
                    tracing::error!("refused plugin {e}");
                    report.problems.push(e.to_string());
                    failures.push(e);
                }
            }
        }

        let mut servers: Vec<Arc<Server>> = Vec::new();
        let mut used = vec![false; libraries.len()];
        for entry in config.servers.iter().filter(|s| s.enabled) {
            let server = Arc::new(Server {
                name: entry.name.as_str().into(),
                domains: entry.domains.clone(),
                plugin: entry.plugin.clone(),
                implicit: false,
                state: ArcSwap::from_pointee(ServerState::Waiting(String::new())),
                generations: AtomicU64::new(0),
            });
            let found = libraries.iter().position(|l| {
                file_stem(&l.file).is_some_and(|s| same_name(&s, &entry.plugin))
                    || same_name(&l.name, &entry.plugin)
            });
            let state = match found {
                Some(i) => {
                    used[i] = true;
                    start_generation(&server, &libraries[i], &entry.plugin_config, None)
                }
                None => {
                    let reason = match failures
                        .iter()
                        .find(|f| file_stem(&f.file).is_some_and(|s| same_name(&s, &entry.plugin)))
                    {
                        Some(failure) => format!("its plugin was refused: {failure}"),
                        None => format!(
                            "no plugin named {:?} in {} (looked for {p}.{ext}, lib{p}.{ext} and plugin names)",
                            entry.plugin,
                            plugin_dir.display(),
                            p = entry.plugin,
                            ext = std::env::consts::DLL_EXTENSION
                        ),
                    };
                    ServerState::Waiting(reason)
                }
            };
            report_state(&server, &state, &mut report);
            server.set_state(state);
            servers.push(server);
        }

        // Libraries no server names are served at `<name>.localhost`, so dropping a file
        // into the plugin folder is enough to try it.
        let claimed: Vec<&DomainPattern> = config
            .servers
            .iter()
            .filter(|s| s.enabled)
            .flat_map(|s| &s.domains)
            .collect();
        for (library, _) in libraries.iter().zip(&used).filter(|(_, used)| !**used) {
            let label = library.name.replace('_', "-").to_ascii_lowercase();
            let Ok(domain) = DomainPattern::parse(&format!("{label}.localhost")) else {
                tracing::warn!(plugin = %library.name, "cannot serve this plugin at <name>.localhost: its name is not a valid domain label");
                continue;
            };
            if claimed.contains(&&domain)
                || servers.iter().any(|s| &*s.name == library.name.as_str())
            {
                tracing::warn!(plugin = %library.name, %domain, "not serving this plugin at its implicit domain: a configured server already uses that name or domain");
                continue;
            }
            let server = Arc::new(Server {
                name: library.name.as_str().into(),
                domains: vec![domain],
                plugin: library.name.clone(),
                implicit: true,
                state: ArcSwap::from_pointee(ServerState::Waiting(String::new())),
                generations: AtomicU64::new(0),
            });
            let state = start_generation(&server, library, "null", None);
            report_state(&server, &state, &mut report);
            server.set_state(state);
            servers.push(server);
        }

        let routing = build_routing(config, servers);
        let this = Microservers {
            routing: ArcSwap::from_pointee(routing),
            plugin_dir,
            copies_dir,
        };
        (this, report)
    }

    /// The current routing snapshot.
    pub fn routing(&self) -> arc_swap::Guard<Arc<Routing>> {
        self.routing.load()
    }

    /// Calls the shutdown hook of every serving generation (the host is stopping).
    pub fn shutdown_all(&self) {
        for server in &self.routing.load().servers {
            if let ServerState::Serving(generation) = &**server.state() {
                generation.shutdown();
                tracing::info!(server = %server.name, generation = generation.number, "shut down");
            }
        }
    }
}

impl Drop for Microservers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.copies_dir);
    }
}

fn start_generation(
    server: &Arc<Server>,
    library: &Arc<PluginLibrary>,
    plugin_config: &str,
    previous_state: Option<&[u8]>,
) -> ServerState {
    match Instance::create(library.clone(), &server.name, plugin_config, previous_state) {
        Ok((instance, routes)) => ServerState::Serving(Generation::new(
            server.name.clone(),
            server.next_generation(),
            instance,
            routes,
        )),
        Err(reason) => ServerState::Waiting(format!(
            "plugin {} ({}) failed to initialise: {reason}",
            library.name,
            library.file.display()
        )),
    }
}

fn report_state(server: &Server, state: &ServerState, report: &mut StartReport) {
    let domains: Vec<String> = server.domains.iter().map(ToString::to_string).collect();
    let domains = domains.join(" ");
    match state {
        ServerState::Serving(g) => tracing::info!(
            server = %server.name,
            plugin = %g.plugin().name,
            version = %g.plugin().version,
            file = %g.plugin().file.display(),
            %domains,
            generation = g.number,
            "serving"
        ),
        ServerState::Waiting(reason) => {
            tracing::error!(server = %server.name, %domains, "not serving: {reason}");
            report
                .problems
                .push(format!("server {:?}: {reason}", &*server.name));
        }
    }
}

fn build_routing(config: &Config, servers: Vec<Arc<Server>>) -> Routing {
    let mut domains = DomainTable::default();
    let by_name: HashMap<&str, &Arc<Server>> = servers.iter().map(|s| (&*s.name, s)).collect();
    for server in &servers {
        for domain in &server.domains {
            domains.insert(domain, server.clone());
        }
    }
    let default = config
        .global
        .default_server
        .as_deref()
        .and_then(|name| by_name.get(name))
        .map(|s| (*s).clone());
    domains.set_default(default);
    Routing {
        domains,
        servers,
        limits: config.global.limits.clone(),
    }
}

//! `host`: serve the microservers named in `servers.config.json`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Weak};

use clap::{Parser, ValueEnum};
use host::control::config::{self, Config};
use host::control::reload::ControlLoop;
use host::control::servers::Microservers;
use host::control::watch;
use host::edge::serve::Listeners;
use host::edge::tls::Tls;
use tracing_subscriber::EnvFilter;

/// Runs many web microservers, each a plugin library, in one process, routed by domain.
///
/// Exit codes: 0 after a clean shutdown (SIGINT/SIGTERM) or a passing --check; 1 if the
/// host could not start (for example a listen address in use); 2 for a bad config, bad
/// arguments, or a failing --check. SIGHUP reads the config file and the plugin folder
/// again.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The config file. Default: $SERVERS_CONFIG, else ./servers.config.json.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Validate the config and load every plugin (ABI check and init), then exit 0 if all
    /// is well or 2 with every problem listed. Serves nothing.
    #[arg(long)]
    check: bool,

    /// Listen on this address instead of global.listen (repeatable), e.g. 127.0.0.1:8080:
    /// plain HTTP/1.1 and HTTP/2.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,

    /// Serve the admin listener (health, metrics) on this address instead of
    /// global.admin.listen, e.g. 127.0.0.1:0 for a free port; `off` turns it off.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,

    /// Load plugins from this folder instead of global.plugin_dir.
    #[arg(long, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,

    /// How log lines are written to stderr: `text` for people, `json` for log
    /// collectors (one JSON object a line, with the same fields).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Internal: load one plugin library and exit 0 (loaded) or 3 (refused). The host
    /// runs itself this way before it loads a library, so that a library that crashes
    /// when loaded crashes only this child.
    #[arg(long, value_name = "FILE", hide = true)]
    probe_plugin: Option<PathBuf>,

    /// Internal, with --probe-plugin: print what was found (name and versions, or why
    /// it was refused) as JSON.
    #[arg(long, hide = true)]
    probe_report: bool,

    /// Internal: run as the worker process of one server (`isolation: "process"`),
    /// from the folder its host prepared.
    #[arg(long, value_name = "DIR", hide = true)]
    worker: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Set with `--log-format json`: errors at start-up are log lines too.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// An error that stops the host: `error: ...` on stderr, or an ERROR line in the JSON log.
fn fail(message: impl std::fmt::Display) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::error!("{message}");
    } else {
        eprintln!("error: {message}");
    }
}

fn main() -> ExitCode {
    host::boundary::services::mark_host_thread();
    // Uptime counts from here.
    host::operations::recording::started_at();
    let args = Args::parse();
    if let Some(copy) = &args.probe_plugin {
        return host::boundary::loader::probe_main(copy, args.probe_report);
    }
    // Every library is loaded in a child process first (this same binary); a worker's
    // was, by its host.
    let exe = if args.worker.is_some() {
        None
    } else if cfg!(target_os = "linux") {
        Some(PathBuf::from("/proc/self/exe"))
    } else {
        std::env::current_exe().ok()
    };
    let probe = match exe {
        _ if args.worker.is_some() => Ok(()),
        exe => exe
            .ok_or_else(|| "cannot find this executable".to_owned())
            .and_then(host::boundary::loader::probe_with),
    };
    // A worker's own start-up lines would repeat its host's (which names the server,
    // the build and the worker's pid).
    let default_filter = if args.worker.is_some() {
        "info,host::control::servers=warn"
    } else {
        "info"
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            host::boundary::worker::set_json_logs(true);
            host::boundary::services::keep_plugin_fields_apart();
            logs.with_ansi(false)
                .fmt_fields(host::logging::JsonFields)
                .event_format(host::logging::JsonLines)
                .init();
        }
    }
    if let Some(dir) = &args.worker {
        return host::control::worker::main(dir);
    }
    if let Err(why) = probe {
        tracing::warn!("plugins are loaded in this process only, without a check in a child process first: {why}");
    }

    let config_path = args
        .config
        .clone()
        .or_else(|| std::env::var_os("SERVERS_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("servers.config.json"));
    let mut config = match config::load(&config_path) {
        Ok(config) => config,
        Err(e) => {
            fail(e);
            return ExitCode::from(2);
        }
    };
    if !args.listen.is_empty() {
        config.global.listen = args
            .listen
            .iter()
            .map(|a| config::Listen::plain(*a))
            .collect();
    }
    if let Some(admin) = &args.admin {
        match config::admin_override(config.global.admin.take(), admin) {
            Ok(admin) => config.global.admin = admin,
            Err(e) => {
                eprintln!("error: --admin: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let plugin_dir = match &args.plugin_dir {
        Some(dir) => dir.clone(),
        // A relative plugin_dir is relative to the folder that holds the config file.
        None => config_path
            .parent()
            .unwrap_or(std::path::Path::new(""))
            .join(&config.global.plugin_dir),
    };

    if args.check {
        return check(&config, &config_path, plugin_dir);
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(host::boundary::services::mark_host_thread)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fail(format_args!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let listen_override = !args.listen.is_empty();
    host::boundary::services::set_host_runtime(runtime.handle().clone());
    // Bulkheads: by default a server's plugin code may hold all the worker threads but
    // one (TOKIO_WORKER_THREADS sets how many there are).
    host::boundary::bulkhead::set_workers(runtime.metrics().num_workers());
    host::boundary::bulkhead::start_watchdog(runtime.handle().clone());
    let code = runtime.block_on(run(config, config_path, plugin_dir, listen_override));
    // Everything the host waits for at exit has been waited for, each under its deadline;
    // a task still on the blocking pool (a reload stuck in plugin code) must not hold up
    // the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn run(
    config: Config,
    config_file: PathBuf,
    plugin_dir: PathBuf,
    listen_override: bool,
) -> ExitCode {
    let stop = host::edge::serve::shutdown_signal();
    #[cfg(unix)]
    let hangups = host::edge::serve::hangups();
    let (listeners, accepted) = match Listeners::bind(&config.global.listen).await {
        Ok(l) => l,
        Err(e) => {
            fail(e);
            return ExitCode::FAILURE;
        }
    };
    // Listed certificates are loaded even with no TLS listener yet (a config change may
    // add one); the development one is made when a listener needs it.
    let tls = {
        let (settings, domains) = (config.global.tls.clone(), config.domains());
        let in_use = config.global.has_tls();
        match tokio::task::spawn_blocking(move || Tls::new(&settings, &domains, in_use)).await {
            Ok(tls) => tls,
            Err(e) => {
                fail(format_args!("loading the TLS certificates failed: {e}"));
                return ExitCode::FAILURE;
            }
        }
    };
    if let Err(e) = host::request::access_log::configure(config.global.access_log.as_ref()) {
        fail(e);
        return ExitCode::from(2);
    }
    // Before the servers start, so that what their `init` publishes reaches other hosts
    // once connected.
    if let config::BusBackend::Redis {
        url,
        channel_prefix,
    } = &config.global.bus.backend
    {
        if let Err(e) = host::boundary::relay::start(url, channel_prefix, config.global.bus.queue) {
            fail(format_args!("global.bus.url: {e}"));
            return ExitCode::from(2);
        }
    }
    let servers = {
        let config = config.clone();
        let dir = plugin_dir.clone();
        match tokio::task::spawn_blocking(move || Microservers::start(&config, dir)).await {
            Ok((servers, _report)) => {
                let servers = Arc::new(servers);
                // Worker processes that die are restarted.
                servers.supervise();
                servers
            }
            Err(e) => {
                fail(format_args!("starting the servers failed: {e}"));
                return ExitCode::FAILURE;
            }
        }
    };
    if let Some(admin) = &config.global.admin {
        if let Err(e) = host::operations::admin::start(admin, &servers, config_file.clone()).await {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Keyed rate limiters forget idle clients and tenants, so their memory stays bounded.
    tokio::spawn(host::request::rate_limits::forget_idle_keys(
        Arc::downgrade(&servers),
    ));
    // Service calls between servers go through the request path (held weakly: the
    // servers end with `run`).
    host::request::http::serve_service_calls(&servers, "the host is shutting down");
    // One control loop applies every change, whether the watcher saw it or a SIGHUP
    // asked for a look.
    let (changes, changed) = tokio::sync::mpsc::unbounded_channel();
    let reload = &config.global.reload;
    let _watch = if reload.watch {
        let certificates = Tls::files(&config.global.tls);
        match watch::watch(
            &plugin_dir,
            &config_file,
            &certificates,
            reload.debounce,
            changes.clone(),
        ) {
            Ok(watch) => {
                tracing::info!(
                    plugin_dir = %plugin_dir.display(),
                    debounce_ms = reload.debounce.as_millis() as u64,
                    "watching the plugin folder and the config file for changes"
                );
                Some(Arc::new(watch))
            }
            Err(e) => {
                tracing::warn!("hot reload is off: {e}");
                None
            }
        }
    } else {
        None
    };
    let control = ControlLoop {
        servers: servers.clone(),
        listeners: listeners.clone(),
        tls: tls.clone(),
        watch: _watch.as_ref().map_or_else(Weak::new, Arc::downgrade),
        config_file,
        listen_override,
    };
    tokio::spawn(control.run(changed));
    #[cfg(unix)]
    let hangups = hangups.map(|h| tokio::spawn(host::control::reload::forward_hangups(h, changes)));
    let grace = config.global.shutdown_timeout;
    let requests_until =
        host::edge::serve::serve(servers.clone(), listeners, tls, accepted, stop, grace).await;
    // No more file events or SIGHUPs; then every server stops: requests still inside a
    // plugin get what is left of the grace period, then every shutdown hook runs, with a
    // deadline.
    drop(_watch);
    #[cfg(unix)]
    if let Some(hangups) = hangups {
        hangups.abort();
    }
    let stopping = servers.clone();
    let stopped = tokio::task::spawn_blocking(move || stopping.shutdown_all(requests_until, grace));
    let _ = stopped.await;
    host::request::access_log::flush();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn check(config: &Config, config_path: &std::path::Path, plugin_dir: PathBuf) -> ExitCode {
    let (servers, mut report) = Microservers::start(config, plugin_dir);
    servers.shutdown_all(std::time::Instant::now(), config.global.shutdown_timeout);
    report
        .problems
        .extend(host::edge::tls::check(&config.global.tls));
    if report.problems.is_empty() {
        let n = servers.routing().servers.len();
        println!(
            "ok: {} is valid and all {n} servers can start",
            config_path.display()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {} problem(s):", report.problems.len());
        for p in &report.problems {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    }
}

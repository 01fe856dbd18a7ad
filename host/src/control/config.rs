//! `servers.config.json`: parsing, `${VAR}` substitution and validation.
//!
//! Validation walks the JSON by hand instead of through `#[serde(deny_unknown_fields)]`
//! so that it can report every problem at once, each with its JSON path.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::routing::domain::{DomainPattern, InvalidDomain};

mod headers;
mod jwt;
mod persist;

pub use headers::{
    joined, CompressionRules, CorsRules, Hsts, Listed, OriginPattern, Origins, ResponseRules,
    SecurityHeaders,
};
pub use jwt::{covers, JwtKey, JwtRules, KeyMaterial, DEFAULT_LEEWAY_S, MIN_SECRET_BYTES};
pub use persist::persist_enabled;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7777";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub global: Global,
    pub servers: Vec<ServerConfig>,
    /// `tenants`: groups of servers (or of a server's subdomains) with limits of their own.
    pub tenants: Vec<TenantConfig>,
    /// The file as written, for the admin API to show: every string that took a value
    /// from the environment (`${VAR}`) is replaced by [`redacted`] of it, so that no
    /// secret it held is shown.
    pub shown: std::sync::Arc<Value>,
    /// The file as written, before `${VAR}` was substituted: what a worker process
    /// (`isolation: "process"`) is given, to parse with the same environment.
    pub source: std::sync::Arc<Value>,
    /// The folder relative paths start from (the config file's).
    pub folder: PathBuf,
}

/// What the admin API shows for a config string that took a value from the environment:
/// the string as written, marked, without the value (`"(redacted) ${DB_PASSWORD}"`).
pub fn redacted(template: &str) -> String {
    format!("(redacted) {template}")
}

/// A tenant (`tenants[i]`): an id that servers name (`servers[].tenant`) or that a
/// subdomain names (`servers[].tenant_from_subdomain`), and the rate limits every
/// request of the tenant shares, whichever server it is for.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantConfig {
    /// Lower case letters, digits, `-` and `_`; at most 63 characters (a domain label).
    pub id: String,
    pub rate_limits: Vec<RateLimit>,
}

/// How a server's requests get their tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenancy {
    /// Every request is this tenant's (`servers[].tenant`).
    Fixed(String),
    /// The label just below this domain names the tenant
    /// (`servers[].tenant_from_subdomain`): `acme.app.example` and
    /// `www.acme.app.example` are tenant `acme` under `app.example`; `app.example`
    /// itself has none.
    Subdomain(String),
}

/// A rate limit (`rate_limit`, or one entry of a list of them): GCRA, `per_second`
/// requests a second on average, up to `burst` at once.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// More than 0, at most 1,000,000; fractions allowed (`0.5`: one every 2 s).
    pub per_second: f64,
    /// At least 1; by default `per_second` rounded up.
    pub burst: u32,
    pub per: RatePer,
}

/// What one rate limit counts (`per`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RatePer {
    /// Each client IP address (an IPv6 client by its /64) has its own budget.
    ClientIp,
    /// Each tenant has its own budget.
    Tenant,
    /// One budget for all the server's requests.
    Server,
}

impl RatePer {
    /// The name in the config.
    pub fn name(self) -> &'static str {
        match self {
            RatePer::ClientIp => "client_ip",
            RatePer::Tenant => "tenant",
            RatePer::Server => "server",
        }
    }
}

/// The most `per_second` and `burst` may be.
const MAX_RATE: f64 = 1_000_000.0;

#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    pub listen: Vec<Listen>,
    /// Absolute, or relative to the directory that holds the config file.
    pub plugin_dir: PathBuf,
    pub default_server: Option<String>,
    /// Serve libraries no server names at `<plugin-name>.localhost`.
    pub drop_in_plugins: DropIn,
    pub limits: Limits,
    /// How long SIGTERM/SIGINT waits for in-flight requests before exiting anyway.
    pub shutdown_timeout: Duration,
    pub reload: Reload,
    pub bus: BusConfig,
    pub tls: TlsConfig,
    /// One line per request; `None`: off.
    pub access_log: Option<AccessLogConfig>,
    /// `global.rate_limit`: limits per client IP address across every server.
    pub rate_limits: Vec<RateLimit>,
    /// `global.blocking_warn_ms`: a plugin poll that holds its thread longer is logged
    /// (a WARN naming the server and route); zero: never.
    pub blocking_warn: Duration,
    /// `global.admin`: the admin listener (health, metrics); `None`: off.
    pub admin: Option<AdminConfig>,
    /// `global.health_path`: a path answered with the host's readiness on every domain
    /// of the public listeners (for load balancers); `None`: off.
    pub health_path: Option<String>,
    /// `global.metrics`: whether requests are counted for `/metrics`.
    pub metrics: bool,
}

/// Where the admin listener listens unless `global.admin` says otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7778";

/// `global.admin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// False for the default (no `global.admin` in the file): then an address in use
    /// is a warning, not a reason to stop (two hosts on one machine still start).
    pub explicit: bool,
    /// The environment variable holding the bearer token (`token_env`).
    pub token_env: Option<String>,
    /// Its value, read when the config is.
    pub token: Option<Secret>,
}

/// `global.admin` as the `--admin ADDR` flag changes it: listening on `ADDR` (the token
/// stays as configured), or off for `off`.
pub fn admin_override(
    admin: Option<AdminConfig>,
    flag: &str,
) -> Result<Option<AdminConfig>, String> {
    if flag == "off" {
        return Ok(None);
    }
    let listen: SocketAddr = flag.parse().map_err(|_| {
        format!("expected an address such as 127.0.0.1:7778, or off, found {flag:?}")
    })?;
    let (token_env, token) = admin.map_or((None, None), |a| (a.token_env, a.token));
    Ok(Some(AdminConfig {
        listen,
        explicit: true,
        token_env,
        token,
    }))
}

/// A value kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// `global.access_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub format: AccessLogFormat,
    /// `None`: stderr. Relative to the config file's folder.
    pub file: Option<PathBuf>,
}

/// `global.access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// The combined log format, then the server, the request id and the duration.
    Combined,
    /// One JSON object a line.
    Json,
}

/// One listening socket (`global.listen[i]`): a string (plain HTTP, both protocols) or
/// `{"address", "tls", "protocols"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub address: SocketAddr,
    /// TLS on this socket, with the certificates of `global.tls`.
    pub tls: bool,
    /// HTTP/1.1 spoken (`"http/1.1"` in `protocols`).
    pub http1: bool,
    /// HTTP/2 spoken (`"h2"` in `protocols`): chosen by ALPN over TLS, by its preface
    /// (prior knowledge) on plain sockets.
    pub http2: bool,
}

impl Listen {
    /// Plain HTTP/1.1 and HTTP/2 on `address`.
    pub fn plain(address: SocketAddr) -> Self {
        Listen {
            address,
            tls: false,
            http1: true,
            http2: true,
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// TLS certificates (`global.tls`), for every listener with `"tls": true`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateFiles>,
    /// Make a certificate at start for every configured domain, signed by a local
    /// development CA kept in `self_signed_dir` (made on first use).
    pub self_signed: bool,
    /// Where the development CA lives: `.dev-tls` beside the config file.
    pub self_signed_dir: PathBuf,
    /// What a client gets when it names no domain any certificate is for.
    pub unknown_name: UnknownName,
}

/// A certificate chain and its key, in PEM files (`global.tls.certificates[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain, leaf first. Relative paths are relative to the config file's folder.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The domains it is chosen for (exact, or `*.` wildcards). Empty: the names the
    /// certificate itself lists.
    pub domains: Vec<String>,
}

/// `global.tls.unknown_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownName {
    /// The first certificate listed (or the self-signed one): the client decides.
    #[default]
    Default,
    /// End the handshake with an alert.
    Reject,
}

/// The folder, beside the config file, that holds the development CA.
pub const SELF_SIGNED_DIR: &str = ".dev-tls";

impl Config {
    /// The config a worker process runs for server `name` (`isolation: "process"`):
    /// that server alone, in process, with everything the host in front of it does
    /// taken out (listeners, TLS, the admin listener, rate limits, tenants, tokens,
    /// response headers, compression, the access log, metrics, watching files), so that
    /// it is done once, by the host. `None`: no server of that name.
    pub fn for_worker(mut self, name: &str, plugin_dir: PathBuf) -> Option<Config> {
        let mut server = self.servers.into_iter().find(|s| s.name == name)?;
        server.enabled = true;
        server.redirect_https = false;
        server.tenancy = None;
        server.rate_limits = Vec::new();
        server.jwt = None;
        server.response = ResponseRules {
            security: SecurityHeaders::none(),
            cors: None,
            compression: None,
        };
        server.isolation = Isolation::InProcess;
        let global = &mut self.global;
        global.listen = Vec::new();
        global.plugin_dir = plugin_dir;
        global.default_server = Some(name.to_owned());
        global.drop_in_plugins = DropIn::Never;
        global.reload.watch = false;
        global.bus.backend = BusBackend::InProcess;
        global.tls = TlsConfig::default();
        global.access_log = None;
        global.rate_limits = Vec::new();
        global.admin = None;
        global.health_path = None;
        global.metrics = false;
        self.servers = vec![server];
        self.tenants = Vec::new();
        Some(self)
    }

    /// Every domain an enabled server answers for (what the development certificate
    /// covers).
    pub fn domains(&self) -> Vec<DomainPattern> {
        self.servers
            .iter()
            .filter(|s| s.enabled)
            .flat_map(|s| s.domains.iter().cloned())
            .collect()
    }
}

impl Global {
    /// Whether any listener speaks TLS.
    pub fn has_tls(&self) -> bool {
        self.listen.iter().any(|l| l.tls)
    }
}

/// When libraries that no server names are served (`global.drop_in_plugins`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropIn {
    /// Only while every listener is on a loopback address (development): the default.
    Loopback,
    Always,
    Never,
}

impl Global {
    /// Whether libraries no server names are served, with these listeners.
    pub fn serves_drop_ins(&self) -> bool {
        match self.drop_in_plugins {
            DropIn::Always => true,
            DropIn::Never => false,
            DropIn::Loopback => self.listen.iter().all(|l| l.address.ip().is_loopback()),
        }
    }
}

/// The event bus (`global.bus`).
#[derive(Debug, Clone, PartialEq)]
pub struct BusConfig {
    /// Most events waiting for one server; more are dropped (counted and logged). With
    /// Redis, also the most messages waiting to be published to it.
    pub queue: usize,
    pub backend: BusBackend,
}

/// Where bus events and WebSocket broadcasts travel (`global.bus.backend`).
#[derive(Debug, Clone, PartialEq)]
pub enum BusBackend {
    /// In this process only (`"in-process"`, the default).
    InProcess,
    /// Also to every other host on the same Redis (`"redis"`), over pub/sub.
    Redis {
        url: String,
        /// Starts every channel's name (`"channel_prefix"`, default `microservers:`), so
        /// that separate groups of hosts can share one Redis.
        channel_prefix: String,
    },
}

/// The default `global.bus.channel_prefix`.
pub const DEFAULT_CHANNEL_PREFIX: &str = "microservers:";

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            queue: 1024,
            backend: BusBackend::InProcess,
        }
    }
}

/// Hot reload settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    /// Watch the plugin folder and the config file, and apply changes live.
    pub watch: bool,
    /// How long the files must be quiet before a change is acted on.
    pub debounce: Duration,
    /// How long a replaced generation may keep serving the requests it started before
    /// its shutdown hook runs anyway.
    pub drain_timeout: Duration,
    /// How long a plugin's init (and its predecessor's export_state) may take before the
    /// new generation is given up on.
    pub init_timeout: Duration,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: true,
            debounce: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(30),
            init_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body accepted; a larger one gets 413.
    pub max_body_bytes: u64,
    /// Longest a handler may take; a slower one gets 504.
    pub request_timeout: Duration,
    /// Most header fields a request may carry (HTTP/1.1); more gets 431.
    pub max_headers: usize,
    /// Most requests one server handles at once (its streamed responses included);
    /// more get 503 with `Retry-After`.
    pub max_in_flight: usize,
    pub websocket: WebSocketLimits,
    pub connections: ConnectionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_in_flight: 2048,
            websocket: WebSocketLimits::default(),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Client connections (`global.connections`). A change applies to connections accepted
/// after it; the deadlines apply to open ones too.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// Most connections open at once (WebSockets included); more are closed as soon as
    /// they are accepted. Kept below the descriptor limit.
    pub max: usize,
    /// Most connections open at once from one client IP address (0: no limit).
    pub max_per_ip: usize,
    /// How long a new connection may take to start its first request (protocol
    /// detection and the HTTP/2 preface included).
    pub first_request_timeout: Duration,
    /// How long a client may take to send a request's headers (HTTP/1; also how long an
    /// idle HTTP/1 keep-alive connection stays open).
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is asked to close
    /// (HTTP/2: GOAWAY), and closed if it is still quiet after as long again.
    pub idle_timeout: Duration,
    /// A write to a client that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    /// Largest request head: HTTP/1's request line and headers, HTTP/2's header list.
    pub max_header_bytes: usize,
    /// Longest request target (path and query); a longer one gets 414.
    pub max_uri_bytes: usize,
    /// Most streams (requests) at once on one HTTP/2 connection.
    pub http2_max_streams: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 10_000,
            max_per_ip: 512,
            first_request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8 * 1024,
            http2_max_streams: 100,
        }
    }
}

/// WebSocket connections (`global.websocket`). A change applies to connections opened
/// after it.
#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketLimits {
    /// How often the host pings a connection; one that has sent nothing (no pong, no
    /// message) for two intervals is closed.
    pub ping_interval: Duration,
    /// Largest message (and frame) a client may send; a larger one closes the connection
    /// with 1009.
    pub max_message_bytes: usize,
    /// Most bytes waiting to be sent to one connection; past it the connection is
    /// closed with 1008 (a client that reads too slowly).
    pub send_queue_bytes: usize,
    /// Most connections open at once per server; more get 503.
    pub max_connections: usize,
}

impl Default for WebSocketLimits {
    fn default() -> Self {
        WebSocketLimits {
            ping_interval: Duration::from_secs(30),
            max_message_bytes: 1024 * 1024,
            send_queue_bytes: 4 * 1024 * 1024,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub name: String,
    pub domains: Vec<DomainPattern>,
    /// A library file stem (`hello` for `hello.so` or `libhello.so`) or a plugin name.
    /// `None` for a server of static files only.
    pub plugin: Option<String>,
    pub enabled: bool,
    /// The opaque `config` object handed to the plugin's init, as JSON text.
    pub plugin_config: String,
    /// Requests on plain listeners are sent to `https://` with 308.
    pub redirect_https: bool,
    /// Its static files (`static`), tried when no plugin route answers.
    pub files: Option<StaticSite>,
    /// `tenant` or `tenant_from_subdomain`; `None`: its requests have no tenant.
    pub tenancy: Option<Tenancy>,
    /// `rate_limit`: the server's own limits.
    pub rate_limits: Vec<RateLimit>,
    /// What it adds to its responses: `headers`, `cors` and `compression`.
    pub response: ResponseRules,
    /// `jwt`: the requests that need a verified token, and how it is verified.
    pub jwt: Option<JwtRules>,
    /// `max_threads`: how many of its plugin polls may run at once on the runtime's
    /// worker threads; `None`: the default (all the workers but one).
    pub max_threads: Option<usize>,
    /// `isolation` and `worker`: in the host's process, or in a worker process.
    pub isolation: Isolation,
}

/// Where a server's plugin runs (`servers[].isolation`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Isolation {
    /// In the host's process: the default.
    #[default]
    InProcess,
    /// In a worker process of its own (`"process"`).
    Process(WorkerLimits),
}

/// `servers[].worker`: the limits of a server's worker process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkerLimits {
    /// `max_memory_mb`: the worker's data memory (heap) limit; past it an allocation
    /// fails, which ends the worker (not the host). `None`: no limit.
    pub max_memory_mb: Option<u64>,
}

/// A server's static files (`servers[].static`).
#[derive(Debug, Clone, PartialEq)]
pub struct StaticSite {
    /// The folder served, absolute (a relative `root` is relative to the config file's
    /// folder). Checked to be a folder when the config is loaded.
    pub root: PathBuf,
    /// The file served for a URL that ends in `/`; `None`: such URLs are not served.
    pub index: Option<String>,
    /// The file (a path below `root`) served for a navigation request that no route
    /// and no file answers; `None`: no fallback.
    pub spa_fallback: Option<String>,
    /// Path prefixes never answered by the fallback (`/api` covers `/api` and
    /// `/api/...`).
    pub fallback_except: Vec<String>,
    /// `Cache-Control: max-age` of files other than HTML; 0: `no-cache`.
    pub max_age_s: u64,
    /// `cache_mb`: how many bytes of its files the host keeps in memory; 0: none.
    pub cache_bytes: u64,
}

/// `servers[].static.cache_mb` when it is not given.
pub const DEFAULT_STATIC_CACHE_MB: u64 = 16;
/// The most `servers[].static.cache_mb` may be: 64 GiB.
const MAX_STATIC_CACHE_MB: u64 = 1 << 16;

/// One thing wrong with a config file, at a JSON path such as `servers[2].domains[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The same report on one line (problems separated by `; `), for logs.
    pub fn one_line(&self) -> String {
        let problems: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        format!("{}: {}", self.file.display(), problems.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the config file at `file`. Relative paths in it (a static site's
/// `root`) are relative to the file's folder.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let fail = |message: String| ConfigError {
        file: file.to_owned(),
        problems: vec![Problem {
            path: String::new(),
            message,
        }],
    };
    let text = std::fs::read_to_string(file).map_err(|e| fail(format!("cannot read: {e}")))?;
    let folder = file.parent().unwrap_or(Path::new(""));
    let mut config =
        parse_in(&text, &|name| std::env::var(name).ok(), folder).map_err(|problems| {
            ConfigError {
                file: file.to_owned(),
                problems,
            }
        })?;
    // Files the config names are relative to its folder.
    let tls = &mut config.global.tls;
    tls.self_signed_dir = folder.join(&tls.self_signed_dir);
    for c in &mut tls.certificates {
        c.cert = folder.join(&c.cert);
        c.key = folder.join(&c.key);
    }
    if let Some(file) = config
        .global
        .access_log
        .as_mut()
        .and_then(|a| a.file.as_mut())
    {
        *file = folder.join(&*file);
    }
    Ok(config)
}

/// Parses and validates config text, looking `${VAR}` up with `env`. Relative paths are
/// relative to the working directory.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<Problem>> {
    parse_in(text, env, Path::new(""))
}

/// [`parse`], with relative paths relative to `folder` (the config file's).
pub fn parse_in(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    folder: &Path,
) -> Result<Config, Vec<Problem>> {
    let mut value: Value = serde_json::from_str(text).map_err(|e| {
        vec![Problem {
            path: String::new(),
            message: format!("invalid JSON: {e}"),
        }]
    })?;
    let mut v = Validator {
        folder: folder.to_owned(),
        ..Validator::default()
    };
    let source = std::sync::Arc::new(value.clone());
    let mut shown = value.clone();
    redact(&mut shown);
    substitute(&mut value, "", env, &mut v);
    let mut config = v.config(&value);
    config.shown = std::sync::Arc::new(shown);
    config.source = source;
    if let Some(admin) = config.global.admin.as_mut() {
        if let Some(name) = &admin.token_env {
            match env(name).filter(|t| !t.is_empty()) {
                Some(token) => admin.token = Some(Secret(token)),
                None => v.problem(
                    "global.admin.token_env",
                    format!("the environment variable {name} is not set (or is empty): the admin listener would have no token"),
                ),
            }
        }
    }
    if v.problems.is_empty() {
        Ok(config)
    } else {
        Err(v.problems)
    }
}

/// Replaces `${NAME}` in every string with the environment variable's value. `$${` is a
/// literal `${`.
fn substitute(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    v: &mut Validator,
) {
    match value {
        Value::String(s) if s.contains('$') => match expand(s, env) {
            Ok(expanded) => *s = expanded,
            Err(message) => v.problem(path, message),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute(item, &format!("{path}[{i}]"), env, v);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                substitute(item, &join(path, key), env, v);
            }
        }
        _ => {}
    }
}

/// Replaces every string that names an environment variable with [`redacted`] of it.
fn redact(value: &mut Value) {
    match value {
        Value::String(s) if s.replace("$${", "").contains("${") => *s = redacted(s),
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::Object(map) => map.values_mut().for_each(redact),
        _ => {}
    }
}

fn expand(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
            let name = &tail[..end];
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable reference"
                ));
            }
            let value =
                env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    /// For each valid server, its index in the `servers` array (for error paths).
    server_index: Vec<usize>,
    /// The config file's folder: relative paths start there.
    folder: PathBuf,
    /// Every tenant id `tenants` lists (valid or not), for `servers[].tenant`.
    tenant_ids: Vec<String>,
}

impl Validator {
    fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Checks that `value` is an object with only `allowed` keys.
    fn object<'a>(
        &mut self,
        value: &'a Value,
        path: &str,
        allowed: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        let Some(map) = value.as_object() else {
            self.problem(path, format!("expected an object, found {}", kind(value)));
            return None;
        };
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                self.problem(
                    &join(path, key),
                    format!("unknown key; expected one of: {}", allowed.join(", ")),
                );
            }
        }
        Some(map)
    }

    fn string(&mut self, value: &Value, path: &str) -> Option<String> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                self.problem(path, "must not be empty");
                None
            }
            other => {
                self.problem(path, format!("expected a string, found {}", kind(other)));
                None
            }
        }
    }

    /// The string at `key` of the object at `path`, which must be there (`hint` follows
    /// the problem's message if it is not).
    fn required_string(
        &mut self,
        map: &Map<String, Value>,
        path: &str,
        key: &str,
        hint: &str,
    ) -> Option<String> {
        match map.get(key) {
            Some(v) => self.string(v, &join(path, key)),
            None => {
                self.problem(path, format!("missing key `{key}`{hint}"));
                None
            }
        }
    }

    fn whole_number(&mut self, value: &Value, path: &str, min: u64) -> Option<u64> {
        match value.as_u64() {
            Some(n) if n >= min => Some(n),
            _ => {
                self.problem(
                    path,
                    format!("expected a whole number of at least {min}, found {value}"),
                );
                None
            }
        }
    }

    fn connection_limits(&mut self, value: &Value, out: &mut ConnectionLimits) {
        let allowed = [
            "max",
            "max_per_ip",
            "first_request_timeout_ms",
            "header_timeout_ms",
            "idle_timeout_ms",
            "write_timeout_ms",
            "max_header_bytes",
            "max_uri_bytes",
            "http2_max_streams",
        ];
        let Some(c) = self.object(value, "global.connections", &allowed) else {
            return;
        };
        let mut number = |key: &str, min: u64| -> Option<u64> {
            let v = c.get(key)?;
            self.whole_number(v, &format!("global.connections.{key}"), min)
        };
        let ms = Duration::from_millis;
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        if let Some(n) = number("max", 1) {
            out.max = size(n);
        }
        if let Some(n) = number("max_per_ip", 0) {
            out.max_per_ip = size(n);
        }
        if let Some(n) = number("first_request_timeout_ms", 1) {
            out.first_request_timeout = ms(n);
        }
        if let Some(n) = number("header_timeout_ms", 1) {
            out.header_timeout = ms(n);
        }
        if let Some(n) = number("idle_timeout_ms", 1) {
            out.idle_timeout = ms(n);
        }
        if let Some(n) = number("write_timeout_ms", 1) {
            out.write_timeout = ms(n);
        }
        // hyper reads a request head into one buffer of at least 8 KiB.
        if let Some(n) = number("max_header_bytes", 8192) {
            out.max_header_bytes = size(n);
        }
        if let Some(n) = number("max_uri_bytes", 16) {
            out.max_uri_bytes = size(n);
        }
        if let Some(n) = number("http2_max_streams", 1) {
            out.http2_max_streams = u32::try_from(n).unwrap_or(u32::MAX);
        }
    }

    fn bus_backend(&mut self, b: &Map<String, Value>, out: &mut BusConfig) {
        let backend = match b.get("backend") {
            None => "in-process".to_owned(),
            Some(v) => match self.string(v, "global.bus.backend") {
                Some(name) => name,
                None => return,
            },
        };
        match backend.as_str() {
            "in-process" => {
                for key in ["url", "channel_prefix"] {
                    if b.contains_key(key) {
                        self.problem(
                            &format!("global.bus.{key}"),
                            "only used with \"backend\": \"redis\"",
                        );
                    }
                }
            }
            "redis" => {
                let url = match b.get("url") {
                    Some(v) => self.string(v, "global.bus.url"),
                    None => {
                        self.problem(
                            "global.bus.url",
                            "required with \"backend\": \"redis\" (for example \"${REDIS_URL}\" or \"redis://127.0.0.1:6379\")",
                        );
                        None
                    }
                };
                let channel_prefix = match b.get("channel_prefix") {
                    None => Some(DEFAULT_CHANNEL_PREFIX.to_owned()),
                    Some(Value::String(p)) if !p.contains(['*', '?', '[', ']', '\\']) => {
                        Some(p.clone())
                    }
                    Some(Value::String(_)) => {
                        self.problem(
                            "global.bus.channel_prefix",
                            "must not contain a pattern character (* ? [ ] \\)",
                        );
                        None
                    }
                    Some(other) => {
                        self.problem(
                            "global.bus.channel_prefix",
                            format!("expected a string, found {}", kind(other)),
                        );
                        None
                    }
                };
                let Some(url) = url else { return };
                // The URL itself is not repeated: it may hold a password.
                if let Err(e) = redis::Client::open(url.as_str()) {
                    self.problem(
                        "global.bus.url",
                        format!("not a Redis URL ({e}); expected redis://[user:password@]host[:port][/db] or unix:///path/to/socket"),
                    );
                    return;
                }
                if let Some(channel_prefix) = channel_prefix {
                    out.backend = BusBackend::Redis {
                        url,
                        channel_prefix,
                    };
                }
            }
            other => self.problem(
                "global.bus.backend",
                format!("unknown backend {other:?}; expected \"in-process\" or \"redis\""),
            ),
        }
    }

    /// `"127.0.0.1:7777"`, or `{"address": ..., "tls": ..., "protocols": [...]}`.
    fn listener(&mut self, item: &Value, path: &str) -> Option<Listen> {
        let address = |this: &mut Self, value: &Value, path: &str| {
            let s = this.string(value, path)?;
            match s.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    this.problem(
                        path,
                        format!("{s:?} is not an IP address with a port, such as \"127.0.0.1:7777\" or \"[::1]:7777\""),
                    );
                    None
                }
            }
        };
        if !item.is_object() {
            return address(self, item, path).map(Listen::plain);
        }
        let map = self.object(item, path, &["address", "tls", "protocols"])?;
        let Some(addr) = map.get("address") else {
            self.problem(path, "missing key `address`");
            return None;
        };
        let mut out = Listen::plain(address(self, addr, &join(path, "address"))?);
        match map.get("tls") {
            None => {}
            Some(Value::Bool(b)) => out.tls = *b,
            Some(other) => self.problem(
                &join(path, "tls"),
                format!("expected true or false, found {}", kind(other)),
            ),
        }
        if let Some(protocols) = map.get("protocols") {
            let p = join(path, "protocols");
            let names: Vec<&Value> = match protocols {
                Value::Array(a) if !a.is_empty() => a.iter().collect(),
                _ => {
                    self.problem(
                        &p,
                        "expected a list of protocols: \"http/1.1\", \"h2\" or both",
                    );
                    return None;
                }
            };
            out.http1 = false;
            out.http2 = false;
            for (i, name) in names.into_iter().enumerate() {
                match name.as_str() {
                    Some("http/1.1") => out.http1 = true,
                    Some("h2") => out.http2 = true,
                    _ => self.problem(
                        &format!("{p}[{i}]"),
                        format!("{name} is not a protocol: \"http/1.1\" or \"h2\""),
                    ),
                }
            }
        }
        (out.http1 || out.http2).then_some(out)
    }

    fn admin(&mut self, value: &Value) -> Option<AdminConfig> {
        let map = self.object(value, "global.admin", &["listen", "token_env"])?;
        let listen = match map.get("listen") {
            None => DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            Some(v) => {
                let text = self.string(v, "global.admin.listen")?;
                match text.parse::<SocketAddr>() {
                    Ok(addr) => addr,
                    Err(_) => {
                        self.problem(
                            "global.admin.listen",
                            format!(
                                "expected an address such as \"127.0.0.1:7778\", found {text:?}"
                            ),
                        );
                        return None;
                    }
                }
            }
        };
        let token_env = match map.get("token_env") {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.string(v, "global.admin.token_env")?),
        };
        Some(AdminConfig {
            listen,
            explicit: true,
            token_env,
            token: None,
        })
    }

    fn access_log(&mut self, value: &Value) -> Option<AccessLogConfig> {
        let map = self.object(value, "global.access_log", &["format", "file"])?;
        let format = match map.get("format").map(|v| (v, v.as_str())) {
            None | Some((_, Some("combined"))) => AccessLogFormat::Combined,
            Some((_, Some("json"))) => AccessLogFormat::Json,
            Some((v, _)) => {
                self.problem(
                    "global.access_log.format",
                    format!("expected \"combined\" or \"json\", found {v}"),
                );
                return None;
            }
        };
        let file = match map.get("file") {
            None | Some(Value::Null) => None,
            Some(v) => Some(PathBuf::from(self.string(v, "global.access_log.file")?)),
        };
        Some(AccessLogConfig { format, file })
    }

    fn tls(&mut self, value: &Value, out: &mut TlsConfig) {
        let allowed = ["certificates", "self_signed", "unknown_name"];
        let Some(map) = self.object(value, "global.tls", &allowed) else {
            return;
        };
        match map.get("self_signed") {
            None => {}
            Some(Value::Bool(b)) => out.self_signed = *b,
            Some(other) => self.problem(
                "global.tls.self_signed",
                format!("expected true or false, found {}", kind(other)),
            ),
        }
        match map.get("unknown_name").map(|v| (v, v.as_str())) {
            None => {}
            Some((_, Some("default"))) => out.unknown_name = UnknownName::Default,
            Some((_, Some("reject"))) => out.unknown_name = UnknownName::Reject,
            Some((v, _)) => self.problem(
                "global.tls.unknown_name",
                format!("expected \"default\" or \"reject\", found {v}"),
            ),
        }
        let Some(certs) = map.get("certificates") else {
            return;
        };
        let Some(items) = certs.as_array() else {
            self.problem(
                "global.tls.certificates",
                format!("expected an array, found {}", kind(certs)),
            );
            return;
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("global.tls.certificates[{i}]");
            let Some(c) = self.object(item, &path, &["cert", "key", "domains"]) else {
                continue;
            };
            let file = |this: &mut Self, key: &str| match c.get(key) {
                Some(v) => this.string(v, &join(&path, key)).map(PathBuf::from),
                None => {
                    this.problem(&path, format!("missing key `{key}`"));
                    None
                }
            };
            let (cert, key) = (file(self, "cert"), file(self, "key"));
            let mut domains = Vec::new();
            if let Some(d) = c.get("domains") {
                let p = join(&path, "domains");
                match d.as_array() {
                    Some(list) if !list.is_empty() => {
                        for (j, item) in list.iter().enumerate() {
                            let p = format!("{p}[{j}]");
                            if let Some(s) = self.string(item, &p) {
                                match DomainPattern::parse(&s) {
                                    Ok(d) => domains.push(d.to_string()),
                                    Err(InvalidDomain(why)) => self
                                        .problem(&p, format!("{s:?} is not a valid domain: {why}")),
                                }
                            }
                        }
                    }
                    _ => self.problem(&p, "expected a non-empty array of domains"),
                }
            }
            if let (Some(cert), Some(key)) = (cert, key) {
                out.certificates
                    .push(CertificateFiles { cert, key, domains });
            }
        }
    }

    fn config(&mut self, root: &Value) -> Config {
        let mut config = Config {
            global: Global {
                listen: vec![Listen::plain(
                    DEFAULT_LISTEN.parse().expect("valid default"),
                )],
                plugin_dir: PathBuf::from("plugins"),
                default_server: None,
                drop_in_plugins: DropIn::Loopback,
                limits: Limits::default(),
                shutdown_timeout: Duration::from_secs(10),
                reload: Reload::default(),
                bus: BusConfig::default(),
                tls: TlsConfig {
                    self_signed_dir: PathBuf::from(SELF_SIGNED_DIR),
                    ..TlsConfig::default()
                },
                access_log: None,
                rate_limits: Vec::new(),
                blocking_warn: Duration::from_millis(100),
                admin: Some(AdminConfig {
                    listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
                    explicit: false,
                    token_env: None,
                    token: None,
                }),
                health_path: None,
                metrics: true,
            },
            servers: Vec::new(),
            tenants: Vec::new(),
            shown: Default::default(),
            source: Default::default(),
            folder: self.folder.clone(),
        };
        let Some(map) = self.object(root, "", &["global", "servers", "tenants"]) else {
            return config;
        };
        if let Some(global) = map.get("global") {
            self.global(global, &mut config.global);
        }
        // Before the servers, which name them.
        match map.get("tenants") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("tenants[{i}]");
                    let id = item.get("id").and_then(Value::as_str);
                    if let Some(id) = id {
                        if let Some(j) = self.tenant_ids.iter().position(|t| t == id) {
                            self.problem(
                                &join(&path, "id"),
                                format!("duplicate tenant id {id:?} (also tenants[{j}])"),
                            );
                        }
                    }
                    // Listed even when invalid, so that a server naming it gets only the
                    // tenant's own problem.
                    self.tenant_ids.push(id.unwrap_or_default().to_owned());
                    if let Some(tenant) = self.tenant(item, &path) {
                        config.tenants.push(tenant);
                    }
                }
            }
            Some(other) => self.problem(
                "tenants",
                format!("expected an array, found {}", kind(other)),
            ),
        }
        match map.get("servers") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(server) = self.server(item, &format!("servers[{i}]")) {
                        config.servers.push(server);
                        self.server_index.push(i);
                    }
                }
            }
            Some(other) => self.problem(
                "servers",
                format!("expected an array, found {}", kind(other)),
            ),
            None => {}
        }
        self.cross_check(&config, map.get("servers"));
        config
    }

    fn global(&mut self, value: &Value, out: &mut Global) {
        let allowed = [
            "listen",
            "plugin_dir",
            "default_server",
            "limits",
            "shutdown_timeout_ms",
            "reload",
            "websocket",
            "bus",
            "connections",
            "drop_in_plugins",
            "tls",
            "access_log",
            "rate_limit",
            "blocking_warn_ms",
            "admin",
            "health_path",
            "metrics",
        ];
        let Some(map) = self.object(value, "global", &allowed) else {
            return;
        };
        match map.get("admin") {
            None => {}
            Some(Value::Null) => out.admin = None,
            Some(v) => out.admin = self.admin(v),
        }
        match map.get("health_path") {
            None | Some(Value::Null) => {}
            Some(v) => {
                if let Some(path) = self.string(v, "global.health_path") {
                    if path.starts_with('/') && !path.contains(['?', '#', ' ']) {
                        out.health_path = Some(path);
                    } else {
                        self.problem(
                            "global.health_path",
                            format!("expected a path such as \"/healthz\", found {path:?}"),
                        );
                    }
                }
            }
        }
        match map.get("metrics") {
            None => {}
            Some(Value::Bool(b)) => out.metrics = *b,
            Some(other) => self.problem(
                "global.metrics",
                format!("expected true or false, found {}", kind(other)),
            ),
        }
        if let Some(limits) = map.get("rate_limit") {
            out.rate_limits = self.rate_limits(limits, "global.rate_limit", &[RatePer::ClientIp]);
        }
        if let Some(listen) = map.get("listen") {
            let items: Vec<(String, &Value)> = match listen {
                Value::Array(a) if a.is_empty() => {
                    self.problem("global.listen", "must name at least one address");
                    Vec::new()
                }
                Value::Array(a) => a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("global.listen[{i}]"), v))
                    .collect(),
                other => vec![("global.listen".to_owned(), other)],
            };
            let mut listeners: Vec<Listen> = Vec::new();
            for (path, item) in items {
                if let Some(l) = self.listener(item, &path) {
                    // Port 0 asks for a free port: each such entry gets its own.
                    if l.address.port() != 0 && listeners.iter().any(|o| o.address == l.address) {
                        self.problem(&path, format!("{} is listed twice", l.address));
                    } else {
                        listeners.push(l);
                    }
                }
            }
            if !listeners.is_empty() {
                out.listen = listeners;
            }
        }
        if let Some(tls) = map.get("tls") {
            self.tls(tls, &mut out.tls);
        }
        match map.get("access_log") {
            None | Some(Value::Null) => {}
            Some(v) => out.access_log = self.access_log(v),
        }
        if out.has_tls() && out.tls.certificates.is_empty() && !out.tls.self_signed {
            self.problem(
                "global.tls",
                "a listener has \"tls\": true, but no certificate is configured: list global.tls.certificates, or set global.tls.self_signed to true for development",
            );
        }
        if let Some(dir) = map.get("plugin_dir") {
            if let Some(s) = self.string(dir, "global.plugin_dir") {
                out.plugin_dir = PathBuf::from(s);
            }
        }
        match map.get("default_server") {
            None | Some(Value::Null) => {}
            Some(v) => out.default_server = self.string(v, "global.default_server"),
        }
        if let Some(limits) = map.get("limits") {
            let allowed = [
                "max_body_bytes",
                "request_timeout_ms",
                "max_headers",
                "max_in_flight",
            ];
            if let Some(l) = self.object(limits, "global.limits", &allowed) {
                if let Some(v) = l.get("max_body_bytes") {
                    if let Some(n) = self.whole_number(v, "global.limits.max_body_bytes", 0) {
                        out.limits.max_body_bytes = n;
                    }
                }
                if let Some(v) = l.get("request_timeout_ms") {
                    if let Some(n) = self.whole_number(v, "global.limits.request_timeout_ms", 1) {
                        out.limits.request_timeout = Duration::from_millis(n);
                    }
                }
                if let Some(v) = l.get("max_headers") {
                    if let Some(n) = self.whole_number(v, "global.limits.max_headers", 1) {
                        out.limits.max_headers = n as usize;
                    }
                }
                if let Some(v) = l.get("max_in_flight") {
                    if let Some(n) = self.whole_number(v, "global.limits.max_in_flight", 1) {
                        out.limits.max_in_flight = usize::try_from(n).unwrap_or(usize::MAX);
                    }
                }
            }
        }
        match map.get("drop_in_plugins") {
            None => {}
            Some(Value::Bool(true)) => out.drop_in_plugins = DropIn::Always,
            Some(Value::Bool(false)) => out.drop_in_plugins = DropIn::Never,
            Some(Value::String(s)) if s == "loopback" => out.drop_in_plugins = DropIn::Loopback,
            Some(other) => self.problem(
                "global.drop_in_plugins",
                format!("expected true, false or \"loopback\", found {other}"),
            ),
        }
        if let Some(c) = map.get("connections") {
            self.connection_limits(c, &mut out.limits.connections);
        }
        if let Some(ws) = map.get("websocket") {
            let allowed = [
                "ping_interval_ms",
                "max_message_bytes",
                "send_queue_bytes",
                "max_connections",
            ];
            let out = &mut out.limits.websocket;
            if let Some(w) = self.object(ws, "global.websocket", &allowed) {
                if let Some(v) = w.get("ping_interval_ms") {
                    if let Some(n) = self.whole_number(v, "global.websocket.ping_interval_ms", 1) {
                        out.ping_interval = Duration::from_millis(n);
                    }
                }
                if let Some(v) = w.get("max_message_bytes") {
                    if let Some(n) = self.whole_number(v, "global.websocket.max_message_bytes", 1) {
                        out.max_message_bytes = n.try_into().unwrap_or(usize::MAX);
                    }
                }
                if let Some(v) = w.get("send_queue_bytes") {
                    if let Some(n) = self.whole_number(v, "global.websocket.send_queue_bytes", 1) {
                        out.send_queue_bytes = n.try_into().unwrap_or(usize::MAX);
                    }
                }
                if let Some(v) = w.get("max_connections") {
                    if let Some(n) = self.whole_number(v, "global.websocket.max_connections", 0) {
                        out.max_connections = n.try_into().unwrap_or(usize::MAX);
                    }
                }
            }
        }
        if let Some(bus) = map.get("bus") {
            let allowed = ["queue", "backend", "url", "channel_prefix"];
            if let Some(b) = self.object(bus, "global.bus", &allowed) {
                if let Some(v) = b.get("queue") {
                    if let Some(n) = self.whole_number(v, "global.bus.queue", 1) {
                        out.bus.queue = n.try_into().unwrap_or(usize::MAX);
                    }
                }
                self.bus_backend(b, &mut out.bus);
            }
        }
        if let Some(v) = map.get("shutdown_timeout_ms") {
            if let Some(n) = self.whole_number(v, "global.shutdown_timeout_ms", 0) {
                out.shutdown_timeout = Duration::from_millis(n);
            }
        }
        if let Some(v) = map.get("blocking_warn_ms") {
            if let Some(n) = self.whole_number(v, "global.blocking_warn_ms", 0) {
                out.blocking_warn = Duration::from_millis(n);
            }
        }
        if let Some(reload) = map.get("reload") {
            let allowed = [
                "watch",
                "debounce_ms",
                "drain_timeout_ms",
                "init_timeout_ms",
            ];
            if let Some(r) = self.object(reload, "global.reload", &allowed) {
                match r.get("watch") {
                    None => {}
                    Some(Value::Bool(b)) => out.reload.watch = *b,
                    Some(other) => self.problem(
                        "global.reload.watch",
                        format!("expected true or false, found {}", kind(other)),
                    ),
                }
                if let Some(v) = r.get("debounce_ms") {
                    if let Some(n) = self.whole_number(v, "global.reload.debounce_ms", 1) {
                        out.reload.debounce = Duration::from_millis(n);
                    }
                }
                if let Some(v) = r.get("init_timeout_ms") {
                    if let Some(n) = self.whole_number(v, "global.reload.init_timeout_ms", 1) {
                        out.reload.init_timeout = Duration::from_millis(n);
                    }
                }
                if let Some(v) = r.get("drain_timeout_ms") {
                    if let Some(n) = self.whole_number(v, "global.reload.drain_timeout_ms", 0) {
                        out.reload.drain_timeout = Duration::from_millis(n);
                    }
                }
            }
        }
    }

    fn server(&mut self, value: &Value, path: &str) -> Option<ServerConfig> {
        let allowed = [
            "name",
            "domains",
            "plugin",
            "enabled",
            "config",
            "redirect_https",
            "static",
            "tenant",
            "tenant_from_subdomain",
            "rate_limit",
            "headers",
            "cors",
            "compression",
            "jwt",
            "max_threads",
            "isolation",
            "worker",
        ];
        let map = self.object(value, path, &allowed)?;
        let before = self.problems.len();
        let name = self.required_string(map, path, "name", "");
        if let Some(n) = &name {
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.problem(
                    &join(path, "name"),
                    format!("{n:?} may only contain letters, digits, `-`, `_` and `.`"),
                );
            }
        }
        let files = map
            .get("static")
            .and_then(|v| self.static_site(v, &join(path, "static")));
        let plugin = match map.get("plugin") {
            Some(v) => self.string(v, &join(path, "plugin")),
            // A server of static files only.
            None if map.contains_key("static") => None,
            None => {
                self.problem(
                    path,
                    "missing key `plugin` (a server needs a `plugin`, `static` files, or both)",
                );
                None
            }
        };
        if !map.contains_key("plugin") && map.contains_key("config") {
            self.problem(
                &join(path, "config"),
                "only used with a `plugin` (it is handed to the plugin's init)",
            );
        }
        let mut domains = Vec::new();
        match map.get("domains") {
            Some(Value::Array(items)) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}.domains[{i}]");
                    if let Some(s) = self.string(item, &p) {
                        match DomainPattern::parse(&s) {
                            Ok(d) => domains.push(d),
                            Err(InvalidDomain(why)) => {
                                self.problem(&p, format!("{s:?} is not a valid domain: {why}"))
                            }
                        }
                    }
                }
            }
            Some(Value::Array(_)) => {
                self.problem(&join(path, "domains"), "must list at least one domain")
            }
            Some(other) => self.problem(
                &join(path, "domains"),
                format!("expected an array of domains, found {}", kind(other)),
            ),
            None => self.problem(path, "missing key `domains`"),
        }
        let enabled = match map.get("enabled") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.problem(
                    &join(path, "enabled"),
                    format!("expected true or false, found {}", kind(other)),
                );
                true
            }
        };
        let plugin_config = map
            .get("config")
            .map_or_else(|| "null".to_owned(), Value::to_string);
        let redirect_https = match map.get("redirect_https") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.problem(
                    &join(path, "redirect_https"),
                    format!("expected true or false, found {}", kind(other)),
                );
                false
            }
        };
        let tenancy = self.tenancy(map, path, &domains);
        let rate_limits = match map.get("rate_limit") {
            None => Vec::new(),
            Some(v) => {
                let per = [RatePer::Server, RatePer::ClientIp, RatePer::Tenant];
                self.rate_limits(v, &join(path, "rate_limit"), &per)
            }
        };
        if tenancy.is_none() && rate_limits.iter().any(|l| l.per == RatePer::Tenant) {
            self.problem(
                &join(path, "rate_limit"),
                "\"per\": \"tenant\" needs a server with `tenant` or `tenant_from_subdomain`",
            );
        }
        let response = self.response_rules(map, path);
        let jwt = match map.get("jwt") {
            None | Some(Value::Null) => None,
            Some(v) => self.jwt(v, &join(path, "jwt")),
        };
        let max_threads = map
            .get("max_threads")
            .and_then(|v| self.whole_number(v, &join(path, "max_threads"), 1))
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let isolation = self.isolation(map, path, plugin.is_some());
        if self.problems.len() > before {
            return None;
        }
        Some(ServerConfig {
            name: name?,
            domains,
            plugin,
            enabled,
            plugin_config,
            redirect_https,
            files,
            tenancy,
            rate_limits,
            response,
            jwt,
            max_threads,
            isolation,
        })
    }

    /// A server's `isolation` (`"in_process"`, the default, or `"process"`) and, for a
    /// process, its `worker` limits.
    fn isolation(&mut self, map: &Map<String, Value>, path: &str, has_plugin: bool) -> Isolation {
        let process = match map.get("isolation") {
            None => false,
            Some(Value::String(s)) if s == "in_process" => false,
            Some(Value::String(s)) if s == "process" => true,
            Some(other) => {
                self.problem(
                    &join(path, "isolation"),
                    format!("expected \"in_process\" or \"process\", found {other}"),
                );
                false
            }
        };
        if process && !has_plugin {
            self.problem(
                &join(path, "isolation"),
                "a server of static files only has no plugin to run in a worker process",
            );
        }
        let Some(worker) = map.get("worker") else {
            return if process {
                Isolation::Process(WorkerLimits::default())
            } else {
                Isolation::InProcess
            };
        };
        let wpath = join(path, "worker");
        if !process {
            self.problem(
                &wpath,
                "only used with \"isolation\": \"process\" (it sets the worker process's limits)",
            );
        }
        let Some(w) = self.object(worker, &wpath, &["max_memory_mb"]) else {
            return Isolation::InProcess;
        };
        let max_memory_mb = w
            .get("max_memory_mb")
            .and_then(|v| self.whole_number(v, &join(&wpath, "max_memory_mb"), 16));
        Isolation::Process(WorkerLimits { max_memory_mb })
    }

    /// A server's `tenant` (a listed tenant's id) or `tenant_from_subdomain` (a domain
    /// whose wildcard the server serves).
    fn tenancy(
        &mut self,
        map: &Map<String, Value>,
        path: &str,
        domains: &[DomainPattern],
    ) -> Option<Tenancy> {
        match (map.get("tenant"), map.get("tenant_from_subdomain")) {
            (None, None) => None,
            (Some(_), Some(_)) => {
                self.problem(
                    path,
                    "`tenant` and `tenant_from_subdomain` exclude each other: a server's requests get their tenant one way",
                );
                None
            }
            (Some(v), None) => {
                let p = join(path, "tenant");
                let id = self.string(v, &p)?;
                if !self.tenant_ids.contains(&id) {
                    self.problem(
                        &p,
                        format!("no tenant has the id {id:?} (list it in `tenants`)"),
                    );
                    return None;
                }
                Some(Tenancy::Fixed(id))
            }
            (None, Some(v)) => {
                let p = join(path, "tenant_from_subdomain");
                let raw = self.string(v, &p)?;
                let suffix = match DomainPattern::parse(&raw) {
                    Ok(DomainPattern::Exact(name)) if name.parse::<std::net::IpAddr>().is_err() => {
                        name
                    }
                    Ok(_) => {
                        let message = format!(
                            "{raw:?} must be a domain name such as \"app.example\", without `*.`"
                        );
                        self.problem(&p, message);
                        return None;
                    }
                    Err(InvalidDomain(why)) => {
                        self.problem(&p, format!("{raw:?} is not a valid domain: {why}"));
                        return None;
                    }
                };
                let wildcard = DomainPattern::Wildcard(suffix.clone());
                if !domains.is_empty() && !domains.contains(&wildcard) {
                    let message = format!(
                        "no domain of this server is under {suffix}: add \"{wildcard}\" to `domains`"
                    );
                    self.problem(&p, message);
                    return None;
                }
                Some(Tenancy::Subdomain(suffix))
            }
        }
    }

    /// A tenant (`tenants[i]`): its id and its rate limits.
    fn tenant(&mut self, value: &Value, path: &str) -> Option<TenantConfig> {
        let map = self.object(value, path, &["id", "rate_limit"])?;
        let before = self.problems.len();
        let id = self.required_string(map, path, "id", "");
        if let Some(id) = &id {
            let valid = id.len() <= 63
                && id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid {
                self.problem(
                    &join(path, "id"),
                    format!("{id:?} may only contain lower case letters, digits, `-` and `_`, at most 63 of them (it may name a subdomain)"),
                );
            }
        }
        let rate_limits = match map.get("rate_limit") {
            None => Vec::new(),
            Some(v) => self.rate_limits(
                v,
                &join(path, "rate_limit"),
                &[RatePer::Tenant, RatePer::ClientIp],
            ),
        };
        if self.problems.len() > before {
            return None;
        }
        Some(TenantConfig {
            id: id?,
            rate_limits,
        })
    }

    /// A `rate_limit`: one limit or a list of them. `per` may be one of `allowed`; the
    /// first is the default.
    fn rate_limits(&mut self, value: &Value, path: &str, allowed: &[RatePer]) -> Vec<RateLimit> {
        let items: Vec<(String, &Value)> = match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{path}[{i}]"), v))
                .collect(),
            other => vec![(path.to_owned(), other)],
        };
        let mut out: Vec<(String, RateLimit)> = Vec::new();
        for (p, item) in items {
            let Some(limit) = self.rate_limit(item, &p, allowed) else {
                continue;
            };
            if let Some((first, _)) = out.iter().find(|(_, l)| *l == limit) {
                let message = format!("the same limit is listed twice (also {first})");
                self.problem(&p, message);
            } else {
                out.push((p, limit));
            }
        }
        out.into_iter().map(|(_, limit)| limit).collect()
    }

    fn rate_limit(&mut self, value: &Value, path: &str, allowed: &[RatePer]) -> Option<RateLimit> {
        let map = self.object(value, path, &["per_second", "burst", "per"])?;
        let per_second = match map.get("per_second") {
            None => {
                self.problem(path, "missing key `per_second`");
                None
            }
            Some(v) => match v.as_f64() {
                Some(r) if r > 0.0 && r <= MAX_RATE => Some(r),
                _ => {
                    self.problem(
                        &join(path, "per_second"),
                        format!("expected a number above 0 and at most {MAX_RATE}, found {v}"),
                    );
                    None
                }
            },
        };
        let burst = match map.get("burst") {
            None => per_second.map(|r| r.ceil().max(1.0) as u32),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 && n as f64 <= MAX_RATE => Some(n as u32),
                _ => {
                    self.problem(
                        &join(path, "burst"),
                        format!("expected a whole number from 1 to {MAX_RATE}, found {v}"),
                    );
                    None
                }
            },
        };
        let per = match map.get("per") {
            None => Some(allowed[0]),
            Some(v) => {
                let found = allowed.iter().find(|p| v.as_str() == Some(p.name()));
                if found.is_none() {
                    let names: Vec<String> =
                        allowed.iter().map(|p| format!("{:?}", p.name())).collect();
                    self.problem(
                        &join(path, "per"),
                        format!("expected {}, found {v}", names.join(" or ")),
                    );
                }
                found.copied()
            }
        };
        Some(RateLimit {
            per_second: per_second?,
            burst: burst?,
            per: per?,
        })
    }

    /// A server's `static` object. The folder must exist; the fallback file must be in
    /// it.
    fn static_site(&mut self, value: &Value, path: &str) -> Option<StaticSite> {
        let allowed = [
            "root",
            "index",
            "spa_fallback",
            "fallback_except",
            "max_age_s",
            "cache_mb",
        ];
        let map = self.object(value, path, &allowed)?;
        let before = self.problems.len();
        let root = self.required_string(map, path, "root", " (the folder to serve)");
        let root = root.and_then(|root| {
            let joined = self.folder.join(&root);
            let root = std::path::absolute(&joined).unwrap_or(joined);
            match std::fs::metadata(&root) {
                Ok(meta) if meta.is_dir() => Some(root),
                Ok(_) => {
                    let message = format!("{} is not a folder", root.display());
                    self.problem(&join(path, "root"), message);
                    None
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let message = format!("no such folder: {}", root.display());
                    self.problem(&join(path, "root"), message);
                    None
                }
                Err(e) => {
                    let message = format!("cannot read {}: {e}", root.display());
                    self.problem(&join(path, "root"), message);
                    None
                }
            }
        });
        let index = match map.get("index") {
            None => Some("index.html".to_owned()),
            Some(Value::Null) => None,
            Some(v) => {
                let p = join(path, "index");
                self.string(v, &p).filter(|name| {
                    let plain = relative_file(name).is_some_and(|parts| parts == 1);
                    if !plain {
                        self.problem(&p, format!("{name:?} must be a file name, without `/`"));
                    }
                    plain
                })
            }
        };
        let spa_fallback = match map.get("spa_fallback") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let p = join(path, "spa_fallback");
                self.string(v, &p).and_then(|file| {
                    let file = file.trim_start_matches('/').to_owned();
                    if relative_file(&file).is_none() {
                        let message = format!(
                            "{file:?} must be a path below `root`, without `..`, `.`, `\\` or empty segments"
                        );
                        self.problem(&p, message);
                        return None;
                    }
                    let full = root.as_ref()?.join(&file);
                    if !full.is_file() {
                        self.problem(&p, format!("no such file: {}", full.display()));
                        return None;
                    }
                    Some(file)
                })
            }
        };
        let fallback_except = match map.get("fallback_except") {
            None => Vec::new(),
            Some(v) => self.path_prefixes(v, &join(path, "fallback_except")),
        };
        let max_age_s = match map.get("max_age_s") {
            None => 0,
            Some(v) => self
                .whole_number(v, &join(path, "max_age_s"), 0)
                .unwrap_or(0),
        };
        let cache_mb = match map.get("cache_mb") {
            None => DEFAULT_STATIC_CACHE_MB,
            Some(v) => {
                let p = join(path, "cache_mb");
                match self.whole_number(v, &p, 0) {
                    Some(mb) if mb > MAX_STATIC_CACHE_MB => {
                        let message = format!("{mb} is more than {MAX_STATIC_CACHE_MB} (MiB)");
                        self.problem(&p, message);
                        0
                    }
                    mb => mb.unwrap_or(0),
                }
            }
        };
        if self.problems.len() > before {
            return None;
        }
        Some(StaticSite {
            root: root?,
            index,
            spa_fallback,
            fallback_except,
            max_age_s,
            cache_bytes: cache_mb << 20,
        })
    }

    /// Problems between servers: duplicate names, a domain claimed twice, a default
    /// server that does not exist.
    fn cross_check(&mut self, config: &Config, servers: Option<&Value>) {
        // Duplicate names are found on the raw entries, so an entry that is invalid for
        // another reason still counts.
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, entry) in servers
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(name) = entry.get("name").and_then(Value::as_str) {
                if let Some(first) = names.get(name) {
                    self.problem(
                        &format!("servers[{i}].name"),
                        format!("duplicate server name {name:?} (also servers[{first}])"),
                    );
                } else {
                    names.insert(name, i);
                }
            }
        }
        let mut domains: HashMap<&DomainPattern, (&str, usize)> = HashMap::new();
        let server_index = std::mem::take(&mut self.server_index);
        for (server, &i) in config.servers.iter().zip(&server_index) {
            if !server.enabled {
                continue;
            }
            for (d, domain) in server.domains.iter().enumerate() {
                match domains.get(domain) {
                    Some((other, j)) if *other != server.name => self.problem(
                        &format!("servers[{i}].domains[{d}]"),
                        format!(
                            "domain {domain} is already claimed by server {other:?} (servers[{j}])"
                        ),
                    ),
                    Some(_) => self.problem(
                        &format!("servers[{i}].domains[{d}]"),
                        format!("domain {domain} is listed twice"),
                    ),
                    None => {
                        domains.insert(domain, (&server.name, i));
                    }
                }
            }
        }
        if let Some(default) = &config.global.default_server {
            match config.servers.iter().find(|s| &s.name == default) {
                None => self.problem(
                    "global.default_server",
                    format!("no server is named {default:?}"),
                ),
                Some(s) if !s.enabled => self.problem(
                    "global.default_server",
                    format!("server {default:?} is disabled"),
                ),
                Some(_) => {}
            }
        }
    }
}

/// How many segments `path` has, if it is a plain relative path: segments separated by
/// `/`, none of them empty, `.` or `..`, and no backslash or NUL anywhere.
fn relative_file(path: &str) -> Option<usize> {
    if path.contains(['\\', '\0']) {
        return None;
    }
    let mut n = 0;
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return None;
        }
        n += 1;
    }
    Some(n)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "GREETING").then(|| "Hi".to_owned())
    }

    fn problems(text: &str) -> Vec<String> {
        parse(text, &env)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c = parse(r#"{"servers": []}"#, &env).unwrap();
        assert_eq!(
            c.global.listen,
            vec![Listen::plain(DEFAULT_LISTEN.parse().unwrap())]
        );
        assert_eq!(c.global.plugin_dir, PathBuf::from("plugins"));
        assert_eq!(c.global.limits, Limits::default());
    }

    #[test]
    fn substitutes_environment_variables() {
        let c = parse(
            r#"{"servers": [{"name": "a", "domains": ["a.test"], "plugin": "hello",
                "config": {"greeting": "${GREETING}, $${NOT} $5"}}]}"#,
            &env,
        )
        .unwrap();
        assert_eq!(
            c.servers[0].plugin_config,
            r#"{"greeting":"Hi, ${NOT} $5"}"#
        );
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let got = problems(
            r#"{"global": {"listen": "nowhere", "colour": 1, "default_server": "zzz"},
                "servers": [
                  {"name": "a", "domains": ["a.test", "bad_domain!"], "plugin": "hello"},
                  {"name": "b", "domains": ["A.test"], "plugin": "hello", "extra": true},
                  {"name": "a", "domains": ["c.test"], "plugin": "hello"},
                  {"name": "d", "domains": ["d.test"], "plugin": "x", "config": {"k": "${MISSING}"}}
                ]}"#,
        );
        let expected = [
            "servers[3].config.k: environment variable MISSING is not set",
            "global.colour: unknown key",
            "global.listen: \"nowhere\" is not an IP address",
            "servers[0].domains[1]: \"bad_domain!\" is not a valid domain",
            "servers[1].extra: unknown key",
            "servers[2].name: duplicate server name \"a\" (also servers[0])",
            "global.default_server: no server is named \"zzz\"",
        ];
        for e in expected {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expected.len(), "{got:#?}");
    }

    #[test]
    fn isolation_is_in_process_unless_a_server_asks_for_a_process() {
        let c = parse(
            r#"{"servers": [
                {"name": "a", "domains": ["a.test"], "plugin": "a"},
                {"name": "b", "domains": ["b.test"], "plugin": "b", "isolation": "process"},
                {"name": "c", "domains": ["c.test"], "plugin": "c", "isolation": "process",
                 "worker": {"max_memory_mb": 64}}]}"#,
            &env,
        )
        .unwrap();
        assert_eq!(c.servers[0].isolation, Isolation::InProcess);
        assert_eq!(
            c.servers[1].isolation,
            Isolation::Process(WorkerLimits::default())
        );
        assert_eq!(
            c.servers[2].isolation,
            Isolation::Process(WorkerLimits {
                max_memory_mb: Some(64)
            })
        );
        let worker = c.clone().for_worker("c", PathBuf::from("/w")).unwrap();
        assert_eq!(worker.servers.len(), 1);
        assert_eq!(worker.servers[0].isolation, Isolation::InProcess);
        assert!(worker.global.listen.is_empty() && worker.global.admin.is_none());
        assert_eq!(worker.global.default_server.as_deref(), Some("c"));
        assert!(c.for_worker("zzz", PathBuf::from("/w")).is_none());
        let got = problems(
            r#"{"servers": [
                {"name": "a", "domains": ["a.test"], "plugin": "a", "isolation": "sandbox"},
                {"name": "b", "domains": ["b.test"], "plugin": "b", "worker": {"max_memory_mb": 64}},
                {"name": "c", "domains": ["c.test"], "plugin": "c", "isolation": "process",
                 "worker": {"max_memory_mb": 1, "cpu": 2}},
                {"name": "d", "domains": ["d.test"], "static": {"root": "."}, "isolation": "process"}]}"#,
        );
        let expected = [
            "servers[0].isolation: expected \"in_process\" or \"process\", found \"sandbox\"",
            "servers[1].worker: only used with \"isolation\": \"process\"",
            "servers[2].worker.cpu: unknown key",
            "servers[2].worker.max_memory_mb:",
            "servers[3].isolation: a server of static files only has no plugin",
        ];
        for e in expected {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expected.len(), "{got:#?}");
    }

    #[test]
    fn the_bus_runs_in_process_unless_redis_is_named() {
        let c = parse(r#"{"servers": []}"#, &env).unwrap();
        assert_eq!(c.global.bus.backend, BusBackend::InProcess);
        let redis =
            |name: &str| (name == "REDIS_URL").then(|| "redis://:pw@127.0.0.1:6380/1".to_owned());
        let c = parse(
            r#"{"global": {"bus": {"backend": "redis", "url": "${REDIS_URL}"}}, "servers": []}"#,
            &redis,
        )
        .unwrap();
        assert_eq!(
            c.global.bus.backend,
            BusBackend::Redis {
                url: "redis://:pw@127.0.0.1:6380/1".to_owned(),
                channel_prefix: DEFAULT_CHANNEL_PREFIX.to_owned(),
            }
        );
        let got = problems(r#"{"global": {"bus": {"backend": "redis"}}, "servers": []}"#);
        assert!(got[0].starts_with("global.bus.url: required"), "{got:?}");
        let got = problems(
            r#"{"global": {"bus": {"backend": "redis", "url": "http://pw@cache", "channel_prefix": "a*"}}, "servers": []}"#,
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.iter()
                .any(|g| g.starts_with("global.bus.url: not a Redis URL")),
            "{got:?}"
        );
        assert!(
            got.iter().all(|g| !g.contains("pw@")),
            "the URL is not repeated: {got:?}"
        );
        assert!(got
            .iter()
            .any(|g| g.starts_with("global.bus.channel_prefix: must not")));
        let got = problems(r#"{"global": {"bus": {"backend": "kafka"}}, "servers": []}"#);
        assert!(
            got[0].starts_with("global.bus.backend: unknown backend \"kafka\""),
            "{got:?}"
        );
        let got = problems(r#"{"global": {"bus": {"url": "redis://x"}}, "servers": []}"#);
        assert!(
            got[0].starts_with("global.bus.url: only used with"),
            "{got:?}"
        );
    }

    #[test]
    fn a_domain_claimed_twice_names_both_servers() {
        let got = problems(
            r#"{"servers": [
                  {"name": "a", "domains": ["x.test"], "plugin": "hello"},
                  {"name": "b", "domains": ["X.test."], "plugin": "hello"}]}"#,
        );
        assert_eq!(
            got,
            ["servers[1].domains[0]: domain x.test is already claimed by server \"a\" (servers[0])"]
        );
    }

    #[test]
    fn rate_limits_and_tenants_are_read_with_their_defaults() {
        let c = parse(
            r#"{"global": {"rate_limit": {"per_second": 100}},
                "tenants": [{"id": "acme", "rate_limit": [{"per_second": 0.5}, {"per_second": 5, "per": "client_ip"}]}],
                "servers": [
                  {"name": "a", "domains": ["a.test"], "plugin": "x", "tenant": "acme",
                   "rate_limit": {"per_second": 50, "burst": 10, "per": "client_ip"}},
                  {"name": "app", "domains": ["*.app.test"], "plugin": "x",
                   "tenant_from_subdomain": "App.Test", "rate_limit": {"per_second": 2.5, "per": "tenant"}},
                  {"name": "b", "domains": ["b.test"], "plugin": "x"}]}"#,
            &env,
        )
        .unwrap();
        let limit = |per_second: f64, burst: u32, per: RatePer| RateLimit {
            per_second,
            burst,
            per,
        };
        assert_eq!(c.global.rate_limits, [limit(100.0, 100, RatePer::ClientIp)]);
        assert_eq!(
            c.tenants,
            [TenantConfig {
                id: "acme".into(),
                rate_limits: vec![
                    limit(0.5, 1, RatePer::Tenant),
                    limit(5.0, 5, RatePer::ClientIp)
                ],
            }]
        );
        assert_eq!(c.servers[0].tenancy, Some(Tenancy::Fixed("acme".into())));
        assert_eq!(
            c.servers[0].rate_limits,
            [limit(50.0, 10, RatePer::ClientIp)]
        );
        assert_eq!(
            c.servers[1].tenancy,
            Some(Tenancy::Subdomain("app.test".into()))
        );
        assert_eq!(c.servers[1].rate_limits, [limit(2.5, 3, RatePer::Tenant)]);
        assert_eq!(
            (&c.servers[2].tenancy, c.servers[2].rate_limits.len()),
            (&None, 0)
        );
    }

    #[test]
    fn rate_limit_and_tenant_problems_name_their_path() {
        let got = problems(
            r#"{"global": {"rate_limit": {"per_second": 5, "per": "server"}},
                "tenants": [{"id": "acme"}, {"id": "acme"}, {"id": "Big Co", "rate_limit": {"per_second": 1, "per": "server"}}],
                "servers": [
                  {"name": "a", "domains": ["a.test"], "plugin": "x", "tenant": "nobody",
                   "rate_limit": [{"per_second": 0}, {"per_second": 1, "burst": 0}, {"burst": 3},
                                  {"per_second": 1}, {"per_second": 1}, {"per_second": 2, "colour": 2}]},
                  {"name": "b", "domains": ["b.test"], "plugin": "x", "rate_limit": {"per_second": 1, "per": "tenant"}},
                  {"name": "c", "domains": ["*.c.test"], "plugin": "x", "tenant_from_subdomain": "app.test"},
                  {"name": "d", "domains": ["d.test"], "plugin": "x", "tenant": "acme", "tenant_from_subdomain": "d.test"},
                  {"name": "e", "domains": ["*.e.test"], "plugin": "x", "tenant_from_subdomain": "*.e.test"}
                ]}"#,
        );
        let expected = [
            "global.rate_limit.per: expected \"client_ip\", found \"server\"",
            "tenants[1].id: duplicate tenant id \"acme\" (also tenants[0])",
            "tenants[2].id: \"Big Co\" may only contain lower case letters",
            "tenants[2].rate_limit.per: expected \"tenant\" or \"client_ip\", found \"server\"",
            "servers[0].tenant: no tenant has the id \"nobody\"",
            "servers[0].rate_limit[0].per_second: expected a number above 0",
            "servers[0].rate_limit[1].burst: expected a whole number from 1",
            "servers[0].rate_limit[2]: missing key `per_second`",
            "servers[0].rate_limit[4]: the same limit is listed twice (also servers[0].rate_limit[3])",
            "servers[0].rate_limit[5].colour: unknown key",
            "servers[1].rate_limit: \"per\": \"tenant\" needs a server with `tenant`",
            "servers[2].tenant_from_subdomain: no domain of this server is under app.test: add \"*.app.test\"",
            "servers[3]: `tenant` and `tenant_from_subdomain` exclude each other",
            "servers[4].tenant_from_subdomain: \"*.e.test\" must be a domain name",
        ];
        for e in expected {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expected.len(), "{got:#?}");
    }

    #[test]
    fn invalid_json_gives_line_and_column() {
        let got = problems("{\n  \"servers\": [,]\n}");
        assert_eq!(got.len(), 1);
        assert!(got[0].contains("line 2 column"), "{got:?}");
    }
}

//! The test harness: builds the plugin libraries once, starts real host processes on
//! port 0, and talks to them over real sockets.

pub mod browser;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every library the tests load, by package name.
const LIBRARIES: &[&str] = &[
    "hello",
    "notes",
    "gateway",
    "chat",
    "fixture-misbehave",
    "fixture-old-api",
    "fixture-crash-on-load",
    "fixture-tasks",
    "fixture-sockets",
];

/// Builds the plugin and fixture libraries (once per test run) and returns the path of
/// the one built from `package`.
pub fn library(package: &str) -> PathBuf {
    static BUILT: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--message-format=json-render-diagnostics"])
            .current_dir(workspace_root());
        for p in LIBRARIES {
            cmd.args(["-p", p]);
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build");
        assert!(out.status.success(), "building the test plugins failed");
        let mut map = HashMap::new();
        for line in out.stdout.split(|b| *b == b'\n') {
            let Ok(msg) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            if msg["reason"] != "compiler-artifact" {
                continue;
            }
            let files = msg["filenames"].as_array().cloned().unwrap_or_default();
            for f in files.iter().filter_map(Value::as_str) {
                if f.ends_with(std::env::consts::DLL_SUFFIX) {
                    map.insert(
                        msg["target"]["name"].as_str().unwrap().replace('_', "-"),
                        PathBuf::from(f),
                    );
                }
            }
        }
        map
    });
    built
        .get(package)
        .unwrap_or_else(|| panic!("no library was built for {package}: {built:?}"))
        .clone()
}

/// Builds `fixture-versioned` with `FIXTURE_VARIANT=variant` (once per variant) and
/// returns a copy of the library that later builds will not overwrite.
pub fn variant(variant: &str) -> PathBuf {
    build_variant("fixture-versioned", ("FIXTURE_VARIANT", variant), None)
}

/// Builds `package` with the environment variable `env` set (once per package and
/// value) and returns a copy of its library that later builds will not overwrite.
/// `target_dir`: a target folder of its own under the tests' temporary folder, for a
/// package whose default build other tests read while this one runs.
pub fn build_variant(package: &str, env: (&str, &str), target_dir: Option<&str>) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let key = format!("{package} {}={}", env.0, env.1);
    // One build at a time: every value is written to the same cargo output path.
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(k, _)| *k == key) {
        return path.clone();
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--message-format=json-render-diagnostics",
        "-p",
        package,
    ]);
    if let Some(dir) = target_dir {
        cmd.arg("--target-dir").arg(tmp.join(dir));
    }
    let out = cmd
        .env(env.0, env.1)
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "building {key} failed");
    let target_name = package.replace('-', "_");
    let lib = out
        .stdout
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == *target_name)
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.to_string_lossy().ends_with(std::env::consts::DLL_SUFFIX))
        .expect("the build names its library");
    let dir = tmp.join("variants");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(format!(
        "{package}-{}{}",
        env.1,
        std::env::consts::DLL_SUFFIX
    ));
    std::fs::copy(&lib, &copy).unwrap();
    built.push((key, copy.clone()));
    copy
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A fresh folder for one test. The folders of earlier test runs (named after a process
/// that no longer runs) are removed the first time: each holds copies of plugin
/// libraries, tens of MB a test. The last run's folders stay for a look after a failure.
pub fn temp_dir(label: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_stale_dirs);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    dir
}

/// Removes the folders `temp_dir` made in runs whose process has ended.
fn remove_stale_dirs() {
    if !cfg!(target_os = "linux") {
        return; // no /proc to ask whether a process runs
    }
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `<label>-<pid>-<n>`
        let mut parts = name.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(_), Ok(pid)) = (n.parse::<u64>(), pid.parse::<u32>()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A host set-up: a folder with a config file and a plugin folder. The host runs in
/// that folder, so files a plugin makes at relative paths (such as `notes`' database)
/// land there. Clone it to start another host on the same folder.
#[derive(Clone)]
pub struct Setup {
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    /// Whether the host gets `--admin 127.0.0.1:0` (else `global.admin` applies).
    admin_flag: bool,
}

impl Setup {
    pub fn new(label: &str, config: &str) -> Self {
        let dir = temp_dir(label);
        std::fs::write(dir.join("servers.config.json"), config).unwrap();
        Setup {
            dir,
            env: Vec::new(),
            admin_flag: true,
        }
    }

    /// Installs the library built from `package` as `plugins/<file>`.
    pub fn plugin(self, package: &str, file: &str) -> Self {
        std::fs::copy(library(package), self.dir.join("plugins").join(file)).unwrap();
        self
    }

    /// Writes arbitrary bytes as `plugins/<file>`.
    pub fn file(self, file: &str, bytes: &[u8]) -> Self {
        std::fs::write(self.dir.join("plugins").join(file), bytes).unwrap();
        self
    }

    /// The admin listener as the config says, rather than on a free port.
    pub fn admin_as_configured(mut self) -> Self {
        self.admin_flag = false;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_host"));
        cmd.current_dir(&self.dir)
            .arg("--config")
            .arg(self.dir.join("servers.config.json"))
            // Many hosts run at once: each has its admin listener on a free port.
            .args(if self.admin_flag {
                &["--admin", "127.0.0.1:0"][..]
            } else {
                &[]
            })
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("SERVERS_CONFIG")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the host to completion (for `--check` and config errors).
    pub fn run(&self, args: &[&str]) -> Finished {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("host did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        Finished {
            status,
            stdout,
            stderr,
        }
    }

    /// Starts a serving host on a free port and waits until it listens.
    pub fn start(self) -> Host {
        self.start_with(&["--listen", "127.0.0.1:0"])
    }

    /// Starts a host that listens where its config says (so config changes to
    /// `global.listen` apply).
    pub fn start_with_config_listen(self) -> Host {
        self.start_with(&[])
    }

    /// [`Setup::start`] with more command-line arguments (such as `--log-format json`).
    pub fn start_with_args(self, args: &[&str]) -> Host {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        self.start_with(&all)
    }

    fn start_with(self, args: &[&str]) -> Host {
        let mut child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // The first listener, plain or TLS (not the admin listener).
                let addr = line
                    .split("listening on http://")
                    .nth(1)
                    .or_else(|| line.split("listening on https://").nth(1))
                    .filter(|_| !line.contains("admin listening on"));
                if let Some(addr) = addr {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(address_at(addr));
                    }
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("host did not start listening:\n{}", logs.lock().unwrap());
            }
        };
        Host {
            child,
            client: Client { addr },
            logs,
            _setup: self,
        }
    }
}

/// The socket address at the start of `text` (the rest of a `listening on http://`
/// line, in the text format or inside a JSON string).
fn address_at(text: &str) -> SocketAddr {
    let end = text
        .find(|c: char| !(c.is_ascii_hexdigit() || "[]:.%".contains(c)))
        .unwrap_or(text.len());
    text[..end]
        .parse()
        .unwrap_or_else(|e| panic!("no address at the start of {text:?}: {e}"))
}

/// A host process that ran to completion.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A running host process. Killed when dropped. Derefs to a [`Client`] for its first
/// listening address.
pub struct Host {
    child: Child,
    client: Client,
    logs: Arc<Mutex<String>>,
    _setup: Setup,
}

impl std::ops::Deref for Host {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Sends requests to one address.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
}

/// A WebSocket client connection (reads time out after 15 s).
pub type Ws = tungstenite::WebSocket<std::net::TcpStream>;

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Host {
    /// A client for another address (for example a second listener).
    pub fn at(addr: SocketAddr) -> Client {
        Client { addr }
    }

    pub fn dir(&self) -> &Path {
        &self._setup.dir
    }

    /// The set-up this host was started from (clone it to start another on its folder).
    pub fn setup(&self) -> &Setup {
        &self._setup
    }

    /// Installs a library the way `cargo xtask build-plugins` does: a temporary name in
    /// the plugin folder, then a rename.
    pub fn install(&self, from: &Path, file: &str) {
        self.install_bytes(&std::fs::read(from).unwrap(), file);
    }

    pub fn install_bytes(&self, bytes: &[u8], file: &str) {
        let dir = self.dir().join("plugins");
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }

    /// Replaces the config file atomically, as editors do.
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir().join(".servers.config.json.tmp");
        std::fs::write(&tmp, config).unwrap();
        std::fs::rename(&tmp, self.dir().join("servers.config.json")).unwrap();
    }

    /// Polls `f` until it returns true (up to 15 s).
    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            if Instant::now() > deadline {
                panic!("timed out waiting until {what}; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the host has logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) for a log line containing every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_owned();
            }
            if Instant::now() > deadline {
                panic!("no log line contains {needles:?}; logs:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_term();
        self.wait_exit(Duration::from_secs(30))
            .expect("host did not exit after SIGTERM")
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`HUP`, `TERM`, ...) to the host.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// The exit status, if the host exits within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the log reader catch up with the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address of the first listener that speaks TLS (from its log line).
    /// A client for the admin listener (health, metrics).
    pub fn admin(&self) -> Client {
        let line = self.wait_for_log(&["admin listening on http://"]);
        let addr = line.split("admin listening on http://").nth(1).unwrap();
        Client {
            addr: addr.split_whitespace().next().unwrap().parse().unwrap(),
        }
    }

    pub fn https_addr(&self) -> SocketAddr {
        let line = self.wait_for_log(&["listening on https://"]);
        address_at(line.split("listening on https://").nth(1).unwrap())
    }

    /// How many log lines contain every one of `needles`.
    pub fn count_log_lines(&self, needles: &[&str]) -> usize {
        self.logs()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

impl Client {
    pub fn get(&self, host: &str, path: &str) -> Reply {
        self.send("GET", host, path, b"", &[])
    }

    /// Sends one request on a fresh connection.
    pub fn send(
        &self,
        method: &str,
        host: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body);
        self.raw(&raw)
    }

    /// Sends raw bytes and reads the response until the server closes the connection.
    pub fn raw(&self, request: &[u8]) -> Reply {
        let stream = TcpStream::connect(self.addr).expect("connect to host");
        Self::exchange(stream, request)
    }

    /// [`Client::get`] from another local address: on Linux every 127.0.0.0/8 address
    /// is this machine's, so `127.0.0.2` is a second client IP.
    pub fn get_from(&self, local: std::net::IpAddr, host: &str, path: &str) -> Reply {
        let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        Self::exchange(self.connect_from(local), request.as_bytes())
    }

    /// A connection from `local` (any port) to this address.
    pub fn connect_from(&self, local: std::net::IpAddr) -> TcpStream {
        use socket2::{Domain, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::for_address(self.addr), Type::STREAM, None).unwrap();
        socket
            .bind(&SockAddr::from(SocketAddr::new(local, 0)))
            .unwrap_or_else(|e| panic!("bind a client socket to {local}: {e}"));
        socket
            .connect(&SockAddr::from(self.addr))
            .expect("connect to host");
        socket.into()
    }

    fn exchange(mut stream: TcpStream, request: &[u8]) -> Reply {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).expect("read response");
        Reply::parse(&out)
    }

    /// Sends `GET path` for `domain` on one keep-alive connection until `stop` is set,
    /// as a load generator does; a reply `ok` refuses and a connection error (after
    /// which it reconnects) are added to `failures`. Returns how many replies were ok.
    pub fn ask_until(
        &self,
        domain: &str,
        path: &str,
        ok: impl Fn(&Reply) -> bool,
        stop: &std::sync::atomic::AtomicBool,
        failures: &Mutex<Vec<String>>,
    ) -> usize {
        let mut conn = self.connect();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            match conn.get(domain, path) {
                Ok(r) if ok(&r) => n += 1,
                Ok(r) => failures
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", r.status, r.body)),
                Err(e) => {
                    failures.lock().unwrap().push(e);
                    conn = self.connect();
                }
            }
        }
        n
    }

    /// Runs `work` while `clients` keep-alive connections per domain in `domains` ask
    /// for `path` as fast as they can (see [`Host::ask_until`]); the load stops when
    /// `work` returns or panics. Returns the failures (replies `ok` refused, connection
    /// errors) and how many replies were ok.
    pub fn under_load<T>(
        &self,
        domains: &[&str],
        clients: usize,
        path: &str,
        ok: impl Fn(&Reply) -> bool + Sync,
        work: impl FnOnce() -> T,
    ) -> (T, Vec<String>, usize) {
        /// Sets the flag when dropped: a panic in `work` must stop the load too, or
        /// the scope would wait for it forever.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let failures = Mutex::new(Vec::new());
        let served = std::sync::atomic::AtomicUsize::new(0);
        let done = std::thread::scope(|s| {
            let _stop = StopOnDrop(&stop);
            for domain in domains {
                for _ in 0..clients {
                    let (stop, failures, served, ok) = (&stop, &failures, &served, &ok);
                    s.spawn(move || {
                        let n = self.ask_until(domain, path, ok, stop, failures);
                        served.fetch_add(n, Ordering::Relaxed);
                    });
                }
            }
            work()
        });
        (done, failures.into_inner().unwrap(), served.into_inner())
    }

    /// Opens a WebSocket to `url` (`ws://<domain><path>`) at this address: the
    /// connection and the server's 101 response, or the response that refused it.
    pub fn websocket(
        &self,
        url: &str,
    ) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let stream = std::net::TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        match tungstenite::client(url.into_client_request().unwrap(), stream) {
            Ok(done) => Ok(done),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            Err(e) => panic!("WebSocket handshake with {url}: {e}"),
        }
    }

    /// Opens a keep-alive connection.
    pub fn connect(&self) -> Conn {
        let stream = TcpStream::connect(self.addr).expect("connect to host");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(stream),
        }
    }
}

/// A keep-alive HTTP/1.1 connection that reports failures instead of panicking.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn get(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("connection closed after {head:?}"));
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .ok_or_else(|| format!("no content-length in {head:?}"))?;
        let mut body = vec![0; len];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))?;
        let mut raw = head.into_bytes();
        raw.extend_from_slice(b"\r\n");
        raw.extend_from_slice(&body);
        Ok(Reply::parse(&raw))
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn parse(raw: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response in {text:?}"));
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// The config most tests use: hello and notes as shipped, plus the misbehaving fixture.
/// A process's resident memory, in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn standard_config() -> String {
    r#"{
      "global": {"plugin_dir": "plugins", "limits": {"request_timeout_ms": 2000, "max_body_bytes": 65536}},
      "servers": [
        {"name": "hello", "domains": ["hello.localhost", "*.hello.localhost"], "plugin": "hello",
         "config": {"greeting": "Howdy"}},
        {"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"},
        {"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave"}
      ]
    }"#
    .to_owned()
}

/// A host running `standard_config` with all three plugins installed.
/// A host serving `hello` whose admin listener (on a free port) needs the bearer token
/// `token`, read from the environment variable `var`.
pub fn hello_with_admin_token(label: &str, var: &str, token: &str) -> Host {
    let config = format!(
        r#"{{"global": {{"admin": {{"listen": "127.0.0.1:0", "token_env": "{var}"}}}},
            "servers": [{{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    );
    Setup::new(label, &config)
        .plugin("hello", "hello.so")
        .env(var, token)
        .start()
}

pub fn standard_host(label: &str) -> Host {
    Setup::new(label, &standard_config())
        .plugin("hello", "hello.so")
        .plugin("notes", "notes.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .start()
}

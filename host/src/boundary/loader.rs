//! Opening plugin libraries and checking their ABI. The only module that touches
//! libloading.
//!
//! Each load opens a fresh copy of the file at a unique path, because `dlopen` caches
//! by path and by inode and would hand back an old build. The copy is unlinked as soon
//! as it is open; the mapping stays valid.
//!
//! Before abi_stable reads anything from a library, `header` checks the library's
//! exported header against the library's own mapped segments, so that a corrupt file is
//! refused with a reason instead of crashing the host. Then the plugin-api version is
//! checked against the promise in [`loads_plugins_built_against`], and only then does
//! abi_stable check the layout and run the plugin's constructor.
//!
//! Libraries are never closed. A plugin that touched a `thread_local!` with a destructor
//! (std, tokio and tracing all do) cannot be unmapped by glibc anyway, and abi_stable's
//! layout checker keeps global caches that point into every library it checked, so a
//! `dlclose` would leave dangling pointers. ARCHITECTURE.md says what this costs.
#![allow(unsafe_code)]

mod header;

use std::fmt;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use abi_stable::library::{
    AbiHeaderRef, LibraryError, RootModule, ROOT_MODULE_LOADER_NAME_WITH_NUL,
};
use plugin_api::ffi::{FfiHealth, PluginModRef, HEALTH_SYMBOL};

/// A plugin library that passed every check and is mapped for the rest of the process.
pub struct PluginLibrary {
    /// The plugin's name (its crate name).
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The plugin-api version the plugin was built against.
    pub api_version: String,
    /// The file it was loaded from (not the private copy).
    pub file: PathBuf,
    /// A hash of the file's bytes, to recognise an identical rebuild.
    pub content_hash: u64,
    /// `None` for a library checked in a child process only ([`open_elsewhere`]): one
    /// that runs in worker processes, never in this one.
    pub(crate) module: Option<PluginModRef>,
    /// The plugin's health hook; `None` for a library built before it existed
    /// (plugin-api 0.6.0).
    pub(crate) health: Option<FfiHealth>,
}

impl PluginLibrary {
    /// Whether it is open in this process (else it was checked in a child process
    /// only, for worker processes).
    pub fn is_open_here(&self) -> bool {
        self.module.is_some()
    }

    /// Which build this is, for log lines: the first 16 hex digits of a hash of the file's
    /// bytes (two builds of one version differ here).
    pub fn build(&self) -> String {
        format!("{:016x}", self.content_hash)
    }
}

impl fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// Why a file was refused. Its `Display` is one line that names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: PathBuf,
    pub reason: LoadFailure,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadFailure {
    Unreadable(String),
    NotALibrary(String),
    /// Truncated, or still being written; worth retrying while the file changes.
    Incomplete(String),
    NotAPlugin,
    AbiStableVersion,
    /// Built against a plugin-api version this host does not load (see
    /// [`loads_plugins_built_against`]). `expected` is the host's version.
    InterfaceVersion {
        expected: String,
        found: String,
    },
    /// Something in the library's plugin header (or its root module's name or version)
    /// points outside the library, is too long, is not UTF-8, or is not what a freshly
    /// opened library holds: what is wrong.
    CorruptHeader(String),
    /// Loading it in a child process crashed or hung that process: how.
    Crashed(String),
    Layout {
        found: String,
    },
    /// The file or its folder can be written by another user (what and why).
    Unprotected(String),
    Other(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host_api = PluginModRef::VERSION_STRINGS;
        write!(f, "{}: ", self.file.display())?;
        match &self.reason {
            LoadFailure::Unreadable(e) => write!(f, "cannot read the file: {e}"),
            LoadFailure::Unprotected(what) => write!(
                f,
                "not loaded: {what}, so another user could make this host run their code"
            ),
            LoadFailure::NotALibrary(e) | LoadFailure::Incomplete(e) => {
                write!(f, "not a loadable shared library: {e}")
            }
            LoadFailure::NotAPlugin => write!(
                f,
                "a shared library, but not a plugin (it exports no plugin-api root module; did it call export_plugin!?)"
            ),
            LoadFailure::AbiStableVersion => write!(
                f,
                "built with an incompatible version of abi_stable; rebuild it against plugin-api {host_api}"
            ),
            LoadFailure::InterfaceVersion { expected, found } => write!(
                f,
                "built against plugin-api {found}, but this host has plugin-api {expected}, which loads {}; rebuild the plugin against plugin-api {expected}",
                loadable_range(expected)
            ),
            LoadFailure::CorruptHeader(what) => write!(
                f,
                "its plugin header is corrupt: {what}; rebuild the plugin"
            ),
            LoadFailure::Crashed(how) => write!(
                f,
                "loading it crashed a separate process that checks plugins first ({how}), so this host does not load it: a crashing initialiser, or a corrupt file; rebuild the plugin"
            ),
            LoadFailure::Layout { found } => write!(
                f,
                "its plugin-api types differ from this host's (plugin built against plugin-api {found}, host has {host_api}); rebuild the plugin (details at debug level)"
            ),
            LoadFailure::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for LoadError {}

static NEXT_COPY: AtomicU64 = AtomicU64::new(1);

/// A plugin file copied to a private path and checked, not yet opened. Dropping it
/// removes the copy.
#[derive(Debug)]
pub struct PluginFile {
    pub path: PathBuf,
    pub content_hash: u64,
    copy: PathBuf,
}

impl Drop for PluginFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.copy);
    }
}

/// Loads and checks the plugin at `file`, using `copies_dir` for its private copy.
pub fn load(file: &Path, copies_dir: &Path) -> Result<PluginLibrary, LoadError> {
    open(read(file, copies_dir)?)
}

/// Copies a plugin file to a fresh private path and checks the copy: a complete ELF
/// file, and a hash of its bytes. Every later step works on this copy, so a file being
/// rewritten meanwhile cannot make the checks and the load see different bytes.
///
/// The bytes are streamed in 256 KiB chunks: reading whole multi-MiB libraries into
/// memory on every reload fragmented glibc's heap and cost about 600 KiB of resident
/// memory per reload.
/// Why a file or folder with this metadata could be changed by another user: writable
/// by anyone, or owned by someone who is neither this user nor root. (Group-writable is
/// allowed: with user private groups, the usual umask makes every file so.)
fn unprotected(what: &str, meta: &std::fs::Metadata) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.mode() & 0o002 != 0 {
            return Some(format!(
                "{what} is writable by every user (mode {:o}; chmod o-w)",
                meta.mode() & 0o7777
            ));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me && meta.uid() != 0 {
            return Some(format!(
                "{what} belongs to another user (uid {}; this host runs as uid {me})",
                meta.uid()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (what, meta);
    None
}

pub fn read(file: &Path, copies_dir: &Path) -> Result<PluginFile, LoadError> {
    use std::io::{Read, Write};
    let fail = |reason| LoadError {
        file: file.to_owned(),
        reason,
    };
    let unreadable = |e: std::io::Error| fail(LoadFailure::Unreadable(e.to_string()));
    let mut source = std::fs::File::open(file).map_err(unreadable)?;
    let folder = file.parent().unwrap_or(Path::new("."));
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    for (what, meta) in [
        ("the library", source.metadata()),
        ("its folder", std::fs::metadata(folder)),
    ] {
        if let Some(why) = unprotected(what, &meta.map_err(unreadable)?) {
            return Err(fail(LoadFailure::Unprotected(why)));
        }
    }
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin");
    let copy_path = copies_dir.join(format!(
        "{stem}.{}.{}",
        NEXT_COPY.fetch_add(1, Ordering::Relaxed),
        std::env::consts::DLL_EXTENSION
    ));
    let mut copy = create_private(&copy_path).map_err(|e| {
        fail(LoadFailure::Other(format!(
            "cannot write a private copy to {}: {e}",
            copy_path.display()
        )))
    })?;
    // From here on the copy exists; `PluginFile` removes it however this ends.
    let mut plugin = PluginFile {
        path: file.to_owned(),
        content_hash: 0,
        copy: copy_path,
    };
    // One pass: each chunk is written to the copy and hashed, so the hash is of exactly
    // the bytes that will be opened.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut header = Vec::with_capacity(64);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = source.read(&mut chunk).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        copy.write_all(&chunk[..n]).map_err(|e| {
            fail(LoadFailure::Other(format!(
                "cannot write a private copy to {}: {e}",
                plugin.copy.display()
            )))
        })?;
        if header.len() < 64 {
            let take = (64 - header.len()).min(n);
            header.extend_from_slice(&chunk[..take]);
        }
        hasher.write(&chunk[..n]);
        len += n as u64;
    }
    if !header.starts_with(b"\x7fELF") && !header.starts_with(&[0xcf, 0xfa, 0xed, 0xfe]) {
        let what = if len == 0 {
            "the file is empty"
        } else {
            "it has no ELF header"
        };
        return Err(fail(LoadFailure::NotALibrary(what.to_owned())));
    }
    if let Some(why) = elf_incomplete(&header, len) {
        return Err(fail(LoadFailure::Incomplete(why)));
    }
    plugin.content_hash = hasher.finish();
    Ok(plugin)
}

/// Opens a checked plugin copy and checks its ABI.
pub fn open(plugin: PluginFile) -> Result<PluginLibrary, LoadError> {
    let file = plugin.path.as_path();
    let copy = plugin.copy.as_path();
    if let Some(exe) = PROBE.get() {
        probe(exe, copy).map_err(|reason| LoadError {
            file: file.to_owned(),
            reason,
        })?;
    }
    open_copy(file, copy, plugin.content_hash)
}

/// Checks a plugin copy in a child process only, and never opens it in this one: for a
/// library that runs only in worker processes (`isolation: "process"`), so that this
/// process does not map a new build on every reload (a mapped library is never
/// unmapped). The child does every check [`open`] does and reports the plugin's name
/// and versions. Without a child process to use (see [`probe_with`]), it is [`open`].
pub fn open_elsewhere(plugin: PluginFile) -> Result<PluginLibrary, LoadError> {
    let Some(exe) = PROBE.get() else {
        return open(plugin);
    };
    let file = plugin.path.clone();
    let fail = |reason| LoadError {
        file: file.clone(),
        reason,
    };
    let child = std::process::Command::new(exe)
        .arg("--probe-plugin")
        .arg(&plugin.copy)
        .arg("--probe-report")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut child = child.map_err(|e| {
        fail(LoadFailure::Other(format!(
            "cannot start a process to check it ({e}); will try again"
        )))
    })?;
    // Read on a thread of its own, so that a library that prints much cannot block
    // the child; the report is the last line.
    let mut stdout = child.stdout.take().expect("piped");
    let (read, reading) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut out);
        let _ = read.send(out);
    });
    let status = wait_for_probe(&mut child).map_err(fail)?;
    // A process the library started may hold the output open: not for long.
    let out = reading
        .recv_timeout(std::time::Duration::from_secs(1))
        .unwrap_or_default();
    let last = out
        .split(|b| *b == b'\n')
        .rev()
        .find(|line| !line.is_empty())
        .unwrap_or_default();
    let report: serde_json::Value = serde_json::from_slice(last).unwrap_or_default();
    if let Some(refused) = report.get("refused").and_then(|r| r.as_str()) {
        return Err(fail(LoadFailure::Other(refused.to_owned())));
    }
    let text = |key: &str| report.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    match (text("name"), text("version"), text("api_version")) {
        (Some(name), Some(version), Some(api_version)) if status.success() => Ok(PluginLibrary {
            name,
            version,
            api_version,
            file,
            content_hash: plugin.content_hash,
            module: None,
            health: None,
        }),
        _ => {
            #[cfg(unix)]
            let how = std::os::unix::process::ExitStatusExt::signal(&status)
                .map_or_else(|| status.to_string(), |s| format!("signal {s}"));
            #[cfg(not(unix))]
            let how = status.to_string();
            Err(fail(LoadFailure::Crashed(how)))
        }
    }
}

/// Where the host binary is, for [`probe`]: set by `main`, so a library user (a
/// benchmark) loads in-process only.
static PROBE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// How long a probe may take to load a library before it counts as hung.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Makes every later [`open`] load the library in a child process first (`exe
/// --probe-plugin COPY`, which runs [`probe_main`]), and refuse it if that process
/// crashes or hangs. The checks in this process cover the header; what they cannot
/// (an initialiser that crashes when `dlopen` runs it, a corrupted type layout that
/// abi_stable's layout check walks) would otherwise take the host down with it.
///
/// `exe` is tried once first (`--probe-plugin -` must answer `ready`); if it cannot
/// serve as a probe (for example under valgrind, where the executable is the tool's),
/// libraries are loaded in-process only, and this says why.
pub fn probe_with(exe: PathBuf) -> Result<(), String> {
    let out = std::process::Command::new(&exe)
        .args(["--probe-plugin", "-"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if !out.status.success() || out.stdout != PROBE_READY {
        return Err(format!(
            "{} --probe-plugin - did not answer as the host does ({})",
            exe.display(),
            out.status
        ));
    }
    let _ = PROBE.set(exe);
    Ok(())
}

const PROBE_READY: &[u8] = b"ready\n";

/// The child's side of [`probe_with`]: loads `copy` as the host would. Exit 0: loaded;
/// 3: refused (the host's own load then says why); anything else, a crash. `-` is the
/// readiness check: it prints `ready`.
///
/// `report` (for [`open_elsewhere`]): prints what was found as one JSON object, the
/// plugin's name and versions, or why it was refused.
pub fn probe_main(copy: &Path, report: bool) -> std::process::ExitCode {
    use std::io::Write;
    if copy == Path::new("-") {
        let _ = std::io::stdout().write_all(PROBE_READY);
        return std::process::ExitCode::SUCCESS;
    }
    let opened = open_copy(copy, copy, 0);
    if report {
        let said = match &opened {
            Ok(lib) => serde_json::json!({
                "name": lib.name,
                "version": lib.version,
                "api_version": lib.api_version,
            }),
            Err(e) => {
                // Without the copy's name: the host names the file.
                let reason = LoadError {
                    file: PathBuf::new(),
                    reason: e.reason.clone(),
                }
                .to_string();
                let reason = reason.trim_start_matches(": ").to_owned();
                serde_json::json!({ "refused": reason })
            }
        };
        let _ = writeln!(std::io::stdout(), "{said}");
    }
    match opened {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::from(3),
    }
}

/// Waits for a probe child up to `PROBE_TIMEOUT`; past it the child is killed and the
/// library counts as hanging when loaded.
fn wait_for_probe(
    child: &mut std::process::Child,
) -> Result<std::process::ExitStatus, LoadFailure> {
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if started.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LoadFailure::Crashed(format!(
                    "loading it did not finish within {} s",
                    PROBE_TIMEOUT.as_secs()
                )));
            }
        }
    }
}

/// Loads `copy` in a child process (see [`probe_with`]). A refusal there is not an
/// error here: loading it in this process refuses it too, with the reason.
fn probe(exe: &Path, copy: &Path) -> Result<(), LoadFailure> {
    let child = std::process::Command::new(exe)
        .arg("--probe-plugin")
        .arg(copy)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            // Out of processes or file descriptors: say so, and refuse for now (the file
            // is looked at again).
            return Err(LoadFailure::Other(format!(
                "cannot start a process to check it ({e}); will try again"
            )));
        }
    };
    let status = wait_for_probe(&mut child)?;
    match status.code() {
        Some(0 | 3) => Ok(()),
        Some(code) => Err(LoadFailure::Crashed(format!("exit code {code}"))),
        None => {
            #[cfg(unix)]
            let how = std::os::unix::process::ExitStatusExt::signal(&status)
                .map_or_else(|| "a signal".to_owned(), |s| format!("signal {s}"));
            #[cfg(not(unix))]
            let how = "a signal".to_owned();
            Err(LoadFailure::Crashed(how))
        }
    }
}

/// Opens a checked plugin copy and checks its ABI (`file` is the name it is known by).
fn open_copy(file: &Path, copy: &Path, content_hash: u64) -> Result<PluginLibrary, LoadError> {
    let fail = |reason| LoadError {
        file: file.to_owned(),
        reason,
    };
    // SAFETY: loading a library runs its initialisers. Plugins are code the operator chose
    // to run in this process; this is the trust boundary the product is built on.
    let opened = unsafe { libloading::Library::new(copy) };
    let library = opened.map_err(|e| fail(LoadFailure::NotALibrary(dl_error(&e, copy))))?;

    let symbol = ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes();
    // SAFETY: only the symbol's address is taken; nothing is read through it here.
    let address = match unsafe { library.get::<*const u8>(symbol) } {
        Ok(address) => *address as usize,
        Err(_) => return Err(fail(LoadFailure::NotAPlugin)),
    };
    if address == 0 {
        return Err(fail(LoadFailure::CorruptHeader(
            "its header symbol is null".to_owned(),
        )));
    }
    // SAFETY: abi_stable exports the header as a static whose address is an `AbiHeaderRef`
    // (this mirrors `abi_stable::library::abi_header_from_raw_library`). The address is
    // not null; nothing is read through it before `header::check` below.
    let header: AbiHeaderRef = match unsafe { library.get::<AbiHeaderRef>(symbol) } {
        Ok(symbol) => *symbol,
        Err(_) => return Err(fail(LoadFailure::NotAPlugin)),
    };
    // Only the address is taken here; it is called only once every check below has
    // passed (through `Instance::health`).
    // SAFETY: `export_plugin!` exports this name as a function of type `FfiHealth`.
    let health = unsafe { library.get::<FfiHealth>(HEALTH_SYMBOL) }
        .ok()
        .map(|f| *f);
    // Never unmapped: see the module docs.
    std::mem::forget(library);

    // Everything abi_stable reads or calls up to the plugin's constructor is checked
    // first: see `header`.
    let segments = header::Segments::of_object(copy).ok_or_else(|| {
        fail(LoadFailure::NotALibrary(
            "it was opened, but where it is mapped cannot be found".to_owned(),
        ))
    })?;
    let api_version = match header::check(address, &segments) {
        Ok(version) => version,
        Err(header::Refusal::AbiStable) => return Err(fail(LoadFailure::AbiStableVersion)),
        Err(header::Refusal::Corrupt(what)) => return Err(fail(LoadFailure::CorruptHeader(what))),
    };
    check_api_version(api_version).map_err(fail)?;

    let lib_header = header.upgrade().map_err(|e| fail(classify(e, "")))?;
    let module = lib_header
        .init_root_module::<PluginModRef>()
        .map_err(|e| fail(classify(e, api_version)))?;
    let text = |what, s| {
        header::text(&segments, what, header::RawStr::of(s))
            .map_err(|what| fail(LoadFailure::CorruptHeader(what)))
    };
    let name = text("the plugin's name", module.name())?;
    let version = text("the plugin's version", module.version())?;
    Ok(PluginLibrary {
        name: name.to_owned(),
        version: version.to_owned(),
        api_version: api_version.to_owned(),
        file: file.to_owned(),
        content_hash,
        module: Some(module),
        health,
    })
}

/// A plugin-api version: `major.minor.patch`, optionally followed by a `-pre-release`
/// or `+build` suffix, which is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ApiVersion {
    pub fn parse(s: &str) -> Option<ApiVersion> {
        let number = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let mut parts = s.splitn(3, '.');
        let major = number(parts.next()?)?;
        let minor = number(parts.next()?)?;
        let rest = parts.next()?;
        let patch = number(&rest[..rest.find(['-', '+']).unwrap_or(rest.len())])?;
        Some(ApiVersion {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The promise plugin-api keeps: while at 0.x, the minor number is the breaking one,
/// and a host built with plugin-api 0.y.z loads plugins built against 0.y.w for w <= z
/// (a patch release never changes layout or meaning; any change bumps y). From 1.0.0
/// on, a host loads plugins built against the same major version and a minor.patch no
/// later than its own.
pub fn loads_plugins_built_against(host: ApiVersion, plugin: ApiVersion) -> bool {
    if host.major == 0 {
        plugin.major == 0 && plugin.minor == host.minor && plugin.patch <= host.patch
    } else {
        plugin.major == host.major && (plugin.minor, plugin.patch) <= (host.minor, host.patch)
    }
}

/// Which versions a host with plugin-api `host` loads, for messages.
fn loadable_range(host: &str) -> String {
    let Some(v) = ApiVersion::parse(host) else {
        return format!("only plugins built against {host}");
    };
    let first = if v.major == 0 {
        ApiVersion { patch: 0, ..v }
    } else {
        ApiVersion {
            minor: 0,
            patch: 0,
            ..v
        }
    };
    if first == v {
        format!("only plugins built against {v}")
    } else {
        format!("plugins built against {first} to {v}")
    }
}

/// Checks a plugin's interface version against this host's, before abi_stable's own
/// (looser) check.
fn check_api_version(found: &str) -> Result<(), LoadFailure> {
    let host = PluginModRef::VERSION_STRINGS.version.as_str();
    let Some(plugin) = ApiVersion::parse(found) else {
        let shown: String = found.chars().take(40).collect();
        return Err(LoadFailure::CorruptHeader(format!(
            "its interface version {shown:?} is not a major.minor.patch version"
        )));
    };
    match ApiVersion::parse(host) {
        Some(ours) if loads_plugins_built_against(ours, plugin) => Ok(()),
        _ => Err(LoadFailure::InterfaceVersion {
            expected: host.to_owned(),
            found: found.to_owned(),
        }),
    }
}

/// Writes a new file that only this user can read, refusing to follow or reuse an
/// existing path.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o700);
    options.open(path)
}

/// Makes a new folder for private copies that only this user can enter, under
/// `$PLUGIN_HOST_COPIES_DIR` if set, else the temporary folder. Never reuses an existing
/// one. (Not `$XDG_RUNTIME_DIR`: it is usually a tmpfs, where every unlinked but still
/// mapped copy would keep all of its pages in memory.)
pub fn private_copies_dir() -> std::io::Result<PathBuf> {
    let base = std::env::var_os("PLUGIN_HOST_COPIES_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    remove_stale_copies(&base);
    let dir = private_dir_in(&base, &format!("plugin-host-{}", std::process::id()))?;
    hold_lock(&dir);
    Ok(dir)
}

/// The file in a copies folder that its process holds locked (`flock`) for as long as
/// it lives: how another host tells a folder in use from one left behind, whatever
/// pid namespace either is in.
const LOCK_FILE: &str = ".in-use";

/// Locks `dir`'s lock file for the rest of this process's life (the descriptor is
/// never closed; the kernel drops the lock when the process ends, however it ends).
fn hold_lock(dir: &Path) {
    #[cfg(unix)]
    if let Ok(file) = std::fs::File::create(dir.join(LOCK_FILE)) {
        use std::os::fd::IntoRawFd;
        let fd = file.into_raw_fd();
        // SAFETY: a plain system call on a descriptor this function owns (and leaks).
        unsafe {
            libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB);
        }
    }
}

/// Removes the copies folders of hosts that are gone (killed before they could remove
/// their own): folders named `plugin-host-<pid>-<8 hex digits>`, of this user, whose
/// lock file no process holds. A folder without a lock file is left alone.
fn remove_stale_copies(base: &Path) {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        // SAFETY: `geteuid` cannot fail.
        let uid = unsafe { libc::geteuid() };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = name
                .to_str()
                .and_then(|n| n.strip_prefix("plugin-host-"))
                .and_then(|rest| rest.split_once('-'))
                .is_some_and(|(pid, tag)| {
                    !pid.is_empty()
                        && pid.bytes().all(|b| b.is_ascii_digit())
                        && tag.len() == 8
                        && tag.bytes().all(|b| b.is_ascii_hexdigit())
                });
            let mine = ours && entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid);
            if !mine {
                continue;
            }
            let Ok(lock) = std::fs::File::open(entry.path().join(LOCK_FILE)) else {
                continue;
            };
            // SAFETY: a plain system call on a descriptor `lock` owns.
            let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            if free {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    #[cfg(not(unix))]
    let _ = base;
}

/// Makes a new folder `<prefix>-<random>` in `parent` that only this user can enter.
/// Never reuses an existing one.
pub fn private_dir_in(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0u32..64 {
        let path = parent.join(format!(
            "{prefix}-{:08x}",
            seed.wrapping_add(attempt.wrapping_mul(0x9E37_79B9))
        ));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name for a private folder"))
}

/// Linkers write the section header table last, so a file that ends before it is
/// incomplete: truncated, or still being written. glibc would load such a file as long
/// as its loadable segments are complete, so check it here.
fn elf_incomplete(bytes: &[u8], file_len: u64) -> Option<String> {
    let field = |at: usize, len: usize| -> Option<u64> {
        let raw = bytes.get(at..at + len)?;
        let mut buf = [0u8; 8];
        match bytes.get(5)? {
            1 => buf[..len].copy_from_slice(raw),
            2 => buf[8 - len..].copy_from_slice(raw),
            _ => return None,
        }
        Some(if bytes[5] == 1 {
            u64::from_le_bytes(buf)
        } else {
            u64::from_be_bytes(buf)
        })
    };
    let (shoff, shentsize, shnum) = match bytes.get(4)? {
        1 => (field(0x20, 4), field(0x2E, 2), field(0x30, 2)),
        2 => (field(0x28, 8), field(0x3A, 2), field(0x3C, 2)),
        _ => return Some("it has an unknown ELF class".to_owned()),
    };
    let (Some(shoff), Some(shentsize), Some(shnum)) = (shoff, shentsize, shnum) else {
        return Some(format!(
            "it is truncated ({} bytes, shorter than an ELF header)",
            file_len
        ));
    };
    let end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    (end > file_len).then(|| {
        format!(
            "it is incomplete ({} of at least {end} bytes): truncated, or still being written",
            file_len
        )
    })
}

fn dl_error(e: &libloading::Error, copy: &Path) -> String {
    // dlerror names the private copy; the user knows the file by its own name.
    let text = e.to_string();
    let copy = copy.display().to_string();
    let text = text
        .replace(&format!("{copy}: "), "")
        .replace(&copy, "the file");
    text.trim().to_owned()
}

fn classify(e: LibraryError, found_api: &str) -> LoadFailure {
    match e {
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            LoadFailure::AbiStableVersion
        }
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadFailure::InterfaceVersion {
            expected: expected_version.to_string(),
            found: actual_version.to_string(),
        },
        LibraryError::AbiInstability(details) => {
            tracing::debug!(%details, "plugin layout check failed");
            LoadFailure::Layout {
                found: found_api.to_owned(),
            }
        }
        other => LoadFailure::Other(first_line(&other.to_string())),
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(s)
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_copies_dirs_are_new_and_only_ours() {
        let a = private_copies_dir().unwrap();
        let b = private_copies_dir().unwrap();
        assert_ne!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        // A copy is never written over an existing file.
        let copy = a.join("x.so");
        create_private(&copy).unwrap();
        assert!(create_private(&copy).is_err());
        std::fs::remove_dir_all(a).unwrap();
        std::fs::remove_dir_all(b).unwrap();
    }

    #[test]
    fn truncated_elf_files_are_incomplete() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let len = me.len() as u64;
        assert_eq!(elf_incomplete(&me[..64], len), None);
        assert!(elf_incomplete(&me[..64], len - 1).is_some());
        assert!(elf_incomplete(&me[..10], 10).is_some());
    }

    #[test]
    fn the_version_promise() {
        let v = |s| ApiVersion::parse(s).unwrap();
        // (host, plugin, loads)
        let table = [
            ("0.4.0", "0.4.0", true),
            ("0.4.2", "0.4.0", true),
            ("0.4.2", "0.4.2", true),
            ("0.4.2", "0.4.3", false),
            ("0.4.0", "0.4.1", false),
            ("0.4.0", "0.3.0", false),
            ("0.4.0", "0.3.9", false),
            ("0.4.0", "0.5.0", false),
            ("0.4.0", "0.99.0", false),
            ("0.4.0", "1.4.0", false),
            ("0.4.0", "99.0.0", false),
            ("0.0.3", "0.0.1", true),
            ("0.0.3", "0.1.0", false),
            ("1.2.3", "1.2.3", true),
            ("1.2.3", "1.2.0", true),
            ("1.2.3", "1.0.9", true),
            ("1.2.3", "1.1.99", true),
            ("1.2.3", "1.2.4", false),
            ("1.2.3", "1.3.0", false),
            ("1.2.3", "2.0.0", false),
            ("1.2.3", "0.2.3", false),
            ("2.0.0", "1.9.9", false),
        ];
        for (host, plugin, loads) in table {
            assert_eq!(
                loads_plugins_built_against(v(host), v(plugin)),
                loads,
                "host {host}, plugin {plugin}"
            );
        }
    }

    #[test]
    fn versions_parse_as_major_minor_patch() {
        let ok = |s, (major, minor, patch)| {
            assert_eq!(
                ApiVersion::parse(s),
                Some(ApiVersion {
                    major,
                    minor,
                    patch
                }),
                "{s}"
            );
        };
        ok("0.4.0", (0, 4, 0));
        ok("10.20.30", (10, 20, 30));
        ok("0.4.1-alpha.2", (0, 4, 1));
        ok("0.4.1+build.5", (0, 4, 1));
        for bad in [
            "",
            "0",
            "0.4",
            "0.4.",
            "a.4.0",
            "0.b.0",
            "0.4.c",
            "+1.4.0",
            "0.-4.0",
            "0.4.0x",
            " 0.4.0",
            "0.4.0.1",
            "99999999999.0.0",
        ] {
            assert_eq!(ApiVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn version_refusals_name_both_versions_and_the_rule() {
        let host = PluginModRef::VERSION_STRINGS.version.as_str();
        let ours = ApiVersion::parse(host).unwrap();
        let next_minor = ApiVersion {
            minor: ours.minor + 1,
            patch: 0,
            ..ours
        }
        .to_string();
        assert_eq!(check_api_version(host), Ok(()));
        let refused = check_api_version(&next_minor).unwrap_err();
        assert_eq!(
            refused,
            LoadFailure::InterfaceVersion {
                expected: host.to_owned(),
                found: next_minor.clone()
            }
        );
        let line = LoadError {
            file: PathBuf::from("/p/x.so"),
            reason: refused,
        }
        .to_string();
        assert!(
            line.starts_with(&format!(
                "/p/x.so: built against plugin-api {next_minor}, but this host has plugin-api {host}, which loads "
            )) && line.ends_with(&format!("; rebuild the plugin against plugin-api {host}")),
            "{line}"
        );
        assert_eq!(loadable_range("0.4.0"), "only plugins built against 0.4.0");
        assert_eq!(
            loadable_range("0.4.2"),
            "plugins built against 0.4.0 to 0.4.2"
        );
        assert_eq!(
            loadable_range("1.2.3"),
            "plugins built against 1.0.0 to 1.2.3"
        );
        assert_eq!(loadable_range("2.0.0"), "only plugins built against 2.0.0");
        assert!(matches!(
            check_api_version("zero.four"),
            Err(LoadFailure::CorruptHeader(what)) if what.contains("not a major.minor.patch version")
        ));
    }

    mod header_mirror {
        use super::super::header::{self, RawLibHeader, RawMutexVTable, RawStr, Refusal, Segments};
        use abi_stable::library::{
            AbiHeader, CAbiTestingFns, CheckTypeLayout, IsLayoutChecked, LibHeader, RootModule,
            RootModuleConsts, RootModuleResult,
        };
        use abi_stable::sabi_types::LateStaticRef;
        use abi_stable::std_types::RStr;
        use plugin_api::ffi::PluginModRef;
        use std::mem::{align_of, offset_of, size_of};

        extern "C" fn never_called() -> RootModuleResult {
            std::process::abort()
        }

        /// A header built by abi_stable exactly as `export_plugin!` builds it.
        static REAL: LibHeader = unsafe {
            LibHeader::from_constructor::<PluginModRef>(never_called, CheckTypeLayout::Yes)
        };

        fn real() -> (usize, RawLibHeader, Segments) {
            let addr = &REAL as *const LibHeader as usize;
            let segments = Segments::containing(addr).expect("the test binary's segments");
            // SAFETY: a real `LibHeader`, read through the mirror whose size matches.
            let raw = unsafe { std::ptr::read(addr as *const RawLibHeader) };
            (addr, raw, segments)
        }

        #[test]
        fn the_mirror_has_abi_stables_sizes() {
            fn same<A, B>() {
                assert_eq!(
                    (size_of::<A>(), align_of::<A>()),
                    (size_of::<B>(), align_of::<B>()),
                    "{} vs {}",
                    std::any::type_name::<A>(),
                    std::any::type_name::<B>()
                );
            }
            same::<RawLibHeader, LibHeader>();
            same::<header::RawAbiHeader, AbiHeader>();
            same::<header::RawRootModuleConsts, RootModuleConsts>();
            same::<header::RawLayoutChecked, IsLayoutChecked>();
            same::<RawStr, RStr<'static>>();
            same::<header::RawCAbiTestingFns, CAbiTestingFns>();
            same::<header::RawLateStaticRef, LateStaticRef<&'static u8>>();
        }

        #[test]
        fn the_mirror_reads_what_abi_stables_accessors_read() {
            let (addr, raw, segments) = real();
            let abi = AbiHeader::VALUE;
            assert_eq!(raw.header.magic_string, abi.magic_string);
            assert_eq!(
                (raw.header.abi_major, raw.header.abi_minor),
                (abi.abi_major, abi.abi_minor)
            );
            let consts = REAL.root_mod_consts();
            assert_eq!(
                consts as *const RootModuleConsts as usize - addr,
                offset_of!(RawLibHeader, root_mod_consts)
            );
            let c = &raw.root_mod_consts;
            assert_eq!(c.base_name, RawStr::of(consts.base_name()));
            assert_eq!(c.name, RawStr::of(consts.name()));
            assert_eq!(c.version, RawStr::of(REAL.version_strings().version));
            assert_eq!(c.layout.tag, 0);
            assert_eq!(c.layout.layout, REAL.layout().unwrap() as *const _ as usize);
            assert_eq!(
                c.c_abi_testing_fns,
                consts.c_abi_testing_fns() as *const CAbiTestingFns as usize
            );
            assert_eq!(
                raw.init_globals_with,
                abi_stable::globals::initialize_globals_with as *const () as usize
            );
            assert_eq!(raw.constructor, never_called as *const () as usize);
            assert_eq!((raw.module.pointer, raw.module.lock_state), (0, 0));
            // The strings are what abi_stable declares for plugin-api.
            assert_eq!(
                header::text(&segments, "v", c.version),
                Ok(PluginModRef::VERSION_STRINGS.version.as_str())
            );
            assert_eq!(header::text(&segments, "n", c.name), Ok(PluginModRef::NAME));
            assert_eq!(
                header::text(&segments, "b", c.base_name),
                Ok(PluginModRef::BASE_NAME)
            );
        }

        #[test]
        fn the_mirror_finds_a_late_static_refs_pointer_and_its_locks_functions() {
            static VALUE: u8 = 7;
            static LATE: LateStaticRef<&'static u8> = LateStaticRef::new();
            let at = &LATE as *const LateStaticRef<&'static u8> as usize;
            // SAFETY: the mirror's size matches (checked above); integers only.
            let read = || unsafe { std::ptr::read(at as *const header::RawLateStaticRef) };
            let before = read();
            assert_eq!((before.pointer, before.lock_state), (0, 0));
            LATE.init(|| &VALUE);
            let after = read();
            assert_eq!(after.pointer, &VALUE as *const u8 as usize);
            assert_eq!(after.lock_state, 0);
            // The vtable's functions are lock, try_lock, unlock, in that order: lock a
            // mutex of our own with them.
            // SAFETY: checked to lie in this binary's readable memory first.
            let segments = Segments::containing(at).unwrap();
            assert!(segments.readable(after.lock_vtable, size_of::<RawMutexVTable>()));
            let vtable = unsafe { std::ptr::read(after.lock_vtable as *const RawMutexVTable) };
            type Op = extern "C" fn(&usize);
            type TryLock = extern "C" fn(&usize) -> bool;
            // SAFETY: these are abi_stable's `extern "C" fn(&OpaqueMutex)` functions; an
            // `OpaqueMutex` is a usize-sized, usize-aligned parking_lot mutex (0 =
            // unlocked), like the `usize` they are given here.
            let (lock, try_lock, unlock) = unsafe {
                (
                    std::mem::transmute::<usize, Op>(vtable.lock),
                    std::mem::transmute::<usize, TryLock>(vtable.try_lock),
                    std::mem::transmute::<usize, Op>(vtable.unlock),
                )
            };
            let mutex = std::sync::atomic::AtomicUsize::new(0);
            // SAFETY: an AtomicUsize has the layout of a usize.
            let state =
                unsafe { &*(&mutex as *const std::sync::atomic::AtomicUsize as *const usize) };
            lock(state);
            assert_ne!(mutex.load(std::sync::atomic::Ordering::SeqCst), 0);
            assert!(!try_lock(state));
            unlock(state);
            assert_eq!(mutex.load(std::sync::atomic::Ordering::SeqCst), 0);
            assert!(try_lock(state));
            unlock(state);
        }

        #[test]
        fn a_real_header_passes() {
            let (addr, raw, segments) = real();
            let version = PluginModRef::VERSION_STRINGS.version.as_str();
            assert_eq!(header::check_fields(&raw, &segments), Ok(version));
            assert_eq!(header::check(addr, &segments), Ok(version));
        }

        static NOT_UTF8: [u8; 4] = [b'0', 0xff, 0xfe, b'1'];
        static DATA: u8 = 1;
        static DATA_TABLE: [&u8; 15] = [&DATA; 15];
        #[repr(C)]
        struct FakeVTable {
            accessibility: u64,
            layout: &'static u8,
            fns: [&'static u8; 4],
        }
        static DATA_VTABLE: FakeVTable = FakeVTable {
            accessibility: 0b1111,
            layout: &DATA,
            fns: [&DATA; 4],
        };
        #[repr(C, align(8))]
        struct Zeros([u8; 256]);
        static ZEROS: Zeros = Zeros([0; 256]);

        #[test]
        fn every_field_is_checked_before_it_is_used() {
            let (_, good, segments) = real();
            let data = &DATA as *const u8 as usize;
            let far = 0x0000_0100_0000_0005usize;
            let version = good.root_mod_consts.version.ptr;
            let segment_end = segments
                .list()
                .iter()
                .find(|s| s.start <= version && version < s.end)
                .unwrap()
                .end;
            type Edit = Box<dyn Fn(&mut RawLibHeader)>;
            let cases: Vec<(&str, Edit, &str)> = vec![
                (
                    "huge version length",
                    Box::new(|h| h.root_mod_consts.version.len = 0x0000_0100_0000_0005),
                    "its interface version is 1099511627781 bytes long (at most 4096)",
                ),
                (
                    "version running past the end of its segment",
                    Box::new(move |h| {
                        h.root_mod_consts.version = RawStr {
                            ptr: segment_end - 2,
                            len: 4,
                        }
                    }),
                    "its interface version (4 bytes at",
                ),
                (
                    "empty name",
                    Box::new(|h| h.root_mod_consts.name.len = 0),
                    "its interface name is empty",
                ),
                (
                    "null base name",
                    Box::new(|h| h.root_mod_consts.base_name.ptr = 0),
                    "its library base name (18 bytes at 0x0) is not inside",
                ),
                (
                    "name elsewhere",
                    Box::new(move |h| h.root_mod_consts.name.ptr = far),
                    "its interface name (10 bytes at 0x10000000005) is not inside",
                ),
                (
                    "version not UTF-8",
                    Box::new(|h| {
                        h.root_mod_consts.version = RawStr {
                            ptr: NOT_UTF8.as_ptr() as usize,
                            len: 4,
                        }
                    }),
                    "its interface version is not valid UTF-8",
                ),
                (
                    "no layout",
                    Box::new(|h| h.root_mod_consts.layout.tag = 1),
                    "it leaves out its root module's type layout",
                ),
                (
                    "bad layout tag",
                    Box::new(|h| h.root_mod_consts.layout.tag = 5),
                    "its type-layout tag is 5",
                ),
                (
                    "layout elsewhere",
                    Box::new(move |h| h.root_mod_consts.layout.layout = far),
                    "its type-layout pointer (0x10000000005)",
                ),
                (
                    "misaligned layout",
                    Box::new(|h| h.root_mod_consts.layout.layout += 1),
                    "its type-layout pointer",
                ),
                (
                    "C-ABI table elsewhere",
                    Box::new(|h| h.root_mod_consts.c_abi_testing_fns = usize::MAX - 15),
                    "its C-ABI self-test table pointer",
                ),
                (
                    "C-ABI table of data",
                    Box::new(|h| {
                        h.root_mod_consts.c_abi_testing_fns = DATA_TABLE.as_ptr() as usize
                    }),
                    "its C-ABI self-test function #0",
                ),
                (
                    "globals initialiser in data",
                    Box::new(move |h| h.init_globals_with = data),
                    "its globals initialiser",
                ),
                (
                    "globals initialiser null",
                    Box::new(|h| h.init_globals_with = 0),
                    "its globals initialiser (0x0) is not inside the library's code",
                ),
                (
                    "module already set",
                    Box::new(move |h| h.module.pointer = data),
                    "its root module is already set",
                ),
                (
                    "lock held",
                    Box::new(|h| h.module.lock_state = 1),
                    "its root-module lock is not in its unlocked initial state (0x1)",
                ),
                (
                    "lock padding",
                    Box::new(|h| h.module.lock_state = 0x0100),
                    "its root-module lock is not in its unlocked initial state",
                ),
                (
                    "lock vtable elsewhere",
                    Box::new(move |h| h.module.lock_vtable = far),
                    "its root-module lock's vtable pointer",
                ),
                (
                    "lock vtable of data",
                    Box::new(|h| h.module.lock_vtable = &DATA_VTABLE as *const FakeVTable as usize),
                    "its root-module lock's lock function",
                ),
                (
                    "constructor in data",
                    Box::new(move |h| h.constructor = data),
                    "its root-module constructor",
                ),
                (
                    "constructor far away",
                    Box::new(move |h| h.constructor = far),
                    "its root-module constructor (0x10000000005) is not inside the library's code",
                ),
            ];
            for (what, edit, expected) in cases {
                let mut bad = good;
                edit(&mut bad);
                match header::check_fields(&bad, &segments) {
                    Err(message) => {
                        assert!(message.contains(expected), "{what}: {message}")
                    }
                    Ok(_) => panic!("{what}: passed"),
                }
            }
            // Other abi_stable versions (or corrupt magic), and headers outside the
            // library or cut off by its end.
            let zeros = ZEROS.0.as_ptr() as usize;
            assert_eq!(header::check(zeros, &segments), Err(Refusal::AbiStable));
            for addr in [0, 8, far, zeros + 4] {
                assert!(
                    matches!(header::check(addr, &segments), Err(Refusal::Corrupt(m)) if m.contains("its header symbol")),
                    "{addr:#x}"
                );
            }
            let end = segments
                .list()
                .iter()
                .find(|s| s.readable && s.start <= zeros && zeros < s.end)
                .unwrap()
                .end;
            let near_end = (end - size_of::<AbiHeader>()) & !7;
            assert!(
                matches!(
                    header::check(near_end, &segments),
                    Err(Refusal::Corrupt(_)) | Err(Refusal::AbiStable)
                ),
                "{near_end:#x}"
            );
        }
    }
}

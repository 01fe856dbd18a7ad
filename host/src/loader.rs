//! Opening plugin libraries and checking their ABI. The only module that touches
//! libloading.
//!
//! Each load opens a fresh copy of the file at a unique path, because `dlopen` caches
//! by path and by inode and would hand back an old build. The copy is unlinked as soon
//! as it is open; the mapping stays valid.
//!
//! Libraries are never closed. A plugin that touched a `thread_local!` with a destructor
//! (std, tokio and tracing all do) cannot be unmapped by glibc anyway, and abi_stable's
//! layout checker keeps global caches that point into every library it checked, so a
//! `dlclose` would leave dangling pointers. ARCHITECTURE.md says what this costs.
#![allow(unsafe_code)]

use std::fmt;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use abi_stable::library::{
    AbiHeaderRef, LibraryError, RootModule, ROOT_MODULE_LOADER_NAME_WITH_NUL,
};
use plugin_api::ffi::PluginModRef;

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
    pub(crate) module: PluginModRef,
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
    InterfaceVersion {
        expected: String,
        found: String,
    },
    Layout {
        found: String,
    },
    Other(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host_api = PluginModRef::VERSION_STRINGS;
        write!(f, "{}: ", self.file.display())?;
        match &self.reason {
            LoadFailure::Unreadable(e) => write!(f, "cannot read the file: {e}"),
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
                "built against plugin-api {found}, but this host needs plugin-api {expected} (a compatible version); rebuild the plugin"
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
pub fn read(file: &Path, copies_dir: &Path) -> Result<PluginFile, LoadError> {
    use std::io::{Read, Write};
    let fail = |reason| LoadError {
        file: file.to_owned(),
        reason,
    };
    let unreadable = |e: std::io::Error| fail(LoadFailure::Unreadable(e.to_string()));
    let mut source = std::fs::File::open(file).map_err(unreadable)?;
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
    let content_hash = plugin.content_hash;
    let fail = |reason| LoadError {
        file: file.to_owned(),
        reason,
    };
    // SAFETY: loading a library runs its initialisers. Plugins are code the operator chose
    // to run in this process; this is the trust boundary the product is built on.
    let opened = unsafe { libloading::Library::new(copy) };
    let library = opened.map_err(|e| fail(LoadFailure::NotALibrary(dl_error(&e, copy))))?;

    // SAFETY: abi_stable exports the header as a static whose address is an `AbiHeaderRef`
    // (this mirrors `abi_stable::library::abi_header_from_raw_library`).
    let header: AbiHeaderRef =
        match unsafe { library.get::<AbiHeaderRef>(ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes()) } {
            Ok(symbol) => *symbol,
            Err(_) => return Err(fail(LoadFailure::NotAPlugin)),
        };
    // Never unmapped: see the module docs.
    std::mem::forget(library);

    let lib_header = header.upgrade().map_err(|e| fail(classify(e, "")))?;
    let api_version = lib_header.version_strings().version.to_string();
    let module = lib_header
        .init_root_module::<PluginModRef>()
        .map_err(|e| fail(classify(e, &api_version)))?;
    Ok(PluginLibrary {
        name: module.name().to_string(),
        version: module.version().to_string(),
        api_version,
        file: file.to_owned(),
        content_hash,
        module,
    })
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
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0u32..64 {
        let path = base.join(format!(
            "plugin-host-{}-{:08x}",
            std::process::id(),
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
}

//! Loading plugin files: good ones serve, bad ones are refused with a reason, and a
//! server without a working plugin waits instead of taking others down.

use std::path::PathBuf;
use std::time::Duration;

use crate::support::{library, Setup};

const TWO_SERVERS: &str = r#"{"servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
    {"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}]}"#;

/// A library cut at `len` bytes. A third of a debug build still holds every loadable
/// segment (glibc would load it); 4 KiB cuts into the code.
fn truncated_library(len: impl Fn(usize) -> usize) -> Vec<u8> {
    let bytes = std::fs::read(library("hello")).unwrap();
    bytes[..len(bytes.len())].to_vec()
}

#[test]
fn bad_libraries_are_refused_with_a_one_line_reason_and_good_ones_serve() {
    let host = Setup::new("refused", TWO_SERVERS)
        .plugin("hello", "hello.so")
        .plugin("notes", "notes.so")
        .file("garbage.so", b"this is not a library at all")
        .file("truncated.so", &truncated_library(|n| n / 3))
        .file("short.so", &truncated_library(|_| 4096))
        .plugin("fixture-old-api", "old.so")
        .start();

    let garbage = host.wait_for_log(&["refused plugin", "garbage.so"]);
    assert!(
        garbage.contains("not a loadable shared library: it has no ELF header"),
        "{garbage}"
    );
    for file in ["truncated.so", "short.so"] {
        let line = host.wait_for_log(&["refused plugin", file]);
        assert!(
            line.contains("it is incomplete") && line.contains("truncated, or still being written"),
            "{line}"
        );
    }
    let old = host.wait_for_log(&["refused plugin", "old.so"]);
    let api = host_api_version();
    assert!(
        old.contains(&format!(
            "old.so: built against plugin-api 99.0.0, but this host has plugin-api {api}, which loads "
        )) && old.ends_with(&format!("; rebuild the plugin against plugin-api {api}")),
        "{old}"
    );

    assert_eq!(host.get("hello.localhost", "/").status, 200);
    assert_eq!(host.get("notes.localhost", "/notes").status, 200);
}

#[test]
fn a_server_whose_plugin_is_missing_waits_with_503_and_others_serve() {
    let host = Setup::new("missing", TWO_SERVERS)
        .plugin("hello", "hello.so")
        .start();
    host.wait_for_log(&["server=notes", "not serving", "no plugin named \"notes\""]);
    let r = host.get("notes.localhost", "/notes");
    assert_eq!(r.status, 503);
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("microserver \"notes\" is not available: no plugin named \"notes\""),
        "{error}"
    );
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn a_server_whose_plugin_was_refused_says_why() {
    let host = Setup::new("refused-503", TWO_SERVERS)
        .plugin("hello", "hello.so")
        .file("notes.so", b"garbage")
        .start();
    let r = host.get("notes.localhost", "/notes");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("its plugin was refused"),
        "{}",
        r.body
    );
}

#[test]
fn init_failure_and_init_panic_leave_the_server_waiting_with_the_reason() {
    let config = r#"{"servers": [
        {"name": "fails", "domains": ["fails.localhost"], "plugin": "misbehave", "config": {"init": "fail"}},
        {"name": "panics", "domains": ["panics.localhost"], "plugin": "misbehave", "config": {"init": "panic"}},
        {"name": "fine", "domains": ["fine.localhost"], "plugin": "misbehave"}]}"#;
    let host = Setup::new("init", config)
        .plugin("fixture-misbehave", "misbehave.so")
        .start();

    let r = host.get("fails.localhost", "/ok");
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("failed to initialise: the database at db.invalid is unreachable"));
    let r = host.get("panics.localhost", "/ok");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("init panicked: init exploded"),
        "{}",
        r.body
    );
    assert_eq!(host.get("fine.localhost", "/ok").body, "ok");
}

#[test]
fn a_library_without_a_config_entry_is_served_at_its_name_dot_localhost() {
    let host = Setup::new("implicit", r#"{"servers": []}"#)
        .plugin("notes", "notes.so")
        .plugin("hello", "hello.so")
        .start();
    host.wait_for_log(&["serving", "server=notes", "domains=notes.localhost"]);
    let r = host.get("notes.localhost", "/notes");
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    // No config: hello's `#[serde(default)]` config gets its defaults.
    let r = host.get("hello.localhost", "/");
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with("Hello from hello.localhost!"),
        "{}",
        r.body
    );
}

#[test]
fn the_plugin_field_matches_a_lib_prefixed_file_or_the_plugin_name() {
    let config = r#"{"servers": [
        {"name": "a", "domains": ["a.localhost"], "plugin": "hello"},
        {"name": "b", "domains": ["b.localhost"], "plugin": "fixture-misbehave"}]}"#;
    let host = Setup::new("names", config)
        .plugin("hello", "libhello.so")
        .plugin("fixture-misbehave", "renamed.so")
        .start();
    assert_eq!(host.get("a.localhost", "/").status, 200);
    assert_eq!(host.get("b.localhost", "/ok").body, "ok");
}

/// The plugin-api version this host was built with.
fn host_api_version() -> &'static str {
    use abi_stable::library::RootModule;
    plugin_api::ffi::PluginModRef::VERSION_STRINGS
        .version
        .as_str()
}

/// Builds `fixture-old-api` declaring plugin-api `version` (once per version), in a target
/// folder of its own: `support::library` hands out the default build's path in the shared
/// one, which other tests read while these run.
fn old_api(version: &str) -> PathBuf {
    crate::support::build_variant(
        "fixture-old-api",
        ("FIXTURE_API_VERSION", version),
        Some("old-api-target"),
    )
}

#[test]
fn plugins_built_against_another_plugin_api_are_refused_naming_both_versions() {
    let api = host_api_version();
    let mut parts = api
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().unwrap());
    let (major, minor, patch) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    // Later minor (breaking while at 0.x, an addition from 1.0 on), a much later minor,
    // another major, and a later patch: none of them is a version this host promises.
    let mut refused = vec![
        format!("{major}.{}.0", minor + 1),
        "0.99.0".to_owned(),
        "99.0.0".to_owned(),
        format!("{major}.{minor}.{}", patch + 1),
    ];
    refused.sort();
    refused.dedup();
    refused.retain(|v| v != api);

    let mut setup = Setup::new(
        "api-versions",
        r#"{"servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#,
    )
    .plugin("hello", "hello.so");
    for v in refused.iter().map(String::as_str).chain([api]) {
        setup = setup.file(&format!("old-{v}.so"), &std::fs::read(old_api(v)).unwrap());
    }
    let host = setup.start();
    for v in &refused {
        let file = format!("old-{v}.so");
        let line = host.wait_for_log(&["refused plugin", &file]);
        assert!(
            line.contains(&format!(
                "{file}: built against plugin-api {v}, but this host has plugin-api {api}, which loads "
            )) && line.ends_with(&format!("; rebuild the plugin against plugin-api {api}")),
            "{line}"
        );
    }
    // The host's own version passes the version check; this fixture's types then differ.
    let same = host.wait_for_log(&["refused plugin", &format!("old-{api}.so")]);
    assert!(same.contains("its plugin-api types differ"), "{same}");
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

/// Just enough of a reader for 64-bit little-endian ELF files to find the plugin header
/// in a library file and the relocations that fill in its pointers at load time.
struct Elf<'a>(&'a [u8]);

impl Elf<'_> {
    fn uint(&self, at: usize, len: usize) -> u64 {
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(&self.0[at..at + len]);
        u64::from_le_bytes(buf)
    }

    /// (type, file offset, address, size in the file) of each program header.
    fn program_headers(&self) -> Vec<(u64, u64, u64, u64)> {
        let (at, size, count) = (
            self.uint(0x20, 8) as usize,
            self.uint(0x36, 2) as usize,
            self.uint(0x38, 2) as usize,
        );
        (0..count)
            .map(|i| at + i * size)
            .map(|h| {
                (
                    self.uint(h, 4),
                    self.uint(h + 8, 8),
                    self.uint(h + 16, 8),
                    self.uint(h + 32, 8),
                )
            })
            .collect()
    }

    /// (type, file offset, size, link) of each section.
    fn sections(&self) -> Vec<(u64, usize, usize, usize)> {
        let (at, size, count) = (
            self.uint(0x28, 8) as usize,
            self.uint(0x3A, 2) as usize,
            self.uint(0x3C, 2) as usize,
        );
        (0..count)
            .map(|i| at + i * size)
            .map(|s| {
                (
                    self.uint(s + 4, 4),
                    self.uint(s + 24, 8) as usize,
                    self.uint(s + 32, 8) as usize,
                    self.uint(s + 40, 4) as usize,
                )
            })
            .collect()
    }

    /// The file offset of the bytes loaded at `addr`.
    fn file_offset(&self, addr: u64) -> usize {
        const PT_LOAD: u64 = 1;
        self.program_headers()
            .into_iter()
            .find(|&(kind, _, start, len)| kind == PT_LOAD && start <= addr && addr < start + len)
            .map(|(_, offset, start, _)| (offset + addr - start) as usize)
            .expect("the address lies in the file's loadable segments")
    }

    /// The address of the dynamic symbol `name`.
    fn dynamic_symbol(&self, name: &str) -> u64 {
        const SHT_DYNSYM: u64 = 11;
        let sections = self.sections();
        let &(_, at, size, link) = sections
            .iter()
            .find(|s| s.0 == SHT_DYNSYM)
            .expect("a dynamic symbol table");
        let strings = sections[link].1;
        (at..at + size)
            .step_by(24)
            .find(|&sym| {
                let start = strings + self.uint(sym, 4) as usize;
                let end = start + self.0[start..].iter().position(|b| *b == 0).unwrap();
                &self.0[start..end] == name.as_bytes()
            })
            .map(|sym| self.uint(sym + 8, 8))
            .unwrap_or_else(|| panic!("no dynamic symbol {name}"))
    }

    /// (address written, file offset of the entry) of every RELA relocation.
    fn relocations(&self) -> Vec<(u64, usize)> {
        const SHT_RELA: u64 = 4;
        self.sections()
            .into_iter()
            .filter(|s| s.0 == SHT_RELA)
            .flat_map(|(_, at, size, _)| (at..at + size).step_by(24))
            .map(|entry| (self.uint(entry, 8), entry))
            .collect()
    }
}

/// The hello library and where its plugin header lies: (bytes, the header's file
/// offset, the file offsets of the RELA entries that fill in its words, by word offset).
fn hello_and_its_header() -> (Vec<u8>, usize, Vec<(usize, usize)>) {
    let bytes = std::fs::read(library("hello")).unwrap();
    let elf = Elf(&bytes);
    assert_eq!(
        &bytes[..6],
        b"\x7fELF\x02\x01",
        "a 64-bit little-endian ELF file"
    );
    let header = elf.dynamic_symbol(abi_stable::library::ROOT_MODULE_LOADER_NAME);
    let size = std::mem::size_of::<abi_stable::library::LibHeader>() as u64;
    let relocated = elf
        .relocations()
        .into_iter()
        .filter(|&(addr, _)| header <= addr && addr < header + size)
        .map(|(addr, entry)| ((addr - header) as usize, entry))
        .collect();
    let at = elf.file_offset(header);
    (bytes, at, relocated)
}

/// Huge values to write into a header word: a length of 1 TiB + 5 (what the host once
/// tried to allocate), and an address just below the top of the address space (or, as a
/// relocation addend, just below the library).
const HUGE: [u64; 2] = [0x0000_0100_0000_0005, 0xffff_ffff_ffff_fff0];

fn with_word(bytes: &[u8], at: usize, value: u64) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    bytes
}

#[test]
fn every_corrupt_plugin_header_word_is_refused_and_the_host_keeps_serving() {
    let (good, at, relocated) = hello_and_its_header();
    let size = std::mem::size_of::<abi_stable::library::LibHeader>();
    let host = Setup::new(
        "corrupt-headers",
        r#"{"servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#,
    )
    .plugin("hello", "hello.so")
    .start();
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    // (file, whether it loads, what a refusal says)
    let abi_stable = "built with an incompatible version of abi_stable";
    let corrupt = "its plugin header is corrupt: ";
    let mut cases: Vec<(String, bool, &str)> = Vec::new();
    for word in (0..size).step_by(8) {
        let relocation = relocated.iter().find(|(w, _)| *w == word).map(|r| r.1);
        // The AbiHeader (magic string and abi_stable's version) is abi_stable's check.
        let reason = if word < 40 { abi_stable } else { corrupt };
        for (n, value) in HUGE.into_iter().enumerate() {
            // A word a RELA relocation fills in at load time is ignored in the file: that
            // copy is the good library again, and loads. Its relocation's addend is what
            // counts: set that instead.
            let file = format!("corrupt-w{word:03}-v{n}.so");
            host.install_bytes(&with_word(&good, at + word, value), &file);
            cases.push((file, relocation.is_some(), reason));
            if let Some(entry) = relocation {
                let file = format!("corrupt-w{word:03}-addend-v{n}.so");
                host.install_bytes(&with_word(&good, entry + 16, value), &file);
                cases.push((file, false, corrupt));
            }
        }
    }
    cases.sort();
    for (file, loads, reason) in &cases {
        if *loads {
            host.wait_for_log(&["loaded plugin library", file]);
        } else {
            let line = host.wait_for_log(&["refused plugin", file]);
            assert!(line.contains(&format!("{file}: {reason}")), "{line}");
            if *reason == corrupt {
                assert!(line.ends_with("; rebuild the plugin"), "{line}");
            }
        }
    }
    // Give a second verdict time to show up, if there were one.
    std::thread::sleep(Duration::from_millis(500));
    let logs = host.logs();
    for (file, loads, _) in &cases {
        let count = |what: &str| {
            logs.lines()
                .filter(|l| l.contains(what) && l.contains(file.as_str()))
                .count()
        };
        let expected = if *loads { (0, 1) } else { (1, 0) };
        assert_eq!(
            (count("refused plugin"), count("loaded plugin library")),
            expected,
            "{file}:\n{logs}"
        );
    }
    let loaded: Vec<&str> = cases.iter().filter(|c| c.1).map(|c| c.0.as_str()).collect();
    eprintln!(
        "{} corrupt copies refused; {} loaded, each a word that a relocation overwrites at load time: {loaded:?}",
        cases.len() - loaded.len(),
        loaded.len()
    );
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    // About a gigabyte of copies: do not leave them behind.
    let dir = host.dir().to_owned();
    drop(host);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_refuses_a_corrupt_plugin_header_with_the_reason_and_exit_code_2() {
    let (good, at, _) = hello_and_its_header();
    // The length of the interface version string: after the AbiHeader (40 bytes) and the
    // base name and name (16 bytes each), the version's pointer, then its length.
    let length = at + 40 + 16 + 16 + 8;
    assert_eq!(
        u64::from_le_bytes(good[length..length + 8].try_into().unwrap()),
        host_api_version().len() as u64
    );
    let setup = Setup::new("check-corrupt", r#"{"servers": []}"#)
        .file("corrupt.so", &with_word(&good, length, HUGE[0]));
    let done = setup.run(&["--check"]);
    assert_eq!(done.status.code(), Some(2), "{done:?}");
    assert!(
        done.stderr.contains(
            "corrupt.so: its plugin header is corrupt: its interface version is 1099511627781 bytes long (at most 4096); rebuild the plugin"
        ),
        "{}",
        done.stderr
    );
}

#[test]
fn a_plugin_whose_route_table_is_invalid_waits_and_its_instance_is_shut_down() {
    let config = r#"{"servers": [
        {"name": "routes", "domains": ["routes.localhost"], "plugin": "versioned"},
        {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let setup = Setup::new("bad-routes", config).plugin("hello", "hello.so");
    std::fs::copy(
        crate::support::variant("bad-routes"),
        setup.dir.join("plugins/versioned.so"),
    )
    .unwrap();
    let host = setup.start();
    let r = host.get("routes.localhost", "/");
    assert_eq!(r.status, 503);
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains(
            "failed to initialise: its route table is invalid: route GET /slow is declared twice"
        ),
        "{error}"
    );
    // Its init ran, so its shutdown hook runs too.
    host.wait_for_log(&["versioned shutdown", "variant=\"bad-routes\""]);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn a_library_that_crashes_whatever_loads_it_is_refused_and_the_host_keeps_serving() {
    let config = r#"{"servers": [
        {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
        {"name": "crash", "domains": ["crash.localhost"], "plugin": "crash"}]}"#;
    let setup = || {
        Setup::new("crash-on-load", config)
            .plugin("hello", "hello.so")
            .plugin("fixture-crash-on-load", "crash.so")
    };
    let host = setup().start();
    let line = host.wait_for_log(&["refused plugin", "crash.so"]);
    assert!(
        line.contains("loading it crashed a separate process that checks plugins first (signal 6)"),
        "{line}"
    );
    let r = host.get("crash.localhost", "/");
    assert_eq!(r.status, 503);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    // Installed while the host runs, it is refused the same way.
    host.install(&library("fixture-crash-on-load"), "crash2.so");
    host.wait_for_log(&["refused plugin", "crash2.so", "signal 6"]);
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    // And `--check` says so and exits 2.
    let checked = setup().run(&["--check"]);
    assert_eq!(checked.status.code(), Some(2), "{checked:?}");
    assert!(
        checked.stderr.contains("crash.so: loading it crashed"),
        "{checked:?}"
    );
}

//! Hot reload: plugin libraries and the config file change under a running host, with
//! no failed request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::support::{library, variant, Host, Reply, Setup};

const VERSIONED: &str = r#"{
  "global": {"reload": {"debounce_ms": 20, "drain_timeout_ms": 5000, "init_timeout_ms": 1000}},
  "servers": [{"name": "v", "domains": ["v.localhost"], "plugin": "versioned", "config": {"label": "x"}}]
}"#;

fn versioned_host(label: &str, first: &str) -> Host {
    let setup = Setup::new(label, VERSIONED);
    std::fs::copy(variant(first), setup.dir.join("plugins/versioned.so")).unwrap();
    setup.start()
}

fn body(host: &Host, domain: &str, path: &str) -> String {
    host.get(domain, path).body
}

#[test]
fn swapping_a_library_under_load_fails_no_request() {
    let (a, b) = (variant("a"), variant("b"));
    let host = versioned_host("swap-load", "a");
    assert_eq!(body(&host, "v.localhost", "/"), "a x");

    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<String>::new());
    let served = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let ok = |r: &Reply| r.status == 200 && (r.body == "a x" || r.body == "b x");
                let n = host.ask_until("v.localhost", "/", ok, &stop, &failures);
                *served.lock().unwrap() += n;
            });
        }
        for round in 0..20 {
            let (lib, expected) = if round % 2 == 0 {
                (&b, "b x")
            } else {
                (&a, "a x")
            };
            host.install(lib, "versioned.so");
            host.wait_until(&format!("round {round} serves {expected}"), || {
                body(&host, "v.localhost", "/") == expected
            });
            // Once the new build answered, every later request gets it.
            for _ in 0..5 {
                assert_eq!(body(&host, "v.localhost", "/"), expected, "round {round}");
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:?}",
        failures.len()
    );
    assert!(
        *served.lock().unwrap() > 100,
        "the load generator barely ran"
    );
    host.wait_for_log(&["reloaded", "server=v", "generation=21"]);
}

#[test]
fn a_slow_request_finishes_on_the_old_generation_before_its_shutdown_hook() {
    let host = versioned_host("slow-drain", "a");
    std::thread::scope(|s| {
        let slow = s.spawn(|| host.get("v.localhost", "/slow?ms=1500"));
        std::thread::sleep(Duration::from_millis(200));
        host.install(&variant("b"), "versioned.so");
        host.wait_until("b serves", || body(&host, "v.localhost", "/") == "b x");
        assert!(
            !host.logs().contains("versioned shutdown"),
            "shut down too early"
        );
        let r = slow.join().unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "a slept 1500"));
    });
    let line = host.wait_for_log(&["versioned shutdown", "variant=\"a\""]);
    assert!(line.contains("running=0"), "{line}");
    let retired = host.wait_for_log(&["retired", "server=v", "generation=1"]);
    assert!(retired.contains("drained=true"), "{retired}");
    // The log names each build: two builds of one version differ.
    let build = |line: String| {
        let field = line.split("build=").nth(1).unwrap_or_default();
        field.split(' ').next().unwrap_or_default().to_owned()
    };
    let first = build(host.wait_for_log(&["serving", "server=v", "version=0.1.0"]));
    let second = build(host.wait_for_log(&["reloaded", "server=v", "version=0.1.0"]));
    assert_eq!((first.len(), second.len()), (16, 16), "{}", host.logs());
    assert_ne!(first, second);
}

#[test]
fn a_broken_build_never_replaces_a_working_one() {
    let host = versioned_host("broken-builds", "a");
    let whole = std::fs::read(variant("b")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"not a library".to_vec(), "it has no ELF header"),
        (
            "truncated",
            whole[..whole.len() / 2].to_vec(),
            "it is incomplete",
        ),
        (
            "old interface",
            std::fs::read(library("fixture-old-api")).unwrap(),
            "built against plugin-api 99.0.0",
        ),
        (
            "init error",
            std::fs::read(variant("init-fail")).unwrap(),
            "variant init-fail refuses to start",
        ),
        (
            "init panic",
            std::fs::read(variant("init-panic")).unwrap(),
            "init panicked: variant init-panic exploded",
        ),
        (
            "init hang",
            std::fs::read(variant("init-hang")).unwrap(),
            "init did not finish within 1000 ms",
        ),
    ];
    for (what, bytes, reason) in cases {
        let before = host.logs().len();
        host.install_bytes(&bytes, "versioned.so");
        host.wait_until(&format!("the {what} build is refused"), || {
            host.logs()[before..]
                .lines()
                .any(|l| l.contains(reason) && l.contains("versioned.so"))
        });
        assert_eq!(body(&host, "v.localhost", "/"), "a x", "{what}");
    }
    // Each build the loader refused was said once, though the host looked again at
    // the incomplete one while it might still change.
    assert_eq!(
        host.count_log_lines(&["kept serving the previous build", "versioned.so"]),
        3,
        "{}",
        host.logs()
    );
    // The build that serves, put back after all that: the same bytes, not a reload.
    host.install(&variant("a"), "versioned.so");
    host.wait_for_log(&["versioned.so", "identical bytes; not reloaded"]);
    assert_eq!(
        host.count_log_lines(&[": reloaded server=v"]),
        0,
        "{}",
        host.logs()
    );
    // A good build after all that is picked up.
    host.install(&variant("b"), "versioned.so");
    host.wait_until("b serves", || body(&host, "v.localhost", "/") == "b x");
}

#[test]
fn a_dropped_in_library_goes_live_and_a_removed_one_stops_with_503() {
    let config = r#"{"global": {"reload": {"debounce_ms": 20}}, "servers": []}"#;
    let host = Setup::new("drop-in", config).start();
    assert_eq!(host.get("notes.localhost", "/notes").status, 404);
    host.install(&library("notes"), "notes.so");
    host.wait_until("notes is live", || {
        host.get("notes.localhost", "/notes").status == 200
    });

    std::fs::remove_file(host.dir().join("plugins/notes.so")).unwrap();
    host.wait_until("notes stops", || {
        host.get("notes.localhost", "/notes").status == 503
    });
    let r = host.get("notes.localhost", "/notes");
    assert!(
        r.json()["error"].as_str().unwrap().contains("was removed"),
        "{}",
        r.body
    );
}

#[test]
fn notes_survive_a_reload_and_identical_bytes_are_not_reloaded() {
    let config = r#"{"global": {"reload": {"debounce_ms": 20}},
        "servers": [{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}]}"#;
    let host = Setup::new("handover", config)
        .plugin("notes", "notes.so")
        .start();
    for text in ["one", "two"] {
        let r = host.send(
            "POST",
            "notes.localhost",
            "/notes",
            format!(r#"{{"text":"{text}"}}"#).as_bytes(),
            &[],
        );
        assert_eq!(r.status, 201);
    }

    // The same bytes again, through a new file: not a reload.
    let original = std::fs::read(library("notes")).unwrap();
    host.install_bytes(&original, "notes.so");
    host.wait_for_log(&["identical bytes; not reloaded"]);
    assert!(!host.logs().contains("reloaded server=notes"));

    // A different build (here: the same code with trailing bytes) is a reload, and the
    // new generation finds the notes in the database file (nothing is handed over).
    let mut rebuilt = original;
    rebuilt.extend_from_slice(b"a different build");
    host.install_bytes(&rebuilt, "notes.so");
    let line = host.wait_for_log(&["reloaded", "server=notes", "generation=2"]);
    assert!(line.contains("state_bytes=0"), "{line}");
    let list = host.get("notes.localhost", "/notes").json();
    assert_eq!(
        list,
        serde_json::json!([{"id": 1, "text": "one"}, {"id": 2, "text": "two"}])
    );
    // Ids keep counting from where the old generation stopped.
    let r = host.send(
        "POST",
        "notes.localhost",
        "/notes",
        br#"{"text":"three"}"#,
        &[],
    );
    assert_eq!(r.json()["id"], 3);
}

#[test]
fn config_changes_apply_live_and_a_bad_one_is_rejected() {
    let start = r#"{"global": {"reload": {"debounce_ms": 20}},
      "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
                   "config": {"greeting": "Hi"}}]}"#;
    let host = Setup::new("config-live", start)
        .plugin("hello", "hello.so")
        .plugin("notes", "notes.so")
        .start();
    // notes.so has no entry yet, so it is a drop-in at notes.localhost.
    assert_eq!(host.get("notes.localhost", "/notes").status, 200);
    assert_eq!(body(&host, "hello.localhost", "/hello/x"), "Hi, x!\n");

    // Add a server, move a domain to it, change hello's config.
    host.write_config(
        r#"{"global": {"reload": {"debounce_ms": 20}},
      "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
                   "config": {"greeting": "Hey"}},
                  {"name": "memo", "domains": ["memo.localhost", "*.memo.localhost"], "plugin": "notes"}]}"#,
    );
    host.wait_until("hello has the new greeting", || {
        body(&host, "hello.localhost", "/hello/x") == "Hey, x!\n"
    });
    // A new server's domains are published once every server has started, which may be
    // a moment after hello's new generation serves (notes opens its database first).
    host.wait_until("memo serves", || {
        host.get("a.memo.localhost", "/notes").status == 200
    });
    host.wait_for_log(&["reloaded", "server=hello", "generation=2"]);
    // notes.so now runs as "memo", so the drop-in server is gone.
    assert_eq!(host.get("notes.localhost", "/notes").status, 404);

    // A broken config is rejected and everything stays as it was.
    host.write_config(
        r#"{"servers": [{"name": "hello", "domains": ["bad domain"], "plugin": "hello"}]}"#,
    );
    host.wait_for_log(&["config change rejected", "servers[0].domains[0]"]);
    assert_eq!(body(&host, "hello.localhost", "/hello/x"), "Hey, x!\n");
    assert_eq!(host.get("memo.localhost", "/notes").status, 200);

    // Disable hello and remove memo.
    host.write_config(
        r#"{"global": {"reload": {"debounce_ms": 20}},
      "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello", "enabled": false}]}"#,
    );
    host.wait_until("hello is off", || {
        host.get("hello.localhost", "/").status == 404
    });
    assert_eq!(host.get("memo.localhost", "/notes").status, 404);
    // With no entry naming it, notes.so is a drop-in again.
    host.wait_until("notes is a drop-in again", || {
        host.get("notes.localhost", "/notes").status == 200
    });
}

#[test]
fn a_changed_listen_address_is_bound_without_dropping_the_others() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let setup = Setup::new(
        "listen",
        r#"{"global": {"listen": ["127.0.0.1:0"], "reload": {"debounce_ms": 20}},
          "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#,
    )
    .plugin("hello", "hello.so");
    let host = setup.start_with_config_listen();
    let mut kept = host.connect();
    assert_eq!(kept.get("hello.localhost", "/").unwrap().status, 200);

    host.write_config(&format!(
        r#"{{"global": {{"listen": ["127.0.0.1:0", "{free}"], "reload": {{"debounce_ms": 20}}}},
          "servers": [{{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    ));
    host.wait_for_log(&[&format!("listening on http://{free}")]);
    let other = Host::at(free);
    assert_eq!(other.get("hello.localhost", "/").status, 200);
    // The first listener and its open connection were not touched.
    assert_eq!(kept.get("hello.localhost", "/").unwrap().status, 200);
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    host.write_config(
        r#"{"global": {"listen": ["127.0.0.1:0"], "reload": {"debounce_ms": 20}},
          "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#,
    );
    host.wait_for_log(&[&format!("stopped listening on http://{free}")]);
    assert!(std::net::TcpStream::connect(free).is_err());
    assert_eq!(host.get("hello.localhost", "/").status, 200);
}

#[test]
fn a_library_still_being_written_is_loaded_once_complete_and_never_half_written() {
    let host = versioned_host("slow-copy", "a");
    let whole = std::fs::read(variant("b")).unwrap();
    let path = host.dir().join("plugins/versioned.so");
    // Written in place, in two parts, like a `cp` that is still running.
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&whole[..whole.len() / 2]).unwrap();
        file.flush().unwrap();
        host.wait_for_log(&["refused plugin", "versioned.so", "it is incomplete"]);
        assert_eq!(body(&host, "v.localhost", "/"), "a x");
        file.write_all(&whole[whole.len() / 2..]).unwrap();
    }
    host.wait_until("b serves", || body(&host, "v.localhost", "/") == "b x");
}

#[test]
fn a_plugin_folder_that_cannot_be_read_leaves_servers_serving() {
    let host = versioned_host("folder-gone", "a");
    let dir = host.dir().join("plugins");
    let aside = host.dir().join("plugins.aside");
    std::fs::rename(&dir, &aside).unwrap();
    // Something in the old folder changes; the host looks, cannot read the folder, and
    // keeps what it has.
    std::fs::write(aside.join("trigger.so"), b"x").unwrap();
    host.wait_for_log(&["plugin folder", "looking again shortly"]);
    let r = host.get("v.localhost", "/");
    assert_eq!(r.body, "a x", "{r:?}\n{}", host.logs());
    std::fs::remove_file(aside.join("trigger.so")).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    let r = host.get("v.localhost", "/");
    assert_eq!(r.body, "a x", "{r:?}\n{}", host.logs());
}

#[test]
fn a_file_named_after_the_plugin_wins_over_a_backup_copy() {
    let config =
        r#"{"servers": [{"name": "notes", "domains": ["notes.localhost"], "plugin": "notes"}]}"#;
    let mut backup = std::fs::read(library("notes")).unwrap();
    backup.extend_from_slice(b"an older build kept as a backup");
    // "notes.bak.so" sorts before "notes.so" and also holds a plugin named "notes".
    let host = Setup::new("backup-copy", config)
        .file("notes.bak.so", &backup)
        .plugin("notes", "notes.so")
        .start();
    let line = host.wait_for_log(&["serving", "server=notes"]);
    assert!(line.contains("plugins/notes.so"), "{line}");
}

#[test]
fn the_config_that_serves_put_back_after_a_failed_one_is_not_a_reload() {
    let config = |plugin_config: &str| {
        format!(
            r#"{{"global": {{"reload": {{"debounce_ms": 20}}}}, "servers": [{{"name": "bad",
              "domains": ["bad.localhost"], "plugin": "misbehave", "config": {plugin_config}}}]}}"#
        )
    };
    let host = Setup::new("config-back", &config("{}"))
        .plugin("fixture-misbehave", "misbehave.so")
        .start();
    assert_eq!(host.get("bad.localhost", "/ok").status, 200);
    host.write_config(&config(r#"{"init": "fail"}"#));
    host.wait_for_log(&["reload refused, generation 1 keeps serving"]);
    // Back to the config generation 1 runs: nothing to start, and the log says so.
    host.write_config(&config("{}"));
    host.wait_for_log(&["server=bad", "runs this config already; not reloaded"]);
    assert_eq!(
        host.count_log_lines(&[": reloaded server=bad"]),
        0,
        "{}",
        host.logs()
    );
    assert_eq!(host.get("bad.localhost", "/ok").status, 200);
    // A config that differs from both is a reload.
    host.write_config(&config(r#"{"label": "2"}"#));
    host.wait_for_log(&[": reloaded server=bad"]);
}

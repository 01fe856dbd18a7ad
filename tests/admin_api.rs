//! The admin API (servers, reloads, enable, disable, drain, the running config, stats)
//! and the dashboard, against real hosts over real sockets; the dashboard in headless
//! Chromium.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::browser::Browser;
use crate::support::{hello_with_admin_token, variant, Client, Host, Reply, Setup};

/// hello, a static-only site, and `gone` (disabled; its plugin is not installed).
const CONFIG: &str = r#"{
  "global": {"reload": {"debounce_ms": 20, "init_timeout_ms": 2000, "drain_timeout_ms": 5000}},
  "servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
     "config": {"greeting": "Hi"}},
    {"name": "site", "domains": ["site.localhost"], "static": {"root": "site"}},
    {"name": "gone", "domains": ["gone.localhost"], "plugin": "gone", "enabled": false}
  ]
}"#;

fn host(label: &str) -> Host {
    let setup = Setup::new(label, CONFIG).plugin("hello", "hello.so");
    std::fs::create_dir_all(setup.dir.join("site")).unwrap();
    std::fs::write(setup.dir.join("site/index.html"), "<h1>site</h1>").unwrap();
    setup.start()
}

fn post(admin: &Client, path: &str) -> Reply {
    admin.send("POST", "admin", path, b"", &[])
}

/// The entry of `/api/servers` called `name`.
fn server(admin: &Client, name: &str) -> Value {
    let r = admin.get("admin", "/api/servers");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no server {name} in {}", r.body))
        .clone()
}

/// Asserts a status and an error naming `needle`.
fn check_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains(needle), "{needle:?} not in {error:?}");
}

#[test]
fn servers_are_listed_and_a_reload_through_the_api_starts_a_new_generation() {
    let host = host("api-reload");
    let admin = host.admin();
    let hello = server(&admin, "hello");
    assert_eq!(
        (&hello["state"], &hello["generation"], &hello["enabled"]),
        (&"serving".into(), &1.into(), &true.into())
    );
    assert_eq!(hello["plugin"]["name"], "hello");
    assert_eq!(server(&admin, "site")["state"], "static");
    let gone = server(&admin, "gone");
    assert_eq!(
        (&gone["state"], &gone["enabled"]),
        (&"disabled".into(), &false.into())
    );
    assert_eq!(
        admin.get("admin", "/api/servers/hello").json()["generation"],
        1
    );
    check_error(&admin.get("admin", "/api/servers/nope"), 404, "nope");

    let r = post(&admin, "/api/servers/hello/reload");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (&r.json()["generation"], &r.json()["action"]),
        (&2.into(), &"reload".into())
    );
    host.wait_for_log(&["reloaded", "server=hello", "generation=2"]);
    host.wait_for_log(&[
        "host::audit",
        "admin API change",
        "action=\"reload\"",
        "server=\"hello\"",
        "result=\"ok\"",
        "client=127.0.0.1:",
    ]);
    assert_eq!(server(&admin, "hello")["generation"], 2);
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    // The history: newest first, with what caused each reload.
    let reloads = admin.get("admin", "/api/reloads").json()["reloads"].clone();
    let seen: Vec<(&str, &str, u64)> = reloads
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let (server, cause) = (r["server"].as_str().unwrap(), r["cause"].as_str().unwrap());
            (server, cause, r["generation"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(seen, [("hello", "admin_api", 2), ("hello", "start", 1)]);
    assert_eq!(reloads[0]["result"], "ok");
    assert!(reloads[0]["took_ms"].as_f64().unwrap() > 0.0);

    // What cannot be done, and why.
    check_error(&post(&admin, "/api/servers/nope/reload"), 404, "nope");
    check_error(
        &post(&admin, "/api/servers/site/reload"),
        409,
        "static files only",
    );
    check_error(&post(&admin, "/api/servers/gone/reload"), 409, "disabled");
    check_error(
        &post(&admin, "/api/servers/gone/enable"),
        409,
        "no plugin named \"gone\"",
    );
    assert_eq!(server(&admin, "gone")["state"], "disabled");
    check_error(
        &admin.get("admin", "/api/servers/hello/reload"),
        405,
        "POST",
    );
    check_error(&post(&admin, "/api/servers"), 405, "GET");
    check_error(
        &post(&admin, "/api/servers/hello/explode"),
        404,
        "no such admin API endpoint",
    );
    check_error(
        &post(&admin, "/api/servers/hello/reload?persist=true"),
        400,
        "enable and disable only",
    );
    // Each change asked for is one audit line, made or not.
    host.wait_for_log(&[
        "host::audit",
        "server=\"gone\"",
        "action=\"enable\"",
        "result=\"refused\"",
    ]);
    assert_eq!(host.count_log_lines(&["host::audit", "server=\"nope\""]), 1);
    assert_eq!(server(&admin, "hello")["generation"], 2);
}

#[test]
fn disable_takes_a_server_off_its_domains_drain_answers_503_and_enable_brings_it_back() {
    let host = host("api-enable");
    let admin = host.admin();
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    let r = post(&admin, "/api/servers/hello/disable");
    assert_eq!(
        (r.status, r.json()["persisted"].clone()),
        (200, false.into())
    );
    assert_eq!(host.get("hello.localhost", "/").status, 404);
    assert_eq!(server(&admin, "hello")["state"], "disabled");
    assert_eq!(
        post(&admin, "/api/servers/hello/disable").json()["message"],
        "already disabled"
    );
    check_error(&post(&admin, "/api/servers/hello/drain"), 409, "disabled");

    let r = post(&admin, "/api/servers/hello/enable");
    assert_eq!(
        (r.status, r.json()["generation"].clone()),
        (200, 2.into()),
        "{}",
        r.body
    );
    assert_eq!(host.get("hello.localhost", "/").status, 200);

    // Drain: a request in flight finishes; new ones get 503 until the server is enabled.
    let slow = {
        let client = Client { addr: host.addr };
        std::thread::spawn(move || client.get("hello.localhost", "/slow?ms=1500"))
    };
    host.wait_until("the slow request is in flight", || {
        server(&admin, "hello")["in_flight"] == 1
    });
    let r = post(&admin, "/api/servers/hello/drain");
    assert_eq!(r.status, 200, "{}", r.body);
    let refused = host.get("hello.localhost", "/");
    assert_eq!(refused.status, 503);
    assert!(refused.body.contains("drained"), "{}", refused.body);
    assert_eq!(slow.join().unwrap().status, 200);
    let hello = server(&admin, "hello");
    assert_eq!(
        (&hello["state"], &hello["drained"]),
        (&"drained".into(), &true.into())
    );
    // Drained on purpose: the host is still ready.
    assert_eq!(admin.get("admin", "/health/ready").status, 200);
    check_error(&post(&admin, "/api/servers/hello/reload"), 409, "drained");

    let r = post(&admin, "/api/servers/hello/enable");
    assert_eq!(
        (r.status, r.json()["generation"].clone()),
        (200, 3.into()),
        "{}",
        r.body
    );
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    assert_eq!(server(&admin, "hello")["drained"], false);

    // A config-file change meanwhile does not undo a run-time disable.
    assert_eq!(post(&admin, "/api/servers/hello/disable").status, 200);
    host.write_config(&CONFIG.replace("\"Hi\"", "\"Hey\""));
    host.wait_for_log(&["applied config change"]);
    assert_eq!(host.get("hello.localhost", "/").status, 404);
}

#[test]
fn persist_rewrites_the_config_file_and_the_host_starts_with_it() {
    let config = r#"{
  "servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"},
    {"name": "other", "domains": ["other.localhost"], "plugin": "hello", "enabled": false},
    {"name": "keep", "domains": ["keep.localhost"], "plugin": "gone", "enabled": false,
     "config": {"note": "keep me", "nested": {"zebra": 1, "apple": [true, null]}}}
  ],
  "global": {"reload": {"debounce_ms": 20}}
}"#;
    let host = Setup::new("api-persist", config)
        .plugin("hello", "hello.so")
        .start();
    let admin = host.admin();
    let file = host.dir().join("servers.config.json");
    let r = post(&admin, "/api/servers/hello/disable?persist=true");
    assert_eq!(
        (r.status, r.json()["persisted"].clone()),
        (200, true.into()),
        "{}",
        r.body
    );
    let r = post(&admin, "/api/servers/other/enable?persist=true");
    assert_eq!(r.status, 200, "{}", r.body);
    host.wait_for_log(&["host::audit", "server=\"other\"", "persist=true"]);

    let text = std::fs::read_to_string(&file).unwrap();
    let written: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(written["servers"][0]["enabled"], false);
    assert_eq!(written["servers"][1]["enabled"], true);
    let keep = &written["servers"][2];
    assert_eq!(keep["config"]["note"], "keep me");
    assert_eq!(
        keep["config"]["nested"]["apple"],
        serde_json::json!([true, null])
    );
    assert_eq!(keep["enabled"], false);
    // Keys keep their order; no temporary file is left behind.
    let at = |key: &str| text.find(key).unwrap();
    assert!(at("\"servers\"") < at("\"global\""), "{text}");
    assert!(at("\"zebra\"") < at("\"apple\""), "{text}");
    let names: Vec<String> = std::fs::read_dir(host.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    // The host's own watcher sees the file agree with what runs: nothing changes.
    assert_eq!(host.get("hello.localhost", "/").status, 404);
    assert_eq!(host.get("other.localhost", "/").status, 200);

    // A new host starts from the rewritten file.
    let again = Setup::new("api-persist-again", &text)
        .plugin("hello", "hello.so")
        .start();
    assert_eq!(again.get("hello.localhost", "/").status, 404);
    assert_eq!(again.get("other.localhost", "/").status, 200);
    assert_eq!(server(&again.admin(), "hello")["state"], "disabled");
}

#[test]
fn the_running_config_redacts_values_taken_from_the_environment() {
    let config = r#"{
  "global": {"reload": {"debounce_ms": 20}},
  "servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
     "config": {"greeting": "${API_GREETING}"}},
    {"name": "db", "domains": ["db.localhost"], "plugin": "gone", "enabled": false,
     "config": {"dsn": "postgres://app:${API_DB_PASSWORD}@db/app", "plain": "visible",
                "literal": "$${NOT_A_VAR}"}}
  ]
}"#;
    let host = Setup::new("api-config", config)
        .plugin("hello", "hello.so")
        .env("API_GREETING", "Bonjour")
        .env("API_DB_PASSWORD", "hunter2-db-secret")
        .start();
    // The plugin got the values...
    assert!(host.get("hello.localhost", "/").body.contains("Bonjour"));
    // ...the API shows where they came from, not what they are.
    let r = host.admin().get("admin", "/api/config");
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("hunter2-db-secret"), "{}", r.body);
    assert!(!r.body.contains("Bonjour"), "{}", r.body);
    let servers = &r.json()["config"]["servers"];
    assert_eq!(
        servers[0]["config"]["greeting"],
        "(redacted) ${API_GREETING}"
    );
    let shown = &servers[1]["config"];
    assert_eq!(
        shown["dsn"],
        "(redacted) postgres://app:${API_DB_PASSWORD}@db/app"
    );
    assert_eq!(shown["plain"], "visible");
    assert_eq!(shown["literal"], "$${NOT_A_VAR}");
    assert_eq!(r.json()["config"]["global"]["reload"]["debounce_ms"], 20);
}

#[test]
fn the_api_needs_the_token_and_the_dashboard_files_do_not() {
    let host = hello_with_admin_token("api-token", "API_TOKEN", "api-s3cret");
    let admin = host.admin();
    let wrong = [("authorization", "Bearer api-s3creT")];
    for path in ["/api/servers", "/api/config", "/api/reloads", "/api/stats"] {
        assert_eq!(admin.get("admin", path).status, 401, "{path}");
        assert_eq!(
            admin.send("GET", "admin", path, b"", &wrong).status,
            401,
            "{path}"
        );
    }
    let r = admin.send("POST", "admin", "/api/servers/hello/reload", b"", &wrong);
    check_error(&r, 401, "token");
    host.wait_for_log(&[
        "host::audit",
        "path=\"/api/servers/hello/reload\"",
        "result=\"unauthorized\"",
    ]);
    assert!(!host.logs().contains("api-s3creT"));
    let right = [("authorization", "Bearer api-s3cret")];
    let r = admin.send("POST", "admin", "/api/servers/hello/reload", b"", &right);
    assert_eq!((r.status, r.json()["generation"].clone()), (200, 2.into()));
    // Only the reload with the token happened. (Its log line is read from the host's
    // stderr by a thread of the tests: it may come a moment after the answer.)
    host.wait_until("the reload is logged", || {
        host.count_log_lines(&["reloaded", "server=hello"]) >= 1
    });
    assert_eq!(host.count_log_lines(&["reloaded", "server=hello"]), 1);

    for (path, kind) in [
        ("/", "text/html"),
        ("/dashboard.css", "text/css"),
        ("/dashboard.js", "text/javascript"),
    ] {
        let r = admin.get("admin", path);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
    }
    assert!(admin
        .get("admin", "/")
        .body
        .contains("<script src=\"/dashboard.js\""));
}

#[test]
fn stats_count_each_servers_requests() {
    let host = host("api-stats");
    let admin = host.admin();
    for _ in 0..7 {
        assert_eq!(host.get("hello.localhost", "/").status, 200);
    }
    for _ in 0..3 {
        assert_eq!(host.get("hello.localhost", "/nowhere").status, 404);
    }
    let stats = admin.get("admin", "/api/stats").json();
    assert_eq!(stats["recording"], true);
    let hello = stats["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hello")
        .unwrap()
        .clone();
    assert_eq!(
        (&hello["requests"], &hello["errors"]),
        (&10.into(), &0.into())
    );
    let buckets: u64 = hello["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(buckets, 10);
    assert_eq!(
        hello["buckets"].as_array().unwrap().len(),
        stats["latency_bounds_s"].as_array().unwrap().len() + 1
    );
}

#[test]
fn the_dashboard_lists_the_servers_and_shows_a_reload_in_a_browser() {
    let host = host("api-dashboard");
    let admin = host.admin();
    let url = format!("http://{}/", admin.addr);
    let mut browser = Browser::open(&url);
    let generation = |name: &str| {
        format!("document.querySelector('#servers tr[data-server=\"{name}\"] td.generation')?.textContent")
    };
    browser.wait_for(
        "the servers",
        &format!("{} === '1' && !!document.querySelector('#servers tr[data-server=\"site\"]') && !!document.querySelector('#servers tr[data-server=\"gone\"]')", generation("hello")),
    );
    browser.wait_for(
        "the start in the reload history",
        "document.querySelector('#reloads tbody').textContent.includes('start')",
    );
    // Traffic shows as a rate.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        assert_eq!(host.get("hello.localhost", "/").status, 200);
    }
    browser.wait_for(
        "a request rate",
        "parseFloat(document.querySelector('#servers tr[data-server=\"hello\"] td.rps').textContent) > 0",
    );
    assert_eq!(post(&admin, "/api/servers/hello/reload").status, 200);
    browser.wait_for("generation 2", &format!("{} === '2'", generation("hello")));
    browser.wait_for(
        "the reload in the history",
        "document.querySelector('#reloads tbody').textContent.includes('admin_api')",
    );
    // The page's own reload button calls the API.
    browser.eval(
        "document.querySelector('#servers tr[data-server=\"hello\"] button[data-action=\"reload\"]').click(); true",
    );
    browser.wait_for("generation 3", &format!("{} === '3'", generation("hello")));
    host.wait_for_log(&["host::audit", "action=\"reload\"", "result=\"ok\""]);
    assert_eq!(server(&admin, "hello")["generation"], 3);
}

#[test]
fn the_dashboard_asks_for_the_token_once_and_keeps_it_for_the_tab() {
    let host = hello_with_admin_token("api-dashboard-token", "API_TOKEN", "page-s3cret");
    let url = format!("http://{}/", host.admin().addr);
    let mut browser = Browser::open(&url);
    let listed = "!!document.querySelector('#servers tr[data-server=\"hello\"]')";
    browser.wait_for(
        "the token form",
        "document.getElementById('login')?.hidden === false",
    );
    assert_eq!(browser.eval(listed), false);
    browser.eval(
        "document.getElementById('token').value = 'page-s3cret';
         document.getElementById('login').requestSubmit(); true",
    );
    browser.wait_for("the servers", listed);
    // Loaded again in the same tab, the page has the token already.
    browser.eval("location.reload(); true");
    browser.wait_for(
        "the servers after a reload, without the form",
        &format!("{listed} && document.getElementById('login')?.hidden === true"),
    );
}

#[test]
fn the_reload_history_keeps_the_last_100_with_their_causes() {
    let host = host("api-history");
    let admin = host.admin();
    host.write_config(&CONFIG.replace("\"Hi\"", "\"Hey\""));
    host.wait_for_log(&["reloaded", "server=hello", "generation=2"]);
    let newest = &admin.get("admin", "/api/reloads").json()["reloads"][0];
    assert_eq!(
        (&newest["cause"], &newest["generation"]),
        (&"config_file".into(), &2.into())
    );
    for _ in 0..99 {
        assert_eq!(post(&admin, "/api/servers/hello/reload").status, 200);
    }
    let reloads = admin.get("admin", "/api/reloads").json()["reloads"].clone();
    let reloads = reloads.as_array().unwrap();
    // 1 at start, 1 from the file, 99 from the API: the first is gone.
    assert_eq!(reloads.len(), 100);
    assert_eq!(reloads[0]["generation"], 101);
    assert_eq!(
        (&reloads[99]["cause"], &reloads[99]["generation"]),
        (&"config_file".into(), &2.into())
    );
    assert!(reloads
        .iter()
        .all(|r| r["result"] == "ok" && r["server"] == "hello"));
}

#[test]
fn a_reload_reads_a_changed_library_without_the_watcher_and_a_failing_init_is_409() {
    let config = r#"{"global": {"reload": {"watch": false, "init_timeout_ms": 2000}},
        "servers": [{"name": "v", "domains": ["v.localhost"], "plugin": "versioned"}]}"#;
    let setup = Setup::new("api-reload-fail", config);
    std::fs::copy(variant("a"), setup.dir.join("plugins/versioned.so")).unwrap();
    let host = setup.start();
    let admin = host.admin();
    assert!(host.get("v.localhost", "/").body.starts_with("a"));

    // Nothing watches the folder: the API's reload is what reads the new file.
    host.install(&variant("b"), "versioned.so");
    let r = post(&admin, "/api/servers/v/reload");
    assert_eq!(
        (r.status, r.json()["generation"].clone()),
        (200, 2.into()),
        "{}",
        r.body
    );
    assert!(host.get("v.localhost", "/").body.starts_with("b"));

    host.install(&variant("init-fail"), "versioned.so");
    check_error(
        &post(&admin, "/api/servers/v/reload"),
        409,
        "refuses to start",
    );
    assert!(host.get("v.localhost", "/").body.starts_with("b"));
    assert_eq!(server(&admin, "v")["generation"], 2);
    let newest = &admin.get("admin", "/api/reloads").json()["reloads"][0];
    assert_eq!(
        (&newest["result"], &newest["cause"]),
        (&"failed".into(), &"admin_api".into())
    );
    assert!(newest["error"]
        .as_str()
        .unwrap()
        .contains("refuses to start"));
}

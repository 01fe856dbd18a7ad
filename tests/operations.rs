//! Operations: the admin listener's health endpoints and Prometheus metrics, the bearer
//! token, and the public health path, against real hosts over real sockets.

use serde_json::Value;

use crate::support::{hello_with_admin_token, library, variant, Client, Host, Setup};

/// hello (tenant acme), the versioned fixture as `v`, and `gone`, whose plugin is not
/// installed.
const CONFIG: &str = r#"{
  "global": {"reload": {"debounce_ms": 20, "init_timeout_ms": 1000}, "health_path": "/healthz"},
  "tenants": [{"id": "acme"}],
  "servers": [
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello", "tenant": "acme"},
    {"name": "v", "domains": ["v.localhost"], "plugin": "versioned", "config": {"label": "x"}}
  ]
}"#;

fn host(label: &str) -> Host {
    let setup = Setup::new(label, CONFIG).plugin("hello", "hello.so");
    std::fs::copy(variant("a"), setup.dir.join("plugins/versioned.so")).unwrap();
    setup.start()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// Checks each sample of `expected` (series, value) in `metrics`.
fn check(metrics: &str, expected: &[(&str, f64)]) {
    for (series, want) in expected {
        assert_eq!(sample(metrics, series), *want, "{series}");
    }
}

fn scrape(admin: &Client) -> String {
    let r = admin.get("admin", "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    r.body
}

#[test]
fn the_health_endpoints_describe_the_host_and_each_server() {
    let host = host("ops-health");
    let admin = host.admin();

    let live = admin.get("admin", "/health/live");
    assert_eq!(live.status, 200);
    assert_eq!(live.json()["status"], "live");
    assert!(live.json()["uptime_s"].as_f64().unwrap() > 0.0);

    let ready = admin.get("admin", "/health/ready");
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (200, "ready".into())
    );

    let all = admin.get("admin", "/health/servers").json();
    let names: Vec<&str> = all["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "v"]);

    let one = admin.get("admin", "/health/servers/hello");
    assert_eq!(one.status, 200);
    let s = one.json();
    assert_eq!(s["state"], "serving");
    assert_eq!(s["generation"], 1);
    assert_eq!(s["plugin"]["name"], "hello");
    assert_eq!(s["plugin"]["version"], "0.1.0");
    let build = s["plugin"]["build"].as_str().unwrap();
    assert!(
        build.len() == 16 && build.bytes().all(|b| b.is_ascii_hexdigit()),
        "{build}"
    );
    assert!(host.logs().contains(&format!("build={build}")));
    assert_eq!(s["last_reload"]["result"], "ok");
    assert_eq!(s["last_reload"]["generation"], 1);
    assert!(s["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s["in_flight"], 0);
    assert_eq!(s["websocket_connections"], 0);

    let missing = admin.get("admin", "/health/servers/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], r#"no server is called "nope""#);

    let system = admin.get("admin", "/health/system").json();
    for key in [
        "rss_bytes",
        "threads",
        "open_fds",
        "uptime_s",
        "cpu_seconds",
    ] {
        assert!(system[key].as_f64().unwrap() > 0.0, "{key}: {system}");
    }
    assert_eq!(system["pid"], host.pid());

    let unknown = admin.get("admin", "/health/everything");
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"]
        .as_str()
        .unwrap()
        .contains("/metrics"));
    let post = admin.send("POST", "admin", "/metrics", b"", &[]);
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    // The admin endpoints are not on the public listener, under any domain.
    assert_eq!(host.get("hello.localhost", "/metrics").status, 404);
    assert_eq!(host.get("admin", "/health/live").status, 404);
}

#[test]
fn readiness_turns_503_while_a_server_waits_and_back() {
    let host = host("ops-ready");
    let admin = host.admin();
    assert_eq!(host.get("anything.example", "/healthz").status, 200);

    std::fs::remove_file(host.dir().join("plugins/hello.so")).unwrap();
    host.wait_until("not ready", || {
        admin.get("admin", "/health/ready").status == 503
    });
    let ready = admin.get("admin", "/health/ready").json();
    assert_eq!(ready["status"], "not ready");
    assert_eq!(ready["not_ready"][0]["name"], "hello");
    assert!(ready["not_ready"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("was removed"));
    assert_eq!(ready["not_ready"].as_array().unwrap().len(), 1);
    let server = admin.get("admin", "/health/servers/hello").json();
    assert_eq!(server["state"], "waiting");
    assert_eq!(server["generation"], Value::Null);
    // The public health path says the same, on every domain, before any routing.
    let public = host.get("v.localhost", "/healthz");
    assert_eq!(public.status, 503);
    assert_eq!(public.json()["not_ready"][0], "hello");
    assert_eq!(host.get("v.localhost", "/").body, "a x");

    host.install(&library("hello"), "hello.so");
    host.wait_until("ready", || {
        admin.get("admin", "/health/ready").status == 200
    });
    assert_eq!(host.get("no-such.example", "/healthz").status, 200);
    check(
        &scrape(&admin),
        &[
            (r#"host_server_ready{server="hello"}"#, 1.0),
            (r#"host_reloads_total{server="hello",result="ok"}"#, 2.0),
        ],
    );
}

#[test]
fn metrics_count_exactly_what_was_sent_under_load_and_reloads_with_their_result() {
    let host = host("ops-metrics");
    let admin = host.admin();
    // Four clients at once: 10 hits and 5 misses each on hello, 6 hits each on v, and
    // 2 requests each for a domain no server has.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..10 {
                    assert_eq!(host.get("hello.localhost", "/plain").status, 200);
                    if i % 2 == 0 {
                        assert_eq!(host.get("hello.localhost", "/no/such/route").status, 404);
                    }
                }
                for _ in 0..6 {
                    assert_eq!(host.get("v.localhost", "/").status, 200);
                }
                for _ in 0..2 {
                    assert_eq!(host.get("nobody.localhost", "/").status, 404);
                }
            });
        }
        // Scraping while they run is fine too.
        s.spawn(|| {
            for _ in 0..5 {
                scrape(&admin);
            }
        });
    });
    // Request bodies: 3 of 100 bytes, echoed.
    for _ in 0..3 {
        let r = host.send("POST", "hello.localhost", "/echo-raw", &[b'x'; 100], &[]);
        assert_eq!((r.status, r.body.len()), (200, 100));
    }
    let m = scrape(&admin);
    assert_eq!(
        sample(&m, r#"host_http_request_body_bytes_total{server="hello"}"#),
        300.0
    );
    assert_eq!(
        sample(&m, r#"host_http_request_body_bytes_total{server="v"}"#),
        0.0
    );
    let requests = |server: &str, tenant: &str, class: &str| {
        sample(
            &m,
            &format!(
                r#"host_http_requests_total{{server="{server}",tenant="{tenant}",class="{class}"}}"#
            ),
        )
    };
    assert_eq!(requests("hello", "acme", "2xx"), 43.0);
    assert_eq!(requests("hello", "acme", "4xx"), 20.0);
    assert_eq!(requests("hello", "acme", "5xx"), 0.0);
    assert_eq!(requests("v", "", "2xx"), 24.0);
    assert_eq!(requests("v", "", "4xx"), 0.0);
    assert_eq!(
        sample(&m, r#"host_http_unrouted_requests_total{class="4xx"}"#),
        8.0
    );
    let count = |server: &str| {
        sample(
            &m,
            &format!(r#"host_http_request_duration_seconds_count{{server="{server}"}}"#),
        )
    };
    assert_eq!(count("hello"), 63.0);
    assert_eq!(count("v"), 24.0);
    assert_eq!(
        sample(
            &m,
            r#"host_http_request_duration_seconds_bucket{server="hello",le="+Inf"}"#
        ),
        63.0
    );
    // Every hello request took less than 10 s, and more than nothing.
    assert_eq!(
        sample(
            &m,
            r#"host_http_request_duration_seconds_bucket{server="hello",le="10"}"#
        ),
        63.0
    );
    assert!(
        sample(
            &m,
            r#"host_http_request_duration_seconds_sum{server="hello"}"#
        ) > 0.0
    );
    assert_eq!(
        sample(&m, r#"host_http_requests_in_flight{server="hello"}"#),
        0.0
    );
    assert!(m.contains("# TYPE host_http_request_duration_seconds histogram"));
    assert!(sample(&m, "process_resident_memory_bytes") > 0.0);
    assert!(sample(&m, "process_open_fds") > 0.0);

    // A new build of v is a reload that worked; one whose init fails is counted as
    // failed, with its error, and the build before keeps serving.
    host.install(&variant("b"), "versioned.so");
    host.wait_until("b serves", || host.get("v.localhost", "/").body == "b x");
    host.install(&variant("init-fail"), "versioned.so");
    host.wait_until("the failed reload is counted", || {
        let m = scrape(&admin);
        sample(&m, r#"host_reloads_total{server="v",result="failed"}"#) == 1.0
    });
    let m = scrape(&admin);
    assert_eq!(
        sample(&m, r#"host_reloads_total{server="v",result="ok"}"#),
        2.0
    );
    assert_eq!(
        sample(&m, r#"host_reloads_total{server="hello",result="ok"}"#),
        1.0
    );
    let info = m
        .lines()
        .find(|l| l.starts_with(r#"host_server_info{server="v","#))
        .unwrap();
    assert!(info.ends_with(r#",generation="2"} 1"#), "{info}");
    let v = admin.get("admin", "/health/servers/v").json();
    assert_eq!(v["generation"], 2);
    assert_eq!(v["last_reload"]["result"], "failed");
    assert!(v["last_reload"]["error"]
        .as_str()
        .unwrap()
        .contains("variant init-fail refuses to start"));
    assert_eq!(host.get("v.localhost", "/").body, "b x");
    // The requests of this part were counted too: 1 or more for the wait, exactly.
    let after = sample(
        &scrape(&admin),
        r#"host_http_requests_total{server="v",tenant="",class="2xx"}"#,
    );
    assert!(after > 24.0);
}

#[test]
fn a_configured_token_is_required_on_every_admin_path() {
    let host = hello_with_admin_token("ops-token", "OPS_TOKEN", "s3cret-token");
    let admin = host.admin();
    for path in [
        "/health/live",
        "/metrics",
        "/health/servers/nope",
        "/nowhere",
    ] {
        let none = admin.get("admin", path);
        assert_eq!(none.status, 401, "{path}");
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        assert!(none.json()["error"].as_str().unwrap().contains("token"));
        let wrong = admin.send(
            "GET",
            "admin",
            path,
            b"",
            &[("authorization", "Bearer s3cret-tokem")],
        );
        assert_eq!(wrong.status, 401, "{path}");
    }
    let right = [("authorization", "Bearer s3cret-token")];
    assert_eq!(
        admin
            .send("GET", "admin", "/health/live", b"", &right)
            .status,
        200
    );
    assert_eq!(
        admin.send("GET", "admin", "/metrics", b"", &right).status,
        200
    );
    assert_eq!(
        admin
            .send("GET", "admin", "/health/servers/nope", b"", &right)
            .status,
        404
    );
    assert!(!host.logs().contains("s3cret-token"));
}

#[test]
fn metrics_off_counts_no_request_and_admin_off_listens_nowhere() {
    let config = r#"{"global": {"metrics": false},
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let host = Setup::new("ops-metrics-off", config)
        .plugin("hello", "hello.so")
        .start();
    for _ in 0..3 {
        assert_eq!(host.get("hello.localhost", "/plain").status, 200);
    }
    let m = scrape(&host.admin());
    assert_eq!(
        sample(
            &m,
            r#"host_http_requests_total{server="hello",tenant="",class="2xx"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(&m, r#"host_reloads_total{server="hello",result="ok"}"#),
        1.0
    );

    let config = r#"{"global": {"admin": null},
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    // Without the harness's --admin flag: as the config says.
    let host = Setup::new("ops-admin-off", config)
        .plugin("hello", "hello.so")
        .admin_as_configured()
        .start();
    assert_eq!(host.get("hello.localhost", "/plain").status, 200);
    assert!(!host.logs().contains("admin listening"));
}

#[test]
fn bad_admin_settings_are_refused_naming_the_key() {
    let cases = [
        (
            r#"{"admin": {"listen": "localhost"}}"#,
            "global.admin.listen",
        ),
        (
            r#"{"admin": {"listen": "127.0.0.1:0", "port": 1}}"#,
            "global.admin",
        ),
        (
            r#"{"admin": {"token_env": "OPS_UNSET_TOKEN"}}"#,
            "global.admin.token_env",
        ),
        (r#"{"admin": 7778}"#, "global.admin"),
        (r#"{"health_path": "healthz"}"#, "global.health_path"),
        (r#"{"metrics": "yes"}"#, "global.metrics"),
    ];
    for (global, path) in cases {
        let config = format!(r#"{{"global": {global}, "servers": []}}"#);
        let out = Setup::new("ops-bad-config", &config).run(&["--check"]);
        assert_eq!(out.status.code(), Some(2), "{global}: {}", out.stderr);
        assert!(out.stderr.contains(path), "{global}: {}", out.stderr);
    }
    let out = Setup::new("ops-bad-flag", r#"{"servers": []}"#)
        .admin_as_configured()
        .run(&["--admin", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("--admin"), "{}", out.stderr);
}

#[test]
fn panics_timeouts_and_rate_limit_refusals_are_counted_by_server() {
    let config = r#"{"global": {"limits": {"request_timeout_ms": 300}},
      "servers": [
        {"name": "bad", "domains": ["bad.localhost"], "plugin": "misbehave"},
        {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello",
         "rate_limit": {"per_second": 0.1, "burst": 2}}
      ]}"#;
    let host = Setup::new("ops-failures", config)
        .plugin("fixture-misbehave", "misbehave.so")
        .plugin("hello", "hello.so")
        .start();
    for path in ["/panic", "/panic-later", "/panic"] {
        assert_eq!(host.get("bad.localhost", path).status, 500, "{path}");
    }
    for _ in 0..2 {
        assert_eq!(host.get("bad.localhost", "/hang").status, 504);
    }
    // A burst of 2, then one request every 10 s: of 5 at once, 3 are refused.
    let statuses: Vec<u16> = (0..5)
        .map(|_| host.get("hello.localhost", "/plain").status)
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429, 429]);

    let m = scrape(&host.admin());
    let expected = [
        (r#"host_plugin_panics_total{server="bad"}"#, 3.0),
        (r#"host_http_timeouts_total{server="bad"}"#, 2.0),
        (
            r#"host_http_requests_total{server="bad",tenant="",class="5xx"}"#,
            5.0,
        ),
        (r#"host_rate_limited_total{server="hello"}"#, 3.0),
        (r#"host_rate_limited_total{server="bad"}"#, 0.0),
        (
            r#"host_http_requests_total{server="hello",tenant="",class="4xx"}"#,
            3.0,
        ),
        (r#"host_plugin_panics_total{server="hello"}"#, 0.0),
    ];
    check(&m, &expected);
}

#[test]
fn websocket_connections_and_messages_are_counted_by_server() {
    use tungstenite::Message;
    let config = r#"{"servers": [
        {"name": "sockets", "domains": ["sockets.localhost"], "plugin": "sockets"}]}"#;
    let host = Setup::new("ops-websockets", config)
        .plugin("fixture-sockets", "sockets.so")
        .start();
    let admin = host.admin();
    let (mut ws, response) = host.websocket("ws://sockets.localhost/ws").unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("m{i}"))).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Text(t) => {
                    assert_eq!(t.as_str(), format!("v1:m{i}"));
                    break;
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    }
    // The upgrade was one response, of class 1xx.
    check(
        &scrape(&admin),
        &[
            (r#"host_websocket_connections{server="sockets"}"#, 1.0),
            (
                r#"host_websocket_messages_total{server="sockets",direction="in"}"#,
                3.0,
            ),
            (
                r#"host_websocket_messages_total{server="sockets",direction="out"}"#,
                3.0,
            ),
            (
                r#"host_http_requests_total{server="sockets",tenant="",class="1xx"}"#,
                1.0,
            ),
        ],
    );
    let server = admin.get("admin", "/health/servers/sockets").json();
    assert_eq!(server["websocket_connections"], 1);
    assert_eq!(
        admin.get("admin", "/health/system").json()["websocket_connections"],
        1
    );
    drop(ws);
    host.wait_until("the connection is gone", || {
        sample(
            &scrape(&admin),
            r#"host_websocket_connections{server="sockets"}"#,
        ) == 0.0
    });
}

#[test]
fn an_admin_address_in_use_stops_the_host_only_when_written_out() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = format!(
        r#"{{"global": {{"admin": {{"listen": "{addr}"}}}},
        "servers": [{{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}}]}}"#
    );
    let out = Setup::new("ops-admin-taken", &config)
        .plugin("hello", "hello.so")
        .admin_as_configured()
        .run(&["--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("global.admin.listen: cannot listen on {addr}")),
        "{}",
        out.stderr
    );

    // The default address: held here (or by someone else already), the host starts
    // without its admin listener and says so.
    let _held = std::net::TcpListener::bind("127.0.0.1:7778");
    let config =
        r#"{"servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let host = Setup::new("ops-admin-default-taken", config)
        .plugin("hello", "hello.so")
        .admin_as_configured()
        .start();
    assert_eq!(host.get("hello.localhost", "/plain").status, 200);
    host.wait_for_log(&["the admin listener is off: cannot listen on 127.0.0.1:7778"]);
}

/// `bad` runs the misbehave fixture, whose health hook `/health/{ok|fail|panic|hang}`
/// steers; `old` the same fixture built as plugin-api 0.6.0 built plugins (no health
/// field in its root module); `hello` one that leaves the hook at its default.
const HEALTH_CONFIG: &str = r#"{"servers": [
    {"name": "bad", "domains": ["bad.localhost"], "plugin": "bad"},
    {"name": "old", "domains": ["old.localhost"], "plugin": "old"},
    {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;

/// `/health/ready`'s status and its `not_ready` list as (name, reason) pairs.
fn readiness(admin: &Client) -> (u16, Vec<(String, String)>) {
    let r = admin.get("admin", "/health/ready");
    let pair = |s: &Value| {
        let text = |key: &str| s[key].as_str().unwrap().to_owned();
        (text("name"), text("reason"))
    };
    let list = r.json()["not_ready"]
        .as_array()
        .map(|l| l.iter().map(pair).collect())
        .unwrap_or_default();
    (r.status, list)
}

/// The misbehave fixture built with plugin-api 0.6.0's root module (in a target folder
/// of its own: the flag rebuilds everything).
fn built_as_0_6_0() -> std::path::PathBuf {
    crate::support::build_variant(
        "fixture-misbehave",
        ("RUSTFLAGS", "--cfg plugin_api_0_6_0_layout"),
        Some("api-0.6.0-target"),
    )
}

#[test]
fn a_plugin_health_hook_counts_in_ready_and_shows_per_server() {
    let setup = Setup::new("ops-plugin-health", HEALTH_CONFIG)
        .plugin("fixture-misbehave", "bad.so")
        .plugin("hello", "hello.so");
    std::fs::copy(built_as_0_6_0(), setup.dir.join("plugins/old.so")).unwrap();
    let host = setup.start();
    let admin = host.admin();
    let set = |server: &str, mode: &str| {
        let r = host.get(&format!("{server}.localhost"), &format!("/health/{mode}"));
        assert_eq!((r.status, r.body), (200, format!("health: {mode}")));
    };
    let healthy = serde_json::json!({"ok": true});

    // A library built against 0.6.0 loads and serves; it and the others are healthy.
    assert_eq!(host.get("old.localhost", "/ok").body, "ok");
    assert_eq!(readiness(&admin), (200, vec![]));
    let all = admin.get("admin", "/health/servers").json();
    for s in all["servers"].as_array().unwrap() {
        assert_eq!(s["health"], healthy, "{s}");
    }
    let old = admin.get("admin", "/health/servers/old").json();
    assert_eq!(old["plugin"]["api_version"], "0.6.0");

    // The hook reports an error: not ready, naming the server and the plugin's reason.
    // The 0.6.0 build's hook says the same, but the host has no way to ask it.
    set("bad", "fail");
    set("old", "fail");
    let reason = "the database at db.invalid does not answer";
    let unhealthy = |reason: &str| {
        (
            "bad".to_owned(),
            format!("its plugin is unhealthy: {reason}"),
        )
    };
    assert_eq!(readiness(&admin), (503, vec![unhealthy(reason)]));
    let bad = admin.get("admin", "/health/servers/bad").json();
    let failed = serde_json::json!({"ok": false, "reason": reason});
    assert_eq!(
        (&bad["state"], &bad["health"]),
        (&"serving".into(), &failed)
    );
    assert_eq!(
        admin.get("admin", "/api/servers/bad").json()["health"],
        failed
    );
    assert_eq!(
        admin.get("admin", "/health/servers/old").json()["health"],
        healthy
    );
    check(
        &scrape(&admin),
        &[
            (r#"host_server_ready{server="bad"}"#, 0.0),
            (r#"host_server_ready{server="old"}"#, 1.0),
            (r#"host_server_ready{server="hello"}"#, 1.0),
        ],
    );
    // Requests are not affected: the hook is asked only by the health endpoints.
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");

    set("bad", "ok");
    assert_eq!(readiness(&admin), (200, vec![]));
    check(
        &scrape(&admin),
        &[(r#"host_server_ready{server="bad"}"#, 1.0)],
    );

    // A hook that panics is unhealthy with the panic's message; the host stays up.
    set("bad", "panic");
    let (status, list) = readiness(&admin);
    assert_eq!((status, list.len(), list[0].0.as_str()), (503, 1, "bad"));
    let panicked = "its plugin is unhealthy: the health hook panicked: the health hook exploded";
    assert!(list[0].1.starts_with(panicked), "{}", list[0].1);

    // A hook that blocks past the timeout is unhealthy, and the host answers meanwhile.
    set("bad", "hang");
    let late = "the health hook did not answer within 1000 ms";
    assert_eq!(readiness(&admin), (503, vec![unhealthy(late)]));
    assert_eq!(host.get("bad.localhost", "/ok").body, "ok");
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    // Once the blocked call has returned, the next one asks the hook again.
    set("bad", "ok");
    host.wait_until("ready again", || readiness(&admin).0 == 200);
    assert_eq!(
        admin.get("admin", "/health/servers/bad").json()["health"],
        healthy
    );
}

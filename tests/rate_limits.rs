//! Tenants and rate limits against the real host: a limit's exactness under continuous
//! load, per client IP (from 127.0.0.1 and 127.0.0.2), per tenant (two servers, and
//! subdomains), per server, the 429 itself, the tenant a plugin reads, and config
//! changes that keep or replace a limit's counts.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::{Host, Reply, Setup};

const ONE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const TWO: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A host with the misbehave fixture (its `/ok`, `/seen/...`, `POST /len`) behind the
/// servers `servers` lists (JSON, `plugin` filled in), and the `tenants` given.
fn host(label: &str, global: &str, tenants: &str, servers: &str) -> Host {
    Setup::new(label, &config(global, tenants, servers))
        .plugin("fixture-misbehave", "misbehave.so")
        .plugin("fixture-sockets", "sockets.so")
        .start()
}

fn config(global: &str, tenants: &str, servers: &str) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20}}, "connections": {{"max_per_ip": 0}} {global}}},
            "tenants": [{tenants}],
            "servers": [{servers}]}}"#
    )
}

/// The server `limited` (`limited.localhost`, misbehave) with this `rate_limit`.
fn limited(rate_limit: &str) -> String {
    format!(
        r#"{{"name": "limited", "domains": ["limited.localhost"], "plugin": "misbehave",
             "rate_limit": {rate_limit}}}"#
    )
}

/// The statuses of `n` GETs of `path` at `domain` from `from`.
fn statuses(host: &Host, from: IpAddr, domain: &str, path: &str, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| host.get_from(from, domain, path).status)
        .collect()
}

#[test]
fn a_limit_holds_within_five_percent_under_continuous_load() {
    let (per_second, burst) = (50.0, 10.0);
    let host = host(
        "rate-exact",
        "",
        "",
        &limited(r#"{"per_second": 50, "burst": 10}"#),
    );
    // Four keep-alive clients ask as fast as they can for 3 s: far more than 50/s.
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let ok = AtomicUsize::new(0);
    let answered = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                // Answered 200 or 429; anything else is a failure.
                let counted = |r: &Reply| {
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    r.status == 200 || r.status == 429
                };
                let n = host.ask_until("limited.localhost", "/ok", counted, &stop, &failures);
                answered.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = started.elapsed().as_secs_f64();
    let ok = ok.into_inner();
    let limited = answered.into_inner() - ok;
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let expected = burst + per_second * elapsed;
    let off = (ok as f64 - expected).abs() / expected;
    println!(
        "rate limit 50/s, burst 10, over {elapsed:.3} s: {ok} answered 200 (expected {expected:.1}, {:.2}% off), {limited} refused with 429",
        off * 100.0
    );
    assert!(
        limited > ok,
        "the clients must ask faster than the limit: {ok} ok, {limited} refused"
    );
    assert!(off <= 0.05, "{ok} passed, expected {expected:.1}");
}

#[test]
fn each_client_ip_has_its_own_budget() {
    let host = host(
        "rate-ip",
        "",
        "",
        &limited(r#"{"per_second": 0.01, "burst": 3, "per": "client_ip"}"#),
    );
    assert_eq!(
        statuses(&host, ONE, "limited.localhost", "/ok", 4),
        [200, 200, 200, 429]
    );
    assert_eq!(
        statuses(&host, TWO, "limited.localhost", "/ok", 4),
        [200, 200, 200, 429]
    );
    assert_eq!(statuses(&host, ONE, "limited.localhost", "/ok", 1), [429]);
}

#[test]
fn a_server_limit_is_shared_by_every_client_and_spares_service_calls() {
    let host = host(
        "rate-server",
        "",
        "",
        &format!(
            r#"{}, {{"name": "sockets", "domains": ["sockets.localhost"], "plugin": "sockets"}}"#,
            limited(r#"{"per_second": 0.01, "burst": 2}"#)
        ),
    );
    assert_eq!(statuses(&host, ONE, "limited.localhost", "/ok", 1), [200]);
    assert_eq!(
        statuses(&host, TWO, "limited.localhost", "/ok", 2),
        [200, 429]
    );
    assert_eq!(statuses(&host, ONE, "limited.localhost", "/ok", 1), [429]);
    // Another server's plugin calling it by name is not a client: not limited.
    for _ in 0..3 {
        let r = host.get("sockets.localhost", "/call/limited/ok");
        assert_eq!(r.body, "200 ok");
    }
}

#[test]
fn over_a_limit_is_429_with_retry_after_and_a_json_body_whatever_the_request() {
    let host = host(
        "rate-429",
        "",
        "",
        &format!(
            r#"{}, {{"name": "uploads", "domains": ["uploads.localhost"], "plugin": "misbehave",
            "rate_limit": {{"per_second": 0.01, "burst": 2}}}},
           {{"name": "sockets", "domains": ["sockets.localhost"], "plugin": "sockets",
            "rate_limit": {{"per_second": 0.01, "burst": 1}}}}"#,
            limited(r#"{"per_second": 0.5, "burst": 1}"#)
        ),
    );
    assert_eq!(host.get("limited.localhost", "/ok").status, 200);
    let r = host.get("limited.localhost", "/ok");
    assert_eq!(r.status, 429, "{}", r.body);
    // 2 s to the next request at 0.5/s.
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id").map(str::len), Some(16));
    let body = r.json();
    assert_eq!(body["retry_after_s"], 2);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("rate limit of server \"limited\" (0.5/s, burst 1)"),
        "{error}"
    );
    // One line, with counts, for however many refusals in 10 s.
    for _ in 0..5 {
        assert_eq!(host.get("limited.localhost", "/ok").status, 429);
    }
    host.wait_for_log(&[
        "requests refused with 429",
        "server=\"limited\"",
        "refused=1",
    ]);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(host.count_log_lines(&["requests refused with 429"]), 1);

    // A request with a body is counted once, before its body is read.
    let post = |n: usize| {
        host.send("POST", "uploads.localhost", "/len", &vec![b'x'; n], &[])
            .status
    };
    assert_eq!((post(10), post(20_000)), (200, 200));
    assert_eq!(post(5), 429);

    // A WebSocket upgrade counts too.
    let (_ws, response) = host.websocket("ws://sockets.localhost/ws").unwrap();
    assert_eq!(response.status(), 101);
    match host.websocket("ws://sockets.localhost/ws") {
        Err(tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            assert!(r.headers().contains_key("retry-after"));
        }
        other => panic!("expected a 429, got {other:?}"),
    }
}

/// The `x-tenant=...` line of misbehave's `/seen`, and its `header x-tenant` lines.
fn tenant_seen(r: &Reply) -> (String, Vec<String>) {
    assert_eq!(r.status, 200, "{}", r.body);
    let line = r
        .body
        .lines()
        .find_map(|l| l.strip_prefix("x-tenant="))
        .expect("an x-tenant line")
        .to_owned();
    let headers = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("header x-tenant="))
        .map(str::to_owned)
        .collect();
    (line, headers)
}

#[test]
fn a_tenant_s_servers_share_its_limit_and_its_plugins_read_the_tenant() {
    let host = host(
        "rate-tenant",
        "",
        r#"{"id": "acme", "rate_limit": {"per_second": 0.01, "burst": 4}}"#,
        r#"{"name": "a", "domains": ["a.localhost"], "plugin": "misbehave", "tenant": "acme"},
           {"name": "b", "domains": ["b.localhost"], "plugin": "misbehave", "tenant": "acme"},
           {"name": "other", "domains": ["other.localhost"], "plugin": "misbehave"}"#,
    );
    // The tenant is the host's to say: a client's own x-tenant is not what the plugin
    // reads, on a tenant's server or any other.
    let forged = [("x-tenant", "globex")];
    let r = host.send("GET", "a.localhost", "/seen/1/2", b"", &forged);
    assert_eq!(
        tenant_seen(&r),
        ("Some(\"acme\")".to_owned(), vec!["acme".to_owned()])
    );
    let r = host.send("GET", "other.localhost", "/seen/1/2", b"", &forged);
    assert_eq!(tenant_seen(&r), ("None".to_owned(), vec![]));

    // a and b share acme's 4 (one used above).
    assert_eq!(statuses(&host, ONE, "b.localhost", "/ok", 2), [200, 200]);
    assert_eq!(statuses(&host, TWO, "a.localhost", "/ok", 2), [200, 429]);
    assert_eq!(statuses(&host, ONE, "b.localhost", "/ok", 1), [429]);
    assert_eq!(statuses(&host, ONE, "other.localhost", "/ok", 3), [200; 3]);
}

#[test]
fn a_subdomain_names_the_tenant_and_each_has_its_own_budget() {
    let host = host(
        "rate-subdomain",
        "",
        r#"{"id": "acme", "rate_limit": {"per_second": 0.01, "burst": 1}}"#,
        r#"{"name": "app", "domains": ["app.localhost", "*.app.localhost"], "plugin": "misbehave",
            "tenant_from_subdomain": "app.localhost",
            "rate_limit": {"per_second": 0.01, "burst": 2, "per": "tenant"}}"#,
    );
    let r = host.send(
        "GET",
        "Shop.App.Localhost:80",
        "/seen/1/2",
        b"",
        &[("x-tenant", "acme")],
    );
    assert_eq!(
        tenant_seen(&r),
        ("Some(\"shop\")".to_owned(), vec!["shop".to_owned()])
    );
    // Below the tenant's own name, still the tenant: shop's second (and last) request.
    let r = host.get("www.shop.app.localhost", "/seen/1/2");
    assert_eq!(tenant_seen(&r).0, "Some(\"shop\")");
    assert_eq!(statuses(&host, ONE, "shop.app.localhost", "/ok", 1), [429]);
    assert_eq!(
        statuses(&host, TWO, "books.app.localhost", "/ok", 3),
        [200, 200, 429]
    );
    // acme is listed, with a tighter limit of its own.
    assert_eq!(
        statuses(&host, ONE, "acme.app.localhost", "/ok", 2),
        [200, 429]
    );
    // The bare name has no tenant; such requests share one budget of the server's.
    let r = host.get("app.localhost", "/seen/1/2");
    assert_eq!(tenant_seen(&r), ("None".to_owned(), vec![]));
    assert_eq!(statuses(&host, ONE, "app.localhost", "/ok", 2), [200, 429]);
}

#[test]
fn a_config_change_keeps_the_counts_of_the_limits_it_keeps_and_applies_new_ones() {
    let limited = |burst: u32| limited(&format!(r#"{{"per_second": 0.01, "burst": {burst}}}"#));
    let ip = r#", "rate_limit": {"per_second": 0.01, "burst": 3}"#;
    let host = host("rate-reload", ip, "", &limited(2));
    assert_eq!(
        statuses(&host, ONE, "limited.localhost", "/ok", 3),
        [200, 200, 429]
    );

    // Something else changes: a new server. The limits stay as they were, counts and
    // all (127.0.0.1 has used all 3 of its per-IP budget too).
    let other = r#"{"name": "other", "domains": ["other.localhost"], "plugin": "misbehave"}"#;
    host.write_config(&config(ip, "", &format!("{},{other}", limited(2))));
    host.wait_until("the new server answers", || {
        host.get_from(TWO, "other.localhost", "/ok").status == 200
    });
    assert_eq!(statuses(&host, TWO, "limited.localhost", "/ok", 1), [429]);
    assert_eq!(statuses(&host, ONE, "other.localhost", "/ok", 1), [429]);

    // The limit itself changes, and the per-IP one goes: a new budget of 5, from now on
    // (the first of it taken by the request that sees the change).
    host.write_config(&config("", "", &format!("{},{other}", limited(5))));
    host.wait_until("the new limit applies", || {
        host.get_from(TWO, "limited.localhost", "/ok").status == 200
    });
    assert_eq!(
        statuses(&host, ONE, "limited.localhost", "/ok", 5),
        [200, 200, 200, 200, 429]
    );
}

/// Keyed limiters forget the clients whose budget is full again, every 10 s, so
/// memory follows the recent clients, not every client ever seen.
#[test]
fn idle_clients_are_forgotten() {
    let servers = &limited(r#"{"per_second": 20, "burst": 1, "per": "client_ip"}"#);
    let host = Setup::new("rate-forget", &config("", "", servers))
        .plugin("fixture-misbehave", "misbehave.so")
        .env("RUST_LOG", "info,host::request::rate_limits=debug")
        .start();
    for i in 1..=20 {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
        assert_eq!(
            statuses(&host, from, "limited.localhost", "/ok", 2),
            [200, 429]
        );
    }
    // Each sweep logs what it forgot and what is left; in all, the 20 clients.
    let field = |line: &str, name: &str| -> usize {
        let value = line.split(&format!(" {name}=")).nth(1).unwrap_or("0");
        value.split(' ').next().unwrap_or("0").parse().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let logs = host.logs();
        let sweeps: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("forgot idle keys"))
            .collect();
        let forgot: usize = sweeps.iter().map(|l| field(l, "forgot")).sum();
        if forgot == 20 {
            assert_eq!(field(sweeps.last().unwrap(), "keys"), 0, "{logs}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forgot {forgot} of 20 keys:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A forgotten client starts afresh.
    assert_eq!(
        statuses(&host, ONE, "limited.localhost", "/ok", 2),
        [200, 429]
    );
}

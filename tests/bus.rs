//! The event bus and service calls between microservers, across reloads and with every
//! failure kind. Two servers run the sockets fixture (`a` and `b`, from files of their
//! own so each reloads alone); each announces the bus events it gets to its WebSocket
//! clients, which is how the tests see them.

use tungstenite::Message;

use crate::support::{build_variant, Host, Setup, Ws};

fn config(extra_global: &str) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20, "drain_timeout_ms": 2000}}{extra_global}}},
      "servers": [{{"name": "a", "domains": ["a.localhost"], "plugin": "a"}},
                  {{"name": "b", "domains": ["b.localhost"], "plugin": "b"}},
                  {{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}},
                  {{"name": "misbehave", "domains": ["misbehave.localhost"], "plugin": "misbehave"}},
                  {{"name": "gone", "domains": ["gone.localhost"], "plugin": "gone"}}]}}"#
    )
}

fn host(label: &str, extra_global: &str) -> Host {
    Setup::new(label, &config(extra_global))
        .plugin("fixture-sockets", "a.so")
        .plugin("fixture-sockets", "b.so")
        .plugin("hello", "hello.so")
        .plugin("fixture-misbehave", "misbehave.so")
        .start()
}

fn listen(host: &Host, server: &str) -> Ws {
    host.websocket(&format!("ws://{server}.localhost/ws"))
        .unwrap()
        .0
}

/// The next bus event a listener hears of: `(variant, payload)`.
fn next_event(ws: &mut Ws) -> (String, String) {
    loop {
        match ws.read().expect("an event") {
            Message::Text(t) => {
                if let Some(rest) = t.as_str().strip_prefix("event:") {
                    let (variant, payload) = rest.split_once(':').unwrap();
                    return (variant.to_owned(), payload.to_owned());
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Publishes `payload` to `fixture.events` from server `from`; how many servers took it.
pub(crate) fn publish(host: &Host, from: &str, payload: &str) -> String {
    let reply = host.send(
        "POST",
        &format!("{from}.localhost"),
        "/publish/fixture.events",
        payload.as_bytes(),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

#[test]
fn events_reach_every_subscriber_once_in_order_across_reloads() {
    let v2 = build_variant("fixture-sockets", ("FIXTURE_VARIANT", "v2"), Some("bus-v2"));
    let v1 = build_variant("fixture-sockets", ("FIXTURE_VARIANT", "v1"), Some("bus-v1"));
    let host = host("bus-order", "");
    let mut at_a = listen(&host, "a");
    let mut at_b = listen(&host, "b");
    // Both servers subscribe, the publisher included.
    assert_eq!(publish(&host, "a", "first"), "2");
    assert_eq!(next_event(&mut at_a), ("v1".into(), "first".into()));
    assert_eq!(next_event(&mut at_b), ("v1".into(), "first".into()));
    // A topic nobody subscribes to reaches nobody.
    let none = host.send("POST", "a.localhost", "/publish/other", b"x", &[]);
    assert_eq!(none.body, "0");

    // 90 events from `a` while `b` is reloaded three times (and `a` once): each new
    // build is installed, events keep coming while it loads, and the swap is waited for
    // ten events later.
    let mut reloads = 0;
    for n in 1..=90 {
        if n % 20 == 0 {
            reloads += 1;
            let lib = if reloads % 2 == 1 { &v2 } else { &v1 };
            host.install(lib, "b.so");
            if reloads == 2 {
                host.install(&v2, "a.so");
            }
        }
        if n % 20 == 10 && reloads > 0 {
            host.wait_for_log(&["server=b", &format!("generation={}", reloads + 1)]);
            if reloads == 2 {
                host.wait_for_log(&["server=a", "generation=2"]);
            }
        }
        publish(&host, "a", &n.to_string());
    }
    for (ws, name) in [(&mut at_b, "b"), (&mut at_a, "a")] {
        let mut variants = std::collections::BTreeSet::new();
        for n in 1..=90 {
            let (variant, payload) = next_event(ws);
            assert_eq!(
                payload,
                n.to_string(),
                "{name}: lost, repeated or reordered"
            );
            variants.insert(variant);
        }
        assert!(
            variants.contains("v2"),
            "{name} never ran the new build: {variants:?}"
        );
    }
}

#[test]
fn a_full_queue_drops_events_counts_and_logs_them_and_never_holds_up_the_publisher() {
    let host = host("bus-full", r#", "bus": {"queue": 4}"#);
    let mut at_b = listen(&host, "b");
    // `b` (and `a`) spend 3 s on the first event; meanwhile 12 more are published.
    assert_eq!(publish(&host, "a", "slow:3000"), "2");
    // Each server's queue takes what fits: 2, 1 (one server's task took the slow
    // event out of its queue a little later than the other's) or 0 servers.
    let started = std::time::Instant::now();
    for n in 1..=12 {
        let took = publish(&host, "a", &n.to_string());
        assert!(["0", "1", "2"].contains(&took.as_str()), "{took}");
    }
    // All 12 were answered before the slow handler finished: the publisher never waits.
    assert!(started.elapsed() < std::time::Duration::from_millis(2500));
    assert_eq!(next_event(&mut at_b).1, "slow:3000");
    // `b` then gets what its queue of 4 held, in order, and nothing else.
    publish(&host, "a", "later");
    let mut got = Vec::new();
    loop {
        let (_, payload) = next_event(&mut at_b);
        if payload == "later" {
            break;
        }
        got.push(payload.parse::<u32>().expect("a number"));
    }
    assert!((3..=4).contains(&got.len()), "a queue of 4 took {got:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "reordered: {got:?}");
    host.wait_for_log(&["server=b", "bus events dropped", "capacity=4"]);

    // A handler that panics is logged; the next event is handled.
    publish(&host, "a", "panic");
    publish(&host, "a", "after the panic");
    assert_eq!(next_event(&mut at_b).1, "after the panic");
    host.wait_for_log(&["server=b", "the fixture panics on an event"]);
}

#[test]
fn service_calls_reach_the_current_generation_and_every_failure_is_a_response() {
    let v2 = build_variant(
        "fixture-sockets",
        ("FIXTURE_VARIANT", "v2"),
        Some("call-v2"),
    );
    let host = host("bus-calls", r#", "limits": {"request_timeout_ms": 1000}"#);
    let call = |path: &str| host.get("a.localhost", &format!("/call/{path}")).body;
    assert_eq!(call("hello/hello/you"), "200 Hello, you!\n");
    let _listener = listen(&host, "b");
    assert_eq!(call("b/count"), "200 1");
    // Every failure is an error response, never a panic in the caller.
    let missing = call("nobody/x");
    assert!(
        missing.starts_with("503 ") && missing.contains("no microserver is named \\\"nobody\\\""),
        "{missing}"
    );
    let waiting = call("gone/x");
    assert!(
        waiting.starts_with("503 ") && waiting.contains("not available"),
        "{waiting}"
    );
    let panicked = call("misbehave/panic");
    assert!(
        panicked.starts_with("500 ") && panicked.contains("request_id"),
        "{panicked}"
    );
    let slow = call("misbehave/hang?timeout_ms=300");
    assert!(
        slow.starts_with("504 ") && slow.contains("within 300 ms"),
        "{slow}"
    );
    let no_route = call("b/nowhere");
    assert!(no_route.starts_with("404 "), "{no_route}");
    // The target of a call is reloaded: calls keep being answered, by the new build.
    host.install(&v2, "b.so");
    host.wait_for_log(&["server=b", "generation=2", "reloaded"]);
    assert_eq!(call("b/count"), "200 1", "the connection stayed open too");
    host.wait_for_log(&["server=misbehave", "plugin=fixture-misbehave", "panic"]);
}

//! The `chat` example: rooms over WebSockets, its history handed over across a reload,
//! and its page driven in headless Chromium (Debian package `chromium`; `.ci/run`
//! installs it).

use std::net::TcpStream;

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

use crate::support::browser::Browser;
use crate::support::{Host, Setup, Ws};

fn config(history: u64) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20}}}},
      "servers": [{{"name": "chat", "domains": ["chat.localhost"], "plugin": "chat",
                   "config": {{"history": {history}}}}}]}}"#
    )
}

fn join(host: &Host, room: &str, nick: &str) -> Ws {
    let url = format!("ws://chat.localhost/ws?room={room}&nick={nick}");
    let (ws, _) = host
        .websocket(&url)
        .unwrap_or_else(|e| panic!("joining {room} as {nick}: {e}"));
    ws
}

/// The next event (JSON).
fn event(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("an event") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The next event of `kind`, skipping others.
fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let e = event(ws);
        if e["type"] == kind {
            return e;
        }
    }
}

#[test]
fn rooms_history_and_a_reload_that_keeps_everyone_connected() {
    let host = Setup::new("chat", &config(3))
        .plugin("chat", "chat.so")
        .start();
    let mut ada = join(&host, "lobby", "ada");
    assert_eq!(event(&mut ada)["type"], "history");
    assert_eq!(next_of(&mut ada, "joined")["nick"], "ada");
    let mut bob = join(&host, "lobby", "bob");
    assert_eq!(event(&mut bob)["messages"], json!([]));
    assert_eq!(next_of(&mut ada, "joined")["nick"], "bob");
    let mut eve = join(&host, "elsewhere", "eve");

    ada.send(Message::text("hello bob")).unwrap();
    for ws in [&mut ada, &mut bob] {
        let said = next_of(ws, "message");
        assert_eq!(
            (said["nick"].as_str(), said["text"].as_str()),
            (Some("ada"), Some("hello bob"))
        );
        assert_eq!(said["room"], "lobby");
    }
    // A message too long, or empty, is refused to its sender only.
    bob.send(Message::text("x".repeat(2001))).unwrap();
    assert!(next_of(&mut bob, "error")["error"]
        .as_str()
        .unwrap()
        .contains("2000"));
    // Joining without a nickname: 400 before any connection opens.
    let stream = TcpStream::connect(host.addr).unwrap();
    match tungstenite::client(
        "ws://chat.localhost/ws?room=lobby"
            .into_client_request()
            .unwrap(),
        stream,
    ) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 400)
        }
        other => panic!("expected a 400, got {:?}", other.map(|_| "a connection")),
    }

    for n in 1..=4 {
        bob.send(Message::text(format!("line {n}"))).unwrap();
        next_of(&mut bob, "message");
        next_of(&mut ada, "message");
    }
    // The last 3 are kept.
    let history = host.get("chat.localhost", "/rooms/lobby/history").json();
    let texts: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["line 2", "line 3", "line 4"]);

    // A new config is a new generation: the history is handed over, and everyone stays
    // connected with their nickname and room.
    host.write_config(&config(5));
    host.wait_for_log(&["server=chat", "generation=2", "reloaded"]);
    let history = host.get("chat.localhost", "/rooms/lobby/history").json();
    assert_eq!(history.as_array().unwrap().len(), 3, "{history}");
    bob.send(Message::text("after the reload")).unwrap();
    for ws in [&mut ada, &mut bob] {
        let said = next_of(ws, "message");
        assert_eq!(
            (said["nick"].as_str(), said["text"].as_str()),
            (Some("bob"), Some("after the reload"))
        );
    }
    let history = host.get("chat.localhost", "/rooms/lobby/history").json();
    assert_eq!(
        history.as_array().unwrap().len(),
        4,
        "now 5 are kept: {history}"
    );
    // A newcomer gets the history, and leaving is announced.
    let mut cat = join(&host, "lobby", "cat");
    let got = event(&mut cat);
    assert_eq!(got["messages"].as_array().unwrap().len(), 4, "{got}");
    drop(cat);
    assert_eq!(next_of(&mut ada, "left")["nick"], "cat");
    // Nothing of the lobby reached the other room.
    eve.send(Message::text("anyone?")).unwrap();
    let said = next_of(&mut eve, "message");
    assert_eq!(said["text"], "anyone?");
}

#[test]
fn the_chat_page_works_in_a_browser() {
    let host = Setup::new("chat-page", &config(50))
        .plugin("chat", "chat.so")
        .start();
    let mut other = join(&host, "lobby", "cli");
    next_of(&mut other, "joined");
    let url = format!("http://chat.localhost:{}/", host.addr.port());
    let mut browser = Browser::open(&url);
    browser.wait_for("the page", "document.getElementById('connect') !== null");
    browser.eval(
        "document.getElementById('room').value = 'lobby';
         document.getElementById('nick').value = 'page';
         document.getElementById('connect').click(); true",
    );
    browser.wait_for(
        "that it joined",
        "document.getElementById('state').textContent === 'in lobby as page'",
    );
    assert_eq!(next_of(&mut other, "joined")["nick"], "page");
    // A message sent from the page arrives at the other client...
    browser.eval(
        "document.getElementById('text').value = 'hello from the page';
         document.getElementById('say').requestSubmit(); true",
    );
    let said = next_of(&mut other, "message");
    assert_eq!(
        (said["nick"].as_str(), said["text"].as_str()),
        (Some("page"), Some("hello from the page"))
    );
    // ...and the other client's reaches the page.
    other.send(Message::text("hello, page")).unwrap();
    browser.wait_for(
        "the other client's message",
        "document.getElementById('log').textContent.includes('cli: hello, page')",
    );
}

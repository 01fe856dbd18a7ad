//! `chat`: rooms of people talking over WebSockets, with a page to do it from. Run it
//! with `cargo xtask build-plugins && cargo run -p host`, then open
//! <http://chat.localhost:7777/> in two browser windows.
//!
//! Routes:
//! - `GET /`: the page (plain HTML, CSS and JavaScript, served from the library).
//! - `GET /ws?room=ROOM&nick=NICK` (WebSocket): joins ROOM as NICK. The new member first
//!   gets `{"type":"history","room":..,"messages":[..]}` (the room's recent messages),
//!   then every event of the room: `{"type":"message","room":..,"nick":..,"text":..,
//!   "at":MS}` and `{"type":"joined"|"left","room":..,"nick":..,"at":MS}`. A text
//!   message the client sends is said in its room (at most `max_text` characters; a
//!   longer or empty one gets `{"type":"error","error":..}` back).
//! - `GET /rooms/{room}/history`: the room's recent messages as JSON.
//!
//! Config (all optional): `history` (default 50), the messages kept per room;
//! `max_text` (default 2000), the longest message in characters.
//!
//! Nicknames and rooms live in each connection's attachment, which the host keeps, so a
//! reload does not disturb anyone; the history is handed to the next build through
//! `export_state`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use plugin_api::{
    export_plugin, Close, Error, InitContext, Json, Message, Microserver, Request, Response,
    Routes, Socket, Sockets,
};
use serde::{Deserialize, Serialize};

const PAGE: &str = include_str!("page.html");

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    history: usize,
    max_text: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            history: 50,
            max_text: 2000,
        }
    }
}

/// A message said in a room.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Said {
    pub nick: String,
    pub text: String,
    pub at: u64,
}

/// Who a connection is: kept in its attachment (so in the host, across reloads).
#[derive(Serialize, Deserialize)]
struct Member {
    room: String,
    nick: String,
}

struct Chat {
    sockets: Sockets,
    config: Config,
    /// Recent messages per room, handed to the next build.
    history: Mutex<HashMap<String, VecDeque<Said>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A room or nickname: 1 to 32 characters, no control characters.
fn valid_name(what: &str, value: Option<std::borrow::Cow<'_, str>>) -> Result<String, Error> {
    let value = value.unwrap_or_default().trim().to_owned();
    if value.is_empty() || value.chars().count() > 32 || value.chars().any(char::is_control) {
        return Err(Error::bad_request(format!(
            "?{what}= must be 1 to 32 characters"
        )));
    }
    Ok(value)
}

impl Microserver for Chat {
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {
        let config: Config = ctx.config()?;
        let history = match ctx.previous_state() {
            Some(state) => serde_json::from_slice(state).unwrap_or_default(),
            None => HashMap::new(),
        };
        Ok(Chat {
            sockets: ctx.sockets(),
            config,
            history: Mutex::new(history),
        })
    }

    fn routes(routes: &mut Routes<Self>) {
        routes
            .get("/", Self::page)
            .get("/rooms/{room}/history", Self::room_history)
            .websocket("/ws", Self::join)
            .on_message(Self::message)
            .on_close(Self::left);
    }

    fn export_state(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(&*self.history.lock().unwrap_or_else(|p| p.into_inner())).ok()
    }
}

impl Chat {
    async fn page(self: Arc<Self>, _req: Request) -> Response {
        Response::new(200)
            .with_content_type("text/html; charset=utf-8")
            .with_body(PAGE)
    }

    fn recent(&self, room: &str) -> Vec<Said> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history
            .get(room)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    async fn room_history(self: Arc<Self>, req: Request) -> Json<Vec<Said>> {
        let room = req.param("room").unwrap_or_default();
        Json(self.recent(&room))
    }

    async fn join(self: Arc<Self>, req: Request, socket: Socket) -> Result<(), Error> {
        let room = valid_name("room", req.query_param("room"))?;
        let nick = valid_name("nick", req.query_param("nick"))?;
        let history = serde_json::json!({
            "type": "history", "room": room, "messages": self.recent(&room),
        });
        // Queued now, sent as soon as the connection opens, before anything else.
        socket.send(Message::json(&history)?).ok();
        socket.set_attachment(&Member {
            room: room.clone(),
            nick: nick.clone(),
        })?;
        socket.join(&room);
        let joined =
            serde_json::json!({"type": "joined", "room": room, "nick": nick, "at": now_ms()});
        self.sockets.broadcast(&room, Message::json(&joined)?);
        Ok(())
    }

    async fn message(self: Arc<Self>, socket: Socket, message: Message) {
        let Ok(Some(member)) = socket.attachment::<Member>() else {
            return;
        };
        let text = message.as_text().unwrap_or_default().trim();
        if text.is_empty() || text.chars().count() > self.config.max_text {
            let error = format!(
                "a message is 1 to {} characters of text",
                self.config.max_text
            );
            let _ = socket.send(serde_json::json!({"type": "error", "error": error}).to_string());
            return;
        }
        let said = Said {
            nick: member.nick,
            text: text.to_owned(),
            at: now_ms(),
        };
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            let room = history.entry(member.room.clone()).or_default();
            room.push_back(said.clone());
            while room.len() > self.config.history {
                room.pop_front();
            }
        }
        let event = serde_json::json!({
            "type": "message", "room": member.room, "nick": said.nick, "text": said.text, "at": said.at,
        });
        self.sockets.broadcast(&member.room, event.to_string());
    }

    async fn left(self: Arc<Self>, socket: Socket, _close: Close) {
        if let Ok(Some(member)) = socket.attachment::<Member>() {
            let left = serde_json::json!({"type": "left", "room": member.room, "nick": member.nick, "at": now_ms()});
            self.sockets.broadcast(&member.room, left.to_string());
        }
    }
}

export_plugin!(Chat);

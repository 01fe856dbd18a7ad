//! The admin API (`/api/...` on the admin listener): JSON to see the servers, their
//! reloads, the running config and their traffic, and to reload, enable, disable or
//! drain a server.
//!
//! A change runs on the blocking pool (it may wait for a plugin's init) and takes the
//! control lock there, like a file change (see `control::servers::steer`). Every change
//! asked for, made or not, is one line on the `host::audit` log target.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::admin::{json_error, json_reply, Reply};
use super::health::{self, rfc3339};
use super::recording::{self, BUCKETS};
use crate::control::config;
use crate::control::servers::{Microservers, Refusal, ReloadRecord, Steered};

/// What a `POST /api/servers/NAME/ACTION` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Reload,
    Enable,
    Disable,
    Drain,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "reload" => Action::Reload,
            "enable" => Action::Enable,
            "disable" => Action::Disable,
            "drain" => Action::Drain,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Action::Reload => "reload",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Drain => "drain",
        }
    }
}

/// The admin API's endpoints.
#[derive(Debug)]
pub struct Api {
    /// Where `persist=true` writes.
    config_file: PathBuf,
}

/// One request to the API: what [`Api::answer`] needs of it.
#[derive(Debug)]
pub struct Asked<'a> {
    pub method: &'a Method,
    /// The path's segments after `api`.
    pub segments: &'a [&'a str],
    pub query: Option<&'a str>,
    pub client: SocketAddr,
}

impl Api {
    pub fn new(config_file: PathBuf) -> Self {
        Api { config_file }
    }

    /// Answers a request under `/api/`.
    pub async fn answer(&self, servers: Arc<Microservers>, asked: Asked<'_>) -> Reply {
        let read = asked.method == Method::GET || asked.method == Method::HEAD;
        let post = asked.method == Method::POST;
        match (read, post, asked.segments) {
            (true, _, ["servers"]) => json_reply(StatusCode::OK, &list(&servers).await),
            (true, _, ["servers", name]) => match list(&servers).await["servers"]
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == *name))
            {
                Some(found) => json_reply(StatusCode::OK, found),
                None => no_such_server(name),
            },
            (true, _, ["config"]) => json_reply(StatusCode::OK, &running_config(&servers)),
            (true, _, ["reloads"]) => json_reply(StatusCode::OK, &reloads(&servers)),
            (true, _, ["stats"]) => json_reply(StatusCode::OK, &stats(&servers)),
            (_, true, ["servers", name, action]) if Action::parse(action).is_some() => {
                let action = Action::parse(action).expect("checked");
                self.change(servers, name, action, &asked).await
            }
            (_, _, ["servers", _, action]) if Action::parse(action).is_some() => {
                not_allowed("POST")
            }
            (_, _, ["servers"] | ["servers", _] | ["config" | "reloads" | "stats"]) => {
                not_allowed("GET, HEAD")
            }
            _ => json_error(
                StatusCode::NOT_FOUND,
                "no such admin API endpoint: GET /api/servers[/NAME], /api/config, /api/reloads, /api/stats; POST /api/servers/NAME/reload|enable|disable|drain",
            ),
        }
    }

    /// Makes a change, writes it to the file if asked, and logs it for the audit.
    async fn change(
        &self,
        servers: Arc<Microservers>,
        name: &str,
        action: Action,
        asked: &Asked<'_>,
    ) -> Reply {
        let persist = match persist_asked(asked.query) {
            Ok(p) => p,
            Err(message) => return json_error(StatusCode::BAD_REQUEST, &message),
        };
        if persist && matches!(action, Action::Reload | Action::Drain) {
            return json_error(
                StatusCode::BAD_REQUEST,
                "persist applies to enable and disable only (a reload or a drain is not part of the config file)",
            );
        }
        let owned = name.to_owned();
        let done = tokio::task::spawn_blocking(move || match action {
            Action::Reload => servers.reload_server(&owned),
            Action::Enable => servers.set_enabled(&owned, true),
            Action::Disable => servers.set_enabled(&owned, false),
            Action::Drain => servers.drain_server(&owned),
        })
        .await
        .unwrap_or_else(|e| Err(Refusal::Conflict(format!("the change failed: {e}"))));
        let persisted = match (&done, persist) {
            (Ok(_), true) => {
                let (file, owned) = (self.config_file.clone(), name.to_owned());
                let enabled = action == Action::Enable;
                tokio::task::spawn_blocking(move || config::persist_enabled(&file, &owned, enabled))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                    .map(|()| true)
            }
            _ => Ok(false),
        };
        let (status, body, result) = match (&done, &persisted) {
            (Ok(steered), Ok(persisted)) => (
                StatusCode::OK,
                changed(name, action, steered, *persisted),
                "ok",
            ),
            (Ok(_), Err(e)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("{}d at run time, but not persisted: {e}", action.name().trim_end_matches('e'))}),
                "not_persisted",
            ),
            (Err(Refusal::NoSuchServer), _) => (
                StatusCode::NOT_FOUND,
                json!({"error": format!("no server is called {name:?}")}),
                "no_such_server",
            ),
            (Err(Refusal::Conflict(reason)), _) => {
                (StatusCode::CONFLICT, json!({"error": reason}), "refused")
            }
        };
        tracing::info!(
            target: "host::audit",
            action = action.name(),
            server = name,
            result,
            status = status.as_u16(),
            persist,
            client = %asked.client,
            detail = %body["error"].as_str().or(body["message"].as_str()).unwrap_or(""),
            "admin API change"
        );
        json_reply(status, &body)
    }
}

fn changed(name: &str, action: Action, steered: &Steered, persisted: bool) -> Value {
    json!({
        "server": name,
        "action": action.name(),
        "message": steered.message,
        "generation": steered.generation,
        "persisted": persisted,
    })
}

fn no_such_server(name: &str) -> Reply {
    json_error(
        StatusCode::NOT_FOUND,
        &format!("no server is called {name:?}"),
    )
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut r = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this endpoint takes {allow}"),
    );
    r.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

/// `persist=true|false` in the query (nothing else is taken).
fn persist_asked(query: Option<&str>) -> Result<bool, String> {
    let mut persist = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        persist = match pair {
            "persist" | "persist=true" | "persist=1" => true,
            "persist=false" | "persist=0" => false,
            other => {
                return Err(format!(
                    "unknown query parameter {other:?}: only persist=true or persist=false"
                ))
            }
        };
    }
    Ok(persist)
}

/// `GET /api/servers`: every server with its state, what it runs and its counts; the
/// config's disabled servers too.
async fn list(servers: &Microservers) -> Value {
    let routing = servers.routing();
    let healths = health::plugin_healths(&routing.servers).await;
    let mut list: Vec<Value> = routing
        .servers
        .iter()
        .zip(&healths)
        .map(|(s, h)| {
            let mut v = health::server(s, h.as_ref());
            v["enabled"] = json!(true);
            v["drained"] = json!(s.drained());
            v["drop_in"] = json!(s.implicit);
            if s.drained() {
                v["state"] = json!("drained");
            }
            v
        })
        .collect();
    for entry in servers.config().servers.iter().filter(|s| !s.enabled) {
        list.push(json!({
            "name": entry.name,
            "state": "disabled",
            "enabled": false,
            "drained": false,
            "drop_in": false,
            "generation": null,
            "plugin": null,
        }));
    }
    json!({ "servers": list })
}

/// `GET /api/config`: the config in force, as written in the file, `${VAR}` values
/// redacted, each server's `enabled` as in force.
fn running_config(servers: &Microservers) -> Value {
    let config = servers.config();
    let mut shown = (*config.shown).clone();
    if let Some(entries) = shown.get_mut("servers").and_then(Value::as_array_mut) {
        for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
            let running = config
                .servers
                .iter()
                .find(|s| entry.get("name").and_then(Value::as_str) == Some(s.name.as_str()));
            if let Some(running) = running {
                let in_file = entry
                    .get("enabled")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                if in_file != running.enabled {
                    entry.insert("enabled".to_owned(), json!(running.enabled));
                }
            }
        }
    }
    let drained: Vec<String> = servers
        .routing()
        .servers
        .iter()
        .filter(|s| s.drained())
        .map(|s| s.name.to_string())
        .collect();
    json!({ "config": shown, "drained": drained })
}

/// `GET /api/reloads`: the last reloads, newest first.
fn reloads(servers: &Microservers) -> Value {
    let list: Vec<Value> = servers.reload_history().iter().rev().map(reload).collect();
    json!({ "reloads": list })
}

fn reload(r: &ReloadRecord) -> Value {
    let ms = |d: std::time::Duration| d.as_micros() as f64 / 1000.0;
    json!({
        "at": rfc3339(r.at),
        "server": &*r.server,
        "cause": r.cause.name(),
        "result": if r.outcome.is_ok() { "ok" } else { "failed" },
        "generation": r.outcome.as_ref().ok(),
        "error": r.outcome.as_ref().err(),
        "took_ms": ms(r.took),
        "work_ms": ms(r.work),
    })
}

/// `GET /api/stats`: each server's counts since the host started, for a reader that
/// polls and takes differences (requests per second, error rate, p99 over an interval).
fn stats(servers: &Microservers) -> Value {
    let routing = servers.routing();
    let list: Vec<Value> = routing
        .servers
        .iter()
        .map(|s| {
            let t = s.meter.totals();
            json!({
                "name": &*s.name,
                "requests": t.count(),
                "errors": t.classes[4],
                "buckets": t.buckets.to_vec(),
            })
        })
        .collect();
    json!({
        "recording": recording::enabled(),
        "uptime_ms": health::uptime_s() * 1000.0,
        "latency_bounds_s": BUCKETS.to_vec(),
        "servers": list,
    })
}

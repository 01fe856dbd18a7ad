//! What the health endpoints say: live, ready, each server, and the process. Read from
//! control (the routing snapshot and each server's state), the boundary (generations,
//! WebSocket hubs) and the recorded counts; built only when asked.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::recording::{self, ReloadNote};
use crate::control::servers::{Microservers, Server, ServerState};

/// `/health/live`: the process answers.
pub fn live() -> Value {
    json!({"status": "live", "uptime_s": uptime_s()})
}

/// `/health/ready`: whether every server that should serve does and its plugin says it
/// is healthy; the body lists the ones that are not, with why.
pub async fn ready(servers: &Microservers) -> (bool, Value) {
    let mut not_ready = servers.not_ready();
    let routing = servers.routing();
    let counted: Vec<Arc<Server>> = routing
        .servers
        .iter()
        .filter(|s| !s.drained())
        .cloned()
        .collect();
    for (s, health) in counted.iter().zip(plugin_healths(&counted).await) {
        if let Some(Err(reason)) = health {
            not_ready.push((s.name.clone(), format!("its plugin is unhealthy: {reason}")));
        }
    }
    if not_ready.is_empty() {
        return (true, json!({"status": "ready"}));
    }
    let list: Vec<Value> = not_ready
        .iter()
        .map(|(name, reason)| json!({"name": &**name, "reason": reason}))
        .collect();
    (false, json!({"status": "not ready", "not_ready": list}))
}

/// `/health/servers`: every server.
pub async fn servers(servers: &Microservers) -> Value {
    let routing = servers.routing();
    let healths = plugin_healths(&routing.servers).await;
    let list: Vec<Value> = routing
        .servers
        .iter()
        .zip(&healths)
        .map(|(s, health)| server(s, health.as_ref()))
        .collect();
    json!({"servers": list})
}

/// `/health/servers/NAME`, or `None` if there is no such server.
pub async fn server_named(servers: &Microservers, name: &str) -> Option<Value> {
    let routing = servers.routing();
    let found = routing.servers.iter().find(|s| &*s.name == name)?;
    let health = plugin_health(found).await;
    Some(server(found, health.as_ref()))
}

/// What each server's plugin says of its own health (see [`plugin_health`]), asked of
/// all of them at once: hooks that hang cost one timeout in all, not one each.
pub async fn plugin_healths(servers: &[Arc<Server>]) -> Vec<Option<Result<(), String>>> {
    futures_util::future::join_all(servers.iter().map(plugin_health)).await
}

/// What a server's plugin says of its own health (its `health` hook, on a blocking
/// thread with a timeout); `None` when it runs no generation.
pub async fn plugin_health(server: &Arc<Server>) -> Option<Result<(), String>> {
    let generation = match &**server.state() {
        ServerState::Serving(g) => g.clone(),
        ServerState::Worker(w) => {
            // Asked of the worker, on a blocking thread: it answers within the timeout.
            let w = w.clone();
            let asked = tokio::task::spawn_blocking(move || {
                w.health(crate::boundary::plugin::HEALTH_TIMEOUT)
            })
            .await;
            return Some(
                asked.unwrap_or_else(|e| Err(format!("the health hook could not run: {e}"))),
            );
        }
        ServerState::Waiting(_) | ServerState::Static => return None,
    };
    Some(generation.health().await)
}

/// One server: its state, what it runs, how its last reload went, what it holds now,
/// and `health`, its plugin's own (from [`plugin_health`]).
pub fn server(server: &Arc<Server>, health: Option<&Result<(), String>>) -> Value {
    let state = server.state();
    let (state_name, reason, generation) = match &**state {
        ServerState::Serving(g) => ("serving", None, Some(g.clone())),
        ServerState::Worker(_) => ("serving", None, None),
        ServerState::Waiting(reason) => ("waiting", Some(reason.clone()), None),
        ServerState::Static => ("static", None, None),
    };
    let worker = server.worker();
    let mut plugin = generation.as_ref().map(|g| {
        let lib = g.plugin();
        json!({
            "name": lib.name,
            "version": lib.version,
            "api_version": lib.api_version,
            "build": lib.build(),
            "file": lib.file.display().to_string(),
        })
    });
    if let Some(w) = &worker {
        plugin = Some(json!({
            "name": w.plugin.name,
            "version": w.plugin.version,
            "build": w.plugin.build,
        }));
    }
    let isolation = match (&worker, server.is_process_isolated()) {
        (Some(w), _) => json!({
            "kind": "process",
            "pid": w.pid,
            "restarts": server.worker_restarts(),
            "max_memory_mb": w.max_memory_mb,
        }),
        (None, true) => {
            json!({ "kind": "process", "pid": null, "restarts": server.worker_restarts() })
        }
        (None, false) => json!({ "kind": "in_process" }),
    };
    let health = health.map(|h| match h {
        Ok(()) => json!({"ok": true}),
        Err(reason) => json!({"ok": false, "reason": reason}),
    });
    let (last, loaded_at) = server.meter.last_reload();
    let totals = server.meter.totals();
    json!({
        "name": &*server.name,
        "state": state_name,
        "reason": reason,
        "health": health,
        "generation": server.generation_number(),
        "plugin": plugin,
        "isolation": isolation,
        "loaded_at": server.generation_number().and(loaded_at).map(rfc3339),
        "last_reload": last.as_ref().map(reload_note),
        "in_flight": generation.as_ref().map_or_else(|| worker.as_ref().map_or(0, |w| w.in_flight()), |g| g.in_flight()),
        "websocket_connections": server.sockets.len(),
        "requests_total": totals.count(),
        "errors_total": totals.classes[4],
    })
}

fn reload_note(note: &ReloadNote) -> Value {
    json!({
        "result": if note.ok { "ok" } else { "failed" },
        "error": note.error,
        "generation": note.generation,
        "at": rfc3339(note.at),
    })
}

/// `/health/system`: the process, from `/proc/self` on Linux.
pub fn system(servers: &Microservers) -> Value {
    let p = Process::read();
    let websockets: usize = servers
        .routing()
        .servers
        .iter()
        .map(|s| s.sockets.len())
        .sum();
    json!({
        "uptime_s": uptime_s(),
        "rss_bytes": p.rss_bytes,
        "virtual_memory_bytes": p.virtual_bytes,
        "cpu_seconds": p.cpu_seconds,
        "threads": p.threads,
        "open_fds": p.open_fds,
        "connections": crate::edge::limits::open_connections(),
        "websocket_connections": websockets,
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

pub fn uptime_s() -> f64 {
    recording::started_at().elapsed().as_secs_f64()
}

/// A time as RFC 3339, in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The process's own figures. `None` where the system does not say (not Linux).
#[derive(Debug, Default, Clone, Copy)]
pub struct Process {
    pub rss_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub threads: Option<u64>,
    pub open_fds: Option<u64>,
}

impl Process {
    pub fn read() -> Process {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        Process {
            rss_bytes: field("VmRSS:").map(|kib| kib * 1024),
            virtual_bytes: field("VmSize:").map(|kib| kib * 1024),
            threads: field("Threads:"),
            cpu_seconds: cpu_seconds(),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
        }
    }
}

/// User and system CPU time, from `/proc/self/stat` (in clock ticks of 1/100 s: Linux
/// reports USER_HZ, which is 100, whatever the kernel's own tick).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line are the 12th and 13th after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

//! `/metrics`: the Prometheus text exposition (version 0.0.4), written by
//! prometheus-client from the recorded counts, read and summed only when scraped.
//!
//! Labels stay bounded: a server's name (from the config, or a plugin's name for a
//! drop-in), its tenant when the config fixes one (`servers[].tenant`; a tenant taken
//! from the subdomain is not a label, as clients choose it), a status class, a result
//! or a direction. Never a raw `Host` or path.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::health::{self, Process};
use super::recording::{self, Totals, BUCKETS};
use crate::control::config::Tenancy;
use crate::control::servers::{Microservers, ServerState};

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Renders the metrics of `servers` on each call.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The servers whose plugin's health hook reported a problem at this scrape, for
    /// `host_server_ready` (shared with `Scrape`).
    unhealthy: Arc<Mutex<Vec<Arc<str>>>>,
    /// One scrape at a time between setting `unhealthy` and encoding.
    one_at_a_time: Mutex<()>,
}

impl Metrics {
    pub fn new(servers: Weak<Microservers>) -> Self {
        let mut registry = Registry::default();
        let unhealthy = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(Scrape {
            servers,
            unhealthy: unhealthy.clone(),
        }));
        Metrics {
            registry,
            unhealthy,
            one_at_a_time: Mutex::new(()),
        }
    }

    /// The exposition text, after asking every plugin's health hook (see
    /// `health::plugin_healths`).
    pub async fn render(&self, servers: &Microservers) -> String {
        let routing = servers.routing();
        let healths = health::plugin_healths(&routing.servers).await;
        let unhealthy = routing
            .servers
            .iter()
            .zip(healths)
            .filter(|(_, h)| matches!(h, Some(Err(_))))
            .map(|(s, _)| s.name.clone())
            .collect();
        let _turn = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        *self.unhealthy.lock().unwrap_or_else(|p| p.into_inner()) = unhealthy;
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug)]
struct Scrape {
    servers: Weak<Microservers>,
    unhealthy: Arc<Mutex<Vec<Arc<str>>>>,
}

/// One server's figures, gathered once per scrape.
struct Row {
    name: Arc<str>,
    tenant: String,
    totals: Totals,
    meter: &'static recording::ServerMeter,
    in_flight: usize,
    websockets: usize,
    ws_in: u64,
    ws_out: u64,
    bus_dropped: u64,
    /// Bytes of its static files kept in memory.
    static_cached: u64,
    ready: bool,
    info: Option<(String, String, String, u64)>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor, then a sample per label set.
fn family<V: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Labels, V)],
    write: impl Fn(&mut prometheus_client::encoding::MetricEncoder, V) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut sample = metric.encode_family(labels)?;
        write(&mut sample, *value)?;
    }
    Ok(())
}

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Counter, samples, |m, v| {
        m.encode_counter::<NoLabelSet, _, u64>(&v, None)
    })
}

fn gauges<V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, V)],
) -> std::fmt::Result {
    family(enc, name, help, MetricType::Gauge, samples, |m, v| {
        m.encode_gauge(&v)
    })
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(servers) = self.servers.upgrade() else {
            return Ok(());
        };
        let unhealthy = self
            .unhealthy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let rows = rows(&servers, &unhealthy);

        let mut requests = Vec::new();
        for r in &rows {
            for (class, n) in CLASSES.iter().zip(r.totals.classes) {
                let labels = vec![
                    ("server", &*r.name),
                    ("tenant", &*r.tenant),
                    ("class", *class),
                ];
                requests.push((labels, n));
            }
        }
        counters(
            &mut enc,
            "host_http_requests",
            "Responses by server, tenant and status class.",
            &requests,
        )?;
        let unrouted = recording::unrouted().totals();
        let unrouted: Vec<(Labels, u64)> = CLASSES
            .iter()
            .zip(unrouted.classes)
            .map(|(class, n)| (vec![("class", *class)], n))
            .collect();
        counters(
            &mut enc,
            "host_http_unrouted_requests",
            "Responses to requests no server took (unknown domain, bad Host, refused connection limits), by status class.",
            &unrouted,
        )?;
        {
            let mut metric = enc.encode_descriptor(
                "host_http_request_duration_seconds",
                "Time from a request's head to its response's head, by server.",
                None,
                MetricType::Histogram,
            )?;
            for r in &rows {
                let buckets: Vec<(f64, u64)> = BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(r.totals.buckets)
                    .collect();
                let labels = server(r);
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        r.totals.latency_seconds,
                        r.totals.count(),
                        &buckets,
                        None,
                    )?;
            }
        }
        let per = |f: &dyn Fn(&Row) -> u64| -> Vec<(Labels, u64)> {
            rows.iter().map(|r| (server(r), f(r))).collect()
        };
        counters(
            &mut enc,
            "host_http_response_body_bytes",
            "Response body bytes by server (bodies whose size is known when the response is made: not streams).",
            &per(&|r| r.totals.bytes_out),
        )?;
        counters(
            &mut enc,
            "host_http_request_body_bytes",
            "Request body bytes by server (bodies read whole before the handler: not streamed ones).",
            &per(&|r| r.totals.bytes_in),
        )?;
        gauges(
            &mut enc,
            "host_http_requests_in_flight",
            "Requests inside a server's plugin now.",
            &per(&|r| r.in_flight as u64),
        )?;
        counters(
            &mut enc,
            "host_plugin_panics",
            "Handler and event panics caught, by server.",
            &per(&|r| r.meter.panics.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "host_worker_crashes",
            "Worker processes (isolation: process) that died without being asked to, by server.",
            &per(&|r| r.meter.worker_crashes.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "host_http_timeouts",
            "Handlers that did not answer within request_timeout_ms (504), by server.",
            &per(&|r| r.meter.timeouts.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut enc,
            "host_rate_limited",
            "Requests refused by a rate limit (429), by server.",
            &per(&|r| r.meter.rate_limited.load(Ordering::Relaxed)),
        )?;
        let mut reloads = Vec::new();
        for r in &rows {
            let ok = r.meter.reloads_ok.load(Ordering::Relaxed);
            let failed = r.meter.reloads_failed.load(Ordering::Relaxed);
            reloads.push((vec![("server", &*r.name), ("result", "ok")], ok));
            reloads.push((vec![("server", &*r.name), ("result", "failed")], failed));
        }
        counters(
            &mut enc,
            "host_reloads",
            "Generations started (result ok: the first one too) or refused and failed (result failed), by server.",
            &reloads,
        )?;
        gauges(
            &mut enc,
            "host_server_ready",
            "1 if the server serves (or has static files only) and its plugin's health hook reports no problem, else 0.",
            &per(&|r| u64::from(r.ready)),
        )?;
        {
            let mut metric = enc.encode_descriptor(
                "host_server",
                "The generation a server runs, with its plugin and build.",
                None,
                MetricType::Info,
            )?;
            for r in &rows {
                if let Some((plugin, version, build, generation)) = &r.info {
                    let generation = generation.to_string();
                    let labels: Labels = vec![
                        ("server", &*r.name),
                        ("plugin", plugin),
                        ("version", version),
                        ("build", build),
                        ("generation", &generation),
                    ];
                    metric.encode_info(&labels)?;
                }
            }
        }
        gauges(
            &mut enc,
            "host_websocket_connections",
            "Open WebSocket connections, by server.",
            &per(&|r| r.websockets as u64),
        )?;
        let mut messages = Vec::new();
        for r in &rows {
            messages.push((vec![("server", &*r.name), ("direction", "in")], r.ws_in));
            messages.push((vec![("server", &*r.name), ("direction", "out")], r.ws_out));
        }
        counters(
            &mut enc,
            "host_websocket_messages",
            "WebSocket messages received from clients (in) and written to them (out), by server.",
            &messages,
        )?;
        counters(
            &mut enc,
            "host_bus_dropped_events",
            "Bus events dropped because the server's queue was full, by server.",
            &per(&|r| r.bus_dropped),
        )?;
        counters(
            &mut enc,
            "host_static_cache_hits",
            "Requests for static files answered from the files kept in memory, by server.",
            &per(&|r| r.meter.static_cache_hits.load(Ordering::Relaxed)),
        )?;
        gauges(
            &mut enc,
            "host_static_cache_bytes",
            "What the static files kept in memory count for (bodies, paths, Accept-Encoding values, headers, and 512 bytes per kept response), by server.",
            &per(&|r| r.static_cached),
        )?;
        let none: Labels = Vec::new();
        gauges(
            &mut enc,
            "host_connections_open",
            "Connections open on the public listeners.",
            &[(none.clone(), crate::edge::limits::open_connections() as u64)],
        )?;
        process(&mut enc)
    }
}

/// The conventional `process_*` metrics, from `/proc/self`.
fn process(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let p = Process::read();
    let none = || -> Labels { Vec::new() };
    if let Some(cpu) = p.cpu_seconds {
        family(
            enc,
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            MetricType::Counter,
            &[(none(), cpu)],
            |m, v| m.encode_counter::<NoLabelSet, _, u64>(&v, None),
        )?;
    }
    let figures = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            p.rss_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            p.virtual_bytes,
        ),
        ("process_open_fds", "Open file descriptors.", p.open_fds),
        ("process_threads", "Threads.", p.threads),
    ];
    for (name, help, value) in figures {
        if let Some(v) = value {
            gauges(enc, name, help, &[(none(), v)])?;
        }
    }
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        - health::uptime_s();
    gauges(
        enc,
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds.",
        &[(none(), start)],
    )
}

fn server(r: &Row) -> Labels<'_> {
    vec![("server", &*r.name)]
}

/// `unhealthy`: the servers whose plugin reports a problem (not ready).
fn rows(servers: &Microservers, unhealthy: &[Arc<str>]) -> Vec<Row> {
    let config = servers.config();
    let tenants: HashMap<&str, &str> = config
        .servers
        .iter()
        .filter_map(|s| match &s.tenancy {
            Some(Tenancy::Fixed(id)) => Some((s.name.as_str(), id.as_str())),
            _ => None,
        })
        .collect();
    let routing = servers.routing();
    routing
        .servers
        .iter()
        .map(|s| {
            let state = s.state();
            let (in_flight, info) = match &**state {
                ServerState::Serving(g) => {
                    let lib = g.plugin();
                    let info = (lib.name.clone(), lib.version.clone(), lib.build(), g.number);
                    (g.in_flight(), Some(info))
                }
                ServerState::Worker(w) => {
                    let p = &w.plugin;
                    let info = (p.name.clone(), p.version.clone(), p.build.clone(), w.number);
                    (w.in_flight(), Some(info))
                }
                _ => (0, None),
            };
            Row {
                name: s.name.clone(),
                tenant: tenants.get(&*s.name).copied().unwrap_or("").to_owned(),
                totals: s.meter.totals(),
                meter: s.meter,
                in_flight,
                websockets: s.sockets.len(),
                ws_in: s.sockets.messages_in.load(Ordering::Relaxed),
                ws_out: s.sockets.messages_out.load(Ordering::Relaxed),
                bus_dropped: s.inbox.dropped(),
                static_cached: s.files().map_or(0, |site| site.cached_bytes()),
                ready: !matches!(&**state, ServerState::Waiting(_)) && !unhealthy.contains(&s.name),
                info,
            }
        })
        .collect()
}

//! The recording hook: what the request path, the boundary and control count for the
//! metrics, and nothing else. This module imports nothing from the host, so every layer
//! may use it without reaching into the rest of `operations`, which reads these counts
//! (and control, and the boundary) only when it is asked.
//!
//! Invariants:
//! - Recording a request allocates nothing, takes no lock and looks nothing up: the
//!   request path reaches its server's [`ServerMeter`] through the server it already
//!   resolved, and adds to the meter's shard of the current thread (a few relaxed atomic
//!   adds on a cache line that thread alone writes, almost always).
//! - A meter lives as long as the process, and one name always has the same meter, so a
//!   server's counters only ever grow (a server removed and added again carries on) and
//!   the request path may hold a `&'static` reference to it. Their number is the number
//!   of server names ever configured.
//! - Off (`global.metrics: false`), a request pays one check of [`enabled`] when it
//!   starts and one when it ends.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime};

/// Upper bounds of the latency histogram's buckets, in seconds (the last bucket, +Inf,
/// is implied).
pub const BUCKETS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The same bounds in nanoseconds, for the request path.
const BUCKETS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// How many shards each meter has. Threads take shards in turn; more threads than
/// shards share them (still correct, only a little slower).
const SHARDS: usize = 16;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether requests are counted (`global.metrics`).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns the counting of requests on or off (`global.metrics`); other counts (reloads,
/// panics, timeouts) are kept either way, as they cost nothing per request.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// When the process started counting: the origin of [`now`].
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since the origin, never 0 (0 means "not timed" in a request).
#[inline]
pub fn now() -> u64 {
    (origin().elapsed().as_nanos() as u64).max(1)
}

/// A request's start when requests are counted, else 0.
#[inline]
pub fn start() -> u64 {
    if enabled() {
        now()
    } else {
        0
    }
}

/// When the host started (for uptime).
pub fn started_at() -> Instant {
    origin()
}

/// One thread's counts for one server. Aligned so that two shards never share a cache
/// line (128: adjacent-line prefetching pairs lines on x86).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    /// Responses by status class: 1xx to 5xx.
    classes: [AtomicU64; 5],
    /// Responses by latency bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of latencies in nanoseconds.
    latency_ns: AtomicU64,
    /// Response body bytes whose size was known when the response was made.
    bytes_out: AtomicU64,
    /// Request body bytes read whole before the handler (not streamed ones).
    bytes_in: AtomicU64,
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn shard_index() -> usize {
    SHARD.with(|s| {
        let i = s.get();
        if i != usize::MAX {
            return i;
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let i = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        s.set(i);
        i
    })
}

/// How the last reload of a server went.
#[derive(Debug, Clone)]
pub struct ReloadNote {
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    pub at: SystemTime,
    /// The generation it started (on success).
    pub generation: Option<u64>,
}

/// One server's counters (see the module's invariants).
pub struct ServerMeter {
    pub name: Box<str>,
    shards: Box<[Shard]>,
    pub panics: AtomicU64,
    /// Its worker processes that died without being asked to (`isolation: "process"`).
    pub worker_crashes: AtomicU64,
    pub timeouts: AtomicU64,
    pub rate_limited: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub websocket_in: AtomicU64,
    /// Requests its static files answered from memory (`servers[].static.cache_mb`).
    pub static_cache_hits: AtomicU64,
    /// The last reload, and when the serving generation was loaded.
    reloads: Mutex<(Option<ReloadNote>, Option<SystemTime>)>,
}

impl std::fmt::Debug for ServerMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMeter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What a scrape reads of one meter: the shards summed.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub classes: [u64; 5],
    /// Responses by latency bucket, each counted once (not cumulative: the encoder
    /// adds them up); the last is +Inf.
    pub buckets: [u64; BUCKETS.len() + 1],
    pub latency_seconds: f64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl Totals {
    pub fn count(&self) -> u64 {
        self.classes.iter().sum()
    }

    /// The latency below which a share `q` (0 to 1) of the responses fell, estimated
    /// from the buckets as Prometheus' `histogram_quantile` does (linearly within the
    /// bucket; the highest finite bound if it falls in +Inf). For the difference of two
    /// readings too, which gives it over an interval. `None` without responses.
    pub fn quantile(buckets: &[u64; BUCKETS.len() + 1], q: f64) -> Option<f64> {
        let total: u64 = buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = BUCKETS.get(i) else {
                    return Some(BUCKETS[BUCKETS.len() - 1]);
                };
                let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
                let within = (rank - below as f64) / n as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        Some(BUCKETS[BUCKETS.len() - 1])
    }
}

/// The meter of the server called `name` (made on first use, kept for good). For set-up
/// and rare events: it takes a lock and looks the name up.
pub fn meter(name: &str) -> &'static ServerMeter {
    static METERS: OnceLock<Mutex<HashMap<Box<str>, &'static ServerMeter>>> = OnceLock::new();
    let mut meters = METERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(m) = meters.get(name) {
        return m;
    }
    let m: &'static ServerMeter = Box::leak(Box::new(ServerMeter::new(name)));
    meters.insert(name.into(), m);
    m
}

/// Requests no server answered (no such domain, a bad `Host`).
pub fn unrouted() -> &'static ServerMeter {
    static UNROUTED: OnceLock<&'static ServerMeter> = OnceLock::new();
    UNROUTED.get_or_init(|| Box::leak(Box::new(ServerMeter::new(""))))
}

impl ServerMeter {
    fn new(name: &str) -> Self {
        ServerMeter {
            name: name.into(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            panics: AtomicU64::new(0),
            worker_crashes: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            websocket_in: AtomicU64::new(0),
            static_cache_hits: AtomicU64::new(0),
            reloads: Mutex::new((None, None)),
        }
    }

    /// Counts a response: its status, how long since `started` (from [`start`]), and
    /// its body's size if known.
    #[inline]
    pub fn record(&self, status: u16, started: u64, bytes: Option<u64>) {
        self.add(status, now().saturating_sub(started), bytes);
    }

    #[inline]
    fn add(&self, status: u16, took: u64, bytes: Option<u64>) {
        let shard = &self.shards[shard_index()];
        let class = (status / 100).clamp(1, 5) as usize - 1;
        shard.classes[class].fetch_add(1, Ordering::Relaxed);
        let bucket = BUCKETS_NS
            .iter()
            .position(|&bound| took <= bound)
            .unwrap_or(BUCKETS_NS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.latency_ns.fetch_add(took, Ordering::Relaxed);
        if let Some(bytes) = bytes {
            shard.bytes_out.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts a request body of `bytes`, read whole.
    #[inline]
    pub fn received(&self, bytes: u64) {
        let shard = &self.shards[shard_index()];
        shard.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The shards summed (for a scrape).
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        let mut latency_ns = 0u64;
        for shard in self.shards.iter() {
            for (sum, c) in t.classes.iter_mut().zip(&shard.classes) {
                *sum += c.load(Ordering::Relaxed);
            }
            for (sum, b) in t.buckets.iter_mut().zip(&shard.buckets) {
                *sum += b.load(Ordering::Relaxed);
            }
            latency_ns += shard.latency_ns.load(Ordering::Relaxed);
            t.bytes_out += shard.bytes_out.load(Ordering::Relaxed);
            t.bytes_in += shard.bytes_in.load(Ordering::Relaxed);
        }
        t.latency_seconds = latency_ns as f64 / 1e9;
        t
    }

    /// Counts a reload of this server and keeps how it went.
    pub fn reloaded(&self, outcome: Result<u64, String>) {
        let at = SystemTime::now();
        let mut reloads = self.reloads.lock().unwrap_or_else(|p| p.into_inner());
        let note = match outcome {
            Ok(generation) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                reloads.1 = Some(at);
                ReloadNote {
                    ok: true,
                    error: None,
                    at,
                    generation: Some(generation),
                }
            }
            Err(error) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                ReloadNote {
                    ok: false,
                    error: Some(error),
                    at,
                    generation: None,
                }
            }
        };
        reloads.0 = Some(note);
    }

    /// Counts a refused build of this server's plugin, unless the last reload is this
    /// same refusal: control looks at a refused file again at every later change (of
    /// any server), which is no new attempt.
    pub fn worker_crashed(&self) {
        self.worker_crashes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, error: String) {
        let last = self.last_reload().0;
        if last.is_some_and(|n| !n.ok && n.error.as_deref() == Some(error.as_str())) {
            return;
        }
        self.reloaded(Err(error));
    }

    /// The last reload, and when the generation serving now was loaded.
    pub fn last_reload(&self) -> (Option<ReloadNote>, Option<SystemTime>) {
        self.reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_lands_in_its_class_and_bucket() {
        let m = ServerMeter::new("t");
        m.record(204, now(), Some(10));
        m.add(503, 25_000, None);
        m.add(101, 2_000_000, Some(5));
        let t = m.totals();
        assert_eq!(t.classes, [1, 1, 0, 0, 1]);
        assert_eq!(t.count(), 3);
        assert_eq!(t.buckets.iter().sum::<u64>(), 3);
        // 25 us is in the first bucket (bounds are inclusive), 2 ms in the 2.5 ms one.
        assert!(t.buckets[0] >= 1, "{:?}", t.buckets);
        assert_eq!(t.buckets[6], 1, "{:?}", t.buckets);
        assert_eq!(t.bytes_out, 15);
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut b = [0u64; BUCKETS.len() + 1];
        assert_eq!(Totals::quantile(&b, 0.99), None);
        // 99 responses within 25 us, one between 1 and 2.5 ms.
        b[0] = 99;
        b[6] = 1;
        let median = Totals::quantile(&b, 0.5).unwrap();
        assert!((median - 0.000_025 * 50.0 / 99.0).abs() < 1e-12, "{median}");
        assert_eq!(Totals::quantile(&b, 0.99), Some(0.000_025));
        assert_eq!(Totals::quantile(&b, 1.0), Some(0.002_5));
        b[BUCKETS.len()] = 100;
        assert_eq!(Totals::quantile(&b, 0.99), Some(10.0));
    }

    #[test]
    fn a_refusal_seen_again_is_not_counted_again() {
        let m = ServerMeter::new("r");
        m.refused("refused: x".into());
        m.refused("refused: x".into());
        assert_eq!(m.reloads_failed.load(Ordering::Relaxed), 1);
        m.reloaded(Ok(2));
        m.refused("refused: x".into());
        m.refused("refused: y".into());
        assert_eq!(m.reloads_failed.load(Ordering::Relaxed), 3);
        assert_eq!(m.reloads_ok.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn one_name_has_one_meter() {
        assert!(std::ptr::eq(meter("same"), meter("same")));
        assert!(!std::ptr::eq(meter("same"), meter("other")));
    }
}

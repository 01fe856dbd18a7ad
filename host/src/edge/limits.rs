//! Connection limits: how many connections may be open (in all, and per client IP), and
//! the deadlines every open connection must keep (`global.connections`).
//!
//! - `Gate` counts open connections; a connection past a limit is closed as soon as it
//!   is accepted. Its `Ticket` travels with the socket (through an upgrade to a
//!   WebSocket too) and gives the place back when the socket is dropped.
//! - `Tracked` wraps a socket and notes, in its `Activity`, when bytes last moved and
//!   since when a write has been stuck. Noting costs a load and a store of a coarse
//!   clock per read or write: no timer per connection or per request.
//! - `judge` is the rule a sweeper (`edge::serve`) applies to every open HTTP
//!   connection a few times a second: no request within `first_request_timeout`, a
//!   write stuck for `write_timeout`: closed; nothing moving either way for
//!   `idle_timeout`: asked to finish (HTTP/2: GOAWAY), then closed if still quiet after
//!   as long again. (HTTP/1's header deadline is hyper's `header_read_timeout`.)
//! - `Trim` says when a storm of connections is over, so that `trim_memory` gives what
//!   it freed back to the system.
//! - `raise_fd_limit` lifts the descriptor limit to its hard maximum at start, and
//!   `effective_max` keeps `max` below it, so that accepting never fails for lack of
//!   descriptors while files, plugins and other sockets still need some.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::control::config::ConnectionLimits;

/// Descriptors kept for everything but client connections (plugin files, listeners,
/// the watcher, outbound connections of plugins).
const RESERVED_FDS: u64 = 256;

/// Milliseconds since the process started, as of the sweeper's last tick.
static CLOCK: AtomicU64 = AtomicU64::new(1);

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Moves the coarse clock to now (the sweeper's tick); returns it.
pub fn tick() -> u64 {
    let now = start().elapsed().as_millis() as u64 + 1;
    CLOCK.store(now, Ordering::Relaxed);
    now
}

/// The coarse clock (0 is never a time: it means "not set").
pub fn now() -> u64 {
    CLOCK.load(Ordering::Relaxed)
}

/// What the sweeper asks of a connection.
pub const ORDER_NONE: u8 = 0;
pub const ORDER_FINISH: u8 = 1;
pub const ORDER_CLOSE: u8 = 2;

/// What moved on a connection, and when.
#[derive(Debug)]
pub struct Activity {
    accepted: u64,
    last_io: AtomicU64,
    /// Since when a write has been waiting for the client (0: none is).
    write_stuck: AtomicU64,
    requested: AtomicBool,
    /// When it was asked to finish for being idle (0: it was not).
    finish_asked: AtomicU64,
    /// `ORDER_*`, read by the connection's task at each poll.
    pub order: AtomicU8,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        let now = now();
        Arc::new(Activity {
            accepted: now,
            last_io: AtomicU64::new(now),
            write_stuck: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            finish_asked: AtomicU64::new(0),
            order: AtomicU8::new(ORDER_NONE),
        })
    }

    /// A request started on this connection.
    #[inline]
    pub fn requested(&self) {
        if !self.requested.load(Ordering::Relaxed) {
            self.requested.store(true, Ordering::Relaxed);
        }
    }
}

/// Why a connection was closed by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    NoRequest,
    WriteStuck,
    Idle,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NoRequest => "no request within first_request_timeout_ms",
            Reason::WriteStuck => "the client read nothing for write_timeout_ms",
            Reason::Idle => "idle for twice idle_timeout_ms",
        }
    }
}

/// What to do with a connection now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Finish what is in flight and close (HTTP/2: GOAWAY).
    Finish,
    Close(Reason),
}

/// The rule for one connection at `now` (coarse milliseconds).
pub fn judge(a: &Activity, now: u64, limits: &ConnectionLimits) -> Verdict {
    let since = |t: u64| now.saturating_sub(t);
    let ms = |d: Duration| d.as_millis() as u64;
    let stuck = a.write_stuck.load(Ordering::Relaxed);
    if stuck != 0 && since(stuck) >= ms(limits.write_timeout) {
        return Verdict::Close(Reason::WriteStuck);
    }
    if !a.requested.load(Ordering::Relaxed) && since(a.accepted) >= ms(limits.first_request_timeout)
    {
        return Verdict::Close(Reason::NoRequest);
    }
    let idle = ms(limits.idle_timeout);
    if since(a.last_io.load(Ordering::Relaxed)) < idle {
        // Bytes moved again since it was asked to finish (an HTTP/2 connection whose
        // streams go on after GOAWAY): quiet counts from scratch.
        if a.finish_asked.load(Ordering::Relaxed) != 0 {
            a.finish_asked.store(0, Ordering::Relaxed);
        }
        return Verdict::Keep;
    }
    match a.finish_asked.load(Ordering::Relaxed) {
        0 => {
            a.finish_asked.store(now, Ordering::Relaxed);
            Verdict::Finish
        }
        asked if since(asked) >= idle => Verdict::Close(Reason::Idle),
        _ => Verdict::Keep,
    }
}

/// A socket that notes its activity, and holds its place at the gate.
pub struct Tracked<T> {
    io: T,
    activity: Arc<Activity>,
    _ticket: Ticket,
}

impl<T> Tracked<T> {
    pub fn new(io: T, activity: Arc<Activity>, ticket: Ticket) -> Self {
        Tracked {
            io,
            activity,
            _ticket: ticket,
        }
    }

    #[inline]
    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.last_io.store(now(), Ordering::Relaxed);
                if self.activity.write_stuck.load(Ordering::Relaxed) != 0 {
                    self.activity.write_stuck.store(0, Ordering::Relaxed);
                }
            }
            Poll::Pending if self.activity.write_stuck.load(Ordering::Relaxed) == 0 => {
                self.activity.write_stuck.store(now(), Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.last_io.store(now(), Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(&result);
        result
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(&result);
        result
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why a connection was refused at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Full,
    PerIp,
}

/// Open connections, in all and per client IP.
#[derive(Debug, Default)]
pub struct Gate {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's place at the gate, given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    ip: Option<IpAddr>,
}

/// The gate of the running listeners, for the metrics (held weakly: the listeners own
/// it).
static SERVING_GATE: Mutex<Option<std::sync::Weak<Gate>>> = Mutex::new(None);

/// How many connections the public listeners hold open now (0 before they start).
pub fn open_connections() -> usize {
    let gate = SERVING_GATE.lock().unwrap_or_else(|p| p.into_inner());
    gate.as_ref()
        .and_then(std::sync::Weak::upgrade)
        .map_or(0, |g| g.open())
}

impl Gate {
    /// Makes this the gate [`open_connections`] reads.
    pub fn publish(self: &Arc<Self>) {
        *SERVING_GATE.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(self));
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for a connection from `ip`, within `max` in all and `max_per_ip` (0: no
    /// limit) from one address.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max: usize,
        max_per_ip: usize,
    ) -> Result<Ticket, Refused> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        let mut ticket = Ticket {
            gate: self.clone(),
            ip: None,
        };
        if max_per_ip > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= max_per_ip {
                return Err(Refused::PerIp);
            }
            *n += 1;
            ticket.ip = Some(ip);
        }
        Ok(ticket)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut per_ip = self.gate.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Raises this process's descriptor limit to its hard maximum; returns the limit now
/// in force (None if it cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own, and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit reads the struct we own, and nothing else.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit = raised;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Gives the allocator's free memory back to the system (glibc keeps what a storm of
/// connections freed in its arenas otherwise). Elsewhere, nothing.
pub fn trim_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; any padding is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When to give memory back: after the open connections fell to a quarter of a peak of
/// at least `TRIM_PEAK`.
#[derive(Debug, Default)]
pub struct Trim {
    peak: usize,
}

/// The smallest peak worth trimming after.
const TRIM_PEAK: usize = 1000;

impl Trim {
    /// Notes how many connections are open; true when it is time to trim.
    pub fn after(&mut self, open: usize) -> bool {
        self.peak = self.peak.max(open);
        if self.peak >= TRIM_PEAK && open <= self.peak / 4 {
            // The next storm must reach TRIM_PEAK again.
            self.peak = 0;
            return true;
        }
        false
    }
}

/// `max` connections, lowered to fit the descriptor limit `fds` (with some reserved).
pub fn effective_max(max: usize, fds: Option<u64>) -> usize {
    match fds {
        Some(fds) => max.min(fds.saturating_sub(RESERVED_FDS).max(1) as usize),
        None => max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            first_request_timeout: Duration::from_millis(1000),
            idle_timeout: Duration::from_millis(5000),
            write_timeout: Duration::from_millis(3000),
            ..ConnectionLimits::default()
        }
    }

    fn activity(at: u64) -> Activity {
        Activity {
            accepted: at,
            last_io: AtomicU64::new(at),
            write_stuck: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            finish_asked: AtomicU64::new(0),
            order: AtomicU8::new(ORDER_NONE),
        }
    }

    #[test]
    fn a_connection_must_start_a_request_keep_writing_and_not_sit_idle() {
        let l = limits();
        let a = activity(100);
        assert_eq!(judge(&a, 1099, &l), Verdict::Keep);
        assert_eq!(judge(&a, 1100, &l), Verdict::Close(Reason::NoRequest));
        a.requested();
        assert_eq!(judge(&a, 1100, &l), Verdict::Keep);
        // Idle: asked to finish once, closed if still quiet as long again.
        assert_eq!(judge(&a, 5100, &l), Verdict::Finish);
        assert_eq!(judge(&a, 6000, &l), Verdict::Keep);
        assert_eq!(judge(&a, 10_100, &l), Verdict::Close(Reason::Idle));
        // Traffic after the request to finish starts the count again.
        let c = activity(100);
        c.requested();
        assert_eq!(judge(&c, 5100, &l), Verdict::Finish);
        c.last_io.store(6000, Ordering::Relaxed);
        assert_eq!(judge(&c, 6000, &l), Verdict::Keep);
        assert_eq!(judge(&c, 10_999, &l), Verdict::Keep);
        assert_eq!(judge(&c, 11_000, &l), Verdict::Finish);
        // A stuck write closes, whatever else.
        let b = activity(100);
        b.requested();
        b.write_stuck.store(200, Ordering::Relaxed);
        assert_eq!(judge(&b, 3199, &l), Verdict::Keep);
        assert_eq!(judge(&b, 3200, &l), Verdict::Close(Reason::WriteStuck));
    }

    #[test]
    fn memory_is_given_back_once_after_each_storm() {
        let mut trim = Trim::default();
        assert!(!trim.after(500));
        assert!(!trim.after(0), "a peak of 500 is no storm");
        assert!(!trim.after(10_000));
        assert!(!trim.after(2_600));
        assert!(trim.after(2_500));
        assert!(!trim.after(100), "once per storm");
        assert!(!trim.after(4_000));
        assert!(trim.after(900));
    }

    #[test]
    fn the_gate_counts_in_all_and_per_address() {
        let gate = Arc::new(Gate::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = gate.admit(a, 3, 2).unwrap();
        let _t2 = gate.admit(a, 3, 2).unwrap();
        assert_eq!(gate.admit(a, 3, 2).unwrap_err(), Refused::PerIp);
        let _t3 = gate.admit(b, 3, 2).unwrap();
        assert_eq!(gate.admit(b, 3, 2).unwrap_err(), Refused::Full);
        assert_eq!(gate.open(), 3);
        drop(t1);
        assert_eq!(gate.open(), 2);
        let _t4 = gate.admit(a, 3, 2).unwrap();
        assert_eq!(effective_max(10_000, Some(1024)), 768);
        assert_eq!(effective_max(100, Some(1024)), 100);
        assert_eq!(effective_max(100, None), 100);
    }
}

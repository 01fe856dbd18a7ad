//! The access log (`global.access_log`): one line per request, in the combined format
//! or as JSON, to stderr or a file. Also the debug line per request.
//!
//! What a line needs is gathered at the request's start only while one of them is
//! wanted (one atomic load otherwise). Lines go to a buffer that is written out when it
//! passes 32 KiB and at least every 200 ms by a thread of its own, so a request pays for
//! formatting, not for a system call.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{HOST, REFERER, USER_AGENT};
use hyper::{Method, Request, Version};

use crate::boundary::call::ClientAddr;
use crate::control::config::{AccessLogConfig, AccessLogFormat};

/// Written out past this many bytes.
const FLUSH_AT: usize = 32 * 1024;
/// Written out at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

static ENABLED: AtomicBool = AtomicBool::new(false);
static SINK: Mutex<Option<Sink>> = Mutex::new(None);

struct Sink {
    format: AccessLogFormat,
    /// `None`: stderr.
    file: Option<std::fs::File>,
    buffer: Vec<u8>,
}

impl Sink {
    fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let written = match &mut self.file {
            Some(file) => file.write_all(&self.buffer),
            None => std::io::stderr().lock().write_all(&self.buffer),
        };
        if let Err(e) = written {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    "cannot write the access log: {e} (lines are dropped until it can)"
                );
            }
        }
        self.buffer.clear();
    }
}

fn sink() -> MutexGuard<'static, Option<Sink>> {
    SINK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns the access log on (to the file or stderr `config` names), changes it, or turns
/// it off (`None`). A file that cannot be opened is an error naming it; the log stays as
/// it was.
pub fn configure(config: Option<&AccessLogConfig>) -> Result<(), String> {
    let Some(config) = config else {
        ENABLED.store(false, Ordering::Relaxed);
        if let Some(mut old) = sink().take() {
            old.flush();
        }
        return Ok(());
    };
    let file = match &config.file {
        None => None,
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    format!(
                        "global.access_log.file: cannot open {}: {e}",
                        path.display()
                    )
                })?,
        ),
    };
    let mut current = sink();
    if let Some(old) = current.as_mut() {
        old.flush();
    }
    *current = Some(Sink {
        format: config.format,
        file,
        buffer: Vec::with_capacity(FLUSH_AT * 2),
    });
    drop(current);
    ENABLED.store(true, Ordering::Relaxed);
    static FLUSHER: Once = Once::new();
    FLUSHER.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                if let Some(sink) = sink().as_mut() {
                    sink.flush();
                }
            });
    });
    Ok(())
}

/// Writes out what is buffered (at exit).
pub fn flush() {
    if let Some(sink) = sink().as_mut() {
        sink.flush();
    }
}

/// What a request's log lines need from its start.
pub struct Note {
    started: Instant,
    method: Method,
    /// Path and query.
    target: String,
    version: Version,
    client: ClientAddr,
    referer: Option<String>,
    user_agent: Option<String>,
    /// The name the request was for (the target's authority, else `Host`), as sent.
    host: Option<String>,
}

impl Note {
    /// A note of `req`, if an access log or debug line will be written.
    #[inline]
    pub fn of(req: &Request<Incoming>, client: &ClientAddr) -> Option<Box<Note>> {
        if !ENABLED.load(Ordering::Relaxed) && !tracing::enabled!(tracing::Level::DEBUG) {
            return None;
        }
        Some(Note::take(req, client))
    }

    #[cold]
    #[inline(never)]
    fn take(req: &Request<Incoming>, client: &ClientAddr) -> Box<Note> {
        let header = |name| {
            req.headers()
                .get(name)
                .map(|v: &hyper::header::HeaderValue| {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                })
        };
        Box::new(Note {
            started: Instant::now(),
            method: req.method().clone(),
            target: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned()),
            version: req.version(),
            client: *client,
            referer: header(REFERER),
            user_agent: header(USER_AGENT),
            host: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| header(HOST)),
        })
    }

    /// The name the request was for, as sent (`None` without one).
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Writes the request's lines: `bytes` is the body's length when known before it is
    /// sent (`None` for a stream), `server` the server that answered, `tenant` the
    /// tenant its request was for.
    #[cold]
    #[inline(never)]
    pub fn write(self, status: u16, bytes: Option<u64>, answered: Answered<'_>) {
        let Answered {
            server,
            tenant,
            request_id,
        } = answered;
        let micros = self.started.elapsed().as_micros() as u64;
        tracing::debug!(
            method = %self.method,
            path = self.target,
            status,
            server = server.unwrap_or("-"),
            tenant = tenant.unwrap_or("-"),
            request_id,
            micros,
            "request"
        );
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let client = std::str::from_utf8(self.client.as_bytes()).unwrap_or("-");
        // The address without its port.
        let ip = client
            .rsplit_once(':')
            .map_or(client, |(ip, _)| ip)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let mut sink = sink();
        let Some(sink) = sink.as_mut() else { return };
        let out = &mut sink.buffer;
        let now = std::time::SystemTime::now();
        // Written straight into the buffer: no line is formatted apart first.
        let _ = match sink.format {
            AccessLogFormat::Json => {
                let line = JsonLine {
                    time: Rfc3339(now),
                    request_id,
                    server,
                    tenant,
                    client: ip,
                    method: self.method.as_str(),
                    path: &self.target,
                    protocol: protocol(self.version),
                    status,
                    bytes,
                    duration_ms: micros as f64 / 1000.0,
                    referer: self.referer.as_deref(),
                    user_agent: self.user_agent.as_deref(),
                };
                serde_json::to_writer(&mut *out, &line)
                    .map_err(|_| std::fmt::Error)
                    .map(|()| out.push(b'\n'))
            }
            AccessLogFormat::Combined => writeln!(
                out,
                "{ip} - - [{}] \"{} {} {}\" {status} {} {} {} {} {} {request_id} {}.{:03}",
                ClfTime(now),
                self.method,
                escape(&self.target),
                protocol(self.version),
                OrDash(bytes),
                Quoted(self.referer.as_deref()),
                Quoted(self.user_agent.as_deref()),
                server.unwrap_or("-"),
                tenant.unwrap_or("-"),
                micros / 1000,
                micros % 1000,
            )
            .map_err(|_| std::fmt::Error),
        };
        if sink.buffer.len() >= FLUSH_AT {
            sink.flush();
        }
    }
}

/// Who answered a request, for its log lines.
pub struct Answered<'a> {
    /// The server (`None`: a domain no server claims, or refused before routing).
    pub server: Option<&'a str>,
    /// The request's tenant, if its server has one.
    pub tenant: Option<&'a str>,
    pub request_id: &'a str,
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// `"` and `\` escaped, and control bytes as `\xHH`, as nginx does, so that a line stays
/// one line and its quoted fields stay quoted.
fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02X}", c as u32))
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A JSON line's fields, in order.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    time: Rfc3339,
    request_id: &'a str,
    server: Option<&'a str>,
    tenant: Option<&'a str>,
    client: &'a str,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    bytes: Option<u64>,
    duration_ms: f64,
    referer: Option<&'a str>,
    user_agent: Option<&'a str>,
}

/// A time as `03/Dec/2026:10:04:01 +0000` (the common log format's, in UTC).
struct ClfTime(std::time::SystemTime);

/// A time as `2026-12-03T10:04:01.123Z`.
struct Rfc3339(std::time::SystemTime);

fn utc(t: std::time::SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl std::fmt::Display for ClfTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = utc(self.0);
        write!(
            f,
            "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
            t.day(),
            MONTHS[usize::from(u8::from(t.month())) - 1],
            t.year(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = utc(self.0);
        write!(
            f,
            "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A number, or `-` when there is none.
struct OrDash(Option<u64>);

impl std::fmt::Display for OrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("-"),
        }
    }
}

/// A field in quotes, escaped; `"-"` when there is none.
struct Quoted<'a>(Option<&'a str>);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(s) => write!(f, "\"{}\"", escape(s)),
            None => f.write_str("\"-\""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_escapes() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_292_241);
        assert_eq!(ClfTime(t).to_string(), "03/Dec/2026:10:04:01 +0000");
        assert_eq!(Rfc3339(t).to_string(), "2026-12-03T10:04:01.000Z");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\x0Ad");
        assert_eq!(escape("/plain?x=1"), "/plain?x=1");
    }
}

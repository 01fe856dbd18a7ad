//! The bus and WebSocket broadcasts across hosts, over Redis pub/sub
//! (`global.bus.backend = "redis"`), so that several hosts behind a load balancer act as
//! one: an event published on one host reaches the subscribers on every host, and a
//! broadcast to a server's room reaches that room's connections on every host.
//!
//! Channels (with the configured prefix, `microservers:` by default):
//! - `<prefix>bus:<topic>` carries bus events;
//! - `<prefix>ws:<server>` carries broadcasts to a server's WebSocket connections.
//!
//! A message the host publishes is an envelope: `MSv1`, the publishing host's id (8
//! bytes, big-endian), then for a bus event the payload, and for a broadcast one byte
//! for the kind (`t` text, `b` binary), one for the target (`*` every connection, `r` a
//! room: then the room's length in 2 bytes, big-endian, and its name), and the payload.
//! A message without the `MSv1` mark comes from another program: on a bus channel it is
//! the payload, on a WebSocket channel a message to every connection (text if it is
//! UTF-8, else binary).
//!
//! Invariants:
//! - Nothing a plugin calls waits for Redis: forwarding puts the message on a bounded
//!   queue (`try_send`). A message that does not fit, that comes while Redis is out of
//!   reach, or whose publishing Redis did not confirm, is lost for the other hosts and
//!   counted (`Relay::lost`); local delivery does not depend on Redis at all.
//! - A host's own messages come back from Redis and are skipped (by the id in the
//!   envelope): local delivery happened when the plugin published.
//! - A message from another host is delivered locally only, never forwarded again.
//! - The log says what happened once per change of state (connected, lost, back, with
//!   the count of messages lost meanwhile), never once per message or per retry.
//! - Reconnecting waits 1 s after a loss, doubling to 30 s while Redis stays away; a
//!   link that fails within 30 s of connecting does not start again from 1 s, so a
//!   flapping link is tried (and logged) at most every 30 s.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::boundary::bus::{Bus, BusEvent};
use crate::boundary::sockets;

/// Marks a message a host published (and the version of its layout).
const MARK: &[u8; 4] = b"MSv1";
/// The wait after a lost connection, doubled after each failed attempt up to `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// How often a quiet link is checked, and how long Redis may take to answer.
const PING_EVERY: Duration = Duration::from_secs(10);
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Most messages published in one round trip.
const BATCH: usize = 256;
/// A link must hold this long for the next loss to be retried after `FIRST_RETRY`
/// again (a link that fails at once keeps backing off).
const STEADY: Duration = Duration::from_secs(30);
/// The most messages the queue to Redis holds, whatever the config asks.
const MAX_QUEUE: usize = 1 << 20;
/// How often a full queue is logged, at most.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(5);

static RELAY: OnceLock<Arc<Relay>> = OnceLock::new();

/// The link to Redis: a queue of messages to publish, and what became of them.
#[derive(Debug)]
pub struct Relay {
    /// This host, as its envelopes name it.
    origin: u64,
    prefix: String,
    /// The URL without its password, for the log.
    shown_url: String,
    queue: mpsc::Sender<(String, Vec<u8>)>,
    /// Connected (or still trying for the first time): messages are queued. Otherwise
    /// they are counted as lost at once.
    up: AtomicBool,
    lost: AtomicU64,
    full_logged: Mutex<Option<Instant>>,
}

/// Starts relaying through the Redis server at `url` (once per process; on the
/// current tokio runtime). Returns at once: connecting happens in the background, and
/// the log says when it succeeds or fails.
pub fn start(url: &str, prefix: &str, queue: usize) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| format!("not a Redis URL: {e}"))?;
    let (tx, rx) = mpsc::channel(queue.clamp(1, MAX_QUEUE));
    let relay = Arc::new(Relay {
        origin: host_id(),
        prefix: prefix.to_owned(),
        shown_url: without_password(url),
        queue: tx,
        up: AtomicBool::new(true),
        lost: AtomicU64::new(0),
        full_logged: Mutex::new(None),
    });
    RELAY
        .set(relay.clone())
        .map_err(|_| "the Redis relay is already running".to_owned())?;
    tokio::spawn(relay.run(client, rx));
    Ok(())
}

/// Sends a bus event to the other hosts (when the bus runs over Redis).
pub fn forward_event(topic: &[u8], payload: &[u8]) {
    let Some(relay) = RELAY.get() else { return };
    if relay.accepting() {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return;
        };
        let mut body = relay.envelope(payload.len());
        body.extend_from_slice(payload);
        relay.offer(format!("{}bus:{topic}", relay.prefix), body);
    }
}

/// Sends a broadcast to `server`'s connections on the other hosts (to `room`, or to
/// all of them).
pub fn forward_broadcast(server: &str, room: Option<&str>, message: &Message) {
    let Some(relay) = RELAY.get() else { return };
    let (text, payload): (bool, &[u8]) = match message {
        Message::Text(text) => (true, text.as_bytes()),
        Message::Binary(bytes) => (false, bytes),
        _ => return,
    };
    if !relay.accepting() {
        return;
    }
    let mut body = relay.envelope(4 + room.map_or(0, str::len) + payload.len());
    if write_broadcast(&mut body, room, text, payload).is_none() {
        return;
    }
    relay.offer(format!("{}ws:{server}", relay.prefix), body);
}

/// Messages for other hosts that were lost (Redis away, queue full, not confirmed), if
/// the bus runs over Redis.
pub fn lost() -> Option<u64> {
    RELAY.get().map(|r| r.lost.load(Ordering::Relaxed))
}

impl Relay {
    /// Takes messages now; if not, counts one as lost.
    fn accepting(&self) -> bool {
        let up = self.up.load(Ordering::Relaxed);
        if !up {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        up
    }

    fn envelope(&self, more: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(MARK.len() + 8 + more);
        body.extend_from_slice(MARK);
        body.extend_from_slice(&self.origin.to_be_bytes());
        body
    }

    fn offer(&self, channel: String, body: Vec<u8>) {
        match self.queue.try_send((channel, body)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                let lost = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
                let mut logged = self.full_logged.lock().unwrap_or_else(|p| p.into_inner());
                if logged.is_none_or(|at| at.elapsed() >= FULL_LOG_INTERVAL) {
                    *logged = Some(Instant::now());
                    tracing::warn!(
                        redis = %self.shown_url,
                        capacity = self.queue.max_capacity(),
                        lost_total = lost,
                        "messages for other hosts dropped: the queue to Redis is full (they are published faster than Redis takes them)"
                    );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Connects, relays until the link fails, and connects again, for the life of the
    /// process.
    async fn run(
        self: Arc<Self>,
        client: redis::Client,
        mut rx: mpsc::Receiver<(String, Vec<u8>)>,
    ) {
        let mut retry = FIRST_RETRY;
        // Since when Redis has been out of reach, and how many were lost before that.
        let mut away: Option<(Instant, u64)> = None;
        loop {
            match self.connect(&client).await {
                Ok((conn, sink, stream)) => {
                    self.up.store(true, Ordering::SeqCst);
                    match away.take() {
                        None => tracing::info!(
                            redis = %self.shown_url,
                            prefix = %self.prefix,
                            "bus over Redis: connected; events and broadcasts reach the other hosts"
                        ),
                        Some((since, lost_before)) => tracing::info!(
                            redis = %self.shown_url,
                            away_s = since.elapsed().as_secs(),
                            lost = self.lost.load(Ordering::Relaxed) - lost_before,
                            lost_total = self.lost.load(Ordering::Relaxed),
                            "bus over Redis: connected again; messages for other hosts published while it was away were lost"
                        ),
                    }
                    let up_since = Instant::now();
                    let why = self.relay(conn, sink, stream, &mut rx).await;
                    if up_since.elapsed() >= STEADY {
                        retry = FIRST_RETRY;
                    }
                    away = Some((Instant::now(), self.go_down(&mut rx)));
                    tracing::warn!(
                        redis = %self.shown_url,
                        retry_in_s = retry.as_secs(),
                        "bus over Redis: lost the connection ({why}); HTTP and delivery on this host go on, messages for other hosts are lost (counted) until it is back"
                    );
                }
                Err(why) => {
                    if away.is_none() {
                        away = Some((Instant::now(), self.go_down(&mut rx)));
                        tracing::warn!(
                            redis = %self.shown_url,
                            retry_in_s = retry.as_secs(),
                            "bus over Redis: cannot connect ({why}); HTTP and delivery on this host go on; retrying with backoff (1 s doubling to 30 s)"
                        );
                    } else {
                        tracing::debug!(redis = %self.shown_url, "bus over Redis: still cannot connect ({why})");
                    }
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(LAST_RETRY);
        }
    }

    /// Stops taking messages; counts those still queued as lost. Returns the count of
    /// lost messages so far.
    fn go_down(&self, rx: &mut mpsc::Receiver<(String, Vec<u8>)>) -> u64 {
        self.up.store(false, Ordering::SeqCst);
        while rx.try_recv().is_ok() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        self.lost.load(Ordering::Relaxed)
    }

    async fn connect(
        &self,
        client: &redis::Client,
    ) -> Result<
        (
            redis::aio::MultiplexedConnection,
            redis::aio::PubSubSink,
            redis::aio::PubSubStream,
        ),
        String,
    > {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(ANSWER_WITHIN))
            .set_response_timeout(Some(ANSWER_WITHIN));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let pubsub = tokio::time::timeout(ANSWER_WITHIN, client.get_async_pubsub())
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut sink, stream) = pubsub.split();
        for kind in ["bus", "ws"] {
            let pattern = format!("{}{kind}:*", self.prefix);
            tokio::time::timeout(ANSWER_WITHIN, sink.psubscribe(&pattern))
                .await
                .map_err(|_| "no answer to PSUBSCRIBE".to_owned())?
                .map_err(|e| format!("PSUBSCRIBE {pattern}: {e}"))?;
        }
        Ok((conn, sink, stream))
    }

    /// Publishes what is queued and delivers what arrives, until the link fails; why.
    async fn relay(
        &self,
        mut conn: redis::aio::MultiplexedConnection,
        mut sink: redis::aio::PubSubSink,
        mut stream: redis::aio::PubSubStream,
        rx: &mut mpsc::Receiver<(String, Vec<u8>)>,
    ) -> String {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.receive(&message),
                    None => return "Redis closed the subscription".to_owned(),
                },
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return "the host is stopping".to_owned();
                    }
                    let mut pipe = redis::pipe();
                    for (channel, body) in batch.drain(..) {
                        pipe.cmd("PUBLISH").arg(channel).arg(body).ignore();
                    }
                    let sent = tokio::time::timeout(ANSWER_WITHIN, pipe.query_async::<()>(&mut conn)).await;
                    let failed = match sent {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some("no answer to PUBLISH".to_owned()),
                    };
                    if let Some(why) = failed {
                        self.lost.fetch_add(n as u64, Ordering::Relaxed);
                        return why;
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(ANSWER_WITHIN, sink.ping::<String>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.to_string(),
                        Err(_) => return "no answer to PING".to_owned(),
                    }
                }
            }
        }
    }

    /// Delivers a message from Redis on this host.
    fn receive(&self, message: &redis::Msg) {
        let Some(rest) = message.get_channel_name().strip_prefix(&self.prefix) else {
            return;
        };
        let raw = message.get_payload_bytes();
        let (origin, body) = match raw.strip_prefix(MARK) {
            Some(marked) if marked.len() >= 8 => {
                let (id, body) = marked.split_at(8);
                (
                    Some(u64::from_be_bytes(id.try_into().unwrap_or_default())),
                    body,
                )
            }
            _ => (None, raw),
        };
        if origin == Some(self.origin) {
            return;
        }
        if let Some(topic) = rest.strip_prefix("bus:") {
            Bus::get().publish(BusEvent {
                topic: Bytes::copy_from_slice(topic.as_bytes()),
                payload: Bytes::copy_from_slice(body),
            });
        } else if let Some(server) = rest.strip_prefix("ws:") {
            let Some(hub) = sockets::hub_named(server) else {
                return;
            };
            let broadcast = match origin {
                Some(_) => parse_broadcast(body),
                None => Some((None, body, std::str::from_utf8(body).is_ok())),
            };
            let Some((room, payload, text)) = broadcast else {
                tracing::debug!(channel = %message.get_channel_name(), "a malformed broadcast from Redis was ignored");
                return;
            };
            let payload = Bytes::copy_from_slice(payload);
            let message = if text {
                match Utf8Bytes::try_from(payload) {
                    Ok(text) => Message::Text(text),
                    Err(_) => return,
                }
            } else {
                Message::Binary(payload)
            };
            hub.broadcast(room, message, 0);
        }
    }
}

/// Appends a broadcast (after the envelope's mark and id); none if the room's name is
/// too long to be written.
fn write_broadcast(
    body: &mut Vec<u8>,
    room: Option<&str>,
    text: bool,
    payload: &[u8],
) -> Option<()> {
    body.push(if text { b't' } else { b'b' });
    match room {
        None => body.push(b'*'),
        Some(room) => {
            let len = u16::try_from(room.len()).ok()?;
            body.push(b'r');
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(room.as_bytes());
        }
    }
    body.extend_from_slice(payload);
    Some(())
}

/// A broadcast's room (none: every connection), payload, and whether it is text.
fn parse_broadcast(body: &[u8]) -> Option<(Option<&str>, &[u8], bool)> {
    let (&kind, rest) = body.split_first()?;
    let text = match kind {
        b't' => true,
        b'b' => false,
        _ => return None,
    };
    let (&target, rest) = rest.split_first()?;
    match target {
        b'*' => Some((None, rest, text)),
        b'r' => {
            let (len, rest) = rest.split_first_chunk::<2>()?;
            let len = u16::from_be_bytes(*len) as usize;
            if rest.len() < len {
                return None;
            }
            let (room, payload) = rest.split_at(len);
            Some((Some(std::str::from_utf8(room).ok()?), payload, text))
        }
        _ => None,
    }
}

/// An id for this host that another host is very unlikely to have.
fn host_id() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}

/// `url` with any password replaced by `***`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let user = if rest[..at].contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{user}@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            without_password("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            without_password("redis://:s3cret@cache:6379"),
            "redis://:***@cache:6379"
        );
        assert_eq!(
            without_password("redis://app:s3cret@cache/2"),
            "redis://app:***@cache/2"
        );
        assert_eq!(without_password("redis://token@cache"), "redis://***@cache");
        assert_eq!(
            without_password("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
    }

    #[test]
    fn broadcasts_parse_as_they_are_written() {
        let mut to_all = Vec::new();
        write_broadcast(&mut to_all, None, true, b"hi").unwrap();
        assert_eq!(to_all, b"t*hi");
        assert_eq!(parse_broadcast(&to_all), Some((None, &b"hi"[..], true)));
        let mut to_room = Vec::new();
        write_broadcast(&mut to_room, Some("room"), false, b"xy").unwrap();
        assert_eq!(
            parse_broadcast(&to_room),
            Some((Some("room"), &b"xy"[..], false))
        );
        let long = "r".repeat(70_000);
        assert!(write_broadcast(&mut Vec::new(), Some(&long), true, b"").is_none());
        assert_eq!(parse_broadcast(b"tr\x00\x09room"), None);
        assert_eq!(parse_broadcast(b"x*hi"), None);
        assert_eq!(parse_broadcast(b""), None);
    }
}

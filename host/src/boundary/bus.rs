//! The event bus between microservers, in process: topics, and an inbox per server.
//!
//! `publish` (a host function plugins call) queues an event for every server that
//! subscribes to its topic; control hands each server's events to its current
//! generation (`control::deliver`). A server's inbox belongs to the server, not to a
//! generation, so events published during a reload wait there for the new one.
//!
//! Invariants:
//! - Publishing never blocks: an inbox is a bounded queue, and an event that does not
//!   fit is dropped for that server, counted, and logged at most once per
//!   `DROP_LOG_INTERVAL` per server (with the count since the last line).
//! - An event's bytes are shared by every inbox it is queued in (not copied per
//!   subscriber).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

/// How often a server's dropped events are logged, at most.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One published event.
#[derive(Debug, Clone)]
pub struct BusEvent {
    pub topic: Bytes,
    pub payload: Bytes,
}

/// A server's queue of events.
#[derive(Debug)]
pub struct Inbox {
    pub server: Arc<str>,
    queue: mpsc::Sender<BusEvent>,
    /// Events dropped because the queue was full, ever.
    dropped: AtomicU64,
    /// When dropped events were last logged, and how many have been dropped since.
    drop_log: Mutex<(Option<Instant>, u64)>,
}

impl Inbox {
    /// An inbox holding at most `capacity` events, and the receiving end for whoever
    /// delivers them.
    pub fn new(server: Arc<str>, capacity: usize) -> (Arc<Inbox>, mpsc::Receiver<BusEvent>) {
        // Bounded above too: tokio refuses a channel of more than usize::MAX >> 3.
        let (queue, rx) = mpsc::channel(capacity.clamp(1, 1 << 24));
        let inbox = Inbox {
            server,
            queue,
            dropped: AtomicU64::new(0),
            drop_log: Mutex::new((None, 0)),
        };
        (Arc::new(inbox), rx)
    }

    /// How many events this server lost to a full queue.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn offer(&self, event: BusEvent) -> bool {
        match self.queue.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                let mut log = self.drop_log.lock().unwrap_or_else(|p| p.into_inner());
                log.1 += 1;
                let due = log.0.is_none_or(|at| at.elapsed() >= DROP_LOG_INTERVAL);
                if due {
                    let topic = String::from_utf8_lossy(&event.topic);
                    tracing::warn!(
                        server = %self.server,
                        %topic,
                        dropped = log.1,
                        dropped_total = self.dropped(),
                        capacity = self.queue.max_capacity(),
                        "bus events dropped: the server's queue is full (it handles events more slowly than they are published)"
                    );
                    *log = (Some(Instant::now()), 0);
                }
                false
            }
            // The server is gone; its delivery has ended.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Topics and who subscribes to them.
#[derive(Debug, Default)]
pub struct Bus {
    topics: RwLock<HashMap<Box<str>, Vec<Arc<Inbox>>>>,
}

impl Bus {
    /// The host's bus.
    pub fn get() -> &'static Bus {
        static BUS: OnceLock<Bus> = OnceLock::new();
        BUS.get_or_init(Bus::default)
    }

    /// Queues an event for every subscriber of its topic; how many took it.
    pub fn publish(&self, event: BusEvent) -> u64 {
        let Ok(topic) = std::str::from_utf8(&event.topic) else {
            return 0;
        };
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let Some(inboxes) = topics.get(topic) else {
            return 0;
        };
        inboxes
            .iter()
            .filter(|inbox| inbox.offer(event.clone()))
            .count() as u64
    }

    /// Makes `inbox` subscribe to exactly `topics` (none: it leaves the bus).
    pub fn subscribe(&self, inbox: &Arc<Inbox>, topics: &[Box<str>]) {
        let mut all = self.topics.write().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, inboxes| {
            inboxes.retain(|i| !Arc::ptr_eq(i, inbox));
            !inboxes.is_empty()
        });
        for topic in topics {
            all.entry(topic.clone()).or_default().push(inbox.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &'static str) -> BusEvent {
        BusEvent {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn events_reach_subscribers_of_their_topic_and_a_full_queue_drops_and_counts() {
        let bus = Bus::default();
        let (a, mut a_rx) = Inbox::new("a".into(), 2);
        let (b, mut b_rx) = Inbox::new("b".into(), 8);
        bus.subscribe(&a, &["t".into()]);
        bus.subscribe(&b, &["t".into(), "u".into()]);
        assert_eq!(bus.publish(event("t")), 2);
        assert_eq!(bus.publish(event("u")), 1);
        assert_eq!(bus.publish(event("nobody")), 0);
        assert_eq!(bus.publish(event("t")), 2);
        // `a` holds two: the third is dropped for it only.
        assert_eq!(bus.publish(event("t")), 1);
        assert_eq!(a.dropped(), 1);
        assert_eq!(b.dropped(), 0);
        assert_eq!(&a_rx.try_recv().unwrap().topic[..], b"t");
        assert_eq!(&b_rx.try_recv().unwrap().topic[..], b"t");
        assert_eq!(&b_rx.try_recv().unwrap().topic[..], b"u");
        // Subscribing again replaces the topics.
        bus.subscribe(&b, &[]);
        assert_eq!(bus.publish(event("u")), 0);
    }
}

//! The event bus between microservers: publish to a topic, and subscribe with
//! [`Routes::on_event`](crate::Routes::on_event).
//!
//! Delivery is asynchronous: `publish` queues the event for every server that
//! subscribes to the topic and returns at once (it never waits). Each server has a
//! bounded queue; when it is full, the event is dropped for that server, counted and
//! logged, and the publisher is not held up. A server's events are handed to its current
//! generation one at a time, in the order they were published, so they carry on across
//! reloads of the publisher and the subscriber.
//!
//! ```
//! # use std::sync::Arc;
//! # use plugin_api::{bus, Error, InitContext, Microserver, Request, Routes};
//! struct Shop;
//! impl Microserver for Shop {
//!     fn init(_: &InitContext<'_>) -> Result<Self, Error> { Ok(Shop) }
//!     fn routes(routes: &mut Routes<Self>) {
//!         routes.post("/orders", Self::order);
//!     }
//! }
//! impl Shop {
//!     async fn order(self: Arc<Self>, req: Request) -> Result<&'static str, Error> {
//!         let order: serde_json::Value = req.json()?;
//!         bus::publish_json("orders.created", &order)?;
//!         Ok("ordered")
//!     }
//! }
//!
//! struct Mailer;
//! impl Microserver for Mailer {
//!     fn init(_: &InitContext<'_>) -> Result<Self, Error> { Ok(Mailer) }
//!     fn routes(routes: &mut Routes<Self>) {
//!         routes.on_event("orders.created", Self::created);
//!     }
//! }
//! impl Mailer {
//!     async fn created(self: Arc<Self>, event: bus::Event) {
//!         let order: serde_json::Value = event.json().unwrap_or_default();
//!         plugin_api::tracing::info!(%order, "would send a mail");
//!     }
//! }
//! ```

use abi_stable::std_types::RStr;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ffi::{FfiBusEvent, FfiBytes};
use crate::Error;

/// Publishes `payload` under `topic`. Returns how many servers of this host it was
/// queued for (0 outside a host, or when nobody subscribes; with a shared backend, other
/// hosts get it too and are not counted). In a worker process (`isolation: "process"`)
/// the host publishes it, and this returns 1 once it is on its way there (0 if the
/// worker's queue to the host is full, and the event is dropped).
pub fn publish(topic: &str, payload: impl Into<Vec<u8>>) -> usize {
    let Some(publish) = crate::host::fns().and_then(|fns| fns.publish()) else {
        return 0;
    };
    publish(RStr::from_str(topic), FfiBytes::from_vec(payload.into())) as usize
}

/// Publishes `value` as JSON under `topic`.
pub fn publish_json<T: Serialize + ?Sized>(topic: &str, value: &T) -> Result<usize, Error> {
    let json = serde_json::to_vec(value)
        .map_err(|e| Error::internal(format!("cannot serialize an event: {e}")))?;
    Ok(publish(topic, json))
}

/// An event from the bus.
pub struct Event {
    topic: FfiBytes,
    payload: FfiBytes,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Event")
            .field("topic", &self.topic())
            .field("len", &self.payload.len())
            .finish()
    }
}

impl Event {
    pub(crate) fn from_ffi(event: FfiBusEvent) -> Self {
        Event {
            topic: event.topic,
            payload: event.payload,
        }
    }

    /// The topic it was published under.
    pub fn topic(&self) -> &str {
        std::str::from_utf8(self.topic.as_slice()).unwrap_or_default()
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        self.payload.as_slice()
    }

    /// The payload as text, if it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(self.payload()).ok()
    }

    /// The payload parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.payload())
            .map_err(|e| Error::bad_request(format!("invalid JSON event: {e}")))
    }
}

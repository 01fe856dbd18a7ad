//! Handing an event (a WebSocket connection's, or the bus's) to a server's current
//! generation, and the task that delivers a server's bus events.
//!
//! Invariant: an event enters the generation that is current when it is handed over,
//! and holds it (in flight, like a request) until its handler is done; a caller hands
//! one event at a time, so a reload sends each to exactly one generation, in order.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use abi_stable::std_types::RResult;
use bytes::Bytes;
use plugin_api::ffi::{FfiBusEvent, FfiBytes, FfiHandleResult, FfiSocketEvent};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::boundary::bulkhead::{Bounded, Turn};
use crate::boundary::bus::BusEvent;
use crate::boundary::call::{self, OutcomeSlot, PluginCall};
use crate::boundary::plugin;
use crate::boundary::worker::Delivered;
use crate::control::servers::{Generation, Server, ServerState};
use crate::routing::routes::RouteTable;

type InFlight = plugin::InFlight<RouteTable>;

/// Stands for "an event" where a route index is asked for (panic reports).
const EVENT_ROUTE: u32 = u32::MAX;

/// An event as a plugin receives it.
pub enum PluginEvent {
    Socket(FfiSocketEvent),
    Bus(FfiBusEvent),
}

/// Why an event's handler failed.
#[derive(Debug)]
pub enum Failure {
    /// It panicked (reported where it was caught, with the server and plugin).
    Panicked,
    TimedOut(Duration),
    /// The server is not serving (the reason).
    Unavailable(String),
}

/// An event's handler that did not finish on its first poll, with its generation (in
/// flight) and its deadline. Fields drop in order: the handler, then the guard.
pub struct Delivery {
    /// Each of its polls under a permit of its server's bulkhead.
    call: Bounded<PluginCall>,
    in_flight: InFlight,
    label: Arc<str>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Future for Delivery {
    type Output = Result<(), Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(mut outcome) = Pin::new(&mut this.call).poll(cx) {
            return Poll::Ready(settle(&mut outcome, &this.in_flight, &this.label));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Failure::TimedOut(this.timeout))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// How a handed-over event started.
pub enum Started {
    Done(Result<(), Failure>),
    Running(Delivery),
}

/// What an event handler's outcome means: a panic is reported like a route's, with
/// `label` (a connection or a topic) in place of a request id.
fn settle(outcome: &mut FfiHandleResult, in_flight: &InFlight, label: &str) -> Result<(), Failure> {
    match outcome {
        RResult::ROk(_) => Ok(()),
        RResult::RErr(panic) => {
            let g = in_flight.generation();
            g.panics.report(EVENT_ROUTE, "event", label, panic.as_str());
            let panics = &crate::operations::recording::meter(&g.server).panics;
            panics.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(Failure::Panicked)
        }
    }
}

/// Hands an event to the server's current generation and polls its handler once,
/// trying again (after a yield) if that generation retires in between. `make` builds
/// the event for the generation it will enter (`None`: that generation does not take
/// it, which is done).
pub async fn begin(
    server: &Server,
    make: &mut (dyn FnMut(&Generation) -> Option<PluginEvent> + Send),
    label: &Arc<str>,
    timeout: Duration,
) -> Started {
    let mut turn = Turn::default();
    loop {
        let step =
            std::future::poll_fn(|cx| begin_once(server, make, label, timeout, &mut turn, cx))
                .await;
        match step {
            Some(started) => return started,
            None => tokio::task::yield_now().await,
        }
    }
}

/// [`begin`]'s step; `None` if the generation retired between its load and the entry;
/// `Pending` while the server's bulkhead has no permit (`turn` keeps the place).
fn begin_once(
    server: &Server,
    make: &mut (dyn FnMut(&Generation) -> Option<PluginEvent> + Send),
    label: &Arc<str>,
    timeout: Duration,
    turn: &mut Turn,
    cx: &mut Context<'_>,
) -> Poll<Option<Started>> {
    let in_flight = match &**server.state() {
        ServerState::Serving(g) => match g.enter() {
            Some(in_flight) => in_flight,
            None => return Poll::Ready(None),
        },
        ServerState::Waiting(reason) => {
            let unavailable = Failure::Unavailable(reason.clone());
            return Poll::Ready(Some(Started::Done(Err(unavailable))));
        }
        ServerState::Worker(_) => {
            // Bus events reach a worker through `to_worker`; WebSocket events do not
            // come from one (it owns its connections).
            let reason = "its plugin runs in a worker process".to_owned();
            return Poll::Ready(Some(Started::Done(Err(Failure::Unavailable(reason)))));
        }
        ServerState::Static => {
            let reason = "it has no plugin, only static files".to_owned();
            return Poll::Ready(Some(Started::Done(Err(Failure::Unavailable(reason)))));
        }
    };
    let bulkhead = &in_flight.generation().bulkhead;
    let event_label = bulkhead.event_label();
    let polling = std::task::ready!(bulkhead.poll_enter(turn, event_label, cx));
    let Some(event) = make(in_flight.generation()) else {
        return Poll::Ready(Some(Started::Done(Ok(()))));
    };
    let mut slot = OutcomeSlot::new();
    let instance = &in_flight.generation().instance;
    let started = match event {
        PluginEvent::Socket(event) => call::start_event(instance, event, cx, &mut slot),
        PluginEvent::Bus(event) => call::start_bus_event(instance, event, cx, &mut slot),
    };
    drop(polling);
    Poll::Ready(Some(match started {
        None => {
            let outcome = slot.get_mut().expect("the call answered");
            let settled = settle(outcome, &in_flight, label);
            // What the plugin made is freed while its generation still counts the event.
            drop(slot);
            drop(in_flight);
            Started::Done(settled)
        }
        Some(call) => Started::Running(Delivery {
            call: Bounded::new(call, in_flight.generation().bulkhead.clone(), event_label),
            in_flight,
            label: label.clone(),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }),
    }))
}

/// Hands an event over and waits for its handler.
pub async fn hand_over(
    server: &Server,
    make: &mut (dyn FnMut(&Generation) -> Option<PluginEvent> + Send),
    label: &Arc<str>,
    timeout: Duration,
) -> Result<(), Failure> {
    match begin(server, make, label, timeout).await {
        Started::Done(done) => done,
        Started::Running(running) => running.await,
    }
}

/// Hands a bus event to the server's worker process when its plugin runs in one (a
/// worker retired meanwhile passes it to its successor, which may run in process:
/// `None` then too). `None`: it does not.
async fn to_worker(
    server: &Server,
    event: &BusEvent,
    timeout: Duration,
) -> Option<Result<(), Failure>> {
    loop {
        let worker = match &**server.state() {
            ServerState::Worker(w) => w.clone(),
            _ => return None,
        };
        let outcome = match worker.deliver(&event.topic, &event.payload, timeout).await {
            Delivered::Retired => {
                tokio::task::yield_now().await;
                continue;
            }
            Delivered::Done => Ok(()),
            Delivered::Panicked => Err(Failure::Panicked),
            Delivered::TimedOut => Err(Failure::TimedOut(timeout)),
            Delivered::Unavailable(reason) => Err(Failure::Unavailable(reason)),
        };
        return Some(outcome);
    }
}

/// Bytes the host lends a plugin for one event (empty: nothing to free).
pub fn lend(bytes: &Bytes) -> FfiBytes {
    if bytes.is_empty() {
        FfiBytes::empty()
    } else {
        FfiBytes::from_owner(bytes.clone())
    }
}

/// Delivers a server's bus events, one at a time, in order, each to the generation
/// current when it comes up; ends when the server is gone (its inbox closed).
pub async fn bus_events(
    server: Weak<Server>,
    mut events: mpsc::Receiver<BusEvent>,
    timeout: Duration,
) {
    while let Some(event) = events.recv().await {
        let Some(server) = server.upgrade() else {
            return;
        };
        let delivered = match to_worker(&server, &event, timeout).await {
            Some(delivered) => delivered,
            None => bus_event(&server, &event.topic, &event.payload, timeout).await,
        };
        match delivered {
            Ok(()) | Err(Failure::Panicked) => {}
            Err(Failure::TimedOut(t)) => tracing::warn!(
                server = %server.name,
                topic = %String::from_utf8_lossy(&event.topic),
                timeout_ms = t.as_millis() as u64,
                "a bus event handler timed out"
            ),
            Err(Failure::Unavailable(reason)) => tracing::debug!(
                server = %server.name,
                "a bus event was not delivered: the server is not serving ({reason})"
            ),
        }
    }
}

/// Hands one bus event to the server's current generation (in this process) and waits
/// for its handler.
pub async fn bus_event(
    server: &Server,
    topic: &Bytes,
    payload: &Bytes,
    timeout: Duration,
) -> Result<(), Failure> {
    let label: Arc<str> = format!("bus:{}", String::from_utf8_lossy(topic)).into();
    let mut make = |g: &Generation| {
        let subscription = g.routes.topic_index(topic)?;
        Some(PluginEvent::Bus(FfiBusEvent {
            subscription,
            topic: lend(topic),
            payload: lend(payload),
        }))
    };
    hand_over(server, &mut make, &label, timeout).await
}

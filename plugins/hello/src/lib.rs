//! `hello`: a greeting microserver. Run it with
//! `cargo xtask build-plugins && cargo run -p host`, then
//! `curl http://hello.localhost:7777/hello/world`.
//!
//! It shows the whole plugin API in one place: config, path parameters, the query
//! string, JSON in and out, headers, logging, the host's timer and server-sent events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plugin_api::stream::{unfold, Event};
use plugin_api::tracing::info;
use plugin_api::{export_plugin, Error, InitContext, Json, Microserver, Request, Response, Routes};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// The word each greeting starts with.
    greeting: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            greeting: "Hello".to_owned(),
        }
    }
}

pub struct Hello {
    greeting: String,
    served: AtomicU64,
}

impl Microserver for Hello {
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {
        // No `config` in servers.config.json: the defaults.
        let config: Config = ctx.config()?;
        info!(server = ctx.server_name(), greeting = %config.greeting, "hello is ready");
        Ok(Hello {
            greeting: config.greeting,
            served: AtomicU64::new(0),
        })
    }

    fn routes(routes: &mut Routes<Self>) {
        routes
            .get("/", Self::index)
            .get("/hello/{name}", Self::greet)
            .get("/greet/{first}/{last}", Self::greet_full)
            .post("/echo", Self::echo)
            .post("/echo-raw", Self::echo_raw)
            .get("/plain", Self::plain)
            .get("/bytes/{n}", Self::bytes)
            .get("/slow", Self::slow)
            .get("/events", Self::events);
    }
}

impl Hello {
    /// `GET /events?every_ms=1000`: server-sent events, a numbered tick every second
    /// (or every `every_ms`), for as long as the client listens. Try
    /// `curl -N http://hello.localhost:7777/events`.
    async fn events(self: Arc<Self>, req: Request) -> Response {
        let every = req
            .query_param("every_ms")
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_secs(1), Duration::from_millis);
        let greeting = self.greeting.clone();
        Response::sse(unfold(1u64, move |n| {
            let data = format!("{greeting} #{n}");
            async move {
                if n > 1 {
                    plugin_api::sleep(every).await;
                }
                Some((Event::data(data).event("tick").id(n.to_string()), n + 1))
            }
        }))
    }

    /// `GET /`: the greeting and how many requests this instance has served.
    async fn index(self: Arc<Self>, req: Request) -> Response {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        Response::text(format!(
            "{} from {}! (request {n} to this instance)\n",
            self.greeting,
            req.domain()
        ))
    }

    /// `GET /hello/{name}?shout=true`: a path parameter and a query parameter.
    async fn greet(self: Arc<Self>, req: Request) -> Response {
        let name = req.param("name").unwrap_or_default();
        let mut text = format!("{}, {name}!", self.greeting);
        if req.query_param("shout").as_deref() == Some("true") {
            text = text.to_uppercase();
        }
        Response::text(text + "\n")
    }

    /// `GET /greet/{first}/{last}`: two path parameters.
    async fn greet_full(self: Arc<Self>, req: Request) -> Response {
        let first = req.param("first").unwrap_or_default();
        let last = req.param("last").unwrap_or_default();
        Response::text(format!("{}, {first} {last}!\n", self.greeting))
    }

    /// `GET /plain`: the cheapest answer there is, a static body (no allocation).
    async fn plain(self: Arc<Self>, _req: Request) -> Response {
        Response::text("Hello, world!\n")
    }

    /// `GET /bytes/{n}`: `n` bytes of `x` (at most 1 MiB).
    async fn bytes(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let n: usize = req
            .param("n")
            .and_then(|n| n.parse().ok())
            .filter(|n| *n <= 1 << 20)
            .ok_or_else(|| Error::bad_request("n must be a number of bytes up to 1048576"))?;
        Ok(Response::new(200)
            .with_content_type("application/octet-stream")
            .with_body(vec![b'x'; n]))
    }

    /// `POST /echo-raw`: the request body back, untouched and not copied.
    async fn echo_raw(self: Arc<Self>, mut req: Request) -> Response {
        Response::new(200)
            .with_content_type("application/octet-stream")
            .with_body(req.take_body())
    }

    /// `POST /echo` with a JSON body: sends it back with some request details.
    async fn echo(self: Arc<Self>, req: Request) -> Result<Json<Value>, Error> {
        let body: Value = req.json()?;
        Ok(Json(json!({
            "you_sent": body,
            "domain": req.domain(),
            "request_id": req.request_id(),
            "content_type": req.header("content-type"),
        })))
    }

    /// `GET /slow?ms=200`: waits on the host's timer, then answers.
    async fn slow(self: Arc<Self>, req: Request) -> Result<Response, Error> {
        let ms: u64 = req
            .query_param("ms")
            .unwrap_or("100".into())
            .parse()
            .map_err(|_| Error::bad_request("ms must be a whole number of milliseconds"))?;
        plugin_api::sleep(Duration::from_millis(ms)).await;
        Ok(Response::text(format!("slept {ms} ms\n")))
    }
}

export_plugin!(Hello);

/// Handlers tested without a host (`plugin_api::testing`): `cargo test -p hello`.
#[cfg(test)]
mod tests {
    use plugin_api::testing::{TestRequest, TestServer};

    use super::Hello;

    fn hello() -> TestServer<Hello> {
        TestServer::start(serde_json::json!({"greeting": "Howdy"})).unwrap()
    }

    #[test]
    fn greets_by_path_and_query_parameter() {
        let server = hello();
        let r = server.get("/hello/ada%20l?shout=true");
        assert_eq!((r.status(), r.body()), (200, &b"HOWDY, ADA L!\n"[..]));
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        let r = server.get("/greet/ada/lovelace");
        assert_eq!(r.body(), b"Howdy, ada lovelace!\n");
    }

    #[test]
    fn echoes_json_and_refuses_bad_json_with_400() {
        let server = hello();
        let r = server.call(TestRequest::post("/echo").json(&serde_json::json!({"a": 1})));
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(body["you_sent"], serde_json::json!({"a": 1}));
        assert_eq!(body["content_type"], "application/json");
        let r = server.call(TestRequest::post("/echo").body("not json"));
        assert_eq!(r.status(), 400);
    }

    #[test]
    fn events_tick_as_server_sent_events() {
        let server = hello();
        let r = server.get("/events?every_ms=10");
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let body = server.read_stream(r, 60).unwrap();
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.starts_with("event: tick\nid: 1\ndata: Howdy #1\n\nevent: tick\nid: 2\n"),
            "{text}"
        );
    }

    #[test]
    fn waits_on_the_timer_and_refuses_a_bad_number() {
        let server = hello();
        let started = std::time::Instant::now();
        let r = server.get("/slow?ms=50");
        assert_eq!((r.status(), r.body()), (200, &b"slept 50 ms\n"[..]));
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(server.get("/slow?ms=soon").status(), 400);
    }

    #[test]
    fn counts_its_requests_and_uses_the_defaults_without_a_config() {
        let server = TestServer::<Hello>::start(serde_json::Value::Null).unwrap();
        assert_eq!(
            server.get("/").body(),
            b"Hello from test.localhost! (request 1 to this instance)\n"
        );
        assert_eq!(
            server.get("/").body(),
            b"Hello from test.localhost! (request 2 to this instance)\n"
        );
        assert_eq!(server.get("/nowhere").status(), 404);
        assert_eq!(server.call(TestRequest::new("DELETE", "/")).status(), 405);
    }
}

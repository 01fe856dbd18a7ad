//! `hello`: a greeting microserver. Run it with
//! `cargo xtask build-plugins && cargo run -p host`, then
//! `curl http://hello.localhost:7777/hello/world`.
//!
//! It shows the whole plugin API in one place: config, path parameters, the query
//! string, JSON in and out, headers, logging and the host's timer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
            .get("/slow", Self::slow);
    }
}

impl Hello {
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

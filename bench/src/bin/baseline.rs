//! `baseline`: bare hyper answering the same bytes as the host's `hello` plugin, with the
//! same hyper and tokio versions and connection settings, but no domain routing, no route
//! table and no plugin. It is what `cargo xtask bench` compares the host with.
//!
//! Usage: `baseline [--listen ADDR]` (default 127.0.0.1:7778; port 0 picks one). It
//! prints `listening on http://ADDR` on stderr once ready.

use std::convert::Infallible;
use std::net::SocketAddr;

use bench::{request_id, status, X_REQUEST_ID};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

const TEXT: &str = "text/plain; charset=utf-8";
const BINARY: &str = "application/octet-stream";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:7778".parse().expect("valid");
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr.parse().expect("--listen takes IP:port"),
            _ => {
                eprintln!("usage: baseline [--listen ADDR]");
                std::process::exit(2);
            }
        }
    }
    // The same runtime as the host: multi-threaded, one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench::serve(listen, answer));
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let (content_type, body) = match (&parts.method, segments.as_slice()) {
        (&Method::GET, ["plain"]) => (TEXT, Bytes::from_static(b"Hello, world!\n")),
        (&Method::GET, ["greet", first, last]) => {
            (TEXT, Bytes::from(format!("Hello, {first} {last}!\n")))
        }
        (&Method::GET, ["bytes", n]) => match n.parse::<usize>() {
            Ok(n) if n <= 1 << 20 => (BINARY, Bytes::from(vec![b'x'; n])),
            _ => return Ok(status(StatusCode::BAD_REQUEST)),
        },
        (&Method::POST, ["echo-raw"]) => match Limited::new(body, 1 << 20).collect().await {
            Ok(collected) => (BINARY, collected.to_bytes()),
            Err(_) => return Ok(status(StatusCode::PAYLOAD_TOO_LARGE)),
        },
        _ => return Ok(status(StatusCode::NOT_FOUND)),
    };
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_REQUEST_ID.clone(), request_id());
    Ok(response)
}

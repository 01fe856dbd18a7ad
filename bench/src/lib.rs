//! Benchmark support. The crate's real content is the `baseline` binary (the physical
//! limit the host is compared with: bare hyper, same versions and runtime settings, no
//! routing, no plugin) and the criterion benches in `benches/`.
//!
//! What the baseline servers share is here: their accept loop and connection settings
//! (the host's), the request id header, a bare status response, and the SQLite
//! servers' command line.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

/// Accepts connections on `listen` forever and answers each request with `answer`, with
/// the host's connection settings (HTTP/1 and HTTP/2, no delay, a 30 s header timeout,
/// at most 100 headers). Prints `listening on http://ADDR` on stderr once bound.
pub async fn serve<A, F>(listen: SocketAddr, answer: A)
where
    A: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    eprintln!(
        "listening on http://{}",
        listener.local_addr().expect("addr")
    );
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_headers(100);
        let answer = answer.clone();
        tokio::spawn(async move {
            let conn =
                builder.serve_connection_with_upgrades(TokioIo::new(stream), service_fn(answer));
            let _ = conn.await;
        });
    }
}

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An empty response with `code`.
pub fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// A 16-hex-digit id, as the host sends, made the same cheap way (no formatting
/// machinery: a baseline must not be slower than it needs to be).
pub fn request_id() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0x5eed);
    let n = NEXT
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}

/// The command line of the SQLite servers (`sqlite-baseline`, `sqlite-axum`):
/// `--database FILE [--listen ADDR]`, `listen` by default; and a multi-threaded runtime
/// (the host's) to serve on. Exits with the usage line if the arguments are wrong.
pub fn sqlite_server(name: &str, listen: &str) -> (SocketAddr, String, tokio::runtime::Runtime) {
    let usage = || -> ! {
        eprintln!("usage: {name} --database FILE [--listen ADDR]");
        std::process::exit(2);
    };
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = listen.parse().expect("valid");
    let mut database = None;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr.parse().expect("--listen takes IP:port"),
            ("--database", Some(file)) => database = Some(file),
            _ => usage(),
        }
    }
    let Some(database) = database else { usage() };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (listen, database, runtime)
}

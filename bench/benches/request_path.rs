//! Criterion micro-benchmarks of the pieces on the request path:
//! domain lookup (1 and 10,000 domains, exact and wildcard), host normalisation, route
//! matching, and one plugin call across the boundary compared with the same handler
//! called directly in-process.
//!
//! `cargo bench -p bench` (builds the release `hello` plugin itself).

use plugin_api::ffi::FfiSockets;
use std::borrow::Cow;
use std::future::Future;
use std::hint::black_box;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use abi_stable::std_types::RResult;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use host::boundary::call::{self, ClientAddr, Lending, LentBody, OutcomeSlot, PendingRequest};
use host::boundary::loader;
use host::boundary::plugin::Instance;
use host::boundary::request_id::RequestId;
use host::routing::domain::{normalize_host, DomainPattern, DomainTable};
use host::routing::routes::{RouteMatch, RouteTable};

fn table(n: usize, wildcards: usize) -> DomainTable<usize> {
    let mut t = DomainTable::default();
    for i in 0..n {
        t.insert(
            &DomainPattern::parse(&format!("d{i}.bench.localhost")).unwrap(),
            i,
        );
    }
    for i in 0..wildcards {
        t.insert(
            &DomainPattern::parse(&format!("*.w{i}.example.com")).unwrap(),
            i,
        );
    }
    t
}

fn domains(c: &mut Criterion) {
    let one = table(1, 0);
    let many = table(10_000, 100);
    c.bench_function("domain lookup, 1 domain, exact", |b| {
        b.iter(|| one.lookup(black_box("d0.bench.localhost")))
    });
    c.bench_function("domain lookup, 10k domains, exact", |b| {
        b.iter(|| many.lookup(black_box("d4242.bench.localhost")))
    });
    c.bench_function("domain lookup, 10k domains, wildcard", |b| {
        b.iter(|| many.lookup(black_box("api.v2.w42.example.com")))
    });
    c.bench_function("domain lookup, 10k domains, miss", |b| {
        b.iter(|| many.lookup(black_box("nobody.example.org")))
    });
    c.bench_function("normalize Host header", |b| {
        b.iter(|| normalize_host(black_box("hello.localhost:7777")))
    });
}

fn routes(c: &mut Criterion) {
    let routes = RouteTable::new(
        [
            ("GET", "/"),
            ("GET", "/hello/{name}"),
            ("GET", "/greet/{first}/{last}"),
            ("POST", "/echo"),
            ("POST", "/echo-raw"),
            ("GET", "/plain"),
            ("GET", "/bytes/{n}"),
            ("GET", "/slow"),
        ],
        None,
    )
    .unwrap();
    c.bench_function("route match, static path", |b| {
        b.iter(|| {
            matches!(
                routes.find(black_box("GET"), black_box("/plain")),
                RouteMatch::Found { .. }
            )
        })
    });
    c.bench_function("route match, two parameters", |b| {
        b.iter(|| {
            matches!(
                routes.find(black_box("GET"), black_box("/greet/ada/lovelace")),
                RouteMatch::Found { .. }
            )
        })
    });
}

/// Builds the release `hello` plugin and returns its path.
fn hello_library() -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "hello"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("run cargo");
    assert!(status.success());
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release"))
        .join(format!("libhello{}", std::env::consts::DLL_SUFFIX))
}

/// Polls a future that is ready at once (as these handlers are) to completion.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// What an in-process framework does for the same handler: a boxed handler behind
/// dynamic dispatch returns a boxed future, which builds a response with one header and
/// a static body.
type InProcessHandler = Box<
    dyn Fn(
            &hyper::http::request::Parts,
        ) -> std::pin::Pin<Box<dyn Future<Output = InProcessResponse> + Send>>
        + Send
        + Sync,
>;

struct InProcessResponse {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static [u8],
}

fn plain_in_process() -> InProcessHandler {
    Box::new(|_parts| {
        Box::pin(async {
            InProcessResponse {
                status: 200,
                headers: vec![("content-type", "text/plain; charset=utf-8")],
                body: b"Hello, world!\n",
            }
        })
    })
}

fn request_parts() -> hyper::http::request::Parts {
    hyper::Request::get("http://hello.localhost/plain")
        .header("host", "hello.localhost")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn plugin_call(c: &mut Criterion) {
    let copies = loader::private_copies_dir().unwrap();
    let library = Arc::new(loader::load(&hello_library(), &copies).unwrap());
    let (instance, declared) =
        Instance::create(library, "hello", "null", None, FfiSockets::empty()).unwrap();
    let routes = RouteTable::new(
        declared
            .routes
            .iter()
            .map(|(m, p)| (m.as_str(), p.as_str())),
        declared.fallback,
    )
    .unwrap();
    let client = ClientAddr::new("127.0.0.1:50000".parse().unwrap());
    // Made once: a made id is copied into the record, as on the request path.
    let id = RequestId::next();
    let RouteMatch::Found { route, .. } = routes.find("GET", "/plain") else {
        panic!("hello has /plain")
    };

    // Both arms build the request's `Parts` (as hyper would) and drop everything after,
    // so the difference between them is the boundary.
    c.bench_function(
        "plugin call round trip (hello /plain, across the boundary)",
        |b| {
            b.iter(|| {
                let pending = PendingRequest::new(request_parts(), &client, id.clone());
                let lent = pending.lend(LentBody::Bytes(Bytes::new()), |_, _| {
                    let domain = Cow::Borrowed(&b"hello.localhost"[..]);
                    Ok::<_, ()>((
                        Lending {
                            domain,
                            route,
                            stream_body_limit: None,
                            socket: None,
                            header: None,
                        },
                        (),
                    ))
                });
                let Ok((request, ())) = lent else {
                    unreachable!("always lent")
                };
                let mut slot = OutcomeSlot::new();
                let mut cx = Context::from_waker(Waker::noop());
                assert!(call::start(&instance, request, &mut cx, &mut slot).is_none());
                match slot.get_mut() {
                    Some(RResult::ROk(response)) => black_box(response.body.len()),
                    _ => panic!("hello answers /plain"),
                }
            })
        },
    );
    let direct = plain_in_process();
    c.bench_function(
        "direct in-process call (same handler, boxed like a framework)",
        |b| {
            b.iter(|| {
                let parts = request_parts();
                let response = ready(direct(black_box(&parts)));
                black_box((response.status, response.headers.len(), response.body.len()))
            })
        },
    );
    let _ = std::fs::remove_dir_all(copies);
}

criterion_group!(benches, domains, routes, plugin_call);
criterion_main!(benches);

//! Listening sockets, connections, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::servers::Microservers;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds every address, or names the one that failed.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, String> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves until `stop` completes, then stops accepting and lets open connections finish
/// their requests for up to `grace`. Returns true if every connection finished in time.
pub async fn serve(
    servers: Arc<Microservers>,
    listeners: Vec<TcpListener>,
    stop: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> bool {
    let (tx, mut accepted) = mpsc::channel::<(TcpStream, SocketAddr)>(64);
    let mut acceptors = Vec::new();
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("listening on http://{addr}");
        }
        let tx = tx.clone();
        acceptors.push(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok(conn) => {
                        if tx.send(conn).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // Usually out of file descriptors; back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    drop(tx);

    let limits = servers.routing().limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(limits.max_headers);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            conn = accepted.recv() => {
                let Some((stream, peer)) = conn else { break };
                let _ = stream.set_nodelay(true);
                let servers = servers.clone();
                let service = service_fn(move |req| {
                    let servers = servers.clone();
                    async move { crate::http::handle(&servers, req, peer).await }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended with an error: {e}");
                    }
                });
            }
            () = &mut stop => break,
        }
    }
    for acceptor in acceptors {
        acceptor.abort();
    }
    tracing::info!(
        "stopped accepting; waiting up to {} ms for open requests",
        grace.as_millis()
    );
    tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok()
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

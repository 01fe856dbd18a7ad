//! `ws-baseline`: a bare tokio-tungstenite echo server (the handshake by tungstenite, no
//! routing, no plugin), with the host's runtime. It is what `cargo xtask bench-ws`
//! compares the host's WebSocket echo with.
//!
//! Usage: `ws-baseline [--listen ADDR]` (default 127.0.0.1:0). It prints
//! `listening on http://ADDR` on stderr once ready.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("valid");
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr.parse().expect("--listen takes IP:port"),
            _ => {
                eprintln!("usage: ws-baseline [--listen ADDR]");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        eprintln!(
            "listening on http://{}",
            listener.local_addr().expect("addr")
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                // The host's read buffer (tungstenite's default of 128 KiB is zeroed
                // at every read, which would flatter the host).
                let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(4 * 1024);
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

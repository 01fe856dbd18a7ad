//! `ws-load`: the WebSocket load generator of `cargo xtask bench-ws`.
//!
//! - `ws-load echo ADDR DOMAIN PATH CONNECTIONS SECONDS`: each connection sends a
//!   32-byte binary message and waits for it to come back, again and again; prints
//!   `messages N` (round trips in all).
//! - `ws-load hold ADDR DOMAIN PATH CONNECTIONS`: opens the connections (to the sockets
//!   fixture), prints `open N`, then takes commands on stdin, one per line:
//!   `broadcast` (connection 0 sends `all:<tag>`; prints `broadcast_ms T`, the time
//!   until every connection has it), `check` (each connection sends `seq:1`; prints
//!   `closed C answered A variants V`), `quit`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(addr: SocketAddr, domain: &str, path: &str) -> Ws {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let request = format!("ws://{domain}{path}")
        .into_client_request()
        .expect("request");
    tokio_tungstenite::client_async(request, stream)
        .await
        .expect("handshake")
        .0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("usage: ws-load echo|hold ADDR DOMAIN PATH CONNECTIONS [SECONDS]");
        std::process::exit(2)
    };
    if args.len() < 5 {
        usage();
    }
    let addr: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
    let (domain, path) = (args[2].clone(), args[3].clone());
    let n: usize = args[4].parse().unwrap_or_else(|_| usage());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args[0].as_str() {
        "echo" => {
            let seconds: u64 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(5);
            let total = runtime.block_on(echo(addr, &domain, &path, n, seconds));
            println!("messages {total}");
        }
        "hold" => runtime.block_on(hold(addr, &domain, &path, n)),
        _ => usage(),
    }
}

async fn echo(addr: SocketAddr, domain: &str, path: &str, n: usize, seconds: u64) -> u64 {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(connect(addr, domain, path).await);
    }
    let until = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let payload = vec![7u8; 32];
                let mut count = 0u64;
                while Instant::now() < until {
                    if ws.send(Message::binary(payload.clone())).await.is_err() {
                        break;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Binary(_))) => count += 1,
                        _ => break,
                    }
                }
                count
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

#[derive(Clone, Debug)]
enum Command {
    Broadcast(String),
    Check,
}

enum Seen {
    Tag,
    Answer(String),
    Closed,
}

async fn hold(addr: SocketAddr, domain: &str, path: &str, n: usize) {
    let (commands, _) = broadcast::channel::<Command>(16);
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    for i in 0..n {
        let mut ws = connect(addr, domain, path).await;
        let mut commands = commands.subscribe();
        let seen = seen_tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = ws.next() => match message {
                        Some(Ok(Message::Text(t))) => {
                            // (A broadcast may arrive before this task saw its command.)
                            if t.starts_with("tag") {
                                let _ = seen.send(Seen::Tag);
                            } else if !t.starts_with("closed:") {
                                let _ = seen.send(Seen::Answer(t.as_str().to_owned()));
                            }
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                            let _ = seen.send(Seen::Closed);
                            return;
                        }
                        Some(Ok(_)) => {}
                    },
                    command = commands.recv() => match command {
                        Ok(Command::Broadcast(t)) => {
                            if i == 0 {
                                let _ = ws.send(Message::text(format!("all:{t}"))).await;
                            }
                        }
                        Ok(Command::Check) => {
                            let _ = ws.send(Message::text("seq:1")).await;
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    }
    println!("open {n}");
    let mut closed = 0usize;
    // Commands are read on a thread of their own (blocking reads).
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut round = 0;
    while let Some(line) = lines.recv().await {
        match line.trim() {
            "broadcast" => {
                round += 1;
                let tag = format!("tag{round}");
                let started = Instant::now();
                let _ = commands.send(Command::Broadcast(tag));
                let mut got = 0;
                while got + closed < n {
                    match tokio::time::timeout(Duration::from_secs(60), seen.recv()).await {
                        Ok(Some(Seen::Tag)) => got += 1,
                        Ok(Some(Seen::Closed)) => closed += 1,
                        Ok(Some(Seen::Answer(_))) => {}
                        _ => break,
                    }
                }
                println!(
                    "broadcast_ms {:.1} received {got}",
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
            "check" => {
                let _ = commands.send(Command::Check);
                let mut answered = 0;
                let mut variants = std::collections::BTreeSet::new();
                while answered + closed < n {
                    match tokio::time::timeout(Duration::from_secs(60), seen.recv()).await {
                        Ok(Some(Seen::Answer(a))) => {
                            answered += 1;
                            variants.insert(a.split(':').next().unwrap_or("").to_owned());
                        }
                        Ok(Some(Seen::Closed)) => closed += 1,
                        Ok(Some(Seen::Tag)) => {}
                        _ => break,
                    }
                }
                let variants: Vec<String> = variants.into_iter().collect();
                println!(
                    "closed {closed} answered {answered} variants {}",
                    variants.join(",")
                );
            }
            "quit" => std::process::exit(0),
            _ => {}
        }
    }
}

//! A headless Chromium (Debian package `chromium`; `.ci/run` installs it) driven over
//! the DevTools protocol: open a page, evaluate JavaScript in it, wait for it to show
//! something.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

use super::{temp_dir, Ws};

/// A GET of Chromium's DevTools HTTP endpoint, which keeps the connection open: the
/// body is read by its length.
fn devtools_get(port: u16, path: &str) -> Value {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// A headless Chromium driven over the DevTools protocol.
pub struct Browser {
    child: Child,
    page: Ws,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
        .expect("this test needs Chromium: apt-get install -y chromium (.ci/run installs it)")
}

impl Browser {
    pub fn open(url: &str) -> Browser {
        let profile = temp_dir("chromium");
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // Chromium writes the port it took to this file.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()))
            {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let target = loop {
            let list = devtools_get(port, "/json/list");
            let page = list.as_array().and_then(|targets| {
                targets
                    .iter()
                    .find(|t| t["type"] == "page" && t["url"].as_str() == Some(url))
                    .cloned()
            });
            if let Some(page) = page {
                break page;
            }
            assert!(Instant::now() < deadline, "no page for {url}: {list}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let ws_url = target["webSocketDebuggerUrl"].as_str().unwrap().to_owned();
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (page, _) = tungstenite::client(ws_url.into_client_request().unwrap(), stream)
            .expect("connect to the page");
        Browser {
            child,
            page,
            next_id: 1,
        }
    }

    /// Evaluates `expression` in the page; its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let call = json!({"id": id, "method": "Runtime.evaluate",
                          "params": {"expression": expression, "returnByValue": true}});
        self.page.send(Message::text(call.to_string())).unwrap();
        loop {
            let Message::Text(reply) = self.page.read().unwrap() else {
                continue;
            };
            let reply: Value = serde_json::from_str(reply.as_str()).unwrap();
            if reply["id"] == id {
                assert!(reply["result"]["exceptionDetails"].is_null(), "{reply}");
                return reply["result"]["result"]["value"].clone();
            }
        }
    }

    /// Evaluates `expression` until it is true.
    pub fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.eval(expression) != json!(true) {
            if Instant::now() > deadline {
                let page = self.eval("location.href + '\\n' + document.documentElement.outerHTML");
                panic!("the page never showed {what}: {page}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

//! What a server adds to its responses: security headers (`servers[].headers`, HSTS on
//! TLS only), CORS (`servers[].cors`: preflights answered by the host) and compression
//! (`servers[].compression`: gzip, br and zstd by `Accept-Encoding`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{Host, Reply, Setup};

/// A response as it came, its body de-chunked but not decoded.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every field of `name`, joined as one list.
    fn list(&self, name: &str) -> String {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        values.join(", ").to_ascii_lowercase()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body, decoded by its `Content-Encoding`.
    fn decoded(&self) -> Vec<u8> {
        decode(self.header("content-encoding"), &self.body)
    }
}

fn decode(encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some("br") => {
            brotli_decompressor::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some("zstd") => out = zstd::stream::decode_all(body).unwrap(),
        Some(other) => panic!("unexpected content-encoding {other}"),
    }
    out
}

/// Splits a raw HTTP/1.1 response into its head and its body (de-chunked).
fn parse(raw: &[u8]) -> Answer {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(raw)));
    let Reply {
        status, headers, ..
    } = Reply::parse(&raw[..end + 4]);
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body).0;
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// The data of the complete chunks in `raw`, and whether the last chunk came.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return (out, true);
        }
        let start = line_end + 2;
        if raw.len() < start + size + 2 {
            return (out, false);
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = &raw[start + size + 2..];
    }
}

/// One request on a new connection; reads until the host closes it.
fn fetch(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

fn get(host: &Host, domain: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    fetch(host.addr, "GET", domain, path, headers, b"")
}

/// A set-up with `hello` and the misbehaving fixture installed, and a static folder
/// `site/` holding text large and small, a style sheet, an image and a file for ranges.
fn setup(label: &str, config: &str) -> Setup {
    let setup = Setup::new(label, config)
        .plugin("hello", "hello.so")
        .plugin("fixture-misbehave", "misbehave.so");
    let site = setup.dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("big.txt"), big_text(4000)).unwrap();
    std::fs::write(site.join("style.css"), big_text(3000)).unwrap();
    std::fs::write(site.join("small.txt"), "a few bytes\n").unwrap();
    // Not a real PNG; its type comes from its name.
    std::fs::write(site.join("logo.png"), big_text(5000)).unwrap();
    setup
}

/// `n` bytes of text that compresses well.
fn big_text(n: usize) -> String {
    "All work and no play makes Jack a dull boy.\n"
        .chars()
        .cycle()
        .take(n)
        .collect()
}

/// A config with `global` (its object's inside) and these servers.
fn servers_config(global: &str, servers: &[String]) -> String {
    format!(
        r#"{{"global": {{{global}}}, "servers": [{}]}}"#,
        servers.join(", ")
    )
}

/// A server entry named `name` at `<name>.localhost` and `<name>.test`, with `site/` as
/// its static folder and `extra` (`, "key": value...`).
fn server(name: &str, plugin: &str, extra: &str) -> String {
    format!(
        r#"{{"name": "{name}", "domains": ["{name}.localhost", "{name}.test"], "plugin": "{plugin}",
            "config": {{"greeting": "Howdy"}}, "static": {{"root": "site"}}{extra}}}"#
    )
}

fn assert_security_defaults(a: &Answer, what: &str) {
    assert_eq!(
        a.header("x-content-type-options"),
        Some("nosniff"),
        "{what}: {a:?}"
    );
    assert_eq!(
        a.header("referrer-policy"),
        Some("strict-origin-when-cross-origin"),
        "{what}"
    );
    assert_eq!(a.header("x-frame-options"), Some("SAMEORIGIN"), "{what}");
    assert_eq!(a.header("content-security-policy"), None, "{what}");
    assert_eq!(a.header("strict-transport-security"), None, "{what}");
}

#[test]
fn security_headers_are_on_by_default_and_the_plugins_own_win() {
    let config = servers_config(
        "",
        &[server("hello", "hello", ""), server("bad", "misbehave", "")],
    );
    let host = setup("headers-default", &config).start();
    // A plugin's answer, the host's own 404 and 405, and a static file: all of them.
    let plain = get(&host, "hello.localhost", "/plain", &[]);
    assert_eq!(plain.status, 200);
    assert_security_defaults(&plain, "a plugin's answer");
    let missing = get(&host, "hello.localhost", "/no/such/thing", &[]);
    assert_eq!(missing.status, 404);
    assert_security_defaults(&missing, "the host's 404");
    let not_allowed = fetch(host.addr, "DELETE", "hello.localhost", "/plain", &[], b"");
    assert_eq!(not_allowed.status, 405);
    assert_security_defaults(&not_allowed, "the host's 405");
    let file = get(&host, "hello.localhost", "/small.txt", &[]);
    assert_eq!((file.status, file.text().as_str()), (200, "a few bytes\n"));
    assert_security_defaults(&file, "a static file");
    // A slow handler (answered after its first poll) too.
    let slow = get(&host, "hello.localhost", "/slow?ms=20", &[]);
    assert_security_defaults(&slow, "a handler that awaited");
    // No CORS and no compression unless asked for.
    let origin = get(
        &host,
        "hello.localhost",
        "/big.txt",
        &[
            ("origin", "https://app.example"),
            ("accept-encoding", "gzip, br, zstd"),
        ],
    );
    assert_eq!(origin.header("access-control-allow-origin"), None);
    assert_eq!(origin.header("content-encoding"), None);
    assert_eq!(origin.body, big_text(4000).as_bytes());

    // The plugin's own headers win; the ones it did not set are added.
    let own = get(&host, "bad.localhost", "/own-headers", &[]);
    assert_eq!(own.header("x-frame-options"), Some("DENY"));
    assert_eq!(own.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(own.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        own.headers
            .iter()
            .filter(|(k, _)| k == "x-frame-options")
            .count(),
        1
    );
}

#[test]
fn security_headers_are_changed_and_turned_off_per_server_and_live() {
    let config = |csp: &str| {
        servers_config(
            r#""reload": {"debounce_ms": 20}"#,
            &[
                server(
                    "custom",
                    "hello",
                    &format!(
                        r#", "headers": {{"content_security_policy": "{csp}", "frame_options": "deny",
                             "referrer_policy": "no-referrer, strict-origin", "content_type_options": false}}"#
                    ),
                ),
                server("off", "hello", r#", "headers": false"#),
                server(
                    "bad",
                    "misbehave",
                    r#", "headers": {"frame_options": false}"#,
                ),
            ],
        )
    };
    let host = setup("headers-custom", &config("default-src 'self'")).start();
    let custom = get(&host, "custom.localhost", "/plain", &[]);
    assert_eq!(
        custom.header("content-security-policy"),
        Some("default-src 'self'")
    );
    assert_eq!(custom.header("x-frame-options"), Some("DENY"));
    assert_eq!(
        custom.header("referrer-policy"),
        Some("no-referrer, strict-origin")
    );
    assert_eq!(custom.header("x-content-type-options"), None);
    let off = get(&host, "off.localhost", "/plain", &[]);
    assert_eq!(off.status, 200);
    for name in [
        "x-content-type-options",
        "referrer-policy",
        "x-frame-options",
        "content-security-policy",
    ] {
        assert_eq!(off.header(name), None, "{name}: {off:?}");
    }
    // One header off; the others stay; what the plugin sets is still its own.
    let one_off = get(&host, "bad.localhost", "/ok", &[]);
    assert_eq!(one_off.header("x-frame-options"), None);
    assert_eq!(one_off.header("x-content-type-options"), Some("nosniff"));

    // A config change applies to the next request, with no new generation.
    host.write_config(&config("default-src 'none'; frame-ancestors 'none'"));
    host.wait_until("the new policy is sent", || {
        get(&host, "custom.localhost", "/plain", &[]).header("content-security-policy")
            == Some("default-src 'none'; frame-ancestors 'none'")
    });
    assert_eq!(host.count_log_lines(&["server=custom", "generation=2"]), 0);
}

/// One HTTPS request (HTTP/1.1) to `addr` for `name`, trusting `ca` (PEM).
fn https_get(addr: SocketAddr, name: &str, ca: &Path, path: &str) -> Answer {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET {path} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify, after the whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => panic!("read: {e}"),
    }
    parse(&raw)
}

#[test]
fn hsts_is_sent_over_tls_only_and_never_for_localhost_names() {
    let config = servers_config(
        r#""listen": ["127.0.0.1:0", {"address": "127.0.0.1:0", "tls": true}],
           "tls": {"self_signed": true}"#,
        &[
            server("hello", "hello", ""),
            server(
                "long",
                "hello",
                r#", "headers": {"hsts": {"max_age_s": 63072000, "include_subdomains": true, "preload": true}}"#,
            ),
            server("nohsts", "hello", r#", "headers": {"hsts": false}"#),
        ],
    );
    let host = setup("headers-hsts", &config).start_with_config_listen();
    let https = host.https_addr();
    host.wait_for_log(&["made a development certificate"]);
    let ca = host.dir().join(".dev-tls/ca.pem");

    let secure = https_get(https, "hello.test", &ca, "/plain");
    assert_eq!(secure.status, 200);
    assert_eq!(
        secure.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    assert_eq!(secure.header("x-content-type-options"), Some("nosniff"));
    // The same server over plain HTTP: no HSTS (RFC 6797 has browsers ignore it there).
    let plain = get(&host, "hello.test", "/plain", &[]);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("strict-transport-security"), None);
    // A development name: none, or browsers would send every port of it to HTTPS.
    let dev = https_get(https, "hello.localhost", &ca, "/plain");
    assert_eq!(dev.status, 200);
    assert_eq!(dev.header("strict-transport-security"), None);

    let long = https_get(https, "long.test", &ca, "/plain");
    assert_eq!(
        long.header("strict-transport-security"),
        Some("max-age=63072000; includeSubDomains; preload")
    );
    let off = https_get(https, "nohsts.test", &ca, "/plain");
    assert_eq!(off.status, 200);
    assert_eq!(off.header("strict-transport-security"), None);
    assert_eq!(off.header("x-frame-options"), Some("SAMEORIGIN"));
}

const APP: &str = "https://app.example";

#[test]
fn cors_preflights_are_answered_by_the_host_and_actual_requests_get_their_headers() {
    let config = servers_config(
        "",
        &[
            server(
                "api",
                "hello",
                r#", "cors": {"origins": ["https://app.example", "https://*.apps.example", "http://localhost:3000"],
                             "headers": ["content-type", "x-token"], "credentials": true,
                             "max_age_s": 600, "expose_headers": ["x-request-id"]}"#,
            ),
            server(
                "open",
                "hello",
                r#", "cors": {"origins": "*", "methods": ["GET", "POST"]}"#,
            ),
            server(
                "bad",
                "misbehave",
                r#", "cors": {"origins": ["https://app.example"]}"#,
            ),
        ],
    );
    let host = setup("headers-cors", &config).start();
    let preflight = |domain: &str, origin: &str, method: &str, asked: Option<&str>| {
        let mut headers = vec![
            ("origin", origin),
            ("access-control-request-method", method),
        ];
        if let Some(asked) = asked {
            headers.push(("access-control-request-headers", asked));
        }
        fetch(host.addr, "OPTIONS", domain, "/echo", &headers, b"")
    };

    // An allowed origin: 204 with everything the browser checks (hello has no OPTIONS
    // route: the plugin would have answered 405).
    for origin in [APP, "https://a.b.apps.example", "http://localhost:3000"] {
        let r = preflight("api.localhost", origin, "PUT", Some("content-type,x-token"));
        assert_eq!(r.status, 204, "{origin}: {r:?}");
        assert_eq!(r.header("access-control-allow-origin"), Some(origin));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert_eq!(
            r.header("access-control-allow-methods"),
            Some("GET, HEAD, PUT, PATCH, POST, DELETE")
        );
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type, x-token")
        );
        assert_eq!(r.header("access-control-max-age"), Some("600"));
        assert!(r.list("vary").contains("origin"), "{r:?}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert!(r.body.is_empty());
    }
    // Origins not on the list: 204 and no CORS headers, so the browser refuses.
    for origin in [
        "https://evil.example",
        "https://apps.example",
        "http://app.example",
        "https://app.example.evil",
        "null",
    ] {
        let r = preflight("api.localhost", origin, "PUT", None);
        assert_eq!(r.status, 204, "{origin}");
        assert_eq!(r.header("access-control-allow-origin"), None, "{origin}");
        assert_eq!(r.header("access-control-allow-methods"), None, "{origin}");
        assert_eq!(
            r.header("access-control-allow-credentials"),
            None,
            "{origin}"
        );
    }
    // An OPTIONS that is not a preflight goes to the plugin.
    let not_preflight = fetch(
        host.addr,
        "OPTIONS",
        "api.localhost",
        "/echo",
        &[("origin", APP)],
        b"",
    );
    assert_eq!(not_preflight.status, 405, "{not_preflight:?}");
    assert_eq!(
        not_preflight.header("access-control-allow-origin"),
        Some(APP)
    );

    // Actual requests: an allowed origin gets the headers, others none; the answer
    // varies by origin, so every response says so.
    let r = fetch(
        host.addr,
        "POST",
        "api.localhost",
        "/echo",
        &[("origin", APP), ("content-type", "application/json")],
        b"{\"a\": 1}",
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(APP));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-request-id")
    );
    assert_eq!(r.list("vary"), "origin");
    for headers in [&[("origin", "https://evil.example")][..], &[]] {
        let r = get(&host, "api.localhost", "/plain", headers);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), None, "{headers:?}");
        assert_eq!(r.header("access-control-allow-credentials"), None);
        assert_eq!(r.list("vary"), "origin", "{headers:?}");
    }
    // The host's own errors too (a browser needs them to read the error), and files.
    let missing = get(&host, "api.localhost", "/nowhere", &[("origin", APP)]);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("access-control-allow-origin"), Some(APP));
    let too_large = fetch(
        host.addr,
        "POST",
        "api.localhost",
        "/echo",
        &[("origin", APP), ("content-length", "99999999")],
        b"",
    );
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.header("access-control-allow-origin"), Some(APP));
    let file = get(&host, "api.localhost", "/small.txt", &[("origin", APP)]);
    assert_eq!(file.header("access-control-allow-origin"), Some(APP));

    // Any origin, without credentials: `*`, the listed methods, the asked headers back.
    let r = preflight(
        "open.localhost",
        "https://anyone.example",
        "POST",
        Some("x-custom"),
    );
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(r.header("access-control-allow-headers"), Some("x-custom"));
    assert_eq!(r.header("access-control-allow-credentials"), None);
    assert_eq!(r.header("access-control-max-age"), None);
    let r = get(
        &host,
        "open.localhost",
        "/plain",
        &[("origin", "https://anyone.example")],
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("vary"), None);

    // The plugin's own CORS answer is kept.
    let own = get(&host, "bad.localhost", "/own-headers", &[("origin", APP)]);
    assert_eq!(
        own.header("access-control-allow-origin"),
        Some("https://plugin.example")
    );
    assert_eq!(own.header("access-control-allow-credentials"), None);
}

#[test]
fn bad_header_settings_are_reported_with_their_json_paths() {
    let config = r#"{"servers": [
        {"name": "a", "domains": ["a.localhost"], "plugin": "hello",
         "headers": {"frame_options": "ALLOW-FROM https://x", "referrer_policy": "sometimes",
                     "hsts": {"preload": true}, "content_security_policy": "a\u0001b",
                     "colour": "red"}},
        {"name": "b", "domains": ["b.localhost"], "plugin": "hello",
         "cors": {"origins": "*", "credentials": true, "expose_headers": "*"}},
        {"name": "c", "domains": ["c.localhost"], "plugin": "hello",
         "cors": {"origins": ["app.example", "https://x.example/path", "null"],
                  "methods": ["GET", "NOT A METHOD"], "headers": ["bad header"]}},
        {"name": "d", "domains": ["d.localhost"], "plugin": "hello", "cors": true},
        {"name": "e", "domains": ["e.localhost"], "plugin": "hello",
         "compression": {"encodings": ["gzip", "deflate"], "min_bytes": -1, "types": ["*/*", "text"]}}]}"#;
    let out = Setup::new("headers-bad", config).run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for expected in [
        "servers[0].headers.frame_options: \"ALLOW-FROM HTTPS://X\" is not a frame option",
        "servers[0].headers.referrer_policy: unknown policy \"sometimes\"",
        "servers[0].headers.hsts.preload: preload needs include_subdomains: true",
        "servers[0].headers.content_security_policy: may only hold visible ASCII",
        "servers[0].headers.colour: unknown key",
        "servers[1].cors.credentials: cannot be true with \"origins\": \"*\"",
        "servers[1].cors.expose_headers: cannot be \"*\" with credentials: true",
        "servers[2].cors.origins[0]: \"app.example\" is not an origin (no scheme)",
        "servers[2].cors.origins[1]: \"https://x.example/path\" is not an origin (an origin has no path)",
        "servers[2].cors.origins[2]: \"null\": the `null` origin",
        "servers[2].cors.methods[1]: \"NOT A METHOD\" is not a method name",
        "servers[2].cors.headers[0]: \"bad header\" is not a header name",
        "servers[3].cors: expected an object with at least `origins`",
        "servers[4].compression.encodings[1]: unknown encoding \"deflate\"",
        "servers[4].compression.min_bytes: expected a whole number",
        "servers[4].compression.types[0]: \"*/*\" is not a content type",
        "servers[4].compression.types[1]: \"text\" is not a content type",
    ] {
        assert!(
            out.stderr.contains(expected),
            "expected {expected:?} in:\n{}",
            out.stderr
        );
    }
}

/// `/hello/<n x's>`: hello's greeting, text/plain, a little over `n` bytes.
fn greeting_path(n: usize) -> String {
    format!("/hello/{}", "x".repeat(n))
}

#[test]
fn compression_is_negotiated_by_accept_encoding_for_text_above_a_size() {
    let config = servers_config(
        "",
        &[
            server("zip", "hello", r#", "compression": true"#),
            server(
                "gzonly",
                "hello",
                r#", "compression": {"encodings": ["gzip"], "min_bytes": 10, "types": ["text/plain"]}"#,
            ),
            server("plain", "hello", ""),
        ],
    );
    let host = setup("headers-compression", &config).start();
    let path = greeting_path(3000);
    let plain = get(&host, "zip.localhost", &path, &[]);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    assert!(plain.list("vary").contains("accept-encoding"), "{plain:?}");
    assert!(plain.body.len() > 3000);

    // Quality values decide; equal ones go to zstd, then br, then gzip; q=0 excludes.
    for (accept, chosen) in [
        ("gzip", Some("gzip")),
        ("br", Some("br")),
        ("zstd", Some("zstd")),
        ("gzip, deflate, br, zstd", Some("zstd")),
        ("gzip;q=1.0, br;q=1.0", Some("br")),
        ("gzip;q=0.5, br;q=0.8, zstd;q=0.1", Some("br")),
        ("zstd;q=0, br;q=0, gzip", Some("gzip")),
        ("*", Some("zstd")),
        ("*;q=0.5, gzip;q=0.9", Some("gzip")),
        ("zstd;q=0, br;q=0, gzip;q=0", None),
        ("identity", None),
        ("compress, deflate", None),
    ] {
        let r = get(
            &host,
            "zip.localhost",
            &path,
            &[("accept-encoding", accept)],
        );
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("content-encoding"), chosen, "{accept}");
        assert!(
            r.list("vary").contains("accept-encoding"),
            "{accept}: {r:?}"
        );
        assert_eq!(r.decoded(), plain.body, "{accept}");
        if chosen.is_some() {
            assert_eq!(r.header("content-length"), None, "{accept}");
            assert!(
                r.body.len() < plain.body.len() / 4,
                "{accept}: {}",
                r.body.len()
            );
        }
        // The security headers are still there.
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }

    // JSON too (a POST's answer), and a static file, whose ETag becomes weak (another
    // representation) while If-None-Match still matches it.
    let json = format!("{{\"text\": \"{}\"}}", "y".repeat(3000));
    let r = fetch(
        host.addr,
        "POST",
        "zip.localhost",
        "/echo",
        &[
            ("accept-encoding", "br"),
            ("content-type", "application/json"),
        ],
        json.as_bytes(),
    );
    assert_eq!(r.header("content-encoding"), Some("br"), "{r:?}");
    assert!(String::from_utf8(r.decoded())
        .unwrap()
        .contains(&"y".repeat(3000)));
    let file = get(
        &host,
        "zip.localhost",
        "/style.css",
        &[("accept-encoding", "gzip")],
    );
    assert_eq!(file.header("content-encoding"), Some("gzip"), "{file:?}");
    assert_eq!(file.decoded(), big_text(3000).as_bytes());
    assert_eq!(file.list("vary"), "accept-encoding");
    assert_eq!(file.header("accept-ranges"), None);
    let etag = file.header("etag").unwrap().to_owned();
    assert!(etag.starts_with("W/\""), "{etag}");
    let again = get(
        &host,
        "zip.localhost",
        "/style.css",
        &[("accept-encoding", "gzip"), ("if-none-match", &etag)],
    );
    assert_eq!(again.status, 304);

    // A server's own list of encodings, size and types.
    let r = get(
        &host,
        "gzonly.localhost",
        "/hello/abcdefghij",
        &[("accept-encoding", "br, zstd, gzip;q=0.1")],
    );
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.decoded(), b"Howdy, abcdefghij!\n");

    // Not compressed: small bodies, types not listed, ranges, HEAD, a server whose types
    // leave it out, a server without compression; each as it is without Accept-Encoding.
    for (method, domain, path, extra, status) in [
        ("GET", "zip", "/hello/you", None, 200),
        ("GET", "zip", "/small.txt", None, 200),
        ("GET", "zip", "/bytes/5000", None, 200),
        ("GET", "zip", "/logo.png", None, 200),
        ("GET", "zip", "/big.txt", Some(("range", "bytes=0-99")), 206),
        ("HEAD", "zip", &path, None, 200),
        ("GET", "gzonly", "/style.css", None, 200),
        ("GET", "plain", &path, None, 200),
    ] {
        let domain = format!("{domain}.localhost");
        let what = format!("{method} {domain}{}", &path[..path.len().min(20)]);
        let without: Vec<(&str, &str)> = extra.into_iter().collect();
        let mut with = without.clone();
        with.push(("accept-encoding", "gzip, br, zstd"));
        let r = fetch(host.addr, method, &domain, path, &with, b"");
        assert_eq!(
            (r.status, r.header("content-encoding")),
            (status, None),
            "{what}"
        );
        let as_is = fetch(host.addr, method, &domain, path, &without, b"");
        assert_eq!(r.body, as_is.body, "{what}");
        assert_eq!(
            r.header("content-length"),
            as_is.header("content-length"),
            "{what}"
        );
    }
    let head = fetch(host.addr, "HEAD", "zip.localhost", &path, &[], b"");
    assert_eq!(
        head.header("content-length").map(str::to_owned),
        Some(plain.body.len().to_string())
    );
    // Off unless configured: nothing varies.
    let off = get(
        &host,
        "plain.localhost",
        &path,
        &[("accept-encoding", "gzip")],
    );
    assert_eq!(off.header("vary"), None);
}

/// Reads a chunked response as it arrives, decoding gzip as it goes.
struct Streamed {
    stream: TcpStream,
    raw: Vec<u8>,
    head: Option<Answer>,
}

impl Streamed {
    fn get(host: &Host, domain: &str, path: &str, accept: &str) -> Streamed {
        let mut stream = TcpStream::connect(host.addr).unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: {domain}\r\naccept-encoding: {accept}\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut streamed = Streamed {
            stream,
            raw: Vec::new(),
            head: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while streamed.head.is_none() {
            assert!(Instant::now() < deadline, "no head: {:?}", streamed.raw);
            streamed.read_some();
            if let Some(end) = streamed.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let mut head = parse(&streamed.raw[..end + 4]);
                head.body.clear();
                streamed.raw.drain(..end + 4);
                streamed.head = Some(head);
            }
        }
        streamed
    }

    fn read_some(&mut self) {
        let mut buf = [0; 8192];
        match self.stream.read(&mut buf) {
            Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }

    /// What has been decoded so far.
    fn decoded(&self) -> String {
        let (data, _) = dechunk(&self.raw);
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        decoder.write_all(&data).unwrap();
        decoder.flush().unwrap();
        String::from_utf8_lossy(decoder.get_ref()).into_owned()
    }

    /// Reads until the decoded text holds `needle`; panics after `limit`.
    fn until(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.decoded();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not arrive; decoded so far {text:?}"
            );
            self.read_some();
        }
    }
}

#[test]
fn a_compressed_stream_arrives_as_it_is_produced_and_events_are_not_compressed_by_default() {
    let config = servers_config(
        "",
        &[
            server("zip", "hello", r#", "compression": true"#),
            server(
                "events",
                "hello",
                r#", "compression": {"types": ["text/event-stream"], "encodings": ["gzip"]}"#,
            ),
        ],
    );
    let host = setup("headers-stream", &config).start();
    // Server-sent events are left alone by the default types.
    let sse = Streamed::get(&host, "zip.localhost", "/events?every_ms=50", "gzip");
    let head = sse.head.as_ref().unwrap();
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("content-encoding"), None);

    // Listed by name, they are compressed, and each event is flushed as it comes: the
    // first is decoded long before the second is made (hello sleeps `every_ms` first).
    let started = Instant::now();
    let mut sse = Streamed::get(&host, "events.localhost", "/events?every_ms=3000", "gzip");
    let head = sse.head.as_ref().unwrap();
    assert_eq!(head.header("content-encoding"), Some("gzip"), "{head:?}");
    assert!(head.list("vary").contains("accept-encoding"));
    let first = sse.until("Howdy #1", Duration::from_millis(2500));
    assert!(!first.contains("Howdy #2"), "{first}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the first event took {:?}",
        started.elapsed()
    );
    let second = sse.until("Howdy #2", Duration::from_secs(10));
    assert!(second.contains("event: tick"), "{second}");
}

//! TLS listeners (`global.listen[i].tls`, `global.tls`): certificates chosen by SNI,
//! the development CA, ALPN, live certificate swaps, `--check`, and redirects to HTTPS.
//! Clients: rustls (the test's own, with its own roots) and curl.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::{Reply, Setup};

/// A test CA, and certificates it signs.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: CertificateDer<'static>,
}

/// A certificate and its key, in PEM, and the certificate's DER.
struct Made {
    cert: String,
    key: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn sign(&self, names: &[&str]) -> Made {
        self.sign_with(names, |_| {})
    }

    fn sign_with(&self, names: &[&str], edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Made {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        edit(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Made {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// Writes `made` as `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`, each by a rename (as
/// certificate tools do).
fn write(dir: &Path, stem: &str, made: &Made) {
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    for (file, text) in [
        (format!("{stem}-key.pem"), &made.key),
        (format!("{stem}.pem"), &made.cert),
    ] {
        let tmp = dir.join("certs").join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join("certs").join(file)).unwrap();
    }
}

fn client(roots: &[&CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add((*root).clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Every connection a full handshake: a resumed session shows the certificate of the
    // session it resumes, not the one the host would choose now.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// One HTTPS request on a new connection: the reply, the certificate the host chose,
/// and the protocol ALPN settled on.
struct Answer {
    reply: Reply,
    cert: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
}

/// `GET path` over TLS to `addr`, naming `name` in SNI (no SNI for an IP address) and
/// in `Host`.
fn https_get(
    addr: SocketAddr,
    name: &str,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<Answer, String> {
    let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let conn =
        rustls::ClientConnection::new(config.clone(), server_name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET {path} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|e| format!("handshake or write: {e}"))?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => {}
        // A peer that closes without close_notify, after the whole response.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    let cert = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no certificate")?;
    Ok(Answer {
        reply: Reply::parse(&out),
        cert,
        alpn: tls.conn.alpn_protocol().map(<[u8]>::to_vec),
    })
}

const HELLO: &str = r#"{"name": "hello", "domains": ["hello.localhost", "*.hello.localhost"], "plugin": "hello", "config": {"greeting": "Hi"}}"#;

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "15"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn development_certificates_serve_https_over_http1_and_http2() {
    let config = format!(
        r#"{{"global": {{"listen": ["127.0.0.1:0", {{"address": "127.0.0.1:0", "tls": true}}],
                       "tls": {{"self_signed": true}}}},
            "servers": [{HELLO}]}}"#
    );
    let host = Setup::new("tls-dev", &config)
        .plugin("hello", "hello.so")
        .start_with_config_listen();
    let https = host.https_addr();
    let ca_file = host.dir().join(".dev-tls/ca.pem");
    host.wait_for_log(&["made a development certificate", "hello.localhost"]);
    let ca = std::fs::read(&ca_file).unwrap();
    let ca = CertificateDer::from_pem_slice_compat(&ca);

    // curl, trusting the development CA: HTTP/2 by ALPN, and HTTP/1.1 when asked.
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let resolve = format!("a.hello.localhost:{}:127.0.0.1", https.port());
        let url = format!("https://a.hello.localhost:{}/", https.port());
        let (ok, out, err) = curl(&[
            flag,
            "--cacert",
            ca_file.to_str().unwrap(),
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ]);
        assert!(ok, "curl {flag}: {err}");
        assert!(out.starts_with("Hi from a.hello.localhost!"), "{out}");
        assert!(
            out.ends_with(&format!("\n{version} 200")),
            "curl {flag}: {out}"
        );
    }

    // rustls: ALPN offers h2 and http/1.1; the host picks h2 when both are offered.
    let both = client(&[&ca], &[b"h2", b"http/1.1"]);
    let conn = rustls::ClientConnection::new(both, "hello.localhost".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(https).unwrap());
    tls.conn.complete_io(&mut tls.sock).unwrap();
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
    let answer = https_get(
        https,
        "hello.localhost",
        &client(&[&ca], &[b"http/1.1"]),
        "/",
    )
    .unwrap();
    assert_eq!(answer.reply.status, 200);
    assert_eq!(answer.alpn.as_deref(), Some(&b"http/1.1"[..]));

    // The plain listener still serves plain HTTP; a plain request on the TLS port fails.
    assert_eq!(host.get("hello.localhost", "/").status, 200);
    let mut plain = TcpStream::connect(https).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: hello.localhost\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("Hi from"));

    // A restarted host reuses the CA it made: the client's trust carries over.
    drop(host);
    let again = Setup::new("tls-dev-again", &config).plugin("hello", "hello.so");
    std::fs::create_dir_all(again.dir.join(".dev-tls")).unwrap();
    for f in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(
            ca_file.with_file_name(f),
            again.dir.join(".dev-tls").join(f),
        )
        .unwrap();
    }
    let again = again.start_with_config_listen();
    let answer = https_get(
        again.https_addr(),
        "hello.localhost",
        &client(&[&ca], &[]),
        "/",
    )
    .expect("the new certificate is signed by the same CA");
    assert_eq!(answer.reply.status, 200);
}

/// Reads one PEM certificate (the helper keeps the test free of PEM parsing details).
trait FromPem {
    fn from_pem_slice_compat(pem: &[u8]) -> CertificateDer<'static>;
}

impl FromPem for CertificateDer<'static> {
    fn from_pem_slice_compat(pem: &[u8]) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem).unwrap()
    }
}

#[test]
fn sni_chooses_each_domains_certificate_and_unknown_names_get_the_default_or_an_alert() {
    let ca = Ca::new();
    let a = ca.sign(&["a.test"]);
    let b = ca.sign(&["b.test", "www.b.test"]);
    let c = ca.sign(&["*.c.test"]);
    let setup_config = |unknown: &str| {
        format!(
            r#"{{"global": {{"listen": [{{"address": "127.0.0.1:0", "tls": true}}],
                 "tls": {{"unknown_name": "{unknown}", "certificates": [
                   {{"cert": "certs/a.pem", "key": "certs/a-key.pem"}},
                   {{"cert": "certs/b.pem", "key": "certs/b-key.pem"}},
                   {{"cert": "certs/c.pem", "key": "certs/c-key.pem", "domains": ["*.c.test"]}}]}}}},
                "servers": [{{"name": "hello", "domains": ["a.test", "b.test", "www.b.test", "*.c.test", "d.test", "127.0.0.1"], "plugin": "hello"}}]}}"#
        )
    };
    let setup = Setup::new("tls-sni", &setup_config("default")).plugin("hello", "hello.so");
    for (stem, made) in [("a", &a), ("b", &b), ("c", &c)] {
        write(&setup.dir, stem, made);
    }
    let host = setup.start_with_config_listen();
    let https = host.https_addr();
    let trust = client(&[&ca.der], &[]);
    for (name, want) in [
        ("a.test", &a),
        ("b.test", &b),
        ("www.b.test", &b),
        ("x.c.test", &c),
    ] {
        let answer = https_get(https, name, &trust, "/").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(answer.reply.status, 200, "{name}");
        assert!(answer.cert == want.der, "{name} got another certificate");
    }
    // An unknown name, and a client that names none (an IP address), get the first
    // certificate listed; the client then refuses it, as it should.
    let anything = client(&[&ca.der], &[]);
    let err = https_get(https, "d.test", &anything, "/").err().unwrap();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for"),
        "{err}"
    );
    let err = https_get(https, "127.0.0.1", &anything, "/").err().unwrap();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for"),
        "{err}"
    );
    drop(host);

    // "reject": an unknown name ends the handshake with an alert.
    let setup = Setup::new("tls-sni-reject", &setup_config("reject")).plugin("hello", "hello.so");
    for (stem, made) in [("a", &a), ("b", &b), ("c", &c)] {
        write(&setup.dir, stem, made);
    }
    let host = setup.start_with_config_listen();
    let https = host.https_addr();
    let err = https_get(https, "d.test", &trust, "/").err().unwrap();
    assert!(err.contains("alert"), "{err}");
    assert_eq!(
        https_get(https, "a.test", &trust, "/")
            .unwrap()
            .reply
            .status,
        200
    );
}

#[test]
fn a_replaced_certificate_takes_over_with_no_failed_request_and_a_bad_one_is_refused() {
    let ca = Ca::new();
    let first = ca.sign(&["hello.localhost"]);
    let config = format!(
        r#"{{"global": {{"listen": [{{"address": "127.0.0.1:0", "tls": true}}],
             "tls": {{"certificates": [{{"cert": "certs/site.pem", "key": "certs/site-key.pem", "domains": ["hello.localhost"]}}]}}}},
            "servers": [{HELLO}]}}"#
    );
    let setup = Setup::new("tls-swap", &config).plugin("hello", "hello.so");
    write(&setup.dir, "site", &first);
    let host = setup.start_with_config_listen();
    let https = host.https_addr();
    let trust = client(&[&ca.der], &[]);
    assert!(
        https_get(https, "hello.localhost", &trust, "/")
            .unwrap()
            .cert
            == first.der
    );

    // Clients make new connections (a handshake each) all along.
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let seen: Mutex<Vec<CertificateDer<'static>>> = Mutex::new(Vec::new());
    let mut last = first;
    /// Stops the clients however the scope ends (a failed wait panics).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match https_get(https, "hello.localhost", &trust, "/") {
                        Ok(a) if a.reply.status == 200 => {
                            let mut seen = seen.lock().unwrap();
                            if !seen.contains(&a.cert) {
                                seen.push(a.cert);
                            }
                        }
                        Ok(a) => failures
                            .lock()
                            .unwrap()
                            .push(format!("status {}", a.reply.status)),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            });
        }
        for round in 0..3 {
            let next = ca.sign(&["hello.localhost"]);
            write(host.dir(), "site", &next);
            host.wait_until(
                &format!("round {round}: the new certificate is served"),
                || seen.lock().unwrap().contains(&next.der),
            );
            last = next;
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(host.count_log_lines(&["replaced the certificate", "site.pem"]) >= 3);

    // A key that does not match: refused, named, and the last good one keeps serving.
    let mismatch = [
        "global.tls.certificates[0]",
        "site-key.pem",
        "does not match",
        "keeps serving",
    ];
    let before = host.count_log_lines(&mismatch);
    let other = ca.sign(&["hello.localhost"]);
    std::fs::write(host.dir().join("certs/site-key.pem"), &other.key).unwrap();
    host.wait_until("the mismatched key is refused", || {
        host.count_log_lines(&mismatch) > before
    });
    assert!(
        https_get(https, "hello.localhost", &trust, "/")
            .unwrap()
            .cert
            == last.der
    );
    // A certificate that does not cover the domains it is named for: refused, named.
    write(host.dir(), "site", &ca.sign(&["elsewhere.test"]));
    host.wait_for_log(&["site.pem: does not cover hello.localhost", "keeps serving"]);
    assert!(
        https_get(https, "hello.localhost", &trust, "/")
            .unwrap()
            .cert
            == last.der
    );
}

#[test]
fn check_names_each_unusable_certificate_file() {
    let ca = Ca::new();
    let good = ca.sign(&["hello.localhost"]);
    let expired = ca.sign_with(&["hello.localhost"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let mismatched = ca.sign(&["hello.localhost"]);
    let config = r#"{"global": {"listen": [{"address": "127.0.0.1:0", "tls": true}],
        "tls": {"certificates": [
          {"cert": "certs/good.pem", "key": "certs/good-key.pem", "domains": ["hello.localhost"]},
          {"cert": "certs/expired.pem", "key": "certs/expired-key.pem"},
          {"cert": "certs/good.pem", "key": "certs/mismatched-key.pem"},
          {"cert": "certs/good.pem", "key": "certs/good-key.pem", "domains": ["other.localhost"]},
          {"cert": "certs/missing.pem", "key": "certs/good-key.pem"},
          {"cert": "certs/garbage.pem", "key": "certs/good-key.pem"}]}},
        "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    let setup = Setup::new("tls-check", config).plugin("hello", "hello.so");
    write(&setup.dir, "good", &good);
    write(&setup.dir, "expired", &expired);
    write(&setup.dir, "mismatched", &mismatched);
    std::fs::write(setup.dir.join("certs/garbage.pem"), "not a certificate").unwrap();
    let out = setup.run(&["--check"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    for want in [
        "global.tls.certificates[1]: ",
        "expired.pem: expired on",
        "global.tls.certificates[2]: ",
        "mismatched-key.pem: this key does not match the certificate in",
        "global.tls.certificates[3]: ",
        "does not cover other.localhost (it is for hello.localhost)",
        "global.tls.certificates[4]: ",
        "missing.pem: cannot read",
        "global.tls.certificates[5]: ",
        "garbage.pem: holds no certificate",
    ] {
        assert!(
            out.stderr.contains(want),
            "missing {want:?} in:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("certificates[0]"), "{}", out.stderr);

    // A TLS listener with nothing to serve is a config error that says what to add.
    let setup = Setup::new(
        "tls-no-certificates",
        r#"{"global": {"listen": [{"address": "127.0.0.1:0", "tls": true, "protocols": ["h3"]}]}}"#,
    );
    let out = setup.run(&["--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr
            .contains("global.listen[0].protocols[0]: \"h3\" is not a protocol"),
        "{}",
        out.stderr
    );
}

#[test]
fn servers_that_ask_are_redirected_from_http_to_https() {
    let config = r#"{"global": {"listen": ["127.0.0.1:0", {"address": "127.0.0.1:0", "tls": true}],
                                "tls": {"self_signed": true}},
        "servers": [
          {"name": "hello", "domains": ["hello.localhost"], "plugin": "hello", "redirect_https": true},
          {"name": "plain", "domains": ["plain.localhost"], "plugin": "hello"}]}"#;
    let setup = Setup::new("tls-redirect", config).plugin("hello", "hello.so");
    let host = setup.start_with_config_listen();
    let https = host.https_addr();
    let reply = host.get("hello.localhost", "/some/path?q=1");
    assert_eq!(reply.status, 308);
    assert_eq!(
        reply.header("location"),
        Some(&*format!(
            "https://hello.localhost:{}/some/path?q=1",
            https.port()
        ))
    );
    assert_eq!(host.get("plain.localhost", "/").status, 200);
    let (ok, out, err) = curl(&[
        "-L",
        "--cacert",
        host.dir().join(".dev-tls/ca.pem").to_str().unwrap(),
        "--resolve",
        &format!("hello.localhost:{}:127.0.0.1", host.addr.port()),
        "--resolve",
        &format!("hello.localhost:{}:127.0.0.1", https.port()),
        &format!("http://hello.localhost:{}/", host.addr.port()),
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("Hello from hello.localhost!"), "{out}");
}

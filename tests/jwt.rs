//! JWT verification (`servers[].jwt`) against the real host: HS256 and RS256 tokens
//! accepted, with the claims the plugin reads; every kind of bad token refused with 401;
//! path prefixes; a client's own `x-jwt-claims`; bad keys refused by `--check`; a live
//! config change.
//!
//! The RSA keys are test-only fixtures (tests/fixtures/jwt/): ring, which signs here,
//! cannot make RSA keys.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::{Host, Reply, Setup};

/// An HS256 secret of 32 bytes, the least the host accepts.
const SECRET: &str = "test-only-secret-of-32-bytes-ok!";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/jwt")
        .join(name)
}

/// An RSA private key of the fixtures, for signing.
fn rsa_key(pair: &str) -> EncodingKey {
    let text = std::fs::read(fixture(&format!("test-only-rs256-{pair}-private.pem"))).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).unwrap();
    assert_eq!(pem.label, "RSA PRIVATE KEY");
    EncodingKey::from_rsa_der(&pem.contents)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass every check of the `api` server below, with `changes` applied
/// (`null` removes a claim).
fn claims(changes: Value) -> Value {
    let mut claims = json!({
        "sub": "ada",
        "iss": "https://auth.test",
        "aud": "api",
        "exp": now() + 600,
        "role": "admin",
    });
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn rs256(claims: &Value, pair: &str) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &rsa_key(pair)).unwrap()
}

/// A token with `"alg": "none"` and no signature.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

/// `api` (tenant `acme`) checks tokens under `/seen` except `/seen/public`, with an
/// HS256 and an RS256 key; `ws` (WebSockets) checks every path; `rsonly` has only the
/// RS256 key; `open` has no `jwt`.
fn config(api_jwt: &str) -> String {
    format!(
        r#"{{"global": {{"reload": {{"debounce_ms": 20}}}},
            "tenants": [{{"id": "acme"}}],
            "servers": [
              {{"name": "api", "domains": ["api.localhost"], "plugin": "misbehave",
                "tenant": "acme", "jwt": {api_jwt}}},
              {{"name": "ws", "domains": ["ws.localhost"], "plugin": "sockets",
                "jwt": {{"keys": [{{"alg": "HS256", "secret": "${{JWT_SECRET}}"}}]}}}},
              {{"name": "rsonly", "domains": ["rsonly.localhost"], "plugin": "misbehave",
                "jwt": {{"keys": [{{"alg": "RS256", "public_key_file": "keys/a.pem"}}]}}}},
              {{"name": "open", "domains": ["open.localhost"], "plugin": "misbehave"}}]}}"#
    )
}

const API_JWT: &str = r#"{"keys": [{"alg": "HS256", "secret": "${JWT_SECRET}"},
                                    {"alg": "RS256", "public_key_file": "keys/a.pem"}],
                           "issuer": "https://auth.test", "audience": ["api", "admin"],
                           "leeway_s": 5, "paths": ["/seen"], "except": ["/seen/public"]}"#;

fn setup(label: &str, config: &str) -> Setup {
    let setup = Setup::new(label, config)
        .plugin("fixture-misbehave", "misbehave.so")
        .plugin("fixture-sockets", "sockets.so")
        .env("JWT_SECRET", SECRET);
    std::fs::create_dir_all(setup.dir.join("keys")).unwrap();
    std::fs::copy(
        fixture("test-only-rs256-a-public.pem"),
        setup.dir.join("keys/a.pem"),
    )
    .unwrap();
    setup
}

fn get(
    host: &Host,
    domain: &str,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    host.send("GET", domain, path, b"", &headers)
}

/// The claims misbehave's `/seen` read in `x-jwt-claims` (`None`: no such header).
fn claims_seen(r: &Reply) -> Option<Value> {
    assert_eq!(r.status, 200, "{}", r.body);
    let mut seen = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("header x-jwt-claims="));
    let first = seen
        .next()
        .map(|c| serde_json::from_str(c).expect("claims are JSON"));
    assert!(
        seen.next().is_none(),
        "one x-jwt-claims header at most:\n{}",
        r.body
    );
    first
}

/// A 401 with a JSON body naming the problem and the request id, and its challenge.
fn assert_refused(r: &Reply, had_token: bool, needle: &str) {
    assert_eq!(r.status, 401, "{}", r.body);
    let body = r.json();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(needle),
        "{error:?} should mention {needle:?}"
    );
    assert_eq!(body["request_id"], r.header("x-request-id").unwrap());
    let challenge = if had_token {
        "Bearer error=\"invalid_token\""
    } else {
        "Bearer"
    };
    assert_eq!(r.header("www-authenticate"), Some(challenge));
}

#[test]
fn a_request_without_a_token_is_refused_before_its_body_is_read() {
    use std::io::{Read, Write};
    let host = setup("jwt-body", &config(API_JWT)).start();
    // A head that announces 1 MB, and no body: the 401 must not wait for it.
    let mut tcp = std::net::TcpStream::connect(host.addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    tcp.write_all(
        b"POST /seen/upload HTTP/1.1\r\nhost: api.localhost\r\ncontent-length: 1000000\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp
            .read(&mut buf)
            .expect("the 401 comes without the body being sent");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{head}"
    );
}

#[test]
fn valid_tokens_pass_with_their_claims_and_bad_ones_get_401() {
    let host = setup("jwt-verify", &config(API_JWT)).start();
    let path = "/seen/a/b";

    // Valid tokens, HS256 and RS256: the plugin reads the claims as JSON.
    let good = claims(json!({}));
    for token in [hs256(&good, SECRET.as_bytes()), rs256(&good, "a")] {
        let r = get(&host, "api.localhost", path, Some(&token), &[]);
        assert_eq!(claims_seen(&r), Some(good.clone()));
    }
    // An audience list in the token passes if it names an accepted one.
    let listed = claims(json!({"aud": ["billing", "admin"]}));
    let r = get(
        &host,
        "api.localhost",
        path,
        Some(&hs256(&listed, SECRET.as_bytes())),
        &[],
    );
    assert_eq!(claims_seen(&r), Some(listed));
    // The scheme's case does not matter.
    let token = hs256(&good, SECRET.as_bytes());
    let r = host.send(
        "GET",
        "api.localhost",
        path,
        b"",
        &[("authorization", &format!("bearer {token}"))],
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Missing: no error code in the challenge (RFC 6750).
    assert_refused(
        &get(&host, "api.localhost", path, None, &[]),
        false,
        "needs a token",
    );
    let basic = [("authorization", "Basic YWRhOnNlY3JldA==")];
    assert_refused(
        &get(&host, "api.localhost", path, None, &basic),
        false,
        "needs a token",
    );

    let hs = |c: &Value| hs256(c, SECRET.as_bytes());
    let past = now() - 120;
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "not.a.jwt".to_owned(), "malformed"),
        ("garbage", "abc".to_owned(), "malformed"),
        (
            "another secret",
            hs256(&good, b"another-secret-of-at-least-32-bytes"),
            "signature",
        ),
        ("another RSA key", rs256(&good, "b"), "signature"),
        (
            "tampered claims",
            {
                let t = hs(&good);
                let forged = hs(&claims(json!({"role": "root"})));
                let mut parts: Vec<&str> = t.split('.').collect();
                parts[1] = forged.split('.').nth(1).unwrap();
                parts.join(".")
            },
            "signature",
        ),
        ("expired", hs(&claims(json!({"exp": past}))), "expired"),
        (
            "no exp",
            hs(&claims(json!({"exp": null}))),
            "required claim",
        ),
        (
            "not yet valid",
            hs(&claims(json!({"nbf": now() + 600}))),
            "not valid yet",
        ),
        (
            "wrong issuer",
            hs(&claims(json!({"iss": "https://evil.test"}))),
            "issuer",
        ),
        (
            "no issuer",
            hs(&claims(json!({"iss": null}))),
            "required claim",
        ),
        (
            "wrong audience",
            hs(&claims(json!({"aud": "billing"}))),
            "audience",
        ),
        (
            "no audience",
            hs(&claims(json!({"aud": null}))),
            "required claim",
        ),
        ("alg none", unsigned(&good), "malformed"),
        // Algorithm confusion: HS256 "signed" with the server's RS256 public key.
        (
            "HS256 with the RSA public key",
            {
                let public = std::fs::read(fixture("test-only-rs256-a-public.pem")).unwrap();
                hs256(&good, &public)
            },
            "signature",
        ),
    ];
    for (what, token, needle) in &cases {
        let r = get(&host, "api.localhost", path, Some(token), &[]);
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        assert_refused(&r, true, needle);
    }
    // On a server with only an RS256 key, an HS256 token made with its public key meets
    // no key at all.
    let public = std::fs::read(fixture("test-only-rs256-a-public.pem")).unwrap();
    let confused = hs256(&claims(json!({"iss": null, "aud": null})), &public);
    let r = get(&host, "rsonly.localhost", "/seen/a/b", Some(&confused), &[]);
    assert_refused(&r, true, "no key");
    let r = get(
        &host,
        "rsonly.localhost",
        "/ok",
        Some(&rs256(&good, "a")),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Within the leeway an expired token still passes.
    let late = hs(&claims(json!({"exp": now() - 1})));
    assert_eq!(
        get(&host, "api.localhost", path, Some(&late), &[]).status,
        200
    );
}

#[test]
fn only_the_configured_prefixes_need_a_token_and_the_claims_header_is_the_host_s() {
    let host = setup("jwt-paths", &config(API_JWT)).start();
    let forged = [("x-jwt-claims", r#"{"role":"root"}"#)];
    // Outside `paths`, or under `except`: no token needed, and the plugin sees no claims,
    // whatever the client sent.
    assert_eq!(
        get(&host, "api.localhost", "/ok", None, &forged).status,
        200
    );
    // `/seen` covers `/seen/...`, not `/seenery`: its 404 comes from the route table.
    let r = get(&host, "api.localhost", "/seenery", None, &forged);
    assert_eq!(r.status, 404, "{}", r.body);
    let r = get(&host, "api.localhost", "/seen/public/x", None, &forged);
    assert_eq!(claims_seen(&r), None);
    // A server without `jwt` does not pass a client's claims on either.
    let r = get(&host, "open.localhost", "/seen/a/b", None, &forged);
    assert_eq!(claims_seen(&r), None);
    // With a valid token, the claims are the token's, not the client's header.
    let good = claims(json!({}));
    let token = hs256(&good, SECRET.as_bytes());
    let r = get(&host, "api.localhost", "/seen/a/b", Some(&token), &forged);
    assert_eq!(claims_seen(&r), Some(good));
    // Beside the tenant, which the host sets too.
    assert!(r.body.contains("x-tenant=Some(\"acme\")\n"), "{}", r.body);
    assert!(r.body.contains("header x-tenant=acme\n"), "{}", r.body);
    // A WebSocket upgrade needs its token like any request.
    match host.websocket("ws://ws.localhost/ws") {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }
    // The 401 carries the request id a client sent.
    let id = [("x-request-id", "f47ac10b-58cc-4372-a567-0e02b2c3d479")];
    let r = get(&host, "api.localhost", "/seen/a/b", None, &id);
    assert_refused(&r, false, "needs a token");
    assert_eq!(r.json()["request_id"], id[0].1);
}

#[test]
fn jwt_rules_change_live_with_the_config() {
    let host = setup("jwt-live", &config(API_JWT)).start();
    assert_eq!(
        get(&host, "api.localhost", "/seen/a/b", None, &[]).status,
        401
    );
    // Off: anything passes; the plugin sees no claims.
    host.write_config(&config("null"));
    host.wait_until("jwt turned off", || {
        get(&host, "api.localhost", "/seen/a/b", None, &[]).status == 200
    });
    // On again, for every path.
    host.write_config(&config(
        r#"{"keys": [{"alg": "HS256", "secret": "${JWT_SECRET}"}]}"#,
    ));
    host.wait_until("jwt on for every path", || {
        get(&host, "api.localhost", "/ok", None, &[]).status == 401
    });
    let token = hs256(
        &claims(json!({"iss": null, "aud": null})),
        SECRET.as_bytes(),
    );
    assert_eq!(
        get(&host, "api.localhost", "/ok", Some(&token), &[]).status,
        200
    );
}

#[test]
fn bad_keys_are_config_errors_naming_the_server() {
    let check = |jwt: &str| {
        let out = setup("jwt-check", &config(jwt)).run(&["--check"]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        out.stderr
    };
    let small = std::fs::read_to_string(fixture("test-only-rs1024-public.pem")).unwrap();
    let private = std::fs::read_to_string(fixture("test-only-rs256-a-private.pem")).unwrap();
    let cases = [
        (
            r#"{"keys": [{"alg": "HS256", "secret": "short"}]}"#.to_owned(),
            "servers[0].jwt.keys[0].secret: an HS256 secret needs at least 32 bytes",
        ),
        (
            r#"{"keys": [{"alg": "RS256", "public_key": "not a key"}]}"#.to_owned(),
            "servers[0].jwt.keys[0].public_key: not a PEM public key",
        ),
        (
            json!({"keys": [{"alg": "RS256", "public_key": small}]}).to_string(),
            "servers[0].jwt.keys[0].public_key: the RSA key has 1024 bits",
        ),
        (
            json!({"keys": [{"alg": "RS256", "public_key": private}]}).to_string(),
            "is not a public key",
        ),
        (
            r#"{"keys": [{"alg": "RS256", "public_key_file": "keys/missing.pem"}]}"#.to_owned(),
            "servers[0].jwt.keys[0].public_key_file: cannot read",
        ),
        (
            r#"{"keys": [{"alg": "none", "secret": "x"}]}"#.to_owned(),
            "servers[0].jwt.keys[0].alg: \"none\" is not supported",
        ),
        (r#"{"keys": []}"#.to_owned(), "servers[0].jwt.keys"),
        (
            r#"{"keys": [{"alg": "HS256", "secret": "${JWT_SECRET}"}], "paths": ["api"]}"#
                .to_owned(),
            "servers[0].jwt.paths[0]: \"api\" must start with `/`",
        ),
    ];
    for (jwt, needle) in cases {
        let stderr = check(&jwt);
        assert!(
            stderr.contains(needle),
            "{jwt}\nwanted {needle:?} in:\n{stderr}"
        );
    }
}

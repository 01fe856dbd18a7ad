//! Static sites (`servers[].static`): files by `ServeDir` after the plugin's routes,
//! cache headers and 304s, ranges, HEAD, precompressed siblings, the SPA fallback for
//! navigation requests, servers with no plugin, traversal refused, live changes, and
//! files kept in memory.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::support::{Client, Host, Reply, Setup};

const INDEX: &str = "<!doctype html><title>the app</title>\n";
const APP_JS: &str = "console.log('the plain script');\n";
const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-FOLDER";

/// Writes `files` (path, contents) under `dir`, making folders as needed.
fn write(dir: &Path, files: &[(&str, &str)]) {
    for (path, contents) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
}

/// A set-up whose folder holds `site/` (the static root, with an index, scripts with
/// precompressed siblings, a style sheet and a sub-folder) and, outside it, a secret.
fn setup(label: &str, config: &str) -> Setup {
    let setup = Setup::new(label, config);
    write(
        &setup.dir,
        &[
            ("secret.txt", SECRET),
            ("site/index.html", INDEX),
            ("site/app.js", APP_JS),
            // The siblings' contents need not be compressed: the host does not look.
            ("site/app.js.gz", "GZIP-SIBLING"),
            ("site/app.js.br", "BROTLI-SIBLING"),
            ("site/style.css", "body { color: teal }\n"),
            ("site/data.json", "{\"a\": 1}\n"),
            ("site/plain", "the file named plain\n"),
            ("site/docs/index.html", "<p>docs</p>\n"),
            ("site/digits.txt", "0123456789"),
        ],
    );
    setup
}

/// `GET path` with extra headers.
fn get(host: &Host, path: &str, headers: &[(&str, &str)]) -> Reply {
    host.send("GET", "site.localhost", path, b"", headers)
}

fn header<'r>(reply: &'r Reply, name: &str) -> &'r str {
    reply
        .header(name)
        .unwrap_or_else(|| panic!("no {name} header in {reply:?}"))
}

const STATIC_ONLY: &str = r#"{"servers": [{"name": "site", "domains": ["site.localhost"],
    "static": {"root": "site", "max_age_s": 3600}}]}"#;

#[test]
fn a_server_with_no_plugin_serves_its_folder_with_types_and_cache_headers() {
    let host = setup("static-only", STATIC_ONLY).start();

    let index = get(&host, "/", &[]);
    assert_eq!(index.status, 200, "{index:?}");
    assert_eq!(index.body, INDEX);
    assert_eq!(header(&index, "content-type"), "text/html");
    // HTML is revalidated every time; other files are kept for max_age_s.
    assert_eq!(header(&index, "cache-control"), "no-cache");
    assert!(index.header("etag").is_some() && index.header("last-modified").is_some());
    assert!(index.header("x-request-id").is_some());

    for (path, content_type) in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/data.json", "application/json"),
        ("/plain", "application/octet-stream"),
        ("/digits.txt", "text/plain"),
    ] {
        let r = get(&host, path, &[]);
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(header(&r, "content-type"), content_type, "{path}");
        assert_eq!(header(&r, "cache-control"), "max-age=3600", "{path}");
        assert_eq!(header(&r, "accept-ranges"), "bytes", "{path}");
    }
    assert_eq!(get(&host, "/app.js", &[]).body, APP_JS);

    // A folder: redirected to its URL with a slash, which serves its index.
    let folder = get(&host, "/docs", &[]);
    assert_eq!(folder.status, 307, "{folder:?}");
    assert_eq!(header(&folder, "location"), "/docs/");
    assert_eq!(get(&host, "/docs/", &[]).body, "<p>docs</p>\n");

    // No such file: the host's 404; any other method: 405.
    let missing = get(&host, "/nope.js", &[]);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "no route or file for GET /nope.js");
    let post = host.send("POST", "site.localhost", "/index.html", b"x", &[]);
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(header(&post, "allow"), "GET, HEAD");
}

#[test]
fn conditional_range_and_head_requests() {
    let host = setup("static-conditional", STATIC_ONLY).start();
    let first = get(&host, "/app.js", &[]);
    let etag = header(&first, "etag").to_owned();
    let modified = header(&first, "last-modified").to_owned();

    // 304 by ETag, and by date, with the validators and the caching rules.
    for (name, value) in [
        ("if-none-match", etag.as_str()),
        ("if-modified-since", modified.as_str()),
    ] {
        let r = get(&host, "/app.js", &[(name, value)]);
        assert_eq!(r.status, 304, "{name}: {r:?}");
        assert_eq!(r.body, "", "{name}");
        assert_eq!(header(&r, "etag"), etag, "{name}");
        assert_eq!(header(&r, "cache-control"), "max-age=3600", "{name}");
        assert_eq!(header(&r, "vary"), "accept-encoding", "{name}");
    }
    // A tag that does not match, or a date before the file changed: the file.
    let other = get(&host, "/app.js", &[("if-none-match", "\"other\"")]);
    assert_eq!((other.status, other.body.as_str()), (200, APP_JS));
    let older = get(
        &host,
        "/app.js",
        &[("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")],
    );
    assert_eq!(older.status, 200);
    // An If-Match that fails: 412.
    let changed = get(&host, "/app.js", &[("if-match", "\"other\"")]);
    assert_eq!(changed.status, 412);

    // Ranges.
    let part = get(&host, "/digits.txt", &[("range", "bytes=2-5")]);
    assert_eq!(part.status, 206, "{part:?}");
    assert_eq!(part.body, "2345");
    assert_eq!(header(&part, "content-range"), "bytes 2-5/10");
    let tail = get(&host, "/digits.txt", &[("range", "bytes=-3")]);
    assert_eq!((tail.status, tail.body.as_str()), (206, "789"));
    let beyond = get(&host, "/digits.txt", &[("range", "bytes=20-30")]);
    assert_eq!(beyond.status, 416);
    assert_eq!(header(&beyond, "content-range"), "bytes */10");

    // HEAD: the GET's headers, no body.
    let head = host.send("HEAD", "site.localhost", "/digits.txt", b"", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(header(&head, "content-length"), "10");
    assert_eq!(header(&head, "content-type"), "text/plain");
    assert_eq!(head.body, "");
}

#[test]
fn precompressed_siblings_are_chosen_by_accept_encoding() {
    let host = setup("static-precompressed", STATIC_ONLY).start();
    let cases = [
        ("gzip", Some("gzip"), "GZIP-SIBLING"),
        ("br", Some("br"), "BROTLI-SIBLING"),
        ("gzip, br", Some("br"), "BROTLI-SIBLING"),
        ("br;q=0.5, gzip", Some("gzip"), "GZIP-SIBLING"),
        ("identity", None, APP_JS),
        ("", None, APP_JS),
    ];
    for (accept, encoding, body) in cases {
        let headers: &[(&str, &str)] = if accept.is_empty() {
            &[]
        } else {
            &[("accept-encoding", accept)]
        };
        let r = get(&host, "/app.js", headers);
        assert_eq!(r.status, 200, "{accept:?}");
        assert_eq!(r.body, body, "{accept:?}");
        assert_eq!(r.header("content-encoding"), encoding, "{accept:?}");
        // The type is the file's, not the sibling's; caches keep the variants apart.
        assert_eq!(header(&r, "content-type"), "text/javascript", "{accept:?}");
        assert_eq!(header(&r, "vary"), "accept-encoding", "{accept:?}");
    }
    // Each variant has its own tag.
    let plain = get(&host, "/app.js", &[]);
    let gzip = get(&host, "/app.js", &[("accept-encoding", "gzip")]);
    assert_ne!(header(&plain, "etag"), header(&gzip, "etag"));
    // A file without siblings is sent as it is.
    let css = get(&host, "/style.css", &[("accept-encoding", "gzip, br")]);
    assert_eq!(css.status, 200);
    assert_eq!(css.header("content-encoding"), None);
    assert_eq!(css.body, "body { color: teal }\n");
}

const WITH_PLUGIN: &str = r#"{"servers": [{"name": "site", "domains": ["site.localhost"],
    "plugin": "hello", "config": {"greeting": "Howdy"},
    "static": {"root": "site", "spa_fallback": "index.html", "fallback_except": ["/api"]}}]}"#;

#[test]
fn plugin_routes_come_first_then_files_then_the_fallback_for_navigation_only() {
    let host = setup("static-spa", WITH_PLUGIN)
        .plugin("hello", "hello.so")
        .start();
    let page = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];

    // A route of the plugin wins over a file of the same path.
    assert_eq!(get(&host, "/plain", &[]).body, "Hello, world!\n");
    assert_eq!(
        get(&host, "/", &page).body.split(" (").next(),
        Some("Howdy from site.localhost!")
    );
    assert_eq!(get(&host, "/hello/you", &page).body, "Howdy, you!\n");
    // Files where the plugin has no route.
    assert_eq!(get(&host, "/app.js", &[]).body, APP_JS);
    assert_eq!(get(&host, "/docs/", &[]).body, "<p>docs</p>\n");

    // A page the browser navigates to: the SPA's index, 200.
    for path in ["/app/settings", "/users/7/edit?tab=2", "/apiary"] {
        let r = get(&host, path, &page);
        assert_eq!((r.status, r.body.as_str()), (200, INDEX), "{path}");
        assert_eq!(header(&r, "content-type"), "text/html", "{path}");
        assert_eq!(header(&r, "cache-control"), "no-cache", "{path}");
    }
    let head = host.send("HEAD", "site.localhost", "/app/settings", b"", &page);
    assert_eq!(head.status, 200);
    assert_eq!(header(&head, "content-length"), INDEX.len().to_string());

    // Not for an asset (no text/html in Accept), nor under a listed prefix, nor for
    // another method: the host's 404.
    let not_found = |r: &Reply, what: &str| {
        assert_eq!(r.status, 404, "{what}: {r:?}");
        assert!(r.body.contains("\"error\""), "{what}: {r:?}");
    };
    not_found(
        &get(&host, "/app/settings", &[("accept", "*/*")]),
        "an asset",
    );
    not_found(&get(&host, "/missing.js", &[]), "no Accept");
    not_found(&get(&host, "/api", &page), "/api");
    not_found(&get(&host, "/api/users", &page), "/api/users");
    not_found(
        &host.send("POST", "site.localhost", "/app/settings", b"{}", &page),
        "a POST",
    );
    // A route the plugin has for another method keeps the plugin's 405.
    assert_eq!(get(&host, "/echo", &page).status, 405);
}

#[test]
fn traversal_out_of_the_folder_is_impossible() {
    let config = r#"{"servers": [{"name": "site", "domains": ["site.localhost"],
        "static": {"root": "site", "spa_fallback": "index.html"}}]}"#;
    let setup = setup("static-traversal", config);
    let site = setup.dir.join("site");
    write(&setup.dir, &[("site/app2.js", "the second script\n")]);
    // Symlinks: a file and a folder out of the folder, a precompressed sibling out of
    // it, and one that stays inside (allowed).
    std::os::unix::fs::symlink("../secret.txt", site.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink(&setup.dir, site.join("outside")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", site.join("app2.js.gz")).unwrap();
    std::os::unix::fs::symlink("app.js", site.join("inside.js")).unwrap();
    let host = setup.start();

    let attempts = [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/docs/..%2f..%2fsecret.txt",
        "/docs/%2e%2e/%2e%2e/secret.txt",
        "/..%5csecret.txt",
        "/docs%5c..%5c..%5csecret.txt",
        "/secret.txt%00.html",
        "/%00",
        "/escape.txt",
        "/outside/secret.txt",
    ];
    for accept in ["*/*", "text/html"] {
        for path in attempts {
            let r = get(&host, path, &[("accept", accept)]);
            assert!(!r.body.contains(SECRET), "{path} ({accept}) leaked: {r:?}");
            if accept == "*/*" {
                assert!(
                    r.status == 400 || r.status == 404,
                    "{path}: {} {}",
                    r.status,
                    r.body
                );
            } else {
                // A navigation may get the app's index instead, never the secret.
                assert!(
                    r.status == 400 || r.status == 404 || r.body == INDEX,
                    "{path} ({accept}): {r:?}"
                );
            }
        }
    }
    // Encoded `..`, encoded slashes, backslashes and NUL are refused before any look at
    // the disk.
    for path in [
        "/%2e%2e/secret.txt",
        "/..%5csecret.txt",
        "/secret.txt%00.html",
    ] {
        assert_eq!(get(&host, path, &[]).status, 400, "{path}");
    }
    // A backslash as it is: not a valid request target at all.
    let raw = host
        .raw(b"GET /..\\secret.txt HTTP/1.1\r\nhost: site.localhost\r\nconnection: close\r\n\r\n");
    assert_eq!(raw.status, 400);
    assert!(!raw.body.contains(SECRET));
    // HEAD looks at metadata only, through the same check.
    let head = host.send("HEAD", "site.localhost", "/escape.txt", b"", &[]);
    assert_eq!(head.status, 404);
    assert_ne!(
        head.header("content-length"),
        Some(SECRET.len().to_string().as_str())
    );
    // A sibling that leads out is skipped: the plain file is sent.
    let sibling = get(&host, "/app2.js", &[("accept-encoding", "gzip")]);
    assert_eq!(sibling.body, "the second script\n");
    assert_eq!(sibling.header("content-encoding"), None);
    // A symlink that stays inside is served.
    assert_eq!(get(&host, "/inside.js", &[]).body, APP_JS);
    host.wait_for_log(&["refused a static file outside the folder", "server=site"]);
}

#[test]
fn static_settings_and_a_server_gaining_or_losing_its_plugin_apply_live() {
    let config = |root: &str, plugin: &str| {
        format!(
            r#"{{"global": {{"reload": {{"debounce_ms": 20}}}},
              "servers": [{{"name": "site", "domains": ["site.localhost"], {plugin}
                "static": {{"root": "{root}", "max_age_s": 60}}}}]}}"#
        )
    };
    let setup = setup("static-live", &config("site", ""));
    write(
        &setup.dir,
        &[
            ("v2/index.html", "<p>version two</p>\n"),
            ("v2/app.js", "v2\n"),
        ],
    );
    let host = setup.plugin("hello", "hello.so").start();
    assert_eq!(get(&host, "/", &[]).body, INDEX);

    // The root changes: served from the new folder, with no restart.
    host.write_config(&config("v2", ""));
    host.wait_until("the new root serves", || {
        get(&host, "/", &[]).body == "<p>version two</p>\n"
    });
    assert_eq!(get(&host, "/app.js", &[]).body, "v2\n");

    // A root that does not exist is rejected with its path; the old one keeps serving.
    host.write_config(&config("nowhere", ""));
    host.wait_for_log(&[
        "config change rejected",
        "servers[0].static.root: no such folder",
    ]);
    assert_eq!(get(&host, "/app.js", &[]).body, "v2\n");

    // The server gains a plugin: its routes come first, files after them.
    host.write_config(&config("v2", r#""plugin": "hello","#));
    host.wait_until("the plugin serves", || {
        get(&host, "/hello/x", &[]).body == "Hello, x!\n"
    });
    assert_eq!(get(&host, "/app.js", &[]).body, "v2\n");

    // And loses it again: its generation is retired, the files stay.
    host.write_config(&config("v2", ""));
    host.wait_until("the plugin is gone", || {
        get(&host, "/hello/x", &[]).status == 404
    });
    host.wait_for_log(&["retired", "server=site"]);
    assert_eq!(get(&host, "/app.js", &[]).body, "v2\n");
    assert_eq!(
        host.send("POST", "site.localhost", "/echo", b"{}", &[])
            .status,
        405
    );
}

#[test]
fn bad_static_settings_are_reported_with_their_json_paths() {
    let config = r#"{"servers": [
        {"name": "a", "domains": ["a.localhost"], "static": {"root": "nowhere"}},
        {"name": "b", "domains": ["b.localhost"], "config": {"x": 1},
         "static": {"root": "site", "index": "../x.html", "spa_fallback": "missing.html",
                    "fallback_except": ["api"], "max_age_s": -1, "colour": "red"}},
        {"name": "c", "domains": ["c.localhost"]},
        {"name": "d", "domains": ["d.localhost"], "static": {"root": "site", "cache_mb": "16"}},
        {"name": "e", "domains": ["e.localhost"], "static": {"root": "site", "cache_mb": 100000}}]}"#;
    let out = setup("static-bad", config).run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for expected in [
        "servers[0].static.root: no such folder: ",
        "servers[1].config: only used with a `plugin`",
        "servers[1].static.index: \"../x.html\" must be a file name",
        "servers[1].static.spa_fallback: no such file: ",
        "servers[1].static.fallback_except[0]: \"api\" must start with `/`",
        "servers[1].static.max_age_s: expected a whole number",
        "servers[1].static.colour: unknown key",
        "servers[2]: missing key `plugin` (a server needs a `plugin`, `static` files, or both)",
        "servers[3].static.cache_mb: expected a whole number of at least 0, found \"16\"",
        "servers[4].static.cache_mb: 100000 is more than 65536 (MiB)",
    ] {
        assert!(
            out.stderr.contains(expected),
            "expected {expected:?} in:\n{}",
            out.stderr
        );
    }
}

#[test]
fn files_stay_up_while_the_plugin_cannot_run() {
    let config = r#"{"servers": [{"name": "site", "domains": ["site.localhost"],
        "plugin": "not-installed", "static": {"root": "site", "spa_fallback": "index.html",
        "fallback_except": ["/api"]}}]}"#;
    let host = setup("static-waiting", config).start();
    // The front end is served (files, then the fallback)...
    assert_eq!(get(&host, "/app.js", &[]).body, APP_JS);
    let page = get(&host, "/app/settings", &[("accept", "text/html")]);
    assert_eq!((page.status, page.body.as_str()), (200, INDEX));
    // ...and everything else gets the plugin's 503 with the reason.
    for r in [
        get(&host, "/api/users", &[("accept", "text/html")]),
        get(&host, "/missing.js", &[]),
        host.send("POST", "site.localhost", "/app.js", b"{}", &[]),
    ] {
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.body.contains("no plugin named"), "{r:?}");
    }
}

/// The same folder twice: `site` keeps its files in memory (the default), `uncached`
/// reads every one from disk; and `small`, which keeps at most 1 MiB.
const KEPT_AND_NOT: &str = r#"{"servers": [
    {"name": "site", "domains": ["site.localhost"], "static": {"root": "site", "max_age_s": 3600}},
    {"name": "uncached", "domains": ["uncached.localhost"],
     "static": {"root": "site", "max_age_s": 3600, "cache_mb": 0}},
    {"name": "small", "domains": ["small.localhost"], "static": {"root": "big", "cache_mb": 1}}]}"#;

/// A method, a path and headers.
type Request<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// A metric's value for one server, from `/metrics`.
fn metric(admin: &Client, name: &str, server: &str) -> u64 {
    let body = admin.get("admin", "/metrics").body;
    let prefix = format!("{name}{{server=\"{server}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{body}"))
        .parse()
        .unwrap()
}

/// A reply without what differs between any two replies (its date and request id).
fn comparable(reply: &Reply) -> (u16, String, Vec<(String, String)>) {
    let mut headers: Vec<_> = reply
        .headers
        .iter()
        .filter(|(name, _)| !["date", "x-request-id"].contains(&name.as_str()))
        .cloned()
        .collect();
    headers.sort();
    (reply.status, reply.body.clone(), headers)
}

#[test]
fn files_kept_in_memory_answer_as_from_disk_and_any_change_is_seen_at_once() {
    let setup = setup("static-cache", KEPT_AND_NOT);
    let dir = setup.dir.clone();
    let site = dir.join("site");
    std::os::unix::fs::symlink("digits.txt", site.join("linked.txt")).unwrap();
    let big: Vec<String> = (0..3).map(|i| i.to_string().repeat(400 << 10)).collect();
    for (i, contents) in big.iter().enumerate() {
        write(&dir, &[(&format!("big/{i}.txt"), contents)]);
    }
    // A file (and a folder) is kept only once its last change is a second old.
    std::thread::sleep(Duration::from_millis(1100));
    let host = setup.start();
    let admin = host.admin();
    let send = |server: &str, (method, path, headers): &Request| {
        host.send(method, &format!("{server}.localhost"), path, b"", headers)
    };

    // Each request three times from the site that keeps its files (the first reads the
    // file, the others are answered from memory) and once from the one that does not:
    // the same status, headers and body every time.
    let from_disk = host.get("uncached.localhost", "/app.js");
    let etag = header(&from_disk, "etag").to_owned();
    let last_modified = header(&from_disk, "last-modified").to_owned();
    let weak_in_a_list = format!("\"other\", W/{etag}");
    let requests: Vec<Request> = vec![
        ("GET", "/app.js", vec![]),
        ("GET", "/app.js", vec![("accept-encoding", "gzip")]),
        ("GET", "/app.js", vec![("accept-encoding", "gzip, br")]),
        (
            "GET",
            "/app.js",
            vec![("accept-encoding", "br;q=0.5, gzip")],
        ),
        ("GET", "/app.js", vec![("accept-encoding", "identity")]),
        ("GET", "/", vec![]),
        ("GET", "/docs/", vec![("accept-encoding", "gzip, br")]),
        ("GET", "/style.css", vec![("accept-encoding", "gzip, br")]),
        ("GET", "/style.css", vec![]),
        ("GET", "/data.json", vec![("accept-encoding", "gzip")]),
        ("GET", "/digits.txt", vec![]),
        ("HEAD", "/digits.txt", vec![]),
        ("GET", "/plain", vec![]),
        ("GET", "/linked.txt", vec![]),
        // Revalidations: a tag that matches (304), weakly in a list, `*`, one that does
        // not (200), which decides over a date that would match.
        ("GET", "/app.js", vec![("if-none-match", &etag)]),
        ("GET", "/app.js", vec![("if-none-match", &weak_in_a_list)]),
        ("GET", "/app.js", vec![("if-none-match", "*")]),
        (
            "GET",
            "/app.js",
            vec![
                ("if-none-match", "\"other\""),
                ("if-modified-since", &last_modified),
            ],
        ),
        // Never answered from memory: a range, a date alone, If-Match.
        ("GET", "/digits.txt", vec![("range", "bytes=2-5")]),
        (
            "GET",
            "/app.js",
            vec![("if-modified-since", &last_modified)],
        ),
        ("GET", "/app.js", vec![("if-match", "\"other\"")]),
    ];
    let mut kept = HashSet::new();
    let mut expected_hits = 0;
    for request in &requests {
        let reference = comparable(&send("uncached", request));
        for time in 0..3 {
            let reply = send("site", request);
            assert_eq!(comparable(&reply), reference, "{request:?}, time {time}");
        }
        let (method, path, headers) = request;
        let names: Vec<&str> = headers.iter().map(|(name, _)| *name).collect();
        if ["range", "if-match"].iter().any(|n| names.contains(n)) || names == ["if-modified-since"]
        {
            continue;
        }
        let encoding = headers.iter().find(|(n, _)| *n == "accept-encoding");
        let fills = *method == "GET" && !names.contains(&"if-none-match");
        let first = fills && kept.insert((path.to_string(), encoding.map(|(_, v)| *v)));
        expected_hits += if first { 2 } else { 3 };
    }
    assert_eq!(
        metric(&admin, "host_static_cache_hits_total", "site"),
        expected_hits
    );
    assert_eq!(
        metric(&admin, "host_static_cache_hits_total", "uncached"),
        0
    );
    assert!(metric(&admin, "host_static_cache_bytes", "site") > 0);
    assert_eq!(metric(&admin, "host_static_cache_bytes", "uncached"), 0);

    // A precompressed sibling added beside a kept file is chosen at once.
    write(&dir, &[("site/data.json.gz", "GZIP-DATA")]);
    let gzip = get(&host, "/data.json", &[("accept-encoding", "gzip")]);
    assert_eq!((gzip.status, gzip.body.as_str()), (200, "GZIP-DATA"));
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));

    // A file rewritten in place, to the same size, its modification time put back: its
    // change time tells.
    let app = site.join("app.js");
    let modified = std::fs::metadata(&app).unwrap().modified().unwrap();
    let rewritten = APP_JS.replace("plain", "PLAIN");
    std::fs::write(&app, &rewritten).unwrap();
    let file = std::fs::File::options().write(true).open(&app).unwrap();
    file.set_modified(modified).unwrap();
    assert_eq!(get(&host, "/app.js", &[]).body, rewritten);

    // A file renamed over a kept one, with the same size and modification time.
    let css = site.join("style.css");
    let modified = std::fs::metadata(&css).unwrap().modified().unwrap();
    let other = dir.join("style.css.new");
    std::fs::write(&other, "body { color: PINK }\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    std::fs::rename(&other, &css).unwrap();
    // (Without an Accept-Encoding, only the file is looked at, not its folder.)
    assert_eq!(get(&host, "/style.css", &[]).body, "body { color: PINK }\n");

    // A kept symlink pointed out of the folder: refused like any other.
    std::fs::remove_file(site.join("linked.txt")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", site.join("linked.txt")).unwrap();
    let linked = get(&host, "/linked.txt", &[]);
    assert_eq!(linked.status, 404, "{linked:?}");
    assert!(!linked.body.contains(SECRET));

    // A kept file removed: 404.
    std::fs::remove_file(site.join("plain")).unwrap();
    assert_eq!(get(&host, "/plain", &[]).status, 404);

    // None of those came from memory.
    assert_eq!(
        metric(&admin, "host_static_cache_hits_total", "site"),
        expected_hits
    );

    // A file changed less than a second before it is opened (here, one whose
    // modification time is ahead) is read from disk each time; once it has settled,
    // it is kept again.
    let before = metric(&admin, "host_static_cache_hits_total", "site");
    let set_modified = |at: SystemTime| {
        let file = std::fs::File::options().write(true).open(&app).unwrap();
        file.set_modified(at).unwrap();
    };
    set_modified(SystemTime::now() + Duration::from_secs(3600));
    for _ in 0..3 {
        assert_eq!(get(&host, "/app.js", &[]).body, rewritten);
    }
    assert_eq!(
        metric(&admin, "host_static_cache_hits_total", "site"),
        before
    );
    // (Its change time is now, too.)
    set_modified(SystemTime::now() - Duration::from_secs(3600));
    let settled = SystemTime::now() + Duration::from_millis(1100);
    while SystemTime::now() < settled {
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..3 {
        assert_eq!(get(&host, "/app.js", &[]).body, rewritten);
    }
    assert_eq!(
        metric(&admin, "host_static_cache_hits_total", "site"),
        before + 2
    );

    // A server that keeps at most 1 MiB: three files of 400 KiB, asked for twice each,
    // all answered right, and never more than the budget kept.
    for round in 0..2 {
        for (i, contents) in big.iter().enumerate() {
            let r = host.get("small.localhost", &format!("/{i}.txt"));
            assert_eq!(r.status, 200, "round {round}, file {i}");
            assert!(r.body == *contents, "round {round}, file {i}: wrong body");
        }
        let kept = metric(&admin, "host_static_cache_bytes", "small");
        assert!(kept > 400 << 10 && kept <= 1 << 20, "{kept} bytes kept");
    }
    // The file kept last is there.
    let hits = metric(&admin, "host_static_cache_hits_total", "small");
    assert!(host.get("small.localhost", "/2.txt").body == big[2]);
    assert_eq!(
        metric(&admin, "host_static_cache_hits_total", "small"),
        hits + 1
    );
}

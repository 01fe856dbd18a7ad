//! Config validation, `${VAR}` substitution and `host --check`.

use crate::support::Setup;

/// Runs the host against `config` and expects exit code 2 with every `expected` error.
fn refused(label: &str, config: &str, expected: &[&str]) {
    let out = Setup::new(label, config)
        .plugin("hello", "hello.so")
        .run(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for e in expected {
        assert!(out.stderr.contains(e), "expected {e:?} in:\n{}", out.stderr);
    }
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

#[test]
fn invalid_json_names_line_and_column() {
    refused(
        "json",
        "{\n  \"servers\": [\n    {,}\n  ]\n}",
        &["problem", "invalid JSON", "line 3 column 6"],
    );
}

#[test]
fn every_kind_of_invalid_config_is_reported_at_once_with_its_path() {
    refused(
        "all-problems",
        r#"{"global": {"listen": ["127.0.0.1"], "colour": "blue"},
            "servers": [
              {"name": "a", "domains": ["a.localhost", "under_score.com"], "plugin": "hello"},
              {"name": "b", "domains": ["A.localhost"], "plugin": "hello", "extra": 1},
              {"name": "a", "domains": ["c.localhost"], "plugin": "hello"}]}"#,
        &[
            "5 problems",
            "global.listen[0]: \"127.0.0.1\" is not an IP address with a port",
            "global.colour: unknown key",
            "servers[0].domains[1]: \"under_score.com\" is not a valid domain",
            "servers[1].extra: unknown key",
            "servers[2].name: duplicate server name \"a\" (also servers[0])",
        ],
    );
}

#[test]
fn a_domain_claimed_by_two_servers_is_refused() {
    refused(
        "dup-domain",
        r#"{"servers": [
              {"name": "a", "domains": ["x.localhost"], "plugin": "hello"},
              {"name": "b", "domains": ["X.localhost."], "plugin": "hello"}]}"#,
        &["servers[1].domains[0]: domain x.localhost is already claimed by server \"a\" (servers[0])"],
    );
}

#[test]
fn a_missing_environment_variable_is_named() {
    refused(
        "env-missing",
        r#"{"servers": [{"name": "a", "domains": ["a.localhost"], "plugin": "hello",
              "config": {"greeting": "${SURELY_NOT_SET_ANYWHERE}"}}]}"#,
        &["servers[0].config.greeting: environment variable SURELY_NOT_SET_ANYWHERE is not set"],
    );
}

#[test]
fn environment_variables_are_substituted_into_plugin_config() {
    let config = r#"{"servers": [{"name": "a", "domains": ["a.localhost"], "plugin": "hello",
        "config": {"greeting": "${TEST_GREETING}"}}]}"#;
    let host = Setup::new("env", config)
        .plugin("hello", "hello.so")
        .env("TEST_GREETING", "Bonjour")
        .start();
    assert_eq!(
        host.get("a.localhost", "/hello/toi").body,
        "Bonjour, toi!\n"
    );
}

#[test]
fn a_plugin_rejecting_its_config_says_which_field() {
    let config = r#"{"servers": [{"name": "a", "domains": ["a.localhost"], "plugin": "hello",
        "config": {"greting": "typo"}}]}"#;
    let host = Setup::new("plugin-config", config)
        .plugin("hello", "hello.so")
        .start();
    let r = host.get("a.localhost", "/");
    assert_eq!(r.status, 503);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `greting`"),
        "{}",
        r.body
    );
}

#[test]
fn check_passes_a_good_setup() {
    let config = r#"{"servers": [{"name": "a", "domains": ["a.localhost"], "plugin": "hello"}]}"#;
    let out = Setup::new("check-ok", config)
        .plugin("hello", "hello.so")
        .run(&["--check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("is valid and all 1 servers can start"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("listening on"));
}

#[test]
fn check_fails_on_a_bad_plugin_or_a_missing_one() {
    let config = r#"{"servers": [
        {"name": "a", "domains": ["a.localhost"], "plugin": "hello"},
        {"name": "b", "domains": ["b.localhost"], "plugin": "absent"}]}"#;
    let out = Setup::new("check-bad", config)
        .plugin("hello", "hello.so")
        .file("junk.so", b"junk")
        .run(&["--check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("2 problem(s)"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("junk.so: not a loadable shared library"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("server \"b\": no plugin named \"absent\""),
        "{}",
        out.stderr
    );
}

#[test]
fn check_rejects_an_invalid_config_with_exit_code_2() {
    let out = Setup::new("check-config", r#"{"servers": 5}"#).run(&["--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr
            .contains("servers: expected an array, found a number"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_missing_config_file_is_exit_code_2_naming_it() {
    let setup = Setup::new("no-config", "{}");
    std::fs::remove_file(setup.dir.join("servers.config.json")).unwrap();
    let out = setup.run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr
            .contains("servers.config.json: 1 problem\n  cannot read"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_host_listening_where_the_command_line_says_sees_no_config_change_until_there_is_one() {
    let config = r#"{"global": {"listen": ["127.0.0.1:1"], "reload": {"debounce_ms": 20}},
      "servers": [{"name": "hello", "domains": ["hello.localhost"], "plugin": "hello"}]}"#;
    // `start` passes `--listen 127.0.0.1:0`, which replaces the file's `global.listen`:
    // that difference is not a change of config.
    let host = Setup::new("listen-override", config)
        .plugin("hello", "hello.so")
        .start();
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(
        host.count_log_lines(&["applied config change"]),
        0,
        "{}",
        host.logs()
    );
    host.write_config(&config.replace(
        r#""plugin": "hello""#,
        r#""plugin": "hello", "config": {"greeting": "Hey"}"#,
    ));
    host.wait_for_log(&["applied config change"]);
    assert_eq!(host.get("hello.localhost", "/hello/x").body, "Hey, x!\n");
}

/// The production config README.md shows (between its `production-config` markers)
/// passes `--check` once its files are there: test certificates for its names, its
/// static folder, its JWT key, its plugin (hello, as `shop`). So the docs cannot rot.
#[test]
fn the_readme_s_production_config_passes_check() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("<!-- production-config:start -->")
        .expect("README.md marks its production config");
    let end = readme.find("<!-- production-config:end -->").unwrap();
    let block = &readme[start..end];
    let json = &block[block.find("```json\n").unwrap() + 8..block.rfind("```").unwrap()];
    serde_json::from_str::<serde_json::Value>(json).expect("the example is JSON");

    let setup = Setup::new("readme-production", "{}").plugin("hello", "shop.so");
    let dir = &setup.dir;
    // Each real path the example names, and what stands in for it here.
    let names = [
        "shop.example",
        "www.shop.example",
        "api.shop.example",
        "*.api.shop.example",
    ];
    let made = rcgen::generate_simple_self_signed(names.map(str::to_owned).to_vec()).unwrap();
    std::fs::write(dir.join("fullchain.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("privkey.pem"), made.signing_key.serialize_pem()).unwrap();
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    std::fs::write(dir.join("dist/index.html"), "<!doctype html>").unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/jwt/test-only-rs256-a-public.pem"
        ),
        dir.join("auth-public.pem"),
    )
    .unwrap();
    let stand_ins = [
        (
            "/etc/letsencrypt/live/shop.example/fullchain.pem",
            "fullchain.pem",
        ),
        (
            "/etc/letsencrypt/live/shop.example/privkey.pem",
            "privkey.pem",
        ),
        ("/srv/host/plugins", "plugins"),
        ("/var/log/host/access.log", "access.log"),
        ("/srv/shop/dist", "dist"),
        ("/etc/host/auth-public.pem", "auth-public.pem"),
    ];
    let mut config = json.to_owned();
    for (real, here) in stand_ins {
        assert!(config.contains(real), "the example no longer names {real}");
        config = config.replace(real, &dir.join(here).display().to_string());
    }
    std::fs::write(dir.join("servers.config.json"), &config).unwrap();
    let out = setup.run(&["--check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{config}");
    assert!(
        out.stdout.contains("is valid and all 2 servers can start"),
        "{out:?}"
    );

    // And the check is real: without the certificate it fails.
    std::fs::remove_file(dir.join("fullchain.pem")).unwrap();
    let out = setup.run(&["--check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("fullchain.pem"), "{}", out.stderr);
}

//! `cargo xtask new-plugin NAME`: a new plugin crate in `plugins/` that builds, serves
//! and has tests from the start: the crate, its workspace entry and its server entry in
//! `servers.config.json` (at `NAME.localhost`).

use std::path::Path;

use anyhow::{bail, Context, Result};

pub fn run(args: &[String]) -> Result<()> {
    let [name] = args else {
        bail!("usage: cargo xtask new-plugin NAME (lower-case letters, digits and -)");
    };
    check_name(name)?;
    let taken = crate::workspace_packages()?.iter().any(|p| {
        p["name"]
            .as_str()
            .is_some_and(|n| n.replace('_', "-") == *name)
    });
    if taken {
        bail!("the workspace already has a package named {name:?}");
    }
    let root = crate::root();
    let dir = root.join("plugins").join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let manifest_path = root.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)?;
    let manifest = add_member(&manifest, &format!("plugins/{name}"))?;
    let config_path = root.join("servers.config.json");
    let config = std::fs::read_to_string(&config_path)?;
    let config = add_server(&config, name)
        .with_context(|| format!("adding a server to {}", config_path.display()))?;

    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(dir.join("Cargo.toml"), crate_manifest(name))?;
    std::fs::write(dir.join("src/lib.rs"), crate_source(name))?;
    write_via_rename(&manifest_path, &manifest)?;
    write_via_rename(&config_path, &config)?;
    println!(
        "created plugins/{name} (a workspace member, served at {name}.localhost by servers.config.json)\n\
         \n  cargo test -p {name}                              # its tests, without a host\
         \n  cargo xtask build-plugins && cargo run -p host    # then:\
         \n  curl http://{name}.localhost:7777/hello/you"
    );
    Ok(())
}

/// Rust's keywords, which cannot name a crate.
const KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
    "false", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut",
    "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type",
    "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "macro",
    "override", "priv", "typeof", "unsized", "virtual", "yield",
];

/// A plugin name: a crate name that is also a domain label.
fn check_name(name: &str) -> Result<()> {
    if KEYWORDS.contains(&name) {
        bail!("{name:?} is a Rust keyword; it cannot name a crate");
    }
    let valid = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "{name:?} is not a usable plugin name: use lower-case letters, digits and -, starting with a letter (it becomes a crate name and the domain {name}.localhost)"
        );
    }
    Ok(())
}

/// The workspace manifest with `member` added to `members`, after its last `plugins/`
/// entry.
fn add_member(manifest: &str, member: &str) -> Result<String> {
    let entry = format!("\"{member}\"");
    let key = manifest
        .lines()
        .scan(0, |at, line| {
            let start = *at;
            *at += line.len() + 1;
            Some((start, line))
        })
        .find(|(_, line)| line.trim_start().starts_with("members"))
        .map(|(start, _)| start)
        .context("no `members` list in the workspace manifest")?;
    let (open, close) = array_bounds(&manifest[key..], "members")
        .map(|(o, c)| (key + o, key + c))
        .context("cannot find the end of the `members` list")?;
    let members = &manifest[open..close];
    if members.contains(&entry) {
        bail!("{member} is already a workspace member");
    }
    let Some(last) = members
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("\"plugins/"))
    else {
        bail!("no \"plugins/...\" entry in the workspace members to add it after");
    };
    let indent: String = last.chars().take_while(|c| c.is_whitespace()).collect();
    let at = open + members.find(last).expect("a line of it") + last.len();
    Ok(format!(
        "{}\n{indent}{entry},{}",
        &manifest[..at],
        &manifest[at..]
    ))
}

/// The config text with a server for plugin `name` at `name.localhost` appended to its
/// `servers` array; everything else is kept as written.
fn add_server(config: &str, name: &str) -> Result<String> {
    let parsed: serde_json::Value = serde_json::from_str(config).context("not valid JSON")?;
    let servers = parsed["servers"]
        .as_array()
        .context("it has no \"servers\" array")?;
    if servers.iter().any(|s| s["name"] == name) {
        bail!("it already has a server named {name:?}");
    }
    let (open, close) =
        array_bounds(config, "\"servers\"").context("cannot find the servers array")?;
    let inside = config[open + 1..close].trim_end();
    let entry = format!(
        "{{\n      \"name\": \"{name}\",\n      \"domains\": [\"{name}.localhost\"],\n      \"plugin\": \"{name}\",\n      \"config\": {{ \"greeting\": \"Hello\" }}\n    }}"
    );
    let separator = if inside.trim().is_empty() { "" } else { "," };
    let edited = format!(
        "{}{inside}{separator}\n    {entry}\n  {}",
        &config[..open + 1],
        &config[close..]
    );
    // The edit is checked before anything is written.
    let check: serde_json::Value =
        serde_json::from_str(&edited).context("the edited file is not valid JSON")?;
    let added = check["servers"].as_array().is_some_and(|s| {
        s.len() == servers.len() + 1 && s.last().is_some_and(|last| last["name"] == name)
    });
    if !added {
        bail!("cannot add the server safely: add it by hand");
    }
    Ok(edited)
}

/// The byte positions of the `[` and its matching `]` of the array that follows `key`.
fn array_bounds(text: &str, key: &str) -> Option<(usize, usize)> {
    let start = text.find(key)? + key.len();
    let open = start + text[start..].find('[')?;
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in text[open..].char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((open, open + i));
                }
            }
            _ => {}
        }
    }
    None
}

fn write_via_rename(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp-new-plugin");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn crate_manifest(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version.workspace = true
edition.workspace = true
license.workspace = true
publish.workspace = true

[lib]
crate-type = ["cdylib"]

[dependencies]
plugin-api.workspace = true
serde.workspace = true
serde_json.workspace = true

[lints]
workspace = true
"#
    )
}

fn crate_source(name: &str) -> String {
    // `Server` at the end: a name like `config` or `result` must not give a type that
    // clashes with the template's own names or the prelude's.
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .chain(["Server".to_owned()])
        .collect();
    format!(
        r#"//! `{name}`: a microserver. Run it with `cargo xtask build-plugins && cargo run -p host`,
//! then `curl http://{name}.localhost:7777/hello/you`; test it with `cargo test -p {name}`.

use std::sync::Arc;

use plugin_api::{{export_plugin, Error, InitContext, Microserver, Request, Response, Routes}};

/// The server's `config` in servers.config.json (defaults when it has none).
#[derive(serde::Deserialize)]
#[serde(default)]
struct Config {{
    greeting: String,
}}

impl Default for Config {{
    fn default() -> Self {{
        Config {{
            greeting: "Hello".to_owned(),
        }}
    }}
}}

pub struct {type_name} {{
    greeting: String,
}}

impl Microserver for {type_name} {{
    fn init(ctx: &InitContext<'_>) -> Result<Self, Error> {{
        let config: Config = ctx.config()?;
        Ok({type_name} {{
            greeting: config.greeting,
        }})
    }}

    fn routes(routes: &mut Routes<Self>) {{
        routes.get("/hello/{{name}}", Self::hello);
    }}
}}

impl {type_name} {{
    /// `GET /hello/{{name}}`
    async fn hello(self: Arc<Self>, req: Request) -> Response {{
        let name = req.param("name").unwrap_or_default();
        Response::text(format!("{{}}, {{name}}!\n", self.greeting))
    }}
}}

export_plugin!({type_name});

#[cfg(test)]
mod tests {{
    use plugin_api::testing::TestServer;

    #[test]
    fn greets() {{
        let server =
            TestServer::<super::{type_name}>::start(serde_json::json!({{"greeting": "Hi"}})).unwrap();
        assert_eq!(server.get("/hello/you").body(), b"Hi, you!\n");
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_crate_names_and_domain_labels() {
        for good in ["greeter", "my-api", "v2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Greeter",
            "my_api",
            "2fast",
            "trailing-",
            "a.b",
            "a b",
            "type",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_member_goes_after_the_last_plugin() {
        let manifest = "[workspace]\nmembers = [\n    \"host\",\n    \"plugins/hello\",\n    \"plugins/notes\",\n    \"xtask\",\n]\n";
        let out = add_member(manifest, "plugins/greeter").unwrap();
        assert_eq!(
            out,
            "[workspace]\nmembers = [\n    \"host\",\n    \"plugins/hello\",\n    \"plugins/notes\",\n    \"plugins/greeter\",\n    \"xtask\",\n]\n"
        );
        assert!(add_member(&out, "plugins/greeter").is_err());
        // Only the `members` list is edited, whatever follows it.
        let with_exclude = format!("{manifest}exclude = [\n    \"plugins/old\",\n]\n");
        let out = add_member(&with_exclude, "plugins/greeter").unwrap();
        assert!(
            out.contains("    \"plugins/notes\",\n    \"plugins/greeter\",\n    \"xtask\""),
            "{out}"
        );
        assert!(
            out.ends_with("exclude = [\n    \"plugins/old\",\n]\n"),
            "{out}"
        );
    }

    #[test]
    fn a_server_is_appended_and_the_rest_of_the_file_is_kept() {
        let config = "{\n  \"global\": {\"listen\": [\"127.0.0.1:7777\"]},\n  \"servers\": [\n    {\"name\": \"hello\", \"domains\": [\"x]\"], \"plugin\": \"hello\"}\n  ]\n}\n";
        let out = add_server(config, "greeter").unwrap();
        assert!(
            out.starts_with("{\n  \"global\": {\"listen\": [\"127.0.0.1:7777\"]},"),
            "{out}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        let servers = parsed["servers"].as_array().unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1]["domains"][0], "greeter.localhost");
        assert!(add_server(&out, "greeter").is_err());
        // A file the edit would get wrong is refused, not written.
        let tricky = "{\"global\": {\"default_server\": \"servers\", \"listen\": [\"1.2.3.4:5\"]}, \"servers\": []}";
        assert!(add_server(tricky, "greeter").is_err());
        let empty = add_server("{\"servers\": []}", "greeter").unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&empty).unwrap();
        assert_eq!(parsed["servers"][0]["name"], "greeter");
    }

    #[test]
    fn the_generated_source_names_its_type_from_the_crate_name() {
        let source = crate_source("my-api");
        assert!(source.contains("pub struct MyApiServer {"));
        assert!(source.contains("export_plugin!(MyApiServer);"));
    }
}

//! Writing a change made through the admin API back to the config file.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

/// Sets `enabled` of the server called `server` in the config file at `file`, keeping
/// every other key (known or not) and its order. The file is rewritten as a whole with
/// JSON's own formatting (two-space indents), atomically: written to a hidden file in
/// the same folder, synced, then renamed over the original (whose permissions it takes).
pub fn persist_enabled(file: &Path, server: &str, enabled: bool) -> Result<(), String> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut root: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{shown} is no longer valid JSON ({e}); not rewritten"))?;
    let entry = root
        .get_mut("servers")
        .and_then(Value::as_array_mut)
        .and_then(|servers| {
            servers
                .iter_mut()
                .find(|s| s.get("name").and_then(Value::as_str) == Some(server))
        })
        .and_then(Value::as_object_mut)
        .ok_or_else(|| {
            format!("{shown} no longer has a server called {server:?}; not rewritten")
        })?;
    entry.insert("enabled".to_owned(), Value::Bool(enabled));
    let mut out = serde_json::to_string_pretty(&root).map_err(|e| e.to_string())?;
    out.push('\n');
    let folder = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = folder.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(out.as_bytes())?;
        if let Ok(meta) = std::fs::metadata(file) {
            f.set_permissions(meta.permissions())?;
        }
        f.sync_all()?;
        std::fs::rename(&temp, file)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        format!("cannot rewrite {shown}: {e}")
    })
}

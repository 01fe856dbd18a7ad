//! The host's log lines as JSON (`--log-format json`): one object a line, with the
//! fields of the text format (timestamp, level, target, message and every field of the
//! event and of the spans it is in), for log collectors that read JSON.
//!
//! A small formatter rather than tracing-subscriber's `json` feature: that one cannot
//! split a plugin's own fields, which reach the host as text (`key=value ...`, made by
//! plugin-api's log bridge), into JSON fields; this one does (see [`plugin_fields`]).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::boundary::services::PLUGIN_FIELDS;

/// Formats each event as one JSON object:
/// `{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","target":"host::control::servers","message":"serving","server":"hello","generation":1}`.
/// Event fields are top-level keys next to `timestamp`, `level` and `target`; an event
/// inside spans gets `"spans":[{"name":...,<the span's fields>}]`, outermost first.
pub struct JsonLines;

/// Span fields as JSON members (`"key":value,...`), kept by the fmt layer for
/// [`JsonLines`]; set with `.fmt_fields(JsonFields)`.
pub struct JsonFields;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = String::with_capacity(256);
        line.push_str("{\"timestamp\":\"");
        SystemTime.format_time(&mut Writer::new(&mut line))?;
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push_str("\",\"target\":");
        push_str(&mut line, meta.target());
        let plugin = meta.target() == "plugin";
        event.record(&mut Members {
            out: &mut line,
            first: false,
            plugin,
        });
        if let Some(scope) = ctx.event_scope() {
            line.push_str(",\"spans\":[");
            for (i, span) in scope.from_root().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                line.push_str("{\"name\":");
                push_str(&mut line, span.name());
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.fields.is_empty() {
                        line.push(',');
                        line.push_str(&fields.fields);
                    }
                }
                line.push('}');
            }
            line.push(']');
        }
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut out = String::new();
        fields.record(&mut Members {
            out: &mut out,
            first: true,
            plugin: false,
        });
        writer.write_str(&out)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut out = String::new();
        fields.record(&mut Members {
            out: &mut out,
            first: current.fields.is_empty(),
            plugin: false,
        });
        current.fields.push_str(&out);
        Ok(())
    }
}

/// Writes each field as a JSON member, `,"key":value` (no comma before the first when
/// `first`).
struct Members<'a> {
    out: &'a mut String,
    first: bool,
    /// A plugin's event: its own fields come as one text field, split here.
    plugin: bool,
}

impl Members<'_> {
    fn key(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        push_str(self.out, name);
        self.out.push(':');
    }

    /// An integer, as a JSON number.
    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        self.key(field.name());
        let _ = write!(self.out, "{value}");
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.plugin && field.name() == PLUGIN_FIELDS {
            match plugin_fields(value) {
                Some(fields) => {
                    for (key, value) in fields {
                        self.key(key);
                        value.write(self.out);
                    }
                }
                // Not as plugin-api writes them: kept whole.
                None => {
                    self.key(field.name());
                    push_str(self.out, value);
                }
            }
            return;
        }
        self.key(field.name());
        push_str(self.out, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field.name());
        JsonValue::Float(value).write(self.out);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field.name());
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.key(field.name());
        push_str(self.out, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field.name());
        push_str(self.out, &format!("{value:?}"));
    }
}

/// Appends `s` as a JSON string.
fn push_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// One value of a plugin's fields.
#[derive(Debug, PartialEq)]
enum JsonValue {
    Text(String),
    Int(i128),
    Float(f64),
    Bool(bool),
}

impl JsonValue {
    fn write(&self, out: &mut String) {
        match self {
            JsonValue::Text(s) => push_str(out, s),
            JsonValue::Int(n) => {
                let _ = write!(out, "{n}");
            }
            // JSON has no NaN or infinity: those stay text.
            JsonValue::Float(f) if f.is_finite() => {
                let _ = write!(out, "{f}");
            }
            JsonValue::Float(f) => push_str(out, &f.to_string()),
            JsonValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }

    /// An unquoted value: a number or a bool when it reads as one, else text.
    fn bare(text: &str) -> Self {
        if let Ok(n) = text.parse::<i128>() {
            JsonValue::Int(n)
        } else if let Ok(b) = text.parse::<bool>() {
            JsonValue::Bool(b)
        } else if let Some(f) = text.parse::<f64>().ok().filter(|_| looks_numeric(text)) {
            JsonValue::Float(f)
        } else {
            JsonValue::Text(text.to_owned())
        }
    }
}

/// `inf`, `NaN` and the like parse as floats but are words in a log line.
fn looks_numeric(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
}

/// Splits a plugin's fields as plugin-api writes them (`key={value:?}`, joined by
/// spaces: strings quoted and escaped as Rust's `Debug` does, numbers and bools bare,
/// `%value` fields as their `Display` text) into keys and JSON values. A bare value runs
/// up to the next ` key=`. `None` if the text does not read that way.
fn plugin_fields(text: &str) -> Option<Vec<(&str, JsonValue)>> {
    let mut fields = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = &rest[..eq];
        if !is_key(key) {
            return None;
        }
        rest = &rest[eq + 1..];
        let value = if let Some(quoted) = rest.strip_prefix('"') {
            let (value, after) = debug_str(quoted)?;
            rest = after
                .strip_prefix(' ')
                .or_else(|| after.is_empty().then_some(after))?;
            JsonValue::Text(value)
        } else {
            let end = next_key(rest).unwrap_or(rest.len());
            let value = JsonValue::bare(&rest[..end]);
            rest = rest[end..].strip_prefix(' ').unwrap_or("");
            value
        };
        fields.push((key, value));
    }
    Some(fields)
}

/// A field name as tracing allows it (`a`, `a_b`, `a.b`, `r#type` aside).
fn is_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Where a bare value ends: at the space before the next `key=`.
fn next_key(text: &str) -> Option<usize> {
    text.match_indices(' ').map(|(i, _)| i).find(|&i| {
        let after = &text[i + 1..];
        after.find('=').is_some_and(|eq| is_key(&after[..eq]))
    })
}

/// Reads a string as Rust's `Debug` writes it, from just after its opening quote:
/// the text and what follows the closing quote.
fn debug_str(text: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                '0' => out.push('\0'),
                'u' => {
                    let (start, open) = chars.next()?;
                    if open != '{' {
                        return None;
                    }
                    let close = text[start..].find('}')? + start;
                    let code = u32::from_str_radix(&text[start + 1..close], 16).ok()?;
                    out.push(char::from_u32(code)?);
                    while chars.next()?.0 < close {}
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<&[(&str, JsonValue)]>) {
        let got = plugin_fields(text);
        assert_eq!(got.as_deref(), expected, "{text:?}");
    }

    fn t(s: &str) -> JsonValue {
        JsonValue::Text(s.to_owned())
    }

    #[test]
    fn plugin_fields_split_into_json_values() {
        check("", Some(&[]));
        check(
            "server=\"hello\" greeting=Hello",
            Some(&[("server", t("hello")), ("greeting", t("Hello"))]),
        );
        check(
            "count=3 ratio=0.5 ok=true name=\"a \\\"b\\\" c=d\"",
            Some(&[
                ("count", JsonValue::Int(3)),
                ("ratio", JsonValue::Float(0.5)),
                ("ok", JsonValue::Bool(true)),
                ("name", t("a \"b\" c=d")),
            ]),
        );
        // A Display value with spaces runs up to the next `key=`.
        check(
            "greeting=Hello there, world n=-2",
            Some(&[
                ("greeting", t("Hello there, world")),
                ("n", JsonValue::Int(-2)),
            ]),
        );
        check(
            "s=\"tab\\there\\nline \\u{1b} \\\\\" inf=inf",
            Some(&[("s", t("tab\there\nline \u{1b} \\")), ("inf", t("inf"))]),
        );
        check("a.b=1", Some(&[("a.b", JsonValue::Int(1))]));
        // Not plugin-api's shape: kept whole by the caller.
        check("no equals sign", None);
        check("s=\"unterminated", None);
        check("1x=2", None);
    }
}

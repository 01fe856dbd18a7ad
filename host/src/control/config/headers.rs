//! What a server adds to its responses: `servers[].headers` (security headers),
//! `servers[].cors` and `servers[].compression`, and their validation.

use hyper::header::{HeaderName, HeaderValue};
use hyper::Method;
use serde_json::{Map, Value};

use super::{join, kind, Validator};
use crate::routing::domain::DomainPattern;

/// `Strict-Transport-Security: max-age` when `hsts` is on without one: a year, as
/// helmet sends.
pub const DEFAULT_HSTS_MAX_AGE_S: u64 = 31_536_000;

/// The content types compressed when `compression.types` is not given. `text/*` does
/// not cover `text/event-stream`: server-sent events are compressed only when that type
/// is listed by name.
pub const DEFAULT_COMPRESSED_TYPES: &[&str] = &[
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/wasm",
    "application/manifest+json",
    "application/ld+json",
    "application/problem+json",
    "application/rss+xml",
    "application/atom+xml",
    "image/svg+xml",
];

/// Responses smaller than this are not compressed unless `compression.min_bytes` says
/// otherwise.
pub const DEFAULT_COMPRESSION_MIN_BYTES: u64 = 1024;

/// What a server adds to its responses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseRules {
    /// `servers[].headers`.
    pub security: SecurityHeaders,
    /// `servers[].cors`; `None`: the host adds no CORS headers and answers no
    /// preflights (the plugin may).
    pub cors: Option<CorsRules>,
    /// `servers[].compression`; `None` (the default): nothing is compressed.
    pub compression: Option<CompressionRules>,
}

/// `servers[].headers`: each is added to a response that does not have it already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityHeaders {
    /// `X-Content-Type-Options: nosniff`.
    pub content_type_options: bool,
    /// `Referrer-Policy`.
    pub referrer_policy: Option<String>,
    /// `X-Frame-Options`: `DENY` or `SAMEORIGIN`.
    pub frame_options: Option<String>,
    /// `Strict-Transport-Security`, on TLS connections only.
    pub hsts: Option<Hsts>,
    /// `Content-Security-Policy`.
    pub content_security_policy: Option<String>,
}

impl Default for SecurityHeaders {
    fn default() -> Self {
        SecurityHeaders {
            content_type_options: true,
            referrer_policy: Some("strict-origin-when-cross-origin".to_owned()),
            frame_options: Some("SAMEORIGIN".to_owned()),
            hsts: Some(Hsts::default()),
            content_security_policy: None,
        }
    }
}

impl SecurityHeaders {
    /// `"headers": false`: none of them.
    pub fn none() -> Self {
        SecurityHeaders {
            content_type_options: false,
            referrer_policy: None,
            frame_options: None,
            hsts: None,
            content_security_policy: None,
        }
    }
}

/// `servers[].headers.hsts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    pub max_age_s: u64,
    pub include_subdomains: bool,
    pub preload: bool,
}

impl Default for Hsts {
    fn default() -> Self {
        Hsts {
            max_age_s: DEFAULT_HSTS_MAX_AGE_S,
            include_subdomains: false,
            preload: false,
        }
    }
}

impl Hsts {
    /// The header's value.
    pub fn value(&self) -> String {
        let mut value = format!("max-age={}", self.max_age_s);
        if self.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if self.preload {
            value.push_str("; preload");
        }
        value
    }
}

/// `servers[].cors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsRules {
    pub origins: Origins,
    /// `Any`: the method a preflight asks for is allowed (it is sent back).
    pub methods: Listed,
    /// `Any`: the headers a preflight asks for are allowed (they are sent back).
    pub headers: Listed,
    pub credentials: bool,
    /// `Access-Control-Max-Age`; `None`: not sent (browsers then cache a preflight for
    /// a few seconds only).
    pub max_age_s: Option<u64>,
    /// `Access-Control-Expose-Headers`; `Any` sends `*`.
    pub expose_headers: Listed,
}

/// `servers[].cors.origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// `"*"`.
    Any,
    /// Each an origin (`https://app.example`, lower case) or a pattern for its
    /// subdomains (`https://*.example.com`).
    List(Vec<OriginPattern>),
}

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `scheme://host[:port]`, lower case.
    Exact(String),
    /// `scheme://*.suffix[:port]`: `prefix` is `scheme://`, `suffix` is `.suffix[:port]`
    /// (lower case); any name of one or more labels may stand for the `*`.
    Subdomains { prefix: String, suffix: String },
}

impl OriginPattern {
    /// Whether a request's `Origin` is this one (ASCII case aside).
    pub fn matches(&self, origin: &[u8]) -> bool {
        match self {
            OriginPattern::Exact(exact) => origin.eq_ignore_ascii_case(exact.as_bytes()),
            OriginPattern::Subdomains { prefix, suffix } => {
                let (prefix, suffix) = (prefix.as_bytes(), suffix.as_bytes());
                if origin.len() <= prefix.len() + suffix.len()
                    || !origin[..prefix.len()].eq_ignore_ascii_case(prefix)
                    || !origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                {
                    return false;
                }
                // One or more labels stand for the `*`.
                let below = &origin[prefix.len()..origin.len() - suffix.len()];
                below.split(|b| *b == b'.').all(|label| {
                    !label.is_empty()
                        && label
                            .iter()
                            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
                })
            }
        }
    }
}

/// A list from the config, or `"*"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    Any,
    List(Vec<String>),
}

/// `servers[].compression`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionRules {
    pub gzip: bool,
    pub br: bool,
    pub zstd: bool,
    /// Responses of a known length below this are sent as they are.
    pub min_bytes: u64,
    /// Content types (`type/subtype`, or `type/*`), lower case.
    pub types: Vec<String>,
}

impl Default for CompressionRules {
    fn default() -> Self {
        CompressionRules {
            gzip: true,
            br: true,
            zstd: true,
            min_bytes: DEFAULT_COMPRESSION_MIN_BYTES,
            types: DEFAULT_COMPRESSED_TYPES
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
        }
    }
}

/// The tokens `Referrer-Policy` may hold (W3C Referrer Policy).
const REFERRER_POLICIES: &[&str] = &[
    "no-referrer",
    "no-referrer-when-downgrade",
    "origin",
    "origin-when-cross-origin",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
    "unsafe-url",
];

impl Validator {
    /// A server's `headers`, `cors` and `compression`.
    pub(super) fn response_rules(&mut self, map: &Map<String, Value>, path: &str) -> ResponseRules {
        let security = match map.get("headers") {
            None | Some(Value::Bool(true)) => SecurityHeaders::default(),
            Some(Value::Bool(false)) => SecurityHeaders::none(),
            Some(v) => self.security_headers(v, &join(path, "headers")),
        };
        let cors = match map.get("cors") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(v) => self.cors(v, &join(path, "cors")),
        };
        let compression = match map.get("compression") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(CompressionRules::default()),
            Some(v) => self.compression(v, &join(path, "compression")),
        };
        ResponseRules {
            security,
            cors,
            compression,
        }
    }

    fn security_headers(&mut self, value: &Value, path: &str) -> SecurityHeaders {
        let allowed = [
            "content_type_options",
            "referrer_policy",
            "frame_options",
            "hsts",
            "content_security_policy",
        ];
        let mut out = SecurityHeaders::default();
        let Some(map) = self.object(value, path, &allowed) else {
            return out;
        };
        if let Some(v) = map.get("content_type_options") {
            match v {
                Value::Bool(b) => out.content_type_options = *b,
                other => self.problem(
                    &join(path, "content_type_options"),
                    format!("expected true (nosniff) or false, found {}", kind(other)),
                ),
            }
        }
        if let Some(v) = map.get("referrer_policy") {
            let p = join(path, "referrer_policy");
            out.referrer_policy = self.off_or_string(v, &p).and_then(|policy| {
                let policy = policy.to_ascii_lowercase();
                let unknown: Vec<&str> = policy
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !REFERRER_POLICIES.contains(t))
                    .collect();
                if unknown.is_empty() {
                    Some(policy)
                } else {
                    let message = format!(
                        "unknown policy {:?}; expected one of: {} (or false)",
                        unknown.join(", "),
                        REFERRER_POLICIES.join(", ")
                    );
                    self.problem(&p, message);
                    None
                }
            });
        }
        if let Some(v) = map.get("frame_options") {
            let p = join(path, "frame_options");
            out.frame_options = self.off_or_string(v, &p).and_then(|option| {
                let option = option.to_ascii_uppercase();
                if option == "DENY" || option == "SAMEORIGIN" {
                    Some(option)
                } else {
                    let message = format!(
                        "{option:?} is not a frame option; expected \"DENY\", \"SAMEORIGIN\" or false (ALLOW-FROM is obsolete: use frame-ancestors in content_security_policy)"
                    );
                    self.problem(&p, message);
                    None
                }
            });
        }
        if let Some(v) = map.get("hsts") {
            out.hsts = self.hsts(v, &join(path, "hsts"));
        }
        if let Some(v) = map.get("content_security_policy") {
            let p = join(path, "content_security_policy");
            out.content_security_policy = match v {
                Value::Null => None,
                v => self
                    .off_or_string(v, &p)
                    .filter(|policy| self.header_value(policy, &p)),
            };
        }
        out
    }

    fn hsts(&mut self, value: &Value, path: &str) -> Option<Hsts> {
        let map = match value {
            Value::Bool(false) => return None,
            Value::Bool(true) => return Some(Hsts::default()),
            other => self.object(other, path, &["max_age_s", "include_subdomains", "preload"])?,
        };
        let mut out = Hsts::default();
        if let Some(v) = map.get("max_age_s") {
            out.max_age_s = self
                .whole_number(v, &join(path, "max_age_s"), 0)
                .unwrap_or(out.max_age_s);
        }
        out.include_subdomains = self.flag(map, path, "include_subdomains", false);
        out.preload = self.flag(map, path, "preload", false);
        // The preload list takes only sites that ask for a year or more, subdomains
        // included (hstspreload.org's rules).
        if out.preload && (!out.include_subdomains || out.max_age_s < DEFAULT_HSTS_MAX_AGE_S) {
            self.problem(
                &join(path, "preload"),
                "preload needs include_subdomains: true and max_age_s of at least 31536000",
            );
        }
        Some(out)
    }

    fn cors(&mut self, value: &Value, path: &str) -> Option<CorsRules> {
        let allowed = [
            "origins",
            "methods",
            "headers",
            "credentials",
            "max_age_s",
            "expose_headers",
        ];
        let map = match value {
            Value::Bool(true) => {
                self.problem(
                    path,
                    "expected an object with at least `origins` (for example {\"origins\": [\"https://app.example\"]})",
                );
                return None;
            }
            other => self.object(other, path, &allowed)?,
        };
        let before = self.problems.len();
        let origins = match map.get("origins") {
            None => {
                self.problem(
                    path,
                    "missing key `origins` (\"*\", or a list such as [\"https://app.example\"])",
                );
                None
            }
            Some(Value::String(s)) if s == "*" => Some(Origins::Any),
            Some(Value::Array(items)) => {
                let mut list = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}.origins[{i}]");
                    if let Some(origin) = self.string(item, &p) {
                        match origin_pattern(&origin) {
                            Ok(pattern) => list.push(pattern),
                            Err(why) => self.problem(&p, why),
                        }
                    }
                }
                if items.is_empty() {
                    self.problem(&join(path, "origins"), "must list at least one origin");
                }
                Some(Origins::List(list))
            }
            Some(other) => {
                self.problem(
                    &join(path, "origins"),
                    format!(
                        "expected \"*\" or an array of origins, found {}",
                        kind(other)
                    ),
                );
                None
            }
        };
        let methods = match map.get("methods") {
            None => Listed::List(
                ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"]
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect(),
            ),
            Some(v) => self.listed(v, &join(path, "methods"), |name| {
                Method::from_bytes(name.as_bytes())
                    .map(|_| name.to_owned())
                    .map_err(|_| format!("{name:?} is not a method name"))
            }),
        };
        let headers = match map.get("headers") {
            None => Listed::Any,
            Some(v) => self.listed(v, &join(path, "headers"), header_name),
        };
        let expose_headers = match map.get("expose_headers") {
            None => Listed::List(Vec::new()),
            Some(v) => self.listed(v, &join(path, "expose_headers"), header_name),
        };
        let credentials = self.flag(map, path, "credentials", false);
        let max_age_s = match map.get("max_age_s") {
            None | Some(Value::Null) => None,
            Some(v) => self.whole_number(v, &join(path, "max_age_s"), 0),
        };
        // The Fetch standard: a response to a request with credentials may not answer
        // `*` for its origin (and a `*` in Expose-Headers counts as a name there, so it
        // would expose nothing).
        if credentials {
            if origins == Some(Origins::Any) {
                self.problem(
                    &join(path, "credentials"),
                    "cannot be true with \"origins\": \"*\" (browsers refuse credentials for any origin): list the origins",
                );
            }
            if expose_headers == Listed::Any {
                self.problem(
                    &join(path, "expose_headers"),
                    "cannot be \"*\" with credentials: true (browsers read it as a header named `*`): list the headers",
                );
            }
        }
        if self.problems.len() > before {
            return None;
        }
        Some(CorsRules {
            origins: origins?,
            methods,
            headers,
            credentials,
            max_age_s,
            expose_headers,
        })
    }

    fn compression(&mut self, value: &Value, path: &str) -> Option<CompressionRules> {
        let map = self.object(value, path, &["encodings", "min_bytes", "types"])?;
        let before = self.problems.len();
        let mut out = CompressionRules::default();
        match map.get("encodings") {
            None => {}
            Some(Value::Array(items)) if !items.is_empty() => {
                out.gzip = false;
                out.br = false;
                out.zstd = false;
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}.encodings[{i}]");
                    match self.string(item, &p).as_deref() {
                        Some("gzip") => out.gzip = true,
                        Some("br") => out.br = true,
                        Some("zstd") => out.zstd = true,
                        Some(other) => self.problem(
                            &p,
                            format!(
                                "unknown encoding {other:?}; expected \"gzip\", \"br\" or \"zstd\""
                            ),
                        ),
                        None => {}
                    }
                }
            }
            Some(other) => self.problem(
                &join(path, "encodings"),
                format!(
                    "expected a non-empty array of \"gzip\", \"br\" and \"zstd\", found {}",
                    kind(other)
                ),
            ),
        }
        if let Some(v) = map.get("min_bytes") {
            out.min_bytes = self
                .whole_number(v, &join(path, "min_bytes"), 0)
                .unwrap_or(out.min_bytes);
        }
        match map.get("types") {
            None => {}
            Some(Value::Array(items)) => {
                out.types.clear();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}.types[{i}]");
                    if let Some(t) = self.string(item, &p) {
                        let t = t.trim().to_ascii_lowercase();
                        match t.split_once('/') {
                            Some((ty, sub))
                                if is_token(ty) && (sub == "*" || is_token(sub)) && ty != "*" =>
                            {
                                out.types.push(t)
                            }
                            _ => self.problem(
                                &p,
                                format!("{t:?} is not a content type (`type/subtype` or `type/*`)"),
                            ),
                        }
                    }
                }
            }
            Some(other) => self.problem(
                &join(path, "types"),
                format!("expected an array of content types, found {}", kind(other)),
            ),
        }
        (self.problems.len() == before).then_some(out)
    }

    /// `false` (or `null`): `None`; else a string.
    fn off_or_string(&mut self, value: &Value, path: &str) -> Option<String> {
        match value {
            Value::Bool(false) | Value::Null => None,
            Value::String(_) => self.string(value, path),
            other => {
                self.problem(
                    path,
                    format!("expected a string or false, found {}", kind(other)),
                );
                None
            }
        }
    }

    /// True if `value` may be sent as a header's value (visible ASCII and spaces).
    fn header_value(&mut self, value: &str, path: &str) -> bool {
        let ok = value
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
        if !ok {
            self.problem(
                path,
                "may only hold visible ASCII characters and spaces (it is sent as a header)",
            );
        }
        ok
    }

    /// A boolean at `key`, `default` if it is missing.
    fn flag(&mut self, map: &Map<String, Value>, path: &str, key: &str, default: bool) -> bool {
        match map.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.problem(
                    &join(path, key),
                    format!("expected true or false, found {}", kind(other)),
                );
                default
            }
        }
    }

    /// `"*"` or an array of names, each checked by `check`.
    fn listed(
        &mut self,
        value: &Value,
        path: &str,
        check: impl Fn(&str) -> Result<String, String>,
    ) -> Listed {
        match value {
            Value::String(s) if s == "*" => Listed::Any,
            Value::Array(items) => {
                let mut list = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    if let Some(name) = self.string(item, &p) {
                        match check(name.trim()) {
                            Ok(name) => list.push(name),
                            Err(why) => self.problem(&p, why),
                        }
                    }
                }
                Listed::List(list)
            }
            other => {
                self.problem(
                    path,
                    format!("expected \"*\" or an array of names, found {}", kind(other)),
                );
                Listed::List(Vec::new())
            }
        }
    }
}

fn header_name(name: &str) -> Result<String, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_owned())
        .map_err(|_| format!("{name:?} is not a header name"))
}

/// An RFC 9110 token (the characters of a method, a header name, a media type part).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One entry of `cors.origins`: `scheme://host[:port]` as browsers send it in
/// `Origin`, or `scheme://*.host[:port]` for every name below `host`.
fn origin_pattern(raw: &str) -> Result<OriginPattern, String> {
    let origin = raw.trim().to_ascii_lowercase();
    let problem = |why: &str| {
        format!("{raw:?} is not an origin ({why}); expected scheme://host[:port], such as \"https://app.example\" or \"https://*.example.com\"")
    };
    if origin == "null" {
        return Err(format!(
            "{raw:?}: the `null` origin is sent by sandboxed pages and local files, and any page can make one: it cannot be allowed"
        ));
    }
    if origin == "*" {
        return Err(format!("{raw:?}: write \"origins\": \"*\" (not in a list)"));
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Err(problem("no scheme"));
    };
    if !is_token(scheme) || !scheme.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(problem("a bad scheme"));
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(problem("an origin has no path"));
    }
    let (host, port) = if rest.starts_with('[') {
        let Some(end) = rest.find(']') else {
            return Err(problem("an unclosed `[`"));
        };
        let (host, after) = rest.split_at(end + 1);
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(problem("a bad port")),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty()
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err()
        {
            return Err(problem("a bad port"));
        }
    }
    // Browsers leave the scheme's own port out of `Origin`.
    let port = port.filter(|p| !matches!((scheme, *p), ("https", "443") | ("http", "80")));
    let port = port.map_or_else(String::new, |p| format!(":{p}"));
    if host.is_empty() {
        return Err(problem("no host"));
    }
    if let Some(below) = host.strip_prefix("*.") {
        if below.contains('*') {
            return Err(problem("`*` only as the first label"));
        }
        return match DomainPattern::parse(below) {
            Ok(_) => Ok(OriginPattern::Subdomains {
                prefix: format!("{scheme}://"),
                suffix: format!(".{below}{port}"),
            }),
            Err(why) => Err(problem(&why.0)),
        };
    }
    if host.contains('*') {
        return Err(problem("`*` only as the first label"));
    }
    match DomainPattern::parse(host) {
        Ok(_) => Ok(OriginPattern::Exact(format!("{scheme}://{host}{port}"))),
        Err(why) => Err(problem(&why.0)),
    }
}

/// The value of a header made from a list of names (`GET, POST`).
pub fn joined(list: &[String]) -> Option<HeaderValue> {
    if list.is_empty() {
        return None;
    }
    HeaderValue::from_str(&list.join(", ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_and_lower_cased() {
        let exact = |o: &str| Ok(OriginPattern::Exact(o.into()));
        for (raw, expected) in [
            ("https://App.Example", exact("https://app.example")),
            ("http://localhost:3000", exact("http://localhost:3000")),
            ("https://app.example:443", exact("https://app.example")),
            ("http://[::1]:8080", exact("http://[::1]:8080")),
            (
                "https://*.example.com:8443",
                Ok(OriginPattern::Subdomains {
                    prefix: "https://".into(),
                    suffix: ".example.com:8443".into(),
                }),
            ),
        ] {
            assert_eq!(origin_pattern(raw), expected, "{raw}");
        }
        for bad in [
            "app.example",
            "https://app.example/",
            "https://app.example/path",
            "https://app.example:99999",
            "https://a.*.example",
            "null",
            "*",
            "https://",
            "https://[::1",
        ] {
            assert!(origin_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hsts_values() {
        assert_eq!(Hsts::default().value(), "max-age=31536000");
        let all = Hsts {
            max_age_s: 63072000,
            include_subdomains: true,
            preload: true,
        };
        assert_eq!(all.value(), "max-age=63072000; includeSubDomains; preload");
    }
}

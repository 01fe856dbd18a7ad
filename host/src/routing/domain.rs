//! Domains: normalising what clients send, and the table that maps a domain to a server.
//!
//! Lookup cost depends on the number of labels in the requested name, never on how many
//! domains are configured: one hash lookup for the exact name, then one per parent
//! suffix for wildcards, most specific first.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A domain from the config: an exact name (`api.example.com`), a wildcard
/// (`*.example.com`, matching any name below `example.com` but not `example.com`
/// itself), or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(String),
    Wildcard(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidDomain(pub String);

impl DomainPattern {
    pub fn parse(raw: &str) -> Result<Self, InvalidDomain> {
        let lower = raw.trim().to_ascii_lowercase();
        if let Some(suffix) = lower.strip_prefix("*.") {
            let suffix = suffix.strip_suffix('.').unwrap_or(suffix);
            check_hostname(suffix)?;
            return Ok(DomainPattern::Wildcard(suffix.to_owned()));
        }
        if lower.contains('*') {
            return Err(InvalidDomain(
                "`*` is only allowed as the whole first label, as in `*.example.com`".into(),
            ));
        }
        let inner = lower
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(&lower);
        if let Ok(ip) = inner.parse::<Ipv6Addr>() {
            return Ok(DomainPattern::Exact(ip.to_string()));
        }
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        check_hostname(name)?;
        Ok(DomainPattern::Exact(name.to_owned()))
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Wildcard(d) => write!(f, "*.{d}"),
        }
    }
}

fn check_hostname(name: &str) -> Result<(), InvalidDomain> {
    if name.is_empty() {
        return Err(InvalidDomain("it is empty".into()));
    }
    if name.len() > 253 {
        return Err(InvalidDomain("it is longer than 253 characters".into()));
    }
    if name.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(InvalidDomain("it has an empty label".into()));
        }
        if label.len() > 63 {
            return Err(InvalidDomain(format!(
                "label {label:?} is longer than 63 characters"
            )));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(InvalidDomain(format!(
                "label {label:?} may only contain letters, digits and `-`"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(InvalidDomain(format!(
                "label {label:?} starts or ends with `-`"
            )));
        }
    }
    Ok(())
}

/// Turns a `Host` header or `:authority` into the name used for lookup: lower case,
/// without port or trailing dot; an IPv6 literal loses its brackets. `None` if it is
/// not a plausible host name.
pub fn normalize_host(raw: &str) -> Option<Cow<'_, str>> {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        let ip: Ipv6Addr = ip.parse().ok()?;
        return Some(Cow::Owned(ip.to_string()));
    } else {
        raw
    };
    // One pass over the bytes: find the port separator, check every byte, note upper
    // case. A table lookup per byte rather than a chain of range tests: this runs on
    // every request.
    // Labels are checked as the config's are: none empty, none over 63 bytes.
    let bytes = host.as_bytes();
    let mut end = bytes.len();
    let mut upper = false;
    let mut label = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'.' {
            if label == 0 {
                return None;
            }
            label = 0;
            continue;
        }
        match HOST_BYTE[b as usize] {
            LOWER => {}
            UPPER => upper = true,
            COLON => {
                if !is_port(&host[i + 1..]) {
                    return None;
                }
                end = i;
                break;
            }
            _ => return None,
        }
        label += 1;
        if label > MAX_LABEL {
            return None;
        }
    }
    let host = &host[..end];
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_NAME || host.ends_with('.') {
        return None;
    }
    if upper {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

const INVALID: u8 = 0;
const LOWER: u8 = 1;
const UPPER: u8 = 2;
const COLON: u8 = 3;

/// The class of each byte in a host name: lower case letters, digits, `-`, `.` and `_`
/// pass as they are; upper case letters need lowering; `:` starts the port.
static HOST_BYTE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = match c {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => LOWER,
            b'A'..=b'Z' => UPPER,
            b':' => COLON,
            _ => INVALID,
        };
        b += 1;
    }
    table
};

fn is_port(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && s.parse::<u16>().is_ok_and(|p| p != 0)
}

/// Longest label, and longest name, of a domain (RFC 1035).
const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 253;

/// Maps domains to values (servers). Built once per configuration and then only read.
#[derive(Debug)]
pub struct DomainTable<T> {
    exact: Map<T>,
    wildcard: Map<T>,
    default: Option<T>,
}

/// FxHash rather than SipHash: the table is built from the config and never grows at
/// request time, so a client choosing colliding names can slow only its own lookup by a
/// probe or two, and FxHash is several times cheaper for short names. Keyed by bytes, so
/// that a raw `Host` can be looked up before it is checked to be text.
type Map<T> = HashMap<Box<[u8]>, T, rustc_hash::FxBuildHasher>;

impl<T> Default for DomainTable<T> {
    fn default() -> Self {
        DomainTable {
            exact: Map::default(),
            wildcard: Map::default(),
            default: None,
        }
    }
}

impl<T: Clone> DomainTable<T> {
    /// Adds a domain; returns false if it was already present (the first one stays).
    pub fn insert(&mut self, pattern: &DomainPattern, value: T) -> bool {
        let (map, key) = match pattern {
            DomainPattern::Exact(d) => (&mut self.exact, d),
            DomainPattern::Wildcard(d) => (&mut self.wildcard, d),
        };
        if map.contains_key(key.as_bytes()) {
            return false;
        }
        map.insert(key.as_bytes().into(), value);
        true
    }

    pub fn set_default(&mut self, value: Option<T>) {
        self.default = value;
    }

    /// Finds the value for a normalised host: exact name first, then the most specific
    /// wildcard, then the default.
    pub fn lookup(&self, host: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(host.as_bytes()) {
            return Some(v);
        }
        if !self.wildcard.is_empty() {
            let mut rest = host;
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(v) = self.wildcard.get(parent.as_bytes()) {
                    return Some(v);
                }
                rest = parent;
            }
        }
        self.default.as_ref()
    }

    /// The value for exactly this name, if it is configured. A configured name is
    /// already normalised, so a raw `Host` that matches one needs no normalising (and is
    /// text: every configured name is).
    pub fn lookup_exact(&self, host: &[u8]) -> Option<&T> {
        self.exact.get(host)
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_hosts() {
        let cases = [
            ("Hello.Localhost:7777", Some("hello.localhost")),
            ("hello.localhost.", Some("hello.localhost")),
            ("example.com.:80", Some("example.com")),
            ("[::1]:7777", Some("::1")),
            ("[0:0::1]", Some("::1")),
            ("127.0.0.1:8080", Some("127.0.0.1")),
            ("", None),
            ("a b", None),
            ("host:port", None),
            ("[::1", None),
            // Names the config would refuse are refused here too.
            ("..hello.localhost", None),
            (".hello.localhost", None),
            ("a..b", None),
            ("hello.localhost..", None),
            ("hello.localhost:99999", None),
            ("hello.localhost:0", None),
            ("hello.localhost:65535", Some("hello.localhost")),
        ];
        let long_label = format!("{}.hello.localhost", "a".repeat(64));
        assert_eq!(normalize_host(&long_label), None);
        let ok_label = format!("{}.hello.localhost", "a".repeat(63));
        assert!(normalize_host(&ok_label).is_some());
        let long_name = format!("{}hello.localhost", "abcdefghi.".repeat(25));
        assert_eq!(normalize_host(&long_name), None);
        for (raw, want) in cases {
            assert_eq!(normalize_host(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn exact_beats_wildcard_and_most_specific_wildcard_wins() {
        let mut t = DomainTable::default();
        for (d, v) in [
            ("*.example.com", 1),
            ("*.api.example.com", 2),
            ("www.example.com", 3),
            ("[::1]", 4),
        ] {
            assert!(t.insert(&DomainPattern::parse(d).unwrap(), v));
        }
        t.set_default(Some(0));
        let cases = [
            ("www.example.com", 3),
            ("a.example.com", 1),
            ("a.b.example.com", 1),
            ("v1.api.example.com", 2),
            ("example.com", 0),
            ("::1", 4),
            ("other.org", 0),
        ];
        for (host, want) in cases {
            assert_eq!(t.lookup(host), Some(&want), "{host}");
        }
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "",
            "a..b",
            "-a.com",
            "a_b.com",
            "*",
            "a.*.com",
            "x*.com",
            &"a".repeat(64),
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}

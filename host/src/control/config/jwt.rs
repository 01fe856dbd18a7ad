//! `servers[].jwt`: which requests of a server need a verified JSON Web Token, with
//! which keys and checks, and their validation. Keys are checked here, when the config
//! is loaded (and by `--check`): a secret too short or a public key that is not an RSA
//! key of at least 2048 bits is a problem naming its path.

use std::fmt;

use serde_json::{Map, Value};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::{PublicKey, RSAPublicKey};
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{join, kind, Validator};

/// How far token times (`exp`, `nbf`) may be off when `leeway_s` is not given.
pub const DEFAULT_LEEWAY_S: u64 = 60;

/// The shortest HS256 secret accepted: the size of the hash (RFC 7518, 3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// The smallest RSA modulus accepted (ring verifies 2048 to 8192 bits).
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

/// `servers[].jwt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRules {
    /// At least one.
    pub keys: Vec<JwtKey>,
    /// `iss` must be one of these (and present), if any are given.
    pub issuers: Vec<String>,
    /// `aud` must name one of these (and be present), if any are given.
    pub audiences: Vec<String>,
    pub leeway_s: u64,
    /// Path prefixes whose requests need a token (`/` by default: all).
    pub paths: Vec<String>,
    /// Path prefixes under those that do not.
    pub except: Vec<String>,
}

/// One key a token may be signed with.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// Matched against a token's `kid` when both have one.
    pub kid: Option<String>,
    pub material: KeyMaterial,
}

#[derive(Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// HS256: the shared secret.
    Hs256(Vec<u8>),
    /// RS256: the public key's modulus and exponent, big-endian, without leading zeros.
    Rs256 { modulus: Vec<u8>, exponent: Vec<u8> },
}

// Never prints a secret.
impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alg = match &self.material {
            KeyMaterial::Hs256(_) => "HS256",
            KeyMaterial::Rs256 { .. } => "RS256",
        };
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("alg", &alg)
            .finish_non_exhaustive()
    }
}

/// A path prefix matches itself and what is below it: `/api` covers `/api` and
/// `/api/x`, not `/apiary`; `/` covers everything.
pub fn covers(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Validator {
    pub(super) fn jwt(&mut self, value: &Value, path: &str) -> Option<JwtRules> {
        let allowed = ["keys", "issuer", "audience", "leeway_s", "paths", "except"];
        let map = self.object(value, path, &allowed)?;
        let before = self.problems.len();
        let mut keys = Vec::new();
        match map.get("keys") {
            Some(Value::Array(items)) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(key) = self.jwt_key(item, &format!("{path}.keys[{i}]")) {
                        keys.push(key);
                    }
                }
            }
            Some(other) => self.problem(
                &join(path, "keys"),
                format!("expected a non-empty array of keys, found {other}"),
            ),
            None => self.problem(
                path,
                "missing key `keys` (HS256 secrets or RS256 public keys tokens are signed with)",
            ),
        }
        let issuers = self.one_or_many(map, path, "issuer");
        let audiences = self.one_or_many(map, path, "audience");
        let leeway_s = match map.get("leeway_s") {
            None => DEFAULT_LEEWAY_S,
            Some(v) => self
                .whole_number(v, &join(path, "leeway_s"), 0)
                .unwrap_or(0),
        };
        let paths = match map.get("paths") {
            None => vec!["/".to_owned()],
            Some(v) => self.path_prefixes(v, &join(path, "paths")),
        };
        let except = match map.get("except") {
            None => Vec::new(),
            Some(v) => self.path_prefixes(v, &join(path, "except")),
        };
        if self.problems.len() > before {
            return None;
        }
        Some(JwtRules {
            keys,
            issuers,
            audiences,
            leeway_s,
            paths,
            except,
        })
    }

    fn jwt_key(&mut self, value: &Value, path: &str) -> Option<JwtKey> {
        let allowed = ["alg", "kid", "secret", "public_key", "public_key_file"];
        let map = self.object(value, path, &allowed)?;
        let kid = match map.get("kid") {
            None => None,
            Some(v) => Some(self.string(v, &join(path, "kid"))?),
        };
        let alg = self.required_string(map, path, "alg", " (\"HS256\" or \"RS256\")")?;
        let has = |k: &str| map.contains_key(k);
        let material = match alg.as_str() {
            "HS256" => {
                if has("public_key") || has("public_key_file") {
                    self.problem(path, "an HS256 key has a `secret`, not a public key");
                    return None;
                }
                let secret = self.required_string(
                    map,
                    path,
                    "secret",
                    " (write \"${NAME}\" to read it from the environment)",
                )?;
                if secret.len() < MIN_SECRET_BYTES {
                    self.problem(
                        &join(path, "secret"),
                        format!(
                            "an HS256 secret needs at least {MIN_SECRET_BYTES} bytes, found {}",
                            secret.len()
                        ),
                    );
                    return None;
                }
                KeyMaterial::Hs256(secret.into_bytes())
            }
            "RS256" => {
                if has("secret") {
                    self.problem(
                        path,
                        "an RS256 key has a `public_key` or `public_key_file`, not a `secret`",
                    );
                    return None;
                }
                let (pem, at) = match (map.get("public_key"), map.get("public_key_file")) {
                    (Some(v), None) => {
                        let at = join(path, "public_key");
                        (self.string(v, &at)?, at)
                    }
                    (None, Some(v)) => {
                        let at = join(path, "public_key_file");
                        let name = self.string(v, &at)?;
                        let file = self.folder.join(name);
                        match std::fs::read_to_string(&file) {
                            Ok(text) => (text, at),
                            Err(e) => {
                                self.problem(&at, format!("cannot read {}: {e}", file.display()));
                                return None;
                            }
                        }
                    }
                    _ => {
                        self.problem(path, "an RS256 key needs one of `public_key` (PEM text) or `public_key_file`");
                        return None;
                    }
                };
                match rsa_public_key(&pem) {
                    Ok((modulus, exponent)) => KeyMaterial::Rs256 { modulus, exponent },
                    Err(why) => {
                        self.problem(&at, why);
                        return None;
                    }
                }
            }
            other => {
                self.problem(
                    &join(path, "alg"),
                    format!("{other:?} is not supported; expected \"HS256\" or \"RS256\""),
                );
                return None;
            }
        };
        Some(JwtKey { kid, material })
    }

    /// A string or a non-empty list of them at `key` (none when absent).
    fn one_or_many(&mut self, map: &Map<String, Value>, path: &str, key: &str) -> Vec<String> {
        let at = join(path, key);
        match map.get(key) {
            None => Vec::new(),
            Some(Value::String(_)) => self.string(&map[key], &at).into_iter().collect(),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| self.string(item, &format!("{at}[{i}]")))
                .collect(),
            Some(other) => {
                self.problem(
                    &at,
                    format!(
                        "expected a string or a non-empty array of strings, found {}",
                        kind(other)
                    ),
                );
                Vec::new()
            }
        }
    }

    /// A list of path prefixes, each starting with `/` (a trailing `/` is dropped).
    pub(super) fn path_prefixes(&mut self, value: &Value, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        let Value::Array(items) = value else {
            self.problem(
                path,
                format!("expected an array of path prefixes, found {}", kind(value)),
            );
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            match self.string(item, &p) {
                Some(prefix) if prefix.starts_with('/') => {
                    // `/api/` and `/api` mean the same.
                    let trimmed = prefix.trim_end_matches('/');
                    out.push(if trimmed.is_empty() { "/" } else { trimmed }.to_owned());
                }
                Some(prefix) => self.problem(&p, format!("{prefix:?} must start with `/`")),
                None => {}
            }
        }
        out
    }
}

/// The modulus and exponent of an RSA public key in PEM (`PUBLIC KEY`, as `openssl rsa
/// -pubout` writes it, or `RSA PUBLIC KEY`), or why it is not one that can be used.
fn rsa_public_key(pem: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| "not a PEM public key (-----BEGIN PUBLIC KEY-----)".to_owned())?;
    let rsa = match pem.label.as_str() {
        "PUBLIC KEY" => {
            let (_, spki) = SubjectPublicKeyInfo::from_der(&pem.contents)
                .map_err(|e| format!("the PUBLIC KEY cannot be read: {e}"))?;
            match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => (rsa.modulus.to_vec(), rsa.exponent.to_vec()),
                Ok(_) => return Err("not an RSA public key (RS256 needs one)".to_owned()),
                Err(e) => return Err(format!("the PUBLIC KEY cannot be read: {e}")),
            }
        }
        "RSA PUBLIC KEY" => {
            let (_, rsa) = RSAPublicKey::from_der(&pem.contents)
                .map_err(|e| format!("the RSA PUBLIC KEY cannot be read: {e}"))?;
            (rsa.modulus.to_vec(), rsa.exponent.to_vec())
        }
        other => {
            return Err(format!(
                "a PEM {other:?} is not a public key; expected PUBLIC KEY (openssl rsa -pubout)"
            ))
        }
    };
    let strip = |mut v: Vec<u8>| {
        let zeros = v.iter().take_while(|b| **b == 0).count();
        v.drain(..zeros);
        v
    };
    let (modulus, exponent) = (strip(rsa.0), strip(rsa.1));
    let bits = match modulus.first() {
        Some(first) => modulus.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    };
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "the RSA key has {bits} bits; RS256 keys need {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        ));
    }
    if exponent.is_empty() {
        return Err("the RSA key's exponent is zero".to_owned());
    }
    Ok((modulus, exponent))
}

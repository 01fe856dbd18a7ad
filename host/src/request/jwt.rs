//! JWT verification on the request path (`servers[].jwt`): which requests of a server
//! need a token, the token's check, and the claims handed to its plugin.
//!
//! [`JwtGate`] is built from the config with every routing snapshot, so it changes
//! live with the config; a request reads it from the snapshot it already loaded, and
//! with no server that has `jwt` (`Routing::jwt` is `None`) pays one check.
//!
//! A token comes in `Authorization: Bearer <token>`. It is verified with the server's
//! keys of the algorithm its header names (HS256 or RS256; `none` and every other
//! algorithm are refused, and a token only ever meets keys of its own algorithm, so an
//! HS256 token "signed" with an RS256 public key finds no key), then its claims are
//! checked: `exp` required and not past, `nbf` not ahead (both with the leeway), `iss`
//! and `aud` when the config names them. A request that fails gets 401 with
//! `WWW-Authenticate: Bearer` and a JSON body; one that passes reaches its plugin with
//! the claims as JSON in `x-jwt-claims`.
//!
//! Invariant: once any server has `jwt`, `x-jwt-claims` is the host's on every request
//! of every server: the verified claims, or no such header, whatever the client sent.

use std::collections::HashMap;

use bytes::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::http::Body;
use crate::boundary::call::HostHeader;
use crate::boundary::request_id::RequestId;
use crate::control::config::{covers, Config, JwtRules, KeyMaterial};

/// The header that carries a verified token's claims to the plugin.
pub const CLAIMS_HEADER: &str = "x-jwt-claims";

/// The token rules of one routing snapshot.
pub struct JwtGate {
    servers: HashMap<Box<str>, ServerJwt, rustc_hash::FxBuildHasher>,
}

impl std::fmt::Debug for JwtGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtGate")
            .field("servers", &self.servers.len())
            .finish_non_exhaustive()
    }
}

/// One server's rules, ready to verify with.
struct ServerJwt {
    keys: Vec<Key>,
    hs256: Validation,
    rs256: Validation,
    paths: Vec<String>,
    except: Vec<String>,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl JwtGate {
    /// The gate for `config`; `None` when no enabled server has `jwt`.
    pub fn build(config: &Config) -> Option<Box<JwtGate>> {
        let servers: HashMap<_, _, _> = config
            .servers
            .iter()
            .filter(|s| s.enabled)
            .filter_map(|s| Some((s.name.as_str().into(), ServerJwt::new(s.jwt.as_ref()?))))
            .collect();
        (!servers.is_empty()).then(|| Box::new(JwtGate { servers }))
    }

    /// The `x-jwt-claims` header the plugin of a request for `server` reads: the claims
    /// of its verified token, or none for a request outside the server's `jwt.paths`
    /// (or on a server without `jwt`); else the 401 that refuses it.
    pub fn check(
        &self,
        server: &str,
        parts: &Parts,
        id: &RequestId,
    ) -> Result<HostHeader, Box<Response<Body>>> {
        let none = HostHeader {
            name: CLAIMS_HEADER,
            value: None,
        };
        let Some(rules) = self.servers.get(server) else {
            return Ok(none);
        };
        let path = parts.uri.path();
        if !rules.paths.iter().any(|p| covers(p, path))
            || rules.except.iter().any(|p| covers(p, path))
        {
            return Ok(none);
        }
        match rules.verify(parts) {
            Ok(claims) => Ok(HostHeader {
                name: CLAIMS_HEADER,
                value: Some(claims),
            }),
            Err(refusal) => Err(Box::new(unauthorized(refusal, id))),
        }
    }
}

/// Why a request was refused.
struct Refusal {
    message: &'static str,
    /// The request had a token (RFC 6750: only then is an error code given).
    had_token: bool,
}

impl ServerJwt {
    fn new(rules: &JwtRules) -> Self {
        let keys = rules
            .keys
            .iter()
            .map(|k| {
                let (alg, key) = match &k.material {
                    KeyMaterial::Hs256(secret) => {
                        (Algorithm::HS256, DecodingKey::from_secret(secret))
                    }
                    KeyMaterial::Rs256 { modulus, exponent } => (
                        Algorithm::RS256,
                        DecodingKey::from_rsa_raw_components(modulus, exponent),
                    ),
                };
                Key {
                    kid: k.kid.clone(),
                    alg,
                    key,
                }
            })
            .collect();
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = rules.leeway_s;
            v.validate_nbf = true;
            let mut required = vec!["exp"];
            if !rules.issuers.is_empty() {
                v.set_issuer(&rules.issuers);
                required.push("iss");
            }
            if rules.audiences.is_empty() {
                // Without `audience` in the config, a token's `aud` is not looked at.
                v.validate_aud = false;
            } else {
                v.set_audience(&rules.audiences);
                required.push("aud");
            }
            v.set_required_spec_claims(&required);
            v
        };
        ServerJwt {
            keys,
            hs256: validation(Algorithm::HS256),
            rs256: validation(Algorithm::RS256),
            paths: rules.paths.clone(),
            except: rules.except.clone(),
        }
    }

    /// The claims of the request's token, as a header value.
    fn verify(&self, parts: &Parts) -> Result<HeaderValue, Refusal> {
        let refuse = |message| Refusal {
            message,
            had_token: true,
        };
        let token = bearer(parts).ok_or(Refusal {
            message: "this path needs a token: Authorization: Bearer <JWT>",
            had_token: false,
        })?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            refuse("the token is malformed, or signed with an algorithm other than HS256 or RS256")
        })?;
        let validation = match header.alg {
            Algorithm::HS256 => &self.hs256,
            Algorithm::RS256 => &self.rs256,
            _ => {
                return Err(refuse(
                    "the token's algorithm is not accepted (HS256 or RS256)",
                ))
            }
        };
        let candidates = self.keys.iter().filter(|k| {
            k.alg == header.alg
                && match (&k.kid, &header.kid) {
                    (Some(want), Some(got)) => want == got,
                    _ => true,
                }
        });
        let mut worst: Option<ErrorKind> = None;
        let mut tried = false;
        for key in candidates {
            tried = true;
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => {
                    let json = Value::Object(data.claims).to_string();
                    return HeaderValue::from_bytes(json.as_bytes())
                        .map_err(|_| refuse("the token's claims cannot be passed on"));
                }
                // A failure past the signature says more than another key's mismatch.
                Err(e) if !matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    worst = Some(e.into_kind());
                    break;
                }
                Err(e) => worst = worst.or(Some(e.into_kind())),
            }
        }
        if !tried {
            return Err(refuse(
                "no key of this server verifies tokens of the token's algorithm",
            ));
        }
        Err(refuse(match worst {
            Some(ErrorKind::ExpiredSignature) => "the token has expired",
            Some(ErrorKind::ImmatureSignature) => "the token is not valid yet (nbf)",
            Some(ErrorKind::InvalidIssuer) => "the token's issuer is not accepted",
            Some(ErrorKind::InvalidAudience) => "the token's audience is not accepted",
            Some(ErrorKind::MissingRequiredClaim(_)) => {
                "the token lacks a required claim (exp, and iss or aud when they are checked)"
            }
            Some(ErrorKind::InvalidSignature) => "the token's signature is invalid",
            _ => "the token is malformed",
        }))
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// 401 with `WWW-Authenticate` (RFC 6750) and `{"error", "request_id"}`.
fn unauthorized(refusal: Refusal, id: &RequestId) -> Response<Body> {
    let challenge = if refusal.had_token {
        HeaderValue::from_static("Bearer error=\"invalid_token\"")
    } else {
        HeaderValue::from_static("Bearer")
    };
    let body = serde_json::json!({ "error": refusal.message, "request_id": id.as_str() });
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(CONTENT_TYPE, "application/json")
        .header(WWW_AUTHENTICATE, challenge)
        .body(Body::bytes(Bytes::from(body.to_string())))
        .expect("valid parts")
}

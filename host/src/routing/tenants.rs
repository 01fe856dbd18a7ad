//! Tenants: which tenant a request is for, from its server (`servers[].tenant`) or from
//! the subdomain it names (`servers[].tenant_from_subdomain`).
//!
//! A tenant id is one domain label, kept inline ([`TenantId`]), so that finding a
//! request's tenant and keying a limiter by it allocate nothing.

use std::fmt;

/// A tenant's id: 1 to 63 bytes of lower case letters, digits, `-` and `_` (what a
/// normalised domain label may hold).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantId {
    len: u8,
    bytes: [u8; 63],
}

impl TenantId {
    /// The id `label` names; `None` if it is not one (empty, too long, or with bytes a
    /// tenant id may not hold).
    pub fn new(label: &[u8]) -> Option<Self> {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return None;
        }
        let mut bytes = [0; 63];
        bytes[..label.len()].copy_from_slice(label);
        Some(TenantId {
            len: label.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored (`new`).
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a server's requests get their tenant.
#[derive(Debug, Clone)]
pub enum Tenancy {
    /// Every request is this tenant's.
    Fixed(TenantId),
    /// The label just below this suffix (kept with its leading dot: `.app.example`)
    /// names the tenant.
    Subdomain(Box<[u8]>),
}

impl Tenancy {
    /// Every request is tenant `id`'s (`servers[].tenant`); `None` if `id` is not a
    /// tenant id (the config validator refuses those).
    pub fn fixed(id: &str) -> Option<Self> {
        TenantId::new(id.as_bytes()).map(Tenancy::Fixed)
    }

    /// The label just below `suffix` names the tenant (`tenant_from_subdomain`).
    pub fn subdomain(suffix: &str) -> Self {
        Tenancy::Subdomain(format!(".{suffix}").into_bytes().into())
    }

    /// The tenant of a request for `domain` (normalised: lower case, no port, no
    /// trailing dot). Under `app.example`, `acme.app.example` and `www.acme.app.example`
    /// are both tenant `acme`; `app.example` itself, and a label that is no tenant id
    /// (over 63 bytes cannot happen; an empty one cannot either), have none.
    pub fn tenant_of(&self, domain: &[u8]) -> Option<TenantId> {
        match self {
            Tenancy::Fixed(id) => Some(*id),
            Tenancy::Subdomain(suffix) => {
                let below = domain.strip_suffix(&**suffix)?;
                let label = match below.iter().rposition(|&b| b == b'.') {
                    Some(dot) => &below[dot + 1..],
                    None => below,
                };
                TenantId::new(label)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_just_below_the_suffix_names_the_tenant() {
        let t = Tenancy::subdomain("app.example");
        let of = |d: &str| t.tenant_of(d.as_bytes()).map(|id| id.to_string());
        assert_eq!(of("acme.app.example").as_deref(), Some("acme"));
        assert_eq!(of("www.acme.app.example").as_deref(), Some("acme"));
        assert_eq!(of("a_b-1.app.example").as_deref(), Some("a_b-1"));
        assert_eq!(of("app.example"), None);
        assert_eq!(of("xapp.example"), None);
        assert_eq!(of("acme.other.example"), None);
        assert_eq!(of(".app.example"), None);
    }

    #[test]
    fn a_fixed_tenant_is_every_request_s() {
        let t = Tenancy::fixed("acme").unwrap();
        assert_eq!(t.tenant_of(b"anything.test").unwrap().as_str(), "acme");
        assert!(Tenancy::fixed("Acme").is_none());
        assert!(TenantId::new(&[b'a'; 64]).is_none());
        assert_eq!(TenantId::new(&[b'a'; 63]).unwrap().as_str().len(), 63);
    }
}

//! TLS on listeners (rustls): a certificate chosen by SNI for each handshake, from PEM
//! files named in `global.tls.certificates`, or made at start for development
//! (`global.tls.self_signed`, rcgen). Certificates are swapped live when their files or
//! the config change; one that cannot be used is refused with a log line naming its
//! file, and the one it would replace keeps serving.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::control::config::{CertificateFiles, Listen, TlsConfig, UnknownName};
use crate::routing::domain::DomainPattern;

/// The certificates in use, and a TLS set-up per protocol choice (ALPN).
pub struct Tls {
    store: Arc<ArcSwap<Store>>,
    /// ALPN `h2, http/1.1`; `http/1.1`; `h2`.
    both: TlsAcceptor,
    http1: TlsAcceptor,
    http2: TlsAcceptor,
    /// What was loaded from each certificate's files, kept so that a file that turns bad
    /// leaves its predecessor serving.
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

#[derive(Default)]
struct Loaded {
    files: HashMap<(PathBuf, PathBuf), Certificate>,
    /// The development certificate, and the names it was made for.
    self_signed: Option<(Vec<String>, Arc<CertifiedKey>)>,
}

/// One usable certificate: its chain and key, the names it is chosen for, and the bytes
/// of its files (to tell a change from a touch).
#[derive(Clone)]
struct Certificate {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    pem: (Vec<u8>, Vec<u8>),
}

/// Which certificate a handshake gets.
#[derive(Default)]
struct Store {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the suffix of `*.suffix`: one label deep, as TLS wildcards are.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// For a client that names no domain (or an unknown one, unless rejected).
    default: Option<Arc<CertifiedKey>>,
    reject_unknown: bool,
}

impl Store {
    fn choose(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            &lower
        } else {
            name
        };
        if let Some(key) = self.exact.get(name) {
            return Some(key.clone());
        }
        if let Some(key) = name
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
        {
            return Some(key.clone());
        }
        if self.reject_unknown {
            None
        } else {
            self.default.clone()
        }
    }

    fn add(&mut self, names: &[String], key: &Arc<CertifiedKey>) {
        for name in names {
            match name.strip_prefix("*.") {
                Some(suffix) => self.wildcard.insert(suffix.to_owned(), key.clone()),
                None => self.exact.insert(name.clone(), key.clone()),
            };
        }
        if self.default.is_none() {
            self.default = Some(key.clone());
        }
    }
}

struct Resolver(Arc<ArcSwap<Store>>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = self.0.load().choose(hello.server_name());
        if chosen.is_none() {
            tracing::debug!(
                name = hello.server_name().unwrap_or("-"),
                "TLS handshake refused: no certificate for this name (global.tls.unknown_name is \"reject\")"
            );
        }
        chosen
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads every certificate `config` names (and makes the development one, when a
    /// listener speaks TLS: `in_use`), logging each that cannot be used. `domains`:
    /// every configured server's domains, which the development certificate covers.
    pub fn new(config: &TlsConfig, domains: &[DomainPattern], in_use: bool) -> Arc<Tls> {
        let store = Arc::new(ArcSwap::from_pointee(Store::default()));
        let provider = provider();
        let acceptor = |alpn: &[&[u8]]| {
            let mut set_up = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Resolver(store.clone())));
            set_up.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            TlsAcceptor::from(Arc::new(set_up))
        };
        let tls = Arc::new(Tls {
            both: acceptor(&[b"h2", b"http/1.1"]),
            http1: acceptor(&[b"http/1.1"]),
            http2: acceptor(&[b"h2"]),
            store,
            loaded: Mutex::new(Loaded::default()),
        });
        tls.apply(config, domains, in_use);
        tls
    }

    /// The set-up for a TLS listener: ALPN offers what it speaks.
    pub fn acceptor(&self, listen: &Listen) -> &TlsAcceptor {
        match (listen.http1, listen.http2) {
            (true, false) => &self.http1,
            (false, true) => &self.http2,
            _ => &self.both,
        }
    }

    /// Loads the certificates again (files changed, or the config did). A certificate
    /// whose files cannot be used keeps its previous version, if it had one; each such
    /// file is logged once per change.
    pub fn apply(&self, config: &TlsConfig, domains: &[DomainPattern], in_use: bool) {
        let provider = provider();
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let mut store = Store {
            reject_unknown: config.unknown_name == UnknownName::Reject,
            ..Store::default()
        };
        let mut files = HashMap::new();
        for (i, wanted) in config.certificates.iter().enumerate() {
            let id = (wanted.cert.clone(), wanted.key.clone());
            let previous = loaded.files.get(&id);
            let certificate = match read_files(wanted) {
                Ok(pem) if previous.is_some_and(|p| p.pem == pem) => previous.cloned(),
                Ok(pem) => match certificate(wanted, pem, &provider, now()) {
                    Ok(c) => {
                        tracing::info!(
                            cert = %wanted.cert.display(),
                            domains = %c.names.join(", "),
                            "{} certificate",
                            if previous.is_some() { "replaced the" } else { "loaded a" }
                        );
                        Some(c)
                    }
                    Err(why) => refused(i, &why, previous),
                },
                Err(why) => refused(i, &why, previous),
            };
            if let Some(c) = certificate {
                files.insert(id, c);
            }
        }
        // Listed order: the first listed for a name wins (its entry is added last).
        for wanted in config.certificates.iter().rev() {
            if let Some(c) = files.get(&(wanted.cert.clone(), wanted.key.clone())) {
                store.add(&c.names, &c.key);
            }
        }
        let first = config
            .certificates
            .iter()
            .find_map(|w| files.get(&(w.cert.clone(), w.key.clone())));
        store.default = first.map(|c| c.key.clone());
        loaded.files = files;
        if config.self_signed && in_use {
            let names = development_names(domains);
            let reuse = loaded
                .self_signed
                .as_ref()
                .filter(|(made_for, _)| *made_for == names)
                .map(|(_, key)| key.clone());
            let key = match reuse {
                Some(key) => Some(key),
                None => match self_signed(&config.self_signed_dir, &names, &provider) {
                    Ok(key) => {
                        tracing::info!(
                            ca = %config.self_signed_dir.join("ca.pem").display(),
                            domains = %names.join(", "),
                            "made a development certificate; trust its CA once (for example curl --cacert <ca>)"
                        );
                        Some(key)
                    }
                    Err(why) => {
                        tracing::error!("global.tls.self_signed: {why}");
                        None
                    }
                },
            };
            if let Some(key) = key {
                // Listed certificates win for their names.
                let mut mine = Store::default();
                mine.add(&names, &key);
                for (name, k) in mine.exact {
                    store.exact.entry(name).or_insert(k);
                }
                for (name, k) in mine.wildcard {
                    store.wildcard.entry(name).or_insert(k);
                }
                store.default.get_or_insert(key.clone());
                loaded.self_signed = Some((names, key));
            }
        } else {
            loaded.self_signed = None;
        }
        self.store.store(Arc::new(store));
    }

    /// The files to watch: every certificate and key named in `config`.
    pub fn files(config: &TlsConfig) -> Vec<PathBuf> {
        config
            .certificates
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect()
    }
}

fn refused(i: usize, why: &str, previous: Option<&Certificate>) -> Option<Certificate> {
    if previous.is_some() {
        tracing::error!(
            "global.tls.certificates[{i}]: {why}; the certificate loaded before keeps serving"
        );
    } else {
        tracing::error!(
            "global.tls.certificates[{i}]: {why}; its domains get the default certificate"
        );
    }
    previous.cloned()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read_files(files: &CertificateFiles) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
    };
    Ok((read(&files.cert)?, read(&files.key)?))
}

/// Checks a certificate's files: a chain, a key that matches its leaf, a leaf valid at
/// `now` that covers every domain it is named for.
fn certificate(
    files: &CertificateFiles,
    pem: (Vec<u8>, Vec<u8>),
    provider: &CryptoProvider,
    now: i64,
) -> Result<Certificate, String> {
    let (cert_file, key_file) = (files.cert.display(), files.key.display());
    let chain = CertificateDer::pem_slice_iter(&pem.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_file}: not a PEM certificate chain ({e})"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{cert_file}: holds no certificate"));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{cert_file}: cannot read its first certificate ({e})"))?;
    let validity = parsed.validity();
    if validity.not_after.timestamp() < now {
        return Err(format!("{cert_file}: expired on {}", validity.not_after));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "{cert_file}: not valid before {}",
            validity.not_before
        ));
    }
    let mut names: Vec<String> = Vec::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(n) => {
                    names.push(n.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    let chosen_for = if files.domains.is_empty() {
        if names.is_empty() {
            return Err(format!(
                "{cert_file}: names no domain (no DNS subject alternative name); list the domains it is for in `domains`"
            ));
        }
        names.clone()
    } else {
        for domain in &files.domains {
            if !covers(&names, &ips, domain) {
                return Err(format!(
                    "{cert_file}: does not cover {domain} (it is for {})",
                    names.join(", ")
                ));
            }
        }
        files.domains.clone()
    };
    let key = PrivateKeyDer::from_pem_slice(&pem.1)
        .map_err(|e| format!("{key_file}: no private key in PEM form ({e})"))?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("{key_file}: this key does not match the certificate in {cert_file}")
        }
        other => format!("{key_file}: cannot use this key ({other})"),
    })?;
    Ok(Certificate {
        key: Arc::new(key),
        names: chosen_for,
        pem,
    })
}

/// Whether a certificate for `names` (and `ips`) is valid for `domain` (a name, a
/// `*.` wildcard or an IP address).
fn covers(names: &[String], ips: &[IpAddr], domain: &str) -> bool {
    if let Ok(ip) = domain.parse::<IpAddr>() {
        return ips.contains(&ip);
    }
    if names.iter().any(|n| n == domain) {
        return true;
    }
    // A name one label below a wildcard the certificate holds.
    !domain.starts_with("*.")
        && domain
            .split_once('.')
            .is_some_and(|(_, parent)| names.iter().any(|n| n.strip_prefix("*.") == Some(parent)))
}

/// What the development certificate covers: every configured domain (IP literals
/// aside), `localhost` and `*.localhost`.
fn development_names(domains: &[DomainPattern]) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "*.localhost".into()];
    for d in domains {
        let name = d.to_string();
        if name.parse::<IpAddr>().is_err() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// A certificate for `names` signed by the development CA in `dir` (made there, with
/// its key readable by its owner only, when it is not there yet).
fn self_signed(
    dir: &Path,
    names: &[String],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let (ca_file, ca_key_file) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let issuer = match (
        std::fs::read_to_string(&ca_file),
        std::fs::read_to_string(&ca_key_file),
    ) {
        (Ok(cert), Ok(key)) => {
            let key = KeyPair::from_pem(&key)
                .map_err(|e| fail(&ca_key_file.display().to_string(), &e))?;
            Issuer::from_ca_cert_pem(&cert, key)
                .map_err(|e| fail(&ca_file.display().to_string(), &e))?
        }
        _ => {
            let key = KeyPair::generate().map_err(|e| fail("cannot make a key", &e))?;
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "microservers development CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params
                .self_signed(&key)
                .map_err(|e| fail("cannot make the CA", &e))?;
            std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), &e))?;
            write_private(&ca_key_file, key.serialize_pem().as_bytes())?;
            std::fs::write(&ca_file, cert.pem())
                .map_err(|e| fail(&ca_file.display().to_string(), &e))?;
            Issuer::new(params, key)
        }
    };
    let leaf_key = KeyPair::generate().map_err(|e| fail("cannot make a key", &e))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "microservers development certificate");
    params.subject_alt_names = names
        .iter()
        .map(|n| {
            n.clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| fail(n, &e))
        })
        .collect::<Result<_, _>>()?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([
            0u16, 0, 0, 0, 0, 0, 0, 1,
        ])));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = params
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| fail("cannot sign the development certificate", &e))?;
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| fail("the development key", &e))?;
    let key = CertifiedKey::from_der(vec![leaf.der().clone()], key, provider)
        .map_err(|e| fail("the development certificate", &e))?;
    Ok(Arc::new(key))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `--check`: every problem with the certificates `config` names (unreadable, not PEM,
/// key not matching, expired, not covering its domains), each naming its file.
pub fn check(config: &TlsConfig) -> Vec<String> {
    let provider = provider();
    config
        .certificates
        .iter()
        .enumerate()
        .filter_map(|(i, files)| {
            read_files(files)
                .and_then(|pem| certificate(files, pem, &provider, now()))
                .err()
                .map(|why| format!("global.tls.certificates[{i}]: {why}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label() {
        let names = vec!["*.example.com".to_owned(), "example.com".to_owned()];
        assert!(covers(&names, &[], "a.example.com"));
        assert!(covers(&names, &[], "example.com"));
        assert!(covers(&names, &[], "*.example.com"));
        assert!(!covers(&names, &[], "a.b.example.com"));
        assert!(!covers(&names, &[], "other.com"));
        assert!(!covers(&["a.example.com".to_owned()], &[], "*.example.com"));
    }
}

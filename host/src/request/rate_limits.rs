//! Rate limits and tenants on the request path: which tenant a request is for (the
//! `x-tenant` header its plugin reads), and whether its limits let it through (else
//! 429 with `Retry-After`).
//!
//! Each limit is a GCRA limiter of the `governor` crate: `per_second` on average, up to
//! `burst` at once, counted for the whole server, per tenant or per client IP address.
//! [`Admission`] is built from the config with every routing snapshot and holds them
//! all; a request reads it from the snapshot it already loaded, so with no tenant and no
//! rate limit configured (`Routing::admission` is `None`) a request pays one check.
//!
//! Invariants:
//! - A limit that stays configured keeps its limiter, and so its counts, across config
//!   changes: limiters are kept by what they are ([`LimitId`]: where the limit is
//!   written, its rate, burst and what it counts), and a new snapshot takes over the
//!   previous one's for every limit it still has.
//! - A request is counted once: the first step that resolves its server checks it, and
//!   the steps after (a retry after a reload, the body read first, a WebSocket route
//!   that turns out to be an ordinary one) are told it was admitted.
//! - Keyed limiters forget idle keys: [`forget_idle_keys`] runs `retain_recent` on
//!   each every [`FORGET_EVERY`], so memory follows the clients of the last moments,
//!   not every client ever seen.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use smallvec::SmallVec;

use super::http::Body;
use crate::boundary::call::{ClientAddr, HostHeader};
use crate::control::config::{Config, RateLimit, RatePer, Tenancy as TenancyConfig};
use crate::control::servers::Microservers;
use crate::routing::tenants::{Tenancy, TenantId};

/// The header that tells a plugin its request's tenant.
pub const TENANT_HEADER: &str = "x-tenant";

/// How often keyed limiters forget the keys whose budget is full again.
pub const FORGET_EVERY: Duration = Duration::from_secs(10);

/// The tenants and rate limits of one routing snapshot.
pub struct Admission {
    /// Every limiter in force, by what it is: the next snapshot takes over those it
    /// still has, and `forget_idle_keys` walks them.
    limiters: HashMap<LimitId, Arc<Limiter>>,
    /// `global.rate_limit`: per client IP, on every server.
    global: Vec<Arc<Limiter>>,
    servers: HashMap<Box<str>, ServerRules, rustc_hash::FxBuildHasher>,
    /// Each tenant's own limits (tenants with none are left out).
    tenants: HashMap<TenantId, Vec<Arc<Limiter>>, rustc_hash::FxBuildHasher>,
    /// Some server has a tenant: `x-tenant` is then the host's on every request, the
    /// tenant's or none, whatever the client sent.
    tenant_header: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("limiters", &self.limiters.len())
            .field("tenant_header", &self.tenant_header)
            .finish_non_exhaustive()
    }
}

/// What applies to one server's requests.
struct ServerRules {
    tenancy: Option<Tenancy>,
    limits: Vec<Arc<Limiter>>,
}

/// What a limit is: where it is written, its rate and burst, and what it counts. Two
/// configs that give a limit the same id give it the same limiter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LimitId {
    scope: Scope,
    /// The time one request's share of the budget takes to come back.
    period_ns: u64,
    burst: u32,
    per: RatePer,
}

/// Where a limit is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    /// `global.rate_limit`.
    Global,
    /// `tenants[].rate_limit` of this tenant.
    Tenant(String),
    /// `servers[].rate_limit` of this server.
    Server(String),
}

/// One limit's limiter.
struct Limiter {
    per: RatePer,
    /// For the 429 and the log: `server "api" (50/s, burst 10, per client IP)`.
    description: String,
    state: State,
}

enum State {
    /// Per server, or a tenant's own limit per tenant: one budget.
    One(DefaultDirectRateLimiter),
    /// A budget per client address (an IPv6 client's /64).
    ByIp(DefaultKeyedRateLimiter<IpAddr>),
    /// A budget per tenant (a server's `"per": "tenant"`); requests with no tenant
    /// share the `None` one.
    ByTenant(DefaultKeyedRateLimiter<Option<TenantId>>),
}

impl Limiter {
    fn new(id: &LimitId, limit: &RateLimit) -> Self {
        let quota = Quota::with_period(Duration::from_nanos(id.period_ns.max(1)))
            .expect("a period of at least 1 ns")
            .allow_burst(std::num::NonZeroU32::new(id.burst.max(1)).expect("at least 1"));
        let state = match (&id.scope, id.per) {
            (_, RatePer::ClientIp) => State::ByIp(DefaultKeyedRateLimiter::hashmap(quota)),
            (Scope::Server(_), RatePer::Tenant) => {
                State::ByTenant(DefaultKeyedRateLimiter::hashmap(quota))
            }
            _ => State::One(DefaultDirectRateLimiter::direct(quota)),
        };
        let whose = match &id.scope {
            Scope::Global => "the host".to_owned(),
            Scope::Tenant(t) => format!("tenant {t:?}"),
            Scope::Server(s) => format!("server {s:?}"),
        };
        let per = match id.per {
            RatePer::ClientIp => ", per client IP",
            RatePer::Tenant if matches!(id.scope, Scope::Server(_)) => ", per tenant",
            _ => "",
        };
        Limiter {
            per: id.per,
            description: format!(
                "{whose} ({}/s, burst {}{per})",
                limit.per_second, limit.burst
            ),
            state,
        }
    }

    /// Counts one request; `Err` with how long until one would pass.
    fn check(
        &self,
        ip: &mut impl FnMut() -> Option<IpAddr>,
        tenant: Option<TenantId>,
    ) -> Result<(), Duration> {
        let clock = DefaultClock::default();
        match &self.state {
            State::One(limiter) => limiter.check(),
            State::ByIp(limiter) => match ip() {
                Some(ip) => limiter.check_key(&ip),
                // A service call comes from no address.
                None => Ok(()),
            },
            State::ByTenant(limiter) => limiter.check_key(&tenant),
        }
        .map_err(|not_until| not_until.wait_time_from(clock.now()))
    }

    /// Forgets the keys whose budget is full again (a key that comes back starts as it
    /// would have anyway).
    fn forget_idle(&self) {
        match &self.state {
            State::One(_) => {}
            State::ByIp(limiter) => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            State::ByTenant(limiter) => {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }

    /// How many keys it holds (0 for a single budget).
    fn keys(&self) -> usize {
        match &self.state {
            State::One(_) => 0,
            State::ByIp(limiter) => limiter.len(),
            State::ByTenant(limiter) => limiter.len(),
        }
    }
}

/// The key of a client address: IPv4 as it is, IPv6 by its /64 (one client, one
/// subnet, usually; a key per address would let one client take 2^64 budgets).
/// IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4 clients) are IPv4.
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        v4 => v4,
    }
}

impl Admission {
    /// The tenants and limits `config` calls for, taking over the limiters of
    /// `previous` for the limits it still has. `None` when it has neither.
    pub fn build(config: &Config, previous: Option<&Admission>) -> Option<Box<Admission>> {
        let servers = || config.servers.iter().filter(|s| s.enabled);
        let wanted = !config.global.rate_limits.is_empty()
            || config.tenants.iter().any(|t| !t.rate_limits.is_empty())
            || servers().any(|s| s.tenancy.is_some() || !s.rate_limits.is_empty());
        if !wanted {
            return None;
        }
        let mut limiters = HashMap::new();
        let mut limiter = |scope: Scope, limit: &RateLimit| {
            let id = LimitId {
                scope,
                period_ns: (1e9 / limit.per_second).round() as u64,
                burst: limit.burst,
                per: limit.per,
            };
            let made = previous
                .and_then(|p| p.limiters.get(&id))
                .cloned()
                .unwrap_or_else(|| Arc::new(Limiter::new(&id, limit)));
            limiters.insert(id, made.clone());
            made
        };
        let global = config
            .global
            .rate_limits
            .iter()
            .map(|l| limiter(Scope::Global, l))
            .collect();
        let tenants = config
            .tenants
            .iter()
            .filter(|t| !t.rate_limits.is_empty())
            .filter_map(|t| {
                let id = TenantId::new(t.id.as_bytes())?;
                let limits = t
                    .rate_limits
                    .iter()
                    .map(|l| limiter(Scope::Tenant(t.id.clone()), l))
                    .collect();
                Some((id, limits))
            })
            .collect();
        let servers: HashMap<_, _, _> = servers()
            .map(|s| {
                let tenancy = s.tenancy.as_ref().and_then(|t| match t {
                    TenancyConfig::Fixed(id) => Tenancy::fixed(id),
                    TenancyConfig::Subdomain(suffix) => Some(Tenancy::subdomain(suffix)),
                });
                let limits = s
                    .rate_limits
                    .iter()
                    .map(|l| limiter(Scope::Server(s.name.clone()), l))
                    .collect();
                (s.name.as_str().into(), ServerRules { tenancy, limits })
            })
            .collect();
        let tenant_header = servers.values().any(|r| r.tenancy.is_some());
        Some(Box::new(Admission {
            limiters,
            global,
            servers,
            tenants,
            tenant_header,
        }))
    }

    /// Admits a request for `server` at `domain` (normalised): the `x-tenant` header its
    /// plugin gets, or the 429 that refuses it. `check`: the client whose request is
    /// counted now; `None` for a request admitted before (only its tenant is found).
    ///
    /// Limits are checked narrowest first, per client IP, then per tenant, then per
    /// server, and the first that refuses ends the check: a client over its own limit
    /// uses up nothing of what it shares with others.
    pub fn admit(
        &self,
        server: &str,
        domain: &[u8],
        check: Option<&ClientAddr>,
    ) -> Result<Option<HostHeader>, Box<Response<Body>>> {
        let rules = self.servers.get(server);
        let tenant = rules
            .and_then(|r| r.tenancy.as_ref())
            .and_then(|t| t.tenant_of(domain));
        if let Some(client) = check {
            let tenant_limits = tenant.and_then(|t| self.tenants.get(&t));
            let mut limits: SmallVec<[&Limiter; 8]> = self
                .global
                .iter()
                .chain(tenant_limits.into_iter().flatten())
                .chain(rules.into_iter().flat_map(|r| &r.limits))
                .map(|l| &**l)
                .collect();
            // Stable: in the order written within each kind.
            limits.sort_by_key(|l| l.per);
            let mut ip = None;
            let mut ip = || *ip.get_or_insert_with(|| client.ip().map(ip_key));
            for limiter in limits {
                if let Err(wait) = limiter.check(&mut ip, tenant) {
                    return Err(Box::new(too_many(limiter, server, tenant, wait)));
                }
            }
        }
        Ok(self.tenant_header.then(|| HostHeader {
            name: TENANT_HEADER,
            value: tenant.and_then(|t| HeaderValue::from_str(t.as_str()).ok()),
        }))
    }

    /// The tenant of a request for `server` at `domain` (normalised), if the server has
    /// one (for the access log).
    pub fn tenant_of(&self, server: &str, domain: &[u8]) -> Option<TenantId> {
        self.servers
            .get(server)?
            .tenancy
            .as_ref()?
            .tenant_of(domain)
    }

    /// How many limiters, and keys in all keyed ones (for the log and tests).
    fn size(&self) -> (usize, usize) {
        let keys = self.limiters.values().map(|l| l.keys()).sum();
        (self.limiters.len(), keys)
    }

    /// Makes every keyed limiter forget its idle keys: how many limiters, how many keys
    /// were forgotten, and how many are left.
    fn forget_idle(&self) -> (usize, usize, usize) {
        let (_, before) = self.size();
        for limiter in self.limiters.values() {
            limiter.forget_idle();
        }
        let (limiters, after) = self.size();
        (limiters, before.saturating_sub(after), after)
    }
}

/// Refused requests since the last log line, and in all.
static REFUSED: AtomicU64 = AtomicU64::new(0);
static REFUSED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// 429 for a request over `limiter`'s limit, with `Retry-After` (whole seconds, at
/// least 1). Logged at most once per 10 s in all, with counts.
#[cold]
#[inline(never)]
fn too_many(
    limiter: &Limiter,
    server: &str,
    tenant: Option<TenantId>,
    wait: Duration,
) -> Response<Body> {
    static LOGGED: Mutex<Option<Instant>> = Mutex::new(None);
    let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    let total = REFUSED_TOTAL.fetch_add(1, Ordering::Relaxed) + 1;
    let counted = &crate::operations::recording::meter(server).rate_limited;
    counted.fetch_add(1, Ordering::Relaxed);
    {
        let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *logged = Some(Instant::now());
            REFUSED.fetch_sub(refused, Ordering::Relaxed);
            tracing::warn!(
                server,
                tenant = tenant.as_ref().map(TenantId::as_str),
                limit = %limiter.description,
                refused,
                refused_total = total,
                "requests refused with 429: over a rate limit (refused counts those since the last such line)"
            );
        }
    }
    let retry_after_s = wait.as_secs_f64().ceil().max(1.0) as u64;
    let message = format!(
        "too many requests: over the rate limit of {}; try again in {retry_after_s} s",
        limiter.description
    );
    let body = serde_json::json!({ "error": message, "retry_after_s": retry_after_s });
    Response::builder()
        .status(StatusCode::TOO_MANY_REQUESTS)
        .header(CONTENT_TYPE, "application/json")
        .header(RETRY_AFTER, retry_after_s)
        .body(Body::bytes(Bytes::from(body.to_string())))
        .expect("valid parts")
}

/// Every [`FORGET_EVERY`], makes each keyed limiter of the current snapshot forget the
/// keys whose budget is full again, and give back the memory. Ends with the servers.
pub async fn forget_idle_keys(servers: Weak<Microservers>) {
    let mut tick = tokio::time::interval(FORGET_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(servers) = servers.upgrade() else {
            return;
        };
        let routing = servers.routing_full();
        drop(servers);
        if routing.admission.is_none() {
            continue;
        }
        // A large map takes a while to walk, under its lock: not on a worker.
        let swept = tokio::task::spawn_blocking(move || {
            routing.admission.as_deref().map(Admission::forget_idle)
        })
        .await;
        if let Ok(Some((limiters, forgot, keys))) = swept {
            tracing::debug!(limiters, forgot, keys, "rate limits: forgot idle keys");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::config;

    fn admission(text: &str, previous: Option<&Admission>) -> Box<Admission> {
        let config = config::parse(text, &|_| None).unwrap();
        Admission::build(&config, previous).expect("limits configured")
    }

    fn client(addr: &str) -> ClientAddr {
        ClientAddr::new(addr.parse().unwrap())
    }

    /// How many of `n` requests pass.
    fn passed(a: &Admission, server: &str, domain: &str, from: &str, n: usize) -> usize {
        let from = client(from);
        (0..n)
            .filter(|_| a.admit(server, domain.as_bytes(), Some(&from)).is_ok())
            .count()
    }

    const CONFIG: &str = r#"{
        "global": {"rate_limit": {"per_second": 0.001, "burst": 5}},
        "tenants": [{"id": "acme", "rate_limit": {"per_second": 0.001, "burst": 3}}],
        "servers": [
          {"name": "a", "domains": ["a.test"], "plugin": "x", "tenant": "acme"},
          {"name": "b", "domains": ["b.test"], "plugin": "x", "tenant": "acme"},
          {"name": "app", "domains": ["*.app.test"], "plugin": "x",
           "tenant_from_subdomain": "app.test",
           "rate_limit": {"per_second": 0.001, "burst": 2, "per": "tenant"}},
          {"name": "open", "domains": ["open.test"], "plugin": "x"}
        ]}"#;

    #[test]
    fn no_tenant_and_no_limit_is_nothing_to_do() {
        let c = config::parse(
            r#"{"servers": [{"name": "a", "domains": ["a.test"], "plugin": "x"}]}"#,
            &|_| None,
        )
        .unwrap();
        assert!(Admission::build(&c, None).is_none());
    }

    #[test]
    fn a_tenant_s_servers_share_its_limit() {
        let a = admission(CONFIG, None);
        assert_eq!(passed(&a, "a", "a.test", "10.0.0.1:1", 2), 2);
        assert_eq!(passed(&a, "b", "b.test", "10.0.0.2:1", 5), 1);
        // The other servers are not the tenant's.
        assert_eq!(passed(&a, "open", "open.test", "10.0.0.3:1", 9), 5);
    }

    #[test]
    fn each_subdomain_tenant_has_its_own_budget() {
        let a = admission(CONFIG, None);
        assert_eq!(passed(&a, "app", "x.app.test", "10.0.0.1:1", 4), 2);
        assert_eq!(passed(&a, "app", "www.x.app.test", "10.0.0.2:1", 4), 0);
        assert_eq!(passed(&a, "app", "y.app.test", "10.0.0.3:1", 4), 2);
        // `acme` is listed: its own limit (3) applies as well as the server's (2), and
        // it is checked first (both count per tenant; the tenant's come before the
        // server's), so the request the server's refused used up the last of it.
        assert_eq!(passed(&a, "app", "acme.app.test", "10.0.0.4:1", 3), 2);
        assert_eq!(passed(&a, "b", "b.test", "10.0.0.5:1", 4), 0);
    }

    #[test]
    fn a_client_ip_is_its_address_or_its_ipv6_64() {
        let a = admission(CONFIG, None);
        assert_eq!(passed(&a, "open", "open.test", "10.0.0.1:1", 9), 5);
        assert_eq!(passed(&a, "open", "open.test", "10.0.0.2:1", 9), 5);
        assert_eq!(passed(&a, "open", "open.test", "[2001:db8::1]:1", 3), 3);
        assert_eq!(passed(&a, "open", "open.test", "[2001:db8::2:3]:1", 9), 2);
        assert_eq!(passed(&a, "open", "open.test", "[2001:db8:0:1::1]:1", 9), 5);
        assert_eq!(passed(&a, "open", "open.test", "[::ffff:10.0.0.1]:1", 9), 0);
        // A service call comes from no address.
        let internal = ClientAddr::internal();
        assert!(a.admit("open", b"open.test", Some(&internal)).is_ok());
    }

    #[test]
    fn the_tenant_header_is_the_host_s_on_every_server() {
        let a = admission(CONFIG, None);
        let tenant = |server: &str, domain: &str| {
            let header = a
                .admit(server, domain.as_bytes(), None)
                .ok()
                .flatten()
                .expect("a tenant header");
            assert_eq!(header.name, "x-tenant");
            header.value.map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(tenant("a", "a.test").as_deref(), Some("acme"));
        assert_eq!(tenant("app", "shop.app.test").as_deref(), Some("shop"));
        assert_eq!(tenant("app", "app.test"), None);
        assert_eq!(tenant("open", "open.test"), None);
        // A server the config does not name (a drop-in library).
        assert_eq!(tenant("dropped-in", "x.localhost"), None);
    }

    #[test]
    fn keys_whose_budget_is_full_again_are_forgotten() {
        let a = admission(
            r#"{"global": {"rate_limit": {"per_second": 50, "burst": 1}},
                "servers": [{"name": "s", "domains": ["*.s.test"], "plugin": "x",
                 "tenant_from_subdomain": "s.test",
                 "rate_limit": {"per_second": 0.001, "burst": 1, "per": "tenant"}}]}"#,
            None,
        );
        for i in 0..50 {
            let domain = format!("t{i}.s.test");
            assert_eq!(passed(&a, "s", &domain, &format!("10.0.1.{i}:1"), 1), 1);
        }
        assert_eq!(a.size(), (2, 100));
        // 50/s: each client's one request is paid back after 20 ms. A tenant's takes
        // 1000 s, so those stay.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(a.forget_idle(), (2, 50, 50));
    }

    #[test]
    fn a_refusal_says_when_to_come_back() {
        let a = admission(
            r#"{"servers": [{"name": "s", "domains": ["s.test"], "plugin": "x",
                 "rate_limit": {"per_second": 0.25, "burst": 1}}]}"#,
            None,
        );
        let from = client("10.0.0.1:1");
        assert!(a.admit("s", b"s.test", Some(&from)).is_ok());
        let refused = a.admit("s", b"s.test", Some(&from)).err().unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[RETRY_AFTER], "4");
    }

    #[test]
    fn a_new_snapshot_keeps_the_counts_of_the_limits_it_still_has() {
        let before = admission(CONFIG, None);
        assert_eq!(passed(&before, "a", "a.test", "10.0.0.9:1", 9), 3);
        assert_eq!(passed(&before, "app", "x.app.test", "10.0.0.8:1", 9), 2);
        // Another server changes, and the app server's limit does: the tenant's stays.
        let changed = CONFIG
            .replace(
                r#""name": "open", "domains": ["open.test"]"#,
                r#""name": "open", "domains": ["open2.test"]"#,
            )
            .replace(
                r#""burst": 2, "per": "tenant""#,
                r#""burst": 4, "per": "tenant""#,
            );
        let after = admission(&changed, Some(&before));
        assert_eq!(passed(&after, "b", "b.test", "10.0.0.7:1", 9), 0);
        // The per-IP limit stayed too: 10.0.0.8 used all 5 of its budget.
        assert_eq!(passed(&after, "open", "open2.test", "10.0.0.8:1", 9), 0);
        // The changed limit starts afresh.
        assert_eq!(passed(&after, "app", "x.app.test", "10.0.0.6:1", 9), 4);
        assert_eq!(after.size().0, before.size().0);
    }
}

//! Where does mail for a domain go? RFC 5321 §5.1 server selection on hickory-resolver, with a
//! TTL-honouring, single-flight cache in front of it.
//!
//! The answer is a [`Destination`]: an ordered list of hosts, each with its addresses, that the
//! delivery side tries in order (next address, then next host), and a `site` name under which
//! domains served by the same MX hosts share one queue and one connection pool.

mod cache;
mod select;
#[cfg(feature = "testing")]
pub mod testing;

pub use select::{select_mx, MxRecord};

use cache::{Cache, Source};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

const LOOKUPS: &str = "drover_dns_lookups_total";

/// Registers the descriptions of the metrics this crate records.
pub fn describe_metrics() {
    metrics::describe_counter!(
        LOOKUPS,
        "Destination lookups, by result (cache_hit, ok, nxdomain, error)."
    );
    for result in ["cache_hit", "ok", "nxdomain", "error"] {
        metrics::counter!(LOOKUPS, "result" => result).increment(0);
    }
}

/// One host to try, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// MX host name (or the route's host as written).
    pub name: String,
    /// MX preference (0 for implicit MX and routes).
    pub preference: u16,
    /// Socket addresses to connect to, in order.
    pub addresses: Vec<SocketAddr>,
}

/// Where mail for a domain goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Rollup name: domains with the same MX host set share it.
    pub site: String,
    /// Hosts in the order to try them.
    pub hosts: Vec<Host>,
}

/// Why a destination could not be found.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The domain does not exist (permanent).
    #[error("domain {domain} does not exist (NXDOMAIN)")]
    NxDomain {
        /// The recipient domain.
        domain: String,
    },
    /// The domain publishes a null MX (RFC 7505): it accepts no mail (permanent).
    #[error("domain {domain} accepts no mail (null MX)")]
    NullMx {
        /// The recipient domain.
        domain: String,
    },
    /// No MX host (or the implicit MX) has an address, and the names do not exist (permanent).
    #[error("no address for any mail exchanger of {domain}")]
    NoAddresses {
        /// The recipient domain.
        domain: String,
    },
    /// The domain name is not a valid DNS name (permanent).
    #[error("invalid domain {domain:?}")]
    InvalidDomain {
        /// The recipient domain.
        domain: String,
    },
    /// SERVFAIL, timeout, refused or a network error: try again later.
    #[error("temporary DNS failure for {domain}: {reason}")]
    Temporary {
        /// The recipient domain.
        domain: String,
        /// What the resolver said.
        reason: String,
    },
}

impl ResolveError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ResolveError::Temporary { .. })
    }

    /// The RFC 3463 code a bounce or deferral for this error carries.
    pub fn enhanced_code(&self) -> &'static str {
        match self {
            ResolveError::NxDomain { .. } | ResolveError::InvalidDomain { .. } => "5.1.2",
            ResolveError::NullMx { .. } => "5.1.10",
            ResolveError::NoAddresses { .. } => "5.4.4",
            ResolveError::Temporary { .. } => "4.4.3",
        }
    }
}

/// Which address families to use for an MX host, and which to try first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressOrder {
    /// A and AAAA; every IPv4 address before any IPv6 address.
    #[default]
    Ipv4First,
    /// A and AAAA; every IPv6 address before any IPv4 address.
    Ipv6First,
    /// A only.
    Ipv4Only,
    /// AAAA only.
    Ipv6Only,
}

impl AddressOrder {
    fn wants_v4(self) -> bool {
        self != AddressOrder::Ipv6Only
    }

    fn wants_v6(self) -> bool {
        self != AddressOrder::Ipv4Only
    }
}

/// Resolver settings.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// `ip:port` name servers; empty means the system configuration.
    pub nameservers: Vec<SocketAddr>,
    /// Port that MX hosts are contacted on (25; tests point it at a sink).
    pub smtp_port: u16,
    /// Per-query timeout.
    pub timeout: Duration,
    /// Attempts per query.
    pub attempts: usize,
    /// Static routes: domain (or "*") → `host:port` list, skipping MX lookup.
    pub routes: HashMap<String, Vec<String>>,
    /// Lower bound on how long an answer is cached.
    pub min_ttl: Duration,
    /// Upper bound on how long an answer is cached (zero disables caching).
    pub max_ttl: Duration,
    /// How long a temporary failure is cached.
    pub error_ttl: Duration,
    /// Address families of MX hosts and their order.
    pub address_order: AddressOrder,
    /// Most domains whose answers are kept (MX host addresses get a quarter as many slots); the
    /// ones not used lately go first (CLOCK, an approximation of LRU).
    pub max_entries: usize,
    /// Most domain lookups sent upstream at once: a burst of 100 000 due domains waits its
    /// turn instead of sending 100 000 queries at the name server together. Cache hits and
    /// callers waiting for a lookup already in flight do not count.
    pub max_in_flight: usize,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        ResolverSettings {
            nameservers: Vec::new(),
            smtp_port: 25,
            timeout: Duration::from_secs(5),
            attempts: 2,
            routes: HashMap::new(),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            error_ttl: Duration::from_secs(30),
            address_order: AddressOrder::Ipv4First,
            max_entries: 100_000,
            max_in_flight: 256,
        }
    }
}

type Answer = Result<Arc<Destination>, ResolveError>;

/// What the domain cache holds: errors behind an `Arc` keep every entry two words wide.
type Cached = Result<Arc<Destination>, Arc<ResolveError>>;

/// A and AAAA of one host, as the host cache holds them.
#[derive(Debug, Clone)]
enum HostAddrs {
    /// In the configured order; never empty.
    Found(Arc<[IpAddr]>),
    /// The name does not exist or has no address record (permanent until the TTL runs out).
    Missing,
    /// SERVFAIL, timeout and the like.
    Failed(Arc<str>),
}

/// The caching destination resolver. Cheap to share behind an `Arc`.
pub struct MxResolver {
    resolver: TokioResolver,
    settings: ResolverSettings,
    domains: Cache<Cached>,
    /// MX hosts are shared by many domains (one provider serves millions), so their addresses
    /// are cached and single-flighted on their own.
    hosts: Cache<HostAddrs>,
    /// Upstream domain lookups in flight ([`ResolverSettings::max_in_flight`]).
    lookups: tokio::sync::Semaphore,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl MxResolver {
    /// Builds a resolver from settings (system configuration when no name servers are given).
    pub fn new(settings: ResolverSettings) -> Result<MxResolver, ResolveError> {
        let setup_error = |e: NetError| ResolveError::Temporary {
            domain: String::new(),
            reason: format!("resolver setup: {e}"),
        };
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(setup_error)?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                Default::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = settings.timeout;
        opts.attempts = settings.attempts;
        // Our own caches apply the TTL bounds; hickory's would only add a second copy.
        opts.cache_size = 0;
        let resolver = builder.build().map_err(setup_error)?;
        Ok(MxResolver {
            resolver,
            domains: Cache::new(settings.max_entries),
            hosts: Cache::new(settings.max_entries.div_ceil(4)),
            lookups: tokio::sync::Semaphore::new(settings.max_in_flight.max(1)),
            settings,
        })
    }

    /// Where mail for `domain` goes: cached, one upstream lookup in flight per name.
    pub async fn resolve(&self, domain: &str) -> Answer {
        if self.settings.routes.is_empty() {
            if let Some(answer) = self.cached(domain) {
                metrics::counter!(LOOKUPS, "result" => "cache_hit").increment(1);
                return answer;
            }
        }
        let domain = match normalize(domain) {
            Ok(domain) => domain,
            Err(e) => {
                metrics::counter!(LOOKUPS, "result" => "error").increment(1);
                return Err(e);
            }
        };
        if let Some(dest) = self.static_route(&domain) {
            return Ok(Arc::new(dest));
        }
        if domain.starts_with('[') {
            return self.literal(&domain);
        }
        let (answer, _, source) = self
            .domains
            .get_or_fetch(&domain, || async {
                // The semaphore is never closed; a failed acquire would only lift the cap.
                let _turn = self.lookups.acquire().await.ok();
                let (answer, ttl) = self.lookup(&domain).await;
                let ttl = match &answer {
                    Err(ResolveError::Temporary { .. }) => self.settings.error_ttl,
                    _ => self.bound(ttl),
                };
                (answer.map_err(Arc::new), ttl)
            })
            .await;
        let result = match (source, &answer) {
            (Source::Cached, _) => "cache_hit",
            (Source::Fetched, Ok(_)) => "ok",
            (Source::Fetched, Err(e)) if matches!(**e, ResolveError::NxDomain { .. }) => "nxdomain",
            (Source::Fetched, Err(_)) => "error",
        };
        metrics::counter!(LOOKUPS, "result" => result).increment(1);
        answer.map_err(|e| (*e).clone())
    }

    /// The cached answer for `domain`, if there is a fresh one; never queries.
    pub fn cached(&self, domain: &str) -> Option<Answer> {
        // Only normalized, valid names are ever stored, so the hit path skips validation: a
        // name that needed more than case folding simply misses.
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        let domain = if domain.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(domain.to_ascii_lowercase())
        } else {
            Cow::Borrowed(domain)
        };
        let (answer, _) = self.domains.get(&domain)?;
        Some(answer.map_err(|e| (*e).clone()))
    }

    /// What [`MxResolver::resolve`] would answer without asking a name server: a static
    /// route, an address literal or a fresh cached answer. `None` when it would have to ask.
    pub fn peek(&self, domain: &str) -> Option<Answer> {
        if !self.settings.routes.is_empty() || domain.starts_with('[') {
            let domain = normalize(domain).ok()?;
            if let Some(dest) = self.static_route(&domain) {
                return Some(Ok(Arc::new(dest)));
            }
            if domain.starts_with('[') {
                return Some(self.literal(&domain));
            }
        }
        self.cached(domain)
    }

    /// Number of domains in the cache, fresh or expired (at most about `max_entries`).
    pub fn cache_len(&self) -> usize {
        self.domains.len()
    }

    /// Stores an answer as if it had been looked up: the seam benchmarks and tests fill the
    /// cache through without a name server.
    #[doc(hidden)]
    pub fn insert_for_bench(&self, domain: &str, destination: Arc<Destination>, ttl: Duration) {
        if let Ok(domain) = normalize(domain) {
            self.domains.insert(&domain, Ok(destination), ttl);
        }
    }

    /// Applies the configured floor and ceiling; a ceiling below the floor wins, so a
    /// misconfiguration caches less rather than panicking.
    fn bound(&self, ttl: Duration) -> Duration {
        ttl.max(self.settings.min_ttl).min(self.settings.max_ttl)
    }

    fn static_route(&self, domain: &str) -> Option<Destination> {
        if self.settings.routes.is_empty() {
            return None;
        }
        let hosts = self
            .settings
            .routes
            .get(domain)
            .or_else(|| self.settings.routes.get("*"))?;
        let hosts = hosts
            .iter()
            .map(|h| Host {
                name: h.clone(),
                preference: 0,
                // The config only admits `ip:port` route hosts; anything else has no address
                // and fails to connect rather than going somewhere unintended.
                addresses: h.parse::<SocketAddr>().into_iter().collect(),
            })
            .collect();
        Some(Destination {
            site: format!("route:{domain}"),
            hosts,
        })
    }

    /// An address literal (`[192.0.2.1]`, `[ipv6:2001:db8::1]`) needs no DNS.
    fn literal(&self, domain: &str) -> Answer {
        let inner = domain
            .strip_prefix('[')
            .and_then(|d| d.strip_suffix(']'))
            .unwrap_or(domain);
        let ip = inner.strip_prefix("ipv6:").unwrap_or(inner);
        match ip.parse::<IpAddr>() {
            Ok(ip) => Ok(Arc::new(Destination {
                site: domain.to_owned(),
                hosts: vec![Host {
                    name: domain.to_owned(),
                    preference: 0,
                    addresses: vec![SocketAddr::new(ip, self.settings.smtp_port)],
                }],
            })),
            Err(_) => Err(ResolveError::InvalidDomain {
                domain: domain.to_owned(),
            }),
        }
    }

    /// The client's name for a trace header: the PTR name of `ip` when that name resolves
    /// back to `ip` (forward-confirmed, as Postfix checks it), else `None` ("unknown").
    /// Loopback addresses are `localhost` without a query. Uncached: one per connection.
    pub async fn reverse(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return Some("localhost".to_owned());
        }
        let names = self.resolver.reverse_lookup(ip).await.ok()?;
        for record in names.answers() {
            let RData::PTR(ptr) = &record.data else {
                continue;
            };
            let name = ptr.0.to_ascii();
            let Ok(addrs) = self.resolver.lookup_ip(name.as_str()).await else {
                continue;
            };
            if addrs.iter().any(|a| a.to_canonical() == ip) {
                return Some(name.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        None
    }

    /// One uncached resolution, with the TTL of its least durable ingredient.
    async fn lookup(&self, domain: &str) -> (Answer, Duration) {
        let fqdn = format!("{domain}.");
        let temporary = |reason: String| ResolveError::Temporary {
            domain: domain.to_owned(),
            reason,
        };
        let (records, mx_ttl) = match self.resolver.lookup(fqdn.as_str(), RecordType::MX).await {
            Ok(lookup) => {
                // CNAMEs on the way count too: the answer is only as durable as its chain.
                let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
                let records = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(MxRecord {
                            preference: mx.preference,
                            exchange: mx
                                .exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        }),
                        _ => None,
                    })
                    .collect::<Vec<_>>();
                if records.is_empty() {
                    // Only CNAMEs came back: the chain ends in NODATA.
                    return self.implicit_mx(domain, secs(ttl)).await;
                }
                (records, secs(ttl))
            }
            Err(e) => {
                return match classify(&e) {
                    Negative::NxDomain(ttl) => (
                        Err(ResolveError::NxDomain {
                            domain: domain.to_owned(),
                        }),
                        ttl,
                    ),
                    Negative::NoData(ttl) => self.implicit_mx(domain, ttl).await,
                    Negative::Other(reason) => (Err(temporary(reason)), Duration::ZERO),
                };
            }
        };
        let Some(ordered) = select_mx(records, &mut rand::rng()) else {
            return (
                Err(ResolveError::NullMx {
                    domain: domain.to_owned(),
                }),
                mx_ttl,
            );
        };
        let site = site_name(&ordered);
        let resolved =
            futures_util::future::join_all(ordered.iter().map(|mx| self.addresses(&mx.exchange)))
                .await;
        let mut hosts = Vec::with_capacity(ordered.len());
        let mut failure = None;
        let mut ttl = mx_ttl;
        for (mx, (addrs, addr_ttl)) in ordered.into_iter().zip(resolved) {
            ttl = ttl.min(addr_ttl);
            match addrs {
                HostAddrs::Found(ips) => hosts.push(Host {
                    name: mx.exchange,
                    preference: mx.preference,
                    addresses: ips
                        .iter()
                        .map(|&ip| SocketAddr::new(ip, self.settings.smtp_port))
                        .collect(),
                }),
                // RFC 5321 §5.1: a host without addresses is skipped, not fatal.
                HostAddrs::Missing => {}
                HostAddrs::Failed(reason) => {
                    failure = Some(reason);
                    // The answer lacks a host that may come back: look again soon.
                    ttl = ttl.min(self.settings.error_ttl);
                }
            }
        }
        if hosts.is_empty() {
            return match failure {
                Some(reason) => (Err(temporary(reason.to_string())), Duration::ZERO),
                None => (
                    Err(ResolveError::NoAddresses {
                        domain: domain.to_owned(),
                    }),
                    ttl,
                ),
            };
        }
        (Ok(Arc::new(Destination { site, hosts })), ttl)
    }

    /// No MX: the domain itself is the mail exchanger (RFC 5321 §5.1), preference 0.
    async fn implicit_mx(&self, domain: &str, negative_ttl: Duration) -> (Answer, Duration) {
        let (addrs, ttl) = self.addresses(domain).await;
        match addrs {
            HostAddrs::Found(ips) => (
                Ok(Arc::new(Destination {
                    site: domain.to_owned(),
                    hosts: vec![Host {
                        name: domain.to_owned(),
                        preference: 0,
                        addresses: ips
                            .iter()
                            .map(|&ip| SocketAddr::new(ip, self.settings.smtp_port))
                            .collect(),
                    }],
                })),
                // The absence of MX is cached only as long as the negative answer says.
                ttl.min(negative_ttl),
            ),
            HostAddrs::Missing => (
                Err(ResolveError::NoAddresses {
                    domain: domain.to_owned(),
                }),
                negative_ttl.min(ttl),
            ),
            HostAddrs::Failed(reason) => (
                Err(ResolveError::Temporary {
                    domain: domain.to_owned(),
                    reason: reason.to_string(),
                }),
                Duration::ZERO,
            ),
        }
    }

    /// A and AAAA of a host, through the host cache, with the time they stay valid.
    async fn addresses(&self, host: &str) -> (HostAddrs, Duration) {
        let (addrs, ttl, _) = self
            .hosts
            .get_or_fetch(host, || async {
                let (addrs, ttl) = self.query_addresses(host).await;
                let ttl = match addrs {
                    HostAddrs::Failed(_) => self.settings.error_ttl,
                    _ => self.bound(ttl),
                };
                (addrs, ttl)
            })
            .await;
        (addrs, ttl)
    }

    async fn query_addresses(&self, host: &str) -> (HostAddrs, Duration) {
        let order = self.settings.address_order;
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        let family = |wanted: bool, rtype: RecordType| {
            let fqdn = fqdn.as_str();
            async move {
                if wanted {
                    Some(self.resolver.lookup(fqdn, rtype).await)
                } else {
                    None
                }
            }
        };
        let (v4, v6) = tokio::join!(
            family(order.wants_v4(), RecordType::A),
            family(order.wants_v6(), RecordType::AAAA)
        );
        let mut ips = Vec::new();
        let mut ttl: Option<Duration> = None;
        let mut failure = None;
        let mut negative_ttl: Option<Duration> = None;
        for result in [v4, v6].into_iter().flatten() {
            match result {
                Ok(lookup) => {
                    let found = lookup.answers().iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                        _ => None,
                    });
                    ips.extend(found);
                    let t = secs(lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0));
                    ttl = Some(ttl.map_or(t, |old| old.min(t)));
                }
                Err(e) => match classify(&e) {
                    Negative::NxDomain(t) | Negative::NoData(t) => {
                        negative_ttl = Some(negative_ttl.map_or(t, |old| old.min(t)));
                    }
                    Negative::Other(reason) => failure = Some(reason),
                },
            }
        }
        if !ips.is_empty() {
            // A stable sort keeps the server's order within each family.
            ips.sort_by_key(|ip| ip.is_ipv4() != (order != AddressOrder::Ipv6First));
            let mut ttl = ttl.unwrap_or(Duration::ZERO);
            if failure.is_some() {
                // One family failed: use the other now, and ask again soon for the missing one.
                ttl = ttl.min(self.settings.error_ttl);
            }
            return (HostAddrs::Found(ips.into()), ttl);
        }
        match failure {
            Some(reason) => (HostAddrs::Failed(reason.into()), Duration::ZERO),
            None => (
                HostAddrs::Missing,
                negative_ttl.or(ttl).unwrap_or(Duration::ZERO),
            ),
        }
    }
}

fn secs(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl))
}

/// Lower-case, no trailing dot, IDNs in their ASCII form; rejects what cannot be a domain so
/// that garbage neither reaches the name servers nor takes cache space.
fn normalize(domain: &str) -> Result<Cow<'_, str>, ResolveError> {
    let invalid = || ResolveError::InvalidDomain {
        domain: domain.to_owned(),
    };
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.starts_with('[') {
        return Ok(Cow::Owned(trimmed.to_ascii_lowercase()));
    }
    // The hit path runs this for every message, so the common case borrows.
    let ascii = if !trimmed.is_ascii() {
        let name = Name::from_utf8(trimmed).map_err(|_| invalid())?.to_ascii();
        Cow::Owned(name.trim_end_matches('.').to_ascii_lowercase())
    } else if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    };
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if ascii.is_empty() || ascii.len() > 253 || !ascii.split('.').all(label_ok) {
        return Err(invalid());
    }
    Ok(ascii)
}

enum Negative {
    NxDomain(Duration),
    NoData(Duration),
    Other(String),
}

/// hickory reports NXDOMAIN and NODATA alike as "no records found"; the response code tells
/// them apart, and the difference is a bounce versus an implicit MX.
fn classify(error: &NetError) -> Negative {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            // Without an SOA there is no negative TTL (RFC 2308 §5): the floor applies.
            let ttl = secs(no.negative_ttl.unwrap_or(0));
            match no.response_code {
                ResponseCode::NXDomain => Negative::NxDomain(ttl),
                ResponseCode::NoError => Negative::NoData(ttl),
                other => Negative::Other(format!("response code {other}")),
            }
        }
        other => Negative::Other(other.to_string()),
    }
}

/// Rollup name: the MX host names, sorted. Domains hosted by the same provider (the same MX
/// set) get the same name, and so one queue, pool and set of limits; sorting makes it
/// independent of preferences and of the shuffle among equal ones.
fn site_name(ordered: &[MxRecord]) -> String {
    let mut names: Vec<&str> = ordered.iter().map(|m| m.exchange.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_domains() {
        assert_eq!(normalize("Example.COM.").unwrap(), "example.com");
        assert!(matches!(normalize("example.com"), Ok(Cow::Borrowed(_))));
        assert_eq!(
            normalize("bücher.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(normalize("[192.0.2.1]").unwrap(), "[192.0.2.1]");
        for bad in [
            "",
            ".",
            "example.com..",
            "a..b",
            "a b.com",
            "x@y.com",
            &"a".repeat(64),
            &"a.".repeat(130),
        ] {
            assert!(
                matches!(normalize(bad), Err(ResolveError::InvalidDomain { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn site_name_ignores_order() {
        let mx = |p, h: &str| MxRecord {
            preference: p,
            exchange: h.into(),
        };
        assert_eq!(
            site_name(&[mx(10, "b"), mx(20, "a")]),
            site_name(&[mx(5, "a"), mx(10, "b")])
        );
    }

    #[test]
    fn ttl_bounds_never_panic() {
        let r = MxResolver::new(ResolverSettings {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.bound(Duration::from_secs(1)), Duration::from_secs(5));
    }
}

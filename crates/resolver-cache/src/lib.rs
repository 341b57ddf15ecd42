//! Where does mail for a domain go? RFC 5321 §5.1 server selection on hickory-resolver, with a
//! TTL-honouring, single-flight cache in front of it.
//!
//! The answer is a [`Destination`]: an ordered list of hosts, each with its addresses, that the
//! delivery side tries in order (next address, then next host), and a `site` name under which
//! domains served by the same MX hosts share one queue and one connection pool.

mod select;

pub use select::{select_mx, MxRecord};

use dashmap::DashMap;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

const LOOKUPS: &str = "drover_dns_lookups_total";

/// Registers the descriptions of the metrics this crate records.
pub fn describe_metrics() {
    metrics::describe_counter!(
        LOOKUPS,
        "Destination lookups, by result (cache_hit, ok, nxdomain, error)."
    );
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
    /// Upper bound on how long an answer is cached.
    pub max_ttl: Duration,
    /// How long a temporary failure is cached.
    pub error_ttl: Duration,
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
        }
    }
}

type Answer = Result<Arc<Destination>, ResolveError>;

struct Entry {
    answer: Answer,
    expires: Instant,
}

#[derive(Default)]
struct Slot {
    value: RwLock<Option<Entry>>,
    /// Held while a lookup for this name is in flight, so concurrent callers share it.
    fill: tokio::sync::Mutex<()>,
}

impl Slot {
    fn fresh(&self, now: Instant) -> Option<Answer> {
        let guard = self.value.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|e| e.expires > now)
            .map(|e| e.answer.clone())
    }
}

/// The caching destination resolver. Cheap to share behind an `Arc`.
pub struct MxResolver {
    resolver: TokioResolver,
    settings: ResolverSettings,
    cache: DashMap<String, Arc<Slot>>,
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
        // Our own cache applies the TTL bounds; hickory's would only add a second copy.
        opts.cache_size = 0;
        let resolver = builder.build().map_err(setup_error)?;
        Ok(MxResolver {
            resolver,
            settings,
            cache: DashMap::new(),
        })
    }

    /// Where mail for `domain` goes: cached, one upstream lookup in flight per name.
    pub async fn resolve(&self, domain: &str) -> Answer {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(dest) = self.static_route(&domain) {
            return Ok(Arc::new(dest));
        }
        let slot = Arc::clone(self.cache.entry(domain.clone()).or_default().value());
        if let Some(answer) = slot.fresh(Instant::now()) {
            metrics::counter!(LOOKUPS, "result" => "cache_hit").increment(1);
            return answer;
        }
        let _filling = slot.fill.lock().await;
        // Someone else may have filled it while we waited: that is the single flight.
        if let Some(answer) = slot.fresh(Instant::now()) {
            metrics::counter!(LOOKUPS, "result" => "cache_hit").increment(1);
            return answer;
        }
        let (answer, ttl) = self.lookup(&domain).await;
        let result = match &answer {
            Ok(_) => "ok",
            Err(ResolveError::NxDomain { .. }) => "nxdomain",
            Err(_) => "error",
        };
        metrics::counter!(LOOKUPS, "result" => result).increment(1);
        let ttl = match &answer {
            Err(ResolveError::Temporary { .. }) => self.settings.error_ttl,
            _ => ttl.clamp(self.settings.min_ttl, self.settings.max_ttl),
        };
        *slot.value.write().unwrap_or_else(|p| p.into_inner()) = Some(Entry {
            answer: answer.clone(),
            expires: Instant::now() + ttl,
        });
        answer
    }

    fn static_route(&self, domain: &str) -> Option<Destination> {
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

    async fn lookup(&self, domain: &str) -> (Answer, Duration) {
        if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let ip = literal.strip_prefix("ipv6:").unwrap_or(literal);
            return match ip.parse::<IpAddr>() {
                Ok(ip) => (
                    Ok(Arc::new(Destination {
                        site: domain.to_owned(),
                        hosts: vec![Host {
                            name: domain.to_owned(),
                            preference: 0,
                            addresses: vec![SocketAddr::new(ip, self.settings.smtp_port)],
                        }],
                    })),
                    self.settings.max_ttl,
                ),
                Err(_) => (
                    Err(ResolveError::InvalidDomain {
                        domain: domain.to_owned(),
                    }),
                    self.settings.max_ttl,
                ),
            };
        }
        let fqdn = format!("{domain}.");
        let temporary = |reason: String| ResolveError::Temporary {
            domain: domain.to_owned(),
            reason,
        };
        let (records, mx_ttl): (Vec<MxRecord>, Duration) =
            match self.resolver.lookup(fqdn.as_str(), RecordType::MX).await {
                Ok(lookup) => {
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
                        // Only CNAMEs came back: treat like NODATA.
                        return self.implicit_mx(domain, self.settings.min_ttl).await;
                    }
                    (records, Duration::from_secs(u64::from(ttl)))
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
        let ordered = match select_mx(records, &mut rand::rng()) {
            Some(ordered) => ordered,
            None => {
                return (
                    Err(ResolveError::NullMx {
                        domain: domain.to_owned(),
                    }),
                    mx_ttl,
                )
            }
        };
        let site = site_name(&ordered);
        let mut hosts = Vec::new();
        let mut any_temporary = None;
        let mut ttl = mx_ttl;
        for mx in ordered {
            match self.addresses(&mx.exchange).await {
                Ok((addrs, addr_ttl)) => {
                    ttl = ttl.min(addr_ttl);
                    if !addrs.is_empty() {
                        hosts.push(Host {
                            name: mx.exchange,
                            preference: mx.preference,
                            addresses: addrs,
                        });
                    }
                }
                Err(Some(reason)) => any_temporary = Some(reason),
                Err(None) => {}
            }
        }
        if hosts.is_empty() {
            return match any_temporary {
                Some(reason) => (Err(temporary(reason)), Duration::ZERO),
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
        match self.addresses(domain).await {
            Ok((addrs, ttl)) if !addrs.is_empty() => (
                Ok(Arc::new(Destination {
                    site: domain.to_owned(),
                    hosts: vec![Host {
                        name: domain.to_owned(),
                        preference: 0,
                        addresses: addrs,
                    }],
                })),
                ttl,
            ),
            Ok(_) | Err(None) => (
                Err(ResolveError::NoAddresses {
                    domain: domain.to_owned(),
                }),
                negative_ttl,
            ),
            Err(Some(reason)) => (
                Err(ResolveError::Temporary {
                    domain: domain.to_owned(),
                    reason,
                }),
                Duration::ZERO,
            ),
        }
    }

    /// A and AAAA of a host. `Err(None)`: the name has no address (NXDOMAIN/NODATA);
    /// `Err(Some(reason))`: a temporary failure.
    async fn addresses(&self, host: &str) -> Result<(Vec<SocketAddr>, Duration), Option<String>> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                let addrs = lookup
                    .iter()
                    .map(|ip| SocketAddr::new(ip, self.settings.smtp_port))
                    .collect();
                Ok((addrs, ttl))
            }
            Err(e) => match classify(&e) {
                Negative::NxDomain(_) | Negative::NoData(_) => Err(None),
                Negative::Other(reason) => Err(Some(reason)),
            },
        }
    }
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
            let ttl = Duration::from_secs(u64::from(no.negative_ttl.unwrap_or(60)));
            match no.response_code {
                ResponseCode::NXDomain => Negative::NxDomain(ttl),
                ResponseCode::NoError => Negative::NoData(ttl),
                other => Negative::Other(format!("response code {other}")),
            }
        }
        other => Negative::Other(other.to_string()),
    }
}

/// Rollup name: the MX host names in order of preference. Domains hosted by the same provider
/// (the same MX set) get the same name, and so one queue, pool and set of limits.
fn site_name(ordered: &[MxRecord]) -> String {
    let mut names: Vec<&str> = ordered.iter().map(|m| m.exchange.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]
//! MX resolution against a real, in-process authoritative server (hickory-server) on
//! 127.0.0.1, with a request handler that counts queries and can script SERVFAIL and delays.

use resolver_cache::{AddressOrder, Destination, MxResolver, ResolveError, ResolverSettings};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

const ZONE: &str = r#"
$ORIGIN example.test.
$TTL 300
@          IN SOA ns.example.test. admin.example.test. ( 1 3600 600 86400 2 )
@          IN NS   ns
ns         IN A    127.0.0.1
mx1        IN A    192.0.2.1
mx1        IN AAAA 2001:db8::1
mx2        IN A    192.0.2.2
mx3        IN AAAA 2001:db8::3
multi      IN MX 30 mx3
multi      IN MX 10 mx1
multi      IN MX 20 mx2
same       IN MX 5  mx2
same       IN MX 50 mx1
same       IN MX 7  mx3
equal      IN MX 10 e1
equal      IN MX 10 e2
equal      IN MX 10 e3
equal      IN MX 20 mx2
e1         IN A    192.0.2.11
e2         IN A    192.0.2.12
e3         IN A    192.0.2.13
implicit   IN A    192.0.2.20
implicit   IN A    192.0.2.21
implicit   IN AAAA 2001:db8::20
nullmx     IN MX 0 .
alias      IN CNAME multi
viacname   IN MX 10 mxalias
mxalias    IN CNAME mx1
partial    IN MX 10 missing
partial    IN MX 20 txtonly
partial    IN MX 30 mx2
nohosts    IN MX 10 missing
nohosts    IN MX 20 txtonly
txtonly    IN TXT  "no address here"
broken     IN MX 10 mx1
halfbroken IN MX 10 failhost
halfbroken IN MX 20 mx2
allbroken  IN MX 10 failhost
failhost   IN A    192.0.2.99
ttl      1 IN MX 10 mx1
slow       IN MX 10 mx1
lru1       IN MX 10 mx1
lru2       IN MX 10 mx1
lru3       IN MX 10 mx1
lru4       IN MX 10 mx1
lru5       IN MX 10 mx1
lru6       IN MX 10 mx1
"#;

use resolver_cache::testing::{RecordType, TestDns};

trait Settings {
    fn settings(&self) -> ResolverSettings;
    fn resolver(&self) -> MxResolver;
}

impl Settings for TestDns {
    fn settings(&self) -> ResolverSettings {
        ResolverSettings {
            nameservers: vec![self.addr],
            smtp_port: 2525,
            timeout: Duration::from_secs(2),
            attempts: 1,
            min_ttl: Duration::ZERO,
            ..ResolverSettings::default()
        }
    }

    fn resolver(&self) -> MxResolver {
        MxResolver::new(self.settings()).unwrap()
    }
}

fn sa(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), 2525)
}

fn names(dest: &Destination) -> Vec<&str> {
    dest.hosts.iter().map(|h| h.name.as_str()).collect()
}

#[tokio::test]
async fn mx_hosts_in_preference_order_with_their_addresses() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    let dest = r.resolve("Multi.Example.Test.").await.unwrap();
    assert_eq!(
        names(&dest),
        ["mx1.example.test", "mx2.example.test", "mx3.example.test"]
    );
    let prefs: Vec<u16> = dest.hosts.iter().map(|h| h.preference).collect();
    assert_eq!(prefs, [10, 20, 30]);
    assert_eq!(
        dest.hosts[0].addresses,
        [sa("192.0.2.1"), sa("2001:db8::1")]
    );
    assert_eq!(dest.hosts[1].addresses, [sa("192.0.2.2")]);
    assert_eq!(dest.hosts[2].addresses, [sa("2001:db8::3")]);
    assert_eq!(
        dest.site,
        "mx1.example.test,mx2.example.test,mx3.example.test"
    );
}

#[tokio::test]
async fn equal_preferences_are_shuffled_and_the_site_is_stable() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = MxResolver::new(ResolverSettings {
        // Nothing is cached, so every lookup goes to the server and is shuffled anew.
        max_ttl: Duration::ZERO,
        ..dns.settings()
    })
    .unwrap();
    let mut orders = HashSet::new();
    let mut sites = HashSet::new();
    for _ in 0..120 {
        let dest = r.resolve("equal.example.test").await.unwrap();
        let order: Vec<String> = dest.hosts.iter().map(|h| h.name.clone()).collect();
        assert_eq!(order.len(), 4);
        assert_eq!(order[3], "mx2.example.test", "preference 20 always last");
        orders.insert(order[..3].to_vec());
        sites.insert(dest.site.clone());
    }
    assert_eq!(
        orders.len(),
        6,
        "every order of the three equal hosts occurs"
    );
    assert_eq!(sites.len(), 1, "site does not depend on the shuffle");
    assert!(dns.count("equal.example.test", RecordType::MX) >= 120);
}

#[tokio::test]
async fn no_mx_means_the_domain_itself_at_preference_zero() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    let dest = r.resolve("implicit.example.test").await.unwrap();
    assert_eq!(dest.site, "implicit.example.test");
    assert_eq!(names(&dest), ["implicit.example.test"]);
    assert_eq!(dest.hosts[0].preference, 0);
    assert_eq!(
        dest.hosts[0].addresses,
        [sa("192.0.2.20"), sa("192.0.2.21"), sa("2001:db8::20")]
    );
}

#[tokio::test]
async fn address_order_setting() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let with = |order| {
        MxResolver::new(ResolverSettings {
            address_order: order,
            ..dns.settings()
        })
        .unwrap()
    };
    let dest = with(AddressOrder::Ipv6First)
        .resolve("implicit.example.test")
        .await
        .unwrap();
    assert_eq!(
        dest.hosts[0].addresses,
        [sa("2001:db8::20"), sa("192.0.2.20"), sa("192.0.2.21")]
    );
    let v4 = with(AddressOrder::Ipv4Only);
    let dest = v4.resolve("multi.example.test").await.unwrap();
    // mx3 has only AAAA: skipped when IPv6 is off.
    assert_eq!(names(&dest), ["mx1.example.test", "mx2.example.test"]);
    assert_eq!(dest.hosts[0].addresses, [sa("192.0.2.1")]);
    assert_eq!(dns.count("mx1.example.test", RecordType::AAAA), 0);
    let v6 = with(AddressOrder::Ipv6Only);
    let dest = v6.resolve("multi.example.test").await.unwrap();
    assert_eq!(names(&dest), ["mx1.example.test", "mx3.example.test"]);
    assert_eq!(dest.hosts[0].addresses, [sa("2001:db8::1")]);
}

#[tokio::test]
async fn null_mx_is_a_permanent_5_1_10() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let err = dns
        .resolver()
        .resolve("nullmx.example.test")
        .await
        .unwrap_err();
    assert!(matches!(err, ResolveError::NullMx { .. }), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.1.10");
}

#[tokio::test]
async fn nxdomain_is_permanent_and_negatively_cached_for_the_soa_minimum() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    let err = r.resolve("nope.example.test").await.unwrap_err();
    assert!(matches!(err, ResolveError::NxDomain { .. }), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.1.2");
    assert_eq!(dns.count("nope.example.test", RecordType::MX), 1);
    // Within the negative TTL (SOA minimum 2 s): no second query.
    let again = r.resolve("nope.example.test").await.unwrap_err();
    assert_eq!(again, err);
    assert_eq!(dns.count("nope.example.test", RecordType::MX), 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    r.resolve("nope.example.test").await.unwrap_err();
    assert_eq!(dns.count("nope.example.test", RecordType::MX), 2);
}

#[tokio::test]
async fn servfail_is_temporary_and_cached_only_for_error_ttl() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    dns.servfail("broken.example.test");
    let r = MxResolver::new(ResolverSettings {
        error_ttl: Duration::from_secs(1),
        ..dns.settings()
    })
    .unwrap();
    let err = r.resolve("broken.example.test").await.unwrap_err();
    assert!(matches!(err, ResolveError::Temporary { .. }), "{err:?}");
    assert!(!err.is_permanent());
    assert_eq!(err.enhanced_code(), "4.4.3");
    let first = dns.count("broken.example.test", RecordType::MX);
    assert!(first >= 1);
    r.resolve("broken.example.test").await.unwrap_err();
    assert_eq!(dns.count("broken.example.test", RecordType::MX), first);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    r.resolve("broken.example.test").await.unwrap_err();
    assert!(dns.count("broken.example.test", RecordType::MX) > first);
}

#[tokio::test]
async fn host_lookup_failures_skip_or_defer() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    dns.servfail("failhost.example.test");
    let r = dns.resolver();
    // One MX host fails temporarily, another works: deliver to the one that works.
    let dest = r.resolve("halfbroken.example.test").await.unwrap();
    assert_eq!(names(&dest), ["mx2.example.test"]);
    // The only MX host fails temporarily: retry later, not a bounce.
    let err = r.resolve("allbroken.example.test").await.unwrap_err();
    assert!(matches!(err, ResolveError::Temporary { .. }), "{err:?}");
}

#[tokio::test]
async fn hosts_without_addresses_are_skipped() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    // "missing" is NXDOMAIN, "txtonly" has no A/AAAA (NODATA).
    let dest = r.resolve("partial.example.test").await.unwrap();
    assert_eq!(names(&dest), ["mx2.example.test"]);
    assert_eq!(dest.hosts[0].preference, 30);
    let err = r.resolve("nohosts.example.test").await.unwrap_err();
    assert!(matches!(err, ResolveError::NoAddresses { .. }), "{err:?}");
    assert!(err.is_permanent());
    assert_eq!(err.enhanced_code(), "5.4.4");
}

#[tokio::test]
async fn cnames_are_followed() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    // The domain is an alias of a domain with MX records.
    let via_alias = r.resolve("alias.example.test").await.unwrap();
    let direct = r.resolve("multi.example.test").await.unwrap();
    assert_eq!(via_alias.hosts, direct.hosts);
    assert_eq!(via_alias.site, direct.site);
    // The MX host is an alias of a host with addresses.
    let dest = r.resolve("viacname.example.test").await.unwrap();
    assert_eq!(names(&dest), ["mxalias.example.test"]);
    assert_eq!(
        dest.hosts[0].addresses,
        [sa("192.0.2.1"), sa("2001:db8::1")]
    );
}

#[tokio::test]
async fn domains_with_the_same_mx_hosts_share_a_site() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = MxResolver::new(ResolverSettings {
        routes: HashMap::from([("routed.test".to_owned(), vec!["127.0.0.1:2526".to_owned()])]),
        ..dns.settings()
    })
    .unwrap();
    let a = r.resolve("multi.example.test").await.unwrap();
    let b = r.resolve("same.example.test").await.unwrap();
    assert_eq!(a.site, b.site);
    assert_ne!(names(&a), names(&b), "different preferences, same site");
    let routed = r.resolve("routed.test").await.unwrap();
    assert_eq!(routed.site, "route:routed.test");
    assert_eq!(
        routed.hosts[0].addresses,
        ["127.0.0.1:2526".parse().unwrap()]
    );
}

#[tokio::test]
async fn a_changed_record_is_seen_after_its_ttl_not_before() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    let first = r.resolve("ttl.example.test").await.unwrap();
    assert_eq!(names(&first), ["mx1.example.test"]);
    dns.set_mx("ttl.example.test.", 1, &[(10, "mx2.example.test.")])
        .await;
    let cached = r.resolve("ttl.example.test").await.unwrap();
    assert_eq!(names(&cached), ["mx1.example.test"]);
    assert_eq!(dns.count("ttl.example.test", RecordType::MX), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let fresh = r.resolve("ttl.example.test").await.unwrap();
    assert_eq!(names(&fresh), ["mx2.example.test"]);
    assert_eq!(dns.count("ttl.example.test", RecordType::MX), 2);
}

#[tokio::test]
async fn min_ttl_floor_holds_a_short_ttl_answer() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = MxResolver::new(ResolverSettings {
        min_ttl: Duration::from_secs(30),
        ..dns.settings()
    })
    .unwrap();
    r.resolve("ttl.example.test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    r.resolve("ttl.example.test").await.unwrap();
    assert_eq!(dns.count("ttl.example.test", RecordType::MX), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_lookups_of_a_cold_name_share_one_query() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    // Hold the answer back so that all callers are waiting while the query is in flight.
    dns.delay("slow.example.test", Duration::from_millis(300));
    let r = Arc::new(dns.resolver());
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.resolve("slow.example.test").await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    assert_eq!(dns.count("slow.example.test", RecordType::MX), 1);
    assert_eq!(dns.count("mx1.example.test", RecordType::A), 1);
    assert!(answers.iter().all(|a| Arc::ptr_eq(a, &answers[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_lookups_in_flight_are_capped() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let names: Vec<String> = (0..40).map(|i| format!("burst{i}.example.test")).collect();
    for name in &names {
        dns.delay(name, Duration::from_millis(100));
    }
    let r = Arc::new(
        MxResolver::new(ResolverSettings {
            max_in_flight: 4,
            ..dns.settings()
        })
        .unwrap(),
    );
    let tasks: Vec<_> = names
        .iter()
        .map(|name| {
            let (r, name) = (Arc::clone(&r), name.clone());
            tokio::spawn(async move { r.resolve(&name).await })
        })
        .collect();
    for t in tasks {
        // The names do not exist: each lookup still went upstream, in its turn.
        assert!(t.await.unwrap().is_err());
    }
    for name in &names {
        assert!(dns.count(name, RecordType::MX) >= 1, "{name} never asked");
    }
    let most = dns.max_concurrent_delayed();
    assert!((1..=4).contains(&most), "{most} lookups at once");
}

#[tokio::test]
async fn the_cache_stays_within_max_entries_and_keeps_recently_used_names() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = MxResolver::new(ResolverSettings {
        max_entries: 4,
        ..dns.settings()
    })
    .unwrap();
    for i in 1..=4 {
        r.resolve(&format!("lru{i}.example.test")).await.unwrap();
    }
    assert_eq!(r.cache_len(), 4);
    // Touch lru1, then make room for lru5: an untouched name goes, lru1 stays.
    r.resolve("lru1.example.test").await.unwrap();
    r.resolve("lru5.example.test").await.unwrap();
    assert_eq!(r.cache_len(), 4);
    r.resolve("lru1.example.test").await.unwrap();
    assert_eq!(dns.count("lru1.example.test", RecordType::MX), 1);
    let refetched: usize = (2..=4)
        .map(|i| {
            let name = format!("lru{i}.example.test");
            usize::from(r.cached(&name).is_none())
        })
        .sum();
    assert_eq!(refetched, 1, "exactly one of lru2..lru4 was evicted");
    for i in 1..=6 {
        r.resolve(&format!("lru{i}.example.test")).await.unwrap();
        assert!(r.cache_len() <= 4);
    }
}

#[tokio::test]
async fn invalid_domains_never_reach_the_server() {
    let dns = TestDns::start(ZONE, "example.test.").await;
    let r = dns.resolver();
    for bad in ["", "a..example.test", "spaces in.example.test", "x@y.test"] {
        let err = r.resolve(bad).await.unwrap_err();
        assert!(matches!(err, ResolveError::InvalidDomain { .. }), "{err:?}");
    }
    assert_eq!(r.cache_len(), 0);
    assert_eq!(dns.total_queries(), 0);
    let literal = r.resolve("[192.0.2.7]").await.unwrap();
    assert_eq!(literal.hosts[0].addresses, [sa("192.0.2.7")]);
}

#[tokio::test]
async fn reverse_names_are_forward_confirmed() {
    const ROOT: &str = r#"
$ORIGIN .
$TTL 300
.                           IN SOA ns.root.test. admin.root.test. ( 1 3600 600 86400 2 )
7.2.0.192.in-addr.arpa.     IN PTR client.good.test.
client.good.test.           IN A   192.0.2.7
8.2.0.192.in-addr.arpa.     IN PTR liar.bad.test.
liar.bad.test.              IN A   192.0.2.99
"#;
    let dns = TestDns::start(ROOT, ".").await;
    let r = dns.resolver();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        r.reverse(ip("192.0.2.7")).await.as_deref(),
        Some("client.good.test")
    );
    // A PTR whose name does not point back is not believed.
    assert_eq!(r.reverse(ip("192.0.2.8")).await, None);
    // No PTR at all.
    assert_eq!(r.reverse(ip("192.0.2.9")).await, None);
    assert_eq!(
        r.reverse(ip("127.0.0.1")).await.as_deref(),
        Some("localhost")
    );
    assert_eq!(
        r.reverse(ip("::ffff:127.0.0.1")).await.as_deref(),
        Some("localhost")
    );
}

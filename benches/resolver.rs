//! Resolver cache: throughput of the warm hit path against a plain `DashMap` of the same keys
//! (the floor any concurrent map pays), and resident memory per cached domain with 1 M domains.
//!
//! `cargo bench -p resolver-cache --bench resolver` runs the criterion benches, then prints a
//! summary with ratios. Memory is measured in child processes (this binary re-run with
//! `DROVER_BENCH_MEM` set), so that one variant's freed heap does not hide the next one's growth.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{black_box, Criterion};
use dashmap::DashMap;
use resolver_cache::{Destination, Host, MxResolver, ResolverSettings};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

const KEYS: usize = 100_000;
const MEM_DOMAINS: usize = 1_000_000;
const MEM_ENV: &str = "DROVER_BENCH_MEM";
const HOUR: Duration = Duration::from_secs(3600);

fn domain(i: usize) -> String {
    format!("d{i:07}.example.com")
}

fn destination(i: usize) -> Arc<Destination> {
    let mx = format!("mx.{}", domain(i));
    Arc::new(Destination {
        site: mx.clone(),
        hosts: vec![Host {
            name: mx,
            preference: 10,
            addresses: vec![SocketAddr::from(([192, 0, 2, (i % 250) as u8], 25))],
        }],
    })
}

fn resolver(max_entries: usize) -> MxResolver {
    MxResolver::new(ResolverSettings {
        // Never contacted: every lookup here is a cache hit.
        nameservers: vec!["127.0.0.1:9".parse().unwrap()],
        max_entries,
        ..ResolverSettings::default()
    })
    .unwrap()
}

/// A warm hit finishes on the first poll; a `Pending` here would mean a cache miss.
fn resolve_now(r: &MxResolver, domain: &str) -> Arc<Destination> {
    let mut fut = pin!(r.resolve(domain));
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(answer) => answer.unwrap(),
        Poll::Pending => panic!("cache miss for {domain}"),
    }
}

struct Fixture {
    keys: Vec<String>,
    resolver: MxResolver,
    baseline: DashMap<String, Arc<Destination>>,
}

fn fixture() -> Fixture {
    let keys: Vec<String> = (0..KEYS).map(domain).collect();
    let resolver = resolver(KEYS * 2);
    let baseline = DashMap::new();
    for (i, k) in keys.iter().enumerate() {
        let d = destination(i);
        resolver.insert_for_bench(k, Arc::clone(&d), HOUR);
        baseline.insert(k.clone(), d);
    }
    Fixture {
        keys,
        resolver,
        baseline,
    }
}

fn hit_path(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("cached_lookup");
    let mut i = 0;
    g.bench_function("dashmap_get (baseline)", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(f.baseline.get(&f.keys[i]).map(|v| Arc::clone(&v)))
        })
    });
    g.bench_function("MxResolver::cached", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(f.resolver.cached(&f.keys[i]))
        })
    });
    g.bench_function("MxResolver::resolve (warm)", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(resolve_now(&f.resolver, &f.keys[i]))
        })
    });
    g.finish();
}

/// Nanoseconds per lookup over `rounds` passes of the key set, on `threads` threads at once.
fn ns_per_op(f: &Fixture, threads: usize, rounds: usize, op: &(dyn Fn(&str) + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for r in 0..rounds {
                    // Offset per thread so threads do not walk the keys in lockstep.
                    let offset = (t * 7919 + r) % KEYS;
                    for k in f.keys[offset..].iter().chain(&f.keys[..offset]) {
                        op(k);
                    }
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / (threads * rounds * KEYS) as f64
}

fn ratio_summary(f: &Fixture) {
    println!("\n== warm cache hits, {KEYS} distinct domains (best of 5 interleaved runs) ==");
    for threads in [1, 2] {
        // Interleaving the variants and keeping each one's best run keeps other load on the
        // machine from skewing the ratios.
        let (mut base, mut cached, mut resolve) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..5 {
            base = base.min(ns_per_op(f, threads, 4, &|k| {
                black_box(f.baseline.get(k).map(|v| Arc::clone(&v)));
            }));
            cached = cached.min(ns_per_op(f, threads, 4, &|k| {
                black_box(f.resolver.cached(k));
            }));
            resolve = resolve.min(ns_per_op(f, threads, 4, &|k| {
                black_box(resolve_now(&f.resolver, k));
            }));
        }
        let mops = |ns: f64| threads as f64 * 1e3 / ns;
        println!(
            "{threads} thread(s): DashMap::get {base:.1} ns/op ({:.1} M/s) | \
             MxResolver::cached {cached:.1} ns/op ({:.1} M/s, {:.2}x the baseline's time) | \
             MxResolver::resolve {resolve:.1} ns/op ({:.1} M/s, {:.2}x the baseline's time)",
            mops(base),
            mops(cached),
            cached / base,
            mops(resolve),
            resolve / base,
        );
    }
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Child process: fill one structure with 1 M domains and print the RSS growth per domain.
fn memory_child(variant: &str) {
    let shared = destination(0);
    let before = rss_bytes();
    let keep: Box<dyn std::any::Any> = match variant {
        "resolver-shared" | "resolver-distinct" => {
            let r = resolver(MEM_DOMAINS + MEM_DOMAINS / 10);
            for i in 0..MEM_DOMAINS {
                let d = if variant == "resolver-shared" {
                    Arc::clone(&shared)
                } else {
                    destination(i)
                };
                r.insert_for_bench(&domain(i), d, HOUR);
            }
            assert_eq!(r.cache_len(), MEM_DOMAINS);
            Box::new(r)
        }
        "dashmap-shared" => {
            let m = DashMap::new();
            for i in 0..MEM_DOMAINS {
                m.insert(domain(i), Arc::clone(&shared));
            }
            Box::new(m)
        }
        other => panic!("unknown variant {other}"),
    };
    let after = rss_bytes();
    println!("{}", (after.saturating_sub(before)) / MEM_DOMAINS);
    drop(keep);
}

fn memory_summary() {
    println!("\n== resident memory per cached domain, {MEM_DOMAINS} distinct domains ==");
    let exe = std::env::current_exe().unwrap();
    let mut results = Vec::new();
    for variant in ["dashmap-shared", "resolver-shared", "resolver-distinct"] {
        let out = std::process::Command::new(&exe)
            .env(MEM_ENV, variant)
            .output()
            .unwrap();
        let bytes: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        results.push((variant, bytes));
    }
    let base = results[0].1;
    for (variant, bytes) in results {
        let what = match variant {
            "dashmap-shared" => "DashMap<String, Arc<Destination>>, one shared Destination",
            "resolver-shared" => "MxResolver cache, one shared Destination (cache overhead)",
            _ => "MxResolver cache, a distinct 1-host Destination per domain",
        };
        println!(
            "{what}: {bytes:.0} bytes/domain ({:.2}x baseline)",
            bytes / base
        );
    }
}

/// A cold burst: 10 000 distinct domains (sharing 50 MX hosts, as real domains share
/// providers) resolved against the in-process DNS server on loopback, 500 at a time, then the
/// same 10 000 again from the warm cache.
fn cold_burst_summary() {
    const DOMAINS: usize = 10_000;
    let mut zone = String::from(
        "$ORIGIN burst.test.\n$TTL 3600\n@ IN SOA ns.burst.test. admin.burst.test. ( 1 3600 600 86400 60 )\n@ IN NS ns\nns IN A 127.0.0.1\n",
    );
    for j in 0..50 {
        zone.push_str(&format!("mx{j} IN A 192.0.2.{}\n", j + 1));
    }
    for i in 0..DOMAINS {
        zone.push_str(&format!("d{i} IN MX 10 mx{}\n", i % 50));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dns = resolver_cache::testing::TestDns::start(&zone, "burst.test.").await;
        let resolver = Arc::new(
            MxResolver::new(ResolverSettings {
                nameservers: vec![dns.addr],
                max_entries: 2 * DOMAINS,
                ..ResolverSettings::default()
            })
            .unwrap(),
        );
        let names: Vec<String> = (0..DOMAINS).map(|i| format!("d{i}.burst.test")).collect();
        let run = |names: Vec<String>| {
            let resolver = Arc::clone(&resolver);
            async move {
                let start = Instant::now();
                for chunk in names.chunks(500) {
                    let lookups: Vec<_> = chunk
                        .iter()
                        .map(|n| {
                            let r = Arc::clone(&resolver);
                            let n = n.clone();
                            tokio::spawn(async move { r.resolve(&n).await.is_ok() })
                        })
                        .collect();
                    for l in lookups {
                        assert!(l.await.unwrap());
                    }
                }
                start.elapsed()
            }
        };
        let cold = run(names.clone()).await;
        let queries = dns.total_queries();
        let warm = run(names).await;
        println!("\n== cold burst: {DOMAINS} domains (50 MX hosts) against loopback DNS, 500 in flight ==");
        println!(
            "cold: {:.2} s, {:.0} lookups/s, {queries} upstream queries ({:.2} per domain)",
            cold.as_secs_f64(),
            DOMAINS as f64 / cold.as_secs_f64(),
            queries as f64 / DOMAINS as f64
        );
        println!(
            "warm: {:.3} s, {:.0} lookups/s; cold costs {:.0}x warm",
            warm.as_secs_f64(),
            DOMAINS as f64 / warm.as_secs_f64(),
            cold.as_secs_f64() / warm.as_secs_f64()
        );
    });
}

fn main() {
    if let Ok(variant) = std::env::var(MEM_ENV) {
        memory_child(&variant);
        return;
    }
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let f = fixture();
    if std::env::var_os("DROVER_BENCH_SUMMARY_ONLY").is_some() {
        ratio_summary(&f);
        cold_burst_summary();
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    hit_path(&mut c, &f);
    c.final_summary();
    if !quick {
        ratio_summary(&f);
        memory_summary();
        cold_burst_summary();
    }
}

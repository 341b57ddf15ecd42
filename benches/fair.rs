//! Fair queuing's cost (issue 17), in the scheduler alone:
//! 1. dispatch throughput: 200 000 messages ready for one destination, popped and finished
//!    one by one (what the workers do), from 1 tenant and from 1 000 tenants × 10 campaigns
//!    at three priorities; runs alternate, medians of five, ratio to the single tenant;
//! 2. memory: VmRSS per queued message with 1 000 000 messages ready for one destination, 1
//!    tenant against 1 000 tenants × 10 campaigns, each measured in a fresh child process.
//!
//! `cargo bench -p queue --bench fair` (`DROVER_BENCH_QUICK=1`: 50 000 / 200 000 messages).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

use queue::{MessageId, Priority, Scheduler, Tags};
use queue_key::QueueKey;
use std::time::Instant;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Tenant and campaign names of message `i` when there are `tenants` tenants.
fn names(tenants: usize) -> (Vec<String>, Vec<String>) {
    (
        (0..tenants).map(|t| format!("tenant-{t}")).collect(),
        (0..10).map(|c| format!("campaign-{c}")).collect(),
    )
}

fn fill(s: &Scheduler, d: &QueueKey, n: usize, tenants: usize) {
    let (ts, cs) = names(tenants);
    for i in 0..n {
        let tags = if tenants == 1 {
            Tags {
                campaign: Some(&cs[0]),
                tenant: Some(&ts[0]),
                priority: Priority::Normal,
            }
        } else {
            Tags {
                campaign: Some(&cs[(i / tenants) % 10]),
                tenant: Some(&ts[i % tenants]),
                priority: Priority::ALL[i % 3],
            }
        };
        s.schedule_with(MessageId::generate(), d, &tags, 0, 0, 10);
    }
}

/// Messages popped and finished per second.
fn dispatch(n: usize, tenants: usize) -> f64 {
    let s = Scheduler::new();
    let d = QueueKey::new("gmail.test");
    fill(&s, &d, n, tenants);
    let start = Instant::now();
    let mut popped = 0;
    while let Some(id) = s.pop_ready(&d, 10) {
        s.finish(id);
        popped += 1;
    }
    assert_eq!(popped, n);
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Ok(spec) = std::env::var("DROVER_BENCH_FAIR_CHILD") {
        // A child: fill the schedule and print the RSS it took, per message.
        let (n, tenants) = spec.split_once(',').unwrap();
        let (n, tenants): (usize, usize) = (n.parse().unwrap(), tenants.parse().unwrap());
        let before = rss_kb();
        let s = Scheduler::new();
        fill(&s, &QueueKey::new("gmail.test"), n, tenants);
        let after = rss_kb();
        println!("{}", (after - before) as f64 * 1024.0 / n as f64);
        drop(s);
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        println!("fair: run with `cargo bench -p queue --bench fair`; skipped");
        return;
    }
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let (n, mem_n) = if quick {
        (50_000, 200_000)
    } else {
        (200_000, 1_000_000)
    };
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        one.push(dispatch(n, 1));
        many.push(dispatch(n, 1000));
    }
    let (one, many) = (median(one), median(many));
    println!(
        "dispatch: {one:.0} msgs/s from 1 tenant, {many:.0} msgs/s from 1 000 tenants x 10 campaigns x 3 priorities (ratio {:.2})",
        many / one
    );
    let child = |tenants: usize| -> f64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .env("DROVER_BENCH_FAIR_CHILD", format!("{mem_n},{tenants}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (mem_one, mem_many) = (child(1), child(1000));
    println!(
        "memory: {mem_one:.0} B per ready message from 1 tenant, {mem_many:.0} B from 1 000 tenants x 10 campaigns ({mem_n} messages, one destination)"
    );
}

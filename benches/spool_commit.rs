//! Micro-benchmark of the spool's group commit: synced inserts of one 2 KB message per call,
//! by 1 writer and by N concurrent writers. With group commit, N writers share each fsync, so
//! the time per message falls with N; the ratio to 1 writer is printed at the end.
//!
//! `cargo bench -p queue --bench spool_commit` (the spool lives in a temp dir under
//! `target/`, on the same disk as a real spool would).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/timing.rs"]
mod timing;

use criterion::{Criterion, Throughput};
use queue::{MessageId, MessageMeta, Spool, SpoolOptions};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn meta(i: u64) -> MessageMeta {
    MessageMeta {
        id: MessageId::generate(),
        sender: "bounces@sender.example.com".into(),
        recipient: format!("user{i}@bench.test"),
        domain: "bench.test".into(),
        campaign: Some("bench".into()),
        tenant: None,
        received_ms: 1,
        due_ms: 1,
        attempts: 0,
        headers: BTreeMap::new(),
        last_source: None,
        priority: Default::default(),
        metadata: None,
        arrived_ms: None,
        size: 2048,
    }
}

/// `iters` messages inserted, one per call, by `writers` concurrent tasks.
async fn insert_all(spool: &Spool, writers: u64, iters: u64, body: &Arc<Vec<u8>>) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (spool, next, body) = (spool.clone(), Arc::clone(&next), Arc::clone(body));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= iters {
                        break;
                    }
                    spool.insert(vec![(meta(i), body.to_vec())]).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
        |_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&target).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("bench-spool-")
        .tempdir_in(&target)
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let body = Arc::new(vec![b'x'; 2048]);
    let writer_counts = [1u64, 4, 32, 128];
    let mut g = c.benchmark_group("spool_insert_synced_2KB");
    g.throughput(Throughput::Elements(1));
    for writers in writer_counts {
        let name = format!("writers/{writers}");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let d = rt.block_on(insert_all(&spool, writers, iters, &body));
                timing::tally(&name, iters, d)
            })
        });
    }
    g.finish();
    c.final_summary();
    println!("\n== spool group commit: synced 2 KB inserts, one message per call ==");
    let one = timing::mean_ns("writers/1");
    for writers in writer_counts {
        if let (Some(ns), Some(one)) = (timing::mean_ns(&format!("writers/{writers}")), one) {
            println!(
                "{writers:>4} writers: {:>9.0} msgs/s   {:>6.2} × 1 writer",
                1e9 / ns,
                one / ns
            );
        }
    }
    rt.block_on(async { spool.close().unwrap() });
}

//! Durable injection into the spool: messages/s for 2 KB, 20 KB and 100 KB messages with 1, 16
//! and 256 concurrent injectors (every message synced before its caller is answered), against
//! raw RocksDB synced writes of the same sizes by one writer in the same run. The ratio shows
//! what group commit buys: concurrent callers share one WAL sync.
//!
//! `cargo bench -p queue --bench spool` (set `DROVER_BENCH_SECONDS` to change the time per
//! cell, default 2).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use queue::{MessageId, MessageMeta, Spool, SpoolOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn meta(size: usize) -> MessageMeta {
    MessageMeta {
        id: MessageId::generate(),
        sender: "bounces@news.example.com".into(),
        recipient: "someone@example.test".into(),
        domain: "example.test".into(),
        campaign: Some("bench".into()),
        tenant: None,
        received_ms: 0,
        due_ms: 0,
        attempts: 0,
        headers: Default::default(),
        last_source: None,
        priority: Default::default(),
        metadata: None,
        arrived_ms: None,
        size: size as u64,
    }
}

/// Spools live next to the crate, on the build's disk: /tmp may be a tmpfs, where a sync
/// costs nothing and the comparison would say nothing.
/// One writer, one synced `put` of meta and body per message: the floor a durable spool pays.
fn raw_rocksdb(size: usize, seconds: Duration) -> f64 {
    let dir = tempfile::tempdir_in(".").unwrap();
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, dir.path()).unwrap();
    let mut write = rocksdb::WriteOptions::default();
    write.set_sync(true);
    let body = vec![b'x'; size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < seconds {
        let m = meta(size);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(m.id.as_bytes(), serde_json::to_vec(&m).unwrap());
        batch.put([m.id.as_bytes().as_slice(), b"b"].concat(), &body);
        db.write_opt(batch, &write).unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn spool(size: usize, injectors: usize, seconds: Duration) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(".").unwrap();
    let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..injectors)
            .map(|_| {
                let spool = spool.clone();
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let body = vec![b'x'; size];
                    while start.elapsed() < seconds {
                        spool
                            .insert(vec![(meta(size), body.clone())])
                            .await
                            .unwrap();
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let rate = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    spool.close().unwrap();
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run tiny then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let seconds = Duration::from_secs_f64(if quick {
        0.05
    } else {
        std::env::var("DROVER_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0)
    });
    println!("durable spool injection, {seconds:?} per cell (messages/s; ratio to raw synced RocksDB puts)");
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>12}",
        "size", "raw 1 writer", "spool x1", "spool x16", "spool x256"
    );
    for size in [2 * 1024, 20 * 1024, 100 * 1024] {
        let raw = raw_rocksdb(size, seconds);
        let cells: Vec<f64> = [1, 16, 256]
            .iter()
            .map(|&c| spool(size, c, seconds))
            .collect();
        println!(
            "{:>7}K {:>12.0} {:>6.0} ({:.2}) {:>6.0} ({:.2}) {:>6.0} ({:.2})",
            size / 1024,
            raw,
            cells[0],
            cells[0] / raw,
            cells[1],
            cells[1] / raw,
            cells[2],
            cells[2] / raw
        );
    }
}

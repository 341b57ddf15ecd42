//! Records per second a webhook POSTs to a local axum receiver: batches of 100 against the
//! baseline of one record per request, in the same invocation.
//!
//! `cargo bench -p webhook --bench throughput` (about 10 s). `WEBHOOK_BENCH_SCALE=0.05` shrinks
//! the runs, e.g. for a quick check that the bench still works.

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use webhook::{Backlog, CursorStore, Position, Source, SourceRecord, WebhookConfig};

/// A log read from memory, all of it there from the start.
struct MemorySource {
    records: Arc<Vec<SourceRecord>>,
    next: usize,
}

impl Source for MemorySource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SourceRecord>, String> {
        let end = self.records.len().min(self.next + max);
        if end == self.next {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        let out = self.records[self.next..end].to_vec();
        self.next = end;
        Ok(out)
    }

    fn backlog(&self) -> Backlog {
        Backlog {
            records: (self.records.len() - self.next) as u64,
            bytes: 0,
        }
    }
}

/// Publishes every stored cursor, so the bench can wait for the last one.
struct WatchStore(watch::Sender<Position>);

impl CursorStore for WatchStore {
    fn store(
        &self,
        _name: &str,
        cursor: Position,
    ) -> impl Future<Output = Result<(), String>> + Send {
        self.0.send_replace(cursor);
        std::future::ready(Ok(()))
    }
}

fn log(count: usize) -> Vec<SourceRecord> {
    let mut offset = 0;
    (0..count)
        .map(|i| {
            // About the size of a real Delivery record.
            let line = serde_json::json!({
                "type": "Delivery",
                "timestamp": "2025-03-01T10:00:00Z",
                "id": format!("0195a1b2-c3d4-7e5f-8a9b-{i:012}"),
                "sender": "bounces+abc123@news.example.com",
                "recipient": format!("user{i}@example.test"),
                "domain": "example.test",
                "campaign": "spring-sale",
                "tenant": "acme",
                "site": "mx.example.test",
                "peer": {"host": "mx1.example.test", "address": "192.0.2.25:25"},
                "source": "egress-1",
                "response": {"code": 250, "enhanced_code": "2.0.0", "text": "2.0.0 Ok: queued as 4F2A1B"},
                "bounce_category": null,
                "attempt": 1,
                "queue_time_ms": 812,
                "headers": {"X-Campaign": "spring-sale", "Feedback-ID": "spring:acme:news"},
            })
            .to_string();
            offset += line.len() as u64 + 1;
            SourceRecord {
                end: Position::new(0, offset),
                line,
            }
        })
        .collect()
}

struct Run {
    records: usize,
    requests: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

async fn run(
    url: &str,
    received: &Arc<(AtomicU64, AtomicU64)>,
    batch_size: usize,
    count: usize,
) -> Run {
    let records = Arc::new(log(count));
    let target = records.last().expect("records").end;
    let (sender, mut cursor) = watch::channel(Position::default());
    let cancel = CancellationToken::new();
    let requests_before = received.0.load(Ordering::Relaxed);
    let bytes_before = received.1.load(Ordering::Relaxed);
    let started = Instant::now();
    let handle = webhook::spawn(
        WebhookConfig {
            name: format!("bench-{batch_size}"),
            url: url.to_string(),
            batch_size,
            max_delay: Duration::from_millis(5),
            ..WebhookConfig::default()
        },
        MemorySource { records, next: 0 },
        Arc::new(WatchStore(sender)),
        Position::default(),
        cancel.clone(),
    )
    .expect("spawns");
    cursor
        .wait_for(|c| *c == target)
        .await
        .expect("the webhook runs");
    let elapsed = started.elapsed();
    cancel.cancel();
    handle.join().await;
    Run {
        records: count,
        requests: received.0.load(Ordering::Relaxed) - requests_before,
        bytes: received.1.load(Ordering::Relaxed) - bytes_before,
        elapsed,
    }
}

fn report(batch_size: usize, r: &Run) {
    println!(
        "batch_size {batch_size:>3}: {:>7} records in {:>6.2} s = {:>9.0} records/s ({:.0} requests/s, {:.1} MB/s of body)",
        r.records,
        r.elapsed.as_secs_f64(),
        r.rate(),
        r.requests as f64 / r.elapsed.as_secs_f64(),
        r.bytes as f64 / r.elapsed.as_secs_f64() / 1e6,
    );
}

fn main() {
    let scale: f64 = std::env::var("WEBHOOK_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let scaled = |n: f64| ((n * scale) as usize).max(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let received = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let counters = received.clone();
        let app = Router::new().route(
            "/events",
            post(move |body: Bytes| {
                let counters = counters.clone();
                async move {
                    counters.0.fetch_add(1, Ordering::Relaxed);
                    counters.1.fetch_add(body.len() as u64, Ordering::Relaxed);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/events", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        println!(
            "webhook throughput: one webhook POSTing ~500-byte records to a local axum receiver"
        );
        // Warm-up: connection, allocator, first-use costs.
        run(&url, &received, 100, scaled(20_000.0)).await;
        let single = run(&url, &received, 1, scaled(20_000.0)).await;
        report(1, &single);
        let batched = run(&url, &received, 100, scaled(400_000.0)).await;
        report(100, &batched);
        println!(
            "ratio (batch_size 100 / batch_size 1): {:.1}x",
            batched.rate() / single.rate()
        );
    });
}

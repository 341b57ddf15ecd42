//! Dispatch with many tenants (issue 17), the engine end to end: 20 000 messages for one
//! destination are injected over HTTP while it is suspended, then it is resumed and the time
//! to the last `Delivery` record (at a `drover sink`) gives the dispatch rate; once with every
//! message from one tenant, once spread over 1 000 tenants × 10 campaigns × 3 priorities.
//! Runs alternate (three each, medians); the ratio is the figure.
//!
//! `cargo bench -p drover --bench dispatch` (`DROVER_BENCH_QUICK=1`: 5 000 messages, one run
//! each; `DROVER_BENCH_BINARY=PATH`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/net.rs"]
mod net;

use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn deliveries(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches("\"type\":\"Delivery\"").count())
        .unwrap_or(0)
}

/// One run: messages/s from the resume to the last delivery.
fn run(drover: &Path, work: &Path, sink_port: u16, n: usize, tenants: usize) -> f64 {
    let dir = tempfile::Builder::new()
        .prefix("dispatch-")
        .tempdir_in(work)
        .unwrap();
    let http = net::free_port();
    let accounting = dir.path().join("accounting.jsonl");
    let config = format!(
        "[spool]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n\
         [accounting]\npath = \"{}\"\n[[route]]\ndomain = \"gmail.test\"\nhosts = [\"127.0.0.1:{sink_port}\"]\n\
         [[shaping]]\nmatch = \"gmail.test\"\nmax_connections = 8\n",
        dir.path().join("spool").display(),
        accounting.display()
    );
    let path = dir.path().join("drover.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = net::spawn_serve(drover, &path, http);
    net::http_post(
        http,
        "/api/admin/v1/suspend",
        &json!({"domain": "gmail.test"}),
    );
    let priorities = ["high", "normal", "low"];
    for first in (0..n).step_by(1000) {
        // One request per tenant group of this batch: a request has one tenant and campaign.
        let mut by_group: std::collections::BTreeMap<(usize, usize, usize), Vec<usize>> =
            Default::default();
        for i in first..(first + 1000).min(n) {
            let key = if tenants == 1 {
                (0, 0, 1)
            } else {
                (i % tenants, (i / tenants) % 10, i % 3)
            };
            by_group.entry(key).or_default().push(i);
        }
        for ((t, c, p), ids) in by_group {
            let body = json!({
                "envelope_sender": "news@sender.example.com",
                "content": "From: news@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n",
                "recipients": ids.iter().map(|i| json!({"email": format!("r{i}@gmail.test")})).collect::<Vec<_>>(),
                "tenant": format!("tenant-{t}"),
                "campaign": format!("campaign-{c}"),
                "priority": priorities[p],
            });
            let reply = net::http_post(http, "/api/inject/v1", &body);
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        }
    }
    // Every message is queued (Reception records are written just before queueing).
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    net::http_post(
        http,
        "/api/admin/v1/resume",
        &json!({"domain": "gmail.test"}),
    );
    assert!(net::wait_until(Duration::from_secs(600), || deliveries(
        &accounting
    ) >= n));
    let rate = n as f64 / start.elapsed().as_secs_f64();
    net::terminate(&mut child);
    rate
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("dispatch: run with `cargo bench -p drover --bench dispatch`; skipped");
        return;
    }
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let (n, runs) = if quick { (5_000, 1) } else { (20_000, 3) };
    let drover = net::drover_binary(env!("CARGO_BIN_EXE_drover"));
    let work = net::bench_dir(env!("CARGO_MANIFEST_DIR"));
    let (mut sink, sink_port) = net::spawn_sink(&drover);
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        one.push(run(&drover, &work, sink_port, n, 1));
        many.push(run(&drover, &work, sink_port, n, 1000));
    }
    let _ = sink.kill();
    let _ = sink.wait();
    let (one, many) = (net::median(one), net::median(many));
    println!(
        "dispatch end to end: {one:.0} msgs/s from 1 tenant, {many:.0} msgs/s from 1 000 tenants x 10 campaigns x 3 priorities (ratio {:.2}; {n} messages, medians of {runs})",
        many / one
    );
}

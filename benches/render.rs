//! Micro-benchmark of per-recipient template rendering (`drover::message::Renderer`), next to
//! `to_crlf` over the same bytes: the one pass any output of that size needs.
//!
//! `cargo bench -p drover --bench render`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/timing.rs"]
mod timing;

use criterion::{black_box, Criterion, Throughput};
use drover::message::{to_crlf, Content, Recipient, Renderer};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

fn template(size: usize) -> String {
    let mut t = String::from(
        "From: Bench <news@sender.example.com>\r\nTo: {{ name }} <{{ email }}>\r\n\
         Subject: Hello {{ name }}, your {{ plan }} newsletter\r\n\
         List-Unsubscribe: <mailto:unsub@sender.example.com>\r\n\r\nHi {{ name }},\r\n",
    );
    let line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempo";
    while t.len() + 80 < size {
        t.push_str(line);
        t.push_str("\r\n");
    }
    t.push_str("Bye {{ name }}\r\n");
    t
}

fn recipient(i: usize) -> Recipient {
    serde_json::from_value(json!({
        "email": format!("user{i}@bench.test"),
        "name": format!("User {i}"),
        "substitutions": {"plan": "gold"},
    }))
    .unwrap()
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    let mut pairs = Vec::new();
    let mut g = c.benchmark_group("render");
    let subs: Map<String, Value> = serde_json::from_value(json!({"campaign": "nov"})).unwrap();
    let r = recipient(7);
    for size in [2 * 1024, 20 * 1024, 100 * 1024] {
        let kb = size / 1024;
        let t = template(size);
        g.throughput(Throughput::Bytes(size as u64));
        let renderer = Renderer::new(Content::Raw(t.clone()), 1 << 24).unwrap();
        let name = format!("render_for/{kb}KB");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(
                        renderer
                            .render_for(&subs, black_box(&r), "0190abcdef", "sender.example.com")
                            .unwrap(),
                    );
                }
                timing::tally(&name, iters, start.elapsed())
            })
        });
        let compile = format!("compile/{kb}KB");
        g.bench_function(&compile, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(Renderer::new(Content::Raw(black_box(t.clone())), 1 << 24).is_ok());
                }
                timing::tally(&compile, iters, start.elapsed())
            })
        });
        let base = format!("to_crlf/{kb}KB");
        g.bench_function(&base, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(to_crlf(black_box(t.as_bytes())));
                }
                timing::tally(&base, iters, start.elapsed())
            })
        });
        pairs.push((name, base.clone()));
        pairs.push((compile, base));
    }
    g.finish();
    c.final_summary();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    timing::print_ratios(
        "template rendering (per recipient; compile = per request)",
        &pairs,
    );
}

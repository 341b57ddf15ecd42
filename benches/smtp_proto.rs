//! Micro-benchmarks of the SMTP hot paths: reply parsing and dot-stuffing, each next to the
//! least work the same input needs (finding the line ends; copying the bytes).
//!
//! `cargo bench -p smtp-proto --bench smtp_proto`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

#[path = "support/timing.rs"]
mod timing;

use criterion::{black_box, Criterion, Throughput};
use smtp_proto::{parse_reply, take_line, DotStuffer, MAX_REPLY_LINE};
use std::time::{Duration, Instant};

const QUEUED: &[u8] = b"250 2.0.0 Ok: queued as 4Xb7Kq1mZ9z3\r\n";
const EHLO: &[u8] = b"250-mx.example.test Hello relay.example.com [192.0.2.1]\r\n\
250-SIZE 52428800\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n\
250-CHUNKING\r\n250-SMTPUTF8\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n";
/// What a pipelined MAIL, RCPT, DATA gets back in one read.
const PIPELINED: &[u8] = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";

fn lines_only(buf: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while let Ok(Some((_, used))) = take_line(&buf[pos..], MAX_REPLY_LINE) {
        pos += used;
        n += 1;
    }
    n
}

fn replies(buf: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while let Ok(Some((reply, used))) = parse_reply(&buf[pos..], MAX_REPLY_LINE) {
        black_box(reply);
        pos += used;
        n += 1;
    }
    n
}

fn timed(name: &str, mut f: impl FnMut()) -> impl FnMut(u64) -> Duration {
    let name = name.to_owned();
    move |iters| {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        timing::tally(&name, iters, start.elapsed())
    }
}

fn bench_replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    for (label, input) in [("queued", QUEUED), ("ehlo", EHLO), ("pipelined", PIPELINED)] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_function(format!("parse_reply/{label}"), |b| {
            b.iter_custom(timed(&format!("parse_reply/{label}"), || {
                black_box(replies(black_box(input)));
            }))
        });
        g.bench_function(format!("take_line/{label}"), |b| {
            b.iter_custom(timed(&format!("take_line/{label}"), || {
                black_box(lines_only(black_box(input)));
            }))
        });
    }
    g.finish();
}

/// A message of about `size` bytes, CRLF lines of 76 characters, every 40th starting with '.'.
fn message(size: usize) -> Vec<u8> {
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempo";
    let mut m = Vec::with_capacity(size + 80);
    let mut i = 0;
    while m.len() < size {
        if i % 40 == 39 {
            m.push(b'.');
        }
        m.extend_from_slice(line);
        m.extend_from_slice(b"\r\n");
        i += 1;
    }
    m
}

fn bench_dot(c: &mut Criterion) {
    let mut g = c.benchmark_group("dot");
    for size in [2 * 1024, 100 * 1024] {
        let input = message(size);
        let mut out = Vec::with_capacity(size * 2);
        g.throughput(Throughput::Bytes(input.len() as u64));
        let kb = size / 1024;
        g.bench_function(format!("stuff/{kb}KB"), |b| {
            b.iter_custom(timed(&format!("stuff/{kb}KB"), || {
                out.clear();
                let mut s = DotStuffer::new();
                s.stuff(black_box(&input), &mut out);
                s.finish(&mut out);
                black_box(&out);
            }))
        });
        let mut copy = Vec::with_capacity(size * 2);
        g.bench_function(format!("memcpy/{kb}KB"), |b| {
            b.iter_custom(timed(&format!("memcpy/{kb}KB"), || {
                copy.clear();
                copy.extend_from_slice(black_box(&input));
                black_box(&copy);
            }))
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    bench_replies(&mut c);
    bench_dot(&mut c);
    c.final_summary();
    timing::print_ratios(
        "smtp-proto",
        &[
            ("parse_reply/queued", "take_line/queued"),
            ("parse_reply/ehlo", "take_line/ehlo"),
            ("parse_reply/pipelined", "take_line/pipelined"),
            ("stuff/2KB", "memcpy/2KB"),
            ("stuff/100KB", "memcpy/100KB"),
        ],
    );
}

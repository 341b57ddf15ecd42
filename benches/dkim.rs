//! DKIM signing cost: RSA-2048 against Ed25519 on a 20 KB newsletter, the per-message price of
//! `[[dkim]]` at injection (body hash plus one private-key operation).
//!
//! `cargo bench -p dkim --bench dkim` runs the criterion benches, then prints the ratio and
//! what one core signs per second with each key.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{black_box, Criterion};
use dkim::{KeyConfig, Signers};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// This crate's directory, as cargo gives it to the running test: a compile-time path can
/// name another checkout when a target directory is shared between clones.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn signers(selector: &str, file: &str) -> Signers {
    Signers::load(&[KeyConfig {
        domain: "example.com".into(),
        selector: selector.into(),
        key_file: manifest_dir().join("tests/fixtures").join(file),
    }])
    .unwrap()
}

/// A 20 KB HTML newsletter with the headers a bulk sender sets.
fn message() -> Vec<u8> {
    let mut m = String::from(
        "From: News <news@example.com>\r\nTo: Ann <ann@example.test>\r\n\
         Subject: The November issue\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <0193@news.example.com>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\
         List-Unsubscribe: <https://example.com/u/0193>\r\n\
         List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nX-Campaign: nov-2026\r\n\r\n",
    );
    let mut i = 0;
    while m.len() < 20 * 1024 {
        m.push_str(&format!(
            "<p>Paragraph {i}: all the news that fits, with a <a href=\"https://example.com/{i}\">link</a>.</p>\r\n"
        ));
        i += 1;
    }
    m.into_bytes()
}

/// Best-of-5 time per signature, interleaved so that other load skews both keys alike.
fn per_signature(rsa: &Signers, ed: &Signers, m: &[u8]) -> (Duration, Duration) {
    let time = |s: &Signers, n: u32| {
        let start = Instant::now();
        for _ in 0..n {
            black_box(s.sign(black_box(m)).unwrap());
        }
        start.elapsed() / n
    };
    let (mut best_rsa, mut best_ed) = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        best_rsa = best_rsa.min(time(rsa, 50));
        best_ed = best_ed.min(time(ed, 200));
    }
    (best_rsa, best_ed)
}

fn main() {
    let rsa = signers("rsa", "rsa2048.pem");
    let ed = signers("ed", "ed25519.pem");
    let m = message();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut group = c.benchmark_group("dkim_sign_20kb");
    group.bench_function("rsa2048", |b| b.iter(|| rsa.sign(black_box(&m)).unwrap()));
    group.bench_function("ed25519", |b| b.iter(|| ed.sign(black_box(&m)).unwrap()));
    group.finish();
    c.final_summary();

    let (r, e) = per_signature(&rsa, &ed, &m);
    println!("\n== signing a {} byte message (best of 5) ==", m.len());
    println!(
        "rsa-2048:  {:>8.1} µs  ({:>6.0} messages/s per core)",
        r.as_secs_f64() * 1e6,
        1.0 / r.as_secs_f64()
    );
    println!(
        "ed25519:   {:>8.1} µs  ({:>6.0} messages/s per core)",
        e.as_secs_f64() * 1e6,
        1.0 / e.as_secs_f64()
    );
    println!(
        "RSA-2048 / Ed25519: {:.1}x",
        r.as_secs_f64() / e.as_secs_f64()
    );
}

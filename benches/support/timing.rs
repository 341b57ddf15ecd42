//! Shared by the criterion benches: remembers the mean time per iteration of every measured
#![allow(dead_code)]
//! function (warm-up included) so a bench can print ratios against a baseline measured in the
//! same run, which is what the figures are meant to be compared by.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

static TOTALS: Mutex<BTreeMap<String, (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// Adds `iters` iterations that took `elapsed` to the tally of `name`; returns `elapsed`.
pub fn tally(name: &str, iters: u64, elapsed: Duration) -> Duration {
    let mut t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    let e = t.entry(name.to_owned()).or_default();
    e.0 += iters;
    e.1 += elapsed;
    elapsed
}

/// Mean nanoseconds per iteration of `name`, if it was measured.
pub fn mean_ns(name: &str) -> Option<f64> {
    let t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    t.get(name)
        .filter(|(n, _)| *n > 0)
        .map(|(n, d)| d.as_nanos() as f64 / *n as f64)
}

/// Prints `name: X ns/iter, Y× baseline` for each pair.
pub fn print_ratios(title: &str, pairs: &[(&str, &str)]) {
    println!("\n== {title}: mean time per iteration, compared in this run ==");
    for (name, base) in pairs {
        match (mean_ns(name), mean_ns(base)) {
            (Some(a), Some(b)) => println!(
                "{name:<40} {a:>12.1} ns   {:>7.2} × {base} ({b:.1} ns)",
                a / b
            ),
            _ => println!("{name:<40} (not measured)"),
        }
    }
}

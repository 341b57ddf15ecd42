//! The per-site series of `/metrics`: outcomes counted as they happen, queue depths and
//! connections read at scrape time, each under the label `top_sites` gives the site (its own
//! name for the busiest `metrics.top_sites`, else `other`).
//!
//! They are rendered here rather than through the `metrics` facade because a site that loses
//! its label must lose its series too; the facade's recorder keeps every series it ever saw,
//! so over months of shifting traffic the page would grow without bound.

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::telemetry::{SITE_CONNECTIONS, SITE_MESSAGES, SITE_QUEUE};
use crate::top_sites::{TopSites, OTHER};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

/// How often the named sites are re-decided.
const REFRESH_MS: u64 = 10_000;

/// What an attempt came to, as the per-site counter splits it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SiteResult {
    /// 2xx.
    Delivered,
    /// 5xx (or expired).
    Bounced,
    /// 4xx, retried later.
    Deferred,
}

const RESULTS: [&str; 3] = ["delivered", "bounced", "deferred"];

struct Inner {
    top: TopSites,
    /// Outcome counts per label (a named site or `other`), by [`SiteResult`].
    counts: HashMap<String, [u64; 3]>,
    refreshed_ms: u64,
}

/// The per-site counters and the top-N tracker behind them.
pub(crate) struct SiteMetrics {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SiteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteMetrics").finish_non_exhaustive()
    }
}

impl SiteMetrics {
    /// Per-site series for at most `top` sites.
    pub(crate) fn new(top: usize) -> SiteMetrics {
        let now = now_ms();
        SiteMetrics {
            inner: Mutex::new(Inner {
                top: TopSites::new(top, now),
                counts: HashMap::from([(OTHER.to_owned(), [0; 3])]),
                refreshed_ms: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one attempt's outcome for `site`.
    pub(crate) fn outcome(&self, site: &str, result: SiteResult) {
        self.outcome_at(site, result, now_ms());
    }

    fn outcome_at(&self, site: &str, result: SiteResult, now: u64) {
        let mut inner = self.lock();
        inner.top.record(site, 1);
        if now.saturating_sub(inner.refreshed_ms) >= REFRESH_MS {
            inner.refreshed_ms = now;
            for gone in inner.top.refresh(now) {
                // Its series ends; should it come back, it starts again from zero, which
                // Prometheus reads as a counter reset.
                inner.counts.remove(&gone);
            }
        }
        let label = inner.top.label(site).to_owned();
        inner.counts.entry(label).or_default()[result as usize] += 1;
    }

    /// The label `site` is counted under now.
    fn label_of(&self, site: &str) -> String {
        self.lock().top.label(site).to_owned()
    }

    /// Appends the per-site families (Prometheus text) to `out`.
    pub(crate) fn render(&self, engine: &Engine, out: &mut String) {
        let counts: BTreeMap<String, [u64; 3]> = self
            .lock()
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        family(
            out,
            SITE_MESSAGES,
            "counter",
            "Delivery attempts by site (the busiest metrics.top_sites by name, the rest as other) and result (delivered, bounced, deferred).",
        );
        for (site, values) in &counts {
            for (result, value) in RESULTS.iter().zip(values) {
                let _ = writeln!(
                    out,
                    "{SITE_MESSAGES}{{site=\"{}\",result=\"{result}\"}} {value}",
                    escape_label(site)
                );
            }
        }
        // Queue depth by site: a queue is per recipient domain; its site is what the resolver
        // last answered for it (domains not resolved yet count as other).
        let now = now_ms();
        let mut depth: BTreeMap<String, [usize; 3]> = BTreeMap::from([(OTHER.to_owned(), [0; 3])]);
        let mut site_of: HashMap<String, String> = HashMap::new();
        for (queue, c) in engine.scheduler.destination_counts(now) {
            let domain = queue.name();
            let label = match site_of.get(domain) {
                Some(label) => label.clone(),
                None => {
                    let label = match engine.outbound.resolver.peek(domain) {
                        Some(Ok(dest)) => self.label_of(&dest.site),
                        _ => OTHER.to_owned(),
                    };
                    site_of.insert(domain.to_owned(), label.clone());
                    label
                }
            };
            let d = depth.entry(label).or_default();
            d[0] += c.ready;
            d[1] += c.scheduled + c.parked;
            d[2] += c.in_flight;
        }
        family(
            out,
            SITE_QUEUE,
            "gauge",
            "Messages queued by site (as drover_site_messages_total labels it) and state (ready, scheduled, in_flight).",
        );
        for (site, values) in &depth {
            for (state, value) in ["ready", "scheduled", "in_flight"].iter().zip(values) {
                let _ = writeln!(
                    out,
                    "{SITE_QUEUE}{{site=\"{}\",state=\"{state}\"}} {value}",
                    escape_label(site)
                );
            }
        }
        let mut connections: BTreeMap<String, usize> = BTreeMap::from([(OTHER.to_owned(), 0)]);
        for (site, n) in engine.outbound.shaper.connections_by_site() {
            *connections.entry(self.label_of(&site)).or_default() += n;
        }
        family(
            out,
            SITE_CONNECTIONS,
            "gauge",
            "Open outbound SMTP sessions (pooled idle ones included) by site.",
        );
        for (site, n) in &connections {
            let _ = writeln!(
                out,
                "{SITE_CONNECTIONS}{{site=\"{}\"}} {n}",
                escape_label(site)
            );
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub(crate) fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_under_the_site_label_and_the_rest_as_other() {
        let metrics = SiteMetrics::new(1);
        let t = now_ms();
        metrics.outcome_at("mx.big", SiteResult::Delivered, t);
        metrics.outcome_at("mx.big", SiteResult::Bounced, t);
        metrics.outcome_at("mx.small", SiteResult::Deferred, t);
        let inner = metrics.lock();
        assert_eq!(inner.counts["mx.big"], [1, 1, 0]);
        assert_eq!(inner.counts[OTHER], [0, 0, 1]);
        assert!(!inner.counts.contains_key("mx.small"));
    }

    #[test]
    fn a_site_that_loses_its_label_loses_its_series() {
        let metrics = SiteMetrics::new(1);
        let t = now_ms();
        metrics.outcome_at("mx.old", SiteResult::Delivered, t);
        for _ in 0..10 {
            metrics.outcome_at("mx.new", SiteResult::Delivered, t);
        }
        metrics.outcome_at("mx.new", SiteResult::Delivered, t + REFRESH_MS);
        let inner = metrics.lock();
        assert!(inner.top.is_named("mx.new"));
        assert!(!inner.counts.contains_key("mx.old"));
        assert_eq!(inner.counts["mx.new"], [1, 0, 0]);
        assert_eq!(inner.counts[OTHER], [10, 0, 0]);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

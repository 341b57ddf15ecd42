//! What the engine notes for observation besides the accounting log: the per-site counters
//! (`site_metrics`), the status page's history (`activity`), the injection latency, and the
//! gauges read fresh at each scrape.

use crate::activity::Event;
use crate::clock::now_ms;
use crate::engine::Engine;
use crate::site_metrics::SiteResult;
use crate::telemetry::{ACCOUNTING_PENDING, CHECKPOINT_LAG, DNS_CACHE, INJECTION_DURATION};
use accounting::{BounceCategory, Record, RecordType};
use std::time::Duration;

impl Engine {
    fn activity(&self) -> std::sync::MutexGuard<'_, crate::activity::Activity> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One delivery attempt to `site` (for `domain`) came to `kind`.
    pub(crate) fn observe_outcome(
        &self,
        site: &str,
        domain: &str,
        kind: RecordType,
        category: BounceCategory,
    ) {
        let (result, event) = match kind {
            RecordType::Delivery => (SiteResult::Delivered, Event::Delivered),
            RecordType::Bounce => (SiteResult::Bounced, Event::Bounced(category.as_str())),
            _ => (SiteResult::Deferred, Event::Deferred(category.as_str())),
        };
        self.site_metrics.outcome(site, result);
        let now = now_ms();
        let mut activity = self.activity();
        activity.record(event, now);
        if matches!(result, SiteResult::Deferred) && category == BounceCategory::Greylisted {
            activity.greylisted(domain, now);
        }
    }

    /// Records about to be written that the status page counts: expirations, inbound
    /// bounces and complaints.
    pub(crate) fn observe_records(&self, records: &[Record]) {
        let now = now_ms();
        let mut activity = self.activity();
        for r in records {
            match r.kind {
                RecordType::Expiration | RecordType::AsyncBounce => {
                    let category = r.bounce_category.unwrap_or(BounceCategory::Other);
                    activity.record(Event::Bounced(category.as_str()), now);
                }
                RecordType::Complaint => {
                    let kind = r.feedback_type.as_deref().unwrap_or("other");
                    activity.record(Event::Complaint(kind), now);
                }
                _ => {}
            }
        }
    }

    /// `count` messages came in through `via` and were spooled after `took`.
    pub(crate) fn observe_injection(&self, via: &'static str, count: u64, took: Duration) {
        metrics::histogram!(INJECTION_DURATION, "via" => via).record(took.as_secs_f64());
        self.activity().record(Event::Received(count), now_ms());
    }

    /// Sets the gauges that are cheapest read when asked for: before each scrape.
    pub(crate) fn refresh_scrape_gauges(&self) {
        metrics::gauge!(DNS_CACHE).set(self.outbound.resolver.cache_len() as f64);
        metrics::gauge!(ACCOUNTING_PENDING).set(self.accounting.pending_bytes() as f64);
        let synced = self.accounting.synced_position();
        let stored = self.finalizer.stored_position();
        // Across a rotation only the current segment's part is known without reading the
        // closed segments' sizes: a lower bound, which is what an alert needs.
        let lag = if stored.segment == synced.segment {
            synced.offset.saturating_sub(stored.offset)
        } else {
            synced.offset
        };
        metrics::gauge!(CHECKPOINT_LAG).set(lag as f64);
    }

    /// The status page's history, read under its lock.
    pub(crate) fn with_activity<T>(&self, f: impl FnOnce(&crate::activity::Activity) -> T) -> T {
        f(&self.activity())
    }
}

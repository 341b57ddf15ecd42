//! The metrics this crate records (contract §5 and extensions), each name declared once.
//!
//! Library crates declare and describe their own names; this module describes them all at
//! start-up and adds the engine's. A test checks that no metric name is spelled twice in the
//! workspace's sources.

pub(crate) const RECEIVED: &str = "drover_messages_received_total";
pub(crate) const DKIM_SIGNATURES: &str = "drover_dkim_signatures_total";
pub(crate) const HOLDS: &str = "drover_holds";
pub(crate) const BACKOFF: &str = "drover_backoff_destinations";
pub(crate) const DELIVERY_DURATION: &str = "drover_delivery_duration_seconds";
pub(crate) const AUTOMATION: &str = "drover_automation_actions_total";
/// Delivery workers running (extension).
pub(crate) const WORKERS: &str = "drover_delivery_workers";

/// Registers the descriptions of every metric (contract §5).
pub(crate) fn describe_metrics() {
    metrics::describe_counter!(RECEIVED, "Messages accepted into the spool, by channel.");
    metrics::describe_counter!(
        DKIM_SIGNATURES,
        "Injected messages by DKIM outcome: signed, unsigned (no [[dkim]] key for the From \
         domain) or error (refused as unsignable)."
    );
    metrics::describe_counter!(
        AUTOMATION,
        "Reactions of [[automation]] rules to receivers' replies, by action."
    );
    metrics::describe_gauge!(
        HOLDS,
        "Operator and automation holds in force, by kind (domain, campaign)."
    );
    metrics::describe_gauge!(
        BACKOFF,
        "Destinations whose automation backoff limits are in force."
    );
    metrics::describe_histogram!(
        DELIVERY_DURATION,
        metrics::Unit::Seconds,
        "Time from the start of a transaction to its final reply."
    );
    accounting::describe_metrics();
    queue::describe_metrics();
    connection_pool::describe_metrics();
    resolver_cache::describe_metrics();
    // Series exist from the first scrape, so dashboards and rate() see a zero, not a gap.
    for via in ["http", "smtp"] {
        metrics::counter!(RECEIVED, "via" => via).increment(0);
    }
    for result in ["signed", "unsigned", "error"] {
        metrics::counter!(DKIM_SIGNATURES, "result" => result).increment(0);
    }
    metrics::counter!("drover_messages_delivered_total").increment(0);
    metrics::counter!("drover_messages_transient_failures_total").increment(0);
    metrics::counter!("drover_messages_expired_total").increment(0);
    for category in accounting::BounceCategory::ALL {
        metrics::counter!("drover_messages_bounced_total", "category" => category.as_str())
            .increment(0);
    }
    for result in ["cache_hit", "ok", "nxdomain", "error"] {
        metrics::counter!("drover_dns_lookups_total", "result" => result).increment(0);
    }
    metrics::gauge!("drover_smtp_connections").increment(0.0);
}

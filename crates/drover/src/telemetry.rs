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
/// Bytes RocksDB holds in memory, by part (`memtables`, `block_cache`) (extension).
pub(crate) const SPOOL_MEMORY: &str = "drover_spool_memory_bytes";
/// Addresses put on the suppression list, by `source` (extension).
pub(crate) const SUPPRESSIONS: &str = "drover_suppressions_added_total";
/// Recipients refused at injection because they are suppressed, by `via` (extension).
pub(crate) const SUPPRESSED: &str = "drover_recipients_suppressed_total";
/// Connections, AUTH attempts and messages the SMTP listener refused for a limit, by
/// `reason` (extension).
pub(crate) const SMTP_REJECTIONS: &str = "drover_smtp_listener_rejections_total";
/// Mail received for the bounce domains, by what it turned out to be (extension).
pub(crate) const INBOUND: &str = "drover_inbound_reports_total";
/// Accounting segments a webhook skipped because they were gone before it sent them
/// (extension).
pub(crate) const WEBHOOK_SKIPPED_SEGMENTS: &str = "drover_webhook_skipped_segments_total";
/// Inject requests stored for deferred generation and not yet expanded (extension).
pub(crate) const GENERATION_PENDING: &str = "drover_deferred_generation_pending";
/// Recipients of stored requests expanded into queued messages (extension).
pub(crate) const GENERATION_GENERATED: &str = "drover_deferred_generation_recipients_total";
/// Recipients of stored requests refused at expansion (suppressed, failing template, DKIM),
/// each also logged at warn: no record type fits a message never made (extension).
pub(crate) const GENERATION_REFUSED: &str = "drover_deferred_generation_refused_total";
/// Delivery attempts by site and result (extension; rendered by `site_metrics`).
pub(crate) const SITE_MESSAGES: &str = "drover_site_messages_total";
/// Queued messages by site and state (extension; rendered by `site_metrics`).
pub(crate) const SITE_QUEUE: &str = "drover_site_queue_messages";
/// Open outbound sessions by site (extension; rendered by `site_metrics`).
pub(crate) const SITE_CONNECTIONS: &str = "drover_site_connections";
/// Domains in the resolver's cache (extension).
pub(crate) const DNS_CACHE: &str = "drover_dns_cache_entries";
/// Time from an injection's arrival at the engine to its messages being spooled, by `via`
/// (extension).
pub(crate) const INJECTION_DURATION: &str = "drover_injection_duration_seconds";
/// Accounting bytes handed to the writer and not yet synced (extension).
pub(crate) const ACCOUNTING_PENDING: &str = "drover_accounting_pending_bytes";
/// How far the stored accounting checkpoint is behind the synced end (extension).
pub(crate) const CHECKPOINT_LAG: &str = "drover_accounting_checkpoint_lag_bytes";
/// Messages moved between instances by a drain, by `direction` (`out`, `in`) (extension).
pub(crate) const DRAIN_MESSAGES: &str = "drover_drain_messages_total";
/// Messages the running drain has still to move (extension).
pub(crate) const DRAIN_LEFT: &str = "drover_drain_left_messages";
/// The process's resident memory (the standard Prometheus process metric).
pub(crate) const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";

/// The process's resident set size, from `/proc/self/statm` (Linux); `None` elsewhere.
pub(crate) fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The buckets of the delivery duration histogram (seconds).
pub(crate) const DELIVERY_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The buckets of the spool write and sync and the injection histograms (seconds).
pub(crate) const STORAGE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Registers the descriptions of every metric (contract §5).
pub(crate) fn describe_metrics() {
    metrics::describe_gauge!(
        DNS_CACHE,
        "Domains in the resolver's cache, fresh or expired."
    );
    metrics::describe_histogram!(
        INJECTION_DURATION,
        metrics::Unit::Seconds,
        "Time from an injection reaching the engine to its messages being spooled (synced), by door (http, smtp)."
    );
    metrics::describe_gauge!(
        ACCOUNTING_PENDING,
        metrics::Unit::Bytes,
        "Accounting record bytes handed to the writer thread and not yet synced."
    );
    metrics::describe_gauge!(
        CHECKPOINT_LAG,
        metrics::Unit::Bytes,
        "Bytes of the accounting log between the stored checkpoint and the synced end (within the current segment): records whose messages may not be deleted yet."
    );
    metrics::describe_counter!(RECEIVED, "Messages accepted into the spool, by channel.");
    metrics::describe_counter!(
        DRAIN_MESSAGES,
        "Messages moved to (out) or taken from (in) another instance by a drain."
    );
    metrics::describe_gauge!(
        DRAIN_LEFT,
        "Messages the running drain has still to move (0 when none runs)."
    );
    for direction in ["out", "in"] {
        metrics::counter!(DRAIN_MESSAGES, "direction" => direction).increment(0);
    }
    metrics::gauge!(DRAIN_LEFT).set(0.0);
    metrics::describe_counter!(
        WEBHOOK_SKIPPED_SEGMENTS,
        "Accounting segments a webhook could not send: deleted (retention past webhook_hold) or lost before it read them."
    );
    metrics::describe_counter!(
        SUPPRESSIONS,
        "Addresses put on the suppression list, by source (bounce, admin, ...)."
    );
    metrics::describe_counter!(
        INBOUND,
        "Mail received for the bounce domains, by kind (dsn, text-bounce, arf, auto-reply, unsubscribe, unknown)."
    );
    metrics::describe_counter!(
        SMTP_REJECTIONS,
        "What the SMTP listener refused for a limit, by reason: max_connections, \
         max_connections_per_ip (421 banner), auth_failures (421 to AUTH), bare_newline \
         (550 5.6.11), message_size (552 5.3.4)."
    );
    metrics::describe_counter!(
        SUPPRESSED,
        "Recipients refused at injection because they are on their tenant's suppression list."
    );
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
        GENERATION_PENDING,
        "Inject requests stored for deferred generation and not yet expanded."
    );
    metrics::describe_counter!(
        GENERATION_GENERATED,
        "Recipients of deferred-generation requests queued as messages."
    );
    metrics::describe_counter!(
        GENERATION_REFUSED,
        "Recipients of deferred-generation requests refused at expansion (suppressed, \
         failing template, over a limit, DKIM), each logged at warn."
    );
    metrics::describe_gauge!(
        HOLDS,
        "Operator and automation holds in force, by kind (domain, campaign)."
    );
    metrics::describe_gauge!(
        BACKOFF,
        "Destinations whose automation backoff limits are in force."
    );
    metrics::describe_gauge!(
        WORKERS,
        "Delivery workers running (at most delivery.max_workers)."
    );
    metrics::describe_gauge!(
        SPOOL_MEMORY,
        metrics::Unit::Bytes,
        "Memory RocksDB holds, by part (memtables, block_cache); bounded by spool.memory_budget_mb."
    );
    metrics::describe_gauge!(
        RESIDENT_MEMORY,
        metrics::Unit::Bytes,
        "Resident memory of the drover process."
    );
    metrics::describe_histogram!(
        DELIVERY_DURATION,
        metrics::Unit::Seconds,
        "Time from the start of a transaction to its final reply."
    );
    // Each crate describes its own metrics and gives their series a first zero.
    accounting::describe_metrics();
    webhook::describe_metrics();
    queue::describe_metrics();
    connection_pool::describe_metrics();
    resolver_cache::describe_metrics();
    cluster_limits::describe_metrics();
    // Series exist from the first scrape, so dashboards and rate() see a zero, not a gap.
    for via in ["http", "smtp"] {
        metrics::counter!(RECEIVED, "via" => via).increment(0);
    }
    metrics::counter!(GENERATION_GENERATED).increment(0);
    metrics::counter!(GENERATION_REFUSED).increment(0);
    metrics::gauge!(DNS_CACHE).set(0.0);
    metrics::gauge!(ACCOUNTING_PENDING).set(0.0);
    metrics::gauge!(CHECKPOINT_LAG).set(0.0);
    for result in ["signed", "unsigned", "error"] {
        metrics::counter!(DKIM_SIGNATURES, "result" => result).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Every metric name is spelled once in the workspace's library and binary sources: in
    /// its `const` declaration. Everything else refers to the constant, so a rename cannot
    /// leave a stale copy behind.
    #[test]
    fn every_metric_name_is_declared_once() {
        let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let crates = manifest.join("..");
        let mut files = Vec::new();
        for krate in std::fs::read_dir(&crates).unwrap().flatten() {
            let src = krate.path().join("src");
            if src.is_dir() {
                sources(&src, &mut files);
            }
        }
        let name = regex::Regex::new(r#""(drover_[a-z0-9_]+)""#).unwrap();
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            for (n, line) in text.lines().enumerate() {
                // Test code may spell names to look for them in a scrape.
                if line.contains("#[cfg(test)]") {
                    break;
                }
                for m in name.captures_iter(line) {
                    let at = format!("{}:{}: {}", file.display(), n + 1, line.trim());
                    seen.entry(m[1].to_owned()).or_default().push(at);
                }
            }
        }
        assert!(seen.len() >= 15, "found only {seen:?}");
        for (metric, places) in &seen {
            assert_eq!(
                places.len(),
                1,
                "{metric} is spelled more than once: {places:#?}"
            );
            assert!(
                places[0].contains("const "),
                "{metric} is not declared as a constant: {places:?}"
            );
        }
        for required in [
            "drover_messages_received_total",
            "drover_messages_delivered_total",
            "drover_messages_transient_failures_total",
            "drover_messages_bounced_total",
            "drover_messages_expired_total",
            "drover_queue_messages",
            "drover_smtp_connections",
            "drover_dns_lookups_total",
            "drover_delivery_duration_seconds",
        ] {
            assert!(
                seen.contains_key(required),
                "contract §5 metric {required} is missing"
            );
        }
    }
}

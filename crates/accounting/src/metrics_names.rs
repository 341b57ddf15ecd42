//! The outcome counters of contract §5. They are counted where the records are written, so a
//! metric and the accounting file can never disagree.

use crate::{BounceCategory, RecordType};

pub(crate) const DELIVERED: &str = "drover_messages_delivered_total";
pub(crate) const TRANSIENT: &str = "drover_messages_transient_failures_total";
pub(crate) const BOUNCED: &str = "drover_messages_bounced_total";
pub(crate) const EXPIRED: &str = "drover_messages_expired_total";
/// Records of what came back: `AsyncBounce`, `Complaint`, `Unsubscribe` (extension).
pub(crate) const FEEDBACK: &str = "drover_feedback_records_total";
/// Closed accounting segments deleted, by reason: `retention`, `forced` (extension).
pub(crate) const SEGMENTS_DELETED: &str = "drover_accounting_segments_deleted_total";
/// Bytes of segments kept past retention for webhooks (extension).
pub(crate) const HELD_BYTES: &str = "drover_accounting_held_bytes";
/// Bytes of the whole accounting log on disk (extension).
pub(crate) const LOG_BYTES: &str = "drover_accounting_bytes";
/// The `category` of `drover_messages_bounced_total` that counts `AdminBounce` records.
pub(crate) const ADMIN_CATEGORY: &str = "admin";
/// Accounting segments closed, by reason: `size`, `age`, `outside` (extension).
pub(crate) const ROTATIONS: &str = "drover_accounting_rotations_total";

/// Registers the descriptions of the metrics this crate records.
pub fn describe_metrics() {
    metrics::describe_counter!(DELIVERED, "Messages accepted by a receiver.");
    metrics::describe_counter!(TRANSIENT, "Delivery attempts that failed temporarily.");
    metrics::describe_counter!(
        BOUNCED,
        "Messages that failed permanently, by bounce category."
    );
    metrics::describe_counter!(EXPIRED, "Messages that outlived retry.max_age.");
    metrics::describe_counter!(
        FEEDBACK,
        "Records of inbound reports and unsubscribes, by type (AsyncBounce, Complaint, Unsubscribe)."
    );
    metrics::describe_counter!(
        ROTATIONS,
        "Accounting segments closed, by reason (size, age, outside: renamed or truncated by another program)."
    );
    metrics::describe_counter!(
        SEGMENTS_DELETED,
        "Closed accounting segments deleted, by reason (retention; forced: a webhook had not sent them yet)."
    );
    metrics::describe_gauge!(
        HELD_BYTES,
        "Bytes of accounting segments due for deletion but kept for webhooks that have not sent them."
    );
    metrics::describe_gauge!(LOG_BYTES, "Bytes of the accounting log on disk.");
    // Series exist from the first scrape, so dashboards and rate() see a zero, not a gap.
    metrics::counter!(DELIVERED).increment(0);
    metrics::counter!(TRANSIENT).increment(0);
    metrics::counter!(SEGMENTS_DELETED, "reason" => "forced").increment(0);
    metrics::counter!(EXPIRED).increment(0);
    for category in BounceCategory::ALL {
        metrics::counter!(BOUNCED, "category" => category.as_str()).increment(0);
    }
    metrics::counter!(BOUNCED, "category" => ADMIN_CATEGORY).increment(0);
}

pub(crate) fn count(kind: RecordType, category: Option<BounceCategory>) {
    match kind {
        RecordType::Delivery => metrics::counter!(DELIVERED).increment(1),
        RecordType::TransientFailure => metrics::counter!(TRANSIENT).increment(1),
        RecordType::Bounce => {
            let category = category.unwrap_or_default();
            metrics::counter!(BOUNCED, "category" => category.as_str()).increment(1)
        }
        // An operator's purge is no receiver's verdict: apart from every real category.
        RecordType::AdminBounce => {
            metrics::counter!(BOUNCED, "category" => ADMIN_CATEGORY).increment(1)
        }
        RecordType::Expiration => metrics::counter!(EXPIRED).increment(1),
        RecordType::AsyncBounce => {
            metrics::counter!(FEEDBACK, "type" => "AsyncBounce").increment(1)
        }
        RecordType::Complaint => metrics::counter!(FEEDBACK, "type" => "Complaint").increment(1),
        RecordType::Unsubscribe => {
            metrics::counter!(FEEDBACK, "type" => "Unsubscribe").increment(1)
        }
        // Counted by the engine that moves them (`drover_drain_messages_total`).
        RecordType::Reception | RecordType::Transfer => {}
    }
}

//! The outcome counters of contract §5. They are counted where the records are written, so a
//! metric and the accounting file can never disagree.

use crate::{BounceCategory, RecordType};

pub(crate) const DELIVERED: &str = "drover_messages_delivered_total";
pub(crate) const TRANSIENT: &str = "drover_messages_transient_failures_total";
pub(crate) const BOUNCED: &str = "drover_messages_bounced_total";
pub(crate) const EXPIRED: &str = "drover_messages_expired_total";
/// Records of what came back: `AsyncBounce`, `Complaint`, `Unsubscribe` (extension).
pub(crate) const FEEDBACK: &str = "drover_feedback_records_total";

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
    // Series exist from the first scrape, so dashboards and rate() see a zero, not a gap.
    metrics::counter!(DELIVERED).increment(0);
    metrics::counter!(TRANSIENT).increment(0);
    metrics::counter!(EXPIRED).increment(0);
    for category in BounceCategory::ALL {
        metrics::counter!(BOUNCED, "category" => category.as_str()).increment(0);
    }
}

pub(crate) fn count(kind: RecordType, category: Option<BounceCategory>) {
    match kind {
        RecordType::Delivery => metrics::counter!(DELIVERED).increment(1),
        RecordType::TransientFailure => metrics::counter!(TRANSIENT).increment(1),
        RecordType::Bounce | RecordType::AdminBounce => {
            let category = category.unwrap_or_default();
            metrics::counter!(BOUNCED, "category" => category.as_str()).increment(1)
        }
        RecordType::Expiration => metrics::counter!(EXPIRED).increment(1),
        RecordType::AsyncBounce => {
            metrics::counter!(FEEDBACK, "type" => "AsyncBounce").increment(1)
        }
        RecordType::Complaint => metrics::counter!(FEEDBACK, "type" => "Complaint").increment(1),
        RecordType::Unsubscribe => {
            metrics::counter!(FEEDBACK, "type" => "Unsubscribe").increment(1)
        }
        RecordType::Reception => {}
    }
}

//! Accounting: one JSON object per event, appended to a JSON Lines file (contract §4), and the
//! bounce classifier that names why a message failed.
//!
//! Writes are group-committed: a dedicated thread drains every record queued while the previous
//! batch was being synced, writes them, calls `fdatasync` once and only then answers each caller.
//! The engine relies on that ordering: a message leaves the spool only after its final record is
//! on disk, so a crash can repeat a delivery but never lose its outcome.

mod classify;
mod csv;
mod metrics_names;
mod position;
mod reader;
mod retention;
mod segments;
mod writer;

pub use classify::{classify, BounceCategory, Classifier, ReplyFacts, DEFAULT_RULES};
pub use csv::{CsvFormat, DEFAULT_CSV_FIELDS};
pub use metrics_names::describe_metrics;
pub use position::Position;
pub use reader::{Line, Reader, Recorded};
pub use retention::{Pruned, Retention};
pub use writer::{Accounting, AccountingError, Rotation};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// What happened to a message (contract §4 `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecordType {
    /// The message was accepted and synced to the spool.
    Reception,
    /// A receiver accepted the message (final).
    Delivery,
    /// A delivery attempt failed temporarily; the message stays queued.
    TransientFailure,
    /// A receiver rejected the message permanently, or it could not be routed (final).
    Bounce,
    /// The message outlived `retry.max_age` (final).
    Expiration,
    /// An operator purged the message (final).
    AdminBounce,
    /// An inbound DSN reported a failure after delivery.
    AsyncBounce,
    /// An inbound ARF report (feedback loop).
    Complaint,
    /// A recipient unsubscribed: a one-click POST or an unsubscribe mail.
    Unsubscribe,
    /// The message moved to another Drover instance (`drover drain`), which synced it and
    /// wrote its `Reception`; final for this instance (Drover extension).
    Transfer,
}

impl RecordType {
    /// Whether this record ends the message's life in the queue.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RecordType::Delivery
                | RecordType::Bounce
                | RecordType::Expiration
                | RecordType::AdminBounce
                | RecordType::Transfer
        )
    }
}

/// The MX that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// MX host name (or the route's host).
    pub host: String,
    /// `ip:port` connected to.
    pub address: String,
}

/// The SMTP reply that decided a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Three-digit reply code.
    pub code: u16,
    /// RFC 3463 enhanced status code, when the reply had one (or one was synthesised).
    pub enhanced_code: Option<String>,
    /// Reply text without the code prefixes.
    pub text: String,
}

/// Where an inbound report came from and whether it was tied to a message (contract §4
/// `report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportInfo {
    /// Whether the report was tied to a message Drover sent.
    pub matched: bool,
    /// The MTA that wrote the report, when it said.
    pub reporting_mta: Option<String>,
    /// The Message-ID of the message the report is about, when it carried one.
    pub original_message_id: Option<String>,
    /// Drover's id of the inbound mail (a kept copy is named after it).
    pub inbound_id: Option<String>,
}

/// Where a message moved between Drover instances (`drover drain`): on the sender's
/// `Transfer` record the peer it went `to`, on the receiver's `Reception` the instance it came
/// `from` (Drover extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferInfo {
    /// The sending instance (its EHLO name), on the receiver's `Reception`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The peer's base URL, on the sender's `Transfer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// One accounting record (one line of the JSON Lines file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Event type.
    #[serde(rename = "type")]
    pub kind: RecordType,
    /// When the event happened (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    /// Queued message id.
    pub id: String,
    /// Envelope sender.
    pub sender: String,
    /// Envelope recipient.
    pub recipient: String,
    /// Recipient domain.
    pub domain: String,
    /// Campaign as injected.
    pub campaign: Option<String>,
    /// Tenant as injected.
    pub tenant: Option<String>,
    /// Destination (site) the message was queued for.
    pub site: Option<String>,
    /// The MX that answered.
    pub peer: Option<Peer>,
    /// Egress source used.
    pub source: Option<String>,
    /// The reply that decided this record.
    pub response: Option<Response>,
    /// Failure class, for failures.
    pub bounce_category: Option<BounceCategory>,
    /// 1 for the first delivery attempt; 0 for records before any attempt.
    pub attempt: u32,
    /// Milliseconds from reception to this event.
    pub queue_time_ms: u64,
    /// The recipient's `metadata` object from the inject request, or null.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Complaint and tracking headers of the message.
    pub headers: BTreeMap<String, String>,
    /// TLS protocol and cipher of the session, when it was encrypted (Drover extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// For `Complaint`: the ARF `Feedback-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<String>,
    /// For `AsyncBounce`, `Complaint`, `Unsubscribe`: the inbound report behind the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportInfo>,
    /// For `Transfer`, and a `Reception` by transfer: where the message moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferInfo>,
}

impl Record {
    /// A record of `kind` stamped now, with every optional field empty.
    pub fn new(kind: RecordType, id: impl Into<String>) -> Record {
        Record {
            kind,
            timestamp: OffsetDateTime::now_utc(),
            id: id.into(),
            sender: String::new(),
            recipient: String::new(),
            domain: String::new(),
            campaign: None,
            tenant: None,
            site: None,
            peer: None,
            source: None,
            response: None,
            bounce_category: None,
            attempt: 0,
            queue_time_ms: 0,
            metadata: None,
            headers: BTreeMap::new(),
            tls: None,
            feedback_type: None,
            report: None,
            transfer: None,
        }
    }
}

//! A queued message's identity and metadata.

use crate::QueueError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A queued message's id: a UUIDv7, so ids sort by creation time and spool keys stay local.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// A fresh id.
    pub fn generate() -> MessageId {
        MessageId(*uuid::Uuid::now_v7().as_bytes())
    }

    /// The 16 bytes used as spool key.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Reads an id from a 16-byte key.
    pub fn from_slice(bytes: &[u8]) -> Result<MessageId, QueueError> {
        <[u8; 16]>::try_from(bytes)
            .map(MessageId)
            .map_err(|_| QueueError::BadId(format!("{bytes:02x?}")))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<MessageId, QueueError> {
        uuid::Uuid::parse_str(s)
            .map(|u| MessageId(*u.as_bytes()))
            .map_err(|_| QueueError::BadId(s.to_owned()))
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MessageId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything about a queued message except its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// The message id.
    pub id: MessageId,
    /// Envelope sender ("" for the null reverse-path).
    pub sender: String,
    /// The one envelope recipient (each recipient is its own queued message).
    pub recipient: String,
    /// Recipient domain, lower-cased.
    pub domain: String,
    /// Campaign as injected.
    #[serde(default)]
    pub campaign: Option<String>,
    /// Tenant as injected.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Reception time, ms since the epoch.
    pub received_ms: u64,
    /// When the next attempt is due, ms since the epoch.
    pub due_ms: u64,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// Complaint and tracking headers, copied into accounting records.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The egress source of the last attempt: a greylisted retry goes out from the same one.
    #[serde(default)]
    pub last_source: Option<String>,
    /// Byte length of the body.
    #[serde(default)]
    pub size: u64,
    /// How urgent it is among its destination's waiting mail (contract §3 `priority`).
    #[serde(default, skip_serializing_if = "is_normal")]
    pub priority: crate::Priority,
    /// The recipient's `metadata` object from the inject request, copied into every record
    /// of the message (contract §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
    /// When it arrived on this instance by a transfer from another one (`drover drain`), ms
    /// since the epoch; `None` for a message injected here. Start-up repair of lost
    /// `Reception` records goes by this time rather than the original reception.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrived_ms: Option<u64>,
}

fn is_normal(p: &crate::Priority) -> bool {
    *p == crate::Priority::Normal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_time() {
        let a = MessageId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = MessageId::generate();
        assert!(a < b);
        let text = a.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<MessageId>().unwrap(), a);
        assert!("nope".parse::<MessageId>().is_err());
        assert_eq!(MessageId::from_slice(a.as_bytes()).unwrap(), a);
        assert!(MessageId::from_slice(&[1, 2, 3]).is_err());
    }
}

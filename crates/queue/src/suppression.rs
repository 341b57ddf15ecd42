//! The suppression list's entries (stored in the spool's `suppression` column family, see
//! [`crate::Spool::suppress`]): per tenant, addresses never to be mailed again.

use serde::{Deserialize, Serialize};

/// Which address of which tenant: the key of an entry. Addresses are kept lowercase (a
/// receiver treats `Jane@Example.com` and `jane@example.com` alike for suppression purposes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SuppressionKey {
    /// The tenant, or none for mail injected without one.
    pub tenant: Option<String>,
    /// The address, lowercase.
    pub address: String,
}

impl SuppressionKey {
    /// A key for `address` of `tenant` (the address is lowercased, the tenant kept as given).
    pub fn new(tenant: Option<&str>, address: &str) -> SuppressionKey {
        SuppressionKey {
            tenant: tenant.filter(|t| !t.is_empty()).map(str::to_owned),
            address: address.trim().to_lowercase(),
        }
    }

    /// The stored form: the tenant, a 0 byte, the address. Neither can hold a 0 byte.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let tenant = self.tenant.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(tenant.len() + 1 + self.address.len());
        out.extend_from_slice(tenant.as_bytes());
        out.push(0);
        out.extend_from_slice(self.address.as_bytes());
        out
    }

    /// The stored prefix of every entry of `tenant`.
    pub(crate) fn tenant_prefix(tenant: Option<&str>) -> Vec<u8> {
        let mut out = tenant.unwrap_or("").as_bytes().to_vec();
        out.push(0);
        out
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<SuppressionKey> {
        let split = bytes.iter().position(|b| *b == 0)?;
        let tenant = std::str::from_utf8(&bytes[..split]).ok()?;
        let address = std::str::from_utf8(&bytes[split + 1..]).ok()?;
        Some(SuppressionKey {
            tenant: (!tenant.is_empty()).then(|| tenant.to_owned()),
            address: address.to_owned(),
        })
    }
}

/// Why an address is suppressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    /// What put it there: `bounce`, `async-bounce`, `complaint`, `unsubscribe`, `admin`.
    pub source: String,
    /// Details: a bounce category, a feedback type, an operator's note.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The message that caused it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// What the spool remembers of a message after it is gone, so that a report arriving days
/// later (a DSN, a complaint) can be tied to its recipient, tenant and campaign
/// ([`crate::Spool::sent`]). Written with the message, kept for a retention period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// Envelope recipient.
    #[serde(rename = "r")]
    pub recipient: String,
    /// Tenant as injected.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Campaign as injected.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// The recipient's `metadata` as injected, so reports about the message carry it too.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_tenant() {
        for k in [
            SuppressionKey::new(Some("acme"), "Jane@Example.COM"),
            SuppressionKey::new(None, "a@b.c"),
            SuppressionKey::new(Some(""), "a@b.c"),
        ] {
            assert_eq!(SuppressionKey::from_bytes(&k.to_bytes()), Some(k.clone()));
            assert!(k
                .to_bytes()
                .starts_with(&SuppressionKey::tenant_prefix(k.tenant.as_deref())));
        }
        assert_eq!(
            SuppressionKey::new(Some("acme"), " Jane@Example.COM ").address,
            "jane@example.com"
        );
        assert_eq!(SuppressionKey::new(Some(""), "x@y").tenant, None);
    }
}

//! The pure part of sending: which records go, and the bytes and headers of a batch.

use crate::SourceRecord;
use accounting::Position;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::borrow::Cow;
use time::OffsetDateTime;

/// The fields of a record that decide whether and when it goes; the rest is passed through
/// untouched.
#[derive(Debug, Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    tenant: Option<Cow<'a, str>>,
    #[serde(with = "time::serde::rfc3339")]
    timestamp: OffsetDateTime,
}

/// What the filter made of one line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Goes to the endpoint; the record's timestamp (for the lag).
    Send(OffsetDateTime),
    /// Not one of the configured types or tenants.
    Skip,
    /// Not a record (no `type`, `timestamp` or not JSON): skipped, and worth a warning.
    Unparsable(String),
}

/// The `types` and `tenants` of a webhook.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    types: Vec<String>,
    tenants: Vec<String>,
}

impl Filter {
    pub(crate) fn new(types: &[String], tenants: &[String]) -> Filter {
        Filter {
            types: types.to_vec(),
            tenants: tenants.to_vec(),
        }
    }

    pub(crate) fn judge(&self, line: &str) -> Verdict {
        let head: Head<'_> = match serde_json::from_str(line) {
            Ok(head) => head,
            Err(e) => return Verdict::Unparsable(e.to_string()),
        };
        let type_ok = self.types.is_empty() || self.types.iter().any(|t| *t == head.kind);
        let tenant_ok = self.tenants.is_empty()
            || head
                .tenant
                .is_some_and(|tenant| self.tenants.iter().any(|t| *t == tenant));
        if type_ok && tenant_ok {
            Verdict::Send(head.timestamp)
        } else {
            Verdict::Skip
        }
    }
}

/// A record chosen for the endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) record: SourceRecord,
    pub(crate) timestamp: OffsetDateTime,
}

/// Where a record starts: its end less the line and its newline. A function of the record
/// alone, so the same record yields the same batch id whatever position a run started from.
pub(crate) fn record_start(record: &SourceRecord) -> Position {
    let len = record.line.len() as u64 + 1;
    Position::new(record.end.segment, record.end.offset.saturating_sub(len))
}

/// `X-Drover-Batch-Id`: `<segment>-<offset>` of the batch's first record.
pub(crate) fn batch_id(first: &SourceRecord) -> String {
    let start = record_start(first);
    format!("{}-{}", start.segment, start.offset)
}

/// The request body: the lines as they are in the log, joined into a JSON array.
pub(crate) fn body(records: &[Held]) -> Bytes {
    let len: usize = records.iter().map(|h| h.record.line.len() + 1).sum();
    let mut out = Vec::with_capacity(len + 2);
    out.push(b'[');
    for (i, held) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(held.record.line.as_bytes());
    }
    out.push(b']');
    Bytes::from(out)
}

/// `sha256=<lowercase hex HMAC-SHA256 of body>`.
pub(crate) fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: &str, tenant: Option<&str>) -> String {
        serde_json::json!({
            "type": kind,
            "timestamp": "2025-03-01T10:00:00Z",
            "id": "m1",
            "tenant": tenant,
        })
        .to_string()
    }

    #[test]
    fn filter_by_type_and_tenant() {
        let all = Filter::new(&[], &[]);
        assert!(matches!(
            all.judge(&line("Delivery", None)),
            Verdict::Send(_)
        ));
        assert!(matches!(
            all.judge(&line("SomethingNew", None)),
            Verdict::Send(_)
        ));

        let some = Filter::new(&["Delivery".into(), "Bounce".into()], &["acme".into()]);
        assert!(matches!(
            some.judge(&line("Delivery", Some("acme"))),
            Verdict::Send(_)
        ));
        assert_eq!(some.judge(&line("Delivery", Some("other"))), Verdict::Skip);
        assert_eq!(some.judge(&line("Delivery", None)), Verdict::Skip);
        assert_eq!(some.judge(&line("Reception", Some("acme"))), Verdict::Skip);
    }

    #[test]
    fn escaped_strings_still_match() {
        let f = Filter::new(&["Delivery".into()], &["a\"b".into()]);
        let l = r#"{"type":"Deliv\u0065ry","tenant":"a\"b","timestamp":"2025-03-01T10:00:00Z"}"#;
        assert!(matches!(f.judge(l), Verdict::Send(_)));
    }

    #[test]
    fn lines_that_are_not_records_are_unparsable() {
        let f = Filter::new(&[], &[]);
        for bad in [
            "",
            "not json",
            r#"{"timestamp":"2025-03-01T10:00:00Z"}"#,
            r#"{"type":"Delivery"}"#,
            r#"{"type":"Delivery","timestamp":"yesterday"}"#,
            r#"{"type":"Delivery","timestamp":"2025-03-01T10:00:00Z""#,
        ] {
            assert!(matches!(f.judge(bad), Verdict::Unparsable(_)), "{bad:?}");
        }
    }

    #[test]
    fn timestamp_is_kept_for_the_lag() {
        let f = Filter::new(&[], &[]);
        let Verdict::Send(t) = f.judge(&line("Delivery", None)) else {
            panic!("sent");
        };
        assert_eq!(t.unix_timestamp(), 1_740_823_200);
    }

    fn held(line: &str, end: Position) -> Held {
        Held {
            record: SourceRecord {
                end,
                line: line.to_string(),
            },
            timestamp: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn body_joins_raw_lines_without_reserialising() {
        // Key order and spacing survive: the receiver sees the bytes of the log.
        let a = r#"{"b":1, "a":2}"#;
        let b = r#"{"x":"\u00e9"}"#;
        let out = body(&[held(a, Position::new(0, 15)), held(b, Position::new(0, 30))]);
        assert_eq!(&out[..], format!("[{a},{b}]").as_bytes());
        assert_eq!(&body(&[])[..], b"[]");
        let parsed: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(parsed.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn batch_id_is_the_first_records_start() {
        let r = SourceRecord {
            end: Position::new(3, 110),
            line: "x".repeat(9),
        };
        assert_eq!(record_start(&r), Position::new(3, 100));
        assert_eq!(batch_id(&r), "3-100");
        let first_of_segment = SourceRecord {
            end: Position::new(4, 10),
            line: "x".repeat(9),
        };
        assert_eq!(batch_id(&first_of_segment), "4-0");
    }

    #[test]
    fn signature_matches_rfc4231_case_2() {
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! KumoMTA's supplemental trace header (`X-KumoRef` by default): base64 of a JSON object with
//! a marker key, the recipient and chosen metadata, so that a complaint or bounce quoting the
//! original headers can be tied back to the mailing. It is not signed: a reader treats what it
//! finds as a hint to confirm against its own records, never as proof.

use data_encoding::BASE64;
use serde_json::{Map, Value};

/// The header name KumoMTA uses unless told otherwise.
pub const DEFAULT_HEADER: &str = "X-KumoRef";
/// The key whose presence marks a payload as a trace reference.
pub const MARKER_KEY: &str = "_@_";
/// The marker's value, as KumoMTA writes it.
pub const MARKER_VALUE: &str = "\\_/";
/// Drover's addition to the payload: the id of the queued message.
pub const ID_KEY: &str = "id";
/// Payloads larger than this are not decoded (a header is never that large honestly).
const MAX_ENCODED: usize = 64 * 1024;
/// Base64 text is folded into lines of this many characters, so the header never exceeds
/// RFC 5322's line length whatever metadata it carries.
const LINE: usize = 76;

/// What a trace header says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TraceRef {
    /// The recipient of the original message.
    pub recipient: Option<String>,
    /// Drover's message id, when Drover wrote the header.
    pub id: Option<String>,
    /// The other fields (the metadata named when it was written).
    pub meta: Map<String, Value>,
}

/// Fields a message has at most once or whose meaning a trace header must not take over.
const RESERVED: &[&str] = &[
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "received",
    "return-path",
    "mime-version",
    "dkim-signature",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
];

/// Whether `name` can be a supplemental header's name: a field name (printable ASCII without a
/// colon) that is not one of the message's own fields. Only `X-` fields are read back, as
/// KumoMTA does.
pub fn valid_header_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !RESERVED.contains(&lower.as_str())
        && !lower.starts_with("content-")
}

/// The payload JSON for `recipient`, `id` and `meta` (keys that would shadow the marker, the
/// recipient or the id are left out).
fn payload(recipient: &str, id: Option<&str>, meta: &Map<String, Value>) -> Vec<u8> {
    let mut object = Map::new();
    object.insert(MARKER_KEY.into(), Value::String(MARKER_VALUE.into()));
    object.insert("recipient".into(), Value::String(recipient.into()));
    if let Some(id) = id {
        object.insert(ID_KEY.into(), Value::String(id.into()));
    }
    for (k, v) in meta {
        if k != MARKER_KEY && k != "recipient" && k != ID_KEY {
            object.insert(k.clone(), v.clone());
        }
    }
    Value::Object(object).to_string().into_bytes()
}

/// The whole header field, `name: base64` folded at 76 characters, ending in CRLF.
pub fn header(name: &str, recipient: &str, id: Option<&str>, meta: &Map<String, Value>) -> String {
    let encoded = BASE64.encode(&payload(recipient, id, meta));
    let mut out = String::with_capacity(name.len() + encoded.len() + encoded.len() / LINE * 3 + 4);
    out.push_str(name);
    out.push_str(": ");
    // The first line also holds the name. Base64 is ASCII, so byte offsets are characters.
    let first = LINE
        .saturating_sub(name.len() + 2)
        .max(16)
        .min(encoded.len());
    let (head, rest) = encoded.split_at(first);
    out.push_str(head);
    for chunk in rest.as_bytes().chunks(LINE) {
        out.push_str("\r\n\t");
        out.extend(chunk.iter().map(|&b| char::from(b)));
    }
    out.push_str("\r\n");
    out
}

/// Reads a header value (unfolded or not). `None` unless it is base64 of a JSON object that
/// carries the marker key.
pub fn decode(value: &str) -> Option<TraceRef> {
    if value.len() > MAX_ENCODED {
        return None;
    }
    let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    // Some writers leave the padding out.
    let padded = match compact.len() % 4 {
        0 => compact,
        2 => compact + "==",
        3 => compact + "=",
        _ => return None,
    };
    let bytes = BASE64.decode(padded.as_bytes()).ok()?;
    let Value::Object(mut object) = serde_json::from_slice(&bytes).ok()? else {
        return None;
    };
    object.remove(MARKER_KEY)?;
    let take = |object: &mut Map<String, Value>, key: &str| match object.remove(key) {
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            object.insert(key.into(), other);
            None
        }
        None => None,
    };
    let recipient = take(&mut object, "recipient");
    let id = take(&mut object, ID_KEY);
    Some(TraceRef {
        recipient,
        id,
        meta: object,
    })
}

/// The first `X-` field among `headers` (name, unfolded value) that is a trace reference.
pub fn find<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<TraceRef> {
    headers
        .into_iter()
        .filter(|(name, _)| name.len() > 2 && name.as_bytes()[..2].eq_ignore_ascii_case(b"x-"))
        .find_map(|(_, value)| decode(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_kumomtas_documented_example() {
        // The example header and payload of KumoMTA's `trace_headers` documentation.
        let r = decode("eyJfQF8iOiJcXF8vIiwicmVjaXBpZW50IjoidGVzdEBleGFtcGxlLmNvbSJ9").unwrap();
        assert_eq!(r.recipient.as_deref(), Some("test@example.com"));
        assert_eq!(r.id, None);
        assert!(r.meta.is_empty());
    }

    #[test]
    fn writes_what_kumomta_writes_and_reads_it_back() {
        let h = header(DEFAULT_HEADER, "test@example.com", None, &Map::new());
        assert_eq!(
            h,
            "X-KumoRef: eyJfQF8iOiJcXF8vIiwicmVjaXBpZW50IjoidGVzdEBleGFtcGxlLmNvbSJ9\r\n"
        );
        let mut meta = Map::new();
        meta.insert("tenant".into(), Value::String("acme".into()));
        meta.insert("recipient".into(), Value::String("forged@example".into()));
        meta.insert(
            "list".into(),
            serde_json::json!({"n": 1, "long": "x".repeat(300)}),
        );
        let h = header("X-Ref", "ann@example.test", Some("0193-id"), &meta);
        assert!(h.lines().all(|l| l.trim_end().len() <= 78), "{h}");
        let value = h.strip_prefix("X-Ref: ").unwrap();
        let r = decode(value).unwrap();
        assert_eq!(r.recipient.as_deref(), Some("ann@example.test"));
        assert_eq!(r.id.as_deref(), Some("0193-id"));
        assert_eq!(r.meta["tenant"], "acme");
        assert_eq!(r.meta["list"]["n"], 1);
        assert!(!r.meta.contains_key("recipient"));
    }

    #[test]
    fn only_marked_x_headers_are_read() {
        let unmarked = BASE64.encode(br#"{"recipient":"a@b.c"}"#);
        assert_eq!(decode(&unmarked), None);
        assert_eq!(decode("not base64 at all!"), None);
        assert_eq!(decode(&BASE64.encode(b"[1,2]")), None);
        let marked = "eyJfQF8iOiJcXF8vIiwicmVjaXBpZW50IjoidGVzdEBleGFtcGxlLmNvbSJ9";
        assert_eq!(find([("Subject", marked)]), None);
        assert!(find([("Subject", "hi"), ("X-Other", marked)]).is_some());
        assert!(valid_header_name("X-KumoRef"));
        assert!(!valid_header_name("Subject"));
        assert!(valid_header_name("string"));
        assert!(!valid_header_name("X-Bad: name"));
        assert!(!valid_header_name("Content-Type"));
        assert!(!valid_header_name(""));
    }

    proptest! {
        #[test]
        fn any_recipient_and_meta_round_trip(
            rcpt in "[ -~]{0,60}",
            id in proptest::option::of("[0-9a-f-]{0,36}"),
            k in "[a-z]{1,10}",
            v in "\\PC{0,80}",
        ) {
            let mut meta = Map::new();
            meta.insert(k.clone(), Value::String(v.clone()));
            let h = header(DEFAULT_HEADER, &rcpt, id.as_deref(), &meta);
            let r = decode(h.strip_prefix("X-KumoRef: ").unwrap()).unwrap();
            prop_assert_eq!(r.recipient, Some(rcpt));
            prop_assert_eq!(r.id, id);
            if k != "recipient" && k != "id" {
                prop_assert_eq!(&r.meta[&k], &Value::String(v));
            }
        }

        #[test]
        fn decoding_junk_never_panics(s in "\\PC{0,200}") {
            let _ = decode(&s);
        }
    }
}

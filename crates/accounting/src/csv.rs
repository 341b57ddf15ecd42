//! PowerMTA-style CSV accounting: the same records as the JSON Lines log, as RFC 4180 CSV lines
//! with a header, for operators whose tooling reads `acct-*.csv`.
//!
//! Fields are named as PowerMTA names them (`type`, `timeLogged`, `orig`, `rcpt`, `dsnStatus`,
//! `dsnDiag`, `bounceCat`, ...), or by a path into the JSON record (`id`, `tenant`,
//! `response.code`, `headers.Feedback-ID`). Pure: the writer thread calls it.

use serde_json::Value;

/// The fields written when none are configured.
pub const DEFAULT_CSV_FIELDS: &[&str] = &[
    "type",
    "timeLogged",
    "timeQueued",
    "orig",
    "rcpt",
    "dsnAction",
    "dsnStatus",
    "dsnDiag",
    "dsnMta",
    "bounceCat",
    "dlvSourceIp",
    "dlvDestinationIp",
    "jobId",
    "tenant",
    "id",
];

/// PowerMTA's names for the fields it has in common with Drover's records.
const NAMED: &[&str] = &[
    "type",
    "timeLogged",
    "timeQueued",
    "orig",
    "rcpt",
    "domain",
    "dsnAction",
    "dsnStatus",
    "dsnDiag",
    "dsnMta",
    "bounceCat",
    "dlvSourceIp",
    "dlvDestinationIp",
    "dlvType",
    "jobId",
    "vmta",
    "feedbackType",
];

/// The top-level keys of a record (contract §4 and Drover's extensions).
const RECORD_KEYS: &[&str] = &[
    "type",
    "timestamp",
    "id",
    "sender",
    "recipient",
    "domain",
    "campaign",
    "tenant",
    "site",
    "peer",
    "source",
    "response",
    "bounce_category",
    "attempt",
    "queue_time_ms",
    "headers",
    "tls",
    "feedback_type",
    "report",
    "metadata",
];

/// A CSV layout: the fields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvFormat {
    fields: Vec<String>,
}

impl CsvFormat {
    /// A layout of `fields` (PowerMTA names or record paths); empty = [`DEFAULT_CSV_FIELDS`].
    /// An unknown name is an error naming it.
    pub fn new(fields: &[String]) -> Result<CsvFormat, String> {
        let fields: Vec<String> = if fields.is_empty() {
            DEFAULT_CSV_FIELDS.iter().map(|s| (*s).to_owned()).collect()
        } else {
            fields.to_vec()
        };
        for f in &fields {
            let top = f.split('.').next().unwrap_or_default();
            if !NAMED.contains(&f.as_str()) && !RECORD_KEYS.contains(&top) {
                return Err(format!(
                    "unknown accounting CSV field {f:?} (PowerMTA names such as timeLogged, orig, rcpt, dsnStatus, dsnDiag, bounceCat, or a record path such as response.code or headers.Feedback-ID)"
                ));
            }
        }
        Ok(CsvFormat { fields })
    }

    /// The header line (without the line end).
    pub fn header(&self) -> String {
        self.fields
            .iter()
            .map(|f| quote(f))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One record as a CSV line (without the line end); `None` when the line is not a JSON
    /// object.
    pub fn line(&self, json: &str) -> Option<String> {
        let record: Value = serde_json::from_str(json).ok()?;
        record.as_object()?;
        Some(
            self.fields
                .iter()
                .map(|f| quote(&field(&record, f)))
                .collect::<Vec<_>>()
                .join(","),
        )
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn path<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = record;
    for part in path.split('.') {
        at = at.get(part)?;
    }
    Some(at)
}

fn get(record: &Value, p: &str) -> String {
    path(record, p).map(text).unwrap_or_default()
}

fn ip_of(address: &str) -> String {
    address
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| address.to_owned())
}

fn field(record: &Value, name: &str) -> String {
    let kind = get(record, "type");
    match name {
        // PowerMTA record types: d delivered, b bounced, t transient, r received, rb remote
        // (asynchronous) bounce, f feedback loop.
        "type" => match kind.as_str() {
            "Delivery" => "d",
            "Bounce" | "Expiration" | "AdminBounce" => "b",
            "TransientFailure" => "t",
            "Reception" => "r",
            "AsyncBounce" => "rb",
            "Complaint" | "Unsubscribe" => "f",
            _ => "",
        }
        .to_owned(),
        "timeLogged" => get(record, "timestamp"),
        "timeQueued" => time_queued(record).unwrap_or_default(),
        "orig" => get(record, "sender"),
        "rcpt" => get(record, "recipient"),
        "dsnAction" => match kind.as_str() {
            "Delivery" => "relayed",
            "TransientFailure" => "delayed",
            "Bounce" | "Expiration" | "AdminBounce" | "AsyncBounce" => "failed",
            _ => "",
        }
        .to_owned(),
        "dsnStatus" => {
            let code = get(record, "response.enhanced_code");
            if code.is_empty() {
                String::new()
            } else {
                let meaning = match code.chars().next() {
                    Some('2') => "success",
                    Some('4') => "transient failure",
                    Some('5') => "permanent failure",
                    _ => "",
                };
                format!("{code} ({meaning})")
            }
        }
        "dsnDiag" => match path(record, "response.code") {
            Some(Value::Number(code)) => format!("smtp;{code} {}", get(record, "response.text")),
            _ => String::new(),
        },
        "dsnMta" => {
            let host = get(record, "peer.host");
            if host.is_empty() {
                host
            } else {
                format!("{host} ({})", ip_of(&get(record, "peer.address")))
            }
        }
        "bounceCat" => get(record, "bounce_category"),
        "dlvSourceIp" => get(record, "source"),
        "dlvDestinationIp" => ip_of(&get(record, "peer.address")),
        "dlvType" => {
            if get(record, "tls").is_empty() {
                "smtp".to_owned()
            } else {
                "esmtp+tls".to_owned()
            }
        }
        "jobId" => get(record, "campaign"),
        "vmta" => get(record, "site"),
        "feedbackType" => get(record, "feedback_type"),
        other => get(record, other),
    }
}

fn time_queued(record: &Value) -> Option<String> {
    let logged = time::OffsetDateTime::parse(
        record.get("timestamp")?.as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    let queued_ms = record.get("queue_time_ms")?.as_u64()?;
    let queued = logged - time::Duration::milliseconds(i64::try_from(queued_ms).ok()?);
    queued
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// RFC 4180: quoted when it holds a comma, a quote or a line break; quotes doubled.
fn quote(value: &str) -> String {
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNCE: &str = r#"{"type":"Bounce","timestamp":"2026-11-29T10:00:05Z","id":"0193","sender":"b@news.example","recipient":"ann@example.test","domain":"example.test","campaign":"spring, 2026","tenant":"acme","site":"mx.example.test","peer":{"host":"mx1.example.test","address":"192.0.2.7:25"},"source":"198.51.100.2","response":{"code":550,"enhanced_code":"5.1.1","text":"user \"ann\" unknown"},"bounce_category":"bad-mailbox","attempt":1,"queue_time_ms":5000,"headers":{"Feedback-ID":"a:b:c"},"metadata":null}"#;

    #[test]
    fn a_bounce_in_powermta_fields() {
        let csv = CsvFormat::new(&[]).unwrap();
        assert_eq!(
            csv.header(),
            "type,timeLogged,timeQueued,orig,rcpt,dsnAction,dsnStatus,dsnDiag,dsnMta,bounceCat,dlvSourceIp,dlvDestinationIp,jobId,tenant,id"
        );
        assert_eq!(
            csv.line(BOUNCE).unwrap(),
            "b,2026-11-29T10:00:05Z,2026-11-29T10:00:00Z,b@news.example,ann@example.test,failed,5.1.1 (permanent failure),\"smtp;550 user \"\"ann\"\" unknown\",mx1.example.test (192.0.2.7),bad-mailbox,198.51.100.2,192.0.2.7,\"spring, 2026\",acme,0193"
        );
    }

    #[test]
    fn record_paths_and_unknown_fields() {
        let fields: Vec<String> = ["id", "response.code", "headers.Feedback-ID", "metadata"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let csv = CsvFormat::new(&fields).unwrap();
        assert_eq!(csv.line(BOUNCE).unwrap(), "0193,550,a:b:c,");
        assert!(CsvFormat::new(&["nonsense".to_owned()]).is_err());
        assert!(csv.line("not json").is_none());
    }
}

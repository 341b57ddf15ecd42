//! One preparation for every message, whichever door it came in by (the HTTP API or the SMTP
//! listener), in one order: a `Received:` trace header first, then `Message-ID` and `Date`
//! when the message has none; `drover::stamping` (the feedback loop's headers) and DKIM
//! signing follow in `inject`. Pure: the caller passes the time and the host name.

use crate::message::NewMessage;
use std::net::IpAddr;

/// Where a message came in, as its `Received:` header tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Door {
    /// `POST /api/inject/v1`.
    Http {
        /// The client's address, when the server knows it.
        client: Option<IpAddr>,
    },
    /// The SMTP listener.
    Smtp {
        /// What the client said in HELO/EHLO.
        helo: String,
        /// The client's address.
        client: IpAddr,
        /// Its reverse DNS name, when looked up.
        rdns: Option<String>,
        /// `ESMTP`, `ESMTPS` (TLS), `ESMTPA` (AUTH) or `ESMTPSA` (both): RFC 3848.
        protocol: &'static str,
    },
}

impl Door {
    /// The `Received:` header (with its CRLF) for message `id` to `rcpt`, received by `by`
    /// at `date` (RFC 5322 date-time), in the usual form:
    /// `from HELO (rDNS [ip]) by host (Drover) with PROTOCOL id ID for <rcpt>; date`.
    pub fn received(&self, by: &str, id: &str, rcpt: &str, date: &str) -> String {
        let from = match self {
            Door::Http { client } => {
                let ip =
                    client.map_or_else(|| "unknown".to_owned(), |ip| ip.to_canonical().to_string());
                format!("api-client ([{ip}])")
            }
            Door::Smtp {
                helo, client, rdns, ..
            } => format!(
                "{} ({} [{}])",
                one_word(helo),
                rdns.as_deref().map_or("unknown", one_word),
                client.to_canonical()
            ),
        };
        let protocol = match self {
            Door::Http { .. } => "HTTP",
            Door::Smtp { protocol, .. } => protocol,
        };
        format!(
            "Received: from {from}\r\n\tby {by} (Drover) with {protocol} id {id}\r\n\tfor <{rcpt}>; {date}\r\n",
            by = one_word(by),
            rcpt = rcpt.replace(['\r', '\n', '<', '>'], "")
        )
    }
}

/// A client-given word fit for a header: no line breaks, no spaces, not empty.
fn one_word(s: &str) -> &str {
    let s = s.trim();
    if s.is_empty() || s.contains(|c: char| c.is_control() || c.is_whitespace()) {
        "unknown"
    } else {
        s
    }
}

/// Prepares one message: the `Received:` header of `door` prepended (none without a door:
/// a request that asked for none), then `Message-ID` (`<id@domain>`, the domain of the
/// envelope sender, else `by`) and `Date` added at the end of the header section when absent.
pub fn prepare(message: &mut NewMessage, door: Option<&Door>, by: &str, date: &str) {
    let id = message.meta.id.to_string();
    let received = door
        .map(|d| d.received(by, &id, &message.meta.recipient, date))
        .unwrap_or_default();
    let (has_id, has_date, header_end) = scan_headers(&message.body);
    let mut missing = String::new();
    if !has_id {
        let domain = message.meta.sender.rsplit_once('@').map_or(by, |(_, d)| d);
        missing.push_str(&format!("Message-ID: <{id}@{}>\r\n", one_word(domain)));
    }
    if !has_date {
        missing.push_str(&format!("Date: {date}\r\n"));
    }
    if !missing.is_empty() && header_end > 0 && message.body[header_end - 1] != b'\n' {
        // A header section that ends without a line end (no body at all).
        missing.insert_str(0, "\r\n");
    }
    let mut body = Vec::with_capacity(received.len() + missing.len() + message.body.len());
    body.extend_from_slice(received.as_bytes());
    body.extend_from_slice(&message.body[..header_end]);
    body.extend_from_slice(missing.as_bytes());
    body.extend_from_slice(&message.body[header_end..]);
    message.meta.size = body.len() as u64;
    message.body = body;
}

/// Whether the header section has a `Message-ID` and a `Date`, and where it ends (the
/// offset of the empty line, or of the end when there is none: missing headers go there).
fn scan_headers(body: &[u8]) -> (bool, bool, usize) {
    let (mut has_id, mut has_date) = (false, false);
    let mut at = 0;
    while at < body.len() {
        let end = memchr::memchr(b'\n', &body[at..]).map_or(body.len(), |i| at + i + 1);
        let line = &body[at..end];
        if line == b"\r\n" || line == b"\n" {
            return (has_id, has_date, at);
        }
        if !line.starts_with(b" ") && !line.starts_with(b"\t") {
            let name = line.split(|b| *b == b':').next().unwrap_or_default();
            has_id |= name.trim_ascii().eq_ignore_ascii_case(b"message-id");
            has_date |= name.trim_ascii().eq_ignore_ascii_case(b"date");
        }
        at = end;
    }
    // No empty line: all of it is header; the missing ones go after a line end.
    (has_id, has_date, body.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Origin;
    use queue::MessageId;

    fn message(body: &str) -> NewMessage {
        let origin = Origin {
            sender: "bounces@news.example.com".into(),
            campaign: None,
            tenant: None,
            received_ms: 0,
            priority: Default::default(),
            door: None,
            supplemental: None,
        };
        NewMessage::new(
            MessageId::generate(),
            &origin,
            "ann@example.test".into(),
            "example.test".into(),
            body.as_bytes().to_vec(),
        )
    }

    const DATE: &str = "Sun, 29 Nov 2026 10:00:00 +0000";

    #[test]
    fn smtp_mail_gets_received_message_id_and_date_in_that_order() {
        let mut m = message("From: a@news.example.com\r\nSubject: hi\r\n\r\nbody\r\n");
        let door = Door::Smtp {
            helo: "client.example".into(),
            client: "192.0.2.7".parse().unwrap(),
            rdns: None,
            protocol: "ESMTPSA",
        };
        prepare(&mut m, Some(&door), "mx.drover.test", DATE);
        let text = String::from_utf8(m.body.clone()).unwrap();
        let id = m.meta.id.to_string();
        assert_eq!(
            text,
            format!(
                "Received: from client.example (unknown [192.0.2.7])\r\n\tby mx.drover.test (Drover) with ESMTPSA id {id}\r\n\tfor <ann@example.test>; {DATE}\r\n\
                 From: a@news.example.com\r\nSubject: hi\r\nMessage-ID: <{id}@news.example.com>\r\nDate: {DATE}\r\n\r\nbody\r\n"
            )
        );
        assert_eq!(m.meta.size, text.len() as u64);
    }

    #[test]
    fn present_headers_are_kept_and_http_says_so() {
        let mut m = message(
            "message-id: <x@y>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n\r\nb\r\n",
        );
        prepare(
            &mut m,
            Some(&Door::Http {
                client: Some("::ffff:127.0.0.1".parse().unwrap()),
            }),
            "mx.drover.test",
            DATE,
        );
        let text = String::from_utf8(m.body).unwrap();
        assert!(text.starts_with("Received: from api-client ([127.0.0.1])\r\n\tby mx.drover.test (Drover) with HTTP id "), "{text}");
        let count = |name: &str| {
            text.lines()
                .filter(|l| l.to_ascii_lowercase().starts_with(name))
                .count()
        };
        assert_eq!(count("message-id:"), 1);
        assert_eq!(count("date:"), 1);
        assert!(text.ends_with("Subject: s\r\n\r\nb\r\n"));
    }

    #[test]
    fn without_a_door_there_is_no_trace_header_but_the_headers_are_completed() {
        let mut m = message("Subject: s\r\n\r\nb\r\n");
        prepare(&mut m, None, "mx.drover.test", DATE);
        let text = String::from_utf8(m.body).unwrap();
        assert!(text.starts_with("Subject: s\r\nMessage-ID: <"), "{text}");
        assert!(
            text.contains(&format!("\r\nDate: {DATE}\r\n\r\nb\r\n")),
            "{text}"
        );
    }

    #[test]
    fn hostile_helo_and_headerless_messages() {
        let mut m = message("just a line without a header section");
        let door = Door::Smtp {
            helo: "evil\r\nBcc: x@x.test".into(),
            client: "192.0.2.7".parse().unwrap(),
            rdns: Some("host .example".into()),
            protocol: "ESMTP",
        };
        prepare(&mut m, Some(&door), "mx.drover.test", DATE);
        let text = String::from_utf8(m.body).unwrap();
        assert!(
            text.starts_with("Received: from unknown (unknown [192.0.2.7])"),
            "{text}"
        );
        assert!(!text.contains("Bcc"));
        assert!(text.contains("Message-ID: <"));
    }
}

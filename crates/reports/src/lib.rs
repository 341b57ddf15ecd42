//! Sans-IO parsing of the mail that comes back to a bulk mailer's bounce domains: RFC 3464
//! delivery status notifications, the text bounces MTAs still send, RFC 5965 (ARF)
//! complaint reports, auto-replies and unsubscribe mail. Bytes in, a [`Report`] out.
//!
//! The engine matches a report to its message (VERP address, returned `Message-ID`,
//! envelope id) and records what it says; this crate only reads. [`parse`] never fails and
//! never panics: what it cannot read it leaves empty, and the kind falls back to
//! [`Kind::Unknown`].
//!
//! MIME structure and decoding (transfer encodings, charsets, encoded words) come from
//! mail-parser; the field blocks of `message/delivery-status` and `message/feedback-report`
//! bodies and the header sections of returned messages are read here, since mail-parser
//! treats the former as opaque bytes and renames fields in the latter.

mod codes;
mod dsn;
mod fields;
mod text;

use std::borrow::Cow;

use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};

/// The most of a message that is read: reports are small, and a hostile peer must not make
/// parsing slow or large. Longer input is cut (the cut parts are simply not there).
pub const MAX_INPUT: usize = 1024 * 1024;

/// The most recipients one report yields.
pub const MAX_RECIPIENTS: usize = 1000;

/// The most header fields kept from a returned message.
const MAX_RETURNED_HEADERS: usize = 1000;

/// What kind of mail it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// An RFC 3464 (or RFC 6533) delivery status notification.
    Dsn,
    /// A non-delivery or delay notice without a delivery-status part.
    TextBounce,
    /// An RFC 5965 feedback (complaint) report.
    Arf,
    /// An automatic reply (vacation, out of office), RFC 3834 or by its marks.
    AutoReply,
    /// A plain message asking to unsubscribe (a hint: the engine also goes by the address
    /// it was sent to).
    Unsubscribe,
    /// None of the above.
    Unknown,
}

/// RFC 3464 Action (or what a text bounce implies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Delivery failed for good.
    Failed,
    /// Delivery is still being tried.
    Delayed,
    /// Delivered (a success DSN).
    Delivered,
    /// Relayed to a system that sends no DSNs.
    Relayed,
    /// Delivered and forwarded to more recipients.
    Expanded,
    /// Not stated, or not understood.
    Unknown,
}

/// What a report says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecipientStatus {
    /// `Final-Recipient`, address only (`rfc822;` and `<>` stripped); for a text bounce the
    /// address found in the text, `None` when the text names none.
    pub final_recipient: Option<String>,
    /// `Original-Recipient`, likewise.
    pub original_recipient: Option<String>,
    /// `Action`; when the report gives none, what its status class implies.
    pub action: Action,
    /// Enhanced status code (`5.1.1`), validated; from `Status`, else the first one in the
    /// diagnostic; for a text bounce the first in its text, else `5.0.0`/`4.0.0` from a
    /// 5xx/4xx reply code.
    pub status: Option<String>,
    /// `Diagnostic-Code` text (`smtp;` stripped, unfolded), or the reply or reason line(s)
    /// of a text bounce.
    pub diagnostic: Option<String>,
    /// `Remote-MTA` (`dns;` stripped).
    pub remote_mta: Option<String>,
}

/// What one message that came back says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// What kind of mail it is.
    pub kind: Kind,
    /// The report's own From address.
    pub from: Option<String>,
    /// The report's own Subject (encoded words decoded).
    pub subject: Option<String>,
    /// DSN or ARF `Reporting-MTA`, `dns;` stripped.
    pub reporting_mta: Option<String>,
    /// DSN `Original-Envelope-Id`, xtext-decoded (RFC 3461 §4).
    pub original_envelope_id: Option<String>,
    /// DSN per-recipient fields (at most [`MAX_RECIPIENTS`]); for a text bounce what was
    /// found in the text; empty for the other kinds.
    pub recipients: Vec<RecipientStatus>,
    /// ARF `Feedback-Type`, lowercased (abuse, fraud, virus, not-spam, opt-out,
    /// auth-failure, other).
    pub feedback_type: Option<String>,
    /// ARF `Original-Rcpt-To` (often left out by receivers that redact).
    pub arf_original_rcpt_to: Option<String>,
    /// ARF `Original-Mail-From`.
    pub arf_original_mail_from: Option<String>,
    /// Message-ID of the returned or original message, without `<>`: from the
    /// `message/rfc822` or `text/rfc822-headers` part, or a text bounce's quoted headers.
    /// For auto-replies, unsubscribe and unknown mail without such a part, the report's own
    /// `In-Reply-To` (the message it answers).
    pub returned_message_id: Option<String>,
    /// Every header field of the returned message (name as written, value unfolded and
    /// trimmed), in order: Return-Path, Message-ID, X-Complaints-To, Feedback-ID,
    /// List-Unsubscribe and the rest, when present.
    pub returned_headers: Vec<(String, String)>,
}

impl Report {
    fn new(kind: Kind) -> Report {
        Report {
            kind,
            from: None,
            subject: None,
            reporting_mta: None,
            original_envelope_id: None,
            recipients: Vec::new(),
            feedback_type: None,
            arf_original_rcpt_to: None,
            arf_original_mail_from: None,
            returned_message_id: None,
            returned_headers: Vec::new(),
        }
    }

    /// The first returned header field named `name` (case-insensitive).
    pub fn returned_header(&self, name: &str) -> Option<&str> {
        fields::get(&self.returned_headers, name)
    }
}

/// The report part a message carries.
enum Structured {
    Dsn(dsn::DeliveryStatus),
    Arf(dsn::FeedbackReport),
}

/// What is read out of the MIME structure before classifying, so that classification works
/// the same whether mail-parser read the message or the fallback did.
struct View {
    /// The report's own header fields, as written.
    top: Vec<fields::Field>,
    from: Option<String>,
    from_name: Option<String>,
    subject: Option<String>,
    structured: Option<Structured>,
    /// Header fields of an attached returned message (or headers part), if there is one.
    returned: Option<Vec<fields::Field>>,
    /// The readable text of the body (text parts, or HTML turned to text).
    body: String,
}

/// Reads one message that came back. Never panics, whatever the bytes; reads at most the
/// first [`MAX_INPUT`] bytes.
pub fn parse(message: &[u8]) -> Report {
    let input = &message[..message.len().min(MAX_INPUT)];
    // mail-parser is robust in practice, but it keeps debug assertions and index arithmetic
    // on offsets it computes from hostile input; a panic there must not take down the
    // engine, so it degrades to reading the message as plain text.
    let view = if nested_message_fields(input) > MAX_MESSAGE_PARTS {
        plain_view(input)
    } else {
        std::panic::catch_unwind(|| view_with_mail_parser(input))
            .ok()
            .flatten()
            .unwrap_or_else(|| plain_view(input))
    };
    classify(view)
}

/// Most `Content-Type: message/...` (or `multipart/digest`) fields handed to mail-parser.
///
/// mail-parser 0.11 keeps each attached message inside its parent and recurses through
/// that chain: some thousands of nested `message/rfc822` parts (20 000 fit in 1 MiB)
/// overflow a 2 MiB thread stack, an abort that `catch_unwind` cannot stop. Real reports
/// carry one to three; a message with more is read without MIME.
const MAX_MESSAGE_PARTS: usize = 64;

/// Counts `Content-Type` fields (any case, any indentation, folded or not) whose value
/// mentions `message` or `digest` (a digest's parts default to `message/rfc822`): the
/// fields that may make mail-parser nest a message. It over-counts (body lines, other
/// message types) so that no spelling mail-parser accepts slips past it.
fn nested_message_fields(input: &[u8]) -> usize {
    fn suspicious(value: &[u8]) -> bool {
        let v = value.to_ascii_lowercase();
        v.windows(7).any(|w| w == b"message") || v.windows(6).any(|w| w == b"digest")
    }
    let mut count = 0;
    let mut field: Option<Vec<u8>> = None;
    for line in input.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some(v) = field.as_mut() {
                if v.len() < 4096 {
                    v.extend_from_slice(line);
                }
                continue;
            }
        }
        if field.take().is_some_and(|v| suspicious(&v)) {
            count += 1;
        }
        let t = line.trim_ascii_start();
        if t.get(..12)
            .is_some_and(|n| n.eq_ignore_ascii_case(b"content-type"))
        {
            field = Some(t[12..t.len().min(4096)].to_vec());
        }
    }
    if field.is_some_and(|v| suspicious(&v)) {
        count += 1;
    }
    count
}

fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Reads a message without MIME: its header section and the rest as text.
fn plain_view(input: &[u8]) -> View {
    let text = lossy(input);
    let top = fields::header_section(&text);
    let body_start = ["\r\n\r\n", "\n\n"]
        .iter()
        .filter_map(|sep| text.find(sep).map(|i| i + sep.len()))
        .min()
        .unwrap_or(text.len());
    let from = fields::get(&top, "From").and_then(codes::clean_address);
    View {
        from,
        from_name: None,
        subject: fields::get(&top, "Subject").map(str::to_string),
        top,
        structured: None,
        returned: None,
        body: text[body_start..].to_string(),
    }
}

fn content_type(part: &MessagePart<'_>) -> (String, String) {
    part.content_type()
        .map_or((String::new(), String::new()), |ct| {
            (
                ct.ctype().to_ascii_lowercase(),
                ct.subtype().unwrap_or("").to_ascii_lowercase(),
            )
        })
}

/// The decoded bytes of a leaf part.
fn part_bytes<'a>(part: &'a MessagePart<'_>) -> Cow<'a, [u8]> {
    match &part.body {
        PartType::Text(t) | PartType::Html(t) => Cow::Borrowed(t.as_bytes()),
        PartType::Binary(b) | PartType::InlineBinary(b) => Cow::Borrowed(b.as_ref()),
        PartType::Message(m) => Cow::Borrowed(m.raw_message()),
        PartType::Multipart(_) => Cow::Borrowed(&[]),
    }
}

fn is_returned_type(ty: &str, sub: &str) -> bool {
    matches!(
        (ty, sub),
        ("message", "rfc822")
            | ("message", "global")
            | ("message", "rfc822-headers")
            | ("message", "global-headers")
            | ("text", "rfc822-headers")
            | ("text", "rfc822")
    )
}

/// The header fields of a returned-message part.
fn returned_fields(part: &MessagePart<'_>) -> Vec<fields::Field> {
    let mut out = match &part.body {
        // A nested message's offsets index its own `raw_message` (the whole input when it
        // was not transfer-encoded, the decoded bytes when it was).
        PartType::Message(m) => m
            .parts
            .first()
            .and_then(|p| {
                m.raw_message
                    .get(p.offset_header as usize..p.offset_body as usize)
            })
            .map(|h| fields::header_section(&lossy(h)))
            .unwrap_or_default(),
        _ => fields::header_section(&lossy(&part_bytes(part))),
    };
    out.truncate(MAX_RETURNED_HEADERS);
    out
}

/// The top header section of a parsed message, read from its raw bytes.
fn top_fields(msg: &Message<'_>) -> Vec<fields::Field> {
    msg.parts
        .first()
        .and_then(|p| {
            msg.raw_message
                .get(p.offset_header as usize..p.offset_body as usize)
        })
        .map(|h| fields::header_section(&lossy(h)))
        .unwrap_or_default()
}

/// Finds the report part in `msg` (at any depth of its own multiparts) and the returned
/// message beside it.
fn find_structured(msg: &Message<'_>) -> Option<(Structured, Option<Vec<fields::Field>>)> {
    let mut found = None;
    for (i, part) in msg.parts.iter().enumerate() {
        let (ty, sub) = content_type(part);
        if ty != "message" {
            continue;
        }
        let text = || lossy(&part_bytes(part)).into_owned();
        match sub.as_str() {
            "delivery-status" | "global-delivery-status" => {
                found = Some((i, Structured::Dsn(dsn::parse_delivery_status(&text()))));
                break;
            }
            "feedback-report" => {
                found = Some((i, Structured::Arf(dsn::parse_feedback_report(&text()))));
                break;
            }
            _ => {}
        }
    }
    let (at, structured) = found?;
    // The returned message is the part after the report part; some reporters put it first.
    let returned = msg.parts[at + 1..]
        .iter()
        .chain(msg.parts[..at].iter())
        .find(|p| {
            let (ty, sub) = content_type(p);
            is_returned_type(&ty, &sub)
        })
        .map(returned_fields);
    Some((structured, returned))
}

fn view_with_mail_parser(input: &[u8]) -> Option<View> {
    let msg = MessageParser::new().parse(input)?;
    msg.parts.first()?;
    let from_addr = msg.from().and_then(|a| a.first());
    let from = from_addr.and_then(|a| a.address()).map(str::to_string);
    let from_name = from_addr.and_then(|a| a.name()).map(str::to_string);
    let subject = msg.subject().map(str::to_string);
    let top = top_fields(&msg);

    let mut structured = find_structured(&msg);
    if structured.is_none() {
        // Forwarded reports: a report attached whole to a message of its own.
        structured = msg.parts.iter().find_map(|p| match &p.body {
            PartType::Message(inner) => find_structured(inner),
            _ => None,
        });
    }
    let (structured, returned) = match structured {
        Some((s, r)) => (Some(s), r),
        None => (
            None,
            msg.parts
                .iter()
                .skip(1)
                .find(|p| {
                    let (ty, sub) = content_type(p);
                    is_returned_type(&ty, &sub)
                })
                .map(returned_fields),
        ),
    };

    let mut body = String::new();
    for i in 0..msg.text_body.len().min(8) {
        if let Some(t) = msg.body_text(i) {
            if body.len() + t.len() > MAX_INPUT * 2 {
                break;
            }
            body.push_str(&t);
            body.push('\n');
        }
    }
    Some(View {
        top,
        from,
        from_name,
        subject,
        structured,
        returned,
        body,
    })
}

/// Whether the report's own headers or subject mark it as an automatic reply.
fn is_auto_reply(top: &[fields::Field], subject: &str) -> bool {
    let value = |name: &str| fields::get(top, name).map(|v| v.trim().to_ascii_lowercase());
    let auto_submitted = value("Auto-Submitted").map(|v| {
        v.split(|c: char| c == ';' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_string()
    });
    let subject = subject.to_lowercase();
    let subject_says = subject.starts_with("auto:")
        || [
            "out of office",
            "out of the office",
            "automatic reply",
            "auto-reply",
            "autoreply",
            "auto reply",
            "auto response",
            "auto-response",
            "autoresponse",
            "abwesenheitsnotiz",
            "abwesenheit",
            "automatische antwort",
            "réponse automatique",
            "reponse automatique",
            "respuesta automática",
            "respuesta automatica",
            "risposta automatica",
            "automatisch antwoord",
            "autosvar",
            "automaattinen vastaus",
            "odpowiedź automatyczna",
            "absence du bureau",
            "fuera de la oficina",
            "away from my mail",
            "vacation reply",
        ]
        .iter()
        .any(|s| subject.contains(s));
    let header_says = auto_submitted.as_deref() == Some("auto-replied")
        || value("X-Autoreply").is_some_and(|v| v != "no")
        || value("X-Autorespond").is_some()
        || value("X-Autoresponder").is_some()
        || value("Precedence").as_deref() == Some("auto_reply")
        || value("X-Precedence").as_deref() == Some("auto_reply");
    header_says || subject_says
}

/// Whether a plain message asks to unsubscribe.
fn is_unsubscribe(subject: &str, body: &str) -> bool {
    let says = |s: &str| {
        let s = s.to_lowercase();
        [
            "unsubscribe",
            "abmelden",
            "désabonner",
            "desabonner",
            "désabonnement",
            "desabonnement",
            "désinscription",
            "desinscription",
            "désinscrire",
            "desinscrire",
        ]
        .iter()
        .any(|w| s.contains(w))
    };
    let first_line = body
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    says(subject) || says(first_line)
}

fn set_returned(report: &mut Report, headers: Vec<fields::Field>) {
    report.returned_message_id =
        fields::get(&headers, "Message-ID").and_then(codes::clean_message_id);
    report.returned_headers = headers;
}

fn classify(view: View) -> Report {
    let mut report = Report::new(Kind::Unknown);
    report.from = view.from.clone();
    report.subject = view.subject.clone();
    let subject = view.subject.as_deref().unwrap_or("");

    match view.structured {
        Some(Structured::Dsn(ds)) => {
            report.kind = Kind::Dsn;
            report.reporting_mta = ds.reporting_mta;
            report.original_envelope_id = ds.original_envelope_id;
            report.recipients = ds.recipients;
            set_returned(&mut report, view.returned.unwrap_or_default());
            return report;
        }
        Some(Structured::Arf(fr)) => {
            report.kind = Kind::Arf;
            report.reporting_mta = fr.reporting_mta;
            report.feedback_type = fr.feedback_type;
            report.arf_original_rcpt_to = fr.original_rcpt_to;
            report.arf_original_mail_from = fr.original_mail_from;
            set_returned(&mut report, view.returned.unwrap_or_default());
            return report;
        }
        None => {}
    }

    let (notice_end, copy_start) = text::split_copy(&view.body);
    let notice = &view.body[..notice_end];
    let quoted = || {
        copy_start
            .or_else(|| text::find_header_block(&view.body))
            .map(|at| fields::header_section(&view.body[at..]))
            .filter(|h| !h.is_empty())
    };

    // A DSN flattened to text by a forwarder or a broken MTA: its fields are still there.
    if notice.lines().any(|l| {
        l.get(..16)
            .is_some_and(|p| p.eq_ignore_ascii_case("final-recipient:"))
    }) {
        let ds = dsn::parse_delivery_status(notice);
        if ds.recipients.iter().any(|r| r.final_recipient.is_some()) {
            report.kind = Kind::Dsn;
            report.reporting_mta = ds.reporting_mta;
            report.original_envelope_id = ds.original_envelope_id;
            report.recipients = ds.recipients;
            set_returned(
                &mut report,
                view.returned.or_else(quoted).unwrap_or_default(),
            );
            return report;
        }
    }

    let bounce_sender = text::is_bounce_sender(view.from.as_deref(), view.from_name.as_deref());
    let bounce_subject = text::is_bounce_subject(subject);
    let auto_reply = is_auto_reply(&view.top, subject);

    // An auto-reply from a person's mailbox is not a bounce, even when it quotes one; the
    // mail system's own notices carry Auto-Submitted too, hence the sender and subject.
    if !(auto_reply && !bounce_sender && !bounce_subject) {
        let marker = text::has_bounce_marker(notice);
        if marker || bounce_sender || bounce_subject {
            let recipients = text::recipients(subject, notice);
            if marker
                || (bounce_subject && (bounce_sender || !recipients.is_empty()))
                || (bounce_sender && !recipients.is_empty())
            {
                report.kind = Kind::TextBounce;
                report.recipients = recipients;
                set_returned(
                    &mut report,
                    view.returned.or_else(quoted).unwrap_or_default(),
                );
                return report;
            }
        }
    }

    report.kind = if auto_reply {
        Kind::AutoReply
    } else if is_unsubscribe(subject, &view.body) {
        Kind::Unsubscribe
    } else {
        Kind::Unknown
    };
    set_returned(&mut report, view.returned.unwrap_or_default());
    if report.returned_message_id.is_none() {
        report.returned_message_id =
            fields::get(&view.top, "In-Reply-To").and_then(codes::clean_message_id);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hostile 10 MiB report with 100 000 recipient blocks: only the first MiB is read and
    /// at most [`MAX_RECIPIENTS`] come out, quickly.
    #[test]
    fn huge_report_is_bounded() {
        let mut m = String::from(
            "From: MAILER-DAEMON@example.org\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; example.org\r\n\r\n",
        );
        for i in 0..100_000 {
            m.push_str(&format!(
                "Final-Recipient: rfc822; user{i}@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 user unknown, padding padding\r\n\r\n"
            ));
        }
        while m.len() < 10 * 1024 * 1024 {
            m.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        m.push_str("--b--\r\n");
        assert!(m.len() >= 10 * 1024 * 1024);
        let started = std::time::Instant::now();
        let r = parse(m.as_bytes());
        let took = started.elapsed();
        assert_eq!(r.kind, Kind::Dsn);
        assert_eq!(r.recipients.len(), MAX_RECIPIENTS);
        assert_eq!(
            r.recipients[0].final_recipient.as_deref(),
            Some("user0@example.com")
        );
        // Generous for a debug build on a shared 2-core machine; a quadratic path would
        // take minutes here.
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    /// The same through the text-bounce reader: a notice naming 100 000 recipients.
    #[test]
    fn huge_text_bounce_is_bounded() {
        let mut m = String::from(
            "From: MAILER-DAEMON@example.org\r\nSubject: failure notice\r\n\r\nHi. This is the qmail-send program at example.org.\r\n\r\n",
        );
        for i in 0..100_000 {
            m.push_str(&format!(
                "<user{i}@example.com>:\r\nRemote host said: 550 5.1.1 no\r\n\r\n"
            ));
        }
        let started = std::time::Instant::now();
        let r = parse(m.as_bytes());
        let took = started.elapsed();
        assert_eq!(r.kind, Kind::TextBounce);
        assert_eq!(r.recipients.len(), MAX_RECIPIENTS);
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    }

    /// One address named over and over: its lines are gathered without rescanning.
    #[test]
    fn repeated_recipient_lines_stay_linear() {
        let mut m =
            String::from("From: MAILER-DAEMON@example.org\r\nSubject: failure notice\r\n\r\n");
        for _ in 0..100_000 {
            m.push_str("<a@example.com>:\r\n550 5.1.1 no\r\n");
        }
        let started = std::time::Instant::now();
        let r = parse(m.as_bytes());
        assert_eq!(r.recipients.len(), 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Deeply nested MIME (multiparts and attached messages) within the input cap.
    #[test]
    fn deep_nesting_is_bounded() {
        for part in [
            "Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n",
            "Content-Type: message/rfc822\r\n\r\n",
            "Content-Type:\r\n message/rfc822\r\n\r\n",
        ] {
            let mut m = String::from("From: a@example.org\r\n");
            for i in 0..20_000 {
                m.push_str(&part.replace("{i}", &i.to_string()));
            }
            let started = std::time::Instant::now();
            let _ = parse(m.as_bytes());
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{part}"
            );
        }
    }

    #[test]
    fn message_fields_are_counted_however_written() {
        assert_eq!(
            nested_message_fields(b"Content-Type: message/rfc822\r\n"),
            1
        );
        assert_eq!(
            nested_message_fields(b"  content-TYPE :\r\n\tMessage / RFC822\r\nX: y\n"),
            1
        );
        assert_eq!(
            nested_message_fields(
                b"Content-Type: multipart/digest; boundary=x\nContent-Type: text/plain\n"
            ),
            1
        );
        assert_eq!(
            nested_message_fields(b"Content-Type: text/plain\n message is here\n"),
            1
        );
        assert_eq!(
            nested_message_fields(b"Content-Type: text/plain\n\nmessage/rfc822\n"),
            0
        );
    }

    #[test]
    fn auto_submitted_no_is_not_an_auto_reply() {
        let r = parse(b"From: a@example.org\r\nAuto-Submitted: no\r\nSubject: hello\r\n\r\nhi\r\n");
        assert_eq!(r.kind, Kind::Unknown);
        let r = parse(b"From: a@example.org\r\nX-Autoreply: yes\r\nSubject: hello\r\n\r\nhi\r\n");
        assert_eq!(r.kind, Kind::AutoReply);
    }

    #[test]
    fn unsubscribe_by_first_line_and_in_other_languages() {
        let r = parse(b"From: a@example.org\r\nSubject: hi\r\n\r\n\r\n  Please UNSUBSCRIBE me\r\n");
        assert_eq!(r.kind, Kind::Unsubscribe);
        let r = parse("From: a@example.org\r\nSubject: Se désabonner\r\n\r\nx\r\n".as_bytes());
        assert_eq!(r.kind, Kind::Unsubscribe);
        let r = parse(b"From: a@example.org\r\nSubject: Newsletter abmelden\r\n\r\nx\r\n");
        assert_eq!(r.kind, Kind::Unsubscribe);
    }

    #[test]
    fn empty_and_headerless_input() {
        assert_eq!(parse(b"").kind, Kind::Unknown);
        assert_eq!(parse(b"\r\n\r\njust text").kind, Kind::Unknown);
    }

    #[test]
    fn dsn_flattened_to_text_is_still_a_dsn() {
        let r = parse(
            b"From: MAILER-DAEMON@example.org\r\nSubject: Returned mail\r\n\r\nSee below.\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\nFinal-Recipient: rfc822; a@example.com\r\nAction: failed\r\nStatus: 5.7.1\r\n",
        );
        assert_eq!(r.kind, Kind::Dsn);
        assert_eq!(r.reporting_mta.as_deref(), Some("mx.example.org"));
        assert_eq!(r.recipients[0].status.as_deref(), Some("5.7.1"));
    }
}

//! Each fixture (hand-written after a real MTA's or feedback loop's format) and what the
//! parser must read out of it.

use reports::{parse, Action, Kind, RecipientStatus, Report};

const VERP_DOMAIN: &str = "@bounces.example.net";

fn fixture(name: &str) -> Report {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse(&bytes)
}

fn only(r: &Report) -> &RecipientStatus {
    assert_eq!(r.recipients.len(), 1, "{:#?}", r.recipients);
    &r.recipients[0]
}

fn assert_recipient(
    r: &RecipientStatus,
    addr: &str,
    action: Action,
    status: &str,
    diagnostic_has: &str,
) {
    assert_eq!(r.final_recipient.as_deref(), Some(addr), "{r:#?}");
    assert_eq!(r.action, action, "{r:#?}");
    assert_eq!(r.status.as_deref(), Some(status), "{r:#?}");
    let d = r.diagnostic.as_deref().unwrap_or("");
    assert!(
        d.contains(diagnostic_has),
        "diagnostic {d:?} lacks {diagnostic_has:?}"
    );
}

/// The returned headers carry the VERP Return-Path (brackets as written).
fn assert_verp_return_path(r: &Report) {
    let rp = r
        .returned_header("Return-Path")
        .unwrap_or_else(|| panic!("no Return-Path in {:#?}", r.returned_headers));
    assert!(
        rp.contains("b1.mfrggzdfmztwq2lknnwg23tpob.kq3tcnzr."),
        "{rp}"
    );
    assert!(rp.contains(VERP_DOMAIN), "{rp}");
}

#[test]
fn postfix_dsn() {
    let r = fixture("postfix-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_eq!(r.from.as_deref(), Some("MAILER-DAEMON@mta1.example.org"));
    assert_eq!(
        r.subject.as_deref(),
        Some("Undelivered Mail Returned to Sender")
    );
    assert_eq!(r.reporting_mta.as_deref(), Some("mta1.example.org"));
    let rcpt = only(&r);
    assert_recipient(
        rcpt,
        "jane@example.com",
        Action::Failed,
        "5.1.1",
        "550 5.1.1 <jane@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
    );
    assert_eq!(rcpt.original_recipient.as_deref(), Some("jane@example.com"));
    assert_eq!(rcpt.remote_mta.as_deref(), Some("mx1.example.com"));
    assert!(!rcpt
        .diagnostic
        .as_deref()
        .unwrap_or("")
        .starts_with("smtp;"));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("01HQ7Z3K5V.jane@drover.example.net")
    );
    assert_verp_return_path(&r);
    // Every field of the returned message, in order, folded values unfolded.
    let names: Vec<&str> = r.returned_headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Return-Path",
            "Received",
            "DKIM-Signature",
            "From",
            "To",
            "Subject",
            "Message-ID",
            "X-Complaints-To",
            "Feedback-ID",
            "List-Unsubscribe",
            "List-Unsubscribe-Post",
            "MIME-Version",
            "Content-Type"
        ]
    );
    assert_eq!(
        r.returned_header("feedback-id"),
        Some("camp42:tenant7:drover")
    );
    assert_eq!(
        r.returned_header("List-Unsubscribe"),
        Some("<mailto:u1.mfrggzdfmztwq2lknnwg23tpob.kq3tcnzr.jane=example.com@bounces.example.net>, <https://example.net/u/abc>")
    );
}

#[test]
fn exim_dsn() {
    let r = fixture("exim-dsn.eml");
    assert_eq!(
        r.kind,
        Kind::Dsn,
        "Auto-Submitted on a DSN must not make it an auto-reply"
    );
    assert_eq!(r.reporting_mta.as_deref(), Some("mx.example.org"));
    let rcpt = only(&r);
    // The report's Status wins over the code in the diagnostic.
    assert_recipient(
        rcpt,
        "jane@example.com",
        Action::Failed,
        "5.0.0",
        "550 5.2.1 <jane@example.com>: mailbox disabled",
    );
    assert_eq!(rcpt.remote_mta.as_deref(), Some("mx.example.com"));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("exim-case.1@drover.example.net")
    );
    assert_verp_return_path(&r);
    assert_eq!(
        r.returned_header("Feedback-ID"),
        Some("camp42:tenant7:drover")
    );
}

#[test]
fn gmail_dsn_with_crlf_and_nested_multiparts() {
    let r = fixture("gmail-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_eq!(r.from.as_deref(), Some("mailer-daemon@googlemail.com"));
    assert_eq!(r.reporting_mta.as_deref(), Some("googlemail.com"));
    let rcpt = only(&r);
    assert_recipient(
        rcpt,
        "jane.doe@example.com",
        Action::Failed,
        "5.1.1",
        "550-5.1.1 The email account that you tried to reach does not exist. Please try 550-5.1.1 double-checking",
    );
    assert!(rcpt
        .remote_mta
        .as_deref()
        .unwrap_or("")
        .starts_with("gmail-smtp-in.l.google.com."));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("gmail-case.7@drover.example.net")
    );
    assert_verp_return_path(&r);
    assert!(r.returned_header("List-Unsubscribe").is_some());
}

#[test]
fn exchange_online_dsn_with_html_first_part() {
    let r = fixture("exchange-online-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_eq!(r.from.as_deref(), Some("postmaster@example.com"));
    assert_eq!(
        r.subject.as_deref(),
        Some("Undeliverable: March newsletter")
    );
    assert_eq!(
        r.reporting_mta.as_deref(),
        Some("AM0PR01MB1234.eurprd01.prod.exchangelabs.com")
    );
    assert_recipient(
        only(&r),
        "john@example.com",
        Action::Failed,
        "5.1.10",
        "RESOLVER.ADR.RecipientNotFound",
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("exo-case.3@drover.example.net")
    );
    // Exchange writes Return-Path without brackets.
    assert_verp_return_path(&r);
    assert_eq!(
        r.returned_header("X-Complaints-To"),
        Some("abuse@example.net")
    );
}

#[test]
fn sendmail_dsn_with_envelope_id_and_headers_only() {
    let r = fixture("sendmail-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_eq!(r.reporting_mta.as_deref(), Some("relay.example.org"));
    // xtext: +2B is '+'; '=' stays as written.
    assert_eq!(
        r.original_envelope_id.as_deref(),
        Some("drover+msg=3D42+jane")
    );
    let rcpt = only(&r);
    assert_recipient(
        rcpt,
        "max@example.org",
        Action::Failed,
        "5.1.1",
        "550 5.1.1 <max@example.org>... User unknown",
    );
    assert_eq!(rcpt.remote_mta.as_deref(), Some("mail.example.org"));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("sendmail-case.9@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn delayed_dsn() {
    let r = fixture("delayed-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_recipient(
        only(&r),
        "jane@example.com",
        Action::Delayed,
        "4.4.1",
        "connect to mx1.example.com[192.0.2.25]:25: Connection timed out",
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("delayed-case.2@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn multi_recipient_dsn() {
    let r = fixture("multi-recipient-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_eq!(r.original_envelope_id.as_deref(), Some("campaign42/batch7"));
    assert_eq!(r.recipients.len(), 3);
    assert_recipient(
        &r.recipients[0],
        "anna@example.com",
        Action::Failed,
        "5.1.1",
        "550 5.1.1 User unknown",
    );
    assert_eq!(
        r.recipients[0].original_recipient.as_deref(),
        Some("Anna@Example.com")
    );
    assert_recipient(
        &r.recipients[1],
        "bob@example.org",
        Action::Failed,
        "5.2.2",
        "552 5.2.2 Mailbox full",
    );
    assert_recipient(
        &r.recipients[2],
        "carol@example.net",
        Action::Delayed,
        "4.7.1",
        "Greylisted",
    );
    assert_eq!(
        r.recipients[2].remote_mta.as_deref(),
        Some("mx.example.net")
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("multi-case.5@drover.example.net")
    );
    assert_eq!(
        r.returned_header("Return-Path"),
        Some("<news-bounces@bounces.example.net>")
    );
}

#[test]
fn global_dsn_with_base64_message_global() {
    let r = fixture("global-dsn.eml");
    assert_eq!(r.kind, Kind::Dsn);
    assert_eq!(r.original_envelope_id.as_deref(), Some("env+josé"));
    let rcpt = only(&r);
    assert_recipient(
        rcpt,
        "josé@example.org",
        Action::Failed,
        "5.1.1",
        "550 5.1.1 mailbox unavailable",
    );
    assert_eq!(
        rcpt.original_recipient.as_deref(),
        Some("jos\\x{E9}@example.org")
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("global-case.18@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn qmail_text_bounce() {
    let r = fixture("qmail-bounce.eml");
    assert_eq!(r.kind, Kind::TextBounce);
    assert_eq!(r.subject.as_deref(), Some("failure notice"));
    assert_eq!(r.recipients.len(), 2);
    assert_recipient(
        &r.recipients[0],
        "jane@example.com",
        Action::Failed,
        "5.1.1",
        "Remote host said: 550 5.1.1 <jane@example.com>: Recipient address rejected: User unknown",
    );
    assert_recipient(
        &r.recipients[1],
        "joe@example.org",
        Action::Failed,
        "5.1.1",
        "Sorry, no mailbox here by that name. (#5.1.1)",
    );
    // The quoted copy after "--- Below this line is a copy of the message." is not read as
    // part of the notice: no recipient from its To header.
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("qmail-case.4@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn exim_text_bounce() {
    let r = fixture("exim-text-bounce.eml");
    assert_eq!(
        r.kind,
        Kind::TextBounce,
        "Exim's Auto-Submitted must not make it an auto-reply"
    );
    assert_recipient(
        only(&r),
        "jane@example.com",
        Action::Failed,
        "5.1.1",
        "550-5.1.1 The email account that you tried to reach does not exist. 550 5.1.1 Please try",
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("exim-text-case.6@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn exim_text_delay_warning() {
    let r = fixture("exim-text-delay.eml");
    assert_eq!(r.kind, Kind::TextBounce);
    assert_recipient(
        only(&r),
        "jane@example.com",
        Action::Delayed,
        "4.3.0",
        "451 4.3.0 Temporary local problem",
    );
    assert_eq!(r.returned_message_id, None);
}

#[test]
fn generic_text_bounce_with_attached_message() {
    let r = fixture("generic-text-bounce.eml");
    assert_eq!(r.kind, Kind::TextBounce);
    assert_recipient(
        only(&r),
        "jane@example.com",
        Action::Failed,
        "5.1.1",
        "550 5.1.1 <jane@example.com>... User unknown",
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("generic-case.8@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn yahoo_arf() {
    let r = fixture("yahoo-arf.eml");
    assert_eq!(r.kind, Kind::Arf);
    assert_eq!(r.from.as_deref(), Some("feedback@arf.mail.yahoo.com"));
    assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
    assert_eq!(
        r.arf_original_rcpt_to.as_deref(),
        Some("jane@yahoo.example")
    );
    assert_eq!(
        r.arf_original_mail_from.as_deref(),
        Some("b1.mfrggzdfmztwq2lknnwg23tpob.kq3tcnzr.jane=yahoo.example@bounces.example.net")
    );
    assert!(r.recipients.is_empty());
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("yahoo-case.11@drover.example.net")
    );
    assert_verp_return_path(&r);
    assert_eq!(
        r.returned_header("Feedback-ID"),
        Some("camp42:tenant7:drover")
    );
    assert_eq!(
        r.returned_header("X-Complaints-To"),
        Some("abuse@example.net")
    );
}

#[test]
fn microsoft_jmrp_arf_redacted() {
    let r = fixture("microsoft-jmrp-arf.eml");
    assert_eq!(r.kind, Kind::Arf);
    assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
    assert_eq!(r.reporting_mta.as_deref(), Some("mail.hotmail.com"));
    assert_eq!(r.arf_original_rcpt_to, None);
    assert_eq!(r.returned_header("To"), Some("redacted"));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("jmrp-case.12@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn arf_opt_out_with_full_message() {
    let r = fixture("arf-opt-out.eml");
    assert_eq!(r.kind, Kind::Arf);
    assert_eq!(r.feedback_type.as_deref(), Some("opt-out"));
    assert_eq!(r.reporting_mta.as_deref(), Some("mail.aol.example"));
    assert_eq!(r.arf_original_rcpt_to.as_deref(), Some("kim@aol.example"));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("optout-case.13@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn arf_forwarded_inside_a_message() {
    let r = fixture("forwarded-arf.eml");
    assert_eq!(r.kind, Kind::Arf);
    assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("fwd-case.17@drover.example.net")
    );
    assert_verp_return_path(&r);
}

#[test]
fn vacation_auto_reply() {
    let r = fixture("vacation-autoreply.eml");
    assert_eq!(r.kind, Kind::AutoReply);
    assert_eq!(r.from.as_deref(), Some("jane@example.com"));
    assert!(r.recipients.is_empty());
    // No returned part: the message it answers, from In-Reply-To.
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("vacation-case.14@drover.example.net")
    );
}

#[test]
fn exchange_out_of_office() {
    let r = fixture("exchange-ooo.eml");
    assert_eq!(r.kind, Kind::AutoReply);
    assert_eq!(
        r.subject.as_deref(),
        Some("Automatic reply: March newsletter")
    );
    assert_eq!(
        r.returned_message_id.as_deref(),
        Some("exo-ooo-case.15@drover.example.net")
    );
}

#[test]
fn unsubscribe_mail() {
    let r = fixture("unsubscribe.eml");
    assert_eq!(r.kind, Kind::Unsubscribe);
    assert_eq!(r.from.as_deref(), Some("kim@example.org"));
    assert!(r.recipients.is_empty());
}

#[test]
fn plain_unrelated_mail() {
    let r = fixture("plain.eml");
    assert_eq!(r.kind, Kind::Unknown);
    assert_eq!(r.from.as_deref(), Some("lars@example.org"));
    assert_eq!(
        r.subject.as_deref(),
        Some("Question about your March offer")
    );
    assert!(r.recipients.is_empty());
    assert!(r.returned_headers.is_empty());
}

#[test]
fn every_fixture_is_covered_and_serializes() {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        let src = include_str!("fixtures.rs");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        assert!(
            src.contains(&format!("\"{name}\"")),
            "fixture {name} has no test"
        );
        n += 1;
    }
    assert!(n >= 19);
}

//! Reports that come back (issue 11): DSNs, complaints, auto-replies and unsubscribe mail sent
//! to the bounce domain over SMTP are tied to their message through the VERP address (or the
//! returned headers), recorded, and suppress the recipient; forged ones are recorded unmatched
//! and suppress nothing.

use crate::dkim::wait_messages;
use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "an operator's secret, 32 bytes!!";

async fn send_report(engine: &TestEngine, to: &str, data: &str) -> (u16, String) {
    let data = data.replace('\n', "\r\n");
    let sent = smtp_transaction(engine, "mx.receiver.test", "", &[to], data.as_bytes()).await;
    let reply = sent.data.or(sent.rcpts.first().cloned()).unwrap();
    (reply.code, reply.lines.join(" "))
}

fn dsn(verp: &str, recipient: &str, action: &str, status: &str, diagnostic: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.receiver.test (Mail Delivery System)
To: {verp}
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"

--B1
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.receiver.test
Arrival-Date: Sun, 29 Nov 2026 08:00:00 +0000

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Remote-MTA: dns; mailbox.receiver.test
Diagnostic-Code: smtp; {diagnostic}

--B1
Content-Type: text/rfc822-headers

Return-Path: <{verp}>
From: News <news@example.com>
To: {recipient}
Subject: Hello

--B1--
"
    )
}

fn arf(verp: &str, feedback_type: &str) -> String {
    format!(
        "From: staff@fbl.receiver.test
To: fbl@bounces.example.net
Subject: FW: Hello
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary=\"A1\"

--A1
Content-Type: text/plain

This is an email abuse report.

--A1
Content-Type: message/feedback-report

Feedback-Type: {feedback_type}
User-Agent: ReceiverFBL/1.0
Version: 1
Reporting-MTA: dns; fbl.receiver.test

--A1
Content-Type: text/rfc822-headers

Return-Path: <{verp}>
From: News <news@example.com>
To: redacted@example.test
Subject: Hello

--A1--
"
    )
}

async fn suppressed(engine: &TestEngine, tenant: &str) -> Vec<(String, String)> {
    let list = engine
        .get_json(&format!("/api/admin/v1/suppressions?tenant={tenant}"))
        .await;
    list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_owned(),
                e["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn of_type(engine: &TestEngine, kind: &str) -> Vec<Value> {
    records(&engine.accounting_path())
        .into_iter()
        .filter(|r| r["type"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_matched_recorded_and_suppress() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "{}
[smtp_listener]
listen = \"127.0.0.1:0\"
relay_networks = []
[bounce_processing]
domains = [\"bounces.example.net\"]
verp = true
keys = [\"{KEY}\"]
[stamping]
list_unsubscribe_mailto = true
",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let recipients: Vec<String> = ["ann", "bob", "cy", "dee", "eve"]
        .iter()
        .map(|n| format!("{n}@example.test"))
        .collect();
    let (status, body) = engine.inject(&message_for(&recipients)).await;
    assert_eq!(status, 200, "{body}");
    let msgs = wait_messages(&sink, 5).await;
    let verp_of = |rcpt: &str| {
        msgs.iter()
            .find(|m| m.recipients[0] == rcpt)
            .unwrap()
            .sender
            .clone()
    };
    let id_of = |rcpt: &str| {
        let i = recipients.iter().position(|r| r == rcpt).unwrap();
        body["ids"][i].as_str().unwrap().to_owned()
    };

    // A DSN to ann's VERP address, from a client that may not relay: taken, tied, suppressed.
    let (code, text) = send_report(
        &engine,
        &verp_of("ann@example.test"),
        &dsn(
            &verp_of("ann@example.test"),
            "ann@example.test",
            "failed",
            "5.1.1",
            "550 5.1.1 <ann@example.test>: Recipient address rejected: User unknown",
        ),
    )
    .await;
    assert_eq!(code, 250, "{text}");
    let bounces = of_type(&engine, "AsyncBounce");
    assert_eq!(bounces.len(), 1);
    let b = &bounces[0];
    assert_eq!(b["id"], id_of("ann@example.test").as_str());
    assert_eq!(
        (
            b["recipient"].clone(),
            b["tenant"].clone(),
            b["campaign"].clone()
        ),
        (json!("ann@example.test"), json!("acme"), json!("nov-2026"))
    );
    assert_eq!(b["bounce_category"], "bad-mailbox");
    assert_eq!(b["response"]["enhanced_code"], "5.1.1");
    assert_eq!(b["report"]["matched"], true);
    assert_eq!(b["report"]["reporting_mta"], "mx.receiver.test");
    assert!(suppressed(&engine, "acme")
        .await
        .contains(&("ann@example.test".into(), "async-bounce".into())));
    // The client may not relay: an ordinary recipient is still refused.
    let (code, _) = send_report(&engine, "someone@elsewhere.test", "Subject: x\n\nhi\n").await;
    assert_eq!(code, 550);

    // A delayed DSN is not a bounce.
    let (code, _) = send_report(
        &engine,
        &verp_of("bob@example.test"),
        &dsn(
            &verp_of("bob@example.test"),
            "bob@example.test",
            "delayed",
            "4.4.1",
            "451 4.4.1 try later",
        ),
    )
    .await;
    assert_eq!(code, 250);
    assert_eq!(of_type(&engine, "AsyncBounce").len(), 1);

    // A complaint to the FBL address, tied through the returned Return-Path.
    let (code, _) = send_report(
        &engine,
        "fbl@bounces.example.net",
        &arf(&verp_of("bob@example.test"), "abuse"),
    )
    .await;
    assert_eq!(code, 250);
    let complaints = of_type(&engine, "Complaint");
    assert_eq!(complaints.len(), 1);
    assert_eq!(complaints[0]["id"], id_of("bob@example.test").as_str());
    assert_eq!(complaints[0]["recipient"], "bob@example.test");
    assert_eq!(complaints[0]["feedback_type"], "abuse");
    assert_eq!(complaints[0]["report"]["matched"], true);
    assert!(suppressed(&engine, "acme")
        .await
        .contains(&("bob@example.test".into(), "complaint".into())));

    // Unsubscribe mail to cy's mailto: address.
    let cy = msgs
        .iter()
        .find(|m| m.recipients[0] == "cy@example.test")
        .unwrap();
    let text = String::from_utf8_lossy(&cy.data).replace("\r\n ", " ");
    let mailto = text
        .lines()
        .find(|l| l.starts_with("List-Unsubscribe:"))
        .and_then(|l| l.split("<mailto:").nth(1))
        .and_then(|rest| rest.split('?').next())
        .unwrap()
        .to_owned();
    let (code, _) = send_report(
        &engine,
        &mailto,
        "From: cy@example.test\nSubject: unsubscribe\n\nunsubscribe\n",
    )
    .await;
    assert_eq!(code, 250);
    let unsubscribes = of_type(&engine, "Unsubscribe");
    assert_eq!(unsubscribes.len(), 1);
    assert_eq!(unsubscribes[0]["id"], id_of("cy@example.test").as_str());
    assert!(suppressed(&engine, "acme")
        .await
        .contains(&("cy@example.test".into(), "unsubscribe".into())));

    // An auto-reply is noted, never a bounce.
    let (code, text) = send_report(&engine, &verp_of("dee@example.test"), "From: dee@example.test\nAuto-Submitted: auto-replied\nSubject: Out of Office: Hello\n\nI am away until Monday.\n").await;
    assert_eq!(code, 250, "{text}");
    assert!(text.contains("auto-reply"), "{text}");

    // A forged tag: recorded, unmatched, suppresses nothing, kept as a file.
    let real = verp_of("eve@example.test");
    let (local, domain) = real.split_once('@').unwrap();
    let mut parts: Vec<String> = local.split('.').map(str::to_owned).collect();
    parts[2] = if parts[2].starts_with('a') {
        format!("b{}", &parts[2][1..])
    } else {
        format!("a{}", &parts[2][1..])
    };
    let forged = format!("{}@{domain}", parts.join("."));
    let (code, _) = send_report(
        &engine,
        &forged,
        &dsn(
            &forged,
            "eve@example.test",
            "failed",
            "5.1.1",
            "550 5.1.1 no such user",
        ),
    )
    .await;
    assert_eq!(code, 250);
    let bounces = of_type(&engine, "AsyncBounce");
    assert_eq!(bounces.len(), 2);
    let unmatched = &bounces[1];
    assert_eq!(unmatched["report"]["matched"], false);
    assert_eq!(
        unmatched["recipient"], "eve@example.test",
        "what could be parsed"
    );
    assert_eq!(unmatched["id"], "");
    assert!(!suppressed(&engine, "acme")
        .await
        .iter()
        .any(|(a, _)| a == "eve@example.test"));
    let kept = engine
        .accounting_path()
        .parent()
        .unwrap()
        .join("inbound")
        .join(format!(
            "{}.eml",
            unmatched["report"]["inbound_id"].as_str().unwrap()
        ));
    assert!(kept.exists(), "{kept:?}");

    // What was suppressed is refused at the next injection.
    let (_, again) = engine.inject(&message_for(&recipients)).await;
    assert_eq!(again["success_count"], 2, "dee and eve only: {again}");
    let metrics = engine.metrics().await;
    assert!(
        metric_value(&metrics, "drover_inbound_reports_total{kind=\"dsn\"}") >= 3.0,
        "{metrics}"
    );
    assert!(metric_value(&metrics, "drover_inbound_reports_total{kind=\"arf\"}") >= 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_size_and_rate_limited_per_client() {
    let engine = TestEngine::start(
        "[bounce_processing]\ndomains = [\"bounces.example.net\"]\nmax_report_size = 2000\nmax_reports_per_minute = 2\n",
    )
    .await;
    let big = format!("Subject: big\n\n{}\n", "x".repeat(3000));
    let (code, _) = send_report(&engine, "b@bounces.example.net", &big).await;
    assert_eq!(code, 552);
    let small = "From: a@b.test\nSubject: hello\n\nhi\n";
    let (code, _) = send_report(&engine, "b@bounces.example.net", small).await;
    assert_eq!(code, 250);
    let (code, text) = send_report(&engine, "b@bounces.example.net", small).await;
    assert_eq!(code, 450, "{text}");
    // Unknown mail is still recorded, unmatched.
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(5), |r| {
        count_type(r, "AsyncBounce") >= 1
    })
    .await;
    let r = recs.iter().find(|r| r["type"] == "AsyncBounce").unwrap();
    assert_eq!(r["report"]["matched"], false);
    engine.stop().await;
}

/// Real-world-shaped reports from many MTAs (the `reports` crate's fixtures), submitted over
/// SMTP to the bounce domain: each kind gives its record type, tied to nothing here (the
/// fixtures' ids are not this engine's), and nothing that came back is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_from_many_mtas_give_their_records() {
    let engine =
        TestEngine::start("[bounce_processing]\ndomains = [\"bounces.example.net\"]\n").await;
    let dir = manifest_dir().join("../reports/tests/fixtures");
    // (fixture, AsyncBounce records, Complaint records)
    let expected = [
        ("postfix-dsn.eml", 1, 0),
        ("exim-dsn.eml", 1, 0),
        ("gmail-dsn.eml", 1, 0),
        ("exchange-online-dsn.eml", 1, 0),
        ("sendmail-dsn.eml", 1, 0),
        ("global-dsn.eml", 1, 0),
        ("delayed-dsn.eml", 0, 0),
        ("multi-recipient-dsn.eml", 2, 0),
        ("qmail-bounce.eml", 2, 0),
        ("exim-text-bounce.eml", 1, 0),
        ("exim-text-delay.eml", 0, 0),
        ("generic-text-bounce.eml", 1, 0),
        ("yahoo-arf.eml", 0, 1),
        ("microsoft-jmrp-arf.eml", 0, 1),
        ("arf-opt-out.eml", 0, 1),
        ("forwarded-arf.eml", 0, 1),
        ("vacation-autoreply.eml", 0, 0),
        ("exchange-ooo.eml", 0, 0),
    ];
    let (mut bounces, mut complaints) = (0, 0);
    for (name, b, c) in expected {
        let raw = std::fs::read(dir.join(name)).unwrap();
        let text = String::from_utf8_lossy(&raw).replace("\r\n", "\n");
        let (code, reply) = send_report(&engine, "bounces@bounces.example.net", &text).await;
        assert_eq!(code, 250, "{name}: {reply}");
        bounces += b;
        complaints += c;
        let recs = records(&engine.accounting_path());
        assert_eq!(count_type(&recs, "AsyncBounce"), bounces, "{name}");
        assert_eq!(count_type(&recs, "Complaint"), complaints, "{name}");
    }
    let recs = records(&engine.accounting_path());
    for r in recs
        .iter()
        .filter(|r| r["type"] == "AsyncBounce" || r["type"] == "Complaint")
    {
        assert_eq!(r["report"]["matched"], false, "{r}");
        assert!(r["report"]["inbound_id"].is_string());
    }
    let yahoo = recs.iter().find(|r| r["type"] == "Complaint").unwrap();
    assert_eq!(yahoo["feedback_type"], "abuse", "{yahoo}");
    // Unmatched mail is kept, one file per report that gave records or none.
    let kept = std::fs::read_dir(engine.accounting_path().parent().unwrap().join("inbound"))
        .unwrap()
        .count();
    assert!(kept >= 14, "{kept} kept");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complaint_with_only_the_clients_message_id_is_tied_to_its_message() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let engine = TestEngine::start(&format!(
        "{}[bounce_processing]\ndomains = [\"bounces.example.net\"]\n",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let (status, body) = engine
        .inject(&json!({
            "envelope_sender": "news@sender.example.com",
            "content": "From: news@sender.example.com\r\nMessage-ID: <Campaign-7.ABC@News.Example.com>\r\nSubject: s\r\n\r\nbody\r\n",
            "recipients": [{"email": "zoe@example.test"}],
            "tenant": "acme",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    // An ARF whose returned headers carry only the Message-ID (no VERP Return-Path).
    let report = arf_with_headers(
        "From: news@sender.example.com\nMessage-ID: <campaign-7.abc@news.example.com>",
    );
    let (code, _) = send_report(&engine, "fbl@bounces.example.net", &report).await;
    assert_eq!(code, 250);
    let complaint = of_type(&engine, "Complaint").pop().unwrap();
    assert_eq!(complaint["report"]["matched"], true, "{complaint}");
    assert_eq!(complaint["id"], body["ids"][0]);
    assert_eq!(complaint["recipient"], "zoe@example.test");
    assert_eq!(complaint["tenant"], "acme");
    engine.stop().await;
}

/// An ARF report whose returned headers are `extra` and a Subject (no VERP Return-Path).
fn arf_with_headers(extra: &str) -> String {
    format!(
        "From: fbl@receiver.test
To: fbl@bounces.example.net
Subject: complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary=\"Z\"

--Z
Content-Type: text/plain

complaint

--Z
Content-Type: message/feedback-report

Feedback-Type: abuse
Version: 1

--Z
Content-Type: text/rfc822-headers

{extra}
Subject: s

--Z--
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supplemental_trace_header_ties_a_complaint_to_its_message() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "{}[bounce_processing]\ndomains = [\"bounces.example.net\"]\n",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let (status, body) = engine
        .inject(&json!({
            "envelope_sender": "news@sender.example.com",
            "content": "From: news@sender.example.com\nSubject: s\n\nbody\n",
            "recipients": [{"email": "zoe@example.test", "metadata": {"user": 42, "list": "weekly"}}],
            "tenant": "acme",
            "trace_headers": {"header_name": "X-Drover-Ref", "include_meta_names": ["list", "tenant"]},
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    let sent = wait_messages(&sink, 1).await;
    let text = String::from_utf8_lossy(&sent[0].data).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap().replace("\r\n\t", "");
    let trace = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Drover-Ref: "))
        .unwrap_or_else(|| panic!("no supplemental header in {head}"))
        .to_owned();
    let decoded = feedback::trace_ref::decode(&trace).unwrap();
    assert_eq!(decoded.recipient.as_deref(), Some("zoe@example.test"));
    assert_eq!(decoded.meta["list"], "weekly");

    // Only the supplemental header came back: matched, with the message's metadata.
    let (code, _) = send_report(
        &engine,
        "fbl@bounces.example.net",
        &arf_with_headers(&format!("X-Drover-Ref: {trace}")),
    )
    .await;
    assert_eq!(code, 250);
    let complaint = of_type(&engine, "Complaint").pop().unwrap();
    assert_eq!(complaint["report"]["matched"], true, "{complaint}");
    assert_eq!(complaint["id"], body["ids"][0]);
    assert_eq!(complaint["recipient"], "zoe@example.test");
    assert_eq!(complaint["tenant"], "acme");
    assert_eq!(complaint["metadata"], json!({"user": 42, "list": "weekly"}));
    assert_eq!(
        suppressed(&engine, "acme").await,
        vec![("zoe@example.test".to_owned(), "complaint".to_owned())]
    );

    // The header is not signed: naming the message with another recipient ties nothing.
    let forged = feedback::trace_ref::header(
        "X-KumoRef",
        "mallory@example.test",
        body["ids"][0].as_str(),
        &serde_json::Map::new(),
    );
    send_report(
        &engine,
        "fbl@bounces.example.net",
        &arf_with_headers(&forged.trim_end().replace("\r\n", "\n")),
    )
    .await;
    let complaint = of_type(&engine, "Complaint").pop().unwrap();
    assert_eq!(complaint["report"]["matched"], false, "{complaint}");
    assert_eq!(complaint["recipient"], "mallory@example.test");

    // KumoMTA's own documented header (mail it sent before the move): unmatched, but the
    // record names the recipient it carries.
    send_report(
        &engine,
        "fbl@bounces.example.net",
        &arf_with_headers(
            "X-KumoRef: eyJfQF8iOiJcXF8vIiwicmVjaXBpZW50IjoidGVzdEBleGFtcGxlLmNvbSJ9",
        ),
    )
    .await;
    let complaint = of_type(&engine, "Complaint").pop().unwrap();
    assert_eq!(complaint["report"]["matched"], false, "{complaint}");
    assert_eq!(complaint["recipient"], "test@example.com");
    assert_eq!(
        suppressed(&engine, "acme").await.len(),
        1,
        "unmatched reports suppress nothing"
    );
    engine.stop().await;
}

//! The feedback loop's marks on outgoing mail (issue 11): VERP envelope senders that decode
//! to the message and recipient, complaint and unsubscribe headers stamped per tenant and
//! campaign before DKIM signing, the same through both doors.

use crate::dkim::{dkim_config, external_verify, wait_messages};
use crate::harness::*;
use dkim::testing::{verify, Verdict};
use feedback::verp::Kind;
use std::collections::HashMap;

const KEY: &str = "an operator's secret, 32 bytes!!";

fn feedback_config() -> String {
    format!(
        r#"
[bounce_processing]
domains = ["bounces.example.net"]
verp = true
keys = ["{KEY}"]

[stamping]
x_complaints_to = "abuse@example.net"
x_csa_complaints = "whitelist-complaints@eco.de"
feedback_id = "{{{{campaign}}}}:{{{{tenant}}}}:drover:{{{{sender_id}}}}"
sender_id = "esp1"
list_unsubscribe_mailto = true
list_unsubscribe_url = "https://unsub.example.net/u"

[[stamping.rule]]
tenant = "acme"
x_complaints_to = "abuse@acme.example"

[[stamping.rule]]
tenant = "acme"
campaign = "keep-theirs"
existing = "keep"
sender_id = "esp2"
"#
    )
}

/// The value of header `name` in `data` (unfolded), and how many times it occurs.
fn header(data: &[u8], name: &str) -> (Option<String>, usize) {
    let text = String::from_utf8_lossy(data);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n ", " ");
    let values: Vec<String> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect();
    (values.first().cloned(), values.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_smtp_mail_carries_verp_and_stamped_headers_under_the_signature() {
    let sink = capturing_sink().await;
    let (dkim, dns) = dkim_config();
    let engine = TestEngine::start(&format!(
        "{dkim}{}{}",
        routes(&["example.test"], sink.local_addr()),
        feedback_config()
    ))
    .await;
    // HTTP: tenant acme (its rule), campaign nov-2026.
    let (status, body) = engine
        .inject(&message_for(&[
            "ann.lee+news@example.test".into(),
            "bob@example.test".into(),
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    // HTTP, a client that wrote its own X-Complaints-To: kept (the default), not doubled.
    let (status, body) = engine
        .inject(&serde_json::json!({
            "envelope_sender": "bounces@news.example.com",
            "content": "From: News <news@example.com>\r\nX-Complaints-To: theirs@client.example\r\nSubject: x\r\n\r\nbody\r\n",
            "recipients": [{"email": "cy@example.test"}],
            "tenant": "acme",
            "campaign": "keep-theirs",
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    // SMTP: no tenant, so the defaults.
    let sent = smtp_transaction(
        &engine,
        "client.test",
        "bounces@news.example.com",
        &["dee@example.test"],
        b"From: News <news@example.com>\r\nSubject: smtp\r\n\r\nbody\r\n",
    )
    .await;
    assert_eq!(sent.data.map(|r| r.code), Some(250));

    let msgs = wait_messages(&sink, 4).await;
    let keys = feedback::Keys::new(&[KEY]).unwrap();
    let ids: HashMap<String, String> = wait_records(
        &engine.accounting_path(),
        std::time::Duration::from_secs(20),
        |r| count_type(r, "Delivery") >= 4,
    )
    .await
    .iter()
    .filter(|r| r["type"] == "Delivery")
    .map(|r| {
        (
            r["recipient"].as_str().unwrap().to_owned(),
            r["id"].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    for m in &msgs {
        let rcpt = &m.recipients[0];
        let text = String::from_utf8_lossy(&m.data);
        // The envelope sender is this message's VERP address, and decodes back to it.
        assert!(m.sender.ends_with("@bounces.example.net"), "{}", m.sender);
        let verp = feedback::verp::decode(&keys, &m.sender).unwrap();
        assert_eq!(verp.kind, Kind::Bounce);
        assert_eq!(verp.recipient.as_deref(), Some(rcpt.as_str()));
        let id: queue::MessageId = ids[rcpt].parse().unwrap();
        assert_eq!(&verp.id, id.as_bytes());
        // The sink offers DSN: the message id rides as ENVID (headers only come back), the
        // recipient as ORCPT, so a report names both.
        let param = |params: &[(String, Option<String>)], k: &str| {
            params
                .iter()
                .find(|(n, _)| n == k)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(param(&m.mail_params, "ENVID"), Some(ids[rcpt].clone()));
        assert_eq!(param(&m.mail_params, "RET").as_deref(), Some("HDRS"));
        assert_eq!(
            param(&m.rcpt_params[0], "ORCPT"),
            Some(format!("rfc822;{}", smtp_proto::xtext_encode(rcpt)))
        );
        // Stamped once each; the signature covers them.
        for name in [
            "X-Complaints-To",
            "X-CSA-Complaints",
            "Feedback-ID",
            "List-Unsubscribe",
            "List-Unsubscribe-Post",
        ] {
            assert_eq!(header(&m.data, name).1, 1, "{name} in {text}");
        }
        assert_eq!(
            header(&m.data, "X-CSA-Complaints").0.as_deref(),
            Some("whitelist-complaints@eco.de")
        );
        assert_eq!(
            header(&m.data, "List-Unsubscribe-Post").0.as_deref(),
            Some("List-Unsubscribe=One-Click")
        );
        let unsubscribe = header(&m.data, "List-Unsubscribe").0.unwrap();
        let (mailto, https) = unsubscribe.split_once(", ").unwrap();
        let address = mailto
            .trim_start_matches("<mailto:")
            .split('?')
            .next()
            .unwrap();
        let u = feedback::verp::decode(&keys, address).unwrap();
        assert_eq!((u.kind, u.id), (Kind::Unsubscribe, verp.id));
        let token = https
            .trim_start_matches("<https://unsub.example.net/u/")
            .trim_end_matches('>');
        let t = feedback::token::decode(&keys, token).unwrap();
        assert_eq!(&t.recipient, rcpt);
        assert_eq!(t.id, verp.id);
        let h = |n| header(&m.data, n).0.unwrap();
        match rcpt.as_str() {
            "ann.lee+news@example.test" | "bob@example.test" => {
                assert_eq!(h("X-Complaints-To"), "abuse@acme.example");
                assert_eq!(h("Feedback-ID"), "nov-2026:acme:drover:esp1");
                assert_eq!(t.tenant.as_deref(), Some("acme"));
                assert_eq!(t.campaign.as_deref(), Some("nov-2026"));
            }
            "cy@example.test" => {
                assert_eq!(h("X-Complaints-To"), "theirs@client.example");
                assert_eq!(h("Feedback-ID"), "keep-theirs:acme:drover:esp2");
            }
            "dee@example.test" => {
                assert_eq!(h("X-Complaints-To"), "abuse@example.net");
                assert_eq!(h("Feedback-ID"), "::drover:esp1");
            }
            other => panic!("unexpected recipient {other}"),
        }
        assert_eq!(
            verify(&m.data, &dns).await,
            vec![Verdict::Pass, Verdict::Pass],
            "{text}"
        );
        // An independent verifier (dkimpy) agrees, and fails the same tampering.
        if let Some(external) = external_verify(&m.data, &dns) {
            assert!(
                external,
                "dkimpy rejects the stamped, signed message:\n{text}"
            );
            let tampered = text.replace("whitelist-complaints@eco.de", "evil@example.org");
            assert_eq!(external_verify(tampered.as_bytes(), &dns), Some(false));
        }
        let tampered = text.replace("whitelist-complaints@eco.de", "evil@example.org");
        assert_ne!(
            verify(tampered.as_bytes(), &dns).await,
            vec![Verdict::Pass, Verdict::Pass],
            "the stamped headers are signed"
        );
    }
    // Records carry the stamped headers (contract §4 `headers`).
    let delivered = records(&engine.accounting_path());
    let ann = delivered
        .iter()
        .find(|r| r["type"] == "Delivery" && r["recipient"] == "bob@example.test")
        .unwrap();
    assert_eq!(
        ann["headers"]["X-CSA-Complaints"],
        "whitelist-complaints@eco.de"
    );
    assert!(ann["sender"].as_str().unwrap().starts_with("b1."), "{ann}");
    engine.stop().await;
}

#[test]
fn feedback_settings_are_checked() {
    for (bad, key) in [
        (
            "[bounce_processing]\nverp = true\n",
            "bounce_processing.verp",
        ),
        (
            "[bounce_processing]\nkeys = [\"short\"]\n",
            "bounce_processing.keys[0]",
        ),
        (
            "[stamping]\nlist_unsubscribe_mailto = true\n",
            "stamping.list_unsubscribe_mailto",
        ),
        (
            "[stamping]\nlist_unsubscribe_url = \"ftp://x\"\n",
            "stamping.list_unsubscribe_url",
        ),
        (
            "[stamping]\nx_complaints_to = \"a\\r\\nBcc: b\"\n",
            "stamping.x_complaints_to",
        ),
        (
            "[[stamping.rule]]\nx_complaints_to = \"a@b.c\"\n",
            "stamping.rule[0]",
        ),
        ("[stamping]\nunknown = 1\n", "unknown"),
        (
            "[suppression]\nbounce_categories = [\"nonsense\"]\n",
            "nonsense",
        ),
    ] {
        let err = drover::config::Config::parse(bad).unwrap_err().to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_click_unsubscribe_suppresses_and_records_and_forged_links_do_nothing() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "{}\n[stamping]\nlist_unsubscribe_url = \"https://unsub.example.net/u\"\n[unsubscribe]\nlisten = \"127.0.0.1:0\"\n",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let door = engine.running.as_ref().unwrap().unsubscribe_addr.unwrap();
    let (status, body) = engine
        .inject(&message_for(&["jane@example.test".into()]))
        .await;
    assert_eq!(status, 200, "{body}");
    let msgs = wait_messages(&sink, 1).await;
    let list = header(&msgs[0].data, "List-Unsubscribe").0.unwrap();
    let token = list
        .trim_start_matches("<https://unsub.example.net/u/")
        .trim_end_matches('>')
        .to_owned();
    let url = format!("http://{door}/u/{token}");
    let client = reqwest::Client::new();
    // A GET (a person, or a link scanner) shows a page and changes nothing.
    let page = client.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("jane@example.test"));
    // Wrong body, forged token, another door's path: refused, nothing recorded.
    let wrong = client
        .post(&url)
        .body("List-Unsubscribe=Maybe")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400);
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'a' { 'b' } else { 'a' });
    for bad in [
        format!("http://{door}/u/{forged}"),
        format!("http://{door}/api/admin/v1/queues"),
    ] {
        let r = client
            .post(&bad)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{bad}");
    }
    assert_eq!(
        count_type(&records(&engine.accounting_path()), "Unsubscribe"),
        0
    );
    let listed = engine
        .get_json("/api/admin/v1/suppressions?tenant=acme")
        .await;
    assert_eq!(listed["entries"].as_array().unwrap().len(), 0);
    // The one-click POST (RFC 8058).
    let done = client
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let recs = wait_records(
        &engine.accounting_path(),
        std::time::Duration::from_secs(10),
        |r| count_type(r, "Unsubscribe") == 1,
    )
    .await;
    let u = recs.iter().find(|r| r["type"] == "Unsubscribe").unwrap();
    assert_eq!(u["id"], body["ids"][0], "{u}");
    assert_eq!(u["recipient"], "jane@example.test");
    assert_eq!(
        (u["tenant"].clone(), u["campaign"].clone()),
        (serde_json::json!("acme"), serde_json::json!("nov-2026"))
    );
    assert_eq!(u["report"]["matched"], true);
    let listed = engine
        .get_json("/api/admin/v1/suppressions?tenant=acme")
        .await;
    assert_eq!(
        listed["entries"][0]["address"], "jane@example.test",
        "{listed}"
    );
    assert_eq!(listed["entries"][0]["source"], "unsubscribe");
    let (_, again) = engine
        .inject(&message_for(&["jane@example.test".into()]))
        .await;
    assert_eq!(again["success_count"], 0, "{again}");
    let metrics = engine.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "drover_feedback_records_total{type=\"Unsubscribe\"}"
        ) >= 1.0
    );
    engine.stop().await;
}

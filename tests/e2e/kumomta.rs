//! KumoMTA conformance (issue 15): the request examples of KumoMTA's HTTP API documentation,
//! sent to Drover byte for byte as they are published (comments, trailing commas and all), and
//! the mail that comes out, parsed back with mail-parser.
//!
//! Sources (copied as data, unchanged):
//! - `BASIC`, `BUILDER`, `TEMPLATED`: <https://docs.kumomta.com/reference/http/api_inject_v1/>
//!   (the repository's `docs/reference/http/api_inject_v1.md`), the request examples under
//!   "POST /api/inject/v1", "content" and "Template Substitution".
//! - `SUPPLEMENTAL`: the example header of the `trace_headers` section of the same page.

use crate::dkim::wait_messages;
use crate::harness::*;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde_json::{json, Value};

/// The page's first example. Its trailing comma makes it JSON5, not JSON.
const BASIC: &str = r#"{
    "envelope_sender": "noreply@example.com",
    "content": "Subject: hello\n\nHello there",
    "recipients": [
        {
            "email": "recipient@example.com",
        }
    ]
}"#;

/// The builder example of the `content` section, with its explanatory comments.
const BUILDER: &str = r#"{
    "envelope_sender": "noreply@example.com",
    "content": {
        "text_body": "This is the plain text part",
        "html_body": "<p>This is the <b>HTML</b> part</p>",
        // Optionally define an AMP email part.
        // This is available {{since('dev', inline=True)}}
        "amp_html_body": "<!doctype html><html amp4email>...</html>",
        "attachments": [
            {
                // The attachment data.
                // If the base64 field is true, this data must be encoded
                // using base64. Otherwise, it will be interpreted as UTF-8.
                "data": "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7",
                "base64": true,
                "content_type": "image/gif",
                // optional Content-ID. If specified, this attachment will
                // be added as an inline attachment and a multipart/related
                // MIME container will be generated in the message to hold
                // it and the textual content.
                "content_id": "my-image",
                // optional file name. If specified, will be added to the
                // MIME headers for the attachment.
                "file_name": "pixel.gif"
            }
        ],
        // Controls the From: header
        "from": {
            "email": "someone@example.com",
            "name": "Someone"
        },
        // Controls the Subject: header
        "subject": "This is the subject",
        // Controls the Reply-To: header
        "reply_to": {
            "email": "help@example.com",
            "name": "Help"
        },
        // Specify arbitrary additional headers
        "headers": {
            "X-Something": "Something!"
        }
    },
    "recipients": [
        {
            "email": "recipient@example.com"
        }
    ]
}"#;

/// The "very basic example of using templating".
const TEMPLATED: &str = r#"{
    "envelope_sender": "noreply@example.com",
    "content": "To: \"{{ name }}\" <{{ email }}>\nSubject: hello\n\nHello {{ name }}!",
    "recipients": [
        {
            "email": "recipient@example.com",
            "name": "John Smith"
        }
    ]
}"#;

/// The documented supplemental header and its payload.
const SUPPLEMENTAL: (&str, &str) = (
    "eyJfQF8iOiJcXF8vIiwicmVjaXBpZW50IjoidGVzdEBleGFtcGxlLmNvbSJ9",
    r#"{"_@_":"\\_/","recipient":"test@example.com"}"#,
);

/// POSTs `body` exactly as given.
async fn post_raw(engine: &TestEngine, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(engine.url("/api/inject/v1"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn kumo_reply_shape(reply: &Value, success: u64) {
    assert_eq!(reply["success_count"], success, "{reply}");
    assert_eq!(reply["fail_count"], 0, "{reply}");
    assert_eq!(reply["failed_recipients"], json!([]), "{reply}");
    assert_eq!(reply["errors"], json!([]), "{reply}");
}

fn crlf_only(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    assert!(
        !text.replace("\r\n", "").contains('\n') && !text.replace("\r\n", "").contains('\r'),
        "bare line ends in {text}"
    );
}

/// The header section of a delivered message, unfolded.
fn head(data: &[u8]) -> String {
    String::from_utf8_lossy(data)
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n\t", "")
        .replace("\r\n ", " ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kumomtas_documented_examples_work_unchanged() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["example.com"], sink.local_addr())).await;

    for (i, (name, example)) in [
        ("basic", BASIC),
        ("builder", BUILDER),
        ("templated", TEMPLATED),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, reply) = post_raw(&engine, example).await;
        assert_eq!(status, 200, "{name}: {reply}");
        kumo_reply_shape(&reply, 1);
        // Each is sent once the previous one is in, so they arrive in this order.
        wait_messages(&sink, i + 1).await;
    }
    let sent = sink.messages();
    assert_eq!(sent.len(), 3);
    for m in &sent {
        assert_eq!(m.sender, "noreply@example.com");
        assert_eq!(m.recipients, vec!["recipient@example.com".to_owned()]);
        crlf_only(&m.data);
        // KumoMTA's HTTP injection adds its supplemental header by default; so does Drover.
        let h = head(&m.data);
        let trace = h
            .lines()
            .find_map(|l| l.strip_prefix("X-KumoRef: "))
            .unwrap_or_else(|| panic!("no X-KumoRef in {h}"));
        let trace = feedback::trace_ref::decode(trace).unwrap();
        assert_eq!(trace.recipient.as_deref(), Some("recipient@example.com"));
    }

    // Basic: the raw message, with CRLF line ends.
    let basic = MessageParser::default().parse(&sent[0].data).unwrap();
    assert_eq!(basic.subject(), Some("hello"));
    // SMTP ends the data with CRLF; the message is otherwise as given.
    assert!(String::from_utf8_lossy(&sent[0].data).ends_with("\r\n\r\nHello there\r\n"));

    // Builder: multipart/alternative (text, AMP, HTML) beside the GIF in multipart/related.
    let built = MessageParser::default().parse(&sent[1].data).unwrap();
    assert_eq!(built.subject(), Some("This is the subject"));
    let from = built.from().unwrap().first().unwrap();
    assert_eq!(
        (from.name(), from.address()),
        (Some("Someone"), Some("someone@example.com"))
    );
    let reply_to = built.reply_to().unwrap().first().unwrap();
    assert_eq!(
        (reply_to.name(), reply_to.address()),
        (Some("Help"), Some("help@example.com"))
    );
    assert_eq!(
        built.header("X-Something").and_then(|h| h.as_text()),
        Some("Something!")
    );
    let subtype = |i: usize| {
        built.parts[i]
            .content_type()
            .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("")))
            .unwrap_or_default()
    };
    let children = |i: usize| match &built.parts[i].body {
        PartType::Multipart(c) => c.iter().map(|&c| c as usize).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let related = (0..built.parts.len())
        .find(|&i| subtype(i) == "multipart/related")
        .expect("a multipart/related container");
    let gif = children(related)
        .into_iter()
        .find(|&i| subtype(i) == "image/gif")
        .expect("the GIF inside multipart/related");
    assert_eq!(built.parts[gif].content_id(), Some("my-image"));
    assert_eq!(built.parts[gif].attachment_name(), Some("pixel.gif"));
    let pixel = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7",
    )
    .unwrap();
    assert_eq!(built.parts[gif].contents(), pixel.as_slice());
    let alternative = children(related)
        .into_iter()
        .find(|&i| subtype(i) == "multipart/alternative")
        .expect("the bodies beside the GIF");
    let bodies: Vec<String> = children(alternative).into_iter().map(subtype).collect();
    assert_eq!(bodies, ["text/plain", "text/x-amp-html", "text/html"]);
    assert_eq!(
        built.body_text(0).as_deref(),
        Some("This is the plain text part")
    );
    assert_eq!(
        built.body_html(0).as_deref(),
        Some("<p>This is the <b>HTML</b> part</p>")
    );
    let amp = children(alternative)[1];
    assert_eq!(
        built.parts[amp].text_contents(),
        Some("<!doctype html><html amp4email>...</html>")
    );

    // Templated: the documented result, line for line, after Drover's trace fields.
    let text = String::from_utf8(sent[2].data.clone()).unwrap();
    assert!(
        text.contains("\r\nTo: \"John Smith\" <recipient@example.com>\r\nSubject: hello\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nHello John Smith!\r\n"), "{text}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_dialects_trace_headers_and_errors_as_kumomta() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["example.com"], sink.local_addr())).await;
    // Recipient `metadata` (KumoMTA's schema: an object of any values) reaches every record.
    let (status, reply) = engine
        .inject(&json!({
            "envelope_sender": "noreply@example.com",
            "content": "Subject: hello\n\nHello {{ name }} ({{ metadata.crm_id }})",
            "recipients": [
                {"email": "meta@example.com", "name": "Ann", "metadata": {"crm_id": 1234, "tags": ["a", "b"]}},
            ],
            "trace_headers": {"received_header": false, "include_meta_names": ["crm_id"]},
        }))
        .await;
    assert_eq!(status, 200, "{reply}");
    kumo_reply_shape(&reply, 1);
    // `Static` leaves the template as written; `Handlebars` expands its own syntax.
    for (dialect, content) in [
        ("Static", "Subject: s\n\nHi {{ name }}"),
        ("Handlebars", "Subject: h\n\nHi {{name}}"),
    ] {
        let (status, reply) = engine
            .inject(&json!({
                "envelope_sender": "noreply@example.com",
                "content": content,
                "template_dialect": dialect,
                "recipients": [{"email": format!("{dialect}@example.com"), "name": "Ann"}],
            }))
            .await;
        assert_eq!(status, 200, "{dialect}: {reply}");
    }
    // A template that does not compile: 422, as KumoMTA, and nothing queued.
    let (status, reply) = engine
        .inject(&json!({
            "envelope_sender": "noreply@example.com",
            "content": "Subject: {{ broken\n\nx",
            "recipients": [{"email": "never@example.com"}],
        }))
        .await;
    assert_eq!(status, 422, "{reply}");
    let sent = wait_messages(&sink, 3).await;
    let by_rcpt = |r: &str| {
        let m = sent.iter().find(|m| m.recipients[0] == r).unwrap();
        String::from_utf8(m.data.clone()).unwrap()
    };
    let meta = by_rcpt("meta@example.com");
    assert!(meta.ends_with("\r\n\r\nHello Ann (1234)\r\n"), "{meta}");
    assert!(!meta.contains("Received:"), "{meta}");
    let trace = head(meta.as_bytes())
        .lines()
        .find_map(|l| l.strip_prefix("X-KumoRef: ").map(str::to_owned))
        .unwrap();
    let trace = feedback::trace_ref::decode(&trace).unwrap();
    assert_eq!(trace.meta["crm_id"], 1234);
    assert_eq!(
        trace.id.as_deref(),
        reply_id(&engine, "meta@example.com").as_deref()
    );
    assert!(by_rcpt("Static@example.com").ends_with("\r\n\r\nHi {{ name }}\r\n"));
    assert!(by_rcpt("Handlebars@example.com").ends_with("\r\n\r\nHi Ann\r\n"));
    assert!(!sent.iter().any(|m| m.recipients[0] == "never@example.com"));
    let records = wait_records(
        &engine.accounting_path(),
        std::time::Duration::from_secs(20),
        |r| r.iter().filter(|r| r["type"] == "Delivery").count() == 3,
    )
    .await;
    for r in records
        .iter()
        .filter(|r| r["recipient"] == "meta@example.com")
    {
        assert_eq!(
            r["metadata"],
            json!({"crm_id": 1234, "tags": ["a", "b"]}),
            "{r}"
        );
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r["recipient"] == "meta@example.com")
            .count(),
        2,
        "Reception and Delivery"
    );
    // The documented supplemental header decodes to the documented payload.
    let decoded =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, SUPPLEMENTAL.0).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), SUPPLEMENTAL.1);
    assert_eq!(
        feedback::trace_ref::header("X-KumoRef", "test@example.com", None, &Default::default()),
        format!("X-KumoRef: {}\r\n", SUPPLEMENTAL.0)
    );
    engine.stop().await;
}

/// The id of the message queued for `recipient`, from its Reception record.
fn reply_id(engine: &TestEngine, recipient: &str) -> Option<String> {
    records(&engine.accounting_path())
        .into_iter()
        .find(|r| r["type"] == "Reception" && r["recipient"] == recipient)
        .and_then(|r| r["id"].as_str().map(str::to_owned))
}

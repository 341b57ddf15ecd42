//! DKIM: what the receiver gets is signed with the configured keys and verifies; messages a key
//! applies to but that cannot be signed are refused, never sent unsigned.

use crate::harness::*;
use dkim::testing::{verify, Verdict};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("../dkim/tests/fixtures").join(name)
}

/// `[[dkim]]` for example.com with an RSA and an Ed25519 key, and the DNS records they need.
pub(crate) fn dkim_config() -> (String, Vec<(String, String)>) {
    let keys = [("rsa", "rsa2048.pem"), ("ed", "ed25519.pem")];
    let mut toml = String::new();
    let mut entries = Vec::new();
    for (selector, file) in keys {
        let path = fixture(file);
        toml.push_str(&format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"{selector}\"\nkey_file = \"{}\"\n",
            path.display()
        ));
        entries.push(dkim::KeyConfig {
            domain: "example.com".into(),
            selector: selector.into(),
            key_file: path,
        });
    }
    let records = dkim::Signers::load(&entries).unwrap().dns_records();
    (toml, records)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics"))
}

pub(crate) async fn wait_messages(sink: &sink::SinkHandle, n: usize) -> Vec<sink::ReceivedMessage> {
    let start = std::time::Instant::now();
    loop {
        let msgs = sink.messages();
        if msgs.len() >= n {
            return msgs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} of {n} messages arrived",
            msgs.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_mail_arrives_signed_and_verifies() {
    let sink = capturing_sink().await;
    let (dkim, records) = dkim_config();
    let engine = TestEngine::start(&format!(
        "{dkim}{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    // harness::message_for writes `From: News <news@example.com>`.
    let (status, body) = engine
        .inject(&message_for(&[
            "ann@example.test".into(),
            "bob@example.test".into(),
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    let msgs = wait_messages(&sink, 2).await;
    for m in &msgs {
        let text = String::from_utf8_lossy(&m.data);
        assert!(text.starts_with("DKIM-Signature: "), "{text}");
        assert!(text.contains("a=rsa-sha256") && text.contains("a=ed25519-sha256"));
        // Dual signature: both the RSA and the Ed25519 one pass.
        assert_eq!(
            verify(&m.data, &records).await,
            vec![Verdict::Pass, Verdict::Pass],
            "{text}"
        );
        if let Some(external) = external_verify(&m.data, &records) {
            assert!(external, "dkimpy rejects what drover signed:\n{text}");
            let tampered = text.replace("your plan is", "your plan was");
            assert_eq!(external_verify(tampered.as_bytes(), &records), Some(false));
        }
    }
    let metrics = engine.metrics().await;
    assert!(metric(&metrics, "drover_dkim_signatures_total{result=\"signed\"}") >= 2.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_recipients_whose_message_cannot_be_signed_fail_alone() {
    let sink = capturing_sink().await;
    let (dkim, records) = dkim_config();
    let engine = TestEngine::start(&format!(
        "{dkim}{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    // Two From headers: refused when one is ours (example.com), left unsigned otherwise.
    let request = serde_json::json!({
        "envelope_sender": "bounces@news.example.com",
        "content": "From: news@{{ dom }}\r\nFrom: other@other.test\r\nSubject: x\r\n\r\nbody\r\n",
        "recipients": [
            {"email": "ann@example.test", "substitutions": {"dom": "example.com"}},
            {"email": "bob@example.test", "substitutions": {"dom": "unrelated.test"}},
            {"email": "cy@example.test", "substitutions": {"dom": "news.example.com"}},
        ],
    });
    let (status, body) = engine.inject(&request).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success_count"], 1, "{body}");
    assert_eq!(
        body["failed_recipients"],
        serde_json::json!(["ann@example.test", "cy@example.test"])
    );
    assert!(
        body["errors"][0].as_str().unwrap().contains("DKIM"),
        "{body}"
    );
    assert_eq!(body["ids"].as_array().unwrap().len(), 1);
    let msgs = wait_messages(&sink, 1).await;
    assert_eq!(msgs[0].recipients, vec!["bob@example.test".to_owned()]);
    assert!(verify(&msgs[0].data, &records).await.is_empty(), "unsigned");

    // Every recipient unsignable: nothing queued, 400.
    let mut only_ours = request.clone();
    only_ours["recipients"] = serde_json::json!([
        {"email": "dan@example.test", "substitutions": {"dom": "example.com"}}
    ]);
    let (status, body) = engine.inject(&only_ours).await;
    assert_eq!(status, 400, "{body}");
    let metrics = engine.metrics().await;
    assert!(metric(&metrics, "drover_dkim_signatures_total{result=\"error\"}") >= 3.0);
    assert!(
        metric(
            &metrics,
            "drover_dkim_signatures_total{result=\"unsigned\"}"
        ) >= 1.0
    );
    engine.stop().await;
}

/// One SMTP transaction over a raw socket; returns the reply to the final dot.
async fn smtp_submit(addr: std::net::SocketAddr, rcpt: &str, data: &str) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut conn = BufReader::new(stream);
    let mut replies = Vec::new();
    for command in [
        None,
        Some("EHLO client.test".to_owned()),
        Some("MAIL FROM:<bounces@news.example.com>".to_owned()),
        Some(format!("RCPT TO:<{rcpt}>")),
        Some("DATA".to_owned()),
        Some(format!("{data}.")),
    ] {
        if let Some(c) = command {
            conn.get_mut()
                .write_all(format!("{c}\r\n").as_bytes())
                .await
                .unwrap();
        }
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read_line(&mut line))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed");
            if line.as_bytes().get(3) == Some(&b' ') {
                replies.push(line.trim_end().to_owned());
                break;
            }
        }
    }
    replies.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_submissions_are_signed_or_refused_with_554() {
    let sink = capturing_sink().await;
    let (dkim, records) = dkim_config();
    let engine = TestEngine::start(&format!(
        "{dkim}{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let addr = engine.running.as_ref().unwrap().smtp_addr.unwrap();
    let good = "From: Shop <shop@Shop.Example.com>\r\nTo: ann@example.test\r\n\
                Subject: folded\r\n  subject\r\n\r\nHello\r\n";
    let reply = smtp_submit(addr, "ann@example.test", good).await;
    assert!(reply.starts_with("250 "), "{reply}");
    let bad = "From: a@example.com\r\nFrom: b@example.com\r\nSubject: x\r\n\r\nHello\r\n";
    let reply = smtp_submit(addr, "bob@example.test", bad).await;
    assert!(reply.starts_with("554 5.6.0"), "{reply}");
    assert!(reply.contains("DKIM"), "{reply}");
    let msgs = wait_messages(&sink, 1).await;
    let text = String::from_utf8_lossy(&msgs[0].data);
    assert!(text.contains("\r\nReceived: from client.test"), "{text}");
    assert_eq!(
        verify(&msgs[0].data, &records).await,
        vec![Verdict::Pass, Verdict::Pass],
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.messages().len(), 1, "the refused message was not sent");
    engine.stop().await;
}

#[test]
fn check_config_names_a_bad_dkim_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key_file, needle) in [
        (dir.path().join("missing.pem"), "missing.pem"),
        (fixture("ec-p256.pem"), "neither an RSA nor an Ed25519 key"),
    ] {
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"{}\"\n",
                key_file.display()
            ),
        )
        .unwrap();
        let out = drover_command("check-config", &config);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("dkim[0].key_file"), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let config = dir.path().join("good.toml");
    std::fs::write(
        &config,
        format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"{}\"\n",
            fixture("rsa2048-pkcs1.pem").display()
        ),
    )
    .unwrap();
    assert_success(&drover_command("check-config", &config));
}

/// dkimpy (`python3 -m pip install dkimpy`) as an independent verifier, with the key records
/// given through its `dnsfunc` hook. `None` when it is not installed.
pub(crate) fn external_verify(message: &[u8], records: &[(String, String)]) -> Option<bool> {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import dkim"])
        .output()
        .ok()?;
    if !probe.status.success() {
        eprintln!("dkimpy is not installed; skipping the external check");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.eml");
    std::fs::write(&path, message).unwrap();
    let table: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .map(|(k, v)| (format!("{k}."), serde_json::Value::String(v.clone())))
        .collect();
    let script = "import dkim, json, sys\n\
                  table = json.loads(sys.argv[2])\n\
                  def dns(name, timeout=5):\n\
                  \x20   name = name.decode() if isinstance(name, bytes) else name\n\
                  \x20   value = table.get(name) or table.get(name.rstrip('.') + '.')\n\
                  \x20   return value.encode() if value else None\n\
                  msg = open(sys.argv[1], 'rb').read()\n\
                  d = dkim.DKIM(msg)\n\
                  n = len([l for l in msg.split(b'\\r\\n\\r\\n')[0].split(b'\\r\\n') if l.lower().startswith(b'dkim-signature:')])\n\
                  ok = all(d.verify(idx=i, dnsfunc=dns) for i in range(n))\n\
                  sys.exit(0 if ok and n > 0 else 1)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .arg(serde_json::Value::Object(table).to_string())
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!("dkimpy: {}", String::from_utf8_lossy(&out.stderr));
    }
    Some(out.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_mail_with_attachments_is_valid_mime_and_verifies() {
    use mail_parser::MimeHeaders;
    let sink = capturing_sink().await;
    let (dkim, records) = dkim_config();
    let engine = TestEngine::start(&format!(
        "{dkim}{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let pdf: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let mut body = message_for(&["ann@example.test".into()]);
    body["content"] = serde_json::json!({
        "from": {"email": "news@example.com", "name": "News"},
        "subject": "Your report, {{ name }}",
        "text_body": "Hello {{ name }}, see the attachment.",
        "html_body": "<p>Hello {{ name }}</p><img src=\"cid:logo\">",
        "attachments": [
            {"filename": "report.bin", "content_type": "application/octet-stream", "data": b64(&pdf)},
            {"filename": "logo.gif", "content_type": "image/gif", "data": b64(b"GIF89a"), "content_id": "logo"},
        ],
    });
    let (status, reply) = engine.inject(&body).await;
    assert_eq!(status, 200, "{reply}");
    let m = &wait_messages(&sink, 1).await[0];
    let parsed = mail_parser::MessageParser::default()
        .parse(&m.data)
        .expect("valid MIME");
    assert_eq!(parsed.content_type().unwrap().subtype(), Some("mixed"));
    let report = parsed
        .parts
        .iter()
        .find(|p| p.attachment_name() == Some("report.bin"))
        .expect("the attachment");
    assert_eq!(report.contents(), &pdf[..]);
    let logo = parsed
        .parts
        .iter()
        .find(|p| p.content_id() == Some("logo"))
        .expect("the inline image");
    assert_eq!(logo.contents(), b"GIF89a");
    assert_eq!(
        verify(&m.data, &records).await,
        vec![Verdict::Pass, Verdict::Pass]
    );
    if let Some(external) = external_verify(&m.data, &records) {
        assert!(external, "dkimpy rejects the built message");
    }
    engine.stop().await;
}

//! The inject API's answers to good and bad requests.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_400_and_queue_nothing() {
    let engine = TestEngine::start("[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n").await;
    let url = engine.url("/api/inject/v1");
    let client = reqwest::Client::new();
    let raw = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));

    let cases = [
        json!({"content": "Subject: x\r\n\r\nx", "recipients": [{"email": "a@example.test"}]}),
        json!({"envelope_sender": "s@example.com", "recipients": [{"email": "a@example.test"}]}),
        json!({"envelope_sender": "s@example.com", "content": "Subject: x\r\n\r\nx", "recipients": []}),
        json!({"envelope_sender": "s@example.com", "content": "Subject: x\r\n\r\nx", "recipients": [{"email": "not-an-address"}]}),
        json!({"envelope_sender": "s@exa\r\nmple.com", "content": "Subject: x\r\n\r\nx", "recipients": [{"email": "a@example.test"}]}),
        json!({"envelope_sender": "s@example.com", "content": "Subject: x\r\n\r\nx", "recipients": [{"email": "a@example.test", "bogus": 1}]}),
        json!({"envelope_sender": "s@example.com", "content": "Subject: x\r\n\r\nx", "recipients": [{"email": "a\r\nRCPT TO:<x@y>@example.test"}]}),
    ];
    for case in &cases {
        let (status, body) = engine.inject(case).await;
        assert_eq!(status, 400, "{case}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    // A template that does not compile is 422, as KumoMTA answers it.
    let broken = json!({"envelope_sender": "s@example.com", "content": "Subject: {{ broken\r\n\r\nx", "recipients": [{"email": "a@example.test"}]});
    let (status, body) = engine.inject(&broken).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("syntax error"),
        "{body}"
    );
    // Nothing was queued and nothing was recorded.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(records(&engine.accounting_path()).is_empty());
    let (_, queues) = get_json(&engine.url("/api/admin/v1/queues")).await;
    assert_eq!(queues["totals"]["ready"], 0);
    assert_eq!(queues["totals"]["scheduled"], 0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_valid_batches_report_each_failure() {
    let engine = TestEngine::start(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let (status, body) = engine
        .inject(&message_for(&[
            "ok@example.test".into(),
            "bad address".into(),
            "ok2@example.test".into(),
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success_count"], 2);
    assert_eq!(body["fail_count"], 1);
    assert_eq!(body["failed_recipients"], json!(["bad address"]));
    assert_eq!(body["errors"].as_array().unwrap().len(), 1);
    let ids = body["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 2);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(5), |r| {
        count_type(r, "Reception") == 2
    })
    .await;
    let reception = recs.iter().find(|r| r["type"] == "Reception").unwrap();
    assert_eq!(reception["campaign"], "nov-2026");
    assert_eq!(reception["tenant"], "acme");
    assert_eq!(reception["sender"], "bounces@news.example.com");
    assert!(ids.contains(&reception["id"]));
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_metadata_is_in_every_record_and_bounded() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let engine = TestEngine::start(&routes(&["meta.test"], sink.local_addr())).await;
    let mut body = message_for(&[]);
    body["recipients"] = json!([
        {"email": "a@meta.test", "metadata": {"user_id": 42, "list": ["x", "y"], "vip": true}},
        {"email": "b@meta.test"},
        {"email": "c@meta.test", "metadata": {"blob": "z".repeat(20_000)}},
    ]);
    let (status, reply) = engine.inject(&body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success_count"], 2);
    assert_eq!(reply["failed_recipients"], json!(["c@meta.test"]));
    assert!(reply["errors"][0].as_str().unwrap().contains("metadata"));
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 2
    })
    .await;
    for r in &recs {
        if r["recipient"] == "a@meta.test" {
            assert_eq!(
                r["metadata"],
                json!({"user_id": 42, "list": ["x", "y"], "vip": true}),
                "{r}"
            );
        } else {
            // Present and null (contract §4), not left out.
            assert!(r.as_object().unwrap().contains_key("metadata"));
            assert_eq!(r["metadata"], serde_json::Value::Null);
        }
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_when_configured_and_big_bodies_get_413() {
    let engine =
        TestEngine::start("[http]\napi_tokens = [\"s3cret\"]\nmax_body_size = 1000\n").await;
    let body = message_for(&["a@example.test".into()]);
    let url = engine.url("/api/inject/v1");
    let (status, _) = post_json(&url, &body, None).await;
    assert_eq!(status, 401);
    let (status, _) = post_json(&url, &body, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, _) = post_json(&url, &body, Some("s3cret")).await;
    assert_eq!(status, 200);
    let mut big = body.clone();
    big["content"] = json!(format!("Subject: big\r\n\r\n{}", "x".repeat(5000)));
    let (status, _) = post_json(&url, &big, Some("s3cret")).await;
    assert_eq!(status, 413);
    // Health endpoints need no token; metrics are served.
    let health = reqwest::get(engine.url("/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    wait_ready(&engine).await;
    let ready = reqwest::get(engine.url("/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = engine.metrics().await;
    assert!(
        metrics.contains("drover_messages_received_total"),
        "{metrics}"
    );
    engine.stop().await;
}

pub async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(url).await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}

/// A raw HTTP exchange: what the server answers to `head` (and `body`, sent only if given).
async fn raw_http(addr: std::net::SocketAddr, head: &str, body: Option<&[u8]>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    if let Some(body) = body {
        s.write_all(body).await.unwrap();
    }
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut reply))
        .await
        .expect("no answer while the body was still owed")
        .unwrap();
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_gets_401_before_its_body_is_read() {
    let engine =
        TestEngine::start("[http]\napi_tokens = [\"s3cret\"]\nmax_body_size = 1000\n").await;
    let addr = engine.running.as_ref().unwrap().http_addr;
    // A 100 MB body announced and never sent: the answer comes from the headers alone.
    let head = "POST /api/inject/v1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n";
    let reply = raw_http(addr, head, None).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    let admin = "POST /api/admin/v1/purge HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: 100000000\r\n\r\n";
    assert!(raw_http(addr, admin, None)
        .await
        .starts_with("HTTP/1.1 401"));
    // The scheme in any case.
    let body = message_for(&["a@example.test".into()]).to_string();
    let head = format!(
        "POST /api/inject/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: bearer s3cret\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let reply = raw_http(addr, &head, Some(body.as_bytes())).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    engine.stop().await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_accepted_and_bombs_and_unknown_encodings_refused() {
    let engine = TestEngine::start(
        "[http]\nmax_body_size = 100000\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let url = engine.url("/api/inject/v1");
    let client = reqwest::Client::new();
    let body = message_for(&["a@example.test".into(), "b@example.test".into()]).to_string();
    let resp = client
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let reply: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(reply["success_count"], 2);
    // 10 MB of JSON whitespace: about 10 KB compressed, over the limit once decoded.
    let mut bomb = body.clone().into_bytes();
    bomb.splice(1..1, std::iter::repeat_n(b' ', 10 << 20));
    let bomb = gzip(&bomb);
    assert!(bomb.len() < 100_000);
    let resp = client
        .post(&url)
        .header("Content-Encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let resp = client
        .post(&url)
        .header("Content-Encoding", "br")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_recipients_get_413_and_line_breaks_in_headers_400() {
    let engine = TestEngine::start(
        "[http]\nmax_recipients = 5\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n",
    )
    .await;
    let six: Vec<String> = (0..6).map(|i| format!("r{i}@example.test")).collect();
    let (status, reply) = engine.inject(&message_for(&six)).await;
    assert_eq!(status, 413, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("max_recipients"));
    let mut body = message_for(&["a@example.test".into()]);
    body["content"] = json!({
        "from": {"email": "news@example.com"},
        "subject": "Hi",
        "text_body": "x",
        "headers": {"X-Ok": "v\r\nBcc: evil@evil.test"},
    });
    let (status, reply) = engine.inject(&body).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("content.headers.X-Ok"),
        "{reply}"
    );
    let q = engine.get_json("/api/admin/v1/queues").await;
    assert_eq!(q["totals"]["scheduled"], 0);
    assert_eq!(q["totals"]["ready"], 0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mail_is_traced_completed_and_unicode_domains_go_out_as_a_labels() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["xn--bcher-kva.test"], sink.local_addr())).await;
    let mut body = message_for(&[]);
    body["content"] = json!("From: news@example.com\r\nSubject: no id, no date\r\n\r\nhello\r\n");
    body["recipients"] = json!([
        {"email": "ann@bücher.test"},
        {"email": "bob@xn--a.bücher"},
    ]);
    let (status, reply) = engine.inject(&body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success_count"], 1);
    let error = reply["errors"][0].as_str().unwrap();
    assert!(
        error.starts_with("bob@xn--a.bücher: ") && error.contains("IDNA"),
        "{error}"
    );
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let delivery = recs.iter().find(|r| r["type"] == "Delivery").unwrap();
    assert_eq!(delivery["recipient"], "ann@xn--bcher-kva.test");
    assert_eq!(delivery["domain"], "xn--bcher-kva.test");
    let m = &sink.messages()[0];
    assert_eq!(m.recipients, vec!["ann@xn--bcher-kva.test".to_owned()]);
    let data = String::from_utf8(m.data.clone()).unwrap();
    let id = delivery["id"].as_str().unwrap();
    assert!(
        data.starts_with(&format!(
            "Received: from api-client ([127.0.0.1])\r\n\tby drover.test (Drover) with HTTP id {id}\r\n\tfor <ann@xn--bcher-kva.test>; "
        )),
        "{data}"
    );
    assert!(
        data.contains(&format!(
            "\r\nMessage-ID: <{id}@news.example.com>\r\nDate: "
        )),
        "{data}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_templated_request_of_10_000_recipients_is_accepted() {
    let engine = TestEngine::start(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let recipients: Vec<String> = (0..10_000).map(|i| format!("r{i}@big.test")).collect();
    let (status, reply) = engine.inject(&message_for(&recipients)).await;
    assert_eq!(status, 200);
    assert_eq!(reply["success_count"], 10_000);
    assert_eq!(reply["ids"].as_array().unwrap().len(), 10_000);
    wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Reception") == 10_000
    })
    .await;
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_dialects_static_and_handlebars() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["dialect.test"], sink.local_addr())).await;
    for (dialect, content) in [
        ("Static", "Subject: s\r\n\r\nHi {{ name }}\r\n"),
        (
            "Handlebars",
            "Subject: h\r\n\r\nHi {{name}}{{#if vip}} (vip){{/if}}\r\n",
        ),
        ("Jinja", "Subject: j\r\n\r\nHi {{ name }}\r\n"),
    ] {
        let body = json!({
            "envelope_sender": "s@example.com",
            "content": content,
            "template_dialect": dialect,
            "recipients": [{"email": format!("{dialect}@dialect.test"), "name": "Ann", "substitutions": {"vip": true}}],
        });
        let (status, reply) = engine.inject(&body).await;
        assert_eq!(status, 200, "{dialect}: {reply}");
    }
    let start = std::time::Instant::now();
    while sink.messages().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for m in sink.messages() {
        let text = String::from_utf8(m.data.clone()).unwrap();
        let expect = match m.recipients[0].split('@').next().unwrap() {
            "Static" => "Hi {{ name }}\r\n",
            "Handlebars" => "Hi Ann (vip)\r\n",
            _ => "Hi Ann\r\n",
        };
        assert!(text.ends_with(expect), "{text}");
    }
    let (status, _) = engine
        .inject(&json!({"envelope_sender": "s@example.com", "content": "x", "template_dialect": "Mustache", "recipients": [{"email": "a@dialect.test"}]}))
        .await;
    assert_eq!(status, 400);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_may_ask_for_no_received_header() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["trace.test"], sink.local_addr())).await;
    let body = json!({
        "envelope_sender": "s@example.com",
        "content": "Subject: quiet\r\n\r\nhello\r\n",
        "trace_headers": {"received_header": false, "supplemental_header": false},
        "recipients": [{"email": "a@trace.test"}],
    });
    let (status, reply) = engine.inject(&body).await;
    assert_eq!(status, 200, "{reply}");
    let start = std::time::Instant::now();
    while sink.messages().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20), "not delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = String::from_utf8(sink.messages()[0].data.clone()).unwrap();
    assert!(
        text.starts_with("Subject: quiet\r\nMessage-ID: <"),
        "{text}"
    );
    assert!(!text.contains("Received:"), "{text}");
    engine.stop().await;
}

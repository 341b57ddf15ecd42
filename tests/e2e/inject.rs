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
        json!({"envelope_sender": "s@example.com", "content": "Subject: {{ broken\r\n\r\nx", "recipients": [{"email": "a@example.test"}]}),
        json!({"envelope_sender": "s@example.com", "content": "Subject: x\r\n\r\nx", "recipients": [{"email": "a@example.test", "bogus": 1}]}),
        json!({"envelope_sender": "s@example.com", "content": "Subject: x\r\n\r\nx", "recipients": [{"email": "a\r\nRCPT TO:<x@y>@example.test"}]}),
    ];
    for case in &cases {
        let (status, body) = engine.inject(case).await;
        assert_eq!(status, 400, "{case}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
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

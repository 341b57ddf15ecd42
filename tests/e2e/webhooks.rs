//! Webhooks: records reach an HTTP endpoint at least once, in order, signed, across an
//! endpoint outage and a `kill -9`.

use crate::harness::*;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "webhook-test-secret";

#[derive(Default)]
struct Receiver {
    /// Requests to refuse with 500 before accepting.
    refuse: usize,
    requests: usize,
    /// Every record of every accepted batch, in arrival order.
    records: Vec<serde_json::Value>,
    bad_signatures: usize,
}

async fn start_receiver(state: Arc<Mutex<Receiver>>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let state = Arc::clone(&state);
            async move {
                let mut s = state.lock().unwrap();
                s.requests += 1;
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                mac.update(&body);
                let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                if headers
                    .get("x-drover-signature")
                    .and_then(|v| v.to_str().ok())
                    != Some(&want)
                {
                    s.bad_signatures += 1;
                }
                if s.refuse > 0 {
                    s.refuse -= 1;
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let batch: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                s.records.extend(batch);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn inject(port: u16, recipients: &[String]) -> Vec<String> {
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/inject/v1"))
        .json(&message_for(recipients))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    ids_of(&resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_webhook_in_order_across_an_outage_and_a_kill() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let state = Arc::new(Mutex::new(Receiver {
        refuse: 4,
        ..Receiver::default()
    }));
    let receiver = start_receiver(Arc::clone(&state)).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n[accounting]\nrotate_size = \"16KiB\"\n[[webhook]]\nname = \"platform\"\nurl = \"http://{receiver}/events\"\nsecret = \"{SECRET}\"\nbatch_size = 25\nmax_delay = \"100ms\"\nmax_backoff = \"1s\"\n{}",
            dir.path().join("data"),
            routes(&["w.test"], sink.local_addr())
        ),
    )
    .unwrap();
    let accounting = dir.path().join("data/accounting.jsonl");
    let mut child = spawn_drover(&config);
    wait_port_ready(port).await;
    let mut ids = Vec::new();
    for batch in 0..3 {
        let rcpts: Vec<String> = (0..20).map(|i| format!("a{batch}-{i}@w.test")).collect();
        ids.extend(inject(port, &rcpts).await);
    }
    // Some batches went (after the refusals), then the process dies mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while state.lock().unwrap().records.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook never got a batch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn_drover(&config);
    wait_port_ready(port).await;
    let rcpts: Vec<String> = (0..20).map(|i| format!("a3-{i}@w.test")).collect();
    ids.extend(inject(port, &rcpts).await);
    // An outside rotation (logrotate's dateext style) while it runs: the current file is
    // renamed under a name Drover does not use; the next write starts a new one.
    let moved = dir.path().join("data/accounting.jsonl-20261129");
    std::fs::rename(&accounting, &moved).unwrap();
    let rcpts: Vec<String> = (0..20).map(|i| format!("a4-{i}@w.test")).collect();
    ids.extend(inject(port, &rcpts).await);
    // Every record of the log, wherever it now is, reaches the endpoint.
    let all_records = || {
        let mut recs = records(&moved);
        recs.extend(records(&accounting));
        recs
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let logged = loop {
        let recs = all_records();
        if ids.iter().all(|id| {
            recs.iter()
                .any(|r| r["id"] == id.as_str() && r["type"] == "Delivery")
        }) {
            break recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every message was delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // What came after the rename went to new files at the path (which may since have been
    // rotated by size), not into the renamed one.
    let is_a4 = |r: &serde_json::Value| {
        r["type"] == "Reception"
            && r["recipient"]
                .as_str()
                .is_some_and(|a| a.starts_with("a4-"))
    };
    assert!(
        records(&accounting).iter().any(is_a4),
        "no records at the accounting path after the rename"
    );
    assert!(!records(&moved).iter().any(is_a4));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = state.lock().unwrap().records.clone();
        let missing = logged.iter().filter(|r| !got.contains(r)).count();
        if missing == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing} of {} records never reached the webhook",
            logged.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/api/admin/v1/webhooks"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let s = state.lock().unwrap();
    assert_eq!(s.bad_signatures, 0);
    assert!(s.requests > 4, "the refused batches were not retried");
    // In order per message: a message's Reception arrives before its Delivery, and nothing
    // the log does not hold was invented.
    let mut seen: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in &s.records {
        assert!(logged.contains(r), "a record not in the log: {r}");
        seen.entry(r["id"].as_str().unwrap())
            .or_default()
            .push(r["type"].as_str().unwrap());
    }
    for id in &ids {
        let kinds = &seen[id.as_str()];
        let reception = kinds.iter().position(|k| *k == "Reception").unwrap();
        let delivery = kinds.iter().position(|k| *k == "Delivery").unwrap();
        assert!(reception < delivery, "{id}: {kinds:?}");
    }
    let hook = &status["webhooks"][0];
    assert_eq!(hook["name"], "platform");
    assert_eq!(hook["lag_records"], 0, "{status}");
    assert!(
        segment_files(&accounting).len() > 1,
        "the log never rotated"
    );
}

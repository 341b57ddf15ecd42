//! A hostile MX that never ends its EHLO reply: its messages are deferred, and everybody
//! else's mail flows as if it were not there.

use crate::harness::*;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Greets, then answers EHLO with `250-` continuation lines as fast as it can until the client
/// hangs up. Returns its address and the count of connections it took.
async fn start_flooding_mx() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(flood(stream));
        }
    });
    (address, connections)
}

async fn flood(stream: TcpStream) {
    let mut stream = BufReader::new(stream);
    if stream
        .get_mut()
        .write_all(b"220 hostile.test ESMTP\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut line = String::new();
    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let lines = b"250-xxxxxxxx\r\n".repeat(4096);
    while stream.get_mut().write_all(&lines).await.is_ok() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_mx_gets_its_messages_deferred_and_holds_up_no_one_else() {
    let (hostile, hostile_connections) = start_flooding_mx().await;
    let healthy = start_sink(sink::SinkConfig::default()).await;
    let engine = TestEngine::start(&format!(
        "{}{}",
        routes(&["hostile.test"], hostile),
        routes(&["healthy.test"], healthy.local_addr())
    ))
    .await;
    // The hostile destination's mail goes in first, so it is in the way from the start.
    let doomed: Vec<String> = (0..20).map(|i| format!("h{i}@hostile.test")).collect();
    assert_eq!(engine.inject(&message_for(&doomed)).await.0, 200);
    for batch in 0..2 {
        let recipients: Vec<String> = (0..1000)
            .map(|i| format!("u{batch}-{i}@healthy.test"))
            .collect();
        let (status, body) = engine.inject(&message_for(&recipients)).await;
        assert_eq!(status, 200, "{body}");
    }
    let hostile_failures = |recs: &[serde_json::Value]| -> Vec<serde_json::Value> {
        recs.iter()
            .filter(|r| r["domain"] == "hostile.test" && r["type"] == "TransientFailure")
            .cloned()
            .collect()
    };
    // Only a hang guard; the healthy mail takes about a second.
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") == 2000 && hostile_failures(r).len() == 20
    })
    .await;
    engine.stop().await;

    let delivered: HashSet<&str> = recs
        .iter()
        .filter(|r| r["type"] == "Delivery")
        .map(|r| {
            assert_eq!(r["domain"], "healthy.test", "{r}");
            r["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(delivered.len(), 2000);
    assert_eq!(healthy.stats().transactions, 2000);

    let failures = hostile_failures(&recs);
    let deferred: HashSet<&str> = failures
        .iter()
        .map(|r| r["recipient"].as_str().unwrap())
        .collect();
    assert_eq!(deferred.len(), 20, "one deferral per message: {failures:?}");
    for r in &failures {
        assert_eq!(r["response"]["code"], 451, "{r}");
        assert_eq!(r["response"]["enhanced_code"], "4.4.1", "{r}");
        assert_eq!(r["bounce_category"], "no-answer-from-host", "{r}");
        let text = r["response"]["text"].as_str().unwrap();
        assert!(
            text.contains("protocol error during EHLO: reply of more than 128 lines"),
            "{text}"
        );
    }
    for kind in ["Bounce", "Expiration"] {
        assert_eq!(count_type(&recs, kind), 0, "no {kind} records");
    }
    assert!(hostile_connections.load(Ordering::Relaxed) >= 1);
}

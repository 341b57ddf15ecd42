//! Fair queuing (issue 17): one tenant's backlog never holds another tenant's mail, high
//! priority overtakes, low priority still drains; tenant weights split a destination's
//! deliveries. Against a real sink, with the destination limited to 300 messages a second.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

fn batch(tenant: &str, n: usize, priority: &str) -> Value {
    json!({
        "envelope_sender": "news@sender.example.com",
        "content": "From: news@sender.example.com\r\nSubject: s\r\n\r\nbody\r\n",
        "recipients": (0..n).map(|i| json!({"email": format!("{tenant}{i}@example.test")})).collect::<Vec<_>>(),
        "tenant": tenant,
        "priority": priority,
    })
}

fn stamp(r: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        r["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// Deliveries in the order they were recorded: the tenant of each.
fn delivered_tenants(recs: &[Value]) -> Vec<String> {
    recs.iter()
        .filter(|r| r["type"] == "Delivery")
        .map(|r| r["tenant"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The share of `tenant` among the deliveries made while both `a` and `b` still had mail
/// waiting (from the first delivery of the later one to the last delivery of the earlier end).
fn share_while_both_wait(order: &[String], a: &str, b: &str, tenant: &str) -> f64 {
    let first = |t: &str| order.iter().position(|x| x == t).unwrap();
    let last = |t: &str| order.iter().rposition(|x| x == t).unwrap();
    let from = first(a).max(first(b));
    let to = last(a).min(last(b));
    let window = &order[from..=to];
    let both: Vec<&String> = window.iter().filter(|t| *t == a || *t == b).collect();
    both.iter().filter(|t| **t == tenant).count() as f64 / both.len() as f64
}

async fn engine(sink: &sink::SinkHandle, extra: &str) -> TestEngine {
    TestEngine::start(&format!(
        "{}[[shaping]]\nmatch = \"example.test\"\nmax_message_rate = \"300/s\"\nmax_connections = 2\n{extra}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_shares_a_busy_destination_and_high_priority_overtakes() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let engine = engine(&sink, "").await;
    let (status, _) = engine.inject(&batch("big", 1500, "normal")).await;
    assert_eq!(status, 200);
    let (status, _) = engine.inject(&batch("small", 400, "normal")).await;
    assert_eq!(status, 200);
    let (status, _) = engine.inject(&batch("lowly", 40, "low")).await;
    assert_eq!(status, 200);
    // The admin API shows the waiting mail by tenant and priority (accepted mail is queued
    // once its Reception record is down, a moment after the reply).
    let wanted = [("big", "normal"), ("small", "normal"), ("lowly", "low")];
    let start = std::time::Instant::now();
    loop {
        let listing = engine.get_json("/api/admin/v1/queues?groups=true").await;
        let groups: Vec<Value> = listing["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["destination"] == "example.test")
            .flat_map(|d| d["groups"].as_array().cloned().unwrap_or_default())
            .collect();
        let shown = wanted.iter().all(|(tenant, priority)| {
            groups
                .iter()
                .any(|g| g["tenant"] == *tenant && g["priority"] == *priority)
        });
        if shown && listing["ready_by_priority"]["low"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{listing}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, urgent) = engine.inject(&batch("reset", 1, "high")).await;
    assert_eq!(status, 200, "{urgent}");
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") == 1941
    })
    .await;
    // The password reset went out within a second, not behind the newsletter.
    let id = urgent["ids"][0].as_str().unwrap();
    let at = |kind: &str| {
        stamp(
            recs.iter()
                .find(|r| r["type"] == kind && r["id"] == id)
                .unwrap(),
        )
    };
    let waited = at("Delivery") - at("Reception");
    assert!(
        waited < time::Duration::seconds(1),
        "the high-priority message waited {waited}"
    );
    let order = delivered_tenants(&recs);
    let share = share_while_both_wait(&order, "big", "small", "small");
    assert!(
        (0.4..=0.6).contains(&share),
        "small got {share:.2} of the deliveries while both waited"
    );
    // Low priority drained before the normal backlog did.
    let last_low = order.iter().rposition(|t| t == "lowly").unwrap();
    let last_big = order.iter().rposition(|t| t == "big").unwrap();
    assert!(
        last_low < last_big,
        "low priority waited for the whole normal backlog"
    );
    let metrics = engine.metrics().await;
    assert!(
        metrics.contains("drover_queue_ready_messages{priority=\"high\"}"),
        "{metrics}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_weights_split_a_destination() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let engine = engine(&sink, "[[tenant]]\nname = \"gold\"\nweight = 3\n").await;
    let (status, _) = engine.inject(&batch("gold", 900, "normal")).await;
    assert_eq!(status, 200);
    let (status, _) = engine.inject(&batch("basic", 600, "normal")).await;
    assert_eq!(status, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") == 1500
    })
    .await;
    let order = delivered_tenants(&recs);
    let share = share_while_both_wait(&order, "gold", "basic", "gold");
    assert!(
        (0.65..=0.85).contains(&share),
        "gold got {share:.2} with weight 3:1"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_is_validated_and_taken_from_smtp_then_removed() {
    let sink = capturing_sink().await;
    let engine = engine(&sink, "").await;
    let (status, body) = engine.inject(&batch("t", 1, "urgent")).await;
    assert_eq!(status, 400, "{body}");
    let sent = smtp_transaction(
        &engine,
        "client.test",
        "news@sender.example.com",
        &["x@example.test"],
        b"From: news@sender.example.com\r\nX-Drover-Priority: high\r\nSubject: s\r\n\r\nbody\r\n",
    )
    .await;
    assert_eq!(sent.data.map(|r| r.code), Some(250));
    let msgs = crate::dkim::wait_messages(&sink, 1).await;
    let text = String::from_utf8_lossy(&msgs[0].data);
    assert!(
        !text.to_ascii_lowercase().contains("x-drover-priority"),
        "{text}"
    );
    engine.stop().await;
}

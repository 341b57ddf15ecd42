//! Operator control: suspend, resume, retry-now and purge, by domain and by campaign.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;

async fn admin(engine: &TestEngine, action: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, reply) =
        post_json(&engine.url(&format!("/api/admin/v1/{action}")), &body, None).await;
    assert_eq!(status, 200, "{action}: {reply}");
    reply
}

async fn queues(engine: &TestEngine) -> serde_json::Value {
    engine.get_json("/api/admin/v1/queues").await
}

fn destination<'a>(q: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    q["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_domain_waits_across_a_restart_and_flows_when_resumed() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let extra = routes(&["hold.test", "flow.test"], sink.local_addr());
    let engine = TestEngine::start(&extra).await;
    let reply = admin(&engine, "suspend", json!({"domain": "hold.test"})).await;
    assert_eq!(reply["suspended_until"], serde_json::Value::Null);
    let held: Vec<String> = (0..5).map(|i| format!("h{i}@hold.test")).collect();
    let flowing: Vec<String> = (0..5).map(|i| format!("f{i}@flow.test")).collect();
    assert_eq!(engine.inject(&message_for(&held)).await.0, 200);
    assert_eq!(engine.inject(&message_for(&flowing)).await.0, 200);
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 5
    })
    .await;
    let q = queues(&engine).await;
    let hold = destination(&q, "hold.test").unwrap();
    assert_eq!(hold["ready"], 5);
    assert!(hold["suspended_until"].is_null());
    let holds: serde_json::Value = engine.get_json("/api/admin/v1/suspensions").await;
    assert_eq!(
        holds["suspensions"],
        json!([{"domain": "hold.test", "suspended_until": null}])
    );

    // The hold is durable.
    let dir = engine.stop().await;
    let engine = TestEngine::start_in(dir, &extra).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count_type(&records(&engine.accounting_path()), "Delivery"),
        5
    );
    assert_eq!(
        destination(&queues(&engine).await, "hold.test").unwrap()["ready"],
        5
    );

    let reply = admin(&engine, "resume", json!({"domain": "hold.test"})).await;
    assert_eq!(reply["was_suspended"], true);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 10
    })
    .await;
    assert!(recs
        .iter()
        .filter(|r| r["type"] == "Delivery")
        .all(|r| r["attempt"] == 1));
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_campaign_is_parked_then_purged_with_admin_bounces() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let engine = TestEngine::start(&routes(&["camp.test"], sink.local_addr())).await;
    admin(
        &engine,
        "suspend",
        json!({"campaign": "nov-2026", "duration": "1h"}),
    )
    .await;
    let recipients: Vec<String> = (0..4).map(|i| format!("c{i}@camp.test")).collect();
    let (_, body) = engine.inject(&message_for(&recipients)).await;
    let ids = body["ids"].as_array().unwrap().clone();
    // A different campaign to the same domain still flows.
    let mut other = message_for(&["x@camp.test".into()]);
    other["campaign"] = json!("dec-2026");
    assert_eq!(engine.inject(&other).await.0, 200);
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let q = queues(&engine).await;
    assert_eq!(q["totals"]["parked"], 4);
    let reply = admin(&engine, "purge", json!({"campaign": "nov-2026"})).await;
    assert_eq!(reply["purged"], 4);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(5), |r| {
        count_type(r, "AdminBounce") == 4
    })
    .await;
    for id in &ids {
        let finals: Vec<_> = recs
            .iter()
            .filter(|r| &r["id"] == id && r["type"] != "Reception")
            .collect();
        assert_eq!(finals.len(), 1, "{id}");
        assert_eq!(finals[0]["type"], "AdminBounce");
        // A purge is no receiver's verdict: no category, counted apart.
        assert_eq!(finals[0]["bounce_category"], serde_json::Value::Null);
    }
    let metrics = engine.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "drover_messages_bounced_total{category=\"admin\"}"
        ) >= 4.0
    );
    let q = queues(&engine).await;
    assert_eq!(q["totals"]["parked"], 0);
    assert_eq!(sink.stats().transactions, 1);
    // Bad admin requests are refused clearly.
    let (status, _) = post_json(&engine.url("/api/admin/v1/purge"), &json!({}), None).await;
    assert_eq!(status, 400);
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/resume"),
        &json!({"domain": "camp.test|ip1"}),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert!(reply["error"]
        .as_str()
        .unwrap()
        .contains("without the |source part"));
    let (status, _) = post_json(
        &engine.url("/api/admin/v1/suspend"),
        &json!({"domain": "a", "campaign": "b"}),
        None,
    )
    .await;
    assert_eq!(status, 400);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_delivers_deferred_messages_without_waiting() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let engine = TestEngine::start(&format!(
        "{}[retry]\nintervals = [\"1h\"]\n",
        routes(&["late.test"], addr)
    ))
    .await;
    let recipients: Vec<String> = (0..3).map(|i| format!("l{i}@late.test")).collect();
    assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "TransientFailure") == 3
    })
    .await;
    assert_eq!(
        destination(&queues(&engine).await, "late.test").unwrap()["scheduled"],
        3
    );
    let sink = sink::Sink::bind(addr, sink::SinkConfig::default())
        .await
        .unwrap();
    let reply = admin(&engine, "retry", json!({"domain": "late.test"})).await;
    assert_eq!(reply["rescheduled"], 3);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 3
    })
    .await;
    assert!(recs
        .iter()
        .filter(|r| r["type"] == "Delivery")
        .all(|r| r["attempt"] == 2));
    assert_eq!(sink.stats().transactions, 3);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kumomta_admin_calls_suspend_list_cancel_and_bounce() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["kumo.test"], sink.local_addr())).await;
    let (status, reply) = post_json(
        &engine.url("/api/admin/suspend/v1"),
        &json!({"domain": "kumo.test", "reason": "maintenance", "duration": "1h"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();
    let listed: serde_json::Value = reqwest::get(engine.url("/api/admin/suspend/v1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["domain"], "kumo.test");
    // Held: injected mail waits.
    let mut body = message_for(&["a@kumo.test".into(), "b@kumo.test".into()]);
    body["campaign"] = json!("doomed");
    let (status, _) = engine.inject(&body).await;
    assert_eq!(status, 200);
    let (status, _) = engine.inject(&message_for(&["c@kumo.test".into()])).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.messages().is_empty());
    // A bounce of the campaign ends its two messages with AdminBounce records.
    let (status, reply) = post_json(
        &engine.url("/api/admin/bounce/v1"),
        &json!({"campaign": "doomed", "reason": "sent by mistake"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["total_bounced"], 2);
    assert_eq!(reply["bounced"]["doomed"], 2);
    // Cancelling the suspension by its id lets the rest flow.
    let cancelled = reqwest::Client::new()
        .delete(engine.url("/api/admin/suspend/v1"))
        .json(&json!({ "id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status().as_u16(), 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1 && count_type(r, "AdminBounce") == 2
    })
    .await;
    assert!(recs
        .iter()
        .any(|r| r["type"] == "Delivery" && r["recipient"] == "c@kumo.test"));
    let again = reqwest::Client::new()
        .delete(engine.url("/api/admin/suspend/v1"))
        .json(&json!({ "id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 404);
    let (status, _) = post_json(
        &engine.url("/api/admin/suspend/v1"),
        &json!({"tenant": "acme", "reason": "x"}),
        None,
    )
    .await;
    assert_eq!(status, 400);
    engine.stop().await;
}

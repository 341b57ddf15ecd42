//! Traffic shaping: automation rules react to receivers; limits hold.

use crate::harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tss04_reply_suspends_its_destination_while_others_flow_and_rules_can_bounce() {
    let yahoo = start_sink(sink::SinkConfig {
        reply_after_messages: Some((
            0,
            421,
            "4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred".into(),
        )),
        ..Default::default()
    })
    .await;
    let full = start_sink(sink::SinkConfig {
        reply_after_messages: Some((0, 452, "4.2.2 Mailbox full".into())),
        ..Default::default()
    })
    .await;
    let healthy = start_sink(sink::SinkConfig::default()).await;
    let extra = format!(
        "{}{}{}[[automation]]\nmatch_response = \"TSS0[45]\"\naction = \"suspend\"\nduration = \"1h\"\n\
         [[automation]]\nmatch_response = \"4\\\\.2\\\\.2\"\naction = \"bounce\"\n[retry]\nintervals = [\"1s\"]\n",
        routes(&["yahoo.test"], yahoo.local_addr()),
        routes(&["full.test"], full.local_addr()),
        routes(&["fine.test"], healthy.local_addr()),
    );
    let engine = TestEngine::start(&extra).await;
    let mut recipients: Vec<String> = (0..6).map(|i| format!("y{i}@yahoo.test")).collect();
    recipients.extend((0..6).map(|i| format!("f{i}@fine.test")));
    recipients.push("x@full.test".into());
    assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(15), |r| {
        count_type(r, "Delivery") == 6
            && count_type(r, "Bounce") == 1
            && count_type(r, "TransientFailure") >= 1
    })
    .await;
    let yahoo_failures = |recs: &[serde_json::Value]| -> Vec<serde_json::Value> {
        recs.iter()
            .filter(|r| r["domain"] == "yahoo.test" && r["type"] == "TransientFailure")
            .cloned()
            .collect()
    };
    assert!(!yahoo_failures(&recs).is_empty());
    // Give a wrongly unsuspended queue the chance to show itself (retries are due after 1 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = yahoo_failures(&records(&engine.accounting_path()));
    // The two sessions already under way when the first 421 came may each finish their
    // attempt; nothing starts after that.
    assert!(later.len() <= 2, "{later:?}");
    assert_eq!(later.len() as u64, yahoo.stats().connections);
    assert!(later.iter().all(|r| r["bounce_category"] == "rate-limited"));
    let bounce = recs.iter().find(|r| r["type"] == "Bounce").unwrap();
    assert_eq!(bounce["recipient"], "x@full.test");
    assert_eq!(bounce["response"]["code"], 452);
    let queues: serde_json::Value = engine.get_json("/api/admin/v1/queues").await;
    let held = queues["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == "yahoo.test")
        .unwrap();
    assert!(held["suspended_until"].is_string(), "{held}");
    assert_eq!(
        held["scheduled"].as_u64().unwrap() + held["ready"].as_u64().unwrap(),
        6
    );
    let metrics = engine.metrics().await;
    assert!(
        metrics.contains("drover_automation_actions_total{action=\"suspend\"}"),
        "{metrics}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_reply_puts_the_site_in_backoff_until_the_operator_lifts_it() {
    let gmail = start_sink(sink::SinkConfig {
        reply_after_messages: Some((
            0,
            421,
            "4.7.28 Our system has detected an unusual rate of unsolicited mail".into(),
        )),
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}[[automation]]\nmatch_response = \"4\\\\.7\\\\.28\"\naction = \"backoff\"\nduration = \"1h\"\n\
         [[shaping]]\nmatch = \"gmail.test\"\nmax_connections = 8\nbackoff_max_connections = 1\n[retry]\nintervals = [\"1h\"]\n",
        routes(&["gmail.test"], gmail.local_addr())
    ))
    .await;
    assert_eq!(
        engine
            .inject(&message_for(&["a@gmail.test".into()]))
            .await
            .0,
        200
    );
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "TransientFailure") == 1
    })
    .await;
    let holds: serde_json::Value = engine.get_json("/api/admin/v1/suspensions").await;
    assert_eq!(holds["backoff"], serde_json::json!(["route:gmail.test"]));
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/resume"),
        &serde_json::json!({"domain": "route:gmail.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["was_suspended"], true);
    let holds: serde_json::Value = engine.get_json("/api/admin/v1/suspensions").await;
    assert_eq!(holds["backoff"], serde_json::json!([]));
    engine.stop().await;
}

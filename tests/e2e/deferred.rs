//! KumoMTA's `deferred_generation`: the request is stored and answered at once, expanded
//! later through the normal path, and resumed after a crash with every recipient delivered
//! exactly once.

use crate::harness::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const PENDING: &str = "drover_deferred_generation_pending";

fn deferred(recipients: &[String]) -> Value {
    let mut body = message_for(recipients);
    for (i, r) in body["recipients"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        r["metadata"] = json!({"customer": i});
    }
    body["deferred_generation"] = json!(true);
    body
}

/// How many final (Delivery) records and messages at the sink each recipient has.
fn deliveries(recs: &[Value], domain: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in recs.iter().filter(|r| r["type"] == "Delivery") {
        if r["domain"] == domain {
            *out.entry(r["recipient"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_request_is_answered_at_once_then_delivered_with_its_records() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["gen.test"], sink.local_addr())).await;
    // One recipient suppressed (refused at expansion), one invalid (refused in the answer).
    let (status, body) = post_json(
        &engine.url("/api/admin/v1/suppressions"),
        &json!({"entries": [{"tenant": "acme", "address": "r7@gen.test"}]}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut recipients: Vec<String> = (0..50).map(|i| format!("r{i}@gen.test")).collect();
    recipients.push("not an address".into());
    let (status, body) = engine.inject(&deferred(&recipients)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success_count"], 0, "{body}");
    assert_eq!(body["fail_count"], 1, "{body}");
    assert_eq!(body["failed_recipients"], json!(["not an address"]));
    assert_eq!(body["ids"], json!([]));
    assert_eq!(body["generation_id"].as_str().unwrap().len(), 32, "{body}");

    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        deliveries(r, "gen.test").len() == 49
    })
    .await;
    let delivered = deliveries(&recs, "gen.test");
    assert!(delivered.values().all(|&n| n == 1), "{delivered:?}");
    assert!(!delivered.contains_key("r7@gen.test"));
    for kind in ["Reception", "Delivery"] {
        let of_kind: Vec<&Value> = recs.iter().filter(|r| r["type"] == kind).collect();
        assert_eq!(of_kind.len(), 49, "{kind}");
        for r in of_kind {
            let n: usize = r["recipient"].as_str().unwrap()[1..]
                .split('@')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(r["metadata"], json!({"customer": n}), "{r}");
            assert_eq!(r["campaign"], "nov-2026");
            assert_eq!(r["tenant"], "acme");
        }
    }
    let mut at_sink: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        for r in m.recipients {
            *at_sink.entry(r).or_default() += 1;
        }
        // Rendered as a normal inject renders it: trace header, substitutions.
        let text = String::from_utf8_lossy(&m.data);
        assert!(text.contains("Hi N, your plan is gold."), "{text}");
        assert!(
            text.contains("Received: from api-client ([127.0.0.1])"),
            "{text}"
        );
    }
    assert_eq!(at_sink.len(), 49);
    assert!(at_sink.values().all(|&n| n == 1));
    // The request is deleted after its last chunk is queued, which deliveries can overtake.
    let start = std::time::Instant::now();
    let metrics = loop {
        let metrics = engine.metrics().await;
        if metric_value(&metrics, PENDING) == 0.0 || start.elapsed() > Duration::from_secs(10) {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric_value(&metrics, PENDING), 0.0, "{metrics}");
    assert!(metric_value(&metrics, "drover_deferred_generation_recipients_total") >= 49.0);
    assert!(metric_value(&metrics, "drover_deferred_generation_refused_total") >= 1.0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_request_that_cannot_be_used_stores_nothing() {
    let engine = TestEngine::start("[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n").await;
    // A template that does not compile is still 422.
    let mut broken = deferred(&["a@gen.test".into()]);
    broken["content"] = json!("Subject: {{ broken\r\n\r\nx");
    let (status, body) = engine.inject(&broken).await;
    assert_eq!(status, 422, "{body}");
    // No valid recipient: 400, as without deferred generation.
    let (status, body) = engine.inject(&deferred(&["not an address".into()])).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["fail_count"], 1, "{body}");
    let spool = engine.running.as_ref().unwrap().engine.spool().clone();
    assert!(spool.generations(usize::MAX).unwrap().is_empty());
    assert!(records(&engine.accounting_path()).is_empty());
    engine.stop().await;
}

/// The request is stored but not expanded (the queue is full behind a suspended domain) when
/// the process is killed: the next start expands it and every recipient is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_request_survives_kill_9_and_is_delivered_exactly_once() {
    let sink = capturing_sink().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("drover.toml");
    let write_config = |max_queued: usize| {
        std::fs::write(
            &config,
            format!(
                "[spool]\npath = {:?}\nmax_queued = {max_queued}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n{}",
                dir.path().join("data"),
                routes(&["hold.test", "gen.test"], sink.local_addr())
            ),
        )
        .unwrap();
    };
    write_config(5);
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let mut child = spawn_drover(&config);
    wait_port_ready(port).await;
    let (status, body) = post_json(
        &url("/api/admin/v1/suspend"),
        &json!({"domain": "hold.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let held: Vec<String> = (0..5).map(|i| format!("h{i}@hold.test")).collect();
    let (status, body) = post_json(&url("/api/inject/v1"), &message_for(&held), None).await;
    assert_eq!((status, body["success_count"].clone()), (200, json!(5)));
    let recipients: Vec<String> = (0..50).map(|i| format!("r{i}@gen.test")).collect();
    let (status, body) = post_json(&url("/api/inject/v1"), &deferred(&recipients), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success_count"], 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = reqwest::get(url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric_value(&metrics, PENDING), 1.0, "{metrics}");
    assert!(sink.messages().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();

    write_config(10_000);
    let mut child = spawn_drover(&config);
    wait_port_ready(port).await;
    let accounting = dir.path().join("data/accounting.jsonl");
    wait_records(&accounting, Duration::from_secs(30), |r| {
        deliveries(r, "gen.test").len() == 50
    })
    .await;
    // Anything expanded twice would arrive a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = records(&accounting);
    let finals = deliveries(&recs, "gen.test");
    assert_eq!(finals.len(), 50);
    assert!(finals.values().all(|&n| n == 1), "{finals:?}");
    let receptions = recs
        .iter()
        .filter(|r| r["type"] == "Reception" && r["domain"] == "gen.test")
        .count();
    assert_eq!(receptions, 50);
    let mut at_sink: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        for r in m.recipients {
            *at_sink.entry(r).or_default() += 1;
        }
    }
    assert_eq!(at_sink.len(), 50, "{at_sink:?}");
    assert!(at_sink.values().all(|&n| n == 1), "{at_sink:?}");
    // The request is deleted after its last chunk is queued, which deliveries can overtake.
    let start = std::time::Instant::now();
    let metrics = loop {
        let metrics = reqwest::get(url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric_value(&metrics, PENDING) == 0.0 || start.elapsed() > Duration::from_secs(10) {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric_value(&metrics, PENDING), 0.0, "{metrics}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The disk fills in the middle of an expansion: the generator waits for the spool to take
/// writes again and resumes at its marker; nothing is dropped, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_generator_and_loses_no_recipient() {
    let Some(disk) = queue::testing::SmallDisk::mount("24m") else {
        eprintln!("SKIPPED full-disk test: cannot mount a tmpfs (needs root)");
        return;
    };
    let sink = capturing_sink().await;
    // The records stay on the normal disk: this is about the spool.
    let engine =
        crate::fulldisk::engine_on_disk(disk.path(), &routes(&["gen.test"], sink.local_addr()))
            .await;
    // Held, so the queue only grows while the disk fills.
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/suspend"),
        &json!({"domain": "gen.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    // About 12 MiB left (less what RocksDB holds already); 300 messages of 40 KB need 12.
    std::fs::write(disk.path().join("ballast"), vec![0u8; 12 << 20]).unwrap();
    let recipients: Vec<String> = (0..300).map(|i| format!("r{i}@gen.test")).collect();
    let mut body = deferred(&recipients);
    let line = "x".repeat(76);
    body["content"] = json!(format!(
        "From: News <news@example.com>\r\nSubject: Large\r\n\r\n{}",
        format!("{line}\r\n").repeat(40_000 / 78)
    ));
    let (status, reply) = engine.inject(&body).await;
    assert_eq!(status, 200, "{reply}");
    let started = std::time::Instant::now();
    while reqwest::get(engine.url("/readyz"))
        .await
        .unwrap()
        .status()
        .is_success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the disk never filled up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric_value(&engine.metrics().await, PENDING), 1.0);
    let id: queue::MessageId = reply["generation_id"].as_str().unwrap().parse().unwrap();
    let spool = engine.running.as_ref().unwrap().engine.spool().clone();
    let (_, marker) = spool.generation(&id).unwrap().unwrap();
    eprintln!("full disk: the generator stopped at recipient {marker} of 300");
    assert!(marker < 300);

    std::fs::remove_file(disk.path().join("ballast")).unwrap();
    let started = std::time::Instant::now();
    while metric_value(&engine.metrics().await, PENDING) != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the generator never finished after space returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/resume"),
        &json!({"domain": "gen.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        deliveries(r, "gen.test").len() == 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = records(&engine.accounting_path());
    let finals = deliveries(&recs, "gen.test");
    assert!(finals.values().all(|&n| n == 1), "{finals:?}");
    assert_eq!(count_type(&recs, "Reception"), 300);
    let mut at_sink: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        for r in m.recipients {
            *at_sink.entry(r).or_default() += 1;
        }
    }
    assert_eq!(at_sink.len(), 300);
    assert!(at_sink.values().all(|&n| n == 1));
    engine.stop().await;
    sink.shutdown().await;
    drop(disk);
}

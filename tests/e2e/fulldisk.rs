//! Full disk: the spool on a small tmpfs fills up; injection answers 503 with Retry-After,
//! nothing acknowledged is lost or half-written, and everything flows again once space returns.
//!
//! The accounting file stays on the normal disk: this test is about the spool, and with the
//! records on the same full file system a `Reception` record can be lost (the message itself
//! is safe), which would make "every accepted id has its Reception" untestable.

use crate::harness::*;
use queue::testing::SmallDisk;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const BODY_SIZE: usize = 200_000;

fn large_message(n: usize) -> Value {
    let line = "x".repeat(76);
    let body: String = std::iter::repeat_n(format!("{line}\r\n"), BODY_SIZE / 78).collect();
    json!({
        "envelope_sender": "bounces@news.example.com",
        "content": format!("From: News <news@example.com>\r\nSubject: Large {n}\r\n\r\n{body}"),
        "recipients": [{"email": format!("h{n}@held.test")}, {"email": format!("l{n}@live.test")}],
    })
}

/// Status, `Retry-After` header and body of an injection.
async fn inject(engine: &TestEngine, body: &Value) -> (u16, Option<String>, Value) {
    let resp = reqwest::Client::new()
        .post(engine.url("/api/inject/v1"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        retry_after,
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn readyz(engine: &TestEngine) -> u16 {
    reqwest::get(engine.url("/readyz"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_answers_503_loses_nothing_and_recovers() {
    let Some(disk) = SmallDisk::mount("24m") else {
        eprintln!("SKIPPED full-disk test: cannot mount a tmpfs (needs root)");
        return;
    };
    // Deliveries to live.test run while the disk fills (their final writes may hit it);
    // held.test is held until the end, so most messages are still queued when it is full.
    let sink = start_sink(sink::SinkConfig {
        capture: true,
        latency: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let engine = engine_on_disk(
        disk.path(),
        &routes(&["held.test", "live.test"], sink.local_addr()),
    )
    .await;
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/suspend"),
        &json!({"domain": "held.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");

    // Leave about 8 MiB: some 20 requests of two 200 KB messages.
    std::fs::write(disk.path().join("ballast"), vec![0u8; 16 << 20]).unwrap();
    let mut accepted: HashMap<String, String> = HashMap::new(); // id -> recipient
    let mut refused: Vec<String> = Vec::new();
    let mut n = 0;
    while refused.is_empty() {
        assert!(n < 200, "the spool never filled up");
        let (status, retry_after, reply) = inject(&engine, &large_message(n)).await;
        match status {
            200 => {
                let ids = ids_of(&reply);
                assert_eq!(ids.len(), 2, "{reply}");
                accepted.insert(ids[0].clone(), format!("h{n}@held.test"));
                accepted.insert(ids[1].clone(), format!("l{n}@live.test"));
            }
            503 => {
                assert!(retry_after.is_some(), "503 without Retry-After: {reply}");
                refused.extend([format!("h{n}@held.test"), format!("l{n}@live.test")]);
            }
            other => panic!("unexpected {other}: {reply}"),
        }
        n += 1;
    }
    assert!(accepted.len() >= 10, "only {} accepted", accepted.len());
    // Degraded: refused at once, and /readyz says so.
    for _ in 0..3 {
        let started = Instant::now();
        let (status, retry_after, reply) = inject(&engine, &large_message(n)).await;
        assert_eq!(status, 503, "{reply}");
        assert!(retry_after.is_some());
        assert!(started.elapsed() < Duration::from_secs(2));
        refused.extend([format!("h{n}@held.test"), format!("l{n}@live.test")]);
        n += 1;
    }
    assert_eq!(readyz(&engine).await, 503);
    let recs = records(&engine.accounting_path());
    let received: HashSet<&str> = recs
        .iter()
        .filter(|r| r["type"] == "Reception")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for id in accepted.keys() {
        assert!(received.contains(id.as_str()), "no Reception for {id}");
    }

    // Space returns.
    std::fs::remove_file(disk.path().join("ballast")).unwrap();
    let started = Instant::now();
    loop {
        let (status, _, reply) = inject(&engine, &large_message(n)).await;
        if status == 200 {
            let ids = ids_of(&reply);
            accepted.insert(ids[0].clone(), format!("h{n}@held.test"));
            accepted.insert(ids[1].clone(), format!("l{n}@live.test"));
            break;
        }
        assert_eq!(status, 503, "{reply}");
        refused.extend([format!("h{n}@held.test"), format!("l{n}@live.test")]);
        n += 1;
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "injection did not recover after space returned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(readyz(&engine).await, 200);
    eprintln!(
        "full disk: {} messages accepted, {} refused, writable again after {:?}",
        accepted.len(),
        refused.len(),
        started.elapsed()
    );
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/resume"),
        &json!({"domain": "held.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");

    let finals = ["Delivery", "Bounce", "Expiration", "AdminBounce"];
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(15), |r| {
        r.iter()
            .filter(|r| finals.contains(&r["type"].as_str().unwrap()))
            .count()
            >= accepted.len()
    })
    .await;
    // Exactly one final record per accepted id, a Delivery; none for anything else.
    let mut final_count: HashMap<&str, usize> = HashMap::new();
    for r in recs
        .iter()
        .filter(|r| finals.contains(&r["type"].as_str().unwrap()))
    {
        assert_eq!(r["type"], "Delivery", "{r}");
        *final_count.entry(r["id"].as_str().unwrap()).or_default() += 1;
    }
    assert_eq!(final_count.len(), accepted.len());
    for id in accepted.keys() {
        assert_eq!(final_count.get(id.as_str()), Some(&1), "{id}");
    }
    // Refused recipients were never queued; accepted ones arrived exactly once.
    let mut arrived: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        for r in m.recipients {
            *arrived.entry(r).or_default() += 1;
        }
    }
    for recipient in &refused {
        assert!(
            !arrived.contains_key(recipient),
            "{recipient} was refused but delivered"
        );
        assert!(
            !recs.iter().any(|r| r["recipient"] == recipient.as_str()),
            "{recipient} was refused but has records"
        );
    }
    for recipient in accepted.values() {
        assert_eq!(arrived.get(recipient), Some(&1), "{recipient}");
    }
    engine.stop().await;
    sink.shutdown().await;
    drop(disk);
}

/// An engine on `config` whose spool is on `disk` (a small file system the test fills) and
/// whose accounting records stay on the normal disk, where `TestEngine::accounting_path`
/// looks (see the module header).
pub(crate) async fn engine_on_disk(disk: &std::path::Path, config: &str) -> TestEngine {
    let dir = tempfile::tempdir().unwrap();
    let mut config = drover::Config::parse(config).unwrap();
    config.spool.path = disk.join("spool");
    config.accounting.path = dir
        .path()
        .join("spool/accounting.jsonl")
        .to_string_lossy()
        .into_owned();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.smtp_listener.listen = "127.0.0.1:0".parse().unwrap();
    config.delivery.ehlo_name = "drover.test".into();
    TestEngine {
        running: Some(drover::serve::start(config).await.unwrap()),
        dir,
    }
}

//! kill -9 under load: every accepted message still ends in exactly one final record.

use crate::harness::*;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_and_finalises_once() {
    let sink = start_sink(sink::SinkConfig {
        capture: true,
        latency: Duration::from_millis(2),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            // Segments of a few hundred records, half of them compressed: the kills land
            // while they rotate.
            "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n[retry]\nintervals = [\"1s\"]\n[accounting]\nrotate_size = \"32KiB\"\ncompress = true\n{}",
            dir.path().join("data"),
            routes(&["k1.test", "k2.test"], sink.local_addr())
        ),
    )
    .unwrap();
    let accounting = dir.path().join("data/accounting.jsonl");
    let url = format!("http://127.0.0.1:{port}/api/inject/v1");
    let mut accepted: Vec<(String, String)> = Vec::new();
    let mut batch = 0;
    for round in 0..4 {
        let mut child = spawn_drover(&config);
        wait_port_ready(port).await;
        let kill_after = Duration::from_millis(rand::rng().random_range(150..600));
        let started = std::time::Instant::now();
        // Inject until the kill; requests in flight at the kill may or may not have been
        // answered: only answered ones count as accepted.
        while started.elapsed() < kill_after {
            let recipients: Vec<String> = (0..20)
                .map(|i| format!("r{batch}-{i}@k{}.test", 1 + i % 2))
                .collect();
            batch += 1;
            match reqwest::Client::new()
                .post(&url)
                .json(&message_for(&recipients))
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => {
                    let body: serde_json::Value = resp.json().await.unwrap();
                    let ids = body["ids"].as_array().unwrap();
                    assert_eq!(ids.len(), recipients.len());
                    for (id, r) in ids.iter().zip(&recipients) {
                        accepted.push((id.as_str().unwrap().to_owned(), r.clone()));
                    }
                }
                _ => break,
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!(
            "round {round}: killed after {kill_after:?}, {} accepted so far",
            accepted.len()
        );
    }
    // A last, undisturbed run delivers whatever is left.
    let mut child = spawn_drover(&config);
    wait_port_ready(port).await;
    let want: HashSet<&str> = accepted.iter().map(|(id, _)| id.as_str()).collect();
    let recs = wait_records(&accounting, Duration::from_secs(60), |recs| {
        let finals: HashSet<&str> = recs
            .iter()
            .filter(|r| {
                matches!(
                    r["type"].as_str(),
                    Some("Delivery" | "Bounce" | "Expiration" | "AdminBounce")
                )
            })
            .filter_map(|r| r["id"].as_str())
            .collect();
        want.iter().all(|id| finals.contains(id))
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mut finals: HashMap<&str, usize> = HashMap::new();
    for r in &recs {
        if matches!(
            r["type"].as_str(),
            Some("Delivery" | "Bounce" | "Expiration" | "AdminBounce")
        ) {
            *finals.entry(r["id"].as_str().unwrap()).or_default() += 1;
        }
    }
    assert!(!accepted.is_empty());
    for (id, _) in &accepted {
        assert_eq!(
            finals.get(id.as_str()),
            Some(&1),
            "message {id} must have exactly one final record"
        );
    }
    let received: HashSet<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.recipients.clone())
        .collect();
    for (_, rcpt) in &accepted {
        assert!(received.contains(rcpt), "{rcpt} never reached the sink");
    }
    let segments = segment_files(&accounting);
    assert!(segments.len() >= 3, "the log never rotated: {segments:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_final_record_was_written_before_a_crash_is_not_delivered_again() {
    // The engine appends a final record, then deletes the message without a sync. Play the
    // crash in between: a deferred message gets a Delivery record behind the engine's back
    // while it stays spooled. The next start must delete it, not deliver it again.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let extra = format!(
        "{}[retry]\nintervals = [\"1h\"]\n",
        routes(&["later.test"], addr)
    );
    let engine = TestEngine::start(&extra).await;
    let recipients = vec!["done@later.test".to_owned(), "owed@later.test".to_owned()];
    let (status, body) = engine.inject(&message_for(&recipients)).await;
    assert_eq!(status, 200, "{body}");
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "TransientFailure") == 2
    })
    .await;
    let dir = engine.stop().await;
    let accounting = dir.path().join("spool/accounting.jsonl");
    let mut delivered = recs
        .iter()
        .find(|r| r["type"] == "TransientFailure" && r["recipient"] == "done@later.test")
        .unwrap()
        .clone();
    delivered["type"] = "Delivery".into();
    delivered["response"]["code"] = 250.into();
    let done_id = delivered["id"].as_str().unwrap().to_owned();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&accounting)
            .unwrap();
        writeln!(f, "{delivered}").unwrap();
    }

    let sink = capturing_sink_at(addr).await;
    let engine = TestEngine::start_in(dir, &extra).await;
    // The reload runs in the background: wait until it has queued what it will.
    let mut queued = 0;
    for _ in 0..100 {
        queued = engine.get_json("/api/admin/v1/queues").await["totals"]["scheduled"]
            .as_u64()
            .unwrap_or(0);
        if queued > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(queued, 1, "only the owed message is queued");
    let (status, reply) = post_json(
        &engine.url("/api/admin/v1/retry"),
        &serde_json::json!({"domain": "later.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["rescheduled"], 1);
    let recs = wait_records(&accounting, Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 2
    })
    .await;
    engine.stop().await;
    let finals_of_done = recs
        .iter()
        .filter(|r| r["id"] == done_id.as_str() && r["type"] == "Delivery")
        .count();
    assert_eq!(finals_of_done, 1);
    let received: Vec<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.recipients.clone())
        .collect();
    assert_eq!(received, vec!["owed@later.test".to_owned()]);
}

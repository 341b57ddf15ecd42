//! The engine stays within its bounds: rate waits hold no session, session setup is capped,
//! workers are capped and shared fairly, a read error delays a message instead of losing it,
//! and a big purge is one pass that leaves injection alone.

use crate::harness::*;
use resolver_cache::testing::TestDns;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SHARED_ZONE: &str = r#"
$ORIGIN shared.test.
$TTL 60
@        IN SOA ns.shared.test. admin.shared.test. ( 1 3600 600 86400 30 )
@        IN NS  ns
ns       IN A   127.0.0.1
slow     IN MX  10 mx
fast     IN MX  10 mx
mx       IN A   127.0.0.1
"#;

fn request(recipients: &[String], tenant: &str) -> serde_json::Value {
    json!({
        "envelope_sender": "bounces@news.example.com",
        "content": "From: n@example.com\r\nSubject: hi\r\n\r\nhi\r\n",
        "recipients": recipients.iter().map(|r| json!({"email": r})).collect::<Vec<_>>(),
        "tenant": tenant,
    })
}

fn delivered_position(recs: &[serde_json::Value], domain: &str) -> Vec<usize> {
    recs.iter()
        .enumerate()
        .filter(|(_, r)| r["type"] == "Delivery" && r["domain"] == domain)
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_tenant_never_idles_the_sites_only_session() {
    let dns = TestDns::start(SHARED_ZONE, "shared.test.").await;
    let sink = start_sink(sink::SinkConfig::default()).await;
    // Both domains share one MX, so one site and its single connection.
    let engine = TestEngine::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[delivery]\nsmtp_port = {}\n\
         [[shaping]]\nmatch = \"*\"\nmax_connections = 1\n\
         [[rate_limit]]\ntenant = \"slow\"\nmax_message_rate = \"1/s\"\n",
        dns.addr,
        sink.local_addr().port()
    ))
    .await;
    let slow: Vec<String> = (0..4).map(|i| format!("s{i}@slow.shared.test")).collect();
    let fast: Vec<String> = (0..30).map(|i| format!("f{i}@fast.shared.test")).collect();
    assert_eq!(engine.inject(&request(&slow, "slow")).await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.inject(&request(&fast, "fast")).await.0, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        count_type(r, "Delivery") == 34
    })
    .await;
    // The slow tenant's four messages take three seconds; the other tenant's mail went over
    // the same session meanwhile instead of waiting for them.
    let last_slow = *delivered_position(&recs, "slow.shared.test")
        .last()
        .unwrap();
    let last_fast = *delivered_position(&recs, "fast.shared.test")
        .last()
        .unwrap();
    assert!(
        last_fast < last_slow,
        "the fast tenant waited for the slow one"
    );
    assert!(sink.stats().max_concurrent_connections <= 1);
    engine.stop().await;
}

/// Listeners that accept connections and never say a word; counts the connections.
async fn silent_hosts(n: usize) -> (Vec<std::net::SocketAddr>, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let accepted = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
    }
    (addrs, accepted)
}

async fn one_failed_attempt(extra_delivery: &str, hosts: &[std::net::SocketAddr]) -> String {
    let list: Vec<String> = hosts.iter().map(|a| format!("\"{a}\"")).collect();
    let engine = TestEngine::start(&format!(
        "[[route]]\ndomain = \"silent.test\"\nhosts = [{}]\n\
         [delivery]\nbanner_timeout = \"1s\"\n{extra_delivery}\n[retry]\nintervals = [\"1h\"]\n",
        list.join(", ")
    ))
    .await;
    assert_eq!(
        engine
            .inject(&message_for(&["a@silent.test".to_owned()]))
            .await
            .0,
        200
    );
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        count_type(r, "TransientFailure") == 1
    })
    .await;
    engine.stop().await;
    let failure = recs
        .iter()
        .find(|r| r["type"] == "TransientFailure")
        .unwrap();
    failure["response"]["text"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_attempt_tries_a_bounded_number_of_addresses_in_a_bounded_time() {
    // Six MX addresses that each hold the client for a whole banner timeout.
    let (hosts, accepted) = silent_hosts(6).await;
    let text = one_failed_attempt("mx_address_limit = 3", &hosts).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "{text}");
    assert!(text.contains("banner"), "{text}");

    let (hosts, accepted) = silent_hosts(6).await;
    let text = one_failed_attempt("session_setup_timeout = \"1500ms\"", &hosts).await;
    // One banner timeout (1 s) fits in the budget, the second address is cut short.
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "{text}");
    assert!(text.contains("session setup"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_capped_and_small_domains_are_not_starved_by_a_big_one() {
    let sink = start_sink(sink::SinkConfig {
        latency: Duration::from_millis(2),
        ..Default::default()
    })
    .await;
    let small: Vec<String> = (0..10).map(|i| format!("s{i}.test")).collect();
    let mut domains: Vec<&str> = small.iter().map(String::as_str).collect();
    domains.push("big.test");
    let engine = TestEngine::start(&format!(
        "{}[delivery]\nmax_workers = 2\n",
        routes(&domains, sink.local_addr())
    ))
    .await;
    let big: Vec<String> = (0..300).map(|i| format!("u{i}@big.test")).collect();
    assert_eq!(engine.inject(&message_for(&big)).await.0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let small_rcpts: Vec<String> = small.iter().map(|d| format!("x@{d}")).collect();
    assert_eq!(engine.inject(&message_for(&small_rcpts)).await.0, 200);
    let running = Arc::clone(&engine.running.as_ref().unwrap().engine);
    let mut most = 0;
    let start = std::time::Instant::now();
    while count_type(&records(&engine.accounting_path()), "Delivery") < 310 {
        most = most.max(running.workers_running());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not all delivered"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!((1..=2).contains(&most), "{most} workers at once");
    let recs = records(&engine.accounting_path());
    let last_big = *delivered_position(&recs, "big.test").last().unwrap();
    for d in &small {
        let pos = delivered_position(&recs, d);
        assert_eq!(pos.len(), 1, "{d}");
        assert!(pos[0] < last_big, "{d} waited for the whole big domain");
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_spool_read_error_delays_a_message_instead_of_dropping_it() {
    let sink = start_sink(sink::SinkConfig::default()).await;
    let engine = TestEngine::start(&routes(&["read.test"], sink.local_addr())).await;
    wait_ready(&engine).await;
    let running = Arc::clone(&engine.running.as_ref().unwrap().engine);
    let hold = queue::Selector::Domain("read.test".into());
    running.suspend(&hold, None).await.unwrap();
    assert_eq!(
        engine
            .inject(&message_for(&["a@read.test".to_owned()]))
            .await
            .0,
        200
    );
    while running.scheduler().totals().ready == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The worker's read fails as it does while the spool is being reopened.
    running.spool().fail_next_reads(1);
    running.resume(&hold).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        running.scheduler().len(),
        1,
        "the message left the schedule"
    );
    assert_eq!(
        count_type(&records(&engine.accounting_path()), "Delivery"),
        0
    );
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let delivery = recs.iter().find(|r| r["type"] == "Delivery").unwrap();
    assert_eq!(delivery["attempt"], 1, "a read error is not an attempt");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_hundred_thousand_messages_leaves_injection_working() {
    const QUEUED: usize = 100_000;
    let sink = start_sink(sink::SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    fill_spool(&dir.path().join("spool"), QUEUED, 3_600_000, Some("bulk")).await;
    let engine = TestEngine::start_in(dir, &routes(&["live.test"], sink.local_addr())).await;
    wait_ready(&engine).await;
    let purge_url = engine.url("/api/admin/v1/purge");
    let purging =
        tokio::spawn(
            async move { post_json(&purge_url, &json!({"campaign": "bulk"}), None).await },
        );
    let (status, _) = engine
        .inject(&message_for(&["a@live.test".to_owned()]))
        .await;
    assert_eq!(status, 200);
    let (status, reply) = tokio::time::timeout(Duration::from_secs(120), purging)
        .await
        .expect("purge hung")
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["purged"], QUEUED);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    assert_eq!(count_type(&recs, "AdminBounce"), QUEUED);
    let running = &engine.running.as_ref().unwrap().engine;
    assert_eq!(running.scheduler().len(), 0);
    assert_eq!(
        running.spool().scan().count(),
        0,
        "purged messages left the spool"
    );
    engine.stop().await;
}

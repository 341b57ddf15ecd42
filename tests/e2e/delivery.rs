//! Messages from injection to a real SMTP sink, with the records they earn.

use crate::harness::*;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_messages_to_three_domains_are_delivered_over_reused_sessions() {
    let sink = capturing_sink().await;
    let domains = ["a.example.test", "b.example.test", "c.example.test"];
    let engine = TestEngine::start(&routes(&domains, sink.local_addr())).await;
    let recipients: Vec<String> = (0..200)
        .map(|i| format!("user{i}@{}", domains[i % 3]))
        .collect();
    let mut ids = Vec::new();
    for chunk in recipients.chunks(100) {
        let (status, body) = engine.inject(&message_for(chunk)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success_count"], 100);
        ids.extend(
            body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
    }
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        count_type(r, "Delivery") >= 200
    })
    .await;
    assert_eq!(count_type(&recs, "Delivery"), 200);
    assert_eq!(count_type(&recs, "Reception"), 200);
    assert_eq!(count_type(&recs, "TransientFailure"), 0);
    let stats = sink.stats();
    assert_eq!(stats.transactions, 200);
    assert_eq!(stats.recipients, 200);
    assert!(stats.connections < 200, "sessions were reused: {stats:?}");
    // Every injected id got exactly one Delivery, with the contract's fields.
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for r in recs.iter().filter(|r| r["type"] == "Delivery") {
        *delivered
            .entry(r["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert_eq!(r["response"]["code"], 250);
        assert_eq!(r["attempt"], 1);
        assert_eq!(r["campaign"], "nov-2026");
        assert_eq!(r["peer"]["address"], sink.local_addr().to_string());
        assert!(r["queue_time_ms"].is_u64());
        assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(delivered.len(), 200);
    assert!(ids.iter().all(|id| delivered.get(id) == Some(&1)));
    // Personalised content arrived.
    let msgs = sink.messages();
    let sample = msgs
        .iter()
        .find(|m| m.recipients[0] == "user7@b.example.test")
        .unwrap();
    let text = String::from_utf8_lossy(&sample.data);
    assert!(text.contains("Hi N, your plan is gold."), "{text}");
    assert_eq!(sample.sender, "bounces@news.example.com");
    assert_eq!(sample.helo, "drover.test");
    engine.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisted_messages_are_retried_and_delivered() {
    let sink = start_sink(sink::SinkConfig {
        greylist: Some(Duration::from_secs(2)),
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}[retry]\nintervals = [\"1s\"]\ngreylist_retry = \"2s\"\n",
        routes(&["grey.test"], sink.local_addr())
    ))
    .await;
    let recipients: Vec<String> = (0..5).map(|i| format!("u{i}@grey.test")).collect();
    let (status, _) = engine.inject(&message_for(&recipients)).await;
    assert_eq!(status, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        count_type(r, "Delivery") >= 5
    })
    .await;
    for rcpt in &recipients {
        let mine: Vec<&serde_json::Value> = recs
            .iter()
            .filter(|r| r["recipient"] == rcpt.as_str() && r["type"] != "Reception")
            .collect();
        let kinds: Vec<&str> = mine.iter().map(|r| r["type"].as_str().unwrap()).collect();
        assert_eq!(kinds[0], "TransientFailure", "{rcpt}: {kinds:?}");
        assert_eq!(*kinds.last().unwrap(), "Delivery", "{rcpt}: {kinds:?}");
        assert_eq!(mine[0]["bounce_category"], "greylisted");
        assert_eq!(mine[0]["response"]["code"], 450);
        assert!(mine.last().unwrap()["attempt"].as_u64().unwrap() >= 2);
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_recipients_bounce_once() {
    let sink = start_sink(sink::SinkConfig {
        reject_percent: 100,
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&routes(&["nobody.test"], sink.local_addr())).await;
    let (status, _) = engine
        .inject(&message_for(&[
            "ghost@nobody.test".into(),
            "ghost2@nobody.test".into(),
        ]))
        .await;
    assert_eq!(status, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Bounce") >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recs_after = records(&engine.accounting_path());
    assert_eq!(
        count_type(&recs_after, "Bounce"),
        2,
        "no second final record"
    );
    let bounce = recs.iter().find(|r| r["type"] == "Bounce").unwrap();
    assert_eq!(bounce["response"]["code"], 550);
    assert_eq!(bounce["response"]["enhanced_code"], "5.1.1");
    assert_eq!(bounce["bounce_category"], "bad-mailbox");
    assert_eq!(count_type(&recs_after, "Delivery"), 0);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_a_restart() {
    // A port with nobody listening: the first attempts fail, then the sink comes up there.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let extra = format!(
        "{}[retry]\nintervals = [\"1s\"]\n",
        routes(&["later.test"], addr)
    );
    let engine = TestEngine::start(&extra).await;
    let recipients: Vec<String> = (0..10).map(|i| format!("r{i}@later.test")).collect();
    let (status, body) = engine.inject(&message_for(&recipients)).await;
    assert_eq!(status, 200, "{body}");
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "TransientFailure") >= 10
    })
    .await;
    let dir = engine.stop().await;
    let recs = records(&dir.path().join("spool/accounting.jsonl"));
    let failure = recs
        .iter()
        .find(|r| r["type"] == "TransientFailure")
        .unwrap();
    assert_eq!(failure["bounce_category"], "no-answer-from-host");

    let sink = sink::Sink::bind(addr, sink::SinkConfig::default())
        .await
        .unwrap();
    let engine = TestEngine::start_in(dir, &extra).await;
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
        count_type(r, "Delivery") >= 10
    })
    .await;
    assert_eq!(count_type(&recs, "Delivery"), 10);
    assert_eq!(sink.stats().transactions, 10);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_thousands_due_delivers_each_message_once() {
    // Thousands of messages due at start: the reload queues them from the schedule index,
    // then its full scan meets them again while workers already deliver them. The scan must
    // neither hand an in-flight message to a second worker nor bring back a finished one.
    const N: usize = 4000;
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let extra = format!(
        "{}[retry]\nintervals = [\"1s\"]\n",
        routes(&["many.test"], addr)
    );
    let engine = TestEngine::start(&extra).await;
    for chunk in 0..N / 1000 {
        let recipients: Vec<String> = (0..1000)
            .map(|i| format!("r{chunk}-{i}@many.test"))
            .collect();
        let (status, body) = engine.inject(&message_for(&recipients)).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        count_type(r, "TransientFailure") >= N
    })
    .await;
    let dir = engine.stop().await;
    // Let every message come due before the restart.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sink = capturing_sink_at(addr).await;
    let engine = TestEngine::start_in(dir, &extra).await;
    wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") >= N
    })
    .await;
    // A message handed out twice would still be on its way: wait for the queue to empty.
    for _ in 0..100 {
        let totals = engine.get_json("/api/admin/v1/queues").await["totals"].clone();
        if totals["in_flight"] == 0 && totals["ready"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recs = records(&engine.accounting_path());
    engine.stop().await;
    let delivered: Vec<&str> = recs
        .iter()
        .filter(|r| r["type"] == "Delivery")
        .filter_map(|r| r["id"].as_str())
        .collect();
    let unique: std::collections::HashSet<&str> = delivered.iter().copied().collect();
    assert_eq!(unique.len(), N);
    assert_eq!(delivered.len(), N, "some message has two Delivery records");
    assert_eq!(
        sink.stats().transactions as usize,
        N,
        "the sink got duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_used_when_offered_and_required_mode_defers_unverifiable_hosts() {
    let sink = start_sink(sink::SinkConfig {
        tls: Some(sink::SinkTls::self_signed(&["mx.tls.test"]).unwrap()),
        capture: true,
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}[[shaping]]\nmatch = \"strict.test\"\ntls = \"required\"\n[retry]\nintervals = [\"1h\"]\n",
        routes(&["tls.test", "strict.test"], sink.local_addr())
    ))
    .await;
    assert_eq!(
        engine
            .inject(&message_for(&["a@tls.test".into(), "b@strict.test".into()]))
            .await
            .0,
        200
    );
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1 && count_type(r, "TransientFailure") == 1
    })
    .await;
    let delivery = recs.iter().find(|r| r["type"] == "Delivery").unwrap();
    assert_eq!(delivery["recipient"], "a@tls.test");
    assert!(
        delivery["tls"].as_str().unwrap().starts_with("TLSv1."),
        "{delivery}"
    );
    assert!(sink.messages()[0].tls.is_some());
    let deferred = recs
        .iter()
        .find(|r| r["type"] == "TransientFailure")
        .unwrap();
    assert_eq!(deferred["recipient"], "b@strict.test");
    assert_eq!(deferred["response"]["code"], 451);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_respect_max_connections_and_deliveries_per_connection() {
    let sink = start_sink(sink::SinkConfig {
        latency: Duration::from_millis(1),
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}[[shaping]]\nmatch = \"many.test\"\nmax_connections = 3\nmax_deliveries_per_connection = 100\n",
        routes(&["many.test"], sink.local_addr())
    ))
    .await;
    for batch in 0..10 {
        let recipients: Vec<String> = (0..100)
            .map(|i| format!("u{batch}-{i}@many.test"))
            .collect();
        assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    }
    wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") == 1000
    })
    .await;
    let stats = sink.stats();
    assert_eq!(stats.transactions, 1000);
    assert!(stats.max_concurrent_connections <= 3, "{stats:?}");
    assert!(
        stats.connections >= 10,
        "at most 100 deliveries per session: {stats:?}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylisted_retries_leave_from_the_same_source_address() {
    // The sink greylists per (client IP, sender, recipient): a retry from the other source
    // would be greylisted again, so delivery on attempt 2 proves the source stuck.
    let sink = start_sink(sink::SinkConfig {
        greylist: Some(Duration::from_secs(2)),
        capture: true,
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}[retry]\nintervals = [\"1s\"]\ngreylist_retry = \"3s\"\n\
         [[egress_source]]\nname = \"ip2\"\nsource_address = \"127.0.0.2\"\nehlo_name = \"mta2.drover.test\"\n\
         [[egress_source]]\nname = \"ip3\"\nsource_address = \"127.0.0.3\"\nehlo_name = \"mta3.drover.test\"\n",
        routes(&["grey2.test"], sink.local_addr())
    ))
    .await;
    let recipients: Vec<String> = (0..12).map(|i| format!("g{i}@grey2.test")).collect();
    assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(30), |r| {
        count_type(r, "Delivery") == 12
    })
    .await;
    let mut sources = std::collections::HashSet::new();
    for r in recs.iter().filter(|r| r["type"] == "Delivery") {
        assert_eq!(r["attempt"], 2, "{r}");
        let first = recs
            .iter()
            .find(|f| f["type"] == "TransientFailure" && f["id"] == r["id"])
            .unwrap();
        assert_eq!(first["bounce_category"], "greylisted");
        assert_eq!(first["source"], r["source"], "same source for the retry");
        sources.insert(r["source"].as_str().unwrap().to_owned());
    }
    assert_eq!(sources.len(), 2, "both sources carried mail: {sources:?}");
    for m in sink.messages() {
        let want = if m.helo == "mta2.drover.test" {
            "127.0.0.2"
        } else {
            "127.0.0.3"
        };
        assert_eq!(
            m.peer.ip().to_string(),
            want,
            "EHLO name and address belong together"
        );
    }
    assert_eq!(sink.stats().greylisted, 12);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_closed_by_421_or_dropped_after_data_lose_no_message() {
    // 421 after every 3 messages on a connection: the session closes, the message that got
    // the 421 is retried, the others go over new sessions.
    let closing = start_sink(sink::SinkConfig {
        reply_after_messages: Some((3, 421, "4.3.2 Too many messages for this session".into())),
        ..Default::default()
    })
    .await;
    // Half of the connections vanish after the final dot: outcome unknown, so retried.
    let dropping = start_sink(sink::SinkConfig {
        drop_after_data_percent: 50,
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}{}[retry]\nintervals = [\"1s\"]\n",
        routes(&["closing.test"], closing.local_addr()),
        routes(&["dropping.test"], dropping.local_addr())
    ))
    .await;
    let mut recipients: Vec<String> = (0..20).map(|i| format!("c{i}@closing.test")).collect();
    recipients.extend((0..20).map(|i| format!("d{i}@dropping.test")));
    assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(40), |r| {
        count_type(r, "Delivery") == 40
    })
    .await;
    assert_eq!(count_type(&recs, "Bounce"), 0);
    let failures: Vec<_> = recs
        .iter()
        .filter(|r| r["type"] == "TransientFailure")
        .collect();
    assert!(
        failures.iter().any(|r| r["response"]["code"] == 421),
        "421s were seen"
    );
    assert!(
        failures.iter().any(
            |r| r["domain"] == "dropping.test" && r["bounce_category"] == "no-answer-from-host"
        ),
        "drops after DATA were deferred, not bounced"
    );
    assert_eq!(closing.stats().transactions, 20);
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_addresses_need_smtputf8_and_bounce_clearly_without_it() {
    let modern = capturing_sink().await;
    let old = start_sink(sink::SinkConfig {
        smtputf8: false,
        eight_bit_mime: false,
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "{}{}",
        routes(&["utf8.test"], modern.local_addr()),
        routes(&["ascii.test"], old.local_addr())
    ))
    .await;
    let (status, _) = engine
        .inject(&message_for(&[
            "jösé@utf8.test".into(),
            "jösé@ascii.test".into(),
        ]))
        .await;
    assert_eq!(status, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1 && count_type(r, "Bounce") == 1
    })
    .await;
    assert_eq!(
        modern.messages()[0].recipients,
        vec!["jösé@utf8.test".to_owned()]
    );
    let bounce = recs.iter().find(|r| r["type"] == "Bounce").unwrap();
    assert_eq!(bounce["response"]["enhanced_code"], "5.6.7");
    assert!(bounce["response"]["text"]
        .as_str()
        .unwrap()
        .contains("SMTPUTF8"));
    assert_eq!(old.stats().transactions, 0);
    engine.stop().await;
}

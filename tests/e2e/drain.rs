//! Scale-down (issue 14): `drover drain` moves an engine's queue to a peer, each message once,
//! across a kill of the draining engine; KumoMTA's xfer moves only what it selects.

use crate::harness::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const CAMPAIGN: &str = "drain-e2e";

/// A `drover serve` child that a failing test does not leave running.
struct Child(std::process::Child);

impl Child {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Injects `count` recipients (`u<i>@<domain of i>`) in requests of 1 000, each with its own
/// `metadata`; returns the queued ids.
async fn inject_many(url: &str, count: usize, domain: impl Fn(usize) -> String) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for start in (0..count).step_by(1000) {
        let recipients: Vec<Value> = (start..count.min(start + 1000))
            .map(|i| json!({"email": format!("u{i}@{}", domain(i)), "metadata": {"n": i}}))
            .collect();
        let body = json!({
            "envelope_sender": "bounces@news.example.com",
            "content": "From: News <news@example.com>\r\nSubject: Hi\r\n\r\nHi.\r\n",
            "recipients": recipients,
            "campaign": CAMPAIGN,
            "tenant": "acme",
        });
        let (status, reply) = post_json(&format!("{url}/api/inject/v1"), &body, None).await;
        assert_eq!(status, 200, "{reply}");
        ids.extend(ids_of(&reply));
    }
    ids
}

/// Holds the test campaign, so the engine keeps its messages queued (parked).
async fn hold_campaign(url: &str) {
    let (status, reply) = post_json(
        &format!("{url}/api/admin/v1/suspend"),
        &json!({"campaign": CAMPAIGN}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
}

/// How many records of `kind` each id has.
fn per_id(records: &[Value], kinds: &[&str]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in records {
        if kinds.iter().any(|k| r["type"] == *k) {
            *out.entry(r["id"].as_str().unwrap().to_owned()).or_insert(0) += 1;
        }
    }
    out
}

const FINALS: &[&str] = &[
    "Delivery",
    "Bounce",
    "Expiration",
    "AdminBounce",
    "Transfer",
];

/// Every id has exactly one final record in `records`, and no other id has one.
fn assert_one_final_each(records: &[Value], ids: &[String], kinds: &[&str]) {
    let finals = per_id(records, kinds);
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let twice: Vec<_> = finals.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "recorded twice: {:?}",
        &twice[..twice.len().min(5)]
    );
    let got: HashSet<&str> = finals.keys().map(String::as_str).collect();
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} finals for {} ids; missing {missing:?}, unexpected {extra:?}",
        got.len(),
        want.len()
    );
}

async fn drain_status(url: &str) -> Value {
    reqwest::get(format!("{url}/api/admin/v1/drain"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_drain_done(url: &str, limit: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/api/admin/v1/drain")).await {
            let status: Value = r.json().await.unwrap_or(Value::Null);
            if status["state"] == "done" {
                return status;
            }
            assert_ne!(status["state"], "failed", "{status}");
        }
        assert!(start.elapsed() < limit, "the drain never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_ten_thousand_messages_delivers_each_once_from_the_peer() {
    const COUNT: usize = 10_000;
    let sink = capturing_sink().await;
    let domains: Vec<String> = (0..10).map(|d| format!("d{d}.drain.test")).collect();
    let domain_refs: Vec<&str> = domains.iter().map(String::as_str).collect();
    // A would deliver nowhere: its campaign is held. B delivers to the sink.
    let a = TestEngine::start("").await;
    let b = TestEngine::start(&routes(&domain_refs, sink.local_addr())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let (a_url, b_url) = (a.url(""), b.url(""));
    hold_campaign(&a_url).await;
    let ids = inject_many(&a_url, COUNT, |i| format!("d{}.drain.test", i % 10)).await;
    assert_eq!(ids.len(), COUNT);

    // The command line starts the drain in the engine and follows it until done.
    let (api, to) = (a_url.clone(), b_url.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
            .args([
                "drain",
                "--api",
                &api,
                "--to",
                &to,
                "--reason",
                "scale-down test",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_success(&out);
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["moved"], COUNT as u64, "{done}");
    assert_eq!(done["left"], 0);

    // A: empty, one Transfer each (its only final record), and not ready: it is scaled down.
    let queues = a.get_json("/api/admin/v1/queues").await;
    assert_eq!(
        queues["totals"],
        json!({"ready": 0, "scheduled": 0, "in_flight": 0, "parked": 0}),
        "{queues}"
    );
    let readyz = reqwest::get(a.url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503);
    assert_eq!(readyz.text().await.unwrap(), "draining\n");
    let (status, _) = a.inject(&message_for(&["late@d0.drain.test".into()])).await;
    assert_eq!(status, 503, "a scaled-down engine takes no new mail");
    let a_records = records(&a.accounting_path());
    assert_one_final_each(&a_records, &ids, FINALS);
    assert_eq!(count_type(&a_records, "Transfer"), COUNT);
    let transfer = a_records.iter().find(|r| r["type"] == "Transfer").unwrap();
    assert_eq!(transfer["transfer"]["to"], b_url.as_str());
    assert_eq!(
        transfer["response"]["text"],
        format!("transferred to {b_url}: scale-down test")
    );

    // B: each id received once by transfer and delivered once, metadata and all.
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(300), |r| {
        count_type(r, "Delivery") >= COUNT
    })
    .await;
    assert_one_final_each(&b_records, &ids, FINALS);
    assert_eq!(count_type(&b_records, "Delivery"), COUNT);
    let receptions = per_id(&b_records, &["Reception"]);
    assert_eq!(receptions.len(), COUNT);
    assert!(receptions.values().all(|n| *n == 1));
    let reception = b_records.iter().find(|r| r["type"] == "Reception").unwrap();
    assert_eq!(reception["transfer"]["from"], "drover.test");
    let by_id: HashMap<&str, &Value> = b_records
        .iter()
        .filter(|r| r["type"] == "Delivery")
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    for (i, id) in ids.iter().enumerate().step_by(997) {
        let d = by_id[id.as_str()];
        assert_eq!(d["recipient"], format!("u{i}@d{}.drain.test", i % 10));
        assert_eq!(d["campaign"], CAMPAIGN);
        assert_eq!(d["tenant"], "acme");
        assert_eq!(d["metadata"], json!({"n": i}));
        assert_eq!(d["attempt"], 1);
    }
    // The sink got each recipient once, with the bytes A spooled: A's trace header only.
    let messages = sink.messages();
    assert_eq!(messages.len(), COUNT);
    let recipients: HashSet<String> = messages
        .iter()
        .flat_map(|m| m.recipients.iter().cloned())
        .collect();
    assert_eq!(recipients.len(), COUNT);
    let text = String::from_utf8_lossy(&messages[0].data);
    assert_eq!(text.matches("Received:").count(), 1, "{text}");
    let metrics = b.metrics().await;
    assert!(
        metric_value(&metrics, "drover_drain_messages_total{direction=\"in\"}") >= COUNT as f64,
        "{metrics}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_interrupted_by_kill_9_resumes_without_loss_or_duplicate() {
    const COUNT: usize = 5_000;
    let sink = capturing_sink().await;
    let b = TestEngine::start(&routes(&["k.drain.test"], sink.local_addr())).await;
    wait_ready(&b).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let a_url = format!("http://127.0.0.1:{port}");
    let mut a = Child(spawn_drover(&config));
    wait_port_ready(port).await;
    hold_campaign(&a_url).await;
    let ids = inject_many(&a_url, COUNT, |_| "k.drain.test".into()).await;
    let (status, reply) = post_json(
        &format!("{a_url}/api/admin/v1/drain"),
        &json!({"to": b.url("")}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    // Killed once some messages have moved, while the rest are on their way.
    let start = std::time::Instant::now();
    loop {
        let status = drain_status(&a_url).await;
        if status["moved"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{status}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill();
    let moved_before = count_type(
        &records(&dir.path().join("data/accounting.jsonl")),
        "Transfer",
    );
    assert!(
        moved_before < COUNT,
        "killed too late: {moved_before} moved"
    );
    // The restarted engine carries on by itself, refusing mail meanwhile.
    let _a = Child(spawn_drover(&config));
    wait_drain_done(&a_url, Duration::from_secs(120)).await;
    let readyz = reqwest::get(format!("{a_url}/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503);
    let a_records = records(&dir.path().join("data/accounting.jsonl"));
    assert_one_final_each(&a_records, &ids, FINALS);
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(300), |r| {
        count_type(r, "Delivery") >= COUNT
    })
    .await;
    assert_one_final_each(&b_records, &ids, FINALS);
    let receptions = per_id(&b_records, &["Reception"]);
    assert_eq!(receptions.len(), COUNT);
    assert!(receptions.values().all(|n| *n == 1), "a Reception twice");
    assert_eq!(sink.messages().len(), COUNT);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kumo_xfer_moves_only_the_selected_domain_and_a_resent_message_lands_once() {
    let sink = capturing_sink().await;
    // Only A signs: what B delivers carries A's signatures, on A's bytes.
    let (dkim, dns) = crate::dkim::dkim_config();
    let a = TestEngine::start(&dkim).await;
    let b = TestEngine::start(&routes(&["move.test", "keep.test"], sink.local_addr())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let (a_url, b_url) = (a.url(""), b.url(""));
    hold_campaign(&a_url).await;
    let moving = inject_many(&a_url, 30, |_| "move.test".into()).await;
    let staying = inject_many(&a_url, 20, |_| "keep.test".into()).await;
    let (status, reply) = post_json(
        &format!("{a_url}/api/admin/xfer/v1"),
        &json!({"domain": "move.test", "reason": "Scaling down", "target": b_url}),
        None,
    )
    .await;
    assert_eq!((status, &reply), (200, &json!({})));
    let done = wait_drain_done(&a_url, Duration::from_secs(60)).await;
    assert_eq!(done["moved"], 30, "{done}");
    assert_eq!(done["domain"], "move.test");
    // A goes on as before with the rest.
    let readyz = reqwest::get(a.url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 200);
    let queues = a.get_json("/api/admin/v1/queues").await;
    assert_eq!(queues["totals"]["parked"], 20, "{queues}");
    let a_records = records(&a.accounting_path());
    assert_one_final_each(&a_records, &moving, FINALS);
    assert!(a_records
        .iter()
        .filter(|r| r["type"] == "Transfer")
        .all(|r| r["domain"] == "move.test"
            && r["response"]["text"]
                .as_str()
                .unwrap()
                .ends_with(": Scaling down")));
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") >= 30
    })
    .await;
    assert_one_final_each(&b_records, &moving, FINALS);
    assert!(staying
        .iter()
        .all(|id| !b_records.iter().any(|r| r["id"] == id.as_str())));
    let delivered = crate::dkim::wait_messages(&sink, 30).await;
    for m in &delivered {
        assert_eq!(
            dkim::testing::verify(&m.data, &dns).await,
            vec![dkim::testing::Verdict::Pass, dkim::testing::Verdict::Pass],
            "{}",
            String::from_utf8_lossy(&m.data)
        );
    }

    // The peer's side on its own: a message sent twice, and again after its delivery, is
    // stored and delivered once.
    // Fresh ids: the peer remembers a message for `sent_retention` after its reception,
    // which a UUIDv7 carries.
    let fresh = queue::MessageId::generate().to_string();
    let id = fresh.as_str();
    let now = drover::clock::now_ms();
    let transfer = json!({
        "from": "elsewhere.test",
        "messages": [{
            "id": id, "sender": "s@example.com", "recipient": "again@move.test",
            "domain": "move.test", "received_ms": now, "due_ms": now, "attempts": 2,
            "body": "U3ViamVjdDogeA0KDQpoaQ0K"
        }]
    });
    let url = format!("{b_url}/api/admin/v1/transfer");
    let (status, first) = post_json(&url, &transfer, None).await;
    assert_eq!(
        (status, &first),
        (200, &json!({"received": 1, "already": 0}))
    );
    let (_, second) = post_json(&url, &transfer, None).await;
    assert_eq!(second, json!({"received": 0, "already": 1}));
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(30), |r| {
        r.iter().any(|r| r["type"] == "Delivery" && r["id"] == id)
    })
    .await;
    let (_, after) = post_json(&url, &transfer, None).await;
    assert_eq!(
        after,
        json!({"received": 0, "already": 1}),
        "delivered, then sent again"
    );
    let delivery = b_records
        .iter()
        .find(|r| r["type"] == "Delivery" && r["id"] == id)
        .unwrap();
    assert_eq!(delivery["attempt"], 3, "the attempts made elsewhere count");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_records = records(&b.accounting_path());
    assert_eq!(per_id(&b_records, &["Reception", "Delivery"])[id], 2);
    let (status, _) = post_json(&url, &json!({"messages": [{"id": id}]}), None).await;
    assert_eq!(status, 400);

    // A sender killed while its batch is being stored, which sends the batch again when it
    // restarts: delivered once. (The server drops a handler whose client hangs up: one
    // dropped between storing and queueing would leave the message stored, acknowledged as
    // `already`, and never delivered.)
    let fresh = queue::MessageId::generate().to_string();
    let hung_up = fresh.as_str();
    let mut lone = transfer.clone();
    lone["messages"][0]["id"] = json!(hung_up);
    lone["messages"][0]["recipient"] = json!("hungup@move.test");
    let body = lone.to_string();
    let mut socket = tokio::net::TcpStream::connect(b.running.as_ref().unwrap().http_addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut socket,
        format!(
            "POST /api/admin/v1/transfer HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    drop(socket);
    let (status, again) = post_json(&url, &lone, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        again["received"].as_u64().unwrap() + again["already"].as_u64().unwrap(),
        1
    );
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(30), |r| {
        r.iter()
            .any(|r| r["type"] == "Delivery" && r["id"] == hung_up)
    })
    .await;
    assert_eq!(per_id(&b_records, &["Reception", "Delivery"])[hung_up], 2);

    // A drain to itself would find everything "already there" and delete it: refused.
    let (status, reply) = post_json(
        &format!("{a_url}/api/admin/v1/drain"),
        &json!({"to": a_url, "domain": "keep.test"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let start = std::time::Instant::now();
    let failed = loop {
        let status = drain_status(&a_url).await;
        if status["state"] == "failed" {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        failed["last_error"].as_str().unwrap().contains("itself"),
        "{failed}"
    );
    assert_eq!(failed["left"], 20, "{failed}");
    let queues = a.get_json("/api/admin/v1/queues").await;
    assert_eq!(queues["totals"]["parked"], 20, "{queues}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_on_shutdown_to_drains_the_queue_to_the_peer_before_exiting() {
    const COUNT: usize = 500;
    let sink = capturing_sink().await;
    // The peer wants a token; A reads it from its peer_token_file.
    let b = TestEngine::start(&format!(
        "[http]\napi_tokens = [\"peer-secret\"]\n{}",
        routes(&["t.drain.test"], sink.local_addr())
    ))
    .await;
    wait_ready(&b).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("peer.token");
    std::fs::write(&token, "peer-secret\n").unwrap();
    let port = free_port();
    let config = dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n[smtp_listener]\nlisten = \"127.0.0.1:0\"\n[drain]\non_shutdown_to = \"{}\"\npeer_token_file = {token:?}\n",
            dir.path().join("data"),
            b.url("")
        ),
    )
    .unwrap();
    let a_url = format!("http://127.0.0.1:{port}");
    let mut a = Child(spawn_drover(&config));
    wait_port_ready(port).await;
    hold_campaign(&a_url).await;
    let ids = inject_many(&a_url, COUNT, |_| "t.drain.test".into()).await;
    std::process::Command::new("kill")
        .args(["-TERM", &a.0.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || a.0.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let a_records = records(&dir.path().join("data/accounting.jsonl"));
    assert_one_final_each(&a_records, &ids, FINALS);
    assert_eq!(count_type(&a_records, "Transfer"), COUNT);
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(120), |r| {
        count_type(r, "Delivery") >= COUNT
    })
    .await;
    assert_one_final_each(&b_records, &ids, FINALS);
    assert_eq!(sink.messages().len(), COUNT);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_in_flight_when_a_scale_down_begins_finish_and_their_messages_move_too() {
    const COUNT: usize = 300;
    // A's receiver answers slowly and defers everything: attempts are in flight when the
    // drain begins, and their messages come back to A's schedule afterwards, due in 2 s,
    // which is when B tries them (a message keeps its due time).
    let slow = start_sink(sink::SinkConfig {
        tempfail_percent: 100,
        latency: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let sink = capturing_sink().await;
    let domains: Vec<String> = (0..5).map(|d| format!("f{d}.drain.test")).collect();
    let domain_refs: Vec<&str> = domains.iter().map(String::as_str).collect();
    let a = TestEngine::start(&format!(
        "[retry]\nintervals = [\"2s\"]\n{}",
        routes(&domain_refs, slow.local_addr())
    ))
    .await;
    let b = TestEngine::start(&routes(&domain_refs, sink.local_addr())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let ids = inject_many(&a.url(""), COUNT, |i| format!("f{}.drain.test", i % 5)).await;
    let start = std::time::Instant::now();
    while slow.stats().rcpt_tempfailed == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "A never tried");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, reply) = post_json(
        &a.url("/api/admin/v1/drain"),
        &json!({"to": b.url("")}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let done = wait_drain_done(&a.url(""), Duration::from_secs(120)).await;
    assert_eq!(done["moved"], COUNT as u64, "{done}");
    let a_records = records(&a.accounting_path());
    assert_one_final_each(&a_records, &ids, FINALS);
    let deferred: HashSet<&str> = a_records
        .iter()
        .filter(|r| r["type"] == "TransientFailure")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(!deferred.is_empty(), "no attempt was made on A");
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(120), |r| {
        count_type(r, "Delivery") >= COUNT
    })
    .await;
    assert_one_final_each(&b_records, &ids, FINALS);
    // The attempts made on A count on B.
    for r in b_records.iter().filter(|r| r["type"] == "Delivery") {
        let tried = deferred.contains(r["id"].as_str().unwrap());
        assert_eq!(r["attempt"], if tried { 2 } else { 1 }, "{r}");
    }
    assert_eq!(sink.messages().len(), COUNT);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_expands_stored_inject_requests_and_moves_their_messages_too() {
    const COUNT: usize = 300;
    let sink = capturing_sink().await;
    // A small queue: the generator expands 90 recipients (nine tenths) and waits for room,
    // which only the drain makes (A's campaign is held).
    let a = TestEngine::start("[spool]\nmax_queued = 100\n").await;
    let b = TestEngine::start(&routes(&["g.drain.test"], sink.local_addr())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let a_url = a.url("");
    hold_campaign(&a_url).await;
    let recipients: Vec<Value> = (0..COUNT)
        .map(|i| json!({"email": format!("g{i}@g.drain.test")}))
        .collect();
    let (status, reply) = a
        .inject(&json!({
            "envelope_sender": "bounces@news.example.com",
            "content": "From: News <news@example.com>\r\nSubject: Hi\r\n\r\nHi.\r\n",
            "recipients": recipients,
            "campaign": CAMPAIGN,
            "deferred_generation": true,
        }))
        .await;
    assert_eq!(status, 200, "{reply}");
    let start = std::time::Instant::now();
    while a.running.as_ref().unwrap().engine.scheduler().len() < 90 {
        assert!(start.elapsed() < Duration::from_secs(30), "never expanded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.running.as_ref().unwrap().engine.generations_pending(), 1);
    let (status, reply) = post_json(
        &format!("{a_url}/api/admin/v1/drain"),
        &json!({"to": b.url("")}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let done = wait_drain_done(&a_url, Duration::from_secs(120)).await;
    assert_eq!(done["moved"], COUNT as u64, "{done}");
    assert_eq!(a.running.as_ref().unwrap().engine.generations_pending(), 0);
    let b_records = wait_records(&b.accounting_path(), Duration::from_secs(120), |r| {
        count_type(r, "Delivery") >= COUNT
    })
    .await;
    let delivered = per_id(&b_records, &["Delivery"]);
    assert_eq!(delivered.len(), COUNT);
    assert!(delivered.values().all(|n| *n == 1));
    assert_eq!(sink.messages().len(), COUNT);
    a.stop().await;
    b.stop().await;
}

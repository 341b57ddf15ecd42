//! The webhook task against real HTTP endpoints on 127.0.0.1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

mod support;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use webhook::{spawn, Position, WebhookConfig, WebhookError, WebhookHandle};

fn ids_of(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

fn fill(log: &Log, range: std::ops::Range<usize>) {
    for i in range {
        log.push(record(&format!("m{i}"), "Delivery", Some("acme")));
    }
}

async fn stop(cancel: &CancellationToken, handle: WebhookHandle) {
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle.join())
        .await
        .expect("the task ends promptly once cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_once_in_order_despite_failures() {
    let receiver = Receiver::start(&[500, 503, 500], 200).await;
    let log = Log::default();
    fill(&log, 0..50);
    // The cursor may only name a record the receiver has acknowledged.
    let (acked, positions) = (receiver.clone(), log.clone());
    let store = Arc::new(Store::checked(Box::new(move |cursor| {
        let last = acked.acknowledged().last().cloned();
        last.is_some_and(|id| positions.end_of(&id) >= cursor)
    })));
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        batch_size: 7,
        ..config(receiver.addr, "retry")
    };
    let handle = spawn_with_store(config, &log, &store, &cancel);
    // The log grows while the first batch is being retried.
    fill(&log, 50..70);
    let end = log.end();
    wait_for("the cursor at the last record", || {
        store.get("retry") == Some(end)
    })
    .await;

    assert_eq!(
        receiver.acknowledged(),
        ids_of(0..70),
        "all, in order, once"
    );
    let requests = receiver.requests();
    assert!(requests.iter().all(|r| ids(&r.body).len() <= 7));
    // The failed batch was retried as it was: same id, same bytes.
    let first = &requests[..4];
    assert_eq!(first.iter().filter(|r| r.ok()).count(), 1);
    assert!(first
        .iter()
        .all(|r| r.batch_id() == "0-0" && r.body == first[0].body));
    assert_eq!(store.violations.load(Ordering::SeqCst), 0);

    let status = handle.status();
    assert_eq!(status.sent_records, 70);
    assert_eq!(status.cursor, end);
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(status.lag_records, 0);
    assert_eq!(status.lag_seconds, 0.0);
    assert!(status.last_success.is_some());
    let last_error = status.last_error.expect("the failures are remembered");
    assert!(last_error.contains("500"), "{last_error}");
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_name_sign_and_identify_the_batch() {
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    fill(&log, 0..3);
    let store = Arc::new(Store::default());
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        secret: "k3y".into(),
        ..config(receiver.addr, "signed")
    };
    let handle = spawn_with_store(config, &log, &store, &cancel);
    wait_for("the batch", || receiver.request_count() == 1).await;
    let request = &receiver.requests()[0];

    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"k3y").expect("a key");
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        request.header("x-drover-signature"),
        Some(expected.as_str())
    );
    assert_eq!(request.header("x-drover-webhook"), Some("signed"));
    assert_eq!(request.header("x-drover-batch-id"), Some("0-0"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let agent = request.header("user-agent").expect("a user agent");
    assert!(agent.starts_with("drover/"), "{agent}");
    // The body is the log's lines, byte for byte.
    let lines: Vec<String> = (0..3)
        .map(|i| record(&format!("m{i}"), "Delivery", Some("acme")))
        .collect();
    assert_eq!(request.body, format!("[{}]", lines.join(",")).as_bytes());
    stop(&cancel, handle).await;

    // Without a secret there is no signature.
    let cancel = CancellationToken::new();
    let unsigned = spawn(
        config_named(&receiver, "unsigned"),
        log.source(Position::default()),
        store,
        Position::default(),
        cancel.clone(),
    )
    .expect("spawns");
    wait_for("the unsigned batch", || receiver.request_count() == 2).await;
    assert_eq!(receiver.requests()[1].header("x-drover-signature"), None);
    stop(&cancel, unsigned).await;
}

fn config_named(receiver: &Receiver, name: &str) -> WebhookConfig {
    config(receiver.addr, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resends_only_the_unacknowledged_batch() {
    // Three batches go through, then the endpoint refuses everything.
    let broken = Receiver::start(&[200, 200, 200], 503).await;
    let log = Log::default();
    fill(&log, 0..30);
    let store = Arc::new(Store::default());
    let config = WebhookConfig {
        batch_size: 5,
        ..config(broken.addr, "restart")
    };

    let cancel = CancellationToken::new();
    let first = spawn_with_store(config.clone(), &log, &store, &cancel);
    let acked_end = log.end_of("m14");
    wait_for("three batches stored and the fourth refused", || {
        store.get("restart") == Some(acked_end) && broken.request_count() >= 5
    })
    .await;
    stop(&cancel, first).await;
    let refused = broken.requests()[3].clone();
    assert!(!refused.ok());
    assert_eq!(ids(&refused.body), ids_of(15..20));

    // The restarted webhook (same name, so same cursor) talks to a working endpoint: a request
    // the first run still had on the wire cannot be mistaken for one of the second run.
    let fixed = Receiver::start(&[], 200).await;
    let cursor = store.get("restart").expect("a stored cursor");
    let cancel = CancellationToken::new();
    let second = spawn(
        WebhookConfig {
            url: format!("http://{}/events", fixed.addr),
            ..config
        },
        log.source(cursor),
        store.clone(),
        cursor,
        cancel.clone(),
    )
    .expect("spawns");
    let end = log.end();
    wait_for("the rest", || store.get("restart") == Some(end)).await;
    stop(&cancel, second).await;

    let resent: Vec<String> = fixed.requests().iter().flat_map(|r| ids(&r.body)).collect();
    assert_eq!(resent, ids_of(15..30), "nothing acknowledged is sent again");
    assert_eq!(
        fixed.requests()[0].batch_id(),
        refused.batch_id(),
        "the refused batch keeps its id across the restart"
    );
    assert_eq!(broken.acknowledged(), ids_of(0..15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_endpoint_times_out_and_is_retried() {
    let silent = Silent::start().await;
    let log = Log::default();
    fill(&log, 0..2);
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        timeout: Duration::from_millis(200),
        ..config(silent.addr, "hung")
    };
    let handle = spawn_fresh(config, &log, &cancel);
    // A timed-out connection is dropped, so every retry connects anew.
    wait_for("three attempts", || silent.accepted() >= 3).await;
    let status = handle.status();
    assert!(status.consecutive_failures >= 2, "{status:?}");
    let error = status.last_error.clone().expect("an error");
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(status.sent_records, 0);
    assert_eq!(status.lag_records, 2);
    assert!(status.lag_seconds > 0.0);
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_ends_a_request_in_flight() {
    let silent = Silent::start().await;
    let log = Log::default();
    fill(&log, 0..2);
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        timeout: Duration::from_secs(600),
        ..config(silent.addr, "in-flight")
    };
    let handle = spawn_fresh(config, &log, &cancel);
    wait_for("the request", || silent.accepted() == 1).await;
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_ends_a_backoff() {
    let receiver = Receiver::start(&[], 500).await;
    let log = Log::default();
    fill(&log, 0..2);
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        max_backoff: Duration::from_secs(600),
        ..config(receiver.addr, "backoff")
    };
    let handle = spawn_fresh(config, &log, &cancel);
    // After the third failure the task waits 2–4 s before the fourth attempt.
    wait_for("three failures", || receiver.request_count() == 3).await;
    let cancelled = Instant::now();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle.join())
        .await
        .expect("ends");
    assert!(
        cancelled.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        cancelled.elapsed()
    );
    assert_eq!(receiver.request_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_and_tenants_select_records_and_bad_lines_are_skipped() {
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    let lines = [
        ("a", "Delivery", Some("acme")),
        ("b", "Delivery", Some("other")),
        ("c", "Reception", Some("acme")),
        ("d", "Bounce", Some("acme")),
        ("e", "Bounce", None),
    ];
    for (id, kind, tenant) in lines {
        log.push(record(id, kind, tenant));
    }
    log.push("{\"type\":\"Delivery\",\"tenant\":\"acme\"}".to_string());
    log.push("not json at all".to_string());
    let store = Arc::new(Store::default());
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        types: vec!["Delivery".into(), "Bounce".into()],
        tenants: vec!["acme".into()],
        ..config(receiver.addr, "filtered")
    };
    let handle = spawn_with_store(config, &log, &store, &cancel);
    // Lines that are filtered out or unparsable at the end still move the cursor.
    let end = log.end();
    wait_for("the cursor past the skipped tail", || {
        store.get("filtered") == Some(end)
    })
    .await;
    assert_eq!(receiver.acknowledged(), ["a", "d"]);

    // A batch that starts a segment is named by that segment.
    log.push_in_new_segment(record("f", "Delivery", Some("acme")));
    log.push(record("g", "Reception", Some("acme")));
    log.push(record("h", "Delivery", Some("other")));
    let end = log.end();
    wait_for("the cursor in the new segment", || {
        store.get("filtered") == Some(end)
    })
    .await;
    assert_eq!(receiver.acknowledged(), ["a", "d", "f"]);
    let batches: Vec<_> = receiver
        .requests()
        .iter()
        .map(|r| r.batch_id().to_string())
        .collect();
    assert_eq!(batches, ["0-0", "1-0"]);
    assert_eq!(handle.status().sent_records, 3);
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_only_progress_is_stored_at_most_once_a_second() {
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    let store = Arc::new(Store::default());
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        types: vec!["Bounce".into()],
        ..config(receiver.addr, "quiet")
    };
    let started = Instant::now();
    let handle = spawn_with_store(config, &log, &store, &cancel);
    for i in 0..150 {
        log.push(record(&format!("m{i}"), "Delivery", None));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = log.end();
    wait_for("the cursor at the end", || store.get("quiet") == Some(end)).await;
    let seconds = started.elapsed().as_secs_f64();
    let calls = store.calls.load(Ordering::SeqCst);
    assert!(
        f64::from(calls) <= seconds.ceil() + 1.0,
        "{calls} stores in {seconds:.1} s"
    );
    assert_eq!(receiver.request_count(), 0);
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_batch_waits_max_delay_and_a_full_one_does_not() {
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    let cancel = CancellationToken::new();
    let partial = WebhookConfig {
        batch_size: 5,
        max_delay: Duration::from_millis(300),
        ..config(receiver.addr, "partial")
    };
    let handle = spawn_fresh(partial, &log, &cancel);
    let pushed = Instant::now();
    fill(&log, 0..3);
    wait_for("the partial batch", || receiver.request_count() == 1).await;
    assert!(pushed.elapsed() >= Duration::from_millis(300));
    assert_eq!(receiver.acknowledged(), ids_of(0..3));
    stop(&cancel, handle).await;

    // With max_delay far beyond the test's patience, only full batches can arrive.
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    let cancel = CancellationToken::new();
    let full = WebhookConfig {
        batch_size: 5,
        max_delay: Duration::from_secs(3600),
        ..config(receiver.addr, "full")
    };
    let store = Arc::new(Store::default());
    let handle = spawn_with_store(full, &log, &store, &cancel);
    fill(&log, 0..12);
    let second_batch = log.end_of("m9");
    wait_for("two full batches", || {
        store.get("full") == Some(second_batch)
    })
    .await;
    assert_eq!(receiver.acknowledged(), ids_of(0..10));
    let status = handle.status();
    assert_eq!(status.lag_records, 2, "two records wait for company");
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_reuse_one_connection() {
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    fill(&log, 0..40);
    let store = Arc::new(Store::default());
    let cancel = CancellationToken::new();
    let config = WebhookConfig {
        batch_size: 1,
        ..config(receiver.addr, "keepalive")
    };
    let handle = spawn_with_store(config, &log, &store, &cancel);
    let end = log.end();
    wait_for("every record", || store.get("keepalive") == Some(end)).await;
    assert_eq!(receiver.request_count(), 40);
    assert_eq!(receiver.connections(), 1);
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reads_and_stores_are_retried() {
    let receiver = Receiver::start(&[], 200).await;
    let log = Log::default();
    fill(&log, 0..10);
    log.fail_reads(2);
    let store = Arc::new(Store::default());
    store.failing.store(3, Ordering::SeqCst);
    let cancel = CancellationToken::new();
    let handle = spawn_with_store(config(receiver.addr, "flaky"), &log, &store, &cancel);
    let end = log.end();
    wait_for("the cursor stored", || store.get("flaky") == Some(end)).await;
    assert_eq!(receiver.acknowledged(), ids_of(0..10));
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        4,
        "three failures, one store"
    );
    assert_eq!(receiver.request_count(), 1, "the batch is not sent again");
    let error = handle.status().last_error.expect("an error");
    assert!(error.contains("storing the cursor"), "{error}");
    stop(&cancel, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_false_accepts_a_self_signed_certificate() {
    let tls = sink::SinkTls::self_signed(&["127.0.0.1"]).expect("a certificate");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let receiver = Receiver::serve(
        TlsListener {
            tcp,
            acceptor: tls.acceptor(),
        },
        &[],
        200,
    );
    let log = Log::default();
    fill(&log, 0..3);
    let url = format!("https://{}/events", receiver.addr);

    let cancel = CancellationToken::new();
    let verified = spawn_fresh(
        WebhookConfig {
            url: url.clone(),
            ..config(receiver.addr, "verified")
        },
        &log,
        &cancel,
    );
    wait_for("a refused certificate", || {
        verified.status().consecutive_failures >= 2
    })
    .await;
    let error = verified.status().last_error.expect("an error");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    stop(&cancel, verified).await;
    assert_eq!(receiver.request_count(), 0);

    let cancel = CancellationToken::new();
    let store = Arc::new(Store::default());
    let trusting = spawn(
        WebhookConfig {
            url,
            tls_verify: false,
            ..config(receiver.addr, "trusting")
        },
        log.source(Position::default()),
        store.clone(),
        Position::default(),
        cancel.clone(),
    )
    .expect("spawns");
    let end = log.end();
    wait_for("delivery over TLS", || store.get("trusting") == Some(end)).await;
    assert_eq!(receiver.acknowledged(), ids_of(0..3));
    stop(&cancel, trusting).await;
}

#[tokio::test]
async fn spawn_refuses_a_bad_config() {
    let log = Log::default();
    let result = spawn(
        WebhookConfig {
            url: "http://127.0.0.1:9/".into(),
            types: vec!["Sent".into()],
            ..WebhookConfig::default()
        },
        log.source(Position::default()),
        Arc::new(Store::default()),
        Position::default(),
        CancellationToken::new(),
    );
    assert!(matches!(
        result,
        Err(WebhookError::Invalid { key: "types", .. })
    ));
}

#[test]
fn spawn_needs_a_runtime() {
    let log = Log::default();
    let result = spawn(
        WebhookConfig {
            url: "http://127.0.0.1:9/".into(),
            ..WebhookConfig::default()
        },
        log.source(Position::default()),
        Arc::new(Store::default()),
        Position::default(),
        CancellationToken::new(),
    );
    assert!(matches!(result, Err(WebhookError::NoRuntime)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_records_and_lag() {
    // The only test that installs a recorder; the other tests' webhooks have other names.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder");
    webhook::describe_metrics();

    let receiver = Receiver::start(&[500], 200).await;
    let log = Log::default();
    fill(&log, 0..5);
    log.push("garbage".to_string());
    let store = Arc::new(Store::default());
    let cancel = CancellationToken::new();
    let handle = spawn_with_store(config(receiver.addr, "metered"), &log, &store, &cancel);
    let end = log.end();
    wait_for("the cursor at the end", || {
        store.get("metered") == Some(end)
    })
    .await;
    stop(&cancel, handle).await;

    let text = prometheus.render();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let w = r#"webhook="metered""#;
    assert_eq!(value(&format!("drover_webhook_records_total{{{w}}}")), 5.0);
    assert_eq!(
        value(&format!("drover_webhook_unparsable_records_total{{{w}}}")),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"drover_webhook_requests_total{{{w},result="ok"}}"#
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"drover_webhook_requests_total{{{w},result="http_error"}}"#
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            r#"drover_webhook_requests_total{{{w},result="timeout"}}"#
        )),
        0.0
    );
    assert_eq!(value(&format!("drover_webhook_lag_records{{{w}}}")), 0.0);
    assert_eq!(value(&format!("drover_webhook_lag_bytes{{{w}}}")), 0.0);
    assert_eq!(value(&format!("drover_webhook_lag_seconds{{{w}}}")), 0.0);
    assert_eq!(
        value(&format!(
            "drover_webhook_request_duration_seconds_count{{{w}}}"
        )),
        2.0
    );
}

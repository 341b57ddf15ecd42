//! `/readyz` tells a load balancer the truth: not ready while the spool reload runs, and
//! 503 (not a refused connection) while the engine drains.

use crate::harness::*;
use std::time::Duration;

async fn readyz(engine: &TestEngine) -> Result<(u16, String), reqwest::Error> {
    let resp = reqwest::get(engine.url("/readyz")).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_the_spool_reload_has_seen_every_message() {
    const QUEUED: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    fill_spool(&dir.path().join("spool"), QUEUED, 3_600_000, None).await;
    let engine = TestEngine::start_in(dir, "").await;
    let running = engine.running.as_ref().unwrap();
    let mut not_ready = 0;
    let start = std::time::Instant::now();
    loop {
        let (status, text) = readyz(&engine).await.unwrap();
        if status == 200 {
            // Ready means the schedule holds every spooled message.
            assert_eq!(running.engine.scheduler().len(), QUEUED);
            break;
        }
        assert_eq!(status, 503);
        assert!(text.contains("reloading"), "{text}");
        not_ready += 1;
        assert!(start.elapsed() < Duration::from_secs(60), "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready > 0, "ready before the reload finished");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_while_the_engine_drains() {
    // A slow receiver keeps one delivery in flight while the engine shuts down.
    let sink = start_sink(sink::SinkConfig {
        latency: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    let mut engine = TestEngine::start(&routes(&["slow.test"], sink.local_addr())).await;
    wait_ready(&engine).await;
    let (status, _) = engine
        .inject(&message_for(&["a@slow.test".to_owned()]))
        .await;
    assert_eq!(status, 200);
    let scheduler_busy = || {
        engine
            .running
            .as_ref()
            .unwrap()
            .engine
            .scheduler()
            .totals()
            .in_flight
            > 0
    };
    let start = std::time::Instant::now();
    while !scheduler_busy() {
        assert!(start.elapsed() < Duration::from_secs(10), "never in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let running = engine.running.take().unwrap();
    let url = format!("http://{}/readyz", running.http_addr);
    let stopping = tokio::spawn(running.shutdown(Duration::from_secs(20)));
    // While the delivery finishes, the listener is still up and says it is not ready.
    let mut seen_draining = false;
    while !stopping.is_finished() {
        match reqwest::get(&url).await {
            Ok(resp) => {
                assert_eq!(resp.status().as_u16(), 503);
                assert!(resp.text().await.unwrap().contains("draining"));
                seen_draining = true;
            }
            // Only at the very end, once the engine has stopped, may the listener close.
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stopping.await.unwrap();
    assert!(seen_draining, "the listener closed before saying it drains");
    let records = records(&engine.accounting_path());
    assert_eq!(count_type(&records, "Delivery"), 1, "the delivery finished");
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_for_the_shutdown_grace_while_work_is_still_accepted() {
    let sink = capturing_sink().await;
    let mut engine = TestEngine::start(&format!(
        "[http]\nshutdown_grace = \"3s\"\n{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    wait_ready(&engine).await;
    let running = engine.running.take().unwrap();
    let http = running.http_addr;
    let smtp = running.smtp_addr.unwrap();
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(running.shutdown(Duration::from_secs(10)));
    // Not ready at once...
    let mut status = 200;
    while status == 200 {
        assert!(started.elapsed() < Duration::from_secs(2), "still ready");
        status = reqwest::get(format!("http://{http}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16();
    }
    assert_eq!(status, 503);
    // ...while a client the load balancer still sends here is served, over HTTP and SMTP.
    let (code, reply) = post_json(
        &format!("http://{http}/api/inject/v1"),
        &message_for(&["late@example.test".to_owned()]),
        None,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    let mut client = connection_pool::SmtpClient::connect_with(connection_pool::ConnectOptions {
        tls: connection_pool::TlsMode::Disabled,
        tls_failures: connection_pool::TlsFailureMemory::default(),
        ..connection_pool::ConnectOptions::new("localhost", smtp, "client.test")
    })
    .await
    .unwrap();
    let envelope = connection_pool::Envelope {
        sender: "news@example.com".to_owned(),
        recipients: vec!["later@example.test".to_owned()],
        ..Default::default()
    };
    let result = client
        .send(
            &envelope,
            b"From: news@example.com\r\nSubject: late\r\n\r\nstill accepted\r\n",
        )
        .await
        .unwrap();
    assert_eq!(result.data.unwrap().code, 250);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "too slow to tell"
    );
    drop(client);
    // Only after the grace does the engine drain and stop.
    stopping.await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(reqwest::get(format!("http://{http}/readyz")).await.is_err());
    let records = records(&engine.accounting_path());
    assert_eq!(count_type(&records, "Reception"), 2, "both were accepted");
    sink.shutdown().await;
}

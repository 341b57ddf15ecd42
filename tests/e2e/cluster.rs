//! Cluster-wide limits (`[cluster]`, `scope = "cluster"`) against a real redis-server that the
//! tests start on a free loopback port.

use crate::harness::*;
use cluster_limits::testing::{redis_available, RedisServer};
use serde_json::Value;
use std::time::Duration;

/// Kills a `drover serve` child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_engines_sharing_a_cluster_limit_of_five_never_hold_more_than_five() {
    if !redis_available("three_engines_sharing_a_cluster_limit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(&created(dir.path().join("redis")));
    // Slow replies: each engine's 100 messages want 5 sessions (one worker per 4 ready
    // messages, up to the cap) for seconds, 15 between the three without sharing.
    let sink = start_sink(sink::SinkConfig {
        latency: Duration::from_millis(15),
        ..Default::default()
    })
    .await;
    let mut engines = Vec::new();
    let mut ports = Vec::new();
    for n in 0..3 {
        let port = free_port();
        let config = dir.path().join(format!("drover-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
                 [smtp_listener]\nlisten = \"127.0.0.1:0\"\n\
                 [delivery]\nehlo_name = \"drover.test\"\nidle_timeout = \"1s\"\n\
                 [cluster]\nredis_url = \"{}\"\ninstance_id = \"engine-{n}\"\nlease_ttl = \"6s\"\n\
                 timeout = \"1s\"\n\
                 [[shaping]]\nmatch = \"cluster.test\"\nmax_connections = 5\n\
                 max_deliveries_per_connection = 10\nscope = \"cluster\"\n{}",
                dir.path().join(format!("data-{n}")),
                redis.url(),
                routes(&["cluster.test"], sink.local_addr())
            ),
        )
        .unwrap();
        engines.push(Child(spawn_drover(&config)));
        ports.push(port);
    }
    for port in &ports {
        wait_port_ready(*port).await;
    }
    let injections = ports.iter().enumerate().map(|(n, port)| {
        let recipients: Vec<String> = (0..100).map(|i| format!("e{n}-{i}@cluster.test")).collect();
        let url = format!("http://127.0.0.1:{port}/api/inject/v1");
        async move { post_json(&url, &message_for(&recipients), None).await }
    });
    for (status, reply) in futures_join_all(injections).await {
        assert_eq!(status, 200, "{reply}");
    }
    let start = std::time::Instant::now();
    while sink.stats().transactions < 300 {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not all delivered: {:?}",
            sink.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = sink.stats();
    assert_eq!(stats.transactions, 300, "{stats:?}");
    assert!(
        stats.max_concurrent_connections <= 5,
        "the cluster cap held: {stats:?}"
    );
    assert!(
        stats.max_concurrent_connections >= 3,
        "the engines did deliver side by side: {stats:?}"
    );
    for port in &ports {
        let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            metric_value(&metrics, "drover_cluster_limits_fallback"),
            0.0,
            "{metrics}"
        );
    }
    drop(engines);
}

/// `join_all` without another dependency: the injections run side by side.
async fn futures_join_all<F: std::future::Future<Output = (u16, Value)> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<(u16, Value)> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// The directory `path`, created.
fn created(path: std::path::PathBuf) -> std::path::PathBuf {
    std::fs::create_dir_all(&path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_an_engine_keeps_to_its_local_share_and_says_so_until_redis_is_back() {
    if !redis_available("without_redis_the_local_share") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A port where Redis is not running yet.
    let redis_port = free_port();
    let sink = start_sink(sink::SinkConfig {
        latency: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    let engine = TestEngine::start(&format!(
        "[cluster]\nredis_url = \"redis://127.0.0.1:{redis_port}/0\"\nlocal_share = 0.4\nlease_ttl = \"3s\"\n\
         [[shaping]]\nmatch = \"share.test\"\nmax_connections = 5\nscope = \"cluster\"\n{}",
        routes(&["share.test"], sink.local_addr())
    ))
    .await;
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(&metrics, "drover_cluster_limits_fallback"),
        1.0,
        "{metrics}"
    );
    assert!(metric_value(&metrics, "drover_cluster_redis_errors_total") >= 1.0);
    let recipients: Vec<String> = (0..40).map(|i| format!("u{i}@share.test")).collect();
    assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    wait_records(&engine.accounting_path(), Duration::from_secs(60), |r| {
        count_type(r, "Delivery") == 40
    })
    .await;
    let stats = sink.stats();
    assert!(
        stats.max_concurrent_connections <= 2,
        "ceil(5 * 0.4) while Redis is unreachable: {stats:?}"
    );
    assert!(stats.max_concurrent_connections >= 1);
    // Redis comes up: the heartbeat finds it and the fallback ends.
    let redis_dir = created(dir.path().join("redis"));
    let _redis = RedisServer::start_on(&redis_dir, redis_port);
    let start = std::time::Instant::now();
    loop {
        let metrics = engine.metrics().await;
        if metric_value(&metrics, "drover_cluster_limits_fallback") == 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the fallback never ended: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_of_one_engine_make_room_for_another_engine_that_waits() {
    if !redis_available("idle_sessions_make_room") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(&created(dir.path().join("redis")));
    let sink = start_sink(sink::SinkConfig::default()).await;
    // Pooled sessions would stay a minute: only the waiter's flag closes them sooner.
    let mut engines = Vec::new();
    let mut ports = Vec::new();
    for n in 0..2 {
        let port = free_port();
        let config = dir.path().join(format!("drover-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
                 [smtp_listener]\nlisten = \"127.0.0.1:0\"\n\
                 [delivery]\nehlo_name = \"drover.test\"\nidle_timeout = \"60s\"\n\
                 [cluster]\nredis_url = \"{}\"\nlease_ttl = \"6s\"\ntimeout = \"1s\"\n\
                 [[shaping]]\nmatch = \"room.test\"\nmax_connections = 1\nscope = \"cluster\"\n{}",
                dir.path().join(format!("data-{n}")),
                redis.url(),
                routes(&["room.test"], sink.local_addr())
            ),
        )
        .unwrap();
        engines.push(Child(spawn_drover(&config)));
        ports.push(port);
    }
    for port in &ports {
        wait_port_ready(*port).await;
    }
    let inject = |port: u16, tag: &'static str| async move {
        let recipients: Vec<String> = (0..8).map(|i| format!("{tag}{i}@room.test")).collect();
        let url = format!("http://127.0.0.1:{port}/api/inject/v1");
        assert_eq!(
            post_json(&url, &message_for(&recipients), None).await.0,
            200
        );
    };
    let delivered = |count: u64, within: Duration| {
        let sink = &sink;
        async move {
            let start = std::time::Instant::now();
            while sink.stats().transactions < count {
                assert!(start.elapsed() < within, "{:?}", sink.stats());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    inject(ports[0], "a").await;
    delivered(8, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.stats().active_connections,
        1,
        "pooled, holding the only lease"
    );
    inject(ports[1], "b").await;
    delivered(16, Duration::from_secs(10)).await;
    assert!(
        sink.stats().max_concurrent_connections <= 1,
        "{:?}",
        sink.stats()
    );
    drop(engines);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_scope_rules_to_a_cluster_the_engine_did_not_start_with() {
    let engine = TestEngine::start("[[shaping]]\nmatch = \"c.test\"\nmax_connections = 5\n").await;
    let reloaded = drover::Config::parse(
        "[cluster]\nredis_url = \"redis://127.0.0.1:1/0\"\n\
         [[shaping]]\nmatch = \"c.test\"\nmax_connections = 5\nscope = \"cluster\"\n",
    )
    .unwrap();
    let running = engine.running.as_ref().unwrap();
    let err = running
        .engine
        .reload_policy(&reloaded)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shaping[0].scope"), "{err}");
    assert!(err.contains("restart"), "{err}");
    // Local rules still reload.
    let local =
        drover::Config::parse("[[shaping]]\nmatch = \"c.test\"\nmax_connections = 3\n").unwrap();
    running.engine.reload_policy(&local).unwrap();
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engines_leases_come_back_after_lease_ttl() {
    if !redis_available("killed_engines_leases") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(&created(dir.path().join("redis")));
    // Slow replies keep the first engine's sessions open (and their leases held) until it dies.
    let sink = start_sink(sink::SinkConfig {
        latency: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut engines = Vec::new();
    let mut ports = Vec::new();
    for n in 0..2 {
        let port = free_port();
        let config = dir.path().join(format!("drover-{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "[spool]\npath = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
                 [smtp_listener]\nlisten = \"127.0.0.1:0\"\n\
                 [delivery]\nehlo_name = \"drover.test\"\n\
                 [cluster]\nredis_url = \"{}\"\nlease_ttl = \"3s\"\ntimeout = \"1s\"\n\
                 [[shaping]]\nmatch = \"crash.test\"\nmax_connections = 2\nscope = \"cluster\"\n{}",
                dir.path().join(format!("data-{n}")),
                redis.url(),
                routes(&["crash.test"], sink.local_addr())
            ),
        )
        .unwrap();
        engines.push(Child(spawn_drover(&config)));
        ports.push(port);
    }
    for port in &ports {
        wait_port_ready(*port).await;
    }
    let inject = |port: u16, tag: &'static str, count: usize| async move {
        let recipients: Vec<String> = (0..count).map(|i| format!("{tag}{i}@crash.test")).collect();
        let url = format!("http://127.0.0.1:{port}/api/inject/v1");
        assert_eq!(
            post_json(&url, &message_for(&recipients), None).await.0,
            200
        );
    };
    inject(ports[0], "a", 40).await;
    let start = std::time::Instant::now();
    while sink.stats().active_connections < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            sink.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A crash: no QUIT, no release; its connections drop, its leases stay in Redis.
    engines[0].0.kill().unwrap();
    engines[0].0.wait().unwrap();
    let killed = std::time::Instant::now();
    let (connections, transactions) = (sink.stats().connections, sink.stats().transactions);
    inject(ports[1], "b", 2).await;
    // The second engine connects only once it holds a lease: after the dead one's expired.
    while sink.stats().connections == connections {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the dead engine's leases never came back: {:?}",
            sink.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "the second engine waited for the leases to expire (3 s after their last renewal): {waited:?}"
    );
    while sink.stats().transactions < transactions + 2 {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "{:?}",
            sink.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(engines);
}

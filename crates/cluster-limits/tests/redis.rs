//! The scripts against a real redis-server (started by each test on a free loopback port).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cluster_limits::logic::RateKind;
use cluster_limits::testing::{redis_available, RedisServer};
use cluster_limits::{ClusterError, ClusterLimits, Settings};
use rate_limiter::ClusterMode;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn settings(server: &RedisServer, instance: &str, lease_ttl: Duration) -> Settings {
    Settings {
        redis_url: server.url(),
        instance_id: instance.to_owned(),
        lease_ttl,
        key_prefix: "test:".to_owned(),
        timeout: Duration::from_millis(200),
    }
}

async fn instance(server: &RedisServer, name: &str, lease_ttl: Duration) -> ClusterLimits {
    let limits = ClusterLimits::start(
        settings(server, name, lease_ttl),
        Arc::new(ClusterMode::new(0.2)),
    )
    .await
    .unwrap();
    assert!(!limits.is_degraded(), "redis answers");
    limits
}

#[tokio::test]
async fn leases_are_capped_across_instances_and_a_release_lets_a_waiter_in() {
    if !redis_available("leases_are_capped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let a = instance(&server, "a", Duration::from_secs(30)).await;
    let b = instance(&server, "b", Duration::from_secs(30)).await;
    let mut held = vec![
        a.acquire("mx.test", 3).await.unwrap(),
        b.acquire("mx.test", 3).await.unwrap(),
        a.acquire("mx.test", 3).await.unwrap(),
    ];
    // Another destination has its own cap.
    let other = b.acquire("other.test", 1).await.unwrap();
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire("mx.test", 3).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "3 of 3 leases held");
    assert_eq!(a.leases_held(), 2);
    drop(held.remove(0));
    let fourth = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the release let the waiter in")
        .unwrap()
        .unwrap();
    assert_eq!(a.leases_held(), 1);
    assert_eq!(b.leases_held(), 3);
    drop((held, other, fourth));
}

#[tokio::test]
async fn a_crashed_instances_leases_expire_while_a_live_ones_are_renewed() {
    if !redis_available("leases_expire") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let ttl = Duration::from_millis(1500);
    let live = instance(&server, "live", ttl).await;
    let crashing = instance(&server, "crashing", ttl).await;
    let kept = live.acquire("mx.test", 2).await.unwrap();
    // The crashing instance neither releases nor renews: its lease stays in Redis.
    std::mem::forget(crashing.acquire("mx.test", 2).await.unwrap());
    drop(crashing);
    let other = instance(&server, "other", ttl).await;
    let start = Instant::now();
    let taken = tokio::time::timeout(Duration::from_secs(5), other.acquire("mx.test", 2))
        .await
        .expect("the crashed instance's lease came back")
        .unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited <= Duration::from_millis(3500),
        "came back after its ttl: {waited:?}"
    );
    // Three lifetimes later the live instance's lease is still held (renewed): the set is
    // full.
    tokio::time::sleep(ttl * 3).await;
    let third = tokio::time::timeout(Duration::from_millis(600), other.acquire("mx.test", 2)).await;
    assert!(third.is_err(), "the live lease was renewed, not expired");
    assert!(!kept.is_lost());
    drop((kept, taken));
}

#[tokio::test]
async fn a_gcra_rate_is_shared_by_every_instance() {
    if !redis_available("gcra_rate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let a = instance(&server, "a", Duration::from_secs(30)).await;
    let b = instance(&server, "b", Duration::from_secs(30)).await;
    let rate = "10/s".parse().unwrap();
    let start = Instant::now();
    let take = |limits: ClusterLimits| async move {
        for _ in 0..10 {
            limits
                .until_permitted(RateKind::Messages, "mx.test", rate)
                .await
                .unwrap();
        }
    };
    let (ra, rb) = tokio::join!(tokio::spawn(take(a.clone())), tokio::spawn(take(b.clone())));
    ra.unwrap();
    rb.unwrap();
    // 20 permits at 10/s between them: the first at once, then one every 100 ms.
    let took = start.elapsed().as_secs_f64();
    assert!((1.85..=3.0).contains(&took), "took {took} s");
    // Another destination, and the connection rate, are separate.
    let start = Instant::now();
    a.until_permitted(RateKind::Messages, "other.test", rate)
        .await
        .unwrap();
    a.until_permitted(RateKind::Connections, "mx.test", rate)
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(90));
}

#[tokio::test]
async fn a_stopped_redis_turns_on_the_fallback_and_a_restarted_one_turns_it_off() {
    if !redis_available("fallback") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = RedisServer::start(dir.path());
    let mode = Arc::new(ClusterMode::new(0.2));
    let limits = ClusterLimits::start(
        settings(&server, "a", Duration::from_secs(3)),
        Arc::clone(&mode),
    )
    .await
    .unwrap();
    let lease = limits.acquire("mx.test", 5).await.unwrap();
    server.stop();
    let start = Instant::now();
    let failed = limits.acquire("mx.test", 5).await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "within the timeout: {:?}",
        start.elapsed()
    );
    assert!(
        mode.is_degraded(),
        "the shaper now keeps to the local share"
    );
    // Degraded: no Redis call at all on the delivery path.
    let start = Instant::now();
    assert!(matches!(
        limits
            .until_permitted(RateKind::Messages, "mx.test", "1/s".parse().unwrap())
            .await,
        Err(ClusterError::Unavailable)
    ));
    assert!(start.elapsed() < Duration::from_millis(20));
    drop(lease);
    server.restart();
    let start = Instant::now();
    while mode.is_degraded() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the heartbeat never saw Redis back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _again = limits.acquire("mx.test", 5).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_at_start_starts_in_fallback() {
    if !redis_available("unreachable_at_start") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mode = Arc::new(ClusterMode::new(0.5));
    let limits = ClusterLimits::start(
        Settings {
            redis_url: format!("redis://127.0.0.1:{port}/0"),
            instance_id: "a".into(),
            lease_ttl: Duration::from_secs(3),
            key_prefix: "test:".into(),
            timeout: Duration::from_millis(200),
        },
        Arc::clone(&mode),
    )
    .await
    .unwrap();
    assert!(mode.is_degraded());
    assert!(limits.acquire("mx.test", 5).await.is_err());
    // Redis comes up on that port: the heartbeat connects.
    let dir = tempfile::tempdir().unwrap();
    let _server = RedisServer::start_on(dir.path(), port);
    let start = Instant::now();
    while mode.is_degraded() {
        assert!(start.elapsed() < Duration::from_secs(5), "never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _lease = limits.acquire("mx.test", 5).await.unwrap();
}

#[tokio::test]
async fn a_waiter_marks_the_destination_wanted_for_the_holders_of_its_leases() {
    if !redis_available("wanted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let a = instance(&server, "a", Duration::from_secs(30)).await;
    let b = instance(&server, "b", Duration::from_secs(30)).await;
    let idle = a.acquire("mx.test", 1).await.unwrap();
    let other = a.acquire("other.test", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!idle.is_wanted(), "nobody waits yet");
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire("mx.test", 1).await })
    };
    let start = Instant::now();
    while !idle.is_wanted() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the holder never heard of the waiter"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!other.is_wanted(), "only the destination waited for");
    // The holder makes room: the waiter gets in.
    drop(idle);
    let served = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("the waiter got the lease")
        .unwrap()
        .unwrap();
    // Nobody waits any more: the flag lapses for the new holder.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!served.is_wanted());
}

#[tokio::test]
async fn a_released_lease_is_free_for_another_instance_at_once() {
    if !redis_available("released_at_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start(dir.path());
    let a = instance(&server, "a", Duration::from_secs(30)).await;
    let b = instance(&server, "b", Duration::from_secs(30)).await;
    for _ in 0..5 {
        let lease = a.acquire("mx.test", 1).await.unwrap();
        lease.release().await;
        assert_eq!(a.leases_held(), 0);
        // Taken at the first try: a full set would have meant a poll of at least 17 ms.
        let taken = tokio::time::timeout(Duration::from_millis(15), b.acquire("mx.test", 1))
            .await
            .expect("free at once")
            .unwrap();
        taken.release().await;
    }
}

//! Routing through real DNS: an in-process authoritative server on 127.0.0.1.

use crate::harness::*;
use resolver_cache::testing::TestDns;
use std::time::Duration;

const ZONE: &str = r#"
$ORIGIN mx.test.
$TTL 60
@        IN SOA ns.mx.test. admin.mx.test. ( 1 3600 600 86400 30 )
@        IN NS  ns
ns       IN A   127.0.0.1
two      IN MX  10 dead
two      IN MX  20 live
dead     IN A   127.0.0.2
live     IN A   127.0.0.1
direct   IN A   127.0.0.1
nullmx   IN MX  0 .
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_failover_implicit_mx_and_dns_bounces() {
    let dns = TestDns::start(ZONE, "mx.test.").await;
    // The sink listens on 127.0.0.1 only, so the preferred MX (127.0.0.2) refuses.
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "[dns]\nnameservers = [\"{}\"]\n[delivery]\nsmtp_port = {}\n",
        dns.addr,
        sink.local_addr().port()
    ))
    .await;
    let recipients = [
        "a@two.mx.test",
        "b@two.mx.test",
        "c@direct.mx.test",
        "d@ghost.mx.test",
        "e@nullmx.mx.test",
    ];
    let recipients: Vec<String> = recipients.iter().map(|r| r.to_string()).collect();
    assert_eq!(engine.inject(&message_for(&recipients)).await.0, 200);
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(20), |r| {
        count_type(r, "Delivery") == 3 && count_type(r, "Bounce") == 2
    })
    .await;
    let by_rcpt = |rcpt: &str, kind: &str| {
        recs.iter()
            .find(|r| r["recipient"] == rcpt && r["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} for {rcpt}"))
            .clone()
    };
    let a = by_rcpt("a@two.mx.test", "Delivery");
    assert_eq!(
        a["peer"]["host"], "live.mx.test",
        "second MX after the first refused"
    );
    assert_eq!(a["site"], "dead.mx.test,live.mx.test");
    assert_eq!(a["attempt"], 1);
    let c = by_rcpt("c@direct.mx.test", "Delivery");
    assert_eq!(c["peer"]["host"], "direct.mx.test", "implicit MX");
    let d = by_rcpt("d@ghost.mx.test", "Bounce");
    assert_eq!(d["bounce_category"], "bad-domain");
    assert_eq!(d["response"]["enhanced_code"], "5.1.2");
    let e = by_rcpt("e@nullmx.mx.test", "Bounce");
    assert_eq!(e["response"]["enhanced_code"], "5.1.10");
    assert_eq!(sink.stats().transactions, 3);
    let metrics = engine.metrics().await;
    assert!(
        metrics.contains("drover_dns_lookups_total{result=\"nxdomain\"} "),
        "{metrics}"
    );
    engine.stop().await;
}

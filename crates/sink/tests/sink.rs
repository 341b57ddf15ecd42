//! The sink over real loopback TCP, driven with raw SMTP bytes. What the socket loop itself
//! guarantees (pipelining, long lines, SIZE, STARTTLS) is tested in smtp-server.

// Helpers outside #[test] functions are not covered by clippy.toml's
// allow-unwrap-in-tests; a panic is the right failure in a test binary.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sink::{Sink, SinkConfig, SinkHandle};
use smtp_proto::Capabilities;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

async fn start(config: SinkConfig) -> SinkHandle {
    Sink::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

use smtp_server::testing::TestClient as Client;

/// Polls until `cond` holds on the stats, for counters updated by
/// connection tasks after the client already saw the effect.
async fn eventually(sink: &SinkHandle, cond: impl Fn(&sink::SinkStats) -> bool) {
    for _ in 0..200 {
        if cond(&sink.stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held: {:?}", sink.stats());
}

#[tokio::test]
async fn basic_transaction_is_counted() {
    let sink = start(SinkConfig::default()).await;
    let mut c = Client::connect(sink.local_addr()).await;
    let ehlo = c.expect("EHLO client.test", 250).await;
    assert_eq!(ehlo.lines[0], "sink.drover.test greets client.test");
    let done = c
        .send_message("a@b.test", "c@d.test", b"Subject: hi\r\n\r\nhello\r\n")
        .await
        .unwrap();
    assert_eq!(done.code, 250);
    assert_eq!(
        done.enhanced.map(|e| e.to_string()).as_deref(),
        Some("2.0.0")
    );
    c.expect("QUIT", 221).await;
    c.expect_eof().await;
    let stats = sink.stats();
    assert_eq!(stats.transactions, 1);
    assert_eq!(stats.recipients, 1);
    assert_eq!(stats.connections, 1);
    assert!(sink.messages().is_empty(), "capture is off by default");
    let stats = sink.shutdown().await;
    assert_eq!(stats.active_connections, 0);
}

#[tokio::test]
async fn pipelining_advertised_unless_disabled() {
    for (pipelining, expected) in [(true, true), (false, false)] {
        let sink = start(SinkConfig {
            pipelining,
            max_message_size: 1000,
            ..SinkConfig::default()
        })
        .await;
        let mut c = Client::connect(sink.local_addr()).await;
        let caps = Capabilities::from_ehlo(&c.expect("EHLO x", 250).await);
        assert_eq!(caps.pipelining, expected);
        assert_eq!(caps.size, Some(1000));
        assert!(caps.enhanced_status_codes && caps.eight_bit_mime);
        // Pipelined commands still work when not advertised.
        c.send(b"NOOP\r\nRSET\r\nNOOP\r\n").await;
        for _ in 0..3 {
            assert_eq!(c.reply().await.unwrap().code, 250);
        }
    }
}

#[tokio::test]
async fn greylisting() {
    let sink = start(SinkConfig {
        greylist: Some(Duration::from_millis(300)),
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    let first = c.expect("RCPT TO:<c@d.test>", 450).await;
    assert_eq!(first.text(), "Greylisted, try again later");
    assert_eq!(
        first.enhanced.map(|e| e.to_string()).as_deref(),
        Some("4.2.0")
    );
    // An immediate retry, on another connection, is still too early.
    let mut c2 = Client::connect(sink.local_addr()).await;
    c2.expect("HELO x", 250).await;
    c2.expect("MAIL FROM:<a@b.test>", 250).await;
    c2.expect("RCPT TO:<c@d.test>", 450).await;
    // A different pair is greylisted on its own.
    c2.expect("RCPT TO:<other@d.test>", 450).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    c.expect("RCPT TO:<c@d.test>", 250).await;
    c2.expect("RCPT TO:<c@d.test>", 250).await;
    let stats = sink.stats();
    assert_eq!(stats.greylisted, 3);
    assert_eq!(stats.recipients, 2);
}

#[tokio::test]
async fn reject_percent_100_rejects_everyone() {
    let sink = start(SinkConfig {
        reject_percent: 100,
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    for to in ["c@d.test", "e@f.test"] {
        let r = c.expect(&format!("RCPT TO:<{to}>"), 550).await;
        assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("5.1.1"));
        assert_eq!(r.text(), "No such user");
    }
    c.expect("DATA", 554).await;
    assert_eq!(sink.stats().rcpt_rejected, 2);
}

#[tokio::test]
async fn reject_percent_is_stable_per_address() {
    let sink = start(SinkConfig {
        reject_percent: 50,
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    let mut outcomes = Vec::new();
    for i in 0..40 {
        outcomes.push(c.cmd(&format!("RCPT TO:<user{i}@d.test>")).await.code);
    }
    for (i, first) in outcomes.iter().enumerate() {
        // Case differences do not change the verdict either.
        let again = c.cmd(&format!("RCPT TO:<USER{i}@d.test>")).await.code;
        assert_eq!(again, *first, "user{i}");
    }
    assert!(
        outcomes.contains(&250) && outcomes.contains(&550),
        "{outcomes:?}"
    );
}

#[tokio::test]
async fn tempfail_percent_100_tempfails() {
    let sink = start(SinkConfig {
        tempfail_percent: 100,
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    c.expect("MAIL FROM:<a@b.test>", 250).await;
    let r = c.expect("RCPT TO:<c@d.test>", 451).await;
    assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("4.3.0"));
    assert_eq!(sink.stats().rcpt_tempfailed, 1);
    assert_eq!(sink.stats().recipients, 0);
}

#[tokio::test]
async fn reply_after_messages_421_closes() {
    let sink = start(SinkConfig {
        reply_after_messages: Some((2, 421, "4.7.0 Too many messages".into())),
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    for _ in 0..2 {
        let r = c.send_message("a@b.test", "c@d.test", b"hi\r\n").await;
        assert_eq!(r.unwrap().code, 250);
    }
    let r = c.expect("MAIL FROM:<a@b.test>", 421).await;
    assert_eq!(r.text(), "Too many messages");
    c.expect_eof().await;
    assert_eq!(sink.stats().transactions, 2);
}

#[tokio::test]
async fn reply_after_messages_other_code_keeps_connection() {
    let sink = start(SinkConfig {
        reply_after_messages: Some((1, 452, "4.5.3 Enough".into())),
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    let r = c.send_message("a@b.test", "c@d.test", b"hi\r\n").await;
    assert_eq!(r.unwrap().code, 250);
    c.expect("MAIL FROM:<a@b.test>", 452).await;
    c.expect("NOOP", 250).await;
}

#[tokio::test]
async fn capture_records_envelope_and_unstuffed_data() {
    let sink = start(SinkConfig {
        capture: true,
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@b.test> BODY=8BITMIME", 250).await;
    c.expect("RCPT TO:<c@d.test>", 250).await;
    c.expect("RCPT TO:<e@f.test> NOTIFY=NEVER", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\n.\r\n")
        .await;
    assert_eq!(c.reply().await.unwrap().code, 250);
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.helo, "client.test");
    assert_eq!(m.sender, "a@b.test");
    assert_eq!(m.recipients, ["c@d.test", "e@f.test"]);
    assert_eq!(m.data, b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n");
    assert_eq!(m.local, sink.local_addr());
    assert_eq!(m.peer, c.stream.local_addr().unwrap());
}

#[tokio::test]
async fn max_concurrent_connections() {
    let sink = start(SinkConfig::default()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(sink.local_addr()).await);
    }
    eventually(&sink, |s| s.active_connections == 3).await;
    drop(clients.pop());
    eventually(&sink, |s| s.active_connections == 2).await;
    clients.push(Client::connect(sink.local_addr()).await);
    eventually(&sink, |s| s.connections == 4 && s.active_connections == 3).await;
    drop(clients);
    eventually(&sink, |s| s.active_connections == 0).await;
    let stats = sink.shutdown().await;
    assert_eq!(stats.max_concurrent_connections, 3);
    assert_eq!(stats.connections, 4);
}

#[tokio::test]
async fn stall_after_messages_stops_answering() {
    let sink = start(SinkConfig {
        stall_after_messages: Some(1),
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    let r = c.send_message("a@b.test", "c@d.test", b"hi\r\n").await;
    assert_eq!(r.unwrap().code, 250);
    c.send(b"MAIL FROM:<a@b.test>\r\n").await;
    let mut chunk = [0u8; 64];
    let read = timeout(Duration::from_millis(300), c.stream.read(&mut chunk)).await;
    assert!(read.is_err(), "sink answered while stalled: {read:?}");
    assert_eq!(sink.stats().active_connections, 1);
    // Shutdown closes even a stalled connection.
    let stats = sink.shutdown().await;
    assert_eq!(stats.active_connections, 0);
    c.expect_eof().await;
}

#[tokio::test]
async fn drop_after_data_closes_without_reply() {
    let sink = start(SinkConfig {
        drop_after_data_percent: 100,
        capture: true,
        ..SinkConfig::default()
    })
    .await;
    let mut c = Client::connect(sink.local_addr()).await;
    c.expect("EHLO x", 250).await;
    assert_eq!(
        c.send_message("a@b.test", "c@d.test", b"hi\r\n").await,
        None
    );
    let stats = sink.stats();
    assert_eq!((stats.dropped, stats.transactions), (1, 0));
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn banner_delay_and_latency() {
    let sink = start(SinkConfig {
        banner_delay: Duration::from_millis(200),
        latency: Duration::from_millis(50),
        ..SinkConfig::default()
    })
    .await;
    let started = std::time::Instant::now();
    let mut c = Client::connect_raw(sink.local_addr()).await;
    assert_eq!(c.reply().await.unwrap().code, 220);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let before = std::time::Instant::now();
    c.send(b"NOOP\r\nNOOP\r\n").await;
    c.reply().await.unwrap();
    c.reply().await.unwrap();
    assert!(before.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let sink = start(SinkConfig::default()).await;
    let addr = sink.local_addr();
    let mut c = Client::connect(addr).await;
    let stats = sink.shutdown().await;
    assert_eq!(stats.connections, 1);
    c.expect_eof().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

//! The SMTP client and pool against the real sink (and a few scripted fake MX hosts) over
//! loopback TCP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

use connection_pool::{
    ClientError, ConnectOptions, Envelope, Pool, SmtpClient, Timeouts, TlsFailureMemory, TlsMode,
};
use queue_key::QueueKey;
use sink::{Sink, SinkConfig, SinkHandle, SinkTls};
use smtp_proto::{parse_reply, ProtoError, Reply, MAX_REPLY_LINE, MAX_REPLY_LINES};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const MESSAGE: &[u8] = b"Subject: test\r\n\r\nHello\r\n.leading dot\r\n";
const HOST: &str = "mx.example.test";

fn timeouts() -> Timeouts {
    let s = Duration::from_secs(5);
    Timeouts {
        connect: s,
        banner: s,
        ehlo: s,
        mail: s,
        rcpt: s,
        data: s,
        data_block: s,
        final_dot: s,
        other: s,
    }
}

async fn start(config: SinkConfig) -> SinkHandle {
    Sink::bind(
        "127.0.0.1:0".parse().unwrap(),
        SinkConfig {
            capture: true,
            ..config
        },
    )
    .await
    .unwrap()
}

fn tls_config() -> SinkConfig {
    SinkConfig {
        tls: Some(SinkTls::self_signed(&[HOST, "localhost"]).unwrap()),
        ..SinkConfig::default()
    }
}

fn options(address: SocketAddr, mode: TlsMode) -> ConnectOptions {
    ConnectOptions {
        timeouts: timeouts(),
        tls: mode,
        // Each test its own memory, so tests cannot influence each other.
        tls_failures: TlsFailureMemory::default(),
        ..ConnectOptions::new(HOST, address, "client.example.test")
    }
}

fn envelope(recipients: &[&str]) -> Envelope {
    Envelope {
        sender: "sender@example.org".to_owned(),
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        ..Default::default()
    }
}

async fn connect(sink: &SinkHandle, mode: TlsMode) -> Result<SmtpClient, ClientError> {
    SmtpClient::connect_with(options(sink.local_addr(), mode)).await
}

async fn deliver_one(client: &mut SmtpClient) {
    let tx = client
        .send(&envelope(&["rcpt@example.net"]), MESSAGE)
        .await
        .unwrap();
    assert_eq!(tx.outcome_for(0).code, 250, "{tx:?}");
}

// ---------------------------------------------------------------- STARTTLS

#[tokio::test]
async fn opportunistic_upgrades_when_offered() {
    let sink = start(tls_config()).await;
    let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
    let tls = client.tls().expect("TLS negotiated");
    assert_eq!(tls.protocol, "TLSv1.3");
    assert!(!tls.verified);
    assert_eq!(tls.to_string(), format!("{}:{}", tls.protocol, tls.cipher));
    // Capabilities come from the EHLO said over TLS, which no longer offers STARTTLS.
    assert!(!client.capabilities().starttls);
    assert!(client.capabilities().pipelining);
    deliver_one(&mut client).await;
    client.quit().await;

    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].data, MESSAGE);
    assert_eq!(messages[0].helo, "client.example.test");
    assert_eq!(messages[0].tls.as_deref(), Some(tls.to_string().as_str()));
    assert_eq!(sink.shutdown().await.tls_handshakes, 1);
}

#[tokio::test]
async fn plain_connect_is_opportunistic() {
    let sink = start(tls_config()).await;
    let mut client = SmtpClient::connect(HOST, sink.local_addr(), None, "c.test", timeouts())
        .await
        .unwrap();
    assert!(client.tls().is_some());
    deliver_one(&mut client).await;
    client.quit().await;
}

#[tokio::test]
async fn opportunistic_stays_plaintext_when_not_offered() {
    let sink = start(SinkConfig::default()).await;
    let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
    assert!(client.tls().is_none());
    deliver_one(&mut client).await;
    client.quit().await;
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].tls, None);
}

#[tokio::test]
async fn required_rejects_a_self_signed_certificate() {
    let sink = start(tls_config()).await;
    let err = connect(&sink, TlsMode::Required).await.unwrap_err();
    let ClientError::TlsRequired { reason } = &err else {
        panic!("expected TlsRequired, got {err:?}");
    };
    assert!(reason.contains("certificate"), "{reason}");
    assert_eq!(sink.stats().transactions, 0);
}

#[tokio::test]
async fn required_accepts_a_trusted_certificate() {
    let config = tls_config();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(config.tls.as_ref().unwrap().certificate().unwrap().clone())
        .unwrap();
    let sink = start(config).await;
    let mut client = SmtpClient::connect_with(ConnectOptions {
        tls_roots: Some(Arc::new(roots.clone())),
        ..options(sink.local_addr(), TlsMode::Required)
    })
    .await
    .unwrap();
    assert!(client.tls().unwrap().verified);
    deliver_one(&mut client).await;
    client.quit().await;

    // The same trusted certificate presented under a name it was not issued for.
    let err = SmtpClient::connect_with(ConnectOptions {
        host: "other.example.test".to_owned(),
        tls_roots: Some(Arc::new(roots)),
        ..options(sink.local_addr(), TlsMode::Required)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::TlsRequired { .. }), "{err:?}");
}

#[tokio::test]
async fn required_fails_without_starttls() {
    let sink = start(SinkConfig::default()).await;
    let err = connect(&sink, TlsMode::Required).await.unwrap_err();
    let ClientError::TlsRequired { reason } = &err else {
        panic!("expected TlsRequired, got {err:?}");
    };
    assert!(reason.contains("not offered"), "{reason}");
}

#[tokio::test]
async fn disabled_never_upgrades() {
    let sink = start(tls_config()).await;
    let mut client = connect(&sink, TlsMode::Disabled).await.unwrap();
    assert!(client.tls().is_none());
    assert!(client.capabilities().starttls);
    deliver_one(&mut client).await;
    client.quit().await;
    assert_eq!(sink.messages()[0].tls, None);
    assert_eq!(sink.shutdown().await.tls_handshakes, 0);
}

#[tokio::test]
async fn failed_handshake_is_remembered_and_next_session_goes_plaintext() {
    let fake = FakeMx::start(FakeStartTls::Garbage).await;
    let memory = TlsFailureMemory::new(Duration::from_secs(3600));
    let opts = ConnectOptions {
        tls_failures: memory.clone(),
        ..options(fake.address, TlsMode::Opportunistic)
    };
    let err = SmtpClient::connect_with(opts.clone()).await.unwrap_err();
    assert!(matches!(err, ClientError::TlsHandshake { .. }), "{err:?}");
    assert!(memory.failed_recently(fake.address.ip()));

    let client = SmtpClient::connect_with(opts.clone()).await.unwrap();
    assert!(client.tls().is_none());
    client.quit().await;
    assert_eq!(fake.count("STARTTLS"), 1);

    // Once forgotten (or expired), TLS is tried again.
    memory.forget(fake.address.ip());
    assert!(SmtpClient::connect_with(opts).await.is_err());
    assert_eq!(fake.count("STARTTLS"), 2);
}

#[tokio::test]
async fn failure_memory_expires() {
    let memory = TlsFailureMemory::new(Duration::from_millis(50));
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    memory.remember(ip);
    assert!(memory.failed_recently(ip));
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(!memory.failed_recently(ip));
}

#[tokio::test]
async fn data_pipelined_after_the_starttls_reply_is_refused() {
    let fake = FakeMx::start(FakeStartTls::Injected).await;
    let err = SmtpClient::connect_with(options(fake.address, TlsMode::Opportunistic))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::UnexpectedData {
                command: "STARTTLS"
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn sink_discards_commands_pipelined_after_starttls() {
    let config = tls_config();
    let cert = config.tls.as_ref().unwrap().certificate().unwrap().clone();
    let sink = start(config).await;
    let mut raw = RawClient::connect(sink.local_addr()).await;
    assert_eq!(raw.reply().await.code, 220);
    raw.stream.write_all(b"EHLO raw.test\r\n").await.unwrap();
    assert_eq!(raw.reply().await.code, 250);
    // One write, so the NOOP is in the sink's buffer when STARTTLS is handled.
    raw.stream.write_all(b"STARTTLS\r\nNOOP\r\n").await.unwrap();
    assert_eq!(raw.reply().await.code, 220);
    assert!(raw.buf.is_empty());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, raw.stream).await.unwrap();
    tls.write_all(b"EHLO raw.test\r\n").await.unwrap();
    // The first reply over TLS answers EHLO: the NOOP was never executed.
    let mut buf = Vec::new();
    let reply = loop {
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((reply, _)) = parse_reply(&buf, MAX_REPLY_LINE).unwrap() {
            break reply;
        }
    };
    assert_eq!(reply.code, 250);
    assert!(reply.lines[0].contains("greets raw.test"), "{reply:?}");
    assert!(!reply.lines.iter().any(|l| l == "STARTTLS"), "{reply:?}");
    let stats = sink.stats();
    assert_eq!(stats.discarded_after_starttls, b"NOOP\r\n".len() as u64);
    assert_eq!(stats.tls_handshakes, 1);
}

// ------------------------------------------------------- session robustness

#[tokio::test]
async fn banner_that_never_comes_times_out() {
    let sink = start(SinkConfig {
        banner_delay: Duration::from_secs(30),
        ..SinkConfig::default()
    })
    .await;
    let err = SmtpClient::connect_with(ConnectOptions {
        timeouts: Timeouts {
            banner: Duration::from_millis(200),
            ..timeouts()
        },
        ..options(sink.local_addr(), TlsMode::Opportunistic)
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Timeout {
                command: "banner",
                duration
            } if duration == Duration::from_millis(200)
        ),
        "{err:?}"
    );
    assert!(!err.after_final_dot());
}

#[tokio::test]
async fn connection_dropped_after_the_final_dot() {
    for pipelining in [true, false] {
        let sink = start(SinkConfig {
            drop_after_data_percent: 100,
            pipelining,
            ..SinkConfig::default()
        })
        .await;
        let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
        let err = client
            .send(&envelope(&["rcpt@example.net"]), MESSAGE)
            .await
            .unwrap_err();
        assert!(err.after_final_dot(), "{err:?}");
        assert!(!client.is_usable());
        assert_eq!(sink.shutdown().await.dropped, 1);
    }
}

#[tokio::test]
async fn an_ehlo_reply_that_never_ends_is_a_protocol_error_long_before_the_timeout() {
    let hostile = FloodingMx::start("EHLO", true).await;
    let timeouts = Timeouts {
        ehlo: Duration::from_secs(30),
        ..timeouts()
    };
    let started = std::time::Instant::now();
    let err = SmtpClient::connect_with(ConnectOptions {
        timeouts,
        ..options(hostile.address, TlsMode::Opportunistic)
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Protocol {
                command: "EHLO",
                source: ProtoError::ReplyTooManyLines {
                    limit: MAX_REPLY_LINES
                }
            }
        ),
        "{err:?}"
    );
    // Only a hang guard: the limit, not the 30 s timeout, ended it.
    assert!(
        started.elapsed() < timeouts.ehlo / 3,
        "{:?}",
        started.elapsed()
    );
    assert!(!err.after_final_dot());
}

#[tokio::test]
async fn a_reply_that_never_ends_mid_transaction_breaks_the_session() {
    for pipelining in [true, false] {
        for (verb, command) in [
            ("MAIL", "MAIL"),
            ("RCPT", "RCPT"),
            ("DATA", "DATA"),
            (".", "."),
        ] {
            let hostile = FloodingMx::start(verb, pipelining).await;
            let mut client =
                SmtpClient::connect_with(options(hostile.address, TlsMode::Opportunistic))
                    .await
                    .unwrap();
            assert_eq!(client.capabilities().pipelining, pipelining);
            let err = client
                .send(&envelope(&["rcpt@example.net"]), MESSAGE)
                .await
                .unwrap_err();
            assert!(
                matches!(
                    &err,
                    ClientError::Protocol {
                        command: c,
                        source: ProtoError::ReplyTooManyLines { .. }
                    } if *c == command
                ),
                "{verb}, pipelining={pipelining}: {err:?}"
            );
            assert!(!client.is_usable(), "{verb}, pipelining={pipelining}");
            assert_eq!(err.after_final_dot(), verb == ".", "{err:?}");
        }
    }
}

#[tokio::test]
async fn reply_421_after_two_messages_ends_the_session() {
    for pipelining in [true, false] {
        let sink = start(SinkConfig {
            reply_after_messages: Some((2, 421, "Too many messages".to_owned())),
            pipelining,
            ..tls_config()
        })
        .await;
        let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
        deliver_one(&mut client).await;
        deliver_one(&mut client).await;
        let rcpts = ["a@example.net", "b@example.net"];
        let tx = client.send(&envelope(&rcpts), MESSAGE).await.unwrap();
        assert_eq!(tx.mail.code, 421, "{tx:?}");
        assert_eq!(tx.outcome_for(0).code, 421);
        assert_eq!(tx.outcome_for(1).code, 421);
        assert!(!client.is_usable());
        assert_eq!(client.transactions(), 3);
        assert_eq!(sink.shutdown().await.transactions, 2);
    }
}

#[tokio::test]
async fn pipelining_sends_the_envelope_in_one_write() {
    let rcpts = ["a@example.net", "b@example.net", "c@example.net"];
    for (pipelining, writes) in [(true, 2), (false, 3 + rcpts.len() as u64)] {
        let sink = start(SinkConfig {
            pipelining,
            ..SinkConfig::default()
        })
        .await;
        let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
        assert_eq!(client.capabilities().pipelining, pipelining);
        for round in 1..=2u64 {
            let before = client.writes();
            let tx = client.send(&envelope(&rcpts), MESSAGE).await.unwrap();
            assert_eq!(client.writes() - before, writes, "pipelining={pipelining}");
            assert_eq!(tx.rcpts.len(), rcpts.len());
            for i in 0..rcpts.len() {
                assert_eq!(tx.outcome_for(i).code, 250);
            }
            assert_eq!(sink.stats().transactions, round);
        }
        client.quit().await;
        let messages = sink.messages();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].recipients, rcpts);
        assert_eq!(messages[1].data, MESSAGE);
    }
}

#[tokio::test]
async fn all_recipients_rejected_keeps_the_session_usable() {
    for pipelining in [true, false] {
        let sink = start(SinkConfig {
            reject_percent: 100,
            pipelining,
            ..SinkConfig::default()
        })
        .await;
        let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
        for _ in 0..2 {
            let tx = client
                .send(&envelope(&["a@example.net", "b@example.net"]), MESSAGE)
                .await
                .unwrap();
            assert_eq!(tx.data, None, "{tx:?}");
            assert_eq!(tx.outcome_for(0).code, 550);
            assert_eq!(tx.outcome_for(1).code, 550);
            assert!(client.is_usable());
        }
        client.quit().await;
        let stats = sink.shutdown().await;
        assert_eq!(stats.rcpt_rejected, 4);
        assert_eq!(stats.transactions, 0);
    }
}

#[tokio::test]
async fn data_accepted_without_recipients_is_ended_with_a_lone_dot() {
    let fake = FakeMx::start(FakeStartTls::NotOffered).await;
    let mut client = SmtpClient::connect_with(options(fake.address, TlsMode::Opportunistic))
        .await
        .unwrap();
    let tx = client
        .send(&envelope(&["nobody@example.net"]), MESSAGE)
        .await
        .unwrap();
    assert_eq!(tx.outcome_for(0).code, 550);
    assert_eq!(tx.data, None);
    assert!(client.is_usable());
    client.quit().await;
    let lines = fake.lines();
    let after_data: Vec<&str> = lines
        .iter()
        .skip_while(|l| *l != "DATA")
        .map(String::as_str)
        .collect();
    // The message body was never sent: only the dot, then the reset.
    assert_eq!(after_data, ["DATA", ".", "RSET", "QUIT"]);
}

#[tokio::test]
async fn binds_the_source_address() {
    let sink = start(SinkConfig::default()).await;
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut client = SmtpClient::connect(
        HOST,
        sink.local_addr(),
        Some(source),
        "client.example.test",
        timeouts(),
    )
    .await
    .unwrap();
    assert_eq!(client.peer().local.map(|a| a.ip()), Some(source));
    assert_eq!(client.peer().host, HOST);
    assert_eq!(client.peer().address, sink.local_addr());
    deliver_one(&mut client).await;
    client.quit().await;
    assert_eq!(sink.messages()[0].peer.ip(), source);
}

// -------------------------------------------------------------------- pool

#[tokio::test]
async fn pool_reuses_checked_in_sessions() {
    let sink = start(tls_config()).await;
    let pool = Pool::new(Duration::from_secs(60));
    assert!(pool.checkout(&QueueKey::new("site")).is_none());
    let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
    deliver_one(&mut client).await;
    pool.checkin(&QueueKey::new("site"), client);
    assert_eq!(pool.idle_count(), 1);
    assert!(pool.checkout(&QueueKey::new("other")).is_none());
    // The site's sessions from another egress source are others.
    assert!(pool
        .checkout(&QueueKey::with_source("site", Some("ip1")))
        .is_none());
    assert!(pool.has_idle(&QueueKey::new("site")));

    let mut client = pool.checkout(&QueueKey::new("site")).expect("idle session");
    assert_eq!(pool.idle_count(), 0);
    assert_eq!(client.transactions(), 1);
    assert!(client.tls().is_some());
    deliver_one(&mut client).await;
    pool.checkin(&QueueKey::new("site"), client);
    pool.close().await;
    assert_eq!(pool.idle_count(), 0);
    let stats = sink.shutdown().await;
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.transactions, 2);
}

#[tokio::test]
async fn pool_drops_broken_sessions() {
    let sink = start(SinkConfig {
        reply_after_messages: Some((0, 421, "Go away".to_owned())),
        ..SinkConfig::default()
    })
    .await;
    let pool = Pool::new(Duration::from_secs(60));
    let mut client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
    let tx = client
        .send(&envelope(&["a@example.net"]), MESSAGE)
        .await
        .unwrap();
    assert_eq!(tx.mail.code, 421);
    pool.checkin(&QueueKey::new("site"), client);
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test]
async fn pool_reaps_idle_sessions() {
    let sink = start(SinkConfig::default()).await;
    let pool = Pool::new(Duration::from_millis(100));
    let client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
    pool.checkin(&QueueKey::new("site"), client);
    pool.reap();
    assert_eq!(pool.idle_count(), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Too old to hand out, even before the reaper runs.
    assert!(pool.checkout(&QueueKey::new("site")).is_none());

    let client = connect(&sink, TlsMode::Opportunistic).await.unwrap();
    pool.checkin(&QueueKey::new("site"), client);
    tokio::time::sleep(Duration::from_millis(150)).await;
    pool.reap();
    assert_eq!(pool.idle_count(), 0);
    // The reaped sessions are closed with QUIT, in the background.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while sink.stats().active_connections > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions not closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.stats().connections, 2);
}

// ----------------------------------------------------------------- metrics

mod gauge {
    use metrics::{
        Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use std::sync::{Arc, Mutex};

    /// Sums every update of `drover_smtp_connections`.
    #[derive(Default)]
    pub struct Connections(pub Arc<Mutex<f64>>);

    struct Cell(Arc<Mutex<f64>>);

    impl GaugeFn for Cell {
        fn increment(&self, value: f64) {
            *self.0.lock().unwrap() += value;
        }
        fn decrement(&self, value: f64) {
            *self.0.lock().unwrap() -= value;
        }
        fn set(&self, value: f64) {
            *self.0.lock().unwrap() = value;
        }
    }

    impl Recorder for Connections {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            assert_eq!(key.name(), "drover_smtp_connections");
            Gauge::from_arc(Arc::new(Cell(Arc::clone(&self.0))))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }
}

#[test]
fn connection_gauge_follows_sessions_across_starttls_and_failures() {
    let recorder = gauge::Connections::default();
    let value = Arc::clone(&recorder.0);
    let get = move || *value.lock().unwrap();
    // The recorder is thread-local, so everything runs on this thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let sink = start(tls_config()).await;
            let mut a = connect(&sink, TlsMode::Opportunistic).await.unwrap();
            assert!(a.tls().is_some());
            assert_eq!(get(), 1.0);
            let b = connect(&sink, TlsMode::Disabled).await.unwrap();
            assert_eq!(get(), 2.0);
            assert!(connect(&sink, TlsMode::Required).await.is_err());
            assert_eq!(get(), 2.0);

            let pool = Pool::new(Duration::from_secs(60));
            deliver_one(&mut a).await;
            pool.checkin(&QueueKey::new("site"), a);
            assert_eq!(get(), 2.0);
            b.quit().await;
            assert_eq!(get(), 1.0);
            pool.close().await;
            assert_eq!(get(), 0.0);

            let fake = FakeMx::start(FakeStartTls::Garbage).await;
            let err = SmtpClient::connect_with(options(fake.address, TlsMode::Opportunistic));
            assert!(err.await.is_err());
            assert_eq!(get(), 0.0);
        });
    });
}

// ------------------------------------------------------------------ helpers

/// What a [`FakeMx`] does with STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FakeStartTls {
    /// Not advertised.
    NotOffered,
    /// `220`, then bytes that are not a TLS handshake.
    Garbage,
    /// `220` with a second reply in the same write, as a command injection would produce.
    Injected,
}

/// A scripted MX for what the sink never does: a broken TLS stack, replies pipelined after
/// the `220` to STARTTLS, `354` to DATA without recipients. MAIL gets 250 and RCPT 550.
struct FakeMx {
    address: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl FakeMx {
    async fn start(starttls: FakeStartTls) -> FakeMx {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&lines);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(FakeMx::serve(stream, starttls, Arc::clone(&seen)));
            }
        });
        FakeMx { address, lines }
    }

    async fn serve(stream: TcpStream, starttls: FakeStartTls, seen: Arc<Mutex<Vec<String>>>) {
        let mut stream = BufReader::new(stream);
        let mut out: Vec<u8> = b"220 fake.test ESMTP\r\n".to_vec();
        let mut in_data = false;
        loop {
            if !out.is_empty() {
                if stream.get_mut().write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end().to_owned();
            seen.lock().unwrap().push(line.clone());
            if in_data {
                if line == "." {
                    in_data = false;
                    out.extend_from_slice(b"554 5.5.1 No valid recipients\r\n");
                }
                continue;
            }
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => {
                    out.extend_from_slice(b"250-fake.test\r\n");
                    if starttls != FakeStartTls::NotOffered {
                        out.extend_from_slice(b"250-STARTTLS\r\n");
                    }
                    out.extend_from_slice(b"250 PIPELINING\r\n");
                }
                "STARTTLS" => {
                    out.extend_from_slice(b"220 2.0.0 Go ahead\r\n");
                    if starttls == FakeStartTls::Injected {
                        out.extend_from_slice(b"250 2.0.0 injected\r\n");
                    }
                    let _ = stream.get_mut().write_all(&out).await;
                    if starttls == FakeStartTls::Garbage {
                        // Answer the ClientHello, so the garbage cannot arrive with the 220.
                        let mut hello = [0u8; 512];
                        let _ = stream.read(&mut hello).await;
                        let _ = stream.get_mut().write_all(b"not a TLS record\r\n").await;
                    }
                    return;
                }
                "MAIL" | "RSET" => out.extend_from_slice(b"250 2.0.0 OK\r\n"),
                "RCPT" => out.extend_from_slice(b"550 5.1.1 No such user\r\n"),
                "DATA" => {
                    in_data = true;
                    out.extend_from_slice(b"354 Go ahead\r\n");
                }
                "QUIT" => {
                    let _ = stream.get_mut().write_all(b"221 Bye\r\n").await;
                    return;
                }
                _ => out.extend_from_slice(b"502 5.5.2 What?\r\n"),
            }
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }
}

/// A hostile MX: it answers like a healthy one until `flood_on` (a verb, or `.` for the end of
/// the message), then answers that with `250-` continuation lines, as fast as it can, until
/// the client hangs up.
struct FloodingMx {
    address: SocketAddr,
}

impl FloodingMx {
    async fn start(flood_on: &'static str, pipelining: bool) -> FloodingMx {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(FloodingMx::serve(stream, flood_on, pipelining));
            }
        });
        FloodingMx { address }
    }

    async fn serve(stream: TcpStream, flood_on: &'static str, pipelining: bool) {
        let mut stream = BufReader::new(stream);
        let mut out: Vec<u8> = b"220 hostile.test ESMTP\r\n".to_vec();
        let mut in_data = false;
        loop {
            if stream.get_mut().write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            let mut line = String::new();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if in_data && line != "." {
                continue;
            }
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            if verb == flood_on {
                let flood = b"250-xxxxxxxx\r\n".repeat(4096);
                while stream.get_mut().write_all(&flood).await.is_ok() {}
                return;
            }
            match verb.as_str() {
                "EHLO" if pipelining => {
                    out.extend_from_slice(b"250-hostile.test\r\n250 PIPELINING\r\n");
                }
                "EHLO" => out.extend_from_slice(b"250 hostile.test\r\n"),
                "DATA" => {
                    in_data = true;
                    out.extend_from_slice(b"354 Go ahead\r\n");
                }
                "." => {
                    in_data = false;
                    out.extend_from_slice(b"250 2.0.0 Queued\r\n");
                }
                _ => out.extend_from_slice(b"250 2.0.0 OK\r\n"),
            }
        }
    }
}

/// Raw SMTP over TCP, for driving the sink byte by byte.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(address: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(address).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn reply(&mut self) -> Reply {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf, MAX_REPLY_LINE).unwrap() {
                self.buf.drain(..used);
                return reply;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
                .await
                .expect("reply timed out")
                .unwrap();
            assert!(n > 0, "EOF");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[tokio::test]
async fn evict_oldest_closes_the_longest_idle_session_of_any_destination() {
    let sink = Sink::bind("127.0.0.1:0".parse().unwrap(), SinkConfig::default())
        .await
        .unwrap();
    let pool: Pool = Pool::new(Duration::from_secs(60));
    let connect = || {
        SmtpClient::connect(
            "sink",
            sink.local_addr(),
            None,
            "client.test",
            Timeouts::default(),
        )
    };
    pool.checkin(&QueueKey::new("a"), connect().await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    pool.checkin(&QueueKey::new("b"), connect().await.unwrap());
    assert_eq!(pool.idle_count(), 2);
    assert!(pool.evict_oldest());
    assert_eq!(pool.idle_count(), 1);
    assert!(
        pool.checkout(&QueueKey::new("a")).is_none(),
        "the older one went"
    );
    assert!(pool.checkout(&QueueKey::new("b")).is_some());
    assert!(!pool.evict_oldest());
}

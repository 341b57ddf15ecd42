//! The driver over real loopback TCP, with a recording policy, driven with raw SMTP bytes.

// Helpers outside #[test] functions are not covered by clippy.toml's
// allow-unwrap-in-tests; a panic is the right failure in a test binary.
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use smtp_proto::server::{Event, ServerConfig, ServerSession};
use smtp_proto::{enhanced, Capabilities, Reply};
use smtp_server::{serve_connection, tls_acceptor_from_pem_files, ConnectionOptions, Policy};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

/// One message as the policy saw it at the final dot.
#[derive(Debug)]
struct Received {
    sender: String,
    recipients: Vec<String>,
    data: Vec<u8>,
}

/// Accepts everything and remembers what the driver told it.
#[derive(Debug, Default)]
struct Recorder {
    /// Advertised SIZE; 0: unlimited.
    size: u64,
    starttls: bool,
    /// `false`: the driver should hand over no message bytes.
    discard_data: bool,
    /// Hang up without a reply at the final dot.
    hang_up_at_data_end: bool,
    messages: Vec<Received>,
    tls: Option<String>,
    discarded: usize,
    /// Replies to messages the session refused by itself.
    refused: Vec<u16>,
}

impl Policy for Recorder {
    fn session_config(&self, tls_active: bool) -> ServerConfig {
        let defaults = ServerConfig::default();
        ServerConfig {
            hostname: "driver.test".to_owned(),
            capabilities: Capabilities {
                size: Some(self.size),
                starttls: self.starttls && !tls_active,
                ..defaults.capabilities
            },
            ..defaults
        }
    }

    fn keep_data(&self) -> bool {
        !self.discard_data
    }

    fn tls_established(&mut self, tls: &str) {
        self.tls = Some(tls.to_owned());
    }

    fn discarded_after_starttls(&mut self, bytes: usize) {
        self.discarded += bytes;
    }

    fn message_refused(&mut self, reply: &Reply) {
        self.refused.push(reply.code);
    }

    async fn decide(
        &mut self,
        _session: &ServerSession,
        event: &Event,
        data: &mut Vec<u8>,
    ) -> Option<Reply> {
        let reply = match event {
            Event::DataEnd {
                sender, recipients, ..
            } => {
                if self.hang_up_at_data_end {
                    return None;
                }
                self.messages.push(Received {
                    sender: sender.clone(),
                    recipients: recipients.clone(),
                    data: std::mem::take(data),
                });
                Reply::new(250, enhanced(2, 0, 0), "queued")
            }
            _ => Reply::new(250, enhanced(2, 1, 0), "OK"),
        };
        Some(reply)
    }
}

type Served = JoinHandle<(io::Result<()>, Recorder)>;

/// Accepts one connection and serves it with `policy`; the handle gives the policy back.
async fn serve_one(mut policy: Recorder, options: ConnectionOptions) -> (SocketAddr, Served) {
    let listener = smtp_server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let result = serve_connection(tcp, &options, &mut policy).await;
        (result, policy)
    });
    (addr, served)
}

async fn finished(served: Served) -> (io::Result<()>, Recorder) {
    timeout(WAIT, served)
        .await
        .expect("connection ended")
        .unwrap()
}

// The same client other crates' tests get through the `testing` feature.
#[path = "../src/testing.rs"]
#[allow(dead_code, unreachable_pub)]
mod testing;
use testing::TestClient as Client;

#[tokio::test]
async fn pipelined_commands_get_replies_in_order() {
    let (addr, served) = serve_one(Recorder::default(), ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO client.test", 250).await;
    c.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nRCPT TO:<e@d.test>\r\nDATA\r\n")
        .await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(c.reply().await.unwrap().code);
    }
    assert_eq!(codes, [250, 250, 250, 354]);
    // Message, final dot and the next transaction in a single write.
    c.send(b"one\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<f@d.test>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n")
        .await;
    let mut codes = Vec::new();
    while let Some(r) = c.reply().await {
        codes.push(r.code);
    }
    assert_eq!(codes, [250, 250, 250, 354, 250, 221]);
    let (result, policy) = finished(served).await;
    result.unwrap();
    let msgs = policy.messages;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].recipients, ["c@d.test", "e@d.test"]);
    assert_eq!(msgs[0].data, b"one\r\n");
    assert_eq!(msgs[1].sender, "");
    assert_eq!(msgs[1].data, b"two\r\n");
}

#[tokio::test]
async fn garbage_and_long_lines_are_survivable() {
    let (addr, served) = serve_one(Recorder::default(), ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    c.expect("HELLO?", 500).await;
    c.expect("MAIL FROM:<not valid>", 501).await;
    c.expect("RCPT TO:<a@b.test>", 503).await;
    // A 20 KiB line in several writes: one 500 5.5.6, then back in sync.
    for _ in 0..5 {
        c.send(&[b'A'; 4096]).await;
    }
    c.send(b"\r\n").await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.code, 500);
    assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("5.5.6"));
    c.expect("NOOP", 250).await;
    // Endless garbage gets the connection closed eventually.
    let mut closed = false;
    for _ in 0..50 {
        let r = c.cmd("garbage").await;
        if r.code == 421 {
            closed = true;
            break;
        }
    }
    assert!(closed);
    c.expect_eof().await;
    finished(served).await.0.unwrap();
}

#[tokio::test]
async fn oversized_message_is_refused() {
    let policy = Recorder {
        size: 100,
        ..Recorder::default()
    };
    let (addr, served) = serve_one(policy, ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    c.expect("MAIL FROM:<a@b.test> SIZE=1000", 552).await;
    let big = "x".repeat(70);
    let body = format!("{big}\r\n{big}\r\n");
    let r = c
        .send_message("a@b.test", "c@d.test", body.as_bytes())
        .await;
    let r = r.unwrap();
    assert_eq!(r.code, 552);
    assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("5.3.4"));
    // The connection is still usable for a message that fits.
    let r = c.send_message("a@b.test", "c@d.test", b"small\r\n").await;
    assert_eq!(r.unwrap().code, 250);
    c.expect("QUIT", 221).await;
    let (result, policy) = finished(served).await;
    result.unwrap();
    // The oversized message never reached the policy.
    let data: Vec<&[u8]> = policy.messages.iter().map(|m| &m.data[..]).collect();
    assert_eq!(data, [b"small\r\n"]);
    assert_eq!(policy.refused, [552]);
}

#[tokio::test]
async fn a_message_with_bare_line_ends_is_refused_and_forgotten() {
    let (addr, served) = serve_one(Recorder::default(), ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    // A smuggling attempt: the forged transaction after "LF . LF" stays inside the message.
    let r = c
        .send_message(
            "a@b.test",
            "c@d.test",
            b"one\n.\nMAIL FROM:<forged@b.test>\r\nRCPT TO:<victim@d.test>\r\n",
        )
        .await
        .unwrap();
    assert_eq!(r.code, 550, "{r:?}");
    assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("5.6.11"));
    let r = c.send_message("a@b.test", "c@d.test", b"two\r\n").await;
    assert_eq!(r.unwrap().code, 250);
    c.expect("QUIT", 221).await;
    let (result, policy) = finished(served).await;
    result.unwrap();
    // Nothing of the refused message reached the policy, alone or in front of the next.
    let data: Vec<&[u8]> = policy.messages.iter().map(|m| &m.data[..]).collect();
    assert_eq!(data, [b"two\r\n"]);
    assert_eq!(policy.refused, [550]);
}

#[tokio::test]
async fn a_client_trickling_a_command_times_out() {
    let options = ConnectionOptions {
        idle_timeout: Some(Duration::from_millis(300)),
        ..ConnectionOptions::default()
    };
    let (addr, served) = serve_one(Recorder::default(), options).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    // One byte every 100 ms for 3 s: each read is well within the limit, the command is not.
    let started = std::time::Instant::now();
    for &b in b"NOOP NOOP NOOP NOOP NOOP NOOP" {
        if served.is_finished() || c.stream.write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the trickle went on for {:?}",
        started.elapsed()
    );
    let (result, _) = finished(served).await;
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn commands_keep_a_connection_alive_past_the_idle_limit() {
    let options = ConnectionOptions {
        idle_timeout: Some(Duration::from_millis(300)),
        ..ConnectionOptions::default()
    };
    let (addr, served) = serve_one(Recorder::default(), options).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.expect("NOOP", 250).await;
    }
    c.expect("QUIT", 221).await;
    finished(served).await.0.unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_its_replies_is_dropped() {
    let options = ConnectionOptions {
        write_timeout: Some(Duration::from_millis(200)),
        ..ConnectionOptions::default()
    };
    let (addr, served) = serve_one(Recorder::default(), options).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (_reader, mut writer) = stream.into_split();
    // Pipelined NOOPs whose replies are never read fill both socket buffers; the server's
    // write then stalls until its limit.
    let flood = tokio::spawn(async move {
        let noops = b"NOOP\r\n".repeat(10_000);
        while writer.write_all(&noops).await.is_ok() {}
    });
    let (result, _) = timeout(Duration::from_secs(30), served)
        .await
        .expect("the server gave up on the client")
        .unwrap();
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
    flood.abort();
}

#[tokio::test]
async fn a_stalled_tls_handshake_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert_file, key_file) = certificate_files(dir.path());
    let options = ConnectionOptions {
        tls: Some(tls_acceptor_from_pem_files(&cert_file, &key_file).unwrap()),
        tls_handshake_timeout: Some(Duration::from_millis(200)),
        ..ConnectionOptions::default()
    };
    let policy = Recorder {
        starttls: true,
        ..Recorder::default()
    };
    let (addr, served) = serve_one(policy, options).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    c.expect("STARTTLS", 220).await;
    // No ClientHello ever comes.
    let (result, _) = finished(served).await;
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
    drop(c);
}

#[tokio::test]
async fn refused_connections_get_the_reply_as_banner() {
    let listener = smtp_server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let reply = Reply::new(421, enhanced(4, 7, 0), "Too many connections");
        smtp_server::refuse_connection(tcp, &ConnectionOptions::default(), &reply).await
    });
    let mut c = Client::connect_raw(addr).await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.code, 421);
    assert_eq!(r.text(), "Too many connections");
    c.expect_eof().await;
    timeout(WAIT, served).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn a_policy_that_counts_gets_no_message_bytes() {
    let policy = Recorder {
        discard_data: true,
        ..Recorder::default()
    };
    let (addr, served) = serve_one(policy, ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    let r = c.send_message("a@b.test", "c@d.test", b"hello\r\n").await;
    assert_eq!(r.unwrap().code, 250);
    c.expect("QUIT", 221).await;
    let (result, policy) = finished(served).await;
    result.unwrap();
    assert_eq!(policy.messages.len(), 1);
    assert!(policy.messages[0].data.is_empty());
}

#[tokio::test]
async fn no_reply_from_the_policy_hangs_up() {
    let policy = Recorder {
        hang_up_at_data_end: true,
        ..Recorder::default()
    };
    let (addr, served) = serve_one(policy, ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    assert_eq!(
        c.send_message("a@b.test", "c@d.test", b"hi\r\n").await,
        None
    );
    let (result, policy) = finished(served).await;
    result.unwrap();
    assert!(policy.messages.is_empty());
}

#[tokio::test]
async fn an_idle_client_is_disconnected() {
    let options = ConnectionOptions {
        tls: None,
        idle_timeout: Some(Duration::from_millis(100)),
        ..ConnectionOptions::default()
    };
    let (addr, served) = serve_one(Recorder::default(), options).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    c.expect_eof().await;
    let (result, _) = finished(served).await;
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn starttls_advertised_without_an_acceptor_is_refused() {
    let policy = Recorder {
        starttls: true,
        ..Recorder::default()
    };
    let (addr, served) = serve_one(policy, ConnectionOptions::default()).await;
    let mut c = Client::connect(addr).await;
    c.expect("EHLO x", 250).await;
    let r = c.expect("STARTTLS", 454).await;
    assert_eq!(r.enhanced.map(|e| e.to_string()).as_deref(), Some("4.7.0"));
    c.expect("NOOP", 250).await;
    c.expect("QUIT", 221).await;
    finished(served).await.0.unwrap();
}

/// A self-signed certificate for `localhost`, written as PEM files into `dir`.
fn certificate_files(dir: &Path) -> (CertificateDer<'static>, PathBuf, PathBuf) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (generated.cert.der().clone(), cert, key)
}

#[tokio::test]
async fn starttls_discards_pipelined_bytes_and_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, cert_file, key_file) = certificate_files(dir.path());
    let options = ConnectionOptions {
        tls: Some(tls_acceptor_from_pem_files(&cert_file, &key_file).unwrap()),
        ..ConnectionOptions::default()
    };
    let policy = Recorder {
        starttls: true,
        ..Recorder::default()
    };
    let (addr, served) = serve_one(policy, options).await;
    let mut c = Client::connect(addr).await;
    let caps = Capabilities::from_ehlo(&c.expect("EHLO client.test", 250).await);
    assert!(caps.starttls);
    // The NOOP arrives in plaintext with the STARTTLS: it must not run inside TLS.
    c.send(b"STARTTLS\r\nNOOP\r\n").await;
    assert_eq!(c.reply().await.unwrap().code, 220);
    assert!(
        c.buf.is_empty(),
        "answered a command pipelined after STARTTLS"
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), c.stream)
        .await
        .unwrap();
    let mut c = Client::over(tls);
    // A fresh session: the EHLO before TLS is forgotten, STARTTLS is no longer offered.
    c.expect("MAIL FROM:<a@b.test>", 503).await;
    let caps = Capabilities::from_ehlo(&c.expect("EHLO client.test", 250).await);
    assert!(!caps.starttls);
    let r = c.send_message("a@b.test", "c@d.test", b"secret\r\n").await;
    assert_eq!(r.unwrap().code, 250);
    c.expect("QUIT", 221).await;

    let (result, policy) = finished(served).await;
    result.unwrap();
    assert_eq!(policy.discarded, b"NOOP\r\n".len());
    let tls = policy.tls.unwrap();
    assert!(tls.starts_with("TLSv1.3:TLS13_"), "{tls}");
    assert_eq!(policy.messages.len(), 1);
    assert_eq!(policy.messages[0].data, b"secret\r\n");
}

/// The error loading `cert` and `key` (`TlsAcceptor` is not `Debug`, so no `unwrap_err`).
fn refused(cert: &Path, key: &Path) -> smtp_server::Error {
    match tls_acceptor_from_pem_files(cert, key) {
        Ok(_) => panic!("{} and {} were accepted", cert.display(), key.display()),
        Err(e) => e,
    }
}

#[test]
fn pem_files_that_cannot_serve_are_reported_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert_file, key_file) = certificate_files(dir.path());
    let missing = dir.path().join("missing.pem");
    let err = refused(&missing, &key_file);
    assert!(matches!(&err, smtp_server::Error::Pem { path, .. } if *path == missing));
    let err = refused(&cert_file, &missing);
    assert!(matches!(&err, smtp_server::Error::Pem { path, .. } if *path == missing));
    // A key where the certificate should be: the file parses, but holds no certificate.
    let err = refused(&key_file, &key_file);
    assert!(
        matches!(&err, smtp_server::Error::NoCertificate { path } if *path == key_file),
        "{err:?}"
    );
    assert!(err.to_string().contains("no certificate"), "{err}");
    assert!(tls_acceptor_from_pem_files(&cert_file, &key_file).is_ok());
}

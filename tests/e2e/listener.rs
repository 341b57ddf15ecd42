//! The SMTP injection listener: mail submitted over SMTP is queued, recorded and delivered
//! like mail from the inject API, and refused when it must be.

use crate::harness::*;
use connection_pool::{ConnectOptions, Envelope, SmtpClient, TlsFailureMemory, TlsMode};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MESSAGE: &str = "From: News <news@example.com>\r\nTo: list@example.test\r\nSubject: over SMTP\r\nX-Campaign: smtp-camp\r\nX-Tenant: smtp-tenant\r\n\r\nHello from SMTP.\r\n.. a stuffed line\r\n";

/// A self-signed certificate for `localhost` written as PEM files in a fresh temp dir:
/// (the dir, the certificate, its file, its key's file).
fn test_certificate() -> (
    tempfile::TempDir,
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (dir, generated, cert, key)
}

fn smtp_addr(engine: &TestEngine) -> SocketAddr {
    engine.running.as_ref().unwrap().smtp_addr.unwrap()
}

fn client_options(addr: SocketAddr, tls: TlsMode) -> ConnectOptions {
    ConnectOptions {
        tls,
        tls_failures: TlsFailureMemory::default(),
        ..ConnectOptions::new("localhost", addr, "client.test")
    }
}

/// A line-level SMTP client for what the real client will not send.
struct Raw {
    reader: BufReader<TcpStream>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream),
        };
        let (code, _) = raw.reply().await;
        assert_eq!(code, 220);
        raw
    }

    /// One (possibly multi-line) reply: the code and every line's text, joined by `\n`.
    async fn reply(&mut self) -> (u16, String) {
        let mut text = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            assert!(n > 0, "connection closed while waiting for a reply");
            let code: u16 = line[..3].parse().unwrap();
            text.push(line[4..].trim_end().to_owned());
            if line.as_bytes()[3] == b' ' {
                return (code, text.join("\n"));
            }
        }
    }

    async fn send(&mut self, data: &str) {
        self.reader
            .get_mut()
            .write_all(data.as_bytes())
            .await
            .unwrap();
    }

    async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

fn receptions(engine: &TestEngine) -> Vec<Value> {
    records(&engine.accounting_path())
        .into_iter()
        .filter(|r| r["type"] == "Reception")
        .collect()
}

/// Ids from `250 2.0.0 Ok: queued as ID [ID...]`.
fn queued_ids(text: &str) -> Vec<String> {
    let (_, ids) = text.split_once("queued as ").expect("queued as");
    ids.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_queues_one_message_per_recipient_and_delivers_them() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["example.test"], sink.local_addr())).await;
    let mut client =
        SmtpClient::connect_with(client_options(smtp_addr(&engine), TlsMode::Disabled))
            .await
            .unwrap();
    let caps = client.capabilities().clone();
    assert!(caps.pipelining && caps.eight_bit_mime && caps.smtputf8);
    assert!(caps.enhanced_status_codes);
    assert_eq!(caps.size, Some(50 * 1024 * 1024));
    assert!(!caps.starttls, "no certificate configured");
    assert!(caps.auth.is_empty(), "no users configured");
    let recipients = ["a@example.test", "b@EXAMPLE.test", "c@example.test"];
    let result = client
        .send(
            &Envelope {
                sender: "bounces@news.example.com".into(),
                recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
                ..Default::default()
            },
            MESSAGE.as_bytes(),
        )
        .await
        .unwrap();
    let reply = result.data.expect("a reply to the final dot");
    assert_eq!(reply.code, 250, "{reply:?}");
    assert_eq!(
        reply.enhanced.map(|e| e.to_string()).as_deref(),
        Some("2.0.0")
    );
    let ids = queued_ids(&reply.text());
    assert_eq!(ids.len(), 3, "{reply:?}");
    client.quit().await;

    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 3
    })
    .await;
    assert_eq!(count_type(&recs, "Reception"), 3);
    let mut reception_ids: Vec<String> = receptions(&engine)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let mut reply_ids = ids.clone();
    reception_ids.sort();
    reply_ids.sort();
    assert_eq!(reception_ids, reply_ids);
    for r in receptions(&engine) {
        assert_eq!(r["sender"], "bounces@news.example.com");
        assert_eq!(r["domain"], "example.test");
        assert_eq!(r["campaign"], "smtp-camp");
        assert_eq!(r["tenant"], "smtp-tenant");
        assert_eq!(r["headers"]["X-Campaign"], "smtp-camp");
    }
    assert!(receptions(&engine)
        .iter()
        .any(|r| r["recipient"] == "b@example.test"));

    let delivered = sink.messages();
    assert_eq!(delivered.len(), 3);
    for m in &delivered {
        let data = String::from_utf8(m.data.clone()).unwrap();
        assert!(
            data.starts_with(
                "Received: from client.test (localhost [127.0.0.1])\r\n\tby drover.test (Drover) with ESMTP id "
            ),
            "{data}"
        );
        // The trace header: three lines, the id and the recipient in it.
        let mut lines = data.splitn(4, "\r\n");
        let received: Vec<&str> = lines.by_ref().take(3).collect();
        let rest = lines.next().unwrap();
        let id = received[1].rsplit(' ').next().unwrap();
        assert!(ids.iter().any(|i| i == id), "{received:?}");
        assert!(
            received[2].starts_with("\tfor <") && received[2].contains(">; "),
            "{received:?}"
        );
        // Message-ID and Date were missing: added at the end of the header section. The
        // client dot-stuffed ".." on the wire; the listener unstuffed it again.
        let (head, body) = MESSAGE.split_once("\r\n\r\n").unwrap();
        let (got_head, got_body) = rest.split_once("\r\n\r\n").unwrap();
        assert_eq!(got_body, body);
        let (kept, added) = got_head.split_at(head.len());
        assert_eq!(kept, head);
        assert!(
            added.starts_with(&format!(
                "\r\nMessage-ID: <{id}@news.example.com>\r\nDate: "
            )),
            "{added}"
        );
    }

    let metrics = engine.metrics().await;
    let smtp_count: f64 = metrics
        .lines()
        .find(|l| l.starts_with("drover_messages_received_total{via=\"smtp\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(smtp_count >= 3.0, "{metrics}");
    engine.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_answers_pipelined_commands_in_order() {
    let engine = TestEngine::start(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let mut raw = Raw::connect(smtp_addr(&engine)).await;
    let (code, ehlo) = raw.cmd("EHLO pipe.test").await;
    assert_eq!(code, 250);
    assert!(ehlo.starts_with("drover.test greets pipe.test"), "{ehlo}");
    assert!(ehlo.contains("PIPELINING"), "{ehlo}");
    // Everything up to DATA in one write, as RFC 2920 allows.
    raw.send(
        "MAIL FROM:<s@example.com>\r\nRCPT TO:<one@example.test>\r\nRCPT TO:<bad address>\r\nRCPT TO:<two@example.test>\r\nDATA\r\n",
    )
    .await;
    let codes: Vec<u16> = [
        raw.reply().await,
        raw.reply().await,
        raw.reply().await,
        raw.reply().await,
        raw.reply().await,
    ]
    .iter()
    .map(|(c, _)| *c)
    .collect();
    assert_eq!(codes[0], 250);
    assert_eq!(codes[1], 250);
    assert!(matches!(codes[2], 501 | 553), "{codes:?}");
    assert_eq!(&codes[3..], &[250, 354]);
    // The message and the next transaction's commands, again in one write.
    raw.send("Subject: p\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\n")
        .await;
    let (code, text) = raw.reply().await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(queued_ids(&text).len(), 2);
    assert_eq!(raw.reply().await.0, 250);
    assert_eq!(raw.reply().await.0, 250);
    assert_eq!(raw.cmd("QUIT").await.0, 221);
    wait_records(&engine.accounting_path(), Duration::from_secs(5), |r| {
        count_type(r, "Reception") == 2
    })
    .await;
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_refuses_relaying_for_clients_outside_relay_networks() {
    let engine = TestEngine::start(
        "[smtp_listener]\nrelay_networks = [\"10.0.0.0/8\"]\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n",
    )
    .await;
    let mut raw = Raw::connect(smtp_addr(&engine)).await;
    assert_eq!(raw.cmd("EHLO outside.test").await.0, 250);
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    let (code, text) = raw.cmd("RCPT TO:<victim@example.test>").await;
    assert_eq!(code, 550);
    assert!(text.starts_with("5.7.1 Relaying denied"), "{text}");
    assert_eq!(raw.cmd("DATA").await.0, 554);
    assert_eq!(raw.cmd("QUIT").await.0, 221);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(records(&engine.accounting_path()).is_empty());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_refuses_oversized_messages_and_bad_addresses() {
    let engine = TestEngine::start(
        "[smtp_listener]\nmax_message_size = 1000\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n",
    )
    .await;
    let mut raw = Raw::connect(smtp_addr(&engine)).await;
    let (_, ehlo) = raw.cmd("EHLO big.test").await;
    assert!(ehlo.contains("SIZE 1000"), "{ehlo}");
    // Declared too large: refused at MAIL.
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com> SIZE=5000").await.0, 552);
    // Undeclared: refused after the final dot, and the session carries on.
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<r@example.test>").await.0, 250);
    assert_eq!(raw.cmd("DATA").await.0, 354);
    let big = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(2000));
    raw.send(&big).await;
    let (code, text) = raw.reply().await;
    assert_eq!(code, 552, "{text}");
    assert!(text.starts_with("5.3.4"), "{text}");

    // Bad addresses: a syntax error or an invalid mailbox, never a queued message.
    for line in [
        "MAIL FROM:<not an address>",
        "MAIL FROM:<no-domain>",
        "MAIL FROM:<a@b@c.test>",
    ] {
        let (code, text) = raw.cmd(line).await;
        assert!(matches!(code, 501 | 553), "{line}: {code} {text}");
    }
    assert_eq!(
        raw.cmd("MAIL FROM:<>").await.0,
        250,
        "the null sender is fine"
    );
    for line in [
        "RCPT TO:<no-domain>",
        "RCPT TO:<a\u{7f}b@example.test>",
        "RCPT TO:<>",
        "RCPT TO:<x@-bad-.test>",
    ] {
        let (code, text) = raw.cmd(line).await;
        assert!(matches!(code, 501 | 553), "{line}: {code} {text}");
    }
    assert_eq!(raw.cmd("DATA").await.0, 554);
    assert_eq!(raw.cmd("QUIT").await.0, 221);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(records(&engine.accounting_path()).is_empty());
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_offers_starttls_with_the_configured_certificate() {
    let sink = capturing_sink().await;
    let (_dir, generated, cert, key) = test_certificate();
    let engine = TestEngine::start(&format!(
        "[smtp_listener]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\n{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(generated.cert.der().clone()).unwrap();
    let mut client = SmtpClient::connect_with(ConnectOptions {
        tls_roots: Some(Arc::new(roots)),
        ..client_options(smtp_addr(&engine), TlsMode::Required)
    })
    .await
    .unwrap();
    let tls = client.tls().expect("TLS negotiated");
    assert!(tls.verified);
    assert!(
        !client.capabilities().starttls,
        "not offered again inside TLS"
    );
    let result = client
        .send(
            &Envelope {
                sender: "s@example.com".into(),
                recipients: vec!["tls@example.test".into()],
                ..Default::default()
            },
            b"Subject: secret\r\n\r\nover TLS\r\n",
        )
        .await
        .unwrap();
    assert_eq!(
        result.data.as_ref().map(|r| r.code),
        Some(250),
        "{result:?}"
    );
    client.quit().await;
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let data = String::from_utf8(sink.messages()[0].data.clone()).unwrap();
    assert!(
        data.contains("by drover.test (Drover) with ESMTPS id "),
        "{data}"
    );

    // A plaintext client sees STARTTLS advertised, and no AUTH without users.
    let mut raw = Raw::connect(smtp_addr(&engine)).await;
    let (_, ehlo) = raw.cmd("EHLO plain.test").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    engine.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_auth_lets_a_client_outside_relay_networks_relay() {
    let engine = TestEngine::start(
        "[smtp_listener]\nrelay_networks = [\"10.0.0.0/8\"]\nauth_users = [{ user = \"app\", password = \"s3cret\" }]\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let addr = smtp_addr(&engine);
    let mut raw = Raw::connect(addr).await;
    let (_, ehlo) = raw.cmd("EHLO app.test").await;
    // Loopback: AUTH is offered without TLS.
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    // "\0app\0wrong"
    let (code, text) = raw.cmd("AUTH PLAIN AGFwcAB3cm9uZw==").await;
    assert_eq!(code, 535, "{text}");
    assert!(text.starts_with("5.7.8"), "{text}");
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<r@example.test>").await.0, 550);
    assert_eq!(raw.cmd("RSET").await.0, 250);
    // "\0app\0s3cret"
    let (code, text) = raw.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=").await;
    assert_eq!(code, 235, "{text}");
    assert_eq!(raw.cmd("AUTH PLAIN AGFwcABzM2NyZXQ=").await.0, 503);
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<r@example.test>").await.0, 250);
    assert_eq!(raw.cmd("DATA").await.0, 354);
    raw.send("Subject: authed\r\n\r\nhi\r\n.\r\n").await;
    let (code, text) = raw.reply().await;
    assert_eq!(code, 250, "{text}");
    let ids = queued_ids(&text);
    assert_eq!(raw.cmd("QUIT").await.0, 221);

    // AUTH LOGIN, step by step, on a second connection.
    let mut raw = Raw::connect(addr).await;
    assert_eq!(raw.cmd("EHLO app.test").await.0, 250);
    assert_eq!(
        raw.cmd("AUTH LOGIN").await,
        (334, "VXNlcm5hbWU6".to_owned())
    );
    assert_eq!(raw.cmd("YXBw").await, (334, "UGFzc3dvcmQ6".to_owned()));
    assert_eq!(raw.cmd("czNjcmV0").await.0, 235);
    assert_eq!(raw.cmd("QUIT").await.0, 221);

    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(5), |r| {
        count_type(r, "Reception") == 1
    })
    .await;
    assert_eq!(recs[0]["id"].as_str(), ids.first().map(String::as_str));
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_works_with_swaks() {
    if !std::path::Path::new("/usr/bin/swaks").exists() {
        eprintln!("swaks is not installed; skipping");
        return;
    }
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "[smtp_listener]\nrelay_networks = [\"10.0.0.0/8\"]\nauth_users = [{{ user = \"app\", password = \"s3cret\" }}]\n{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let addr = smtp_addr(&engine);
    let server = addr.to_string();
    let mut swaks = std::process::Command::new("/usr/bin/swaks");
    swaks.args([
        "--server",
        &server,
        "--from",
        "s@example.com",
        "--to",
        "one@example.test,two@example.test",
        "--helo",
        "swaks.test",
        "--auth",
        "LOGIN",
        "--auth-user",
        "app",
        "--auth-password",
        "s3cret",
        "--pipeline",
        "--header",
        "X-Campaign: swaks",
    ]);
    // swaks blocks; the engine's tasks must keep running meanwhile.
    let output = tokio::task::spawn_blocking(move || swaks.output())
        .await
        .unwrap()
        .unwrap();
    let transcript = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{transcript}");
    assert!(
        transcript.contains("<-  250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 2
    })
    .await;
    assert!(recs
        .iter()
        .filter(|r| r["type"] == "Reception")
        .all(|r| r["campaign"] == "swaks"));
    let data = String::from_utf8(sink.messages()[0].data.clone()).unwrap();
    assert!(
        data.contains("from swaks.test (localhost [127.0.0.1])"),
        "{data}"
    );
    assert!(data.contains("with ESMTPA id "), "{data}");
    engine.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_answers_421_while_draining_and_stops_accepting() {
    // A sink that never answers EHLO keeps a delivery worker busy, so the engine drains for
    // the whole grace period while the SMTP connection below is still open.
    let sink = start_sink(sink::SinkConfig {
        stall_after_messages: Some(0),
        ..sink::SinkConfig::default()
    })
    .await;
    let mut engine = TestEngine::start(&routes(&["example.test"], sink.local_addr())).await;
    let (status, _) = engine
        .inject(&message_for(&["busy@example.test".into()]))
        .await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sink.stats().connections == 0 {
        assert!(std::time::Instant::now() < deadline, "no delivery attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = smtp_addr(&engine);
    let mut raw = Raw::connect(addr).await;
    assert_eq!(raw.cmd("EHLO late.test").await.0, 250);
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<late@example.test>").await.0, 250);
    assert_eq!(raw.cmd("DATA").await.0, 354);
    raw.send("Subject: late\r\n\r\ntoo late\r\n").await;

    let running = engine.running.take().unwrap();
    let core = std::sync::Arc::clone(&running.engine);
    let stopping = tokio::spawn(running.shutdown(Duration::from_secs(2)));
    while !core.is_draining() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    raw.send(".\r\n").await;
    let (code, text) = raw.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("4.3.2"), "{text}");
    let mut rest = String::new();
    let n = raw.reader.read_line(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0, "the connection closes after 421: {rest}");
    // No longer accepting connections.
    assert!(TcpStream::connect(addr).await.is_err());
    stopping.await.unwrap();
    let recs = records(&engine.accounting_path());
    assert_eq!(count_type(&recs, "Reception"), 1, "only the HTTP message");
    sink.shutdown().await;
}

/// A raw client connected from `local` (any 127.0.0.0/8 address is this machine's), with
/// the first reply: the banner or a refusal.
async fn connect_from(addr: SocketAddr, local: &str) -> (Raw, (u16, String)) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut raw = Raw {
        reader: BufReader::new(stream),
    };
    let first = raw.reply().await;
    (raw, first)
}

impl Raw {
    /// Whether the server closed the connection (EOF within 5 s).
    async fn closed(&mut self) -> bool {
        let mut rest = String::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut rest)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Runs swaks with `args` against `server` to completion, without blocking the engine.
async fn swaks(server: SocketAddr, args: &[&str]) -> (bool, String) {
    let mut command = std::process::Command::new("/usr/bin/swaks");
    command
        .args(["--server", &server.to_string()])
        .args(args)
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), transcript)
}

fn have_swaks() -> bool {
    let found = std::path::Path::new("/usr/bin/swaks").exists();
    if !found {
        eprintln!("swaks is not installed; skipping");
    }
    found
}

/// `drover hash-password`, fed `input` on stdin.
fn hash_password_cli(input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_auth_with_a_hashed_password_over_starttls_and_a_failure_limit() {
    if !have_swaks() {
        return;
    }
    let out = hash_password_cli("correct horse\n");
    assert_success(&out);
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!hash_password_cli("\n").status.success(), "empty password");

    let sink = capturing_sink().await;
    let (_dir, _generated, cert, key) = test_certificate();
    let engine = TestEngine::start(&format!(
        "[smtp_listener]\nrelay_networks = [\"10.0.0.0/8\"]\ntls_cert_file = {cert:?}\ntls_key_file = {key:?}\nmax_auth_failures = 2\nauth_users = [{{ user = \"app\", password_hash = {hash:?} }}]\n{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let addr = smtp_addr(&engine);
    let session = |password: &'static str| {
        [
            "--tls",
            "--from",
            "s@example.com",
            "--to",
            "hashed@example.test",
            "--helo",
            "swaks.test",
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            password,
        ]
    };
    let (ok, transcript) = swaks(addr, &session("correct horse")).await;
    assert!(ok, "{transcript}");
    assert!(transcript.contains("<~  235 2.7.0"), "{transcript}");
    assert!(
        transcript.contains("<~  250 2.0.0 Ok: queued as "),
        "{transcript}"
    );
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let data = String::from_utf8(sink.messages()[0].data.clone()).unwrap();
    assert!(data.contains("with ESMTPSA id "), "{data}");

    // Two wrong passwords: 535 each; the limit is then reached for this address, and even
    // the right password gets 421 and a closed connection.
    for _ in 0..2 {
        let (ok, transcript) = swaks(addr, &session("battery staple")).await;
        assert!(!ok, "{transcript}");
        assert!(transcript.contains("<~* 535 5.7.8"), "{transcript}");
    }
    let (ok, transcript) = swaks(addr, &session("correct horse")).await;
    assert!(!ok, "{transcript}");
    assert!(transcript.contains("<~* 421 4.7.0"), "{transcript}");
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "drover_smtp_listener_rejections_total{reason=\"auth_failures\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(receptions(&engine).len(), 1);
    engine.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_denies_relaying_to_a_client_outside_relay_networks() {
    if !have_swaks() {
        return;
    }
    let engine = TestEngine::start(
        "[smtp_listener]\nrelay_networks = [\"127.0.0.1/32\"]\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let addr = smtp_addr(&engine);
    let args = |local: &'static str| {
        [
            "--local-interface",
            local,
            "--from",
            "s@example.com",
            "--to",
            "victim@example.test",
            "--helo",
            "outside.test",
        ]
    };
    let (ok, transcript) = swaks(addr, &args("127.0.0.5")).await;
    assert!(!ok, "{transcript}");
    assert!(
        transcript.contains("<** 550 5.7.1 Relaying denied"),
        "{transcript}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(records(&engine.accounting_path()).is_empty());
    // The same session from the relay network is taken.
    let (ok, transcript) = swaks(addr, &args("127.0.0.1")).await;
    assert!(ok, "{transcript}");
    wait_records(&engine.accounting_path(), Duration::from_secs(5), |r| {
        count_type(r, "Reception") == 1
    })
    .await;
    engine.stop().await;
}

/// A message with a bare LF, and behind a bare `LF . LF` a second transaction that a
/// receiver taking that for the end of data would run (SMTP smuggling).
const SMUGGLING: &str = "From: a@example.com\r\nSubject: bare\r\n\r\nline one\nline two\n.\nMAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nFrom: admin@example.com\r\n\r\nforged\r\n.\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_refuses_bare_newlines_in_data() {
    let engine = TestEngine::start(
        "[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n[retry]\nintervals = [\"1h\"]\n",
    )
    .await;
    let addr = smtp_addr(&engine);
    let mut raw = Raw::connect(addr).await;
    assert_eq!(raw.cmd("EHLO bare.test").await.0, 250);
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<r@example.test>").await.0, 250);
    assert_eq!(raw.cmd("DATA").await.0, 354);
    raw.send(SMUGGLING).await;
    // One reply for the whole thing: the smuggled commands were message content.
    let (code, text) = raw.reply().await;
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.6.11"), "{text}");
    assert_eq!(
        raw.cmd("NOOP").await.0,
        250,
        "in step: nothing was smuggled"
    );
    assert_eq!(raw.cmd("QUIT").await.0, 221);

    if have_swaks() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("bare.eml");
        std::fs::write(&data, "Subject: swaks\r\n\r\nbare\nLF\r\n.\r\n").unwrap();
        let (ok, transcript) = swaks(
            addr,
            &[
                "--from",
                "s@example.com",
                "--to",
                "r@example.test",
                "--no-data-fixup",
                "--data",
                data.to_str().unwrap(),
            ],
        )
        .await;
        assert!(!ok, "{transcript}");
        assert!(transcript.contains("<** 550 5.6.11"), "{transcript}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        records(&engine.accounting_path()).is_empty(),
        "nothing queued"
    );
    let metrics = engine.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "drover_smtp_listener_rejections_total{reason=\"bare_newline\"}"
        ) >= 1.0,
        "{metrics}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_normalizes_bare_newlines_when_told() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&format!(
        "[smtp_listener]\nbare_newlines = \"normalize\"\n{}",
        routes(&["example.test"], sink.local_addr())
    ))
    .await;
    let mut raw = Raw::connect(smtp_addr(&engine)).await;
    assert_eq!(raw.cmd("EHLO bare.test").await.0, 250);
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<r@example.test>").await.0, 250);
    assert_eq!(raw.cmd("DATA").await.0, 354);
    raw.send(SMUGGLING).await;
    let (code, text) = raw.reply().await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(queued_ids(&text).len(), 1, "one message, not two");
    assert_eq!(raw.cmd("QUIT").await.0, 221);
    wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let data = String::from_utf8(sink.messages()[0].data.clone()).unwrap();
    let (_, body) = data.split_once("\r\n\r\n").unwrap();
    // CRLF everywhere; the lone dot was content, and the forged commands with it.
    assert_eq!(
        body,
        "line one\r\nline two\r\n.\r\nMAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nFrom: admin@example.com\r\n\r\nforged\r\n"
    );
    assert_eq!(sink.messages()[0].recipients, ["r@example.test"]);
    engine.stop().await;
    sink.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_caps_connections_in_total_and_per_address() {
    let engine = TestEngine::start(
        "[smtp_listener]\nmax_connections = 3\nmax_connections_per_ip = 2\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n",
    )
    .await;
    let addr = smtp_addr(&engine);
    let (_a1, (code, _)) = connect_from(addr, "127.0.0.1").await;
    assert_eq!(code, 220);
    let (mut a2, (code, _)) = connect_from(addr, "127.0.0.1").await;
    assert_eq!(code, 220);
    // A third from the same address: refused in the banner, and closed.
    let (mut a3, (code, text)) = connect_from(addr, "127.0.0.1").await;
    assert_eq!(code, 421, "{text}");
    assert!(
        text.starts_with("4.7.0 drover.test Too many connections from your address"),
        "{text}"
    );
    assert!(a3.closed().await);
    // Another address still gets in, up to the total.
    let (_b1, (code, _)) = connect_from(addr, "127.0.0.5").await;
    assert_eq!(code, 220);
    let (mut c1, (code, text)) = connect_from(addr, "127.0.0.6").await;
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("4.7.0"), "{text}");
    assert!(c1.closed().await);
    // A connection that ends frees its place at once.
    assert_eq!(a2.cmd("QUIT").await.0, 221);
    let (mut a4, (code, text)) = connect_from(addr, "127.0.0.1").await;
    assert_eq!(code, 220, "{text}");
    assert_eq!(a4.cmd("EHLO again.test").await.0, 250);
    let metrics = engine.metrics().await;
    for (reason, n) in [("max_connections_per_ip", 1.0), ("max_connections", 1.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!("drover_smtp_listener_rejections_total{{reason=\"{reason}\"}}")
            ),
            n,
            "{metrics}"
        );
    }
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_recipients_and_idle_time_from_config() {
    let engine = TestEngine::start(
        "[smtp_listener]\nmax_recipients = 2\nidle_timeout = \"1s\"\n[[route]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:9\"]\n",
    )
    .await;
    let mut raw = Raw::connect(smtp_addr(&engine)).await;
    assert_eq!(raw.cmd("EHLO many.test").await.0, 250);
    assert_eq!(raw.cmd("MAIL FROM:<s@example.com>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<one@example.test>").await.0, 250);
    assert_eq!(raw.cmd("RCPT TO:<two@example.test>").await.0, 250);
    let (code, text) = raw.cmd("RCPT TO:<three@example.test>").await;
    assert_eq!(code, 452, "{text}");
    assert!(text.starts_with("4.5.3"), "{text}");
    // Then silence: the connection is closed after the idle limit.
    let started = std::time::Instant::now();
    assert!(raw.closed().await);
    assert!(started.elapsed() >= Duration::from_millis(900));
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unicode_recipient_domain_goes_on_as_a_labels() {
    let sink = capturing_sink().await;
    let engine = TestEngine::start(&routes(&["xn--bcher-kva.test"], sink.local_addr())).await;
    let data = b"From: s@example.com\r\nSubject: idn\r\n\r\nhello\r\n";
    let result = smtp_transaction(
        &engine,
        "client.test",
        "s@example.com",
        &["ann@bücher.test"],
        data,
    )
    .await;
    assert!(
        result.rcpts.iter().all(|r| r.code == 250)
            && result.data.as_ref().is_some_and(|d| d.code == 250),
        "{result:?}"
    );
    let recs = wait_records(&engine.accounting_path(), Duration::from_secs(10), |r| {
        count_type(r, "Delivery") == 1
    })
    .await;
    let delivery = recs.iter().find(|r| r["type"] == "Delivery").unwrap();
    assert_eq!(delivery["recipient"], "ann@xn--bcher-kva.test");
    assert_eq!(
        sink.messages()[0].recipients,
        vec!["ann@xn--bcher-kva.test".to_owned()]
    );
    engine.stop().await;
}

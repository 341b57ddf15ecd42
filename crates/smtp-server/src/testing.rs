//! A raw SMTP client for tests of servers built on this crate (feature `testing`): it sends
//! exactly the bytes a test gives and reads replies as they come, so tests can pipeline,
//! misbehave and check every reply.

// A panic is the right failure in a test helper.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use smtp_proto::{parse_reply, Reply, MAX_REPLY_LINE};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long a test waits for a reply before it fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// A client over any stream (TCP, or TLS after STARTTLS).
#[derive(Debug)]
pub struct TestClient<S> {
    /// The connection.
    pub stream: S,
    /// Bytes read and not yet taken as replies.
    pub buf: Vec<u8>,
}

impl TestClient<TcpStream> {
    /// Connects and checks the 220 banner.
    pub async fn connect(addr: SocketAddr) -> TestClient<TcpStream> {
        let mut c = TestClient::connect_raw(addr).await;
        let banner = c.reply().await.expect("banner");
        assert_eq!(banner.code, 220, "{banner:?}");
        c
    }

    /// Connects without reading anything.
    pub async fn connect_raw(addr: SocketAddr) -> TestClient<TcpStream> {
        TestClient::over(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TestClient<S> {
    /// A client over an open stream (e.g. after a TLS handshake).
    pub fn over(stream: S) -> TestClient<S> {
        TestClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next reply, or None at EOF.
    pub async fn reply(&mut self) -> Option<Reply> {
        loop {
            if let Some((reply, used)) = parse_reply(&self.buf, MAX_REPLY_LINE).unwrap() {
                self.buf.drain(..used);
                return Some(reply);
            }
            let mut chunk = [0u8; 4096];
            let n = timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("reply timed out")
                .unwrap_or(0);
            if n == 0 {
                assert!(self.buf.is_empty(), "EOF inside a reply");
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends one command line and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await.expect("reply")
    }

    /// Sends one command line and checks its reply code.
    pub async fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line).await;
        assert_eq!(r.code, code, "{line}: {r:?}");
        r
    }

    /// MAIL, RCPT, DATA, body; returns the reply to the final dot.
    pub async fn send_message(&mut self, from: &str, to: &str, body: &[u8]) -> Option<Reply> {
        self.expect(&format!("MAIL FROM:<{from}>"), 250).await;
        self.expect(&format!("RCPT TO:<{to}>"), 250).await;
        self.expect("DATA", 354).await;
        self.send(body).await;
        self.send(b".\r\n").await;
        self.reply().await
    }

    /// Checks that the server closed the connection.
    pub async fn expect_eof(&mut self) {
        assert_eq!(self.reply().await, None);
    }
}

//! One outbound SMTP session.

use smtp_proto::{
    parse_reply, Capabilities, Command, DotStuffer, ProtoError, Reply, MAX_REPLY_LINE,
};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// RFC 5321 §4.5.3.2 timeouts, per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// The 220 greeting (RFC: 5 min).
    pub banner: Duration,
    /// EHLO/HELO reply.
    pub ehlo: Duration,
    /// MAIL FROM reply (RFC: 5 min).
    pub mail: Duration,
    /// RCPT TO reply (RFC: 5 min).
    pub rcpt: Duration,
    /// DATA's 354 (RFC: 2 min).
    pub data: Duration,
    /// Each write of the message body (RFC: 3 min).
    pub data_block: Duration,
    /// The reply to the final dot (RFC: 10 min).
    pub final_dot: Duration,
    /// RSET, QUIT and NOOP replies.
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        Timeouts {
            connect: Duration::from_secs(30),
            banner: m(5),
            ehlo: m(5),
            mail: m(5),
            rcpt: m(5),
            data: m(2),
            data_block: m(3),
            final_dot: m(10),
            other: m(2),
        }
    }
}

/// The host a session talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// MX host name.
    pub host: String,
    /// Address connected to.
    pub address: SocketAddr,
    /// Local address the session was bound to (the egress source).
    pub local: Option<SocketAddr>,
}

/// Errors of a session. Any of them leaves the session unusable.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("connect to {address} failed: {source}")]
    Connect {
        /// Where we tried to connect.
        address: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The peer did not answer in time.
    #[error("timed out after {duration:?} waiting for the reply to {command}")]
    Timeout {
        /// The command (or "banner", "connect", "message body") that was waiting.
        command: &'static str,
        /// The timeout that expired.
        duration: Duration,
    },
    /// Reading or writing failed, or the peer closed the connection.
    #[error("connection lost during {command}: {source}")]
    Io {
        /// What we were doing.
        command: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The peer broke the protocol.
    #[error("protocol error during {command}: {source}")]
    Protocol {
        /// What we were doing.
        command: &'static str,
        /// What was wrong.
        source: ProtoError,
    },
    /// The greeting or EHLO/HELO was refused; the host will not take mail from us now.
    #[error("{command} refused: {} {}", reply.code, reply.text())]
    Refused {
        /// "banner", "EHLO" or "HELO".
        command: &'static str,
        /// The refusal.
        reply: Reply,
    },
    /// A message's envelope could not be encoded (e.g. CR/LF in an address).
    #[error("cannot encode {command}: {source}")]
    Encode {
        /// The command.
        command: &'static str,
        /// Why.
        source: ProtoError,
    },
}

impl ClientError {
    /// Whether the error happened after the final dot was sent, when the receiver may have
    /// taken the message although we never saw its answer.
    pub fn after_final_dot(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout { command: ".", .. } | ClientError::Io { command: ".", .. }
        )
    }
}

/// Envelope of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Reverse-path ("" for the null sender).
    pub sender: String,
    /// Forward-paths.
    pub recipients: Vec<String>,
}

/// Replies of one transaction, one per command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionResult {
    /// Reply to MAIL FROM.
    pub mail: Reply,
    /// Replies to each RCPT TO, in order (empty if MAIL was refused without pipelining).
    pub rcpts: Vec<Reply>,
    /// Reply to the final dot, or to DATA when DATA was refused; `None` if no recipient was
    /// accepted or MAIL failed.
    pub data: Option<Reply>,
}

impl TransactionResult {
    /// The reply that decides recipient `i`'s fate.
    pub fn outcome_for(&self, i: usize) -> &Reply {
        if !self.mail.is_positive() {
            return &self.mail;
        }
        match self.rcpts.get(i) {
            Some(r) if !r.is_positive() => r,
            _ => self.data.as_ref().unwrap_or(&self.mail),
        }
    }

    /// Whether the session must be reset before the next transaction.
    fn needs_reset(&self) -> bool {
        !self.data.as_ref().is_some_and(Reply::is_positive)
    }
}

/// One SMTP session over TCP.
pub struct SmtpClient {
    stream: TcpStream,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    capabilities: Capabilities,
    peer: PeerInfo,
    timeouts: Timeouts,
    transactions: u32,
    broken: bool,
    _gauge: ConnectionGauge,
}

impl std::fmt::Debug for SmtpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpClient")
            .field("peer", &self.peer)
            .field("transactions", &self.transactions)
            .finish_non_exhaustive()
    }
}

struct ConnectionGauge;
impl ConnectionGauge {
    fn new() -> ConnectionGauge {
        metrics::gauge!(crate::CONNECTIONS_GAUGE).increment(1.0);
        ConnectionGauge
    }
}
impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(crate::CONNECTIONS_GAUGE).decrement(1.0);
    }
}

impl SmtpClient {
    /// Connects (from `source` when given), reads the greeting and says EHLO (HELO if EHLO is
    /// refused). A 4xx/5xx greeting is [`ClientError::Refused`].
    pub async fn connect(
        host: &str,
        address: SocketAddr,
        source: Option<IpAddr>,
        ehlo_name: &str,
        timeouts: Timeouts,
    ) -> Result<SmtpClient, ClientError> {
        let connect_err = |source| ClientError::Connect { address, source };
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(connect_err)?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(connect_err)?;
        }
        let stream = timeout(timeouts.connect, socket.connect(address))
            .await
            .map_err(|_| ClientError::Timeout {
                command: "connect",
                duration: timeouts.connect,
            })?
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let mut client = SmtpClient {
            stream,
            read_buf: Vec::with_capacity(4096),
            write_buf: Vec::with_capacity(4096),
            capabilities: Capabilities::default(),
            peer: PeerInfo {
                host: host.to_owned(),
                address,
                local,
            },
            timeouts,
            transactions: 0,
            broken: false,
            _gauge: ConnectionGauge::new(),
        };
        let banner = client.read_reply("banner", timeouts.banner).await?;
        if banner.code != 220 {
            return Err(ClientError::Refused {
                command: "banner",
                reply: banner,
            });
        }
        client.hello(ehlo_name).await?;
        Ok(client)
    }

    async fn hello(&mut self, ehlo_name: &str) -> Result<(), ClientError> {
        let reply = self
            .command(
                &Command::Ehlo(ehlo_name.to_owned()),
                "EHLO",
                self.timeouts.ehlo,
            )
            .await?;
        if reply.is_positive() {
            self.capabilities = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if reply.code == 421 {
            return Err(ClientError::Refused {
                command: "EHLO",
                reply,
            });
        }
        let reply = self
            .command(
                &Command::Helo(ehlo_name.to_owned()),
                "HELO",
                self.timeouts.ehlo,
            )
            .await?;
        if reply.is_positive() {
            self.capabilities = Capabilities::default();
            Ok(())
        } else {
            Err(ClientError::Refused {
                command: "HELO",
                reply,
            })
        }
    }

    /// What the server offered in its EHLO reply.
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Who we are talking to.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Transactions attempted on this session.
    pub fn transactions(&self) -> u32 {
        self.transactions
    }

    /// Whether the session can carry another transaction (no error, no 421 seen).
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Sends one message. Replies (positive or not) come back in the result; an `Err` means
    /// the session failed and must be dropped. After a failed transaction the session is reset
    /// (RSET) so it can be reused.
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<TransactionResult, ClientError> {
        let result = self.transaction(envelope, message).await;
        match &result {
            Err(_) => self.broken = true,
            Ok(tx) => {
                self.transactions += 1;
                let replies = std::iter::once(&tx.mail)
                    .chain(tx.rcpts.iter())
                    .chain(tx.data.iter());
                if replies.clone().any(|r| r.code == 421) {
                    // 421: the server is closing the channel (RFC 5321 §3.8).
                    self.broken = true;
                } else if tx.needs_reset() {
                    let reply = self
                        .command(&Command::Rset, "RSET", self.timeouts.other)
                        .await;
                    if !reply.is_ok_and(|r| r.is_positive()) {
                        self.broken = true;
                    }
                }
            }
        }
        result
    }

    async fn transaction(
        &mut self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<TransactionResult, ClientError> {
        let mut params = Vec::new();
        if self.capabilities.size.is_some() {
            params.push(("SIZE".to_owned(), Some(message.len().to_string())));
        }
        if self.capabilities.eight_bit_mime && message.iter().any(|b| *b >= 0x80) {
            params.push(("BODY".to_owned(), Some("8BITMIME".to_owned())));
        }
        let mail = Command::MailFrom {
            address: envelope.sender.clone(),
            params,
        };
        let rcpts: Vec<Command> = envelope
            .recipients
            .iter()
            .map(|r| Command::RcptTo {
                address: r.clone(),
                params: Vec::new(),
            })
            .collect();
        if self.capabilities.pipelining {
            self.pipelined(&mail, &rcpts, message).await
        } else {
            self.lockstep(&mail, &rcpts, message).await
        }
    }

    async fn pipelined(
        &mut self,
        mail: &Command,
        rcpts: &[Command],
        message: &[u8],
    ) -> Result<TransactionResult, ClientError> {
        self.write_buf.clear();
        encode(mail, "MAIL", &mut self.write_buf)?;
        for rcpt in rcpts {
            encode(rcpt, "RCPT", &mut self.write_buf)?;
        }
        encode(&Command::Data, "DATA", &mut self.write_buf)?;
        self.flush_write_buf("MAIL", self.timeouts.mail).await?;
        let mail_reply = self.read_reply("MAIL", self.timeouts.mail).await?;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            rcpt_replies.push(self.read_reply("RCPT", self.timeouts.rcpt).await?);
        }
        let data_reply = self.read_reply("DATA", self.timeouts.data).await?;
        let accepted = mail_reply.is_positive() && rcpt_replies.iter().any(Reply::is_positive);
        let data = if data_reply.code == 354 {
            if accepted {
                Some(self.send_body(message).await?)
            } else {
                // DATA was accepted although no recipient was: end it with an empty message
                // (RFC 2920 §3.1) and ignore the reply.
                self.write_buf.clear();
                self.write_buf.extend_from_slice(b".\r\n");
                self.flush_write_buf(".", self.timeouts.final_dot).await?;
                self.read_reply(".", self.timeouts.final_dot).await?;
                None
            }
        } else if accepted {
            Some(data_reply)
        } else {
            None
        };
        Ok(TransactionResult {
            mail: mail_reply,
            rcpts: rcpt_replies,
            data,
        })
    }

    async fn lockstep(
        &mut self,
        mail: &Command,
        rcpts: &[Command],
        message: &[u8],
    ) -> Result<TransactionResult, ClientError> {
        let mail_reply = self.command(mail, "MAIL", self.timeouts.mail).await?;
        if !mail_reply.is_positive() {
            return Ok(TransactionResult {
                mail: mail_reply,
                rcpts: Vec::new(),
                data: None,
            });
        }
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for rcpt in rcpts {
            let reply = self.command(rcpt, "RCPT", self.timeouts.rcpt).await?;
            let closing = reply.code == 421;
            rcpt_replies.push(reply);
            if closing {
                break;
            }
        }
        let data = if rcpt_replies.iter().any(Reply::is_positive) {
            let reply = self
                .command(&Command::Data, "DATA", self.timeouts.data)
                .await?;
            if reply.code == 354 {
                Some(self.send_body(message).await?)
            } else {
                Some(reply)
            }
        } else {
            None
        };
        Ok(TransactionResult {
            mail: mail_reply,
            rcpts: rcpt_replies,
            data,
        })
    }

    async fn send_body(&mut self, message: &[u8]) -> Result<Reply, ClientError> {
        self.write_buf.clear();
        let mut stuffer = DotStuffer::new();
        // Write in blocks so a slow reader is timed per block, as RFC 5321 §4.5.3.2.5 asks.
        for chunk in message.chunks(64 * 1024) {
            stuffer.stuff(chunk, &mut self.write_buf);
            if self.write_buf.len() >= 64 * 1024 {
                self.flush_write_buf("message body", self.timeouts.data_block)
                    .await?;
            }
        }
        stuffer.finish(&mut self.write_buf);
        self.flush_write_buf(".", self.timeouts.data_block).await?;
        self.read_reply(".", self.timeouts.final_dot).await
    }

    async fn command(
        &mut self,
        command: &Command,
        name: &'static str,
        wait: Duration,
    ) -> Result<Reply, ClientError> {
        self.write_buf.clear();
        encode(command, name, &mut self.write_buf)?;
        self.flush_write_buf(name, wait).await?;
        self.read_reply(name, wait).await
    }

    async fn flush_write_buf(
        &mut self,
        command: &'static str,
        wait: Duration,
    ) -> Result<(), ClientError> {
        let write = self.stream.write_all(&self.write_buf);
        match timeout(wait, write).await {
            Err(_) => Err(ClientError::Timeout {
                command,
                duration: wait,
            }),
            Ok(Err(source)) => Err(ClientError::Io { command, source }),
            Ok(Ok(())) => {
                self.write_buf.clear();
                Ok(())
            }
        }
    }

    async fn read_reply(
        &mut self,
        command: &'static str,
        wait: Duration,
    ) -> Result<Reply, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match parse_reply(&self.read_buf, MAX_REPLY_LINE) {
                Ok(Some((reply, used))) => {
                    self.read_buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => return Err(ClientError::Protocol { command, source }),
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk));
            match read.await {
                Err(_) => {
                    return Err(ClientError::Timeout {
                        command,
                        duration: wait,
                    })
                }
                Ok(Err(source)) => return Err(ClientError::Io { command, source }),
                Ok(Ok(0)) => {
                    return Err(ClientError::Io {
                        command,
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(Ok(n)) => self.read_buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Says QUIT and closes; errors are irrelevant at this point.
    pub async fn quit(mut self) {
        if !self.broken {
            let _ = self
                .command(
                    &Command::Quit,
                    "QUIT",
                    self.timeouts.other.min(Duration::from_secs(5)),
                )
                .await;
        }
        let _ = self.stream.shutdown().await;
    }
}

fn encode(command: &Command, name: &'static str, out: &mut Vec<u8>) -> Result<(), ClientError> {
    command.encode(out).map_err(|source| ClientError::Encode {
        command: name,
        source,
    })
}

//! The async SMTP server driver: the one server-side SMTP socket loop in the workspace.
//!
//! [`smtp_proto::server::ServerSession`] knows the dialogue but never touches a
//! socket; [`serve_connection`] is the socket loop around it, and a [`Policy`]
//! answers the questions the session cannot answer itself (accept this sender?
//! this recipient? this message?). Drover's SMTP injection listener and the
//! `sink` test server are both a `Policy` plus an accept loop on a socket from
//! [`bind`]; [`tls_acceptor_from_pem_files`] loads the certificate STARTTLS offers.
//!
//! What the driver guarantees, so that no policy has to get it right again:
//!
//! - One read buffer for the connection's whole life. It never holds more than
//!   a command line plus one read, because message bytes are consumed as they
//!   arrive and over-long command lines are discarded up to their line end
//!   (answered with the session's `500 5.5.2`).
//! - Pipelined commands are answered in order, and every reply produced from
//!   the bytes already buffered goes out in one write.
//! - Message bytes are unstuffed into a buffer that is handed to
//!   [`Policy::decide`] at the final dot, and never grows beyond the
//!   advertised SIZE.
//! - STARTTLS (when [`ConnectionOptions::tls`] is set) upgrades the socket with
//!   rustls. Bytes the client pipelined after STARTTLS are discarded, never
//!   executed: they arrived in plaintext and must not pass for commands sent
//!   over TLS (RFC 3207 §6). After the handshake the dialogue restarts with a
//!   fresh session built from [`Policy::session_config`] with `tls_active`
//!   set, so nothing learned before TLS survives and STARTTLS is no longer
//!   offered.
//! - Every wait on the client is bounded when [`ConnectionOptions`] says so:
//!   a command line must be complete within `idle_timeout` of the previous
//!   one (inside DATA, each read within `idle_timeout`), the TLS handshake
//!   within `tls_handshake_timeout`, and each write of replies within
//!   `write_timeout`.
//! - A message refused without a policy decision (over SIZE; bare CR or LF,
//!   see [`smtp_proto::server::BareNewlines`]) never reaches the policy, alone
//!   or in front of the next message.
//!
//! ```no_run
//! use smtp_server::{serve_connection, ConnectionOptions, Policy};
//! use smtp_proto::server::{Event, ServerConfig, ServerSession};
//! use smtp_proto::Reply;
//!
//! struct AcceptAll;
//!
//! impl Policy for AcceptAll {
//!     fn session_config(&self, _tls_active: bool) -> ServerConfig {
//!         ServerConfig::default()
//!     }
//!
//!     async fn decide(
//!         &mut self,
//!         _session: &ServerSession,
//!         _event: &Event,
//!         data: &mut Vec<u8>,
//!     ) -> Option<Reply> {
//!         data.clear();
//!         Some(Reply::new(250, None, "OK"))
//!     }
//! }
//!
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let (tcp, _peer) = listener.accept().await?;
//! serve_connection(tcp, &ConnectionOptions::default(), &mut AcceptAll).await
//! # }
//! ```

use std::future::Future;
use std::io;
use std::time::Duration;

use smtp_proto::server::{Action, Event, ServerConfig, ServerSession};
use smtp_proto::{enhanced, take_line, Reply, MAX_COMMAND_LINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

#[cfg(feature = "testing")]
pub mod testing;
mod tls;

pub use tls::{describe_tls, tls_acceptor, tls_acceptor_from_pem_files, Error, TlsAcceptor};

/// How much the read buffer grows by for each read.
const READ_CHUNK: usize = 16 * 1024;

/// What a server decides; the driver does the rest.
///
/// Implementations may write `async fn decide` (and `async fn before_reply`);
/// the returned futures must be `Send` so connections can be spawned.
pub trait Policy: Send {
    /// The session settings: host name, advertised extensions (SIZE is also
    /// the limit the driver enforces), AUTH. Called once for the plaintext
    /// session and again with `tls_active` after a STARTTLS handshake.
    fn session_config(&self, tls_active: bool) -> ServerConfig;

    /// Answers one policy question. `data` holds the unstuffed message at
    /// [`Event::DataEnd`] (empty unless [`Policy::keep_data`]); the policy may
    /// take it, and the driver clears whatever is left afterwards.
    ///
    /// `None` drops the connection without a reply.
    fn decide(
        &mut self,
        session: &ServerSession,
        event: &Event,
        data: &mut Vec<u8>,
    ) -> impl Future<Output = Option<Reply>> + Send;

    /// Whether message bytes are collected for [`Policy::decide`]; a policy
    /// that only counts messages saves the copy.
    fn keep_data(&self) -> bool {
        true
    }

    /// Runs before each reply is queued (not before the banner): the sink's
    /// artificial latency.
    fn before_reply(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// While true, the connection stays open but every byte read is ignored
    /// and nothing is answered: the sink's stalled server.
    fn is_stalled(&self) -> bool {
        false
    }

    /// The STARTTLS handshake succeeded; `tls` is `protocol:cipher`, e.g.
    /// `TLSv1.3:TLS13_AES_256_GCM_SHA384`.
    fn tls_established(&mut self, tls: &str) {
        let _ = tls;
    }

    /// The client pipelined `bytes` bytes after STARTTLS; they were discarded.
    fn discarded_after_starttls(&mut self, bytes: usize) {
        let _ = bytes;
    }

    /// The session refused a message at its final dot without asking
    /// [`Policy::decide`] (over SIZE: `552 5.3.4`; bare CR or LF: `550 5.6.11`);
    /// `reply` is what the client gets. For counting.
    fn message_refused(&mut self, reply: &Reply) {
        let _ = reply;
    }

    /// The server is about to send its last reply and close: called before the client can
    /// see the close, so a count of open connections drops before the client can open its
    /// next one.
    fn closing(&mut self) {}
}

/// Transport settings of [`serve_connection`].
#[derive(Clone, Default)]
pub struct ConnectionOptions {
    /// Offer STARTTLS with this acceptor. The policy must also advertise it
    /// (`capabilities.starttls` while not `tls_active`); if it does without an
    /// acceptor here, STARTTLS is answered `454 4.7.0`.
    pub tls: Option<TlsAcceptor>,
    /// Close the connection when the client sends nothing for this long
    /// (RFC 5321 §4.5.3.2 suggests 5 minutes); `None`: wait forever.
    pub idle_timeout: Option<Duration>,
    /// Give up on a STARTTLS handshake that has not completed within this
    /// long; `None`: wait forever.
    pub tls_handshake_timeout: Option<Duration>,
    /// Close the connection when one write of replies (the banner included)
    /// has not completed within this long: a client that never reads its
    /// replies fills the socket buffer and would otherwise hold the task
    /// forever. `None`: wait forever.
    pub write_timeout: Option<Duration>,
}

impl std::fmt::Debug for ConnectionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionOptions")
            .field("tls", &self.tls.is_some())
            .field("idle_timeout", &self.idle_timeout)
            .field("tls_handshake_timeout", &self.tls_handshake_timeout)
            .field("write_timeout", &self.write_timeout)
            .finish()
    }
}

/// Runs `io` within `limit` (if any); past it, a [`io::ErrorKind::TimedOut`] error naming
/// `what`.
async fn within<T>(
    limit: Option<Duration>,
    what: &'static str,
    io: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, io)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, what))),
        None => io.await,
    }
}

/// Writes `bytes` and flushes them within [`ConnectionOptions::write_timeout`].
async fn write_within<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    options: &ConnectionOptions,
) -> io::Result<()> {
    within(options.write_timeout, "client not reading replies", async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
}

/// Answers a connection the server will not serve (too many connections, say) with `reply`
/// as its banner, and closes it. RFC 5321 §3.1 lets a server refuse a session this way,
/// with a `554` or, for a temporary reason, a `421`. The write is bounded by
/// [`ConnectionOptions::write_timeout`]; what the client sends is never read.
pub async fn refuse_connection(
    mut tcp: TcpStream,
    options: &ConnectionOptions,
    reply: &Reply,
) -> io::Result<()> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    write_within(&mut tcp, &out, options).await?;
    let _ = within(options.write_timeout, "closing", tcp.shutdown()).await;
    Ok(())
}

/// What the connection loop does after handling one action.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Continue,
    /// Flush the pending replies, then close.
    Close,
    /// Flush the pending replies, then do the TLS handshake.
    StartTls,
}

/// The connection, before (`Left`) or after (`Right`) STARTTLS.
type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The per-connection state the loop threads through policy calls.
struct Driver<'a, P: Policy> {
    policy: &'a mut P,
    tls_available: bool,
    tls_active: bool,
    /// Replies not yet written.
    out: Vec<u8>,
    /// Unstuffed bytes of the message being received.
    data: Vec<u8>,
}

impl<P: Policy> Driver<'_, P> {
    async fn push(&mut self, reply: &Reply) {
        self.policy.before_reply().await;
        reply.encode(&mut self.out);
    }

    async fn apply(&mut self, session: &mut ServerSession, mut action: Action) -> Next {
        loop {
            match action {
                Action::Reply(r) => {
                    self.push(&r).await;
                    return Next::Continue;
                }
                Action::StartData(r) => {
                    // Whatever a message refused without a policy decision (too large,
                    // bare line ends) left behind must not become part of this one.
                    self.data.clear();
                    self.push(&r).await;
                    return Next::Continue;
                }
                Action::StartTls(r) if self.tls_available && !self.tls_active => {
                    self.push(&r).await;
                    return Next::StartTls;
                }
                // Only reachable if the session offered STARTTLS we cannot do.
                Action::StartTls(_) => {
                    let reply = Reply::new(454, enhanced(4, 7, 0), "TLS not available");
                    self.push(&reply).await;
                    return Next::Continue;
                }
                Action::Close(r) => {
                    self.push(&r).await;
                    return Next::Close;
                }
                Action::Decide(decision) => {
                    let is_data_end = matches!(decision.event(), Event::DataEnd { .. });
                    let reply = self
                        .policy
                        .decide(session, decision.event(), &mut self.data)
                        .await;
                    if is_data_end {
                        self.data.clear();
                    }
                    match reply {
                        Some(reply) => action = session.decide(decision, reply),
                        None => return Next::Close,
                    }
                }
            }
        }
    }
}

/// Reads more bytes into `buf`; past `deadline`, a [`io::ErrorKind::TimedOut`] error.
async fn read_more(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    deadline: Option<tokio::time::Instant>,
) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let read = stream.read(&mut buf[start..]);
    let n = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
            Ok(n) => n,
            Err(_) => {
                buf.truncate(start);
                return Err(io::Error::new(io::ErrorKind::TimedOut, "client idle"));
            }
        },
        None => read.await,
    };
    match n {
        Ok(n) => {
            buf.truncate(start + n);
            Ok(n)
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

/// Serves one SMTP connection until the client quits, the policy hangs up,
/// the session closes or the socket fails; see the [module documentation](self).
///
/// Sends the banner first, so a policy that wants to delay it sleeps before
/// calling this. Returns `Ok` when the dialogue ended normally (QUIT, a
/// `421`, the client closing) and the I/O error otherwise, including a failed
/// TLS handshake and [`io::ErrorKind::TimedOut`] after
/// [`ConnectionOptions::idle_timeout`], [`ConnectionOptions::tls_handshake_timeout`] or
/// [`ConnectionOptions::write_timeout`].
pub async fn serve_connection<P: Policy>(
    tcp: TcpStream,
    options: &ConnectionOptions,
    policy: &mut P,
) -> io::Result<()> {
    let mut stream = Either::Left(tcp);
    let mut session = ServerSession::new(policy.session_config(false));
    let mut driver = Driver {
        policy,
        tls_available: options.tls.is_some(),
        tls_active: false,
        out: Vec::new(),
        data: Vec::new(),
    };
    session.greeting().encode(&mut driver.out);
    write_within(&mut stream, &driver.out, options).await?;
    driver.out.clear();

    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut discarding = false;
    // When the command being waited for must have arrived.
    let mut command_deadline = None;
    loop {
        let mut pos = 0;
        let mut next = Next::Continue;
        // A whole command line (or message bytes) arrived, which restarts the idle clock;
        // bytes of a line that never ends do not.
        let mut progressed = command_deadline.is_none();
        while next == Next::Continue && !driver.policy.is_stalled() {
            if session.is_receiving_data() {
                if pos == buf.len() {
                    break;
                }
                let (used, action) = session.handle_data(&buf[pos..], &mut driver.data);
                pos += used;
                progressed = true;
                let limit = session.config().capabilities.size.filter(|&n| n > 0);
                if !driver.policy.keep_data()
                    || limit.is_some_and(|limit| driver.data.len() as u64 > limit)
                {
                    // The session counts the size itself; the bytes are only
                    // needed by the policy, and never beyond the limit.
                    driver.data.clear();
                }
                match action {
                    Some(action) => {
                        if let Some(reply) = action.reply() {
                            driver.policy.message_refused(reply);
                        }
                        next = driver.apply(&mut session, action).await;
                    }
                    None => break,
                }
            } else if discarding {
                match buf[pos..].iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        pos += i + 1;
                        discarding = false;
                        progressed = true;
                    }
                    None => {
                        pos = buf.len();
                        break;
                    }
                }
            } else {
                let action = match take_line(&buf[pos..], MAX_COMMAND_LINE) {
                    Ok(Some((line, used))) => {
                        let action = session.handle_line(line);
                        pos += used;
                        progressed = true;
                        action
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // Drop the rest of the over-long line as it arrives.
                        discarding = true;
                        pos = buf.len();
                        session.line_too_long()
                    }
                };
                next = driver.apply(&mut session, action).await;
            }
        }
        buf.drain(..pos);
        if driver.policy.is_stalled() {
            buf.clear();
        }
        if next == Next::Close {
            driver.policy.closing();
        }
        if !driver.out.is_empty() {
            write_within(&mut stream, &driver.out, options).await?;
            driver.out.clear();
        }
        match next {
            Next::Continue => {}
            Next::Close => {
                let _ = within(options.write_timeout, "closing", stream.shutdown()).await;
                return Ok(());
            }
            Next::StartTls => {
                if !buf.is_empty() {
                    // Sent before the handshake, so not protected by it: executing
                    // them would let a man in the middle inject commands.
                    tracing::debug!(
                        bytes = buf.len(),
                        "discarding bytes pipelined after STARTTLS"
                    );
                    driver.policy.discarded_after_starttls(buf.len());
                    buf.clear();
                }
                let (Either::Left(tcp), Some(acceptor)) = (stream, &options.tls) else {
                    return Err(io::Error::other("STARTTLS inside TLS"));
                };
                let tls_stream = within(
                    options.tls_handshake_timeout,
                    "TLS handshake",
                    acceptor.accept(tcp),
                )
                .await?;
                let (_, connection) = tls_stream.get_ref();
                driver.policy.tls_established(&describe_tls(connection));
                driver.tls_active = true;
                stream = Either::Right(Box::new(tls_stream));
                // A fresh session forgets everything said before TLS, as
                // ServerSession::tls_established does, and also stops
                // advertising STARTTLS, which tls_established cannot.
                session = ServerSession::new(driver.policy.session_config(true));
                let _ = session.greeting();
                discarding = false;
            }
        }
        // The idle limit runs from the last complete command, so a client trickling one
        // byte at a time cannot stretch a command line forever; inside DATA it runs from
        // the last read, as a large message may take long. A stalled server keeps the
        // socket but must not time out the client on its own, so the limit applies only
        // while answering.
        if progressed || session.is_receiving_data() {
            command_deadline = options
                .idle_timeout
                .map(|idle| tokio::time::Instant::now() + idle);
        }
        let deadline = if driver.policy.is_stalled() {
            None
        } else {
            command_deadline
        };
        if read_more(&mut stream, &mut buf, deadline).await? == 0 {
            return Ok(());
        }
    }
}

/// Connections waiting to be accepted that a listener bound by [`bind`] asks the kernel to
/// hold (capped by `net.core.somaxconn`).
pub const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a listening socket with a deep accept queue. tokio's `TcpListener::bind` asks for
/// 1 024: a burst of more connections than that (a sending MTA opening a session per
/// destination at once) overflows the queue, and the kernel then completes the extra
/// handshakes only after SYN-ACK retransmissions seconds apart, while the clients, already
/// connected from their side, wait for a banner (measured: 20 s banner timeouts when 1 000
/// destinations came due at once).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted server must not wait for the old connections' TIME_WAIT to end.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

//! A programmable SMTP sink for tests, benchmarks and operators.
//!
//! The sink accepts SMTP on a TCP listener and answers according to a
//! [`SinkConfig`]: it can greylist, tempfail or reject recipients, slow down,
//! stall, drop connections after the final dot or hang up after a number of
//! messages. It counts what happened in [`SinkStats`] and can keep the
//! received messages in memory for assertions.
//!
//! The dialogue itself (sequencing, EHLO, error replies) comes from
//! [`smtp_proto::server::ServerSession`]; the socket loop around it is
//! [`smtp_server::serve_connection`], which Drover's SMTP injection listener
//! uses too, and the sink only adds the scripted [`smtp_server::Policy`]. Each
//! connection keeps one read buffer for its whole life and answers every
//! pipelined command already in that buffer before flushing, so replies come
//! back in order and in as few writes as the client's pipelining allows.
//!
//! With [`SinkConfig::tls`] set, EHLO advertises STARTTLS and the connection
//! is upgraded with rustls (ring provider). Whatever the client pipelined
//! after STARTTLS is discarded, never executed: those bytes arrived in
//! plaintext and must not pass for commands sent over TLS.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use smtp_proto::server::{BareNewlines, Event, ServerConfig, ServerSession};
use smtp_proto::{enhanced, Capabilities, Reply};
use smtp_server::{serve_connection, ConnectionOptions, Policy, TlsAcceptor};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Greylist entries kept before old ones are pruned, so a long benchmark with
/// many distinct pairs cannot grow the table without bound.
const GREYLIST_PRUNE_AT: usize = 100_000;

/// What the sink does; every knob defaults to "behave like a healthy MX".
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Name in the banner and the EHLO reply.
    pub hostname: String,
    /// Greylisting: the first attempt per (client IP, sender, recipient) gets
    /// `450 4.2.0`, as do retries before this delay has passed; later
    /// attempts are accepted. Shared across connections.
    pub greylist: Option<Duration>,
    /// Percentage of RCPTs answered `451 4.3.0 Temporary failure`, at random.
    pub tempfail_percent: u8,
    /// Percentage of recipient addresses answered `550 5.1.1 No such user`.
    /// Chosen by a stable hash of the address, so a rejected address stays
    /// rejected across attempts and connections.
    pub reject_percent: u8,
    /// After N accepted messages on one connection, answer every further
    /// MAIL with CODE TEXT; a `421` also closes the connection.
    pub reply_after_messages: Option<(u32, u16, String)>,
    /// Sleep before each reply to a command.
    pub latency: Duration,
    /// Advertise PIPELINING. Pipelined commands are handled correctly
    /// either way.
    pub pipelining: bool,
    /// After N accepted messages on a connection, stop answering: keep the
    /// socket open, read and ignore everything.
    pub stall_after_messages: Option<u32>,
    /// Percentage of messages after whose final dot the connection is closed
    /// without a reply.
    pub drop_after_data_percent: u8,
    /// Delay before the 220 banner.
    pub banner_delay: Duration,
    /// Advertised SIZE; larger messages get `552 5.3.4`. 0 means no limit.
    pub max_message_size: u64,
    /// Keep received messages in memory, for [`SinkHandle::messages`].
    pub capture: bool,
    /// Advertise SMTPUTF8 (default true); off, it behaves like a server without it.
    pub smtputf8: bool,
    /// Advertise 8BITMIME (default true).
    pub eight_bit_mime: bool,
    /// Offer STARTTLS with this certificate; `None`: plaintext only.
    pub tls: Option<SinkTls>,
}

/// A TLS server side: a certificate and key, ready for handshakes (the sink's
/// and, through [`SinkTls::acceptor`], any [`smtp_server::serve_connection`]'s).
#[derive(Clone)]
pub struct SinkTls {
    acceptor: TlsAcceptor,
    certificate: Option<CertificateDer<'static>>,
}

impl std::fmt::Debug for SinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkTls")
            .field("self_signed", &self.certificate.is_some())
            .finish_non_exhaustive()
    }
}

impl SinkTls {
    /// A fresh self-signed certificate for `names` (DNS names or IP literals),
    /// which clients that verify certificates must reject unless they trust
    /// [`SinkTls::certificate`].
    pub fn self_signed(names: &[&str]) -> Result<SinkTls, SinkError> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let generated =
            rcgen::generate_simple_self_signed(names).map_err(|e| SinkError::Tls(e.to_string()))?;
        let cert = generated.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let acceptor = smtp_server::tls_acceptor(vec![cert.clone()], key)
            .map_err(|e| SinkError::Tls(e.to_string()))?;
        Ok(SinkTls {
            acceptor,
            certificate: Some(cert),
        })
    }

    /// Any rustls server configuration (e.g. a real certificate chain).
    pub fn from_config(config: Arc<rustls::ServerConfig>) -> SinkTls {
        SinkTls {
            acceptor: TlsAcceptor::from(config),
            certificate: None,
        }
    }

    /// The self-signed certificate, for clients that should trust it.
    pub fn certificate(&self) -> Option<&CertificateDer<'static>> {
        self.certificate.as_ref()
    }

    /// The acceptor, for [`smtp_server::ConnectionOptions::tls`].
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            hostname: "sink.drover.test".to_string(),
            greylist: None,
            tempfail_percent: 0,
            reject_percent: 0,
            reply_after_messages: None,
            latency: Duration::ZERO,
            pipelining: true,
            stall_after_messages: None,
            drop_after_data_percent: 0,
            banner_delay: Duration::ZERO,
            max_message_size: 50 * 1024 * 1024,
            capture: false,
            smtputf8: true,
            eight_bit_mime: true,
            tls: None,
        }
    }
}

/// Counters for everything the sink did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SinkStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections currently open.
    pub active_connections: u64,
    /// Highest number of simultaneously open connections.
    pub max_concurrent_connections: u64,
    /// Messages accepted (250 after the final dot).
    pub transactions: u64,
    /// Recipients accepted.
    pub recipients: u64,
    /// RCPTs answered 451 by `tempfail_percent`.
    pub rcpt_tempfailed: u64,
    /// RCPTs answered 550 by `reject_percent`.
    pub rcpt_rejected: u64,
    /// RCPTs answered 450 by greylisting.
    pub greylisted: u64,
    /// Connections closed after the final dot by `drop_after_data_percent`.
    pub dropped: u64,
    /// Successful STARTTLS handshakes.
    pub tls_handshakes: u64,
    /// Bytes a client pipelined after STARTTLS, discarded unread.
    pub discarded_after_starttls: u64,
}

/// One message the sink accepted, kept when [`SinkConfig::capture`] is set.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// The client's address.
    pub peer: SocketAddr,
    /// The sink's address the client connected to.
    pub local: SocketAddr,
    /// The EHLO/HELO name.
    pub helo: String,
    /// MAIL FROM address (`""` for the null sender).
    pub sender: String,
    /// Accepted RCPT TO addresses.
    pub recipients: Vec<String>,
    /// The message as received, dot-unstuffed, CRLF line ends.
    pub data: Vec<u8>,
    /// `protocol:cipher` (e.g. `TLSv1.3:TLS13_AES_256_GCM_SHA384`) when the
    /// message came over TLS.
    pub tls: Option<String>,
    /// The MAIL FROM parameters (keywords upper-cased), e.g. `ENVID`, `RET`, `SIZE`.
    pub mail_params: Vec<(String, Option<String>)>,
    /// The parameters of each accepted RCPT TO, in the order of `recipients` (e.g. `ORCPT`).
    pub rcpt_params: Vec<Vec<(String, Option<String>)>>,
}

/// Errors from starting the sink.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The listener could not be bound.
    #[error("cannot bind SMTP sink to {addr}: {source}")]
    Bind {
        /// The requested address.
        addr: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// Another socket error while starting up.
    #[error("SMTP sink I/O error: {0}")]
    Io(#[from] io::Error),
    /// The TLS certificate or configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    active_connections: AtomicU64,
    max_concurrent_connections: AtomicU64,
    transactions: AtomicU64,
    recipients: AtomicU64,
    rcpt_tempfailed: AtomicU64,
    rcpt_rejected: AtomicU64,
    greylisted: AtomicU64,
    dropped: AtomicU64,
    tls_handshakes: AtomicU64,
    discarded_after_starttls: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> SinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkStats {
            connections: get(&self.connections),
            active_connections: get(&self.active_connections),
            max_concurrent_connections: get(&self.max_concurrent_connections),
            transactions: get(&self.transactions),
            recipients: get(&self.recipients),
            rcpt_tempfailed: get(&self.rcpt_tempfailed),
            rcpt_rejected: get(&self.rcpt_rejected),
            greylisted: get(&self.greylisted),
            dropped: get(&self.dropped),
            tls_handshakes: get(&self.tls_handshakes),
            discarded_after_starttls: get(&self.discarded_after_starttls),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    config: SinkConfig,
    counters: Counters,
    /// First attempt per (client IP, sender, recipient), addresses lower-cased: the classic
    /// greylisting triplet, so a retry from another address starts over.
    greylist: Mutex<HashMap<(IpAddr, String, String), Instant>>,
    messages: Mutex<Vec<ReceivedMessage>>,
}

/// Decrements the active-connection gauge once: when the sink is about to close the
/// connection itself (before the client can see the close, so a client that opens its next
/// connection right after is never counted twice), or however the task ends otherwise,
/// including when it is aborted at shutdown.
struct ActiveGuard(Arc<Shared>, std::sync::atomic::AtomicBool);

impl ActiveGuard {
    fn new(shared: Arc<Shared>) -> ActiveGuard {
        let c = &shared.counters;
        bump(&c.connections);
        let now = c.active_connections.fetch_add(1, Ordering::Relaxed) + 1;
        c.max_concurrent_connections
            .fetch_max(now, Ordering::Relaxed);
        ActiveGuard(shared, std::sync::atomic::AtomicBool::new(false))
    }

    fn release(&self) {
        if !self.1.swap(true, Ordering::SeqCst) {
            self.0
                .counters
                .active_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// Entry point: binds a sink.
#[derive(Debug)]
pub struct Sink;

impl Sink {
    /// Binds `addr` (use port 0 for an ephemeral port) and spawns the accept
    /// loop on the current tokio runtime.
    pub async fn bind(addr: SocketAddr, config: SinkConfig) -> Result<SinkHandle, SinkError> {
        let listener =
            smtp_server::bind(addr).map_err(|source| SinkError::Bind { addr, source })?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            counters: Counters::default(),
            greylist: Mutex::new(HashMap::new()),
            messages: Mutex::new(Vec::new()),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown_rx));
        Ok(SinkHandle {
            local_addr,
            shared,
            shutdown_tx,
            task,
        })
    }
}

/// A running sink. Dropping it without [`SinkHandle::shutdown`] also stops
/// accepting and closes the connections, just without waiting.
#[derive(Debug)]
pub struct SinkHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<()>,
    task: JoinHandle<()>,
}

impl SinkHandle {
    /// The address the sink listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The configuration the sink runs with.
    pub fn config(&self) -> &SinkConfig {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SinkStats {
        self.shared.counters.snapshot()
    }

    /// The messages received so far; empty unless [`SinkConfig::capture`].
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.shared.messages).clone()
    }

    /// Stops accepting, closes every connection and returns the final stats.
    pub async fn shutdown(self) -> SinkStats {
        let _ = self.shutdown_tx.send(());
        drop(self.shutdown_tx);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "sink accept loop ended abnormally");
        }
        self.shared.counters.snapshot()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking connection task must not take the whole sink down with it;
    // the protected maps stay consistent after any single insert.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // Fires on an explicit shutdown and when the handle is dropped.
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let guard = Arc::new(ActiveGuard::new(Arc::clone(&shared)));
                    connections.spawn(async move {
                        let shared = Arc::clone(&guard.0);
                        if let Err(e) = serve(stream, peer, shared, Arc::clone(&guard)).await {
                            tracing::debug!(%peer, error = %e, "sink connection ended with error");
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    // Typically EMFILE; back off instead of spinning.
                    tracing::warn!(error = %e, "sink accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Stable FNV-1a, so `reject_percent` picks the same addresses in every run
/// and every process (std's `DefaultHasher` is not guaranteed stable).
fn stable_percentile(address: &str) -> u8 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in address.bytes().map(|b| b.to_ascii_lowercase()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % 100) as u8
}

fn roll(percent: u8) -> bool {
    percent > 0 && rand::random_range(0u8..100) < percent
}

/// The sink's scripted answers for one connection.
struct SinkPolicy {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    messages: u32,
    stalled: bool,
    /// `protocol:cipher` once STARTTLS is done.
    tls: Option<String>,
    guard: Arc<ActiveGuard>,
    /// The current transaction's MAIL and accepted RCPT parameters (when capturing).
    mail_params: Vec<(String, Option<String>)>,
    rcpt_params: Vec<Vec<(String, Option<String>)>>,
}

impl Policy for SinkPolicy {
    fn session_config(&self, tls_active: bool) -> ServerConfig {
        session_config(&self.shared.config, tls_active)
    }

    fn closing(&mut self) {
        self.guard.release();
    }

    fn keep_data(&self) -> bool {
        self.shared.config.capture
    }

    async fn before_reply(&mut self) {
        let latency = self.shared.config.latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    fn is_stalled(&self) -> bool {
        self.stalled
    }

    fn tls_established(&mut self, tls: &str) {
        self.tls = Some(tls.to_owned());
        bump(&self.shared.counters.tls_handshakes);
    }

    fn discarded_after_starttls(&mut self, bytes: usize) {
        tracing::debug!(peer = %self.peer, bytes, "discarded bytes pipelined after STARTTLS");
        self.shared
            .counters
            .discarded_after_starttls
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Applies the scripted policy; `None` means "hang up without replying".
    async fn decide(
        &mut self,
        session: &ServerSession,
        event: &Event,
        data: &mut Vec<u8>,
    ) -> Option<Reply> {
        let cfg = &self.shared.config;
        let counters = &self.shared.counters;
        let reply = match event {
            Event::MailFrom { params, .. } => {
                if cfg.capture {
                    self.mail_params = params.clone();
                    self.rcpt_params.clear();
                }
                match &cfg.reply_after_messages {
                    Some((n, code, text)) if self.messages >= *n => Reply::new(*code, None, text),
                    _ => Reply::new(250, enhanced(2, 1, 0), "Sender OK"),
                }
            }
            Event::RcptTo { address, params } => {
                let sender = session.sender().unwrap_or_default();
                if cfg.reject_percent > 0 && stable_percentile(address) < cfg.reject_percent {
                    bump(&counters.rcpt_rejected);
                    Reply::new(550, enhanced(5, 1, 1), "No such user")
                } else if self.greylisted(sender, address) {
                    bump(&counters.greylisted);
                    Reply::new(450, enhanced(4, 2, 0), "Greylisted, try again later")
                } else if roll(cfg.tempfail_percent) {
                    bump(&counters.rcpt_tempfailed);
                    Reply::new(451, enhanced(4, 3, 0), "Temporary failure")
                } else {
                    bump(&counters.recipients);
                    if cfg.capture {
                        self.rcpt_params.push(params.clone());
                    }
                    Reply::new(250, enhanced(2, 1, 5), "Recipient OK")
                }
            }
            Event::DataEnd {
                sender, recipients, ..
            } => {
                if roll(cfg.drop_after_data_percent) {
                    bump(&counters.dropped);
                    return None;
                }
                let id = counters.transactions.fetch_add(1, Ordering::Relaxed) + 1;
                self.messages += 1;
                if cfg.capture {
                    let message = ReceivedMessage {
                        peer: self.peer,
                        local: self.local,
                        helo: session.helo().unwrap_or_default().to_string(),
                        sender: sender.clone(),
                        recipients: recipients.clone(),
                        data: std::mem::take(data),
                        tls: self.tls.clone(),
                        mail_params: std::mem::take(&mut self.mail_params),
                        rcpt_params: std::mem::take(&mut self.rcpt_params),
                    };
                    lock(&self.shared.messages).push(message);
                }
                if cfg.stall_after_messages.is_some_and(|n| self.messages >= n) {
                    self.stalled = true;
                }
                Reply::new(250, enhanced(2, 0, 0), format!("Ok: queued as {id}"))
            }
            _ => Reply::new(451, enhanced(4, 3, 0), "Unexpected event"),
        };
        Some(reply)
    }
}

impl SinkPolicy {
    /// Records the attempt and says whether it must be greylisted.
    fn greylisted(&self, sender: &str, recipient: &str) -> bool {
        let Some(delay) = self.shared.config.greylist else {
            return false;
        };
        let key = (
            self.peer.ip(),
            sender.to_ascii_lowercase(),
            recipient.to_ascii_lowercase(),
        );
        let now = Instant::now();
        let mut table = lock(&self.shared.greylist);
        if table.len() >= GREYLIST_PRUNE_AT {
            let horizon = delay.saturating_mul(4).max(Duration::from_secs(4 * 3600));
            table.retain(|_, first| now.duration_since(*first) < horizon);
        }
        match table.get(&key) {
            Some(first) => now.duration_since(*first) < delay,
            None => {
                table.insert(key, now);
                true
            }
        }
    }
}

/// The dialogue's settings; `tls_active` stops STARTTLS from being offered
/// again inside TLS (RFC 3207 §4.2).
fn session_config(cfg: &SinkConfig, tls_active: bool) -> ServerConfig {
    ServerConfig {
        hostname: cfg.hostname.clone(),
        capabilities: Capabilities {
            pipelining: cfg.pipelining,
            size: Some(cfg.max_message_size),
            eight_bit_mime: cfg.eight_bit_mime,
            smtputf8: cfg.smtputf8,
            enhanced_status_codes: true,
            dsn: true,
            starttls: cfg.tls.is_some() && !tls_active,
            ..Capabilities::default()
        },
        max_recipients: 10_000,
        max_errors: 20,
        auth_requires_tls: false,
        // A test receiver records what arrived, bare line ends included.
        bare_newlines: BareNewlines::Keep,
    }
}

async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    guard: Arc<ActiveGuard>,
) -> io::Result<()> {
    let local = tcp.local_addr()?;
    let cfg = &shared.config;
    if !cfg.banner_delay.is_zero() {
        tokio::time::sleep(cfg.banner_delay).await;
    }
    let options = ConnectionOptions {
        tls: cfg.tls.as_ref().map(|t| t.acceptor.clone()),
        ..ConnectionOptions::default()
    };
    let mut policy = SinkPolicy {
        shared: Arc::clone(&shared),
        peer,
        local,
        messages: 0,
        stalled: cfg.stall_after_messages == Some(0),
        tls: None,
        guard,
        mail_params: Vec::new(),
        rcpt_params: Vec::new(),
    };
    serve_connection(tcp, &options, &mut policy).await
}

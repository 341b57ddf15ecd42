//! The SMTP injection listener (`[smtp_listener]`): mail submitted over SMTP is queued like
//! mail from the inject API.
//!
//! The socket loop is the workspace's shared server driver
//! ([`smtp_server::serve_connection`]); this module is its [`Policy`]: who may relay, which
//! addresses are acceptable, and what happens at the final dot: one queued message per
//! recipient, each with a `Received:` header naming its own id, all stored (synced) by
//! [`Engine::accept`] before the `250` goes out. A refused or failed acceptance queues nothing.
//!
//! Relaying is allowed to clients in `relay_networks` and to clients that authenticated
//! (AUTH PLAIN or LOGIN against `auth_users`, offered only over TLS or on loopback); everyone
//! else gets `550 5.7.1` at RCPT. Drover is never an open relay.
//!
//! What one client can cost is bounded: connections in total and per address (over either,
//! `421 4.7.0` as banner), failed AUTH per address (past the limit, `421 4.7.0` and the
//! connection closes), the waits of [`ConnectionOptions`], and recipients per message.
//!
//! Two header fields of the submitted message carry what the inject API takes as JSON fields
//! (a Drover extension): `X-Campaign` sets the campaign and `X-Tenant` the tenant. Both stay in
//! the message.

use crate::clock::now_ms;
use crate::config::{parse_cidr, AuthUser, BareNewlines, Config};
use crate::engine::{Engine, EngineError};
use crate::message::header_value;
use crate::message::{NewMessage, Origin};
use argon2::password_hash::{phc::PasswordHash, PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use dashmap::DashMap;
use queue::MessageId;
use smtp_proto::server::{Event, ServerConfig, ServerSession};
use smtp_proto::{enhanced, Capabilities, Reply};
use smtp_server::{serve_connection, ConnectionOptions, Policy};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// Every recipient gets its own copy of the message, all held in memory until the spool
/// has them; beyond this many bytes per transaction the client must split it.
const MAX_TRANSACTION_BYTES: u64 = 1024 * 1024 * 1024;

/// How long a failed AUTH waits before its `535`, as Postfix's `smtpd_error_sleep_time`
/// does: a guesser on one connection gets one try a second at most.
const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);

/// Most client addresses whose AUTH failures are remembered at once. Past it, failures of
/// addresses not yet tracked are not counted (each connection still has its error limit):
/// refusing everyone instead would let an attacker with many addresses lock every client out.
const MAX_TRACKED_AUTH_CLIENTS: usize = 100_000;

/// Hashes `password` with Argon2id (the argon2 crate's defaults: v19, 19 MiB, 2 passes,
/// OWASP's minimum) and a random salt, as the PHC string `password_hash` takes.
pub fn hash_password(password: &str) -> Result<String, ListenerError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| ListenerError::Password(e.to_string()))
}

/// Checks that `hash` is an Argon2 PHC string the listener can verify passwords against.
pub fn check_password_hash(hash: &str) -> Result<(), ListenerError> {
    let bad = |e: &dyn std::fmt::Display| {
        ListenerError::Password(format!(
            "not an Argon2 PHC string ({e}); make one with `drover hash-password`"
        ))
    };
    let parsed = PasswordHash::new(hash).map_err(|e| bad(&e))?;
    argon2::Algorithm::try_from(parsed.algorithm.as_str()).map_err(|e| bad(&e))?;
    argon2::Params::try_from(&parsed).map_err(|e| bad(&e))?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err(bad(&"no salt or no hash"));
    }
    Ok(())
}

/// Whether `password` matches the PHC string `hash`.
fn verify_password_hash(hash: &str, password: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// Whether the credentials are those of one of `users`. Runs Argon2 when a hash is
/// involved, so call it off the async threads.
fn check_credentials(
    users: &[AuthUser],
    authorization_id: &str,
    username: &str,
    password: &str,
) -> bool {
    if !authorization_id.is_empty() && authorization_id != username {
        return false;
    }
    // Every name is compared in full, so timing does not tell which user names exist.
    let mut found = None;
    for user in users {
        let same: bool = user.user.as_bytes().ct_eq(username.as_bytes()).into();
        if same && found.is_none() {
            found = Some(user);
        }
    }
    match found {
        Some(AuthUser {
            password: Some(clear),
            ..
        }) => clear.as_bytes().ct_eq(password.as_bytes()).into(),
        Some(AuthUser {
            password_hash: Some(hash),
            ..
        }) => verify_password_hash(hash, password),
        _ => {
            // An unknown name costs what a hashed password does, so the time of the answer
            // does not tell it from a wrong password.
            if let Some(hash) = users.iter().find_map(|u| u.password_hash.as_deref()) {
                verify_password_hash(hash, password);
            }
            false
        }
    }
}

/// Failed AUTH attempts per client address, counted in fixed windows, like Postfix's anvil
/// counts events per client.
struct AuthFailures {
    max: u32,
    window: Duration,
    /// Per address: when its window started and the failures in it.
    counts: DashMap<IpAddr, (Instant, u32)>,
    /// When expired entries are next dropped.
    next_sweep: Mutex<Instant>,
}

impl AuthFailures {
    fn new(max: u32, window: Duration) -> AuthFailures {
        AuthFailures {
            max,
            window,
            counts: DashMap::new(),
            next_sweep: Mutex::new(Instant::now() + window),
        }
    }

    /// Whether `ip` has used up its failures for the current window.
    fn blocked(&self, ip: IpAddr) -> bool {
        self.counts
            .get(&ip)
            .is_some_and(|e| e.0.elapsed() < self.window && e.1 >= self.max)
    }

    fn record(&self, ip: IpAddr) {
        self.sweep();
        if self.counts.len() >= MAX_TRACKED_AUTH_CLIENTS && !self.counts.contains_key(&ip) {
            return;
        }
        let now = Instant::now();
        let mut entry = self.counts.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Drops the addresses whose window is over, at most once a window, so memory follows
    /// the clients that failed recently.
    fn sweep(&self) {
        let now = Instant::now();
        let Ok(mut next) = self.next_sweep.try_lock() else {
            return;
        };
        if now < *next {
            return;
        }
        *next = now + self.window;
        drop(next);
        self.counts
            .retain(|_, (start, _)| now.duration_since(*start) < self.window);
    }
}

/// Open connections, in total and per client address.
struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    /// Only addresses with a connection open: an entry goes with its last connection.
    per_ip: DashMap<IpAddr, usize>,
}

/// One counted connection; dropping it (when the connection's task ends in any way) frees
/// its place.
struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    /// A place for a connection from `ip`, or which cap it is over.
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::MaxConnections);
        }
        let mut count = self.per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            drop(count);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::MaxConnectionsPerIp);
        }
        *count += 1;
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut entry) = self.limits.per_ip.entry(self.ip) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why the listener refused a connection or a request, as the `reason` label of
/// `drover_smtp_listener_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    MaxConnections,
    MaxConnectionsPerIp,
    AuthFailures,
    BareNewline,
    MessageSize,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
            Refusal::AuthFailures => "auth_failures",
            Refusal::BareNewline => "bare_newline",
            Refusal::MessageSize => "message_size",
        }
    }

    fn count(self) {
        metrics::counter!(crate::telemetry::SMTP_REJECTIONS, "reason" => self.label()).increment(1);
    }
}

/// What every connection of the listener shares.
struct Settings {
    engine: Arc<Engine>,
    relay_networks: Vec<(IpAddr, u8)>,
    auth_users: Vec<AuthUser>,
    starttls: bool,
    max_message_size: u64,
    /// `bounce_processing.domains`, lowercase: mail to them is a report, taken from anyone.
    bounce_domains: Vec<String>,
    max_report_size: u64,
    /// Reports per client address (`bounce_processing.max_reports_per_minute`).
    report_rate: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    /// `None` when `max_auth_failures` is 0.
    auth_failures: Option<AuthFailures>,
    /// Password checks running at once: one per CPU. Each Argon2 verification takes its
    /// memory cost (19 MiB with the defaults) for its duration, so a thousand clients sending
    /// AUTH at once must queue rather than claim 19 GiB.
    password_checks: Arc<tokio::sync::Semaphore>,
    connections: Arc<ConnectionLimits>,
    max_recipients: usize,
    /// `bare_newlines = "reject"`.
    reject_bare_newlines: bool,
}

impl Settings {
    fn is_report_address(&self, address: &str) -> bool {
        address.rsplit_once('@').is_some_and(|(_, d)| {
            let d = d.trim_end_matches('.');
            self.bounce_domains
                .iter()
                .any(|b| b.eq_ignore_ascii_case(d))
        })
    }
}

/// A bound, running SMTP listener.
pub struct SmtpListener {
    local_addr: SocketAddr,
    stop: CancellationToken,
    abort: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for SmtpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpListener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

/// Why the SMTP listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// Its address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Its TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// A password could not be hashed, or a password hash is unusable.
    #[error("{0}")]
    Password(String),
}

impl SmtpListener {
    /// Binds `smtp_listener.listen` and starts accepting connections.
    pub async fn start(engine: Arc<Engine>) -> Result<SmtpListener, ListenerError> {
        let config: &Config = engine.config();
        let listen = config.smtp_listener.listen;
        let tls = config
            .smtp_listener_tls()
            .map_err(|e| ListenerError::Tls(e.to_string()))?;
        let relay_networks = config
            .smtp_listener
            .relay_networks
            .iter()
            .filter_map(|n| parse_cidr(n))
            .collect();
        let l = &config.smtp_listener;
        let settings = Arc::new(Settings {
            auth_failures: (l.max_auth_failures > 0)
                .then(|| AuthFailures::new(l.max_auth_failures, l.auth_failure_window.0)),
            connections: Arc::new(ConnectionLimits {
                max_total: l.max_connections,
                max_per_ip: l.max_connections_per_ip,
                total: AtomicUsize::new(0),
                per_ip: DashMap::new(),
            }),
            password_checks: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, usize::from),
            )),
            max_recipients: l.max_recipients,
            reject_bare_newlines: l.bare_newlines == BareNewlines::Reject,
            relay_networks,
            auth_users: config.smtp_listener.auth_users.clone(),
            starttls: tls.is_some(),
            max_message_size: config.smtp_listener.max_message_size,
            bounce_domains: config
                .bounce_processing
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            max_report_size: config.bounce_processing.max_report_size,
            report_rate: std::num::NonZeroU32::new(config.bounce_processing.max_reports_per_minute)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n))),
            engine: Arc::clone(&engine),
        });
        let options = ConnectionOptions {
            tls,
            idle_timeout: Some(l.idle_timeout.0),
            tls_handshake_timeout: Some(l.tls_handshake_timeout.0),
            write_timeout: Some(l.write_timeout.0),
        };
        let bind_error = |source| ListenerError::Bind {
            addr: listen,
            source,
        };
        let listener = smtp_server::bind(listen).map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            settings,
            Arc::new(options),
            stop.clone(),
            abort.clone(),
        ));
        tracing::info!(%local_addr, "SMTP listener is accepting");
        Ok(SmtpListener {
            local_addr,
            stop,
            abort,
            task,
        })
    }

    /// Where the listener accepts connections (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting new connections; open ones carry on until [`SmtpListener::close`].
    pub fn stop_accepting(&self) {
        self.stop.cancel();
    }

    /// Stops accepting and drops every open connection. Call it once the engine is draining,
    /// so a transaction that was still running has been answered `421` already.
    pub async fn close(self) {
        self.stop.cancel();
        self.abort.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "SMTP listener ended abnormally");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<Settings>,
    options: Arc<ConnectionOptions>,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let settings = Arc::clone(&settings);
                    let options = Arc::clone(&options);
                    match settings.connections.acquire(peer.ip().to_canonical()) {
                        Ok(slot) => {
                            connections.spawn(async move {
                                let mut policy = InjectPolicy::new(settings, peer, slot);
                                if let Err(e) = serve_connection(stream, &options, &mut policy).await {
                                    tracing::debug!(%peer, error = %e, "SMTP connection ended with an error");
                                }
                            });
                        }
                        Err(refusal) => {
                            refusal.count();
                            tracing::debug!(%peer, reason = refusal.label(), "SMTP connection refused");
                            connections.spawn(async move {
                                let text = match refusal {
                                    Refusal::MaxConnectionsPerIp => "Too many connections from your address; try again later",
                                    _ => "Too many connections; try again later",
                                };
                                let reply = Reply::new(
                                    421,
                                    enhanced(4, 7, 0),
                                    format!("{} {text}", settings.engine.ehlo_name()),
                                );
                                let _ = smtp_server::refuse_connection(stream, &options, &reply).await;
                            });
                        }
                    }
                }
                Err(e) => {
                    // Typically EMFILE; back off instead of spinning.
                    tracing::warn!(error = %e, "SMTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tokio::select! {
        _ = abort.cancelled() => {}
        _ = async { while connections.join_next().await.is_some() {} } => {}
    }
    connections.shutdown().await;
}

/// The header that sets a message's priority over SMTP (removed before sending).
const PRIORITY_HEADER: &str = "X-Drover-Priority";

/// The listener's answers for one connection.
struct InjectPolicy {
    settings: Arc<Settings>,
    peer: SocketAddr,
    may_relay: bool,
    tls: bool,
    /// Whether this transaction has a report recipient (and so passed the report rate).
    report_transaction: bool,
    /// This connection's place under the connection caps; given back at close.
    slot: Option<ConnectionSlot>,
    /// The client's forward-confirmed reverse name, looked up at its first message.
    rdns: Option<Option<String>>,
}

impl InjectPolicy {
    fn new(settings: Arc<Settings>, peer: SocketAddr, slot: ConnectionSlot) -> InjectPolicy {
        let ip = peer.ip().to_canonical();
        let may_relay = settings
            .relay_networks
            .iter()
            .any(|&(net, len)| in_network(ip, net, len));
        InjectPolicy {
            settings,
            peer,
            may_relay,
            tls: false,
            report_transaction: false,
            slot: Some(slot),
            rdns: None,
        }
    }

    /// A report recipient: taken from any client, within the per-client rate.
    fn report_rcpt(&mut self) -> Reply {
        if !self.report_transaction {
            let ip = self.peer.ip().to_canonical();
            if let Some(rate) = &self.settings.report_rate {
                if rate.check_key(&ip).is_err() {
                    return Reply::new(
                        450,
                        enhanced(4, 7, 0),
                        "too many reports from your address; try again later",
                    );
                }
            }
            self.report_transaction = true;
        }
        Reply::new(250, enhanced(2, 1, 5), "Recipient OK")
    }

    /// The end of a transaction with report recipients: the report is read and recorded, and
    /// the other recipients (a relay client may mix both) are queued as usual.
    async fn receive(
        &mut self,
        session: &ServerSession,
        sender: &str,
        recipients: &[String],
        data: &mut Vec<u8>,
    ) -> Reply {
        self.report_transaction = false;
        if data.len() as u64 > self.settings.max_report_size {
            return Reply::new(552, enhanced(5, 3, 4), "report too large");
        }
        let (reports, others): (Vec<String>, Vec<String>) = recipients
            .iter()
            .cloned()
            .partition(|r| self.settings.is_report_address(r));
        let queued = if others.is_empty() {
            None
        } else {
            Some(self.queue(session, sender, &others, data).await)
        };
        let received = self
            .settings
            .engine
            .receive_report(&reports, std::mem::take(data))
            .await;
        match (received, queued) {
            (Err(e), _) => {
                tracing::error!(peer = %self.peer, error = %e, "could not record a report");
                Reply::new(
                    451,
                    enhanced(4, 3, 0),
                    "cannot take reports now; try again later",
                )
            }
            (Ok(_), Some(queued)) => queued,
            (Ok(crate::inbound::Received::AutoReply), None) => {
                Reply::new(250, enhanced(2, 0, 0), "Ok: auto-reply noted")
            }
            (Ok(crate::inbound::Received::Recorded(n)), None) => Reply::new(
                250,
                enhanced(2, 0, 0),
                format!("Ok: report received ({n} records)"),
            ),
        }
    }

    fn draining(&self) -> Option<Reply> {
        self.settings
            .engine
            .is_draining()
            .then(|| Reply::new(421, enhanced(4, 3, 2), "shutting down"))
    }

    /// Answers a completed AUTH exchange. A client address past `max_auth_failures` gets
    /// `421` without its credentials being checked; a failure gets `535` after a delay.
    async fn authenticate(
        &mut self,
        authorization_id: &str,
        username: &str,
        password: &str,
    ) -> Reply {
        let ip = self.peer.ip().to_canonical();
        let failures = self.settings.auth_failures.as_ref();
        if failures.is_some_and(|f| f.blocked(ip)) {
            Refusal::AuthFailures.count();
            tracing::info!(peer = %self.peer, user = %username, "SMTP AUTH refused: too many failures from this address");
            return Reply::new(
                421,
                enhanced(4, 7, 0),
                format!(
                    "{} Too many failed authentication attempts from your address; try again later",
                    self.settings.engine.ehlo_name()
                ),
            );
        }
        let settings = Arc::clone(&self.settings);
        let (authorization_id, name, password) = (
            authorization_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        );
        // The semaphore is never closed; without a permit the check is refused.
        let good = match Arc::clone(&self.settings.password_checks)
            .acquire_owned()
            .await
        {
            // Argon2 takes tens of milliseconds of CPU by design: not on an async thread. The
            // permit goes with the check, which runs to its end even if this connection ends.
            Ok(permit) => tokio::task::spawn_blocking(move || {
                let good =
                    check_credentials(&settings.auth_users, &authorization_id, &name, &password);
                drop(permit);
                good
            })
            .await
            .unwrap_or(false),
            Err(_) => false,
        };
        if good {
            tracing::info!(peer = %self.peer, user = %username, "SMTP client authenticated");
            return Reply::new(235, enhanced(2, 7, 0), "Authentication successful");
        }
        tracing::info!(peer = %self.peer, user = %username, "SMTP authentication failed");
        if let Some(failures) = failures {
            failures.record(ip);
        }
        tokio::time::sleep(AUTH_FAILURE_DELAY).await;
        Reply::new(535, enhanced(5, 7, 8), "Authentication credentials invalid")
    }

    async fn queue(
        &mut self,
        session: &ServerSession,
        sender: &str,
        recipients: &[String],
        data: &[u8],
    ) -> Reply {
        if let Some(reply) = self.draining() {
            return reply;
        }
        let mut unique: Vec<(String, String)> = Vec::with_capacity(recipients.len());
        for r in recipients {
            let (recipient, domain) = normalize_recipient(r);
            if !unique.iter().any(|(u, _)| *u == recipient) {
                unique.push((recipient, domain));
            }
        }
        let total = (data.len() as u64).saturating_mul(unique.len() as u64);
        if total > MAX_TRANSACTION_BYTES {
            return Reply::new(
                552,
                enhanced(5, 3, 4),
                format!(
                    "{} copies of a {}-byte message are too much for one transaction; send fewer recipients per message",
                    unique.len(),
                    data.len()
                ),
            );
        }
        // `X-Drover-Priority` is for Drover alone: read, then removed before the message is
        // stored (an unknown value is normal priority).
        let asked = header_value(data, PRIORITY_HEADER);
        let priority = asked
            .as_deref()
            .and_then(queue::Priority::parse)
            .unwrap_or_default();
        let stripped;
        let data = if asked.is_some() {
            stripped = feedback::stamp::remove(data, PRIORITY_HEADER);
            &stripped[..]
        } else {
            data
        };
        let origin = Origin {
            sender: sender.to_owned(),
            campaign: header_value(data, "X-Campaign"),
            tenant: header_value(data, "X-Tenant"),
            received_ms: now_ms(),
            priority,
            door: None,
            supplemental: None,
        };
        // A tenant's own list: its suppressed recipients are left out, and named in the reply
        // (one reply answers the whole transaction).
        let mut left_out = Vec::new();
        if origin.tenant.is_some() {
            match self
                .settings
                .engine
                .split_suppressed(origin.tenant.as_deref(), unique, |(r, _)| r.as_str())
                .await
            {
                Ok((allowed, refused)) => {
                    unique = allowed;
                    left_out = refused.into_iter().map(|((r, _), _)| r).collect();
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the suppression list");
                    return Reply::new(451, enhanced(4, 3, 0), "try again later");
                }
            }
            if !left_out.is_empty() {
                metrics::counter!(crate::telemetry::SUPPRESSED, "via" => "smtp")
                    .increment(left_out.len() as u64);
            }
            if unique.is_empty() {
                return Reply::new(550, enhanced(5, 7, 1), "Every recipient is suppressed");
            }
        }
        let protocol = match (self.tls, session.authenticated().is_some()) {
            (false, false) => "ESMTP",
            (true, false) => "ESMTPS",
            (false, true) => "ESMTPA",
            (true, true) => "ESMTPSA",
        };
        if self.rdns.is_none() {
            let resolver = &self.settings.engine.outbound.resolver;
            self.rdns = Some(resolver.reverse(self.peer.ip()).await);
        }
        let door = std::sync::Arc::new(crate::prepare::Door::Smtp {
            helo: session.helo().unwrap_or("unknown").to_owned(),
            client: self.peer.ip(),
            rdns: self.rdns.clone().flatten(),
            protocol,
        });
        let origin = Origin {
            door: Some(door),
            ..origin
        };
        let messages: Vec<NewMessage> = unique
            .into_iter()
            .map(|(recipient, domain)| {
                NewMessage::new(
                    MessageId::generate(),
                    &origin,
                    recipient,
                    domain,
                    data.to_vec(),
                )
            })
            .collect();
        let ids: Vec<String> = messages.iter().map(|m| m.meta.id.to_string()).collect();
        match self.settings.engine.accept(messages, "smtp").await {
            Ok(()) => {
                tracing::debug!(peer = %self.peer, ids = ?ids, "queued over SMTP");
                let suppressed = if left_out.is_empty() {
                    String::new()
                } else {
                    format!("; not queued (suppressed): {}", left_out.join(" "))
                };
                Reply::new(
                    250,
                    enhanced(2, 0, 0),
                    format!("Ok: queued as {}{suppressed}", ids.join(" ")),
                )
            }
            Err(EngineError::Draining) => Reply::new(421, enhanced(4, 3, 2), "shutting down"),
            // Every copy carries the same headers, so one failure stands for all; the same
            // bytes would fail again, hence permanent.
            Err(EngineError::Unsignable(u)) => {
                tracing::info!(peer = %self.peer, error = %u, "refused an unsignable message");
                Reply::new(554, enhanced(5, 6, 0), u.to_string())
            }
            Err(EngineError::Full(n)) => Reply::new(
                451,
                enhanced(4, 3, 0),
                format!("the queue is full ({n} messages); try again later"),
            ),
            Err(e) => {
                tracing::error!(error = %e, "SMTP injection failed");
                Reply::new(
                    451,
                    enhanced(4, 3, 0),
                    "the spool cannot accept messages now",
                )
            }
        }
    }
}

impl Policy for InjectPolicy {
    fn session_config(&self, tls_active: bool) -> ServerConfig {
        let auth = if self.settings.auth_users.is_empty() {
            Vec::new()
        } else {
            vec!["PLAIN".to_owned(), "LOGIN".to_owned()]
        };
        ServerConfig {
            hostname: self.settings.engine.ehlo_name().to_owned(),
            capabilities: Capabilities {
                pipelining: true,
                size: Some(self.settings.max_message_size),
                eight_bit_mime: true,
                smtputf8: true,
                enhanced_status_codes: true,
                starttls: self.settings.starttls && !tls_active,
                auth,
                ..Capabilities::default()
            },
            max_recipients: self.settings.max_recipients,
            max_errors: 20,
            // Passwords cross only encrypted connections, or never leave the machine.
            auth_requires_tls: !tls_active && !self.peer.ip().to_canonical().is_loopback(),
            // Normalised by the session; refused (or not) at the final dot in `decide`, which
            // knows the recipients.
            bare_newlines: smtp_proto::server::BareNewlines::Normalize,
        }
    }

    fn message_refused(&mut self, reply: &Reply) {
        Refusal::MessageSize.count();
        tracing::debug!(peer = %self.peer, reply = %reply.text(), "SMTP message refused");
    }

    fn closing(&mut self) {
        // Before the client sees the close, so its next connection finds the place free.
        self.slot = None;
    }

    fn tls_established(&mut self, tls: &str) {
        tracing::debug!(peer = %self.peer, tls, "SMTP client started TLS");
        self.tls = true;
    }

    async fn decide(
        &mut self,
        session: &ServerSession,
        event: &Event,
        data: &mut Vec<u8>,
    ) -> Option<Reply> {
        let reply = match event {
            Event::MailFrom { address, .. } => {
                if let Some(reply) = self.draining() {
                    return Some(reply);
                }
                self.report_transaction = false;
                if !address.is_empty() && smtp_proto::validate_mailbox(address).is_err() {
                    Reply::new(553, enhanced(5, 1, 7), "Bad sender address syntax")
                } else {
                    Reply::new(250, enhanced(2, 1, 0), "Sender OK")
                }
            }
            Event::RcptTo { address, .. } if self.settings.is_report_address(address) => {
                self.report_rcpt()
            }
            Event::RcptTo { address, .. } => {
                let ascii = crate::message::ascii_domain(address).map(|a| a.into_owned());
                match ascii {
                    Err(_) => Reply::new(553, enhanced(5, 1, 3), "Bad destination domain (IDNA)"),
                    Ok(ascii) if smtp_proto::validate_mailbox(&ascii).is_err() => Reply::new(
                        553,
                        enhanced(5, 1, 3),
                        "Bad destination mailbox address syntax",
                    ),
                    Ok(_) if !self.may_relay && session.authenticated().is_none() => {
                        Reply::new(550, enhanced(5, 7, 1), "Relaying denied")
                    }
                    // The tenant comes with the message (X-Tenant); here only the list of
                    // mail without one can be asked. `queue` checks the tenant's.
                    Ok(ascii) => match self
                        .settings
                        .engine
                        .suppressed(None, std::slice::from_ref(&ascii))
                        .await
                    {
                        Ok(found) if found.first().is_some_and(Option::is_some) => {
                            metrics::counter!(crate::telemetry::SUPPRESSED, "via" => "smtp")
                                .increment(1);
                            Reply::new(550, enhanced(5, 7, 1), "Recipient suppressed")
                        }
                        Ok(_) => Reply::new(250, enhanced(2, 1, 5), "Recipient OK"),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the suppression list");
                            Reply::new(451, enhanced(4, 3, 0), "try again later")
                        }
                    },
                }
            }
            Event::DataEnd {
                sender, recipients, ..
            } => {
                let reports = recipients
                    .iter()
                    .filter(|r| self.settings.is_report_address(r))
                    .count();
                // Bare line ends are what SMTP smuggling is made of, and a message that may be
                // relayed must not carry them on. Mail for the bounce domains alone is only
                // parsed and recorded, never relayed, and a DSN refused is a bounce lost, so it
                // is taken normalised.
                if self.settings.reject_bare_newlines
                    && session.saw_bare_newline()
                    && reports < recipients.len()
                {
                    Refusal::BareNewline.count();
                    tracing::info!(peer = %self.peer, "refused a message with bare CR or LF");
                    return Some(smtp_proto::server::BareNewlines::refusal());
                }
                if reports > 0 {
                    self.receive(session, sender, recipients, data).await
                } else {
                    self.queue(session, sender, recipients, data).await
                }
            }
            Event::Auth {
                authorization_id,
                username,
                password,
                ..
            } => {
                self.authenticate(authorization_id, username, password)
                    .await
            }
            _ => Reply::new(451, enhanced(4, 3, 0), "Unexpected event"),
        };
        Some(reply)
    }
}

/// The recipient with its domain lower-cased (the local part is the receiver's business),
/// and the domain.
fn normalize_recipient(address: &str) -> (String, String) {
    // A Unicode domain (SMTPUTF8 clients) goes on as A-labels, as over HTTP; RCPT checked it.
    let address =
        crate::message::ascii_domain(address).unwrap_or(std::borrow::Cow::Borrowed(address));
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let domain = domain.to_ascii_lowercase();
            (format!("{local}@{domain}"), domain)
        }
        None => (address.into_owned(), String::new()),
    }
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_by_prefix() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(in_network(v4, "10.0.0.0".parse().unwrap(), 8));
        assert!(!in_network(v4, "10.0.0.0".parse().unwrap(), 16));
        assert!(in_network(v4, "0.0.0.0".parse().unwrap(), 0));
        assert!(in_network(v4, "10.1.2.3".parse().unwrap(), 32));
        let v6: IpAddr = "::1".parse().unwrap();
        assert!(in_network(v6, "::1".parse().unwrap(), 128));
        assert!(!in_network(v6, "127.0.0.0".parse().unwrap(), 8));
        assert!(in_network(v6, "::".parse().unwrap(), 0));
    }

    fn user(name: &str, password: Option<&str>, hash: Option<String>) -> AuthUser {
        AuthUser {
            user: name.to_owned(),
            password: password.map(str::to_owned),
            password_hash: hash,
        }
    }

    #[test]
    fn hashed_and_clear_passwords_are_checked() {
        let hash = hash_password("hunter2").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        check_password_hash(&hash).unwrap();
        // A fresh salt each time.
        assert_ne!(hash, hash_password("hunter2").unwrap());
        let users = [
            user("clear", Some("s3cret"), None),
            user("hashed", None, Some(hash)),
        ];
        assert!(check_credentials(&users, "", "clear", "s3cret"));
        assert!(!check_credentials(&users, "", "clear", "s3cre"));
        assert!(check_credentials(&users, "", "hashed", "hunter2"));
        assert!(check_credentials(&users, "hashed", "hashed", "hunter2"));
        assert!(!check_credentials(&users, "clear", "hashed", "hunter2"));
        assert!(!check_credentials(&users, "", "hashed", "hunter3"));
        assert!(!check_credentials(&users, "", "hashed", "s3cret"));
        assert!(!check_credentials(&users, "", "clear", "hunter2"));
        assert!(!check_credentials(&users, "", "nobody", "hunter2"));
        assert!(!check_credentials(&users, "", "", ""));
    }

    #[test]
    fn unusable_password_hashes_are_named() {
        for bad in [
            "hunter2",
            "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
            "$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E",
            "$argon2id$v=19$m=19456,t=2,p=1",
            "$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
        ] {
            let err = check_password_hash(bad).unwrap_err().to_string();
            assert!(err.contains("drover hash-password"), "{bad}: {err}");
        }
    }

    #[test]
    fn auth_failures_block_an_address_for_its_window() {
        let failures = AuthFailures::new(3, Duration::from_millis(200));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            failures.record(a);
        }
        assert!(!failures.blocked(a));
        failures.record(a);
        assert!(failures.blocked(a));
        assert!(!failures.blocked(b), "counted per address");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!failures.blocked(a), "the window is over");
        // The sweep drops what expired: memory follows recent failures only.
        failures.record(b);
        assert!(!failures.counts.contains_key(&a));
        assert_eq!(failures.counts.len(), 1);
    }

    #[test]
    fn connection_caps_count_per_address_and_free_on_drop() {
        let limits = Arc::new(ConnectionLimits {
            max_total: 3,
            max_per_ip: 2,
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = limits.acquire(a).unwrap();
        let a2 = limits.acquire(a).unwrap();
        assert_eq!(limits.acquire(a).err(), Some(Refusal::MaxConnectionsPerIp));
        let b1 = limits.acquire(b).unwrap();
        assert_eq!(limits.acquire(b).err(), Some(Refusal::MaxConnections));
        drop(a1);
        let b2 = limits.acquire(b).unwrap();
        drop((a2, b1, b2));
        assert_eq!(limits.total.load(Ordering::Acquire), 0);
        assert!(
            limits.per_ip.is_empty(),
            "no entry outlives its connections"
        );
    }

    #[test]
    fn recipient_domains_are_lower_cased() {
        assert_eq!(
            normalize_recipient("Ann.X@Example.TEST"),
            ("Ann.X@example.test".to_owned(), "example.test".to_owned())
        );
    }
}

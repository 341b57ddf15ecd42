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
//! Two header fields of the submitted message carry what the inject API takes as JSON fields
//! (a Drover extension): `X-Campaign` sets the campaign and `X-Tenant` the tenant. Both stay in
//! the message.

use crate::clock::now_ms;
use crate::config::{parse_cidr, AuthUser, Config};
use crate::engine::{Engine, EngineError};
use crate::message::header_value;
use crate::message::{NewMessage, Origin};
use queue::MessageId;
use smtp_proto::server::{Event, ServerConfig, ServerSession};
use smtp_proto::{enhanced, Capabilities, Reply};
use smtp_server::{serve_connection, ConnectionOptions, Policy};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use subtle::{Choice, ConstantTimeEq};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// RFC 5321 §4.5.3.2 gives servers 5 minutes between commands.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Most recipients per transaction; more get `452 4.5.3` and can be sent in another one.
const MAX_RECIPIENTS: usize = 1000;

/// Every recipient gets its own copy of the message, all held in memory until the spool
/// has them; beyond this many bytes per transaction the client must split it.
const MAX_TRANSACTION_BYTES: u64 = 1024 * 1024 * 1024;

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
        let settings = Arc::new(Settings {
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
            idle_timeout: Some(IDLE_TIMEOUT),
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
                    connections.spawn(async move {
                        let mut policy = InjectPolicy::new(settings, peer);
                        if let Err(e) = serve_connection(stream, &options, &mut policy).await {
                            tracing::debug!(%peer, error = %e, "SMTP connection ended with an error");
                        }
                    });
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
}

impl InjectPolicy {
    fn new(settings: Arc<Settings>, peer: SocketAddr) -> InjectPolicy {
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

    fn check_credentials(&self, authorization_id: &str, username: &str, password: &str) -> bool {
        if !authorization_id.is_empty() && authorization_id != username {
            return false;
        }
        // Every entry is compared, so timing does not tell which user names exist.
        let found = self
            .settings
            .auth_users
            .iter()
            .fold(Choice::from(0), |found, u| {
                let user = u.user.as_bytes().ct_eq(username.as_bytes());
                let pass = u.password.as_bytes().ct_eq(password.as_bytes());
                found | (user & pass)
            });
        found.into()
    }

    async fn queue(
        &self,
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
        let door = std::sync::Arc::new(crate::prepare::Door::Smtp {
            helo: session.helo().unwrap_or("unknown").to_owned(),
            client: self.peer.ip(),
            rdns: None,
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
            max_recipients: MAX_RECIPIENTS,
            max_errors: 20,
            // Passwords cross only encrypted connections, or never leave the machine.
            auth_requires_tls: !tls_active && !self.peer.ip().to_canonical().is_loopback(),
        }
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
                if smtp_proto::validate_mailbox(address).is_err() {
                    Reply::new(
                        553,
                        enhanced(5, 1, 3),
                        "Bad destination mailbox address syntax",
                    )
                } else if !self.may_relay && session.authenticated().is_none() {
                    Reply::new(550, enhanced(5, 7, 1), "Relaying denied")
                } else {
                    // The tenant comes with the message (X-Tenant); here only the list of
                    // mail without one can be asked. `queue` checks the tenant's.
                    match self
                        .settings
                        .engine
                        .suppressed(None, std::slice::from_ref(address))
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
                    }
                }
            }
            Event::DataEnd {
                sender, recipients, ..
            } => {
                if recipients
                    .iter()
                    .any(|r| self.settings.is_report_address(r))
                {
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
                if self.check_credentials(authorization_id, username, password) {
                    tracing::info!(peer = %self.peer, user = %username, "SMTP client authenticated");
                    Reply::new(235, enhanced(2, 7, 0), "Authentication successful")
                } else {
                    tracing::info!(peer = %self.peer, user = %username, "SMTP authentication failed");
                    Reply::new(535, enhanced(5, 7, 8), "Authentication credentials invalid")
                }
            }
            _ => Reply::new(451, enhanced(4, 3, 0), "Unexpected event"),
        };
        Some(reply)
    }
}

/// The recipient with its domain lower-cased (the local part is the receiver's business),
/// and the domain.
fn normalize_recipient(address: &str) -> (String, String) {
    match address.rsplit_once('@') {
        Some((local, domain)) => {
            let domain = domain.to_ascii_lowercase();
            (format!("{local}@{domain}"), domain)
        }
        None => (address.to_owned(), String::new()),
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

    #[test]
    fn recipient_domains_are_lower_cased() {
        assert_eq!(
            normalize_recipient("Ann.X@Example.TEST"),
            ("Ann.X@example.test".to_owned(), "example.test".to_owned())
        );
    }
}

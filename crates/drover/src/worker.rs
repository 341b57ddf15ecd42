//! A delivery worker: takes a queue's ready messages one after another, each read and its
//! rates waited for before a session is taken; finds or opens a session to the site
//! (bounded failover over MX addresses), sends, and hands the outcome on to be recorded.
//!
//! Ready queues are per recipient domain; connections, their caps and rates are per site
//! (the MX rollup name from the resolver), so domains hosted by one provider share sessions.
//! The slot travels with the session, into the pool and out again, so idle sessions count
//! against `max_connections` too.

use crate::automation::Action;
use crate::clock::now_ms;
use crate::crew::WorkerGuard;
use crate::egress::Source;
use crate::engine::Engine;
use crate::outbound::{mx_hosts, Session};
use crate::outcome::Outcome;
use crate::telemetry::{AUTOMATION, DELIVERY_DURATION};
use accounting::Peer;
use connection_pool::{ClientError, ConnectOptions, Envelope, Pooled, SmtpClient};
use queue::{MessageId, MessageMeta};
use queue_key::QueueKey;
use rate_limiter::DestinationLimiter;
use resolver_cache::Destination;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// While queues wait for a worker, a busy worker hands its turn over after this many
/// messages or [`TURN_TIME`], whichever comes first: a big domain never starves small ones.
const TURN_MESSAGES: u32 = 20;
/// See [`TURN_MESSAGES`].
const TURN_TIME: Duration = Duration::from_secs(2);
/// How long a message whose spool record could not be read (a reopen in progress, a storage
/// error) waits before it is tried again; it stays on the schedule meanwhile.
const READ_RETRY: Duration = Duration::from_secs(5);

/// A message read from the spool for an attempt. Short-lived and never stored, so the size
/// difference between its variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Loaded {
    Found(MessageMeta, Vec<u8>),
    /// Purged or finished meanwhile.
    Gone,
    /// Not readable now (a reopen, a storage error): try again later.
    Unreadable,
    /// The record does not decode: it stays in the spool, and the next start reports it.
    Corrupt,
}

impl Engine {
    /// A delivery worker: one session at a time, many messages of one queue (a domain, or a
    /// domain and egress source). Each message is taken and read before any session is:
    /// its tenant's and campaign's rates are waited for with no session held.
    pub(crate) async fn work(self: Arc<Self>, queue: QueueKey) {
        let _guard = WorkerGuard {
            crew: &self.crew,
            scheduler: &self.scheduler,
            queue: queue.clone(),
        };
        let domain = queue.name();
        let source = queue
            .source()
            .and_then(|name| self.outbound.egress.source(name));
        let mut current: Option<(Session, QueueKey)> = None;
        let turn = tokio::time::Instant::now();
        let mut delivered = 0u32;
        while !self.cancel.is_cancelled() && self.spool.is_writable() && !self.drains.scaling_down()
        {
            if delivered > 0
                && self.crew.starving.load(Ordering::SeqCst)
                && (delivered >= TURN_MESSAGES || turn.elapsed() >= TURN_TIME)
            {
                // Others wait for a worker: this queue gets another turn in the next round.
                break;
            }
            let Some(id) = self.scheduler.pop_ready(&queue, now_ms()) else {
                break;
            };
            let (meta, body) = match self.load(id).await {
                Loaded::Found(meta, body) => (meta, body),
                Loaded::Gone | Loaded::Corrupt => {
                    self.scheduler.finish(id);
                    continue;
                }
                Loaded::Unreadable => {
                    self.scheduler
                        .defer(id, now_ms() + READ_RETRY.as_millis() as u64);
                    continue;
                }
            };
            if !self.wait_for_rates(&meta, &mut current).await {
                // Shutting down: the message goes back as it was.
                self.scheduler.defer(id, meta.due_ms);
                break;
            }
            let dest = match self.outbound.resolver.resolve(domain).await {
                Ok(dest) => dest,
                Err(e) => {
                    // Every message of the domain shares the answer: settle them all now.
                    let outcome = Outcome::unresolvable(&e);
                    self.settle_one(meta, domain, &outcome).await;
                    self.settle_all(&queue, domain, &outcome).await;
                    break;
                }
            };
            // Sessions, caps and rates are per site and egress source (contract §2:
            // max_connections is per source).
            let site_key = queue.with_name(dest.site.as_str());
            let limiter = self
                .outbound
                .shaper
                .limiter(&site_key, domain, &mx_hosts(&dest));
            let max_per_session = limiter.limits().max_deliveries_per_connection;
            let (mut session, reused) = match current.take() {
                Some((session, key)) if key == site_key => (session, true),
                other => {
                    if let Some((old, key)) = other {
                        self.park(&key, old).await;
                    }
                    match self.outbound.pool.checkout(&site_key) {
                        Some(session) => (session, true),
                        None => match self
                            .open_session(&queue, &site_key, &dest, source, &limiter)
                            .await
                        {
                            Some(Ok(session)) => (session, false),
                            Some(Err(e)) => {
                                let outcome = Outcome::no_host_answered(domain, &e);
                                self.settle_one(meta, &dest.site, &outcome).await;
                                self.settle_all(&queue, &dest.site, &outcome).await;
                                break;
                            }
                            None => {
                                // Cancelled while waiting for a connection slot.
                                self.scheduler.defer(id, meta.due_ms);
                                break;
                            }
                        },
                    }
                }
            };
            self.until_message_permitted(&site_key, &limiter).await;
            let kept = self
                .attempt(meta, body, &queue, &dest, &limiter, &mut session, reused)
                .await;
            delivered += 1;
            if kept
                && session.client.transactions() < max_per_session
                && !limiter.over_connection_cap()
                && !session.lease_lost()
            {
                current = Some((session, site_key));
            } else {
                session.close().await;
            }
        }
        if let Some((session, site)) = current {
            self.park(&site, session).await;
        }
    }

    /// Waits until the message's tenant and campaign (`[[rate_limit]]`) may send another
    /// message. A session in hand goes back to the pool first, so a slow tenant never idles
    /// a site's sessions. False when the engine shuts down meanwhile.
    async fn wait_for_rates(
        &self,
        meta: &MessageMeta,
        current: &mut Option<(Session, QueueKey)>,
    ) -> bool {
        let keys = [
            meta.tenant.as_ref().map(|t| format!("tenant:{t}")),
            meta.campaign.as_ref().map(|c| format!("campaign:{c}")),
        ];
        for key in keys.iter().flatten() {
            while let Err(wait) = self.outbound.rates.check(key) {
                if let Some((session, site)) = current.take() {
                    self.park(&site, session).await;
                }
                tokio::select! {
                    _ = self.cancel.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        true
    }

    /// Keeps a session for reuse, unless others wait for a connection slot (here, or for its
    /// cluster lease anywhere): then it is closed, so an idle session never holds up a
    /// destination with mail to send.
    async fn park(&self, key: &QueueKey, session: Session) {
        if self.outbound.global_slots.available_permits() == 0 || session.lease_wanted() {
            session.close().await;
        } else {
            self.outbound.pool.checkin(key, session);
            // A queue of the same site may have been waiting for this session.
            self.scheduler.wake();
        }
    }

    /// Waits for a connection slot of the site, then connects through the destination's
    /// hosts in order (next address, then next host), trying at most
    /// `delivery.mx_address_limit` addresses within `delivery.session_setup_timeout` in all.
    /// `None`: cancelled.
    async fn open_session(
        &self,
        queue: &QueueKey,
        site_key: &QueueKey,
        dest: &Destination,
        source: Option<&Source>,
        limiter: &DestinationLimiter,
    ) -> Option<Result<Session, ClientError>> {
        let (slot, lease) = self.connection_slot(site_key, limiter).await?;
        let global = match Arc::clone(&self.outbound.global_slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // The budget is spent; idle sessions elsewhere give theirs back first.
                self.outbound.pool.evict_oldest();
                tokio::select! {
                    _ = self.cancel.cancelled() => return None,
                    permit = Arc::clone(&self.outbound.global_slots).acquire_owned() => permit.ok()?,
                }
            }
        };
        self.until_connection_permitted(site_key, limiter).await;
        let tls = self.policy().tls_mode(queue.name(), &mx_hosts(dest));
        let ehlo_name = source
            .and_then(|s| s.ehlo_name.as_deref())
            .unwrap_or(&self.outbound.ehlo_name);
        let budget = self.config.delivery.session_setup_timeout.0;
        let deadline = tokio::time::Instant::now() + budget;
        let addresses: Vec<(&str, std::net::SocketAddr)> = dest
            .hosts
            .iter()
            .flat_map(|host| {
                host.addresses
                    .iter()
                    .map(|a| (host.name.as_str(), *a))
                    .collect::<Vec<_>>()
            })
            .take(self.config.delivery.mx_address_limit)
            .collect();
        let mut last = None;
        for (host, address) in addresses {
            let mut options = ConnectOptions::new(host, address, ehlo_name);
            options.timeouts = self.outbound.timeouts;
            options.tls = tls;
            options.source = source.and_then(|s| s.address);
            let connecting = tokio::time::timeout_at(deadline, SmtpClient::connect_with(options));
            match connecting.await {
                Ok(Ok(client)) => {
                    return Some(Ok(Session {
                        client,
                        _slot: slot,
                        _global: global,
                        lease,
                    }))
                }
                Ok(Err(e)) => {
                    tracing::debug!(%host, %address, error = %e, "connect failed");
                    last = Some(e);
                }
                Err(_) => {
                    tracing::debug!(%host, %address, "session setup budget spent");
                    last = Some(ClientError::Timeout {
                        command: "session setup",
                        duration: budget,
                    });
                    break;
                }
            }
        }
        Some(Err(last.unwrap_or_else(|| ClientError::Connect {
            address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        })))
    }

    /// Gives one message (taken, with an attempt counted) `outcome` and moves it on.
    async fn settle_one(&self, mut meta: MessageMeta, site: &str, outcome: &Outcome) {
        let id = meta.id;
        meta.attempts += 1;
        let next = self.conclude(meta, site, outcome.clone()).await;
        self.requeue_or_forget(id, next);
    }

    /// Gives every ready message of `queue` the same outcome (DNS failure, no host answered):
    /// they would all meet it, and trying each would only repeat the wait.
    async fn settle_all(&self, queue: &QueueKey, site: &str, outcome: &Outcome) {
        while let Some(id) = self.scheduler.pop_ready(queue, now_ms()) {
            match self.load(id).await {
                Loaded::Found(meta, _) => self.settle_one(meta, site, outcome).await,
                Loaded::Gone | Loaded::Corrupt => self.scheduler.finish(id),
                Loaded::Unreadable => self
                    .scheduler
                    .defer(id, now_ms() + READ_RETRY.as_millis() as u64),
            }
        }
    }

    /// Reads a message on the spool's reader threads: a RocksDB read may wait for the disk,
    /// and an async worker thread must not.
    async fn load(&self, id: MessageId) -> Loaded {
        let read = self.spool.read_message(id).await;
        match read {
            Ok(Some((meta, body))) => Loaded::Found(meta, body),
            Ok(None) => Loaded::Gone,
            Err(e) if !e.is_transient() => {
                tracing::error!(%id, error = %e, "cannot decode a spooled message; it stays in the spool");
                Loaded::Corrupt
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot read a spooled message now; retrying later");
                Loaded::Unreadable
            }
        }
    }

    /// One transaction for one message over `session`. Returns whether the session can be
    /// kept. A reused session that fails before the final dot costs the message nothing: it
    /// goes back to the ready queue without an attempt counted, as the server most likely
    /// closed the idle connection.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        self: &Arc<Self>,
        mut meta: MessageMeta,
        body: Vec<u8>,
        queue: &QueueKey,
        dest: &Destination,
        limiter: &DestinationLimiter,
        session: &mut Session,
        reused: bool,
    ) -> bool {
        let id = meta.id;
        let envelope = Envelope {
            sender: meta.sender.clone(),
            recipients: vec![meta.recipient.clone()],
            // Reports that honour DSN carry the message id back (matched in `inbound`).
            envid: Some(id.to_string()),
        };
        let client = &mut session.client;
        let started = std::time::Instant::now();
        let result = client.send(&envelope, &body).await;
        self.spool.recycle(body);
        metrics::histogram!(DELIVERY_DURATION).record(started.elapsed().as_secs_f64());
        let peer = Peer {
            host: client.peer().host.clone(),
            address: client.peer().address.to_string(),
        };
        // The source's name when egress sources are configured, else the local address.
        let source = self
            .outbound
            .egress
            .source_for(&meta)
            .map(str::to_owned)
            .or_else(|| client.peer().local.map(|a| a.ip().to_string()));
        let tls = client.tls().map(|t| t.to_string());
        let (mut outcome, keep) = match result {
            Ok(tx) => {
                let mut outcome = Outcome::from_reply(
                    tx.outcome_for(0),
                    &self.policy().classifier,
                    &meta.domain,
                    &mx_hosts(dest),
                );
                self.automate(&mut outcome, queue, limiter);
                (outcome, client.is_usable())
            }
            Err(e) if reused && !e.after_final_dot() => {
                tracing::debug!(%id, error = %e, "pooled session failed; retrying on a fresh one");
                meta.due_ms = now_ms();
                self.enqueue(&meta);
                return false;
            }
            Err(e) => (Outcome::broken_session(&e), false),
        };
        meta.attempts += 1;
        outcome.mark_greylisting(meta.attempts);
        outcome.peer = Some(peer);
        outcome.source = source;
        outcome.tls = tls;
        // The outcome is decided; recording it (two synced writes) need not hold the session.
        // The message stays in flight until its record is down, so nothing can pick it up
        // twice, and a crash before that repeats at most this delivery.
        // Bounded: past RECORDING_IN_FLIGHT outcomes waiting for the disk, the worker waits.
        let room = Arc::clone(&self.crew.recording).acquire_owned().await.ok();
        let engine = Arc::clone(self);
        let site = dest.site.clone();
        self.crew.tracker.spawn(async move {
            let next = engine.conclude(meta, &site, outcome).await;
            engine.requeue_or_forget(id, next);
            drop(room);
        });
        keep
    }

    /// Carries out the first `[[automation]]` rule matching a non-positive reply (a bounce
    /// is already in the outcome's verdict).
    fn automate(&self, outcome: &mut Outcome, queue: &QueueKey, limiter: &DestinationLimiter) {
        let Some((action, duration)) = outcome.react(&self.policy().automation) else {
            return;
        };
        let reply = &outcome.response.text;
        match action {
            Action::Bounce => {}
            Action::Suspend => {
                let until = now_ms() + duration.as_millis() as u64;
                tracing::warn!(%queue, ?duration, %reply, "automation: suspending");
                self.scheduler.suspend_queue(queue, until);
            }
            Action::Backoff => {
                tracing::warn!(%queue, ?duration, %reply, "automation: backing off");
                limiter.back_off(duration);
            }
        }
        metrics::counter!(AUTOMATION, "action" => action.as_str()).increment(1);
    }
}

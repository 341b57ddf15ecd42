//! The delivery side of the engine: dispatcher, workers, attempts and their outcomes.
//!
//! Ready queues are per recipient domain; connections, their caps and rates are per site
//! (the MX rollup name from the resolver), so domains hosted by one provider share sessions.
//! A worker serves one domain: it resolves it, takes an idle session of the site from the
//! pool or opens one when the site has a free connection slot (waiting for one otherwise),
//! and delivers the domain's ready messages over it one after another. The slot travels with
//! the session, into the pool and out again, so idle sessions count against
//! `max_connections` too.

use crate::automation::Action;
use crate::egress::Source;
use crate::engine::{now_ms, Engine, BACKOFF, HOLDS};
use accounting::{classify, Accounting, BounceCategory, Peer, Record, RecordType, Response};
use connection_pool::{ClientError, ConnectOptions, Envelope, Pooled, SmtpClient};
use queue::{MessageId, MessageMeta, Selector};
use rate_limiter::{ConnectionSlot, DestinationLimiter};
use resolver_cache::Destination;
use smtp_proto::Reply;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

pub(crate) const DELIVERY_DURATION: &str = "drover_delivery_duration_seconds";
pub(crate) const AUTOMATION: &str = "drover_automation_actions_total";

/// Messages a worker should have queued before the dispatcher adds another worker for the
/// same domain: a session carries many messages, and receivers count connections.
const BACKLOG_PER_WORKER: usize = 4;
/// While queues wait for a worker, a busy worker hands its turn over after this many
/// messages or [`TURN_TIME`], whichever comes first: a big domain never starves small ones.
const TURN_MESSAGES: u32 = 20;
/// See [`TURN_MESSAGES`].
const TURN_TIME: Duration = Duration::from_secs(2);
/// How long a message whose spool record could not be read (a reopen in progress, a storage
/// error) waits before it is tried again; it stays on the schedule meanwhile.
const READ_RETRY: Duration = Duration::from_secs(5);
/// Ready queues one dispatcher look at the schedule reads.
const SCAN_CHUNK: usize = 256;

/// An SMTP session with the connection slots it occupies (its site's and the global one).
pub(crate) struct Session {
    client: SmtpClient,
    _slot: ConnectionSlot,
    _global: OwnedSemaphorePermit,
}

impl Pooled for Session {
    fn is_usable(&self) -> bool {
        self.client.is_usable()
    }

    fn close(self) -> impl Future<Output = ()> + Send {
        // The slots are released when the session is gone, not before.
        let Session {
            client,
            _slot,
            _global,
        } = self;
        async move {
            client.quit().await;
            drop((_slot, _global));
        }
    }
}

/// Decrements the domain's and the global worker counts however the worker ends.
struct WorkerGuard<'a> {
    engine: &'a Engine,
    domain: String,
}

impl Drop for WorkerGuard<'_> {
    fn drop(&mut self) {
        let empty = match self.engine.active.get_mut(&self.domain) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if empty {
            self.engine.active.remove_if(&self.domain, |_, n| *n == 0);
        }
        self.engine.workers_running.fetch_sub(1, Ordering::SeqCst);
        self.engine.scheduler.wake();
    }
}

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
    /// Moves due messages to their ready queues and starts workers where messages wait.
    pub(crate) async fn dispatch(self: Arc<Self>) {
        // Where the last pass stopped: queues are served round-robin in name order.
        let mut cursor: Option<String> = None;
        loop {
            if !self.spool.is_writable() {
                // An attempt's outcome could not be recorded: deliveries wait, the messages
                // stay queued, until the spool is writable again.
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = self.spool.wait_writable() => {}
                }
            }
            let now = now_ms();
            self.scheduler.promote(now);
            self.start_workers(&mut cursor, now);
            let sleep = match self.scheduler.next_due() {
                Some(due) => Duration::from_millis(due.saturating_sub(now_ms()).clamp(1, 1000)),
                None => Duration::from_secs(1),
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.scheduler.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// One dispatcher pass: walks the ready queues from `cursor`, once round, and starts
    /// workers where they are wanted, up to `delivery.max_workers` in all. A queue without a
    /// worker comes before a second worker for a busy one; when some queue cannot get one
    /// (every worker busy, or its site's connections all in use), `starving` makes busy
    /// workers hand over after their turn.
    fn start_workers(self: &Arc<Self>, cursor: &mut Option<String>, now: u64) {
        let max_workers = self.config.delivery.max_workers;
        let began = cursor.clone();
        let others_waited = self.starving.load(Ordering::SeqCst);
        let mut starved = false;
        let mut wrapped = false;
        'pass: loop {
            let batch = self
                .scheduler
                .ready_after(cursor.as_deref(), SCAN_CHUNK, now);
            let at_end = batch.len() < SCAN_CHUNK;
            for (queue, ready) in batch {
                if wrapped && began.as_deref().is_some_and(|b| queue.as_str() > b) {
                    break 'pass;
                }
                let running = self.active.get(&queue).map_or(0, |n| *n);
                let (cap, saturated) = self.worker_cap(&queue);
                let desired = ready.div_ceil(BACKLOG_PER_WORKER).clamp(1, cap);
                if running >= desired || (running > 0 && others_waited) {
                    *cursor = Some(queue);
                    continue;
                }
                if saturated {
                    // Its site's sessions are all busy with other domains: they hand over.
                    starved |= running == 0;
                    *cursor = Some(queue);
                    continue;
                }
                if self.workers_running.load(Ordering::SeqCst) >= max_workers {
                    if running == 0 {
                        // Busy workers hand over; this queue comes first in the next pass.
                        starved = true;
                        break 'pass;
                    }
                    // It only wants more workers: not while every worker is busy.
                    *cursor = Some(queue);
                    continue;
                }
                let mut running = self.active.entry(queue.clone()).or_insert(0);
                while *running < desired
                    && self.workers_running.load(Ordering::SeqCst) < max_workers
                {
                    *running += 1;
                    self.workers_running.fetch_add(1, Ordering::SeqCst);
                    let engine = Arc::clone(self);
                    let queue = queue.clone();
                    self.workers.spawn(async move { engine.work(queue).await });
                }
                drop(running);
                *cursor = Some(queue);
            }
            if at_end {
                if wrapped || began.is_none() {
                    break;
                }
                wrapped = true;
                *cursor = None;
            }
        }
        self.starving.store(starved, Ordering::SeqCst);
    }

    /// How many workers a queue may have (its site's connection cap, once the site is
    /// known without a lookup; one until then), and whether its site's connections are all
    /// in use with no idle session to take over.
    fn worker_cap(&self, queue: &str) -> (usize, bool) {
        let (domain, source) = queue::split_queue_key(queue);
        let Some(Ok(dest)) = self.resolver.peek(domain) else {
            return (1, false);
        };
        let site_key = queue::queue_key(&dest.site, source);
        let limiter = self.shaper.limiter(&site_key, domain, &mx_hosts(&dest));
        let cap = limiter.max_connections_now().max(1);
        let saturated = limiter.connections_in_use() >= cap && !self.pool.has_idle(&site_key);
        (cap, saturated)
    }

    /// Housekeeping: closes idle sessions past their time, publishes the hold gauges, and
    /// drops bookkeeping of destinations nothing refers to any more.
    pub(crate) async fn reap_idle_sessions(self: Arc<Self>) {
        let period = (self.config.delivery.idle_timeout.0 / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut last_compaction = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {
                    self.pool.reap();
                    let holds = self.scheduler.suspensions(now_ms());
                    let domains = holds.iter().filter(|(s, _)| matches!(s, Selector::Domain(_))).count();
                    metrics::gauge!(HOLDS, "kind" => "domain").set(domains as f64);
                    metrics::gauge!(HOLDS, "kind" => "campaign").set((holds.len() - domains) as f64);
                    metrics::gauge!(BACKOFF).set(self.backing_off().len() as f64);
                    if last_compaction.elapsed() >= Duration::from_secs(60) {
                        last_compaction = tokio::time::Instant::now();
                        self.scheduler.compact();
                        let now = tokio::time::Instant::now();
                        self.shaper.evict_idle(now, rate_limiter::IDLE_EVICTION);
                        self.rates.evict_idle(now, rate_limiter::IDLE_EVICTION);
                    }
                }
            }
        }
    }

    /// A delivery worker: one session at a time, many messages of one queue (a domain, or a
    /// domain and egress source). Each message is taken and read before any session is:
    /// its tenant's and campaign's rates are waited for with no session held.
    async fn work(self: Arc<Self>, queue: String) {
        let _guard = WorkerGuard {
            engine: &self,
            domain: queue.clone(),
        };
        let (domain, source_name) = queue::split_queue_key(&queue);
        let source = source_name.and_then(|name| self.egress.source(name));
        let mut current: Option<(Session, String)> = None;
        let turn = tokio::time::Instant::now();
        let mut delivered = 0u32;
        while !self.cancel.is_cancelled() && self.spool.is_writable() {
            if delivered > 0
                && self.starving.load(Ordering::SeqCst)
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
            let dest = match self.resolver.resolve(domain).await {
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
            let site_key = queue::queue_key(&dest.site, source_name);
            let limiter = self.shaper.limiter(&site_key, domain, &mx_hosts(&dest));
            let max_per_session = limiter.limits().max_deliveries_per_connection;
            let (mut session, reused) = match current.take() {
                Some((session, key)) if key == site_key => (session, true),
                other => {
                    if let Some((old, key)) = other {
                        self.park(&key, old).await;
                    }
                    match self.pool.checkout(&site_key) {
                        Some(session) => (session, true),
                        None => match self.open_session(&queue, &dest, source, &limiter).await {
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
            limiter.until_message_permitted().await;
            let kept = self
                .attempt(meta, body, &queue, &dest, &limiter, &mut session, reused)
                .await;
            delivered += 1;
            if kept
                && session.client.transactions() < max_per_session
                && !limiter.over_connection_cap()
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
        current: &mut Option<(Session, String)>,
    ) -> bool {
        let keys = [
            meta.tenant.as_ref().map(|t| format!("tenant:{t}")),
            meta.campaign.as_ref().map(|c| format!("campaign:{c}")),
        ];
        for key in keys.iter().flatten() {
            while let Err(wait) = self.rates.check(key) {
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

    /// Keeps a session for reuse, unless others wait for a connection slot: then it is closed,
    /// so an idle session never holds up a destination with mail to send.
    async fn park(&self, key: &str, session: Session) {
        if self.global_slots.available_permits() == 0 {
            session.close().await;
        } else {
            self.pool.checkin(key, session);
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
        queue: &str,
        dest: &Destination,
        source: Option<&Source>,
        limiter: &DestinationLimiter,
    ) -> Option<Result<Session, ClientError>> {
        let slot = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            slot = limiter.connection_slot() => slot,
        };
        let global = match Arc::clone(&self.global_slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // The budget is spent; idle sessions elsewhere give theirs back first.
                self.pool.evict_oldest();
                tokio::select! {
                    _ = self.cancel.cancelled() => return None,
                    permit = Arc::clone(&self.global_slots).acquire_owned() => permit.ok()?,
                }
            }
        };
        limiter.until_connection_permitted().await;
        let tls = self
            .policy()
            .tls_mode(queue::split_queue_key(queue).0, &mx_hosts(dest));
        let ehlo_name = source
            .and_then(|s| s.ehlo_name.as_deref())
            .unwrap_or(&self.ehlo_name);
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
            options.timeouts = self.timeouts;
            options.tls = tls;
            options.source = source.and_then(|s| s.address);
            let connecting = tokio::time::timeout_at(deadline, SmtpClient::connect_with(options));
            match connecting.await {
                Ok(Ok(client)) => {
                    return Some(Ok(Session {
                        client,
                        _slot: slot,
                        _global: global,
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
    async fn settle_all(&self, queue: &str, site: &str, outcome: &Outcome) {
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

    fn requeue_or_forget(&self, id: MessageId, next: Option<MessageMeta>) {
        match next {
            Some(meta) => self.enqueue(&meta),
            None => self.scheduler.finish(id),
        }
    }

    /// Reads a message on the blocking pool: a RocksDB read may wait for the disk, and an
    /// async worker thread must not.
    async fn load(&self, id: MessageId) -> Loaded {
        let spool = self.spool.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<_, queue::QueueError> {
            let meta = spool.meta(&id)?;
            match meta {
                Some(meta) => Ok(spool.body(&id)?.map(|body| (meta, body))),
                None => Ok(None),
            }
        })
        .await;
        match read {
            Ok(Ok(Some((meta, body)))) => Loaded::Found(meta, body),
            Ok(Ok(None)) => Loaded::Gone,
            Ok(Err(e)) if !e.is_transient() => {
                tracing::error!(%id, error = %e, "cannot decode a spooled message; it stays in the spool");
                Loaded::Corrupt
            }
            Ok(Err(e)) => {
                tracing::warn!(%id, error = %e, "cannot read a spooled message now; retrying later");
                Loaded::Unreadable
            }
            Err(e) => {
                tracing::error!(%id, error = %e, "reading a spooled message failed");
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
        queue: &str,
        dest: &Destination,
        limiter: &DestinationLimiter,
        session: &mut Session,
        reused: bool,
    ) -> bool {
        let id = meta.id;
        let envelope = Envelope {
            sender: meta.sender.clone(),
            recipients: vec![meta.recipient.clone()],
        };
        let client = &mut session.client;
        let started = std::time::Instant::now();
        let result = client.send(&envelope, &body).await;
        metrics::histogram!(DELIVERY_DURATION).record(started.elapsed().as_secs_f64());
        let peer = Peer {
            host: client.peer().host.clone(),
            address: client.peer().address.to_string(),
        };
        // The source's name when egress sources are configured, else the local address.
        let source = self
            .egress
            .source_for(&meta)
            .map(str::to_owned)
            .or_else(|| client.peer().local.map(|a| a.ip().to_string()));
        let tls = client.tls().map(|t| t.to_string());
        let (mut outcome, keep) = match result {
            Ok(tx) => {
                let mut outcome = Outcome::from_reply(tx.outcome_for(0));
                self.automate(&mut outcome, queue, limiter);
                (outcome, client.is_usable())
            }
            Err(e) if reused && !e.after_final_dot() => {
                tracing::debug!(%id, error = %e, "pooled session failed; retrying on a fresh one");
                meta.due_ms = now_ms();
                self.enqueue(&meta);
                return false;
            }
            Err(e) => {
                // The session broke (timeout, reset, garbage): not the message's fault, so
                // it is deferred, never bounced.
                let text = if e.after_final_dot() {
                    format!("{e} (after the final dot: the message may have been delivered)")
                } else {
                    e.to_string()
                };
                let outcome = Outcome::synthetic(
                    Response {
                        code: 451,
                        enhanced_code: Some("4.4.2".into()),
                        text,
                    },
                    BounceCategory::NoAnswerFromHost,
                    false,
                );
                (outcome, false)
            }
        };
        meta.attempts += 1;
        // A bare 450/451 4.7.1 to a first attempt is how many greylisters answer without
        // saying so: retry soon, from the same source, rather than on the slow schedule.
        if meta.attempts == 1
            && outcome.verdict == Verdict::Deferred
            && matches!(outcome.response.code, 450 | 451)
            && outcome.response.enhanced_code.as_deref() == Some("4.7.1")
            && matches!(
                outcome.category,
                BounceCategory::Other | BounceCategory::PolicyRelated
            )
        {
            outcome.category = BounceCategory::Greylisted;
        }
        outcome.peer = Some(peer);
        outcome.source = source;
        outcome.tls = tls;
        // The outcome is decided; recording it (two synced writes) need not hold the session.
        // The message stays in flight until its record is down, so nothing can pick it up
        // twice, and a crash before that repeats at most this delivery.
        let engine = Arc::clone(self);
        let site = dest.site.clone();
        self.workers.spawn(async move {
            let next = engine.conclude(meta, &site, outcome).await;
            engine.requeue_or_forget(id, next);
        });
        keep
    }

    /// Applies the first `[[automation]]` rule matching a non-positive reply.
    fn automate(&self, outcome: &mut Outcome, queue: &str, limiter: &DestinationLimiter) {
        if outcome.verdict == Verdict::Delivered {
            return;
        }
        let r = &outcome.response;
        let Some((action, duration)) =
            self.policy()
                .automation
                .react(r.code, r.enhanced_code.as_deref(), &r.text)
        else {
            return;
        };
        match action {
            Action::Bounce => outcome.verdict = Verdict::Bounced,
            Action::Suspend => {
                let now = now_ms();
                let until = now + duration.as_millis() as u64;
                tracing::warn!(%queue, ?duration, reply = %r.text, "automation: suspending");
                self.scheduler
                    .suspend(&Selector::Domain(queue.to_owned()), until, now);
                metrics::counter!(AUTOMATION, "action" => "suspend").increment(1);
            }
            Action::Backoff => {
                tracing::warn!(%queue, ?duration, reply = %r.text, "automation: backing off");
                limiter.back_off(duration);
                metrics::counter!(AUTOMATION, "action" => "backoff").increment(1);
            }
        }
        if action == Action::Bounce {
            metrics::counter!(AUTOMATION, "action" => "bounce").increment(1);
        }
    }

    /// Writes the record an attempt earned and moves the message on: removed when final,
    /// expired, or returned with its next due time for the caller to schedule.
    async fn conclude(
        &self,
        mut meta: MessageMeta,
        site: &str,
        outcome: Outcome,
    ) -> Option<MessageMeta> {
        let now = now_ms();
        let kind = match outcome.verdict {
            Verdict::Delivered => RecordType::Delivery,
            Verdict::Bounced => RecordType::Bounce,
            Verdict::Deferred => RecordType::TransientFailure,
        };
        let mut record = self.record(kind, &meta);
        record.site = Some(site.to_owned());
        record.peer = outcome.peer.clone();
        record.source = outcome.source.clone();
        record.tls = outcome.tls.clone();
        record.response = Some(outcome.response.clone());
        if kind != RecordType::Delivery {
            record.bounce_category = Some(outcome.category);
        }
        if kind.is_final() {
            self.finalize(meta, vec![record]).await;
            return None;
        }
        let delay = self.retry_delay(&meta, outcome.category);
        let age = now.saturating_sub(meta.received_ms);
        let max_age = self.config.retry.max_age.0.as_millis() as u64;
        if age >= max_age {
            let mut expired = self.record(RecordType::Expiration, &meta);
            expired.site = Some(site.to_owned());
            expired.response = Some(outcome.response);
            expired.bounce_category = Some(BounceCategory::MessageExpired);
            self.finalize(meta, vec![record, expired]).await;
            return None;
        }
        let previous_due = meta.due_ms;
        // The last retry happens at max_age, so a message gets its full lifetime.
        meta.due_ms = (now + delay.as_millis() as u64).min(meta.received_ms + max_age);
        if let Some(source) = &outcome.source {
            meta.last_source = Some(source.clone());
        }
        if let Err(e) = self.accounting.record(record).await {
            tracing::error!(id = %meta.id, error = %e, "could not write TransientFailure record");
        }
        if let Err(e) = self.spool.update_lazily(meta.clone(), previous_due).await {
            // The old schedule entry is still on disk: after a restart the message is retried.
            tracing::error!(id = %meta.id, error = %e, "could not reschedule in the spool");
        }
        Some(meta)
    }

    /// Ends a message's life: its final records appended to the accounting file (synced),
    /// then the message removed from the spool. The [`crate::finals::Ledger`] keeps the
    /// accounting checkpoint from passing the record until the removal is done, so a crash in
    /// between leaves a record the next start finds, and the message is removed then instead
    /// of delivered again. Returns whether the message is gone.
    ///
    /// A step that fails (a full disk) is retried, so the outcome is recorded without
    /// delivering the message twice; the worker waits meanwhile. Only shutdown ends the wait:
    /// a message whose record was not written is attempted again at the next start.
    pub(crate) async fn finalize(&self, meta: MessageMeta, records: Vec<Record>) -> bool {
        let lines: Vec<String> = records.iter().map(Accounting::to_line).collect();
        let offset = self.accounting.synced_len();
        self.ledger.begin(offset);
        let mut pause = Duration::from_millis(250);
        while let Err(e) = self
            .accounting
            .record_serialised(&records, lines.clone())
            .await
        {
            // The accounting writer discards a failed batch, so a retry cannot duplicate it.
            tracing::error!(id = %meta.id, error = %e, "could not write the final record; retrying");
            let stop = matches!(e, accounting::AccountingError::Stopped) || {
                tokio::select! {
                    _ = self.cancel.cancelled() => true,
                    _ = tokio::time::sleep(pause) => false,
                }
            };
            if stop {
                // Nothing was written: the message stays owed a delivery.
                self.ledger.end(offset);
                return false;
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        // Unsynced: the next checkpoint write (synced, after this one in the spool's order)
        // makes it durable; until then the ledger holds the checkpoint back.
        while let Err(e) = self.spool.remove_lazily(meta.id, meta.due_ms).await {
            tracing::error!(id = %meta.id, error = %e, "could not remove a finished message");
            if !self.wait_for_spool().await {
                // Left in the ledger on purpose: the checkpoint must not pass this record
                // while its message is still spooled.
                return true;
            }
        }
        self.ledger.end(offset);
        true
    }

    /// Ends many messages' lives at once (a purge): their records appended as one group
    /// (synced), then the messages removed as one spool write, under the same checkpoint
    /// rule as [`Engine::finalize`]. An error before the records are down leaves everything
    /// as it was, for the caller to put back on the schedule.
    pub(crate) async fn finalize_group(
        &self,
        metas: Vec<MessageMeta>,
        records: Vec<Record>,
    ) -> Result<(), crate::engine::EngineError> {
        let offset = self.accounting.synced_len();
        self.ledger.begin(offset);
        if let Err(e) = self.accounting.record_all(records).await {
            self.ledger.end(offset);
            return Err(e.into());
        }
        let doomed: Vec<(MessageId, u64)> = metas.iter().map(|m| (m.id, m.due_ms)).collect();
        while let Err(e) = self.spool.remove_many_lazily(doomed.clone()).await {
            tracing::error!(error = %e, "could not remove purged messages");
            if !self.wait_for_spool().await {
                // Left in the ledger on purpose, as in `finalize`.
                return Ok(());
            }
        }
        self.ledger.end(offset);
        Ok(())
    }

    /// After a failed spool write: waits until the spool is writable again. False when the
    /// engine shuts down first or the spool is closed.
    async fn wait_for_spool(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        if self.spool.is_writable() {
            // Not a storage error the spool recovers from by itself (it is closing): give up
            // rather than spin.
            return false;
        }
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.spool.wait_writable() => true,
        }
    }

    fn retry_delay(&self, meta: &MessageMeta, category: BounceCategory) -> Duration {
        let retry = &self.config.retry;
        let base = if category == BounceCategory::Greylisted && meta.attempts <= 1 {
            retry.greylist_retry.0
        } else {
            let i = (meta.attempts.saturating_sub(1) as usize)
                .min(retry.intervals.len().saturating_sub(1));
            retry
                .intervals
                .get(i)
                .map_or(Duration::from_secs(300), |d| d.0)
        };
        // Up to 10 % jitter spreads retries of a large batch over time instead of a spike.
        let jitter = base.mul_f64(rand::random::<f64>() * 0.1);
        base + jitter
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Delivered,
    Deferred,
    Bounced,
}

#[derive(Debug, Clone)]
struct Outcome {
    verdict: Verdict,
    response: Response,
    category: BounceCategory,
    peer: Option<Peer>,
    source: Option<String>,
    tls: Option<String>,
}

impl Outcome {
    fn from_reply(reply: &Reply) -> Outcome {
        let enhanced = reply.enhanced.map(|e| e.to_string());
        let text = reply.text();
        let verdict = if reply.is_positive() {
            Verdict::Delivered
        } else if reply.is_permanent() {
            Verdict::Bounced
        } else {
            Verdict::Deferred
        };
        Outcome {
            category: classify(reply.code, enhanced.as_deref(), &text),
            verdict,
            response: Response {
                code: reply.code,
                enhanced_code: enhanced,
                text,
            },
            peer: None,
            source: None,
            tls: None,
        }
    }

    /// The domain's MX lookup failed: NXDOMAIN and null MX bounce, the rest defers.
    fn unresolvable(e: &resolver_cache::ResolveError) -> Outcome {
        let permanent = e.is_permanent();
        let response = Response {
            code: if permanent { 550 } else { 451 },
            enhanced_code: Some(e.enhanced_code().to_owned()),
            text: e.to_string(),
        };
        let category = if permanent {
            BounceCategory::BadDomain
        } else {
            BounceCategory::RoutingErrors
        };
        Outcome::synthetic(response, category, permanent)
    }

    /// No MX host gave a usable session: deferred.
    fn no_host_answered(domain: &str, e: &ClientError) -> Outcome {
        Outcome::synthetic(
            Response {
                code: 451,
                enhanced_code: Some("4.4.1".into()),
                text: format!("no MX host of {domain} answered: {e}"),
            },
            BounceCategory::NoAnswerFromHost,
            false,
        )
    }

    fn synthetic(response: Response, category: BounceCategory, permanent: bool) -> Outcome {
        Outcome {
            verdict: if permanent {
                Verdict::Bounced
            } else {
                Verdict::Deferred
            },
            response,
            category,
            peer: None,
            source: None,
            tls: None,
        }
    }
}

/// The MX host names of a destination, as shaping and TLS rules match them.
fn mx_hosts(dest: &Destination) -> Vec<String> {
    dest.hosts.iter().map(|h| h.name.clone()).collect()
}

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
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

pub(crate) const DELIVERY_DURATION: &str = "drover_delivery_duration_seconds";
pub(crate) const AUTOMATION: &str = "drover_automation_actions_total";

/// Messages a worker should have queued before the dispatcher adds another worker for the
/// same domain: a session carries many messages, and receivers count connections.
const BACKLOG_PER_WORKER: usize = 4;

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

/// Decrements the domain's worker count however the worker ends.
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
        self.engine.scheduler.wake();
    }
}

impl Engine {
    /// Moves due messages to their ready queues and starts workers where messages wait.
    pub(crate) async fn dispatch(self: Arc<Self>) {
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
            for (domain, ready) in self.scheduler.ready_destinations(now) {
                let (recipient_domain, _) = queue::split_queue_key(&domain);
                let cap = self
                    .shaper
                    .limits_for(recipient_domain, &[])
                    .max_connections
                    .max(1);
                let desired = ready.div_ceil(BACKLOG_PER_WORKER).clamp(1, cap);
                let mut running = self.active.entry(domain.clone()).or_insert(0);
                while *running < desired {
                    *running += 1;
                    let engine = Arc::clone(&self);
                    let domain = domain.clone();
                    self.workers.spawn(async move { engine.work(domain).await });
                }
            }
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

    /// Housekeeping: closes idle sessions past their time and publishes the hold gauges.
    pub(crate) async fn reap_idle_sessions(self: Arc<Self>) {
        let period = (self.config.delivery.idle_timeout.0 / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
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
                    let now = tokio::time::Instant::now();
                    self.shaper.evict_idle(now, rate_limiter::IDLE_EVICTION);
                    self.rates.evict_idle(now, rate_limiter::IDLE_EVICTION);
                }
            }
        }
    }

    /// A delivery worker: one session at a time, many messages of one queue (a domain, or a
    /// domain and egress source).
    async fn work(self: Arc<Self>, queue: String) {
        let _guard = WorkerGuard {
            engine: &self,
            domain: queue.clone(),
        };
        let (domain, source_name) = queue::split_queue_key(&queue);
        let source = source_name.and_then(|name| self.egress.source(name));
        let mut current: Option<(Session, String)> = None;
        while !self.cancel.is_cancelled()
            && self.spool.is_writable()
            && self.scheduler.has_ready(&queue, now_ms())
        {
            let dest = match self.resolver.resolve(domain).await {
                Ok(dest) => dest,
                Err(e) => {
                    // Every message of the domain shares the answer: settle them all now.
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
                    let outcome = Outcome::synthetic(response, category, permanent);
                    self.settle_all(&queue, domain, &outcome).await;
                    break;
                }
            };
            let mx_hosts: Vec<String> = dest.hosts.iter().map(|h| h.name.clone()).collect();
            // Sessions, caps and rates are per site and egress source (contract §2:
            // max_connections is per source).
            let site_key = queue::queue_key(&dest.site, source_name);
            let limiter = self.shaper.limiter(&site_key, domain, &mx_hosts);
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
                                let outcome = Outcome::synthetic(
                                    Response {
                                        code: 451,
                                        enhanced_code: Some("4.4.1".into()),
                                        text: format!("no MX host of {domain} answered: {e}"),
                                    },
                                    BounceCategory::NoAnswerFromHost,
                                    false,
                                );
                                self.settle_all(&queue, &dest.site, &outcome).await;
                                break;
                            }
                            // Cancelled, or the queue emptied while we waited for a slot.
                            None => break,
                        },
                    }
                }
            };
            let Some(id) = self.scheduler.pop_ready(&queue, now_ms()) else {
                self.park(&site_key, session).await;
                break;
            };
            limiter.until_message_permitted().await;
            let kept = self
                .attempt(id, &queue, &dest, &limiter, &mut session, reused)
                .await;
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

    /// Keeps a session for reuse, unless others wait for a connection slot: then it is closed,
    /// so an idle session never holds up a destination with mail to send.
    async fn park(&self, key: &str, session: Session) {
        if self.global_slots.available_permits() == 0 {
            session.close().await;
        } else {
            self.pool.checkin(key, session);
        }
    }

    /// Waits for a connection slot of the site, then connects through the destination's
    /// hosts in order (next address, then next host). `None`: cancelled, or nothing is left
    /// to deliver by the time a slot came free.
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
        if !self.scheduler.has_ready(queue, now_ms()) {
            return None;
        }
        limiter.until_connection_permitted().await;
        let mx_hosts: Vec<String> = dest.hosts.iter().map(|h| h.name.clone()).collect();
        let tls = self
            .policy()
            .tls_mode(queue::split_queue_key(queue).0, &mx_hosts);
        let ehlo_name = source
            .and_then(|s| s.ehlo_name.as_deref())
            .unwrap_or(&self.ehlo_name);
        let mut last = None;
        for host in &dest.hosts {
            for address in &host.addresses {
                let mut options = ConnectOptions::new(&host.name, *address, ehlo_name);
                options.timeouts = self.timeouts;
                options.tls = tls;
                options.source = source.and_then(|s| s.address);
                match SmtpClient::connect_with(options).await {
                    Ok(client) => {
                        return Some(Ok(Session {
                            client,
                            _slot: slot,
                            _global: global,
                        }))
                    }
                    Err(e) => {
                        tracing::debug!(host = %host.name, %address, error = %e, "connect failed");
                        last = Some(e);
                    }
                }
            }
        }
        Some(Err(last.unwrap_or_else(|| ClientError::Connect {
            address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        })))
    }

    /// Gives every ready message of `domain` the same outcome (DNS failure, no host answered):
    /// they would all meet it, and trying each would only repeat the wait.
    async fn settle_all(&self, queue: &str, site: &str, outcome: &Outcome) {
        while let Some(id) = self.scheduler.pop_ready(queue, now_ms()) {
            match self.load(id) {
                Some((mut meta, _)) => {
                    meta.attempts += 1;
                    let next = self.conclude(meta, site, outcome.clone()).await;
                    self.requeue_or_forget(id, next);
                }
                None => self.scheduler.finish(id),
            }
        }
    }

    fn requeue_or_forget(&self, id: MessageId, next: Option<MessageMeta>) {
        match next {
            Some(meta) => self.enqueue(&meta),
            None => self.scheduler.finish(id),
        }
    }

    fn load(&self, id: MessageId) -> Option<(MessageMeta, Vec<u8>)> {
        match (self.spool.meta(&id), self.spool.body(&id)) {
            (Ok(Some(meta)), Ok(Some(body))) => Some((meta, body)),
            // Purged while it waited.
            (Ok(None), _) | (_, Ok(None)) => None,
            (Err(e), _) | (_, Err(e)) => {
                // Left in the spool: the next start retries it.
                tracing::error!(%id, error = %e, "cannot read message from the spool");
                None
            }
        }
    }

    /// One transaction for one message over `session`. Returns whether the session can be
    /// kept. A reused session that fails before the final dot costs the message nothing: it
    /// goes back to the ready queue without an attempt counted, as the server most likely
    /// closed the idle connection.
    async fn attempt(
        self: &Arc<Self>,
        id: MessageId,
        queue: &str,
        dest: &Destination,
        limiter: &DestinationLimiter,
        session: &mut Session,
        reused: bool,
    ) -> bool {
        let Some((mut meta, body)) = self.load(id) else {
            self.scheduler.finish(id);
            return true;
        };
        if let Some(tenant) = &meta.tenant {
            self.rates
                .until_permitted(&format!("tenant:{tenant}"))
                .await;
        }
        if let Some(campaign) = &meta.campaign {
            self.rates
                .until_permitted(&format!("campaign:{campaign}"))
                .await;
        }
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

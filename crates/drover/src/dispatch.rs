//! The dispatcher: moves due messages to their ready queues and starts workers, round-robin
//! over the queues and within `delivery.max_workers`; and the engine's housekeeping.

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::outbound::mx_hosts;
use crate::telemetry::{resident_bytes, BACKOFF, HOLDS, RESIDENT_MEMORY, SPOOL_MEMORY, WORKERS};
use queue::Selector;
use queue_key::QueueKey;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Messages a worker should have queued before the dispatcher adds another worker for the
/// same domain: a session carries many messages, and receivers count connections.
const BACKLOG_PER_WORKER: usize = 4;
/// Ready queues one dispatcher look at the schedule reads.
const SCAN_CHUNK: usize = 256;

/// How long the spool must see no message writes before its memtables are flushed.
const QUIET_FLUSH: Duration = Duration::from_secs(20);
/// Memtables smaller than this are not worth a flush.
const QUIET_FLUSH_MIN_BYTES: u64 = 4 << 20;

impl Engine {
    /// Moves due messages to their ready queues and starts workers where messages wait.
    pub(crate) async fn dispatch(self: Arc<Self>) {
        // Where the last pass stopped: queues are served round-robin in key order.
        let mut cursor: Option<QueueKey> = None;
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
            // A scale-down moves the queue to a peer: no attempt starts here meanwhile.
            if !self.drains.scaling_down() {
                self.start_workers(&mut cursor, now);
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

    /// One dispatcher pass: walks the ready queues from `cursor`, once round, and starts
    /// workers where they are wanted, up to `delivery.max_workers` in all. A queue without a
    /// worker comes before a second worker for a busy one; when some queue cannot get one
    /// (every worker busy, or its site's connections all in use), `starving` makes busy
    /// workers hand over after their turn.
    fn start_workers(self: &Arc<Self>, cursor: &mut Option<QueueKey>, now: u64) {
        let max_workers = self.config.delivery.max_workers;
        let began = cursor.clone();
        let others_waited = self.crew.starving.load(Ordering::SeqCst);
        let mut starved = false;
        let mut wrapped = false;
        'pass: loop {
            let batch = self.scheduler.ready_after(cursor.as_ref(), SCAN_CHUNK, now);
            let at_end = batch.len() < SCAN_CHUNK;
            for (queue, ready) in batch {
                if wrapped && began.as_ref().is_some_and(|b| &queue > b) {
                    break 'pass;
                }
                let running = self.crew.active.get(&queue).map_or(0, |n| *n);
                // A busy queue gets no second worker while others wait: no need to ask its site.
                if running > 0 && others_waited {
                    *cursor = Some(queue);
                    continue;
                }
                let (cap, saturated) = self.worker_cap(&queue);
                let desired = ready.div_ceil(BACKLOG_PER_WORKER).clamp(1, cap);
                if running >= desired {
                    *cursor = Some(queue);
                    continue;
                }
                if saturated {
                    // Its site's sessions are all busy with other domains: they hand over.
                    starved |= running == 0;
                    *cursor = Some(queue);
                    continue;
                }
                if self.crew.running.load(Ordering::SeqCst) >= max_workers {
                    if running == 0 {
                        // Busy workers hand over; this queue comes first in the next pass.
                        starved = true;
                        break 'pass;
                    }
                    // It only wants more workers: not while every worker is busy.
                    *cursor = Some(queue);
                    continue;
                }
                let mut running = self.crew.active.entry(queue.clone()).or_insert(0);
                while *running < desired && self.crew.running.load(Ordering::SeqCst) < max_workers {
                    *running += 1;
                    self.crew.running.fetch_add(1, Ordering::SeqCst);
                    let engine = Arc::clone(self);
                    let queue = queue.clone();
                    self.crew
                        .tracker
                        .spawn(async move { engine.work(queue).await });
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
        self.crew.starving.store(starved, Ordering::SeqCst);
    }

    /// How many workers a queue may have (its site's connection cap, once the site is
    /// known without a lookup; one until then), and whether its site's connections are all
    /// in use with no idle session to take over.
    fn worker_cap(&self, queue: &QueueKey) -> (usize, bool) {
        let domain = queue.name();
        let Some(Ok(dest)) = self.outbound.resolver.peek(domain) else {
            return (1, false);
        };
        let site_key = queue.with_name(dest.site.as_str());
        let limiter = self
            .outbound
            .shaper
            .limiter(&site_key, domain, &mx_hosts(&dest));
        let cap = limiter.max_connections_now().max(1);
        let saturated =
            limiter.connections_in_use() >= cap && !self.outbound.pool.has_idle(&site_key);
        (cap, saturated)
    }

    /// Housekeeping: closes idle sessions past their time, publishes the hold gauges, and
    /// drops bookkeeping of destinations nothing refers to any more.
    pub(crate) async fn reap_idle_sessions(self: Arc<Self>) {
        let period = (self.config.delivery.idle_timeout.0 / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut last_compaction = tokio::time::Instant::now();
        // The spool's message writes at the last tick, and since when they stand still.
        let mut writes = self.spool.message_writes();
        let mut quiet_since = tokio::time::Instant::now();
        let mut flushed = false;
        let mut last_expiry: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {
                    self.outbound.pool.reap();
                    let holds = self.scheduler.suspensions(now_ms());
                    let domains = holds.iter().filter(|(s, _)| matches!(s, Selector::Domain(_))).count();
                    metrics::gauge!(HOLDS, "kind" => "domain").set(domains as f64);
                    metrics::gauge!(HOLDS, "kind" => "campaign").set((holds.len() - domains) as f64);
                    metrics::gauge!(BACKOFF).set(self.backing_off().len() as f64);
                    metrics::gauge!(WORKERS).set(self.crew.running.load(Ordering::SeqCst) as f64);
                    if let Ok((memtables, cache)) = self.spool.memory_usage() {
                        metrics::gauge!(SPOOL_MEMORY, "part" => "memtables").set(memtables as f64);
                        metrics::gauge!(SPOOL_MEMORY, "part" => "block_cache").set(cache as f64);
                        // After a wave (a big send, a deferral round) the memtables stay full
                        // until the next wave fills them: tens of megabytes held for nothing.
                        // Once the spool has been quiet a while, they go to disk.
                        let now_writes = self.spool.message_writes();
                        if now_writes != writes {
                            writes = now_writes;
                            quiet_since = tokio::time::Instant::now();
                            flushed = false;
                        } else if !flushed
                            && quiet_since.elapsed() >= QUIET_FLUSH
                            && memtables >= QUIET_FLUSH_MIN_BYTES
                        {
                            flushed = true;
                            let spool = self.spool.clone();
                            tokio::task::spawn_blocking(move || {
                                if let Err(e) = spool.flush_memtables() {
                                    tracing::warn!(error = %e, "flushing quiet memtables failed");
                                }
                                crate::allocator::release_free_memory();
                            });
                        }
                    }
                    if let Some(rss) = resident_bytes() {
                        metrics::gauge!(RESIDENT_MEMORY).set(rss as f64);
                    }
                    // What is remembered of sent messages for late reports goes after its
                    // retention: one range deletion an hour.
                    if last_expiry.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                        last_expiry = Some(tokio::time::Instant::now());
                        let retention = self.config.bounce_processing.sent_retention.0;
                        let before = now_ms().saturating_sub(retention.as_millis() as u64);
                        let spool = self.spool.clone();
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = spool.expire_sent(before) {
                                tracing::warn!(error = %e, "could not expire remembered messages");
                            }
                        });
                    }
                    if last_compaction.elapsed() >= Duration::from_secs(15) {
                        last_compaction = tokio::time::Instant::now();
                        self.scheduler.compact();
                        let now = tokio::time::Instant::now();
                        self.outbound.shaper.evict_idle(now, rate_limiter::IDLE_EVICTION);
                        self.outbound.rates.evict_idle(now, rate_limiter::IDLE_EVICTION);
                        crate::allocator::release_free_memory();
                    }
                }
            }
        }
    }
}

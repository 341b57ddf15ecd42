//! Deferred generation (KumoMTA's `deferred_generation: true`): the inject request itself is
//! stored (synced) and answered at once, and this background task expands it later, through
//! the same path as a request expanded before its answer (`request::Engine::expand`).
//!
//! Requests are taken oldest first, one at a time, a chunk of recipients at a time. Each
//! chunk's messages and the request's progress marker are one spool write
//! (`queue::Spool::insert_generated`), so whenever the process stops, a restart resumes at
//! the marker and every recipient's message is stored exactly once. Between chunks the task
//! yields, sizes a chunk to the room left under nine tenths of `spool.max_queued` (the last
//! tenth stays for live injection), and waits (never drops) while the queue is that full,
//! the spool read-only or the suppression list unreadable.
//!
//! A recipient refused at expansion (suppressed, failing template, over a limit, DKIM) has
//! no message, and no accounting record type (contract §4) fits an event without one: it is
//! logged at warn and counted in `drover_deferred_generation_refused_total`. Recipients with
//! an invalid address were refused in the request's answer already and are skipped.

use crate::engine::{Engine, EngineError};
use crate::request::{self, Checked, ExpandError, Progress};
use crate::telemetry::{GENERATION_GENERATED, GENERATION_PENDING, GENERATION_REFUSED};
use queue::MessageId;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Recipients expanded per spool write: large enough to group-commit well, small enough
/// that live injection never waits long behind the generator.
pub(crate) const CHUNK: usize = 100;
/// How long the task waits before trying again when the queue is full or the suppression
/// list cannot be read.
const RETRY: Duration = Duration::from_millis(200);
/// The most messages the queue may hold for the generator to add more: nine tenths of
/// `spool.max_queued`, so a large stored request never fills the queue up to the limit that
/// makes live injection answer 503.
fn generator_cap(max_queued: usize) -> usize {
    max_queued - max_queued / 10
}

/// The format of a stored request (the first byte of its value).
const FORMAT: u8 = 1;

/// The generator's shared state (a field of the engine).
#[derive(Debug, Default)]
pub(crate) struct Generator {
    /// Wakes the task when a request is stored (a permit waits if the task is busy).
    wake: tokio::sync::Notify,
    /// Requests stored and not yet expanded.
    pending: AtomicU64,
}

impl Generator {
    fn set_pending(&self, count: u64) {
        self.pending.store(count, Ordering::SeqCst);
        metrics::gauge!(GENERATION_PENDING).set(count as f64);
    }

    fn stored(&self) {
        let count = self.pending.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!(GENERATION_PENDING).set(count as f64);
        self.wake.notify_one();
    }

    fn finished(&self) {
        let count = self
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map_or(0, |n| n - 1);
        metrics::gauge!(GENERATION_PENDING).set(count as f64);
    }
}

/// What is kept with a request beside its body.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The client's address, for the messages' `Received:` header.
    client: Option<IpAddr>,
    /// When the request was answered (ms since the epoch).
    accepted_ms: u64,
}

/// The stored value: the format byte, the envelope's length (u32, big-endian), the envelope
/// (JSON), then the request body as it came (gzip decoded).
fn encode(envelope: &Envelope, body: &[u8]) -> Vec<u8> {
    let head = serde_json::to_vec(envelope).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(5 + head.len() + body.len());
    out.push(FORMAT);
    out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    out
}

fn decode(stored: &[u8]) -> Result<(Envelope, &[u8]), String> {
    let (&format, rest) = stored.split_first().ok_or("empty record")?;
    if format != FORMAT {
        return Err(format!("unknown format {format}"));
    }
    let (len, rest) = rest.split_first_chunk::<4>().ok_or("truncated record")?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return Err("truncated envelope".into());
    }
    let (head, body) = rest.split_at(len);
    let envelope = serde_json::from_slice(head).map_err(|e| format!("envelope: {e}"))?;
    Ok((envelope, body))
}

/// How one request's expansion ended.
enum Done {
    /// Every recipient is expanded (or the request could not be used): drop it.
    Finished,
    /// The engine stops: the request stays and is resumed at the next start.
    Stopped,
    /// It could not be read now: try again (from its marker).
    Again,
}

impl Engine {
    /// Stores a checked inject request (its body as received) for deferred generation;
    /// returns its id once it is synced.
    pub(crate) async fn defer(
        &self,
        body: &[u8],
        client: Option<IpAddr>,
    ) -> Result<MessageId, EngineError> {
        if self.is_draining() {
            return Err(EngineError::Draining);
        }
        let id = MessageId::generate();
        let envelope = Envelope {
            client,
            accepted_ms: crate::clock::now_ms(),
        };
        self.spool
            .store_generation(id, encode(&envelope, body))
            .await?;
        self.generator.stored();
        Ok(id)
    }

    /// Requests stored for deferred generation and not yet expanded.
    pub fn generations_pending(&self) -> u64 {
        self.generator.pending.load(Ordering::SeqCst)
    }

    /// Counts the requests a previous run left (the gauge is right from the first scrape)
    /// and starts the generator task, which resumes them. Shutdown waits for the task, so
    /// it never writes into a closing spool.
    pub(crate) fn start_generator(self: &Arc<Self>) {
        match self.spool.generations(usize::MAX) {
            Ok(ids) => {
                if !ids.is_empty() {
                    tracing::info!(requests = ids.len(), "resuming deferred generation");
                }
                self.generator.set_pending(ids.len() as u64);
            }
            Err(e) => tracing::error!(error = %e, "cannot list the stored inject requests"),
        }
        self.crew.tracker.spawn(Arc::clone(self).generate());
    }

    /// The generator task: expands stored requests, oldest first, until the engine stops.
    async fn generate(self: Arc<Self>) {
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let next = match self.spool.generations(1) {
                Ok(ids) => ids.first().copied(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the stored inject requests; retrying");
                    if !self.pause(RETRY).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(id) = next else {
                tokio::select! {
                    _ = self.generator.wake.notified() => continue,
                    _ = self.cancel.cancelled() => return,
                }
            };
            match self.generate_one(id).await {
                Done::Stopped => return,
                Done::Again => continue,
                Done::Finished => {
                    // The delete is synced; should it fail, the request is found again and
                    // finishes again (its marker is at the end): nothing is expanded twice.
                    while let Err(e) = self.spool.finish_generation(id).await {
                        tracing::warn!(generation = %id, error = %e, "cannot drop an expanded request; retrying");
                        if !self.wait_for_spool().await {
                            return;
                        }
                    }
                    self.generator.finished();
                }
            }
        }
    }

    /// Sleeps `delay` unless the engine stops first; false when it stops.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// Waits until the spool takes writes again (at least a short pause, so a failing write
    /// is not retried in a tight loop); false when the engine stops.
    async fn wait_for_spool(&self) -> bool {
        tokio::select! {
            _ = async {
                self.spool.wait_writable().await;
                tokio::time::sleep(RETRY).await;
            } => !self.is_stopping(),
            _ = self.cancel.cancelled() => false,
        }
    }

    /// Expands one stored request from its marker to its last recipient.
    async fn generate_one(self: &Arc<Self>, id: MessageId) -> Done {
        let spool = self.spool.clone();
        let stored = match tokio::task::spawn_blocking(move || spool.generation(&id)).await {
            Ok(Ok(Some(stored))) => stored,
            // Gone meanwhile: nothing left to do for it.
            Ok(Ok(None)) => return Done::Finished,
            Ok(Err(e)) if e.is_transient() => {
                tracing::warn!(generation = %id, error = %e, "cannot read a stored request; retrying");
                return if self.wait_for_spool().await {
                    Done::Again
                } else {
                    Done::Stopped
                };
            }
            Ok(Err(e)) => {
                tracing::error!(generation = %id, error = %e, "dropping a stored request that cannot be read");
                return Done::Finished;
            }
            Err(e) => {
                tracing::error!(generation = %id, error = %e, "reading a stored request failed");
                return Done::Stopped;
            }
        };
        let (request, next) = stored;
        let (envelope, body) = match decode(&request) {
            Ok(decoded) => decoded,
            Err(why) => {
                tracing::error!(generation = %id, why, "dropping a stored request that does not decode");
                return Done::Finished;
            }
        };
        // The same checks as at acceptance but the recipient limit, so they pass: a request
        // that fails them anyway (written by another version) cannot be expanded at all.
        let checked = match request::check(body, &self.config, request::Stage::Stored) {
            Ok(checked) => checked,
            Err(refusal) => {
                tracing::warn!(generation = %id, ?refusal, "a stored request no longer passes its checks; its recipients are refused");
                metrics::counter!(GENERATION_REFUSED).increment(1);
                return Done::Finished;
            }
        };
        tracing::debug!(generation = %id, next, accepted_ms = envelope.accepted_ms, "expanding a stored request");
        self.generate_from(id, &checked, envelope.client, next)
            .await
    }

    /// Expands `checked`'s recipients from index `next` on, a chunk per spool write.
    async fn generate_from(
        self: &Arc<Self>,
        id: MessageId,
        checked: &Checked,
        client: Option<IpAddr>,
        mut next: u64,
    ) -> Done {
        let total = checked.recipients.len() as u64;
        while next < total {
            // A drain to a peer (scale-down) lets it finish: the messages move with the rest.
            if self.cancel.is_cancelled() || self.is_stopping() {
                return Done::Stopped;
            }
            let room =
                generator_cap(self.config.spool.max_queued).saturating_sub(self.scheduler.len());
            if room == 0 {
                if !self.pause(RETRY).await {
                    return Done::Stopped;
                }
                continue;
            }
            let start = usize::try_from(next).unwrap_or(usize::MAX);
            let end = start
                .saturating_add(CHUNK.min(room))
                .min(checked.recipients.len());
            // Invalid addresses were refused in the request's answer.
            let chunk: Vec<_> = checked.recipients[start..end]
                .iter()
                .filter(|r| crate::message::envelope_address(&r.email).is_ok())
                .cloned()
                .collect();
            let progress = Progress {
                id,
                previous: next,
                next: end as u64,
            };
            match self.expand(checked, chunk, client, Some(progress)).await {
                Ok(expanded) => {
                    metrics::counter!(GENERATION_GENERATED).increment(expanded.ids.len() as u64);
                    metrics::counter!(GENERATION_REFUSED)
                        .increment(expanded.failed_recipients.len() as u64);
                    for (recipient, why) in expanded.failed_recipients.iter().zip(&expanded.errors)
                    {
                        tracing::warn!(generation = %id, recipient, why, "deferred generation refused a recipient");
                    }
                    next = progress.next;
                }
                Err(ExpandError::Accept(EngineError::Draining)) => return Done::Stopped,
                Err(ExpandError::Accept(EngineError::Full(_))) => {
                    if !self.pause(RETRY).await {
                        return Done::Stopped;
                    }
                }
                Err(ExpandError::Suppression(e)) => {
                    tracing::warn!(generation = %id, error = %e, "cannot read the suppression list; deferred generation waits");
                    if !self.pause(RETRY).await {
                        return Done::Stopped;
                    }
                }
                Err(ExpandError::Accept(e)) => {
                    tracing::warn!(generation = %id, error = %e, "the spool refused generated messages; deferred generation waits");
                    if !self.wait_for_spool().await {
                        return Done::Stopped;
                    }
                }
            }
            // Live injection shares the runtime and the spool writer: let it in.
            tokio::task::yield_now().await;
        }
        Done::Finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::HashMap;
    use std::path::Path;

    /// An engine on the spool in `dir` whose mail goes to a closed loopback port (so nothing
    /// is delivered and nothing reaches beyond loopback), with room for `max_queued`.
    async fn engine(dir: &Path, max_queued: usize) -> Arc<Engine> {
        let mut config = Config::parse(&format!(
            "[spool]\nmax_queued = {max_queued}\n[retry]\nintervals = [\"1h\"]\n\
             [[route]]\ndomain = \"gen.test\"\nhosts = [\"127.0.0.1:1\"]\n"
        ))
        .unwrap();
        config.spool.path = dir.join("spool");
        config.delivery.ehlo_name = "drover.test".into();
        Engine::start(config).await.unwrap()
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("never: {what}");
    }

    /// Recipients of the messages in the spool, with how many messages each has.
    fn spooled(engine: &Engine) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for meta in engine.spool.scan() {
            *out.entry(meta.unwrap().recipient).or_default() += 1;
        }
        out
    }

    /// The recipients with more than one message.
    fn twice(spooled: &HashMap<String, usize>) -> Vec<&String> {
        spooled
            .iter()
            .filter(|(_, &n)| n > 1)
            .map(|(r, _)| r)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expansion_cut_short_resumes_without_duplicate_or_loss() {
        let dir = tempfile::tempdir().unwrap();
        let recipients: Vec<_> = (0..1000)
            .map(|i| serde_json::json!({"email": format!("r{i}@gen.test"), "metadata": {"n": i}}))
            .collect();
        let body = serde_json::json!({
            "envelope_sender": "bounces@example.com",
            "content": "From: a@example.com\r\nSubject: hi {{ name }}\r\n\r\nhello\r\n",
            "recipients": recipients,
            "deferred_generation": true,
        });
        let body = serde_json::to_vec(&body).unwrap();
        // Room for 100 messages, 90 of them for the generator: it stores a chunk or two, then
        // waits for room that never comes (nothing can be delivered).
        let first = engine(dir.path(), 100).await;
        let id = first.defer(&body, None).await.unwrap();
        let marker = |e: &Engine| e.spool.generation(&id).unwrap().map(|(_, next)| next);
        wait_until("a chunk expanded", || marker(&first) >= Some(90)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cut = marker(&first).unwrap();
        assert!(
            cut < 1000,
            "the whole request was expanded: nothing to resume"
        );
        assert_eq!(first.generations_pending(), 1);
        let before = spooled(&first);
        // Exactly the recipients before the marker, once each.
        assert_eq!(before.len() as u64, cut);
        assert_eq!(twice(&before), Vec::<&String>::new());
        assert!((0..cut).all(|i| before.contains_key(&format!("r{i}@gen.test"))));
        first.shutdown(Duration::from_secs(2)).await;
        drop(first);

        // Resumed at the next start, from the marker: the others, each once.
        let second = engine(dir.path(), 10_000).await;
        wait_until("the request done", || second.generations_pending() == 0).await;
        assert_eq!(marker(&second), None);
        let after = spooled(&second);
        assert_eq!(after.len(), 1000);
        assert_eq!(twice(&after), Vec::<&String>::new());
        assert!(second.spool.generations(usize::MAX).unwrap().is_empty());
        second.shutdown(Duration::from_secs(2)).await;
    }

    #[test]
    fn the_generator_leaves_live_injection_a_tenth_of_the_queue() {
        assert_eq!(generator_cap(10_000_000), 9_000_000);
        assert_eq!(generator_cap(100), 90);
        assert_eq!(generator_cap(5), 5);
    }

    #[test]
    fn a_stored_request_decodes_as_it_was_encoded() {
        let envelope = Envelope {
            client: Some("192.0.2.7".parse().unwrap()),
            accepted_ms: 42,
        };
        let stored = encode(&envelope, b"{\"a\":1}");
        let (back, body) = decode(&stored).unwrap();
        assert_eq!(back.client, envelope.client);
        assert_eq!(back.accepted_ms, 42);
        assert_eq!(body, b"{\"a\":1}");
        assert!(decode(&stored[..3]).is_err());
        assert!(decode(b"").is_err());
        assert!(decode(&[9, 0, 0, 0, 0]).is_err());
    }
}

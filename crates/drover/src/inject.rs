//! Injection: preparation (`prepare`: trace header, Message-ID, Date), stamping (VERP,
//! complaint and unsubscribe headers), DKIM signing, the synced spool write, Reception records,
//! queueing.

use crate::engine::{Engine, EngineError, Unsignable};
use crate::message::NewMessage;
use crate::request::Progress;
use crate::telemetry::{DKIM_SIGNATURES, RECEIVED};
use accounting::RecordType;
use queue::MessageMeta;
use std::sync::Arc;

/// Signs every message whose From domain has a key; all or nothing. Returns the batch with
/// signed bodies and how many were signed.
fn sign_all(
    signers: &dkim::Signers,
    mut messages: Vec<NewMessage>,
) -> Result<(Vec<NewMessage>, u64), Box<Unsignable>> {
    let mut signed = Vec::with_capacity(messages.len());
    let mut failures = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match signers.sign(&m.body) {
            Ok(body) => signed.push(body),
            Err(e) => {
                failures.push((i, e));
                signed.push(None);
            }
        }
    }
    if !failures.is_empty() {
        return Err(Box::new(Unsignable { failures, messages }));
    }
    let mut count = 0;
    for (m, body) in messages.iter_mut().zip(signed) {
        if let Some(body) = body {
            m.meta.size = body.len() as u64;
            m.body = body;
            count += 1;
        }
    }
    Ok((messages, count))
}

/// The `prepare` step for a batch (one date for all of it). A message is prepared once: a
/// batch handed back (unsignable) and injected again does not get a second trace header.
fn prepare_all(messages: &mut [NewMessage], by: &str) {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    for m in messages {
        if !m.prepared {
            let door = m.door.clone();
            crate::prepare::prepare(m, door.as_deref(), by, &date);
            m.prepared = true;
        }
    }
}

impl Engine {
    /// DKIM-signs messages (`[[dkim]]`), stores them (synced), writes their `Reception`
    /// records and queues them. All or nothing: on error nothing was queued. A message that a
    /// key applies to but that cannot be signed fails the batch with
    /// [`EngineError::Unsignable`], which hands the batch back: sending it unsigned would
    /// fail DMARC at the receiver, and retrying the same bytes fails the same way.
    pub async fn accept(
        self: &Arc<Self>,
        messages: Vec<NewMessage>,
        via: &'static str,
    ) -> Result<(), EngineError> {
        self.accept_with_progress(messages, via, None).await
    }

    /// [`Engine::accept`], moving a stored request's marker (deferred generation) in the same
    /// spool write as the messages, so a crash leaves both or neither.
    pub(crate) async fn accept_with_progress(
        self: &Arc<Self>,
        messages: Vec<NewMessage>,
        via: &'static str,
        progress: Option<Progress>,
    ) -> Result<(), EngineError> {
        // In a task of its own: the HTTP server drops a handler whose client hung up, and an
        // injection dropped between its spool write and its queueing would leave messages
        // stored but not queued until the next start, and its hold would keep the accounting
        // checkpoint back until then. A task runs to the end whoever waits for it.
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.accept_to_the_end(messages, via, progress).await })
            .await
            .map_err(|e| EngineError::Interrupted(e.to_string()))?
    }

    async fn accept_to_the_end(
        self: &Arc<Self>,
        messages: Vec<NewMessage>,
        via: &'static str,
        progress: Option<Progress>,
    ) -> Result<(), EngineError> {
        // Before the intake check: a drain that begins after it waits for this injection's
        // messages to be queued (`drain`).
        let accepting = self.drains.accepting();
        // A request stored before a scale-down began is still expanded: its messages are
        // drained with the rest rather than left behind unexpanded.
        let scaling_down = progress.is_none() && self.drains.scaling_down();
        if self.is_stopping() || scaling_down {
            return Err(EngineError::Draining);
        }
        let queued = self.scheduler.len();
        if queued + messages.len() > self.config.spool.max_queued {
            return Err(EngineError::Full(queued));
        }
        let count = messages.len() as u64;
        let started = std::time::Instant::now();
        // Before the spool write: the checkpoint stays behind until the Reception records
        // are down, so a crash in between is repaired at the next start (`finalizer`).
        // Reception time is taken after the hold, which that repair relies on.
        let hold = self.finalizer.hold();
        let mut messages = messages;
        let received = crate::clock::now_ms();
        for m in &mut messages {
            m.meta.received_ms = m.meta.received_ms.max(received);
        }
        let metas = match self.prepare_and_store(messages, via, count, progress).await {
            Ok(metas) => {
                self.observe_injection(via, count, started.elapsed());
                metas
            }
            Err(e) => {
                self.finalizer.release(hold);
                return Err(e);
            }
        };
        // Accepted means spooled: the caller is answered now, and the Reception records are
        // synced in the background, each message queued only after its record is down, so a
        // Reception never follows its message's final record. A crash in that moment loses
        // no line either: the hold keeps the checkpoint back and the next start writes it.
        let engine = Arc::clone(self);
        self.crew.tracker.spawn(async move {
            let records = metas
                .iter()
                .map(|m| engine.record(RecordType::Reception, m))
                .collect();
            match engine.accounting.record_all(records).await {
                Ok(()) => engine.finalizer.release(hold),
                // The messages are safely spooled and will be delivered; the hold stays, so
                // the next start writes the lines.
                Err(e) => tracing::error!(error = %e, "could not write Reception records; they are written at the next start"),
            }
            for m in &metas {
                engine.enqueue_new(m);
            }
            drop(accepting);
        });
        Ok(())
    }

    /// Stamps, signs and stores (synced) a batch; returns the stored messages' metadata.
    async fn prepare_and_store(
        &self,
        messages: Vec<NewMessage>,
        via: &'static str,
        count: u64,
        progress: Option<Progress>,
    ) -> Result<Vec<MessageMeta>, EngineError> {
        let policy = self.policy();
        let by = self.ehlo_name().to_owned();
        let (messages, signed) = if policy.signers.is_empty() && policy.stamper.is_noop() {
            let mut messages = messages;
            crate::blocking::off_the_runtime(|| prepare_all(&mut messages, &by));
            (messages, 0)
        } else {
            // RSA signing costs about a millisecond per message and stamping copies each
            // body: a large batch would stall the runtime's worker thread.
            let keys = self.feedback_keys.clone();
            let prepared = tokio::task::spawn_blocking(move || {
                let mut messages = messages;
                // One order for both doors: trace and missing headers, stamping, DKIM.
                prepare_all(&mut messages, &by);
                for m in &mut messages {
                    policy.stamper.apply(&keys, m);
                }
                sign_all(&policy.signers, messages)
            })
            .await
            .map_err(|e| EngineError::Signing(e.to_string()))?;
            match prepared {
                Ok(done) => done,
                Err(unsignable) => {
                    metrics::counter!(DKIM_SIGNATURES, "result" => "error")
                        .increment(unsignable.failures.len() as u64);
                    return Err(EngineError::Unsignable(unsignable));
                }
            }
        };
        let metas: Vec<MessageMeta> = messages.iter().map(|m| m.meta.clone()).collect();
        // With the feedback loop on, a Message-ID the client wrote is indexed, so a complaint
        // that returns only the headers can still be tied to its message (the ones Drover
        // writes, `<id@domain>`, name the message by themselves).
        let message_ids: Vec<(String, queue::MessageId)> =
            if self.config.bounce_processing.domains.is_empty() {
                Vec::new()
            } else {
                messages
                    .iter()
                    .filter_map(|m| {
                        let mid = crate::message::header_value(&m.body, "Message-ID")?;
                        let own = mid
                            .trim()
                            .trim_start_matches('<')
                            .split('@')
                            .next()
                            .is_some_and(|local| local == m.meta.id.to_string());
                        (!own).then_some((mid, m.meta.id))
                    })
                    .collect()
            };
        let stored = messages.into_iter().map(|m| (m.meta, m.body)).collect();
        match progress {
            None => self.spool.insert(stored).await?,
            Some(p) => {
                self.spool
                    .insert_generated(stored, p.id, p.previous, p.next)
                    .await?
            }
        }
        if !message_ids.is_empty() {
            if let Err(e) = self.spool.index_message_ids(message_ids).await {
                tracing::warn!(error = %e, "could not index Message-IDs; reports may go unmatched");
            }
        }
        metrics::counter!(RECEIVED, "via" => via).increment(count);
        metrics::counter!(DKIM_SIGNATURES, "result" => "signed").increment(signed);
        metrics::counter!(DKIM_SIGNATURES, "result" => "unsigned").increment(count - signed);
        Ok(metas)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::engine::Engine;
    use crate::message::{NewMessage, Origin};
    use queue::MessageId;
    use std::time::Duration;

    // One thread: the first poll cannot race a worker that finishes the whole injection.
    #[tokio::test(flavor = "current_thread")]
    async fn an_injection_whose_caller_gives_up_is_still_queued() {
        let dir = tempfile::tempdir().unwrap();
        // Mail goes to a closed loopback port and waits an hour to retry: it stays queued.
        let mut config = Config::parse(
            "[retry]\nintervals = [\"1h\"]\n[[route]]\ndomain = \"gone.test\"\nhosts = [\"127.0.0.1:1\"]\n",
        )
        .unwrap();
        config.spool.path = dir.path().join("spool");
        config.delivery.ehlo_name = "drover.test".into();
        let engine = Engine::start(config).await.unwrap();
        // After the start-up reload, which would otherwise queue what it finds stored.
        let start = std::time::Instant::now();
        while engine.reloading.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(start.elapsed() < Duration::from_secs(10), "still reloading");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let origin = Origin {
            sender: "s@example.com".into(),
            campaign: None,
            tenant: None,
            received_ms: crate::clock::now_ms(),
            priority: Default::default(),
            door: None,
            supplemental: None,
        };
        let message = NewMessage::new(
            MessageId::generate(),
            &origin,
            "a@gone.test".into(),
            "gone.test".into(),
            b"Subject: s\r\n\r\nx\r\n".to_vec(),
        );
        let id = message.meta.id;
        // Polled once and dropped, as the HTTP server drops the handler of a client that
        // hung up while its messages were being written.
        let mut injection = Box::pin(engine.accept(vec![message], "http"));
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(injection.as_mut(), cx))
        })
        .await;
        assert!(
            first.is_pending(),
            "the write should still have been under way"
        );
        drop(injection);
        let start = std::time::Instant::now();
        while !(engine.scheduler.len() == 1 && engine.spool.meta(&id).ok().flatten().is_some()) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "stored {:?}, queued {}",
                engine.spool.meta(&id).ok().flatten().is_some(),
                engine.scheduler.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

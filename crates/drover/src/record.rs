//! Recording outcomes: the record an attempt earned, then the message rescheduled or ended
//! (exactly one final record, see `finals`).

use crate::clock::now_ms;
use crate::engine::{Engine, EngineError};
use crate::outcome::{retry_delay, Outcome, Verdict};
use accounting::{Accounting, BounceCategory, Record, RecordType};
use queue::{MessageId, MessageMeta};
use std::time::Duration;

impl Engine {
    pub(crate) fn requeue_or_forget(&self, id: MessageId, next: Option<MessageMeta>) {
        match next {
            Some(meta) => self.enqueue(&meta),
            None => self.scheduler.finish(id),
        }
    }

    /// Writes the record an attempt earned and moves the message on: removed when final,
    /// expired, or returned with its next due time for the caller to schedule.
    pub(crate) async fn conclude(
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
            let bounced = (kind == RecordType::Bounce).then(|| (meta.clone(), outcome.category));
            self.finalize(meta, vec![record]).await;
            if let Some((meta, category)) = bounced {
                self.suppress_after_bounce(&meta, category).await;
            }
            return None;
        }
        // Up to 10 % jitter spreads retries of a large batch over time instead of a spike.
        let delay = retry_delay(
            &self.config.retry,
            meta.attempts,
            outcome.category,
            rand::random::<f64>() * 0.1,
        );
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
    ) -> Result<(), EngineError> {
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
}

//! Recording outcomes: the record an attempt earned, then the message rescheduled or ended
//! (exactly one final record, see `finalizer`).

use crate::clock::now_ms;
use crate::engine::Engine;
use crate::outcome::{retry_delay, Outcome, Verdict};
use accounting::{BounceCategory, RecordType};
use queue::{MessageId, MessageMeta};

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
        self.observe_outcome(site, &meta.domain, kind, outcome.category);
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
            self.finalizer.finalize(&meta, vec![record]).await;
            if kind == RecordType::Bounce {
                self.suppress_after_bounce(&meta, outcome.category).await;
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
            self.observe_records(std::slice::from_ref(&expired));
            self.finalizer.finalize(&meta, vec![record, expired]).await;
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
}

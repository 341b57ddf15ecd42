//! Start-up: what the spool holds goes back on the schedule, and what was recorded as
//! finished just before the last stop is removed instead of delivered again.

use crate::clock::now_ms;
use crate::engine::{state_u64, Engine, EngineError};
use queue::MessageId;

/// How many due messages a restart schedules before the full reload scan.
const DUE_FIRST: usize = 100_000;

impl Engine {
    pub(crate) fn reload_spool(&self) -> Result<(), EngineError> {
        let mut count = 0u64;
        // What is due goes first, straight from the schedule index, so delivery restarts in
        // moments however large the queue; the full scan then adds the rest (messages already
        // scheduled are left as they are).
        for id in self.spool.due_ids(now_ms(), DUE_FIRST)? {
            if let Some(meta) = self.spool.meta(&id)? {
                self.enqueue_new(&meta);
            }
        }
        for meta in self.spool.scan() {
            if self.cancel.is_cancelled() {
                break;
            }
            match meta {
                Ok(meta) => {
                    if self.enqueue_new(&meta) {
                        count += 1;
                    }
                }
                // One bad record must not keep every other message from being delivered.
                Err(e) => tracing::error!(error = %e, "skipping an unreadable spool record"),
            }
        }
        if count > 0 {
            tracing::info!(messages = count, "reloaded the spool");
        }
        Ok(())
    }

    /// Removes the spooled messages that already have a final record after the stored
    /// accounting checkpoint (the engine stopped between a record and its message's removal),
    /// and stores a checkpoint if there was none. Returns the checkpoint in force.
    pub(crate) async fn settle_recorded_finals(&self) -> Result<u64, EngineError> {
        let stored = self
            .spool
            .state(crate::finals::CHECKPOINT_KEY)?
            .and_then(|v| state_u64(&v));
        let Some(checkpoint) = stored else {
            // A new spool: none of its messages can have a record before this point.
            let len = self.accounting.synced_len();
            self.store_checkpoint(len).await?;
            return Ok(len);
        };
        let path = self.accounting.path().to_owned();
        let recorded = accounting::final_ids_since(&path, checkpoint).map_err(|source| {
            EngineError::Accounting(accounting::AccountingError::Io { path, source })
        })?;
        let mut removed = 0u64;
        for id in recorded
            .iter()
            .filter_map(|id| id.parse::<MessageId>().ok())
        {
            if let Some(meta) = self.spool.meta(&id)? {
                self.spool.remove(id, meta.due_ms).await?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed messages whose final record was written before the last stop"
            );
        }
        Ok(checkpoint)
    }
}

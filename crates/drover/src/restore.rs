//! Start-up: what the spool holds goes back on the schedule, and what was recorded as
//! finished just before the last stop is removed instead of delivered again (see `finalizer`).

use crate::clock::now_ms;
use crate::engine::{Engine, EngineError};
use crate::finalizer::Settled;
use accounting::RecordType;
use queue::MessageMeta;

/// How many due messages a restart schedules before the full reload scan.
const DUE_FIRST: usize = 100_000;

impl Engine {
    /// Runs on the blocking pool (it streams the whole spool).
    pub(crate) fn reload_spool(&self, settled: &Settled) -> Result<(), EngineError> {
        let mut count = 0u64;
        let mut rebuilt = std::collections::HashSet::new();
        let runtime = tokio::runtime::Handle::current();
        // A message spooled just before a crash may lack its Reception record: it is
        // written now, before the message can be delivered (and earn its final record).
        let mut admit = |meta: &MessageMeta| {
            if settled.missing_reception(meta) && !rebuilt.contains(&meta.id) {
                let record = self.record(RecordType::Reception, meta);
                match runtime.block_on(self.accounting.record(record)) {
                    Ok(()) => {
                        rebuilt.insert(meta.id);
                    }
                    Err(e) => {
                        tracing::error!(id = %meta.id, error = %e, "could not write a lost Reception record")
                    }
                }
            }
            self.enqueue_new(meta)
        };
        // What is due goes first, straight from the schedule index, so delivery restarts in
        // moments however large the queue; the full scan then adds the rest (messages already
        // scheduled are left as they are).
        for id in self.spool.due_ids(now_ms(), DUE_FIRST)? {
            if let Some(meta) = self.spool.meta(&id)? {
                admit(&meta);
            }
        }
        for meta in self.spool.scan() {
            if self.cancel.is_cancelled() {
                break;
            }
            match meta {
                Ok(meta) => {
                    if admit(&meta) {
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
        if !rebuilt.is_empty() {
            tracing::info!(
                messages = rebuilt.len(),
                "wrote the Reception records a crash lost after their messages were spooled"
            );
        }
        Ok(())
    }
}

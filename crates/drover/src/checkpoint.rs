//! Keeping the accounting checkpoint (see `finals`): advanced about once a second and at
//! shutdown, stored in the spool's state column family.

use crate::engine::{Engine, EngineError};
use std::sync::Arc;
use std::time::Duration;

/// How often the accounting checkpoint (see `finals`) is advanced.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

impl Engine {
    pub(crate) async fn store_checkpoint(&self, offset: u64) -> Result<(), EngineError> {
        self.spool
            .put_state(crate::finals::CHECKPOINT_KEY, offset.to_be_bytes().to_vec())
            .await?;
        Ok(())
    }

    /// Advances the accounting checkpoint about once a second, so a restart reads only the
    /// last moments of the accounting file.
    pub(crate) async fn keep_checkpoint(self: Arc<Self>, mut stored: u64) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            }
            stored = self.advance_checkpoint(stored).await;
        }
    }

    pub(crate) async fn advance_checkpoint(&self, stored: u64) -> u64 {
        // In this order: see `Ledger::checkpoint`.
        let synced = self.accounting.synced_len();
        let next = self.ledger.checkpoint(synced);
        if next <= stored {
            return stored;
        }
        match self.store_checkpoint(next).await {
            Ok(()) => next,
            Err(e) => {
                tracing::debug!(error = %e, "could not store the accounting checkpoint");
                stored
            }
        }
    }
}

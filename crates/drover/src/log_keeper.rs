//! Retention of the accounting log: closed segments past `accounting.retain_age` /
//! `retain_size` are deleted, but never one that start-up settlement may read, and one a
//! webhook has not sent yet only within `accounting.webhook_hold`.

use crate::engine::Engine;
use std::sync::Arc;
use std::time::Duration;

/// How often retention is applied.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

impl Engine {
    /// Applies retention once a minute until shutdown.
    pub(crate) async fn keep_log(self: Arc<Self>) {
        loop {
            self.prune_log().await;
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
            }
        }
    }

    async fn prune_log(&self) {
        let settle_from = self.finalizer.stored_position();
        let read_from = self
            .webhooks
            .slowest_cursor()
            .map_or(settle_from, |cursor| cursor.min(settle_from));
        let retention = self.config.accounting.retention();
        let accounting = self.accounting.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            accounting.prune(settle_from, read_from, &retention)
        })
        .await;
        match pruned {
            Ok(Ok(pruned)) if !pruned.deleted.is_empty() => {
                tracing::info!(segments = ?pruned.deleted, "deleted accounting segments past retention");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "applying accounting retention failed"),
            Err(e) => tracing::warn!(error = %e, "applying accounting retention failed"),
        }
    }
}

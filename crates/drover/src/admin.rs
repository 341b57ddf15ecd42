//! Operator actions: durable holds by domain or campaign, retry-now, purge.

use crate::clock::now_ms;
use crate::engine::{state_u64, Engine, EngineError};
use accounting::{RecordType, Response};
use queue::{MessageId, MessageMeta, Selector};
use std::time::Duration;

const SUSPEND_PREFIX: &str = "suspend/";
/// Messages a purge records and deletes per write.
const PURGE_CHUNK: usize = 10_000;

/// What an operator's request names: exactly one of a domain (lower-cased) and a campaign,
/// empty counting as absent. Both admin APIs (Drover's and KumoMTA's) read it so.
pub(crate) fn selector(domain: Option<&str>, campaign: Option<&str>) -> Result<Selector, String> {
    let domain = domain.map(str::trim).filter(|d| !d.is_empty());
    let campaign = campaign.map(str::trim).filter(|c| !c.is_empty());
    match (domain, campaign) {
        // Lists show a source's own queue as `domain|source`; holds and backoffs of it are
        // named (and lifted) by the domain alone.
        (Some(d), None) if d.contains('|') => Err(
            "domain: name the domain or site without the |source part; it acts on every source's queue"
                .into(),
        ),
        (Some(d), None) => Ok(Selector::Domain(d.to_ascii_lowercase())),
        (None, Some(c)) => Ok(Selector::Campaign(c.to_owned())),
        _ => Err("give exactly one of domain and campaign".into()),
    }
}

/// An operator's `duration` (`"2h"`).
pub(crate) fn duration(text: Option<&str>) -> Result<Option<Duration>, String> {
    text.map(|d| humantime::parse_duration(d).map_err(|e| format!("duration: {e}")))
        .transpose()
}

fn suspend_key(selector: &Selector) -> String {
    match selector {
        Selector::Domain(d) => format!("{SUSPEND_PREFIX}domain/{d}"),
        Selector::Campaign(c) => format!("{SUSPEND_PREFIX}campaign/{c}"),
    }
}

fn selector_from_key(key: &str) -> Option<Selector> {
    let rest = key.strip_prefix(SUSPEND_PREFIX)?;
    if let Some(d) = rest.strip_prefix("domain/") {
        return Some(Selector::Domain(d.to_owned()));
    }
    rest.strip_prefix("campaign/")
        .map(|c| Selector::Campaign(c.to_owned()))
}

impl Engine {
    pub(crate) fn load_suspensions(&self) -> Result<(), EngineError> {
        let now = now_ms();
        for (key, value) in self.spool.states(SUSPEND_PREFIX)? {
            let Some(selector) = selector_from_key(&key) else {
                continue;
            };
            let until = state_u64(&value).unwrap_or(u64::MAX);
            if until > now {
                self.scheduler.suspend(&selector, until, now);
            }
        }
        Ok(())
    }

    /// Holds a domain or campaign (durably) until `duration` has passed, or until resumed.
    pub async fn suspend(
        &self,
        selector: &Selector,
        duration: Option<Duration>,
    ) -> Result<u64, EngineError> {
        let now = now_ms();
        let until = duration.map_or(u64::MAX, |d| now.saturating_add(d.as_millis() as u64));
        self.spool
            .put_state(&suspend_key(selector), until.to_be_bytes().to_vec())
            .await?;
        self.scheduler.suspend(selector, until, now);
        Ok(until)
    }

    /// Lifts a hold (and, for a destination, an automation backoff); returns whether there
    /// was one.
    pub async fn resume(&self, selector: &Selector) -> Result<bool, EngineError> {
        self.spool.delete_state(&suspend_key(selector)).await?;
        let held = self.scheduler.resume(selector, now_ms());
        let backed_off = match selector {
            Selector::Domain(name) => self.outbound.shaper.end_backoff(name),
            Selector::Campaign(_) => false,
        };
        Ok(held || backed_off)
    }

    /// Destinations (site, or `site|source`) whose automation backoff is in force.
    pub fn backing_off(&self) -> Vec<String> {
        self.outbound.shaper.backing_off()
    }

    /// Makes the selected deferred messages due now; returns how many.
    pub fn retry_now(&self, selector: &Selector) -> usize {
        self.scheduler.retry_now(selector, now_ms())
    }

    /// Removes the selected queued messages, each with an `AdminBounce` record; returns how
    /// many. Messages in flight finish their attempt first. The schedule gives the messages
    /// up in one pass; then, outside its lock, records are written and messages deleted a
    /// chunk at a time, each chunk one group of records and one spool write. If a chunk
    /// cannot be recorded, it and the rest go back on the schedule, untouched.
    pub async fn purge(&self, selector: &Selector) -> Result<usize, EngineError> {
        let ids = self.scheduler.take(selector);
        let mut purged = 0;
        for (i, chunk) in ids.chunks(PURGE_CHUNK).enumerate() {
            match self.purge_chunk(chunk).await {
                Ok(n) => purged += n,
                Err(e) => {
                    self.restore_ids(&ids[i * PURGE_CHUNK..]).await;
                    tracing::error!(error = %e, purged, "purge stopped; the rest stays queued");
                    return Err(e);
                }
            }
        }
        Ok(purged)
    }

    async fn purge_chunk(&self, ids: &[MessageId]) -> Result<usize, EngineError> {
        let metas = self.read_metas(ids.to_vec()).await?;
        let records = metas
            .iter()
            .map(|meta| {
                let mut r = self.record(RecordType::AdminBounce, meta);
                r.response = Some(Response {
                    code: 550,
                    enhanced_code: Some("5.0.0".into()),
                    text: "purged by the operator".into(),
                });
                // Not a receiver's verdict: no category (contract §4 gives one only to
                // Bounce, AsyncBounce, Expiration and TransientFailure).
                r
            })
            .collect();
        let count = metas.len();
        self.finalizer.finalize_group(&metas, records).await?;
        Ok(count)
    }

    /// Reads the metadata of `ids` on the blocking pool; ids no longer spooled are left out.
    pub(crate) async fn read_metas(
        &self,
        ids: Vec<MessageId>,
    ) -> Result<Vec<MessageMeta>, EngineError> {
        let spool = self.spool.clone();
        let read = tokio::task::spawn_blocking(move || {
            ids.iter()
                .filter_map(|id| spool.meta(id).transpose())
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| EngineError::Config(format!("spool reader failed: {e}")))?;
        Ok(read?)
    }

    /// Puts messages taken off the schedule back on it, as the spool has them.
    async fn restore_ids(&self, ids: &[MessageId]) {
        for chunk in ids.chunks(PURGE_CHUNK) {
            match self.read_metas(chunk.to_vec()).await {
                Ok(metas) => {
                    for meta in &metas {
                        self.enqueue_new(meta);
                    }
                }
                // Still in the spool: the next start queues them again.
                Err(e) => tracing::error!(error = %e, "could not requeue messages a purge left"),
            }
        }
    }
}

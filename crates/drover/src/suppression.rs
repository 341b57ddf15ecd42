//! The suppression list (contract §3): per tenant, addresses never mailed again. Injection
//! refuses them; hard bounces of the configured categories add them (and, as the feedback
//! loop grows, complaints and unsubscribes); the admin API and `drover suppression` manage it.
//! The entries live in the spool's database (`queue::Spool::suppress`).

use crate::clock::now_ms;
use crate::engine::{Engine, EngineError};
use accounting::BounceCategory;
use queue::{MessageMeta, Suppression, SuppressionKey};

/// The categories of a synchronous bounce that suppress its recipient when
/// `suppression.bounce_categories` is not set.
pub(crate) const DEFAULT_BOUNCE_CATEGORIES: &[BounceCategory] = &[
    BounceCategory::BadMailbox,
    BounceCategory::BadDomain,
    BounceCategory::InactiveMailbox,
];

impl Engine {
    /// Which of `addresses` are on `tenant`'s list, in order: one batched read, off the
    /// async threads.
    pub(crate) async fn suppressed(
        &self,
        tenant: Option<&str>,
        addresses: &[String],
    ) -> Result<Vec<Option<Suppression>>, EngineError> {
        if addresses.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<SuppressionKey> = addresses
            .iter()
            .map(|a| SuppressionKey::new(tenant, a))
            .collect();
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.suppressed(&keys))
            .await
            .map_err(|e| EngineError::Config(format!("spool reader failed: {e}")))?
            .map_err(EngineError::from)
    }

    /// Splits `items` into those that may be mailed and those whose address (`email`) is on
    /// `tenant`'s list, with the entry that suppresses each.
    pub(crate) async fn split_suppressed<T>(
        &self,
        tenant: Option<&str>,
        items: Vec<T>,
        email: impl Fn(&T) -> &str,
    ) -> Result<(Vec<T>, Vec<(T, Suppression)>), EngineError> {
        let addresses: Vec<String> = items.iter().map(|i| email(i).to_owned()).collect();
        let found = self.suppressed(tenant, &addresses).await?;
        let mut allowed = Vec::with_capacity(items.len());
        let mut refused = Vec::new();
        for (item, entry) in items.into_iter().zip(found) {
            match entry {
                Some(entry) => refused.push((item, entry)),
                None => allowed.push(item),
            }
        }
        Ok((allowed, refused))
    }

    /// Adds entries (admin, or the feedback loop); returns once synced.
    pub async fn suppress(
        &self,
        entries: Vec<(SuppressionKey, Suppression)>,
    ) -> Result<(), EngineError> {
        let sources: Vec<String> = entries.iter().map(|(_, e)| e.source.clone()).collect();
        self.spool.suppress(entries).await?;
        for source in sources {
            metrics::counter!(crate::telemetry::SUPPRESSIONS, "source" => source).increment(1);
        }
        Ok(())
    }

    /// Removes entries; returns once synced.
    pub async fn unsuppress(&self, keys: Vec<SuppressionKey>) -> Result<(), EngineError> {
        Ok(self.spool.unsuppress(keys).await?)
    }

    /// A page of the list: `tenant`'s entries (every tenant's with `all`), after `after`.
    pub fn suppressions(
        &self,
        tenant: Option<&str>,
        all: bool,
        after: Option<&SuppressionKey>,
        limit: usize,
    ) -> Result<Vec<(SuppressionKey, Suppression)>, EngineError> {
        Ok(self.spool.suppressions(tenant, all, after, limit)?)
    }

    /// Whether a bounce of `category` suppresses its recipient (`suppression.bounce_categories`).
    pub(crate) fn suppresses(&self, category: BounceCategory) -> bool {
        self.config
            .suppression
            .bounce_categories
            .as_deref()
            .map_or_else(
                || DEFAULT_BOUNCE_CATEGORIES.contains(&category),
                |list| list.contains(&category),
            )
    }

    /// After a synchronous bounce: suppresses the recipient when its category is one of
    /// `suppression.bounce_categories`. A failure is logged, not fatal: the bounce is
    /// recorded, and the next bounce tries again.
    pub(crate) async fn suppress_after_bounce(&self, meta: &MessageMeta, category: BounceCategory) {
        if !self.suppresses(category) {
            return;
        }
        let entry = Suppression {
            source: "bounce".into(),
            reason: category.as_str().into(),
            at_ms: now_ms(),
            message_id: Some(meta.id.to_string()),
        };
        let key = SuppressionKey::new(meta.tenant.as_deref(), &meta.recipient);
        if let Err(e) = self.spool.suppress(vec![(key, entry)]).await {
            tracing::error!(id = %meta.id, error = %e, "could not suppress a bounced recipient");
        } else {
            metrics::counter!(crate::telemetry::SUPPRESSIONS, "source" => "bounce").increment(1);
        }
    }
}

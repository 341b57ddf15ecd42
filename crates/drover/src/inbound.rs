//! What comes back: unsubscribes (one-click POSTs, unsubscribe mail) and, through the SMTP
//! listener, reports (DSN, ARF, text bounces). Each becomes a record (`Unsubscribe`,
//! `AsyncBounce`, `Complaint`) and, where it should, a suppression.

use crate::clock::now_ms;
use crate::engine::{Engine, EngineError};
use accounting::{Record, RecordType, ReportInfo};
use feedback::token::Unsubscribe;
use queue::{MessageId, Suppression, SuppressionKey};

/// Why a one-click request was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnsubscribeError {
    /// The token is not one Drover wrote (or its key was retired): nothing happens.
    #[error("unknown link")]
    UnknownLink,
    /// The list or the record could not be written; the caller may retry.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Engine {
    /// Reads a one-click token; `None` when it is not one Drover wrote.
    pub fn unsubscribe_token(&self, token: &str) -> Option<Unsubscribe> {
        feedback::token::decode(&self.feedback_keys, token).ok()
    }

    /// A one-click unsubscribe (RFC 8058) with `token`: the recipient goes on its tenant's
    /// suppression list and an `Unsubscribe` record is written. A second click is harmless
    /// (the entry is rewritten, a second record says it happened again).
    pub async fn one_click_unsubscribe(
        &self,
        token: &str,
    ) -> Result<Unsubscribe, UnsubscribeError> {
        let u = self
            .unsubscribe_token(token)
            .ok_or(UnsubscribeError::UnknownLink)?;
        self.record_unsubscribe(&u, None).await?;
        Ok(u)
    }

    /// Suppresses `u`'s recipient for its tenant and writes its `Unsubscribe` record.
    pub(crate) async fn record_unsubscribe(
        &self,
        u: &Unsubscribe,
        inbound_id: Option<String>,
    ) -> Result<(), EngineError> {
        let id = MessageId::from_slice(&u.id)
            .map(|id| id.to_string())
            .unwrap_or_default();
        self.suppress(vec![(
            SuppressionKey::new(u.tenant.as_deref(), &u.recipient),
            Suppression {
                source: "unsubscribe".into(),
                reason: if inbound_id.is_some() {
                    "mail"
                } else {
                    "one-click"
                }
                .into(),
                at_ms: now_ms(),
                message_id: Some(id.clone()),
            },
        )])
        .await?;
        let mut r = Record::new(RecordType::Unsubscribe, id);
        r.recipient = u.recipient.clone();
        r.domain = u
            .recipient
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        r.tenant = u.tenant.clone();
        r.campaign = u.campaign.clone();
        r.report = Some(ReportInfo {
            matched: true,
            reporting_mta: None,
            original_message_id: None,
            inbound_id,
        });
        self.accounting.record(r).await?;
        Ok(())
    }
}

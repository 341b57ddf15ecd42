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
        // The token names the message but does not carry its metadata: the sent index does.
        let metadata = MessageId::from_slice(&u.id)
            .ok()
            .and_then(|id| self.spool.sent(&id).ok().flatten())
            .and_then(|sent| sent.metadata);
        self.record_unsubscribe(&u, metadata, None).await?;
        Ok(u)
    }

    /// Suppresses `u`'s recipient for its tenant and writes its `Unsubscribe` record.
    pub(crate) async fn record_unsubscribe(
        &self,
        u: &Unsubscribe,
        metadata: Option<serde_json::Value>,
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
        r.metadata = metadata;
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

/// What an inbound mail turned out to be, for the caller's reply and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Records were written (how many), some tied to messages.
    Recorded(usize),
    /// An auto-reply: counted, never a bounce.
    AutoReply,
}

/// A message a report was tied to.
struct Matched {
    id: MessageId,
    recipient: String,
    tenant: Option<String>,
    campaign: Option<String>,
    metadata: Option<serde_json::Value>,
}

/// The message id in a Message-ID Drover generated (`<uuid@sender domain>`).
fn id_from_message_id(message_id: &str) -> Option<MessageId> {
    let local = message_id
        .trim()
        .trim_start_matches('<')
        .split('@')
        .next()?;
    local.parse().ok()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Engine {
    /// The message behind `id`, with what is remembered of it (recipient, tenant, campaign).
    fn remembered(&self, id: MessageId, recipient: Option<String>) -> Option<Matched> {
        let sent = self.spool.sent(&id).ok().flatten()?;
        Some(Matched {
            id,
            recipient: recipient.unwrap_or(sent.recipient),
            tenant: sent.tenant,
            campaign: sent.campaign,
            metadata: sent.metadata,
        })
    }

    /// The message a supplemental trace header names, if Drover sent that message to that
    /// recipient: the header is not signed, so it only counts when both agree.
    fn by_trace_ref(&self, trace: &feedback::trace_ref::TraceRef) -> Option<Matched> {
        let id: MessageId = trace.id.as_deref()?.parse().ok()?;
        let m = self.remembered(id, None)?;
        let named = trace.recipient.as_deref()?;
        m.recipient.eq_ignore_ascii_case(named).then_some(m)
    }

    /// Ties a report to a message: first by a tagged identifier (the VERP address it was sent
    /// to, the VERP Return-Path or the unsubscribe token among the returned headers), then,
    /// unless a VERP address was forged, by the untagged ones Drover wrote (ENVID, a
    /// Message-ID it generated).
    fn match_report(
        &self,
        rcpts: &[String],
        report: &reports::Report,
        trace: Option<&feedback::trace_ref::TraceRef>,
    ) -> Option<Matched> {
        let keys = &self.feedback_keys;
        let mut forged = false;
        for r in rcpts {
            match feedback::verp::decode(keys, r) {
                Ok(v) => {
                    if let Ok(id) = MessageId::from_slice(&v.id) {
                        return self.remembered(id, v.recipient);
                    }
                }
                Err(feedback::FeedbackError::BadTag { .. }) => forged = true,
                Err(_) => {}
            }
        }
        if forged {
            return None;
        }
        let returned = &report.returned_headers;
        if let Some(v) =
            header(returned, "Return-Path").and_then(|rp| feedback::verp::decode(keys, rp).ok())
        {
            if let Ok(id) = MessageId::from_slice(&v.id) {
                return self.remembered(id, v.recipient);
            }
        }
        if let Some(u) = header(returned, "List-Unsubscribe").and_then(|list| {
            list.split(',')
                .map(|e| e.trim().trim_start_matches('<').trim_end_matches('>'))
                .filter(|e| e.starts_with("http"))
                .find_map(|url| self.unsubscribe_token(url.rsplit('/').next().unwrap_or("")))
        }) {
            if let Ok(id) = MessageId::from_slice(&u.id) {
                let metadata = self.remembered(id, None).and_then(|m| m.metadata);
                return Some(Matched {
                    id,
                    recipient: u.recipient,
                    tenant: u.tenant,
                    campaign: u.campaign,
                    metadata,
                });
            }
        }
        if let Some(m) = trace.and_then(|t| self.by_trace_ref(t)) {
            return Some(m);
        }
        let by_envid = report
            .original_envelope_id
            .as_deref()
            .and_then(|e| e.trim().parse::<MessageId>().ok());
        let by_message_id = report
            .returned_message_id
            .as_deref()
            .and_then(id_from_message_id);
        // A Message-ID the client wrote, through the index kept at injection.
        let by_index = report
            .returned_message_id
            .as_deref()
            .and_then(|mid| self.spool.message_id(mid).ok().flatten());
        by_envid
            .into_iter()
            .chain(by_message_id)
            .chain(by_index)
            .find_map(|id| self.remembered(id, None))
    }

    /// Keeps a copy of an inbound mail nobody could tie to a message, next to the accounting
    /// file (`inbound/<inbound id>.eml`), so nothing that came back is lost.
    async fn keep_inbound(&self, inbound_id: &str, data: &[u8]) {
        let dir = self.accounting.path().parent().map_or_else(
            || std::path::PathBuf::from("inbound"),
            |p| p.join("inbound"),
        );
        let path = dir.join(format!("{inbound_id}.eml"));
        let data = data.to_vec();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, data)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(inbound_id, "could not keep a copy of an unmatched report");
        }
    }

    /// One mail to a bounce domain (`rcpts` are its recipients there): parsed, tied to its
    /// message, recorded (`AsyncBounce`, `Complaint`, `Unsubscribe`; `report.matched` false
    /// when it could not be tied, with what could be parsed), and the recipient suppressed
    /// where it should be. Unmatched mail is also kept as a file.
    pub(crate) async fn receive_report(
        &self,
        rcpts: &[String],
        data: Vec<u8>,
    ) -> Result<Received, EngineError> {
        let inbound_id = MessageId::generate().to_string();
        let (report, data) = tokio::task::spawn_blocking(move || (reports::parse(&data), data))
            .await
            .map_err(|e| EngineError::Config(format!("report parser failed: {e}")))?;
        metrics::counter!(crate::telemetry::INBOUND, "kind" => kind_name(report.kind)).increment(1);
        // Mail to an unsubscribe address (`u1.`), whatever it says.
        let unsubscribe = rcpts.iter().find_map(|r| {
            feedback::verp::decode(&self.feedback_keys, r)
                .ok()
                .filter(|v| v.kind == feedback::verp::Kind::Unsubscribe)
        });
        if let Some(v) = unsubscribe {
            if let Ok(id) = MessageId::from_slice(&v.id) {
                let m = self.remembered(id, v.recipient.clone());
                let u = Unsubscribe {
                    id: v.id,
                    recipient: m
                        .as_ref()
                        .map(|m| m.recipient.clone())
                        .or(v.recipient)
                        .unwrap_or_default(),
                    tenant: m.as_ref().and_then(|m| m.tenant.clone()),
                    campaign: m.as_ref().and_then(|m| m.campaign.clone()),
                };
                if !u.recipient.is_empty() {
                    let metadata = m.and_then(|m| m.metadata);
                    self.record_unsubscribe(&u, metadata, Some(inbound_id))
                        .await?;
                    return Ok(Received::Recorded(1));
                }
            }
        }
        if report.kind == reports::Kind::AutoReply {
            return Ok(Received::AutoReply);
        }
        // KumoMTA's supplemental header among the returned headers (any `X-` field with
        // its marker): a hint to the message, and what an unmatched report can still say.
        let trace = feedback::trace_ref::find(
            report
                .returned_headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        );
        let matched = self.match_report(rcpts, &report, trace.as_ref());
        let info = ReportInfo {
            matched: matched.is_some(),
            reporting_mta: report.reporting_mta.clone(),
            original_message_id: report.returned_message_id.clone(),
            inbound_id: Some(inbound_id.clone()),
        };
        let base = |kind: RecordType| {
            let mut r = Record::new(
                kind,
                matched
                    .as_ref()
                    .map(|m| m.id.to_string())
                    .unwrap_or_default(),
            );
            if let Some(m) = &matched {
                r.recipient = m.recipient.clone();
                r.tenant = m.tenant.clone();
                r.campaign = m.campaign.clone();
                r.metadata = m.metadata.clone();
            } else if let Some(t) = &trace {
                // Unmatched (sent before Drover, or by KumoMTA): what the header says.
                r.recipient = t.recipient.clone().unwrap_or_default();
                if !t.meta.is_empty() {
                    r.metadata = Some(serde_json::Value::Object(t.meta.clone()));
                }
            }
            r.report = Some(info.clone());
            r
        };
        let mut records = Vec::new();
        let mut suppress: Vec<(SuppressionKey, Suppression)> = Vec::new();
        let suppression = |m: &Matched, source: &str, reason: String| {
            (
                SuppressionKey::new(m.tenant.as_deref(), &m.recipient),
                Suppression {
                    source: source.into(),
                    reason,
                    at_ms: now_ms(),
                    message_id: Some(m.id.to_string()),
                },
            )
        };
        match report.kind {
            reports::Kind::Arf => {
                let mut r = base(RecordType::Complaint);
                if r.recipient.is_empty() {
                    r.recipient = report.arf_original_rcpt_to.clone().unwrap_or_default();
                }
                let feedback_type = report
                    .feedback_type
                    .clone()
                    .unwrap_or_else(|| "abuse".into());
                // A "not spam" report takes nothing back, and suppresses nothing either.
                if let (Some(m), false) = (&matched, feedback_type == "not-spam") {
                    suppress.push(suppression(m, "complaint", feedback_type.clone()));
                }
                r.feedback_type = Some(feedback_type);
                records.push(r);
            }
            reports::Kind::Unsubscribe => {
                if let Some(m) = &matched {
                    let u = Unsubscribe {
                        id: *m.id.as_bytes(),
                        recipient: m.recipient.clone(),
                        tenant: m.tenant.clone(),
                        campaign: m.campaign.clone(),
                    };
                    self.record_unsubscribe(&u, m.metadata.clone(), Some(inbound_id))
                        .await?;
                    return Ok(Received::Recorded(1));
                }
                records.push(base(RecordType::Unsubscribe));
            }
            _ => {
                // DSN, text bounce or unknown mail: one AsyncBounce per failed recipient; a
                // delayed or delivered status is not a bounce. Unknown mail with no failed
                // recipient is still recorded, unmatched, so nothing goes unseen.
                let failed: Vec<&reports::RecipientStatus> = report
                    .recipients
                    .iter()
                    .filter(|s| s.action == reports::Action::Failed)
                    .collect();
                for status in &failed {
                    let mut r = base(RecordType::AsyncBounce);
                    if matched.is_none() {
                        if let Some(rcpt) = status
                            .original_recipient
                            .clone()
                            .or_else(|| status.final_recipient.clone())
                        {
                            r.recipient = rcpt;
                        }
                    }
                    let enhanced = status.status.clone();
                    let text = status.diagnostic.clone().unwrap_or_default();
                    let code = status
                        .diagnostic
                        .as_deref()
                        .and_then(|d| d.trim().get(..3))
                        .and_then(|c| c.parse::<u16>().ok())
                        .filter(|c| (400..600).contains(c))
                        .unwrap_or(if enhanced.as_deref().is_some_and(|e| e.starts_with('4')) {
                            450
                        } else {
                            550
                        });
                    let domain = r.recipient.rsplit_once('@').map(|(_, d)| d.to_owned());
                    let category = self.policy().classifier.classify(&accounting::ReplyFacts {
                        code,
                        enhanced: enhanced.as_deref(),
                        text: &text,
                        domain: domain.as_deref(),
                        mx_hosts: &[],
                    });
                    r.response = Some(accounting::Response {
                        code,
                        enhanced_code: enhanced,
                        text,
                    });
                    r.bounce_category = Some(category);
                    if let Some(m) = &matched {
                        if self.suppresses(category) {
                            suppress.push(suppression(m, "async-bounce", category.as_str().into()));
                        }
                    }
                    records.push(r);
                }
                if failed.is_empty() && matches!(report.kind, reports::Kind::Unknown) {
                    records.push(base(RecordType::AsyncBounce));
                }
            }
        }
        if let Some(m) = &matched {
            for r in &mut records {
                r.domain = m
                    .recipient
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_ascii_lowercase())
                    .unwrap_or_default();
            }
        }
        if matched.is_none() {
            self.keep_inbound(&inbound_id, &data).await;
        }
        if !suppress.is_empty() {
            self.suppress(suppress).await?;
        }
        let count = records.len();
        if count > 0 {
            self.observe_records(&records);
            self.accounting.record_all(records).await?;
        }
        Ok(Received::Recorded(count))
    }
}

fn kind_name(kind: reports::Kind) -> &'static str {
    match kind {
        reports::Kind::Dsn => "dsn",
        reports::Kind::TextBounce => "text-bounce",
        reports::Kind::Arf => "arf",
        reports::Kind::AutoReply => "auto-reply",
        reports::Kind::Unsubscribe => "unsubscribe",
        reports::Kind::Unknown => "unknown",
    }
}

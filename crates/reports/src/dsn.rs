//! The field groups of a `message/delivery-status` body (RFC 3464 §2.2, §2.3) and of a
//! `message/feedback-report` body (RFC 5965 §3.1).

use crate::codes::{self, clean_address, typed_text, xtext_decode};
use crate::fields::{self, get};
use crate::{Action, RecipientStatus, MAX_RECIPIENTS};

/// What a delivery-status body says.
#[derive(Debug, Default)]
pub(crate) struct DeliveryStatus {
    pub(crate) reporting_mta: Option<String>,
    pub(crate) original_envelope_id: Option<String>,
    pub(crate) recipients: Vec<RecipientStatus>,
}

fn empty_recipient() -> RecipientStatus {
    RecipientStatus {
        final_recipient: None,
        original_recipient: None,
        action: Action::Unknown,
        status: None,
        diagnostic: None,
        remote_mta: None,
    }
}

/// Raw per-recipient values, kept until the block ends so that a second `Final-Recipient`
/// (or `Action`, ...) in one block starts the next recipient: some MTAs leave out the blank
/// line between recipients.
#[derive(Default)]
struct Pending {
    final_recipient: Option<String>,
    original_recipient: Option<String>,
    action: Option<String>,
    status: Option<String>,
    diagnostic: Option<String>,
    remote_mta: Option<String>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.final_recipient.is_none()
            && self.original_recipient.is_none()
            && self.action.is_none()
            && self.status.is_none()
    }

    fn slot(&mut self, i: u8) -> &mut Option<String> {
        match i {
            0 => &mut self.final_recipient,
            1 => &mut self.original_recipient,
            2 => &mut self.action,
            3 => &mut self.status,
            4 => &mut self.diagnostic,
            _ => &mut self.remote_mta,
        }
    }

    fn finish(self) -> Option<RecipientStatus> {
        let mut r = empty_recipient();
        r.final_recipient = self.final_recipient.as_deref().and_then(clean_address);
        r.original_recipient = self.original_recipient.as_deref().and_then(clean_address);
        r.diagnostic = self.diagnostic.as_deref().and_then(typed_text);
        r.remote_mta = self.remote_mta.as_deref().and_then(typed_text);
        r.status = self
            .status
            .as_deref()
            .and_then(|s| {
                let token = s
                    .trim()
                    .split(|c: char| c.is_whitespace() || c == '(')
                    .next()?;
                codes::is_enhanced(token).then(|| token.to_string())
            })
            .or_else(|| r.diagnostic.as_deref().and_then(codes::find_enhanced));
        r.action = self.action.as_deref().map_or(Action::Unknown, parse_action);
        if r.action == Action::Unknown {
            r.action = action_of_status(r.status.as_deref());
        }
        let known = r.final_recipient.is_some()
            || r.original_recipient.is_some()
            || r.action != Action::Unknown
            || r.status.is_some();
        known.then_some(r)
    }
}

/// An `Action` value; anything unrecognised is [`Action::Unknown`].
pub(crate) fn parse_action(value: &str) -> Action {
    let word = value
        .trim()
        .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    match word.as_str() {
        "failed" | "failure" => Action::Failed,
        "delayed" => Action::Delayed,
        "delivered" => Action::Delivered,
        "relayed" => Action::Relayed,
        "expanded" => Action::Expanded,
        _ => Action::Unknown,
    }
}

/// What a status code implies when the report names no action.
pub(crate) fn action_of_status(status: Option<&str>) -> Action {
    match status.and_then(|s| s.bytes().next()) {
        Some(b'5') => Action::Failed,
        Some(b'4') => Action::Delayed,
        Some(b'2') => Action::Delivered,
        _ => Action::Unknown,
    }
}

/// Reads a delivery-status body. The per-message fields are taken from wherever they
/// appear; every group (or repeated per-recipient field) makes one recipient, at most
/// [`MAX_RECIPIENTS`].
pub(crate) fn parse_delivery_status(text: &str) -> DeliveryStatus {
    let mut out = DeliveryStatus::default();
    'groups: for group in fields::groups(text) {
        let mut pending = Pending::default();
        for (name, value) in group {
            let slot = match name.to_ascii_lowercase().as_str() {
                "reporting-mta" => {
                    if out.reporting_mta.is_none() {
                        out.reporting_mta = typed_text(&value);
                    }
                    continue;
                }
                "original-envelope-id" => {
                    if out.original_envelope_id.is_none() && !value.trim().is_empty() {
                        out.original_envelope_id = Some(xtext_decode(&value));
                    }
                    continue;
                }
                "final-recipient" => 0,
                "original-recipient" => 1,
                "action" => 2,
                "status" => 3,
                "diagnostic-code" => 4,
                "remote-mta" => 5,
                _ => continue,
            };
            if pending.slot(slot).is_some() {
                if let Some(r) = std::mem::take(&mut pending).finish() {
                    out.recipients.push(r);
                    if out.recipients.len() >= MAX_RECIPIENTS {
                        break 'groups;
                    }
                }
            }
            *pending.slot(slot) = Some(value);
        }
        if !pending.is_empty() {
            if let Some(r) = pending.finish() {
                out.recipients.push(r);
                if out.recipients.len() >= MAX_RECIPIENTS {
                    break;
                }
            }
        }
    }
    out
}

/// What a feedback-report body says.
#[derive(Debug, Default)]
pub(crate) struct FeedbackReport {
    pub(crate) feedback_type: Option<String>,
    pub(crate) reporting_mta: Option<String>,
    pub(crate) original_rcpt_to: Option<String>,
    pub(crate) original_mail_from: Option<String>,
}

/// Reads a feedback-report body (all its fields are per-message; groups do not matter).
pub(crate) fn parse_feedback_report(text: &str) -> FeedbackReport {
    let all: Vec<_> = fields::groups(text).into_iter().flatten().collect();
    FeedbackReport {
        feedback_type: get(&all, "Feedback-Type").and_then(|v| {
            let t = v.split(|c: char| c.is_whitespace() || c == ';').next()?;
            (!t.is_empty()).then(|| t.to_ascii_lowercase())
        }),
        reporting_mta: get(&all, "Reporting-MTA").and_then(typed_text),
        original_rcpt_to: get(&all, "Original-Rcpt-To").and_then(clean_address),
        original_mail_from: get(&all, "Original-Mail-From").and_then(clean_address),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_without_blank_lines_still_split_per_recipient() {
        let ds = parse_delivery_status(
            "Reporting-MTA: dns; a.example\nFinal-Recipient: rfc822; x@example.com\nAction: failed\nStatus: 5.1.1\nFinal-Recipient: rfc822; y@example.com\nAction: delayed\nStatus: 4.4.1 (timeout)\n",
        );
        assert_eq!(ds.reporting_mta.as_deref(), Some("a.example"));
        assert_eq!(ds.recipients.len(), 2);
        assert_eq!(
            ds.recipients[1].final_recipient.as_deref(),
            Some("y@example.com")
        );
        assert_eq!(ds.recipients[1].action, Action::Delayed);
        assert_eq!(ds.recipients[1].status.as_deref(), Some("4.4.1"));
    }

    #[test]
    fn missing_action_and_bad_status_fall_back_to_the_diagnostic() {
        let ds = parse_delivery_status(
            "original-envelope-id: abc+2Bdef\n\nfinal-recipient: RFC822;<x@example.com>\nstatus: 5.1\ndiagnostic-code: smtp;550-5.1.1 no such user\n",
        );
        assert_eq!(ds.original_envelope_id.as_deref(), Some("abc+def"));
        let r = &ds.recipients[0];
        assert_eq!(r.status.as_deref(), Some("5.1.1"));
        assert_eq!(r.action, Action::Failed);
        assert_eq!(r.diagnostic.as_deref(), Some("550-5.1.1 no such user"));
    }

    #[test]
    fn recipients_are_capped() {
        let text = "Final-Recipient: rfc822; x@example.com\nAction: failed\n\n"
            .repeat(MAX_RECIPIENTS + 50);
        assert_eq!(
            parse_delivery_status(&text).recipients.len(),
            MAX_RECIPIENTS
        );
    }
}

//! Bounce classification: turns a reply into one of the categories of contract §4.
//!
//! The rules run over the same string `[[automation]]` rules see, `"<code> <enhanced> <text>"`,
//! so an operator can reason about both with one mental model. The first matching rule wins;
//! rules are ordered from the most telling (greylisting, rate limits) to the most generic.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Why a message failed (contract §4 `bounce_category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BounceCategory {
    /// The mailbox does not exist.
    BadMailbox,
    /// The domain does not exist or accepts no mail.
    BadDomain,
    /// The mailbox exists but is disabled.
    InactiveMailbox,
    /// The mailbox is full.
    QuotaIssues,
    /// Rejected as spam or for the sender's reputation.
    SpamRelated,
    /// Rejected by the receiver's policy.
    PolicyRelated,
    /// Loops, relaying denied, bad routing.
    RoutingErrors,
    /// No MX host could be reached.
    NoAnswerFromHost,
    /// The receiver greylisted the attempt.
    Greylisted,
    /// The receiver throttled the sender.
    RateLimited,
    /// The message outlived its maximum age.
    MessageExpired,
    /// Anything else.
    #[default]
    Other,
}

impl BounceCategory {
    /// Every category, for initialising per-category metrics.
    pub const ALL: [BounceCategory; 12] = [
        BounceCategory::BadMailbox,
        BounceCategory::BadDomain,
        BounceCategory::InactiveMailbox,
        BounceCategory::QuotaIssues,
        BounceCategory::SpamRelated,
        BounceCategory::PolicyRelated,
        BounceCategory::RoutingErrors,
        BounceCategory::NoAnswerFromHost,
        BounceCategory::Greylisted,
        BounceCategory::RateLimited,
        BounceCategory::MessageExpired,
        BounceCategory::Other,
    ];

    /// The category's name as written in records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BounceCategory::BadMailbox => "bad-mailbox",
            BounceCategory::BadDomain => "bad-domain",
            BounceCategory::InactiveMailbox => "inactive-mailbox",
            BounceCategory::QuotaIssues => "quota-issues",
            BounceCategory::SpamRelated => "spam-related",
            BounceCategory::PolicyRelated => "policy-related",
            BounceCategory::RoutingErrors => "routing-errors",
            BounceCategory::NoAnswerFromHost => "no-answer-from-host",
            BounceCategory::Greylisted => "greylisted",
            BounceCategory::RateLimited => "rate-limited",
            BounceCategory::MessageExpired => "message-expired",
            BounceCategory::Other => "other",
        }
    }
}

struct Rule {
    pattern: Regex,
    category: BounceCategory,
    /// Only for temporary (4xx) replies; greylisting is never a permanent failure.
    transient_only: bool,
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        let table: &[(&str, BounceCategory, bool)] = &[
            (
                r"(?i)grey[- ]?list|gray[- ]?list|^45[01] 4\.2\.0 |^45[01] .*try (again )?later",
                BounceCategory::Greylisted,
                true,
            ),
            (
                r"(?i)rate.?limit|too many (messages|connections|recipients)|throttl|4\.7\.28|TSS0[45]|4\.7\.65[01]|try again later|temporarily deferred",
                BounceCategory::RateLimited,
                true,
            ),
            (r"(?i)quota|mailbox (is )?full|over.?limit|[45]\.2\.2 ", BounceCategory::QuotaIssues, false),
            (r"(?i)disabled|inactive|deactivated|suspended|[45]\.2\.1 ", BounceCategory::InactiveMailbox, false),
            (
                r"(?i)spam|blacklist|blocklist|block ?list|reputation|dnsbl|spamhaus|5\.7\.(1|350) .*(block|listed)",
                BounceCategory::SpamRelated,
                false,
            ),
            (
                r"(?i)[45]\.1\.(1|0|6) |user unknown|unknown user|no such (user|mailbox|recipient)|does not exist|mailbox unavailable|invalid recipient|recipient rejected|address rejected",
                BounceCategory::BadMailbox,
                false,
            ),
            (
                r"(?i)[45]\.1\.(2|10) |[45]\.4\.4 |domain not found|host not found|no mx|null mx|nxdomain|does not accept mail",
                BounceCategory::BadDomain,
                false,
            ),
            (r"(?i)[45]\.4\.[0-7] |loop|relay(ing)? (access )?denied|not permitted to relay", BounceCategory::RoutingErrors, false),
            (r"(?i)[45]\.7\.[0-9]+ |policy|not authori[sz]ed|dmarc|spf|dkim", BounceCategory::PolicyRelated, false),
        ];
        table
            .iter()
            .filter_map(|(re, category, transient_only)| {
                // The table is a compile-time constant; a bad pattern is a programming error the
                // unit tests catch, so skipping it here cannot hide a runtime input problem.
                Regex::new(re).ok().map(|pattern| Rule {
                    pattern,
                    category: *category,
                    transient_only: *transient_only,
                })
            })
            .collect()
    })
}

/// Classifies a reply. `enhanced` is the RFC 3463 code as text ("5.1.1"), when there was one.
pub fn classify(code: u16, enhanced: Option<&str>, text: &str) -> BounceCategory {
    let subject = format!("{code} {} {text}", enhanced.unwrap_or(""));
    let transient = (400..500).contains(&code);
    rules()
        .iter()
        .filter(|rule| transient || !rule.transient_only)
        .find(|rule| rule.pattern.is_match(&subject))
        .map(|rule| rule.category)
        .unwrap_or(BounceCategory::Other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_compiles() {
        assert_eq!(rules().len(), 9);
    }

    #[test]
    fn table() {
        let cases: &[(u16, Option<&str>, &str, BounceCategory)] = &[
            (
                550,
                Some("5.1.1"),
                "No such user",
                BounceCategory::BadMailbox,
            ),
            (
                550,
                None,
                "User unknown in virtual mailbox table",
                BounceCategory::BadMailbox,
            ),
            (
                450,
                Some("4.2.0"),
                "Greylisted, try again later",
                BounceCategory::Greylisted,
            ),
            (
                451,
                None,
                "Greylisting in action",
                BounceCategory::Greylisted,
            ),
            (
                421,
                Some("4.7.28"),
                "unusual rate of unsolicited mail",
                BounceCategory::RateLimited,
            ),
            (
                421,
                Some("4.7.0"),
                "[TSS04] Messages temporarily deferred",
                BounceCategory::RateLimited,
            ),
            (
                452,
                Some("4.2.2"),
                "Mailbox full",
                BounceCategory::QuotaIssues,
            ),
            (
                550,
                Some("5.2.1"),
                "Account disabled",
                BounceCategory::InactiveMailbox,
            ),
            (
                554,
                Some("5.7.1"),
                "Listed by Spamhaus",
                BounceCategory::SpamRelated,
            ),
            (
                550,
                Some("5.7.26"),
                "DMARC policy",
                BounceCategory::PolicyRelated,
            ),
            (550, Some("5.1.10"), "null MX", BounceCategory::BadDomain),
            (
                554,
                Some("5.4.6"),
                "Routing loop detected",
                BounceCategory::RoutingErrors,
            ),
            (554, None, "Transaction failed", BounceCategory::Other),
            // A permanent reply never counts as greylisting, whatever it says.
            (
                550,
                Some("5.2.0"),
                "greylisted forever",
                BounceCategory::Other,
            ),
        ];
        for (code, enhanced, text, want) in cases {
            assert_eq!(
                classify(*code, *enhanced, text),
                *want,
                "{code} {enhanced:?} {text}"
            );
        }
    }

    #[test]
    fn names_are_kebab_case() {
        let json = serde_json::to_string(&BounceCategory::NoAnswerFromHost).unwrap();
        assert_eq!(json, "\"no-answer-from-host\"");
        assert_eq!(
            BounceCategory::NoAnswerFromHost.as_str(),
            "no-answer-from-host"
        );
    }
}

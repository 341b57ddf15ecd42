//! `[[automation]]`: reacting to what receivers say (Gmail's 4.7.28, Yahoo's TSS04, ...).
//!
//! Each rule is a regex over `"<code> <enhanced> <text>"` of a non-positive reply; the first
//! matching rule decides: `suspend` the queue for a while (messages stay queued), `backoff`
//! (the destination's backoff limits apply until `duration` passes without another match),
//! or `bounce` the message at once.

use crate::config::Config;
use regex::Regex;
use std::time::Duration;

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hold the queue for the duration.
    Suspend,
    /// Apply the backoff limits for the duration.
    Backoff,
    /// Bounce the message now, whatever the reply's class.
    Bounce,
}

impl Action {
    /// The `action` label of `drover_automation_actions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Suspend => "suspend",
            Action::Backoff => "backoff",
            Action::Bounce => "bounce",
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: Regex,
    action: Action,
    duration: Duration,
}

/// The compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Automation {
    rules: Vec<Rule>,
}

/// How long a rule lasts when it names no duration.
const DEFAULT_DURATION: Duration = Duration::from_secs(3600);

impl Automation {
    /// Compiles the rules of a validated configuration (invalid ones were rejected there).
    pub fn from_config(config: &Config) -> Automation {
        let rules = config
            .automation
            .iter()
            .filter_map(|a| {
                let action = match a.action.as_str() {
                    "suspend" => Action::Suspend,
                    "backoff" => Action::Backoff,
                    "bounce" => Action::Bounce,
                    _ => return None,
                };
                Some(Rule {
                    pattern: Regex::new(&a.match_response).ok()?,
                    action,
                    duration: a.duration.map_or(DEFAULT_DURATION, |d| d.0),
                })
            })
            .collect();
        Automation { rules }
    }

    /// The first rule matching a reply, with its duration.
    pub fn react(
        &self,
        code: u16,
        enhanced: Option<&str>,
        text: &str,
    ) -> Option<(Action, Duration)> {
        if self.rules.is_empty() {
            return None;
        }
        let subject = format!("{code} {} {text}", enhanced.unwrap_or(""));
        self.rules
            .iter()
            .find(|r| r.pattern.is_match(&subject))
            .map(|r| (r.action, r.duration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_rules_recognise_the_big_providers() {
        let config = Config::parse(include_str!("../../../deploy/drover.example.toml")).unwrap();
        let a = Automation::from_config(&config);
        let gmail = a.react(
            421,
            Some("4.7.28"),
            "Our system has detected an unusual rate of unsolicited mail",
        );
        assert_eq!(gmail, Some((Action::Backoff, Duration::from_secs(3600))));
        let yahoo = a.react(
            421,
            Some("4.7.0"),
            "[TSS04] Messages from 1.2.3.4 temporarily deferred",
        );
        assert_eq!(yahoo, Some((Action::Suspend, Duration::from_secs(7200))));
        let microsoft = a.react(
            451,
            Some("4.7.650"),
            "The mail server has been temporarily rate limited",
        );
        assert_eq!(microsoft.map(|m| m.0), Some(Action::Backoff));
        assert_eq!(a.react(550, Some("5.1.1"), "No such user"), None);
        assert_eq!(Automation::default().react(421, None, "TSS04"), None);
    }
}

//! What an attempt's reply means, decided without any I/O: verdict, bounce category, the
//! greylisting heuristic, the retry delay, and the automation reaction.

use crate::automation::{Action, Automation};
use crate::config::RetryConfig;
use accounting::{BounceCategory, Classifier, Peer, Response};
use connection_pool::ClientError;
use smtp_proto::Reply;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Delivered,
    Deferred,
    Bounced,
}

#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) verdict: Verdict,
    pub(crate) response: Response,
    pub(crate) category: BounceCategory,
    pub(crate) peer: Option<Peer>,
    pub(crate) source: Option<String>,
    pub(crate) tls: Option<String>,
}

impl Outcome {
    /// The outcome of `reply` from an MX of `domain` (`mx_hosts`: provider rules look at
    /// them).
    pub(crate) fn from_reply(
        reply: &Reply,
        classifier: &Classifier,
        domain: &str,
        mx_hosts: &[String],
    ) -> Outcome {
        let enhanced = reply.enhanced.map(|e| e.to_string());
        let text = reply.text();
        let verdict = if reply.is_positive() {
            Verdict::Delivered
        } else if reply.is_permanent() {
            Verdict::Bounced
        } else {
            Verdict::Deferred
        };
        Outcome {
            category: classifier.classify(&accounting::ReplyFacts {
                code: reply.code,
                enhanced: enhanced.as_deref(),
                text: &text,
                domain: Some(domain),
                mx_hosts,
            }),
            verdict,
            response: Response {
                code: reply.code,
                enhanced_code: enhanced,
                text,
            },
            peer: None,
            source: None,
            tls: None,
        }
    }

    /// The domain's MX lookup failed: NXDOMAIN and null MX bounce, the rest defers.
    pub(crate) fn unresolvable(e: &resolver_cache::ResolveError) -> Outcome {
        let permanent = e.is_permanent();
        let response = Response {
            code: if permanent { 550 } else { 451 },
            enhanced_code: Some(e.enhanced_code().to_owned()),
            text: e.to_string(),
        };
        let category = if permanent {
            BounceCategory::BadDomain
        } else {
            BounceCategory::RoutingErrors
        };
        Outcome::synthetic(response, category, permanent)
    }

    /// No MX host gave a usable session: deferred.
    pub(crate) fn no_host_answered(domain: &str, e: &ClientError) -> Outcome {
        Outcome::synthetic(
            Response {
                code: 451,
                enhanced_code: Some("4.4.1".into()),
                text: format!("no MX host of {domain} answered: {e}"),
            },
            BounceCategory::NoAnswerFromHost,
            false,
        )
    }

    /// The session broke (timeout, reset, garbage): not the message's fault, so it is
    /// deferred, never bounced.
    pub(crate) fn broken_session(e: &ClientError) -> Outcome {
        let text = if e.after_final_dot() {
            format!("{e} (after the final dot: the message may have been delivered)")
        } else {
            e.to_string()
        };
        Outcome::synthetic(
            Response {
                code: 451,
                enhanced_code: Some("4.4.2".into()),
                text,
            },
            BounceCategory::NoAnswerFromHost,
            false,
        )
    }

    /// A bare 450/451 4.7.1 to a first attempt is how many greylisters answer without saying
    /// so: classed as greylisting, it is retried soon, from the same source, rather than on
    /// the slow schedule. `attempts` counts this attempt.
    pub(crate) fn mark_greylisting(&mut self, attempts: u32) {
        if attempts == 1
            && self.verdict == Verdict::Deferred
            && matches!(self.response.code, 450 | 451)
            && self.response.enhanced_code.as_deref() == Some("4.7.1")
            && matches!(
                self.category,
                BounceCategory::Other | BounceCategory::PolicyRelated
            )
        {
            self.category = BounceCategory::Greylisted;
        }
    }

    /// The `[[automation]]` reaction to a non-positive reply, if a rule matches. A bounce
    /// takes effect here (the verdict changes); suspending and backing off are for the caller.
    pub(crate) fn react(&mut self, automation: &Automation) -> Option<(Action, Duration)> {
        if self.verdict == Verdict::Delivered {
            return None;
        }
        let r = &self.response;
        let reaction = automation.react(r.code, r.enhanced_code.as_deref(), &r.text)?;
        if reaction.0 == Action::Bounce {
            self.verdict = Verdict::Bounced;
        }
        Some(reaction)
    }

    pub(crate) fn synthetic(
        response: Response,
        category: BounceCategory,
        permanent: bool,
    ) -> Outcome {
        Outcome {
            verdict: if permanent {
                Verdict::Bounced
            } else {
                Verdict::Deferred
            },
            response,
            category,
            peer: None,
            source: None,
            tls: None,
        }
    }
}

/// How long a deferred message waits: `greylist_retry` after a first attempt that met
/// greylisting, else the interval for its attempt count (the last one repeats), plus
/// `jitter` (a fraction of it, e.g. up to 0.1) so a large batch does not come due at once.
pub(crate) fn retry_delay(
    retry: &RetryConfig,
    attempts: u32,
    category: BounceCategory,
    jitter: f64,
) -> Duration {
    let base = if category == BounceCategory::Greylisted && attempts <= 1 {
        retry.greylist_retry.0
    } else {
        let i = (attempts.saturating_sub(1) as usize).min(retry.intervals.len().saturating_sub(1));
        retry
            .intervals
            .get(i)
            .map_or(Duration::from_secs(300), |d| d.0)
    };
    base + base.mul_f64(jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(r: &Reply) -> Outcome {
        Outcome::from_reply(r, &Classifier::default(), "example.test", &[])
    }
    use crate::config::Config;
    use smtp_proto::EnhancedCode;

    fn reply(code: u16, enhanced: Option<(u8, u16, u16)>, text: &str) -> Reply {
        Reply::new(
            code,
            enhanced.map(|(c, s, d)| EnhancedCode::new(c, s, d)),
            text,
        )
    }

    fn automation(toml: &str) -> Automation {
        Automation::from_config(&Config::parse(toml).unwrap())
    }

    #[test]
    fn replies_give_verdicts_and_categories() {
        let ok = judge(&reply(250, Some((2, 0, 0)), "queued"));
        assert_eq!(ok.verdict, Verdict::Delivered);
        let unknown = judge(&reply(550, Some((5, 1, 1)), "no such user"));
        assert_eq!(unknown.verdict, Verdict::Bounced);
        assert_eq!(unknown.category, BounceCategory::BadMailbox);
        assert_eq!(unknown.response.enhanced_code.as_deref(), Some("5.1.1"));
        assert_eq!(unknown.response.text, "no such user");
        let later = judge(&reply(452, Some((4, 2, 2)), "mailbox full"));
        assert_eq!(later.verdict, Verdict::Deferred);
    }

    #[test]
    fn a_bare_4_7_1_on_a_first_attempt_is_greylisting() {
        let bare = || judge(&reply(450, Some((4, 7, 1)), "access denied for now"));
        assert_ne!(bare().category, BounceCategory::Greylisted);
        let mut first = bare();
        first.mark_greylisting(1);
        assert_eq!(first.category, BounceCategory::Greylisted);
        let mut second = bare();
        second.mark_greylisting(2);
        assert_ne!(second.category, BounceCategory::Greylisted);
        let mut throttled = judge(&reply(421, Some((4, 7, 0)), "too fast"));
        throttled.mark_greylisting(1);
        assert_ne!(throttled.category, BounceCategory::Greylisted);
        let mut bounced = judge(&reply(550, Some((5, 7, 1)), "denied"));
        bounced.mark_greylisting(1);
        assert_ne!(bounced.category, BounceCategory::Greylisted);
    }

    #[test]
    fn automation_reacts_to_failures_only_and_bounces_in_the_verdict() {
        let rules = automation(
            "[[automation]]\nmatch_response = \"TSS04\"\naction = \"suspend\"\nduration = \"2h\"\n\
             [[automation]]\nmatch_response = \"4\\\\.2\\\\.2\"\naction = \"bounce\"\n",
        );
        let mut yahoo = judge(&reply(421, Some((4, 7, 0)), "[TSS04] deferred"));
        let (action, duration) = yahoo.react(&rules).unwrap();
        assert_eq!(action, Action::Suspend);
        assert_eq!(duration, Duration::from_secs(7200));
        assert_eq!(yahoo.verdict, Verdict::Deferred);
        let mut full = judge(&reply(452, Some((4, 2, 2)), "mailbox full"));
        assert_eq!(full.react(&rules).unwrap().0, Action::Bounce);
        assert_eq!(full.verdict, Verdict::Bounced);
        let mut ok = judge(&reply(250, None, "TSS04 is fine"));
        assert!(ok.react(&rules).is_none());
        assert_eq!(ok.verdict, Verdict::Delivered);
    }

    #[test]
    fn retry_delays_follow_the_schedule_and_greylisting() {
        let config =
            Config::parse("[retry]\nintervals = [\"1m\", \"10m\"]\ngreylist_retry = \"30s\"\n")
                .unwrap();
        let retry = &config.retry;
        let other = BounceCategory::Other;
        assert_eq!(retry_delay(retry, 1, other, 0.0), Duration::from_secs(60));
        assert_eq!(retry_delay(retry, 2, other, 0.0), Duration::from_secs(600));
        assert_eq!(retry_delay(retry, 9, other, 0.0), Duration::from_secs(600));
        let grey = BounceCategory::Greylisted;
        assert_eq!(retry_delay(retry, 1, grey, 0.0), Duration::from_secs(30));
        assert_eq!(retry_delay(retry, 2, grey, 0.0), Duration::from_secs(600));
        assert_eq!(retry_delay(retry, 1, other, 0.1), Duration::from_secs(66));
    }

    #[test]
    fn failures_without_a_reply_defer_or_bounce_as_they_should() {
        let nx = Outcome::unresolvable(&resolver_cache::ResolveError::NxDomain {
            domain: "gone.test".into(),
        });
        assert_eq!(nx.verdict, Verdict::Bounced);
        assert_eq!(nx.response.code, 550);
        assert_eq!(nx.category, BounceCategory::BadDomain);
        let servfail = Outcome::unresolvable(&resolver_cache::ResolveError::Temporary {
            domain: "flaky.test".into(),
            reason: "SERVFAIL".into(),
        });
        assert_eq!(servfail.verdict, Verdict::Deferred);
        assert_eq!(servfail.response.code, 451);
        let refused = ClientError::Connect {
            address: ([127, 0, 0, 1], 25).into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let none = Outcome::no_host_answered("x.test", &refused);
        assert_eq!(none.verdict, Verdict::Deferred);
        assert_eq!(none.response.enhanced_code.as_deref(), Some("4.4.1"));
        let dot = ClientError::Timeout {
            command: ".",
            duration: Duration::from_secs(600),
        };
        let broken = Outcome::broken_session(&dot);
        assert_eq!(broken.verdict, Verdict::Deferred);
        assert!(broken.response.text.contains("may have been delivered"));
        assert_eq!(broken.category, BounceCategory::NoAnswerFromHost);
    }
}

//! What an attempt's reply means, decided without any I/O: verdict, bounce category, the
//! greylisting heuristic, the retry delay, and the automation reaction.

use crate::automation::{Action, Automation};
use crate::config::RetryConfig;
use accounting::{classify, BounceCategory, Peer, Response};
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
    pub(crate) fn from_reply(reply: &Reply) -> Outcome {
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
            category: classify(reply.code, enhanced.as_deref(), &text),
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

//! Bounces without a delivery-status part: qmail's, Exim's older text form, Sendmail's and
//! Exchange's text, and the many "Undelivered Mail"/"Mail delivery failed" messages that
//! only say in prose which recipient failed and why.
//!
//! The reading is line-based and linear in the text: find where the quoted copy of the
//! message starts, find the lines that name a recipient (`<addr>:`, `addr`, `addr:` at the
//! start of a line), give each recipient the lines up to the next one, and take status,
//! reply lines and action from those lines, or from the whole text when they hold none.

use std::collections::HashMap;

use crate::codes::{self, find_enhanced, find_reply_class, is_address};
use crate::fields::lines;
use crate::{Action, RecipientStatus, MAX_RECIPIENTS};

/// Longest diagnostic kept for one recipient.
const MAX_DIAGNOSTIC: usize = 2000;
/// Most reason lines kept for one recipient when none holds a reply code.
const MAX_REASON_LINES: usize = 5;

/// Subjects of non-delivery and delay notices (lowercase, matched as substrings).
const BOUNCE_SUBJECTS: &[&str] = &[
    "undelivered mail",
    "undeliverable",
    "undelivered",
    "mail delivery failed",
    "delivery status notification",
    "failure notice",
    "returned mail",
    "delivery failure",
    "delivery failed",
    "mail system error",
    "could not send message",
    "delayed mail",
    "delivery delayed",
    "mail delivery delayed",
    "nondeliverable",
    "non-deliverable",
    "non delivery",
    "non-delivery",
    "unzustellbar",
    "nicht zustellbar",
    "non remis",
    "non recapitabile",
    "no se puede entregar",
    "unable to deliver",
    "message not delivered",
    "warning: message",
    "returned to sender",
    "delivery notification",
];

/// Phrases that only non-delivery notices write.
const BOUNCE_MARKERS: &[&str] = &[
    "qmail-send program",
    "created automatically by mail delivery software",
    "could not be delivered to one or more",
    "your message could not be delivered",
    "the following addresses had permanent fatal errors",
    "delivery to the following recipient",
    "delivery has failed to these recipients",
    "your message wasn't delivered",
    "your message couldn't be delivered",
    "message could not be delivered",
    "was undeliverable",
    "unable to deliver your message",
    "this is a delivery status notification",
    "permanent fatal errors",
    "delivery attempts will continue",
    "this is a warning message only",
    "transcript of session follows",
    "message delivery has failed",
    "has not yet been delivered",
];

/// Phrases of a final failure.
const PERMANENT: &[&str] = &[
    "permanent error",
    "permanent failure",
    "permanently",
    "given up",
    "giving up",
    "not going to try again",
    "fatal error",
    "could not be delivered",
    "couldn't be delivered",
    "wasn't delivered",
    "was not delivered",
    "delivery has failed",
    "undeliverable",
    "has been rejected",
];

/// Phrases of a notice sent while the MTA keeps trying.
const STILL_TRYING: &[&str] = &[
    "will keep trying",
    "will continue",
    "will retry",
    "will be retried",
    "still being retried",
    "still trying",
    "not yet been delivered",
    "has been delayed",
    "delivery delayed",
    "delayed mail",
    "delivery status notification (delay)",
    "this is a warning message only",
    "temporarily deferred",
    "no action is required on your part",
];

/// Lines (lowercased, trimmed) after which the quoted copy of the message follows.
const COPY_MARKERS: &[&str] = &[
    "below this line is a copy of the message",
    "this is a copy of the message",
    "this is a copy of the headers",
    "original message follows",
    "unsent message follows",
    "returned mail follows",
    "returned message follows",
    "original message headers",
    "enclosed are the original headers",
    "original message header",
    "headers of the original message",
    "original message -----",
    "original message ---",
    "message headers follow",
];

fn lower_contains_any(haystack_lower: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| haystack_lower.contains(n))
}

/// Whether a subject is that of a non-delivery or delay notice.
pub(crate) fn is_bounce_subject(subject: &str) -> bool {
    lower_contains_any(&subject.to_lowercase(), BOUNCE_SUBJECTS)
}

/// Whether a body has a phrase only non-delivery notices write.
pub(crate) fn has_bounce_marker(body: &str) -> bool {
    lower_contains_any(&body.to_lowercase(), BOUNCE_MARKERS)
}

/// Whether a From address (and display name) is a mail system's.
pub(crate) fn is_bounce_sender(address: Option<&str>, name: Option<&str>) -> bool {
    let local = address
        .and_then(|a| a.rsplit_once('@').map(|(l, _)| l).or(Some(a)))
        .unwrap_or("")
        .to_ascii_lowercase();
    let name = name.unwrap_or("").to_lowercase();
    matches!(
        local.as_str(),
        "mailer-daemon"
            | "postmaster"
            | "mail-daemon"
            | "mailerdaemon"
            | "maildaemon"
            | "mail.daemon"
    ) || local.starts_with("mailer-daemon")
        || name.contains("mail delivery")
        || name.contains("mailer-daemon")
        || name.contains("mail administrator")
}

/// Byte offsets into `body`: where the notice's own text ends and where the quoted copy of
/// the message (if any) starts.
pub(crate) fn split_copy(body: &str) -> (usize, Option<usize>) {
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let l = line.trim().to_lowercase();
        if l.len() < 200 && lower_contains_any(&l, COPY_MARKERS) {
            // The copy starts after the marker and any blank lines.
            let rest = &body[offset..];
            let skip = rest.len() - rest.trim_start_matches(['\r', '\n', ' ', '\t']).len();
            return (start, Some(offset + skip));
        }
    }
    (body.len(), None)
}

/// Where a header section starts in `body` when no marker announced the copy: a line
/// beginning with `Return-Path:` or `Received:` after a blank line.
pub(crate) fn find_header_block(body: &str) -> Option<usize> {
    let mut offset = 0;
    let mut after_blank = true;
    for line in body.split_inclusive('\n') {
        let l = line.trim_end();
        let lower = l.get(..12).unwrap_or(l).to_ascii_lowercase();
        if after_blank && (lower.starts_with("return-path:") || lower.starts_with("received:")) {
            return Some(offset);
        }
        after_blank = l.trim().is_empty();
        offset += line.len();
    }
    None
}

/// The recipient named by a line, and what follows the address on that line.
fn recipient_line(line: &str) -> Option<(String, &str)> {
    let t = line.trim();
    let (addr, rest) = if let Some(inner) = t.strip_prefix('<') {
        let end = inner.find('>')?;
        (&inner[..end], &inner[end + 1..])
    } else {
        let end = t
            .find(|c: char| c.is_whitespace() || c == ':')
            .unwrap_or(t.len());
        (&t[..end], &t[end..])
    };
    let addr = addr.trim();
    if !is_address(addr) {
        return None;
    }
    // Only the address, or the address then a colon (qmail, Postfix, Lotus), or "..." as
    // Sendmail writes; anything else is prose that happens to start with an address.
    let rest_t = rest.trim_start();
    let rest = if rest_t.is_empty() {
        ""
    } else if let Some(r) = rest_t.strip_prefix(':') {
        r
    } else if let Some(r) = rest_t.strip_prefix("...") {
        r
    } else if rest_t.starts_with('(') {
        rest_t
    } else if rest_t
        .strip_prefix("on ")
        .is_some_and(|d| d.starts_with(|c: char| c.is_ascii_digit()))
    {
        // Exchange 2003: "jane@example.com on 3/3/2026 2:10 PM".
        ""
    } else {
        return None;
    };
    Some((addr.to_string(), rest))
}

/// The innermost `<...>` spans of a line.
fn bracketed(line: &str) -> impl Iterator<Item = &str> {
    line.split('<')
        .skip(1)
        .filter_map(|s| s.find('>').map(|end| &s[..end]))
}

fn has_code(line: &str) -> bool {
    find_reply_class(line).is_some() || find_enhanced(line).is_some()
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The diagnostic of a recipient's lines: the first line with a reply code and the lines
/// that continue it (indented deeper, or themselves reply lines), up to a blank line; else
/// the first reason lines.
fn diagnostic(first_rest: &str, seg: &[&str]) -> Option<String> {
    let mut out = String::new();
    let push = |out: &mut String, s: &str| {
        let s = s.trim();
        if !s.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(s);
        }
    };
    if let Some(i) = seg.iter().position(|l| has_code(l)) {
        let base = indent(seg[i]);
        push(&mut out, seg[i]);
        for l in &seg[i + 1..] {
            if l.trim().is_empty() || out.len() >= MAX_DIAGNOSTIC {
                break;
            }
            let starts_with_code = {
                let t = l.trim_start();
                let t = t.trim_start_matches(['<', ' ']);
                t.as_bytes()
                    .first()
                    .is_some_and(|c| matches!(c, b'4' | b'5'))
                    && has_code(t)
            };
            if indent(l) > base || starts_with_code {
                push(&mut out, l);
            } else {
                break;
            }
        }
    } else {
        push(&mut out, first_rest);
        let mut taken = 0;
        for l in seg.iter().skip(1) {
            if l.trim().is_empty() {
                if out.is_empty() {
                    continue;
                }
                break;
            }
            if taken >= MAX_REASON_LINES {
                break;
            }
            push(&mut out, l);
            taken += 1;
        }
    }
    let out = codes::truncate(out, MAX_DIAGNOSTIC);
    (!out.is_empty()).then_some(out)
}

/// What the notice's prose says, read once (per recipient it would be quadratic).
struct Tone {
    permanent: bool,
    trying: bool,
    failure_subject: bool,
}

impl Tone {
    fn of(subject_lower: &str, notice_lower: &str) -> Tone {
        Tone {
            permanent: lower_contains_any(notice_lower, PERMANENT),
            trying: lower_contains_any(notice_lower, STILL_TRYING)
                || lower_contains_any(subject_lower, STILL_TRYING),
            failure_subject: ["fail", "undeliver", "returned", "unzustellbar", "non remis"]
                .iter()
                .any(|w| subject_lower.contains(w)),
        }
    }

    /// The action for a recipient whose lines have reply class `class`.
    fn action(&self, class: Option<u8>) -> Action {
        if class == Some(5) || self.permanent {
            Action::Failed
        } else if self.trying || class == Some(4) {
            Action::Delayed
        } else if self.failure_subject {
            Action::Failed
        } else {
            Action::Unknown
        }
    }
}

fn class_of(status: Option<&str>, text: &str) -> Option<u8> {
    status
        .and_then(|s| s.bytes().next())
        .map(|c| c - b'0')
        .filter(|c| *c == 4 || *c == 5)
        .or_else(|| find_reply_class(text))
}

/// Recipients of a text notice. `notice` is the notice's own text (the quoted copy cut
/// off). When no line names a recipient but the text has a reply code, one recipient
/// without an address is returned: the status still tells a hard bounce from a soft one,
/// and the engine knows the recipient from the address the notice was sent to.
pub(crate) fn recipients(subject: &str, notice: &str) -> Vec<RecipientStatus> {
    let subject_lower = subject.to_lowercase();
    let all: Vec<&str> = lines(notice).collect();
    // (address, index of its line, rest of its line), in order of first appearance.
    let mut found: Vec<(String, Vec<usize>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, line) in all.iter().enumerate() {
        if let Some((addr, _)) = recipient_line(line) {
            let key = addr.to_ascii_lowercase();
            match index.get(&key) {
                Some(&k) => found[k].1.push(i),
                None if found.len() < MAX_RECIPIENTS => {
                    index.insert(key, found.len());
                    found.push((addr, vec![i]));
                }
                None => {}
            }
        }
    }
    // Line indices where any recipient's lines begin, to cut segments.
    let mut starts: Vec<usize> = found.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    starts.sort_unstable();

    let global_status = find_enhanced(notice).filter(|s| codes::is_enhanced(s));
    let global_class = find_reply_class(notice);
    let tone = Tone::of(&subject_lower, &notice.to_lowercase());

    if found.is_empty() {
        // Prose only: an address in angle brackets on a reply line ("550 5.1.1 <x@y>: ..."
        // or "RCPT TO:<x@y>") names the recipient if there is one.
        let addr = all.iter().find_map(|l| {
            let lower = l.to_ascii_lowercase();
            if !(has_code(l) || lower.contains("rcpt to")) {
                return None;
            }
            bracketed(l).find(|a| is_address(a)).map(str::to_string)
        });
        let class = class_of(global_status.as_deref(), notice);
        if addr.is_none() && class.is_none() {
            return Vec::new();
        }
        let status = global_status.or_else(|| class.map(|c| format!("{c}.0.0")));
        return vec![RecipientStatus {
            final_recipient: addr,
            original_recipient: None,
            action: tone.action(class),
            status,
            diagnostic: diagnostic("", &all),
            remote_mta: None,
        }];
    }

    let mut out = Vec::with_capacity(found.len());
    for (addr, at) in found {
        let mut seg: Vec<&str> = Vec::new();
        let mut first_rest = "";
        for (n, &i) in at.iter().enumerate() {
            let end = starts
                .get(starts.partition_point(|&s| s <= i))
                .copied()
                .unwrap_or(all.len());
            if n == 0 {
                first_rest = recipient_line(all[i]).map_or("", |(_, r)| r);
            }
            // The address line itself counts: Postfix and qmail write the reason on it.
            seg.extend_from_slice(&all[i..end]);
        }
        let seg_text = seg.join("\n");
        let seg_status = find_enhanced(&seg_text).or_else(|| global_status.clone());
        let class = class_of(seg_status.as_deref(), &seg_text).or(global_class);
        let status = seg_status.or_else(|| class.map(|c| format!("{c}.0.0")));
        let mut diag_lines = seg.clone();
        // The address line's own text goes first; strip the address from it.
        if let Some(first) = diag_lines.first_mut() {
            *first = first_rest;
        }
        out.push(RecipientStatus {
            final_recipient: Some(addr),
            original_recipient: None,
            action: tone.action(class),
            status,
            diagnostic: diagnostic(first_rest, &diag_lines),
            remote_mta: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipient_lines() {
        assert_eq!(
            recipient_line("<jane@example.com>:").map(|r| r.0),
            Some("jane@example.com".into())
        );
        assert_eq!(
            recipient_line("  jane@example.com").map(|r| r.0),
            Some("jane@example.com".into())
        );
        assert!(recipient_line("jane@example.com wrote a letter").is_none());
        assert!(recipient_line("For further assistance, mail postmaster@example.com").is_none());
    }

    #[test]
    fn prose_only_notice_yields_a_recipient_from_the_reply_line() {
        let r = recipients(
            "Mail delivery failed",
            "Sorry.\nThe server said: 550 5.7.1 <jane@example.com>: relay denied\n",
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].final_recipient.as_deref(), Some("jane@example.com"));
        assert_eq!(r[0].status.as_deref(), Some("5.7.1"));
        assert_eq!(r[0].action, Action::Failed);
    }

    #[test]
    fn reply_class_alone_gives_a_derived_status() {
        let r = recipients(
            "Returned mail",
            "x@example.org:\n  host said 452 mailbox full, will retry\n",
        );
        assert_eq!(r[0].status.as_deref(), Some("4.0.0"));
        assert_eq!(r[0].action, Action::Delayed);
    }
}

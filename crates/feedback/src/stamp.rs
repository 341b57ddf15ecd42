//! Stamping complaint and unsubscribe headers into a message (before it is DKIM-signed, so
//! the signature covers them).

/// What to do with a header the message already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Existing {
    /// The client's header stays and ours is not added.
    #[default]
    Keep,
    /// Every occurrence of the client's header goes and ours is added.
    Replace,
}

/// Longest line a header may make (RFC 5322 §2.1.1).
pub const MAX_LINE: usize = 998;

/// `{{ name }}` placeholders of `template` filled from `vars` (unknown names become empty);
/// control characters in values become spaces, so a value can never start a new header line.
pub fn expand(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        let value = vars.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v);
        out.extend(value.chars().map(|c| if c.is_control() { ' ' } else { c }));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Where the header section ends: the index of the blank line's CRLF (the message is CRLF
/// normalised), or the whole message when it has no body.
fn header_end(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    memchr_crlfcrlf(message).map_or(message.len(), |i| i + 2)
}

fn memchr_crlfcrlf(m: &[u8]) -> Option<usize> {
    m.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The header fields of a header section as (name, raw field bytes including continuation
/// lines and the final CRLF).
fn fields(head: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out: Vec<(&[u8], &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let line_end = head[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(head.len(), |p| i + p + 2);
        let continuation = matches!(head.get(line_end), Some(b' ' | b'\t'));
        if !continuation {
            let field = &head[start..line_end];
            let name = field
                .iter()
                .position(|b| *b == b':')
                .map_or(&field[..0], |c| &field[..c]);
            out.push((name, field));
            start = line_end;
        }
        i = line_end;
    }
    out
}

/// Whether the message's header section has a field named `name` (case-insensitive).
pub fn has_header(message: &[u8], name: &str) -> bool {
    let head = &message[..header_end(message)];
    fields(head)
        .iter()
        .any(|(n, _)| n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// Folds a long `List-Unsubscribe`-style value after its commas, so lines stay short.
fn fold(name: &str, value: &str) -> String {
    let line = format!("{name}: {value}\r\n");
    if line.len() <= 78 || !value.contains(", ") {
        return line;
    }
    format!("{name}: {}\r\n", value.replace(", ", ",\r\n "))
}

/// `message` without any field named `name` (case-insensitive, continuation lines included)
/// in its header section; the body is untouched.
pub fn remove(message: &[u8], name: &str) -> Vec<u8> {
    let end = header_end(message);
    let (head, body) = message.split_at(end);
    let mut out = Vec::with_capacity(message.len());
    for (n, field) in fields(head) {
        if !n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()) {
            out.extend_from_slice(field);
        }
    }
    out.extend_from_slice(body);
    out
}

/// `message` with `headers` added at the top of its header section, in order. Names must be
/// header names and values free of CR and LF (the caller builds them: [`expand`] makes them
/// so). With [`Existing::Keep`] a header the message already has is not added; with
/// [`Existing::Replace`] the message's occurrences are removed first.
pub fn stamp(message: &[u8], headers: &[(String, String)], existing: Existing) -> Vec<u8> {
    let end = header_end(message);
    let (head, body) = message.split_at(end);
    let present = fields(head);
    let named = |name: &str| {
        present
            .iter()
            .any(|(n, _)| n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    };
    let mut out = Vec::with_capacity(message.len() + 256);
    for (name, value) in headers {
        if existing == Existing::Keep && named(name) {
            continue;
        }
        let value: String = value
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        out.extend_from_slice(fold(name, value.trim()).as_bytes());
    }
    for (name, field) in present {
        let ours = headers
            .iter()
            .any(|(n, _)| name.trim_ascii().eq_ignore_ascii_case(n.as_bytes()));
        if existing == Existing::Replace && ours {
            continue;
        }
        out.extend_from_slice(field);
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MSG: &[u8] = b"From: a@example.com\r\nList-Unsubscribe: <mailto:old@example.com>,\r\n <https://old.example.com/u>\r\nSubject: hi\r\n\r\nbody\r\nList-Unsubscribe: in the body\r\n";

    fn h(name: &str, value: &str) -> (String, String) {
        (name.into(), value.into())
    }

    #[test]
    fn adds_at_the_top_and_keeps_the_clients_header() {
        let out = stamp(
            MSG,
            &[
                h("X-Complaints-To", "abuse@example.net"),
                h("List-Unsubscribe", "<mailto:new@example.net>"),
            ],
            Existing::Keep,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("X-Complaints-To: abuse@example.net\r\nFrom: "),
            "{text}"
        );
        assert!(!text.contains("new@example.net"));
        assert!(text.contains("<mailto:old@example.com>,\r\n <https://old.example.com/u>"));
        assert!(text.ends_with("\r\n\r\nbody\r\nList-Unsubscribe: in the body\r\n"));
    }

    #[test]
    fn replace_removes_every_folded_occurrence_but_not_the_body() {
        let out = stamp(
            MSG,
            &[h("list-unsubscribe", "<mailto:new@example.net>")],
            Existing::Replace,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("old.example.com"), "{text}");
        assert!(text.starts_with("list-unsubscribe: <mailto:new@example.net>\r\nFrom:"));
        assert!(text.contains("List-Unsubscribe: in the body"));
        assert!(has_header(text.as_bytes(), "LIST-UNSUBSCRIBE"));
    }

    #[test]
    fn long_lists_fold_and_values_cannot_inject_lines() {
        let long = format!(
            "<mailto:{}@example.net>, <https://example.net/u/{}>",
            "u".repeat(60),
            "t".repeat(60)
        );
        let out = stamp(
            b"Subject: x\r\n\r\n",
            &[
                h("List-Unsubscribe", &long),
                h("X-A", "a\r\nBcc: evil@example.com"),
            ],
            Existing::Keep,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(">,\r\n <https://"), "{text}");
        assert!(!text.contains("\r\nBcc:"), "{text}");
        assert_eq!(
            expand(
                "{{campaign}}:{{ tenant }}:drover:{{x}}",
                &[("campaign", "nov\r\nX: y"), ("tenant", "acme")]
            ),
            "nov  X: y:acme:drover:"
        );
    }

    #[test]
    fn remove_takes_out_every_occurrence_and_leaves_the_body() {
        let out = remove(MSG, "list-unsubscribe");
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("From: a@example.com\r\nSubject: hi\r\n\r\n"),
            "{text}"
        );
        assert!(text.contains("List-Unsubscribe: in the body"));
    }

    #[test]
    fn a_message_without_a_body_is_all_header() {
        let out = stamp(b"Subject: x\r\n", &[h("X-A", "1")], Existing::Keep);
        assert_eq!(out, b"X-A: 1\r\nSubject: x\r\n");
    }

    proptest! {
        #[test]
        fn the_body_is_never_touched(head in "[A-Za-z-]{1,10}: [ -~]{0,30}", body in "[ -~\r\n]{0,200}") {
            let message = format!("{head}\r\n\r\n{body}");
            for existing in [Existing::Keep, Existing::Replace] {
                let out = stamp(message.as_bytes(), &[h("X-Complaints-To", "a@b.c")], existing);
                let tail = format!("\r\n\r\n{body}");
                prop_assert!(out.ends_with(tail.as_bytes()));
            }
        }
    }
}

//! Small lexical helpers shared by the report readers: enhanced status codes (RFC 3463),
//! SMTP reply codes in prose, typed values (`rfc822; addr`, `dns; host`, `smtp; text`),
//! addresses and xtext (RFC 3461 §4).

/// Whether `s` is an enhanced status code `class.subject.detail` with class 2, 4 or 5 and
/// one to three digits in the others.
pub(crate) fn is_enhanced(s: &str) -> bool {
    let mut parts = s.split('.');
    let (Some(c), Some(a), Some(b), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    matches!(c, "2" | "4" | "5")
        && [a, b]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|d| d.is_ascii_digit()))
}

/// The first enhanced status code in free text, not taken from inside an IP address or a
/// version number.
pub(crate) fn find_enhanced(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if matches!(b[i], b'2' | b'4' | b'5')
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.'))
            && b.get(i + 1) == Some(&b'.')
        {
            if let Some(end) = enhanced_end(b, i + 2) {
                // A trailing dot is a sentence end, a dot and a digit another number part.
                let next_ok = match b.get(end) {
                    None => true,
                    Some(c) if c.is_ascii_alphanumeric() => false,
                    Some(b'.') => !b.get(end + 1).is_some_and(u8::is_ascii_digit),
                    Some(_) => true,
                };
                if next_ok {
                    return Some(text[i..end].to_string());
                }
            }
        }
        i += 1;
    }
    None
}

/// End of `digits.digits` starting at `start` (1–3 digits each), if they are there.
fn enhanced_end(b: &[u8], start: usize) -> Option<usize> {
    let digits = |from: usize| {
        let n = b[from.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        (1..=3).contains(&n).then_some(from + n)
    };
    let mid = digits(start)?;
    if b.get(mid) != Some(&b'.') {
        return None;
    }
    digits(mid + 1)
}

/// The class (4 or 5) of the first SMTP reply code in free text: three digits starting with
/// 4 or 5, standing as a word and followed by a space, a dash (multi-line reply), a quote,
/// a bracket or the end.
pub(crate) fn find_reply_class(text: &str) -> Option<u8> {
    let b = text.as_bytes();
    let mut i = 0;
    while i + 3 <= b.len() {
        if matches!(b[i], b'4' | b'5')
            && b[i + 1].is_ascii_digit()
            && b[i + 2].is_ascii_digit()
            && (i == 0
                || !(b[i - 1].is_ascii_alphanumeric()
                    || matches!(b[i - 1], b'.' | b'-' | b'/' | b'_' | b'=' | b'+')))
            && b.get(i + 3).is_none_or(|c| {
                matches!(
                    c,
                    b' ' | b'-' | b'\'' | b'"' | b')' | b']' | b'\t' | b'\r' | b'\n'
                )
            })
        {
            return Some(b[i] - b'0');
        }
        i += 1;
    }
    None
}

/// Removes an RFC 3464 type prefix (`rfc822;`, `dns;`, `smtp;`, `utf-8;`, `X-Postfix;`): an
/// atom before the first semicolon. Values without one are returned trimmed.
pub(crate) fn strip_type(value: &str) -> &str {
    let value = value.trim();
    if let Some(semi) = value.find(';') {
        let ty = value[..semi].trim();
        if !ty.is_empty()
            && ty.len() <= 32
            && ty
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return value[semi + 1..].trim();
        }
    }
    value
}

/// The bare address of a typed or bracketed value: `rfc822; <a@b>` → `a@b`; the first word
/// when there are no brackets (`a@b (comment)` → `a@b`).
pub(crate) fn clean_address(value: &str) -> Option<String> {
    let v = strip_type(value);
    let inner = match v.find('<') {
        Some(start) => {
            let rest = &v[start + 1..];
            rest.find('>').map_or(rest, |end| &rest[..end])
        }
        None => v.split_whitespace().next().unwrap_or(""),
    };
    let inner = inner
        .trim()
        .trim_matches(|c| matches!(c, '<' | '>' | '"' | '\'' | ','));
    (!inner.is_empty()).then(|| inner.to_string())
}

/// A value with its type prefix removed, `None` when empty.
pub(crate) fn typed_text(value: &str) -> Option<String> {
    let v = strip_type(value);
    (!v.is_empty()).then(|| v.to_string())
}

/// xtext decoding (RFC 3461 §4): `+XX` is the byte with that hex value. A `+` not followed
/// by two hex digits is kept as it is; bytes that are not UTF-8 are replaced.
pub(crate) fn xtext_decode(value: &str) -> String {
    let b = value.trim().as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `s` looks like an addr-spec: one `@` with a non-empty local part and a dotted (or
/// bracketed literal) domain, no spaces or brackets.
pub(crate) fn is_address(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && s.len() <= 320
        && !domain.is_empty()
        && (domain.contains('.') || domain.starts_with('['))
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, '<' | '>' | '(' | ')' | ',' | ';' | ':' | '"')
        })
        && !local.contains('@')
}

/// A message id without its angle brackets and surrounding space.
pub(crate) fn clean_message_id(value: &str) -> Option<String> {
    let v = value.trim();
    let inner = match v.find('<') {
        Some(start) => {
            let rest = &v[start + 1..];
            rest.find('>').map_or(rest, |end| &rest[..end])
        }
        None => v.split_whitespace().next().unwrap_or(""),
    };
    let inner = inner.trim();
    (!inner.is_empty()).then(|| inner.to_string())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes() {
        assert!(is_enhanced("5.1.1"));
        assert!(is_enhanced("4.7.650"));
        assert!(!is_enhanced("3.1.1"));
        assert!(!is_enhanced("5.1"));
        assert!(!is_enhanced("5.1.1.1"));
        assert!(!is_enhanced("5.1.1234"));
        assert_eq!(
            find_enhanced("said: 550 5.1.1 <x@y>").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(find_enhanced("550-5.2.2 full").as_deref(), Some("5.2.2"));
        assert_eq!(find_enhanced("(#5.1.1)").as_deref(), Some("5.1.1"));
        assert_eq!(find_enhanced("ends 4.4.7."), Some("4.4.7".to_string()));
        assert_eq!(find_enhanced("host [192.0.2.25] and 10.5.1.1"), None);
        assert_eq!(find_enhanced("version 2.4.5.1"), None);
    }

    #[test]
    fn reply_codes() {
        assert_eq!(find_reply_class("said: 550 5.1.1 unknown"), Some(5));
        assert_eq!(find_reply_class("452-4.2.2 over quota"), Some(4));
        assert_eq!(find_reply_class("returned '550 5.1.1 RESOLVER'"), Some(5));
        assert_eq!(find_reply_class("port 4650 and id 550x"), None);
        assert_eq!(find_reply_class("x-550 and 1550 "), None);
    }

    #[test]
    fn typed_values() {
        assert_eq!(
            clean_address("rfc822; <Jane@Example.com>").as_deref(),
            Some("Jane@Example.com")
        );
        assert_eq!(
            clean_address("rfc822;jane@example.com").as_deref(),
            Some("jane@example.com")
        );
        assert_eq!(
            clean_address("jane@example.com (Jane)").as_deref(),
            Some("jane@example.com")
        );
        assert_eq!(clean_address("rfc822;"), None);
        assert_eq!(
            typed_text("smtp; 550 5.1.1 no; really").as_deref(),
            Some("550 5.1.1 no; really")
        );
        assert_eq!(typed_text("550 x; y").as_deref(), Some("550 x; y"));
        assert_eq!(
            typed_text("dns;mx.example.com").as_deref(),
            Some("mx.example.com")
        );
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_decode("abc+2Bdef+3D+20x"), "abc+def= x");
        assert_eq!(xtext_decode("a+zz+2"), "a+zz+2");
    }

    #[test]
    fn addresses() {
        assert!(is_address("jane@example.com"));
        assert!(is_address("b1.x.y.jane=example.com@bounces.example.net"));
        assert!(!is_address("postmaster"));
        assert!(!is_address("jane@localhost"));
        assert!(!is_address("a b@example.com"));
    }
}

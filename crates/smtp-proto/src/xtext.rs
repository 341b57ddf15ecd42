//! xtext (RFC 3461 §4): how DSN parameters (`ENVID`, `ORCPT`) carry arbitrary text in an
//! ESMTP parameter value.

/// `text` as xtext: `+`, `=`, controls, space and anything outside printable ASCII become
/// `+HH` (hex of each UTF-8 byte).
pub fn xtext_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Decodes xtext; a malformed `+HH` is kept as written (reports come from strangers).
pub fn xtext_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            if let Some(v) = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_examples() {
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(
            xtext_encode("rfc822;jane@example.com"),
            "rfc822;jane@example.com"
        );
        assert_eq!(xtext_decode("a+2Bb+3Dc+20d"), "a+b=c d");
        assert_eq!(xtext_decode("bad+zz+"), "bad+zz+");
    }

    proptest! {
        #[test]
        fn round_trips_and_stays_a_parameter_value(s in "\\PC{0,40}") {
            let e = xtext_encode(&s);
            prop_assert!(e.bytes().all(|b| (b'!'..=b'~').contains(&b) && b != b'='));
            prop_assert_eq!(xtext_decode(&e), s);
        }
    }
}

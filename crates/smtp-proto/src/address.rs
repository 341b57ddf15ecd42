use std::net::{Ipv4Addr, Ipv6Addr};

use crate::error::ProtoError;

/// RFC 5321 section 4.5.3.1.1.
const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 section 4.5.3.1.3 (path of 256 octets minus the angle brackets).
const MAX_MAILBOX: usize = 254;
const MAX_DOMAIN: usize = 253;
const MAX_LABEL: usize = 63;

fn invalid(addr: &str, reason: &'static str) -> ProtoError {
    ProtoError::InvalidAddress {
        address: addr.to_string(),
        reason,
    }
}

/// Validates an RFC 5321 mailbox `local@domain`.
///
/// The local part is a dot-atom or a quoted string; the domain is a host name
/// or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`). Non-ASCII
/// UTF-8 is allowed in both, for SMTPUTF8. Fails for an empty address, a
/// missing `@`, CR/LF/NUL, unquoted spaces or angle brackets, a local part
/// over 64 octets or a mailbox over 254 octets.
pub fn validate_mailbox(addr: &str) -> Result<(), ProtoError> {
    if addr.is_empty() {
        return Err(invalid(addr, "empty address"));
    }
    if addr.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(invalid(addr, "contains CR, LF or NUL"));
    }
    if addr.len() > MAX_MAILBOX {
        return Err(invalid(addr, "address longer than 254 octets"));
    }
    let (local, domain) = split_mailbox(addr)?;
    if local.len() > MAX_LOCAL_PART {
        return Err(invalid(addr, "local part longer than 64 octets"));
    }
    if !local.starts_with('"') && !is_dot_atom(local) {
        return Err(invalid(addr, "invalid local part"));
    }
    validate_domain(domain).map_err(|reason| invalid(addr, reason))
}

/// Splits at the `@` that ends the local part, honouring a quoted local part
/// (which may itself contain `@`).
fn split_mailbox(addr: &str) -> Result<(&str, &str), ProtoError> {
    let bytes = addr.as_bytes();
    let at = if bytes.first() == Some(&b'"') {
        let mut i = 1;
        loop {
            match bytes.get(i) {
                None => return Err(invalid(addr, "unterminated quoted local part")),
                Some(b'\\') => {
                    match bytes.get(i + 1) {
                        Some(b) if (32..=126).contains(b) => {}
                        _ => return Err(invalid(addr, "invalid quoted pair")),
                    }
                    i += 2;
                }
                Some(b'"') => break i + 1,
                Some(&b) if b < 32 || b == 127 => {
                    return Err(invalid(addr, "control character in quoted local part"))
                }
                Some(_) => i += 1,
            }
        }
    } else {
        match addr.find('@') {
            Some(i) => i,
            None => return Err(invalid(addr, "missing @")),
        }
    };
    if bytes.get(at) != Some(&b'@') {
        return Err(invalid(addr, "missing @ after local part"));
    }
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if local.is_empty() {
        return Err(invalid(addr, "empty local part"));
    }
    Ok((local, domain))
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

fn validate_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("empty domain");
    }
    if let Some(literal) = domain.strip_prefix('[') {
        let Some(literal) = literal.strip_suffix(']') else {
            return Err("unterminated address literal");
        };
        return validate_literal(literal);
    }
    if domain.len() > MAX_DOMAIN {
        return Err("domain longer than 253 octets");
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err("empty domain label");
        }
        if label.len() > MAX_LABEL {
            return Err("domain label longer than 63 octets");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("domain label starts or ends with a hyphen");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        {
            return Err("invalid character in domain");
        }
    }
    Ok(())
}

fn validate_literal(literal: &str) -> Result<(), &'static str> {
    if literal.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let Some((tag, content)) = literal.split_once(':') else {
        return Err("invalid IPv4 address literal");
    };
    if tag.eq_ignore_ascii_case("IPv6") {
        return content
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| "invalid IPv6 address literal");
    }
    // General-address-literal (RFC 5321 4.1.3): Standardized-tag ":" dcontent.
    let tag_ok = !tag.is_empty()
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !tag.ends_with('-');
    let content_ok =
        !content.is_empty() && content.bytes().all(|b| matches!(b, 33..=90 | 94..=126));
    if tag_ok && content_ok {
        Ok(())
    } else {
        Err("invalid address literal")
    }
}

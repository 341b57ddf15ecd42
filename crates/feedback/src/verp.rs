//! VERP envelope senders: one address per message under a bounce domain, from which a
//! bounce or an unsubscribe mail names the message and its recipient without a lookup.
//!
//! The form (local part, all lowercase letters and digits but the recipient):
//!
//! ```text
//! b1.<id>.<tag>.<recipient local part>=<recipient domain>@<bounce domain>
//! u1.<id>.<tag>.<recipient local part>=<recipient domain>@<bounce domain>
//! ```
//!
//! `b1` marks a bounce address (the envelope sender), `u1` an unsubscribe address (the
//! `mailto:` of `List-Unsubscribe`); `<id>` is the message id's 16 bytes in base32 (26
//! characters, RFC 4648 alphabet, lowercase, no padding); `<tag>` is the first 5 bytes of
//! HMAC-SHA256 over the kind, the id and the lowercased recipient in base32 (8 characters).
//! The recipient part is left out when the recipient's local part is not a plain dot-atom
//! (quoted, or UTF-8): the address must stay one a receiver can write back to. Decoding
//! ignores case in everything but the recipient, which the tag covers lowercased, so an MTA
//! that lowercases the address does not break it.

use crate::{FeedbackError, Keys};

/// What an address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The envelope sender: DSNs and non-standard bounces come back to it.
    Bounce,
    /// The `mailto:` unsubscribe address.
    Unsubscribe,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Bounce => "b1",
            Kind::Unsubscribe => "u1",
        }
    }
}

/// A decoded, verified address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verp {
    /// What it is for.
    pub kind: Kind,
    /// The message id's bytes.
    pub id: [u8; 16],
    /// The recipient, when the address carries it.
    pub recipient: Option<String>,
}

const WHAT: &str = "VERP address";
const TAG_BYTES: usize = 5;
const ID_CHARS: usize = 26;
const TAG_CHARS: usize = 8;

fn malformed(why: &'static str) -> FeedbackError {
    FeedbackError::Malformed { what: WHAT, why }
}

pub(crate) fn base32(bytes: &[u8]) -> String {
    data_encoding::BASE32_NOPAD
        .encode(bytes)
        .to_ascii_lowercase()
}

pub(crate) fn unbase32(text: &str) -> Option<Vec<u8>> {
    data_encoding::BASE32_NOPAD
        .decode(text.to_ascii_uppercase().as_bytes())
        .ok()
}

fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// Whether `local` can be written as it is in a dot-atom local part.
fn is_dot_atom(local: &str) -> bool {
    !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

fn tag_parts(kind: Kind, id: &[u8; 16], recipient: &str) -> ([u8; 1], [u8; 16], String) {
    let k = match kind {
        Kind::Bounce => b'b',
        Kind::Unsubscribe => b'u',
    };
    ([k], *id, recipient.to_ascii_lowercase())
}

/// The address of `kind` for message `id` to `recipient`, under `bounce_domain`.
pub fn encode(
    keys: &Keys,
    kind: Kind,
    id: [u8; 16],
    recipient: &str,
    bounce_domain: &str,
) -> String {
    let carried = recipient
        .rsplit_once('@')
        .filter(|(local, domain)| is_dot_atom(local) && !domain.is_empty() && domain.is_ascii())
        .map(|(local, domain)| format!("{local}={domain}"));
    let tagged = carried.as_deref().map_or("", |_| recipient);
    let (k, id_bytes, rcpt) = tag_parts(kind, &id, tagged);
    let tag = keys.tag(
        b"drover-verp-1",
        &[&k, &id_bytes, rcpt.as_bytes()],
        TAG_BYTES,
    );
    let mut out = format!("{}.{}.{}", kind.prefix(), base32(&id), base32(&tag));
    if let Some(c) = carried {
        out.push('.');
        out.push_str(&c);
    }
    out.push('@');
    out.push_str(bounce_domain);
    out
}

/// Reads and verifies an address [`encode`] wrote (angle brackets and a trailing dot on the
/// domain are tolerated). The domain is not checked here: the caller knows its bounce
/// domains.
pub fn decode(keys: &Keys, address: &str) -> Result<Verp, FeedbackError> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let (local, _domain) = address.rsplit_once('@').ok_or(malformed("no @"))?;
    let mut parts = local.splitn(4, '.');
    let kind = match parts.next().map(str::to_ascii_lowercase).as_deref() {
        Some("b1") => Kind::Bounce,
        Some("u1") => Kind::Unsubscribe,
        _ => return Err(malformed("unknown prefix")),
    };
    let id_text = parts.next().ok_or(malformed("no message id"))?;
    let tag_text = parts.next().ok_or(malformed("no tag"))?;
    if id_text.len() != ID_CHARS || tag_text.len() != TAG_CHARS {
        return Err(malformed("wrong id or tag length"));
    }
    let id: [u8; 16] = unbase32(id_text)
        .and_then(|v| v.try_into().ok())
        .ok_or(malformed("the message id is not base32"))?;
    let tag = unbase32(tag_text).ok_or(malformed("the tag is not base32"))?;
    let recipient = match parts.next() {
        None => None,
        Some(carried) => {
            let (local, domain) = carried
                .rsplit_once('=')
                .ok_or(malformed("the recipient part has no ="))?;
            if local.is_empty() || domain.is_empty() {
                return Err(malformed("empty recipient part"));
            }
            Some(format!("{local}@{domain}"))
        }
    };
    let (k, id_bytes, rcpt) = tag_parts(kind, &id, recipient.as_deref().unwrap_or(""));
    if !keys.verify(b"drover-verp-1", &[&k, &id_bytes, rcpt.as_bytes()], &tag) {
        return Err(FeedbackError::BadTag { what: WHAT });
    }
    Ok(Verp {
        kind,
        id,
        recipient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::new(&[b"0123456789abcdef0123456789abcdef"]).unwrap()
    }

    const ID: [u8; 16] = *b"\x01\x93\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd";

    #[test]
    fn round_trip_with_the_recipient() {
        let a = encode(
            &keys(),
            Kind::Bounce,
            ID,
            "Jane.Doe+x@Example.COM",
            "bounces.example.net",
        );
        assert!(a.starts_with("b1."), "{a}");
        assert!(
            a.ends_with(".Jane.Doe+x=Example.COM@bounces.example.net"),
            "{a}"
        );
        let v = decode(&keys(), &a).unwrap();
        assert_eq!(v.kind, Kind::Bounce);
        assert_eq!(v.id, ID);
        assert_eq!(v.recipient.as_deref(), Some("Jane.Doe+x@Example.COM"));
        // An MTA that lowercases or uppercases the address does not break it.
        assert_eq!(decode(&keys(), &a.to_ascii_lowercase()).unwrap().id, ID);
        assert_eq!(decode(&keys(), &a.to_ascii_uppercase()).unwrap().id, ID);
        assert_eq!(decode(&keys(), &format!("<{a}>")).unwrap().id, ID);
    }

    #[test]
    fn recipients_that_need_quoting_are_left_out() {
        for r in [
            "\"john doe\"@example.com",
            "jöhn@example.com",
            "a..b@example.com",
        ] {
            let a = encode(&keys(), Kind::Unsubscribe, ID, r, "b.example.net");
            let local = a.split('@').next().unwrap();
            assert_eq!(local.matches('.').count(), 2, "{a}");
            let v = decode(&keys(), &a).unwrap();
            assert_eq!((v.kind, v.recipient), (Kind::Unsubscribe, None));
        }
    }

    #[test]
    fn forged_and_altered_addresses_are_refused() {
        let a = encode(
            &keys(),
            Kind::Bounce,
            ID,
            "jane@example.com",
            "b.example.net",
        );
        // Another recipient, another id, another kind, another key.
        let other_rcpt = a.replace("jane=", "john=");
        assert!(matches!(
            decode(&keys(), &other_rcpt),
            Err(FeedbackError::BadTag { .. })
        ));
        let mut other_id = ID;
        other_id[15] ^= 1;
        let forged = a.replace(&base32(&ID), &base32(&other_id));
        assert!(matches!(
            decode(&keys(), &forged),
            Err(FeedbackError::BadTag { .. })
        ));
        let other_kind = a.replacen("b1.", "u1.", 1);
        assert!(matches!(
            decode(&keys(), &other_kind),
            Err(FeedbackError::BadTag { .. })
        ));
        let stranger = Keys::new(&[b"another key of sixteen bytes!!"]).unwrap();
        assert!(matches!(
            decode(&stranger, &a),
            Err(FeedbackError::BadTag { .. })
        ));
        for junk in ["", "@", "postmaster@b.example.net", "b1.x.y@b", "b1.abc@b"] {
            assert!(decode(&keys(), junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn a_rotated_key_still_verifies_old_addresses() {
        let old = keys();
        let a = encode(&old, Kind::Bounce, ID, "jane@example.com", "b.example.net");
        let rotated = Keys::new(&[
            b"the new signing key, 32 bytes!!!".as_slice(),
            b"0123456789abcdef0123456789abcdef".as_slice(),
        ])
        .unwrap();
        assert_eq!(decode(&rotated, &a).unwrap().id, ID);
        let b = encode(
            &rotated,
            Kind::Bounce,
            ID,
            "jane@example.com",
            "b.example.net",
        );
        assert_ne!(a, b, "the new key signs");
        assert!(decode(&old, &b).is_err());
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Keys::new(&[b"short"]).is_err());
        assert!(Keys::new::<&[u8]>(&[]).is_err());
    }

    proptest! {
        #[test]
        fn any_id_and_dot_atom_recipient_round_trips(
            id in any::<[u8; 16]>(),
            local in "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\\.[a-zA-Z0-9_+-]{1,8}){0,2}",
            domain in "[a-z0-9-]{1,20}\\.[a-z]{2,6}",
        ) {
            let recipient = format!("{local}@{domain}");
            let a = encode(&keys(), Kind::Bounce, id, &recipient, "bounces.example.net");
            let v = decode(&keys(), &a).unwrap();
            prop_assert_eq!(v.id, id);
            prop_assert_eq!(v.recipient, Some(recipient));
        }

        #[test]
        fn decoding_junk_never_panics(s in "\\PC{0,120}") {
            let _ = decode(&keys(), &s);
        }
    }
}

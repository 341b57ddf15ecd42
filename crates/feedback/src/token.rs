//! Tokens of one-click unsubscribe URLs (RFC 8058): who unsubscribes from what, tagged so
//! that nobody can unsubscribe an address by making up a URL.
//!
//! A token is `<payload>.<tag>`: the payload is base64url (no padding) of a version byte, the
//! message id's 16 bytes and three length-prefixed UTF-8 strings (recipient, tenant,
//! campaign; empty for none); the tag is the first 10 bytes of HMAC-SHA256 over the payload
//! bytes, in base32 (16 characters, lowercase).

use crate::{FeedbackError, Keys};

const WHAT: &str = "unsubscribe token";
const VERSION: u8 = 1;
const TAG_BYTES: usize = 10;
/// Longest string field: an address is at most 254 octets, tenant and campaign names are
/// short; a token must fit a URL.
const MAX_FIELD: usize = 255;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The message the link was in.
    pub id: [u8; 16],
    /// Who unsubscribes.
    pub recipient: String,
    /// From which tenant's mail (the suppression list is per tenant).
    pub tenant: Option<String>,
    /// The campaign the message belonged to.
    pub campaign: Option<String>,
}

fn malformed(why: &'static str) -> FeedbackError {
    FeedbackError::Malformed { what: WHAT, why }
}

/// The token for `u`. Fields longer than 255 bytes are cut (at a character boundary).
pub fn encode(keys: &Keys, u: &Unsubscribe) -> String {
    let mut payload = vec![VERSION];
    payload.extend_from_slice(&u.id);
    for field in [
        u.recipient.as_str(),
        u.tenant.as_deref().unwrap_or(""),
        u.campaign.as_deref().unwrap_or(""),
    ] {
        let mut end = field.len().min(MAX_FIELD);
        while !field.is_char_boundary(end) {
            end -= 1;
        }
        payload.push(end as u8);
        payload.extend_from_slice(&field.as_bytes()[..end]);
    }
    let tag = keys.tag(b"drover-unsubscribe-1", &[&payload], TAG_BYTES);
    format!(
        "{}.{}",
        data_encoding::BASE64URL_NOPAD.encode(&payload),
        crate::verp::base32(&tag)
    )
}

/// Reads and verifies a token.
pub fn decode(keys: &Keys, token: &str) -> Result<Unsubscribe, FeedbackError> {
    let (payload_text, tag_text) = token.trim().split_once('.').ok_or(malformed("no tag"))?;
    let payload = data_encoding::BASE64URL_NOPAD
        .decode(payload_text.as_bytes())
        .map_err(|_| malformed("the payload is not base64url"))?;
    let tag = crate::verp::unbase32(tag_text).ok_or(malformed("the tag is not base32"))?;
    if tag.len() != TAG_BYTES {
        return Err(malformed("wrong tag length"));
    }
    if !keys.verify(b"drover-unsubscribe-1", &[&payload], &tag) {
        return Err(FeedbackError::BadTag { what: WHAT });
    }
    // Verified: the bytes are ours, but read them defensively all the same.
    let (&version, rest) = payload.split_first().ok_or(malformed("empty"))?;
    if version != VERSION {
        return Err(malformed("unknown version"));
    }
    if rest.len() < 16 {
        return Err(malformed("too short"));
    }
    let (id, mut rest) = rest.split_at(16);
    let mut fields = Vec::with_capacity(3);
    for _ in 0..3 {
        let (&len, tail) = rest.split_first().ok_or(malformed("truncated"))?;
        let len = usize::from(len);
        if tail.len() < len {
            return Err(malformed("truncated"));
        }
        let (field, tail) = tail.split_at(len);
        fields.push(
            String::from_utf8(field.to_vec()).map_err(|_| malformed("a field is not UTF-8"))?,
        );
        rest = tail;
    }
    let optional = |s: String| (!s.is_empty()).then_some(s);
    let mut fields = fields.into_iter();
    let recipient = fields.next().unwrap_or_default();
    if recipient.is_empty() {
        return Err(malformed("no recipient"));
    }
    Ok(Unsubscribe {
        id: id.try_into().map_err(|_| malformed("too short"))?,
        recipient,
        tenant: fields.next().and_then(optional),
        campaign: fields.next().and_then(optional),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::new(&[b"0123456789abcdef0123456789abcdef"]).unwrap()
    }

    fn sample() -> Unsubscribe {
        Unsubscribe {
            id: [7; 16],
            recipient: "jane@example.com".into(),
            tenant: Some("acme".into()),
            campaign: Some("nov-news".into()),
        }
    }

    #[test]
    fn round_trip_and_url_safe() {
        let t = encode(&keys(), &sample());
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{t}"
        );
        assert_eq!(decode(&keys(), &t).unwrap(), sample());
        let bare = Unsubscribe {
            tenant: None,
            campaign: None,
            ..sample()
        };
        assert_eq!(decode(&keys(), &encode(&keys(), &bare)).unwrap(), bare);
    }

    #[test]
    fn forged_tokens_are_refused() {
        let t = encode(&keys(), &sample());
        let other = encode(
            &keys(),
            &Unsubscribe {
                recipient: "john@example.com".into(),
                ..sample()
            },
        );
        // Someone else's payload with this tag.
        let (p, _) = other.split_once('.').unwrap();
        let (_, tag) = t.split_once('.').unwrap();
        assert!(matches!(
            decode(&keys(), &format!("{p}.{tag}")),
            Err(FeedbackError::BadTag { .. })
        ));
        let stranger = Keys::new(&[b"another key of sixteen bytes!!"]).unwrap();
        assert!(decode(&stranger, &t).is_err());
        for junk in ["", ".", "abc", "abc.def", "!!!.aaaaaaaaaaaaaaaa"] {
            assert!(decode(&keys(), junk).is_err(), "{junk}");
        }
    }

    proptest! {
        #[test]
        fn any_fields_round_trip(
            id in any::<[u8; 16]>(),
            recipient in "\\PC{1,60}",
            tenant in proptest::option::of("\\PC{1,30}"),
            campaign in proptest::option::of("\\PC{1,30}"),
        ) {
            let u = Unsubscribe { id, recipient, tenant, campaign };
            prop_assert_eq!(decode(&keys(), &encode(&keys(), &u)).unwrap(), u);
        }

        #[test]
        fn decoding_junk_never_panics(s in "\\PC{0,200}") {
            let _ = decode(&keys(), &s);
        }
    }
}

//! The keys that tag VERP addresses and unsubscribe tokens: the first signs, every one
//! verifies, so a key can be rotated without orphaning the reports to mail already sent.

use crate::FeedbackError;
use ring::hmac;

/// Shortest secret accepted (bytes): 128 bits.
pub const MIN_KEY_BYTES: usize = 16;

/// HMAC-SHA256 keys, newest first.
#[derive(Clone)]
pub struct Keys {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Keys")
            .field("count", &self.keys.len())
            .finish()
    }
}

impl Keys {
    /// Keys from raw secrets, the signing one first. Each must have at least
    /// [`MIN_KEY_BYTES`] bytes.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Keys, FeedbackError> {
        if secrets.is_empty() {
            return Err(FeedbackError::Key("no key".into()));
        }
        let keys = secrets
            .iter()
            .map(|s| {
                let s = s.as_ref();
                if s.len() < MIN_KEY_BYTES {
                    return Err(FeedbackError::Key(format!(
                        "a key of {} bytes; at least {MIN_KEY_BYTES} are needed",
                        s.len()
                    )));
                }
                Ok(hmac::Key::new(hmac::HMAC_SHA256, s))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keys { keys })
    }

    /// The tag of `parts` (joined unambiguously) under the signing key, cut to `len` bytes.
    pub(crate) fn tag(&self, domain_separator: &[u8], parts: &[&[u8]], len: usize) -> Vec<u8> {
        let full = sign(&self.keys[0], domain_separator, parts);
        full.as_ref()[..len.min(full.as_ref().len())].to_vec()
    }

    /// Whether `tag` is the tag of `parts` under any key (constant time per key).
    pub(crate) fn verify(&self, domain_separator: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        if tag.is_empty() {
            return false;
        }
        self.keys.iter().any(|key| {
            let full = sign(key, domain_separator, parts);
            let full = full.as_ref();
            tag.len() <= full.len()
                && bool::from(subtle::ConstantTimeEq::ct_eq(&full[..tag.len()], tag))
        })
    }
}

fn sign(key: &hmac::Key, domain_separator: &[u8], parts: &[&[u8]]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(domain_separator);
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.sign()
}

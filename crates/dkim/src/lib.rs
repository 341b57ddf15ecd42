//! DKIM signing of outbound mail (RFC 6376; Ed25519 per RFC 8463), on `mail-auth`.
//!
//! [`Signers::load`] reads every configured key once, at start-up, so a missing or unreadable
//! key is a configuration error and never a surprise at injection time. [`Signers::sign`] picks
//! the keys for a message by its From domain (the most specific configured domain that equals
//! it or is a parent of it) and prepends one `DKIM-Signature:` header per key of that domain
//! (several keys for one domain, e.g. RSA and Ed25519, give a dual signature).
//!
//! Signatures use relaxed/relaxed canonicalization and cover the headers of
//! [`SIGNED_HEADERS`] that the message has, plus one extra `From` in `h=` so that a second
//! From header added in transit breaks the signature.

use mail_auth::common::crypto::{Algorithm, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "testing")]
pub mod testing;

/// Header fields signed when present, in the order they are listed in `h=` lookups.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
    "Feedback-ID",
    "X-Campaign",
    // Stamped by Drover's feedback loop (issue 11): a receiver trusts where complaints go
    // only when the signature covers it.
    "X-Complaints-To",
    "X-CSA-Complaints",
];

/// Why a key could not be loaded or a message could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DkimError {
    /// The key file of entry `index` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Position of the entry in the list given to [`Signers::load`].
        index: usize,
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file of entry `index` holds no usable RSA or Ed25519 private key.
    #[error("{path}: {reason}")]
    Key {
        /// Position of the entry in the list given to [`Signers::load`].
        index: usize,
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Entry `index` has an empty or malformed domain or selector.
    #[error("{reason}")]
    Entry {
        /// Position of the entry in the list given to [`Signers::load`].
        index: usize,
        /// `domain` or `selector`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The message cannot be signed as it is (e.g. two From headers): retrying the same bytes
    /// fails the same way.
    #[error("message not signable: {0}")]
    Message(String),
    /// The signature could not be computed.
    #[error("signing failed: {0}")]
    Sign(String),
}

impl DkimError {
    /// For a loading error, the offending entry's key as `[[dkim]]` names it, e.g.
    /// `dkim[2].key_file`.
    pub fn config_key(&self) -> Option<String> {
        let field = match self {
            DkimError::Read { .. } | DkimError::Key { .. } => "key_file",
            DkimError::Entry { field, .. } => field,
            DkimError::Message(_) | DkimError::Sign(_) => return None,
        };
        Some(format!("dkim[{}].{field}", self.entry_index()?))
    }

    /// For a loading error, the position of the offending entry.
    pub fn entry_index(&self) -> Option<usize> {
        match self {
            DkimError::Read { index, .. }
            | DkimError::Key { index, .. }
            | DkimError::Entry { index, .. } => Some(*index),
            DkimError::Message(_) | DkimError::Sign(_) => None,
        }
    }
}

/// One `[[dkim]]` entry: sign mail whose From domain is `domain` (or a subdomain of it) with
/// the key in `key_file`, published at `<selector>._domainkey.<domain>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    /// Signing domain (`d=`).
    pub domain: String,
    /// Selector (`s=`).
    pub selector: String,
    /// PEM private key: RSA (PKCS#1 or PKCS#8) or Ed25519 (PKCS#8).
    pub key_file: PathBuf,
}

/// The key kinds DKIM knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `rsa-sha256`.
    Rsa,
    /// `ed25519-sha256` (RFC 8463).
    Ed25519,
}

/// `mail-auth` signers own their key; sharing one loaded key across the per-message signers
/// avoids re-parsing (or cloning) RSA keys for every message.
struct SharedKey(Arc<DkimKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

struct Signer {
    domain: String,
    selector: String,
    kind: KeyKind,
    key: Arc<DkimKey>,
    /// The `p=` value of the key's DNS record.
    public_key: String,
}

/// Every configured signing key, ready to sign.
#[derive(Default)]
pub struct Signers {
    signers: Vec<Signer>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.signers
                    .iter()
                    .map(|s| (&s.domain, &s.selector, s.kind)),
            )
            .finish()
    }
}

/// A domain as compared: lower case, without a trailing dot.
fn normalize_domain(domain: &str) -> String {
    domain.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn load_key(index: usize, path: &Path) -> Result<(DkimKey, KeyKind, String), DkimError> {
    let pem = std::fs::read(path).map_err(|source| DkimError::Read {
        index,
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| DkimError::Key {
        index,
        path: path.to_owned(),
        reason,
    };
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| bad(format!("not a PEM private key ({e})")))?;
    match der {
        PrivateKeyDer::Pkcs8(ref pkcs8) => {
            // PKCS#8 carries either algorithm; Ed25519 is the cheap check.
            if let Ok(key) = Ed25519Key::from_pkcs8_der(pkcs8.secret_pkcs8_der()) {
                let public = encodify::base64::STANDARD.encode(key.public_key());
                return Ok((DkimKey::Ed25519(key), KeyKind::Ed25519, public));
            }
            let key = RsaKey::<Sha256>::from_key_der(der.clone_key())
                .map_err(|e| bad(format!("neither an RSA nor an Ed25519 key ({e})")))?;
            let public = rsa_public_key(&key).map_err(bad)?;
            Ok((DkimKey::Rsa(key), KeyKind::Rsa, public))
        }
        PrivateKeyDer::Pkcs1(_) => {
            let key = RsaKey::<Sha256>::from_key_der(der)
                .map_err(|e| bad(format!("not a valid RSA key ({e})")))?;
            let public = rsa_public_key(&key).map_err(bad)?;
            Ok((DkimKey::Rsa(key), KeyKind::Rsa, public))
        }
        _ => Err(bad(
            "an EC (SEC1) key: DKIM signs with RSA or Ed25519 only".into()
        )),
    }
}

/// The SubjectPublicKeyInfo form, as `openssl rsa -pubout` prints it and as verifiers expect
/// in `p=` (mail-auth hands out PKCS#1).
fn rsa_public_key(key: &RsaKey<Sha256>) -> Result<String, String> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::traits::PublicKeyParts;
    let public = rsa::RsaPublicKey::from_pkcs1_der(&key.public_key())
        .map_err(|e| format!("cannot derive the public key ({e})"))?;
    if public.size() < 128 {
        return Err(format!(
            "an RSA key of {} bits: receivers ignore DKIM keys under 1024 bits",
            public.size() * 8
        ));
    }
    let der = public
        .to_public_key_der()
        .map_err(|e| format!("cannot encode the public key ({e})"))?;
    Ok(encodify::base64::STANDARD.encode(der.as_bytes()))
}

fn valid_label_text(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Signers {
    /// Reads and parses every key. The first bad entry is the error; its
    /// [`DkimError::entry_index`] says which.
    pub fn load(keys: &[KeyConfig]) -> Result<Signers, DkimError> {
        let mut signers = Vec::with_capacity(keys.len());
        for (index, k) in keys.iter().enumerate() {
            let domain = normalize_domain(&k.domain);
            if !valid_label_text(&domain) {
                return Err(DkimError::Entry {
                    index,
                    field: "domain",
                    reason: format!("domain {:?} is not a domain name", k.domain),
                });
            }
            if !valid_label_text(&k.selector) {
                return Err(DkimError::Entry {
                    index,
                    field: "selector",
                    reason: format!("selector {:?} is not a DNS label", k.selector),
                });
            }
            let (key, kind, public_key) = load_key(index, &k.key_file)?;
            signers.push(Signer {
                domain,
                selector: k.selector.clone(),
                kind,
                key: Arc::new(key),
                public_key,
            });
        }
        Ok(Signers { signers })
    }

    /// Whether no key is configured (then nothing is ever signed).
    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    /// The DNS TXT record each key needs: `(name, value)`, e.g.
    /// `("s1._domainkey.example.com", "v=DKIM1; k=rsa; p=MIIB...")`.
    pub fn dns_records(&self) -> Vec<(String, String)> {
        self.signers
            .iter()
            .map(|s| {
                let k = match s.kind {
                    KeyKind::Rsa => "rsa",
                    KeyKind::Ed25519 => "ed25519",
                };
                (
                    format!("{}._domainkey.{}", s.selector, s.domain),
                    format!("v=DKIM1; k={k}; p={}", s.public_key),
                )
            })
            .collect()
    }

    /// The keys for mail from `domain`: those of the most specific configured domain that
    /// equals it or is a parent of it.
    fn for_domain(&self, domain: &str) -> Vec<&Signer> {
        let applies = |s: &&Signer| {
            domain == s.domain
                || domain
                    .strip_suffix(s.domain.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
        };
        let Some(best) = self
            .signers
            .iter()
            .filter(applies)
            .map(|s| s.domain.len())
            .max()
        else {
            return Vec::new();
        };
        self.signers
            .iter()
            .filter(applies)
            .filter(|s| s.domain.len() == best)
            .collect()
    }

    /// Returns the message with its `DKIM-Signature:` header(s) prepended, or `None` when no
    /// key applies to its From domain (or it has no From address).
    pub fn sign(&self, message: &[u8]) -> Result<Option<Vec<u8>>, DkimError> {
        if self.signers.is_empty() {
            return Ok(None);
        }
        let (fields, malformed) = header_fields(message);
        let froms: Vec<Option<String>> = fields
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(b"From"))
            .map(|(_, value)| from_domain(value))
            .collect();
        let Some(Some(domain)) = froms.first() else {
            return Ok(None);
        };
        let signers = self.for_domain(domain);
        if froms.len() > 1 {
            let ours =
                |d: &Option<String>| d.as_deref().is_some_and(|d| !self.for_domain(d).is_empty());
            if froms.iter().any(ours) {
                return Err(DkimError::Message(format!(
                    "{} From headers (RFC 5322 allows one)",
                    froms.len()
                )));
            }
            return Ok(None);
        }
        if signers.is_empty() {
            return Ok(None);
        }
        if let Some(line) = malformed {
            return Err(DkimError::Message(format!(
                "header line without a colon: {:?}",
                String::from_utf8_lossy(line.trim_ascii_end())
            )));
        }
        let mut headers: Vec<&str> = SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|h| {
                fields
                    .iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case(h.as_bytes()))
            })
            .collect();
        // Listed once more than it occurs: a verifier then hashes an empty From for the extra
        // entry, so a From added after signing breaks the signature.
        headers.push("From");
        let mut out = Vec::with_capacity(message.len() + 600 * signers.len());
        for s in signers {
            let signature = DkimSigner::from_key(SharedKey(Arc::clone(&s.key)))
                .domain(s.domain.as_str())
                .selector(s.selector.as_str())
                .headers(headers.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .sign(message)
                .map_err(|e| DkimError::Sign(e.to_string()))?;
            signature.write_header(&mut out);
        }
        out.extend_from_slice(message);
        Ok(Some(out))
    }
}

/// A header field's name and raw value.
type Field<'a> = (&'a [u8], &'a [u8]);

/// The header fields of a message as `(name, value)`, the value unfolded-as-written (with its
/// continuation lines), up to the empty line that ends the header block. Accepts CRLF and LF.
/// Also returns the first line that is neither a field nor a continuation: verifiers disagree
/// on where such a header block ends.
fn header_fields(message: &[u8]) -> (Vec<Field<'_>>, Option<&[u8]>) {
    let mut fields: Vec<Field<'_>> = Vec::new();
    let mut malformed = None;
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if let Some((_, value)) = fields.last_mut() {
                // Both slices point into `message` and are adjacent: widen the value.
                let start = value.as_ptr() as usize - message.as_ptr() as usize;
                *value = &message[start..end];
            }
        } else if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = line[..colon].trim_ascii_end();
            fields.push((name, &message[pos + colon + 1..end]));
        } else {
            malformed.get_or_insert(line);
        }
        pos = end;
    }
    (fields, malformed)
}

/// The domain of the first address of a From value (display names, comments, quoting,
/// encoded words and folding as RFC 5322 has them), lower case; `None` without one.
fn from_domain(value: &[u8]) -> Option<String> {
    let mut field = Vec::with_capacity(value.len() + 10);
    field.extend_from_slice(b"From:");
    field.extend_from_slice(value);
    field.extend_from_slice(b"\r\n\r\n");
    let parsed = mail_parser::MessageParser::new().parse_headers(&field)?;
    let address = parsed.from()?.first()?.address()?.to_owned();
    let (_, domain) = address.rsplit_once('@')?;
    let domain = normalize_domain(domain.trim_end_matches('>'));
    (!domain.is_empty()).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_handle_folding_and_line_endings() {
        let m = b"From: A\r\n  <a@x.test>\r\nSubject : hi\r\n\r\nFrom: body@y.test\r\n";
        let (f, malformed) = header_fields(m);
        assert_eq!(f.len(), 2);
        assert!(malformed.is_none());
        assert_eq!(f[0].0, b"From");
        assert_eq!(f[0].1, b" A\r\n  <a@x.test>\r\n");
        assert_eq!(f[1].0, b"Subject");
        let (lf, _) = header_fields(b"To: b@y\nFrom: c@z\n\nbody");
        assert_eq!(lf.len(), 2);
        let (_, malformed) = header_fields(b"From: a@b\r\nHello there\r\n\r\n");
        assert_eq!(malformed, Some(&b"Hello there\r\n"[..]));
    }

    #[test]
    fn from_domains() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b" News <news@Example.COM>\r\n", Some("example.com")),
            (b" news@example.com\r\n", Some("example.com")),
            (
                b" \"Smith, J <x@evil.test>\" <j@mail.example.com>\r\n",
                Some("mail.example.com"),
            ),
            (
                b" =?utf-8?q?Caf=C3=A9?=\r\n <cafe@example.org>\r\n",
                Some("example.org"),
            ),
            (
                b" j@example.com (Jo <x@evil.test>)\r\n",
                Some("example.com"),
            ),
            (b" a@one.test, b@two.test\r\n", Some("one.test")),
            (b" undisclosed\r\n", None),
            (b"\r\n", None),
        ];
        for (value, want) in cases {
            assert_eq!(
                from_domain(value).as_deref(),
                *want,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }
}

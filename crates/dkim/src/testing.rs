//! Verification against key records given in advance, for tests: no DNS query is made.

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// A fixed map; the verifier reads key records from it before it would ask DNS.
struct Fixed<K, V>(Mutex<HashMap<K, V>>);

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Fixed<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.remove(name)
    }

    fn insert(&self, key: K, value: V, _: std::time::Instant) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, value);
        }
    }
}

fn fixed<K, V>() -> Fixed<K, V> {
    Fixed(Mutex::new(HashMap::new()))
}

/// The outcome of one `DKIM-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The signature verified.
    Pass,
    /// Anything else, with mail-auth's result.
    NotPass(String),
}

/// Verifies every DKIM signature of `message` against `records` (`(name, TXT value)` as
/// [`crate::Signers::dns_records`] gives them); one verdict per signature, in header order.
pub async fn verify(message: &[u8], records: &[(String, String)]) -> Vec<Verdict> {
    let cache: Fixed<Box<str>, Txt> = fixed();
    for (name, value) in records {
        let record: Txt = DomainKey::parse(value.as_bytes()).into();
        let key = format!("{}.", name.trim_end_matches('.').to_ascii_lowercase());
        cache.insert(key.into_boxed_str(), record, std::time::Instant::now());
    }
    // No name servers: a record missing from `records` is a lookup error, never a query.
    let Ok(authenticator) = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(Vec::new()),
        ResolverOpts::default(),
    ) else {
        return vec![Verdict::NotPass("no resolver".into())];
    };
    let Some(parsed) = AuthenticatedMessage::parse(message) else {
        return vec![Verdict::NotPass("unparsable message".into())];
    };
    authenticator
        .verify_dkim(Parameters::new(&parsed).with_txt_cache(&cache))
        .await
        .iter()
        .map(|out| match out.result() {
            DkimResult::Pass => Verdict::Pass,
            other => Verdict::NotPass(format!("{other:?}")),
        })
        .collect()
}

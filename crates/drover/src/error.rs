//! Why the engine could not start or accept: one error type for the engine and the modules
//! it is made of (kept apart from `engine` so those modules need not import it).

use crate::message::NewMessage;
use resolver_cache::ResolveError;

/// Engine state records that hold a time or an offset store it as a big-endian u64.
pub(crate) fn state_u64(value: &[u8]) -> Option<u64> {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// Why the engine could not start or accept.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] queue::QueueError),
    /// Accounting failed.
    #[error(transparent)]
    Accounting(#[from] accounting::AccountingError),
    /// The resolver could not be set up.
    #[error(transparent)]
    Resolver(#[from] ResolveError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    Draining,
    /// The queue holds `spool.max_queued` messages already.
    #[error("the queue is full ({0} messages)")]
    Full(usize),
    /// Some messages cannot be DKIM-signed although a key applies (malformed headers); nothing
    /// was stored, and the messages come back unchanged.
    #[error("{0}")]
    Unsignable(Box<Unsignable>),
    /// Signing stopped abnormally.
    #[error("signing failed: {0}")]
    Signing(String),
    /// A request the engine cannot act on as given (e.g. a drain to a malformed URL).
    #[error("{0}")]
    Refused(String),
    /// Another drain is running (one at a time).
    #[error("{0}")]
    Busy(String),
    /// The task that stored an injection ended abnormally (a panic, or the runtime stopping).
    #[error("the injection was interrupted: {0}")]
    Interrupted(String),
}

/// Messages handed back by [`Engine::accept`] because some of them cannot be signed.
pub struct Unsignable {
    /// Position (in the batch) and reason of each message that cannot be signed.
    pub failures: Vec<(usize, dkim::DkimError)>,
    /// The whole batch, unchanged: the caller may retry without the failed ones.
    pub messages: Vec<NewMessage>,
}

impl std::fmt::Debug for Unsignable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsignable")
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Unsignable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.failures.first() {
            Some((_, e)) => write!(f, "DKIM signing failed: {e}"),
            None => write!(f, "DKIM signing failed"),
        }
    }
}

//! The feedback loop's sans-IO parts (issue 11): what Drover writes into outgoing mail so
//! that bounces, complaints and unsubscribes find their way back to the message.
//!
//! - [`verp`]: per-message envelope senders under a bounce domain that name the message and
//!   the recipient and carry a keyed tag ([`Keys`]), so a forged report cannot name another
//!   message;
//! - [`token`]: the tagged tokens of one-click unsubscribe URLs;
//! - [`stamp`]: complaint and unsubscribe headers stamped into a message before it is signed;
//! - [`trace_ref`]: KumoMTA's supplemental trace header (`X-KumoRef`), written and read back.
//!
//! No I/O here: callers hand in bytes and keys, tests and fuzzers drive it directly.

pub mod keys;
pub mod stamp;
pub mod token;
pub mod trace_ref;
pub mod verp;

pub use keys::Keys;

/// What can go wrong reading a VERP address or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// Not in the form Drover writes.
    #[error("not a Drover {what}: {why}")]
    Malformed {
        /// What was read (`VERP address`, `unsubscribe token`).
        what: &'static str,
        /// Why it does not parse.
        why: &'static str,
    },
    /// Well formed, but no configured key made its tag: forged, or signed with a key that has
    /// since been retired.
    #[error("the tag of this {what} does not verify with any configured key")]
    BadTag {
        /// What was read.
        what: &'static str,
    },
    /// A configured key is unusable.
    #[error("invalid feedback key: {0}")]
    Key(String),
}

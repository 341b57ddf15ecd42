//! Sans-IO SMTP: reply parser, command codec, EHLO capabilities, dot-stuffing
//! and a server dialogue state machine.
//!
//! Nothing in this crate performs I/O or depends on an async runtime: every
//! parser is fed bytes and answers "here is a complete item and how many bytes
//! it used" or "need more bytes". The async client in the engine and the
//! sink crate are thin loops around these functions, which keeps
//! the grammar testable (and fuzzable) without sockets.
//!
//! Parsers follow a check-then-parse discipline: a cheap scan first decides
//! whether a complete, well-formed item is present and enforces the maximum
//! line length, and only then are owned values allocated.

mod address;
mod capabilities;
mod command;
mod dot;
mod error;
mod line;
mod reply;
pub mod server;

pub use address::validate_mailbox;
pub use capabilities::Capabilities;
pub use command::Command;
pub use dot::{DataReceiver, DotStuffer};
pub use error::{CommandError, ProtoError};
pub use line::take_line;
pub use reply::{enhanced, parse_reply, EnhancedCode, Reply};

/// Longest reply line accepted by [`parse_reply`] when used with this value.
///
/// RFC 5321 says 512 octets, but real servers exceed that (long EHLO AUTH
/// lists, verbose rejection texts), so we are lenient.
pub const MAX_REPLY_LINE: usize = 4096;

/// Longest command line a server accepts, without the CRLF.
///
/// RFC 5321 says 512 octets; SMTPUTF8 addresses and many ESMTP parameters
/// make that too tight in practice.
pub const MAX_COMMAND_LINE: usize = 4096;

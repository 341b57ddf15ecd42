//! Sans-IO SMTP: resumable reply scanner, command codec, EHLO capabilities, dot-stuffing
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
mod xtext;

pub use address::validate_mailbox;
pub use capabilities::Capabilities;
pub use command::Command;
pub use dot::{DataReceiver, DotStuffer};
pub use error::{CommandError, ProtoError};
pub use line::take_line;
pub use reply::{enhanced, parse_reply, EnhancedCode, Reply, ReplyLimits, ReplyScanner};
pub use xtext::{xtext_decode, xtext_encode};

/// Longest reply line accepted by [`parse_reply`] when used with this value.
///
/// RFC 5321 says 512 octets, but real servers exceed that (long EHLO AUTH
/// lists, verbose rejection texts), so we are lenient.
pub const MAX_REPLY_LINE: usize = 4096;

/// Most lines in one reply accepted by [`ReplyScanner`] with [`ReplyLimits::default`].
///
/// The longest replies real servers send are EHLO replies: Postfix sends about 10 lines,
/// Exchange and the big mailbox providers 10 to 30 with every extension and AUTH mechanism
/// listed; multi-line rejection texts stay under 10. Four times the largest seen leaves room
/// for servers we have not met, while a server streaming continuation lines is cut off after
/// a few kilobytes of typical lines instead of growing the buffer for the whole timeout.
pub const MAX_REPLY_LINES: usize = 128;

/// Most bytes (line ends included) in one reply accepted by [`ReplyScanner`] with
/// [`ReplyLimits::default`].
///
/// A whole EHLO reply of a real server is 200 to 800 bytes. This is 128 lines of 256 bytes
/// on average, or eight lines of the lenient [`MAX_REPLY_LINE`], and it bounds what one
/// session buffers to this plus one read, however long the lines a server sends.
pub const MAX_REPLY_BYTES: usize = 32 * 1024;

/// Longest command line a server accepts, without the CRLF.
///
/// RFC 5321 says 512 octets; SMTPUTF8 addresses and many ESMTP parameters
/// make that too tight in practice.
pub const MAX_COMMAND_LINE: usize = 4096;

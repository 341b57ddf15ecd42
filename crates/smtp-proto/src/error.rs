use crate::reply::{EnhancedCode, Reply};

/// Everything that can go wrong in this crate outside of server-side command
/// parsing (which has its own, reply-carrying [`CommandError`]).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A line exceeded the configured maximum before its line end arrived.
    #[error("line longer than {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A reply had more lines than [`crate::ReplyLimits::max_lines`].
    #[error("reply of more than {limit} lines")]
    ReplyTooManyLines {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A reply was longer than [`crate::ReplyLimits::max_bytes`].
    #[error("reply longer than {limit} bytes")]
    ReplyTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The peer sent bytes that are not a valid SMTP reply.
    #[error("malformed SMTP reply: {0}")]
    BadReply(String),
    /// A command argument contained CR, LF or NUL; sending it would let the
    /// argument smuggle extra commands onto the wire.
    #[error("command argument contains CR, LF or NUL")]
    InjectedLineBreak,
    /// A mailbox failed RFC 5321 syntax validation.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The offending address.
        address: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A command argument other than an address was malformed (empty EHLO
    /// name, ESMTP parameter with a bad keyword, ...).
    #[error("invalid command argument {value:?}: {reason}")]
    InvalidArgument {
        /// The offending argument.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// An enhanced status code (RFC 3463) did not have the form `x.y.z`.
    #[error("invalid enhanced status code {0:?}")]
    InvalidEnhancedCode(String),
}

/// A command line a server could not accept, carrying the reply it should send.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The line exceeded [`crate::MAX_COMMAND_LINE`].
    #[error("command line too long")]
    LineTooLong,
    /// The verb is not an SMTP command.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// The verb is a known SMTP command this implementation does not offer.
    #[error("command {0:?} not implemented")]
    NotImplemented(String),
    /// The command's arguments are malformed.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// The MAIL FROM reverse-path is malformed.
    #[error("bad sender address {0:?}")]
    BadSender(String),
    /// The RCPT TO forward-path is malformed.
    #[error("bad recipient address {0:?}")]
    BadRecipient(String),
}

impl CommandError {
    /// The reply a server should send for this error.
    pub fn reply(&self) -> Reply {
        let (code, class, subject, detail, text) = match self {
            CommandError::LineTooLong => (500, 5, 5, 6, "Line too long".to_string()),
            CommandError::UnknownCommand(_) => (500, 5, 5, 2, "Unknown command".to_string()),
            CommandError::NotImplemented(_) => {
                (502, 5, 5, 1, "Command not implemented".to_string())
            }
            CommandError::Syntax(why) => {
                (501, 5, 5, 4, format!("Syntax error in parameters: {why}"))
            }
            CommandError::BadSender(_) => (501, 5, 1, 7, "Bad sender address syntax".to_string()),
            CommandError::BadRecipient(_) => {
                (501, 5, 1, 3, "Bad recipient address syntax".to_string())
            }
        };
        Reply::new(
            code,
            Some(EnhancedCode {
                class,
                subject,
                detail,
            }),
            text,
        )
    }
}

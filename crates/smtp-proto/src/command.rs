use crate::address::validate_mailbox;
use crate::error::{CommandError, ProtoError};
use crate::MAX_COMMAND_LINE;

/// An ESMTP parameter on MAIL FROM or RCPT TO: keyword and optional value.
type Params = Vec<(String, Option<String>)>;

/// One SMTP command, used both by the client encoder and the server parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain`.
    Ehlo(String),
    /// `HELO domain`.
    Helo(String),
    /// `MAIL FROM:<address> params`.
    MailFrom {
        /// The reverse-path without angle brackets; `""` for the null path.
        address: String,
        /// ESMTP parameters such as `SIZE=123`; keywords upper-cased by the parser.
        params: Params,
    },
    /// `RCPT TO:<address> params`.
    RcptTo {
        /// The forward-path without angle brackets.
        address: String,
        /// ESMTP parameters such as `NOTIFY=NEVER`; keywords upper-cased by the parser.
        params: Params,
    },
    /// `DATA`.
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat {
        /// Number of octets in the chunk that follows the command.
        size: u64,
        /// Whether this is the last chunk.
        last: bool,
    },
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `STARTTLS`.
    StartTls,
    /// `VRFY string`.
    Vrfy(String),
    /// `AUTH mechanism [initial-response]`.
    Auth {
        /// SASL mechanism name, e.g. `PLAIN`.
        mechanism: String,
        /// Base64 initial response, if sent with the command.
        initial_response: Option<String>,
    },
}

fn check_injection(s: &str) -> Result<(), ProtoError> {
    if s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        Err(ProtoError::InjectedLineBreak)
    } else {
        Ok(())
    }
}

/// An argument that must be a single non-empty token (EHLO name, AUTH
/// mechanism, ...).
fn check_token(s: &str, what: &'static str) -> Result<(), ProtoError> {
    check_injection(s)?;
    if s.is_empty() || s.bytes().any(|b| b == b' ' || b == b'\t') {
        return Err(ProtoError::InvalidArgument {
            value: s.to_string(),
            reason: what,
        });
    }
    Ok(())
}

fn is_esmtp_keyword(k: &str) -> bool {
    k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// esmtp-value: any printable except `=` and space; UTF-8 allowed (RFC 6531).
fn is_esmtp_value(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b > 32 && b != b'=' && b != 127)
}

fn check_params(params: &Params) -> Result<(), ProtoError> {
    for (k, v) in params {
        check_injection(k)?;
        if !is_esmtp_keyword(k) {
            return Err(ProtoError::InvalidArgument {
                value: k.clone(),
                reason: "invalid ESMTP parameter keyword",
            });
        }
        if let Some(v) = v {
            check_injection(v)?;
            if !is_esmtp_value(v) {
                return Err(ProtoError::InvalidArgument {
                    value: v.clone(),
                    reason: "invalid ESMTP parameter value",
                });
            }
        }
    }
    Ok(())
}

fn encode_params(params: &Params, out: &mut Vec<u8>) {
    for (k, v) in params {
        out.push(b' ');
        out.extend_from_slice(k.as_bytes());
        if let Some(v) = v {
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
        }
    }
}

fn is_postmaster(addr: &str) -> bool {
    addr.eq_ignore_ascii_case("postmaster")
}

impl Command {
    /// Appends the wire form including CRLF.
    ///
    /// Fails when any argument contains CR, LF or NUL (which would inject
    /// further commands), when an address is syntactically invalid, or when
    /// another argument is malformed. Nothing is appended on error.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let start = out.len();
        let result = self.encode_inner(out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn encode_inner(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        match self {
            Command::Ehlo(d) | Command::Helo(d) => {
                check_token(d, "EHLO/HELO needs a single domain or address literal")?;
                let verb: &[u8] = if matches!(self, Command::Ehlo(_)) {
                    b"EHLO "
                } else {
                    b"HELO "
                };
                out.extend_from_slice(verb);
                out.extend_from_slice(d.as_bytes());
            }
            Command::MailFrom { address, params } => {
                check_injection(address)?;
                if !address.is_empty() {
                    validate_mailbox(address)?;
                }
                check_params(params)?;
                out.extend_from_slice(b"MAIL FROM:<");
                out.extend_from_slice(address.as_bytes());
                out.push(b'>');
                encode_params(params, out);
            }
            Command::RcptTo { address, params } => {
                check_injection(address)?;
                if !is_postmaster(address) {
                    validate_mailbox(address)?;
                }
                check_params(params)?;
                out.extend_from_slice(b"RCPT TO:<");
                out.extend_from_slice(address.as_bytes());
                out.push(b'>');
                encode_params(params, out);
            }
            Command::Data => out.extend_from_slice(b"DATA"),
            Command::Bdat { size, last } => {
                out.extend_from_slice(format!("BDAT {size}").as_bytes());
                if *last {
                    out.extend_from_slice(b" LAST");
                }
            }
            Command::Rset => out.extend_from_slice(b"RSET"),
            Command::Noop => out.extend_from_slice(b"NOOP"),
            Command::Quit => out.extend_from_slice(b"QUIT"),
            Command::StartTls => out.extend_from_slice(b"STARTTLS"),
            Command::Vrfy(s) => {
                check_injection(s)?;
                if s.trim().is_empty() {
                    return Err(ProtoError::InvalidArgument {
                        value: s.clone(),
                        reason: "VRFY needs an argument",
                    });
                }
                out.extend_from_slice(b"VRFY ");
                out.extend_from_slice(s.as_bytes());
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => {
                check_token(mechanism, "AUTH needs a single mechanism name")?;
                out.extend_from_slice(b"AUTH ");
                out.extend_from_slice(mechanism.as_bytes());
                if let Some(ir) = initial_response {
                    check_token(ir, "AUTH initial response must be a single token")?;
                    out.push(b' ');
                    out.extend_from_slice(ir.as_bytes());
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// Server side: parses one command line, without its trailing CRLF.
    ///
    /// Verbs are case-insensitive; `MAIL FROM:<a@b> SIZE=123 BODY=8BITMIME`
    /// is split into address and parameters (keywords upper-cased); a space
    /// after the colon and a source route (`<@relay:a@b>`) are tolerated;
    /// `RCPT TO:<Postmaster>` is accepted without a domain.
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        if line.len() > MAX_COMMAND_LINE {
            return Err(CommandError::LineTooLong);
        }
        if line.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(CommandError::Syntax("CR, LF or NUL inside command line"));
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| CommandError::Syntax("command line is not UTF-8"))?;
        let line = line.trim_end_matches([' ', '\t']);
        let (verb, rest) = match line.find([' ', '\t']) {
            Some(i) => (&line[..i], line[i + 1..].trim_start_matches([' ', '\t'])),
            None => (line, ""),
        };
        let upper = verb.to_ascii_uppercase();
        let no_args = |cmd: Command| {
            if rest.is_empty() {
                Ok(cmd)
            } else {
                Err(CommandError::Syntax("command takes no arguments"))
            }
        };
        match upper.as_str() {
            "EHLO" | "HELO" => {
                let name = rest
                    .split_ascii_whitespace()
                    .next()
                    .ok_or(CommandError::Syntax("EHLO/HELO requires a domain"))?
                    .to_string();
                Ok(if upper == "EHLO" {
                    Command::Ehlo(name)
                } else {
                    Command::Helo(name)
                })
            }
            "MAIL" => {
                let arg = strip_prefix_ci(rest, "FROM:")
                    .ok_or(CommandError::Syntax("expected MAIL FROM:<address>"))?;
                let (address, params) = parse_path_and_params(arg)?;
                if !address.is_empty() && validate_mailbox(&address).is_err() {
                    return Err(CommandError::BadSender(address));
                }
                Ok(Command::MailFrom { address, params })
            }
            "RCPT" => {
                let arg = strip_prefix_ci(rest, "TO:")
                    .ok_or(CommandError::Syntax("expected RCPT TO:<address>"))?;
                let (address, params) = parse_path_and_params(arg)?;
                if !is_postmaster(&address) && validate_mailbox(&address).is_err() {
                    return Err(CommandError::BadRecipient(address));
                }
                Ok(Command::RcptTo { address, params })
            }
            "DATA" => no_args(Command::Data),
            "RSET" => no_args(Command::Rset),
            "QUIT" => no_args(Command::Quit),
            "STARTTLS" => no_args(Command::StartTls),
            // RFC 5321 lets NOOP carry an argument, which is ignored.
            "NOOP" => Ok(Command::Noop),
            "BDAT" => {
                let mut words = rest.split_ascii_whitespace();
                let size = words
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or(CommandError::Syntax("BDAT requires a chunk size"))?;
                let last = match words.next() {
                    None => false,
                    Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                    Some(_) => return Err(CommandError::Syntax("expected BDAT size [LAST]")),
                };
                if words.next().is_some() {
                    return Err(CommandError::Syntax("expected BDAT size [LAST]"));
                }
                Ok(Command::Bdat { size, last })
            }
            "VRFY" => {
                if rest.is_empty() {
                    return Err(CommandError::Syntax("VRFY requires an argument"));
                }
                Ok(Command::Vrfy(rest.to_string()))
            }
            "AUTH" => {
                let mut words = rest.split_ascii_whitespace();
                let mechanism = words
                    .next()
                    .ok_or(CommandError::Syntax("AUTH requires a mechanism"))?
                    .to_ascii_uppercase();
                let initial_response = words.next().map(str::to_string);
                if words.next().is_some() {
                    return Err(CommandError::Syntax("too many AUTH arguments"));
                }
                Ok(Command::Auth {
                    mechanism,
                    initial_response,
                })
            }
            "EXPN" | "HELP" | "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" => {
                Err(CommandError::NotImplemented(upper))
            }
            _ => Err(CommandError::UnknownCommand(
                verb.chars().take(32).collect::<String>(),
            )),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s[prefix.len()..].trim_start_matches([' ', '\t']))
}

/// Parses `<path> KEY=VALUE ...` after `FROM:` / `TO:`.
fn parse_path_and_params(arg: &str) -> Result<(String, Params), CommandError> {
    let (path, rest) = if let Some(inner) = arg.strip_prefix('<') {
        let end = closing_bracket(inner).ok_or(CommandError::Syntax("missing '>' after path"))?;
        (&inner[..end], &inner[end + 1..])
    } else {
        // Lenient: some clients omit the angle brackets.
        match arg.find([' ', '\t']) {
            Some(i) => (&arg[..i], &arg[i..]),
            None => (arg, ""),
        }
    };
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(CommandError::Syntax("expected space after path"));
    }
    // A source route (`@a,@b:user@host`) is obsolete; RFC 5321 says to ignore it.
    let address = match path.strip_prefix('@') {
        Some(route) => match route.find(':') {
            Some(i) => &route[i + 1..],
            None => return Err(CommandError::Syntax("malformed source route")),
        },
        None => path,
    };
    let mut params = Vec::new();
    for word in rest.split_ascii_whitespace() {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        if !is_esmtp_keyword(k) || v.is_some_and(|v| !is_esmtp_value(v)) {
            return Err(CommandError::Syntax("malformed ESMTP parameter"));
        }
        params.push((k.to_ascii_uppercase(), v.map(str::to_string)));
    }
    Ok((address.to_string(), params))
}

/// Index of the `>` closing a path, skipping a quoted local part that may
/// itself contain `>`.
fn closing_bracket(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_quotes => escaped = true,
            b'"' => in_quotes = !in_quotes,
            b'>' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

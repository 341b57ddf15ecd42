//! A sans-IO SMTP server dialogue.
//!
//! [`ServerSession`] tracks where the dialogue is, enforces command
//! sequencing (`503 5.5.1`), answers EHLO/HELO/NOOP/RSET/QUIT/VRFY itself and
//! hands every policy decision (accept this sender? this recipient? this
//! message?) to the caller as a [`Decision`]. It never touches a socket: the
//! caller frames lines (see [`crate::take_line`]), feeds them in, and writes
//! out whatever [`Action`] says.
//!
//! A typical driver loop:
//!
//! ```
//! use smtp_proto::server::{Action, Event, ServerConfig, ServerSession};
//! use smtp_proto::Reply;
//!
//! let mut session = ServerSession::new(ServerConfig::default());
//! let mut wire = Vec::new();
//! session.greeting().encode(&mut wire);
//! for line in [&b"EHLO client.example"[..], b"MAIL FROM:<a@example.com>", b"QUIT"] {
//!     let action = match session.handle_line(line) {
//!         Action::Decide(decision) => {
//!             // Policy lives in the caller; here everything is accepted.
//!             let reply = Reply::new(250, None, "OK");
//!             session.decide(decision, reply)
//!         }
//!         other => other,
//!     };
//!     if let Some(reply) = action.reply() {
//!         reply.encode(&mut wire);
//!     }
//! }
//! assert!(session.is_closed());
//! assert!(wire.ends_with(b"221 2.0.0 localhost closing connection\r\n"));
//! ```
//!
//! AUTH (RFC 4954, mechanisms PLAIN and LOGIN) is a sub-dialogue: after a
//! `334` challenge the next lines are base64 responses, which the session
//! decodes itself before handing the credentials over as an [`Event::Auth`]
//! decision. Whether the credentials are good is the caller's business.
//!
//! Pipelining needs nothing special: process the buffered lines in order,
//! answering each decision before handling the next line, and flush the
//! collected replies once the buffer holds no further complete line.

use crate::capabilities::Capabilities;
use crate::command::Command;
use crate::dot::DataReceiver;
use crate::error::CommandError;
use crate::reply::{enhanced, Reply};

/// Settings for a [`ServerSession`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Our host name, used in the banner, the EHLO/HELO reply and QUIT.
    pub hostname: String,
    /// Extensions advertised in the EHLO reply. `size` also sets the message
    /// size limit (`Some(0)` or `None`: unlimited).
    pub capabilities: Capabilities,
    /// RCPT commands beyond this many accepted recipients get `452 4.5.3`.
    pub max_recipients: usize,
    /// After this many erroneous commands the session closes with `421`, so
    /// a client sending garbage cannot keep a connection busy forever.
    /// Failed AUTH attempts count as errors, which bounds password guessing
    /// per connection.
    pub max_errors: u32,
    /// AUTH (mechanisms in `capabilities.auth`; PLAIN and LOGIN are
    /// implemented) is refused with `538 5.7.11` and not advertised: set it
    /// while the connection is unencrypted and passwords must not cross it.
    pub auth_requires_tls: bool,
    /// What a message whose data holds a bare CR or bare LF gets.
    pub bare_newlines: BareNewlines,
}

/// What the server does with a bare CR or bare LF (one not part of a CRLF)
/// in message data; see [`crate::DataReceiver`]. Whatever the choice, only
/// `CRLF . CRLF` ends the data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BareNewlines {
    /// Refuse the message with `550 5.6.11` after its final dot (Postfix's
    /// `smtpd_forbid_bare_newline = reject`): nothing of it reaches the
    /// policy. Bare line ends are what SMTP smuggling is built from, and no
    /// conforming client sends them.
    #[default]
    Reject,
    /// Convert each to CRLF and accept the message.
    Normalize,
    /// Pass them through unchanged: for test servers that record exactly
    /// what arrived.
    Keep,
}

impl BareNewlines {
    /// The `550 5.6.11` a message with bare CR or LF gets under
    /// [`BareNewlines::Reject`]; for a policy that decides itself (see
    /// [`ServerSession::saw_bare_newline`]).
    pub fn refusal() -> Reply {
        Reply::new(
            550,
            enhanced(5, 6, 11),
            "Message contains bare CR or LF characters; use CRLF line endings",
        )
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".to_string(),
            capabilities: Capabilities {
                pipelining: true,
                size: Some(50 * 1024 * 1024),
                eight_bit_mime: true,
                smtputf8: true,
                enhanced_status_codes: true,
                ..Capabilities::default()
            },
            max_recipients: 1000,
            max_errors: 20,
            auth_requires_tls: false,
            bare_newlines: BareNewlines::Reject,
        }
    }
}

/// Where the dialogue is, named for what the server waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// The banner has not been produced yet ([`ServerSession::greeting`]).
    ExpectGreeting,
    /// Banner sent; waiting for EHLO or HELO.
    ExpectHelo,
    /// Greeted; waiting for MAIL FROM.
    ExpectMail,
    /// Sender accepted; waiting for the first accepted RCPT TO.
    ExpectRcpt,
    /// At least one recipient accepted; more RCPT TO or DATA.
    ExpectRcptOrData,
    /// Between the 354 reply and the final dot: feed bytes to
    /// [`ServerSession::handle_data`].
    ReceivingData,
    /// After a `334` AUTH challenge: the next line is the client's base64
    /// response (or `*` to cancel), not a command.
    ExpectAuthResponse,
    /// QUIT, a `421` or too many errors: nothing more will be accepted.
    Closed,
}

/// A policy question the caller must answer with a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// MAIL FROM arrived in a valid state with acceptable parameters.
    MailFrom {
        /// Reverse-path; `""` for the null sender.
        address: String,
        /// ESMTP parameters, keywords upper-cased.
        params: Vec<(String, Option<String>)>,
    },
    /// RCPT TO arrived in a valid state.
    RcptTo {
        /// Forward-path.
        address: String,
        /// ESMTP parameters, keywords upper-cased.
        params: Vec<(String, Option<String>)>,
    },
    /// The final dot of DATA arrived and the message is within the size
    /// limit. Whatever the reply, the transaction is over afterwards.
    DataEnd {
        /// The transaction's sender.
        sender: String,
        /// The accepted recipients.
        recipients: Vec<String>,
        /// Unstuffed message size in octets.
        size: u64,
    },
    /// The client completed an AUTH exchange; check the credentials and
    /// answer `235 2.7.0` (the session is then authenticated) or
    /// `535 5.7.8`. The password is in clear: never log this event.
    Auth {
        /// `PLAIN` or `LOGIN`.
        mechanism: String,
        /// The identity to act as (PLAIN's authzid); usually empty, meaning
        /// the same as `username`.
        authorization_id: String,
        /// The authentication identity.
        username: String,
        /// The password.
        password: String,
    },
}

/// A pending policy decision; hand it back to [`ServerSession::decide`].
///
/// It is deliberately neither `Clone` nor `Copy`: each question gets exactly
/// one answer.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a decision must be answered with ServerSession::decide"]
pub struct Decision {
    event: Event,
}

impl Decision {
    /// What is being decided.
    pub fn event(&self) -> &Event {
        &self.event
    }
}

/// What the caller must do next.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Send this reply and carry on reading commands.
    Reply(Reply),
    /// Ask policy, then call [`ServerSession::decide`] before handling the
    /// next line.
    Decide(Decision),
    /// Send this `354` reply, then feed the following bytes to
    /// [`ServerSession::handle_data`] instead of framing lines.
    StartData(Reply),
    /// Send this `220` reply, perform the TLS handshake, then call
    /// [`ServerSession::tls_established`]. Only when STARTTLS is advertised.
    StartTls(Reply),
    /// Send this reply and close the connection.
    Close(Reply),
}

impl Action {
    /// The reply to send, if this action carries one (all but [`Action::Decide`]).
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Action::Reply(r) | Action::StartData(r) | Action::StartTls(r) | Action::Close(r) => {
                Some(r)
            }
            Action::Decide(_) => None,
        }
    }
}

fn bad_sequence(text: &str) -> Reply {
    Reply::new(503, enhanced(5, 5, 1), text)
}

/// One server-side SMTP dialogue; see the [module documentation](self).
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    state: SessionState,
    helo: Option<String>,
    sender: Option<String>,
    recipients: Vec<String>,
    receiver: DataReceiver,
    data_size: u64,
    errors: u32,
    auth_step: Option<AuthStep>,
    authenticated: Option<String>,
}

/// Where an AUTH exchange is, while in [`SessionState::ExpectAuthResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum AuthStep {
    Plain,
    LoginUsername,
    LoginPassword { username: String },
}

/// `Username:` and `Password:`, base64, the challenges of the LOGIN mechanism.
const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

impl ServerSession {
    /// A session that has not yet sent its banner.
    pub fn new(config: ServerConfig) -> ServerSession {
        ServerSession {
            config,
            state: SessionState::ExpectGreeting,
            helo: None,
            sender: None,
            recipients: Vec::new(),
            receiver: DataReceiver::new(),
            data_size: 0,
            errors: 0,
            auth_step: None,
            authenticated: None,
        }
    }

    /// The `220` banner; moves the session to [`SessionState::ExpectHelo`].
    pub fn greeting(&mut self) -> Reply {
        if self.state == SessionState::ExpectGreeting {
            self.state = SessionState::ExpectHelo;
        }
        Reply::new(220, None, format!("{} ESMTP ready", self.config.hostname))
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// The configuration this session runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The EHLO/HELO name the client gave, if any.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The accepted sender of the current transaction.
    pub fn sender(&self) -> Option<&str> {
        self.sender.as_deref()
    }

    /// The accepted recipients of the current transaction.
    pub fn recipients(&self) -> &[String] {
        &self.recipients
    }

    /// The user name of a successful AUTH on this connection (kept across
    /// EHLO and RSET, forgotten at STARTTLS).
    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// Whether bytes must go to [`ServerSession::handle_data`] rather than
    /// being framed as command lines.
    pub fn is_receiving_data(&self) -> bool {
        self.state == SessionState::ReceivingData
    }

    /// Whether the session is over; the caller should close the connection.
    pub fn is_closed(&self) -> bool {
        self.state == SessionState::Closed
    }

    fn size_limit(&self) -> Option<u64> {
        self.config.capabilities.size.filter(|&n| n > 0)
    }

    fn reset_transaction(&mut self) {
        self.sender = None;
        self.recipients.clear();
        self.data_size = 0;
        if matches!(
            self.state,
            SessionState::ExpectRcpt | SessionState::ExpectRcptOrData | SessionState::ReceivingData
        ) {
            self.state = SessionState::ExpectMail;
        }
    }

    /// Counts an erroneous command; past the limit the reply becomes a `421`
    /// and the session closes.
    fn error(&mut self, reply: Reply) -> Action {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.state = SessionState::Closed;
            return Action::Close(Reply::new(
                421,
                enhanced(4, 7, 0),
                format!(
                    "{} Too many errors, closing connection",
                    self.config.hostname
                ),
            ));
        }
        Action::Reply(reply)
    }

    /// The framer saw a line longer than [`crate::MAX_COMMAND_LINE`]; the
    /// caller discards input up to the next line end and sends this reply.
    pub fn line_too_long(&mut self) -> Action {
        self.error(CommandError::LineTooLong.reply())
    }

    /// Handles one command line (without its CRLF).
    pub fn handle_line(&mut self, line: &[u8]) -> Action {
        match self.state {
            SessionState::Closed => {
                return Action::Close(Reply::new(503, enhanced(5, 5, 1), "Session is closed"))
            }
            SessionState::ReceivingData => {
                // The caller should be feeding handle_data; answering instead of
                // panicking keeps a buggy driver from taking the process down.
                return Action::Reply(bad_sequence("Bad sequence: in DATA"));
            }
            SessionState::ExpectGreeting => {
                return self.error(bad_sequence("Bad sequence: wait for the greeting"))
            }
            SessionState::ExpectAuthResponse => return self.auth_response(line),
            _ => {}
        }
        let command = match Command::parse(line) {
            Ok(c) => c,
            Err(e) => return self.error(e.reply()),
        };
        self.handle_command(command)
    }

    fn handle_command(&mut self, command: Command) -> Action {
        use SessionState as S;
        let host = self.config.hostname.clone();
        match command {
            Command::Ehlo(name) => {
                self.reset_transaction();
                self.helo = Some(name.clone());
                self.state = S::ExpectMail;
                let mut lines = vec![format!("{host} greets {name}")];
                if self.config.auth_requires_tls && !self.config.capabilities.auth.is_empty() {
                    let mut caps = self.config.capabilities.clone();
                    caps.auth.clear();
                    lines.extend(caps.to_ehlo_lines());
                } else {
                    lines.extend(self.config.capabilities.to_ehlo_lines());
                }
                Action::Reply(Reply {
                    code: 250,
                    enhanced: None,
                    lines,
                })
            }
            Command::Helo(name) => {
                self.reset_transaction();
                self.helo = Some(name);
                self.state = S::ExpectMail;
                Action::Reply(Reply::new(250, None, host))
            }
            Command::Noop => Action::Reply(Reply::new(250, enhanced(2, 0, 0), "OK")),
            Command::Rset => {
                self.reset_transaction();
                Action::Reply(Reply::new(250, enhanced(2, 0, 0), "OK"))
            }
            Command::Quit => {
                self.state = S::Closed;
                Action::Close(Reply::new(
                    221,
                    enhanced(2, 0, 0),
                    format!("{host} closing connection"),
                ))
            }
            Command::Vrfy(_) => Action::Reply(Reply::new(
                252,
                enhanced(2, 5, 2),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::StartTls => {
                if !self.config.capabilities.starttls {
                    return self.error(Reply::new(
                        502,
                        enhanced(5, 5, 1),
                        "STARTTLS not available",
                    ));
                }
                if !matches!(self.state, S::ExpectHelo | S::ExpectMail) {
                    return self.error(bad_sequence("Bad sequence: STARTTLS inside a transaction"));
                }
                Action::StartTls(Reply::new(220, enhanced(2, 0, 0), "Ready to start TLS"))
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => self.start_auth(&mechanism, initial_response.as_deref()),
            Command::Bdat { .. } => {
                // The chunk bytes follow the command unannounced; without
                // CHUNKING support they would be read as commands, so the only
                // safe answer is to hang up.
                self.state = S::Closed;
                Action::Close(Reply::new(502, enhanced(5, 5, 1), "CHUNKING not available"))
            }
            Command::MailFrom { address, params } => match self.state {
                S::ExpectHelo => self.error(bad_sequence("Bad sequence: send EHLO/HELO first")),
                S::ExpectRcpt | S::ExpectRcptOrData => {
                    self.error(bad_sequence("Bad sequence: sender already specified"))
                }
                _ => {
                    if let Some(reply) = self.check_mail_params(&params) {
                        return self.error(reply);
                    }
                    Action::Decide(Decision {
                        event: Event::MailFrom { address, params },
                    })
                }
            },
            Command::RcptTo { address, params } => match self.state {
                S::ExpectRcpt | S::ExpectRcptOrData => {
                    if let Some(reply) = self.check_rcpt_params(&params) {
                        return self.error(reply);
                    }
                    if self.recipients.len() >= self.config.max_recipients {
                        return Action::Reply(Reply::new(
                            452,
                            enhanced(4, 5, 3),
                            "Too many recipients",
                        ));
                    }
                    Action::Decide(Decision {
                        event: Event::RcptTo { address, params },
                    })
                }
                _ => self.error(bad_sequence("Bad sequence: send MAIL FROM first")),
            },
            Command::Data => match self.state {
                S::ExpectRcptOrData => {
                    self.state = S::ReceivingData;
                    self.receiver = match self.config.bare_newlines {
                        BareNewlines::Normalize => DataReceiver::normalizing(),
                        BareNewlines::Reject | BareNewlines::Keep => DataReceiver::new(),
                    };
                    self.data_size = 0;
                    Action::StartData(Reply::new(
                        354,
                        None,
                        "Start mail input; end with <CRLF>.<CRLF>",
                    ))
                }
                S::ExpectRcpt => {
                    self.error(Reply::new(554, enhanced(5, 5, 1), "No valid recipients"))
                }
                _ => self.error(bad_sequence("Bad sequence: send MAIL FROM first")),
            },
        }
    }

    fn check_mail_params(&self, params: &[(String, Option<String>)]) -> Option<Reply> {
        let caps = &self.config.capabilities;
        for (key, value) in params {
            let ok = match key.as_str() {
                "SIZE" => {
                    let Some(declared) = value.as_deref().and_then(|v| v.parse::<u64>().ok())
                    else {
                        return Some(Reply::new(
                            501,
                            enhanced(5, 5, 4),
                            "Malformed SIZE parameter",
                        ));
                    };
                    if self.size_limit().is_some_and(|limit| declared > limit) {
                        return Some(Reply::new(
                            552,
                            enhanced(5, 3, 4),
                            "Message size exceeds fixed maximum message size",
                        ));
                    }
                    caps.size.is_some()
                }
                "BODY" => match value.as_deref().map(str::to_ascii_uppercase).as_deref() {
                    Some("7BIT") => true,
                    Some("8BITMIME") => caps.eight_bit_mime,
                    _ => false,
                },
                "SMTPUTF8" => caps.smtputf8 && value.is_none(),
                "RET" | "ENVID" => caps.dsn,
                "AUTH" => !caps.auth.is_empty(),
                _ => false,
            };
            if !ok {
                return Some(unsupported_param(key));
            }
        }
        None
    }

    fn check_rcpt_params(&self, params: &[(String, Option<String>)]) -> Option<Reply> {
        let caps = &self.config.capabilities;
        for (key, _) in params {
            let ok = match key.as_str() {
                "NOTIFY" | "ORCPT" => caps.dsn,
                _ => false,
            };
            if !ok {
                return Some(unsupported_param(key));
            }
        }
        None
    }

    /// Answers a pending [`Decision`] and applies its effect on the session.
    ///
    /// A positive reply to MAIL FROM starts the transaction, a positive reply
    /// to RCPT TO adds the recipient, and any reply to the end of DATA ends the
    /// transaction. A `421` reply closes the session whatever the event.
    pub fn decide(&mut self, decision: Decision, reply: Reply) -> Action {
        let positive = reply.is_positive();
        match decision.event {
            Event::MailFrom { address, .. } => {
                if positive {
                    self.sender = Some(address);
                    self.recipients.clear();
                    self.state = SessionState::ExpectRcpt;
                }
            }
            Event::RcptTo { address, .. } => {
                if positive {
                    self.recipients.push(address);
                    self.state = SessionState::ExpectRcptOrData;
                }
            }
            Event::DataEnd { .. } => self.reset_transaction(),
            Event::Auth { username, .. } => {
                self.auth_step = None;
                if self.state == SessionState::ExpectAuthResponse {
                    self.state = SessionState::ExpectMail;
                }
                if positive {
                    self.authenticated = Some(username);
                } else if reply.code != 421 {
                    return self.error(reply);
                }
            }
        }
        if reply.code == 421 {
            self.state = SessionState::Closed;
            return Action::Close(reply);
        }
        Action::Reply(reply)
    }

    /// Feeds message bytes during [`SessionState::ReceivingData`], appending
    /// the unstuffed message to `out`.
    ///
    /// Returns how many bytes of `input` were used, and an action once the
    /// final dot arrived: a [`Decision`] with [`Event::DataEnd`], a `552`
    /// reply if the message exceeded the size limit, or a `550 5.6.11` reply
    /// if it held a bare CR or LF under [`BareNewlines::Reject`]. After
    /// either reply the bytes in `out` are no message: the caller discards
    /// them. Bytes after the final dot are not consumed; they are the next
    /// pipelined commands. The caller may drain `out` between calls (the
    /// session counts the size itself), which keeps memory bounded for
    /// oversized messages.
    pub fn handle_data(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Option<Action>) {
        if self.state != SessionState::ReceivingData {
            return (0, None);
        }
        let before = out.len();
        let (used, done) = self.receiver.feed(input, out);
        self.data_size = self
            .data_size
            .saturating_add((out.len().saturating_sub(before)) as u64);
        if !done {
            return (used, None);
        }
        let size = self.data_size;
        if self.size_limit().is_some_and(|limit| size > limit) {
            self.reset_transaction();
            return (
                used,
                Some(Action::Reply(Reply::new(
                    552,
                    enhanced(5, 3, 4),
                    "Message size exceeds fixed maximum message size",
                ))),
            );
        }
        if self.config.bare_newlines == BareNewlines::Reject && self.receiver.saw_bare_newline() {
            self.reset_transaction();
            return (used, Some(Action::Reply(BareNewlines::refusal())));
        }
        let sender = self.sender.take().unwrap_or_default();
        let recipients = std::mem::take(&mut self.recipients);
        (
            used,
            Some(Action::Decide(Decision {
                event: Event::DataEnd {
                    sender,
                    recipients,
                    size,
                },
            })),
        )
    }

    /// Whether the message being received, or the one whose final dot was just
    /// seen (so at its [`Event::DataEnd`] decision), had a bare CR or bare LF.
    /// Under [`BareNewlines::Normalize`] or [`BareNewlines::Keep`] the policy
    /// can refuse such a message itself, for some transactions only.
    pub fn saw_bare_newline(&self) -> bool {
        self.receiver.saw_bare_newline()
    }

    /// The TLS handshake after [`Action::StartTls`] succeeded: RFC 3207
    /// requires forgetting everything learned before it, so the client must
    /// send EHLO again.
    pub fn tls_established(&mut self) {
        self.helo = None;
        self.authenticated = None;
        self.auth_step = None;
        self.sender = None;
        self.recipients.clear();
        self.state = SessionState::ExpectHelo;
    }
}

impl ServerSession {
    fn start_auth(&mut self, mechanism: &str, initial_response: Option<&str>) -> Action {
        use SessionState as S;
        if self.config.capabilities.auth.is_empty() {
            return self.error(Reply::new(502, enhanced(5, 5, 1), "AUTH not available"));
        }
        match self.state {
            S::ExpectMail => {}
            S::ExpectHelo => return self.error(bad_sequence("Bad sequence: send EHLO first")),
            _ => {
                return self.error(bad_sequence(
                    "Bad sequence: AUTH not permitted during a mail transaction",
                ))
            }
        }
        if self.authenticated.is_some() {
            return self.error(bad_sequence("Already authenticated"));
        }
        if self.config.auth_requires_tls {
            return self.error(Reply::new(
                538,
                enhanced(5, 7, 11),
                "Encryption required for requested authentication mechanism",
            ));
        }
        let mechanism = mechanism.to_ascii_uppercase();
        let offered = self.config.capabilities.auth.contains(&mechanism);
        let step = match mechanism.as_str() {
            "PLAIN" if offered => AuthStep::Plain,
            "LOGIN" if offered => AuthStep::LoginUsername,
            _ => {
                return self.error(Reply::new(
                    504,
                    enhanced(5, 5, 4),
                    "Unrecognized authentication type",
                ))
            }
        };
        self.state = S::ExpectAuthResponse;
        self.auth_step = Some(step);
        match initial_response {
            // "=" is an initial response of zero length (RFC 4954 §4).
            Some(ir) => self.auth_response(ir.as_bytes()),
            None => {
                let challenge = if mechanism == "PLAIN" {
                    ""
                } else {
                    LOGIN_USERNAME
                };
                Action::Reply(Reply::new(334, None, challenge))
            }
        }
    }

    /// One base64 line of an AUTH exchange.
    fn auth_response(&mut self, line: &[u8]) -> Action {
        let step = self.auth_step.take();
        self.state = SessionState::ExpectMail;
        let line = line.trim_ascii();
        if line == b"*" {
            return self.error(Reply::new(
                501,
                enhanced(5, 7, 0),
                "Authentication cancelled",
            ));
        }
        let Some(decoded) = decode_base64(line).and_then(|d| String::from_utf8(d).ok()) else {
            return self.error(Reply::new(501, enhanced(5, 5, 2), "Invalid base64 data"));
        };
        let (mechanism, authorization_id, username, password) = match step {
            Some(AuthStep::Plain) => {
                let mut parts = decoded.splitn(3, '\0');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(z), Some(u), Some(p)) => {
                        ("PLAIN", z.to_owned(), u.to_owned(), p.to_owned())
                    }
                    _ => {
                        return self.error(Reply::new(
                            501,
                            enhanced(5, 5, 2),
                            "Malformed PLAIN response",
                        ))
                    }
                }
            }
            Some(AuthStep::LoginUsername) => {
                self.state = SessionState::ExpectAuthResponse;
                self.auth_step = Some(AuthStep::LoginPassword { username: decoded });
                return Action::Reply(Reply::new(334, None, LOGIN_PASSWORD));
            }
            Some(AuthStep::LoginPassword { username }) => {
                ("LOGIN", String::new(), username, decoded)
            }
            None => return self.error(bad_sequence("Bad sequence: no AUTH in progress")),
        };
        Action::Decide(Decision {
            event: Event::Auth {
                mechanism: mechanism.to_owned(),
                authorization_id,
                username,
                password,
            },
        })
    }
}

/// Standard base64 (RFC 4648 §4), padding optional; `None` if malformed.
fn decode_base64(input: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let trimmed = match input {
        [rest @ .., b'=', b'='] | [rest @ .., b'='] => rest,
        all => all,
    };
    if trimmed.len() % 4 == 1 || (input.len() != trimmed.len() && input.len() % 4 != 0) {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() / 4 * 3 + 2);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

fn unsupported_param(key: &str) -> Reply {
    Reply::new(
        555,
        enhanced(5, 5, 4),
        format!("Parameter {key} not recognized or not implemented"),
    )
}

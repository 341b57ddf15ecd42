use std::fmt;
use std::str::FromStr;

use crate::error::ProtoError;

/// An RFC 3463 enhanced status code such as `5.1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// Class: 2 (success), 4 (persistent transient) or 5 (permanent).
    pub class: u8,
    /// Subject, 0..=999.
    pub subject: u16,
    /// Detail, 0..=999.
    pub detail: u16,
}

impl EnhancedCode {
    /// Builds a code from its three parts.
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedCode {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }
}

/// `Some(EnhancedCode::new(class, subject, detail))`, the argument [`Reply::new`] takes:
/// servers write dozens of coded replies, and this keeps each of them on one line.
pub const fn enhanced(class: u8, subject: u16, detail: u16) -> Option<EnhancedCode> {
    Some(EnhancedCode::new(class, subject, detail))
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl FromStr for EnhancedCode {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ProtoError::InvalidEnhancedCode(s.to_string());
        let mut parts = s.split('.');
        let (Some(c), Some(sub), Some(det), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let digits = |p: &str, max_len: usize| {
            !p.is_empty() && p.len() <= max_len && p.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(c, 1) || !digits(sub, 3) || !digits(det, 3) {
            return Err(bad());
        }
        let class: u8 = c.parse().map_err(|_| bad())?;
        if !matches!(class, 2 | 4 | 5) {
            return Err(bad());
        }
        Ok(EnhancedCode {
            class,
            subject: sub.parse().map_err(|_| bad())?,
            detail: det.parse().map_err(|_| bad())?,
        })
    }
}

/// One SMTP reply, possibly spanning several lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status code found at the start of the first line, if any.
    pub enhanced: Option<EnhancedCode>,
    /// The text of each line without the `250-`/`250 ` prefix. A leading
    /// enhanced code is kept, exactly as received; use [`Reply::text`] for
    /// the human text.
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply. CR and LF in `text` become spaces, so a reply
    /// built from untrusted text cannot inject extra lines.
    pub fn new(code: u16, enhanced: Option<EnhancedCode>, text: impl Into<String>) -> Reply {
        let mut text: String = text.into();
        if text.contains(['\r', '\n']) {
            text = text.replace(['\r', '\n'], " ");
        }
        Reply {
            code,
            enhanced,
            lines: vec![text],
        }
    }

    /// All lines joined with a space, with any leading enhanced code removed
    /// from each line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(self.strip_enhanced(line));
        }
        out
    }

    /// Returns `line` without a leading enhanced code of this reply's class.
    fn strip_enhanced<'a>(&self, line: &'a str) -> &'a str {
        if self.enhanced.is_none() {
            return line;
        }
        match leading_enhanced(line, self.class_digit()) {
            Some((_, rest)) => rest,
            None => line,
        }
    }

    fn class_digit(&self) -> u8 {
        (self.code / 100) as u8
    }

    /// 2xx: the command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx: the server wants more (354 after DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx: transient failure, retry later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: permanent failure.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// Appends the wire form, CRLF-terminated, using `250-` continuation lines.
    ///
    /// If `enhanced` is set, lines that do not already start with an enhanced
    /// code get it prefixed, so that encoding a parsed reply reproduces it
    /// instead of doubling the code.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let empty = [String::new()];
        let lines: &[String] = if self.lines.is_empty() {
            &empty
        } else {
            &self.lines
        };
        let code = self.code.to_string();
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(code.as_bytes());
            out.push(if i + 1 == lines.len() { b' ' } else { b'-' });
            if let Some(e) = self.enhanced {
                if leading_enhanced(line, self.class_digit()).is_none() {
                    out.extend_from_slice(e.to_string().as_bytes());
                    out.push(b' ');
                }
            }
            // Defensive: `lines` is public, so a caller could have put a line
            // break in it; never let that reach the wire.
            out.extend(line.bytes().map(|b| match b {
                b'\r' | b'\n' => b' ',
                b => b,
            }));
            out.extend_from_slice(b"\r\n");
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text())
    }
}

/// Splits `"5.1.1 rest"` (or exactly `"5.1.1"`) into the code and the rest,
/// if the code's class equals `class`.
fn leading_enhanced(text: &str, class: u8) -> Option<(EnhancedCode, &str)> {
    let (candidate, rest) = match text.find(' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    let code: EnhancedCode = candidate.parse().ok()?;
    (code.class == class).then_some((code, rest))
}

/// Validates one reply line and returns its code and whether it is the last
/// line of the reply.
fn check_line(line: &[u8]) -> Result<(u16, bool), ProtoError> {
    let bad = |why: &str| {
        ProtoError::BadReply(format!(
            "{why}: {:?}",
            String::from_utf8_lossy(&line[..line.len().min(64)])
        ))
    };
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(bad("reply line does not start with a 3-digit code"));
    }
    if !(b'2'..=b'5').contains(&line[0]) {
        return Err(bad("reply code out of range"));
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    match line.get(3) {
        None | Some(b' ') => Ok((code, true)),
        Some(b'-') => Ok((code, false)),
        Some(_) => Err(bad("reply code not followed by space or hyphen")),
    }
}

/// Limits on one reply, so that a broken or hostile server can make the client neither buffer
/// without end nor rescan what it already checked.
///
/// [`ReplyLimits::default`] is [`MAX_REPLY_LINE`](crate::MAX_REPLY_LINE) per line,
/// [`MAX_REPLY_LINES`](crate::MAX_REPLY_LINES) lines and
/// [`MAX_REPLY_BYTES`](crate::MAX_REPLY_BYTES) in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLimits {
    /// Longest line, without its line end.
    pub max_line: usize,
    /// Most lines in one reply.
    pub max_lines: usize,
    /// Most bytes in one reply, line ends included.
    pub max_bytes: usize,
}

impl ReplyLimits {
    /// The default limits with another maximum line length.
    pub const fn with_max_line(max_line: usize) -> ReplyLimits {
        ReplyLimits {
            max_line,
            max_lines: crate::MAX_REPLY_LINES,
            max_bytes: crate::MAX_REPLY_BYTES,
        }
    }
}

impl Default for ReplyLimits {
    fn default() -> Self {
        ReplyLimits::with_max_line(crate::MAX_REPLY_LINE)
    }
}

/// A resumable scan for the end of one reply, within [`ReplyLimits`].
///
/// Feed it a buffer that starts at the reply and grows at its end between calls: it remembers
/// the lines it already checked and how far it looked for the current line's end, so feeding
/// a reply in any number of pieces costs time linear in its length. A hostile server that
/// streams continuation lines is stopped at the limit after at most
/// [`ReplyLimits::max_bytes`] bytes, however the bytes arrive.
///
/// Once a reply is complete (or an error is returned) the scanner starts afresh: the next
/// call must pass a buffer that starts where that reply ended.
#[derive(Debug, Clone, Default)]
pub struct ReplyScanner {
    limits: ReplyLimits,
    /// Length of the complete, checked lines of the reply in progress.
    checked: usize,
    /// Bytes after `checked` already known to hold no line feed.
    searched: usize,
    /// Complete lines of the reply in progress.
    lines: usize,
    /// The code of its first line.
    code: Option<u16>,
}

impl ReplyScanner {
    /// A scanner enforcing `limits`.
    pub fn new(limits: ReplyLimits) -> ReplyScanner {
        ReplyScanner {
            limits,
            checked: 0,
            searched: 0,
            lines: 0,
            code: None,
        }
    }

    /// The limits this scanner enforces.
    pub fn limits(&self) -> ReplyLimits {
        self.limits
    }

    /// Forgets the reply in progress; the next call starts a new one.
    pub fn reset(&mut self) {
        *self = ReplyScanner::new(self.limits);
    }

    /// Looks for the end of the reply at the start of `buf`, resuming where the previous call
    /// stopped. Returns the reply's length once it is complete, `Ok(None)` while it is not.
    ///
    /// Errors as soon as the bytes so far prove the reply malformed or over a limit: a line
    /// longer than `max_line` (even before its line end), more than `max_lines` lines (on
    /// the continuation line that would be number `max_lines`), or more than `max_bytes`
    /// bytes (even before the last line ends).
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtoError> {
        Ok(self.scan_reply(buf)?.map(|(len, _)| len))
    }

    fn scan_reply(&mut self, buf: &[u8]) -> Result<Option<(usize, u16)>, ProtoError> {
        if buf.len() < self.checked + self.searched {
            // Not the grown buffer this scan was resumed on: start over rather than trust
            // positions that do not fit it.
            self.reset();
        }
        let result = self.scan_lines(buf);
        if !matches!(result, Ok(None)) {
            self.reset();
        }
        result
    }

    /// The scan; a complete reply comes with its code.
    fn scan_lines(&mut self, buf: &[u8]) -> Result<Option<(usize, u16)>, ProtoError> {
        let ReplyLimits {
            max_line,
            max_lines,
            max_bytes,
        } = self.limits;
        loop {
            let start = self.checked;
            // A line end further away than the longest line allows is not worth finding: the
            // line is too long whatever comes.
            let reach = start
                .saturating_add(max_line)
                .saturating_add(2)
                .min(buf.len());
            let from = start + self.searched;
            let Some(lf) = buf
                .get(from..reach)
                .and_then(|window| memchr::memchr(b'\n', window))
                .map(|i| from + i)
            else {
                self.searched = reach.max(from) - start;
                let pending = &buf[start..];
                if pending.strip_suffix(b"\r").unwrap_or(pending).len() > max_line {
                    return Err(ProtoError::LineTooLong { limit: max_line });
                }
                // The line end is still to come, so the reply will be longer than this.
                if buf.len() >= max_bytes {
                    return Err(ProtoError::ReplyTooLarge { limit: max_bytes });
                }
                return Ok(None);
            };
            let line = &buf[start..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max_line {
                return Err(ProtoError::LineTooLong { limit: max_line });
            }
            let (code, last) = check_line(line)?;
            match self.code {
                None => self.code = Some(code),
                Some(c) if c != code => {
                    return Err(ProtoError::BadReply(format!(
                        "continuation line code {code} differs from {c}"
                    )))
                }
                Some(_) => {}
            }
            self.checked = lf + 1;
            self.searched = 0;
            self.lines += 1;
            if self.checked > max_bytes {
                return Err(ProtoError::ReplyTooLarge { limit: max_bytes });
            }
            if last {
                return Ok(Some((self.checked, code)));
            }
            // A continuation line promises another one.
            if self.lines >= max_lines {
                return Err(ProtoError::ReplyTooManyLines { limit: max_lines });
            }
        }
    }

    /// [`ReplyScanner::scan`], then the reply itself once it is complete, with the number of
    /// bytes of `buf` it used.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtoError> {
        Ok(self
            .scan_reply(buf)?
            .map(|(len, code)| (build_reply(&buf[..len], code), len)))
    }
}

/// Builds the reply from bytes a [`ReplyScanner`] found complete and well formed.
fn build_reply(bytes: &[u8], code: u16) -> Reply {
    let lines: Vec<String> = bytes
        .split_inclusive(|&b| b == b'\n')
        .map(|raw| {
            let line = raw.strip_suffix(b"\n").unwrap_or(raw);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned()
        })
        .collect();
    let class = (code / 100) as u8;
    let enhanced = lines
        .first()
        .and_then(|l| leading_enhanced(l, class))
        .map(|(e, _)| e);
    Reply {
        code,
        enhanced,
        lines,
    }
}

/// Parses one complete reply from the start of `buf`, with the default [`ReplyLimits`] but
/// `max_line`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a complete reply; the
/// caller reads more bytes and calls again with the grown buffer. On success
/// the `usize` is the number of bytes of `buf` the reply used. Each call scans
/// from the start: a caller that reads a reply in pieces should keep a
/// [`ReplyScanner`] instead, which resumes where it stopped.
///
/// Errors on a line longer than `max_line` (even one not yet terminated), a
/// reply over the line or byte limit, a code that is not three digits in
/// 2xx-5xx, continuation lines with a different code, or other garbage. Bare
/// LF line endings are accepted, as is a line holding only the code (`250`).
/// The enhanced code is recognised when the first line's text starts with
/// `x.y.z ` where `x` is the first digit of the reply code.
pub fn parse_reply(buf: &[u8], max_line: usize) -> Result<Option<(Reply, usize)>, ProtoError> {
    ReplyScanner::new(ReplyLimits::with_max_line(max_line)).parse(buf)
}

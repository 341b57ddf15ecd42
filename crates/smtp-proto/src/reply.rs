use std::fmt;
use std::str::FromStr;

use crate::error::ProtoError;
use crate::line::find_line;

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

/// Scans `buf` for a complete reply without allocating; returns its length.
fn check_reply(buf: &[u8], max_line: usize) -> Result<Option<usize>, ProtoError> {
    let mut pos = 0;
    let mut first_code = None;
    loop {
        let Some((line, used)) = find_line(&buf[pos..], max_line)? else {
            return Ok(None);
        };
        let (code, last) = check_line(line)?;
        match first_code {
            None => first_code = Some(code),
            Some(c) if c != code => {
                return Err(ProtoError::BadReply(format!(
                    "continuation line code {code} differs from {c}"
                )))
            }
            Some(_) => {}
        }
        pos += used;
        if last {
            return Ok(Some(pos));
        }
    }
}

/// Parses one complete reply from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a complete reply; the
/// caller reads more bytes and calls again with the grown buffer. On success
/// the `usize` is the number of bytes of `buf` the reply used.
///
/// Errors on a line longer than `max_line` (even one not yet terminated), a
/// code that is not three digits in 2xx-5xx, continuation lines with a
/// different code, or other garbage. Bare LF line endings are accepted, as is
/// a line holding only the code (`250`). The enhanced code is recognised when
/// the first line's text starts with `x.y.z ` where `x` is the first digit of
/// the reply code.
pub fn parse_reply(buf: &[u8], max_line: usize) -> Result<Option<(Reply, usize)>, ProtoError> {
    let Some(total) = check_reply(buf, max_line)? else {
        return Ok(None);
    };
    let mut lines = Vec::new();
    let mut code = 0;
    let mut pos = 0;
    while pos < total {
        // check_reply already proved every line is present and well formed.
        let Some((line, used)) = find_line(&buf[pos..total], max_line)? else {
            break;
        };
        code = check_line(line)?.0;
        let text = line.get(4..).unwrap_or_default();
        lines.push(String::from_utf8_lossy(text).into_owned());
        pos += used;
    }
    let class = (code / 100) as u8;
    let enhanced = lines
        .first()
        .and_then(|l| leading_enhanced(l, class))
        .map(|(e, _)| e);
    Ok(Some((
        Reply {
            code,
            enhanced,
            lines,
        },
        total,
    )))
}

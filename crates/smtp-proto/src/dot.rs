/// Streaming dot-stuffer for the client's DATA phase.
///
/// Converts bare LF to CRLF and doubles a `.` at the start of every line,
/// keeping its state across chunk boundaries. Normalising bare LF matters
/// beyond tidiness: a bare `LF . CRLF` that some receivers treat as the end of
/// data is exactly what SMTP smuggling exploits, so only CRLF leaves here.
#[derive(Debug, Default)]
pub struct DotStuffer {
    /// Some byte has been written on the current line (so a `.` is not at
    /// the line start). Starts false: the first byte of the message is at a
    /// line start.
    mid_line: bool,
    /// The previous input byte was CR, so an LF now needs no CR inserted.
    prev_cr: bool,
}

impl DotStuffer {
    /// A stuffer positioned at the start of the message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the stuffed form of `input` to `out`.
    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let Some(&last) = input.last() else {
            return;
        };
        out.reserve(input.len() + input.len() / 64 + 2);
        // Mail is almost all CRLF lines that do not start with a dot: the line ends are
        // found with SIMD and only inspected, and the input is copied in long runs between
        // the rare places where a CR or a dot has to be inserted.
        if !self.mid_line && input[0] == b'.' {
            out.push(b'.');
        }
        let mut copied = 0;
        for i in memchr::memchr_iter(b'\n', input) {
            let cr_before = match i.checked_sub(1) {
                Some(p) => input[p] == b'\r',
                None => self.prev_cr,
            };
            if !cr_before {
                out.extend_from_slice(&input[copied..i]);
                out.push(b'\r');
                copied = i;
            }
            if input.get(i + 1) == Some(&b'.') {
                out.extend_from_slice(&input[copied..=i]);
                out.push(b'.');
                copied = i + 1;
            }
        }
        out.extend_from_slice(&input[copied..]);
        self.mid_line = last != b'\n';
        self.prev_cr = last == b'\r';
    }

    /// Ends the message: appends CRLF if the data did not end with one, then
    /// the terminating `.` CRLF.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self.mid_line {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// Where the receiver is within the current line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum RxState {
    /// At the first byte of a line.
    #[default]
    LineStart,
    /// Inside a line, previous byte not CR.
    Middle,
    /// Inside a line, previous byte was CR.
    AfterCr,
    /// The line so far is a single `.`.
    Dot,
    /// The line so far is `.` CR.
    DotCr,
}

/// Streaming un-stuffer for the server's DATA phase.
///
/// Only `CRLF . CRLF` ends the data (the CRLF before the dot being the end of
/// the previous line, or the start of the data). Bare-LF variants are
/// deliberately not accepted as the terminator: a receiver that did so could
/// be made to see a message boundary the sending MTA did not see (SMTP
/// smuggling).
#[derive(Debug, Default)]
pub struct DataReceiver {
    state: RxState,
}

impl DataReceiver {
    /// A receiver positioned at the start of the message data.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes, appending the unstuffed message bytes to `out`.
    ///
    /// Returns how many input bytes were consumed and whether the terminating
    /// `.` CRLF line was seen. Bytes after the terminator are not consumed:
    /// they are pipelined commands. After the terminator the receiver is
    /// reset and can take the next message.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        out.reserve(input.len());
        for (i, &b) in input.iter().enumerate() {
            self.state = match (self.state, b) {
                (RxState::LineStart, b'.') => RxState::Dot,
                (RxState::Dot, b'\r') => RxState::DotCr,
                (RxState::DotCr, b'\n') => {
                    self.state = RxState::LineStart;
                    return (i + 1, true);
                }
                // ".." at a line start: the first dot was stuffing.
                (RxState::Dot, b'.') => {
                    out.push(b'.');
                    RxState::Middle
                }
                // A single leading dot followed by other text: RFC 5321
                // 4.5.2 says the dot is deleted.
                (RxState::Dot, _) => Self::plain(b, out),
                (RxState::DotCr, _) => {
                    out.push(b'\r');
                    Self::after_cr(b, out)
                }
                (RxState::AfterCr, _) => Self::after_cr(b, out),
                (RxState::LineStart | RxState::Middle, _) => Self::plain(b, out),
            };
        }
        (input.len(), false)
    }

    fn plain(b: u8, out: &mut Vec<u8>) -> RxState {
        out.push(b);
        if b == b'\r' {
            RxState::AfterCr
        } else {
            RxState::Middle
        }
    }

    fn after_cr(b: u8, out: &mut Vec<u8>) -> RxState {
        out.push(b);
        match b {
            b'\n' => RxState::LineStart,
            b'\r' => RxState::AfterCr,
            _ => RxState::Middle,
        }
    }
}

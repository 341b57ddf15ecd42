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
    /// At the first byte of a line that began after a CRLF (or at the start
    /// of the data): a `.` CRLF here ends the data.
    #[default]
    LineStart,
    /// At the first byte of a line that began after a bare line end turned
    /// into CRLF (only when normalising): a lone dot here is content.
    BareLineStart,
    /// Inside a line, previous byte not CR.
    Middle,
    /// Inside a line, previous byte was CR.
    AfterCr,
    /// The line so far is a single `.`; `bare` when the line began after a
    /// bare line end.
    Dot {
        /// The line began after a bare line end.
        bare: bool,
    },
    /// The line so far is `.` CR.
    DotCr {
        /// The line began after a bare line end.
        bare: bool,
    },
}

/// Streaming un-stuffer for the server's DATA phase.
///
/// Only `CRLF . CRLF` ends the data (the CRLF before the dot being the end of
/// the previous line, or the start of the data). Bare-LF and bare-CR variants
/// (`LF . LF`, `CR . CR`, `LF . CRLF`, `CRLF . LF`...) are never the
/// terminator: a receiver that took one for it could be made to see a
/// message boundary the sending MTA did not see, and accept a second,
/// forged message from the rest (SMTP smuggling, CVE-2023-51764/51765/51766).
///
/// A bare LF or bare CR (one not part of a CRLF) is noted either way
/// ([`DataReceiver::saw_bare_newline`]), so a server can refuse the message.
/// [`DataReceiver::new`] passes such bytes through; a receiver from
/// [`DataReceiver::normalizing`] turns each into CRLF, and the line after it
/// is read as a line (a leading dot is unstuffed), except that a lone dot
/// there is kept as content rather than ending the data.
#[derive(Debug, Default)]
pub struct DataReceiver {
    state: RxState,
    normalize: bool,
    /// A bare CR or LF was seen in the current (or just ended) message.
    bare_newline: bool,
    /// The terminator was seen: the next byte fed starts a new message.
    finished: bool,
}

impl DataReceiver {
    /// A receiver positioned at the start of the message data that keeps bare
    /// CR and LF bytes as they are (noting them).
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver that converts every bare CR and bare LF to CRLF.
    pub fn normalizing() -> Self {
        DataReceiver {
            normalize: true,
            ..Self::default()
        }
    }

    /// Whether the message being received, or the one whose terminator was
    /// just seen, contains a bare CR or bare LF (before any normalising).
    pub fn saw_bare_newline(&self) -> bool {
        self.bare_newline
    }

    /// Feeds bytes, appending the unstuffed message bytes to `out`.
    ///
    /// Returns how many input bytes were consumed and whether the terminating
    /// `.` CRLF line was seen. Bytes after the terminator are not consumed:
    /// they are pipelined commands. After the terminator the receiver is
    /// reset and can take the next message.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        if input.is_empty() {
            return (0, false);
        }
        if self.finished {
            self.finished = false;
            self.bare_newline = false;
        }
        out.reserve(input.len());
        for (i, &b) in input.iter().enumerate() {
            if self.step(b, out) {
                self.state = RxState::LineStart;
                self.finished = true;
                return (i + 1, true);
            }
        }
        (input.len(), false)
    }

    /// One byte; true when it completed the terminator.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        use RxState as S;
        self.state = match (self.state, b) {
            (S::LineStart, b'.') => S::Dot { bare: false },
            (S::BareLineStart, b'.') => S::Dot { bare: true },
            (S::Dot { bare }, b'\r') => S::DotCr { bare },
            (S::DotCr { bare: false }, b'\n') => return true,
            // A lone dot on a line that began after a bare line end: content.
            (S::DotCr { bare: true }, b'\n') => {
                out.extend_from_slice(b".\r\n");
                S::LineStart
            }
            // ".." at a line start: the first dot was stuffing.
            (S::Dot { .. }, b'.') => {
                out.push(b'.');
                S::Middle
            }
            (S::Dot { .. }, b'\n') => {
                self.bare_newline = true;
                if self.normalize {
                    out.extend_from_slice(b".\r\n");
                    S::BareLineStart
                } else {
                    out.push(b'\n');
                    S::Middle
                }
            }
            // A single leading dot followed by other text: RFC 5321
            // 4.5.2 says the dot is deleted.
            (S::Dot { .. }, _) => Self::plain(b, out),
            // ". CR x": the CR was bare.
            (S::DotCr { .. }, _) => {
                self.bare_newline = true;
                if self.normalize {
                    out.extend_from_slice(b".\r\n");
                    self.state = S::BareLineStart;
                    return self.step(b, out);
                }
                out.push(b'\r');
                Self::plain(b, out)
            }
            (S::AfterCr, b'\n') => {
                out.push(b'\n');
                S::LineStart
            }
            // The CR before this byte was bare.
            (S::AfterCr, _) => {
                self.bare_newline = true;
                if self.normalize {
                    out.push(b'\n');
                    self.state = S::BareLineStart;
                    return self.step(b, out);
                }
                Self::plain(b, out)
            }
            (S::LineStart | S::BareLineStart | S::Middle, b'\n') => {
                self.bare_newline = true;
                if self.normalize {
                    out.extend_from_slice(b"\r\n");
                    S::BareLineStart
                } else {
                    out.push(b'\n');
                    S::Middle
                }
            }
            (S::LineStart | S::BareLineStart | S::Middle, _) => Self::plain(b, out),
        };
        false
    }

    fn plain(b: u8, out: &mut Vec<u8>) -> RxState {
        out.push(b);
        if b == b'\r' {
            RxState::AfterCr
        } else {
            RxState::Middle
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end-of-data look-alikes from the SMTP smuggling write-ups (SEC Consult, December
    /// 2023): each was taken for the terminator by some receiver.
    const SMUGGLING_SEPARATORS: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r.\n",
        b"\r\n\x00.\r\n",
    ];

    /// A first message, a look-alike terminator, then a second, forged transaction, then the
    /// real terminator and a pipelined command.
    fn smuggling(separator: &[u8]) -> Vec<u8> {
        let mut wire = b"From: a@example.com\r\n\r\nfirst".to_vec();
        wire.extend_from_slice(separator);
        wire.extend_from_slice(
            b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nFrom: admin@example.com\r\n\r\nforged\r\n.\r\nQUIT\r\n",
        );
        wire
    }

    fn receive(mut rx: DataReceiver, wire: &[u8], chunk: usize) -> (Vec<u8>, usize, bool) {
        let mut out = Vec::new();
        let mut pos = 0;
        for part in wire.chunks(chunk) {
            let (used, done) = rx.feed(part, &mut out);
            pos += used;
            if done {
                return (out, pos, rx.saw_bare_newline());
            }
        }
        panic!("no terminator in {wire:?}");
    }

    #[test]
    fn smuggled_terminators_never_end_the_data() {
        for separator in SMUGGLING_SEPARATORS {
            let wire = smuggling(separator);
            let end = wire.len() - b"QUIT\r\n".len();
            for chunk in [1, 2, 3, 7, wire.len()] {
                for (name, rx) in [
                    ("keeping", DataReceiver::new()),
                    ("normalizing", DataReceiver::normalizing()),
                ] {
                    let (out, used, bare) = receive(rx, &wire, chunk);
                    assert_eq!(used, end, "{name} {separator:?} in chunks of {chunk}");
                    // The forged transaction is content of the one message.
                    assert!(
                        out.windows(6).any(|w| w == b"forged"),
                        "{name} {separator:?}"
                    );
                    let nul = separator.contains(&0);
                    assert_eq!(bare, !nul, "{name} {separator:?}");
                }
            }
        }
    }

    #[test]
    fn normalizing_turns_bare_line_ends_into_crlf() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),
            (b"a\rb\r\n.\r\n", b"a\r\nb\r\n"),
            (b"a\r\rb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
            (b"a\n\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
            (b"\nx\r\n.\r\n", b"\r\nx\r\n"),
            // After a bare line end a leading dot is unstuffed like after CRLF...
            (b"a\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
            (b"a\r..b\r\n.\r\n", b"a\r\n.b\r\n"),
            // ...but a lone dot there is content, in every spelling.
            (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\n.\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r.\rb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n.\rb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            // The real terminator right after a bare-dot line still ends the data.
            (b"a\n.\r\n.\r\n", b"a\r\n.\r\n"),
            (b"x\r\r\n.\r\n", b"x\r\n\r\n"),
        ];
        for (wire, want) in cases {
            for chunk in 1..=wire.len() {
                let (out, used, bare) = receive(DataReceiver::normalizing(), wire, chunk);
                assert_eq!(used, wire.len(), "{wire:?}");
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(want),
                    "{wire:?} in chunks of {chunk}"
                );
                assert!(bare, "{wire:?}");
            }
        }
    }

    #[test]
    fn clean_data_is_not_flagged_and_the_flag_is_per_message() {
        let mut rx = DataReceiver::new();
        let mut out = Vec::new();
        let wire = b"a\nb\r\n.\r\nc\r\n..\r\n.\r\n";
        let (used, done) = rx.feed(wire, &mut out);
        assert!(done);
        assert!(rx.saw_bare_newline());
        // The next message starts clean.
        out.clear();
        assert_eq!(rx.feed(&wire[used..], &mut out), (wire.len() - used, true));
        assert_eq!(out, b"c\r\n.\r\n");
        assert!(!rx.saw_bare_newline());
    }
}

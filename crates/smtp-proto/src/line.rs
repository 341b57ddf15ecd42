use crate::error::ProtoError;

/// Finds the first line in `buf`: returns it without its line end, plus the
/// bytes consumed including the line end. CRLF and bare LF both end a line.
pub(crate) fn find_line(buf: &[u8], max_line: usize) -> Result<Option<(&[u8], usize)>, ProtoError> {
    // Only look as far as a maximal line could reach, so a flood without line
    // ends is rejected in bounded time instead of being rescanned forever.
    let window = &buf[..buf.len().min(max_line.saturating_add(2))];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            let line = &buf[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max_line {
                return Err(ProtoError::LineTooLong { limit: max_line });
            }
            Ok(Some((line, lf + 1)))
        }
        None => {
            let pending = buf.strip_suffix(b"\r").unwrap_or(buf);
            if pending.len() > max_line {
                return Err(ProtoError::LineTooLong { limit: max_line });
            }
            Ok(None)
        }
    }
}

/// Server-side line framing.
///
/// Returns the first complete line without its CRLF (a bare LF also ends a
/// line) and the number of bytes consumed, `Ok(None)` if no complete line is
/// buffered yet, or an error once more than `max_line` bytes have arrived
/// without a line end.
pub fn take_line(buf: &[u8], max_line: usize) -> Result<Option<(&[u8], usize)>, ProtoError> {
    find_line(buf, max_line)
}
